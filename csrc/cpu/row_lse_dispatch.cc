// Chooses the row normaliser and softmax built for torch's CPU capability.
#include <ATen/Version.h>

#include <string>

#include "cpu/capability/row_lse.h"

namespace seqfuse {
namespace cpu_capability {
#define SEQFUSE_ROW_DECLS                            \
  float row_lse(const float* x, int64_t n, float m); \
  void softmax_row(const float* x, float* out, int64_t n);
namespace DEFAULT {
SEQFUSE_ROW_DECLS
}
#if defined(__x86_64__)
namespace AVX2 {
SEQFUSE_ROW_DECLS
}
namespace AVX512 {
SEQFUSE_ROW_DECLS
}
#endif
#undef SEQFUSE_ROW_DECLS

namespace {
struct Choice {
  float (*lse)(const float*, int64_t, float);
  void (*softmax)(const float*, float*, int64_t);
  const char* name;
};
Choice choose() {
#if defined(__x86_64__)
  // torch's own choice (cpuinfo, capped by ATEN_CPU_CAPABILITY).
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return {&AVX512::row_lse, &AVX512::softmax_row, "AVX512"};
  if (cap == "AVX2") return {&AVX2::row_lse, &AVX2::softmax_row, "AVX2"};
#endif
  return {&DEFAULT::row_lse, &DEFAULT::softmax_row, "DEFAULT"};
}
const Choice& choice() {
  static const Choice c = choose();
  return c;
}
}  // namespace

float row_lse(const float* x, int64_t n, float m) { return choice().lse(x, n, m); }
void softmax_row(const float* x, float* out, int64_t n) { choice().softmax(x, out, n); }
const char* capability() { return choice().name; }

}  // namespace cpu_capability
}  // namespace seqfuse
