// Row normaliser and row softmax computed with ATen's own vectorised
// primitives, in the same order as torch's CPU log_softmax / softmax over the
// last dimension (max reduction, sum of exp(x - max), vectorised log).
// Compiled once per CPU capability (row_lse_{default,avx2,avx512}.cc, each
// with its own -m flags) and chosen at run time by torch's capability, so the
// fused step's log-probs equal torch.log_softmax's bit for bit.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace seqfuse {
namespace cpu_capability {
namespace CPU_CAPABILITY {

// lse = log(sum(exp(x - m))) for a float row of n values and its maximum m.
float row_lse(const float* x, int64_t n, float m) {
  using Vec = at::vec::Vectorized<float>;
  float sum = at::vec::map_reduce_all<float>([m](Vec v) { return (v - Vec(m)).exp(); },
                                             [](Vec a, Vec b) { return a + b; }, x, n);
  float out[1] = {sum};
  at::vec::map([](Vec v) { return v.log(); }, out, out, 1);
  return out[0];
}

// out = softmax(x) over a float row of n values, as torch's CPU softmax over
// the last dimension computes it (the float kernel in ATen's
// SoftMaxKernel.cpp): the maximum by a vectorised reduction, exp(x - max)
// with the vectorised exp, their sum by a vectorised reduction, then a
// multiply by 1 / sum. The attention cores' probabilities (fairseq's
// utils.softmax, F.softmax(dtype=float32)) equal torch's bit for bit for the
// same scores. out may be x.
// Below one vector, ATen's reduce_all folds lane by lane (x0 op x1, then op
// x2, ...) with a whole-vector op and a store and reload per value; the same
// folds in scalars give the same values (a sum in the same order; the
// maximum is exact, NaN when any value is NaN, as at::vec::maximum), at a
// fraction of the cost: attention rows of a decoding step are mostly that
// short (a source sentence, the steps so far).
void softmax_row(const float* x, float* out, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  if (n <= 0) return;
  const bool short_row = n < Vec::size();
  float m;
  if (short_row) {
    m = x[0];
    for (int64_t i = 1; i < n; ++i) {
      m = (m != m || x[i] != x[i]) ? std::numeric_limits<float>::quiet_NaN() : std::max(m, x[i]);
    }
  } else {
    m = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  }
  at::vec::map([m](Vec v) { return (v - Vec(m)).exp(); }, out, x, n);
  float sum;
  if (short_row) {
    sum = out[0];
    for (int64_t i = 1; i < n; ++i) sum += out[i];
  } else {
    sum = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, out, n);
  }
  sum = 1 / sum;
  at::vec::map([sum](Vec v) { return v * Vec(sum); }, out, out, n);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu_capability
}  // namespace seqfuse
