/*
 * race.c -- the fastrace C core (see race.h).  C99 + libm, no Python.
 *
 * The numba kernels in fastrace/_kernels/race.py mirror these algorithms operation for
 * operation (same formulas, same summation order, same step control), and the build turns
 * off floating-point contraction (-ffp-contract=off), so both give the same numbers to
 * round-off.  Any change here must be made there too.
 */
#include "race.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------- layout of `work` --- */
/*
 *   pi   [n_paths]   path strengths
 *   r    [n_paths]   path residuals s_p - sum_j d_jp pi_j
 *   dpi  [nnz]       d pi_p / d b_e for the k-th entry of path p (prefix * suffix product)
 *   g    [n_edges]   scratch row (Jacobian)
 *   suf  [max_len]   suffix products along one path (Jacobian)
 * and, for the integrators, before those: 16 vectors of n_edges (stages, dense output).
 */

static int64_t max_path_length(const race_system *sys)
{
    int64_t longest = 0;
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        int64_t len = sys->path_ptr[p + 1] - sys->path_ptr[p];
        if (len > longest) longest = len;
    }
    return longest;
}

#define N_INTEGRATOR_VECTORS 16

size_t race_work_size(const race_system *sys)
{
    size_t n_edges = (size_t)sys->n_edges;
    size_t n_paths = (size_t)sys->n_paths;
    size_t nnz = (size_t)sys->path_ptr[sys->n_paths];
    size_t eval = 2 * n_paths + nnz + n_edges + (size_t)max_path_length(sys);
    return N_INTEGRATOR_VECTORS * n_edges + eval;
}

/* --------------------------------------------------------------- path quantities --- */

void race_path_strengths(const race_system *sys, const double *b, double *pi)
{
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        double prod = 1.0;
        for (int64_t k = sys->path_ptr[p]; k < sys->path_ptr[p + 1]; ++k)
            prod *= b[sys->path_edges[k]];
        pi[p] = prod;
    }
}

/* pi[p] and dpi[k] = prod_{l != k in path p} b_l, by a forward (prefix) and a backward
 * (suffix) sweep; no division. */
static void path_products(const race_system *sys, const double *b, double *pi, double *dpi)
{
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        const int64_t start = sys->path_ptr[p], stop = sys->path_ptr[p + 1];
        double prefix = 1.0;
        for (int64_t k = start; k < stop; ++k) {
            dpi[k] = prefix;
            prefix *= b[sys->path_edges[k]];
        }
        pi[p] = prefix;
        double suffix = 1.0;
        for (int64_t k = stop - 1; k >= start; --k) {
            dpi[k] *= suffix;
            suffix *= b[sys->path_edges[k]];
        }
    }
}

/* r[p] = s[p] - sum_{k in row p} d[k] pi[target_paths[k]]. */
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

/* The right-hand side, with work laid out as pi | r | dpi. */
static void rhs_eval(const race_system *sys, const double *s, const double *d, const double *b,
                     double *db, double *work)
{
    const int64_t n_paths = sys->n_paths;
    double *pi = work;
    double *r = pi + n_paths;
    double *dpi = r + n_paths;

    path_products(sys, b, pi, dpi);
    residuals(sys, s, d, pi, r);
    for (int64_t e = 0; e < sys->n_edges; ++e) db[e] = 0.0;
    for (int64_t p = 0; p < n_paths; ++p) {
        const double rp = r[p];
        for (int64_t k = sys->path_ptr[p]; k < sys->path_ptr[p + 1]; ++k)
            db[sys->path_edges[k]] += dpi[k] * rp;
    }
    if (sys->rate != NULL)
        for (int64_t e = 0; e < sys->n_edges; ++e) db[e] *= sys->rate[e];
}

void race_rhs(const race_system *sys, const double *s, const double *d, const double *b,
              double *db, double *work)
{
    rhs_eval(sys, s, d, b, db, work + N_INTEGRATOR_VECTORS * sys->n_edges);
}

