/*
 * race.h -- the C core of fastrace: right-hand side, Jacobian and integrators of a
 * reduced ("race") system of gated deep linear network dynamics.
 *
 * C99, no dependency besides libm; race.c compiles on its own into any C or C++ program.
 *
 * A race system has n_edges scalar weights b_e and n_paths paths.  Path p is an ordered
 * list of distinct edges (input to output), its strength is pi_p = prod_{e in p} b_e.
 * T(p) is the list of paths that end at the same output as p (p included).  For one
 * singular mode the dynamics are (MATH.md section 3)
 *
 *     db_e/dt = rate_e * sum_{p containing e} ( prod_{e' in p, e' != e} b_e' ) * r_p,
 *     r_p     = s_p - sum_{j in T(p)} d_jp pi_j,
 *
 * and the loss of the mode, without its constant, is
 *
 *     L = sum_p ( 1/2 sum_{j in T(p)} d_jp pi_j  -  s_p ) pi_p.
 *
 * Storage (all arrays row-major, int64_t indices, double values):
 *   path_ptr     (n_paths + 1)   CSR row pointers; path p has edges
 *   path_edges   (nnz)           path_edges[path_ptr[p] .. path_ptr[p+1]-1], input first
 *   target_ptr   (n_paths + 1)   CSR row pointers of T(p)
 *   target_paths (nnz_t)         T(p) = target_paths[target_ptr[p] .. target_ptr[p+1]-1]
 *   rate         (n_edges)       per-edge rate factors, or NULL for all ones
 * and per mode, passed separately to every function:
 *   s            (n_paths)       s_p
 *   d            (nnz_t)         d[k] = d_{j p} for j = target_paths[k], k in row p
 *
 * The products prod_{e' != e} are formed with prefix and suffix products along the path;
 * nothing divides by b_e, which may be zero.
 *
 * Every function that needs scratch memory takes a caller-owned `work` buffer whose size
 * (in doubles) the matching *_work_size function returns; no function allocates.
 * Nothing here is thread-unsafe: separate systems may run concurrently with separate work
 * buffers.  Batching over many systems is a loop in the caller.
 */
#ifndef FASTRACE_RACE_H
#define FASTRACE_RACE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RACE_API_VERSION 1

/* Status codes returned by the integrators. */
enum race_status {
    RACE_OK = 0,              /* reached t_end / the last requested step */
    RACE_MAX_STEPS = 1,       /* the step limit was hit before t_end */
    RACE_STEP_TOO_SMALL = 2,  /* the step size fell below round-off of t */
    RACE_NONFINITE = 3,       /* the state or its derivative became inf or NaN */
    RACE_BAD_INPUT = 4        /* invalid arguments (see race_check) */
};

/* The structure of a race system: pointers are borrowed, never freed. */
typedef struct race_system {
    int64_t n_edges;
    int64_t n_paths;
    const int64_t *path_ptr;
    const int64_t *path_edges;
    const int64_t *target_ptr;
    const int64_t *target_paths;
    const double *rate;       /* may be NULL: every rate is 1 */
} race_system;

/* Options of the adaptive integrators. */
typedef struct race_ode_options {
    double rtol;              /* relative tolerance, > 0 */
    double atol;              /* absolute tolerance, > 0 */
    double h0;                /* first step; <= 0 chooses it (Hairer's algorithm) */
    double hmax;              /* largest step; <= 0 means t_end - t0 */
    int64_t max_steps;        /* limit on attempted steps (accepted + rejected) */
} race_ode_options;

/* Counters filled by the integrators. */
typedef struct race_stats {
    int64_t n_accepted;       /* accepted steps (gd: steps taken) */
    int64_t n_rejected;       /* rejected steps */
    int64_t n_rhs;            /* right-hand-side evaluations */
    double t_reached;         /* last time reached (gd: steps taken times lr) */
} race_stats;

/* Returns RACE_OK when the structure is consistent (pointers non-NULL, CSR rows
 * non-decreasing, indices in range, every path non-empty with distinct edges),
 * RACE_BAD_INPUT otherwise. */
int race_check(const race_system *sys);

/* Number of edges of the longest path. */
int64_t race_max_path_length(const race_system *sys);

