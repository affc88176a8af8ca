"""Sweeps when things go wrong: an output directory holding another sweep's files, a pool worker
killed (as the OOM killer kills), the sweep process itself killed or terminated.

The process tests run ``python -m fastrace.cli sweep`` in a real subprocess and find its pool
workers through /proc (children of the sweep process, and the point files they hold open)."""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import multiprocessing
import multiprocessing.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import pytest

import fastrace as fr
from fastrace import cli
from fastrace.config import Experiment, load_experiment
from fastrace.sweep import _ending, read_index, sweep

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


def _start_sweep(tmp_path: Path, steps: list[int], workers: int = 2, **popen):
    toml = tmp_path / "sweep.toml"
    toml.write_text(BASE.format(steps=steps[0]) + f'\n[sweep]\n"train.steps" = {steps}\n')
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fastrace.cli", "sweep", str(toml), "-o",
                             str(out), "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
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


def _kill_and_see_the_workers_end(proc, out, seen: set[int]) -> None:
    """SIGKILL a running sweep once its workers run (their pids go into ``seen``); they must be
    gone within 5 s."""
    try:
        workers = _running_workers(proc, out, seen)
        proc.kill()
        proc.wait()
        assert _gone_within(workers, 5.0) == []
    finally:
        _end(proc, seen)


@LINUX_PROC
def test_workers_end_when_the_sweep_process_is_killed(tmp_path):
    proc, out = _start_sweep(tmp_path, [10**8, 10**8])  # points that would run for minutes
    seen: set[int] = set()
    _kill_and_see_the_workers_end(proc, out, seen)


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


# ----------------------------------------------------------------------------- L: review fixes
INTERRUPTED = "failed: interrupted ({}) before the point finished"


def _tmpdir(tmp_path: Path) -> dict[str, str]:
    """The environment with TMPDIR in ``tmp_path`` (for what a killed process leaves there)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp))


def _notes_dirs(out: Path) -> list[Path]:
    """The directories of the workers' running notes in the output directory."""
    return sorted(out.glob(".fastrace-running-*"))


