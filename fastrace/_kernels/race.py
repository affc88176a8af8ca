"""numba kernels of race systems: right-hand side, Jacobian, loss and integrators.

Private module.  Every algorithm mirrors csrc/race.c operation for operation (same formulas,
same order of floating-point operations, same step control), so numba and C trajectories agree
to round-off; change both together.  Nothing compiles at import: each kernel compiles on its
first call (``cache=True`` keeps the machine code on disk).

Conventions (see fastrace.system.RaceSystem and csrc/race.h):
- structure: the CSR arrays path_ptr, path_edges, target_ptr, target_paths packed into one
  int64 array by :func:`pack_structure`;
- batch of n_sys systems: b or b0 (n_sys, n_edges); s (rows, n_paths), d (rows, nnz_t),
  rate (rows, n_edges), where rows divides n_sys and system i uses row i % rows;
- outputs are system-major: (n_sys, n_out, n_edges), each system one contiguous block;
- status codes: 0 ok, 1 max steps, 2 step too small, 3 non-finite, 4 bad input.

Integrator batch kernels write into output arrays the caller allocates (numpy's allocator
backs large arrays with huge pages; numba's does not, and page faults then cost as much as the
integration): out (n_sys, n_out, n_edges), event_times (n_sys, n_paths), status (n_sys,) and
stats (n_sys, 3) int64.  Batch kernels loop over systems with ``numba.prange`` in ``n_chunks``
chunks (an argument: a few per thread balance uneven systems); each chunk allocates its scratch
once, and every system has its own step size and error control.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_OPTS = dict(cache=True, nogil=True, error_model="numpy")

OK, MAX_STEPS, STEP_TOO_SMALL, NONFINITE, BAD_INPUT = 0, 1, 2, 3, 4
UROUND = float(np.finfo(np.float64).eps)


# ------------------------------------------------------------------------------------------
# packed structure and per-system parameters
#
# numba passes every array argument as several machine words, so the hot functions take the
# structure packed in one int64 array ``st`` and the parameters of one system in one float64
# array ``par``:
#   st  = [n_paths, L (longest path), nnz, nnz_t, path_ptr (n_paths+1), path_edges (nnz),
#          target_ptr (n_paths+1), target_paths (nnz_t)]
#   par = [s (n_paths), d (nnz_t), rate (n_edges)]
# Scratch of rhs_one / jacobian_one / loss_one (offsets into one work array, no views):
#   pi (n_paths), r (n_paths), pre (L+1), suf (L+1), then for the Jacobian dpi (nnz) and
#   gradr (n_edges).

HEAD = 4


def pack_structure(path_ptr, path_edges, target_ptr, target_paths) -> np.ndarray:
    """The packed int64 structure array ``st`` of a race system."""
    path_ptr = np.asarray(path_ptr, dtype=np.int64)
    lengths = np.diff(path_ptr)
    head = [path_ptr.size - 1, int(lengths.max()) if lengths.size else 0, len(path_edges),
            len(target_paths)]
    return np.concatenate([np.array(head, dtype=np.int64), path_ptr,
                           np.asarray(path_edges, dtype=np.int64),
                           np.asarray(target_ptr, dtype=np.int64),
                           np.asarray(target_paths, dtype=np.int64)])


@njit(**_OPTS)
def work_size(st, n_edges):
    return 2 * st[0] + 2 * (st[1] + 1) + st[2] + n_edges


@njit(**_OPTS)
def _fill_par(par, s, d, rate):
    n_paths = s.shape[0]
    nnz_t = d.shape[0]
    for p in range(n_paths):
        par[p] = s[p]
    for k in range(nnz_t):
        par[n_paths + k] = d[k]
    for e in range(rate.shape[0]):
        par[n_paths + nnz_t + e] = rate[e]


# ------------------------------------------------------------------------------------------
# right-hand side, Jacobian, loss of one system


@njit(**_OPTS)
def path_strengths_one(st, b, pi):
    n_paths = st[0]
    pp = HEAD
    pe = pp + n_paths + 1
    for p in range(n_paths):
        x = 1.0
        for k in range(st[pp + p], st[pp + p + 1]):
            x *= b[st[pe + k]]
        pi[p] = x


# inline="always": numba does not inline calls between its compiled functions, and a call
# passing five arrays cost ~30% of a DOPRI5 step on small systems.  The price is compile time
# (every call site gets a copy).
@njit(inline="always", **_OPTS)
def rhs_one(st, par, b, db, work):
    # one flat function on purpose: this is the hot path.  Scratch: pi (n_paths), r (n_paths),
    # pre (nnz): pre[k] = product of the edges of k's path before position k (race.c)
    n = b.shape[0]
    n_paths = st[0]
    pp = HEAD
    pe = pp + n_paths + 1
    tp = pe + st[2]
    tt = tp + n_paths + 1
    o_d = n_paths
    o_rate = n_paths + st[3]
    o_r = n_paths
    o_pre = 2 * n_paths
    for p in range(n_paths):
        x = 1.0
        for k in range(st[pp + p], st[pp + p + 1]):
            work[o_pre + k] = x
            x *= b[st[pe + k]]
        work[p] = x
    for p in range(n_paths):
        acc = 0.0
        for k in range(st[tp + p], st[tp + p + 1]):
            acc += par[o_d + k] * work[st[tt + k]]
        work[o_r + p] = par[p] - acc
    for e in range(n):
        db[e] = 0.0
    # the rate multiplies before r_p is known: off the stage-to-stage critical path (race.c)
    for p in range(n_paths):
        suf = 1.0
        rp = work[o_r + p]
        for k in range(st[pp + p + 1] - 1, st[pp + p] - 1, -1):
            e = st[pe + k]
            db[e] += ((work[o_pre + k] * suf) * par[o_rate + e]) * rp
            suf = b[e] * suf


@njit(**_OPTS)
def jacobian_one(st, par, b, jac, work):
    n = b.shape[0]
    n_paths = st[0]
    L = st[1]
    pp = HEAD
    pe = pp + n_paths + 1
    tp = pe + st[2]
    tt = tp + n_paths + 1
    o_d = n_paths
    o_rate = n_paths + st[3]
    o_r = n_paths
    o_pre = 2 * n_paths
    o_suf = o_pre + L + 1
    o_dpi = o_suf + L + 1
    o_gradr = o_dpi + st[2]

    # dpi[path_ptr[j] + m] = d pi_j / d b_(m-th edge of j), prefix times suffix product
    for j in range(n_paths):
        lo = st[pp + j]
        length = st[pp + j + 1] - lo
        work[o_pre] = 1.0
        for k in range(length):
            work[o_pre + k + 1] = work[o_pre + k] * b[st[pe + lo + k]]
        work[o_suf + length] = 1.0
        for k in range(length - 1, -1, -1):
            work[o_suf + k] = b[st[pe + lo + k]] * work[o_suf + k + 1]
        for m in range(length):
            work[o_dpi + lo + m] = work[o_pre + m] * work[o_suf + m + 1]
        work[j] = work[o_pre + length]
    for p in range(n_paths):
        acc = 0.0
        for k in range(st[tp + p], st[tp + p + 1]):
            acc += par[o_d + k] * work[st[tt + k]]
        work[o_r + p] = par[p] - acc
    for e in range(n):
        for f in range(n):
            jac[e, f] = 0.0

    for p in range(n_paths):
        lo = st[pp + p]
        length = st[pp + p + 1] - lo
        work[o_pre] = 1.0
        for k in range(length):
            work[o_pre + k + 1] = work[o_pre + k] * b[st[pe + lo + k]]
        work[o_suf + length] = 1.0
        for k in range(length - 1, -1, -1):
            work[o_suf + k] = b[st[pe + lo + k]] * work[o_suf + k + 1]
        r = work[o_r + p]
        # r_p times the second derivative of pi_p: products without edges k and m
        for k in range(length):
            mid = 1.0
            ek = st[pe + lo + k]
            for m in range(k + 1, length):
                em = st[pe + lo + m]
                v = work[o_pre + k] * mid * work[o_suf + m + 1] * r
                jac[ek, em] += v
                jac[em, ek] += v
                mid *= b[em]
        # (d pi_p / d b_e) times d r_p / d b_f
        for f in range(n):
            work[o_gradr + f] = 0.0
        for k in range(st[tp + p], st[tp + p + 1]):
            j = st[tt + k]
            for m in range(st[pp + j], st[pp + j + 1]):
                work[o_gradr + st[pe + m]] -= par[o_d + k] * work[o_dpi + m]
        for k in range(length):
            ok = work[o_dpi + lo + k]
            ek = st[pe + lo + k]
            for f in range(n):
                jac[ek, f] += ok * work[o_gradr + f]
    for e in range(n):
        for f in range(n):
            jac[e, f] *= par[o_rate + e]


@njit(**_OPTS)
def loss_one(st, par, b, work):
    n_paths = st[0]
    tp = HEAD + n_paths + 1 + st[2]
    tt = tp + n_paths + 1
    path_strengths_one(st, b, work)
    loss = 0.0
    for p in range(n_paths):
        acc = 0.0
        for k in range(st[tp + p], st[tp + p + 1]):
            acc += par[n_paths + k] * work[st[tt + k]]
        loss += (0.5 * acc - par[p]) * work[p]
    return loss


# ------------------------------------------------------------------------------------------
# batches of rhs / Jacobian / loss / path strengths


@njit(**_OPTS)
def _chunk(c, n_chunks, n_sys):
    return (c * n_sys) // n_chunks, ((c + 1) * n_sys) // n_chunks


@njit(parallel=True, **_OPTS)
def rhs_batch(st, b, s, d, rate, n_chunks):
    n_sys, n = b.shape
    out = np.empty((n_sys, n))
    n_chunks = max(1, min(n_sys, n_chunks))
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n_sys)
        work = np.empty(work_size(st, n))
        par = np.empty(s.shape[1] + d.shape[1] + n)
        for i in range(lo, hi):
            _fill_par(par, s[i % s.shape[0]], d[i % d.shape[0]], rate[i % rate.shape[0]])
            rhs_one(st, par, b[i], out[i], work)
    return out


@njit(parallel=True, **_OPTS)
def jacobian_batch(st, b, s, d, rate, n_chunks):
    n_sys, n = b.shape
    out = np.empty((n_sys, n, n))
    n_chunks = max(1, min(n_sys, n_chunks))
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n_sys)
        work = np.empty(work_size(st, n))
        par = np.empty(s.shape[1] + d.shape[1] + n)
        for i in range(lo, hi):
            _fill_par(par, s[i % s.shape[0]], d[i % d.shape[0]], rate[i % rate.shape[0]])
            jacobian_one(st, par, b[i], out[i], work)
    return out


@njit(parallel=True, **_OPTS)
def loss_batch(st, b, s, d, n_chunks):
    n_sys, n = b.shape
    out = np.empty(n_sys)
    ones = np.ones(n)
    n_chunks = max(1, min(n_sys, n_chunks))
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n_sys)
        work = np.empty(work_size(st, n))
        par = np.empty(s.shape[1] + d.shape[1] + n)
        for i in range(lo, hi):
            _fill_par(par, s[i % s.shape[0]], d[i % d.shape[0]], ones)
            out[i] = loss_one(st, par, b[i], work)
    return out


@njit(parallel=True, **_OPTS)
def path_strengths_batch(st, b):
    n_sys = b.shape[0]
    out = np.empty((n_sys, st[0]))
    for i in prange(n_sys):
        path_strengths_one(st, b[i], out[i])
    return out


# ------------------------------------------------------------------------------------------
# helpers shared by the integrators


@njit(**_OPTS)
def _all_finite(x):
    for i in range(x.shape[0]):
        if not np.isfinite(x[i]):
            return False
    return True


@njit(inline="always", **_OPTS)
def _error_norm(err, y, ynew, rtol, atol):
    n = err.shape[0]
    acc = 0.0
    for i in range(n):
        sk = atol + rtol * max(abs(y[i]), abs(ynew[i]))
        q = err[i] / sk
        acc += q * q
    return math.sqrt(acc / n)


@njit(**_OPTS)
def _initial_step(st, par, y0, f0, hmax, rtol, atol, order, ytmp, f1, work):
    """Hairer's starting step (HINIT of DOPRI5/RADAU), as race.c initial_step."""
    n = y0.shape[0]
    dnf = 0.0
    dny = 0.0
    for i in range(n):
        sk = atol + rtol * abs(y0[i])
        dnf += (f0[i] / sk) * (f0[i] / sk)
        dny += (y0[i] / sk) * (y0[i] / sk)
    if dnf <= 1e-10 or dny <= 1e-10:
        h = 1e-6
    else:
        h = math.sqrt(dny / dnf) * 0.01
    h = min(h, hmax)
    for i in range(n):
        ytmp[i] = y0[i] + h * f0[i]
    rhs_one(st, par, ytmp, f1, work)
    der2 = 0.0
    for i in range(n):
        sk = atol + rtol * abs(y0[i])
        der2 += ((f1[i] - f0[i]) / sk) * ((f1[i] - f0[i]) / sk)
    der2 = math.sqrt(der2) / h
    der12 = max(abs(der2), math.sqrt(dnf))
    if der12 <= 1e-15:
        h1 = max(1e-6, abs(h) * 1e-3)
    else:
        h1 = (0.01 / der12) ** (1.0 / order)
    return min(min(100.0 * abs(h), h1), hmax)


