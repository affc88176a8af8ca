"""Gradient engines for full-network learning: weights packed flat, many runs at once.

A ``GradientEngine`` binds a network and a data set and evaluates the loss and gradient of one
or many weight vectors, and performs gradient-descent steps, as fast as the machine allows.
Weights of all edges are packed into one float64 vector (``pack`` / ``unpack``) in the network's
edge order, each edge's matrix row-major; a batch of runs is an array (n_runs, n_params).
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np

from .data import Dataset
from .errors import WeightsError
from .gradient import (_loss_gradient_samples, _samples_of_edges, _Workspace, check_edge_names,
                       check_weights, choose_engine, weight_array)
from .network import Network
from .stats import SampleFits, gated_moments, reference_maps

#: below this much work per call (runs × steps × flops per step) the runs go serially
PARALLEL_MIN_FLOPS = 2e7
#: the samples engine shares its work between threads only for runs of at least this much
#: work per evaluation (samples × parameters): below it, its many small numpy calls spend
#: more on the GIL than the threads gain (2 routing runs: 918 against 602 ms)
SAMPLES_THREADS_MIN_WORK = 2e7
#: the samples engine cuts a run's samples into at most this many blocks of at least
#: SAMPLES_BLOCK_MIN_WORK work and SAMPLES_BLOCK_MIN_ROWS samples each: the cut depends on
#: the problem only, never on the thread count, and the blocks' losses and gradients are
#: added in block order, so every thread count gives the same bits
SAMPLES_MAX_BLOCKS = 8
SAMPLES_BLOCK_MIN_WORK = 5e7  # (each block pays a fixed cost: its gradient, added in order)
SAMPLES_BLOCK_MIN_ROWS = 64
# operand sources of a plan (see _kernels/plan.py)
_STATE, _CONST, _WEIGHTS = 0, 1, 2
_AXPBY, _DOT, _OUTPUT = 4, 5, 6  # opcodes 0-3 are products: 2·(A transposed) + (B transposed)
#: output blocks with at most this many input columns are done by one fused loop (OUTPUT)
#: instead of a copy, a BLAS product and two dots, whose call overheads dominate when small
_FUSED_OUTPUT_MAX = 8


class _Mat(NamedTuple):
    """A matrix operand: where it lives (source, offset, row-major leading dimension) and
    whether that memory holds the matrix itself or its transpose (``t``)."""

    src: int
    off: int
    ld: int
    t: bool = False

    def flip(self) -> _Mat:
        """The same memory read as the transposed matrix."""
        return self._replace(t=not self.t)


def _product_blocks(row: list[int]) -> tuple[tuple, tuple, tuple]:
    """The blocks a product row reads (A, B) and writes (C): (source, offset, ld, rows, cols),
    as stored."""
    code, m, n, k = row[0], row[1], row[2], row[3]
    a = (row[4], row[5], row[6]) + ((k, m) if code >> 1 else (m, k))
    b = (row[7], row[8], row[9]) + ((n, k) if code & 1 else (k, n))
    return a, b, (row[10], row[11], row[12], m, n)


def _copy_blocks(row: list[int]) -> tuple[list, list]:
    """The blocks a (batched) AXPBY row reads (A) and writes (C): (source, offset, ld, rows,
    cols) per block."""
    m, n, t, count, a_step, c_step = row[1], row[2], row[3], row[14], row[15], row[16]
    rows, cols = (n, m) if t else (m, n)
    reads = [(row[4], row[5] + b * a_step, row[6], rows, cols) for b in range(count)]
    writes = [(row[10], row[11] + b * c_step, row[12], m, n) for b in range(count)]
    return reads, writes


def _blocks_overlap(x: tuple, y: tuple) -> bool:
    """Whether two (source, offset, ld, rows, cols) blocks share memory: exactly for blocks of
    one leading dimension that stay within their rows, else by their address ranges."""
    (sx, ox, lx, rx, cx), (sy, oy, ly, ry, cy) = x, y
    if sx != sy:
        return False
    if lx == ly and ox % lx + cx <= lx and oy % ly + cy <= ly:
        (ix, jx), (iy, jy) = divmod(ox, lx), divmod(oy, ly)
        return ix < iy + ry and iy < ix + rx and jx < jy + cy and jy < jx + cx
    return ox < oy + (ry - 1) * ly + cy and oy < ox + (rx - 1) * lx + cx


class _Ops:
    """Builds a plan: rows of (opcode, m, n, k, a_src, a_off, a_ld, b_src, b_off, b_ld, c_src,
    c_off, c_ld, scale_by_lr, count, a_step, c_step) and (alpha, beta); consecutive products
    that continue each other are merged into one, and consecutive copies of equal blocks at
    equal spacing into one batched copy."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.coef: list[list[float]] = []
        self.sealed = 0  # rows before this one take no further operation by merging

    def _open(self) -> bool:
        """Whether the last row may absorb the next operation."""
        return len(self.rows) > self.sealed

    def gemm(self, m: int, n: int, k: int, A: _Mat, B: _Mat, C: _Mat, alpha: float,
             beta: float = 1.0, scale_by_lr: int = 0) -> None:
        """C (m, n) = beta C + alpha A (m, k) B (k, n), for operands stored either way."""
        if C.t:  # the memory of C holds Cᵀ = Bᵀ Aᵀ
            m, n, A, B, C = n, m, B.flip(), A.flip(), C.flip()
        row = [2 * A.t + B.t, m, n, k, A.src, A.off, A.ld, B.src, B.off, B.ld, C.src, C.off,
               C.ld, scale_by_lr, 1, 0, 0]
        if not (self._open() and self._merge(row, alpha, beta)):
            self.rows.append(row)
            self.coef.append([alpha, beta])

    def _merge(self, row: list[int], alpha: float, beta: float) -> bool:
        last, (last_alpha, last_beta) = self.rows[-1], self.coef[-1]
        if last[0] != row[0] or row[0] > 3 or last_alpha != alpha \
                or any(last[i] != row[i] for i in (4, 6, 7, 9, 10, 12, 13)):
            return False
        # merged, the two run as one product: neither may read what the other writes
        (a0, b0, c0), (a1, b1, c1) = _product_blocks(last), _product_blocks(row)
        if any(_blocks_overlap(c, x) for c, x in ((c0, a1), (c0, b1), (c1, a0), (c1, b0))):
            return False
        ta, tb = row[0] >> 1, row[0] & 1
        m, n, k = last[1], last[2], last[3]
        a_next = last[5] + (m if ta else m * last[6])    # A's rows after the last op's
        a_deep = last[5] + (k * last[6] if ta else k)    # A's columns after the last op's
        b_next = last[8] + (n * last[9] if tb else n)    # B's columns after the last op's
        b_deep = last[8] + (k if tb else k * last[9])    # B's rows after the last op's
        if beta == last_beta and row[1] == m and row[3] == k and row[5] == last[5] \
                and row[8] == b_next and row[11] == last[11] + n:
            last[2] += row[2]  # more columns of B and C
            return True
        if beta == last_beta and row[2] == n and row[3] == k and row[8] == last[8] \
                and row[5] == a_next and row[11] == last[11] + m * last[12]:
            last[1] += row[1]  # more rows of A and C
            return True
        if beta == 1.0 and row[1] == m and row[2] == n and row[11] == last[11] \
                and row[5] == a_deep and row[8] == b_deep:
            last[3] += row[3]  # the same C, summed over more columns of A and rows of B
            return True
        return False

    def axpby(self, m: int, n: int, A: _Mat, C: _Mat, alpha: float, beta: float,
              scale_by_lr: int = 0) -> None:
        """C (m, n) = beta C + alpha A (m, n)."""
        if C.t:
            m, n, A, C = n, m, A.flip(), C.flip()
        row = [_AXPBY, m, n, int(A.t), A.src, A.off, A.ld, 0, 0, 0, C.src, C.off, C.ld,
               scale_by_lr, 1, 0, 0]
        if not (self._open() and self._batch(row, alpha, beta)):
            self.rows.append(row)
            self.coef.append([alpha, beta])

    def _batch(self, row: list[int], alpha: float, beta: float) -> bool:
        """Append the copy ``row`` to the last one as its next block, if it is one."""
        last = self.rows[-1]
        if last[0] != _AXPBY or self.coef[-1] != [alpha, beta] \
                or any(last[i] != row[i] for i in (1, 2, 3, 4, 6, 10, 12, 13)):
            return False
        count = last[14]
        a_step = last[15] if count > 1 else row[5] - last[5]
        c_step = last[16] if count > 1 else row[11] - last[11]
        if row[5] != last[5] + count * a_step or row[11] != last[11] + count * c_step:
            return False
        merged = last[:14] + [count + 1, a_step, c_step]
        reads, writes = _copy_blocks(merged)
        # the blocks run as one: no block may read what another writes, nor two blocks write
        # the same memory (the blocks already batched were checked against each other)
        if _blocks_overlap(writes[-1], reads[-1]) \
                or any(_blocks_overlap(writes[-1], x) or _blocks_overlap(reads[-1], y)
                       or _blocks_overlap(writes[-1], y) for x, y in zip(reads, writes[:-1])):
            return False
        self.rows[-1] = merged
        return True

    def dot(self, m: int, n: int, A: _Mat, B: _Mat, alpha: float) -> None:
        """Adds alpha <A, B> (both (m, n)) to the loss."""
        if A.t != B.t:
            raise AssertionError("dot of operands stored in different orientations")
        if A.t:
            m, n = n, m
        self.rows.append([_DOT, m, n, 0, A.src, A.off, A.ld, B.src, B.off, B.ld, 0, 0, 0, 0,
                          1, 0, 0])
        self.coef.append([alpha, 0.0])

    def output(self, m: int, n: int, T: _Mat, Y: _Mat, XX: _Mat, E: _Mat) -> None:
        """E (m, n) = Y − T XX (XX (n, n)), and the loss gains ½ <E, B − T> − ½ <E_B, T>, in
        one loop; Y and XX are constants with leading dimension n, and B and E_B (m, n) are
        stored right after Y (see ``MomentsPlan``)."""
        if T.t or E.t or Y.ld != n or XX.ld != n or Y.src != _CONST or XX.src != _CONST:
            raise AssertionError("output block operands must be row-major, constants with ld n")
        self.rows.append([_OUTPUT, m, n, Y.off, T.src, T.off, T.ld, XX.src, XX.off, XX.ld,
                          E.src, E.off, E.ld, 0, 1, 0, 0])
        self.coef.append([0.5, 0.0])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from ._kernels.plan import n_blocks

        ints = np.array(self.rows, dtype=np.int64).reshape(-1, 17)
        for i in np.flatnonzero(ints[:, 0] <= 3):  # products: the blocks each is computed in
            ints[i, 14] = n_blocks(int(ints[i, 1]), int(ints[i, 2]), int(ints[i, 3]))
        return ints, np.array(self.coef, dtype=np.float64).reshape(-1, 2)


