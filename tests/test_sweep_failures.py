"""Sweeps when things go wrong: an output directory holding another sweep's files, a pool worker
killed (as the OOM killer kills), the sweep process itself killed or terminated.

The process tests run ``python -m fastrace.cli sweep`` in a real subprocess and find its pool
workers through /proc (children of the sweep process, and the point files they hold open)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

import fastrace as fr
from fastrace import cli
from fastrace.sweep import read_index, sweep

BASE = """
[task]
name = "routing"
M = 3
K = 2
hidden = 6

[init]
kind = "orthogonal"
gain = 0.3
seeds = [0]

[train]
method = "gd"
lr = 0.01
steps = {steps}
record_every = 1000
"""
LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc")


# ----------------------------------------------------------------------------- /proc helpers
def _children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended


def _workers(pid: int) -> list[int]:
    """The pool workers of the sweep process ``pid`` (not its resource tracker)."""
    out = []
    for kid in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes():
                out.append(kid)
        except OSError:
            pass
    return out


def _holds(pid: int, name: str) -> bool:
    """Whether process ``pid`` has a file of point ``name`` open (pNNN.h5, .partial, .lock)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if f"/{name}.h5" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return True
        except OSError:
            pass
    return False


def _finished(out: Path, name: str) -> bool:
    """A point file written and closed (its writer removes the .lock when it closes it)."""
    return (out / f"{name}.h5").is_file() and not (out / f"{name}.h5.lock").exists()


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _start_sweep(tmp_path: Path, steps: list[int], workers: int = 2):
    toml = tmp_path / "sweep.toml"
    toml.write_text(BASE.format(steps=steps[0]) + f'\n[sweep]\n"train.steps" = {steps}\n')
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fastrace.cli", "sweep", str(toml), "-o",
                             str(out), "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}:\n"
                        f"{proc.stdout.read()}")
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def _end(proc: subprocess.Popen, pids: set[int]) -> None:
    """Clean up after a test: the sweep process and the workers seen (by pid)."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------- I: the directory
def test_sweep_refuses_a_directory_holding_another_sweep(tmp_path):
    text = BASE.format(steps=200)
    first = {"train.lr": [0.05, 0.02, 0.03]}
    out = tmp_path / "out"
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        a = sweep(text, first, out, executor=pool, seed=1, warm=False)
        assert [p.status for p in a] == ["complete"] * 3
        before = {f.name: _identity(f) for f in out.iterdir()}

        # a smaller sweep into the same directory: its index would link the 3rd point of the
        # first one, and its points would overwrite the first one's results
        with pytest.raises(fr.ConfigError, match="holds files of another sweep") as err:
            sweep(text, {"train.lr": [0.05, 0.04]}, out, executor=pool, seed=1, warm=False)
        message = str(err.value)
        assert str(out) in message and "index.h5 (the index of a sweep over another grid" in \
            message and "p002.h5 (not a point of this sweep)" in message
        with pytest.raises(fr.ConfigError, match="with seed 1, not 2"):
            sweep(text, first, out, executor=pool, seed=2, warm=False)
        assert {f.name: _identity(f) for f in out.iterdir()} == before  # nothing touched

        # point files without an index: each is checked against this sweep's point
        # (p000 is the same experiment in both sweeps, p001 is not)
        loose = tmp_path / "loose"
        loose.mkdir()
        for name in ("p000.h5", "p001.h5"):
            shutil.copy(out / name, loose / name)
        with pytest.raises(fr.ConfigError) as err:
            sweep(text, {"train.lr": [0.05, 0.04]}, loose, executor=pool, seed=1, warm=False)
        assert "p001.h5 (written by another experiment)" in str(err.value)
        assert "p000.h5" not in str(err.value)
        fifo = tmp_path / "fifo"
        fifo.mkdir()
        os.mkfifo(fifo / "p000.h5")  # never opened (opening a FIFO blocks)
        with pytest.raises(fr.ConfigError, match=r"p000.h5 \(not a regular file\)"):
            sweep(text, first, fifo, executor=pool, seed=1, warm=False)

        # the same sweep again may rerun into its own directory
        again = sweep(text, first, out, executor=pool, seed=1, warm=False)
    assert [p.status for p in again] == ["complete"] * 3 and len(again.written) == 3
    with h5py.File(out / "index.h5", "r") as f:
        assert list(f["points"]) == ["p000", "p001", "p002"]


def test_index_links_and_counts_only_the_files_this_sweep_wrote(tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    # hidden = -1 fails when the point's task is built, before its file is created
    path.write_text(BASE.format(steps=200) + '\n[sweep]\n"task.hidden" = [6, -1]\n')
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "-o", str(out), "--workers", "1"]) == 1
    text = capsys.readouterr().out
    assert "2 points, 1 complete, 1 failed" in text
    assert f"wrote {out / 'index.h5'} and 1 point file\n" in text
    assert not (out / "p001.h5").exists()
    with h5py.File(out / "index.h5", "r") as f:
        assert list(f["points"]) == ["p000"]
    assert [p.written for p in read_index(out)] == [True, False]


# ----------------------------------------------------------------------------- J: a killed worker
@LINUX_PROC
def test_a_killed_worker_reruns_only_its_point(tmp_path):
    proc, out = _start_sweep(tmp_path, [200, 150000, 200, 200])
    seen: set[int] = set()
    try:
        # p001 (long) is running while the short points finish in the other worker
        def p001_running_alone():
            workers = _workers(proc.pid)
            seen.update(workers)
            holders = [w for w in workers if _holds(w, "p001")]
            done = all(_finished(out, n) for n in ("p000", "p002", "p003"))
            return holders if holders and done else None

        victim = _wait_for(p001_running_alone, "p001 ran alone", proc)[0]
        kept = {n: _identity(out / f"{n}.h5") for n in ("p000", "p002", "p003")}
        os.kill(victim, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        _end(proc, seen)
    assert proc.returncode == 0, stdout
    assert "p001  train.steps=150000  its worker process was killed by SIGKILL (out of memory?); " \
        "running it again (attempt 2 of 3)" in stdout
    assert "4 points, 4 complete, 0 failed" in stdout and "and 4 point files" in stdout
    # the points finished before the kill were not run again: their files are the same files
    assert {n: _identity(out / f"{n}.h5") for n in kept} == kept
    result = read_index(out)
    assert [p.status for p in result] == ["complete"] * 4
    assert all(p.written for p in result)
    assert fr.store.run_info(out / "p001.h5")["config"]  # the rerun p001 is a whole file


@LINUX_PROC
def test_a_point_that_keeps_killing_its_worker_fails_alone(tmp_path):
    proc, out = _start_sweep(tmp_path, [200, 150000, 200, 200])
    seen: set[int] = set()
    kills = 0
    try:
        while proc.poll() is None:
            for worker in _workers(proc.pid):
                seen.add(worker)
                if _holds(worker, "p001"):
                    os.kill(worker, signal.SIGKILL)
                    kills += 1
                    while _alive(worker):
                        time.sleep(0.005)
            time.sleep(0.01)
        stdout = proc.stdout.read()
    finally:
        _end(proc, seen)
    assert kills == 3, stdout  # the first run and two more
    assert proc.returncode == 1, stdout
    assert "4 points, 3 complete, 1 failed" in stdout
    statuses = [p.status for p in read_index(out)]
    assert statuses[1] == ("failed: worker died: the worker process running p001 was killed by "
                           "SIGKILL (out of memory?) in each of its 3 attempts; not run again")
    assert statuses[0] == statuses[2] == statuses[3] == "complete"


# ----------------------------------------------------------------------------- K: a killed sweep
def _running_workers(proc: subprocess.Popen, out: Path, seen: set[int]) -> list[int]:
    """Wait until both workers run a point and its file is at its path; return their pids."""
    def both_running():
        workers = _workers(proc.pid)
        seen.update(workers)
        busy = [w for w in workers if _holds(w, "p000") or _holds(w, "p001")]
        made = all((out / f"{n}.h5").is_file() for n in ("p000", "p001"))
        return busy if len(busy) == 2 and made else None

    return _wait_for(both_running, "two workers ran points", proc)


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@LINUX_PROC
def test_workers_end_when_the_sweep_process_is_killed(tmp_path):
    proc, out = _start_sweep(tmp_path, [10**8, 10**8])  # points that would run for minutes
    seen: set[int] = set()
    try:
        workers = _running_workers(proc, out, seen)
        proc.kill()
        proc.wait()
        assert _gone_within(workers, 5.0) == []
    finally:
        _end(proc, seen)


@LINUX_PROC
def test_sigterm_stops_the_workers_and_writes_the_index(tmp_path):
    proc, out = _start_sweep(tmp_path, [10**8, 10**8])
    seen: set[int] = set()
    try:
        workers = _running_workers(proc, out, seen)
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGTERM
        assert _gone_within(workers, 5.0) == []
    finally:
        _end(proc, seen)
    result = read_index(out)
    assert [p.status for p in result] == ["failed: interrupted (SIGTERM) before the point "
                                          "finished"] * 2
    assert all(p.written for p in result)  # the rows they had flushed stay readable
    for p in result:
        assert fr.store.run_info(p.path)["config"]
