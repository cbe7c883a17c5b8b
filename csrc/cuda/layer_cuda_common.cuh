// Device helpers shared by the fused layer kernels: fp32 math on fp32/fp16/
// bf16 storage, warp and block reductions, dtype dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/layer_kernels.h"

namespace seqfuse {
namespace kernels {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_f<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Value of x after a round trip through T (identity for float).
template <typename T>
__device__ __forceinline__ float round_as(float x) {
  return to_f<T>(from_f<T>(x));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reduction; `red` holds at least 32 floats of shared memory. Every
// thread returns the result.
template <bool Max>
__device__ __forceinline__ float block_reduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = Max ? warp_max(v) : warp_sum(v);
  __syncthreads();  // `red` may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const float init = Max ? -INFINITY : 0.0f;
  float r = lane < warps ? red[lane] : init;
  r = Max ? warp_max(r) : warp_sum(r);
  return r;
}

}  // namespace cuda
}  // namespace kernels
}  // namespace seqfuse

// Runs the statement with `scalar_t` bound to the storage type of `dtype`.
#define SEQFUSE_CUDA_DISPATCH(dtype, ...)        \
  switch (dtype) {                               \
    case ::seqfuse::kernels::DType::kFloat16: {  \
      using scalar_t = __half;                   \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    case ::seqfuse::kernels::DType::kBFloat16: { \
      using scalar_t = __nv_bfloat16;            \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
    default: {                                   \
      using scalar_t = float;                    \
      __VA_ARGS__;                               \
      break;                                     \
    }                                            \
  }
