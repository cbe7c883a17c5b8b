// Checks and parameter set-up shared by the CPU and CUDA bindings of
// seqfuse::beam_topk (contract: seqfuse/ops/beam_topk.py). Each binding checks
// the device of `logits` first; everything else is checked here, the same way
// for both.
#pragma once
#include <torch/extension.h>

#include <limits>
#include <optional>

#include "kernels/beam_topk.h"

namespace seqfuse {

struct BeamTopkCall {
  kernels::BeamTopkParams p;  // every field set, pointers included
  at::Tensor scores;          // [bsz, k] float32
  at::Tensor tokens;          // [bsz, k] int64
  at::Tensor beams;           // [bsz, k] int64
};

inline BeamTopkCall prepare_beam_topk(const at::Tensor& logits,
                                      const std::optional<at::Tensor>& cum_scores,
                                      int64_t rows_per_sent, int64_t k, int64_t pad, int64_t unk,
                                      int64_t eos, double unk_penalty, int64_t eos_mode,
                                      const std::optional<at::Tensor>& banned, bool is_logprobs) {
  TORCH_CHECK(logits.dim() == 2, "beam_topk: logits must be [rows, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "beam_topk: logits must be contiguous");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "beam_topk: logits dtype must be float32, float16 or bfloat16, got ", dt);
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "beam_topk: empty vocabulary");
  TORCH_CHECK(rows_per_sent >= 1 && n % rows_per_sent == 0, "beam_topk: ", n,
              " rows is not a multiple of rows_per_sent=", rows_per_sent);
  TORCH_CHECK(k >= 1 && k <= rows_per_sent * V, "beam_topk: k=", k, " outside [1, ",
              rows_per_sent * V, "]");
  TORCH_CHECK(rows_per_sent * V <= std::numeric_limits<int32_t>::max(),
              "beam_topk: rows_per_sent * vocab must fit in int32");
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "beam_topk: too many rows");
  TORCH_CHECK(eos_mode >= 0 && eos_mode <= 2, "beam_topk: eos_mode must be 0, 1 or 2");
  TORCH_CHECK(pad >= -1 && pad < V && unk >= 0 && unk < V && eos >= 0 && eos < V,
              "beam_topk: unk and eos must be token ids in [0, ", V, "), pad one or -1 (none)");

  BeamTopkCall call;
  kernels::BeamTopkParams& p = call.p;
  p = kernels::BeamTopkParams{};
  p.bsz = n / rows_per_sent;
  p.rows_per_sent = rows_per_sent;
  p.vocab = V;
  p.k = k;
  p.pad = pad;
  p.unk = unk;
  p.eos = eos;
  p.unk_penalty = static_cast<float>(unk_penalty);
  p.eos_mode = static_cast<int>(eos_mode);
  p.is_logprobs = is_logprobs;
  if (cum_scores.has_value()) {
    const at::Tensor& c = *cum_scores;
    TORCH_CHECK(c.device() == logits.device() && c.scalar_type() == at::kFloat &&
                    c.is_contiguous() && c.numel() == n,
                "beam_topk: cum_scores must be a contiguous float32 tensor of [", n, "] on ",
                logits.device(), ", got ", c.scalar_type(), " ", c.sizes(), " on ", c.device());
    p.cum = c.data_ptr<float>();
  }
  if (banned.has_value()) {
    const at::Tensor& b = *banned;
    TORCH_CHECK(b.device() == logits.device() && b.scalar_type() == at::kLong &&
                    b.is_contiguous() && b.dim() == 2 && b.size(0) == n,
                "beam_topk: banned must be a contiguous int64 tensor of [", n, ", nb] on ",
                logits.device(), ", got ", b.scalar_type(), " ", b.sizes(), " on ", b.device());
    p.banned = b.data_ptr<int64_t>();
    p.n_banned = b.size(1);
  }
  call.scores = at::empty({p.bsz, k}, logits.options().dtype(at::kFloat));
  call.tokens = at::empty({p.bsz, k}, logits.options().dtype(at::kLong));
  call.beams = at::empty({p.bsz, k}, logits.options().dtype(at::kLong));
  p.out_scores = call.scores.data_ptr<float>();
  p.out_tokens = call.tokens.data_ptr<int64_t>();
  p.out_beams = call.beams.data_ptr<int64_t>();
  return call;
}

}  // namespace seqfuse
