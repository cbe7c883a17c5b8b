// CUDA kernel of bias_act: x = act(x + bias), elementwise, grid-stride.
#include "cuda/layer_cuda_common.cuh"

namespace seqfuse {
namespace kernels {
namespace {

__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case kActRelu:
      return v > 0.0f ? v : 0.0f;
    case kActGelu:
      return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case kActGeluAccurate:
      return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case kActTanh:
      return tanhf(v);
    default:
      return v;
  }
}

template <typename T>
__global__ void bias_act_kernel(BiasActParams p) {
  T* x = static_cast<T*>(p.x);                    // [rows, cols]
  const T* bias = static_cast<const T*>(p.bias);  // [cols]
  const int64_t total = p.rows * p.cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = cuda::to_f(x[i]);
    if (bias) v = cuda::round_as<T>(__fadd_rn(v, cuda::to_f(bias[i % p.cols])));
    x[i] = cuda::from_f<T>(activate(v, p.act));
  }
}

}  // namespace

cudaError_t bias_act_cuda(const BiasActParams& p, DType dtype, cudaStream_t stream) {
  const int64_t total = p.rows * p.cols;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 65535 * 8 ? want : 65535 * 8);
  SEQFUSE_CUDA_DISPATCH(dtype, (bias_act_kernel<scalar_t><<<blocks, threads, 0, stream>>>(p)));
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace seqfuse
