"""Network construction, validation and path enumeration."""

import numpy as np
import pytest

import fastrace as fr
from conftest import random_dag


def test_inferred_roles_and_order():
    net = fr.Network()
    net.add_node("x", 3).add_node("h", 4).add_node("y", 2).add_node("z", 1)
    net.add_edge("x", "h").add_edge("h", "y").add_edge("x", "z", name="skip")
    assert net.inputs == ("x",)
    assert net.outputs == ("y", "z")
    assert net.hidden == ("h",)
    assert net.weight_shape("x->h") == (4, 3)
    assert net.weight_shape("skip") == (1, 3)
    order = net.order
    assert order.index("x") < order.index("h") < order.index("y")


def test_path_parts():
    net = fr.Network.chain([2, 3, 4, 5], names=["a", "b", "c", "d"])
    (p,) = net.paths()
    assert p.edges == ("a->b", "b->c", "c->d") and p.source == "a" and p.target == "d"
    assert p.split("b->c") == (("a->b",), ("c->d",))
    assert p.split("a->b") == ((), ("b->c", "c->d"))
    with pytest.raises(fr.NetworkError, match="not on path"):
        p.split("nope")


@pytest.mark.parametrize("seed", range(20))
def test_count_matches_enumeration(seed):
    net = random_dag(np.random.default_rng(seed), n_inputs=2, n_hidden=4, extra_edges=4)
    paths = net.paths()
    assert net.count_paths() == len(paths)
    assert len(set(p.edges for p in paths)) == len(paths)
    for p in paths:
        assert p.source in net.inputs and p.target in net.outputs
        for a, b in zip(p.edges[:-1], p.edges[1:]):
            assert net.edge(a).target == net.edge(b).source
    for e in net.edges:  # P(e) is exactly the paths containing e
        assert set(q.edges for q in net.paths_through(e)) == {q.edges for q in paths if e in q.edges}
    for w in net.outputs:
        assert all(q.target == w for q in net.paths_to(w))


def test_path_explosion_is_an_error_not_a_hang():
    net = fr.Network()
    depth = 60
    for i in range(depth + 1):
        net.add_node(f"n{i}", 1)
    for i in range(depth):
        net.add_edge(f"n{i}", f"n{i+1}", name=f"a{i}")
        net.add_edge(f"n{i}", f"n{i+1}", name=f"b{i}")
    assert net.count_paths() == 2 ** depth
    with pytest.raises(fr.PathExplosionError, match=str(2 ** depth)):
        net.paths()


def test_deep_networks_have_paths():
    """Path enumeration is not limited by Python's recursion depth."""
    net = fr.Network.chain([1] * 3000)
    (p,) = net.paths()
    assert len(p) == 2999 and p.source == "h0" and p.target == "h2999"
    net.add_node("skip", 1).add_edge("h0", "skip").add_edge("skip", "h2999")
    assert [len(q) for q in net.paths()] == [2999, 2]


def test_json_round_trip():
    net = random_dag(np.random.default_rng(3))
    again = fr.Network.from_json(net.to_json())
    assert again.signature() == net.signature()


@pytest.mark.parametrize("build, message", [
    (lambda n: n.add_node("x", 2), "duplicate node name 'x'"),
    (lambda n: n.add_node("z", 0), "node 'z': dimension must be a positive integer, got 0"),
    (lambda n: n.add_node("z", -3), "node 'z': dimension must be a positive integer, got -3"),
    (lambda n: n.add_node("z", 2.5), "node 'z': dimension must be a positive integer"),
    (lambda n: n.add_edge("x", "nowhere"), "unknown node 'nowhere'"),
    (lambda n: n.add_edge("h", "x"), "would create a cycle"),
    (lambda n: n.add_edge("y", "y"), "would create a cycle"),
    (lambda n: n.add_edge("x", "h"), "duplicate edge name 'x->h'"),
    (lambda n: n.add_edge(["x"], "h"), "unknown node \\[.x.\\]"),
    (lambda n: n.dim(["x"]), "unknown node \\[.x.\\]"),
    (lambda n: n.edge({"x->h"}), "unknown edge {'x->h'}"),
])
def test_bad_graphs(build, message):
    net = fr.Network()
    net.add_node("x", 2).add_node("h", 3).add_node("y", 1)
    net.add_edge("x", "h").add_edge("h", "y")
    with pytest.raises(fr.NetworkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(net)


def test_no_path_to_declared_output():
    net = fr.Network()
    net.add_node("x", 2, role="input").add_node("h", 3).add_node("dead", 2).add_node("y", 1, "output")
    net.add_edge("x", "h").add_edge("h", "y").add_edge("h", "dead")
    with pytest.raises(fr.NetworkError, match="node 'dead' has no path to an output"):
        net.validate()


def test_unconnected_node_and_empty():
    with pytest.raises(fr.NetworkError, match="no nodes"):
        fr.Network().validate()
    net = fr.Network().add_node("x", 2).add_node("y", 2).add_node("lonely", 2)
    net.add_edge("x", "y")
    with pytest.raises(fr.NetworkError, match="'lonely' is not connected"):
        _ = net.inputs


def test_declared_roles_are_enforced():
    net = fr.Network().add_node("x", 2, role="input").add_node("y", 2, role="output")
    with pytest.raises(fr.NetworkError, match="declared an output"):
        net.add_edge("y", "x")
    net.add_edge("x", "y")
    assert net.inputs == ("x",) and net.outputs == ("y",)
