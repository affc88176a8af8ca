"""Tests of fastrace.store: round trips, live reading, SIGKILL safety, resume, failures."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from unittest import mock
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrace import store
from fastrace.errors import StoreError
from fastrace.store import (
    RunSpec,
    TrajectoryWriter,
    list_runs,
    open_run,
    read_run,
    run_info,
    run_status,
)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

NETWORK_JSON = json.dumps({"nodes": {"x": 4, "h": 3}, "edges": ["x->h"]})
CKPT_EVERY = 25
SIM_SPEC = RunSpec(
    series={
        "t": (),
        "loss": (),
        "weights/x->h": ((4, 3), np.float32),
        "svals/x->h": (3,),
        "count": ((), np.int64),
        # noise in rows of 8 KB (chunks of 16 rows): blosc-lz4 barely shrinks it, so with
        # "auto" compression its whole chunks are written directly, unfiltered
        "noise": (1024,),
    },
    checkpoint={"w": (4, 3), "step": ((), np.int64)},
    attrs={"kind": "simulation", "lr": 0.02, "method": "gd"},
)


def make_rows(i0: int, i1: int) -> dict[str, np.ndarray]:
    """Rows i0..i1-1 of a deterministic trajectory (float32 weights are cast on storage)."""
    i = np.arange(i0, i1)
    return {
        "t": 0.02 * i,
        "loss": 1.0 / (1.0 + i),
        "weights/x->h": np.sin(i[:, None, None] + np.arange(12.0).reshape(4, 3)),
        "svals/x->h": np.cos(i[:, None] * np.arange(1.0, 4.0)),
        "count": i.astype(np.int64),
        "noise": np.array([np.random.default_rng(k).standard_normal(1024) for k in i])
        .reshape(len(i), 1024),
    }


def make_state(step: int) -> dict[str, np.ndarray]:
    return {"w": np.sin(step + np.arange(12.0).reshape(4, 3)), "step": np.int64(step)}


def assert_rows_match(series: dict[str, np.ndarray], n: int | None = None) -> None:
    """Every stored row equals the deterministic trajectory (row i of series s is row i)."""
    for name, arr in series.items():
        rows = len(arr) if n is None else n
        assert len(arr) == rows, name
        want = make_rows(0, rows)[name].astype(arr.dtype)
        np.testing.assert_array_equal(arr, want, err_msg=name)


# ------------------------------------------------------------------ a writer in another process


def _writer_main(path: str, mode: str, n_rows: str, pace: str, block: str = "1") -> None:
    """Run in a subprocess: stream rows one by one (or ``block`` at a time, handed over with
    ``append_blocks``), checkpoint every CKPT_EVERY rows, and report the rows the writer has
    flushed on stdout."""
    n_rows, pace, block = int(n_rows), float(pace), int(block)
    w = TrajectoryWriter(path, {"sim": SIM_SPEC}, mode=mode, network_json=NETWORK_JSON, seed=1,
                         buffer_rows=8, flush_interval=0.01)
    start = 0
    if mode == "resume":
        checkpoint = w.resume_state("sim")
        start = checkpoint.step if checkpoint else 0
    w.flush()  # the layout is built by the writer thread: "ready" once the file is at path
    print(f"ready {start}", flush=True)
    for i in range(start, n_rows):
        if block == 1:
            w.append("sim", **{name: rows[0] for name, rows in make_rows(i, i + 1).items()})
        elif (i - start) % block == 0:
            w.append_blocks("sim", make_rows(i, min(i + block, n_rows)))
        if (i + 1) % CKPT_EVERY == 0 and block == 1:
            w.checkpoint("sim", i + 1, make_state(i + 1))
        if i % 10 == 0:
            print(f"flushed {json.dumps(w.flushed_rows('sim'))}", flush=True)
        if pace:
            time.sleep(pace)
    w.close()
    print("done", flush=True)


def _spawn_writer(path: Path, mode: str, n_rows: int, pace: float,
                  block: int = 1) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    code = "import sys, test_store; test_store._writer_main(*sys.argv[1:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path), mode, str(n_rows), str(pace), str(block)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait_ready(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
    finally:
        watchdog.cancel()
    if not line.startswith("ready"):
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the writer process did not start: {line!r}\n{err}")
    return int(line.split()[1])


def _wait_flushed(proc: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    """The writer's lines up to its first report of rows flushed in every series."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("flushed") and min(_last_flushed([line]).values()) > 0:
                break
    finally:
        watchdog.cancel()
    return lines


def _kill(proc: subprocess.Popen) -> list[str]:
    proc.kill()
    out, _ = proc.communicate(timeout=30)
    return out.splitlines()


def _last_flushed(lines: list[str]) -> dict[str, int]:
    reports = []
    for line in lines:
        if line.startswith("flushed"):
            try:
                reports.append(json.loads(line.split(" ", 1)[1]))
            except (IndexError, json.JSONDecodeError):  # the kill cut the last line short
                pass
    return reports[-1] if reports else dict.fromkeys(SIM_SPEC.series, 0)


# ------------------------------------------------------------------ round trips


