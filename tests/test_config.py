"""TOML experiment files and ``fastrace run``: same numbers as direct calls, errors that name the key,
and a run killed with SIGKILL that ``--resume`` finishes to the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import fastrace as fr
from fastrace import _memory
from fastrace import cli, store
from fastrace.config import dumps, experiment_from_table, load_experiment, run_experiment

ORTHOGONAL = """
[task]
name = "routing"
M = 3
K = 2
hidden = 6

[init]
kind = "orthogonal"
gain = 0.3
seeds = [0, 1]

[train]
method = "gd"
lr = 0.05
steps = 40
record_every = 2
checkpoint_every = 10
"""

ALIGNED = """
[task]
name = "routing"
M = 3
K = 2
hidden = 6

[init]
kind = "aligned"
b0 = 0.1
seeds = [3, 4]

[train]
lr = 0.05
steps = 40
record_every = 2

[theory]
b0 = 0.1
"""


def _series(path, run):
    data = store.read_run(path, run)
    return data.series, data.status


def test_orthogonal_experiment_equals_direct_simulate(tmp_path):
    out = tmp_path / "run.h5"
    summary = run_experiment(load_experiment(ORTHOGONAL), out, threads=1)
    task = fr.tasks.routing(M=3, K=2, hidden=6)
    weights = [fr.init.orthogonal(task.network, 0.3, seed=s) for s in (0, 1)]
    direct = fr.simulate(task.network, task.data, weights, lr=0.05, steps=40, record_every=2,
                         threads=1)
    assert set(summary["runs"]) == {"seed_00", "seed_01"} and summary["theory"] is None
    assert store.run_info(out)["config"] == ORTHOGONAL
    for tr in direct:
        series, status = _series(out, tr.run)
        assert status == "complete"
        np.testing.assert_array_equal(series["t"], tr.t)
        np.testing.assert_array_equal(series["loss"], tr.loss)
        for edge, sv in tr.svals.items():
            np.testing.assert_array_equal(series[f"svals/{edge}"], sv)
        assert summary["runs"][tr.run]["loss_final"] == tr.loss[-1]
        assert tr.t[-1] == pytest.approx(0.05 * 40)


def test_an_experiment_keeps_its_rows_in_the_file_only(tmp_path, monkeypatch):
    # however little memory is free (room for the runs' weights and state, ~21 kB here),
    # `fastrace run` does not hold the rows: they go to the file
    monkeypatch.setattr(_memory, "available_memory", lambda: 30_000)
    monkeypatch.setattr(_memory, "ROOM_CHECK_BYTES", 0)
    out = tmp_path / "small_memory.h5"
    summary = run_experiment(load_experiment(ORTHOGONAL), out, threads=1)
    assert {r["status"] for r in summary["runs"].values()} == {"complete"}
    assert summary["runs"]["seed_00"]["n_saved"] == 21
    with pytest.raises(fr.ConfigError, match="in_memory=False"):  # while keeping them would not
        task = fr.tasks.routing(M=3, K=2, hidden=6)
        fr.simulate(task.network, task.data, fr.init.orthogonal(task.network, 0.3, seed=0),
                    lr=0.05, steps=4000, record_every=2, out=tmp_path / "kept.h5")


def test_aligned_experiment_with_theory(tmp_path):
    """Aligned runs use red.aligned_init with default_rng(seed); the theory run is the reduced
    gradient-descent map, which an aligned full run follows (a physics cross-check)."""
    out = tmp_path / "aligned.h5"
    run_experiment(load_experiment(ALIGNED), out, threads=1)
    task = fr.tasks.routing(M=3, K=2, hidden=6)
    red = fr.reduce(task.network, task.data)
    weights = [red.aligned_init(0.1, seed=np.random.default_rng(s)) for s in (3, 4)]
    direct = fr.simulate(task.network, task.data, weights, lr=0.05, steps=40, record_every=2,
                         run_names=["seed_03", "seed_04"], threads=1)
    assert store.list_runs(out) == ["seed_03", "seed_04", "theory"]
    for tr in direct:
        series, _ = _series(out, tr.run)
        np.testing.assert_array_equal(series["loss"], tr.loss)
    theory, status = _series(out, "theory")
    assert status == "complete"
    expected = red.integrate(0.1, method="gd", lr=0.05, steps=40, save_at=np.arange(0, 41, 2))
    np.testing.assert_array_equal(theory["t"], direct[0].t)
    np.testing.assert_allclose(theory["loss"], expected.loss, rtol=0, atol=0)
    np.testing.assert_allclose(theory["loss"], direct[0].loss, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.update(extra={"a": 1}), "extra"),
    (lambda t: t.pop("train"), "[train]"),
    (lambda t: t["task"].update(name="xor9"), "task.name"),
    (lambda t: t["task"].update(widht=3), "task.widht"),
    (lambda t: t["init"].update(kind="uniform"), "init.kind"),
    (lambda t: t["init"].update(gain=-1.0), "init.gain"),
    (lambda t: t["init"].update(std=1.0), "init.std"),
    (lambda t: t["init"].update(seeds=[]), "init.seeds"),
    (lambda t: t["init"].update(seeds=[1, 1]), "init.seeds"),
    (lambda t: t["train"].pop("lr"), "train.lr"),
    (lambda t: t["train"].update(lr="fast"), "train.lr"),
    (lambda t: t["train"].update(steps=2.5), "train.steps"),
    (lambda t: t["train"].update(method="adam"), "train.method"),
    (lambda t: t["train"].update(lrr=0.1), "train.lrr"),
    (lambda t: t["train"].update(save_weights="yes"), "train.save_weights"),
    (lambda t: t["train"].update(t_end=3.0), "train.t_end"),
    (lambda t: t.update(theory={"method": "gd"}), "theory.b0"),
    (lambda t: t.update(sweep={"init": {"gain": 0.2}}), "sweep.init.gain"),
    (lambda t: t.update(sweep={"gain": [0.2]}), "sweep.gain"),
])
def test_bad_experiment_names_the_key(edit, key):
    import tomllib

    table = tomllib.loads(ORTHOGONAL)
    edit(table)
    with pytest.raises(fr.ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_experiment(dumps(table))


def test_unreadable_sources(tmp_path):
    with pytest.raises(fr.ConfigError, match="not valid TOML"):
        load_experiment("[task\nname = 1\n")
    with pytest.raises(fr.ConfigError, match="cannot read"):
        load_experiment(tmp_path / "missing.toml")
    exp = load_experiment(ORTHOGONAL.replace("K = 2", "K = 5"))  # the builder's own check
    with pytest.raises(fr.ConfigError, match="K"):
        run_experiment(exp, tmp_path / "x.h5")


def test_toml_round_trip_and_overrides():
    exp = load_experiment(ORTHOGONAL + '\n[sweep]\n"init.gain" = [0.1, 1]\ntrain.lr = [0.01]\n'
                          "seed = 7\n")
    assert exp.sweep == {"init.gain": [0.1, 1], "train.lr": [0.01]} and exp.sweep_seed == 7
    again = load_experiment(exp.to_toml())
    assert again.table == exp.table and again.sweep == exp.sweep and again.sweep_seed == 7
    point = exp.with_values({"init.gain": 1.5, "train.checkpoint_every": None})
    assert point.init["gain"] == 1.5 and "checkpoint_every" not in point.train
    assert point.sweep == {} and experiment_from_table(point.table).table == point.table
    assert load_experiment(point.text).table == point.table
    with pytest.raises(fr.ConfigError, match="train.lr"):
        exp.with_values({"train.lr": -1.0})


def test_cli_run_end_to_end(tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text(ALIGNED)
    out = tmp_path / "out.h5"
    assert cli.main(["run", str(path), "-o", str(out), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "seed_03" in text and "theory" in text and str(out) in text
    assert store.list_runs(out) == ["seed_03", "seed_04", "theory"]
    # a bad file: exit code 2 and the key named, no traceback
    path.write_text(ALIGNED.replace("lr = 0.05", "lr = -0.05"))
    assert cli.main(["run", str(path), "-o", str(tmp_path / "bad.h5")]) == 2
    assert "train.lr" in capsys.readouterr().err


SLOW_RUNNER = """
import sys, time
import fastrace.store as st
original = st.TrajectoryWriter.checkpoint
def slow(self, *args, **kwargs):  # pause after each checkpoint so the kill lands mid-run
    original(self, *args, **kwargs)
    time.sleep(0.25)
