// CUDA twin of cones2's fused rectified cross-attention (SPEC 3); contract in cones2_rca.h.
//
// Same math as kernels/triton_rectified.py, for services that do not want Triton's JIT (and for a
// TensorRT plugin later). Two kernels per call:
//   moments_kernel  - std pre-pass: each block computes its 16 x M logit tile in shared memory and
//                     adds sum S and sum S^2 (fp64) of its sample with one atomic each;
//   forward_kernel  - one block = 16 query rows of one head: logits (+ coef * sd * W, hard mask),
//                     softmax and P V, all M <= 256 keys kept in shared memory, never in DRAM.
// Keys and values are staged through shared memory 32 at a time (rows padded to D + 1 floats so
// lane-per-key reads are bank-conflict free). fp16/bf16 inputs are widened to fp32 on load.
#include "cones2_rca.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <string>

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;
constexpr int kRows = kWarps * kRowsPerWarp;  // query rows per block
constexpr int kKeyChunk = 32;                 // keys (or values) staged in shared memory at a time
constexpr int kMaxD = 160;
constexpr int kMaxM = 256;
constexpr int kMaxDT = kMaxD / 32;            // output columns per lane
constexpr float kHardMask = -1e4f;

thread_local std::string g_last_error;

struct Dims {
  int B, H, N, M, D;
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Block-cooperative copy of rows [row0, row0 + rows) x [0, D) of a (tokens, D) slice into dst
// (leading dimension ld), widened to fp32; rows past `valid` are zero.
template <typename T>
__device__ void stage_rows(float* dst, int ld, const T* src, int64_t s_row, int64_t s_col, int row0, int rows,
                           int valid, int D) {
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
    const int r = i / D, c = i - r * D;
    dst[r * ld + c] = r < valid ? to_float(src[(int64_t)(row0 + r) * s_row + (int64_t)c * s_col]) : 0.f;
  }
}

__device__ __forceinline__ float dot(const float* a, const float* b, int D) {
  float s = 0.f;
#pragma unroll 8
  for (int i = 0; i < D; ++i) s = fmaf(a[i], b[i], s);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moments_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                           const float* __restrict__ coef, Dims dm,
                                                           cones2_rca_strides st, double* __restrict__ moments) {
  const int b = blockIdx.z, h = blockIdx.y, row0 = blockIdx.x * kRows;
  if (coef[b] == 0.f) return;  // uniform per block: this sample's std is never used
  const int D = dm.D, M = dm.M;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int valid_rows = min(kRows, dm.N - row0);
  extern __shared__ float smem[];
  float* qs = smem;              // kRows x D
  float* ks = qs + kRows * D;    // kKeyChunk x (D + 1)
  __shared__ double partial[2][kWarps];

  stage_rows(qs, D, q + b * st.q[0] + h * st.q[1], st.q[2], st.q[3], row0, kRows, valid_rows, D);
  const T* kb = k + b * st.k[0] + h * st.k[1];
  double sum = 0.0, sum_sq = 0.0;
  for (int m0 = 0; m0 < M; m0 += kKeyChunk) {
    const int valid_keys = min(kKeyChunk, M - m0);
    __syncthreads();  // q staged / previous chunk consumed
    stage_rows(ks, D + 1, kb, st.k[2], st.k[3], m0, kKeyChunk, valid_keys, D);
    __syncthreads();
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (r < valid_rows && lane < valid_keys) {
        const float s = dot(qs + r * D, ks + lane * (D + 1), D);
        sum += s;
        sum_sq += (double)s * s;
      }
    }
  }
  sum = warp_sum(sum);
  sum_sq = warp_sum(sum_sq);
  if (lane == 0) {
    partial[0][warp] = sum;
    partial[1][warp] = sum_sq;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double a = 0.0, c = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      a += partial[0][w];
      c += partial[1][w];
    }
    atomicAdd(moments + 2 * b, a);
    atomicAdd(moments + 2 * b + 1, c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                           const T* __restrict__ v, const float* __restrict__ weight,
                                                           const float* __restrict__ coef,
                                                           const double* __restrict__ moments, T* __restrict__ out,
                                                           Dims dm, float scale, cones2_rca_strides st) {
  const int b = blockIdx.z, h = blockIdx.y, row0 = blockIdx.x * kRows;
  const int D = dm.D, M = dm.M;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int valid_rows = min(kRows, dm.N - row0);
  extern __shared__ float smem[];
  float* qs = smem;                      // kRows x D
  float* kv = qs + kRows * D;            // kKeyChunk x (D + 1): keys, then values
  float* probs = kv + kKeyChunk * (D + 1);  // kRows x M: logits, then probabilities

  // Rectification for this sample: logit += bias * W, W <= hard_at -> -inf.
  const bool guided = weight != nullptr && coef[b] != 0.f;
  float bias = 0.f, hard_at = -INFINITY;
  if (guided) {
    const double count = (double)dm.H * dm.N * M;
    const double s1 = moments[2 * b], s2 = moments[2 * b + 1];
    const double var = count > 1.0 ? (s2 - s1 * s1 / count) / (count - 1.0) : 0.0;
    bias = coef[b] * (float)sqrt(var > 0.0 ? var : 0.0);
    if (coef[b] > 0.f) hard_at = kHardMask;
  }

  stage_rows(qs, D, q + b * st.q[0] + h * st.q[1], st.q[2], st.q[3], row0, kRows, valid_rows, D);
  const T* kb = k + b * st.k[0] + h * st.k[1];
  for (int m0 = 0; m0 < M; m0 += kKeyChunk) {
    const int valid_keys = min(kKeyChunk, M - m0);
    __syncthreads();
    stage_rows(kv, D + 1, kb, st.k[2], st.k[3], m0, kKeyChunk, valid_keys, D);
    __syncthreads();
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (r < valid_rows && lane < valid_keys) {
        const int n = row0 + r, m = m0 + lane;
        float s = dot(qs + r * D, kv + lane * (D + 1), D);
        if (guided) {
          const float w = weight[b * st.weight[0] + (int64_t)n * st.weight[1] + (int64_t)m * st.weight[2]];
          s = w <= hard_at ? -INFINITY : fmaf(bias, w, s);
        }
        probs[r * M + m] = s * scale;
      }
    }
  }
  __syncwarp();

  // Softmax of each row by the warp that owns it; masked logits give exactly 0.
  float inv_sum[kRowsPerWarp];
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    inv_sum[rr] = 0.f;
    if (r >= valid_rows) continue;  // uniform per warp
    float* row = probs + r * M;
    float mx = -INFINITY;
    for (int m = lane; m < M; m += 32) mx = fmaxf(mx, row[m]);
    mx = warp_max(mx);
    float l = 0.f;
    for (int m = lane; m < M; m += 32) {
      const float p = (row[m] == -INFINITY) ? 0.f : expf(row[m] - mx);
      row[m] = p;
      l += p;
    }
    l = warp_sum(l);
    inv_sum[rr] = l > 0.f ? 1.f / l : 0.f;  // a fully masked row gives 0, never NaN
  }

  // P V: lane owns output columns lane, lane + 32, ...
  float acc[kRowsPerWarp][kMaxDT];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr)
