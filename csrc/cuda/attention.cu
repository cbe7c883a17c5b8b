// CUDA kernel of the attention core: one block per (query row, head, query
// time). A warp per key computes the dot product (lanes split the head
// dimension, coalesced); scores live in shared memory; softmax with block
// reductions; threads then split the head dimension for the weighted sum.
#include "cuda/layer_cuda_common.cuh"

namespace seqfuse {
namespace kernels {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ int64_t phys_row(const AttentionParams& p, int64_t g, int64_t j) {
  return p.rows ? p.rows[g * p.rows_sg + j * p.rows_sj] : g;
}

template <typename T>
__global__ void attention_kernel(AttentionParams p) {
  extern __shared__ float smem[];
  float* qs = smem;          // [dim]
  float* red = qs + p.dim;   // [32]
  float* scores = red + 32;  // [s]
  const int64_t task = blockIdx.x;
  const int64_t i = task % p.tq;
  const int64_t h = (task / p.tq) % p.heads;
  const int64_t row = task / (p.tq * p.heads);
  const int64_t g = row / p.q_per_kv;
  const int64_t dim = p.dim, s = p.s;
  const T* q = static_cast<const T*>(p.q) + i * p.q_st + row * p.q_sn + h * dim;  // [dim]
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x)
    qs[d] = cuda::round_as<T>(__fmul_rn(cuda::to_f(q[d]), p.scaling));
  __syncthreads();
  const int64_t jend = p.causal_offset >= 0 ? min(s, p.causal_offset + i + 1) : s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t j = warp; j < s; j += warps) {
    const int64_t m = phys_row(p, g, j);
    bool masked = j >= jend;
    if (!masked && p.pad) masked = p.pad[m * p.pad_sm + j * p.pad_sj] != 0;
    float dot = 0.0f;
    if (!masked) {
      const T* k = static_cast<const T*>(p.k) + j * p.k_ss + m * p.k_sm + h * dim;  // [dim]
      for (int64_t d = lane; d < dim; d += 32) dot += qs[d] * cuda::to_f(k[d]);
      dot = cuda::warp_sum(dot);
    }
    if (lane == 0) scores[j] = masked ? -INFINITY : cuda::round_as<T>(dot);
  }
  __syncthreads();
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < s; j += blockDim.x) mx = fmaxf(mx, scores[j]);
  mx = cuda::block_reduce<true>(mx, red);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < s; j += blockDim.x) {
    const float e = expf(scores[j] - mx);
    scores[j] = e;
    sum += e;
  }
  sum = cuda::block_reduce<false>(sum, red);
  float* w = p.weights ? p.weights + ((h * p.n + row) * p.tq + i) * s : nullptr;  // [s]
  for (int64_t j = threadIdx.x; j < s; j += blockDim.x) {
    const float pj = scores[j] / sum;
    if (w) w[j] = pj;
    scores[j] = cuda::round_as<T>(pj);
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + (i * p.n + row) * (p.heads * dim) + h * dim;  // [dim]
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j < s; ++j) {
      const float pj = scores[j];
      if (pj == 0.0f) continue;
      const T* v = static_cast<const T*>(p.v) + j * p.v_ss + phys_row(p, g, j) * p.v_sm + h * dim;
      acc += pj * cuda::to_f(v[d]);
    }
    out[d] = cuda::from_f<T>(acc);
  }
}

}  // namespace

cudaError_t attention_cuda(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  if (p.tq == 0 || p.n == 0) return cudaSuccess;
  if (p.s > kAttentionCudaMaxKeys) return cudaErrorInvalidValue;
  // Caches held in blocks of slots are a CPU-only layout (the CPU one-call step).
  if (p.k_slots != nullptr || p.v_slots != nullptr) return cudaErrorInvalidValue;
  const size_t shm = static_cast<size_t>(p.dim + 32 + p.s) * sizeof(float);
  const unsigned blocks = static_cast<unsigned>(p.n * p.heads * p.tq);
  SEQFUSE_CUDA_DISPATCH(dtype, (attention_kernel<scalar_t><<<blocks, kThreads, shm, stream>>>(p)));
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace seqfuse
