"""The search lane: runs of consecutive beam-search steps in one C++ call.

``SequenceGenerator._search`` spends, per step, a dozen calls of 5-60 us
between its kernels (the caches' reorder, the whole-network step and its
checks, the candidates and the tie check, the finished hypotheses, the batch
compaction, the next rows): a third of a batch-1 search, a tenth of a
batch-16 one. On the steps where none of its rarer work happens, the lane
(``seqfuse._C.SearchLane``, run by the decoder plan's ``search``;
csrc/cpu/search_lane_cpu.cc) does those steps in C++: the same ops, on the
same tensors, in the same order, so the search's every bit is the loop's.

It takes plain beam search over seqfuse's fused decoder on its one-call
path (float32, CPU), after the loop's first step, when nothing else takes
part in a step: no language model, prefix, constraints, suppressed tokens,
n-gram blocking or temperature, and no subclass hook or instance override of
what a step calls. It hands the search back to the loop, which goes on as if
it had taken every step itself, at the top of a step whose reorder repacks a
cache or whose slot or position needs a cache or table to grow, at the
max_len step, inside a step whose candidates tie (the loop recomputes those
sentences with stock's ops) and when every sentence has finished.
``SEQFUSE_SEARCH_LANE=0`` leaves every step to the loop.
"""

from __future__ import annotations

from typing import Optional

import torch
from fairseq import search
from fairseq.sequence_generator import EnsembleModel

from seqfuse import _ext
from seqfuse.layers import fused_step, kv_cache

LANE_ENV = "SEQFUSE_SEARCH_LANE"
# How a run ended (csrc/search_lane.h): at the top of a step, inside one
# after its network, or with every sentence finished.
LANE_TOP, LANE_MID, LANE_DONE = 0, 1, 2
# Lane runs, the steps they took and why they stopped (tests and benchmarks
# read them).
STATS = {"runs": 0, "steps": 0, "stops": {}}
# At most this many steps per run (None: no limit); tests set it to make the
# lane hand over often.
MAX_STEPS: Optional[int] = None


def lane_problem(gen, model, beam_search: bool, fused_logits: bool, per_source: bool,
                 prefix_tokens, suppress, ngram: int, update_constraints, compact_every: int,
                 device) -> Optional[str]:  # fmt: skip
    """Why the lane cannot take a search's steps (None: it may, step by step)."""
    from seqfuse.generation.sequence_generator import SequenceGenerator
    from seqfuse.layers.fairseq import FusedTransformerDecoder

    if not _ext.env_flag(LANE_ENV, True):
        return f"{LANE_ENV}=0"
    if _ext._C is None or not hasattr(_ext._C, "SearchLane"):
        return "the extension has no search lane"
    if (_ext._C.LANE_TOP, _ext._C.LANE_MID, _ext._C.LANE_DONE) != (LANE_TOP, LANE_MID, LANE_DONE):
        return "the extension's search lane is another version"
    if device.type != "cpu" or compact_every != 1:
        return "not a CPU search compacting every step"
    if not (beam_search and fused_logits and per_source and model.models_size == 1):
        return "not plain beam search over one fused decoder"
    if gen.lm_model is not None or prefix_tokens is not None or update_constraints is not None:
        return "a language model, prefix or constraints"
    if suppress is not None or ngram or gen.temperature != 1.0:
        return "suppressed tokens, n-gram blocking or a temperature"
    if type(gen.search).prune_sentences is not search.Search.prune_sentences:
        return "the search strategy prunes state of its own"
    cls = type(gen)
    for name in ("_decoder_step", "_fused_candidates", "_finalize"):
        if getattr(cls, name) is not getattr(SequenceGenerator, name) or name in gen.__dict__:
            return f"{name} is overridden"
    if type(model).reorder_incremental_state is not EnsembleModel.reorder_incremental_state:
        return "the ensemble's reorder is overridden"
    decoder = getattr(model.single_model, "decoder", None)
    dcls = type(decoder)
    if not isinstance(decoder, FusedTransformerDecoder):
        return "not a fused decoder"
    for name in ("step_logits", "reorder_incremental_state_scripting", "_reorder_fused_caches"):
        if getattr(dcls, name) is not getattr(FusedTransformerDecoder, name) or (
            name in decoder.__dict__
        ):
            return f"the decoder's {name} is overridden"
    return None


