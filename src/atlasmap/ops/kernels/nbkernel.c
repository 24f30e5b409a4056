/*
 * Fused negative binomial / zero-inflated NB negative log-likelihood for CPU training, with the
 * gradients with respect to the mean, the inverse dispersion and the zero-inflation logits.
 *
 * Why a kernel: in eager PyTorch the NB/ZINB likelihood of a 128 x 2,000 minibatch is ~45 separate
 * passes over cells x genes (log, softplus, sigmoid, where, reciprocal, ...) plus scalar lgamma / digamma
 * calls, about two thirds of a training step (benchmarks/profile_step.py). Here it is one pass per cell row
 * that stays in L1/L2, with the vector math of glibc's libmvec (8 floats per call on AVX2), and the
 * lgamma / digamma differences of integer counts computed as short finite sums:
 *
 *     lgamma(x + t) - lgamma(t)   = log prod_{i<x} (t + i)
 *     digamma(x + t) - digamma(t) = sum_{i<x} 1 / (t + i)
 *
 * which are exact (no cancellation between two large lgamma values) and cheap for the small counts that
 * dominate single-cell data. Other counts use lgamma / digamma in double precision.
 *
 * Conventions (same as atlasmap.ops.reference.nll_terms): with a = log(t + mu + eps) (log(t + eps) -
 * a computed as -log1p(mu / (t + eps)), accurate when t >> mu),
 *   f_nb   = t (log(t + eps) - a) + x (log(mu + eps) - a)                (+ lgamma terms)
 *   f_zinb = x == 0 : softplus(ptl) - softplus(-pi)          ptl = t (log(t + eps) - a) - pi
 *            x >  0 : ptl - softplus(-pi) + x (log(mu + eps) - a)       (+ lgamma terms)
 * and the kernel writes nll = const - sum_g f (per cell) and d nll / d (mu, theta, pi) per element.
 *
 * Plain C (no Python C API), called only by the checked wrapper ../_native.c (the extension module
 * atlasmap.ops._native); no code is generated or loaded at run time.
 */
#include "kernels.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* AVX-512, AVX2/FMA and baseline versions of each loop; the dynamic loader picks one for the CPU. */
#define ATLASMAP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATLASMAP_CLONES
#endif

/*
 * logf and expf must be vectorisable for the row loops to vectorise. On x86-64 glibc with gcc they are
 * glibc's vector math library (libmvec, reached through libm; declared `omp declare simd` below, which
 * gcc honours with -fopenmp-simd, and which -fno-math-errno allows). Elsewhere they are the branch-free
 * inline versions below (Cephes' single-precision polynomials, about 1 ulp; about 1.6x slower than libmvec
 * here). Special values keep their IEEE meaning (log of 0, negatives, inf, NaN, subnormals).
 */
typedef union {
    float f;
    int32_t i;
} float_bits;

static inline float inline_logf(float x) {
    const int subnormal = x < 1.17549435e-38f;  /* FLT_MIN */
    float_bits u = {subnormal ? x * 8388608.0f : x};  /* scale subnormals by 2^23 */
    float e = (float)(((u.i >> 23) & 0xff) - 126) - (subnormal ? 23.0f : 0.0f);
    u.i = (u.i & 0x007fffff) | 0x3f000000;  /* mantissa in [0.5, 1) */
    float m = u.f;
    const int low = m < 0.707106781f;
    e -= low ? 1.0f : 0.0f;
    m = low ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
    float r = m + y + 0.693359375f * e;
    r = x > 0.0f ? r : (x == 0.0f ? -INFINITY : NAN);
    return x == INFINITY ? INFINITY : r;
}

