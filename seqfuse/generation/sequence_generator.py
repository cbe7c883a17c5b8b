"""Drop-in replacement for fairseq's ``SequenceGenerator``.

Same constructor, same ``generate(models, sample, **kwargs)`` contract, same
hypothesis dicts (tokens with EOS, score, positional_scores, attention,
alignment), same results: the loop follows fairseq 0.12's search order step
for step. What changes is how each step is computed:

- plain beam search takes its candidates from the fused ``beam_topk`` op
  (normaliser, fairseq's edits, score accumulation and the top-2k in one pass,
  with exact hierarchical pruning): no ``[rows, vocab]`` log-prob tensor;
- plain beam search over seqfuse's fused decoder runs its steps in C++
  (``seqfuse.generation.lane``: the same ops in the same order, handing back
  to this loop for cache repacks and growth, exact ties, max_len and the end);
- n-gram blocking is computed with tensor ops instead of a Python loop;
- encoder outputs are not re-gathered every step: the rows of one sentence are
  identical copies, so only a batch shrink rebuilds them (from the one output
  per sentence, after the caches shrink); seqfuse's fused decoder gets one
  row per sentence and keeps cross-attention K/V once per sentence;
- finished hypotheses are built from batched tensors; this step's scores are
  freed before the next step, and the attention buffers grow with the steps
  taken instead of being sized by ``max_len``.

Other search strategies fairseq builds from its options (sampling,
``--match-source-len``, diverse beam search, diverse siblings, a
``prefix_allowed_tokens_fn``, lexical constraints) have their ``step`` (and
constraint updates) called by this loop exactly where stock's loop calls
them. A strategy it does not know runs fairseq's own loop, after one warning
line that names the reason. ``SEQFUSE_DISABLE=1`` does the same
without the warning.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from fairseq import search
from fairseq import utils as fairseq_utils
from fairseq.models import FairseqDecoder
from fairseq.models.fairseq_model import BaseFairseqModel
from fairseq.models.transformer.transformer_base import TransformerModelBase
from fairseq.sequence_generator import EnsembleModel, EnsembleModelWithAlignment
from fairseq.sequence_generator import SequenceGenerator as StockSequenceGenerator
from fairseq.sequence_generator import (
    SequenceGeneratorWithAlignment as StockSequenceGeneratorWithAlignment,
)
from torch import Tensor

from seqfuse import _ext
from seqfuse.generation.lane import LANE_DONE, SearchLane, lane_problem
from seqfuse.layers.kv_cache import FIRST_STEP_SHARED, ROWS_PER_SOURCE
from seqfuse.ops.beam_topk import (
    EOS_ALLOW,
    EOS_FORBID,
    EOS_ONLY,
    apply_step_edits,
    ban_tokens,
    beam_topk,
    beam_topk_reference,
    cpu_kernel_for,
)
from seqfuse.ops.search import finalize_hypos, finished_candidates, finite_ties, select_active

logger = logging.getLogger("seqfuse.generation")
_warned: set[str] = set()


# The one wording of a fallback line (the fairseq plugin uses it too).
FALLBACK_PREFIX = "seqfuse: falling back to stock SequenceGenerator: "

# ROWS_PER_SOURCE goes in the incremental state of a model with seqfuse's fused
# decoder layers: its rows come in groups of `beam` rows of one source, so the
# layers keep the cross-attention K/V once per sentence; a fused decoder on its
# fast path gets one encoder row per sentence.
#
# Beam search's first step decodes `beam` identical rows per sentence (all
# start from BOS; stock keeps the first row's candidates). A fused decoder on
# its fast path on the CPU computes every row independently of the others (the
# packed GEMM's rows do not depend on the batch), so it decodes one row per
# sentence there (FIRST_STEP_SHARED) with the same result bit for bit;
# SHARED_FIRST_STEP_ENV=0 decodes all rows.
SHARED_FIRST_STEP_ENV = "SEQFUSE_SHARED_FIRST_STEP"
# First steps decoded on one row per sentence (tests and benchmarks read it).
STATS = {"shared_first_steps": 0}

# Search strategies whose step the loop calls as stock's loop does (plain beam
# search takes the fused candidates instead): per-step state, if any, lives in
# the strategy and follows the loop's prune_sentences/set_src_lengths calls.
_STOCK_STEP_SEARCHES = (
    search.BeamSearch,
    search.Sampling,
    search.LengthConstrainedBeamSearch,  # --match-source-len
    search.DiverseBeamSearch,  # --diverse-beam-groups
    search.DiverseSiblingsSearch,  # --diversity-rate
    search.PrefixConstrainedBeamSearch,  # prefix_allowed_tokens_fn
    search.LexicallyConstrainedBeamSearch,  # --constraints
)

# attn / finished attention buffers: time columns allocated at first, then
# grown by doubling (up to max_len) instead of max_len columns up front.
ATTN_INITIAL_STEPS = 32


class LengthLimitsError(ValueError, AssertionError):
    """min_len above the search's max_len. Stock's generator fails the same
    check with an AssertionError: this is one too, so code written against
    stock catches it, and a ValueError, which it is."""


def _warn_fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("%s%s", FALLBACK_PREFIX, reason)


# Model-level get_normalized_probs that only delegate to the decoder's.
_DELEGATING_GET_NORMALIZED_PROBS = (
    BaseFairseqModel.get_normalized_probs,
    TransformerModelBase.get_normalized_probs,
)


def _standard_normalisation(model) -> bool:
    """True when the model's log-probs are exactly ``log_softmax(logits.float())``.

    Then the fused step may normalise the raw decoder output itself.
    """
    dec = getattr(model, "decoder", None)
    if dec is None or getattr(dec, "adaptive_softmax", None) is not None:
        return False
    if getattr(dec, "onnx_trace", False):
        return False
    cls, dcls = type(model), type(dec)
    return (
        cls.get_normalized_probs in _DELEGATING_GET_NORMALIZED_PROBS
        and cls.get_normalized_probs_scriptable is BaseFairseqModel.get_normalized_probs_scriptable
        and dcls.get_normalized_probs is FairseqDecoder.get_normalized_probs
        and dcls.get_normalized_probs_scriptable is FairseqDecoder.get_normalized_probs_scriptable
    )


def _has_fused_layers(model) -> bool:
    layers = getattr(getattr(model, "decoder", None), "layers", None) or ()
    return any(type(layer).__module__.startswith("seqfuse.layers.") for layer in layers)


def _takes_encoder_out_per_source(model) -> bool:
    """seqfuse's fused decoder on its fast path: it takes one encoder output
    row per sentence (no beam copies) with ROWS_PER_SOURCE set."""
    takes = getattr(getattr(model, "decoder", None), "takes_encoder_out_per_source", None)
    return _has_fused_layers(model) and callable(takes) and bool(takes())


def _grow_time(buf: Tensor, need: int, limit: int, zero: bool) -> Tensor:
    """``buf`` with at least ``need`` (at most ``limit``) columns in its last
    dimension, doubling; the columns held are copied."""
    have = buf.size(-1)
    if need <= have:
        return buf
    cols = min(limit, max(need, 2 * have))
    new = (
        buf.new_zeros(buf.shape[:-1] + (cols,)) if zero else buf.new_empty(buf.shape[:-1] + (cols,))
    )
    new[..., :have].copy_(buf)
    return new


def ngram_banned_tokens(tokens: Tensor, step: int, n: int) -> Optional[Tensor]:
    """fairseq's CPU n-gram blocking, as a ``[rows, windows]`` banned-token tensor.

    Stock compares the last ``n - 1`` entries of the whole token buffer
    (``tokens`` is ``[rows, max_len + 2]``) with every window that starts before
    ``step + 2 - n`` and bans the token that followed a match; ``-1`` = none.
    """
    windows = step + 2 - n
    if n < 2 or windows <= 0:
        return None
    last = tokens[:, tokens.size(1) - (n - 1) :]  # [rows, n-1]
    win = tokens[:, : windows + n - 1].unfold(1, n, 1)  # [rows, windows, n]
    match = (win[:, :, : n - 1] == last.unsqueeze(1)).all(-1)
    return torch.where(match, win[:, :, n - 1], torch.full_like(win[:, :, n - 1], -1))


class SequenceGenerator(StockSequenceGenerator):
    """fairseq's ``SequenceGenerator`` with seqfuse's search step (same arguments)."""

    # Options (beyond plain beam search) reproduced exactly; the fairseq plugin
    # sends everything else to stock with a warning.
    SUPPORTED_FEATURES = frozenset(
        {
            "sampling",
            "match_source_len",
            "diverse_beam_groups",
            "diversity_rate",
            "prefix_allowed_tokens_fn",
            "constraints",
            "prefix_tokens",
            "ensemble",
            "lm_fusion",
            "print_alignment",  # by SequenceGeneratorWithAlignment
            "retain_dropout",  # on layers that apply it (the stock ones)
        }
    )

    # Steps between host reads of "all finished?" (and batch compactions);
    # None: 1 on the CPU (stock's exact shapes), 4 on a GPU.
    compact_every: Optional[int] = None

    def _fallback_reason(self, constraints: Optional[Tensor]) -> Optional[str]:
        if _ext.disabled():
            return "SEQFUSE_DISABLE is set"
        if type(self.search) not in _STOCK_STEP_SEARCHES:
            return f"search strategy {type(self.search).__name__} is not supported"
        if self.repeat_ngram_blocker is not None and self.repeat_ngram_blocker.use_extension:
            return "fairseq's CUDA n-gram blocking extension is in use"
        return None

    def _generate(
        self,
        sample,
        prefix_tokens: Optional[Tensor] = None,
        constraints: Optional[Tensor] = None,
        bos_token: Optional[int] = None,
    ):
        reason = self._fallback_reason(constraints)
        if reason is not None:
            if not _ext.disabled():
                _warn_fallback(reason)
            return super()._generate(sample, prefix_tokens, constraints, bos_token)
        if constraints is not None and not self.search.supports_constraints:
            raise NotImplementedError(
                "Target-side constraints were provided, but search method doesn't support them"
            )
        with _ext.gc_paused():
            return self._search(sample, prefix_tokens, bos_token, constraints)

    # ------------------------------------------------------------------ model
    def _decoder_step(self, tokens: Tensor, encoder_outs, incremental_states, fused_logits: bool):
        """One decoder call: ``(logits_or_lprobs [rows, V], is_logprobs, attn)``."""
        model: EnsembleModel = self.model
        if not fused_logits:
            lprobs, attn = model.forward_decoder(
                tokens, encoder_outs, incremental_states, self.temperature
            )
            return lprobs, True, attn
        m = model.single_model
        enc = encoder_outs[0] if model.has_encoder() else None
        if model.has_incremental_states():
            # seqfuse's fused decoder: the whole network in one call when it can
            fast = getattr(m.decoder, "step_logits", None)
            got = fast(tokens, enc, incremental_states[0]) if fast is not None else None
            if got is not None:
                logits, attn = got
                if self.temperature != 1.0:
                    logits = logits / self.temperature
                return logits, False, attn
            out = m.decoder.forward(
                tokens, encoder_out=enc, incremental_state=incremental_states[0]
            )
        else:
            out = m.decoder.forward(tokens, encoder_out=enc)
        attn: Optional[Tensor] = None
        if len(out) > 1 and out[1] is not None:
            if isinstance(out[1], Tensor):
                attn = out[1]
            else:
                holder = out[1]["attn"]
                if isinstance(holder, Tensor):
                    attn = holder
                elif holder is not None:
                    attn = holder[0]
            if attn is not None:
                attn = attn[:, -1, :]
        logits = out[0][:, -1, :]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits, False, attn

    # ------------------------------------------------------------------- step
    def _fused_candidates(self, step, logits, scores, banned, eos_mode, bsz, beam_size):
        """BeamSearch.step's candidates from the fused op, tie-exact.

        The op returns one candidate more than stock keeps. Where two finite
        candidates among those tie, the order torch.topk gives them is an
        artefact of its selection algorithm; those sentences (rare: exact float
        ties) are recomputed with stock's own operations so the choice is
        stock's.
        """
        V = self.vocab_size
        rows = 1 if step == 0 else beam_size
        k = min(2 * beam_size, rows * V - 1)
        src, ban = logits, banned
        if step == 0 and logits.size(0) != bsz:  # all beams decoded: keep the first
            src = logits.view(bsz, beam_size, V)[:, 0]
            ban = None if banned is None else banned.view(bsz, beam_size, -1)[:, 0]
        cum = None if step == 0 else scores[:, step - 1]
        # The tie check reads a flag back; on a GPU (no host reads inside the
        # loop) exact ties keep the op's order: score desc, then lower index.
        check_ties = logits.device.type == "cpu"
        k_op = min(k + 1, rows * V) if check_ties else k
        args = (src, cum, rows, k_op, self.pad, self.unk, self.eos, self.unk_penalty, eos_mode, ban)
        kernel = cpu_kernel_for(src)  # beam_topk's CPU backend, without its per-call checks
        cs, ci, cb = kernel(*args, False) if kernel is not None else beam_topk(*args)
        if check_ties and k_op > 1:
            tie, any_tie = finite_ties(cs)  # rarely any (-inf pairs are no tie)
            if bool(any_tie):
                sents = tie.nonzero().view(-1)
                row_idx = sents.unsqueeze(1) * rows + torch.arange(rows, device=sents.device)
                row_idx = row_idx.view(-1)
                rs, ri, rb = beam_topk_reference(
                    src[row_idx],
                    None if cum is None else cum[row_idx],
                    rows,
                    k,
                    self.pad,
                    self.unk,
                    self.eos,
                    self.unk_penalty,
                    eos_mode,
                    None if ban is None else ban[row_idx],
                )
                cs, ci, cb = cs[:, :k].clone(), ci[:, :k].clone(), cb[:, :k].clone()
                cs[sents], ci[sents], cb[sents] = rs, ri, rb
                return cs, ci, cb
        return cs[:, :k], ci[:, :k], cb[:, :k]

    # ----------------------------------------------------------------- search
    def _search(
        self,
        sample,
        prefix_tokens: Optional[Tensor],
        bos_token: Optional[int],
        constraints: Optional[Tensor] = None,
    ):
        """fairseq's search, with the bookkeeping kept on the device.

        Finished hypotheses are written into preallocated per-sentence buffers
        by tensor ops (no Python list per hypothesis, no host copy), and the
        batch is compacted (finished sentences leave it) every
        ``compact_every`` steps: 1 on the CPU, where host reads are free and
        compacting at exactly stock's steps keeps every matrix shape, hence
        every bit, as stock's; on a GPU the host reads whether to compact or
        stop only every few steps. One copy at the end builds the dicts.
        """
        model: EnsembleModel = self.model
        fused_logits = model.models_size == 1 and _standard_normalisation(model.single_model)
        incremental_states = [
            {ROWS_PER_SOURCE: self.beam_size} if _has_fused_layers(m) else {} for m in model.models
        ]
        net_input = sample["net_input"]
        if "src_tokens" in net_input:
            src_tokens = net_input["src_tokens"]
            if "src_lengths" in net_input:
                src_lengths = net_input["src_lengths"]
            else:
                src_lengths = (src_tokens.ne(self.eos) & src_tokens.ne(self.pad)).long().sum(dim=1)
        elif "source" in net_input or "features" in net_input:
            src_tokens = net_input["source" if "source" in net_input else "features"]
            mask = net_input["padding_mask"]
            src_lengths = (
                mask.size(-1) - mask.sum(-1)
                if mask is not None
                else torch.tensor(src_tokens.size(-1)).to(src_tokens)
            )
        else:
            raise ValueError(
                "expected src_tokens or source in net input. input keys: " + str(net_input.keys())
            )

        bsz, src_len = src_tokens.size()[:2]
        n_sent = bsz
        beam_size = self.beam_size
        V = self.vocab_size
        device = src_tokens.device
        self.search.init_constraints(constraints, beam_size)
        compact_every = self.compact_every
        if compact_every is None:
            compact_every = 1 if device.type == "cpu" else 4

        if self.match_source_len:
            max_len = int(src_lengths.max().item())
        else:
            max_len = min(int(self.max_len_a * src_len + self.max_len_b), self.max_len - 1)
        if self.min_len > max_len:
            raise LengthLimitsError(
                f"min_len ({self.min_len}) cannot be larger than max_len ({max_len}), "
                "please adjust these!"
            )

        encoder_outs = model.forward_encoder(net_input)
        # One encoder output per sentence, kept to rebuild the beam copies from
        # at a compaction (the old copies are freed first, not gathered from).
        source_outs = encoder_outs if beam_size > 1 and model.has_encoder() else None
        # Fused decoders take that one row per sentence as it is.
        per_source = source_outs is not None and all(
            _takes_encoder_out_per_source(m) for m in model.models
        )
        if not per_source:
            new_order = torch.arange(bsz, device=device).repeat_interleave(beam_size)
            encoder_outs = model.reorder_encoder_out(encoder_outs, new_order)
        beam_search = type(self.search) is search.BeamSearch
        # The first step on one row per sentence (see SHARED_FIRST_STEP_ENV):
        # candidates from the fused op, rows that cannot differ.
        shared_first = (
            device.type == "cpu"  # row-independent kernels (a GPU's GEMM may pick by batch)
            and per_source
            and fused_logits
            and beam_search
            and self.lm_model is None
            and prefix_tokens is None
            and model.has_incremental_states()
            and not torch.is_grad_enabled()
            and _ext.env_flag(SHARED_FIRST_STEP_ENV, True)
        )

        long_opts = {"device": device, "dtype": torch.long}
        scores = torch.zeros(bsz * beam_size, max_len + 1, device=device, dtype=torch.float)
        tokens = torch.full((bsz * beam_size, max_len + 2), self.pad, **long_opts)
        tokens[:, 0] = self.eos if bos_token is None else bos_token
        attn: Optional[Tensor] = None
        cands_to_ignore = torch.zeros(bsz, beam_size, device=device, dtype=torch.bool)
        bbsz_offsets = (torch.arange(bsz, device=device) * beam_size).unsqueeze(1)
        beam_arange = torch.arange(beam_size, device=device)
        if "id" in sample and isinstance(sample["id"], Tensor):
            original_batch_idxs = sample["id"]
        else:
            original_batch_idxs = torch.arange(bsz, device=device)
        suppress = self.token_indices_to_suppress
        ngram = self.repeat_ngram_blocker.no_repeat_ngram_size if self.repeat_ngram_blocker else 0

        # Finished hypotheses, by original sentence; slot `beam_size` is a sink
        # for writes that are not taken (keeps every write shape-static).
        sent_ids = torch.arange(bsz, device=device)  # active sentence -> original
        done = torch.zeros(bsz, device=device, dtype=torch.bool)
        n_fin = torch.zeros(n_sent, **long_opts)
        fin_tokens = torch.full((n_sent, beam_size + 1, max_len + 1), self.pad, **long_opts)
        fin_len = torch.zeros(n_sent, beam_size + 1, **long_opts)
        fin_score = torch.zeros(n_sent, beam_size + 1, device=device)
        fin_pos = torch.zeros(n_sent, beam_size + 1, max_len + 1, device=device)
        fin_attn: Optional[Tensor] = None
        reorder_state: Optional[Tensor] = None
        prev_rows: Optional[Tensor] = None  # rows kept by the last compaction

        stop_on_max_len = self.search.stop_on_max_len
        # Search.update_constraints is a no-op: not called per step then.
        update_constraints = (
            None
            if type(self.search).update_constraints is search.Search.update_constraints
            else self.search.update_constraints
        )

        lane = None
        if lane_problem(
            self, model, beam_search, fused_logits, per_source, prefix_tokens, suppress, ngram,
            update_constraints, compact_every, device,
        ) is None:  # fmt: skip
            lane = SearchLane(self, model, incremental_states, max_len)

        step = -1
        while step < max_len:
            step += 1
            resumed = None
            if lane is not None and step < max_len and reorder_state is not None:
                # Steps in C++ while nothing but their arithmetic happens
                # (seqfuse.generation.lane); the loop goes on from where it stops.
                got = lane.run(
                    step, tokens, scores, attn, fin_attn, cands_to_ignore, sent_ids, done, n_fin,
                    src_lengths, original_batch_idxs, reorder_state, prev_rows, fin_tokens,
                    fin_len, fin_score, fin_pos,
                )  # fmt: skip
                if got is not None:
                    (status, step, tokens, scores, attn, fin_attn, cands_to_ignore, sent_ids, done,
                     src_lengths, original_batch_idxs, reorder_state, prev_rows, resumed,
                     compacted) = got  # fmt: skip
                    if compacted:
                        bsz = sent_ids.numel()
                        bbsz_offsets = bbsz_offsets[:bsz]
                        encoder_outs = None
                        encoder_outs = model.reorder_encoder_out(source_outs, sent_ids)
                    if status == LANE_DONE:
                        break
            if resumed is not None:
                out, is_logprobs, avg_attn_scores = resumed[0], False, resumed[1]
            elif reorder_state is not None:
                if prev_rows is not None:
                    reorder_state = prev_rows[reorder_state]
                # The caches first: on a compaction they shrink before the
                # encoder output's copies are rebuilt.
                model.reorder_incremental_state(incremental_states, reorder_state)
                if prev_rows is not None:
                    # Rows of one sentence hold the same encoder output: only
                    # a compaction needs a gather.
                    if source_outs is None:
                        encoder_outs = model.reorder_encoder_out(encoder_outs, prev_rows)
                    else:
                        encoder_outs = None
                        rows = sent_ids if per_source else sent_ids.repeat_interleave(beam_size)
                        encoder_outs = model.reorder_encoder_out(source_outs, rows)

            shared = shared_first and step == 0
            if resumed is None:
                step_tokens = tokens[:, : step + 1]
                if shared:
                    step_tokens = tokens[::beam_size, :1]
                    for state in incremental_states:
                        state[FIRST_STEP_SHARED] = beam_size
                out, is_logprobs, avg_attn_scores = self._decoder_step(
                    step_tokens, encoder_outs, incremental_states, fused_logits
                )
            if shared:
                STATS["shared_first_steps"] += 1
                for state in incremental_states:
                    del state[FIRST_STEP_SHARED]
                if avg_attn_scores is not None:
                    avg_attn_scores = avg_attn_scores.repeat_interleave(beam_size, dim=0)
            prefix_step = (
                prefix_tokens is not None and step < prefix_tokens.size(1) and step < max_len
            )
            fused = beam_search and not is_logprobs and self.lm_model is None and not prefix_step
            # fairseq's edits: max_len, then min_len and suppression unless a
            # prefix token is forced at this step, then n-gram blocking.
            eos_mode = EOS_ALLOW
            if step >= max_len:
                eos_mode = EOS_ONLY
            elif step < self.min_len and not prefix_step:
                eos_mode = EOS_FORBID
            banned = None
            if suppress is not None and not prefix_step:
                banned = suppress.to(device).unsqueeze(0).expand(out.size(0), -1)
            if fused:
                if ngram:
                    grams = ngram_banned_tokens(
                        tokens[::beam_size] if shared else tokens, step, ngram
                    )
                    if grams is not None:
                        banned = grams if banned is None else torch.cat([grams, banned], dim=1)
                cand_scores, cand_indices, cand_beams = self._fused_candidates(
                    step, out, scores, banned, eos_mode, bsz, beam_size
                )
            else:
                lprobs = out if is_logprobs else torch.log_softmax(out, -1, dtype=torch.float32)
                if self.lm_model is not None:
                    lm_out = self.lm_model(tokens[:, : step + 1])
                    probs = self.lm_model.get_normalized_probs(lm_out, log_probs=True, sample=None)
                    lprobs += probs[:, -1, :] * self.lm_weight
                apply_step_edits(
                    lprobs, self.pad, self.unk, self.eos, self.unk_penalty, eos_mode, banned
                )
                if prefix_step:
                    lprobs, tokens, scores = self._prefix_tokens(
                        step, lprobs, scores, tokens, prefix_tokens, beam_size
                    )
                if ngram:  # after the prefix step, which may rewrite `tokens`
                    ban_tokens(lprobs, ngram_banned_tokens(tokens, step, ngram), self.pad)
                if self.should_set_src_lengths:
                    self.search.set_src_lengths(src_lengths)
                cand_scores, cand_indices, cand_beams = self.search.step(
                    step,
                    lprobs.view(bsz, -1, V),
                    scores.view(bsz, beam_size, -1)[:, :, :step],
                    tokens[:, : step + 1],
                    original_batch_idxs,
                )

            if avg_attn_scores is not None:
                if attn is None:
                    cols = min(max_len + 1, ATTN_INITIAL_STEPS)
                    src_cols = avg_attn_scores.size(1)
                    attn = torch.empty(bsz * beam_size, src_cols, cols + 1, device=device)
                    fin_attn = torch.zeros(n_sent, beam_size + 1, src_cols, cols, device=device)
                attn = _grow_time(attn, step + 2, max_len + 2, zero=False)
                attn[:, :, step + 1].copy_(avg_attn_scores)
            # This step's [rows, vocab] scores are spent: free them before the
            # next step's reorders and decoder call instead of after.
            out = lprobs = avg_attn_scores = None

            # Finalise: EOS among the first `beam` candidates of unfinished
            # sentences, in candidate order, while the sentence has room.
            cand_bbsz_idx, eos_mask, take, rank, sent_n_fin, any_taken = finished_candidates(
                cand_scores, cand_indices, cand_beams, cands_to_ignore, done, n_fin, sent_ids,
                self.eos,
            )  # fmt: skip
            # On the CPU host reads are free: skip the bookkeeping on steps
            # where no hypothesis ends (no sentence can finish on those).
            taken = device.type != "cpu" or bool(any_taken)
            if taken:
                if fin_attn is not None:
                    fin_attn = _grow_time(fin_attn, step + 1, max_len + 1, zero=True)
                self._finalize(
                    step, take, rank, cand_bbsz_idx, cand_scores, tokens, scores, attn,
                    src_lengths, sent_ids, fin_tokens, fin_len, fin_score, fin_pos, fin_attn,
                )  # fmt: skip
                sent_n_fin = sent_n_fin + take.sum(1)
                n_fin[sent_ids] = sent_n_fin
                done = done | (sent_n_fin == beam_size)
            if step >= max_len:
                # Stock counts a sentence finished at max_len when it ends a
                # hypothesis there, and asserts when one ends none (a search
                # that does not stop at max_len, such as lexical constraints,
                # can leave only -inf candidates): its error, not a partial
                # result.
                ending = (done | take.any(1)) if taken else done
                if not stop_on_max_len and not bool(ending.all()):
                    raise AssertionError(
                        f"{step} < {max_len} (sentences unfinished at max_len; stock's "
                        "generator fails the same check)"
                    )
                done = torch.ones_like(done)

            stop_now = stop_on_max_len and step >= max_len
            if step >= max_len or stop_now or (taken and (step + 1) % compact_every == 0):
                if bool(done.all()) or stop_now:
                    break
                keep = (~done).nonzero().view(-1)
                compact = keep.numel() < bsz
            else:
                compact = False

            if compact:
                new_bsz = keep.numel()
                self.search.prune_sentences(keep)
                prev_rows = (keep.unsqueeze(1) * beam_size + beam_arange).view(-1)
                eos_mask = eos_mask[keep]
                cand_beams = cand_beams[keep]
                bbsz_offsets = bbsz_offsets[:new_bsz]
                cand_bbsz_idx = cand_beams.add(bbsz_offsets)
                cand_scores = cand_scores[keep]
                cand_indices = cand_indices[keep]
                if prefix_tokens is not None:
                    prefix_tokens = prefix_tokens[keep]
                src_lengths = src_lengths[keep]
                cands_to_ignore = cands_to_ignore[keep]
                original_batch_idxs = original_batch_idxs[keep]
                sent_ids = sent_ids[keep]
                done = done[keep]
                scores = scores[prev_rows]
                tokens = tokens[prev_rows]
                if attn is not None:
                    attn = attn[prev_rows]
                bsz = new_bsz
            else:
                prev_rows = None

            active_bbsz_idx, active_hypos, cands_to_ignore = select_active(
                eos_mask, cands_to_ignore, cand_bbsz_idx, cand_indices, cand_scores,
                tokens, scores, attn, step,
            )  # fmt: skip
            if update_constraints is not None:
                update_constraints(active_hypos)
            reorder_state = active_bbsz_idx

        return self._collect(n_fin, fin_tokens, fin_len, fin_score, fin_pos, fin_attn)

    def _finalize(
        self, step, take, rank, cand_bbsz_idx, cand_scores, tokens, scores, attn, src_lengths,
        sent_ids, fin_tokens, fin_len, fin_score, fin_pos, fin_attn,
    ):  # fmt: skip
        """Write the EOS hypotheses selected by ``take`` ([bsz, beam]) into the
        per-sentence buffers at ``rank``, as fairseq's finalize_hypos builds them."""
        divisor = (step + 1) ** self.len_penalty if self.normalize_scores else None
        finalize_hypos(
            step, take, rank, cand_bbsz_idx, cand_scores, tokens, scores, attn, src_lengths,
            sent_ids, fin_tokens, fin_len, fin_score, fin_pos, fin_attn, self.eos, divisor,
            self.match_source_len,
        )  # fmt: skip

    def _collect(self, n_fin, fin_tokens, fin_len, fin_score, fin_pos, fin_attn):
        """fairseq's hypothesis dicts, best score first (stock's sort)."""
        counts = n_fin.tolist()
        lengths = fin_len.tolist()
        host_scores = fin_score.tolist()
        empty = torch.empty(0)
        # Every slot's views made by one call each, then cut to length.
        slots = fin_score.size(1)
        tok_rows = fin_tokens.reshape(-1, fin_tokens.size(2)).unbind(0)
        pos_rows = fin_pos.reshape(-1, fin_pos.size(2)).unbind(0)
        score_items = fin_score.reshape(-1).unbind(0)
        attn_rows = (
            None if fin_attn is None else fin_attn.reshape(-1, *fin_attn.shape[2:]).unbind(0)
        )
        finalized: list[list[dict]] = []
        for s, n in enumerate(counts):
            hypos = []
            for j in range(n):
                L = lengths[s][j]
                i = s * slots + j
                hypos.append(
                    {
                        "tokens": tok_rows[i][:L],
                        "score": score_items[i],
                        "attention": empty if attn_rows is None else attn_rows[i][:, :L],
                        "alignment": empty,
                        "positional_scores": pos_rows[i][:L],
                    }
                )
            finalized.append([hypos[i] for i in _descending_order(host_scores[s][:n])])
        return finalized


