"""Parameter sweeps over any ``concurrent.futures.Executor``: ``fastrace sweep SWEEP.toml -o DIR``.

A sweep is the cartesian grid of an experiment (``fastrace.config``) over dotted keys, e.g.
``{"init.gain": [0.2, 1.0], "train.lr": [0.01, 0.02]}``: one task per grid point, each writing
its own file ``DIR/pNNN.h5`` in the worker (h5py objects never cross processes), with numba and
BLAS single-threaded there (the workers are the parallelism). Point k draws its initial weights
from the k-th child of ``numpy.random.SeedSequence(seed).spawn(n_points)``, written into the
point's experiment as ``init.seed_sequence``, so every point file holds the TOML that reruns it
with ``fastrace run``.

The client warms the numba cache with a tiny run of the first point before fan-out, then writes
``DIR/index.h5``: external links ``/points/pNNN`` to each point file's root and a table
(``/table/name``, ``file``, ``status``, ``seconds``, ``values/<dotted key>``) of the grid values
and each point's status ("complete" or "failed: <reason>"). A failing point is recorded and the
others still run. The index is written once before the fan-out (every status "pending") and
again at the end.

Executors: the default is a local ``ProcessPoolExecutor`` (spawn context); a Dask cluster plugs
in with ``distributed.Client(address).get_executor()``. The workers must see ``DIR`` (a shared
file system on a cluster).
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import Experiment, load_experiment, run_experiment
from .errors import ConfigError, StoreError

INDEX_FORMAT = "fastrace-sweep"
INDEX_VERSION = 1
_THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                     "MKL_NUM_THREADS")


@dataclass
class SweepPoint:
    """One grid point: its ``name`` (``pNNN``), grid ``values``, output ``path``, ``status``
    ("pending", "complete" or "failed: <reason>"), wall ``seconds`` in the worker and the
    ``summary`` of ``run_experiment`` (None when it failed)."""

    name: str
    values: dict[str, Any]
    path: Path
    status: str = "pending"
    seconds: float = float("nan")
    summary: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "complete"


@dataclass
class SweepResult:
    """All points of a sweep and the index file linking them."""

    out_dir: Path
    index: Path
    grid: dict[str, list]
    seed: int
    points: list[SweepPoint] = field(default_factory=list)
    seconds: float = float("nan")

    @property
    def completed(self) -> list[SweepPoint]:
        return [p for p in self.points if p.ok]

    @property
    def failed(self) -> list[SweepPoint]:
        return [p for p in self.points if not p.ok]

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self):
        return iter(self.points)


# ============================================================================ the grid
def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of ``grid`` ({dotted key: values}), last key varying fastest."""
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("grid must be a non-empty {dotted key: list of values} mapping")
    keys = list(grid)
    lists = []
    for key in keys:
        values = grid[key]
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"grid[{key!r}] must be a non-empty list of values")
        lists.append(list(values))
    return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]


def point_experiments(experiment: Experiment, grid: Mapping[str, Sequence[Any]], seed: int
                      ) -> list[Experiment]:
    """The experiment of every grid point, with the point's child seed sequence set."""
    points = grid_points(grid)
    children = np.random.SeedSequence(seed).spawn(len(points))
    out = []
    for values, child in zip(points, children):
        seq = {"entropy": int(child.entropy), "spawn_key": [int(k) for k in child.spawn_key]}
        out.append(experiment.with_values({**values, "init.seed_sequence": seq}))
    return out


# ============================================================================ workers
def limit_threads() -> None:
    """Make this process single-threaded for numba and BLAS (a sweep worker)."""
    if "numba" not in sys.modules:  # NUMBA_NUM_THREADS is read when numba is imported
        for var in _THREAD_VARIABLES:
            os.environ[var] = "1"
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(1)
    threadpool_limits(limits=1)


