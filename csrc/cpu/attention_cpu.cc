// CPU kernel of the attention core: one task per (query row, head, query
// time), scores of all keys in a task-local buffer, torch's fp32 softmax
// (vectorised, bit for bit; cpu/capability/row_lse.h), weighted sum of
// values. OpenMP (ATen parallel_for) over tasks.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/capability/row_lse.h"
#include "cpu/layer_cpu_common.h"
#include "layer_ops.h"

namespace seqfuse {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Dot product over n: 16 lane sums (lane l takes d = l mod 16, one vector
// register), then a pairwise tree over the lanes (depth 4). A sequential
// combine of the lanes was a 16-add latency chain per score, most of a
// decoding step's attention time.
constexpr int kLanes = 16;

template <typename T>
__attribute__((always_inline)) inline float dot(const float* a, const T* b, int64_t n) {
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) part[l] += a[d + l] * static_cast<float>(b[d + l]);
  }
  for (int l = 0; d < n; ++d, ++l) part[l] += a[d] * static_cast<float>(b[d]);
  for (int w = kLanes / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

// Where slot j's rows start: its block's pointer (p.k_slots / p.v_slots), or
// base + j * stride.
template <typename T>
__attribute__((always_inline)) inline const T* slot_base(const T* base, int64_t stride,
                                                         const void* const* slots, int64_t j) {
  return slots != nullptr ? static_cast<const T*>(slots[j]) : base + j * stride;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * static_cast<float>(x[d]);
}

// out[d] += sum_j p[j] * v(j)[d] for one head of D channels, j in order
// (keys with p[j] == 0 skipped, as axpy's callers do), sums in registers.
template <typename T, int D>
__attribute__((always_inline)) inline void weighted_sum(const float* pr, int64_t s, const T* v,
                                                        const int64_t* phys, int64_t v_ss,
                                                        const void* const* v_slots, int64_t v_sm,
                                                        int64_t offset, float* out) {
  float a[D];
#pragma omp simd
  for (int d = 0; d < D; ++d) a[d] = out[d];
  for (int64_t j = 0; j < s; ++j) {
    const float pt = pr[j];
    if (pt != 0.0f || pt != pt) {
      const T* vr = slot_base(v, v_ss, v_slots, j) + phys[j] * v_sm + offset;
#pragma omp simd
      for (int d = 0; d < D; ++d) a[d] += pt * static_cast<float>(vr[d]);
    }
  }
#pragma omp simd
  for (int d = 0; d < D; ++d) out[d] = a[d];
}

// 16 scores of one 64-wide head at once (fp32): 16 lane sums per key (lane l
// takes d = l mod 16, as dot() does), then one transposed pairwise tree over
// the 16 key vectors (lanes l + 8, then + 4, + 2, + 1) instead of 16
// horizontal reductions. GCC vector extensions, so every target_clones clone
// compiles it. Rounding differs from dot()'s by the order of its last adds
// (a few 1e-7 relative).
// (GCC notes that a 64-byte vector argument's ABI differs without AVX-512:
// these helpers are always inlined, so no such call exists.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v16f __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

__attribute__((always_inline)) inline v16f load16(const float* p) {
  v16f x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// a and b each hold 16 / w groups of w lanes (one row's partial sums per
// group, rows in order, a's before b's): the result holds 32 / w groups of
// w / 2 lanes, lane l of a group being its lanes l + (l + w / 2).
template <int W>
__attribute__((always_inline)) inline v16f pair_sum(v16f a, v16f b) {
  constexpr int kHalf = W / 2, kGroups = 16 / W;
  v16i lo, hi;
  for (int l = 0; l < 16; ++l) {
    const int g = l / kHalf, off = l % kHalf;
    const int src = (g < kGroups ? 0 : 16) + (g % kGroups) * W + off;
    lo[l] = src;
    hi[l] = src + kHalf;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

// scores[j] = round(q . k_j) for keys j0 .. j0 + cnt - 1 (cnt <= 16) of one head.
__attribute__((always_inline)) inline void scores16(const float* qh, const float* k, int64_t k_ss,
                                                    const void* const* k_slots, int64_t k_sm,
                                                    const int64_t* phys, int64_t j0, int cnt,
                                                    int64_t offset, float* out) {
  const v16f q0 = load16(qh), q1 = load16(qh + 16), q2 = load16(qh + 32), q3 = load16(qh + 48);
  v16f part[16];
  for (int r = 0; r < 16; ++r) {
    if (r < cnt) {
      const float* kr = slot_base(k, k_ss, k_slots, j0 + r) + phys[j0 + r] * k_sm + offset;
      v16f a = q0 * load16(kr);
      a += q1 * load16(kr + 16);
      a += q2 * load16(kr + 32);
      a += q3 * load16(kr + 48);
      part[r] = a;
    } else {
      part[r] = v16f{};
    }
  }
  v16f t8[8], t4[4], t2[2];
  for (int r = 0; r < 8; ++r) t8[r] = pair_sum<16>(part[2 * r], part[2 * r + 1]);
  for (int r = 0; r < 4; ++r) t4[r] = pair_sum<8>(t8[2 * r], t8[2 * r + 1]);
  for (int r = 0; r < 2; ++r) t2[r] = pair_sum<4>(t4[2 * r], t4[2 * r + 1]);
  const v16f sums = pair_sum<2>(t2[0], t2[1]);
  for (int r = 0; r < cnt; ++r) out[r] = sums[r];
}

// Tasks [t0, t1) of (query row, query time); all heads of a task together so
// that each key row (all heads, contiguous) is read once. Scratch: scores
// [heads, s], phys [s], qs/acc [heads * dim].
template <typename T>
__attribute__((always_inline)) inline void attention_range(const kernels::AttentionParams& p,
                                                           int64_t t0, int64_t t1, float* scores,
                                                           int64_t* phys, float* qs, float* acc) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int64_t heads = p.heads, dim = p.dim, tq = p.tq, s = p.s, n = p.n;
  const int64_t c = heads * dim;
  const int64_t q_sh = p.q_sh != 0 ? p.q_sh : dim, k_sh = p.k_sh != 0 ? p.k_sh : dim,
                v_sh = p.v_sh != 0 ? p.v_sh : dim;
  const int64_t hpk = std::max<int64_t>(1, p.q_heads_per_kv);  // query heads per K/V head
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t i = task % tq;
    const int64_t row = task / tq;
    const int64_t g = row / p.q_per_kv;
    const T* qp = q + i * p.q_st + row * p.q_sn;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t d = 0; d < dim; ++d) {
        qs[h * dim + d] = cpu::round_as<T>(static_cast<float>(qp[h * q_sh + d]) * p.scaling);
      }
    }
    const int64_t jend = p.causal_offset >= 0 ? std::min(s, p.causal_offset + i + 1) : s;
    bool scored = false;
    if constexpr (std::is_same<T, float>::value) {
      if (dim == 64) {
        for (int64_t j = 0; j < s; ++j) {
          phys[j] = p.rows != nullptr ? p.rows[g * p.rows_sg + j * p.rows_sj] : g;
        }
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t j0 = 0; j0 < s; j0 += 16) {
            const int cnt = static_cast<int>(std::min<int64_t>(16, s - j0));
            scores16(qs + h * 64, k, p.k_ss, p.k_slots, p.k_sm, phys, j0, cnt, h / hpk * k_sh,
                     scores + h * s + j0);
          }
        }
        for (int64_t j = 0; j < s; ++j) {
          bool masked = j >= jend;
          if (!masked && p.pad != nullptr) masked = p.pad[phys[j] * p.pad_sm + j * p.pad_sj] != 0;
          if (masked) {
            for (int64_t h = 0; h < heads; ++h) scores[h * s + j] = kNegInf;
          }
        }
        scored = true;
      }
    }
    for (int64_t j = 0; j < s && !scored; ++j) {
      const int64_t m = p.rows != nullptr ? p.rows[g * p.rows_sg + j * p.rows_sj] : g;
      phys[j] = m;
      bool masked = j >= jend;
      if (!masked && p.pad != nullptr) masked = p.pad[m * p.pad_sm + j * p.pad_sj] != 0;
      const T* kr = slot_base(k, p.k_ss, p.k_slots, j) + m * p.k_sm;
      for (int64_t h = 0; h < heads; ++h)
        scores[h * s + j] =
            masked ? kNegInf : cpu::round_as<T>(dot(qs + h * dim, kr + h / hpk * k_sh, dim));
    }
    std::fill(acc, acc + c, 0.0f);
    for (int64_t h = 0; h < heads; ++h) {
      // torch's CPU softmax over the keys, bit for bit (stock's
      // F.softmax(scores, dtype=float32) of the same scores). A row with
      // every key masked gives NaN, as it does in stock.
      float* sc = scores + h * s;
      cpu_capability::softmax_row(sc, sc, s);
      float* wrow = p.weights != nullptr ? p.weights + ((h * n + row) * tq + i) * s : nullptr;
      if (wrow != nullptr) std::memcpy(wrow, sc, static_cast<size_t>(s) * sizeof(float));
      if constexpr (!std::is_same<T, float>::value) {
        for (int64_t j = 0; j < s; ++j) sc[j] = cpu::round_as<T>(sc[j]);
      }
    }
    // Weighted sum of values, head by head (each output element sums over
    // the keys in key order); a 64-wide head keeps its sums in registers.
    for (int64_t h = 0; h < heads; ++h) {
      if (dim == 64) {
        weighted_sum<T, 64>(scores + h * s, s, v, phys, p.v_ss, p.v_slots, p.v_sm, h / hpk * v_sh,
                            acc + h * dim);
      } else {
        for (int64_t j = 0; j < s; ++j) {
          const float pt = scores[h * s + j];
          if (pt != 0.0f || pt != pt)
            axpy(pt, slot_base(v, p.v_ss, p.v_slots, j) + phys[j] * p.v_sm + h / hpk * v_sh,
                 acc + h * dim, dim);
        }
      }
    }
    T* o = out + (i * n + row) * c;
    for (int64_t d = 0; d < c; ++d) o[d] = static_cast<T>(acc[d]);
  }
}

