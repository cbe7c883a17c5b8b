// y = x W^T + b with W pre-packed in 16-column panels ([ceil(N/16), K, 16],
// zero padded): a register-blocked kernel that streams each panel pair once
// per block of rows (linear_packed_block_rows: up to 10 rows with 512-bit
// vectors, 3 with 256-bit), so skinny products (decoder steps: a few rows per
// sentence) run at the speed of reading W; each block prefetches its panels'
// rows a few steps ahead into L1 as it goes. Each output is one sequential dot
// product over k, whatever the block height, the number of rows or threads:
// a row's result does not depend on the batch.
// Compiled once per CPU capability (linear_{avx2,avx512}.cc) with ATen's
// vector types; chosen at run time in linear_cpu.cc.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/linear_post.h"
#include "cpu/task_queue.h"

namespace seqfuse {
namespace cpu_capability {
namespace CPU_CAPABILITY {

namespace {
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kPanel = 16;
constexpr int kVecs = static_cast<int>(kPanel / Vec::size());  // vectors per panel
// Rows per block (linear_packed_block_rows): dense products take the
// tallest tile, products that skip zeros a shorter one. With 512-bit vectors
// a 10-row tile holds 20 accumulators, two weight vectors and a broadcast in
// the 32 registers; with 256-bit ones 3 rows (12 accumulators, 16 registers).
constexpr int kMaxRows = Vec::size() >= 16 ? 10 : 3;
constexpr int kSkipRows = Vec::size() >= 16 ? 8 : 3;
// Panel pairs per group in the task order (linear_packed_range): about 128 KB
// of panels (4 pairs at K = 256, 1 at K = 1024), which stay in L2 with the
// rows of x while every row block passes over them. (A fixed 4 pairs made
// 512 KB at K = 1024, the feed-forward's second product: as large as a Zen 3
// core's L2, so each row block streamed its group again from L3.)
constexpr int64_t kGroup = 4;
constexpr int64_t kGroupBytes = int64_t{128} << 10;
inline int64_t group_pairs(int64_t K) {
  const int64_t pair_bytes = K * 2 * kPanel * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(
      1, std::min<int64_t>(kGroup, kGroupBytes / std::max<int64_t>(pair_bytes, 1)));
}
// How far ahead (in k steps) a block prefetches its panels' rows into L1.
// Each step's rows come from L2 or beyond (a pair of panels is K x 128 bytes,
// larger than L1 at the model's K); 24 steps of a 10-row block are about 240
// cycles, more than an L3 access.
constexpr int64_t kPrefetchSteps = 24;

// Rows [0, R) of x against one or two panels (TWO): R x (16 or 32) outputs.
// SPARSE: only the k listed in ks[0, steps) (ascending), the k where some of
// the R rows is nonzero: at every other k each row adds fma(0, w, acc) = acc
// exactly (w finite), so the outputs are the dense kernel's, bit for bit.
template <int R, bool TWO, bool SPARSE>
__attribute__((always_inline)) inline void tile(const float* x, int64_t ldx, int64_t K,
                                                const int32_t* ks, int64_t steps, const float* w0,
                                                float* y, int64_t ldy, int64_t n0, int64_t N,
                                                const float* bias) {
  Vec acc[R][TWO ? 2 : 1][kVecs];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < (TWO ? 2 : 1); ++p)
      for (int v = 0; v < kVecs; ++v) acc[r][p][v] = Vec(0.f);
  const float* w1 = w0 + K * kPanel;
  for (int64_t j = 0; j < steps; ++j) {
    const int64_t k = SPARSE ? ks[j] : j;
    // The panels' rows kPrefetchSteps steps ahead, into L1 (near a panel's
    // end the next panel's, or nothing: a prefetch never faults).
    // (SPARSE: the listed k kPrefetchSteps entries ahead, the last one near
    // the list's end; branch-free)
    const int64_t ka =
        SPARSE ? ks[std::min<int64_t>(j + kPrefetchSteps, steps - 1)] : k + kPrefetchSteps;
    __builtin_prefetch(w0 + ka * kPanel, 0, 3);
    if (TWO) __builtin_prefetch(w1 + ka * kPanel, 0, 3);
    if constexpr (SPARSE) {
      // Weight vector by weight vector, each used by every row as it is
      // loaded: the rows' broadcasts, one weight vector and the accumulators
      // fit the registers (AVX2: 3 + 1 + 12 of 16). Loading every weight
      // vector first left one accumulator on the stack there, a store and
      // reload in its chain at every k. Each accumulator takes the same
      // multiply-adds in the same k order either way.
      Vec xb[R];
      for (int r = 0; r < R; ++r) xb[r] = Vec(x[r * ldx + k]);
      for (int p = 0; p < (TWO ? 2 : 1); ++p) {
        const float* wp = (p == 0 ? w0 : w1) + k * kPanel;
        for (int v = 0; v < kVecs; ++v) {
          const Vec w = Vec::loadu(wp + v * Vec::size());
          for (int r = 0; r < R; ++r) acc[r][p][v] = at::vec::fmadd(xb[r], w, acc[r][p][v]);
        }
      }
    } else {
      Vec wv[TWO ? 2 : 1][kVecs];
      for (int v = 0; v < kVecs; ++v) {
        wv[0][v] = Vec::loadu(w0 + k * kPanel + v * Vec::size());
        if (TWO) wv[TWO ? 1 : 0][v] = Vec::loadu(w1 + k * kPanel + v * Vec::size());
      }
      for (int r = 0; r < R; ++r) {
        const Vec xb(x[r * ldx + k]);
        for (int p = 0; p < (TWO ? 2 : 1); ++p)
          for (int v = 0; v < kVecs; ++v) acc[r][p][v] = at::vec::fmadd(xb, wv[p][v], acc[r][p][v]);
      }
    }
  }
  // Epilogue: one add of the bias (as before the store), vector stores for
  // full panels; the last, partial panel goes through a scratch row.
  float tmp[kPanel];
  for (int r = 0; r < R; ++r) {
    for (int p = 0; p < (TWO ? 2 : 1); ++p) {
      const int64_t nb = n0 + p * kPanel;
      const int64_t lim = std::min<int64_t>(kPanel, N - nb);
      if (lim <= 0) break;
      float* out = y + r * ldy + nb;
      if (lim == kPanel) {
        for (int v = 0; v < kVecs; ++v) {
          Vec o = acc[r][p][v];
          if (bias != nullptr) o = o + Vec::loadu(bias + nb + v * Vec::size());
          o.store(out + v * Vec::size());
        }
        continue;
      }
      for (int v = 0; v < kVecs; ++v) acc[r][p][v].store(tmp + v * Vec::size());
      if (bias != nullptr) {
        for (int64_t j = 0; j < lim; ++j) out[j] = tmp[j] + bias[nb + j];
      } else {
        for (int64_t j = 0; j < lim; ++j) out[j] = tmp[j];
      }
    }
  }
}

// Rows [0, R) with R in [1, MAX]: the tile of that height. Inlined with its
// tiles into the task loop (a call per task measured slower with this many
// tile heights).
template <bool TWO, bool SPARSE, int MAX = kMaxRows>
__attribute__((always_inline)) inline void rows_block(int64_t R, const float* x, int64_t ldx,
                                                      int64_t K, const int32_t* ks, int64_t steps,
                                                      const float* w0, float* y, int64_t ldy,
                                                      int64_t n0, int64_t N, const float* bias) {
  if constexpr (MAX > 1) {
    if (R < MAX) {
      return rows_block<TWO, SPARSE, MAX - 1>(R, x, ldx, K, ks, steps, w0, y, ldy, n0, N, bias);
    }
  }
  tile<MAX, TWO, SPARSE>(x, ldx, K, ks, steps, w0, y, ldy, n0, N, bias);
}

// A row block's k list is used when it skips at least an eighth of K (the
// list's indirection costs about that much where it skips little).
inline bool worth_skipping(int64_t count, int64_t K) { return count <= K - K / 8; }
}  // namespace

// Rows per block. Each k step of a block loads one weight vector per panel
// and one broadcast per row for 2 x rows multiply-adds: the taller the block,
// the fewer weight loads (from L2) per multiply-add. A product that skips
// zeros skips, per block, only the k zero in all of its rows: there a shorter
// block skips more.
int64_t linear_packed_block_rows(bool skip_zeros) { return skip_zeros ? kSkipRows : kMaxRows; }

// A LinearPost fn (ctx: GroupMaxCtx): rows [m0, m0 + rows) of the task's
// columns [n0, n0 + cols), one group, reduced to their maximum (max ignores
// NaN, a separate test flags one; the maximum's value is exact in any order).
void linear_packed_group_max(const void* ctx, int64_t, int64_t m0, int64_t rows, int64_t n0,
                             int64_t cols) {
  const GroupMaxCtx& p = *static_cast<const GroupMaxCtx*>(ctx);
  float* out = p.maxima + n0 / (2 * kPanel);
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = p.y + (m0 + r) * p.ld + n0;
    float m = -std::numeric_limits<float>::infinity();
    bool nan = false;
    int64_t j = 0;
    if (cols == 2 * kPanel) {
      Vec acc = Vec::loadu(yr);
      Vec unord = acc != acc;
      for (j = Vec::size(); j < cols; j += Vec::size()) {
        const Vec v = Vec::loadu(yr + j);
        unord = unord | (v != v);
        acc = Vec::blendv(acc, v, v > acc);  // v > acc ? v : acc
      }
      m = at::vec::vec_reduce_all<float>(
          [](const Vec& a, const Vec& b) { return Vec::blendv(a, b, b > a); }, acc);
      nan = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a | b; },
                                           unord) != 0.f;
    }
    for (; j < cols; ++j) {
      const float v = yr[j];
      nan |= v != v;
      m = v > m ? v : m;
    }
    out[(m0 + r) * p.groups] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
  }
}

