// seqfuse::fused_decoder_step (CPU, float32): one incremental decoder step of
// seqfuse's fused layers (seqfuse/layers/transformer.py,
// FusedTransformerDecoderLayer.fused_forward) for every layer in one call;
// seqfuse::fused_encoder_stack: the fused encoder layers
// (FusedTransformerEncoderLayer.forward) over a whole source batch, likewise.
//
// It runs the same kernels as the Python layer code, on the same tensors, in
// the same order (packed-weight GEMMs, the attention core over the
// preallocated caches, add + layernorm, bias + activation), so its output is
// bit-identical to the layer-by-layer path (tested); what it removes is the
// Python and dispatcher work between the ops, which dominates small-batch
// steps, and (in the decoder step) a thread fork and join per op. The
// caller (seqfuse/layers/fused_step.py) keeps the cache bookkeeping (growth,
// repack, reorder) in Python and passes the buffers; this call writes the
// step's K/V, parent-table column and key padding into slot `slot` of each
// layer's self-attention cache.
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/task_queue.h"
#include "kernels/beam_topk.h"
#include "layer_ops.h"
#include "ops.h"
#include "search_lane.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace seqfuse {
namespace {

// Per-layer parameter list (seqfuse/layers/fused_step.py builds it).
enum Slot : int64_t {
  kQkvPack,
  kQkvBias,
  kSelfOutPack,
  kSelfOutBias,
  kSelfLnW,
  kSelfLnB,
  kCrossQPack,
  kCrossQBias,
  kCrossOutPack,
  kCrossOutBias,
  kCrossLnW,
  kCrossLnB,
  kFc1Pack,
  kFc1Bias,
  kFc2Pack,
  kFc2Bias,
  kFinalLnW,
  kFinalLnB,
  kPerLayer
};
// Per-layer doubles: eps of the three norms, self and cross scaling, and
// whether fc2 may skip zero activations (1: its weight is finite, see
// linear_packed_cpu's skip_zeros; 0: it multiplies every term).
enum Num : int64_t {
  kSelfEps,
  kCrossEps,
  kFinalEps,
  kSelfScaling,
  kCrossScaling,
  kFc2SkipZeros,
  kNumsPerLayer
};

// Per-layer encoder parameters and doubles (seqfuse/layers/fused_step.py).
enum EncSlot : int64_t {
  kEQkvPack,
  kEQkvBias,
  kEOutPack,
  kEOutBias,
  kESelfLnW,
  kESelfLnB,
  kEFc1Pack,
  kEFc1Bias,
  kEFc2Pack,
  kEFc2Bias,
  kEFinalLnW,
  kEFinalLnB,
  kEncPerLayer
};
enum EncNum : int64_t { kESelfEps, kEFinalEps, kEScaling, kEFc2SkipZeros, kEncNumsPerLayer };

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(
      t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
      "fused layer stack: ", what, " must be a contiguous float32 CPU tensor");
}

// A LayerNorm's parameters.
struct Norm {
  const at::Tensor& weight;
  const at::Tensor& bias;
  double eps;
};

at::Tensor layer_norm(const at::Tensor& x, const Norm& norm) {
  return std::get<1>(
      add_layernorm_cpu(x, std::nullopt, std::nullopt, norm.weight, norm.bias, norm.eps, false));
}

// The layers' _residual_norm (seqfuse/layers/transformer.py): post-norm
// (y, y) with y = LN_own(residual + o + bias); pre-norm (s, LN_next(s)) with
// s = residual + o + bias. Returns (new x, normalised input of the next block).
std::tuple<at::Tensor, at::Tensor> residual_norm(const at::Tensor& o, const at::Tensor& bias,
                                                 const at::Tensor& residual, const Norm& own,
                                                 const Norm& next, bool pre_norm) {
  if (pre_norm) {
    return add_layernorm_cpu(o, bias, residual, next.weight, next.bias, next.eps, true);
  }
  at::Tensor y =
      std::get<1>(add_layernorm_cpu(o, bias, residual, own.weight, own.bias, own.eps, false));
  return {y, y};
}

// The layers' _ffn: fc2(act(fc1(h) + b1)) + b2 + residual, then (post-norm)
// LN_final.
at::Tensor feed_forward(const at::Tensor& h, const at::Tensor& residual, const at::Tensor& fc1,
                        const at::Tensor& b1, const at::Tensor& fc2, const at::Tensor& b2,
                        const Norm& final_norm, int64_t act, bool pre_norm, bool skip_zeros) {
  at::Tensor f = linear_packed_cpu(h, fc1, std::nullopt, b1.size(0));
  bias_act_cpu(f, b1, act);
  const at::Tensor o = linear_packed_cpu(f, fc2, std::nullopt, residual.size(1), skip_zeros);
  if (pre_norm) {
    return std::get<0>(add_layernorm_cpu(o, b2, residual, std::nullopt, std::nullopt, 1e-5, true));
  }
  return std::get<1>(add_layernorm_cpu(o, b2, residual, final_norm.weight, final_norm.bias,
                                       final_norm.eps, false));
}

// fc2's k lists for row blocks [bbegin, bend) from the flags of the bias +
// ReLU post-op (linear_packed_bias_relu_post): the lists
// linear_packed_nonzero_range makes from the activations themselves.
void lists_from_flags(const uint8_t* flags, int64_t K, int32_t* lists, int64_t bbegin,
                      int64_t bend) {
  for (int64_t b = bbegin; b < bend; ++b) {
    const uint8_t* fb = flags + b * K;
    int32_t* out = lists + b * (K + 1);
    out[0] = cpu_capability::append_flagged(fb, K, 0, out + 1, 0);
  }
}

// The bias + ReLU post-op's flags: grown, never shrunk, one buffer per calling thread.
uint8_t* nonzero_flags(int64_t bytes) {
  static thread_local std::vector<uint8_t> flags;
  if (flags.size() < static_cast<size_t>(bytes)) flags.resize(static_cast<size_t>(bytes));
  return flags.data();
}

// Each layer's self-attention K/V: one or more blocks of slots in slot order,
// [slots_b, rows_b, 2C] each, rows_b at most the tables' rows (a cache grows
// by a block, without moving what it holds: seqfuse/layers/kv_cache.py).
using KvBlocks = std::vector<std::vector<at::Tensor>>;

// The ops' form: one [slots, rows, 2C] tensor per layer.
KvBlocks one_block_each(at::TensorList self_kv) {
  KvBlocks blocks;
  blocks.reserve(self_kv.size());
  for (const at::Tensor& kv : self_kv) blocks.push_back({kv});
  return blocks;
}

