"""HDF5 storage of trajectories: a streaming, kill-safe writer and the matching readers.

Layout of a file (``format_version`` 1)::

    /                      attrs: format="fastrace", format_version, fastrace/numpy/numba/h5py/hdf5
                                  versions, created (ISO 8601), config, seed, command_line
    /network               attrs: json (the network description)
    /<run>/                attrs: the run's own attrs (kind, method, lr, ...), series (JSON list),
                                  status, steps_done (final values, written when the writer closes)
       <series>            (N, *row_shape) chunked, resizable along time: t, loss, svals/<edge>,
                           weights/<edge>, modes/b, ...
       live/status         fixed-length bytes, the status while the run is being written
       live/steps_done     int64
       checkpoint/current  int64: -1 (none), 0 or 1, the slot holding the latest full checkpoint
       checkpoint/slot0/   state/<name> (fixed shapes), step (int64), rows (int64 per series)
       checkpoint/slot1/   the same

How the writer stays safe while it streams:

- Every group, dataset and attribute is created up front (by the writer thread, before it
  writes any row, while the caller starts computing), then SWMR (single writer, multiple
  readers) is switched on. From then on the writer only resizes datasets and writes raw data,
  the only changes SWMR allows; it never creates objects, never touches attributes and never
  writes variable-length data. SWMR orders metadata flushes so the file on disk is always
  consistent: a process killed at any moment leaves a file that opens (with the SWMR read flag,
  which the readers here use) and holds every flushed row.
- The file is built under ``<path>.partial`` and renamed onto ``path`` only once SWMR is on, so
  ``path`` never holds a half-built file.
- A checkpoint goes into the slot the pointer does not name, is flushed, and only then is the
  pointer switched and flushed: a kill during a checkpoint leaves the previous one intact.
- Status and steps done are kept in the small fixed-size ``live`` datasets while SWMR is on
  (attributes cannot change under SWMR). When the writer closes it switches SWMR off, reopens
  the file and writes the final ``status`` and ``steps_done`` attributes. The ``live``
  datasets stay authoritative: the readers here report them. (A kill during those few
  milliseconds of the reopen leaves HDF5's "open for writing" flag set on the file; HDF5's
  ``h5clear -s`` clears it. No kill at any other moment needs that.)
- Resuming rebuilds the file (under ``.partial``, renamed when ready) with each series cut back
  to the rows it had at the last checkpoint. A file left by a killed SWMR writer cannot be
  opened for writing again without clearing its consistency flags, and its superblock's
  end-of-file address is stale, so writing into it in place is not safe; rewriting is.

How it fails (StoreError, never a crash or rows that were never written):

- HDF5 does not recover from a write that fails for want of room: rows it could not write read
  back as zeros, and once a metadata write has failed it can neither flush nor close the file
  (the process then crashes when it exits). So the writer checks that the disk, and the
  process's file size limit (RLIMIT_FSIZE), leave room for each write and for what HDF5 may
  write beyond it (cached chunks, metadata), and stops short with StoreError when they do not;
  that room is also reserved on disk (posix_fallocate), which catches disk quotas and other
  processes filling the disk. A file without room for its layout fails before any compute.
- Should a write fail all the same, each series is cut back to the rows of the last flush
  before the failure, the failure is recorded in ``live/status`` if the file takes it, and the
  file is closed with what HDF5 cannot write sent to a scratch file (so HDF5 can close it).
- Each flush checks that path still holds the file written (device and inode): an output
  removed or replaced while a run writes it is a StoreError at the next flush, and a file
  that is not this writer's (root attribute ``file_id``) is never written into.
- An output path naming a symlink writes its target; one naming a FIFO, a device or other
  non-regular file is refused, as is a path whose ``.partial`` sibling cannot be made.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import errno
import functools
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import queue
import shlex
import stat
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Self

import h5py
import numpy as np
from h5py import h5d, h5f, h5p, h5s, h5t, h5z
from h5py._objects import phil

from fastrace.errors import StoreError

try:  # advisory lock against two writers on one file; POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "RunData",
    "RunReader",
    "RunSpec",
    "StoredSeries",
    "TrajectoryWriter",
    "list_runs",
    "open_run",
    "read_run",
    "read_stored_rows",
    "run_info",
    "run_status",
]

FORMAT_VERSION = 1

SeriesSpec = tuple[tuple[int, ...], np.dtype]

# Files are written with 1.10-format objects (the oldest that supports SWMR), so any HDF5 >= 1.10
# can read them.
_LIBVER = ("v110", "latest")
# Target size of one chunk. Each dataset's chunk cache holds one chunk, so a chunk is compressed
# and written as soon as the rows move on to the next one: small chunks keep the work left for
# the final flush (at the end of a run, when nothing else runs) small.
_CHUNK_BYTES = 128 << 10
_MAX_CHUNK_ROWS = 16384  # keeps chunks of scalar series small (they are rewritten on each flush)
_BLOCK_BYTES = 8 << 20  # rows handed to the writer thread in blocks of at most this size
_QUEUE_BYTES = 64 << 20  # at most this many bytes of rows wait for the writer thread (backpressure)
# The writer thread gathers a series' blocks until they make a whole chunk (or a flush is due)
# before writing them: each HDF5 write costs ~20 µs of calls whatever its size, which adds up over
# many small series (t, loss, singular values) handed over at every block of a big one. Blocks of
# this many bytes or more are written at once (and series whose chunks hold parts of rows are
# gathered up to it).
_WRITE_BYTES = 256 << 10
# "auto" compression skips blosc-lz4 where it does not pay: float64 weights learned by gradient
# descent shrink by only ~10 % (their low mantissa bits are noise), for twice the writer's time.
# Each series' first whole chunk goes through the filter and its stored size is read back; if it
# saved less than this fraction, the series' later whole chunks are written as they are, marked
# as not filtered (HDF5's per-chunk filter mask: every reader decodes such a file).
_MIN_SAVING = 0.2
_COPY_BYTES = 64 << 20  # block size when copying rows during a resume
_BUILD_WAIT = 0.05  # seconds the writer thread waits for the caller's first operation (see loop)
# ... or, if its runs checkpoint, for their first checkpoints, which go into a new file before it
# takes its path (with the operations before them, of these kinds; see _writer_loop)
_FIRST_WAIT = 2.0
_EARLY_OPS = ("rows", "blocks", "checkpoint", "steps", "status")
_STATUS_BYTES = 256
# Room the writer keeps free, on the disk and below the process's file size limit, for what HDF5
# may still write beyond the rows of an operation: its cached chunks, and metadata
# (_ROOM_PER_DATASET per dataset, and _ROOM_SLACK); see TrajectoryWriter._check_room
_ROOM_PER_DATASET = 4 << 10
_ROOM_SLACK = 1 << 20
_RESERVED_RUN_ATTRS = ("series", "status", "steps_done")
_RESERVED_SERIES = ("live", "checkpoint")


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class RunSpec:
    """What one run stores.

    ``series`` maps a series name (e.g. ``"t"``, ``"svals/x->h"``) to its row shape, or to
    ``(row_shape, dtype)``; the dtype defaults to float64. ``checkpoint`` does the same for the
    arrays of a full checkpoint (fixed shapes). ``attrs`` are written on the run's group
    (numbers, strings, numeric arrays; ``None`` values are skipped).
    """

    series: Mapping[str, Any]
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "series", _normalize_specs(self.series, "series"))
        object.__setattr__(self, "checkpoint", _normalize_specs(self.checkpoint, "checkpoint"))
        object.__setattr__(self, "attrs", dict(self.attrs))
        if not self.series:
            raise StoreError("a RunSpec needs at least one series")
        for name in self.series:
            if name.split("/")[0] in _RESERVED_SERIES:
                raise StoreError(f"series name {name!r} is reserved; choose another name")
        for key in self.attrs:
            if key in _RESERVED_RUN_ATTRS:
                raise StoreError(f"run attribute {key!r} is reserved by the store")


def _normalize_specs(specs: Mapping[str, Any], what: str) -> dict[str, SeriesSpec]:
    out: dict[str, SeriesSpec] = {}
    for name, spec in dict(specs).items():
        _check_name(name, what)
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], tuple | list):
            shape, dtype = spec
        else:
            shape, dtype = spec, np.float64
        if isinstance(shape, int | np.integer):
            shape = (shape,)
        try:
            shape = tuple(int(n) for n in shape)
            dtype = np.dtype(dtype)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{what} {name!r}: bad spec {spec!r} ({exc})") from exc
        if any(n <= 0 for n in shape):
            raise StoreError(f"{what} {name!r}: every dimension must be positive, got {shape}")
        if dtype.kind not in "biuf":
            raise StoreError(f"{what} {name!r}: dtype must be numeric or bool, got {dtype}")
        out[name] = (shape, dtype)
    return out


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise StoreError(f"{what} names must be non-empty strings, got {name!r}")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise StoreError(f"{what} name {name!r} is not a valid HDF5 path")


def _check_run_name(name: Any) -> None:
    _check_name(name, "run")
    if "/" in name or name == "network":
        raise StoreError(f"run name {name!r} must not contain '/' and must not be 'network'")


# ----------------------------------------------------------------------------- helpers


def _chunk_shape(row_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """A time-first chunk of about ``_CHUNK_BYTES``: whole rows, or part of a row if rows are big."""
    row_bytes = math.prod(row_shape) * itemsize
    if row_bytes <= _CHUNK_BYTES:
        return (min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // row_bytes), *row_shape)
    chunk = [1, *row_shape]
    for axis in range(1, len(chunk)):
        inner = math.prod(chunk[axis + 1 :]) * itemsize
        chunk[axis] = max(1, min(chunk[axis], _CHUNK_BYTES // inner))
        if math.prod(chunk) * itemsize <= _CHUNK_BYTES:
            break
    return tuple(chunk)


def _block_rows(row_bytes: int, chunk_rows: int, max_rows: int) -> int:
    """Rows per buffer block: at most ``max_rows`` and ``_BLOCK_BYTES``, whole chunks if possible."""
    rows = max(1, min(max_rows, _BLOCK_BYTES // row_bytes))
    if rows >= chunk_rows:
        rows -= rows % chunk_rows
    return rows


def _compression_options(compression: str, level: int) -> tuple[int, tuple[int, ...]] | None:
    """The HDF5 filter (id, options) of ``compression``, or None for no compression."""
    if compression not in ("auto", "blosc-lz4", "none"):
        raise StoreError(f"compression must be 'auto', 'blosc-lz4' or 'none', got {compression!r}")
    if compression == "none":
        return None
    try:
        import hdf5plugin
    except ImportError as exc:
        if compression == "auto":
            return None
        raise StoreError(
            "compression='blosc-lz4' needs the hdf5plugin package: pip install 'fastrace[store]'"
        ) from exc
    if not 0 <= int(level) <= 9:
        raise StoreError(f"compression_level must be in 0..9, got {level}")
    blosc = hdf5plugin.Blosc(cname="lz4", clevel=int(level), shuffle=hdf5plugin.Blosc.SHUFFLE)
    if not h5z.filter_avail(blosc.filter_id):  # (an optional filter HDF5 lacks writes raw data)
        if compression == "auto":
            return None
        raise StoreError("compression='blosc-lz4': hdf5plugin is installed but HDF5 does not "
                         "have its blosc filter")
    return blosc.filter_id, tuple(blosc.filter_options)


def _new_series_dataset(group: h5py.Group, name: str, row_shape: tuple[int, ...],
                        dtype: np.dtype, chunk: tuple[int, ...],
                        compression: tuple[int, tuple[int, ...]] | None) -> h5py.Dataset:
    """An empty dataset ``(0, *row_shape)``, resizable along time, in chunks ``chunk``, with a
    chunk cache of one chunk. Made with h5py's low-level calls: a third of the time of
    ``create_dataset``, which counts for the ~50 datasets of a run (the layout is built while
    the caller computes)."""
    if "/" in name:
        parent, name = name.rsplit("/", 1)
        group = group.require_group(parent)
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_chunk(chunk)
    if compression is not None:
        dcpl.set_filter(compression[0], h5z.FLAG_OPTIONAL, compression[1])
    dcpl.set_obj_track_times(False)
    dapl = h5p.create(h5p.DATASET_ACCESS)
    nslots, _, _ = dapl.get_chunk_cache()
    dapl.set_chunk_cache(nslots, math.prod(chunk) * dtype.itemsize, 1.0)
    space = h5s.create_simple((0, *row_shape), (h5s.UNLIMITED, *row_shape))
    dsid = h5d.create(group.id, name.encode(), h5t.py_create(dtype, logical=True), space,
                      dcpl=dcpl, dapl=dapl)
    return h5py.Dataset(dsid)


def _load_filter_plugins() -> None:
    """Make the blosc filter available to readers when hdf5plugin is installed."""
    try:
        importlib.import_module("hdf5plugin")
    except ImportError:
        pass


@functools.cache
def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get(name), "__version__", "unknown"))


def _attr_value(key: str, value: Any) -> Any:
    """A value h5py can store as an attribute, or StoreError."""
    if isinstance(value, str | bytes | bool | int | float | np.generic):
        return value
    if isinstance(value, list | tuple | np.ndarray):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf" or (arr.dtype.kind == "U" and arr.ndim == 1):
            return arr if arr.dtype.kind != "U" else [str(v) for v in arr]
    raise StoreError(
        f"attribute {key!r}: cannot store a {type(value).__name__}; use numbers, strings or "
        "numeric arrays (encode nested values yourself, e.g. with json.dumps)"
    )


def _plain(value: Any) -> Any:
    """An attribute value as plain Python where that is natural."""
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _encode_status(status: str) -> np.ndarray:
    raw = status.encode("utf-8")[:_STATUS_BYTES]
    return np.array(raw, dtype=f"S{_STATUS_BYTES}")


def _decode_status(value: Any) -> str:
    return bytes(value).decode("utf-8", "ignore")


def _check_status(status: Any) -> str:
    if not isinstance(status, str) or not (
        status in ("running", "complete") or status.startswith("failed")
    ):
        raise StoreError(
            f"status must be 'running', 'complete' or 'failed: <reason>', got {status!r}"
        )
    return status


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise StoreError unless a fastrace file can be created at ``path`` (call before compute)."""
    _check_writable(_output_path(path))


