// CPU kernel of bias_act: x = act(x + bias) in place; OpenMP over rows.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/layer_cpu_common.h"
#include "layer_ops.h"

namespace seqfuse {
namespace {

inline float activate(float v, int act) {
  switch (act) {
    case kernels::kActRelu:
      return v > 0.0f ? v : 0.0f;
    case kernels::kActGelu:
      return 0.5f * v * (1.0f + std::erf(v * static_cast<float>(M_SQRT1_2)));
    case kernels::kActGeluAccurate: {
      const float k = std::sqrt(2.0f / static_cast<float>(M_PI));
      return 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
    case kernels::kActTanh:
      return std::tanh(v);
    default:
      return v;
  }
}

// Rows [r0, r1) on the calling thread.
template <typename T, int Act>
void bias_act_range(const kernels::BiasActParams& p, int64_t r0, int64_t r1) {
  T* x = static_cast<T*>(p.x);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t cols = p.cols;
  for (int64_t r = r0; r < r1; ++r) {
    T* xr = x + r * cols;
    if (Act == kernels::kActRelu && std::is_same<T, float>::value) {
      float* xf = reinterpret_cast<float*>(xr);
      const float* bf = reinterpret_cast<const float*>(bias);
      if (bf != nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const float v = xf[c] + bf[c];
          xf[c] = v > 0.0f ? v : 0.0f;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) xf[c] = xf[c] > 0.0f ? xf[c] : 0.0f;
      }
      continue;
    }
    for (int64_t c = 0; c < cols; ++c) {
      float v = static_cast<float>(xr[c]);
      if (bias != nullptr) v = cpu::round_as<T>(v + static_cast<float>(bias[c]));
      xr[c] = static_cast<T>(activate(v, Act));
    }
  }
}

template <typename T, int Act>
void bias_act_rows(const kernels::BiasActParams& p) {
  at::parallel_for(0, p.rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / p.cols),
                   [&](int64_t r0, int64_t r1) { bias_act_range<T, Act>(p, r0, r1); });
}

// f(std::integral_constant<int, act>{}) for the activation code `act`.
template <typename F>
void with_act(int act, F&& f) {
  switch (act) {
    case kernels::kActRelu:
      return f(std::integral_constant<int, kernels::kActRelu>{});
    case kernels::kActGelu:
      return f(std::integral_constant<int, kernels::kActGelu>{});
    case kernels::kActGeluAccurate:
      return f(std::integral_constant<int, kernels::kActGeluAccurate>{});
    case kernels::kActTanh:
      return f(std::integral_constant<int, kernels::kActTanh>{});
    default:
      return f(std::integral_constant<int, kernels::kActLinear>{});
  }
}

template <typename T>
void bias_act_dispatch(const kernels::BiasActParams& p) {
  with_act(p.act, [&](auto a) { bias_act_rows<T, decltype(a)::value>(p); });
}

}  // namespace

void bias_act_range_f32(const kernels::BiasActParams& p, int64_t r0, int64_t r1) {
  with_act(p.act, [&](auto a) { bias_act_range<float, decltype(a)::value>(p, r0, r1); });
}

at::Tensor bias_act_cpu(at::Tensor x, const std::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK(x.device().is_cpu(), "bias_act_cpu: x must be on the CPU");
  kernels::BiasActParams p;
  bias_act_prepare(x, bias, act, &p);
  if (p.rows > 0 && p.cols > 0) {
    SEQFUSE_DISPATCH_FLOAT(x.scalar_type(), "bias_act_cpu",
                           [&] { bias_act_dispatch<scalar_t>(p); });
  }
  return x;
}

}  // namespace seqfuse