def _flops(ops_i: np.ndarray) -> float:
    gemm = ops_i[:, 0] <= 3
    return float(2 * np.sum(ops_i[gemm, 1] * ops_i[gemm, 2] * ops_i[gemm, 3]))


class _OutputGroup:
    """The contexts of one output that share its upstream gates: their moments summed (yx, xx)
    over input columns ``idx``, and the reference map of the loss (best = B, miss = E_B)."""

    def __init__(self, k: int, members: np.ndarray, idx: np.ndarray, yx: np.ndarray,
                 xx: np.ndarray) -> None:
        self.k, self.members, self.idx, self.yx, self.xx = k, members, idx, yx, xx
        self.best = self.miss = np.empty(0)


class MomentsPlan:
    """The moments engine compiled into flat operation tables (see ``_kernels/plan.py``).

    Contexts are grouped per node by the gates upstream of that node: a node's transfer matrix
    from the inputs is the same for every context of a group, so it is computed once per group
    (the shared hidden layer of the routing network is propagated once per input domain, not
    once per trained pair). Only inputs that reach the node through open gates get columns, and
    a group that every gate switches off gets none: gated-off blocks cost nothing.

    Per node v with width columns (groups × their inputs): T_v (dim v, width), the transfer
    matrices from the inputs, and G_v (dim v, width), the loss gradient with respect to T_v.
    G of a hidden node is stored transposed, (width, dim v), so that the backward product
    G_s = W_eᵀ G_v reads W_e in the order BLAS runs fastest (it was the slowest of the three
    products of a wide layer stored the other way).
    """

    def __init__(self, net: Network, data: Dataset, offsets: dict[str, int]) -> None:
        m = gated_moments(net, data)
        ctx = m.contexts
        node_col = {v: i for i, v in enumerate(net.nodes)}
        edge_col = {e: i for i, e in enumerate(net.edges)}
        inputs = net.inputs
        outputs = set(net.outputs)
        order = net.order
        ancestors: dict[str, set[str]] = {}
        for v in order:
            anc = {v}
            for e in net.in_edges(v):
                anc |= ancestors[net.edge(e).source]
            ancestors[v] = anc
        # groups of contexts per node, by the gates upstream of (and at) the node
        group_of: dict[str, np.ndarray] = {}
        rep: dict[str, np.ndarray] = {}
        for v in order:
            nodes = sorted(node_col[a] for a in ancestors[v])
            edges = sorted(edge_col[e] for a in ancestors[v] for e in net.in_edges(a))
            sig = np.concatenate([ctx.node_gates[:, nodes], ctx.edge_gates[:, edges]], axis=1)
            _, first, inverse = np.unique(sig, axis=0, return_index=True, return_inverse=True)
            group_of[v] = inverse.reshape(-1)
            rep[v] = first
        # live groups, their input columns and their layout in the node's matrices
        cols: dict[str, dict[int, tuple[str, ...]]] = {}
        for v in order:
            cols[v] = {}
            for k, c in enumerate(rep[v]):
                gv = ctx.node_gates[c, node_col[v]]
                if v in inputs:
                    if gv != 0.0:
                        cols[v][k] = (v,)
                    continue
                live: set[str] = set()
                for e in net.in_edges(v):
                    s = net.edge(e).source
                    if ctx.edge_gates[c, edge_col[e]] * gv != 0.0:
                        live |= set(cols[s].get(int(group_of[s][c]), ()))
                if live:
                    cols[v][k] = tuple(u for u in inputs if u in live)
        self.n_params = sum(int(np.prod(net.weight_shape(e))) for e in net.edges)
        n_params = self.n_params
        g_off = 0  # the gradient (plans that do not fuse the update write it here)
        cursor = n_params
        width, start, pos, T_off, G_off = {}, {}, {}, {}, {}
        for v in order:
            if v in inputs:
                continue
            # order groups as their sources are ordered, so neighbouring products merge
            src_key = {k: tuple(int(group_of[net.edge(e).source][rep[v][k]])
                                for e in net.in_edges(v)) for k in cols[v]}
            start[v], pos[v] = {}, {}
            col = 0
            for k in sorted(cols[v], key=lambda k: (src_key[k], k)):
                start[v][k] = col
                inner = 0
                pos[v][k] = {}
                for u in cols[v][k]:
                    pos[v][k][u] = inner
                    inner += net.dim(u)
                col += inner
            width[v] = col
            T_off[v] = cursor
            cursor += net.dim(v) * col
            G_off[v] = cursor
            cursor += net.dim(v) * col
        self.state_size = max(cursor, 1)
        # blocks are overwritten (beta = 0) by their first write in every evaluation, and blocks
        # no operation writes stay zero from the state's allocation: nothing is zeroed per step
        self.layout = np.array([n_params, g_off, 0, 0], dtype=np.int64)
        g_transposed = {v: v not in outputs for v in G_off}

        def t_cols(v: str, col: int) -> _Mat:
            """T_v from column ``col`` on."""
            return _Mat(_STATE, T_off[v] + col, width[v])

        def g_cols(v: str, col: int) -> _Mat:
            """G_v from column ``col`` on."""
            if g_transposed[v]:
                return _Mat(_STATE, G_off[v] + col * net.dim(v), net.dim(v), True)
            return _Mat(_STATE, G_off[v] + col, width[v])

        def weight(e: str) -> _Mat:
            return _Mat(_WEIGHTS, offsets[e], net.dim(net.edge(e).source))

        ops = _Ops()
        written: set = set()

        def first(key) -> float:
            """beta for a write to block ``key``: 0 (overwrite) the first time, then 1."""
            if key in written:
                return 1.0
            written.add(key)
            return 0.0

        const: list[np.ndarray] = []
        const_len = 0

        def constant(arr: np.ndarray) -> _Mat:
            nonlocal const_len
            const.append(np.ascontiguousarray(arr, dtype=np.float64).ravel())
            const_len += arr.size
            return _Mat(_CONST, const_len - arr.size, arr.shape[1])

        def targets(yx: np.ndarray, best: np.ndarray, miss: np.ndarray) -> tuple[_Mat, _Mat, _Mat]:
            """Σyx, the reference map B and E_B = Σyx − B Σxx (same shapes), stored one after
            the other (the OUTPUT opcode reads B and E_B after Σyx)."""
            return constant(yx), constant(best), constant(miss)

        def gate(v, e, c):
            return float(ctx.edge_gates[c, edge_col[e]] * ctx.node_gates[c, node_col[v]])

        def links(v):
            """(edge, source, v-group, source group, a) for every open edge into a live group."""
            for e in net.in_edges(v):
                s = net.edge(e).source
                for k in sorted(cols[v], key=lambda k: start[v][k]):
                    c = rep[v][k]
                    ks = int(group_of[s][c])
                    a = gate(v, e, c)
                    if a != 0.0 and ks in cols[s]:
                        yield e, s, k, ks, a, c

        # forward: transfer matrices T_v (dim v, width v), one column block per live group
        for v in order:
            if v in inputs:
                continue
            dv = net.dim(v)
            for e, s, k, ks, a, c in links(v):
                if s in inputs:
                    gu = float(ctx.node_gates[c, node_col[s]])
                    ops.axpby(dv, net.dim(s), weight(e), t_cols(v, start[v][k] + pos[v][k][s]),
                              a * gu, first(("T", v, k, s)))
                    continue
                for u in cols[s][ks]:
                    ops.gemm(dv, net.dim(u), net.dim(s), weight(e),
                             t_cols(s, start[s][ks] + pos[s][ks][u]),
                             t_cols(v, start[v][k] + pos[v][k][u]), a, first(("T", v, k, u)))
        # outputs: E = Σyx − T Σxx per group (moments summed over the group's contexts). For any
        # fixed map B of a group, its loss is L(T) = L(B) + ½ <E + E_B, B − T> with E_B = Σyx −
        # B Σxx (the loss is quadratic in T). B is the group's least-squares fit where its Σxx
        # is well conditioned, else 0 (``stats.reference_maps``), and L(B) is summed over
        # the samples once
        # (``stats.SampleFits``): the loss then keeps its digits near a fit, where the moments'
        # own form ½ tr Σyy − <T, Σyx> + ½ <T, T Σxx> loses all below eps · ½ tr Σyy (it gave
        # ~1e-16 where the loss was ~1e-32, or negative values)
        fits = SampleFits(net, data)
        loss_const = 0.0
        for w in net.outputs:
            dw = net.dim(w)
            rows = m.output_slices[w]
            groups = []
            for k in sorted(cols[w], key=lambda k: start[w][k]):
                members = np.flatnonzero(group_of[w] == k)
                idx = np.concatenate([np.arange(m.input_slices[u].start, m.input_slices[u].stop)
                                      for u in cols[w][k]])
                groups.append(_OutputGroup(k, members, idx,
                                           m.yx[members][:, rows][:, :, idx].sum(axis=0),
                                           m.xx[members][:, idx][:, :, idx].sum(axis=0)))
            for n in {g.xx.shape[0] for g in groups}:  # the maps: batched per size
                same = [g for g in groups if g.xx.shape[0] == n]
                maps = reference_maps(np.stack([g.yx for g in same]),
                                      np.stack([g.xx for g in same]))
                for g, best, miss in zip(same, *maps):
                    g.best, g.miss = best, miss
                    # L(B) over the samples, and ½ <E_B, B>: the constant part of ½ <E_B, B − T>
                    loss_const += fits.loss(g.members, w, g.idx, g.best) \
                        + 0.5 * float(np.sum(g.miss * g.best))
            # samples of contexts no open path reaches: the output is 0 there
            loss_const += fits.loss(np.flatnonzero(~np.isin(group_of[w], list(cols[w]))), w)
            if not groups:
                continue
            n0, xx0 = groups[0].xx.shape[0], groups[0].xx
            if all(g.xx.shape[0] == n0 and np.array_equal(g.xx, xx0) for g in groups):
                # every group has the same input moments: the (dw, G·n) row-major block matrix
                # read as (dw·G, n) holds one group row per row, so one product does them all
                yx, best, miss = targets(*(np.concatenate(arrays, axis=1).reshape(-1, n0)
                                           for arrays in zip(*((g.yx, g.best, g.miss)
                                                               for g in groups))))
                pieces = [(dw * len(groups), n0, _Mat(_STATE, T_off[w], n0),
                           _Mat(_STATE, G_off[w], n0), yx, best, miss, constant(xx0))]
            else:
                pieces = [(dw, g.xx.shape[0], t_cols(w, start[w][g.k]),
                           g_cols(w, start[w][g.k]), *targets(g.yx, g.best, g.miss),
                           constant(g.xx)) for g in groups]
            for rows_, n, T, E, yx, best, miss, xx in pieces:
                if n <= _FUSED_OUTPUT_MAX:
                    ops.output(rows_, n, T, yx, xx, E)
                    continue
                ops.axpby(rows_, n, yx, E, 1.0, 0.0)
                ops.gemm(rows_, n, n, T, xx, E, -1.0)
                ops.dot(rows_, n, E, best, 0.5)
                ops.dot(rows_, n, E, T, -0.5)
                ops.dot(rows_, n, miss, T, -0.5)
        front = (list(map(list, ops.rows)), list(map(list, ops.coef)), set(written))
        #: the plan of the loss alone (forward and outputs)
        self.loss_i, self.loss_f = ops.arrays()
        # backward, in reverse topological order: G_s += a W_eᵀ G_v, and the gradients. Two
        # versions: one writes ∂L/∂W into the gradient block; the other (plain gradient descent)
        # adds −lr ∂L/∂W straight into W, after W_e's last use, so that no gradient is stored
        # and no separate update pass runs (the flag scales alpha by the run's lr).
        tables = {}
        for fused in (False, True):
            ops.rows, ops.coef = [list(r) for r in front[0]], [list(c) for c in front[1]]
            ops.sealed = len(ops.rows)  # the loss rows stay as they are: see layout[3]
            written.clear()
            written.update(front[2])
            for v in reversed(order):
                if v in inputs:
                    continue
                dv = net.dim(v)
                for e, s, k, ks, a, _ in links(v):
                    if s in inputs:
                        continue
                    for u in cols[s][ks]:
                        ops.gemm(net.dim(s), net.dim(u), dv, weight(e).flip(),
                                 g_cols(v, start[v][k] + pos[v][k][u]),
                                 g_cols(s, start[s][ks] + pos[s][ks][u]), a,
                                 first(("G", s, ks, u)))
                for e, s, k, ks, a, c in links(v):
                    target = weight(e) if fused else _Mat(_STATE, g_off + offsets[e], net.dim(s))
                    sign, flag = (1.0, 1) if fused else (-1.0, 0)
                    if s in inputs:
                        gu = float(ctx.node_gates[c, node_col[s]])
                        ops.axpby(dv, net.dim(s), g_cols(v, start[v][k] + pos[v][k][s]), target,
                                  sign * a * gu, 1.0 if fused else first(("grad", e)), flag)
                        continue
                    for u in cols[s][ks]:
                        ops.gemm(dv, net.dim(s), net.dim(u),
                                 g_cols(v, start[v][k] + pos[v][k][u]),
                                 t_cols(s, start[s][ks] + pos[s][ks][u]).flip(), target,
                                 sign * a, 1.0 if fused else first(("grad", e)), flag)
            tables[fused] = ops.arrays()
        self.ops_i, self.ops_f = tables[False]
        # the kernels run the loss rows first and stop a run whose loss is not finite before
        # any row updates its weights
        self.layout[3] = len(front[0])
        #: the plan of one plain gradient-descent step (update fused into the gradient products)
        self.step_i, self.step_f = tables[True]
        # a fused step bounds each weight's change by norms of the update products' operands
        # instead of scanning the weights, when those operands are much smaller than the
        # weights (wide layers); else the scan is the cheaper check
        update = self.step_i[self.step_i[:, 13] != 0]
        gemm = update[:, 0] <= 3
        operands = np.sum(update[gemm, 1] * update[gemm, 3] + update[gemm, 3] * update[gemm, 2]) \
            + np.sum(update[~gemm, 1] * update[~gemm, 2] * update[~gemm, 14])
        self.layout[2] = int(4 * operands < n_params)
        self.const = np.concatenate(const) if const else np.zeros(1)
        self.loss_const = loss_const
        self.n_groups = {v: len(cols[v]) for v in order}
        #: floating-point operations of one evaluation (the products the plan actually does)
        self.flops = _flops(self.ops_i)
        # whether any product goes in blocks (else threads have nothing to share in one run)
        self.has_blocks = bool(np.any(self.step_i[self.step_i[:, 0] <= 3, 14] > 1)
                               or np.any(self.ops_i[self.ops_i[:, 0] <= 3, 14] > 1))

    def products(self, fused: bool = True) -> np.ndarray:
        """(n_products, 5): m, n, k, A transposed, B transposed of every matrix product of one
        step (``fused``) or one evaluation, in row-major terms: C (m, n) += op(A) op(B)."""
        ops = self.step_i if fused else self.ops_i
        gemm = ops[ops[:, 0] <= 3]
        return np.column_stack([gemm[:, 1:4], gemm[:, 0] >> 1, gemm[:, 0] & 1])


