"""integrate_system: closed forms, conservation laws, backends agreeing, error control, errors."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from scipy.integrate import quad, solve_ivp
from test_race_system import race_systems

from fastrace import _memory
from fastrace.errors import ConfigError, DataError, DivergenceError, IntegrationError
from fastrace.integrate import RaceSolution, _flatten_batch, integrate_system
from fastrace.system import RaceSystem

K, M = 4, 7


def d2_system(s=2.0, d=1.5) -> RaceSystem:
    """Single path of depth 2."""
    return RaceSystem.from_paths([[0, 1]], s=np.atleast_2d(s).reshape(-1, 1),
                                 d=np.full((np.size(s), 1, 1), d))


def pi_d2(t, s, d, pi0):
    """MATH.md section 4, D = 2."""
    return (s / d) / (1.0 - (1.0 - s / (d * pi0)) * np.exp(-2.0 * s * t))


def routing_system(s=(3.0,)) -> RaceSystem:
    """The routing mode equations (MATH.md section 4): edges a1, a2, a3 in series."""
    s = np.asarray(s, dtype=float).reshape(-1, 1)
    return RaceSystem.from_paths([[0, 1, 2]], s=s, d=np.ones((s.shape[0], 1, 1)),
                                 rate=[K / M**2, K / M, K / M**2],
                                 edge_source=[0, 1, 2], edge_target=[1, 2, 3])


def random_system(rng, n_modes=2) -> RaceSystem:
    """Two outputs; paths share edges; symmetric positive d within each output."""
    paths = [[0, 1, 2], [3, 1, 2], [0, 4], [3, 5, 4]]
    out = [0, 0, 1, 1]
    d = np.zeros((n_modes, 4, 4))
    for m in range(n_modes):
        a = rng.normal(size=(4, 4))
        gram = a @ a.T / 4 + np.eye(4)
        mask = np.equal.outer(out, out)
        d[m] = gram * mask
    return RaceSystem.from_paths(paths, s=rng.uniform(0.5, 3.0, (n_modes, 4)), d=d,
                                 rate=rng.uniform(0.5, 1.5, 6))


# ------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("method, tol", [("dopri5", 1e-7), ("rosenbrock", 1e-6), ("auto", 1e-6)])
@pytest.mark.parametrize("backend", ["c", "numba"])
def test_depth_two_path_matches_closed_form(method, tol, backend):
    s, d, b0 = 2.0, 1.5, 0.05
    t = np.linspace(0.0, 6.0, 61)
    sol = integrate_system(d2_system(s, d), [b0, b0], method=method, save_at=t, rtol=1e-10,
                           atol=1e-12, backend=backend)
    assert isinstance(sol, RaceSolution) and sol.ok and sol.backend == backend
    assert sol.b.shape == (61, 1, 2)
    want = pi_d2(t, s, d, b0 * b0)
    np.testing.assert_allclose(sol.path_strengths[:, 0, 0], want, rtol=tol)
    np.testing.assert_allclose(sol.b[:, 0, 0], sol.b[:, 0, 1], rtol=1e-12)  # stays balanced


@pytest.mark.parametrize("method, tol", [("dopri5", 1e-8), ("rosenbrock", 1e-6), ("auto", 1e-8)])
def test_event_times_match_closed_form(method, tol):
    s, d = np.array([2.0, 0.7]), 1.5
    b0 = 0.05
    pi0 = b0 * b0
    thresholds = 0.5 * s / d  # half-way; the same threshold array for every mode is
    system = d2_system(s, d)  # not possible, so integrate each mode with its own threshold
    for m in range(2):
        sol = integrate_system(system, [b0, b0], method=method, t_end=20.0, rtol=1e-10,
                               atol=1e-12, events=thresholds[m])
        pi1 = thresholds[m]
        want = np.log(pi1 * (s[m] - d * pi0) / (pi0 * (s[m] - d * pi1))) / (2 * s[m])
        assert sol.events.shape == (2, 1)
        np.testing.assert_allclose(sol.events[m, 0], want, rtol=tol)
    never = integrate_system(system, [b0, b0], method=method, t_end=20.0, events=10.0)
    assert np.all(np.isnan(never.events))


@pytest.mark.parametrize("method", ["dopri5", "rosenbrock", "auto"])
def test_routing_conservation_and_learning_time(method):
    s, b0 = 3.0, 0.2
    system = routing_system([s])
    t = np.linspace(0.0, 60.0, 61)
    sol = integrate_system(system, [b0, b0, b0], method=method, save_at=t)
    a1, a2, a3 = sol.b[:, 0, 0], sol.b[:, 0, 1], sol.b[:, 0, 2]
    c0 = (M - 1) * b0**2
    np.testing.assert_allclose(M * a1**2 - a2**2, c0, rtol=1e-7)
    np.testing.assert_allclose(a1, a3, rtol=1e-12)
    # t(a2) = (M^2/K) int_{b0}^{a2} dx / ((x^2 + c0)(s - x (x^2 + c0) / M))
    # (well below the fixed point, where the integral is well conditioned)
    a2_fixed = a2[-1]
    np.testing.assert_allclose(a2_fixed * (a2_fixed**2 + c0) / M, s, rtol=1e-6)
    rising = np.flatnonzero((t > 0) & (a2 < 0.9 * a2_fixed))
    assert rising.size >= 3
    for k in rising:
        t_k = (M**2 / K) * quad(lambda x: 1.0 / ((x * x + c0) * (s - x * (x * x + c0) / M)),
                                b0, a2[k], epsabs=0, epsrel=1e-12, limit=200)[0]
        np.testing.assert_allclose(t_k, t[k], rtol=1e-6)


@pytest.mark.parametrize("method, tol", [("dopri5", 2e-6), ("rosenbrock", 2e-6), ("auto", 2e-6)])
def test_stiff_routing_against_tight_reference(method, tol):
    """s = 10 converges fast and then is stiff (eigenvalue ~ -10) for a long time."""
    system = routing_system([10.0])
    b0 = np.full(3, 0.2)
    t = np.concatenate([np.linspace(0.0, 20.0, 21), np.linspace(50.0, 2000.0, 40)])
    rate = system.rate

    def f(_, b):
        r = 10.0 - b[0] * b[1] * b[2]
        return rate * np.array([b[1] * b[2], b[0] * b[2], b[0] * b[1]]) * r

    ref = solve_ivp(f, (0, 2000.0), b0, method="DOP853", t_eval=t, rtol=1e-13, atol=1e-15).y.T
    sol = integrate_system(system, b0, method=method, save_at=t, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sol.b[:, 0, :], ref, rtol=tol)
    if method != "dopri5":  # not held back by stiffness
        explicit = integrate_system(system, b0, method="dopri5", save_at=t)
        assert sol.n_steps[0] < explicit.n_steps[0] / (5 if method == "rosenbrock" else 20)


@pytest.mark.parametrize("method", ["dopri5", "rosenbrock", "auto"])
@pytest.mark.parametrize("backend", ["c", "numba"])
def test_error_control_is_per_system(method, backend):
    """A fast (s = 100) and a slow (s = 0.01) system batched give exactly what each gives alone,
    and each meets its tolerance."""
    d, b0 = 1.0, 0.3
    system = d2_system([100.0, 0.01], d)
    t = np.linspace(0.0, 50.0, 26)
    both = integrate_system(system, [b0, b0], method=method, save_at=t, rtol=1e-9, atol=1e-12,
                            backend=backend)
    for m, s in enumerate([100.0, 0.01]):
        alone = integrate_system(d2_system(s, d), [b0, b0], method=method, save_at=t, rtol=1e-9,
                                 atol=1e-12, backend=backend)
        np.testing.assert_array_equal(both.b[:, m], alone.b[:, 0])
        assert both.n_steps[m] == alone.n_steps[0]
        np.testing.assert_allclose(both.path_strengths[:, m, 0], pi_d2(t, s, d, b0 * b0),
                                   rtol=1e-6)
    assert both.n_steps[0] > 2 * both.n_steps[1]  # each system took its own steps


# ------------------------------------------------------------------------------------------
# gradient descent


def test_gd_matches_plain_euler_loop():
    rng = np.random.default_rng(0)
    system = random_system(rng)
    b0 = rng.uniform(0.05, 0.3, (2, 6))
    lr, steps = 0.05, 60
    sol = integrate_system(system, b0, method="gd", lr=lr, steps=steps)
    b = b0.copy()
    for k in range(steps + 1):
        np.testing.assert_allclose(sol.b[k], b, rtol=1e-13, atol=0)
        b = b + lr * system.rhs(b)
    np.testing.assert_allclose(sol.t, lr * np.arange(steps + 1), rtol=1e-15)
    assert np.all(sol.n_steps == steps)
    # save_at as step indices or as times (multiples of lr) pick the same rows
    by_index = integrate_system(system, b0, method="gd", lr=lr, save_at=np.array([0, 10, 60]))
    by_time = integrate_system(system, b0, method="gd", lr=lr, save_at=[0.0, 0.5, 3.0])
    np.testing.assert_array_equal(by_index.b, sol.b[[0, 10, 60]])
    np.testing.assert_array_equal(by_time.b, sol.b[[0, 10, 60]])


def test_gd_divergence_raises_with_step():
    system = d2_system(2.0, 1.0)
    with pytest.raises(DivergenceError, match="lower lr") as info:
        integrate_system(system, [1.0, 1.0], method="gd", lr=50.0, steps=200)
    assert info.value.step > 0
    partial = info.value.solution
    assert partial.status[0] == 3 and np.isnan(partial.b[-1]).all()


# ------------------------------------------------------------------------------------------
# backends agree; batches; solution fields


@pytest.mark.parametrize("method", ["dopri5", "rosenbrock", "auto", "gd"])
def test_numba_equals_c(method):
    rng = np.random.default_rng(1)
    system = random_system(rng)
    b0 = rng.uniform(0.01, 0.3, (3, 2, 6))
    b0[0, 0, 2] = 0.0  # an exact zero
    s = rng.uniform(0.5, 3.0, (3, 2, 4))
    rate = rng.uniform(0.5, 2.0, (3, 6))
    if method == "gd":
        kwargs = dict(lr=0.05, steps=400, save_at=np.arange(0, 401, 20))
    else:  # long enough to turn stiff: "auto" switches to rosenbrock on the way
        kwargs = dict(t_end=400.0, save_at=np.linspace(0, 400.0, 41), events=0.5)
    c = integrate_system(system, b0, method=method, s=s, rate=rate, backend="c", **kwargs)
    nb = integrate_system(system, b0, method=method, s=s, rate=rate, backend="numba", **kwargs)
    if method == "auto":
        explicit = integrate_system(system, b0, method="dopri5", s=s, rate=rate, backend="c",
                                    **kwargs)
        assert np.all(c.n_steps < explicit.n_steps / 2)
    np.testing.assert_allclose(nb.b, c.b, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(nb.n_steps, c.n_steps)
    np.testing.assert_array_equal(nb.status, c.status)
    if method != "gd":
        np.testing.assert_allclose(nb.events, c.events, rtol=1e-12, atol=0)
        assert np.isfinite(c.events).any()


@settings(max_examples=15, deadline=None)
@given(race_systems(max_modes=2))
def test_numba_equals_c_on_random_systems(case):
    system, _, _, _, b = case
    b0 = 0.5 * b
    kwargs = dict(t_end=3.0, save_at=np.linspace(0.0, 3.0, 7), max_steps=20000, check=False,
                  events=0.1)
    for method in ("dopri5", "rosenbrock", "auto"):
        c = integrate_system(system, b0, method=method, backend="c", **kwargs)
        nb = integrate_system(system, b0, method=method, backend="numba", **kwargs)
        np.testing.assert_allclose(nb.b, c.b, rtol=1e-12, atol=0)
        np.testing.assert_allclose(nb.events, c.events, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(nb.status, c.status)
        np.testing.assert_array_equal(nb.n_steps, c.n_steps)
    gd = dict(method="gd", lr=0.01, steps=50, check=False)
    np.testing.assert_allclose(integrate_system(system, b0, backend="numba", **gd).b,
                               integrate_system(system, b0, backend="c", **gd).b, rtol=1e-12, atol=0)


def test_c_batches_lanes_and_threads_agree_with_numba():
    """The C core runs a batch several systems at a time in interleaved lanes, on threads that
    take 64 systems at a time: any thread count gives the same bits, and numba (one system at
    a time, the same operations) agrees; systems that fail do not disturb their neighbours."""
    rng = np.random.default_rng(5)
    system = random_system(rng)
    n_sets = 150
    b0 = rng.uniform(0.01, 0.3, (n_sets, 2, 6))
    b0[7, 1, 3] = 25.0  # blows up or runs out of steps
    s = rng.uniform(0.2, 5.0, (n_sets, 2, 4))
    kwargs = dict(t_end=60.0, save_at=np.linspace(0.0, 60.0, 13), events=0.5, s=s,
                  max_steps=3000, check=False)
    one = integrate_system(system, b0, backend="c", threads=1, **kwargs)
    two = integrate_system(system, b0, backend="c", threads=2, **kwargs)
    for field in ("b", "events", "status", "n_steps", "n_rejected"):
        np.testing.assert_array_equal(getattr(one, field), getattr(two, field))
    assert one.status[7, 1] != 0 and (one.status == 0).sum() >= 290
    nb = integrate_system(system, b0, backend="numba", **kwargs)
    np.testing.assert_allclose(nb.b, one.b, rtol=1e-12, atol=0)
    np.testing.assert_allclose(nb.events, one.events, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(nb.n_steps, one.n_steps)
    np.testing.assert_array_equal(nb.status, one.status)
    # and a system alone gives what it gave inside the batch
    alone = integrate_system(system, b0[42], s=s[42], backend="c", **{
        k: v for k, v in kwargs.items() if k != "s"})
    np.testing.assert_array_equal(alone.b, one.b[:, 42])


@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.parametrize("method", ["auto", "gd"])
def test_out_buffer_receives_the_trajectories(backend, method):
    system = routing_system([3.0, 1.0])
    if method == "gd":
        kwargs, n_saved = dict(lr=0.05, steps=40, save_at=np.arange(0, 41, 4)), 11
    else:
        kwargs, n_saved = dict(save_at=np.linspace(0.0, 30.0, 16)), 16
    ref = integrate_system(system, [0.2, 0.2, 0.2], method=method, backend=backend, **kwargs)
    buffer = np.full((2, n_saved, 3), np.nan)
    sol = integrate_system(system, [0.2, 0.2, 0.2], method=method, backend=backend, out=buffer,
                           **kwargs)
    assert np.shares_memory(sol.b, buffer)
    np.testing.assert_array_equal(sol.b, ref.b)
    np.testing.assert_array_equal(buffer.transpose(1, 0, 2), ref.b)


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_large_fresh_outputs_prefilled_equal_written_buffers(backend):
    """Outputs of 16 MB and more are first filled in one pass (page faults) before the kernels
    write them: the trajectories must be those written into a user buffer of garbage, and the
    rows after a system stopped (here: too few steps allowed for most) NaN in both."""
    n_sys, save_at = 700, np.linspace(0.0, 30.0, 1000)  # 700 x 1000 x 3 doubles = 16.8 MB
    system = routing_system([3.0])
    s = np.linspace(1.0, 10.0, n_sys).reshape(n_sys, 1, 1)
    kwargs = dict(s=s, save_at=save_at, backend=backend, check=False, max_steps=40)
    fresh = integrate_system(system, np.full((n_sys, 1, 3), 0.2), **kwargs)
    assert fresh.b.nbytes >= 1 << 24
    garbage = np.full((n_sys, 1, save_at.size, 3), 123.0)
    written = integrate_system(system, np.full((n_sys, 1, 3), 0.2), out=garbage, **kwargs)
    np.testing.assert_array_equal(fresh.b, written.b)
    stopped = fresh.status[:, 0] != 0
    assert stopped.sum() > n_sys // 2 and np.isnan(fresh.b[-1, stopped]).all()
    assert np.isfinite(fresh.b[:, ~stopped]).all() and np.isfinite(fresh.b[0]).all()
    assert not (fresh.b == 123.0).any()


@pytest.mark.parametrize("bad", [np.zeros((2, 16, 4)), np.zeros((2, 16, 3), dtype=np.float32),
                                 np.zeros((2, 16, 6))[:, :, ::2], "read-only", [[0.0]]])
def test_out_buffer_is_checked(bad):
    if isinstance(bad, str):
        bad = np.zeros((2, 16, 3))
        bad.flags.writeable = False
    with pytest.raises(ConfigError, match="out must be a writable C-contiguous float64"):
        integrate_system(routing_system([3.0, 1.0]), [0.2, 0.2, 0.2],
                         save_at=np.linspace(0.0, 30.0, 16), out=bad)


def test_parameter_sets_and_solution_fields():
    system = routing_system([3.0, 1.0])
    s = np.array([[[3.0], [1.0]], [[5.0], [2.0]]])
    rate = np.array(system.rate) * np.array([[1.0], [2.0]])
    sol = integrate_system(system, [0.2, 0.2, 0.2], t_end=30.0, s=s, rate=rate)
    assert sol.batched and sol.b.shape == (101, 2, 2, 3)
    assert sol.status.shape == (2, 2) and sol.n_steps.shape == (2, 2)
    np.testing.assert_array_equal(sol.s, s)
    # set 1, mode 0 equals a run of that system alone
    alone = integrate_system(system.with_modes([[5.0]], [[1.0]]), [0.2, 0.2, 0.2], t_end=30.0,
                             rate=rate[1])
    np.testing.assert_array_equal(sol.b[:, 1, 0], alone.b[:, 0])
    # loss: sum over modes of -s pi + pi^2 / 2 with the set's s
    pi = sol.path_strengths[..., 0]
    np.testing.assert_allclose(sol.loss, (-s[None, :, :, 0] * pi + 0.5 * pi * pi).sum(-1),
                               rtol=1e-13)
    assert sol.loss.shape == (101, 2)


def test_threads_argument_restores_numba_setting():
    import numba

    before = numba.get_num_threads()
    integrate_system(d2_system(), [0.1, 0.1], t_end=1.0, backend="numba", threads=1)
    assert numba.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"):
        integrate_system(d2_system(), [0.1, 0.1], t_end=1.0, backend="numba", threads=10**6)


def test_max_steps_failure_raises_or_returns_status():
    system = d2_system()
    with pytest.raises(IntegrationError, match="maximum number of steps") as info:
        integrate_system(system, [0.1, 0.1], t_end=10.0, max_steps=3)
    assert info.value.solution.status[0] == 1
    sol = integrate_system(system, [0.1, 0.1], t_end=10.0, max_steps=3, check=False)
    assert not sol.ok and np.isnan(sol.b[-1]).all() and sol.failures()


# ------------------------------------------------------------------------------------------
# the front end: arrays the C core can read as they are skip copies; nothing else changes


def array_forms(values: np.ndarray) -> dict:
    """The same numbers as a C-contiguous float64 array (read as it is) and in forms that
    must be converted first."""
    values = np.asarray(values, dtype=np.float64)
    wide = np.zeros(values.shape[:-1] + (2 * values.shape[-1],))
    wide[..., ::2] = values
    read_only = values.copy()
    read_only.flags.writeable = False
    return {"c": values.copy(), "list": values.tolist(), "strided": wide[..., ::2],
            "fortran": np.asfortranarray(values), "read_only": read_only,
            "float32": values.astype(np.float32)}


def naive_batch(system, b0, s, rate):
    """Every system's (b0, s, rate) row, (n_sets, n_modes, ...), and the lead shape, by
    broadcasting the documented shapes; n_sets = 1 without a set axis."""
    b0 = np.asarray(b0, dtype=np.float64)
    s = system.s if s is None else np.asarray(s, dtype=np.float64)
    rate = system.rate if rate is None else np.asarray(rate, dtype=np.float64)
    sets = [x.shape[0] for x, ndim in ((b0, 3), (s, 3), (rate, 2)) if x.ndim == ndim]
    n_sets = sets[0] if sets else 1
    shape = (n_sets, system.n_modes)
    rows = (np.broadcast_to(b0, shape + (system.n_edges,)),
            np.broadcast_to(s, shape + (system.n_paths,)),
            np.broadcast_to(rate[:, None, :] if rate.ndim == 2 else rate,
                            shape + (system.n_edges,)))
    return rows, shape if sets else shape[1:]


@pytest.mark.parametrize("b0_shape, s_shape, rate_shape", [
    ((1, 1, 3), (1, 1, 1), None),  # the one-system benchmark call
    ((3,), None, None), ((1, 3), None, None), ((1, 3), (1, 1), (3,)), ((4, 1, 3), None, (3,)),
    ((3,), (4, 1, 1), None), ((3,), None, (4, 3)), ((4, 1, 3), (4, 1, 1), (4, 3)),
])
@pytest.mark.parametrize("copy_b0", [False, True])
def test_flatten_batch_matches_naive_broadcasting(b0_shape, s_shape, rate_shape, copy_b0):
    """Whatever form b0, s and rate come in, and whether or not the flat b0 may share memory
    with the caller's, system i = set * n_modes + mode gets the same rows."""
    rng = np.random.default_rng(3)
    system = routing_system([3.0])
    given_values = [None if shape is None else rng.uniform(0.1, 2.0, shape)
                    for shape in (b0_shape, s_shape, rate_shape)]
    for form in array_forms(given_values[0]):
        forms = [None if x is None else array_forms(x)[form] for x in given_values]
        (b0_rows, s_rows, rate_rows), lead = naive_batch(system, *forms)
        n_sys = b0_rows.shape[0] * b0_rows.shape[1]
        b0_flat, s_flat, rate_flat, s_used, lead_got = _flatten_batch(system, *forms,
                                                                      copy_b0=copy_b0)
        assert lead_got == lead
        np.testing.assert_array_equal(b0_flat, b0_rows.reshape(n_sys, -1))
        i = np.arange(n_sys)
        np.testing.assert_array_equal(s_flat[i % s_flat.shape[0]], s_rows.reshape(n_sys, -1))
        np.testing.assert_array_equal(rate_flat[i % rate_flat.shape[0]],
                                      rate_rows.reshape(n_sys, -1))
        np.testing.assert_array_equal(s_used, s_rows.reshape(lead + (-1,)))
        for flat in (b0_flat, s_flat, rate_flat):  # what the C core accepts
            assert flat.dtype == np.float64 and flat.ndim == 2 and flat.flags.c_contiguous
            assert flat.flags.aligned
        # b0 is read in place only when that is allowed and it is already the flat layout
        b0_given = forms[0]
        in_place = (not copy_b0 and isinstance(b0_given, np.ndarray)
                    and b0_given.dtype == np.float64 and b0_given.flags.c_contiguous
                    and b0_given.size == b0_flat.size)
        assert np.shares_memory(b0_flat, b0_given) == in_place
        if form == "c" and not copy_b0:
            assert in_place == (b0_given.ndim == 3 or b0_flat.shape[0] == 1)


