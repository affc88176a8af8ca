"""Full-network gradient descent: fastrace against PyTorch (CPU) and hand-written numpy.

Run: ``python -m pytest bench/bench_simulate.py --benchmark-only`` (PyTorch is a benchmark
extra; its cases are skipped when it is not installed). Every case does the same work (float64,
full batch, the same learning rate and number of steps); the summary at the end prints medians
and ratios to fastrace within each group.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

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
# The machine references (square-GEMM rate, same-shape floor) are the fastest of many passes:
# on a shared machine noise only ever adds time (another tenant holding a core stalls both
# BLAS threads), so the fastest pass is the best estimate of what the hardware needs, and a
# floor must be a time actually achieved. Spells of load here last seconds, so the passes are
# taken in short bursts before every timed round of the width tests, not all at once. After a
# burst the timed call waits QUIET seconds: numpy's BLAS threads spin for a while after a
# product and would take a core from the plan's (scipy's) BLAS threads, which made a 10-step
# call at H = 512 take 33-97 ms instead of 16. A 1-step call then wakes the plan's BLAS
# threads, so that the timed call finds them as in back-to-back calls (waking them after the
# pause costs about 1 ms).
WIDTH_STEPS = 10
LONG_STEPS = 50  # long enough that a call's fixed cost is a few per cent of it
BURST = 5  # passes of a reference per burst
QUIET = 0.3


class Fastest:
    """The fastest pass of ``fn`` seen so far, ``fn`` run with BLAS at ``threads`` threads."""

    def __init__(self, fn, threads=2):
        self.fn, self.threads, self.best = fn, threads, math.inf
        self.sample()  # (its first pass also warms up)

    def sample(self, passes=BURST):
        with threadpool_limits(self.threads):
            for _ in range(passes):
                start = time.perf_counter()
                self.fn()
                self.best = min(self.best, time.perf_counter() - start)


def square_gemm(n=1024, threads=2):
    """Square n x n float64 products (numpy's BLAS) and their flops: the rate is flops / best."""
    a, b = np.random.rand(n, n), np.random.rand(n, n)
    c = np.empty((n, n))
    return Fastest(lambda: np.dot(a, b, out=c), threads), 2.0 * n ** 3


def gemm_rate(threads=2, n=1024, passes=20):
    """This machine's float64 GEMM rate (FLOP/s) on square n x n operands (fastest pass)."""
    ref, flops = square_gemm(n, threads)
    ref.sample(passes)
    return flops / ref.best


def plan_flops(task):
    """Floating-point operations of one fastrace step: the products the plan actually does."""
    return GradientEngine(task.network, task.data, "moments").plan.flops


def call_flops(task, steps):
    """Floating-point operations of a ``run_fastrace`` call of ``steps`` steps: the steps and
    the loss at the final weights (the forward products alone)."""
    plan = GradientEngine(task.network, task.data, "moments").plan
    loss = plan.loss_i[plan.loss_i[:, 0] <= 3]
    return steps * plan.flops + 2.0 * float(np.sum(loss[:, 1] * loss[:, 2] * loss[:, 3]))


def same_shape_products(task, threads=2):
    """The matrix products of one step of the plan, for BLAS alone: the plan's own product rows
    (shapes, transpositions, leading dimensions, products merged as the plan merges them)
    without its other operations (copies, output loops, loss, divergence check), run back to
    back by the plan's executor on the BLAS the plan calls (scipy's), with no Python between
    the calls. Its fastest pass is a floor for that work. (Issued from numpy, the same
    products took 5-20 % longer here: a Python call per product, on numpy's own OpenBLAS
    build; the plan's whole step beat that.)"""
    from fastrace._kernels import plan as kernels

    plan = GradientEngine(task.network, task.data, "moments").plan
    products = plan.step_i[:, 0] <= 3
    ops_i = np.ascontiguousarray(plan.step_i[products])
    ops_f = np.ascontiguousarray(plan.step_f[products])
    rng = np.random.default_rng(0)
    state, weights = rng.random(plan.state_size), rng.random(plan.n_params)
    fn, scratch = kernels.dgemm_pointer(), kernels._scratch()

    def one_step():
        # lr scales alpha of the update products: not 0, or BLAS would skip their work
        kernels.execute(fn, ops_i, ops_f, plan.const, state, weights, 1e-12, False, *scratch,
                        kernels.WHOLE)

    return Fastest(one_step, threads)


def same_shape_gemm_time(task, threads=2, passes=20):
    """Seconds BLAS alone needs for one step's products (``same_shape_products``)."""
    ref = same_shape_products(task, threads)
    ref.sample(passes)
    return ref.best


@pytest.fixture(scope="module", params=[512, 2048])
def wide(request):
    task = routing_task(M=16, K=4, hidden=request.param)
    weights = fr.init.orthogonal(task.network, gain=0.2, seed=0)
    run_fastrace(task, weights, 1)
    return task, weights


@pytest.fixture(scope="module")
def square():
    return square_gemm()


@pytest.fixture(scope="module")
def floor(wide):
    return same_shape_products(wide[0])


@pytest.mark.benchmark(group="width scaling M=16, 10 steps")
def test_width_fastrace(benchmark, wide, square, floor):
    """One short call, as the issue states it: 10 steps, setup and the final loss included."""
    benchmark.group = f"width scaling M=16 H={wide[0].hidden}, {WIDTH_STEPS} steps"
    task, weights = wide
    benchmark.extra_info["baseline"] = True
    benchmark.extra_info["hidden"] = task.hidden
    gemm, gemm_flops = square

    def setup():
        gemm.sample()
        floor.sample()
        time.sleep(QUIET)
        run_fastrace(task, weights, 1)

    benchmark.pedantic(run_fastrace, args=(task, weights, WIDTH_STEPS), setup=setup, rounds=5,
                       warmup_rounds=1)
    median = benchmark.stats.stats.median
    achieved, rate = call_flops(task, WIDTH_STEPS) / median, gemm_flops / gemm.best
    benchmark.extra_info["GFLOP/s"] = round(achieved / 1e9, 1)
    benchmark.extra_info["square GEMM GFLOP/s"] = round(rate / 1e9, 1)
    benchmark.extra_info["square GEMM rate / achieved"] = round(rate / achieved, 2)
    benchmark.extra_info["time / same-shape BLAS time"] = round(
        median / (floor.best * WIDTH_STEPS), 2)


@pytest.mark.benchmark(group="width scaling M=16, 10 steps")
def test_width_torch_stacked(benchmark, wide):
    benchmark.group = f"width scaling M=16 H={wide[0].hidden}, {WIDTH_STEPS} steps"
    task, weights = wide
    benchmark.extra_info["hidden"] = task.hidden
    benchmark.pedantic(torch_stacked, args=(task, weights, WIDTH_STEPS), kwargs={"threads": 2},
                       rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="width scaling M=16, long run")
def test_width_fastrace_long_run(benchmark, wide, square, floor):
    """What a long run sees: the cost of one more step (the difference between the fastest
    50-step and the fastest 10-step call, over 40 steps) as a rate, against the square-GEMM
    rate and the same-shape floor, and the fixed cost every call pays on top of its steps
    (packing and checking the weights, the loss at the final weights, the output). A 10-step
    call runs (untimed by pytest-benchmark) before every 50-step round, so that both see the
    same spells of load."""
    benchmark.group = f"width scaling M=16 H={wide[0].hidden}, {LONG_STEPS} steps"
    task, weights = wide
    benchmark.extra_info["hidden"] = task.hidden
    gemm, gemm_flops = square
    shorts = []

    def setup():
        gemm.sample()
        floor.sample()
        time.sleep(QUIET)
        run_fastrace(task, weights, 1)
        start = time.perf_counter()
        run_fastrace(task, weights, WIDTH_STEPS)
        shorts.append(time.perf_counter() - start)

    benchmark.pedantic(run_fastrace, args=(task, weights, LONG_STEPS), setup=setup, rounds=5,
                       warmup_rounds=1)
    long_best, short_best = benchmark.stats.stats.min, min(shorts)
    step = (long_best - short_best) / (LONG_STEPS - WIDTH_STEPS)
    flops, rate = plan_flops(task), gemm_flops / gemm.best
    benchmark.extra_info[f"{LONG_STEPS}-step GFLOP/s"] = round(
        call_flops(task, LONG_STEPS) / benchmark.stats.stats.median / 1e9, 1)
    benchmark.extra_info["per-step GFLOP/s"] = round(flops / step / 1e9, 1)
    benchmark.extra_info["square GEMM GFLOP/s"] = round(rate / 1e9, 1)
    benchmark.extra_info["square GEMM rate / per-step rate"] = round(rate * step / flops, 2)
    benchmark.extra_info["per-step time / same-shape BLAS time"] = round(step / floor.best, 2)
    benchmark.extra_info["same-shape BLAS ms/step"] = round(floor.best * 1e3, 2)
    benchmark.extra_info["fixed ms per call"] = round(
        (short_best - WIDTH_STEPS * step) * 1e3, 1)


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


# ------------------------------------------------------------------ samples engine, one run
SAMPLES_P, SAMPLES_STEPS, SAMPLES_M = 2000, 5, 8


@pytest.fixture(scope="module")
def per_sample_gates():
    """8 input nodes (64) -> h (256) -> y (64); each input open on a sample with probability
    1/2 (all 256 gate patterns occur: their open input columns, ~256 x 4 x 64, far outnumber
    the 2000 samples, so "auto" takes the samples engine)."""
    rng = np.random.default_rng(0)
    M, P = SAMPLES_M, SAMPLES_P
    net = fr.Network()
    for i in range(M):
        net.add_node(f"x{i}", 64)
    net.add_node("h", 256)
    net.add_node("y", 64)
    for i in range(M):
        net.add_edge(f"x{i}", "h")
    net.add_edge("h", "y")
    data = fr.Dataset({f"x{i}": rng.standard_normal((P, 64)) for i in range(M)},
                      {"y": rng.standard_normal((P, 64))},
                      node_gates={f"x{i}": (rng.random(P) < 0.5).astype(float)
                                  for i in range(M)})
    weights = fr.init.gaussian(net, 0.05, seed=1)
    assert GradientEngine.for_data(net, data).engine == "samples"
    return net, data, weights


def samples_fastrace(net, data, weights, threads):
    return fr.simulate(net, data, weights, lr=LR, steps=SAMPLES_STEPS, record_every=SAMPLES_STEPS,
                       svals=False, threads=threads).final_weights


def samples_numpy(net, data, weights):
    """Hand-written gradients, all samples at once, every gate as a mask (what a user writes),
    OpenBLAS on its own 2 threads."""
    M = SAMPLES_M
    X = np.stack([data.inputs[f"x{i}"] for i in range(M)])          # (M, P, 64)
    G = np.stack([data.node_gates[f"x{i}"] for i in range(M)])      # (M, P)
    W_in = np.stack([weights[f"x{i}->h"] for i in range(M)])        # (M, 256, 64)
    W_out = weights["h->y"].copy()
    Y, p = data.targets["y"], data.weights
    with threadpool_limits(2, user_api="blas"):
        for _ in range(SAMPLES_STEPS):
            parts = G[:, :, None] * (X @ W_in.transpose(0, 2, 1))   # (M, P, 256)
            h = parts.sum(axis=0)
            err = p[:, None] * (h @ W_out.T - Y)                    # dL/dy
            g_out = err.T @ h
            d_h = err @ W_out
            g_in = (G[:, :, None] * d_h).transpose(0, 2, 1) @ X     # (M, 256, 64)
            W_in -= LR * g_in
            W_out -= LR * g_out
    return W_in, W_out


def samples_torch(net, data, weights):
    """The same in PyTorch (autograd, gates as masks, SGD) on 2 threads."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    M = SAMPLES_M
    X = torch.tensor(np.stack([data.inputs[f"x{i}"] for i in range(M)]))
    G = torch.tensor(np.stack([data.node_gates[f"x{i}"] for i in range(M)]))[:, :, None]
    W_in = torch.tensor(np.stack([weights[f"x{i}->h"] for i in range(M)])).requires_grad_()
    W_out = torch.tensor(weights["h->y"]).requires_grad_()
    Y, p = torch.tensor(data.targets["y"]), torch.tensor(data.weights)[:, None]
    opt = torch.optim.SGD([W_in, W_out], lr=LR)
    for _ in range(SAMPLES_STEPS):
        opt.zero_grad(set_to_none=True)
        h = (G * torch.bmm(X, W_in.transpose(1, 2))).sum(0)
        loss = 0.5 * (p * (h @ W_out.T - Y) ** 2).sum()
        loss.backward()
        opt.step()
    return W_in.detach().numpy(), W_out.detach().numpy()


def test_samples_agree(per_sample_gates):
    """The competitors compute the same descent (checked once, outside the timings)."""
    net, data, weights = per_sample_gates
    ours = samples_fastrace(net, data, weights, 2)
    assert not np.allclose(ours["h->y"], weights["h->y"], rtol=1e-3, atol=0)  # (it moved)
    for competitor in (samples_numpy, samples_torch):  # (PyTorch last: skipped without it)
        W_in, W_out = competitor(net, data, weights)
        assert np.allclose(ours["h->y"], W_out, rtol=1e-9, atol=1e-12)
        for i in range(SAMPLES_M):
            assert np.allclose(ours[f"x{i}->h"], W_in[i], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("how", ["fastrace, 2 threads", "fastrace, 1 thread",
                                 "numpy, all samples at once, BLAS 2 threads",
                                 "PyTorch, 2 threads"])
@pytest.mark.benchmark(group=f"samples engine: one run, {SAMPLES_P} samples with their own "
                             f"gates, {SAMPLES_STEPS} steps")
def test_samples_engine_one_run(benchmark, per_sample_gates, how):
    """One run of the samples engine: its samples in fixed blocks, shared by the threads."""
    net, data, weights = per_sample_gates
    if how.startswith("fastrace"):
        threads = 2 if "2 threads" in how else 1
        if threads == 2:
            benchmark.extra_info["baseline"] = True
        samples_fastrace(net, data, weights, threads)
        benchmark.pedantic(samples_fastrace, args=(net, data, weights, threads), rounds=5,
                           warmup_rounds=1)
    elif how.startswith("numpy"):
        benchmark.pedantic(samples_numpy, args=(net, data, weights), rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(samples_torch, args=(net, data, weights), rounds=5, warmup_rounds=1)


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


# ------------------------------------------------------------------ recording singular values
def record_every_step(task, weights, threads):
    return fr.simulate(task.network, task.data, weights, lr=LR, steps=STEPS, record_every=1,
                       threads=threads)


def numpy_after_the_run(task, weights):
    """What a user would do without fastrace's recording: keep every step's weights, then
    take their singular values with numpy (one batched call per edge)."""
    run = fr.simulate(task.network, task.data, weights, lr=LR, steps=STEPS, record_every=1,
                      svals=False, save_weights=True)
    return {e: np.linalg.svd(w, compute_uv=False) for e, w in run.snapshots.items()}


@pytest.mark.parametrize("how", ["fastrace, 2 threads", "fastrace, 1 thread",
                                 "numpy after the run"])
@pytest.mark.benchmark(group="recording: routing 500 steps, singular values every step")
def test_recording_singular_values(benchmark, routing, how):
    """The run's time is mostly singular values (a learned 64 x 64 weight takes LAPACK
    ~250 µs, a step ~40 µs); fastrace shares them between its threads."""
    task, weights = routing
    if how == "numpy after the run":
        ours = record_every_step(task, weights, 1)
        theirs = numpy_after_the_run(task, weights)
        for e, s in theirs.items():  # the same numbers to rounding (wide edges go by QR)
            assert np.all(np.abs(ours.svals[e] - s) <= 64 * np.finfo(float).eps * s[:, :1])
        benchmark.pedantic(numpy_after_the_run, args=(task, weights), rounds=5,
                           warmup_rounds=1)
        return
    threads = 2 if how.endswith("2 threads") else 1
    if threads == 2:
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(record_every_step, args=(task, weights, threads), rounds=5,
                       warmup_rounds=1)


# ------------------------------------------------------------------ HDF5 streaming overhead
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.benchmark(group="HDF5: routing 500 steps, weights every step")
def test_hdf5_overhead(benchmark, routing, tmp_path, stream):
    task, weights = routing
    benchmark.extra_info["streaming"] = stream
    if not stream:
        benchmark.extra_info["baseline"] = True
    out = tmp_path / "run.h5" if stream else None

    def run():
        fr.simulate(task.network, task.data, weights, lr=LR, steps=STEPS, record_every=1,
                    save_weights=True, out=out)

    benchmark.pedantic(run, setup=lambda: _forget(out), rounds=5, warmup_rounds=1)


def _forget(path) -> None:
    """Delete a streamed file before the next run. Kept, its 33 MB of dirty page cache would be
    written back by the kernel 30 s later, in the middle of whichever benchmark runs then (this
    made later in-memory and streamed runs alike 1.3-1.5x slower, at random); deleted, the
    kernel drops those pages. Each streamed run is still timed writing its whole file into the
    page cache, through HDF5, as a user's run does."""
    if path is not None:
        Path(path).unlink(missing_ok=True)


