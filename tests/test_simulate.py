"""fr.simulate / fr.resume: gradient descent and gradient flow of full networks, HDF5 and resume."""

import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

import fastrace as fr
from fastrace import _memory
from conftest import random_dag, random_data
from fastrace import store
from fastrace.simulate import Trajectory, resume, simulate

TESTS = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fr.__file__)))


# ---------------------------------------------------------------------- independent reference
def reference_descent(net, data, W0, lr, steps, momentum=0.0, weight_decay=0.0):
    """Plain gradient descent, sample by sample with explicit loops (no fastrace numerics).

    Returns the weights at every step 0..steps and the loss at every step."""
    nodes = list(net.nodes)
    edges = {e: (net.edge(e).source, net.edge(e).target) for e in net.edges}
    into = {v: [e for e, (_, t) in edges.items() if t == v] for v in nodes}
    order = []
    while len(order) < len(nodes):  # topological order, found independently
        for v in nodes:
            if v not in order and all(edges[e][0] in order for e in into[v]):
                order.append(v)
    P = data.n_samples

    def gate_n(v, n):
        return data.node_gates[v][n] if v in data.node_gates else 1.0

    def gate_e(e, n):
        return data.edge_gates[e][n] if e in data.edge_gates else 1.0

    def loss_grad(W):
        grad = {e: np.zeros_like(W[e]) for e in W}
        total = 0.0
        for n in range(P):
            h = {}
            for v in order:
                if not into[v]:
                    h[v] = gate_n(v, n) * data.inputs[v][n]
                else:
                    z = np.zeros(net.dim(v))
                    for e in into[v]:
                        z = z + gate_e(e, n) * (W[e] @ h[edges[e][0]])
                    h[v] = gate_n(v, n) * z
            dh = {v: np.zeros(net.dim(v)) for v in nodes}
            for v in data.targets:
                r = h[v] - data.targets[v][n]
                total += data.weights[n] * 0.5 * float(r @ r)
                dh[v] = dh[v] + data.weights[n] * r
            for v in reversed(order):
                for e in into[v]:
                    s = edges[e][0]
                    a = gate_e(e, n) * gate_n(v, n)
                    grad[e] += a * np.outer(dh[v], h[s])
                    dh[s] = dh[s] + a * (W[e].T @ dh[v])
        return total, grad

    W = {e: np.array(a, dtype=float) for e, a in W0.items()}
    V = {e: np.zeros_like(a) for e, a in W.items()}
    weights, losses = [], []
    for _ in range(steps):
        weights.append({e: a.copy() for e, a in W.items()})
        L, G = loss_grad(W)
        losses.append(L)
        for e in W:
            V[e] = momentum * V[e] + G[e] + weight_decay * W[e]
            W[e] = W[e] - lr * V[e]
    weights.append({e: a.copy() for e, a in W.items()})
    losses.append(loss_grad(W)[0])
    return weights, np.array(losses)


def case(seed, n_samples=10, n_patterns=None):
    rng = np.random.default_rng(seed)
    net = random_dag(rng, n_inputs=int(rng.integers(1, 3)), n_hidden=int(rng.integers(2, 4)),
                     max_dim=3, extra_edges=2)
    data = random_data(rng, net, n_samples=n_samples, n_patterns=n_patterns)
    return net, data, fr.init.gaussian(net, std=0.5, seed=rng)


def rel(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def same_trajectory(a, b):
    """Two trajectories hold identical numbers (bit for bit)."""
    np.testing.assert_array_equal(a.t, b.t)
    np.testing.assert_array_equal(a.step, b.step)
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.svals.keys() == b.svals.keys()
    for e in a.svals:
        np.testing.assert_array_equal(a.svals[e], b.svals[e])
    assert (a.snapshots is None) == (b.snapshots is None)
    for e in a.snapshots or {}:
        np.testing.assert_array_equal(a.snapshots[e], b.snapshots[e])
    assert a.quantities.keys() == b.quantities.keys()
    for q in a.quantities:
        np.testing.assert_array_equal(a.quantities[q], b.quantities[q])
    assert a.final_weights.keys() == b.final_weights.keys()
    for e in a.final_weights:
        np.testing.assert_array_equal(a.final_weights[e], b.final_weights[e])


# ---------------------------------------------------------------------- gradient descent
@pytest.mark.parametrize("engine", ["samples", "moments"])
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.02)])
@pytest.mark.parametrize("seed", [3, 11])
def test_descent_matches_sample_by_sample_reference(seed, engine, momentum, weight_decay):
    net, data, W0 = case(seed, n_patterns=4)
    lr, steps = 0.05, 100
    ref_w, ref_loss = reference_descent(net, data, W0, lr, steps, momentum, weight_decay)
    run = simulate(net, data, W0, lr=lr, steps=steps, engine=engine, momentum=momentum,
                   weight_decay=weight_decay, save_weights=True, progress=False)
    assert run.status == "complete" and run.n_saved == steps + 1
    np.testing.assert_array_equal(run.step, np.arange(steps + 1))
    np.testing.assert_allclose(run.t, lr * np.arange(steps + 1), rtol=1e-15)
    assert rel(run.loss, ref_loss) < 1e-10
    for i in range(0, steps + 1, 7):
        for e in net.edges:
            assert rel(run.weights(i)[e], ref_w[i][e]) < 1e-10
    for e in net.edges:
        assert rel(run.final_weights[e], ref_w[-1][e]) < 1e-10
        s = np.linalg.svd(ref_w[50][e], compute_uv=False)
        assert rel(run.svals[e][50], s) < 1e-10


def test_engines_agree_and_batches_equal_separate_runs():
    net, data, _ = case(5, n_samples=16, n_patterns=3)
    inits = [fr.init.gaussian(net, std=0.4, seed=s) for s in range(3)]
    kw = dict(lr=[0.05, 0.03, 0.02], steps=60, momentum=0.5, record_every=4, progress=False,
              save_weights=True)
    moments = simulate(net, data, inits, engine="moments", **kw)
    samples = simulate(net, data, inits, engine="samples", **kw)
    for a, b in zip(moments, samples):
        assert rel(a.loss, b.loss) < 1e-11
        for e in net.edges:
            assert rel(a.snapshots[e], b.snapshots[e]) < 1e-11
    assert [r.run for r in moments] == ["seed_00", "seed_01", "seed_02"]
    for i, W0 in enumerate(inits):
        alone = simulate(net, data, W0, engine="moments", **{**kw, "lr": kw["lr"][i]})
        same_trajectory(alone, moments[i])


def test_results_do_not_depend_on_threads():
    net, data, _ = case(7, n_samples=12, n_patterns=3)
    inits = [fr.init.gaussian(net, std=0.4, seed=s) for s in range(3)]
    for engine in ("moments", "samples"):
        one = simulate(net, data, inits, lr=0.05, steps=40, engine=engine, threads=1,
                       progress=False)
        two = simulate(net, data, inits, lr=0.05, steps=40, engine=engine, threads=2,
                       progress=False)
        for a, b in zip(one, two):
            same_trajectory(a, b)


SIM = sys.modules["fastrace.simulate"]  # the name fastrace.simulate is the function


def assert_same_singular_values(got, expected):
    """Equal to rounding: SVD's error bound is a few ulps of the largest value, for every value."""
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=64 * np.finfo(float).eps
                               * max(float(expected[0]) if expected.size else 0.0, 1e-300))


DIMS = st.sampled_from([1, 3, 4, 7, 16, 24])  # few sizes: batches of one shape are stacked


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 120), DIMS, DIMS), min_size=1, max_size=5),
       st.integers(2, 3), st.integers(0, 2**31 - 1))
def test_singular_values_shared_between_threads_are_the_same_bits(shapes, threads, seed):
    # every batch shared out (no cost threshold), small and big matrices mixed, with
    # non-finite entries in some rows: each row must be exactly what LAPACK gives it alone;
    # and every call on a pool thread is big enough for numpy to leave the GIL free (else the
    # threads would take turns)
    rng = np.random.default_rng(seed)
    batches = {f"e{i}": rng.standard_normal(shape) for i, shape in enumerate(shapes)}
    for M in batches.values():
        for k in np.flatnonzero(rng.random(len(M)) < 0.15):
            M[k, rng.integers(M.shape[1]), rng.integers(M.shape[2])] = rng.choice(
                [np.nan, np.inf, -np.inf])
    old = SIM._SVD_SHARE_SECONDS, SIM._SVD_SHARED_MIN, SIM._svals
    pool_calls = []

    def svals(M):
        if threading.current_thread() is not threading.main_thread():
            pool_calls.append(len(M) * min(M.shape[1:]))
        return old[2](M)

    try:
        SIM._SVD_SHARE_SECONDS, SIM._SVD_SHARED_MIN, SIM._svals = 0.0, 4, svals
        shared = SIM._singular_values(batches, threads)
    finally:
        SIM._SVD_SHARE_SECONDS, SIM._SVD_SHARED_MIN, SIM._svals = old
    assert all(values > 500 for values in pool_calls)  # (each piece handed to the pool)
    alone = {e: SIM._svals(M) for e, M in batches.items()}  # each batch alone, no stacking
    assert list(shared) == list(batches)
    for e, M in batches.items():
        assert shared[e].shape == (len(M), min(M.shape[1:]))
        np.testing.assert_array_equal(shared[e], alone[e])
        for k in range(len(M)):
            if np.isfinite(M[k]).all():  # one matrix at a time, straight from numpy's SVD
                # (wide matrices go through QR first: the same values to rounding)
                assert_same_singular_values(shared[e][k], np.linalg.svd(M[k], compute_uv=False))
            else:  # only the row with a non-finite entry is NaN, not the whole batch
                assert np.isnan(shared[e][k]).all()


