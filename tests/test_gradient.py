"""The loss and gradient: finite differences, the path-sum formula, engines and contexts."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrace as fr
from conftest import random_dag, random_data

seeds = st.integers(0, 2**32 - 1)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# the largest relative discrepancy seen by each comparison, reported by test_report_discrepancy
WORST = {"finite differences": 0.0, "path sum": 0.0, "engines": 0.0}


def rel(a, b):
    scale = max(max(np.abs(b[e]).max() for e in b), 1e-300)
    return max(np.abs(a[e] - b[e]).max() for e in b) / scale


def directional_fd(net, data, W, h=0.5):
    """Exact-by-construction check: every path holds an edge at most once, so the loss is a
    quadratic function of any single weight matrix and central differences along a direction
    D_e are exact up to round-off, whatever the step h."""
    rng = np.random.default_rng(0)
    fd, dirs = {}, {}
    for e in net.edges:
        D = rng.standard_normal(W[e].shape)
        plus = dict(W, **{e: W[e] + h * D})
        minus = dict(W, **{e: W[e] - h * D})
        fd[e] = (fr.loss(net, data, plus, engine="samples")
                 - fr.loss(net, data, minus, engine="samples")) / (2 * h)
        dirs[e] = D
    return fd, dirs


def random_case(seed, gates):
    rng = np.random.default_rng(seed)
    net = random_dag(rng, n_inputs=int(rng.integers(1, 4)), n_hidden=int(rng.integers(1, 5)),
                     extra_edges=int(rng.integers(0, 5)))
    data = random_data(rng, net, n_samples=int(rng.integers(3, 30)), gates=gates)
    W = fr.init.gaussian(net, std=0.6, seed=rng)
    return net, data, W


@SETTINGS
@given(seed=seeds, gates=st.sampled_from(["binary", "real", "none"]))
def test_gradient_matches_finite_differences(seed, gates):
    net, data, W = random_case(seed, gates)
    G = fr.gradient(net, data, W, engine="samples")
    fd, dirs = directional_fd(net, data, W)
    for e in net.edges:
        exact = float(np.sum(G[e] * dirs[e]))
        scale = max(abs(exact), max(np.abs(G[f]).max() for f in G), 1e-12)
        err = abs(fd[e] - exact) / scale
        WORST["finite differences"] = max(WORST["finite differences"], err)
        assert err <= 1e-9, (e, fd[e], exact)


def test_loss_is_quadratic_in_each_weight():
    # the premise of directional_fd: second differences are constant along a line
    net, data, W = random_case(7, "real")
    e = net.edges[0]
    D = np.random.default_rng(1).standard_normal(W[e].shape)
    values = [fr.loss(net, data, dict(W, **{e: W[e] + t * D})) for t in (-2, -1, 0, 1, 2)]
    third = values[4] - 3 * values[3] + 3 * values[2] - values[1]
    assert abs(third) <= 1e-10 * max(1.0, max(abs(v) for v in values))


@SETTINGS
@given(seed=seeds)
def test_gradient_matches_path_sum_formula(seed):
    net, data, W = random_case(seed, "binary")
    G = fr.gradient(net, data, W, engine="samples")
    err = rel(fr.path_gradient(net, data, W), G)
    WORST["path sum"] = max(WORST["path sum"], err)
    assert err <= 1e-9


@SETTINGS
@given(seed=seeds, gates=st.sampled_from(["binary", "real"]))
def test_engines_agree(seed, gates):
    net, data, W = random_case(seed, gates)
    L1, G1 = fr.loss_and_gradient(net, data, W, engine="samples")
    L2, G2 = fr.loss_and_gradient(net, data, W, engine="moments")
    assert L2 == pytest.approx(L1, rel=1e-11, abs=1e-13)
    err = rel(G2, G1)
    WORST["engines"] = max(WORST["engines"], err)
    assert err <= 1e-10


def fitted_case(seed, gates, duplicate=False):
    """A random gated network and data it fits exactly at weights W*: targets made by the
    network itself, from 120 samples in at most 2 gate patterns (so each context's inputs span
    their space, unless ``duplicate`` repeats an input in another input node)."""
    rng = np.random.default_rng(seed)
    net = random_dag(rng, n_inputs=int(rng.integers(1, 4)), n_hidden=int(rng.integers(1, 5)),
                     extra_edges=int(rng.integers(0, 5)))
    data = random_data(rng, net, n_samples=120, gates=gates, n_patterns=2)
    inputs = dict(data.inputs)
    if duplicate and len(net.inputs) > 1:
        a, b = net.inputs[:2]
        inputs[b] = inputs[b].copy()
        inputs[b][:, 0] = inputs[a][:, 0]
    W_star = fr.init.gaussian(net, std=0.6, seed=rng)
    made = fr.forward(net, fr.Dataset(inputs, data.targets, node_gates=data.node_gates,
                                      edge_gates=data.edge_gates), W_star)
    data = fr.Dataset(inputs, {w: made[w] for w in net.outputs}, node_gates=data.node_gates,
                      edge_gates=data.edge_gates, weights=data.weights)
    return net, data, W_star, rng


def moments_losses(net, data, W):
    """The loss by both moments engines: fr.loss and the compiled plan of simulate."""
    plan = fr.simulate(net, data, W, lr=1e-9, steps=1, engine="moments", svals=False,
                       progress=False).loss[0]
    return fr.loss(net, data, W, engine="moments"), plan


@SETTINGS
@given(seed=seeds, gates=st.sampled_from(["binary", "real", "none"]),
       step=st.sampled_from([1e-4, 1e-7, 1e-10]))
def test_the_loss_near_a_perfect_fit_keeps_its_digits(seed, gates, step):
    # weights a small step from a perfect fit: the loss is ~step², far below the ½ Σ |y|² ~ 1
    # of the data. The samples engine sums the tiny residuals; the moments engines must give
    # it to many digits too (½ tr Σyy − <T, Σyx> + ½ <T, T Σxx> keeps no digit below
    # eps · ½ tr Σyy ~ 1e-16: this failed for every case with step 1e-7 or 1e-10)
    net, data, W_star, rng = fitted_case(seed, gates)
    W = {e: a + step * rng.standard_normal(a.shape) for e, a in W_star.items()}
    exact = fr.loss(net, data, W, engine="samples")
    # (the residuals are differences of numbers ~1: even the samples' sum is known only to
    # ~eps / step relative)
    rel = max(1e-6, 1e3 * np.finfo(float).eps / step)
    for got in moments_losses(net, data, W):
        assert got == pytest.approx(exact, rel=rel, abs=1e-28)


@SETTINGS
@given(seed=seeds, gates=st.sampled_from(["binary", "none"]))
def test_the_loss_is_never_negative(seed, gates):
    # inputs that repeat one another leave directions the data does not span, where rounding
    # still limits the loss to ~eps of the data's scale; it must not go below zero there
    net, data, W_star, rng = fitted_case(seed, gates, duplicate=True)
    W = {e: a + 1e-10 * rng.standard_normal(a.shape) for e, a in W_star.items()}
    exact = fr.loss(net, data, W, engine="samples")
    scale = sum(float(np.sum(data.weights[:, None] * y * y)) for y in data.targets.values())
    for got in moments_losses(net, data, W):
        assert got >= 0.0
        assert abs(got - exact) <= 1e-13 * scale


def test_the_loss_is_exact_where_the_data_is_ill_conditioned():
    # a feature of scale 1e-7 (cond Σxx ~ 1e14): the least-squares reference drops that
    # direction (its pinv cuts below 1e-12), so it does not fit Σyx exactly; the loss must not
    # depend on it (it was off by 0.53, the whole loss, when it assumed T* Σxx = Σyx)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(200), rng.standard_normal(200)
    net = fr.Network()
    net.add_node("x", 2).add_node("y", 1).add_edge("x", "y")
    data = fr.Dataset({"x": np.stack([a, 1e-7 * b], axis=1)}, {"y": (a + b)[:, None]})
    for W, rel in [([[1.0 + 1e-6, 1e7]], 1e-2), ([[0.0, 0.0]], 1e-12), ([[1.0, 1.0]], 1e-12)]:
        W = {"x->y": np.array(W)}
        exact = fr.loss(net, data, W, engine="samples")
        for got in moments_losses(net, data, W):
            assert got == pytest.approx(exact, rel=rel)


@pytest.mark.parametrize("spread", [1e-3, 1e-4, 3.2e-6, 1e-8])
def test_the_loss_is_exact_for_nearly_collinear_inputs(spread):
    # x2 = x1 + spread·z: an eigenvalue of Σxx ~spread² of the largest. An inverse of it made
    # the least-squares reference huge and took up to 7 digits off the loss (1.8e-7 at 3.2e-6)
    rng = np.random.default_rng(1)
    x1, z = rng.standard_normal(200), rng.standard_normal(200)
    net = fr.Network()
    net.add_node("x", 2).add_node("y", 1).add_edge("x", "y")
    data = fr.Dataset({"x": np.stack([x1, x1 + spread * z], axis=1)},
                      {"y": rng.standard_normal((200, 1))})
    W = {"x->y": np.array([[0.3, -0.2]])}
    exact = fr.loss(net, data, W, engine="samples")
    for got in moments_losses(net, data, W):
        assert got == pytest.approx(exact, rel=1e-12)


def test_loss_against_plain_loop():
    # an independent, deliberately naive forward pass sample by sample
    net, data, W = random_case(11, "real")
    total = 0.0
    nodes = list(net.nodes)
    for n in range(data.n_samples):
        g = {v: data.node_gates.get(v, np.ones(data.n_samples))[n] for v in nodes}
        h = {}
        for v in net.order:
            if v in net.inputs:
                h[v] = g[v] * data.inputs[v][n]
            else:
                h[v] = g[v] * sum(data.edge_gates.get(e, np.ones(data.n_samples))[n]
                                  * W[e] @ h[net.edge(e).source] for e in net.in_edges(v))
        total += data.weights[n] * 0.5 * sum(np.sum((data.targets[w][n] - h[w]) ** 2)
                                             for w in net.outputs)
    assert fr.loss(net, data, W, engine="samples") == pytest.approx(total, rel=1e-13)
    assert fr.loss(net, data, W, engine="moments") == pytest.approx(total, rel=1e-12)


def test_repeated_contexts_give_same_loss_and_gradient():
    rng = np.random.default_rng(5)
    net = random_dag(rng, n_inputs=2, n_hidden=3)
    data = random_data(rng, net, n_samples=400, gates="binary", n_patterns=5)
    ctx = data.contexts(net)
    assert ctx.count <= 5
    assert np.isclose(ctx.weight.sum(), 1.0)
    W = fr.init.orthogonal(net, gain=0.9, seed=2)
    assert fr.gradient.__module__ == "fastrace.gradient"
    from fastrace.gradient import choose_engine
    assert choose_engine(net, data) == "moments"
    L1, G1 = fr.loss_and_gradient(net, data, W, engine="samples")
    L2, G2 = fr.loss_and_gradient(net, data, W, engine="moments")
    assert L2 == pytest.approx(L1, rel=1e-12)
    assert rel(G2, G1) <= 1e-11
    # duplicating every sample at half weight changes nothing
    twice = fr.Dataset({u: np.vstack([x, x]) for u, x in data.inputs.items()},
                       {w: np.vstack([y, y]) for w, y in data.targets.items()},
                       {v: np.concatenate([g, g]) for v, g in data.node_gates.items()},
                       {e: np.concatenate([g, g]) for e, g in data.edge_gates.items()},
                       np.concatenate([data.weights, data.weights]) / 2)
    assert fr.loss(net, twice, W) == pytest.approx(L1, rel=1e-12)


def test_gated_off_edge_gets_zero_gradient():
    net = fr.Network.chain([3, 4, 2], names=["x", "h", "y"])
    rng = np.random.default_rng(0)
    data = fr.Dataset({"x": rng.standard_normal((10, 3))}, {"y": rng.standard_normal((10, 2))},
                      edge_gates={"h->y": np.zeros(10)})
    G = fr.gradient(net, data, fr.init.gaussian(net, 1.0, seed=0))
    assert np.all(G["x->h"] == 0) and np.all(G["h->y"] == 0)


def test_conserved_quantities_are_invariant_to_balanced_rescaling():
    net = fr.Network.chain([3, 5, 5, 2])
    W = fr.init.gaussian(net, 0.7, seed=3)
    Q = fr.conserved_quantities(net, W)
    assert set(Q) == {"h1", "h2"}
    # an invertible change of basis at a hidden node, orthogonal, leaves Q conjugated
    R = fr.init.random_orthogonal(5, 5, np.random.default_rng(1))
    W2 = dict(W, **{"h0->h1": R @ W["h0->h1"], "h1->h2": W["h1->h2"] @ R.T})
    Q2 = fr.conserved_quantities(net, W2)
    np.testing.assert_allclose(Q2["h1"], R @ Q["h1"] @ R.T, atol=1e-12)
    # gradient flow: d/dt Q_v = 0, i.e. Σ_in (G Wᵀ + W Gᵀ) − Σ_out (Gᵀ W + Wᵀ G) = 0
    rng = np.random.default_rng(4)
    data = fr.Dataset({"h0": rng.standard_normal((20, 3))}, {"h3": rng.standard_normal((20, 2))})
    G = fr.gradient(net, data, W)
    for v in ("h1", "h2"):
        dq = np.zeros((5, 5))
        for e in net.in_edges(v):
            dq += G[e] @ W[e].T + W[e] @ G[e].T
        for e in net.out_edges(v):
            dq -= G[e].T @ W[e] + W[e].T @ G[e]
        assert np.abs(dq).max() <= 1e-12


def test_initialisers():
    net = fr.Network.chain([4, 64, 7])
    W = fr.init.orthogonal(net, gain=0.2, seed=0)
    for e in net.edges:
        np.testing.assert_allclose(np.linalg.svd(W[e], compute_uv=False), 0.2, rtol=1e-12)
    again = fr.init.orthogonal(net, gain=0.2, seed=0)
    assert all(np.array_equal(W[e], again[e]) for e in net.edges)
    other = fr.init.orthogonal(net, gain=0.2, seed=1)
    assert not np.array_equal(W["h0->h1"], other["h0->h1"])
    G = fr.init.gaussian(net, std=0.5, seed=np.random.default_rng(3))
    assert abs(G["h0->h1"].std() - 0.5) < 0.05
    with pytest.raises(fr.WeightsError, match="std"):
        fr.init.gaussian(net, std=-1)


@pytest.mark.parametrize("call", [fr.loss, fr.gradient, fr.loss_and_gradient])
def test_an_unknown_engine_is_a_config_error(call):
    net = fr.Network.chain([3, 2])
    rng = np.random.default_rng(0)
    data = fr.Dataset({net.inputs[0]: rng.standard_normal((8, 3))},
                      {net.outputs[0]: rng.standard_normal((8, 2))})
    with pytest.raises(fr.ConfigError, match=r"engine must be one of .*'auto', 'samples', "
                                             r"'moments'.*got 'moment'"):
        call(net, data, fr.init.gaussian(net, 0.3, seed=0), engine="moment")


def test_report_discrepancy():
    """Runs last in this module: prints the largest discrepancies the tests above saw."""
    print("\nlargest relative gradient discrepancies:", WORST)
