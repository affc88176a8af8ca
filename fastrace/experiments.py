"""The paper's routing experiments as recipes: ``fastrace reproduce NAME`` (MATH.md section 5).

Each recipe runs its simulations (all seeds and scales of a sweep in one batched ``simulate``
call per data set) and its theory, and returns an :class:`Outcome`: every run's recorded series,
the headline numbers (``summary``) and a function that draws the figures. :func:`reproduce`
writes them: one HDF5 file with every run, ``summary.json`` and PNG figures.

Recipes (``RECIPES``):

- ``routing``: M = 7, K = 4; random orthogonal initialisations (gain 0.2), the aligned
  initialisation (b0 = 0.08) and the reduced theory (the gradient-descent map of the reduced
  system, which equals the aligned run), 500 epochs at η = 0.02.
- ``init-scale``: σ0 ∈ {0.2, 0.66, 1.12, 1.58, 2.04, 2.5}, η = 0.006/σ0^(1/3), 700 epochs:
  error on trained and untrained pairs vs σ0, similarity grids at small and large σ0.
- ``fraction-trained``: M = 10, K = 1 … 10, η = 0.08/K: errors vs K/M.
- ``shared-vs-separate``: per-pathway loss of the M = 7, K = 4 network vs a single pathway.

``quick=True`` shrinks every recipe (fewer seeds, scales and epochs) for tests.
An epoch is one full-batch gradient-descent step; runs are saved at epochs 0, 1, ... (every
``record_every`` epochs in the sweeps) and ``t = η · epoch`` (DESIGN.md).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import analysis
from .errors import ConfigError

RECIPES = ("routing", "init-scale", "fraction-trained", "shared-vs-separate")

Weights = dict[str, np.ndarray]


# ============================================================================ results
@dataclass
class RunRecord:
    """One run as stored: time-first ``series`` (at least "t", "epoch", "loss") and ``attrs``."""

    series: dict[str, np.ndarray]
    attrs: dict[str, Any]


@dataclass
class Outcome:
    """What a recipe computed, before anything is written.

    ``runs`` {run name: RunRecord}; ``summary`` the headline numbers (JSON-ready after
    :func:`jsonable`); ``figures(out_dir)`` draws the PNGs and returns their paths;
    ``network_json`` / ``config`` go to the HDF5 root; ``data`` holds in-memory extras
    (tasks, final weights) for tests and figures.
    """

    name: str
    runs: dict[str, RunRecord]
    summary: dict[str, Any]
    figures: Callable[[Path], list[Path]]
    network_json: str
    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Reproduction:
    """Files written by :func:`reproduce` and the wall time it took (seconds)."""

    name: str
    out_dir: Path
    h5: Path
    summary_path: Path
    figures: list[Path]
    summary: dict[str, Any]
    seconds: float
    outcome: Outcome = field(repr=False)


# ============================================================================ settings
@dataclass(frozen=True)
class RoutingSettings:
    M: int = 7
    K: int = 4
    gate: str = "k_plus_minus"
    hidden: int = 64
    seeds: int = 10
    gain: float = 0.2
    b0: float = 0.08
    lr: float = 0.02
    epochs: int = 500
    seed: int = 0


@dataclass(frozen=True)
class InitScaleSettings:
    M: int = 7
    K: int = 4
    gate: str = "k_plus_minus"
    hidden: int = 64
    scales: tuple[float, ...] = (0.2, 0.66, 1.12, 1.58, 2.04, 2.5)
    seeds: int = 5
    lr_scale: float = 0.006  # η = lr_scale / σ0^(1/3)
    epochs: int = 700
    record_every: int = 10
    seed: int = 0


@dataclass(frozen=True)
class FractionSettings:
    M: int = 10
    Ks: tuple[int, ...] = tuple(range(1, 11))
    gate: str = "k_plus_minus"
    hidden: int = 64
    seeds: int = 4
    gain: float = 0.2
    lr_times_K: float = 0.08  # η = lr_times_K / K
    epochs: int = 600
    record_every: int = 10
    seed: int = 0


@dataclass(frozen=True)
class SharedSettings:
    M: int = 7
    K: int = 4
    gate: str = "k_plus_minus"
    hidden: int = 64
    seeds: int = 3
    gain: float = 0.2
    b0: float = 0.08
    lr: float = 0.02
    epochs_shared: int = 500
    epochs_single: int = 3000
    record_every_single: int = 5
    seed: int = 0


DEFAULTS = {"routing": RoutingSettings(), "init-scale": InitScaleSettings(),
            "fraction-trained": FractionSettings(), "shared-vs-separate": SharedSettings()}
QUICK = {"routing": RoutingSettings(seeds=2),
         "init-scale": InitScaleSettings(scales=(0.2, 2.5), seeds=2, record_every=50),
         "fraction-trained": FractionSettings(Ks=(1, 3, 6, 10), seeds=2, record_every=50),
         "shared-vs-separate": SharedSettings(seeds=1, epochs_single=1000,
                                              record_every_single=5)}


def settings(name: str, quick: bool = False, **overrides: Any):
    """The settings of recipe ``name`` (quick or full), with fields replaced by ``overrides``."""
    _check_name(name)
    base = (QUICK if quick else DEFAULTS)[name]
    try:
        st = replace(base, **overrides)
    except TypeError as exc:
        raise ConfigError(f"{name}: unknown setting ({exc}); settings are "
                          f"{sorted(asdict(base))}") from None
    _check_settings(name, st)
    return st


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, (float, np.floating))) and math.isfinite(x)


def _check_settings(name: str, st: Any) -> None:
    """ConfigError naming the first setting of the wrong type or out of range (the rest, such
    as K, hidden and epochs, are checked where they are used)."""
    def bad(key, what):
        raise ConfigError(f"{name}: {key} must be {what}, got {getattr(st, key)!r}")

    for f in fields(st):
        value = getattr(st, f.name)
        if isinstance(f.default, int) and not _is_int(value):
            bad(f.name, "an integer")
        if isinstance(f.default, float) and not (_is_real(value) and value > 0):
            bad(f.name, "a positive finite number")
        if isinstance(f.default, tuple) and not isinstance(value, (tuple, list)):
            bad(f.name, "a tuple")
    # the single pathway of shared-vs-separate is M = 1; the others compare input domains
    if st.M < (1 if name == "shared-vs-separate" else 2):
        bad("M", f"an integer >= {1 if name == 'shared-vs-separate' else 2}")
    if st.seeds < (0 if name == "shared-vs-separate" else 1):
        bad("seeds", "a positive integer" if name != "shared-vs-separate" else ">= 0")
    if st.seed < 0:
        bad("seed", "a non-negative integer")
    if name == "init-scale":
        if not st.scales or not all(_is_real(x) and x > 0 for x in st.scales):
            bad("scales", "a non-empty tuple of positive finite numbers")
        if len({f"{x:.2f}" for x in st.scales}) < len(st.scales):
            bad("scales", "distinct to 2 decimals (they name the runs)")
    if name == "fraction-trained":
        if not st.Ks or not all(_is_int(k) and 1 <= k <= st.M for k in st.Ks):
            bad("Ks", f"a non-empty tuple of integers in 1..M={st.M}")
        if len(set(st.Ks)) < len(st.Ks):
            bad("Ks", "distinct")


# ============================================================================ entry points
def compute(name: str, quick: bool = False, threads: int | None = None,
            progress: bool | None = None, **overrides: Any) -> Outcome:
    """Run recipe ``name`` in memory and return its :class:`Outcome` (nothing is written).

    ``threads``: numba threads for the simulations. The default is 1: the recipes record every
    epoch (or every few), so each batched engine call is about a millisecond of work, too
    short for a parallel launch to pay off (with 2 threads it is several times slower on a
    busy 2-core machine).
    """
    st = settings(name, quick, **overrides)
    threads = 1 if threads is None else threads
    recipe = {"routing": _routing, "init-scale": _init_scale,
              "fraction-trained": _fraction_trained, "shared-vs-separate": _shared_vs_separate}
    outcome = recipe[name](st, threads, progress)
    outcome.summary = {"experiment": name, "quick": bool(quick), "settings": asdict(st),
                       **outcome.summary}
    outcome.config = {"experiment": name, "quick": bool(quick), "settings": asdict(st),
                      **outcome.config}
    return outcome


def reproduce(name: str, out_dir: str | os.PathLike = ".", quick: bool = False,
              threads: int | None = None, plots: bool = True,
              progress: bool | None = None, **overrides: Any) -> Reproduction:
    """Run recipe ``name`` and write into ``out_dir`` (created if needed): ``<name>.h5`` with
    every run, ``summary.json`` with the headline numbers, and the PNG figures.

    ``plots=False`` skips the figures; so does a missing matplotlib (a note goes into the
    summary). ``overrides`` replace settings (see :func:`settings`). Returns the paths, the
    summary and the wall time.
    """
    start = time.perf_counter()
    out = Path(os.fspath(out_dir))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output directory {out}: {exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):  # before the run, which may take minutes
        raise ConfigError(f"output directory {out} is not writable")
    outcome = compute(name, quick=quick, threads=threads, progress=progress, **overrides)
    h5 = out / f"{name}.h5"
    summary_path = out / "summary.json"
    # a previous run's summary must not outlive its HDF5 file if this run stops half-way
    try:
        summary_path.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot replace {summary_path}: {exc}") from None
    write_runs(h5, outcome.runs, network_json=outcome.network_json,
               config=json.dumps(jsonable(outcome.config)),
               seed=int(outcome.config["settings"].get("seed", 0)))
    figures: list[Path] = []
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            outcome.summary["figures_note"] = ("matplotlib is not installed: no figures "
                                               "(pip install 'fastrace[plot]')")
        else:
            figures = outcome.figures(out)
    outcome.summary["files"] = {"h5": h5.name, "figures": [p.name for p in figures]}
    outcome.summary["seconds"] = round(time.perf_counter() - start, 3)
    try:
        summary_path.write_text(json.dumps(jsonable(outcome.summary), indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write {summary_path}: {exc}") from None
    return Reproduction(name, out, h5, summary_path, figures, outcome.summary,
                        time.perf_counter() - start, outcome)


def _check_name(name: str) -> None:
    if name not in RECIPES:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(RECIPES)}")


# ============================================================================ files
def write_runs(path: str | os.PathLike, runs: Mapping[str, RunRecord], network_json: str = "",
               config: str = "", seed: int | None = None) -> None:
    """Write every run into one fastrace HDF5 file (replaced if it exists), marked complete."""
    from . import store

    specs = {}
    for name, rec in runs.items():
        series = {key: (tuple(arr.shape[1:]), arr.dtype) for key, arr in rec.series.items()}
        specs[name] = store.RunSpec(series=series, attrs=_attrs(rec.attrs))
    with store.TrajectoryWriter(path, specs, network_json=network_json, config=config,
                                seed=seed, mode="w") as writer:
        for name, rec in runs.items():
            writer.append(name, **rec.series)
            writer.set_steps_done(name, int(rec.series["epoch"][-1]))


def _attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Run attributes as HDF5 can hold them (lists and dicts become JSON text)."""
    out = {}
    for key, value in attrs.items():
        if isinstance(value, (list, tuple, dict)):
            value = json.dumps(jsonable(value))
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def jsonable(value: Any) -> Any:
    """Plain JSON types: arrays -> lists, numpy scalars -> Python, NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        x = float(value)
        return x if math.isfinite(x) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _sim_record(traj, attrs: dict[str, Any], extra: Mapping[str, str] | None = None) -> RunRecord:
    """A RunRecord from a simulate Trajectory: t, epoch, loss, quantities (renamed by ``extra``
    {quantity: series name}) and the final weights (one row each)."""
    series: dict[str, np.ndarray] = {"t": traj.t, "epoch": traj.step, "loss": traj.loss}
    for q, arr in traj.quantities.items():
        series[(extra or {}).get(q, f"quantities/{q}")] = arr
    for e, w in traj.final_weights.items():
        series[f"final_weights/{e}"] = w[None]
    return RunRecord(series, {"kind": "simulation", **attrs})


def _theory_record(sol, epochs: np.ndarray, lr: float, edges: Sequence[str],
                   extra: Mapping[str, np.ndarray], attrs: dict[str, Any]) -> RunRecord:
    series = {"t": np.asarray(sol.t, np.float64), "epoch": np.asarray(epochs, np.int64),
              "loss": np.asarray(sol.loss, np.float64), "modes/b": np.asarray(sol.b)}
    series.update(extra)
    return RunRecord(series, {"kind": "theory", "method": "gd", "lr": lr,
                              "edges": list(edges), **attrs})


def _children(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(c) for c in np.random.SeedSequence(seed).spawn(n)]


def _stats(x: np.ndarray) -> dict[str, Any]:
    x = np.asarray(x, dtype=np.float64)
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "values": x}


# ============================================================================ routing
def _routing(st: RoutingSettings, threads: int | None, progress: bool | None) -> Outcome:
    from . import exact, init, tasks
    from .reduce import reduce
    from .simulate import simulate

    task = tasks.routing(st.M, st.K, st.gate, hidden=st.hidden)
    net, M, K = task.network, task.M, task.K
    _, s, _ = analysis.routing_bases(task)
    r = s.size
    red = reduce(net, task.data)
    rngs = _children(st.seed, st.seeds + 1)
    inits = [init.orthogonal(net, st.gain, seed=g) for g in rngs[:-1]]
    aligned = red.aligned_init(st.b0, seed=rngs[-1])
    names = [f"seed_{k:02d}" for k in range(st.seeds)] + ["aligned"]
    j_tr = int(np.flatnonzero(task.trained[0])[0])
    untrained_cols = np.flatnonzero(~task.trained[0])
    j_un = int(untrained_cols[0]) if untrained_cols.size else None
    pairs = {"modes_trained": (0, j_tr)}
    if j_un is not None:
        pairs["modes_untrained"] = (0, j_un)
    # recorded every epoch, in one quantity (one call per run and epoch): the top singular
    # values of the shared edge and the mode strengths of the chosen pathways
    projections = [(i, j, red.bases[f"out_{j}"][:, :r], red.bases[f"in_{i}"][:, :r])
                   for i, j in pairs.values()]

    def record(W):
        rows = [np.linalg.svd(W["h1->h2"], compute_uv=False)[:r]]
        for i, j, U, V in projections:
            rows.append(analysis.pathway_modes(task, W, i, j, U, V))
        return np.stack(rows)

    keys = ["shared_svals", *pairs]
    series = {"shared_svals": "svals/h1->h2", "modes_trained": "modes/trained_pair",
              "modes_untrained": "modes/untrained_pair"}
    clock = time.perf_counter()
    trajs = simulate(net, task.data, inits + [aligned], lr=st.lr, steps=st.epochs,
                     record_every=1, svals=False, quantities={"routing": record},
                     engine="moments", threads=threads, run_names=names, progress=progress)
    t_sim = time.perf_counter() - clock
    for tr in trajs:  # split the combined quantity into its named series
        combined = tr.quantities.pop("routing")
        tr.quantities.update({key: combined[:, k] for k, key in enumerate(keys)})
    clock = time.perf_counter()
    theory = red.integrate(st.b0, method="gd", lr=st.lr, steps=st.epochs)
    t_theory = time.perf_counter() - clock

    epochs = np.arange(st.epochs + 1)
    edges = list(net.edges)
    sh = edges.index("h1->h2")
    b = theory.b

    def th_pi(i, j):
        return b[:, :, edges.index(f"in_{i}->h1")] * b[:, :, sh] * b[:, :, edges.index(f"h2->out_{j}")]

    th_series = {"shared_svals": b[:, :, sh]}
    for key, (i, j) in pairs.items():
        th_series[key] = th_pi(i, j)
    runs = {name: _sim_record(tr, {"init": "orthogonal", "gain": st.gain, "lr": st.lr,
                                   "seed": st.seed, "child": k}, series)
            for k, (name, tr) in enumerate(zip(names[:-1], trajs[:-1]))}
    runs["aligned"] = _sim_record(trajs[-1], {"init": "aligned", "b0": st.b0, "lr": st.lr,
                                              "seed": st.seed, "child": st.seeds}, series)
    runs["theory"] = _theory_record(theory, epochs, st.lr, edges,
                                    {series[k]: v for k, v in th_series.items()},
                                    {"b0": st.b0, "reduction_residual": red.residual})

    # ---- headline numbers
    n_items, n_out = task.n_items, task.n_out
    scale = M * K / (n_items * n_out)
    plateaus, levels = analysis.routing_plateaus(s, M, K, n_items, n_out,
                                                 red.loss_constant - scale * float(np.sum(s * s)))
    losses = np.array([tr.loss for tr in trajs])  # (n_runs, n_saved)
    al = trajs[-1]
    a2_sim = al.quantities["shared_svals"]
    a2_star = np.asarray(exact.routing_fixed_point(s, M, st.b0))
    drop_flow = analysis.routing_drop_epochs(s, M, K, st.b0, st.lr, n_items, n_out,
                                             discrete=False)
    drop_pred = analysis.routing_drop_epochs(s, M, K, st.b0, st.lr, n_items, n_out)
    drop_aligned = analysis.crossing_times(a2_sim, 0.5 * a2_star)
    drop_theory = analysis.crossing_times(b[:, :, sh], 0.5 * a2_star)
    loss_drops = analysis.loss_drop_times(losses.T, levels)  # (n_levels, n_runs)
    theory_loss_drops = analysis.loss_drop_times(theory.loss, levels)
    L0 = float(theory.loss[0])
    pi_final = al.quantities["modes_trained"][-1]
    a1_final = b[-1, :, edges.index("in_0->h1")]
    c0_final = M * a1_final ** 2 - b[-1, :, sh] ** 2  # the conserved quantity at the end
    finals = [tr.final_weights for tr in trajs]
    errors = [analysis.generalisation_errors(task, w) for w in finals]
    align = [float(analysis.domain_alignment(analysis.hidden_representations(task, w)))
             for w in finals]
    align0 = [float(analysis.domain_alignment(analysis.hidden_representations(task, w)))
              for w in inits + [aligned]]
    seed_dev = loss_drops[:, :-1] - theory_loss_drops[:, None]
    with warnings.catch_warnings():  # a drop no run reached (a short run) is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        seed_dev_stats = {"mean": np.nanmean(seed_dev, axis=1),
                          "max_abs": np.nanmax(np.abs(seed_dev), axis=1)}
    summary = {
        "s": s, "modes": r,
        "loss": {"initial_theory": L0, "final": {n: float(x[-1]) for n, x in zip(names, losses)},
                 "plateaus": plateaus, "drop_levels": levels},
        "drop_epochs": {
            "per_mode_note": "epoch at which the shared edge of each mode reaches half its "
                             "fixed point",
            "integral_flow": drop_flow,
            "integral_gd": drop_pred,
            "theory_gd_map": drop_theory,
            "aligned_simulation": drop_aligned,
            "loss_note": "epoch at which the loss falls below each midpoint between plateaus",
            "loss_theory": theory_loss_drops,
            "loss_aligned": loss_drops[:, -1],
            "loss_seeds": {n: loss_drops[:, k] for k, n in enumerate(names[:-1])},
            "loss_seeds_minus_theory": seed_dev_stats,
        },
        "fixed_points": {
            "a2_star": a2_star,
            "a2_final_aligned": a2_sim[-1],
            "a2_star_from_final_c0": [float(exact.routing_fixed_point(
                sv, M, math.sqrt(c / (M - 1)))) for sv, c in zip(s, c0_final)] if M > 1 else None,
            "pi_final_aligned": pi_final,
            "a2_final_seeds_mean": np.mean([tr.quantities["shared_svals"][-1]
                                            for tr in trajs[:-1]], axis=0),
        },
        "final_singular_values": {
            run: {e: np.linalg.svd(w[e], compute_uv=False)[:r]
                  for e in ("in_0->h1", "h1->h2", f"h2->out_{j_tr}")}
            for run, w in zip(("seed_00", "aligned"), (finals[0], finals[-1]))},
        "discrepancy": {
            "loss_theory_vs_aligned": analysis.relative_discrepancy(theory.loss, al.loss,
                                                                    floor=1e-5 * L0),
            "loss_floor_note": "relative to max(|L|, 1e-5 L(0)): the loss is a constant minus "
                               "correlation terms, so its round-off is ~1e-13 L(0)",
            "a2_theory_vs_aligned": analysis.relative_discrepancy(b[:, :, sh], a2_sim),
            "pi_theory_vs_aligned": analysis.relative_discrepancy(
                th_series["modes_trained"], al.quantities["modes_trained"]),
            "drop_integral_gd_vs_aligned_epochs": float(np.max(np.abs(drop_pred - drop_aligned))),
            "drop_integral_flow_vs_aligned_epochs": float(np.max(np.abs(drop_flow - drop_aligned))),
            "fixed_point_vs_final_aligned": analysis.relative_discrepancy(a2_sim[-1], a2_star),
            "pi_final_vs_s": analysis.relative_discrepancy(pi_final, s),
        },
        "errors": {"baseline": errors[0]["baseline"],
                   "trained": {n: float(e["trained"]) for n, e in zip(names, errors)},
                   "untrained": {n: float(e["untrained"]) for n, e in zip(names, errors)}},
        "domain_alignment": {"initial": dict(zip(names, align0)), "final": dict(zip(names, align))},
        "timing_seconds": {"simulate": t_sim, "theory": t_theory},
    }
    data = {"task": task, "reduction": red, "trajectories": trajs, "theory": theory,
            "inits": inits + [aligned], "names": names, "pairs": pairs}

    def figures(out: Path) -> list[Path]:
        from . import plot

        sims = {n: trajs[k] for k, n in enumerate(names)}
        return [
            plot.routing_loss(out / "routing_loss.png", epochs, sims, theory.loss, drop_pred),
            plot.routing_modes(out / "routing_modes.png", epochs, sims, th_series, pairs),
            plot.gate_map(out / "routing_gates.png", task.trained),
            plot.similarity_grid(out / "routing_similarity.png", [
                ("seed 0, epoch 0", analysis.similarity_matrix(
                    analysis.hidden_representations(task, inits[0]))),
                (f"seed 0, epoch {st.epochs}", analysis.similarity_matrix(
                    analysis.hidden_representations(task, finals[0])))], M, n_items),
            plot.output_grid(out / "routing_outputs.png", task.pair_outputs(finals[0]),
                             task.targets, task.trained, f"seed 0, epoch {st.epochs}"),
        ]

    return Outcome("routing", runs, summary, figures, net.to_json(),
                   {"items": task.items, "targets": task.targets, "trained": task.trained},
                   data)


# ============================================================================ init-scale
def _error_quantities(task) -> dict[str, Callable[[Weights], np.ndarray]]:
    def trained(W):
        return task.trained_error(W)

    def untrained(W):
        return task.untrained_error(W) if (~task.trained).any() else np.float64(np.nan)

    return {"trained_error": trained, "untrained_error": untrained}


def _init_scale(st: InitScaleSettings, threads: int | None, progress: bool | None) -> Outcome:
    from . import init, tasks
    from .simulate import simulate

    if not st.scales or min(st.scales) <= 0:
        raise ConfigError(f"init-scale: scales must be positive, got {st.scales}")
    task = tasks.routing(st.M, st.K, st.gate, hidden=st.hidden)
    net = task.network
    children = np.random.SeedSequence(st.seed).spawn(st.seeds)
    weights, lrs, names, meta = [], [], [], []
    for sigma in st.scales:
        for k in range(st.seeds):
            # the same random directions at every scale: only the scale changes
            weights.append(init.orthogonal(net, sigma, seed=np.random.default_rng(children[k])))
            lrs.append(st.lr_scale / sigma ** (1.0 / 3.0))
            names.append(f"sigma_{sigma:.2f}_seed_{k:02d}")
            meta.append((sigma, k))
    clock = time.perf_counter()
    trajs = simulate(net, task.data, weights, lr=lrs, steps=st.epochs,
                     record_every=st.record_every, svals=False,
                     quantities=_error_quantities(task), engine="moments", threads=threads,
                     run_names=names, progress=progress)
    t_sim = time.perf_counter() - clock
    runs = {n: _sim_record(tr, {"init": "orthogonal", "gain": sig, "lr": lr, "seed": st.seed,
                                "child": k})
            for n, tr, (sig, k), lr in zip(names, trajs, meta, lrs)}
    finals = [tr.final_weights for tr in trajs]
    errs = [analysis.generalisation_errors(task, w) for w in finals]
    aligns = [float(analysis.domain_alignment(analysis.hidden_representations(task, w)))
              for w in finals]
    per_scale = {}
    n = st.seeds
    for a, sigma in enumerate(st.scales):
        sl = slice(a * n, (a + 1) * n)
        per_scale[f"{sigma:g}"] = {
            "lr": lrs[a * n],
            "trained_error": _stats([float(e["trained"]) for e in errs[sl]]),
            "untrained_error": _stats([float(e["untrained"]) for e in errs[sl]]),
            "domain_alignment": _stats(aligns[sl]),
            "final_loss": _stats([float(tr.loss[-1]) for tr in trajs[sl]]),
        }
    summary = {"baseline_error": errs[0]["baseline"], "per_scale": per_scale,
               "timing_seconds": {"simulate": t_sim}}
    data = {"task": task, "trajectories": trajs, "names": names, "meta": meta}

    def figures(out: Path) -> list[Path]:
        from . import plot

        tr_err = np.array([[per_scale[f"{x:g}"]["trained_error"]["values"]] for x in st.scales])
        un_err = np.array([[per_scale[f"{x:g}"]["untrained_error"]["values"]] for x in st.scales])
        small, large = 0, (len(st.scales) - 1) * n
        return [
            plot.errors_versus(out / "init_scale_errors.png", np.array(st.scales),
                               tr_err[:, 0], un_err[:, 0], errs[0]["baseline"],
                               "initial scale σ0", f"final errors after {st.epochs} epochs"),
            plot.similarity_grid(out / "init_scale_similarity.png", [
                (f"σ0 = {st.scales[0]:g}", analysis.similarity_matrix(
                    analysis.hidden_representations(task, finals[small]))),
                (f"σ0 = {st.scales[-1]:g}", analysis.similarity_matrix(
                    analysis.hidden_representations(task, finals[large])))],
                task.M, task.n_items),
        ]

    return Outcome("init-scale", runs, summary, figures, net.to_json(),
                   {"items": task.items, "targets": task.targets, "trained": task.trained},
                   data)


# ============================================================================ fraction trained
def _fraction_trained(st: FractionSettings, threads: int | None,
                      progress: bool | None) -> Outcome:
    from . import init, tasks
    from .simulate import simulate

    Ks = tuple(int(k) for k in st.Ks)
    if not Ks or min(Ks) < 1 or max(Ks) > st.M:
        raise ConfigError(f"fraction-trained: every K must lie in 1..M={st.M}, got {Ks}")
    runs: dict[str, RunRecord] = {}
    per_K: dict[str, Any] = {}
    t_sim = 0.0
    tasks_by_K = {}
    finals_by_K = {}
    network_json = ""
    for K in Ks:
        task = tasks.routing(st.M, K, st.gate, hidden=st.hidden)
        tasks_by_K[K] = task
        network_json = network_json or task.network.to_json()
        rngs = _children(st.seed, st.seeds)
        weights = [init.orthogonal(task.network, st.gain, seed=g) for g in rngs]
        names = [f"K_{K:02d}_seed_{k:02d}" for k in range(st.seeds)]
        lr = st.lr_times_K / K
        clock = time.perf_counter()
        trajs = simulate(task.network, task.data, weights, lr=lr, steps=st.epochs,
                         record_every=st.record_every, svals=False,
                         quantities=_error_quantities(task), engine="moments",
                         threads=threads, run_names=names, progress=progress)
        t_sim += time.perf_counter() - clock
        finals = [tr.final_weights for tr in trajs]
        finals_by_K[K] = finals
        for k, (n, tr) in enumerate(zip(names, trajs)):
            runs[n] = _sim_record(tr, {"init": "orthogonal", "gain": st.gain, "lr": lr,
                                       "K": K, "seed": st.seed, "child": k})
        errs = [analysis.generalisation_errors(task, w) for w in finals]
        per_K[str(K)] = {
            "fraction": K / st.M, "lr": lr,
            "trained_error": _stats([float(e["trained"]) for e in errs]),
            "untrained_error": _stats([float(e["untrained"]) for e in errs]),
            "domain_alignment": _stats([float(analysis.domain_alignment(
                analysis.hidden_representations(task, w))) for w in finals]),
        }
    baseline = analysis.generalisation_errors(tasks_by_K[Ks[0]],
                                              finals_by_K[Ks[0]][0])["baseline"]
    summary = {"baseline_error": baseline, "per_K": per_K, "timing_seconds": {"simulate": t_sim}}

    def figures(out: Path) -> list[Path]:
        from . import plot

        x = np.array([K / st.M for K in Ks])
        tr = np.array([per_K[str(K)]["trained_error"]["values"] for K in Ks])
        un = np.array([per_K[str(K)]["untrained_error"]["values"] for K in Ks])
        return [plot.errors_versus(out / "fraction_trained_errors.png", x, tr, un, baseline,
                                   "fraction of output domains trained, K/M",
                                   f"M = {st.M}: final errors after {st.epochs} epochs",
                                   log_x=False)]

    first = tasks_by_K[Ks[0]]
    return Outcome("fraction-trained", runs, summary, figures, network_json,
                   {"items": first.items, "targets": first.targets},
                   {"tasks": tasks_by_K, "finals": finals_by_K})


# ============================================================================ shared vs separate
def _shared_vs_separate(st: SharedSettings, threads: int | None,
                        progress: bool | None) -> Outcome:
    from . import exact, init, tasks
    from .reduce import reduce
    from .simulate import simulate

    runs: dict[str, RunRecord] = {}
    curves: dict[str, Any] = {}
    drops: dict[str, Any] = {}
    t_sim = 0.0
    network_json = ""
    s = None
    for label, M, K, steps, every in (("shared", st.M, st.K, st.epochs_shared, 1),
                                      ("single", 1, 1, st.epochs_single,
                                       st.record_every_single)):
        task = tasks.routing(M, K, st.gate, hidden=st.hidden)
        net = task.network
        network_json = network_json or net.to_json()
        _, s, _ = analysis.routing_bases(task)
        red = reduce(net, task.data)
        rngs = _children(st.seed, st.seeds + 1)
        weights = [init.orthogonal(net, st.gain, seed=g) for g in rngs[:-1]]
        weights.append(red.aligned_init(st.b0, seed=rngs[-1]))
        names = [f"{label}_seed_{k:02d}" for k in range(st.seeds)] + [f"{label}_aligned"]
        quantities = {"shared_svals": lambda W, r=s.size: np.linalg.svd(
            W["h1->h2"], compute_uv=False)[:r]}
        clock = time.perf_counter()
        trajs = simulate(net, task.data, weights, lr=st.lr, steps=steps, record_every=every,
                         svals=False, quantities=quantities, engine="moments",
                         threads=threads, run_names=names, progress=progress)
        t_sim += time.perf_counter() - clock
        saved = np.unique(np.concatenate([np.arange(0, steps + 1, every), [steps]]))
        theory = red.integrate(st.b0, method="gd", lr=st.lr, steps=steps, save_at=saved)
        pairs = int(task.trained.sum())
        attrs = {"lr": st.lr, "M": M, "K": K, "trained_pairs": pairs, "seed": st.seed,
                 "network_json": net.to_json()}
        for k, (n, tr) in enumerate(zip(names, trajs)):
            init_attrs = ({"init": "aligned", "b0": st.b0} if n.endswith("aligned")
                          else {"init": "orthogonal", "gain": st.gain})
            runs[n] = _sim_record(tr, {**attrs, **init_attrs, "child": k},
                                  {"shared_svals": "svals/h1->h2"})
        sh = list(net.edges).index("h1->h2")
        runs[f"{label}_theory"] = _theory_record(
            theory, saved, st.lr, net.edges,
            {"svals/h1->h2": theory.b[:, :, sh]},
            {**attrs, "b0": st.b0})
        a2_star = np.asarray(exact.routing_fixed_point(s, M, st.b0))
        epochs = trajs[-1].step.astype(np.float64)
        drops[label] = {
            "integral_gd": analysis.routing_drop_epochs(s, M, K, st.b0, st.lr, task.n_items,
                                                        task.n_out),
            "aligned_simulation": analysis.crossing_times(
                trajs[-1].quantities["shared_svals"], 0.5 * a2_star, t=epochs),
            "seeds": {n: analysis.crossing_times(
                tr.quantities["shared_svals"], 0.5 * tr.quantities["shared_svals"][-1],
                t=epochs) for n, tr in zip(names[:-1], trajs[:-1])},
        }
        curves[label] = {"epochs": epochs, "pairs": pairs,
                         "per_pathway": {n: tr.loss / pairs for n, tr in zip(names, trajs)},
                         "theory": np.asarray(theory.loss) / pairs}
    assert s is not None
    advantage = np.asarray(exact.routing_speed_advantage(st.M, st.K, s, st.b0))
    measured = drops["single"]["aligned_simulation"] / drops["shared"]["aligned_simulation"]
    predicted_gd = drops["single"]["integral_gd"] / drops["shared"]["integral_gd"]

    def at(label, epoch):
        """Per-pathway losses at ``epoch``, or None if it was not saved."""
        c = curves[label]
        k = int(np.searchsorted(c["epochs"], epoch))
        if k == c["epochs"].size or c["epochs"][k] != epoch:
            return None
        return {n: float(v[k]) for n, v in c["per_pathway"].items()}

    summary = {
        "s": s,
        "drop_epochs": drops,
        "speed_advantage": {"measured_aligned": measured, "predicted_gd": predicted_gd,
                            "predicted_flow": advantage,
                            "small_init_limit": exact.routing_speed_advantage_small_init(
                                st.M, st.K)},
        "per_pathway_loss_at_epoch": {str(e): {"shared": at("shared", e), "single": at("single", e)}
                                      for e in (100, 200, st.epochs_shared)},
        "timing_seconds": {"simulate": t_sim},
    }

    def figures(out: Path) -> list[Path]:
        from . import plot

        return [plot.shared_vs_separate(out / "shared_vs_separate.png", curves, st.M, st.K)]

    return Outcome("shared-vs-separate", runs, summary, figures, network_json, {},
                   {"curves": curves})
