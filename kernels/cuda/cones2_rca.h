/* C ABI of the CUDA twin of cones2's fused rectified cross-attention (SPEC 3).
 *
 *   out_b = softmax((S_b + coef_b * W_b * sd_b) * scale) V_b,   S_b = Q_b K_b^T,
 *   sd_b  = unbiased std of S_b over (heads, queries, keys).
 *
 * Tensors are device pointers with element strides (like torch): q (B, H, N, D), k and v
 * (B, H, M, D), out (B, H, N, D) in `dtype`; weight (B, N, M) float32 (NULL = plain attention);
 * coef (B,) float32. weight <= -1e4 with coef > 0 is a hard mask: probability exactly 0.
 * Limits: D <= 160, M <= 256. Products and sums are fp32; the std moments are fp64.
 * Every function returns 0 on success, else an error code; cones2_rca_last_error() says why.
 * All work is queued on `stream` (a cudaStream_t; NULL = the legacy default stream).
 */
#ifndef CONES2_RCA_H
#define CONES2_RCA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define CONES2_RCA_API __declspec(dllexport)
#else
#define CONES2_RCA_API __attribute__((visibility("default")))
#endif

#define CONES2_RCA_ABI_VERSION 1

enum cones2_rca_dtype { CONES2_RCA_F32 = 0, CONES2_RCA_F16 = 1, CONES2_RCA_BF16 = 2 };
enum cones2_rca_status { CONES2_RCA_OK = 0, CONES2_RCA_BAD_ARGUMENT = 1, CONES2_RCA_CUDA_ERROR = 2 };

/* Strides in elements, 19 values: q (4), k (4), v (4), out (4), weight (3). */
typedef struct cones2_rca_strides {
    int64_t q[4], k[4], v[4], out[4], weight[3];
} cones2_rca_strides;

CONES2_RCA_API int cones2_rca_abi_version(void);
CONES2_RCA_API const char* cones2_rca_last_error(void);

/* Std pre-pass: zeroes moments (2 * B doubles: sum S, sum S^2 per sample) and accumulates them.
 * Samples with coef == 0 are skipped (their std is never used). */
CONES2_RCA_API int cones2_rca_moments(int dtype, const void* q, const void* k, const float* coef, int B, int H,
                                      int N, int M, int D, const cones2_rca_strides* strides, double* moments,
                                      void* stream);

/* Fused attention given the moments of cones2_rca_moments (ignored when weight is NULL). */
CONES2_RCA_API int cones2_rca_forward(int dtype, const void* q, const void* k, const void* v, const float* weight,
                                      const float* coef, const double* moments, void* out, int B, int H, int N,
                                      int M, int D, float scale, const cones2_rca_strides* strides, void* stream);

/* Both steps; `moments` is caller-owned scratch of 2 * B doubles. */
CONES2_RCA_API int cones2_rectified_cross_attention(int dtype, const void* q, const void* k, const void* v,
                                                    const float* weight, const float* coef, void* out, int B, int H,
                                                    int N, int M, int D, float scale,
                                                    const cones2_rca_strides* strides, double* moments, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* CONES2_RCA_H */
