"""Exact solutions (fastrace.exact) against independent numerical solutions of the same ODEs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad, solve_ivp

from fastrace import exact
from fastrace.errors import ConfigError

TIGHT = {"method": "DOP853", "rtol": 1e-12, "atol": 1e-14}


def path_ode(t_end, s, d, pi0, depth, t_eval=None, tau=1.0, events=None):
    """Independent solution of tau dpi/dt = D pi^(2-2/D) (s - d pi)."""
    def rhs(_t, p):
        return depth * np.abs(p) ** (2.0 - 2.0 / depth) * (s - d * p) / tau
    return solve_ivp(rhs, (0.0, t_end), [pi0], t_eval=t_eval, events=events, **TIGHT)


def raw_time(pi1, s, d, pi0, depth, tau=1.0):
    """The time integral (tau/D) int dx / (x^(2-2/D) (s - d x)) by plain quadrature."""
    value, _ = quad(lambda x: 1.0 / (x ** (2.0 - 2.0 / depth) * (s - d * x)), pi0, pi1,
                    epsabs=0.0, epsrel=1e-13, limit=200)
    return tau / depth * value


def routing_ode(t_eval, s, M, K, b0, tau=1.0):
    """Independent solution of the three-variable routing system from a1 = a2 = a3 = b0."""
    def rhs(_t, a):
        a1, a2, a3 = a
        err = s - a1 * a2 * a3
        return [K / M**2 * a2 * a3 * err / tau, K / M * a1 * a3 * err / tau,
                K / M**2 * a1 * a2 * err / tau]
    sol = solve_ivp(rhs, (0.0, t_eval[-1]), [b0, b0, b0], t_eval=t_eval, **TIGHT)
    assert sol.success
    return sol.y


# ----------------------------------------------------------------------------- single path

CASES = [  # (s, d, pi0): growth from small and moderate strengths, and decay from above
    (1.0, 1.0, 1e-3),
    (3.0, 0.5, 0.2),
    (0.7, 2.0, 0.5),  # s/d = 0.35 < pi0: decays
]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("s, d, pi0", CASES)
def test_strength_matches_ode(depth, s, d, pi0):
    t = np.linspace(0.0, 12.0, 25)
    sol = path_ode(t[-1], s, d, pi0, depth, t_eval=t)
    got = exact.single_path_strength(t, s, d, pi0, depth=depth)
    np.testing.assert_allclose(got, sol.y[0], rtol=1e-9, atol=1e-13)


def test_strength_tau_scales_time():
    got = exact.single_path_strength(6.0, 2.0, 1.0, 0.01, depth=3, tau=3.0)
    assert got == pytest.approx(exact.single_path_strength(2.0, 2.0, 1.0, 0.01, depth=3),
                                rel=1e-13)


@pytest.mark.parametrize("depth", [2, 3, 4, 6])
@pytest.mark.parametrize("s, d, pi0, pi1", [(1.0, 1.0, 0.05, 0.9), (2.0, 3.0, 1.5, 0.8),
                                            (0.5, 0.25, 0.01, 1.99)])
def test_time_closed_form_vs_quadrature(depth, s, d, pi0, pi1):
    closed = exact.single_path_time(pi1, s, d, pi0, depth=depth)
    assert closed > 0
    assert closed == pytest.approx(raw_time(pi1, s, d, pi0, depth), rel=1e-10)
    assert closed == pytest.approx(exact.single_path_time(pi1, s, d, pi0, depth=depth,
                                                          method="quad"), rel=1e-12)


def test_depth2_log_form():
    s, d, pi0, pi1 = 1.5, 0.8, 0.02, 1.7
    expected = 1 / (2 * s) * math.log(pi1 * (s - d * pi0) / (pi0 * (s - d * pi1)))
    assert exact.single_path_time(pi1, s, d, pi0) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 7])
def test_time_matches_ode_event(depth):
    s, d, pi0, pi1 = 2.0, 1.3, 1e-3, 1.2
    def hit(_t, p):
        return p[0] - pi1
    hit.terminal = True
    sol = path_ode(1e4, s, d, pi0, depth, events=hit)
    t_hit = sol.t_events[0][0]
    assert exact.single_path_time(pi1, s, d, pi0, depth=depth) == pytest.approx(t_hit, rel=1e-9)
    assert exact.single_path_time(pi1, s, d, pi0, depth=depth, tau=0.5) == pytest.approx(
        0.5 * t_hit, rel=1e-9)


def test_time_inverts_depth2_closed_form():
    t = np.array([0.1, 1.0, 3.0, 7.0])
    pi = exact.single_path_strength(t, 1.2, 0.9, 0.01)
    np.testing.assert_allclose(exact.single_path_time(pi, 1.2, 0.9, 0.01), t, rtol=1e-10)


@pytest.mark.parametrize("depth", [3, 4])
def test_small_init_asymptote(depth):
    s, d = 1.5, 0.7
    errors = []
    for pi0 in (1e-6, 1e-9, 1e-12, 1e-15):
        exact_t = exact.single_path_time(0.5 * s / d, s, d, pi0, depth=depth)
        approx_t = exact.single_path_time_small_init(s, pi0, depth)
        errors.append(abs(exact_t / approx_t - 1.0))
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-3


def test_zero_start_is_a_fixed_point():
    assert exact.single_path_time(0.5, 1.0, 1.0, 0.0, depth=3) == math.inf
    assert exact.single_path_time(0.5, 1.0, 1.0, 0.0, depth=2) == math.inf
    assert exact.single_path_time(0.5, 1.0, 1.0, 0.0, depth=1) == pytest.approx(math.log(2.0))
    assert exact.single_path_strength(5.0, 1.0, 1.0, 0.0, depth=3) == 0.0
    assert exact.single_path_strength(np.inf, 2.0, 4.0, 0.1, depth=4) == 0.5
    assert exact.single_path_time(0.3, 1.0, 1.0, 0.3, depth=3) == 0.0


def test_broadcasting_shapes():
    t = np.linspace(0.0, 0.6, 4)[:, None]
    s = np.array([1.0, 2.0, 3.0])
    got = exact.single_path_strength(t, s, 1.0, 0.01, depth=3)
    assert got.shape == (4, 3)
    assert isinstance(exact.single_path_strength(1.0, 1.0, 1.0, 0.01, depth=3), float)
    times = exact.single_path_time(got[1:], s, 1.0, 0.01, depth=3)
    np.testing.assert_allclose(times, np.broadcast_to(t[1:], (3, 3)), rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 6), s=st.floats(0.1, 10.0), d=st.floats(0.1, 10.0),
       start=st.one_of(st.floats(1e-4, 0.9), st.floats(1.1, 5.0)),
       t_end=st.floats(0.01, 5.0))
def test_strength_and_time_random(depth, s, d, start, t_end):
    pi0 = start * s / d  # start as a fraction of the fixed point s/d
    sol = path_ode(t_end, s, d, pi0, depth)
    pi_end = sol.y[0, -1]
    got = exact.single_path_strength(t_end, s, d, pi0, depth=depth)
    assert got == pytest.approx(pi_end, rel=1e-9)
    if abs(pi_end - pi0) > 1e-6 * pi0 and abs(s - d * pi_end) > 1e-6 * s:
        assert exact.single_path_time(pi_end, s, d, pi0, depth=depth) == pytest.approx(
            t_end, rel=1e-7)


@pytest.mark.parametrize("call", [
    lambda: exact.single_path_time(1.0, 1.0, 1.0, 0.1),  # pi1 = s/d
    lambda: exact.single_path_time(1.5, 1.0, 1.0, 0.1, depth=3),  # beyond s/d
    lambda: exact.single_path_time(0.5, 1.0, 1.0, 2.0, depth=4),  # beyond, from above
    lambda: exact.single_path_time(0.05, 1.0, 1.0, 0.1),  # behind pi0
    lambda: exact.single_path_time(0.5, 1.0, 1.0, 1.0),  # starts at the fixed point
    lambda: exact.single_path_time(0.5, -1.0, 1.0, 0.1),  # negative s
    lambda: exact.single_path_time(0.5, 1.0, 0.0, 0.1),  # d = 0
    lambda: exact.single_path_time(0.5, 1.0, 1.0, -0.1),  # negative pi0
    lambda: exact.single_path_time(0.5, 1.0, 1.0, 0.1, depth=0),
    lambda: exact.single_path_time(0.5, 1.0, 1.0, 0.1, depth=2.5),
    lambda: exact.single_path_time(0.5, 1.0, 1.0, 0.1, method="simpson"),
    lambda: exact.single_path_strength(-1.0, 1.0, 1.0, 0.1),  # negative time
    lambda: exact.single_path_strength(1.0, np.nan, 1.0, 0.1),
    lambda: exact.single_path_strength(1.0, "one", 1.0, 0.1),
    lambda: exact.single_path_strength(1.0, 1.0, 1.0, 0.1, tau=0.0),
    lambda: exact.single_path_time_small_init(1.0, 0.01, 2),
])
def test_bad_single_path_input(call):
    with pytest.raises(ConfigError) as info:
        call()
    assert isinstance(info.value, ValueError)


# ----------------------------------------------------------------------------- routing

ROUTING = [(7, 4, 0.08), (3, 1, 0.3), (1, 1, 0.2)]


@pytest.mark.parametrize("M, K, b0", ROUTING)
def test_routing_trajectory_matches_three_variable_system(M, K, b0):
    s = np.array([6.0, 2.0, 0.5])
    t = np.linspace(0.0, 40.0, 41)
    a1, a2, a3 = exact.routing_mode_trajectory(t, s, M, K, b0, tau=1.3)
    assert a1.shape == (41, 3)
    for m, s_m in enumerate(s):
        direct = routing_ode(t, s_m, M, K, b0, tau=1.3)
        # the conservation laws the reduction to one variable relies on
        np.testing.assert_allclose(M * direct[0] ** 2 - direct[1] ** 2, (M - 1) * b0**2,
                                   atol=1e-10)
        np.testing.assert_allclose(direct[0], direct[2], rtol=1e-10)
        for got, want in zip((a1[:, m], a2[:, m], a3[:, m]), direct):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_routing_trajectory_unsorted_times_and_scalar_mode():
    t = np.array([3.0, 0.0, 1.0, 3.0])
    a1, a2, _ = exact.routing_mode_trajectory(t, 4.0, 5, 2, 0.1)
    assert a2.shape == (4,)
    assert a2[1] == pytest.approx(0.1) and a1[1] == pytest.approx(0.1)
    assert a2[0] == a2[3] and a2[2] < a2[0]


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 12), s=st.floats(0.01, 100.0), b0=st.floats(1e-4, 3.0))
def test_routing_fixed_point_solves_cubic(M, s, b0):
    a = exact.routing_fixed_point(s, M, b0)
    c0 = (M - 1) * b0**2
    assert a > 0
    assert a * (a * a + c0) / M == pytest.approx(s, rel=1e-13)


def test_routing_fixed_point_to_round_off():
    rng = np.random.default_rng(0)
    s, b0 = 10 ** rng.uniform(-4, 4, 5000), 10 ** rng.uniform(-8, 1, 5000)
    for M in (1, 2, 7, 40):
        a = exact.routing_fixed_point(s, M, b0)
        c0 = (M - 1) * b0**2
        np.testing.assert_allclose(a * (a * a + c0) / M, s, rtol=4e-15)


@pytest.mark.parametrize("M, K, b0", [*ROUTING, (7, 4, 1e-6)])
def test_routing_trajectory_reaches_fixed_point(M, K, b0):
    s = 3.0
    t_end = 100 * exact.routing_drop_time(s, M, K, b0)  # long after convergence
    a1, a2, a3 = exact.routing_mode_trajectory([t_end], s, M, K, b0)
    star = exact.routing_fixed_point(s, M, b0)
    assert a2[0] == pytest.approx(star, rel=1e-11)
    assert a1[0] * a2[0] * a3[0] == pytest.approx(s, rel=1e-11)


@pytest.mark.parametrize("M, K, b0", [*ROUTING, (7, 4, 1e-6), (40, 3, 1e-3)])
def test_routing_learning_time_inverts_trajectory(M, K, b0):
    s, tau = 2.5, 0.7
    star = exact.routing_fixed_point(s, M, b0)
    t = np.linspace(0.05, 2.0, 30) * exact.routing_drop_time(s, M, K, b0, tau=tau)
    _, a2, _ = exact.routing_mode_trajectory(t, s, M, K, b0, tau=tau)
    keep = a2 < star * (1 - 1e-4)  # t(a2) is ill-conditioned right at the fixed point
    assert keep.sum() >= 10
    np.testing.assert_allclose(exact.routing_learning_time(a2[keep], s, M, K, b0, tau=tau),
                               t[keep], rtol=1e-8)


def test_routing_learning_time_vs_raw_quadrature():
    s, M, K, b0 = 6.0, 7, 4, 0.08
    c0 = (M - 1) * b0**2
    a2 = 0.9 * exact.routing_fixed_point(s, M, b0)
    raw, _ = quad(lambda x: 1.0 / ((x * x + c0) * (s - x * (x * x + c0) / M)), b0, a2,
                  epsabs=0.0, epsrel=1e-13, limit=200)
    assert exact.routing_learning_time(a2, s, M, K, b0) == pytest.approx(M**2 / K * raw,
                                                                         rel=1e-10)


def test_routing_learning_time_from_above():
    s, M, K, b0 = 0.5, 4, 3, 1.5  # b0 above the fixed point: a2 decays to it
    star = exact.routing_fixed_point(s, M, b0)
    assert star < b0
    t = np.array([0.5, 2.0, 5.0])
    _, a2, _ = exact.routing_mode_trajectory(t, s, M, K, b0)
    assert np.all((a2 > star) & (a2 < b0))
    np.testing.assert_allclose(exact.routing_learning_time(a2, s, M, K, b0), t, rtol=1e-8)


def test_routing_theta_form():
    M, K, b0, s = 5, 2, 0.2, 3.0
    c0 = (M - 1) * b0**2
    theta = np.linspace(-1.0, 6.0, 15)
    a1, a2, _a3 = exact.routing_a_from_theta(theta, M, b0)
    np.testing.assert_allclose(M * a1**2 - a2**2, c0, rtol=1e-12)
    np.testing.assert_allclose(exact.routing_theta_from_a2(a2, M, b0), theta, atol=1e-12)
    # chain rule: dtheta/dt * da2/dtheta equals the one-variable a2 equation
    da2_dtheta = np.sqrt(c0) * np.cosh(theta / 2) / 2
    a2_rate = K / M**2 * (a2**2 + c0) * (s - a2 * (a2**2 + c0) / M)
    np.testing.assert_allclose(exact.routing_theta_rhs(theta, s, M, K, b0) * da2_dtheta,
                               a2_rate, rtol=1e-12, atol=1e-14)
    assert exact.routing_theta_from_a2(b0, M, b0) == pytest.approx(
        2 * math.asinh(1 / math.sqrt(M - 1)))


@pytest.mark.parametrize("M, K, b0", ROUTING)
def test_routing_drop_time(M, K, b0):
    s, fraction = 4.0, 0.3
    t_drop = exact.routing_drop_time(s, M, K, b0, fraction=fraction)
    _, a2, _ = exact.routing_mode_trajectory([t_drop], s, M, K, b0)
    assert a2[0] == pytest.approx(fraction * exact.routing_fixed_point(s, M, b0), rel=1e-8)


@pytest.mark.parametrize("M, K", [(7, 4), (10, 3), (1, 1)])
def test_routing_small_init_limits(M, K):
    s = 2.0
    errors = []
    for b0 in (1e-2, 1e-4, 1e-6):
        ratio = (exact.routing_drop_time(s, M, K, b0)
                 / exact.routing_drop_time_small_init(s, M, K, b0))
        errors.append(abs(ratio - 1))
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-3
    limit = exact.routing_speed_advantage_small_init(M, K)
    assert exact.routing_speed_advantage(M, K, s, 1e-6) == pytest.approx(limit, rel=1e-4)


def test_routing_speed_advantage_definition():
    assert exact.routing_speed_advantage(1, 1, 2.0, 0.05) == pytest.approx(1.0, rel=1e-14)
    assert exact.routing_speed_advantage_small_init(1, 1) == 1.0
    # independent: integrate both one-variable a2 equations to the same fraction of a2*
    M, K, s, b0 = 7, 4, 3.0, 0.05

    def steps(M, K):
        c0 = (M - 1) * b0**2
        star = exact.routing_fixed_point(s, M, b0)

        def hit(_t, a):
            return a[0] - 0.5 * star
        hit.terminal = True
        sol = solve_ivp(lambda _t, a: K / M**2 * (a**2 + c0) * (s - a * (a**2 + c0) / M),
                        (0.0, 1e6), [b0], events=hit, **TIGHT)
        return sol.t_events[0][0] / M**2  # routing time per step is proportional to M^2
    assert exact.routing_speed_advantage(M, K, s, b0) == pytest.approx(
        steps(1, 1) / steps(M, K), rel=1e-8)
    assert exact.routing_speed_advantage(M, K, s, b0) > 1


def test_routing_modes_follow_gradient_descent_of_the_network():
    """Aligned gradient descent on the full routing network equals the per-mode Euler map with
    dt = routing_time_per_step, and its loss equals routing_mode_loss (MATH.md section 5)."""
    rng = np.random.default_rng(3)
    M, K, P, n_out, hidden, lr, b0 = 3, 2, 3, 4, 5, 0.3, 0.4
    trained = [(i, (i + k) % M) for i in range(M) for k in range(K)]  # circulant gate
    sigma = np.array([3.0, 2.0, 1.0])
    U = np.linalg.qr(rng.standard_normal((n_out, P)))[0]
    V = np.linalg.qr(rng.standard_normal((P, P)))[0]
    R1 = np.linalg.qr(rng.standard_normal((hidden, hidden)))[0][:, :P]
    R2 = np.linalg.qr(rng.standard_normal((hidden, hidden)))[0][:, :P]
    X = np.eye(P)
    Y = U @ np.diag(sigma) @ V.T
    B = np.diag(np.full(P, b0))
    W_in = [R1 @ B @ V.T for _ in range(M)]
    W_h = R2 @ B @ R1.T
    W_out = [U @ B @ R2.T for _ in range(M)]
    a1 = a2 = a3 = np.full(P, b0)
    dt = exact.routing_time_per_step(lr, M, P, n_out)
    c = 1.0 / (P * n_out)
    for _ in range(20):
        loss = sum(c * np.sum((W_out[j] @ W_h @ W_in[i] @ X - Y) ** 2) for i, j in trained)
        assert loss == pytest.approx(exact.routing_mode_loss(a1 * a2 * a3, sigma, M, K, P,
                                                             n_out), rel=1e-12)
        g_in = [np.zeros_like(w) for w in W_in]
        g_out = [np.zeros_like(w) for w in W_out]
        g_h = np.zeros_like(W_h)
        for i, j in trained:
            E = W_out[j] @ W_h @ W_in[i] @ X - Y
            g_in[i] += 2 * c * (W_out[j] @ W_h).T @ E @ X.T
            g_h += 2 * c * W_out[j].T @ E @ (W_in[i] @ X).T
            g_out[j] += 2 * c * E @ (W_h @ W_in[i] @ X).T
        W_in = [w - lr * g for w, g in zip(W_in, g_in)]
        W_out = [w - lr * g for w, g in zip(W_out, g_out)]
        W_h = W_h - lr * g_h
        err = sigma - a1 * a2 * a3
        a1, a2, a3 = (a1 + dt * K / M**2 * a2 * a3 * err, a2 + dt * K / M * a1 * a3 * err,
                      a3 + dt * K / M**2 * a1 * a2 * err)
    for i in range(M):
        np.testing.assert_allclose(R1.T @ W_in[i] @ V, np.diag(a1), atol=1e-12)
        np.testing.assert_allclose(U.T @ W_out[i] @ R2, np.diag(a3), atol=1e-12)
    np.testing.assert_allclose(R2.T @ W_h @ R1, np.diag(a2), atol=1e-12)
    assert a2[0] > 2 * b0  # the run actually moved


def test_routing_conversions():
    assert exact.routing_time_per_step(0.02, 7, 4, 7) == pytest.approx(3.5 * 0.02, rel=1e-15)
    pi = np.array([[0.0, 0.0], [1.0, 2.0]])
    loss = exact.routing_mode_loss(pi, [1.0, 3.0], 7, 4, 4, 7)
    np.testing.assert_allclose(loss, [1.0 * 10.0, 1.0 * 1.0])


@pytest.mark.parametrize("call", [
    lambda: exact.routing_fixed_point(1.0, 3, 0.0),  # b0 = 0
    lambda: exact.routing_fixed_point(-1.0, 3, 0.1),  # negative s
    lambda: exact.routing_learning_time(10.0, 1.0, 3, 2, 0.1),  # beyond the fixed point
    lambda: exact.routing_learning_time(0.05, 1.0, 3, 2, 0.1),  # behind b0
    lambda: exact.routing_learning_time(0.5, 1.0, 3, 4, 0.1),  # K > M
    lambda: exact.routing_learning_time(0.5, 1.0, 0, 1, 0.1),  # M = 0
    lambda: exact.routing_mode_trajectory([-1.0], 1.0, 3, 2, 0.1),
    lambda: exact.routing_mode_trajectory([1.0], np.ones((2, 2)), 3, 2, 0.1),
    lambda: exact.routing_theta_rhs(0.3, 1.0, 1, 1, 0.1),  # theta form needs M >= 2
    lambda: exact.routing_drop_time(1.0, 3, 2, 0.1, fraction=1.0),
    lambda: exact.routing_drop_time(0.01, 3, 2, 0.5),  # b0 already past the fraction
    lambda: exact.routing_time_per_step(-0.1, 3, 4, 7),
    lambda: exact.routing_mode_loss(np.zeros((4, 3)), [1.0, 2.0], 3, 2, 4, 7),
])
def test_bad_routing_input(call):
    with pytest.raises(ConfigError) as info:
        call()
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------ learning_times on any system
def test_learning_times_single_path_matches_closed_form():
    from fastrace.system import RaceSystem

    s, d, b = 3.0, 1.5, 0.05
    system = RaceSystem.from_paths([[0, 1]], s=[[s]], d=[[[d]]])
    out = exact.learning_times(system, np.full(2, b), fraction=0.5)
    expected = exact.single_path_time(0.5 * s / d, s, d, b * b, depth=2)
    assert out.winner.tolist() == [0]
    assert out.final[0, 0] == pytest.approx(s / d, rel=1e-8)
    assert out.times[0, 0] == pytest.approx(expected, rel=1e-8)


def test_learning_times_predicts_the_winner_of_a_race():
    # a direct path (one edge) and a deep path (two edges) to the same output, same data:
    # from a small start the shallow path learns exponentially fast and takes the mode
    from scipy.integrate import solve_ivp

    from fastrace.system import RaceSystem

    s = np.array([[2.0, 2.0]])
    d = np.ones((1, 2, 2))
    system = RaceSystem.from_paths([[0], [1, 2]], s=s, d=d)
    b0 = np.array([1e-3, 1e-2, 1e-2])
    out = exact.learning_times(system, b0, fraction=0.5)

    def rhs(_t, b):
        err = 2.0 - (b[0] + b[1] * b[2])
        return [err, b[2] * err, b[1] * err]

    ref = solve_ivp(rhs, (0, out.t_end), b0, method="LSODA", rtol=1e-12, atol=1e-14,
                    dense_output=True)
    pi = np.array([ref.y[0, -1], ref.y[1, -1] * ref.y[2, -1]])
    np.testing.assert_allclose(out.final[0], pi, rtol=1e-6, atol=1e-9)
    assert out.winner[0] == int(np.argmax(pi)) == 0
    grid = np.linspace(0, out.t_end, 200001)
    shallow = ref.sol(grid)[0]
    crossing = grid[np.argmax(shallow >= 0.5 * pi[0])]
    assert out.times[0, 0] == pytest.approx(crossing, abs=2 * (grid[1] - grid[0]))
    # the deep path ends far below the winner: it never learns the mode
    assert abs(pi[1]) < 0.05 * abs(pi[0]) and np.isnan(out.times[0, 1])
    assert out.order[0, 0] == 0


def test_learning_times_rejects_bad_fraction():
    from fastrace.system import RaceSystem

    system = RaceSystem.from_paths([[0, 1]], s=[[1.0]], d=[[[1.0]]])
    with pytest.raises(ConfigError, match="fraction"):
        exact.learning_times(system, 0.1, fraction=1.5)


@pytest.mark.parametrize("depth", [2, 3, 4, 6, 10])
def test_time_and_strength_far_above_the_fixed_point(depth):
    # decay from y = d pi0 / s >> 1: the time integral is tiny while each term of the closed
    # antiderivative is ~ln y, so a plain difference of antiderivatives loses every digit
    # (it even gave negative times). Reference: the integral in x = 1/y by plain quadrature.
    s, d = 1.0, 1.0
    a = 1.0 - 2.0 / depth  # dt = x^a / (1 - x) dx * (time scale), x = 1/y
    for pi0, pi1 in [(1e5, 1e4), (1e8, 1e6), (1e12, 1e10), (1e5, 1.5)]:
        ref, _ = quad(lambda x: x**a / (1.0 - x), 1.0 / pi0, 1.0 / pi1, epsabs=0.0,
                      epsrel=1e-13, limit=200)
        ref /= depth
        got = exact.single_path_time(pi1, s, d, pi0, depth=depth)
        assert got == pytest.approx(ref, rel=1e-9, abs=0.0)
        back = exact.single_path_strength(ref, s, d, pi0, depth=depth)
        assert back == pytest.approx(pi1, rel=1e-8, abs=0.0)


def test_learning_times_rejects_bad_b0_shape_and_doublings():
    from fastrace.system import RaceSystem

    system = RaceSystem.from_paths([[0, 1]], s=[[1.0]], d=[[[1.0]]])
    with pytest.raises(ConfigError, match="b0"):
        exact.learning_times(system, np.full(3, 0.1))
    with pytest.raises(ConfigError, match="max_doublings"):
        exact.learning_times(system, 0.1, max_doublings=-1)
