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
others still run. A point whose outcome never came back because the sweep was interrupted is
recorded complete when its file (written by this sweep) holds only complete runs. The index
is written before the fan-out (every status "pending"), again as points finish (at most every
``_INDEX_EVERY`` seconds, so a client that dies hard keeps the statuses of the points finished)
and at the end; each write replaces it whole (written beside it and renamed onto it).

The output directory holds one sweep. A directory holding files of another sweep or run where
this one would write (an ``index.h5`` of another experiment, grid or seed; a ``pNNN.h5`` that is
not a point of this sweep or was written by another experiment) is refused with a ConfigError
naming them: nothing is overwritten or mixed in, and nothing is deleted. The same sweep (same
experiment, grid and seed) may be run again into its own directory; it reruns every point. The
index links only the point files this sweep wrote. A sweep holds a lock on
``DIR/.fastrace-sweep.lock`` (``fcntl.flock``; a hidden file left in place) from before it looks
at ``DIR`` until it ends: a second sweep into ``DIR`` meanwhile is refused with a ConfigError
(where there is no ``fcntl``, Windows, sweeps do not lock).

Executors: the default is a local ``ProcessPoolExecutor`` (spawn context); a Dask cluster plugs
in with ``distributed.Client(address).get_executor()``. The workers must see ``DIR`` (a shared
file system on a cluster). When a sweep on a given executor is interrupted, its futures not
started are cancelled; a point running then is recorded as interrupted while it ran (the executor
may still finish its file).

The local pool's workers end when the client process ends (Linux: ``PR_SET_PDEATHSIG``; else a
thread watching the parent), so a killed sweep leaves no workers behind. Run in the main thread,
the sweep handles SIGTERM, SIGHUP and Ctrl-C (SIGINT) itself, unless the caller has a handler of
its own for them: the handler only notes the signal, and the sweep's loop then stops the workers
at once, records the unfinished points as interrupted, writes the index, and ends the process as
the signal does (SIGTERM, SIGHUP) or raises KeyboardInterrupt (Ctrl-C); the workers ignore SIGINT
and SIGHUP then (a terminal sends them to the whole process group), and are started with them
blocked until they ignore them. Run in another thread, the
sweep leaves Ctrl-C to the workers, which it ends at once; seeing them ended by SIGINT, the sweep
records the unfinished points as interrupted, writes the index and raises KeyboardInterrupt.

When a worker process dies (killed by the OOM killer, say), the pool breaks and ends its other
workers: the points finished are kept, the point that was running in the worker that died (one
that had ended before the pool ended the others) is run again in a new pool up to ``_RETRIES``
times and then recorded as failed with how its worker ended, and every other unfinished point is
run again without counting (when no point can be blamed for a death, a sweep whose pools
break ``_RETRIES + 1`` times in a row with no point finishing between fails its unfinished
points). To tell which point a worker runs, each worker writes a note into a
hidden directory of the output directory, ``DIR/.fastrace-running-<client pid>-*/``, removed at
the end of the sweep; one left by a client killed with SIGKILL is removed by the next sweep into
``DIR`` (which holds the lock of ``DIR``, so no live sweep owns it; without locks, once that
client's process is gone).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import datetime
import functools
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no sweep lock
    fcntl = None  # type: ignore[assignment]

from .config import (Experiment, load_experiment, run_experiment,
                     same_experiment)
from .errors import ConfigError, StoreError

INDEX_FORMAT = "fastrace-sweep"
INDEX_VERSION = 1
_THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                     "MKL_NUM_THREADS")
_RETRIES = 2  # runs again of a point whose worker process died (killed by the OOM killer, say)
_POINT_FILE = re.compile(r"p[0-9]+\.h5")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_INDEX_EVERY = 3.0  # seconds: the least time between two writes of the index while points run
_POLL = 0.1  # seconds: how often the loop waiting for points looks for a stop signal
_REGISTRY_PREFIX = ".fastrace-running-"  # + "<client pid>-": the notes of a local pool's workers
_REGISTRY_NAME = re.compile(r"\.fastrace-running-([0-9]+)-.+")
_LOCK_NAME = ".fastrace-sweep.lock"  # in DIR: held (flock) by the sweep writing DIR; never removed


