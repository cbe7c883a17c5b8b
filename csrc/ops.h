// Torch-facing op entry points (checks + dispatch into framework-free kernels).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace seqfuse {

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& cum_scores, int64_t rows_per_sent,
    int64_t k, int64_t pad, int64_t unk, int64_t eos, double unk_penalty, int64_t eos_mode,
    const std::optional<at::Tensor>& banned, bool is_logprobs);

// beam_topk_cpu on float32 logits (is_logprobs false) with their group
// maxima ([rows, num_max_groups(V)], linear_packed_maxima's) standing for its
// pass over the logits for the chunk maxima: the same results.
std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_maxima_cpu(
    const at::Tensor& logits, const at::Tensor& group_max,
    const std::optional<at::Tensor>& cum_scores, int64_t rows_per_sent, int64_t k, int64_t pad,
    int64_t unk, int64_t eos, double unk_penalty, int64_t eos_mode,
    const std::optional<at::Tensor>& banned);

// The search ops (csrc/cpu/select_active_cpu.cc; contracts: seqfuse/ops/search.py),
// also called by the search lane (csrc/cpu/search_lane_cpu.cc).
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_active_cpu(
    const at::Tensor& eos_mask, const at::Tensor& ignore, const at::Tensor& cand_bbsz,
    const at::Tensor& cand_tokens, const at::Tensor& cand_scores, at::Tensor tokens,
    at::Tensor scores, const std::optional<at::Tensor>& attn, int64_t step);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool>
finished_candidates_cpu(const at::Tensor& cand_scores, const at::Tensor& cand_tokens,
                        const at::Tensor& cand_beams, const at::Tensor& ignore,
                        const at::Tensor& done, const at::Tensor& n_fin, const at::Tensor& sent_ids,
                        int64_t eos);
std::tuple<at::Tensor, bool> finite_ties_cpu(const at::Tensor& scores);
void finalize_hypos_cpu(const at::Tensor& take, const at::Tensor& rank, const at::Tensor& cand_bbsz,
                        const at::Tensor& cand_scores, const at::Tensor& tokens,
                        const at::Tensor& scores, const std::optional<at::Tensor>& attn,
                        const at::Tensor& src_lengths, const at::Tensor& sent_ids,
                        at::Tensor fin_tokens, at::Tensor fin_len, at::Tensor fin_score,
                        at::Tensor fin_pos, const std::optional<at::Tensor>& fin_attn, int64_t step,
                        int64_t eos, std::optional<double> divisor, bool match_source_len);
void gather_table_rows(at::TensorList src, at::TensorList dst, int64_t n, const at::Tensor& order);

// Python classes of the one-call layer stacks (csrc/cpu/fused_stack_cpu.cc).
void bind_fused_stack(pybind11::module& m);
// ... and of the exact one-call decoder step (csrc/exact_decoder.cpp).
void bind_exact_step(pybind11::module& m);

}  // namespace seqfuse