SHARED_SVALS_SCRIPT = """
import multiprocessing, sys, threading, time
import numpy as np
import fastrace
SIM = sys.modules["fastrace.simulate"]
BATCH = {"e": np.random.default_rng(0).standard_normal((64, 32, 32))}
EXPECTED = SIM._singular_values(BATCH, 1)["e"]

def shared():
    assert np.array_equal(SIM._singular_values(BATCH, 2)["e"], EXPECTED)

def in_child(q):
    shared()
    q.put("ok")

if __name__ == "__main__":
    shared()  # the pool exists now, with its threads
    if sys.argv[1] == "fork":  # a forked child has the pool object but not its threads
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=in_child, args=(q,))
        p.start()
        p.join(60)
        if p.is_alive():
            p.kill()
            sys.exit("the forked child hung")
        print(q.get(), p.exitcode)
    else:  # a thread still running once the main thread is done: the pool takes no work
        def late():
            time.sleep(0.5)
            shared()
            print("ok 0", flush=True)
        threading.Thread(target=late).start()
"""


@pytest.mark.parametrize("where", ["fork", "after main thread"])
def test_shared_singular_values_after_fork_and_after_the_main_thread(tmp_path, where):
    script = tmp_path / "shared_svals.py"
    script.write_text(SHARED_SVALS_SCRIPT)
    old = SIM._SVD_SHARE_SECONDS  # the batch is worth sharing under the default threshold
    assert 64 * (SIM._SVD_CALL_SECONDS + SIM._SVD_UNIT_SECONDS * 32 ** 3) >= old
    done = subprocess.run([sys.executable, str(script), where], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": PACKAGE_ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["ok", "0"]


@pytest.mark.parametrize("seed", range(4))
def test_random_networks_record_the_same_with_shared_singular_values(seed, monkeypatch):
    # wide random DAGs (layers up to 40: big, small, wide and tall weights), batches of runs,
    # descent and flow, every batch of singular values shared out: 1 and 2 threads agree
    monkeypatch.setattr(SIM, "_SVD_SHARE_SECONDS", 0.0)
    rng = np.random.default_rng(100 + seed)
    net = random_dag(rng, n_inputs=2, n_hidden=3, max_dim=40, extra_edges=2)
    data = random_data(rng, net, n_samples=30, n_patterns=4)
    inits = [fr.init.gaussian(net, std=0.1, seed=int(s)) for s in rng.integers(0, 99, 3)]
    for kw in (dict(lr=0.01, steps=30), dict(method="flow", t_end=0.3, record=[0.1, 0.2])):
        one = simulate(net, data, inits, threads=1, progress=False, **kw)
        two = simulate(net, data, inits, threads=2, progress=False, **kw)
        for a, b in zip(one, two):
            same_trajectory(a, b)


@pytest.mark.parametrize("shape", [(3, 64), (7, 64), (64, 7), (16, 2048), (20, 20)])
def test_recorded_singular_values_against_known_ones(shape):
    # matrices built from known singular values spread over 12 decades: every path (QR of a
    # wide matrix's transpose, LAPACK directly) must meet SVD's bound, a few ulps of the largest
    rng = np.random.default_rng(sum(shape))
    m, n = shape
    k = min(m, n)
    known = np.sort(10.0 ** rng.uniform(-12, 0, (5, k)), axis=1)[:, ::-1] * 3.0
    M = np.stack([scipy.linalg.qr(rng.standard_normal((m, k)), mode="economic")[0] * s
                  @ scipy.linalg.qr(rng.standard_normal((n, k)), mode="economic")[0].T
                  for s in known])
    got = SIM._svals(M)
    assert got.shape == known.shape
    assert np.all(np.abs(got - known) <= 64 * np.finfo(float).eps * known[:, :1])


def test_shared_singular_values_of_an_empty_batch_beside_a_big_one():
    big = np.random.default_rng(1).standard_normal((100, 64, 64))
    out = SIM._singular_values({"a": np.zeros((0, 20, 20)), "b": big}, 2)
    assert out["a"].shape == (0, 20)
    np.testing.assert_array_equal(out["b"], np.linalg.svd(big, compute_uv=False))


def test_shared_singular_values_stop_when_the_callers_share_fails(monkeypatch):
    real = SIM._svals
    done = []

    def failing_on_the_caller(M):
        if threading.current_thread() is threading.main_thread():
            raise MemoryError("the caller's share failed")
        time.sleep(0.02)
        done.append(len(M))
        return real(M)

    monkeypatch.setattr(SIM, "_svals", failing_on_the_caller)
    batch = {"e": np.random.default_rng(0).standard_normal((64, 32, 32))}
    with pytest.raises(MemoryError, match="caller's share"):
        SIM._singular_values(batch, 2)
    at_raise = len(done)
    time.sleep(0.3)
    assert len(done) == at_raise <= 1  # the helper stopped: it finished at most one piece


def test_recorded_singular_values_do_not_depend_on_threads(monkeypatch):
    # hidden 32: batches of 64 rows are worth sharing, so two threads take the shared path
    task = fr.tasks.routing(M=7, K=4, hidden=32)
    W0 = fr.init.orthogonal(task.network, gain=0.3, seed=1)
    calls = []
    real = SIM._singular_values
    monkeypatch.setattr(SIM, "_singular_values",
                        lambda b, threads: calls.append(threads) or real(b, threads))
    kw = dict(lr=0.05, steps=150, record_every=1, save_weights=True, progress=False)
    one = simulate(task.network, task.data, W0, threads=1, **kw)
    two = simulate(task.network, task.data, W0, threads=2, **kw)
    assert 2 in calls
    same_trajectory(one, two)
    for e in task.network.edges:
        for got, w in zip(two.svals[e], two.snapshots[e]):
            assert_same_singular_values(got, np.linalg.svd(w, compute_uv=False))


def test_rows_without_weight_series_and_the_final_weights_of_one_run():
    # rows of t and loss alone are recorded without touching the weights; a run's final
    # weights are its own arrays, apart from the caller's and from another run's
    net, data, W0 = case(5)
    kw = dict(lr=0.05, steps=30, record_every=7, progress=False)
    full = simulate(net, data, W0, **kw)
    bare = simulate(net, data, W0, svals=False, **kw)
    again = simulate(net, data, W0, svals=False, **kw)
    assert bare.svals == {} and full.svals.keys() == set(net.edges)
    for key in ("t", "step", "loss"):
        np.testing.assert_array_equal(getattr(bare, key), getattr(full, key))
    for e in net.edges:
        np.testing.assert_array_equal(bare.final_weights[e], full.final_weights[e])
        assert not np.shares_memory(bare.final_weights[e], W0[e])
        assert not np.shares_memory(bare.final_weights[e], again.final_weights[e])
        assert bare.final_weights[e].flags.writeable


def test_record_schedules():
    net, data, W0 = case(2)
    run = simulate(net, data, W0, lr=0.01, steps=50, record_every=8, progress=False)
    np.testing.assert_array_equal(run.step, [0, 8, 16, 24, 32, 40, 48, 50])
    run = simulate(net, data, W0, lr=0.01, steps=50, record=[5, 3, 3, 20], progress=False)
    np.testing.assert_array_equal(run.step, [0, 3, 5, 20, 50])
    run = simulate(net, data, W0, lr=0.01, steps=1000, record="log", n_records=20,
                   progress=False)
    assert run.step[0] == 0 and run.step[-1] == 1000 and np.all(np.diff(run.step) > 0)
    assert run.n_saved <= 20 and run.step[1] == 1
    full = simulate(net, data, W0, lr=0.01, steps=1000, progress=False)
    np.testing.assert_array_equal(full.loss[run.step], run.loss)
    flow = simulate(net, data, W0, method="flow", t_end=2.0, record=[0.5, 1.25],
                    progress=False)
    np.testing.assert_array_equal(flow.t, [0.0, 0.5, 1.25, 2.0])


def test_quantities_are_recorded():
    net, data, W0 = case(4)
    e0 = net.edges[0]
    basis = np.random.default_rng(0).standard_normal(W0[e0].shape)
    run = simulate(net, data, W0, lr=0.05, steps=20, save_weights=True, progress=False,
                   quantities={"proj": lambda W: np.sum(W[e0] * basis),
                               "first_row": lambda W: W[e0][0]})
    assert run.quantities["proj"].shape == (21,)
    assert run.quantities["first_row"].shape == (21, W0[e0].shape[1])
    for i in (0, 9, 20):
        assert run.quantities["proj"][i] == np.sum(run.weights(i)[e0] * basis)


# ---------------------------------------------------------------------- gradient flow
def test_flow_matches_closed_form_of_a_linear_layer():
    """One edge: dW/dt = Σyx − W Σx, so W(t) = W* + (W0 − W*) exp(−Σx t); the dense output
    at times between integrator steps is held to the tolerance too."""
    rng = np.random.default_rng(0)
    net = fr.Network.chain([3, 2], ["x", "y"])
    X, Y = rng.standard_normal((20, 3)), rng.standard_normal((20, 2))
    data = fr.Dataset({"x": X}, {"y": Y})
    Sxx = X.T @ X / 20
    W_star = (Y.T @ X / 20) @ np.linalg.inv(Sxx)
    W0 = {"x->y": rng.standard_normal((2, 3))}
    errors = []
    for rtol in (1e-6, 1e-9):
        run = simulate(net, data, W0, method="flow", t_end=10.0, n_records=57, rtol=rtol,
                       atol=rtol * 1e-2, save_weights=True, progress=False)
        if rtol == 1e-6:  # fewer integrator steps than save points: most fall inside steps
            assert run.step[-1] < 57
        err = max(np.abs(run.weights(i)["x->y"]
                         - (W_star + (W0["x->y"] - W_star) @ scipy.linalg.expm(-Sxx * t))).max()
                  for i, t in enumerate(run.t))
        errors.append(err)
        assert err < 100 * rtol
    assert errors[1] < errors[0] / 100


def test_descent_converges_to_flow_at_first_order():
    net, data, W0 = case(8)
    T, errors = 1.0, []
    flow = simulate(net, data, W0, method="flow", t_end=T, rtol=1e-12, atol=1e-14,
                    record=[T], progress=False)
    for lr in (0.02, 0.01, 0.005):
        gd = simulate(net, data, W0, lr=lr, steps=round(T / lr), record_every=10**6,
                      progress=False)
        assert gd.t[-1] == pytest.approx(T)
        errors.append(max(np.abs(gd.final_weights[e] - flow.final_weights[e]).max()
                          for e in net.edges))
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all((ratios > 1.8) & (ratios < 2.2)), ratios


def test_flow_with_lr_and_steps_shares_the_descent_time_axis():
    net, data, W0 = case(9)
    gd = simulate(net, data, W0, lr=0.01, steps=100, record_every=10, progress=False)
    flow = simulate(net, data, W0, method="flow", lr=0.01, steps=100, record_every=10,
                    progress=False)
    np.testing.assert_array_equal(gd.t, flow.t)
    assert np.max(np.abs(gd.loss - flow.loss)) < 0.05 * np.ptp(gd.loss)


def conservation_drift(net, W_list):
    Q0 = fr.conserved_quantities(net, W_list[0])
    return [max(np.abs(fr.conserved_quantities(net, W)[v] - Q0[v]).max() for v in Q0)
            for W in W_list]


def test_conservation_law_under_descent_and_flow():
    net, data, W0 = case(6)
    assert net.hidden
    per_step = []
    for lr in (0.02, 0.01):
        run = simulate(net, data, W0, lr=lr, steps=20, save_weights=True, progress=False)
        W = [run.weights(i) for i in range(run.n_saved)]
        Q = [fr.conserved_quantities(net, w) for w in W]
        per_step.append(max(np.abs(Q[i + 1][v] - Q[i][v]).max()
                            for i in range(len(Q) - 1) for v in Q[0]))
    assert 3.5 < per_step[0] / per_step[1] < 4.5  # O(η²) per step
    flow = simulate(net, data, W0, method="flow", t_end=2.0, rtol=1e-10, atol=1e-12,
                    save_weights=True, progress=False)
    drift = conservation_drift(net, [flow.weights(i) for i in range(flow.n_saved)])
    assert max(drift) < 1e-8
    assert max(drift) < per_step[1]


def test_batched_flow_equals_separate_runs():
    net, data, _ = case(10)
    inits = [fr.init.gaussian(net, std=s, seed=i) for i, s in enumerate((0.2, 0.5, 0.9))]
    batch = simulate(net, data, inits, method="flow", t_end=3.0, n_records=11, progress=False)
    for W0, b in zip(inits, batch):
        same_trajectory(simulate(net, data, W0, method="flow", t_end=3.0, n_records=11,
                                 progress=False), b)


# ---------------------------------------------------------------------- HDF5
def test_file_equals_memory(tmp_path):
    net, data, _ = case(12)
    inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(2)]
    e0 = net.edges[0]
    q = {"norm": lambda W: np.linalg.norm(W[e0])}
    for method, kw in (("gd", dict(lr=[0.05, 0.02], steps=80, record_every=3, momentum=0.3)),
                       ("flow", dict(t_end=2.0, n_records=21))):
        path = tmp_path / f"{method}.h5"
        runs = simulate(net, data, inits, method=method, out=path, save_weights=True,
                        weights_dtype="float32", quantities=q, progress=False, **kw)
        assert store.list_runs(path) == ["seed_00", "seed_01"]
        for run in runs:
            back = Trajectory.from_hdf5(path, run.run)
            same_trajectory(back, run)
            assert back.snapshots[e0].dtype == np.float32
            assert back.status == "complete" and back.attrs == run.attrs
            assert back.attrs["method"] == method
        again = resume(path, net, data, quantities=q)  # complete runs are only read back
        for a, b in zip(again, runs):
            same_trajectory(a, b)


