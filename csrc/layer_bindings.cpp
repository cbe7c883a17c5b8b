// Schemas and shared argument checks of the fused layer ops; the CPU kernels
// are attached here, the CUDA ones in csrc/cuda_layer_bindings.cpp.
#include <torch/library.h>

#include "layer_ops.h"

namespace seqfuse {

namespace {
void check_vec(const std::optional<at::Tensor>& t, const at::Tensor& ref, int64_t n,
               const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, " must have shape (", n, "), got ",
              t->sizes());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t->scalar_type() == ref.scalar_type() && t->device() == ref.device(), name,
              " must have the dtype and device of x");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> add_layernorm_prepare(const at::Tensor& x,
                                                         const std::optional<at::Tensor>& bias,
                                                         const std::optional<at::Tensor>& residual,
                                                         const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& beta,
                                                         double eps, bool want_sum,
                                                         kernels::AddLayerNormParams* p) {
  SEQFUSE_CHECK_FLOAT(x);
  SEQFUSE_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 2, "x must be [rows, cols], got ", x.sizes());
  const int64_t rows = x.size(0), cols = x.size(1);
  check_vec(bias, x, cols, "bias");
  check_vec(weight, x, cols, "weight");
  check_vec(beta, x, cols, "beta");
  TORCH_CHECK(weight.has_value() == beta.has_value(), "weight and beta go together");
  TORCH_CHECK(weight.has_value() || want_sum, "nothing to compute");
  if (residual.has_value()) {
    SEQFUSE_CHECK_SAME(*residual, x);
    SEQFUSE_CHECK_CONTIGUOUS(*residual);
    SEQFUSE_CHECK_SHAPE(*residual, rows, cols);
  }
  at::Tensor sum = want_sum ? at::empty_like(x) : at::Tensor();
  at::Tensor normed = weight.has_value() ? at::empty_like(x) : at::Tensor();
  p->x = x.data_ptr();
  p->bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p->residual = residual.has_value() ? residual->data_ptr() : nullptr;
  p->weight = weight.has_value() ? weight->data_ptr() : nullptr;
  p->beta = beta.has_value() ? beta->data_ptr() : nullptr;
  p->sum = want_sum ? sum.data_ptr() : nullptr;
  p->normed = weight.has_value() ? normed.data_ptr() : nullptr;
  p->rows = rows;
  p->cols = cols;
  p->eps = static_cast<float>(eps);
  return {sum, normed};
}

void bias_act_prepare(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t act,
                      kernels::BiasActParams* p) {
  SEQFUSE_CHECK_FLOAT(x);
  SEQFUSE_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 2, "x must be [rows, cols], got ", x.sizes());
  TORCH_CHECK(act >= kernels::kActLinear && act <= kernels::kActTanh, "unknown activation ", act);
  check_vec(bias, x, x.size(1), "bias");
  p->x = x.data_ptr();
  p->bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p->rows = x.size(0);
  p->cols = x.size(1);
  p->act = static_cast<int>(act);
}

std::tuple<at::Tensor, at::Tensor> attention_prepare(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_rows, const std::optional<at::Tensor>& key_pad,
    int64_t heads, double scaling, int64_t q_per_kv, int64_t causal_offset, bool need_weights,
    kernels::AttentionParams* p) {
  SEQFUSE_CHECK_FLOAT(q);
  SEQFUSE_CHECK_SAME(k, q);
  SEQFUSE_CHECK_SAME(v, q);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "q, k, v must be [time, rows, channels]");
  const int64_t tq = q.size(0), n = q.size(1), c = q.size(2);
  const int64_t s = k.size(0), m = k.size(1);
  TORCH_CHECK(heads >= 1 && c % heads == 0, "channels ", c, " not divisible by heads ", heads);
  TORCH_CHECK(k.size(2) == c && v.size(2) == c, "k and v must have ", c, " channels");
  TORCH_CHECK(v.size(0) == s && v.size(1) == m, "k and v must have the same shape");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "channels of q, k, v must be contiguous");
  TORCH_CHECK(q_per_kv >= 1 && n % q_per_kv == 0, "rows ", n, " not a multiple of q_per_kv ",
              q_per_kv);
  const int64_t g = n / q_per_kv;
  TORCH_CHECK(causal_offset >= -1, "causal_offset must be >= -1");
  p->rows = nullptr;
  p->rows_sg = p->rows_sj = 0;
  if (kv_rows.has_value()) {
    const at::Tensor& r = *kv_rows;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.device() == q.device(),
                "kv_rows must be int64 on the device of q");
    TORCH_CHECK(
        (r.dim() == 1 && r.size(0) == g) || (r.dim() == 2 && r.size(0) == g && r.size(1) >= s),
        "kv_rows must be [", g, "] or [", g, ", >=", s, "], got ", r.sizes());
    p->rows = r.data_ptr<int64_t>();
    p->rows_sg = r.stride(0);
    p->rows_sj = r.dim() == 2 ? r.stride(1) : 0;
  } else {
    TORCH_CHECK(m == g, "without kv_rows k must have ", g, " rows, got ", m);
  }
  p->pad = nullptr;
  p->pad_sm = p->pad_sj = 0;
  if (key_pad.has_value()) {
    const at::Tensor& kp = *key_pad;
    TORCH_CHECK(kp.scalar_type() == at::kBool || kp.scalar_type() == at::kByte,
                "key_pad must be bool or uint8");
    TORCH_CHECK(kp.device() == q.device(), "key_pad must be on the device of q");
    SEQFUSE_CHECK_SHAPE(kp, m, s);
    p->pad = reinterpret_cast<const uint8_t*>(kp.data_ptr());
    p->pad_sm = kp.stride(0);
    p->pad_sj = kp.stride(1);
  }
  at::Tensor out = at::empty({tq, n, c}, q.options());
  at::Tensor w =
      need_weights ? at::empty({heads, n, tq, s}, q.options().dtype(at::kFloat)) : at::Tensor();
  p->q = q.data_ptr();
  p->q_st = q.stride(0);
  p->q_sn = q.stride(1);
  p->k = k.data_ptr();
  p->k_ss = k.stride(0);
  p->k_sm = k.stride(1);
  p->v = v.data_ptr();
  p->v_ss = v.stride(0);
  p->v_sm = v.stride(1);
  p->out = out.data_ptr();
  p->weights = need_weights ? w.data_ptr<float>() : nullptr;
  p->tq = tq;
  p->n = n;
  p->s = s;
  p->heads = heads;
  p->dim = c / heads;
  p->q_per_kv = q_per_kv;
  p->causal_offset = causal_offset;
  p->scaling = static_cast<float>(scaling);
  return {out, w};
}