// One layer's self-attention cache must take `n` rows at `slot`. Returns the
// rows of its tables (key padding [slots, rows]); fills each slot's K and V
// base pointers. A block may hold fewer rows than the tables (one added after
// finished rows left): every parent-table entry of the written slots must lie
// within its slot's block, and the new slot's block must hold the n rows.
int64_t check_self_cache(const std::vector<at::Tensor>& blocks, const at::Tensor& rows,
                         const at::Tensor& pad, int64_t slot, int64_t n, int64_t c,
                         std::vector<const void*>* k_slots, std::vector<const void*>* v_slots) {
  TORCH_CHECK(!blocks.empty(), "fused_decoder_step: a self cache without blocks");
  TORCH_CHECK(
      pad.dim() == 2 && pad.scalar_type() == at::kBool && pad.is_contiguous() && pad.is_cpu(),
      "fused_decoder_step: key padding must be a contiguous bool [slots, rows] tensor");
  const int64_t phys = pad.size(1);
  int64_t slots = 0;
  for (const at::Tensor& kv : blocks) {
    check_f32(kv, "a self-attention cache");
    TORCH_CHECK(kv.dim() == 3 && kv.size(1) <= phys && kv.size(2) == 2 * c,
                "fused_decoder_step: self cache blocks must be [slots, <=", phys, ", ", 2 * c,
                "], got ", kv.sizes());
    slots += kv.size(0);
  }
  TORCH_CHECK(slot < slots && n <= phys, "fused_decoder_step: self cache of ", slots, " slots x ",
              phys, " rows cannot take slot ", slot, " of ", n, " rows");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) >= n && rows.size(1) == slots &&
                  rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.is_cpu(),
              "fused_decoder_step: parent table must be int64 [>=", n, ", ", slots, "]");
  TORCH_CHECK(pad.size(0) == slots, "fused_decoder_step: key padding must be bool [", slots, ", ",
              phys, "]");
  k_slots->clear();
  v_slots->clear();
  std::vector<int64_t> limit;  // each slot's block rows
  for (const at::Tensor& kv : blocks) {
    const float* base = kv.data_ptr<float>();
    const int64_t r = kv.size(1);
    for (int64_t j = 0; j < kv.size(0) && static_cast<int64_t>(k_slots->size()) <= slot; ++j) {
      k_slots->push_back(base + j * r * 2 * c);
      v_slots->push_back(base + j * r * 2 * c + c);
      limit.push_back(r);
    }
  }
  TORCH_CHECK(n <= limit[slot], "fused_decoder_step: the block of slot ", slot, " holds ",
              limit[slot], " rows, the step has ", n);
  const int64_t* table = rows.data_ptr<int64_t>();
  bool ok = true;
  for (int64_t g = 0; g < n; ++g) {
    for (int64_t j = 0; j < slot; ++j) {
      const int64_t v = table[g * slots + j];
      ok &= v >= 0 && v < limit[j];
    }
  }
  TORCH_CHECK(ok, "kv_rows outside their blocks' rows");
  return phys;
}

// One layer's self-attention cache (checked by check_self_cache), written by
// the QKV product's post-op while a task's outputs are in L1: the task's K/V
// columns (those in [C, 3C) of qkv) to the slot's rows at `dst`, and, by the
// tasks of the first columns, each row's parent-table entry (itself) and key
// padding at `slot`. A new slot's pages are first touched here, by whichever
// thread takes the task.
struct SlotPost {
  const float* qkv;
  int64_t c;
  float* dst;
  int64_t* table;  // [rows, slots]
  int64_t slots;
  int64_t slot;
  bool* pad;  // the slot's key padding, [rows]
  const uint8_t* pad_new;
};

void slot_post(const void* ctx, int64_t /*block*/, int64_t m0, int64_t rows, int64_t n0,
               int64_t cols) {
  const SlotPost& p = *static_cast<const SlotPost*>(ctx);
  const int64_t c = p.c, lo = std::max(n0, c), hi = std::min(n0 + cols, 3 * c);
  if (lo < hi) {
    for (int64_t r = m0; r < m0 + rows; ++r) {
      std::memcpy(p.dst + r * 2 * c + (lo - c), p.qkv + r * 3 * c + lo,
                  sizeof(float) * static_cast<size_t>(hi - lo));
    }
  }
  if (n0 == 0) {
    for (int64_t r = m0; r < m0 + rows; ++r) {
      p.table[r * p.slots + p.slot] = r;
      p.pad[r] = p.pad_new != nullptr && p.pad_new[r] != 0;
    }
  }
}

// Each layer's encoder key padding, or none.
using PadList = std::vector<std::optional<at::Tensor>>;

PadList pad_list(const c10::List<std::optional<at::Tensor>>& list) {
  PadList out;
  out.reserve(list.size());
  for (size_t i = 0; i < list.size(); ++i) out.push_back(list.get(i));
  return out;
}

// A float32 tensor's data (checked by check_f32 or made here).
inline const float* fp(const at::Tensor& t) { return t.data_ptr<float>(); }

// A packed weight (pack_linear_weight) of an [n, k] projection.
void check_pack(const at::Tensor& pack, int64_t k, int64_t n, const char* what) {
  TORCH_CHECK(
      pack.dim() == 3 && pack.size(1) == k && pack.size(2) == 16 && pack.size(0) == (n + 15) / 16,
      "fused_decoder_step: ", what, " must be packed [", (n + 15) / 16, ", ", k, ", 16], got ",
      pack.sizes());
}
void check_vec(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fused_decoder_step: ", what, " must be [", n,
              "], got ", t.sizes());
}

}  // namespace

