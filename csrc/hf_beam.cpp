// hf_beam_advance: the bookkeeping of one step of Hugging Face's beam search
// (transformers 5.x `_beam_search`, after the step's top-k), in one call.
//
// Its ATen form issues the ATen calls that transformers' helpers issue, in
// the same order and on tensors of the same shapes, dtypes and strides (its
// CPU form, below, the same float operations in plain loops):
// `_get_top_k_continuations` from the chosen (beam, token) pairs (the
// gathers and writes after its top-k), `_get_running_beams_for_next_iteration`,
// `_update_finished_beams`, the copies back into the search's full-width
// buffers, `_check_early_stop_heuristic` and
// `_beam_search_has_unfinished_sequences`. The results are therefore the
// helpers' own, bit for bit (the same kernels, the same scalar arguments,
// the same tie order of at::topk); what it removes is the Python work around
// some forty small ops a step. integrations/hf.py calls it only where the
// helpers' source is the verified one (source_shape) and the model does not
// override them; elsewhere it calls the helpers.
//
// Contract (integrations/hf.py, beam_search):
//   topk_log_probs [b, keep] f32, topk_tokens / topk_beams [b, keep] int64,
//   hits [b, keep] bool (the candidates that meet a stopping criterion)
//   run_buf / seq_buf [b, nb, L] int64 and run_bi_buf / bi_buf [b, nb, L']
//   int32: the running and finished sequences and beam indices, written in
//   place in their first cur_len + 1 and cur_len - prompt_len + 1 columns
//   beam_scores [b, nb] f32 (the finished beams'), is_sent_finished [b, nb]
//   bool, early_stop_unsat [b, 1] bool, batch_offset [b, 1] int64,
//   top_num_beam_mask [keep] bool
//   early_stopping: 0 False, 1 True, 2 "never"
// Returns (running_beam_scores, beam_scores, is_sent_finished,
// early_stop_unsat, the next step's beam of each row [b * nb] int32,
// whether the search goes on).
//
// beam_topk_checks: the checks integrations.hf._fused_topk makes of the
// fused top-k (CPU float32): whether some logits row's maximum is not finite
// or some running score is NaN, and which sentences' candidates hold a tie.
//
// hf_sentences_to_keep: integrations.hf._sentences_to_keep's test (CPU): a
// sentence is inert when the early-stop heuristic has closed it
// (early_stop_unsat [b, 1] bool false), every slot of its finished set is
// taken (is_sent_finished [b, nb] bool), and its finished scores (beam_scores
// [b, nb] float32) are finite, above -1e8 and strictly decreasing. Returns
// (whether some sentence is inert, the indices of the others [kept] int64):
// the same comparisons of the same float32 values as the ATen form's eight
// small ops, in one pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace seqfuse {
namespace {

// transformers' _gather_beams: take_along_dim along dim 1 with the indices
// unsqueezed to the tensor's rank.
at::Tensor gather_beams(const at::Tensor& t, at::Tensor idx) {
  while (idx.dim() < t.dim()) idx = idx.unsqueeze(-1);
  return at::take_along_dim(t, idx, 1);
}

// The step's column and the early-stopping code, as both forms check them.
void check_step(const at::Tensor& run_buf, const at::Tensor& run_bi_buf, int64_t cur_len,
                int64_t prompt_len, int64_t early_stopping) {
  TORCH_CHECK(cur_len >= prompt_len && cur_len < run_buf.size(2) &&
                  cur_len - prompt_len < run_bi_buf.size(2),
              "hf_beam_advance: cur_len ", cur_len, " outside the buffers");
  TORCH_CHECK(early_stopping >= 0 && early_stopping <= 2,
              "hf_beam_advance: early_stopping must be 0 (False), 1 (True) or 2 (\"never\")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> hf_beam_advance(
    const at::Tensor& topk_log_probs, const at::Tensor& topk_tokens, const at::Tensor& topk_beams,
    const at::Tensor& hits, const at::Tensor& run_buf, const at::Tensor& seq_buf,
    const at::Tensor& run_bi_buf, const at::Tensor& bi_buf, const at::Tensor& beam_scores,
    const at::Tensor& is_sent_finished, const at::Tensor& early_stop_unsat,
    const at::Tensor& batch_offset, const at::Tensor& top_num_beam_mask, int64_t cur_len,
    int64_t prompt_len, int64_t max_length, int64_t num_beams, double length_penalty,
    int64_t early_stopping) {
  TORCH_CHECK(topk_log_probs.dim() == 2 && topk_log_probs.scalar_type() == at::kFloat,
              "hf_beam_advance: topk_log_probs must be float32 [batch, keep]");
  TORCH_CHECK(
      run_buf.dim() == 3 && run_bi_buf.dim() == 3 && seq_buf.dim() == 3 && bi_buf.dim() == 3,
      "hf_beam_advance: the sequence and beam-index buffers must be [batch, beams, len]");
  check_step(run_buf, run_bi_buf, cur_len, prompt_len, early_stopping);
  const bool stop_early = early_stopping == 1;
  const int64_t w = cur_len + 1, wb = cur_len - prompt_len + 1, col = cur_len - prompt_len;

  // _get_top_k_continuations, after its top-k
  at::Tensor topk_running_beam_indices = gather_beams(run_bi_buf.slice(2, 0, wb), topk_beams);
  at::Tensor topk_running_sequences = gather_beams(run_buf.slice(2, 0, w), topk_beams);
  topk_running_sequences.select(2, cur_len).copy_(topk_tokens);
  topk_running_beam_indices.select(2, col).copy_(topk_beams + batch_offset);

  // _get_running_beams_for_next_iteration
  const at::Tensor topk_running_log_probs = topk_log_probs + hits.to(at::kFloat) * -1.0e9;
  const at::Tensor next_topk_indices = std::get<1>(at::topk(topk_running_log_probs, num_beams));
  const at::Tensor running_sequences = gather_beams(topk_running_sequences, next_topk_indices);
  at::Tensor new_running_scores = gather_beams(topk_running_log_probs, next_topk_indices);
  const at::Tensor running_beam_indices =
      gather_beams(topk_running_beam_indices, next_topk_indices);

  // _update_finished_beams
  const at::Tensor did_finish = hits & top_num_beam_mask.unsqueeze(0);
  at::Tensor scores =
      topk_log_probs / std::pow(static_cast<double>(w - prompt_len), length_penalty);
  const at::Tensor full = at::all(is_sent_finished, -1, true) & stop_early;
  scores += full.to(at::kFloat) * -1.0e9;
  scores += (~early_stop_unsat).to(at::kFloat) * -1.0e9;
  scores += (~did_finish) * -1.0e9;
  const at::Tensor merged_sequences = at::cat({seq_buf.slice(2, 0, w), topk_running_sequences}, 1);
  const at::Tensor merged_scores = at::cat({beam_scores, scores}, 1);
  const at::Tensor merged_beam_indices =
      at::cat({bi_buf.slice(2, 0, wb), topk_running_beam_indices}, 1);
  const at::Tensor merged_finished = at::cat({is_sent_finished, did_finish}, 1);
  const at::Tensor merged_top = std::get<1>(at::topk(merged_scores, num_beams));
  const at::Tensor sequences = gather_beams(merged_sequences, merged_top);
  at::Tensor new_beam_scores = gather_beams(merged_scores, merged_top);
  const at::Tensor beam_indices = gather_beams(merged_beam_indices, merged_top);
  at::Tensor new_finished = gather_beams(merged_finished, merged_top);

  // the search's copies into its full-width buffers
  run_buf.slice(2, 0, w).copy_(running_sequences);
  run_bi_buf.slice(2, 0, wb).copy_(running_beam_indices);
  seq_buf.slice(2, 0, w).copy_(sequences);
  bi_buf.slice(2, 0, wb).copy_(beam_indices);

  // _check_early_stop_heuristic at cur_len + 1
  const int64_t hypothetical =
      early_stopping == 2 && length_penalty > 0.0 ? max_length - prompt_len : w - prompt_len;
  const at::Tensor best_possible = new_running_scores.slice(1, 0, 1) /
                                   std::pow(static_cast<double>(hypothetical), length_penalty);
  const at::Tensor worst_finished =
      at::where(new_finished, std::get<0>(at::min(new_beam_scores, 1, true)), -1.0e9);
  at::Tensor new_unsat = early_stop_unsat & at::any(best_possible > worst_finished, -1, true);

  // _beam_search_has_unfinished_sequences
  const bool improvement_possible = at::any(new_unsat).item<bool>();
  const bool exists_open_beam = !(at::all(new_finished).item<bool>() && stop_early);
  const bool valid_continuations = !at::all(hits).item<bool>();
  const bool unfinished = improvement_possible && exists_open_beam && valid_continuations;

  at::Tensor beam_idx = running_beam_indices.select(2, col).reshape({-1});
  return {new_running_scores, new_beam_scores, new_finished, new_unsat, beam_idx, unfinished};
}

// The CPU form: the same results from plain loops. The gathers and writes
// copy values (any order gives the same bits); each score is the same IEEE
// float operations in the same order as the ATen kernels' (a product by the
// float-cast scalar -1e9 of a 0/1 float, one add each; a division by the
// float-cast length factor); both top-k's are at::topk's on the same values.
// The ATen form above is its reference (tests/test_hf_beam_advance.py holds
// both to transformers' helpers).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> hf_beam_advance_cpu(
    const at::Tensor& topk_log_probs, const at::Tensor& topk_tokens, const at::Tensor& topk_beams,
    const at::Tensor& hits, const at::Tensor& run_buf, const at::Tensor& seq_buf,
    const at::Tensor& run_bi_buf, const at::Tensor& bi_buf, const at::Tensor& beam_scores,
    const at::Tensor& is_sent_finished, const at::Tensor& early_stop_unsat,
    const at::Tensor& batch_offset, const at::Tensor& top_num_beam_mask, int64_t cur_len,
    int64_t prompt_len, int64_t max_length, int64_t num_beams, double length_penalty,
    int64_t early_stopping) {
  const bool plain =
      topk_log_probs.dim() == 2 && topk_log_probs.scalar_type() == at::kFloat &&
      topk_tokens.scalar_type() == at::kLong && topk_beams.scalar_type() == at::kLong &&
      hits.scalar_type() == at::kBool && run_buf.scalar_type() == at::kLong &&
      seq_buf.scalar_type() == at::kLong && run_bi_buf.scalar_type() == at::kInt &&
      bi_buf.scalar_type() == at::kInt && beam_scores.scalar_type() == at::kFloat &&
      is_sent_finished.scalar_type() == at::kBool && early_stop_unsat.scalar_type() == at::kBool &&
      batch_offset.scalar_type() == at::kLong && top_num_beam_mask.scalar_type() == at::kBool &&
      run_buf.dim() == 3 && seq_buf.dim() == 3 && run_bi_buf.dim() == 3 && bi_buf.dim() == 3 &&
      run_buf.is_contiguous() && seq_buf.is_contiguous() && run_bi_buf.is_contiguous() &&
      bi_buf.is_contiguous() && num_beams == run_buf.size(1);
  if (!plain) {  // other dtypes or layouts: the ATen form
    return hf_beam_advance(topk_log_probs, topk_tokens, topk_beams, hits, run_buf, seq_buf,
                           run_bi_buf, bi_buf, beam_scores, is_sent_finished, early_stop_unsat,
                           batch_offset, top_num_beam_mask, cur_len, prompt_len, max_length,
                           num_beams, length_penalty, early_stopping);
  }
  check_step(run_buf, run_bi_buf, cur_len, prompt_len, early_stopping);
  const int64_t B = topk_log_probs.size(0), K = topk_log_probs.size(1), NB = num_beams;
  TORCH_CHECK(K >= NB && topk_tokens.sizes() == topk_log_probs.sizes() &&
                  topk_beams.sizes() == topk_log_probs.sizes() &&
                  hits.sizes() == topk_log_probs.sizes() && run_buf.size(0) == B &&
                  seq_buf.sizes() == run_buf.sizes() && run_bi_buf.size(0) == B &&
                  bi_buf.sizes() == run_bi_buf.sizes() && run_bi_buf.size(1) == NB &&
                  beam_scores.numel() == B * NB && is_sent_finished.numel() == B * NB &&
                  early_stop_unsat.numel() == B && batch_offset.numel() == B &&
                  top_num_beam_mask.numel() == K,
              "hf_beam_advance: inconsistent shapes");
  const bool stop_early = early_stopping == 1;
  const int64_t w = cur_len + 1, wb = cur_len - prompt_len + 1, col = cur_len - prompt_len;
  const int64_t L = run_buf.size(2), LB = run_bi_buf.size(2);
  const float big = static_cast<float>(-1.0e9);
  const float len_factor =
      static_cast<float>(std::pow(static_cast<double>(w - prompt_len), length_penalty));
  const int64_t hypothetical =
      early_stopping == 2 && length_penalty > 0.0 ? max_length - prompt_len : w - prompt_len;
  const float hyp_factor =
      static_cast<float>(std::pow(static_cast<double>(hypothetical), length_penalty));

  const at::Tensor lp_c = topk_log_probs.contiguous(), tok_c = topk_tokens.contiguous();
  const at::Tensor beam_c = topk_beams.contiguous(), hits_c = hits.contiguous();
  const at::Tensor scores_c = beam_scores.contiguous(), fin_c = is_sent_finished.contiguous();
  const at::Tensor unsat_c = early_stop_unsat.contiguous(), off_c = batch_offset.contiguous();
  const at::Tensor mask_c = top_num_beam_mask.contiguous();
  const float* lp = lp_c.data_ptr<float>();
  const int64_t* tok = tok_c.data_ptr<int64_t>();
  const int64_t* beam = beam_c.data_ptr<int64_t>();
  const bool* hit = hits_c.data_ptr<bool>();
  const float* bscore = scores_c.data_ptr<float>();
  const bool* fin = fin_c.data_ptr<bool>();
  const bool* unsat = unsat_c.data_ptr<bool>();
  const int64_t* off = off_c.data_ptr<int64_t>();
  const bool* top_mask = mask_c.data_ptr<bool>();
  for (int64_t i = 0; i < B * K; ++i)
    TORCH_CHECK(beam[i] >= 0 && beam[i] < NB, "hf_beam_advance: beam index ", beam[i],
                " out of range");

  // the K continuations: sequences [B, K, w], beam indices [B, K, wb]
  std::vector<int64_t> trs(B * K * w);
  std::vector<int32_t> trbi(B * K * wb);
  int64_t* run = run_buf.data_ptr<int64_t>();
  int64_t* seq = seq_buf.data_ptr<int64_t>();
  int32_t* run_bi = run_bi_buf.data_ptr<int32_t>();
  int32_t* bi = bi_buf.data_ptr<int32_t>();
  for (int64_t s = 0; s < B; ++s)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t b = beam[s * K + j];
      std::memcpy(&trs[(s * K + j) * w], run + (s * NB + b) * L, w * sizeof(int64_t));
      trs[(s * K + j) * w + cur_len] = tok[s * K + j];
      std::memcpy(&trbi[(s * K + j) * wb], run_bi + (s * NB + b) * LB, wb * sizeof(int32_t));
      trbi[(s * K + j) * wb + col] = static_cast<int32_t>(b + off[s]);
    }

