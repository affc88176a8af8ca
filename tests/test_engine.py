"""The compiled moments plan: equal to the reference gradient, batched, thread-independent."""

import contextlib
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
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
    flops = 2 * np.prod(plan.products(fused=False)[:, :3], axis=1).sum()
    assert flops == plan.flops
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
    # an odd number of runs, one of which diverges: the threads take the runs in turn
    starts = np.stack([eng.pack(fr.init.orthogonal(task.network, g, seed=i))
                       for i, g in enumerate([0.1, 0.2, 0.3, 0.5, 0.2])])
    lr = np.array([0.02, 0.01, 0.02, 0.005, 60.0])
    results = []
    for threads in (1, 2):
        previous = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            w = starts.copy()
            with np.errstate(all="ignore"):
                losses = eng.descend(w, np.zeros_like(w), lr, 40, max_abs=1e6, parallel=True)
        finally:
            numba.set_num_threads(previous)
        results.append((w, losses))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1], equal_nan=True)
    assert eng.last_status[4] >= 0 and np.all(eng.last_status[:4] == -1)
    for r in range(5):
        w = starts[r:r + 1].copy()
        with np.errstate(all="ignore"):
            losses = eng.descend(w, np.zeros_like(w), lr[r:r + 1], 40, max_abs=1e6)
        assert np.array_equal(w[0], results[0][0][r])
        assert np.array_equal(losses[0], results[0][1][r], equal_nan=True)


def test_divergence_is_reported_per_run():
    task = fr.tasks.routing()
    eng = GradientEngine(task.network, task.data, "moments")
    w = np.stack([eng.pack(fr.init.orthogonal(task.network, 0.2, seed=0))] * 2)
    losses = eng.descend(w, np.zeros_like(w), np.array([0.02, 50.0]), 200, max_abs=1e6)
    assert eng.last_status[0] == -1 and eng.last_status[1] >= 0
    assert np.all(np.isfinite(losses[0]))
    assert np.isnan(losses[1, -1])


def test_a_stopped_run_is_left_where_it_went_bad():
    # status k: the loss of the weights after k steps is not finite (w and the velocity are
    # left at those), or the weights after k steps are bad (w holds them); either way w is
    # what k steps from the start give, in both engines and every update rule (the fused plan
    # knows the loss before it updates anything)
    net, data, W = case(4, "binary", patterns=4)
    stops = {}
    for engine in ("moments", "samples"):
        eng = GradientEngine(net, data, engine)
        for momentum, max_abs in [(0.0, np.inf), (0.5, np.inf), (0.0, 1e4), (0.5, 1e4)]:
            w, v = eng.pack(W)[None].copy(), np.zeros((1, eng.n_params))
            with np.errstate(all="ignore"):
                losses = eng.descend(w, v, np.array([5.0]), 50, momentum, max_abs=max_abs)
            k = int(eng.last_status[0])
            assert k > 0
            if max_abs == np.inf:
                assert not np.isfinite(losses[0, k]) and np.isfinite(w).all()
            else:
                assert np.abs(w).max() > max_abs and np.isfinite(losses[0, :k]).all()
            w_k, v_k = eng.pack(W)[None].copy(), np.zeros((1, eng.n_params))
            with np.errstate(all="ignore"):
                eng.descend(w_k, v_k, np.array([5.0]), k, momentum)
            np.testing.assert_array_equal(w, w_k)
            np.testing.assert_array_equal(v, v_k)
            stops[engine, momentum, max_abs] = k
    assert all(stops["moments", m, a] == stops["samples", m, a] for _, m, a in stops)
    # a weight that overflows to inf is bad weights at once, not a bad loss one step later
    net = fr.Network()
    net.add_node("x", 1).add_node("y", 1).add_edge("x", "y")
    data = fr.Dataset({"x": np.ones((1, 1))}, {"y": np.ones((1, 1))})
    for engine in ("moments", "samples"):
        eng = GradientEngine(net, data, engine)
        w = np.full((1, 1), 10.0)
        with np.errstate(all="ignore"):
            losses = eng.descend(w, np.zeros_like(w), np.array([1e308]), 5)
        assert eng.last_status[0] == 1 and w[0, 0] == -np.inf
        assert np.isfinite(losses[0, 0]) and np.isnan(losses[0, 1:]).all()


