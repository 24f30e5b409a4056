/*
 * atlasmap.ops._native: the compiled kernels (kernels/nbkernel.c, kernels/stack.c) as a CPython extension
 * module, behind one checked boundary.
 *
 * Every function takes its arrays as objects exporting the buffer protocol (numpy arrays; the Python side
 * passes tensor.numpy() views) and its scalars as Python numbers, by keyword (positional also works, in
 * the documented order). Before a kernel runs, each array is checked: its format (float32, int64 or int32),
 * its number of dimensions, every shape relation between arguments, C-contiguity (or, where a kernel reads
 * a column range of a wider matrix, contiguous rows with a row stride ld >= the row length), writability
 * of outputs, and the index ranges the kernel would otherwise trust (CSR row offsets, rows, columns). A
 * mismatch raises TypeError (not an array, wrong dtype) or ValueError (shape, layout, read-only output,
 * bad offsets) naming the argument; nothing is read or written out of bounds. The GIL is released while a
 * kernel (and a check that scans data) runs: the data loader's prefetch thread gathers minibatches while
 * the training step computes.
 *
 * Only the Python C API is used (no numpy or torch headers): building needs a C compiler and Python's
 * headers. The kernels run their row ranges on the OpenMP threads of the libgomp PyTorch has loaded;
 * thread counts come from Python (torch.get_num_threads()).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "kernels/kernels.h"

/* ------------------------------------------------------------------------------------------ arguments */

/* Keyword / positional parsing for METH_FASTCALL | METH_KEYWORDS: names are interned once, so matching a
 * keyword is a pointer comparison. */
#define MAX_ARGS 16
typedef struct {
    const char *fname;
    const char *names[MAX_ARGS + 1]; /* NULL-terminated */
    int n_required;                  /* the first n_required names */
    int n;
    PyObject *interned[MAX_ARGS];
} signature;

static int parse(signature *s, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **out) {
    if (s->n == 0) {
        while (s->names[s->n] != NULL) {
            s->interned[s->n] = PyUnicode_InternFromString(s->names[s->n]);
            if (s->interned[s->n] == NULL) return -1;
            s->n++;
        }
    }
    for (int i = 0; i < s->n; i++) out[i] = NULL;
    if (nargs > s->n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", s->fname, s->n, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) out[i] = args[i];
    const Py_ssize_t n_kw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < n_kw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int j = 0;
        while (j < s->n && s->interned[j] != key) j++;
        if (j == s->n) { /* not interned by the caller: compare the text */
            j = 0;
            while (j < s->n && PyUnicode_Compare(key, s->interned[j]) != 0) j++;
            if (PyErr_Occurred()) return -1;
        }
        if (j == s->n) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", s->fname, key);
            return -1;
        }
        if (out[j] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", s->fname, s->names[j]);
            return -1;
        }
        out[j] = args[nargs + k];
    }
    for (int i = 0; i < s->n_required; i++)
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", s->fname, s->names[i]);
            return -1;
        }
    return 0;
}

/* ------------------------------------------------------------------------------------------ arrays */

/* Buffers acquired during one call, released together at its end (on success and on error). */
typedef struct {
    Py_buffer *views;
    Py_ssize_t n, cap;
    Py_buffer small[24];
} held;

static void held_init(held *h) {
    h->views = h->small;
    h->n = 0;
    h->cap = (Py_ssize_t)(sizeof h->small / sizeof h->small[0]);
}

static void held_release(held *h) {
    for (Py_ssize_t i = 0; i < h->n; i++) PyBuffer_Release(&h->views[i]);
    if (h->views != h->small) PyMem_Free(h->views);
    h->views = h->small;
    h->n = 0;
}

