// CPU kernel of add_layernorm: sum = x + bias + residual, then layer norm of
// the (rounded) sum, one pass over each row; OpenMP over rows.
#include <ATen/Parallel.h>

#include <cmath>

#include "cpu/layer_cpu_common.h"
#include "layer_ops.h"

namespace seqfuse {
namespace {

template <typename T>
void add_layernorm_rows(const kernels::AddLayerNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  const T* w = static_cast<const T*>(p.weight);
  const T* beta = static_cast<const T*>(p.beta);
  T* sum = static_cast<T*>(p.sum);
  T* normed = static_cast<T*>(p.normed);
  const int64_t cols = p.cols;
  at::parallel_for(0, p.rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * cols;
      // The rounded sum is stored first (in `sum`, else in `normed`), then
      // normalised from memory: the stock computation rounds it too.
      T* s = sum != nullptr ? sum + r * cols : normed + r * cols;
      const T* rr = res != nullptr ? res + r * cols : nullptr;
      double acc = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        float v = static_cast<float>(xr[c]);
        if (bias != nullptr) v = cpu::round_as<T>(v + static_cast<float>(bias[c]));
        if (rr != nullptr) v = cpu::round_as<T>(static_cast<float>(rr[c]) + v);
        s[c] = static_cast<T>(v);
        acc += static_cast<float>(s[c]);
      }
      if (w == nullptr) continue;
      const double mean = acc / static_cast<double>(cols);
      double var = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        const double d = static_cast<double>(static_cast<float>(s[c])) - mean;
        var += d * d;
      }
      var /= static_cast<double>(cols);
      const float rstd = 1.0f / std::sqrt(static_cast<float>(var) + p.eps);
      const float shift = -static_cast<float>(mean) * rstd;
      T* o = normed + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const float y = static_cast<float>(s[c]) * rstd + shift;
        o[c] = static_cast<T>(y * static_cast<float>(w[c]) + static_cast<float>(beta[c]));
      }
    }
  });
}

}  // namespace

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
