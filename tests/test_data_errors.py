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
    (lambda X, Y: fr.Dataset(X, Y, weights=np.zeros(5)), fr.DataError,
     r"weights: every sample weight is 0"),
    (lambda X, Y: fr.Dataset(X["x"], Y), fr.DataError, r"inputs: expected a mapping"),
    (lambda X, Y: fr.Dataset(X, [Y["y"]]), fr.DataError, r"targets: expected a mapping"),
    (lambda X, Y: fr.Dataset(X, Y, node_gates=[np.ones(5)]), fr.DataError,
     r"node_gates: expected a mapping"),
    (lambda X, Y: fr.Dataset({"x": X["x"] * 1e200}, Y), fr.DataError,
     r"gated second moments .*overflow"),
    (lambda X, Y: fr.Dataset(X, Y, weights=np.full(5, 1e308)), fr.DataError,
     r"gated second moments .*overflow"),
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


def test_the_dataset_keeps_read_only_copies_of_its_arrays(net):
    """Changing the caller's arrays after building a Dataset changes nothing: the moments engine
    (cached on the data set) and the samples engine keep agreeing on the data as it was."""
    X, Y = good()
    gate = np.array([1.0, 0.0, 1.0, 1.0, 0.5])
    weights = np.full(5, 0.2)
    data = fr.Dataset(X, Y, node_gates={"h": gate}, edge_gates={"h->y": gate.copy()},
                      weights=weights)
    w = W(net)
    before = fr.loss(net, data, w, engine="moments")
    X["x"] *= 3.0
    Y["y"][0, 0] = np.nan
    gate[:] = 0.0
    weights[:] = 7.0
    assert fr.loss(net, data, w, engine="moments") == before
    assert fr.loss(net, data, w, engine="samples") == pytest.approx(before, rel=1e-12)
    arrays = [*data.inputs.values(), *data.targets.values(), *data.node_gates.values(),
              *data.edge_gates.values(), data.weights]
    for arr in arrays:
        assert not arr.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1.0
    for arr in arrays + [*data.subset([0, 2]).inputs.values(), data.subset([0, 2]).weights]:
        assert not arr.flags.writeable
    default = fr.Dataset(*good())
    assert not default.weights.flags.writeable
    assert not default.node_gates and not default.edge_gates


@pytest.mark.parametrize("make, message", [
    (lambda X, Y: fr.Dataset({"x": X["x"] + 1j}, Y), r"inputs\['x'\]: .*complex128"),
    (lambda X, Y: fr.Dataset(X, {"y": Y["y"].astype(np.complex64)}), r"targets\['y'\]: .*complex64"),
    (lambda X, Y: fr.Dataset(X, Y, node_gates={"h": np.ones(5) + 0.5j}),
     r"node_gates\['h'\]: .*complex"),
    (lambda X, Y: fr.Dataset(X, Y, node_gates={"h": 1 + 1j}), r"node_gates\['h'\]: .*complex"),
    (lambda X, Y: fr.Dataset(X, Y, node_gates={"h": np.complex128(1 + 1j)}),
     r"node_gates\['h'\]: .*complex"),
    (lambda X, Y: fr.Dataset(X, Y, edge_gates={"x->h": "1"}), r"edge_gates\['x->h'\]: .*str"),
    (lambda X, Y: fr.Dataset(X, Y, edge_gates={"x->h": None}), r"edge_gates\['x->h'\]: .*object"),
    (lambda X, Y: fr.Dataset(X, Y, weights=np.full(5, 0.2 + 0j)), r"weights: .*complex"),
    (lambda X, Y: fr.Dataset(X, Y, weights=["0.2"] * 5), r"weights: .*str"),
    (lambda X, Y: fr.Dataset({"x": X["x"].astype(object)}, Y), r"inputs\['x'\]: .*object"),
])
def test_data_must_be_real_numbers(make, message):
    """Complex values would lose their imaginary part, strings would be parsed: both refused."""
    X, Y = good()
    with pytest.raises(fr.DataError, match=message):
        make(X, Y)


def test_integer_and_boolean_data_are_accepted(net):
    X, Y = good()
    gate = np.array([True, False, True, True, True])
    a = fr.Dataset({"x": np.round(X["x"] * 10).astype(np.int32)}, Y, node_gates={"h": gate},
                   edge_gates={"x->h": 1})
    b = fr.Dataset({"x": np.round(X["x"] * 10)}, Y, node_gates={"h": gate.astype(float)})
    assert fr.loss(net, a, W(net)) == fr.loss(net, b, W(net))


@pytest.mark.parametrize("value, message", [
    (np.ones((4, 3)) + 1j, r"weights\['x->h'\]: .*complex128"),
    (np.ones((4, 3), dtype=np.complex64), r"weights\['x->h'\]: .*complex64"),
    (np.full((4, 3), "1.0"), r"weights\['x->h'\]: .*str"),
    (np.ones((4, 3)).astype(object), r"weights\['x->h'\]: .*object"),
])
def test_weights_must_be_real_numbers(net, value, message):
    """Complex weights would lose their imaginary part (numpy only warns): refused, by every
    entry point, naming the edge."""
    X, Y = good()
    data = fr.Dataset(X, Y)
    weights = {**W(net), "x->h": value}
    for call in (lambda: fr.loss(net, data, weights), lambda: fr.gradient(net, data, weights),
                 lambda: fr.simulate(net, data, [W(net), weights], lr=0.01, steps=2,
                                     progress=False)):
        with pytest.raises(fr.WeightsError, match=message):
            call()


