"""The compiled moments plan: equal to the reference gradient, batched, thread-independent."""

import numba
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrace as fr
from conftest import random_dag, random_data
from fastrace.engine import GradientEngine


def case(seed, gates="binary", patterns=None):
    rng = np.random.default_rng(seed)
    net = random_dag(rng, n_inputs=int(rng.integers(1, 4)), n_hidden=int(rng.integers(1, 5)),
                     extra_edges=int(rng.integers(0, 5)))
    data = random_data(rng, net, n_samples=int(rng.integers(3, 40)), gates=gates,
                       n_patterns=patterns or int(rng.integers(1, 8)))
    return net, data, fr.init.gaussian(net, 0.6, seed=rng)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), gates=st.sampled_from(["binary", "real", "none"]))
def test_plan_gradient_equals_reference(seed, gates):
    net, data, W = case(seed, gates)
    L, G = fr.loss_and_gradient(net, data, W, engine="samples")
    eng = GradientEngine(net, data, "moments")
    loss, grad = eng.loss_and_gradient(eng.pack(W))
    ref = eng.pack(G)
    assert abs(loss[0] - L) <= 1e-11 * max(1.0, abs(L))
    assert np.abs(grad[0] - ref).max() <= 1e-11 * max(np.abs(ref).max(), 1e-300)


def test_gated_off_blocks_cost_nothing():
    # routing network: the shared edge is propagated once per input domain (7 groups), not once
    # per trained pair (28 contexts), and outputs only see the pairs they are trained with
    task = fr.tasks.routing()
    plan = GradientEngine(task.network, task.data, "moments").plan
    assert plan.n_groups["h1"] == 7 and plan.n_groups["h2"] == 7
    assert all(plan.n_groups[f"out_{j}"] == 4 for j in range(7))
    gemm = plan.ops_i[:, 0] <= 2
    flops = 2 * np.sum(plan.ops_i[gemm, 1] * plan.ops_i[gemm, 2] * plan.ops_i[gemm, 3])
    # per pair without sharing: W_h alone costs 3 products of 64x64x4 per trained pair
    assert flops < 28 * 3 * 2 * 64 * 64 * 4 / 2


def reference_descent(net, data, W, lr, steps, momentum=0.0, weight_decay=0.0):
    W = {e: w.copy() for e, w in W.items()}
    v = {e: np.zeros_like(w) for e, w in W.items()}
    losses = []
    for _ in range(steps):
        L, G = fr.loss_and_gradient(net, data, W, engine="samples")
        losses.append(L)
        for e in W:
            g = G[e] + weight_decay * W[e]
            v[e] = momentum * v[e] + g
            W[e] = W[e] - lr * v[e]
    return W, np.array(losses)


def test_descent_matches_reference_with_momentum_and_decay():
    net, data, W = case(3, "binary", patterns=4)
    eng = GradientEngine(net, data, "moments")
    for momentum, decay in [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-2)]:
        w = eng.pack(W)[None].copy()
        losses = eng.descend(w, np.zeros_like(w), np.array([0.05]), 60, momentum, decay)
        W_ref, L_ref = reference_descent(net, data, W, 0.05, 60, momentum, decay)
        ref = eng.pack(W_ref)
        assert np.abs(w[0] - ref).max() <= 1e-10 * np.abs(ref).max()
        np.testing.assert_allclose(losses[0], L_ref, rtol=1e-10)


def test_batch_equals_separate_runs_and_threads_do_not_matter():
    task = fr.tasks.routing()
    eng = GradientEngine(task.network, task.data, "moments")
    starts = np.stack([eng.pack(fr.init.orthogonal(task.network, g, seed=i))
                       for i, g in enumerate([0.1, 0.2, 0.3, 0.5])])
    lr = np.array([0.02, 0.01, 0.02, 0.005])
    results = []
    for threads in (1, 2):
        previous = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            w = starts.copy()
            losses = eng.descend(w, np.zeros_like(w), lr, 40)
        finally:
            numba.set_num_threads(previous)
        results.append((w, losses))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])
    for r in range(4):
        w = starts[r:r + 1].copy()
        losses = eng.descend(w, np.zeros_like(w), lr[r:r + 1], 40)
        assert np.array_equal(w[0], results[0][0][r])
        assert np.array_equal(losses[0], results[0][1][r])


def test_divergence_is_reported_per_run():
    task = fr.tasks.routing()
    eng = GradientEngine(task.network, task.data, "moments")
    w = np.stack([eng.pack(fr.init.orthogonal(task.network, 0.2, seed=0))] * 2)
    losses = eng.descend(w, np.zeros_like(w), np.array([0.02, 50.0]), 200, max_abs=1e6)
    assert eng.last_status[0] == -1 and eng.last_status[1] >= 0
    assert np.all(np.isfinite(losses[0]))
    assert np.isnan(losses[1, -1])
