// Float arithmetic of the fused beam-search step shared by the CPU and CUDA
// kernels: the score of a token from its logit and the row statistics, in
// fairseq's order of float operations, without multiply-add contraction
// (CUDA: __fmul_rn/__fadd_rn are never fused; CPU: the file that calls these
// sets `#pragma GCC optimize("fp-contract=off")`, which must cover the
// callers: GCC contracts inlined code by the caller's setting); the order keys
// of candidates; and the CUDA kernel's normaliser (a fixed exp/log and
// summation order, deterministic run to run). The CPU kernel takes torch's
// normaliser instead (bit-identical to stock's log_softmax on the CPU), so the
// two backends agree bit for bit on log-prob inputs (is_logprobs) and up to an
// ulp or two of the normaliser otherwise.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/beam_topk.h"

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline __attribute__((always_inline))
#endif

namespace seqfuse {
namespace kernels {

// CUDA normaliser summation order: thread l of kSumLanes accumulates the
// tokens v = l, l + kSumLanes, ... in increasing v; then lanes are combined
// within warps (offsets 16, 8, 4, 2, 1), then the kSumLanes / 32 warp sums
// (offsets 4, 2, 1).
constexpr int kSumLanes = 256;
constexpr int kSumGroups = kSumLanes / 32;

// num_chunks() of beam_topk.h, callable on the device too.
SF_HD int64_t sf_num_chunks(int64_t vocab) { return (vocab + kChunk - 1) / kChunk; }

SF_HD float sf_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SF_HD float sf_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

SF_HD float sf_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

SF_HD uint32_t sf_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

SF_HD float sf_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// exp(x) for x <= 0 (x = logit - row max), -inf -> 0. Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial (error < 2 ulp),
// then a multiply by 2^n. Results below 2^-126 are flushed to 0: the sum they
// enter is >= 1 (the maximum contributes exp(0) = 1), so they cannot matter.
SF_HD float sf_exp_nonpos(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;  // 16 significant bits: n * kLn2Hi is exact
  const float kLn2Lo = 1.42860682030941723e-6f;
  const float kRound = 12582912.0f;          // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < -87.0f ? -87.0f : x;  // also maps -inf to a finite value
  const float n = sf_add(sf_add(sf_mul(xc, kLog2e), kRound), -kRound);
  float r = sf_add(xc, -sf_mul(n, kLn2Hi));
  r = sf_add(r, -sf_mul(n, kLn2Lo));
  float p = 1.98412698412698413e-4f;  // 1/7!
  p = sf_add(sf_mul(p, r), 1.38888888888888889e-3f);
  p = sf_add(sf_mul(p, r), 8.33333333333333333e-3f);
  p = sf_add(sf_mul(p, r), 4.16666666666666667e-2f);
  p = sf_add(sf_mul(p, r), 1.66666666666666667e-1f);
  p = sf_add(sf_mul(p, r), 0.5f);
  p = sf_add(sf_mul(p, r), 1.0f);
  p = sf_add(sf_mul(p, r), 1.0f);
  const int32_t e = static_cast<int32_t>(n) + 127;  // n in [-126, 0]
  const float scale = sf_from_bits(static_cast<uint32_t>(e) << 23);
  return x < -87.0f ? 0.0f : sf_mul(p, scale);
}

SF_HD float sf_ninf() { return sf_from_bits(0xff800000u); }

// Natural log of a finite s >= 1 (the normaliser sum): s = 2^e * f with f in
// [sqrt(1/2), sqrt(2)), log f = 2 atanh(t), t = (f - 1) / (f + 1), |t| < 0.172.
SF_HD float sf_log_ge1(float s) {
  const uint32_t u = sf_bits(s);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xff) - 127;
  uint32_t mu = (u & 0x7fffffu) | 0x3f800000u;  // f in [1, 2)
  if (mu > 0x3fb504f3u) {                       // f > sqrt(2): halve it
    mu -= 0x00800000u;
    e += 1;
  }
  const float f = sf_from_bits(mu);
  const float t = sf_div(sf_add(f, -1.0f), sf_add(f, 1.0f));
  const float t2 = sf_mul(t, t);
  float q = 0.111111111111111111f;  // 1/9
  q = sf_add(sf_mul(q, t2), 0.142857142857142857f);
  q = sf_add(sf_mul(q, t2), 0.2f);
  q = sf_add(sf_mul(q, t2), 0.333333333333333333f);
  q = sf_add(sf_mul(q, t2), 1.0f);
  const float logf_ = sf_mul(sf_mul(2.0f, t), q);
  const float fe = static_cast<float>(e);
  return sf_add(sf_add(sf_mul(fe, 0.693145751953125f), logf_), sf_mul(fe, 1.42860682030941723e-6f));
}

// Monotone map of a non-NaN float to uint32 (a < b <=> key(a) < key(b));
// -0 and +0 share one key. -inf maps to 0x007fffff, above 0.
SF_HD uint32_t sf_order_key(float x) {
  uint32_t u = sf_bits(x);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

SF_HD float sf_key_to_float(uint32_t k) {
  return sf_from_bits((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// One candidate as a unique uint64: larger = better, i.e. (score desc, flat
// index asc). 0 is below every candidate (a padding value).
SF_HD uint64_t sf_cand_key(float score, uint32_t flat) {
  return (static_cast<uint64_t>(sf_order_key(score)) << 32) | (0xffffffffu - flat);
}

SF_HD float sf_cand_score(uint64_t key) {
  return sf_key_to_float(static_cast<uint32_t>(key >> 32));
}

SF_HD uint32_t sf_cand_flat(uint64_t key) {
  return 0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu);
}

// Per-row statistics computed before the bound.
struct RowStat {
  float m;    // row maximum
  float lse;  // log(sum(exp(x - m))), 0 when is_logprobs
  int dead;   // 1: stock's log_softmax row is all NaN (NaN or +inf logit, all -inf) -> -inf
};

// A row is dead when any logit is NaN or its maximum is not finite.
SF_HD int sf_row_dead(bool is_logprobs, bool has_nan, float m) {
  if (is_logprobs) return 0;
  return (has_nan || !(m > -3.4028235e38f && m < 3.4028235e38f)) ? 1 : 0;
}

// Log-prob of a logit before the edits, NaN -> -inf (fairseq's order of ops).
SF_HD float sf_lprob(float x, const RowStat& s, bool is_logprobs) {
  float lp = is_logprobs ? x : sf_add(sf_add(x, -s.m), -s.lse);
  return lp != lp ? sf_ninf() : lp;
}

// Unedited score: an upper bound of the edited one for every token but unk.
SF_HD float sf_raw_score(float x, const RowStat& s, bool is_logprobs, bool add_cum, float cum) {
  const float lp = sf_lprob(x, s, is_logprobs);
  return add_cum ? sf_add(lp, cum) : lp;
}

SF_HD bool sf_is_banned(const int64_t* banned_row, int64_t n_banned, int64_t v) {
  for (int64_t j = 0; j < n_banned; ++j)
    if (banned_row[j] == v) return true;
  return false;
}

// Edited score of token v of a row (fairseq order: NaN, pad, unk, eos, banned,
// + cum). banned_row may be nullptr.
SF_HD float sf_edited_score(float x, int64_t v, const RowStat& s, const BeamTopkParams& p,
                            const int64_t* banned_row, bool add_cum, float cum) {
  const float ninf = sf_ninf();
  if (s.dead || v == p.pad) return ninf;
  float lp = sf_lprob(x, s, p.is_logprobs);
  if (v == p.unk) lp = sf_add(lp, -p.unk_penalty);
  if (p.eos_mode == kEosOnly && v != p.eos) return ninf;
  if (p.eos_mode == kEosForbid && v == p.eos) return ninf;
  if (banned_row != nullptr && sf_is_banned(banned_row, p.n_banned, v)) return ninf;
  return add_cum ? sf_add(lp, cum) : lp;
}

}  // namespace kernels
}  // namespace seqfuse
