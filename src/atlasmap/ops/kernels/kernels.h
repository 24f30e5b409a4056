/*
 * The compiled kernels of atlasmap.ops (nbkernel.c: likelihood, CSR gather, count checks; stack.c: the
 * training step's layers, latent sample, dropout uniforms, Adam). Plain C on raw arrays: their only
 * caller is the CPython wrapper ../_native.c, which checks every argument (dtype, shape, contiguity,
 * writability, index ranges) before it calls them. See the C files for what each computes.
 *
 * All return 0, or -1: out of scratch memory (nb_nll, lgamma_theta_sum*), a category code outside its
 * table (layer_forward / layer_backward).
 */
#ifndef ATLASMAP_KERNELS_H
#define ATLASMAP_KERNELS_H

#include <stdint.h>

#if defined(__GNUC__)
#define ATLASMAP_KERNEL_API __attribute__((visibility("hidden")))
#else
#define ATLASMAP_KERNEL_API
#endif

/* nbkernel.c */
ATLASMAP_KERNEL_API int atlasmap_nb_nll(int64_t n, int64_t g, int64_t ld, const float *x, const float *mu,
                                        const float *logits, const float *log_lib, const float *theta,
                                        int64_t theta_stride, const float *pi, const float *const_term,
                                        const float *lgamma_cell, float *nll, float *g_mu, float *g_logits,
                                        float *g_log_lib, float *g_theta, float *g_pi, int n_threads);
ATLASMAP_KERNEL_API int atlasmap_lgamma_theta_sum(int64_t n, int64_t g, const float *x, const float *theta,
                                                  int64_t theta_stride, float *out, int n_threads);
ATLASMAP_KERNEL_API int atlasmap_lgamma_theta_sum_csr(int64_t n, int64_t g, const int64_t *indptr,
                                                      const int32_t *indices, const float *data,
                                                      const float *theta, float *out, int n_threads);
ATLASMAP_KERNEL_API int atlasmap_gather_rows(int64_t n_rows, const int64_t *rows, const int64_t *indptr,
                                             const int32_t *indices, const float *data, int64_t g, float *out,
                                             int n_threads);
ATLASMAP_KERNEL_API int atlasmap_check_counts(int64_t n, const float *values, int n_threads);
ATLASMAP_KERNEL_API int atlasmap_log_factorial_rows(int64_t n_rows, const int64_t *indptr, const float *data,
                                                    float *out, int n_threads);

/* stack.c */
ATLASMAP_KERNEL_API int atlasmap_layer_forward(int64_t n, int64_t h, const float *pre, int64_t n_cov,
                                               const int64_t *codes, int64_t code_stride,
                                               const int64_t *n_blocks, const float *const *block_ptr,
                                               const int64_t *block_rows, int layer_norm, float ln_eps, float p,
                                               float *factor, float *y, float *rstd, float *out);
ATLASMAP_KERNEL_API int atlasmap_layer_backward(int64_t n, int64_t h, float *g, const float *y, const float *rstd,
                                                const float *factor, int layer_norm, int64_t n_cov,
                                                const int64_t *codes, int64_t code_stride,
                                                const int64_t *n_blocks, const int64_t *block_rows,
                                                float *const *block_grad);
ATLASMAP_KERNEL_API int atlasmap_latent_forward(int64_t n, int64_t l, const float *mv, const float *e,
                                                float var_eps, float *z, float *var, float *kl);
ATLASMAP_KERNEL_API int atlasmap_latent_backward(int64_t n, int64_t l, const float *dz, const float *mv,
                                                 const float *var, const float *e, float var_eps,
                                                 float kl_scale, float *dmv);
ATLASMAP_KERNEL_API int atlasmap_uniform(int64_t n, uint64_t seed, float *out);
ATLASMAP_KERNEL_API int atlasmap_adam(int64_t n_tensors, float *const *params, const float *const *grads,
                                      float *const *m, float *const *v, const int64_t *sizes,
                                      const float *step_size, const float *bias2_sqrt, float beta1, float beta2,
                                      float eps, float weight_decay, int n_threads);

#endif
