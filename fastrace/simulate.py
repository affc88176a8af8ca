"""Full-network learning: gradient descent and gradient flow of a gated deep linear network.

``simulate`` runs one or many independent runs of the same network and data, records them at
chosen save points (time, loss, singular values of every weight, optional weight snapshots and
user quantities) in memory and, with ``out=``, streams them into an HDF5 file (``fastrace.store``)
with checkpoints that ``resume`` continues bit-for-bit after a crash.

Time axis (DESIGN.md): τ = 1, and gradient descent with learning rate η advances ``t`` by η per
step, so a discrete run and a gradient-flow run of the same system share one time axis.

Learning rules
--------------
- ``"gd"``: full-batch gradient descent, ``v ← μ v + ∇L + λ W``, ``W ← W − η v`` (``μ`` momentum,
  ``λ`` weight decay, both 0 by default: then ``W ← W − η ∇L``). All runs of a batch advance
  together, one call to ``GradientEngine.descend`` per chunk of steps between save points.
- ``"flow"``: gradient flow ``dW/dt = −∇L − λ W``, integrated by the Dormand–Prince 5(4) method
  written below, with its 4th-order dense output at the save times. It is written here rather
  than taken from scipy for two reasons: every run keeps its own adaptive step size while the
  stages of all runs are evaluated in one batched engine call, and the integrator state (weights,
  time, next step size, controller memory) is small and explicit, so a run resumed from a
  checkpoint continues exactly as the uninterrupted run would. The step-size controller and
  dense output follow Hairer, Nørsett & Wanner, *Solving ODEs I*, section II.5 (DOPRI5).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._memory import refuse_if_no_room as _refuse_if_no_room
from .data import Dataset
from .engine import GradientEngine, one_blas_thread
from .errors import (
    ConfigError,
    DataError,
    DivergenceError,
    FastraceError,
    IntegrationError,
    NetworkError,
    StoreError,
    WeightsError,
)
from .gradient import ENGINES
from .network import Network

METHODS = ("gd", "flow")
WEIGHT_DTYPES = ("float64", "float32")
SCHEMA = 1  # version of the run attributes written by simulate (read back by resume)
MAX_CHUNK = 512  # most gradient-descent steps per engine call between divergence checks
SNAPSHOT_BYTES = 64 * 2**20  # most memory for weight snapshots taken within one engine call
BATCH_ROWS = 64  # save-point rows computed together (singular values in one batched call)
# A run's rows go to the writer once SEND_BYTES of them wait (SEND_BYTES // 8 in the last,
# shrinking batches of a run), or SEND_SECONDS after the last hand-over: few large blocks, as
# each block costs the writer a call per series.
SEND_BYTES, SEND_SECONDS = 4 << 20, 1.0
_MIN_RTOL = 100 * np.finfo(float).eps  # (scipy's solve_ivp raises smaller ones to it)
_EPS = float(np.finfo(float).eps)
_MAX_STEPS = 2**53  # steps and times are exact float64 integers (t = lr * step) below it
_MAX_SAVE_POINTS = 10**9  # more would not fit in memory as a schedule (8 GB), let alone rows
DIVERGED = "failed: diverged"  # status prefix of a diverged run (resume refuses it)

Weights = dict[str, np.ndarray]
Quantity = Callable[[Weights], Any]


# ====================================================================== Trajectory
class Trajectory:
    """One run's recorded trajectory.

    Attributes
    ----------
    run : str
        Run name (the HDF5 group).
    t : (n_saved,) float64
        Time of each save point (``η · step`` for gradient descent).
    step : (n_saved,) int64
        Gradient-descent step, or for flow the number of accepted integrator steps taken.
    loss : (n_saved,) float64
    svals : {edge: (n_saved, min(out, in))}
        Singular values of each weight, largest first.
    quantities : {name: (n_saved, ...)}
        User quantities evaluated at each save point.
    final_weights : {edge: (out, in)}
        Weights at the end of the run (at the latest checkpoint for a run read from a file that
        did not complete).
    status : str
        "complete", "running" or "failed: <reason>".
    attrs : dict
        Settings of the run (method, lr, steps, t_end, momentum, weight_decay, ...).
    snapshots : {edge: (n_saved, out, in)} or None
        Weight snapshots (``save_weights=True``): arrays, or for a run kept in its file only
        (``in_memory=False``) ``fastrace.store.StoredSeries`` read when indexed.
    """

    def __init__(self, run: str, t: np.ndarray, step: np.ndarray, loss: np.ndarray,
                 svals: dict[str, np.ndarray], quantities: dict[str, np.ndarray],
                 final_weights: Weights, status: str, attrs: dict,
                 snapshots: dict[str, np.ndarray] | None = None) -> None:
        self.run = run
        self.t = t
        self.step = step
        self.loss = loss
        self.svals = svals
        self.quantities = quantities
        self.final_weights = final_weights
        self.status = status
        self.attrs = attrs
        self.snapshots = snapshots  # {edge: (n_saved, out, in)} when weights were saved

    @property
    def n_saved(self) -> int:
        return int(self.t.shape[0])

    def __len__(self) -> int:
        return self.n_saved

    def weights(self, i: int) -> Weights:
        """{edge: (out, in) array} at saved index ``i`` (negative indices count from the end).

        Needs ``save_weights=True``, except for the last index of a complete run, which is the
        final state.
        """
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ConfigError(f"saved index must be an integer, got {i!r}")
        i, n = int(i), self.n_saved
        if not -n <= i < n:
            raise IndexError(f"saved index {i} out of range for {n} save points")
        if self.snapshots is not None:
            arrays = list(self.snapshots.values())
            if all(isinstance(a, np.ndarray) for a in arrays):
                rows = [a[i] for a in arrays]
            else:  # kept in the file (store.StoredSeries): every edge read in one opening
                from .store import read_stored_rows

                rows = read_stored_rows(arrays, i)
            return {e: np.array(r, dtype=np.float64) for e, r in zip(self.snapshots, rows)}
        if i % n == n - 1 and self.status == "complete":
            return {e: a.copy() for e, a in self.final_weights.items()}
        raise ConfigError("weight snapshots were not kept for this run; run simulate with "
                          "save_weights=True (only the final weights are always available)")

    def __repr__(self) -> str:
        span = f"t = {self.t[0]:g} .. {self.t[-1]:g}" if self.n_saved else "empty"
        return (f"Trajectory(run={self.run!r}, method={self.attrs.get('method')!r}, "
                f"{self.n_saved} save points, {span}, status={self.status!r})")

    @classmethod
    def from_hdf5(cls, path: str | os.PathLike, run: str = "simulation") -> Trajectory:
        """Load run ``run`` written by ``simulate(..., out=path)``."""
        return _load_trajectory(path, run)


# ====================================================================== settings
class _Plan:
    """Everything that defines a batch of runs, validated, with its save schedule resolved.

    ``lr`` is (n_runs,) (nan for a flow run given by ``t_end``), ``steps`` the number of
    gradient-descent steps (0 for a flow run given by ``t_end``), ``t_end`` (n_runs,).
    ``record`` is None, "log" or the explicit save points as given.
    """

    def __init__(self, *, method: str, names: list[str], lr: np.ndarray, steps: int,
                 t_end: np.ndarray, record: None | str | np.ndarray, record_every: int,
                 n_records: int, momentum: float, weight_decay: float, engine: str, svals: bool,
                 save_weights: bool, weights_dtype: str, quantity_shapes: dict[str, tuple],
                 checkpoint_every: int, rtol: float, atol: float,
                 divergence_threshold: float, max_steps: int = 100_000) -> None:
        self.method = method
        self.names = names
        self.lr = lr
        self.steps = steps
        self.t_end = t_end
        self.record = record
        self.record_every = record_every
        self.n_records = n_records
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.engine = engine
        self.svals = svals
        self.save_weights = save_weights
        self.weights_dtype = weights_dtype
        self.quantity_shapes = quantity_shapes
        self.checkpoint_every = checkpoint_every  # 0: only at the start and the end
        self.rtol = rtol
        self.atol = atol
        self.divergence_threshold = divergence_threshold
        self.max_steps = max_steps  # gradient flow: attempted steps per run before giving up
        # save points: gd step indices (shared by all runs) and, per run, their times
        self.save_steps: np.ndarray | None = None
        if steps and not (method == "flow" and _explicit(record)):
            grid = _step_schedule(record, record_every, n_records, steps)
            self.save_times = [lr[i] * grid for i in range(len(names))]
            if method == "gd":
                self.save_steps = grid
        else:
            self.save_times = [_time_schedule(record, n_records, float(t_end[i]))
                               for i in range(len(names))]

    @property
    def n_runs(self) -> int:
        return len(self.names)

    def run_attrs(self, i: int) -> dict[str, Any]:
        """Attributes of run ``i`` in the HDF5 file: all ``resume`` needs to continue it."""
        attrs: dict[str, Any] = {
            "kind": "simulation", "simulate_schema": SCHEMA, "method": self.method,
            "lr": float(self.lr[i]) if math.isfinite(self.lr[i]) else None,
            "steps": self.steps, "t_end": float(self.t_end[i]),
            "momentum": self.momentum, "weight_decay": self.weight_decay,
            "engine": self.engine, "svals": self.svals, "save_weights": self.save_weights,
            "weights_dtype": self.weights_dtype,
            "quantities": json.dumps({k: list(v) for k, v in self.quantity_shapes.items()}),
            "checkpoint_every": self.checkpoint_every, "rtol": self.rtol, "atol": self.atol,
            "divergence_threshold": self.divergence_threshold, "max_steps": self.max_steps,
            "record": "explicit" if _explicit(self.record) else str(self.record or "default"),
            "record_every": self.record_every, "n_records": self.n_records,
        }
        if _explicit(self.record):
            attrs["record_points"] = np.asarray(self.record, dtype=np.float64)
        return attrs

    def trajectory_attrs(self, i: int) -> dict[str, Any]:
        """The settings of run ``i`` as a plain dict (Trajectory.attrs)."""
        attrs = self.run_attrs(i)
        attrs["quantities"] = list(self.quantity_shapes)
        attrs.pop("record_points", None)
        return attrs

    @classmethod
    def from_attrs(cls, names: list[str], attrs: list[Mapping[str, Any]]) -> _Plan:
        """The plan of runs ``names`` from their HDF5 attributes (one simulate call's runs)."""
        try:
            first = attrs[0]
            if int(first["simulate_schema"]) != SCHEMA:
                raise StoreError(f"run {names[0]!r} was written by an incompatible fastrace "
                                 f"(simulate schema {first['simulate_schema']}, expected {SCHEMA})")
            shared = ("method", "steps", "momentum", "weight_decay", "engine", "svals",
                      "save_weights", "weights_dtype", "quantities", "checkpoint_every", "rtol",
                      "atol", "divergence_threshold", "record", "record_every", "n_records")
            for name, a in zip(names[1:], attrs[1:]):
                for key in shared:
                    if a[key] != first[key]:
                        raise StoreError(f"runs {names[0]!r} and {name!r} differ in {key}; "
                                         "resume them one at a time (run=...)")
            mode = str(first["record"])
            record: None | str | np.ndarray = (
                None if mode == "default" else
                np.asarray(first["record_points"], dtype=np.float64) if mode == "explicit"
                else mode)
            shapes = {k: tuple(v) for k, v in json.loads(str(first["quantities"])).items()}
            return cls(method=str(first["method"]), names=list(names),
                       lr=np.array([math.nan if a.get("lr") is None else float(a["lr"])
                                    for a in attrs]), steps=int(first["steps"]),
                       t_end=np.array([float(a["t_end"]) for a in attrs]), record=record,
                       record_every=int(first["record_every"]),
                       n_records=int(first["n_records"]), momentum=float(first["momentum"]),
                       weight_decay=float(first["weight_decay"]), engine=str(first["engine"]),
                       svals=bool(first["svals"]), save_weights=bool(first["save_weights"]),
                       weights_dtype=str(first["weights_dtype"]), quantity_shapes=shapes,
                       checkpoint_every=int(first["checkpoint_every"]),
                       rtol=float(first["rtol"]), atol=float(first["atol"]),
                       divergence_threshold=float(first["divergence_threshold"]),
                       max_steps=int(first.get("max_steps", 100_000)))
        except KeyError as exc:
            raise StoreError(f"run {names[0]!r} is not a simulation run that can be resumed "
                             f"(missing attribute {exc})") from None


def _explicit(record: Any) -> bool:
    return record is not None and not isinstance(record, str)


def _positive(name: str, value: Any, integer: bool = False) -> Any:
    try:
        if isinstance(value, bool):
            raise TypeError
        x = int(value) if integer else float(value)
        if integer and x != value:
            raise TypeError
    except (TypeError, ValueError, OverflowError):  # (int(inf) overflows)
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}") from None
    if not (math.isfinite(x) and x > 0):
        kind = "a positive integer" if integer else "a positive finite number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    return x