@njit(**_OPTS)
def _crosses(g_old, g_new):
    return (g_old < 0.0 and g_new >= 0.0) or (g_old > 0.0 and g_new <= 0.0)


@njit(**_OPTS)
def _events_start(st, thresholds, y0, t0, pi_old, event_times):
    path_strengths_one(st, y0, pi_old)
    for p in range(pi_old.shape[0]):
        if (np.isnan(event_times[p]) and not np.isnan(thresholds[p])
                and pi_old[p] - thresholds[p] == 0.0):
            event_times[p] = t0


@njit(**_OPTS)
def _any_crossing(thresholds, pi_old, pi_new, event_times):
    for p in range(pi_old.shape[0]):
        thr = thresholds[p]
        if (not np.isnan(thr) and np.isnan(event_times[p])
                and _crosses(pi_old[p] - thr, pi_new[p] - thr)):
            return True
    return False


@njit(**_OPTS)
def _options_ok(t0, t_end, rtol, atol, max_steps):
    return (t_end > t0 and rtol > 0.0 and atol > 0.0 and np.isfinite(t0) and np.isfinite(t_end)
            and max_steps >= 1)


@njit(**_OPTS)
def _run_begin(stats, event_times):
    stats[0] = 0
    stats[1] = 0
    stats[2] = 0
    for p in range(event_times.shape[0]):
        event_times[p] = np.nan


