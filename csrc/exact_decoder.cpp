// decoder_stack_step: one incremental step of a post- or pre-norm transformer
// decoder stack, every layer, in one call.
//
// It issues the same ATen calls, on tensors of the same shapes and strides, in
// the same order as a stock fairseq 0.12 TransformerDecoderLayer does during
// incremental decoding, so its result is bit-identical to the stock layers on
// every backend; what it removes is the per-op Python work (module calls,
// incremental-state dictionaries, shape checks), which is most of a decode
// step at small batch. Device-generic: it runs wherever ATen runs.
//
// Contract (see seqfuse/layers/exact_step.py, which checks the model):
//   x            [1, bsz, C] decoder input of this step (embedded, transposed)
//   weights      22 per layer, in WEIGHT_ORDER of exact_step.py
//   self_k/v     per layer, the cache [bsz, H, t, hd] before this step
//   cross_k/v    per layer, the encoder K/V [kv_bsz, H, S, hd] (empty: no
//                encoder attention); bsz % kv_bsz == 0
//   cross_pad    per layer, the key padding mask [kv_bsz, S] or None
//   eps          3 per layer (self, encoder, final layer norm)
//   act          0 relu, 1 gelu (fp32 erf), 2 tanh
//   align_layer  the layer whose encoder-attention probabilities are returned,
//                [H, bsz, 1, S] in x.dtype, -1 for none
// Returns (x, new self K per layer, new self V per layer, inner states, attn).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "layer_ops.h"
#include "ops.h"

namespace seqfuse {
namespace {

constexpr int64_t kWeightsPerLayer = 22;
constexpr int64_t kPackedPerLayer = 8;  // hf_decoder_stack_step's GEMM weight packs

// One nn.Linear the way F.linear runs it.
inline at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return at::linear(x, w, b);
}

inline at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                             double eps) {
  return at::layer_norm(x, {x.size(-1)}, w, b, eps, /*cudnn_enable=*/true);
}

// `q *= scaling` as Python runs it: mul_ by a wrapped-number tensor. (The
// Scalar overload puts the scalar first, which rounds it to a half-precision
// dtype before the product; Python's keeps it in the op's fp32 math.)
inline void scale_(at::Tensor& q, const at::Tensor& scaling) { q.mul_(scaling); }

// [1, bsz, C] -> [bsz * H, 1, hd], as MultiheadAttention reshapes its query.
inline at::Tensor split_heads(const at::Tensor& t, int64_t rows, int64_t hd) {
  return t.contiguous().view({1, rows, hd}).transpose(0, 1);
}

// at::cat({prev.index_select(0, order).view({rows, t, hd}), step}, 1) in one
// pass: the self-attention cache of this step after a beam reorder that was
// deferred to it (seqfuse/layers/exact_step.py), without the reordered copy of
// the whole history that stock's reorder makes first. prev: [B0, H, t, hd];
// order: int64 [B] (rows of prev); step: [B * H, 1, hd] (split_heads' layout).
// The result is cat's: the same values in the same contiguous layout.
at::Tensor gather_append(const at::Tensor& prev, const at::Tensor& order, const at::Tensor& step,
                         int64_t heads, int64_t hd) {
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong,
              "decoder_stack_step: the reorder must be a 1-d int64 tensor");
  const int64_t bsz = order.size(0), rows = bsz * heads, t = prev.size(2);
  TORCH_CHECK(step.size(0) == rows, "decoder_stack_step: the reorder addresses ", bsz,
              " rows, the step has ", step.size(0) / heads);
  const bool direct = prev.is_cpu() && order.is_cpu() && step.is_cpu() && prev.is_contiguous() &&
                      order.is_contiguous() && step.stride(0) == hd && step.stride(2) == 1 &&
                      step.scalar_type() == prev.scalar_type();
  if (!direct) {
    return at::cat({prev.index_select(0, order).reshape({rows, -1, hd}), step}, 1);
  }
  const int64_t* idx = order.data_ptr<int64_t>();
  const int64_t b0 = prev.size(0);
  for (int64_t b = 0; b < bsz; ++b) {
    TORCH_CHECK(idx[b] >= 0 && idx[b] < b0, "decoder_stack_step: reorder index ", idx[b],
                " out of range for ", b0, " cached rows");
  }
  at::Tensor out = at::empty({rows, t + 1, hd}, step.options());
  const int64_t elem = static_cast<int64_t>(prev.element_size());
  const int64_t hist = t * hd * elem, one = hd * elem;
  const char* src = static_cast<const char*>(prev.data_ptr());
  const char* add = static_cast<const char*>(step.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, rows, std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(hist, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       const int64_t from = idx[r / heads] * heads + r % heads;
                       char* d = dst + r * (hist + one);
                       std::memcpy(d, src + from * hist, static_cast<size_t>(hist));
                       std::memcpy(d + hist, add + r * one, static_cast<size_t>(one));
                     }
                   });
  return out;
}

struct AttnOut {
  at::Tensor out;          // [1, bsz, C]
  at::Tensor probs_float;  // [bsz * H, 1, S] fp32 (for the alignment layer)
};

// Scores, padding mask, fp32 softmax, weighted sum and output projection of a
// MultiheadAttention call whose K/V are already [kv_bsz * H, S, hd].
AttnOut attend(at::Tensor q, const at::Tensor& k, const at::Tensor& v,
               const std::optional<at::Tensor>& key_pad, int64_t bsz, int64_t kv_bsz, int64_t heads,
               int64_t hd, int64_t embed, const at::Tensor& wo, const at::Tensor& bo,
               bool shared_kv) {
  const int64_t src = k.size(1);
  at::Tensor w;
  if (shared_kv) {
    w = at::einsum("bxhtd,bhsd->bxhts", {q.view({kv_bsz, -1, heads, q.size(1), q.size(2)}),
                                         k.view({kv_bsz, heads, k.size(1), k.size(2)})});
    w = w.reshape({-1, w.size(-2), w.size(-1)});
  } else {
    w = at::bmm(q, k.transpose(1, 2));
  }
  if (key_pad.has_value()) {
    w = w.view({bsz, heads, 1, src}).view({kv_bsz, -1, heads, 1, src});
    w = w.masked_fill(key_pad->unsqueeze(1).unsqueeze(2).unsqueeze(3).to(at::kBool),
                      -std::numeric_limits<double>::infinity());
    w = w.view({bsz * heads, 1, src});
  }
  at::Tensor pf = at::softmax(w, -1, at::kFloat);
  at::Tensor p = pf.type_as(w);
  at::Tensor o;
  if (shared_kv) {
    o = at::einsum("bxhts,bhsd->bxhtd", {p.view({kv_bsz, -1, heads, p.size(1), p.size(2)}),
                                         v.view({kv_bsz, heads, v.size(1), v.size(2)})});
    o = o.reshape({-1, o.size(-2), o.size(-1)});
  } else {
    o = at::bmm(p, v);
  }
  o = o.transpose(0, 1).contiguous().view({1, bsz, embed});
  return {linear(o, wo, bo), pf};
}

constexpr double kPi = 3.141592653589793;  // Python's math.pi

// A Python float operand as Python passes it to a tensor op: a wrapped number.
inline at::Tensor wrapped(double v) {
  at::Tensor t = at::scalar_to_tensor(at::Scalar(v));
  t.unsafeGetTensorImpl()->set_wrapped_number(true);
  return t;
}

at::Tensor activation(const at::Tensor& x, int64_t act) {
  switch (act) {
    case 5: {
      // transformers' NewGELUActivation (GPT-2's gelu_new), op for op:
      // 0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * pow(x, 3.0))))
      const at::Tensor half = at::mul(x, wrapped(0.5));
      const at::Tensor inner = at::add(x, at::mul(at::pow(x, 3.0), wrapped(0.044715)));
      const at::Tensor t = at::tanh(at::mul(inner, wrapped(std::sqrt(2.0 / kPi))));
      return at::mul(half, at::add(t, wrapped(1.0)));
    }
    case 0:
      return at::relu(x);
    case 1:
      return at::gelu(x.to(at::kFloat)).type_as(x);
    case 2:
      return at::tanh(x);
    case 3:
      return at::gelu(x);
    case 4:
      return at::silu(x);
  }
  TORCH_CHECK(false, "decoder_stack_step: unknown activation code ", act);
}