static Py_buffer *held_next(held *h) {
    if (h->n == h->cap) {
        Py_buffer *more = PyMem_Malloc(sizeof(Py_buffer) * (size_t)h->cap * 2);
        if (more == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        memcpy(more, h->views, sizeof(Py_buffer) * (size_t)h->n);
        if (h->views != h->small) PyMem_Free(h->views);
        h->views = more;
        h->cap *= 2;
    }
    return &h->views[h->n];
}

/* What a kernel needs to know of one checked array. */
typedef struct {
    char *data; /* NULL: the argument was None (optional) */
    int ndim;
    Py_ssize_t shape0, shape1; /* 1 for missing dimensions */
    Py_ssize_t size;           /* number of items */
    Py_ssize_t ld;             /* row stride in items of a 2-D array (shape1 when C-contiguous) */
} array;

enum kind { F32, I64, I32 };
static const char *const KIND_NAME[] = {"float32", "int64", "int32"};

#define OPTIONAL 1 /* None allowed */
#define OUTPUT 2   /* written: must be writable */
#define ROWS 4     /* 2-D with contiguous rows and row stride >= row length (a column range of a wider matrix) */

static int format_is(const Py_buffer *v, enum kind kind) {
    const char *f = v->format == NULL ? "B" : v->format;
    const int little = 1;
    const int native_little = *(const char *)&little == 1;
    if (*f == '@' || *f == '=' || (*f == '<' && native_little) || ((*f == '>' || *f == '!') && !native_little)) f++;
    if (f[0] == '\0' || f[1] != '\0') return 0;
    switch (kind) {
    case F32: return f[0] == 'f' && v->itemsize == 4;
    case I64: return (f[0] == 'q' || f[0] == 'l' || f[0] == 'n') && v->itemsize == 8;
    case I32: return (f[0] == 'i' || f[0] == 'l') && v->itemsize == 4;
    }
    return 0;
}

static void describe(const array *a, char *buf, size_t size) {
    if (a->ndim == 1) snprintf(buf, size, "shape (%zd,)", a->shape0);
    else if (a->ndim == 2) snprintf(buf, size, "shape (%zd, %zd)", a->shape0, a->shape1);
    else snprintf(buf, size, "a %d-D array", a->ndim);
}

/* Acquire `obj` as an array of `kind`; checks format, writability and layout (not the shape). */
static int get(held *h, PyObject *obj, const char *name, enum kind kind, int flags, array *a) {
    memset(a, 0, sizeof *a);
    if (obj == NULL || obj == Py_None) {
        if (flags & OPTIONAL) return 0;
        PyErr_Format(PyExc_TypeError, "%s: expected a %s array, got None", name, KIND_NAME[kind]);
        return -1;
    }
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a %s array (an object with the buffer protocol, e.g. a numpy "
                     "array or tensor.numpy()), got %.80s", name, KIND_NAME[kind], Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_buffer *v = held_next(h);
    if (v == NULL) return -1;
    if (PyObject_GetBuffer(obj, v, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %.80s does not export a strided buffer with a format", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    h->n++;
    if (!format_is(v, kind)) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s values, got buffer format '%s' (%zd-byte items)", name,
                     KIND_NAME[kind], v->format == NULL ? "B" : v->format, v->itemsize);
        return -1;
    }
    if ((flags & OUTPUT) && v->readonly) {
        PyErr_Format(PyExc_ValueError, "%s: expected a writable array (it is an output), got a read-only one", name);
        return -1;
    }
    a->data = v->buf;
    a->ndim = v->ndim;
    a->shape0 = v->ndim >= 1 ? v->shape[0] : 1;
    a->shape1 = v->ndim >= 2 ? v->shape[1] : 1;
    a->size = v->itemsize > 0 ? v->len / v->itemsize : 0;
    a->ld = a->shape1;
    if ((flags & ROWS) && v->ndim == 2) {
        const Py_ssize_t s0 = v->strides[0], s1 = v->strides[1], item = v->itemsize;
        const int cols_ok = a->shape1 <= 1 || s1 == item;
        const int rows_ok = a->shape0 <= 1 || (s0 % item == 0 && s0 / item >= a->shape1);
        if (!(cols_ok && rows_ok)) {
            PyErr_Format(PyExc_ValueError, "%s: expected contiguous rows (row stride >= row length), got strides "
                         "(%zd, %zd) bytes", name, s0, s1);
            return -1;
        }
        if (a->shape0 > 1) a->ld = s0 / item;
    } else if (!PyBuffer_IsContiguous(v, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous array", name);
        return -1;
    }
    return 0;
}

/* Shape checks; a negative expected size means any. */
static int want_2d(const array *a, const char *name, Py_ssize_t d0, Py_ssize_t d1, const char *what) {
    if (a->data == NULL) return 0;
    if (a->ndim == 2 && (d0 < 0 || a->shape0 == d0) && (d1 < 0 || a->shape1 == d1)) return 0;
    char got[64];
    describe(a, got, sizeof got);
    PyErr_Format(PyExc_ValueError, "%s: expected a 2-D array of shape %s, got %s", name, what, got);
    return -1;
}

static int want_1d(const array *a, const char *name, Py_ssize_t d0, const char *what) {
    if (a->data == NULL) return 0;
    if (a->ndim == 1 && (d0 < 0 || a->shape0 == d0)) return 0;
    char got[64];
    describe(a, got, sizeof got);
    PyErr_Format(PyExc_ValueError, "%s: expected a 1-D array of length %s, got %s", name, what, got);
    return -1;
}

static int get_int(PyObject *obj, const char *name, long lo, long hi, long fallback, long *out) {
    if (obj == NULL || obj == Py_None) {
        *out = fallback;
        return 0;
    }
    const long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected an integer, got %.80s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s: expected an integer in [%ld, %ld], got %ld", name, lo, hi, v);
        return -1;
    }
    *out = v;
    return 0;
}

static int get_threads(PyObject *obj, int *out) {
    long v;
    if (get_int(obj, "n_threads", 1, 4096, 1, &v) < 0) return -1;
    *out = (int)v;
    return 0;
}

static int get_float(PyObject *obj, const char *name, double *out) {
    if (obj == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: expected a number, got nothing", name);
        return -1;
    }
    const double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a number, got %.80s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = v;
    return 0;
}

static int get_bool(PyObject *obj, const char *name, int *out) {
    const int v = obj == NULL ? 0 : PyObject_IsTrue(obj);
    if (v < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a bool", name);
        return -1;
    }
    *out = v;
    return 0;
}

#define F(a) ((float *)(a).data)
#define I64P(a) ((int64_t *)(a).data)
#define I32P(a) ((int32_t *)(a).data)

static PyObject *finish(held *h, int failed) {
    held_release(h);
    if (failed) return NULL;
    Py_RETURN_NONE;
}

/* CSR row offsets: indptr[0] >= 0, non-decreasing, indptr[n] <= nnz. Returns 0 when valid. */
static int csr_offsets_bad(const int64_t *indptr, Py_ssize_t n, Py_ssize_t nnz) {
    if (indptr[0] < 0 || indptr[n] > nnz) return 1;
    for (Py_ssize_t i = 0; i < n; i++)
        if (indptr[i + 1] < indptr[i]) return 1;
    return 0;
}

static int columns_bad(const int32_t *indices, int64_t lo, int64_t hi, int64_t n_cols) {
    int bad = 0;
    for (int64_t k = lo; k < hi; k++) bad |= (indices[k] < 0) | (indices[k] >= n_cols);
    return bad;
}

/* ------------------------------------------------------------------------------------------ likelihood */

static signature nb_nll_sig = {
    "nb_nll",
    {"x", "theta", "nll", "mu", "logits", "log_library", "pi", "const", "lgamma_cell", "grad_mu", "grad_logits",
     "grad_log_library", "grad_theta", "grad_pi", "n_threads", NULL},
    3, 0, {0}};

PyDoc_STRVAR(nb_nll_doc,
"nb_nll(*, x, theta, nll, mu=None, logits=None, log_library=None, pi=None, const=None, lgamma_cell=None,\n"
"       grad_mu=None, grad_logits=None, grad_log_library=None, grad_theta=None, grad_pi=None, n_threads=1)\n"
"--\n\n"
"NB / ZINB negative log-likelihood of float32 counts x (n x g) into nll (n), and the gradients whose\n"
"buffers are given. The mean is mu (n x g) or exp(log_library) * softmax(logits) (n x g, n). theta: (g,),\n"
"(1, g) or (n, g). pi (zero-inflation logits), logits, grad_logits and grad_pi may be column ranges of\n"
"a wider matrix (contiguous rows, one common row stride); everything else is C-contiguous. const and\n"
"lgamma_cell: per cell (n). lgamma_cell excludes grad_theta.");

static PyObject *py_nb_nll(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&nb_nll_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array x, theta, nll, mu, logits, log_lib, pi, cst, lgc, g_mu, g_logits, g_log_lib, g_theta, g_pi;
    int n_threads;
    int bad = get(&h, o[0], "x", F32, 0, &x) || get(&h, o[1], "theta", F32, 0, &theta)
        || get(&h, o[2], "nll", F32, OUTPUT, &nll) || get(&h, o[3], "mu", F32, OPTIONAL, &mu)
        || get(&h, o[4], "logits", F32, OPTIONAL | ROWS, &logits)
        || get(&h, o[5], "log_library", F32, OPTIONAL, &log_lib) || get(&h, o[6], "pi", F32, OPTIONAL | ROWS, &pi)
        || get(&h, o[7], "const", F32, OPTIONAL, &cst) || get(&h, o[8], "lgamma_cell", F32, OPTIONAL, &lgc)
        || get(&h, o[9], "grad_mu", F32, OPTIONAL | OUTPUT, &g_mu)
        || get(&h, o[10], "grad_logits", F32, OPTIONAL | OUTPUT | ROWS, &g_logits)
        || get(&h, o[11], "grad_log_library", F32, OPTIONAL | OUTPUT, &g_log_lib)
        || get(&h, o[12], "grad_theta", F32, OPTIONAL | OUTPUT, &g_theta)
        || get(&h, o[13], "grad_pi", F32, OPTIONAL | OUTPUT | ROWS, &g_pi) || get_threads(o[14], &n_threads);
    if (bad) return finish(&h, 1);
    if (x.ndim != 2) {
        want_2d(&x, "x", -1, -1, "(n, g)");
        return finish(&h, 1);
    }
    const Py_ssize_t n = x.shape0, g = x.shape1;
    const char *ng = "(n, g) of x";
    if ((mu.data == NULL) == (logits.data == NULL)) {
        PyErr_SetString(PyExc_ValueError, "mu / logits: give the mean either as mu or as logits with log_library");
        return finish(&h, 1);
    }
    if (logits.data != NULL && log_lib.data == NULL) {
        PyErr_SetString(PyExc_ValueError, "log_library: required with logits");
        return finish(&h, 1);
    }
    if (logits.data == NULL && (log_lib.data != NULL || g_logits.data != NULL || g_log_lib.data != NULL)) {
        PyErr_SetString(PyExc_ValueError, "log_library / grad_logits / grad_log_library: only with logits");
        return finish(&h, 1);
    }
    if (pi.data == NULL && g_pi.data != NULL) {
        PyErr_SetString(PyExc_ValueError, "grad_pi: only with pi (zero-inflation logits)");
        return finish(&h, 1);
    }
    if (lgc.data != NULL && g_theta.data != NULL) {
        PyErr_SetString(PyExc_ValueError, "lgamma_cell: can only be given when theta needs no gradient (grad_theta)");
        return finish(&h, 1);
    }
    bad = want_2d(&mu, "mu", n, g, ng) || want_2d(&logits, "logits", n, g, ng) || want_2d(&pi, "pi", n, g, ng)
        || want_1d(&log_lib, "log_library", n, "n of x") || want_1d(&cst, "const", n, "n of x")
        || want_1d(&lgc, "lgamma_cell", n, "n of x") || want_1d(&nll, "nll", n, "n of x")
        || want_2d(&g_mu, "grad_mu", n, g, ng) || want_2d(&g_logits, "grad_logits", n, g, ng)
        || want_1d(&g_log_lib, "grad_log_library", n, "n of x") || want_2d(&g_theta, "grad_theta", n, g, ng)
        || want_2d(&g_pi, "grad_pi", n, g, ng);
    if (bad) return finish(&h, 1);
    int64_t theta_stride;
    if ((theta.ndim == 1 && theta.shape0 == g) || (theta.ndim == 2 && theta.shape0 == 1 && theta.shape1 == g)) {
        theta_stride = 0;
    } else if (theta.ndim == 2 && theta.shape0 == n && theta.shape1 == g) {
        theta_stride = g;
    } else {
        char got[64];
        describe(&theta, got, sizeof got);
        PyErr_Format(PyExc_ValueError, "theta: expected shape (g,), (1, g) or (n, g) with (n, g) = (%zd, %zd), got %s",
                     n, g, got);
        return finish(&h, 1);
    }
    /* one row stride for the column-range arrays (irrelevant with a single row) */
    Py_ssize_t ld = g;
    const array *ranged[4] = {&logits, &pi, &g_logits, &g_pi};
    const char *ranged_name[4] = {"logits", "pi", "grad_logits", "grad_pi"};
    int first = -1;
    for (int i = 0; i < 4 && n > 1; i++) {
        if (ranged[i]->data == NULL) continue;
        if (first < 0) {
            first = i;
            ld = ranged[i]->ld;
        } else if (ranged[i]->ld != ld) {
            PyErr_Format(PyExc_ValueError, "%s: expected the row stride of %s (%zd items), got %zd", ranged_name[i],
                         ranged_name[first], ld, ranged[i]->ld);
            return finish(&h, 1);
        }
    }
    int status = 0;
    if (n > 0 && g == 0) { /* no genes: the sums are empty */
        for (Py_ssize_t c = 0; c < n; c++) {
            F(nll)[c] = (cst.data ? F(cst)[c] : 0.0f) - (lgc.data ? F(lgc)[c] : 0.0f);
            if (g_log_lib.data) F(g_log_lib)[c] = 0.0f;
        }
    } else if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        status = atlasmap_nb_nll(n, g, ld, F(x), F(mu), F(logits), F(log_lib), F(theta), theta_stride, F(pi), F(cst),
                                 F(lgc), F(nll), F(g_mu), F(g_logits), F(g_log_lib), F(g_theta), F(g_pi), n_threads);
        Py_END_ALLOW_THREADS
    }
    if (status != 0) PyErr_SetString(PyExc_MemoryError, "nb_nll: the kernel could not allocate its scratch memory");
    return finish(&h, status != 0);
}

static signature lgamma_sig = {"lgamma_theta_sum", {"x", "theta", "out", "n_threads", NULL}, 3, 0, {0}};

PyDoc_STRVAR(lgamma_doc,
"lgamma_theta_sum(*, x, theta, out, n_threads=1)\n--\n\n"
"Per-cell sum_g lgamma(x + theta) - lgamma(theta) of float32 counts x (n x g) into out (n); theta (g,),\n"
"(1, g) or (n, g).");

static PyObject *py_lgamma(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&lgamma_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array x, theta, out;
    int n_threads;
    if (get(&h, o[0], "x", F32, 0, &x) || get(&h, o[1], "theta", F32, 0, &theta)
        || get(&h, o[2], "out", F32, OUTPUT, &out) || get_threads(o[3], &n_threads)
        || want_2d(&x, "x", -1, -1, "(n, g)"))
        return finish(&h, 1);
    const Py_ssize_t n = x.shape0, g = x.shape1;
    if (want_1d(&out, "out", n, "n of x")) return finish(&h, 1);
    int64_t theta_stride;
    if ((theta.ndim == 1 && theta.shape0 == g) || (theta.ndim == 2 && theta.shape0 == 1 && theta.shape1 == g)) {
        theta_stride = 0;
    } else if (theta.ndim == 2 && theta.shape0 == n && theta.shape1 == g) {
        theta_stride = g;
    } else {
        char got[64];
        describe(&theta, got, sizeof got);
        PyErr_Format(PyExc_ValueError, "theta: expected shape (g,), (1, g) or (n, g) with (n, g) = (%zd, %zd), got %s",
                     n, g, got);
        return finish(&h, 1);
    }
    int status = 0;
    if (g == 0) {
        for (Py_ssize_t c = 0; c < n; c++) F(out)[c] = 0.0f;
    } else if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        status = atlasmap_lgamma_theta_sum(n, g, F(x), F(theta), theta_stride, F(out), n_threads);
        Py_END_ALLOW_THREADS
    }
    if (status != 0) PyErr_SetString(PyExc_MemoryError, "lgamma_theta_sum: out of scratch memory");
    return finish(&h, status != 0);
}

