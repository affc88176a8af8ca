/*
 * _race.c -- the CPython module fastrace._race: the C core (race.c) over batches of systems.
 *
 * Every function takes the structure of one race system (path_ptr, path_edges, target_ptr,
 * target_paths: C-contiguous int64 arrays, see race.h) and a batch of n_sys systems sharing
 * it: b or b0 (n_sys, n_edges) defines n_sys; s (rows, n_paths), d (rows, nnz_t) and
 * rate (rows, n_edges) or None, where rows divides n_sys and system i uses row i % rows.
 * All float arrays are C-contiguous float64.  The loop over systems runs in C with the GIL
 * released, on as many threads as asked for (integrators).  The Python front end (fastrace.integrate, fastrace.system) validates values;
 * this layer checks types, shapes and the structure and raises ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "race.h"

/* x[i] > x[i - 1] for all i (false as soon as a NaN takes part) */
static int strictly_increasing(npy_intp n, const double *x)
{
    for (npy_intp i = 1; i < n; ++i)
        if (!(x[i] > x[i - 1]))
            return 0;
    return 1;
}

/* t0 <= t[0], t[n-1] <= t_end and t non-decreasing: then every t[k] lies in [t0, t_end]; a NaN
 * fails a comparison and so the test */
static int times_in_order(npy_intp n, const double *t, double t0, double t_end)
{
    if (n == 0)
        return 1;
    if (!(t[0] >= t0 && t[n - 1] <= t_end))
        return 0;
    for (npy_intp k = 1; k < n; ++k)
        if (!(t[k] >= t[k - 1]))
            return 0;
    return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* argument checking                                                                         */

static PyArrayObject *as_array(PyObject *obj, const char *name, int typenum, int ndim)
{
    PyArrayObject *a;
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_ValueError, "%s must be a numpy array", name);
        return NULL;
    }
    a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyErr_Format(PyExc_ValueError, "%s must have dtype %s", name,
                     typenum == NPY_INT64 ? "int64" : "float64");
        return NULL;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension(s), got %d", name, ndim,
                     PyArray_NDIM(a));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned", name);
        return NULL;
    }
    return a;
}

/* The structure arrays, checked with race_check. */
typedef struct structure {
    race_system sys;
    int64_t nnz_t;
} structure;

static int parse_structure(PyObject *path_ptr, PyObject *path_edges, PyObject *target_ptr,
                           PyObject *target_paths, structure *st)
{
    PyArrayObject *pp = as_array(path_ptr, "path_ptr", NPY_INT64, 1);
    PyArrayObject *pe = pp ? as_array(path_edges, "path_edges", NPY_INT64, 1) : NULL;
    PyArrayObject *tp = pe ? as_array(target_ptr, "target_ptr", NPY_INT64, 1) : NULL;
    PyArrayObject *tt = tp ? as_array(target_paths, "target_paths", NPY_INT64, 1) : NULL;
    npy_intp n_paths;
    if (tt == NULL)
        return -1;
    n_paths = PyArray_DIM(pp, 0) - 1;
    if (n_paths < 1 || PyArray_DIM(tp, 0) != n_paths + 1) {
        PyErr_SetString(PyExc_ValueError,
                        "path_ptr and target_ptr must both have n_paths + 1 >= 2 entries");
        return -1;
    }
    st->sys.n_paths = n_paths;
    st->sys.path_ptr = (const int64_t *)PyArray_DATA(pp);
    st->sys.path_edges = (const int64_t *)PyArray_DATA(pe);
    st->sys.target_ptr = (const int64_t *)PyArray_DATA(tp);
    st->sys.target_paths = (const int64_t *)PyArray_DATA(tt);
    st->sys.rate = NULL;
    if (st->sys.path_ptr[n_paths] != PyArray_DIM(pe, 0) ||
        st->sys.target_ptr[n_paths] != PyArray_DIM(tt, 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "path_ptr[-1] must equal len(path_edges) and target_ptr[-1] "
                        "len(target_paths)");
        return -1;
    }
    st->nnz_t = PyArray_DIM(tt, 0);
    return 0;
}