@dataclass
class SweepPoint:
    """One grid point: its ``name`` (``pNNN``), grid ``values``, output ``path``, ``status``
    ("pending", "complete" or "failed: <reason>"), wall ``seconds`` in the worker and the
    ``summary`` of ``run_experiment`` (None when it failed, or when its file was found complete
after the sweep was interrupted); ``written`` tells whether this
    sweep wrote the point's file (the index links it then)."""

    name: str
    values: dict[str, Any]
    path: Path
    status: str = "pending"
    seconds: float = float("nan")
    summary: dict[str, Any] | None = None
    written: bool = False

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

    @property
    def written(self) -> list[SweepPoint]:
        """The points whose file this sweep wrote (complete, or failed part way)."""
        return [p for p in self.points if p.written]

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
_REGISTRY: str | None = None  # in a local pool's worker: the directory of its running notes


def limit_threads() -> None:
    """Make this process single-threaded for numba and BLAS (a sweep worker)."""
    if "numba" not in sys.modules:  # NUMBA_NUM_THREADS is read when numba is imported
        for var in _THREAD_VARIABLES:
            os.environ[var] = "1"
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(1)
    threadpool_limits(limits=1)


def _init_worker(parent: int, registry: str, dispositions: dict[int, Any],
                 blocked: Sequence[int] = ()) -> None:
    """Initializer of a local pool's workers: end with the client (process ``parent``), take the
    signal ``dispositions`` the client chose (see _worker_signals), then unblock the signals
    ``blocked`` while the client started it (see _blocking), note each point run in ``registry``
    (none when "") and run single-threaded."""
    global _REGISTRY
    _end_with_parent(parent)
    for signum, handler in dispositions.items():
        signal.signal(signum, handler)
    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    _REGISTRY = registry or None
    limit_threads()


def _worker_signals(handled: Sequence[int]) -> dict[int, Any]:
    """The signal dispositions of a local pool's workers when the client handles the signals
    ``handled`` (see _Run.handle_signals). A terminal sends Ctrl-C (SIGINT) and a hang-up
    (SIGHUP) to the whole process group, workers included. The workers ignore those the client
    handles: the client stops them. Otherwise Ctrl-C ends a worker at once (unless the client
    ignores it too), and the client, seeing its workers ended by SIGINT, stops (_run_locally)."""
    if signal.SIGINT in handled or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        dispositions = {signal.SIGINT: signal.SIG_IGN}
    else:
        dispositions = {signal.SIGINT: signal.SIG_DFL}
    hangup = getattr(signal, "SIGHUP", None)  # (Windows has none)
    if hangup is not None and hangup in handled:
        dispositions[hangup] = signal.SIG_IGN
    return dispositions