/* ------------------------------------------------------------------------------------------ CSR counts */

/* indptr (int64, n + 1), indices (int32, nnz; may be NULL), data (float32, nnz) of a CSR matrix. */
static int get_csr(held *h, PyObject *indptr_o, PyObject *indices_o, PyObject *data_o, array *indptr, array *indices,
                   array *data) {
    if (get(h, indptr_o, "indptr", I64, 0, indptr) || want_1d(indptr, "indptr", -1, "n + 1")) return -1;
    if (indptr->shape0 < 1) {
        PyErr_SetString(PyExc_ValueError, "indptr: expected n + 1 >= 1 row offsets, got none");
        return -1;
    }
    if (indices_o != NULL && (get(h, indices_o, "indices", I32, 0, indices) || want_1d(indices, "indices", -1, "nnz")))
        return -1;
    if (get(h, data_o, "data", F32, 0, data) || want_1d(data, "data", -1, "nnz")) return -1;
    if (indices_o != NULL && indices->shape0 != data->shape0) {
        PyErr_Format(PyExc_ValueError, "indices: expected the length of data (%zd), got %zd", data->shape0,
                     indices->shape0);
        return -1;
    }
    return 0;
}

static signature lgamma_csr_sig = {
    "lgamma_theta_sum_csr", {"indptr", "indices", "data", "theta", "out", "n_threads", NULL}, 5, 0, {0}};

