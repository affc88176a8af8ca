"""Full-network gradient descent: fastrace against PyTorch (CPU) and hand-written numpy.

Run: ``python -m pytest bench/bench_simulate.py --benchmark-only`` (PyTorch is a benchmark
extra; its cases are skipped when it is not installed). Every case does the same work (float64,
full batch, the same learning rate and number of steps); the summary at the end prints medians
and ratios to fastrace within each group.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastrace as fr
from fastrace.engine import GradientEngine

STEPS = 500
LR = 0.02


def routing_task(M=7, K=4, hidden=64):
    return fr.tasks.routing(M=M, K=K, hidden=hidden)


def run_fastrace(task, weights, steps, lr=LR, threads=None):
    run = fr.simulate(task.network, task.data, weights, lr=lr, steps=steps, record_every=steps,
                      svals=False, threads=threads)
    return run


# ------------------------------------------------------------------ competitors
def torch_setup(task, weights, threads):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(threads)
    M = task.M
    t = {e: torch.tensor(w, dtype=torch.float64) for e, w in weights.items()}
    W_in = torch.stack([t[f"in_{i}->h1"] for i in range(M)]).requires_grad_()
    W_h = t["h1->h2"].clone().requires_grad_()
    W_out = torch.stack([t[f"h2->out_{j}"] for j in range(M)]).requires_grad_()
    pairs = task.sample_pairs
    I = torch.tensor(pairs[:, 0])
    J = torch.tensor(pairs[:, 1])
    X = torch.tensor(task.items, dtype=torch.float64)
    Y = torch.tensor(task.targets, dtype=torch.float64)
    return torch, (W_in, W_h, W_out), I, J, X, Y


def torch_stacked(task, weights, steps, lr=LR, threads=1):
    """All pathways stacked into a few large products, autograd, torch.optim.SGD.

    One thread is PyTorch's fastest setting for the small routing network here: with two its
    OpenMP workers made the same 500 steps over 100x slower on this 2-core machine.
    """
    torch, params, I, J, X, Y = torch_setup(task, weights, threads)
    W_in, W_h, W_out = params
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        h2 = W_h @ (W_in @ X)                         # (M, H, items): one pass per input domain
        out = torch.bmm(W_out[J], h2[I])              # trained pairs only
        loss = ((out - Y) ** 2).mean(dim=(1, 2)).sum()
        loss.backward()
        opt.step()
    return float(loss)


def torch_loop(task, weights, steps, lr=LR, threads=1):
    """The per-pathway loop a user would write."""
    torch, params, I, J, X, Y = torch_setup(task, weights, threads)
    W_in = [torch.nn.Parameter(w.detach().clone()) for w in params[0]]
    W_h = torch.nn.Parameter(params[1].detach().clone())
    W_out = [torch.nn.Parameter(w.detach().clone()) for w in params[2]]
    opt = torch.optim.SGD([*W_in, W_h, *W_out], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for i, j in task.sample_pairs:
            loss = loss + ((W_out[j] @ (W_h @ (W_in[i] @ X)) - Y) ** 2).mean()
        loss.backward()
        opt.step()
    return float(loss)


def numpy_handwritten(task, weights, steps, lr=LR):
    """Hand-derived gradients of the paper's loss, stacked per input domain, plain numpy."""
    M = task.M
    W_in = np.stack([weights[f"in_{i}->h1"] for i in range(M)])
    W_h = weights["h1->h2"].copy()
    W_out = np.stack([weights[f"h2->out_{j}"] for j in range(M)])
    I, J = task.sample_pairs[:, 0], task.sample_pairs[:, 1]
    X, Y = task.items, task.targets
    scale = 2.0 / Y.size
    for _ in range(steps):
        h1 = W_in @ X                                  # (M, H, n)
        h2 = W_h @ h1                                  # (M, H, n)
        err = scale * (W_out[J] @ h2[I] - Y)           # (pairs, out, n) dL/d(out)
        g_out = np.zeros_like(W_out)
        np.add.at(g_out, J, err @ h2[I].transpose(0, 2, 1))
        d_h2 = np.zeros_like(h2)
        np.add.at(d_h2, I, W_out[J].transpose(0, 2, 1) @ err)
        g_h = np.einsum("mhn,mkn->hk", d_h2, h1)
        d_h1 = W_h.T @ d_h2
        g_in = d_h1 @ X.T
        W_in -= lr * g_in
        W_h -= lr * g_h
        W_out -= lr * g_out
    return W_in, W_h, W_out