def test_initialisers_and_mode_strengths_must_be_real_numbers():
    """The other ways in for weights: initialiser scales and a reduction's mode strengths."""
    net = fr.Network()
    for v in ("x", "h", "y"):
        net.add_node(v, 3)
    net.add_edge("x", "h").add_edge("h", "y")
    eye = np.eye(3)
    red = fr.reduce(net, fr.Dataset({"x": eye}, {"y": 2 * eye}))
    b = np.full((red.n_modes, len(net.edges)), 0.1)
    for call, message in [
        (lambda: fr.init.gaussian(net, std=np.complex128(0.5 + 1j)), r"gaussian: std: .*complex"),
        (lambda: fr.init.gaussian(net, std="0.5"), r"gaussian: std: .*str"),
        (lambda: fr.init.orthogonal(net, gain=1 + 1j), r"orthogonal: gain: .*complex"),
        (lambda: fr.init.orthogonal(net, gain=[1.0, 2.0]), r"orthogonal: gain: must be a number"),
        (lambda: red.aligned_init(0.1 + 0.1j), r"b0: .*complex"),
        (lambda: red.aligned_init(0.1, hidden_bases={"h": eye + 0j}), r"hidden_bases\['h'\]: .*complex"),
        (lambda: red.reconstruct(b + 1j), r"b: .*complex"),
        (lambda: red.loss(b.astype(str)), r"b: .*str"),
    ]:
        with pytest.raises(fr.WeightsError, match=message):
            call()
    assert fr.init.gaussian(net, std=np.float32(0.5), seed=0)["x->h"].dtype == np.float64
    red.reconstruct(b.astype(np.float32))


@pytest.mark.parametrize("seed", ["x", -1, 1.5, True, np.float64(2.0), [1, -2]])
@pytest.mark.parametrize("init", [fr.init.gaussian, fr.init.orthogonal])
def test_bad_seeds_raise_config_errors(net, init, seed):
    with pytest.raises(fr.ConfigError, match="seed"):
        init(net, 0.5, seed=seed)


def test_every_documented_seed_kind_still_works(net):
    ref = fr.init.orthogonal(net, 0.5, seed=3)["x->h"]
    for seed in (3, np.int64(3), np.random.SeedSequence(3), np.random.default_rng(3)):
        np.testing.assert_array_equal(fr.init.orthogonal(net, 0.5, seed=seed)["x->h"], ref)
    assert fr.init.gaussian(net, 0.5, seed=None)["x->h"].shape == (4, 3)


def test_copied_and_pickled_datasets_stay_read_only(net):
    """A deep copy or an unpickled Dataset (as sent to a worker process) gets fresh arrays:
    they are read-only again, and the cache (engines with thread-local state) is rebuilt."""
    import copy
    import pickle

    data = fr.Dataset(*good(), node_gates={"h": [1.0, 0.0, 1.0, 1.0, 1.0]})
    before = fr.loss(net, data, W(net), engine="moments")
    fr.simulate(net, data, W(net), lr=0.01, steps=2, engine="moments", progress=False)
    for other in (copy.deepcopy(data), pickle.loads(pickle.dumps(data))):
        assert all(not arr.flags.writeable for arr in other._arrays())
        assert fr.loss(net, other, W(net), engine="moments") == before


def test_the_cached_moments_and_fits_are_read_only(net):
    """gated_moments and least_squares are cached on the data set and shared with the moments
    engine: writing into what they return must not change later losses and gradients."""
    X, Y = good()
    data = fr.Dataset(X, Y, node_gates={"h": [1.0, 0.0, 1.0, 1.0, 0.5]})
    w = W(net)
    before = fr.loss(net, data, w, engine="moments")
    m, ls = fr.gated_moments(net, data), fr.stats.least_squares(net, data)
    for arr in (m.xx, m.yx, m.yy, ls.best, ls.miss, ls.loss):
        assert not arr.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0.0
    assert fr.loss(net, data, w, engine="moments") == before


@pytest.mark.parametrize("index, message", [
    ([], r"subset: no samples selected"),
    ([0.0, 1.0], r"subset: index must hold integers or booleans"),
    ([7], r"subset: index 7 is out of range for 5 samples"),
    ([-6], r"subset: index -6 is out of range for 5 samples"),
    ([True, False], r"subset: a boolean index needs 5 entries, got 2"),
    ([[0, 1]], r"subset: index must be 1-d"),
    (2, r"subset: index must be 1-d"),
])
def test_bad_subset_index(index, message):
    data = fr.Dataset(*good())
    with pytest.raises(fr.DataError, match=message):
        data.subset(index)
    assert data.subset([4, 4, -1]).n_samples == 3
    assert data.subset(np.arange(5) > 2).n_samples == 2
