"""The ``fastrace`` command line.

    fastrace run EXPERIMENT.toml -o OUT.h5 [--threads N] [--resume]
    fastrace sweep SWEEP.toml -o DIR [--workers N] [--scheduler tcp://HOST:PORT] [--seed N]
    fastrace reproduce NAME [-o DIR] [--quick] [--threads N] [--no-plots]
    fastrace info FILE.h5
    fastrace plot FILE.h5 -o FIG.png [--run NAME ...] [--edge EDGE]
    fastrace warmup
    fastrace demo [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    import fastrace as fr

    net = fr.Network()
    net.add_node("x", 4).add_node("h", 16).add_node("y", 3)
    net.add_edge("x", "h").add_edge("h", "y").add_edge("x", "y", name="skip")
    rng = np.random.default_rng(args.seed)
    P = 64
    gate = rng.integers(0, 2, P).astype(float)
    data = fr.Dataset({"x": rng.standard_normal((P, 4))}, {"y": rng.standard_normal((P, 3))},
                      edge_gates={"skip": gate})
    W = fr.init.orthogonal(net, gain=0.5, seed=args.seed)
    start = time.perf_counter()
    L, G = fr.loss_and_gradient(net, data, W)
    took = time.perf_counter() - start
    norm = float(np.sqrt(sum(np.sum(g * g) for g in G.values())))
    print(f"network: {net}")
    print(f"data: P={P} samples in {data.contexts(net).count} gate contexts")
    print(f"loss = {L:.6f}   |gradient| = {norm:.6f}   ({took * 1e3:.2f} ms)")
    return 0


# ----------------------------------------------------------------------------- reproduce
def _fmt(values, digits: int = 4) -> str:
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    return ", ".join(f"{v:.{digits}g}" for v in arr)


def _headline(summary: dict) -> list[str]:
    """A few lines with the numbers that matter, per experiment."""
    name = summary["experiment"]
    lines = []
    if name == "routing":
        d, disc = summary["drop_epochs"], summary["discrepancy"]
        lines += [
            f"singular values s of the data: {_fmt(summary['s'])}",
            f"drop epochs (aligned run): {_fmt(d['aligned_simulation'], 5)}; learning-time "
            f"integral: {_fmt(d['integral_gd'], 5)} (max gap "
            f"{disc['drop_integral_gd_vs_aligned_epochs']:.2f} epochs)",
            f"theory vs aligned simulation: loss {disc['loss_theory_vs_aligned']:.2e}, shared "
            f"singular values {disc['a2_theory_vs_aligned']:.2e} (relative)",
            f"fixed points a2*: {_fmt(summary['fixed_points']['a2_star'])}; final: "
            f"{_fmt(summary['fixed_points']['a2_final_aligned'])}",
            "error per pair (seed 0): trained {:.3g}, untrained {:.3g} (zero network {:.3g})".format(
                summary["errors"]["trained"].get("seed_00", float("nan")),
                summary["errors"]["untrained"].get("seed_00", float("nan")),
                summary["errors"]["baseline"]),
        ]
    elif name == "init-scale":
        lines.append("σ0      trained   untrained  alignment")
        for sigma, v in summary["per_scale"].items():
            lines.append(f"{float(sigma):<6g}  {v['trained_error']['mean']:<8.3g}  "
                         f"{v['untrained_error']['mean']:<9.3g}  "
                         f"{v['domain_alignment']['mean']:.3f}")
    elif name == "fraction-trained":
        lines.append("K/M    trained   untrained")
        for _, v in summary["per_K"].items():
            un = v["untrained_error"]["mean"]
            lines.append(f"{v['fraction']:<5.2f}  {v['trained_error']['mean']:<8.3g}  "
                         f"{'-' if un is None or un != un else f'{un:.3g}'}")
    elif name == "shared-vs-separate":
        sa = summary["speed_advantage"]
        lines += [
            f"drop epochs shared: {_fmt(summary['drop_epochs']['shared']['aligned_simulation'], 5)}",
            f"drop epochs single: {_fmt(summary['drop_epochs']['single']['aligned_simulation'], 5)}",
            f"speed advantage measured {_fmt(sa['measured_aligned'])}; predicted "
            f"{_fmt(sa['predicted_gd'])}",
        ]
    return lines


def _reproduce(args: argparse.Namespace) -> int:
    from . import experiments

    names = experiments.RECIPES if args.name == "all" else (args.name,)
    for name in names:
        out = args.output if len(names) == 1 else f"{args.output}/{name}"
        rep = experiments.reproduce(name, out, quick=args.quick, threads=args.threads,
                                    plots=not args.no_plots, progress=args.progress)
        print(f"fastrace reproduce {name}{' --quick' if args.quick else ''}: "
              f"{rep.seconds:.2f} s")
        for line in _headline(rep.summary):
            print(f"  {line}")
        print(f"  wrote {rep.h5}, {rep.summary_path}"
              + (f" and {len(rep.figures)} figures" if rep.figures else ""))
        if "figures_note" in rep.summary:
            print(f"  note: {rep.summary['figures_note']}")
    return 0


# ----------------------------------------------------------------------------- run, sweep
def _run(args: argparse.Namespace) -> int:
    from .config import load_experiment, run_experiment

    exp = load_experiment(args.experiment)
    summary = run_experiment(exp, args.output, threads=args.threads, resume=args.resume,
                             progress=args.progress)
    runs = summary["runs"]
    print(f"fastrace run {args.experiment}: {len(runs)} run{'s' * (len(runs) != 1)} of task "
          f"{summary['task']!r}{' (resumed)' if summary['resumed'] else ''}, "
          f"{summary['seconds']:.2f} s")
    rows = dict(runs)
    if summary["theory"] is not None:
        rows["theory"] = summary["theory"]
    width = max(len(n) for n in rows)
    for name, r in rows.items():
        print(f"  {name:<{width}}  {r['status']:<9}  {r['n_saved']:>6} saved  "
              f"t = 0 .. {r['t_final']:g}  loss {r['loss_initial']:.4g} -> {r['loss_final']:.4g}")
    print(f"  wrote {summary['out']}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .config import load_experiment
    from .errors import ConfigError
    from .sweep import sweep

    exp = load_experiment(args.experiment)
    if not exp.sweep:
        raise ConfigError(f"{args.experiment} has no [sweep] table of lists to sweep over")
    if args.scheduler is not None:
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError("--scheduler needs dask.distributed: pip install "
                              "'fastrace[sweep]'") from None
        try:
            client = Client(args.scheduler)
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {args.scheduler}: {exc}") \
                from None

    def report(line: str) -> None:
        """Print a point's line. When stdout is closed (`fastrace sweep ... | head`), the sweep
        goes on: stdout then goes to os.devnull."""
        try:
            print(line, flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    try:
        if args.scheduler is not None:
            with client:
                result = sweep(exp, out_dir=args.output, executor=client.get_executor(),
                               seed=args.seed, report=report)
        else:
            result = sweep(exp, out_dir=args.output, seed=args.seed, workers=args.workers,
                           report=report)
    except KeyboardInterrupt:  # the sweep stopped its workers and wrote its index
        index = os.path.join(args.output, "index.h5")
        where = f"; {index} holds the points' statuses" if os.path.isfile(index) else ""
        print(f"fastrace sweep {args.experiment}: interrupted{where}", file=sys.stderr)
        return 130
    print(f"fastrace sweep {args.experiment}: {len(result)} points, {len(result.completed)} "
          f"complete, {len(result.failed)} failed, {result.seconds:.2f} s")
    n_files = len(result.written)  # the point files this sweep wrote
    print(f"  wrote {result.index} and {n_files} point file{'s' * (n_files != 1)}")
    return 0 if not result.failed else 1


# ----------------------------------------------------------------------------- info, plot
def _info(args: argparse.Namespace) -> int:
    from . import store

    info = store.run_info(args.file)
    print(f"{info['path']}: fastrace file, format {info.get('format_version')}, created "
          f"{info.get('created', '?')} by fastrace {info.get('fastrace_version', '?')}")
    config = info.get("config") or ""
    try:
        parsed = json.loads(config) if config else {}
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "experiment" in parsed:
        settings = parsed.get("settings", {})
        shown = ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, list))
        print(f"experiment: {parsed['experiment']}{' (quick)' if parsed.get('quick') else ''}"
              + (f"; {shown}" if shown else ""))
    elif config:
        print(f"config: {len(config)} characters")
    net_json = info.get("network_json") or ""
    if net_json:
        from .network import Network

        try:
            print(f"network: {Network.from_json(net_json)}")
        except Exception:  # a damaged description should not stop `info`
            print("network: (description not readable)")
    runs = info["runs"]
    print(f"runs: {len(runs)}")
    width = max((len(n) for n in runs), default=4)
    for name, r in runs.items():
        kind = r["attrs"].get("kind", "run")
        rows = r["series"].get("loss", r["series"].get("t", {"shape": (0,)}))["shape"][0]
        # "failed: <reason>": the reason (an error message, maybe long) ends the line
        status, _, reason = r["status"].partition(": ")
        line = f"  {name:<{width}}  {kind:<10}  {status:<9}  {rows:>6} saved"
        if rows:
            with store.open_run(args.file, name) as reader:
                loss = reader["loss"] if "loss" in reader.series_names else None
                t = reader["t"] if "t" in reader.series_names else None
            # first and last values of series with one number a row (a file written with
            # fastrace.store may hold, say, a loss per pathway: its shape is listed with -v)
            if t is not None and t.ndim == 1 and t.size:
                line += f"  t = {t[0]:g} .. {t[-1]:g}"
            if loss is not None and loss.ndim == 1 and loss.size:
                line += f"  loss {loss[0]:.4g} -> {loss[-1]:.4g}"
        if reason:
            line += f"  ({reason})"
        print(line)
        if args.verbose:
            for series, spec in r["series"].items():
                print(f"      {series}: {tuple(spec['shape'])} {spec['dtype']}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from . import plot

    notes: list[str] = []
    path = plot.file_figure(args.file, args.output, runs=args.run, edge=args.edge,
                            report=notes.append)
    print(f"wrote {path}")
    for note in notes:
        print(f"  note: {note}")
    return 0


# ----------------------------------------------------------------------------- warmup
def warmup(report: Callable[[str], None] | None = None) -> dict[str, float]:
    """Compile every numba kernel now (they are cached on disk) by calling each compute entry
    point on a tiny problem. Returns {step: seconds}; ``report`` receives a line per step."""
    # explicit imports: once a submodule is imported, ``fastrace.simulate`` (the attribute)
    # may be the module rather than the function
    from . import init, tasks
    from .data import Dataset
    from .integrate import integrate_system
    from .network import Network
    from .reduce import reduce
    from .simulate import simulate

    times: dict[str, float] = {}

    def step(label: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        times[label] = time.perf_counter() - start
        if report is not None:
            report(f"{label:<42s} {times[label]:6.2f} s")

    task = tasks.routing(M=2, K=1, hidden=4)
    net, data = task.network, task.data
    one = init.orthogonal(net, 0.5, seed=0)
    two = [one, init.orthogonal(net, 0.5, seed=1)]
    step("simulate, gradient descent (1 run)",
         lambda: simulate(net, data, one, lr=0.01, steps=2, engine="moments", threads=1))
    # one thread: the point is compiling, and tiny parallel calls only pay launch overhead
    step("simulate, gradient descent (batch)",
         lambda: simulate(net, data, two, lr=0.01, steps=2, engine="moments", threads=1))
    def parallel_descent():
        from .engine import GradientEngine

        engine = GradientEngine(net, data, "moments")
        w = engine.pack_many(two)
        engine.descend(w, np.zeros_like(w), np.full(2, 0.01), 2, parallel=True)

    step("gradient descent, runs in parallel", parallel_descent)
    def samples_engine() -> None:
        # its kernels that gather and add rows by index: on gated inputs (writable arrays),
        # then on an ungated input whose target is gated (the data's read-only array)
        simulate(net, data, one, lr=0.01, steps=2, engine="samples", threads=1)
        chain = Network.chain([2, 2, 1], ["x", "h", "y"])
        gated = Dataset({"x": np.eye(2)}, {"y": np.ones((2, 1))}, node_gates={"h": [1.0, 0.0]})
        simulate(chain, gated, init.orthogonal(chain, 0.5, seed=0), lr=0.01, steps=2,
                 engine="samples", threads=1)

    step("simulate, samples engine", samples_engine)
    step("simulate, gradient flow",
         lambda: simulate(net, data, two, method="flow", t_end=0.01, n_records=2,
                             engine="moments", threads=1))
    red = reduce(net, data)
    system = red.system
    b0 = red.expand_b(0.1)
    for method in ("dopri5", "rosenbrock", "auto"):
        step(f"integrate {method} (numba)",
             lambda m=method: integrate_system(system, b0, method=m, t_end=0.1, backend="numba",
                                               events=0.01, threads=1))
    step("integrate gd map (numba)",
         lambda: integrate_system(system, b0, method="gd", lr=0.01, steps=2, backend="numba",
                                  threads=1))
    # the system's own evaluations run on the C core when it is built, else on numba kernels
    step("reduced system: rhs, jacobian, loss, pi",
         lambda: (system.rhs(b0), system.jacobian(b0), system.loss(b0),
                  system.path_strengths(b0)))
    return times


def _warmup(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    warmup(report=print)
    print(f"numba kernels compiled and cached in {time.perf_counter() - start:.1f} s")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .experiments import RECIPES

    parser = argparse.ArgumentParser(
        prog="fastrace", description="Learning dynamics of gated deep linear networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment file",
                         description="Run the experiment of a TOML file (task, init, train, "
                         "optional theory) into one HDF5 file.")
    run.add_argument("experiment", metavar="EXPERIMENT.toml")
    run.add_argument("-o", "--output", required=True, metavar="OUT.h5")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="numba threads (default: all cores)")
    run.add_argument("--resume", action="store_true",
                     help="continue OUT.h5 from its last checkpoint (a killed run)")
    run.add_argument("--progress", action="store_true", default=None,
                     help="show a progress bar (default: only on a terminal)")
    run.set_defaults(func=_run)

    swp = sub.add_parser("sweep", help="run an experiment over a grid of settings",
                         description="Run the experiment of SWEEP.toml at every point of its "
                         "[sweep] grid, one file per point in DIR, linked by DIR/index.h5. "
                         "Exits with 1 when a point failed.")
    swp.add_argument("experiment", metavar="SWEEP.toml")
    swp.add_argument("-o", "--output", required=True, metavar="DIR")
    swp.add_argument("--workers", type=int, default=None, metavar="N",
                     help="local worker processes (default: one per core)")
    swp.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                     help="run on this Dask scheduler instead of local processes")
    swp.add_argument("--seed", type=int, default=None, metavar="N",
                     help="root of the points' child seeds (default: sweep.seed, else 0)")
    swp.set_defaults(func=_sweep)

    rep = sub.add_parser("reproduce", help="reproduce one of the paper's experiments",
                         description="Run an experiment of the paper; write NAME.h5 (every "
                         "run), summary.json (headline numbers) and PNG figures into DIR.")
    rep.add_argument("name", choices=[*RECIPES, "all"], metavar="NAME",
                     help=f"one of: {', '.join(RECIPES)}, all")
    rep.add_argument("-o", "--output", default=".", metavar="DIR",
                     help="output directory (default: the current directory; with 'all', one "
                     "subdirectory per experiment)")
    rep.add_argument("--quick", action="store_true", help="a shortened version (for tests)")
    rep.add_argument("--threads", type=int, default=None, metavar="N",
                     help="numba threads for the simulations (default 1)")
    rep.add_argument("--no-plots", action="store_true", help="skip the figures")
    rep.add_argument("--progress", action="store_true", default=None,
                     help="show a progress bar (default: only on a terminal)")
    rep.set_defaults(func=_reproduce)

    info = sub.add_parser("info", help="what a fastrace HDF5 file holds")
    info.add_argument("file", metavar="FILE.h5")
    info.add_argument("-v", "--verbose", action="store_true", help="list every series")
    info.set_defaults(func=_info)

    plot = sub.add_parser("plot", help="the standard figure of a run file")
    plot.add_argument("file", metavar="FILE.h5")
    plot.add_argument("-o", "--output", required=True, metavar="FIG.png")
    plot.add_argument("--run", action="append", default=None, metavar="NAME",
                      help="plot only this run (repeatable)")
    plot.add_argument("--edge", default=None, help="edge whose singular values to plot")
    plot.set_defaults(func=_plot)

    warm = sub.add_parser("warmup", help="compile every numba kernel ahead of time")
    warm.set_defaults(func=_warmup)

    demo = sub.add_parser("demo", help="build a small gated network, print its loss and gradient")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import FastraceError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FastraceError as exc:
        print(f"fastrace: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the output went into a program that stopped reading (`fastrace info f.h5 | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (a run's file can resume)
        print("fastrace: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
