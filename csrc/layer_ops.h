// Torch-facing entry points of the fused layer ops (checks, then the
// framework-independent kernels of csrc/kernels/layer_kernels.h).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "cpu/linear_post.h"
#include "kernels/layer_kernels.h"

#define SEQFUSE_CHECK_FLOAT(x)                                                     \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf || \
                  (x).scalar_type() == at::kBFloat16,                              \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
#define SEQFUSE_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define SEQFUSE_CHECK_SAME(x, ref)                                                        \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type() && (x).device() == (ref).device(), \
              #x " must have the dtype and device of " #ref)
#define SEQFUSE_CHECK_SHAPE(x, ...)                          \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), \
              #x " must have shape (" #__VA_ARGS__ "), got ", (x).sizes())

namespace seqfuse {

inline kernels::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return kernels::DType::kFloat16;
    case at::kBFloat16:
      return kernels::DType::kBFloat16;
    default:
      return kernels::DType::kFloat32;
  }
}

// Shared argument checks; each fills the kernel parameters (device independent).
std::tuple<at::Tensor, at::Tensor> add_layernorm_prepare(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& residual,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& beta,
                                                         double eps, bool want_sum,
                                                         kernels::AddLayerNormParams* p);
void bias_act_prepare(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t act,
                      kernels::BiasActParams* p);
std::tuple<at::Tensor, at::Tensor> attention_prepare(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_rows, const std::optional<at::Tensor>& key_pad,
    int64_t heads, double scaling, int64_t q_per_kv, int64_t causal_offset, bool need_weights,
    kernels::AttentionParams* p);
at::Tensor embedding_prepare(const at::Tensor& tokens, const at::Tensor& table, double scale,
                             const std::optional<at::Tensor>& pos_table, int64_t pad,
                             int64_t pos_mode, int64_t fixed_pos, bool zero_pads,
                             kernels::EmbeddingParams* p);

// CPU implementations (csrc/cpu/*_cpu.cc).
std::tuple<at::Tensor, at::Tensor> add_layernorm_cpu(const at::Tensor& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& residual,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& beta,
                                                     double eps, bool want_sum);
at::Tensor bias_act_cpu(at::Tensor x, const std::optional<at::Tensor>& bias, int64_t act);
std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& kv_rows,
                                                 const std::optional<at::Tensor>& key_pad,
                                                 int64_t heads, double scaling, int64_t q_per_kv,
                                                 int64_t causal_offset, bool need_weights);
// One query per row, Hugging Face's cache layout (q [b, H, 1, hd], k and v
// [b, H, s, hd], key_pad [b, s] or none; fp32): [b, 1, H * hd]
// (csrc/cpu/attention_cpu.cc).
at::Tensor attention_heads_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_pad, double scaling);
// y = x W^T + b with W packed by pack_linear_weight (float32; csrc/cpu/linear_cpu.cc).
// skip_zeros: row blocks skip the k where all their rows of x are zero (ReLU
// activations): the same outputs, bit for bit, when W is finite (the caller's
// check: 0 * inf is NaN where skipped terms add nothing).
at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed,
                             const std::optional<at::Tensor>& bias, int64_t n,
                             bool skip_zeros = false);
// The same into `out` ([M, n], contiguous), or into a new tensor when `out`
// is undefined.
at::Tensor linear_packed_out_cpu(const at::Tensor& x, const at::Tensor& packed,
                                 const std::optional<at::Tensor>& bias, int64_t n,
                                 const at::Tensor& out, bool skip_zeros = false);
// linear_packed_out_cpu (dense) that also writes, into `maxima` ([M,
// kernels::num_max_groups(n)], contiguous), the maximum of each row's
// kernels::kMaxGroup outputs per group, ignoring NaN, or NaN where one is
// NaN: noted as each GEMM task stores its outputs (beam_topk_maxima's input).
at::Tensor linear_packed_maxima_out_cpu(const at::Tensor& x, const at::Tensor& packed,
                                        const std::optional<at::Tensor>& bias, int64_t n,
                                        const at::Tensor& out, const at::Tensor& maxima);
at::Tensor embedding_cpu(const at::Tensor& tokens, const at::Tensor& table, double scale,
                         const std::optional<at::Tensor>& pos_table, int64_t pad, int64_t pos_mode,
                         int64_t fixed_pos, bool zero_pads);

// The float32 CPU kernels on parameters already checked, for callers that run
// one parallel region over several ops (the one-call layer stacks of
// csrc/cpu/fused_stack_cpu.cc): no tensor is made or inspected. Each splits its
// work in tasks and runs tasks [begin, end) on the calling thread: GEMM tasks
// (linear_packed_task_count), rows (add_layernorm, bias_act), attention rows
// (query rows x query times, with the caller's scratch: scores [heads * s],
// phys [s], qs and acc [heads * dim]). Each output is computed as by the
// whole op, whichever thread takes it.
// A GEMM task may end with a post-op on its outputs (cpu/linear_post.h).
// The products' row blocks are linear_packed_block_rows(skip_zeros) tall
// (the capability's choice; every call of one product passes the same).
// A GEMM that skips zeros first builds its row blocks' k lists (blocks
// [bbegin, bend) of linear_packed_row_block_count(M, rows), into
// zero_skip_lists' buffer, the calling thread's), then passes them to every
// task.
int64_t linear_packed_block_rows(bool skip_zeros);  // raises without a packed kernel
int64_t linear_packed_task_count(int64_t M, int64_t N, int64_t rows);
void linear_packed_run_range(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed,
                             int64_t N, const float* bias, float* y, int64_t rows, int64_t begin,
                             int64_t end, const int32_t* lists = nullptr,
                             const cpu_capability::LinearPost* post = nullptr);
// Every task of row blocks [bbegin, bend) of linear_packed_row_block_count(M,
// rows): all N columns of their rows.
void linear_packed_run_blocks(const float* x, int64_t M, int64_t K, int64_t ldx,
                              const float* packed, int64_t N, const float* bias, float* y,
                              int64_t rows, int64_t bbegin, int64_t bend,
                              const int32_t* lists = nullptr,
                              const cpu_capability::LinearPost* post = nullptr);
int64_t linear_packed_row_block_count(int64_t M, int64_t rows);
// The capability's bias + ReLU post-op (cpu/linear_post.h, BiasReluCtx)
// over ctx, for a product whose row blocks are linear_packed_block_rows(true).
cpu_capability::LinearPost linear_packed_bias_relu_post(const cpu_capability::BiasReluCtx* ctx);
void linear_packed_nonzero_range(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t rows,
                                 int32_t* lists, int64_t bbegin, int64_t bend);
int32_t* zero_skip_lists(int64_t M, int64_t K);
void add_layernorm_range_f32(const kernels::AddLayerNormParams& p, int64_t r0, int64_t r1);
void bias_act_range_f32(const kernels::BiasActParams& p, int64_t r0, int64_t r1);
void attention_range_run_f32(const kernels::AttentionParams& p, int64_t t0, int64_t t1,
                             float* scores, int64_t* phys, float* qs, float* acc);
// Raises when a physical row of p.rows (the first p.s slots of each logical
// row) lies outside [0, m).
void check_attention_rows(const kernels::AttentionParams& p, int64_t m);

}  // namespace seqfuse