/* n_edges is fixed by b (its second dimension); race_check needs it. */
static int check_structure(structure *st, int64_t n_edges)
{
    st->sys.n_edges = n_edges;
    if (race_check(&st->sys) != RACE_OK) {
        PyErr_SetString(PyExc_ValueError,
                        "invalid race system structure: CSR pointers must start at 0 and not "
                        "decrease, every path must be a non-empty list of distinct edges in "
                        "[0, n_edges), target_paths must hold path indices in [0, n_paths)");
        return -1;
    }
    return 0;
}

/* A (rows, cols) float64 array whose rows divide n_sys; NULL obj allowed when optional. */
static int parse_rows(PyObject *obj, const char *name, npy_intp n_sys, npy_intp cols,
                      int optional, const double **data, npy_intp *rows)
{
    PyArrayObject *a;
    if (optional && (obj == NULL || obj == Py_None)) {
        *data = NULL;
        *rows = 1;
        return 0;
    }
    a = as_array(obj, name, NPY_FLOAT64, 2);
    if (a == NULL)
        return -1;
    if (PyArray_DIM(a, 1) != cols) {
        PyErr_Format(PyExc_ValueError, "%s must have %zd columns, got %zd", name, (Py_ssize_t)cols,
                     (Py_ssize_t)PyArray_DIM(a, 1));
        return -1;
    }
    if (PyArray_DIM(a, 0) < 1 || n_sys % PyArray_DIM(a, 0) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s must have a number of rows that divides the number of systems %zd, "
                     "got %zd", name, (Py_ssize_t)n_sys, (Py_ssize_t)PyArray_DIM(a, 0));
        return -1;
    }
    *data = (const double *)PyArray_DATA(a);
    *rows = PyArray_DIM(a, 0);
    return 0;
}

/* The batch: structure, b (n_sys, n_edges), s, d, rate. */
typedef struct batch {
    structure st;
    npy_intp n_sys, n_edges;
    const double *b, *s, *d, *rate;
    npy_intp s_rows, d_rows, rate_rows;
} batch;

static int parse_batch(PyObject *pp, PyObject *pe, PyObject *tp, PyObject *tt, PyObject *b,
                       const char *bname, PyObject *s, PyObject *d, PyObject *rate, batch *bt)
{
    PyArrayObject *ba;
    if (parse_structure(pp, pe, tp, tt, &bt->st) != 0)
        return -1;
    ba = as_array(b, bname, NPY_FLOAT64, 2);
    if (ba == NULL)
        return -1;
    bt->n_sys = PyArray_DIM(ba, 0);
    bt->n_edges = PyArray_DIM(ba, 1);
    if (bt->n_sys < 1 || bt->n_edges < 1) {
        PyErr_Format(PyExc_ValueError, "%s must have at least one row and one column", bname);
        return -1;
    }
    bt->b = (const double *)PyArray_DATA(ba);
    if (check_structure(&bt->st, bt->n_edges) != 0)
        return -1;
    if (s != NULL && parse_rows(s, "s", bt->n_sys, bt->st.sys.n_paths, 0, &bt->s, &bt->s_rows))
        return -1;
    if (d != NULL && parse_rows(d, "d", bt->n_sys, bt->st.nnz_t, 0, &bt->d, &bt->d_rows))
        return -1;
    if (parse_rows(rate, "rate", bt->n_sys, bt->n_edges, 1, &bt->rate, &bt->rate_rows))
        return -1;
    return 0;
}

/* the system i of a batch */
static void system_at(const batch *bt, npy_intp i, race_system *sys, const double **s,
                      const double **d)
{
    *sys = bt->st.sys;
    sys->rate = bt->rate ? bt->rate + (i % bt->rate_rows) * bt->n_edges : NULL;
    if (s)
        *s = bt->s + (i % bt->s_rows) * bt->st.sys.n_paths;
    if (d)
        *d = bt->d + (i % bt->d_rows) * bt->st.nnz_t;
}

static double *alloc_doubles(size_t count)
{
    double *p = (double *)malloc((count > 0 ? count : 1) * sizeof(double));
    if (p == NULL)
        PyErr_NoMemory();
    return p;
}

/* ---------------------------------------------------------------------------------------- */
/* rhs, jacobian, path strengths, loss                                                       */