void race_jacobian(const race_system *sys, const double *s, const double *d, const double *b,
                   double *jac, double *work)
{
    const int64_t n_edges = sys->n_edges, n_paths = sys->n_paths;
    double *pi = work + N_INTEGRATOR_VECTORS * n_edges;
    double *r = pi + n_paths;
    double *dpi = r + n_paths;
    double *g = dpi + sys->path_ptr[n_paths];
    double *suf = g + n_edges;

    path_products(sys, b, pi, dpi);
    residuals(sys, s, d, pi, r);
    for (int64_t i = 0; i < n_edges * n_edges; ++i) jac[i] = 0.0;

    for (int64_t p = 0; p < n_paths; ++p) {
        const int64_t start = sys->path_ptr[p], stop = sys->path_ptr[p + 1];
        const int64_t len = stop - start;
        const double rp = r[p];

        /* g[f] = d r_p / d b_f = -sum_{j in T(p)} d_jp d pi_j / d b_f */
        for (int64_t f = 0; f < n_edges; ++f) g[f] = 0.0;
        for (int64_t k = sys->target_ptr[p]; k < sys->target_ptr[p + 1]; ++k) {
            const int64_t j = sys->target_paths[k];
            const double djp = d[k];
            for (int64_t q = sys->path_ptr[j]; q < sys->path_ptr[j + 1]; ++q)
                g[sys->path_edges[q]] -= djp * dpi[q];
        }
        /* the term (prod_{e' != e} b_e') * d r_p / d b_f */
        for (int64_t k = start; k < stop; ++k) {
            double *row = jac + sys->path_edges[k] * n_edges;
            const double w = dpi[k];
            for (int64_t f = 0; f < n_edges; ++f) row[f] += w * g[f];
        }
        /* the term d(prod_{e' != e} b_e')/d b_f * r_p: products leaving out two edges */
        double suffix = 1.0;
        for (int64_t i = len - 1; i >= 0; --i) {
            suf[i] = suffix; /* product of the edges after position i */
            suffix *= b[sys->path_edges[start + i]];
        }
        double prefix = 1.0; /* product of the edges before position i */
        for (int64_t i = 0; i < len; ++i) {
            const int64_t ei = sys->path_edges[start + i];
            double mid = prefix; /* product of the edges before l, except i */
            for (int64_t l = i + 1; l < len; ++l) {
                const int64_t el = sys->path_edges[start + l];
                const double both = (mid * suf[l]) * rp;
                jac[ei * n_edges + el] += both;
                jac[el * n_edges + ei] += both;
                mid *= b[el];
            }
            prefix *= b[ei];
        }
    }
    if (sys->rate != NULL)
        for (int64_t e = 0; e < n_edges; ++e) {
            const double rate = sys->rate[e];
            for (int64_t f = 0; f < n_edges; ++f) jac[e * n_edges + f] *= rate;
        }
}

double race_loss(const race_system *sys, const double *s, const double *d, const double *b,
                 double *work)
{
    double *pi = work + N_INTEGRATOR_VECTORS * sys->n_edges;
    race_path_strengths(sys, b, pi);
    double loss = 0.0;
    for (int64_t p = 0; p < sys->n_paths; ++p) {
        double acc = 0.0;
        for (int64_t k = sys->target_ptr[p]; k < sys->target_ptr[p + 1]; ++k)
            acc += d[k] * pi[sys->target_paths[k]];
        loss += pi[p] * (0.5 * acc - s[p]);
    }
    return loss;
}

/* ------------------------------------------------------------------------ events --- */

/* pi of one path. */
static double path_strength(const race_system *sys, int64_t p, const double *b)
{
    double prod = 1.0;
    for (int64_t k = sys->path_ptr[p]; k < sys->path_ptr[p + 1]; ++k)
        prod *= b[sys->path_edges[k]];
    return prod;
}

/* g0[i] = pi_{path[i]}(b0) - level[i]; event_time[i] = t0 if that is zero, NaN otherwise.
 * g0 is kept in event_time's place as a sign only through `sign0`. */
static int crossed(double g0, double g)
{
    return g == 0.0 || (g0 > 0.0 && g < 0.0) || (g0 < 0.0 && g > 0.0);
}

static int all_finite(const double *v, int64_t n)
{
    for (int64_t i = 0; i < n; ++i)
        if (!isfinite(v[i])) return 0;
    return 1;
}

static void fill_nan(double *out, int64_t out_stride, int64_t from, int64_t n_out, int64_t n_edges)
{
    for (int64_t i = from; i < n_out; ++i)
        for (int64_t e = 0; e < n_edges; ++e) out[i * out_stride + e] = NAN;
}

/* ---------------------------------------------------------------- gradient descent --- */

