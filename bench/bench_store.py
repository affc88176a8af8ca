"""Throughput of streaming weight snapshots into HDF5: blosc-lz4 vs no compression vs memcpy.

Run with ``python -m pytest bench/bench_store.py --benchmark-only``. The amount written per
round is ``FASTRACE_BENCH_STORE_MB`` (default 512 MiB) of float64 64x64 weight snapshots,
appended one row at a time, as a simulation recording every step would. Each writer round is
timed from creation to ``close()`` (every row on disk, or at least in the page cache).
``extra_info`` adds the rate seen by the caller (until the last ``append`` returned) and the
rate per CPU-second of the background writer thread, its capacity when it has a core to
itself (wall-clock rates drop when other processes share the cores).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from fastrace.store import RunSpec, TrajectoryWriter

ROW_SHAPE = (64, 64)
ROW_BYTES = 8 * ROW_SHAPE[0] * ROW_SHAPE[1]
TOTAL_BYTES = int(os.environ.get("FASTRACE_BENCH_STORE_MB", "512")) << 20
N_ROWS = TOTAL_BYTES // ROW_BYTES


def _snapshots(n: int = 256) -> np.ndarray:
    """Slowly drifting weights, like consecutive gradient-descent steps."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(ROW_SHAPE) * 0.1
    drift = np.cumsum(rng.standard_normal((n, *ROW_SHAPE)) * 1e-3, axis=0)
    return w0 + drift


def _bench_writer(benchmark, tmp_path, compression: str) -> None:
    snapshots = _snapshots()
    path = tmp_path / "bench.h5"
    caller_seconds, writer_cpu_seconds = [], []

    def setup():
        path.unlink(missing_ok=True)
        return (), {}

    def write():
        spec = RunSpec({"weights/x->h": ROW_SHAPE})
        with TrajectoryWriter(path, {"sim": spec}, compression=compression) as w:
            clock = time.pthread_getcpuclockid(w._thread.ident)
            start = time.perf_counter()
            for i in range(N_ROWS):
                w.append("sim", {"weights/x->h": snapshots[i % len(snapshots)]})
            caller_seconds.append(time.perf_counter() - start)
            w.flush()
            writer_cpu_seconds.append(time.clock_gettime(clock))

    benchmark.pedantic(write, setup=setup, rounds=3, iterations=1)
    gigabytes = TOTAL_BYTES / 1e9
    benchmark.extra_info["GB_per_s_to_close"] = gigabytes / benchmark.stats.stats.mean
    benchmark.extra_info["GB_per_s_caller"] = gigabytes / float(np.mean(caller_seconds))
    benchmark.extra_info["GB_per_writer_cpu_s"] = gigabytes / float(np.mean(writer_cpu_seconds))
    benchmark.extra_info["compression_ratio"] = TOTAL_BYTES / path.stat().st_size


def test_append_weights_blosc_lz4(benchmark, tmp_path):
    pytest.importorskip("hdf5plugin")
    _bench_writer(benchmark, tmp_path, "blosc-lz4")


def test_append_weights_uncompressed(benchmark, tmp_path):
    _bench_writer(benchmark, tmp_path, "none")


def test_memcpy_baseline(benchmark):
    """The same rows copied one by one into a preallocated array: the ceiling for any store."""
    snapshots = _snapshots()
    out = np.empty((N_ROWS, *ROW_SHAPE))
    out.fill(0.0)  # touch every page before timing

    def copy():
        for i in range(N_ROWS):
            np.copyto(out[i], snapshots[i % len(snapshots)])

    benchmark.pedantic(copy, rounds=3, iterations=1)
    benchmark.extra_info["GB_per_s"] = TOTAL_BYTES / 1e9 / benchmark.stats.stats.mean