// A LinearPost fn (ctx: BiasReluCtx): the task's outputs, rows [m0, m0 +
// rows) x columns [n0, n0 + cols), biased and rectified in place, and the
// block's nonzero columns flagged. The same float ops in every lane as the
// scalar tail (x = y + b; x > 0 ? x : +0, NaN -> +0).
void linear_packed_bias_relu(const void* ctx, int64_t block, int64_t m0, int64_t rows, int64_t n0,
                             int64_t cols) {
  const BiasReluCtx& p = *static_cast<const BiasReluCtx*>(ctx);
  constexpr int kMaxCols = 2 * kPanel, kV = kMaxCols / Vec::size();
  cols = std::min<int64_t>(cols, kMaxCols);
  const float* b = p.bias + n0;
  uint8_t* flags = p.flags + block * p.ld + n0;
  if (cols == kMaxCols) {
    const Vec zero(0.f);
    Vec bias[kV], any[kV];
    for (int v = 0; v < kV; ++v) {
      bias[v] = Vec::loadu(b + v * Vec::size());
      any[v] = zero;
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* yr = p.y + (m0 + r) * p.ld + n0;
      for (int v = 0; v < kV; ++v) {
        const Vec x = Vec::loadu(yr + v * Vec::size()) + bias[v];
        const Vec o = Vec::blendv(zero, x, x > zero);
        o.store(yr + v * Vec::size());
        any[v] = any[v] | (o != zero);
      }
    }
    float mask[kMaxCols];
    for (int v = 0; v < kV; ++v) any[v].store(mask + v * Vec::size());
    for (int j = 0; j < kMaxCols; ++j) {
      uint32_t bits;
      std::memcpy(&bits, mask + j, sizeof(bits));
      flags[j] = static_cast<uint8_t>(bits != 0);
    }
    return;
  }
  uint8_t any[kMaxCols] = {0};
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = p.y + (m0 + r) * p.ld + n0;
    for (int64_t j = 0; j < cols; ++j) {
      const float x = yr[j] + b[j];
      const float o = x > 0.0f ? x : 0.0f;
      yr[j] = o;
      any[j] |= static_cast<uint8_t>(o != 0.0f);
    }
  }
  std::memcpy(flags, any, static_cast<size_t>(cols));
}

