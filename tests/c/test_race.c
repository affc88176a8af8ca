/*
 * Stand-alone test of the C core: compiled against race.h + race.c alone (no Python) by
 * tests/test_c_core.py.  Prints one line per failed check and exits non-zero on failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "race.h"

static int failures = 0;

static void check_close(const char *what, double got, double want, double rel)
{
    double tol = rel * fmax(1.0, fabs(want));
    if (!(fabs(got - want) <= tol)) {
        printf("FAIL %s: got %.17g, want %.17g (tol %.3g)\n", what, got, want, tol);
        ++failures;
    }
}

static void check_true(const char *what, int cond)
{
    if (!cond) {
        printf("FAIL %s\n", what);
        ++failures;
    }
}

static double *work_for(size_t n)
{
    double *w = (double *)malloc(n * sizeof(double));
    if (w == NULL) {
        printf("FAIL out of memory\n");
        exit(2);
    }
    return w;
}

/* Two paths sharing edge 1: p0 = (0, 1, 2), p1 = (3, 1); both end at one output. */
static void test_rhs_by_hand(void)
{
    const int64_t path_ptr[] = {0, 3, 5}, path_edges[] = {0, 1, 2, 3, 1};
    const int64_t target_ptr[] = {0, 2, 4}, target_paths[] = {0, 1, 0, 1};
    const double rate[] = {0.5, 2.0, 1.0, 3.0};
    const double s[] = {1.5, -0.5};
    /* d_00, d_10 (row p = 0), d_01, d_11 (row p = 1) */
    const double d[] = {2.0, 0.25, 0.25, 1.0};
    const double b[] = {0.3, -0.7, 1.1, 0.0}; /* b_3 = 0 exactly */
    race_system sys = {4, 2, path_ptr, path_edges, target_ptr, target_paths, rate};
    double db[4], pi[2], *work = work_for(race_work_size(&sys));
    double pi0 = 0.3 * -0.7 * 1.1, pi1 = 0.0 * -0.7;
    double r0 = 1.5 - (2.0 * pi0 + 0.25 * pi1), r1 = -0.5 - (0.25 * pi0 + 1.0 * pi1);
    double want[4];

    check_true("race_check on a valid system", race_check(&sys) == RACE_OK);
    race_path_strengths(&sys, b, pi);
    check_close("pi_0", pi[0], pi0, 1e-15);
    check_close("pi_1", pi[1], pi1, 1e-15);
    want[0] = 0.5 * (-0.7 * 1.1 * r0);
    want[1] = 2.0 * (0.3 * 1.1 * r0 + 0.0 * r1);
    want[2] = 1.0 * (0.3 * -0.7 * r0);
    want[3] = 3.0 * (-0.7 * r1); /* non-zero although b_3 == 0: no division by b_3 */
    race_rhs(&sys, s, d, b, db, work);
    for (int e = 0; e < 4; ++e) {
        char name[32];
        snprintf(name, sizeof name, "rhs[%d]", e);
        check_close(name, db[e], want[e], 1e-14);
    }
    check_close("loss", race_loss(&sys, s, d, b, work),
                (0.5 * (2.0 * pi0 + 0.25 * pi1) - 1.5) * pi0 +
                    (0.5 * (0.25 * pi0 + 1.0 * pi1) + 0.5) * pi1,
                1e-14);

    /* Jacobian against central differences */
    {
        double jac[16], bp[4], bm[4], fp[4], fm[4];
        race_jacobian(&sys, s, d, b, jac, work);
        for (int f = 0; f < 4; ++f) {
            double step = 1e-6;
            for (int e = 0; e < 4; ++e)
                bp[e] = bm[e] = b[e];
            bp[f] += step;
            bm[f] -= step;
            race_rhs(&sys, s, d, bp, fp, work);
            race_rhs(&sys, s, d, bm, fm, work);
            for (int e = 0; e < 4; ++e) {
                char name[32];
                snprintf(name, sizeof name, "jacobian[%d][%d]", e, f);
                check_close(name, jac[e * 4 + f], (fp[e] - fm[e]) / (2 * step), 1e-8);
            }
        }
    }
    free(work);
}