PyDoc_STRVAR(lgamma_csr_doc,
"lgamma_theta_sum_csr(*, indptr, indices, data, theta, out, n_threads=1)\n--\n\n"
"lgamma_theta_sum of the n rows of a CSR matrix (indptr int64 n + 1, indices int32, data float32) with theta\n"
"one float32 value per column (g), into out (n). Row offsets and column indices are checked.");

static PyObject *py_lgamma_csr(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&lgamma_csr_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array indptr, indices, data, theta, out;
    int n_threads;
    if (get_csr(&h, o[0], o[1], o[2], &indptr, &indices, &data) || get(&h, o[3], "theta", F32, 0, &theta)
        || want_1d(&theta, "theta", -1, "g") || get(&h, o[4], "out", F32, OUTPUT, &out)
        || want_1d(&out, "out", indptr.shape0 - 1, "n = len(indptr) - 1") || get_threads(o[5], &n_threads))
        return finish(&h, 1);
    const Py_ssize_t n = indptr.shape0 - 1, g = theta.shape0;
    int offsets_bad, cols_bad = 0, status = 0;
    Py_BEGIN_ALLOW_THREADS
    offsets_bad = csr_offsets_bad(I64P(indptr), n, data.shape0);
    if (!offsets_bad) cols_bad = columns_bad(I32P(indices), I64P(indptr)[0], I64P(indptr)[n], g);
    if (!offsets_bad && !cols_bad) {
        if (g == 0 || n == 0) {
            for (Py_ssize_t c = 0; c < n; c++) F(out)[c] = 0.0f;
        } else {
            status = atlasmap_lgamma_theta_sum_csr(n, g, I64P(indptr), I32P(indices), F(data), F(theta), F(out),
                                                   n_threads);
        }
    }
    Py_END_ALLOW_THREADS
    if (offsets_bad)
        PyErr_Format(PyExc_ValueError, "indptr: expected non-decreasing row offsets from >= 0 to <= len(data) (%zd)",
                     data.shape0);
    else if (cols_bad)
        PyErr_Format(PyExc_ValueError, "indices: expected column indices in [0, %zd) (the length of theta)", g);
    else if (status != 0)
        PyErr_SetString(PyExc_MemoryError, "lgamma_theta_sum_csr: out of scratch memory");
    return finish(&h, offsets_bad || cols_bad || status != 0);
}

static signature gather_sig = {"gather_rows", {"indptr", "indices", "data", "rows", "out", "n_threads", NULL},
                               5, 0, {0}};

PyDoc_STRVAR(gather_doc,
"gather_rows(*, indptr, indices, data, rows, out, n_threads=1)\n--\n\n"
"Dense float32 rows (m x n_cols, out) of the CSR rows `rows` (int64, m, each in [0, n)); indptr int64 n + 1,\n"
"indices int32, data float32. The selected rows' offsets and column indices are checked.");