def test_streaming_in_short_engine_calls_changes_no_number(tmp_path, monkeypatch):
    # engine calls hold at most SNAPSHOT_BYTES of save points, and the writer stores one call's
    # rows during the next; a single row per call here: the numbers must not change
    simulate_module = sys.modules[simulate.__module__]  # fastrace.simulate is the function
    net, data, _ = case(13)
    inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(2)]
    kw = dict(lr=[0.05, 0.02], steps=60, record_every=2, momentum=0.4, save_weights=True,
              progress=False)
    memory = simulate(net, data, inits, **kw)
    monkeypatch.setattr(simulate_module, "SNAPSHOT_BYTES", 1)
    monkeypatch.setattr(simulate_module, "BATCH_ROWS", 3)
    monkeypatch.setattr(simulate_module, "SEND_BYTES", 1)  # every batch to the writer
    calls = []
    descend = simulate_module.GradientEngine.descend
    monkeypatch.setattr(simulate_module.GradientEngine, "descend",
                        lambda self, *a, **k: calls.append(1) or descend(self, *a, **k))
    streamed = simulate(net, data, inits, out=tmp_path / "short.h5", **kw)
    assert len(calls) == 15  # one save point inside each call (and one at its end)
    for a, b, name in zip(memory, streamed, ("seed_00", "seed_01")):
        same_trajectory(a, b)
        same_trajectory(Trajectory.from_hdf5(tmp_path / "short.h5", name), a)


def test_the_final_checkpoint_holds_every_row(tmp_path):
    import h5py

    net, data, W0 = case(17)
    path = tmp_path / "final.h5"
    full = simulate(net, data, W0, lr=0.05, steps=90, record_every=3, save_weights=True,
                    checkpoint_every=30, out=path, progress=False)
    with h5py.File(path, "r") as f:  # the checkpoint after the last rows, with all of them
        ck = f["simulation/checkpoint"]
        slot = ck[f"slot{int(ck['current'][()])}"]
        assert int(slot["step"][()]) == 90 and int(slot["state/next_save"][()]) == 31
        assert set(slot["rows"][()]) == {31}
    with h5py.File(path, "r+") as f:  # as if killed between that checkpoint and the close
        f["simulation/live/status"][()] = np.array(b"running", dtype="S256")
    assert store.run_status(path, "simulation") == "running"
    again = resume(path, net, data)
    same_trajectory(again, full)
    assert again.status == "complete" and again.n_saved == 31