  // _get_running_beams_for_next_iteration
  at::Tensor trlp = at::empty({B, K}, lp_c.options());
  float* trlp_p = trlp.data_ptr<float>();
  for (int64_t i = 0; i < B * K; ++i) trlp_p[i] = lp[i] + static_cast<float>(hit[i]) * big;
  const at::Tensor next_idx = std::get<1>(at::topk(trlp, NB)).contiguous();
  const int64_t* nx = next_idx.data_ptr<int64_t>();

  // _update_finished_beams
  std::vector<uint8_t> did(B * K);
  at::Tensor merged = at::empty({B, NB + K}, lp_c.options());
  float* mg = merged.data_ptr<float>();
  for (int64_t s = 0; s < B; ++s) {
    bool full = true;
    for (int64_t i = 0; i < NB; ++i) full &= fin[s * NB + i];
    const float f_full = static_cast<float>(full && stop_early) * big;
    const float f_unsat = static_cast<float>(!unsat[s]) * big;
    for (int64_t i = 0; i < NB; ++i) mg[s * (NB + K) + i] = bscore[s * NB + i];
    for (int64_t j = 0; j < K; ++j) {
      did[s * K + j] = hit[s * K + j] && top_mask[j];
      float v = lp[s * K + j] / len_factor;
      v += f_full;
      v += f_unsat;
      v += static_cast<float>(!did[s * K + j]) * big;
      mg[s * (NB + K) + NB + j] = v;
    }
  }
  const at::Tensor merged_idx = std::get<1>(at::topk(merged, NB)).contiguous();
  const int64_t* mx = merged_idx.data_ptr<int64_t>();

