// CUDA implementations of the seqfuse ops (schemas: csrc/bindings.cpp). Built
// only in CUDA builds (setup.py). Thin and strict: every input is checked for
// device, dtype, contiguity and shape, then the framework-free launcher runs on
// the current stream with a workspace from the caching allocator. No host
// synchronisation.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "beam_topk_binding.h"
#include "kernels/beam_topk.h"
#include "kernels/beam_topk_cuda.h"

namespace seqfuse {

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& cum_scores, int64_t rows_per_sent,
    int64_t k, int64_t pad, int64_t unk, int64_t eos, double unk_penalty, int64_t eos_mode,
    const std::optional<at::Tensor>& banned, bool is_logprobs) {
  TORCH_CHECK(logits.is_cuda(), "beam_topk_cuda: logits must be a CUDA tensor");
  const at::Device dev = logits.device();
  const c10::cuda::CUDAGuard guard(dev);
  BeamTopkCall call = prepare_beam_topk(logits, cum_scores, rows_per_sent, k, pad, unk, eos,
                                        unk_penalty, eos_mode, banned, is_logprobs);
  const kernels::BeamTopkParams& p = call.p;
  if (p.bsz == 0) return {call.scores, call.tokens, call.beams};
  kernels::BeamTopkDtype dtype = kernels::BeamTopkDtype::kFloat32;
  if (logits.scalar_type() == at::kHalf) dtype = kernels::BeamTopkDtype::kFloat16;
  if (logits.scalar_type() == at::kBFloat16) dtype = kernels::BeamTopkDtype::kBFloat16;

  // Workspace from the caching allocator: reuse is ordered on this stream,
  // so releasing it when this function returns is safe.
  const size_t ws_bytes = kernels::beam_topk_workspace_bytes(p);
  auto ws = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const int err =
      kernels::beam_topk_cuda(logits.data_ptr(), dtype, p, ws.data_ptr(), ws_bytes, stream);
  TORCH_CHECK(err == 0,
              "beam_topk: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {call.scores, call.tokens, call.beams};
}

}  // namespace seqfuse

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) { m.impl("beam_topk", &seqfuse::beam_topk_cuda); }