/* Scratch sizes, in doubles. */
size_t race_work_size(const race_system *sys);          /* rhs, jacobian, loss */
size_t race_gd_work_size(const race_system *sys);
size_t race_dopri5_work_size(const race_system *sys);
size_t race_rodas3_work_size(const race_system *sys);  /* plus n_edges int64_t in iwork */
size_t race_auto_work_size(const race_system *sys);    /* plus n_edges int64_t in iwork */

/* pi (n_paths) = path strengths of b (n_edges). */
void race_path_strengths(const race_system *sys, const double *b, double *pi);

/* db (n_edges) = db/dt at b for the mode (s, d). */
void race_rhs(const race_system *sys, const double *s, const double *d, const double *b,
              double *db, double *work);

/* jac (n_edges x n_edges, row-major): jac[e * n_edges + f] = d(db_e/dt)/d(b_f). */
void race_jacobian(const race_system *sys, const double *s, const double *d, const double *b,
                   double *jac, double *work);

/* The loss of the mode at b (without its constant). */
double race_loss(const race_system *sys, const double *s, const double *d, const double *b,
                 double *work);

/*
 * Gradient descent, the exact Euler map b <- b + lr * rhs(b), from b0 at step 0.
 * record_steps (n_record, non-decreasing, >= 0): steps at which b is written to
 * out[k * n_edges .. ]; the run stops after step record_steps[n_record - 1].
 * Stops with RACE_NONFINITE when b becomes inf/NaN; rows not reached are set to NaN.
 */
int race_gd_map(const race_system *sys, const double *s, const double *d, const double *b0,
                double lr, int64_t n_record, const int64_t *record_steps, double *out,
                race_stats *stats, double *work);

/*
 * Adaptive Dormand-Prince 5(4) (Hairer's coefficients) from b0 at t0 to t_end > t0.
 *
 * Error norm: sqrt(mean_i (err_i / (atol + rtol * max(|y_i|, |ynew_i|)))^2), a step is
 * accepted when it is <= 1.  Step control: Hairer's DOPRI5 PI ("Lund-stabilised")
 * controller, h_new = h / clamp(err^0.17 / err_old^0.04 / 0.9, 1/10, 5) (err_old >= 1e-4, the
 * powers taken as exp(0.17 ln err - 0.04 ln err_old)), no increase right after a rejection; a rejected step shrinks by clamp(err^0.17 / 0.9, <= 5); a non-finite
 * error estimate rejects the step with h *= 0.1.  The last step is shortened to land on
 * t_end exactly.  A run ends with RACE_MAX_STEPS after opt->max_steps attempted steps, and
 * with RACE_STEP_TOO_SMALL when 0.1 h <= |t| DBL_EPSILON (RACE_NONFINITE instead when the
 * steps shrank because of inf/NaN), so it never hangs.
 *
 * Output: out[k * n_edges .. ] = b(t_out[k]) for the n_out non-decreasing times t_out in
 * [t0, t_end], from the 4th-order continuous extension of DP5 (the state itself when a
 * step ends on t_out[k]).  On failure, outputs not reached are NaN.
 *
 * Events (optional, thresholds may be NULL): thresholds (n_paths), NaN = no event.
 * event_times[p] = first time pi_p - thresholds[p] changes sign (or is exactly 0) between
 * the two ends of an accepted step, located by bisection on the dense output; NaN if never.
 * Two crossings inside one step are not seen.
 *
 * Returns a race_status; stats may be NULL.
 */
int race_dopri5(const race_system *sys, const double *s, const double *d, const double *b0,
                double t0, double t_end, int64_t n_out, const double *t_out,
                const race_ode_options *opt, const double *thresholds, double *out,
                double *event_times, race_stats *stats, double *work);

