// seqfuse::select_active (CPU): the end of a beam-search step, after the
// finished hypotheses are taken: which candidates continue, and the token,
// score and attention histories gathered for them. One call instead of a
// dozen small torch ops per step (fairseq's SequenceGenerator does, per
// sentence s with candidates j < 2k and beams k):
//
//   mask[s, j]    = eos[s, j] | (j < k & ignore[s, j])
//   hypos[s, :]   = the k smallest of mask * 2k + j (ascending): the first
//                   unmasked candidates in candidate order, then masked ones
//   new_ignore    = mask at those candidates
//   bbsz[s * k + i] = cand_bbsz[s, hypos[s, i]]
//   tokens[:, :step + 1] = tokens[bbsz, :step + 1]; tokens[:, step + 1] = the
//   candidates' tokens; scores[:, :step] = scores[bbsz, :step]; scores[:, step]
//   = the candidates' scores; attn[:, :, :step + 2] = attn[bbsz, :, :step + 2]
//
// Only copies and integer compares: the results equal the torch ops' exactly.
// The contract and the torch version (other devices): seqfuse/ops/search.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "ops.h"

namespace seqfuse {
namespace {

// Row r of a [n, sub, ld] buffer <- row order[r], for the first `width`
// elements of each of its `sub` sub-rows (order may repeat and permute rows:
// read from a copy). tokens and scores are sub = 1; attn [rows, S, T] is S.
// The copy lives in a buffer kept between calls (one per thread and type:
// a fresh one was allocated and zeroed every step); both passes split their
// rows over the threads when there is enough to copy (attn: rows x source
// length x steps, a few hundred KB a step at batch 64, which the other
// threads otherwise wait out).
template <typename T>
void gather_rows(T* data, int64_t n, int64_t sub, int64_t ld, int64_t width, const int64_t* order) {
  if (width <= 0 || n == 0) return;
  static thread_local std::vector<T> copy;
  const size_t need = static_cast<size_t>(n * sub * width);
  if (copy.size() < need) copy.resize(need);
  T* old = copy.data();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (sub * width));
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b * sub; i < e * sub; ++i)
      std::memcpy(old + i * width, data + i * ld, width * sizeof(T));
  });
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      for (int64_t q = 0; q < sub; ++q)
        std::memcpy(data + (r * sub + q) * ld, old + (order[r] * sub + q) * width,
                    width * sizeof(T));
  });
}