// x: [n, C] (the embedded step, one token per row). Returns (each layer's
// output [n, C], the alignment layer's cross-attention weights, or an
// undefined tensor when align_layer is no layer). The weights are per head,
// [heads, n, 1, S], when mean_heads < 0; otherwise their mean over the first
// mean_heads heads (all when more), [n, 1, S], summed head by head and
// divided by the head count as the decoder's _head_mean does
// (seqfuse/layers/fairseq.py).
//
// Every argument is checked first; the kernels then run on raw pointers into
// one workspace (no tensor is made, sliced or inspected between them: at a
// few rows per step that dispatcher work cost as much as a layer's GEMMs),
// inside one parallel region with a barrier between dependent ops.
namespace {
// fused_decoder_step with the step's key padding as bytes (pn: [n] or null).
std::tuple<std::vector<at::Tensor>, at::Tensor> decoder_step(
    const at::Tensor& x_in, at::TensorList params, at::ArrayRef<double> nums,
    const KvBlocks& self_kv, at::TensorList self_rows, at::TensorList self_pad, int64_t slot,
    const uint8_t* pn, at::TensorList cross_kv, at::TensorList cross_map, const PadList& cross_pad,
    int64_t q_per_kv, at::IntArrayRef heads, bool normalize_before, int64_t act,
    int64_t align_layer, int64_t mean_heads, const at::Tensor& mem) {
  const int64_t layers = static_cast<int64_t>(self_kv.size());
  TORCH_CHECK(layers > 0, "fused_decoder_step: no layers");
  TORCH_CHECK(static_cast<int64_t>(params.size()) == layers * kPerLayer &&
                  static_cast<int64_t>(nums.size()) == layers * kNumsPerLayer &&
                  static_cast<int64_t>(self_rows.size()) == layers &&
                  static_cast<int64_t>(self_pad.size()) == layers &&
                  static_cast<int64_t>(cross_kv.size()) == layers &&
                  static_cast<int64_t>(cross_map.size()) == layers &&
                  static_cast<int64_t>(cross_pad.size()) == layers &&
                  static_cast<int64_t>(heads.size()) == layers,
              "fused_decoder_step: per-layer lists of the wrong length");
  check_f32(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "fused_decoder_step: x must be [rows, channels]");
  const int64_t n = x_in.size(0), c = x_in.size(1);
  TORCH_CHECK(slot >= 0, "fused_decoder_step: negative slot");
  TORCH_CHECK(q_per_kv >= 1 && n % q_per_kv == 0, "fused_decoder_step: rows ", n,
              " not a multiple of q_per_kv ", q_per_kv);
  for (const at::Tensor& t : params) check_f32(t, "a layer parameter");
  // Each layer's physical rows and per-slot K and V pointers (slots to `slot`).
  std::vector<int64_t> self_phys(layers);
  std::vector<std::vector<const void*>> k_slots(layers), v_slots(layers);
  int64_t ffn = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = params.data() + l * kPerLayer;
    const int64_t f = w[kFc1Bias].dim() == 1 ? w[kFc1Bias].size(0) : 0;
    TORCH_CHECK(f > 0, "fused_decoder_step: fc1 bias must be [ffn]");
    ffn = std::max(ffn, f);
    TORCH_CHECK(heads[l] >= 1 && c % heads[l] == 0, "fused_decoder_step: channels ", c,
                " not divisible by heads ", heads[l]);
    check_pack(w[kQkvPack], c, 3 * c, "the QKV weight");
    check_vec(w[kQkvBias], 3 * c, "the QKV bias");
    check_pack(w[kSelfOutPack], c, c, "the self-attention output weight");
    check_pack(w[kCrossQPack], c, c, "the cross-attention query weight");
    check_pack(w[kCrossOutPack], c, c, "the cross-attention output weight");
    check_pack(w[kFc1Pack], c, f, "the fc1 weight");
    check_pack(w[kFc2Pack], f, c, "the fc2 weight");
    for (Slot v : {kSelfOutBias, kSelfLnW, kSelfLnB, kCrossQBias, kCrossOutBias, kCrossLnW,
                   kCrossLnB, kFc2Bias, kFinalLnW, kFinalLnB}) {
      check_vec(w[v], c, "a layer bias or norm parameter");
    }
    self_phys[l] = check_self_cache(self_kv[l], self_rows[l], self_pad[l], slot, n, c, &k_slots[l],
                                    &v_slots[l]);
    const at::Tensor& ckv = cross_kv[l];
    TORCH_CHECK(ckv.dim() == 3 && ckv.size(2) == 2 * c && ckv.scalar_type() == at::kFloat &&
                    ckv.device().is_cpu() && ckv.stride(2) == 1,
                "fused_decoder_step: encoder K/V must be float32 [S, sentences, ", 2 * c, "]");
    const at::Tensor& map = cross_map[l];
    TORCH_CHECK(map.scalar_type() == at::kLong && map.dim() == 1 && map.size(0) == n / q_per_kv &&
                    map.is_cpu(),
                "fused_decoder_step: cross-attention row map must be int64 [", n / q_per_kv, "]");
    const std::optional<at::Tensor>& cp = cross_pad[l];
    if (cp.has_value()) {
      TORCH_CHECK((cp->scalar_type() == at::kBool || cp->scalar_type() == at::kByte) &&
                      cp->device().is_cpu() && cp->dim() == 2 && cp->size(0) == ckv.size(1) &&
                      cp->size(1) == ckv.size(0),
                  "fused_decoder_step: encoder padding must be bool [", ckv.size(1), ", ",
                  ckv.size(0), "], got ", cp->sizes());
    }
  }

  // Workspace: qkv [n, 3C], then [n, C] each: hin, attention output, GEMM
  // output, x after self- and cross-attention, their normalised copies, the
  // cross query; then fc1's [n, F]. Layer outputs go to `out` [layers, n, C].
  // Both are carved from `mem` when the caller passes one (a flat float32
  // buffer: `out` first, then the workspace), else allocated here.
  const int64_t nc = n * c;
  const int64_t ws_n = n * (3 * c + 8 * c + ffn);
  at::Tensor block = mem;
  if (block.defined()) {
    TORCH_CHECK(block.dim() == 1 && block.is_contiguous() && block.scalar_type() == at::kFloat &&
                    block.device().is_cpu() && block.numel() >= ws_n + layers * nc,
                "fused_decoder_step: step memory too small");
  } else {
    block = at::empty({ws_n + layers * nc}, x_in.options());
  }
  const at::Tensor ws = block.narrow(0, layers * nc, ws_n);
  float* qkv = ws.data_ptr<float>();
  float* hin = qkv + 3 * nc;
  float* attn_out = hin + nc;
  float* gemm_out = attn_out + nc;
  float* x_self = gemm_out + nc;
  float* n_self = x_self + nc;
  float* x_cross = n_self + nc;
  float* n_cross = x_cross + nc;
  float* q = n_cross + nc;
  float* fc1 = q + nc;
  const at::Tensor out = block.narrow(0, 0, layers * nc).view({layers, n, c});

  // Each layer's attention calls, set up and bound-checked before any kernel
  // runs (the self-attention's new slot holds row r for row r: in range).
  std::vector<kernels::AttentionParams> self_attn(layers), cross_attn(layers);
  at::Tensor align;
  int64_t s_max = slot + 1, h_max = 1;
  for (int64_t l = 0; l < layers; ++l) {
    const double* num = nums.data() + l * kNumsPerLayer;
    const int64_t h = heads[l];
    h_max = std::max(h_max, h);
    const int64_t phys = self_phys[l], slots = self_rows[l].size(1);
    kernels::AttentionParams& sa = self_attn[l];
    sa = kernels::AttentionParams{};
    sa.q = qkv;
    sa.q_st = n * 3 * c;
    sa.q_sn = 3 * c;
    sa.k = k_slots[l][0];  // slots by k_slots / v_slots (blocks)
    sa.k_ss = 0;
    sa.k_sm = 2 * c;
    sa.v = v_slots[l][0];
    sa.v_ss = 0;
    sa.v_sm = 2 * c;
    sa.k_slots = k_slots[l].data();
    sa.v_slots = v_slots[l].data();
    sa.rows = self_rows[l].data_ptr<int64_t>();
    sa.rows_sg = slots;
    sa.rows_sj = 1;
    sa.pad = reinterpret_cast<const uint8_t*>(self_pad[l].data_ptr<bool>());
    sa.pad_sm = 1;
    sa.pad_sj = phys;
    sa.out = attn_out;
    sa.weights = nullptr;
    sa.tq = 1;
    sa.n = n;
    sa.s = slot;  // the slots written before this step, for the check
    sa.heads = h;
    sa.dim = c / h;
    sa.q_per_kv = 1;
    sa.causal_offset = -1;
    sa.scaling = static_cast<float>(num[kSelfScaling]);
    sa.s = slot + 1;  // rows checked by check_self_cache

    const at::Tensor& ckv = cross_kv[l];
    const int64_t src = ckv.size(0), sents = ckv.size(1);
    s_max = std::max(s_max, src);
    const bool want_weights = l == align_layer;
    if (want_weights) align = at::empty({h, n, 1, src}, x_in.options());
    kernels::AttentionParams& ca = cross_attn[l];
    ca = kernels::AttentionParams{};
    ca.q = q;
    ca.q_st = nc;
    ca.q_sn = c;
    ca.k = fp(ckv);
    ca.k_ss = ckv.stride(0);
    ca.k_sm = ckv.stride(1);
    ca.v = fp(ckv) + c;
    ca.v_ss = ckv.stride(0);
    ca.v_sm = ckv.stride(1);
    ca.rows = cross_map[l].data_ptr<int64_t>();
    ca.rows_sg = cross_map[l].stride(0);
    ca.rows_sj = 0;
    const std::optional<at::Tensor>& cp = cross_pad[l];
    ca.pad = cp.has_value() ? reinterpret_cast<const uint8_t*>(cp->data_ptr()) : nullptr;
    ca.pad_sm = cp.has_value() ? cp->stride(0) : 0;
    ca.pad_sj = cp.has_value() ? cp->stride(1) : 0;
    ca.out = attn_out;
    ca.weights = want_weights ? align.data_ptr<float>() : nullptr;
    ca.tq = 1;
    ca.n = n;
    ca.s = src;
    ca.heads = h;
    ca.dim = c / h;
    ca.q_per_kv = q_per_kv;
    ca.causal_offset = -1;
    ca.scaling = static_cast<float>(num[kCrossScaling]);
    check_attention_rows(ca, sents);
  }

