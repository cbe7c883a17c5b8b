// The one binding file of seqfuse._C: every op is registered by schema in the
// `seqfuse` namespace; backends attach implementations with m.impl.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"

TORCH_LIBRARY(seqfuse, m) {
  // Fused search step: see seqfuse/ops/beam_topk.py for the contract.
  m.def(
      "beam_topk(Tensor logits, Tensor? cum_scores, int rows_per_sent, int k, int pad, int unk, "
      "int eos, float unk_penalty, int eos_mode, Tensor? banned, bool is_logprobs) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) { m.impl("beam_topk", &seqfuse::beam_topk_cpu); }

static std::string build_info() {
  std::string s = "cpu";
#ifdef _OPENMP
  s += "+openmp";
#endif
#ifdef SEQFUSE_WITH_CUDA
  s += ",cuda";
#endif
  return s;
}

// Sets the calling thread's intra-op thread count (its OpenMP team size for
// later parallel regions) to n, other threads keeping theirs, and returns the
// count it had. ATen's own first-use initialisation of the thread runs before
// (it would reset the count otherwise). torch.set_num_threads changes every
// thread's count; a search split over threads (seqfuse.generation) runs each
// part on one.
static int64_t set_thread_intraop(int64_t n) {
  TORCH_CHECK(n >= 1, "set_thread_intraop: n must be >= 1, got ", n);
  const int64_t before = at::get_num_threads();
#ifdef _OPENMP
  omp_set_num_threads(static_cast<int>(n));
#endif
  return before;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "seqfuse compiled kernels (ops are registered under torch.ops.seqfuse)";
  m.def("build_info", &build_info, "Backends compiled into this extension");
  m.def("set_thread_intraop", &set_thread_intraop, pybind11::arg("n"),
        "Sets the calling thread's intra-op thread count; returns the previous one");
  seqfuse::bind_fused_stack(m);
  seqfuse::bind_exact_step(m);
}
