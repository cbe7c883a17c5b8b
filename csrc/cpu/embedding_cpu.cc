// CPU kernel of the embedding op: token lookup x scale + positions, written
// time-major; OpenMP over sentences.
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/layer_cpu_common.h"
#include "layer_ops.h"

namespace seqfuse {
namespace {

template <typename T>
void embedding_rows(const kernels::EmbeddingParams& p) {
  const T* table = static_cast<const T*>(p.table);
  const T* pos_table = static_cast<const T*>(p.pos_table);
  T* out = static_cast<T*>(p.out);
  const int64_t cols = p.cols;
  at::parallel_for(
      0, p.b, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, p.t * cols)),
      [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          int64_t count = 0;
          for (int64_t t = 0; t < p.t; ++t) {
            const int64_t tok = p.tokens[b * p.tok_sb + t * p.tok_st];
            const bool is_pad = tok == p.pad;
            if (!is_pad) ++count;
            const int64_t pos = p.pos_mode == 2 ? p.fixed_pos : (is_pad ? p.pad : p.pad + count);
            const T* e = table + tok * cols;
            const T* pe = pos_table != nullptr ? pos_table + pos * cols : nullptr;
            T* o = out + (t * p.b + b) * cols;
            const float zero = (p.zero_pads && is_pad) ? 0.0f : 1.0f;
            for (int64_t c = 0; c < cols; ++c) {
              float x = cpu::round_as<T>(p.scale * static_cast<float>(e[c]));
              if (pe != nullptr) x = cpu::round_as<T>(x + static_cast<float>(pe[c]));
              if (p.zero_pads) x = cpu::round_as<T>(x * zero);
              o[c] = static_cast<T>(x);
            }
          }
        }
      });
}

}  // namespace

at::Tensor embedding_cpu(const at::Tensor& tokens, const at::Tensor& table, double scale,
                         const std::optional<at::Tensor>& pos_table, int64_t pad, int64_t pos_mode,
                         int64_t fixed_pos, bool zero_pads) {
  TORCH_CHECK(table.device().is_cpu(), "embedding_cpu: table must be on the CPU");
  kernels::EmbeddingParams p;
  at::Tensor out =
      embedding_prepare(tokens, table, scale, pos_table, pad, pos_mode, fixed_pos, zero_pads, &p);
  if (tokens.numel() > 0) {
    bool ok = true;
    for (int64_t b = 0; b < p.b; ++b) {
      for (int64_t t = 0; t < p.t; ++t) {
        const int64_t tok = p.tokens[b * p.tok_sb + t * p.tok_st];
        ok &= tok >= 0 && tok < p.vocab;
      }
    }
    TORCH_CHECK(ok, "token ids must lie in [0, ", p.vocab, ")");
    SEQFUSE_DISPATCH_FLOAT(table.scalar_type(), "embedding_cpu",
                           [&] { embedding_rows<scalar_t>(p); });
  }
  return out;
}

}  // namespace seqfuse
