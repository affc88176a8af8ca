"""Exact solutions of the reduced dynamics: closed forms, learning times and fixed points.

Everything here is pure numpy/scipy (MATH.md section 4). Times are in units of ``tau`` (the
gradient-flow time constant, ``tau * dW/dt = -dL/dW``). For the loss of MATH.md section 1 a
gradient-descent step of learning rate ``lr`` is ``lr * tau`` (DESIGN.md); the routing
functions' per-mode equations assume the pair-averaged loss of MATH.md section 5, for which one
step is ``routing_time_per_step(lr, M, P, n_out)``. Bad arguments raise ConfigError (a
ValueError); a failed quadrature or ODE integration raises IntegrationError.

Single path of depth D, balanced weights (``pi = b**D``), one mode with correlations (s, d):

    tau dpi/dt = D pi**(2 - 2/D) (s - d pi)

With ``y = d pi / s`` (pi in units of its fixed point s/d) and ``u = y**(1/D)`` the time is

    t = tau d**(1 - 2/D) / (D s**(2 - 2/D)) * [A_D(u1) - A_D(u0)]

where ``A_D`` is an antiderivative of ``1 / (y**(2 - 2/D) (1 - y))`` in y, elementary for every
integer D (derived below ``_antiderivative``):

    D = 1:  A = -ln|1 - y|
    D = 2:  A = ln y - ln|1 - y|
    D = 3:  A = -3/u - ln|1 - y| + (3/2) ln(1 + u + u^2) - sqrt(3) arctan((2u + 1)/sqrt(3))
    D > 3:  A = -(D/(D-2)) u**(2-D) - ln|1 - y| - sum_k Re[(w_k^2 - 1) ln(u - w_k)],
            w_k = exp(2 pi i k / D), k = 1 .. D-1 (the D-th roots of unity other than 1).

Routing mode (MATH.md section 4, circulant gate, M domains, each input trained with K outputs):
a1 = a3, ``M a1^2 - a2^2 = c0 = (M - 1) b0^2`` and

    tau da2/dt = (K/M^2) (a2^2 + c0) (s - a2 (a2^2 + c0) / M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import operator
from typing import Literal

import numpy as np
from scipy import integrate, optimize, special

from .errors import ConfigError, IntegrationError

__all__ = [
    "routing_a_from_theta",
    "routing_drop_time",
    "routing_drop_time_small_init",
    "routing_fixed_point",
    "routing_learning_time",
    "routing_mode_loss",
    "routing_mode_trajectory",
    "routing_speed_advantage",
    "routing_speed_advantage_small_init",
    "routing_theta_from_a2",
    "routing_theta_rhs",
    "routing_time_per_step",
    "single_path_strength",
    "single_path_time",
    "single_path_time_small_init",
]

ArrayLike = float | np.ndarray

# Tolerances of the numerical parts (quadrature, root finding, ODE integration).
_QUAD_EPSREL = 1e-13
_ODE_RTOL = 3e-14  # near the 100 eps floor of scipy; the psi form makes this cheap
_ODE_ATOL = 1e-15


# ----------------------------------------------------------------------------- validation


def _as_floats(name: str, value: object, *, allow_inf: bool = False) -> np.ndarray:
    """``value`` as a float64 array; a ConfigError for non-numbers, NaN and (unless allowed) inf."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a real number or an array of them, got {value!r}") from exc
    bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
    if np.any(bad):
        raise ConfigError(f"{name} must be {'not NaN' if allow_inf else 'finite'}, got {value!r}")
    return arr


def _first_bad(arr: np.ndarray, ok: np.ndarray) -> float:
    """The first entry of ``arr`` where ``ok`` fails (for error messages)."""
    arr, ok = np.broadcast_arrays(arr, ok)
    return float(arr[~ok].flat[0])


def _positive(name: str, arr: np.ndarray) -> None:
    ok = arr > 0
    if not np.all(ok):
        raise ConfigError(f"{name} must be > 0, got {_first_bad(arr, ok)!r}")


