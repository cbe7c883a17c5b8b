// CUDA kernel of the fused beam-search step: the algorithm of
// csrc/kernels/beam_topk.h with the arithmetic of csrc/kernels/beam_topk_math.h
// (the CPU kernel's score operations, bound and order; its own deterministic
// normaliser). Framework independent: raw device pointers, a stream,
// BeamTopkParams.
//
// Kernel 1, one block of kSumLanes threads per row: chunk maxima (a warp per
//   chunk), row maximum, NaN flag, normaliser (fixed summation order), edited
//   scores of the chunk maxima.
// Kernel 2, one block per sentence: tau = k-th largest chunk score by a radix
//   select; survivors (tokens of chunks whose maximum reaches tau) gathered in
//   shared memory through a shared counter; bitonic sort; top-k written out.
//   When the survivors exceed the shared buffer (many ties at tau, tau = -inf,
//   or a large k) the block switches, on the device, to rounds of exact
//   64-bit radix selection over the candidates: each round emits the next
//   kSurvivorCap candidates in order. Nothing is copied to the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/beam_topk.h"
#include "kernels/beam_topk_cuda.h"
#include "kernels/beam_topk_math.h"

namespace seqfuse {
namespace kernels {
namespace {

constexpr int kRowThreads = kSumLanes;  // kernel 1: the summation order needs exactly this
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kSentThreads = 256;  // kernel 2
constexpr int kSentWarps = kSentThreads / 32;
constexpr int kSurvivorCap = 2048;  // survivors sorted in shared memory (16 KiB of keys)
constexpr int kBins = 256;          // radix select: 8 bits per pass
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kChunk % 32 == 0, "a warp scans a chunk");
static_assert(kRowWarps == kSumGroups, "kernel 1 reduces one group per warp");

__device__ __forceinline__ float load_f(const float* x, int64_t i) { return x[i]; }
__device__ __forceinline__ float load_f(const __half* x, int64_t i) { return __half2float(x[i]); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* x, int64_t i) {
  return __bfloat162float(x[i]);
}

__device__ __forceinline__ float fmax_nonan(float a, float b) { return b > a ? b : a; }

struct Workspace {
  RowStat* stats;      // [rows]
  float* chunk_max;    // [rows, nchunks] maximum logit of each chunk
  float* chunk_score;  // [rows, nchunks] edited score of that maximum's first token
  int32_t* chunk_arg;  // [rows, nchunks] that token
};

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

Workspace carve(void* base, const BeamTopkParams& p) {
  const size_t rows = static_cast<size_t>(p.bsz * p.rows_per_sent);
  const size_t cells = rows * static_cast<size_t>(sf_num_chunks(p.vocab));
  char* b = static_cast<char*>(base);
  Workspace w;
  w.stats = reinterpret_cast<RowStat*>(b);
  b += align256(rows * sizeof(RowStat));
  w.chunk_max = reinterpret_cast<float*>(b);
  b += align256(cells * sizeof(float));
  w.chunk_score = reinterpret_cast<float*>(b);
  b += align256(cells * sizeof(float));
  w.chunk_arg = reinterpret_cast<int32_t*>(b);
  return w;
}

// ---------------------------------------------------------------- kernel 1

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    row_stats_kernel(const T* __restrict__ logits,  // [rows, vocab]
                     const BeamTopkParams p, Workspace w) {
  __shared__ float s_red[kRowWarps];
  __shared__ float s_m, s_lse;
  const int64_t row = blockIdx.x;
  const int64_t V = p.vocab, nch = sf_num_chunks(V);
  const T* x = logits + row * V;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float ninf = sf_ninf();

  // Chunk maxima, a warp per chunk; first index of the maximum (NaN ignored).
  float m = ninf;
  int nan_seen = 0;
  for (int64_t c = warp; c < nch; c += kRowWarps) {
    float best = ninf;
    int32_t arg = INT32_MAX;
    const int64_t lo = c * kChunk;
    for (int j = lane; j < kChunk; j += 32) {
      const int64_t v = lo + j;
      if (v >= V) break;
      const float xv = load_f(x, v);
      nan_seen |= (xv != xv);
      if (xv > best || (xv == best && v < arg)) {
        best = xv;
        arg = static_cast<int32_t>(v);
      }
    }
    for (int off = 16; off >= 1; off >>= 1) {
      const float ob = __shfl_xor_sync(kFullMask, best, off);
      const int32_t oa = __shfl_xor_sync(kFullMask, arg, off);
      if (ob > best || (ob == best && oa < arg)) {
        best = ob;
        arg = oa;
      }
    }
    if (lane == 0) {
      w.chunk_max[row * nch + c] = best;
      w.chunk_arg[row * nch + c] = arg == INT32_MAX ? static_cast<int32_t>(lo) : arg;
    }
    m = fmax_nonan(m, best);
  }
  // Row maximum (order-free) and NaN flag.
  for (int off = 16; off >= 1; off >>= 1) m = fmax_nonan(m, __shfl_xor_sync(kFullMask, m, off));
  if (lane == 0) s_red[warp] = m;
  nan_seen = __syncthreads_or(nan_seen);
  if (tid == 0) {
    float mm = s_red[0];
    for (int i = 1; i < kRowWarps; ++i) mm = fmax_nonan(mm, s_red[i]);
    s_m = mm;
  }
  __syncthreads();
  m = s_m;
  RowStat st;
  st.m = m;
  st.dead = sf_row_dead(p.is_logprobs, nan_seen != 0, m);
  st.lse = 0.f;
  if (!p.is_logprobs && !st.dead) {
    // Normaliser in the fixed order: thread = lane of beam_topk_math.h.
    float acc = 0.f;
    for (int64_t v = tid; v < V; v += kRowThreads)
      acc = sf_add(acc, sf_exp_nonpos(load_f(x, v) - m));
    for (int off = 16; off >= 1; off >>= 1)
      acc = sf_add(acc, __shfl_down_sync(kFullMask, acc, off));
    __syncthreads();  // s_red reused
    if (lane == 0) s_red[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      float g = lane < kRowWarps ? s_red[lane] : 0.f;
      for (int off = kRowWarps / 2; off >= 1; off >>= 1)
        g = sf_add(g, __shfl_down_sync(kFullMask, g, off));
      if (lane == 0) s_lse = sf_log_ge1(g);
    }
    __syncthreads();
    st.lse = s_lse;
  }
  // Edited scores of the chunk maxima.
  const bool add_cum = p.cum != nullptr;
  const float cum = add_cum ? p.cum[row] : 0.f;
  const int64_t* banned = p.banned == nullptr ? nullptr : p.banned + row * p.n_banned;
  for (int64_t c = tid; c < nch; c += kRowThreads) {
    const int64_t v = w.chunk_arg[row * nch + c];
    w.chunk_score[row * nch + c] = sf_edited_score(load_f(x, v), v, st, p, banned, add_cum, cum);
  }
  if (tid == 0) w.stats[row] = st;
}

// ---------------------------------------------------------------- kernel 2

struct SentShared {
  uint32_t hist[kBins];
  uint64_t keys[kSurvivorCap];
  uint64_t prefix;
  int64_t rank;
  uint32_t count;
};

// Calls f(key) once for every candidate of sentence `sent`: tokens of chunks
// whose maximum reaches tau with an unedited score >= tau, every token of a
// dead row when tau = -inf, and each row's unk (a negative penalty raises it).
// The candidates hold the sentence's top-k; each has a unique key.
template <typename T, typename F>
__device__ void for_each_candidate(const T* __restrict__ logits, const BeamTopkParams& p,
                                   const Workspace& w, int64_t sent, float tau, F&& f) {
  const int64_t V = p.vocab, R = p.rows_per_sent, nch = sf_num_chunks(V);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float ninf = sf_ninf();
  const bool add_cum = p.cum != nullptr;
  for (int64_t q = warp; q < R * nch; q += kSentWarps) {
    const int64_t r = q / nch, c = q - r * nch, row = sent * R + r;
    const RowStat s = w.stats[row];
    const float cum = add_cum ? p.cum[row] : 0.f;
    bool take_all = false;
    if (s.dead) {
      if (tau != ninf) continue;
      take_all = true;
    } else if (!(sf_raw_score(w.chunk_max[row * nch + c], s, p.is_logprobs, add_cum, cum) >= tau)) {
      continue;
    }
    const T* x = logits + row * V;
    const int64_t* banned = p.banned == nullptr ? nullptr : p.banned + row * p.n_banned;
    const int64_t hi = min(V, (c + 1) * kChunk);
    for (int64_t v = c * kChunk + lane; v < hi; v += 32) {
      if (v == p.unk) continue;
      const float xv = load_f(x, v);
      if (!take_all && !(sf_raw_score(xv, s, p.is_logprobs, add_cum, cum) >= tau)) continue;
      const float score = sf_edited_score(xv, v, s, p, banned, add_cum, cum);
      f(sf_cand_key(score, static_cast<uint32_t>(r * V + v)));
    }
  }
  for (int64_t r = threadIdx.x; r < R; r += kSentThreads) {
    const int64_t row = sent * R + r;
    const RowStat s = w.stats[row];
    const float cum = add_cum ? p.cum[row] : 0.f;
    const int64_t* banned = p.banned == nullptr ? nullptr : p.banned + row * p.n_banned;
    const float xv = load_f(logits + row * V, p.unk);
    const float score = sf_edited_score(xv, p.unk, s, p, banned, add_cum, cum);
    f(sf_cand_key(score, static_cast<uint32_t>(r * V + p.unk)));
  }
}

// Thread 0: the bin holding the rank-th largest (rank 1-based) of the
// histogram; updates the shared prefix and rank. Then a barrier.
__device__ void pick_bin(SentShared& sh, int shift) {
  if (threadIdx.x == 0) {
    int64_t above = 0;
    int b = kBins - 1;
    for (; b > 0; --b) {
      if (above + sh.hist[b] >= sh.rank) break;
      above += sh.hist[b];
    }
    sh.rank -= above;
    sh.prefix |= static_cast<uint64_t>(b) << shift;
  }
  __syncthreads();
}

__device__ void clear_hist(SentShared& sh) {
  for (int i = threadIdx.x; i < kBins; i += kSentThreads) sh.hist[i] = 0;
}

// Sorts sh.keys[0, n) descending (n <= kSurvivorCap), padding with 0 (below
// every candidate) up to a power of two. Starts and ends with a barrier.
__device__ void sort_keys_desc(SentShared& sh, int n) {
  int P = 1;
  while (P < n) P <<= 1;
  for (int i = n + threadIdx.x; i < P; i += kSentThreads) sh.keys[i] = 0;
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < P; i += kSentThreads) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t a = sh.keys[i], b = sh.keys[j];
          const bool desc = (i & size) == 0;
          if (desc ? (a < b) : (a > b)) {
            sh.keys[i] = b;
            sh.keys[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

__device__ void write_out(const SentShared& sh, const BeamTopkParams& p, int64_t sent,
                          int64_t first, int n) {
  for (int j = threadIdx.x; j < n; j += kSentThreads) {
    const uint64_t key = sh.keys[j];
    const int64_t flat = sf_cand_flat(key), o = sent * p.k + first + j;
    p.out_scores[o] = sf_cand_score(key);
    p.out_tokens[o] = flat % p.vocab;
    p.out_beams[o] = flat / p.vocab;
  }
}

template <typename T>
__global__ void __launch_bounds__(kSentThreads)
    sentence_kernel(const T* __restrict__ logits,  // [rows, vocab]
                    const BeamTopkParams p, const Workspace w) {
  __shared__ SentShared sh;
  const int64_t sent = blockIdx.x;
  const int64_t R = p.rows_per_sent, nch = sf_num_chunks(p.vocab), k = p.k;
  const int64_t n_chunks = R * nch;
  const float* scores = w.chunk_score + sent * n_chunks;  // [R * nchunks]

  // tau: the k-th largest chunk score, 4 radix passes over 32-bit keys.
  float tau = sf_ninf();
  if (n_chunks >= k) {
    if (threadIdx.x == 0) {
      sh.prefix = 0;
      sh.rank = k;
    }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      clear_hist(sh);
      __syncthreads();
      const uint32_t prefix = static_cast<uint32_t>(sh.prefix);
      for (int64_t i = threadIdx.x; i < n_chunks; i += kSentThreads) {
        const uint32_t key = sf_order_key(scores[i]);
        if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 0xff], 1u);
      }
      __syncthreads();
      pick_bin(sh, shift);
      mask |= 0xffu << shift;
    }
    tau = sf_key_to_float(static_cast<uint32_t>(sh.prefix));
  }