@njit(**_OPTS)
def _run_finish(out, k_out):
    for k in range(k_out, out.shape[0]):
        for i in range(out.shape[1]):
            out[k, i] = np.nan


# ------------------------------------------------------------------------------------------
# gradient descent


@njit(**_OPTS)
def gd_one(st, par, b0, lr, record_steps, out, stats, work):
    """race_gd_map: out (n_record, n_edges); stats [steps, 0, rhs evals]; returns status."""
    n = b0.shape[0]
    n_record = record_steps.shape[0]
    b = work[:n]
    db = work[n:2 * n]
    rwork = work[2 * n:]
    stats[0] = 0
    stats[1] = 0
    stats[2] = 0
    if n_record < 1:
        return OK
    last = record_steps[n_record - 1]
    status = OK
    step = 0
    k = 0
    for e in range(n):
        b[e] = b0[e]
    if not _all_finite(b):
        status = NONFINITE
    while status == OK:
        while k < n_record and record_steps[k] == step:
            for e in range(n):
                out[k, e] = b[e]
            k += 1
        if step >= last:
            break
        rhs_one(st, par, b, db, rwork)
        for e in range(n):
            b[e] = b[e] + lr * db[e]
        step += 1
        stats[2] += 1
        if not _all_finite(b):
            status = NONFINITE
    stats[0] = step
    while k < n_record:
        for e in range(n):
            out[k, e] = np.nan
        k += 1
    return status