#pragma unroll
    for (int t = 0; t < kMaxDT; ++t) acc[rr][t] = 0.f;
  const T* vb = v + b * st.v[0] + h * st.v[1];
  for (int m0 = 0; m0 < M; m0 += kKeyChunk) {
    const int valid_keys = min(kKeyChunk, M - m0);
    __syncthreads();
    stage_rows(kv, D + 1, vb, st.v[2], st.v[3], m0, kKeyChunk, valid_keys, D);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      if (r >= valid_rows) continue;
      const float* p = probs + r * M + m0;
      for (int j = 0; j < valid_keys; ++j) {
        const float pj = p[j];
#pragma unroll
        for (int t = 0; t < kMaxDT; ++t) {
          const int c = lane + 32 * t;
          if (c < D) acc[rr][t] = fmaf(pj, kv[j * (D + 1) + c], acc[rr][t]);
        }
      }
    }
  }
  T* ob = out + b * st.out[0] + h * st.out[1];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = warp * kRowsPerWarp + rr;
    if (r >= valid_rows) continue;
#pragma unroll
    for (int t = 0; t < kMaxDT; ++t) {
      const int c = lane + 32 * t;
      if (c < D) ob[(int64_t)(row0 + r) * st.out[2] + (int64_t)c * st.out[3]] = from_float<T>(acc[rr][t] * inv_sum[rr]);
    }
  }
}

int fail(int code, const std::string& message) {
  g_last_error = message;
  return code;
}

int check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fail(CONES2_RCA_CUDA_ERROR, std::string(what) + ": " + cudaGetErrorString(err));
  g_last_error.clear();
  return CONES2_RCA_OK;
}

