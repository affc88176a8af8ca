"""Figures of the routing experiments and of any fastrace run file (matplotlib, Agg).

matplotlib is an optional extra (``pip install 'fastrace[plot]'``) imported on first use. Figures
are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend) and saved
as small PNGs. Every function writes one file and returns its path.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

DPI = 90
SEED_COLOR = "0.65"
ALIGNED_COLOR = "C0"
THEORY_COLOR = "k"


def _figure(width: float = 6.0, height: float = 3.6, **kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'fastrace[plot]'") from None
    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def figure_formats() -> dict[str, str]:
    """The figure formats matplotlib writes: {file extension: description}."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'fastrace[plot]'") from None
    return FigureCanvasBase.get_supported_filetypes()


def check_figure_path(path: str | os.PathLike) -> str:
    """Check, before any work, that a figure can be written at ``path``: its extension names a
    format matplotlib writes and its directory exists. Returns the format; ConfigError if not."""
    p = Path(os.fspath(path))
    formats = figure_formats()
    supported = ", ".join(sorted(formats))
    if p.is_dir():
        raise ConfigError(f"{p} is a directory; give a figure file name, such as "
                          f"{p / 'figure.png'}")
    if p.exists() and not p.is_file():
        raise ConfigError(f"cannot write figure {p}: it is not a regular file (a FIFO or a "
                          f"device)")
    fmt = p.suffix[1:].lower()
    if not fmt:
        raise ConfigError(f"figure {p} has no file extension to name its format; supported "
                          f"formats: {supported}")
    if fmt not in formats:
        raise ConfigError(f"cannot write figure {p}: unknown format {fmt!r}; supported "
                          f"formats: {supported}")
    if not p.parent.is_dir():
        why = "is not a directory" if p.parent.exists() else "does not exist"
        raise ConfigError(f"cannot write figure {p}: its directory {p.parent} {why}")
    return fmt