def test_loss_rows_come_first():
    # the kernels run a plan's first layout[3] rows, check the loss, then the rest: those rows
    # must be the loss plan itself in every table, and no later row may add to the loss
    from fastrace.engine import _DOT, _OUTPUT, _WEIGHTS

    for net, data in [case(s)[:2] for s in (1, 2, 4)] + [(lambda t: (t.network, t.data))(
            fr.tasks.routing())]:
        plan = GradientEngine(net, data, "moments").plan
        n = int(plan.layout[3])
        assert n == len(plan.loss_i) > 0
        assert not np.any(plan.loss_i[:, 10] == _WEIGHTS)
        for ops_i, ops_f in ((plan.ops_i, plan.ops_f), (plan.step_i, plan.step_f)):
            np.testing.assert_array_equal(ops_i[:n], plan.loss_i)
            np.testing.assert_array_equal(ops_f[:n], plan.loss_f)
            assert not np.isin(ops_i[n:, 0], [_DOT, _OUTPUT]).any()


def test_loss_alone_equals_loss_with_gradient():
    net, data, W = case(11, "real", patterns=5)
    eng = GradientEngine(net, data, "moments")
    w = np.stack([eng.pack(W), 0.5 * eng.pack(W)])
    np.testing.assert_array_equal(eng.loss(w), eng.loss_and_gradient(w)[0])


def test_wide_output_blocks_equal_reference():
    # output blocks of more than a few input columns take BLAS products, fewer the fused loop:
    # both against the sample-by-sample reference
    for dim in (2, 6):
        net = fr.Network()
        net.add_node("a", dim, role="input").add_node("b", dim, role="input")
        net.add_node("h", 5).add_node("y", 3, role="output")
        net.add_edge("a", "h").add_edge("b", "h").add_edge("h", "y").add_edge("a", "y")
        rng = np.random.default_rng(dim)
        data = random_data(rng, net, n_samples=30, gates="binary", n_patterns=3)
        W = fr.init.gaussian(net, 0.5, seed=rng)
        L, G = fr.loss_and_gradient(net, data, W, engine="samples")
        eng = GradientEngine(net, data, "moments")
        loss, grad = eng.loss_and_gradient(eng.pack(W))
        assert abs(loss[0] - L) <= 1e-11 * max(1.0, abs(L))
        ref = eng.pack(G)
        assert np.abs(grad[0] - ref).max() <= 1e-11 * np.abs(ref).max()


def run_ops(ops, state, weights, const, lr=1.0):
    """Run an _Ops table with the numba executor; returns the loss terms and the bound on the
    change of any weight entry."""
    from fastrace._kernels import plan as kernels

    ints, flts = ops.arrays()
    scratch = kernels._scratch()
    return kernels.execute(kernels.dgemm_pointer(), ints, flts, const, state, weights, lr,
                           True, *scratch)


