// Host entry of the CUDA beam-search step (csrc/cuda/beam_topk.cu). Needs no
// CUDA header: the stream is forward declared and the error is returned as the
// integer value of cudaError_t (0 = cudaSuccess), so a C++ binding compiled
// without nvcc can include it.
#pragma once

#include <cstddef>

#include "kernels/beam_topk.h"

struct CUstream_st;

namespace seqfuse {
namespace kernels {

enum class BeamTopkDtype { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Device scratch the launcher needs for these parameters (row statistics and
// chunk maxima; the survivors live in shared memory).
size_t beam_topk_workspace_bytes(const BeamTopkParams& p);

// Enqueues the fused step on `stream` (no host synchronisation). `logits` is a
// device pointer to [bsz * rows_per_sent, vocab] values of `dtype`; every
// pointer in `p` is a device pointer. `workspace` holds at least
// beam_topk_workspace_bytes(p) bytes, 256-byte aligned. Returns the
// cudaError_t of the launches as an int.
int beam_topk_cuda(const void* logits, BeamTopkDtype dtype, const BeamTopkParams& p,
                   void* workspace, size_t workspace_bytes, CUstream_st* stream);

}  // namespace kernels
}  // namespace seqfuse