def _output_path(path: str | os.PathLike[str]) -> Path:
    """The path a file written at ``path`` goes to: a symlink's target (the file is built beside
    it and renamed onto it), so that the link stays a link."""
    p = os.fspath(path)
    # (absolute: the caller may change directory while a run writes)
    return Path(os.path.realpath(p) if os.path.islink(p) else os.path.abspath(p))


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise StoreError(f"cannot write {path}: it is a directory")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
    if mode is not None and not stat.S_ISREG(mode):
        # the file is renamed onto path: a FIFO or a device node there would be replaced
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
        raise StoreError(f"cannot write {path}: it is not a regular file ({kind})")
    parent = path.parent
    if not parent.is_dir():
        raise StoreError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write {path}: no permission to create files in {parent}")


class _WriterLock:
    """An advisory lock on ``<path>.lock`` so two writers never stream into one file."""

    def __init__(self, path: Path):
        self.path = Path(f"{path}.lock")
        self.fd: int | None = None
        # A holder removes the lock file when it releases it: a lock taken on a file that was
        # removed (or replaced) meanwhile locks nothing, so it is taken again on the file now
        # at the path. (Each round means another writer came and went: a few suffice.)
        for _ in range(100):
            if self._lock_file_at_path(path):
                return
        raise StoreError(f"cannot lock {self.path}: other processes keep taking and releasing it")

    def _lock_file_at_path(self, path: Path) -> bool:
        """Open and lock the file at ``self.path``: True when held (or when locks are not
        supported), False if the file was removed or replaced before the lock was taken."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror} ({self.path})") from exc
        if fcntl is None:  # pragma: no cover - Windows
            return True
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(self.fd)
            self.fd = None
            raise StoreError(
                f"{path} is being written by another process (it holds {self.path})"
            ) from exc
        except OSError:  # e.g. no lock support on this file system: go on without the lock
            warnings.warn(f"could not lock {self.path}; concurrent writers are not detected",
                          stacklevel=4)
            return True
        if self._holds_file_at_path():
            return True
        os.close(self.fd)  # (which drops the lock)
        self.fd = None
        return False

    def _holds_file_at_path(self) -> bool:
        """Whether the file at ``self.path`` is the one ``self.fd`` holds."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self.fd)
        return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Remove the lock file, if the file at the path is still the one held (a user may have
        removed it meanwhile, and another writer locked a new one), and drop the lock."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if self._holds_file_at_path():
                self.path.unlink()
        os.close(self.fd)
        self.fd = None


# ----------------------------------------------------------------------------- writer


class Checkpoint(NamedTuple):
    """A complete checkpoint: the step, the state arrays, and the rows of each series then."""

    step: int
    state: dict[str, np.ndarray]
    rows: dict[str, int]


class _Series:
    """Caller-side state of one series: its buffer and how many rows were appended."""

    def __init__(self, run: str, name: str, spec: SeriesSpec, rows: int, max_rows: int):
        self.run = run
        self.name = name
        self.row_shape, self.dtype = spec
        chunk = _chunk_shape(self.row_shape, self.dtype.itemsize)
        self.chunk = chunk
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        self.block_rows = _block_rows(self.row_bytes, chunk[0], max_rows)
        self.rows = rows  # appended so far (including rows kept from a resumed file)
        self.buffer: np.ndarray | None = None
        self.filled = 0
        self.spare: list[np.ndarray] = []  # blocks the writer thread has finished with