def assert_same_solution(got: RaceSolution, want: RaceSolution) -> None:
    for field in ("t", "b", "s", "status", "n_steps", "n_rejected", "events", "thresholds"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, field
            np.testing.assert_array_equal(a, b, err_msg=field)
    assert (got.method, got.backend, got.system) == (want.method, want.backend, want.system)


@pytest.mark.parametrize("n_sets", [1, 5])
@pytest.mark.parametrize("backend, method", [("c", "auto"), ("c", "gd"), ("numba", "auto")])
def test_arrays_read_in_place_give_the_converted_arrays_results(n_sets, backend, method):
    """Inputs the kernels read as they are, converted copies, and an out buffer (b0 then always
    copied) give the same bits; so does each set run alone."""
    rng = np.random.default_rng(11)
    system = routing_system([3.0, 1.0])
    b0 = rng.uniform(0.1, 0.3, (n_sets, 2, 3))
    s = rng.uniform(1.0, 5.0, (n_sets, 2, 1))
    rate = system.rate * rng.uniform(0.5, 2.0, (n_sets, 1))
    if method == "gd":
        kwargs = dict(method="gd", lr=0.05, steps=60, save_at=np.arange(0, 61, 6))
    else:
        kwargs = dict(save_at=np.linspace(0.0, 40.0, 9), rtol=1e-8, atol=1e-10, events=0.5)
    kwargs.update(backend=backend)
    direct = integrate_system(system, b0, s=s, rate=rate, **kwargs)
    for form in ("list", "strided", "fortran", "read_only"):
        converted = integrate_system(system, array_forms(b0)[form], s=array_forms(s)[form],
                                     rate=array_forms(rate)[form], **kwargs)
        assert_same_solution(direct, converted)
    buffer = np.full(direct.b.shape[1:-1] + (direct.b.shape[0], 3), np.nan)
    buffered = integrate_system(system, b0, s=s, rate=rate, out=buffer, **kwargs)
    assert np.shares_memory(buffered.b, buffer)
    assert_same_solution(buffered, direct)
    for k in range(n_sets):
        alone = integrate_system(system.with_modes(s[k], [[1.0], [1.0]]), b0[k].tolist(),
                                 rate=rate[k].tolist(), **kwargs)
        np.testing.assert_array_equal(alone.b, direct.b[:, k])
        np.testing.assert_array_equal(alone.n_steps, direct.n_steps[k])


@pytest.mark.parametrize("lead", [(2,), (1, 2), (3, 2)])  # (n_modes,), (n_sets, n_modes)
def test_solution_fields_are_the_cores_outputs_rearranged(lead):
    """Against fastrace._race called directly on hand-flattened arguments: b[k, *idx] is
    out[i, k], n_steps / n_rejected are stats columns 0 / 1, for system i = set * 2 + mode."""
    from fastrace import _race

    rng = np.random.default_rng(4)
    system = routing_system([3.0, 1.0])
    n_sets = lead[0] if len(lead) == 2 else 1
    b0 = rng.uniform(0.1, 0.3, (3, 2, 3))[:n_sets].reshape(lead + (3,))
    s = rng.uniform(1.0, 5.0, (3, 2, 1))[:n_sets].reshape(lead + (1,))
    t = np.linspace(0.0, 30.0, 7)
    sol = integrate_system(system, b0, s=s, save_at=t, events=0.4, max_steps=75, check=False)
    out, events, status, stats = _race.auto(
        system.path_ptr, system.path_edges, system.target_ptr, system.target_paths,
        b0.reshape(-1, 3).copy(), s.reshape(-1, 1).copy(), system.d, system.rate[None, :].copy(),
        0.0, 30.0, t, 1e-8, 1e-10, 0.0, 0.0, 75, np.full(1, 0.4))
    assert (status != 0).any() and (status == 0).any()  # max_steps=75 stops some systems
    for i, idx in enumerate(np.ndindex(lead)):
        np.testing.assert_array_equal(sol.b[(slice(None),) + idx], out[i])
        np.testing.assert_array_equal(sol.events[idx], events[i])
        assert (sol.status[idx], sol.n_steps[idx], sol.n_rejected[idx]) == (
            status[i], stats[i, 0], stats[i, 1])
        np.testing.assert_array_equal(sol.s[idx], s[idx])
    assert sol.b.shape == (7,) + lead + (3,) and sol.status.shape == lead


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_b0_overlapping_out_is_read_before_it_is_overwritten(backend):
    """b0 may lie in the memory of out (here: the first half of it, where the first systems'
    trajectories go): b0 is copied before the kernels write."""
    system = routing_system([3.0, 1.0])
    b0 = np.random.default_rng(2).uniform(0.1, 0.3, (70, 2, 3))  # several lanes and chunks
    kwargs = dict(save_at=[2.0, 5.0], threads=2, backend=backend)
    want = integrate_system(system, b0, **kwargs)
    buffer = np.empty((70, 2, 2, 3))
    inside = buffer.reshape(-1)[:b0.size].reshape(b0.shape)
    inside[...] = b0
    got = integrate_system(system, inside, out=buffer, **kwargs)
    np.testing.assert_array_equal(got.b, want.b)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(b0=np.full((2, 2, 3), 0.2), s=np.full((3, 2, 1), 2.0)), DataError,
     "b0, s and rate disagree on the number of parameter sets: {'b0': 2, 's': 3}"),
    (dict(b0=np.full((1, 2, 3), 0.2), s=np.full((2, 2, 1), 2.0), rate=np.ones((3, 3))),
     DataError, "b0, s and rate disagree on the number of parameter sets: "
     "{'b0': 1, 's': 2, 'rate': 3}"),
    (dict(b0=np.full((3,), 0.2), rate=np.ones((4, 3)), s=np.full((2, 2, 1), 2.0)), DataError,
     "b0, s and rate disagree on the number of parameter sets: {'s': 2, 'rate': 4}"),
    (dict(b0=np.full((0, 2, 3), 0.2)), DataError,
     "the number of parameter sets must be at least 1"),
    (dict(b0=np.full((2, 2, 4), 0.2)), DataError,
     "b0 must have shape (3,), (2, 3) or (n_sets, 2, 3), got (2, 2, 4)"),
    (dict(b0=np.full((2, 3), np.inf)), DataError, "b0 holds NaN or inf values"),
    (dict(b0=np.full((2, 2, 3), 0.2), s=np.full((2, 2, 1), np.nan)), DataError,
     "s holds NaN or inf values"),
    (dict(b0=np.full((2, 2, 3), 0.2), s=np.full((2, 1, 1), 1.0)), DataError,
     "s must have shape (2, 1) or (n_sets, 2, 1), got (2, 1, 1)"),
    (dict(b0=np.full((2, 2, 3), 0.2), rate=np.full(3, np.nan)), DataError,
     "rate holds NaN or inf values"),
    (dict(b0=np.full((2, 2, 3), 0.2), rate=np.ones((2, 2, 3))), DataError,
     "rate must have shape (3,) or (n_sets, 3), got (2, 2, 3)"),
    (dict(b0=np.full((1, 2, 3), 0.2), save_at=np.array([0.0, 1.0, 1.0])), ConfigError,
     "save_at must be strictly increasing"),
    (dict(b0=np.full((1, 2, 3), 0.2), save_at=np.array([0.0, np.inf])), DataError,
     "save_at holds NaN or inf values"),
])
@pytest.mark.parametrize("form", ["c", "strided", "list"])
def test_bad_batches_raise_the_same_error_in_every_form(kwargs, error, message, form):
    args = {name: array_forms(value)[form] if value.size else value
            for name, value in kwargs.items()}
    args.setdefault("save_at", np.linspace(0.0, 2.0, 3))
    with pytest.raises(error) as info:
        integrate_system(routing_system([3.0, 1.0]), **args)
    assert str(info.value) == message