static char *kw_eval[] = {"path_ptr", "path_edges", "target_ptr", "target_paths", "b", "s", "d",
                          "rate", NULL};

PyDoc_STRVAR(rhs_doc,
"rhs(path_ptr, path_edges, target_ptr, target_paths, b, s, d, rate=None) -> (n_sys, n_edges)\n\n"
"db/dt of every system of the batch.");

static PyObject *py_rhs(PyObject *self, PyObject *args, PyObject *kw)
{
    PyObject *pp, *pe, *tp, *tt, *b, *s, *d, *rate = Py_None, *res;
    batch bt;
    double *work, *out;
    npy_intp dims[2];
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO|O:rhs", kw_eval, &pp, &pe, &tp, &tt, &b,
                                     &s, &d, &rate))
        return NULL;
    if (parse_batch(pp, pe, tp, tt, b, "b", s, d, rate, &bt) != 0)
        return NULL;
    dims[0] = bt.n_sys;
    dims[1] = bt.n_edges;
    res = PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (res == NULL)
        return NULL;
    out = (double *)PyArray_DATA((PyArrayObject *)res);
    work = alloc_doubles(race_work_size(&bt.st.sys));
    if (work == NULL) {
        Py_DECREF(res);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < bt.n_sys; ++i) {
        race_system sys;
        const double *si, *di;
        system_at(&bt, i, &sys, &si, &di);
        race_rhs(&sys, si, di, bt.b + i * bt.n_edges, out + i * bt.n_edges, work);
    }
    Py_END_ALLOW_THREADS
    free(work);
    return res;
}

PyDoc_STRVAR(jacobian_doc,
"jacobian(path_ptr, path_edges, target_ptr, target_paths, b, s, d, rate=None)\n"
"-> (n_sys, n_edges, n_edges), J[i, e, f] = d(db_e/dt)/d(b_f) of system i.");

static PyObject *py_jacobian(PyObject *self, PyObject *args, PyObject *kw)
{
    PyObject *pp, *pe, *tp, *tt, *b, *s, *d, *rate = Py_None, *res;
    batch bt;
    double *work, *out;
    npy_intp dims[3];
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO|O:jacobian", kw_eval, &pp, &pe, &tp, &tt,
                                     &b, &s, &d, &rate))
        return NULL;
    if (parse_batch(pp, pe, tp, tt, b, "b", s, d, rate, &bt) != 0)
        return NULL;
    dims[0] = bt.n_sys;
    dims[1] = bt.n_edges;
    dims[2] = bt.n_edges;
    res = PyArray_SimpleNew(3, dims, NPY_FLOAT64);
    if (res == NULL)
        return NULL;
    out = (double *)PyArray_DATA((PyArrayObject *)res);
    work = alloc_doubles(race_work_size(&bt.st.sys));
    if (work == NULL) {
        Py_DECREF(res);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < bt.n_sys; ++i) {
        race_system sys;
        const double *si, *di;
        system_at(&bt, i, &sys, &si, &di);
        race_jacobian(&sys, si, di, bt.b + i * bt.n_edges, out + i * bt.n_edges * bt.n_edges,
                      work);
    }
    Py_END_ALLOW_THREADS
    free(work);
    return res;
}

PyDoc_STRVAR(loss_doc,
"loss(path_ptr, path_edges, target_ptr, target_paths, b, s, d) -> (n_sys,)\n\n"
"The loss of every system (without its constant).");

static PyObject *py_loss(PyObject *self, PyObject *args, PyObject *kw)
{
    PyObject *pp, *pe, *tp, *tt, *b, *s, *d, *res;
    batch bt;
    double *work, *out;
    npy_intp dims[1];
    (void)self;
    static char *kwlist[] = {"path_ptr", "path_edges", "target_ptr", "target_paths", "b", "s",
                             "d", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO:loss", kwlist, &pp, &pe, &tp, &tt, &b,
                                     &s, &d))
        return NULL;
    if (parse_batch(pp, pe, tp, tt, b, "b", s, d, Py_None, &bt) != 0)
        return NULL;
    dims[0] = bt.n_sys;
    res = PyArray_SimpleNew(1, dims, NPY_FLOAT64);
    if (res == NULL)
        return NULL;
    out = (double *)PyArray_DATA((PyArrayObject *)res);
    work = alloc_doubles(race_work_size(&bt.st.sys));
    if (work == NULL) {
        Py_DECREF(res);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < bt.n_sys; ++i) {
        race_system sys;
        const double *si, *di;
        system_at(&bt, i, &sys, &si, &di);
        out[i] = race_loss(&sys, si, di, bt.b + i * bt.n_edges, work);
    }
    Py_END_ALLOW_THREADS
    free(work);
    return res;
}

