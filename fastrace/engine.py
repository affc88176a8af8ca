"""Gradient engines for full-network learning: weights packed flat, many runs at once.

A ``GradientEngine`` binds a network and a data set and evaluates the loss and gradient of one
or many weight vectors, and performs gradient-descent steps, as fast as the machine allows.
Weights of all edges are packed into one float64 vector (``pack`` / ``unpack``) in the network's
edge order, each edge's matrix row-major; a batch of runs is an array (n_runs, n_params).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np

from .data import Dataset
from .gradient import _loss_gradient_samples, check_weights, choose_engine
from .network import Network
from .stats import gated_moments

_OP = {"nn": 0, "nt": 1, "tn": 2, "axpby": 3, "dot": 4}
#: below this much work per call (runs × steps × flops per step) the runs go serially
PARALLEL_MIN_FLOPS = 2e7
_STATE, _CONST = 0, 1


class _Ops:
    """Builds a plan: rows of (opcode, m, n, k, a_src, a_off, a_ld, b_src, b_off, b_ld, c_off,
    c_ld, scale_by_lr) and (alpha, beta); consecutive products that continue each other are
    merged."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.coef: list[list[float]] = []

    def gemm(self, kind, m, n, k, a, b, c, alpha, beta=1.0, scale_by_lr=0):
        row = [_OP[kind], m, n, k, a[0], a[1], a[2], b[0], b[1], b[2], c[0], c[1], scale_by_lr]
        if self.rows and self._merge(row, alpha, beta):
            return
        self.rows.append(row)
        self.coef.append([alpha, beta])

    def _merge(self, row, alpha, beta) -> bool:
        last, (last_alpha, last_beta) = self.rows[-1], self.coef[-1]
        if last[0] != row[0] or last_alpha != alpha:
            return False
        code = row[0]

        def same(idx):
            return all(last[i] == row[i] for i in idx)

        if code in (0, 2) and beta == last_beta and same((1, 3, 4, 5, 6, 7, 9, 11, 12)) \
                and row[8] == last[8] + last[2] and row[10] == last[10] + last[2]:
            last[2] += row[2]  # more columns of B and C
            return True
        if code == 1 and beta == 1.0 and same((1, 2, 4, 6, 7, 9, 10, 11, 12)) \
                and row[5] == last[5] + last[3] and row[8] == last[8] + last[3]:
            last[3] += row[3]  # the same C, summed over more columns of A and B
            return True
        return False

    def axpby(self, m, n, a, c, alpha, beta, scale_by_lr=0):
        self.rows.append([_OP["axpby"], m, n, 0, a[0], a[1], a[2], 0, 0, 0, c[0], c[1],
                          scale_by_lr])
        self.coef.append([alpha, beta])

    def dot(self, m, n, a, b, alpha):
        self.rows.append([_OP["dot"], m, n, 0, a[0], a[1], a[2], b[0], b[1], b[2], 0, 0, 0])
        self.coef.append([alpha, 0.0])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ints = np.array(self.rows, dtype=np.int64).reshape(-1, 13)
        return ints, np.array(self.coef, dtype=np.float64).reshape(-1, 2)