def _end_with_parent(parent: int) -> None:
    """End this process when process ``parent`` ends, however it ends (SIGKILL included)."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
                               ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
        except (OSError, AttributeError):  # no libc prctl: the watcher thread below
            armed = False
    if os.getppid() != parent:  # the parent ended before the death signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="fastrace-watch-parent",
                         daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _note_running(path: str) -> Path | None:
    """In a local pool's worker, write the note ``<registry>/<pid>`` holding ``path``: the point
    this worker runs. The note stays when the worker dies, and tells the client which point was
    running in it."""
    if _REGISTRY is None:
        return None
    note = Path(_REGISTRY) / str(os.getpid())
    tmp = note.with_name(f"{note.name}.tmp")
    try:
        tmp.write_text(path, encoding="utf-8")
        os.replace(tmp, note)
    except OSError:  # the client then cannot tell which point a dead worker ran; see _run_locally
        return None
    return note


def run_point(text: str, path: str) -> dict[str, Any]:
    """Run one point's experiment (TOML ``text``) into ``path``, single-threaded. Never raises:
    returns {"status", "seconds", "summary"} with status "failed: <reason>" on any error."""
    start = time.perf_counter()
    note = _note_running(path)
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
    finally:
        if note is not None:
            note.unlink(missing_ok=True)
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


class _LocalPool:
    """A spawn-context process pool for one round of a local sweep. Its workers end with this
    process, take the signal ``dispositions`` and note the point each runs in ``registry`` (a
    file per worker pid), so that when the pool breaks the client can tell which point was
    running in the worker that died."""

    def __init__(self, workers: int, registry: Path | None, dispositions: dict[int, Any]):
        self.registry = registry
        # the signals the workers ignore, blocked while they start (they inherit the mask): a
        # Ctrl-C then cannot end one before it ignores SIGINT (a KeyboardInterrupt traceback)
        self.blocked = [signum for signum, handler in dispositions.items()
                        if handler == signal.SIG_IGN] if hasattr(signal, "pthread_sigmask") else []
        self.executor = cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(), "" if registry is None else str(registry), dispositions,
                      self.blocked))
        # {pid: multiprocessing.Process} of the workers, filled by the pool as it starts them: a
        # private attribute of ProcessPoolExecutor (3.11 to 3.13), read for how each worker ended
        # and to stop them at once (the pool itself only waits for the running points to finish)
        processes = getattr(self.executor, "_processes", None)
        self.processes: dict[int, Any] = processes if isinstance(processes, dict) else {}
        self.watched: set[int] = set()  # the workers whose terminate() is watched
        self.ended_by_pool: set[int] = set()  # the workers terminated while they still ran

    def watch(self) -> None:
        """Watch the workers started since the last call. A broken pool terminates all its
        workers once it has seen one of them end (``Process.terminate``, SIGTERM): note those
        still running then, which the pool ended itself (see died)."""
        for pid, process in list(self.processes.items()):
            if pid not in self.watched:
                self.watched.add(pid)
                process.terminate = functools.partial(self._terminate, pid, process,
                                                      process.terminate)

    def _terminate(self, pid: int, process: Any, terminate: Any) -> None:
        try:  # the sentinel is ready once the process has ended (what the pool waits on)
            ended = bool(multiprocessing.connection.wait([process.sentinel], timeout=0))
        except (OSError, ValueError):  # cannot tell: counted as ended by the pool
            ended = False
        if not ended:
            self.ended_by_pool.add(pid)
        terminate()

    def died(self, codes: Mapping[int, int | None]) -> dict[int, int | None]:
        """Of the workers' exit ``codes``, those of workers that died of themselves (killed from
        outside, the OOM killer, a crash), not ended normally or by the pool. A worker not
        watched and ended by SIGTERM may have been ended by the pool: it is left out."""
        died = {}
        for pid, code in codes.items():
            if code in (0, None) or pid in self.ended_by_pool:
                continue
            if pid not in self.watched and code == -signal.SIGTERM:
                continue
            died[pid] = code
        return died

    def close(self) -> tuple[dict[int, int | None], dict[int, str]]:
        """Shut the pool down; return the exit code of each worker (negative: the signal that
        killed it) and {pid: point file} of the points running in workers that died."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        codes = {pid: p.exitcode for pid, p in list(self.processes.items())}
        return codes, self._take_notes()

    def stop(self) -> None:
        """End the workers now (their running points are abandoned) and shut the pool down."""
        workers = list(self.processes.values())
        for p in workers:
            if p.exitcode is None:
                p.terminate()
        for p in workers:
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self._take_notes()

    def _take_notes(self) -> dict[int, str]:
        """{worker pid: point file} of the notes in the registry (left by workers that ended
        while running a point), removing them. Empty when the registry is gone (removed by hand,
        say): which point a dead worker ran cannot be told then."""
        running: dict[int, str] = {}
        if self.registry is None:
            return running
        try:
            notes = list(self.registry.iterdir())
        except OSError:
            return running
        for note in notes:
            try:
                if note.name.isdigit():
                    running[int(note.name)] = note.read_text(encoding="utf-8")
                note.unlink()
            except OSError:
                pass
        return running


def _new_registry(out_dir: Path) -> Path | None:
    """A new hidden directory ``out_dir/.fastrace-running-<pid>-*`` for the notes of the local
    pool's workers (see _note_running); None when it cannot be made."""
    try:
        return Path(tempfile.mkdtemp(prefix=f"{_REGISTRY_PREFIX}{os.getpid()}-", dir=out_dir))
    except OSError:
        return None


