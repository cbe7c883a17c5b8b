// seqfuse::linear_packed (CPU): y = x W^T + b with W packed by
// seqfuse::pack_linear_weight; the kernel is chosen by torch's CPU capability
// (csrc/cpu/capability/linear_impl.h). The contract: seqfuse/ops/linear.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/linear_post.h"
#include "cpu/task_queue.h"
#include "kernels/beam_topk.h"

namespace seqfuse {
namespace cpu_capability {
#if defined(__x86_64__)
#define SEQFUSE_LINEAR_DECLS                                                                       \
  void linear_packed(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed,       \
                     int64_t N, const float* bias, float* y, int32_t* lists);                      \
  int64_t linear_packed_block_rows(bool skip_zeros);                                               \
  int64_t linear_packed_tasks(int64_t M, int64_t N, int64_t rows);                                 \
  void linear_packed_range(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed, \
                           int64_t N, const float* bias, float* y, int64_t rows, int64_t begin,    \
                           int64_t end, const int32_t* lists, const LinearPost* post);             \
  void linear_packed_block_range(const float* x, int64_t M, int64_t K, int64_t ldx,                \
                                 const float* packed, int64_t N, const float* bias, float* y,      \
                                 int64_t rows, int64_t bbegin, int64_t bend, const int32_t* lists, \
                                 const LinearPost* post);                                          \
  int64_t linear_packed_row_blocks(int64_t M, int64_t rows);                                       \
  void linear_packed_nonzero_k(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t rows,    \
                               int32_t* lists, int64_t bbegin, int64_t bend);                      \
  void linear_packed_group_max(const void* ctx, int64_t block, int64_t m0, int64_t rows,           \
                               int64_t n0, int64_t cols);                                          \
  void linear_packed_bias_relu(const void* ctx, int64_t block, int64_t m0, int64_t rows,           \
                               int64_t n0, int64_t cols);
namespace AVX2 {
SEQFUSE_LINEAR_DECLS
}
namespace AVX512 {
SEQFUSE_LINEAR_DECLS
}
#undef SEQFUSE_LINEAR_DECLS
#endif
}  // namespace cpu_capability

namespace {
using Kernel = void (*)(const float*, int64_t, int64_t, int64_t, const float*, int64_t,
                        const float*, float*, int32_t*);
constexpr int64_t kPanel = 16;

// The capability's kernel, its block heights, task count, task-range and
// row-block-range forms, and the zero-skipping lists' row blocks and builder.
struct Kernels {
  Kernel run = nullptr;
  int64_t (*block_rows)(bool) = nullptr;
  int64_t (*tasks)(int64_t, int64_t, int64_t) = nullptr;
  void (*range)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                float*, int64_t, int64_t, int64_t, const int32_t*,
                const cpu_capability::LinearPost*) = nullptr;
  decltype(range) block_range = nullptr;
  int64_t (*row_blocks)(int64_t, int64_t) = nullptr;
  void (*nonzero)(const float*, int64_t, int64_t, int64_t, int64_t, int32_t*, int64_t,
                  int64_t) = nullptr;
  void (*group_max)(const void*, int64_t, int64_t, int64_t, int64_t, int64_t) = nullptr;
  decltype(group_max) bias_relu = nullptr;
};

const Kernels& packed_kernels() {
  static const Kernels k = []() -> Kernels {
    Kernels out;
#if defined(__x86_64__)
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") {
      namespace c = cpu_capability::AVX512;
      out = {
          &c::linear_packed,           &c::linear_packed_block_rows,  &c::linear_packed_tasks,
          &c::linear_packed_range,     &c::linear_packed_block_range, &c::linear_packed_row_blocks,
          &c::linear_packed_nonzero_k, &c::linear_packed_group_max,   &c::linear_packed_bias_relu};
    } else if (cap == "AVX2") {
      namespace c = cpu_capability::AVX2;
      out = {
          &c::linear_packed,           &c::linear_packed_block_rows,  &c::linear_packed_tasks,
          &c::linear_packed_range,     &c::linear_packed_block_range, &c::linear_packed_row_blocks,
          &c::linear_packed_nonzero_k, &c::linear_packed_group_max,   &c::linear_packed_bias_relu};
    }
#endif
    return out;
  }();
  return k;
}

Kernel kernel() { return packed_kernels().run; }

// The capability whose kernel runs, or "" when none does (the caller then
// uses torch's GEMM).
std::string linear_capability() {
#if defined(__x86_64__)
  if (kernel() != nullptr) return at::get_cpu_capability();
#endif
  return "";
}