  // One parallel region for the whole stack: every op splits its tasks (GEMM
  // tasks, rows, attention rows) over the threads and a barrier ends it,
  // instead of a fork and join per op (about 2 us each here, two dozen per
  // step). The products and attentions hand out chunks to whichever thread
  // is free (cpu/task_queue.h), the short row ops split evenly. Each output
  // is computed by the same code whichever thread takes it: bit-identical to
  // the op-by-op path.
  const int threads = std::max(1, at::get_num_threads());
  const int64_t scratch_f = h_max * s_max + 2 * c;
  std::vector<float> scratch(static_cast<size_t>(threads * scratch_f));
  std::vector<int64_t> scratch_i(static_cast<size_t>(threads * s_max));
  // Row block heights (raises here when no packed kernel exists): the dense
  // products' and the zero-skipping FFN pair's (fc1's post-op notes its
  // nonzero columns per block of fc2's).
  const int64_t dense_rows = linear_packed_block_rows(false);
  const int64_t skip_rows = linear_packed_block_rows(true);
  const int64_t skip_blocks = linear_packed_row_block_count(n, skip_rows);
  int32_t* ffn_lists = zero_skip_lists(n, ffn);  // fc2's k lists (taken on every layer)
  uint8_t* ffn_flags = nonzero_flags(skip_blocks * ffn);
  // With enough row blocks for every thread, the attentions, their output
  // projections and the layer norms after them (and fc2 with its lists and
  // norm) run by row blocks, each block through all three on one thread
  // without a barrier between them (6 barriers a layer instead of 12; the
  // same kernels on the same rows, so the same bits). With few blocks the
  // products' column split balances the threads better: the ops stay apart.
  const int64_t dense_blocks = linear_packed_row_block_count(n, dense_rows);
  const bool by_rows = dense_blocks >= 4 * threads && skip_blocks >= 4 * threads;
  // Per layer: four attention-block products, two attentions, two FFN products.
  const int64_t queue_count = layers * 8;
  std::unique_ptr<cpu::TaskQueue[]> queues(new cpu::TaskQueue[queue_count]);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int tid = 0, nt = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    // [b, e) of `count` tasks for this thread (at::parallel_for's even split)
    const auto part = [tid, nt](int64_t count, int64_t* b, int64_t* e) {
      const int64_t chunk = (count + nt - 1) / nt;
      *b = std::min<int64_t>(count, tid * chunk);
      *e = std::min<int64_t>(count, *b + chunk);
    };
    // The products and the attention take chunks from the phase's queue
    // (cpu/task_queue.h): every thread passes the same phases in the same
    // order, so its own count of them names the phase's queue.
    int64_t phase = 0;
    // min_chunk < 0: chunks of one task (row blocks, each long enough that the
    // shared counter costs nothing next to it).
    const auto run_queued = [&](int64_t count, int64_t min_chunk, const auto& fn) {
      cpu::TaskQueue& queue = queues[phase++];
      const int64_t chunk = min_chunk < 0 ? 1 : cpu::task_chunk(count, nt, min_chunk);
      int64_t b, e;
      while (queue.next(count, chunk, &b, &e)) fn(b, e);
    };
    // `rows`: the block height, dense_rows but for the zero-skipping pair.
    const auto gemm = [&](const float* a, int64_t k, const at::Tensor& pack, int64_t m,
                          const float* bias, float* y, int64_t rows, const int32_t* lists = nullptr,
                          const cpu_capability::LinearPost* post = nullptr) {
      run_queued(linear_packed_task_count(n, m, rows), 1, [&](int64_t b, int64_t e) {
        linear_packed_run_range(a, n, k, k, fp(pack), m, bias, y, rows, b, e, lists, post);
      });
    };
    // Rows [r0, r1) of an add + layer norm (this thread's even share when r0 < 0).
    const auto rows_ln = [&](const float* a, const float* bias, const float* res, const float* g,
                             const float* beta, double eps, float* sum, float* normed,
                             int64_t r0 = -1, int64_t r1 = -1) {
      if (r0 < 0) part(n, &r0, &r1);
      kernels::AddLayerNormParams p{a,   bias,   res, g, beta,
                                    sum, normed, n,   c, static_cast<float>(eps)};
      add_layernorm_range_f32(p, r0, r1);
    };
    // The layers' _residual_norm on gemm_out (rows [r0, r1), or this thread's
    // share): pre-norm (s, LN_next(s)), post-norm LN_own(residual + o + bias)
    // as both. Writes the new x to x_new and returns the next block's input.
    const auto residual_norm_rows =
        [&](const at::Tensor& bias, const float* residual, const Norm& own, const Norm& next,
            float* x_new, float* normed, int64_t r0 = -1, int64_t r1 = -1) -> const float* {
      if (normalize_before) {
        rows_ln(gemm_out, fp(bias), residual, fp(next.weight), fp(next.bias), next.eps, x_new,
                normed, r0, r1);
        return normed;
      }
      rows_ln(gemm_out, fp(bias), residual, fp(own.weight), fp(own.bias), own.eps, nullptr, x_new,
              r0, r1);
      return x_new;
    };
    float* sc = scratch.data() + tid * scratch_f;
    int64_t* ph = scratch_i.data() + tid * s_max;
    const auto attend = [&](const kernels::AttentionParams& p) {
      run_queued(n, 2, [&](int64_t b, int64_t e) {
        attention_range_run_f32(p, b, e, sc, ph, sc + h_max * s_max, sc + h_max * s_max + c);
      });
    };
    // An attention, its output projection (no bias) and the residual norm:
    // one phase by row blocks when by_rows, else three. Returns the next
    // block's input (x_new or normed).
    const auto attention_block = [&](const kernels::AttentionParams& p, const at::Tensor& out_pack,
                                     const at::Tensor& out_bias, const float* residual,
                                     const Norm& own, const Norm& next, float* x_new,
                                     float* normed) -> const float* {
      if (!by_rows) {
        attend(p);
#pragma omp barrier
        gemm(attn_out, c, out_pack, c, nullptr, gemm_out, dense_rows);
#pragma omp barrier
        return residual_norm_rows(out_bias, residual, own, next, x_new, normed);
      }
      run_queued(dense_blocks, -1, [&](int64_t b, int64_t e) {
        const int64_t r0 = b * dense_rows, r1 = std::min(n, e * dense_rows);
        attention_range_run_f32(p, r0, r1, sc, ph, sc + h_max * s_max, sc + h_max * s_max + c);
        linear_packed_run_blocks(attn_out, n, c, c, fp(out_pack), c, nullptr, gemm_out, dense_rows,
                                 b, e);
        residual_norm_rows(out_bias, residual, own, next, x_new, normed, r0, r1);
      });
      return normalize_before ? normed : x_new;
    };