def test_row_batches_cover_every_save_point_and_end_small():
    from fastrace.simulate import _row_batches

    for n in (0, 1, 5, 63, 64, 65, 499, 1000):
        for size in (1, 2, 8, 64):
            for taper in (False, True):
                batches = _row_batches(n, size, taper)
                assert [i for a, b in batches for i in range(a, b)] == list(range(n))
                assert all(0 < b - a <= size for a, b in batches)
                if taper and n >= 2 * size:
                    assert batches[-1][1] - batches[-1][0] == max(1, size // 8)
                if not taper and n:
                    assert all(b - a == size for a, b in batches[1:])


def test_unwritable_path_fails_before_any_compute(tmp_path, monkeypatch):
    from fastrace.engine import GradientEngine

    net, data, W0 = case(1)
    calls = []
    monkeypatch.setattr(GradientEngine, "descend", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(GradientEngine, "loss_and_gradient", lambda *a, **k: calls.append(1))
    for bad in (tmp_path / "missing" / "run.h5", tmp_path):
        with pytest.raises(fr.StoreError):
            simulate(net, data, W0, lr=0.1, steps=10, out=bad, progress=False)
        with pytest.raises(fr.StoreError):
            simulate(net, data, W0, method="flow", t_end=1.0, out=bad, progress=False)
    assert calls == []


def test_divergence_names_step_edge_and_value(tmp_path):
    net, data, W0 = case(14)
    lr, threshold = 3.0, 1e4
    # the step at which the independent reference first exceeds the threshold
    W, first_bad = {e: a.copy() for e, a in W0.items()}, None
    for k in range(1, 200):
        G = fr.gradient(net, data, W)
        W = {e: W[e] - lr * G[e] for e in W}
        if max(np.abs(a).max() for a in W.values()) > threshold:
            first_bad = k
            break
    assert first_bad is not None
    worst = max(W, key=lambda e: np.abs(W[e]).max())
    path = tmp_path / "div.h5"
    with pytest.raises(fr.DivergenceError) as info:
        simulate(net, data, [W0, W0], lr=[lr, 1e-3], steps=1000, record_every=50, out=path,
                 divergence_threshold=threshold, progress=False)
    err = info.value
    assert err.step == first_bad
    assert worst in err.quantity and worst in str(err)
    assert abs(err.value) > threshold
    assert err.run == "seed_00" and err.edge == worst
    status = store.run_status(path, "seed_00")
    assert status.startswith("failed: diverged") and str(first_bad) in status
    assert store.run_status(path, "seed_01").startswith("failed: stopped")
    with pytest.raises(fr.StoreError, match="diverged"):
        resume(path, net, data, run="seed_00")


@pytest.mark.parametrize("lrs, winner", [([1.0, 5.0, 10.0, 3.0], 2), ([1.0, 30.0, 100.0, 100.0], 2)])
def test_a_batch_reports_its_first_divergence(lrs, winner):
    # runs of one engine call that diverge at different steps, by their loss or their
    # weights: the batch reports what the earliest run reports alone, the weights after step
    # k coming before the loss at them, and of equal runs the first
    net, data, W0 = case(14)
    kw = dict(steps=300, record_every=300, divergence_threshold=1e100, progress=False)
    alone = []
    for lr in lrs:
        try:
            simulate(net, data, W0, lr=lr, **kw)
            alone.append(None)
        except fr.DivergenceError as exc:
            alone.append(exc)
    first = min((e.step, e.quantity == "loss", i) for i, e in enumerate(alone) if e)[2]
    assert first == winner  # the cases mix both kinds: see the parameters
    assert {e.quantity == "loss" for e in alone if e} == {True, False}
    with pytest.raises(fr.DivergenceError) as info:
        simulate(net, data, [W0] * len(lrs), lr=lrs, **kw)
    err, ref = info.value, alone[first]
    assert err.run == f"seed_{first:02d}"
    assert (err.step, err.quantity, err.value, err.edge) == (ref.step, ref.quantity, ref.value,
                                                             ref.edge)
    assert str(err) == str(ref).replace("'simulation'", repr(err.run))


def test_overflow_without_threshold_is_reported():
    net, data, W0 = case(14)
    with pytest.raises(fr.DivergenceError) as info:
        simulate(net, data, W0, lr=3.0, steps=500, record_every=100,
                 divergence_threshold=float("inf"), progress=False)
    err = info.value
    assert 5 < err.step < 100 and not np.isfinite(err.value)
    assert err.edge in net.edges


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["gd", "flow"])
def test_resume_after_a_failure_gives_the_uninterrupted_result(tmp_path, method):
    net, data, _ = case(15)
    inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(2)]
    e0 = net.edges[0]
    kw = (dict(lr=[0.05, 0.03], steps=400, record_every=3, momentum=0.5) if method == "gd"
          else dict(t_end=20.0, n_records=301, rtol=1e-6))
    kw.update(method=method, save_weights=True, checkpoint_every=7, progress=False)

    def norm(W):
        return np.linalg.norm(W[e0])

    full = simulate(net, data, inits, out=tmp_path / "full.h5", quantities={"n": norm}, **kw)
    calls, limit = [], [150]

    def breaks(W):  # fails part-way through, like a crash
        calls.append(1)
        if len(calls) > limit[0]:
            raise Interrupt("boom")
        return norm(W)

    path = tmp_path / "broken.h5"
    with pytest.raises(fr.ConfigError, match="boom"):
        simulate(net, data, inits, out=path, quantities={"n": breaks}, **kw)
    assert store.run_status(path, "seed_00").startswith("failed: ConfigError")
    with pytest.raises(fr.ConfigError, match="quantities"):
        resume(path, net, data)
    other = random_data(np.random.default_rng(1), net, n_samples=10)
    with pytest.raises(fr.DataError):
        resume(path, net, data=other, quantities={"n": norm})
    # one run alone, failing again further on: the two runs now stand at different checkpoints
    calls.clear()
    limit[0] = 40 if method == "gd" else 120
    with pytest.raises(fr.ConfigError, match="boom"):
        resume(path, net, data, run="seed_00", quantities={"n": breaks})
    steps_done = {r: i["checkpoint_step"] for r, i in store.run_info(path)["runs"].items()}
    assert steps_done["seed_00"] > steps_done["seed_01"] > 0
    resumed = resume(path, net, data, quantities={"n": norm})
    for a, b in zip(resumed, full):
        same_trajectory(a, b)
        assert a.status == "complete"
    for name in ("seed_00", "seed_01"):
        same_trajectory(Trajectory.from_hdf5(path, name), Trajectory.from_hdf5(
            tmp_path / "full.h5", name))


KILL_SCRIPT = """
import sys, time
import numpy as np
import fastrace as fr
from test_simulate import case
from fastrace.simulate import simulate
net, data, _ = case(16)
inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(2)]
def slow(W):
    time.sleep(0.002)
    return np.float64(np.linalg.norm(W[net.edges[0]]))
simulate(net, data, inits, lr=[0.05, 0.02], steps=4000, record_every=5, save_weights=True,
         checkpoint_every=100, out=sys.argv[1], quantities={"n": slow}, progress=False)
"""


def _kill_script_when(path, ready, script=KILL_SCRIPT) -> None:
    """Run ``script`` writing ``path`` and SIGKILL it as soon as ``ready()`` is true."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, TESTS]))
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _checkpointed_past(path, step: int, pause: float):
    """A test (for _kill_script_when), after ``pause`` s, that every run of the file at
    ``path`` has a checkpoint at ``step`` or later."""
    def ready() -> bool:
        time.sleep(pause)
        try:
            info = store.run_info(path)["runs"]
        except fr.StoreError:
            return False
        return min(r["checkpoint_step"] or 0 for r in info.values()) >= step

    return ready


def _assert_resume_is_the_uninterrupted_run(path) -> None:
    """Resume KILL_SCRIPT's killed file and compare it with the run made in one go."""
    net, data, _ = case(16)
    inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(2)]

    def norm(W):
        return np.float64(np.linalg.norm(W[net.edges[0]]))

    resumed = resume(path, net, data, quantities={"n": norm})
    full = simulate(net, data, inits, lr=[0.05, 0.02], steps=4000, record_every=5,
                    save_weights=True, quantities={"n": norm}, progress=False)
    for a, b in zip(resumed, full):
        same_trajectory(a, b)
        assert a.status == "complete" and a.n_saved == 801


def test_sigkill_then_resume_is_bit_for_bit(tmp_path):
    path = tmp_path / "killed.h5"

    _kill_script_when(path, _checkpointed_past(path, 300, 0.05))
    partial = store.read_run(path, "seed_00")
    assert partial.status == "running"
    assert 0 < partial.series["t"].shape[0] < 801
    _assert_resume_is_the_uninterrupted_run(path)


def samples_engine_case():
    """A samples-engine run whose samples are cut into blocks (shared by the threads), with
    momentum: x(100) -> h1(64) -> h2(64) -> y(8), h1 gated per sample."""
    rng = np.random.default_rng(3)
    P = 10000
    net = fr.Network.chain([100, 64, 64, 8], ["x", "h1", "h2", "y"])
    data = fr.Dataset({"x": rng.standard_normal((P, 100))}, {"y": rng.standard_normal((P, 8))},
                      node_gates={"h1": (rng.random(P) < 0.7).astype(float)})
    return net, data, fr.init.gaussian(net, 0.1, seed=0)