static PyObject *py_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&gather_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array indptr, indices, data, rows, out;
    int n_threads;
    if (get_csr(&h, o[0], o[1], o[2], &indptr, &indices, &data) || get(&h, o[3], "rows", I64, 0, &rows)
        || want_1d(&rows, "rows", -1, "m") || get(&h, o[4], "out", F32, OUTPUT, &out)
        || want_2d(&out, "out", rows.shape0, -1, "(m, n_cols) with m = len(rows)") || get_threads(o[5], &n_threads))
        return finish(&h, 1);
    const Py_ssize_t n = indptr.shape0 - 1, m = rows.shape0, n_cols = out.shape1, nnz = data.shape0;
    const int64_t *ptr = I64P(indptr), *r = I64P(rows);
    Py_ssize_t bad_row = -1;
    int bad_kind = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < m && bad_row < 0; i++) {
        const int64_t row = r[i];
        if (row < 0 || row >= n) {
            bad_row = i;
            bad_kind = 1;
        } else if (ptr[row] < 0 || ptr[row] > ptr[row + 1] || ptr[row + 1] > nnz) {
            bad_row = i;
            bad_kind = 2;
        } else if (columns_bad(I32P(indices), ptr[row], ptr[row + 1], n_cols)) {
            bad_row = i;
            bad_kind = 3;
        }
    }
    if (bad_row < 0) atlasmap_gather_rows(m, r, ptr, I32P(indices), F(data), n_cols, F(out), n_threads);
    Py_END_ALLOW_THREADS
    if (bad_kind == 1)
        PyErr_Format(PyExc_ValueError, "rows: expected rows in [0, %zd), got %lld at position %zd", n,
                     (long long)r[bad_row], bad_row);
    else if (bad_kind == 2)
        PyErr_Format(PyExc_ValueError, "indptr: row %lld has offsets outside [0, len(data) = %zd] or decreasing",
                     (long long)r[bad_row], nnz);
    else if (bad_kind == 3)
        PyErr_Format(PyExc_ValueError, "indices: row %lld has column indices outside [0, %zd) (n_cols of out)",
                     (long long)r[bad_row], n_cols);
    return finish(&h, bad_row >= 0);
}

static signature flags_sig = {"count_flags", {"values", "n_threads", NULL}, 1, 0, {0}};

PyDoc_STRVAR(flags_doc,
"count_flags(*, values, n_threads=1) -> int\n--\n\n"
"One pass over C-contiguous float32 values (any shape): bit 1 NaN/inf, 2 negative, 4 non-integer,\n"
"8 above 2^24; 0 when all are counts.");

static PyObject *py_flags(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&flags_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array values;
    int n_threads, flags;
    if (get(&h, o[0], "values", F32, 0, &values) || get_threads(o[1], &n_threads)) return finish(&h, 1);
    Py_BEGIN_ALLOW_THREADS
    flags = atlasmap_check_counts(values.size, F(values), n_threads);
    Py_END_ALLOW_THREADS
    held_release(&h);
    return PyLong_FromLong(flags);
}

static signature logfact_sig = {"log_factorial_rows", {"indptr", "data", "out", "n_threads", NULL}, 3, 0, {0}};

PyDoc_STRVAR(logfact_doc,
"log_factorial_rows(*, indptr, data, out, n_threads=1)\n--\n\n"
"sum_g lgamma(x_g + 1) of each row of CSR counts (indptr int64 n + 1, data float32) into out (float32, n).");

static PyObject *py_logfact(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&logfact_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array indptr, indices, data, out;
    int n_threads, offsets_bad;
    if (get_csr(&h, o[0], NULL, o[1], &indptr, &indices, &data) || get(&h, o[2], "out", F32, OUTPUT, &out)
        || want_1d(&out, "out", indptr.shape0 - 1, "n = len(indptr) - 1") || get_threads(o[3], &n_threads))
        return finish(&h, 1);
    const Py_ssize_t n = indptr.shape0 - 1;
    Py_BEGIN_ALLOW_THREADS
    offsets_bad = csr_offsets_bad(I64P(indptr), n, data.shape0);
    if (!offsets_bad) atlasmap_log_factorial_rows(n, I64P(indptr), F(data), F(out), n_threads);
    Py_END_ALLOW_THREADS
    if (offsets_bad)
        PyErr_Format(PyExc_ValueError, "indptr: expected non-decreasing row offsets from >= 0 to <= len(data) (%zd)",
                     data.shape0);
    return finish(&h, offsets_bad);
}

/* ------------------------------------------------------------------------------------------ random, Adam */

static signature uniform_sig = {"uniform", {"out", "seed", NULL}, 2, 0, {0}};

PyDoc_STRVAR(uniform_doc,
"uniform(*, out, seed)\n--\n\n"
"Fill C-contiguous float32 out (any shape) with uniforms in [0, 1) (24 bits each): splitmix64 of\n"
"seed + i * golden, seed taken modulo 2^64.");

static PyObject *py_uniform(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&uniform_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array out;
    if (get(&h, o[0], "out", F32, OUTPUT, &out)) return finish(&h, 1);
    if (!PyLong_Check(o[1])) {
        PyErr_Format(PyExc_TypeError, "seed: expected an int, got %.80s", Py_TYPE(o[1])->tp_name);
        return finish(&h, 1);
    }
    const uint64_t seed = (uint64_t)PyLong_AsUnsignedLongLongMask(o[1]);
    if (PyErr_Occurred()) return finish(&h, 1);
    Py_BEGIN_ALLOW_THREADS
    atlasmap_uniform(out.size, seed, F(out));
    Py_END_ALLOW_THREADS
    return finish(&h, 0);
}

static signature adam_sig = {
    "adam",
    {"params", "grads", "exp_avg", "exp_avg_sq", "step_size", "bias2_sqrt", "beta1", "beta2", "eps",
     "weight_decay", "n_threads", NULL},
    10, 0, {0}};

PyDoc_STRVAR(adam_doc,
"adam(*, params, grads, exp_avg, exp_avg_sq, step_size, bias2_sqrt, beta1, beta2, eps, weight_decay,\n"
"     n_threads=1)\n--\n\n"
"Adam update (torch.optim.Adam's, amsgrad off) of each float32 tensor params[t] whose grads[t] is not\n"
"None, in place with its moments exp_avg[t], exp_avg_sq[t] (same shapes). step_size and bias2_sqrt:\n"
"float32, one value per tensor.");