    const float* x = fp(x_in);
    for (int64_t l = 0; l < layers; ++l) {
      const at::Tensor* w = params.data() + l * kPerLayer;
      const double* num = nums.data() + l * kNumsPerLayer;
      const int64_t f = w[kFc1Bias].size(0);
      const Norm self_norm{w[kSelfLnW], w[kSelfLnB], num[kSelfEps]};
      const Norm cross_norm{w[kCrossLnW], w[kCrossLnB], num[kCrossEps]};
      const Norm final_norm{w[kFinalLnW], w[kFinalLnB], num[kFinalEps]};
      float* x_out = out.data_ptr<float>() + l * nc;
      // The FFN's residual add (pre-norm) or add + final norm (post-norm) on
      // gemm_out, rows [r0, r1) (this thread's share when r0 < 0).
      const auto final_norm_rows = [&](int64_t r0, int64_t r1) {
        if (normalize_before) {
          rows_ln(gemm_out, fp(w[kFc2Bias]), x, nullptr, nullptr, 1e-5, x_out, nullptr, r0, r1);
        } else {
          rows_ln(gemm_out, fp(w[kFc2Bias]), x, fp(final_norm.weight), fp(final_norm.bias),
                  final_norm.eps, nullptr, x_out, r0, r1);
        }
      };

      // Self-attention over the cache (pre-norm: normalise x first).
      const float* in = x;
      if (normalize_before) {
        rows_ln(x, nullptr, nullptr, fp(self_norm.weight), fp(self_norm.bias), self_norm.eps,
                nullptr, hin);
        in = hin;
#pragma omp barrier
      }
      {
        // The product writes the step's K/V into the cache slot as it goes.
        const SlotPost slot_ctx{qkv,
                                c,
                                const_cast<float*>(static_cast<const float*>(k_slots[l][slot])),
                                self_rows[l].data_ptr<int64_t>(),
                                self_rows[l].size(1),
                                slot,
                                self_pad[l].data_ptr<bool>() + slot * self_phys[l],
                                pn};
        const cpu_capability::LinearPost slot_write{&slot_post, &slot_ctx};
        gemm(in, c, w[kQkvPack], 3 * c, fp(w[kQkvBias]), qkv, dense_rows, nullptr, &slot_write);
      }
#pragma omp barrier
      const float* normed = attention_block(self_attn[l], w[kSelfOutPack], w[kSelfOutBias], x,
                                            self_norm, cross_norm, x_self, n_self);
      x = x_self;
#pragma omp barrier

      // Cross-attention over the encoder K/V (one set per source sentence).
      gemm(normed, c, w[kCrossQPack], c, fp(w[kCrossQBias]), q, dense_rows);
#pragma omp barrier
      normed = attention_block(cross_attn[l], w[kCrossOutPack], w[kCrossOutBias], x, cross_norm,
                               final_norm, x_cross, n_cross);
      x = x_cross;
#pragma omp barrier

      // FFN: fc2(act(fc1(h) + b1)) + b2 + residual, then (post-norm) LN_final
      // (with fc2 by row blocks when normed_by_blocks).
      bool normed_by_blocks = false;
      if (num[kFc2SkipZeros] != 0.0 && act == kernels::kActRelu) {
        // fc1's tasks add the bias and apply the ReLU to their outputs as
        // they store them (bias_act's float ops: the same bits) and note,
        // per row block, the columns that are nonzero in some row; fc2's k
        // lists are read off those notes (the lists the activations give).
        const cpu_capability::BiasReluCtx ctx{fc1, fp(w[kFc1Bias]), f, ffn_flags};
        const cpu_capability::LinearPost post = linear_packed_bias_relu_post(&ctx);
        gemm(normed, c, w[kFc1Pack], f, nullptr, fc1, skip_rows, nullptr, &post);
#pragma omp barrier
        if (by_rows) {
          // fc2's lists, fc2 and the final norm by row blocks, one phase.
          run_queued(skip_blocks, -1, [&](int64_t b, int64_t e) {
            lists_from_flags(ffn_flags, f, ffn_lists, b, e);
            linear_packed_run_blocks(fc1, n, f, f, fp(w[kFc2Pack]), c, nullptr, gemm_out, skip_rows,
                                     b, e, ffn_lists);
            final_norm_rows(b * skip_rows, std::min(n, e * skip_rows));
          });
          normed_by_blocks = true;
        } else {
          int64_t b, e;
          part(skip_blocks, &b, &e);
          lists_from_flags(ffn_flags, f, ffn_lists, b, e);
#pragma omp barrier
          gemm(fc1, f, w[kFc2Pack], c, nullptr, gemm_out, skip_rows, ffn_lists);
        }
      } else {
        gemm(normed, c, w[kFc1Pack], f, nullptr, fc1, dense_rows);
#pragma omp barrier
        {
          int64_t b, e;
          part(n, &b, &e);
          kernels::BiasActParams ba{fc1, fp(w[kFc1Bias]), n, f, static_cast<int>(act)};
          bias_act_range_f32(ba, b, e);
        }
#pragma omp barrier
        if (num[kFc2SkipZeros] != 0.0) {
          // fc2 skips, per row block, the activations that are zero in
          // every row: the lists first, then the product.
          int64_t b, e;
          part(skip_blocks, &b, &e);
          linear_packed_nonzero_range(fc1, n, f, f, skip_rows, ffn_lists, b, e);
#pragma omp barrier
          gemm(fc1, f, w[kFc2Pack], c, nullptr, gemm_out, skip_rows, ffn_lists);
        } else {
          gemm(fc1, f, w[kFc2Pack], c, nullptr, gemm_out, dense_rows);
        }
      }
      if (!normed_by_blocks) {
#pragma omp barrier
        final_norm_rows(-1, -1);
      }
      x = x_out;
#pragma omp barrier
    }
  }
  std::vector<at::Tensor> outputs;
  outputs.reserve(layers);
  for (int64_t l = 0; l < layers; ++l) outputs.push_back(out[l]);
  if (align.defined() && mean_heads >= 0) {
    // The decoder's _head_mean: head 0, plus each further head in order,
    // then divided by the count.
    const int64_t count = std::min(mean_heads, align.size(0));
    TORCH_CHECK(count > 0, "fused_decoder_step: no heads to average");
    const int64_t per = align.numel() / align.size(0);
    at::Tensor mean = at::empty({n, 1, align.size(3)}, align.options());
    const float* a = align.data_ptr<float>();
    float* m = mean.data_ptr<float>();
    const float div = static_cast<float>(count);
    for (int64_t i = 0; i < per; ++i) {
      float acc = a[i];
      for (int64_t hh = 1; hh < count; ++hh) acc += a[hh * per + i];
      m[i] = acc / div;
    }
    align = mean;
  }
  return {outputs, align};
}
}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> fused_decoder_step(
    const at::Tensor& x_in, at::TensorList params, at::ArrayRef<double> nums,
    at::TensorList self_kv, at::TensorList self_rows, at::TensorList self_pad, int64_t slot,
    const std::optional<at::Tensor>& pad_new, at::TensorList cross_kv, at::TensorList cross_map,
    const c10::List<std::optional<at::Tensor>>& cross_pad, int64_t q_per_kv, at::IntArrayRef heads,
    bool normalize_before, int64_t act, int64_t align_layer, int64_t mean_heads) {
  const uint8_t* pn = nullptr;
  if (pad_new.has_value()) {
    TORCH_CHECK(pad_new->scalar_type() == at::kBool && pad_new->is_contiguous() &&
                    pad_new->numel() == x_in.size(0),
                "fused_decoder_step: step padding must be a contiguous bool [", x_in.size(0), "]");
    pn = reinterpret_cast<const uint8_t*>(pad_new->data_ptr<bool>());
  }
  return decoder_step(x_in, params, nums, one_block_each(self_kv), self_rows, self_pad, slot, pn,
                      cross_kv, cross_map, pad_list(cross_pad), q_per_kv, heads, normalize_before,
                      act, align_layer, mean_heads, at::Tensor());
}

