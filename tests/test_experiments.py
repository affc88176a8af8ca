"""The paper's routing experiments (issue 5): theory against simulation, and the qualitative
results, as assertions with margins. Each recipe runs once per module in its quick form."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fastrace import analysis, exact, experiments, store
from fastrace.errors import ConfigError


@pytest.fixture(scope="module")
def routing():
    return experiments.compute("routing", quick=True)


@pytest.fixture(scope="module")
def init_scale():
    return experiments.compute("init-scale", quick=True)


@pytest.fixture(scope="module")
def fraction():
    return experiments.compute("fraction-trained", quick=True)


@pytest.fixture(scope="module")
def shared():
    return experiments.compute("shared-vs-separate", quick=True)


# ----------------------------------------------------------------------------- routing
def test_routing_uses_the_papers_setup(routing):
    st = routing.summary["settings"]
    assert (st["M"], st["K"], st["lr"], st["epochs"], st["b0"], st["gain"]) == \
        (7, 4, 0.02, 500, 0.08, 0.2)
    red = routing.data["reduction"]
    task = routing.data["task"]
    s = np.asarray(routing.summary["s"])
    # the reduced system's s are the data's singular values times the pair weight 2/(P N_out)
    p = next(k for k, path in enumerate(task.network.paths())
             if path.edges[0] == "in_0->h1" and path.edges[-1] == "h2->out_0")
    np.testing.assert_allclose(red.system.s[:, p], s * 2 / (4 * 7), rtol=1e-12)
    assert red.residual < 1e-10


def test_theory_equals_aligned_simulation_every_epoch(routing):
    al = routing.data["trajectories"][-1]
    th = routing.data["theory"]
    assert al.run == "aligned" and al.loss.shape == th.loss.shape == (501,)
    L0 = th.loss[0]
    # relative per epoch; the floor is where the loss (a constant minus correlation terms)
    # reaches its round-off, ~1e-13 L(0)
    assert analysis.relative_discrepancy(th.loss, al.loss, floor=1e-5 * L0) <= 1e-9
    sh = list(routing.data["task"].network.edges).index("h1->h2")
    assert analysis.relative_discrepancy(th.b[:, :, sh], al.quantities["shared_svals"]) <= 1e-9
    run = routing.runs["theory"].series
    assert analysis.relative_discrepancy(run["modes/trained_pair"],
                                         al.quantities["modes_trained"]) <= 1e-9
    assert analysis.relative_discrepancy(run["modes/untrained_pair"],
                                         al.quantities["modes_untrained"]) <= 1e-9


def test_learning_time_integral_predicts_each_drop_within_an_epoch(routing):
    d = routing.summary["drop_epochs"]
    measured = np.asarray(d["aligned_simulation"])
    assert np.all(np.isfinite(measured)) and np.all(np.diff(measured) >= 0)
    assert np.max(np.abs(np.asarray(d["integral_gd"]) - measured)) < 1.0
    # one drop per distinct singular value of the data (13.6, 6.4, 3 twice): three loss drops,
    # at the same epochs in the theory and the aligned run
    np.testing.assert_allclose(d["loss_aligned"], d["loss_theory"], atol=1e-6)
    assert len(d["loss_theory"]) == 3


def test_fixed_points_equal_final_singular_values(routing):
    fp = routing.summary["fixed_points"]
    s = np.asarray(routing.summary["s"])
    final = np.asarray(fp["a2_final_aligned"])
    # with the conserved quantity measured at the end: the fixed point to round-off
    np.testing.assert_allclose(final, fp["a2_star_from_final_c0"], rtol=1e-9)
    # with the initial one: gradient descent lets it drift by O(lr²) per step
    np.testing.assert_allclose(final, fp["a2_star"], rtol=1e-3)
    np.testing.assert_allclose(fp["pi_final_aligned"], s, rtol=1e-8)
    # random initialisations end at the same singular values of the shared edge, closely
    np.testing.assert_allclose(fp["a2_final_seeds_mean"], fp["a2_star"], rtol=0.01)


def test_random_initialisations_scatter_around_the_theory(routing):
    d = routing.summary["drop_epochs"]
    theory = np.asarray(d["loss_theory"])
    for drops in d["loss_seeds"].values():
        drops = np.asarray(drops)
        assert np.all(np.abs(drops - theory) < np.array([15.0, 25.0, 60.0]))


def test_routing_generalises_and_shares_its_representation(routing):
    summary = routing.summary
    base = summary["errors"]["baseline"]
    assert base == pytest.approx(122.0)
    for name in ("seed_00", "seed_01"):
        assert summary["errors"]["trained"][name] < 1e-5 * base
        assert summary["errors"]["untrained"][name] < 1e-4 * base
        assert summary["domain_alignment"]["initial"][name] < 0.1
        assert summary["domain_alignment"]["final"][name] > 0.9
    assert summary["domain_alignment"]["final"]["aligned"] == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------- sweeps
def test_large_initialisation_loses_generalisation(init_scale):
    per = init_scale.summary["per_scale"]
    base = init_scale.summary["baseline_error"]
    small, large = per["0.2"], per["2.5"]
    # training error stays small at both scales
    assert np.max(small["trained_error"]["values"]) < 0.05 * base
    assert np.max(large["trained_error"]["values"]) < 1e-3 * base
    # untrained pairs: solved from small weights, near the zero network's error from large ones
    assert np.max(small["untrained_error"]["values"]) < 0.05 * base
    assert np.min(large["untrained_error"]["values"]) > 0.5 * base
    # representations align across input domains at small σ0, not at large σ0
    assert np.min(small["domain_alignment"]["values"]) > 0.8
    assert np.max(large["domain_alignment"]["values"]) < 0.3
    assert large["lr"] == pytest.approx(0.006 / 2.5 ** (1 / 3))


def test_untrained_error_falls_as_more_pairs_are_trained(fraction):
    per = fraction.summary["per_K"]
    base = fraction.summary["baseline_error"]
    assert sorted(per, key=int) == ["1", "3", "6", "10"]
    un = {K: np.mean(per[K]["untrained_error"]["values"]) for K in ("1", "3", "6")}
    assert un["1"] > 0.5 * base
    assert un["3"] < 0.5 * un["1"]
    assert un["6"] < 1e-3 * base
    assert per["10"]["untrained_error"]["mean"] is None or \
        np.isnan(per["10"]["untrained_error"]["mean"])
    for K in per:
        assert np.max(per[K]["trained_error"]["values"]) < 0.01 * base
        assert per[K]["lr"] == pytest.approx(0.08 / int(K))


def test_shared_pathways_learn_faster_than_a_single_one(shared):
    d = shared.summary["drop_epochs"]
    s = np.asarray(shared.summary["s"])
    first_shared = d["shared"]["aligned_simulation"][0]
    first_single = d["single"]["aligned_simulation"][0]
    assert first_shared < first_single / 5
    # the measured advantage is the exact prediction (learning-time integrals, same b0)
    sa = shared.summary["speed_advantage"]
    assert sa["measured_aligned"][0] == pytest.approx(sa["predicted_gd"][0], rel=0.01)
    assert sa["predicted_flow"][0] == pytest.approx(
        float(exact.routing_speed_advantage(7, 4, s[0], 0.08)), rel=1e-12)
    # random initialisations of equal gain: the shared network also drops first
    for seed_shared, seed_single in zip(d["shared"]["seeds"].values(),
                                        d["single"]["seeds"].values()):
        assert seed_shared[0] < seed_single[0] / 2


# ----------------------------------------------------------------------------- files
def test_reproduce_writes_every_run(tmp_path):
    rep = experiments.reproduce("shared-vs-separate", tmp_path, quick=True, plots=False,
                                epochs_single=200, epochs_shared=100)
    assert rep.h5.exists() and rep.summary_path.exists() and rep.figures == []
    runs = store.list_runs(rep.h5)
    assert set(runs) == set(rep.outcome.runs)
    summary = json.loads(rep.summary_path.read_text())
    assert summary["experiment"] == "shared-vs-separate"
    assert summary["settings"]["epochs_single"] == 200
    data = store.read_run(rep.h5, "shared_aligned")
    assert data.status == "complete"
    np.testing.assert_array_equal(data["loss"], rep.outcome.runs["shared_aligned"].series["loss"])
    assert data["final_weights/h1->h2"].shape == (1, 64, 64)
    info = store.run_info(rep.h5)
    assert json.loads(info["config"])["experiment"] == "shared-vs-separate"


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown experiment"):
        experiments.compute("xor-maybe")
    with pytest.raises(ConfigError, match="unknown setting"):
        experiments.settings("routing", not_a_setting=3)
    with pytest.raises(ConfigError):
        experiments.compute("fraction-trained", quick=True, Ks=(0,))


@pytest.mark.parametrize("name, overrides, message", [
    ("routing", {"seeds": 0}, "seeds must be"),
    ("routing", {"seeds": -1}, "seeds must be"),
    ("routing", {"seeds": 1.5}, "seeds must be"),
    ("routing", {"seed": "x"}, "seed must be"),
    ("routing", {"seed": -1}, "seed must be"),
    ("routing", {"seed": True}, "seed must be"),
    ("routing", {"M": True}, "M must be"),
    ("routing", {"M": 1, "K": 1}, "M must be an integer >= 2"),
    ("routing", {"gain": 0.0}, "gain must be"),
    ("routing", {"lr": "0.02"}, "lr must be"),
    ("init-scale", {"seeds": 0}, "seeds must be"),
    ("init-scale", {"scales": 0.2}, "scales must be"),
    ("init-scale", {"scales": (0.2, 0.201)}, "scales must be distinct"),
    ("init-scale", {"M": 1, "K": 1}, "M must be an integer >= 2"),
    ("fraction-trained", {"Ks": 3}, "Ks must be"),
    ("fraction-trained", {"Ks": (1, 1)}, "Ks must be distinct"),
    ("fraction-trained", {"Ks": (1.5,)}, "Ks must be"),
    ("fraction-trained", {"Ks": (True,)}, "Ks must be"),
    ("fraction-trained", {"M": 1, "Ks": (1,)}, "M must be an integer >= 2"),
    ("shared-vs-separate", {"seeds": -1}, "seeds must be"),
])
def test_bad_setting_values_are_refused_before_running(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        experiments.settings(name, quick=True, **overrides)
    with pytest.raises(ConfigError, match=message):
        experiments.compute(name, quick=True, **overrides)


def test_loss_at_an_epoch_is_reported_only_where_it_was_saved():
    out = experiments.compute("shared-vs-separate", quick=True, epochs_shared=100,
                              epochs_single=105, record_every_single=7)
    at = out.summary["per_pathway_loss_at_epoch"]
    curves = out.data["curves"]
    assert at["100"]["single"] is None  # saved at 98 and 105, not at 100
    k = int(np.flatnonzero(curves["shared"]["epochs"] == 100)[0])
    assert at["100"]["shared"]["shared_aligned"] == curves["shared"]["per_pathway"][
        "shared_aligned"][k]


def test_a_run_too_short_for_every_drop_gives_nan_without_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = experiments.compute("routing", quick=True, epochs=50, hidden=8)
    dev = out.summary["drop_epochs"]["loss_seeds_minus_theory"]
    assert np.isnan(dev["mean"]).all() and np.isnan(dev["max_abs"]).all()


def test_a_failed_rerun_leaves_no_stale_summary_beside_the_new_file(tmp_path):
    experiments.reproduce("routing", tmp_path, quick=True, plots=False, epochs=3, hidden=8)
    (tmp_path / "routing_loss.png").mkdir()  # the rerun's first figure cannot be written
    with pytest.raises(ConfigError):
        experiments.reproduce("routing", tmp_path, quick=True, epochs=5, hidden=8)
    assert store.read_run(tmp_path / "routing.h5", "aligned")["epoch"][-1] == 5
    summary = tmp_path / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["settings"]["epochs"] == 5


def test_an_unwritable_output_directory_is_refused_before_computing(tmp_path, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking the output directory")

    monkeypatch.setattr(experiments, "compute", no_compute)
    monkeypatch.setattr(experiments.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="not writable"):
        experiments.reproduce("routing", tmp_path, quick=True)