def test_round_trip_several_runs_dtypes_and_attrs(tmp_path):
    path = tmp_path / "out.h5"
    theory = RunSpec({"t": (), "modes/b": ((3, 2), np.float64), "flag": ((), np.bool_)},
                     attrs={"kind": "theory", "tau": 1.0, "method": "dopri5", "skip": None})
    seed_spec = RunSpec({"loss": ((), np.float32), "idx": ((2,), np.int32)},
                        attrs={"kind": "simulation", "widths": [4, 3]})
    runs = {"simulation": SIM_SPEC, "theory": theory, "seed_03": seed_spec}
    b = np.random.default_rng(0).standard_normal((53, 3, 2))
    with TrajectoryWriter(path, runs, network_json=NETWORK_JSON, config="lr = 0.02\n", seed=7,
                          buffer_rows=5) as w:
        for i in range(17):  # single rows, given as a mapping
            w.append("simulation", {k: v[0] for k, v in make_rows(i, i + 1).items()})
        w.append("simulation", **make_rows(17, 40))  # then a block, as keywords
        w.append("theory", t=np.arange(50.0), **{"modes/b": b[:50]}, flag=np.arange(50) % 3 == 0)
        for i in range(50, 53):
            w.append("theory", t=float(i), **{"modes/b": b[i]}, flag=i % 3 == 0)
        w.set_steps_done("simulation", 40)
        w.set_steps_done("theory", 53)

    assert list_runs(path) == ["simulation", "theory", "seed_03"]
    sim = read_run(path, "simulation")
    assert_rows_match(sim.series, 40)
    assert sim["weights/x->h"].dtype == np.float32 and sim["count"].dtype == np.int64
    assert (sim.status, sim.steps_done) == ("complete", 40)
    assert sim.attrs == {"kind": "simulation", "lr": 0.02, "method": "gd"}

    th = read_run(path, "theory")
    np.testing.assert_array_equal(th["t"], np.arange(53.0))
    np.testing.assert_array_equal(th["modes/b"], b)
    np.testing.assert_array_equal(th["flag"], np.arange(53) % 3 == 0)
    assert th["flag"].dtype == np.bool_
    assert "skip" not in th.attrs and th.attrs["tau"] == 1.0
    assert (th.status, th.steps_done) == ("complete", 53)

    empty = read_run(path, "seed_03")
    assert empty["loss"].shape == (0,) and empty["loss"].dtype == np.float32
    assert empty["idx"].shape == (0, 2) and empty["idx"].dtype == np.int32
    np.testing.assert_array_equal(empty.attrs["widths"], [4, 3])

    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["format"] == "fastrace" and a["format_version"] == 1
        for key in ("fastrace_version", "numpy_version", "numba_version", "h5py_version"):
            assert isinstance(a[key], str) and a[key]
        assert a["numpy_version"] == np.__version__ and a["h5py_version"] == h5py.__version__
        assert datetime.fromisoformat(a["created"]).tzinfo is not None
        assert a["config"] == "lr = 0.02\n" and a["seed"] == 7
        assert isinstance(a["command_line"], str)
        assert json.loads(f["network"].attrs["json"]) == json.loads(NETWORK_JSON)
        # the final attributes, written after SWMR was switched off
        assert f["simulation"].attrs["status"] == "complete"
        assert f["theory"].attrs["steps_done"] == 53
        ds = f["simulation/weights/x->h"]
        assert ds.maxshape == (None, 4, 3) and ds.chunks[1:] == (4, 3)

    info = run_info(path)
    assert info["format_version"] == 1 and info["seed"] == 7
    assert info["runs"]["theory"]["series"]["modes/b"] == {"shape": (53, 3, 2),
                                                           "dtype": "float64"}
    assert run_status(path, "seed_03") == "complete"


@settings(max_examples=20, deadline=None)
@given(blocks=st.lists(st.integers(0, 40), min_size=1, max_size=10),
       buffer_rows=st.integers(1, 16), single=st.booleans())
def test_blocks_of_any_size_are_stored_in_order(blocks, buffer_rows, single):
    spec = RunSpec({"x": (2,), "k": ((), np.int64)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.h5"
        with TrajectoryWriter(path, {"r": spec}, buffer_rows=buffer_rows,
                              compression="none") as w:
            start = 0
            for n in blocks:
                k = np.arange(start, start + n)
                x = np.stack([k, -2.0 * k], axis=1)
                if n == 1 and single:
                    w.append("r", x=x[0], k=k[0])
                else:
                    w.append("r", x=x, k=k)
                start += n
        data = read_run(path, "r")
    k = np.arange(sum(blocks))
    np.testing.assert_array_equal(data["k"], k)
    np.testing.assert_array_equal(data["x"], np.stack([k, -2.0 * k], axis=1))


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["blocks", "append", "flush"]), st.integers(0, 30)),
                    min_size=1, max_size=12))
def test_small_blocks_are_gathered_into_few_writes_in_order(ops):
    """Blocks smaller than _WRITE_BYTES wait in the writer thread and go out together once they
    make a chunk (16384 rows of "k"); a flush writes them first, so flushed_rows counts them;
    the order of rows never changes."""
    spec = RunSpec({"x": (2,), "k": ((), np.int64)})
    writes: list[tuple[str, int]] = []
    write_block = TrajectoryWriter._write_block

    def counted(self, key, block, *args, **kwargs):
        before = self._written[key]  # (rows after the last chunk boundary may wait again)
        write_block(self, key, block, *args, **kwargs)
        if self._written[key] > before:
            writes.append((key[1], (self._written[key] - before) * block[0].nbytes))

    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.object(store, "_WRITE_BYTES", 160), \
            mock.patch.object(TrajectoryWriter, "_write_block", counted):
        path = Path(tmp) / "g.h5"
        start = flushes = 0
        with TrajectoryWriter(path, {"r": spec}, buffer_rows=7, compression="none",
                              flush_interval=60) as w:  # (no timed flush: the counts are exact)
            for kind, n in ops:
                if kind == "flush":
                    w.flush()
                    flushes += 1
                    assert w.flushed_rows("r") == {"x": start, "k": start}
                    continue
                k = np.arange(start, start + n)
                rows = {"x": np.stack([k, -2.0 * k], axis=1), "k": k}
                (w.append_blocks if kind == "blocks" else w.append)("r", rows)
                start += n
        data = read_run(path, "r")
    k = np.arange(start)
    np.testing.assert_array_equal(data["k"], k)
    np.testing.assert_array_equal(data["x"], np.stack([k, -2.0 * k], axis=1))
    # "k" rows are 8 bytes: a write of fewer than 160 bytes happens only at a flush (each
    # flush() call, and the one at close) or right before a big block (written at once)
    small = [nbytes for name, nbytes in writes if name == "k" and nbytes < 160]
    big_blocks = sum(1 for kind, n in ops if kind == "blocks" and 8 * n >= 160)
    assert len(small) <= flushes + 1 + big_blocks
    assert sum(nbytes for name, nbytes in writes if name == "k") == 8 * start


def test_small_series_are_written_once_beside_a_big_one(tmp_path, monkeypatch):
    # per block: 1 MB of a big series and 8 bytes of a small one; each HDF5 write costs ~20 µs
    # of calls, so the small one's 50 blocks go out in one write at close
    spec = RunSpec({"big": (128, 1024), "t": ()})
    writes: list[str] = []
    write_block = TrajectoryWriter._write_block

    def counted(self, key, block, *args, **kwargs):
        writes.append(key[1])
        write_block(self, key, block, *args, **kwargs)

    monkeypatch.setattr(TrajectoryWriter, "_write_block", counted)
    with TrajectoryWriter(tmp_path / "b.h5", {"r": spec}, compression="none",
                          flush_interval=60) as w:
        for i in range(50):
            w.append_blocks("r", {"big": np.full((1, 128, 1024), float(i)),
                                  "t": np.array([10.0 * i])})
    assert writes.count("big") == 50 and writes.count("t") == 1
    data = read_run(tmp_path / "b.h5", "r")
    np.testing.assert_array_equal(data["t"], 10.0 * np.arange(50))
    np.testing.assert_array_equal(data["big"][:, 0, 0], np.arange(50.0))