static inline float inline_expf(float x) {
    /* exp(88.7228...) is the largest float; below -87.3365 (FLT_MIN) results are flushed to 0. */
    /* Clamped by arithmetic: a nested select here stops gcc from vectorising; out-of-range and NaN
     * inputs are overwritten at the end anyway. */
    const float lo_mask = x < -87.3365447f ? 1.0f : 0.0f, hi_mask = x > 88.7228391f ? 1.0f : 0.0f;
    const float xc = x + lo_mask * (-87.3365447f - x) + hi_mask * (88.7228391f - x);
    const float t = xc * 1.44269504088896341f;
    const float n = (float)(int32_t)(t + (t >= 0.0f ? 0.5f : -0.5f));  /* round to nearest, in [-126, 128] */
    const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    const float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    const int32_t n1 = n > 127.0f ? 127 : (int32_t)n;  /* 2^128 is not a float: scale twice */
    const float_bits scale = {.i = (n1 + 127) << 23};
    float out = y * scale.f * (n > 127.0f ? 2.0f : 1.0f);
    out = x > 88.7228391f ? INFINITY : out;
    out = x < -87.3365447f ? 0.0f : out;
    return x != x ? x : out;
}

#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__) && !defined(ATLASMAP_INLINE_MATH)
#pragma omp declare simd notinbranch
extern float logf(float);
#pragma omp declare simd notinbranch
extern float expf(float);
#define LOGF logf
#define EXPF expf
#else
#define LOGF inline_logf
#define EXPF inline_expf
#endif

#define EPS 1e-8f
/* Above this inverse dispersion the product of SMALL_COUNT factors could overflow a double. */
#define MAX_THETA_FOR_PRODUCT 1e12
/* count_gammas uses the finite sums for integer counts up to this value, lgamma / digamma above. */
#define SMALL_COUNT 16

static double digamma_d(double x) {
    /* x > 0. Recurrence up to 6, then the asymptotic series (error < 1e-10 there). */
    double shift = 0.0;
    while (x < 6.0) {
        shift -= 1.0 / x;
        x += 1.0;
    }
    const double f = 1.0 / (x * x);
    return shift + log(x) - 0.5 / x
        - f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f * (1.0 / 132)))));
}

/* lgamma(x + t) - lgamma(t) and digamma(x + t) - digamma(t) for a count x > 0. *lgamma_t / *digamma_t cache
 * lgamma(t) / digamma(t) of this gene (NAN until first needed: only large or non-integer counts need them). */
static inline void count_gammas(float x, float t, double *lgamma_t, double *digamma_t, double *lg, double *dg) {
    const int k = (int)x;
    if ((float)k == x && k <= SMALL_COUNT && t < MAX_THETA_FOR_PRODUCT) {
        double prod = 1.0, inv = 0.0;
        for (int i = 0; i < k; i++) {
            const double y = (double)t + i;
            prod *= y;
            inv += 1.0 / y;
        }
        *lg = log(prod);
        *dg = inv;
    } else {
        if (isnan(*lgamma_t)) {
            *lgamma_t = lgamma((double)t);
            *digamma_t = digamma_d((double)t);
        }
        const double y = (double)x + (double)t;
        *lg = lgamma(y) - *lgamma_t;
        *dg = digamma_d(y) - *digamma_t;
    }
}

/* The elementwise part of one row (everything but the lgamma / digamma terms); returns sum_g f. Written
 * once and specialised by the always-inlined flags, so each variant is a branch-free vectorisable loop. */