PyDoc_STRVAR(path_strengths_doc,
"path_strengths(path_ptr, path_edges, target_ptr, target_paths, b) -> (n_sys, n_paths)");

static PyObject *py_path_strengths(PyObject *self, PyObject *args, PyObject *kw)
{
    PyObject *pp, *pe, *tp, *tt, *b, *res;
    batch bt;
    double *out;
    npy_intp dims[2];
    (void)self;
    static char *kwlist[] = {"path_ptr", "path_edges", "target_ptr", "target_paths", "b", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:path_strengths", kwlist, &pp, &pe, &tp,
                                     &tt, &b))
        return NULL;
    if (parse_batch(pp, pe, tp, tt, b, "b", NULL, NULL, Py_None, &bt) != 0)
        return NULL;
    dims[0] = bt.n_sys;
    dims[1] = bt.st.sys.n_paths;
    res = PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (res == NULL)
        return NULL;
    out = (double *)PyArray_DATA((PyArrayObject *)res);
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < bt.n_sys; ++i)
        race_path_strengths(&bt.st.sys, bt.b + i * bt.n_edges, out + i * dims[1]);
    Py_END_ALLOW_THREADS
    return res;
}

/* ---------------------------------------------------------------------------------------- */
/* integrators                                                                               */

/* system-major output (n_sys, n_out, n_edges): every system writes one contiguous block;
 * status (n_sys,) and stats (n_sys, 3) */
typedef struct run_out {
    PyObject *out, *status, *stats;
    double *out_data;
    int64_t *status_data, *stats_data;
} run_out;

/* Fresh outputs at least this large are filled (with NaN) before the threads write them: on
 * the virtual machines measured, the kernel's first touch of gigabytes of new memory costs
 * 1-3 s and varies widely when the integrator threads fault it in as they go, against a steady
 * ~0.1 s per GB for one sequential pass first.  Small outputs skip it (it would only add
 * time). */
#define PREFILL_BYTES ((npy_intp)1 << 24)

static int alloc_run_out(run_out *r, npy_intp n_out, npy_intp n_sys, npy_intp n_edges,
                         PyObject *out)
{
    npy_intp d3[3] = {n_sys, n_out, n_edges}, d1[1] = {n_sys}, d2[2] = {n_sys, 3};
    if (out != NULL && out != Py_None) {
        PyArrayObject *a = as_array(out, "out", NPY_FLOAT64, 3);
        if (a == NULL)
            return -1;
        if (PyArray_DIM(a, 0) != n_sys || PyArray_DIM(a, 1) != n_out ||
            PyArray_DIM(a, 2) != n_edges || !PyArray_ISWRITEABLE(a)) {
            PyErr_SetString(PyExc_ValueError,
                            "out must be a writable (n_sys, n_out, n_edges) array");
            return -1;
        }
        Py_INCREF(out);
        r->out = out;
    } else {
        r->out = PyArray_SimpleNew(3, d3, NPY_FLOAT64);
        if (r->out != NULL && PyArray_NBYTES((PyArrayObject *)r->out) >= PREFILL_BYTES) {
            double *data = (double *)PyArray_DATA((PyArrayObject *)r->out);
            npy_intp size = PyArray_SIZE((PyArrayObject *)r->out);
            Py_BEGIN_ALLOW_THREADS
            for (npy_intp i = 0; i < size; ++i)
                data[i] = NAN;
            Py_END_ALLOW_THREADS
        }
    }
    r->status = PyArray_SimpleNew(1, d1, NPY_INT64);
    r->stats = PyArray_SimpleNew(2, d2, NPY_INT64);
    if (r->out == NULL || r->status == NULL || r->stats == NULL) {
        Py_XDECREF(r->out);
        Py_XDECREF(r->status);
        Py_XDECREF(r->stats);
        return -1;
    }
    r->out_data = (double *)PyArray_DATA((PyArrayObject *)r->out);
    r->status_data = (int64_t *)PyArray_DATA((PyArrayObject *)r->status);
    r->stats_data = (int64_t *)PyArray_DATA((PyArrayObject *)r->stats);
    return 0;
}