def test_a_big_block_behind_waiting_rows_is_written_without_a_copy(tmp_path, monkeypatch):
    # a row from append waits in the thread; the big block after it is written as the
    # caller's own array (append_blocks promises no copy), after the waiting row
    spec = RunSpec({"x": (1000,)})
    big = np.arange(300 * 1000, dtype=np.float64).reshape(300, 1000)  # 2.4 MB
    written: list[np.ndarray] = []
    write_block = TrajectoryWriter._write_block

    def spy(self, key, block, *args, **kwargs):
        written.append(block)
        write_block(self, key, block, *args, **kwargs)

    monkeypatch.setattr(TrajectoryWriter, "_write_block", spy)
    with TrajectoryWriter(tmp_path / "big.h5", {"r": spec}, compression="none") as w:
        w.append("r", x=np.full(1000, -1.0))
        w.append_blocks("r", {"x": big})
    # the waiting row goes out with the 15 rows that complete its chunk of 16 rows (a copy of
    # one chunk), then the rest of the block as it is; its last 13 rows, after the last chunk
    # boundary, wait for the close
    assert [len(b) for b in written] == [16, 285, 13]
    assert np.shares_memory(written[1], big) and written[1].base is not None
    data = read_run(tmp_path / "big.h5", "r")["x"]
    np.testing.assert_array_equal(data[0], -1.0)
    np.testing.assert_array_equal(data[1:], big)


def test_a_writer_buffer_is_reused_only_once_its_rows_are_safe(tmp_path):
    # each append fills one 4-row buffer, taken by the writer before the next append: its rows
    # wait (they are few) while the buffer goes back to the caller for the next rows
    path = tmp_path / "reuse.h5"
    with TrajectoryWriter(path, {"r": RunSpec({"k": ((), np.int64)})}, buffer_rows=4,
                          compression="none", flush_interval=60) as w:
        w.flush()
        for i in range(0, 40, 4):
            w.append("r", k=np.arange(i, i + 4))
            time.sleep(0.02)
    np.testing.assert_array_equal(read_run(path, "r")["k"], np.arange(40))


def test_rows_waiting_when_the_writer_fails_are_still_written(tmp_path, monkeypatch):
    def failing_checkpoint(self, *args):
        raise OSError("simulated failure of a later operation")

    monkeypatch.setattr(TrajectoryWriter, "_write_checkpoint", failing_checkpoint)
    path = tmp_path / "fail.h5"
    spec = RunSpec({"k": ((), np.int64)}, checkpoint={"s": ()})
    w = TrajectoryWriter(path, {"r": spec}, compression="none", flush_interval=60)
    w.append_blocks("r", {"k": np.arange(100)})  # small: it waits in the writer thread
    w.checkpoint("r", 1, {"s": 0.0})
    with pytest.raises(StoreError, match="simulated failure"):
        w.close()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["r/k"][:], np.arange(100))
    assert run_status(path, "r").startswith("failed: write error")


def test_chunks_are_time_first_and_of_sensible_size():
    for row_shape in [(), (3,), (64, 64), (1000, 1000), (3000, 5000), (200_000,)]:
        for itemsize in (4, 8):
            chunk = store._chunk_shape(row_shape, itemsize)
            assert len(chunk) == len(row_shape) + 1
            assert all(1 <= c <= n for c, n in zip(chunk[1:], row_shape, strict=True))
            chunk_bytes = math.prod(chunk) * itemsize
            row_bytes = math.prod(row_shape) * itemsize
            assert min(row_bytes, 64 * 1024) <= chunk_bytes <= 1 << 20, (row_shape, chunk)


def test_without_swmr_the_file_is_the_same(tmp_path):
    path = tmp_path / "plain.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}, swmr=False) as w:
        w.append("sim", **make_rows(0, 30))
        w.checkpoint("sim", 30, make_state(30))
    data = read_run(path, "sim")
    assert_rows_match(data.series, 30)
    assert (data.status, data.steps_done) == ("complete", 30)


def test_append_blocks_keeps_the_order_and_leaves_the_callers_arrays_alone(tmp_path):
    path = tmp_path / "blocks.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}, buffer_rows=3) as w:
        block = make_rows(0, 16)
        block["weights/x->h"] = np.asfortranarray(block["weights/x->h"])  # float64, not C order
        w.append_blocks("sim", block)
        w.flush()  # the writer thread is done with the block before the appends below
        for i in range(16, 36):  # single rows through buffers, which the writer recycles
            w.append("sim", {k: v[0] for k, v in make_rows(i, i + 1).items()})
        w.append_blocks("sim", make_rows(36, 40))  # after the two rows still buffered
        w.checkpoint("sim", 40, make_state(40))
        with pytest.raises(StoreError, match="shape"):
            w.append_blocks("sim", {"svals/x->h": np.zeros((2, 4))})
        with pytest.raises(StoreError, match="no series"):
            w.append_blocks("sim", {"nope": np.zeros(2)})
    data = read_run(path, "sim")
    assert_rows_match(data.series, 40)
    assert data["weights/x->h"].dtype == np.float32
    for name, arr in block.items():  # never used as a buffer, never written to
        np.testing.assert_array_equal(arr, make_rows(0, 16)[name])
    assert run_info(path)["runs"]["sim"]["checkpoint_step"] == 40


def test_rows_wait_while_too_many_bytes_are_queued(tmp_path, monkeypatch):
    # room for three blocks of ten float64 rows; the writer thread is held on the first one
    monkeypatch.setattr(store, "_QUEUE_BYTES", 3 * 10 * 8)
    release = threading.Event()
    apply = TrajectoryWriter._apply

    def held(self, *args):
        release.wait(60)
        return apply(self, *args)

    monkeypatch.setattr(TrajectoryWriter, "_apply", held)
    path = tmp_path / "queue.h5"
    w = TrajectoryWriter(path, {"r": RunSpec({"x": ()})})
    handed = []

    def produce():
        for i in range(6):
            w.append_blocks("r", {"x": np.arange(10.0 * i, 10.0 * i + 10)})
            handed.append(i)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(0.3)
    try:
        assert producer.is_alive() and handed == [0, 1, 2]  # the fourth block waits for room
    finally:
        release.set()
        producer.join(60)
    w.close()
    assert handed == list(range(6))
    np.testing.assert_array_equal(read_run(path, "r")["x"], np.arange(60.0))