  // Survivors into shared memory; the counter keeps counting past the buffer.
  if (threadIdx.x == 0) sh.count = 0;
  __syncthreads();
  for_each_candidate(logits, p, w, sent, tau, [&](uint64_t key) {
    const uint32_t slot = atomicAdd(&sh.count, 1u);
    if (slot < kSurvivorCap) sh.keys[slot] = key;
  });
  __syncthreads();
  const uint32_t total = sh.count;
  if (total <= static_cast<uint32_t>(kSurvivorCap)) {
    // total >= k: every chunk-maximum token scoring >= tau is a candidate.
    sort_keys_desc(sh, static_cast<int>(total));
    write_out(sh, p, sent, 0, static_cast<int>(k));
    return;
  }

  // Overflow: emit the top-k in rounds of at most kSurvivorCap. Each round
  // finds the want-th largest key below `hi` exactly (8 radix passes over the
  // candidates' 64-bit keys), gathers the keys in [that, hi), sorts them.
  uint64_t hi = ~0ull;  // exclusive; above every key
  for (int64_t done = 0; done < k;) {
    const int want = static_cast<int>(k - done < kSurvivorCap ? k - done : kSurvivorCap);
    __syncthreads();
    if (threadIdx.x == 0) {
      sh.prefix = 0;
      sh.rank = want;
    }
    uint64_t mask = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
      clear_hist(sh);
      __syncthreads();
      const uint64_t prefix = sh.prefix;
      for_each_candidate(logits, p, w, sent, tau, [&](uint64_t key) {
        if (key < hi && (key & mask) == prefix)
          atomicAdd(&sh.hist[static_cast<uint32_t>(key >> shift) & 0xffu], 1u);
      });
      __syncthreads();
      pick_bin(sh, shift);
      mask |= 0xffull << shift;
    }
    const uint64_t lo = sh.prefix;  // the want-th largest key below hi
    __syncthreads();
    if (threadIdx.x == 0) sh.count = 0;
    __syncthreads();
    for_each_candidate(logits, p, w, sent, tau, [&](uint64_t key) {
      if (key >= lo && key < hi) {
        const uint32_t slot = atomicAdd(&sh.count, 1u);
        if (slot < kSurvivorCap) sh.keys[slot] = key;  // exactly `want` (keys are unique)
      }
    });
    __syncthreads();
    sort_keys_desc(sh, want);
    write_out(sh, p, sent, done, want);
    hi = lo;
    done += want;
  }
}

