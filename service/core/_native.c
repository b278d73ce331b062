/* Fused float32 loops for the hottest passes of a step: optserve.core's native kernels.
 *
 * Each function computes exactly what its numpy counterpart in service/core computes, one
 * IEEE float32 operation at a time in the same order, so the results are the same bits
 * (tests/core/test_native.py compares the two). What changes is that the operations of a
 * step run in one loop over the data instead of one numpy pass per operation.
 *
 * Bits stay the same because:
 * - every operation here (+, -, *, /, sqrtf) is correctly rounded in float32;
 * - -ffp-contract=off (setup.py) keeps the compiler from fusing a multiply and an add
 *   into one FMA, which would round once instead of twice;
 * - vectorized loops only run independent elements side by side: no sum is reordered
 *   (square_lanes adds each lane's terms in row order, as numpy's one add per row does).
 * The AVX2 clone and the baseline one therefore agree with each other and with numpy on
 * every machine.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#define LANES 32768 /* service.core.reductions.LANES */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* lanes[j] = sum over rows r, in order, of x[r * LANES + j]^2, each value first taken to
 * the lanes' type: the first row assigns, a last row shorter than LANES adds to the first
 * lanes only. float32 into float32 lanes is a metric's sum (reductions.
 * metric_sum_of_squares); into float64 lanes, where a float32 square is exact, it is
 * reductions.sum_of_squares (the norm clipping reads). */
#define SQUARE_LANES(name, in_type, lane_type)                                              \
    CLONES static void name(const in_type *x, Py_ssize_t n, lane_type *lanes)              \
    {                                                                                        \
        Py_ssize_t width = n < LANES ? n : LANES;                                            \
        for (Py_ssize_t j = 0; j < width; j++) {                                             \
            lane_type v = (lane_type)x[j];                                                   \
            lane_type t = v * v;                                                             \
            lanes[j] = t;                                                                    \
        }                                                                                    \
        for (Py_ssize_t lo = LANES; lo < n; lo += LANES) {                                   \
            const in_type *row = x + lo;                                                     \
            Py_ssize_t count = n - lo < LANES ? n - lo : LANES;                              \
            for (Py_ssize_t j = 0; j < count; j++) {                                         \
                lane_type v = (lane_type)row[j];                                             \
                lane_type t = v * v;                                                         \
                lanes[j] = lanes[j] + t;                                                     \
            }                                                                                \
        }                                                                                    \
    }

SQUARE_LANES(square_lanes_f32, float, float)
SQUARE_LANES(wide_square_lanes_f32, float, double)
SQUARE_LANES(wide_square_lanes_f64, double, double)

enum decay_mode { NO_DECAY = 0, COUPLED = 1, DECOUPLED = 2 };

struct adam_constants {
    float weight, complement; /* lerp's weight (1 - beta1) and 1 - weight */
    int small;                /* |weight| < 0.5: torch's first lerp formula */
    int maximize;
    float w2, beta2, eps, neg_step, wd, decay_factor;
    int mode;
};

/* service.core.optimizers.adam's kernel (without amsgrad) on n elements: signed_grad,
 * Lerp.apply_, decay_add_square_, the denominator and the delta, then the decoupled decay,
 * each operation as the numpy kernel makes it. Always inlined with constant flags, so that
 * each variant is a loop without branches, which the compiler vectorizes. */
static inline __attribute__((always_inline)) void
adam_variant(const float *g, const float *p, float *m, float *v, float *d, Py_ssize_t n,
             const struct adam_constants *k, const int mode, const int small,
             const int maximize)
{
    const float w = k->weight, c = k->complement, w2 = k->w2, b2 = k->beta2;
    const float eps = k->eps, neg = k->neg_step, wd = k->wd, factor = k->decay_factor;
    /* Without coupled decay the sign is folded into the formulas, as Lerp.apply_ does. */
    const int negative = mode != COUPLED && maximize;
    for (Py_ssize_t i = 0; i < n; i++) {
        float gi = g[i];
        if (mode == COUPLED) {
            float b = p[i] * wd;
            gi = maximize ? b - gi : b + gi;
        }
        float mi = m[i], t;
        if (small) {
            if (negative) {
                t = gi + mi;
                t = t * w;
                mi = mi - t;
            } else {
                t = gi - mi;
                t = t * w;
                mi = mi + t;
            }
        } else if (negative) {
            t = gi + mi;
            t = t * c;
            mi = t - gi;
        } else {
            t = gi - mi;
            t = t * c;
            mi = gi - t;
        }
        m[i] = mi;
        float u = gi * w2;
        u = u * gi;
        float vi = v[i] * b2;
        vi = vi + u;
        v[i] = vi;
        float s = sqrtf(vi);
        s = s + eps;
        float di = mi * neg;
        di = di / s;
        if (mode == DECOUPLED) {
            float q = p[i] * factor;
            q = q - p[i];
            di = di + q;
        }
        d[i] = di;
    }
}

