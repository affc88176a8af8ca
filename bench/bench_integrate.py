"""Reduced race systems: fastrace's integrators against numbalsoda's LSODA and scipy.

Workload (the project's issue): N independent copies of the routing mode system (three edges,
K = 4, M = 7, rate factors K/M², K/M, K/M², s uniform in [1, 10], every strength starting at 0.2),
t from 0 to 2000, rtol 1e-8, atol 1e-10, 1000 output times. Accuracy is measured against the
exact θ-form solution of ``fastrace.exact`` (MATH.md §4) on a sample of systems.

fastrace's main entry is ``method="auto"`` (the default: DOPRI5 until stiff, then RODAS3) on
its default backend, the C core (2 threads here, 16 systems at a time per thread in interleaved
lanes); the numba backend (prange, one system at a time per thread) is a second row.
``dopri5`` and ``rosenbrock`` alone are extra rows on 1000 systems (DOPRI5 alone is
stability-capped after convergence: thousands of steps per system).

Output memory: N = 10⁵ systems x 1000 times x 3 edges is 2.4 GB.  On this virtual machine a
process's first gigabytes of new memory cost ~3 s extra (page clearing of memory the host has
not backed yet), so the fresh-array group first touches and frees that much once
(``warm_memory``); fresh arrays then cost each tool its page faults (~0.2-0.3 s per 2.4 GB; the
C core and the numba backend fill outputs of 16 MB or more in one pass before their threads
write).  Every tool is also timed writing into a buffer allocated once and reused (what each
call of a sweep costs, and the integrators' own speed): ``integrate_system(..., out=buf)`` and
numbalsoda's loop writing into ``buf``.

Run: ``python -m pytest bench/bench_integrate.py --benchmark-only``. numbalsoda and scipy are
benchmark extras; numbalsoda has no wheel for CPython 3.11 and builds from source with a
Fortran compiler: ``apt-get install gfortran && pip install numbalsoda``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

import fastrace as fr
from fastrace.exact import routing_mode_trajectory
from fastrace.integrate import integrate_system

M, K, B0, T_END, RTOL, ATOL, N_OUT = 7, 4, 0.2, 2000.0, 1e-8, 1e-10, 1000
T_EVAL = np.linspace(0.0, T_END, N_OUT)
RATES = np.array([K / M**2, K / M, K / M**2])


def routing_mode_system() -> fr.RaceSystem:
    return fr.RaceSystem.from_paths([[0, 1, 2]], s=np.ones((1, 1)), d=np.ones((1, 1, 1)),
                                    rate=RATES, edge_names=("a1", "a2", "a3"))


def workload(n, seed=0):
    s = np.random.default_rng(seed).uniform(1.0, 10.0, n)
    return s


def reference(s_values):
    """Exact (a1, a2, a3) at T_EVAL for each s: (N_OUT, len(s), 3)."""
    a1, a2, a3 = routing_mode_trajectory(T_EVAL, np.asarray(s_values), M, K, B0)
    return np.stack([a1, a2, a3], axis=-1)


def run_fastrace(system, s, backend="c", threads=None, method="auto", out=None):
    n = s.size
    sol = integrate_system(system, np.full((n, 1, 3), B0), s=s.reshape(n, 1, 1), method=method,
                           t_end=T_END, save_at=T_EVAL, rtol=RTOL, atol=ATOL, backend=backend,
                           threads=threads, out=out)
    return sol.b[:, :, 0, :]  # (N_OUT, n, 3)


def reused_buffer(n):
    """A (n, 1, N_OUT, 3) output buffer, touched once: what a sweep reuses call after call."""
    return np.ones((n, 1, N_OUT, 3))


def max_error(values, s, sample):
    ref = reference(s[sample])
    return float(np.max(np.abs(values[:, sample, :] - ref)))


# ------------------------------------------------------------------ numbalsoda (LSODA in prange)
def numbalsoda_runner():
    pytest.importorskip("numbalsoda")
    import numba
    from numba import cfunc, njit, prange
    from numbalsoda import lsoda, lsoda_sig

    r1, r2, r3 = RATES

    @cfunc(lsoda_sig)
    def rhs(t, u, du, p):
        err = p[0] - u[0] * u[1] * u[2]
        du[0] = r1 * u[1] * u[2] * err
        du[1] = r2 * u[0] * u[2] * err
        du[2] = r3 * u[0] * u[1] * err

    address = rhs.address

    @njit(parallel=True)
    def solve_all(s, t_eval, out, rtol, atol):
        for i in prange(s.size):
            u0 = np.full(3, B0)
            p = np.array([s[i]])
            usol, success = lsoda(address, u0, t_eval, data=p, rtol=rtol, atol=atol)
            out[:, i, :] = usol

    def run(s, out=None):
        if out is None:
            out = np.empty((N_OUT, s.size, 3))
        solve_all(s, T_EVAL, out, RTOL, ATOL)
        return out

    run(workload(4))  # compile outside the timings
    del numba
    return run


def scipy_vectorised(s):
    """One scipy LSODA call over all systems stacked, with the banded Jacobian (bandwidth 2)."""
    from scipy.integrate import solve_ivp

    def f(t, y):
        u = y.reshape(-1, 3)
        err = s - u[:, 0] * u[:, 1] * u[:, 2]
        du = np.empty_like(u)
        du[:, 0] = RATES[0] * u[:, 1] * u[:, 2] * err
        du[:, 1] = RATES[1] * u[:, 0] * u[:, 2] * err
        du[:, 2] = RATES[2] * u[:, 0] * u[:, 1] * err
        return du.ravel()

    sol = solve_ivp(f, (0.0, T_END), np.full(3 * s.size, B0), method="LSODA", t_eval=T_EVAL,
                    rtol=RTOL, atol=ATOL, lband=2, uband=2)
    return sol.y.T.reshape(N_OUT, s.size, 3)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def warm_memory():
    """Touch and free the N = 10⁵ output's worth of memory twice before the fresh-array group.

    A process's first gigabytes of new memory cost this virtual machine ~3 s extra (the guest
    kernel clears pages the host has not backed yet); afterwards fresh arrays cost ~0.2 s per
    2.4 GB. Without this, whichever tool runs first in the group pays that once-per-process
    cost."""
    for _ in range(2):
        block = np.ones((100_000, N_OUT, 3))
        del block


@pytest.fixture(scope="module")
def system():
    sysm = routing_mode_system()
    run_fastrace(sysm, workload(4), "numba")  # compile / load the cache (one kernel, all methods)
    return sysm


@pytest.fixture(scope="module")
def lsoda_run():
    return numbalsoda_runner()


SAMPLE = np.arange(0, 100_000, 997)


GROUP = "routing mode systems, fresh output array"
REUSED = "routing mode systems, output buffer reused"


@pytest.mark.parametrize("n", [1_000, 100_000])
@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.benchmark(group=GROUP)
def test_fastrace_auto(benchmark, system, n, backend, warm_memory):
    benchmark.group = f"{GROUP}, N={n}"
    s = workload(n)
    benchmark.extra_info.update(n=n, backend=backend, baseline=backend == "c")
    out = benchmark.pedantic(run_fastrace, args=(system, s, backend), rounds=3, warmup_rounds=0)
    benchmark.extra_info["max abs error"] = max_error(out, s, SAMPLE[SAMPLE < n])


@pytest.mark.parametrize("n", [1_000])
@pytest.mark.parametrize("method", ["dopri5", "rosenbrock"])
@pytest.mark.benchmark(group=GROUP)
def test_fastrace_one_method(benchmark, system, n, method):
    """DOPRI5 or RODAS3 alone, without the switch (extra rows)."""
    benchmark.group = f"{GROUP}, N={n}"
    s = workload(n)
    benchmark.extra_info.update(n=n, method=method)
    out = benchmark.pedantic(run_fastrace, args=(system, s), kwargs={"method": method},
                             rounds=3, warmup_rounds=0)
    benchmark.extra_info["max abs error"] = max_error(out, s, SAMPLE[SAMPLE < n])


@pytest.mark.parametrize("n", [1_000, 100_000])
@pytest.mark.benchmark(group=GROUP)
def test_numbalsoda_lsoda(benchmark, lsoda_run, n, warm_memory):
    benchmark.group = f"{GROUP}, N={n}"
    s = workload(n)
    benchmark.extra_info["n"] = n
    out = benchmark.pedantic(lsoda_run, args=(s,), rounds=3, warmup_rounds=0)
    benchmark.extra_info["max abs error"] = max_error(out, s, SAMPLE[SAMPLE < n])


@pytest.mark.parametrize("n", [1_000])
@pytest.mark.benchmark(group=GROUP)
def test_scipy_lsoda_vectorised(benchmark, n):
    benchmark.group = f"{GROUP}, N={n}"
    pytest.importorskip("scipy")
    s = workload(n)
    benchmark.extra_info["n"] = n
    out = benchmark.pedantic(scipy_vectorised, args=(s,), rounds=1, warmup_rounds=0)
    benchmark.extra_info["max abs error"] = max_error(out, s, SAMPLE[SAMPLE < n])


# ------------------------------------------------------------------ output buffer reused
@pytest.mark.parametrize("n", [100_000])
@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.benchmark(group=REUSED)
def test_fastrace_auto_reused(benchmark, system, n, backend):
    benchmark.group = f"{REUSED}, N={n}"
    s, buf = workload(n), reused_buffer(n)
    benchmark.extra_info.update(n=n, backend=backend, baseline=backend == "c")
    out = benchmark.pedantic(run_fastrace, args=(system, s, backend), kwargs={"out": buf},
                             rounds=3, warmup_rounds=0)
    benchmark.extra_info["max abs error"] = max_error(out, s, SAMPLE[SAMPLE < n])


@pytest.mark.parametrize("n", [100_000])
@pytest.mark.benchmark(group=REUSED)
def test_numbalsoda_lsoda_reused(benchmark, lsoda_run, n):
    benchmark.group = f"{REUSED}, N={n}"
    s, buf = workload(n), np.ones((N_OUT, n, 3))
    benchmark.extra_info["n"] = n
    out = benchmark.pedantic(lsoda_run, args=(s, buf), rounds=3, warmup_rounds=0)
    benchmark.extra_info["max abs error"] = max_error(out, s, SAMPLE[SAMPLE < n])


@pytest.mark.benchmark(group=REUSED)
def test_interleaved_fastrace_vs_numbalsoda(benchmark, system, lsoda_run):
    """N = 10^5, buffers reused, the two tools alternating round by round: on a machine shared
    with other jobs, back-to-back medians can land in different load; alternating compares like
    with like.  Reports both medians and the ratio (the timed body is fastrace's round)."""
    n = 100_000
    s, buf, buf_l = workload(n), reused_buffer(n), np.ones((N_OUT, n, 3))
    run_fastrace(system, s, out=buf)  # first touch of the thread pools and buffers
    ours, theirs = [], []
    for _ in range(5):
        t = time.perf_counter()
        run_fastrace(system, s, out=buf)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        lsoda_run(s, buf_l)
        theirs.append(time.perf_counter() - t)
    benchmark.extra_info.update(
        n=n, fastrace_median_s=round(float(np.median(ours)), 3),
        numbalsoda_median_s=round(float(np.median(theirs)), 3),
        ratio_of_medians=round(float(np.median(theirs) / np.median(ours)), 2),
        ratios_per_round=[round(b / a, 2) for a, b in zip(ours, theirs)])
    benchmark.pedantic(run_fastrace, args=(system, s), kwargs={"out": buf}, rounds=1)


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("threads", [2, 1])
@pytest.mark.parametrize("n", [1_000, 100_000])
@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.benchmark(group="auto threads")
def test_auto_threads(benchmark, system, n, threads, backend):
    benchmark.group = f"auto threads, {backend} backend, N={n}, output buffer reused"
    s, buf = workload(n), reused_buffer(n)
    benchmark.extra_info.update(n=n, threads=threads, backend=backend)
    if threads == 2:
        benchmark.extra_info["baseline"] = True
    benchmark.pedantic(run_fastrace, args=(system, s, backend),
                       kwargs={"threads": threads, "out": buf}, rounds=3)


# ------------------------------------------------------------------ one system, cold path
@pytest.mark.benchmark(group="one system: C path vs numbalsoda")
def test_one_system_c(benchmark, system):
    s = workload(1)
    benchmark.extra_info["baseline"] = True
    benchmark(run_fastrace, system, s, "c")


@pytest.mark.benchmark(group="one system: C path vs numbalsoda")
def test_one_system_c_raw(benchmark, system):
    """The compiled call alone, arguments prepared once (what an embedding caller pays)."""
    from fastrace import _race

    sol_args = (system.path_ptr, system.path_edges, system.target_ptr, system.target_paths,
                np.full((1, 3), B0), np.array([[workload(1)[0]]]), system.d,
                RATES[None, :].copy(), 0.0, T_END, T_EVAL, RTOL, ATOL, 0.0, 0.0, 1_000_000, None)
    benchmark(_race.auto, *sol_args)


@pytest.mark.benchmark(group="one system: C path vs numbalsoda")
def test_one_system_numbalsoda(benchmark, lsoda_run):
    s = workload(1)
    benchmark(lsoda_run, s)


# ------------------------------------------------------------------ compile time
COMPILE_SCRIPT = textwrap.dedent("""
    import time, numpy as np
    t0 = time.perf_counter()
    import fastrace as fr
    from fastrace.integrate import integrate_system
    t1 = time.perf_counter()
    sysm = fr.RaceSystem.from_paths([[0, 1, 2]], s=np.ones((1, 1)), d=np.ones((1, 1, 1)))
    for method in ("auto", "dopri5", "rosenbrock"):
        integrate_system(sysm, np.full((1, 3), 0.2), method=method, t_end=10.0, backend="numba")
    integrate_system(sysm, np.full((1, 3), 0.2), method="gd", lr=0.01, steps=10, backend="numba")
    t2 = time.perf_counter()
    print(t1 - t0, t2 - t1)
""")


def test_numba_compile_time(benchmark):
    """Cold (empty cache) and cached compile time of the race kernels, in fresh processes."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        times = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            times.append(float(out[1]))
    benchmark.extra_info["cold compile (s)"] = round(times[0], 2)
    benchmark.extra_info["cached load (s)"] = round(times[1], 2)
    benchmark.pedantic(time.sleep, args=(0,), rounds=1)