class MomentsPlan:
    """The moments engine compiled into a flat operation table (see ``_kernels/plan.py``).

    Contexts are grouped per node by the gates upstream of that node: a node's transfer matrix
    from the inputs is the same for every context of a group, so it is computed once per group
    (the shared hidden layer of the routing network is propagated once per input domain, not
    once per trained pair). Only inputs that reach the node through open gates get columns, and
    a group that every gate switches off gets none: gated-off blocks cost nothing.
    """

    def __init__(self, net: Network, data: Dataset, offsets: dict[str, int]) -> None:
        m = gated_moments(net, data)
        ctx = m.contexts
        node_col = {v: i for i, v in enumerate(net.nodes)}
        edge_col = {e: i for i, e in enumerate(net.edges)}
        inputs = net.inputs
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
        w_off, v_off, g_off = 0, n_params, 2 * n_params
        cursor = 3 * n_params
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
        self.state_size = cursor
        # blocks are overwritten (beta = 0) by their first write in every evaluation, and blocks
        # no operation writes stay zero from the state's allocation: nothing is zeroed per step
        self.layout = np.array([n_params, w_off, v_off, g_off, 0, 0], dtype=np.int64)
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

        def constant(arr: np.ndarray) -> int:
            nonlocal const_len
            const.append(np.ascontiguousarray(arr, dtype=np.float64).ravel())
            const_len += arr.size
            return const_len - arr.size

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
                    ops.axpby(dv, net.dim(s), (_STATE, offsets[e], net.dim(s)),
                              (T_off[v] + start[v][k] + pos[v][k][s], width[v]), a * gu,
                              first(("T", v, k, s)))
                    continue
                for u in cols[s][ks]:
                    ops.gemm("nn", dv, net.dim(u), net.dim(s),
                             (_STATE, offsets[e], net.dim(s)),
                             (_STATE, T_off[s] + start[s][ks] + pos[s][ks][u], width[s]),
                             (T_off[v] + start[v][k] + pos[v][k][u], width[v]), a,
                             first(("T", v, k, u)))
        # outputs: E = Σyx − T Σxx per group (moments summed over the group's contexts), loss
        loss_const = 0.5 * float(m.yy.sum())
        for w in net.outputs:
            dw = net.dim(w)
            rows = m.output_slices[w]
            blocks = []
            for k in sorted(cols[w], key=lambda k: start[w][k]):
                members = np.flatnonzero(group_of[w] == k)
                idx = np.concatenate([np.arange(m.input_slices[u].start, m.input_slices[u].stop)
                                      for u in cols[w][k]])
                blocks.append((k, m.yx[members][:, rows][:, :, idx].sum(axis=0),
                               m.xx[members][:, idx][:, :, idx].sum(axis=0)))
            if not blocks:
                continue
            n0, xx0 = blocks[0][2].shape[0], blocks[0][2]
            if all(b[2].shape[0] == n0 and np.array_equal(b[2], xx0) for b in blocks):
                # every group has the same input moments: the (dw, G·n) row-major block matrix
                # read as (dw·G, n) holds one group row per row, so one product does them all
                yx_at = constant(np.concatenate([b[1] for b in blocks], axis=1))
                xx_at = constant(xx0)
                pieces = [(dw * len(blocks), n0, T_off[w], G_off[w], n0, yx_at, xx_at)]
            else:
                pieces = [(dw, b[2].shape[0], T_off[w] + start[w][b[0]],
                           G_off[w] + start[w][b[0]], width[w], constant(b[1]), constant(b[2]))
                          for b in blocks]
            for rows_, n, blk, gblk, ld, yx_at, xx_at in pieces:
                ops.axpby(rows_, n, (_CONST, yx_at, n), (gblk, ld), 1.0, 0.0)
                ops.gemm("nn", rows_, n, n, (_STATE, blk, ld), (_CONST, xx_at, n), (gblk, ld), -1.0)
                ops.dot(rows_, n, (_STATE, blk, ld), (_CONST, yx_at, n), -0.5)
                ops.dot(rows_, n, (_STATE, blk, ld), (_STATE, gblk, ld), -0.5)
        # backward, in reverse topological order: G_s += a W_eᵀ G_v, and the gradients. Two
        # versions: one writes ∂L/∂W into the gradient block; the other (plain gradient descent)
        # adds −lr ∂L/∂W straight into W, after W_e's last use, so that no gradient is stored
        # and no separate update pass runs (the flag scales alpha by the run's lr).
        front = (list(map(list, ops.rows)), list(map(list, ops.coef)), set(written))
        tables = {}
        for fused in (False, True):
            ops.rows, ops.coef = [list(r) for r in front[0]], [list(c) for c in front[1]]
            written.clear()
            written.update(front[2])
            for v in reversed(order):
                if v in inputs:
                    continue
                dv = net.dim(v)
                for e, s, k, ks, a, _ in links(v):
                    if s in inputs:
                        continue
                    gcol = G_off[v] + start[v][k]
                    for u in cols[s][ks]:
                        ops.gemm("tn", net.dim(s), net.dim(u), dv,
                                 (_STATE, offsets[e], net.dim(s)),
                                 (_STATE, gcol + pos[v][k][u], width[v]),
                                 (G_off[s] + start[s][ks] + pos[s][ks][u], width[s]), a,
                                 first(("G", s, ks, u)))
                for e, s, k, ks, a, c in links(v):
                    gcol = G_off[v] + start[v][k]
                    target = (offsets[e] if fused else g_off + offsets[e], net.dim(s))
                    sign, flag = (1.0, 1) if fused else (-1.0, 0)
                    if s in inputs:
                        gu = float(ctx.node_gates[c, node_col[s]])
                        ops.axpby(dv, net.dim(s), (_STATE, gcol + pos[v][k][s], width[v]),
                                  target, sign * a * gu,
                                  1.0 if fused else first(("grad", e)), flag)
                        continue
                    for u in cols[s][ks]:
                        ops.gemm("nt", dv, net.dim(s), net.dim(u),
                                 (_STATE, gcol + pos[v][k][u], width[v]),
                                 (_STATE, T_off[s] + start[s][ks] + pos[s][ks][u], width[s]),
                                 target, sign * a, 1.0 if fused else first(("grad", e)), flag)
            tables[fused] = ops.arrays()
        self.ops_i, self.ops_f = tables[False]
        #: the plan of one plain gradient-descent step (update fused into the gradient products)
        self.step_i, self.step_f = tables[True]
        self.const = np.concatenate(const) if const else np.zeros(1)
        self.loss_const = loss_const
        self.n_groups = {v: len(cols[v]) for v in order}
        gemm = self.ops_i[:, 0] <= 2
        #: floating-point operations of one evaluation (the products the plan actually does)
        self.flops = float(2 * np.sum(self.ops_i[gemm, 1] * self.ops_i[gemm, 2]
                                      * self.ops_i[gemm, 3]))




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
        self._states = threading.local()

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
        W = check_weights(self.net, weights)
        return np.concatenate([W[e].ravel() for e in self.edges])

    def pack_many(self, runs: Sequence[Mapping[str, object]]) -> np.ndarray:
        """A list of weight dicts -> (n_runs, n_params)."""
        return np.stack([self.pack(w) for w in runs])

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
                  snapshot_steps=None, snapshots=None, parallel=None):
        from ._kernels import plan as kernels

        plan = self.plan
        n_runs = w.shape[0]
        # the state is kept between calls: blocks no operation writes stay zero, the others
        # are overwritten in every evaluation, so only weights and velocity are copied in
        states = self._states.__dict__  # per thread: concurrent callers never share a state
        state = states.get(n_runs)
        if state is None:
            state = np.zeros((n_runs, plan.state_size))
            states.clear()
            states[n_runs] = state
        state[:, :self.n_params] = w
        state[:, self.n_params:2 * self.n_params] = 0.0 if velocity is None else velocity
        losses = np.empty((n_runs, n_steps))
        status = np.full(n_runs, -1, dtype=np.int64)
        if snapshot_steps is None:
            snapshot_steps = np.zeros(0, dtype=np.int64)
            snapshots = np.zeros((n_runs, 0, self.n_params))
        # threads pay off only when there is enough work to share: small problems stay serial
        if parallel is None:
            parallel = n_runs > 1 and n_runs * n_steps * plan.flops >= PARALLEL_MIN_FLOPS
        run = kernels.descend_parallel if parallel else kernels.descend_serial
        fused = bool(update) and momentum == 0.0 and weight_decay == 0.0
        ops_i, ops_f = (plan.step_i, plan.step_f) if fused else (plan.ops_i, plan.ops_f)
        run(kernels.dgemm_pointer(), ops_i, ops_f, fused, plan.const, state, plan.layout,
            np.ascontiguousarray(lr, dtype=np.float64), float(momentum), float(weight_decay),
            int(n_steps), plan.loss_const, float(max_abs), bool(update), losses, status,
            snapshot_steps, snapshots)
        return state, losses, status

    def loss_and_gradient(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Loss (n_runs,) and flat gradient (n_runs, n_params) of weights (n_runs, n_params)."""
        w = np.atleast_2d(np.asarray(w, dtype=np.float64))
        if self.plan is not None:
            state, losses, _ = self._run_plan(w, None, np.zeros(w.shape[0]), 1, 0.0, 0.0,
                                              False, np.inf)
            n = self.n_params
            return losses[:, 0], state[:, 2 * n:3 * n].copy()
        losses = np.empty(w.shape[0])
        grads = np.empty_like(w)
        for i in range(w.shape[0]):
            L, G = _loss_gradient_samples(self.net, self.data, self.unpack(w[i]), True)
            losses[i] = L
            grads[i] = np.concatenate([G[e].ravel() for e in self.edges])
        return losses, grads

    def loss(self, w: np.ndarray) -> np.ndarray:
        """Loss (n_runs,) of weights (n_runs, n_params)."""
        w = np.atleast_2d(np.asarray(w, dtype=np.float64))
        if self.plan is not None:
            return self.loss_and_gradient(w)[0]
        return np.array([_loss_gradient_samples(self.net, self.data, self.unpack(w[i]), False)[0]
                         for i in range(w.shape[0])])

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
        which its state went bad, or -1).
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
                                                        self.n_params):
                raise ValueError("snapshots must be (n_runs, len(snapshot_steps), n_params)")
        if self.plan is not None:
            state, losses, status = self._run_plan(w, velocity, lr, n_steps, momentum,
                                                   weight_decay, True, max_abs,
                                                   snapshot_steps, snapshots, parallel)
            n = self.n_params
            w[...] = state[:, :n]
            velocity[...] = state[:, n:2 * n]
            for r, k in enumerate(status):
                if k >= 0:  # the state went bad after k steps: later losses were not computed
                    losses[r, k + 1:] = np.nan
            self.last_status = status
            return losses
        losses = np.full((w.shape[0], n_steps), np.nan)
        status = np.full(w.shape[0], -1, dtype=np.int64)
        active = np.ones(w.shape[0], dtype=bool)
        snap = 0
        for k in range(n_steps):
            L, G = self.loss_and_gradient(w)
            losses[active, k] = L[active]
            if weight_decay:
                G += weight_decay * w
            if momentum:
                velocity[active] = momentum * velocity[active] + G[active]
                step = velocity
            else:
                step = G
            w[active] -= lr[active, None] * step[active]
            bad_loss = active & ~np.isfinite(L)
            bad_w = active & ~bad_loss & ~(np.abs(w) <= max_abs).all(axis=1)
            status[bad_loss] = k
            status[bad_w] = k + 1
            active &= ~(bad_loss | bad_w)
            if snapshot_steps is not None and snap < snapshot_steps.size \
                    and snapshot_steps[snap] == k + 1:
                snapshots[:, snap] = w
                snap += 1
            if not active.any():
                break
        self.last_status = status
        return losses
