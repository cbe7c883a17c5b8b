// CPU kernel of the fused beam-search step (algorithm: csrc/kernels/beam_topk.h;
// score arithmetic: csrc/kernels/beam_topk_math.h, shared with the CUDA kernel).
//
// The normaliser is torch's own (cpu_capability::row_lse: ATen's vectorised
// exp/sum/log in log_softmax's order), so every score equals stock's
// log_softmax + edits + cum bit for bit on the CPU, and the generator's
// tie handling sees exactly stock's ties.
//
// Phase 1, parallel over rows: chunk maxima, row maximum, NaN flag, normaliser.
// Phase 2, parallel over sentences: the bound tau, the survivors, their top-k.
// The hot loops run on float rows (fp16/bf16 rows are widened once into a
// scratch row, as log_softmax(dtype=float32) does) and the chunk pass is
// compiled for AVX-512, AVX2 and the baseline ISA, picked at load time.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "beam_topk_binding.h"
#include "cpu/capability/row_lse.h"
#include "cpu/task_queue.h"
#include "kernels/beam_topk.h"
#include "kernels/beam_topk_math.h"
#include "ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// no-trapping-math lets GCC if-convert the selects of the exp; it changes no
// result (no reassociation, NaN and inf kept).
#define SF_MULTIVERSION \
  __attribute__((target_clones("avx512f", "avx2", "default"), optimize("no-trapping-math")))
#else
#define SF_MULTIVERSION
#endif

// No FMA contraction in this file, even in the AVX-512 clone (GCC contracts
// C++ by default): the score arithmetic must round as stock's separate ops and
// as the CUDA kernel. A pragma, not a function attribute: only the pragma
// reaches the inlined math helpers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace seqfuse {
namespace kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr int kMaxLanes = 16;  // one AVX-512 vector or two AVX2 vectors

// Chunk maxima of one row ([V] -> [nchunks]) and whether any logit is NaN.
// The maximum ignores NaN (a NaN never compares greater). Each chunk keeps 16
// running lane maxima (a GCC vector, so every target clone gets real vector
// compares and selects; max is exact, so the lane order changes no result).
typedef float SfV16f __attribute__((vector_size(64)));
typedef int SfV16i __attribute__((vector_size(64)));

SF_MULTIVERSION bool row_chunk_max(const float* __restrict x, int64_t V,
                                   float* __restrict chunk_max) {
  static_assert(kChunk % kMaxLanes == 0, "a chunk is a whole number of lane groups");
  SfV16i nan_seen = {};
  const int64_t nch = num_chunks(V);
  for (int64_t c = 0; c < nch; ++c) {
    const int64_t lo = c * kChunk, n = std::min<int64_t>(kChunk, V - lo);
    const float* xc = x + lo;
    SfV16f lane;
    for (int l = 0; l < kMaxLanes; ++l) lane[l] = kNegInf;
    int64_t v = 0;
    for (; v + kMaxLanes <= n; v += kMaxLanes) {
      SfV16f xv;
      __builtin_memcpy(&xv, xc + v, sizeof(xv));
      nan_seen |= (xv != xv);
      lane = xv > lane ? xv : lane;
    }
    float cm = lane[0];
    for (int l = 1; l < kMaxLanes; ++l) cm = lane[l] > cm ? lane[l] : cm;
    for (; v < n; ++v) {
      const float xv = xc[v];
      nan_seen[0] |= (xv != xv);
      cm = xv > cm ? xv : cm;
    }
    chunk_max[c] = cm;
  }
  int any = 0;
  for (int l = 0; l < kMaxLanes; ++l) any |= nan_seen[l];
  return any != 0;
}

// row_chunk_max from the row's group maxima ([num_max_groups(V)], each the
// maximum of kMaxGroup logits ignoring NaN, or NaN where one is NaN): the
// same chunk maxima (max is exact; only the sign of a zero maximum may come
// from another of its equal tokens, which no score or comparison sees) and,
// for the rows where it matters, the same NaN flag: a NaN makes a row of
// logits dead, whose chunk maxima nothing reads.
bool groups_chunk_max(const float* __restrict gmax, int64_t V, float* __restrict chunk_max) {
  constexpr int64_t per = kChunk / kMaxGroup;
  const int64_t nch = num_chunks(V), ng = num_max_groups(V);
  bool nan_seen = false;
  for (int64_t c = 0; c < nch; ++c) {
    float cm = kNegInf;
    for (int64_t g = c * per; g < std::min(ng, (c + 1) * per); ++g) {
      const float v = gmax[g];
      nan_seen |= v != v;
      cm = v > cm ? v : cm;
    }
    chunk_max[c] = cm;
  }
  return nan_seen;
}