static void test_check_rejects_bad_structure(void)
{
    const int64_t path_ptr[] = {0, 2}, twice[] = {1, 1}, out_of_range[] = {0, 5};
    const int64_t target_ptr[] = {0, 1}, target_paths[] = {0};
    race_system sys = {3, 1, path_ptr, twice, target_ptr, target_paths, NULL};
    check_true("race_check rejects an edge twice in a path", race_check(&sys) == RACE_BAD_INPUT);
    sys.path_edges = out_of_range;
    check_true("race_check rejects an edge index out of range",
               race_check(&sys) == RACE_BAD_INPUT);
}

/* One edge: b' = rate (s - d b); GD: b_k = s/d + (b0 - s/d) (1 - lr rate d)^k. */
static void test_gd_map(void)
{
    const int64_t path_ptr[] = {0, 1}, path_edges[] = {0}, target_ptr[] = {0, 1};
    const int64_t target_paths[] = {0};
    const double rate[] = {0.5}, s[] = {2.0}, d[] = {1.5}, b0[] = {0.1};
    const int64_t record[] = {0, 1, 7, 7, 40};
    race_system sys = {1, 1, path_ptr, path_edges, target_ptr, target_paths, rate};
    double out[5], *work = work_for(race_gd_work_size(&sys));
    race_stats st;
    double lr = 0.3, q = 1.0 - lr * 0.5 * 1.5, fix = 2.0 / 1.5;
    int status = race_gd_map(&sys, s, d, b0, lr, 5, record, out, &st, work);
    check_true("gd status ok", status == RACE_OK);
    check_true("gd steps", st.n_accepted == 40);
    for (int k = 0; k < 5; ++k) {
        char name[32];
        snprintf(name, sizeof name, "gd out[%d]", k);
        check_close(name, out[k], fix + (0.1 - fix) * pow(q, (double)record[k]), 1e-13);
    }
    /* divergence: lr far beyond 2 / (rate d) */
    status = race_gd_map(&sys, s, d, b0, 1e9, 5, record, out, &st, work);
    check_true("gd diverges -> RACE_NONFINITE", status == RACE_NONFINITE);
    check_true("gd rows after divergence are NaN", isnan(out[4]));
    free(work);
}

/* D = 2 single path, balanced start: pi(t) = (s/d) / (1 - (1 - s/(d pi0)) exp(-2 s t)). */
static double pi_d2(double s, double d, double pi0, double t)
{
    return (s / d) / (1.0 - (1.0 - s / (d * pi0)) * exp(-2.0 * s * t));
}

static void test_ode_d2(int rosenbrock)
{
    const int64_t path_ptr[] = {0, 2}, path_edges[] = {0, 1}, target_ptr[] = {0, 1};
    const int64_t target_paths[] = {0};
    const double s[] = {2.0}, d[] = {1.5}, b0[] = {0.05, 0.05};
    const double pi0 = 0.05 * 0.05, thr[] = {0.5 * 2.0 / 1.5};
    race_system sys = {2, 1, path_ptr, path_edges, target_ptr, target_paths, NULL};
    race_ode_options opt = {1e-10, 1e-12, 0.0, 0.0, 100000};
    double t_out[6] = {0.0, 0.3, 1.0, 1.7, 2.5, 6.0}, out[12], ev[1];
    size_t ws = rosenbrock ? race_rodas3_work_size(&sys) : race_dopri5_work_size(&sys);
    double *work = work_for(ws);
    int64_t iwork[2];
    race_stats st;
    const char *name = rosenbrock ? "rodas3" : "dopri5";
    double tol = rosenbrock ? 1e-6 : 1e-8;
    double t_cross = log(thr[0] * (2.0 - 1.5 * pi0) / (pi0 * (2.0 - 1.5 * thr[0]))) / (2.0 * 2.0);
    int status = rosenbrock ? race_rodas3(&sys, s, d, b0, 0.0, 6.0, 6, t_out, &opt, thr, out, ev,
                                          &st, work, iwork)
                            : race_dopri5(&sys, s, d, b0, 0.0, 6.0, 6, t_out, &opt, thr, out, ev,
                                          &st, work);
    char label[64];
    snprintf(label, sizeof label, "%s status", name);
    check_true(label, status == RACE_OK);
    for (int k = 0; k < 6; ++k) {
        snprintf(label, sizeof label, "%s pi(t=%g)", name, t_out[k]);
        check_close(label, out[2 * k] * out[2 * k + 1], pi_d2(2.0, 1.5, pi0, t_out[k]),
                    tol * pi_d2(2.0, 1.5, pi0, t_out[k]));
        snprintf(label, sizeof label, "%s balanced at t=%g", name, t_out[k]);
        check_close(label, out[2 * k], out[2 * k + 1], 1e-12);
    }
    snprintf(label, sizeof label, "%s event time", name);
    check_close(label, ev[0], t_cross, tol);
    snprintf(label, sizeof label, "%s t_reached", name);
    check_close(label, st.t_reached, 6.0, 0.0);

    /* the step limit is reported, never a hang */
    opt.max_steps = 3;
    status = rosenbrock ? race_rodas3(&sys, s, d, b0, 0.0, 6.0, 6, t_out, &opt, thr, out, ev, &st,
                                      work, iwork)
                        : race_dopri5(&sys, s, d, b0, 0.0, 6.0, 6, t_out, &opt, thr, out, ev, &st,
                                      work);
    snprintf(label, sizeof label, "%s max steps", name);
    check_true(label, status == RACE_MAX_STEPS && isnan(out[11]) && out[0] == 0.05);
    opt.max_steps = 100000;
    opt.rtol = -1.0;
    status = rosenbrock ? race_rodas3(&sys, s, d, b0, 0.0, 6.0, 6, t_out, &opt, thr, out, ev, &st,
                                      work, iwork)
                        : race_dopri5(&sys, s, d, b0, 0.0, 6.0, 6, t_out, &opt, thr, out, ev, &st,
                                      work);
    snprintf(label, sizeof label, "%s bad options", name);
    check_true(label, status == RACE_BAD_INPUT);
    free(work);
}