static inline __attribute__((always_inline)) float row_terms(
    int64_t g, const float *restrict x, const float *restrict mu, const float *restrict t,
    const float *restrict log_t, const float *restrict inv_t, const float *restrict pi,
    float *restrict g_mu, float *restrict g_t, float *restrict g_pi,
    const int zi, const int want_mu, const int want_t, const int want_pi) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < g; j++) {
        const float xv = x[j], m = mu[j], tv = t[j];
        const float tme = tv + m + EPS;
        /* la = log(t + eps) - log(t + mu + eps) = -log1p(mu / (t + eps)), by Goldberg's log1p (exact where
         * mu << t: theta * la stays accurate for the large inverse dispersions of Poisson-like genes) */
        const float v = m * inv_t[j], w = 1.0f + v;
        const float l1p = w == 1.0f ? v : LOGF(w) * (v / (w - 1.0f));
        const float la = -l1p, a = log_t[j] + l1p;
        const float u = tv * la;
        float f = xv * (LOGF(m + EPS) - a);
        float d = 1.0f;
        if (zi) {
            const float p = pi[j];
            const float ptl = u - p;
            const float e_p = EXPF(-fabsf(p));
            const float softplus_neg_p = (p < 0.0f ? -p : 0.0f) + LOGF(1.0f + e_p);
            const float e_t = EXPF(-fabsf(ptl));
            const float softplus_ptl = (ptl > 0.0f ? ptl : 0.0f) + LOGF(1.0f + e_t);
            const int is_zero = xv < EPS;
            f += (is_zero ? softplus_ptl : ptl) - softplus_neg_p;
            if (want_mu || want_t || want_pi) {
                const float sig_ptl = (ptl >= 0.0f ? 1.0f : e_t) / (1.0f + e_t);
                d = is_zero ? sig_ptl : 1.0f;
            }
            if (want_pi) {
                const float sig_neg_p = (p <= 0.0f ? 1.0f : e_p) / (1.0f + e_p);
                g_pi[j] = d - sig_neg_p;
            }
        } else {
            f += u;
        }
        acc += f;
        if (want_mu || want_t) {
            const float r = 1.0f / tme;
            const float tr = tv * r * d;
            if (want_mu) g_mu[j] = tr - xv * (1.0f / (m + EPS) - r);
            if (want_t) g_t[j] = tr + xv * r - d * (la + tv * inv_t[j]);
        }
    }
    return acc;
}

#define ROW_VARIANT(name, ZI, MU, T, PI)                                                                    \
    ATLASMAP_CLONES static float name(int64_t g, const float *restrict x, const float *restrict mu,         \
                                      const float *restrict t, const float *restrict log_t,                  \
                                      const float *restrict inv_t, const float *restrict pi,              \
                                      float *restrict g_mu, float *restrict g_t, float *restrict g_pi) {    \
        return row_terms(g, x, mu, t, log_t, inv_t, pi, g_mu, g_t, g_pi, ZI, MU, T, PI);                 \
    }

ROW_VARIANT(row_nb, 0, 0, 0, 0)
ROW_VARIANT(row_nb_mu, 0, 1, 0, 0)
ROW_VARIANT(row_nb_mu_t, 0, 1, 1, 0)
ROW_VARIANT(row_zinb, 1, 0, 0, 0)
ROW_VARIANT(row_zinb_mu_pi, 1, 1, 0, 1)
ROW_VARIANT(row_zinb_mu_t_pi, 1, 1, 1, 1)

typedef float (*row_fn)(int64_t, const float *, const float *, const float *, const float *, const float *,
                        const float *, float *, float *, float *);

ATLASMAP_CLONES static void theta_tables(int64_t g, const float *restrict t, float *restrict log_t,
                                         float *restrict inv_t) {
    for (int64_t j = 0; j < g; j++) {
        log_t[j] = LOGF(t[j] + EPS);
        inv_t[j] = 1.0f / (t[j] + EPS);
    }
}

/* Integer counts up to this value take the vectorised product formula in row_gammas (two partial
 * products of 4 factors, so inverse dispersions up to MAX_THETA_FOR_VECTOR cannot overflow a float). */
#define VECTOR_COUNT 8
#define MAX_THETA_FOR_VECTOR 1e8f

/* sum_k lgamma(xs[k] + t[cols[k]]) - lgamma(t[cols[k]]) over m nonzero counts xs of one row, and, when g_t
 * is given, g_t[cols[k]] -= digamma(xs[k] + t) - digamma(t). Integer counts 1..VECTOR_COUNT take a vectorised
 * finite product / sum of reciprocals, others count_gammas (lgamma_t / digamma_t cache per column). */
