// CPU kernel of the fused beam-search step (algorithm: csrc/kernels/beam_topk.h).
// OpenMP over sentences; rows of a sentence are handled by one thread so the
// pruning bound is computed without synchronisation.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/beam_topk.h"
#include "ops.h"

namespace seqfuse {
namespace kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Cand {
  float score;
  int64_t flat;  // beam * vocab + token
};

// (score desc, flat index asc): a strict weak order; -inf sorts last.
inline bool better(const Cand& a, const Cand& b) {
  return a.score > b.score || (a.score == b.score && a.flat < b.flat);
}

struct RowStats {
  float m;     // row maximum (normaliser)
  float lse;   // log(sum(exp(x - m)))
  float cum;   // accumulated beam score added to every token (0 when none)
  bool add_cum;
  bool dead;   // every log-prob is NaN in stock -> -inf
};

template <typename T>
inline float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Unedited score of a token from its logit (same float ops as fairseq).
inline float raw_score(float x, const RowStats& s, bool is_logprobs) {
  float lp = is_logprobs ? x : (x - s.m) - s.lse;
  if (lp != lp) lp = kNegInf;
  return s.add_cum ? lp + s.cum : lp;
}

inline bool is_banned(const BeamTopkParams& p, int64_t row, int64_t v) {
  if (p.banned == nullptr) return false;
  const int64_t* b = p.banned + row * p.n_banned;
  for (int64_t j = 0; j < p.n_banned; ++j)
    if (b[j] == v) return true;
  return false;
}

// Edited score of token v (fairseq order: NaN, pad, unk, eos, banned, + cum).
inline float edited_score(float x, int64_t row, int64_t v, const RowStats& s,
                          const BeamTopkParams& p) {
  if (s.dead || v == p.pad) return kNegInf;
  float lp = p.is_logprobs ? x : (x - s.m) - s.lse;
  if (lp != lp) return kNegInf;
  if (v == p.unk) lp = lp - p.unk_penalty;
  if (p.eos_mode == kEosOnly && v != p.eos) return kNegInf;
  if (p.eos_mode == kEosForbid && v == p.eos) return kNegInf;
  if (is_banned(p, row, v)) return kNegInf;
  return s.add_cum ? lp + s.cum : lp;
}

template <typename T>
void sentence_topk(const T* logits, const BeamTopkParams& p, int64_t sent,
                   std::vector<Cand>& chunk_cands, std::vector<Cand>& survivors,
                   std::vector<RowStats>& stats, std::vector<int64_t>& chunk_arg) {
  const int64_t V = p.vocab, R = p.rows_per_sent, nch = num_chunks(V);
  chunk_cands.clear();
  survivors.clear();
  stats.resize(R);
  chunk_arg.resize(nch);

  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = sent * R + r;
    const T* x = logits + row * V;
    RowStats& s = stats[r];
    s.add_cum = p.cum != nullptr;
    s.cum = s.add_cum ? p.cum[row] : 0.f;
    // Pass 1: chunk maxima (first index of the maximum) and the row maximum.
    bool has_nan = false;
    float m = kNegInf;
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(V, lo + kChunk);
      float cm = kNegInf;
      int64_t ci = lo;
      for (int64_t v = lo; v < hi; ++v) {
        const float xv = ld(x, v);
        has_nan |= (xv != xv);
        if (xv > cm) {
          cm = xv;
          ci = v;
        }
      }
      chunk_arg[c] = ci;
      m = std::max(m, cm);
    }
    s.m = m;
    // Stock: a NaN anywhere, or a non-finite maximum, makes the whole
    // log_softmax row NaN, which fairseq then sets to -inf.
    s.dead = !p.is_logprobs && (has_nan || !std::isfinite(m));
    s.lse = 0.f;
    if (!p.is_logprobs && !s.dead) {
      // Pass 2: normaliser, 8 lanes then pairwise (like a SIMD reduction).
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t v = 0;
      for (; v + 8 <= V; v += 8)
        for (int l = 0; l < 8; ++l) acc[l] += std::exp(ld(x, v + l) - m);
      for (; v < V; ++v) acc[v & 7] += std::exp(ld(x, v) - m);
      const float sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
      s.lse = std::log(sum);
    }
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t v = chunk_arg[c];
      chunk_cands.push_back({edited_score(ld(x, v), row, v, s, p), r * V + v});
    }
  }

  // The bound: k-th largest chunk-maximum score (-inf when too few chunks).
  float tau = kNegInf;
  if (static_cast<int64_t>(chunk_cands.size()) >= p.k) {
    std::nth_element(chunk_cands.begin(), chunk_cands.begin() + (p.k - 1), chunk_cands.end(),
                     better);
    tau = chunk_cands[p.k - 1].score;
  }

  // Pass 3: survivors, scored exactly with the edits.
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = sent * R + r;
    const T* x = logits + row * V;
    const RowStats& s = stats[r];
    if (s.dead) {
      if (tau == kNegInf)
        for (int64_t v = 0; v < V; ++v) survivors.push_back({kNegInf, r * V + v});
      continue;
    }
    for (int64_t v = 0; v < V; ++v) {
      const float xv = ld(x, v);
      if (raw_score(xv, s, p.is_logprobs) >= tau || v == p.unk)
        survivors.push_back({edited_score(xv, row, v, s, p), r * V + v});
    }
  }

  const int64_t k = p.k;
  // survivors.size() >= k always: every chunk-maximum token with score >= tau
  // survives, and tau = -inf keeps every token.
  std::partial_sort(survivors.begin(), survivors.begin() + k, survivors.end(), better);
  for (int64_t j = 0; j < k; ++j) {
    const Cand& c = survivors[j];
    p.out_scores[sent * k + j] = c.score;
    p.out_tokens[sent * k + j] = c.flat % V;
    p.out_beams[sent * k + j] = c.flat / V;
  }
}

}  // namespace

