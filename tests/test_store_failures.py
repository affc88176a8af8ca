"""The store in a failing environment: a full disk, an output removed or replaced while a run
writes it, special files and bad names at the output path. Each raises StoreError naming what
is wrong; none crashes, hangs, or leaves rows that were never written looking like data.

A full disk is provoked in a child process, without privileges: with RLIMIT_FSIZE (writes past
the limit fail with EFBIG once SIGXFSZ is ignored), and, where user namespaces allow it (else
skipped), with a small tmpfs that really runs out of space. Children are checked by exit code,
since the failures this guards against include segfaults at exit."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from fastrace import store
from fastrace.errors import StoreError
from fastrace.store import RunSpec, TrajectoryWriter, read_run, run_info, run_status

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

SPEC = RunSpec(
    series={"t": (), "k": ((), np.int64), "x": (1024,)},  # x: 8 KB rows, incompressible
    checkpoint={"step": ((), np.int64)},
    attrs={"kind": "simulation"},
)
CKPT_EVERY = 25


def _rows(i0: int, i1: int) -> dict[str, np.ndarray]:
    """Rows i0..i1-1 of a deterministic trajectory; no row is all zeros."""
    i = np.arange(i0, i1)
    x = np.stack([np.random.default_rng(k).standard_normal(1024) + 1.0 for k in i]) \
        if len(i) else np.zeros((0, 1024))
    return {"t": 0.5 + 0.01 * i, "k": i + 1, "x": x}


def _assert_true_rows(path: Path) -> int:
    """Every row the file holds is a row really written (none is a fill value); the rows of
    the shortest series (series are written apart, so a failed run's may differ in length)."""
    data = read_run(path, "sim")
    lengths = {name: len(arr) for name, arr in data.series.items()}
    want = _rows(0, max(lengths.values()))
    for name, arr in data.series.items():
        np.testing.assert_array_equal(arr, want[name][:len(arr)], err_msg=name)
    return min(lengths.values())


def _child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with this module importable; its exit code is checked by
    the caller (a crash at exit shows only there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _child_or_fail(code: str, *args: str, hangs: str) -> subprocess.CompletedProcess:
    """``_child``, failing the test with ``hangs`` if the child is still running after 30 s."""
    try:
        return _child(code, *args, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(hangs)


# ------------------------------------------------------------------ a full disk


def _disk_full_main(out_dir: str, how: str, size: str, n_rows: str, compression: str) -> None:
    """Run in a child: stream ``n_rows`` rows into a file on a disk that fills up, report the
    StoreError, copy what the failure left to ``out_dir/failed.h5``, then make room and resume
    the run in this same process (as a notebook user would) into ``out_dir/resumed.h5``.

    ``how="rlimit"``: this process may write files of at most ``size`` bytes (RLIMIT_FSIZE).
    ``how="tmpfs"``: the file is on a file system of ``size`` (a tmpfs mounted by this child,
    run in its own user and mount namespaces), which really runs out of space (ENOSPC)."""
    import resource
    import signal

    n = int(n_rows)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if how == "rlimit":
        folder = out_dir
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(size), hard))
    else:
        folder = os.path.join(out_dir, "mnt")
        os.mkdir(folder)
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder]
        if subprocess.run(mount, capture_output=True).returncode:
            print("no tmpfs", flush=True)
            return
    path = os.path.join(folder, "run.h5")
    try:
        with TrajectoryWriter(path, {"sim": SPEC}, compression=compression, buffer_rows=8,
                              flush_interval=0.005) as w:
            for i in range(n):
                w.append("sim", _rows(i, i + 1))
                if (i + 1) % CKPT_EVERY == 0:
                    w.checkpoint("sim", i + 1, {"step": i + 1})
        print("no error", flush=True)
    except StoreError as exc:
        print(f"StoreError: {exc}", flush=True)
    print(f"open files: {h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)}",
          flush=True)
    if how == "rlimit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    if not os.path.exists(path):
        print("nothing at path", flush=True)
        return
    shutil.copy(path, os.path.join(out_dir, "failed.h5"))
    if how == "tmpfs":
        subprocess.run(["mount", "-o", "remount,size=64m", folder], check=True)
    with TrajectoryWriter(path, {"sim": SPEC}, mode="resume", compression=compression) as w:
        checkpoint = w.resume_state("sim")
        start = checkpoint.step if checkpoint else 0
        w.append("sim", _rows(start, n))
    shutil.copy(path, os.path.join(out_dir, "resumed.h5"))
    print(f"resumed from {start}", flush=True)