@njit(parallel=True, **_OPTS)
def gd_batch(st, b0, s, d, rate, lr, record_steps, n_chunks, out, status, stats):
    n_sys, n = b0.shape
    n_chunks = max(1, min(n_sys, n_chunks))
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n_sys)
        work = np.empty(2 * n + work_size(st, n))
        par = np.empty(s.shape[1] + d.shape[1] + n)
        for i in range(lo, hi):
            _fill_par(par, s[i % s.shape[0]], d[i % d.shape[0]], rate[i % rate.shape[0]])
            status[i] = gd_one(st, par, b0[i], lr, record_steps, out[i], stats[i], work)

# ------------------------------------------------------------------------------------------
# Dormand-Prince 5(4): coefficients and step control as race.c (Hairer's DOPRI5)

A21 = 1.0 / 5.0
A31, A32 = 3.0 / 40.0, 9.0 / 40.0
A41, A42, A43 = 44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0
A51, A52, A53, A54 = 19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0
A61, A62, A63 = 9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0
A64, A65 = 49.0 / 176.0, -5103.0 / 18656.0
A71, A73, A74 = 35.0 / 384.0, 500.0 / 1113.0, 125.0 / 192.0
A75, A76 = -2187.0 / 6784.0, 11.0 / 84.0
E1, E3, E4 = 71.0 / 57600.0, -71.0 / 16695.0, 71.0 / 1920.0
E5, E6, E7 = -17253.0 / 339200.0, 22.0 / 525.0, -1.0 / 40.0
D1, D3 = -12715105075.0 / 11282082432.0, 87487479700.0 / 32700410799.0
D4, D5 = -10690763975.0 / 1880347072.0, 701980252875.0 / 199316789632.0
D6, D7 = -1453857185.0 / 822651844.0, 69997945.0 / 29380423.0
DP_SAFE, DP_BETA, DP_EXPO1, DP_FACC1, DP_FACC2 = 0.9, 0.04, 0.17, 5.0, 0.1
DP_LOG_FACMIN = -9.210340371976182  # log(1e-4), race.c
STIFF_CONFIRMATIONS = 1  # stiffness test firings that switch auto to RODAS3 (race.c)


@njit(**_OPTS)
def _theta(tk, t, h):
    """(tk - t) / h as race.c's thetas computes it: times the reciprocal of h, or divided by h
    when that reciprocal overflows (h below ~5.6e-309)."""
    hinv = 1.0 / h
    if math.isfinite(hinv):
        return (tk - t) * hinv
    return (tk - t) / h


@njit(**_OPTS)
def _dp_dense_edge(y, rc2, rc3, rc4, rc5, e, theta):
    theta1 = 1.0 - theta
    return y[e] + theta * (rc2[e] + theta1 * (rc3[e] + theta * (rc4[e] + theta1 * rc5[e])))


@njit(**_OPTS)
def _dp_locate_events(st, thresholds, pi_old, pi_new, t, h, y, rc2, rc3,
                      rc4, rc5, event_times):
    pe = HEAD + st[0] + 1
    for p in range(pi_old.shape[0]):
        thr = thresholds[p]
        if np.isnan(thr) or not np.isnan(event_times[p]):
            continue
        glo = pi_old[p] - thr
        if not _crosses(glo, pi_new[p] - thr):
            continue
        lo = 0.0
        hi = 1.0
        it = 0
        while it < 64 and hi - lo > 1e-15:
            mid = 0.5 * (lo + hi)
            x = 1.0
            for k in range(st[HEAD + p], st[HEAD + p + 1]):
                x *= _dp_dense_edge(y, rc2, rc3, rc4, rc5, st[pe + k], mid)
            gm = x - thr
            if _crosses(glo, gm):
                hi = mid
            else:
                lo = mid
                glo = gm
            it += 1
        event_times[p] = t + hi * h


