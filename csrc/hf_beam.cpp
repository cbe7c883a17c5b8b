// hf_beam_advance: the bookkeeping of one step of Hugging Face's beam search
// (transformers 5.x `_beam_search`, after the step's top-k), in one call.
//
// It issues the ATen calls that transformers' helpers issue, in the same
// order and on tensors of the same shapes, dtypes and strides:
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
// Contract (integrations/hf.py, `_advance`):
//   topk_log_probs [b, keep] f32, topk_tokens / topk_beams [b, keep] int64,
//   hits [b, keep] bool (the candidates that meet a stopping criterion)
//   run_buf / seq_buf [b, nb, L] int64 and run_bi_buf / bi_buf [b, nb, L']
//   int32: the running and finished sequences and beam indices, written in
//   place in their first cur_len + 1 and cur_len - prompt_len + 1 columns
//   running_beam_scores, beam_scores [b, nb] f32, is_sent_finished [b, nb]
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
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace seqfuse {
namespace {

// transformers' _gather_beams: take_along_dim along dim 1 with the indices
// unsqueezed to the tensor's rank.
at::Tensor gather_beams(const at::Tensor& t, at::Tensor idx) {
  while (idx.dim() < t.dim()) idx = idx.unsqueeze(-1);
  return at::take_along_dim(t, idx, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> hf_beam_advance(
    const at::Tensor& topk_log_probs, const at::Tensor& topk_tokens, const at::Tensor& topk_beams,
    const at::Tensor& hits, const at::Tensor& run_buf, const at::Tensor& seq_buf,
    const at::Tensor& run_bi_buf, const at::Tensor& bi_buf, const at::Tensor& running_beam_scores,
    const at::Tensor& beam_scores, const at::Tensor& is_sent_finished,
    const at::Tensor& early_stop_unsat, const at::Tensor& batch_offset,
    const at::Tensor& top_num_beam_mask, int64_t cur_len, int64_t prompt_len, int64_t max_length,
    int64_t num_beams, double length_penalty, int64_t early_stopping) {
  TORCH_CHECK(topk_log_probs.dim() == 2 && topk_log_probs.scalar_type() == at::kFloat,
              "hf_beam_advance: topk_log_probs must be float32 [batch, keep]");
  TORCH_CHECK(
      run_buf.dim() == 3 && run_bi_buf.dim() == 3 && seq_buf.dim() == 3 && bi_buf.dim() == 3,
      "hf_beam_advance: the sequence and beam-index buffers must be [batch, beams, len]");
  TORCH_CHECK(cur_len >= prompt_len && cur_len < run_buf.size(2) &&
                  cur_len - prompt_len < run_bi_buf.size(2),
              "hf_beam_advance: cur_len ", cur_len, " outside the buffers");
  TORCH_CHECK(early_stopping >= 0 && early_stopping <= 2,
              "hf_beam_advance: early_stopping must be 0 (False), 1 (True) or 2 (\"never\")");
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
  bool bad = false;
  // torch's amax(dim=1) is NaN if the row holds a NaN, +inf if it holds one
  // (and no NaN), -inf if every entry is -inf: not finite in those cases.
  for (int64_t r = 0; r < rows && !bad; ++r) {
    const float* row = lg + r * vocab;
    bool all_neg_inf = vocab > 0;
    for (int64_t j = 0; j < vocab; ++j) {
      const float v = row[j];
      if (std::isnan(v) || v == INFINITY) {
        bad = true;
        break;
      }
      all_neg_inf &= v == -INFINITY;
    }
    bad |= all_neg_inf || vocab == 0;
  }
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

}  // namespace seqfuse

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  // Contract: the comment at the top of this file.
  m.def(
      "hf_beam_advance(Tensor topk_log_probs, Tensor topk_tokens, Tensor topk_beams, Tensor hits, "
      "Tensor(a!) run_buf, Tensor(b!) seq_buf, Tensor(c!) run_bi_buf, Tensor(d!) bi_buf, "
      "Tensor running_beam_scores, Tensor beam_scores, Tensor is_sent_finished, "
      "Tensor early_stop_unsat, Tensor batch_offset, Tensor top_num_beam_mask, int cur_len, "
      "int prompt_len, int max_length, int num_beams, float length_penalty, int early_stopping) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, bool)");
  m.def("beam_topk_checks(Tensor logits, Tensor cum, Tensor cand_scores) -> (bool, Tensor)");
}

// hf_beam_advance: only ATen calls, one implementation for every backend.
TORCH_LIBRARY_IMPL(seqfuse, CompositeExplicitAutograd, m) {
  m.impl("hf_beam_advance", &seqfuse::hf_beam_advance);
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) { m.impl("beam_topk_checks", &seqfuse::beam_topk_checks); }
