// Element access shared by the CPU layer kernels: compute in fp32, round to
// the storage type where the stock computation rounds.
#pragma once
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace seqfuse {
namespace cpu {

template <typename T>
inline float ld(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

// Value of x after a round trip through T (identity for float).
template <typename T>
inline float round_as(float x) {
  return static_cast<float>(static_cast<T>(x));
}
template <>
inline float round_as<float>(float x) {
  return x;
}

}  // namespace cpu
}  // namespace seqfuse

// Dispatch over the three floating types of the layer ops.
#define SEQFUSE_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