/*
 * Rosenbrock method RODAS3 (4 stages, order 3, embedded order 2, stiffly accurate,
 * L-stable; Sandu et al., Atmos. Environ. 31 (1997) 3459) with the analytic Jacobian and
 * a dense LU with partial pivoting.  Same error norm, output and event conventions as
 * race_dopri5; dense output is the cubic Hermite interpolant of (y, f) at both step ends.
 * The error of a step is the larger of the embedded estimate (k_4) and a dense-output
 * estimate, (4/27) * (h (f(y) + f(ynew)) - 2 (ynew - y)), the deviation of the cubic Hermite
 * interpolant from the quadratic one at theta = 2/3, so saved points meet the tolerance too.
 * Step control: h_new = h * clamp(0.9 * err^(-1/3), 0.2, 6), no increase right after a
 * rejection; a non-finite error or a singular matrix rejects the step with h *= 0.1.
 * iwork holds n_edges int64_t.
 */
int race_rodas3(const race_system *sys, const double *s, const double *d, const double *b0,
                double t0, double t_end, int64_t n_out, const double *t_out,
                const race_ode_options *opt, const double *thresholds, double *out,
                double *event_times, race_stats *stats, double *work, int64_t *iwork);

/*
 * Automatic stiffness switching: race_dopri5 until Hairer's stiffness test fires (the
 * estimate h |lambda| = h |k7 - k6| / |ynew - y6| from the last two stages exceeds 3.25 on an
 * accepted step; Hairer's code, which can switch back, waits for 15 such steps, but here a false
 * alarm only costs RODAS3 steps (error-controlled all the same) while every late step is a
 * stability-capped DOPRI5 step), then race_rodas3 from that
 * point to t_end (first step: the step DOPRI5 proposed; the step limit counts both phases).
 * Race systems turn stiff once a mode has been learnt, so long runs cost far fewer steps.
 * Same arguments, outputs and events as race_dopri5; iwork holds n_edges int64_t.
 */
int race_auto(const race_system *sys, const double *s, const double *d, const double *b0,
              double t0, double t_end, int64_t n_out, const double *t_out,
              const race_ode_options *opt, const double *thresholds, double *out,
              double *event_times, race_stats *stats, double *work, int64_t *iwork);

/*
 * Batches: n_sys systems sharing one structure, integrated with one call.
 *
 * System i starts from b0[i * n_edges ..], uses s row (i % s_rows), d row (i % d_rows) and
 * rate row (i % rate_rows) (rate NULL: all ones; sys->rate is ignored).  race_ode_batch
 * integrates systems first .. last-1 with `method` and writes, for each of them, exactly what
 * race_dopri5 / race_rodas3 / race_auto would (bit for bit): out + i * n_out * n_edges,
 * event_times + i * n_paths (event_times may be NULL), status[i] and stats[i].  DOPRI5 and
 * auto (both of its phases) run 16 systems at once in interleaved lanes, which hides the
 * latency of each system's chain of dependent stages: about twice the throughput of a loop
 * over race_auto; fewer than 4 systems, systems of more than 32 edges, and RODAS3 alone run one
 * at a time.  Threads: call it on disjoint ranges with separate work buffers.
 * work: race_batch_work_size(sys) doubles; iwork: race_batch_iwork_size(sys) int64_t.  Returns
 * RACE_BAD_INPUT for an unknown method or a row count below 1, RACE_OK otherwise (per-system
 * outcomes are in status).
 */
enum race_method { RACE_METHOD_DOPRI5 = 0, RACE_METHOD_RODAS3 = 1, RACE_METHOD_AUTO = 2 };

typedef struct race_batch {
    const race_system *sys;   /* the shared structure */
    const double *b0;         /* (n_sys, n_edges) */
    const double *s;          /* (s_rows, n_paths) */
    const double *d;          /* (d_rows, nnz_t) */
    const double *rate;       /* (rate_rows, n_edges) or NULL */
    int64_t s_rows, d_rows, rate_rows; /* >= 1 (rate_rows: when rate is given) */
} race_batch;

size_t race_batch_work_size(const race_system *sys);
size_t race_batch_iwork_size(const race_system *sys);

int race_ode_batch(const race_batch *batch, int method, int64_t first, int64_t last, double t0,
                   double t_end, int64_t n_out, const double *t_out,
                   const race_ode_options *opt, const double *thresholds, double *out,
                   double *event_times, int *status, race_stats *stats, double *work,
                   int64_t *iwork);

#ifdef __cplusplus
}
#endif

#endif /* FASTRACE_RACE_H */