def test_operations_for_every_storage_orientation():
    """Products, copies and merged or batched operations against numpy, with operands and
    results stored as themselves or transposed."""
    from fastrace.engine import _CONST, _STATE, _WEIGHTS, _Mat, _Ops

    rng = np.random.default_rng(0)
    m, n, k = 5, 3, 4
    A, B = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    for ta in (False, True):
        for tb in (False, True):
            for tc in (False, True):
                const = np.concatenate([(A.T if ta else A).ravel(), (B.T if tb else B).ravel()])
                state = rng.standard_normal(m * n)
                C0 = state.reshape((n, m) if tc else (m, n)).copy()
                ops = _Ops()
                ops.gemm(m, n, k, _Mat(_CONST, 0, m if ta else k, ta),
                         _Mat(_CONST, m * k, k if tb else n, tb),
                         _Mat(_STATE, 0, m if tc else n, tc), 2.0, 0.5)
                run_ops(ops, state, np.zeros(1), const)
                want = 0.5 * (C0.T if tc else C0) + 2.0 * A @ B
                got = state.reshape((n, m)).T if tc else state.reshape((m, n))
                np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    # two products filling neighbouring columns of one C become one; overlapping ones do not
    ops = _Ops()
    const = np.concatenate([A.ravel(), B.ravel()])
    ops.gemm(m, 2, k, _Mat(_CONST, 0, k), _Mat(_CONST, m * k, n), _Mat(_STATE, 0, n), 1.0, 0.0)
    ops.gemm(m, 1, k, _Mat(_CONST, 0, k), _Mat(_CONST, m * k + 2, n), _Mat(_STATE, 2, n), 1.0,
             0.0)
    assert len(ops.rows) == 1
    state = np.zeros(m * n + m * n)
    run_ops(ops, state, np.zeros(1), const)
    np.testing.assert_allclose(state[:m * n].reshape(m, n), A @ B, rtol=1e-13)
    ops.gemm(m, n, n, _Mat(_STATE, 0, n), _Mat(_CONST, 0, n), _Mat(_STATE, m * n, n), 1.0, 0.0)
    ops.gemm(m, n, n, _Mat(_STATE, m * n, n), _Mat(_CONST, 0, n), _Mat(_STATE, 0, n), 1.0, 1.0)
    assert len(ops.rows) == 3  # the last reads what the one before writes
    # copies of equally spaced blocks into neighbouring columns, A read transposed, batch up
    W = rng.standard_normal((4, m, 2))  # four (m, 2) blocks stored one after the other
    ops = _Ops()
    for b in range(4):
        ops.axpby(2, m, _Mat(_WEIGHTS, b * 2 * m, 2, True), _Mat(_STATE, 2 * (3 - b), 8, True),
                  -1.5, 0.0)
    assert len(ops.rows) == 1
    state = np.zeros(m * 8)
    run_ops(ops, state, W.ravel(), np.zeros(1))
    want = np.concatenate([-1.5 * W[b] for b in range(3, -1, -1)], axis=1)  # (m, 8)
    np.testing.assert_array_equal(state.reshape(m, 8), want)


def test_update_growth_bound():
    """Operations flagged as updates report sum |alpha lr| ‖A‖ ‖B‖ over them, which bounds the
    change of every entry they write; the loss terms are untouched."""
    from fastrace.engine import _CONST, _STATE, _WEIGHTS, _Mat, _Ops

    rng = np.random.default_rng(1)
    A, B, G = rng.standard_normal((6, 3)), rng.standard_normal((3, 4)), rng.standard_normal(
        (2, 4, 6))
    const = np.concatenate([A.T.ravel(), B.ravel()])
    state = G.ravel().copy()
    w = rng.standard_normal(6 * 4 + 2 * 6 * 4)
    w0 = w.copy()
    ops = _Ops()
    ops.gemm(6, 4, 3, _Mat(_CONST, 0, 6, True), _Mat(_CONST, 18, 4), _Mat(_WEIGHTS, 0, 4), -2.0,
             1.0, 1)
    for b in range(2):  # two (6, 4) updates from G[b] stored transposed
        ops.axpby(6, 4, _Mat(_STATE, 24 * b, 6, True), _Mat(_WEIGHTS, 24 + 24 * b, 4), 3.0, 1.0,
                  1)
    assert len(ops.rows) == 2
    acc, growth = run_ops(ops, state, w, const, lr=0.1)
    norm = np.linalg.norm
    want = 0.2 * norm(A) * norm(B) + 0.3 * (norm(G[0]) + norm(G[1]))
    assert acc == 0.0 and abs(growth - want) <= 1e-12 * want
    np.testing.assert_allclose(w[:24].reshape(6, 4), w0[:24].reshape(6, 4) - 0.2 * A @ B,
                               rtol=1e-13, atol=1e-14)
    assert np.abs(w - w0).max() <= growth


def test_weight_bound_gives_the_exact_divergence_verdict():
    # wide plans bound the weights by norms instead of scanning them every step: forced on
    # (the routing plan is too small to choose it), every run must stop at the same step with
    # the same weights as when every step scans
    task = fr.tasks.routing()
    eng = GradientEngine(task.network, task.data, "moments")
    w0 = np.stack([eng.pack(fr.init.orthogonal(task.network, 0.3, seed=i)) for i in range(6)])
    lr = np.array([0.02, 0.5, 2.0, 5.0, 20.0, 80.0])
    for max_abs in (1.0, 30.0, 1e6, np.inf):
        results = []
        for bound in (0, 1):
            eng.plan.layout[2] = bound
            w = w0.copy()
            with np.errstate(all="ignore"):
                losses = eng.descend(w, np.zeros_like(w), lr, 120, max_abs=max_abs)
            results.append((w, losses, eng.last_status.copy()))
        eng.plan.layout[2] = 0
        np.testing.assert_array_equal(results[0][2], results[1][2])
        np.testing.assert_array_equal(results[0][0], results[1][0])
        np.testing.assert_array_equal(results[0][1], results[1][1])
        assert np.all(results[0][2][:1] == -1)  # the slow run survives every threshold
        assert np.any(results[0][2] >= 0)