def test_solution_init_is_the_dataclass_one():
    """RaceSolution's hand-written __init__ (cheaper than the generated one) takes and sets
    exactly the fields, and the solution stays frozen."""
    names = [field.name for field in dataclasses.fields(RaceSolution)]
    assert list(inspect.signature(RaceSolution).parameters) == names
    values = {name: object() for name in names}
    by_name, by_position = RaceSolution(**values), RaceSolution(*values.values())
    for sol in (by_name, by_position):
        assert vars(sol) == values
        with pytest.raises(dataclasses.FrozenInstanceError):
            sol.b = None
    assert dataclasses.replace(by_name, method="gd").method == "gd"


# ------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="euler"), ConfigError, "method"),
    (dict(backend="gpu"), ConfigError, "backend"),
    (dict(threads=0), ConfigError, "threads"),
    (dict(t_end=-1.0), ConfigError, "t_end"),
    (dict(t_end=None), ConfigError, "t_end or save_at"),
    (dict(save_at=[0.0, 2.0, 1.0]), ConfigError, "increasing"),
    (dict(save_at=[0.0, 20.0]), ConfigError, "past t_end"),
    (dict(save_at=[-1.0, 1.0]), ConfigError, "t >= 0"),
    (dict(rtol=0.0), ConfigError, "rtol"),
    (dict(rtol=1.0), ConfigError, "use rtol < 1"),
    (dict(atol=float("nan")), ConfigError, "atol"),
    (dict(max_steps=0), ConfigError, "max_steps"),
    (dict(events=[1.0, 2.0]), ConfigError, "events"),
    (dict(lr=0.1), ConfigError, "method='gd'"),
    (dict(b0=[0.1, np.inf]), DataError, "b0 holds NaN"),
    (dict(b0=np.zeros((2, 2))), DataError, "b0 must have shape"),
    (dict(s=np.ones((2, 1, 2))), DataError, "s must have shape"),
    (dict(s=np.ones((2, 1, 1)), rate=np.ones((3, 2))), DataError, "disagree"),
    (dict(rate=[1.0]), DataError, "rate must have shape"),
    (dict(method="gd"), ConfigError, "learning rate"),
    (dict(method="gd", lr=0.3, save_at=[0.0, 0.5]), ConfigError, "multiples of lr"),
    (dict(method="gd", lr=0.1, events=1.0), ConfigError, "events"),
])
def test_bad_input_raises_project_errors(kwargs, error, match):
    args = dict(b0=[0.1, 0.1], t_end=10.0)
    args.update(kwargs)
    if args.get("method") == "gd":
        args.pop("t_end")
    with pytest.raises(error, match=match):
        integrate_system(d2_system(), **args)