ATLASMAP_CLONES static double nonzero_gammas(int64_t m, const int32_t *restrict cols, const float *restrict xs,
                                             const float *restrict t, double *restrict lgamma_t,
                                             double *restrict digamma_t, float *restrict lg, float *restrict dg,
                                             float *restrict g_t) {
    float small_sum = 0.0f;
#pragma omp simd reduction(+ : small_sum)
    for (int64_t k = 0; k < m; k++) {
        const float xv = xs[k], tv = t[cols[k]];
        const int small = (xv <= (float)VECTOR_COUNT) & ((float)(int)xv == xv) & (tv < MAX_THETA_FOR_VECTOR);
        /* factor i is t + i while i < x, else 1 (its reciprocal then 0) */
        const float f1 = xv > 1.0f ? tv + 1.0f : 1.0f, f2 = xv > 2.0f ? tv + 2.0f : 1.0f;
        const float f3 = xv > 3.0f ? tv + 3.0f : 1.0f, f4 = xv > 4.0f ? tv + 4.0f : 1.0f;
        const float f5 = xv > 5.0f ? tv + 5.0f : 1.0f, f6 = xv > 6.0f ? tv + 6.0f : 1.0f;
        const float f7 = xv > 7.0f ? tv + 7.0f : 1.0f;
        const float l = LOGF(tv * f1 * f2 * f3) + LOGF(f4 * f5 * f6 * f7);  /* unconditional: vectorises */
        const float d = 1.0f / tv + (xv > 1.0f ? 1.0f / f1 : 0.0f) + (xv > 2.0f ? 1.0f / f2 : 0.0f)
            + (xv > 3.0f ? 1.0f / f3 : 0.0f) + (xv > 4.0f ? 1.0f / f4 : 0.0f) + (xv > 5.0f ? 1.0f / f5 : 0.0f)
            + (xv > 6.0f ? 1.0f / f6 : 0.0f) + (xv > 7.0f ? 1.0f / f7 : 0.0f);
        lg[k] = small ? 0.0f : 1.0f;  /* marks the entries left to count_gammas */
        dg[k] = small ? d : 0.0f;
        small_sum += small ? l : 0.0f;
    }
    double total = small_sum;
    for (int64_t k = 0; k < m; k++) {
        const int32_t j = cols[k];
        if (lg[k] != 0.0f) {
            double l, d;
            count_gammas(xs[k], t[j], lgamma_t + j, digamma_t + j, &l, &d);
            total += l;
            dg[k] = (float)d;
        }
        if (g_t != NULL) g_t[j] -= dg[k];
    }
    return total;
}

/* nonzero_gammas of a dense row of g counts: its positive entries are first compacted (branch-free) into
 * nz (columns) and xs (values). */
ATLASMAP_CLONES static double row_gammas(int64_t g, const float *restrict x, const float *restrict t,
                                         double *restrict lgamma_t, double *restrict digamma_t,
                                         int32_t *restrict nz, float *restrict xs, float *restrict lg,
                                         float *restrict dg, float *restrict g_t) {
    int64_t m = 0;
    for (int64_t j = 0; j < g; j++) {
        nz[m] = (int32_t)j;
        xs[m] = x[j];
        m += x[j] > 0.0f;
    }
    return nonzero_gammas(m, nz, xs, t, lgamma_t, digamma_t, lg, dg, g_t);
}

/* softmax of one row of logits, kept as its parts: e_j = exp(s_j - max s), returns sum_j e_j. */
ATLASMAP_CLONES static float softmax_parts(int64_t g, const float *restrict s, float *restrict e) {
    float top = s[0];
    for (int64_t j = 1; j < g; j++) top = s[j] > top ? s[j] : top;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < g; j++) {
        e[j] = EXPF(s[j] - top);
        total += e[j];
    }
    return total;
}

/* mu_j = scale * e_j */
ATLASMAP_CLONES static void scale_row(int64_t g, const float *restrict e, float scale, float *restrict mu) {
    for (int64_t j = 0; j < g; j++) mu[j] = e[j] * scale;
}

/* d NLL / d s_j = mu_j gm_j - p_j sum_k mu_k gm_k (p = softmax(s) = e / e_sum); returns sum_k mu_k gm_k,
 * which is d NLL / d log_library. */