def _descending_order(values: list[float]) -> list[int]:
    """The order stock's ``torch.sort(torch.tensor(values), descending=True)``
    gives. Distinct values (no NaN) have one descending order, which Python's
    sort finds without a tensor; ties and NaN keep torch's own."""
    if len(values) < 2:
        return list(range(len(values)))
    if len(set(values)) == len(values) and all(v == v for v in values):
        return sorted(range(len(values)), key=values.__getitem__, reverse=True)
    _, order = torch.sort(torch.tensor(values), descending=True)
    return order.tolist()


class SequenceGeneratorWithAlignment(SequenceGenerator):
    """fairseq's ``SequenceGeneratorWithAlignment`` (``--print-alignment hard``
    or ``soft``) on seqfuse's search: same constructor and results.

    The alignment of a hypothesis comes from the attention its search kept
    (the decoder's alignment layer, averaged over heads), which seqfuse's
    search reproduces; a model with ``full_context_alignment`` gets it from a
    teacher-forced forward pass of the whole hypothesis, as stock does.
    """

    def __init__(self, models, tgt_dict, left_pad_target=False, print_alignment="hard", **kwargs):
        super().__init__(EnsembleModelWithAlignment(models), tgt_dict, **kwargs)
        self.left_pad_target = left_pad_target
        if print_alignment == "hard":
            self.extract_alignment = fairseq_utils.extract_hard_alignment
        elif print_alignment == "soft":
            self.extract_alignment = fairseq_utils.extract_soft_alignment
        else:
            raise ValueError(f"print_alignment must be 'hard' or 'soft', not {print_alignment!r}")

    # Stock's batch of the hypotheses for a teacher-forced pass (the method
    # only reads the sample, the hypotheses and the generator's settings).
    _prepare_batch_for_alignment = StockSequenceGeneratorWithAlignment._prepare_batch_for_alignment

    @torch.no_grad()
    def generate(self, models, sample, **kwargs):
        finalized = self._generate(sample, **kwargs)
        beam = self.beam_size
        rows = sample["net_input"]["src_tokens"].size(0) * beam
        if any(len(hypos) != beam for hypos in finalized):
            raise RuntimeError(
                "seqfuse: a sentence finished with other than --beam hypotheses; "
                "alignments need one per beam"
            )
        src, src_lengths, prev_output, tgt = self._prepare_batch_for_alignment(sample, finalized)
        if any(getattr(m, "full_context_alignment", False) for m in self.model.models):
            attn = self.model.forward_align(src, src_lengths, prev_output)
        else:
            attn = [
                finalized[i // beam][i % beam]["attention"].transpose(1, 0) for i in range(rows)
            ]
        src, tgt = src.cpu(), tgt.cpu()
        for i in range(rows):
            finalized[i // beam][i % beam]["alignment"] = self.extract_alignment(
                attn[i].cpu(), src[i], tgt[i], self.pad, self.eos
            )
        return finalized
