// Torch-facing op entry points (checks + dispatch into framework-free kernels).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace seqfuse {

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& cum_scores, int64_t rows_per_sent,
    int64_t k, int64_t pad, int64_t unk, int64_t eos, double unk_penalty, int64_t eos_mode,
    const std::optional<at::Tensor>& banned, bool is_logprobs);

// Python classes of the one-call layer stacks (csrc/cpu/fused_stack_cpu.cc).
void bind_fused_stack(pybind11::module& m);
// ... and of the exact one-call decoder step (csrc/exact_decoder.cpp).
void bind_exact_step(pybind11::module& m);

}  // namespace seqfuse
