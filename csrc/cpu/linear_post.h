// A function the packed GEMM runs on each task's outputs as soon as they are
// stored, while they are still in L1 (csrc/cpu/capability/linear_impl.h). In
// the decoder step the QKV product writes its K/V into the cache slot there,
// and the first feed-forward product adds its bias, applies the ReLU and
// notes which columns are nonzero for the second product
// (csrc/cpu/fused_stack_cpu.cc).
#pragma once

#include <cstdint>

namespace seqfuse {
namespace cpu_capability {

struct LinearPost {
  // Outputs y[m0 .. m0 + rows) x [n0 .. n0 + cols) of row block `block`.
  void (*fn)(const void* ctx, int64_t block, int64_t m0, int64_t rows, int64_t n0, int64_t cols);
  const void* ctx;
};

}  // namespace cpu_capability
}  // namespace seqfuse