def _plain_h5py_write(path, trajectory) -> None:
    """The same rows (weights, singular values, t, loss) written into a new file with plain
    h5py, one write per series, no chunking or threads: what putting these bytes into a fresh
    file costs on this machine by itself."""
    import h5py

    with h5py.File(path, "w") as f:
        for name, rows in {"t": trajectory.t, "loss": trajectory.loss,
                           **{f"svals/{e}": s for e, s in trajectory.svals.items()},
                           **{f"weights/{e}": w for e, w in trajectory.snapshots.items()}}.items():
            f.create_dataset(name, data=rows)


@pytest.mark.benchmark(group="HDF5 interleaved: routing 500 steps, weights every step")
def test_hdf5_overhead_interleaved(benchmark, routing, tmp_path):
    """In-memory and streamed runs alternating round by round (both see the same load and the
    same leftover threads of earlier benchmarks), and the plain-h5py cost of the same bytes.
    Also on 1 thread, which leaves the writer thread a core of its own. Each file is deleted
    before the next run (see ``_forget``)."""
    task, weights = routing

    def run(out=None, threads=None):
        start = time.perf_counter()
        traj = fr.simulate(task.network, task.data, weights, lr=LR, steps=STEPS,
                           record_every=1, save_weights=True, out=out, threads=threads)
        return time.perf_counter() - start, traj

    path = tmp_path / "streamed.h5"
    run()
    run(path)
    times: dict[str, list[float]] = {}
    for _ in range(7):
        for threads in (None, 1):
            _forget(path)
            elapsed, traj = run(threads=threads)
            times.setdefault(f"memory {threads}", []).append(elapsed)
            times.setdefault(f"streamed {threads}", []).append(run(path, threads)[0])
        _forget(path)
        start = time.perf_counter()
        _plain_h5py_write(path, traj)
        times.setdefault("plain", []).append(time.perf_counter() - start)
    _forget(path)
    med = {key: float(np.median(v)) for key, v in times.items()}
    mem, st = med["memory None"], med["streamed None"]
    benchmark.extra_info["in memory (ms)"] = round(mem * 1e3, 1)
    benchmark.extra_info["streamed (ms)"] = round(st * 1e3, 1)
    benchmark.extra_info["overhead %"] = round(100 * (st / mem - 1), 1)
    benchmark.extra_info["1 thread: in memory (ms)"] = round(med["memory 1"] * 1e3, 1)
    benchmark.extra_info["1 thread: streamed (ms)"] = round(med["streamed 1"] * 1e3, 1)
    benchmark.extra_info["1 thread: overhead %"] = round(
        100 * (med["streamed 1"] / med["memory 1"] - 1), 1)
    benchmark.extra_info["plain h5py write of the same rows (ms)"] = round(med["plain"] * 1e3, 1)
    benchmark.extra_info["load average"] = round(os.getloadavg()[0], 2)
    benchmark.pedantic(time.sleep, args=(0,), rounds=1)