// fp32 (the inference path) gets AVX2/AVX-512 clones of the dot products.
__attribute__((target_clones("avx512f", "avx2", "default"))) void attention_range_f32(
    const kernels::AttentionParams& p, int64_t t0, int64_t t1, float* scores, int64_t* phys,
    float* qs, float* acc) {
  attention_range<float>(p, t0, t1, scores, phys, qs, acc);
}

template <typename T>
void attention_tasks(const kernels::AttentionParams& p) {
  const int64_t tasks = p.n * p.tq, s = p.s, c = p.heads * p.dim;
  // Small problems (one decoding step) stay on one thread: a parallel region
  // costs more than the work there.
  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, 2 * s * c));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(static_cast<size_t>(s * p.heads)), qs(static_cast<size_t>(c)),
        acc(static_cast<size_t>(c));
    std::vector<int64_t> phys(static_cast<size_t>(s));
    if constexpr (std::is_same<T, float>::value) {
      attention_range_f32(p, t0, t1, scores.data(), phys.data(), qs.data(), acc.data());
    } else {
      attention_range<T>(p, t0, t1, scores.data(), phys.data(), qs.data(), acc.data());
    }
  });
}

}  // namespace

void check_attention_rows(const kernels::AttentionParams& p, int64_t m) {
  if (p.rows == nullptr) return;
  const int64_t g = p.n / p.q_per_kv, s = p.rows_sj == 0 ? std::min<int64_t>(p.s, 1) : p.s;
  bool ok = true;
  for (int64_t r = 0; r < g; ++r) {
    const int64_t* row = p.rows + r * p.rows_sg;
    for (int64_t j = 0; j < s; ++j) {
      const int64_t v = row[j * p.rows_sj];
      ok &= v >= 0 && v < m;
    }
  }
  TORCH_CHECK(ok, "kv_rows outside [0, ", m, ")");
}