// [N, K] (any strides) -> [panels, K, 16], panel p holding rows 16p..16p+15
// (zeros past N), and whether every weight is finite: one pass over the
// weight, panels shared between the threads.
std::tuple<at::Tensor, bool> pack_linear_weight_checked(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack_linear_weight: weight must be [N, K], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.device().is_cpu(),
              "pack_linear_weight: float32 CPU weights only");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + kPanel - 1) / kPanel;
  at::Tensor out = at::empty({panels, K, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  const int64_t sn = w.stride(0), sk = w.stride(1);
  float* dst = out.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    bool ok = true;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanel, rows = std::min<int64_t>(kPanel, N - n0);
      const float* in = src + n0 * sn;
      float* o = dst + p * K * kPanel;
      for (int64_t k = 0; k < K; ++k, o += kPanel) {
        int64_t j = 0;
        for (; j < rows; ++j) {
          const float v = in[j * sn + k * sk];
          ok &= std::isfinite(v);
          o[j] = v;
        }
        for (; j < kPanel; ++j) o[j] = 0.0f;
      }
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return {out, finite.load()};
}

at::Tensor pack_linear_weight(const at::Tensor& w) {
  return std::get<0>(pack_linear_weight_checked(w));
}

}  // namespace

int64_t linear_packed_block_rows(bool skip_zeros) {
  TORCH_CHECK(kernel() != nullptr, "linear_packed: no kernel for CPU capability ",
              at::get_cpu_capability(), " (needs AVX2 or AVX512)");
  return packed_kernels().block_rows(skip_zeros);
}

int64_t linear_packed_task_count(int64_t M, int64_t N, int64_t rows) {
  return packed_kernels().tasks(M, N, rows);
}

void linear_packed_run_range(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed,
                             int64_t N, const float* bias, float* y, int64_t rows, int64_t begin,
                             int64_t end, const int32_t* lists,
                             const cpu_capability::LinearPost* post) {
  packed_kernels().range(x, M, K, ldx, packed, N, bias, y, rows, begin, end, lists, post);
}

void linear_packed_run_blocks(const float* x, int64_t M, int64_t K, int64_t ldx,
                              const float* packed, int64_t N, const float* bias, float* y,
                              int64_t rows, int64_t bbegin, int64_t bend, const int32_t* lists,
                              const cpu_capability::LinearPost* post) {
  packed_kernels().block_range(x, M, K, ldx, packed, N, bias, y, rows, bbegin, bend, lists, post);
}

cpu_capability::LinearPost linear_packed_bias_relu_post(const cpu_capability::BiasReluCtx* ctx) {
  return {packed_kernels().bias_relu, ctx};
}

int64_t linear_packed_row_block_count(int64_t M, int64_t rows) {
  return packed_kernels().row_blocks(M, rows);
}

void linear_packed_nonzero_range(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t rows,
                                 int32_t* lists, int64_t bbegin, int64_t bend) {
  packed_kernels().nonzero(x, M, K, ldx, rows, lists, bbegin, bend);
}

namespace {
// Ints of the zero-skipping lists of an [M, K] product: a count and up to K
// entries per row block.
int64_t zero_skip_list_ints(int64_t M, int64_t K) {
  return linear_packed_row_block_count(M, linear_packed_block_rows(true)) * (K + 1);
}
}  // namespace

int32_t* zero_skip_lists(int64_t M, int64_t K) {
  // Grown, never shrunk: one per calling thread (the products run inside one call).
  static thread_local std::vector<int32_t> lists;
  const size_t need = static_cast<size_t>(zero_skip_list_ints(M, K));
  if (lists.size() < need) lists.resize(need);
  return lists.data();
}

namespace {
// Lists larger than this (long encoder inputs) are the call's own, not kept.
constexpr int64_t kKeptListInts = int64_t{1} << 18;  // 1 MB
}  // namespace

namespace {
// linear_packed's checks: the bias pointer (or null) and the output tensor
// (`out`, or a new one when undefined).
std::tuple<const float*, at::Tensor> checked_linear(const at::Tensor& x, const at::Tensor& packed,
                                                    const std::optional<at::Tensor>& bias,
                                                    int64_t n, const at::Tensor& out) {
  TORCH_CHECK(kernel() != nullptr, "linear_packed: no kernel for CPU capability ",
              at::get_cpu_capability(), " (needs AVX2 or AVX512)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "linear_packed: x must be a float32 CPU [M, K] tensor, got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1, "linear_packed: x rows must be contiguous");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K && packed.size(2) == kPanel &&
                  packed.is_contiguous() && packed.scalar_type() == at::kFloat,
              "linear_packed: packed weight must be [panels, ", K, ", ", kPanel, "], got ",
              packed.sizes());
  TORCH_CHECK(n > 0 && n <= packed.size(0) * kPanel && n > (packed.size(0) - 1) * kPanel,
              "linear_packed: n=", n, " does not match ", packed.size(0), " panels");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat,
                "linear_packed: bias must be a contiguous float32 [", n, "] tensor");
    b = bias->data_ptr<float>();
  }
  at::Tensor y = out;
  if (y.defined()) {
    TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.size(1) == n && y.is_contiguous() &&
                    y.scalar_type() == at::kFloat && y.device().is_cpu(),
                "linear_packed: out must be a contiguous float32 CPU [", M, ", ", n, "] tensor");
  } else {
    y = at::empty({M, n}, x.options());
  }
  return {b, y};
}