def _lock_out_dir(out_dir: Path) -> int | None:
    """Take the lock of the sweep writing ``out_dir``: ``flock`` on ``out_dir/.fastrace-sweep.lock``
    (never removed, so that every sweep locks the same file), held until its descriptor, which
    is returned, is closed. ConfigError when another sweep holds it. None where there is no
    ``fcntl`` (Windows) or the file system has no locks."""
    if fcntl is None:
        return None
    path = out_dir / _LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file in a shared directory: flock needs
        try:                 # only a descriptor, a read-only one will do
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"cannot open the sweep lock {path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot create the sweep lock {path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{out_dir} is being written by another sweep (it holds {path}); "
                          "wait for it to end, or write into another directory") from None
    except OSError:  # a file system without locks: the sweep runs unlocked, as on Windows
        os.close(fd)
        return None
    return fd


def _remove_stale_registries(out_dir: Path, locked: bool) -> None:
    """Remove the note directories (see _new_registry) left in ``out_dir`` by sweeps that no
    longer run (killed with SIGKILL, say): all of them when this sweep holds the lock of
    ``out_dir`` (no other sweep can be running there, whatever its pid namespace), else those
    whose client process is gone."""
    try:
        entries = os.listdir(out_dir)
    except OSError:
        return
    for entry in entries:
        match = _REGISTRY_NAME.fullmatch(entry)
        if match is not None and (locked or not _process_exists(int(match.group(1)))):
            shutil.rmtree(out_dir / entry, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (True when it cannot be told)."""
    if os.name != "posix" or pid <= 0:  # (on Windows, os.kill(pid, 0) would end the process)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _ending(code: int | None) -> str:
    """How a worker process ended, from its exit code."""
    if code is None:
        return "ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        kill = getattr(signal, "SIGKILL", None)  # (Windows has none)
        return f"was killed by {name}" + (" (out of memory?)" if -code == kill else "")
    return f"exited with status {code}"


# ============================================================================ running points
class _Terminated(BaseException):
    """SIGTERM or SIGHUP asked a sweep running on its own pool to stop (see _Run)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Run:
    """What the loops of a running sweep share: the outcomes to report and to write into the
    index, and the stop signal received.

    ``handle_signals`` (a sweep on its own pool, in the main thread) makes SIGTERM, SIGHUP and
    SIGINT only note the signal; the loops act on it when they call ``check``, at least every
    _POLL seconds while points run. An exception raised by a handler itself would be lost when
    it lands in code that ignores exceptions (a multiprocessing finalizer, say). The handlers
    stay until the final index is written: a signal then only waits for the write to end."""

    def __init__(self, result: SweepResult, text: str, report: Any, start: float):
        self.result = result
        self.text = text
        self.report = report
        self.start = start
        self.before = {p.name: _file_identity(p.path) for p in result.points}
        self.signum: int | None = None  # the first stop signal received
        self.previous: dict[int, Any] = {}  # {signal handled: the handler it had before}
        self.dirty = False  # points finished since the index was last written
        self.written_at = time.monotonic()

    def handle_signals(self) -> None:
        """Handle SIGTERM, SIGHUP and SIGINT (those with their default handler) by noting them."""
        stops = [(signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)]
        if hasattr(signal, "SIGHUP"):  # (Windows has none)
            stops.append((signal.SIGHUP, signal.SIG_DFL))
        for signum, default in stops:
            if signal.getsignal(signum) == default:
                self.previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def restore_signals(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def check(self) -> None:
        """Raise KeyboardInterrupt (SIGINT) or _Terminated (SIGTERM, SIGHUP) if one came."""
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            raise _Terminated(self.signum)

    def tell(self, point: SweepPoint, line: str) -> None:
        if self.report is not None:
            self.report(f"{point.name}  {_values_text(point.values)}  {line}")

    def finished(self, point: SweepPoint) -> None:
        """``point`` has its outcome: report it, and write the index when it is due."""
        self.tell(point, point.status)
        self.dirty = True
        self.tick()

    def tick(self) -> None:
        """Write the index if points finished since it was written _INDEX_EVERY seconds ago."""
        if self.dirty and time.monotonic() - self.written_at >= _INDEX_EVERY:
            try:
                self.write()
            except StoreError:  # (a full disk, say) tried again later, and at the end
                self.written_at = time.monotonic()

    def write(self) -> None:
        """Write the index as the points are now."""
        for point in self.result.points:
            point.written = _file_identity(point.path) not in (None, self.before[point.name])
        self.result.seconds = time.perf_counter() - self.start
        write_index(self.result, self.text)
        self.dirty = False
        self.written_at = time.monotonic()


def _run_round(executor: cf.Executor, todo: list[tuple[SweepPoint, Experiment]], run: _Run,
               pool: _LocalPool | None = None) -> list[tuple[SweepPoint, Experiment]]:
    """Run ``todo`` on ``executor``, recording each outcome in its point. With ``pool`` (the
    _LocalPool of ``executor``), return the points a broken pool left unfinished; otherwise a
    broken executor fails its unfinished points, and the list returned is empty."""
    futures: dict[cf.Future, tuple[SweepPoint, Experiment]] = {}
    try:
        return _submit_and_wait(executor, todo, run, pool, futures)
    except BaseException as exc:
        if pool is None:  # a given executor keeps running: take back what it has not started
            _cancel(futures, _why(exc))
        raise


def _why(exc: BaseException) -> str:
    """The name of what interrupted a sweep: its signal, or its exception."""
    return signal.Signals(exc.signum).name if isinstance(exc, _Terminated) \
        else type(exc).__name__


def _cancel(futures: Mapping[cf.Future, tuple[SweepPoint, Experiment]], why: str) -> None:
    """On an interrupt, cancel the futures of a given executor not started yet (their points
    stay pending, then recorded interrupted); record those finished meanwhile, and those still
    running (the executor may still finish them: the index cannot tell)."""
    for future, (point, _) in futures.items():
        if point.status != "pending" or future.cancel():
            continue
        if future.done():
            _record(point, future)
        else:
            point.status = (f"failed: interrupted ({why}) while the point ran; the executor may "
                            "still finish its file")


def _record(point: SweepPoint, future: cf.Future) -> None:
    """Record the outcome of the finished ``future`` of ``point``."""
    try:
        outcome = future.result()
    except Exception as exc:  # noqa: BLE001 - a crashed worker fails only its point
        point.status = _failure(exc)
    else:
        point.status = outcome["status"]
        point.seconds = float(outcome["seconds"])
        point.summary = outcome["summary"]


def _submit_and_wait(executor: cf.Executor, todo: list[tuple[SweepPoint, Experiment]], run: _Run,
                     pool: _LocalPool | None, futures: dict
                     ) -> list[tuple[SweepPoint, Experiment]]:
    """The body of _run_round; ``futures`` gets {future: (point, experiment)} as submitted."""
    unfinished = []
    done: queue.SimpleQueue = queue.SimpleQueue()  # the futures as they finish
    with _blocking([] if pool is None else pool.blocked):  # (a local pool starts its workers)
        _submit(executor, todo, run, pool, futures, unfinished, done)
    remaining = len(futures)
    while remaining:
        run.check()
        try:
            future = done.get(timeout=_POLL)
        except queue.Empty:
            run.tick()
            continue
        remaining -= 1
        point, point_exp = futures[future]
        if pool is not None and isinstance(future.exception(), BrokenProcessPool):
            unfinished.append((point, point_exp))  # run again in a new pool (see _run_locally)
            continue
        _record(point, future)
        run.finished(point)
    return unfinished


@contextlib.contextmanager
def _blocking(signals: Sequence[int]):
    """Block ``signals`` in this thread meanwhile (a signal sent then waits, and is handled
    after); the processes started meanwhile inherit the mask."""
    if not signals:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _submit(executor: cf.Executor, todo: list[tuple[SweepPoint, Experiment]], run: _Run,
            pool: _LocalPool | None, futures: dict, unfinished: list,
            done: queue.SimpleQueue) -> None:
    """Submit ``todo``: each future into ``futures`` and, when it finishes, into ``done``; the
    points a broken local pool refused into ``unfinished``."""
    for point, point_exp in todo:
        run.check()
        try:
            future = executor.submit(run_point, point_exp.text, str(point.path))
        except Exception as exc:  # noqa: BLE001 - e.g. a broken or shut-down executor
            if pool is not None and isinstance(exc, BrokenProcessPool):
                unfinished.append((point, point_exp))
            else:
                point.status = _failure(exc)
            continue
        futures[future] = (point, point_exp)
        if pool is not None:
            pool.watch()  # the workers start as the points are submitted
        future.add_done_callback(done.put)


def _run_locally(todo: list[tuple[SweepPoint, Experiment]], workers: int, run: _Run) -> None:
    """Run ``todo`` on local process pools until every point has an outcome.

    When a worker process dies the pool breaks, ends its other workers, and hands back every
    point not finished then (finished points keep their outcome and file). The point that was
    running in the worker that died is run again in a new pool, after the others, up to
    ``_RETRIES`` times, then recorded as failed with how its worker ended; the points running in
    the workers the pool ended and those not started are run again without counting. Workers
    ended by SIGINT (Ctrl-C, see _worker_signals) raise KeyboardInterrupt.
    """
    deaths: dict[str, list[str]] = {}  # point name -> how its worker ended, per attempt
    barren = 0  # broken pools in a row with no point to blame and no point finished
    registry = _new_registry(run.result.out_dir)
    dispositions = _worker_signals(list(run.previous))
    try:
        while todo:
            run.check()
            pool = _LocalPool(min(workers, len(todo)), registry, dispositions)
            try:
                unfinished = _run_round(pool.executor, todo, run, pool)
                codes, running = pool.close()
            except BaseException:  # a stop signal (see _Run), an error of the sweep's own
                pool.stop()
                raise
            run.check()  # a stop signal, not a dead worker, may have broken the pool
            if any(code == -signal.SIGINT for code in codes.values()):
                raise KeyboardInterrupt  # Ctrl-C ended the workers
            if not unfinished:
                return
            by_path = {str(point.path): point for point, _ in unfinished}
            culprits = set()
            for pid, code in pool.died(codes).items():
                point = by_path.get(running.get(pid, ""))
                if point is not None:
                    culprits.add(point.name)
                    deaths.setdefault(point.name, []).append(_ending(code))
            if len(unfinished) < len(todo):  # points finished in this round: the sweep goes on
                barren = 0
            if not culprits:
                barren += 1
                if barren > _RETRIES:
                    endings = ", ".join(sorted({_ending(c) for c in codes.values()}))
                    for point, _ in unfinished:
                        point.status = (f"failed: worker died: the sweep's worker processes "
                                        f"died ({endings}) {barren} times in a row with no point "
                                        "running in them and none finishing; not run again")
                        run.finished(point)
                    return
            todo, again = [], []
            for point, point_exp in unfinished:
                if point.name not in culprits:
                    todo.append((point, point_exp))
                    continue
                endings = deaths[point.name]
                if len(endings) > _RETRIES:
                    how = endings[0] if len(set(endings)) == 1 else "ended: " + "; ".join(endings)
                    point.status = (f"failed: worker died: the worker process running "
                                    f"{point.name} {how} in each of its {len(endings)} attempts; "
                                    "not run again")
                    run.finished(point)
                else:
                    again.append((point, point_exp))
                    run.tell(point, f"its worker process {endings[-1]}; running it again "
                                    f"(attempt {len(endings) + 1} of {_RETRIES + 1})")
            todo += again
    finally:
        if registry is not None:
            shutil.rmtree(registry, ignore_errors=True)


# ============================================================================ the sweep
def sweep(experiment: Experiment | str | os.PathLike, grid: Mapping[str, Sequence[Any]] | None = None,
          out_dir: str | os.PathLike = ".", executor: cf.Executor | None = None,
          seed: int | None = None, *, workers: int | None = None, warm: bool = True,
          report: Any = None) -> SweepResult:
    """Run ``experiment`` at every point of ``grid`` and write ``out_dir/index.h5``.

    experiment : an Experiment, or a TOML path/text (a sweep file: its ``[sweep]`` table is the
        default grid and its ``sweep.seed`` the default seed).
    grid : {dotted key: list of values}; one task per point of the cartesian product.
    out_dir : the directory of the point files and the index; ConfigError when it holds files
        of another sweep or run where this sweep would write (the same sweep may run again).
    executor : any ``concurrent.futures.Executor`` (e.g. ``distributed.Client(addr)
        .get_executor()``); default a local spawn-context process pool of ``workers`` processes
        (default: one per core, at most one per point), shut down at the end, whose workers
        end with this process; a point whose worker process dies is run again in a new pool (up
        to twice). A given executor is left running; when the sweep is interrupted (Ctrl-C, an
        error of its own) its points not started are cancelled and recorded interrupted, and
        those running then are recorded so (the executor may still finish them).
    seed : root of the points' child seeds (``SeedSequence(seed).spawn``); default the sweep
        file's ``sweep.seed`` or 0.
    report : optional callable receiving a line per finished point.

    With the local pool, in the main thread: SIGTERM, SIGHUP and Ctrl-C (those the caller has
    no handler of its own for) stop the workers, record the unfinished points as interrupted and
    write the index; then SIGTERM and SIGHUP end the process as they do, and Ctrl-C raises
    KeyboardInterrupt. In another thread, Ctrl-C ends the workers and the sweep does the same.
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
    lock = _lock_out_dir(out)
    try:
        _check_out_dir(result, exp, experiments)
        _remove_stale_registries(out, locked=lock is not None)
        return _sweep_locked(result, exp, experiments, executor, workers, warm, report, start)
    finally:
        if lock is not None:
            os.close(lock)  # (ends the lock)


def _sweep_locked(result: SweepResult, exp: Experiment, experiments: list[Experiment],
                  executor: cf.Executor | None, workers: int | None, warm: bool, report: Any,
                  start: float) -> SweepResult:
    """The rest of ``sweep``, run while it holds the lock of the output directory."""
    points = result.points
    # the experiment as TOML text, to tell the same sweep when it runs again (an Experiment built
    # in Python has no text of its own)
    base_text = exp.text or exp.to_toml()
    write_index(result, base_text)

    run = _Run(result, base_text, report, start)
    todo = list(zip(points, experiments))
    own = executor is None
    try:
        if own and threading.current_thread() is threading.main_thread():
            run.handle_signals()  # before warming: a signal then is noted, and acted on after it
        try:
            try:
                if warm:
                    _warm(experiments[0])
                if own:
                    _run_locally(todo, min(workers or os.cpu_count() or 1, len(points)), run)
                else:
                    _run_round(executor, todo, run)
            except BaseException as exc:
                why = _why(exc)
                for point, point_exp in zip(points, experiments):
                    if point.status != "pending":
                        continue
                    if _complete_file(point.path, run.before[point.name], point_exp):
                        point.status = "complete"  # finished just before its worker was stopped
                    else:
                        point.status = f"failed: interrupted ({why}) before the point finished"
                raise
            finally:
                run.write()  # with the signal handlers in place: a signal waits for it to end
        finally:
            run.restore_signals()
        run.check()  # a signal that came after the last point finished
    except _Terminated as exc:
        # the workers are stopped and the index written: end as the signal would have ended us
        signal.raise_signal(exc.signum)
        raise
    return result


def _values_text(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, mtime) of the regular file at ``path``; None when there is none. A point
    file is written beside its path and renamed onto it, so a new file has a new identity."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _complete_file(path: Path, before: tuple[int, int, int] | None,
                   point_exp: Experiment) -> bool:
    """Whether the file at ``path`` is new (its identity is not ``before``, what was there when
    the sweep started) and holds every run of ``point_exp``, complete (its theory too: it is
    added after the runs end): a point that finished though its outcome never came back (its
    worker stopped just after)."""
    from . import store

    if _file_identity(path) in (None, before):
        return False
    try:  # (store's reader also opens a file its killed writer left open, under SWMR)
        runs = store.run_info(path)["runs"]
    except (StoreError, OSError, RuntimeError, KeyError):
        return False
    expected = list(point_exp.run_names) + (["theory"] if point_exp.theory is not None else [])
    return all(name in runs and runs[name]["status"] == "complete" for name in expected)


# ============================================================================ the output directory
def _check_out_dir(result: SweepResult, exp: Experiment, experiments: list[Experiment]) -> None:
    """Raise ConfigError when ``result.out_dir`` holds files of another sweep or run where this
    sweep writes: an index of another sweep, or a ``pNNN.h5`` that is not one of this sweep's
    points (another sweep's, or a point file written by another experiment). Nothing is removed:
    the user chooses. The same sweep run again (its index says so, or its point files do) may
    write into its directory again."""
    problems = []
    same_sweep = False
    if os.path.lexists(result.index):
        reason = _other_sweep(result.index, exp, result.grid, result.seed)
        if reason is None:
            same_sweep = True
        else:
            problems.append(f"index.h5 ({reason})")
    mine = {point.path.name: point_exp for point, point_exp in zip(result.points, experiments)}
    try:
        entries = sorted(os.listdir(result.out_dir))
    except OSError as exc:
        raise ConfigError(f"cannot list output directory {result.out_dir}: {exc}") from None
    for entry in entries:
        if not _POINT_FILE.fullmatch(entry):
            continue  # the user's own files, this sweep's .partial and .lock leftovers
            # and its workers' notes (.fastrace-running-*)
        if entry not in mine:
            problems.append(f"{entry} (not a point of this sweep)")
        elif not same_sweep:
            reason = _other_point(result.out_dir / entry, mine[entry])
            if reason is not None:
                problems.append(f"{entry} ({reason})")
    if problems:
        shown = ", ".join(problems[:4])
        if len(problems) > 4:
            shown += f" and {len(problems) - 4} more"
        raise ConfigError(f"output directory {result.out_dir} holds files of another sweep or "
                          f"run: {shown}; this sweep would overwrite them or mix with them. Run "
                          "it into a new directory, or move those files away")


def _same_experiment(text: str, exp: Experiment) -> bool:
    """Whether the TOML ``text`` is the experiment ``exp`` (its sweep table aside)."""
    try:
        return same_experiment(text, exp)
    except ConfigError:
        return False


def _other_sweep(index: Path, exp: Experiment, grid: Mapping[str, Sequence[Any]],
                 seed: int) -> str | None:
    """Why the file ``index`` is not the index of this sweep; None when it is."""
    import h5py

    if _file_identity(index) is None:
        return "not a regular file"
    try:
        with h5py.File(index, "r", locking=False) as f:
            if f.attrs.get("format") != INDEX_FORMAT:
                return "not a fastrace sweep index"
            text = str(f.attrs.get("experiment", ""))
            stored_grid = json.loads(f.attrs["grid"])
            stored_seed = int(f.attrs["seed"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return f"an unreadable sweep index: {' '.join(str(exc).split())}"
    if list(stored_grid.items()) != list(json.loads(json.dumps(dict(grid))).items()):
        return f"the index of a sweep over another grid, {json.dumps(stored_grid)}"
    if stored_seed != seed:
        return f"the index of a sweep with seed {stored_seed}, not {seed}"
    if not _same_experiment(text, exp):
        return "the index of a sweep of another experiment"
    return None


def _other_point(path: Path, point_exp: Experiment) -> str | None:
    """Why the file at ``path`` is not a point file of ``point_exp``; None when it is."""
    from . import store

    if _file_identity(path) is None:
        return "not a regular file"
    try:  # (store's reader also opens a file its killed writer left open, under SWMR)
        with store._open_read(path) as f:
            text = str(store._plain(f.attrs.get("config", "")))
    except (StoreError, OSError, RuntimeError):
        return "not a readable fastrace file"
    if not _same_experiment(text, point_exp):
        return "written by another experiment"
    return None


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
    """Write ``result.index`` (replacing it): links to the point files this sweep wrote
    (``SweepPoint.written``) and the table of every point."""
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
                if p.written:  # relative: the index and its points move together
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
            links = f["points"]
            for k, name in enumerate(names):
                values = {key: grid[key][_position(grid, k, key)] for key in grid}
                written = links.get(name, getlink=True) is not None
                result.points.append(SweepPoint(name, values, path.parent / files[k], status[k],
                                                float(seconds[k]), written=written))
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