def _integer(name: str, value: object, minimum: int) -> int:
    """An integer parameter (a float with an integer value is accepted), at least ``minimum``."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        if isinstance(value, float | np.floating) and float(value).is_integer():
            result = int(value)
        else:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if result < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {result}")
    return result


def _tau(tau: object) -> float:
    arr = _as_floats("tau", tau)
    if arr.ndim != 0 or arr <= 0:
        raise ConfigError(f"tau must be a single number > 0, got {tau!r}")
    return float(arr)


def _mk(M: object, K: object) -> tuple[int, int]:
    M = _integer("M", M, 1)
    K = _integer("K", K, 1)
    if K > M:
        raise ConfigError(f"K (outputs trained per input) must be <= M, got K={K}, M={M}")
    return M, K


def _out(arr: np.ndarray) -> ArrayLike:
    """A Python float for 0-d results, the array otherwise."""
    return float(arr) if np.ndim(arr) == 0 else arr


# ----------------------------------------------------------------------------- single path


def _antiderivative(u: np.ndarray, gap: np.ndarray, depth: int) -> np.ndarray:
    """An antiderivative A_D of ``1 / (y**(2-2/D) (1 - y))`` in y, as a function of ``u = y**(1/D)``.

    ``gap = 1 - y`` is passed separately (computed as (s - d pi)/s) so that ln|1 - y| keeps full
    relative precision near the fixed point. Requires u > 0 and gap != 0 (any sign).

    Derivation for D >= 3 (q = 2 - 2/D): 1/(y^q (1-y)) = y^-q + y^(1-q) + 1/(1-y)
    + (y^(2/D) - 1)/(1-y). The first three integrate to -(D/(D-2)) y^(-(D-2)/D) + (D/2) y^(2/D)
    - ln|1-y|. With y = u^D the last is -D u^(D-1) (1+u) / (1 + u + ... + u^(D-1)) du, a
    rational function: its polynomial part -D u integrates to -(D/2) u^2 (cancelling the second
    term) and its partial fractions are -sum_k (w_k^2 - 1)/(u - w_k) over the roots w_k != 1 of
    u^D = 1 (the residue of u^(D-1) (1+u) / (1 + ... + u^(D-1)) at w is (w^2 - 1)/D). For real
    u, u - w_k never crosses the branch cut of the complex log, and conjugate roots pair up
    into real logs and arctangents.
    """
    log_gap = np.log(np.abs(gap))
    if depth == 1:
        return -log_gap
    if depth == 2:
        return np.log(u * u) - log_gap
    if depth == 3:
        root3 = math.sqrt(3.0)
        return (-3.0 / u - log_gap + 1.5 * np.log1p(u * (1.0 + u))
                - root3 * np.arctan((2.0 * u + 1.0) / root3))
    roots = np.exp(2j * np.pi * np.arange(1, depth) / depth)
    u_c = np.asarray(u, dtype=np.complex128)[..., None]
    logs = np.sum(((roots**2 - 1.0) * np.log(u_c - roots)).real, axis=-1)
    return -(depth / (depth - 2.0)) * u ** (2.0 - depth) - log_gap - logs


def _tail(x: np.ndarray, depth: int) -> np.ndarray:
    """``integral_0^x v^(1-2/D) / (1 - v) dv`` for 0 <= x <= 1/2 (D >= 2), by its power series.

    Above the fixed point, x = 1/y turns the time integral into this one: no term of size ln y
    cancels, so tiny times far above s/d keep their relative precision.
    """
    c = 2.0 - 2.0 / depth
    n = np.arange(60.0)  # x <= 1/2: the tail of the series is below 2^-60
    x = np.asarray(x, dtype=np.float64)
    return x**c * np.sum(x[..., None] ** n / (n + c), axis=-1)


def _span(y0: np.ndarray, gap0: np.ndarray, y1: np.ndarray, gap1: np.ndarray,
          depth: int) -> np.ndarray:
    """``A_D(u1) - A_D(u0)`` for y1 between y0 and 1, without cancellation far above the fixed
    point: the part of the way above y = 2 comes from ``_tail`` in x = 1/y."""
    y0, gap0, y1, gap1 = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64)
                                               for a in (y0, gap0, y1, gap1)))
    high0 = y0 > 2.0
    if depth == 1 or not np.any(high0):  # D = 1: -ln|1 - y| has no cancelling terms
        return (_antiderivative(y1 ** (1.0 / depth), gap1, depth)
                - _antiderivative(y0 ** (1.0 / depth), gap0, depth))
    high1 = high0 & (y1 > 2.0)  # y1 lies between y0 and 1
    low_start = np.where(high0, 2.0, y0)
    low_gap = np.where(high0, -1.0, gap0)
    low_end = np.where(high1, 2.0, y1)
    end_gap = np.where(high1, -1.0, gap1)
    closed = (_antiderivative(low_end ** (1.0 / depth), end_gap, depth)
              - _antiderivative(low_start ** (1.0 / depth), low_gap, depth))
    x0 = 1.0 / np.maximum(y0, 2.0)
    x1 = 1.0 / np.maximum(y1, 2.0)
    return np.where(high0, _tail(x1, depth) - _tail(x0, depth), 0.0) + closed


def _quad_integrand(z: float, depth: int) -> float:
    """Integrand of the quadrature form, in z = ln u: exp((2-D) z) (1 - u^(2D-2)) / (1 - u^D).

    Written with expm1 on the side of z = 0 where it cannot overflow; the value at z = 0 is the
    limit (2D - 2)/D.
    """
    if z == 0.0:
        return (2.0 * depth - 2.0) / depth
    if z < 0.0:
        return math.exp((2.0 - depth) * z) * math.expm1((2.0 * depth - 2.0) * z) / math.expm1(depth * z)
    return math.expm1((2.0 - 2.0 * depth) * z) / math.expm1(-depth * z)


def _scaled_time_quad(y0: float, gap0: float, y1: float, gap1: float, depth: int) -> float:
    """``A_D(u1) - A_D(u0)`` by quadrature (independent of the closed forms).

    ``1/(y^q (1-y)) dy = D u^(1-D) du / (1 - u^D)``; subtracting ``D u^(D-1) du/(1 - u^D)``
    (the exact derivative of -ln|1 - y|) removes the singularity at the fixed point, and z = ln u
    turns the u^(1-D) singularity at the origin into a smooth exponential.
    """
    z0, z1 = math.log(y0) / depth, math.log(y1) / depth
    value, abserr = integrate.quad(_quad_integrand, z0, z1, args=(depth,), epsabs=0.0,
                                   epsrel=_QUAD_EPSREL, limit=400)
    if not abserr <= 1e-9 * max(abs(value), 1.0):
        raise IntegrationError(f"single_path_time: quadrature did not converge (error {abserr:g})")
    return math.log(abs(gap0 / gap1)) + depth * value


def _check_reachable(x1, x0, fixed, gap0, gap1, same, names: tuple[str, str, str, str]) -> None:
    """Raise ConfigError unless the flow from x0 reaches x1 in finite time: x1 must lie between x0
    and the fixed point (gap = fixed point − value, signed). names: (x1, x0, fixed point, what
    moves), for the messages."""
    n1, n0, nf, mover = names
    if np.any(~same & (gap1 == 0)):
        raise ConfigError(f"{n1} equals the fixed point {nf}, which the flow reaches only as "
                          "t -> inf")
    if np.any(~same & (gap0 == 0)):
        raise ConfigError(f"{n0} is the fixed point {nf}: the {mover} never moves")
    beyond = ~same & (np.sign(gap0) != np.sign(gap1))
    if np.any(beyond):
        raise ConfigError(f"{n1} = {_first_bad(x1, ~beyond)!r} lies beyond the fixed point {nf} = "
                          f"{_first_bad(fixed, ~beyond)!r}: the {mover} never reaches it")
    behind = ~same & (np.abs(gap1) > np.abs(gap0))
    if np.any(behind):
        raise ConfigError(f"{n1} = {_first_bad(x1, ~behind)!r} lies behind {n0} = "
                          f"{_first_bad(x0, ~behind)!r}: the flow moves only towards {nf}")


def _single_path_parameters(s: object, d: object, pi0: object, depth: object, tau: object):
    depth = _integer("depth", depth, 1)
    tau = _tau(tau)
    s = _as_floats("s", s)
    d = _as_floats("d", d)
    pi0 = _as_floats("pi0", pi0)
    _positive("s (input-output correlation of the mode)", s)
    _positive("d (input variance of the mode)", d)
    ok = pi0 >= 0
    if not np.all(ok):
        raise ConfigError(f"pi0 must be >= 0 (pi = b**depth of a balanced path), "
                          f"got {_first_bad(pi0, ok)!r}")
    return s, d, pi0, depth, tau


def _time_scale(s: np.ndarray, d: np.ndarray, depth: int, tau: float) -> np.ndarray:
    """tau d^(1-2/D) / (D s^(2-2/D)): the factor in front of A_D(u1) - A_D(u0)."""
    return tau * d ** (1.0 - 2.0 / depth) / (depth * s ** (2.0 - 2.0 / depth))


def single_path_time(pi1: ArrayLike, s: ArrayLike, d: ArrayLike, pi0: ArrayLike, depth: int = 2,
                     tau: float = 1.0, method: Literal["closed", "quad"] = "closed") -> ArrayLike:
    """Time for a balanced depth-``depth`` path to go from strength ``pi0`` to ``pi1``.

    Solves ``tau dpi/dt = D pi^(2-2/D) (s - d pi)`` (MATH.md section 4). Arguments broadcast
    together; the result has their broadcast shape (a float for scalars), in units of ``tau``.
    ``method="closed"`` uses the elementary closed form (D = 2: the log form
    ``(tau/(2s)) ln[pi1 (s - d pi0) / (pi0 (s - d pi1))]``; D = 3 and above: see the module
    docstring); ``"quad"`` evaluates the same time by scipy quadrature (a cross-check).

    ``pi1`` must lie between ``pi0`` and the fixed point ``s/d`` (approached from either side); the
    fixed point itself is reached only as t -> infinity. ``pi0 = 0`` with D >= 2 is a fixed point
    of the flow: the time to any ``pi1 > 0`` is ``inf``.
    Raises ConfigError for s <= 0, d <= 0, pi0 < 0 or an unreachable ``pi1``.
    """
    s, d, pi0, depth, tau = _single_path_parameters(s, d, pi0, depth, tau)
    pi1 = _as_floats("pi1", pi1)
    if method not in ("closed", "quad"):
        raise ConfigError(f"method must be 'closed' or 'quad', got {method!r}")
    pi1, s, d, pi0 = np.broadcast_arrays(pi1, s, d, pi0)
    gap0 = (s - d * pi0) / s  # 1 - y, signed, computed without cancellation in y
    gap1 = (s - d * pi1) / s
    same = pi1 == pi0
    _check_reachable(pi1, pi0, s / d, gap0, gap1, same, names=("pi1", "pi0", "s/d", "path"))

    stuck = ~same & (pi0 == 0) & (depth >= 2)
    live = ~same & ~stuck
    result = np.where(stuck, np.inf, 0.0)
    if np.any(live):
        y0, y1 = (d * pi0 / s)[live], (d * pi1 / s)[live]
        g0, g1 = gap0[live], gap1[live]
        if method == "closed":
            scaled = _span(y0, g0, y1, g1, depth)
        else:
            scaled = np.array([_scaled_time_quad(*args, depth) for args in zip(y0, g0, y1, g1)])
        result[live] = _time_scale(s[live], d[live], depth, tau) * scaled
    return _out(result)


def single_path_time_small_init(s: ArrayLike, pi0: ArrayLike, depth: int,
                                tau: float = 1.0) -> ArrayLike:
    """Leading small-``pi0`` learning time ``tau / ((D-2) s pi0^((D-2)/D))`` of a depth-D path (D >= 3).

    Independent of d and of the end point: it is the plateau length, which diverges as pi0 -> 0.
    """
    depth = _integer("depth", depth, 3)
    tau = _tau(tau)
    s = _as_floats("s", s)
    pi0 = _as_floats("pi0", pi0)
    _positive("s", s)
    _positive("pi0", pi0)
    return _out(tau / ((depth - 2) * s * pi0 ** ((depth - 2.0) / depth)))


def _solve_scaled_time(target: float, y0: float, gap0: float, depth: int) -> float:
    """y = d pi / s reached after scaled time ``target`` from y0 (depth >= 3, 0 < target < inf).

    Root-finds A_D(u(w)) - A_D(u0) = target in a variable w that stretches both ends: the logit
    w = ln(y / (1 - y)) below the fixed point, w = -ln(y - 1) above it. A_D is monotone in w and
    grows like w near the fixed point, so doubling a step brackets the root quickly.
    """
    if gap0 > 0:
        def point(w: float) -> tuple[float, float]:
            return float(special.expit(w)), float(special.expit(-w))
        w0 = math.log(y0) - math.log(gap0)
    else:
        def point(w: float) -> tuple[float, float]:
            return 1.0 + math.exp(-w), -math.exp(-w)
        w0 = -math.log(-gap0)

    def excess(w: float) -> float:
        y, gap = point(w)
        return float(_span(y0, gap0, y, gap, depth)) - target

    if excess(w0) >= 0.0:  # target below the resolution of A_D at y0 (only for huge A_D)
        return y0
    # Beyond w = 40 the gap |1 - y| < e^-40 is below double precision: y rounds to 1.
    w_max = max(w0, 0.0) + 40.0
    if excess(w_max) <= 0.0:
        return 1.0
    step = 1.0
    while w0 + step < w_max and excess(w0 + step) < 0.0:
        step *= 2.0
    step = min(step, w_max - w0)
    w = optimize.brentq(excess, w0, w0 + step, xtol=1e-14, rtol=4.0 * np.finfo(float).eps,
                        maxiter=400)
    return point(w)[0]


def single_path_strength(t: ArrayLike, s: ArrayLike, d: ArrayLike, pi0: ArrayLike,
                         depth: int = 2, tau: float = 1.0) -> ArrayLike:
    """Path strength pi(t) of a balanced depth-``depth`` path started at ``pi0`` (t >= 0).

    D = 1: ``pi = s/d - (s/d - pi0) exp(-d t/tau)``. D = 2 (closed form, MATH.md section 4):
    ``pi = s pi0 / (d pi0 + (s - d pi0) exp(-2 s t/tau))``. D >= 3: the time integral is inverted
    numerically (brentq on the elementary closed form of ``single_path_time``, to ~1e-14
    relative), so its cost is one root-find per element. Arguments broadcast together; t may be
    ``inf`` (giving the fixed point s/d).
    """
    s, d, pi0, depth, tau = _single_path_parameters(s, d, pi0, depth, tau)
    t = _as_floats("t", t, allow_inf=True)
    ok = t >= 0
    if not np.all(ok):
        raise ConfigError(f"t must be >= 0, got {_first_bad(t, ok)!r}")
    t, s, d, pi0 = np.broadcast_arrays(t, s, d, pi0)
    if depth == 1:
        return _out(s / d - (s / d - pi0) * np.exp(-d * t / tau))
    if depth == 2:
        moving = pi0 > 0  # pi0 = 0 stays at 0 (and would give 0/0 at t = inf)
        denominator = np.where(moving, d * pi0 + (s - d * pi0) * np.exp(-2.0 * s * t / tau), 1.0)
        return _out(s * pi0 / denominator)

    result = np.empty(t.shape)
    scale = _time_scale(s, d, depth, tau)
    for i in np.ndindex(t.shape):
        ti, si, di, p0 = float(t[i]), float(s[i]), float(d[i]), float(pi0[i])
        gap0 = (si - di * p0) / si
        if ti == 0.0 or p0 == 0.0 or gap0 == 0.0:
            result[i] = p0
        elif ti == np.inf:
            result[i] = si / di
        else:
            result[i] = si / di * _solve_scaled_time(ti / float(scale[i]), di * p0 / si, gap0,
                                                     depth)
    return _out(result)


# ----------------------------------------------------------------------------- routing mode


def _routing_c0(M: int, b0: np.ndarray) -> np.ndarray:
    """The conserved ``M a1^2 - a2^2 = (M - 1) b0^2``."""
    return (M - 1) * b0 * b0


def _routing_parameters(s: object, b0: object) -> tuple[np.ndarray, np.ndarray]:
    s = _as_floats("s", s)
    b0 = _as_floats("b0", b0)
    _positive("s (singular value of the mode)", s)
    _positive("b0 (initial weight of every edge in the mode; a2 = 0 is a fixed point)", b0)
    return s, b0


def _fixed_point(s: np.ndarray, M: int, b0: np.ndarray) -> np.ndarray:
    """Real root of a^3 + c0 a - M s = 0 (monotone cubic since c0 >= 0)."""
    c0 = _routing_c0(M, b0)
    if M == 1:
        return np.cbrt(s * np.ones_like(b0))
    # Trigonometric (hyperbolic) Cardano form: no cancellation for any c0 > 0.
    a = 2.0 * np.sqrt(c0 / 3.0) * np.sinh(
        np.arcsinh(1.5 * M * s / c0 * np.sqrt(3.0 / c0)) / 3.0)
    return a - (a**3 + c0 * a - M * s) / (3.0 * a * a + c0)  # one Newton polish


def routing_fixed_point(s: ArrayLike, M: int, b0: ArrayLike) -> ArrayLike:
    """Fixed point a2* of the shared edge: the real root of ``a2 (a2^2 + c0) / M = s``.

    ``c0 = (M - 1) b0^2``; the cubic is increasing, so the root is unique. s and b0 broadcast.
    """
    M = _integer("M", M, 1)
    s, b0 = _routing_parameters(s, b0)
    return _out(_fixed_point(s, M, b0))


def _routing_time_integral(a2: float, s: float, M: int, b0: float, a_star: float) -> float:
    """``integral_{b0}^{a2} dx / ((x^2 + c0)(s - x (x^2 + c0)/M))`` (the learning time without
    its factor tau M^2 / K).

    With A = x^2 + c0 and B = x^2 + a* x + a*^2 + c0 the integrand is M / (A B (a* - x)).
    Writing h = M/(A B): h(x)/(a* - x) = phi(x) + h(a*)/(a* - x), where
    phi = M [B* (a* + x) + A (2 a* + x)] / (A B A* B*) is smooth (no cancellation); the second
    part integrates to h(a*) ln(|a* - b0| / |a* - a2|). phi is integrated in z = ln x, which
    turns the 1/x^2-like peak near small b0 into a smooth bump.
    """
    c0 = (M - 1) * b0 * b0
    a_sq = a_star * a_star
    big_a, big_b = a_sq + c0, 3.0 * a_sq + c0

    def phi_dx(z: float) -> float:
        x = math.exp(z)
        a_x = x * x + c0
        b_x = x * x + a_star * x + a_sq + c0
        return M * (big_b * (a_star + x) + a_x * (2.0 * a_star + x)) / (a_x * b_x * big_a * big_b) * x

    smooth, abserr = integrate.quad(phi_dx, math.log(b0), math.log(a2), epsabs=0.0,
                                    epsrel=_QUAD_EPSREL, limit=400)
    if not abserr <= 1e-9 * max(abs(smooth), 1.0):
        raise IntegrationError(f"routing_learning_time: quadrature did not converge "
                               f"(error {abserr:g})")
    singular = M / (big_a * big_b) * math.log(abs(a_star - b0) / abs(a_star - a2))
    return smooth + singular


def routing_learning_time(a2: ArrayLike, s: ArrayLike, M: int, K: int, b0: ArrayLike,
                          tau: float = 1.0) -> ArrayLike:
    """Time for the shared edge of a routing mode to grow from b0 to ``a2`` (units of ``tau``).

    ``t(a2) = tau (M^2/K) integral_{b0}^{a2} dx / ((x^2 + c0)(s - x (x^2 + c0)/M))``, c0 =
    (M - 1) b0^2, by quadrature with the logarithmic singularity at the fixed point a2* taken
    out analytically. ``a2`` must lie between b0 and a2* (either side); a2, s and b0 broadcast.
    """
    M, K = _mk(M, K)
    tau = _tau(tau)
    s, b0 = _routing_parameters(s, b0)
    a2 = _as_floats("a2", a2)
    a2, s, b0 = np.broadcast_arrays(a2, s, b0)
    a_star = _fixed_point(s, M, b0)
    same = a2 == b0
    gap0, gap1 = a_star - b0, a_star - a2
    _check_reachable(a2, b0, a_star, gap0, gap1, same, names=("a2", "b0", "a2*", "mode"))
    result = np.zeros(a2.shape)
    for i in np.ndindex(a2.shape):
        if not same[i]:
            result[i] = _routing_time_integral(float(a2[i]), float(s[i]), M, float(b0[i]),
                                               float(a_star[i]))
    return _out(tau * M * M / K * result)


def routing_theta_from_a2(a2: ArrayLike, M: int, b0: ArrayLike) -> ArrayLike:
    """theta with ``a2 = sqrt(c0) sinh(theta/2)``, c0 = (M - 1) b0^2 (needs M >= 2)."""
    M = _integer("M", M, 2)
    a2 = _as_floats("a2", a2)
    b0 = _as_floats("b0", b0)
    _positive("b0", b0)
    return _out(2.0 * np.arcsinh(a2 / np.sqrt(_routing_c0(M, b0))))


def routing_a_from_theta(theta: ArrayLike, M: int,
                         b0: ArrayLike) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """(a1, a2, a3) from theta: ``a2 = sqrt(c0) sinh(theta/2)``, ``a1 = a3 = sqrt(c0/M) cosh(theta/2)``."""
    M = _integer("M", M, 2)
    theta = _as_floats("theta", theta)
    b0 = _as_floats("b0", b0)
    _positive("b0", b0)
    root_c0 = np.sqrt(_routing_c0(M, b0))
    a1 = root_c0 / math.sqrt(M) * np.cosh(theta / 2.0)
    a2 = root_c0 * np.sinh(theta / 2.0)
    return _out(a1), _out(a2), _out(a1.copy())


def _theta_rate(theta: np.ndarray | float, s: float, M: int, K: int, c0: float, tau: float):
    half = 0.5 * theta
    cosh = np.cosh(half)
    pi = c0**1.5 / M * np.sinh(half) * cosh * cosh
    return 2.0 * np.sqrt(c0) * K / (M * M) * cosh * (s - pi) / tau


def _log_gap_ode(_t: float, psi: np.ndarray, M: int, K: int, c0: float, tau: float,
                 theta_star: float, a_star: float, side: float) -> list[float]:
    """d psi/dt for psi = ln|theta* - theta|, side = sign(theta* - theta) (fixed along the flow).

    The theta equation is stiff once theta has converged (rate lambda over spans >> 1/lambda);
    psi instead tends to the constant rate -lambda, which an explicit integrator steps over in
    large steps. s - pi is factorised as (a* - a2)(a2^2 + a* a2 + a*^2 + c0)/M with
    a* - a2 = 2 sqrt(c0) cosh((theta* + theta)/4) sinh(gap/4), so no digits cancel.
    """
    gap = side * math.exp(psi[0])  # theta* - theta
    theta = theta_star - gap
    root_c0 = math.sqrt(c0)
    a2 = root_c0 * math.sinh(0.5 * theta)
    quarter = 0.25 * gap
    sinh_ratio = 0.25 * (1.0 + quarter * quarter / 6.0) if abs(quarter) < 1e-4 \
        else math.sinh(quarter) / gap  # sinh(gap/4)/gap
    rate = (2.0 * root_c0 * K / (M * M * tau) * math.cosh(0.5 * theta)
            * 2.0 * root_c0 * math.cosh(0.25 * (theta_star + theta)) * sinh_ratio
            * (a2 * a2 + a_star * a2 + a_star * a_star + c0) / M)
    return [-rate]


def _theta_trajectory(times: np.ndarray, s: float, M: int, K: int, b0: float,
                      tau: float) -> np.ndarray:
    """theta at sorted times >= 0 (M >= 2), integrating the theta form in psi = ln|theta* - theta|."""
    c0 = _routing_c0(M, b0)
    theta0 = 2.0 * math.asinh(b0 / math.sqrt(c0))
    a_star = float(_fixed_point(np.array(s), M, np.array(b0)))
    theta_star = 2.0 * math.asinh(a_star / math.sqrt(c0))
    if times[-1] == 0.0 or theta0 == theta_star:
        return np.full(times.shape, theta0)
    side = math.copysign(1.0, theta_star - theta0)
    sol = integrate.solve_ivp(
        _log_gap_ode, (0.0, times[-1]), [math.log(abs(theta_star - theta0))], method="DOP853",
        t_eval=times, args=(M, K, c0, tau, theta_star, a_star, side), rtol=_ODE_RTOL,
        atol=_ODE_ATOL)
    if sol.status != 0 or not np.all(np.isfinite(sol.y)):
        raise IntegrationError(f"routing_mode_trajectory: integration failed ({sol.message})")
    return theta_star - side * np.exp(sol.y[0])


def routing_theta_rhs(theta: ArrayLike, s: ArrayLike, M: int, K: int, b0: ArrayLike,
                      tau: float = 1.0) -> ArrayLike:
    """dtheta/dt of a routing mode: ``2 sqrt(c0) (K/M^2) cosh(theta/2) (s - pi) / tau``.

    ``pi = a1 a2 a3 = (c0^(3/2)/M) sinh(theta/2) cosh^2(theta/2)``; needs M >= 2 (c0 > 0).
    """
    M, K = _mk(M, K)
    if M < 2:
        raise ConfigError("the theta form needs M >= 2 (c0 = (M - 1) b0^2 > 0)")
    tau = _tau(tau)
    s, b0 = _routing_parameters(s, b0)
    theta = _as_floats("theta", theta)
    return _out(_theta_rate(theta, s, M, K, _routing_c0(M, b0), tau))


def routing_mode_trajectory(t: ArrayLike, s: ArrayLike, M: int, K: int, b0: ArrayLike,
                            tau: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights (a1, a2, a3) of routing modes at times ``t`` (>= 0, any order), from a1=a2=a3=b0.

    ``s`` (and ``b0``) may be scalars or 1-D arrays of modes; each result has shape
    ``t.shape + modes shape``. For M >= 2 the theta form is integrated with scipy's DOP853 at
    rtol 3e-14, in the variable ln|theta* - theta| (not stiff after convergence, never crosses
    the fixed point); for M = 1 (c0 = 0, a single path of depth 3) the closed-form inversion of
    ``single_path_strength`` is used. Raises IntegrationError if the integrator fails.
    """
    M, K = _mk(M, K)
    tau = _tau(tau)
    s, b0 = _routing_parameters(s, b0)
    t = _as_floats("t", t)
    ok = t >= 0
    if not np.all(ok):
        raise ConfigError(f"t must be >= 0, got {_first_bad(t, ok)!r}")
    s, b0 = np.broadcast_arrays(s, b0)
    if s.ndim > 1:
        raise ConfigError(f"s and b0 must be scalars or 1-D arrays of modes, got shape {s.shape}")
    modes = s.reshape(-1), b0.reshape(-1)
    a1 = np.empty(t.shape + (modes[0].size,))
    a2 = np.empty_like(a1)
    times, where = np.unique(t.reshape(-1), return_inverse=True)
    for m, (s_m, b0_m) in enumerate(zip(*modes)):
        s_m, b0_m = float(s_m), float(b0_m)
        if M == 1:
            # a1 = a2 = a3 = pi^(1/3) with tau dpi/dt = 3 K pi^(4/3) (s - pi)
            path = single_path_strength(times, s_m, 1.0, b0_m**3, depth=3, tau=tau / K)
            a1_m = a2_m = np.cbrt(path)
        else:
            theta = _theta_trajectory(times, s_m, M, K, b0_m, tau)
            c0 = _routing_c0(M, b0_m)
            root_c0 = math.sqrt(c0)
            a1_m = root_c0 / math.sqrt(M) * np.cosh(theta / 2.0)
            a2_m = root_c0 * np.sinh(theta / 2.0)
        a1[..., m] = np.reshape(a1_m, -1)[where].reshape(t.shape)
        a2[..., m] = np.reshape(a2_m, -1)[where].reshape(t.shape)
    out_shape = t.shape + s.shape
    a1, a2 = a1.reshape(out_shape), a2.reshape(out_shape)
    return a1, a2, a1.copy()