namespace {
// Whether `arena` can hold a step's memory of `need` floats: a flat float32
// CPU buffer of at least `need` and at most 9/8 of that (a larger one is
// replaced, so that memory follows the rows still decoding; the caller drops
// such a buffer before the step, DecoderLogitsPlan.step_memory_fits) that
// nothing but the caller's own reference points into. The last step's logits are a view
// of it: while the caller still holds them, the step takes new memory (so
// does every step once Python has made a storage object of the buffer,
// which keeps a reference for as long as the buffer lives).
bool arena_usable(const std::optional<at::Tensor>& arena, int64_t need) {
  if (!arena.has_value() || !arena->defined()) return false;
  const at::Tensor& a = *arena;
  return a.dim() == 1 && a.is_contiguous() && a.scalar_type() == at::kFloat &&
         a.device().is_cpu() && a.storage_offset() == 0 && a.numel() >= need &&
         a.numel() * 8 <= need * 9 && a.storage().use_count() == 1 &&
         a.storage().nbytes() == static_cast<size_t>(a.numel()) * sizeof(float);
}

// The widest fc1 of the layers (0 when the list is malformed: the step's own
// checks then raise).
int64_t widest_ffn(at::TensorList params, int64_t layers) {
  if (static_cast<int64_t>(params.size()) != layers * kPerLayer) return 0;
  int64_t ffn = 0;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& b = params[l * kPerLayer + kFc1Bias];
    if (b.dim() == 1) ffn = std::max(ffn, b.size(0));
  }
  return ffn;
}

// Floats of a step's memory for n rows: decoder_step's layer outputs, then
// its workspace, whose place the logits and their group maxima take once the
// layers are done (the step holds no more at once than when each was
// allocated on its own).
int64_t step_memory_floats(int64_t n, int64_t c, at::TensorList params, int64_t layers,
                           int64_t vocab) {
  return layers * n * c + std::max(n * (11 * c + widest_ffn(params, layers)),
                                   n * (vocab + kernels::num_max_groups(vocab)));
}

// What decoder_logits gives: the logits [n, vocab], the step's attention,
// the buffer used, and (when asked for) the logits' group maxima [n,
// num_max_groups(vocab)] (beam_topk_maxima's); the buffer holds the logits
// and the maxima.
struct StepLogits {
  at::Tensor logits, align, memory, maxima;
};

// fused_decoder_logits (below) on its arguments, for the op and for a
// DecoderLogitsPlan's step. tokens: [n, t] int64, the step's tokens in
// column t - 1. The step's workspace, layer outputs and logits are carved
// from `arena` when it can hold them (arena_usable), else from a new buffer.
// with_maxima: the vocabulary projection also notes the logits' group maxima.
StepLogits decoder_logits(const at::Tensor& tokens, const at::Tensor& embed, double embed_scale,
                          const std::optional<at::Tensor>& pos_table, int64_t pad, int64_t pos_mode,
                          int64_t fixed_pos, at::TensorList norms, bool has_emb_ln,
                          bool has_final_ln, at::ArrayRef<double> norm_eps, at::TensorList params,
                          at::ArrayRef<double> nums, const KvBlocks& self_kv,
                          at::TensorList self_rows, at::TensorList self_pad, int64_t slot,
                          at::TensorList cross_kv, at::TensorList cross_map,
                          const PadList& cross_pad, int64_t q_per_kv, at::IntArrayRef heads,
                          bool normalize_before, int64_t act, int64_t align_layer,
                          int64_t mean_heads, const at::Tensor& out_pack,
                          const std::optional<at::Tensor>& out_bias, int64_t vocab,
                          const std::optional<at::Tensor>& arena, bool with_maxima) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) >= 1 && tokens.scalar_type() == at::kLong &&
                  tokens.is_cpu(),
              "fused_decoder_logits: tokens must be int64 [rows, steps]");
  const int64_t n_norms = (has_emb_ln ? 2 : 0) + (has_final_ln ? 2 : 0);
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == n_norms &&
                  static_cast<int64_t>(norm_eps.size()) == n_norms / 2,
              "fused_decoder_logits: norm lists of the wrong length");
  const int64_t n = tokens.size(0);
  const at::Tensor last = tokens.size(1) == 1 ? tokens : tokens.narrow(1, tokens.size(1) - 1, 1);
  at::Tensor x = embedding_cpu(last, embed, embed_scale, pos_table, pad, pos_mode, fixed_pos,
                               false);  // [1, n, C]
  const int64_t c = x.size(2);
  x = x.view({n, c});
  int64_t k = 0;
  if (has_emb_ln) {
    check_f32(norms[0], "the embedding norm weight");
    x = layer_norm(x, Norm{norms[0], norms[1], norm_eps[0]});
    k = 2;
  }
  std::vector<uint8_t> step_pad(static_cast<size_t>(n));
  const int64_t* tok = last.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) step_pad[r] = tok[r * last.stride(0)] == pad;
  const int64_t layers = static_cast<int64_t>(self_kv.size());
  TORCH_CHECK(vocab > 0, "fused_decoder_logits: vocab must be positive");
  const int64_t need = step_memory_floats(n, c, params, layers, vocab);
  const int64_t outs_n = layers * n * c;
  const at::Tensor mem = arena_usable(arena, need) ? *arena : at::empty({need}, x.options());
  auto [outs, align] = decoder_step(x, params, nums, self_kv, self_rows, self_pad, slot,
                                    step_pad.data(), cross_kv, cross_map, cross_pad, q_per_kv,
                                    heads, normalize_before, act, align_layer, mean_heads, mem);
  x = outs.back();
  outs.clear();
  if (has_final_ln) {
    check_f32(norms[k], "the final norm weight");
    x = layer_norm(x, Norm{norms[k], norms[k + 1], norm_eps[k / 2]});
  }
  // Over the workspace: the layers are done with it; x is the last layer's
  // output (before the workspace) or the final norm's own tensor.
  at::Tensor logits = mem.narrow(0, outs_n, n * vocab).view({n, vocab});
  if (!with_maxima) {
    linear_packed_out_cpu(x, out_pack, out_bias, vocab, logits);
    return {logits, align, mem, at::Tensor()};
  }
  const int64_t groups = kernels::num_max_groups(vocab);
  at::Tensor maxima = mem.narrow(0, outs_n + n * vocab, n * groups).view({n, groups});
  linear_packed_maxima_out_cpu(x, out_pack, out_bias, vocab, logits, maxima);
  return {logits, align, mem, maxima};
}
}  // namespace

