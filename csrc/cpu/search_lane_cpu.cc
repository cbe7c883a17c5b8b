// seqfuse's search lane (CPU, float32): consecutive steps of the fairseq beam
// search of seqfuse/generation/sequence_generator.py (SequenceGenerator._search,
// plain beam search over a fused decoder's whole-network step) in one call.
//
// Each step is the Python loop's step, op for op, on the same tensors: the
// caches' reorder (every layer's parent table gathered, the cross-attention
// maps when the batch shrank), the network (DecoderLogitsPlan's step), the
// candidates (beam_topk, then the exact-tie check), the attention column,
// the finished candidates and their hypotheses, the batch compaction and the
// next rows (select_active). The ops are the ones the Python loop calls
// (their C++ entry points, without the dispatcher), and every index
// operation is its torch counterpart, so the search's every bit is the
// loop's. What the lane removes is the Python between the ops: about a
// dozen calls of 5-60 us per step, a third of a batch-1 search.
//
// It stops, leaving the state as the loop's at that point, where the loop
// does what it keeps to itself: at the top of a step whose reorder would
// repack a cache ("repack"; the loop reorders, then runs the lane on from
// there, no reorder pending), whose slot needs the caches to grow ("grow":
// likewise), whose position needs the table to grow, or that is the max_len
// step ("top"); after a step's network when two finite
// candidates tie (the loop recomputes those sentences with stock's ops:
// "mid"); when every sentence has finished ("done").
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "kernels/beam_topk.h"
#include "ops.h"
#include "search_lane.h"

