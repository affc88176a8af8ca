"""Exact loss and gradient of a gated deep linear network, and the path form of MATH.md §2.

Two engines compute the same numbers:

- ``"samples"``: forward/backward propagation over the samples (BLAS products, sample-first);
- ``"moments"``: forward/backward propagation of transfer matrices per context, using the gated
  moments of ``stats.gated_moments`` — its cost does not grow with the number of samples.

Neither computes a block that a gate switches off. Real-valued gates are exact in both.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .data import Dataset, real_array
from .errors import ConfigError, WeightsError
from .network import DEFAULT_PATH_LIMIT, Network
from .stats import GatedMoments, gated_moments, least_squares, path_correlations

Weights = dict[str, np.ndarray]
ENGINES = ("auto", "samples", "moments")


def check_weights(net: Network, weights: Mapping[str, object]) -> Weights:
    """Validate ``weights`` ({edge: (dim target, dim source)}) against ``net``; float64 copies."""
    check_edge_names(net, weights)
    out: Weights = {}
    for e in net.edges:
        arr = weight_array(net, weights, e)
        if not np.all(np.isfinite(arr)):
            raise WeightsError(f"weights[{e!r}]: contains NaN or inf")
        out[e] = np.ascontiguousarray(arr)
    return out


def check_edge_names(net: Network, weights: Mapping[str, object]) -> None:
    """WeightsError unless ``weights`` is a mapping with exactly the edges of ``net``."""
    net.validate()
    if not isinstance(weights, Mapping):
        raise WeightsError(f"weights must be a mapping {{edge name: array}}, got {type(weights)}")
    for name in weights:
        if name not in net.edges:
            raise WeightsError(f"weights[{name!r}]: unknown edge (edges are {list(net.edges)})")
    for e in net.edges:
        if e not in weights:
            raise WeightsError(f"weights: missing edge {e!r}")


def weight_array(net: Network, weights: Mapping[str, object], e: str) -> np.ndarray:
    """``weights[e]`` as a float64 array of edge ``e``'s shape (not copied if it is one; not
    checked for NaN or inf). Complex, str and object arrays are refused (see ``real_array``)."""
    try:
        arr = real_array(weights[e])
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"weights[{e!r}]: not a float array: {exc}") from None
    if arr.shape != net.weight_shape(e):
        raise WeightsError(f"weights[{e!r}]: expected shape {net.weight_shape(e)} "
                           f"(dim target, dim source), got {arr.shape}")
    return arr


def choose_engine(net: Network, data: Dataset, engine: str = "auto") -> str:
    """The engine to use: ``"moments"`` when the contexts carry no more input columns in all
    (each context counts the dimensions of its open input nodes) than there are samples."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    ctx = data.contexts(net)
    node_col = {v: i for i, v in enumerate(net.nodes)}
    columns = sum(net.dim(u) * np.count_nonzero(ctx.node_gates[:, node_col[u]])
                  for u in net.inputs)
    return "moments" if columns <= data.n_samples else "samples"


# ---------------------------------------------------------------------- samples engine
def _edge_samples(a: np.ndarray, g_src: np.ndarray) -> tuple[slice | np.ndarray | None,
                                                              np.ndarray | None]:
    """The samples an edge's products need, given ``a`` (its gate times its target's gate) and
    its source's gate (where either is 0 the edge carries nothing, forward or back): a slice if
    all of them, indices if some, None if none; and ``a`` on them, None where it is all 1
    (the common ungated edge: no multiply)."""
    live = np.flatnonzero((a != 0) & (g_src != 0))
    if live.size == 0:
        return None, None
    if a.size <= np.iinfo(np.int32).max:  # (an engine keeps these for every edge and block)
        live = live.astype(np.int32)
    sel: slice | np.ndarray = slice(None) if live.size == a.size else live
    a_sel = a[sel]
    return sel, (None if np.all(a_sel == 1.0) else a_sel)


class _Workspace:
    """Arrays that one evaluation of the samples engine after another writes into, by name
    (fresh memory costs page faults: ~0.25 ms per MB here, a large part of a step)."""

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    def get(self, key: tuple[str, str], shape: tuple[int, ...]) -> np.ndarray:
        # the front of the memory kept under ``key``, made bigger only when too small: the
        # blocks a lane does in turn differ in rows (and in the samples their gates open)
        size = int(np.prod(shape))
        a = self._arrays.get(key)
        if a is None or a.size < size:
            a = self._arrays[key] = np.empty(size)
        return a[:size].reshape(shape)