def routing_drop_time(s: ArrayLike, M: int, K: int, b0: ArrayLike, fraction: float = 0.5,
                      tau: float = 1.0) -> ArrayLike:
    """Time at which the shared edge a2 reaches ``fraction`` of its fixed point a2*.

    The "loss drop" time of the mode: with small b0, a2 stays near b0 on a plateau and then
    rises quickly to a2*, so the time is insensitive to ``fraction`` (0 < fraction < 1). Requires
    b0 < fraction * a2*.
    """
    M, K = _mk(M, K)
    s, b0 = _routing_parameters(s, b0)
    fraction = float(_as_floats("fraction", fraction))
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction must lie in (0, 1), got {fraction}")
    s, b0 = np.broadcast_arrays(s, b0)
    target = fraction * _fixed_point(s, M, b0)
    ok = b0 < target
    if not np.all(ok):
        raise ConfigError(f"b0 = {_first_bad(b0, ok)!r} already "
                          f"reaches fraction {fraction} of the fixed point")
    return routing_learning_time(target, s, M, K, b0, tau)


def _arctan_ratio(M: int) -> float:
    """arctan(sqrt(M-1)) / sqrt(M-1), with its limit 1 at M = 1."""
    if M == 1:
        return 1.0
    root = math.sqrt(M - 1.0)
    return math.atan(root) / root