// A [rows, cols] CPU tensor of `type` whose rows are contiguous (with
// `strided`, rows may lie apart: a slice of wider rows); returns its row
// stride.
int64_t check_2d(const at::Tensor& t, const char* name, at::ScalarType type, int64_t rows,
                 int64_t cols, bool strided = false) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == 2 && t.size(0) == rows &&
                  (cols < 0 || t.size(1) == cols) &&
                  (strided ? (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= t.size(1)
                           : t.is_contiguous()),
              "beam search step: ", name, " must be a ",
              strided ? "row-contiguous " : "contiguous ", type, " CPU tensor [", rows, ", ", cols,
              "], got ", t.sizes(), " ", t.scalar_type());
  return t.stride(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_active_cpu(
    const at::Tensor& eos_mask, const at::Tensor& ignore, const at::Tensor& cand_bbsz,
    const at::Tensor& cand_tokens, const at::Tensor& cand_scores, at::Tensor tokens,
    at::Tensor scores, const std::optional<at::Tensor>& attn, int64_t step) {
  TORCH_CHECK(eos_mask.dim() == 2 && ignore.dim() == 2, "select_active: 2-D masks expected");
  const int64_t bsz = eos_mask.size(0), c2 = eos_mask.size(1), k = ignore.size(1);
  TORCH_CHECK(k > 0 && c2 >= k, "select_active: ", c2, " candidates for ", k, " beams");
  check_2d(eos_mask, "eos_mask", at::kBool, bsz, c2);
  check_2d(ignore, "cands_to_ignore", at::kBool, bsz, k);
  check_2d(cand_bbsz, "cand_bbsz_idx", at::kLong, bsz, c2);
  const int64_t ld_ct = check_2d(cand_tokens, "cand_indices", at::kLong, bsz, c2, true);
  const int64_t ld_cs = check_2d(cand_scores, "cand_scores", at::kFloat, bsz, c2, true);
  const int64_t rows = bsz * k;
  check_2d(tokens, "tokens", at::kLong, rows, -1);
  check_2d(scores, "scores", at::kFloat, rows, -1);
  TORCH_CHECK(step >= 0 && step + 2 <= tokens.size(1) && step + 1 <= scores.size(1),
              "select_active: step ", step, " outside the buffers");
  if (attn.has_value()) {
    TORCH_CHECK(attn->device().is_cpu() && attn->scalar_type() == at::kFloat && attn->dim() == 3 &&
                    attn->is_contiguous() && attn->size(0) == rows && step + 2 <= attn->size(2),
                "select_active: attn must be a contiguous float32 CPU tensor [", rows,
                ", S, >= ", step + 2, "], got ", attn->sizes());
  }

  at::Tensor hypos = at::empty({bsz, k}, cand_bbsz.options());
  at::Tensor new_ignore = at::empty({bsz, k}, ignore.options());
  at::Tensor bbsz = at::empty({rows}, cand_bbsz.options());
  const bool* eos = eos_mask.data_ptr<bool>();
  const bool* ign = ignore.data_ptr<bool>();
  const int64_t* cb = cand_bbsz.data_ptr<int64_t>();
  const int64_t* ct = cand_tokens.data_ptr<int64_t>();
  const float* cs = cand_scores.data_ptr<float>();
  int64_t* hy = hypos.data_ptr<int64_t>();
  bool* ni = new_ignore.data_ptr<bool>();
  int64_t* bb = bbsz.data_ptr<int64_t>();
  for (int64_t s = 0; s < bsz; ++s) {
    int64_t n = 0;
    for (int pass = 0; pass < 2 && n < k; ++pass) {
      for (int64_t j = 0; j < c2 && n < k; ++j) {
        const bool masked = eos[s * c2 + j] || (j < k && ign[s * k + j]);
        if (masked != (pass == 1)) continue;
        hy[s * k + n] = j;
        ni[s * k + n] = masked;
        ++n;
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      const int64_t b = cb[s * c2 + hy[s * k + i]];
      TORCH_CHECK(b >= 0 && b < rows, "select_active: candidate row ", b, " outside ", rows);
      bb[s * k + i] = b;
    }
  }

  int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t ld_tok = tokens.size(1);
  gather_rows(tok, rows, 1, ld_tok, step + 1, bb);
  float* sc = scores.data_ptr<float>();
  const int64_t ld_sc = scores.size(1);
  gather_rows(sc, rows, 1, ld_sc, step, bb);
  for (int64_t s = 0; s < bsz; ++s) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t r = s * k + i, j = hy[r];
      tok[r * ld_tok + step + 1] = ct[s * ld_ct + j];
      sc[r * ld_sc + step] = cs[s * ld_cs + j];
    }
  }
  if (attn.has_value()) {
    at::Tensor a = *attn;
    gather_rows(a.data_ptr<float>(), rows, a.size(1), a.size(2), step + 2, bb);
  }
  return {bbsz, hypos, new_ignore};
}