static void store_run(run_out *r, npy_intp i, int status, const race_stats *st)
{
    r->status_data[i] = status;
    r->stats_data[3 * i + 0] = st->n_accepted;
    r->stats_data[3 * i + 1] = st->n_rejected;
    r->stats_data[3 * i + 2] = st->n_rhs;
}

PyDoc_STRVAR(gd_map_doc,
"gd_map(path_ptr, path_edges, target_ptr, target_paths, b0, s, d, rate, lr, record_steps)\n"
"-> (out (n_sys, n_record, n_edges), status (n_sys,), stats (n_sys, 3))\n\n"
"Gradient descent b <- b + lr * rhs(b); record_steps: non-decreasing int64 step indices.\n"
"stats columns: steps taken, 0, rhs evaluations.");

static PyObject *py_gd_map(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"path_ptr", "path_edges", "target_ptr", "target_paths", "b0", "s",
                             "d", "rate", "lr", "record_steps", NULL};
    PyObject *pp, *pe, *tp, *tt, *b, *s, *d, *rate, *steps_obj;
    PyArrayObject *steps;
    double lr, *work;
    const int64_t *rec;
    npy_intp n_rec;
    batch bt;
    run_out r;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOOdO:gd_map", kwlist, &pp, &pe, &tp, &tt, &b,
                                     &s, &d, &rate, &lr, &steps_obj))
        return NULL;
    if (parse_batch(pp, pe, tp, tt, b, "b0", s, d, rate, &bt) != 0)
        return NULL;
    steps = as_array(steps_obj, "record_steps", NPY_INT64, 1);
    if (steps == NULL)
        return NULL;
    n_rec = PyArray_DIM(steps, 0);
    rec = (const int64_t *)PyArray_DATA(steps);
    for (npy_intp k = 0; k < n_rec; ++k) {
        if (rec[k] < 0 || (k > 0 && rec[k] < rec[k - 1])) {
            PyErr_SetString(PyExc_ValueError,
                            "record_steps must be non-negative and non-decreasing");
            return NULL;
        }
    }
    if (alloc_run_out(&r, n_rec, bt.n_sys, bt.n_edges, NULL) != 0)
        return NULL;
    work = alloc_doubles(race_gd_work_size(&bt.st.sys));
    if (work == NULL)
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    for (npy_intp i = 0; i < bt.n_sys; ++i) {
        race_system sys;
        race_stats st;
        const double *si, *di;
        int status;
        system_at(&bt, i, &sys, &si, &di);
        status = race_gd_map(&sys, si, di, bt.b + i * bt.n_edges, lr, n_rec, rec,
                             r.out_data + i * n_rec * bt.n_edges, &st, work);
        store_run(&r, i, status, &st);
    }
    Py_END_ALLOW_THREADS
    free(work);
    return Py_BuildValue("NNN", r.out, r.status, r.stats);
fail:
    Py_DECREF(r.out);
    Py_DECREF(r.status);
    Py_DECREF(r.stats);
    return NULL;
}

static char *kw_ode[] = {"path_ptr", "path_edges", "target_ptr", "target_paths", "b0", "s", "d",
                         "rate", "t0", "t_end", "t_out", "rtol", "atol", "h0", "hmax",
                         "max_steps", "thresholds", "threads", "out", NULL};

/* systems handed out to the threads of one call, at least CHUNK at a time */
#define CHUNK 64

typedef struct ode_job {
    race_batch batch;
    int method;
    int64_t n_sys, n_out;
    double t0, t_end;
    const double *t_out, *thresholds;
    race_ode_options opt;
    double *out, *event_times;
    int *status;
    race_stats *stats;
    size_t wsize;
    int64_t next, chunk; /* next system to hand out; largest share */
    int threads;
    int failed; /* a thread could not allocate its scratch */
    pthread_mutex_t lock;
} ode_job;