def routing_drop_time_small_init(s: ArrayLike, M: int, K: int, b0: ArrayLike,
                                 tau: float = 1.0) -> ArrayLike:
    """Leading small-b0 drop time ``tau (M^2/K) arctan(sqrt(M-1)) / (s b0 sqrt(M-1))``.

    Early on pi << s, so ``tau da2/dt ~ (K/M^2)(a2^2 + c0) s``: a2 follows a tangent that
    escapes to infinity at this time (M = 1: ``tau / (s b0)``, the depth-3 path result).
    """
    M, K = _mk(M, K)
    tau = _tau(tau)
    s, b0 = _routing_parameters(s, b0)
    return _out(tau * M * M / K * _arctan_ratio(M) / (s * b0))


def routing_speed_advantage(M: int, K: int, s: ArrayLike, b0: ArrayLike,
                            fraction: float = 0.5) -> ArrayLike:
    """How many times faster a pathway learns through the shared hidden layer than alone.

    Definition: the ratio of gradient-descent steps (same learning rate, same per-pair loss
    normalisation and data, same b0) that an independent pathway (its own hidden layer: M = 1,
    K = 1) needs to bring mode s to ``fraction`` of its fixed point, to the steps the shared
    network (M, K) needs. One step is ``lr 2 M^2 / (P N_out)`` of routing time, so the ratio is
    ``M^2 drop_time(M=1, K=1) / drop_time(M, K)``, both computed exactly by the integrals.
    Tends to ``routing_speed_advantage_small_init(M, K)`` as b0 -> 0.
    """
    M, K = _mk(M, K)
    single = np.asarray(routing_drop_time(s, 1, 1, b0, fraction))
    shared = np.asarray(routing_drop_time(s, M, K, b0, fraction))
    return _out(M * M * single / shared)