def test_the_layout_is_built_by_the_writer_thread(tmp_path):
    path = tmp_path / "bg.h5"
    w = TrajectoryWriter(path, {"sim": SIM_SPEC})
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:  # no operation needed
        time.sleep(0.01)
    assert path.exists() and not Path(f"{path}.partial").exists()
    assert run_status(path, "sim") == "running"
    w.append("sim", **make_rows(0, 3))
    w.close()
    assert_rows_match(read_run(path, "sim").series, 3)


def test_a_failure_while_building_the_layout_reaches_the_caller(tmp_path, monkeypatch):
    path = tmp_path / "nolayout.h5"

    def failing_create_run(self, f, run, spec):
        raise OSError("simulated failure while creating datasets")

    monkeypatch.setattr(TrajectoryWriter, "_create_run", failing_create_run)
    w = TrajectoryWriter(path, {"sim": SIM_SPEC})  # the file itself could be created
    w.append("sim", **make_rows(0, 2))
    with pytest.raises(StoreError, match="simulated failure"):
        w.flush()
    with pytest.raises(StoreError, match="simulated failure"):
        w.close()
    assert not path.exists() and not Path(f"{path}.partial").exists()
    monkeypatch.undo()
    with TrajectoryWriter(path, {"sim": SIM_SPEC}) as w:  # the lock was released
        w.append("sim", **make_rows(0, 2))
    assert_rows_match(read_run(path, "sim").series, 2)


def test_each_series_caches_one_chunk(tmp_path):
    # a chunk leaves the cache (compressed and written) as soon as rows move on to the next one
    path = tmp_path / "cache.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}) as w:
        w.flush()
        for name, (shape, dtype) in SIM_SPEC.series.items():
            ds = w._datasets[("sim", name)]
            _, nbytes, w0 = ds.id.get_access_plist().get_chunk_cache()
            assert nbytes == math.prod(ds.chunks) * dtype.itemsize and w0 == 1.0
            assert ds.chunks == store._chunk_shape(shape, dtype.itemsize)


# ------------------------------------------------------------------ checkpoints and resume


def test_checkpoint_round_trip_and_resume_in_process(tmp_path):
    path = tmp_path / "ck.h5"
    w = TrajectoryWriter(path, {"sim": SIM_SPEC}, buffer_rows=4)
    w.append("sim", **make_rows(0, 10))
    w.checkpoint("sim", 10, make_state(10))
    w.append("sim", **make_rows(10, 23))
    w.checkpoint("sim", 23, make_state(23))
    w.append("sim", **make_rows(23, 31))  # rows after the last checkpoint are dropped
    w.flush()
    assert w.flushed_rows("sim") == dict.fromkeys(SIM_SPEC.series, 31)
    assert run_info(path)["runs"]["sim"]["checkpoint_step"] == 23
    w._shutdown(final=False)  # leave the run "running", as a killed process would

    with TrajectoryWriter(path, {"sim": SIM_SPEC}, mode="resume") as w:
        checkpoint = w.resume_state("sim")
        assert checkpoint.step == 23
        assert checkpoint.rows == dict.fromkeys(SIM_SPEC.series, 23)
        np.testing.assert_array_equal(checkpoint.state["w"], make_state(23)["w"])
        assert checkpoint.state["step"] == 23
        assert_rows_match(read_run(path, "sim").series, 23)
        w.append("sim", **make_rows(23, 40))
    assert_rows_match(read_run(path, "sim").series, 40)


def test_a_checkpoint_torn_by_a_failure_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "torn.h5"
    w = TrajectoryWriter(path, {"sim": SIM_SPEC})
    w.append("sim", **make_rows(0, 12))
    w.checkpoint("sim", 12, make_state(12))
    w.append("sim", **make_rows(12, 20))
    w.flush()
    fill_slot = store._fill_slot

    def half_written(slot, step, arrays, rows):
        slot["state/w"][...] = -1.0  # part of the slot is overwritten, then the write dies
        raise OSError("simulated crash inside a checkpoint")

    monkeypatch.setattr(store, "_fill_slot", half_written)
    w.checkpoint("sim", 20, make_state(20))
    with pytest.raises(StoreError, match="simulated crash"):
        w.close()
    monkeypatch.setattr(store, "_fill_slot", fill_slot)

    with TrajectoryWriter(path, {"sim": SIM_SPEC}, mode="resume") as w:
        checkpoint = w.resume_state("sim")
        assert checkpoint.step == 12
        np.testing.assert_array_equal(checkpoint.state["w"], make_state(12)["w"])
        assert_rows_match(read_run(path, "sim").series, 12)


def test_resume_checks_the_specs_and_the_seed(tmp_path):
    path = tmp_path / "r.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}, seed=1) as w:
        w.append("sim", **make_rows(0, 3))
    other = RunSpec({"t": (), "loss": ()})
    with pytest.raises(StoreError, match="series"):
        TrajectoryWriter(path, {"sim": other}, mode="resume")
    with pytest.raises(StoreError, match="no run"):
        TrajectoryWriter(path, {"other": SIM_SPEC}, mode="resume")
    with pytest.raises(StoreError, match="seed"):
        TrajectoryWriter(path, {"sim": SIM_SPEC}, mode="resume", seed=2)
    assert_rows_match(read_run(path, "sim").series, 3)  # failed resumes leave the file alone
    with TrajectoryWriter(path, {"sim": SIM_SPEC}, mode="resume") as w:
        assert w.status("sim") == "complete" and w.resume_state("sim") is None
        with pytest.raises(StoreError, match="complete"):
            w.append("sim", t=1.0)


# ------------------------------------------------------------------ other processes


@pytest.mark.parametrize("block", [1, 40])
def test_reader_in_another_process_sees_rows_while_they_are_written(tmp_path, block):
    # blocks of 40 rows: the noise series' whole chunks are written directly (unfiltered)
    path = tmp_path / "live.h5"
    n_rows = 480 if block > 1 else 120
    proc = _spawn_writer(path, "w", n_rows, pace=0.01 if block == 1 else 0.002, block=block)
    try:
        _wait_ready(proc)
        seen = []
        with open_run(path, "sim") as reader:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                reader.refresh()
                n = reader.lengths["t"]
                seen.append((n, reader.status))
                if n == n_rows:
                    break
                time.sleep(0.02)
            tail = reader.read()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    growing = sorted({n for n, _ in seen if 0 < n < n_rows})
    assert len(growing) >= 3, f"the reader saw too few intermediate lengths: {seen}"
    assert all(status == "running" for n, status in seen if n < n_rows)
    assert_rows_match({k: v[: len(tail["t"])] for k, v in tail.series.items()})
    final = read_run(path, "sim")
    assert_rows_match(final.series, n_rows)
    assert final.status == "complete"
    if _has_blosc() and block > 1:  # noise rows went in whole chunks written directly
        assert _chunk_masks(path, "sim/noise").count(1) >= 4


