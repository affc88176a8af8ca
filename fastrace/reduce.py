"""The neural race reduction (MATH.md §3): shared bases, the reduced system, reconstruction.

``reduce(net, data)`` finds orthogonal bases ``V_u`` (input nodes) and ``U_w`` (output nodes) in
which every path correlation is diagonal with one global mode index α,

    Σyx(p)   = U_{t(p)} S(p) V_{s(p)}ᵀ,     Σx(j, p) = V_{s(j)} D(j, p) V_{s(p)}ᵀ,

(S, D rectangular-diagonal), and returns a :class:`Reduction` holding the bases, the measured
off-diagonal residual and the reduced system (a :class:`~fastrace.system.RaceSystem` with one scalar
edge per network edge, one path per network path and per-mode ``s_p = S(p)[α, α]``,
``d_jp = D(j, p)[α, α]``).

How the bases are found
-----------------------
Stack the spaces of all input and output nodes into one space Z and build the symmetric "coupling"
matrix K on Z: block (w, u) holds a random combination of the Σyx(p) of the paths from u to w,
block (u', u) a random combination of the Σx(j, p) with s(j) = u', s(p) = u, and every diagonal
block gets a random multiple of the identity. Under A1, K preserves each mode subspace
Z_α = span{mode α vector of every node}, so K = ⊕_α K_α, and so does every function of K.

1. Eigen-decompose K once and form two random smooth functions G1 = g1(K), G2 = g2(K).
2. Node operators H_a = P_a G1 P_a + P_a G2 B G2 P_a (P_a: projection on node a; B: block-diagonal
   with random combinations of P_b G1 P_b and P_b). Each H_a is diagonal in node a's basis and its
   eigenvalues separate modes that differ anywhere along a chain of couplings; a degeneracy left
   in H_a is a true symmetry of the data, in which any rotation is consistent.
3. Transport: for a mode vector x at node a, ``P_b G2 P_a x`` is the mode vector of the SAME mode
   at node b (scaled), or zero when that mode does not link a and b. So, node after node: take
   the node's unassigned subspace, diagonalise H_a in it (inside an exactly degenerate eigenspace,
   pick the basis closest to the coordinate axes), make each eigenvector x the seed of a new mode
   group, and transport every seed to every other node b. At b the transports claim directions in
   order of decreasing norm, each projected on b's still unassigned subspace, and join the group
   when the projection is not negligible (norm > 1e-9 and at least half the transport). Ordering
   the claims by strength keeps a transport that is only nonzero because A1 holds approximately
   from taking a direction a true link needs. Repeat until every node's space is exhausted; what
   nothing links becomes single-node groups (the orthonormal complement). A degenerate subspace
   gets the same basis at every node it is shared across, since every node's vectors are
   transported from one seed.
4. Sort the groups by strength (largest |s| first, then largest |d|; ties keep their order) and
   give each the smallest index free at all its nodes (an index must stay below every node's
   dimension, since S and D are rectangular-diagonal). If that packing fails, groups with the
   tightest dimension bound go first; if that fails too (A1 does not hold), a group keeps the
   index that fits most of its nodes and its other nodes are split off.
5. Signs: per mode, along a maximum spanning forest of its couplings (strongest first), each node
   is flipped so that its coupling is positive, the first node having its largest entry positive.
   Then compute S(p), D(j, p) and the residual; if it exceeds ``tol``, retry with fresh random
   coefficients (three attempts, the best kept).

Cost: one dense eigen-decomposition of size Σ dims of the input and output nodes, plus small
per-node work; path_correlations costs O(paths²).

Residual: ``max`` over every Uᵀ Σyx(p) V and Vᵀ Σx(j, p) V of the Frobenius norm of its
off-diagonal part, divided by the largest absolute entry of all of them.

Modes: ``n_modes = max_p min(dim s(p), dim t(p))``, every mode some path can carry. Entries of
``b`` that an edge cannot carry (α ≥ min(dim source, dim target)) are held at 0 (``mode_mask``);
the reduced dynamics keep them at 0. Modes beyond an input's or output's dimension have s = 0 and
d = 0 there. A hidden node must be at least as wide as the number of modes its paths carry.

Loss: ``fr.loss(W) = Σ_α mode_loss_α(b) + loss_constant`` with ``loss_constant = ½ Σ_n w_n Σ_out |y|²``
(exact under A1 and A2).
"""

