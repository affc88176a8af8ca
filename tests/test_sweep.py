"""Sweeps: every point equals a direct run with its child seed, on a local process pool and on a
real Dask LocalCluster; the index links every point; a diverging point fails alone."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing

import h5py
import numpy as np
import pytest

import fastrace as fr
from fastrace import cli, store
from fastrace.config import load_experiment
from fastrace.sweep import grid_points, read_index, sweep

EXPERIMENT = """
[task]
name = "routing"
M = 3
K = 2
hidden = 6

[init]
kind = "orthogonal"
gain = 0.3
seeds = [0, 2]

[train]
lr = 0.05
steps = 30
record_every = 3
"""
GRID = {"init.gain": [0.2, 0.5], "train.lr": [0.05, 40.0]}  # lr = 40 diverges
SEED = 11


def _direct(values: dict, child: np.random.SeedSequence):
    """The run of one point, built here from the documented seeding rule."""
    task = fr.tasks.routing(M=3, K=2, hidden=6)
    weights = [fr.init.orthogonal(task.network, values["init.gain"],
                                  seed=np.random.default_rng(np.random.SeedSequence(
                                      child.entropy, spawn_key=(*child.spawn_key, s))))
               for s in (0, 2)]
    return fr.simulate(task.network, task.data, weights, lr=values["train.lr"], steps=30,
                       record_every=3, run_names=["seed_00", "seed_02"], threads=1)


def _check_sweep(result, out_dir, monkeypatch):
    combos = [(0.2, 0.05), (0.2, 40.0), (0.5, 0.05), (0.5, 40.0)]
    assert [(p.values["init.gain"], p.values["train.lr"]) for p in result] == combos
    children = np.random.SeedSequence(SEED).spawn(4)
    for point, child in zip(result, children):
        if point.values["train.lr"] == 40.0:
            assert point.status.startswith("failed: DivergenceError"), point.status
            continue
        assert point.status == "complete", point.status
        for tr in _direct(point.values, child):
            data = store.read_run(point.path, tr.run)
            np.testing.assert_array_equal(data["loss"], tr.loss)
            np.testing.assert_array_equal(data["svals/h1->h2"], tr.svals["h1->h2"])
    # the index, read from another directory: relative external links still resolve
    elsewhere = out_dir.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    monkeypatch.chdir(elsewhere)
    with h5py.File(out_dir / "index.h5", "r") as f:
        assert list(f["points"]) == ["p000", "p001", "p002", "p003"]
        for name in f["points"]:
            assert f["points"][name].attrs["format"] == "fastrace"
            assert {"seed_00", "seed_02"} <= set(f["points"][name])
        statuses = [s.decode() for s in f["table/status"][()]]
        assert statuses == [p.status for p in result]
        np.testing.assert_array_equal(f["table/values/init.gain"][()], [0.2, 0.2, 0.5, 0.5])
        np.testing.assert_array_equal(f["table/values/train.lr"][()], [0.05, 40.0, 0.05, 40.0])
    again = read_index(out_dir)
    assert [(p.name, p.values, p.status) for p in again] == \
        [(p.name, p.values, p.status) for p in result]
    # each point file holds the TOML that reruns it, with its child seed sequence
    cfg = load_experiment(store.run_info(result.points[2].path)["config"])
    assert cfg.init["seed_sequence"] == {"entropy": SEED, "spawn_key": [2]}
    assert cfg.init["gain"] == 0.5 and cfg.train["lr"] == 0.05


def test_grid_points_is_the_cartesian_product():
    points = grid_points({"a.x": [1, 2, 3], "b.y": ["u", "v"]})
    assert points == [{"a.x": a, "b.y": b} for a in (1, 2, 3) for b in ("u", "v")]
    with pytest.raises(fr.ConfigError):
        grid_points({"a.x": []})


def test_sweep_on_a_process_pool(tmp_path, monkeypatch):
    out = tmp_path / "pool"
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = sweep(EXPERIMENT, GRID, out, executor=pool, seed=SEED)
    assert len(result.completed) == 2 and len(result.failed) == 2
    _check_sweep(result, out, monkeypatch)


def test_sweep_on_a_dask_local_cluster(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "dask"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        result = sweep(EXPERIMENT, GRID, out, executor=client.get_executor(), seed=SEED)
    _check_sweep(result, out, monkeypatch)


def test_cli_sweep_and_bad_grid(tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text(EXPERIMENT + '\n[sweep]\nseed = 11\n"train.lr" = [0.05, 40.0]\n')
    out = tmp_path / "cli"
    assert cli.main(["sweep", str(path), "-o", str(out), "--workers", "1"]) == 1  # one failed
    text = capsys.readouterr().out
    assert "2 points, 1 complete, 1 failed" in text
    assert [p.status.split(":")[0] for p in read_index(out / "index.h5")] == ["complete", "failed"]
    # a grid value the schema refuses stops the sweep before it starts
    with pytest.raises(fr.ConfigError, match="train.steps"):
        sweep(EXPERIMENT, {"train.steps": [10, -1]}, tmp_path / "bad", warm=False)
    path.write_text(EXPERIMENT)
    assert cli.main(["sweep", str(path), "-o", str(out)]) == 2
    assert "no [sweep]" in capsys.readouterr().err