race_result race_gd_map(const race_system *sys, const double *s, const double *d,
                        const double *b0, double lr, int64_t n_steps,
                        const int64_t *record_steps, int64_t n_record,
                        double *out, int64_t out_stride,
                        const int64_t *event_path, const double *event_level, int64_t n_events,
                        double *event_time, double *work)
{
    const int64_t n_edges = sys->n_edges;
    double *y = work;
    double *f = y + n_edges;
    double *g0 = f + n_edges; /* event values at step 0: n_events <= ... see below */
    double *eval = work + N_INTEGRATOR_VECTORS * n_edges;
    race_result res = {RACE_OK, 0, 0, 0, 0.0};
    int64_t next = 0;

    (void)g0;
    for (int64_t e = 0; e < n_edges; ++e) y[e] = b0[e];
    for (int64_t i = 0; i < n_events; ++i) event_time[i] = NAN;
    /* The sign at step 0 of each event function is recomputed on demand from b0. */
    for (int64_t i = 0; i < n_events; ++i) {
        const double gi = path_strength(sys, event_path[i], b0) - event_level[i];
        if (gi == 0.0) event_time[i] = 0.0;
    }
    while (next < n_record && record_steps[next] <= 0) {
        for (int64_t e = 0; e < n_edges; ++e) out[next * out_stride + e] = y[e];
        ++next;
    }
    for (int64_t k = 1; k <= n_steps; ++k) {
        rhs_eval(sys, s, d, y, f, eval);
        res.n_rhs += 1;
        for (int64_t e = 0; e < n_edges; ++e) y[e] = y[e] + lr * f[e];
        if (!all_finite(y, n_edges)) {
            res.status = RACE_NONFINITE;
            break;
        }
        res.n_accepted = k;
        res.t = (double)k * lr;
        for (int64_t i = 0; i < n_events; ++i) {
            if (!isnan(event_time[i])) continue;
            const double gstart = path_strength(sys, event_path[i], b0) - event_level[i];
            const double gk = path_strength(sys, event_path[i], y) - event_level[i];
            if (crossed(gstart, gk)) event_time[i] = (double)k * lr;
        }
        while (next < n_record && record_steps[next] <= k) {
            for (int64_t e = 0; e < n_edges; ++e) out[next * out_stride + e] = y[e];
            ++next;
        }
    }
    fill_nan(out, out_stride, next, n_record, n_edges);
    return res;
}

/* --------------------------------------------------------------- Dormand-Prince 5(4) --- */

/* Hairer & Wanner, "Solving ODEs I", 2nd ed., Table 5.2, and the DOPRI5 code's dense output. */
static const double C2 = 1.0 / 5.0, C3 = 3.0 / 10.0, C4 = 4.0 / 5.0, C5 = 8.0 / 9.0;
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

/* Step control constants of Hairer's DOPRI5. */
#define UROUND 2.3e-16
#define SAFE 0.9
#define FAC1 0.2  /* smallest step ratio */
#define FAC2 10.0 /* largest step ratio */
#define BETA 0.04
#define EXPO1 (0.2 - BETA * 0.75)

void race_dopri5_default_options(race_dopri5_options *opt)
{
    opt->rtol = 1e-8;
    opt->atol = 1e-10;
    opt->h0 = 0.0;
    opt->hmax = 0.0;
    opt->max_steps = 1000000;
}

/* Hairer's starting step size (HINIT of DOPRI5, order 5).  f0 = f(y); y1, f1 are scratch. */
static double initial_step(const race_system *sys, const double *s, const double *d,
                           const double *y, const double *f0, double *y1, double *f1,
                           double rtol, double atol, double hmax, double *eval)
{
    const int64_t n = sys->n_edges;
    double dnf = 0.0, dny = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double sk = atol + rtol * fabs(y[i]);
        dnf += (f0[i] / sk) * (f0[i] / sk);
        dny += (y[i] / sk) * (y[i] / sk);
    }
    double h;
    if (dnf <= 1e-10 || dny <= 1e-10)
        h = 1.0e-6;
    else
        h = sqrt(dny / dnf) * 0.01;
    if (h > hmax) h = hmax;
    for (int64_t i = 0; i < n; ++i) y1[i] = y[i] + h * f0[i];
    rhs_eval(sys, s, d, y1, f1, eval);
    double der2 = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double sk = atol + rtol * fabs(y[i]);
        der2 += ((f1[i] - f0[i]) / sk) * ((f1[i] - f0[i]) / sk);
    }
    der2 = sqrt(der2) / h;
    double der12 = sqrt(dnf);
    if (fabs(der2) > der12) der12 = fabs(der2);
    double h1;
    if (der12 <= 1e-15) {
        h1 = fabs(h) * 1.0e-3;
        if (h1 < 1.0e-6) h1 = 1.0e-6;
    } else {
        h1 = pow(0.01 / der12, 1.0 / 5.0);
    }
    double hnew = 100.0 * fabs(h);
    if (h1 < hnew) hnew = h1;
    if (hmax < hnew) hnew = hmax;
    return hnew;
}