ATLASMAP_CLONES static float logits_gradient(int64_t g, const float *restrict mu, const float *restrict gm,
                                             const float *restrict e, float e_sum, float *restrict g_s) {
    float q = 0.0f;
#pragma omp simd reduction(+ : q)
    for (int64_t j = 0; j < g; j++) q += mu[j] * gm[j];
    const float qp = q / e_sum;
    for (int64_t j = 0; j < g; j++) g_s[j] = mu[j] * gm[j] - e[j] * qp;
    return q;
}

/*
 * Rows [row_begin, row_end) of an n x g minibatch (all arrays C-contiguous float32); see atlasmap_nb_nll.
 *
 * theta has g entries per row and row stride theta_stride (0: one value per gene shared by all rows, g:
 * per cell and gene). pi, g_mu, g_theta, g_pi may be NULL (not zero-inflated / gradient not wanted).
 * const_term (per cell, may be NULL) is added to the NLL (sum_g lgamma(x + 1)). lgamma_cell (per cell,
 * may be NULL) is sum_g lgamma(x + t) - lgamma(t) computed earlier (constant while theta is frozen); when
 * given the kernel does not recompute it (and g_theta must be NULL).
 *
 * Returns 0, or -1 when scratch memory could not be allocated.
 */
static int nb_nll_rows(int64_t row_begin, int64_t row_end, int64_t g, int64_t ld, const float *x, const float *mu,
                       const float *logits, const float *log_lib, const float *theta, int64_t theta_stride,
                       const float *pi, const float *const_term, const float *lgamma_cell, float *nll,
                       float *g_mu, float *g_logits, float *g_log_lib, float *g_theta, float *g_pi) {
    const int zi = pi != NULL, from_logits = logits != NULL;
    const int want_logits = from_logits && (g_logits != NULL || g_log_lib != NULL);
    const int want_mu = g_mu != NULL || want_logits, want_t = g_theta != NULL, want_pi = zi && g_pi != NULL;
    const int any_grad = want_mu || want_t || want_pi;
    /* Specialised loops for the combinations training uses; any other one computes every gradient and
     * sends the unwanted ones to scratch rows. */
    row_fn row = zi ? row_zinb : row_nb;
    if (any_grad) row = zi ? (want_t ? row_zinb_mu_t_pi : row_zinb_mu_pi) : (want_t ? row_nb_mu_t : row_nb_mu);

    double *lgamma_t = malloc(sizeof(double) * 2 * (size_t)g);
    float *buf = malloc(sizeof(float) * 12 * (size_t)g);
    if (buf == NULL || lgamma_t == NULL) {
        free(buf);
        free(lgamma_t);
        return -1;
    }
    double *digamma_t = lgamma_t + g;
    float *log_t = buf, *inv_t = buf + g;
    float *s_mu = buf + 2 * g, *s_t = buf + 3 * g, *s_pi = buf + 4 * g;  /* gradients nobody asked for */
    float *lg_work = buf + 5 * g, *dg_work = buf + 6 * g;
    int32_t *nz = (int32_t *)(buf + 7 * g);
    float *mu_row = buf + 8 * g, *e_row = buf + 9 * g, *g_s_row = buf + 10 * g;  /* from logits */
    float *xs_work = buf + 11 * g;
    const int need_gammas = lgamma_cell == NULL || want_t;

    for (int64_t c = row_begin; c < row_end; c++) {
        const float *xr = x + c * g, *tr = theta + c * theta_stride;
        const float *mr = mu + c * g;
        float e_sum = 1.0f;
        if (from_logits) {  /* mu = exp(log_lib) * softmax(logits), never stored */
            e_sum = softmax_parts(g, logits + c * ld, e_row);
            scale_row(g, e_row, EXPF(log_lib[c]) / e_sum, mu_row);
            mr = mu_row;
        }
        if (c == row_begin || theta_stride != 0) {
            theta_tables(g, tr, log_t, inv_t);
            if (need_gammas)
                for (int64_t j = 0; j < g; j++) lgamma_t[j] = NAN;  /* filled lazily, on nonzero counts */
        }
        float *gm = g_mu != NULL ? g_mu + c * g : s_mu;
        float *gt = want_t ? g_theta + c * g : s_t;
        float *gp = want_pi ? g_pi + c * ld : s_pi;
        double total = row(g, xr, mr, tr, log_t, inv_t, zi ? pi + c * ld : NULL, gm, gt, gp);
        if (need_gammas) {
            const double lg_sum = row_gammas(g, xr, tr, lgamma_t, digamma_t, nz, xs_work, lg_work, dg_work,
                                             want_t ? gt : NULL);
            if (lgamma_cell == NULL) total += lg_sum;
        }
        if (lgamma_cell != NULL) total += lgamma_cell[c];
        nll[c] = (float)((const_term != NULL ? (double)const_term[c] : 0.0) - total);
        if (want_logits) {
            const float q = logits_gradient(g, mr, gm, e_row, e_sum, g_logits != NULL ? g_logits + c * ld : g_s_row);
            if (g_log_lib != NULL) g_log_lib[c] = q;
        }
    }
    free(buf);
    free(lgamma_t);
    return 0;
}

