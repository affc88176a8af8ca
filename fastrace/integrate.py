"""Integrate race systems: adaptive Dormand–Prince 5(4), the Rosenbrock method RODAS3, the two
combined by automatic stiffness switching, or the exact gradient-descent map, over the C core
(``fastrace._race``) or numba kernels.

One call integrates every mode of a :class:`~fastrace.system.RaceSystem`, optionally for many
parameter sets at once (different initial weights ``b0``, ``s`` values or per-edge ``rate``
factors): the n_sets x n_modes systems are independent and each has its own step size and
error control.  Results are time-first: ``RaceSolution.b`` is a transposed view of the
system-major (n_sys, n_saved, n_edges) array the kernels write (each system's trajectory is
contiguous there; ``np.ascontiguousarray(sol.b)`` makes a time-first copy if one is needed).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ._memory import refuse_if_no_room as _refuse_if_no_room
from .data import real_array
from .errors import ConfigError, DataError, DivergenceError, IntegrationError
from .system import RaceSystem, _writable

try:
    from . import _race
except ImportError:  # pragma: no cover - only in an unbuilt source tree
    _race = None

__all__ = ["RaceSolution", "integrate_system", "STATUS_MESSAGES"]

METHODS = ("dopri5", "rosenbrock", "auto", "gd")
_KERNELS = {"dopri5": "dopri5", "rosenbrock": "rodas3", "auto": "auto"}
BACKENDS = ("auto", "numba", "c")
#: most threads one call of the C core starts
C_MAX_THREADS = 64
# Fresh outputs at least this large are filled with NaN before the numba kernels write them,
# as the C core does (csrc/_race.c, PREFILL_BYTES): one sequential first touch of gigabytes of
# new memory costs far less, and varies far less, than the kernel threads faulting it in.
_PREFILL_BYTES = 1 << 24
#: status codes of the integrators (csrc/race.h ``enum race_status``)
STATUS_MESSAGES = {
    0: "ok",
    1: "maximum number of steps reached",
    2: "step size fell below round-off",
    3: "state or derivative became inf/NaN",
    4: "invalid arguments",
}


@dataclass(frozen=True, eq=False, init=False)
class RaceSolution:
    """Result of :func:`integrate_system`.

    Shapes use S = (n_modes,) for a single parameter set and S = (n_sets, n_modes) for a batch:
    - ``t`` (n_saved,): saved times (gradient descent: step index times ``lr``);
    - ``b`` (n_saved, *S, n_edges): edge strengths, time-first;
    - ``s`` (*S, n_paths): the s values used;
    - ``events`` (*S, n_paths): first time each path strength crossed its threshold, NaN when
      never (or when no threshold was set); None when no events were asked for;
    - ``status`` (*S,): 0 ok, else a key of :data:`STATUS_MESSAGES`;
    - ``n_steps``, ``n_rejected`` (*S,): accepted and rejected steps.
    """

    system: RaceSystem
    t: np.ndarray
    b: np.ndarray
    s: np.ndarray
    events: np.ndarray | None
    thresholds: np.ndarray | None
    status: np.ndarray
    n_steps: np.ndarray
    n_rejected: np.ndarray
    method: str
    backend: str

    def __init__(self, system: RaceSystem, t: np.ndarray, b: np.ndarray, s: np.ndarray,
                 events: np.ndarray | None, thresholds: np.ndarray | None, status: np.ndarray,
                 n_steps: np.ndarray, n_rejected: np.ndarray, method: str,
                 backend: str) -> None:
        # what the generated __init__ of a frozen dataclass does, without its one
        # object.__setattr__ call per field (~1 µs per call, next to ~18 µs in the C core for
        # one system of the benchmark)
        fields = self.__dict__
        fields["system"] = system
        fields["t"] = t
        fields["b"] = b
        fields["s"] = s
        fields["events"] = events
        fields["thresholds"] = thresholds
        fields["status"] = status
        fields["n_steps"] = n_steps
        fields["n_rejected"] = n_rejected
        fields["method"] = method
        fields["backend"] = backend

    @property
    def batched(self) -> bool:
        """True when the solution has a parameter-set axis."""
        return self.b.ndim == 4

    @property
    def ok(self) -> bool:
        """True when every system reached its end."""
        return not self.status.any()

    @property
    def path_strengths(self) -> np.ndarray:
        """pi (n_saved, *S, n_paths)."""
        return self.system.path_strengths(self.b)

    @property
    def loss(self) -> np.ndarray:
        """Loss summed over modes (without its constant): (n_saved,) or (n_saved, n_sets)."""
        return self.system.loss(self.b, s=self.s).sum(axis=-1)

    def failures(self) -> list[str]:
        """One line per failed system: its index and what went wrong."""
        lines = []
        for index in zip(*np.nonzero(self.status)):
            code = int(self.status[index])
            where = ", ".join(str(int(i)) for i in index)
            lines.append(f"system ({where}): {STATUS_MESSAGES.get(code, code)} "
                         f"after {int(self.n_steps[index])} steps")
        return lines


def integrate_system(system: RaceSystem, b0: ArrayLike, *, method: str = "auto",
                     t_end: float | None = None, save_at: ArrayLike | None = None,
                     lr: float | None = None, steps: int | None = None, rtol: float = 1e-8,
                     atol: float = 1e-10, max_steps: int = 1_000_000,
                     events: ArrayLike | None = None, backend: str = "auto",
                     threads: int | None = None, s: ArrayLike | None = None,
                     rate: ArrayLike | None = None, h0: float | None = None,
                     hmax: float | None = None, check: bool = True,
                     out: np.ndarray | None = None) -> RaceSolution:
    """Integrate every mode of ``system`` from ``b0`` at t = 0.

    Methods:
    - ``"dopri5"``: adaptive Dormand–Prince 5(4), dense output of order 4 at ``save_at``.
    - ``"rosenbrock"``: RODAS3 (stiffly accurate, L-stable, order 3) with the analytic
      Jacobian and dense output of order 3.
    - ``"auto"`` (default): dopri5 until Hairer's stiffness test fires, then rosenbrock to the
      end.  Race systems turn stiff once a mode is learnt (the step of an explicit method is
      then capped by stability, not accuracy), so for long runs this is by far the cheapest.
    - ``"gd"``: the exact gradient-descent map b <- b + lr * rhs(b); step k is time k * lr.

    Parameters
    - b0: (n_edges,) for every mode, (n_modes, n_edges), or (n_sets, n_modes, n_edges).
    - s: optional per-set s, (n_modes, n_paths) or (n_sets, n_modes, n_paths).
    - rate: optional per-set rate factors, (n_edges,) or (n_sets, n_edges) (e.g. a
      learning-rate or scale sweep).  b0, s and rate with a set axis must agree on n_sets.
    - t_end, save_at: ODE methods save at ``save_at`` (increasing times in [0, t_end]; default
      101 evenly spaced times from 0 to t_end); t_end defaults to ``save_at[-1]``.
    - lr, steps (gd): ``steps`` steps of size ``lr`` (or ``steps = t_end / lr``); ``save_at``
      holds step indices (integers) or times that are multiples of lr (floats); default: every
      step.
    - rtol, atol: error tolerances, norm sqrt(mean((err / (atol + rtol |y|))²)) <= 1 per system.
    - max_steps: limit on attempted steps per system; h0, hmax: first and largest step
      (default: Hairer's starting-step algorithm, no limit).
    - events: threshold(s) on path strengths, a scalar or (n_paths,) (NaN: no event); the
      solution's ``events`` holds the first crossing times (ODE methods only).
    - backend: "c" (the compiled core: no JIT wait, batches on threads with several systems
      per thread in interleaved lanes), "numba" (parallel over systems with prange), "auto"
      (C when built).  Both give the same numbers.
    - threads: threads for this call (default: numba's current setting for numba; for C the
      cores available, at most NUMBA_NUM_THREADS when set; the C core never starts more than
      one thread per 64 systems).
    - check: raise IntegrationError (DivergenceError for gd) if any system failed; the
      exception's ``solution`` attribute holds the partial result.
    - out: optional float64 C-contiguous array (*S, n_saved, n_edges) (S as in RaceSolution:
      system-major) the trajectories are written into, e.g. to reuse one buffer across calls
      of a sweep (a fresh multi-GB array costs seconds of page faults); ``sol.b`` is then its
      time-first view.
    """
    if not isinstance(system, RaceSystem):
        raise ConfigError(f"system must be a RaceSystem, got {type(system).__name__}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise ConfigError(f"threads must be a positive int or None, got {threads!r}")
        threads = int(threads)

    # b0 may be handed to the kernels as it is (they only read it) unless the trajectories go
    # into the caller's array, which b0 could overlap
    b0_flat, s_flat, rate_flat, s_used, lead = _flatten_batch(system, b0, s, rate,
                                                              copy_b0=out is not None)
    if backend == "auto":
        backend = "c" if _race is not None else "numba"
    if backend == "c" and _race is None:  # pragma: no cover
        raise ConfigError("backend='c' needs the compiled module fastrace._race; "
                          "reinstall fastrace or use backend='numba'")
    n_edges, n_paths = system.n_edges, system.path_ptr.size - 1
    structure = (system.path_ptr, system.path_edges, system.target_ptr, system.target_paths)

    if method == "gd":
        if events is not None:
            raise ConfigError("events are computed by the ODE methods only (dopri5, rosenbrock, "
                          "auto)")
        # bytes per saved time: record and t, and the trajectories unless they go into out (the
        # C core's gd_map writes a fresh array that is then copied into out)
        row = 16 + (n_edges * 8 * math.prod(lead) if out is None or backend == "c" else 0)
        lr_value, record, t = _gd_schedule(lr, steps, t_end, save_at, row)
        buffer = _out_buffer(out, lead, t.size, n_edges)
        args = structure + (b0_flat, s_flat, system.d, rate_flat, lr_value, record)
        out, status, stats = _run(backend, "gd", args, threads, buffer)
        event_times, thresholds = None, None
    else:
        if lr is not None or steps is not None:
            raise ConfigError("lr and steps apply to method='gd'; give t_end/save_at instead")
        t_end_value, t = _ode_schedule(t_end, save_at)
        if out is None:
            _refuse_if_no_room(t.size * (n_edges * 8 * math.prod(lead)), "save fewer times",
                               "the trajectories")
        rtol, atol = _positive(rtol, "rtol"), _positive(atol, "atol")
        if rtol >= 1.0:
            raise ConfigError(f"rtol={rtol:g} lets each step's error be as large as the state "
                              "itself; use rtol < 1")
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) \
                or not 1 <= max_steps < 2**63:
            raise ConfigError(f"max_steps must be a positive int below 2**63, got {max_steps!r}")
        h0_value = 0.0 if h0 is None else _positive(h0, "h0")
        hmax_value = 0.0 if hmax is None else _positive(hmax, "hmax")
        thresholds = None if events is None else _thresholds(events, n_paths)
        if thresholds is None and backend == "numba":  # one compiled signature: NaN = no event
            thresholds_arg = np.full(n_paths, np.nan)
        else:
            thresholds_arg = thresholds
        buffer = None if out is None else _out_buffer(out, lead, t.size, n_edges)
        args = structure + (b0_flat, s_flat, system.d, rate_flat, 0.0, t_end_value, t, rtol, atol,
                            h0_value, hmax_value, int(max_steps), thresholds_arg)
        out, event_times, status, stats = _run(backend, _KERNELS[method], args, threads, buffer)
        if thresholds is None:
            event_times = None

    # the kernels write system-major (n_sys, n_saved, n_edges); b is its time-first view, and
    # n_steps, n_rejected are columns of stats (n_sys, 3)
    counts = stats.T
    if len(lead) == 1:  # n_sys = n_modes: only the axes move
        b = out.transpose(1, 0, 2)
    else:
        b = out.reshape(lead + (t.size, n_edges)).transpose(2, 0, 1, 3)
        if event_times is not None:
            event_times = event_times.reshape(lead + (n_paths,))
        status = status.reshape(lead)
        counts = counts.reshape((-1,) + lead)
    solution = RaceSolution(system, t, b, s_used, event_times, thresholds, status, counts[0],
                            counts[1], method, backend)
    if check and (status.item(0) != 0 if status.size == 1 else status.any()):
        _raise_failure(solution)
    return solution


# ------------------------------------------------------------------------------------------
# validation helpers


def _out_buffer(out, lead: tuple, n_saved: int, n_edges: int) -> np.ndarray | None:
    """The user's output array as (n_sys, n_saved, n_edges), or None."""
    if out is None:
        return None
    shape = lead + (n_saved, n_edges)
    if not isinstance(out, np.ndarray) or out.dtype != np.float64 or out.shape != shape \
            or not out.flags.c_contiguous or not out.flags.writeable:
        got = (f"{type(out).__name__} {getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}"
               .strip())
        raise ConfigError(f"out must be a writable C-contiguous float64 array of shape {shape} "
                          f"(systems, saved times, edges), got {got}")
    return out.reshape(-1, n_saved, n_edges)


def _positive(value, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a positive number, got {value!r}") from None
    if not (math.isfinite(x) and x > 0.0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    return x


def _value_check(arr: np.ndarray, increasing: bool = False) -> int:
    """0 finite (and strictly increasing when asked), 1 NaN/inf, 2 not increasing; one C
    call for contiguous float64 arrays (numpy's ufuncs cost ~1 µs each on tiny arrays)."""
    code = _race.check_values(arr, increasing) if _race is not None else -1
    if code == -1:
        if not np.isfinite(arr).all():
            return 1
        return 2 if increasing and arr.ndim == 1 and (arr[1:] <= arr[:-1]).any() else 0
    return code


def _finite_input(value, name: str) -> tuple[np.ndarray, bool]:
    """value as a float64 array of finite numbers, and whether the C core can read it as it
    is (C-contiguous and aligned; never when the core is absent)."""
    try:
        arr = real_array(value)  # complex would lose its imaginary part, str would be parsed
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be an array of real numbers: {exc}") from None
    if _value_check(arr):
        raise DataError(f"{name} holds NaN or inf values")
    flags = arr.flags
    return arr, _race is not None and flags.c_contiguous and flags.aligned


def _flatten_batch(system: RaceSystem, b0, s, rate, copy_b0: bool = True):
    """b0, s, rate -> b0 (n_sys, n_edges), s (rows, n_paths), rate (rows, n_edges), the s used
    (*lead, n_paths) and the lead shape, (n_modes,) or (n_sets, n_modes).

    System i = set * n_modes + mode; s and rate rows follow the kernels' ``i % rows`` rule.
    The flat b0 is a fresh array when ``copy_b0``, else possibly a view of the caller's b0; the
    flat s and rate may be views of the caller's arrays either way (the kernels only read them).
    """
    n_modes, n_edges, n_paths = system.s.shape[0], system.n_edges, system.path_ptr.size - 1
    b0_arr, b0_usable = _finite_input(b0, "b0")
    b0_shape = b0_arr.shape
    if s is None and rate is None and (b0_shape == (n_modes, n_edges) or b0_shape == (n_edges,)):
        # the common call: one parameter set, the system's own s and rate
        if b0_usable and not copy_b0 and b0_arr.size == n_modes * n_edges:
            b0_flat = b0_arr.reshape(n_modes, n_edges)
        else:
            b0_flat = np.empty((n_modes, n_edges))
            b0_flat[...] = b0_arr
        return b0_flat, system.s, system.rate.reshape(1, n_edges), system.s, (n_modes,)
    b0_ndim = len(b0_shape)
    if b0_ndim not in (1, 2, 3) or b0_shape[-1] != n_edges or (
            b0_ndim >= 2 and b0_shape[-2] != n_modes):
        raise DataError(f"b0 must have shape ({n_edges},), ({n_modes}, {n_edges}) or "
                        f"(n_sets, {n_modes}, {n_edges}), got {b0_shape}")
    # the number of parameter sets b0, s and rate each give (None: no set axis)
    b0_sets = b0_shape[0] if b0_ndim == 3 else None
    s_sets = rate_sets = None
    if s is not None:
        s_arr, s_usable = _finite_input(s, "s")
        s_shape = s_arr.shape
        if len(s_shape) not in (2, 3) or s_shape[-2:] != (n_modes, n_paths):
            raise DataError(f"s must have shape ({n_modes}, {n_paths}) or (n_sets, {n_modes}, "
                            f"{n_paths}), got {s_shape}")
        if len(s_shape) == 3:
            s_sets = s_shape[0]
    if rate is not None:
        rate_arr, rate_usable = _finite_input(rate, "rate")
        if rate_arr.ndim not in (1, 2) or rate_arr.shape[-1] != n_edges:
            raise DataError(f"rate must have shape ({n_edges},) or (n_sets, {n_edges}), got "
                            f"{rate_arr.shape}")
        if rate_arr.ndim == 2:
            rate_sets = rate_arr.shape[0]
    n_sets = b0_sets if b0_sets is not None else s_sets if s_sets is not None else rate_sets
    if n_sets is None:
        n_sets, lead = 1, (n_modes,)
    else:
        if (s_sets is not None and s_sets != n_sets) or (rate_sets is not None
                                                         and rate_sets != n_sets):
            given = {name: n for name, n in (("b0", b0_sets), ("s", s_sets), ("rate", rate_sets))
                     if n is not None}
            raise DataError(f"b0, s and rate disagree on the number of parameter sets: {given}")
        if n_sets < 1:
            raise DataError("the number of parameter sets must be at least 1")
        lead = (n_sets, n_modes)
    n_sys = n_sets * n_modes

    if b0_usable and not copy_b0 and b0_arr.size == n_sys * n_edges:
        b0_flat = b0_arr.reshape(n_sys, n_edges)  # b0 already holds every system's row
    else:
        b0_flat = np.empty((n_sys, n_edges))
        b0_flat.reshape(n_sets, n_modes, n_edges)[...] = b0_arr
    if s is None:
        s_flat = system.s
    elif s_usable:
        s_flat = s_arr.reshape(-1, n_paths)
    else:  # C-contiguous and aligned (ascontiguousarray keeps a misaligned array)
        s_flat = np.require(s_arr.reshape(-1, n_paths), requirements="CA")
    if s_sets is not None and s_usable:
        s_used = s_arr  # already (n_sets, n_modes, n_paths), and what the kernels read
    elif s_flat.shape[0] == n_sys:
        s_used = s_flat.reshape(lead + (n_paths,))
    else:
        s_used = np.broadcast_to(s_flat.reshape(-1, n_modes, n_paths), (n_sets, n_modes, n_paths))
    if rate is None:
        rate_flat = system.rate.reshape(1, n_edges)
    elif rate_arr.ndim == 1:
        rate_flat = (rate_arr if rate_usable else np.require(rate_arr, requirements="CA")).reshape(
            1, n_edges)
    else:
        rate_flat = np.ascontiguousarray(np.repeat(rate_arr, n_modes, axis=0))
    return b0_flat, s_flat, rate_flat, s_used, lead


def _ode_schedule(t_end, save_at) -> tuple[float, np.ndarray]:
    if save_at is None:
        if t_end is None:
            raise ConfigError("give t_end or save_at")
        t_end_value = _positive(t_end, "t_end")
        return t_end_value, np.linspace(0.0, t_end_value, 101)
    try:  # C-contiguous and aligned, as the C core reads it
        t = np.require(real_array(save_at), requirements="CA")
    except (TypeError, ValueError) as exc:
        raise DataError(f"save_at must be an array of real numbers: {exc}") from None
    if t.ndim != 1 or t.size < 1:
        raise ConfigError(f"save_at must be a non-empty 1-d array of times, got shape {t.shape}")
    code = _value_check(t, True)
    if code == 1:
        raise DataError("save_at holds NaN or inf values")
    if code == 2:
        raise ConfigError("save_at must be strictly increasing")
    t0_value, last = t.item(0), t.item(-1)
    if t0_value < 0.0:
        raise ConfigError(f"save_at must start at t >= 0, got {t0_value}")
    t_end_value = last if t_end is None else _positive(t_end, "t_end")
    if not t_end_value > 0.0:
        raise ConfigError("t_end (or the last save_at time) must be > 0")
    if last > t_end_value:
        raise ConfigError(f"save_at runs past t_end = {t_end_value}: last time {last}")
    return t_end_value, t


def _gd_schedule(lr, steps, t_end, save_at,
                 row_bytes: int = 16) -> tuple[float, np.ndarray, np.ndarray]:
    """-> lr, record steps (int64, increasing), times; refused when ``row_bytes`` per saved
    step would not fit in memory."""
    if lr is None:
        raise ConfigError("method='gd' needs a learning rate lr")
    lr_value = _positive(lr, "lr")

    def to_steps(times: np.ndarray, name: str) -> np.ndarray:
        with np.errstate(over="ignore"):
            k = np.rint(times / lr_value)
        if np.any(np.abs(k) >= 2.0**62):  # (int64, with room for the step count + 1)
            raise ConfigError(f"{name} / lr = {float(np.max(np.abs(k))):g}: too many steps "
                              f"of lr = {lr_value}")
        if np.any(np.abs(times / lr_value - k) > 1e-9 * np.maximum(1.0, np.abs(k))):
            raise ConfigError(f"{name} must be multiples of lr = {lr_value} for method='gd'")
        return k.astype(np.int64)

    n_steps = None
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ConfigError(f"steps must be a non-negative int, got {steps!r}")
        n_steps = int(steps)
    elif t_end is not None:
        n_steps = int(to_steps(np.array([_positive(t_end, "t_end")]), "t_end")[0])
    if save_at is None:
        if n_steps is None:
            raise ConfigError("method='gd' needs steps, t_end or save_at")
        _refuse_if_no_room((n_steps + 1) * row_bytes, "save fewer steps (save_at)",
                           "the trajectories")
        record = np.arange(n_steps + 1, dtype=np.int64)
    else:
        raw = np.asarray(save_at)
        if raw.ndim != 1 or raw.size < 1:
            raise ConfigError(f"save_at must be a non-empty 1-d array, got shape {raw.shape}")
        if np.issubdtype(raw.dtype, np.integer):
            record = raw.astype(np.int64)
        else:
            record = to_steps(_finite_input(raw, "save_at")[0], "save_at times")
        if record[0] < 0 or np.any(np.diff(record) <= 0):
            raise ConfigError("save_at steps must be non-negative and strictly increasing")
        if n_steps is not None and record[-1] > n_steps:
            raise ConfigError(f"save_at runs past the last step {n_steps}")
        _refuse_if_no_room(record.size * row_bytes, "save fewer steps (save_at)",
                           "the trajectories")
    record = np.require(record, dtype=np.int64, requirements="CA")
    return lr_value, record, record * lr_value


def _thresholds(events, n_paths: int) -> np.ndarray | None:
    if events is None:
        return None
    try:
        arr = real_array(events)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"events must be a number or an array of thresholds: {exc}") from None
    if arr.ndim == 0:
        arr = np.full(n_paths, float(arr))
    if arr.shape != (n_paths,):
        raise ConfigError(f"events must be a scalar or have shape ({n_paths},), got {arr.shape}")
    if np.any(np.isinf(arr)):
        raise ConfigError("event thresholds must be finite (NaN disables one)")
    return np.require(arr, requirements="CA")


# ------------------------------------------------------------------------------------------
# backends


@functools.lru_cache(maxsize=1)
def _default_c_threads() -> int:
    """The cores this process may run on, capped by NUMBA_NUM_THREADS when set (one setting
    for both backends, so the C core never oversubscribes what numba was told to use).
    Read once per process, like numba's own setting."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = os.environ.get("NUMBA_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores or 1, int(limit))
    return max(1, min(cores or 1, C_MAX_THREADS))


def _run(backend: str, kernel: str, args: tuple, threads: int | None, out: np.ndarray | None):
    if backend == "c":
        if kernel == "gd":
            result = _race.gd_map(*args)
            if out is not None:
                out[...] = result[0]
                result = (out,) + result[1:]
            return result
        if threads is not None and threads > C_MAX_THREADS:
            raise ConfigError(f"threads={threads}: the C core starts at most {C_MAX_THREADS}")
        n_threads = _default_c_threads() if threads is None else threads
        return getattr(_race, kernel)(*args, n_threads, out)  # threads, out

    import numba

    from ._kernels import race as kernels

    if threads is not None and threads > numba.config.NUMBA_NUM_THREADS:
        raise ConfigError(f"threads={threads} exceeds the {numba.config.NUMBA_NUM_THREADS} "
                          "threads numba was started with (NUMBA_NUM_THREADS)")
    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(threads)
    try:
        n_chunks = 16 * numba.get_num_threads()
        st = kernels.pack_structure(*args[:4])
        # outputs allocated by numpy (huge pages for large arrays), written by the kernel
        n_sys, n_edges = args[4].shape
        n_out = args[9].size if kernel == "gd" else args[10].size
        if out is None:
            out = np.empty((n_sys, n_out, n_edges))
            if out.nbytes >= _PREFILL_BYTES:
                out.fill(np.nan)  # first touch in one pass: see _PREFILL_BYTES
        results = (out,)
        if kernel != "gd":
            results += (np.empty((n_sys, st[0])),)
        results += (np.empty(n_sys, dtype=np.int64), np.zeros((n_sys, 3), dtype=np.int64))
        from .engine import _parallel_guard  # (numba's workqueue layer: one caller at a time)

        with _parallel_guard():
            if kernel == "gd":
                kernels.gd_batch(st, *_writable(args[4:]), n_chunks, *results)
            else:  # one compiled kernel for the three ODE methods
                method = {"dopri5": kernels.DOPRI5, "rodas3": kernels.RODAS3,
                          "auto": kernels.AUTO}
                values = _writable(args[4:])
                kernels.ode_batch(st, *values[:4], method[kernel], *values[4:], n_chunks,
                                  *results)
        return results
    finally:
        numba.set_num_threads(previous)


def _raise_failure(solution: RaceSolution) -> None:
    lines = solution.failures()
    shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
    if solution.method == "gd":
        index = tuple(int(i[0]) for i in np.nonzero(solution.status))
        step = int(solution.n_steps[index])
        err = DivergenceError(f"gradient descent diverged ({len(lines)} of "
                              f"{solution.status.size} systems): {shown}; lower lr",
                              step=step, quantity="b", value=float("inf"))
    else:
        err = IntegrationError(f"integration failed for {len(lines)} of {solution.status.size} "
                               f"systems: {shown}; try method='auto' for stiff runs, a "
                               "larger max_steps, or looser tolerances")
    err.solution = solution
    raise err
