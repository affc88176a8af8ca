"""The neural race reduction: bases, residuals, the reduced system and its exactness (MATH.md §3).

Data satisfying A1 are built by construction: every input node u has a random orthogonal V_u,
every output w a random orthogonal U_w, and per context (gate pattern) a set of one-hot latent
samples z = σ_k e_k; inputs are x_u = V_u (a_u ⊙ z)[:dim u] and targets y_w = U_w (m_wc ⊙ z)[:dim w],
so every gated moment is diagonal in those bases with one shared mode index. The reduction is then
checked against plain full-network gradient descent written here with ``fr.gradient``.
"""

import numpy as np
import pytest

import fastrace as fr
from fastrace.errors import ConfigError, NetworkError, ReductionError, WeightsError
from fastrace.reduce import Reduction, reduce

HIDDEN = 5


# ---------------------------------------------------------------------------- builders
def a1_network(rng: np.random.Generator, n_in: int = 2, n_out: int = 2, n_hidden: int = 2,
               max_io: int = 4) -> fr.Network:
    """Random inputs/outputs of 1..max_io units, hidden layers of HIDDEN units, a random chain
    of hidden layers plus skip connections (some straight from an input to an output)."""
    ins = [f"x{i}" for i in range(n_in)]
    outs = [f"y{i}" for i in range(n_out)]
    hid = [f"h{i}" for i in range(n_hidden)]
    net = fr.Network()
    for v in ins + outs:
        net.add_node(v, int(rng.integers(1, max_io + 1)))
    for v in hid:
        net.add_node(v, HIDDEN)
    order = ins + hid + outs
    for i, h in enumerate(hid):
        net.add_edge(str(rng.choice(ins + hid[:i])), h)
    for u in ins:
        if not net.out_edges(u):
            net.add_edge(u, str(rng.choice(hid)))
    for h in hid:
        if not net.out_edges(h):
            net.add_edge(h, str(rng.choice(outs)))
    for w in outs:
        if not net.in_edges(w):
            net.add_edge(str(rng.choice(hid)), w)
    if f"{ins[0]}->{outs[-1]}" not in net.edges:  # a skip connection straight to an output
        net.add_edge(ins[0], outs[-1])
    for _ in range(3):
        a, b = str(rng.choice(ins + hid)), str(rng.choice(hid + outs))
        if order.index(a) < order.index(b) and f"{a}->{b}" not in net.edges:
            net.add_edge(a, b)
    return net.validate()


def a1_data(net: fr.Network, rng: np.random.Generator, kind: str = "generic",
            n_ctx: int = 3, eps: float = 0.0) -> fr.Dataset:
    """Data satisfying A1 (see the module docstring); ``kind``: "generic" (distinct singular
    values), "identity" (all equal: X = I-like, fully degenerate), "pair" (modes 1 and 2 equal).
    ``eps`` adds eps * N(0, 1) to every target, which breaks A1."""
    nodes = net.inputs + net.outputs
    n = max(net.dim(v) for v in nodes)
    basis = {v: fr.init.random_orthogonal(net.dim(v), net.dim(v), rng) for v in nodes}
    scale = {u: rng.uniform(0.5, 2.0, n) for u in net.inputs}
    X = {u: [] for u in net.inputs}
    Y = {w: [] for w in net.outputs}
    gn = {v: [] for v in net.nodes}
    ge = {e: [] for e in net.edges}
    for c in range(n_ctx):
        sigma = rng.uniform(0.5, 2.0, n)
        gain = {w: rng.uniform(-2.0, 2.0, n) for w in net.outputs}
        if kind == "identity":
            scale = {u: np.ones(n) for u in net.inputs}
            sigma = np.ones(n)
            gain = {w: np.full(n, rng.uniform(1.0, 2.0)) for w in net.outputs}
        elif kind == "pair" and n >= 3:
            sigma[2] = sigma[1]
            for u in scale:
                scale[u][2] = scale[u][1]
            for w in gain:
                gain[w][2] = gain[w][1]
        # context 0 switches everything on, so no architecture is trivially silent
        on_n = {v: 1.0 if c == 0 else float(rng.random() < 0.7) for v in net.nodes}
        on_e = {e: 1.0 if c == 0 else float(rng.random() < 0.7) for e in net.edges}
        for k in range(n):
            z = np.zeros(n)
            z[k] = sigma[k]
            for u in net.inputs:
                X[u].append(basis[u] @ (scale[u] * z)[:net.dim(u)])
            for w in net.outputs:
                Y[w].append(basis[w] @ (gain[w] * z)[:net.dim(w)])
            for v in net.nodes:
                gn[v].append(on_n[v])
            for e in net.edges:
                ge[e].append(on_e[e])
    P = n_ctx * n
    weights = rng.uniform(0.5, 1.0, P)
    targets = {w: np.array(y) + eps * rng.standard_normal((P, net.dim(w))) for w, y in Y.items()}
    return fr.Dataset({u: np.array(x) for u, x in X.items()}, targets, gn, ge,
                      weights / weights.sum())


