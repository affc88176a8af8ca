/*
 * race.c -- right-hand side, Jacobian and integrators of a race system (see race.h).
 *
 * fastrace/_kernels/race.py mirrors every algorithm here operation for operation (same
 * formulas, same order of floating-point operations, same step control), so the numba and
 * C trajectories agree to round-off.  Change both together.  Build with -ffp-contract=off:
 * fused multiply-adds would break that agreement.
 */
#include "race.h"

#include <float.h>
#include <math.h>

/* Race systems are small (a handful of edges): GCC's auto-vectorised loops and memset calls
 * over 2-4 doubles cost more than they save, mostly through store-to-load forwarding stalls
 * on values just written by scalar code.  Results are the same either way. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-vectorize", "no-tree-loop-distribute-patterns")
#endif

/* ...except in the loops over many independent values (lanes of a batch, output rows), which
 * ask for it back */
#if defined(__GNUC__) && !defined(__clang__)
#define LANE_LOOPS __attribute__((optimize("tree-vectorize")))
#else
#define LANE_LOOPS
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif

#define UROUND DBL_EPSILON
/* paths up to this length take race_rhs's one-path branch */
#define RACE_CHAIN_MAX 6

/* ---------------------------------------------------------------------------------------- */
/* structure                                                                                 */

int race_check(const race_system *sys)
{
    if (sys == NULL || sys->n_edges < 1 || sys->n_paths < 1 || sys->path_ptr == NULL ||
        sys->path_edges == NULL || sys->target_ptr == NULL || sys->target_paths == NULL)
        return RACE_BAD_INPUT;
    if (sys->path_ptr[0] != 0 || sys->target_ptr[0] != 0)
        return RACE_BAD_INPUT;
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        int64_t lo = sys->path_ptr[p], hi = sys->path_ptr[p + 1];
        if (hi <= lo)
            return RACE_BAD_INPUT;
        for (int64_t k = lo; k < hi; ++k) {
            int64_t e = sys->path_edges[k];
            if (e < 0 || e >= sys->n_edges)
                return RACE_BAD_INPUT;
            for (int64_t m = lo; m < k; ++m)
                if (sys->path_edges[m] == e)
                    return RACE_BAD_INPUT;
        }
        lo = sys->target_ptr[p];
        hi = sys->target_ptr[p + 1];
        if (hi < lo)
            return RACE_BAD_INPUT;
        for (int64_t k = lo; k < hi; ++k)
            if (sys->target_paths[k] < 0 || sys->target_paths[k] >= sys->n_paths)
                return RACE_BAD_INPUT;
    }
    return RACE_OK;
}

int64_t race_max_path_length(const race_system *sys)
{
    int64_t longest = 0;
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        int64_t len = sys->path_ptr[p + 1] - sys->path_ptr[p];
        if (len > longest)
            longest = len;
    }
    return longest;
}

/* rhs / jacobian / loss scratch: pi (n_paths), r (n_paths), then for the rhs pre (nnz), for
 * the Jacobian pre and suf (L + 1 each), dpi (nnz), gradr (n_edges). */
size_t race_work_size(const race_system *sys)
{
    int64_t L = race_max_path_length(sys);
    int64_t nnz = sys->path_ptr[sys->n_paths];
    return (size_t)(2 * sys->n_paths + 2 * (L + 1) + nnz + sys->n_edges);
}

size_t race_gd_work_size(const race_system *sys)
{
    return (size_t)(2 * sys->n_edges) + race_work_size(sys);
}

/* y, k1..k7, ytmp, ynew, rc2..rc5, errv (15 vectors), pi_old, pi_new, then rhs scratch */
size_t race_dopri5_work_size(const race_system *sys)
{
    return (size_t)(15 * sys->n_edges + 2 * sys->n_paths) + race_work_size(sys);
}

/* y, ynew, f0, f1, ytmp, ftmp, k1..k4 (10 vectors), J and G (n x n each), pi_old, pi_new,
 * then rhs scratch */
size_t race_rodas3_work_size(const race_system *sys)
{
    return (size_t)(10 * sys->n_edges + 2 * sys->n_edges * sys->n_edges + 2 * sys->n_paths) +
           race_work_size(sys);
}

/* ---------------------------------------------------------------------------------------- */
/* right-hand side, Jacobian, loss                                                           */

void race_path_strengths(const race_system *sys, const double *b, double *pi)
{
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        double x = 1.0;
        for (int64_t k = sys->path_ptr[p]; k < sys->path_ptr[p + 1]; ++k)
            x *= b[sys->path_edges[k]];
        pi[p] = x;
    }
}

/* r[p] = s[p] - sum_{k in row p} d[k] pi[target_paths[k]] */
static void residuals(const race_system *sys, const double *s, const double *d,
                      const double *pi, double *r)
{
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        double acc = 0.0;
        for (int64_t k = sys->target_ptr[p]; k < sys->target_ptr[p + 1]; ++k)
            acc += d[k] * pi[sys->target_paths[k]];
        r[p] = s[p] - acc;
    }
}

/* prefix and suffix products of path p: pre[k] = prod of its first k edges,
 * suf[k] = prod of its edges k .. L-1; returns L. */
static int64_t prefix_suffix(const race_system *sys, int64_t p, const double *b, double *pre,
                             double *suf)
{
    const int64_t *edges = sys->path_edges + sys->path_ptr[p];
    int64_t L = sys->path_ptr[p + 1] - sys->path_ptr[p];
    pre[0] = 1.0;
    for (int64_t k = 0; k < L; ++k)
        pre[k + 1] = pre[k] * b[edges[k]];
    suf[L] = 1.0;
    for (int64_t k = L - 1; k >= 0; --k)
        suf[k] = b[edges[k]] * suf[k + 1];
    return L;
}

/* A system of one path through all its L edges: the operations of race_rhs below, in the same order (so the same
 * bits), with the intermediates in registers instead of the work arrays.  L is a constant at
 * each call, so the loops unroll.  Single paths are the modes of plain deep linear networks
 * and of symmetry-reduced systems such as the routing mode. */
static inline void rhs_one_path(int64_t L, const int64_t *restrict edges,
                                const double *restrict rate, double s0, double d0,
                                const double *restrict b, double *restrict db)
{
    double pre[RACE_CHAIN_MAX], x = b[edges[0]], rp, suf, w;
    pre[0] = 1.0;
    for (int64_t k = 1; k < L; ++k) {
        pre[k] = x;
        x *= b[edges[k]];
    }
    /* "0.0 +" as in the sums of the general code (it differs from x itself when x = -0.0);
     * the edges of a path are distinct, so each db[e] is written once */
    rp = s0 - (0.0 + d0 * x);
    suf = b[edges[L - 1]];
    w = pre[L - 1];
    if (rate != NULL)
        w *= rate[edges[L - 1]];
    db[edges[L - 1]] = 0.0 + w * rp;
    for (int64_t k = L - 2; k >= 0; --k) {
        const int64_t e = edges[k];
        w = pre[k] * suf;
        if (rate != NULL)
            w *= rate[e];
        db[e] = 0.0 + w * rp;
        suf = b[e] * suf;
    }
}

/* race_rhs; static, so that the integrators below may have it inlined */
static void rhs_eval(const race_system *sys, const double *s, const double *d, const double *b,
                     double *db, double *work)
{
    const int64_t n = sys->n_edges, np = sys->n_paths;
    const int64_t *path_ptr = sys->path_ptr, *path_edges = sys->path_edges;
    const int64_t *target_ptr = sys->target_ptr, *target_paths = sys->target_paths;
    const double *rate = sys->rate;
    /* pi (n_paths), r (n_paths), pre (nnz): pre[k] = product of the edges of k's path before
     * position k, so one forward pass gives pi and the prefixes, one backward pass the
     * suffixes */
    double *pi = work, *r = work + np, *pre = work + 2 * np;

    /* one path through every edge, with itself as its only target (T(0) = {0}; an empty T(0)
     * is valid and takes the general loop) */
    if (np == 1 && path_ptr[1] - path_ptr[0] == n && target_ptr[1] - target_ptr[0] == 1) {
        switch (n) {
        case 1: rhs_one_path(1, path_edges, rate, s[0], d[0], b, db); return;
        case 2: rhs_one_path(2, path_edges, rate, s[0], d[0], b, db); return;
        case 3: rhs_one_path(3, path_edges, rate, s[0], d[0], b, db); return;
        case 4: rhs_one_path(4, path_edges, rate, s[0], d[0], b, db); return;
        case 5: rhs_one_path(5, path_edges, rate, s[0], d[0], b, db); return;
        case 6: rhs_one_path(6, path_edges, rate, s[0], d[0], b, db); return;
        default: break;
        }
    }

    /* Products start from the first factor, not from 1.0 * it (the same bits, one multiply
     * less on the dependency chain from one stage to the next); paths are non-empty. */
    for (int64_t p = 0; p < np; ++p) {
        const int64_t lo = path_ptr[p], hi = path_ptr[p + 1];
        double x = b[path_edges[lo]];
        pre[lo] = 1.0;
        for (int64_t k = lo + 1; k < hi; ++k) {
            pre[k] = x;
            x *= b[path_edges[k]];
        }
        pi[p] = x;
    }
    for (int64_t p = 0; p < np; ++p) {
        double acc = 0.0;
        for (int64_t k = target_ptr[p]; k < target_ptr[p + 1]; ++k)
            acc += d[k] * pi[target_paths[k]];
        r[p] = s[p] - acc;
    }
    for (int64_t e = 0; e < n; ++e)
        db[e] = 0.0;
    /* db_e += ((prefix * suffix) * rate_e) * r_p: the rate multiplies before r_p is known,
     * which keeps it off the critical path of the stage-to-stage dependency chain */
    for (int64_t p = 0; p < np; ++p) {
        const int64_t lo = path_ptr[p], hi = path_ptr[p + 1];
        double rp = r[p], suf = b[path_edges[hi - 1]], w = pre[hi - 1];
        if (rate != NULL)
            w *= rate[path_edges[hi - 1]];
        db[path_edges[hi - 1]] += w * rp;
        for (int64_t k = hi - 2; k >= lo; --k) {
            int64_t e = path_edges[k];
            w = pre[k] * suf;
            if (rate != NULL)
                w *= rate[e];
            db[e] += w * rp;
            suf = b[e] * suf;
        }
    }
}

void race_rhs(const race_system *sys, const double *s, const double *d, const double *b,
              double *db, double *work)
{
    rhs_eval(sys, s, d, b, db, work);
}

void race_jacobian(const race_system *sys, const double *s, const double *d, const double *b,
                   double *jac, double *work)
{
    const int64_t n = sys->n_edges, np = sys->n_paths;
    const int64_t L = race_max_path_length(sys);
    double *pi = work, *r = work + np, *pre = work + 2 * np, *suf = pre + (L + 1);
    double *dpi = suf + (L + 1), *gradr = dpi + sys->path_ptr[np];

    /* dpi[path_ptr[j] + m] = d pi_j / d b_(m-th edge of j) */
    for (int64_t j = 0; j < np; ++j) {
        int64_t len = prefix_suffix(sys, j, b, pre, suf);
        for (int64_t m = 0; m < len; ++m)
            dpi[sys->path_ptr[j] + m] = pre[m] * suf[m + 1];
        pi[j] = pre[len];
    }
    residuals(sys, s, d, pi, r);
    for (int64_t i = 0; i < n * n; ++i)
        jac[i] = 0.0;

    for (int64_t p = 0; p < np; ++p) {
        const int64_t *edges = sys->path_edges + sys->path_ptr[p];
        int64_t len = prefix_suffix(sys, p, b, pre, suf);
        /* r_p times the second derivative of pi_p: products without edges k and l */
        for (int64_t k = 0; k < len; ++k) {
            double mid = 1.0;
            for (int64_t l = k + 1; l < len; ++l) {
                double v = pre[k] * mid * suf[l + 1] * r[p];
                jac[edges[k] * n + edges[l]] += v;
                jac[edges[l] * n + edges[k]] += v;
                mid *= b[edges[l]];
            }
        }
        /* (d pi_p / d b_e) times d r_p / d b_f */
        for (int64_t f = 0; f < n; ++f)
            gradr[f] = 0.0;
        for (int64_t k = sys->target_ptr[p]; k < sys->target_ptr[p + 1]; ++k) {
            int64_t j = sys->target_paths[k];
            for (int64_t m = sys->path_ptr[j]; m < sys->path_ptr[j + 1]; ++m)
                gradr[sys->path_edges[m]] -= d[k] * dpi[m];
        }
        for (int64_t k = 0; k < len; ++k) {
            double o = dpi[sys->path_ptr[p] + k];
            double *row = jac + edges[k] * n;
            for (int64_t f = 0; f < n; ++f)
                row[f] += o * gradr[f];
        }
    }
    if (sys->rate != NULL)
        for (int64_t e = 0; e < n; ++e)
            for (int64_t f = 0; f < n; ++f)
                jac[e * n + f] *= sys->rate[e];
}