// Row blocks of an M-row product in blocks of `rows` rows, as the tasks take them.
int64_t linear_packed_row_blocks(int64_t M, int64_t rows) { return (M + rows - 1) / rows; }

// For row blocks [bbegin, bend) of x [M, K]: lists[b * (K + 1)] = the count of
// k where some row of block b is nonzero, followed by those k, ascending. NaN
// counts as nonzero; -0 as zero (its products add nothing either).
void linear_packed_nonzero_k(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t rows,
                             int32_t* lists, int64_t bbegin, int64_t bend) {
  constexpr int64_t kChunk = 256;
  for (int64_t b = bbegin; b < bend; ++b) {
    const int64_t m0 = b * rows, R = std::min<int64_t>(rows, M - m0);
    int32_t* out = lists + b * (K + 1);
    int32_t count = 0;
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kn = std::min(kChunk, K - k0);
      uint8_t nz[kChunk] = {0};
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + (m0 + r) * ldx + k0;
        for (int64_t j = 0; j < kn; ++j) nz[j] |= static_cast<uint8_t>(xr[j] != 0.f);
      }
      count = append_flagged(nz, kn, k0, out + 1, count);
    }
    out[0] = count;
  }
}

// Tasks of a [M, K] x [K, N] product: (panel pair, row block) pairs, in the
// order linear_packed_range gives them.
int64_t linear_packed_tasks(int64_t M, int64_t N, int64_t rows) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  return (panels + 1) / 2 * ((M + rows - 1) / rows);
}