/* D = 3 with d = 0 blows up in finite time (t* = 1 / (s pi0^(1/3)) = 10): must stop, not hang */
static void test_blow_up(void)
{
    const int64_t path_ptr[] = {0, 3}, path_edges[] = {0, 1, 2}, target_ptr[] = {0, 1};
    const int64_t target_paths[] = {0};
    const double s[] = {1.0}, d[] = {0.0}, b0[] = {0.1, 0.1, 0.1};
    race_system sys = {3, 1, path_ptr, path_edges, target_ptr, target_paths, NULL};
    race_ode_options opt = {1e-8, 1e-10, 0.0, 0.0, 1000000};
    double t_out[1] = {20.0}, out[3], *work = work_for(race_rodas3_work_size(&sys));
    int64_t iwork[3];
    int status = race_dopri5(&sys, s, d, b0, 0.0, 20.0, 1, t_out, &opt, NULL, out, NULL, NULL,
                             work);
    check_true("dopri5 blow-up stops with an error status", status != RACE_OK && isnan(out[0]));
    status = race_rodas3(&sys, s, d, b0, 0.0, 20.0, 1, t_out, &opt, NULL, out, NULL, NULL, work,
                         iwork);
    check_true("rodas3 blow-up stops with an error status", status != RACE_OK && isnan(out[0]));
    free(work);
    work = work_for(race_auto_work_size(&sys));
    status = race_auto(&sys, s, d, b0, 0.0, 20.0, 1, t_out, &opt, NULL, out, NULL, NULL, work,
                       iwork);
    check_true("auto blow-up stops with an error status", status != RACE_OK && isnan(out[0]));
    free(work);
}

/* race_auto on the D = 2 path long past convergence: switches to RODAS3, stays accurate */
static void test_auto_switches(void)
{
    const int64_t path_ptr[] = {0, 2}, path_edges[] = {0, 1}, target_ptr[] = {0, 1};
    const int64_t target_paths[] = {0};
    const double s[] = {2.0}, d[] = {1.5}, b0[] = {0.05, 0.05};
    const double pi0 = 0.05 * 0.05, thr[] = {0.5 * 2.0 / 1.5};
    race_system sys = {2, 1, path_ptr, path_edges, target_ptr, target_paths, NULL};
    race_ode_options opt = {1e-10, 1e-12, 0.0, 0.0, 100000};
    double t_out[5] = {0.0, 1.0, 2.0, 50.0, 300.0}, out[10], ev[1];
    double *work = work_for(race_auto_work_size(&sys));
    int64_t iwork[2];
    race_stats st_auto, st_dp;
    double t_cross = log(thr[0] * (2.0 - 1.5 * pi0) / (pi0 * (2.0 - 1.5 * thr[0]))) / (2.0 * 2.0);
    int status = race_auto(&sys, s, d, b0, 0.0, 300.0, 5, t_out, &opt, thr, out, ev, &st_auto,
                           work, iwork);
    check_true("auto status", status == RACE_OK);
    for (int k = 0; k < 5; ++k) {
        char label[64];
        snprintf(label, sizeof label, "auto pi(t=%g)", t_out[k]);
        check_close(label, out[2 * k] * out[2 * k + 1], pi_d2(2.0, 1.5, pi0, t_out[k]),
                    1e-7 * pi_d2(2.0, 1.5, pi0, t_out[k]));
    }
    check_close("auto event time", ev[0], t_cross, 1e-8);
    status = race_dopri5(&sys, s, d, b0, 0.0, 300.0, 5, t_out, &opt, thr, out, ev, &st_dp, work);
    check_true("dopri5 status (long run)", status == RACE_OK);
    check_true("auto switched to RODAS3 and took far fewer steps",
               2 * st_auto.n_accepted < st_dp.n_accepted);
    free(work);
}