st.TrajectoryWriter.checkpoint = slow
from fastrace.cli import main
sys.exit(main(["run", sys.argv[1], "-o", sys.argv[2], "--threads", "1"]))
"""


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, capsys):
    text = ALIGNED.replace("steps = 40", "steps = 120").replace(
        "record_every = 2", "record_every = 3\ncheckpoint_every = 10")
    path = tmp_path / "exp.toml"
    path.write_text(text)
    killed, whole = tmp_path / "killed.h5", tmp_path / "whole.h5"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUNNER, str(path), str(killed)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                step = store.run_info(killed)["runs"]["seed_03"]["checkpoint_step"] or 0
            except fr.StoreError:
                step = 0
            if step >= 30:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the run never reached its third checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    info = store.run_info(killed)["runs"]
    assert info["seed_03"]["status"] == "running" and "theory" not in info
    assert info["seed_03"]["steps_done"] < 120

    # a different experiment may not resume it
    other = tmp_path / "other.toml"
    other.write_text(text.replace("b0 = 0.1\nseeds", "b0 = 0.2\nseeds"))
    assert cli.main(["run", str(other), "-o", str(killed), "--resume"]) == 2
    assert "another experiment" in capsys.readouterr().err

    assert cli.main(["run", str(path), "-o", str(killed), "--resume", "--threads", "1"]) == 0
    assert "(resumed)" in capsys.readouterr().out
    assert cli.main(["run", str(path), "-o", str(whole), "--threads", "1"]) == 0
    assert store.list_runs(killed) == store.list_runs(whole) == ["seed_03", "seed_04", "theory"]
    for run in ("seed_03", "seed_04", "theory"):
        a, b = store.read_run(killed, run), store.read_run(whole, run)
        assert a.status == b.status == "complete"
        assert set(a.series) == set(b.series)
        for name in a.series:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{run}/{name}")
    assert store.run_info(killed)["config"] == text


@pytest.mark.parametrize("name", ["routing.toml", "routing_sweep.toml"])
def test_examples_load(name):
    here = os.path.join(os.path.dirname(__file__), "..", "examples", name)
    exp = load_experiment(here)
    assert exp.task["name"] == "routing"
    assert bool(exp.sweep) == ("sweep" in name)


def test_flow_experiment_settings():
    exp = load_experiment(textwrap.dedent("""
        [task]
        name = "routing"
        [init]
        kind = "gaussian"
        std = 0.1
        [train]
        method = "flow"
        t_end = 2.0
        n_records = 11
        [theory]
        b0 = 0.05
        method = "dopri5"
        """))
    assert exp.train == {"method": "flow", "t_end": 2.0, "n_records": 11}
    assert exp.init == {"kind": "gaussian", "std": 0.1, "seeds": [0]}
    with pytest.raises(fr.ConfigError, match="theory.method"):
        exp.with_values({"theory.method": "gd"})


def test_an_unwritable_output_fails_before_the_theory_is_computed(tmp_path, monkeypatch):
    """Its theory is computed before the runs start: an output that cannot be written is a
    StoreError before that compute (it came after 12 s of theory in a reviewer's case)."""
    config = sys.modules["fastrace.config"]

    def no_compute(*args, **kwargs):
        raise AssertionError("the theory was computed before the output was checked")

    monkeypatch.setattr(config, "integrate_theory", no_compute)
    with pytest.raises(fr.StoreError, match="does not exist"):
        run_experiment(load_experiment(ALIGNED), tmp_path / "missing" / "out.h5", threads=1)


# ------------------------------------------------------------------ adding the theory run
def test_resuming_a_finished_file_with_its_theory_writes_nothing(tmp_path, monkeypatch):
    """A finished file holding its theory is only read by --resume: no lock, nothing removed
    beside it (a read-only directory, or another user's file, failed: the theory's addition
    took the output's writer lock before it looked whether the theory was there)."""
    path = tmp_path / "exp.toml"
    path.write_text(_with_train("lr = 0.05\nsteps = 40\nrecord_every = 10", theory=True))
    out = tmp_path / "out.h5"
    assert cli.main(["run", str(path), "-o", str(out), "--threads", "1"]) == 0
    assert "theory" in fr.store.list_runs(out)

    def read_only(path):
        raise fr.StoreError(f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(store, "_WriterLock", read_only)
    before = sorted(os.listdir(tmp_path))
    assert cli.main(["run", str(path), "-o", str(out), "--resume"]) == 0
    assert sorted(os.listdir(tmp_path)) == before


def _child(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python (its exit code tells a kill or a crash at exit)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def aligned_whole(tmp_path_factory):
    """ALIGNED run once, uninterrupted: the rows every other run of it must give."""
    out = tmp_path_factory.mktemp("whole") / "whole.h5"
    run_experiment(load_experiment(ALIGNED), out, threads=1)
    return out


def _assert_runs_equal(path, whole, runs):
    for run in runs:
        a, b = store.read_run(path, run), store.read_run(whole, run)
        assert a.status == b.status == "complete"
        assert set(a.series) == set(b.series)
        for name in a.series:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{run}/{name}")


KILLED_WHILE_ADDING_THEORY = """
import os, signal, sys
import h5py
from fastrace import cli, config
from fastrace.reduce import ReducedSolution

out, moment = os.path.abspath(sys.argv[2]), sys.argv[3]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if moment == "theory written":
    to_hdf5 = ReducedSolution.to_hdf5
    def hooked(self, *args, **kwargs):
        to_hdf5(self, *args, **kwargs)
        die()
    ReducedSolution.to_hdf5 = hooked
elif moment == "theory copied":
    copy = h5py.Group.copy
    def hooked(self, *args, **kwargs):
        copy(self, *args, **kwargs)
        die()
    h5py.Group.copy = hooked
else:  # just before or after the file with the theory takes the output's place
    adding, add_theory, replace = [], config._add_theory, os.replace
    def add(*args, **kwargs):
        adding.append(True)
        return add_theory(*args, **kwargs)
    def hooked(src, dst, *args, **kwargs):
        last = bool(adding) and os.fspath(dst) == out
        if last and moment == "before rename":
            die()
        replace(src, dst, *args, **kwargs)
        if last:
            die()
    config._add_theory, os.replace = add, hooked
sys.exit(cli.main(["run", sys.argv[1], "-o", out, "--threads", "1"]))
"""


@pytest.mark.parametrize("moment", ["theory written", "theory copied", "before rename",
                                    "after rename"])
def test_a_kill_while_the_theory_is_added_leaves_a_readable_file(tmp_path, aligned_whole,
                                                                  moment):
    """SIGKILL at any moment of adding the theory leaves the simulation's file as it was (its
    runs intact; --resume adds the theory) or the complete file with the theory, never a file
    that does not open (the theory was copied into the output in place: a kill then left
    HDF5's "open for writing" flag set on it)."""
    path = tmp_path / "exp.toml"
    path.write_text(ALIGNED)
    out = tmp_path / "out.h5"
    done = _child(KILLED_WHILE_ADDING_THEORY, str(path), str(out), moment)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    runs = ["seed_03", "seed_04"] + ["theory"] * (moment == "after rename")
    info = store.run_info(out)
    assert list(info["runs"]) == runs and info["config"] == ALIGNED
    _assert_runs_equal(out, aligned_whole, runs)
    summary = run_experiment(load_experiment(path), out, threads=1, resume=True)
    assert summary["resumed"] and summary["theory"]["status"] == "complete"
    assert store.list_runs(out) == ["seed_03", "seed_04", "theory"]
    _assert_runs_equal(out, aligned_whole, ["seed_03", "seed_04", "theory"])
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]


THEORY_ON_A_FULL_DISK = """
import os, resource, signal, sys
from fastrace import cli, config

out, how = os.path.abspath(sys.argv[2]), sys.argv[3]
if how == "unchecked":  # HDF5 itself runs out of room while it copies the theory
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (a write past the limit fails: EFBIG)
    config._check_room_for_copy = lambda *args: None
add_theory = config._add_theory


def add(out, solution):  # the simulation fits; the file with its theory does not
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(out) + (64 << 10), hard))
    return add_theory(out, solution)


config._add_theory = add
print("exit code", cli.main(["run", sys.argv[1], "-o", out, "--threads", "1"]))
"""


@pytest.mark.parametrize("how", ["checked", "unchecked"])
def test_a_full_disk_while_the_theory_is_added_is_a_store_error(tmp_path, how):
    """Under a file size limit (RLIMIT_FSIZE: a full disk without privileges) the file with
    the theory does not fit: StoreError naming the output, which stays the simulation's
    readable file, and no temporary file left. "checked": the room is checked before the copy;
    "unchecked": HDF5's copy fails (EFBIG) and the process still ends normally. (The theory
    was copied into the output in place: a bare RuntimeError traceback.)"""
    text = ALIGNED.replace("steps = 40", "steps = 600").replace(
        "record_every = 2", "record_every = 1\nsvals = false\nsave_weights = true")
    path = tmp_path / "exp.toml"
    path.write_text(text)
    out = tmp_path / "out.h5"
    done = _child(THEORY_ON_A_FULL_DISK, str(path), str(out), how)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exit code 2" in done.stdout, done.stderr[-3000:]
    assert done.stderr.startswith(f"fastrace: error: cannot add the theory run to {out}: ")
    assert "Traceback" not in done.stderr
    info = store.run_info(out)
    assert list(info["runs"]) == ["seed_03", "seed_04"]
    for run in ("seed_03", "seed_04"):
        data = store.read_run(out, run)
        assert data.status == "complete" and data["t"].size == 601
        assert data["weights/h1->h2"].shape == (601, 6, 6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []


def test_the_theory_run_goes_to_a_symlinks_target(tmp_path):
    target = tmp_path / "target.h5"
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    run_experiment(load_experiment(ALIGNED), link, threads=1)
    assert link.is_symlink() and store.list_runs(target) == ["seed_03", "seed_04", "theory"]


# ------------------------------------------------------------------ settings, in the file's words
def _with_train(train: str, theory: bool = False) -> str:
    """ORTHOGONAL with the [train] table ``train`` (and a [theory] table)."""
    head = ORTHOGONAL[:ORTHOGONAL.index("[train]")]
    return head + "[train]\n" + train + "\n" + ("\n[theory]\nb0 = 0.1\n" if theory else "")


@pytest.mark.parametrize("train, message", [
    # steps past 2**53 (the theory's gd map ran for hours first)
    ("lr = 1e-20\nsteps = 9007199254740993\nrecord_every = 9007199254740993",
     "train.steps must be at most 2**53"),
    # 2e9 save points (the theory's schedule alone took 15 GB first)
    ("lr = 1e-9\nsteps = 2000000000",
     "train.steps = 2000000000 with train.record_every = 1 makes more than 1000000000 save "
     "points; set a larger train.record_every"),
    ('method = "flow"\nt_end = 1.0\nn_records = 2000000000', "train.n_records must be at"),
    ("lr = 1e300\nsteps = 9007199254740992", "train.lr * train.steps overflows"),
], ids=["steps", "save_points", "n_records", "overflow"])
def test_settings_simulate_refuses_are_refused_before_the_theory(tmp_path, monkeypatch, train,
                                                                   message):
    """With a [theory] table the theory is computed before simulate checks its settings: the
    file is checked as simulate would, when it is loaded."""
    config = sys.modules["fastrace.config"]

    def no_compute(*args, **kwargs):
        raise AssertionError("the theory was computed before the settings were checked")

    monkeypatch.setattr(config, "integrate_theory", no_compute)
    path = tmp_path / "exp.toml"
    path.write_text(_with_train(train, theory=True))
    with pytest.raises(fr.ConfigError) as exc:
        run_experiment(load_experiment(path), tmp_path / "out.h5")
    assert message in str(exc.value)
    assert not (tmp_path / "out.h5").exists()


def test_a_theory_too_big_for_memory_is_refused_before_it_is_computed(tmp_path, monkeypatch):
    """The theory's rows are held in memory (the runs' rows are not): 5 million save points
    need ~3 GB here; with 100 MB available that is a ConfigError before any compute."""
    config = sys.modules["fastrace.config"]

    def no_compute(*args, **kwargs):
        raise AssertionError("the theory was computed before its memory was checked")

    monkeypatch.setattr(config, "integrate_theory", no_compute)
    monkeypatch.setattr(_memory, "available_memory", lambda: 100 << 20)
    exp = load_experiment(ALIGNED.replace("steps = 40", "steps = 10000000"))
    with pytest.raises(fr.ConfigError, match=r"the theory's rows .* save fewer points \(a "
                                             r"larger train.record_every\)"):
        run_experiment(exp, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("train, message", [
    ('method = "gd"\nlr = 0.05\nsteps = 40\nn_records = 5',
     "train.n_records is for method 'flow' given by t_end; with lr and steps the save points "
     "are every train.record_every steps"),
    ('method = "flow"\nlr = 0.05\nsteps = 40\nn_records = 5', "train.n_records is for method"),
    ('method = "flow"\nt_end = 1.0\nn_records = 1', "train.n_records must be at least 2"),
    ('method = "flow"\nt_end = 1.0\nrtol = 1e-20',
     "train.rtol = 1e-20 is below what float64 can deliver"),
    ('method = "flow"\nt_end = 1.0\nrtol = 2.0', "train.rtol = 2 lets each step's error"),
    ('lr = 0.05\nsteps = 40\nsave_weights = true\nweights_dtype = "float32"\n'
     "divergence_threshold = 1e39", "set train.divergence_threshold at most that"),
], ids=["gd_n_records", "flow_steps_n_records", "one_record", "rtol", "rtol_above_1",
        "float32_threshold"])
def test_cli_errors_name_the_keys_of_the_file(tmp_path, capsys, train, message):
    """simulate's messages name its keywords (record=, record='log', weights_dtype='float32'),
    which a file cannot hold: the file's settings are refused in its own words."""
    path = tmp_path / "exp.toml"
    path.write_text(_with_train(train))
    assert cli.main(["run", str(path), "-o", str(tmp_path / "out.h5")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "record=" not in err and "record='log'" not in err and "='" not in err


def test_resuming_a_diverged_run_names_no_python_keyword(tmp_path, capsys):
    path = tmp_path / "exp.toml"
    path.write_text(ORTHOGONAL.replace("lr = 0.05", "lr = 50.0"))
    out = tmp_path / "out.h5"
    assert cli.main(["run", str(path), "-o", str(out), "--threads", "1"]) == 2
    assert "diverged" in capsys.readouterr().err
    assert cli.main(["run", str(path), "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "it cannot be resumed: run the experiment again, without --resume, with other " \
           "[train] settings" in err
    assert "run=" not in err


@pytest.mark.parametrize("train, key", [
    ("rtol = 1e-3", "train.rtol"),
    ("atol = 1e-3", "train.atol"),
    ("max_steps = 1", "train.max_steps"),
    ('weights_dtype = "float32"', "train.weights_dtype"),
    ('weights_dtype = "float32"\nsave_weights = false', "train.weights_dtype"),
], ids=["rtol", "atol", "max_steps", "float32", "float32_no_weights"])
def test_settings_that_would_be_ignored_are_named_in_a_warning(train, key):
    """Method 'gd' has no integrator (rtol, atol, max_steps), and a snapshot dtype without
    snapshots does nothing: simulate takes them and runs as without them. They are not refused:
    a sweep over train.method or train.save_weights has them at some points (TOML cannot drop a
    key at some points only), and files written before must still resume."""
    with pytest.warns(UserWarning, match=f"{key}.*ignored"):
        load_experiment(_with_train("method = \"gd\"\nlr = 0.05\nsteps = 40\n" + train))
    # where they do something they are taken, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_experiment(_with_train('method = "flow"\nt_end = 1.0\nrtol = 1e-6\natol = 1e-8\n'
                                    "max_steps = 1000"))
        load_experiment(_with_train('lr = 0.05\nsteps = 40\nsave_weights = true\n'
                                    'weights_dtype = "float32"'))


def test_an_infinite_divergence_threshold_is_taken_as_simulate_takes_it(tmp_path):
    """simulate documents divergence_threshold = inf (only non-finite values count); a file
    may say it too (TOML has inf). Negative, zero and NaN stay refused."""
    exp = load_experiment(_with_train("lr = 0.05\nsteps = 20\ndivergence_threshold = inf"))
    assert exp.train["divergence_threshold"] == float("inf")
    summary = run_experiment(exp, tmp_path / "out.h5", threads=1)
    assert all(r["status"] == "complete" for r in summary["runs"].values())
    for bad in ("-inf", "nan", "0.0", "-1.0"):
        with pytest.raises(fr.ConfigError, match="train.divergence_threshold"):
            load_experiment(_with_train(f"lr = 0.05\nsteps = 20\ndivergence_threshold = {bad}"))