  at::Tensor new_running = at::empty({B, NB}, lp_c.options());
  at::Tensor new_scores = at::empty({B, NB}, lp_c.options());
  at::Tensor new_fin = at::empty({B, NB}, fin_c.options());
  at::Tensor new_unsat = at::empty({B, 1}, unsat_c.options());
  at::Tensor beam_idx = at::empty({B * NB}, run_bi_buf.options());
  float* nr = new_running.data_ptr<float>();
  float* ns = new_scores.data_ptr<float>();
  bool* nf = new_fin.data_ptr<bool>();
  bool* nu = new_unsat.data_ptr<bool>();
  int32_t* bidx = beam_idx.data_ptr<int32_t>();
  std::vector<int64_t> seq_tmp(NB * w);
  std::vector<int32_t> bi_tmp(NB * wb);
  bool any_unsat = false, all_fin = true, all_hits = true;
  for (int64_t i = 0; i < B * K; ++i) all_hits &= hit[i];
  for (int64_t s = 0; s < B; ++s) {
    // the running beams (from the continuations only: no aliasing)
    for (int64_t i = 0; i < NB; ++i) {
      const int64_t j = nx[s * NB + i];
      nr[s * NB + i] = trlp_p[s * K + j];
      std::memcpy(run + (s * NB + i) * L, &trs[(s * K + j) * w], w * sizeof(int64_t));
      std::memcpy(run_bi + (s * NB + i) * LB, &trbi[(s * K + j) * wb], wb * sizeof(int32_t));
      bidx[s * NB + i] = trbi[(s * K + j) * wb + col];
    }
    // the finished beams: gathered first (their sources include seq itself)
    for (int64_t i = 0; i < NB; ++i) {
      const int64_t m = mx[s * NB + i];
      ns[s * NB + i] = mg[s * (NB + K) + m];
      if (m < NB) {
        std::memcpy(&seq_tmp[i * w], seq + (s * NB + m) * L, w * sizeof(int64_t));
        std::memcpy(&bi_tmp[i * wb], bi + (s * NB + m) * LB, wb * sizeof(int32_t));
        nf[s * NB + i] = fin[s * NB + m];
      } else {
        std::memcpy(&seq_tmp[i * w], &trs[(s * K + m - NB) * w], w * sizeof(int64_t));
        std::memcpy(&bi_tmp[i * wb], &trbi[(s * K + m - NB) * wb], wb * sizeof(int32_t));
        nf[s * NB + i] = did[s * K + m - NB] != 0;
      }
    }
    for (int64_t i = 0; i < NB; ++i) {
      std::memcpy(seq + (s * NB + i) * L, &seq_tmp[i * w], w * sizeof(int64_t));
      std::memcpy(bi + (s * NB + i) * LB, &bi_tmp[i * wb], wb * sizeof(int32_t));
    }
    // _check_early_stop_heuristic (torch.min: NaN if the row holds one)
    float lowest = ns[s * NB];
    for (int64_t i = 0; i < NB; ++i) {
      const float v = ns[s * NB + i];
      if (std::isnan(v)) {
        lowest = v;
        break;
      }
      lowest = v < lowest ? v : lowest;
    }
    const float best = nr[s * NB] / hyp_factor;
    bool improvable = false;
    for (int64_t i = 0; i < NB; ++i) {
      const float worst = nf[s * NB + i] ? lowest : big;
      improvable |= best > worst;
      all_fin &= nf[s * NB + i];
    }
    nu[s] = unsat[s] && improvable;
    any_unsat |= nu[s];
  }
  const bool unfinished = any_unsat && !(all_fin && stop_early) && !all_hits;
  return {new_running, new_scores, new_fin, new_unsat, beam_idx, unfinished};
}