def _buffer(work: _Workspace | None, key: tuple[str, str], shape: tuple[int, ...],
            zero: bool = False) -> np.ndarray:
    """An array of ``shape`` to write into: ``work``'s, or a new one; zeroed with ``zero``."""
    a = np.empty(shape) if work is None else work.get(key, shape)
    if zero:
        a.fill(0.0)
    return a


def _take_rows(src: np.ndarray, sel: np.ndarray, work: _Workspace | None,
               key: tuple[str, str]) -> np.ndarray:
    """``src[sel]`` (rows), in ``work``'s array ``key``."""
    from ._kernels.rows import take_rows

    out = _buffer(work, key, (sel.size, src.shape[1]))
    take_rows(src, sel, out)
    return out


def _add_rows(total: np.ndarray | None, sel: slice | np.ndarray, part: np.ndarray,
              work: _Workspace | None, key: tuple[str, str], P: int) -> np.ndarray:
    """``total`` (P, d) plus ``part`` on the samples ``sel``, in place; the sum's first term
    (``total`` None) is ``part`` itself if it covers every sample."""
    if total is None:
        if isinstance(sel, slice):
            return part
        total = _buffer(work, key, (P, part.shape[1]), zero=True)
    if isinstance(sel, slice):
        total += part
    else:
        from ._kernels.rows import add_rows

        add_rows(total, sel, part)
    return total


def _samples_of_edges(net: Network, data: Dataset, samples: slice = slice(None),
                     gates: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, tuple]:
    """{edge: ``_edge_samples``} on the data's rows ``samples`` (``gates``: the data's
    ``gate_matrix(net)``, if the caller keeps it)."""
    g_nodes, g_edges = data.gate_matrix(net) if gates is None else gates
    g_nodes, g_edges = g_nodes[samples], g_edges[samples]
    node_col = {v: i for i, v in enumerate(net.nodes)}
    return {e: _edge_samples(g_edges[:, i] * g_nodes[:, node_col[net.edge(e).target]],
                             g_nodes[:, node_col[net.edge(e).source]])
            for i, e in enumerate(net.edges)}


def _forward_samples(net: Network, data: Dataset, W: Weights, samples: slice = slice(None),
                     edge_samples: dict[str, tuple] | None = None,
                     work: _Workspace | None = None):
    """Activity of every node on the data's rows ``samples`` (a slice: the data's arrays are
    read through views); each edge's samples (``_samples_of_edges``, if the caller keeps them)
    and the source activity its products take. ``work``: where to put the arrays (new ones
    without)."""
    if edge_samples is None:
        edge_samples = _samples_of_edges(net, data, samples)
    P = data.weights[samples].shape[0]
    h: dict[str, np.ndarray] = {}
    taken: dict[str, np.ndarray] = {}
    for v in net.order:
        if not net.in_edges(v):
            gv = data.node_gates.get(v)
            x = data.inputs[v][samples]
            h[v] = x if gv is None else np.multiply(
                gv[samples, None], x, out=_buffer(work, ("h", v), (P, net.dim(v))))
            continue
        z = None
        for e in net.in_edges(v):
            src = net.edge(e).source
            sel, scale = edge_samples[e]
            if sel is None:
                continue
            full = isinstance(sel, slice)
            taken[e] = x = h[src] if full else _take_rows(h[src], sel, work, ("x", e))
            # the first product over every sample goes straight into the node's array
            key = ("h", v) if z is None and full else ("p", e)
            prod = np.matmul(x, W[e].T, out=_buffer(work, key, (x.shape[0], net.dim(v))))
            if scale is not None:
                prod *= scale[:, None]
            z = _add_rows(z, sel, prod, work, ("h", v), P)
        h[v] = _buffer(work, ("h", v), (P, net.dim(v)), zero=True) if z is None else z
    return h, edge_samples, taken