@njit(**_OPTS)
def _dopri5_core(st, par, b0, t0, t_end, t_out, rtol, atol, h0, hmax_opt, max_steps,
                 thresholds, events, out, event_times, stats, work, detect_stiff):
    """dopri5_core of race.c: adds to stats, writes outputs and pending events; y is
    work[:n] throughout.  Returns (status, outputs written, t, h, stopped because stiff)."""
    n = b0.shape[0]
    n_paths = st[0]
    n_out = t_out.shape[0]
    y = work[0:n]
    k1 = work[n:2 * n]
    k2 = work[2 * n:3 * n]
    k3 = work[3 * n:4 * n]
    k4 = work[4 * n:5 * n]
    k5 = work[5 * n:6 * n]
    k6 = work[6 * n:7 * n]
    k7 = work[7 * n:8 * n]
    ytmp = work[8 * n:9 * n]
    ynew = work[9 * n:10 * n]
    rc2 = work[10 * n:11 * n]
    rc3 = work[11 * n:12 * n]
    rc4 = work[12 * n:13 * n]
    rc5 = work[13 * n:14 * n]
    errv = work[14 * n:15 * n]
    pi_old = work[15 * n:15 * n + n_paths]
    pi_new = work[15 * n + n_paths:15 * n + 2 * n_paths]
    rwork = work[15 * n + 2 * n_paths:]

    k_out = 0
    status = OK
    t = t0
    h = 0.0
    stiff = False
    for i in range(n):
        y[i] = b0[i]
    rhs_one(st, par, y, k1, rwork)
    stats[2] += 1
    if not _all_finite(y) or not _all_finite(k1):
        status = NONFINITE
    if status == OK:
        if events:
            _events_start(st, thresholds, y, t0, pi_old, event_times)
        while k_out < n_out and t_out[k_out] <= t0:
            for i in range(n):
                out[k_out, i] = y[i]
            k_out += 1
        hmax = hmax_opt if hmax_opt > 0.0 else t_end - t0
        if h0 > 0.0:
            h = min(h0, hmax)
        else:
            h = _initial_step(st, par, y, k1, hmax, rtol, atol, 5.0, ytmp, k2, rwork)
            stats[2] += 1
        lfacold = DP_LOG_FACMIN
        reject = False
        last = False
        nonfinite = False
        nstep = 0
        iasti = 0
        nonsti = 0
        while True:
            if nstep >= max_steps:
                status = MAX_STEPS
                break
            if 0.1 * abs(h) <= abs(t) * UROUND or not (h > 0.0):
                status = NONFINITE if nonfinite else STEP_TOO_SMALL
                break
            if t + 1.01 * h - t_end > 0.0:
                h = t_end - t
                last = True
            nstep += 1

            # each stage adds its newest slope last (race.c): (y + h (older)) + (h a_ij) k_j
            for i in range(n):
                ytmp[i] = y[i] + (h * A21) * k1[i]
            rhs_one(st, par, ytmp, k2, rwork)
            for i in range(n):
                ytmp[i] = (y[i] + h * (A31 * k1[i])) + (h * A32) * k2[i]
            rhs_one(st, par, ytmp, k3, rwork)
            for i in range(n):
                ytmp[i] = (y[i] + h * (A41 * k1[i] + A42 * k2[i])) + (h * A43) * k3[i]
            rhs_one(st, par, ytmp, k4, rwork)
            for i in range(n):
                ytmp[i] = ((y[i] + h * (A51 * k1[i] + A52 * k2[i] + A53 * k3[i]))
                           + (h * A54) * k4[i])
            rhs_one(st, par, ytmp, k5, rwork)
            for i in range(n):
                ytmp[i] = ((y[i] + h * (A61 * k1[i] + A62 * k2[i] + A63 * k3[i] + A64 * k4[i]))
                           + (h * A65) * k5[i])
            rhs_one(st, par, ytmp, k6, rwork)
            for i in range(n):
                ynew[i] = ((y[i] + h * (A71 * k1[i] + A73 * k3[i] + A74 * k4[i] + A75 * k5[i]))
                           + (h * A76) * k6[i])
            rhs_one(st, par, ynew, k7, rwork)
            stats[2] += 6
            for i in range(n):
                errv[i] = h * (E1 * k1[i] + E3 * k3[i] + E4 * k4[i] + E5 * k5[i] + E6 * k6[i]
                               + E7 * k7[i])
            err = _error_norm(errv, y, ynew, rtol, atol)

            if not (err <= 1.7976931348623157e308):  # inf or NaN: shrink hard
                h = h * 0.1
                reject = True
                last = False
                nonfinite = True
                stats[1] += 1
                continue
            lerr = math.log(err)
            fac = math.exp(DP_EXPO1 * lerr - DP_BETA * lfacold)
            fac = max(DP_FACC2, min(DP_FACC1, fac / DP_SAFE))
            hnew = h / fac
            if err <= 1.0:
                lfacold = max(lerr, DP_LOG_FACMIN)
                stats[0] += 1
                tnew = t_end if last else t + h
                if events:
                    path_strengths_one(st, ynew, pi_new)
                need_dense = (k_out < n_out and t_out[k_out] < tnew) or (
                    events and _any_crossing(thresholds, pi_old, pi_new, event_times))
                if need_dense:
                    for i in range(n):
                        ydiff = ynew[i] - y[i]
                        bspl = h * k1[i] - ydiff
                        rc2[i] = ydiff
                        rc3[i] = bspl
                        rc4[i] = ydiff - h * k7[i] - bspl
                        rc5[i] = h * (D1 * k1[i] + D3 * k3[i] + D4 * k4[i] + D5 * k5[i]
                                      + D6 * k6[i] + D7 * k7[i])
                while k_out < n_out and t_out[k_out] <= tnew:
                    if t_out[k_out] == tnew:
                        for i in range(n):
                            out[k_out, i] = ynew[i]
                    else:
                        theta = _theta(t_out[k_out], t, h)
                        for i in range(n):
                            out[k_out, i] = _dp_dense_edge(y, rc2, rc3, rc4, rc5, i, theta)
                    k_out += 1
                if events:
                    if need_dense:
                        _dp_locate_events(st, thresholds, pi_old, pi_new, t, h,
                                          y, rc2, rc3, rc4, rc5, event_times)
                    for p in range(n_paths):
                        pi_old[p] = pi_new[p]
                if detect_stiff:
                    # Hairer's test; ytmp still holds the point of stage 6 and k6 its slope
                    stnum = 0.0
                    stden = 0.0
                    for i in range(n):
                        stnum += (k7[i] - k6[i]) * (k7[i] - k6[i])
                        stden += (ynew[i] - ytmp[i]) * (ynew[i] - ytmp[i])
                    if stden > 0.0 and h * math.sqrt(stnum / stden) > 3.25:
                        nonsti = 0
                        iasti += 1
                    else:
                        nonsti += 1
                        if nonsti == 6:
                            iasti = 0
                for i in range(n):
                    y[i] = ynew[i]
                    k1[i] = k7[i]
                t = tnew
                if last:
                    break
                if abs(hnew) > hmax:
                    hnew = hmax
                if reject:
                    hnew = min(abs(hnew), abs(h))
                reject = False
                nonfinite = False
                if iasti >= STIFF_CONFIRMATIONS:
                    stiff = True
                    h = hnew
                    break
            else:
                hnew = h / min(DP_FACC1, math.exp(DP_EXPO1 * lerr) / DP_SAFE)
                reject = True
                last = False
                stats[1] += 1
            h = hnew
    return status, k_out, t, h, stiff