// Appends to `hits` the tokens v of a row whose unedited score is >= tau. A
// chunk whose maximum scores < tau holds no such token (the score is monotone
// in the logit) and is skipped: only a handful of chunks per sentence are read.
template <typename T>
void row_scan(const T* x, int64_t V, const float* chunk_max, const RowStat s, bool is_logprobs,
              bool add_cum, float cum, float tau, std::vector<int64_t>& hits) {
  const int64_t nch = num_chunks(V);
  for (int64_t c = 0; c < nch; ++c) {
    if (!(sf_raw_score(chunk_max[c], s, is_logprobs, add_cum, cum) >= tau)) continue;
    const int64_t hi = std::min(V, (c + 1) * kChunk);
    for (int64_t v = c * kChunk; v < hi; ++v)
      if (sf_raw_score(static_cast<float>(x[v]), s, is_logprobs, add_cum, cum) >= tau)
        hits.push_back(v);
  }
}

// A float view of row `row`: the input itself, or `scratch` filled from it.
template <typename T>
const float* float_row(const T* logits, int64_t row, int64_t V, std::vector<float>& scratch) {
  const T* x = logits + row * V;
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    scratch.resize(V);
    for (int64_t v = 0; v < V; ++v) scratch[v] = static_cast<float>(x[v]);
    return scratch.data();
  }
}

inline const int64_t* banned_row(const BeamTopkParams& p, int64_t row) {
  return p.banned == nullptr ? nullptr : p.banned + row * p.n_banned;
}

// Phase 1 for one row: its statistics and the edited scores of its chunk
// maxima (the first token of each chunk holding the chunk's maximum).
// group_max: the rows' group maxima ([rows, num_max_groups(V)]) or null.
template <typename T>
void row_phase(const T* logits, const float* group_max, const BeamTopkParams& p, int64_t row,
               RowStat& st, float* chunk_score, float* cmax, std::vector<float>& scratch,
               std::vector<uint8_t>& special) {
  const int64_t V = p.vocab, nch = num_chunks(V);
  const float* x = float_row(logits, row, V, scratch);
  const bool has_nan = group_max == nullptr
                           ? row_chunk_max(x, V, cmax)
                           : groups_chunk_max(group_max + row * num_max_groups(V), V, cmax);
  float m = kNegInf;
  for (int64_t c = 0; c < nch; ++c) m = cmax[c] > m ? cmax[c] : m;
  st.m = m;
  st.dead = sf_row_dead(p.is_logprobs, has_nan, m);
  st.lse = (p.is_logprobs || st.dead) ? 0.f : cpu_capability::row_lse(x, V, m);
  const bool add_cum = p.cum != nullptr;
  const float cum = add_cum ? p.cum[row] : 0.f;
  const int64_t* b = banned_row(p, row);
  // The chunk score is the edited score of the chunk's first maximal token.
  // Only the chunks holding an edited token (pad, unk, eos when edited, a
  // banned id) need that token: elsewhere the edits do nothing and the score
  // is the unedited one of the maximum (-inf for every token but eos under
  // kEosOnly), whichever token holds it.
  special.assign(nch, 0);
  if (p.pad >= 0) special[p.pad / kChunk] = 1;
  special[p.unk / kChunk] = 1;
  if (p.eos_mode != kEosAllow) special[p.eos / kChunk] = 1;
  for (int64_t j = 0; b != nullptr && j < p.n_banned; ++j)
    if (b[j] >= 0 && b[j] < V) special[b[j] / kChunk] = 1;
  for (int64_t c = 0; c < nch; ++c) {
    if (st.dead) {
      chunk_score[c] = kNegInf;
    } else if (!special[c]) {
      chunk_score[c] =
          p.eos_mode == kEosOnly ? kNegInf : sf_raw_score(cmax[c], st, p.is_logprobs, add_cum, cum);
    } else {
      // First token equal to the maximum; when every value is NaN (maximum
      // -inf, no token equal) the first token stands for the chunk.
      int64_t v = c * kChunk;
      const int64_t hi = std::min(V, v + kChunk);
      for (int64_t u = v; u < hi; ++u)
        if (x[u] == cmax[c]) {
          v = u;
          break;
        }
      chunk_score[c] = sf_edited_score(x[v], v, st, p, b, add_cum, cum);
    }
  }
}

struct Cand {
  float score;
  int64_t flat;  // beam * vocab + token
};

// (score desc, flat index asc): a strict weak order for non-NaN scores.
inline bool better(const Cand& a, const Cand& b) {
  return a.score > b.score || (a.score == b.score && a.flat < b.flat);
}

