"""The ``fastrace`` command line end to end: reproduce (quick), info, plot, warmup, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastrace as fr
from fastrace import cli, store
from fastrace.simulate import simulate

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def routing_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing")
    assert cli.main(["reproduce", "routing", "--quick", "-o", str(out)]) == 0
    return out


def test_reproduce_routing_writes_file_summary_and_figures(routing_dir, capsys):
    names = {p.name for p in routing_dir.iterdir()}
    assert {"routing.h5", "summary.json", "routing_loss.png", "routing_modes.png",
            "routing_gates.png", "routing_similarity.png", "routing_outputs.png"} <= names
    for png in routing_dir.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG) and 2_000 < len(data) < 300_000
    summary = json.loads((routing_dir / "summary.json").read_text())
    assert summary["quick"] is True and summary["files"]["h5"] == "routing.h5"
    assert summary["discrepancy"]["drop_integral_gd_vs_aligned_epochs"] < 1.0
    # the outputs open: the theory run in the file equals the aligned run read back
    runs = store.list_runs(routing_dir / "routing.h5")
    assert runs == ["seed_00", "seed_01", "aligned", "theory"]
    theory = store.read_run(routing_dir / "routing.h5", "theory")
    aligned = store.read_run(routing_dir / "routing.h5", "aligned")
    assert theory.status == aligned.status == "complete"
    L0 = theory["loss"][0]
    diff = np.abs(theory["loss"] - aligned["loss"]) / np.maximum(np.abs(aligned["loss"]),
                                                                   1e-5 * L0)
    assert diff.max() <= 1e-9
    assert theory["modes/b"].shape == (501, 4, 15)


def test_info_lists_every_run(routing_dir, capsys):
    assert cli.main(["info", str(routing_dir / "routing.h5"), "-v"]) == 0
    out = capsys.readouterr().out
    assert "experiment: routing (quick)" in out
    for run in ("seed_00", "seed_01", "aligned", "theory"):
        assert run in out
    assert out.count("complete") == 4
    assert "svals/h1->h2: (501, 4) float64" in out


def test_plot_of_a_reproduction_file(routing_dir, tmp_path, capsys):
    fig = tmp_path / "fig.png"
    assert cli.main(["plot", str(routing_dir / "routing.h5"), "-o", str(fig)]) == 0
    assert fig.read_bytes().startswith(PNG)
    only = tmp_path / "one.png"
    assert cli.main(["plot", str(routing_dir / "routing.h5"), "-o", str(only),
                     "--run", "theory"]) == 0
    assert only.exists()


def test_info_and_plot_of_a_simulate_file(tmp_path, capsys):
    net = fr.Network.chain([3, 4, 2])
    rng = np.random.default_rng(0)
    data = fr.Dataset({net.inputs[0]: rng.standard_normal((8, 3))},
                      {net.outputs[0]: rng.standard_normal((8, 2))})
    W = [fr.init.orthogonal(net, 0.3, seed=k) for k in range(2)]
    path = tmp_path / "sim.h5"
    simulate(net, data, W, lr=0.05, steps=20, out=path, threads=1)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seed_00" in out and "seed_01" in out and "complete" in out
    fig = tmp_path / "sim.png"
    edge = net.edges[0]
    assert cli.main(["plot", str(path), "-o", str(fig), "--edge", edge]) == 0
    assert fig.read_bytes().startswith(PNG)
    assert cli.main(["plot", str(path), "-o", str(fig), "--edge", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_errors_are_reported_without_tracebacks(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastrace: error:") and "Traceback" not in err
    not_h5 = tmp_path / "text.h5"
    not_h5.write_text("hello")
    assert cli.main(["plot", str(not_h5), "-o", str(tmp_path / "x.png")]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "no-such-experiment"])
    assert exc.value.code == 2


def test_warmup_compiles_every_kernel(monkeypatch, capsys):
    times = cli.warmup()
    assert {"simulate, gradient descent (batch)", "integrate rosenbrock (numba)",
            "integrate gd map (numba)"} <= set(times)
    assert all(t >= 0 for t in times.values())
    # the samples engine's row kernels, for a gated input and for an ungated one (the data's
    # read-only array): checked in a fresh process, where nothing else compiled them first
    script = ("from fastrace import cli; cli.warmup()\n"
              "from fastrace._kernels.rows import add_rows, take_rows\n"
              "print(bool(add_rows.signatures), sorted({s[0].mutable for s in take_rows.signatures}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.split("\n")[-2] == "True [False, True]", done.stderr[-2000:]


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "fastrace.cli", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for command in ("reproduce", "info", "plot", "warmup", "demo"):
        assert command in done.stdout


# ----------------------------------------------------------------------------- plot, info: odd files
FULL = {"t": (), "step": ((), np.int64), "loss": (), "svals/x->h": (2,)}


def _rows(n: int, loss=None) -> dict[str, np.ndarray]:
    return {"t": np.arange(n, dtype=float), "step": np.arange(n),
            "loss": np.linspace(1.0, 0.1, n) if loss is None else np.asarray(loss, float),
            "svals/x->h": np.ones((n, 2))}


def _write(path, runs: dict, status: dict | None = None):
    """A fastrace file: ``runs`` maps a run name to (series spec, rows); rows {} is a run with
    no rows yet."""
    specs = {name: store.RunSpec(series=spec, attrs={"kind": "simulation"})
             for name, (spec, _) in runs.items()}
    with store.TrajectoryWriter(path, specs) as writer:
        for name, (_, rows) in runs.items():
            if rows:
                writer.append_blocks(name, rows)
        for name, value in (status or {}).items():
            writer.set_status(name, value)
    return path


def _killed_before_first_rows(path):
    """The file a run killed before its first rows were flushed leaves: status "running", 0 rows."""
    code = ("import os, sys; import numpy as np; from fastrace import store\n"
            "spec = store.RunSpec(series={'t': (), 'loss': (), 'svals/x->h': (2,)})\n"
            "w = store.TrajectoryWriter(sys.argv[1], {'seed_00': spec, 'seed_01': spec})\n"
            "w.flush(); os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    return path


def test_plot_of_a_file_without_rows_is_a_clear_error(tmp_path, capsys):
    path = _killed_before_first_rows(tmp_path / "killed.h5")
    assert cli.main(["info", str(path)]) == 0
    assert "seed_00  run         running         0 saved" in capsys.readouterr().out
    fig = tmp_path / "fig.png"
    assert cli.main(["plot", str(path), "-o", str(fig)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastrace: error:") and "nothing to plot" in err
    assert "run 'seed_00' has no rows yet (status running)" in err
    assert not fig.exists()


def test_plot_leaves_out_a_run_without_rows_and_says_so(tmp_path, capsys):
    path = _write(tmp_path / "half.h5", {"seed_00": (FULL, _rows(5)), "seed_01": (FULL, {})})
    fig = tmp_path / "fig.png"
    assert cli.main(["plot", str(path), "-o", str(fig)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {fig}" in out
    assert "note: run 'seed_01' has no rows yet (status complete): not plotted" in out
    assert fig.read_bytes().startswith(PNG)


@pytest.mark.parametrize("name, message", [
    ("out.xyz", "unknown format 'xyz'; supported formats: "),
    ("out.txt", "unknown format 'txt'; supported formats: "),
    ("out", "has no file extension to name its format; supported formats: "),
    (".png", "has no file extension"),
])
def test_plot_refuses_an_unknown_format_before_reading_the_file(tmp_path, capsys, name, message):
    out = tmp_path / name
    # the input does not exist: the format is checked first, before any work
    assert cli.main(["plot", str(tmp_path / "missing.h5"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastrace: error:") and message in err and "pdf, pgf, png" in err
    assert list(tmp_path.iterdir()) == []


def test_plot_refuses_an_output_that_is_not_a_figure_file(tmp_path, capsys):
    path = _write(tmp_path / "run.h5", {"seed_00": (FULL, _rows(5))})
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    for out, message in ((tmp_path / "dir", "is a directory; give a figure file name"),
                         (tmp_path / "missing" / "f.png", "directory " + str(tmp_path / "missing")
                          + " does not exist"),
                         (tmp_path / "run.h5" / "f.png", "is not a directory"),
                         (tmp_path / "fifo.png", "not a regular file")):
        assert cli.main(["plot", str(path), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastrace: error:") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo.png", "run.h5"]
    assert list((tmp_path / "dir").iterdir()) == []


@pytest.mark.skipif(shutil.which("xelatex") is not None, reason="pgf figures can be written here")
def test_plot_in_a_format_whose_writer_is_missing_leaves_no_file(tmp_path, capsys):
    path = _write(tmp_path / "run.h5", {"seed_00": (FULL, _rows(5))})
    assert cli.main(["plot", str(path), "-o", str(tmp_path / "fig.pgf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastrace: error: cannot write figure") and "as pgf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_plot_into_an_unwritable_place_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path / "run.h5", {"seed_00": (FULL, _rows(5))})
    assert cli.main(["plot", str(path), "-o", "/proc/self/fig.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastrace: error: cannot write figure /proc/self/fig.png: ")
    assert ".partial" not in err


def test_plot_of_runs_with_only_some_series(tmp_path, capsys):
    rows = _rows(5)
    path = _write(tmp_path / "some.h5", {
        "full": (FULL, rows),
        "no_svals": ({"t": (), "loss": ()}, {"t": rows["t"], "loss": rows["loss"]}),
        "no_loss": ({"t": (), "svals/x->h": (2,)}, {"t": rows["t"], "svals/x->h": rows["svals/x->h"]}),
        "t_only": ({"t": ()}, {"t": rows["t"]}),
        "no_time": ({"loss": ()}, {"loss": rows["loss"]}),
        # a run killed between the flushes of its series: loss has fewer rows than t
        "uneven": (FULL, dict(rows, loss=rows["loss"][:3])),
        "nan_inf": (FULL, _rows(5, loss=[1.0, np.nan, np.inf, -np.inf, 0.0])),
    })
    fig = tmp_path / "fig.png"
    assert cli.main(["plot", str(path), "-o", str(fig)]) == 0
    out = capsys.readouterr().out
    assert "note: run 't_only' has no loss or singular values: not plotted" in out
    assert "note: run 'no_time' has no 'epoch', 'step' or 't' series to plot against" in out
    assert out.count("note:") == 2
    assert fig.read_bytes().startswith(PNG)
    for run in ("t_only", "no_time"):
        assert cli.main(["plot", str(path), "-o", str(fig), "--run", run]) == 2
        assert "nothing to plot: run " + repr(run) in capsys.readouterr().err
    assert cli.main(["plot", str(path), "-o", str(fig), "--run", "uneven"]) == 0


def test_info_of_a_failed_run_and_of_a_loss_per_pathway(tmp_path, capsys):
    rows = _rows(5)
    reason = "diverged at step 2: loss = inf"
    path = _write(tmp_path / "odd.h5", {
        "ok": (FULL, rows),
        "bad": (FULL, {k: v[:2] for k, v in rows.items()}),
        "per_pathway": ({"t": (), "loss": (3,)}, {"t": rows["t"], "loss": np.ones((5, 3))}),
    }, status={"bad": f"failed: {reason}"})
    assert cli.main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  ok           simulation  complete        5 saved  t = 0 .. 4  loss 1 -> 0.1" in lines
    assert ("  bad          simulation  failed          2 saved  t = 0 .. 1  loss 1 -> 0.775  "
            f"({reason})") in lines
    assert "  per_pathway  simulation  complete        5 saved  t = 0 .. 4" in lines
    fig = tmp_path / "fig.png"
    assert cli.main(["plot", str(path), "-o", str(fig)]) == 0


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(monkeypatch, capsys):
    def interrupted(report=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "warmup", interrupted)
    assert cli.main(["warmup"]) == 130
    err = capsys.readouterr().err
    assert err == "fastrace: interrupted\n"