int check_dims(int dtype, const Dims& dm, const cones2_rca_strides* strides) {
  if (dtype != CONES2_RCA_F32 && dtype != CONES2_RCA_F16 && dtype != CONES2_RCA_BF16)
    return fail(CONES2_RCA_BAD_ARGUMENT, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  if (dm.B < 1 || dm.H < 1 || dm.N < 1 || dm.M < 1 || dm.D < 1)
    return fail(CONES2_RCA_BAD_ARGUMENT, "B, H, N, M and D must be positive");
  if (dm.D > kMaxD) return fail(CONES2_RCA_BAD_ARGUMENT, "head dim D must be at most 160");
  if (dm.M > kMaxM) return fail(CONES2_RCA_BAD_ARGUMENT, "key count M must be at most 256");
  if (dm.B > 65535 || dm.H > 65535) return fail(CONES2_RCA_BAD_ARGUMENT, "B and H must be at most 65535");
  if (strides == nullptr) return fail(CONES2_RCA_BAD_ARGUMENT, "strides must not be NULL");
  return CONES2_RCA_OK;
}

dim3 grid_of(const Dims& dm) { return dim3((dm.N + kRows - 1) / kRows, dm.H, dm.B); }

template <typename T>
int launch_moments(const void* q, const void* k, const float* coef, const Dims& dm, const cones2_rca_strides& st,
                   double* moments, cudaStream_t stream) {
  const size_t shared = sizeof(float) * (kRows * dm.D + kKeyChunk * (dm.D + 1));
  moments_kernel<T><<<grid_of(dm), kThreads, shared, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                               coef, dm, st, moments);
  return check_launch("moments_kernel");
}

template <typename T>
int launch_forward(const void* q, const void* k, const void* v, const float* weight, const float* coef,
                   const double* moments, void* out, const Dims& dm, float scale, const cones2_rca_strides& st,
                   cudaStream_t stream) {
  const size_t shared = sizeof(float) * (kRows * dm.D + kKeyChunk * (dm.D + 1) + kRows * dm.M);
  forward_kernel<T><<<grid_of(dm), kThreads, shared, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), weight, coef, moments,
      static_cast<T*>(out), dm, scale, st);
  return check_launch("forward_kernel");
}

}  // namespace

extern "C" {

int cones2_rca_abi_version(void) { return CONES2_RCA_ABI_VERSION; }

const char* cones2_rca_last_error(void) { return g_last_error.c_str(); }

int cones2_rca_moments(int dtype, const void* q, const void* k, const float* coef, int B, int H, int N, int M, int D,
                       const cones2_rca_strides* strides, double* moments, void* stream) {
  const Dims dm{B, H, N, M, D};
  if (int rc = check_dims(dtype, dm, strides)) return rc;
  if (!q || !k || !coef || !moments) return fail(CONES2_RCA_BAD_ARGUMENT, "q, k, coef and moments must not be NULL");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = cudaMemsetAsync(moments, 0, sizeof(double) * 2 * B, s);
  if (err != cudaSuccess)
    return fail(CONES2_RCA_CUDA_ERROR, std::string("cudaMemsetAsync: ") + cudaGetErrorString(err));
  switch (dtype) {
    case CONES2_RCA_F32: return launch_moments<float>(q, k, coef, dm, *strides, moments, s);
    case CONES2_RCA_F16: return launch_moments<__half>(q, k, coef, dm, *strides, moments, s);
    default: return launch_moments<__nv_bfloat16>(q, k, coef, dm, *strides, moments, s);
  }
}

int cones2_rca_forward(int dtype, const void* q, const void* k, const void* v, const float* weight, const float* coef,
                       const double* moments, void* out, int B, int H, int N, int M, int D, float scale,
                       const cones2_rca_strides* strides, void* stream) {
  const Dims dm{B, H, N, M, D};
  if (int rc = check_dims(dtype, dm, strides)) return rc;
  if (!q || !k || !v || !out) return fail(CONES2_RCA_BAD_ARGUMENT, "q, k, v and out must not be NULL");
  if (weight && (!coef || !moments))
    return fail(CONES2_RCA_BAD_ARGUMENT, "coef and moments are required when weight is given");
  if (!(scale > 0.f) || !std::isfinite(scale))
    return fail(CONES2_RCA_BAD_ARGUMENT, "scale must be positive and finite");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CONES2_RCA_F32: return launch_forward<float>(q, k, v, weight, coef, moments, out, dm, scale, *strides, s);
    case CONES2_RCA_F16: return launch_forward<__half>(q, k, v, weight, coef, moments, out, dm, scale, *strides, s);
    default: return launch_forward<__nv_bfloat16>(q, k, v, weight, coef, moments, out, dm, scale, *strides, s);
  }
}

int cones2_rectified_cross_attention(int dtype, const void* q, const void* k, const void* v, const float* weight,
                                     const float* coef, void* out, int B, int H, int N, int M, int D, float scale,
                                     const cones2_rca_strides* strides, double* moments, void* stream) {
  if (weight) {
    if (int rc = cones2_rca_moments(dtype, q, k, coef, B, H, N, M, D, strides, moments, stream)) return rc;
  }
  return cones2_rca_forward(dtype, q, k, v, weight, coef, moments, out, B, H, N, M, D, scale, strides, stream);
}

}  // extern "C"