// (x, new self K per layer, new self V per layer, inner states, attn)
using StackStep = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
                             std::vector<at::Tensor>, std::optional<at::Tensor>>;

StackStep decoder_stack_impl(const at::Tensor& x_in, at::TensorList weights, at::TensorList self_k,
                             at::TensorList self_v, at::TensorList cross_k, at::TensorList cross_v,
                             const c10::List<std::optional<at::Tensor>>& cross_pad,
                             at::ArrayRef<double> eps, int64_t heads, double scaling, int64_t act,
                             bool normalize_before, int64_t align_layer,
                             const std::optional<at::Tensor>& order) {
  const int64_t layers = static_cast<int64_t>(self_k.size());
  TORCH_CHECK(layers > 0, "decoder_stack_step: no layers");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kWeightsPerLayer,
              "decoder_stack_step: expected ", layers * kWeightsPerLayer, " weights, got ",
              weights.size());
  TORCH_CHECK(static_cast<int64_t>(self_v.size()) == layers, "self_v: one per layer");
  const bool cross = !cross_k.empty();
  TORCH_CHECK(!cross || (static_cast<int64_t>(cross_k.size()) == layers &&
                         static_cast<int64_t>(cross_v.size()) == layers &&
                         static_cast<int64_t>(cross_pad.size()) == layers),
              "cross_k/cross_v/cross_pad: one per layer or none");
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 3 * layers, "eps: three per layer");
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(0) == 1, "x must be [1, bsz, C], got ", x_in.sizes());
  TORCH_CHECK(act >= 0 && act <= 2, "decoder_stack_step: unknown activation code ", act);
  // (3 and 4 are Hugging Face's gelu and silu: hf_decoder_stack_step only)
  const int64_t bsz = x_in.size(1), embed = x_in.size(2);
  TORCH_CHECK(heads > 0 && embed % heads == 0, "embed dim ", embed, " not divisible by ", heads,
              " heads");
  const int64_t hd = embed / heads;
  const int64_t rows = bsz * heads;
  at::Tensor scale = at::scalar_to_tensor(at::Scalar(scaling));
  scale.unsafeGetTensorImpl()->set_wrapped_number(true);

  std::vector<at::Tensor> new_k, new_v, inner;
  new_k.reserve(layers);
  new_v.reserve(layers);
  inner.reserve(layers + 1);
  inner.push_back(x_in);
  std::optional<at::Tensor> attn;
  at::Tensor x = x_in;

  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* W = weights.data() + l * kWeightsPerLayer;
    const double* E = eps.data() + 3 * l;
    const at::Tensor& pk = self_k[l];
    const at::Tensor& pv = self_v[l];
    TORCH_CHECK(pk.dim() == 4 && (order.has_value() || pk.size(0) == bsz) && pk.size(1) == heads &&
                    pk.size(3) == hd,
                "layer ", l, ": self-attention cache must be [", bsz, ", ", heads, ", t, ", hd,
                "], got ", pk.sizes());
    TORCH_CHECK(pv.sizes() == pk.sizes(), "layer ", l, ": cached K and V differ in shape");

    // ---- self-attention
    at::Tensor residual = x;
    if (normalize_before) x = layer_norm(x, W[8], W[9], E[0]);
    at::Tensor q = linear(x, W[0], W[1]);
    at::Tensor k = linear(x, W[2], W[3]);
    at::Tensor v = linear(x, W[4], W[5]);
    scale_(q, scale);
    q = split_heads(q, rows, hd);
    k = split_heads(k, rows, hd);
    v = split_heads(v, rows, hd);
    if (order.has_value()) {  // a beam reorder deferred to this step
      k = gather_append(pk, *order, k, heads, hd);
      v = gather_append(pv, *order, v, heads, hd);
    } else {
      k = at::cat({pk.view({rows, -1, hd}), k}, 1);
      v = at::cat({pv.view({rows, -1, hd}), v}, 1);
    }
    new_k.push_back(k.view({bsz, heads, -1, hd}));
    new_v.push_back(v.view({bsz, heads, -1, hd}));
    x = attend(q, k, v, std::nullopt, bsz, bsz, heads, hd, embed, W[6], W[7], false).out;
    x = at::add(residual, x);
    if (!normalize_before) x = layer_norm(x, W[8], W[9], E[0]);

    // ---- encoder attention (K/V cached since the first step)
    if (cross) {
      const at::Tensor& ck = cross_k[l];
      const at::Tensor& cv = cross_v[l];
      TORCH_CHECK(ck.dim() == 4 && ck.size(1) == heads && ck.size(3) == hd, "layer ", l,
                  ": encoder K must be [kv_bsz, ", heads, ", S, ", hd, "], got ", ck.sizes());
      TORCH_CHECK(cv.sizes() == ck.sizes(), "layer ", l, ": encoder K and V differ in shape");
      const int64_t kv_bsz = ck.size(0);
      TORCH_CHECK(kv_bsz > 0 && bsz % kv_bsz == 0, "layer ", l, ": ", bsz,
                  " decoder rows are not a multiple of ", kv_bsz, " encoder rows");
      residual = x;
      if (normalize_before) x = layer_norm(x, W[14], W[15], E[1]);
      at::Tensor cq = linear(x, W[10], W[11]);
      scale_(cq, scale);
      cq = split_heads(cq, rows, hd);
      const at::Tensor kk = ck.view({kv_bsz * heads, -1, hd});
      const at::Tensor vv = cv.view({kv_bsz * heads, -1, hd});
      std::optional<at::Tensor> pad = cross_pad.get(l);
      if (pad.has_value() && !pad->defined()) pad = std::nullopt;
      AttnOut a =
          attend(cq, kk, vv, pad, bsz, kv_bsz, heads, hd, embed, W[12], W[13], bsz != kv_bsz);
      if (l == align_layer) {
        const int64_t src = kk.size(1);
        attn = a.probs_float.view({bsz, heads, 1, src}).transpose(1, 0).to(at::kFloat).to(x);
      }
      x = at::add(residual, a.out);
      if (!normalize_before) x = layer_norm(x, W[14], W[15], E[1]);
    }

    // ---- feed-forward
    residual = x;
    if (normalize_before) x = layer_norm(x, W[20], W[21], E[2]);
    x = activation(linear(x, W[16], W[17]), act);
    x = linear(x, W[18], W[19]);
    x = at::add(residual, x);
    if (!normalize_before) x = layer_norm(x, W[20], W[21], E[2]);
    inner.push_back(x);
  }
  return {x, new_k, new_v, inner, attn};
}

// The op: decoder_stack_impl without a deferred reorder.
StackStep decoder_stack_step(const at::Tensor& x, at::TensorList weights, at::TensorList self_k,
                             at::TensorList self_v, at::TensorList cross_k, at::TensorList cross_v,
                             const c10::List<std::optional<at::Tensor>>& cross_pad,
                             at::ArrayRef<double> eps, int64_t heads, double scaling, int64_t act,
                             bool pre_norm, int64_t align_layer) {
  return decoder_stack_impl(x, weights, self_k, self_v, cross_k, cross_v, cross_pad, eps, heads,
                            scaling, act, pre_norm, align_layer, std::nullopt);
}

}  // namespace

// decoder_stack_step with the arguments that stay fixed for a decoder (its
// weights, norms' eps, heads, scaling, activation, norm placement) held by
// one object, so that a step passes only x and the caches: called from
// Python through pybind11, it skips the dispatcher's boxing of the weight
// list (some sixty tensors) on every step. The same function, so the same
// ATen calls in the same order. Its step also takes `order`: None, or a beam
// reorder of the self-attention caches that the caller deferred to this step
// (the caches then hold the rows before the reorder); each layer's new cache
// is gathered and appended in one pass (gather_append), the values and
// layout of stock's index_select then cat.
class ExactStepPlan {
 public:
  ExactStepPlan(std::vector<at::Tensor> weights, std::vector<double> eps, int64_t heads,
                double scaling, int64_t act, bool normalize_before)
      : weights_(std::move(weights)),
        eps_(std::move(eps)),
        heads_(heads),
        scaling_(scaling),
        act_(act),
        normalize_before_(normalize_before) {}

