// The search lane: consecutive steps of seqfuse's fairseq beam search over a
// fused decoder in one call (csrc/cpu/search_lane_cpu.cc), for the steps
// where nothing but the step's own arithmetic happens. The Python loop
// (seqfuse/generation/sequence_generator.py, SequenceGenerator._search) fills
// a SearchLane with its state, runs it, and takes the state back; the lane
// stops where the Python loop has work it keeps (a cache growth or repack, a
// tie among the candidates, the max_len step, the end).
#pragma once
#include <torch/extension.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace seqfuse {

struct SearchLane {
  // Fixed for a search: the generator's settings.
  int64_t beam = 1, max_len = 0, min_len = 0, pad = 1, unk = 3, eos = 2;
  double unk_penalty = 0.0;
  bool normalize_scores = true;
  double len_penalty = 1.0;
  bool match_source_len = false;
  // A shrink repacks a cache only when that frees at least this many bytes
  // of it (seqfuse/layers/kv_cache.py, REPACK_MIN_BYTES).
  int64_t repack_min_bytes = 0;

  // The decoder's caches (seqfuse/layers/kv_cache.py) and positions, as
  // fused_step._native_step passes them. The lane writes self_rows /
  // self_rows_alt (a reorder gathers into the spare table and swaps),
  // rows_n, slot, cross_map / cross_map_alt, cross_n and arena.
  std::optional<at::Tensor> pos_table;
  int64_t pos_mode = 0, pos_pad = 0, pos_limit = 0;
  std::vector<std::vector<at::Tensor>> self_blocks;
  std::vector<at::Tensor> self_pad, self_rows, self_rows_alt;
  int64_t rows_n = 0, slot = 0;
  std::vector<at::Tensor> cross_kv;
  std::vector<std::optional<at::Tensor>> cross_pad;
  std::vector<at::Tensor> cross_map, cross_map_alt;
  int64_t cross_n = 0, q_per_kv = 1;
  std::optional<at::Tensor> arena;

  // The search's state at the top of step `step` (the names of _search's
  // locals; batch_idxs is original_batch_idxs), reorder_state and prev_rows
  // not yet applied. The finished buffers are written in place.
  int64_t step = 0;
  at::Tensor tokens, scores, attn, cands_to_ignore, sent_ids, done, n_fin, src_lengths, batch_idxs;
  std::optional<at::Tensor> reorder_state, prev_rows;  // none pending: the loop reordered
  at::Tensor fin_tokens, fin_len, fin_score, fin_pos, fin_attn;

  // What the last run did: status kTop (stopped at the top of `step`, its
  // reorder pending), kMid (stopped inside `step` after its network: logits
  // and avg_attn hold its output, the reorder done) or kDone (every sentence
  // finished at `step`); why it stopped, the steps it took, whether the batch
  // shrank.
  int64_t status = 0;
  std::string reason;
  int64_t steps = 0;
  bool compacted = false;
  std::optional<at::Tensor> logits, avg_attn;
};

constexpr int64_t kLaneTop = 0;
constexpr int64_t kLaneMid = 1;
constexpr int64_t kLaneDone = 2;

// One step's network over the lane's caches. tokens: [n, step + 1].
struct LaneStep {
  at::Tensor logits;  // [n, vocab] float32
  at::Tensor attn;    // the alignment attention [n, S]
  at::Tensor memory;  // the step's memory
  at::Tensor maxima;  // the logits' group maxima (beam_topk_maxima_cpu's), or undefined
};
using LaneNetwork = std::function<LaneStep(const SearchLane& lane, const at::Tensor& tokens)>;
// Whether the memory a step left would serve a step of n rows.
using LaneMemoryFits = std::function<bool(const at::Tensor& memory, int64_t rows)>;

// Runs steps until one needs the Python loop, or max_steps (< 0: no limit).
void run_search_lane(SearchLane& lane, const LaneNetwork& net, const LaneMemoryFits& fits,
                     int64_t max_steps);
void bind_search_lane(pybind11::module& m);

}  // namespace seqfuse