static void *ode_worker(void *arg)
{
    ode_job *job = (ode_job *)arg;
    double *work = (double *)malloc(job->wsize * sizeof(double));
    int64_t *iwork = (int64_t *)malloc(race_batch_iwork_size(job->batch.sys) * sizeof(int64_t));
    for (;;) {
        int64_t first, last, size;
        pthread_mutex_lock(&job->lock);
        if (work == NULL || iwork == NULL)
            job->failed = 1;
        first = job->failed ? job->n_sys : job->next;
        /* guided: a share of what is left, so the threads finish together */
        size = (job->n_sys - first) / (4 * job->threads);
        size = size > job->chunk ? job->chunk : size < CHUNK ? CHUNK : size;
        last = first + size < job->n_sys ? first + size : job->n_sys;
        job->next = last;
        pthread_mutex_unlock(&job->lock);
        if (first >= job->n_sys)
            break;
        race_ode_batch(&job->batch, job->method, first, last, job->t0, job->t_end, job->n_out,
                       job->t_out, &job->opt, job->thresholds, job->out, job->event_times,
                       job->status, job->stats, work, iwork);
    }
    free(work);
    free(iwork);
    return NULL;
}

/* Run the job on `threads` threads (the calling one included); 0, or -1 when out of memory. */
static int run_job(ode_job *job, int threads)
{
    pthread_t tids[64];
    int started = 0;
    if (pthread_mutex_init(&job->lock, NULL) != 0)
        return -1;
    for (int k = 1; k < threads; ++k) {
        if (pthread_create(&tids[started], NULL, ode_worker, job) != 0)
            break; /* fewer threads: the others take the work */
        ++started;
    }
    ode_worker(job);
    for (int k = 0; k < started; ++k)
        pthread_join(tids[k], NULL);
    pthread_mutex_destroy(&job->lock);
    return job->failed ? -1 : 0;
}

