"""Gated statistics: second moments per context and the per-path correlations of MATH.md §2.

The gradient of a gated deep linear network depends on the data only through these moments, so
they are computed once and every later step costs nothing per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Contexts, Dataset
from .errors import DataError, PathExplosionError
from .network import DEFAULT_PATH_LIMIT, Network, Path


@dataclass(frozen=True)
class GatedMoments:
    """Per-context second moments of the stacked inputs ``x`` (Din) and targets ``y`` (Dout).

    ``xx[c] = Σ_{n in c} w_n x_n x_nᵀ`` (n_ctx, Din, Din), ``yx[c] = Σ w_n y_n x_nᵀ``
    (n_ctx, Dout, Din), ``yy[c] = Σ w_n |y_n|²`` (n_ctx,). ``input_slices`` and ``output_slices``
    locate each node's block in the stacked vectors.
    """

    contexts: Contexts
    input_slices: dict[str, slice]
    output_slices: dict[str, slice]
    xx: np.ndarray
    yx: np.ndarray
    yy: np.ndarray

    @property
    def n_contexts(self) -> int:
        return self.contexts.count


def _slices(net: Network, nodes: tuple[str, ...]) -> dict[str, slice]:
    out, start = {}, 0
    for v in nodes:
        out[v] = slice(start, start + net.dim(v))
        start += net.dim(v)
    return out


def gated_moments(net: Network, data: Dataset) -> GatedMoments:
    """Per-context moments of ``data`` for ``net`` (cached on the data set per architecture)."""
    key = ("moments", net.signature())
    cached = data._cache.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    ctx = data.contexts(net)
    x = data.stacked_inputs(net)
    y = data.stacked_targets(net)
    w = data.weights
    n_ctx = ctx.count
    xx = np.zeros((n_ctx, x.shape[1], x.shape[1]))
    yx = np.zeros((n_ctx, y.shape[1], x.shape[1]))
    yy = np.zeros(n_ctx)
    order = np.argsort(ctx.index, kind="stable")
    bounds = np.searchsorted(ctx.index[order], np.arange(n_ctx + 1))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below
        for c in range(n_ctx):
            rows = order[bounds[c]:bounds[c + 1]]
            xc, yc, wc = x[rows], y[rows], w[rows]
            wx = xc * wc[:, None]
            xx[c] = wx.T @ xc
            yx[c] = yc.T @ wx
            yy[c] = np.einsum("n,ni,ni->", wc, yc, yc)
    for name, arr in (("xx", xx), ("yx", yx), ("yy", yy)):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"the gated second moments overflow ({name} is not finite): the "
                            "inputs, targets or weights are too large; rescale them")
        arr.flags.writeable = False  # shared by every user of the cache
    moments = GatedMoments(ctx, _slices(net, net.inputs), _slices(net, net.outputs), xx, yx, yy)
    data._cache[key] = moments
    return moments


class SampleFits:
    """Losses of fixed linear maps of the inputs, summed over chosen samples (the data is
    stacked once). A loss near its minimum is known to the rounding of the residuals this way,
    where the moments' form ½ tr Σyy − <M, Σyx> + ½ <M, M Σxx> loses everything below
    eps · ½ tr Σyy."""

    def __init__(self, net: Network, data: Dataset) -> None:
        self.net, self.data = net, data
        self.ctx = data.contexts(net)
        # the samples of context c: self.order[self.bounds[c]:self.bounds[c + 1]]
        self.order = np.argsort(self.ctx.index, kind="stable")
        self.bounds = np.searchsorted(self.ctx.index[self.order], np.arange(self.ctx.count + 1))
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self.outputs = _slices(net, net.outputs)

    def _stacked(self) -> tuple[np.ndarray, np.ndarray]:
        if self._x is None:
            self._x = self.data.stacked_inputs(self.net)
            self._y = self.data.stacked_targets(self.net)
        return self._x, self._y  # type: ignore[return-value]

    def loss(self, contexts: np.ndarray, output: str | None = None,
             inputs: np.ndarray | None = None, M: np.ndarray | None = None) -> float:
        """½ Σ w_n |y_n − M x_n|² over the samples of the contexts ``contexts`` (indices): y
        the stacked targets or those of ``output``, x the stacked inputs or their columns
        ``inputs``; ``M`` None is the zero map."""
        if not len(contexts):
            return 0.0
        sel = np.concatenate([self.order[self.bounds[c]:self.bounds[c + 1]] for c in contexts])
        if not sel.size:
            return 0.0
        x, y = self._stacked()
        r = y[sel] if output is None else y[sel, self.outputs[output]]
        if M is not None:
            r = r - (x[sel] if inputs is None else x[np.ix_(sel, inputs)]) @ M.T
        return 0.5 * float(np.dot(self.data.weights[sel], np.einsum("ij,ij->i", r, r)))

    def context_losses(self, M: np.ndarray) -> np.ndarray:
        """(n_ctx,) ½ Σ_{n∈c} w_n |y_n − M[c] x_n|² for per-context maps M (n_ctx, Dout, Din)
        of all outputs and inputs, in blocks of samples (no Python work per context; each
        block gathers its samples' maps, ~32 MB)."""
        x, y = self._stacked()
        index, weights = self.ctx.index, self.data.weights
        block = max(1, (4 << 20) // max(1, M.shape[1] * M.shape[2]))
        out = np.zeros(self.ctx.count)
        for a in range(0, len(index), block):
            c = index[a:a + block]
            r = y[a:a + block] - np.einsum("nij,nj->ni", M[c], x[a:a + block])
            out += np.bincount(c, weights=weights[a:a + block] * np.einsum("ij,ij->i", r, r),
                               minlength=len(out))
        return 0.5 * out


def reference_maps(yx: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference maps B (..., Dout, Din) for moments yx (..., Dout, Din), xx (..., Din, Din),
    and E_B = yx − B xx. The loss of any map T is L(B) + ½ <E + E_B, B − T> (E = yx − T xx),
    exactly; its rounding is smallest with B the least-squares fit yx xx⁺ when xx is well
    conditioned (every eigenvalue either above 1e-3 of the largest, or below 1e-12: a direction
    the data does not have, left out). Otherwise (eigenvalues in between, whose inverses would
    make B large and cost the loss digits) B = 0, which is the moments' own form
    ½ Σ|y|² − <T, yx> + ½ <T, T xx>."""
    lam = np.linalg.eigvalsh(xx)  # ascending, per matrix
    top = lam[..., -1:]
    thin = ((lam > 1e-12 * top) & (lam < 1e-3 * top)).any(axis=-1) | (top[..., 0] <= 0)
    best = np.matmul(yx, np.linalg.pinv(xx, rcond=1e-6, hermitian=True))
    best[thin] = 0.0
    return best, yx - np.matmul(best, xx)


@dataclass(frozen=True)
class LeastSquares:
    """Per context c, a reference linear map from the stacked inputs to the stacked outputs,
    ``best[c]`` (n_ctx, Dout, Din; see ``reference_maps``: the least-squares fit where the
    data is well conditioned), with ``miss[c] = yx[c] − best[c] xx[c]`` and its loss over the
    context's samples, ``loss[c]`` (n_ctx,). The loss of any map A_c is, exactly,
    loss[c] + ½ <E_c + miss[c], best[c] − A_c> with E_c = yx[c] − A_c xx[c]."""

    best: np.ndarray
    miss: np.ndarray
    loss: np.ndarray


def least_squares(net: Network, data: Dataset) -> LeastSquares:
    """The per-context least-squares fits of ``data`` (cached on the data set)."""
    key = ("least squares", net.signature())
    cached = data._cache.get(key)
    if cached is not None:
        return cached  # type: ignore[return-value]
    m = gated_moments(net, data)
    best, miss = reference_maps(m.yx, m.xx)
    result = LeastSquares(best, miss, SampleFits(net, data).context_losses(best))
    for arr in (result.best, result.miss, result.loss):
        arr.flags.writeable = False  # shared by every user of the cache
    data._cache[key] = result
    return result


def path_gates(net: Network, ctx: Contexts, path: Path) -> np.ndarray:
    """g_p per context (n_ctx,): gate of the source node times each edge gate and target gate."""
    nodes = {v: i for i, v in enumerate(net.nodes)}
    edges = {e: i for i, e in enumerate(net.edges)}
    g = ctx.node_gates[:, nodes[path.source]].copy()
    for e in path.edges:
        g *= ctx.edge_gates[:, edges[e]] * ctx.node_gates[:, nodes[net.edge(e).target]]
    return g


@dataclass(frozen=True)
class PathCorrelations:
    """Σyx(p) and Σx(j, p) of MATH.md §2 for every path of a network.

    ``paths``: the paths in ``net.paths()`` order; ``yx[p]``: (dim t(p), dim s(p));
    ``targets[p]``: indices j of T(p) (paths ending where p ends); ``xx[(j, p)]``:
    (dim s(j), dim s(p)) for j in T(p).
    """

    paths: tuple[Path, ...]
    yx: tuple[np.ndarray, ...]
    targets: tuple[tuple[int, ...], ...]
    xx: dict[tuple[int, int], np.ndarray]


#: bytes a pair's entry of PathCorrelations.xx costs besides its numbers (key, array object)
_PAIR_OVERHEAD_BYTES = 200


def _refuse_too_many_pairs(paths: tuple[Path, ...], targets: tuple[tuple[int, ...], ...],
                           ins: dict[str, slice]) -> None:
    """PathExplosionError if the input-input correlations of every pair of paths that share an
    output (O(paths²)) would not fit in the memory available."""
    from ._memory import available_memory

    width = [ins[p.source].stop - ins[p.source].start for p in paths]
    need = sum(len(js) * _PAIR_OVERHEAD_BYTES + 8 * width[i] * sum(width[j] for j in js)
               for i, js in enumerate(targets))
    room = available_memory()
    if room is not None and need > room:
        pairs = sum(len(js) for js in targets)
        raise PathExplosionError(
            f"the correlations of {pairs} pairs of paths ({len(paths)} paths) need "
            f"{need / 2**30:.1f} GiB of memory and {room / 2**30:.1f} GiB are available; use "
            "the forward/backward gradient (fr.gradient) instead of the path form")


def path_correlations(net: Network, data: Dataset,
                      limit: int = DEFAULT_PATH_LIMIT) -> PathCorrelations:
    """Gated input-output and input-input correlations of every path (MATH.md §2)."""
    moments = gated_moments(net, data)
    paths = net.paths(limit)
    ctx = moments.contexts
    gates = [path_gates(net, ctx, p) for p in paths]
    ins, outs = moments.input_slices, moments.output_slices
    yx = tuple(np.einsum("c,cij->ij", g, moments.yx[:, outs[p.target], ins[p.source]])
               for g, p in zip(gates, paths))
    targets = tuple(tuple(j for j, q in enumerate(paths) if q.target == p.target) for p in paths)
    _refuse_too_many_pairs(paths, targets, ins)
    xx = {}
    for i, p in enumerate(paths):
        for j in targets[i]:
            q = paths[j]
            xx[(j, i)] = np.einsum("c,cij->ij", gates[j] * gates[i],
                                   moments.xx[:, ins[q.source], ins[p.source]])
    return PathCorrelations(paths, yx, targets, xx)