  StackStep step(const at::Tensor& x, const std::vector<at::Tensor>& self_k,
                 const std::vector<at::Tensor>& self_v, const std::vector<at::Tensor>& cross_k,
                 const std::vector<at::Tensor>& cross_v,
                 const std::vector<std::optional<at::Tensor>>& cross_pad, int64_t align_layer,
                 const std::optional<at::Tensor>& order) const {
    RECORD_FUNCTION("seqfuse::ExactStepPlan.step", std::vector<c10::IValue>());
    c10::List<std::optional<at::Tensor>> pads;
    pads.reserve(cross_pad.size());
    for (const auto& t : cross_pad) pads.push_back(t);
    return decoder_stack_impl(x, weights_, self_k, self_v, cross_k, cross_v, pads, eps_, heads_,
                              scaling_, act_, normalize_before_, align_layer, order);
  }

 private:
  std::vector<at::Tensor> weights_;
  std::vector<double> eps_;
  int64_t heads_;
  double scaling_;
  int64_t act_;
  bool normalize_before_;
};

void bind_exact_step(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<ExactStepPlan>(m, "ExactStepPlan")
      .def(py::init<std::vector<at::Tensor>, std::vector<double>, int64_t, double, int64_t, bool>())
      .def("step", &ExactStepPlan::step, py::arg("x"), py::arg("self_k"), py::arg("self_v"),
           py::arg("cross_k"), py::arg("cross_v"), py::arg("cross_pad"), py::arg("align_layer"),
           py::arg("order") = py::none(), py::call_guard<py::gil_scoped_release>());
}

// ---------------------------------------------------------------------------
// hf_decoder_stack_step: the same for a Hugging Face BART-family decoder
// (BART, Marian, mBART, ...; sdpa attention, DynamicCache), issuing the calls
// of transformers' decoder layer, attention module, sdpa_attention_forward
// and DynamicLayer.update for a one-token step. x is [bsz, 1, C]; caches are
// [bsz, H, t, hd]; masks are what the decoder passes its layers (None or
// 4-D); act: 0 relu, 2 tanh, 3 gelu, 4 silu. With `packed` (8 per layer:
// q, k, v, out, cross q, cross out, fc1, fc2 panel packs) the projections run
// seqfuse's packed-weight GEMM instead, and on the CPU (float32) the
// attention seqfuse's attention core where the masks are key paddings
// (attention_heads_cpu): the fused mode, within 1e-5 rather than
// bit-identical. skip_zeros (with packs; this op and the T5, FSMT and GPT-2
// ones): the second feed-forward product skips zero inputs, the same bits
// as without for finite weights, which the caller has checked (it asks for
// it after a ReLU, whose outputs are mostly zeros in trained models).
// Returns (x, new K, new V).
namespace {

// A projection: torch's (exact) or, given the weight's panel pack, seqfuse's
// packed-weight GEMM (seqfuse::linear_packed, the fused mode).
inline at::Tensor packed_linear(const at::Tensor& x2d, const at::Tensor& packed,
                                const std::optional<at::Tensor>& b, int64_t n,
                                bool skip_zeros = false) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seqfuse::linear_packed", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, int64_t, bool)>();
  return op.call(x2d, packed, b, n, skip_zeros);
}

// A bias, or none for an undefined or empty tensor (a layer without one).
inline std::optional<at::Tensor> bias_of(const at::Tensor& b) {
  if (!b.defined() || b.numel() == 0) return std::nullopt;
  return b;
}

// An nn.Linear (bias `b`, undefined or empty for none): F.linear, or the
// packed GEMM given the weight's pack. skip_zeros (packed GEMM only): the
// product skips the k where a block's rows of x are all zero, the same bits
// as the dense product for a finite weight (the caller's to know): the
// second feed-forward product after a ReLU, mostly zeros in trained models.
inline at::Tensor project(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                          const at::Tensor* packed, bool skip_zeros = false) {
  const std::optional<at::Tensor> bias = bias_of(b);
  if (packed == nullptr) return at::linear(x, w, bias);
  const at::Tensor y =
      packed_linear(x.reshape({-1, x.size(-1)}), *packed,
                    bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt,
                    w.size(0), skip_zeros);
  return y.view({x.size(0), x.size(1), w.size(0)});
}

// GPT-2's Conv1D (weight [in, out]): `torch.addmm(bias, x.view(-1, nx), weight)
// .view(size_out)`; given the pack of weight^T, seqfuse's packed GEMM as
// hf_fused.PackedConv1D runs it (the fused mode).
inline at::Tensor conv1d(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                         const at::Tensor* packed, bool skip_zeros = false) {
  const int64_t nf = w.size(1);
  const at::Tensor y = packed == nullptr ? at::addmm(b, x.view({-1, x.size(-1)}), w)
                                         : packed_linear(x.reshape({-1, x.size(-1)}), *packed,
                                                         b.contiguous(), nf, skip_zeros);
  return y.view({x.size(0), x.size(1), nf});
}

// q/k/v projection to [bsz, H, 1, hd], as `proj(h).view(*shape, -1, hd).transpose(1, 2)`.
inline at::Tensor project_heads(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                int64_t hd, const at::Tensor* packed) {
  return project(x, w, b, packed).view({x.size(0), x.size(1), -1, hd}).transpose(1, 2);
}

// sdpa's output [bsz, H, q, hd] back to [bsz, q, H * hd], as
// sdpa_attention_forward (reshape, transpose, contiguous) and the attention
// modules (reshape, contiguous) leave it.
inline at::Tensor merge_heads(const at::Tensor& o, int64_t q_len, int64_t hd) {
  const at::Tensor t = o.reshape({o.size(0), -1, q_len, hd}).transpose(1, 2).contiguous();
  return t.reshape({t.size(0), t.size(1), -1}).contiguous();
}

// sdpa, the heads merged, the output projection (bias `bo`, or none).
at::Tensor hf_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& mask, double scaling, const at::Tensor& wo,
                     const at::Tensor& bo, const at::Tensor* packed) {
  const at::Tensor o =
      at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/false, scaling);
  return project(merge_heads(o, q.size(2), v.size(-1)), wo, bo, packed);
}

// A one-token step's input [bsz, 1, C] split into `heads`: the head size.
inline int64_t step_head_dim(const at::Tensor& x, int64_t heads) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "x must be [bsz, 1, C], got ", x.sizes());
  TORCH_CHECK(heads > 0 && x.size(2) % heads == 0, "embed dim ", x.size(2), " not divisible by ",
              heads, " heads");
  return x.size(2) / heads;
}

// A layer's cached K or V: [bsz, heads, t, hd].
inline void check_cache(const at::Tensor& t, int64_t layer, int64_t bsz, int64_t heads,
                        int64_t hd) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == bsz && t.size(1) == heads && t.size(3) == hd, "layer ",
              layer, ": caches must be [", bsz, ", ", heads, ", t, ", hd, "], got ", t.sizes());
}

// Whether the search deferred a beam reorder of the self-attention caches to
// this step (`order`: int64 [bsz], the cached rows the step's rows continue).
inline bool has_order(const std::optional<at::Tensor>& order) {
  return order.has_value() && order->defined();
}

// A layer's caches before this step: the self-attention K and V
// [bsz, heads, t, hd], or with a deferred reorder [any, heads, t, hd] (the
// rows order picks from), and an encoder-decoder's cached encoder K and V
// [bsz, heads, s, hd] (cross_k, cross_v; none for a decoder-only model).
inline void check_step_caches(int64_t layer, int64_t bsz, int64_t heads, int64_t hd,
                              const std::optional<at::Tensor>& order, const at::Tensor& self_k,
                              const at::Tensor& self_v, const at::Tensor* cross_k = nullptr,
                              const at::Tensor* cross_v = nullptr) {
  for (const at::Tensor* t : {&self_k, &self_v}) {
    check_cache(*t, layer, has_order(order) ? t->size(0) : bsz, heads, hd);
  }
  for (const at::Tensor* t : {cross_k, cross_v}) {
    if (t != nullptr) check_cache(*t, layer, bsz, heads, hd);
  }
}