def run_point(text: str, path: str) -> dict[str, Any]:
    """Run one point's experiment (TOML ``text``) into ``path``, single-threaded. Never raises:
    returns {"status", "seconds", "summary"} with status "failed: <reason>" on any error."""
    start = time.perf_counter()
    try:
        limit_threads()
        summary = run_experiment(load_experiment(text), path, threads=1, progress=False)
        status = "complete"
        failed = [f"{name}: {r['status']}" for name, r in summary["runs"].items()
                  if r["status"] != "complete"]
        if failed:
            status = "failed: " + "; ".join(failed)
    except Exception as exc:  # a failing point is recorded, never lost
        summary, status = None, _failure(exc)
    return {"status": status, "seconds": time.perf_counter() - start, "summary": summary}


def _failure(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"failed: {type(exc).__name__}: {text}" if text else f"failed: {type(exc).__name__}"


def _warm(experiment: Experiment) -> None:
    """Compile (or load from the cache) the kernels a point needs, by a tiny run of it."""
    train = experiment.table["train"]
    tiny: dict[str, Any] = {"train.checkpoint_every": None}
    if "steps" in train:
        tiny.update({"train.steps": 2, "train.record_every": 1})
    else:
        tiny.update({"train.t_end": 1e-3, "train.n_records": 2})
    try:
        small = experiment.with_values(tiny)
        with tempfile.TemporaryDirectory(prefix="fastrace-warm-") as tmp:
            run_experiment(small, Path(tmp) / "warm.h5", threads=1, progress=False)
    except Exception:  # noqa: BLE001 - a point that fails will fail in its worker, and be recorded
        pass


# ============================================================================ the sweep
def sweep(experiment: Experiment | str | os.PathLike, grid: Mapping[str, Sequence[Any]] | None = None,
          out_dir: str | os.PathLike = ".", executor: cf.Executor | None = None,
          seed: int | None = None, *, workers: int | None = None, warm: bool = True,
          report: Any = None) -> SweepResult:
    """Run ``experiment`` at every point of ``grid`` and write ``out_dir/index.h5``.

    experiment : an Experiment, or a TOML path/text (a sweep file: its ``[sweep]`` table is the
        default grid and its ``sweep.seed`` the default seed).
    grid : {dotted key: list of values}; one task per point of the cartesian product.
    executor : any ``concurrent.futures.Executor`` (e.g. ``distributed.Client(addr)
        .get_executor()``); default a local spawn-context process pool of ``workers`` processes
        (default: one per core, at most one per point), shut down at the end. A given executor
        is left running.
    seed : root of the points' child seeds (``SeedSequence(seed).spawn``); default the sweep
        file's ``sweep.seed`` or 0.
    report : optional callable receiving a line per finished point.
    """
    start = time.perf_counter()
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    grid = dict(exp.sweep if grid is None else grid)
    if not grid:
        raise ConfigError("no grid: pass grid= or give the experiment a [sweep] table")
    seed = exp.sweep_seed if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if executor is not None and not isinstance(executor, cf.Executor):
        raise ConfigError(f"executor must be a concurrent.futures.Executor, got "
                          f"{type(executor).__name__}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")
    # every point is validated here: a grid value the schema refuses stops the sweep before it
    # starts, while a point that fails when it runs is recorded and the others go on
    experiments = point_experiments(exp, grid, int(seed))
    out = Path(os.fspath(out_dir)).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output directory {out}: {exc}") from None

    width = max(3, len(str(len(experiments) - 1)))
    points = [SweepPoint(f"p{k:0{width}d}", values, out / f"p{k:0{width}d}.h5")
              for k, values in enumerate(grid_points(grid))]
    result = SweepResult(out, out / "index.h5", grid, int(seed), points)
    base_text = exp.text
    write_index(result, base_text)
    if warm:
        _warm(experiments[0])

    own = executor is None
    if own:
        n = min(workers or os.cpu_count() or 1, len(points))
        executor = cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context(
            "spawn"), initializer=limit_threads)
    try:
        futures = {}
        for point, point_exp in zip(points, experiments):
            try:
                futures[executor.submit(run_point, point_exp.text, str(point.path))] = point
            except Exception as exc:  # noqa: BLE001 - e.g. a broken pool: record, go on
                point.status = _failure(exc)
        for future in cf.as_completed(futures):
            point = futures[future]
            try:
                outcome = future.result()
                point.status = outcome["status"]
                point.seconds = float(outcome["seconds"])
                point.summary = outcome["summary"]
            except Exception as exc:  # noqa: BLE001 - a crashed worker fails only its point
                point.status = _failure(exc)
            if report is not None:
                report(f"{point.name}  {_values_text(point.values)}  {point.status}")
    finally:
        if own:
            executor.shutdown(wait=True, cancel_futures=True)
        result.seconds = time.perf_counter() - start
        write_index(result, base_text)
    return result