/* race_ode_batch (several systems at once in lanes, refilled as systems end) writes exactly
 * what one race_dopri5 / race_rodas3 / race_auto call per system writes, bit for bit, for a
 * batch whose systems end at different steps and in different ways. */
static int same_bits(const double *a, const double *b, size_t n)
{
    return memcmp(a, b, n * sizeof(double)) == 0;
}

static void test_batch_equals_one_by_one(void)
{
    /* p0 = (0, 1), p1 = (2, 1): both through edge 1, to one output */
    const int64_t path_ptr[] = {0, 2, 4}, path_edges[] = {0, 1, 2, 1};
    const int64_t target_ptr[] = {0, 2, 4}, target_paths[] = {0, 1, 0, 1};
    const double d[] = {1.0, 0.3, 0.3, 1.0}, rate[] = {1.0, 0.5, 2.0, 0.25, 1.0, 1.0};
    const double thr[] = {0.4, 0.2};
    enum { N_SYS = 37, N_OUT = 9, N = 3, NP = 2 };
    double T_END = 40.0;
    race_system sys = {N, NP, path_ptr, path_edges, target_ptr, target_paths, NULL};
    race_ode_options opt = {1e-8, 1e-10, 0.0, 0.0, 150};
    double b0[N_SYS * N], s[N_SYS * NP], t_out[N_OUT];
    double *out1 = work_for(N_SYS * N_OUT * N), *out2 = work_for(N_SYS * N_OUT * N);
    double ev1[N_SYS * NP], ev2[N_SYS * NP];
    double *work = work_for(race_batch_work_size(&sys));
    double *work1 = work_for(race_auto_work_size(&sys));
    int64_t *iwork = (int64_t *)malloc(race_batch_iwork_size(&sys) * sizeof(int64_t));
    int status2[N_SYS];
    race_stats st1, st2[N_SYS];
    race_batch bt = {&sys, b0, s, d, rate, N_SYS, 1, 2};
    for (int i = 0; i < N_SYS; ++i) {
        for (int e = 0; e < N; ++e)
            b0[i * N + e] = 0.02 + 0.3 * (double)((i * 7 + e * 3) % 11) / 11.0;
        s[i * NP] = 0.2 + 0.5 * (double)(i % 13);
        s[i * NP + 1] = 3.0 - 0.1 * (double)(i % 17);
    }
    b0[5 * N + 1] = NAN;     /* fails at once: non-finite start */
    b0[9 * N] = 40.0;        /* blows up: non-finite or too many steps */
    /* t_end 40: many systems end in their DOPRI5 phase; 300: all turn stiff (auto) */
    for (int run = 0; run < 6; ++run) {
        const int method = run % 3;
        int n_ok = 0, n_failed = 0, same = 1;
        T_END = run < 3 ? 40.0 : 300.0;
        for (int k = 0; k < N_OUT; ++k)
            t_out[k] = T_END / (N_OUT - 1) * k;
        check_true("batch call returns RACE_OK",
                   race_ode_batch(&bt, method, 0, N_SYS, 0.0, T_END, N_OUT, t_out, &opt, thr, out2,
                                  ev2, status2, st2, work, iwork) == RACE_OK);
        for (int i = 0; i < N_SYS; ++i) {
            race_system si = sys;
            int status;
            si.rate = rate + (i % 2) * N;
            if (method == RACE_METHOD_DOPRI5)
                status = race_dopri5(&si, s + i * NP, d, b0 + i * N, 0.0, T_END, N_OUT, t_out, &opt,
                                     thr, out1 + i * N_OUT * N, ev1 + i * NP, &st1, work1);
            else if (method == RACE_METHOD_RODAS3)
                status = race_rodas3(&si, s + i * NP, d, b0 + i * N, 0.0, T_END, N_OUT, t_out, &opt,
                                     thr, out1 + i * N_OUT * N, ev1 + i * NP, &st1, work1, iwork);
            else
                status = race_auto(&si, s + i * NP, d, b0 + i * N, 0.0, T_END, N_OUT, t_out, &opt,
                                   thr, out1 + i * N_OUT * N, ev1 + i * NP, &st1, work1, iwork);
            same = same && status == status2[i] && st1.n_accepted == st2[i].n_accepted &&
                   st1.n_rejected == st2[i].n_rejected && st1.n_rhs == st2[i].n_rhs &&
                   same_bits(&st1.t_reached, &st2[i].t_reached, 1);
            n_ok += status == RACE_OK;
            n_failed += status != RACE_OK;
        }
        check_true("batch: status and counters equal one call per system", same);
        check_true("batch: trajectories bit for bit", same_bits(out1, out2, N_SYS * N_OUT * N));
        check_true("batch: event times bit for bit", same_bits(ev1, ev2, N_SYS * NP));
        /* 150 steps: enough for auto (DOPRI5, then RODAS3 once stiff) except on the two bad
         * systems, too few for RODAS3 alone; DOPRI5 alone ends some systems by t = 40 */
        check_true("batch: auto ends ok but on the bad systems", method != RACE_METHOD_AUTO ||
                   (n_ok == N_SYS - 2 && n_failed == 2));
        check_true("batch: DOPRI5 ends some systems by t = 40", method != RACE_METHOD_DOPRI5 ||
                   T_END > 40.0 || n_ok > 10);
    }
    check_true("batch: unknown method", race_ode_batch(&bt, 7, 0, N_SYS, 0.0, T_END, N_OUT, t_out,
                                                       &opt, thr, out2, ev2, status2, st2, work,
                                                       iwork) == RACE_BAD_INPUT);
    bt.s_rows = 0;
    check_true("batch: no s rows", race_ode_batch(&bt, RACE_METHOD_AUTO, 0, N_SYS, 0.0, T_END,
                                                  N_OUT, t_out, &opt, thr, out2, ev2, status2,
                                                  st2, work, iwork) == RACE_BAD_INPUT);
    free(out1);
    free(out2);
    free(work);
    free(work1);
    free(iwork);
}