// Tasks [begin, end) of linear_packed_tasks(M, N, rows), on the calling thread.
// Order: groups of group_pairs(K) panel pairs; within a group, row block by row block,
// each block over the group's pairs. A block's outputs are then written as
// contiguous runs of a row (up to kGroup * 32 columns) while the group's panels stay
// in L2 for all blocks, instead of a 32-column strip down every row per pair
// (about 5% slower on wide products such as a [200, 256] x [256, 8003]
// vocabulary projection, whose output rows span many pages).
// The order does not change any output: each is one dot product over k.
// With `lists` (linear_packed_nonzero_k's, for every row block), a block
// visits only its listed k where that skips enough: same outputs, bit for bit
// (see tile), for inputs with many zeros such as ReLU activations.
// With `post`, post->fn runs on each task's outputs right after they are
// stored (still in L1): rows [m0, m0 + R) of row block `block`, columns
// [n0, n0 + cols).
void linear_packed_range(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed,
                         int64_t N, const float* bias, float* y, int64_t rows, int64_t begin,
                         int64_t end, const int32_t* lists, const LinearPost* post) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t pairs = (panels + 1) / 2;
  const int64_t blocks = (M + rows - 1) / rows;
  const int64_t group = group_pairs(K), per_group = group * blocks;
  for (int64_t t = begin; t < end && t < pairs * blocks; ++t) {
    const int64_t gi = t / per_group, r = t - gi * per_group;
    const int64_t g0 = gi * group, gsize = std::min(group, pairs - g0);
    const int64_t block = r / gsize, pair = g0 + r % gsize;
    const int64_t p = 2 * pair, m0 = block * rows;
    const int64_t R = std::min<int64_t>(rows, M - m0);
    const float* w0 = packed + p * K * kPanel;
    const float* xr = x + m0 * ldx;
    float* yr = y + m0 * N;
    const int32_t* list = lists == nullptr ? nullptr : lists + block * (K + 1);
    const bool two = p + 1 < panels;
    if (list != nullptr && worth_skipping(list[0], K)) {
      if (two) {
        rows_block<true, true>(R, xr, ldx, K, list + 1, list[0], w0, yr, N, p * kPanel, N, bias);
      } else {
        rows_block<false, true>(R, xr, ldx, K, list + 1, list[0], w0, yr, N, p * kPanel, N, bias);
      }
    } else if (two) {
      rows_block<true, false>(R, xr, ldx, K, nullptr, K, w0, yr, N, p * kPanel, N, bias);
    } else {
      rows_block<false, false>(R, xr, ldx, K, nullptr, K, w0, yr, N, p * kPanel, N, bias);
    }
    if (post != nullptr) {
      post->fn(post->ctx, block, m0, R, p * kPanel, std::min<int64_t>(2 * kPanel, N - p * kPanel));
    }
  }
}

// Every task of row blocks [bbegin, bend) (all N columns of their rows), in
// linear_packed_range's order: group by group, the blocks' tasks of a group
// being consecutive there. A caller that takes a product by row blocks can go
// on to its rows' next op on the same thread, without waiting for the rest.
void linear_packed_block_range(const float* x, int64_t M, int64_t K, int64_t ldx,
                               const float* packed, int64_t N, const float* bias, float* y,
                               int64_t rows, int64_t bbegin, int64_t bend, const int32_t* lists,
                               const LinearPost* post) {
  const int64_t pairs = ((N + kPanel - 1) / kPanel + 1) / 2;
  const int64_t group = group_pairs(K), per_group = group * ((M + rows - 1) / rows);
  for (int64_t g0 = 0; g0 < pairs; g0 += group) {
    const int64_t gsize = std::min(group, pairs - g0), base = g0 / group * per_group;
    linear_packed_range(x, M, K, ldx, packed, N, bias, y, rows, base + bbegin * gsize,
                        base + bend * gsize, lists, post);
  }
}

// lists: null (dense), or room for
// linear_packed_row_blocks(M, linear_packed_block_rows(true)) * (K + 1)
// int32, filled here before the product.
void linear_packed(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed,
                   int64_t N, const float* bias, float* y, int32_t* lists) {
  const int64_t rows = linear_packed_block_rows(lists != nullptr);
  if (lists != nullptr) {
    at::parallel_for(0, linear_packed_row_blocks(M, rows), 1, [&](int64_t begin, int64_t end) {
      linear_packed_nonzero_k(x, M, K, ldx, rows, lists, begin, end);
    });
  }
  // Chunks of tasks to whichever thread is free (cpu/task_queue.h): the
  // same outputs as any split.
  cpu::parallel_chunks(linear_packed_tasks(M, N, rows), 1, [&](int64_t b, int64_t e) {
    linear_packed_range(x, M, K, ldx, packed, N, bias, y, rows, b, e, lists, nullptr);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu_capability
}  // namespace seqfuse
