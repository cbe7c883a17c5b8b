// The one binding file of seqfuse._C: every op is registered by schema in the
// `seqfuse` namespace; backends attach implementations with m.impl.
#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"
#include "search_lane.h"

TORCH_LIBRARY(seqfuse, m) {
  // Fused search step: see seqfuse/ops/beam_topk.py for the contract.
  m.def(
      "beam_topk(Tensor logits, Tensor? cum_scores, int rows_per_sent, int k, int pad, int unk, "
      "int eos, float unk_penalty, int eos_mode, Tensor? banned, bool is_logprobs) -> "
      "(Tensor, Tensor, Tensor)");
  // beam_topk on float32 logits with their group maxima (linear_packed_maxima's).
  m.def(
      "beam_topk_maxima(Tensor logits, Tensor group_max, Tensor? cum_scores, int rows_per_sent, "
      "int k, int pad, int unk, int eos, float unk_penalty, int eos_mode, Tensor? banned) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(seqfuse, CPU, m) {
  m.impl("beam_topk", &seqfuse::beam_topk_cpu);
  m.impl("beam_topk_maxima", &seqfuse::beam_topk_maxima_cpu);
}

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

PYBIND11_MODULE(_C, m) {
  m.doc() = "seqfuse compiled kernels (ops are registered under torch.ops.seqfuse)";
  m.def("build_info", &build_info, "Backends compiled into this extension");
  seqfuse::bind_fused_stack(m);
  seqfuse::bind_exact_step(m);
  seqfuse::bind_search_lane(m);
}