static PyObject *py_adam(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&adam_sig, args, nargs, kwnames, o) < 0) return NULL;
    static const char *const list_name[4] = {"params", "grads", "exp_avg", "exp_avg_sq"};
    PyObject *lists[4] = {NULL, NULL, NULL, NULL};
    held h;
    held_init(&h);
    void **ptrs = NULL;
    int64_t *sizes = NULL;
    int failed = 1;
    Py_ssize_t n_tensors = 0;
    for (int k = 0; k < 4; k++) {
        lists[k] = PySequence_Fast(o[k], "expected a sequence of arrays");
        if (lists[k] == NULL) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: expected a list or tuple of arrays", list_name[k]);
            goto done;
        }
        if (k == 0) n_tensors = PySequence_Fast_GET_SIZE(lists[0]);
        else if (PySequence_Fast_GET_SIZE(lists[k]) != n_tensors) {
            PyErr_Format(PyExc_ValueError, "%s: expected %zd arrays (one per parameter), got %zd", list_name[k],
                         n_tensors, PySequence_Fast_GET_SIZE(lists[k]));
            goto done;
        }
    }
    array step_size, bias2_sqrt;
    double beta1, beta2, eps, wd;
    int n_threads;
    if (get(&h, o[4], "step_size", F32, 0, &step_size) || want_1d(&step_size, "step_size", n_tensors, "len(params)")
        || get(&h, o[5], "bias2_sqrt", F32, 0, &bias2_sqrt)
        || want_1d(&bias2_sqrt, "bias2_sqrt", n_tensors, "len(params)") || get_float(o[6], "beta1", &beta1)
        || get_float(o[7], "beta2", &beta2) || get_float(o[8], "eps", &eps) || get_float(o[9], "weight_decay", &wd)
        || get_threads(o[10], &n_threads))
        goto done;
    ptrs = PyMem_Malloc(sizeof(void *) * 4 * (size_t)(n_tensors > 0 ? n_tensors : 1));
    sizes = PyMem_Malloc(sizeof(int64_t) * (size_t)(n_tensors > 0 ? n_tensors : 1));
    if (ptrs == NULL || sizes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t t = 0; t < n_tensors; t++) {
        array a[4];
        Py_ssize_t param_view = 0;
        for (int k = 0; k < 4; k++) {
            char name[80];
            snprintf(name, sizeof name, "%s[%zd]", list_name[k], t);
            if (get(&h, PySequence_Fast_GET_ITEM(lists[k], t), name, F32, k == 1 ? OPTIONAL : OUTPUT, &a[k])) goto done;
            if (k == 0) {
                param_view = h.n - 1;
            } else if (a[k].data != NULL) { /* the shape of the parameter */
                const Py_buffer *pv = &h.views[param_view], *v = &h.views[h.n - 1];
                int same = pv->ndim == v->ndim;
                for (int d = 0; same && d < v->ndim; d++) same = pv->shape[d] == v->shape[d];
                if (!same) {
                    PyErr_Format(PyExc_ValueError, "%s: expected the shape of params[%zd]", name, t);
                    goto done;
                }
            }
            ptrs[k * n_tensors + t] = a[k].data;
        }
        sizes[t] = a[0].size;
    }
    Py_BEGIN_ALLOW_THREADS
    atlasmap_adam(n_tensors, (float *const *)ptrs, (const float *const *)(ptrs + n_tensors),
                  (float *const *)(ptrs + 2 * n_tensors), (float *const *)(ptrs + 3 * n_tensors), sizes, F(step_size),
                  F(bias2_sqrt), (float)beta1, (float)beta2, (float)eps, (float)wd, n_threads);
    Py_END_ALLOW_THREADS
    failed = 0;
done:
    for (int k = 0; k < 4; k++) Py_XDECREF(lists[k]);
    PyMem_Free(ptrs);
    PyMem_Free(sizes);
    return finish(&h, failed);
}

/* ------------------------------------------------------------------------------------------ stack */

/* Covariate tables: a sequence (one entry per covariate) of sequences of float32 blocks (rows x h),
 * optionally with a parallel structure of gradient buffers (None or writable, same shapes). Fills the
 * kernel's flattened arrays (allocated here, freed by the caller with PyMem_Free). */
typedef struct {
    int64_t n_cov, n_total;
    int64_t *n_blocks, *block_rows;
    const float **block_ptr;
    float **block_grad;
} tables;

static void tables_free(tables *t) {
    PyMem_Free(t->n_blocks);
    PyMem_Free(t->block_rows);
    PyMem_Free((void *)t->block_ptr);
    PyMem_Free(t->block_grad);
    memset(t, 0, sizeof *t);
}

static int get_tables(held *h, PyObject *blocks_o, PyObject *grads_o, Py_ssize_t width, tables *t) {
    memset(t, 0, sizeof *t);
    PyObject *covs = PySequence_Fast(blocks_o, "blocks");
    PyObject *gcovs = NULL;
    int failed = 1;
    if (covs == NULL) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "blocks: expected a sequence (one entry per covariate) of sequences of arrays");
        return -1;
    }
    const Py_ssize_t n_cov = PySequence_Fast_GET_SIZE(covs);
    if (grads_o != NULL && grads_o != Py_None) {
        gcovs = PySequence_Fast(grads_o, "block_grads");
        if (gcovs == NULL) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "block_grads: expected a sequence of sequences of arrays or None");
            goto done;
        }
        if (PySequence_Fast_GET_SIZE(gcovs) != n_cov) {
            PyErr_Format(PyExc_ValueError, "block_grads: expected %zd entries (one per covariate of blocks), got %zd",
                         n_cov, PySequence_Fast_GET_SIZE(gcovs));
            goto done;
        }
    }
    t->n_cov = n_cov;
    t->n_blocks = PyMem_Malloc(sizeof(int64_t) * (size_t)(n_cov + 1));
    if (t->n_blocks == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t cap = 0;
    for (Py_ssize_t j = 0; j < n_cov; j++) {
        PyObject *blocks = PySequence_Fast(PySequence_Fast_GET_ITEM(covs, j), "blocks[j]");
        PyObject *grads = NULL;
        if (blocks == NULL) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "blocks[%zd]: expected a sequence of arrays", j);
            goto done;
        }
        const Py_ssize_t nb = PySequence_Fast_GET_SIZE(blocks);
        if (nb < 1) {
            Py_DECREF(blocks);
            PyErr_Format(PyExc_ValueError, "blocks[%zd]: expected at least one block", j);
            goto done;
        }
        if (gcovs != NULL) {
            grads = PySequence_Fast(PySequence_Fast_GET_ITEM(gcovs, j), "block_grads[j]");
            if (grads == NULL || PySequence_Fast_GET_SIZE(grads) != nb) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "block_grads[%zd]: expected a sequence of %zd entries (None or arrays)",
                             j, nb);
                Py_DECREF(blocks);
                Py_XDECREF(grads);
                goto done;
            }
        }
        t->n_blocks[j] = nb;
        if (t->n_total + nb > cap) {
            cap = 2 * (t->n_total + nb);
            int64_t *rows = PyMem_Realloc(t->block_rows, sizeof(int64_t) * (size_t)cap);
            if (rows != NULL) t->block_rows = rows;
            const float **ptr = PyMem_Realloc((void *)t->block_ptr, sizeof(float *) * (size_t)cap);
            if (ptr != NULL) t->block_ptr = ptr;
            float **gptr = PyMem_Realloc(t->block_grad, sizeof(float *) * (size_t)cap);
            if (gptr != NULL) t->block_grad = gptr;
            if (rows == NULL || ptr == NULL || gptr == NULL) {
                PyErr_NoMemory();
                Py_DECREF(blocks);
                Py_XDECREF(grads);
                goto done;
            }
        }
        for (Py_ssize_t b = 0; b < nb; b++) {
            char name[80];
            array a, ga;
            snprintf(name, sizeof name, "blocks[%zd][%zd]", j, b);
            int bad = get(h, PySequence_Fast_GET_ITEM(blocks, b), name, F32, 0, &a)
                || want_2d(&a, name, -1, width, "(rows, h) with h the width of the layer");
            if (!bad && grads != NULL) {
                snprintf(name, sizeof name, "block_grads[%zd][%zd]", j, b);
                bad = get(h, PySequence_Fast_GET_ITEM(grads, b), name, F32, OPTIONAL | OUTPUT, &ga)
                    || want_2d(&ga, name, a.shape0, width, "of its block");
            } else {
                ga.data = NULL;
            }
            if (bad) {
                Py_DECREF(blocks);
                Py_XDECREF(grads);
                goto done;
            }
            t->block_rows[t->n_total] = a.shape0;
            t->block_ptr[t->n_total] = F(a);
            t->block_grad[t->n_total] = F(ga);
            t->n_total++;
        }
        Py_DECREF(blocks);
        Py_XDECREF(grads);
    }
    failed = 0;
