// CUDA implementations of the fused layer ops (CUDA builds only): the shared
// checks of csrc/layer_bindings.cpp, then the launchers of csrc/cuda/*.cu on
// the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "layer_ops.h"

namespace seqfuse {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> add_layernorm_cuda_op(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& residual,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& beta,
                                                         double eps, bool want_sum) {
  TORCH_CHECK(x.is_cuda(), "add_layernorm: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  kernels::AddLayerNormParams p;
  auto out = add_layernorm_prepare(x, bias, residual, weight, beta, eps, want_sum, &p);
  check_launch(kernels::add_layernorm_cuda(p, to_kernel_dtype(x.scalar_type()),
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "add_layernorm");
  return out;
}

at::Tensor bias_act_cuda_op(at::Tensor x, const std::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK(x.is_cuda(), "bias_act_: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  kernels::BiasActParams p;
  bias_act_prepare(x, bias, act, &p);
  check_launch(kernels::bias_act_cuda(p, to_kernel_dtype(x.scalar_type()),
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "bias_act_");
  return x;
}

std::tuple<at::Tensor, at::Tensor> attention_cuda_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_rows, const std::optional<at::Tensor>& key_pad,
    int64_t heads, double scaling, int64_t q_per_kv, int64_t causal_offset, bool need_weights) {
  TORCH_CHECK(q.is_cuda(), "attention: q must be a CUDA tensor");
  TORCH_CHECK(k.size(0) <= kernels::kAttentionCudaMaxKeys, "attention: at most ",
              kernels::kAttentionCudaMaxKeys, " keys on CUDA");
  const c10::cuda::CUDAGuard guard(q.device());
  kernels::AttentionParams p;
  auto out = attention_prepare(q, k, v, kv_rows, key_pad, heads, scaling, q_per_kv, causal_offset,
                               need_weights, &p);
  TORCH_CHECK(p.dim <= 256, "attention: head size ", p.dim, " > 256 on CUDA");
  check_launch(kernels::attention_cuda(p, to_kernel_dtype(q.scalar_type()),
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "attention");
  return out;
}

at::Tensor embedding_cuda_op(const at::Tensor& tokens, const at::Tensor& table, double scale,
                             const std::optional<at::Tensor>& pos_table, int64_t pad,
                             int64_t pos_mode, int64_t fixed_pos, bool zero_pads) {
  TORCH_CHECK(table.is_cuda(), "embedding: table must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(table.device());
  kernels::EmbeddingParams p;
  at::Tensor out =
      embedding_prepare(tokens, table, scale, pos_table, pad, pos_mode, fixed_pos, zero_pads, &p);
  check_launch(kernels::embedding_cuda(p, to_kernel_dtype(table.scalar_type()),
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "embedding");
  return out;
}

}  // namespace
}  // namespace seqfuse

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) {
  m.impl("add_layernorm", &seqfuse::add_layernorm_cuda_op);
  m.impl("bias_act_", &seqfuse::bias_act_cuda_op);
  m.impl("attention", &seqfuse::attention_cuda_op);
  m.impl("embedding", &seqfuse::embedding_cuda_op);
}
