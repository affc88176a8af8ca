"""numba executor for compiled gradient plans (private).

A plan is a table of small dense operations on three flat float64 vectors per run: its weights,
its state (gradient and workspace) and one shared constant vector (gated moments). Every matrix
product goes to BLAS ``dgemm`` through scipy's Cython BLAS, called from numba with pointers at
offsets into the flat vectors, so no operation allocates and a whole descent runs without
returning to Python. Matrices are row-major with explicit leading dimensions.

Columns of ``ops_i``: opcode, m, n, k, a_src, a_off, a_ld, b_src, b_off, b_ld, c_src, c_off,
c_ld, scale_by_lr, count, a_step, c_step (src 0 = the run's state, 1 = the constants, 2 = the
run's weights; with scale_by_lr alpha is multiplied by the run's learning rate). ``ops_f``:
alpha, beta. Opcodes:

- 0-3: C (m, n) = beta C + alpha op(A) op(B), op(A) (m, k) stored transposed when opcode & 2,
  op(B) (k, n) when opcode & 1: one BLAS call, or ``count`` calls on blocks of C (n_blocks).
- 4: C (m, n) = beta C + alpha A, A stored transposed when k = 1; ``count`` such blocks, the
  b-th at a_off + b a_step and c_off + b c_step.
- 5: the loss accumulates alpha <A, B> over (m, n).
- 6: an output block: C (m, n) = Y − A B with B (n, n) and Y (m, n) constants at offset k with
  leading dimension n, and the loss accumulates alpha (<C, B − A> − <E_B, A>), B and E_B
  (m, n) the constants right after Y.
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np

AXPBY, DOT, OUTPUT = 4, 5, 6
N_INT_COLUMNS = 17

_P = ctypes.c_void_p
_DGEMM_TYPE = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P)
_dgemm = None


def dgemm_pointer():
    """scipy's Fortran dgemm as a ctypes function (looked up once, passed to the kernels)."""
    global _dgemm
    if _dgemm is None:
        from numba.extending import get_cython_function_address

        _dgemm = _DGEMM_TYPE(get_cython_function_address("scipy.linalg.cython_blas", "dgemm"))
    return _dgemm


@numba.njit(cache=True, nogil=True)
def _scratch():
    """Argument buffers for dgemm, one set per run: ints, floats, the characters 'N' 'T'.
    They are rewritten on every call, so each is a whole cache line (64 bytes) of its own:
    buffers of runs on different threads must not share a line (the allocator may place them
    side by side: the 64-run batch then took 565 ms instead of 505 on 2 threads, at random)."""
    raw = np.empty(4 * 64, np.uint8)
    at = -raw.ctypes.data % 64  # the first cache line inside the allocation
    line = raw[at:at + 3 * 64]
    ints = line[:64].view(np.int32)
    flts = line[64:128].view(np.float64)
    chars = line[128:]
    chars[0] = 78  # 'N'
    chars[1] = 84  # 'T'
    return ints, flts, chars