def _loss_gradient_samples(net: Network, data: Dataset, W: Weights, need_grad: bool,
                           samples: slice = slice(None),
                           edge_samples: dict[str, tuple] | None = None,
                           work: _Workspace | None = None):
    """Loss and {edge: gradient} (None without ``need_grad``) over the data's rows
    ``samples``. With ``work``, the gradients are its arrays: read them before its next use."""
    h, edge_samples, taken = _forward_samples(net, data, W, samples, edge_samples, work)
    w = data.weights[samples]
    delta: dict[str, np.ndarray] = {}
    loss = 0.0
    for out in net.outputs:
        r = np.subtract(h[out], data.targets[out][samples],
                        out=_buffer(work, ("r", out), h[out].shape))
        loss += 0.5 * float(np.einsum("n,ni,ni->", w, r, r))
        delta[out] = np.multiply(w[:, None], r, out=_buffer(work, ("d", out), r.shape))
    if not need_grad:
        return loss, None
    P = w.shape[0]
    grad: Weights = {}
    for v in reversed(net.order):
        if not net.in_edges(v):  # an input: its edges' gradients are done
            continue
        if v not in delta:  # no path from v to an output carries gradient (cannot happen)
            delta[v] = _buffer(work, ("d", v), (P, net.dim(v)), zero=True)
        dv = delta[v]
        for e in net.in_edges(v):
            src = net.edge(e).source
            sel, scale = edge_samples[e]
            if sel is None:
                grad[e] = _buffer(work, ("g", e), net.weight_shape(e), zero=True)
                continue
            if isinstance(sel, slice):
                ad = dv if scale is None else np.multiply(
                    scale[:, None], dv, out=_buffer(work, ("a", e), dv.shape))
            else:
                ad = _take_rows(dv, sel, work, ("a", e))
                if scale is not None:
                    np.multiply(scale[:, None], ad, out=ad)
            grad[e] = np.matmul(ad.T, taken[e], out=_buffer(work, ("g", e), net.weight_shape(e)))
            if net.in_edges(src):  # inputs need no delta
                back = np.matmul(ad, W[e], out=_buffer(work, ("b", e),
                                                        (ad.shape[0], net.dim(src))))
                delta[src] = _add_rows(delta.get(src), sel, back, work, ("d", src), P)
    return loss, {e: grad[e] for e in net.edges}


# ---------------------------------------------------------------------- moments engine
def transfer_matrices(net: Network, moments: GatedMoments, W: Weights) -> dict[str, np.ndarray]:
    """Per context, the linear map from stacked inputs to each node: (n_ctx, dim(v), Din)."""
    ctx = moments.contexts
    node_col = {v: i for i, v in enumerate(net.nodes)}
    edge_col = {e: i for i, e in enumerate(net.edges)}
    n_ctx = ctx.count
    d_in = moments.xx.shape[1]
    T: dict[str, np.ndarray] = {}
    for v in net.order:
        gv = ctx.node_gates[:, node_col[v]]
        if not net.in_edges(v):
            t = np.zeros((n_ctx, net.dim(v), d_in))
            sl = moments.input_slices[v]
            t[:, :, sl] = gv[:, None, None] * np.eye(net.dim(v))
            T[v] = t
            continue
        t = np.zeros((n_ctx, net.dim(v), d_in))
        for e in net.in_edges(v):
            a = ctx.edge_gates[:, edge_col[e]] * gv
            act = np.flatnonzero(a)
            if act.size:
                t[act] += a[act, None, None] * np.matmul(W[e], T[net.edge(e).source][act])
        T[v] = t
    return T


def _loss_gradient_moments(net: Network, data: Dataset, W: Weights, need_grad: bool):
    m = gated_moments(net, data)
    ctx = m.contexts
    T = transfer_matrices(net, m, W)
    A = np.concatenate([T[w] for w in net.outputs], axis=1)  # (n_ctx, Dout, Din)
    AS = np.matmul(A, m.xx)
    E = m.yx - AS  # per context: Σ w (y - h) xᵀ, stacked outputs
    # L = Σ_c L(B_c) + ½ <E_c + E_Bc, B_c − A_c> for the least-squares fits B (exact for any
    # B; see stats.least_squares), where ½ tr Σyy − <A, Σyx> + ½ <A, A Σxx> cancels near a fit
    fit = least_squares(net, data)
    loss = float(fit.loss.sum() + 0.5 * np.sum((E + fit.miss) * (fit.best - A)))
    if loss < 0.0:  # a loss is never negative: below 0 is rounding (NaN stays NaN)
        loss = 0.0
    if not need_grad:
        return loss, None
    node_col = {v: i for i, v in enumerate(net.nodes)}
    edge_col = {e: i for i, e in enumerate(net.edges)}
    F = {w: np.ascontiguousarray(E[:, m.output_slices[w], :]) for w in net.outputs}
    grad: Weights = {}
    for v in reversed(net.order):
        if not net.in_edges(v):
            continue
        Fv = F.get(v)
        if Fv is None:  # every edge out of v is gated off: nothing flows back
            for e in net.in_edges(v):
                grad[e] = np.zeros(net.weight_shape(e))
            continue
        gv = ctx.node_gates[:, node_col[v]]
        for e in net.in_edges(v):
            src = net.edge(e).source
            a = ctx.edge_gates[:, edge_col[e]] * gv
            act = np.flatnonzero(a)
            if not act.size:
                grad[e] = np.zeros(net.weight_shape(e))
                continue
            aF = a[act, None, None] * Fv[act]  # (k, dim v, Din)
            Ts = T[src][act]  # (k, dim s, Din)
            k, dv, d_in = aF.shape
            left = aF.transpose(1, 0, 2).reshape(dv, k * d_in)
            right = Ts.transpose(1, 0, 2).reshape(Ts.shape[1], k * d_in)
            grad[e] = -(left @ right.T)
            if net.in_edges(src):
                back = np.matmul(W[e].T, aF)
                if src not in F:
                    F[src] = np.zeros((ctx.count, net.dim(src), d_in))
                F[src][act] += back
    return loss, {e: grad[e] for e in net.edges}