/* method: RACE_METHOD_DOPRI5, RACE_METHOD_RODAS3 or RACE_METHOD_AUTO */
static PyObject *run_ode(PyObject *args, PyObject *kw, int method)
{
    PyObject *pp, *pe, *tp, *tt, *b, *s, *d, *rate, *tout_obj, *thr_obj = Py_None, *ev = NULL;
    PyObject *out_obj = Py_None;
    PyArrayObject *tout, *thr_arr;
    double t0, t_end;
    const double *t_out, *thr = NULL;
    npy_intp n_out, dims[2];
    race_ode_options opt;
    long long max_steps;
    int threads = 1, rc;
    batch bt;
    run_out r;
    ode_job job;
    static const char *formats[] = {"OOOOOOOOddOddddL|OiO:dopri5", "OOOOOOOOddOddddL|OiO:rodas3",
                                    "OOOOOOOOddOddddL|OiO:auto"};
    const char *fmt = formats[method];

    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kw_ode, &pp, &pe, &tp, &tt, &b, &s, &d, &rate,
                                     &t0, &t_end, &tout_obj, &opt.rtol, &opt.atol, &opt.h0,
                                     &opt.hmax, &max_steps, &thr_obj, &threads, &out_obj))
        return NULL;
    opt.max_steps = (int64_t)max_steps;
    if (threads < 1 || threads > 64) {
        PyErr_SetString(PyExc_ValueError, "threads must be between 1 and 64");
        return NULL;
    }
    if (parse_batch(pp, pe, tp, tt, b, "b0", s, d, rate, &bt) != 0)
        return NULL;
    if (!(t_end > t0) || !(opt.rtol > 0.0) || !(opt.atol > 0.0) || opt.max_steps < 1) {
        PyErr_SetString(PyExc_ValueError,
                        "need t_end > t0, rtol > 0, atol > 0 and max_steps >= 1");
        return NULL;
    }
    tout = as_array(tout_obj, "t_out", NPY_FLOAT64, 1);
    if (tout == NULL)
        return NULL;
    n_out = PyArray_DIM(tout, 0);
    t_out = (const double *)PyArray_DATA(tout);
    if (!times_in_order(n_out, t_out, t0, t_end)) {
        PyErr_SetString(PyExc_ValueError, "t_out must be non-decreasing and lie in [t0, t_end]");
        return NULL;
    }
    if (thr_obj != Py_None) {
        thr_arr = as_array(thr_obj, "thresholds", NPY_FLOAT64, 1);
        if (thr_arr == NULL)
            return NULL;
        if (PyArray_DIM(thr_arr, 0) != bt.st.sys.n_paths) {
            PyErr_SetString(PyExc_ValueError, "thresholds must have one entry per path");
            return NULL;
        }
        thr = (const double *)PyArray_DATA(thr_arr);
    }
    dims[0] = bt.n_sys;
    dims[1] = bt.st.sys.n_paths;
    ev = PyArray_SimpleNew(2, dims, NPY_FLOAT64);
    if (ev == NULL)
        return NULL;
    if (alloc_run_out(&r, n_out, bt.n_sys, bt.n_edges, out_obj) != 0) {
        Py_DECREF(ev);
        return NULL;
    }
    job.batch.sys = &bt.st.sys;
    job.batch.b0 = bt.b;
    job.batch.s = bt.s;
    job.batch.d = bt.d;
    job.batch.rate = bt.rate;
    job.batch.s_rows = bt.s_rows;
    job.batch.d_rows = bt.d_rows;
    job.batch.rate_rows = bt.rate_rows;
    job.method = method;
    job.n_sys = bt.n_sys;
    job.n_out = n_out;
    job.t0 = t0;
    job.t_end = t_end;
    job.t_out = t_out;
    job.thresholds = thr;
    job.opt = opt;
    job.out = r.out_data;
    job.event_times = (double *)PyArray_DATA((PyArrayObject *)ev);
    job.wsize = race_batch_work_size(&bt.st.sys);
    job.next = 0;
    job.failed = 0;
    job.status = (int *)malloc((size_t)bt.n_sys * sizeof(int));
    job.stats = (race_stats *)malloc((size_t)bt.n_sys * sizeof(race_stats));
    if (job.status == NULL || job.stats == NULL) {
        rc = -1;
    } else {
        if ((npy_intp)threads > (bt.n_sys + CHUNK - 1) / CHUNK)
            threads = (int)((bt.n_sys + CHUNK - 1) / CHUNK);
        /* shares of at most 1/16 of a thread's part, shrinking towards the end: few lane
         * drains at chunk ends, and the threads end together */
        job.chunk = bt.n_sys / (16 * threads);
        if (job.chunk < CHUNK)
            job.chunk = CHUNK;
        job.threads = threads;
        Py_BEGIN_ALLOW_THREADS
        rc = run_job(&job, threads);
        Py_END_ALLOW_THREADS
    }
    if (rc == 0)
        for (npy_intp i = 0; i < bt.n_sys; ++i)
            store_run(&r, i, job.status[i], &job.stats[i]);
    free(job.status);
    free(job.stats);
    if (rc != 0) {
        Py_DECREF(ev);
        Py_DECREF(r.out);
        Py_DECREF(r.status);
        Py_DECREF(r.stats);
        return PyErr_NoMemory();
    }
    return Py_BuildValue("NNNN", r.out, ev, r.status, r.stats);
}

PyDoc_STRVAR(dopri5_doc,
"dopri5(path_ptr, path_edges, target_ptr, target_paths, b0, s, d, rate, t0, t_end, t_out,\n"
"       rtol, atol, h0, hmax, max_steps, thresholds=None, threads=1, out=None)\n"
"-> (out (n_sys, n_out, n_edges), event_times (n_sys, n_paths), status (n_sys,),\n"
"    stats (n_sys, 3): accepted steps, rejected steps, rhs evaluations)\n\n"
"Adaptive Dormand-Prince 5(4) for every system (see race.h); h0 <= 0: automatic first step,\n"
"hmax <= 0: no limit; thresholds (n_paths,) with NaN for no event; threads: threads to use\n"
"(one per 64 systems at most); out: a writable C-contiguous float64 array\n"
"(n_sys, n_out, n_edges) to write into (returned as out) instead of a new one.");

static PyObject *py_dopri5(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return run_ode(args, kw, RACE_METHOD_DOPRI5);
}

