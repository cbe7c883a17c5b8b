// CUDA kernel of the embedding op: one block per (time, sentence); the
// position of mode 1 is the block-reduced count of non-pad tokens so far.
#include "cuda/layer_cuda_common.cuh"

namespace seqfuse {
namespace kernels {
namespace {

template <typename T>
__global__ void embedding_kernel(EmbeddingParams p) {
  __shared__ float red[32];
  const int64_t t = blockIdx.x / p.b, b = blockIdx.x % p.b;
  const int64_t tok = p.tokens[b * p.tok_sb + t * p.tok_st];
  const bool is_pad = tok == p.pad;
  int64_t pos = p.fixed_pos;
  if (p.pos_mode == 1) {
    float count = 0.0f;
    for (int64_t u = threadIdx.x; u <= t; u += blockDim.x)
      count += p.tokens[b * p.tok_sb + u * p.tok_st] != p.pad ? 1.0f : 0.0f;
    count = cuda::block_reduce<false>(count, red);
    pos = is_pad ? p.pad : p.pad + static_cast<int64_t>(count);
  }
  const T* e = static_cast<const T*>(p.table) + tok * p.cols;  // [cols]
  const T* pe = p.pos_table ? static_cast<const T*>(p.pos_table) + pos * p.cols : nullptr;
  T* o = static_cast<T*>(p.out) + (t * p.b + b) * p.cols;  // [cols]
  for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
    float x = cuda::round_as<T>(__fmul_rn(p.scale, cuda::to_f(e[c])));
    if (pe) x = cuda::round_as<T>(__fadd_rn(x, cuda::to_f(pe[c])));
    if (p.zero_pads && is_pad) x = cuda::round_as<T>(__fmul_rn(x, 0.0f));
    o[c] = cuda::from_f<T>(x);
  }
}

}  // namespace

cudaError_t embedding_cuda(const EmbeddingParams& p, DType dtype, cudaStream_t stream) {
  if (p.b == 0 || p.t == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(p.b * p.t);
  SEQFUSE_CUDA_DISPATCH(dtype, (embedding_kernel<scalar_t><<<blocks, 128, 0, stream>>>(p)));
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace seqfuse