// append_step into a buffer with room for more slots (the fused mode's
// greedy steps, integrations/hf_exact_step.py's kv rooms): `room`
// [bsz, heads, cap, hd] contiguous, cap > t; no deferred reorder (a step
// with one gathers and appends, gather_append). Where prev is room's own
// first t slots (a view at its start with its strides), the step is written
// into slot t in place: nothing else moves, and a view of the first t slots
// still reads what it read. Otherwise (a buffer started or grown) prev and
// the step are copied into room, whose memory must not be prev's. Returns
// room's first t + 1 slots: the values of append_step's cat in a view of the
// buffer (slots cap apart).
at::Tensor append_into(const at::Tensor& prev, const at::Tensor& step, const at::Tensor& room) {
  const int64_t b = step.size(0), g = step.size(1), d = step.size(3), t = prev.size(2);
  TORCH_CHECK(prev.size(0) == b, "the cache has ", prev.size(0), " rows, the step ", b);
  TORCH_CHECK(room.dim() == 4 && room.size(0) == b && room.size(1) == g && room.size(3) == d &&
                  room.size(2) > t && room.is_contiguous() &&
                  room.scalar_type() == prev.scalar_type() && room.device() == prev.device(),
              "a K/V room must be a contiguous [", b, ", ", g, ", >", t, ", ", d, "] buffer of ",
              prev.scalar_type(), " on ", prev.device(), ", got ", room.sizes());
  const at::Tensor out = room.narrow(2, 0, t + 1);
  if (prev.data_ptr() != room.data_ptr() || prev.strides() != room.strides()) {
    TORCH_CHECK(!room.storage().is_alias_of(prev.storage()),
                "a K/V room must not share memory with the cache it is filled from");
    out.narrow(2, 0, t).copy_(prev);
  }
  out.narrow(2, t, 1).copy_(step);
  return out;
}

// DynamicLayer.update's cat of this step's K or V ([bsz, heads, 1, hd], any
// strides) to the cache; with a deferred reorder, after it
// (prev.index_select(0, order), which stock's reorder_cache makes a step
// earlier) in gather_append's one pass: the same values, in cat's
// contiguous layout. Given a room (the fused mode's greedy steps), append_into.
at::Tensor append_step(const at::Tensor& prev, const std::optional<at::Tensor>& order,
                       const at::Tensor& step, const at::Tensor* room = nullptr) {
  if (room != nullptr) {
    TORCH_CHECK(!has_order(order), "a K/V room takes a step with no deferred reorder");
    return append_into(prev, step, *room);
  }
  if (!has_order(order)) return at::cat({prev, step}, -2);
  const int64_t b = step.size(0), h = step.size(1), d = step.size(3);
  TORCH_CHECK(order->dim() == 1 && order->size(0) == b, "the deferred reorder addresses ",
              order->sizes(), " rows, the step has ", b);
  return gather_append(prev, *order, step.reshape({b * h, 1, d}), h, d).view({b, h, -1, d});
}

// A stack step's K/V rooms (append_into): none, or one K and one V buffer a
// layer (the fused mode's self-attention caches).
class Rooms {
 public:
  Rooms(const char* op, const std::optional<at::TensorList>& k_in,
        const std::optional<at::TensorList>& v_in, int64_t layers)
      : k_(k_in.value_or(at::TensorList())), v_(v_in.value_or(at::TensorList())) {
    const at::TensorList k = k_, v = v_;
    TORCH_CHECK(
        (k.empty() && v.empty()) ||
            (static_cast<int64_t>(k.size()) == layers && static_cast<int64_t>(v.size()) == layers),
        op, ": K/V rooms: none or one K and one V a layer, got ", k.size(), " and ", v.size());
  }
  const at::Tensor* key(int64_t l) const { return k_.empty() ? nullptr : &k_[l]; }
  const at::Tensor* value(int64_t l) const { return v_.empty() ? nullptr : &v_[l]; }

 private:
  at::TensorList k_, v_;
};

// One layer's share of a stack step's per-layer lists: its weights, its
// norms' eps and, in the fused mode, its weight packs (pack(i): the i-th, or
// nullptr for torch's product).
struct LayerLists {
  const at::Tensor* W;
  const double* E;
  const at::Tensor* P;
  const at::Tensor* pack(int i) const { return P == nullptr ? nullptr : P + i; }
};

// A stack step's per-layer lists, checked once: `per` weights and `eps_per`
// eps a layer, and none or `packs_per` packs a layer.
class StackLists {
 public:
  StackLists(const char* op, int64_t layers, at::TensorList weights, int64_t per,
             at::ArrayRef<double> eps, int64_t eps_per, at::TensorList packed, int64_t packs_per)
      : weights_(weights),
        eps_(eps),
        packed_(packed),
        per_(per),
        eps_per_(eps_per),
        packs_per_(packs_per) {
    TORCH_CHECK(layers > 0, op, ": no layers");
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * per, op, ": expected ",
                layers * per, " weights, got ", weights.size());
    TORCH_CHECK(static_cast<int64_t>(eps.size()) == layers * eps_per, op, ": expected ",
                layers * eps_per, " eps, got ", eps.size());
    TORCH_CHECK(packed.empty() || static_cast<int64_t>(packed.size()) == layers * packs_per, op,
                ": packed weights: none or ", layers * packs_per, ", got ", packed.size());
  }
  LayerLists layer(int64_t l) const {
    return {weights_.data() + l * per_, eps_.data() + l * eps_per_,
            packed_.empty() ? nullptr : packed_.data() + l * packs_per_};
  }

 private:
  at::TensorList weights_;
  at::ArrayRef<double> eps_;
  at::TensorList packed_;
  int64_t per_, eps_per_, packs_per_;
};

// The encoder-decoder stacks' checks (hf_decoder_stack_step,
// hf_fsmt_stack_step): their per-layer lists (kWeightsPerLayer weights, 3
// eps, none or kPackedPerLayer packs; one self V, cross K and cross V per
// self K) and a known activation code.
StackLists cross_stack_lists(const char* op, at::TensorList weights, at::TensorList self_k,
                             at::TensorList self_v, at::TensorList cross_k, at::TensorList cross_v,
                             at::ArrayRef<double> eps, at::TensorList packed, int64_t act) {
  const int64_t layers = static_cast<int64_t>(self_k.size());
  const StackLists lists(op, layers, weights, kWeightsPerLayer, eps, 3, packed, kPackedPerLayer);
  TORCH_CHECK(static_cast<int64_t>(self_v.size()) == layers &&
                  static_cast<int64_t>(cross_k.size()) == layers &&
                  static_cast<int64_t>(cross_v.size()) == layers,
              op, ": self_v, cross_k, cross_v: one per layer");
  TORCH_CHECK(act == 0 || act == 2 || act == 3 || act == 4, op, ": unknown activation code ", act);
  return lists;
}