def test_descend_works_on_any_array_in_place():
    task = fr.tasks.routing(M=3, K=2, hidden=8)
    eng = GradientEngine(task.network, task.data, "moments")
    w0 = np.stack([eng.pack(fr.init.orthogonal(task.network, 0.3, seed=i)) for i in range(3)])
    lr = np.array([0.05, 0.02, 0.01])
    w_ref, v_ref = w0.copy(), np.zeros_like(w0)
    ref = eng.descend(w_ref, v_ref, lr, 30, momentum=0.8)
    wide = np.zeros((3, 2 * eng.n_params))
    w, v = wide[:, ::2], np.asfortranarray(np.zeros_like(w0))  # strided and column-major
    w[...] = w0
    losses = eng.descend(w, v, lr, 30, momentum=0.8)
    np.testing.assert_array_equal(losses, ref)
    np.testing.assert_array_equal(w, w_ref)
    np.testing.assert_array_equal(v, v_ref)
    assert not wide[:, 1::2].any()
    frozen = w0.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(eng.loss(frozen), eng.loss(w0))
    np.testing.assert_array_equal(eng.loss_and_gradient(frozen[:, ::-1][:, ::-1])[1],
                                  eng.loss_and_gradient(w0)[1])


def test_parallel_runs_restore_the_blas_threads():
    from threadpoolctl import threadpool_info

    task = fr.tasks.routing()
    eng = GradientEngine(task.network, task.data, "moments")
    w = np.stack([eng.pack(fr.init.orthogonal(task.network, 0.2, seed=i)) for i in range(2)])
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    eng.descend(w, np.zeros_like(w), np.full(2, 0.02), 3, parallel=True)
    after = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert before == after


def test_gradient_of_a_non_finite_loss_is_not_stale():
    """An evaluation whose loss overflows still computes its gradient (the plan stops before
    the gradient rows only when it descends): not the previous evaluation's, and the same as
    the samples engine's (here finite: weights scaled by 1e55 overflow the loss only)."""
    task = fr.tasks.routing()
    moments = GradientEngine(task.network, task.data, "moments")
    samples = GradientEngine(task.network, task.data, "samples")
    w = moments.pack(fr.init.orthogonal(task.network, 0.2, seed=0))[None]
    before = moments.loss_and_gradient(w)[1]
    assert np.isfinite(before).all()
    big = np.stack([w[0] * 1e55, w[0]])
    with np.errstate(all="ignore"):
        loss_m, grad_m = moments.loss_and_gradient(big)
        loss_s, grad_s = samples.loss_and_gradient(big)
    assert not np.isfinite(loss_m[0]) and not np.isfinite(loss_s[0])
    assert np.isfinite(grad_s[0]).all() and np.isfinite(grad_m[0]).all()
    scale = np.abs(grad_s[0]).max()
    assert np.abs(grad_m[0] - grad_s[0]).max() <= 1e-10 * scale
    assert not np.allclose(grad_m[0], before[0])
    ref_loss, ref_grad = moments.loss_and_gradient(w)
    assert loss_m[1] == ref_loss[0] and np.array_equal(grad_m[1], ref_grad[0])