def routing_speed_advantage_small_init(M: int, K: int) -> float:
    """Small-b0 limit of ``routing_speed_advantage``: ``K sqrt(M-1) / arctan(sqrt(M-1))``."""
    M, K = _mk(M, K)
    return K / _arctan_ratio(M)


# ----------------------------------------------------------------------------- conversions


def routing_time_per_step(lr: ArrayLike, M: int, P: int, n_out: int) -> ArrayLike:
    """Routing time advanced by one gradient-descent step: ``lr 2 M^2 / (P N_out)`` (units of tau).

    For the pair-averaged loss of MATH.md section 5 (P items per pair, N_out output units).
    """
    M = _integer("M", M, 1)
    P = _integer("P", P, 1)
    n_out = _integer("n_out", n_out, 1)
    lr = _as_floats("lr", lr)
    _positive("lr", lr)
    return _out(lr * 2.0 * M * M / (P * n_out))


def routing_mode_loss(pi: ArrayLike, s: ArrayLike, M: int, K: int, P: int,
                      n_out: int) -> ArrayLike:
    """Loss in mode units, ``(M K / (P N_out)) sum_alpha (s_alpha - pi_alpha)^2``.

    ``pi`` has shape (..., n_modes) (e.g. a trajectory (n_times, n_modes)), ``s`` (n_modes,);
    the sum runs over the last axis. Equals the pair-summed training loss of MATH.md section 5
    up to the constant from target components outside the modes.
    """
    M, K = _mk(M, K)
    P = _integer("P", P, 1)
    n_out = _integer("n_out", n_out, 1)
    pi = np.atleast_1d(_as_floats("pi", pi))
    s = np.atleast_1d(_as_floats("s", s))
    if s.ndim != 1 or pi.shape[-1] != s.shape[0]:
        raise ConfigError(f"pi must have shape (..., n_modes) with n_modes = len(s) = "
                          f"{s.shape[0] if s.ndim == 1 else s.shape}, got {pi.shape}")
    return _out(M * K / (P * n_out) * np.sum((s - pi) ** 2, axis=-1))