/* race_rhs takes a register-only branch for one path through every edge; the same path with
 * one extra edge outside it takes the general loop: the slopes must agree bit for bit (signed
 * zeros included), with and without rate factors, for path lengths 1 to 7. */
static void test_one_path_branch_equals_general(void)
{
    const int64_t edges[] = {2, 0, 5, 1, 6, 3, 4}, target_ptr[] = {0, 1}, target_paths[] = {0};
    const double rate[] = {0.5, 3.0, -1.25, 0.75, 2.0, 1.5, 0.2, 9.0};
    const double values[] = {0.3, -0.7, 1.1, -0.0, 0.0, 2.5, -1.9, 0.05};
    int same = 1;
    for (int64_t L = 1; L <= 7; ++L) {
        for (int use_rate = 0; use_rate < 2; ++use_rate) {
            for (int shift = 0; shift < 8; ++shift) {
                int64_t path_ptr[] = {0, L}, path_edges[7];
                double b[8], db_one[8], db_gen[8], s = 1.5 - 0.5 * shift, d = 0.75 + 0.1 * shift;
                double work[64];
                race_system one, gen;
                /* a path over edges 0..L-1 in a scrambled order */
                int64_t m = 0;
                for (int k = 0; k < 7 && m < L; ++k)
                    if (edges[k] < L)
                        path_edges[m++] = edges[k];
                for (int e = 0; e < 8; ++e)
                    b[e] = values[(e + shift) % 8];
                one = (race_system){L, 1, path_ptr, path_edges, target_ptr, target_paths,
                                    use_rate ? rate : NULL};
                gen = one;
                gen.n_edges = L + 1; /* edge L lies on no path: the general loop */
                race_rhs(&one, &s, &d, b, db_one, work);
                race_rhs(&gen, &s, &d, b, db_gen, work);
                same = same && same_bits(db_one, db_gen, L) && db_gen[L] == 0.0;
            }
        }
    }
    check_true("one-path branch of race_rhs equals the general loop bit for bit", same);
}