def test_last_status_is_per_thread():
    """The engine of a data set is shared by every simulation of it: a thread reads the status
    of its own last descend, whatever other threads ran in between."""
    import threading

    task = fr.tasks.routing()
    eng = GradientEngine(task.network, task.data, "moments")
    w0 = eng.pack(fr.init.orthogonal(task.network, 0.2, seed=0))[None]
    eng.descend(w0.copy(), np.zeros_like(w0), np.array([50.0]), 50, max_abs=1e6)
    assert eng.last_status[0] >= 0  # this thread: diverged
    seen = []

    def other():
        eng.descend(w0.copy(), np.zeros_like(w0), np.array([0.02]), 5, max_abs=1e6)
        seen.append(eng.last_status.copy())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[0][0] == -1  # the other thread: its own, healthy run
    assert eng.last_status[0] >= 0  # this thread's status is untouched


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), code=st.integers(0, 3), m=st.integers(1, 40),
       n=st.integers(1, 40), k=st.integers(1, 12), n_blk=st.integers(2, 7),
       beta=st.sampled_from([0.0, 1.0, -0.5]))
def test_products_in_blocks_equal_numpy(seed, code, m, n, k, n_blk, beta):
    """Every block of a product (rows of C when m >= n, else columns), for each storage
    orientation and leading dimensions wider than the matrices, at offsets into flat vectors:
    together they are C = beta C + alpha op(A) op(B), and nothing outside C is written."""
    from fastrace._kernels import plan as kernels

    rng = np.random.default_rng(seed)
    ta, tb = code >> 1, code & 1
    a_shape, b_shape = ((k, m) if ta else (m, k)), ((n, k) if tb else (k, n))
    a_ld, b_ld, c_ld = a_shape[1] + 3, b_shape[1] + 1, n + 2
    a_off, b_off, c_off = 5, 2, 7

    def flat(shape, ld, off):
        buf = rng.standard_normal(off + shape[0] * ld + 4)
        return buf, buf[off:off + shape[0] * ld].reshape(shape[0], ld)[:, :shape[1]]

    a, A = flat(a_shape, a_ld, a_off)
    b, B = flat(b_shape, b_ld, b_off)
    c, C = flat((m, n), c_ld, c_off)
    expected_c = c.copy()
    expected_c[c_off:c_off + m * c_ld].reshape(m, c_ld)[:, :n] = \
        beta * C + 0.7 * (A.T if ta else A) @ (B.T if tb else B)
    fn, (ints, flts, chars) = kernels.dgemm_pointer(), kernels._scratch()
    for blk in range(n_blk):
        kernels._gemm_block(fn, code, m, n, k, 0.7, a, a_off, a_ld, b, b_off, b_ld, beta, c, c_off,
                            c_ld, blk, n_blk, ints, flts, chars)
    np.testing.assert_allclose(c, expected_c, rtol=1e-13, atol=1e-13)


def test_a_big_run_gives_the_same_bits_with_any_thread_count_and_in_a_batch():
    """A run's big products go in blocks shared by the threads; the blocks, and so the numbers,
    do not depend on the thread count, nor on the run being part of a batch. (OpenBLAS's own
    threads changed the last bits of products such as 64 x 64 x 3000, and so the trajectory.)"""
    from fastrace._kernels import plan as kernels

    task = fr.tasks.routing(M=16, K=4, hidden=512)
    eng = GradientEngine(task.network, task.data, "moments")
    products = eng.plan.step_i[eng.plan.step_i[:, 0] <= 3]
    assert products[:, 14].max() > 1
    assert all(row[14] == kernels.n_blocks(*row[1:4]) for row in products)
    starts = np.stack([eng.pack(fr.init.orthogonal(task.network, 0.3, seed=i)) for i in range(2)])
    results = {}
    for threads in (1, 2):
        previous = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            w = starts[:1].copy()
            results[threads] = w, eng.descend(w, np.zeros_like(w), np.array([0.02]), 5)
            batch = starts.copy()
            results[threads, "batch"] = batch, eng.descend(batch, np.zeros_like(batch),
                                                           np.full(2, 0.02), 5, parallel=True)
        finally:
            numba.set_num_threads(previous)
    for key in (2, (1, "batch"), (2, "batch")):
        assert np.array_equal(results[key][0][0], results[1][0][0])
        assert np.array_equal(results[key][1][0], results[1][1][0])
    # and the blocks compute the product: the gradient equals the samples engine's
    W = fr.init.orthogonal(task.network, 0.3, seed=0)
    L, G = fr.loss_and_gradient(task.network, task.data, W, engine="samples")
    loss, grad = eng.loss_and_gradient(eng.pack(W))
    ref = eng.pack(G)
    assert abs(loss[0] - L) <= 1e-12 * L
    assert np.abs(grad[0] - ref).max() <= 1e-12 * np.abs(ref).max()