done:
    Py_XDECREF(covs);
    Py_XDECREF(gcovs);
    if (failed) tables_free(t);
    return failed ? -1 : 0;
}

static int get_codes(held *h, PyObject *obj, Py_ssize_t n, int64_t n_cov, array *codes) {
    if (get(h, obj, "codes", I64, n_cov > 0 ? 0 : OPTIONAL, codes)) return -1;
    if (codes->data == NULL) return 0;
    if (codes->ndim != 2 || codes->shape0 != n || codes->shape1 < n_cov) {
        char got[64], want[64];
        describe(codes, got, sizeof got);
        snprintf(want, sizeof want, "(%zd, >= %lld) (cells x covariates)", n, (long long)n_cov);
        PyErr_Format(PyExc_ValueError, "codes: expected a 2-D array of shape %s, got %s", want, got);
        return -1;
    }
    return 0;
}

static signature layer_fwd_sig = {
    "layer_forward", {"pre", "codes", "blocks", "layer_norm", "ln_eps", "p", "factor", "y", "rstd", "out", NULL},
    10, 0, {0}};

PyDoc_STRVAR(layer_fwd_doc,
"layer_forward(*, pre, codes, blocks, layer_norm, ln_eps, p, factor, y, rstd, out)\n--\n\n"
"y = pre + sum_j T_j[codes[:, j]] (T_j: the concatenated blocks[j]), layer norm without affine\n"
"(layer_norm; rstd per cell), out = relu(y) * factor; factor (None: no dropout) holds uniforms u and is\n"
"overwritten with (u >= p) / (1 - p). pre, y, out, factor: float32 n x h; codes int64 n x (>= n_cov).\n"
"Raises IndexError for a code outside its table.");

static PyObject *py_layer_fwd(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&layer_fwd_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    tables t = {0};
    array pre, codes, factor, y, rstd, out;
    int layer_norm, status = 0, failed = 1;
    double ln_eps, p;
    if (get(&h, o[0], "pre", F32, 0, &pre) || want_2d(&pre, "pre", -1, -1, "(n, h)")) goto done;
    const Py_ssize_t n = pre.shape0, width = pre.shape1;
    if (get_tables(&h, o[2], NULL, width, &t) || get_codes(&h, o[1], n, t.n_cov, &codes)
        || get_bool(o[3], "layer_norm", &layer_norm) || get_float(o[4], "ln_eps", &ln_eps) || get_float(o[5], "p", &p)
        || get(&h, o[6], "factor", F32, OPTIONAL | OUTPUT, &factor) || want_2d(&factor, "factor", n, width, "(n, h) of pre")
        || get(&h, o[7], "y", F32, OUTPUT, &y) || want_2d(&y, "y", n, width, "(n, h) of pre")
        || get(&h, o[8], "rstd", F32, OUTPUT | (layer_norm ? 0 : OPTIONAL), &rstd)
        || want_1d(&rstd, "rstd", n, "n of pre") || get(&h, o[9], "out", F32, OUTPUT, &out)
        || want_2d(&out, "out", n, width, "(n, h) of pre"))
        goto done;
    if (!(p >= 0.0 && p < 1.0)) {
        PyErr_Format(PyExc_ValueError, "p: expected a dropout probability in [0, 1), got %g", p);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    status = atlasmap_layer_forward(n, width, F(pre), t.n_cov, I64P(codes), codes.shape1, t.n_blocks, t.block_ptr,
                                    t.block_rows, layer_norm, (float)ln_eps, (float)p, F(factor), F(y), F(rstd), F(out));
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_SetString(PyExc_IndexError, "codes: a category code lies outside its covariate table");
        goto done;
    }
    failed = 0;
done:
    tables_free(&t);
    return finish(&h, failed);
}

static signature layer_bwd_sig = {
    "layer_backward", {"grad", "y", "rstd", "factor", "layer_norm", "codes", "blocks", "block_grads", NULL},
    8, 0, {0}};

PyDoc_STRVAR(layer_bwd_doc,
"layer_backward(*, grad, y, rstd, factor, layer_norm, codes, blocks, block_grads)\n--\n\n"
"Backward of layer_forward: grad (d loss / d out, n x h) is overwritten with d loss / d pre; each\n"
"block_grads[j][b] that is not None (shape of blocks[j][b]) is overwritten with the sum of d pre over the\n"
"cells whose code lies in that block. Raises IndexError for a code outside its table.");