namespace {
// The fused mode's attention on the CPU (float32): seqfuse's attention core
// (within a few 1e-7 of sdpa's) where the mask is a key padding. `ok`: the
// core takes the mask: none, or bool [rows or 1, 1, 1, s] with a key to
// attend in every row (where a row has none, sdpa gives zeros and the core
// NaN: sdpa runs); pad: [rows, s], true where masked, or none.
struct KeyPadding {
  bool ok = false;
  std::optional<at::Tensor> pad;
  // whether the core takes this step's attention over keys `k` [b, G, s, hd]
  bool takes(const at::Tensor& k) const {
    return ok && (!pad.has_value() || pad->size(1) == k.size(2));
  }
};

// Whether a step runs in the fused mode (weight packs given) on the CPU in
// float32, where the core may take its attention.
inline bool core_step(at::TensorList packed, const at::Tensor& x) {
  return !packed.empty() && x.is_cpu() && x.scalar_type() == at::kFloat;
}

KeyPadding key_padding(const std::optional<at::Tensor>& mask, int64_t rows) {
  KeyPadding out;
  if (!mask.has_value() || !mask->defined()) {
    out.ok = true;
    return out;
  }
  const at::Tensor& m = *mask;
  if (m.scalar_type() != at::kBool || !m.device().is_cpu() || m.dim() != 4 || m.size(1) != 1 ||
      m.size(2) != 1 || (m.size(0) != rows && m.size(0) != 1) || m.size(3) < 1) {
    return out;
  }
  const at::Tensor keep = m.select(2, 0).select(1, 0);  // [rows or 1, s]
  if (!keep.any(1).all().item<bool>()) return out;
  out.pad = keep.logical_not().expand({rows, m.size(3)});
  out.ok = true;
  return out;
}

// hf_attend, with the attention core where `kp` takes the step's mask.
at::Tensor fused_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& mask, const KeyPadding& kp, double scaling,
                        const at::Tensor& wo, const at::Tensor& bo, const at::Tensor* packed) {
  if (kp.takes(k)) {
    return project(attention_heads_cpu(q, k, v, kp.pad, scaling), wo, bo, packed);
  }
  return hf_attend(q, k, v, mask, scaling, wo, bo, packed);
}
}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hf_decoder_stack_step(
    const at::Tensor& x_in, at::TensorList weights, at::TensorList self_k, at::TensorList self_v,
    at::TensorList cross_k, at::TensorList cross_v, const std::optional<at::Tensor>& self_mask,
    const std::optional<at::Tensor>& cross_mask, at::ArrayRef<double> eps, int64_t heads,
    double scaling, int64_t act, bool normalize_before, at::TensorList packed,
    const std::optional<at::Tensor>& order, bool skip_zeros,
    const std::optional<at::TensorList>& room_k, const std::optional<at::TensorList>& room_v) {
  const int64_t layers = static_cast<int64_t>(self_k.size());
  const Rooms rooms("hf_decoder_stack_step", room_k, room_v, layers);
  // packs of q, k, v, out, cross q, cross out, fc1, fc2 (fused mode), or none
  const StackLists lists = cross_stack_lists("hf_decoder_stack_step", weights, self_k, self_v,
                                             cross_k, cross_v, eps, packed, act);
  const int64_t hd = step_head_dim(x_in, heads), bsz = x_in.size(0);
  // The fused mode on the CPU (float32) takes seqfuse's attention core for
  // sdpa where the masks (the same for every layer) are key paddings.
  const bool core = core_step(packed, x_in);
  const KeyPadding self_kp = core ? key_padding(self_mask, bsz) : KeyPadding{};
  const KeyPadding cross_kp = core ? key_padding(cross_mask, bsz) : KeyPadding{};
  std::vector<at::Tensor> new_k, new_v;
  new_k.reserve(layers);
  new_v.reserve(layers);
  at::Tensor x = x_in;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerLists L = lists.layer(l);
    const at::Tensor* W = L.W;
    const double* E = L.E;
    auto pk = [&L](int i) { return L.pack(i); };
    check_step_caches(l, bsz, heads, hd, order, self_k[l], self_v[l], &cross_k[l], &cross_v[l]);
    // self-attention
    at::Tensor residual = x;
    if (normalize_before) x = layer_norm(x, W[8], W[9], E[0]);
    at::Tensor q = project_heads(x, W[0], W[1], hd, pk(0));
    at::Tensor k =
        append_step(self_k[l], order, project_heads(x, W[2], W[3], hd, pk(1)), rooms.key(l));
    at::Tensor v =
        append_step(self_v[l], order, project_heads(x, W[4], W[5], hd, pk(2)), rooms.value(l));
    new_k.push_back(k);
    new_v.push_back(v);
    x = at::add(residual, fused_attend(q, k, v, self_mask, self_kp, scaling, W[6], W[7], pk(3)));
    if (!normalize_before) x = layer_norm(x, W[8], W[9], E[0]);
    // encoder attention (K/V cached since the first step)
    residual = x;
    if (normalize_before) x = layer_norm(x, W[14], W[15], E[1]);
    q = project_heads(x, W[10], W[11], hd, pk(4));
    x = at::add(residual, fused_attend(q, cross_k[l], cross_v[l], cross_mask, cross_kp, scaling,
                                       W[12], W[13], pk(5)));
    if (!normalize_before) x = layer_norm(x, W[14], W[15], E[1]);
    // feed-forward
    residual = x;
    if (normalize_before) x = layer_norm(x, W[20], W[21], E[2]);
    x = activation(project(x, W[16], W[17], pk(6)), act);
    x = at::add(residual, project(x, W[18], W[19], pk(7), skip_zeros));
    if (!normalize_before) x = layer_norm(x, W[20], W[21], E[2]);
  }
  return {x, new_k, new_v};
}

// FSMT's Attention.forward for one query step (time-major [1, bsz, C]),
// eager: the query projection times the scaling, the heads as
// [bsz * H, 1, hd], bmm with the keys, the key padding filled with the
// dtype's lowest value, softmax, bmm with the values, the heads merged back
// and the output projection. k, v: [bsz, H, t, hd] (the caches).
at::Tensor fsmt_attend(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq,
                       const at::Tensor* pq, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& key_pad, double scaling,
                       const at::Tensor& wo, const at::Tensor& bo, const at::Tensor* po,
                       int64_t heads, int64_t hd) {
  const int64_t bsz = x.size(1), c = x.size(2);
  const at::Tensor q =
      at::mul(project(x, wq, bq, pq), wrapped(scaling)).view({-1, bsz * heads, hd}).transpose(0, 1);
  const at::Tensor kk = k.reshape({bsz * heads, -1, hd});
  const at::Tensor vv = v.reshape({bsz * heads, -1, hd});
  at::Tensor w = at::bmm(q, kk.transpose(1, 2));
  if (key_pad.has_value() && key_pad->defined() && key_pad->dim() != 0) {
    const int64_t s = kk.size(1);
    w = w.view({bsz, heads, 1, s})
            .masked_fill(key_pad->unsqueeze(1).unsqueeze(2), std::numeric_limits<float>::lowest())
            .view({bsz * heads, 1, s});
  }
  w = at::softmax(w, -1);
  const at::Tensor o = at::bmm(w, vv).transpose(0, 1).contiguous().view({1, bsz, c});
  return project(o, wo, bo, po);
}
}  // namespace