/* sum_g lgamma(x + t) - lgamma(t) of rows [row_begin, row_end) (the NB term that does not involve mu). */
static int lgamma_theta_rows(int64_t row_begin, int64_t row_end, int64_t g, const float *x,
                             const float *theta, int64_t theta_stride, float *out) {
    double *tab = malloc(sizeof(double) * 2 * (size_t)g);
    float *work = malloc(sizeof(float) * 4 * (size_t)g);
    if (tab == NULL || work == NULL) {
        free(tab);
        free(work);
        return -1;
    }
    for (int64_t c = row_begin; c < row_end; c++) {
        const float *tr = theta + c * theta_stride;
        if (c == row_begin || theta_stride != 0)
            for (int64_t j = 0; j < g; j++) tab[j] = NAN;
        out[c] = (float)row_gammas(g, x + c * g, tr, tab, tab + g, (int32_t *)(work + 2 * g), work + 3 * g, work,
                                   work + g, NULL);
    }
    free(tab);
    free(work);
    return 0;
}

/*
 * Entry points. The n rows are split into n_threads contiguous ranges (each row is computed the same way
 * whatever the split, so results do not depend on the thread count). Built with -fopenmp, the library
 * needs libgomp.so.1, which is the copy PyTorch has already loaded: the ranges run on PyTorch's own
 * OpenMP threads (no second thread pool competing for the cores).
 *
 * atlasmap_nb_nll: per-cell NLL of an n x g minibatch and the gradients asked for. The mean is either
 * mu (n x g) or, when logits is given (mu NULL), exp(log_lib) * softmax(logits) per row (scVI's decoder
 * output), with gradients g_logits (n x g) and g_log_lib (n) instead of g_mu:
 * theta has g entries per row and row stride theta_stride (0: one value per gene shared by all rows, g:
 * per cell and gene). pi, g_mu, g_theta, g_pi may be NULL (not zero-inflated / gradient not wanted).
 * const_term (per cell, may be NULL) is added to the NLL (sum_g lgamma(x + 1)). lgamma_cell (per cell,
 * may be NULL) is sum_g lgamma(x + t) - lgamma(t) computed earlier (constant while theta is frozen); when
 * given the kernel does not recompute it (and g_theta must be NULL). logits, pi, g_logits and g_pi have row
 * stride ld >= g (ld > g: they are column ranges of a wider matrix, e.g. both decoder heads' output); the
 * other matrices are contiguous n x g.
 *
 * Both return 0, or -1 when scratch memory could not be allocated.
 */
/* fn over the rows [0, n) cut into n_threads contiguous ranges, one per thread; the worst status. */
typedef int (*range_fn)(int64_t row_begin, int64_t row_end, const void *args);