def _number(name: str, value: Any) -> float:
    """``value`` as a float (bool refused), or ConfigError naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _save_points(record: Any) -> np.ndarray:
    """Explicit save points (steps or times) as a flat float array, or ConfigError."""
    if isinstance(record, (set, frozenset, dict)):
        raise ConfigError(f"record: save points must be an ordered sequence or array, "
                          f"got a {type(record).__name__}")
    try:
        given = np.asarray(record)
        if given.dtype.kind not in "iuf":  # a boolean mask, strings, complex, mixed objects
            raise TypeError(f"dtype {given.dtype}")
        points = given.astype(np.float64).ravel()
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"record: save points must be integer steps or real times, got "
                          f"{record!r:.80} ({exc})") from None
    if points.size > _MAX_SAVE_POINTS:
        raise ConfigError(f"record: more than {_MAX_SAVE_POINTS} save points")
    return points


def _resolve_lr(lr: Any, n_runs: int) -> np.ndarray:
    if np.ndim(lr) == 0:
        return np.full(n_runs, _positive("lr", lr))
    values = [_positive(f"lr[{i}]", v) for i, v in enumerate(lr)]
    if len(values) != n_runs:
        raise ConfigError(f"lr has {len(values)} values but there are {n_runs} runs "
                          "(give one learning rate, or one per run)")
    return np.array(values, dtype=np.float64)


def _step_schedule(record: Any, record_every: int, n_records: int, steps: int) -> np.ndarray:
    """Save-point step indices in [0, steps], always with 0 and ``steps``."""
    if record is None:
        points = np.arange(0, steps + 1, record_every, dtype=np.int64)
    elif isinstance(record, str):
        if record != "log":
            raise ConfigError(f"record must be None, 'log' or an array of save points, "
                              f"got {record!r}")
        points = _log_steps(steps, min(n_records, steps + 1))
    else:
        raw = np.asarray(record, dtype=np.float64).ravel()
        if not np.all(np.isfinite(raw)) or np.any(raw != np.rint(raw)):
            raise ConfigError("record: gradient-descent save points must be integer step indices")
        if raw.size and (raw.min() < 0 or raw.max() > steps):
            raise ConfigError(f"record: step indices must lie in [0, steps={steps}], "
                              f"got {raw.min():g} .. {raw.max():g}")
        points = raw.astype(np.int64)
    return np.unique(np.concatenate([[0, steps], points])).astype(np.int64)


def _log_steps(steps: int, n: int) -> np.ndarray:
    """``n`` distinct steps (2 <= n <= steps + 1): 0, then 1 .. ``steps`` log-spaced. Where
    log spacing is finer than a step (the start of a long run) every step is taken, and the
    points after them are log-spaced at least a step apart, so that none merge (the plain
    rounded log spacing is kept when none of its points merge)."""
    plain = np.unique(np.rint(_log_points(1, steps, n - 1)).astype(np.int64))
    if len(plain) == n - 1:
        return np.concatenate([[0], plain])

    def spaced(m: int) -> bool:  # from step m on, n - m log-spaced points are a step apart
        left = n - m
        return left < 2 or m * ((steps / m) ** (1.0 / (left - 1)) - 1.0) >= 1.0

    lo, hi = 1, n - 1  # the first m >= 1 with spaced(m) (it holds for all m past it)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if spaced(mid) else (mid + 1, hi)
    tail = _log_points(lo, steps, n - lo)
    # (floor(x + 1/2), not rint: values a step apart never round to the same integer)
    return np.concatenate([np.arange(lo), np.floor(tail + 0.5)]).astype(np.int64)


def _log_points(first: float, last: float, n: int) -> np.ndarray:
    """``n`` >= 1 log-spaced points from ``first`` to ``last`` (just ``last`` when n = 1)."""
    return np.geomspace(first, last, n) if n > 1 else np.array([last], dtype=np.float64)


def _time_schedule(record: Any, n_records: int, t_end: float) -> np.ndarray:
    """Save times in [0, t_end], always with 0 and ``t_end``."""
    if record is None:
        points = np.linspace(0.0, t_end, n_records)
    elif isinstance(record, str):
        if record != "log":
            raise ConfigError(f"record must be None, 'log' or an array of save times, "
                              f"got {record!r}")
        points = _log_points(t_end * 1e-3, t_end, n_records - 1)
    else:
        points = np.asarray(record, dtype=np.float64).ravel()
        if not np.all(np.isfinite(points)):
            raise ConfigError("record: save times must be finite")
        # (a few ulps past t_end is t_end: lr * steps rounds, 0.87 can be 0.8699999999999999)
        if points.size and (points.min() < 0 or points.max() > t_end * (1 + 8 * _EPS)):
            raise ConfigError(f"record: save times must lie in [0, t_end={t_end!r}], "
                              f"got {points.min()!r} .. {points.max()!r}")
    points = np.clip(points, 0.0, t_end)
    return np.unique(np.concatenate([[0.0, t_end], points]))


def _data_hash(data: Dataset) -> str:
    """A fingerprint of the training data, stored so that ``resume`` can check it is the same."""
    h = hashlib.sha256()
    for label, group in (("in", data.inputs), ("out", data.targets), ("gn", data.node_gates),
                         ("ge", data.edge_gates), ("w", {"": data.weights})):
        for key in sorted(group):
            arr = np.ascontiguousarray(group[key], dtype=np.float64)
            h.update(f"{label}:{key}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


# ====================================================================== threads, progress
def _max_threads() -> int:
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def _check_threads(threads: Any) -> int:
    limit = _max_threads()
    if threads is None:
        return limit
    n = _positive("threads", threads, integer=True)
    if n > limit:
        raise ConfigError(f"threads={n} is more than the {limit} threads numba can use on this "
                          "machine (NUMBA_NUM_THREADS)")
    return n


@contextmanager
def _thread_limits(threads: int, n_runs: int) -> Iterator[None]:
    """numba uses ``threads`` threads; BLAS one (see ``engine.one_blas_thread``).

    The engines spread a batch's runs (the samples engine's, when big enough, over as many
    Python threads), or a moments-engine run's big products, over the numba threads, each
    calling single-threaded BLAS: no oversubscription, and the same numbers with any thread
    count.
    """
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with one_blas_thread():
            yield
    finally:
        numba.set_num_threads(previous)


class _Progress:
    """A one-line progress bar on stderr, shown only when stderr is a terminal (or forced)."""

    def __init__(self, enabled: bool | None, total: float, unit: str) -> None:
        if enabled is None:
            enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.enabled = enabled and total > 0
        self.total = total
        self.unit = unit
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, done: float, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        frac = min(max(done / self.total, 0.0), 1.0)
        bar = "#" * int(30 * frac)
        count = f"  {done:.0f}/{self.total:.0f} {self.unit}" if self.unit else ""
        sys.stderr.write(f"\rsimulate [{bar:<30}] {100 * frac:5.1f}%{count}  "
                         f"{now - self.start:.1f} s")
        sys.stderr.flush()

    def close(self, done: float) -> None:
        if self.enabled:
            self.update(done, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


# ====================================================================== recording
# Singular values cost far more than the learning steps they describe (a 64 x 64 matrix takes
# 110-250 µs in LAPACK, a routing step ~40 µs), so a batch with enough work is shared between
# threads, and every matrix goes through the same LAPACK call whichever thread takes it, so the
# values are the same bits. numpy's LAPACK loop releases the GIL only for calls of more than 500
# values out (NPY_BEGIN_THREADS_THRESHOLDED: matrices x min(out, in)); measured here, two threads
# calling it on 4 matrices of 64 x 64 ran one after the other, on 8 side by side. So a piece of
# a shared batch holds more values than that.
_SVD_CALL_SECONDS = 5e-6  # rough cost model of one matrix: a fixed part ...
_SVD_UNIT_SECONDS = 4e-10  # ... plus this per out * in * min(out, in)
_SVD_SHARE_SECONDS = 1e-3  # batches estimated below this stay on the calling thread
_SVD_SHARED_MIN = 16  # smaller matrices (min(out, in) below this) are stacked, not cut in pieces
_SVD_GIL_FREE_VALUES = 501  # numpy releases the GIL for calls with more values out than 500
_svd_pool: Any = None  # a ThreadPoolExecutor, made at first need
_svd_pool_lock = threading.Lock()


def _forget_svd_pool() -> None:
    # a forked child inherits the pool object but not its threads: it makes its own
    global _svd_pool, _svd_pool_lock
    _svd_pool, _svd_pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_svd_pool)


def _svd_helpers(task: Callable[[], None], n: int) -> list[Any]:
    """Start ``task`` on ``n`` threads of the pool (fewer, or none, once the interpreter is
    shutting down: the caller does the work left)."""
    global _svd_pool
    try:
        with _svd_pool_lock:
            if _svd_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                _svd_pool = ThreadPoolExecutor(_max_threads(),
                                               thread_name_prefix="fastrace-svals")
            return [_svd_pool.submit(task) for _ in range(n)]
    except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
        return []


_WIDE = 4  # a matrix with at least this many times more columns than rows: QR of its transpose
_BATCHED_QR = np.lib.NumpyVersion(np.__version__) >= "2.0.0"  # qr of stacked matrices


def _svals(M: np.ndarray) -> np.ndarray:
    """Singular values of each matrix of M (n, out, in), largest first: (n, min(out, in)).
    A matrix with a non-finite entry gives NaNs (the others are unaffected)."""
    finite = np.isfinite(M).all(axis=(1, 2))
    with np.errstate(all="ignore"):
        if finite.all():
            return _finite_svals(M)
        out = np.full((M.shape[0], min(M.shape[1:])), np.nan)
        if finite.any():
            out[finite] = _finite_svals(M[finite])
    return out


def _finite_svals(M: np.ndarray) -> np.ndarray:
    m, n = M.shape[1:]
    if _BATCHED_QR and n >= _WIDE * m:
        # a wide matrix (an output edge, say) goes to the small triangle R of its transpose by
        # Householder QR first: the same values to rounding, in 0.45-0.7 of the time LAPACK's
        # SVD takes on the wide matrix itself (measured here for 4-20 rows and 64-2048 columns)
        return np.linalg.svd(np.linalg.qr(np.swapaxes(M, 1, 2), mode="r"), compute_uv=False)
    return np.linalg.svd(M, compute_uv=False)


def _singular_values(batches: Mapping[str, np.ndarray], threads: int) -> dict[str, np.ndarray]:
    """``_svals`` of every {edge: (n, out, in)} batch, on up to ``threads`` threads.

    Batches of small matrices are stacked by shape, one LAPACK call each; big batches are cut
    into pieces of rows. The pool's threads and the calling thread take these calls in turn (a
    matrix's cost depends on its values: learned 64 x 64 weights took 2.4 times as long as
    random ones, so the work is shared as it goes). Each shared call is big enough for numpy to
    leave the GIL free; stacks smaller than that are done by the calling thread first.
    """
    work = sum(M.shape[0] * (_SVD_CALL_SECONDS + _SVD_UNIT_SECONDS * M.shape[1] * M.shape[2]
                             * min(M.shape[1:])) for M in batches.values())
    # big: batches cut into pieces of rows, each a call that leaves the GIL free
    big = [e for e, M in batches.items()
           if min(M.shape[1:]) >= _SVD_SHARED_MIN and len(M) >= _gil_free_rows(M)]
    pieces = sum(len(batches[e]) // _gil_free_rows(batches[e]) for e in big)
    if threads < 2 or work < _SVD_SHARE_SECONDS or pieces < 2:
        # (too few matrices for two pieces that leave the GIL free: threads would take turns.
        # LAPACK stays at one BLAS thread: with two, a big matrix's values change in the last
        # digits, 6e-13 on a 2048 x 2048 weight)
        with one_blas_thread():
            return _stacked_singular_values(batches)
    with one_blas_thread():  # the threads share the matrices: each runs its LAPACK alone
        return _shared_singular_values(batches, big, threads)


def _shape_groups(batches: Mapping[str, np.ndarray]) -> list[tuple[np.ndarray, list[tuple[str, int]]]]:
    """The batches of each matrix shape stacked: [(matrices, [(edge, its rows), ...])]. One call
    per shape instead of one per edge: fewer calls, and calls big enough to leave the GIL free
    (the output edges of a network, say, are many small batches of one shape)."""
    shapes: dict[tuple[int, ...], list[str]] = {}
    for e, M in batches.items():
        shapes.setdefault(M.shape[1:], []).append(e)
    return [(batches[edges[0]] if len(edges) == 1 else
             np.concatenate([batches[e] for e in edges]), [(e, len(batches[e])) for e in edges])
            for edges in shapes.values()]


def _placed(batches: Mapping[str, np.ndarray],
            parts: list[tuple[np.ndarray, list[tuple[str, int]]]]) -> dict[str, np.ndarray]:
    """Each edge's values from ``parts``: [(values, [(edge, rows), ...])] in row order."""
    pieces: dict[str, list[np.ndarray]] = {e: [] for e in batches}
    for values, spans in parts:
        at = 0
        for e, n in spans:
            pieces[e].append(values[at:at + n])
            at += n
    return {e: p[0] if len(p) == 1 else np.concatenate(p) for e, p in pieces.items()}