// (some logits row's maximum not finite or a running score NaN,
//  per sentence: whether two of its first k candidate scores are equal)
std::tuple<bool, at::Tensor> beam_topk_checks(const at::Tensor& logits, const at::Tensor& cum,
                                              const at::Tensor& cand_scores) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous(),
              "beam_topk_checks: logits must be contiguous float32 [rows, vocab] on the CPU");
  TORCH_CHECK(cum.device().is_cpu() && cum.scalar_type() == at::kFloat && cum.is_contiguous(),
              "beam_topk_checks: running scores must be contiguous float32 on the CPU");
  TORCH_CHECK(cand_scores.device().is_cpu() && cand_scores.scalar_type() == at::kFloat &&
                  cand_scores.dim() == 2,
              "beam_topk_checks: candidate scores must be float32 [sentences, k] on the CPU");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const float* lg = logits.data_ptr<float>();
  // torch's amax(dim=1) is NaN if the row holds a NaN, +inf if it holds one
  // (and no NaN), -inf if every entry is -inf: not finite in those cases.
  // Each row in one branch-free pass (the compiler vectorises it), rows on
  // torch's threads when there are enough logits to share.
  std::vector<uint8_t> row_bad(static_cast<size_t>(rows), 0);
  auto scan = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = lg + r * vocab;
      int nan_or_pos_inf = 0, all_neg_inf = 1;
      for (int64_t j = 0; j < vocab; ++j) {
        const float v = row[j];
        nan_or_pos_inf |= !(v < INFINITY);  // (false for NaN and +inf)
        all_neg_inf &= v == -INFINITY;
      }
      row_bad[r] = nan_or_pos_inf || all_neg_inf || vocab == 0;
    }
  };
  if (rows * vocab >= (int64_t{1} << 16))
    at::parallel_for(0, rows,
                     std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(vocab, 1)), scan);
  else
    scan(0, rows);
  bool bad = false;
  for (int64_t r = 0; r < rows; ++r) bad |= row_bad[r] != 0;
  const float* c = cum.data_ptr<float>();
  for (int64_t i = 0; i < cum.numel() && !bad; ++i) bad |= std::isnan(c[i]);
  const int64_t sents = cand_scores.size(0), k = cand_scores.size(1);
  at::Tensor tie = at::zeros({sents}, cand_scores.options().dtype(at::kBool));
  const auto cs = cand_scores.accessor<float, 2>();
  bool* t = tie.data_ptr<bool>();
  for (int64_t s = 0; s < sents; ++s)
    for (int64_t j = 1; j < k && !t[s]; ++j) t[s] = cs[s][j] == cs[s][j - 1];
  return {bad, tie};
}