void attention_range_run_f32(const kernels::AttentionParams& p, int64_t t0, int64_t t1,
                             float* scores, int64_t* phys, float* qs, float* acc) {
  if (t0 < t1) attention_range_f32(p, t0, t1, scores, phys, qs, acc);
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& kv_rows,
                                                 const std::optional<at::Tensor>& key_pad,
                                                 int64_t heads, double scaling, int64_t q_per_kv,
                                                 int64_t causal_offset, bool need_weights) {
  TORCH_CHECK(q.device().is_cpu(), "attention_cpu: q must be on the CPU");
  kernels::AttentionParams p;
  auto out = attention_prepare(q, k, v, kv_rows, key_pad, heads, scaling, q_per_kv, causal_offset,
                               need_weights, &p);
  if (p.tq > 0 && p.n > 0) {
    // Physical rows come from the caller: bound-check them once.
    check_attention_rows(p, k.size(1));
    SEQFUSE_DISPATCH_FLOAT(q.scalar_type(), "attention_cpu", [&] { attention_tasks<scalar_t>(p); });
  }
  return out;
}

// One query per row over that row's keys, in Hugging Face's cache layout:
// q [b, H, 1, hd], k and v [b, G, s, hd] (G K/V heads, H a multiple of G:
// query head h reads K/V head h / (H / G); each head's channels contiguous,
// other strides free), key_pad [b, s] (nonzero: masked; any strides) or
// none; fp32 on the CPU. The kernel of attention_cpu reading the heads at
// their strides; returns [b, 1, H * hd], the heads merged. A row whose keys
// are all masked gives NaN (torch's softmax of -inf scores).
at::Tensor attention_heads_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_pad, double scaling) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat,
              "attention_heads_cpu: q must be float32 on the CPU");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "attention_heads_cpu: k and v must be float32 on the CPU");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "attention_heads_cpu: q must be [b, H, 1, hd], got ",
              q.sizes());
  const int64_t b = q.size(0), heads = q.size(1), hd = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == b && k.size(1) >= 1 && heads % k.size(1) == 0 &&
                  k.size(3) == hd && v.sizes() == k.sizes(),
              "attention_heads_cpu: k and v must be [", b, ", G, s, ", hd, "] with ", heads,
              " a multiple of G, got ", k.sizes(), " and ", v.sizes());
  const int64_t kv_heads = k.size(1);
  const int64_t s = k.size(2);
  TORCH_CHECK(s >= 1 && heads >= 1 && hd >= 1, "attention_heads_cpu: no keys or no heads");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "attention_heads_cpu: each head's channels must be contiguous");
  TORCH_CHECK(
      (heads == 1 || q.stride(1) != 0) && (kv_heads == 1 || (k.stride(1) != 0 && v.stride(1) != 0)),
      "attention_heads_cpu: heads must not be broadcast");
  kernels::AttentionParams p;
  p.q = q.data_ptr();
  p.q_st = 0;
  p.q_sn = q.stride(0);
  p.q_sh = heads == 1 ? hd : q.stride(1);
  p.k = k.data_ptr();
  p.k_ss = k.stride(2);
  p.k_sm = k.stride(0);
  p.k_sh = kv_heads == 1 ? hd : k.stride(1);
  p.v = v.data_ptr();
  p.v_ss = v.stride(2);
  p.v_sm = v.stride(0);
  p.v_sh = kv_heads == 1 ? hd : v.stride(1);
  p.q_heads_per_kv = heads / kv_heads;
  p.rows = nullptr;
  p.rows_sg = p.rows_sj = 0;
  p.pad = nullptr;
  p.pad_sm = p.pad_sj = 0;
  if (key_pad.has_value() && key_pad->defined()) {
    const at::Tensor& kp = *key_pad;
    TORCH_CHECK(kp.scalar_type() == at::kBool || kp.scalar_type() == at::kByte,
                "attention_heads_cpu: key_pad must be bool or uint8");
    TORCH_CHECK(kp.device().is_cpu() && kp.dim() == 2 && kp.size(0) == b && kp.size(1) == s,
                "attention_heads_cpu: key_pad must be [", b, ", ", s, "] on the CPU, got ",
                kp.sizes());
    p.pad = reinterpret_cast<const uint8_t*>(kp.data_ptr());
    p.pad_sm = kp.stride(0);
    p.pad_sj = kp.stride(1);
  }
  at::Tensor out = at::empty({b, 1, heads * hd}, q.options());
  p.out = out.data_ptr();
  p.weights = nullptr;
  p.tq = 1;
  p.n = b;
  p.s = s;
  p.heads = heads;
  p.dim = hd;
  p.q_per_kv = 1;
  p.causal_offset = -1;
  p.scaling = static_cast<float>(scaling);
  if (b > 0) attention_tasks<float>(p);
  return out;
}

}  // namespace seqfuse
