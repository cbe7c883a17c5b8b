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

// The context of linear_packed_group_max, a LinearPost fn over the products
// whose tasks' columns are one group of two panels (the tasks of
// linear_packed_range): y's row stride, and maxima[row * groups + n0 / 32]
// takes the maximum of the task's columns in that row, or NaN when one is
// NaN (the group maxima of csrc/kernels/beam_topk.h).
struct GroupMaxCtx {
  const float* y;
  int64_t ld;
  float* maxima;
  int64_t groups;
};

// The context of linear_packed_bias_relu, the LinearPost fn of the decoder
// step's first feed-forward product when the second skips zeros
// (csrc/cpu/fused_stack_cpu.cc): y = relu(y + bias) on a task's outputs, as
// bias_act's float path computes it (the sum, then x > 0 ? x : 0), and
// flags[block * ld + col] = whether the column is nonzero in some row of
// the block.
struct BiasReluCtx {
  float* y;
  const float* bias;
  int64_t ld;
  uint8_t* flags;
};

// The zero-skipping lists' compaction: appends k0 + j for each j < n with
// flags[j] != 0 to list[count ...] (branch-free: writes every k, advances
// past the flagged ones) and returns the new count. Used by the kernel's own
// scan of the activations (linear_packed_nonzero_k) and by the decoder step,
// which reads the flags its first feed-forward product's post-op noted.
inline int32_t append_flagged(const uint8_t* flags, int64_t n, int64_t k0, int32_t* list,
                              int32_t count) {
  for (int64_t j = 0; j < n; ++j) {
    list[count] = static_cast<int32_t>(k0 + j);
    count += flags[j];
  }
  return count;
}

}  // namespace cpu_capability
}  // namespace seqfuse