def _random_sample_gates_case(P=3000):
    """x(100) -> h1(64) -> h2(64) -> y(8), P samples, h1 gated by one of 30 values: the gradient
    of h1 -> h2 is a 64 x 64 x P product, whose last bits OpenBLAS's threads used to change."""
    rng = np.random.default_rng(0)
    net = fr.Network.chain([100, 64, 64, 8], ["x", "h1", "h2", "y"])
    data = fr.Dataset({"x": rng.standard_normal((P, 100))}, {"y": rng.standard_normal((P, 8))},
                      node_gates={"h1": rng.integers(1, 31, P) / 30.0})
    return net, data, [fr.init.gaussian(net, 0.1, seed=s) for s in range(2)]


def test_runs_give_the_same_bits_with_any_thread_count_for_both_engines():
    net, data, inits = _random_sample_gates_case(P=10000)  # (in blocks)
    for engine in ("moments", "samples"):
        runs = {threads: fr.simulate(net, data, inits[0], lr=0.01, steps=4, engine=engine,
                                     svals=False, threads=threads, progress=False)
                for threads in (1, 2)}
        runs["batch"] = fr.simulate(net, data, inits, lr=0.01, steps=4, engine=engine,
                                    svals=False, threads=2, progress=False)[0]
        for key in (2, "batch"):
            assert np.array_equal(runs[key].loss, runs[1].loss), (engine, key)
            for e in net.edges:
                assert np.array_equal(runs[key].final_weights[e], runs[1].final_weights[e])


def test_concurrent_calls_restore_the_blas_threads():
    """Calls on several threads (a sweep on a thread pool) each pin BLAS to one thread; the
    limits found before the first are back after the last, whatever their order."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info, threadpool_limits

    net, data, inits = _random_sample_gates_case(P=400)

    def blas():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    with threadpool_limits(2, user_api="blas"):
        before = blas()
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda i: fr.simulate(net, data, inits[i % 2], lr=0.01, steps=30,
                                                svals=False, progress=False), range(6)))
        assert blas() == before


def test_a_child_forked_after_a_threaded_run_computes_the_same():
    """GNU OpenMP kills a forked child that starts a parallel region after its parent used one
    (a single big run's products in blocks, a batch): the child runs serially, the same blocks,
    the same numbers; the locks and counts of the forking thread are not inherited."""
    script = """
import os, sys, numpy as np, fastrace as fr
task = fr.tasks.routing(M=16, K=4, hidden=512)
W = fr.init.orthogonal(task.network, 0.3, seed=0)
def final():
    run = fr.simulate(task.network, task.data, W, lr=0.02, steps=3, svals=False, threads=2,
                      progress=False)
    return np.concatenate([w.ravel() for w in run.final_weights.values()])
parent = final()
pid = os.fork()
if pid == 0:
    os._exit(0 if np.array_equal(final(), parent) else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, NUMBA_NUM_THREADS="2"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0"], done.stderr[-2000:]


def test_the_public_gradient_gives_the_same_bits_with_any_blas_thread_count():
    from threadpoolctl import threadpool_limits

    net, data, inits = _random_sample_gates_case()
    for engine in ("samples", "moments"):
        grads = []
        for n in (1, 2):
            with threadpool_limits(n, user_api="blas"):
                grads.append(fr.loss_and_gradient(net, data, inits[0], engine=engine))
        assert grads[0][0] == grads[1][0]
        assert all(np.array_equal(grads[0][1][e], grads[1][1][e]) for e in net.edges)


def test_concurrent_calls_give_the_numbers_of_one_call():
    """Calls on two threads at once give the bits of a call alone: the BLAS pin holds for both
    whichever thread set it (threadpoolctl silently ignores a thread that did not set the
    limits first; the restores of one thread left the other computing on 2 BLAS threads)."""
    import threading

    net, data, inits = _random_sample_gates_case()
    alone = fr.gradient(net, data, inits[0], engine="samples")
    stop = threading.Event()

    def other():
        while not stop.is_set():
            fr.gradient(net, data, inits[1], engine="samples")

    thread = threading.Thread(target=other)
    thread.start()
    try:
        for _ in range(20):
            during = fr.gradient(net, data, inits[0], engine="samples")
            assert all(np.array_equal(during[e], alone[e]) for e in net.edges)
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------ samples engine in blocks
@contextlib.contextmanager
def numba_threads(n):
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


@given(n_samples=st.integers(1, 10**6), n_params=st.integers(1, 10**7))
def test_sample_blocks_cut_every_sample_once(n_samples, n_params):
    from fastrace import engine as eng_mod

    blocks = eng_mod._sample_blocks(n_samples, n_params)
    assert 1 <= len(blocks) <= eng_mod.SAMPLES_MAX_BLOCKS and len(blocks) & (len(blocks) - 1) == 0
    assert blocks[0].start == 0 and blocks[-1].stop == n_samples
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    sizes = [b.stop - b.start for b in blocks]
    assert max(sizes) - min(sizes) <= 1
    if len(blocks) > 1:  # only problems with enough work per block are cut
        assert min(sizes) >= eng_mod.SAMPLES_BLOCK_MIN_ROWS
        assert min(sizes) * n_params >= eng_mod.SAMPLES_BLOCK_MIN_WORK * (1 - 1e-9) - n_params


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), gates=st.sampled_from(["binary", "real", "none"]),
       max_blocks=st.integers(2, 16))
