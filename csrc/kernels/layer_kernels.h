// Framework-independent parameters of the fused layer kernels (raw pointers,
// shapes and element strides as arguments). The contracts are documented in
// seqfuse/ops/{add_layernorm,bias_act,attention,embedding}.py; the CPU kernels
// (csrc/cpu/*_cpu.cc) and the CUDA kernels (csrc/cuda/*.cu) implement them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(SEQFUSE_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace seqfuse {
namespace kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Activations of bias_act (values shared with seqfuse/ops/bias_act.py).
constexpr int kActLinear = 0;
constexpr int kActRelu = 1;
constexpr int kActGelu = 2;          // x * Phi(x), erf form
constexpr int kActGeluAccurate = 3;  // tanh approximation
constexpr int kActTanh = 4;

// sum = x + bias + residual (each optional but x), normed = layer_norm(sum).
struct AddLayerNormParams {
  const void* x;         // [rows, cols]
  const void* bias;      // [cols] or null
  const void* residual;  // [rows, cols] or null
  const void* weight;    // [cols] or null: no normalisation, sum only
  const void* beta;      // [cols]
  void* sum;             // [rows, cols] or null (not wanted)
  void* normed;          // [rows, cols] or null when weight is null
  int64_t rows, cols;
  float eps;
};

// x = act(x + bias), in place.
struct BiasActParams {
  void* x;           // [rows, cols]
  const void* bias;  // [cols] or null
  int64_t rows, cols;
  int act;
};

// Multi-head attention core on time-major tensors, heads packed in channels.
// Query row n uses logical kv row g = n / q_per_kv; slot j of logical row g
// lives in physical row rows[g * rows_sg + j * rows_sj] (identity when rows
// is null). Keys j > causal_offset + i are masked for query i when
// causal_offset >= 0; pad[m * pad_sm + j * pad_sj] != 0 masks slot j of
// physical row m.
struct AttentionParams {
  const void* q;  // [tq, n, heads * dim], strides (q_st, q_sn), channels contiguous
  int64_t q_st, q_sn;
  const void* k;  // [s, m, heads * dim], strides (k_ss, k_sm)
  int64_t k_ss, k_sm;
  const void* v;  // [s, m, heads * dim], strides (v_ss, v_sm)
  int64_t v_ss, v_sm;
  const int64_t* rows;  // [g, s] physical rows, or null
  int64_t rows_sg, rows_sj;
  const uint8_t* pad;  // [m, s] key padding, or null
  int64_t pad_sm, pad_sj;
  void* out;       // [tq, n, heads * dim] contiguous
  float* weights;  // [heads, n, tq, s] fp32 softmax probabilities, or null
  int64_t tq, n, s, heads, dim, q_per_kv, causal_offset;
  float scaling;
  // Per-slot base pointers ([s] each; the CPU kernel only): slot j's rows
  // start at k_slots[j] / v_slots[j] (rows k_sm / v_sm apart) instead of at
  // k + j * k_ss / v + j * v_ss, for a cache held in blocks of slots. Null:
  // the strides.
  const void* const* k_slots = nullptr;
  const void* const* v_slots = nullptr;
  // Head strides of q, k and v (the CPU kernel only): head h's channels
  // start h * q_sh (k_sh, v_sh) elements after the row's; 0: dim (the heads
  // side by side in the channels, as the shapes above say). Query head h
  // reads K/V head h / q_heads_per_kv (grouped K/V heads; 0 or 1: its own).
  int64_t q_sh = 0, k_sh = 0, v_sh = 0;
  int64_t q_heads_per_kv = 0;
};

// out[t, b] = T(T(scale * table[tok]) + pos_table[pos]) (zeroed at pads when
// zero_pads), tok = tokens[b * tok_sb + t * tok_st]. pos_mode 0: no
// positions, 1: fairseq make_positions (pad + running count of non-pads, pad
// at pads), 2: the fixed position fixed_pos for every token.
struct EmbeddingParams {
  const int64_t* tokens;  // [b, t], strides (tok_sb, tok_st)
  int64_t tok_sb, tok_st;
  const void* table;      // [vocab, cols]
  const void* pos_table;  // [npos, cols] or null
  void* out;              // [t, b, cols] contiguous
  int64_t b, t, cols, vocab, npos, pad, fixed_pos;
  int pos_mode;
  bool zero_pads;
  float scale;
};

#if defined(__CUDACC__) || defined(SEQFUSE_WITH_CUDA)
// CUDA launchers: return cudaSuccess or the launch error.
cudaError_t add_layernorm_cuda(const AddLayerNormParams& p, DType dtype, cudaStream_t stream);
cudaError_t bias_act_cuda(const BiasActParams& p, DType dtype, cudaStream_t stream);
cudaError_t attention_cuda(const AttentionParams& p, DType dtype, cudaStream_t stream);
// Largest key length the CUDA attention kernel takes (scores live in shared memory).
constexpr int64_t kAttentionCudaMaxKeys = 8192;
cudaError_t embedding_cuda(const EmbeddingParams& p, DType dtype, cudaStream_t stream);
#endif

}  // namespace kernels
}  // namespace seqfuse