def _values_text(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


# ============================================================================ the index
def _column(values: list[Any]) -> np.ndarray:
    """A typed array for one grid key's values (JSON text when they are not all one kind)."""
    import h5py

    if all(isinstance(v, bool) for v in values):
        return np.array(values, dtype=bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.float64)
    texts = [v if isinstance(v, str) else json.dumps(v) for v in values]
    return np.array(texts, dtype=h5py.string_dtype())


def write_index(result: SweepResult, experiment_text: str = "") -> Path:
    """Write ``result.index`` (replacing it): links to every point file and the table."""
    import h5py

    strings = h5py.string_dtype()
    tmp = Path(f"{result.index}.partial")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = INDEX_FORMAT
            f.attrs["format_version"] = INDEX_VERSION
            f.attrs["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            f.attrs["experiment"] = experiment_text
            f.attrs["grid"] = json.dumps(result.grid)
            f.attrs["seed"] = result.seed
            f.attrs["seconds"] = result.seconds
            links = f.create_group("points", track_order=True)
            for p in result.points:
                if p.path.exists():  # relative: the index and its points move together
                    links[p.name] = h5py.ExternalLink(p.path.name, "/")
            table = f.create_group("table")
            table["name"] = np.array([p.name for p in result.points], dtype=strings)
            table["file"] = np.array([p.path.name for p in result.points], dtype=strings)
            table["status"] = np.array([p.status for p in result.points], dtype=strings)
            table["seconds"] = np.array([p.seconds for p in result.points], dtype=np.float64)
            values = table.create_group("values", track_order=True)
            for key in result.grid:
                values[key] = _column([p.values[key] for p in result.points])
        os.replace(tmp, result.index)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write the sweep index {result.index}: {exc}") from None
    return result.index


def read_index(path: str | os.PathLike) -> SweepResult:
    """A sweep's points and statuses from its ``index.h5`` (or the directory holding it)."""
    import h5py

    path = Path(os.fspath(path))
    if path.is_dir():
        path = path / "index.h5"
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != INDEX_FORMAT:
                raise StoreError(f"{path} is not a fastrace sweep index")
            grid = json.loads(f.attrs["grid"])
            table = f["table"]
            names = [s.decode() if isinstance(s, bytes) else s for s in table["name"][()]]
            files = [s.decode() if isinstance(s, bytes) else s for s in table["file"][()]]
            status = [s.decode() if isinstance(s, bytes) else s for s in table["status"][()]]
            seconds = table["seconds"][()]
            result = SweepResult(path.parent, path, grid, int(f.attrs["seed"]),
                                 seconds=float(f.attrs.get("seconds", np.nan)))
            for k, name in enumerate(names):
                values = {key: grid[key][_position(grid, k, key)] for key in grid}
                result.points.append(SweepPoint(name, values, path.parent / files[k], status[k],
                                                float(seconds[k])))
    except OSError as exc:
        raise StoreError(f"cannot read the sweep index {path}: {exc}") from None
    return result


def _position(grid: Mapping[str, list], k: int, key: str) -> int:
    """Index into ``grid[key]`` of point ``k`` of the cartesian product (last key fastest)."""
    keys = list(grid)
    stride = 1
    for later in keys[keys.index(key) + 1:]:
        stride *= len(grid[later])
    return (k // stride) % len(grid[key])
