"""numba executor for compiled gradient plans (private).

A plan is a table of small dense operations on one flat float64 state vector per run (weights,
velocity, gradient and workspace) and one shared constant vector (gated moments). Every matrix
product goes to BLAS ``dgemm`` through scipy's Cython BLAS, called from numba with pointers at
offsets into the flat vectors, so no operation allocates and a whole descent runs without
returning to Python. Matrices are row-major with explicit leading dimensions.

Columns of ``ops_i``: opcode, m, n, k, a_src, a_off, a_ld, b_src, b_off, b_ld, c_off, c_ld,
scale_by_lr (src 0 = the run's state, 1 = the constants; C always lives in the state; with
scale_by_lr alpha is multiplied by the run's learning rate). ``ops_f``: alpha, beta.
"""

from __future__ import annotations

import ctypes

import numba
import numpy as np

GEMM_NN, GEMM_NT, GEMM_TN, AXPBY, DOT = 0, 1, 2, 3, 4
N_INT_COLUMNS = 13

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
def _gemm(fn, code, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ints, flts, chars):
    # row-major C(m, n) = beta C + alpha op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ
    ints[0] = n
    ints[1] = m
    ints[2] = k
    ints[3] = ldb
    ints[4] = lda
    ints[5] = ldc
    flts[0] = alpha
    flts[1] = beta
    ta = 0  # transposition flag passed for B (first operand of the column-major call)
    tb = 0
    if code == 1:  # A Bᵀ
        ta = 1
    elif code == 2:  # Aᵀ B
        tb = 1
    fn(chars[ta:].ctypes, chars[tb:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
       flts[0:].ctypes, b.ctypes, ints[3:].ctypes, a.ctypes, ints[4:].ctypes, flts[1:].ctypes,
       c.ctypes, ints[5:].ctypes)


@numba.njit(cache=True, nogil=True)
def execute(fn, ops_i, ops_f, const, st, lr, ints, flts, chars):
    """Run every operation of a plan on one state vector; return the accumulated DOT terms."""
    acc = 0.0
    for o in range(ops_i.shape[0]):
        code = ops_i[o, 0]
        m = ops_i[o, 1]
        n = ops_i[o, 2]
        k = ops_i[o, 3]
        a_off = ops_i[o, 5]
        a_ld = ops_i[o, 6]
        b_off = ops_i[o, 8]
        b_ld = ops_i[o, 9]
        c_off = ops_i[o, 10]
        c_ld = ops_i[o, 11]
        alpha = ops_f[o, 0]
        if ops_i[o, 12] != 0:
            alpha *= lr
        beta = ops_f[o, 1]
        a = st if ops_i[o, 4] == 0 else const
        b = st if ops_i[o, 7] == 0 else const
        if code <= 2:
            if m > 0 and n > 0 and k > 0:
                _gemm(fn, code, m, n, k, alpha, a[a_off:], a_ld, b[b_off:], b_ld, beta,
                      st[c_off:], c_ld, ints, flts, chars)
        elif code == 3:  # C = beta C + alpha A
            for i in range(m):
                ra = a_off + i * a_ld
                rc = c_off + i * c_ld
                if beta == 0.0:
                    for j in range(n):
                        st[rc + j] = alpha * a[ra + j]
                else:
                    for j in range(n):
                        st[rc + j] = beta * st[rc + j] + alpha * a[ra + j]
        else:  # acc += alpha <A, B>
            s = 0.0
            for i in range(m):
                ra = a_off + i * a_ld
                rb = b_off + i * b_ld
                for j in range(n):
                    s += a[ra + j] * b[rb + j]
            acc += alpha * s
    return acc


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _sum_of_squares(w):
    total = 0.0
    for i in range(w.shape[0]):
        total += w[i] * w[i]
    return total


@numba.njit(cache=True, nogil=True)
def _within(w, max_abs):
    """True when every |w_i| <= max_abs; False for NaN. The norm bounds every entry, so one
    vectorised pass decides nearly always; the exact scan runs only when the norm is large."""
    total = _sum_of_squares(w)
    if total == total and np.sqrt(total) <= max_abs:
        return True
    for i in range(w.shape[0]):
        if not (abs(w[i]) <= max_abs):
            return False
    return True


@numba.njit(cache=True, nogil=True)
def descend_one(fn, ops_i, ops_f, fused, const, st, layout, lr, momentum, weight_decay, n_steps,
                loss_const, max_abs, update, losses, snap_steps, snaps):
    """``n_steps`` evaluations (and, with ``update``, descent steps) of one run, in place.

    layout = (n_params, w_off, v_off, g_off, zero_start, zero_end). losses[s] receives the loss
    before step s; snaps[j] the weights after snap_steps[j] steps (increasing, 1..n_steps).
    ``fused``: the plan itself applies the plain gradient-descent update (no update pass).
    Returns -1, or the number k of steps after which the state went bad and the run stopped:
    the loss of the weights after k steps is not finite, or (with ``update``) a weight after k
    steps is not finite or exceeds ``max_abs`` in magnitude. Snapshots after k are not taken.
    """
    n_params, w_off, v_off, g_off, z0, z1 = (layout[0], layout[1], layout[2], layout[3],
                                             layout[4], layout[5])
    ints = np.empty(8, np.int32)
    flts = np.empty(2)
    chars = np.empty(2, np.uint8)
    chars[0] = 78  # 'N'
    chars[1] = 84  # 'T'
    w = st[w_off:w_off + n_params]
    v = st[v_off:v_off + n_params]
    g = st[g_off:g_off + n_params]
    snap = 0
    for s in range(n_steps):
        for i in range(z0, z1):
            st[i] = 0.0
        # a fused plan applies this step's update itself (ops flagged to scale by lr)
        loss = loss_const + execute(fn, ops_i, ops_f, const, st, lr, ints, flts, chars)
        losses[s] = loss
        if not np.isfinite(loss):
            return s
        # branch-free loops, one per rule, so that they vectorise (plain descent is fused)
        if fused or not update:
            pass
        elif momentum == 0.0:
            for i in range(n_params):
                w[i] -= lr * (g[i] + weight_decay * w[i])
        else:
            for i in range(n_params):
                step = (g[i] + weight_decay * w[i]) + momentum * v[i]
                v[i] = step
                w[i] -= lr * step
        if update and not _within(w, max_abs):
            return s + 1
        if snap < snap_steps.shape[0] and snap_steps[snap] == s + 1:
            snaps[snap, :] = w
            snap += 1
    return -1


@numba.njit(cache=True, nogil=True)
def descend_serial(fn, ops_i, ops_f, fused, const, state, layout, lr, momentum, weight_decay,
                   n_steps, loss_const, max_abs, update, losses, status, snap_steps, snaps):
    for r in range(state.shape[0]):
        status[r] = descend_one(fn, ops_i, ops_f, fused, const, state[r], layout, lr[r], momentum,
                                weight_decay, n_steps, loss_const, max_abs, update, losses[r],
                                snap_steps, snaps[r])


@numba.njit(cache=True, nogil=True, parallel=True)
def descend_parallel(fn, ops_i, ops_f, fused, const, state, layout, lr, momentum, weight_decay,
                     n_steps, loss_const, max_abs, update, losses, status, snap_steps, snaps):
    for r in numba.prange(state.shape[0]):
        status[r] = descend_one(fn, ops_i, ops_f, fused, const, state[r], layout, lr[r], momentum,
                                weight_decay, n_steps, loss_const, max_abs, update, losses[r],
                                snap_steps, snaps[r])
