// Fused beam-search step, framework independent (raw pointers, shapes as
// arguments). The contract is documented in seqfuse/ops/beam_topk.py; the CPU
// kernel (csrc/cpu/beam_topk_cpu.cc) and the CUDA kernel
// (csrc/cuda/beam_topk.cu) run the same algorithm:
//
//   1. per row: max m, normaliser lse = log(sum exp(x - m)), and the maximum
//      of every chunk of kChunk tokens (an actual token, so a candidate);
//   2. per sentence: tau = the k-th largest edited score among the chunk
//      maxima. At least k distinct tokens score >= tau, so tau is a lower
//      bound of the k-th best score;
//   3. survivors: tokens whose unedited score ((x - m) - lse) + cum >= tau
//      (edits only lower a score, except a negative unk penalty, so unk is
//      always a survivor), scored exactly with the edits;
//   4. exact top-k of the survivors, ordered by (score desc, flat index asc).
//      Without a bound (tau = -inf) only the first k tokens in flat order that
//      score -inf can be among them: the CPU kernel keeps just those.
//
// Scores use fairseq's float operation order: ((x - m) - lse) - unk_penalty,
// then + cum.
#pragma once

#include <cstdint>

namespace seqfuse {
namespace kernels {

constexpr int kEosAllow = 0;
constexpr int kEosForbid = 1;
constexpr int kEosOnly = 2;

// Tokens per chunk for the pruning bound (one warp x 4 on a GPU, SIMD strides
// on a CPU). Both backends use this value so their candidate sets agree.
constexpr int kChunk = 128;

struct BeamTopkParams {
  int64_t bsz;            // sentences
  int64_t rows_per_sent;  // beams per sentence (1 at step 0)
  int64_t vocab;
  int64_t k;              // candidates per sentence
  int64_t pad, unk, eos;  // special token ids
  float unk_penalty;
  int eos_mode;           // kEosAllow / kEosForbid / kEosOnly
  bool is_logprobs;       // input already normalised: skip the normaliser
  const float* cum;       // [bsz * rows_per_sent] or nullptr
  const int64_t* banned;  // [bsz * rows_per_sent, n_banned], -1 = none; or nullptr
  int64_t n_banned;
  float* out_scores;    // [bsz, k]
  int64_t* out_tokens;  // [bsz, k]
  int64_t* out_beams;   // [bsz, k]
};

inline int64_t num_chunks(int64_t vocab) { return (vocab + kChunk - 1) / kChunk; }

// Tokens per group maximum, the CPU kernel's optional input (beam_topk_maxima,
// csrc/cpu/beam_topk_cpu.cc): the columns of one packed-GEMM task (two
// 16-column panels), whose maxima the vocabulary projection notes as it
// stores the logits (linear_packed_maxima), so the kernel's chunk maxima take
// a pass over those instead of the logits. A chunk is a whole number of groups.
constexpr int kMaxGroup = 32;
static_assert(kChunk % kMaxGroup == 0, "a chunk is a whole number of maximum groups");

inline int64_t num_max_groups(int64_t vocab) { return (vocab + kMaxGroup - 1) / kMaxGroup; }

}  // namespace kernels
}  // namespace seqfuse