// seqfuse::finished_candidates (CPU): which EOS candidates of this step
// become finished hypotheses, before select_active. The torch version and the
// contract (seqfuse/ops/search.py, finished_candidates_torch):
//
//   cand_bbsz[s, j] = s * k + cand_beams[s, j]
//   eos_mask[s, j]  = cand_tokens[s, j] == eos & cand_scores[s, j] != -inf,
//                     false for j < k where ignore[s, j]
//   take[s, j]      = eos_mask[s, j] & !done[s]   (j < k)
//   rank[s, j]      = n_fin[sent_ids[s]] + (takes at or before j) - 1
//   take[s, j]     &= rank[s, j] < k
//
// Integer compares and counts only: equal to the torch ops exactly.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool>
finished_candidates_cpu(const at::Tensor& cand_scores, const at::Tensor& cand_tokens,
                        const at::Tensor& cand_beams, const at::Tensor& ignore,
                        const at::Tensor& done, const at::Tensor& n_fin, const at::Tensor& sent_ids,
                        int64_t eos) {
  TORCH_CHECK(cand_scores.dim() == 2 && ignore.dim() == 2,
              "finished_candidates: 2-D candidates expected");
  const int64_t bsz = cand_scores.size(0), c2 = cand_scores.size(1), k = ignore.size(1);
  TORCH_CHECK(k > 0 && c2 >= k, "finished_candidates: ", c2, " candidates for ", k, " beams");
  const int64_t ld_cs = check_2d(cand_scores, "cand_scores", at::kFloat, bsz, c2, true);
  const int64_t ld_ct = check_2d(cand_tokens, "cand_indices", at::kLong, bsz, c2, true);
  const int64_t ld_cb = check_2d(cand_beams, "cand_beams", at::kLong, bsz, c2, true);
  check_2d(ignore, "cands_to_ignore", at::kBool, bsz, k);
  TORCH_CHECK(done.device().is_cpu() && done.scalar_type() == at::kBool && done.dim() == 1 &&
                  done.size(0) == bsz && done.is_contiguous(),
              "finished_candidates: done must be a contiguous bool CPU tensor [", bsz, "]");
  TORCH_CHECK(sent_ids.device().is_cpu() && sent_ids.scalar_type() == at::kLong &&
                  sent_ids.dim() == 1 && sent_ids.size(0) == bsz && sent_ids.is_contiguous(),
              "finished_candidates: sent_ids must be a contiguous int64 CPU tensor [", bsz, "]");
  TORCH_CHECK(n_fin.device().is_cpu() && n_fin.scalar_type() == at::kLong && n_fin.dim() == 1 &&
                  n_fin.is_contiguous(),
              "finished_candidates: n_fin must be a contiguous int64 CPU tensor");
  const float* cs = cand_scores.data_ptr<float>();
  const int64_t* ct = cand_tokens.data_ptr<int64_t>();
  const int64_t* cb = cand_beams.data_ptr<int64_t>();
  const bool* ign = ignore.data_ptr<bool>();
  const bool* dn = done.data_ptr<bool>();
  const int64_t* sid = sent_ids.data_ptr<int64_t>();
  const int64_t* nf = n_fin.data_ptr<int64_t>();
  const int64_t n_sent = n_fin.size(0);
  at::Tensor bbsz = at::empty({bsz, c2}, cand_beams.options());
  at::Tensor eos_mask = at::empty({bsz, c2}, ignore.options());
  at::Tensor take = at::empty({bsz, k}, ignore.options());
  at::Tensor rank = at::empty({bsz, k}, cand_beams.options());
  at::Tensor sent_n_fin = at::empty({bsz}, cand_beams.options());
  int64_t* bb = bbsz.data_ptr<int64_t>();
  bool* em = eos_mask.data_ptr<bool>();
  bool* tk = take.data_ptr<bool>();
  int64_t* rk = rank.data_ptr<int64_t>();
  int64_t* snf = sent_n_fin.data_ptr<int64_t>();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (int64_t s = 0; s < bsz; ++s) {
    TORCH_CHECK(sid[s] >= 0 && sid[s] < n_sent, "finished_candidates: sentence ", sid[s],
                " outside ", n_sent);
    snf[s] = nf[sid[s]];
    int64_t count = 0;
    for (int64_t j = 0; j < c2; ++j) {
      bb[s * c2 + j] = cb[s * ld_cb + j] + s * k;
      bool e = ct[s * ld_ct + j] == eos && cs[s * ld_cs + j] != kNegInf;
      if (j < k) {
        e = e && !ign[s * k + j];
        bool t = e && !dn[s];
        count += t ? 1 : 0;
        rk[s * k + j] = snf[s] + count - 1;
        t = t && rk[s * k + j] < k;
        tk[s * k + j] = t;
        any = any || t;
      }
      em[s * c2 + j] = e;
    }
  }
  return {bbsz, eos_mask, take, rank, sent_n_fin, any};
}