class TrajectoryWriter:
    """Streams the trajectories of one or more runs into one HDF5 file.

    ``runs`` maps run names (``"simulation"``, ``"theory"``, ``"seed_03"``) to their
    ``RunSpec``. The file is created here, so an unwritable ``path`` raises ``StoreError`` at
    once; a background thread then creates every group and dataset while the caller starts
    computing (at its first call, or 50 ms after this one) and only then puts the file at
    ``path`` (``flush()`` waits for that).
    ``append`` copies rows into a buffer and returns (``append_blocks`` hands over blocks
    without a copy); the background thread writes and flushes them, so compute does not wait
    on the disk. Partly filled blocks are handed over by ``checkpoint``, ``flush`` and
    ``close``, and by the first ``append`` once ``flush_interval`` seconds have passed;
    ``flushed_rows(run)`` says how many rows are safely in the file. At most about 64 MB of
    rows wait for the thread: a caller that outpaces the disk blocks in ``append`` rather than
    using unbounded memory. An error in the writer thread is raised as ``StoreError`` by the
    next call.

    ``mode="w"`` creates (or replaces) the file. ``mode="resume"`` reopens an existing file
    written with the same specs: each run that is not complete is cut back to its last
    checkpoint, which ``resume_state(run)`` returns (``None``: start the run from scratch).
    A missing file is created as with ``"w"``. ``compression`` is ``"auto"`` (blosc-lz4 when
    hdf5plugin is installed, else none; a series whose first chunk it shrinks by less than a
    fifth, such as learned float64 weights, has its later whole chunks stored unfiltered, which
    every reader decodes), ``"blosc-lz4"`` (every chunk) or ``"none"``. ``swmr=False`` turns
    off concurrent reading and kill safety (for file systems without POSIX write ordering,
    e.g. NFS). Use the writer from one thread.

    ``path`` may be a symlink (its target is written); ``self.path`` is the file written, and
    ``self.file_id`` its root attribute ``file_id``. A full disk (or file size limit), or an
    output removed or replaced while the run writes it, raise StoreError (see the module
    docstring, "How it fails").
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        runs: Mapping[str, RunSpec],
        *,
        network_json: str = "",
        config: str = "",
        seed: int | None = None,
        compression: str = "auto",
        compression_level: int = 5,
        mode: str = "w",
        buffer_rows: int = 256,
        flush_interval: float = 1.0,
        swmr: bool = True,
    ):
        self.path = _output_path(path)
        if mode not in ("w", "resume"):
            raise StoreError(f"mode must be 'w' or 'resume', got {mode!r}")
        if not isinstance(runs, Mapping) or not runs:
            raise StoreError("runs must be a non-empty mapping of run name -> RunSpec")
        for name, spec in runs.items():
            _check_run_name(name)
            if not isinstance(spec, RunSpec):
                raise StoreError(f"run {name!r}: expected a RunSpec, got {type(spec).__name__}")
            for key, value in spec.attrs.items():  # checked here: the thread writes them
                if value is not None:
                    _attr_value(key, value)
        if seed is not None and not isinstance(seed, int | np.integer):
            raise StoreError(f"seed must be an int or None, got {type(seed).__name__}")
        if int(buffer_rows) < 1 or not float(flush_interval) > 0:
            raise StoreError("buffer_rows must be >= 1 and flush_interval > 0")
        self._specs: dict[str, RunSpec] = dict(runs)
        self._swmr = bool(swmr)
        self._flush_interval = float(flush_interval)
        self._compression = _compression_options(compression, compression_level)
        self._adaptive = compression == "auto" and self._compression is not None
        self._root_attrs = {
            "network_json": str(network_json),
            "config": str(config),
            "seed": None if seed is None else int(seed),
        }
        _check_writable(self.path)
        self._lock = _WriterLock(self.path)

        self._status = {run: "running" for run in self._specs}
        self._steps = {run: 0 for run in self._specs}
        self._resumed: dict[str, Checkpoint | None] = {run: None for run in self._specs}
        self._kept_rows = {run: dict.fromkeys(spec.series, 0) for run, spec in self._specs.items()}
        self._datasets: dict[tuple[str, str], h5py.Dataset] = {}
        self._live: dict[str, tuple[h5py.Dataset, h5py.Dataset]] = {}
        # per run: the pointer dataset and the datasets of slots 0 and 1 ("state/<name>",
        # "step", "rows"), kept open so a checkpoint costs no lookups
        self._ckpt: dict[str, tuple[h5py.Dataset, list[dict[str, h5py.Dataset]]]] = {}
        self._ckpt_slot = {run: -1 for run in self._specs}
        self._partial = Path(f"{self.path}.partial")
        # the root attribute file_id of the file written here, and (device, inode) of that file
        # once it is at path: each flush checks that path still holds it (see _check_at_path)
        self.file_id = os.urandom(16).hex()
        self._identity: tuple[int, int] | None = None
        self._size_limit = _file_size_limit()
        self._headroom = _headroom(self._specs)
        self._band_bytes: dict[tuple[str, str], tuple[int, int]] = {}  # see _new_chunk_bytes
        self._layout_bytes = _layout_bytes(self._specs)
        self._room_left = 0  # bytes that may be written before the room left is measured again
        try:
            if mode == "resume" and self.path.exists():
                self._file = self._resume_build()
                build_later = False
            else:
                # The file is created now (so that a path HDF5 cannot write fails here); its
                # layout is built by the writer thread while the caller starts computing.
                self._file = self._open_partial()
                build_later = True
        except BaseException:
            self._lock.release()
            raise

        self._series = {
            run: {name: _Series(run, name, s, self._kept_rows[run][name], int(buffer_rows))
                  for name, s in spec.series.items()}
            for run, spec in self._specs.items()
        }
        self._written = {(run, name): sb.rows for run, d in self._series.items()
                         for name, sb in d.items()}
        # writer thread: blocks of rows gathered per series, not yet written (see _WRITE_BYTES)
        # and, with "auto" compression, the series whose whole chunks are written unfiltered
        # (True), filtered (False) or not yet tried (absent); see _MIN_SAVING
        self._raw_chunks: dict[tuple[str, str], bool] = {}
        self._chunk_layout: dict[tuple[str, str], tuple[int | None, bool]] = {}  # see _layout
        self._gathered: dict[tuple[str, str], list] = {}  # [bytes, block, block, ...]
        self._flushed = dict(self._written)
        # Unbounded queue; backpressure counts the bytes of rows waiting instead, so that a
        # checkpoint or a status never waits behind the rows of many small series.
        self._queue: queue.Queue = queue.Queue()
        self._queued_bytes = 0
        self._room = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._last_push = time.monotonic()
        self._thread = threading.Thread(target=self._writer_loop, args=(build_later,),
                                        name="fastrace-store", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    # -- building the file -------------------------------------------------------------

    def _open_partial(self) -> h5py.File:
        """A new, empty HDF5 file at ``<path>.partial``."""
        try:
            self._partial.unlink(missing_ok=True)  # left by a killed writer
        except OSError as exc:  # e.g. a directory, or a name too long (path itself is not)
            raise StoreError(f"cannot write {self.path}: its temporary file {self._partial} "
                             f"cannot be made ({exc.strerror})") from exc
        try:
            f = h5py.File(self._partial, "w", libver=_LIBVER, track_order=True)
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                self._partial.unlink(missing_ok=True)
            raise StoreError(f"cannot write {self.path}: {exc}") from exc
        try:  # room for the layout, checked before any compute and reserved
            self._check_room(self._layout_bytes, f)
            self._reserve(self._layout_bytes, f)
        except StoreError:
            _close_file(f, discard=True)
            with contextlib.suppress(OSError):
                self._partial.unlink(missing_ok=True)
            raise
        return f

    def _resume_build(self) -> h5py.File:
        """The file rebuilt from the one at path (each unfinished run cut to its checkpoint)."""
        source = _open_read(self.path)
        try:
            f = self._open_partial()
            self._publish(f, lambda f: self._rebuild_from(source, f))
            return f
        finally:
            source.close()

    def _build_new(self, f: h5py.File) -> None:
        self._write_root(f, created=None)
        for run, spec in self._specs.items():
            self._create_run(f, run, spec)

    def _publish(self, f: h5py.File, fill: Any) -> None:
        """Fill ``f`` (at ``<path>.partial``), switch SWMR on and rename it onto path, so that
        path only ever holds a complete layout; on failure ``f`` is closed and removed."""
        try:
            fill(f)
            self._check_room(0, f)
            # Written before SWMR is switched on: HDF5 cannot close a file whose switch to
            # SWMR failed (on a full disk, say), and the switch only writes the superblock then.
            f.flush()
            if self._swmr:
                f.swmr_mode = True
            st = os.fstat(f.id.get_vfd_handle())
            os.replace(self._partial, self.path)
        except BaseException as exc:
            _close_file(f, discard=True)  # (it may not flush: the disk may be full)
            with contextlib.suppress(OSError):
                self._partial.unlink(missing_ok=True)
            if isinstance(exc, StoreError) or not isinstance(exc, Exception):
                raise
            raise StoreError(f"cannot write {self.path}: {exc}") from exc
        self._identity = (st.st_dev, st.st_ino)

    def _write_root(self, f: h5py.File, created: str | None) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        f.attrs["format"] = "fastrace"
        f.attrs["format_version"] = FORMAT_VERSION
        # each file written anew (a resume too) gets its own id: readers holding rows of an
        # earlier file at this path tell the two apart (the inode number may be the same:
        # ext4 hands a freed one straight back)
        f.attrs["file_id"] = self.file_id
        for pkg in ("fastrace", "numpy", "numba", "h5py"):
            f.attrs[f"{pkg}_version"] = _package_version(pkg)
        f.attrs["hdf5_version"] = h5py.version.hdf5_version
        f.attrs["created"] = created or now
        if created is not None:
            f.attrs["resumed"] = now
        f.attrs["config"] = self._root_attrs["config"]
        if self._root_attrs["seed"] is not None:
            f.attrs["seed"] = self._root_attrs["seed"]
        f.attrs["command_line"] = shlex.join(sys.argv)
        f.create_group("network").attrs["json"] = self._root_attrs["network_json"]

    def _create_run(self, f: h5py.File, run: str, spec: RunSpec) -> None:
        g = f.create_group(run, track_order=True)
        for key, value in spec.attrs.items():
            if value is not None:
                g.attrs[key] = _attr_value(key, value)
        g.attrs["series"] = json.dumps(list(spec.series))
        g.attrs["status"] = "running"
        g.attrs["steps_done"] = 0
        for name, (shape, dtype) in spec.series.items():
            chunk = _chunk_shape(shape, dtype.itemsize)
            try:
                ds = _new_series_dataset(g, name, shape, dtype, chunk, self._compression)
            except (ValueError, TypeError) as exc:
                raise StoreError(f"run {run!r}: cannot create series {name!r}: {exc}") from exc
            self._datasets[(run, name)] = ds
        live = g.create_group("live")
        status = live.create_dataset("status", data=_encode_status("running"))
        steps = live.create_dataset("steps_done", data=np.int64(0))
        self._live[run] = (status, steps)
        ck = g.create_group("checkpoint")
        ck.attrs["names"] = json.dumps(list(spec.checkpoint))
        current = ck.create_dataset("current", data=np.int64(-1))
        slots = []
        for slot in ("slot0", "slot1"):
            sg = ck.create_group(slot)
            datasets = {"step": sg.create_dataset("step", data=np.int64(-1)),
                        "rows": sg.create_dataset("rows",
                                                  data=np.zeros(len(spec.series), dtype=np.int64))}
            st = sg.create_group("state")
            for name, (shape, dtype) in spec.checkpoint.items():
                datasets[f"state/{name}"] = st.create_dataset(name, data=np.zeros(shape, dtype=dtype))
            slots.append(datasets)
        self._ckpt[run] = (current, slots)

    def _rebuild_from(self, src: h5py.File, f: h5py.File) -> None:
        """Fill the new file ``f`` from ``src``, cutting each unfinished run to its checkpoint."""
        stored = {key: _plain(value) for key, value in src.attrs.items()}
        network = _plain(src["network"].attrs.get("json", "")) if "network" in src else ""
        mine = self._root_attrs
        if mine["config"] and stored.get("config", "") and stored["config"] != mine["config"]:
            raise StoreError(f"cannot resume {self.path}: it was written with another config")
        if mine["seed"] is not None and "seed" in stored and stored["seed"] != mine["seed"]:
            raise StoreError(f"cannot resume {self.path}: it was written with seed "
                             f"{stored['seed']}, not {mine['seed']}")
        if mine["network_json"] and network and network != mine["network_json"]:
            raise StoreError(f"cannot resume {self.path}: it was written for another network")
        mine["config"] = mine["config"] or str(stored.get("config", ""))
        mine["network_json"] = mine["network_json"] or str(network)
        if mine["seed"] is None and "seed" in stored:
            mine["seed"] = int(stored["seed"])
        self._write_root(f, created=str(stored.get("created", "")) or None)

        for run in self._specs:
            if run not in src or "series" not in src[run].attrs:
                raise StoreError(f"cannot resume {self.path}: it has no run {run!r}")
        # in the old file's order (list_runs gives runs in the order they were made)
        for run in src:
            if run == "network":
                continue
            if run not in self._specs:  # a run this writer does not know is kept as it is
                src.copy(src[run], f, run)
                continue
            spec, old = self._specs[run], src[run]
            _check_same_layout(self.path, run, old, spec)
            self._create_run(f, run, spec)
            status = _decode_status(old["live/status"][()])
            checkpoint = _read_checkpoint(old, spec)
            if status == "complete":
                rows = {name: old[name].shape[0] for name in spec.series}
                self._steps[run] = int(old["live/steps_done"][()])
            else:
                status = "running"
                rows = checkpoint.rows if checkpoint else dict.fromkeys(spec.series, 0)
                self._steps[run] = checkpoint.step if checkpoint else 0
                self._resumed[run] = checkpoint
            self._status[run] = status
            self._kept_rows[run] = rows
            for name, (shape, dtype) in spec.series.items():
                self._check_room(rows[name] * math.prod(shape) * dtype.itemsize, f)
                _copy_rows(old[name], self._datasets[(run, name)], rows[name])
            if checkpoint is not None:
                rows_array = np.array([checkpoint.rows[n] for n in spec.series], dtype=np.int64)
                current, slots = self._ckpt[run]
                _fill_slot(slots[0], checkpoint.step, checkpoint.state, rows_array)
                _write_all(current, 0)
                self._ckpt_slot[run] = 0
            status_ds, steps_ds = self._live[run]
            status_ds[()] = _encode_status(status)
            steps_ds[()] = self._steps[run]
            f[run].attrs["status"] = status
            f[run].attrs["steps_done"] = self._steps[run]

    # -- public API ----------------------------------------------------------------------

    def resume_state(self, run: str) -> Checkpoint | None:
        """The checkpoint a resumed run was cut back to, or None (start it from scratch).

        Also None for a run that is already complete; check ``status(run)`` first.
        """
        self._check_run(run)
        return self._resumed[run]

    def status(self, run: str) -> str:
        """The run's current status: ``"running"``, ``"complete"`` or ``"failed: ..."``."""
        self._check_run(run)
        return self._status[run]

    def flushed_rows(self, run: str) -> dict[str, int]:
        """Rows of each series of ``run`` that are written and flushed to the file."""
        self._check_run(run)
        return {name: self._flushed[(run, name)] for name in self._specs[run].series}

    def append(self, run: str, rows: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Append one row (shape ``row_shape``) or a block of rows (``(n, *row_shape)``) to
        each named series of ``run``: ``append("sim", t=0.1, loss=0.5)`` or, for names that are
        not identifiers, ``append("sim", {"weights/x->h": w})``. Values are copied; the call
        returns before they are written. Series may be appended at different rates."""
        blocks = self._checked_rows(run, {**(rows or {}), **more})
        for sb, arr in blocks:
            self._copy_into_buffers(sb, arr)
        if time.monotonic() - self._last_push >= self._flush_interval:
            self._push_all()

    def append_blocks(self, run: str, blocks: Mapping[str, np.ndarray]) -> None:
        """Append blocks of rows (``(n, *row_shape)`` each) to series of ``run`` without copying
        them: the writer thread keeps the arrays and writes them later, so the caller must
        never change them afterwards (e.g. slices of arrays that are only ever appended to).
        Saves the copy ``append`` makes when the caller keeps the rows anyway."""
        checked = self._checked_rows(run, blocks)
        given = []
        for sb, arr in checked:
            self._push(sb)  # rows buffered by ``append`` go first
            if len(arr):
                # a copy only if it must convert
                given.append((sb, np.ascontiguousarray(arr, dtype=sb.dtype)))
        if given:  # one operation for all the series: a queue operation costs ~25 µs here
            nbytes = sum(arr.nbytes for _, arr in given)
            self._put(("blocks", given, nbytes), nbytes)
            for sb, arr in given:
                sb.rows += len(arr)
        if time.monotonic() - self._last_push >= self._flush_interval:
            self._push_all()

    def _checked_rows(self, run: str, values: Mapping[str, Any]) -> list[tuple[_Series, np.ndarray]]:
        """Each named series of ``run`` with its value as a block ``(n, *row_shape)``."""
        self._check_usable(run)
        if self._status[run] == "complete":
            raise StoreError(f"run {run!r} in {self.path} is already complete")
        series = self._series[run]
        blocks = []
        for name, value in values.items():  # check everything before copying anything
            sb = series.get(name)
            if sb is None:
                raise StoreError(f"run {run!r} has no series {name!r}; it has {list(series)}")
            arr = np.asarray(value)
            if arr.dtype.kind not in "biuf" or not np.can_cast(arr.dtype, sb.dtype, "same_kind"):
                raise StoreError(f"series {name!r} of run {run!r} stores {sb.dtype}; "
                                 f"cannot store {arr.dtype} in it")
            if arr.shape == sb.row_shape:
                arr = arr[np.newaxis]
            elif arr.shape[1:] != sb.row_shape or arr.ndim != len(sb.row_shape) + 1:
                raise StoreError(f"series {name!r} of run {run!r}: expected a row of shape "
                                 f"{sb.row_shape} or rows (n, *{sb.row_shape}), got {arr.shape}")
            blocks.append((sb, arr))
        return blocks

    def checkpoint(self, run: str, step: int, state: Mapping[str, Any]) -> None:
        """Store the full state of ``run`` after ``step`` (arrays copied now, written in order
        after every row appended before). Also sets ``steps_done`` to ``step``."""
        self._check_usable(run)
        spec = self._specs[run].checkpoint
        if set(state) != set(spec):
            raise StoreError(f"checkpoint of run {run!r} needs exactly {sorted(spec)}, "
                             f"got {sorted(state)}")
        arrays = {}
        for name, (shape, dtype) in spec.items():
            arr = np.asarray(state[name])
            if arr.shape != shape or not np.can_cast(arr.dtype, dtype, "same_kind"):
                raise StoreError(f"checkpoint {name!r} of run {run!r} must have shape {shape} "
                                 f"and dtype {dtype}, got {arr.shape} {arr.dtype}")
            arrays[name] = np.array(arr, dtype=dtype, copy=True)
        rows = np.array([sb.rows for sb in self._series[run].values()], dtype=np.int64)
        self._push_all()
        self._steps[run] = int(step)
        self._put(("checkpoint", run, int(step), arrays, rows))

    def set_steps_done(self, run: str, steps: int) -> None:
        """Record how many steps of ``run`` are done (shown while the run is live)."""
        self._check_usable(run)
        self._steps[run] = int(steps)
        self._put(("steps", run, int(steps)))

    def set_status(self, run: str, status: str) -> None:
        """Set the status of ``run``: ``"running"``, ``"complete"`` or ``"failed: <reason>"``."""
        self._check_usable(run)
        self._status[run] = _check_status(status)
        self._put(("status", run, status))

    def flush(self) -> None:
        """Write and flush every row appended so far; returns when they are in the file."""
        self._check_usable(None)
        self._push_all()
        done = threading.Event()
        self._put(("flush", done))
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break
        self._raise_if_failed()

    def close(self) -> None:
        """Write everything, mark running runs complete, and close the file."""
        self._shutdown(final=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed:
            reason = f"failed: {exc_type.__name__}: {exc}" if str(exc) else \
                f"failed: {exc_type.__name__}"
            for run, status in self._status.items():
                if status == "running":
                    self._status[run] = reason
        self.close()

    # -- caller side internals -------------------------------------------------------------

    def _check_run(self, run: str) -> None:
        if run not in self._specs:
            raise StoreError(f"{self.path} has no run {run!r}; its runs are {list(self._specs)}")

    def _check_usable(self, run: str | None) -> None:
        if self._closed:
            raise StoreError(f"the writer of {self.path} is closed")
        self._raise_if_failed()
        if run is not None:
            self._check_run(run)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing {self.path} failed: {self._error}") from self._error

    def _copy_into_buffers(self, sb: _Series, arr: np.ndarray) -> None:
        done = 0
        while done < len(arr):
            if sb.buffer is None:
                sb.buffer = sb.spare.pop() if sb.spare else \
                    np.empty((sb.block_rows, *sb.row_shape), dtype=sb.dtype)
            n = min(len(arr) - done, sb.block_rows - sb.filled)
            np.copyto(sb.buffer[sb.filled : sb.filled + n], arr[done : done + n],
                      casting="same_kind")
            sb.filled += n
            done += n
            if sb.filled == sb.block_rows:
                self._push(sb)
        sb.rows += len(arr)

    def _push(self, sb: _Series) -> None:
        if sb.filled:
            block, n = sb.buffer, sb.filled
            sb.buffer, sb.filled = None, 0
            self._put(("rows", sb, block, n, True), block[:n].nbytes)

    def _push_all(self) -> None:
        for series in self._series.values():
            for sb in series.values():
                self._push(sb)
        self._last_push = time.monotonic()

    def _put(self, op: tuple, nbytes: int = 0) -> None:
        """Queue ``op`` for the writer thread; rows (``nbytes``) wait while too many are queued."""
        if nbytes:
            with self._room:
                while self._queued_bytes and self._queued_bytes + nbytes > _QUEUE_BYTES:
                    self._raise_if_failed()
                    if not self._thread.is_alive():
                        raise StoreError(f"the writer thread of {self.path} has stopped")
                    self._room.wait(0.1)
                self._queued_bytes += nbytes
        self._queue.put(op)

    def _done_with(self, nbytes: int) -> None:
        with self._room:
            self._queued_bytes -= nbytes
            self._room.notify_all()

    # -- writer thread ---------------------------------------------------------------------

    def _writer_loop(self, build: bool) -> None:
        next_op = None
        if build:
            # The layout is built while the caller computes. Its first operation (a checkpoint,
            # typically) usually comes right before a stretch of compute that leaves the GIL free
            # (numba, BLAS), so wait for it, or a moment: building alongside the caller's own
            # Python code would slow both down (the two threads would take turns on the GIL).
            # The operations that come first (each run's first checkpoint, after the rows before
            # it) go into the file before it takes its path, until every run that checkpoints
            # has had its first (or a flush or close asks for the file, or _FIRST_WAIT has
            # passed): a file that is there can be resumed, whenever it is killed. Each is
            # counted done at once, so that a caller waiting for room in the queue goes on.
            waiting = {run for run, spec in self._specs.items() if spec.checkpoint}
            deadline = time.monotonic() + _FIRST_WAIT
            with contextlib.suppress(queue.Empty):
                next_op = self._queue.get(timeout=_FIRST_WAIT if waiting else _BUILD_WAIT)

            def build(f: h5py.File) -> None:
                nonlocal next_op
                self._build_new(f)
                while next_op is not None and next_op[0] in _EARLY_OPS:
                    op, next_op = next_op, None
                    if self._error is None:  # (a failed one leaves what came before it)
                        try:
                            self._apply(op)
                        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                            self._error = exc
                    self._op_done(op)
                    if op[0] == "checkpoint":
                        waiting.discard(op[1])
                    if not waiting or self._error is not None:
                        return
                    with contextlib.suppress(queue.Empty):
                        next_op = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))

            try:
                self._publish(self._file, build)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                self._error = exc
                self._file = None  # closed and removed: nothing is at path
        last_flush = time.monotonic()
        dirty = False  # rows written since the last flush
        while True:
            if next_op is not None:
                op, next_op = next_op, None
            else:
                try:
                    op = self._queue.get(timeout=self._flush_interval)
                except queue.Empty:  # a quiet spell: make what was written visible
                    if dirty and self._error is None:
                        try:
                            self._flush_file()
                        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                            self._error = exc
                        last_flush, dirty = time.monotonic(), False
                    continue
            kind = op[0]
            if kind == "stop":
                if self._error is None:
                    try:
                        self._flush_file()
                    except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                        self._error = exc
                return
            if self._error is None:
                try:
                    flushed = self._apply(op)
                    now = time.monotonic()
                    if flushed:
                        last_flush, dirty = now, False
                    elif now - last_flush >= self._flush_interval:
                        # flushing is costly (metadata for SWMR readers): at most once per
                        # interval, or after a quiet spell; flush(), checkpoints and close()
                        # flush at once
                        self._flush_file()
                        last_flush, dirty = now, False
                    else:
                        dirty = True
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    self._error = exc
            self._op_done(op)

    def _op_done(self, op: tuple) -> None:
        """What follows an operation, carried out or not: its rows leave the queue's count, a
        flush's caller is woken."""
        kind = op[0]
        if kind == "rows":
            self._done_with(op[2][: op[3]].nbytes)
        elif kind == "blocks":
            self._done_with(op[2])
        elif kind == "flush":
            op[1].set()

    def _apply(self, op: tuple) -> bool:
        """Carry out one queued operation; True if it flushed the file itself."""
        kind = op[0]
        if kind == "rows":
            _, sb, block, n, owned = op
            # a buffer of this writer: its rows are written or copied (they are few) before
            # it is reused, so no waiting block is ever a view of a reused buffer
            self._gather(sb, block[:n], copy=owned)
            if owned and len(sb.spare) < 2:
                sb.spare.append(block)
            return False
        if kind == "blocks":
            for sb, block in op[1]:
                self._gather(sb, block)
            return False
        if kind == "checkpoint":
            _, run, step, arrays, rows = op
            self._write_checkpoint(run, step, arrays, rows)
            return True
        if kind == "status":
            _write_all(self._live[op[1]][0], _encode_status(op[2]))
            return False
        if kind == "steps":
            _write_all(self._live[op[1]][1], op[2])
            return False
        if kind == "flush":
            self._flush_file()
            return True
        raise AssertionError(f"unknown store operation {kind!r}")

    def _gather(self, sb: _Series, block: np.ndarray, copy: bool = False) -> None:
        """Write ``block`` (rows of ``sb``), or keep it (a copy of it with ``copy``) with the
        series' other small blocks until they make a whole chunk (or ``_WRITE_BYTES`` if chunks
        hold parts of rows). A big block is written as it is, after the blocks waiting before
        it: never copied, but for the rows that complete the chunk those blocks end in. Writes
        stop at a chunk boundary: the rows after it wait (copied) for the next block or flush,
        so that no chunk is written twice (a compressed one would be read back, decompressed
        and compressed again)."""
        key = (sb.run, sb.name)
        if block.nbytes >= _WRITE_BYTES:
            waiting = self._gathered.pop(key, [0])[1:]
            if waiting:
                rows = self._layout(key)[0]
                end = self._written[key] + sum(len(w) for w in waiting)
                k = min(len(block), -end % rows if rows else 0)
                self._write_block(key, np.concatenate([*waiting, block[:k]], dtype=sb.dtype))
                block = block[k:]
            self._write_block(key, block, keep_tail=True)
            return
        gathered = self._gathered.setdefault(key, [0])
        gathered.append(block.copy() if copy else block)
        gathered[0] += block.nbytes
        rows = self._layout(key)[0]
        # (rows are written as soon as they make a whole chunk: what waits for the end of a run,
        # when nothing else is left to do, is at most the last chunk of each series)
        if gathered[0] >= (_WRITE_BYTES if rows is None else rows * sb.row_bytes):
            self._write_gathered(key, keep_tail=True)

    def _write_gathered(self, key: tuple[str, str], keep_tail: bool = False) -> None:
        blocks = self._gathered.pop(key)[1:]
        self._write_block(key, blocks[0] if len(blocks) == 1 else
                          np.concatenate(blocks, dtype=blocks[0].dtype), keep_tail)

    def _layout(self, key: tuple[str, str]) -> tuple[int | None, bool]:
        """(rows per chunk if the chunks of series ``key`` hold whole rows, else None; whether
        its compression may be skipped chunk by chunk)."""
        if key not in self._chunk_layout:
            ds = self._datasets[key]
            chunks = ds.chunks
            rows = chunks[0] if chunks is not None and chunks[1:] == ds.shape[1:] else None
            one_filter = ds.id.get_create_plist().get_nfilters() == 1
            # (reading a chunk's stored size needs HDF5 1.10.5)
            readable = hasattr(ds.id, "get_chunk_info_by_coord")
            self._chunk_layout[key] = (rows, rows is not None and self._adaptive and one_filter
                                       and readable)
        return self._chunk_layout[key]

    def _new_chunk_bytes(self, key: tuple[str, str], ds: h5py.Dataset, start: int,
                         n: int) -> int:
        """Bytes of disk the chunks that rows ``start`` .. ``start + n`` of series ``key``
        begin may take: HDF5 gives a chunk its whole size (or, compressed, at most about
        that) when it first writes it, however few rows it holds."""
        if key not in self._band_bytes:
            chunks = ds.chunks
            per_band = math.prod(-(-size // c) for size, c in zip(ds.shape[1:], chunks[1:]))
            chunk = math.prod(chunks) * ds.dtype.itemsize + 64  # (+ a compressor's header)
            self._band_bytes[key] = (chunks[0], per_band * chunk)
        rows, band = self._band_bytes[key]
        first = -(-start // rows)  # the first band no earlier row has begun
        last = (start + n - 1) // rows
        return max(0, last - first + 1) * band

    def _write_block(self, key: tuple[str, str], block: np.ndarray,
                     keep_tail: bool = False) -> None:
        """Append ``block`` to series ``key``. ``keep_tail``: the rows after its last chunk
        boundary are kept (copied) in ``_gathered`` instead (which holds nothing for ``key``)."""
        rows, adaptive = self._layout(key)
        start = self._written[key]
        tail = None  # kept only once the rows before it are written (if a write fails, the
        if keep_tail and rows:  # rows after it must not be written in their place)
            cut = max(0, len(block) - (start + len(block)) % rows)
            if cut < len(block):
                tail = block[cut:].copy()
                block = block[:cut]
        n = len(block)
        if n:
            self._write_rows_of(key, block, start, rows, adaptive)
        if tail is not None:
            self._gathered[key] = [tail.nbytes, tail]

    def _write_rows_of(self, key: tuple[str, str], block: np.ndarray, start: int,
                       rows: int | None, adaptive: bool) -> None:
        """Write ``block`` at row ``start`` of series ``key``: its whole chunks directly and
        unfiltered if the series' compression does not pay (see _MIN_SAVING)."""
        n = len(block)
        ds = self._datasets[key]
        self._check_room(self._new_chunk_bytes(key, ds, start, n))
        dsid = ds.id
        dsid.set_extent((start + n, *block.shape[1:]))
        done = 0
        if adaptive and self._raw_chunks.get(key) is not False and block.dtype == ds.dtype \
                and block.flags.c_contiguous:
            head = min(n, -start % rows)  # rows before the first chunk boundary
            whole = head + (n - head) // rows * rows  # end of the whole chunks in the block
            if key not in self._raw_chunks and whole > head:  # try the filter on one chunk
                done = head + rows
                _write_rows(dsid, start, block[:done])
                size = dsid.get_chunk_info_by_coord((start + head,) + (0,) * (block.ndim - 1)).size
                self._raw_chunks[key] = size > (1 - _MIN_SAVING) * block[head:done].nbytes
            if self._raw_chunks.get(key) and whole > max(done, head):
                if done < head:
                    _write_rows(dsid, start, block[:head])
                    done = head
                zeros = (0,) * (block.ndim - 1)
                # filter mask 1: the filter was skipped. (HDF5 2.0: such a chunk does not read
                # back through this same handle until another chunk is looked up; nothing here
                # reads one back, and readers open their own handles.)
                for r in range(done, whole, rows):
                    dsid.write_direct_chunk((start + r, *zeros), block[r:r + rows], 1)
                done = whole
        if done < n:
            _write_rows(dsid, start + done, block[done:])
        self._written[key] = start + n

    def _write_checkpoint(self, run: str, step: int, arrays: dict[str, np.ndarray],
                          rows: np.ndarray) -> None:
        # Fill the slot the pointer does not name, flush, then switch the pointer and flush:
        # a kill at any moment leaves the pointer on a complete checkpoint.
        current, slots = self._ckpt[run]
        slot = 1 - self._ckpt_slot[run] if self._ckpt_slot[run] >= 0 else 0
        _fill_slot(slots[slot], step, arrays, rows)
        _write_all(self._live[run][1], step)
        self._flush_file()
        _write_all(current, slot)
        self._flush_file()
        self._ckpt_slot[run] = slot

    def _flush_file(self) -> None:
        for key in list(self._gathered):
            self._write_gathered(key)
        self._check_room(0)
        self._file.flush()
        self._check_at_path()
        self._flushed.update(self._written)
        # the room HDF5 may need for what it writes beyond the rows, reserved: HDF5 cannot flush
        # or close a file whose metadata it could not write
        self._reserve(self._headroom)

    def _check_room(self, nbytes: int, f: h5py.File | None = None) -> None:
        """StoreError unless the disk, and this process's file size limit (RLIMIT_FSIZE, as set
        by ``ulimit -f`` or a batch system), leave room for ``nbytes`` more and then for all
        HDF5 may still write (``_headroom``). HDF5 does not recover from a write that fails for
        want of room: it may then be unable to flush or close the file at all (and the process
        crashes when it exits), so the writer stops short, leaving a complete file. The room
        is measured (a statvfs) again once half the room measured is used."""
        need = nbytes + self._headroom
        if need > self._room_left:
            f = f or self._file
            fd, allocated = f.id.get_vfd_handle(), f.id.get_filesize()
            # (the disk's free room, and that reserved past what HDF5 allocated: see _reserve)
            room = _free_bytes(fd) + max(0, os.fstat(fd).st_size - allocated)
            full = "the disk holding it is full"
            if self._size_limit is not None:
                below_limit = self._size_limit - allocated
                if below_limit < room:
                    room, full = below_limit, ("it would outgrow this process's file size "
                                               f"limit of {self._size_limit} bytes "
                                               "(RLIMIT_FSIZE; see `ulimit -f`)")
            if need > room:
                raise StoreError(f"cannot write {self.path} further: {full} ({max(room, 0)} "
                                 f"bytes left; {need} needed to go on)")
            # (what HDF5 writes beyond the rows counted here, and what other files take, are
            # caught by measuring again long before the room runs out)
            self._room_left = max(need, room // 2)
        self._room_left -= nbytes

    def _reserve(self, nbytes: int, f: h5py.File | None = None) -> None:
        """Make sure ``nbytes`` of disk are reserved past the space HDF5 has allocated, so that
        its next writes of that size cannot fail for want of room, which a statvfs does not
        tell (a disk quota, another process filling the disk); StoreError if there is no room.
        Reserves twice that when it must, so that most calls cost an fstat. HDF5 gives back
        what it did not use when it closes the file (it truncates it to the space it
        allocated; some flushes do too)."""
        if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS, Windows
            return
        f = f or self._file
        fd, allocated = f.id.get_vfd_handle(), f.id.get_filesize()
        if os.fstat(fd).st_size >= allocated + nbytes:
            return
        size = 2 * nbytes
        # (past the limit a write fails with EFBIG, which HDF5 may not recover from; a process
        # that does not ignore SIGXFSZ, as CPython does, is killed)
        if self._size_limit is not None:
            size = min(size, self._size_limit - allocated)
            if size < nbytes:
                raise StoreError(f"cannot write {self.path} further: it would outgrow this "
                                 f"process's file size limit of {self._size_limit} bytes "
                                 "(RLIMIT_FSIZE; see `ulimit -f`)")
        for attempt in sorted({size, nbytes}, reverse=True):
            try:
                os.posix_fallocate(fd, allocated, attempt)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    return  # (e.g. EOPNOTSUPP: cannot reserve here; HDF5 extends the file)
                if attempt == nbytes:
                    raise StoreError(f"cannot write {self.path} further: no room for the "
                                     f"next {nbytes} bytes ({exc.strerror})") from exc

    def _check_at_path(self) -> None:
        """StoreError if path no longer holds this writer's file (removed or replaced). The
        rows go on into the file this writer has open, which nothing can reach then."""
        if self._identity is None:  # not yet at path (being built at <path>.partial)
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:  # e.g. a directory on the way replaced by a file
            raise StoreError(f"{self.path} can no longer be reached while this run writes it "
                             f"({exc.strerror}): the run's rows are not at that path") from exc
        if st is None:
            raise StoreError(f"{self.path} was removed (or moved away) while this run wrote "
                             "it: the run's rows are not at that path")
        if (st.st_dev, st.st_ino) != self._identity:
            raise StoreError(f"{self.path} was replaced by another file while this run wrote "
                             "it: the run's rows are not at that path (the other file was left "
                             "as it is)")

    # -- closing -----------------------------------------------------------------------------

    def _shutdown(self, final: bool) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        try:
            if self._error is None:
                try:
                    self._push_all()
                except StoreError:
                    pass  # the writer failed meanwhile; reported below
            self._queue.put(("stop",))  # the queue is unbounded: this never waits
            self._thread.join()
            if self._error is not None:
                self._mark_failed_after_error()
                raise StoreError(f"writing {self.path} failed: {self._error}") from self._error
            if final:
                self._finish()
            else:  # abandoned at interpreter exit: rows are flushed, statuses stay as they are
                self._close_after_flush()
        finally:
            self._lock.release()

    def _close_after_flush(self) -> None:
        """Flush and close the file; should the flush fail, close it dropping what it holds
        (see _close_file)."""
        f, self._file = self._file, None
        try:
            f.flush()
        except (OSError, RuntimeError, ValueError) as exc:
            _close_file(f, discard=True)
            raise StoreError(f"closing {self.path} failed: {exc}") from exc
        _give_back_reserve(f)
        try:
            f.close()
        except (OSError, RuntimeError, ValueError) as exc:  # pragma: no cover - flushed above
            raise StoreError(f"closing {self.path} failed: {exc}") from exc

    def _finish(self) -> None:
        final = {run: ("complete" if s == "running" else s) for run, s in self._status.items()}
        self._status.update(final)
        try:
            for run, status in final.items():
                status_ds, steps_ds = self._live[run]
                status_ds[()] = _encode_status(status)
                steps_ds[()] = self._steps[run]
            if not self._swmr:
                self._write_final_attrs(self._file, final)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            _close_file(self._file, discard=True)
            self._file = None
            raise StoreError(f"closing {self.path} failed: {exc}") from exc
        self._close_after_flush()
        if self._swmr:
            # Attributes cannot change under SWMR: the file is closed (which ends SWMR) and
            # reopened. Live SWMR readers hold a shared lock on it; this writer holds its own
            # lock against other writers, so HDF5's lock is not needed. If the file cannot be
            # reopened (e.g. a reader in this very process), the live datasets, which every
            # reader here uses, still hold the final status. Only this writer's own file is
            # reopened: path is checked, then the file id of what opened.
            self._check_at_path()
            try:
                with h5py.File(self.path, "r+", libver=_LIBVER, locking=False) as f:
                    if _plain(f.attrs.get("file_id", "")) != self.file_id:
                        raise StoreError(f"{self.path} was replaced by another file while this "
                                         "run wrote it: the run's rows are not at that path "
                                         "(the other file was left as it is)")
                    self._write_final_attrs(f, final)
            except StoreError:
                raise
            except OSError as exc:
                warnings.warn(f"{self.path}: the final status attributes were not written "
                              f"({exc}); live/status holds the final status", stacklevel=4)

    def _write_final_attrs(self, f: h5py.File, final: Mapping[str, str]) -> None:
        for run, status in final.items():
            f[run].attrs["status"] = status
            f[run].attrs["steps_done"] = self._steps[run]

    def _mark_failed_after_error(self) -> None:
        """After an error in the writer thread: cut each series to the rows really in the file
        (flushed), record the failure if the file still takes writes, and close it whatever
        happens. Best effort only: the file may be what failed, and the original error is
        raised."""
        f, self._file = self._file, None
        if f is None:  # never at path (or closed already)
            return
        reason = f"failed: write error: {self._error}"
        # After a write that failed in HDF5, a later flush that succeeds does not mean the rows
        # written before it are in the file: HDF5 drops a chunk it could not write. Rows go on
        # being written only if none were waiting in HDF5 then, or if the writer itself
        # stopped (its own StoreError: HDF5 had no error).
        waiting = any(self._written[key] > n for key, n in self._flushed.items())
        if not waiting or isinstance(self._error, StoreError):
            with contextlib.suppress(Exception):  # the rows still waiting in the thread
                for key in list(self._gathered):
                    self._write_gathered(key)
            with contextlib.suppress(Exception):
                f.flush()
                self._flushed.update(self._written)
        # Rows not flushed may be missing from the file (their chunks could not be written)
        # even where a failed flush wrote the series' new lengths: they would read as zeros.
        with contextlib.suppress(Exception):
            for key, ds in self._datasets.items():
                if ds.id.shape[0] > self._flushed[key]:
                    ds.id.set_extent((self._flushed[key], *ds.id.shape[1:]))
        with contextlib.suppress(Exception):
            for run, status in self._status.items():  # (a failed one may be set only here)
                status_ds = self._live[run][0]
                _write_all(status_ds, _encode_status(status if status.startswith("failed")
                                                     else reason))
                status_ds.id.flush()  # (written in place: it gets there on a full disk too)
        try:
            f.flush()
        except Exception:  # noqa: BLE001 - what could not be written is dropped
            _close_file(f, discard=True)
        else:
            _close_file(f)

    def _close_at_exit(self) -> None:
        try:
            self._shutdown(final=False)
        except StoreError as exc:  # pragma: no cover - nothing left to report to
            print(f"fastrace: {exc}", file=sys.stderr)


def _close_file(f: h5py.File, discard: bool = False) -> None:
    """Close ``f`` and never raise. ``discard``: its descriptor is first pointed at a scratch
    file, so that what HDF5 still writes for it (the rows and metadata it could not write, the
    size it extends the file to) goes there and the file on disk stays as it is. (HDF5 cannot
    close a file whose data it cannot write, e.g. on a full disk: the file then stays open
    inside HDF5, half torn down, and the process crashes when it exits.)"""
    with contextlib.suppress(Exception):
        if not f.id.valid:
            return
        _give_back_reserve(f)
        if discard:
            fd = f.id.get_vfd_handle()
            scratch = _scratch_fd()
            try:
                os.dup2(scratch, fd)
            finally:
                os.close(scratch)
        f.close()


def _give_back_reserve(f: h5py.File) -> None:
    """Cut the open file ``f`` to the space HDF5 has allocated: the disk reserved past it (see
    TrajectoryWriter._reserve), which HDF5 does not always cut itself when it closes."""
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        fd, allocated = f.id.get_vfd_handle(), f.id.get_filesize()
        if os.fstat(fd).st_size > allocated:
            os.ftruncate(fd, allocated)


def _scratch_fd() -> int:
    """A descriptor that takes writes anywhere and any file size: a file in memory (Linux),
    else /dev/null (which refuses to change size: HDF5 may then fail to close the file)."""
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return os.memfd_create("fastrace-discarded", os.MFD_CLOEXEC)
    return os.open(os.devnull, os.O_RDWR)


def _headroom(specs: Mapping[str, RunSpec]) -> int:
    """Bytes HDF5 may write for the runs ``specs`` beyond the chunks counted as their rows
    are written (see TrajectoryWriter._new_chunk_bytes): metadata."""
    return _ROOM_SLACK + _metadata_bytes(specs)


def _metadata_bytes(specs: Mapping[str, RunSpec]) -> int:
    """A generous bound on the metadata of the layout of the runs ``specs``."""
    return _ROOM_PER_DATASET * sum(len(spec.series) + 2 * len(spec.checkpoint) + 8
                                   for spec in specs.values())


def _layout_bytes(specs: Mapping[str, RunSpec]) -> int:
    """Bytes of the layout of the runs ``specs``: both checkpoint slots, and metadata."""
    return _metadata_bytes(specs) + sum(
        2 * math.prod(shape) * dtype.itemsize
        for spec in specs.values() for shape, dtype in spec.checkpoint.values())


def _free_bytes(fd: int) -> int:
    """Bytes free (to this user) on the file system holding the open file ``fd``."""
    if not hasattr(os, "fstatvfs"):  # pragma: no cover - Windows
        return sys.maxsize
    st = os.fstatvfs(fd)
    if st.f_blocks == 0:  # no size: ramfs, a tmpfs without a limit
        return sys.maxsize
    # (root may also use the blocks a file system keeps back for it: ext4's 5 %)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _file_size_limit() -> int | None:
    """This process's limit on the size of the files it writes (RLIMIT_FSIZE), or None."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _write_rows(dsid: h5d.DatasetID, start: int, block: np.ndarray) -> None:
    """Write ``block`` at row ``start`` of a dataset already extended to hold it."""
    # h5py's low-level calls: a quarter of the Python overhead of resize and slicing
    file_space = dsid.get_space()
    file_space.select_hyperslab((start,) + (0,) * (block.ndim - 1), block.shape)
    dsid.write(h5s.create_simple(block.shape), file_space, block)


def _fill_slot(slot: Mapping[str, h5py.Dataset], step: int, arrays: Mapping[str, np.ndarray],
               rows: np.ndarray) -> None:
    for name, arr in arrays.items():
        _write_all(slot[f"state/{name}"], arr)
    _write_all(slot["step"], step)
    _write_all(slot["rows"], rows)


def _write_all(ds: h5py.Dataset, value: Any) -> None:
    """Overwrite the whole (small, fixed-shape) dataset ``ds`` with ``value``."""
    arr = np.ascontiguousarray(value, dtype=ds.dtype)
    if arr.size != ds.size:  # the low-level write would read past the end of ``arr``
        raise StoreError(f"{ds.name} holds {ds.size} values, not {arr.size}")
    ds.id.write(h5s.ALL, h5s.ALL, arr)


def _check_same_layout(path: Path, run: str, group: h5py.Group, spec: RunSpec) -> None:
    stored = _series_names(group)
    if list(stored) != list(spec.series):
        raise StoreError(f"cannot resume {path}: run {run!r} stores series {stored}, "
                         f"not {list(spec.series)}")
    for name, (shape, dtype) in spec.series.items():
        ds = group[name]
        if ds.shape[1:] != shape or ds.dtype != dtype:
            raise StoreError(f"cannot resume {path}: series {name!r} of run {run!r} has rows "
                             f"{ds.shape[1:]} {ds.dtype}, not {shape} {dtype}")
    names = json.loads(_plain(group["checkpoint"].attrs["names"]))
    if list(names) != list(spec.checkpoint):
        raise StoreError(f"cannot resume {path}: run {run!r} checkpoints {names}, "
                         f"not {list(spec.checkpoint)}")
    for name, (shape, dtype) in spec.checkpoint.items():
        ds = group["checkpoint/slot0/state"][name]
        if ds.shape != shape or ds.dtype != dtype:
            raise StoreError(f"cannot resume {path}: checkpoint {name!r} of run {run!r} is "
                             f"{ds.shape} {ds.dtype}, not {shape} {dtype}")


def _read_checkpoint(group: h5py.Group, spec: RunSpec) -> Checkpoint | None:
    ck = group["checkpoint"]
    slot = int(ck["current"][()])
    if slot not in (0, 1):
        return None
    sg = ck[f"slot{slot}"]
    rows = sg["rows"][()]
    state = {name: np.asarray(sg["state"][name][()], dtype=dtype)
             for name, (_, dtype) in spec.checkpoint.items()}
    return Checkpoint(int(sg["step"][()]), state,
                      {name: int(n) for name, n in zip(spec.series, rows, strict=True)})


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, n: int) -> None:
    """Copy the first ``n`` rows of ``src`` into the empty ``dst``: stored chunks as they are
    (compressed or not, never decoded) when both have the same chunks and filters, the rest
    through HDF5."""
    if src.shape[0] < n:
        raise StoreError(f"{src.file.filename}: series {src.name} has {src.shape[0]} rows but "
                         f"its checkpoint counts {n}; the file is inconsistent")
    dst.resize(n, axis=0)
    done = _copy_whole_chunks(src, dst, n)
    row_bytes = max(1, math.prod(src.shape[1:]) * src.dtype.itemsize)
    step = max(1, _COPY_BYTES // row_bytes)
    for start in range(done, n, step):
        stop = min(n, start + step)
        dst[start:stop] = src[start:stop]


# Filters whose chunks describe themselves (blosc: a header names the codec and sizes), so that a
# chunk stored under other options of the same filter decodes all the same.
_SELF_DESCRIBING_FILTERS = frozenset({32001})


def _filters(ds: h5py.Dataset) -> list[tuple[int, tuple[int, ...] | None]]:
    """The filter pipeline of ``ds``: (id, options), the options only where decoding needs them."""
    plist = ds.id.get_create_plist()
    pipeline = []
    for i in range(plist.get_nfilters()):
        filter_id, _, options, _ = plist.get_filter(i)
        pipeline.append((filter_id, None if filter_id in _SELF_DESCRIBING_FILTERS
                         else tuple(options)))
    return pipeline


def _copy_whole_chunks(src: h5py.Dataset, dst: h5py.Dataset, n: int) -> int:
    """Copy the stored chunks of ``src`` that lie within its first ``n`` rows into ``dst``
    byte for byte, with their filter masks; the rows copied (0 if the layouts differ).
    StoreError if a chunk lies past the end of the file (it was cut short): its bytes are not
    decoded here, so nothing else would notice."""
    chunk = src.chunks
    if chunk is None or chunk != dst.chunks or src.shape[1:] != dst.shape[1:] \
            or src.id.get_type() != dst.id.get_type() or _filters(src) != _filters(dst) \
            or not hasattr(src.id, "get_chunk_info_by_coord") \
            or not hasattr(src.id, "read_direct_chunk"):
        return 0
    file_end = os.path.getsize(src.file.filename)
    whole = n - n % chunk[0]
    grid = [range(0, size, c) for size, c in zip(src.shape[1:], chunk[1:])]
    for t in range(0, whole, chunk[0]):
        for inner in itertools.product(*grid):
            offset = (t, *inner)
            try:
                info = src.id.get_chunk_info_by_coord(offset)
                if info.byte_offset is None:  # never stored: the rows from here go through HDF5
                    return t
                stored_inside = info.byte_offset + info.size <= file_end
                if stored_inside:
                    mask, data = src.id.read_direct_chunk(offset)
                    dst.id.write_direct_chunk(offset, data, mask)
            except (KeyError, OSError, ValueError, RuntimeError):
                return t
            if not stored_inside:
                raise StoreError(f"{src.file.filename}: series {src.name!r} has rows past the "
                                 "end of the file (it was cut short)")
    return whole


# ----------------------------------------------------------------------------- readers


def _open_read(path: str | os.PathLike[str]) -> h5py.File:
    """Open a fastrace file for reading, also while a writer streams into it (SWMR)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise StoreError(f"{p}: no such file")
    if os.path.isdir(p):
        raise StoreError(f"{p} is a directory, not a fastrace file")
    if not stat.S_ISREG(os.stat(p).st_mode):  # (HDF5 would wait forever on a FIFO's open)
        raise StoreError(f"{p} is not a regular file (a FIFO or a device), not a fastrace file")
    _load_filter_plugins()
    # A plain read-only open first: it works for every closed file and fails at once on a file a
    # writer has open. (A SWMR reader retries metadata reads that fail their checksum, with
    # pauses, so on a damaged file it would take a very long time to give up.)
    for attempt in range(3):
        try:
            f = h5py.File(p, "r")
            break
        except OSError as exc:
            if "truncated file" in str(exc) and attempt < 2:
                # A writer extending the file may have recorded its new end a moment before the
                # data there is written (HDF5 checks the end before the writer's flag): look
                # again shortly. A file still cut short is refused, never read (HDF5 would read
                # zeros where data is missing, or retry a SWMR open of cut metadata for minutes),
                # even a writer's killed in that very moment (none of 14 random kills here).
                time.sleep(0.05)
                continue
            if "already open for write" not in str(exc):
                raise StoreError(f"{p} is not a readable HDF5 file ({exc})") from exc
        try:  # a writer streams into the file, or was killed while it did
            f = _open_swmr_read(p)
            break
        except OSError as exc:
            # For a few milliseconds at the end of a run the writer has the file open without
            # SWMR to write the final attributes: try again shortly.
            if "not already open for SWMR" in str(exc) and attempt < 2:
                time.sleep(0.05)
                continue
            raise StoreError(f"{p} is not a readable HDF5 file ({exc})") from exc
    try:
        fmt = _plain(f.attrs.get("format", ""))
        version = _plain(f.attrs.get("format_version", 0))
    except (OSError, RuntimeError, KeyError) as exc:
        f.close()
        raise StoreError(f"{p} is damaged ({exc})") from exc
    if not (isinstance(fmt, str) and fmt == "fastrace"):
        f.close()
        raise StoreError(f"{p} is not a fastrace file (no root attribute format='fastrace')")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        f.close()
        raise StoreError(f"{p} has format version {version}; this fastrace reads up to "
                         f"{FORMAT_VERSION}: upgrade fastrace")
    return f


# A SWMR reader retries a metadata read that fails its checksum (a writer may be writing it),
# pausing 1 ns, 2 ns, 4 ns, ... between attempts: HDF5's default of 100 attempts waits for hours
# on a damaged file (a killed writer's, say). 24 attempts wait ~17 ms in all, ample for a live
# writer's metadata, which takes microseconds to write.
_SWMR_READ_ATTEMPTS = 24


def _open_swmr_read(p: str) -> h5py.File:
    """``h5py.File(p, "r", libver="latest", swmr=True)``, with _SWMR_READ_ATTEMPTS."""
    lib = _hdf5_library()
    if lib is None:  # (HDF5's default retries, then)
        return h5py.File(p, "r", libver="latest", swmr=True)
    from h5py._hl.files import make_fapl

    fapl = make_fapl(None, libver="latest")
    with phil:  # h5py's lock on the HDF5 library, which it calls from any thread
        if lib.H5Pset_metadata_read_attempts(fapl.id, _SWMR_READ_ATTEMPTS) < 0:
            return h5py.File(p, "r", libver="latest", swmr=True)
    return h5py.File(h5f.open(os.fsencode(p), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ, fapl=fapl))


@functools.cache
def _hdf5_library() -> ctypes.CDLL | None:
    """The HDF5 library h5py runs on, for a call h5py does not wrap; None if it is not found
    (found among the process's mapped files: Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libhdf5" in line})
    except OSError:
        return None
    for path in paths:
        if "_hl" in os.path.basename(path):
            continue
        try:
            lib = ctypes.CDLL(path)
            fn = lib.H5Pset_metadata_read_attempts
            version = (ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint())
            lib.H5get_libversion(*(ctypes.byref(v) for v in version))
        except (OSError, AttributeError):
            continue
        if tuple(v.value for v in version) != h5py.version.hdf5_version_tuple[:3]:
            continue  # another HDF5 than h5py's
        fn.argtypes = [ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lib
    return None


def _series_names(group: h5py.Group) -> list[str]:
    """The series names a run group lists (TypeError if its attribute is not such a list)."""
    names = json.loads(_plain(group.attrs["series"]))
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise TypeError("its series attribute is not a list of names")
    return names


def _runs_of(f: h5py.File) -> list[str]:
    return [name for name, obj in f.items()
            if isinstance(obj, h5py.Group) and "series" in obj.attrs]


@dataclass
class RunData:
    """One run read from a file: ``series`` (time-first arrays), the run's ``attrs``, its
    ``status`` and ``steps_done``. ``data["t"]`` is ``data.series["t"]``."""

    name: str
    series: dict[str, np.ndarray]
    attrs: dict[str, Any]
    status: str
    steps_done: int

    def __getitem__(self, name: str) -> np.ndarray:
        return self.series[name]


class RunReader:
    """A run open for (live) reading. ``refresh()`` picks up rows flushed since; ``reader[name]``
    reads a whole series; ``status``, ``steps_done`` and ``lengths`` are live."""

    def __init__(self, path: str | os.PathLike[str], run: str):
        self.path = os.fspath(path)
        self.run = run
        self._file = _open_read(path)
        try:
            if run not in _runs_of(self._file):
                raise StoreError(f"{self.path} has no run {run!r}; its runs are "
                                 f"{_runs_of(self._file)}")
            group = self._file[run]
            self.series_names: list[str] = _series_names(group)
            self._datasets = {name: group[name] for name in self.series_names}
            self._status = group["live/status"]
            self._steps = group["live/steps_done"]
            self.attrs = {key: _plain(value) for key, value in group.attrs.items()
                          if key not in _RESERVED_RUN_ATTRS}
        except StoreError:
            self._file.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            self._file.close()
            raise StoreError(f"{self.path}: run {run!r} is damaged ({exc})") from exc
        except BaseException:
            self._file.close()
            raise

    def refresh(self) -> None:
        """See rows and status flushed by the writer since the last refresh."""
        if not self._file.swmr_mode:
            return
        for ds in (*self._datasets.values(), self._status, self._steps):
            ds.refresh()

    @property
    def lengths(self) -> dict[str, int]:
        return {name: ds.shape[0] for name, ds in self._datasets.items()}

    @property
    def status(self) -> str:
        return _decode_status(self._status[()])

    @property
    def steps_done(self) -> int:
        return int(self._steps[()])

    @property
    def file_id(self) -> str:
        """The file's root attribute file_id: each file written (or resumed) gets its own, the
        writer's ``TrajectoryWriter.file_id`` ("" for files from before ids were written)."""
        return str(_plain(self._file.attrs.get("file_id", "")))

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._datasets:
            raise StoreError(f"run {self.run!r} has no series {name!r}; it has "
                             f"{self.series_names}")
        try:
            return self._datasets[name][()]
        except (OSError, RuntimeError) as exc:
            raise StoreError(f"{self.path}: cannot read series {name!r} of run {self.run!r} "
                             f"({exc})") from exc

    def read(self, names: Iterable[str] | None = None) -> RunData:
        """The series ``names`` (default: all) with the run's attrs, status and steps done.
        The status is read first: a run it says is complete has all its rows in the series."""
        status, steps = self.status, self.steps_done
        self.refresh()
        series = {name: self[name] for name in (self.series_names if names is None else names)}
        return RunData(self.run, series, dict(self.attrs), status, steps)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _row_key(key: Any, n: int, name: str) -> Any:
    """``key`` checked and made non-negative: an index, a slice of positive step, or either
    followed by indices into the row. Anything else raises IndexError (HDF5 reads rows in
    increasing order only)."""
    if key is Ellipsis or (isinstance(key, tuple) and not key):
        return key  # every row
    first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, None)
    if isinstance(first, bool | np.bool_):
        raise IndexError(f"series {name!r}: a boolean index reads nothing from the file; use "
                         "np.asarray(series)[mask]")
    if isinstance(first, int | np.integer):
        if not -n <= first < n:
            raise IndexError(f"row {first} out of range for series {name!r} of {n} rows")
        first = int(first) % n
    elif isinstance(first, slice):
        if first.step is not None and first.step < 1:
            raise IndexError(f"series {name!r}: rows are read in increasing order; slice with "
                             "a positive step and reverse the result")
    elif first is not Ellipsis:
        raise IndexError(f"series {name!r} takes an index or a slice of rows, got {key!r}; "
                         "use np.asarray(series)[...] for other indexing")
    return first if rest is None else (first, *rest)


def _read_rows(ds: h5py.Dataset, key: Any, path: str, run: str, name: str,
               rows: int) -> np.ndarray:
    """Rows ``key`` of the first ``rows`` rows of ``ds`` (a series that is still growing)."""
    if ds.shape[0] < rows:
        raise StoreError(f"{path}: series {name!r} of run {run!r} has {ds.shape[0]} rows, "
                         f"fewer than the {rows} it had")
    key = _row_key(key, rows, name)
    try:
        if ds.shape[0] == rows:
            return ds[key]
        # the file has grown since: keep to the first ``rows`` rows
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
        if isinstance(first, slice):
            return ds[(slice(*first.indices(rows)), *rest)]
        if isinstance(first, int):
            return ds[key]
        return ds[0:rows][key]  # every row (an Ellipsis first): numpy indexes them
    except (TypeError, ValueError) as exc:  # the indices into the row
        raise IndexError(f"series {name!r}: cannot index it with {key!r} ({exc})") from exc
    except (OSError, RuntimeError) as exc:
        raise StoreError(f"{path}: cannot read series {name!r} of run {run!r} ({exc})") from exc


class StoredSeries:
    """One series of a run in a file, read from the file when indexed: ``series[i]`` is row
    ``i`` (negative counts from the end), ``series[a:b]`` rows (positive step), either followed
    by indices into the row; ``np.asarray(series)`` reads every row. For trajectories too big to
    keep in memory. Each read opens the file (about a millisecond): read blocks of rows rather
    than one row at a time (``read_stored_rows`` reads several series with one opening).

    It reads the file it was made from: if the path now holds another file (a new run written
    to the same path, or a resumed one), reading raises StoreError rather than returning rows
    of another run."""

    def __init__(self, path: str | os.PathLike[str], run: str, name: str):
        with RunReader(path, run) as reader:
            self._init(reader, name)

    @classmethod
    def _of(cls, reader: RunReader, name: str, rows: int | None = None) -> StoredSeries:
        """The series ``name`` of the run open in ``reader`` (no second opening of the file),
        cut to its first ``rows`` rows if given."""
        series = cls.__new__(cls)
        series._init(reader, name, rows)
        return series

    def _init(self, reader: RunReader, name: str, rows: int | None = None) -> None:
        if name not in reader.series_names:
            raise StoreError(f"run {reader.run!r} has no series {name!r}; it has "
                             f"{reader.series_names}")
        self.path = os.path.abspath(reader.path)
        self.run, self.name = reader.run, name
        ds = reader._datasets[name]
        # the rows there are now: a series of a run still written does not change under its
        # reader (len, shape and indexing agree)
        n = ds.shape[0] if rows is None else min(rows, ds.shape[0])
        self.shape: tuple[int, ...] = (n, *ds.shape[1:])
        self.dtype: np.dtype = ds.dtype
        self._identity = _file_identity(reader._file)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return read_stored_rows([self], key)[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a StoredSeries is read from its file: it cannot be viewed "
                             "without a copy")
        rows = self[...]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return (f"StoredSeries({self.path!r}, run={self.run!r}, name={self.name!r}, "
                f"shape={self.shape}, dtype={self.dtype})")


def _file_identity(f: h5py.File) -> tuple[int, int, str]:
    """(device, inode, file id) of an open file: a file written anew at the same path has
    another id (files from before ids were written have none: the inode alone tells them)."""
    st = os.fstat(f.id.get_vfd_handle())
    return st.st_dev, st.st_ino, str(_plain(f.attrs.get("file_id", "")))


def read_stored_rows(series: Sequence[StoredSeries], key: Any) -> list[np.ndarray]:
    """Rows ``key`` of each series, the file of each opened once (``Trajectory.weights`` reads
    every edge of a save point this way)."""
    out: list[Any] = [None] * len(series)
    by_file: dict[tuple[str, tuple[int, int, str]], list[int]] = {}
    for i, s in enumerate(series):
        by_file.setdefault((s.path, s._identity), []).append(i)
    for (path, identity), which in by_file.items():
        with _open_read(path) as f:
            if _file_identity(f) != identity:
                raise StoreError(f"{path} is no longer the file these rows were read from (it "
                                 "was written again, or resumed): read the run from it anew")
            for i in which:
                s = series[i]
                try:
                    ds = f[s.run][s.name]
                except KeyError as exc:
                    raise StoreError(f"{path}: run {s.run!r} has no series {s.name!r}") from exc
                out[i] = _read_rows(ds, key, path, s.run, s.name, len(s))
    return out


def open_run(path: str | os.PathLike[str], run: str) -> RunReader:
    """Open ``run`` of the file at ``path`` for reading, also while it is being written."""
    return RunReader(path, run)


def read_run(path: str | os.PathLike[str], run: str) -> RunData:
    """Read every series of ``run`` with its attrs, status and steps done."""
    with RunReader(path, run) as reader:
        return reader.read()


def run_status(path: str | os.PathLike[str], run: str) -> str:
    """The live status of ``run``: ``"running"``, ``"complete"`` or ``"failed: <reason>"``."""
    with RunReader(path, run) as reader:
        return reader.status


def list_runs(path: str | os.PathLike[str]) -> list[str]:
    """Names of the runs stored in the file, in the order they were created."""
    with _open_read(path) as f:
        return _runs_of(f)


def run_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A summary of the file for ``fastrace info``: root attrs, network JSON, and per run its
    status, steps done, attrs, series shapes/dtypes and last checkpoint step."""
    with _open_read(path) as f:
        try:
            info: dict[str, Any] = {"path": os.fspath(path)}
            info.update({key: _plain(value) for key, value in f.attrs.items()})
            info["network_json"] = _plain(f["network"].attrs.get("json", "")) \
                if "network" in f else ""
            runs = {}
            for run in _runs_of(f):
                g = f[run]
                names = _series_names(g)
                slot = int(g["checkpoint/current"][()])
                runs[run] = {
                    "status": _decode_status(g["live/status"][()]),
                    "steps_done": int(g["live/steps_done"][()]),
                    "attrs": {k: _plain(v) for k, v in g.attrs.items()
                              if k not in _RESERVED_RUN_ATTRS},
                    "series": {n: {"shape": g[n].shape, "dtype": str(g[n].dtype)}
                               for n in names},
                    "checkpoint_step": int(g[f"checkpoint/slot{slot}/step"][()])
                    if slot in (0, 1) else None,
                }
            info["runs"] = runs
            return info
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise StoreError(f"{os.fspath(path)} is damaged ({exc})") from exc