def test_samples_engine_in_blocks_equals_the_whole_sum(seed, gates, max_blocks):
    """Cut into as many blocks as there may be (the limits lowered so that small random cases
    are cut), the samples engine's loss and gradient equal the sum over all samples at once;
    threads, a batch and the loss alone give the same bits."""
    from fastrace import engine as eng_mod

    rng = np.random.default_rng(seed)
    net = random_dag(rng, n_inputs=int(rng.integers(1, 4)), n_hidden=int(rng.integers(1, 5)),
                     extra_edges=int(rng.integers(0, 5)))
    data = random_data(rng, net, n_samples=int(rng.integers(1, 60)), gates=gates)
    inits = [fr.init.gaussian(net, 0.6, seed=rng) for _ in range(3)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eng_mod, "SAMPLES_MAX_BLOCKS", max_blocks)
        mp.setattr(eng_mod, "SAMPLES_BLOCK_MIN_ROWS", 1)
        mp.setattr(eng_mod, "SAMPLES_BLOCK_MIN_WORK", 1)
        mp.setattr(eng_mod, "SAMPLES_THREADS_MIN_WORK", 0)
        eng = GradientEngine(net, data, "samples")
        assert len(eng._blocks) == 1 << (min(max_blocks, data.n_samples).bit_length() - 1)
        w = eng.pack_many(inits)
        results = {}
        for threads in (1, 2):
            with numba_threads(threads):
                results[threads] = eng.loss_and_gradient(w)
        alone = [eng.loss_and_gradient(w[i]) for i in range(len(inits))]
        loss_only = eng.loss(w)
    loss, grad = results[1]
    assert np.array_equal(results[2][0], loss) and np.array_equal(results[2][1], grad)
    assert np.array_equal(loss_only, loss)
    for i, init in enumerate(inits):
        assert alone[i][0][0] == loss[i] and np.array_equal(alone[i][1][0], grad[i])
        L, G = fr.loss_and_gradient(net, data, init, engine="samples")  # all samples at once
        ref = eng.pack(G)
        assert abs(loss[i] - L) <= 1e-12 * max(1.0, abs(L))
        assert np.abs(grad[i] - ref).max() <= 1e-12 * max(np.abs(ref).max(), 1e-300)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_samples_engine_pieces_keep_the_callers_error_state():
    """The pieces of a threaded samples evaluation run in the caller's numpy error state."""
    from fastrace import engine as eng_mod

    net, data, inits = _random_sample_gates_case(P=10000)  # (in blocks)
    eng = GradientEngine(net, data, "samples")
    assert len(eng._blocks) > 1 and data.n_samples * eng.n_params >= \
        eng_mod.SAMPLES_THREADS_MIN_WORK  # (cut, and threaded)
    huge = eng.pack(inits[0])[None] * 1e120
    with numba_threads(2):
        with np.errstate(over="raise"), pytest.raises(FloatingPointError):
            eng.loss(huge)
        with np.errstate(all="ignore"):
            assert not np.isfinite(eng.loss(huge)[0])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