// ---------------------------------------------------------------------------
// hf_t5_stack_step: one incremental step of a Hugging Face T5 decoder stack
// (transformers 5.x T5Block: T5LayerSelfAttention, T5LayerCrossAttention,
// T5LayerFF; T5Attention with sdpa and the relative position bias;
// T5LayerNorm; DynamicLayer.update), issuing their ATen calls for a
// one-token step. x is [bsz, 1, d_model]; position_bias [1, H, 1, t + 1] is
// the first layer's relative position bias for this step (the caller gets it
// from that layer's compute_bias, as the first layer does); masks are what
// the stack passes its blocks (None or 4-D, bool or float). weights: 12 per
// layer (self-attention norm, q, k, v, o, cross-attention norm, cross q,
// cross o, FF norm, wi or wi_0, wi_1 (empty unless gated), wo); eps: 3 per
// layer; act: hf_decoder_stack_step's codes and 5 (gelu_new); contiguous_mask:
// whether the release's create_position_bias_mask ends in .contiguous(); packed: none or
// 9 per layer (q, k, v, o, cross q, cross o, wi/wi_0, wi_1 (empty unless
// gated), wo). Returns (x, new K, new V). fp16 is the caller's to refuse
// (T5Block clamps fp16 activations; not mirrored here).
namespace {

// T5LayerNorm: weight * (h * rsqrt(mean(h.float()^2) + eps)), the weight's
// half dtype restored before the product.
at::Tensor t5_norm(const at::Tensor& h, const at::Tensor& w, double eps) {
  const at::Tensor var = h.to(at::kFloat).pow(2).mean({-1}, /*keepdim=*/true);
  at::Tensor y = at::mul(h, at::rsqrt(at::add(var, wrapped(eps))));
  if (w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16) y = y.to(w.scalar_type());
  return at::mul(w, y);
}

// sdpa_attention_forward's create_position_bias_mask for a one-token step
// (not causal): the bias where a bool mask allows, the dtype's lowest value
// elsewhere; bias + a float mask; the bias alone without one. `contiguous`:
// the release makes the result contiguous (5.23) or not (5.17).
at::Tensor position_bias_mask(const at::Tensor& bias, const std::optional<at::Tensor>& mask,
                              bool contiguous) {
  const auto done = [contiguous](const at::Tensor& t) { return contiguous ? t.contiguous() : t; };
  if (!mask.has_value() || !mask->defined()) return done(bias);
  if (mask->scalar_type() == at::kBool) {
    double lowest = 0.0;
    switch (bias.scalar_type()) {
      case at::kFloat:
        lowest = std::numeric_limits<float>::lowest();
        break;
      case at::kDouble:
        lowest = std::numeric_limits<double>::lowest();
        break;
      case at::kBFloat16:
        lowest = static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
        break;
      case at::kHalf:
        lowest = static_cast<double>(std::numeric_limits<c10::Half>::lowest());
        break;
      default:
        TORCH_CHECK(false, "hf_t5_stack_step: unsupported dtype ", bias.scalar_type());
    }
    return done(at::where(*mask, bias, at::Scalar(lowest)));
  }
  return done(at::add(bias, *mask));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hf_t5_stack_step(
    const at::Tensor& x_in, at::TensorList weights, at::TensorList self_k, at::TensorList self_v,
    at::TensorList cross_k, at::TensorList cross_v, const at::Tensor& position_bias,
    const std::optional<at::Tensor>& self_mask, const std::optional<at::Tensor>& cross_mask,
    at::ArrayRef<double> eps, int64_t heads, int64_t head_dim, int64_t act, bool gated,
    bool contiguous_mask, at::TensorList packed, const std::optional<at::Tensor>& order,
    bool skip_zeros, const std::optional<at::TensorList>& room_k,
    const std::optional<at::TensorList>& room_v) {
  constexpr int64_t kPer = 12, kPacks = 9;
  const int64_t layers = static_cast<int64_t>(self_k.size());
  const Rooms rooms("hf_t5_stack_step", room_k, room_v, layers);
  const StackLists lists("hf_t5_stack_step", layers, weights, kPer, eps, 3, packed, kPacks);
  TORCH_CHECK(static_cast<int64_t>(self_v.size()) == layers &&
                  static_cast<int64_t>(cross_k.size()) == layers &&
                  static_cast<int64_t>(cross_v.size()) == layers,
              "hf_t5_stack_step: self_v, cross_k, cross_v: one per layer");
  TORCH_CHECK(act >= 0 && act <= 5 && act != 1, "hf_t5_stack_step: unknown activation code ", act);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1, "x must be [bsz, 1, C], got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() != at::kHalf, "hf_t5_stack_step: fp16 runs the stock blocks");
  TORCH_CHECK(heads > 0 && head_dim > 0, "hf_t5_stack_step: heads and head_dim must be positive");
  const int64_t bsz = x_in.size(0);
  TORCH_CHECK(position_bias.dim() == 4 && position_bias.size(0) == 1 &&
                  position_bias.size(1) == heads && position_bias.size(2) == 1,
              "hf_t5_stack_step: position_bias must be [1, ", heads, ", 1, t], got ",
              position_bias.sizes());
  std::vector<at::Tensor> new_k, new_v;
  new_k.reserve(layers);
  new_v.reserve(layers);
  // The first layer's biases serve every layer (T5Stack passes them on); each
  // layer's sdpa makes the same mask of them, made once here.
  const at::Tensor self_bias = position_bias_mask(position_bias, self_mask, contiguous_mask);
  TORCH_CHECK(cross_k[0].dim() == 4, "hf_t5_stack_step: encoder K must be 4-d");
  const at::Tensor cross_zeros =
      at::zeros({1, heads, x_in.size(1), cross_k[0].size(2)}, x_in.options());
  const at::Tensor cross_bias = position_bias_mask(cross_zeros, cross_mask, contiguous_mask);
  at::Tensor x = x_in;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerLists L = lists.layer(l);
    const at::Tensor* W = L.W;
    const double* E = L.E;
    auto pk = [&L](int i) { return L.pack(i); };
    check_step_caches(l, bsz, heads, head_dim, order, self_k[l], self_v[l], &cross_k[l],
                      &cross_v[l]);
    const at::Tensor none;  // T5's projections have no bias
    // self-attention
    at::Tensor h = t5_norm(x, W[0], E[0]);
    at::Tensor q = project_heads(h, W[1], none, head_dim, pk(0));
    const at::Tensor k =
        append_step(self_k[l], order, project_heads(h, W[2], none, head_dim, pk(1)), rooms.key(l));
    const at::Tensor v = append_step(self_v[l], order,
                                     project_heads(h, W[3], none, head_dim, pk(2)), rooms.value(l));
    new_k.push_back(k);
    new_v.push_back(v);
    // T5Attention: sdpa with the position-bias mask and scale 1
    x = at::add(x, hf_attend(q, k, v, self_bias, 1.0, W[4], none, pk(3)));
    // encoder attention (K/V cached since the first step)
    h = t5_norm(x, W[5], E[1]);
    q = project_heads(h, W[6], none, head_dim, pk(4));
    x = at::add(x, hf_attend(q, cross_k[l], cross_v[l], cross_bias, 1.0, W[7], none, pk(5)));
    // feed-forward
    h = t5_norm(x, W[8], E[2]);
    at::Tensor f = activation(project(h, W[9], none, pk(6)), act);
    if (gated) f = at::mul(f, project(h, W[10], none, pk(7)));
    x = at::add(x, project(f, W[11], none, pk(8), skip_zeros));
  }
  return {x, new_k, new_v};
}

}  // namespace

// ---------------------------------------------------------------------------
// hf_llama_stack_step: one incremental step of a Hugging Face Llama decoder
// stack (transformers 5.x LlamaDecoderLayer, LlamaAttention with sdpa and
// rotary embeddings, LlamaMLP, LlamaRMSNorm, DynamicLayer.update), issuing
// their ATen calls for a one-token step. x is [bsz, 1, C]; cos / sin are the
// model's rotary embeddings for this step ([bsz, 1, head_dim], as the model
// passes its layers); mask is what the model passes its layers (None or 4-D).
// weights: 16 per layer (input norm, q w/b, k w/b, v w/b, o w/b, post norm,
// gate w/b, up w/b, down w/b; an empty tensor for an absent bias); eps: 2 per
// layer; gqa: how sdpa_attention_forward runs grouped K/V heads for this
// step, 0 one K/V head per query head, 1 sdpa's enable_gqa, 2 repeat_kv of K
// and V, 3 the query packed by K/V head (pack_gqa); packed: none or 7 per
// layer (q, k, v, o, gate, up, down: the fused mode, where on the CPU
// (float32) seqfuse's attention core also takes sdpa's place when the mask is
// a key padding). Returns (x, new K, new V).
namespace {

// LlamaRMSNorm: weight * (h.float() * rsqrt(mean(h.float()^2) + eps)).to(dtype).
at::Tensor llama_norm(const at::Tensor& h, const at::Tensor& w, double eps) {
  const at::ScalarType dtype = h.scalar_type();
  const at::Tensor f = h.to(at::kFloat);
  const at::Tensor var = f.pow(2).mean({-1}, /*keepdim=*/true);
  const at::Tensor y = at::mul(f, at::rsqrt(at::add(var, wrapped(eps))));
  return at::mul(w, y.to(dtype));
}

// apply_rotary_pos_emb for one of q / k: (t * cos) + (rotate_half(t) * sin).
at::Tensor rotate(const at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = t.size(-1) / 2;
  const at::Tensor x1 = t.slice(-1, 0, half);
  const at::Tensor x2 = t.slice(-1, half);
  const at::Tensor rotated = at::cat({at::neg(x2), x1}, -1);
  return at::add(at::mul(t, cos), at::mul(rotated, sin));
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hf_llama_stack_step(
    const at::Tensor& x_in, at::TensorList weights, at::TensorList self_k, at::TensorList self_v,
    const at::Tensor& cos_in, const at::Tensor& sin_in, const std::optional<at::Tensor>& mask,
    at::ArrayRef<double> eps, int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling,
    int64_t act, int64_t gqa, at::TensorList packed, const std::optional<at::Tensor>& order,
    const std::optional<at::TensorList>& room_k, const std::optional<at::TensorList>& room_v) {
  constexpr int64_t kPer = 16, kPacks = 7;
  const int64_t layers = static_cast<int64_t>(self_k.size());
  const Rooms rooms("hf_llama_stack_step", room_k, room_v, layers);
  const StackLists lists("hf_llama_stack_step", layers, weights, kPer, eps, 2, packed, kPacks);
  TORCH_CHECK(static_cast<int64_t>(self_v.size()) == layers,
              "hf_llama_stack_step: self_v: one per layer");
  TORCH_CHECK(act >= 0 && act <= 5 && act != 1, "hf_llama_stack_step: unknown activation ", act);
  TORCH_CHECK(gqa >= 0 && gqa <= 3, "hf_llama_stack_step: unknown gqa mode ", gqa);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1, "x must be [bsz, 1, C], got ", x_in.sizes());
  TORCH_CHECK(
      heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
      "hf_llama_stack_step: heads ", heads, ", K/V heads ", kv_heads, ", head size ", head_dim);
  TORCH_CHECK((gqa == 0) == (heads == kv_heads), "hf_llama_stack_step: gqa mode ", gqa, " for ",
              heads, " heads over ", kv_heads, " K/V heads");
  const int64_t bsz = x_in.size(0), rep = heads / kv_heads;
  const at::Tensor cos = cos_in.unsqueeze(1), sin = sin_in.unsqueeze(1);
  // the fused mode's attention core where the mask is a key padding (as
  // hf_decoder_stack_step's; query head h reads K/V head h / rep)
  const bool core = core_step(packed, x_in);
  const KeyPadding kp = core ? key_padding(mask, bsz) : KeyPadding{};
  std::vector<at::Tensor> new_k, new_v;
  new_k.reserve(layers);
  new_v.reserve(layers);
  at::Tensor x = x_in;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerLists L = lists.layer(l);
    const at::Tensor* W = L.W;
    const double* E = L.E;
    auto pk = [&L](int i) { return L.pack(i); };
    check_step_caches(l, bsz, kv_heads, head_dim, order, self_k[l], self_v[l]);
    // self-attention
    at::Tensor residual = x;
    const at::Tensor h = llama_norm(x, W[0], E[0]);
    at::Tensor q = project_heads(h, W[1], W[2], head_dim, pk(0));
    at::Tensor k = project_heads(h, W[3], W[4], head_dim, pk(1));
    const at::Tensor v_step = project_heads(h, W[5], W[6], head_dim, pk(2));
    q = rotate(q, cos, sin);
    k = rotate(k, cos, sin);
    k = append_step(self_k[l], order, k, rooms.key(l));
    const at::Tensor v = append_step(self_v[l], order, v_step, rooms.value(l));
    new_k.push_back(k);
    new_v.push_back(v);
    at::Tensor o;
    if (kp.takes(k)) {
      o = attention_heads_cpu(q, k, v, kp.pad, scaling);  // [bsz, 1, heads * head_dim]
    } else if (gqa == 2) {                                // repeat_kv
      const int64_t t = k.size(2);
      const at::Tensor kk = k.unsqueeze(2)
                                .expand({bsz, kv_heads, rep, t, head_dim})
                                .reshape({bsz, heads, t, head_dim});
      const at::Tensor vv = v.unsqueeze(2)
                                .expand({bsz, kv_heads, rep, t, head_dim})
                                .reshape({bsz, heads, t, head_dim});
      o = at::scaled_dot_product_attention(q, kk, vv, mask, 0.0, false, scaling);
    } else if (gqa == 3) {  // pack_gqa: the query by K/V head; a mask for all heads as is
      std::optional<at::Tensor> m = mask;
      if (m.has_value() && m->defined() && m->size(1) != 1) {
        m = m->reshape({m->size(0), heads / rep, rep, m->size(-1)});
      }
      o = at::scaled_dot_product_attention(q.reshape({bsz, heads / rep, rep, head_dim}), k, v, m,
                                           0.0, false, scaling);
    } else {
      o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, scaling,
                                           /*enable_gqa=*/gqa == 1);
    }
    if (o.dim() == 4) o = merge_heads(o, 1, v.size(-1));
    x = at::add(residual, project(o, W[7], W[8], pk(3)));
    // MLP
    residual = x;
    const at::Tensor g = llama_norm(x, W[9], E[1]);
    const at::Tensor a = activation(project(g, W[10], W[11], pk(4)), act);
    const at::Tensor f = at::mul(a, project(g, W[12], W[13], pk(5)));
    x = at::add(residual, project(f, W[14], W[15], pk(6)));
  }
  return {x, new_k, new_v};
}

}  // namespace