// Phase 2's survivors under a finite bound tau: the tokens of each row whose
// unedited score reaches tau, scored with the edits, and each row's unk.
template <typename T>
void bounded_survivors(const T* logits, const BeamTopkParams& p, int64_t sent, const RowStat* stats,
                       const float* chunk_max, float tau, std::vector<Cand>& survivors,
                       std::vector<int64_t>& hits) {
  const int64_t V = p.vocab, R = p.rows_per_sent, nch = num_chunks(V);
  const bool add_cum = p.cum != nullptr;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = sent * R + r;
    const RowStat& s = stats[row];
    if (s.dead) continue;  // every score -inf < tau
    const T* x = logits + row * V;
    const float cum = add_cum ? p.cum[row] : 0.f;
    const int64_t* b = banned_row(p, row);
    hits.clear();
    row_scan(x, V, chunk_max + r * nch, s, p.is_logprobs, add_cum, cum, tau, hits);
    bool unk_seen = false;
    for (const int64_t v : hits) {
      unk_seen |= v == p.unk;
      survivors.push_back(
          {sf_edited_score(static_cast<float>(x[v]), v, s, p, b, add_cum, cum), r * V + v});
    }
    // A negative unk penalty raises unk's score: it is always a candidate.
    if (!unk_seen)
      survivors.push_back(
          {sf_edited_score(static_cast<float>(x[p.unk]), p.unk, s, p, b, add_cum, cum),
           r * V + p.unk});
  }
}

// Phase 2's survivors without a bound (tau = -inf: fewer than k chunks score
// above -inf, e.g. at max_len where only eos scores). Every token would
// survive; ties go to the smaller flat index, so of the tokens scoring -inf
// only the first k in flat order can rank among the top k. Keeps those and
// every token scoring more: the same top k from ~k + R survivors, not R * V.
template <typename T>
void unbounded_survivors(const T* logits, const BeamTopkParams& p, int64_t sent,
                         const RowStat* stats, std::vector<Cand>& survivors) {
  const int64_t V = p.vocab, R = p.rows_per_sent;
  const bool add_cum = p.cum != nullptr;
  int64_t ninf_left = p.k;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t row = sent * R + r;
    const RowStat& s = stats[row];
    if (s.dead) {  // every score -inf
      for (int64_t v = 0; v < V && ninf_left > 0; ++v, --ninf_left)
        survivors.push_back({kNegInf, r * V + v});
      continue;
    }
    const T* x = logits + row * V;
    const float cum = add_cum ? p.cum[row] : 0.f;
    const int64_t* b = banned_row(p, row);
    for (int64_t v = 0; v < V; ++v) {
      const float sc = sf_edited_score(static_cast<float>(x[v]), v, s, p, b, add_cum, cum);
      if (sc == kNegInf) {
        if (ninf_left == 0) continue;
        --ninf_left;
      }
      survivors.push_back({sc, r * V + v});
    }
  }
}

// Phase 2 for one sentence.
template <typename T>
void sentence_phase(const T* logits, const BeamTopkParams& p, int64_t sent, const RowStat* stats,
                    float* chunk_scores, const float* chunk_max, std::vector<Cand>& survivors,
                    std::vector<int64_t>& hits) {
  const int64_t V = p.vocab, R = p.rows_per_sent, k = p.k, nch = num_chunks(V);
  const int64_t n_chunk_scores = R * nch;
  // The bound: k-th largest chunk-maximum score (-inf when too few chunks).
  float tau = kNegInf;
  if (n_chunk_scores >= k) {
    std::nth_element(chunk_scores, chunk_scores + (k - 1), chunk_scores + n_chunk_scores,
                     [](float a, float b) { return a > b; });
    tau = chunk_scores[k - 1];
  }
  survivors.clear();
  if (tau == kNegInf)
    unbounded_survivors(logits, p, sent, stats, survivors);
  else
    bounded_survivors(logits, p, sent, stats, chunk_max, tau, survivors, hits);
  // survivors.size() >= k: every chunk-maximum token scoring >= tau survives,
  // and without a bound every token but the -inf ones after the k-th. Fewer
  // only with chunk maxima above every logit of their chunk (group maxima
  // that are not these logits').
  TORCH_CHECK(static_cast<int64_t>(survivors.size()) >= k,
              "beam_topk_maxima: group maxima that are not the logits' own");
  std::partial_sort(survivors.begin(), survivors.begin() + k, survivors.end(), better);
  for (int64_t j = 0; j < k; ++j) {
    const Cand& c = survivors[j];
    p.out_scores[sent * k + j] = c.score;
    p.out_tokens[sent * k + j] = c.flat % V;
    p.out_beams[sent * k + j] = c.flat / V;
  }
}

}  // namespace