def test_system_must_be_a_race_system():
    with pytest.raises(ConfigError, match="RaceSystem"):
        integrate_system("not a system", [0.1], t_end=1.0)


# ------------------------------------------------------------------------------------------
# the benchmark workload; output layout; defaults


def test_auto_is_default_and_meets_the_benchmark_accuracy():
    """The routing-mode workload of bench/bench_integrate.py (rtol 1e-8, atol 1e-10, t to 2000)
    against the exact solution: max abs error below numbalsoda's LSODA (3.5e-7), in few steps."""
    from fastrace.exact import routing_mode_trajectory

    s = np.array([1.0, 2.7, 5.5, 10.0])
    system = routing_system(s)
    t = np.linspace(0.0, 2000.0, 400)
    sol = integrate_system(system, np.full(3, 0.2), save_at=t, rtol=1e-8, atol=1e-10)
    assert sol.method == "auto"
    a1, a2, a3 = routing_mode_trajectory(t, s, M, K, 0.2)
    want = np.stack([a1, a2, a3], axis=-1)
    assert np.abs(sol.b - want).max() < 3.5e-7
    assert sol.n_steps.max() < 150  # dopri5 alone needs thousands (stability-capped)


@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.parametrize("method", ["auto", "gd"])
def test_solution_b_is_a_time_first_view_of_system_major_output(backend, method):
    system = routing_system([3.0, 1.0])
    b0 = np.array([[[0.2, 0.2, 0.2], [0.1, 0.3, 0.2]]] * 3)  # (3 sets, 2 modes, 3 edges)
    b0[1] *= 1.5
    kwargs = dict(lr=0.05, steps=40) if method == "gd" else dict(t_end=10.0)
    sol = integrate_system(system, b0, method=method, backend=backend, **kwargs)
    n_t = sol.t.size
    assert sol.b.shape == (n_t, 3, 2, 3)
    # system-major underneath: moving time back next to the edges gives a C-contiguous array
    assert np.moveaxis(sol.b, 0, -2).flags.c_contiguous
    assert not sol.b.flags.owndata
    # and every system equals a run of that system alone
    alone = integrate_system(system.with_modes([[3.0]], [[1.0]]), b0[1, 0], method=method,
                             backend=backend, **kwargs)
    np.testing.assert_array_equal(sol.b[:, 1, 0], alone.b[:, 0])


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_one_path_system_with_no_target_grows_at_rate_s(backend):
    """T(0) may be empty (the path's output has no target): then r = s, and db_e = s times the
    other edges' product. The C core's one-path branch must not be taken (it assumes T(0) =
    {0}); compared with the plain formula, with a d array whose memory beyond it is not 0."""
    d_storage = np.full((1, 4), 7.0)
    system = RaceSystem(n_edges=2, path_ptr=[0, 2], path_edges=[0, 1], target_ptr=[0, 0],
                        target_paths=np.zeros(0, dtype=np.int64), s=[[1.5]],
                        d=d_storage[:, :0])
    b = np.array([0.5, 0.3])
    np.testing.assert_allclose(system.rhs(b)[0], [1.5 * 0.3, 1.5 * 0.5], rtol=1e-15)
    if backend == "c":  # the binding itself, with d a zero-width view into memory holding 7.0
        from fastrace import _race

        out = _race.rhs(system.path_ptr, system.path_edges, system.target_ptr,
                        system.target_paths, b[None], system.s, d_storage[:, :0], None)
        np.testing.assert_allclose(out[0], [1.5 * 0.3, 1.5 * 0.5], rtol=1e-15)
    sol = integrate_system(system, b, method="gd", lr=0.1, steps=1, backend=backend)
    np.testing.assert_allclose(sol.b[1, 0], b + 0.1 * np.array([1.5 * 0.3, 1.5 * 0.5]),
                               rtol=1e-15)


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_dense_output_with_steps_below_the_reciprocal_range(backend):
    """Steps h < 5.6e-309 have no finite reciprocal: saved points inside such a step must still
    be interpolated (theta by division), not NaN."""
    system = routing_system([3.0])
    sol = integrate_system(system, [0.3, 0.5, 0.4], method="dopri5",
                           save_at=[0.0, 1e-309, 4e-309], h0=2e-309, hmax=2e-309,
                           backend=backend, check=False)
    assert np.isfinite(sol.b[:, 0]).all()
    np.testing.assert_allclose(sol.b[1, 0], [0.3, 0.5, 0.4], rtol=1e-12)


