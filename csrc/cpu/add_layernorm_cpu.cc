// CPU kernel of add_layernorm: sum = x + bias + residual, then layer norm of
// the (rounded) sum, one pass over each row; OpenMP over rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/layer_cpu_common.h"
#include "layer_ops.h"

namespace seqfuse {
namespace {

// fp32 rows: vectorised loops (float accumulation, as torch's CPU layer norm).
void add_layernorm_row_f32(const float* x, const float* bias, const float* res, const float* w,
                           const float* beta, float* s, float* o, int64_t cols, float eps) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < cols; ++c) {
    float v = x[c];
    if (bias != nullptr) v = v + bias[c];
    if (res != nullptr) v = res[c] + v;
    s[c] = v;
    acc += v;
  }
  if (w == nullptr) return;
  const float mean = acc / static_cast<float>(cols);
  float var = 0.0f;
#pragma omp simd reduction(+ : var)
  for (int64_t c = 0; c < cols; ++c) {
    const float d = s[c] - mean;
    var += d * d;
  }
  var /= static_cast<float>(cols);
  const float rstd = 1.0f / std::sqrt(var + eps);
  const float shift = -mean * rstd;
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) o[c] = (s[c] * rstd + shift) * w[c] + beta[c];
}

// Rows [r0, r1) on the calling thread.
template <typename T>
void add_layernorm_range(const kernels::AddLayerNormParams& p, int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  const T* w = static_cast<const T*>(p.weight);
  const T* beta = static_cast<const T*>(p.beta);
  T* sum = static_cast<T*>(p.sum);
  T* normed = static_cast<T*>(p.normed);
  const int64_t cols = p.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * cols;
    // The rounded sum is stored first (in `sum`, else in `normed`), then
    // normalised from memory: the stock computation rounds it too.
    T* s = sum != nullptr ? sum + r * cols : normed + r * cols;
    const T* rr = res != nullptr ? res + r * cols : nullptr;
    T* o = normed != nullptr ? normed + r * cols : nullptr;
    if constexpr (std::is_same<T, float>::value) {
      add_layernorm_row_f32(xr, bias, rr, w, beta, s, o, cols, p.eps);
      continue;
    }
    float acc = 0.0f;
    for (int64_t c = 0; c < cols; ++c) {
      float v = static_cast<float>(xr[c]);
      if (bias != nullptr) v = cpu::round_as<T>(v + static_cast<float>(bias[c]));
      if (rr != nullptr) v = cpu::round_as<T>(static_cast<float>(rr[c]) + v);
      s[c] = static_cast<T>(v);
      acc += static_cast<float>(s[c]);
    }
    if (w == nullptr) continue;
    const float mean = acc / static_cast<float>(cols);
    float var = 0.0f;
    for (int64_t c = 0; c < cols; ++c) {
      const float d = static_cast<float>(s[c]) - mean;
      var += d * d;
    }
    var /= static_cast<float>(cols);
    const float rstd = 1.0f / std::sqrt(var + p.eps);
    const float shift = -mean * rstd;
    for (int64_t c = 0; c < cols; ++c) {
      const float y = static_cast<float>(s[c]) * rstd + shift;
      o[c] = static_cast<T>(y * static_cast<float>(w[c]) + static_cast<float>(beta[c]));
    }
  }
}

template <typename T>
void add_layernorm_rows(const kernels::AddLayerNormParams& p) {
  at::parallel_for(0, p.rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / p.cols),
                   [&](int64_t r0, int64_t r1) { add_layernorm_range<T>(p, r0, r1); });
}

}  // namespace

void add_layernorm_range_f32(const kernels::AddLayerNormParams& p, int64_t r0, int64_t r1) {
  add_layernorm_range<float>(p, r0, r1);
}

std::tuple<at::Tensor, at::Tensor> add_layernorm_cpu(const at::Tensor& x,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& residual,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& beta,
                                                     double eps, bool want_sum) {
  TORCH_CHECK(x.device().is_cpu(), "add_layernorm_cpu: x must be on the CPU");
  kernels::AddLayerNormParams p;
  auto out = add_layernorm_prepare(x, bias, residual, weight, beta, eps, want_sum, &p);
  if (p.rows > 0 && p.cols > 0) {
    SEQFUSE_DISPATCH_FLOAT(x.scalar_type(), "add_layernorm_cpu",
                           [&] { add_layernorm_rows<scalar_t>(p); });
  }
  return out;
}

}  // namespace seqfuse
