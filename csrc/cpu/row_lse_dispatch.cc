// Chooses the row normaliser built for torch's CPU capability.
#include <ATen/Version.h>

#include <string>

#include "cpu/capability/row_lse.h"

namespace seqfuse {
namespace cpu_capability {
namespace DEFAULT {
float row_lse(const float* x, int64_t n, float m);
}
#if defined(__x86_64__)
namespace AVX2 {
float row_lse(const float* x, int64_t n, float m);
}
namespace AVX512 {
float row_lse(const float* x, int64_t n, float m);
}
#endif

namespace {
using Fn = float (*)(const float*, int64_t, float);
struct Choice {
  Fn fn;
  const char* name;
};
Choice choose() {
#if defined(__x86_64__)
  // torch's own choice (cpuinfo, capped by ATEN_CPU_CAPABILITY).
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return {&AVX512::row_lse, "AVX512"};
  if (cap == "AVX2") return {&AVX2::row_lse, "AVX2"};
#endif
  return {&DEFAULT::row_lse, "DEFAULT"};
}
const Choice& choice() {
  static const Choice c = choose();
  return c;
}
}  // namespace

float row_lse(const float* x, int64_t n, float m) { return choice().fn(x, n, m); }
const char* capability() { return choice().name; }

}  // namespace cpu_capability
}  // namespace seqfuse