# ------------------------------------------------------------------ any reduced system
@dataclass(frozen=True)
class RaceOutcome:
    """Who wins the race in each mode of a reduced system, and when each pathway learns.

    ``final`` (n_modes, n_paths): path strengths at the end of the integration (converged);
    ``times`` (n_modes, n_paths): first time a path's strength reaches ``fraction`` of its final
    value, NaN for paths that end below ``min_share`` of the mode's strongest path (they lose
    the race and never learn the mode); ``winner`` (n_modes,): index of the strongest path, -1
    for a mode no path learns; ``order`` (n_modes, n_paths): paths sorted by learning time
    (losers last); ``t_end``: where the integration stopped.
    """

    final: np.ndarray
    times: np.ndarray
    winner: np.ndarray
    order: np.ndarray
    t_end: float


def learning_times(system, b0, *, fraction: float = 0.5, min_share: float = 0.05,
                   t_end: float | None = None, rtol: float = 1e-10, atol: float = 1e-12,
                   max_doublings: int = 12) -> RaceOutcome:
    """Predict the neural race of any reduced system (MATH.md §3): the time at which each path
    learns each mode and which path wins it.

    ``system`` is a :class:`fastrace.system.RaceSystem` (for instance ``fr.reduce(...).system``),
    ``b0`` the initial strengths ((n_edges,) or (n_modes, n_edges)). The gradient flow is
    integrated (τ = 1) until every mode has converged (the right-hand side is below
    ``atol``-scale; ``t_end`` doubles up to ``max_doublings`` times when not given), then the
    crossing times of ``fraction`` × final strength are located with the integrator's events,
    per mode. Times are in units of τ (divide by the learning rate for gradient-descent steps);
    a path that starts beyond ``fraction`` of its final strength never crosses it: NaN.
    """
    from .integrate import integrate_system

    frac = float(fraction)
    if not 0.0 < frac < 1.0:
        raise ConfigError(f"fraction must lie in (0, 1), got {fraction!r}")
    if not 0.0 <= float(min_share) < 1.0:
        raise ConfigError(f"min_share must lie in [0, 1), got {min_share!r}")
    max_doublings = _integer("max_doublings", max_doublings, 0)
    n_modes, n_paths = system.n_modes, system.n_paths
    b0 = _as_floats("b0", b0)
    try:
        b0 = np.broadcast_to(b0, (n_modes, system.n_edges)).copy()
    except ValueError:
        raise ConfigError(f"b0 must broadcast to (n_modes, n_edges) = ({n_modes}, "
                          f"{system.n_edges}), got shape {b0.shape}") from None
    horizon = float(t_end) if t_end is not None else 100.0
    if not (np.isfinite(horizon) and horizon > 0):
        raise ConfigError(f"t_end must be positive and finite, got {t_end!r}")
    for _ in range(max_doublings + 1):
        sol = integrate_system(system, b0, method="auto", t_end=horizon,
                               save_at=np.array([0.0, horizon]), rtol=rtol, atol=atol)
        b_end = sol.b[-1]
        speed = np.abs(system.rhs(b_end)).max()
        scale = max(1.0, float(np.abs(b_end).max()))
        if t_end is not None or speed <= 1e3 * atol * scale:
            break
        horizon *= 2.0
    else:
        raise IntegrationError(f"the race has not converged by t = {horizon / 2:g} "
                               f"(|db/dt| = {speed:.3g}); give t_end")
    final = system.path_strengths(b_end)  # (n_modes, n_paths)
    times = np.full((n_modes, n_paths), np.nan)
    strongest = np.abs(final).max(axis=1)
    for mode in range(n_modes):
        if strongest[mode] == 0.0:
            continue
        learnt = np.abs(final[mode]) >= min_share * strongest[mode]
        thresholds = np.where(learnt, frac * final[mode], np.nan)
        one = system.with_modes(system.s[mode:mode + 1], system.d[mode:mode + 1])
        sol = integrate_system(one, b0[mode:mode + 1], method="auto", t_end=horizon,
                               save_at=np.array([0.0, horizon]), rtol=rtol, atol=atol,
                               events=thresholds)
        times[mode] = sol.events[0]
    winner = np.where(strongest > 0.0, np.argmax(np.abs(final), axis=1), -1)
    order = np.argsort(np.where(np.isnan(times), np.inf, times), axis=1, kind="stable")
    return RaceOutcome(final, times, winner, order, horizon)