def _misaligned(values) -> np.ndarray:
    """A float64 copy of values whose data start one byte past an 8-byte boundary."""
    values = np.asarray(values, dtype=np.float64)
    raw = np.zeros(values.nbytes + 9, dtype=np.uint8)
    start = (-raw.ctypes.data) % 8 + 1
    out = raw[start:start + values.nbytes].view(np.float64).reshape(values.shape)
    out[...] = values
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_misaligned_inputs_are_copied_not_refused(backend):
    system = routing_system([3.0, 1.0])
    s = np.array([[[2.0], [1.0]], [[4.0], [0.5]]])
    rate = np.array([[0.5, 1.0, 0.5], [1.0, 1.0, 1.0]])
    b0 = np.full((2, 2, 3), 0.2)
    kwargs = dict(save_at=np.linspace(0.0, 10.0, 5), backend=backend)
    ref = integrate_system(system, b0, s=s, rate=rate, **kwargs)
    got = integrate_system(system, _misaligned(b0), s=_misaligned(s), rate=_misaligned(rate),
                           **kwargs)
    np.testing.assert_array_equal(got.b, ref.b)
    one_rate = integrate_system(system, b0[0], rate=_misaligned(rate[0]), **kwargs)
    np.testing.assert_array_equal(one_rate.b, integrate_system(system, b0[0], rate=rate[0],
                                                               **kwargs).b)