# ------------------------------------------------------------------ routing network, 500 steps
@pytest.fixture(scope="module")
def routing():
    task = routing_task()
    weights = fr.init.orthogonal(task.network, gain=0.2, seed=0)
    run_fastrace(task, weights, 2)  # compile / load the numba cache outside the timing
    return task, weights


def test_routing_agree(routing):
    """The competitors compute the same descent (checked once, outside the timings)."""
    task, weights = routing
    ours = run_fastrace(task, weights, 50)
    W_in, W_h, W_out = numpy_handwritten(task, weights, 50)
    assert np.allclose(ours.final_weights["h1->h2"], W_h, rtol=1e-10, atol=1e-13)


@pytest.mark.benchmark(group="routing M=7 H=64, 500 steps")
def test_routing_fastrace(benchmark, routing):
    task, weights = routing
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(run_fastrace, args=(task, weights, STEPS), rounds=7, warmup_rounds=1)


@pytest.mark.benchmark(group="routing M=7 H=64, 500 steps")
def test_routing_torch_stacked(benchmark, routing):
    task, weights = routing
    benchmark.pedantic(torch_stacked, args=(task, weights, STEPS), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="routing M=7 H=64, 500 steps")
def test_routing_torch_loop(benchmark, routing):
    task, weights = routing
    benchmark.pedantic(torch_loop, args=(task, weights, STEPS), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="routing M=7 H=64, 500 steps")
def test_routing_numpy_handwritten(benchmark, routing):
    task, weights = routing
    benchmark.pedantic(numpy_handwritten, args=(task, weights, STEPS), rounds=5, warmup_rounds=1)


# ------------------------------------------------------------------ width scaling
WIDTH_STEPS = 10


def gemm_rate(threads=2, n=1024):
    """This machine's float64 GEMM rate (FLOP/s), median of 5, at the given thread count."""
    a, b = np.random.rand(n, n), np.random.rand(n, n)
    times = []
    with threadpool_limits(threads):
        a @ b
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(times))


def plan_flops(task):
    """Floating-point operations of one fastrace step: the products the plan actually does."""
    return GradientEngine(task.network, task.data, "moments").plan.flops


def same_shape_gemm_time(task, threads=2, repeats=3):
    """Seconds BLAS alone needs (numpy, median of ``repeats``) for the very products one step
    of the plan does, with their shapes and transpositions: the floor for that work."""
    products = GradientEngine(task.network, task.data, "moments").plan.products()
    rng = np.random.default_rng(0)
    total = 0.0
    with threadpool_limits(threads):
        for m, n, k, ta, tb in products:
            a = rng.random((k, m)).T if ta else rng.random((m, k))
            b = rng.random((n, k)).T if tb else rng.random((k, n))
            c = np.empty((m, n))
            np.dot(a, b, out=c)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                np.dot(a, b, out=c)
                times.append(time.perf_counter() - t)
            total += float(np.median(times))
    return total


@pytest.fixture(scope="module", params=[512, 2048])
def wide(request):
    task = routing_task(M=16, K=4, hidden=request.param)
    weights = fr.init.orthogonal(task.network, gain=0.2, seed=0)
    run_fastrace(task, weights, 1)
    return task, weights