// A GEMM task's columns are one group of maxima (linear_packed_group_max).
static_assert(2 * kPanel == kernels::kMaxGroup, "a GEMM task's columns are one maximum group");
}  // namespace

at::Tensor linear_packed_out_cpu(const at::Tensor& x, const at::Tensor& packed,
                                 const std::optional<at::Tensor>& bias, int64_t n,
                                 const at::Tensor& out, bool skip_zeros) {
  auto [b, y] = checked_linear(x, packed, bias, n, out);
  const int64_t M = x.size(0), K = x.size(1);
  if (M > 0) {
    int32_t* lists = nullptr;
    std::vector<int32_t> own;
    if (skip_zeros) {
      const int64_t need = zero_skip_list_ints(M, K);
      if (need <= kKeptListInts) {
        lists = zero_skip_lists(M, K);
      } else {
        own.resize(static_cast<size_t>(need));
        lists = own.data();
      }
    }
    kernel()(x.data_ptr<float>(), M, K, x.stride(0), packed.data_ptr<float>(), n, b,
             y.data_ptr<float>(), lists);
  }
  return y;
}

at::Tensor linear_packed_cpu(const at::Tensor& x, const at::Tensor& packed,
                             const std::optional<at::Tensor>& bias, int64_t n, bool skip_zeros) {
  return linear_packed_out_cpu(x, packed, bias, n, at::Tensor(), skip_zeros);
}

at::Tensor linear_packed_maxima_out_cpu(const at::Tensor& x, const at::Tensor& packed,
                                        const std::optional<at::Tensor>& bias, int64_t n,
                                        const at::Tensor& out, const at::Tensor& maxima) {
  auto [b, y] = checked_linear(x, packed, bias, n, out);
  const int64_t M = x.size(0), K = x.size(1), groups = kernels::num_max_groups(n);
  TORCH_CHECK(maxima.dim() == 2 && maxima.size(0) == M && maxima.size(1) == groups &&
                  maxima.is_contiguous() && maxima.scalar_type() == at::kFloat &&
                  maxima.device().is_cpu(),
              "linear_packed_maxima: maxima must be a contiguous float32 CPU [", M, ", ", groups,
              "] tensor, got ", maxima.scalar_type(), " ", maxima.sizes());
  if (M > 0) {
    const cpu_capability::GroupMaxCtx ctx{y.data_ptr<float>(), n, maxima.data_ptr<float>(), groups};
    const cpu_capability::LinearPost post{packed_kernels().group_max, &ctx};
    const int64_t rows = packed_kernels().block_rows(false);
    const float* xp = x.data_ptr<float>();
    const float* wp = packed.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t ldx = x.stride(0);
    // linear_packed's split (cpu/task_queue.h), each task noting its maxima
    cpu::parallel_chunks(packed_kernels().tasks(M, n, rows), 1, [&](int64_t tb, int64_t te) {
      packed_kernels().range(xp, M, K, ldx, wp, n, b, yp, rows, tb, te, nullptr, &post);
    });
  }
  return y;
}

// The op: (y, maxima), both new.
std::tuple<at::Tensor, at::Tensor> linear_packed_maxima_cpu(const at::Tensor& x,
                                                            const at::Tensor& packed,
                                                            const std::optional<at::Tensor>& bias,
                                                            int64_t n) {
  TORCH_CHECK(x.dim() == 2, "linear_packed_maxima: x must be [M, K], got ", x.sizes());
  at::Tensor maxima = at::empty({x.size(0), kernels::num_max_groups(n)}, x.options());
  at::Tensor y = linear_packed_maxima_out_cpu(x, packed, bias, n, at::Tensor(), maxima);
  return {y, maxima};
}

}  // namespace seqfuse

TORCH_LIBRARY_FRAGMENT(seqfuse, m) {
  // Contract: seqfuse/ops/linear.py.
  m.def("pack_linear_weight(Tensor w) -> Tensor");
  m.def("pack_linear_weight_checked(Tensor w) -> (Tensor, bool)");
  m.def(
      "linear_packed(Tensor x, Tensor packed, Tensor? bias, int n, bool skip_zeros=False) -> "
      "Tensor");
  m.def("linear_packed_maxima(Tensor x, Tensor packed, Tensor? bias, int n) -> (Tensor, Tensor)");
  m.def("linear_capability() -> str");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("pack_linear_weight", &seqfuse::pack_linear_weight);
  m.impl("pack_linear_weight_checked", &seqfuse::pack_linear_weight_checked);
  m.impl("linear_packed", &seqfuse::linear_packed_cpu);
  m.impl("linear_packed_maxima", &seqfuse::linear_packed_maxima_cpu);
}

TORCH_LIBRARY_IMPL(seqfuse, CompositeExplicitAutograd, m) {
  m.impl("linear_capability", &seqfuse::linear_capability);
}