@pytest.mark.parametrize("backend", ["c", "numba"])
def test_misaligned_times_and_thresholds_are_copied_not_refused(backend):
    system = routing_system([3.0, 1.0])
    save_at = np.linspace(0.0, 10.0, 5)
    thresholds = np.array([0.5])
    ref = integrate_system(system, [0.2, 0.2, 0.2], save_at=save_at, events=thresholds,
                           backend=backend)
    got = integrate_system(system, [0.2, 0.2, 0.2], save_at=_misaligned(save_at),
                           events=_misaligned(thresholds), backend=backend)
    np.testing.assert_array_equal(got.b, ref.b)
    np.testing.assert_array_equal(got.events, ref.events)


def test_race_system_methods_take_misaligned_arrays_and_leave_inputs_writable():
    system = routing_system([3.0, 1.0])
    b = np.array([[0.3, 0.5, 0.7], [0.2, 0.4, 0.6]])
    np.testing.assert_array_equal(system.rhs(_misaligned(b)), system.rhs(b))
    np.testing.assert_array_equal(system.jacobian(_misaligned(b)), system.jacobian(b))
    np.testing.assert_array_equal(system.path_strengths(_misaligned(b)), system.path_strengths(b))
    s = np.array([[2.0], [1.0]])
    np.testing.assert_array_equal(system.loss(_misaligned(b), s=_misaligned(s)),
                                  system.loss(b, s=s))
    # structure arrays are copied: the caller's stay writable
    path_ptr, path_edges = np.array([0, 3]), np.array([0, 1, 2])
    RaceSystem(n_edges=3, path_ptr=path_ptr, path_edges=path_edges, target_ptr=[0, 1],
               target_paths=[0], s=[[1.0]], d=[[1.0]])
    assert path_ptr.flags.writeable and path_edges.flags.writeable


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(b0=[0.1 + 1j, 0.1]), DataError, "b0.*complex"),
    (dict(b0=np.array(["0.1", "0.1"])), DataError, "b0.*str"),
    (dict(s=np.ones((1, 1), dtype=complex)), DataError, "s.*complex"),
    (dict(rate=np.array([1.0, 1.0 + 2j])), DataError, "rate.*complex"),
    (dict(events=np.array([0.5 + 1j])), ConfigError, "events.*complex"),
    (dict(save_at=np.array([0.0, 1.0 + 1j])), DataError, "save_at.*complex"),
    (dict(method="gd", lr=0.1, save_at=np.array([0.0, 0.1 + 1j])), DataError, "save_at.*complex"),
])
def test_complex_and_string_inputs_are_refused_not_truncated(kwargs, error, match):
    """np.asarray(x, float64) drops imaginary parts with only a warning and parses strings."""
    args = dict(b0=[0.1, 0.1], t_end=1.0)
    args.update(kwargs)
    if args.get("method") == "gd":
        args.pop("t_end")
    with pytest.raises(error, match=match):
        integrate_system(d2_system(), **args)


