// CPU kernel of the attention core: one task per (query row, head, query
// time), scores of all keys in a task-local buffer, fp32 softmax, weighted sum
// of values. OpenMP (ATen parallel_for) over tasks.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/layer_cpu_common.h"
#include "layer_ops.h"

namespace seqfuse {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * static_cast<float>(b[d]);
  return s;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * static_cast<float>(x[d]);
}

template <typename T>
void attention_tasks(const kernels::AttentionParams& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int64_t heads = p.heads, dim = p.dim, tq = p.tq, s = p.s, n = p.n;
  const int64_t c = heads * dim;
  const int64_t tasks = n * heads * tq;
  // Small problems (one decoding step) stay on one thread: a parallel region
  // costs more than the work there.
  const int64_t grain =
      std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, 2 * s * dim));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(static_cast<size_t>(s));
    std::vector<int64_t> phys(static_cast<size_t>(s));
    std::vector<float> qs(static_cast<size_t>(dim)), acc(static_cast<size_t>(dim));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t i = task % tq;
      const int64_t h = (task / tq) % heads;
      const int64_t row = task / (tq * heads);
      const int64_t g = row / p.q_per_kv;
      const T* qp = q + i * p.q_st + row * p.q_sn + h * dim;
      for (int64_t d = 0; d < dim; ++d)
        qs[d] = cpu::round_as<T>(static_cast<float>(qp[d]) * p.scaling);
      const int64_t jend = p.causal_offset >= 0 ? std::min(s, p.causal_offset + i + 1) : s;
      float mx = kNegInf;
      for (int64_t j = 0; j < s; ++j) {
        const int64_t m = p.rows != nullptr ? p.rows[g * p.rows_sg + j * p.rows_sj] : g;
        phys[j] = m;
        bool masked = j >= jend;
        if (!masked && p.pad != nullptr) masked = p.pad[m * p.pad_sm + j * p.pad_sj] != 0;
        float sc = kNegInf;
        if (!masked)
          sc = cpu::round_as<T>(dot(qs.data(), k + j * p.k_ss + m * p.k_sm + h * dim, dim));
        scores[j] = sc;
        mx = std::max(mx, sc);
      }
      // Same expression as the stock softmax: exp(x - max) / sum. A row with
      // every key masked gives NaN, as it does in stock.
      float sum = 0.0f;
      for (int64_t j = 0; j < s; ++j) {
        scores[j] = std::exp(scores[j] - mx);
        sum += scores[j];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      float* wrow = p.weights != nullptr ? p.weights + ((h * n + row) * tq + i) * s : nullptr;
      for (int64_t j = 0; j < s; ++j) {
        const float pj = scores[j] / sum;
        if (wrow != nullptr) wrow[j] = pj;
        const float pt = cpu::round_as<T>(pj);
        if (pt != 0.0f || pt != pt)
          axpy(pt, v + j * p.v_ss + phys[j] * p.v_sm + h * dim, acc.data(), dim);
      }
      T* o = out + (i * n + row) * c + h * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d]);
    }
  });
}

}  // namespace

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
    if (p.rows != nullptr && p.s > 0) {
      // Physical rows come from the caller: bound-check them once.
      const int64_t m = k.size(1);
      const at::Tensor r = kv_rows->dim() == 1 ? *kv_rows : kv_rows->narrow(1, 0, p.s);
      TORCH_CHECK(r.numel() == 0 || (r.min().item<int64_t>() >= 0 && r.max().item<int64_t>() < m),
                  "kv_rows outside [0, ", m, ")");
    }
    SEQFUSE_DISPATCH_FLOAT(q.scalar_type(), "attention_cpu", [&] { attention_tasks<scalar_t>(p); });
  }
  return out;
}

}  // namespace seqfuse