@pytest.mark.benchmark(group="width scaling M=16, 10 steps")
def test_width_fastrace(benchmark, wide):
    benchmark.group = f"width scaling M=16 H={wide[0].hidden}, 10 steps"
    task, weights = wide
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["hidden"] = task.hidden
    result = benchmark.pedantic(run_fastrace, args=(task, weights, WIDTH_STEPS), rounds=3)
    del result
    flops = plan_flops(task) * WIDTH_STEPS
    rate = gemm_rate(2)
    achieved = flops / benchmark.stats.stats.median
    benchmark.extra_info["GFLOP/s"] = round(achieved / 1e9, 1)
    benchmark.extra_info["square GEMM GFLOP/s"] = round(rate / 1e9, 1)
    benchmark.extra_info["square GEMM rate / achieved"] = round(rate / achieved, 2)
    floor = same_shape_gemm_time(task) * WIDTH_STEPS
    benchmark.extra_info["time / same-shape BLAS time"] = round(
        benchmark.stats.stats.median / floor, 2)


@pytest.mark.benchmark(group="width scaling M=16, 10 steps")
def test_width_torch_stacked(benchmark, wide):
    benchmark.group = f"width scaling M=16 H={wide[0].hidden}, 10 steps"
    task, weights = wide
    benchmark.extra_info["hidden"] = task.hidden
    benchmark.pedantic(torch_stacked, args=(task, weights, WIDTH_STEPS), kwargs={"threads": 2},
                       rounds=3, warmup_rounds=1)


# ------------------------------------------------------------------ data scaling (moments engine)
def many_samples(P, seed=0):
    """The routing network with P random samples spread over its 28 trained-pair contexts."""
    task = routing_task()
    rng = np.random.default_rng(seed)
    base = task.data
    pick = rng.integers(0, base.n_samples, P)
    noise = 0.1 * rng.standard_normal((P, 4))
    inputs = {u: x[pick] + noise * (base.node_gates[u][pick, None]) for u, x in base.inputs.items()}
    targets = {w: y[pick] for w, y in base.targets.items()}
    gates = {v: g[pick] for v, g in base.node_gates.items()}
    return task, fr.Dataset(inputs, targets, node_gates=gates, weights=np.full(P, 28.0 / (14 * P)))


@pytest.fixture(scope="module", params=[10 ** 2, 10 ** 4, 10 ** 6])
def sampled(request):
    task, data = many_samples(request.param)
    start = time.perf_counter()
    engine = GradientEngine(task.network, data, "moments")
    setup = time.perf_counter() - start
    weights = fr.init.orthogonal(task.network, gain=0.2, seed=0)
    return engine, engine.pack(weights), request.param, setup


@pytest.mark.benchmark(group="data scaling: 100 steps, moments engine")
def test_data_scaling(benchmark, sampled):
    engine, w0, P, setup = sampled
    benchmark.extra_info["P"] = P
    benchmark.extra_info["one-off moments (s)"] = round(setup, 3)
    if P == 10 ** 2:
        benchmark.extra_info["baseline"] = True

    def run():
        w = w0[None].copy()
        engine.descend(w, np.zeros_like(w), np.array([LR]), 100)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


# ------------------------------------------------------------------ batch of 64 runs, threads
@pytest.fixture(scope="module")
def batch():
    task = routing_task()
    scales = np.repeat([0.05, 0.1, 0.2, 0.4], 16)
    weights = [fr.init.orthogonal(task.network, gain=g, seed=i) for i, g in enumerate(scales)]
    run_fastrace(task, weights[:2], 2, threads=2)
    return task, weights


@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.benchmark(group="batch of 64 routing runs, 500 steps")
def test_batch_threads(benchmark, batch, threads):
    task, weights = batch
    benchmark.extra_info["threads"] = threads
    if threads == 2:
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(run_fastrace, args=(task, weights, STEPS), kwargs={"threads": threads},
                       rounds=3, warmup_rounds=1)


# ------------------------------------------------------------------ HDF5 streaming overhead
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.benchmark(group="HDF5: routing 500 steps, weights every step")
def test_hdf5_overhead(benchmark, routing, tmp_path, stream):
    task, weights = routing
    benchmark.extra_info["streaming"] = stream
    if not stream:
        benchmark.extra_info["baseline"] = True
    counter = iter(range(100))

    def run():
        out = tmp_path / f"run{next(counter)}.h5" if stream else None
        fr.simulate(task.network, task.data, weights, lr=LR, steps=STEPS, record_every=1,
                    save_weights=True, out=out)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
