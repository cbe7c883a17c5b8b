// CUDA kernel of add_layernorm: one block per row; each thread re-reads only
// the elements it wrote, so the reductions are the only synchronisation.
#include "cuda/layer_cuda_common.cuh"

namespace seqfuse {
namespace kernels {
namespace {

template <typename T>
__global__ void add_layernorm_kernel(AddLayerNormParams p) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int64_t cols = p.cols;
  const T* x = static_cast<const T*>(p.x) + row * cols;                                  // [cols]
  const T* res = p.residual ? static_cast<const T*>(p.residual) + row * cols : nullptr;  // [cols]
  const T* bias = static_cast<const T*>(p.bias);                                         // [cols]
  T* s = (p.sum ? static_cast<T*>(p.sum) : static_cast<T*>(p.normed)) + row * cols;      // [cols]
  float acc = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float v = cuda::to_f(x[c]);
    if (bias) v = cuda::round_as<T>(__fadd_rn(v, cuda::to_f(bias[c])));
    if (res) v = cuda::round_as<T>(__fadd_rn(cuda::to_f(res[c]), v));
    s[c] = cuda::from_f<T>(v);
    acc += v;
  }
  if (p.weight == nullptr) return;
  const float mean = cuda::block_reduce<false>(acc, red) / static_cast<float>(cols);
  float var = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float d = cuda::to_f(s[c]) - mean;
    var += d * d;
  }
  var = cuda::block_reduce<false>(var, red) / static_cast<float>(cols);
  const float rstd = rsqrtf(var + p.eps);
  const float shift = -mean * rstd;
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.beta);
  T* o = static_cast<T*>(p.normed) + row * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float y = cuda::to_f(s[c]) * rstd + shift;
    o[c] = cuda::from_f<T>(y * cuda::to_f(w[c]) + cuda::to_f(b[c]));
  }
}

}  // namespace

cudaError_t add_layernorm_cuda(const AddLayerNormParams& p, DType dtype, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  const int threads = p.cols >= 1024 ? 256 : 128;
  SEQFUSE_CUDA_DISPATCH(dtype, (add_layernorm_kernel<scalar_t>
                                <<<static_cast<unsigned>(p.rows), threads, 0, stream>>>(p)));
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace seqfuse