def test_sigkill_at_random_moments_leaves_every_flushed_row(tmp_path):
    rng = random.Random(20220712)
    most_rows = 0
    for trial in range(4):
        path = tmp_path / f"kill{trial}.h5"
        proc = _spawn_writer(path, "w", 10**7, pace=0.0)
        seen: list[str] = []
        if trial == 0:  # at any moment, including while the file is being created
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            _wait_ready(proc)
            if trial > 1:  # once rows are flushed (the writer may take a while to start)
                seen = _wait_flushed(proc)
            time.sleep(rng.uniform(0.02, 0.4))
        flushed = _last_flushed(seen + _kill(proc))
        if not path.exists():
            assert trial == 0  # killed before the file appeared: nothing was flushed either
            continue
        data = read_run(path, "sim")
        assert data.status == "running"
        for name, n in flushed.items():
            assert len(data[name]) >= n, (name, len(data[name]), n)
        assert_rows_match(data.series)  # whatever is in the file is right
        assert list_runs(path) == ["sim"]
        most_rows = max(most_rows, min(flushed.values()))
    assert most_rows > 0, "no trial flushed any rows before the kill; the test proved nothing"


def test_a_killed_writers_file_cut_short_is_refused_at_once(tmp_path):
    # a file cut short reads zeros where data is missing, and a SWMR open of cut metadata
    # retries for minutes: it is refused (after looking again twice, for a writer that is
    # extending it), also when its superblock says a writer had it open
    path = tmp_path / "cut.h5"
    proc = _spawn_writer(path, "w", 10**7, pace=0.0)
    _wait_ready(proc)
    _wait_flushed(proc)
    _kill(proc)
    with open(path, "r+b") as fh:  # 1000 bytes short of the end the superblock records
        superblock = fh.read(36)  # (version 3: the end-of-file address at bytes 28-35)
        assert superblock[8] == 3
        fh.truncate(int.from_bytes(superblock[28:36], "little") - 1000)
    start = time.monotonic()
    with pytest.raises(StoreError, match="truncated"):
        list_runs(path)
    with pytest.raises(StoreError, match="truncated"):
        TrajectoryWriter(path, {"sim": SIM_SPEC}, mode="resume")
    assert time.monotonic() - start < 5