class SearchLane:
    """One search's lane: fills the C++ lane from the loop's state, runs it,
    and gives the state back (the caches' objects updated in place)."""

    def __init__(self, gen, model, incremental_states: list, max_len: int):
        self.model = model
        self.states = incremental_states
        self.decoder = model.single_model.decoder
        self.state = incremental_states[0]
        self.beam = gen.beam_size
        native = _ext._C.SearchLane()
        native.beam = gen.beam_size
        native.max_len = max_len
        native.min_len = int(gen.min_len)
        native.pad, native.unk, native.eos = int(gen.pad), int(gen.unk), int(gen.eos)
        native.unk_penalty = float(gen.unk_penalty)
        native.normalize_scores = bool(gen.normalize_scores)
        native.len_penalty = float(gen.len_penalty)
        native.match_source_len = bool(gen.match_source_len)
        native.repack_min_bytes = int(kv_cache.REPACK_MIN_BYTES)
        self.native = native

    def _caches(self):
        """The whole-network step's caches when the lane can take the next
        step over them (in step, no first reorder pending), else None."""
        state = self.state
        nxt = state.get(fused_step.NEXT_STEPS_KEY)
        if nxt is None or nxt.native is None or not hasattr(nxt.native, "search"):
            return None
        decoder = self.decoder
        if decoder.training or torch.is_grad_enabled():
            return None
        if state.get(fused_step.LOGITS_PLAN_KEY) is not nxt.plan or not nxt.holds(decoder, state):
            return None
        if not decoder.reorders_only_fused_caches(state):
            return None
        selfs, crosses = nxt.selfs, nxt.crosses
        first = selfs[0]
        for cache in selfs:
            if cache.expand != 1 or cache.length == 0 or cache.length != first.length:
                return None
            if cache.n != first.n:
                return None
        c0 = crosses[0]
        for cc in crosses:
            if cc.later_q_per_kv or cc.q_per_kv != self.beam or cc.beam != self.beam:
                return None
            if cc.n != c0.n or cc.map.dtype != torch.long:
                return None
        return nxt

    def run(self, step: int, tokens, scores, attn, fin_attn, cands_to_ignore, sent_ids, done,
            n_fin, src_lengths, batch_idxs, reorder_state, prev_rows, fin_tokens, fin_len,
            fin_score, fin_pos):  # fmt: skip
        """The lane's steps from the top of ``step``; None when it cannot take
        that step. Else ``(status, step, tokens, scores, attn, fin_attn,
        cands_to_ignore, sent_ids, done, src_lengths, batch_idxs,
        reorder_state, prev_rows, (logits, avg_attn) or None, compacted)``:
        the loop's state at the top of ``step`` (status LANE_TOP), inside it
        after its network (LANE_MID: the step's output given), or at its end
        with every sentence finished (LANE_DONE); ``compacted``: the batch
        shrank (the loop rebuilds what it keeps per sentence). Where the lane
        stops for a cache's repack or growth, the loop's own reorder and the
        growth its step would make are done here and the lane goes on."""
        if step < 1 or attn is None or fin_attn is None or reorder_state is None:
            return None
        L = self.native
        compacted = False
        resumed = None
        status = LANE_TOP
        entered = False
        while True:
            nxt = self._caches()
            if nxt is None:
                if not entered:
                    return None
                break
            selfs, crosses = nxt.selfs, nxt.crosses
            self._fill(L, nxt)
            L.step = step
            L.tokens, L.scores, L.attn, L.fin_attn = tokens, scores, attn, fin_attn
            L.cands_to_ignore, L.sent_ids, L.done, L.n_fin = cands_to_ignore, sent_ids, done, n_fin
            L.src_lengths, L.batch_idxs = src_lengths, batch_idxs
            L.reorder_state, L.prev_rows = reorder_state, prev_rows
            L.fin_tokens, L.fin_len, L.fin_score, L.fin_pos = (
                fin_tokens,
                fin_len,
                fin_score,
                fin_pos,
            )
            entered = True
            try:
                nxt.native.search(L, -1 if MAX_STEPS is None else MAX_STEPS)
            finally:
                self._take_caches(L, selfs, crosses)
            steps = L.steps
            STATS["runs"] += 1
            STATS["steps"] += steps
            reason = L.reason
            STATS["stops"][reason] = STATS["stops"].get(reason, 0) + 1
            fused_step.STATS["one_call"] += steps
            status, step = L.status, L.step
            tokens, scores, attn, fin_attn = L.tokens, L.scores, L.attn, L.fin_attn
            cands_to_ignore, sent_ids, done = L.cands_to_ignore, L.sent_ids, L.done
            src_lengths, batch_idxs = L.src_lengths, L.batch_idxs
            reorder_state, prev_rows = L.reorder_state, L.prev_rows
            compacted = compacted or L.compacted
            if status == LANE_MID:
                resumed = (L.logits, L.avg_attn)
            L.release()
            if status != LANE_TOP or reason not in ("grow", "repack"):
                break
            # The loop's reorder (a repack), then the growth its step would
            # make (fused_step._step_caches), and on.
            if reorder_state is not None:
                if prev_rows is not None:
                    reorder_state = prev_rows[reorder_state]
                    compacted = True
                self.model.reorder_incremental_state(self.states, reorder_state)
                reorder_state = prev_rows = None
            for cache in selfs:
                fused_step.make_room(cache, cache.n, cache.length, blocks=True)
        return (
            status, step, tokens, scores, attn, fin_attn, cands_to_ignore, sent_ids, done,
            src_lengths, batch_idxs, reorder_state, prev_rows, resumed, compacted,
        )  # fmt: skip

    def _fill(self, L, nxt) -> None:
        """The lane's cache fields from the caches' objects."""
        selfs, crosses = nxt.selfs, nxt.crosses
        pos = nxt.pos
        L.pos_table = pos
        L.pos_mode = fused_step.POS_NONE if pos is None else fused_step.POS_FIXED
        L.pos_pad = nxt.pad
        L.pos_limit = nxt.limit
        L.self_blocks = [cache.blocks for cache in selfs]
        L.self_pad = [cache.pad for cache in selfs]
        L.self_rows = [cache.rows for cache in selfs]
        L.self_rows_alt = [cache.rows_alt for cache in selfs]
        L.rows_n = selfs[0].n
        L.slot = selfs[0].length
        L.cross_kv = [cc.kv for cc in crosses]
        L.cross_pad = [cc.pad for cc in crosses]
        L.cross_map = [cc.map for cc in crosses]
        L.cross_map_alt = [cc.map_alt for cc in crosses]
        L.cross_n = crosses[0].n
        L.q_per_kv = crosses[0].q_per_kv
        L.arena = self.state.pop(fused_step.STEP_MEMORY_KEY, None)

    def _take_caches(self, L, selfs, crosses) -> None:
        """The caches' objects as the lane left them (also after an error:
        the search is lost then, the caches stay consistent with their
        tables), and the step memory back in the incremental state."""
        rows, rows_alt, n, slot = L.self_rows, L.self_rows_alt, L.rows_n, L.slot
        for cache, r, r_alt in zip(selfs, rows, rows_alt):
            cache.rows, cache.rows_alt, cache.n, cache.length = r, r_alt, n, slot
        maps, maps_alt, sents = L.cross_map, L.cross_map_alt, L.cross_n
        for cc, m, m_alt in zip(crosses, maps, maps_alt):
            cc.map, cc.map_alt, cc.n = m, m_alt, sents
        memory = L.arena
        if memory is not None:
            self.state[fused_step.STEP_MEMORY_KEY] = memory
