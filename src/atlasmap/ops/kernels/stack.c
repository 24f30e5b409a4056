/*
 * The elementwise parts of scVI's training step, forward and hand-written backward
 * (atlasmap.training.fused_step).
 *
 * Why: a step is a few matmuls (run by PyTorch) between ~300 small PyTorch operations on 128 x 128 tensors
 * (table lookups, layer norm, ReLU, dropout, their autograd nodes) whose dispatch costs more than their
 * arithmetic. Here one call does a whole layer's elementwise forward, one its backward.
 *
 * Layer forward (one row per cell, h values per row):
 *     y = pre + sum_j T_j[code_j]          T_j: the blocks of covariate j's table, concatenated
 *     y = (y - mean(y)) * rstd             layer norm without affine parameters (if asked)
 *     out = relu(y) * factor               factor = (u >= p) / (1 - p) from uniform draws u (dropout)
 * Layer backward, given d out: d y = d out * factor * [y > 0]; d pre = rstd (d y - mean(d y) - y mean(d y y))
 * with layer norm (else d y); every table row read in the forward receives d pre.
 * Both return 0, or -1 when a code lies outside its table (nothing is read or written past a block).
 *
 * Plain C called only by the checked wrapper ../_native.c; compiled into the same extension module as
 * nbkernel.c. The pure-PyTorch references are in atlasmap/ops/reference.py.
 */
#include "kernels.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ATLASMAP_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATLASMAP_CLONES
#endif

/*
 * Covariate tables are given as blocks: covariate j has n_blocks[j] blocks, block b of them with
 * block_rows[b] rows at block_ptr[b] (flattened over covariates in order). A code indexes the blocks'
 * concatenation. Codes are int64, code_stride apart per row (the cells x covariates code matrix).
 */
typedef struct {
    int64_t n_cov, code_stride;
    const int64_t *codes, *n_blocks, *block_rows;
    const float *const *block_ptr;
    float *const *block_grad;  /* backward: d loss / d block, NULL for blocks that do not train */
} tables;

/* Index (into the flattened block arrays) and row of covariate j's code for one cell; -1 for a code outside
 * the table (the callers then return -1 without reading or writing past a block). */
static inline int64_t find_block(const tables *t, int64_t first_block, int64_t j, int64_t code, int64_t *row) {
    int64_t b = first_block;
    const int64_t last = first_block + t->n_blocks[j] - 1;
    if (code < 0) return -1;
    while (b < last && code >= t->block_rows[b]) {
        code -= t->block_rows[b];
        b++;
    }
    if (code >= t->block_rows[b]) return -1;
    *row = code;
    return b;
}

ATLASMAP_CLONES int atlasmap_layer_forward(int64_t n, int64_t h, const float *pre, int64_t n_cov, const int64_t *codes,
                           int64_t code_stride, const int64_t *n_blocks, const float *const *block_ptr,
                           const int64_t *block_rows, int layer_norm, float ln_eps, float p, float *factor,
                           float *y, float *rstd, float *out) {
    const tables t = {n_cov, code_stride, codes, n_blocks, block_rows, block_ptr, NULL};
    const float scale = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    for (int64_t c = 0; c < n; c++) {
        float *yr = y + c * h;
        memcpy(yr, pre + c * h, sizeof(float) * (size_t)h);
        for (int64_t j = 0, first = 0; j < n_cov; first += n_blocks[j], j++) {
            int64_t row;
            const int64_t b = find_block(&t, first, j, codes[c * code_stride + j], &row);
            if (b < 0) return -1;
            const float *tr = block_ptr[b] + row * h;
            for (int64_t k = 0; k < h; k++) yr[k] += tr[k];
        }
        if (layer_norm) {  /* two passes in float, as PyTorch's layer norm (h is a hidden-layer width) */
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int64_t k = 0; k < h; k++) s += yr[k];
            const float mean = s / (float)h;
            float v = 0.0f;
#pragma omp simd reduction(+ : v)
            for (int64_t k = 0; k < h; k++) v += (yr[k] - mean) * (yr[k] - mean);
            const float r = 1.0f / sqrtf(v / (float)h + ln_eps);
            rstd[c] = r;
            for (int64_t k = 0; k < h; k++) yr[k] = (yr[k] - mean) * r;
        }
        float *o = out + c * h;
        if (factor != NULL) {
            float *f = factor + c * h;
            for (int64_t k = 0; k < h; k++) {
                f[k] = f[k] >= p ? scale : 0.0f;  /* the uniform draw becomes the dropout factor */
                o[k] = (yr[k] > 0.0f ? yr[k] : 0.0f) * f[k];
            }
        } else {
            for (int64_t k = 0; k < h; k++) o[k] = yr[k] > 0.0f ? yr[k] : 0.0f;
        }
    }
    return 0;
}