PyDoc_STRVAR(rodas3_doc,
"rodas3(...) -> same arguments and results as dopri5, with the Rosenbrock method RODAS3.");

static PyObject *py_rodas3(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return run_ode(args, kw, RACE_METHOD_RODAS3);
}

PyDoc_STRVAR(auto_doc,
"auto(...) -> same arguments and results as dopri5: DOPRI5 until the problem turns stiff,\n"
"then RODAS3 (see race_auto in race.h).");

static PyObject *py_auto(PyObject *self, PyObject *args, PyObject *kw)
{
    (void)self;
    return run_ode(args, kw, RACE_METHOD_AUTO);
}

/* ---------------------------------------------------------------------------------------- */
/* cheap value checks for the Python front end                                               */

PyDoc_STRVAR(check_values_doc,
"check_values(x, increasing=False) -> int\n\n"
"For a C-contiguous float64 array x: 0 when every value is finite (and, with increasing, the\n"
"values strictly increase), 1 when some value is NaN or inf, 2 when they do not strictly\n"
"increase; -1 when x is not a C-contiguous float64 array (check it another way).");

static PyObject *py_check_values(PyObject *self, PyObject *args)
{
    PyObject *obj;
    PyArrayObject *a;
    const double *x;
    npy_intp n;
    int increasing = 0;
    long code = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "O|p:check_values", &obj, &increasing))
        return NULL;
    if (!PyArray_Check(obj))
        return PyLong_FromLong(-1);
    a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != NPY_FLOAT64 || !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a))
        return PyLong_FromLong(-1);
    x = (const double *)PyArray_DATA(a);
    n = PyArray_SIZE(a);
    if (increasing && n > 0 && isfinite(x[0]) && isfinite(x[n - 1]) && strictly_increasing(n, x))
        return PyLong_FromLong(0); /* finite ends and increasing: every value is finite */
    for (npy_intp i = 0; i < n; ++i) {
        if (!isfinite(x[i])) {
            code = 1;
            break;
        }
    }
    if (code == 0 && increasing && !strictly_increasing(n, x))
        code = 2;
    return PyLong_FromLong(code);
}

/* ---------------------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"check_values", (PyCFunction)py_check_values, METH_VARARGS, check_values_doc},
    {"rhs", (PyCFunction)(void (*)(void))py_rhs, METH_VARARGS | METH_KEYWORDS, rhs_doc},
    {"jacobian", (PyCFunction)(void (*)(void))py_jacobian, METH_VARARGS | METH_KEYWORDS,
     jacobian_doc},
    {"loss", (PyCFunction)(void (*)(void))py_loss, METH_VARARGS | METH_KEYWORDS, loss_doc},
    {"path_strengths", (PyCFunction)(void (*)(void))py_path_strengths,
     METH_VARARGS | METH_KEYWORDS, path_strengths_doc},
    {"gd_map", (PyCFunction)(void (*)(void))py_gd_map, METH_VARARGS | METH_KEYWORDS, gd_map_doc},
    {"dopri5", (PyCFunction)(void (*)(void))py_dopri5, METH_VARARGS | METH_KEYWORDS, dopri5_doc},
    {"rodas3", (PyCFunction)(void (*)(void))py_rodas3, METH_VARARGS | METH_KEYWORDS, rodas3_doc},
    {"auto", (PyCFunction)(void (*)(void))py_auto, METH_VARARGS | METH_KEYWORDS, auto_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_race",
    "C core of fastrace: race-system right-hand side, Jacobian and integrators (see race.h).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__race(void)
{
    PyObject *m;
    import_array();
    m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "OK", RACE_OK) ||
        PyModule_AddIntConstant(m, "MAX_STEPS", RACE_MAX_STEPS) ||
        PyModule_AddIntConstant(m, "STEP_TOO_SMALL", RACE_STEP_TOO_SMALL) ||
        PyModule_AddIntConstant(m, "NONFINITE", RACE_NONFINITE) ||
        PyModule_AddIntConstant(m, "BAD_INPUT", RACE_BAD_INPUT) ||
        PyModule_AddIntConstant(m, "API_VERSION", RACE_API_VERSION)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
