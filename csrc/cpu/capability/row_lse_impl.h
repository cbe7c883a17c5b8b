// Row normaliser and row softmax computed with ATen's own vectorised
// primitives, in the same order as torch's CPU log_softmax / softmax over the
// last dimension (max reduction, sum of exp(x - max), vectorised log).
// Compiled once per CPU capability (row_lse_{default,avx2,avx512}.cc, each
// with its own -m flags) and chosen at run time by torch's capability, so the
// fused step's log-probs equal torch.log_softmax's bit for bit.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

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
void softmax_row(const float* x, float* out, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  const float m =
      at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, n);
  at::vec::map([m](Vec v) { return (v - Vec(m)).exp(); }, out, x, n);
  float sum = at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, out, n);
  sum = 1 / sum;
  at::vec::map([sum](Vec v) { return v * Vec(sum); }, out, out, n);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu_capability
}  // namespace seqfuse