SAMPLES_KILL_SCRIPT = """
import sys
from test_simulate import samples_engine_case
from fastrace.simulate import simulate
net, data, init = samples_engine_case()
simulate(net, data, init, lr=0.05, momentum=0.9, steps=150, record_every=10, engine="samples",
         checkpoint_every=20, threads=2, out=sys.argv[1], progress=False)
"""


def test_a_killed_samples_engine_run_in_blocks_resumes_bit_for_bit(tmp_path):
    """The samples engine's blocks, threads and reused work arrays: a run killed after a
    checkpoint and resumed (on 1 thread) gives the bits of the run made in one go."""
    from fastrace.engine import GradientEngine

    net, data, init = samples_engine_case()
    assert len(GradientEngine(net, data, "samples")._blocks) > 1
    path = tmp_path / "samples.h5"

    _kill_script_when(path, _checkpointed_past(path, 40, 0.02), SAMPLES_KILL_SCRIPT)
    assert store.read_run(path, "simulation").status == "running"
    resumed = resume(path, net, data, threads=1)
    full = simulate(net, data, init, lr=0.05, momentum=0.9, steps=150, record_every=10,
                    engine="samples", threads=2, progress=False)
    same_trajectory(resumed, full)
    assert resumed.status == "complete"


FLOW_KILL_SCRIPT = """
import sys, time
import numpy as np
import fastrace as fr
from test_simulate import case
from fastrace.simulate import simulate
net, data, _ = case(16)
inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(2)]
def slow(W):
    time.sleep(0.002)
    return np.float64(np.linalg.norm(W[net.edges[0]]))
simulate(net, data, inits, method="flow", t_end=40.0, n_records=400, rtol=1e-9,
         checkpoint_every=10, out=sys.argv[1], quantities={"n": slow}, progress=False)
"""


def test_a_killed_flow_run_resumes_bit_for_bit(tmp_path):
    """Gradient flow (adaptive steps, each run its own): killed after a checkpoint, resumed,
    the same numbers as the run made in one go."""
    path = tmp_path / "flow.h5"

    _kill_script_when(path, _checkpointed_past(path, 30, 0.02), FLOW_KILL_SCRIPT)
    assert store.read_run(path, "seed_00").status == "running"
    net, data, _ = case(16)
    inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(2)]

    def norm(W):
        return np.float64(np.linalg.norm(W[net.edges[0]]))

    resumed = resume(path, net, data, quantities={"n": norm})
    full = simulate(net, data, inits, method="flow", t_end=40.0, n_records=400, rtol=1e-9,
                    quantities={"n": norm}, progress=False)
    for a, b in zip(resumed, full):
        same_trajectory(a, b)
        assert a.status == "complete" and a.n_saved == 400


def test_a_run_killed_as_soon_as_its_file_appears_can_be_resumed(tmp_path):
    # the file takes its path once it holds each run's first checkpoint (it used to appear
    # ~0.1 s before: a kill then left a file that resume refused, "start it again")
    path = tmp_path / "early.h5"

    def appeared() -> bool:
        time.sleep(0.0005)
        return path.exists()

    _kill_script_when(path, appeared)
    assert path.exists()
    info = store.run_info(path)["runs"]
    assert all(r["checkpoint_step"] == 0 for r in info.values())
    _assert_resume_is_the_uninterrupted_run(path)


@pytest.mark.parametrize("method, kw", [("gd", dict(lr=0.01, steps=4, record_every=4)),
                                        ("flow", dict(method="flow", t_end=0.1, n_records=2))])
def test_a_new_file_takes_its_path_with_every_runs_first_checkpoint(tmp_path, monkeypatch,
                                                                    method, kw):
    # many runs, and (flow) a start slowed by a quantity: the writer took only the operations
    # already queued, and published the file while 27-386 of 100-400 runs had no checkpoint
    net, data, _ = case(16)
    inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(150)]
    pointers = []
    publish = store.TrajectoryWriter._publish

    def watched(self, f, fill):
        def fill_and_look(g):
            fill(g)
            pointers.extend(int(self._ckpt[run][0][()]) for run in self._specs)
        return publish(self, f, fill_and_look)

    monkeypatch.setattr(store.TrajectoryWriter, "_publish", watched)

    def slow(W):
        time.sleep(0.002)
        return np.float64(1.0)

    simulate(net, data, inits, out=tmp_path / "f.h5", progress=False, svals=False,
             quantities={"q": slow} if method == "flow" else None, **kw)
    assert len(pointers) == 150 and min(pointers) >= 0


# ---------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0, steps=10), "lr"),
    (dict(lr=-1.0, steps=10), "lr"),
    (dict(lr=float("nan"), steps=10), "lr"),
    (dict(lr=0.1, steps=0), "steps"),
    (dict(lr=0.1, steps=2.5), "steps"),
    (dict(lr=0.1), "steps"),
    (dict(lr=0.1, steps=10, method="adam"), "method"),
    (dict(lr=0.1, steps=10, engine="gpu"), "engine"),
    (dict(lr=0.1, steps=10, momentum=1.0), "momentum"),
    (dict(lr=0.1, steps=10, weight_decay=-1.0), "weight_decay"),
    (dict(lr=0.1, steps=10, record_every=0), "record_every"),
    (dict(lr=0.1, steps=10, record=[11]), "record"),
    (dict(lr=0.1, steps=10, record=[1.5]), "record"),
    (dict(lr=0.1, steps=10, record="lin"), "record"),
    (dict(lr=0.1, steps=10, weights_dtype="float16"), "weights_dtype"),
    (dict(lr=0.1, steps=10, checkpoint_every=5), "out"),
    (dict(lr=0.1, steps=10, threads=0), "threads"),
    (dict(lr=0.1, steps=10, threads=10**6), "threads"),
    (dict(lr=0.1, steps=10, t_end=1.0), "t_end"),
    (dict(lr=[0.1, 0.2], steps=10), "lr"),
    (dict(lr=0.1, steps=10, quantities={"q": 3}), "callable"),
    (dict(lr=0.1, steps=10, quantities={"q": lambda W: "text"}), "numbers"),
    (dict(method="flow"), "t_end"),
    (dict(method="flow", t_end=-1.0), "t_end"),
    (dict(method="flow", t_end=1.0, momentum=0.5), "momentum"),
    (dict(method="flow", t_end=1.0, lr=0.1, steps=10), "either"),
    (dict(method="flow", t_end=1.0, record=[2.0]), "record"),
    (dict(method="flow", t_end=1.0, rtol=0.0), "rtol"),
    # values that do not convert, or overflow, are named too (not a bare Python error)
    (dict(lr=0.1, steps=math.inf), "steps"),
    (dict(lr=0.1, steps=1e30), "steps must be at most"),
    (dict(lr=0.1, steps=10, threads=math.inf), "threads"),
    (dict(lr=0.1, steps=10, momentum=None), "momentum"),
    (dict(lr=0.1, steps=10, weight_decay="x"), "weight_decay"),
    (dict(lr=0.1, steps=10, divergence_threshold="x"), "divergence_threshold"),
    (dict(lr=0.1, steps=10, record=["a"]), "record"),
    (dict(lr=0.1, steps=10, record={1, 2}), "record"),
    (dict(method="flow", t_end=1.0, rtol=1e-16), "rtol"),
    (dict(method="flow", t_end=1.0, rtol=1e10), "use rtol < 1"),
    (dict(method="flow", lr=1e300, steps=10**10, record="log"), "overflows"),
    (dict(method="flow", t_end=1.0, n_records=10**12), "n_records"),
])
def test_bad_arguments_raise_config_errors(kwargs, match):
    net, data, W0 = case(0)
    with pytest.raises(fr.ConfigError, match=match):
        simulate(net, data, W0, progress=False, **kwargs)


def test_bad_weights_and_inputs():
    net, data, W0 = case(0)
    with pytest.raises(fr.WeightsError):
        simulate(net, data, {**W0, net.edges[0]: np.zeros((7, 7))}, lr=0.1, steps=2)
    with pytest.raises(fr.WeightsError):
        simulate(net, data, [], lr=0.1, steps=2)
    with pytest.raises(fr.ConfigError, match="distinct"):
        simulate(net, data, [W0, W0], lr=0.1, steps=2, run_names=["a", "a"])
    with pytest.raises(fr.NetworkError):
        simulate("net", data, W0, lr=0.1, steps=2)
    with pytest.raises(fr.DataError):
        simulate(net, "data", W0, lr=0.1, steps=2)
    run = simulate(net, data, W0, lr=0.1, steps=2, progress=False)
    with pytest.raises(fr.ConfigError, match="save_weights"):
        run.weights(1)
    with pytest.raises(IndexError):
        run.weights(5)
    assert run.weights(-1).keys() == W0.keys()