// group_max: null, or the logits' group maxima (groups_chunk_max), which
// then stand for the chunk pass over the logits.
template <typename T>
void beam_topk_cpu_kernel(const T* logits,  // [bsz * rows_per_sent, vocab]
                          const float* group_max, const BeamTopkParams& p) {
  const int64_t rows = p.bsz * p.rows_per_sent, nch = num_chunks(p.vocab);
  std::vector<RowStat> stats(rows);             // [rows]
  std::vector<float> chunk_scores(rows * nch);  // [rows, nchunks] edited, of the maxima
  std::vector<float> chunk_max(rows * nch);     // [rows, nchunks] logits
  // Rows cost ~3 passes over V floats: chunks of a few rows at least, handed
  // to whichever thread is free (cpu/task_queue.h).
  const int64_t row_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.vocab, 1));
  cpu::parallel_chunks(rows, row_grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    std::vector<uint8_t> special;
    for (int64_t r = begin; r < end; ++r)
      row_phase(logits, group_max, p, r, stats[r], chunk_scores.data() + r * nch,
                chunk_max.data() + r * nch, scratch, special);
  });
  at::parallel_for(0, p.bsz, 1, [&](int64_t begin, int64_t end) {
    std::vector<Cand> survivors;
    std::vector<int64_t> hits;
    survivors.reserve(256);
    for (int64_t b = begin; b < end; ++b)
      sentence_phase(logits, p, b, stats.data(), chunk_scores.data() + b * p.rows_per_sent * nch,
                     chunk_max.data() + b * p.rows_per_sent * nch, survivors, hits);
  });
}

}  // namespace kernels

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& cum_scores, int64_t rows_per_sent,
    int64_t k, int64_t pad, int64_t unk, int64_t eos, double unk_penalty, int64_t eos_mode,
    const std::optional<at::Tensor>& banned, bool is_logprobs) {
  TORCH_CHECK(logits.device().is_cpu(), "beam_topk_cpu: logits must be on the CPU");
  BeamTopkCall call = prepare_beam_topk(logits, cum_scores, rows_per_sent, k, pad, unk, eos,
                                        unk_penalty, eos_mode, banned, is_logprobs);
  const kernels::BeamTopkParams& p = call.p;
  if (p.bsz == 0) return {call.scores, call.tokens, call.beams};
  switch (logits.scalar_type()) {
    case at::kFloat:
      kernels::beam_topk_cpu_kernel(logits.data_ptr<float>(), nullptr, p);
      break;
    case at::kHalf:
      kernels::beam_topk_cpu_kernel(logits.data_ptr<at::Half>(), nullptr, p);
      break;
    case at::kBFloat16:
      kernels::beam_topk_cpu_kernel(logits.data_ptr<at::BFloat16>(), nullptr, p);
      break;
    default:
      TORCH_CHECK(false, "beam_topk: logits dtype must be float32, float16 or bfloat16, got ",
                  logits.scalar_type());
  }
  return {call.scores, call.tokens, call.beams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_maxima_cpu(
    const at::Tensor& logits, const at::Tensor& group_max,
    const std::optional<at::Tensor>& cum_scores, int64_t rows_per_sent, int64_t k, int64_t pad,
    int64_t unk, int64_t eos, double unk_penalty, int64_t eos_mode,
    const std::optional<at::Tensor>& banned) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat,
              "beam_topk_maxima: logits must be float32 on the CPU");
  BeamTopkCall call = prepare_beam_topk(logits, cum_scores, rows_per_sent, k, pad, unk, eos,
                                        unk_penalty, eos_mode, banned, false);
  const int64_t groups = kernels::num_max_groups(logits.size(1));
  TORCH_CHECK(group_max.dim() == 2 && group_max.size(0) == logits.size(0) &&
                  group_max.size(1) == groups && group_max.is_contiguous() &&
                  group_max.scalar_type() == at::kFloat && group_max.device().is_cpu(),
              "beam_topk_maxima: group_max must be a contiguous float32 CPU [", logits.size(0),
              ", ", groups, "] tensor, got ", group_max.scalar_type(), " ", group_max.sizes());
  if (call.p.bsz > 0)
    kernels::beam_topk_cpu_kernel(logits.data_ptr<float>(), group_max.data_ptr<float>(), call.p);
  return {call.scores, call.tokens, call.beams};
}

}  // namespace seqfuse