def _kernel_ready(a: np.ndarray) -> bool:
    """True when the kernels can work on ``a`` in place (C-contiguous, aligned float64)."""
    return isinstance(a, np.ndarray) and a.dtype == np.float64 and a.flags.c_contiguous \
        and a.flags.aligned and a.flags.writeable


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """``a``, or a C-contiguous writable float64 copy of it when the kernels cannot take it."""
    return a if _kernel_ready(a) else np.array(a, dtype=np.float64, order="C")


def _lanes(n_runs: int) -> int:
    """Lanes of a parallel call: one per numba thread, at most one per run."""
    import numba

    return max(1, min(numba.get_num_threads(), n_runs))


_blas_lock = threading.Lock()
_blas_holders = 0  # blocks inside one_blas_thread, on any thread
_blas_restore: Any = None  # what restores the limits the first of them found
_blas_libraries: Any = None  # threadpoolctl's BLAS libraries (finding them takes milliseconds)


class one_blas_thread:  # noqa: N801 - used as a function: `with one_blas_thread():`
    """BLAS (numpy's and scipy's, every library threadpoolctl finds) at one thread for the
    block. Every product and LAPACK call of a computation runs single-threaded, whatever the
    thread count: OpenBLAS's threads cut the work differently with 1 and 2 of them (the inner
    dimension of a product too), which changes the rounding, and fastrace gives the same numbers
    with any thread count. The threads go to fastrace's own split of the work instead.

    Blocks may nest and run concurrently on several threads (a sweep on a thread pool): the
    first to enter sets the limit, the last to leave restores what it found. (A class, not a
    generator: entering costs ~0.3 µs, and flow calls the engine thousands of times.)"""

    def __enter__(self) -> None:
        global _blas_holders, _blas_restore, _blas_libraries
        with _blas_lock:
            if _blas_holders == 0:
                if _blas_libraries is None:
                    from threadpoolctl import ThreadpoolController

                    from ._kernels.plan import dgemm_pointer

                    dgemm_pointer()  # scipy's BLAS is loaded by now
                    _blas_libraries = ThreadpoolController().select(user_api="blas")
                _take_blas_control()
                _blas_restore = _blas_libraries.limit(limits=1)
            _blas_holders += 1

    def __exit__(self, *exc: object) -> None:
        global _blas_holders, _blas_restore
        with _blas_lock:
            _blas_holders -= 1
            if _blas_holders == 0:
                _take_blas_control()
                _blas_restore.restore_original_limits()
                _blas_restore = None