at::Tensor embedding_prepare(const at::Tensor& tokens, const at::Tensor& table, double scale,
                             const std::optional<at::Tensor>& pos_table, int64_t pad,
                             int64_t pos_mode, int64_t fixed_pos, bool zero_pads,
                             kernels::EmbeddingParams* p) {
  SEQFUSE_CHECK_FLOAT(table);
  SEQFUSE_CHECK_CONTIGUOUS(table);
  TORCH_CHECK(table.dim() == 2, "table must be [vocab, cols]");
  TORCH_CHECK(
      tokens.scalar_type() == at::kLong && tokens.dim() == 2 && tokens.device() == table.device(),
      "tokens must be int64 [batch, time] on the device of table");
  TORCH_CHECK(pos_mode >= 0 && pos_mode <= 2, "pos_mode must be 0, 1 or 2");
  TORCH_CHECK(pos_table.has_value() == (pos_mode != 0), "pos_table goes with pos_mode 1 or 2");
  const int64_t b = tokens.size(0), t = tokens.size(1), cols = table.size(1);
  p->pos_table = nullptr;
  p->npos = 0;
  if (pos_table.has_value()) {
    SEQFUSE_CHECK_SAME(*pos_table, table);
    SEQFUSE_CHECK_CONTIGUOUS(*pos_table);
    TORCH_CHECK(pos_table->dim() == 2 && pos_table->size(1) == cols,
                "pos_table must be [positions, ", cols, "]");
    p->pos_table = pos_table->data_ptr();
    p->npos = pos_table->size(0);
    const int64_t max_pos = pos_mode == 2 ? fixed_pos : pad + t;
    TORCH_CHECK(max_pos >= 0 && max_pos < p->npos, "position ", max_pos, " outside the table of ",
                p->npos);
  }
  at::Tensor out = at::empty({t, b, cols}, table.options());
  p->tokens = tokens.data_ptr<int64_t>();
  p->tok_sb = tokens.stride(0);
  p->tok_st = tokens.stride(1);
  p->table = table.data_ptr();
  p->out = out.data_ptr();
  p->b = b;
  p->t = t;
  p->cols = cols;
  p->vocab = table.size(0);
  p->pad = pad;
  p->fixed_pos = fixed_pos;
  p->pos_mode = static_cast<int>(pos_mode);
  p->zero_pads = zero_pads;
  p->scale = static_cast<float>(scale);
  return out;
}

}  // namespace seqfuse

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  // Contracts: seqfuse/ops/add_layernorm.py, bias_act.py, attention.py, embedding.py.
  m.def(
      "add_layernorm(Tensor x, Tensor? bias, Tensor? residual, Tensor? weight, Tensor? beta, "
      "float eps, bool want_sum) -> (Tensor, Tensor)");
  m.def("bias_act_(Tensor(a!) x, Tensor? bias, int act) -> Tensor(a!)");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? kv_rows, Tensor? key_pad, int heads, "
      "float scaling, int q_per_kv, int causal_offset, bool need_weights) -> (Tensor, Tensor)");
  m.def(
      "embedding(Tensor tokens, Tensor table, float scale, Tensor? pos_table, int pad, "
      "int pos_mode, int fixed_pos, bool zero_pads) -> Tensor");
  m.def("attention_heads(Tensor q, Tensor k, Tensor v, Tensor? key_pad, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("add_layernorm", &seqfuse::add_layernorm_cpu);
  m.impl("bias_act_", &seqfuse::bias_act_cpu);
  m.impl("attention", &seqfuse::attention_cpu);
  m.impl("embedding", &seqfuse::embedding_cpu);
  m.impl("attention_heads", &seqfuse::attention_heads_cpu);
}