template <typename T>
cudaError_t launch(const T* logits, const BeamTopkParams& p, void* workspace,
                   size_t workspace_bytes, cudaStream_t stream) {
  if (p.bsz == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < beam_topk_workspace_bytes(p))
    return cudaErrorInvalidValue;
  if (p.vocab < 1 || p.k < 1 || p.k > p.rows_per_sent * p.vocab ||
      p.rows_per_sent * p.vocab > INT32_MAX)
    return cudaErrorInvalidValue;
  const Workspace w = carve(workspace, p);
  const int64_t rows = p.bsz * p.rows_per_sent;
  row_stats_kernel<T><<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(logits, p, w);
  sentence_kernel<T><<<static_cast<unsigned>(p.bsz), kSentThreads, 0, stream>>>(logits, p, w);
  return cudaGetLastError();
}

}  // namespace

size_t beam_topk_workspace_bytes(const BeamTopkParams& p) {
  const size_t rows = static_cast<size_t>(p.bsz * p.rows_per_sent);
  const size_t cells = rows * static_cast<size_t>(sf_num_chunks(p.vocab));
  return align256(rows * sizeof(RowStat)) + 2 * align256(cells * sizeof(float)) +
         align256(cells * sizeof(int32_t));
}

template <typename T>
cudaError_t beam_topk_cuda(const T* logits, const BeamTopkParams& p, void* workspace,
                           size_t workspace_bytes, cudaStream_t stream) {
  return launch(logits, p, workspace, workspace_bytes, stream);
}

template cudaError_t beam_topk_cuda<float>(const float*, const BeamTopkParams&, void*, size_t,
                                           cudaStream_t);
template cudaError_t beam_topk_cuda<__half>(const __half*, const BeamTopkParams&, void*, size_t,
                                            cudaStream_t);
template cudaError_t beam_topk_cuda<__nv_bfloat16>(const __nv_bfloat16*, const BeamTopkParams&,
                                                   void*, size_t, cudaStream_t);

int beam_topk_cuda(const void* logits, BeamTopkDtype dtype, const BeamTopkParams& p,
                   void* workspace, size_t workspace_bytes, CUstream_st* stream) {
  switch (dtype) {
    case BeamTopkDtype::kFloat32:
      return beam_topk_cuda(static_cast<const float*>(logits), p, workspace, workspace_bytes,
                            stream);
    case BeamTopkDtype::kFloat16:
      return beam_topk_cuda(static_cast<const __half*>(logits), p, workspace, workspace_bytes,
                            stream);
    case BeamTopkDtype::kBFloat16:
      return beam_topk_cuda(static_cast<const __nv_bfloat16*>(logits), p, workspace,
                            workspace_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kernels
}  // namespace seqfuse