template <typename T>
void beam_topk_cpu_kernel(const T* logits, const BeamTopkParams& p) {
  at::parallel_for(0, p.bsz, 1, [&](int64_t begin, int64_t end) {
    std::vector<Cand> chunk_cands, survivors;
    std::vector<RowStats> stats;
    std::vector<int64_t> chunk_arg;
    chunk_cands.reserve(p.rows_per_sent * num_chunks(p.vocab));
    survivors.reserve(256);
    for (int64_t b = begin; b < end; ++b)
      sentence_topk(logits, p, b, chunk_cands, survivors, stats, chunk_arg);
  });
}

}  // namespace kernels

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& cum_scores, int64_t rows_per_sent,
    int64_t k, int64_t pad, int64_t unk, int64_t eos, double unk_penalty, int64_t eos_mode,
    const std::optional<at::Tensor>& banned, bool is_logprobs) {
  TORCH_CHECK(logits.device().is_cpu(), "beam_topk_cpu: logits must be on the CPU");
  TORCH_CHECK(logits.dim() == 2, "beam_topk: logits must be [rows, vocab]");
  TORCH_CHECK(logits.is_contiguous(), "beam_topk: logits must be contiguous");
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(rows_per_sent >= 1 && n % rows_per_sent == 0,
              "beam_topk: rows not a multiple of rows_per_sent");
  TORCH_CHECK(k >= 1 && k <= rows_per_sent * V, "beam_topk: k out of range");
  TORCH_CHECK(eos_mode >= 0 && eos_mode <= 2, "beam_topk: eos_mode must be 0, 1 or 2");
  const int64_t bsz = n / rows_per_sent;
  kernels::BeamTopkParams p{};
  p.bsz = bsz;
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
    const auto& c = *cum_scores;
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kFloat && c.is_contiguous() &&
                    c.numel() == n,
                "beam_topk: cum_scores must be a contiguous float32 CPU tensor of [rows]");
    p.cum = c.data_ptr<float>();
  }
  if (banned.has_value()) {
    const auto& b = *banned;
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kLong && b.is_contiguous() &&
                    b.dim() == 2 && b.size(0) == n,
                "beam_topk: banned must be a contiguous int64 CPU tensor of [rows, nb]");
    p.banned = b.data_ptr<int64_t>();
    p.n_banned = b.size(1);
  }
  auto scores = at::empty({bsz, k}, logits.options().dtype(at::kFloat));
  auto tokens = at::empty({bsz, k}, logits.options().dtype(at::kLong));
  auto beams = at::empty({bsz, k}, logits.options().dtype(at::kLong));
  p.out_scores = scores.data_ptr<float>();
  p.out_tokens = tokens.data_ptr<int64_t>();
  p.out_beams = beams.data_ptr<int64_t>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      kernels::beam_topk_cpu_kernel(logits.data_ptr<float>(), p);
      break;
    case at::kHalf:
      kernels::beam_topk_cpu_kernel(logits.data_ptr<at::Half>(), p);
      break;
    case at::kBFloat16:
      kernels::beam_topk_cpu_kernel(logits.data_ptr<at::BFloat16>(), p);
      break;
    default:
      TORCH_CHECK(false, "beam_topk: logits dtype must be float32, float16 or bfloat16, got ",
                  logits.scalar_type());
  }
  return {scores, tokens, beams};
}

}  // namespace seqfuse