static int over_row_ranges(int64_t n, int n_threads, range_fn fn, const void *args) {
    const int parts = n_threads > 1 ? n_threads : 1;
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) if (parts > 1) schedule(static, 1) reduction(min : status)
#endif
    for (int p = 0; p < parts; p++) {
        const int s = fn(n * p / parts, n * (p + 1) / parts, args);
        status = s < status ? s : status;
    }
    return status;
}

typedef struct {
    int64_t g, ld, theta_stride;
    const float *x, *mu, *logits, *log_lib, *theta, *pi, *const_term, *lgamma_cell;
    float *nll, *g_mu, *g_logits, *g_log_lib, *g_theta, *g_pi;
} nll_args;

static int nll_range(int64_t begin, int64_t end, const void *args) {
    const nll_args *a = args;
    return nb_nll_rows(begin, end, a->g, a->ld, a->x, a->mu, a->logits, a->log_lib, a->theta, a->theta_stride, a->pi,
                       a->const_term, a->lgamma_cell, a->nll, a->g_mu, a->g_logits, a->g_log_lib, a->g_theta,
                       a->g_pi);
}

int atlasmap_nb_nll(int64_t n, int64_t g, int64_t ld, const float *x, const float *mu, const float *logits,
                    const float *log_lib, const float *theta, int64_t theta_stride, const float *pi,
                    const float *const_term, const float *lgamma_cell, float *nll, float *g_mu, float *g_logits,
                    float *g_log_lib, float *g_theta, float *g_pi, int n_threads) {
    const nll_args args = {g, ld, theta_stride, x, mu, logits, log_lib, theta, pi, const_term, lgamma_cell,
                           nll, g_mu, g_logits, g_log_lib, g_theta, g_pi};
    return over_row_ranges(n, n_threads, nll_range, &args);
}

/* lgamma_theta_rows of rows [row_begin, row_end) of a CSR matrix (int64 indptr, int32 indices, float32 data)
 * with one inverse dispersion per column (theta, g values). */
static int lgamma_theta_csr_rows(int64_t row_begin, int64_t row_end, int64_t g, const int64_t *indptr,
                                 const int32_t *indices, const float *data, const float *theta, float *out) {
    int64_t longest = 0;
    for (int64_t c = row_begin; c < row_end; c++)
        longest = indptr[c + 1] - indptr[c] > longest ? indptr[c + 1] - indptr[c] : longest;
    double *tab = malloc(sizeof(double) * 2 * (size_t)g);
    float *work = malloc(sizeof(float) * 4 * (size_t)(longest + 1));
    if (tab == NULL || work == NULL) {
        free(tab);
        free(work);
        return -1;
    }
    for (int64_t j = 0; j < g; j++) tab[j] = NAN;
    int32_t *cols = (int32_t *)(work + 2 * (longest + 1));
    float *xs = work + 3 * (longest + 1);
    for (int64_t c = row_begin; c < row_end; c++) {
        int64_t m = 0;
        for (int64_t k = indptr[c]; k < indptr[c + 1]; k++) {  /* explicit zeros are skipped */
            cols[m] = indices[k];
            xs[m] = data[k];
            m += data[k] > 0.0f;
        }
        out[c] = (float)nonzero_gammas(m, cols, xs, theta, tab, tab + g, work, work + longest + 1, NULL);
    }
    free(tab);
    free(work);
    return 0;
}

typedef struct {
    int64_t g, theta_stride;
    const float *x, *theta;
    float *out;
    const int64_t *indptr;  /* CSR input when not NULL (x is then its data) */
    const int32_t *indices;
} lgamma_args;

static int lgamma_range(int64_t begin, int64_t end, const void *args) {
    const lgamma_args *a = args;
    if (a->indptr != NULL) return lgamma_theta_csr_rows(begin, end, a->g, a->indptr, a->indices, a->x, a->theta, a->out);
    return lgamma_theta_rows(begin, end, a->g, a->x, a->theta, a->theta_stride, a->out);
}

