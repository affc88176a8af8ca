"""Every bad input gets its own error class and a message naming the culprit."""

import numpy as np
import pytest

import fastrace as fr


@pytest.fixture
def net():
    n = fr.Network()
    n.add_node("x", 3).add_node("h", 4).add_node("y", 2)
    n.add_edge("x", "h").add_edge("h", "y")
    return n


def good(P=5):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((P, 3))}, {"y": rng.standard_normal((P, 2))}


def W(net):
    return fr.init.gaussian(net, 1.0, seed=0)


@pytest.mark.parametrize("make, cls, message", [
    (lambda X, Y: fr.Dataset({"x": X["x"][:, :2]}, Y), fr.DataError,
     r"inputs\['x'\]: node has dimension 3, array has 2 columns"),
    (lambda X, Y: fr.Dataset({"x": X["x"][:4]}, Y), fr.DataError,
     r"targets\[.y.\]: has 5 samples but inputs\[.x.\] has 4"),
    (lambda X, Y: fr.Dataset({"z": X["x"]}, Y), fr.DataError, r"missing input node 'x'"),
    (lambda X, Y: fr.Dataset(X, {"h": np.ones((5, 4)), **Y}), fr.DataError,
     r"targets\['h'\]: not an output node"),
    (lambda X, Y: fr.Dataset(X, {}), fr.DataError, r"targets: at least one"),
    (lambda X, Y: fr.Dataset({"x": np.where(np.eye(5, 3) > 0, np.nan, X["x"])}, Y), fr.DataError,
     r"inputs\['x'\]: contains NaN or inf"),
    (lambda X, Y: fr.Dataset(X, {"y": Y["y"] * np.inf}), fr.DataError,
     r"targets\['y'\]: contains NaN or inf"),
    (lambda X, Y: fr.Dataset(X, Y, weights=[0.2, 0.2, -0.1, 0.4, 0.3]), fr.DataError,
     r"weights: negative sample weight at index 2"),
    (lambda X, Y: fr.Dataset(X, Y, weights=[0.5, 0.5]), fr.DataError, r"weights: expected shape"),
    (lambda X, Y: fr.Dataset(X, Y, node_gates={"q": np.ones(5)}), fr.DataError,
     r"node_gates\['q'\]: unknown node"),
    (lambda X, Y: fr.Dataset(X, Y, edge_gates={"x->y": np.ones(5)}), fr.DataError,
     r"edge_gates\['x->y'\]: unknown edge"),
    (lambda X, Y: fr.Dataset(X, Y, edge_gates={"x->h": np.ones(3)}), fr.DataError,
     r"edge_gates\['x->h'\]: expected shape \(5,\)"),
    (lambda X, Y: fr.Dataset(X, Y, node_gates={"h": [np.nan] * 5}), fr.DataError,
     r"node_gates\['h'\]: contains NaN"),
])
def test_bad_data(net, make, cls, message):
    X, Y = good()
    with pytest.raises(cls, match=message):
        data = make(X, Y)
        fr.loss(net, data, W(net))


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop("x->h"), r"missing edge 'x->h'"),
    (lambda w: w.update({"x->h": np.ones((3, 4))}), r"weights\['x->h'\]: expected shape \(4, 3\)"),
    (lambda w: w.update({"h->y": np.full((2, 4), np.nan)}), r"weights\['h->y'\]: contains NaN"),
    (lambda w: w.update({"h->z": np.ones((2, 4))}), r"weights\['h->z'\]: unknown edge"),
])
def test_bad_weights(net, change, message):
    X, Y = good()
    weights = W(net)
    change(weights)
    with pytest.raises(fr.WeightsError, match=message):
        fr.gradient(net, fr.Dataset(X, Y), weights)
    # a batch packs every run's weights and tests them for NaN and inf at once: the bad run,
    # last of three, is still named by its edge
    with pytest.raises(fr.WeightsError, match=message):
        fr.simulate(net, fr.Dataset(X, Y), [W(net), W(net), weights], lr=0.01, steps=2)


def test_every_error_is_a_fastrace_error():
    for cls in (fr.NetworkError, fr.DataError, fr.WeightsError, fr.ReductionError,
                fr.DivergenceError, fr.StoreError, fr.PathExplosionError):
        assert issubclass(cls, fr.FastraceError)


def test_scalar_gates_broadcast(net):
    X, Y = good()
    a = fr.Dataset(X, Y, node_gates={"h": 0.5})
    b = fr.Dataset(X, Y, node_gates={"h": np.full(5, 0.5)})
    w = W(net)
    assert fr.loss(net, a, w) == fr.loss(net, b, w)