/* g: in d loss / d out, out d loss / d pre (in place). Table gradients are zeroed, then accumulated. */
ATLASMAP_CLONES int atlasmap_layer_backward(int64_t n, int64_t h, float *g, const float *y, const float *rstd,
                            const float *factor, int layer_norm, int64_t n_cov, const int64_t *codes,
                            int64_t code_stride, const int64_t *n_blocks, const int64_t *block_rows,
                            float *const *block_grad) {
    const tables t = {n_cov, code_stride, codes, n_blocks, block_rows, NULL, block_grad};
    int64_t total_blocks = 0;
    for (int64_t j = 0; j < n_cov; j++) total_blocks += n_blocks[j];
    for (int64_t b = 0; b < total_blocks; b++)
        if (block_grad[b] != NULL) memset(block_grad[b], 0, sizeof(float) * (size_t)(block_rows[b] * h));
    for (int64_t c = 0; c < n; c++) {
        float *gr = g + c * h;
        const float *yr = y + c * h;
        for (int64_t k = 0; k < h; k++) {
            const float f = factor != NULL ? factor[c * h + k] : 1.0f;
            gr[k] = yr[k] > 0.0f ? gr[k] * f : 0.0f;
        }
        if (layer_norm) {
            float sg = 0.0f, sgy = 0.0f;
#pragma omp simd reduction(+ : sg, sgy)
            for (int64_t k = 0; k < h; k++) {
                sg += gr[k];
                sgy += gr[k] * yr[k];
            }
            const float mg = sg / (float)h, mgy = sgy / (float)h, r = rstd[c];
            for (int64_t k = 0; k < h; k++) gr[k] = r * (gr[k] - mg - yr[k] * mgy);
        }
        for (int64_t j = 0, first = 0; j < n_cov; first += n_blocks[j], j++) {
            int64_t row;
            const int64_t b = find_block(&t, first, j, codes[c * code_stride + j], &row);
            if (b < 0) return -1;
            if (block_grad[b] == NULL) continue;
            float *dst = block_grad[b] + row * h;
            for (int64_t k = 0; k < h; k++) dst[k] += gr[k];
        }
    }
    return 0;
}

/*
 * The latent sample and its KL term. mv is n x 2l: the mean, then the pre-activation of the log variance.
 *     var = exp(v) + var_eps,  z = mean + sqrt(var) e,  kl = 0.5 sum (var + mean^2 - 1 - log var)
 */
int atlasmap_latent_forward(int64_t n, int64_t l, const float *mv, const float *e, float var_eps, float *z,
                            float *var, float *kl) {
    for (int64_t c = 0; c < n; c++) {
        const float *m = mv + c * 2 * l, *v = m + l;
        double acc = 0.0;
        for (int64_t k = 0; k < l; k++) {
            const float vk = expf(v[k]) + var_eps;
            var[c * l + k] = vk;
            z[c * l + k] = m[k] + sqrtf(vk) * e[c * l + k];
            acc += 0.5 * ((double)vk + (double)m[k] * m[k] - 1.0 - log((double)vk));
        }
        kl[c] = (float)acc;
    }
    return 0;
}

/* d loss / d mv from d loss / d z (already scaled by the loss' 1/n) and the KL weight kl_scale (= weight / n). */
int atlasmap_latent_backward(int64_t n, int64_t l, const float *dz, const float *mv, const float *var,
                             const float *e, float var_eps, float kl_scale, float *dmv) {
    for (int64_t c = 0; c < n; c++) {
        const float *m = mv + c * 2 * l;
        float *dm = dmv + c * 2 * l, *dv = dm + l;
        for (int64_t k = 0; k < l; k++) {
            const int64_t i = c * l + k;
            const float vk = var[i];
            dm[k] = dz[i] + kl_scale * m[k];
            const float d_var = dz[i] * e[i] * 0.5f / sqrtf(vk) + kl_scale * 0.5f * (1.0f - 1.0f / vk);
            dv[k] = d_var * expf(m[l + k]);  /* d var / d v = exp(v) (not var - var_eps: exact for small v) */
        }
    }
    (void)var_eps;
    return 0;
}

/*
 * n uniform floats in [0, 1) (24 random bits each) for dropout masks: a counter-based generator (splitmix64
 * of seed + i, ~1 ns per value, vectorisable) instead of PyTorch's CPU Mersenne twister (~2.5 ns per value,
 * serial). The caller draws seed from PyTorch's generator, so torch.manual_seed still fixes every mask.
 */
ATLASMAP_CLONES int atlasmap_uniform(int64_t n, uint64_t seed, float *out) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        uint64_t z = seed + (uint64_t)i * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        out[i] = (float)(z >> 40) * 0x1.0p-24f;
    }
    return 0;
}

/*
 * Adam with L2 weight decay, the update of torch.optim.Adam (amsgrad off), one pass per tensor:
 *     g += wd p;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
 *     p -= lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps)
 * step_size[t] = lr / bias1 and bias2_sqrt[t] = sqrt(bias2) per tensor (each counts its own steps); tensors
 * whose grads[t] is NULL are skipped. Large tensors are split over n_threads.
 */
ATLASMAP_CLONES static void adam_range(int64_t n, float *restrict p, const float *restrict g, float *restrict m,
                                       float *restrict v, float step_size, float bias2_sqrt, float beta1,
                                       float beta2, float eps, float weight_decay) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        const float gi = g[i] + weight_decay * p[i];
        const float mi = m[i] + (1.0f - beta1) * (gi - m[i]);
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) / bias2_sqrt + eps);
    }
}

int atlasmap_adam(int64_t n_tensors, float *const *params, const float *const *grads, float *const *m,
                  float *const *v, const int64_t *sizes, const float *step_size, const float *bias2_sqrt,
                  float beta1, float beta2, float eps, float weight_decay, int n_threads) {
    const int64_t chunk = 1 << 15;
    for (int64_t t = 0; t < n_tensors; t++) {
        if (grads[t] == NULL) continue;
        const int64_t n = sizes[t], n_chunks = (n + chunk - 1) / chunk;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) if (n_threads > 1 && n_chunks > 1) schedule(static)
#endif
        for (int64_t c = 0; c < n_chunks; c++) {
            const int64_t lo = c * chunk, len = n - lo < chunk ? n - lo : chunk;
            adam_range(len, params[t] + lo, grads[t] + lo, m[t] + lo, v[t] + lo, step_size[t], bias2_sqrt[t],
                       beta1, beta2, eps, weight_decay);
        }
    }
    (void)n_threads;
    return 0;
}
