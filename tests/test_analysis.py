"""Tests of fastrace.analysis against independent computations and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastrace as fr
from fastrace import analysis, exact
from fastrace.errors import ConfigError, DataError
from fastrace.reduce import reduce


@pytest.fixture(scope="module")
def small_task():
    return fr.tasks.routing(M=3, K=2, hidden=6)


def _random_orthonormal(rng, n, k):
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


# ----------------------------------------------------------------------------- edges
def test_singular_values_match_svd_with_leading_axes():
    rng = np.random.default_rng(0)
    W = {"a": rng.standard_normal((5, 3, 4)), "b": rng.standard_normal((2, 6))}
    sv = analysis.singular_values(W)
    assert sv["a"].shape == (5, 3)
    for k in range(5):
        # independent: square roots of the eigenvalues of W Wᵀ
        eig = np.sort(np.linalg.eigvalsh(W["a"][k] @ W["a"][k].T))[::-1]
        np.testing.assert_allclose(sv["a"][k], np.sqrt(eig), rtol=1e-12)
    np.testing.assert_allclose(np.sum(sv["b"] ** 2), np.sum(W["b"] ** 2), rtol=1e-12)
    with pytest.raises(DataError):
        analysis.singular_values({"c": np.ones(3)})


def test_singular_values_of_non_finite_matrices_are_nan():
    """A diverged trajectory: NaN for its non-finite matrices, as ``simulate`` records them,
    and the others unaffected (numpy's SVD would refuse the whole stack)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 5))
    w[1, 0, 2], w[3, 2, 2] = np.nan, np.inf
    sv = analysis.singular_values({"a": w})["a"]
    assert sv.shape == (4, 3) and np.all(np.isnan(sv[[1, 3]]))
    np.testing.assert_array_equal(sv[[0, 2]], analysis.singular_values({"a": w[[0, 2]]})["a"])
    assert np.all(np.isnan(analysis.singular_values({"b": np.full((2, 2), np.nan)})["b"]))


def test_project_on_bases_recovers_mode_strengths():
    rng = np.random.default_rng(1)
    L, R = _random_orthonormal(rng, 7, 7), _random_orthonormal(rng, 5, 5)
    b = rng.standard_normal((4, 3))  # 4 time points, 3 modes
    off = np.zeros((4, 7, 5))
    off[:, 5, 4] = 1.0  # an entry outside the modes: must not leak into b
    W = np.einsum("ik,tk,jk->tij", L[:, :3], b, R[:, :3]) + np.einsum(
        "ia,tab,jb->tij", L, off, R)
    got = analysis.project_on_bases(W, L[:, :3], R[:, :3])
    np.testing.assert_allclose(got, b, atol=1e-13)
    loop = np.array([[L[:, k] @ W[t] @ R[:, k] for k in range(3)] for t in range(4)])
    np.testing.assert_allclose(got, loop, atol=1e-13)
    with pytest.raises(DataError):
        analysis.project_on_bases(W, L[:, :3], R[:, :2])


# ----------------------------------------------------------------------------- routing
def test_pathway_map_and_errors_match_explicit_loops(small_task):
    task = small_task
    W = fr.init.orthogonal(task.network, gain=0.7, seed=3)
    Y = task.targets
    errs = analysis.generalisation_errors(task, W)
    per_pair = np.zeros((task.M, task.M))
    for i in range(task.M):
        for j in range(task.M):
            out = W[f"h2->out_{j}"] @ W["h1->h2"] @ W[f"in_{i}->h1"] @ task.items
            per_pair[i, j] = 0.5 * np.sum((Y - out) ** 2)
            np.testing.assert_allclose(analysis.pathway_map(task, W, i, j) @ task.items, out,
                                       rtol=1e-12)
    np.testing.assert_allclose(errs["trained"], per_pair[task.trained].mean(), rtol=1e-12)
    np.testing.assert_allclose(errs["untrained"], per_pair[~task.trained].mean(), rtol=1e-12)
    assert errs["baseline"] == pytest.approx(0.5 * np.sum(Y ** 2))
    full = fr.tasks.routing(M=3, K=3, hidden=6)
    assert np.isnan(analysis.generalisation_errors(
        full, fr.init.orthogonal(full.network, 0.5, seed=0))["untrained"])
    with pytest.raises(ConfigError):
        analysis.pathway_map(task, W, 0, 3)
    np.testing.assert_array_equal(analysis.pathway_map(task, W, np.int64(1), 2),
                                  analysis.pathway_map(task, W, 1, 2))
    for i, j in [(1.0, 0), (0, True), ("1", 0)]:
        with pytest.raises(ConfigError, match="pair"):
            analysis.pathway_map(task, W, i, j)


def test_routing_bases_are_the_svd_of_the_targets():
    task = fr.tasks.routing(M=2, K=1, hidden=8)
    U, s, V = analysis.routing_bases(task)
    # the reference targets: Yᵀ Y = 36·11ᵀ + 16 (block ones) + 9 I, eigenvalues 185, 41, 9, 9
    np.testing.assert_allclose(s, np.sqrt([185.0, 41.0, 9.0, 9.0]), rtol=1e-12)
    np.testing.assert_allclose(U @ np.diag(s) @ V.T, task.targets @ task.items.T, atol=1e-12)


def test_pathway_modes_of_aligned_weights_are_path_strengths(small_task):
    task = small_task
    red = reduce(task.network, task.data)
    rng = np.random.default_rng(4)
    b = red.expand_b(rng.uniform(0.1, 1.0, (red.n_modes, red.system.n_edges)))
    W = red.reconstruct(b)
    edges = list(task.network.edges)
    r = red.n_modes
    for i, j in [(0, 0), (1, 2), (2, 0)]:
        U, V = red.bases[f"out_{j}"][:, :r], red.bases[f"in_{i}"][:, :r]
        expected = (b[:, edges.index(f"in_{i}->h1")] * b[:, edges.index("h1->h2")]
                    * b[:, edges.index(f"h2->out_{j}")])
        np.testing.assert_allclose(analysis.pathway_modes(task, W, i, j, U, V), expected,
                                   rtol=1e-12)


def test_hidden_representations_and_similarity(small_task):
    task = small_task
    W = fr.init.orthogonal(task.network, gain=0.3, seed=5)
    reps = analysis.hidden_representations(task, W)
    assert reps.shape == (task.M, task.n_items, task.hidden)
    np.testing.assert_allclose(reps[1, 2], W["in_1->h1"] @ task.items[:, 2], rtol=1e-12)
    reps2 = analysis.hidden_representations(task, W, layer="h2")
    np.testing.assert_allclose(reps2[2, 0], W["h1->h2"] @ W["in_2->h1"] @ task.items[:, 0],
                               rtol=1e-12)
    sim = analysis.similarity_matrix(reps)
    n = task.M * task.n_items
    assert sim.shape == (n, n)
    flat = reps.reshape(n, -1)
    for a in range(0, n, 3):
        for c in range(0, n, 2):
            cos = flat[a] @ flat[c] / (np.linalg.norm(flat[a]) * np.linalg.norm(flat[c]))
            assert sim[a, c] == pytest.approx(cos, abs=1e-12)
    zero = np.zeros((2, 2, 3))
    zero[0, 0] = [1.0, 0.0, 0.0]
    z = analysis.similarity_matrix(zero)
    assert z[0, 0] == 1.0 and np.all(z[1:, 1:] == 0.0)
    with pytest.raises(ConfigError):
        analysis.hidden_representations(task, W, layer="h3")


def test_domain_alignment_extremes():
    rng = np.random.default_rng(6)
    base = rng.standard_normal((4, 10))
    same = np.broadcast_to(base, (5, 4, 10))
    assert analysis.domain_alignment(same) == pytest.approx(1.0, abs=1e-12)
    # domain d maps item k to e_{4d + k}: orthogonal across domains, alignment exactly 0
    disjoint = np.zeros((3, 4, 12))
    for d in range(3):
        for k in range(4):
            disjoint[d, k, 4 * d + k] = 2.0
    assert analysis.domain_alignment(disjoint) == pytest.approx(0.0, abs=1e-15)
    # independent loop over domain pairs and items
    reps = rng.standard_normal((3, 2, 5))
    vals = [reps[i, k] @ reps[j, k] / (np.linalg.norm(reps[i, k]) * np.linalg.norm(reps[j, k]))
            for i in range(3) for j in range(3) if i != j for k in range(2)]
    assert analysis.domain_alignment(reps) == pytest.approx(np.mean(vals), rel=1e-12)
    with pytest.raises(DataError):
        analysis.domain_alignment(reps[:1])


# ----------------------------------------------------------------------------- times
def test_crossing_times_interpolate_linearly():
    t = np.linspace(0.0, 10.0, 11)
    x = np.stack([t, 2 * t, 10 - t], axis=1)
    up = analysis.crossing_times(x[:, :2], 5.5, t)
    np.testing.assert_allclose(up, [5.5, 2.75], rtol=1e-12)
    down = analysis.crossing_times(x[:, 2], 2.5, t, direction="down")
    assert down == pytest.approx(7.5)
    assert np.isnan(analysis.crossing_times(x[:, 0], 11.0, t))
    assert analysis.crossing_times(x[:, 0], -1.0, t) == 0.0
    np.testing.assert_allclose(analysis.crossing_times(x[:, :2], [1.0, 1.0]), [1.0, 0.5])
    with pytest.raises(ConfigError):
        analysis.crossing_times(x, 1.0, direction="sideways")


def test_loss_drop_times_find_sigmoid_centres():
    t = np.arange(0, 400, dtype=float)
    centres, heights = [60.0, 150.0, 300.0], [100.0, 30.0, 5.0]
    loss = 1e-3 + sum(h / (1 + np.exp((t - c) / 3.0)) for c, h in zip(centres, heights))
    plateaus = np.array([135.0, 35.0, 5.0, 0.0]) + 1e-3
    levels = 0.5 * (plateaus[:-1] + plateaus[1:])
    drops = analysis.loss_drop_times(loss, levels, t)
    np.testing.assert_allclose(drops, centres, atol=0.05)
    two = analysis.loss_drop_times(np.stack([loss, loss], axis=1), levels, t)
    assert two.shape == (3, 2)
    np.testing.assert_allclose(two[:, 1], drops)


def test_routing_plateaus_of_the_reference_data():
    task = fr.tasks.routing()
    _, s, _ = analysis.routing_bases(task)
    plateaus, levels = analysis.routing_plateaus(s, 7, 4, 4, 7)
    # M K / (n_items n_out) = 1 here: plateaus are |Y|² minus the learnt s² (s = 3 twice)
    np.testing.assert_allclose(plateaus, [244.0, 59.0, 18.0, 0.0], atol=1e-10)
    np.testing.assert_allclose(levels, [151.5, 38.5, 9.0], atol=1e-10)
    # a zero singular value is no mode (routing_bases drops it): no extra plateau or drop
    with_zero = analysis.routing_plateaus(np.append(s, 0.0), 7, 4, 4, 7)
    np.testing.assert_array_equal(with_zero[0], plateaus)
    np.testing.assert_array_equal(with_zero[1], levels)
    # no mode at all: one plateau, the constant, and no drop
    none, no_levels = analysis.routing_plateaus([], 7, 4, 4, 7, constant=2.5)
    np.testing.assert_array_equal(none, [2.5])
    assert no_levels.shape == (0,)
    for bad in ([3.0, -1.0], [3.0, np.nan], np.ones((2, 2))):
        with pytest.raises(DataError, match="routing_plateaus: s"):
            analysis.routing_plateaus(bad, 7, 4, 4, 7)


def _euler_crossing(s, M, K, b0, h, fraction):
    """Steps of the Euler map of the full three-variable routing mode (a1, a2, a3) until a2
    reaches ``fraction`` of its fixed point, linearly interpolated (an independent check)."""
    a1 = a2 = a3 = b0
    target = fraction * float(exact.routing_fixed_point(s, M, b0))
    n = 0
    while a2 < target:
        prev = a2
        err = s - a1 * a2 * a3
        a1, a2, a3 = (a1 + h * K / M**2 * a2 * a3 * err, a2 + h * K / M * a1 * a3 * err,
                      a3 + h * K / M**2 * a1 * a2 * err)
        n += 1
    return n - 1 + (target - prev) / (a2 - prev)


@pytest.mark.parametrize("lr", [0.02, 0.005])
def test_routing_drop_epochs_predict_gradient_descent(lr):
    s = np.array([13.6, 6.4, 3.0])
    M, K, b0 = 7, 4, 0.08
    h = float(exact.routing_time_per_step(lr, M, 4, 7))
    flow = analysis.routing_drop_epochs(s, M, K, b0, lr, 4, 7, discrete=False)
    np.testing.assert_allclose(flow, np.asarray(exact.routing_drop_time(s, M, K, b0)) / h,
                               rtol=1e-12)
    pred = analysis.routing_drop_epochs(s, M, K, b0, lr, 4, 7)
    euler = np.array([_euler_crossing(v, M, K, b0, h, 0.5) for v in s])
    # gradient descent lags the flow by ~ln(a/b0) steps whatever the step size; the correction
    # brings the prediction to a fraction of an epoch
    assert np.all(np.abs(euler - flow) > 1.5)
    assert np.all(np.abs(euler - pred) < 0.35)


def test_relative_discrepancy():
    ref = np.array([1.0, 1e-14, -2.0])
    assert analysis.relative_discrepancy(ref, ref) == 0.0
    other = ref + np.array([1e-10, 1e-13, 0.0])
    assert analysis.relative_discrepancy(other, ref) == pytest.approx(10.0)
    assert analysis.relative_discrepancy(other, ref, floor=1e-3) == pytest.approx(1e-10)
    assert analysis.relative_discrepancy(np.array([1.0]), np.array([0.0])) == math.inf
    with pytest.raises(DataError):
        analysis.relative_discrepancy(ref, ref[:2])


def test_bad_series_and_reps_raise_data_errors():
    with pytest.raises(DataError, match="reps"):
        analysis.domain_alignment(np.ones((3, 4)))
    with pytest.raises(DataError, match="x"):
        analysis.crossing_times(np.zeros((0, 3)), 0.5)
    with pytest.raises(DataError, match="x"):
        analysis.crossing_times(np.array(1.0), 0.5)
    with pytest.raises(DataError, match="t"):
        analysis.crossing_times(np.array([0.0, 1.0, 2.0]), 1.5, t=np.array([0.0, np.nan, 2.0]))
    for t in ([2.0, 1.0, 0.0], [0.0, 1.0, 1.0]):
        with pytest.raises(DataError, match="t must be strictly increasing"):
            analysis.crossing_times(np.array([0.0, 1.0, 2.0]), 1.5, t=np.array(t))
    with pytest.raises(DataError, match="t must be strictly increasing"):
        analysis.loss_drop_times(np.array([2.0, 1.0, 0.0]), [0.5], t=[0.0, 2.0, 1.0])
