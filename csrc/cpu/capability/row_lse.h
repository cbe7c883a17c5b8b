// Run-time choice of the row normaliser and row softmax matching torch's CPU
// log_softmax and softmax.
#pragma once
#include <cstdint>

namespace seqfuse {
namespace cpu_capability {

// log(sum(exp(x - m))) over a float row, bit-identical to the normaliser of
// torch's CPU log_softmax on this machine (same capability, same order).
float row_lse(const float* x, int64_t n, float m);

// out = softmax(x) over a float row, bit-identical to torch's CPU softmax
// over the last dimension on this machine (out may be x).
void softmax_row(const float* x, float* out, int64_t n);

// The capability in use: "DEFAULT", "AVX2" or "AVX512".
const char* capability();

}  // namespace cpu_capability
}  // namespace seqfuse
