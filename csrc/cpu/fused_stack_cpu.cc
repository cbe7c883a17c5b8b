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
// steps. The caller (seqfuse/layers/fused_step.py) keeps the cache
// bookkeeping (growth, repack, reorder) in Python and passes the buffers;
// this call writes the step's K/V, parent-table column and key padding into
// slot `slot` of each layer's self-attention cache.
#include <algorithm>
#include <cstring>
#include <vector>

#include "layer_ops.h"

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
// Per-layer doubles: eps of the three norms, self and cross scaling.
enum Num : int64_t { kSelfEps, kCrossEps, kFinalEps, kSelfScaling, kCrossScaling, kNumsPerLayer };

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
enum EncNum : int64_t { kESelfEps, kEFinalEps, kEScaling, kEncNumsPerLayer };

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
                        const Norm& final_norm, int64_t act, bool pre_norm) {
  at::Tensor f = linear_packed_cpu(h, fc1, std::nullopt, b1.size(0));
  bias_act_cpu(f, b1, act);
  const at::Tensor o = linear_packed_cpu(f, fc2, std::nullopt, residual.size(1));
  if (pre_norm) {
    return std::get<0>(add_layernorm_cpu(o, b2, residual, std::nullopt, std::nullopt, 1e-5, true));
  }
  return std::get<1>(add_layernorm_cpu(o, b2, residual, final_norm.weight, final_norm.bias,
                                       final_norm.eps, false));
}

// One layer's self-attention cache: write the step's K/V (columns [C, 3C) of
// qkv), parent-table column and key padding at `slot`.
void write_self_slot(const at::Tensor& qkv, const at::Tensor& kv, const at::Tensor& rows,
                     const at::Tensor& pad, int64_t slot, const uint8_t* pad_new) {
  const int64_t n = qkv.size(0), c3 = qkv.size(1), c = c3 / 3;
  const int64_t slots = kv.size(0), phys = kv.size(1);
  TORCH_CHECK(kv.dim() == 3 && kv.size(2) == 2 * c && slot < slots && n <= phys,
              "fused_decoder_step: self cache ", kv.sizes(), " cannot take slot ", slot, " of ", n,
              " rows");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) >= n && rows.size(1) == slots &&
                  rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "fused_decoder_step: parent table must be int64 [>=", n, ", ", slots, "]");
  TORCH_CHECK(pad.dim() == 2 && pad.size(0) == slots && pad.size(1) == phys &&
                  pad.scalar_type() == at::kBool && pad.is_contiguous(),
              "fused_decoder_step: key padding must be bool [", slots, ", ", phys, "]");
  const float* src = qkv.data_ptr<float>();
  float* dst = kv.data_ptr<float>() + slot * phys * 2 * c;
  int64_t* table = rows.data_ptr<int64_t>();
  bool* p = pad.data_ptr<bool>() + slot * phys;
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(dst + r * 2 * c, src + r * c3 + c, sizeof(float) * 2 * c);
    table[r * slots + slot] = r;
    p[r] = pad_new != nullptr && pad_new[r] != 0;
  }
}

}  // namespace