/* The routing mode system (one path of three edges, rate factors): one call per system (the
 * one-path branch) against the batch's lanes (their own general slope code), bit for bit. */
static void test_batch_one_path_system(void)
{
    const int64_t path_ptr[] = {0, 3}, path_edges[] = {0, 1, 2}, target_ptr[] = {0, 1};
    const int64_t target_paths[] = {0};
    const double rate[] = {4.0 / 49.0, 4.0 / 7.0, 4.0 / 49.0}, d[] = {1.0};
    enum { N_SYS = 21, N_OUT = 50, N = 3 };
    race_system sys = {N, 1, path_ptr, path_edges, target_ptr, target_paths, NULL};
    race_ode_options opt = {1e-8, 1e-10, 0.0, 0.0, 100000};
    double b0[N_SYS * N], s[N_SYS], t_out[N_OUT], thr[] = {0.5};
    double *out1 = work_for(N_SYS * N_OUT * N), *out2 = work_for(N_SYS * N_OUT * N);
    double ev1[N_SYS], ev2[N_SYS];
    double *work = work_for(race_batch_work_size(&sys));
    double *work1 = work_for(race_auto_work_size(&sys));
    int64_t *iwork = (int64_t *)malloc(race_batch_iwork_size(&sys) * sizeof(int64_t));
    int status2[N_SYS], same = 1;
    race_stats st1, st2[N_SYS];
    race_batch bt = {&sys, b0, s, d, rate, N_SYS, 1, 1};
    for (int k = 0; k < N_OUT; ++k)
        t_out[k] = 2000.0 / (N_OUT - 1) * k;
    for (int i = 0; i < N_SYS; ++i) {
        for (int e = 0; e < N; ++e)
            b0[i * N + e] = 0.2;
        s[i] = 1.0 + 9.0 * i / (N_SYS - 1);
    }
    for (int method = 0; method < 3; ++method) {
        check_true("one-path batch returns RACE_OK",
                   race_ode_batch(&bt, method, 0, N_SYS, 0.0, 2000.0, N_OUT, t_out, &opt, thr,
                                  out2, ev2, status2, st2, work, iwork) == RACE_OK);
        for (int i = 0; i < N_SYS; ++i) {
            race_system si = sys;
            int status;
            si.rate = rate;
            if (method == RACE_METHOD_DOPRI5)
                status = race_dopri5(&si, s + i, d, b0 + i * N, 0.0, 2000.0, N_OUT, t_out, &opt,
                                     thr, out1 + i * N_OUT * N, ev1 + i, &st1, work1);
            else if (method == RACE_METHOD_RODAS3)
                status = race_rodas3(&si, s + i, d, b0 + i * N, 0.0, 2000.0, N_OUT, t_out, &opt,
                                     thr, out1 + i * N_OUT * N, ev1 + i, &st1, work1, iwork);
            else
                status = race_auto(&si, s + i, d, b0 + i * N, 0.0, 2000.0, N_OUT, t_out, &opt,
                                   thr, out1 + i * N_OUT * N, ev1 + i, &st1, work1, iwork);
            same = same && status == RACE_OK && status == status2[i] &&
                   st1.n_accepted == st2[i].n_accepted && st1.n_rhs == st2[i].n_rhs;
        }
        same = same && same_bits(out1, out2, N_SYS * N_OUT * N) && same_bits(ev1, ev2, N_SYS);
    }
    check_true("one-path systems: batch lanes equal one call per system bit for bit", same);
    free(out1);
    free(out2);
    free(work);
    free(work1);
    free(iwork);
}

int main(void)
{
    test_rhs_by_hand();
    test_check_rejects_bad_structure();
    test_gd_map();
    test_ode_d2(0);
    test_ode_d2(1);
    test_blow_up();
    test_auto_switches();
    test_batch_equals_one_by_one();
    test_one_path_branch_equals_general();
    test_batch_one_path_system();
    if (failures) {
        printf("%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C core checks passed\n");
    return 0;
}