@pytest.mark.parametrize("kwargs", [dict(lr=1e-300, t_end=1e10), dict(lr=0.1, save_at=[0.0, 1e30])])
def test_gd_step_counts_beyond_int64_are_refused(kwargs):
    """t_end / lr overflowing int64 used to give an empty 'successful' trajectory."""
    with pytest.raises(ConfigError, match="too many steps"):
        integrate_system(d2_system(), [0.1, 0.1], method="gd", **kwargs)


def test_numpy_integer_threads_and_huge_max_steps():
    sol = integrate_system(d2_system(), [0.1, 0.1], t_end=1.0, threads=np.int64(1))
    assert sol.ok
    with pytest.raises(ConfigError, match="max_steps"):
        integrate_system(d2_system(), [0.1, 0.1], t_end=1.0, max_steps=2**70)


@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.parametrize("method", ["gd", "dopri5"])
def test_outputs_larger_than_memory_are_refused_before_allocating(monkeypatch, backend, method):
    """Outputs beyond the memory available would be touched page by page (OOM killer)."""
    monkeypatch.setattr(_memory, "available_memory", lambda: 1 << 20)
    timing = dict(lr=0.01, steps=2 * 10**6) if method == "gd" else dict(
        save_at=np.linspace(0.0, 1.0, 2 * 10**6))
    with pytest.raises(ConfigError, match="GiB of memory"):
        integrate_system(d2_system(), [0.1, 0.1], method=method, backend=backend, **timing)
    small = dict(lr=0.01, steps=10) if method == "gd" else dict(t_end=1.0)
    assert integrate_system(d2_system(), [0.1, 0.1], method=method, backend=backend, **small).ok
