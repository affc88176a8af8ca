"""The ``fastrace`` command line end to end: reproduce (quick), info, plot, warmup, errors."""

from __future__ import annotations

import json
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


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "fastrace.cli", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    for command in ("reproduce", "info", "plot", "warmup", "demo"):
        assert command in done.stdout