// One incremental step of a Hugging Face FSMT decoder (transformers 5.x
// DecoderLayer, its eager Attention, DynamicLayer.update), op for op, on the
// decoder's time-major x [1, bsz, C]. weights, eps, packed: as
// hf_decoder_stack_step's (FSMT's layers name their modules as BART's);
// cross_pad: the inverted encoder mask [bsz, S] (True: padding) or None.
// Returns (x, new K, new V).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hf_fsmt_stack_step(
    const at::Tensor& x_in, at::TensorList weights, at::TensorList self_k, at::TensorList self_v,
    at::TensorList cross_k, at::TensorList cross_v, const std::optional<at::Tensor>& cross_pad,
    at::ArrayRef<double> eps, int64_t heads, double scaling, int64_t act, at::TensorList packed,
    const std::optional<at::Tensor>& order, bool skip_zeros,
    const std::optional<at::TensorList>& room_k, const std::optional<at::TensorList>& room_v) {
  const int64_t layers = static_cast<int64_t>(self_k.size());
  const Rooms rooms("hf_fsmt_stack_step", room_k, room_v, layers);
  const StackLists lists = cross_stack_lists("hf_fsmt_stack_step", weights, self_k, self_v, cross_k,
                                             cross_v, eps, packed, act);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(0) == 1, "x must be [1, bsz, C], got ", x_in.sizes());
  // (the padding's fill is float32's lowest value, finfo(float32).min)
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "hf_fsmt_stack_step: float32 only");
  TORCH_CHECK(heads > 0 && x_in.size(2) % heads == 0, "embed dim ", x_in.size(2),
              " not divisible by ", heads, " heads");
  const int64_t bsz = x_in.size(1), hd = x_in.size(2) / heads;
  // The fused mode on the CPU: seqfuse's attention core for the eager
  // attention where every row has a key to attend (a key filled with the
  // lowest float gets weight 0, as a masked one in the core; a row all
  // padding averages every value in FSMT's softmax: eager attention there).
  const bool core = core_step(packed, x_in);
  bool cross_core = core;
  std::optional<at::Tensor> cross_kpad;
  if (core && cross_pad.has_value() && cross_pad->defined() && cross_pad->dim() != 0) {
    const at::Tensor& cp = *cross_pad;
    cross_core = (cp.scalar_type() == at::kBool || cp.scalar_type() == at::kByte) &&
                 cp.dim() == 2 && cp.size(0) == bsz && !cp.ne(0).all(1).any().item<bool>();
    if (cross_core) cross_kpad = cp;
  }
  // the core's attention and output projection, time-major as fsmt_attend's
  auto core_attend = [&](const at::Tensor& x, const at::Tensor& wq, const at::Tensor& bq,
                         const at::Tensor* pq, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& pad, const at::Tensor& wo,
                         const at::Tensor& bo, const at::Tensor* po) {
    const at::Tensor q = project(x, wq, bq, pq).view({bsz, 1, heads, hd}).transpose(1, 2);
    const at::Tensor o = attention_heads_cpu(q, k, v, pad, scaling);  // [bsz, 1, C]
    return project(o.view({1, bsz, heads * hd}), wo, bo, po);
  };
  std::vector<at::Tensor> new_k, new_v;
  new_k.reserve(layers);
  new_v.reserve(layers);
  at::Tensor x = x_in;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerLists L = lists.layer(l);
    const at::Tensor* W = L.W;
    const double* E = L.E;
    auto pk = [&L](int i) { return L.pack(i); };
    check_step_caches(l, bsz, heads, hd, order, self_k[l], self_v[l], &cross_k[l], &cross_v[l]);
    // self-attention: K/V of the step as [bsz, H, 1, hd], appended
    at::Tensor residual = x;
    auto heads_of = [&](const at::Tensor& t) {
      return t.view({-1, bsz, heads, hd}).permute({1, 2, 0, 3});
    };
    const at::Tensor k =
        append_step(self_k[l], order, heads_of(project(x, W[2], W[3], pk(1))), rooms.key(l));
    const at::Tensor v =
        append_step(self_v[l], order, heads_of(project(x, W[4], W[5], pk(2))), rooms.value(l));
    new_k.push_back(k);
    new_v.push_back(v);
    x = at::add(residual,
                core ? core_attend(x, W[0], W[1], pk(0), k, v, std::nullopt, W[6], W[7], pk(3))
                     : fsmt_attend(x, W[0], W[1], pk(0), k, v, std::nullopt, scaling, W[6], W[7],
                                   pk(3), heads, hd));
    x = layer_norm(x, W[8], W[9], E[0]);
    // encoder attention (K/V cached since the first step)
    residual = x;
    x = at::add(residual, cross_core
                              ? core_attend(x, W[10], W[11], pk(4), cross_k[l], cross_v[l],
                                            cross_kpad, W[12], W[13], pk(5))
                              : fsmt_attend(x, W[10], W[11], pk(4), cross_k[l], cross_v[l],
                                            cross_pad, scaling, W[12], W[13], pk(5), heads, hd));
    x = layer_norm(x, W[14], W[15], E[1]);
    // feed-forward
    residual = x;
    x = activation(project(x, W[16], W[17], pk(6)), act);
    x = at::add(residual, project(x, W[18], W[19], pk(7), skip_zeros));
    x = layer_norm(x, W[20], W[21], E[2]);
  }
  return {x, new_k, new_v};
}