def test_samples_engine_pieces_keep_the_error_state_outside_the_context():
    """numpy 1.x keeps its error state per thread, not in the context that the pieces get:
    the pieces run in the caller's error state all the same."""
    import contextvars

    net, data, inits = _random_sample_gates_case(P=10000)  # (in blocks)
    eng = GradientEngine(net, data, "samples")
    huge = eng.pack(inits[0])[None] * 1e120
    with numba_threads(2), pytest.MonkeyPatch.context() as mp:
        mp.setattr(contextvars, "copy_context", contextvars.Context)  # (carries nothing)
        with np.errstate(over="raise"), pytest.raises(FloatingPointError):
            eng.loss(huge)


def test_samples_engine_runs_on_threads_left_at_interpreter_shutdown():
    """A thread still evaluating when the main thread has ended (the pool takes no more work,
    nor can it be made): the caller does its pieces itself, with the same numbers."""
    script = """
import threading, time
import numba, numpy as np
import fastrace as fr
from fastrace.engine import GradientEngine
rng = np.random.default_rng(0)
net = fr.Network.chain([100, 64, 64, 8], ["x", "h1", "h2", "y"])
data = fr.Dataset({"x": rng.standard_normal((10000, 100))}, {"y": rng.standard_normal((10000, 8))})
eng = GradientEngine(net, data, "samples")
assert len(eng._blocks) > 1
w = eng.pack(fr.init.gaussian(net, 0.1, seed=0))[None]
numba.set_num_threads(2)
before = eng.loss_and_gradient(w) if USED else None
def late():
    time.sleep(0.5)  # the main thread has ended
    numba.set_num_threads(2)
    L, G = eng.loss_and_gradient(w)
    print(before is None or (np.array_equal(L, before[0]) and np.array_equal(G, before[1])))
threading.Thread(target=late).start()
"""
    for used in (True, False):  # the pool made before the end, or not
        done = subprocess.run([sys.executable, "-c", script.replace("USED", str(used))],
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, NUMBA_NUM_THREADS="2"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["True"], (used, done.stderr[-2000:])


def test_a_samples_run_in_blocks_is_cut():
    """The cases above that test the threads on the samples engine are cut into blocks."""
    net, data, _ = _random_sample_gates_case(P=10000)
    assert len(GradientEngine(net, data, "samples")._blocks) > 1


def test_samples_engine_reuses_its_work_arrays_across_blocks():
    """In ``reusing_memory``, a lane that does blocks of different sizes (rows, or samples an
    edge's gates open) in turn keeps its work arrays: no fresh memory per piece."""
    rng = np.random.default_rng(1)
    P = 10001  # (blocks of 5000 and 5001 samples)
    net = fr.Network.chain([100, 64, 64, 8], ["x", "h1", "h2", "y"])
    data = fr.Dataset({"x": rng.standard_normal((P, 100))}, {"y": rng.standard_normal((P, 8))},
                      node_gates={"h1": (rng.random(P) < 0.5).astype(float)})
    eng = GradientEngine(net, data, "samples")
    assert len(eng._blocks) == 2
    w = eng.pack(fr.init.gaussian(net, 0.1, seed=0))[None]
    with numba_threads(1), eng.reusing_memory():
        first = eng.loss_and_gradient(w)
        (space,) = eng._work.spaces
        kept = dict(space._arrays)
        again = eng.loss_and_gradient(w)
        assert all(space._arrays[k] is a for k, a in kept.items())
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert eng._work.spaces is None  # (let go)


def test_an_interrupt_while_waiting_for_pieces_is_raised_once_they_are_done(monkeypatch):
    """A piece still running must not outlive its call (the next call would reuse its work
    arrays): Ctrl-C while the caller waits for the pool is raised once the pieces are done."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import wait as real_wait

    from fastrace import engine as eng_mod

    calls = []

    def interrupted_once(futures):
        calls.append(len(futures))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_wait(futures)

    monkeypatch.setattr(eng_mod, "wait", interrupted_once)
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(lambda: (release.wait(5), time.sleep(0.05)))
        threading.Timer(0.1, release.set).start()
        with pytest.raises(KeyboardInterrupt):
            eng_mod._wait_all([slow, None])
        assert slow.done() and len(calls) == 2