@LINUX_PROC
def test_ctrl_c_stops_a_sweep_run_in_another_thread(tmp_path):
    # a script runs the sweep in a thread; Ctrl-C (SIGINT to the whole process group) reaches
    # the script's main thread and the workers, never the sweep's thread
    toml = tmp_path / "sweep.toml"
    toml.write_text(BASE.format(steps=10**8) + '\n[sweep]\n"train.steps" = [100000000, 100000001]\n')
    out = tmp_path / "out"
    # (the main thread waits on an Event: in Python 3.11 a Ctrl-C during Thread.join marks the
    # thread ended, and the interpreter then exits without waiting for it)
    script = ("import sys, threading\n"
              "from fastrace.sweep import sweep\n"
              "finished = threading.Event()\n"
              "def job():\n"
              "    try:\n"
              "        sweep(sys.argv[1], out_dir=sys.argv[2], workers=2)\n"
              "    finally:\n"
              "        finished.set()\n"
              "threading.Thread(target=job).start()\n"
              "try:\n"
              "    while not finished.wait(0.1):\n"
              "        pass\n"
              "except KeyboardInterrupt:\n"
              "    finished.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(toml), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=_tmpdir(tmp_path))
    seen: set[int] = set()
    try:
        workers = _running_workers(proc, out, seen)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            stdout, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep still ran 20 s after Ctrl-C")
        assert _gone_within(workers, 5.0) == []
    finally:
        _end(proc, seen)
    assert "KeyboardInterrupt" in stdout
    result = read_index(out)
    assert [p.status for p in result] == [INTERRUPTED.format("KeyboardInterrupt")] * 2


@LINUX_PROC
def test_the_same_sweep_reruns_after_a_crash_that_lost_its_index(tmp_path):
    proc, out = _start_sweep(tmp_path, [10**8, 10**8], env=_tmpdir(tmp_path))
    seen: set[int] = set()
    try:
        workers = _running_workers(proc, out, seen)
        proc.kill()  # the workers die with it, their point files left open for write (SWMR)
        proc.wait()
        assert _gone_within(workers, 5.0) == []
    finally:
        _end(proc, seen)
    (out / "index.h5").unlink()  # lost
    again, _ = _start_sweep(tmp_path, [10**8, 10**8], env=_tmpdir(tmp_path))
    try:  # accepted: it runs the points again
        _running_workers(again, out, seen)
        again.terminate()
        stdout, _ = again.communicate(timeout=20)
    finally:
        _end(again, seen)
    assert again.returncode == -signal.SIGTERM, stdout
    assert [p.status for p in read_index(out)] == [INTERRUPTED.format("SIGTERM")] * 2


@LINUX_PROC
def test_a_killed_sweep_leaves_nothing_in_tmp_and_the_next_sweep_clears_its_notes(tmp_path):
    env = _tmpdir(tmp_path)
    tmp = Path(env["TMPDIR"])
    proc, out = _start_sweep(tmp_path, [10**8, 10**8], env=env)
    seen: set[int] = set()
    _kill_and_see_the_workers_end(proc, out, seen)
    assert list(tmp.iterdir()) == []
    left = _notes_dirs(out)
    assert [d.name.split("-")[2] for d in left] == [str(proc.pid)]
    again, _ = _start_sweep(tmp_path, [10**8, 10**8], env=env)
    try:  # the same sweep again: the dead client's notes are removed, the new ones kept
        _running_workers(again, out, seen)
        assert [d.name.split("-")[2] for d in _notes_dirs(out)] == [str(again.pid)]
        again.terminate()
        stdout, _ = again.communicate(timeout=20)
    finally:
        _end(again, seen)
    assert again.returncode == -signal.SIGTERM, stdout
    assert _notes_dirs(out) == [] and list(tmp.iterdir()) == []


def test_notes_of_sweeps_gone_are_removed_and_never_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # a process id no process has now
    stale = out / f".fastrace-running-{done.pid}-x1"
    stale.mkdir()
    (stale / "123").write_text(str(out / "p000.h5"))
    # a live process's (in another pid namespace, a sweep's pid may be any process's here): no
    # sweep runs in out, as it holds no lock of out
    live = out / f".fastrace-running-{os.getppid()}-x2"
    live.mkdir()
    result = sweep(BASE.format(steps=200), {"train.lr": [0.01]}, out, workers=1, warm=False)
    assert [p.status for p in result] == ["complete"]
    assert _notes_dirs(out) == []


def test_notes_removed_while_the_sweep_runs(tmp_path, monkeypatch):
    # a tmp cleaner (or a user) removes the directory of the workers' notes mid-run
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    out = tmp_path / "out"
    removed: list[Path] = []
    stop = threading.Event()

    def cleaner():
        while not stop.is_set() and not removed:
            for d in [*tmp.glob("fastrace-sweep-*"), *_notes_dirs(out)]:
                try:
                    if any(n.name.isdigit() for n in d.iterdir()):  # a worker noted its point
                        shutil.rmtree(d)
                        removed.append(d)
                except OSError:
                    pass
            time.sleep(0.005)

    thread = threading.Thread(target=cleaner)
    thread.start()
    try:
        result = sweep(BASE.format(steps=150000), {"train.lr": [0.01, 0.011]}, out, workers=2,
                       warm=False)
    finally:
        stop.set()
        thread.join()
    assert removed
    assert [p.status for p in result] == ["complete"] * 2
    assert _notes_dirs(out) == []


# a sweep (`fastrace sweep`, 2 workers) that sends itself SIGTERM at an exact spot, once the
# sweep handles SIGTERM: where function NAME of a file ending in SUFFIX is called, returns or
# runs line LINE; with "all-done", only once every point of the sweep has its outcome
SIGTERM_AT = r"""
import os, signal, sys
from fastrace import cli

suffix, name, event, line, when, toml, out = sys.argv[1:]
line = int(line)
state = {"armed": False, "fired": False}
real_signal = signal.signal


def arming(signum, handler):
    if signum == signal.SIGTERM and handler not in (signal.SIG_DFL, signal.SIG_IGN):
        state["armed"] = True
    return real_signal(signum, handler)


signal.signal = arming


def due(frame):
    if when != "all-done":
        return True
    result = frame.f_locals.get("result")
    return result is not None and all(p.status != "pending" for p in result.points)


def fire():
    state["fired"] = True
    os.kill(os.getpid(), signal.SIGTERM)


def local(frame, ev, arg):
    if not state["fired"] and ev == event and (ev != "line" or frame.f_lineno == line) \
            and due(frame):
        fire()
    return None if state["fired"] else local


def tracer(frame, ev, arg):
    code = frame.f_code
    if state["armed"] and not state["fired"] and code.co_qualname == name \
            and code.co_filename.endswith(suffix):
        if event == "call":
            if due(frame):
                fire()
            return None
        return local
    return None


sys.settrace(tracer)
sys.exit(cli.main(["sweep", toml, "-o", out, "--workers", "2"]))
"""


def _sigterm_at(tmp_path: Path, suffix: str, name: str, event: str, line: int = 0,
                when: str = "") -> tuple[subprocess.CompletedProcess, Path, Path]:
    toml = tmp_path / "sweep.toml"
    toml.write_text(BASE.format(steps=200) + '\n[sweep]\n"train.steps" = [200, 300, 400]\n')
    out = tmp_path / "out"
    env = _tmpdir(tmp_path)
    done = subprocess.run([sys.executable, "-c", SIGTERM_AT, suffix, name, event, str(line),
                           when, str(toml), str(out)], capture_output=True, text=True,
                          timeout=120, env=env)
    return done, out, Path(env["TMPDIR"])


def _source_line(function, text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    for k, source in enumerate(lines):
        if text in source:
            return first + k
    pytest.skip(f"{text!r} is not in {function.__qualname__}")


@pytest.mark.parametrize("event", ["call", "line"])
def test_sigterm_as_the_final_index_is_written_keeps_it(tmp_path, event):
    # when the last write of the index starts, or just before it replaces the index
    line = _source_line(fr.sweep.write_index, "os.replace(tmp, result.index)")
    done, out, _ = _sigterm_at(tmp_path, "fastrace/sweep.py", "write_index", event, line,
                               "all-done")
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr
    result = read_index(out)
    assert [p.status for p in result] == ["complete"] * 3
    assert all(p.written for p in result)
    assert sorted(f.name for f in out.iterdir()) == [".fastrace-sweep.lock", "index.h5",
                                                     "p000.h5", "p001.h5", "p002.h5"]


def test_sigterm_in_a_multiprocessing_finalizer_is_not_lost(tmp_path):
    # an exception raised there is printed and ignored: the sweep went on and exited with 0
    line = _source_line(multiprocessing.util.Finalize.__call__, "self._key = None")
    done, out, _ = _sigterm_at(tmp_path, "multiprocessing/util.py", "Finalize.__call__", "line",
                               line)
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr
    statuses = [p.status for p in read_index(out)]
    assert set(statuses) <= {"complete", INTERRUPTED.format("SIGTERM")}, statuses
    assert not (out / "index.h5.partial").exists()


def test_sigterm_as_the_pool_starts_leaves_no_notes(tmp_path):
    # right after the directory of the workers' notes is made
    done, out, tmp = _sigterm_at(tmp_path, "tempfile.py", "mkdtemp", "return")
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr
    assert list(tmp.iterdir()) == [] and _notes_dirs(out) == []
    assert [p.status for p in read_index(out)] == [INTERRUPTED.format("SIGTERM")] * 3


@LINUX_PROC
def test_a_worker_ended_by_sigterm_reruns_only_its_point(tmp_path):
    # `kill <worker pid>`: the pool then ends the other worker with SIGTERM too. The victim is
    # the worker the pool started first: the pool notices its end at once (Python 3.11's pool
    # may wait on the sentinels of the workers it had before the last one started)
    proc, out = _start_sweep(tmp_path, [300000, 300001], env=_tmpdir(tmp_path))
    seen: set[int] = set()
    try:
        victim = min(_running_workers(proc, out, seen))
        mine, other = ("p000", "p001") if _holds(victim, "p000") else ("p001", "p000")
        os.kill(victim, signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        _end(proc, seen)
    assert proc.returncode == 0, stdout
    assert f"{mine}  train.steps=30000{mine[-1]}  its worker process was killed by SIGTERM; " \
        "running it again (attempt 2 of 3)" in stdout
    assert f"{other}  train.steps=30000{other[-1]}  its worker" not in stdout, stdout
    assert [p.status for p in read_index(out)] == ["complete"] * 2


def test_an_experiment_built_in_python_reruns_into_its_directory(tmp_path):
    loaded = load_experiment(BASE.format(steps=200))
    exp = Experiment(task=loaded.task, init=loaded.init, train=loaded.train, theory=None)
    assert exp.text == ""
    out = tmp_path / "out"
    grid = {"train.lr": [0.01, 0.02]}
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        first = sweep(exp, grid, out, executor=pool, warm=False)
        again = sweep(exp, grid, out, executor=pool, warm=False)
        assert [p.status for p in first] == [p.status for p in again] == ["complete"] * 2
        other = Experiment(task=loaded.task, init=loaded.init, train={**loaded.train,
                                                                      "steps": 300}, theory=None)
        with pytest.raises(fr.ConfigError, match="the index of a sweep of another experiment"):
            sweep(other, grid, out, executor=pool, warm=False)


def test_how_a_worker_ended_without_sigkill(monkeypatch):
    monkeypatch.delattr(signal, "SIGKILL")  # as on Windows
    assert _ending(-signal.SIGTERM) == "was killed by SIGTERM"
    assert _ending(3) == "exited with status 3"


@LINUX_PROC
def test_sighup_stops_the_workers_and_writes_the_index(tmp_path):
    proc, out = _start_sweep(tmp_path, [10**8, 10**8], env=_tmpdir(tmp_path))
    seen: set[int] = set()
    try:
        workers = _running_workers(proc, out, seen)
        proc.send_signal(signal.SIGHUP)  # the ssh session dropped
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGHUP
        assert _gone_within(workers, 5.0) == []
    finally:
        _end(proc, seen)
    assert [p.status for p in read_index(out)] == [INTERRUPTED.format("SIGHUP")] * 2


@LINUX_PROC
def test_the_index_keeps_the_finished_points_of_a_sweep_killed_hard(tmp_path):
    proc, out = _start_sweep(tmp_path, [200, 10**8], env=_tmpdir(tmp_path))
    seen: set[int] = set()

    def p000_recorded():
        seen.update(_workers(proc.pid))
        try:
            return read_index(out).points[0].status == "complete"
        except fr.StoreError:  # not written yet
            return False

    try:
        _wait_for(p000_recorded, "the index recorded p000", proc, timeout=20)
        proc.kill()
        proc.wait()
    finally:
        _end(proc, seen)
    result = read_index(out)
    assert [p.status for p in result] == ["complete", "pending"]
    assert result.points[0].written


@LINUX_PROC
def test_ctrl_c_ends_the_cli_sweep_with_a_line_and_status_130(tmp_path):
    proc, out = _start_sweep(tmp_path, [10**8, 10**8], start_new_session=True,
                             env=_tmpdir(tmp_path))
    seen: set[int] = set()
    try:
        workers = _running_workers(proc, out, seen)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        stdout, _ = proc.communicate(timeout=20)
        assert _gone_within(workers, 5.0) == []
    finally:
        _end(proc, seen)
    assert proc.returncode == 130, stdout
    assert "Traceback" not in stdout
    assert stdout.strip().splitlines()[-1] == (f"fastrace sweep {tmp_path / 'sweep.toml'}: "
                                               f"interrupted; {out / 'index.h5'} holds the "
                                               "points' statuses")
    assert [p.status for p in read_index(out)] == [INTERRUPTED.format("KeyboardInterrupt")] * 2


# ----------------------------------------------------------------------------- second review
def _fake_pools(monkeypatch, round_):
    """Replace the local pools by rounds ``round_(todo, run)`` run in this process: each returns
    the points left unfinished, as a pool broken by a worker dying with no point in it (its
    notes empty) does."""
    import fastrace.sweep as fs

    class Pool:
        def __init__(self, workers, registry, dispositions):
            self.executor = None

        def close(self):
            return {1: -signal.SIGKILL}, {}

        def stop(self):
            pass

        def died(self, codes):
            return dict(codes)

    monkeypatch.setattr(fs, "_LocalPool", Pool)
    monkeypatch.setattr(fs, "_run_round", lambda executor, todo, run, pool=None: round_(todo, run))


def _every_point_completes(todo, run):
    """A round of _fake_pools in which every point completes."""
    for point, _ in todo:
        point.status = "complete"
        run.finished(point)
    return []


def test_worker_deaths_with_no_point_to_blame_count_only_in_a_row(tmp_path, monkeypatch):
    def one_point_then_a_death(todo, run):  # each round: one point finishes, then a worker dies
        point = todo[0][0]
        point.status = "complete"
        run.finished(point)
        return todo[1:]

    _fake_pools(monkeypatch, one_point_then_a_death)
    exp = load_experiment(BASE.format(steps=200))
    result = sweep(exp, {"train.lr": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]}, tmp_path / "out",
                   warm=False)
    assert [p.status for p in result] == ["complete"] * 6


def test_ctrl_c_while_the_cache_warms_marks_the_points_interrupted(tmp_path, monkeypatch):
    import fastrace.sweep as fs

    monkeypatch.setattr(fs, "_warm", lambda exp: signal.raise_signal(signal.SIGINT))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sweep(load_experiment(BASE.format(steps=200)), {"train.lr": [0.01, 0.02]}, out)
    assert [p.status for p in read_index(out)] == [INTERRUPTED.format("KeyboardInterrupt")] * 2


def test_a_closed_stdout_does_not_stop_the_cli_sweep(tmp_path, monkeypatch):
    _fake_pools(monkeypatch, _every_point_completes)
    toml = tmp_path / "sweep.toml"
    toml.write_text(BASE.format(steps=200) + '\n[sweep]\n"train.lr" = [0.01, 0.02, 0.03]\n')
    read, write = os.pipe()
    os.close(read)  # `fastrace sweep ... | head -0`
    with open(write, "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        code = cli.main(["sweep", str(toml), "-o", str(tmp_path / "out"), "--workers", "2"])
        monkeypatch.undo()
    assert code == 0
    assert [p.status for p in read_index(tmp_path / "out")] == ["complete"] * 3


def test_a_point_finished_as_the_sweep_is_interrupted_is_complete(tmp_path, monkeypatch):
    from fastrace.config import run_experiment

    def first_point_then_ctrl_c(todo, run):  # p000's file is written, then the pool is stopped
        point, point_exp = todo[0]
        run_experiment(load_experiment(point_exp.text), point.path, threads=1, progress=False)
        raise KeyboardInterrupt

    _fake_pools(monkeypatch, first_point_then_ctrl_c)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sweep(load_experiment(BASE.format(steps=200)), {"train.lr": [0.01, 0.02]}, out,
              warm=False)
    result = read_index(out)
    assert [p.status for p in result] == ["complete", INTERRUPTED.format("KeyboardInterrupt")]
    assert result.points[0].written and not result.points[1].written


@pytest.mark.skipif(sys.platform == "win32", reason="no sweep lock on Windows")
def test_a_second_sweep_into_a_directory_being_written_is_refused(tmp_path, monkeypatch):
    import fcntl

    _fake_pools(monkeypatch, _every_point_completes)
    out = tmp_path / "out"
    out.mkdir()
    notes = out / f".fastrace-running-{os.getpid()}-x1"  # the running sweep's
    notes.mkdir()
    exp = load_experiment(BASE.format(steps=200))
    with open(out / ".fastrace-sweep.lock", "a") as running:  # a sweep writing out
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(fr.ConfigError, match="is being written by another sweep"):
            sweep(exp, {"train.lr": [0.01, 0.02]}, out, warm=False)
        assert _notes_dirs(out) == [notes]
        assert not (out / "index.h5").exists()
    result = sweep(exp, {"train.lr": [0.01, 0.02]}, out, warm=False)  # that sweep ended
    assert [p.status for p in result] == ["complete"] * 2
    assert _notes_dirs(out) == []


def test_an_interrupt_cancels_the_points_a_given_executor_has_not_started(tmp_path):
    import _thread

    started, release = threading.Event(), threading.Event()
    ran = []

    def slow_point(text, path):
        ran.append(path)
        started.set()
        release.wait(10)
        return {"status": "complete", "seconds": 0.0, "summary": None}

    class Executor(cf.ThreadPoolExecutor):  # a caller's own executor, running one point at a time
        def submit(self, fn, *args, **kwargs):
            return super().submit(slow_point, *args)

    def ctrl_c():
        started.wait(10)
        time.sleep(0.3)  # the sweep waits for its points
        _thread.interrupt_main()

    out = tmp_path / "out"
    with Executor(1) as executor:
        threading.Thread(target=ctrl_c, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            sweep(load_experiment(BASE.format(steps=200)), {"train.lr": [0.01, 0.02, 0.03]}, out,
                  executor=executor, warm=False)
        release.set()
    assert len(ran) == 1  # the two points not started were cancelled
    assert [p.status for p in read_index(out)] == [
        "failed: interrupted (KeyboardInterrupt) while the point ran; the executor may still "
        "finish its file"] + [INTERRUPTED.format("KeyboardInterrupt")] * 2


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="no signal masks")
def test_ctrl_c_waits_while_the_pool_starts_its_workers(tmp_path, monkeypatch):
    # a worker started with SIGINT blocked, unblocked once it ignores it: a Ctrl-C as the pool
    # starts cannot end it with a KeyboardInterrupt traceback
    masks = []
    submit = cf.ProcessPoolExecutor.submit

    def recording(self, *args, **kwargs):
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(cf.ProcessPoolExecutor, "submit", recording)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    result = sweep(BASE.format(steps=200), {"train.lr": [0.01]}, tmp_path / "out", workers=1,
                   warm=False)
    assert [p.status for p in result] == ["complete"]
    assert masks and all(signal.SIGINT in mask for mask in masks)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    # the worker's side: SIGINT ignored, then unblocked
    code = ("import os, signal; from fastrace.sweep import _init_worker; "
            "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT]); "
            "_init_worker(os.getppid(), '', {signal.SIGINT: signal.SIG_IGN}, [signal.SIGINT]); "
            "print(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []), "
            "signal.getsignal(signal.SIGINT) == signal.SIG_IGN)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_a_point_without_its_theory_yet_is_not_taken_as_complete(tmp_path, monkeypatch):
    """The theory run is added after the runs end: a worker stopped in between leaves a file
    whose runs are all complete, but not the point's whole file (its theory is missing)."""
    from fastrace import config, sweep as sweep_module

    exp = load_experiment(BASE.format(steps=20) + "\n[theory]\nb0 = 0.1\n")
    out = tmp_path / "p000.h5"
    monkeypatch.setattr(config, "_add_theory", lambda out, solution: None)
    config.run_experiment(exp, out, threads=1)
    assert not sweep_module._complete_file(out, None, exp)  # the runs, not the theory
    monkeypatch.undo()
    config.run_experiment(exp, out, threads=1, resume=True)  # adds the theory
    assert sweep_module._complete_file(out, None, exp)


def test_the_sweep_lock_of_another_user_is_taken_read_only(tmp_path, monkeypatch):
    """In a shared directory the lock file may be another user's (mode 0644): opening it for
    writing is refused, but flock needs only a descriptor."""
    from fastrace import sweep as sweep_module

    (tmp_path / sweep_module._LOCK_NAME).touch()
    real_open = os.open

    def not_for_writing(path, flags, *args):
        if str(path).endswith(sweep_module._LOCK_NAME) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", not_for_writing)
    fd = sweep_module._lock_out_dir(tmp_path)
    assert fd is not None
    try:
        with pytest.raises(fr.ConfigError, match="being written by another sweep"):
            sweep_module._lock_out_dir(tmp_path)
    finally:
        os.close(fd)