/* The 4th-order continuous extension at theta in [0, 1] (Hairer's CONTD5). */
static void dense_eval(int64_t n, const double *rc1, const double *rc2, const double *rc3,
                       const double *rc4, const double *rc5, double theta, double *y)
{
    const double theta1 = 1.0 - theta;
    for (int64_t i = 0; i < n; ++i)
        y[i] = rc1[i] + theta * (rc2[i] + theta1 * (rc3[i] + theta * (rc4[i] + theta1 * rc5[i])));
}

race_result race_dopri5(const race_system *sys, const double *s, const double *d,
                        const double *b0, double t0, double t_end,
                        const double *t_out, int64_t n_out, double *out, int64_t out_stride,
                        const int64_t *event_path, const double *event_level, int64_t n_events,
                        double *event_time, const race_dopri5_options *opt, double *work)
{
    const int64_t n = sys->n_edges;
    double *y = work, *y1 = y + n, *ysti = y1 + n;
    double *k1 = ysti + n, *k2 = k1 + n, *k3 = k2 + n, *k4 = k3 + n, *k5 = k4 + n, *k6 = k5 + n,
           *k7 = k6 + n;
    double *rc1 = k7 + n, *rc2 = rc1 + n, *rc3 = rc2 + n, *rc4 = rc3 + n, *rc5 = rc4 + n;
    double *ytmp = rc5 + n;
    double *eval = work + N_INTEGRATOR_VECTORS * n;

    const double rtol = opt->rtol, atol = opt->atol;
    const double hmax = opt->hmax > 0.0 ? opt->hmax : t_end - t0;
    race_result res = {RACE_OK, 0, 0, 0, t0};
    int64_t next = 0;

    for (int64_t i = 0; i < n; ++i) y[i] = b0[i];
    for (int64_t i = 0; i < n_events; ++i) {
        const double g0 = path_strength(sys, event_path[i], y) - event_level[i];
        event_time[i] = g0 == 0.0 ? t0 : NAN;
    }
    while (next < n_out && t_out[next] <= t0) {
        for (int64_t i = 0; i < n; ++i) out[next * out_stride + i] = y[i];
        ++next;
    }

    rhs_eval(sys, s, d, y, k1, eval);
    res.n_rhs = 1;
    if (!all_finite(k1, n)) {
        res.status = RACE_NONFINITE;
        fill_nan(out, out_stride, next, n_out, n);
        return res;
    }
    double h;
    if (opt->h0 > 0.0) {
        h = opt->h0 < hmax ? opt->h0 : hmax;
    } else {
        h = initial_step(sys, s, d, y, k1, y1, k2, rtol, atol, hmax, eval);
        res.n_rhs += 1;
    }

    double t = t0, facold = 1.0e-4;
    int reject = 0, last = 0, nonfinite = 0;
    int64_t n_attempts = 0;

    for (;;) {
        if (n_attempts >= opt->max_steps) {
            res.status = RACE_MAX_STEPS;
            break;
        }
        if (0.1 * fabs(h) <= fabs(t) * UROUND || !(h > 0.0)) {
            res.status = nonfinite ? RACE_NONFINITE : RACE_STEP_TOO_SMALL;
            break;
        }
        if ((t + 1.01 * h - t_end) > 0.0) {
            h = t_end - t;
            last = 1;
        }
        ++n_attempts;

        for (int64_t i = 0; i < n; ++i) y1[i] = y[i] + h * (A21 * k1[i]);
        rhs_eval(sys, s, d, y1, k2, eval);
        for (int64_t i = 0; i < n; ++i) y1[i] = y[i] + h * (A31 * k1[i] + A32 * k2[i]);
        rhs_eval(sys, s, d, y1, k3, eval);
        for (int64_t i = 0; i < n; ++i)
            y1[i] = y[i] + h * (A41 * k1[i] + A42 * k2[i] + A43 * k3[i]);
        rhs_eval(sys, s, d, y1, k4, eval);
        for (int64_t i = 0; i < n; ++i)
            y1[i] = y[i] + h * (A51 * k1[i] + A52 * k2[i] + A53 * k3[i] + A54 * k4[i]);
        rhs_eval(sys, s, d, y1, k5, eval);
        for (int64_t i = 0; i < n; ++i)
            ysti[i] = y[i] + h * (A61 * k1[i] + A62 * k2[i] + A63 * k3[i] + A64 * k4[i]
                                  + A65 * k5[i]);
        rhs_eval(sys, s, d, ysti, k6, eval);
        for (int64_t i = 0; i < n; ++i)
            y1[i] = y[i] + h * (A71 * k1[i] + A73 * k3[i] + A74 * k4[i] + A75 * k5[i]
                                + A76 * k6[i]);
        rhs_eval(sys, s, d, y1, k7, eval);
        res.n_rhs += 6;
        const double t_new = last ? t_end : t + h;

        double err = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            const double ay = fabs(y[i]), ay1 = fabs(y1[i]);
            const double sk = atol + rtol * (ay > ay1 ? ay : ay1);
            const double ei = h * (E1 * k1[i] + E3 * k3[i] + E4 * k4[i] + E5 * k5[i] + E6 * k6[i]
                                   + E7 * k7[i]);
            err += (ei / sk) * (ei / sk);
        }
        err = sqrt(err / (double)n);

        if (!(err <= 1.0) || !all_finite(y1, n) || !all_finite(k7, n)) {
            /* rejected */
            double hnew;
            if (isfinite(err)) {
                nonfinite = 0;
                const double fac11 = pow(err, EXPO1);
                double fac = fac11 / SAFE;
                if (fac > 1.0 / FAC1) fac = 1.0 / FAC1;
                hnew = h / fac;
            } else {
                nonfinite = 1;
                hnew = h * FAC1;
            }
            reject = 1;
            last = 0;
            res.n_rejected += 1;
            h = hnew;
            continue;
        }

        /* accepted */
        nonfinite = 0;
        const double fac11 = pow(err, EXPO1);
        double fac = fac11 / pow(facold, BETA);
        fac = fac / SAFE;
        if (fac > 1.0 / FAC1) fac = 1.0 / FAC1;
        if (fac < 1.0 / FAC2) fac = 1.0 / FAC2;
        double hnew = h / fac;
        facold = err > 1.0e-4 ? err : 1.0e-4;
        res.n_accepted += 1;

        int have_dense = 0;
        const int need_out = next < n_out && t_out[next] <= t_new;
        int need_events = 0;
        for (int64_t i = 0; i < n_events; ++i)
            if (isnan(event_time[i]) && !isnan(event_level[i])) {
                const double g0 = path_strength(sys, event_path[i], b0) - event_level[i];
                const double g1 = path_strength(sys, event_path[i], y1) - event_level[i];
                if (crossed(g0, g1)) need_events = 1;
            }
        if (need_out || need_events) {
            for (int64_t i = 0; i < n; ++i) {
                const double ydiff = y1[i] - y[i];
                const double bspl = h * k1[i] - ydiff;
                rc1[i] = y[i];
                rc2[i] = ydiff;
                rc3[i] = bspl;
                rc4[i] = ydiff - h * k7[i] - bspl;
                rc5[i] = h * (D1 * k1[i] + D3 * k3[i] + D4 * k4[i] + D5 * k5[i] + D6 * k6[i]
                              + D7 * k7[i]);
            }
            have_dense = 1;
        }
        (void)have_dense;
        while (next < n_out && t_out[next] <= t_new) {
            double *o = out + next * out_stride;
            if (t_out[next] == t_new) {
                for (int64_t i = 0; i < n; ++i) o[i] = y1[i];
            } else {
                dense_eval(n, rc1, rc2, rc3, rc4, rc5, (t_out[next] - t) / h, o);
            }
            ++next;
        }
        if (need_events) {
            for (int64_t i = 0; i < n_events; ++i) {
                if (!isnan(event_time[i]) || isnan(event_level[i])) continue;
                const int64_t p = event_path[i];
                const double level = event_level[i];
                const double g0 = path_strength(sys, p, b0) - level;
                if (!crossed(g0, path_strength(sys, p, y1) - level)) continue;
                /* bisection: lo is on g0's side, hi is across */
                double lo = t, hi = t_new;
                for (int iter = 0; iter < 200; ++iter) {
                    const double mid = 0.5 * (lo + hi);
                    if (!(mid > lo && mid < hi)) break;
                    if (hi - lo <= 1e-13 * fabs(hi)) break;
                    dense_eval(n, rc1, rc2, rc3, rc4, rc5, (mid - t) / h, ytmp);
                    if (crossed(g0, path_strength(sys, p, ytmp) - level))
                        hi = mid;
                    else
                        lo = mid;
                }
                event_time[i] = hi;
            }
        }

        for (int64_t i = 0; i < n; ++i) {
            k1[i] = k7[i];
            y[i] = y1[i];
        }
        t = t_new;
        res.t = t;
        if (last) break;
        if (fabs(hnew) > hmax) hnew = hmax;
        if (reject && hnew > h) hnew = h;
        reject = 0;
        h = hnew;
    }
    fill_nan(out, out_stride, next, n_out, n);
    return res;
}