static PyObject *py_layer_bwd(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&layer_bwd_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    tables t = {0};
    array grad, y, rstd, factor, codes;
    int layer_norm, status = 0, failed = 1;
    if (get(&h, o[0], "grad", F32, OUTPUT, &grad) || want_2d(&grad, "grad", -1, -1, "(n, h)")) goto done;
    const Py_ssize_t n = grad.shape0, width = grad.shape1;
    if (get(&h, o[1], "y", F32, 0, &y) || want_2d(&y, "y", n, width, "(n, h) of grad")
        || get_bool(o[4], "layer_norm", &layer_norm)
        || get(&h, o[2], "rstd", F32, layer_norm ? 0 : OPTIONAL, &rstd) || want_1d(&rstd, "rstd", n, "n of grad")
        || get(&h, o[3], "factor", F32, OPTIONAL, &factor) || want_2d(&factor, "factor", n, width, "(n, h) of grad")
        || get_tables(&h, o[6], o[7], width, &t) || get_codes(&h, o[5], n, t.n_cov, &codes))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    status = atlasmap_layer_backward(n, width, F(grad), F(y), F(rstd), F(factor), layer_norm, t.n_cov, I64P(codes),
                                     codes.shape1, t.n_blocks, t.block_rows, t.block_grad);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_SetString(PyExc_IndexError, "codes: a category code lies outside its covariate table");
        goto done;
    }
    failed = 0;
done:
    tables_free(&t);
    return finish(&h, failed);
}

static signature latent_fwd_sig = {"latent_forward", {"mv", "noise", "var_eps", "z", "var", "kl", NULL}, 6, 0, {0}};

PyDoc_STRVAR(latent_fwd_doc,
"latent_forward(*, mv, noise, var_eps, z, var, kl)\n--\n\n"
"var = exp(v) + var_eps, z = mean + sqrt(var) noise, kl = 0.5 sum (var + mean^2 - 1 - log var), from\n"
"mv = [mean, v] (float32 n x 2l) and noise (n x l); z, var (n x l), kl (n) are written.");

static PyObject *py_latent_fwd(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&latent_fwd_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array mv, noise, z, var, kl;
    double var_eps;
    if (get(&h, o[1], "noise", F32, 0, &noise) || want_2d(&noise, "noise", -1, -1, "(n, l)")) return finish(&h, 1);
    const Py_ssize_t n = noise.shape0, l = noise.shape1;
    if (get(&h, o[0], "mv", F32, 0, &mv) || want_2d(&mv, "mv", n, 2 * l, "(n, 2 l) with (n, l) of noise")
        || get_float(o[2], "var_eps", &var_eps) || get(&h, o[3], "z", F32, OUTPUT, &z)
        || want_2d(&z, "z", n, l, "(n, l) of noise") || get(&h, o[4], "var", F32, OUTPUT, &var)
        || want_2d(&var, "var", n, l, "(n, l) of noise") || get(&h, o[5], "kl", F32, OUTPUT, &kl)
        || want_1d(&kl, "kl", n, "n of noise"))
        return finish(&h, 1);
    Py_BEGIN_ALLOW_THREADS
    atlasmap_latent_forward(n, l, F(mv), F(noise), (float)var_eps, F(z), F(var), F(kl));
    Py_END_ALLOW_THREADS
    return finish(&h, 0);
}

static signature latent_bwd_sig = {
    "latent_backward", {"dz", "mv", "var", "noise", "var_eps", "kl_scale", "dmv", NULL}, 7, 0, {0}};

PyDoc_STRVAR(latent_bwd_doc,
"latent_backward(*, dz, mv, var, noise, var_eps, kl_scale, dmv)\n--\n\n"
"d loss / d mv (into dmv, n x 2l) of latent_forward from d loss / d z (dz, n x l) and the KL weight.");

static PyObject *py_latent_bwd(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    (void)self;
    PyObject *o[MAX_ARGS];
    if (parse(&latent_bwd_sig, args, nargs, kwnames, o) < 0) return NULL;
    held h;
    held_init(&h);
    array dz, mv, var, noise, dmv;
    double var_eps, kl_scale;
    if (get(&h, o[0], "dz", F32, 0, &dz) || want_2d(&dz, "dz", -1, -1, "(n, l)")) return finish(&h, 1);
    const Py_ssize_t n = dz.shape0, l = dz.shape1;
    if (get(&h, o[1], "mv", F32, 0, &mv) || want_2d(&mv, "mv", n, 2 * l, "(n, 2 l) with (n, l) of dz")
        || get(&h, o[2], "var", F32, 0, &var) || want_2d(&var, "var", n, l, "(n, l) of dz")
        || get(&h, o[3], "noise", F32, 0, &noise) || want_2d(&noise, "noise", n, l, "(n, l) of dz")
        || get_float(o[4], "var_eps", &var_eps) || get_float(o[5], "kl_scale", &kl_scale)
        || get(&h, o[6], "dmv", F32, OUTPUT, &dmv) || want_2d(&dmv, "dmv", n, 2 * l, "(n, 2 l) with (n, l) of dz"))
        return finish(&h, 1);
    Py_BEGIN_ALLOW_THREADS
    atlasmap_latent_backward(n, l, F(dz), F(mv), F(var), F(noise), (float)var_eps, (float)kl_scale, F(dmv));
    Py_END_ALLOW_THREADS
    return finish(&h, 0);
}

/* ------------------------------------------------------------------------------------------ module */

#define FAST(name, fn, doc) {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL | METH_KEYWORDS, doc}

static PyMethodDef methods[] = {
    FAST("nb_nll", py_nb_nll, nb_nll_doc),
    FAST("lgamma_theta_sum", py_lgamma, lgamma_doc),
    FAST("lgamma_theta_sum_csr", py_lgamma_csr, lgamma_csr_doc),
    FAST("gather_rows", py_gather, gather_doc),
    FAST("count_flags", py_flags, flags_doc),
    FAST("log_factorial_rows", py_logfact, logfact_doc),
    FAST("uniform", py_uniform, uniform_doc),
    FAST("adam", py_adam, adam_doc),
    FAST("layer_forward", py_layer_fwd, layer_fwd_doc),
    FAST("layer_backward", py_layer_bwd, layer_bwd_doc),
    FAST("latent_forward", py_latent_fwd, latent_fwd_doc),
    FAST("latent_backward", py_latent_bwd, latent_bwd_doc),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native",
    "atlasmap's compiled kernels behind checked entry points (see atlasmap.ops, which is the API to use).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
#ifdef ATLASMAP_INLINE_MATH
    const int inline_math = 1;
#else
    const int inline_math = 0;
#endif
    if (PyModule_AddIntConstant(m, "INLINE_MATH", inline_math) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