def _stacked_singular_values(batches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``_svals`` of each batch, on the calling thread, one call per matrix shape."""
    return _placed(batches, [(_svals(M), spans) for M, spans in _shape_groups(batches)])


def _gil_free_rows(M: np.ndarray) -> int:
    """Fewest matrices of M (n, out, in) for which numpy's SVD call leaves the GIL free."""
    return -(-_SVD_GIL_FREE_VALUES // min(M.shape[1:]))


def _shared_singular_values(batches: Mapping[str, np.ndarray], big: list[str],
                            threads: int) -> dict[str, np.ndarray]:
    # pieces: the small batches stacked by shape (one piece each), and the big batches cut into
    # pieces of rows; each piece is one call that leaves the GIL free. Stacks too small for that
    # are done by the calling thread first (they are quick).
    first, pieces = [], []
    for M, spans in _shape_groups({e: M for e, M in batches.items() if e not in big}):
        (pieces if len(M) >= _gil_free_rows(M) else first).append((M, spans))
    for e in big:
        M = batches[e]
        n, least = len(M), _gil_free_rows(M)
        size = max(least, -(-n // (4 * threads)))
        bounds = [[a, min(a + size, n)] for a in range(0, n, size)]
        if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < least:
            bounds[-2][1] = bounds[-1][1]  # a short last piece would hold the GIL
            bounds.pop()
        pieces += [(M[a:b], [(e, b - a)]) for a, b in bounds]
    results: list[Any] = [None] * len(pieces)
    taking = itertools.count()  # next() on a count is atomic: each piece is taken once
    stop = [False]

    def take_pieces() -> None:
        for i in taking:
            if i >= len(pieces) or stop[0]:
                return
            results[i] = _svals(pieces[i][0])

    helpers = _svd_helpers(take_pieces, threads - 1)
    try:
        done = [(_svals(M), spans) for M, spans in first]
        take_pieces()
    except BaseException:
        stop[0] = True  # the helpers stop after their current piece; this error is raised
        for h in helpers:
            if not h.cancel():
                h.exception()
        raise
    for h in helpers:  # every piece is taken: wait for those still being computed
        if not h.cancel():  # (a helper that never started, behind other work, is not)
            h.result()
    return _placed(batches, done + [(r, spans) for r, (_, spans) in zip(results, pieces)])


class _RunState:
    """Where one run is: position, next save point, rows kept in memory, integrator state."""

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.pos = 0  # gd: step; flow: accepted integrator steps
        self.next_save = 0  # index of the next save point to record
        self.done = False
        self.last_checkpoint = -1
        self.columns: dict[str, np.ndarray] = {}  # recorded rows, one array per series
        self.filled = 0  # rows filled in ``columns``
        self.sent = 0  # of which handed to the writer
        self.sent_at = time.monotonic()
        # flow only
        self.t = 0.0
        self.h = 0.0  # next step size (0: choose one)
        self.facold = 1e-4
        self.n_rejected = 0
        self.loss = math.nan  # loss at the current state
        self.rejected_last = False


class _Recorder:
    """Turns weights at save points into rows, kept in memory and appended to the writer."""

    def __init__(self, engine: GradientEngine, plan: _Plan, quantities: Mapping[str, Quantity],
                 writer: Any, keep: bool = True) -> None:
        self.engine = engine
        self.plan = plan
        self.quantities = quantities
        self.writer = writer
        self.keep = keep
        self.snap_dtype = np.dtype(plan.weights_dtype)
        #: whether a row needs the weights (else ``record`` takes W=None)
        self.reads_weights = plan.svals or plan.save_weights or bool(quantities)
        self.spec = self._series_spec()
        self.row_bytes = sum(math.prod(shape) * dtype.itemsize
                             for shape, dtype in self.spec.values())
        self.send_rows = -(-SEND_BYTES // self.row_bytes)  # rows that make SEND_BYTES
        self.threads = 1  # threads for the singular values (the run's thread budget)

    def series_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{series name: (row shape, dtype)} of one run."""
        return self.spec

    def _series_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        f8 = np.dtype(np.float64)
        spec: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            "t": ((), f8), "step": ((), np.dtype(np.int64)), "loss": ((), f8)}
        for e in self.engine.edges:
            shape = self.engine.shapes[e]
            if self.plan.svals:
                spec[f"svals/{e}"] = ((min(shape),), f8)
            if self.plan.save_weights:
                spec[f"weights/{e}"] = (tuple(shape), self.snap_dtype)
        for name, shape in self.plan.quantity_shapes.items():
            spec[f"quantities/{name}"] = (tuple(shape), f8)
        return spec

    def record(self, runs: Sequence[_RunState], W: np.ndarray | None, t: np.ndarray,
               step: np.ndarray, loss: np.ndarray, eager: bool = False) -> None:
        """Record one row per weight vector: row ``i`` holds ``W[i]`` (n, n_params), ``t[i]``,
        ``step[i]`` and ``loss[i]`` and belongs to ``runs[i]``; each run's rows in order.
        ``W`` may be None when no series needs the weights (``reads_weights`` is False).

        The values of all rows are computed in batched calls and copied into the runs'
        columns block by block: no Python work per row or per value. ``eager``: hand rows to
        the writer in smaller blocks (the last batches of a run).
        """
        values = self._values(W, t, step, loss)
        order: dict[int, tuple[_RunState, list[int]]] = {}
        for i, r in enumerate(runs):
            order.setdefault(r.index, (r, []))[1].append(i)
        for r, rows in order.values():
            at = _as_index(rows)
            self._store(r, {key: v[at] for key, v in values.items()}, len(rows), eager)

    def _values(self, W: np.ndarray | None, t: np.ndarray, step: np.ndarray,
                loss: np.ndarray) -> dict[str, np.ndarray]:
        """{series: (n, *row shape)} for the weight vectors ``W`` (n, n_params)."""
        values: dict[str, np.ndarray] = {"t": t, "step": step, "loss": loss}
        if W is None:
            if self.reads_weights:
                raise AssertionError("the recorded series need the weights")
            return values
        n = W.shape[0]
        matrices = self.engine.unpack(W)
        if self.plan.svals:
            for e, s in _singular_values(matrices, self.threads).items():
                values[f"svals/{e}"] = s
        if self.plan.save_weights:
            for e, M in matrices.items():
                values[f"weights/{e}"] = M  # a view of W: copied into the column at once
        for name, fn in self.quantities.items():
            shape = self.plan.quantity_shapes[name]
            q = np.empty((n, *shape))
            for k in range(n):
                value = _call_quantity(name, fn, self.engine.unpack(W[k].copy()))
                if value.shape != shape:
                    raise ConfigError(f"quantities[{name!r}] returned shape {value.shape}, but "
                                      f"{shape} at the start of the run; it must keep its shape")
                q[k] = value
            values[f"quantities/{name}"] = q
        return values

    def _store(self, run: _RunState, block: dict[str, np.ndarray], n: int,
               eager: bool) -> None:
        """Copy ``n`` finished rows into the run's columns; rows go to the writer in blocks
        (see ``send``).

        With ``keep`` every row of the run stays in memory (columns preallocated for all save
        points); otherwise the columns only hold the rows not yet sent.
        """
        if not self.keep and run.columns and run.filled + n > len(run.columns["t"]):
            self.send(run)  # hands the full columns over and starts fresh ones
        if not run.columns:
            n_rows = len(self.plan.save_times[run.index]) - run.next_save if self.keep \
                else max(self.send_rows, n)
            run.columns = {k: np.empty((max(n_rows, 1), *shape), dtype=dtype)
                           for k, (shape, dtype) in self.series_spec().items()}
        i = run.filled
        for key, column in run.columns.items():
            column[i:i + n] = block[key]
        run.filled += n
        run.next_save += n
        waiting = (run.filled - run.sent) * self.row_bytes
        if self.writer is not None and (waiting >= (SEND_BYTES // 8 if eager else SEND_BYTES)
                                        or time.monotonic() - run.sent_at > SEND_SECONDS):
            self.send(run)

    def send(self, run: _RunState) -> None:
        """Hand the rows not yet sent to the writer, one block per series, without a copy: the
        rows of a column are never written again once filled (without ``keep`` a full set of
        columns is handed over and fresh ones are started)."""
        if self.writer is not None and run.filled > run.sent:
            self.writer.append_blocks(run.name, {k: c[run.sent:run.filled]
                                                 for k, c in run.columns.items()})
            run.sent = run.filled
            if not self.keep:
                run.columns = {}
                run.filled = run.sent = 0
        run.sent_at = time.monotonic()

    def column(self, run: _RunState, key: str) -> np.ndarray:
        """Every recorded row of one series of ``run`` (with ``keep``)."""
        if not run.columns:
            shape, dtype = self.series_spec()[key]
            return np.empty((0, *shape), dtype=dtype)
        return run.columns[key][:run.filled]

    def checkpoint(self, run: _RunState, state: dict[str, Any]) -> None:
        """Checkpoint ``run`` at its position, after every row recorded so far."""
        self.send(run)
        self.writer.checkpoint(run.name, run.pos, {**state, "next_save": np.int64(run.next_save)})
        run.last_checkpoint = run.pos


def _as_index(rows: list[int]) -> slice | np.ndarray:
    """Positions ``rows`` (increasing) as a slice when evenly spaced, so indexing gives a view."""
    if len(rows) == 1:
        return slice(rows[0], rows[0] + 1)
    stride = rows[1] - rows[0]
    if all(b - a == stride for a, b in zip(rows, rows[1:])):
        return slice(rows[0], rows[-1] + 1, stride)
    return np.array(rows)


def _call_quantity(name: str, fn: Quantity, weights: Weights) -> np.ndarray:
    try:
        value = fn(weights)
    except FastraceError:
        raise
    except Exception as exc:
        raise ConfigError(f"quantities[{name!r}] raised {type(exc).__name__}: {exc}") from exc
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":  # (None, str, complex, Python ints past int64 ...)
            raise TypeError
        return np.array(array, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"quantities[{name!r}] must return real numbers (an array or a "
                          f"float), got {value!r:.80}") from None


def _check_quantities(quantities: Any, engine: GradientEngine,
                      first: np.ndarray) -> tuple[dict[str, Quantity], dict[str, tuple]]:
    if quantities is None:
        return {}, {}
    if not isinstance(quantities, Mapping):
        raise ConfigError("quantities must be a mapping {name: callable(weights) -> array}")
    shapes = {}
    for name, fn in quantities.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"quantities: names must be non-empty strings without '/', "
                              f"got {name!r}")
        if not callable(fn):
            raise ConfigError(f"quantities[{name!r}] must be callable, got {type(fn).__name__}")
        shapes[name] = _call_quantity(name, fn, engine.unpack(first.copy())).shape
    return dict(quantities), shapes


# ====================================================================== divergence
def _offending_entry(engine: GradientEngine, row: np.ndarray) -> tuple[str, float]:
    """The edge and value of the worst entry of a flat weight vector (non-finite first)."""
    bad = ~np.isfinite(row)
    i = int(np.argmax(bad)) if bad.any() else int(np.argmax(np.abs(row)))
    offsets = np.array([engine.offsets[e] for e in engine.edges])
    edge = engine.edges[int(np.searchsorted(offsets, i, side="right")) - 1]
    return edge, float(row[i])


def _weights_bad(W: np.ndarray, threshold: float) -> np.ndarray:
    """(n,) True where a weight vector is non-finite or has an entry above the threshold."""
    with np.errstate(invalid="ignore"):
        return ~(np.isfinite(W) & (np.abs(W) <= threshold)).all(axis=1)


def _divergence(engine: GradientEngine, plan: _Plan, run: _RunState, step: int, t: float,
                quantity: str, row: np.ndarray, value: float | None = None) -> DivergenceError:
    edge, wvalue = _offending_entry(engine, row)
    if quantity == "weights":
        quantity, value = f"W[{edge!r}]", wvalue
    what = (f"loss = {value:.6g} (largest weight {wvalue:.6g}, on edge {edge!r})"
            if quantity == "loss" else
            f"{quantity} has entry {value:.6g} (threshold {plan.divergence_threshold:g})")
    hint = ("try a smaller learning rate" if plan.method == "gd"
            else "the weights grow without bound")
    err = DivergenceError(f"run {run.name!r} diverged at step {step} (t = {t:.6g}): {what}; "
                          f"{hint}",
                          step=step, quantity=quantity, value=float(value))  # type: ignore[arg-type]
    err.run = run.name  # type: ignore[attr-defined]
    err.edge = edge  # type: ignore[attr-defined]
    return err


# ====================================================================== gradient descent
def _gd_checkpoint_spec(n_params: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    f8, i8 = np.dtype(np.float64), np.dtype(np.int64)
    return {"w": ((n_params,), f8), "velocity": ((n_params,), f8), "next_save": ((), i8)}


def _drive_gd(engine: GradientEngine, plan: _Plan, runs: list[_RunState], W: np.ndarray,
              V: np.ndarray, rec: _Recorder, writer: Any, progress: _Progress) -> None:
    """Advance every run to ``plan.steps``; runs at the same step move together."""
    steps, save, every = plan.steps, plan.save_steps, plan.checkpoint_every
    assert save is not None
    snap_buffer = np.empty(0)
    started = False
    while True:
        live = [r for r in runs if not r.done]
        if not live:
            return
        m = min(r.pos for r in live)
        active = [r for r in live if r.pos == m]
        idx = np.array([r.index for r in active])
        whole = len(active) == W.shape[0]

        # checkpoint first: it then holds exactly the rows of save points before m (the final
        # checkpoint comes after the last rows instead, below)
        if writer is not None and m < steps and (m == 0 or (every and m % every == 0)):
            for r in active:
                if r.last_checkpoint != m:
                    rec.checkpoint(r, {"w": W[r.index], "velocity": V[r.index]})
        if not started:
            # the starting weights face the test every step's weights face (as a flow run's
            # do), so that weights above the threshold are reported at the step they are found,
            # not the next (after the first checkpoints: the writer waits for them before the
            # file takes its path; they are finite, as packing checked them)
            _check_start(engine, plan, live, W)
            started = True

        saving = [k for k, r in enumerate(active)
                  if r.next_save < len(save) and save[r.next_save] == m]

        if m == steps:
            # the engine computes each step's loss before the step: the loss at the end is
            # new here, and it too must be finite
            with np.errstate(all="ignore"):
                final_loss = engine.loss(W[_as_index(idx.tolist())])
            for k in np.flatnonzero(~np.isfinite(final_loss)).tolist()[:1]:
                raise _divergence(engine, plan, active[k], m, float(plan.lr[idx[k]] * m),
                                  "loss", W[idx[k]], float(final_loss[k]))
            if saving:
                sel = idx[saving]
                final = W[_as_index(sel.tolist())]  # a view when evenly spaced (no copy)
                rec.record([active[k] for k in saving], final, plan.lr[sel] * m,
                           np.full(len(sel), m), final_loss[saving])
            # The final checkpoint holds every row: the file is then written in the order it
            # is read, and no chunk flushed by the checkpoint is written again at close.
            for k, r in enumerate(active):
                if writer is not None and (r.last_checkpoint != m or k in saving):
                    rec.checkpoint(r, {"w": W[r.index], "velocity": V[r.index]})
                r.done = True
            continue

        nxt = [steps, m + MAX_CHUNK]
        if every:
            nxt.append((m // every + 1) * every)
        nxt += [r.pos for r in live if r.pos > m]
        n = min(nxt) - m
        # save points inside the chunk are snapshots taken by the engine, so a schedule of many
        # save points costs few engine calls; their number is capped to bound the memory
        lo = int(np.searchsorted(save, m, side="right"))
        hi = int(np.searchsorted(save, m + n, side="left"))
        # (streamed runs too: shorter calls only split the batches of singular values, which
        # made the run slower, and the writer works during the next call either way)
        cap = max(1, SNAPSHOT_BYTES // (8 * len(active) * engine.n_params))
        if hi - lo > cap:
            hi = lo + cap
            n = int(save[hi]) - m
        inner = np.asarray(save[lo:hi], dtype=np.int64)
        snaps = None  # the weights at the save points, if a row needs them
        if rec.reads_weights:
            # one buffer for the whole run, grown as needed: a fresh one per engine call would
            # cost its page faults every time (~0.25 ms per MB here, in the engine's thread)
            size = len(active) * inner.size * engine.n_params
            if snap_buffer.size < size:
                snap_buffer = np.empty(size)
            snaps = snap_buffer[:size].reshape(len(active), inner.size, engine.n_params)

        w = W if whole else W[idx]
        v = V if whole else V[idx]
        # the weights at m, for a row at m that needs them (the engine overwrites w); its loss
        # is the first the engine computes
        before = w[saving] if saving and rec.reads_weights else None  # (a copy)
        with np.errstate(all="ignore"):
            losses = engine.descend(w, v, plan.lr[idx], n, plan.momentum, plan.weight_decay,
                                    max_abs=plan.divergence_threshold,
                                    snapshot_steps=None if snaps is None else inner - m,
                                    snapshots=snaps)
        # a run whose state went bad after k steps keeps only the save points before that
        status = engine.last_status
        last_good = np.where(status >= 0, status - 1, n).min() if len(status) else n
        # the save point at m: weights before the chunk, loss of its first step; kept, as the
        # save points inside the chunk are, only if no run went bad at m (its loss not finite)
        if saving and last_good >= 0:
            rec.record([active[k] for k in saving], before, plan.lr[idx[saving]] * m,
                       np.full(len(saving), m), losses[saving, 0])
        good = 0  # save points before any divergence in this chunk: their rows are kept
        while good < inner.size and inner[good] - m <= last_good \
                and np.isfinite(losses[:, :inner[good] - m + 1]).all() \
                and (snaps is None or np.isfinite(snaps[:, good]).all()):
            good += 1
        # batched calls for many (save point, run) pairs (rows ordered by save point, then
        # run): singular values of all at once, in batches of about BATCH_ROWS rows so that the
        # writer thread stores rows while the next ones are computed
        taper = writer is not None and m + n == steps
        for j0, j1 in _row_batches(good, max(1, BATCH_ROWS // len(active)), taper):
            at = inner[j0:j1]
            rec.record(active * at.size, None if snaps is None else
                       snaps[:, j0:j0 + at.size].transpose(1, 0, 2).reshape(-1, engine.n_params),
                       (at[:, None] * plan.lr[idx][None, :]).ravel(),
                       np.repeat(at, len(active)), losses[:, at - m].T.ravel(), eager=taper)
        # the engine checks every weight after every step (status), and the losses here
        diverged = (status >= 0) | ~np.isfinite(losses).all(axis=1)
        if diverged.any():
            raise _gd_divergence(engine, plan, active, idx, w, losses, status, m)
        if not whole:
            W[idx] = w
            V[idx] = v
        for r in active:
            r.pos = m + n
        progress.update(sum(r.pos for r in runs))


def _check_start(engine: GradientEngine, plan: _Plan, runs: list[_RunState],
                 W: np.ndarray) -> None:
    """DivergenceError if a run's weights exceed the threshold (the kernel's norm test: no
    temporaries, one pass)."""
    from ._kernels.plan import _checked_norm

    if not math.isfinite(plan.divergence_threshold):
        return
    for r in runs:
        if _checked_norm(W[r.index], plan.divergence_threshold) < 0.0:
            raise _divergence(engine, plan, r, r.pos, float(plan.lr[r.index] * r.pos),
                              "weights", W[r.index])


def _row_batches(n: int, size: int, taper: bool) -> list[tuple[int, int]]:
    """Split ``range(n)`` into batches of ``size``; with ``taper`` the last few halve in size
    (..., size/2, size/4, size/8), so that at the end of a run the rows still to be written
    once the last batch is computed are few."""
    edges = [n]
    tail = max(1, size // 8)
    while taper and edges[-1] > 0 and tail < size:
        edges.append(max(0, edges[-1] - tail))
        tail *= 2
    while edges[-1] > 0:
        edges.append(max(0, edges[-1] - size))
    edges.reverse()
    return list(zip(edges[:-1], edges[1:]))


def _gd_divergence(engine: GradientEngine, plan: _Plan, active: list[_RunState],
                   idx: np.ndarray, w: np.ndarray, losses: np.ndarray, status: np.ndarray,
                   m: int) -> DivergenceError:
    """The first divergence in a chunk of steps from ``m``, read off where the engine stopped.

    The engine stops a run at its first bad state and leaves it there (``descend``). Status
    k means either that the weights w after k ≥ 1 steps are bad (not finite or above the
    threshold: the engine's test), or that the loss of the weights after k steps is not
    finite; those weights are then w, and they passed the test (or are the chunk's start,
    k = 0). Events are taken in the order a step-by-step descent meets them: after j steps
    the weights are checked, then their loss; at equal events the first run.
    """
    n = losses.shape[1]
    events = []
    for k, stop in enumerate(status.tolist()):
        if stop < 0:
            continue
        if stop > 0 and _weights_bad(w[k:k + 1], plan.divergence_threshold)[0]:
            events.append((stop - 1, 1, k))
        else:
            events.append((stop, 0, k))
    if not events:  # cannot happen: a non-finite loss stops a run
        return DivergenceError(f"a run diverged between steps {m} and {m + n}", step=m + n)
    j, weights_bad, k = min(events)
    lr = plan.lr[idx[k]]
    if weights_bad:
        return _divergence(engine, plan, active[k], m + j + 1, float(lr * (m + j + 1)),
                           "weights", w[k])
    return _divergence(engine, plan, active[k], m + j, float(lr * (m + j)), "loss", w[k],
                       float(losses[k, j]))


# ====================================================================== gradient flow
# Dormand–Prince 5(4): nodes, stage matrix, 5th-order weights (= last stage row, FSAL), error
# weights (5th minus 4th order) and the dense-output weights of Hairer's DOPRI5.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_D = (-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799, -10690763975 / 1880347072,
      701980252875 / 199316789632, -1453857185 / 822651844, 69997945 / 29380423)
_SAFE, _FAC_MIN, _FAC_MAX, _BETA = 0.9, 0.2, 10.0, 0.04  # controller constants of DOPRI5
_EXPO = 0.2 - 0.75 * _BETA


def _flow_checkpoint_spec(n_params: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    f8, i8 = np.dtype(np.float64), np.dtype(np.int64)
    return {"w": ((n_params,), f8), "t": ((), f8), "h": ((), f8), "facold": ((), f8),
            "n_rejected": ((), i8), "next_save": ((), i8)}


def _flow_field(engine: GradientEngine, Y: np.ndarray,
                weight_decay: float) -> tuple[np.ndarray, np.ndarray]:
    """Loss (n,) and dW/dt = −∇L − λW (n, n_params) for flat weights Y (n, n_params)."""
    with np.errstate(all="ignore"):
        loss, grad = engine.loss_and_gradient(Y)
        if weight_decay:
            grad += weight_decay * Y
    return loss, -grad


def _rms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(x * x, axis=1))


def _scaled_rms(x: np.ndarray) -> np.ndarray:
    """``_rms`` of each row without overflow (entries past 1e154 overflow when squared)."""
    with np.errstate(all="ignore"):
        top = np.max(np.abs(x), axis=1)  # (NaN if the row has one: the result is NaN too)
        safe = np.where((top > 0) & np.isfinite(top), top, 1.0)
        return np.where(top == 0, 0.0, top * _rms(x / safe[:, None]))


def _initial_step(engine: GradientEngine, plan: _Plan, runs: list[_RunState], Y: np.ndarray,
                  F: np.ndarray, t_left: np.ndarray) -> np.ndarray:
    """Starting step sizes (n,) from the size of the field and its change (Hairer's HINIT);
    IntegrationError for a run where none can be found (a field too large to scale)."""
    sk = plan.atol + plan.rtol * np.abs(Y)
    nf, ny = _scaled_rms(F / sk), _scaled_rms(Y / sk)
    with np.errstate(all="ignore"):
        h = np.where((nf > 1e-5) & (ny > 1e-5), ny / nf * 0.01, 1e-6)
        h = np.minimum(h, t_left)
        _, F1 = _flow_field(engine, Y + h[:, None] * F, plan.weight_decay)
        der2 = _scaled_rms((F1 - F) / sk) / h
        der12 = np.maximum(np.abs(der2), nf)
        h1 = np.where(der12 <= 1e-15, np.maximum(1e-6, h * 1e-3),
                      (0.01 / np.maximum(der12, 1e-300)) ** 0.2)
        h = np.minimum(np.minimum(100 * h, h1), t_left)
    for r, step, size in zip(runs, h.tolist(), nf.tolist()):
        if not step > 0.0:  # (NaN included)
            raise IntegrationError(
                f"run {r.name!r}: gradient flow finds no starting step at t = {r.t:.6g}: the "
                f"field is too large to integrate (scaled size {size:.3g}); check the weights "
                "and divergence_threshold")
    return h


def _drive_flow(engine: GradientEngine, plan: _Plan, runs: list[_RunState], W: np.ndarray,
                rec: _Recorder, writer: Any, progress: _Progress) -> None:
    """Integrate every run to its ``t_end``, each with its own step size, stages batched."""
    every = plan.checkpoint_every
    F = np.zeros_like(W)  # the field at each run's current state (first stage, FSAL)
    live = [r for r in runs if not r.done]
    if live:
        idx = np.array([r.index for r in live])
        loss, F[idx] = _flow_field(engine, W[idx], plan.weight_decay)
        # checkpoint first (a new file takes its path once every run has its first): before
        # the row at the start (a resume records it again), before the starting step is found
        # (h = 0 in it: a resume finds the same step again) and before the start is checked
        # (the runs a divergence stops can be resumed, as in descent)
        for k, r in enumerate(live):
            r.loss = float(loss[k])
            if writer is not None and r.last_checkpoint != r.pos:
                _flow_checkpoint(rec, r, W)
        for r in live:
            # a bad start is a divergence at step 0 (no row kept, as in descent), found before
            # a starting step is looked for (none can be, where the field is not finite)
            _check_flow_state(engine, plan, r, W[r.index], r.loss, r.pos, r.t)
        for k, r in enumerate(live):
            times = plan.save_times[r.index]
            if r.next_save < len(times) and times[r.next_save] == r.t:
                rec.record([r], W[r.index][None], np.array([r.t]), np.array([r.pos]),
                           loss[k:k + 1])
        fresh = [k for k, r in enumerate(live) if r.h <= 0.0]
        if fresh:
            sel = idx[fresh]
            t_left = np.array([plan.t_end[r.index] - r.t for r in live])[fresh]
            starting = [live[k] for k in fresh]
            for r, h in zip(starting, _initial_step(engine, plan, starting, W[sel], F[sel],
                                                    t_left)):
                r.h = float(h)

    while True:
        live = [r for r in runs if not r.done]
        if not live:
            return
        idx = np.array([r.index for r in live])
        t0 = np.array([r.t for r in live])
        t_end = plan.t_end[idx]
        # the budget is checked before a step, so that a run resumed at its limit stops there
        # as the uninterrupted run did
        for k, r in enumerate(live):
            if r.pos + r.n_rejected >= plan.max_steps:
                raise IntegrationError(
                    f"run {r.name!r}: gradient flow took {plan.max_steps} steps and reached only "
                    f"t = {r.t:.6g} of {t_end[k]:.6g} (step {r.h:.3g}): the flow is stiff here; "
                    "raise max_steps, loosen rtol, or use method='gd'")
        h = np.array([r.h for r in live])
        last = (t0 + 1.01 * h - t_end) >= 0
        h = np.where(last, t_end - t0, h)
        Y0, K1 = W[idx], F[idx]
        hc = h[:, None]
        K = [K1]
        for s in range(1, 6):
            Ys = Y0 + hc * sum(a * K[i] for i, a in enumerate(_A[s]) if a)
            K.append(_flow_field(engine, Ys, plan.weight_decay)[1])
        Y1 = Y0 + hc * sum(b * K[i] for i, b in enumerate(_A[6]) if b)
        L7, K7 = _flow_field(engine, Y1, plan.weight_decay)
        K.append(K7)
        with np.errstate(all="ignore"):
            E = hc * sum(e * K[i] for i, e in enumerate(_E) if e)
            sk = plan.atol + plan.rtol * np.maximum(np.abs(Y0), np.abs(Y1))
            err = _rms(E / sk)
        err = np.where(np.isfinite(err), err, np.inf)

        accepted: list[int] = []
        for k, r in enumerate(live):
            fac11 = err[k] ** _EXPO
            if err[k] <= 1.0:
                fac = max(1 / _FAC_MAX, min(1 / _FAC_MIN, fac11 / r.facold ** _BETA / _SAFE))
                h_new = h[k] / fac
                if r.rejected_last:
                    h_new = min(h_new, h[k])
                r.facold = max(float(err[k]), 1e-4)
                r.h = float(h_new)
                r.rejected_last = False
                accepted.append(k)
            else:
                r.h = float(h[k] / min(1 / _FAC_MIN, fac11 / _SAFE))
                r.rejected_last = True
                r.n_rejected += 1
                # no progress: a step lost in the rounding of t (a stiff start at t = 0 may need
                # steps far below t_end's scale; there the floor is 1e-30 of it, far below any
                # step a stiff flow took here, but not 0: a NaN or zero step fails too)
                if not r.h >= max(16 * np.finfo(float).eps * abs(r.t), 1e-30 * float(t_end[k])):
                    raise IntegrationError(
                        f"run {r.name!r}: gradient flow step size underflow at t = {r.t:.6g} "
                        f"(error estimate {err[k]:.3g}); the field is not finite or too stiff — "
                        "check divergence_threshold and the weights")
        if accepted:
            acc = np.array(accepted)
            for k in accepted:  # before the rows inside the step are kept (descent keeps none)
                _check_flow_state(engine, plan, live[k], Y1[k], float(L7[k]), live[k].pos + 1,
                                  float(t_end[k]) if last[k] else float(t0[k] + h[k]))
            _flow_outputs(engine, plan, rec, [live[k] for k in accepted], Y0[acc], Y1[acc],
                          [K[i][acc] for i in range(7)], t0[acc], h[acc], last[acc], L7[acc])
            for k in accepted:
                r = live[k]
                W[r.index] = Y1[k]
                F[r.index] = K7[k]
                r.t = float(t_end[k]) if last[k] else float(t0[k] + h[k])
                r.loss = float(L7[k])
                r.pos += 1
                if last[k]:
                    r.done = True
                if writer is not None and (r.done or (every and r.pos % every == 0)):
                    _flow_checkpoint(rec, r, W)
        progress.update(float(sum(r.t for r in runs)))


def _check_flow_state(engine: GradientEngine, plan: _Plan, r: _RunState, w: np.ndarray,
                      loss: float, step: int, t: float) -> None:
    """Raise DivergenceError if run ``r``'s ``loss`` or weights ``w`` at ``step`` are bad."""
    if not np.isfinite(loss):
        raise _divergence(engine, plan, r, step, t, "loss", w, loss)
    if _weights_bad(w[None], plan.divergence_threshold)[0]:
        raise _divergence(engine, plan, r, step, t, "weights", w)


def _flow_checkpoint(rec: _Recorder, r: _RunState, W: np.ndarray) -> None:
    rec.checkpoint(r, {"w": W[r.index], "t": np.float64(r.t), "h": np.float64(r.h),
                       "facold": np.float64(r.facold), "n_rejected": np.int64(r.n_rejected)})


def _flow_outputs(engine: GradientEngine, plan: _Plan, rec: _Recorder, runs: list[_RunState],
                  Y0: np.ndarray, Y1: np.ndarray, K: list[np.ndarray], t0: np.ndarray,
                  h: np.ndarray, last: np.ndarray, L1: np.ndarray) -> None:
    """Record the save points inside each accepted step (t0, t0 + h] by dense output."""
    wanted: list[tuple[int, float, bool]] = []  # (run in batch, time, at the step's end)
    for k, r in enumerate(runs):
        times = plan.save_times[r.index]
        t1 = plan.t_end[r.index] if last[k] else t0[k] + h[k]
        j = r.next_save
        while j < len(times) and times[j] <= t1:
            wanted.append((k, float(times[j]), bool(times[j] == t1)))
            j += 1
    if not wanted:
        return
    Ys = np.empty((len(wanted), Y0.shape[1]))
    for n, (k, t, at_end) in enumerate(wanted):
        if at_end:
            Ys[n] = Y1[k]
            continue
        theta = (t - t0[k]) / h[k]
        dy = Y1[k] - Y0[k]
        bspl = h[k] * K[0][k] - dy
        tail = dy - h[k] * K[6][k] - bspl
        rc5 = h[k] * sum(d * K[i][k] for i, d in enumerate(_D) if d)
        Ys[n] = Y0[k] + theta * (dy + (1 - theta) * (bspl + theta * (tail + (1 - theta) * rc5)))
    inner = [n for n, w in enumerate(wanted) if not w[2]]
    loss = np.array([L1[k] for k, _, _ in wanted])
    if inner:
        with np.errstate(all="ignore"):
            loss[inner] = engine.loss(Ys[inner])
    rec.record([runs[k] for k, _, _ in wanted], Ys, np.array([t for _, t, _ in wanted]),
               np.array([runs[k].pos + 1 for k, _, _ in wanted]), loss)


# ====================================================================== results
def _trajectory(plan: _Plan, rec: _Recorder, run: _RunState, final: np.ndarray,
                status: str, copy: bool = True) -> Trajectory:
    """The run's Trajectory; its final weights are views of ``final`` unless ``copy``."""
    engine = rec.engine

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {key[len(prefix):]: rec.column(run, key) for key in rec.series_spec()
                if key.startswith(prefix)}

    final_w = engine.unpack(final.copy() if copy else final)  # (one copy, of this run only)
    return Trajectory(run.name, rec.column(run, "t"), rec.column(run, "step"),
                      rec.column(run, "loss"), group("svals/"), group("quantities/"), final_w,
                      status, plan.trajectory_attrs(run.index),
                      group("weights/") if plan.save_weights else None)


def _read_extras(path: Any, run: str) -> tuple[str, dict[str, np.ndarray] | None, int]:
    """The network JSON, the latest checkpoint state (or None) and its step, of ``run``.

    ``store.read_run`` returns the series, attrs and status; the checkpoint is read here from
    the layout documented in fastrace/store.py (checkpoint/current names the valid slot).
    """
    from . import store

    with store._open_read(path) as f:
        return _extras_of(f, path, run)


def _extras_of(f: Any, path: Any, run: str) -> tuple[str, dict[str, np.ndarray] | None, int]:
    """``_read_extras`` from the file ``f``, open already."""
    from . import store

    try:
        network_json = str(store._plain(f["network"].attrs.get("json", "")))
        ck = f[run]["checkpoint"]
        slot = int(ck["current"][()])
        if slot not in (0, 1):
            return network_json, None, -1
        group = ck[f"slot{slot}"]
        state = {name: np.asarray(ds[()]) for name, ds in group["state"].items()}
        return network_json, state, int(group["step"][()])
    except (KeyError, OSError, RuntimeError, ValueError) as exc:
        raise StoreError(f"{os.fspath(path)}: run {run!r} is damaged ({exc})") from exc


def _load_trajectory(path: Any, run: str, weights_in_file: bool = False,
                     file_id: str | None = None) -> Trajectory:
    """Run ``run`` of the file; with ``weights_in_file`` its weight snapshots stay in the file
    (``store.StoredSeries``, read when indexed) and only the other series are read. With
    ``file_id`` (a writer's ``TrajectoryWriter.file_id``), StoreError unless the file at path
    is the one that writer wrote."""
    from . import store

    with store.open_run(path, run) as reader:
        if file_id is not None and reader.file_id != file_id:
            raise StoreError(f"{os.fspath(path)} was replaced by another file after this run "
                             "wrote it: its rows are lost")
        kind = reader.attrs.get("kind")
        if kind != "simulation" or not {"t", "step", "loss"} <= set(reader.series_names):
            raise StoreError(f"{os.fspath(path)}: run {run!r} is not a simulation run "
                             f"(kind {kind!r}); read it with fastrace.store.read_run")
        names = [n for n in reader.series_names
                 if not (weights_in_file and n.startswith("weights/"))]
        data = reader.read(names)
        # a run being written (or just finished) has its series read one after another while
        # rows come in: they are cut to the rows every series has (all of them, once complete)
        rows = min([len(v) for v in data.series.values()]
                   + [n for name, n in reader.lengths.items() if name not in names])
        data.series.update({k: v[:rows] for k, v in data.series.items()})
        stored = {n[len("weights/"):]: store.StoredSeries._of(reader, n, rows)
                  for n in reader.series_names if n not in names}
        network_json, state, _ = _extras_of(reader._file, path, run)  # (one opening)
    try:
        net = Network.from_json(network_json)
    except (ValueError, KeyError, TypeError, NetworkError) as exc:
        raise StoreError(f"{os.fspath(path)}: the stored network cannot be read ({exc})") from exc
    series = data.series
    attrs = dict(data.attrs)
    if attrs.get("kind") == "simulation" and "simulate_schema" in attrs:
        attrs = _Plan.from_attrs([run], [attrs]).trajectory_attrs(0)

    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: np.asarray(v) for k, v in series.items() if k.startswith(prefix)}

    final: Weights = {}
    if state is not None and "w" in state:
        flat, offset = np.asarray(state["w"], dtype=np.float64), 0
        for e in net.edges:
            r, c = net.weight_shape(e)
            final[e] = flat[offset:offset + r * c].reshape(r, c).copy()
            offset += r * c
    return Trajectory(run, np.asarray(series["t"], dtype=np.float64),
                      np.asarray(series["step"], dtype=np.int64),
                      np.asarray(series["loss"], dtype=np.float64), group("svals/"),
                      group("quantities/"), final, data.status, attrs,
                      stored or group("weights/") or None)


# ====================================================================== public entry points
def simulate(net: Network, data: Dataset, weights: Mapping[str, Any] | Sequence[Mapping[str, Any]],
             *, lr: float | Sequence[float] | None = None, steps: int | None = None,
             method: str = "gd", t_end: float | None = None, momentum: float = 0.0,
             weight_decay: float = 0.0, engine: str = "auto",
             record: None | str | Sequence[float] | np.ndarray = None, record_every: int = 1,
             n_records: int | None = None, svals: bool = True, save_weights: bool = False,
             weights_dtype: str = "float64", quantities: Mapping[str, Quantity] | None = None,
             out: str | os.PathLike | None = None, run_name: str | None = None,
             run_names: Sequence[str] | None = None, checkpoint_every: int | None = None,
             rtol: float = 1e-8, atol: float = 1e-10, max_steps: int = 100_000,
             threads: int | None = None,
             divergence_threshold: float = 1e8, progress: bool | None = None,
             config: str = "", seed: int | None = None,
             compression: str = "auto", in_memory: bool = True) -> Trajectory | list[Trajectory]:
    """Train ``net`` on ``data`` from ``weights`` by gradient descent or gradient flow.

    Parameters
    ----------
    weights : {edge: (out, in) array}, or a list of them
        Initial weights. A list is a batch of independent runs (one Trajectory each), advanced
        together through the engine.
    lr : float or one per run
        Learning rate η (``method="gd"``; t = η·step). With ``method="flow"``, ``lr`` and
        ``steps`` define the time span ``t_end = η·steps`` and the save times ``η·k`` of the
        equivalent gradient-descent run; otherwise give ``t_end``.
    steps : int
        Number of gradient-descent steps.
    method : "gd" | "flow"
        Discrete gradient descent (optional ``momentum`` and ``weight_decay``), or gradient flow
        ``dW/dt = −∇L − weight_decay·W`` integrated by Dormand–Prince 5(4) to ``rtol``/``atol``.
    record, record_every, n_records
        Save points: every ``record_every`` steps (default); ``record="log"``: ``n_records``
        (default 101) log-spaced points (for gd at most ``steps + 1``: every step where log
        spacing is finer than a step); or an array of step indices (gd) / times (flow). A flow
        run given by ``t_end`` saves ``n_records`` equally spaced times by default. Step (time)
        0 and the last step (``t_end``) are always saved. A setting the schedule would ignore
        (``record_every`` with ``record``, ``n_records`` with a step schedule) is refused.
    svals, save_weights, weights_dtype, quantities
        What to record at each save point besides t and loss: singular values of each weight,
        full weight snapshots (float64 or float32), and ``{name: f(weights) -> array}``.
        Singular values at every step cost far more than the steps of a small network (a
        64 x 64 weight takes LAPACK ~250 µs, a routing step ~40 µs): for long runs record fewer
        points (``record="log"``, ``record_every``), or ``svals=False``.
    out : path, optional
        Stream every save point into this HDF5 file (layout of DESIGN.md), one group per run
        (``run_name``, default "simulation"; for a batch ``run_names``, default "seed_00",
        "seed_01", ...). An existing file is replaced. The path is checked before any
        computation (StoreError).
    checkpoint_every : int, optional
        With ``out``, save the full state every so many steps (accepted integrator steps for
        flow) so that ``resume`` can continue the run after a crash. The start and the end are
        always checkpointed.
    threads : int, optional
        Threads (default all cores): a batch's runs, a single run's big products (moments
        engine, in fixed blocks) and the recorded singular values are shared between them;
        BLAS and LAPACK run at one thread each, so the numbers are the same bits with any
        thread count (a single samples-engine run takes one thread).
    divergence_threshold : float
        A run whose loss is not finite or whose weights exceed this in magnitude (``inf``: only
        non-finite values count) raises DivergenceError naming the run, step, edge and value
        (attributes ``step``, ``quantity``, ``value``, ``run``, ``edge``). The whole call stops;
        in the file the run's status is "failed: diverged at step ...", and the other runs of
        the batch are "failed: stopped ..." and can still be resumed.
    progress : bool, optional
        Progress bar on stderr; default: only when stderr is a terminal.
    max_steps : int
        Gradient flow: most steps (accepted and rejected) per run; past it the run stops with
        IntegrationError instead of grinding through a stiff stretch.
    config, seed
        Stored in the file's root attributes (the experiment's TOML text, an int seed).

    Returns a Trajectory, or a list of them when ``weights`` is a list.
    compression : str
        HDF5 compression: "auto" (blosc-lz4 when hdf5plugin is installed, skipped for series it
        barely shrinks, such as float64 weight snapshots), "blosc-lz4" (always), "none".
    in_memory : bool
        Keep every recorded row in memory (default). With ``out``, ``in_memory=False`` holds
        only the rows not yet handed to the file (a few MB), for runs too long to keep: the
        returned trajectories then read their weight snapshots from the file when indexed
        (``fastrace.store.StoredSeries``); t, loss, singular values and quantities are read
        back at the end. A run whose rows would not fit in the memory available is refused
        before it starts (ConfigError), rather than failing part way.
    """
    if not isinstance(net, Network):
        raise NetworkError(f"net must be a fastrace.Network, got {type(net).__name__}")
    if not isinstance(data, Dataset):
        raise DataError(f"data must be a fastrace.Dataset, got {type(data).__name__}")
    batch = not isinstance(weights, Mapping)
    if batch:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or not weights:
            raise WeightsError("weights must be a {edge: array} mapping or a non-empty list "
                               "of them")
        runs_w = list(weights)
    else:
        runs_w = [weights]  # type: ignore[list-item]
    n_runs = len(runs_w)

    # ---- names and settings
    if batch:
        if run_name is not None:
            raise ConfigError("run_name is for one run; name the runs of a list of weights "
                              "with run_names")
        if isinstance(run_names, (str, bytes)):
            raise ConfigError(f"run_names must be a list of names, got {run_names!r}")
        names = ([f"seed_{i:02d}" for i in range(n_runs)] if run_names is None
                 else [str(n) for n in run_names])
        if len(names) != n_runs:
            raise ConfigError(f"run_names has {len(names)} names for {n_runs} runs")
    else:
        if run_names is not None:
            raise ConfigError("run_names is for a list of weights; use run_name for one run")
        names = ["simulation" if run_name is None else run_name]
    for name in names:
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"run names must be non-empty strings without '/', got {name!r}")
    if len(set(names)) != n_runs:
        raise ConfigError(f"run names must be distinct, got {names}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    momentum = _number("momentum", momentum)
    if not (0.0 <= momentum < 1.0):
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
    weight_decay = _number("weight_decay", weight_decay)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be finite and >= 0, got {weight_decay}")
    record_every = _positive("record_every", record_every, integer=True)
    if record_every != 1 and record is not None:
        raise ConfigError("record_every is for the default schedule (every k steps); with "
                          "record= the save points are those of record")
    n_records_given = n_records is not None
    n_records = _positive("n_records", 101 if n_records is None else n_records, integer=True)
    if not 2 <= n_records <= _MAX_SAVE_POINTS:
        raise ConfigError(f"n_records must be at least 2 and at most {_MAX_SAVE_POINTS}, got "
                          f"{n_records}")
    if weights_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weights_dtype must be one of {WEIGHT_DTYPES}, got {weights_dtype!r}")
    for flag, value in (("svals", svals), ("save_weights", save_weights),
                        ("in_memory", in_memory)):
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"{flag} must be True or False, got {value!r}")
    rtol = _positive("rtol", rtol)
    if rtol < _MIN_RTOL:
        raise ConfigError(f"rtol={rtol:g} is below what float64 can deliver; use at least "
                          f"{_MIN_RTOL:.1e}")
    if rtol >= 1.0:
        raise ConfigError(f"rtol={rtol:g} lets each step's error be as large as the weights "
                          "themselves; use rtol < 1")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ConfigError(f"max_steps must be a positive integer, got {max_steps!r}")
    atol = _positive("atol", atol)
    divergence_threshold = _number("divergence_threshold", divergence_threshold)
    if not divergence_threshold > 0:
        raise ConfigError(f"divergence_threshold must be positive (inf: only non-finite values "
                          f"count), got {divergence_threshold}")
    if save_weights and weights_dtype == "float32" and \
            divergence_threshold > np.finfo(np.float32).max:
        raise ConfigError(f"weights_dtype='float32' snapshots hold weights up to "
                          f"{np.finfo(np.float32).max:.3g}: set divergence_threshold at most "
                          f"that (got {divergence_threshold:g}), or keep float64 snapshots")
    every = 0 if checkpoint_every is None else _positive("checkpoint_every", checkpoint_every,
                                                         integer=True)
    if every and out is None:
        raise ConfigError("checkpoint_every needs out= (checkpoints are written to the HDF5 file)")
    n_threads = _check_threads(threads)

    if method == "gd":
        if t_end is not None:
            raise ConfigError("t_end is for method='flow'; gradient descent runs for `steps` steps")
        if lr is None or steps is None:
            raise ConfigError("method='gd' needs lr and steps")
    else:
        if momentum:
            raise ConfigError("momentum is for method='gd'; gradient flow has none")
        if (lr is None) != (steps is None):
            raise ConfigError("method='flow' takes lr and steps together (t_end = lr * steps), "
                              "or t_end alone")
        if lr is not None and t_end is not None:
            raise ConfigError("method='flow': give either t_end, or lr and steps, not both")
        if lr is None and t_end is None:
            raise ConfigError("method='flow' needs t_end (or lr and steps)")
    if lr is not None:
        lrs = _resolve_lr(lr, n_runs)
        steps = _positive("steps", steps, integer=True)
        if steps > _MAX_STEPS:
            raise ConfigError(f"steps must be at most 2**53 (t = lr * step must count every "
                              f"step), got {steps}")
        with np.errstate(over="ignore"):
            t_ends = lrs * steps
        if not np.isfinite(t_ends).all():
            raise ConfigError(f"lr * steps overflows (lr up to {lrs.max():g}, steps={steps})")
    else:
        if record_every != 1:
            raise ConfigError("record_every counts steps; for a flow run given by t_end use "
                              "record= (times) or n_records")
        lrs = np.full(n_runs, math.nan)
        steps = 0
        t_ends = np.full(n_runs, _positive("t_end", t_end))
    # n_records sets the number of points of record="log" and of a flow run given by t_end;
    # elsewhere it would be silently ignored
    if n_records_given and not (isinstance(record, str) or (method == "flow" and lr is None
                                                             and record is None)):
        raise ConfigError("n_records is for record='log' and for a flow run given by t_end; "
                          "gradient descent saves every record_every steps, or at record=")
    if _explicit(record):
        record = _save_points(record)
    if record is None and steps // record_every > _MAX_SAVE_POINTS:
        raise ConfigError(f"steps={steps} with record_every={record_every} makes more than "
                          f"{_MAX_SAVE_POINTS} save points; record less often")

    # ---- engine and weights (validated before anything is written)
    eng = GradientEngine.for_data(net, data, engine)
    # weights, velocities and engine states of every run of the batch
    state = eng.plan.state_size if eng.plan is not None else eng.n_params
    _refuse_if_no_room(n_runs * (2 * eng.n_params + state) * 8,
                       "split the batch into several simulate calls", f"{n_runs} runs")
    W = eng.pack_many(runs_w, names)
    V = np.zeros(W.shape)  # calloc: pages untouched unless momentum uses them
    quantities, q_shapes = _check_quantities(quantities, eng, W[0])
    plan = _Plan(method=method, names=names, lr=lrs, steps=int(steps), t_end=t_ends,
                 record=record, record_every=record_every, n_records=n_records,
                 momentum=momentum, weight_decay=weight_decay, engine=eng.engine,
                 svals=bool(svals), save_weights=bool(save_weights), weights_dtype=weights_dtype,
                 quantity_shapes=q_shapes, checkpoint_every=every, rtol=rtol, atol=atol,
                 divergence_threshold=divergence_threshold, max_steps=max_steps)

    if not in_memory and out is None:
        raise ConfigError("in_memory=False needs out=: the rows must go to a file")
    writer = None
    rec = _Recorder(eng, plan, quantities, None, keep=bool(in_memory))
    if in_memory:
        _check_room(plan, rec, streamed=out is not None)
    if out is not None:
        from . import store

        writer = store.TrajectoryWriter(out, _run_specs(plan, rec, data),
                                        network_json=net.to_json(), config=config, seed=seed,
                                        compression=compression)
        rec.writer = writer
    runs = [_RunState(name, i) for i, name in enumerate(names)]
    _execute(eng, plan, runs, W, V, rec, writer, n_threads, progress)
    # one run owns all of W: its final weights are views of it, not copies (a batch copies
    # each run's, so that a trajectory kept alone does not hold the whole batch in memory)
    if in_memory:
        result = [_trajectory(plan, rec, r, W[r.index], "complete", copy=n_runs > 1)
                  for r in runs]
    else:
        # (the writer's path: absolute, the caller may have changed directory meanwhile)
        result = [_load_trajectory(writer.path, r.name, weights_in_file=True,
                                   file_id=writer.file_id) for r in runs]
    return result if batch else result[0]


def _check_room(plan: _Plan, rec: _Recorder, streamed: bool) -> None:
    """ConfigError if the rows kept in memory would not fit in the memory available now."""
    need = sum(len(times) for times in plan.save_times) * rec.row_bytes
    hint = ("pass in_memory=False to keep them in the file only" if streamed else
            "pass out=<file.h5> and in_memory=False to keep them in the file only")
    _refuse_if_no_room(need, f"{hint}, or record fewer points (record_every, record='log', "
                             "save_weights=False)")


def _row_bytes(series: Mapping[str, Mapping[str, Any]]) -> int:
    """Bytes of one row of every series, from ``store.run_info``'s {name: {shape, dtype}}."""
    return sum(math.prod(spec["shape"][1:]) * np.dtype(spec["dtype"]).itemsize
               for spec in series.values())


def _run_specs(plan: _Plan, rec: _Recorder, data: Dataset,
               run_index: Sequence[int] | None = None) -> dict[str, Any]:
    """Store specs of the runs; ``run_index`` is each run's place in its simulate call."""
    from . import store

    run_index = list(range(plan.n_runs)) if run_index is None else list(run_index)

    ckpt = (_gd_checkpoint_spec if plan.method == "gd" else _flow_checkpoint_spec)(
        rec.engine.n_params)
    series = rec.series_spec()
    data_hash = _data_hash(data)
    return {name: store.RunSpec(series=series, checkpoint=ckpt,
                                attrs={**plan.run_attrs(i), "data_hash": data_hash,
                                       "run_index": run_index[i]})
            for i, name in enumerate(plan.names)}


def _execute(engine: GradientEngine, plan: _Plan, runs: list[_RunState], W: np.ndarray,
             V: np.ndarray, rec: _Recorder, writer: Any, threads: int,
             progress: bool | None) -> None:
    """Run the driver; on any failure mark the unfinished runs failed in the file, then close it."""
    if plan.method == "gd":
        bar = _Progress(progress, float(plan.steps * len(runs)), "steps")
    else:
        bar = _Progress(progress, float(np.sum(plan.t_end[[r.index for r in runs]])), "")
    rec.threads = threads
    try:
        with _thread_limits(threads, len(runs)), engine.reusing_memory():
            if plan.method == "gd":
                _drive_gd(engine, plan, runs, W, V, rec, writer, bar)
            else:
                _drive_flow(engine, plan, runs, W, rec, writer, bar)
    except BaseException as exc:
        if writer is not None:
            culprit = getattr(exc, "run", None) if isinstance(exc, DivergenceError) else None
            for r in runs:
                try:
                    rec.send(r)
                except (FastraceError, OSError, RuntimeError, ValueError) as second:
                    exc.add_note(f"also failed to write the last rows of run {r.name!r}: {second}")
                if r.done:
                    continue
                if culprit == r.name:
                    status = (f"{DIVERGED} at step {exc.step}: "  # type: ignore[attr-defined]
                              f"{exc.quantity} = {exc.value:.4g}")  # type: ignore[attr-defined]
                elif culprit is not None:
                    status = f"failed: stopped because run {culprit!r} diverged"
                else:
                    status = f"failed: {type(exc).__name__}: {exc}"
                try:
                    writer.set_status(r.name, status)
                except (FastraceError, OSError, RuntimeError, ValueError) as second:
                    exc.add_note(f"also failed to record the status of run {r.name!r}: {second}")
            try:
                writer.close()
            except (FastraceError, OSError, RuntimeError, ValueError) as second:
                exc.add_note(f"also failed to close the output file: {second}")
        raise
    finally:
        bar.close(sum(r.pos for r in runs) if plan.method == "gd" else sum(r.t for r in runs))
    if writer is not None:
        for r in runs:
            rec.send(r)
        writer.close()


def resume(path: str | os.PathLike, net: Network, data: Dataset, run: str | None = None,
           threads: int | None = None, *, quantities: Mapping[str, Quantity] | None = None,
           progress: bool | None = None, in_memory: bool = True) -> Trajectory | list[Trajectory]:
    """Continue the runs of ``path`` (from ``simulate(..., out=path)``) from their checkpoints.

    The settings (method, lr, steps, schedule, ...) come from the file; ``net`` and ``data``
    must be the ones the run was started with (checked), and ``quantities`` the same callables
    if the run recorded any. The result equals, bit for bit, what the uninterrupted run gives.
    With ``run=None`` every simulation run in the file is resumed, and a list is returned when
    there are several. Complete runs are only read back; a diverged run raises StoreError (the
    runs of its batch that it stopped are resumed one by one, by name).
    ``in_memory=False``: the returned trajectories read their weight snapshots from the file
    when indexed, as ``simulate(..., in_memory=False)`` does.
    """
    from . import store

    if not isinstance(net, Network):
        raise NetworkError(f"net must be a fastrace.Network, got {type(net).__name__}")
    if not isinstance(data, Dataset):
        raise DataError(f"data must be a fastrace.Dataset, got {type(data).__name__}")
    n_threads = _check_threads(threads)
    info = store.run_info(path)["runs"]
    if run is None:
        names = sorted((r for r, i in info.items() if i["attrs"].get("kind") == "simulation"),
                       key=lambda r: info[r]["attrs"].get("run_index", 0))
        if not names:
            raise StoreError(f"{os.fspath(path)} holds no simulation runs to resume")
    elif run not in info:
        raise StoreError(f"{os.fspath(path)} has no run {run!r}; its runs are {list(info)}")
    else:
        names = [run]
    for name in names:
        status, attrs = info[name]["status"], info[name]["attrs"]
        if status.startswith(DIVERGED):
            others = [n for n in names if n != name]
            hint = (f" (the other runs can be resumed by name: run={others[0]!r}, ...)"
                    if run is None and others else "")
            raise StoreError(f"run {name!r} in {os.fspath(path)} {status[len('failed: '):]}; "
                             f"it cannot be resumed: start it again with other settings{hint}")
        if attrs.get("kind") != "simulation":
            raise StoreError(f"run {name!r} in {os.fspath(path)} is not a simulation run")
        if attrs.get("data_hash") != _data_hash(data):
            raise DataError(f"run {name!r}: the data differ from the data the run was started "
                            "with")
    if in_memory:  # every row of the runs, once complete, is read back at the end
        plan = _Plan.from_attrs(names, [info[n]["attrs"] for n in names])
        need = sum(len(plan.save_times[k]) * _row_bytes(info[n]["series"])
                   for k, n in enumerate(names))
        _refuse_if_no_room(need, "pass in_memory=False to read the weight snapshots from the "
                                 "file when indexed")
    todo = [n for n in names if info[n]["status"] != "complete"]
    file_id = None
    if todo:
        file_id = _resume_runs(path, net, data, todo, [info[n]["attrs"] for n in todo],
                               n_threads, quantities, progress)
    results = [_load_trajectory(path, name, weights_in_file=not in_memory, file_id=file_id)
               for name in names]
    return results[0] if len(results) == 1 else results


def _resume_runs(path: Any, net: Network, data: Dataset, names: list[str],
                 attrs: list[dict[str, Any]], threads: int,
                 quantities: Mapping[str, Quantity] | None, progress: bool | None) -> str:
    """Resume the runs ``names`` of the file at ``path``; the file id of the file written."""
    from . import store

    plan = _Plan.from_attrs(names, attrs)
    network_json, _, _ = _read_extras(path, names[0])
    try:
        same = Network.from_json(network_json).signature() == net.signature()
    except (ValueError, KeyError, TypeError, NetworkError):
        same = False
    if not same:
        raise NetworkError(f"{os.fspath(path)}: the network differs from the one the runs "
                           "were started with")
    engine = GradientEngine.for_data(net, data, plan.engine)
    given = dict(quantities or {})
    if set(given) != set(plan.quantity_shapes):
        raise ConfigError(f"the runs recorded quantities {sorted(plan.quantity_shapes)}; pass "
                          f"the same callables to resume (got {sorted(given)})")
    rec = _Recorder(engine, plan, given, None, keep=False)
    specs = _run_specs(plan, rec, data, [int(a.get("run_index", 0)) for a in attrs])
    writer = store.TrajectoryWriter(path, specs, network_json=net.to_json(), mode="resume")
    rec.writer = writer
    runs = [_RunState(name, i) for i, name in enumerate(names)]
    W = np.zeros((len(names), engine.n_params))
    V = np.zeros(W.shape)  # calloc: pages untouched unless momentum uses them
    try:
        for r in runs:
            ck = writer.resume_state(r.name)
            if ck is None:
                raise StoreError(f"run {r.name!r} in {os.fspath(path)} has no checkpoint (it was "
                                 "stopped before its first one): start it again")
            state = ck.state
            r.pos = r.last_checkpoint = int(ck.step)
            r.next_save = int(state["next_save"])
            if r.next_save != ck.rows["t"]:
                raise StoreError(f"run {r.name!r}: checkpoint at step {ck.step} expects "
                                 f"{r.next_save} rows, the file kept {ck.rows['t']}")
            W[r.index] = state["w"]
            if plan.method == "gd":
                V[r.index] = state["velocity"]
            else:
                r.t = float(state["t"])
                r.h = float(state["h"])
                r.facold = float(state["facold"])
                r.n_rejected = int(state["n_rejected"])
                r.done = r.t >= plan.t_end[r.index] and r.next_save >= len(
                    plan.save_times[r.index])
    except BaseException as exc:
        for r in runs:
            writer.set_status(r.name, f"failed: {type(exc).__name__}: {exc}")
        writer.close()
        raise
    _execute(engine, plan, runs, W, V, rec, writer, threads, progress)
    return writer.file_id