namespace seqfuse {
namespace {

// The loop's _grow_time: `buf` with at least `need` (at most `limit`)
// columns in its last dimension, doubling; the columns held are copied.
at::Tensor grow_time(const at::Tensor& buf, int64_t need, int64_t limit, bool zero) {
  const int64_t have = buf.size(-1);
  if (need <= have) return buf;
  const int64_t cols = std::min(limit, std::max(need, 2 * have));
  std::vector<int64_t> shape = buf.sizes().vec();
  shape.back() = cols;
  at::Tensor out = zero ? at::zeros(shape, buf.options()) : at::empty(shape, buf.options());
  out.narrow(-1, 0, have).copy_(buf);
  return out;
}

void check_lane(const SearchLane& L) {
  const size_t layers = L.self_rows.size();
  TORCH_CHECK(layers > 0 && L.self_rows_alt.size() == layers && L.self_pad.size() == layers &&
                  L.self_blocks.size() == layers && L.cross_kv.size() == layers &&
                  L.cross_pad.size() == layers && L.cross_map.size() == layers &&
                  L.cross_map_alt.size() == layers,
              "SearchLane: per-layer lists of different lengths");
  TORCH_CHECK(L.beam >= 1 && L.q_per_kv == L.beam, "SearchLane: ", L.q_per_kv,
              " query rows per source for beam ", L.beam);
  TORCH_CHECK(L.step >= 1, "SearchLane: the first step is the loop's");
  TORCH_CHECK(!L.reorder_state.has_value() ||
                  (L.reorder_state->scalar_type() == at::kLong && L.reorder_state->dim() == 1 &&
                   L.reorder_state->is_contiguous()),
              "SearchLane: reorder_state must be a contiguous int64 vector");
  TORCH_CHECK(L.reorder_state.has_value() || !L.prev_rows.has_value(),
              "SearchLane: prev_rows without a reorder");
  const int64_t bsz = L.sent_ids.size(0);
  TORCH_CHECK(L.tokens.scalar_type() == at::kLong && L.tokens.dim() == 2 &&
                  L.tokens.is_contiguous() && L.scores.scalar_type() == at::kFloat &&
                  L.scores.dim() == 2 && L.scores.is_contiguous() && L.attn.defined() &&
                  L.attn.scalar_type() == at::kFloat && L.attn.dim() == 3 &&
                  L.attn.is_contiguous() && L.fin_attn.defined() && L.fin_attn.dim() == 4,
              "SearchLane: tokens, scores and attention buffers of the wrong kind");
  TORCH_CHECK(L.cands_to_ignore.dim() == 2 && L.cands_to_ignore.size(0) == bsz &&
                  L.done.size(0) == bsz && L.src_lengths.size(0) == bsz &&
                  L.batch_idxs.size(0) == bsz && L.src_lengths.scalar_type() == at::kLong,
              "SearchLane: per-sentence state of different sizes");
}

// Every layer's cross-attention map after a batch shrink to the rows of
// `order` (CrossAttnCache.reorder): sentence i keeps the map entry of the
// sentence its first row came from.
void shrink_cross_maps(SearchLane& L, const at::Tensor& order, int64_t sents) {
  const int64_t* ord = order.data_ptr<int64_t>();
  for (size_t l = 0; l < L.cross_map.size(); ++l) {
    const at::Tensor& from = L.cross_map[l];
    const at::Tensor& to = L.cross_map_alt[l];
    TORCH_CHECK(from.scalar_type() == at::kLong && to.scalar_type() == at::kLong &&
                    from.is_contiguous() && to.is_contiguous() && to.size(0) >= sents,
                "SearchLane: cross-attention maps of the wrong kind");
    const int64_t* src = from.data_ptr<int64_t>();
    int64_t* dst = to.data_ptr<int64_t>();
    for (int64_t i = 0; i < sents; ++i) {
      const int64_t sel = ord[i * L.beam] / L.beam;
      TORCH_CHECK(sel >= 0 && sel < L.cross_n, "SearchLane: row ", ord[i * L.beam], " outside the ",
                  L.cross_n, " mapped sentences");
      dst[i] = src[sel];
    }
  }
  std::swap(L.cross_map, L.cross_map_alt);
  L.cross_n = sents;
}

// kv_cache.repack_frees_enough: whether a repack dropping `rows` rows of
// `row_bytes` each frees enough to be worth its copy.
bool frees_enough(const SearchLane& L, int64_t rows, int64_t row_bytes) {
  return rows * row_bytes >= L.repack_min_bytes;
}

}  // namespace

void run_search_lane(SearchLane& L, const LaneNetwork& net, const LaneMemoryFits& fits,
                     int64_t max_steps) {
  RECORD_FUNCTION("seqfuse::SearchLane.run", std::vector<c10::IValue>());
  check_lane(L);
  L.steps = 0;
  L.compacted = false;
  L.logits.reset();
  L.avg_attn.reset();
  const auto stop = [&L](int64_t status, const char* why) {
    L.status = status;
    L.reason = why;
  };
  const size_t layers = L.self_rows.size();
  while (true) {
    const int64_t s = L.step;
    if (max_steps >= 0 && L.steps >= max_steps) return stop(kLaneTop, "budget");
    if (s >= L.max_len) return stop(kLaneTop, "max_len");
    if (s + 1 > L.pos_limit) return stop(kLaneTop, "positions");

    // The caches' reorder (the loop's first lines; none pending when the
    // loop has just made it), checked before anything changes: a stop here
    // leaves reorder_state and prev_rows pending.
    const bool pending = L.reorder_state.has_value();
    at::Tensor order;
    int64_t n_new = L.rows_n;
    if (pending) {
      order = L.prev_rows.has_value() ? L.prev_rows->index_select(0, *L.reorder_state)
                                      : *L.reorder_state;
      n_new = order.numel();
    }
    for (size_t l = 0; l < layers; ++l) {
      const int64_t r_cap = L.self_pad[l].size(1), l_cap = L.self_rows[l].size(1);
      // SelfAttnCache.repacks_at
      const at::Tensor& block = L.self_blocks[l].front();
      if (pending && n_new <= r_cap / 2 &&
          frees_enough(L, r_cap - n_new, l_cap * block.size(2) * block.element_size()))
        return stop(kLaneTop, "repack");
      if (n_new > r_cap || L.slot + 1 > l_cap) return stop(kLaneTop, "grow");
    }
    const bool shrink = pending && L.cross_n * L.beam != n_new;
    const int64_t sents = n_new / L.beam;
    if (shrink) {
      TORCH_CHECK(n_new % L.beam == 0, "SearchLane: ", n_new, " rows for beam ", L.beam);
      for (size_t l = 0; l < layers; ++l) {
        // CrossAttnCache.reorder
        const at::Tensor& kv = L.cross_kv[l];
        if (sents <= kv.size(1) / 2 &&
            frees_enough(L, kv.size(1) - sents, kv.size(0) * kv.size(2) * kv.element_size()))
          return stop(kLaneTop, "repack");
      }
    }
    TORCH_CHECK(L.cross_n * L.beam == n_new || shrink, "SearchLane: ", L.cross_n,
                " mapped sentences for ", n_new, " rows");
    if (pending) {
      gather_table_rows(L.self_rows, L.self_rows_alt, L.rows_n, order);
      std::swap(L.self_rows, L.self_rows_alt);
      L.rows_n = n_new;
      if (shrink) shrink_cross_maps(L, order, sents);
      L.reorder_state.reset();
      L.prev_rows.reset();
    }

    // The network, in the memory the last step left when it serves.
    if (L.arena.has_value() && !fits(*L.arena, n_new)) L.arena.reset();
    LaneStep out = net(L, L.tokens.narrow(1, 0, s + 1));
    at::Tensor logits = std::move(out.logits), avg = std::move(out.attn);
    at::Tensor maxima = std::move(out.maxima);  // a view of the memory, as the logits
    L.arena = std::move(out.memory);
    L.slot += 1;
    L.steps += 1;

    // The candidates (SequenceGenerator._fused_candidates): one more than
    // kept, for the tie check.
    const int64_t vocab = logits.size(1);
    const int64_t k = std::min(2 * L.beam, L.beam * vocab - 1);
    const int64_t k_op = std::min(k + 1, L.beam * vocab);
    const int64_t eos_mode = s < L.min_len ? kernels::kEosForbid : kernels::kEosAllow;
    const at::Tensor cum = L.scores.select(1, s - 1).contiguous();
    auto [cs, ci, cb] = maxima.defined()
                            ? beam_topk_maxima_cpu(logits, maxima, cum, L.beam, k_op, L.pad, L.unk,
                                                   L.eos, L.unk_penalty, eos_mode, std::nullopt)
                            : beam_topk_cpu(logits, cum, L.beam, k_op, L.pad, L.unk, L.eos,
                                            L.unk_penalty, eos_mode, std::nullopt, false);
    if (k_op > 1 && std::get<1>(finite_ties_cpu(cs))) {
      L.logits = std::move(logits);
      L.avg_attn = std::move(avg);
      return stop(kLaneMid, "tie");
    }
    at::Tensor cand_scores = cs.narrow(1, 0, k), cand_indices = ci.narrow(1, 0, k),
               cand_beams = cb.narrow(1, 0, k);
    L.attn = grow_time(L.attn, s + 2, L.max_len + 2, /*zero=*/false);
    L.attn.select(2, s + 1).copy_(avg);
    logits = at::Tensor();  // this step's scores are spent (the memory can serve the next step)
    maxima = at::Tensor();
    avg = at::Tensor();

    // Finished hypotheses, then the batch shrink.
    auto [cand_bbsz, eos_mask, take, rank, sent_n_fin, any_taken] =
        finished_candidates_cpu(cand_scores, cand_indices, cand_beams, L.cands_to_ignore, L.done,
                                L.n_fin, L.sent_ids, L.eos);
    if (any_taken) {
      L.fin_attn = grow_time(L.fin_attn, s + 1, L.max_len + 1, /*zero=*/true);
      std::optional<double> divisor;
      if (L.normalize_scores) divisor = std::pow(static_cast<double>(s + 1), L.len_penalty);
      finalize_hypos_cpu(take, rank, cand_bbsz, cand_scores, L.tokens, L.scores, L.attn,
                         L.src_lengths, L.sent_ids, L.fin_tokens, L.fin_len, L.fin_score, L.fin_pos,
                         L.fin_attn, s, L.eos, divisor, L.match_source_len);
      // sent_n_fin + take.sum(1) -> n_fin[sent_ids]; done |= (that == beam)
      const int64_t bsz = L.done.size(0);
      at::Tensor done = L.done.clone();
      const bool* tk = take.data_ptr<bool>();
      const int64_t* snf = sent_n_fin.data_ptr<int64_t>();
      const int64_t* sid = L.sent_ids.data_ptr<int64_t>();
      int64_t* nf = L.n_fin.data_ptr<int64_t>();
      bool* dn = done.data_ptr<bool>();
      bool all_done = true;
      for (int64_t b = 0; b < bsz; ++b) {
        int64_t count = snf[b];
        for (int64_t j = 0; j < L.beam; ++j) count += tk[b * L.beam + j];
        nf[sid[b]] = count;
        dn[b] = dn[b] || count == L.beam;
        all_done = all_done && dn[b];
      }
      L.done = done;
      if (all_done) return stop(kLaneDone, "finished");
      const at::Tensor keep = at::nonzero(done.logical_not()).view(-1);
      const int64_t new_bsz = keep.numel();
      if (new_bsz < bsz) {
        const at::Tensor rows =
            (keep.unsqueeze(1) * L.beam + at::arange(L.beam, keep.options())).view(-1);
        eos_mask = eos_mask.index_select(0, keep);
        cand_beams = cand_beams.index_select(0, keep);
        cand_bbsz = cand_beams.add((at::arange(new_bsz, keep.options()) * L.beam).unsqueeze(1));
        cand_scores = cand_scores.index_select(0, keep);
        cand_indices = cand_indices.index_select(0, keep);
        L.src_lengths = L.src_lengths.index_select(0, keep);
        L.cands_to_ignore = L.cands_to_ignore.index_select(0, keep);
        L.batch_idxs = L.batch_idxs.index_select(0, keep);
        L.sent_ids = L.sent_ids.index_select(0, keep);
        L.done = L.done.index_select(0, keep);
        L.scores = L.scores.index_select(0, rows);
        L.tokens = L.tokens.index_select(0, rows);
        L.attn = L.attn.index_select(0, rows);
        L.prev_rows = rows;
        L.compacted = true;
      }
    }

    // The rows that go on, their histories gathered.
    auto [active_bbsz, active_hypos, new_ignore] = select_active_cpu(
        eos_mask.contiguous(), L.cands_to_ignore.contiguous(), cand_bbsz.contiguous(), cand_indices,
        cand_scores, L.tokens, L.scores, L.attn, s);
    L.cands_to_ignore = new_ignore;
    L.reorder_state = active_bbsz;
    L.step = s + 1;
  }
}

void bind_search_lane(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<SearchLane>(m, "SearchLane")
      .def(py::init<>())
      .def_readwrite("beam", &SearchLane::beam)
      .def_readwrite("max_len", &SearchLane::max_len)
      .def_readwrite("min_len", &SearchLane::min_len)
      .def_readwrite("pad", &SearchLane::pad)
      .def_readwrite("unk", &SearchLane::unk)
      .def_readwrite("eos", &SearchLane::eos)
      .def_readwrite("unk_penalty", &SearchLane::unk_penalty)
      .def_readwrite("normalize_scores", &SearchLane::normalize_scores)
      .def_readwrite("len_penalty", &SearchLane::len_penalty)
      .def_readwrite("match_source_len", &SearchLane::match_source_len)
      .def_readwrite("repack_min_bytes", &SearchLane::repack_min_bytes)
      .def_readwrite("pos_table", &SearchLane::pos_table)
      .def_readwrite("pos_mode", &SearchLane::pos_mode)
      .def_readwrite("pos_pad", &SearchLane::pos_pad)
      .def_readwrite("pos_limit", &SearchLane::pos_limit)
      .def_readwrite("self_blocks", &SearchLane::self_blocks)
      .def_readwrite("self_pad", &SearchLane::self_pad)
      .def_readwrite("self_rows", &SearchLane::self_rows)
      .def_readwrite("self_rows_alt", &SearchLane::self_rows_alt)
      .def_readwrite("rows_n", &SearchLane::rows_n)
      .def_readwrite("slot", &SearchLane::slot)
      .def_readwrite("cross_kv", &SearchLane::cross_kv)
      .def_readwrite("cross_pad", &SearchLane::cross_pad)
      .def_readwrite("cross_map", &SearchLane::cross_map)
      .def_readwrite("cross_map_alt", &SearchLane::cross_map_alt)
      .def_readwrite("cross_n", &SearchLane::cross_n)
      .def_readwrite("q_per_kv", &SearchLane::q_per_kv)
      .def_readwrite("arena", &SearchLane::arena)
      .def_readwrite("step", &SearchLane::step)
      .def_readwrite("tokens", &SearchLane::tokens)
      .def_readwrite("scores", &SearchLane::scores)
      .def_readwrite("attn", &SearchLane::attn)
      .def_readwrite("cands_to_ignore", &SearchLane::cands_to_ignore)
      .def_readwrite("sent_ids", &SearchLane::sent_ids)
      .def_readwrite("done", &SearchLane::done)
      .def_readwrite("n_fin", &SearchLane::n_fin)
      .def_readwrite("src_lengths", &SearchLane::src_lengths)
      .def_readwrite("batch_idxs", &SearchLane::batch_idxs)
      .def_readwrite("reorder_state", &SearchLane::reorder_state)
      .def_readwrite("prev_rows", &SearchLane::prev_rows)
      .def_readwrite("fin_tokens", &SearchLane::fin_tokens)
      .def_readwrite("fin_len", &SearchLane::fin_len)
      .def_readwrite("fin_score", &SearchLane::fin_score)
      .def_readwrite("fin_pos", &SearchLane::fin_pos)
      .def_readwrite("fin_attn", &SearchLane::fin_attn)
      .def_readwrite("status", &SearchLane::status)
      .def_readwrite("reason", &SearchLane::reason)
      .def_readwrite("steps", &SearchLane::steps)
      .def_readwrite("compacted", &SearchLane::compacted)
      .def_readwrite("logits", &SearchLane::logits)
      .def_readwrite("avg_attn", &SearchLane::avg_attn)
      .def("release", [](SearchLane& lane) {
        // every tensor let go (the settings stay): the search's buffers and
        // the caches are not held past the run that used them
        SearchLane fresh;
        fresh.beam = lane.beam;
        fresh.max_len = lane.max_len;
        fresh.min_len = lane.min_len;
        fresh.pad = lane.pad;
        fresh.unk = lane.unk;
        fresh.eos = lane.eos;
        fresh.unk_penalty = lane.unk_penalty;
        fresh.normalize_scores = lane.normalize_scores;
        fresh.len_penalty = lane.len_penalty;
        fresh.match_source_len = lane.match_source_len;
        fresh.repack_min_bytes = lane.repack_min_bytes;
        lane = std::move(fresh);
      });
  m.attr("LANE_TOP") = kLaneTop;
  m.attr("LANE_MID") = kLaneMid;
  m.attr("LANE_DONE") = kLaneDone;
}

}  // namespace seqfuse