#define ADAM_VARIANTS(mode)                                                                  \
    if (k->small) {                                                                          \
        if (k->maximize) adam_variant(g, p, m, v, d, n, k, mode, 1, 1);                      \
        else adam_variant(g, p, m, v, d, n, k, mode, 1, 0);                                  \
    } else {                                                                                 \
        if (k->maximize) adam_variant(g, p, m, v, d, n, k, mode, 0, 1);                      \
        else adam_variant(g, p, m, v, d, n, k, mode, 0, 0);                                  \
    }

CLONES static void
adam(const float *g, const float *p, float *m, float *v, float *d, Py_ssize_t n,
     const struct adam_constants *k)
{
    switch (k->mode) {
    case COUPLED:
        ADAM_VARIANTS(COUPLED)
        break;
    case DECOUPLED:
        ADAM_VARIANTS(DECOUPLED)
        break;
    default:
        ADAM_VARIANTS(NO_DECAY)
    }
}

/* A C-contiguous buffer of one of ``formats`` (struct codes, "f" or "d"); else the error
 * ``message`` (with ``what``), and nothing is held. */
static int
typed_buffer(PyObject *obj, Py_buffer *view, int writable, const char *formats,
             const char *message, const char *what)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return -1;
    }
    const char *format = view->format;
    int known = format != NULL && strlen(format) == 1 && strchr(formats, format[0]) != NULL &&
                view->itemsize == (format[0] == 'f' ? 4 : 8);
    if (!known) {
        PyErr_Format(PyExc_TypeError, message, what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int
float_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what)
{
    return typed_buffer(obj, view, writable, "f", "%s must be float32", what);
}

/* square_lanes (float32 lanes of float32 values) and, ``wide``, wide_square_lanes (float64
 * lanes of float32 or float64 values). */
static PyObject *
lanes_of_squares(PyObject *args, int wide)
{
    PyObject *x_obj, *lanes_obj;
    if (!PyArg_ParseTuple(args, "OO", &x_obj, &lanes_obj)) {
        return NULL;
    }
    Py_buffer x, lanes;
    if (typed_buffer(x_obj, &x, 0, wide ? "fd" : "f",
                     wide ? "%s must be float32 or float64" : "%s must be float32", "x") < 0) {
        return NULL;
    }
    if (typed_buffer(lanes_obj, &lanes, 1, wide ? "d" : "f",
                     wide ? "%s must be float64" : "%s must be float32", "lanes") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    Py_ssize_t n = x.len / x.itemsize;
    Py_ssize_t width = n < LANES ? n : LANES;
    if (lanes.len / lanes.itemsize < width) {
        PyErr_SetString(PyExc_ValueError, "lanes is shorter than min(len(x), LANES)");
    } else {
        Py_BEGIN_ALLOW_THREADS
        if (!wide) {
            square_lanes_f32((const float *)x.buf, n, (float *)lanes.buf);
        } else if (x.itemsize == 4) {
            wide_square_lanes_f32((const float *)x.buf, n, (double *)lanes.buf);
        } else {
            wide_square_lanes_f64((const double *)x.buf, n, (double *)lanes.buf);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&lanes);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
py_square_lanes(PyObject *self, PyObject *args)
{
    (void)self;
    return lanes_of_squares(args, 0);
}

static PyObject *
py_wide_square_lanes(PyObject *self, PyObject *args)
{
    (void)self;
    return lanes_of_squares(args, 1);
}

static PyObject *
py_adam(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *objs[5]; /* g, p (or None), m, v, d */
    struct adam_constants k;
    if (!PyArg_ParseTuple(args, "OOOOOffppffffffi", &objs[0], &objs[1], &objs[2], &objs[3],
                          &objs[4], &k.weight, &k.complement, &k.small, &k.maximize, &k.w2,
                          &k.beta2, &k.eps, &k.neg_step, &k.wd, &k.decay_factor, &k.mode)) {
        return NULL;
    }
    if (k.mode < NO_DECAY || k.mode > DECOUPLED || (k.mode != NO_DECAY && objs[1] == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "weight decay needs p; mode is 0, 1 or 2");
        return NULL;
    }
    static const char *names[5] = {"g", "p", "m", "v", "d"};
    Py_buffer views[5];
    int got = 0, ok = 1;
    for (; got < 5; got++) {
        if (got == 1 && objs[1] == Py_None) {
            views[1].buf = NULL;
            views[1].len = -1;
            views[1].obj = NULL;
            continue;
        }
        if (float_buffer(objs[got], &views[got], got >= 2, names[got]) < 0) {
            ok = 0;
            break;
        }
    }
    Py_ssize_t n = ok ? views[0].len / 4 : 0;
    for (int i = 0; ok && i < 5; i++) {
        if (views[i].buf != NULL && views[i].len != views[0].len) {
            PyErr_SetString(PyExc_ValueError, "g, p, m, v and d must have the same length");
            ok = 0;
        }
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        adam((const float *)views[0].buf, (const float *)views[1].buf, (float *)views[2].buf,
             (float *)views[3].buf, (float *)views[4].buf, n, &k);
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < got; i++) {
        if (views[i].obj != NULL) {
            PyBuffer_Release(&views[i]);
        }
    }
    if (!ok) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Adds hi[i] into lo[i]: the two halves of one level, which never overlap. */
CLONES static void
add_halves(double *restrict lo, const double *restrict hi, Py_ssize_t half)
{
    for (Py_ssize_t i = 0; i < half; i++) {
        lo[i] = lo[i] + hi[i];
    }
}

CLONES static void
widen(const float *restrict narrow, double *restrict v, Py_ssize_t width)
{
    for (Py_ssize_t j = 0; j < width; j++) {
        v[j] = (double)narrow[j];
    }
}

/* reductions._halve over lanes[:width] taken to float64 (into scratch): while more than
 * one value is left, the first half of them plus the next half, the odd last one carried.
 * The same double additions in the same order as numpy's one add per level, so the same
 * bits; a loop instead of fifteen ufunc calls, which cost most of a small tensor's norm. */
static double
halve_into(const void *lanes, int wide, double *v, Py_ssize_t width)
{
    if (wide) {
        if (v != (const double *)lanes) {
            memcpy(v, lanes, (size_t)width * sizeof(double));
        }
    } else {
        widen((const float *)lanes, v, width);
    }
    Py_ssize_t n = width;
    while (n > 1) {
        Py_ssize_t half = n / 2;
        add_halves(v, v + half, half);
        if (n % 2) {
            v[half] = v[n - 1];
            n = half + 1;
        } else {
            n = half;
        }
    }
    return n ? v[0] : 0.0;
}

static PyObject *
py_halve(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *lanes_obj, *scratch_obj;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "OOn", &lanes_obj, &scratch_obj, &width)) {
        return NULL;
    }
    Py_buffer lanes, scratch;
    if (typed_buffer(lanes_obj, &lanes, 0, "fd", "%s must be float32 or float64", "lanes") < 0) {
        return NULL;
    }
    if (typed_buffer(scratch_obj, &scratch, 1, "d", "%s must be float64", "scratch") < 0) {
        PyBuffer_Release(&lanes);
        return NULL;
    }
    double result = 0.0;
    if (width < 0 || lanes.len / lanes.itemsize < width || scratch.len / scratch.itemsize < width) {
        PyErr_SetString(PyExc_ValueError, "lanes and scratch need width elements");
    } else {
        result = halve_into(lanes.buf, lanes.itemsize == 8, (double *)scratch.buf, width);
    }
    PyBuffer_Release(&lanes);
    PyBuffer_Release(&scratch);
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyFloat_FromDouble(result);
}

static PyMethodDef methods[] = {
    {"halve", py_halve, METH_VARARGS,
     "halve(lanes, scratch, width): the float64 sum of lanes[:width] by halving, as "
     "reductions._halve does, in scratch (service.core.native)."},
    {"square_lanes", py_square_lanes, METH_VARARGS,
     "square_lanes(x, lanes): the float32 lanes of x's squares (service.core.native)."},
    {"wide_square_lanes", py_wide_square_lanes, METH_VARARGS,
     "wide_square_lanes(x, lanes): the float64 lanes of x's squares, x float32 or float64 "
     "(service.core.native)."},
    {"adam", py_adam, METH_VARARGS,
     "adam(g, p, m, v, d, weight, complement, small, maximize, w2, beta2, eps, neg_step, "
     "wd, decay_factor, mode): Adam's float32 kernel (service.core.native)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Fused float32 loops (service.core.native).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModule_Create(&module);
}