# ------------------------------------------------------------------------------------------
# dense LU with partial pivoting, as race.c



@njit(**_OPTS)
def lu_factor(a, piv):
    """P a = L U in place; returns 0, or 1 when singular."""
    n = a.shape[0]
    for k in range(n):
        p = k
        amax = abs(a[k, k])
        for i in range(k + 1, n):
            if abs(a[i, k]) > amax:
                amax = abs(a[i, k])
                p = i
        piv[k] = p
        if not (amax > 0.0) or not np.isfinite(amax):
            return 1
        if p != k:
            for j in range(n):
                tmp = a[k, j]
                a[k, j] = a[p, j]
                a[p, j] = tmp
        for i in range(k + 1, n):
            lik = a[i, k] / a[k, k]
            a[i, k] = lik
            for j in range(k + 1, n):
                a[i, j] -= lik * a[k, j]
    return 0


@njit(**_OPTS)
def lu_solve(a, piv, b):
    n = a.shape[0]
    for k in range(n):
        if piv[k] != k:
            tmp = b[k]
            b[k] = b[piv[k]]
            b[piv[k]] = tmp
    for i in range(1, n):
        for j in range(i):
            b[i] -= a[i, j] * b[j]
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, n):
            b[i] -= a[i, j] * b[j]
        b[i] = b[i] / a[i, i]


# ------------------------------------------------------------------------------------------
# RODAS3 (coefficients of Sandu et al., Atmos. Environ. 31 (1997) 3459, as in race.c)

RO_GAMMA = 0.5
RO_C21, RO_C31, RO_C32, RO_C41, RO_C42, RO_C43 = 4.0, 1.0, -1.0, 1.0, -1.0, -8.0 / 3.0
RO_SAFE, RO_FACMIN, RO_FACMAX = 0.9, 0.2, 6.0
RO_DENSE = 4.0 / 27.0


@njit(**_OPTS)
def _hermite_edge(y, c1, c2, c3, e, theta):
    """The cubic Hermite interpolant in power form (race.c hermite_edge)."""
    return y[e] + theta * (c1[e] + theta * (c2[e] + theta * c3[e]))


@njit(**_OPTS)
def _hermite_locate_events(st, thresholds, pi_old, pi_new, t, h, y, c1, c2, c3, event_times):
    pe = HEAD + st[0] + 1
    for p in range(pi_old.shape[0]):
        thr = thresholds[p]
        if np.isnan(thr) or not np.isnan(event_times[p]):
            continue
        glo = pi_old[p] - thr
        if not _crosses(glo, pi_new[p] - thr):
            continue
        lo = 0.0
        hi = 1.0
        it = 0
        while it < 64 and hi - lo > 1e-15:
            mid = 0.5 * (lo + hi)
            x = 1.0
            for k in range(st[HEAD + p], st[HEAD + p + 1]):
                x *= _hermite_edge(y, c1, c2, c3, st[pe + k], mid)
            gm = x - thr
            if _crosses(glo, gm):
                hi = mid
            else:
                lo = mid
                glo = gm
            it += 1
        event_times[p] = t + hi * h