// One incremental step of a GPT-2 block stack (transformers 5.x GPT2Block,
// GPT2Attention with sdpa, GPT2MLP, Conv1D, DynamicLayer.update), op for op.
// weights: 12 per layer (ln_1 w/b, c_attn w/b, attn.c_proj w/b, ln_2 w/b,
// mlp.c_fc w/b, mlp.c_proj w/b); eps: 2 per layer; scalings: 1 per layer;
// packed: none or 4 per layer (packs of the Conv1D weights' transposes; the
// fused mode, where on the CPU (float32) seqfuse's attention core also takes
// sdpa's place when the mask is a key padding). Returns (x, new K, new V).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> hf_gpt2_stack_step(
    const at::Tensor& x_in, at::TensorList weights, at::TensorList self_k, at::TensorList self_v,
    const std::optional<at::Tensor>& mask, at::ArrayRef<double> eps, at::ArrayRef<double> scalings,
    int64_t heads, int64_t act, at::TensorList packed, const std::optional<at::Tensor>& order,
    bool skip_zeros, const std::optional<at::TensorList>& room_k,
    const std::optional<at::TensorList>& room_v) {
  constexpr int64_t kPer = 12, kPacks = 4;
  const int64_t layers = static_cast<int64_t>(self_k.size());
  const Rooms rooms("hf_gpt2_stack_step", room_k, room_v, layers);
  const StackLists lists("hf_gpt2_stack_step", layers, weights, kPer, eps, 2, packed, kPacks);
  TORCH_CHECK(static_cast<int64_t>(self_v.size()) == layers &&
                  static_cast<int64_t>(scalings.size()) == layers,
              "hf_gpt2_stack_step: self_v, scalings: one per layer");
  TORCH_CHECK(act == 0 || act == 2 || act == 3 || act == 4 || act == 5,
              "hf_gpt2_stack_step: unknown activation code ", act);
  const int64_t hd = step_head_dim(x_in, heads), bsz = x_in.size(0), embed = x_in.size(2);
  // the fused mode's attention core where the mask is a key padding (as
  // hf_decoder_stack_step's)
  const bool core = core_step(packed, x_in);
  const KeyPadding kp = core ? key_padding(mask, bsz) : KeyPadding{};
  std::vector<at::Tensor> new_k, new_v;
  new_k.reserve(layers);
  new_v.reserve(layers);
  at::Tensor x = x_in;
  for (int64_t l = 0; l < layers; ++l) {
    const LayerLists L = lists.layer(l);
    const at::Tensor* W = L.W;
    const double* E = L.E;
    auto pk = [&L](int i) { return L.pack(i); };
    check_step_caches(l, bsz, heads, hd, order, self_k[l], self_v[l]);
    // attention: split of c_attn's output, heads, cache append, sdpa, c_proj
    at::Tensor residual = x;
    const at::Tensor h = layer_norm(x, W[0], W[1], E[0]);
    const std::vector<at::Tensor> qkv = conv1d(h, W[2], W[3], pk(0)).split(embed, 2);
    auto heads_of = [&](const at::Tensor& t) {
      return t.view({t.size(0), t.size(1), -1, hd}).transpose(1, 2);
    };
    const at::Tensor q = heads_of(qkv[0]);
    const at::Tensor k = append_step(self_k[l], order, heads_of(qkv[1]), rooms.key(l));
    const at::Tensor v = append_step(self_v[l], order, heads_of(qkv[2]), rooms.value(l));
    new_k.push_back(k);
    new_v.push_back(v);
    const at::Tensor o =
        kp.takes(k) ? attention_heads_cpu(q, k, v, kp.pad, scalings[l])
                    : merge_heads(at::scaled_dot_product_attention(
                                      q, k, v, mask, 0.0, /*is_causal=*/false, scalings[l]),
                                  q.size(2), v.size(-1));
    x = at::add(conv1d(o, W[4], W[5], pk(1)), residual);  // attn_output + residual
    // MLP
    residual = x;
    const at::Tensor f =
        activation(conv1d(layer_norm(x, W[6], W[7], E[1]), W[8], W[9], pk(2)), act);
    x = at::add(residual, conv1d(f, W[10], W[11], pk(3), skip_zeros));
  }
  return {x, new_k, new_v};
}

}  // namespace seqfuse

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  // Contract: the comment at the top of this file and seqfuse/layers/exact_step.py.
  m.def(
      "decoder_stack_step(Tensor x, Tensor[] weights, Tensor[] self_k, Tensor[] self_v, "
      "Tensor[] cross_k, Tensor[] cross_v, Tensor?[] cross_pad, float[] eps, int heads, "
      "float scaling, int act, bool normalize_before, int align_layer) -> "
      "(Tensor, Tensor[], Tensor[], Tensor[], Tensor?)");
  m.def(
      "hf_decoder_stack_step(Tensor x, Tensor[] weights, Tensor[] self_k, Tensor[] self_v, "
      "Tensor[] cross_k, Tensor[] cross_v, Tensor? self_mask, Tensor? cross_mask, float[] eps, "
      "int heads, float scaling, int act, bool normalize_before, Tensor[] packed, "
      "Tensor? order=None, bool skip_zeros=False, Tensor[]? room_k=None, Tensor[]? room_v=None) -> "
      "(Tensor, Tensor[], Tensor[])");
  m.def(
      "hf_t5_stack_step(Tensor x, Tensor[] weights, Tensor[] self_k, Tensor[] self_v, "
      "Tensor[] cross_k, Tensor[] cross_v, Tensor position_bias, Tensor? self_mask, "
      "Tensor? cross_mask, float[] eps, int heads, int head_dim, int act, bool gated, "
      "bool contiguous_mask, Tensor[] packed, Tensor? order=None, bool skip_zeros=False, "
      "Tensor[]? room_k=None, Tensor[]? room_v=None) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "hf_llama_stack_step(Tensor x, Tensor[] weights, Tensor[] self_k, Tensor[] self_v, "
      "Tensor cos, Tensor sin, Tensor? mask, float[] eps, int heads, int kv_heads, "
      "int head_dim, float scaling, int act, int gqa, Tensor[] packed, "
      "Tensor? order=None, Tensor[]? room_k=None, "
      "Tensor[]? room_v=None) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "hf_fsmt_stack_step(Tensor x, Tensor[] weights, Tensor[] self_k, Tensor[] self_v, "
      "Tensor[] cross_k, Tensor[] cross_v, Tensor? cross_pad, float[] eps, int heads, "
      "float scaling, int act, Tensor[] packed, Tensor? order=None, bool skip_zeros=False, "
      "Tensor[]? room_k=None, Tensor[]? room_v=None) -> (Tensor, Tensor[], Tensor[])");
  m.def(
      "hf_gpt2_stack_step(Tensor x, Tensor[] weights, Tensor[] self_k, Tensor[] self_v, "
      "Tensor? mask, float[] eps, float[] scalings, int heads, int act, Tensor[] packed, "
      "Tensor? order=None, bool skip_zeros=False, Tensor[]? room_k=None, Tensor[]? room_v=None) -> "
      "(Tensor, Tensor[], Tensor[])");
}

// Only ATen calls: one implementation serves every backend.
TORCH_LIBRARY_IMPL(seqfuse, CompositeExplicitAutograd, m) {
  m.impl("decoder_stack_step", &seqfuse::decoder_stack_step);
  m.impl("hf_decoder_stack_step", &seqfuse::hf_decoder_stack_step);
  m.impl("hf_gpt2_stack_step", &seqfuse::hf_gpt2_stack_step);
  m.impl("hf_fsmt_stack_step", &seqfuse::hf_fsmt_stack_step);
  m.impl("hf_t5_stack_step", &seqfuse::hf_t5_stack_step);
  m.impl("hf_llama_stack_step", &seqfuse::hf_llama_stack_step);
}