def test_flow_gives_up_after_max_steps_instead_of_grinding(tmp_path):
    net = fr.Network.chain([3, 5, 2])
    rng = np.random.default_rng(0)
    data = fr.Dataset({"h0": rng.standard_normal((10, 3))}, {"h2": rng.standard_normal((10, 2))})
    W = fr.init.orthogonal(net, gain=0.5, seed=0)
    with pytest.raises(fr.IntegrationError, match="took 20 steps"):
        fr.simulate(net, data, W, method="flow", t_end=1e4, max_steps=20, out=tmp_path / "f.h5")
    from fastrace import store
    assert store.run_status(tmp_path / "f.h5", "simulation").startswith("failed")


def test_flow_with_a_field_too_large_to_scale_stops_at_once():
    # weights ~1e100 (allowed by an infinite threshold): the starting-step rule squared the
    # scaled field (inf), took a NaN step and rejected it max_steps times ("stiff")
    net = fr.Network.chain([1, 1, 1])
    data = fr.Dataset({"h0": np.ones((1, 1))}, {"h2": np.ones((1, 1))})
    W = {"h0->h1": np.full((1, 1), 1e-5), "h1->h2": np.full((1, 1), 1e100)}
    start = time.perf_counter()
    with pytest.raises(fr.IntegrationError, match="no starting step"):
        simulate(net, data, W, method="flow", t_end=1.0, divergence_threshold=math.inf,
                 max_steps=20_000, progress=False)
    assert time.perf_counter() - start < 5.0


def test_flow_on_a_short_time_scale_takes_the_same_steps():
    # data scaled by c: the flow is W(c² t), so t_end = 20 / c² is the same problem; the
    # step-size floor was absolute (3.6e-15) and failed it from c ~ 3e6 (t_end ~ 2e-12) on
    net, data, _ = case(16)
    W0 = fr.init.gaussian(net, std=2.0, seed=0)
    steps = []
    for c in (1.0, 1e8):
        scaled = fr.Dataset({k: v * c for k, v in data.inputs.items()},
                            {k: v * c for k, v in data.targets.items()},
                            node_gates=data.node_gates, edge_gates=data.edge_gates,
                            weights=data.weights)
        run = simulate(net, scaled, W0, method="flow", t_end=20.0 / c**2, rtol=1e-6, atol=1e-8,
                       svals=False, divergence_threshold=math.inf, progress=False)
        steps.append(int(run.step[-1]))
    assert steps[0] == steps[1]


def test_a_stiff_start_of_a_long_flow_is_integrated():
    # weights 1e3 relaxing to 0 with t_end = 1e9: the first steps are tiny against t_end, and
    # a step floor scaled by t_end (not by t) refused them as an underflow at t = 0
    net = fr.Network.chain([1, 1, 1])
    data = fr.Dataset({"h0": np.ones((1, 1))}, {"h2": np.zeros((1, 1))})
    W = {"h0->h1": np.array([[1e3]]), "h1->h2": np.array([[1e3]])}
    run = simulate(net, data, W, method="flow", t_end=1e9, n_records=5, svals=False,
                   progress=False)
    assert run.status == "complete" and run.loss[-1] < 1e-12


def test_a_flow_run_stopped_by_max_steps_stops_again_when_resumed(tmp_path):
    net = fr.Network.chain([3, 4, 2])
    rng = np.random.default_rng(0)
    data = fr.Dataset({"h0": rng.standard_normal((10, 3))}, {"h2": rng.standard_normal((10, 2))})
    W = fr.init.gaussian(net, std=0.3, seed=1)
    needed = int(simulate(net, data, W, method="flow", t_end=1.0, progress=False).step[-1])
    assert simulate(net, data, W, method="flow", t_end=1.0, max_steps=needed,
                    progress=False).status == "complete"
    path = tmp_path / "f.h5"
    with pytest.raises(fr.IntegrationError, match=f"took {needed - 1} steps"):
        simulate(net, data, W, method="flow", t_end=1.0, max_steps=needed - 1, out=path,
                 checkpoint_every=1, progress=False)
    # the last checkpoint is at the limit: the resumed run must not take one more step
    with pytest.raises(fr.IntegrationError, match=f"took {needed - 1} steps"):
        resume(path, net, data)
    assert store.run_status(path, "simulation").startswith("failed: IntegrationError")


@pytest.mark.parametrize("checkpoint_every", [None, 1])
def test_a_diverged_flow_step_keeps_no_row(tmp_path, checkpoint_every):
    # x->h from 1.85 to 1.9003 (> 1.9) in one step: the save times inside that step were
    # recorded, weights over the threshold included, before the step was checked; the runs
    # it stopped resume to what they give alone
    net, _ = _scalar_chain()
    data = fr.Dataset({"x": np.ones((1, 1))}, {"y": np.ones((1, 1))})
    inits = [{"x->h": np.array([[a]]), "h->y": np.array([[b]])}
             for a, b in ((0.1, 0.1), (1.85, 0.01))]
    kw = dict(method="flow", t_end=5.0, n_records=501, divergence_threshold=1.9,
              save_weights=True, progress=False)
    path = tmp_path / "f.h5"
    with pytest.raises(fr.DivergenceError) as info:
        simulate(net, data, inits, out=path, checkpoint_every=checkpoint_every, **kw)
    assert info.value.run == "seed_01" and info.value.edge == "x->h"
    rows = store.read_run(path, "seed_01").series
    assert len(rows["t"]) > 0 and rows["step"].max() < info.value.step
    assert np.abs(rows["weights/x->h"]).max() <= 1.9
    same_trajectory(resume(path, net, data, run="seed_00"), simulate(net, data, inits[0], **kw))


@pytest.mark.parametrize("checkpoint_every", [None, 1, 50])
def test_threshold_crossing_inside_a_chunk_is_divergence(tmp_path, checkpoint_every):
    # w: 0, 1.9, 0.19, 1.729, ...: over the threshold at step 1 and back under it at step 2;
    # the verdict must not depend on how the run is cut into engine calls
    net = fr.Network()
    net.add_node("x", 1).add_node("y", 1).add_edge("x", "y")
    data = fr.Dataset({"x": np.ones((1, 1))}, {"y": np.ones((1, 1))}, weights=[2.0])
    W = {"x->y": np.zeros((1, 1))}
    out = None if checkpoint_every is None else tmp_path / "d.h5"
    with pytest.raises(fr.DivergenceError, match="step 1") as info:
        fr.simulate(net, data, W, lr=0.95, steps=100, divergence_threshold=1.5,
                    save_weights=True, out=out, checkpoint_every=checkpoint_every)
    assert info.value.step == 1


def _scalar_chain() -> tuple[fr.Network, fr.Dataset]:
    net = fr.Network()
    net.add_node("x", 1).add_node("h", 1).add_node("y", 1)
    net.add_edge("x", "h").add_edge("h", "y")
    return net, fr.Dataset({"x": np.ones((1, 1))}, {"y": np.ones((1, 1))})


# w_x->h = w_h->y = 3 at lr = 1: the loss is 32, 96800, 3.6e15, 1.9e47, 2.7e142 at steps 0-4
# and overflows to inf at step 5, while the weights stay finite (~1e107 at step 5)
EXPLODING = {"x->h": np.array([[3.0]]), "h->y": np.array([[3.0]])}