YT = np.array([[6, 6, 6, 6], [4, 4, 0, 0], [0, 0, 4, 4], *(3 * np.eye(4))])  # 7 features x 4 items


def routing(M: int = 7, K: int = 4, hidden: int = 64):
    """The paper's routing network (MATH.md §5, "k_plus_minus" gates): input domain i is trained
    with outputs i-⌊(K-1)/2⌋ .. i+⌊K/2⌋ (mod M); one sample per (trained pair, item), X = I_4,
    the same targets YT for every output domain, sample weight 1/14 = 2/(4·7) so that
    Σ_n w_n ½|y - h|² is the paper's sum over pairs of the mean squared error."""
    net = fr.Network()
    for i in range(M):
        net.add_node(f"in{i}", 4)
    net.add_node("h1", hidden)
    net.add_node("h2", hidden)
    for j in range(M):
        net.add_node(f"out{j}", 7)
    for i in range(M):
        net.add_edge(f"in{i}", "h1")
    net.add_edge("h1", "h2")
    for j in range(M):
        net.add_edge("h2", f"out{j}")
    pairs = [(i, (i + o) % M) for i in range(M) for o in range(-((K - 1) // 2), K // 2 + 1)]
    P = 4 * len(pairs)
    X = {f"in{i}": np.zeros((P, 4)) for i in range(M)}
    Y = {f"out{j}": np.zeros((P, 7)) for j in range(M)}
    gates = {v: np.zeros(P) for v in [*X, *Y]}
    n = 0
    for i, j in pairs:
        for item in range(4):
            X[f"in{i}"][n, item] = 1.0
            Y[f"out{j}"][n] = YT[:, item]
            gates[f"in{i}"][n] = gates[f"out{j}"][n] = 1.0
            n += 1
    return net, fr.Dataset(X, Y, node_gates=gates, weights=np.full(P, 2.0 / (4 * 7))), pairs


def full_gd(net, data, W, lr, steps, every=1):
    """Plain full-network gradient descent W <- W - lr dL/dW: weights and losses every `every`."""
    W = {e: w.copy() for e, w in W.items()}
    saved, losses = [W], [fr.loss(net, data, W)]
    for k in range(1, steps + 1):
        G = fr.gradient(net, data, W)
        W = {e: W[e] - lr * G[e] for e in W}
        if k % every == 0:
            saved.append(W)
            losses.append(fr.loss(net, data, W))
    return saved, np.array(losses)


def rel_weights(a, b):
    scale = max(float(np.abs(b[e]).max()) for e in b)
    return max(float(np.abs(a[e] - b[e]).max()) for e in b) / scale


CASES = [(seed, kind) for seed in range(4) for kind in ("generic", "identity", "pair")]


def case(seed, kind, **kw):
    rng = np.random.default_rng(1000 + seed)
    net = a1_network(rng, n_in=2 + seed % 2, n_out=1 + (seed + 1) % 3)
    return net, a1_data(net, rng, kind, **kw)


# ---------------------------------------------------------------------------- bases
@pytest.mark.parametrize("seed,kind", CASES)
def test_bases_diagonalise_every_correlation(seed, kind):
    net, data = case(seed, kind)
    red = reduce(net, data)
    assert isinstance(red, Reduction) and not red.approximate
    assert red.residual < 1e-12
    corr = fr.path_correlations(net, data)
    for v, R in red.bases.items():
        assert R.shape == (net.dim(v), net.dim(v))
        np.testing.assert_allclose(R.T @ R, np.eye(net.dim(v)), atol=1e-12)
    largest = max(np.abs(m).max() for m in [*corr.yx, *corr.xx.values()])
    n_modes = max(min(net.dim(p.source), net.dim(p.target)) for p in corr.paths)
    assert red.n_modes == n_modes
    assert red.system.s.shape == (n_modes, len(corr.paths))
    d_dense = red.system.d_dense()
    for i, p in enumerate(corr.paths):
        S = red.bases[p.target].T @ corr.yx[i] @ red.bases[p.source]
        k = min(S.shape)
        np.testing.assert_allclose(S * (1 - np.eye(*S.shape)), 0, atol=1e-11 * largest)
        np.testing.assert_allclose(red.system.s[:k, i], np.diagonal(S)[:n_modes], atol=1e-14)
        # T(p) is every path ending where p ends
        assert red.system.targets[i] == tuple(j for j, q in enumerate(corr.paths)
                                              if q.target == p.target)
        for j in corr.targets[i]:
            D = red.bases[corr.paths[j].source].T @ corr.xx[(j, i)] @ red.bases[p.source]
            np.testing.assert_allclose(D * (1 - np.eye(*D.shape)), 0, atol=1e-11 * largest)
            k = min(D.shape + (n_modes,))
            np.testing.assert_allclose(d_dense[:k, j, i], np.diagonal(D)[:k], atol=1e-14)


def test_modes_ordered_by_strength_and_signs_positive():
    """Two inputs into one output through a hidden layer, with a skip connection: the modes come
    largest |s| first and each mode's couplings are made positive."""
    rng = np.random.default_rng(7)
    net = fr.Network()
    for v, dim in (("a", 4), ("b", 4), ("h", 5), ("y", 4)):
        net.add_node(v, dim)
    for src, dst in (("a", "h"), ("b", "h"), ("h", "y"), ("a", "y")):
        net.add_edge(src, dst)
    data = a1_data(net, rng, "generic", n_ctx=2)
    red = reduce(net, data)
    strongest = np.abs(red.system.s).max(axis=1)
    assert np.all(np.diff(strongest) < 0)
    corr = fr.path_correlations(net, data)
    for alpha in range(red.n_modes):  # the strongest coupling of every mode is positive
        k = np.argmax(np.abs(red.system.s[alpha]))
        assert red.system.s[alpha, k] > 0
    # the singular values of the single path a->y are those of its correlation
    k = [i for i, p in enumerate(corr.paths) if p.edges == ("a->y",)][0]
    np.testing.assert_allclose(np.sort(np.abs(red.system.s[:, k]))[::-1],
                               np.linalg.svd(corr.yx[k], compute_uv=False), rtol=1e-12)


def test_degenerate_subspace_gets_the_same_basis_everywhere():
    """A chain with X = I, Y = I fed by two input nodes with the same (fully degenerate) data:
    both inputs must get the same basis up to signs fixed by the couplings, and every s > 0."""
    net = fr.Network()
    for v, dim in (("a", 3), ("b", 3), ("h", 4), ("y", 3)):
        net.add_node(v, dim)
    net.add_edge("a", "h")
    net.add_edge("b", "h")
    net.add_edge("h", "y")
    eye = np.eye(3)
    data = fr.Dataset({"a": np.vstack([eye, 0 * eye]), "b": np.vstack([0 * eye, eye])},
                      {"y": np.vstack([2 * eye, 2 * eye])},
                      node_gates={"a": np.repeat([1.0, 0.0], 3), "b": np.repeat([0.0, 1.0], 3)})
    red = reduce(net, data)
    assert red.residual < 1e-14
    np.testing.assert_allclose(red.bases["a"], red.bases["b"], atol=1e-14)
    np.testing.assert_allclose(red.bases["y"], red.bases["a"], atol=1e-14)
    np.testing.assert_allclose(red.system.s, 2.0 / 6.0, rtol=1e-13)


def test_residual_grows_with_violation_of_a1():
    net, _ = case(1, "generic")
    residuals = []
    for eps in (1e-6, 1e-4, 1e-2):
        _, data = case(1, "generic", eps=eps)
        with pytest.raises(ReductionError) as info:
            reduce(net, data, tol=1e-8)
        residuals.append(info.value.residual)
        assert f"{info.value.residual:.3g}" in str(info.value)
        approx = reduce(net, data, tol=1e-8, approximate=True)
        assert approx.approximate and approx.residual == pytest.approx(info.value.residual)
    assert residuals[0] < residuals[1] < residuals[2]
    # the residual is of the order of the violation, not an artefact of the method
    ratios = np.array(residuals) / np.array([1e-6, 1e-4, 1e-2])
    assert ratios.max() / ratios.min() < 30
    # a loose tolerance accepts the same data
    _, data = case(1, "generic", eps=1e-6)
    assert not reduce(net, data, tol=1e-3).approximate


@pytest.mark.parametrize("kind", ["generic", "pair", "identity"])
def test_residual_is_continuous_in_the_violation(kind):
    for seed in range(6):
        rng_net = np.random.default_rng(50 + seed)
        net = a1_network(rng_net, n_in=3, n_out=2, max_io=4)
        res = [reduce(net, a1_data(net, np.random.default_rng(seed), kind, eps=eps),
                      approximate=True).residual for eps in (1e-6, 1e-3)]
        assert res[0] < 1e-4 and res[1] < 1e-1 and res[0] < res[1]


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("seed,kind", CASES[:6])
def test_loss_and_constant(seed, kind):
    net, data = case(seed, kind)
    red = reduce(net, data)
    targets = data.stacked_targets(net)
    assert red.loss_constant == pytest.approx(0.5 * np.sum(data.weights * np.sum(targets ** 2, 1)),
                                              rel=1e-14)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        b = red.expand_b(rng.normal(0.0, 1.0, (red.n_modes, len(net.edges))))
        W = red.reconstruct(b)
        full = fr.loss(net, data, W)
        assert red.loss(b) == pytest.approx(full, rel=1e-12, abs=1e-12)
        assert red.mode_loss(b).shape == (red.n_modes,)
        np.testing.assert_allclose(red.project(W), b, atol=1e-13)


@pytest.mark.parametrize("seed,kind", CASES[:6])
def test_rhs_is_projected_negative_gradient(seed, kind):
    net, data = case(seed, kind)
    red = reduce(net, data)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        b = red.expand_b(rng.normal(0.0, 1.0, (red.n_modes, len(net.edges))))
        W = red.reconstruct(b)
        G = fr.gradient(net, data, W)
        minus_g, off = red.project({e: -g for e, g in G.items()}, return_residual=True)
        assert off < 1e-12  # the gradient of aligned weights is aligned (A2 is preserved)
        rhs = red.system.rhs(b)
        scale = np.abs(rhs).max()
        np.testing.assert_allclose(rhs, minus_g, atol=1e-12 * scale)
        assert np.all(rhs[~red.mode_mask] == 0.0)  # entries an edge cannot carry stay at 0


@pytest.mark.parametrize("seed,kind", CASES[:6])
def test_reduced_gd_reproduces_full_gd(seed, kind):
    net, data = case(seed, kind)
    red = reduce(net, data)
    lr, steps = 0.05, 120
    W0 = red.aligned_init(0.3, seed=seed)
    assert red.project(W0, return_residual=True)[1] < 1e-14
    weights, losses = full_gd(net, data, W0, lr, steps, every=40)
    b = red.project(W0)  # my own Euler loop on the system's right-hand side
    for _ in range(steps):
        b = b + lr * red.system.rhs(b)
    assert rel_weights(red.reconstruct(b), weights[-1]) < 1e-9
    assert abs(red.loss(b) - losses[-1]) <= 1e-9 * losses[0]
    sol = red.integrate(0.3, method="gd", lr=lr, steps=steps, save_at=np.arange(0, steps + 1, 40))
    np.testing.assert_allclose(sol.t, lr * np.arange(0, steps + 1, 40), rtol=1e-14)
    assert sol.b.shape == (4, red.n_modes, len(net.edges))
    for i, W in enumerate(weights):
        assert rel_weights(sol.weights(i), W) < 1e-9
    np.testing.assert_allclose(sol.loss, losses, rtol=1e-9, atol=1e-9 * losses[0])


def test_reconstruct_time_first_and_alignment_checks():
    net, data = case(0, "generic")
    red = reduce(net, data)
    rng = np.random.default_rng(3)
    b = rng.normal(size=(5, red.n_modes, len(net.edges)))
    W_t = red.reconstruct(b)
    for e in net.edges:
        assert W_t[e].shape == (5, *net.weight_shape(e))
    for i in range(5):
        W_i = red.reconstruct(b[i])
        assert rel_weights({e: W_t[e][i] for e in net.edges}, W_i) < 1e-14
    losses = red.loss(b)
    assert losses.shape == (5,)
    assert losses[2] == pytest.approx(red.loss(b[2]), rel=1e-14)
    random = fr.init.gaussian(net, 1.0, seed=0)
    assert red.project(random, return_residual=True)[1] > 0.1  # not aligned
    # a given hidden basis is used as is
    Rh = {v: fr.init.random_orthogonal(net.dim(v), net.dim(v), rng) for v in net.hidden}
    W = red.aligned_init(0.5, hidden_bases=Rh)
    for v in net.hidden:
        np.testing.assert_array_equal(red.hidden_bases[v], Rh[v])
    for e in net.edges:
        edge = net.edge(e)
        k = min(red.n_modes, *net.weight_shape(e))
        R_t = red.bases.get(edge.target, Rh.get(edge.target))
        R_s = red.bases.get(edge.source, Rh.get(edge.source))
        np.testing.assert_allclose(R_t.T @ W[e] @ R_s,
                                   np.pad(0.5 * np.eye(k), ((0, R_t.shape[0] - k),
                                                            (0, R_s.shape[0] - k))), atol=1e-14)


def test_bad_input_raises_project_errors():
    net, data = case(0, "generic")
    red = reduce(net, data)
    with pytest.raises(WeightsError, match="b0"):
        red.aligned_init(np.ones(len(net.edges) + 1))
    with pytest.raises(WeightsError, match="NaN"):
        red.aligned_init(np.nan)
    with pytest.raises(WeightsError, match="orthogonal"):
        red.aligned_init(0.1, hidden_bases={v: 2 * np.eye(net.dim(v)) for v in net.hidden})
    with pytest.raises(WeightsError, match="missing"):
        red.aligned_init(0.1, hidden_bases={})
    with pytest.raises(WeightsError):
        red.project({})
    with pytest.raises(ConfigError, match="tol"):
        reduce(net, data, tol=-1.0)
    with pytest.raises(WeightsError, match="shape"):
        red.loss(np.zeros(3))
    # a hidden layer narrower than the modes its paths carry cannot hold A2
    narrow = fr.Network()
    for v, dim in (("x", 3), ("h", 2), ("y", 3)):
        narrow.add_node(v, dim)
    narrow.add_edge("x", "h")
    narrow.add_edge("h", "y")
    eye = np.eye(3)
    red = reduce(narrow, fr.Dataset({"x": eye}, {"y": eye}))
    with pytest.raises(NetworkError, match="'h' has 2 units"):
        red.aligned_init(0.1)


# ---------------------------------------------------------------------------- conservation
def test_conservation_per_mode_along_the_flow():
    net, data = case(2, "generic")
    red = reduce(net, data)
    sol = red.integrate(0.4, method="dopri5", t_end=5.0, save_at=np.linspace(0, 5, 11),
                        rtol=1e-11, atol=1e-13)
    Q = red.system.conserved(sol.b)  # (n_saved, n_modes, n_hidden)
    assert np.abs(sol.loss[-1]) < sol.loss[0]  # it learned something
    np.testing.assert_allclose(Q, np.broadcast_to(Q[0], Q.shape), atol=1e-8)
    # the scalar laws are the full-network law Q_v = R_v diag(...) R_vᵀ of the reconstruction
    hidden_ids = [net.nodes[i] for i in red.system.hidden_nodes]
    for i in (0, 10):
        full = fr.conserved_quantities(net, sol.weights(i))
        for h, v in enumerate(hidden_ids):
            R = red.hidden_bases[v][:, :red.n_modes]
            np.testing.assert_allclose(full[v], (R * Q[i, :, h]) @ R.T, atol=1e-12)


# ---------------------------------------------------------------------------- the routing task
@pytest.fixture(scope="module")
def routing_case():
    net, data, pairs = routing()
    return net, data, pairs, reduce(net, data)


def test_routing_reduction(routing_case):
    net, data, pairs, red = routing_case
    assert red.residual < 1e-12 and red.n_modes == 4
    sv = np.linalg.svd(YT, compute_uv=False)  # 13.60, 6.40, 3, 3
    trained = np.zeros(len(net.paths()), dtype=bool)
    for k, p in enumerate(net.paths()):
        i, j = int(p.source[2:]), int(p.target[3:])
        trained[k] = (i, j) in pairs
    # every trained pair carries the singular values of YᵀX scaled by its sample weight 1/14
    np.testing.assert_allclose(red.system.s[:, trained], np.repeat(sv[:, None] / 14, 28, 1),
                               rtol=1e-12)
    np.testing.assert_array_equal(red.system.s[:, ~trained], 0.0)
    d = red.system.d_dense()
    np.testing.assert_allclose(np.diagonal(d, axis1=1, axis2=2)[:, trained], 1 / 14, rtol=1e-12)
    # the item basis is the same in every input domain, the feature basis in every output domain
    for i in range(1, 7):
        np.testing.assert_allclose(red.bases[f"in{i}"], red.bases["in0"], atol=1e-13)
        np.testing.assert_allclose(red.bases[f"out{i}"], red.bases["out0"], atol=1e-13)


def test_routing_matches_paper_mode_equations(routing_case):
    """MATH.md §4: with every input module at a1, the shared edge at a2 and every output module
    at a3, one GD step moves (a1, a2, a3) by η·(2M²/(P N_out))·((K/M²) a2a3, (K/M) a1a3,
    (K/M²) a1a2)·(s − a1a2a3), with s the singular values of YᵀX and P = 4 items."""
    net, data, pairs, red = routing_case
    M, K, P, N_out = 7, 4, 4, 7
    rng = np.random.default_rng(0)
    a1, a2, a3 = rng.uniform(0.1, 1.5, 3)
    b = np.zeros((red.n_modes, len(net.edges)))
    for k, e in enumerate(net.edges):
        b[:, k] = a1 if e.startswith("in") else a2 if e == "h1->h2" else a3
    sv = np.linalg.svd(YT, compute_uv=False)
    unit = 2 * M**2 / (P * N_out)
    rhs = red.system.rhs(b)
    for k, e in enumerate(net.edges):
        other = a2 * a3 * K / M**2 if e.startswith("in") else \
            a1 * a3 * K / M if e == "h1->h2" else a1 * a2 * K / M**2
        np.testing.assert_allclose(rhs[:, k], unit * other * (sv - a1 * a2 * a3), rtol=1e-12)


def test_routing_reduced_gd_matches_full_gd(routing_case):
    net, data, pairs, red = routing_case
    lr, steps = 0.02, 500
    W0 = red.aligned_init(0.08, seed=0)
    weights, losses = full_gd(net, data, W0, lr, steps, every=100)
    sol = red.integrate(0.08, method="gd", lr=lr, steps=steps,
                        save_at=np.arange(0, steps + 1, 100))
    for i, W in enumerate(weights):
        assert rel_weights(sol.weights(i), W) < 1e-9
    np.testing.assert_allclose(sol.loss, losses, rtol=1e-9, atol=1e-9 * losses[0])
    assert losses[-1] < 1e-6 * losses[0]  # the task is learned, every mode in turn
    # hidden representations of an item are the same in every input domain
    W = weights[-1]
    for i in range(1, 7):
        np.testing.assert_allclose(W[f"in{i}->h1"], W["in0->h1"], atol=1e-9)


def test_reduced_trajectory_streams_to_hdf5(tmp_path):
    from fastrace import store

    task = fr.tasks.routing()
    red = fr.reduce(task.network, task.data)
    path = tmp_path / "theory.h5"
    th = red.integrate(0.08, method="gd", lr=0.02, steps=50, out=path)
    data = store.read_run(path, "theory")
    assert data.status == "complete"
    np.testing.assert_array_equal(data["t"], th.t)
    np.testing.assert_array_equal(data["loss"], th.loss)
    np.testing.assert_array_equal(data["modes/b"], th.b)
    np.testing.assert_array_equal(data["modes/pi"], th.path_strengths)
    with pytest.raises(fr.StoreError, match="does not exist"):
        red.integrate(0.08, method="gd", lr=0.02, steps=5, out=tmp_path / "no" / "x.h5")


def test_reduce_refuses_arguments_of_the_wrong_type():
    net, data = case(0, "generic")
    with pytest.raises(ConfigError, match="Dataset"):
        reduce(net, {"x0": np.eye(2)})
    with pytest.raises(ConfigError, match="Network"):
        reduce(None, data)


def test_path_correlations_too_big_for_memory_are_refused_before_they_are_computed(monkeypatch):
    """The input-input correlations of every pair of paths sharing an output grow as paths²:
    past the memory available, a PathExplosionError before any is computed (not a swap storm
    or the OOM killer)."""
    from fastrace import _memory

    net = fr.Network()
    for name, dim in (("x", 3), ("h", 4), ("y", 2)):
        net.add_node(name, dim)
    for k in range(40):  # 40 parallel edges x -> h: 40 paths to y, 1600 pairs
        net.add_edge("x", "h", name=f"e{k}")
    net.add_edge("h", "y")
    rng = np.random.default_rng(0)
    data = fr.Dataset({"x": rng.standard_normal((20, 3))}, {"y": rng.standard_normal((20, 2))})
    assert len(fr.path_correlations(net, data).xx) == 1600  # fits
    monkeypatch.setattr(_memory, "available_memory", lambda: 100_000)
    with pytest.raises(fr.PathExplosionError, match="1600 pairs of paths"):
        fr.path_correlations(net, data)