def _save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` in the format its extension names. The figure is written to a
    temporary file beside it and renamed onto ``path``: a failed write leaves no partial file."""
    path = Path(os.fspath(path))
    fmt = check_figure_path(path)
    target = Path(os.path.realpath(path))  # a symlink: write its target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        fig.savefig(tmp, format=fmt, dpi=DPI)
        os.replace(tmp, target)
    except OSError as exc:
        raise ConfigError(f"cannot write figure {path}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError, KeyError) as exc:
        # a format whose writer is missing here (pgf without LaTeX, say)
        raise ConfigError(f"cannot write figure {path} as {fmt}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def _positive(y: np.ndarray) -> np.ndarray:
    """Values for a log axis: non-positive entries (round-off below zero) become NaN."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(y > 0, y, np.nan)


# ----------------------------------------------------------------------------- routing
def routing_loss(path, epochs: np.ndarray, sims: Mapping[str, Any], theory_loss: np.ndarray,
                 drop_epochs: Sequence[float] = ()) -> Path:
    """Training loss vs epoch: random initialisations (grey), the aligned run, the theory,
    and the predicted drop epochs (dotted verticals)."""
    fig = _figure()
    ax = fig.add_subplot()
    first = True
    for name, tr in sims.items():
        if name == "aligned":
            continue
        ax.plot(tr.step, _positive(tr.loss), color=SEED_COLOR, lw=0.8,
                label="random init (gain 0.2)" if first else None)
        first = False
    if "aligned" in sims:
        tr = sims["aligned"]
        ax.plot(tr.step, _positive(tr.loss), color=ALIGNED_COLOR, lw=2.2, alpha=0.8,
                label="aligned init (b0 = 0.08)")
    ax.plot(epochs, _positive(theory_loss), color=THEORY_COLOR, lw=1.0, ls="--",
            label="reduced theory")
    for k, e in enumerate(np.unique(np.round(np.asarray(drop_epochs, float), 6))):
        ax.axvline(e, color="C3", lw=0.8, ls=":", label="learning-time integral" if k == 0
                   else None)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(1e-6, np.nanmin(_positive(theory_loss[: len(theory_loss)]))))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("Routing network (M = 7, K = 4): the neural race", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def routing_modes(path, epochs: np.ndarray, sims: Mapping[str, Any],
                  theory: Mapping[str, np.ndarray], pairs: Mapping[str, tuple[int, int]]) -> Path:
    """Singular values of the shared edge and mode strengths of one trained and one untrained
    pathway vs epoch: simulations against the reduced theory."""
    panels = [("shared_svals", "shared edge $W_h$: singular values")]
    for key, (i, j) in pairs.items():
        kind = "trained" if key == "modes_trained" else "untrained"
        panels.append((key, f"pathway {i}→{j} ({kind}): mode strengths π"))
    fig = _figure(3.2 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), sharey=False)
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        for name, tr in sims.items():
            if name == "aligned" or key not in tr.quantities:
                continue
            ax.plot(tr.step, tr.quantities[key], color=SEED_COLOR, lw=0.7)
        if "aligned" in sims and key in sims["aligned"].quantities:
            tr = sims["aligned"]
            ax.plot(tr.step, tr.quantities[key], color=ALIGNED_COLOR, lw=2.2, alpha=0.8)
        ax.plot(epochs, theory[key], color=THEORY_COLOR, lw=1.0, ls="--")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch")
    np.atleast_1d(axes)[0].plot([], [], color=SEED_COLOR, label="random init")
    np.atleast_1d(axes)[0].plot([], [], color=ALIGNED_COLOR, lw=2.2, label="aligned")
    np.atleast_1d(axes)[0].plot([], [], color=THEORY_COLOR, ls="--", label="theory")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def gate_map(path, trained: np.ndarray) -> Path:
    """The M × M map of trained (dark) and held-out (light) input/output domain pairs."""
    trained = np.asarray(trained, dtype=bool)
    M = trained.shape[0]
    fig = _figure(3.0, 3.0)
    ax = fig.add_subplot()
    ax.imshow(trained, cmap="Greys", vmin=-0.3, vmax=1.3)
    ax.set_xticks(range(M))
    ax.set_yticks(range(M))
    ax.set_xlabel("output domain j")
    ax.set_ylabel("input domain i")
    ax.set_title(f"trained pairs ({int(trained.sum())} of {M * M})", fontsize=9)
    return _save(fig, path)


def similarity_grid(path, panels: Sequence[tuple[str, np.ndarray]], n_domains: int,
                    n_items: int) -> Path:
    """Representational similarity matrices, one panel each, blocks of items per domain."""
    fig = _figure(3.0 * len(panels) + 0.6, 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    image = None
    for ax, (title, sim) in zip(axes, panels):
        image = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        for k in range(1, n_domains):
            ax.axhline(k * n_items - 0.5, color="k", lw=0.4)
            ax.axvline(k * n_items - 0.5, color="k", lw=0.4)
        ticks = np.arange(n_domains) * n_items + (n_items - 1) / 2
        ax.set_xticks(ticks, [str(d) for d in range(n_domains)], fontsize=7)
        ax.set_yticks(ticks, [str(d) for d in range(n_domains)], fontsize=7)
        ax.set_xlabel("input domain (items within)", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine similarity")
    return _save(fig, path)


def output_grid(path, outputs: np.ndarray, targets: np.ndarray, trained: np.ndarray,
                title: str = "") -> Path:
    """The M × M grid of network outputs: cell (i, j) is Ŷ_ij (features × items); trained
    pairs are framed. One image, so it stays cheap for any M."""
    from matplotlib.patches import Rectangle

    M, _, n_out, n_items = outputs.shape
    gap = 1
    h, w = n_out + gap, n_items + gap
    canvas = np.full((M * h - gap, M * w - gap), np.nan)
    for i in range(M):
        for j in range(M):
            canvas[i * h:i * h + n_out, j * w:j * w + n_items] = outputs[i, j]
    vmax = float(np.max(np.abs(targets)))
    fig = _figure(4.4, 4.6)
    ax = fig.add_subplot()
    ax.imshow(canvas, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
    for i, j in np.argwhere(trained):
        ax.add_patch(Rectangle((j * w - 0.5, i * h - 0.5), n_items, n_out, fill=False,
                               edgecolor="C3", lw=1.2))
    ax.set_xticks(np.arange(M) * w + (n_items - 1) / 2, [str(j) for j in range(M)], fontsize=7)
    ax.set_yticks(np.arange(M) * h + (n_out - 1) / 2, [str(i) for i in range(M)], fontsize=7)
    ax.set_xlabel("output domain j (framed: trained)")
    ax.set_ylabel("input domain i")
    ax.set_title(f"network outputs Ŷ_ij (features × items) {title}", fontsize=9)
    return _save(fig, path)


def errors_versus(path, x: np.ndarray, trained: np.ndarray, untrained: np.ndarray,
                  baseline: float, xlabel: str, title: str, log_x: bool = True) -> Path:
    """Per-pair error on trained and untrained pairs (every seed, and the mean) against a
    sweep variable; the dotted line is the error of the zero network."""
    x = np.asarray(x, dtype=np.float64)
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot()
    for values, color, label in ((trained, "C0", "trained pairs"),
                                 (untrained, "C3", "untrained pairs")):
        v = np.asarray(values, dtype=np.float64).reshape(x.size, -1)
        for col in range(v.shape[1]):
            ax.plot(x, _positive(v[:, col]), "o", color=color, ms=3, alpha=0.4)
        finite = np.isfinite(v)
        count = finite.sum(axis=1)
        mean = np.where(count > 0, np.where(finite, v, 0.0).sum(axis=1) / np.maximum(count, 1),
                        np.nan)  # NaN where no seed has a value (no untrained pairs at K = M)
        ax.plot(x, _positive(mean), "-", color=color, lw=1.5, label=label)
    ax.axhline(baseline, color="k", ls=":", lw=0.8, label="zero network")
    ax.set_yscale("log")
    ax.set_ylim(1e-7 * baseline, 10 * baseline)  # errors below this are round-off
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("error per pair ½|Y − Ŷ|²")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def shared_vs_separate(path, curves: Mapping[str, Mapping[str, Any]], M: int, K: int) -> Path:
    """Per-pathway loss vs epoch: M pathways through one shared hidden layer against a single
    pathway alone, with the theory of each."""
    fig = _figure(5.6, 3.4)
    ax = fig.add_subplot()
    for label, color, text in (("shared", "C0", f"shared (M = {M}, K = {K})"),
                               ("single", "C1", "single pathway")):
        c = curves[label]
        for name, loss in c["per_pathway"].items():
            aligned = name.endswith("aligned")
            ax.plot(c["epochs"], _positive(loss), color=color, lw=2.0 if aligned else 0.7,
                    alpha=0.8 if aligned else 0.5, label=text if aligned else None)
        ax.plot(c["epochs"], _positive(c["theory"]), color=THEORY_COLOR, lw=0.9, ls="--")
    ax.plot([], [], color=THEORY_COLOR, ls="--", label="theory")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-4)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per trained pathway")
    ax.set_title("Shared structure learns faster", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


# ----------------------------------------------------------------------------- any file
_X_KEYS = ("epoch", "step", "t")


def _plot_series(h5_path, name: str) -> tuple[Any, str]:
    """The series of run ``name`` that the file figure shows (x axis, loss, singular values),
    cut to the rows every one of them has (a run killed between flushes may have more rows in
    one than another); and "" or why the run cannot be plotted."""
    from . import store

    with store.open_run(h5_path, name) as reader:
        wanted = [s for s in reader.series_names
                  if s in _X_KEYS or s == "loss" or s.startswith("svals/")]
        d = reader.read(wanted)
    if not any(k in d.series for k in _X_KEYS):
        return d, "has no 'epoch', 'step' or 't' series to plot against"
    if "loss" not in d.series and not any(k.startswith("svals/") for k in d.series):
        return d, "has no loss or singular values"
    rows = min(len(v) for v in d.series.values())
    if rows == 0:
        return d, f"has no rows yet (status {d.status})"
    d.series = {k: v[:rows] for k, v in d.series.items()}
    return d, ""


def file_figure(h5_path: str | os.PathLike, out: str | os.PathLike,
                runs: Sequence[str] | None = None, edge: str | None = None,
                report: Callable[[str], None] | None = None) -> Path:
    """The standard figure of any fastrace run file: loss vs time of every run, and the
    singular values of one edge vs time (``edge``; default: the first edge with recorded
    singular values, the shared edge when present). Theory runs are dashed.

    ``out``'s extension names the format (checked before the file is read). A run that cannot
    be plotted (no rows yet, say: a run killed before its first flush) is left out, and
    ``report`` receives a line saying so; ConfigError when no run is left to plot.
    """
    from . import store

    check_figure_path(out)
    names = store.list_runs(h5_path) if runs is None else list(dict.fromkeys(runs))
    if not names:
        raise ConfigError(f"{os.fspath(h5_path)} holds no runs to plot")
    data = {}
    left_out = []
    for name in names:
        d, why = _plot_series(h5_path, name)
        if why:
            left_out.append(f"run {name!r} {why}")
        else:
            data[name] = d
    if not data:
        raise ConfigError(f"{os.fspath(h5_path)}: nothing to plot: " + "; ".join(left_out))
    if report is not None:
        for line in left_out:
            report(f"{line}: not plotted")
    sval_edges = [k[len("svals/"):] for d in data.values() for k in d.series
                  if k.startswith("svals/")]
    if edge is None and sval_edges:
        edge = "h1->h2" if "h1->h2" in sval_edges else sval_edges[0]
    elif edge is not None and edge not in sval_edges:
        raise ConfigError(f"no run records singular values of edge {edge!r}; recorded: "
                          f"{sorted(set(sval_edges)) or 'none'}")
    fig = _figure(9.0 if edge else 5.0, 3.4)
    axes = np.atleast_1d(fig.subplots(1, 2 if edge else 1))
    many = len(data) > 8
    for k, (name, d) in enumerate(data.items()):
        theory = d.attrs.get("kind") == "theory"
        style = {"ls": "--", "color": THEORY_COLOR, "lw": 1.0} if theory else \
            {"color": SEED_COLOR if many else f"C{k % 10}", "lw": 0.9}
        label = name if d.status == "complete" else f"{name} ({d.status.split(':')[0]})"
        x = next(np.asarray(d.series[key]) for key in _X_KEYS if key in d.series)
        if "loss" in d.series:
            axes[0].plot(x, _positive(d.series["loss"]), label=None if many else label, **style)
        key = f"svals/{edge}"
        if edge and key in d.series:
            y = np.asarray(d.series[key])
            axes[1].plot(x, y.reshape(y.shape[0], -1), **style)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch" if all(("epoch" in d.series or "step" in d.series)
                                      for d in data.values()) else "t")
    axes[0].set_ylabel("loss")
    if not many and any("loss" in d.series for d in data.values()):
        axes[0].legend(fontsize=7)
    if edge:
        axes[1].set_xlabel(axes[0].get_xlabel())
        axes[1].set_title(f"singular values of {edge}", fontsize=9)
    try:
        config = json.loads(store.run_info(h5_path).get("config") or "{}")
    except ValueError:
        config = {}
    title = config.get("experiment") if isinstance(config, dict) else None
    fig.suptitle(f"{Path(os.fspath(h5_path)).name}" + (f" ({title})" if title else ""),
                 fontsize=9)
    return _save(fig, out)