// seqfuse::finite_ties (CPU): rows of `scores` [bsz, c] (rows contiguous)
// where two neighbouring entries are equal and finite (the fused top-k's
// candidates: an exact tie, whose order torch.topk's selection decides), and
// whether any row has one. The torch version: seqfuse/ops/search.py.
std::tuple<at::Tensor, bool> finite_ties_cpu(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 2, "finite_ties: scores must be [rows, candidates]");
  const int64_t bsz = scores.size(0), c = scores.size(1);
  const int64_t ld = check_2d(scores, "scores", at::kFloat, bsz, c, true);
  at::Tensor rows = at::empty({bsz}, scores.options().dtype(at::kBool));
  const float* sc = scores.data_ptr<float>();
  bool* out = rows.data_ptr<bool>();
  bool any = false;
  for (int64_t s = 0; s < bsz; ++s) {
    bool tie = false;
    for (int64_t j = 1; j < c; ++j)
      tie = tie || (sc[s * ld + j] == sc[s * ld + j - 1] && std::isfinite(sc[s * ld + j]));
    out[s] = tie;
    any = any || tie;
  }
  return {rows, any};
}

// seqfuse::finalize_hypos (CPU): write this step's taken EOS candidates into
// the per-sentence buffers of finished hypotheses, as fairseq's
// finalize_hypos builds them. For each (s, j < k) with take[s, j], with
// r = cand_bbsz[s, j], f = sent_ids[s], slot = rank[s, j]:
//
//   fin_tokens[f, slot, :step + 1] = tokens[r, 1 : step + 1], then eos
//   p = scores[r, :step], then cand_scores[s, j]
//   fin_pos[f, slot, :step + 1]    = p[0], p[1] - p[0], ..., p[step] - p[step - 1]
//   fin_score[f, slot]             = cand_scores[s, j] / float(divisor) when
//                                    normalising, -inf when match_source_len
//                                    and step > src_lengths[s]
//   fin_len[f, slot]               = step + 1
//   fin_attn[f, slot, :, :step + 1] = attn[r, :, 1 : step + 2]
//
// The same float operations as the torch version (a subtraction per
// position, one division by the float32-rounded divisor), so the same bits.
// The torch version and the contract: seqfuse/ops/search.py.
void finalize_hypos_cpu(const at::Tensor& take, const at::Tensor& rank, const at::Tensor& cand_bbsz,
                        const at::Tensor& cand_scores, const at::Tensor& tokens,
                        const at::Tensor& scores, const std::optional<at::Tensor>& attn,
                        const at::Tensor& src_lengths, const at::Tensor& sent_ids,
                        at::Tensor fin_tokens, at::Tensor fin_len, at::Tensor fin_score,
                        at::Tensor fin_pos, const std::optional<at::Tensor>& fin_attn, int64_t step,
                        int64_t eos, std::optional<double> divisor, bool match_source_len) {
  TORCH_CHECK(take.dim() == 2, "finalize_hypos: take must be [bsz, beams]");
  const int64_t bsz = take.size(0), k = take.size(1);
  check_2d(take, "take", at::kBool, bsz, k);
  check_2d(rank, "rank", at::kLong, bsz, k);
  const int64_t ld_cb = check_2d(cand_bbsz, "cand_bbsz_idx", at::kLong, bsz, -1, true);
  const int64_t ld_cs = check_2d(cand_scores, "cand_scores", at::kFloat, bsz, -1, true);
  TORCH_CHECK(cand_bbsz.size(1) >= k && cand_scores.size(1) >= k,
              "finalize_hypos: fewer candidates than beams");
  const int64_t rows = tokens.size(0);
  check_2d(tokens, "tokens", at::kLong, rows, -1);
  check_2d(scores, "scores", at::kFloat, rows, -1);
  TORCH_CHECK(step >= 0 && step + 1 <= tokens.size(1) && step <= scores.size(1),
              "finalize_hypos: step ", step, " outside the histories");
  TORCH_CHECK(src_lengths.device().is_cpu() && src_lengths.scalar_type() == at::kLong &&
                  src_lengths.dim() == 1 && src_lengths.size(0) == bsz &&
                  src_lengths.is_contiguous() && sent_ids.device().is_cpu() &&
                  sent_ids.scalar_type() == at::kLong && sent_ids.dim() == 1 &&
                  sent_ids.size(0) == bsz && sent_ids.is_contiguous(),
              "finalize_hypos: src_lengths and sent_ids must be contiguous int64 [", bsz, "]");
  const int64_t n_sent = fin_tokens.size(0), width = fin_tokens.size(2);
  TORCH_CHECK(fin_tokens.dim() == 3 && fin_tokens.scalar_type() == at::kLong &&
                  fin_tokens.is_contiguous() && fin_tokens.is_cpu() && fin_tokens.size(1) >= k &&
                  step + 1 <= width,
              "finalize_hypos: fin_tokens must be a contiguous int64 [sentences, >= ", k,
              ", >= ", step + 1, "]");
  const int64_t slots = fin_tokens.size(1);
  TORCH_CHECK(fin_pos.sizes() == fin_tokens.sizes() && fin_pos.scalar_type() == at::kFloat &&
                  fin_pos.is_contiguous() && fin_pos.is_cpu(),
              "finalize_hypos: fin_pos must be float32 like fin_tokens");
  check_2d(fin_len, "fin_len", at::kLong, n_sent, slots);
  check_2d(fin_score, "fin_score", at::kFloat, n_sent, slots);
  TORCH_CHECK(attn.has_value() == fin_attn.has_value(),
              "finalize_hypos: attn and fin_attn come together");
  int64_t src = 0, t_attn = 0, t_fin = 0;
  if (attn.has_value()) {
    TORCH_CHECK(attn->dim() == 3 && attn->size(0) == rows && attn->scalar_type() == at::kFloat &&
                    attn->is_contiguous() && attn->is_cpu() && step + 2 <= attn->size(2),
                "finalize_hypos: attn must be a contiguous float32 [", rows, ", S, >= ", step + 2,
                "]");
    src = attn->size(1);
    t_attn = attn->size(2);
    TORCH_CHECK(fin_attn->dim() == 4 && fin_attn->size(0) == n_sent && fin_attn->size(1) == slots &&
                    fin_attn->size(2) == src && step + 1 <= fin_attn->size(3) &&
                    fin_attn->scalar_type() == at::kFloat && fin_attn->is_contiguous() &&
                    fin_attn->is_cpu(),
                "finalize_hypos: fin_attn must be a contiguous float32 [", n_sent, ", ", slots,
                ", ", src, ", >= ", step + 1, "]");
    t_fin = fin_attn->size(3);
  }
  const bool* tk = take.data_ptr<bool>();
  const int64_t* rk = rank.data_ptr<int64_t>();
  const int64_t* cb = cand_bbsz.data_ptr<int64_t>();
  const float* cs = cand_scores.data_ptr<float>();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const float* sc = scores.data_ptr<float>();
  const int64_t* sl = src_lengths.data_ptr<int64_t>();
  const int64_t* sid = sent_ids.data_ptr<int64_t>();
  const int64_t ld_tok = tokens.size(1), ld_sc = scores.size(1);
  int64_t* ft = fin_tokens.data_ptr<int64_t>();
  float* fp_ = fin_pos.data_ptr<float>();
  int64_t* fl = fin_len.data_ptr<int64_t>();
  float* fs = fin_score.data_ptr<float>();
  const float* at_ = attn.has_value() ? attn->data_ptr<float>() : nullptr;
  float* fa = fin_attn.has_value() ? fin_attn->data_ptr<float>() : nullptr;
  const float div = divisor.has_value() ? static_cast<float>(*divisor) : 1.f;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < bsz; ++s) {
    for (int64_t j = 0; j < k; ++j) {
      if (!tk[s * k + j]) continue;
      const int64_t r = cb[s * ld_cb + j], f = sid[s], slot = rk[s * k + j];
      TORCH_CHECK(r >= 0 && r < rows && f >= 0 && f < n_sent && slot >= 0 && slot < slots,
                  "finalize_hypos: row ", r, ", sentence ", f, " or slot ", slot,
                  " outside the buffers");
      const int64_t dst = (f * slots + slot) * width;
      const float eos_score = cs[s * ld_cs + j];
      for (int64_t t = 0; t < step; ++t) ft[dst + t] = tok[r * ld_tok + t + 1];
      ft[dst + step] = eos;
      float prev = 0.f;
      for (int64_t t = 0; t <= step; ++t) {
        const float cur = t < step ? sc[r * ld_sc + t] : eos_score;
        fp_[dst + t] = t == 0 ? cur : cur - prev;
        prev = cur;
      }
      float e = divisor.has_value() ? eos_score / div : eos_score;
      if (match_source_len && step > sl[s]) e = kNegInf;
      fs[f * slots + slot] = e;
      fl[f * slots + slot] = step + 1;
      if (fa != nullptr) {
        for (int64_t q = 0; q < src; ++q) {
          const float* a = at_ + (r * src + q) * t_attn + 1;
          std::memcpy(fa + ((f * slots + slot) * src + q) * t_fin, a, (step + 1) * sizeof(float));
        }
      }
    }
  }
}