// x: [n, C] (the embedded step, one token per row). Returns (each layer's
// output [n, C], the alignment layer's cross-attention weights, or an
// undefined tensor when align_layer is no layer). The weights are per head,
// [heads, n, 1, S], when mean_heads < 0; otherwise their mean over the first
// mean_heads heads (all when more), [n, 1, S], summed head by head and
// divided by the head count as the decoder's _head_mean does
// (seqfuse/layers/fairseq.py), with the same ATen calls.
std::tuple<std::vector<at::Tensor>, at::Tensor> fused_decoder_step(
    const at::Tensor& x_in, at::TensorList params, at::ArrayRef<double> nums,
    at::TensorList self_kv, at::TensorList self_rows, at::TensorList self_pad, int64_t slot,
    const std::optional<at::Tensor>& pad_new, at::TensorList cross_kv, at::TensorList cross_map,
    const c10::List<std::optional<at::Tensor>>& cross_pad, int64_t q_per_kv, at::IntArrayRef heads,
    bool normalize_before, int64_t act, int64_t align_layer, int64_t mean_heads) {
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
  const uint8_t* pn = nullptr;
  if (pad_new.has_value()) {
    TORCH_CHECK(
        pad_new->scalar_type() == at::kBool && pad_new->is_contiguous() && pad_new->numel() == n,
        "fused_decoder_step: step padding must be a contiguous bool [", n, "]");
    pn = reinterpret_cast<const uint8_t*>(pad_new->data_ptr<bool>());
  }
  for (const at::Tensor& t : params) check_f32(t, "a layer parameter");

  at::Tensor x = x_in;
  at::Tensor align;
  std::vector<at::Tensor> outputs;
  outputs.reserve(layers);
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = params.data() + l * kPerLayer;
    const double* num = nums.data() + l * kNumsPerLayer;
    const int64_t h = heads[l];
    const Norm self_norm{w[kSelfLnW], w[kSelfLnB], num[kSelfEps]};
    const Norm cross_norm{w[kCrossLnW], w[kCrossLnB], num[kCrossEps]};
    const Norm final_norm{w[kFinalLnW], w[kFinalLnB], num[kFinalEps]};

    // Self-attention over the cache (pre-norm: normalise x first).
    const at::Tensor hin = normalize_before ? layer_norm(x, self_norm) : x;
    at::Tensor qkv = linear_packed_cpu(hin, w[kQkvPack], w[kQkvBias], 3 * c);  // [n, 3C]
    write_self_slot(qkv, self_kv[l], self_rows[l], self_pad[l], slot, pn);
    const at::Tensor kv = self_kv[l].narrow(0, 0, slot + 1);
    at::Tensor a = std::get<0>(
        attention_cpu(qkv.view({1, n, 3 * c}).narrow(2, 0, c), kv.narrow(2, 0, c),
                      kv.narrow(2, c, c), self_rows[l].narrow(0, 0, n),
                      self_pad[l].narrow(0, 0, slot + 1).t(), h, num[kSelfScaling], 1, -1, false));
    at::Tensor o = linear_packed_cpu(a.view({n, c}), w[kSelfOutPack], std::nullopt, c);
    at::Tensor normed;
    std::tie(x, normed) =
        residual_norm(o, w[kSelfOutBias], x, self_norm, cross_norm, normalize_before);

    // Cross-attention over the encoder K/V (one set per source sentence).
    const at::Tensor& ckv = cross_kv[l];
    TORCH_CHECK(ckv.dim() == 3 && ckv.size(2) == 2 * c && ckv.scalar_type() == at::kFloat,
                "fused_decoder_step: encoder K/V must be float32 [S, sentences, ", 2 * c, "]");
    at::Tensor q = linear_packed_cpu(normed, w[kCrossQPack], w[kCrossQBias], c);
    const bool want_weights = l == align_layer;
    at::Tensor cw;
    std::tie(a, cw) =
        attention_cpu(q.view({1, n, c}), ckv.narrow(2, 0, c), ckv.narrow(2, c, c), cross_map[l],
                      cross_pad.get(l), h, num[kCrossScaling], q_per_kv, -1, want_weights);
    if (want_weights) align = cw;
    o = linear_packed_cpu(a.view({n, c}), w[kCrossOutPack], std::nullopt, c);
    std::tie(x, normed) =
        residual_norm(o, w[kCrossOutBias], x, cross_norm, final_norm, normalize_before);

    x = feed_forward(normed, x, w[kFc1Pack], w[kFc1Bias], w[kFc2Pack], w[kFc2Bias], final_norm, act,
                     normalize_before);
    outputs.push_back(x);
  }
  if (align.defined() && mean_heads >= 0) {
    const int64_t count = std::min(mean_heads, align.size(0));
    TORCH_CHECK(count > 0, "fused_decoder_step: no heads to average");
    at::Tensor acc = align.select(0, 0).clone();
    for (int64_t h = 1; h < count; ++h) acc.add_(align.select(0, h));
    align = acc.div_(count);
  }
  return {outputs, align};
}

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
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == 1 && tokens.scalar_type() == at::kLong,
              "fused_decoder_logits: tokens must be int64 [rows, 1]");
  const int64_t n_norms = (has_emb_ln ? 2 : 0) + (has_final_ln ? 2 : 0);
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == n_norms &&
                  static_cast<int64_t>(norm_eps.size()) == n_norms / 2,
              "fused_decoder_logits: norm lists of the wrong length");
  const int64_t n = tokens.size(0);
  at::Tensor x = embedding_cpu(tokens, embed, embed_scale, pos_table, pad, pos_mode, fixed_pos,
                               false);  // [1, n, C]
  const int64_t c = x.size(2);
  x = x.view({n, c});
  int64_t k = 0;
  if (has_emb_ln) {
    check_f32(norms[0], "the embedding norm weight");
    x = layer_norm(x, Norm{norms[0], norms[1], norm_eps[0]});
    k = 2;
  }
  const at::Tensor step_pad = tokens.view({n}).eq(pad);
  auto [outs, align] = fused_decoder_step(x, params, nums, self_kv, self_rows, self_pad, slot,
                                          step_pad, cross_kv, cross_map, cross_pad, q_per_kv, heads,
                                          normalize_before, act, align_layer, mean_heads);
  x = outs.back();
  if (has_final_ln) {
    check_f32(norms[k], "the final norm weight");
    x = layer_norm(x, Norm{norms[k], norms[k + 1], norm_eps[k / 2]});
  }
  return {linear_packed_cpu(x, out_pack, out_bias, vocab), align};
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
                     act, normalize_before);
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
