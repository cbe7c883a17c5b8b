// Run-time choice of the row normaliser matching torch's CPU log_softmax.
#pragma once
#include <cstdint>

namespace seqfuse {
namespace cpu_capability {

// log(sum(exp(x - m))) over a float row, bit-identical to the normaliser of
// torch's CPU log_softmax on this machine (same capability, same order).
float row_lse(const float* x, int64_t n, float m);

// The capability in use: "DEFAULT", "AVX2" or "AVX512".
const char* capability();

}  // namespace cpu_capability
}  // namespace seqfuse