/* Per-cell sum_g lgamma(x + t) - lgamma(t) of an n x g matrix (theta as in atlasmap_nb_nll). */
int atlasmap_lgamma_theta_sum(int64_t n, int64_t g, const float *x, const float *theta, int64_t theta_stride,
                              float *out, int n_threads) {
    const lgamma_args args = {g, theta_stride, x, theta, out, NULL, NULL};
    return over_row_ranges(n, n_threads, lgamma_range, &args);
}

/* The same of the n rows of a CSR matrix of g columns (int64 indptr, int32 indices, float32 data), theta per
 * column. */
int atlasmap_lgamma_theta_sum_csr(int64_t n, int64_t g, const int64_t *indptr, const int32_t *indices,
                                  const float *data, const float *theta, float *out, int n_threads) {
    const lgamma_args args = {g, 0, data, theta, out, indptr, indices};
    return over_row_ranges(n, n_threads, lgamma_range, &args);
}

/*
 * Dense float32 block (n_rows x g) of the given rows of a CSR matrix (indptr int64, indices int32,
 * data float32): the minibatch gather of the data loader, one pass over the selected nonzeros. Rows are
 * split over n_threads as above. Never fails; returns 0.
 */
int atlasmap_gather_rows(int64_t n_rows, const int64_t *rows, const int64_t *indptr, const int32_t *indices,
                         const float *data, int64_t g, float *out, int n_threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) if (n_threads > 1) schedule(static)
#else
    (void)n_threads;
#endif
    for (int64_t i = 0; i < n_rows; i++) {
        float *dst = out + i * g;
        memset(dst, 0, sizeof(float) * (size_t)g);
        const int64_t r = rows[i];
        for (int64_t k = indptr[r]; k < indptr[r + 1]; k++) dst[indices[k]] = data[k];
    }
    return 0;
}

/*
 * Raw-count checks of n float32 values in one pass (the data loader's validation): returns a bit mask,
 * 1 = NaN or infinite, 2 = negative, 4 = not an integer, 8 = above 2^24; 0 when all are counts. The caller
 * redoes the failing check in numpy to name an offending entry.
 */
ATLASMAP_CLONES static int count_flags(int64_t n, const float *restrict v) {
    int nonfinite = 0, negative = 0, fraction = 0, large = 0;
#pragma omp simd reduction(| : nonfinite, negative, fraction, large)
    for (int64_t i = 0; i < n; i++) {
        const float x = v[i];
        nonfinite |= !(x - x == 0.0f);          /* NaN and +-inf give NaN */
        negative |= x < 0.0f;
        fraction |= (x < 16777216.0f) & (x != (float)(int32_t)x);  /* truncation of a float below 2^24 */
        large |= x > 16777216.0f;
    }
    return nonfinite | (negative << 1) | (fraction << 2) | (large << 3);
}

int atlasmap_check_counts(int64_t n, const float *values, int n_threads) {
    int flags = 0;
    const int64_t chunk = 1 << 16;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) if (n_threads > 1 && n > chunk) schedule(static) reduction(| : flags)
#else
    (void)n_threads;
#endif
    for (int64_t lo = 0; lo < n; lo += chunk) flags |= count_flags(n - lo < chunk ? n - lo : chunk, values + lo);
    return flags;
}

/* sum_g lgamma(x + 1) of each row of a CSR matrix of counts (float32 data, int64 indptr): integer values
 * below 1024 from a table, others with lgamma in double. */
int atlasmap_log_factorial_rows(int64_t n_rows, const int64_t *indptr, const float *data, float *out,
                                int n_threads) {
    double table[1024];
    for (int k = 0; k < 1024; k++) table[k] = lgamma((double)k + 1.0);
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) if (n_threads > 1) schedule(static)
#else
    (void)n_threads;
#endif
    for (int64_t r = 0; r < n_rows; r++) {
        double total = 0.0;
        for (int64_t k = indptr[r]; k < indptr[r + 1]; k++) {
            const float x = data[k];
            const int small = x >= 0.0f && x < 1024.0f && (float)(int)x == x;
            total += small ? table[(int)x] : lgamma((double)x + 1.0);
        }
        out[r] = (float)total;
    }
    return 0;
}