@numba.njit(cache=True, nogil=True)
def _gemm(fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ints, flts, chars):
    # row-major C(m, n) = beta C + alpha op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ
    ints[0] = n
    ints[1] = m
    ints[2] = k
    ints[3] = ldb
    ints[4] = lda
    ints[5] = ldc
    flts[0] = alpha
    flts[1] = beta
    fn(chars[tb:].ctypes, chars[ta:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
       flts[0:].ctypes, b.ctypes, ints[3:].ctypes, a.ctypes, ints[4:].ctypes, flts[1:].ctypes,
       c.ctypes, ints[5:].ctypes)


# A product this big is computed in blocks of rows (or columns) of C, one single-threaded
# dgemm call each, so that several threads can share it: the blocks depend on the shape only,
# never on the thread count, and so do the results (OpenBLAS's own threading cuts the inner
# dimension into different blocks with 1 and 2 threads, which changes the rounding).
_SPLIT_FLOPS = float(1 << 24)  # at least this many flops per block (~0.2 ms): forks pay off
_SPLIT_ROWS = 256  # at least this many rows (columns) per block: dgemm keeps its rate
_MAX_BLOCKS = 16

#: how the kernels run the products: WHOLE, one dgemm call each (BLAS threads as set, for
#: measuring BLAS alone); BLOCKS, big ones in blocks one after the other; THREADED_BLOCKS, the
#: blocks of a product on numba's threads (the same calls, the same numbers)
WHOLE, BLOCKS, THREADED_BLOCKS = 0, 1, 2


def n_blocks(m: int, n: int, k: int) -> int:
    """Blocks of a product C (m, n) = op(A) (m, k) op(B) (k, n), along its longer side (the
    plan stores them in the product's ``count`` column)."""
    flops = 2.0 * m * n * k
    if flops < 2.0 * _SPLIT_FLOPS:
        return 1
    return max(1, min(_MAX_BLOCKS, max(m, n) // _SPLIT_ROWS, int(flops / _SPLIT_FLOPS)))


@numba.njit(cache=True, nogil=True)
def _gemm_block(fn, code, m, n, k, alpha, a, a_off, a_ld, b, b_off, b_ld, beta, c, c_off, c_ld,
                blk, n_blk, ints, flts, chars):
    """Block ``blk`` of ``n_blk`` of C = beta C + alpha op(A) op(B) (row-major): a band of rows
    of C (rows of op(A)) when m >= n, else a band of columns (columns of op(B))."""
    span = m if m >= n else n
    size = ((span + n_blk - 1) // n_blk + 7) // 8 * 8
    lo = blk * size
    hi = min(span, lo + size)
    if lo >= hi:
        return
    ta, tb = code >> 1, code & 1
    if m >= n:  # rows lo..hi of op(A): columns of A when stored transposed
        _gemm(fn, ta, tb, hi - lo, n, k, alpha, a[a_off + (lo if ta else lo * a_ld):], a_ld,
              b[b_off:], b_ld, beta, c[c_off + lo * c_ld:], c_ld, ints, flts, chars)
    else:  # columns lo..hi of op(B): rows of B when stored transposed
        _gemm(fn, ta, tb, m, hi - lo, k, alpha, a[a_off:], a_ld,
              b[b_off + (lo * b_ld if tb else lo):], b_ld, beta, c[c_off + lo:], c_ld, ints,
              flts, chars)


@numba.njit(cache=True, nogil=True, parallel=True)
def _gemm_blocks_threaded(fn, code, m, n, k, alpha, a, a_off, a_ld, b, b_off, b_ld, beta, c,
                          c_off, c_ld, n_blk):
    for blk in numba.prange(n_blk):
        ints, flts, chars = _scratch()  # each thread its own argument buffers
        _gemm_block(fn, code, m, n, k, alpha, a, a_off, a_ld, b, b_off, b_ld, beta, c, c_off,
                    c_ld, blk, n_blk, ints, flts, chars)


@numba.njit(cache=True, nogil=True)
def _product_in_blocks(fn, code, m, n, k, alpha, a, a_off, a_ld, b, b_off, b_ld, beta, c, c_off,
                       c_ld, n_blk, mode, ints, flts, chars):
    """C = beta C + alpha op(A) op(B) in ``n_blk`` blocks, on numba's threads with
    THREADED_BLOCKS."""
    if mode == THREADED_BLOCKS:
        _gemm_blocks_threaded(fn, code, m, n, k, alpha, a, a_off, a_ld, b, b_off, b_ld, beta,
                              c, c_off, c_ld, n_blk)
    else:
        for blk in range(n_blk):
            _gemm_block(fn, code, m, n, k, alpha, a, a_off, a_ld, b, b_off, b_ld, beta, c,
                        c_off, c_ld, blk, n_blk, ints, flts, chars)


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _norm(x, off, ld, rows, cols):
    """Frobenius norm of the (rows, cols) block of x at off with leading dimension ld."""
    total = 0.0
    for i in range(rows):
        row = x[off + i * ld:off + i * ld + cols]
        for j in range(cols):  # a row view indexed by the loop counter: this loop vectorises
            total += row[j] * row[j]
    return np.sqrt(total)


# the loops below index row views with their loop counters: numba then knows the indices are
# non-negative and drops the wrap-around test it adds to every other index (which also keeps
# the loops from vectorising)


@numba.njit(cache=True, nogil=True)
def _scale_add(m, n, transposed, alpha, a, a_off, a_ld, beta, c, c_off, c_ld):
    """C (m, n) = beta C + alpha A, A read down its columns when stored transposed; loops
    with unit stride on the side that has it."""
    if transposed:  # A stored (n, m): walk its rows, writing C's columns
        for j in range(n):
            ra = a[a_off + j * a_ld:a_off + j * a_ld + m]
            cc = c[c_off + j:]
            if beta == 0.0:
                for i in range(m):
                    cc[i * c_ld] = alpha * ra[i]
            else:
                for i in range(m):
                    cc[i * c_ld] = beta * cc[i * c_ld] + alpha * ra[i]
    else:
        for i in range(m):
            ra = a[a_off + i * a_ld:a_off + i * a_ld + n]
            rc = c[c_off + i * c_ld:c_off + i * c_ld + n]
            if beta == 0.0:
                for j in range(n):
                    rc[j] = alpha * ra[j]
            else:
                for j in range(n):
                    rc[j] = beta * rc[j] + alpha * ra[j]


@numba.njit(cache=True, nogil=True)
def _dot(m, n, a, a_off, a_ld, b, b_off, b_ld):
    """<A, B> of two (m, n) blocks."""
    s = 0.0
    for i in range(m):
        ra = a[a_off + i * a_ld:a_off + i * a_ld + n]
        rb = b[b_off + i * b_ld:b_off + i * b_ld + n]
        for j in range(n):
            s += ra[j] * rb[j]
    return s


@numba.njit(cache=True, nogil=True)
def _output_block(m, n, t, t_off, t_ld, y, y_off, xx, xx_off, xx_ld, e, e_off, e_ld):
    """E (m, n) = Y − T XX with XX (n, n), and Y, then B, then E_B (each (m, n), leading
    dimension n) stored from y_off; returns <E, B − T> − <E_B, T>."""
    s = 0.0
    best_off = y_off + m * n
    miss_off = best_off + m * n
    for i in range(m):
        rt = t[t_off + i * t_ld:t_off + i * t_ld + n]
        ry = y[y_off + i * n:y_off + i * n + n]
        rb = y[best_off + i * n:best_off + i * n + n]
        rm = y[miss_off + i * n:miss_off + i * n + n]
        re = e[e_off + i * e_ld:e_off + i * e_ld + n]
        for j in range(n):
            re[j] = ry[j]
        for q in range(n):
            tq = rt[q]
            rx = xx[xx_off + q * xx_ld:xx_off + q * xx_ld + n]
            for j in range(n):
                re[j] -= tq * rx[j]
        for j in range(n):
            s += re[j] * (rb[j] - rt[j]) - rm[j] * rt[j]
    return s


@numba.njit(cache=True, nogil=True)
def execute(fn, ops_i, ops_f, const, st, w, lr, bound_updates, ints, flts, chars, mode=BLOCKS):
    """Run every operation of a plan on one run (state ``st``, weights ``w``).

    Returns the accumulated DOT terms (the loss less its constant) and, with
    ``bound_updates``, a bound on how far any single entry moved under the operations flagged
    to scale by lr: the sum of |alpha| ‖A‖ ‖B‖ (Frobenius norms) over them, as every entry of
    a product is at most the product of the norms; inf when an update is not of that form.
    """
    return _execute_rows(fn, ops_i, ops_f, 0, ops_i.shape[0], const, st, w, lr, bound_updates,
                         ints, flts, chars, mode)


@numba.njit(cache=True, nogil=True)
def _execute_rows(fn, ops_i, ops_f, first, stop, const, st, w, lr, bound_updates, ints, flts,
                  chars, mode):
    """``execute`` for the operations ``first`` .. ``stop`` - 1 of the plan."""
    acc = 0.0
    growth = 0.0
    for o in range(first, stop):
        code = ops_i[o, 0]
        m = ops_i[o, 1]
        n = ops_i[o, 2]
        k = ops_i[o, 3]
        a_src = ops_i[o, 4]
        a_off = ops_i[o, 5]
        a_ld = ops_i[o, 6]
        b_src = ops_i[o, 7]
        b_off = ops_i[o, 8]
        b_ld = ops_i[o, 9]
        c_off = ops_i[o, 11]
        c_ld = ops_i[o, 12]
        alpha = ops_f[o, 0]
        scaled = ops_i[o, 13] != 0
        if scaled:
            alpha *= lr
        beta = ops_f[o, 1]
        a = st if a_src == 0 else (const if a_src == 1 else w)
        b = st if b_src == 0 else (const if b_src == 1 else w)
        c = st if ops_i[o, 10] == 0 else w
        if code <= 3:
            if m > 0 and n > 0 and k > 0:
                n_blk = ops_i[o, 14]
                if mode == WHOLE or n_blk <= 1:
                    _gemm(fn, code >> 1, code & 1, m, n, k, alpha, a[a_off:], a_ld, b[b_off:],
                          b_ld, beta, c[c_off:], c_ld, ints, flts, chars)
                else:
                    _product_in_blocks(fn, code, m, n, k, alpha, a, a_off, a_ld, b, b_off, b_ld,
                                       beta, c, c_off, c_ld, n_blk, mode, ints, flts, chars)
                if scaled and bound_updates:
                    if beta != 1.0:
                        growth = np.inf
                    a_rows, a_cols = (k, m) if code >> 1 else (m, k)
                    b_rows, b_cols = (n, k) if code & 1 else (k, n)
                    growth += abs(alpha) * _norm(a, a_off, a_ld, a_rows, a_cols) \
                        * _norm(b, b_off, b_ld, b_rows, b_cols)
        elif code == AXPBY:
            # C = beta C + alpha A, block by block; A stored transposed when k = 1
            for blk in range(ops_i[o, 14]):
                _scale_add(m, n, k != 0, alpha, a, a_off + blk * ops_i[o, 15], a_ld, beta, c,
                           c_off + blk * ops_i[o, 16], c_ld)
            if scaled and bound_updates:
                if beta != 1.0:
                    growth = np.inf
                rows, cols = (n, m) if k else (m, n)
                for blk in range(ops_i[o, 14]):
                    growth += abs(alpha) * _norm(a, a_off + blk * ops_i[o, 15], a_ld, rows, cols)
        elif code == DOT:  # acc += alpha <A, B>
            acc += alpha * _dot(m, n, a, a_off, a_ld, b, b_off, b_ld)
        else:  # OUTPUT: C = Y − A B, acc += alpha (<C, B − A> − <E_B, A>)
            acc += alpha * _output_block(m, n, a, a_off, a_ld, const, k, b, b_off, b_ld, c,
                                         c_off, c_ld)
    return acc, growth


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _sum_of_squares(w):
    total = 0.0
    for i in range(w.shape[0]):
        total += w[i] * w[i]
    return total


@numba.njit(cache=True, nogil=True)
def _checked_norm(w, max_abs):
    """The norm of w when every w_i is finite and |w_i| <= max_abs, else -1. The norm bounds
    every entry, so one vectorised pass decides nearly always; the exact scan runs only when
    the norm is large (or not finite)."""
    norm = np.sqrt(_sum_of_squares(w))
    if norm <= max_abs and norm < np.inf:
        return norm
    for i in range(w.shape[0]):
        if not (abs(w[i]) <= max_abs and abs(w[i]) < np.inf):
            return -1.0
    return norm


#: relative slack added to the bound on the weights per step: it covers the rounding of the
#: products, the additions and the norms many times over
_SLACK = 1e-6


@numba.njit(cache=True, nogil=True)
def descend_one(fn, ops_i, ops_f, fused, const, st, w, v, layout, lr, momentum, weight_decay,
                n_steps, loss_const, max_abs, update, losses, snap_steps, snaps, mode):
    """``n_steps`` evaluations (and, with ``update``, descent steps) of one run, in place.

    w, v: the run's weights and velocity (v is read and written only with momentum).
    layout = (n_params, g_off, bound_updates, n_loss): the gradient is
    st[g_off:g_off + n_params], and the first n_loss operations of the plan compute the loss
    (they write no weights). losses[s] receives the loss before step s; snaps[j] the weights
    after snap_steps[j] steps (increasing, 1..n_steps). ``fused``: the plan itself applies
    the plain gradient-descent update. Returns -1, or the number k of steps after which the
    state went bad and the run stopped: the loss of the weights after k steps is not finite
    (w and v are then left as they were after k steps: the loss is known before any
    operation updates them), or (with ``update``) a weight after k steps is not finite or
    exceeds ``max_abs`` in magnitude (w holds those weights). Snapshots after k are not
    taken.

    With ``bound_updates`` (plans whose update operands are much smaller than the weights) a
    fused descent does not scan the weights every step: it keeps an upper bound on every
    |w_i| (the norm of w at the start, plus each step's growth bound from ``execute``) and
    scans only when that bound is not below ``max_abs``, so the verdict is the same.
    """
    n_params, g_off, bound_updates = layout[0], layout[1], layout[2] != 0
    n_ops = ops_i.shape[0]
    n_loss = min(layout[3], n_ops)
    ints, flts, chars = _scratch()
    g = st[g_off:g_off + n_params]
    track = fused and update and bound_updates
    bound = np.sqrt(_sum_of_squares(w)) if track else np.nan
    snap = 0
    for s in range(n_steps):
        acc, growth = _execute_rows(fn, ops_i, ops_f, 0, n_loss, const, st, w, lr, track, ints,
                                    flts, chars, mode)
        loss = loss_const + acc
        if loss < 0.0:  # a loss is never negative: below 0 is rounding (NaN stays NaN)
            loss = 0.0
        losses[s] = loss
        if not np.isfinite(loss) and update:
            return s  # stop before the gradient rows: a fused plan would apply the step
        # the gradient; a fused plan applies this step's update itself (ops flagged to scale
        # by lr). An evaluation alone (not update) computes the gradient even when the loss
        # overflowed: it may well be finite, as the samples engine finds it
        acc, growth = _execute_rows(fn, ops_i, ops_f, n_loss, n_ops, const, st, w, lr, track,
                                    ints, flts, chars, mode)
        if not np.isfinite(loss):
            return s
        if update:
            if fused:
                bound = (bound + growth) * (1.0 + _SLACK) if track else np.nan
            # branch-free loops, one per rule, so that they vectorise (plain descent is fused)
            elif momentum == 0.0:
                for i in range(n_params):
                    w[i] -= lr * (g[i] + weight_decay * w[i])
            else:
                for i in range(n_params):
                    step = (g[i] + weight_decay * w[i]) + momentum * v[i]
                    v[i] = step
                    w[i] -= lr * step
            # a finite bound within max_abs settles it; else (NaN included) check the weights
            if not (fused and bound <= max_abs and bound < np.inf):
                bound = _checked_norm(w, max_abs)
                if bound < 0.0:
                    return s + 1
        if snap < snap_steps.shape[0] and snap_steps[snap] == s + 1:
            row = snaps[snap]
            for i in range(n_params):  # a loop: slice assignment costs seconds of compiling
                row[i] = w[i]
            snap += 1
    return -1


@numba.njit(cache=True, nogil=True)
def descend_serial(fn, ops_i, ops_f, fused, const, state, W, V, layout, lr, momentum,
                   weight_decay, n_steps, loss_const, max_abs, update, losses, status,
                   snap_steps, snaps, n_lanes, mode):
    # n_lanes is unused: the signature is descend_parallel's
    for r in range(state.shape[0]):
        status[r] = descend_one(fn, ops_i, ops_f, fused, const, state[r], W[r], V[r], layout,
                                lr[r], momentum, weight_decay, n_steps, loss_const, max_abs,
                                update, losses[r], snap_steps, snaps[r], mode)


@numba.njit(cache=True, nogil=True, parallel=True)
def descend_parallel(fn, ops_i, ops_f, fused, const, state, W, V, layout, lr, momentum,
                     weight_decay, n_steps, loss_const, max_abs, update, losses, status,
                     snap_steps, snaps, n_lanes, mode):
    # (mode: BLOCKS; the lanes are the threads.) The runs are dealt out in turn to
    # ``n_lanes`` lanes, one per thread (lane t takes runs t, t + n_lanes, ...), not in
    # contiguous blocks: batches are often ordered by learning rate or scale, and runs that
    # stop early (diverged) would otherwise all fall to one thread, leaving it idle
    n_runs = state.shape[0]
    for lane in numba.prange(n_lanes):
        for r in range(lane, n_runs, n_lanes):
            status[r] = descend_one(fn, ops_i, ops_f, fused, const, state[r], W[r], V[r],
                                    layout, lr[r], momentum, weight_decay, n_steps, loss_const,
                                    max_abs, update, losses[r], snap_steps, snaps[r], BLOCKS)