double race_loss(const race_system *sys, const double *s, const double *d, const double *b,
                 double *work)
{
    double *pi = work;
    double loss = 0.0;
    race_path_strengths(sys, b, pi);
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        double acc = 0.0;
        for (int64_t k = sys->target_ptr[p]; k < sys->target_ptr[p + 1]; ++k)
            acc += d[k] * pi[sys->target_paths[k]];
        loss += (0.5 * acc - s[p]) * pi[p];
    }
    return loss;
}

/* ---------------------------------------------------------------------------------------- */
/* helpers shared by the integrators                                                         */

static int all_finite(int64_t n, const double *x)
{
    for (int64_t i = 0; i < n; ++i)
        if (!isfinite(x[i]))
            return 0;
    return 1;
}

static void fill_nan(int64_t n, double *x)
{
    for (int64_t i = 0; i < n; ++i)
        x[i] = NAN;
}

static void copy(int64_t n, const double *src, double *dst)
{
    for (int64_t i = 0; i < n; ++i)
        dst[i] = src[i];
}

static void init_stats(race_stats *st, double t)
{
    st->n_accepted = 0;
    st->n_rejected = 0;
    st->n_rhs = 0;
    st->t_reached = t;
}

/* sqrt(mean((err_i / (atol + rtol max(|y_i|, |ynew_i|)))^2)) */
static double error_norm(int64_t n, const double *err, const double *y, const double *ynew,
                         double rtol, double atol)
{
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        double sk = atol + rtol * fmax(fabs(y[i]), fabs(ynew[i]));
        double q = err[i] / sk;
        acc += q * q;
    }
    return sqrt(acc / (double)n);
}

/* Hairer's starting step (HINIT in DOPRI5/RADAU) for a method of order `order`;
 * f0 = f(y0); uses ytmp and f1 as scratch. */
static double initial_step(const race_system *sys, const double *s, const double *d,
                           const double *y0, const double *f0, double hmax, double rtol,
                           double atol, double order, double *ytmp, double *f1, double *work)
{
    const int64_t n = sys->n_edges;
    double dnf = 0.0, dny = 0.0, h, der2, der12, h1;
    for (int64_t i = 0; i < n; ++i) {
        double sk = atol + rtol * fabs(y0[i]);
        dnf += (f0[i] / sk) * (f0[i] / sk);
        dny += (y0[i] / sk) * (y0[i] / sk);
    }
    if (dnf <= 1e-10 || dny <= 1e-10)
        h = 1e-6;
    else
        h = sqrt(dny / dnf) * 0.01;
    h = fmin(h, hmax);
    for (int64_t i = 0; i < n; ++i)
        ytmp[i] = y0[i] + h * f0[i];
    rhs_eval(sys, s, d, ytmp, f1, work);
    der2 = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        double sk = atol + rtol * fabs(y0[i]);
        der2 += ((f1[i] - f0[i]) / sk) * ((f1[i] - f0[i]) / sk);
    }
    der2 = sqrt(der2) / h;
    der12 = fmax(fabs(der2), sqrt(dnf));
    if (der12 <= 1e-15)
        h1 = fmax(1e-6, fabs(h) * 1e-3);
    else
        h1 = pow(0.01 / der12, 1.0 / order);
    h = fmin(fmin(100.0 * fabs(h), h1), hmax);
    return h;
}

/* Events at the start of a run: pi_old = path strengths of y0; a pending event whose path
 * strength equals its threshold happens at t0. */
static void events_start(const race_system *sys, const double *thresholds, const double *y0,
                         double t0, double *pi_old, double *event_times)
{
    race_path_strengths(sys, y0, pi_old);
    for (int64_t p = 0; p < sys->n_paths; ++p)
        if (isnan(event_times[p]) && !isnan(thresholds[p]) && pi_old[p] - thresholds[p] == 0.0)
            event_times[p] = t0;
}

/* A crossing of 0 from g_old (non-zero) to g_new. */
static int crosses(double g_old, double g_new)
{
    return (g_old < 0.0 && g_new >= 0.0) || (g_old > 0.0 && g_new <= 0.0);
}

/* ---------------------------------------------------------------------------------------- */
/* gradient descent                                                                          */

int race_gd_map(const race_system *sys, const double *s, const double *d, const double *b0,
                double lr, int64_t n_record, const int64_t *record_steps, double *out,
                race_stats *stats, double *work)
{
    const int64_t n = sys->n_edges;
    double *b = work, *db = work + n, *rwork = work + 2 * n;
    race_stats local;
    int64_t step = 0, k = 0, last;
    int status = RACE_OK;

    if (stats == NULL)
        stats = &local;
    init_stats(stats, 0.0);
    if (n_record < 1)
        return RACE_OK;
    last = record_steps[n_record - 1];
    copy(n, b0, b);
    if (!all_finite(n, b))
        status = RACE_NONFINITE;
    while (status == RACE_OK) {
        while (k < n_record && record_steps[k] == step) {
            copy(n, b, out + k * n);
            ++k;
        }
        if (step >= last)
            break;
        rhs_eval(sys, s, d, b, db, rwork);
        for (int64_t e = 0; e < n; ++e)
            b[e] = b[e] + lr * db[e];
        ++step;
        stats->n_rhs += 1;
        if (!all_finite(n, b))
            status = RACE_NONFINITE;
    }
    stats->n_accepted = step;
    stats->t_reached = (double)step * lr;
    for (; k < n_record; ++k)
        fill_nan(n, out + k * n);
    return status;
}

/* ---------------------------------------------------------------------------------------- */
/* events                                                                                    */

/* Path strength of path p at a point of a step, from per-edge interpolation. */
typedef double (*dense_edge_fn)(const void *ctx, int64_t e, double theta);

static double path_at(const race_system *sys, int64_t p, dense_edge_fn fn, const void *ctx,
                      double theta)
{
    double x = 1.0;
    for (int64_t k = sys->path_ptr[p]; k < sys->path_ptr[p + 1]; ++k)
        x *= fn(ctx, sys->path_edges[k], theta);
    return x;
}

/* After an accepted step from t (path strengths pi_old) over h (pi_new at its end): record the
 * first crossing of every pending event, located by bisection in theta = (time - t) / h. */
static void locate_events(const race_system *sys, const double *thresholds, const double *pi_old,
                          const double *pi_new, double t, double h, dense_edge_fn fn,
                          const void *ctx, double *event_times)
{
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        double thr = thresholds[p], lo = 0.0, hi = 1.0, glo;
        if (isnan(thr) || !isnan(event_times[p]))
            continue;
        glo = pi_old[p] - thr;
        if (!crosses(glo, pi_new[p] - thr))
            continue;
        for (int it = 0; it < 64 && hi - lo > 1e-15; ++it) {
            double mid = 0.5 * (lo + hi);
            double gm = path_at(sys, p, fn, ctx, mid) - thr;
            if (crosses(glo, gm)) {
                hi = mid;
            } else {
                lo = mid;
                glo = gm;
            }
        }
        event_times[p] = t + hi * h;
    }
}