// The whole network of an incremental decoder step (the fused decoder's
// extract_features_scriptable + output_layer, seqfuse/layers/fairseq.py):
// tokens [n, 1] -> embedding (scale, positions at fixed_pos) -> optional
// embedding layer norm -> fused_decoder_step (the step's key padding is
// tokens == pad) -> optional final layer norm -> vocabulary projection with
// the packed weight. The same kernels in the same order as that Python path,
// so bit-identical. `norms` holds the embedding norm's weight and bias (or
// nothing), then the final norm's (or nothing): has_emb_ln / has_final_ln say
// which. Returns (logits [n, vocab], fused_decoder_step's attention).
std::tuple<at::Tensor, at::Tensor> fused_decoder_logits(
    const at::Tensor& tokens, const at::Tensor& embed, double embed_scale,
    const std::optional<at::Tensor>& pos_table, int64_t pad, int64_t pos_mode, int64_t fixed_pos,
    at::TensorList norms, bool has_emb_ln, bool has_final_ln, at::ArrayRef<double> norm_eps,
    at::TensorList params, at::ArrayRef<double> nums, at::TensorList self_kv,
    at::TensorList self_rows, at::TensorList self_pad, int64_t slot, at::TensorList cross_kv,
    at::TensorList cross_map, const c10::List<std::optional<at::Tensor>>& cross_pad,
    int64_t q_per_kv, at::IntArrayRef heads, bool normalize_before, int64_t act,
    int64_t align_layer, int64_t mean_heads, const at::Tensor& out_pack,
    const std::optional<at::Tensor>& out_bias, int64_t vocab) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == 1,
              "fused_decoder_logits: tokens must be int64 [rows, 1]");
  StepLogits got = decoder_logits(
      tokens, embed, embed_scale, pos_table, pad, pos_mode, fixed_pos, norms, has_emb_ln,
      has_final_ln, norm_eps, params, nums, one_block_each(self_kv), self_rows, self_pad, slot,
      cross_kv, cross_map, pad_list(cross_pad), q_per_kv, heads, normalize_before, act, align_layer,
      mean_heads, out_pack, out_bias, vocab, std::nullopt, false);
  return {got.logits, got.align};
}

// fused_decoder_logits with the arguments that stay fixed for a generation
// (weights, packs, norms, shapes) held by one object, so that a step passes
// only the tokens and the caches: called from Python through pybind11, it
// skips the dispatcher's boxing of some ninety list elements per step (25 us
// and more at a few rows per step, where the step itself takes 0.4 ms). The
// same kernels in the same order, so bit-identical to the op.
class DecoderLogitsPlan {
 public:
  DecoderLogitsPlan(at::Tensor embed, double embed_scale, int64_t pad,
                    std::vector<at::Tensor> norms, bool has_emb_ln, bool has_final_ln,
                    std::vector<double> norm_eps, std::vector<at::Tensor> params,
                    std::vector<double> nums, std::vector<int64_t> heads, bool normalize_before,
                    int64_t act, at::Tensor out_pack, std::optional<at::Tensor> out_bias,
                    int64_t vocab)
      : embed_(std::move(embed)),
        embed_scale_(embed_scale),
        pad_(pad),
        norms_(std::move(norms)),
        has_emb_ln_(has_emb_ln),
        has_final_ln_(has_final_ln),
        norm_eps_(std::move(norm_eps)),
        params_(std::move(params)),
        nums_(std::move(nums)),
        heads_(std::move(heads)),
        normalize_before_(normalize_before),
        act_(act),
        out_pack_(std::move(out_pack)),
        out_bias_(std::move(out_bias)),
        vocab_(vocab) {
    TORCH_CHECK(!heads_.empty(), "DecoderLogitsPlan: no layers");
    check_f32(embed_, "the embedding table");
  }

  // tokens: [n, t] (the step's tokens in the last column); cross_n: each
  // layer's count of mapped sentences, which must be n / q_per_kv; arena:
  // the buffer the last step returned, or None. Returns (logits [n, vocab],
  // the last layer's head-averaged attention [n, S], the step's buffer: pass
  // it to the next step, after letting go of these logits, which are a view
  // of it).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> step(
      const at::Tensor& tokens, const std::optional<at::Tensor>& pos_table, int64_t pos_mode,
      int64_t fixed_pos, const KvBlocks& self_kv, const std::vector<at::Tensor>& self_rows,
      const std::vector<at::Tensor>& self_pad, int64_t slot,
      const std::vector<at::Tensor>& cross_kv, const std::vector<at::Tensor>& cross_map,
      const std::vector<int64_t>& cross_n, const PadList& cross_pad, int64_t q_per_kv,
      const std::optional<at::Tensor>& arena) const {
    StepLogits got =
        step_logits(tokens, pos_table, pos_mode, fixed_pos, self_kv, self_rows, self_pad, slot,
                    cross_kv, cross_map, cross_n, cross_pad, q_per_kv, arena, false);
    return {got.logits, got.align, got.memory};
  }

  // Steps of a beam search over this plan's network (csrc/search_lane.h):
  // each step's network is step() over the lane's caches, its candidates
  // taken with the logits' group maxima.
  void search(SearchLane& lane, int64_t max_steps) const {
    const LaneNetwork net = [this](const SearchLane& L, const at::Tensor& tokens) {
      const std::vector<int64_t> cross_n(L.cross_map.size(), L.cross_n);
      StepLogits got = step_logits(tokens, L.pos_table, L.pos_mode, L.pos_pad + tokens.size(1),
                                   L.self_blocks, L.self_rows, L.self_pad, L.slot, L.cross_kv,
                                   L.cross_map, cross_n, L.cross_pad, L.q_per_kv, L.arena, true);
      return LaneStep{got.logits, got.align, got.memory, got.maxima};
    };
    const LaneMemoryFits fits = [this](const at::Tensor& memory, int64_t rows) {
      return step_memory_fits(memory, rows);
    };
    run_search_lane(lane, net, fits, max_steps);
  }

  // Whether a step of n rows would carve its memory from `memory`
  // (arena_usable): a buffer of the last step that will not serve is best
  // dropped before the step, which then allocates its own.
  bool step_memory_fits(const at::Tensor& memory, int64_t n) const {
    return arena_usable(memory, step_memory_floats(n, embed_.size(1), params_,
                                                   static_cast<int64_t>(heads_.size()), vocab_));
  }

 private:
  // step(), the attention of its one query, and the logits' group maxima
  // when with_maxima.
  StepLogits step_logits(const at::Tensor& tokens, const std::optional<at::Tensor>& pos_table,
                         int64_t pos_mode, int64_t fixed_pos, const KvBlocks& self_kv,
                         const std::vector<at::Tensor>& self_rows,
                         const std::vector<at::Tensor>& self_pad, int64_t slot,
                         const std::vector<at::Tensor>& cross_kv,
                         const std::vector<at::Tensor>& cross_map,
                         const std::vector<int64_t>& cross_n, const PadList& cross_pad,
                         int64_t q_per_kv, const std::optional<at::Tensor>& arena,
                         bool with_maxima) const {
    RECORD_FUNCTION("seqfuse::DecoderLogitsPlan.step", std::vector<c10::IValue>());
    TORCH_CHECK(tokens.dim() == 2 && q_per_kv >= 1, "DecoderLogitsPlan.step: bad arguments");
    const int64_t sents = tokens.size(0) / q_per_kv;
    TORCH_CHECK(cross_map.size() == cross_n.size(),
                "DecoderLogitsPlan.step: per-layer lists of the wrong length");
    std::vector<at::Tensor> maps;
    maps.reserve(cross_map.size());
    for (size_t l = 0; l < cross_map.size(); ++l) {
      TORCH_CHECK(cross_n[l] == sents && cross_map[l].dim() == 1 && cross_map[l].size(0) >= sents,
                  "DecoderLogitsPlan.step: cross-attention map of layer ", l, " holds ", cross_n[l],
                  " sentences, the step has ", sents);
      maps.push_back(cross_map[l].size(0) == sents ? cross_map[l]
                                                   : cross_map[l].narrow(0, 0, sents));
    }
    StepLogits got =
        decoder_logits(tokens, embed_, embed_scale_, pos_table, pad_, pos_mode, fixed_pos, norms_,
                       has_emb_ln_, has_final_ln_, norm_eps_, params_, nums_, self_kv, self_rows,
                       self_pad, slot, cross_kv, maps, cross_pad, q_per_kv, heads_,
                       normalize_before_, act_, static_cast<int64_t>(heads_.size()) - 1,
                       /*mean_heads: all*/ std::numeric_limits<int64_t>::max(), out_pack_,
                       out_bias_, vocab_, arena, with_maxima);
    got.align = got.align.select(1, 0);
    return got;
  }

  at::Tensor embed_;
  double embed_scale_;
  int64_t pad_;
  std::vector<at::Tensor> norms_;
  bool has_emb_ln_, has_final_ln_;
  std::vector<double> norm_eps_;
  std::vector<at::Tensor> params_;
  std::vector<double> nums_;
  std::vector<int64_t> heads_;
  bool normalize_before_;
  int64_t act_;
  at::Tensor out_pack_;
  std::optional<at::Tensor> out_bias_;
  int64_t vocab_;
};