// seqfuse::gather_table_rows (CPU): a beam-search reorder of every layer's
// self-attention parent table at once (seqfuse/layers/kv_cache.py,
// SelfAttnCache.reorder_all): dst[l][i, :] = src[l][order[i], :] for each
// i < len(order), the sources' first n rows being the live ones. Copies only.
void gather_table_rows(at::TensorList src, at::TensorList dst, int64_t n, const at::Tensor& order) {
  TORCH_CHECK(src.size() == dst.size(), "gather_table_rows: ", src.size(), " sources, ", dst.size(),
              " destinations");
  TORCH_CHECK(order.device().is_cpu() && order.scalar_type() == at::kLong && order.dim() == 1 &&
                  order.is_contiguous(),
              "gather_table_rows: order must be a contiguous int64 CPU vector");
  const int64_t m = order.size(0);
  const int64_t* ord = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(ord[i] >= 0 && ord[i] < n, "gather_table_rows: row ", ord[i], " outside the ", n,
                " live rows");
  for (size_t l = 0; l < src.size(); ++l) {
    const at::Tensor& a = src[l];
    const at::Tensor& b = dst[l];
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kLong && a.dim() == 2 &&
                    a.is_contiguous() && a.size(0) >= n && b.device().is_cpu() &&
                    b.scalar_type() == at::kLong && b.dim() == 2 && b.is_contiguous() &&
                    b.size(0) >= m && b.size(1) == a.size(1) && !b.is_same(a),
                "gather_table_rows: tables must be distinct contiguous int64 CPU [rows, slots] "
                "with room for ",
                m, " rows, got ", a.sizes(), " and ", b.sizes());
    const int64_t w = a.size(1);
    const int64_t* from = a.data_ptr<int64_t>();
    int64_t* to = b.data_ptr<int64_t>();
    for (int64_t i = 0; i < m; ++i) std::memcpy(to + i * w, from + ord[i] * w, w * sizeof(int64_t));
  }
}

}  // namespace seqfuse

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  // Contracts: seqfuse/ops/search.py.
  m.def("finite_ties(Tensor scores) -> (Tensor, bool)");
  m.def("gather_table_rows(Tensor[] src, Tensor(a!)[] dst, int n, Tensor order) -> ()");
  m.def(
      "finalize_hypos(Tensor take, Tensor rank, Tensor cand_bbsz_idx, Tensor cand_scores, "
      "Tensor tokens, Tensor scores, Tensor? attn, Tensor src_lengths, Tensor sent_ids, "
      "Tensor(a!) fin_tokens, Tensor(b!) fin_len, Tensor(c!) fin_score, Tensor(d!) fin_pos, "
      "Tensor(e!)? fin_attn, int step, int eos, float? divisor, bool match_source_len) -> ()");
  m.def(
      "finished_candidates(Tensor cand_scores, Tensor cand_indices, Tensor cand_beams, "
      "Tensor cands_to_ignore, Tensor done, Tensor n_fin, Tensor sent_ids, int eos) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, bool)");
  m.def(
      "select_active(Tensor eos_mask, Tensor cands_to_ignore, Tensor cand_bbsz_idx, "
      "Tensor cand_indices, Tensor cand_scores, Tensor(a!) tokens, Tensor(b!) scores, "
      "Tensor(c!)? attn, int step) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("select_active", &seqfuse::select_active_cpu);
  m.impl("finished_candidates", &seqfuse::finished_candidates_cpu);
  m.impl("finite_ties", &seqfuse::finite_ties_cpu);
  m.impl("finalize_hypos", &seqfuse::finalize_hypos_cpu);
  m.impl("gather_table_rows", &seqfuse::gather_table_rows);
}
