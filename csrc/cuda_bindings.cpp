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

#include "kernels/beam_topk.h"
#include "kernels/beam_topk_cuda.h"

#define SF_CHECK_CUDA(x, dev)                                                               \
  TORCH_CHECK((x).is_cuda() && (x).device() == (dev), "beam_topk: " #x " must be on ", dev, \
              ", got ", (x).device())
#define SF_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), "beam_topk: " #x " must be contiguous")
#define SF_CHECK_DTYPE(x, t)                                                       \
  TORCH_CHECK((x).scalar_type() == (t), "beam_topk: " #x " must be ", t, ", got ", \
              (x).scalar_type())

namespace seqfuse {

std::tuple<at::Tensor, at::Tensor, at::Tensor> beam_topk_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& cum_scores, int64_t rows_per_sent,
    int64_t k, int64_t pad, int64_t unk, int64_t eos, double unk_penalty, int64_t eos_mode,
    const std::optional<at::Tensor>& banned, bool is_logprobs) {
  TORCH_CHECK(logits.is_cuda(), "beam_topk_cuda: logits must be a CUDA tensor");
  const at::Device dev = logits.device();
  TORCH_CHECK(logits.dim() == 2, "beam_topk: logits must be [rows, vocab], got ", logits.sizes());
  SF_CHECK_CONTIGUOUS(logits);
  kernels::BeamTopkDtype dtype;
  switch (logits.scalar_type()) {
    case at::kFloat:
      dtype = kernels::BeamTopkDtype::kFloat32;
      break;
    case at::kHalf:
      dtype = kernels::BeamTopkDtype::kFloat16;
      break;
    case at::kBFloat16:
      dtype = kernels::BeamTopkDtype::kBFloat16;
      break;
    default:
      TORCH_CHECK(false, "beam_topk: logits dtype must be float32, float16 or bfloat16, got ",
                  logits.scalar_type());
  }
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "beam_topk: empty vocabulary");
  TORCH_CHECK(rows_per_sent >= 1 && n % rows_per_sent == 0, "beam_topk: ", n,
              " rows is not a multiple of rows_per_sent=", rows_per_sent);
  TORCH_CHECK(k >= 1 && k <= rows_per_sent * V, "beam_topk: k=", k, " outside [1, ",
              rows_per_sent * V, "]");
  TORCH_CHECK(rows_per_sent * V <= std::numeric_limits<int32_t>::max(),
              "beam_topk: rows_per_sent * vocab must fit in int32");
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "beam_topk: too many rows");
  TORCH_CHECK(eos_mode >= 0 && eos_mode <= 2, "beam_topk: eos_mode must be 0, 1 or 2");
  TORCH_CHECK(pad >= 0 && pad < V && unk >= 0 && unk < V && eos >= 0 && eos < V,
              "beam_topk: pad, unk and eos must be token ids in [0, ", V, ")");
  const int64_t bsz = n / rows_per_sent;

  const c10::cuda::CUDAGuard guard(dev);
  kernels::BeamTopkParams p{};
  p.bsz = bsz;
  p.rows_per_sent = rows_per_sent;
  p.vocab = V;
  p.k = k;
  p.pad = pad;
  p.unk = unk;
  p.eos = eos;
  p.unk_penalty = static_cast<float>(unk_penalty);
  p.eos_mode = static_cast<int>(eos_mode);
  p.is_logprobs = is_logprobs;
  if (cum_scores.has_value()) {
    const at::Tensor& c = *cum_scores;
    SF_CHECK_CUDA(c, dev);
    SF_CHECK_DTYPE(c, at::kFloat);
    SF_CHECK_CONTIGUOUS(c);
    TORCH_CHECK(c.numel() == n, "beam_topk: cum_scores has ", c.numel(), " values for ", n,
                " rows");
    p.cum = c.data_ptr<float>();
  }
  if (banned.has_value()) {
    const at::Tensor& b = *banned;
    SF_CHECK_CUDA(b, dev);
    SF_CHECK_DTYPE(b, at::kLong);
    SF_CHECK_CONTIGUOUS(b);
    TORCH_CHECK(b.dim() == 2 && b.size(0) == n, "beam_topk: banned must be [", n, ", nb], got ",
                b.sizes());
    p.banned = b.data_ptr<int64_t>();
    p.n_banned = b.size(1);
  }
  auto scores = at::empty({bsz, k}, logits.options().dtype(at::kFloat));  // [bsz, k]
  auto tokens = at::empty({bsz, k}, logits.options().dtype(at::kLong));   // [bsz, k]
  auto beams = at::empty({bsz, k}, logits.options().dtype(at::kLong));    // [bsz, k]
  if (bsz == 0) return {scores, tokens, beams};
  p.out_scores = scores.data_ptr<float>();
  p.out_tokens = tokens.data_ptr<int64_t>();
  p.out_beams = beams.data_ptr<int64_t>();

  // Workspace from the caching allocator: reuse is ordered on this stream,
  // so releasing it when this function returns is safe.
  const size_t ws_bytes = kernels::beam_topk_workspace_bytes(p);
  auto ws = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const int err =
      kernels::beam_topk_cuda(logits.data_ptr(), dtype, p, ws.data_ptr(), ws_bytes, stream);
  TORCH_CHECK(err == 0,
              "beam_topk: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {scores, tokens, beams};
}

}  // namespace seqfuse

TORCH_LIBRARY_IMPL(seqfuse, CUDA, m) { m.impl("beam_topk", &seqfuse::beam_topk_cuda); }