def _take_blas_control() -> None:
    """Let this thread set OpenBLAS's thread count. threadpoolctl (3.6+) lets only the first
    thread that set it change it again, silently ignoring others, until that thread's own
    limits end: the thread that restores the limits here may not be the one that set them (the
    last to leave), and the next to set them may be a third. Called under ``_blas_lock``."""
    import threadpoolctl

    controller = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


_parallel_lock = threading.Lock()
_pool: Any = None
_pool_lock = threading.Lock()


def _run_pool() -> Any:
    """The threads that share a samples-engine batch (made once, as many as numba's)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            import numba
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(numba.config.NUMBA_NUM_THREADS,
                                       thread_name_prefix="fastrace-samples")
        return _pool


_layer: str | None = None  # numba's threading layer, once a parallel region has run
_serial_only = False  # a child forked after GNU OpenMP ran: it must not start OpenMP again


def _after_fork_in_child() -> None:
    # A forked child inherits the pool object but not its threads, and the locks and counts
    # of the thread that forked, which it is not: it starts afresh. GNU OpenMP kills a child
    # that starts a parallel region after its parent used it: the child runs serially (the
    # same blocks, the same numbers).
    global _pool, _pool_lock, _blas_lock, _blas_holders, _blas_restore, _parallel_lock
    global _serial_only
    _pool, _pool_lock = None, threading.Lock()
    _blas_lock, _blas_holders, _blas_restore = threading.Lock(), 0, None
    _parallel_lock = threading.Lock()
    layer = _layer
    if layer is None and "numba" in sys.modules:  # (not looked up yet: one region ran, say)
        try:
            layer = sys.modules["numba"].threading_layer()
        except ValueError:  # no parallel region has run
            layer = None
    _serial_only = _serial_only or layer == "omp"


os.register_at_fork(after_in_child=_after_fork_in_child)


def _parallel_guard() -> Any:
    """A lock around numba's parallel regions when its threading layer is "workqueue" (or not
    known yet): that layer aborts the process when two threads enter it at once. The OpenMP and
    TBB layers take concurrent callers."""
    global _layer
    if _layer is None:
        import numba

        try:
            _layer = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            return _parallel_lock
    return _parallel_lock if _layer == "workqueue" else nullcontext()


def parallel_allowed() -> bool:
    """Whether numba may start parallel regions here (not in a child forked after OpenMP)."""
    return not _serial_only


def _wait_all(futures: Sequence[Future | None]) -> None:
    """Wait for every future (None: no future), through an interrupt too, which is raised
    again once they are done."""
    caught: BaseException | None = None
    pending = [f for f in futures if f is not None]
    while pending:
        try:
            wait(pending)
        except BaseException as exc:  # noqa: BLE001 - e.g. KeyboardInterrupt: raised below
            caught = exc
        pending = [f for f in pending if not f.done()]
    if caught is not None:
        raise caught


def _sample_blocks(n_samples: int, n_params: int) -> list[slice]:
    """The samples engine's cut of ``n_samples`` samples into consecutive blocks of nearly
    equal size (see SAMPLES_MAX_BLOCKS): one block for small problems, else a power of 2 of
    them, which 2, 4 or 8 threads share evenly."""
    n = min(SAMPLES_MAX_BLOCKS, n_samples // SAMPLES_BLOCK_MIN_ROWS,
            int(n_samples * n_params // SAMPLES_BLOCK_MIN_WORK))
    n = 1 << (max(n, 1).bit_length() - 1)
    return [slice(n_samples * b // n, n_samples * (b + 1) // n) for b in range(n)]


class GradientEngine:
    """Loss, gradient and gradient-descent steps of ``net`` on ``data`` for flat weight vectors.

    ``engine`` is "samples" (forward/backward over the samples with BLAS), "moments" (a compiled
    plan over per-context gated moments, run by numba: the step cost does not grow with the
    number of samples, and a batch of runs goes in parallel over runs) or "auto".
    """

    def __init__(self, net: Network, data: Dataset, engine: str = "auto") -> None:
        data.check(net)
        self.net = net
        self.data = data
        self.engine = choose_engine(net, data, engine)
        self.edges = net.edges
        self.shapes = {e: net.weight_shape(e) for e in self.edges}
        sizes = [int(np.prod(self.shapes[e])) for e in self.edges]
        self.offsets = dict(zip(self.edges, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()))
        self.n_params = int(sum(sizes))
        self.plan = MomentsPlan(net, data, self.offsets) if self.engine == "moments" else None
        if self.plan is None:
            self._blocks = _sample_blocks(data.n_samples, self.n_params)
            gates = data.gate_matrix(net)  # each edge's samples in each block, once
            self._edge_samples = [_samples_of_edges(net, data, b, gates) for b in self._blocks]
        self._states = threading.local()
        self._work = threading.local()  # the samples engine's work arrays, per calling thread
        self._status = threading.local()  # last_status, per calling thread

    @classmethod
    def for_data(cls, net: Network, data: Dataset, engine: str = "auto") -> GradientEngine:
        """The engine of ``net`` on ``data``, built once and kept on the data set (building a
        moments plan costs milliseconds; repeated simulations of one problem reuse it)."""
        key = ("engine", net.signature(), choose_engine(net, data, engine))
        cached = data._cache.get(key)
        if cached is None:
            cached = cls(net, data, engine)
            data._cache[key] = cached
        return cached  # type: ignore[return-value]

    # ------------------------------------------------------------------ packing
    def pack(self, weights: Mapping[str, object]) -> np.ndarray:
        """{edge: array} -> flat (n_params,) vector (validated)."""
        return self.pack_many([weights])[0]

    def pack_many(self, runs: Sequence[Mapping[str, object]],
                  names: Sequence[str] | None = None) -> np.ndarray:
        """A list of weight dicts -> (n_runs, n_params) (validated; an error names the run,
        by ``names`` if given, in a batch of more than one).

        Each weight is copied once, straight into its place: wide layers make these copies
        (and the page faults of fresh memory) a visible part of a short simulation."""
        flat = np.empty((len(runs), self.n_params))

        def named(i: int, exc: WeightsError) -> WeightsError:
            if len(runs) == 1:
                return exc
            run = f"run {i}" + (f" ({names[i]!r})" if names is not None else "")
            return WeightsError(f"{run}: {exc}")

        for i, (row, weights) in enumerate(zip(flat, runs)):
            try:
                check_edge_names(self.net, weights)
                for e in self.edges:
                    o, shape = self.offsets[e], self.shapes[e]
                    row[o:o + shape[0] * shape[1]].reshape(shape)[...] = \
                        weight_array(self.net, weights, e)
            except WeightsError as exc:
                raise named(i, exc) from None
        if not np.isfinite(flat).all():  # (one test of all the values: a batch has many runs)
            for i, weights in enumerate(runs):
                try:
                    check_weights(self.net, weights)  # raises, naming the edge
                except WeightsError as exc:
                    raise named(i, exc) from None
        return flat

    def unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Flat (n_params,) or (..., n_params) -> {edge: view of shape (..., out, in)}."""
        lead = flat.shape[:-1]
        out = {}
        for e in self.edges:
            o, (r, c) = self.offsets[e], self.shapes[e]
            out[e] = flat[..., o:o + r * c].reshape(*lead, r, c)
        return out

    # ------------------------------------------------------------------ evaluation
    def _run_plan(self, w, velocity, lr, n_steps, momentum, weight_decay, update, max_abs,
                  snapshot_steps=None, snapshots=None, parallel=None, loss_only=False):
        """Run the plan on the weights ``w`` (n_runs, n_params), C-contiguous float64, in place
        (only with ``update``). Returns the state (n_runs, state_size), losses and status."""
        from ._kernels import plan as kernels

        plan = self.plan
        n_runs = w.shape[0]
        # the state is kept between calls: blocks no operation writes stay zero, the others
        # are overwritten in every evaluation, so nothing is copied in
        states = self._states.__dict__  # per thread: concurrent callers never share a state
        state = states.get(n_runs)
        if state is None:
            state = np.zeros((n_runs, plan.state_size))
            states.clear()
            states[n_runs] = state
        # the velocity is read and written only with momentum: else w stands in for it
        heavy_ball = bool(update) and momentum != 0.0
        v = velocity if heavy_ball else w
        losses = np.full((n_runs, n_steps), np.nan)  # steps a stopped run did not reach stay NaN
        status = np.full(n_runs, -1, dtype=np.int64)
        if snapshot_steps is None:
            snapshot_steps = np.zeros(0, dtype=np.int64)
            snapshots = np.zeros((n_runs, 0, self.n_params))
        # threads pay off only when there is enough work to share: small problems stay serial
        if parallel is None:
            parallel = n_runs > 1 and n_runs * n_steps * plan.flops >= PARALLEL_MIN_FLOPS
        parallel = parallel and parallel_allowed()
        run = kernels.descend_parallel if parallel else kernels.descend_serial
        # one run: its big products in blocks on numba's threads (a batch: the runs on them)
        mode = kernels.BLOCKS
        if plan.has_blocks and not parallel and parallel_allowed():
            import numba

            if numba.get_num_threads() > 1:
                mode = kernels.THREADED_BLOCKS
        fused = bool(update) and momentum == 0.0 and weight_decay == 0.0
        if loss_only:
            ops_i, ops_f = plan.loss_i, plan.loss_f
        else:
            ops_i, ops_f = (plan.step_i, plan.step_f) if fused else (plan.ops_i, plan.ops_f)
        with one_blas_thread(), _parallel_guard():
            run(kernels.dgemm_pointer(), ops_i, ops_f, fused, plan.const, state, w, v,
                plan.layout, np.array(lr, dtype=np.float64), float(momentum),
                float(weight_decay), int(n_steps), plan.loss_const, float(max_abs), bool(update),
                losses, status, snapshot_steps, snapshots, _lanes(n_runs) if parallel else 1,
                mode)
        return state, losses, status

    @property
    def last_status(self) -> np.ndarray | None:
        """Per run of this thread's last ``descend`` call: the number of steps after which its
        state went bad, or -1 (None before any call). Kept per thread, as the engine of a data
        set is shared by every simulation of it."""
        return getattr(self._status, "value", None)

    def loss_and_gradient(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Loss (n_runs,) and flat gradient (n_runs, n_params) of weights (n_runs, n_params)."""
        w = _kernel_array(np.atleast_2d(np.asarray(w, dtype=np.float64)))
        if self.plan is not None:
            state, losses, _ = self._run_plan(w, None, np.zeros(w.shape[0]), 1, 0.0, 0.0,
                                              False, np.inf)
            g_off = int(self.plan.layout[1])
            # (an evaluation computes the gradient rows even when the loss is not finite)
            return losses[:, 0], state[:, g_off:g_off + self.n_params].copy()
        return self._samples_eval(w, True)  # type: ignore[return-value]

    def loss(self, w: np.ndarray) -> np.ndarray:
        """Loss (n_runs,) of weights (n_runs, n_params)."""
        w = _kernel_array(np.atleast_2d(np.asarray(w, dtype=np.float64)))
        if self.plan is not None:
            return self._run_plan(w, None, np.zeros(w.shape[0]), 1, 0.0, 0.0, False, np.inf,
                                  loss_only=True)[1][:, 0]
        return self._samples_eval(w, False)[0]

    @contextmanager
    def reusing_memory(self) -> Iterator[None]:
        """Within the block, the samples engine's evaluations on this thread write into the
        same work arrays (fresh memory costs page faults: ~0.25 ms per MB here), which are let
        go at its end (the engine is kept on the data set). For loops of evaluations: descend
        takes it itself."""
        outer = getattr(self._work, "spaces", None)
        if outer is None:
            self._work.spaces = []
        try:
            yield
        finally:
            if outer is None:
                self._work.spaces = None

    def _samples_eval(self, w: np.ndarray, need_grad: bool) -> tuple[np.ndarray,
                                                                     np.ndarray | None]:
        """The samples engine: loss (n_runs,) and, with ``need_grad``, flat gradient
        (n_runs, n_params) of weights (n_runs, n_params).

        The work is one piece per run and block of samples (``_sample_blocks``), done with numpy
        (BLAS at one thread). For runs of enough work (SAMPLES_THREADS_MIN_WORK) the pieces go
        to numba's thread count of Python threads (numpy leaves the GIL free in its products)
        in waves of one per thread, the caller doing the first; a wave's pieces are added in
        order once all are done, so a piece's gradient is held only until then and every
        thread count adds the same numbers in the same order."""
        n_runs = w.shape[0]
        losses = np.empty(n_runs)
        grads = np.empty_like(w) if need_grad else None
        pieces = [(i, b) for i in range(n_runs) for b in range(len(self._blocks))]

        import numba

        threads = min(numba.get_num_threads(), len(pieces))
        # (threads pay off only for runs of enough work: small numpy calls fight for the GIL)
        if self.data.n_samples * self.n_params < SAMPLES_THREADS_MIN_WORK:
            threads = 1
        # the work arrays of each piece of a wave (of a block's size: the pieces of one call
        # share them in turn, and those of calls in ``reusing_memory`` too)
        spaces = getattr(self._work, "spaces", None)
        if spaces is None:
            spaces = []
        spaces.extend(_Workspace() for _ in range(threads - len(spaces)))

        def compute(piece: tuple[int, int], lane: int = 0) -> tuple[float, dict | None]:
            i, b = piece
            return _loss_gradient_samples(self.net, self.data, self.unpack(w[i]), need_grad,
                                          self._blocks[b], self._edge_samples[b], spaces[lane])

        def add(piece: tuple[int, int], part: tuple[float, dict | None]) -> None:
            (i, b), (loss, grad) = piece, part
            losses[i] = loss if b == 0 else losses[i] + loss
            if grads is not None:
                row = self.unpack(grads[i])
                for e in self.edges:
                    if b == 0:
                        row[e][...] = grad[e]
                    else:
                        row[e] += grad[e]

        with one_blas_thread():
            try:
                pool = _run_pool() if threads > 1 else None
            except RuntimeError:  # "can't register atexit after shutdown" (of the interpreter)
                pool = None
            if pool is None:
                for piece in pieces:
                    add(piece, compute(piece))
                return losses, grads
            err = np.geterr()  # (numpy 1.x keeps it per thread, not in the context)

            def in_error_state(piece: tuple[int, int], lane: int) -> tuple[float, dict | None]:
                with np.errstate(**err):
                    return compute(piece, lane)

            def submit(piece: tuple[int, int], lane: int) -> Future | None:
                # in a copy of the caller's context, which holds numpy's error state in numpy 2
                try:
                    return pool.submit(contextvars.copy_context().run, in_error_state, piece,
                                       lane)
                except RuntimeError:  # "cannot schedule new futures after (interpreter)
                    return None       # shutdown": the caller does the piece itself

            for first in range(0, len(pieces), threads):
                # the caller does a wave's first piece, the pool the others
                wave = pieces[first:first + threads]
                futures: list[Future | None] = []
                try:
                    for lane, piece in enumerate(wave[1:], 1):
                        futures.append(submit(piece, lane))
                    parts = [compute(wave[0])]
                finally:  # (a piece still running must not outlive the call: its work arrays)
                    _wait_all(futures)
                parts += [compute(piece, lane) if f is None else f.result()
                          for lane, (piece, f) in enumerate(zip(wave[1:], futures), 1)]
                for piece, part in zip(wave, parts):
                    add(piece, part)
        return losses, grads

    def descend(self, w: np.ndarray, velocity: np.ndarray, lr: np.ndarray, n_steps: int,
                momentum: float = 0.0, weight_decay: float = 0.0,
                max_abs: float = np.inf, snapshot_steps: np.ndarray | None = None,
                snapshots: np.ndarray | None = None, parallel: bool | None = None) -> np.ndarray:
        """``n_steps`` gradient-descent steps on every run, in place.

        w, velocity: (n_runs, n_params), updated in place; lr: (n_runs,).
        Step: ``v ← momentum·v + (∇L + weight_decay·w)``; ``w ← w − lr·v`` (heavy ball; with
        momentum 0 this is plain ``w ← w − lr ∇L``).
        Returns the loss of each run before each step, (n_runs, n_steps). A run whose loss or
        weights stop being finite, or whose weights exceed ``max_abs`` after any step, stops
        there: its later losses are NaN (``last_status``: per run, the number of steps after
        which its state went bad, or -1), and its ``w`` (and velocity) are left as they were
        at that point: the weights whose loss is not finite, or the weights that are bad.
        ``snapshot_steps`` (increasing step counts in 1..n_steps) and ``snapshots``
        (n_runs, len(snapshot_steps), n_params): the weights after those many steps are written
        there, so that many save points cost one call. ``parallel``: spread the runs over numba
        threads (True), not (False), or when there is enough work to pay for it (None).
        """
        lr = np.broadcast_to(np.asarray(lr, dtype=np.float64), (w.shape[0],))
        if snapshot_steps is not None:
            snapshot_steps = np.ascontiguousarray(snapshot_steps, dtype=np.int64)
            if snapshot_steps.size and (np.any(np.diff(snapshot_steps) <= 0)
                                        or snapshot_steps[0] < 1 or snapshot_steps[-1] > n_steps):
                raise ValueError("snapshot_steps must increase within 1..n_steps")
            if snapshots is None or snapshots.shape != (w.shape[0], snapshot_steps.size,
                                                        self.n_params) \
                    or not _kernel_ready(snapshots):
                raise ValueError("snapshots must be a C-contiguous, writable float64 array "
                                 "(n_runs, len(snapshot_steps), n_params)")
        if self.plan is not None:
            # the kernels work on C-contiguous float64 rows: other arrays go through a copy
            ww = _kernel_array(w)
            vv = velocity if momentum == 0.0 else _kernel_array(velocity)
            _, losses, status = self._run_plan(ww, vv, lr, n_steps, momentum, weight_decay,
                                               True, max_abs, snapshot_steps, snapshots,
                                               parallel)
            if ww is not w:
                w[...] = ww
            if vv is not velocity and momentum != 0.0:
                velocity[...] = vv
            self._status.value = status  # losses after a run's stop were not computed: NaN
            return losses
        with self.reusing_memory():  # (the steps' evaluations write into the same arrays)
            losses = np.full((w.shape[0], n_steps), np.nan)
            status = np.full(w.shape[0], -1, dtype=np.int64)
            active = np.ones(w.shape[0], dtype=bool)
            snap = 0
            for k in range(n_steps):
                L, G = self.loss_and_gradient(w)
                losses[active, k] = L[active]
                # as in the kernels, a run whose loss is not finite stops before this step: its
                # weights (and velocity) stay those the loss was evaluated at
                bad_loss = active & ~np.isfinite(L)
                move = active & ~bad_loss
                if weight_decay:
                    G += weight_decay * w
                if momentum:
                    velocity[move] = momentum * velocity[move] + G[move]
                    step = velocity
                else:
                    step = G
                w[move] -= lr[move, None] * step[move]
                with np.errstate(invalid="ignore"):  # the kernels' test: finite and within max_abs
                    bad_w = move & ~(np.isfinite(w) & (np.abs(w) <= max_abs)).all(axis=1)
                status[bad_loss] = k
                status[bad_w] = k + 1
                active &= ~(bad_loss | bad_w)
                if snapshot_steps is not None and snap < snapshot_steps.size \
                        and snapshot_steps[snap] == k + 1:
                    snapshots[:, snap] = w
                    snap += 1
                if not active.any():
                    break
        self._status.value = status
        return losses