@njit(**_OPTS)
def _rodas3_core(st, par, b0, t0, t_end, t_out, rtol, atol, h0, hmax_opt, max_steps,
                 thresholds, events, out, event_times, stats, work, jac, g, piv, k_start):
    """rodas3_core of race.c; jac and g are (n, n) scratch, piv (n,) int64.
    Outputs and save times are the run's full arrays, written from index k_start on (race.c
    passes offset pointers; whole arrays keep numba's contiguous layout).  Returns (status,
    outputs written in all, t, h)."""
    n = b0.shape[0]
    n_paths = st[0]
    n_out = t_out.shape[0]
    y = work[0:n]
    ynew = work[n:2 * n]
    f0 = work[2 * n:3 * n]
    f1 = work[3 * n:4 * n]
    ytmp = work[4 * n:5 * n]
    ftmp = work[5 * n:6 * n]
    k1 = work[6 * n:7 * n]
    k2 = work[7 * n:8 * n]
    k3 = work[8 * n:9 * n]
    k4 = work[9 * n:10 * n]
    pi_old = work[10 * n:10 * n + n_paths]
    pi_new = work[10 * n + n_paths:10 * n + 2 * n_paths]
    rwork = work[10 * n + 2 * n_paths:]

    k_out = k_start  # outputs before k_start are written already (race_auto)
    status = OK
    t = t0
    h = 0.0
    for i in range(n):
        y[i] = b0[i]
    rhs_one(st, par, y, f0, rwork)
    stats[2] += 1
    if not _all_finite(y) or not _all_finite(f0):
        status = NONFINITE
    if status == OK:
        if events:
            _events_start(st, thresholds, y, t0, pi_old, event_times)
        while k_out < n_out and t_out[k_out] <= t0:
            for i in range(n):
                out[k_out, i] = y[i]
            k_out += 1
        hmax = hmax_opt if hmax_opt > 0.0 else t_end - t0
        if h0 > 0.0:
            h = min(h0, hmax)
        else:
            h = _initial_step(st, par, y, f0, hmax, rtol, atol, 3.0, ytmp, ftmp, rwork)
            stats[2] += 1
        reject = False
        last = False
        nonfinite = False
        jac_current = False
        nstep = 0
        while True:
            if nstep >= max_steps:
                status = MAX_STEPS
                break
            if 0.1 * abs(h) <= abs(t) * UROUND or not (h > 0.0):
                status = NONFINITE if nonfinite else STEP_TOO_SMALL
                break
            if t + 1.01 * h - t_end > 0.0:
                h = t_end - t
                last = True
            nstep += 1
            if not jac_current:
                jacobian_one(st, par, y, jac, rwork)
                jac_current = True
            hinv = 1.0 / h
            diag = 1.0 / (h * RO_GAMMA)
            for i in range(n):
                for j in range(n):
                    g[i, j] = -jac[i, j]
            for i in range(n):
                g[i, i] = diag - jac[i, i]
            if lu_factor(g, piv) != 0:
                h = h * 0.1
                reject = True
                last = False
                nonfinite = True
                stats[1] += 1
                continue
            for i in range(n):
                k1[i] = f0[i]
            lu_solve(g, piv, k1)
            for i in range(n):
                k2[i] = f0[i] + (RO_C21 * hinv) * k1[i]
            lu_solve(g, piv, k2)
            for i in range(n):
                ytmp[i] = y[i] + 2.0 * k1[i]
            rhs_one(st, par, ytmp, ftmp, rwork)
            for i in range(n):
                k3[i] = ftmp[i] + (RO_C31 * hinv) * k1[i] + (RO_C32 * hinv) * k2[i]
            lu_solve(g, piv, k3)
            for i in range(n):
                ytmp[i] = y[i] + 2.0 * k1[i] + k3[i]
            rhs_one(st, par, ytmp, ftmp, rwork)
            for i in range(n):
                k4[i] = (ftmp[i] + (RO_C41 * hinv) * k1[i] + (RO_C42 * hinv) * k2[i]
                         + (RO_C43 * hinv) * k3[i])
            lu_solve(g, piv, k4)
            for i in range(n):
                ynew[i] = y[i] + 2.0 * k1[i] + k3[i] + k4[i]
            rhs_one(st, par, ynew, f1, rwork)
            stats[2] += 3
            err = _error_norm(k4, y, ynew, rtol, atol)
            if not _all_finite(f1):
                err = np.nan
            else:
                # dense-output error: cubic Hermite minus quadratic interpolant at theta = 2/3
                for i in range(n):
                    ftmp[i] = RO_DENSE * (h * (f0[i] + f1[i]) - 2.0 * (ynew[i] - y[i]))
                err_dense = _error_norm(ftmp, y, ynew, rtol, atol)
                if err_dense > err:
                    err = err_dense
            if not (err <= 1.7976931348623157e308):
                h = h * 0.1
                reject = True
                last = False
                nonfinite = True
                stats[1] += 1
                continue
            errc = err if err > 1e-10 else 1e-10
            fac = min(RO_FACMAX, max(RO_FACMIN, RO_SAFE * errc ** (-1.0 / 3.0)))
            hnew = h * fac
            if err <= 1.0:
                stats[0] += 1
                tnew = t_end if last else t + h
                if (k_out < n_out and t_out[k_out] < tnew) or events:
                    # Hermite coefficients in the stages, free once a step is accepted
                    for i in range(n):
                        hf0 = h * f0[i]
                        hf1 = h * f1[i]
                        dy = ynew[i] - y[i]
                        k1[i] = hf0
                        k2[i] = 3.0 * dy - 2.0 * hf0 - hf1
                        k3[i] = hf0 + hf1 - 2.0 * dy
                while k_out < n_out and t_out[k_out] <= tnew:
                    if t_out[k_out] == tnew:
                        for i in range(n):
                            out[k_out, i] = ynew[i]
                    else:
                        theta = _theta(t_out[k_out], t, h)
                        for i in range(n):
                            out[k_out, i] = y[i] + theta * (k1[i] + theta * (k2[i]
                                                                             + theta * k3[i]))
                    k_out += 1
                if events:
                    path_strengths_one(st, ynew, pi_new)
                    _hermite_locate_events(st, thresholds, pi_old, pi_new, t, h, y, k1, k2, k3,
                                           event_times)
                    for p in range(n_paths):
                        pi_old[p] = pi_new[p]
                for i in range(n):
                    y[i] = ynew[i]
                    f0[i] = f1[i]
                jac_current = False
                t = tnew
                if last:
                    break
                if hnew > hmax:
                    hnew = hmax
                if reject:
                    hnew = min(hnew, h)
                reject = False
                nonfinite = False
            else:
                reject = True
                last = False
                stats[1] += 1
            h = hnew
    return status, k_out, t, h