from __future__ import annotations

import json

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .data import Dataset, real_array
from .errors import ConfigError, NetworkError, ReductionError, WeightsError
from .gradient import check_weights
from .init import Seed, as_generator, random_orthogonal
from .network import Network
from .stats import PathCorrelations, gated_moments, path_correlations
from .system import RaceSystem

if TYPE_CHECKING:
    from .integrate import RaceSolution

__all__ = ["Reduction", "ReducedSolution", "reduce"]

_ATTEMPTS = 3
_LINK_TOL = 1e-9  # transports below this (K scaled to O(1)) do not link two nodes


# ---------------------------------------------------------------------------- couplings
def _coupling_blocks(net: Network, corr: PathCorrelations) -> list[tuple[str, str, np.ndarray]]:
    """(row node, column node, matrix) for every Σyx(p) and every Σx(j, p) with j <= p."""
    blocks = [(p.target, p.source, corr.yx[i]) for i, p in enumerate(corr.paths)]
    for (j, i), m in corr.xx.items():
        if j <= i:
            blocks.append((corr.paths[j].source, corr.paths[i].source, m))
    return blocks


def _smooth_random_function(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """A random smooth function of the eigenvalues (equal eigenvalues give equal values)."""
    lo, hi = float(lam.min()), float(lam.max())
    mu = (lam - lo) / (hi - lo) if hi > lo else np.full_like(lam, 0.5)
    out = np.zeros_like(lam)
    for k in (1, 2, 3):
        out += rng.uniform(0.5, 1.5) * np.cos(np.pi * k * mu + rng.uniform(0.0, 2.0 * np.pi))
    return out


def _complement(free: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the part of span(free) orthogonal to v (v in span(free), unit)."""
    c = free.T @ v
    q, _ = np.linalg.qr(c[:, None], mode="complete")
    return free @ q[:, 1:]


def _axis_aligned(values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Within each exactly degenerate eigenspace (a symmetry of the data, where any basis is
    consistent), replace the arbitrary basis by the one closest to the coordinate axes:
    repeatedly take the axis with the largest projection on the remaining subspace."""
    out = vectors.copy()
    tol = 1e-10 * max(1.0, float(np.max(np.abs(values)))) if values.size else 0.0
    start = 0
    while start < values.size:
        stop = start + 1
        while stop < values.size and values[stop] - values[stop - 1] <= tol:
            stop += 1
        if stop - start > 1:
            rest = vectors[:, start:stop]
            for k in range(start, stop):
                v = rest @ rest[_first_largest(np.linalg.norm(rest, axis=1))]
                v /= np.linalg.norm(v)
                out[:, k] = v
                rest = _complement(rest, v)
        start = stop
    return out


def _first_largest(x: np.ndarray) -> int:
    """Index of the first entry of |x| within round-off of its maximum (deterministic ties)."""
    mag = np.abs(x)
    return int(np.flatnonzero(mag >= mag.max() * (1.0 - 1e-9))[0])


def _mode_groups(nodes: list[str], dims: dict[str, int],
                 blocks: list[tuple[str, str, np.ndarray]],
                 rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Mode groups {node: unit vector}: one vector per node a mode links (steps 1-3 above)."""
    start, sl = 0, {}
    for a in nodes:
        sl[a] = slice(start, start + dims[a])
        start += dims[a]
    size = start
    scale = max((float(np.linalg.norm(m)) for _, _, m in blocks), default=0.0)
    scale = scale if scale > 0 else 1.0
    K = np.zeros((size, size))
    for a, b, m in blocks:
        c = rng.uniform(0.5, 1.5) * rng.choice((-1.0, 1.0)) / scale
        K[sl[a], sl[b]] += c * m
        K[sl[b], sl[a]] += c * m.T
    for a in nodes:
        K[sl[a], sl[a]] += rng.uniform(-1.0, 1.0) * np.eye(dims[a])
    lam, phi = np.linalg.eigh(K)
    G1 = (phi * _smooth_random_function(rng, lam)) @ phi.T
    G2 = (phi * _smooth_random_function(rng, lam)) @ phi.T
    B = np.zeros((size, size))
    for a in nodes:
        B[sl[a], sl[a]] = rng.uniform(0.5, 1.5) * G1[sl[a], sl[a]] \
            + rng.uniform(0.5, 1.5) * np.eye(dims[a])
    pulled = G2 @ B @ G2
    H = {a: G1[sl[a], sl[a]] + pulled[sl[a], sl[a]] for a in nodes}
    H = {a: 0.5 * (h + h.T) for a, h in H.items()}

    free = {a: np.eye(dims[a]) for a in nodes}
    groups: list[dict[str, np.ndarray]] = []
    for a in nodes:
        X = free[a]
        if X.shape[1] == 0:
            continue
        h, E = np.linalg.eigh(X.T @ H[a] @ X)
        seeds = _axis_aligned(h, X @ E)
        new = [{a: seeds[:, k]} for k in range(seeds.shape[1])]
        free[a] = X[:, :0]
        for b in nodes:
            if b == a or free[b].shape[1] == 0:
                continue
            Y = G2[sl[b], sl[a]] @ seeds
            norms = np.linalg.norm(Y, axis=0)
            # strongest transports claim their directions at b first, so that a transport that
            # is tiny only because A1 holds approximately cannot take a direction a true link needs
            for k in np.argsort(-norms, kind="stable"):
                if free[b].shape[1] == 0 or norms[k] <= _LINK_TOL:
                    break
                y = free[b] @ (free[b].T @ Y[:, k])
                norm = float(np.linalg.norm(y))
                if norm > _LINK_TOL and norm >= 0.5 * norms[k]:
                    new[k][b] = y / norm
                    free[b] = _complement(free[b], new[k][b])
        groups.extend(new)
    return groups


def _assign_indices(groups: list[dict[str, np.ndarray]], dims: dict[str, int],
                    strength: list[tuple[float, float]]) -> list[tuple[dict[str, np.ndarray], int]]:
    """A mode index per group: distinct at each node and below each node's dimension.

    Tried in strength order, then tightest bound first; if both fail (A1 does not hold) a group
    keeps the index that fits most of its nodes and its other nodes become groups of their own.
    """
    top = max((max(s) for s in strength), default=0.0) or 1.0
    # strengths equal to round-off (degenerate modes) keep their order of discovery
    key = [(-round(s / top, 10), -round(d / top, 10)) for s, d in strength]
    by_strength = sorted(range(len(groups)), key=lambda g: (*key[g], g))
    by_bound = sorted(by_strength, key=lambda g: min(dims[a] for a in groups[g]))
    for order in (by_strength, by_bound):
        used: dict[str, set[int]] = {a: set() for a in dims}
        placed = []
        for g in order:
            bound = min(dims[a] for a in groups[g])
            k = 0
            while k < bound and any(k in used[a] for a in groups[g]):
                k += 1
            if k == bound:
                break
            placed.append((groups[g], k))
            for a in groups[g]:
                used[a].add(k)
        else:
            return placed
    used = {a: set() for a in dims}
    placed = []
    queue = [groups[g] for g in by_strength]
    while queue:
        group = queue.pop(0)
        top = max(dims[a] for a in group)
        fits = [[a for a in group if k < dims[a] and k not in used[a]] for k in range(top)]
        k = max(range(top), key=lambda k: (len(fits[k]), -k))
        placed.append(({a: group[a] for a in fits[k]}, k))
        for a in fits[k]:
            used[a].add(k)
        queue.extend({a: group[a]} for a in group if a not in fits[k])
    return placed


def _transformed(corr: PathCorrelations, bases: Mapping[str, np.ndarray]):
    """U_tᵀ Σyx(p) V_s for every path and V_{s(j)}ᵀ Σx(j, p) V_{s(p)} for every pair."""
    S = [bases[p.target].T @ corr.yx[i] @ bases[p.source] for i, p in enumerate(corr.paths)]
    D = {(j, i): bases[corr.paths[j].source].T @ m @ bases[corr.paths[i].source]
         for (j, i), m in corr.xx.items()}
    return S, D


def _offdiag_residual(mats: list[np.ndarray]) -> float:
    """max ‖offdiag(M)‖_F over the matrices, relative to their largest absolute entry."""
    largest = max((float(np.max(np.abs(m))) for m in mats if m.size), default=0.0)
    if largest == 0.0:
        return 0.0
    worst = 0.0
    for m in mats:
        off = m.copy()
        k = min(off.shape)
        off[np.arange(k), np.arange(k)] = 0.0
        worst = max(worst, float(np.linalg.norm(off)))
    return worst / largest


def _root(parent: dict[str, str], a: str) -> str:
    while parent[a] != a:
        a = parent[a]
    return a


def _fix_signs(nodes: list[str], corr: PathCorrelations, bases: dict[str, np.ndarray]) -> None:
    """Flip basis vectors in place so that, per mode, the strongest couplings are positive.

    Per mode α: a maximum spanning forest of the nodes α couples (weights |s| of Σyx(p), |d| of
    Σx(j, p) between different inputs) is walked from its first node, whose vector gets its first
    largest entry positive; each other node is flipped to make its tree coupling positive.
    """
    S, D = _transformed(corr, bases)
    pairs = [(p.source, p.target, S[i]) for i, p in enumerate(corr.paths)]
    pairs += [(corr.paths[j].source, corr.paths[i].source, m) for (j, i), m in D.items()
              if corr.paths[j].source != corr.paths[i].source]
    for alpha in range(max(bases[a].shape[1] for a in nodes)):
        here = [a for a in nodes if alpha < bases[a].shape[1]]
        links = sorted(((abs(m[alpha, alpha]), a, b, 1.0 if m[alpha, alpha] > 0 else -1.0)
                        for a, b, m in pairs if alpha < min(m.shape) and m[alpha, alpha] != 0.0),
                       key=lambda link: -link[0])
        parent = {a: a for a in here}
        tree: dict[str, list[tuple[str, float]]] = {a: [] for a in here}
        for _, a, b, sign in links:  # Kruskal: strongest couplings first
            ra, rb = _root(parent, a), _root(parent, b)
            if ra != rb:
                parent[rb] = ra
                tree[a].append((b, sign))
                tree[b].append((a, sign))
        flip: dict[str, float] = {}
        for start in here:
            if start in flip:
                continue
            v = bases[start][:, alpha]
            flip[start] = -1.0 if v[_first_largest(v)] < 0 else 1.0
            stack = [start]
            while stack:
                a = stack.pop()
                for b, sign in tree[a]:
                    if b not in flip:
                        flip[b] = flip[a] * sign
                        stack.append(b)
        for a in here:
            bases[a][:, alpha] *= flip[a]


def _find_bases(net: Network, corr: PathCorrelations, rng: np.random.Generator):
    """One attempt at the bases: ({node: orthogonal matrix}, residual)."""
    nodes = list(net.inputs) + list(net.outputs)
    dims = {a: net.dim(a) for a in nodes}
    groups = _mode_groups(nodes, dims, _coupling_blocks(net, corr), rng)

    strength = []
    for g in groups:
        s_max = max((abs(float(g[p.target] @ corr.yx[i] @ g[p.source]))
                     for i, p in enumerate(corr.paths) if p.source in g and p.target in g),
                    default=0.0)
        d_max = max((abs(float(g[corr.paths[j].source] @ m @ g[corr.paths[i].source]))
                     for (j, i), m in corr.xx.items()
                     if corr.paths[j].source in g and corr.paths[i].source in g), default=0.0)
        strength.append((s_max, d_max))
    bases = {a: np.zeros((dims[a], dims[a])) for a in nodes}
    for group, k in _assign_indices(groups, dims, strength):
        for a, v in group.items():
            bases[a][:, k] = v

    _fix_signs(nodes, corr, bases)
    S, D = _transformed(corr, bases)
    return bases, _offdiag_residual(S + list(D.values()))


# ---------------------------------------------------------------------------- the reduction
def _modes_per_node(net: Network) -> tuple[int, dict[str, int]]:
    """n_modes = max_p min(dim s(p), dim t(p)); for every hidden node, the modes its paths carry."""
    paths = net.paths()
    carried = [min(net.dim(p.source), net.dim(p.target)) for p in paths]
    through: dict[str, int] = {v: 0 for v in net.hidden}
    for p, m in zip(paths, carried):
        for e in p.edges[:-1]:
            v = net.edge(e).target
            through[v] = max(through[v], m)
    return max(carried), through


def reduce(net: Network, data: Dataset, tol: float = 1e-8, approximate: bool = False,
           seed: Seed = 0) -> Reduction:
    """The neural race reduction of ``net`` trained on ``data`` (MATH.md §3).

    Finds the shared bases (see the module docstring for the method), measures the relative
    off-diagonal residual, and builds the reduced system. Raises ReductionError (with the residual)
    when the residual exceeds ``tol``; with ``approximate=True`` the off-diagonal parts are dropped
    and the result records ``approximate=True`` and the residual. ``seed`` fixes the random
    combinations used to split degenerate singular values.
    """
    if not isinstance(net, Network):
        raise ConfigError(f"reduce: net must be a Network, got {type(net).__name__}")
    if not isinstance(data, Dataset):
        raise ConfigError(f"reduce: data must be a Dataset, got {type(data).__name__}")
    data.check(net)
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise ConfigError(f"reduce: tol must be a non-negative number, got {tol!r}") from None
    if not np.isfinite(tol) or tol < 0:
        raise ConfigError(f"reduce: tol must be a non-negative number, got {tol}")
    corr = path_correlations(net, data)
    rng = as_generator(seed)
    best_bases, best_residual = None, np.inf
    for _ in range(_ATTEMPTS):
        bases, residual = _find_bases(net, corr, rng)
        if best_bases is None or residual < best_residual:
            best_bases, best_residual = bases, residual
        if best_residual <= tol:
            break
    if best_residual > tol and not approximate:
        raise ReductionError(
            f"reduce: the path correlations are not diagonal in shared bases (assumption A1): "
            f"relative off-diagonal residual {best_residual:.3g} > tol = {tol:.3g}. Pass "
            f"approximate=True to keep the diagonal parts anyway, or raise tol.", best_residual)

    n_modes, _ = _modes_per_node(net)
    S, D = _transformed(corr, best_bases)
    paths = corr.paths
    n_paths = len(paths)
    s = np.zeros((n_modes, n_paths))
    for i, m in enumerate(S):
        k = min(n_modes, *m.shape)
        s[:k, i] = np.diagonal(m)[:k]
    edge_index = {e: i for i, e in enumerate(net.edges)}
    target_ptr = np.zeros(n_paths + 1, dtype=np.int64)
    target_ptr[1:] = np.cumsum([len(t) for t in corr.targets])
    target_paths = np.array([j for t in corr.targets for j in t], dtype=np.int64)
    d = np.zeros((n_modes, target_paths.size))
    k_pos = 0
    for i in range(n_paths):
        for j in corr.targets[i]:
            m = D[(j, i)]
            k = min(n_modes, *m.shape)
            d[:k, k_pos] = np.diagonal(m)[:k]
            k_pos += 1
    node_index = {v: i for i, v in enumerate(net.nodes)}
    path_edges = [[edge_index[e] for e in p.edges] for p in paths]
    path_ptr = np.zeros(n_paths + 1, dtype=np.int64)
    path_ptr[1:] = np.cumsum([len(p) for p in path_edges])
    system = RaceSystem(
        n_edges=len(net.edges), path_ptr=path_ptr,
        path_edges=np.array([e for p in path_edges for e in p], dtype=np.int64),
        target_ptr=target_ptr, target_paths=target_paths, s=s, d=d, rate=None,
        edge_names=net.edges,
        edge_source=np.array([node_index[net.edge(e).source] for e in net.edges]),
        edge_target=np.array([node_index[net.edge(e).target] for e in net.edges]))
    constant = 0.5 * float(np.sum(gated_moments(net, data).yy))
    return Reduction(network=net, bases=best_bases, system=system, residual=float(best_residual),
                     approximate=bool(best_residual > tol), n_modes=n_modes,
                     loss_constant=constant)


def _real_weights(name: str, value) -> np.ndarray:
    """``value`` as a float64 array of real numbers, or a WeightsError naming ``name`` (complex
    values would lose their imaginary part)."""
    try:
        return real_array(value)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{name}: not a float array: {exc}") from None


class Reduction:
    """The result of :func:`reduce`: bases, reduced system, and maps to and from full weights.

    Attributes
    ----------
    network : the reduced Network.
    bases : {node: (dim, dim) orthogonal matrix}; ``V_u`` at inputs, ``U_w`` at outputs, column α
        is mode α.
    system : the RaceSystem (one edge per network edge in ``network.edges`` order, one path per
        ``network.paths()`` path, rate 1, per-mode s and d).
    residual : relative off-diagonal residual of the path correlations in the bases.
    approximate : True when the residual exceeded ``tol`` and the off-diagonals were dropped.
    n_modes : number of modes (``max_p min(dim s(p), dim t(p))``).
    loss_constant : ``½ Σ_n w_n Σ_out |y_n|²``; full loss = Σ_α mode loss + loss_constant.
    mode_mask : (n_modes, n_edges) bool, True where edge e can carry mode α
        (α < min(dim source, dim target)); elsewhere b is held at 0.
    hidden_bases : {hidden node: (dim, dim) orthogonal}, the R_v of A2; set by
        :meth:`aligned_init` (drawn with seed 0 on first use otherwise).
    """

    def __init__(self, network: Network, bases: dict[str, np.ndarray], system: RaceSystem,
                 residual: float, approximate: bool, n_modes: int, loss_constant: float) -> None:
        self.network = network
        self.bases = bases
        self.system = system
        self.residual = residual
        self.approximate = approximate
        self.n_modes = n_modes
        self.loss_constant = loss_constant
        carry = np.array([min(network.weight_shape(e)) for e in network.edges])
        self.mode_mask = np.arange(n_modes)[:, None] < carry[None, :]
        self._hidden_bases: dict[str, np.ndarray] | None = None

    def __repr__(self) -> str:
        return (f"Reduction(n_modes={self.n_modes}, n_edges={self.system.n_edges}, "
                f"n_paths={self.system.n_paths}, residual={self.residual:.3g}, "
                f"approximate={self.approximate})")

    # ------------------------------------------------------------------ bases
    def _check_widths(self) -> None:
        _, through = _modes_per_node(self.network)
        for v, m in through.items():
            if self.network.dim(v) < m:
                raise NetworkError(
                    f"hidden node {v!r} has {self.network.dim(v)} units but its paths carry {m} "
                    f"modes; assumption A2 needs hidden widths of at least {m} (widen the node)")

    @property
    def hidden_bases(self) -> dict[str, np.ndarray]:
        """{hidden node: (dim, dim) orthogonal R_v} used by reconstruct and project."""
        if self._hidden_bases is None:
            self._hidden_bases = self._draw_hidden_bases(0)
        return self._hidden_bases

    def _draw_hidden_bases(self, seed: Seed) -> dict[str, np.ndarray]:
        rng = as_generator(seed)
        return {v: random_orthogonal(self.network.dim(v), self.network.dim(v), rng)
                for v in self.network.hidden}

    def _node_bases(self) -> dict[str, np.ndarray]:
        return {**self.bases, **self.hidden_bases}

    def expand_b(self, b0) -> np.ndarray:
        """Mode strengths (n_modes, n_edges) from a scalar, a per-edge (n_edges,) array or a
        (n_modes, n_edges) array; entries outside ``mode_mask`` are set to 0."""
        arr = _real_weights("b0", b0)
        shape = (self.n_modes, self.system.n_edges)
        if arr.ndim == 0 or arr.shape == (shape[1],):
            arr = np.broadcast_to(arr, shape)
        if arr.shape != shape:
            raise WeightsError(f"b0 must be a scalar, ({shape[1]},) per edge or {shape} per mode "
                               f"and edge, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise WeightsError("b0 contains NaN or inf")
        return np.where(self.mode_mask, arr, 0.0)

    # ------------------------------------------------------------------ full <-> reduced
    def aligned_init(self, b0, seed: Seed = 0,
                     hidden_bases: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Full weights satisfying A2: ``W_e = R_t B_e R_sᵀ`` with ``B_e`` rectangular-diagonal.

        ``b0``: scalar, per edge (n_edges,) or per mode and edge (n_modes, n_edges). ``R`` is V/U at
        inputs/outputs and a seeded random orthogonal matrix at hidden nodes, or ``hidden_bases``
        ({hidden node: (dim, dim) orthogonal}). The hidden bases used are kept for
        :meth:`project` and :meth:`reconstruct`. Returns {edge: (dim target, dim source)}.
        """
        self._check_widths()
        if hidden_bases is None:
            chosen = self._draw_hidden_bases(seed)
        else:
            chosen = {}
            for v in self.network.hidden:
                if v not in hidden_bases:
                    raise WeightsError(f"hidden_bases: missing hidden node {v!r}")
                R = _real_weights(f"hidden_bases[{v!r}]", hidden_bases[v])
                n = self.network.dim(v)
                if R.shape != (n, n) or not np.allclose(R.T @ R, np.eye(n), atol=1e-10):
                    raise WeightsError(f"hidden_bases[{v!r}] must be a ({n}, {n}) orthogonal "
                                       f"matrix")
                chosen[v] = R.copy()
            extra = set(hidden_bases) - set(self.network.hidden)
            if extra:
                raise WeightsError(f"hidden_bases: {sorted(extra)} are not hidden nodes")
        b = self.expand_b(b0)
        self._hidden_bases = chosen
        return self.reconstruct(b)

    def reconstruct(self, b) -> dict[str, np.ndarray]:
        """Full weights from mode strengths: b (n_modes, n_edges) -> {edge: (dim t, dim s)};
        time-first b (n_t, n_modes, n_edges) -> {edge: (n_t, dim t, dim s)}."""
        arr = _real_weights("b", b)
        shape = (self.n_modes, self.system.n_edges)
        if arr.ndim not in (2, 3) or arr.shape[-2:] != shape:
            raise WeightsError(f"b must have shape {shape} or (n_t, *{shape}), got {arr.shape}")
        R = self._node_bases()
        out = {}
        for i, e in enumerate(self.network.edges):
            edge = self.network.edge(e)
            Rt, Rs = R[edge.target], R[edge.source]
            k = int(self.mode_mask[:, i].sum())
            if arr.ndim == 2:
                out[e] = (Rt[:, :k] * arr[:k, i]) @ Rs[:, :k].T
            else:
                out[e] = np.einsum("ik,tk,jk->tij", Rt[:, :k], arr[:, :k, i], Rs[:, :k])
        return out

    def project(self, weights: Mapping[str, object], return_residual: bool = False):
        """Mode strengths b (n_modes, n_edges): the diagonal of ``R_tᵀ W_e R_s``.

        With ``return_residual`` also the alignment residual: max over edges of the Frobenius
        norm of everything ``b`` does not hold (off-diagonal entries, and diagonal entries beyond
        the modes), relative to the largest absolute entry of all ``R_tᵀ W_e R_s``; ~0 when the
        weights satisfy A2 in these bases.
        """
        W = check_weights(self.network, weights)
        R = self._node_bases()
        b = np.zeros((self.n_modes, self.system.n_edges))
        worst, largest = 0.0, 0.0
        for i, e in enumerate(self.network.edges):
            edge = self.network.edge(e)
            M = R[edge.target].T @ W[e] @ R[edge.source]
            k = int(self.mode_mask[:, i].sum())
            b[:k, i] = M[np.arange(k), np.arange(k)]
            rest = M.copy()
            rest[np.arange(k), np.arange(k)] = 0.0
            worst = max(worst, float(np.linalg.norm(rest)))
            largest = max(largest, float(np.max(np.abs(M))) if M.size else 0.0)
        if return_residual:
            return b, (worst / largest if largest > 0 else 0.0)
        return b

    # ------------------------------------------------------------------ losses
    def mode_loss(self, b) -> np.ndarray:
        """Loss of each mode without the constant: (..., n_modes) for b (..., n_modes, n_edges).

        Entries outside ``mode_mask`` are ignored (taken as 0), as in :meth:`reconstruct`.
        """
        arr = _real_weights("b", b)
        if arr.ndim < 2 or arr.shape[-2:] != self.mode_mask.shape:
            raise WeightsError(f"b must have shape (..., {self.n_modes}, {self.system.n_edges}), "
                               f"got {arr.shape}")
        return self.system.loss(np.where(self.mode_mask, arr, 0.0))

    def loss(self, b) -> float | np.ndarray:
        """Full-network loss from mode strengths: Σ_α mode loss + ``loss_constant``;
        a float for b (n_modes, n_edges), (n_t,) for time-first b."""
        total = self.mode_loss(b).sum(axis=-1) + self.loss_constant
        return float(total) if np.ndim(total) == 0 else total

    # ------------------------------------------------------------------ dynamics
    def integrate(self, b0, method: str = "auto", t_end: float | None = None,
                  save_at=None, lr: float | None = None, steps: int | None = None,
                  out=None, run_name: str = "theory", **options) -> ReducedSolution:
        """Integrate the reduced system from ``b0`` (scalar, (n_edges,) or (n_modes, n_edges)).

        ``method``: "dopri5" or "rosenbrock" (gradient flow, τ = 1, up to ``t_end``) or "gd" (the
        Euler map with learning rate ``lr`` for ``steps`` steps, t = k·lr; it reproduces full-network
        gradient descent from :meth:`aligned_init` exactly). Other options (rtol, atol, events,
        backend, threads, ...) go to :func:`fastrace.integrate.integrate_system`. With ``out`` (a
        path), the trajectory is written to that HDF5 file as run ``run_name`` (t, loss,
        mode_loss, modes/b, modes/pi and, with events, the first crossing times).
        """
        from .integrate import integrate_system

        if out is not None:
            from . import store

            store.check_writable(out)  # fail before any compute
        b = self.expand_b(b0)
        solution = integrate_system(self.system, b, method=method, t_end=t_end,
                                    save_at=save_at, lr=lr, steps=steps, **options)
        result = ReducedSolution(self, solution)
        if out is not None:
            result.to_hdf5(out, run_name)
        return result


@dataclass(frozen=True)
class ReducedSolution:
    """A reduced trajectory in full-network terms.

    ``t`` (n_saved,), ``b`` (n_saved, n_modes, n_edges), ``loss`` (n_saved,) full-network loss,
    ``mode_loss`` (n_saved, n_modes), ``weights(i)`` the reconstructed full weights at saved index
    i; ``solution`` is the underlying RaceSolution (status, events, step counts, ...).
    """

    reduction: Reduction
    solution: RaceSolution

    @property
    def t(self) -> np.ndarray:
        return self.solution.t

    @property
    def b(self) -> np.ndarray:
        return self.solution.b

    @property
    def status(self) -> np.ndarray:
        return self.solution.status

    @property
    def n_steps(self) -> np.ndarray:
        return self.solution.n_steps

    @property
    def events(self) -> np.ndarray | None:
        return self.solution.events

    @property
    def path_strengths(self) -> np.ndarray:
        return self.reduction.system.path_strengths(self.b)

    def to_hdf5(self, path, run: str = "theory") -> None:
        """Write this trajectory to a fastrace HDF5 file (replaced if it exists) as ``run``."""
        from . import store

        series = {"t": np.asarray(self.t, dtype=np.float64),
                  "loss": np.asarray(self.loss, dtype=np.float64),
                  "mode_loss": np.asarray(self.mode_loss, dtype=np.float64),
                  "modes/b": np.ascontiguousarray(self.b, dtype=np.float64),
                  "modes/pi": np.ascontiguousarray(self.path_strengths, dtype=np.float64)}
        if self.events is not None:
            series["events"] = np.asarray(self.events, dtype=np.float64)[None]
        attrs = {"kind": "theory", "method": self.solution.method,
                 "residual": float(self.reduction.residual),
                 "approximate": bool(self.reduction.approximate),
                 "edges": json.dumps(list(self.reduction.system.edge_names))}
        spec = store.RunSpec(series={k: (v.shape[1:], v.dtype) for k, v in series.items()},
                             attrs=attrs)
        with store.TrajectoryWriter(path, {run: spec},
                                    network_json=self.reduction.network.to_json()) as writer:
            writer.append(run, series)
            writer.set_steps_done(run, int(self.t.size))
            if not self.solution.ok:
                writer.set_status(run, "failed: " + "; ".join(self.solution.failures()[:3]))

    @property
    def mode_loss(self) -> np.ndarray:
        """(n_saved, n_modes), with the s values the integration used."""
        return self.reduction.system.loss(self.b, s=self.solution.s)

    @property
    def loss(self) -> np.ndarray:
        """(n_saved,) full-network loss: Σ_α mode loss + the reduction's loss constant."""
        return self.mode_loss.sum(axis=-1) + self.reduction.loss_constant

    def weights(self, i: int) -> dict[str, np.ndarray]:
        """Full weights {edge: (dim t, dim s)} reconstructed at saved index ``i``.

        For a batch over parameter sets (b of shape (n_saved, n_sets, n_modes, n_edges)) each
        array gets a leading set axis: (n_sets, dim t, dim s).
        """
        return self.reduction.reconstruct(self.b[i])
