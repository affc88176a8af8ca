"""RaceSystem: flat form, right-hand side, Jacobian, loss, conservation, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastrace.errors import DataError
from fastrace.system import RaceSystem

# ------------------------------------------------------------------------------------------
# independent plain-Python evaluations (loops over paths, no prefix/suffix products)


def rhs_reference(paths, targets, s, dmat, rate, b):
    """db/dt of one mode; dmat[j, p] = d_jp."""
    pi = [math.prod(b[e] for e in path) for path in paths]
    db = np.zeros(len(b))
    for p, path in enumerate(paths):
        r = s[p] - sum(dmat[j, p] * pi[j] for j in targets[p])
        for e in path:
            db[e] += math.prod(b[f] for f in path if f != e) * r
    return np.asarray(rate) * db


def loss_reference(paths, targets, s, dmat, b):
    pi = [math.prod(b[e] for e in path) for path in paths]
    return sum(-s[p] * pi[p] + 0.5 * sum(pi[j] * dmat[j, p] * pi[p] for j in targets[p])
               for p in range(len(paths)))


@st.composite
def race_systems(draw, max_edges=6, max_paths=5, max_modes=3, symmetric=False):
    """A random race system, its paths, T(p) sets, dense d and a b with exact zeros."""
    n_edges = draw(st.integers(1, max_edges))
    n_paths = draw(st.integers(1, max_paths))
    paths = [draw(st.lists(st.integers(0, n_edges - 1), min_size=1, max_size=min(4, n_edges),
                           unique=True)) for _ in range(n_paths)]
    outputs = [draw(st.integers(0, 2)) for _ in range(n_paths)]
    targets = [[j for j in range(n_paths) if outputs[j] == outputs[p]] for p in range(n_paths)]
    n_modes = draw(st.integers(1, max_modes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    same = np.array([[outputs[j] == outputs[p] for p in range(n_paths)] for j in range(n_paths)])
    dmat = rng.normal(size=(n_modes, n_paths, n_paths)) * same
    if symmetric:
        dmat = 0.5 * (dmat + dmat.transpose(0, 2, 1))
    s = rng.normal(size=(n_modes, n_paths))
    rate = rng.uniform(0.2, 2.0, n_edges)
    b = rng.normal(size=(n_modes, n_edges))
    b[rng.random((n_modes, n_edges)) < 0.25] = 0.0  # exact zeros
    system = RaceSystem.from_paths(paths, s, dmat, rate=rate, n_edges=n_edges)
    return system, paths, targets, dmat, b


# ------------------------------------------------------------------------------------------
# structure


def test_from_paths_builds_csr_and_targets():
    d = np.zeros((2, 3, 3))
    d[:, 0, 0] = d[:, 1, 1] = d[:, 2, 2] = 1.0
    d[1, 1, 0] = 0.5  # d_{1,0} in mode 1 only: T(0) = {0, 1}
    system = RaceSystem.from_paths([[0, 1], [2, 1], [0, 3]], s=np.ones((2, 3)), d=d)
    assert system.n_edges == 4 and system.n_paths == 3 and system.n_modes == 2
    assert system.paths == ((0, 1), (2, 1), (0, 3))
    assert system.targets == ((0, 1), (1,), (2,))
    np.testing.assert_array_equal(system.path_ptr, [0, 2, 4, 6])
    np.testing.assert_array_equal(system.d, [[1.0, 0.0, 1.0, 1.0], [1.0, 0.5, 1.0, 1.0]])
    np.testing.assert_array_equal(system.d_dense(), d)
    assert system.edge_names == ("e0", "e1", "e2", "e3")
    np.testing.assert_array_equal(system.rate, np.ones(4))


def test_with_modes_copies_and_accepts_dense_d():
    system = RaceSystem.from_paths([[0, 1]], s=[[1.0]], d=[[[2.0]]])
    other = system.with_modes(np.array([[3.0], [4.0]]), np.array([[[1.0]], [[0.5]]]))
    assert other.n_modes == 2 and system.n_modes == 1
    np.testing.assert_array_equal(other.d, [[1.0], [0.5]])
    np.testing.assert_array_equal(other.s, [[3.0], [4.0]])
    with pytest.raises(DataError, match="outside T"):
        RaceSystem.from_paths([[0], [1]], s=[1.0, 1.0], d=np.eye(2)).with_modes(
            [[1.0, 1.0]], np.ones((1, 2, 2)))


def test_arrays_are_read_only():
    system = RaceSystem.from_paths([[0, 1]], s=[[1.0]], d=[[[1.0]]])
    with pytest.raises(ValueError):
        system.s[0, 0] = 2.0


# ------------------------------------------------------------------------------------------
# evaluation against independent implementations


@settings(max_examples=60, deadline=None)
@given(race_systems())
def test_rhs_matches_plain_python(case):
    system, paths, targets, dmat, b = case
    got = system.rhs(b)
    for m in range(system.n_modes):
        want = rhs_reference(paths, targets, system.s[m], dmat[m], system.rate, b[m])
        np.testing.assert_allclose(got[m], want, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(race_systems())
def test_path_strengths_and_loss_match_plain_python(case):
    system, paths, targets, dmat, b = case
    pi = system.path_strengths(b)
    for m in range(system.n_modes):
        np.testing.assert_allclose(pi[m], [math.prod(b[m, e] for e in p) for p in paths],
                                   rtol=1e-14, atol=0)
    loss = system.loss(b)
    want = [loss_reference(paths, targets, system.s[m], dmat[m], b[m])
            for m in range(system.n_modes)]
    np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(race_systems())
def test_jacobian_matches_central_differences(case):
    system, _, _, _, b = case
    jac = system.jacobian(b)
    step = 1e-6
    for f in range(system.n_edges):
        bp, bm = b.copy(), b.copy()
        bp[:, f] += step
        bm[:, f] -= step
        column = (system.rhs(bp) - system.rhs(bm)) / (2 * step)
        scale = 1.0 + np.abs(column).max()
        np.testing.assert_allclose(jac[:, :, f], column, rtol=0, atol=1e-7 * scale)


@settings(max_examples=30, deadline=None)
@given(race_systems(symmetric=True))
def test_rhs_is_minus_rate_times_loss_gradient(case):
    """With symmetric d the flow is gradient flow on the loss (MATH.md section 3)."""
    system, _, _, _, b = case
    step = 1e-6
    grad = np.empty_like(b)
    for f in range(system.n_edges):
        bp, bm = b.copy(), b.copy()
        bp[:, f] += step
        bm[:, f] -= step
        grad[:, f] = (system.loss(bp) - system.loss(bm)) / (2 * step)
    np.testing.assert_allclose(system.rhs(b), -system.rate * grad, rtol=0, atol=1e-7)


def test_numba_kernels_match_c_bitwise():
    from fastrace._kernels import race as kernels

    rng = np.random.default_rng(3)
    d = rng.normal(size=(2, 3, 3))
    d = d + d.transpose(0, 2, 1)
    system = RaceSystem.from_paths([[0, 1, 2], [3, 1], [0, 4]], s=rng.normal(size=(2, 3)),
                                   d=d, rate=rng.uniform(0.5, 2, 5))
    b = rng.normal(size=(6, 5))
    b[1, 1] = 0.0
    st = kernels.pack_structure(system.path_ptr, system.path_edges, system.target_ptr,
                                system.target_paths)
    # writable copies: the signature integrate_system compiles (read-only arrays would not be)
    s, d, rate = system.s.copy(), system.d.copy(), system.rate[None, :].copy()
    rhs = kernels.rhs_batch(st, b, s, d, rate, 4)
    np.testing.assert_array_equal(rhs, system.rhs(b.reshape(3, 2, 5)).reshape(6, 5))
    jac = kernels.jacobian_batch(st, b, s, d, rate, 4)
    np.testing.assert_array_equal(jac, system.jacobian(b.reshape(3, 2, 5)).reshape(6, 5, 5))


def test_conserved_quantity_per_hidden_node():
    # x -(0)-> h1 -(1)-> h2 -(2)-> y  and  x -(3)-> h2 ; rates make it non-trivial
    system = RaceSystem.from_paths([[0, 1, 2], [3, 2]], s=[[2.0, 1.0]],
                                   d=[[[1.0, 0.3], [0.3, 1.0]]], rate=[0.5, 1.0, 2.0, 0.25],
                                   edge_source=[0, 1, 2, 0], edge_target=[1, 2, 3, 2])
    np.testing.assert_array_equal(system.hidden_nodes, [1, 2])
    b = np.array([[0.3, -0.2, 0.5, 0.1]])
    q = system.conserved(b)
    assert q.shape == (1, 2)
    np.testing.assert_allclose(q[0], [0.09 / 0.5 - 0.04, 0.04 + 0.01 / 0.25 - 0.25 / 2.0])
    # d/dt of each conserved quantity vanishes along the flow
    dq = 2 * b * system.rhs(b)  # d(b^2)/dt
    weight = 1.0 / system.rate
    np.testing.assert_allclose(dq[0, 0] * weight[0] - dq[0, 1] * weight[1], 0, atol=1e-15)
    np.testing.assert_allclose(dq[0, 1] * weight[1] + dq[0, 3] * weight[3]
                               - dq[0, 2] * weight[2], 0, atol=1e-15)


# ------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("kwargs, match", [
    (dict(path_ptr=[0, 2, 1]), "path_ptr"),
    (dict(path_edges=[0, 7]), "path_edges"),
    (dict(path_edges=[1, 1]), "twice"),
    (dict(target_paths=[3]), "target_paths"),
    (dict(s=[[1.0, 2.0]]), "s must have shape"),
    (dict(d=[[np.nan]]), "d holds NaN"),
    (dict(rate=[1.0, 1.0]), "rate must have shape"),
    (dict(n_edges=0), "n_edges"),
    (dict(edge_names=("a", "a", "b")), "unique"),
    (dict(edge_source=[0, 1, 2]), "together"),
])
def test_bad_arrays_raise_data_error_naming_them(kwargs, match):
    fields = dict(n_edges=3, path_ptr=[0, 2], path_edges=[0, 1], target_ptr=[0, 1],
                  target_paths=[0], s=[[1.0]], d=[[1.0]])
    fields.update(kwargs)
    with pytest.raises(DataError, match=match):
        RaceSystem(**fields)


def test_bad_b_shapes_raise_data_error():
    system = RaceSystem.from_paths([[0, 1]], s=[[1.0], [2.0]], d=[[[1.0]], [[1.0]]])
    with pytest.raises(DataError, match="n_modes=2"):
        system.rhs(np.zeros((3, 2)))
    with pytest.raises(DataError, match="path_strengths"):
        system.path_strengths(np.zeros(3))
    with pytest.raises(DataError, match="edge_source"):
        system.conserved(np.zeros(2))
    with pytest.raises(DataError, match="d must have shape"):
        RaceSystem.from_paths([[0, 1]], s=[[1.0]], d=[[1.0, 2.0]])


# ------------------------------------------------------------------------------------------
# review: conservation with frozen edges, node structure, non-real input, memory


def test_conserved_is_nan_at_nodes_next_to_a_frozen_edge():
    """An edge with rate 0 on a path still feels a gradient: the law breaks at its nodes."""
    from scipy.integrate import solve_ivp

    paths = [[0, 3], [0, 2, 4], [0, 2, 5], [1, 4], [1, 5]]
    out = [3, 3, 4, 3, 4]
    rng = np.random.default_rng(1)
    same = np.array([[out[j] == out[p] for p in range(5)] for j in range(5)])
    d = rng.normal(size=(5, 5))
    d = (d @ d.T) * same
    system = RaceSystem.from_paths(paths, rng.normal(size=5), d,
                                   rate=[1.0, 0.0, 2.0, 1.0, 0.5, 1.0],  # edge 1 frozen
                                   edge_source=[0, 0, 1, 1, 2, 2], edge_target=[1, 2, 2, 3, 3, 4])
    sol = solve_ivp(lambda t, y: system.rhs(y[None, :])[0], (0.0, 5.0),
                    0.5 * rng.normal(size=6), method="DOP853", rtol=1e-12, atol=1e-13)
    q = system.conserved(sol.y.T)
    np.testing.assert_allclose(q[:, 0], q[0, 0], rtol=0, atol=1e-11)  # node 1: conserved
    assert np.isnan(q[:, 1]).all()  # node 2 touches the frozen edge 1: no conserved quantity


def test_conserved_constant_along_an_accurate_integration():
    from scipy.integrate import solve_ivp

    paths = [[0, 3], [0, 2, 4], [0, 2, 5], [1, 4], [1, 5]]
    rng = np.random.default_rng(2)
    d = rng.normal(size=(2, 5, 5))
    system = RaceSystem.from_paths(paths, rng.normal(size=(2, 5)), d @ d.transpose(0, 2, 1),
                                   rate=rng.uniform(0.3, 2.0, 6),
                                   edge_source=[0, 0, 1, 1, 2, 2], edge_target=[1, 2, 2, 3, 3, 4])
    sol = solve_ivp(lambda t, y: system.rhs(y.reshape(2, 6)).ravel(), (0.0, 5.0),
                    0.5 * rng.normal(size=12), method="DOP853", rtol=1e-12, atol=1e-13)
    b = sol.y.T.reshape(-1, 2, 6)
    q = system.conserved(b)
    np.testing.assert_allclose(q, np.broadcast_to(q[0], q.shape), rtol=0, atol=1e-11)
    assert np.all(np.diff(system.loss(b), axis=0) <= 1e-12)


@pytest.mark.parametrize("src, tgt, match", [
    ([0, 5, 2, 0], [1, 2, 3, 2], "path 0"),      # edge 1 leaves node 5, edge 0 ends at 1
    ([0, 1, 2, 1], [1, 2, 3, 2], "path 1"),      # path 1 starts at hidden node 1
    ([0, 1, 2, 0], [1, 2, 3, 1], "path 1"),      # path 1 = (3, 2): edge 3 ends at 1, 2 leaves 2
])
def test_paths_must_follow_the_node_structure(src, tgt, match):
    with pytest.raises(DataError, match=match):
        RaceSystem.from_paths([[0, 1, 2], [3, 2]], s=[[2.0, 1.0]], d=[[[1.0, 0.0], [0.0, 1.0]]],
                              edge_source=src, edge_target=tgt)


@pytest.mark.parametrize("bad", [
    np.ones((1, 2)) + 1j, "ab", [[1.0, None]], [[1.0], [1.0, 2.0]],
])
def test_non_real_b_raises_data_error(bad):
    system = RaceSystem.from_paths([[0, 1]], s=[[1.0]], d=[[[1.0]]],
                                   edge_source=[0, 1], edge_target=[1, 2])
    for method in (system.rhs, system.jacobian, system.loss, system.path_strengths,
                   system.conserved):
        with pytest.raises(DataError, match="b"):
            method(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(s=np.array([[1.0 + 1.0j]])), "s must be"),
    (dict(rate=np.array([1.0, 1.0, 1.0j])), "rate must be"),
    (dict(path_ptr=[0, np.inf]), "path_ptr must hold integers"),
])
def test_non_real_fields_raise_data_error(kwargs, match):
    fields = dict(n_edges=3, path_ptr=[0, 2], path_edges=[0, 1], target_ptr=[0, 1],
                  target_paths=[0], s=[[1.0]], d=[[1.0]])
    fields.update(kwargs)
    with pytest.raises(DataError, match=match):
        RaceSystem(**fields)
    if "s" in kwargs:
        with pytest.raises(DataError, match="s must be"):
            RaceSystem.from_paths([[0, 1]], s=[[1.0 + 1.0j]], d=[[[1.0]]])


def test_jacobian_too_big_for_memory_is_refused(monkeypatch):
    """The output is n_edges times bigger than b: refuse it before the OOM killer does."""
    from fastrace import _memory
    from fastrace.errors import FastraceError

    monkeypatch.setattr(_memory, "available_memory", lambda: 1 << 20)
    system = RaceSystem.from_paths([list(range(1500))], s=[[1.0]], d=[[[1.0]]])
    with pytest.raises(FastraceError, match="GiB"):
        system.jacobian(np.ones(1500))