# ------------------------------------------------------------------------------------------
# the integrators of race.h: race_dopri5 (method 0), race_rodas3 (1), race_auto (2)
#
# One kernel serves the three methods (a run-time switch), so numba compiles the integrators
# once, not three times.

DOPRI5, RODAS3, AUTO = 0, 1, 2


@njit(**_OPTS)
def ode_one(st, par, method, b0, t0, t_end, t_out, rtol, atol, h0, hmax, max_steps, thresholds,
            events, out, event_times, stats, work, jac, g, piv, ybuf):
    """race_dopri5 / race_rodas3 / race_auto for one system: out (n_out, n_edges); stats
    [accepted, rejected, rhs evaluations]; ybuf (n,) scratch.  Returns the status."""
    _run_begin(stats, event_times)
    status = BAD_INPUT
    k_out = 0
    if _options_ok(t0, t_end, rtol, atol, max_steps):
        n = ybuf.shape[0]
        if method == RODAS3:
            for i in range(n):
                ybuf[i] = b0[i]
            status, k_out, _, _ = _rodas3_core(st, par, ybuf, t0, t_end, t_out, rtol, atol, h0,
                                               hmax, max_steps, thresholds, events, out,
                                               event_times, stats, work, jac, g, piv, 0)
        else:
            status, k_out, t, h, stiff = _dopri5_core(st, par, b0, t0, t_end, t_out, rtol, atol,
                                                      h0, hmax, max_steps, thresholds, events,
                                                      out, event_times, stats, work,
                                                      method == AUTO)
            if status == OK and stiff:
                rest = max_steps - (stats[0] + stats[1])
                if rest < 1:
                    status = MAX_STEPS
                else:
                    for i in range(n):
                        ybuf[i] = work[i]
                    status, k_out, _, _ = _rodas3_core(st, par, ybuf, t, t_end, t_out, rtol,
                                                       atol, h, hmax, rest, thresholds, events,
                                                       out, event_times, stats, work, jac, g,
                                                       piv, k_out)
    _run_finish(out, k_out)
    return status


@njit(parallel=True, **_OPTS)
def ode_batch(st, b0, s, d, rate, method, t0, t_end, t_out, rtol, atol, h0, hmax, max_steps,
              thresholds, n_chunks, out, event_times, status, stats):
    """ode_one over a batch; outputs as described in the module docstring."""
    n_sys, n = b0.shape
    n_paths = st[0]
    events = False
    for p in range(n_paths):
        if not np.isnan(thresholds[p]):
            events = True
    n_chunks = max(1, min(n_sys, n_chunks))
    for c in prange(n_chunks):
        lo, hi = _chunk(c, n_chunks, n_sys)
        work = np.empty(15 * n + 2 * n_paths + work_size(st, n))
        par = np.empty(s.shape[1] + d.shape[1] + n)
        jac = np.empty((n, n))
        g = np.empty((n, n))
        piv = np.empty(n, dtype=np.int64)
        ybuf = np.empty(n)
        for i in range(lo, hi):
            _fill_par(par, s[i % s.shape[0]], d[i % d.shape[0]], rate[i % rate.shape[0]])
            status[i] = ode_one(st, par, method, b0[i], t0, t_end, t_out, rtol, atol, h0, hmax,
                                max_steps, thresholds, events, out[i], event_times[i], stats[i],
                                work, jac, g, piv, ybuf)