void bind_fused_stack(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<DecoderLogitsPlan>(m, "DecoderLogitsPlan")
      .def(py::init<at::Tensor, double, int64_t, std::vector<at::Tensor>, bool, bool,
                    std::vector<double>, std::vector<at::Tensor>, std::vector<double>,
                    std::vector<int64_t>, bool, int64_t, at::Tensor, std::optional<at::Tensor>,
                    int64_t>())
      .def("step", &DecoderLogitsPlan::step, py::call_guard<py::gil_scoped_release>())
      .def("search", &DecoderLogitsPlan::search, py::call_guard<py::gil_scoped_release>())
      .def("step_memory_fits", &DecoderLogitsPlan::step_memory_fits);
}

// x: [T, B, C] (the embedded source, any strides); key_pad: [B, T] or None.
// Returns the last layer's output [T, B, C].
at::Tensor fused_encoder_stack(const at::Tensor& x_in, at::TensorList params,
                               at::ArrayRef<double> nums, const std::optional<at::Tensor>& key_pad,
                               at::IntArrayRef heads, bool normalize_before, int64_t act) {
  const int64_t layers = static_cast<int64_t>(heads.size());
  TORCH_CHECK(layers > 0, "fused_encoder_stack: no layers");
  TORCH_CHECK(static_cast<int64_t>(params.size()) == layers * kEncPerLayer &&
                  static_cast<int64_t>(nums.size()) == layers * kEncNumsPerLayer,
              "fused_encoder_stack: per-layer lists of the wrong length");
  TORCH_CHECK(x_in.dim() == 3 && x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat,
              "fused_encoder_stack: x must be a float32 CPU [time, batch, channels] tensor");
  for (const at::Tensor& t : params) check_f32(t, "a layer parameter");
  const int64_t t = x_in.size(0), n = x_in.size(1), c = x_in.size(2);
  at::Tensor x = x_in.reshape({t * n, c});
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = params.data() + l * kEncPerLayer;
    const double* num = nums.data() + l * kEncNumsPerLayer;
    const Norm self_norm{w[kESelfLnW], w[kESelfLnB], num[kESelfEps]};
    const Norm final_norm{w[kEFinalLnW], w[kEFinalLnB], num[kEFinalEps]};
    const at::Tensor hin = normalize_before ? layer_norm(x, self_norm) : x;
    const at::Tensor qkv =
        linear_packed_cpu(hin, w[kEQkvPack], w[kEQkvBias], 3 * c).view({t, n, 3 * c});
    const at::Tensor a =
        std::get<0>(attention_cpu(qkv.narrow(2, 0, c), qkv.narrow(2, c, c), qkv.narrow(2, 2 * c, c),
                                  std::nullopt, key_pad, heads[l], num[kEScaling], 1, -1, false));
    const at::Tensor o = linear_packed_cpu(a.view({t * n, c}), w[kEOutPack], std::nullopt, c);
    at::Tensor normed;
    std::tie(x, normed) =
        residual_norm(o, w[kEOutBias], x, self_norm, final_norm, normalize_before);
    x = feed_forward(normed, x, w[kEFc1Pack], w[kEFc1Bias], w[kEFc2Pack], w[kEFc2Bias], final_norm,
                     act, normalize_before, num[kEFc2SkipZeros] != 0.0);
  }
  return x.view({t, n, c});
}

}  // namespace seqfuse

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  // Contract: seqfuse/layers/fused_step.py.
  m.def(
      "fused_decoder_step(Tensor x, Tensor[] params, float[] nums, Tensor[] self_kv, "
      "Tensor[] self_rows, Tensor[] self_pad, int slot, Tensor? pad_new, Tensor[] cross_kv, "
      "Tensor[] cross_map, Tensor?[] cross_pad, int q_per_kv, int[] heads, bool normalize_before, "
      "int act, int align_layer, int mean_heads) -> (Tensor[], Tensor)");
  m.def(
      "fused_decoder_logits(Tensor tokens, Tensor embed, float embed_scale, Tensor? pos_table, "
      "int pad, int pos_mode, int fixed_pos, Tensor[] norms, bool has_emb_ln, bool has_final_ln, "
      "float[] norm_eps, Tensor[] params, float[] nums, Tensor[] self_kv, Tensor[] self_rows, "
      "Tensor[] self_pad, int slot, Tensor[] cross_kv, Tensor[] cross_map, Tensor?[] cross_pad, "
      "int q_per_kv, int[] heads, bool normalize_before, int act, int align_layer, "
      "int mean_heads, Tensor out_pack, Tensor? out_bias, int vocab) -> (Tensor, Tensor)");
  m.def(
      "fused_encoder_stack(Tensor x, Tensor[] params, float[] nums, Tensor? key_pad, int[] heads, "
      "bool normalize_before, int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("fused_decoder_step", &seqfuse::fused_decoder_step);
  m.impl("fused_decoder_logits", &seqfuse::fused_decoder_logits);
  m.impl("fused_encoder_stack", &seqfuse::fused_encoder_stack);
}