def test_a_loss_that_overflows_at_the_last_step_is_a_divergence(tmp_path):
    # the engine computes each step's loss before the step; the loss at the end is computed
    # apart, and a run whose final loss is inf must not end "complete"
    net, data = _scalar_chain()
    for engine in ("moments", "samples"):
        with pytest.raises(fr.DivergenceError, match="step 5") as info:
            simulate(net, data, EXPLODING, lr=1.0, steps=5, divergence_threshold=math.inf,
                     engine=engine, progress=False)
        assert info.value.step == 5 and info.value.quantity == "loss"
        assert info.value.value == math.inf
    path = tmp_path / "f.h5"
    with pytest.raises(fr.DivergenceError):
        simulate(net, data, EXPLODING, lr=1.0, steps=5, divergence_threshold=math.inf,
                 out=path, progress=False)
    assert store.run_status(path, "simulation").startswith("failed: diverged at step 5")
    assert store.read_run(path, "simulation").series["step"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("checkpoint_every", [None, 1, 5])
def test_the_row_of_a_diverged_step_is_never_kept(tmp_path, checkpoint_every):
    # the loss at step 5 is inf: rows 0-4 are kept, whether step 5 starts an engine call (a
    # checkpoint cuts the run there) or falls inside one
    net, data = _scalar_chain()
    path = tmp_path / "f.h5"
    with pytest.raises(fr.DivergenceError, match="step 5"):
        simulate(net, data, EXPLODING, lr=1.0, steps=10, divergence_threshold=math.inf,
                 out=path, checkpoint_every=checkpoint_every, progress=False)
    rows = store.read_run(path, "simulation").series
    assert rows["step"].tolist() == [0, 1, 2, 3, 4]
    assert np.all(np.isfinite(rows["loss"]))


@pytest.mark.parametrize("method, kw", [("gd", dict(lr=1e-3, steps=10)),
                                        ("flow", dict(t_end=0.01))])
def test_starting_weights_above_the_threshold_diverge_at_step_0(tmp_path, method, kw):
    net = fr.Network()
    net.add_node("x", 1).add_node("y", 1).add_edge("x", "y")
    data = fr.Dataset({"x": np.ones((1, 1))}, {"y": np.ones((1, 1))})
    with pytest.raises(fr.DivergenceError, match="step 0") as info:
        simulate(net, data, {"x->y": np.array([[5.0]])}, method=method,
                 divergence_threshold=2.0, out=tmp_path / "f.h5", progress=False, **kw)
    assert info.value.step == 0 and info.value.value == 5.0
    assert store.run_status(tmp_path / "f.h5", "simulation").startswith("failed: diverged")


@pytest.mark.parametrize("method, kw", [("gd", dict(lr=1e-3, steps=10)),
                                        ("flow", dict(t_end=0.01))])
def test_a_run_stopped_at_the_start_by_another_can_be_resumed(tmp_path, method, kw):
    # flow checked the starting weights before the first checkpoints: the run the divergence
    # stopped had none and resume refused it ("start it again"); descent checkpoints first
    net = fr.Network()
    net.add_node("x", 1).add_node("y", 1).add_edge("x", "y")
    data = fr.Dataset({"x": np.ones((1, 1))}, {"y": np.ones((1, 1))})
    inits = [{"x->y": np.array([[0.5]])}, {"x->y": np.array([[5.0]])}]
    path = tmp_path / "f.h5"
    with pytest.raises(fr.DivergenceError, match="seed_01"):
        simulate(net, data, inits, method=method, divergence_threshold=2.0, out=path,
                 progress=False, **kw)
    assert store.run_status(path, "seed_00").startswith("failed: stopped")
    same_trajectory(resume(path, net, data, run="seed_00"),
                    simulate(net, data, inits[0], method=method, divergence_threshold=2.0,
                             progress=False, **kw))


@pytest.mark.parametrize("method, kw", [("gd", dict(lr=1e-3, steps=10)),
                                        ("flow", dict(t_end=0.01))])
def test_a_start_whose_loss_overflows_diverges_at_step_0(method, kw):
    # finite weights (no threshold) whose loss is inf: a divergence, not an integrator failure
    net = fr.Network()
    net.add_node("x", 1).add_node("y", 1).add_edge("x", "y")
    data = fr.Dataset({"x": np.ones((1, 1))}, {"y": np.ones((1, 1))})
    with pytest.raises(fr.DivergenceError, match="step 0") as info:
        simulate(net, data, {"x->y": np.array([[1e200]])}, method=method,
                 divergence_threshold=math.inf, progress=False, **kw)
    assert info.value.quantity == "loss"


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10**7), st.integers(2, 3000))
def test_log_steps_are_n_records_distinct_steps(steps, n_records):
    """record="log" for gradient descent: min(n_records, steps + 1) distinct steps from 0 to
    steps (rounding used to merge up to half of them); where plain log spacing keeps its points
    apart it is unchanged."""
    from fastrace.simulate import _step_schedule

    points = _step_schedule("log", 1, n_records, steps)
    n = min(n_records, steps + 1)
    assert len(points) == n and points[0] == 0 and points[-1] == steps
    assert np.all(np.diff(points) > 0)
    plain = np.unique(np.rint(np.geomspace(1, steps, n - 1)).astype(np.int64)) if n > 2 \
        else np.array([steps])
    if len(plain) == n - 1:
        np.testing.assert_array_equal(points[1:], plain)
    # spacing grows (log spacing, steps of 1 first): a gap is never much below the one before
    gaps = np.diff(points[1:])
    assert np.all(gaps[1:] >= gaps[:-1] - 1)


@pytest.mark.parametrize("n_records", [2, 3, 5])
def test_log_schedules_have_n_records_points(n_records):
    net, data, W0 = case(0)
    run = simulate(net, data, W0, lr=0.01, steps=1000, record="log", n_records=n_records,
                   svals=False, progress=False)
    assert run.step[0] == 0 and run.step[-1] == 1000 and len(run.step) == n_records
    flow = simulate(net, data, W0, method="flow", t_end=1.0, record="log", n_records=n_records,
                    svals=False, progress=False)
    assert flow.t[0] == 0 and flow.t[-1] == 1.0 and len(flow.t) == n_records


# ------------------------------------------------------------------ runs kept in their file only
def test_a_run_kept_in_its_file_only_equals_the_in_memory_run(tmp_path):
    net, data, _ = case(31)
    inits = [fr.init.gaussian(net, std=0.5, seed=s) for s in range(2)]
    q = {"norm": lambda w: np.array([sum(float(np.sum(a * a)) for a in w.values())])}
    for kw in (dict(lr=[0.05, 0.02], steps=40, record_every=3, momentum=0.5),
               dict(method="flow", lr=0.05, steps=40, record_every=4)):
        memory = simulate(net, data, inits, save_weights=True, quantities=q, progress=False,
                          **kw)
        path = tmp_path / f"{kw.get('method', 'gd')}.h5"
        stored = simulate(net, data, inits, save_weights=True, quantities=q, progress=False,
                          out=path, in_memory=False, **kw)
        again = resume(path, net, data, in_memory=False, quantities=q)  # complete: read back
        for a, b, c in zip(memory, stored, again):
            assert all(isinstance(s, store.StoredSeries) for s in b.snapshots.values())
            same_trajectory(b, a)  # (np.asarray reads every row of a StoredSeries)
            same_trajectory(c, a)
            for i in (0, 5, -1):
                for e, w in b.weights(i).items():
                    np.testing.assert_array_equal(w, a.weights(i)[e])
            assert b.status == "complete" and b.attrs == a.attrs


def test_a_trajectory_read_from_an_unfinished_run_has_series_of_one_length(tmp_path):
    # a run read while it is written: its series are read one after another while rows come
    # in (a reader saw t and loss differ by 50 rows); the trajectory holds the rows all have
    net = fr.Network()
    net.add_node("x", 4).add_node("h", 3).add_edge("x", "h")
    spec = store.RunSpec({"t": (), "step": ((), np.int64), "loss": (), "weights/x->h": (3, 4)},
                         attrs={"kind": "simulation"})
    path = tmp_path / "f.h5"
    with store.TrajectoryWriter(path, {"simulation": spec}, network_json=net.to_json()) as w:
        w.append("simulation", {"t": np.arange(12.0), "step": np.arange(12),
                                "loss": np.ones(10), "weights/x->h": np.zeros((11, 3, 4))})
        w.set_status("simulation", "failed: killed")
    for in_file in (False, True):
        traj = SIM._load_trajectory(path, "simulation", weights_in_file=in_file)
        assert len(traj.t) == len(traj.step) == len(traj.loss) == 10
        assert len(traj.snapshots["x->h"]) == 10 and np.asarray(traj.snapshots["x->h"]).shape[0] == 10


def test_a_run_that_is_not_a_simulation_is_not_read_as_one(tmp_path):
    path = tmp_path / "f.h5"
    with store.TrajectoryWriter(path, {"theory": store.RunSpec({"t": ()}, attrs={"kind": "theory"})}) as w:
        w.append("theory", {"t": np.arange(3.0)})
    with pytest.raises(fr.StoreError, match="not a simulation run"):
        Trajectory.from_hdf5(path, "theory")


def test_a_run_kept_in_its_file_only_holds_few_rows_in_memory(tmp_path, monkeypatch):
    import tracemalloc

    simulate_module = sys.modules[simulate.__module__]
    monkeypatch.setattr(simulate_module, "SNAPSHOT_BYTES", 2 << 20)
    monkeypatch.setattr(store, "_QUEUE_BYTES", 8 << 20)
    task = fr.tasks.routing(M=7, K=4, hidden=64)
    W0 = fr.init.orthogonal(task.network, gain=0.2, seed=0)
    kw = dict(lr=0.02, steps=1500, record_every=1, save_weights=True, svals=False,
              progress=False)
    rows = 1501 * sum(a.size for a in W0.values()) * 8  # 76 MB of weight snapshots
    peaks = {}
    for in_memory in (True, False):
        tracemalloc.start()
        try:
            simulate(task.network, task.data, W0, out=tmp_path / f"{in_memory}.h5",
                     in_memory=in_memory, **kw)
            peaks[in_memory] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[True] > rows  # every row in memory ...
    assert peaks[False] < rows / 4  # ... or only those on their way to the file