# ---------------------------------------------------------------------- public functions
def loss_and_gradient(net: Network, data: Dataset, weights: Mapping[str, object],
                      engine: str = "auto") -> tuple[float, Weights]:
    """Loss ``Σ_n w_n ½ Σ_out |y − h|²`` and its gradient {edge: ∂L/∂W_e} (MATH.md §1)."""
    from .engine import one_blas_thread  # (BLAS at one thread: the same bits on any machine)

    data.check(net)
    W = check_weights(net, weights)
    with one_blas_thread():
        if choose_engine(net, data, engine) == "moments":
            return _loss_gradient_moments(net, data, W, True)  # type: ignore[return-value]
        return _loss_gradient_samples(net, data, W, True)  # type: ignore[return-value]


def loss(net: Network, data: Dataset, weights: Mapping[str, object], engine: str = "auto") -> float:
    """The loss ``L(W) = Σ_n w_n · ½ Σ_{v∈Out} |y_v(n) − h_v(n)|²`` (a float)."""
    from .engine import one_blas_thread

    data.check(net)
    W = check_weights(net, weights)
    with one_blas_thread():
        if choose_engine(net, data, engine) == "moments":
            return _loss_gradient_moments(net, data, W, False)[0]
        return _loss_gradient_samples(net, data, W, False)[0]


def gradient(net: Network, data: Dataset, weights: Mapping[str, object],
             engine: str = "auto") -> Weights:
    """Exact gradient {edge: ∂L/∂W_e}, each of shape (dim target, dim source)."""
    return loss_and_gradient(net, data, weights, engine)[1]


def forward(net: Network, data: Dataset, weights: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Activity of every node for every sample: {node: (P, dim)}."""
    data.check(net)
    h = _forward_samples(net, data, check_weights(net, weights))[0]
    return {v: a if a.flags.writeable else a.copy() for v, a in h.items()}  # (not the data's)


def path_gradient(net: Network, data: Dataset, weights: Mapping[str, object],
                  limit: int = DEFAULT_PATH_LIMIT) -> Weights:
    """∂L/∂W_e from the path-sum formula of MATH.md §2 (exact for 0/1 gates).

    ``−∂L/∂W_e = Σ_{p∈P(e)} W_{t̄(p,e)}ᵀ E(p) W_{s̄(p,e)}ᵀ``,
    ``E(p) = Σyx(p) − Σ_{j∈T(p)} W_j Σx(j, p)``.
    """
    data.check(net)
    W = check_weights(net, weights)
    corr = path_correlations(net, data, limit)
    paths = corr.paths

    def product(edges: tuple[str, ...], dim: int) -> np.ndarray:
        out = np.eye(dim)
        for e in edges:
            out = W[e] @ out
        return out

    W_path = [product(p.edges, net.dim(p.source)) for p in paths]
    E = [corr.yx[i] - sum(W_path[j] @ corr.xx[(j, i)] for j in corr.targets[i])
         for i in range(len(paths))]
    grad = {e: np.zeros(net.weight_shape(e)) for e in net.edges}
    for i, p in enumerate(paths):
        for e in p.edges:
            before, after = p.split(e)
            W_before = product(before, net.dim(p.source))
            W_after = product(after, net.dim(net.edge(e).target))
            grad[e] -= W_after.T @ E[i] @ W_before.T
    return grad


def conserved_quantities(net: Network, weights: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Q_v = Σ_{in} W Wᵀ − Σ_{out} Wᵀ W for every hidden node v, each (dim v, dim v).

    Constant under gradient flow; drifts by O(η²) per step under gradient descent.
    """
    W = check_weights(net, weights)
    Q = {}
    for v in net.hidden:
        q = np.zeros((net.dim(v), net.dim(v)))
        for e in net.in_edges(v):
            q += W[e] @ W[e].T
        for e in net.out_edges(v):
            q -= W[e].T @ W[e]
        Q[v] = q
    return Q