def test_a_killed_writers_file_with_damaged_metadata_is_refused_at_once(tmp_path):
    # the plain open refuses a killed SWMR writer's file ("already open for write"), so it is
    # opened as a SWMR reader, which retries a metadata read that fails its checksum with
    # doubling pauses: with HDF5's default 100 attempts, each of these files took hours
    path = tmp_path / "killed.h5"
    proc = _spawn_writer(path, "w", 10**7, pace=0.0)
    _wait_ready(proc)
    _wait_flushed(proc)
    _kill(proc)
    rng = np.random.default_rng(0)
    copies = []
    for offset in (96, 200, 335, 800):  # in the metadata written first
        damaged = tmp_path / f"damaged_{offset}.h5"
        data = bytearray(path.read_bytes())
        data[offset:offset + 16] = rng.bytes(16)
        damaged.write_bytes(bytes(data))
        copies.append(str(damaged))
    code = ("import sys, time\nfrom fastrace import store\nfor p in sys.argv[1:]:\n"
            "    t0 = time.monotonic()\n    try:\n        store.list_runs(p)\n"
            "        print('read', round(time.monotonic() - t0, 2))\n"
            "    except store.StoreError:\n        print('refused', round(time.monotonic() - t0, 2))\n")
    out = subprocess.run([sys.executable, "-c", code, *copies], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    lines = out.stdout.split()
    assert lines[0::2] == ["refused"] * len(copies), out.stdout + out.stderr
    assert max(float(t) for t in lines[1::2]) < 5.0


def test_resume_refuses_chunks_past_the_end_of_the_file(tmp_path, monkeypatch):
    # chunks are copied without being decoded: one lying past the end of the file (cut short
    # in a way HDF5's own check missed) must not be copied as if it held data
    path = tmp_path / "src.h5"
    spec = RunSpec({"noise": (1024,)})
    with TrajectoryWriter(path, {"r": spec}, compression="none") as w:
        w.append_blocks("r", {"noise": np.ones((64, 1024))})
    size = path.stat().st_size
    real_getsize = os.path.getsize
    monkeypatch.setattr(store.os.path, "getsize",
                        lambda p: size // 2 if os.fspath(p) == str(path) else real_getsize(p))
    with h5py.File(path, "r") as src, h5py.File(tmp_path / "dst.h5", "w") as f:
        dst = f.create_dataset("noise", shape=(0, 1024), maxshape=(None, 1024),
                               chunks=src["r/noise"].chunks, dtype="f8")
        dst.resize(64, axis=0)
        with pytest.raises(StoreError, match="past the end of the file"):
            store._copy_whole_chunks(src["r/noise"], dst, 64)


def test_resume_after_kills_gives_the_rows_of_an_uninterrupted_run(tmp_path, capsys):
    n_rows = 20 * CKPT_EVERY
    reference = tmp_path / "reference.h5"
    _writer_main(str(reference), "w", str(n_rows), "0")
    capsys.readouterr()

    path = tmp_path / "resumed.h5"
    rng = random.Random(7)
    for mode in ("w", "resume"):  # killed once, resumed in a new process, killed again
        proc = _spawn_writer(path, mode, n_rows, pace=0.002)
        _wait_ready(proc)
        time.sleep(rng.uniform(0.1, 0.4))
        _kill(proc)

    with TrajectoryWriter(path, {"sim": SIM_SPEC}, mode="resume", network_json=NETWORK_JSON,
                          seed=1) as w:
        start = n_rows
        if w.status("sim") != "complete":
            checkpoint = w.resume_state("sim")
            start = checkpoint.step if checkpoint else 0
            if checkpoint:
                assert checkpoint.step % CKPT_EVERY == 0
                np.testing.assert_array_equal(checkpoint.state["w"],
                                              make_state(checkpoint.step)["w"])
            # the file was cut back to the rows of the checkpoint
            assert_rows_match(read_run(path, "sim").series, start)
        for i in range(start, n_rows):
            w.append("sim", **{name: rows[0] for name, rows in make_rows(i, i + 1).items()})
            if (i + 1) % CKPT_EVERY == 0:
                w.checkpoint("sim", i + 1, make_state(i + 1))

    got, want = read_run(path, "sim"), read_run(reference, "sim")
    assert got.series.keys() == want.series.keys()
    for name in want.series:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert (got.status, got.steps_done) == ("complete", n_rows) == (want.status, want.steps_done)
    with h5py.File(path, "r") as f:
        assert "resumed" in f.attrs and f.attrs["created"] <= f.attrs["resumed"]
    assert not Path(f"{path}.partial").exists()
    if _has_blosc():
        assert _chunk_masks(path, "sim/noise").count(1) >= 4


def _has_blosc() -> bool:
    return store._compression_options("auto", 5) is not None


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("make_path", [
    lambda tmp: tmp / "missing" / "out.h5",  # directory does not exist
    lambda tmp: tmp,  # the path is a directory
    lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "out.h5",  # parent is a file
])
def test_an_unwritable_path_fails_before_anything_else(tmp_path, make_path):
    path = make_path(tmp_path)
    with pytest.raises(StoreError, match=str(path)):
        TrajectoryWriter(path, {"sim": SIM_SPEC})


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write anywhere")
def test_a_directory_without_permission_fails(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(StoreError, match="permission"):
        TrajectoryWriter(locked / "out.h5", {"sim": SIM_SPEC})


def test_a_second_writer_on_the_same_file_is_refused(tmp_path):
    path = tmp_path / "one.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}) as w:
        with pytest.raises(StoreError, match="another process"):
            TrajectoryWriter(path, {"sim": SIM_SPEC})
        w.append("sim", **make_rows(0, 2))
    assert_rows_match(read_run(path, "sim").series, 2)


def test_an_error_in_the_writer_thread_reaches_the_caller(tmp_path, monkeypatch):
    path = tmp_path / "err.h5"

    def failing_write(self, key, block, *args, **kwargs):
        raise OSError("simulated disk failure")

    w = TrajectoryWriter(path, {"sim": SIM_SPEC}, buffer_rows=2)
    monkeypatch.setattr(TrajectoryWriter, "_write_block", failing_write)
    w.append("sim", **make_rows(0, 5))  # returns: the write happens in the background
    with pytest.raises(StoreError, match="simulated disk failure"):
        w.flush()
    with pytest.raises(StoreError, match="simulated disk failure"):
        w.append("sim", **make_rows(5, 6))
    with pytest.raises(StoreError, match="simulated disk failure"):
        w.close()
    assert run_status(path, "sim").startswith("failed: write error")


def test_rows_after_a_failed_write_are_not_stored_in_its_place(tmp_path, monkeypatch):
    # 8 KB rows, chunks of 16: a block of 50 rows after 40 flushed ones is written as rows
    # 40-79, its last 10 rows waiting for the next chunk. That write fails (a full disk, say):
    # the 10 rows must not then be written at row 40, and no fill rows may look like data.
    path = tmp_path / "fail.h5"
    spec = RunSpec({"x": (1024,)})
    rows = np.arange(100.0)[:, None] * np.ones(1024)
    write_rows = store._write_rows

    def failing_at_40(dsid, start, block):
        if start == 40:
            raise OSError("simulated disk full")
        write_rows(dsid, start, block)

    monkeypatch.setattr(store, "_write_rows", failing_at_40)
    w = TrajectoryWriter(path, {"r": spec}, compression="none", flush_interval=60)
    w.append_blocks("r", {"x": rows[:40]})
    w.flush()
    assert w.flushed_rows("r") == {"x": 40}
    w.append_blocks("r", {"x": rows[40:90]})
    with pytest.raises(StoreError, match="simulated disk full"):
        w.close()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["r/x"][:, 0], np.arange(40.0))
    assert run_status(path, "r").startswith("failed: write error")


def test_failed_status_is_recorded(tmp_path):
    path = tmp_path / "failed.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC, "theory": SIM_SPEC}) as w:
        w.append("sim", **make_rows(0, 8))
        w.set_status("sim", "failed: diverged at step 8 (loss = inf)")
        w.flush()
        assert run_status(path, "sim") == "failed: diverged at step 8 (loss = inf)"  # live
    assert run_status(path, "sim") == "failed: diverged at step 8 (loss = inf)"
    assert run_status(path, "theory") == "complete"
    with h5py.File(path, "r") as f:
        assert f["sim"].attrs["status"] == "failed: diverged at step 8 (loss = inf)"
    with TrajectoryWriter(tmp_path / "x.h5", {"sim": SIM_SPEC}) as w:
        with pytest.raises(StoreError, match="status"):
            w.set_status("sim", "done")


def test_an_exception_in_the_with_block_marks_running_runs_failed(tmp_path):
    path = tmp_path / "exc.h5"
    with pytest.raises(ZeroDivisionError):
        with TrajectoryWriter(path, {"sim": SIM_SPEC}) as w:
            w.append("sim", **make_rows(0, 3))
            1 / 0  # noqa: B018
    data = read_run(path, "sim")
    assert data.status.startswith("failed: ZeroDivisionError")
    assert_rows_match(data.series, 3)


def test_bad_input_raises_store_error(tmp_path):
    with TrajectoryWriter(tmp_path / "bad.h5", {"sim": SIM_SPEC}) as w:
        with pytest.raises(StoreError, match="no run"):
            w.append("nope", t=1.0)
        with pytest.raises(StoreError, match="no series"):
            w.append("sim", nope=1.0)
        with pytest.raises(StoreError, match="shape"):
            w.append("sim", **{"weights/x->h": np.zeros((3, 4))})
        with pytest.raises(StoreError, match="complex"):
            w.append("sim", t=1j)
        with pytest.raises(StoreError, match="int64"):
            w.append("sim", count=0.5)
        with pytest.raises(StoreError, match="checkpoint"):
            w.checkpoint("sim", 1, {"w": np.zeros((4, 3))})
        with pytest.raises(StoreError, match="shape"):
            w.checkpoint("sim", 1, {"w": np.zeros(3), "step": 1})
        w.append("sim", t=[1.0, 2.0])  # an ok block after all the refusals
    for bad in [{"x": (0,)}, {"x": ((2,), object)}, {"live": ()}, {"a//b": ()}, {}]:
        with pytest.raises(StoreError):
            RunSpec(bad)
    with pytest.raises(StoreError, match="reserved"):
        RunSpec({"t": ()}, attrs={"status": "x"})
    with pytest.raises(StoreError, match="cannot store"):
        TrajectoryWriter(tmp_path / "b.h5", {"r": RunSpec({"t": ()}, attrs={"d": {"a": 1}})})
    with pytest.raises(StoreError, match="mode"):
        TrajectoryWriter(tmp_path / "c.h5", {"sim": SIM_SPEC}, mode="a")


def test_reading_a_missing_foreign_or_corrupt_file_raises_store_error(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        read_run(tmp_path / "missing.h5", "sim")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(StoreError, match="not a readable HDF5"):
        list_runs(garbage)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a fastrace file"):
        run_info(foreign)
    good = tmp_path / "good.h5"
    with TrajectoryWriter(good, {"sim": SIM_SPEC}) as w:
        w.append("sim", **make_rows(0, 300))
    with pytest.raises(StoreError, match="no run"):
        read_run(good, "theory")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(StoreError):
        read_run(truncated, "sim")
    # attributes of the wrong type: StoreError, not the ValueError or TypeError of using them
    odd = tmp_path / "odd.h5"
    with h5py.File(odd, "w") as f:
        f.attrs["format"] = np.array([1, 2])
    with pytest.raises(StoreError, match="not a fastrace file"):
        list_runs(odd)
    with h5py.File(good, "r+") as f:
        f["sim"].attrs["series"] = '{"t": 1}'
    for read in (lambda: read_run(good, "sim"), lambda: run_info(good),
                 lambda: store.StoredSeries(good, "sim", "t")):
        with pytest.raises(StoreError, match="damaged"):
            read()


# ------------------------------------------------------------------ compression


def _filters(path: Path, name: str) -> list[int]:
    with h5py.File(path, "r") as f:
        plist = f[name].id.get_create_plist()
        return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


def test_blosc_lz4_is_used_when_hdf5plugin_is_installed(tmp_path):
    pytest.importorskip("hdf5plugin")
    path = tmp_path / "blosc.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}, compression="auto") as w:
        w.append("sim", **make_rows(0, 500))
    assert _filters(path, "sim/weights/x->h") == [32001]
    assert_rows_match(read_run(path, "sim").series, 500)


def test_a_blosc_filter_hdf5_lacks_is_not_asked_for(tmp_path, monkeypatch):
    # HDF5 would store raw data under an optional filter it does not have: "auto" goes without
    # compression, and an explicit "blosc-lz4" is refused
    pytest.importorskip("hdf5plugin")
    monkeypatch.setattr(store.h5z, "filter_avail", lambda filter_id: False)
    path = tmp_path / "lacking.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}, compression="auto") as w:
        w.append("sim", **make_rows(0, 5))
    assert _filters(path, "sim/weights/x->h") == []
    with pytest.raises(StoreError, match="blosc filter"):
        TrajectoryWriter(tmp_path / "b.h5", {"sim": SIM_SPEC}, compression="blosc-lz4")


def test_without_hdf5plugin_auto_means_no_compression(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # makes `import hdf5plugin` fail
    path = tmp_path / "plain.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}, compression="auto") as w:
        w.append("sim", **make_rows(0, 50))
    assert _filters(path, "sim/weights/x->h") == []
    assert_rows_match(read_run(path, "sim").series, 50)
    with pytest.raises(StoreError, match="hdf5plugin"):
        TrajectoryWriter(tmp_path / "b.h5", {"sim": SIM_SPEC}, compression="blosc-lz4")


def _chunk_masks(path: Path, name: str) -> list[int]:
    """The filter mask of each stored chunk of a dataset, in row order (1: stored unfiltered)."""
    with h5py.File(path, "r") as f:
        dsid = f[name].id
        infos = [dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())]
    return [info.filter_mask for info in sorted(infos, key=lambda i: i.chunk_offset)]


@pytest.mark.parametrize("compression, dtype", [("auto", "<f8"), ("auto", ">f8"),
                                                ("blosc-lz4", "<f8")])
def test_auto_compression_is_skipped_for_rows_it_barely_shrinks(tmp_path, compression, dtype):
    # noise (random float64) shrinks by a few percent under blosc-lz4: with "auto", every
    # chunk after the first (which was tried) is stored unfiltered (also in a non-native byte
    # order: rows joined before a write keep it); smooth rows compress and stay compressed; an
    # explicit "blosc-lz4" compresses everything
    pytest.importorskip("hdf5plugin")
    spec = RunSpec({"noise": ((64, 64), np.dtype(dtype)), "smooth": (64, 64)})  # chunks: 4 rows
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((41, 64, 64)).astype(dtype)
    smooth = np.broadcast_to(np.arange(41.0)[:, None, None], (41, 64, 64)).copy()
    path = tmp_path / "adaptive.h5"
    with TrajectoryWriter(path, {"r": spec}, compression=compression) as w:
        for a in range(0, 41, 9):  # blocks of 9 rows: never aligned with the chunks
            w.append_blocks("r", {"noise": noise[a:a + 9], "smooth": smooth[a:a + 9]})
    data = read_run(path, "r")
    np.testing.assert_array_equal(data["noise"], noise)
    np.testing.assert_array_equal(data["smooth"], smooth)
    noise_masks, smooth_masks = _chunk_masks(path, "r/noise"), _chunk_masks(path, "r/smooth")
    assert len(noise_masks) == len(smooth_masks) == 11
    assert smooth_masks == [0] * 11
    if compression == "auto":  # the last, partial chunk goes through HDF5's own path
        assert noise_masks[0] == 0 and noise_masks[1:-1] == [1] * 9 and noise_masks[-1] == 0
    else:
        assert noise_masks == [0] * 11
    with h5py.File(path, "r") as f:
        sizes = [f["r/noise"].id.get_chunk_info(i).size for i in range(11)]
    assert (sizes.count(4 * 64 * 64 * 8) >= 9) == (compression == "auto")


def test_resume_copies_stored_chunks_as_they_are(tmp_path, monkeypatch):
    # a resume rebuilds the file: chunks within the kept rows are copied byte for byte (no
    # decompressing and compressing again), unfiltered ones stay unfiltered; the last partial
    # chunk goes through HDF5
    pytest.importorskip("hdf5plugin")
    spec = RunSpec({"noise": (64, 64), "smooth": (64, 64)})  # chunks of 4 rows
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((41, 64, 64))
    smooth = np.broadcast_to(np.arange(41.0)[:, None, None], (41, 64, 64)).copy()
    path = tmp_path / "resume.h5"
    with TrajectoryWriter(path, {"r": spec}) as w:
        w.append_blocks("r", {"noise": noise, "smooth": smooth})
    masks = {name: _chunk_masks(path, f"r/{name}") for name in ("noise", "smooth")}
    assert masks["noise"].count(1) >= 8
    copied = []
    whole_chunks = store._copy_whole_chunks

    def spy(src, dst, n):
        copied.append((n, whole_chunks(src, dst, n)))
        return copied[-1][1]

    monkeypatch.setattr(store, "_copy_whole_chunks", spy)
    with TrajectoryWriter(path, {"r": spec}, mode="resume") as w:
        assert w.status("r") == "complete"
    assert copied == [(41, 40), (41, 40)]
    data = read_run(path, "r")
    np.testing.assert_array_equal(data["noise"], noise)
    np.testing.assert_array_equal(data["smooth"], smooth)
    assert {name: _chunk_masks(path, f"r/{name}") for name in masks} == masks


@settings(max_examples=25, deadline=None)
@given(blocks=st.lists(st.tuples(st.integers(0, 23), st.booleans()), max_size=12),
       compression=st.sampled_from(["auto", "none"]))
def test_writes_end_on_chunk_boundaries_and_change_no_row(blocks, compression):
    """Rows after a write's last chunk boundary wait for the next block (so that no chunk is
    written twice) unless a flush or close is due; whatever the block sizes, the rows read back
    are the rows appended, in order."""
    spec = RunSpec({"w": (32, 64)})  # 16 KB rows: chunks of 8 rows
    writes: list[tuple[int, int]] = []
    write_rows = store._write_rows

    def spy(dsid, start, block):
        writes.append((start, len(block)))
        write_rows(dsid, start, block)

    rng = np.random.default_rng(len(blocks))
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(store, "_write_rows", spy):
        path = Path(tmp) / "aligned.h5"
        rows, flushes = [], 0
        with TrajectoryWriter(path, {"r": spec}, compression=compression,
                              flush_interval=60) as w:
            for n, flush in blocks:
                block = rng.standard_normal((n, 32, 64))
                rows.append(block)
                w.append_blocks("r", {"w": block})
                if flush:
                    w.flush()
                    flushes += 1
        got = read_run(path, "r")["w"]
    expected = np.concatenate(rows) if rows else np.empty((0, 32, 64))
    np.testing.assert_array_equal(got, expected)
    # (direct chunk writes, with "auto", bypass _write_rows: they are whole chunks anyway)
    unaligned = [(a, n) for a, n in writes if (a + n) % 8]
    assert len(unaligned) <= flushes + 1


# ------------------------------------------------------------------ series read on demand
def test_a_resume_of_some_runs_keeps_the_order_of_the_runs(tmp_path):
    path = tmp_path / "order.h5"
    spec = RunSpec({"t": ()}, checkpoint={"x": ()})
    with TrajectoryWriter(path, {"b": spec, "a": spec, "c": spec}) as w:
        for run in "bac":
            w.checkpoint(run, 0, {"x": 0.0})
            w.append(run, t=1.0)
        w.set_status("a", "failed: stopped")
    assert list_runs(path) == ["b", "a", "c"]
    with TrajectoryWriter(path, {"a": spec}, mode="resume") as w:  # (it came first)
        w.append("a", t=2.0)
    assert list_runs(path) == ["b", "a", "c"] and list(run_info(path)["runs"]) == ["b", "a", "c"]


def test_a_stored_series_never_reads_a_later_file_at_its_path(tmp_path):
    # every new file takes the place of the old one by a rename: ext4 then gives the freed
    # inode number straight back, so every second file had the inode the series knew, and its
    # rows were read as the series' own
    path = tmp_path / "f.h5"
    spec = RunSpec({"t": (), "w": (3,)})

    def write(value):
        with TrajectoryWriter(path, {"sim": spec}) as w:
            w.append("sim", {"t": np.arange(10.0), "w": np.full((10, 3), float(value))})

    write(1)
    s = store.StoredSeries(path, "sim", "w")
    assert s[0][0] == 1.0
    for value in range(2, 6):
        write(value)
        with pytest.raises(StoreError, match="no longer the file"):
            s[0]


def test_a_stored_series_of_a_growing_run_keeps_its_rows(tmp_path):
    # made while its run is written: its length, its shape, np.asarray and indexing all
    # stay at the rows there were (indexing counted the rows written since)
    path = tmp_path / "live.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}) as w:
        w.append("sim", **make_rows(0, 20))
        w.flush()
        s = store.StoredSeries(path, "sim", "t")
        w.append("sim", **make_rows(20, 50))
        w.flush()
        assert len(s) == 20 and s.shape == (20,)
        assert np.asarray(s).shape == (20,)
        assert s[-1] == s[19] == make_rows(19, 20)["t"][0]
        np.testing.assert_array_equal(s[10:], make_rows(10, 20)["t"])
        np.testing.assert_array_equal(s[..., 3], np.asarray(s)[3])
        with pytest.raises(IndexError, match="out of range"):
            s[20]


def test_a_stored_series_reads_rows_from_the_file_when_indexed(tmp_path):
    path = tmp_path / "stored.h5"
    with TrajectoryWriter(path, {"sim": SIM_SPEC}) as w:
        w.append("sim", **make_rows(0, 30))
    rows = make_rows(0, 30)["weights/x->h"].astype(np.float32)
    s = store.StoredSeries(path, "sim", "weights/x->h")
    assert (len(s), s.shape, s.ndim, s.dtype) == (30, (30, 4, 3), 3, np.float32)
    np.testing.assert_array_equal(s[0], rows[0])
    np.testing.assert_array_equal(s[-1], rows[-1])
    np.testing.assert_array_equal(s[-30], rows[0])
    np.testing.assert_array_equal(s[5:9], rows[5:9])
    np.testing.assert_array_equal(s[-2, 1], rows[-2, 1])
    np.testing.assert_array_equal(np.asarray(s), rows)
    assert np.asarray(s, dtype=np.float64).dtype == np.float64
    np.testing.assert_array_equal(s[np.int64(-3)], rows[-3])
    np.testing.assert_array_equal(s[1:20:3], rows[1:20:3])
    np.testing.assert_array_equal(s[...], rows)
    assert s.size == rows.size
    for bad in (30, -31):
        with pytest.raises(IndexError, match="out of range"):
            s[bad]
    # what HDF5 cannot read in one increasing pass is an IndexError, never a wrong row
    for bad in (True, np.bool_(False), slice(None, None, -1), [4, 2], np.array([1, 2]), None,
                1.0, "a", (0, 0, 0, 0)):
        with pytest.raises(IndexError):
            s[bad]
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(s, copy=False)
    with pytest.raises(StoreError, match="no series 'nope'"):
        store.StoredSeries(path, "sim", "nope")
    path.unlink()
    with pytest.raises(StoreError, match="no such file"):
        s[0]