/* Is any pending event crossed between pi_old and pi_new? */
static int any_crossing(const race_system *sys, const double *thresholds, const double *pi_old,
                        const double *pi_new, const double *event_times)
{
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        double thr = thresholds[p];
        if (!isnan(thr) && isnan(event_times[p]) && crosses(pi_old[p] - thr, pi_new[p] - thr))
            return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Dormand-Prince 5(4)                                                                       */

/* Coefficients: Dormand & Prince (1980) as tabulated by Hairer, Norsett & Wanner, Solving
 * Ordinary Differential Equations I, table II.5.2; error coefficients E = b - b_hat and the
 * dense-output coefficients D of Hairer's DOPRI5 code (4th-order continuous extension). */
static const double A21 = 1.0 / 5.0;
static const double A31 = 3.0 / 40.0, A32 = 9.0 / 40.0;
static const double A41 = 44.0 / 45.0, A42 = -56.0 / 15.0, A43 = 32.0 / 9.0;
static const double A51 = 19372.0 / 6561.0, A52 = -25360.0 / 2187.0, A53 = 64448.0 / 6561.0,
                    A54 = -212.0 / 729.0;
static const double A61 = 9017.0 / 3168.0, A62 = -355.0 / 33.0, A63 = 46732.0 / 5247.0,
                    A64 = 49.0 / 176.0, A65 = -5103.0 / 18656.0;
static const double A71 = 35.0 / 384.0, A73 = 500.0 / 1113.0, A74 = 125.0 / 192.0,
                    A75 = -2187.0 / 6784.0, A76 = 11.0 / 84.0;
static const double E1 = 71.0 / 57600.0, E3 = -71.0 / 16695.0, E4 = 71.0 / 1920.0,
                    E5 = -17253.0 / 339200.0, E6 = 22.0 / 525.0, E7 = -1.0 / 40.0;
static const double D1 = -12715105075.0 / 11282082432.0, D3 = 87487479700.0 / 32700410799.0,
                    D4 = -10690763975.0 / 1880347072.0, D5 = 701980252875.0 / 199316789632.0,
                    D6 = -1453857185.0 / 822651844.0, D7 = 69997945.0 / 29380423.0;

/* step control of Hairer's DOPRI5 */
#define DP_SAFE 0.9
#define DP_BETA 0.04
#define DP_EXPO1 0.17 /* 1/5 - 0.75 * beta */
#define DP_FACC1 5.0  /* 1 / (smallest factor 0.2) */
#define DP_FACC2 0.1  /* 1 / (largest factor 10) */
/* log(1e-4): the smallest previous error the controller remembers (log form: one log and one
 * exp per step instead of two pow calls) */
#define DP_LOG_FACMIN (-9.210340371976182)
/* stiffness test firings that switch auto to RODAS3 (see race_auto in race.h) */
#define STIFF_CONFIRMATIONS 1

typedef struct dp_dense {
    const double *y, *rc2, *rc3, *rc4, *rc5;
} dp_dense;

static double dp_dense_edge(const void *ctx, int64_t e, double theta)
{
    const dp_dense *c = (const dp_dense *)ctx;
    double theta1 = 1.0 - theta;
    return c->y[e] +
           theta * (c->rc2[e] + theta1 * (c->rc3[e] + theta * (c->rc4[e] + theta1 * c->rc5[e])));
}

/* Dense output rows of an accepted step from t over h (ending at tnew): rows k_out.. of out for
 * the times t_out[k] <= tnew, the interpolant at theta = (t_out[k] - t) / h, or ynew itself
 * when t_out[k] == tnew; returns the next k_out.  The rows are computed in one plain loop
 * (restrict-qualified, no function pointer) since saving many times per step is common. */
/* theta = (t_out - t) * (1 / h) for up to ROW_BLOCK rows at a time (one vectorised loop; the
 * division itself when 1 / h overflows), then the rows */
#define ROW_BLOCK 64

LANE_LOOPS
static void thetas(int64_t count, const double *restrict tk, double t, double h,
                   double *restrict theta)
{
    const double hinv = 1.0 / h;
    if (isfinite(hinv)) {
        for (int64_t k = 0; k < count; ++k)
            theta[k] = (tk[k] - t) * hinv;
    } else { /* h below ~5.6e-309: its reciprocal overflows */
        for (int64_t k = 0; k < count; ++k)
            theta[k] = (tk[k] - t) / h;
    }
}

/* BY_SMALL_SIZE(body, n, args) calls body(n, args) with n a constant for the usual small
 * systems (the loops of an inlined body then unroll), with the variable n otherwise: the
 * output rows and the dense LU below use it. */
#define BY_SMALL_SIZE(body, n, ...)                                                              \
    switch (n) {                                                                                \
    case 1: body(1, __VA_ARGS__); break;                                                        \
    case 2: body(2, __VA_ARGS__); break;                                                        \
    case 3: body(3, __VA_ARGS__); break;                                                        \
    case 4: body(4, __VA_ARGS__); break;                                                        \
    default: body(n, __VA_ARGS__); break;                                                       \
    }

static inline ALWAYS_INLINE void dp_rows_n(int64_t n, int64_t count, const double *tk, double t, double h,
                             const double *restrict y, const double *restrict rc2,
                             const double *restrict rc3, const double *restrict rc4,
                             const double *restrict rc5, double *restrict out)
{
    double th[ROW_BLOCK];
    for (int64_t k0 = 0; k0 < count; k0 += ROW_BLOCK) {
        const int64_t kn = count - k0 < ROW_BLOCK ? count - k0 : ROW_BLOCK;
        thetas(kn, tk + k0, t, h, th);
        for (int64_t k = 0; k < kn; ++k) {
            const double theta = th[k], theta1 = 1.0 - theta;
            double *o = out + (k0 + k) * n;
            for (int64_t i = 0; i < n; ++i)
                o[i] = y[i] +
                       theta * (rc2[i] + theta1 * (rc3[i] + theta * (rc4[i] + theta1 * rc5[i])));
        }
    }
}

LANE_LOOPS
static void dp_rows(int64_t n, int64_t count, const double *tk, double t, double h,
                    const double *y, const double *rc2, const double *rc3, const double *rc4,
                    const double *rc5, double *out)
{
    BY_SMALL_SIZE(dp_rows_n, n, count, tk, t, h, y, rc2, rc3, rc4, rc5, out)
}

static inline ALWAYS_INLINE void hermite_rows_n(int64_t n, int64_t count, const double *tk, double t,
                                  double h, const double *restrict y, const double *restrict c1,
                                  const double *restrict c2, const double *restrict c3,
                                  double *restrict out)
{
    double th[ROW_BLOCK];
    for (int64_t k0 = 0; k0 < count; k0 += ROW_BLOCK) {
        const int64_t kn = count - k0 < ROW_BLOCK ? count - k0 : ROW_BLOCK;
        thetas(kn, tk + k0, t, h, th);
        for (int64_t k = 0; k < kn; ++k) {
            const double theta = th[k];
            double *o = out + (k0 + k) * n;
            for (int64_t i = 0; i < n; ++i)
                o[i] = y[i] + theta * (c1[i] + theta * (c2[i] + theta * c3[i]));
        }
    }
}

LANE_LOOPS
static void hermite_rows(int64_t n, int64_t count, const double *tk, double t, double h,
                         const double *y, const double *c1, const double *c2, const double *c3,
                         double *out)
{
    BY_SMALL_SIZE(hermite_rows_n, n, count, tk, t, h, y, c1, c2, c3, out)
}

/* kind 0: DOPRI5 (c = rc2..rc5), 1: cubic Hermite (c = c1..c3) */
static int64_t dense_outputs(int kind, int64_t n, int64_t k_out, int64_t n_out,
                             const double *t_out, double t, double h, double tnew,
                             const double *y, const double *ca, const double *cb,
                             const double *cc, const double *cd, const double *ynew, double *out)
{
    int64_t k_end = k_out;
    while (k_end < n_out && t_out[k_end] <= tnew)
        ++k_end;
    if (kind == 0)
        dp_rows(n, k_end - k_out, t_out + k_out, t, h, y, ca, cb, cc, cd, out + k_out * n);
    else
        hermite_rows(n, k_end - k_out, t_out + k_out, t, h, y, ca, cb, cc, out + k_out * n);
    for (int64_t k = k_out; k < k_end; ++k)
        if (t_out[k] == tnew)
            copy(n, ynew, out + k * n);
    return k_end;
}

/* Where a run ended: outputs written, time, last step size, and whether DOPRI5 stopped because
 * the problem turned stiff. */
typedef struct run_end {
    int64_t k_out;
    double t, h;
    int stiff;
} run_end;

/* DOPRI5 from b0 at t0 (y is work[0 .. n-1] throughout, also at the end).  Adds to stats, writes
 * outputs and pending events but neither resets events nor fills unreached outputs.  With
 * detect_stiff it stops after an accepted step once Hairer's stiffness test (h |lambda| > 3.25
 * estimated from the last two stages) has fired STIFF_CONFIRMATIONS times before 6 non-stiff
 * steps in a row. */
static int dopri5_core(const race_system *sys, const double *s, const double *d, const double *b0,
                       double t0, double t_end, int64_t n_out, const double *t_out,
                       const race_ode_options *opt, const double *thresholds, double *out,
                       double *event_times, race_stats *stats, double *work, int detect_stiff,
                       run_end *end)
{
    const int64_t n = sys->n_edges, np = sys->n_paths;
    double *y = work, *k1 = y + n, *k2 = k1 + n, *k3 = k2 + n, *k4 = k3 + n, *k5 = k4 + n;
    double *k6 = k5 + n, *k7 = k6 + n, *ytmp = k7 + n, *ynew = ytmp + n, *rc2 = ynew + n;
    double *rc3 = rc2 + n, *rc4 = rc3 + n, *rc5 = rc4 + n, *errv = rc5 + n;
    double *pi_old = errv + n, *pi_new = pi_old + np, *rwork = pi_new + np;
    const int events = thresholds != NULL && event_times != NULL;
    dp_dense dense = {y, rc2, rc3, rc4, rc5};
    int64_t k_out = 0, nstep = 0, iasti = 0, nonsti = 0;
    int status = RACE_OK, reject = 0, last = 0, nonfinite = 0;
    double t = t0, h = 0.0, hmax, lfacold = DP_LOG_FACMIN, rtol = opt->rtol, atol = opt->atol;

    end->stiff = 0;
    copy(n, b0, y);
    rhs_eval(sys, s, d, y, k1, rwork);
    stats->n_rhs += 1;
    if (!all_finite(n, y) || !all_finite(n, k1)) {
        status = RACE_NONFINITE;
        goto done;
    }
    if (events)
        events_start(sys, thresholds, y, t0, pi_old, event_times);
    while (k_out < n_out && t_out[k_out] <= t0) {
        copy(n, y, out + k_out * n);
        ++k_out;
    }
    hmax = opt->hmax > 0.0 ? opt->hmax : t_end - t0;
    if (opt->h0 > 0.0) {
        h = fmin(opt->h0, hmax);
    } else {
        h = initial_step(sys, s, d, y, k1, hmax, rtol, atol, 5.0, ytmp, k2, rwork);
        stats->n_rhs += 1;
    }

    for (;;) {
        double err, lerr, fac, hnew, tnew;
        if (nstep >= opt->max_steps) {
            status = RACE_MAX_STEPS;
            break;
        }
        if (0.1 * fabs(h) <= fabs(t) * UROUND || !(h > 0.0)) {
            status = nonfinite ? RACE_NONFINITE : RACE_STEP_TOO_SMALL;
            break;
        }
        if (t + 1.01 * h - t_end > 0.0) {
            h = t_end - t;
            last = 1;
        }
        ++nstep;

        /* Each stage adds its newest slope last, (y + h (older terms)) + (h a_ij) k_j, so only
         * one multiply and one add lie between a right-hand side and the next. */
        for (int64_t i = 0; i < n; ++i)
            ytmp[i] = y[i] + (h * A21) * k1[i];
        rhs_eval(sys, s, d, ytmp, k2, rwork);
        for (int64_t i = 0; i < n; ++i)
            ytmp[i] = (y[i] + h * (A31 * k1[i])) + (h * A32) * k2[i];
        rhs_eval(sys, s, d, ytmp, k3, rwork);
        for (int64_t i = 0; i < n; ++i)
            ytmp[i] = (y[i] + h * (A41 * k1[i] + A42 * k2[i])) + (h * A43) * k3[i];
        rhs_eval(sys, s, d, ytmp, k4, rwork);
        for (int64_t i = 0; i < n; ++i)
            ytmp[i] = (y[i] + h * (A51 * k1[i] + A52 * k2[i] + A53 * k3[i])) + (h * A54) * k4[i];
        rhs_eval(sys, s, d, ytmp, k5, rwork);
        for (int64_t i = 0; i < n; ++i)
            ytmp[i] = (y[i] + h * (A61 * k1[i] + A62 * k2[i] + A63 * k3[i] + A64 * k4[i])) +
                      (h * A65) * k5[i];
        rhs_eval(sys, s, d, ytmp, k6, rwork);
        for (int64_t i = 0; i < n; ++i)
            ynew[i] = (y[i] + h * (A71 * k1[i] + A73 * k3[i] + A74 * k4[i] + A75 * k5[i])) +
                      (h * A76) * k6[i];
        rhs_eval(sys, s, d, ynew, k7, rwork);
        stats->n_rhs += 6;
        for (int64_t i = 0; i < n; ++i)
            errv[i] = h * (E1 * k1[i] + E3 * k3[i] + E4 * k4[i] + E5 * k5[i] + E6 * k6[i] +
                           E7 * k7[i]);
        err = error_norm(n, errv, y, ynew, rtol, atol);

        if (!(err <= DBL_MAX)) { /* inf or NaN: shrink hard */
            h = h * 0.1;
            reject = 1;
            last = 0;
            nonfinite = 1;
            stats->n_rejected += 1;
            continue;
        }
        lerr = log(err);
        fac = exp(DP_EXPO1 * lerr - DP_BETA * lfacold);
        fac = fmax(DP_FACC2, fmin(DP_FACC1, fac / DP_SAFE));
        hnew = h / fac;
        if (err <= 1.0) {
            int need_dense;
            lfacold = fmax(lerr, DP_LOG_FACMIN);
            stats->n_accepted += 1;
            tnew = last ? t_end : t + h;
            if (events)
                race_path_strengths(sys, ynew, pi_new);
            need_dense = (k_out < n_out && t_out[k_out] < tnew) ||
                         (events && any_crossing(sys, thresholds, pi_old, pi_new, event_times));
            if (need_dense) {
                for (int64_t i = 0; i < n; ++i) {
                    double ydiff = ynew[i] - y[i];
                    double bspl = h * k1[i] - ydiff;
                    rc2[i] = ydiff;
                    rc3[i] = bspl;
                    rc4[i] = ydiff - h * k7[i] - bspl;
                    rc5[i] = h * (D1 * k1[i] + D3 * k3[i] + D4 * k4[i] + D5 * k5[i] +
                                  D6 * k6[i] + D7 * k7[i]);
                }
            }
            k_out = dense_outputs(0, n, k_out, n_out, t_out, t, h, tnew, y, rc2, rc3, rc4, rc5,
                                  ynew, out);
            if (events) {
                if (need_dense)
                    locate_events(sys, thresholds, pi_old, pi_new, t, h, dp_dense_edge, &dense,
                                  event_times);
                copy(np, pi_new, pi_old);
            }
            if (detect_stiff) {
                /* ytmp still holds the point of stage 6 and k6 its slope */
                double stnum = 0.0, stden = 0.0;
                for (int64_t i = 0; i < n; ++i) {
                    stnum += (k7[i] - k6[i]) * (k7[i] - k6[i]);
                    stden += (ynew[i] - ytmp[i]) * (ynew[i] - ytmp[i]);
                }
                if (stden > 0.0 && h * sqrt(stnum / stden) > 3.25) {
                    nonsti = 0;
                    iasti += 1;
                } else {
                    nonsti += 1;
                    if (nonsti == 6)
                        iasti = 0;
                }
            }
            copy(n, ynew, y);
            copy(n, k7, k1);
            t = tnew;
            stats->t_reached = t;
            if (last)
                break;
            if (fabs(hnew) > hmax)
                hnew = hmax;
            if (reject)
                hnew = fmin(fabs(hnew), fabs(h));
            reject = 0;
            nonfinite = 0;
            if (iasti >= STIFF_CONFIRMATIONS) {
                end->stiff = 1;
                h = hnew;
                break;
            }
        } else {
            hnew = h / fmin(DP_FACC1, exp(DP_EXPO1 * lerr) / DP_SAFE);
            reject = 1;
            last = 0;
            stats->n_rejected += 1;
        }
        h = hnew;
    }

done:
    end->k_out = k_out;
    end->t = t;
    end->h = h;
    return status;
}

static int options_ok(double t0, double t_end, const race_ode_options *opt)
{
    return opt != NULL && t_end > t0 && opt->rtol > 0.0 && opt->atol > 0.0 && isfinite(t0) &&
           isfinite(t_end) && opt->max_steps >= 1;
}

/* common start and end of the public integrators */
static void run_begin(const race_system *sys, double t0, double *event_times, race_stats *stats)
{
    init_stats(stats, t0);
    if (event_times != NULL)
        for (int64_t p = 0; p < sys->n_paths; ++p)
            event_times[p] = NAN;
}

static void run_finish(const race_system *sys, int64_t k_out, int64_t n_out, double *out)
{
    for (; k_out < n_out; ++k_out)
        fill_nan(sys->n_edges, out + k_out * sys->n_edges);
}

int race_dopri5(const race_system *sys, const double *s, const double *d, const double *b0,
                double t0, double t_end, int64_t n_out, const double *t_out,
                const race_ode_options *opt, const double *thresholds, double *out,
                double *event_times, race_stats *stats, double *work)
{
    race_stats local;
    run_end end = {0, t0, 0.0, 0};
    int status = RACE_BAD_INPUT;
    if (stats == NULL)
        stats = &local;
    run_begin(sys, t0, event_times, stats);
    if (options_ok(t0, t_end, opt))
        status = dopri5_core(sys, s, d, b0, t0, t_end, n_out, t_out, opt, thresholds, out,
                             event_times, stats, work, 0, &end);
    run_finish(sys, end.k_out, n_out, out);
    return status;
}

/* ---------------------------------------------------------------------------------------- */
/* dense LU with partial pivoting (n is small)                                              */

/* Factor a (n x n, row-major) in place as P a = L U; returns 0, or 1 when singular. */
static inline ALWAYS_INLINE int lu_factor_n(int64_t n, double *a, int64_t *piv)
{
    for (int64_t k = 0; k < n; ++k) {
        int64_t p = k;
        double amax = fabs(a[k * n + k]);
        for (int64_t i = k + 1; i < n; ++i) {
            if (fabs(a[i * n + k]) > amax) {
                amax = fabs(a[i * n + k]);
                p = i;
            }
        }
        piv[k] = p;
        if (!(amax > 0.0) || !isfinite(amax))
            return 1;
        if (p != k) {
            for (int64_t j = 0; j < n; ++j) {
                double tmp = a[k * n + j];
                a[k * n + j] = a[p * n + j];
                a[p * n + j] = tmp;
            }
        }
        for (int64_t i = k + 1; i < n; ++i) {
            double l = a[i * n + k] / a[k * n + k];
            a[i * n + k] = l;
            for (int64_t j = k + 1; j < n; ++j)
                a[i * n + j] -= l * a[k * n + j];
        }
    }
    return 0;
}

static int lu_factor(int64_t n, double *a, int64_t *piv)
{
    int singular;
    BY_SMALL_SIZE(singular = lu_factor_n, n, a, piv)
    return singular;
}

/* Solve (P^T L U) x = b in place. */
static inline ALWAYS_INLINE void lu_solve_n(int64_t n, const double *a, const int64_t *piv, double *b)
{
    for (int64_t k = 0; k < n; ++k) {
        if (piv[k] != k) {
            double tmp = b[k];
            b[k] = b[piv[k]];
            b[piv[k]] = tmp;
        }
    }
    for (int64_t i = 1; i < n; ++i)
        for (int64_t j = 0; j < i; ++j)
            b[i] -= a[i * n + j] * b[j];
    for (int64_t i = n - 1; i >= 0; --i) {
        for (int64_t j = i + 1; j < n; ++j)
            b[i] -= a[i * n + j] * b[j];
        b[i] = b[i] / a[i * n + i];
    }
}


static void lu_solve(int64_t n, const double *a, const int64_t *piv, double *b)
{
    BY_SMALL_SIZE(lu_solve_n, n, a, piv, b)
}

/* ---------------------------------------------------------------------------------------- */
/* RODAS3                                                                                    */

/* RODAS3 in the form  (1/(h gamma) - J) k_i = f(y + sum_j a_ij k_j) + sum_j (c_ij / h) k_j,
 * y_new = y + sum_i m_i k_i, error estimate k_4.  Coefficients of Sandu, Verwer, Blom,
 * Spee, Carmichael & Potra, "Benchmarking stiff ODE solvers for atmospheric chemistry
 * problems II: Rosenbrock solvers", Atmos. Environ. 31 (1997) 3459-3472 (as used in KPP):
 * gamma = 1/2, a31 = a41 = 2, a43 = 1 (others 0), c21 = 4, c31 = 1, c32 = -1, c41 = 1,
 * c42 = -1, c43 = -8/3, m = (2, 0, 1, 1), e = (0, 0, 0, 1).  Stage 2 reuses f(y). */
#define RO_GAMMA 0.5
#define RO_C21 4.0
#define RO_C31 1.0
#define RO_C32 (-1.0)
#define RO_C41 1.0
#define RO_C42 (-1.0)
#define RO_C43 (-8.0 / 3.0)
#define RO_SAFE 0.9
#define RO_FACMIN 0.2
#define RO_FACMAX 6.0
#define RO_DENSE (4.0 / 27.0)

/* The cubic Hermite interpolant of (y, f0) and (ynew, f1) on a step of length h, in power
 * form y + theta (c1 + theta (c2 + theta c3)) with c1 = h f0,
 * c2 = 3 (ynew - y) - 2 h f0 - h f1 and c3 = h f0 + h f1 - 2 (ynew - y). */
typedef struct hermite_dense {
    const double *y, *c1, *c2, *c3;
} hermite_dense;

static double hermite_edge(const void *ctx, int64_t e, double theta)
{
    const hermite_dense *c = (const hermite_dense *)ctx;
    return c->y[e] + theta * (c->c1[e] + theta * (c->c2[e] + theta * c->c3[e]));
}

/* RODAS3 from b0 at t0; same contract as dopri5_core (without stiffness detection). */
static int rodas3_core(const race_system *sys, const double *s, const double *d, const double *b0,
                       double t0, double t_end, int64_t n_out, const double *t_out,
                       const race_ode_options *opt, const double *thresholds, double *out,
                       double *event_times, race_stats *stats, double *work, int64_t *iwork,
                       run_end *end)
{
    const int64_t n = sys->n_edges, np = sys->n_paths;
    double *y = work, *ynew = y + n, *f0 = ynew + n, *f1 = f0 + n, *ytmp = f1 + n;
    double *ftmp = ytmp + n, *k1 = ftmp + n, *k2 = k1 + n, *k3 = k2 + n, *k4 = k3 + n;
    double *jac = k4 + n, *g = jac + n * n, *pi_old = g + n * n, *pi_new = pi_old + np;
    double *rwork = pi_new + np;
    int64_t *piv = iwork;
    const int events = thresholds != NULL && event_times != NULL;
    hermite_dense dense = {y, k1, k2, k3}; /* the stages are free once a step is accepted */
    int64_t k_out = 0, nstep = 0;
    int status = RACE_OK, reject = 0, last = 0, nonfinite = 0, jac_current = 0;
    double t = t0, h = 0.0, hmax, rtol = opt->rtol, atol = opt->atol;

    end->stiff = 0;
    copy(n, b0, y);
    rhs_eval(sys, s, d, y, f0, rwork);
    stats->n_rhs += 1;
    if (!all_finite(n, y) || !all_finite(n, f0)) {
        status = RACE_NONFINITE;
        goto done;
    }
    if (events)
        events_start(sys, thresholds, y, t0, pi_old, event_times);
    while (k_out < n_out && t_out[k_out] <= t0) {
        copy(n, y, out + k_out * n);
        ++k_out;
    }
    hmax = opt->hmax > 0.0 ? opt->hmax : t_end - t0;
    if (opt->h0 > 0.0) {
        h = fmin(opt->h0, hmax);
    } else {
        h = initial_step(sys, s, d, y, f0, hmax, rtol, atol, 3.0, ytmp, ftmp, rwork);
        stats->n_rhs += 1;
    }

    for (;;) {
        double err, errc, fac, hnew, tnew, hinv, diag;
        if (nstep >= opt->max_steps) {
            status = RACE_MAX_STEPS;
            break;
        }
        if (0.1 * fabs(h) <= fabs(t) * UROUND || !(h > 0.0)) {
            status = nonfinite ? RACE_NONFINITE : RACE_STEP_TOO_SMALL;
            break;
        }
        if (t + 1.01 * h - t_end > 0.0) {
            h = t_end - t;
            last = 1;
        }
        ++nstep;
        if (!jac_current) {
            race_jacobian(sys, s, d, y, jac, rwork);
            jac_current = 1;
        }
        hinv = 1.0 / h;
        diag = 1.0 / (h * RO_GAMMA);
        for (int64_t i = 0; i < n * n; ++i)
            g[i] = -jac[i];
        for (int64_t i = 0; i < n; ++i)
            g[i * n + i] = diag - jac[i * n + i];
        if (lu_factor(n, g, piv) != 0) {
            h = h * 0.1;
            reject = 1;
            last = 0;
            nonfinite = 1;
            stats->n_rejected += 1;
            continue;
        }
        for (int64_t i = 0; i < n; ++i)
            k1[i] = f0[i];
        lu_solve(n, g, piv, k1);
        for (int64_t i = 0; i < n; ++i)
            k2[i] = f0[i] + (RO_C21 * hinv) * k1[i];
        lu_solve(n, g, piv, k2);
        for (int64_t i = 0; i < n; ++i)
            ytmp[i] = y[i] + 2.0 * k1[i];
        rhs_eval(sys, s, d, ytmp, ftmp, rwork);
        for (int64_t i = 0; i < n; ++i)
            k3[i] = ftmp[i] + (RO_C31 * hinv) * k1[i] + (RO_C32 * hinv) * k2[i];
        lu_solve(n, g, piv, k3);
        for (int64_t i = 0; i < n; ++i)
            ytmp[i] = y[i] + 2.0 * k1[i] + k3[i];
        rhs_eval(sys, s, d, ytmp, ftmp, rwork);
        for (int64_t i = 0; i < n; ++i)
            k4[i] = ftmp[i] + (RO_C41 * hinv) * k1[i] + (RO_C42 * hinv) * k2[i] +
                    (RO_C43 * hinv) * k3[i];
        lu_solve(n, g, piv, k4);
        for (int64_t i = 0; i < n; ++i)
            ynew[i] = y[i] + 2.0 * k1[i] + k3[i] + k4[i];
        rhs_eval(sys, s, d, ynew, f1, rwork);
        stats->n_rhs += 3;
        err = error_norm(n, k4, y, ynew, rtol, atol);
        if (!all_finite(n, f1)) {
            err = NAN;
        } else {
            /* the dense output must meet the tolerance too: deviation of the cubic Hermite
             * interpolant from the quadratic one (through y, f0, ynew) at theta = 2/3 */
            double err_dense;
            for (int64_t i = 0; i < n; ++i)
                ftmp[i] = RO_DENSE * (h * (f0[i] + f1[i]) - 2.0 * (ynew[i] - y[i]));
            err_dense = error_norm(n, ftmp, y, ynew, rtol, atol);
            if (err_dense > err)
                err = err_dense;
        }
        if (!(err <= DBL_MAX)) {
            h = h * 0.1;
            reject = 1;
            last = 0;
            nonfinite = 1;
            stats->n_rejected += 1;
            continue;
        }
        errc = err > 1e-10 ? err : 1e-10;
        fac = fmin(RO_FACMAX, fmax(RO_FACMIN, RO_SAFE * pow(errc, -1.0 / 3.0)));
        hnew = h * fac;
        if (err <= 1.0) {
            stats->n_accepted += 1;
            tnew = last ? t_end : t + h;
            if ((k_out < n_out && t_out[k_out] < tnew) || events) {
                for (int64_t i = 0; i < n; ++i) {
                    double hf0 = h * f0[i], hf1 = h * f1[i], dy = ynew[i] - y[i];
                    k1[i] = hf0;
                    k2[i] = 3.0 * dy - 2.0 * hf0 - hf1;
                    k3[i] = hf0 + hf1 - 2.0 * dy;
                }
            }
            k_out = dense_outputs(1, n, k_out, n_out, t_out, t, h, tnew, y, k1, k2, k3, NULL,
                                  ynew, out);
            if (events) {
                race_path_strengths(sys, ynew, pi_new);
                locate_events(sys, thresholds, pi_old, pi_new, t, h, hermite_edge, &dense,
                              event_times);
                copy(np, pi_new, pi_old);
            }
            copy(n, ynew, y);
            copy(n, f1, f0);
            jac_current = 0;
            t = tnew;
            stats->t_reached = t;
            if (last)
                break;
            if (hnew > hmax)
                hnew = hmax;
            if (reject)
                hnew = fmin(hnew, h);
            reject = 0;
            nonfinite = 0;
        } else {
            reject = 1;
            last = 0;
            stats->n_rejected += 1;
        }
        h = hnew;
    }

done:
    end->k_out = k_out;
    end->t = t;
    end->h = h;
    return status;
}

int race_rodas3(const race_system *sys, const double *s, const double *d, const double *b0,
                double t0, double t_end, int64_t n_out, const double *t_out,
                const race_ode_options *opt, const double *thresholds, double *out,
                double *event_times, race_stats *stats, double *work, int64_t *iwork)
{
    race_stats local;
    run_end end = {0, t0, 0.0, 0};
    int status = RACE_BAD_INPUT;
    if (stats == NULL)
        stats = &local;
    run_begin(sys, t0, event_times, stats);
    if (options_ok(t0, t_end, opt))
        status = rodas3_core(sys, s, d, b0, t0, t_end, n_out, t_out, opt, thresholds, out,
                             event_times, stats, work, iwork, &end);
    run_finish(sys, end.k_out, n_out, out);
    return status;
}

size_t race_auto_work_size(const race_system *sys)
{
    size_t a = race_dopri5_work_size(sys), b = race_rodas3_work_size(sys);
    return (a > b ? a : b) + (size_t)sys->n_edges;
}

/* The RODAS3 phase of race_auto, after its DOPRI5 phase stopped at (end->t, y) because the
 * problem turned stiff; y must not lie in work.  Updates end. */
static int rodas3_after_stiff(const race_system *sys, const double *s, const double *d,
                              const double *y, double t_end, int64_t n_out, const double *t_out,
                              const race_ode_options *opt, const double *thresholds, double *out,
                              double *event_times, race_stats *stats, double *work,
                              int64_t *iwork, run_end *end)
{
    race_ode_options rest = *opt;
    int64_t k_done = end->k_out;
    int status;
    rest.h0 = end->h;
    rest.max_steps = opt->max_steps - (stats->n_accepted + stats->n_rejected);
    if (rest.max_steps < 1)
        return RACE_MAX_STEPS;
    status = rodas3_core(sys, s, d, y, end->t, t_end, n_out - k_done, t_out + k_done, &rest,
                         thresholds, out + k_done * sys->n_edges, event_times, stats, work,
                         iwork, end);
    end->k_out += k_done;
    return status;
}

int race_auto(const race_system *sys, const double *s, const double *d, const double *b0,
              double t0, double t_end, int64_t n_out, const double *t_out,
              const race_ode_options *opt, const double *thresholds, double *out,
              double *event_times, race_stats *stats, double *work, int64_t *iwork)
{
    const int64_t n = sys->n_edges;
    race_stats local;
    run_end end = {0, t0, 0.0, 0};
    int status = RACE_BAD_INPUT;
    if (stats == NULL)
        stats = &local;
    run_begin(sys, t0, event_times, stats);
    if (options_ok(t0, t_end, opt)) {
        status = dopri5_core(sys, s, d, b0, t0, t_end, n_out, t_out, opt, thresholds, out,
                             event_times, stats, work, 1, &end);
        if (status == RACE_OK && end.stiff) {
            /* continue from the state DOPRI5 left in work[0 .. n-1] */
            double *y = work + race_auto_work_size(sys) - n;
            copy(n, work, y);
            status = rodas3_after_stiff(sys, s, d, y, t_end, n_out, t_out, opt, thresholds, out,
                                        event_times, stats, work, iwork, &end);
        }
    }
    run_finish(sys, end.k_out, n_out, out);
    return status;
}

/* ---------------------------------------------------------------------------------------- */
/* batches: DOPRI5 on RACE_LANES systems at once                                             */

/* A single system's DOPRI5 step is a chain of dependent operations (each stage needs the
 * previous one), so one system keeps the CPU waiting on latencies.  The batch integrator runs
 * RACE_LANES independent systems in lock step, every vector stored lane-interleaved
 * (v[i * RACE_LANES + l] is entry i of lane l), so each operation is a short loop over lanes
 * that the CPU overlaps or the compiler vectorises.  Every lane keeps its own step size, step
 * control, outputs and events, and does exactly the floating-point operations of dopri5_core
 * in the same order: results are identical to race_dopri5 / race_auto system by system.
 * A lane whose system is done (or turned stiff: its RODAS3 phase runs at once, one system at a
 * time) takes the next system of the batch. */
#define RACE_LANES 16
/* fewer systems than this run one at a time: a lane step costs about as much as this many
 * single-system steps */
#define RACE_MIN_LANES 4
/* systems with more edges run one at a time: their own arithmetic already keeps the CPU busy,
 * and the lanes' Jacobian blocks would take 32 n_edges^2 doubles */
#define RACE_MAX_LANE_EDGES 32


static int64_t nnz_targets(const race_system *sys)
{
    return sys->target_ptr[sys->n_paths];
}

/* DOPRI5 lanes: 10 state vectors, rate, step sizes, errors, squared errors (n_edges each), pi, r, s
 * (n_paths each), pre (nnz), d (nnz_t), one error per lane, pi_old (n_paths); RODAS3 lanes:
 * 14 vectors (n_edges each), s, d, two errors, Jacobian and LU blocks (n_edges^2), pi_old;
 * one system's scratch: y, ynew, rc2..rc5, pi_new, then the race_auto work of one system */
size_t race_batch_work_size(const race_system *sys)
{
    const int64_t n = sys->n_edges, np = sys->n_paths, nnz_t = nnz_targets(sys);
    if (n > RACE_MAX_LANE_EDGES) /* one system at a time */
        return race_auto_work_size(sys);
    const int64_t dp = 14 * n + 3 * np + sys->path_ptr[np] + nnz_t + 1 + np;
    const int64_t ro = 14 * n + np + nnz_t + 2 + 2 * n * n + np;
    return (size_t)(RACE_LANES * (dp + ro) + 6 * n + np) + race_auto_work_size(sys);
}

size_t race_batch_iwork_size(const race_system *sys)
{
    return (size_t)((RACE_LANES + 1) * sys->n_edges);
}

/* The system i of a batch. */
static void batch_system(const race_batch *bt, int64_t i, race_system *sys, const double **s,
                         const double **d)
{
    *sys = *bt->sys;
    sys->rate = bt->rate ? bt->rate + (i % bt->rate_rows) * sys->n_edges : NULL;
    *s = bt->s + (i % bt->s_rows) * sys->n_paths;
    *d = bt->d + (i % bt->d_rows) * nnz_targets(sys);
}

/* rhs of every lane, the operations of race_rhs in its order */
LANE_LOOPS
static void rhs_lanes(const race_system *sys, int has_rate, const double *restrict sv,
                      const double *restrict dv, const double *restrict ratev,
                      const double *restrict b, double *restrict db, double *restrict pi,
                      double *restrict r, double *restrict pre)
{
    const int64_t n = sys->n_edges, np = sys->n_paths;
    const int64_t *path_ptr = sys->path_ptr, *path_edges = sys->path_edges;
    const int64_t *target_ptr = sys->target_ptr, *target_paths = sys->target_paths;
    double x[RACE_LANES];

    for (int64_t p = 0; p < np; ++p) {
        for (int l = 0; l < RACE_LANES; ++l)
            x[l] = 1.0;
        for (int64_t k = path_ptr[p]; k < path_ptr[p + 1]; ++k) {
            const double *restrict be = b + path_edges[k] * RACE_LANES;
            double *restrict pk = pre + k * RACE_LANES;
            for (int l = 0; l < RACE_LANES; ++l) {
                pk[l] = x[l];
                x[l] = x[l] * be[l];
            }
        }
        for (int l = 0; l < RACE_LANES; ++l)
            pi[p * RACE_LANES + l] = x[l];
    }
    for (int64_t p = 0; p < np; ++p) {
        for (int l = 0; l < RACE_LANES; ++l)
            x[l] = 0.0;
        for (int64_t k = target_ptr[p]; k < target_ptr[p + 1]; ++k) {
            const double *restrict dk = dv + k * RACE_LANES;
            const double *restrict pj = pi + target_paths[k] * RACE_LANES;
            for (int l = 0; l < RACE_LANES; ++l)
                x[l] = x[l] + dk[l] * pj[l];
        }
        for (int l = 0; l < RACE_LANES; ++l)
            r[p * RACE_LANES + l] = sv[p * RACE_LANES + l] - x[l];
    }
    for (int64_t i = 0; i < n * RACE_LANES; ++i)
        db[i] = 0.0;
    for (int64_t p = 0; p < np; ++p) {
        const double *restrict rp = r + p * RACE_LANES;
        for (int l = 0; l < RACE_LANES; ++l)
            x[l] = 1.0; /* suffix products */
        for (int64_t k = path_ptr[p + 1] - 1; k >= path_ptr[p]; --k) {
            const int64_t e = path_edges[k];
            const double *restrict pk = pre + k * RACE_LANES;
            const double *restrict be = b + e * RACE_LANES;
            const double *restrict re = ratev + e * RACE_LANES;
            double *restrict de = db + e * RACE_LANES;
            if (has_rate) {
                for (int l = 0; l < RACE_LANES; ++l) {
                    double w = pk[l] * x[l];
                    w = w * re[l];
                    de[l] = de[l] + w * rp[l];
                    x[l] = be[l] * x[l];
                }
            } else {
                for (int l = 0; l < RACE_LANES; ++l) {
                    double w = pk[l] * x[l];
                    de[l] = de[l] + w * rp[l];
                    x[l] = be[l] * x[l];
                }
            }
        }
    }
}

/* The state of one lane: its system and the scalars of dopri5_core. */
typedef struct lane_state {
    int64_t i; /* system index, -1: idle */
    race_system sys;
    const double *s, *d;
    race_stats *stats;
    double *out, *event_times, *pi_old;
    int64_t k_out, nstep, iasti, nonsti, max_steps;
    int reject, last, nonfinite;
    int stiff_wait;  /* DOPRI5 lane whose system turned stiff, waiting for a RODAS3 lane */
    int jac_current; /* RODAS3 lane: the Jacobian at y is in its block */
    int skip;        /* RODAS3 lane: this step was rejected before its stages */
    double t, h, hmax, lfacold;
} lane_state;

/* Everything a batch run shares. */
typedef struct batch_run {
    const race_batch *bt;
    int detect_stiff;
    double t0, t_end;
    int64_t n_out;
    const double *t_out;
    const race_ode_options *opt;
    const double *thresholds;
    double *out, *event_times;
    int *status;
    race_stats *stats;
    int64_t next, last_sys;
    /* lane-interleaved vectors of the DOPRI5 lanes */
    double *y, *k1, *k2, *k3, *k4, *k5, *k6, *k7, *ytmp, *ynew, *sv, *dv, *ratev;
    double *pi, *r, *pre, *hv, *ev, *q2, *err, *pi_old;
    /* the RODAS3 lanes (auto): vectors, per-lane Jacobian and LU blocks (n x n), pivots */
    double *ry, *rf0, *rf1, *ryt, *rft, *rk1, *rk2, *rk3, *rk4, *ryn, *rsv, *rdv, *rrate;
    double *rh, *rhi, *rdense, *rerr, *rerrd, *rjac, *rg, *rpi_old;
    int64_t *rpiv;
    lane_state dp[RACE_LANES], ro[RACE_LANES];
    /* one system's scratch */
    double *ys, *yn, *rc2, *rc3, *rc4, *rc5, *pi_new, *work;
    int64_t *iwork;
} batch_run;

static void lane_get(const double *v, int64_t n, int l, double *dst)
{
    for (int64_t i = 0; i < n; ++i)
        dst[i] = v[i * RACE_LANES + l];
}

static void lane_put(const double *src, int64_t n, int l, double *v)
{
    for (int64_t i = 0; i < n; ++i)
        v[i * RACE_LANES + l] = src[i];
}

/* A lane's system is done: unreached outputs, status; the lane is free.  A system that
 * turned stiff (auto) instead waits in its lane for a RODAS3 lane. */
static void lane_finish(batch_run *br, lane_state *ln, int status, int stiff)
{
    if (status == RACE_OK && stiff) {
        ln->stiff_wait = 1;
        return;
    }
    run_finish(&ln->sys, ln->k_out, br->n_out, ln->out);
    br->status[ln->i] = status;
    ln->i = -1;
}

/* Start the next system of the batch in lane l (the start of dopri5_core); returns 0 when the
 * batch is exhausted, 1 when the lane holds a running system.  Systems that fail at once are
 * finished here and the next one is tried. */
static int lane_load(batch_run *br, lane_state *ln, int l)
{
    const race_ode_options *opt = br->opt;
    while (br->next < br->last_sys) {
        const int64_t i = br->next++;
        race_system *sys = &ln->sys;
        int64_t n, np;
        double *f = br->yn;
        batch_system(br->bt, i, sys, &ln->s, &ln->d);
        n = sys->n_edges;
        np = sys->n_paths;
        ln->i = i;
        ln->stats = br->stats + i;
        ln->out = br->out + i * br->n_out * n;
        ln->event_times = br->event_times ? br->event_times + i * np : NULL;
        ln->pi_old = br->pi_old + l * np;
        ln->k_out = 0;
        ln->t = br->t0;
        ln->h = 0.0;
        run_begin(sys, br->t0, ln->event_times, ln->stats);
        if (!options_ok(br->t0, br->t_end, opt)) {
            lane_finish(br, ln, RACE_BAD_INPUT, 0);
            continue;
        }
        copy(n, br->bt->b0 + i * n, br->ys);
        rhs_eval(sys, ln->s, ln->d, br->ys, f, br->work);
        ln->stats->n_rhs += 1;
        if (!all_finite(n, br->ys) || !all_finite(n, f)) {
            lane_finish(br, ln, RACE_NONFINITE, 0);
            continue;
        }
        if (br->thresholds != NULL && ln->event_times != NULL)
            events_start(sys, br->thresholds, br->ys, br->t0, ln->pi_old, ln->event_times);
        while (ln->k_out < br->n_out && br->t_out[ln->k_out] <= br->t0) {
            copy(n, br->ys, ln->out + ln->k_out * n);
            ++ln->k_out;
        }
        ln->hmax = opt->hmax > 0.0 ? opt->hmax : br->t_end - br->t0;
        if (opt->h0 > 0.0) {
            ln->h = fmin(opt->h0, ln->hmax);
        } else {
            ln->h = initial_step(sys, ln->s, ln->d, br->ys, f, ln->hmax, opt->rtol, opt->atol,
                                 5.0, br->rc2, br->rc3, br->work);
            ln->stats->n_rhs += 1;
        }
        lane_put(br->ys, n, l, br->y);
        lane_put(f, n, l, br->k1);
        lane_put(ln->s, np, l, br->sv);
        lane_put(ln->d, nnz_targets(sys), l, br->dv);
        if (sys->rate != NULL)
            lane_put(sys->rate, n, l, br->ratev);
        ln->nstep = ln->iasti = ln->nonsti = 0;
        ln->max_steps = opt->max_steps;
        ln->reject = ln->last = ln->nonfinite = ln->stiff_wait = 0;
        ln->lfacold = DP_LOG_FACMIN;
        return 1;
    }
    ln->i = -1;
    return 0;
}

/* The checks at the top of dopri5_core's loop; 0 when the lane's system ended. */
static int lane_prepare(batch_run *br, lane_state *ln)
{
    if (ln->nstep >= ln->max_steps) {
        lane_finish(br, ln, RACE_MAX_STEPS, 0);
        return 0;
    }
    if (0.1 * fabs(ln->h) <= fabs(ln->t) * UROUND || !(ln->h > 0.0)) {
        lane_finish(br, ln, ln->nonfinite ? RACE_NONFINITE : RACE_STEP_TOO_SMALL, 0);
        return 0;
    }
    if (ln->t + 1.01 * ln->h - br->t_end > 0.0) {
        ln->h = br->t_end - ln->t;
        ln->last = 1;
    }
    ++ln->nstep;
    return 1;
}

/* An accepted step of lane l (the accept branch of dopri5_core); 0 when its system ended. */
static int lane_accept(batch_run *br, lane_state *ln, int l, double lerr, double hnew)
{
    const race_system *sys = &ln->sys;
    const int64_t n = sys->n_edges, np = sys->n_paths;
    const int events = br->thresholds != NULL && ln->event_times != NULL;
    const double h = ln->h;
    dp_dense dense = {br->ys, br->rc2, br->rc3, br->rc4, br->rc5};
    double tnew;
    int need_dense;

    ln->lfacold = fmax(lerr, DP_LOG_FACMIN);
    ln->stats->n_accepted += 1;
    tnew = ln->last ? br->t_end : ln->t + h;
    if (events) {
        lane_get(br->ynew, n, l, br->yn);
        race_path_strengths(sys, br->yn, br->pi_new);
    }
    need_dense = (ln->k_out < br->n_out && br->t_out[ln->k_out] < tnew) ||
                 (events && any_crossing(sys, br->thresholds, ln->pi_old, br->pi_new,
                                         ln->event_times));
    if (need_dense) {
        for (int64_t i = 0; i < n; ++i) {
            const int64_t j = i * RACE_LANES + l;
            double ydiff = br->ynew[j] - br->y[j];
            double bspl = h * br->k1[j] - ydiff;
            br->ys[i] = br->y[j];
            br->rc2[i] = ydiff;
            br->rc3[i] = bspl;
            br->rc4[i] = ydiff - h * br->k7[j] - bspl;
            br->rc5[i] = h * (D1 * br->k1[j] + D3 * br->k3[j] + D4 * br->k4[j] +
                              D5 * br->k5[j] + D6 * br->k6[j] + D7 * br->k7[j]);
        }
    }
    if (ln->k_out < br->n_out && br->t_out[ln->k_out] <= tnew) {
        lane_get(br->ynew, n, l, br->yn);
        ln->k_out = dense_outputs(0, n, ln->k_out, br->n_out, br->t_out, ln->t, h, tnew, br->ys,
                                  br->rc2, br->rc3, br->rc4, br->rc5, br->yn, ln->out);
    }
    if (events) {
        if (need_dense)
            locate_events(sys, br->thresholds, ln->pi_old, br->pi_new, ln->t, h, dp_dense_edge,
                          &dense, ln->event_times);
        copy(np, br->pi_new, ln->pi_old);
    }
    if (br->detect_stiff) {
        double stnum = 0.0, stden = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            const int64_t j = i * RACE_LANES + l;
            stnum += (br->k7[j] - br->k6[j]) * (br->k7[j] - br->k6[j]);
            stden += (br->ynew[j] - br->ytmp[j]) * (br->ynew[j] - br->ytmp[j]);
        }
        if (stden > 0.0 && h * sqrt(stnum / stden) > 3.25) {
            ln->nonsti = 0;
            ln->iasti += 1;
        } else {
            ln->nonsti += 1;
            if (ln->nonsti == 6)
                ln->iasti = 0;
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        const int64_t j = i * RACE_LANES + l;
        br->y[j] = br->ynew[j];
        br->k1[j] = br->k7[j];
    }
    ln->t = tnew;
    ln->stats->t_reached = tnew;
    if (ln->last) {
        lane_finish(br, ln, RACE_OK, 0);
        return 0;
    }
    if (fabs(hnew) > ln->hmax)
        hnew = ln->hmax;
    if (ln->reject)
        hnew = fmin(fabs(hnew), fabs(h));
    ln->reject = 0;
    ln->nonfinite = 0;
    ln->h = hnew;
    if (ln->iasti >= STIFF_CONFIRMATIONS) {
        lane_finish(br, ln, RACE_OK, 1);
        return 0;
    }
    return 1;
}

/* The stage points of dopri5_core for every lane, (y + h (a1 k1 + ...)) + (h a_last) k_last in
 * its association order, as flat loops over m = n_edges * RACE_LANES entries; H holds each
 * lane's step size repeated for every entry. */
LANE_LOOPS
static void dp_stage2(int64_t m, const double *restrict H, const double *restrict y,
                      const double *restrict k1, double *restrict yt)
{
    for (int64_t j = 0; j < m; ++j)
        yt[j] = y[j] + (H[j] * A21) * k1[j];
}

LANE_LOOPS
static void dp_stage3(int64_t m, const double *restrict H, const double *restrict y,
                      const double *restrict k1, const double *restrict k2, double *restrict yt)
{
    for (int64_t j = 0; j < m; ++j)
        yt[j] = (y[j] + H[j] * (A31 * k1[j])) + (H[j] * A32) * k2[j];
}

LANE_LOOPS
static void dp_stage4(int64_t m, const double *restrict H, const double *restrict y,
                      const double *restrict k1, const double *restrict k2,
                      const double *restrict k3, double *restrict yt)
{
    for (int64_t j = 0; j < m; ++j)
        yt[j] = (y[j] + H[j] * (A41 * k1[j] + A42 * k2[j])) + (H[j] * A43) * k3[j];
}

LANE_LOOPS
static void dp_stage5(int64_t m, const double *restrict H, const double *restrict y,
                      const double *restrict k1, const double *restrict k2,
                      const double *restrict k3, const double *restrict k4, double *restrict yt)
{
    for (int64_t j = 0; j < m; ++j)
        yt[j] = (y[j] + H[j] * (A51 * k1[j] + A52 * k2[j] + A53 * k3[j])) + (H[j] * A54) * k4[j];
}

LANE_LOOPS
static void dp_stage6(int64_t m, const double *restrict H, const double *restrict y,
                      const double *restrict k1, const double *restrict k2,
                      const double *restrict k3, const double *restrict k4,
                      const double *restrict k5, double *restrict yt)
{
    for (int64_t j = 0; j < m; ++j)
        yt[j] = (y[j] + H[j] * (A61 * k1[j] + A62 * k2[j] + A63 * k3[j] + A64 * k4[j])) +
                (H[j] * A65) * k5[j];
}

LANE_LOOPS
static void dp_stage7(int64_t m, const double *restrict H, const double *restrict y,
                      const double *restrict k1, const double *restrict k3,
                      const double *restrict k4, const double *restrict k5,
                      const double *restrict k6, double *restrict yn)
{
    for (int64_t j = 0; j < m; ++j)
        yn[j] = (y[j] + H[j] * (A71 * k1[j] + A73 * k3[j] + A74 * k4[j] + A75 * k5[j])) +
                (H[j] * A76) * k6[j];
}

static void dp_stages(batch_run *br, int64_t n, int has_rate)
{
    const race_system *sys = br->bt->sys;
    const int64_t m = n * RACE_LANES;
    const double *H = br->hv;
#define RHS_LANES(B, DB) \
    rhs_lanes(sys, has_rate, br->sv, br->dv, br->ratev, B, DB, br->pi, br->r, br->pre)
    dp_stage2(m, H, br->y, br->k1, br->ytmp);
    RHS_LANES(br->ytmp, br->k2);
    dp_stage3(m, H, br->y, br->k1, br->k2, br->ytmp);
    RHS_LANES(br->ytmp, br->k3);
    dp_stage4(m, H, br->y, br->k1, br->k2, br->k3, br->ytmp);
    RHS_LANES(br->ytmp, br->k4);
    dp_stage5(m, H, br->y, br->k1, br->k2, br->k3, br->k4, br->ytmp);
    RHS_LANES(br->ytmp, br->k5);
    dp_stage6(m, H, br->y, br->k1, br->k2, br->k3, br->k4, br->k5, br->ytmp);
    RHS_LANES(br->ytmp, br->k6);
    dp_stage7(m, H, br->y, br->k1, br->k3, br->k4, br->k5, br->k6, br->ynew);
    RHS_LANES(br->ynew, br->k7);
#undef RHS_LANES
}

/* error_norm of e for every lane (fmax written out with its NaN rule) */
LANE_LOOPS
static void lanes_norm(int64_t n, const double *restrict e, const double *restrict y,
                       const double *restrict ynew, double rtol, double atol,
                       double *restrict q2, double *restrict err)
{
    const int64_t m = n * RACE_LANES;
    for (int64_t j = 0; j < m; ++j) {
        double a = fabs(y[j]), b = fabs(ynew[j]);
        double sk = atol + rtol * ((a > b || b != b) ? a : b);
        double q = e[j] / sk;
        q2[j] = q * q;
    }
    for (int l = 0; l < RACE_LANES; ++l)
        err[l] = 0.0;
    for (int64_t i = 0; i < n; ++i)
        for (int l = 0; l < RACE_LANES; ++l)
            err[l] = err[l] + q2[i * RACE_LANES + l];
    for (int l = 0; l < RACE_LANES; ++l)
        err[l] = sqrt(err[l] / (double)n);
}

/* The DP5 error estimate of every lane (the errv of dopri5_core). */
LANE_LOOPS
static void dp_error_estimate(int64_t m, const double *restrict H, const double *restrict k1,
                              const double *restrict k3, const double *restrict k4,
                              const double *restrict k5, const double *restrict k6,
                              const double *restrict k7, double *restrict e)
{
    for (int64_t j = 0; j < m; ++j)
        e[j] = H[j] * (E1 * k1[j] + E3 * k3[j] + E4 * k4[j] + E5 * k5[j] + E6 * k6[j] +
                       E7 * k7[j]);
}

/* One DOPRI5 step of every running DOPRI5 lane (lanes whose system ended take the next one). */
static void dp_step(batch_run *br)
{
    const int64_t n = br->bt->sys->n_edges;
    const int has_rate = br->bt->rate != NULL;

    for (int l = 0; l < RACE_LANES; ++l) {
        lane_state *ln = &br->dp[l];
        while (ln->i >= 0 && !ln->stiff_wait && !lane_prepare(br, ln))
            if (ln->i < 0)
                lane_load(br, ln, l);
        for (int64_t i = 0; i < n; ++i)
            br->hv[i * RACE_LANES + l] = ln->i >= 0 && !ln->stiff_wait ? ln->h : 0.0;
    }
    dp_stages(br, n, has_rate);
    dp_error_estimate(n * RACE_LANES, br->hv, br->k1, br->k3, br->k4, br->k5, br->k6, br->k7,
                      br->ev);
    lanes_norm(n, br->ev, br->y, br->ynew, br->opt->rtol, br->opt->atol, br->q2, br->err);
    for (int l = 0; l < RACE_LANES; ++l) {
        lane_state *ln = &br->dp[l];
        double err = br->err[l], lerr, fac, hnew;
        if (ln->i < 0 || ln->stiff_wait)
            continue;
        ln->stats->n_rhs += 6;
        if (!(err <= DBL_MAX)) {
            ln->h = ln->h * 0.1;
            ln->reject = 1;
            ln->last = 0;
            ln->nonfinite = 1;
            ln->stats->n_rejected += 1;
            continue;
        }
        lerr = log(err);
        fac = exp(DP_EXPO1 * lerr - DP_BETA * ln->lfacold);
        fac = fmax(DP_FACC2, fmin(DP_FACC1, fac / DP_SAFE));
        hnew = ln->h / fac;
        if (err <= 1.0) {
            if (!lane_accept(br, ln, l, lerr, hnew) && ln->i < 0)
                lane_load(br, ln, l);
        } else {
            ln->h = ln->h / fmin(DP_FACC1, exp(DP_EXPO1 * lerr) / DP_SAFE);
            ln->reject = 1;
            ln->last = 0;
            ln->stats->n_rejected += 1;
        }
    }
}

/* ---- RODAS3 lanes: the operations of rodas3_core, lane by lane ---- */

/* Move the stiff system waiting in DOPRI5 lane l to the free RODAS3 lane m: the start of
 * rodas3_core as rodas3_after_stiff calls it (from the DOPRI5 lane's t, y and proposed h). */
static void ro_start(batch_run *br, int l, int m)
{
    lane_state *dp = &br->dp[l], *ln = &br->ro[m];
    const race_ode_options *opt = br->opt;
    int64_t n, np, remaining;
    double *f = br->yn;
    *ln = *dp;
    dp->i = -1;
    dp->stiff_wait = 0;
    n = ln->sys.n_edges;
    np = ln->sys.n_paths;
    ln->stiff_wait = 0;
    ln->pi_old = br->rpi_old + m * np;
    remaining = opt->max_steps - (ln->stats->n_accepted + ln->stats->n_rejected);
    if (remaining < 1) {
        lane_finish(br, ln, RACE_MAX_STEPS, 0);
        return;
    }
    lane_get(br->y, n, l, br->ys);
    race_rhs(&ln->sys, ln->s, ln->d, br->ys, f, br->work);
    ln->stats->n_rhs += 1;
    if (!all_finite(n, br->ys) || !all_finite(n, f)) {
        lane_finish(br, ln, RACE_NONFINITE, 0);
        return;
    }
    if (br->thresholds != NULL && ln->event_times != NULL)
        events_start(&ln->sys, br->thresholds, br->ys, ln->t, ln->pi_old, ln->event_times);
    while (ln->k_out < br->n_out && br->t_out[ln->k_out] <= ln->t) {
        copy(n, br->ys, ln->out + ln->k_out * n);
        ++ln->k_out;
    }
    ln->hmax = opt->hmax > 0.0 ? opt->hmax : br->t_end - ln->t;
    if (dp->h > 0.0) {
        ln->h = fmin(dp->h, ln->hmax);
    } else {
        ln->h = initial_step(&ln->sys, ln->s, ln->d, br->ys, f, ln->hmax, opt->rtol, opt->atol,
                             3.0, br->rc2, br->rc3, br->work);
        ln->stats->n_rhs += 1;
    }
    lane_put(br->ys, n, m, br->ry);
    lane_put(f, n, m, br->rf0);
    lane_put(ln->s, np, m, br->rsv);
    lane_put(ln->d, nnz_targets(&ln->sys), m, br->rdv);
    if (ln->sys.rate != NULL)
        lane_put(ln->sys.rate, n, m, br->rrate);
    ln->nstep = 0;
    ln->max_steps = remaining;
    ln->reject = ln->last = ln->nonfinite = ln->jac_current = 0;
}

LANE_LOOPS
static void ro_k2(int64_t m, const double *restrict hi, const double *restrict f0,
                  const double *restrict k1, double *restrict k2)
{
    for (int64_t j = 0; j < m; ++j)
        k2[j] = f0[j] + (RO_C21 * hi[j]) * k1[j];
}

LANE_LOOPS
static void ro_y3(int64_t m, const double *restrict y, const double *restrict k1,
                  double *restrict yt)
{
    for (int64_t j = 0; j < m; ++j)
        yt[j] = y[j] + 2.0 * k1[j];
}

LANE_LOOPS
static void ro_k3(int64_t m, const double *restrict hi, const double *restrict ft,
                  const double *restrict k1, const double *restrict k2, double *restrict k3)
{
    for (int64_t j = 0; j < m; ++j)
        k3[j] = ft[j] + (RO_C31 * hi[j]) * k1[j] + (RO_C32 * hi[j]) * k2[j];
}

LANE_LOOPS
static void ro_y4(int64_t m, const double *restrict y, const double *restrict k1,
                  const double *restrict k3, double *restrict yt)
{
    for (int64_t j = 0; j < m; ++j)
        yt[j] = y[j] + 2.0 * k1[j] + k3[j];
}

LANE_LOOPS
static void ro_k4(int64_t m, const double *restrict hi, const double *restrict ft,
                  const double *restrict k1, const double *restrict k2,
                  const double *restrict k3, double *restrict k4)
{
    for (int64_t j = 0; j < m; ++j)
        k4[j] = ft[j] + (RO_C41 * hi[j]) * k1[j] + (RO_C42 * hi[j]) * k2[j] +
                (RO_C43 * hi[j]) * k3[j];
}

LANE_LOOPS
static void ro_ynew(int64_t m, const double *restrict y, const double *restrict k1,
                    const double *restrict k3, const double *restrict k4, double *restrict yn)
{
    for (int64_t j = 0; j < m; ++j)
        yn[j] = y[j] + 2.0 * k1[j] + k3[j] + k4[j];
}

LANE_LOOPS
static void ro_dense_err(int64_t m, const double *restrict h, const double *restrict f0,
                         const double *restrict f1, const double *restrict y,
                         const double *restrict yn, double *restrict e)
{
    for (int64_t j = 0; j < m; ++j)
        e[j] = RO_DENSE * (h[j] * (f0[j] + f1[j]) - 2.0 * (yn[j] - y[j]));
}

/* Solve lane m's LU system in place for vector v. */
static void ro_solve(batch_run *br, int m, int64_t n, double *v)
{
    lane_get(v, n, m, br->yn);
    lu_solve(n, br->rg + m * n * n, br->rpiv + m * n, br->yn);
    lane_put(br->yn, n, m, v);
}

/* The accept branch of rodas3_core for lane m; 0 when its system ended. */
static int ro_accept(batch_run *br, int m, double hnew)
{
    lane_state *ln = &br->ro[m];
    const race_system *sys = &ln->sys;
    const int64_t n = sys->n_edges, np = sys->n_paths;
    const int events = br->thresholds != NULL && ln->event_times != NULL;
    const double h = ln->h;
    double *c1 = br->rc2, *c2 = br->rc3, *c3 = br->rc4;
    hermite_dense dense = {br->ys, c1, c2, c3};
    double tnew;

    ln->stats->n_accepted += 1;
    tnew = ln->last ? br->t_end : ln->t + h;
    if ((ln->k_out < br->n_out && br->t_out[ln->k_out] < tnew) || events) {
        for (int64_t i = 0; i < n; ++i) {
            const int64_t j = i * RACE_LANES + m;
            double hf0 = h * br->rf0[j], hf1 = h * br->rf1[j], dy = br->ryn[j] - br->ry[j];
            br->ys[i] = br->ry[j];
            c1[i] = hf0;
            c2[i] = 3.0 * dy - 2.0 * hf0 - hf1;
            c3[i] = hf0 + hf1 - 2.0 * dy;
        }
    }
    if (ln->k_out < br->n_out && br->t_out[ln->k_out] <= tnew) {
        lane_get(br->ryn, n, m, br->yn);
        ln->k_out = dense_outputs(1, n, ln->k_out, br->n_out, br->t_out, ln->t, h, tnew, br->ys,
                                  c1, c2, c3, NULL, br->yn, ln->out);
    }
    if (events) {
        lane_get(br->ryn, n, m, br->yn);
        race_path_strengths(sys, br->yn, br->pi_new);
        locate_events(sys, br->thresholds, ln->pi_old, br->pi_new, ln->t, h, hermite_edge, &dense,
                      ln->event_times);
        copy(np, br->pi_new, ln->pi_old);
    }
    for (int64_t i = 0; i < n; ++i) {
        const int64_t j = i * RACE_LANES + m;
        br->ry[j] = br->ryn[j];
        br->rf0[j] = br->rf1[j];
    }
    ln->jac_current = 0;
    ln->t = tnew;
    ln->stats->t_reached = tnew;
    if (ln->last) {
        lane_finish(br, ln, RACE_OK, 0);
        return 0;
    }
    if (hnew > ln->hmax)
        hnew = ln->hmax;
    if (ln->reject)
        hnew = fmin(hnew, h);
    ln->reject = 0;
    ln->nonfinite = 0;
    ln->h = hnew;
    return 1;
}

/* One RODAS3 step of every running RODAS3 lane. */
static void ro_step(batch_run *br)
{
    const race_system *sys = br->bt->sys;
    const int64_t n = sys->n_edges, m_all = n * RACE_LANES;
    const int has_rate = br->bt->rate != NULL;
    const double rtol = br->opt->rtol, atol = br->opt->atol;

    for (int m = 0; m < RACE_LANES; ++m) {
        lane_state *ln = &br->ro[m];
        double *jac = br->rjac + m * n * n, *g = br->rg + m * n * n, hinv, diag;
        ln->skip = 1;
        if (ln->i >= 0) {
            /* the checks at the top of rodas3_core's loop */
            if (ln->nstep >= ln->max_steps) {
                lane_finish(br, ln, RACE_MAX_STEPS, 0);
            } else if (0.1 * fabs(ln->h) <= fabs(ln->t) * UROUND || !(ln->h > 0.0)) {
                lane_finish(br, ln, ln->nonfinite ? RACE_NONFINITE : RACE_STEP_TOO_SMALL, 0);
            } else {
                if (ln->t + 1.01 * ln->h - br->t_end > 0.0) {
                    ln->h = br->t_end - ln->t;
                    ln->last = 1;
                }
                ++ln->nstep;
                if (!ln->jac_current) {
                    lane_get(br->ry, n, m, br->ys);
                    race_jacobian(&ln->sys, ln->s, ln->d, br->ys, jac, br->work);
                    ln->jac_current = 1;
                }
                hinv = 1.0 / ln->h;
                diag = 1.0 / (ln->h * RO_GAMMA);
                for (int64_t i = 0; i < n * n; ++i)
                    g[i] = -jac[i];
                for (int64_t i = 0; i < n; ++i)
                    g[i * n + i] = diag - jac[i * n + i];
                if (lu_factor(n, g, br->rpiv + m * n) != 0) {
                    ln->h = ln->h * 0.1;
                    ln->reject = 1;
                    ln->last = 0;
                    ln->nonfinite = 1;
                    ln->stats->n_rejected += 1;
                } else {
                    ln->skip = 0;
                    for (int64_t i = 0; i < n; ++i) {
                        br->rh[i * RACE_LANES + m] = ln->h;
                        br->rhi[i * RACE_LANES + m] = hinv;
                        br->rk1[i * RACE_LANES + m] = br->rf0[i * RACE_LANES + m];
                    }
                    ro_solve(br, m, n, br->rk1);
                }
            }
        }
        if (ln->skip) /* idle or rejected: finite values for the lane's (unused) arithmetic */
            for (int64_t i = 0; i < n; ++i)
                br->rh[i * RACE_LANES + m] = br->rhi[i * RACE_LANES + m] = 1.0;
    }
#define RHS_LANES(B, DB) \
    rhs_lanes(sys, has_rate, br->rsv, br->rdv, br->rrate, B, DB, br->pi, br->r, br->pre)
#define SOLVE_ALL(V)                      \
    for (int m = 0; m < RACE_LANES; ++m)  \
        if (!br->ro[m].skip)              \
            ro_solve(br, m, n, V);
    ro_k2(m_all, br->rhi, br->rf0, br->rk1, br->rk2);
    SOLVE_ALL(br->rk2)
    ro_y3(m_all, br->ry, br->rk1, br->ryt);
    RHS_LANES(br->ryt, br->rft);
    ro_k3(m_all, br->rhi, br->rft, br->rk1, br->rk2, br->rk3);
    SOLVE_ALL(br->rk3)
    ro_y4(m_all, br->ry, br->rk1, br->rk3, br->ryt);
    RHS_LANES(br->ryt, br->rft);
    ro_k4(m_all, br->rhi, br->rft, br->rk1, br->rk2, br->rk3, br->rk4);
    SOLVE_ALL(br->rk4)
    ro_ynew(m_all, br->ry, br->rk1, br->rk3, br->rk4, br->ryn);
    RHS_LANES(br->ryn, br->rf1);
#undef SOLVE_ALL
#undef RHS_LANES
    lanes_norm(n, br->rk4, br->ry, br->ryn, rtol, atol, br->rdense, br->rerr);
    ro_dense_err(m_all, br->rh, br->rf0, br->rf1, br->ry, br->ryn, br->rft);
    lanes_norm(n, br->rft, br->ry, br->ryn, rtol, atol, br->rdense, br->rerrd);

    for (int m = 0; m < RACE_LANES; ++m) {
        lane_state *ln = &br->ro[m];
        double err, errc, fac, hnew;
        int finite = 1;
        if (ln->i < 0 || ln->skip)
            continue;
        ln->stats->n_rhs += 3;
        for (int64_t i = 0; i < n; ++i)
            finite = finite && isfinite(br->rf1[i * RACE_LANES + m]);
        err = br->rerr[m];
        if (!finite)
            err = NAN;
        else if (br->rerrd[m] > err)
            err = br->rerrd[m];
        if (!(err <= DBL_MAX)) {
            ln->h = ln->h * 0.1;
            ln->reject = 1;
            ln->last = 0;
            ln->nonfinite = 1;
            ln->stats->n_rejected += 1;
            continue;
        }
        errc = err > 1e-10 ? err : 1e-10;
        fac = fmin(RO_FACMAX, fmax(RO_FACMIN, RO_SAFE * pow(errc, -1.0 / 3.0)));
        hnew = ln->h * fac;
        if (err <= 1.0) {
            ro_accept(br, m, hnew);
        } else {
            ln->reject = 1;
            ln->last = 0;
            ln->stats->n_rejected += 1;
            ln->h = hnew;
        }
    }
}

/* DOPRI5 (and, for auto, RODAS3) lanes over the batch: DOPRI5 lanes step while the RODAS3
 * lanes fill with systems that turned stiff; RODAS3 lanes step when all are busy, when a stiff
 * system waits for one, or when no DOPRI5 lane is left. */
static void batch_lanes(batch_run *br)
{
    for (int l = 0; l < RACE_LANES; ++l) {
        br->dp[l].i = -1;
        br->ro[l].i = -1;
        lane_load(br, &br->dp[l], l);
    }
    for (;;) {
        int dp_running = 0, dp_waiting = 0, ro_running = 0;
        for (int l = 0; l < RACE_LANES; ++l) {
            lane_state *ln = &br->dp[l];
            if (ln->i >= 0 && ln->stiff_wait) {
                for (int m = 0; m < RACE_LANES; ++m) {
                    if (br->ro[m].i < 0) {
                        ro_start(br, l, m);
                        lane_load(br, ln, l);
                        break;
                    }
                }
            }
            dp_running += ln->i >= 0 && !ln->stiff_wait;
            dp_waiting += ln->i >= 0 && ln->stiff_wait;
        }
        for (int m = 0; m < RACE_LANES; ++m)
            ro_running += br->ro[m].i >= 0;
        if (ro_running > 0 && (ro_running == RACE_LANES || dp_waiting > 0 || dp_running == 0))
            ro_step(br);
        else if (dp_running > 0)
            dp_step(br);
        else
            break;
    }
}

int race_ode_batch(const race_batch *bt, int method, int64_t first, int64_t last, double t0,
                   double t_end, int64_t n_out, const double *t_out,
                   const race_ode_options *opt, const double *thresholds, double *out,
                   double *event_times, int *status, race_stats *stats, double *work,
                   int64_t *iwork)
{
    const race_system *sys = bt->sys;
    const int64_t n = sys->n_edges, np = sys->n_paths;
    const int64_t lanes = RACE_LANES;
    batch_run br;
    double *w = work;

    if (method != RACE_METHOD_DOPRI5 && method != RACE_METHOD_RODAS3 &&
        method != RACE_METHOD_AUTO)
        return RACE_BAD_INPUT;
    if (bt->s_rows < 1 || bt->d_rows < 1 || (bt->rate != NULL && bt->rate_rows < 1))
        return RACE_BAD_INPUT;
    if (method == RACE_METHOD_RODAS3 || last - first < RACE_MIN_LANES ||
        n > RACE_MAX_LANE_EDGES) {
        /* one system at a time: RODAS3, and batches too small to fill the lanes */
        for (int64_t i = first; i < last; ++i) {
            race_system si;
            const double *s, *d, *b0 = bt->b0 + i * n;
            double *out_i = out + i * n_out * n, *ev_i = event_times ? event_times + i * np : NULL;
            batch_system(bt, i, &si, &s, &d);
            if (method == RACE_METHOD_RODAS3)
                status[i] = race_rodas3(&si, s, d, b0, t0, t_end, n_out, t_out, opt, thresholds,
                                        out_i, ev_i, stats + i, work, iwork);
            else if (method == RACE_METHOD_AUTO)
                status[i] = race_auto(&si, s, d, b0, t0, t_end, n_out, t_out, opt, thresholds,
                                      out_i, ev_i, stats + i, work, iwork);
            else
                status[i] = race_dopri5(&si, s, d, b0, t0, t_end, n_out, t_out, opt, thresholds,
                                        out_i, ev_i, stats + i, work);
        }
        return RACE_OK;
    }
    br.bt = bt;
    br.detect_stiff = method == RACE_METHOD_AUTO;
    br.t0 = t0;
    br.t_end = t_end;
    br.n_out = n_out;
    br.t_out = t_out;
    br.opt = opt;
    br.thresholds = thresholds;
    br.out = out;
    br.event_times = event_times;
    br.status = status;
    br.stats = stats;
    br.next = first;
    br.last_sys = last;
#define TAKE(name, count) \
    do {                  \
        br.name = w;      \
        w += (count);     \
    } while (0)
    TAKE(y, n * lanes);
    TAKE(k1, n * lanes);
    TAKE(k2, n * lanes);
    TAKE(k3, n * lanes);
    TAKE(k4, n * lanes);
    TAKE(k5, n * lanes);
    TAKE(k6, n * lanes);
    TAKE(k7, n * lanes);
    TAKE(ytmp, n * lanes);
    TAKE(ynew, n * lanes);
    TAKE(ratev, n * lanes);
    TAKE(sv, np * lanes);
    TAKE(pi, np * lanes);
    TAKE(r, np * lanes);
    TAKE(pre, sys->path_ptr[np] * lanes);
    TAKE(dv, nnz_targets(sys) * lanes);
    TAKE(hv, n * lanes);
    TAKE(ev, n * lanes);
    TAKE(q2, n * lanes);
    TAKE(err, lanes);
    TAKE(pi_old, np * lanes);
    TAKE(ry, n * lanes);
    TAKE(rf0, n * lanes);
    TAKE(rf1, n * lanes);
    TAKE(ryt, n * lanes);
    TAKE(rft, n * lanes);
    TAKE(rk1, n * lanes);
    TAKE(rk2, n * lanes);
    TAKE(rk3, n * lanes);
    TAKE(rk4, n * lanes);
    TAKE(ryn, n * lanes);
    TAKE(rrate, n * lanes);
    TAKE(rh, n * lanes);
    TAKE(rhi, n * lanes);
    TAKE(rdense, n * lanes);
    TAKE(rsv, np * lanes);
    TAKE(rdv, nnz_targets(sys) * lanes);
    TAKE(rerr, lanes);
    TAKE(rerrd, lanes);
    TAKE(rjac, n * n * lanes);
    TAKE(rg, n * n * lanes);
    TAKE(rpi_old, np * lanes);
    TAKE(ys, n);
    TAKE(yn, n);
    TAKE(rc2, n);
    TAKE(rc3, n);
    TAKE(rc4, n);
    TAKE(rc5, n);
    TAKE(pi_new, np);
    br.work = w;
#undef TAKE
    br.iwork = iwork;
    br.rpiv = iwork + n;
    /* idle lanes compute on the lane vectors: keep them finite (the Jacobian and LU blocks and
     * pi_old of the RODAS3 lanes are written before they are read) */
    for (double *p = work; p < br.rjac; ++p)
        *p = 0.0;
    batch_lanes(&br);
    return RACE_OK;
}