std::tuple<bool, at::Tensor> hf_sentences_to_keep(const at::Tensor& early_stop_unsat,
                                                  const at::Tensor& finished,
                                                  const at::Tensor& scores) {
  TORCH_CHECK(
      finished.device().is_cpu() && finished.scalar_type() == at::kBool && finished.dim() == 2,
      "hf_sentences_to_keep: is_sent_finished must be bool [sentences, beams] on the CPU");
  const int64_t sents = finished.size(0), nb = finished.size(1);
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2 &&
                  scores.size(0) == sents && scores.size(1) == nb,
              "hf_sentences_to_keep: beam_scores must be float32 [sentences, beams] on the CPU");
  TORCH_CHECK(early_stop_unsat.device().is_cpu() && early_stop_unsat.scalar_type() == at::kBool &&
                  early_stop_unsat.numel() == sents,
              "hf_sentences_to_keep: early_stop_unsat must be bool with one value a sentence");
  const auto fin = finished.accessor<bool, 2>();
  const auto sc = scores.accessor<float, 2>();
  const at::Tensor unsat_flat = early_stop_unsat.reshape({sents});
  const auto unsat = unsat_flat.accessor<bool, 1>();
  std::vector<int64_t> keep;
  keep.reserve(static_cast<size_t>(sents));
  for (int64_t s = 0; s < sents; ++s) {
    bool inert = !unsat[s];
    for (int64_t j = 0; j < nb && inert; ++j) {
      const float v = sc[s][j];
      inert = fin[s][j] && std::isfinite(v) && v > -1e8f && (j == 0 || sc[s][j - 1] > v);
    }
    if (!inert) keep.push_back(s);
  }
  const bool any_inert = static_cast<int64_t>(keep.size()) < sents;
  at::Tensor out =
      at::empty({static_cast<int64_t>(keep.size())}, finished.options().dtype(at::kLong));
  if (!keep.empty())
    std::memcpy(out.data_ptr<int64_t>(), keep.data(), keep.size() * sizeof(int64_t));
  return {any_inert, out};
}

}  // namespace seqfuse

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  // Contract: the comment at the top of this file.
  m.def(
      "hf_beam_advance(Tensor topk_log_probs, Tensor topk_tokens, Tensor topk_beams, Tensor hits, "
      "Tensor(a!) run_buf, Tensor(b!) seq_buf, Tensor(c!) run_bi_buf, Tensor(d!) bi_buf, "
      "Tensor beam_scores, Tensor is_sent_finished, "
      "Tensor early_stop_unsat, Tensor batch_offset, Tensor top_num_beam_mask, int cur_len, "
      "int prompt_len, int max_length, int num_beams, float length_penalty, int early_stopping) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, bool)");
  m.def("beam_topk_checks(Tensor logits, Tensor cum, Tensor cand_scores) -> (bool, Tensor)");
  m.def(
      "hf_sentences_to_keep(Tensor early_stop_unsat, Tensor is_sent_finished, Tensor beam_scores) "
      "-> (bool, Tensor)");
}

// hf_beam_advance: only ATen calls, one implementation for every backend.
TORCH_LIBRARY_IMPL(seqfuse, CompositeExplicitAutograd, m) {
  m.impl("hf_beam_advance", &seqfuse::hf_beam_advance);
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("hf_beam_advance", &seqfuse::hf_beam_advance_cpu);
  m.impl("beam_topk_checks", &seqfuse::beam_topk_checks);
  m.impl("hf_sentences_to_keep", &seqfuse::hf_sentences_to_keep);
}