def _run_disk_full(tmp_path: Path, how: str, size: str, n_rows: int,
                   compression: str) -> str:
    """Run _disk_full_main in a child; its output, once its exit code says it did not crash."""
    code = "import sys, test_store_failures as t; t._disk_full_main(*sys.argv[1:])"
    args = (str(tmp_path), how, size, str(n_rows), compression)
    if how == "tmpfs":
        if shutil.which("unshare") is None:
            pytest.skip("no unshare command to mount a small file system without privileges")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
        out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount",
                              sys.executable, "-c", code, *args],
                             capture_output=True, text=True, env=env, timeout=120)
        if "no tmpfs" in out.stdout or out.stderr.startswith("unshare:"):
            pytest.skip(f"cannot mount a tmpfs in a user namespace here: {out.stderr[-300:]}")
    else:
        out = _child(code, *args, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "StoreError" in out.stdout and "open files: 0" in out.stdout, out.stdout
    return out.stdout


@pytest.mark.parametrize("how, size, compression", [
    ("rlimit", "3500000", "none"), ("rlimit", "5000000", "auto"),
    ("tmpfs", "3m", "none"), ("tmpfs", "4m", "auto"), ("tmpfs", "6m", "auto"),
])
def test_a_full_disk_leaves_only_rows_really_written_and_no_crash(tmp_path, how, size,
                                                                  compression):
    # the writer stops with StoreError, the file holds only rows really written (none of the
    # rows whose chunks never reached the disk reads back as zeros) and says the run failed,
    # the process exits normally, and the run resumes in it once there is room
    out = _run_disk_full(tmp_path, how, size, 600, compression)
    assert "resumed from" in out, out
    assert _assert_true_rows(tmp_path / "failed.h5") < 600
    assert run_status(tmp_path / "failed.h5", "sim").startswith("failed: ")
    assert _assert_true_rows(tmp_path / "resumed.h5") == 600
    assert run_status(tmp_path / "resumed.h5", "sim") == "complete"


@pytest.mark.parametrize("how, size", [
    ("rlimit", str(4 << 10)), ("rlimit", str(64 << 10)), ("rlimit", str(256 << 10)),
    ("rlimit", str(1 << 20)), ("tmpfs", "8k"), ("tmpfs", "64k"), ("tmpfs", "256k"),
])
def test_a_nearly_full_disk_at_the_start_raises_store_error(tmp_path, how, size):
    # the layout itself does not fit (or only just): the file never takes its path, or it
    # holds true rows only
    out = _run_disk_full(tmp_path, how, size, 300, "none")
    assert not (tmp_path / "run.h5.partial").exists()
    if size in ("4096", "65536", "8k", "64k"):  # refused before anything was written
        assert "nothing at path" in out
    if "nothing at path" not in out:
        _assert_true_rows(tmp_path / "failed.h5")
        assert _assert_true_rows(tmp_path / "resumed.h5") == 300


def test_after_a_failed_write_only_the_rows_flushed_before_it_are_kept(tmp_path, monkeypatch):
    # HDF5 drops a chunk it could not write, and a later flush still succeeds: after a write
    # error, rows written but not yet flushed are not trusted to be in the file
    path = tmp_path / "fail.h5"
    spec = RunSpec({"x": (1024,)})  # 8 KB rows, chunks of 16
    rows = np.arange(1.0, 121.0)[:, None] * np.ones(1024)
    write_rows = store._write_rows

    def failing_at_80(dsid, start, block):
        if start == 80:
            raise OSError("simulated disk full")
        write_rows(dsid, start, block)

    monkeypatch.setattr(store, "_write_rows", failing_at_80)
    w = TrajectoryWriter(path, {"r": spec}, compression="none", flush_interval=60)
    w.append_blocks("r", {"x": rows[:40]})
    w.flush()
    w.append_blocks("r", {"x": rows[40:80]})  # written (a whole block), not flushed
    w.append_blocks("r", {"x": rows[80:]})  # its write fails
    with pytest.raises(StoreError, match="simulated disk full"):
        w.close()
    np.testing.assert_array_equal(read_run(path, "r")["x"][:, 0], np.arange(1.0, 41.0))
    assert run_status(path, "r").startswith("failed: write error")


# ------------------------------------------------------------------ the output removed or replaced


def _foreign_file(tmp_path: Path) -> Path:
    """A complete fastrace file of another run, to put in the writer's place."""
    other = tmp_path / "other.h5"
    with TrajectoryWriter(other, {"sim": SPEC}, compression="none") as w:
        w.append("sim", _rows(0, 3))
    return other


@pytest.mark.parametrize("how", ["unlink", "rmdir", "replace", "replace_fastrace"])
def test_an_output_removed_or_replaced_fails_at_the_next_flush(tmp_path, how):
    folder = tmp_path / "d"
    folder.mkdir()
    path = folder / "run.h5"
    foreign = _foreign_file(tmp_path)
    w = TrajectoryWriter(path, {"sim": SPEC}, compression="none", flush_interval=60)
    w.append("sim", _rows(0, 5))
    w.flush()
    if how == "unlink":
        path.unlink()
    elif how == "rmdir":
        shutil.rmtree(folder)
    elif how == "replace":
        (tmp_path / "junk").write_text("not an HDF5 file\n")
        os.replace(tmp_path / "junk", path)
    else:
        shutil.copy(foreign, tmp_path / "copy.h5")
        os.replace(tmp_path / "copy.h5", path)
    before = path.read_bytes() if path.exists() else None
    w.append("sim", _rows(5, 10))
    what = "removed" if how in ("unlink", "rmdir") else "replaced"
    with pytest.raises(StoreError, match=f"{path}.*{what}"):
        w.flush()
    with pytest.raises(StoreError, match=what):
        w.close()
    # nothing was written at the path after the loss
    assert (path.read_bytes() if path.exists() else None) == before


def test_an_output_replaced_just_before_close_is_never_written(tmp_path):
    path = tmp_path / "run.h5"
    foreign = _foreign_file(tmp_path)
    w = TrajectoryWriter(path, {"sim": SPEC}, compression="none", flush_interval=60)
    w.append("sim", _rows(0, 50))
    w.checkpoint("sim", 50, {"step": 50})
    w.flush()
    shutil.copy(foreign, tmp_path / "copy.h5")
    os.replace(tmp_path / "copy.h5", path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="replaced"):
        w.close()
    assert path.read_bytes() == before
    info = run_info(path)["runs"]["sim"]
    assert info["steps_done"] == 0 and info["series"]["t"]["shape"] == (3,)
    with h5py.File(path, "r") as f:
        assert f["sim"].attrs["steps_done"] == 0


def test_an_output_removed_mid_run_is_reported_while_the_run_goes_on(tmp_path):
    # the periodic flush notices: an append raises, long before the run would end
    path = tmp_path / "run.h5"
    w = TrajectoryWriter(path, {"sim": SPEC}, compression="none", flush_interval=0.02)
    w.append("sim", _rows(0, 2))
    w.flush()
    path.unlink()
    deadline = time.monotonic() + 10
    with pytest.raises(StoreError, match="removed"):
        i = 2
        while time.monotonic() < deadline:
            w.append("sim", _rows(i, i + 1))
            i += 1
            time.sleep(0.005)
    assert time.monotonic() < deadline
    with pytest.raises(StoreError):
        w.close()
    assert not path.exists()


def test_the_writer_tells_its_file_id(tmp_path):
    path = tmp_path / "run.h5"
    with TrajectoryWriter(path, {"sim": SPEC}, compression="none") as w:
        w.append("sim", _rows(0, 2))
    with store.open_run(path, "sim") as reader:
        assert reader.file_id == w.file_id != ""


# ------------------------------------------------------------------ what the path names


def test_a_fifo_at_the_output_path_is_refused(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    with pytest.raises(StoreError, match=f"{path}.*not a regular file"):
        TrajectoryWriter(path, {"sim": SPEC})
    with pytest.raises(StoreError, match="not a regular file"):
        store.check_writable(path)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    # resume: refused at once too (reading a FIFO would wait for a writer forever)
    code = ("import sys, test_store_failures as t\n"
            "try:\n"
            "    t.TrajectoryWriter(sys.argv[1], {'sim': t.SPEC}, mode='resume')\n"
            "except t.StoreError as e:\n"
            "    print('StoreError:', e)\n")
    out = _child_or_fail(code, str(path), hangs="resume on a FIFO hangs")
    assert out.returncode == 0 and "not a regular file" in out.stdout, out.stdout + out.stderr
    assert stat.S_ISFIFO(os.lstat(path).st_mode)


def test_reading_a_fifo_is_refused_at_once(tmp_path):
    """info, plot and resume read the file first: HDF5's open of a FIFO waits for a writer."""
    path = tmp_path / "fifo.h5"
    os.mkfifo(path)
    code = ("import sys, test_store_failures as t\n"
            "for read in (t.store.run_info, t.store.list_runs,\n"
            "             lambda p: t.store.read_run(p, 'sim')):\n"
            "    try:\n"
            "        read(sys.argv[1])\n"
            "    except t.StoreError as e:\n"
            "        print('StoreError:', e)\n")
    out = _child_or_fail(code, str(path), hangs="reading a FIFO hangs")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("not a regular file") == 3, out.stdout + out.stderr


def test_a_device_node_at_the_output_path_is_refused(tmp_path):
    path = tmp_path / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    except (OSError, AttributeError) as exc:
        pytest.skip(f"cannot make a device node here ({exc})")
    for mode in ("w", "resume"):
        with pytest.raises(StoreError, match=f"{path}.*not a regular file"):
            TrajectoryWriter(path, {"sim": SPEC}, mode=mode)
        assert stat.S_ISCHR(os.lstat(path).st_mode)


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlink_output_writes_its_target_and_stays_a_link(tmp_path, target_exists):
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "target.h5"
    if target_exists:
        target.write_bytes(b"")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    with TrajectoryWriter(link, {"sim": SPEC}, compression="none") as w:
        w.append("sim", _rows(0, 4))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _assert_true_rows(target) == 4
    with TrajectoryWriter(link, {"sim": SPEC}, mode="resume", compression="none") as w:
        assert w.status("sim") == "complete"
    assert link.is_symlink() and _assert_true_rows(link) == 4
    assert not any(p.name.endswith((".partial", ".lock")) for p in tmp_path.rglob("*"))


def test_a_symlink_to_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.h5"
    link.symlink_to(fifo)
    with pytest.raises(StoreError, match="not a regular file"):
        TrajectoryWriter(link, {"sim": SPEC})
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_an_output_name_too_long_for_its_partial_file_is_refused(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    # valid, and so is "<path>.lock"; "<path>.partial" is not
    path = tmp_path / ("a" * (name_max - 9) + ".h5")
    for mode in ("w", "resume"):
        with pytest.raises(StoreError, match="too long"):
            TrajectoryWriter(path, {"sim": SPEC}, mode=mode)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_at_the_partial_path_is_refused(tmp_path):
    path = tmp_path / "run.h5"
    Path(f"{path}.partial").mkdir()
    with pytest.raises(StoreError, match=f"{path}.partial"):
        TrajectoryWriter(path, {"sim": SPEC})
    assert Path(f"{path}.partial").is_dir() and not path.exists()
    assert not Path(f"{path}.lock").exists()


# ------------------------------------------------------------------ no false "disk full"
_BATCH_UNDER_A_LIMIT = """
import resource, signal, sys
import fastrace as fr
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
out, limit = sys.argv[1], int(sys.argv[2])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
task = fr.tasks.routing()
inits = [fr.init.orthogonal(task.network, 0.2, seed=s) for s in range(24)]
fr.simulate(task.network, task.data, inits, lr=0.02, steps=100, record_every=1, out=out,
            progress=False, in_memory=False)
print("complete")
"""


def test_a_batch_whose_file_fits_under_a_size_limit_is_not_refused(tmp_path):
    """The room kept free is the chunks a write begins and ~4 kB of metadata per dataset, not
    a whole chunk for every series of every run: a batch of 24 runs (~100 small series, whose
    128 kB chunks compress to a few kB) was refused under a limit 1.3x its file's size (it
    asked for 169 MB more than its file). The limit here is twice the file's size: the same
    run's file took 9.9 to 12.2 MB from run to run (its layout follows where the writer's blocks
    and checkpoints fall in time), so 1.3x failed at times."""
    free = _child(_BATCH_UNDER_A_LIMIT, str(tmp_path / "free.h5"), "0", timeout=300)
    assert free.returncode == 0 and "complete" in free.stdout, free.stderr[-2000:]
    size = (tmp_path / "free.h5").stat().st_size
    limited = _child(_BATCH_UNDER_A_LIMIT, str(tmp_path / "limited.h5"),
                     str(2 * size + (2 << 20)), timeout=300)
    assert limited.returncode == 0 and "complete" in limited.stdout, limited.stderr[-2000:]


class _FakeStatvfs:
    def __init__(self, blocks: int, bfree: int, bavail: int) -> None:
        self.f_blocks, self.f_bfree, self.f_bavail, self.f_frsize = blocks, bfree, bavail, 4096


def test_free_room_of_file_systems_without_a_size_and_for_root(monkeypatch):
    """ramfs and an unlimited tmpfs report no blocks at all: not full, but of unknown size;
    root may use the blocks ext4 keeps back for it (f_bfree), others f_bavail."""
    monkeypatch.setattr(os, "fstatvfs", lambda fd: _FakeStatvfs(0, 0, 0))
    assert store._free_bytes(0) == sys.maxsize
    monkeypatch.setattr(os, "fstatvfs", lambda fd: _FakeStatvfs(1000, 300, 50))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert store._free_bytes(0) == 300 * 4096
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert store._free_bytes(0) == 50 * 4096


def test_a_relative_output_survives_a_change_of_directory(tmp_path, monkeypatch):
    """The writer keeps its path absolute: a caller changing directory mid-run got a false
    "removed" error."""
    import fastrace as fr

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    task = fr.tasks.routing(M=3, K=2, hidden=6)
    moved = []

    def wander(weights):  # a quantity that changes directory once, mid-run
        if not moved:
            moved.append(True)
        elif len(moved) == 1:
            moved.append(True)
            os.chdir(tmp_path / "b")
        return 0.0

    run = fr.simulate(task.network, task.data, fr.init.orthogonal(task.network, 0.3, seed=0),
                      lr=0.05, steps=300, out="run.h5", quantities={"wander": wander},
                      svals=False, progress=False, in_memory=False)
    assert run.status == "complete" and len(run.t) == 301
    assert run_status(tmp_path / "a" / "run.h5", "simulation") == "complete"
    assert not (tmp_path / "b" / "run.h5").exists()


def test_a_lock_file_released_while_it_is_being_locked_is_not_held(tmp_path, monkeypatch):
    """A holder removes its lock file when it releases it. A writer that opened the file just
    before that, and locks it just after, holds a lock on a file no longer at the path, while a
    third writer locks the new one: two writers of one output. The lock is taken again then."""
    import fcntl as real_fcntl

    out = tmp_path / "run.h5"
    holder = store._WriterLock(out)
    others = []

    class ReleasedMeanwhile:
        LOCK_EX, LOCK_NB = real_fcntl.LOCK_EX, real_fcntl.LOCK_NB

        @staticmethod
        def flock(fd, how):
            if not others:  # between the first writer's open and its flock:
                others.append(None)
                holder.release()  # the holder releases (removing the file) ...
                others[0] = store._WriterLock(out)  # ... and another writer locks a new one
            return real_fcntl.flock(fd, how)

    monkeypatch.setattr(store, "fcntl", ReleasedMeanwhile)
    with pytest.raises(StoreError, match="being written by another process"):
        store._WriterLock(out)
    others[0].release()
    store._WriterLock(out).release()  # free again: taken at once


def test_releasing_a_lock_leaves_another_writers_lock_file(tmp_path):
    """A user removes a held lock file; another writer then locks a new one. The first
    writer's release must not remove the second's file: a third writer would lock a new file
    again, beside the second's lock."""
    out = tmp_path / "run.h5"
    first = store._WriterLock(out)
    Path(f"{out}.lock").unlink()
    second = store._WriterLock(out)
    first.release()
    assert Path(f"{out}.lock").exists()
    with pytest.raises(StoreError, match="being written by another process"):
        store._WriterLock(out)
    second.release()
    assert not Path(f"{out}.lock").exists()