def test_rows_that_would_not_fit_in_memory_are_refused_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(_memory, "available_memory", lambda: 100_000)  # 100 kB free
    monkeypatch.setattr(_memory, "ROOM_CHECK_BYTES", 0)  # (small runs skip the check)
    net, data, W0 = case(32)
    kw = dict(lr=0.05, steps=2000, record_every=1, save_weights=True, progress=False)
    path = tmp_path / "big.h5"
    with pytest.raises(fr.ConfigError, match="in_memory=False"):
        simulate(net, data, W0, out=path, **kw)
    assert not path.exists()  # refused before anything was written
    with pytest.raises(fr.ConfigError, match="out=<file.h5> and in_memory=False"):
        simulate(net, data, W0, **kw)
    run = simulate(net, data, W0, out=path, in_memory=False, **kw)  # the way out
    assert run.status == "complete" and len(run.snapshots[net.edges[0]]) == 2001
    with pytest.raises(fr.ConfigError, match="needs out="):
        simulate(net, data, W0, in_memory=False, **kw)
    # resume reads every row back at the end: refused before it computes, unless in_memory=False
    with pytest.raises(fr.ConfigError, match="in_memory=False"):
        resume(path, net, data)
    again = resume(path, net, data, in_memory=False)
    np.testing.assert_array_equal(again.weights(-1)[net.edges[0]], run.weights(-1)[net.edges[0]])
    monkeypatch.undo()
    assert _memory.available_memory() > 0  # (this machine's own figure is read)
    # rows under ROOM_CHECK_BYTES are not checked (reading the figures costs ~25 µs)
    monkeypatch.setattr(_memory, "available_memory", lambda: 0)
    simulate(net, data, W0, lr=0.05, steps=20, save_weights=True, progress=False)


def test_a_trajectory_kept_in_its_file_refuses_a_file_written_anew(tmp_path, monkeypatch):
    net, data, W0 = case(33)
    path = tmp_path / "again.h5"
    kw = dict(lr=0.05, steps=20, record_every=2, save_weights=True, progress=False,
              in_memory=False)
    monkeypatch.chdir(tmp_path)
    first = simulate(net, data, W0, out="again.h5", **kw)  # a relative path
    monkeypatch.chdir(tmp_path.parent)  # still read from where it was written
    w = first.weights(3)
    simulate(net, data, fr.init.gaussian(net, std=0.5, seed=9), out=path, **kw)
    with pytest.raises(fr.StoreError, match="no longer the file"):
        first.weights(3)  # the rows of another run are not returned as its own
    assert w[net.edges[0]].shape == net.weight_shape(net.edges[0])


def test_no_weight_snapshots_are_taken_when_no_row_needs_them(monkeypatch):
    # t and loss alone need no weights: the engine copies none (a 20000-step run recording every
    # step took 1007 ms with the copies, 667 ms without); with singular values it takes them
    simulate_module = sys.modules[simulate.__module__]
    net, data, W0 = case(34)
    taken = []
    descend = simulate_module.GradientEngine.descend

    def spy(self, *args, **kwargs):
        taken.append(kwargs.get("snapshots") is not None)
        return descend(self, *args, **kwargs)

    monkeypatch.setattr(simulate_module.GradientEngine, "descend", spy)
    plain = simulate(net, data, W0, lr=0.05, steps=30, svals=False, progress=False)
    assert taken and not any(taken)
    taken.clear()
    full = simulate(net, data, W0, lr=0.05, steps=30, progress=False)
    assert all(taken)
    np.testing.assert_array_equal(plain.loss, full.loss)
    np.testing.assert_array_equal(plain.t, full.t)


# ------------------------------------------------------------------ input checks of recording
def test_a_saved_index_must_be_an_integer(tmp_path):
    net, data, W0 = case(3)
    for kw in ({}, {"out": tmp_path / "r.h5", "in_memory": False}):
        run = simulate(net, data, W0, lr=0.01, steps=3, save_weights=True, progress=False, **kw)
        assert all(w.ndim == 2 for w in run.weights(np.int64(-1)).values())
        for bad in (True, np.array([1]), np.array(1), slice(0, 2), [0, 1], None, 1.0):
            with pytest.raises(fr.ConfigError, match="saved index must be an integer"):
                run.weights(bad)


@pytest.mark.parametrize("value", [None, [None, 1.0], np.array([1 + 2j]), 10**400, "1.5"])
def test_a_quantity_must_return_real_numbers(value):
    net, data, W0 = case(3)
    with pytest.raises(fr.ConfigError, match="must return real numbers"):
        simulate(net, data, W0, lr=0.01, steps=3, quantities={"q": lambda w: value},
                 progress=False)


@pytest.mark.parametrize("record", [np.arange(11) % 5 == 0, True, ["3", "7"], np.array([2 + 5j]),
                                    [1, None]])
def test_save_points_must_be_numbers(record):
    net, data, W0 = case(3)
    with pytest.raises(fr.ConfigError, match="save points must be integer steps or real times"):
        simulate(net, data, W0, lr=0.01, steps=10, record=record, progress=False)


@pytest.mark.parametrize("kw, match", [
    (dict(record="log", record_every=7), "record_every is for the default schedule"),
    (dict(record=[3], record_every=7), "record_every is for the default schedule"),
    (dict(n_records=5), "n_records is for record='log'"),
    (dict(record=[3], n_records=5), "n_records is for record='log'"),
    (dict(svals="no"), "svals must be True or False"),
    (dict(save_weights="False"), "save_weights must be True or False"),
    (dict(in_memory=None), "in_memory must be True or False"),
    (dict(steps=2**63), "steps must be at most 2\\*\\*53"),
    (dict(save_weights=True, weights_dtype="float32", divergence_threshold=math.inf),
     "float32"),
])
def test_settings_that_would_be_ignored_or_misread_are_refused(kw, match):
    net, data, W0 = case(3)
    settings_ = dict(lr=0.01, steps=10, progress=False)
    settings_.update(kw)
    with pytest.raises(fr.ConfigError, match=match):
        simulate(net, data, W0, **settings_)


def test_a_flow_save_time_at_a_rounded_end_is_the_end():
    net, data, W0 = case(3)
    lr, steps = 0.0087, 100  # lr * steps = 0.8699999999999999
    assert lr * steps != 0.87
    run = simulate(net, data, W0, method="flow", lr=lr, steps=steps, record=[0.5, 0.87],
                   svals=False, progress=False)
    np.testing.assert_array_equal(run.t, [0.0, 0.5, lr * steps])
    with pytest.raises(fr.ConfigError, match="must lie in"):
        simulate(net, data, W0, method="flow", lr=lr, steps=steps, record=[0.871],
                 svals=False, progress=False)


# ------------------------------------------------------------------ batches
def test_an_error_in_one_run_of_a_batch_names_the_run():
    net, data, W0 = case(3)
    edge = net.edges[0]
    bad = [dict(W0, **{edge: W0[edge].T.copy() if W0[edge].shape[0] != W0[edge].shape[1]
                       else np.full_like(W0[edge], np.nan)}),
           {e: w for e, w in W0.items() if e != edge}]
    for broken in bad:
        with pytest.raises(fr.WeightsError, match=r"run 2 \('c'\)"):
            simulate(net, data, [W0, W0, broken], lr=0.01, steps=2, run_names=["a", "b", "c"],
                     progress=False)


def test_run_names_of_a_batch_are_checked():
    net, data, W0 = case(3)
    with pytest.raises(fr.ConfigError, match="run_name is for one run"):
        simulate(net, data, [W0, W0], lr=0.01, steps=2, run_name="sweep", progress=False)
    with pytest.raises(fr.ConfigError, match="run_names must be a list"):
        simulate(net, data, [W0, W0], lr=0.01, steps=2, run_names="ab", progress=False)
    assert simulate(net, data, W0, lr=0.01, steps=2, progress=False).run == "simulation"


def test_a_batch_too_big_for_memory_is_refused_before_it_starts(monkeypatch):
    net, data, W0 = case(3)
    monkeypatch.setattr(_memory, "ROOM_CHECK_BYTES", 0)
    monkeypatch.setattr(_memory, "available_memory", lambda: 10_000)
    with pytest.raises(fr.ConfigError, match="1000 runs need .* split the batch"):
        simulate(net, data, [W0] * 1000, lr=0.01, steps=2, svals=False, progress=False)


def test_concurrent_calls_do_not_abort_numbas_workqueue_layer():
    """numba's fallback threading layer aborts the process when two threads enter parallel
    regions at once; the engines take turns there."""
    script = """
import threading, numpy as np, fastrace as fr
task = fr.tasks.routing(M=16, K=4, hidden=512)
inits = [fr.init.orthogonal(task.network, 0.2, seed=s) for s in range(2)]
errors = []
def work(i):
    try:
        fr.simulate(task.network, task.data, inits[i], lr=0.01, steps=5, svals=False,
                    threads=2, progress=False)
        fr.simulate(task.network, task.data, inits, lr=0.01, steps=5, svals=False, threads=2,
                    progress=False)
    except Exception as exc:
        errors.append(exc)
threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
import numba
print(numba.threading_layer(), errors)
"""
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["workqueue", "[]"]
