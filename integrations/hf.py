"""Hugging Face integration: ``seqfuse.optimize(model)``.

``optimize`` swaps the model's class for a subclass (same name, same module,
``isinstance`` unchanged, ``save_pretrained`` writes the same config) whose
beam search is seqfuse's. ``model.generate(...)`` is called exactly as before
and returns the same tokens and the same scores as Hugging Face's own
``_beam_search``: the loop is that method's, step for step, and reuses its
small per-step helpers (running beams, finished beams, early-stop heuristic).
What changes is the expensive part of a step:

- the next-token candidates come from the fused ``beam_topk`` op
  (normaliser, token bans, score accumulation and the top-k in one pass,
  hierarchical pruning, no ``[batch * beams, vocab]`` log-prob tensor; on a
  GPU the log-probs are torch's, the rest is fused, so the bits stay stock's) when
  every active logits processor is one whose effect is a token ban
  (``bad_words_ids`` of single tokens, ``min_length``, ``min_new_tokens``,
  ``suppress_tokens``, ``begin_suppress_tokens``, ``forced_bos_token_id`` and
  ``forced_eos_token_id`` away from their step). Other processors, requested
  per-step scores, non-finite logits and the forced-token steps run stock's
  own operations for that step;
- exact float ties among the candidates are re-ranked with stock's own ops
  (``torch.topk``'s order among equal values is an artefact of its algorithm);
- the cross-attention cache is not re-gathered each step when the beams of a
  sentence hold identical copies of it (checked once, after the first step):
  the reorder keeps every row inside its sentence, so it would copy equal
  values onto equal values;
- with ``fused_layers=True``, a sentence whose result can no longer change
  (closed by the early-stop heuristic, its finished set out of reach of the
  penalised candidates) leaves the batch: its rows are no longer decoded,
  where stock decodes every sentence until the last one is done
  (``SEQFUSE_HF_DROP_FINISHED=0`` keeps them; the exact mode always does);
- with a one-call decoder step, the beam reorder of the self-attention cache
  waits for the next step, which gathers the history in the new order with
  its new K/V in one copy (``hf_exact_step.defer_reorder``; stock copies the
  history twice: the reorder, then the cache update's cat);
  ``SEQFUSE_HF_DEFER_REORDER=0`` reorders at once;
- with ``fused_layers=True``, the first forward, whose input generate copies
  to every beam's row (a decoder-only model's prompt; an encoder-decoder's
  start token and encoder output), runs once per sentence, its cache and
  last logits repeated for the beams (``SEQFUSE_HF_SHARED_PREFILL=0`` runs it
  on every row, as stock does);
- the stopping criteria Hugging Face builds by default (max length, EOS) are
  evaluated on the new tokens instead of on gathered sequences, and the
  per-step gathers of the running and finished sequences cover the columns
  written so far, not ``max_length`` (the rest hold the fill value in every
  row, in stock's tensors as in these).

Anything else runs Hugging Face's own loop after one warning line naming the
reason: beam sampling, ``synced_gpus``, a transformers version whose beam
search this module does not mirror. Sampling (``num_beams=1``) and greedy
search are Hugging Face's loop (one line says so), except greedy search with
fused layers, which runs ``greedy_search``: Hugging Face's steps, and a
sequence that has ended leaves the batch; and greedy search in the exact mode
on a model whose decoding steps can be direct (``integrations.hf_direct``),
which runs ``greedy_search`` with every row kept and the steps direct.
``SEQFUSE_DISABLE=1`` runs stock without a warning. The weights are
untouched; the decoder of a BART-family model also runs the exact one-call
step (``integrations.hf_exact_step``: transformers' own tensor ops, issued
from C++, bit-identical), and ``fused_layers=True`` puts the linear layers on
seqfuse's packed-weight GEMM (``integrations.hf_fused``, within 1e-5).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import Tensor, nn

from seqfuse import _ext
from seqfuse.ops.beam_topk import EOS_ALLOW, beam_topk, beam_topk_reference, cpu_kernel_for
from seqfuse.source_shape import shape_of

logger = logging.getLogger("seqfuse.hf")

FALLBACK_PREFIX = "seqfuse: running Hugging Face's own generate loop: "
_warned: set[str] = set()

# What the search did, for users and tests: steps through the fused op (of
# which those reading the LM head's group maxima), steps through stock's ops,
# sentences re-ranked for exact ties, searches that kept the cross-attention
# cache in place.
STATS = {
    "fused_steps": 0,
    "maxima_steps": 0,
    "stock_steps": 0,
    "tie_reranks": 0,
    "cross_cache_kept": 0,
    "sentences_dropped": 0,
    "shared_prefills": 0,
    "advanced_steps": 0,
    "greedy_bans": 0,
}

# With fused layers, a sentence whose result the search can no longer change
# leaves the batch (its rows are no longer decoded); "0" keeps every row to
# the end, as stock does.
DROP_FINISHED_ENV = "SEQFUSE_HF_DROP_FINISHED"

# With fused layers, the first forward (whose input generate expands to
# num_beams identical rows per sentence: a decoder-only model's prompt, an
# encoder-decoder's start token and encoder output) runs once per sentence,
# its cache and logits then repeated for the beams (_prefill); "0" runs it on
# every row, as stock does.
SHARED_PREFILL_ENV = "SEQFUSE_HF_SHARED_PREFILL"
# A beam reorder of the self-attention cache waits for the next one-call
# decoder step, which gathers the history with its new K/V in one copy
# (integrations.hf_exact_step.defer_reorder); "0" reorders at once, as stock.
DEFER_REORDER_ENV = "SEQFUSE_HF_DEFER_REORDER"
# The model_kwargs the shared prefill takes: per-row tensors (one row per
# sentence is kept), and the rest (passed as they are).
_PREFILL_ROWS = ("attention_mask", "position_ids", "token_type_ids")
_PREFILL_OTHERS = frozenset({"past_key_values", "use_cache", "logits_to_keep", "cache_position"})

# The helpers of GenerationMixin this module's loop calls (transformers 5.x).
_HELPERS = (
    "_prefill",
    "_update_model_kwargs_for_generation",
    "prepare_inputs_for_generation",
    "_get_running_beams_for_next_iteration",
    "_update_finished_beams",
    "_check_early_stop_heuristic",
    "_beam_search_has_unfinished_sequences",
    "_flatten_beam_dim",
    "_unflatten_beam_dim",
    "_gather_beams",
)

# The step's bookkeeping after its top-k (the running and finished beams'
# update, the buffers' copies, the early-stop test) runs as one C++ call
# (hf_beam_advance, csrc/hf_beam.cpp: these helpers' operations, in their
# order) where the helpers' source has these shapes (seqfuse.source_shape;
# the same in transformers 5.17 and 5.23) and neither the model's class nor
# the instance replaces them; "0" calls the helpers.
BEAM_ADVANCE_ENV = "SEQFUSE_HF_BEAM_ADVANCE"
_ADVANCE_SHAPES = {
    "_gather_beams": "45bd6fac7c26d7b3",
    "_flatten_beam_dim": "46c83d3dc5cfb0ff",
    "_get_running_beams_for_next_iteration": "5d656da22feae51f",
    "_update_finished_beams": "51bd13068b66eeb0",
    "_check_early_stop_heuristic": "1047bcc57f74d0f6",
    "_beam_search_has_unfinished_sequences": "2ee04f4c6bcb221f",
}


def _debug_once(line: str) -> None:
    if line not in _noted:
        _noted.add(line)
        logger.debug("%s", line)


_noted: set[str] = set()


def _warn(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("%s%s", FALLBACK_PREFIX, reason)


# ----------------------------------------------------------------- optimize
_PATCHED: dict[type, type] = {}


def optimize(model, *, fused_layers: bool | None = None):
    """Patch ``model`` in place so ``model.generate`` runs seqfuse's beam search.

    Returns the same model object (a ``transformers.Pipeline`` is accepted too:
    its model is patched). Idempotent; ``restore(model)`` undoes it.

    With ``fused_layers=True`` (default: the ``SEQFUSE_FUSED_LAYERS``
    environment variable, off) every ``nn.Linear`` also runs seqfuse's
    packed-weight GEMM (``integrations.hf_fused``): faster on the CPU, outputs
    within 1e-5 of stock's rather than bit for bit. Either way BART-family,
    T5, GPT-2, Llama, Qwen2 and Mistral decoders get the one-call decoder step
    (``integrations.hf_exact_step``, ``hf_t5_step``, ``hf_gpt2_step``,
    ``hf_llama_step``): bit-identical to stock without fused layers.

    A model without ``generate`` (an encoder-only model) is returned with
    only its fused layers when asked for them, else unchanged after one
    warning line; anything that is not a Hugging Face model raises TypeError.
    """
    try:
        from transformers import Pipeline, PreTrainedModel
        from transformers.generation.utils import GenerationMixin
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise TypeError(f"seqfuse.optimize needs transformers: {err}") from None
    if isinstance(model, Pipeline):  # a pipeline: its model, the pipeline returned
        optimize(model.model, fused_layers=fused_layers)
        return model
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"seqfuse.optimize expects a Hugging Face PreTrainedModel, got {type(model).__name__}"
        )
    if fused_layers is None:
        fused_layers = _ext.env_flag(_ext.FUSED_LAYERS_ENV, False)
    fused_layers = bool(fused_layers) and not _ext.disabled()
    if fused_layers:
        from integrations import hf_fused

        n = hf_fused.enable(model)
        logger.debug("seqfuse: %d linear layers on the packed-weight GEMM", n)
    if not isinstance(model, GenerationMixin) or not model.can_generate():
        if not fused_layers:
            # Encoder-only models (BERT & co.): their forward has an exact
            # fused path only for the asking (fused_layers=True).
            _warn(
                f"{type(model).__name__} has no generate() (an encoder-only model): its forward "
                "runs unchanged (fused_layers=True runs its linear layers on seqfuse's GEMM)"
            )
        return model
    base = type(model)
    if getattr(base, "_seqfuse_patched", False):
        return model
    missing = [h for h in _HELPERS if not hasattr(base, h)]
    if missing:
        _warn(
            f"this transformers version has no {', '.join(missing)}: its beam search is not "
            "the one seqfuse mirrors"
        )
        return model
    model.__class__ = _patched_class(base)
    if _ext.env_flag(_ext.EXACT_STEP_ENV, True) and not _ext.disabled():
        # (with fused layers the one-call step runs their packed GEMMs)
        from integrations import (
            hf_exact_step,
            hf_fsmt_step,
            hf_gpt2_step,
            hf_llama_step,
            hf_t5_step,
        )

        if hf_gpt2_step._transformer(model) is not None:
            step = hf_gpt2_step
        elif hf_t5_step.is_t5(model):
            step = hf_t5_step
        elif hf_llama_step.is_llama(model):
            step = hf_llama_step
        elif hf_fsmt_step.is_fsmt(model):
            step = hf_fsmt_step
        else:
            step = hf_exact_step
        why = step.enable(model)
        if why is not None:  # the stock layers run: exact either way
            logger.debug("seqfuse: exact decoder step not used: %s", why)
    return model


def restore(model):
    """Undo ``optimize``: the model's classes are its own again."""
    from integrations import (
        hf_exact_step,
        hf_fsmt_step,
        hf_fused,
        hf_gpt2_step,
        hf_llama_step,
        hf_t5_step,
    )

    try:
        from transformers import Pipeline
    except ImportError:  # pragma: no cover
        Pipeline = ()
    if isinstance(model, Pipeline):
        restore(model.model)
        return model
    if isinstance(model, nn.Module):
        hf_fused.disable(model)
    base = getattr(type(model), "_seqfuse_base", None)
    if base is not None:
        hf_exact_step.disable(model)
        hf_gpt2_step.disable(model)
        hf_t5_step.disable(model)
        hf_llama_step.disable(model)
        hf_fsmt_step.disable(model)
        model.__class__ = base
    return model


def is_optimized(model) -> bool:
    return bool(getattr(type(model), "_seqfuse_patched", False))


def _patched_class(base: type) -> type:
    cls = _PATCHED.get(base)
    if cls is None:
        cls = type(
            base.__name__,
            (_SeqfuseGeneration, base),
            {
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "_seqfuse_patched": True,
                "_seqfuse_base": base,
            },
        )
        _PATCHED[base] = cls
    return cls


class _SeqfuseGeneration:
    """The overrides ``optimize`` puts in front of the model's own class."""

    def _beam_search(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        **model_kwargs,
    ):
        reason = None if _ext.disabled() else _unsupported(generation_config, synced_gpus)
        if _ext.disabled() or reason is not None:
            if reason is not None:
                _warn(reason)
            return super()._beam_search(
                input_ids,
                logits_processor=logits_processor,
                stopping_criteria=stopping_criteria,
                generation_config=generation_config,
                synced_gpus=synced_gpus,
                **model_kwargs,
            )
        with _ext.gc_paused():
            try:
                return beam_search(
                    self,
                    input_ids,
                    logits_processor,
                    stopping_criteria,
                    generation_config,
                    **model_kwargs,
                )
            finally:  # a reorder deferred to a step that will not come
                from integrations import hf_exact_step

                hf_exact_step.flush_reorder(model_kwargs.get("past_key_values"))

    def _sample(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ):
        if not _ext.disabled():
            why = _why_stock_sample(
                self,
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus,
                streamer,
                model_kwargs,
            )
            if why is None:
                from integrations import hf_exact_step

                # (K/V appended in place: K/V rooms, greedy steps only; beam
                # search's steps reorder, see hf_exact_step.kv_rooms)
                cache = model_kwargs.get("past_key_values")
                hf_exact_step.arm_rooms(cache)
                try:
                    with _ext.gc_paused():
                        return greedy_search(
                            self,
                            input_ids,
                            logits_processor,
                            stopping_criteria,
                            generation_config,
                            **model_kwargs,
                        )
                finally:
                    hf_exact_step.release_rooms(cache)
            _warn(f"num_beams=1 ({why}); the model's layers keep seqfuse's step and kernels")
        return super()._sample(
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )


def _unsupported(gc, synced_gpus: bool) -> str | None:
    if synced_gpus:
        return "synced_gpus=True"
    if gc.do_sample:
        return "beam sampling (do_sample=True with num_beams > 1)"
    if getattr(gc, "low_memory", False):
        return "low_memory=True"
    return None


# ------------------------------------------------------------ step planning
class _StepPlan:
    """Which logits processors reduce to token bans, and the bans of a step.

    ``bans(cur_len)`` returns the sorted token ids banned at a step with
    ``cur_len`` tokens in the running sequences, or None when a processor
    does something else at that step (then the step runs stock's ops).
    """

    def __init__(self, processors, vocab: int):
        from transformers.generation import logits_process as lp

        self.vocab = vocab
        self.generic_reason: str | None = None
        self.static: set[int] = set()
        self.rules = []  # callables cur_len -> (generic: bool, ids: list[int])
        for p in processors:
            t = type(p)
            if t is lp.NoBadWordsLogitsProcessor:
                seqs = list(p.sequence_bias.keys())
                if any(len(s) != 1 for s in seqs) or any(s[0] >= vocab for s in seqs):
                    self.generic_reason = "bad_words_ids with multi-token or out-of-range entries"
                    continue
                self.static.update(int(s[0]) for s in seqs)
            elif t is lp.MinLengthLogitsProcessor:
                ids, m = _ids(p.eos_token_id), p.min_length
                self.rules.append(lambda n, ids=ids, m=m: (False, ids if n < m else ()))
            elif t is lp.MinNewTokensLengthLogitsProcessor:
                ids, skip, m = _ids(p.eos_token_id), p.prompt_length_to_skip, p.min_new_tokens
                self.rules.append(
                    lambda n, ids=ids, skip=skip, m=m: (False, ids if n - skip < m else ())
                )
            elif t is lp.SuppressTokensLogitsProcessor:
                self.static.update(_ids(p.suppress_tokens))
            elif t is lp.SuppressTokensAtBeginLogitsProcessor:
                self.rules.append(
                    lambda n, p=p: (
                        False,
                        _ids(p.begin_suppress_tokens) if n == p.begin_index else (),
                    )
                )
            elif t is lp.ForcedBOSTokenLogitsProcessor:
                self.rules.append(lambda n: (n == 1, ()))
            elif t is lp.ForcedEOSTokenLogitsProcessor:
                self.rules.append(lambda n, m=p.max_length: (n == m - 1, ()))
            else:
                self.generic_reason = f"logits processor {t.__name__}"
        self._cache: dict[tuple, Tensor] = {}

    def bans(self, cur_len: int, rows: int, device) -> tuple[bool, Tensor | None]:
        """(fused, banned [rows, nb] or None) for a step."""
        if self.generic_reason is not None:
            return False, None
        ids = set(self.static)
        for rule in self.rules:
            generic, extra = rule(cur_len)
            if generic:
                return False, None
            ids.update(extra)
        ids = tuple(sorted(i for i in ids if 0 <= i < self.vocab))
        if not ids:
            return True, None
        key = (ids, rows, device)
        t = self._cache.get(key)
        if t is None:
            t = torch.tensor(ids, dtype=torch.long, device=device).expand(rows, len(ids))
            t = self._cache[key] = t.contiguous()
        return True, t


def _ids(x) -> list[int]:
    if isinstance(x, Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, int):
        return [x]
    return [int(v) for v in x]


def _stop_plan(stopping_criteria, device):
    """For the default criteria (max length, EOS): (max-length criteria, EOS ids
    tensor or None); None when another criterion needs the gathered sequences."""
    from transformers.generation import stopping_criteria as sc

    max_crit, eos = [], []
    for c in stopping_criteria:
        if type(c) is sc.MaxLengthCriteria:
            max_crit.append(c)
        elif type(c) is sc.EosTokenCriteria:
            eos.extend(_ids(c.eos_token_id))
        else:
            return None
    eos_t = torch.tensor(sorted(set(eos)), dtype=torch.long, device=device) if eos else None
    return max_crit, eos_t


def _cross_cache_shared(cache, batch: int, num_beams: int) -> bool:
    """True when every cross-attention layer of an encoder-decoder cache holds,
    for each sentence, the same keys and values in all of its beams."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

    if type(cache) is not EncoderDecoderCache or num_beams == 1:
        return False
    cross = cache.cross_attention_cache
    if type(cross) is not DynamicCache or type(cache.self_attention_cache) is not DynamicCache:
        return False
    if not cross.layers:
        return False
    for layer in cross.layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            return False
        for t in (layer.keys, layer.values):
            if t is None or t.dim() < 1 or t.size(0) != batch * num_beams:
                return False
            v = t.reshape(batch, num_beams, -1)
            if not torch.equal(v, v[:, :1].expand_as(v)):
                return False
    return True


# ----------------------------------------------- finished sentences' rows
# Stock decodes every sentence's beams until the last sentence is done. Once
# the early-stop heuristic has closed a sentence, its new candidates get two
# -1e9 penalties and can no longer enter its finished set: what it returns is
# fixed, and decoding its rows is wasted work. With fused layers seqfuse drops
# those rows. The other rows' values can change in their last bits (torch's
# CPU attention does not compute a row independently of the batch size: about
# 1e-7 here), inside the fused mode's 1e-5; the exact mode keeps every row, as
# stock does, to keep stock's bits.
_ROW_KWARGS = ("attention_mask", "decoder_attention_mask", "position_ids", "token_type_ids")
_SCALAR_KWARGS = ("use_cache", "logits_to_keep", "cache_position")

# Processors whose effect on a row reads only that row and the step.
_ROW_WISE_PROCESSORS = (
    "NoBadWordsLogitsProcessor",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "SuppressTokensLogitsProcessor",
    "SuppressTokensAtBeginLogitsProcessor",
    "ForcedBOSTokenLogitsProcessor",
    "ForcedEOSTokenLogitsProcessor",
    "NoRepeatNGramLogitsProcessor",
)
# (RepetitionPenaltyLogitsProcessor is not one: it can hold a per-row prompt
# length, sized by the batch.)

_PROCESSORS_MODULE = "transformers.generation.logits_process"


def _why_not_row_wise(processors) -> str | None:
    """None when every logits processor reads only its own row and the step
    (finished rows can then leave the batch); otherwise the first that does not."""
    for p in processors:
        if type(p).__module__ != _PROCESSORS_MODULE or type(p).__name__ not in _ROW_WISE_PROCESSORS:
            return f"logits processor {type(p).__name__}"
    return None


# torch.ops.seqfuse.hf_sentences_to_keep, or None (an extension without it);
# tests swap it for None to run the ATen form.
_KEEP_OP: list = [getattr(torch.ops.seqfuse, "hf_sentences_to_keep", None) if _ext._C else None]


def _sentences_to_keep(early_stop_unsat: Tensor, finished: Tensor, scores: Tensor):
    """Indices of the sentences to keep decoding, or None when none can leave.

    A sentence leaves when the heuristic has closed it and every slot of its
    finished set holds a finite score above -1e8, in strictly decreasing order:
    its later candidates score below -1e9, so stock's merge keeps exactly
    these hypotheses in this order (no tie for ``torch.topk`` to reorder).
    On the CPU, one call (``hf_sentences_to_keep``: the same comparisons)."""
    if (
        scores.device.type == "cpu"
        and scores.dtype == torch.float32
        and _KEEP_OP[0] is not None
        and finished.device.type == "cpu"
        and early_stop_unsat.device.type == "cpu"
    ):
        any_inert, keep = _KEEP_OP[0](early_stop_unsat, finished, scores)
        return keep if any_inert else None
    inert = ~early_stop_unsat.view(-1) & finished.all(dim=1)
    inert &= torch.isfinite(scores).all(dim=1) & (scores.amin(dim=1) > -1e8)
    if scores.size(1) > 1:
        inert &= (scores[:, :-1] > scores[:, 1:]).all(dim=1)
    if not bool(inert.any()):
        return None
    return (~inert).nonzero().view(-1)


def _why_not_drop_finished(
    model, return_dict, processors, stop_plan, model_kwargs, rows: int
) -> str | None:
    """None when finished sentences' rows can leave the batch; otherwise why
    they stay."""
    if return_dict:
        return "return_dict_in_generate=True (the returned cache covers every sentence)"
    if stop_plan is None:
        return "a stopping criterion other than max length and EOS"
    why = _why_not_row_wise(processors)
    if why is not None:
        return why
    return _why_rows_stay(model, model_kwargs, rows)


def _why_rows_stay(model, model_kwargs, rows: int) -> str | None:
    """The model's side of ``_why_not_drop_finished``: fused layers, dynamic
    caches and generate arguments whose per-row tensors can follow the rows."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache
    from transformers.generation.utils import ALL_CACHE_NAMES

    if hasattr(model, "_reorder_cache"):
        return "the model reorders its own cache"
    from integrations import hf_fused

    if not hf_fused.enabled(model):
        return "exact mode (fused_layers=False): every row is kept, as stock keeps them"
    for key, value in model_kwargs.items():
        if key in ALL_CACHE_NAMES:
            parts = (
                [value.self_attention_cache, value.cross_attention_cache]
                if type(value) is EncoderDecoderCache
                else [value]
            )
            for c in parts:
                if type(c) is not DynamicCache or any(
                    type(x) is not DynamicLayer for x in c.layers
                ):
                    return f"cache {type(c).__name__}"
        elif key == "encoder_outputs":
            for name, t in value.items():
                if not isinstance(t, Tensor) or t.dim() == 0 or t.size(0) != rows:
                    return f"encoder output {name!r}"
        elif key in _ROW_KWARGS:
            if value is not None and (not isinstance(value, Tensor) or value.size(0) != rows):
                return f"generate argument {key!r}"
        elif key not in _SCALAR_KWARGS and value is not None:
            return f"generate argument {key!r}"
    return None


def _padding_vanishes(model_kwargs: dict, rows: Tensor) -> bool:
    """Whether a padded attention mask would have no padding left in ``rows``:
    transformers then drops the mask (causal or no mask instead) and runs
    another attention path, so no row leaves at that step."""
    for key in ("attention_mask", "decoder_attention_mask"):
        mask = model_kwargs.get(key)
        if mask is not None and not bool(mask.all()) and bool(mask.index_select(0, rows).all()):
            return True
    return False


def _select_row_kwargs(model_kwargs: dict, rows: Tensor) -> None:
    """Keep ``rows`` of the per-row generate arguments (the cache is reordered apart)."""
    for key in _ROW_KWARGS:
        value = model_kwargs.get(key)
        if value is not None:
            model_kwargs[key] = value.index_select(0, rows)
    enc = model_kwargs.get("encoder_outputs")
    if enc is not None:
        for name, t in list(enc.items()):
            enc[name] = t.index_select(0, rows)


# ------------------------------------------------------------ greedy search
# The helpers of GenerationMixin greedy_search calls (transformers 5.x).
_GREEDY_HELPERS = (
    "_prefill",
    "_optimize_model_for_decode",
    "_valid_auto_compile_criteria",
    "_update_model_kwargs_for_generation",
    "prepare_inputs_for_generation",
)


def _why_stock_sample(
    model, input_ids, processors, stopping_criteria, gc, synced_gpus, streamer, model_kwargs
) -> str | None:
    """None when ``greedy_search`` runs this ``_sample`` call (greedy search
    with fused layers, where finished sequences can leave the batch; in the
    exact mode, where every row stays, for a model whose steps can be direct,
    integrations.hf_direct); otherwise why Hugging Face's loop runs it."""
    from integrations import hf_direct, hf_fused

    if gc.do_sample:
        return "sampling"
    if not hf_fused.enabled(model) and hf_direct.problem(model) is not None:
        return "greedy search"
    missing = [h for h in _GREEDY_HELPERS if not hasattr(model, h)]
    if missing:
        return f"greedy search on a transformers without {', '.join(missing)}"
    if gc.return_dict_in_generate or streamer is not None or synced_gpus:
        return "greedy search with return_dict_in_generate, a streamer or synced_gpus"
    if input_ids.device.type != "cpu" or getattr(gc, "is_assistant", False):
        return "greedy search off the CPU or as an assistant model"
    stop_plan = _stop_plan(stopping_criteria, input_ids.device)
    if stop_plan is None or stop_plan[1] is None or gc._pad_token_tensor is None:
        return "greedy search without the default EOS criterion and a pad token"
    why = _why_not_row_wise(processors)
    if why is not None:
        return f"greedy search with {why}"
    if model._valid_auto_compile_criteria(model_kwargs, gc):
        return "greedy search with a compiled forward"
    return None


def greedy_search(model, input_ids, logits_processor, stopping_criteria, gc, **model_kwargs):
    """Hugging Face's ``_sample`` (transformers 5.x) for greedy search without
    per-step outputs, streamer or compiled forward: the same steps, and
    sequences that have finished leave the batch (stock keeps decoding them,
    appending the pad token, until every sequence is done); the result gets
    the same pad columns."""
    from transformers.generation.utils import ALL_CACHE_NAMES

    device = input_ids.device
    pad = gc._pad_token_tensor.to(device)
    batch = input_ids.shape[0]
    unfinished = torch.ones(batch, dtype=torch.long, device=device)
    drop_ok: bool | None = None if _ext.env_flag(DROP_FINISHED_ENV, True) else False
    row_ids = None  # each kept row's row in the batch (None: all, in order)
    left = []  # (rows in the batch, their sequences) of the rows that left
    outputs = model._prefill(input_ids, gc, model_kwargs, is_first_iteration=True)
    raw = outputs.logits
    steps = _DecodingSteps(model)
    plan = _StepPlan(logits_processor, raw.shape[-1])
    first = True
    with model._optimize_model_for_decode():
        while True:
            if not first:
                outputs, raw = steps(input_ids, model_kwargs)
            first = False
            model_kwargs = model._update_model_kwargs_for_generation(
                outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder
            )
            logits = raw[:, -1].to(copy=True, dtype=torch.float32, device=device)
            outputs = raw = None  # (the step's outputs are not held through the next)
            tokens = _greedy_tokens(plan, logits_processor, input_ids, logits)
            tokens = tokens * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
            if unfinished.max() == 0:
                break
            done = unfinished == 0
            if drop_ok is False or not bool(done.any()):
                continue
            if drop_ok is None:
                why = _why_rows_stay(model, model_kwargs, input_ids.size(0))
                drop_ok = why is None
                if why is not None:
                    _debug_once(f"seqfuse: finished sequences keep their rows: {why}")
                    continue
            keep = unfinished.nonzero().view(-1)
            if _padding_vanishes(model_kwargs, keep):
                continue
            gone = done.nonzero().view(-1)
            if row_ids is None:
                row_ids = torch.arange(batch, device=device)
            left.append((row_ids.index_select(0, gone), input_ids.index_select(0, gone)))
            STATS["sentences_dropped"] += gone.numel()
            row_ids = row_ids.index_select(0, keep)
            input_ids = input_ids.index_select(0, keep)
            unfinished = unfinished.index_select(0, keep)
            cache = next((model_kwargs[k] for k in ALL_CACHE_NAMES if k in model_kwargs), None)
            if cache is not None:
                cache.reorder_cache(keep)
            _select_row_kwargs(model_kwargs, keep)
    if row_ids is None:
        return input_ids
    out = torch.empty((batch, input_ids.size(1)), dtype=input_ids.dtype, device=device)
    out.copy_(pad.expand_as(out))
    out[row_ids] = input_ids
    for rows, ids in left:
        out[rows, : ids.size(1)] = ids
    return out


def _greedy_tokens(plan: _StepPlan, processors, input_ids: Tensor, logits: Tensor) -> Tensor:
    """``argmax(processors(input_ids, logits))`` (``logits`` a copy, changed in
    place). Where the step's processors only ban tokens (the beam search's
    step plan: bad single tokens, a minimum length's EOS, suppressed tokens)
    and every row's maximum is finite, the banned columns are set to -inf and
    the argmax taken: the processors' own result leaves every other logit as
    it is and those at -inf, so the argmax (the first maximum) is the same
    token. Any other step (another processor, a forced token, a NaN or
    infinite logit) gets the processors."""
    fused, banned = plan.bans(input_ids.shape[1], logits.shape[0], logits.device)
    if fused and bool(torch.isfinite(logits.amax(dim=1)).all()):
        STATS["greedy_bans"] += 1
        if banned is not None:
            logits.index_fill_(1, banned[0], float("-inf"))
        return torch.argmax(logits, dim=-1)
    return torch.argmax(_apply_processors(processors, input_ids, logits), dim=-1)


# LogitsProcessorList.__call__'s verified code (transformers 5.17.0 and
# 5.23.0: the same): each processor in turn, given (input_ids, scores) when
# its __call__ takes no more, after inspect.signature of it.
_PROCESSOR_LIST_CALL = {"d2a5eac8e5cc0806"}
# a processor class's __call__ -> how many parameters its bound form has
_CALL_ARGS: dict = {}


def _apply_processors(processors, input_ids: Tensor, scores: Tensor) -> Tensor:
    """``processors(input_ids, scores)``: for transformers' own list whose
    processors take two arguments, each processor called as the list calls it,
    without the list's ``inspect.signature`` of every processor at every step
    (about 30 us each). Anything else: the list's own call."""
    from transformers.generation.logits_process import LogitsProcessorList

    if type(processors) is not LogitsProcessorList or (
        shape_of(LogitsProcessorList.__call__) not in _PROCESSOR_LIST_CALL
    ):
        return processors(input_ids, scores)
    for p in processors:
        if "__call__" in getattr(p, "__dict__", {}):  # (an instance's own: the list's call)
            return processors(input_ids, scores)
        fn = type(p).__call__
        n = _CALL_ARGS.get(fn)
        if n is None:
            n = _CALL_ARGS[fn] = len(inspect.signature(p.__call__).parameters)
        if n > 2:
            return processors(input_ids, scores)
    for p in processors:
        scores = p(input_ids, scores)
    return scores


class _DecodingSteps:
    """A search's decoding steps after its first forward: direct
    (``integrations.hf_direct``, decided at the first of them) where the
    model's steps can be, else the model's forward. A call returns what
    ``_update_model_kwargs_for_generation`` is given (the forward's outputs, or
    ``hf_direct.CacheOnly`` after a direct step) and the step's logits."""

    def __init__(self, model):
        self.model = model
        self.direct: bool | None = None

    def __call__(self, sequences: Tensor, model_kwargs: dict) -> tuple:
        from integrations import hf_direct

        if self.direct is None:
            why = hf_direct.usable(self.model, model_kwargs)
            self.direct = why is None
            if why is not None:
                _debug_once(f"seqfuse: decoding steps through the model's forward: {why}")
        if self.direct:
            logits = hf_direct.step(self.model, sequences[:, -1:], model_kwargs)
            if logits is not None:
                return hf_direct.CacheOnly(model_kwargs), logits
        outputs = _forward(self.model, sequences, model_kwargs)
        return outputs, outputs.logits


def _forward(model, sequences: Tensor, model_kwargs: dict):
    """The model's forward on the running sequences after the first step, as
    Hugging Face's loops call it."""
    next_len = 1 if model_kwargs["use_cache"] else None
    inputs = model.prepare_inputs_for_generation(
        sequences, next_sequence_length=next_len, **model_kwargs
    )
    return model(**inputs, return_dict=True)


def _step_verified(model) -> bool:
    """Whether a one-call decoder step (whose check verified the layer
    structure) is installed on the model's decoder."""
    from integrations import hf_exact_step, hf_fsmt_step, hf_gpt2_step, hf_llama_step, hf_t5_step

    marks = (
        (hf_fsmt_step._decoder(model), "_seqfuse_hf_fsmt_exact"),
        (hf_exact_step._decoder(model), "_seqfuse_hf_exact"),
        (
            getattr(model, "decoder", None) if hf_t5_step.is_t5(model) else None,
            "_seqfuse_hf_t5_exact",
        ),
        (hf_gpt2_step._transformer(model), "_seqfuse_hf_gpt2_exact"),
        (hf_llama_step._inner(model), "_seqfuse_hf_llama_exact"),
    )
    return any(getattr(m, attr, False) for m, attr in marks if m is not None)


def _encoder_rows(model_kwargs: dict):
    """The encoder output's per-row tensor (its other fields must be empty),
    or None."""
    out = model_kwargs.get("encoder_outputs")
    if out is None or not hasattr(out, "items"):
        return None
    fields = {k: v for k, v in out.items() if v is not None}
    if set(fields) != {"last_hidden_state"} or not torch.is_tensor(fields["last_hidden_state"]):
        return None
    return fields["last_hidden_state"]


def _why_not_share_prefill(model, input_ids, gc, model_kwargs: dict, num_beams: int) -> str | None:
    """Why the first forward must run on every beam's row (None: once per
    sentence gives the same bits). generate copies each sentence's prompt (a
    decoder-only model's) or start token and encoder output (an
    encoder-decoder's) to its beams' rows before it. Each product of that
    forward must then be one whose row results do not depend on the other
    rows: seqfuse's packed GEMM (the fused mode, fp32 on the CPU) on a decoder
    whose layer structure a one-call step has verified; torch's BLAS makes no
    such promise."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from integrations import hf_fused

    if num_beams < 2:
        return "one beam"
    if not _ext.env_flag(SHARED_PREFILL_ENV, True):
        return f"{SHARED_PREFILL_ENV}=0"
    if input_ids is None or input_ids.device.type != "cpu" or input_ids.size(1) == 0:
        return "no input tokens on the CPU"
    if getattr(gc, "prefill_chunk_size", None) is not None or getattr(gc, "is_assistant", False):
        return "a chunked or assisted prefill"
    if gc.output_attentions or gc.output_hidden_states:
        return "attentions or hidden states requested"
    if not _step_verified(model):
        return "no one-call decoder step"
    if not hf_fused.enabled(model):
        return "torch's products (fused_layers=False)"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "not a float32 model"
    enc_dec = model.config.is_encoder_decoder
    extra = set(model_kwargs) - set(_PREFILL_ROWS) - _PREFILL_OTHERS
    if enc_dec:
        extra -= {"encoder_outputs"}
    if extra:
        return f"generate arguments {sorted(extra)}"
    cache = model_kwargs.get("past_key_values")
    if cache is not None:
        parts = (
            (cache.self_attention_cache, cache.cross_attention_cache)
            if enc_dec and type(cache) is EncoderDecoderCache
            else (cache,)
        )
        if any(type(c) is not DynamicCache or c.get_seq_length() != 0 for c in parts):
            return "a cache that is not empty and dynamic"
    rows_of = [input_ids] + [model_kwargs.get(k) for k in _PREFILL_ROWS]
    if enc_dec:
        enc = _encoder_rows(model_kwargs)
        if enc is None:
            return "an encoder output with more than its last hidden state"
        rows_of.append(enc)
    batch = input_ids.size(0) // num_beams
    for t in rows_of:
        if t is None:
            continue
        if not torch.is_tensor(t) or t.dim() < 1 or t.size(0) != batch * num_beams:
            return "per-row arguments of another shape"
        rows = t.reshape(batch, num_beams, -1)
        if not torch.equal(rows, rows[:, :1].expand_as(rows)):
            return "the beams of a sentence start from different rows"
    return None


def _prefill(model, input_ids, gc, model_kwargs: dict, num_beams: int):
    """The first forward (Hugging Face's ``_prefill``). In the fused mode it
    runs once per sentence instead of once per beam
    (``_why_not_share_prefill``): a decoder-only model's prompt, an
    encoder-decoder's first step (and its cross-attention K/V); the cache
    and the last position's logits are then repeated for the beams. The
    packed GEMM's rows do not depend on the batch: with a batch-invariant
    attention (torch's math sdpa) the same bits as every row computing its
    own. torch's default CPU sdpa may round a row differently in a larger
    batch (MKL on AVX2 with two threads): then within the fused mode's 1e-5
    of every row and of stock, as any fused result."""
    first = not getattr(gc, "is_assistant", False)
    why = _why_not_share_prefill(model, input_ids, gc, model_kwargs, num_beams)
    if why is not None:
        _debug_once(f"seqfuse: the first forward runs on every beam's row: {why}")
        return model._prefill(input_ids, gc, model_kwargs, is_first_iteration=first)
    one = {
        k: (v[::num_beams] if k in _PREFILL_ROWS and torch.is_tensor(v) else v)
        for k, v in model_kwargs.items()
    }
    if "encoder_outputs" in one:
        enc = one["encoder_outputs"]
        one["encoder_outputs"] = type(enc)(last_hidden_state=_encoder_rows(one)[::num_beams])
    out = model._prefill(input_ids[::num_beams], gc, one, is_first_iteration=True)
    cache = out.past_key_values
    if cache is not None:
        cache.batch_repeat_interleave(num_beams)
    out.logits = out.logits[:, -1:, :].repeat_interleave(num_beams, dim=0)
    STATS["shared_prefills"] += 1
    return out


# ------------------------------------------------------------- the search
def _plan_hits(stop_plan, cur_len: int, all_scores, topk_tokens, batch: int, keep: int, device):
    """The candidates that meet a stopping criterion, from ``_stop_plan``'s
    (max-length criteria, EOS ids)."""
    max_crit, eos_t = stop_plan
    # the criteria's own call (same decision, same warning) on a host tensor
    # of the right length: no device read
    probe = torch.empty((1, cur_len + 1), dtype=torch.long)
    if any(bool(c(probe, all_scores)[0]) for c in max_crit):
        return torch.ones((batch, keep), dtype=torch.bool, device=device)
    if eos_t is not None:
        return torch.isin(topk_tokens, eos_t)
    return torch.zeros((batch, keep), dtype=torch.bool, device=device)


def _why_not_advance(model, gc) -> str | None:
    """Why a step's bookkeeping must call transformers' helpers instead of
    ``hf_beam_advance``, or None."""
    from integrations.hf_direct import generation_helper_problem

    if not _ext.env_flag(BEAM_ADVANCE_ENV, True):
        return f"{BEAM_ADVANCE_ENV}=0"
    if _ext._C is None or not hasattr(torch.ops.seqfuse, "hf_beam_advance"):
        return "the compiled extension is not available"
    for name, shape in _ADVANCE_SHAPES.items():
        why = generation_helper_problem(model, name, {shape})
        if why is not None:
            return why
    lp = gc.length_penalty
    if type(lp) not in (int, float):
        return f"length_penalty of type {type(lp).__name__}"
    return None


def _early_stopping_code(early_stopping) -> int:
    """hf_beam_advance's code: the helpers test ``early_stopping is True`` and
    ``early_stopping == "never"``; anything else acts as False."""
    if early_stopping is True:
        return 1
    return 2 if early_stopping == "never" else 0


def beam_search(model, input_ids, logits_processor, stopping_criteria, gc, **model_kwargs):
    """Hugging Face's ``_beam_search`` (transformers 5.x), same results, fused step."""
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.generation.utils import (
        ALL_CACHE_NAMES,
        GenerateBeamDecoderOnlyOutput,
        GenerateBeamEncoderDecoderOutput,
    )

    pad_token_id = gc._pad_token_tensor
    eos_token_id = gc._eos_token_tensor
    output_attentions = gc.output_attentions
    output_hidden_states = gc.output_hidden_states
    output_scores = gc.output_scores
    output_logits = gc.output_logits
    return_dict = gc.return_dict_in_generate
    early_stopping = gc.early_stopping
    length_penalty = gc.length_penalty
    max_length = gc.max_length
    num_beams = gc.num_beams
    num_return_sequences = gc.num_return_sequences
    is_enc_dec = model.config.is_encoder_decoder
    device = input_ids.device

    flat_batch, cur_len = input_ids.shape[:2]
    batch = flat_batch // num_beams
    prompt_len = cur_len
    n_eos = eos_token_id.shape[0] if eos_token_id is not None else 0
    keep = max(2, 1 + n_eos) * num_beams
    top_num_beam_mask = torch.cat(
        (torch.ones(num_beams, dtype=torch.bool), torch.zeros(keep - num_beams, dtype=torch.bool))
    ).to(device)

    want_scores = return_dict and output_scores
    all_scores = () if want_scores else None
    raw_logits = () if (return_dict and output_logits) else None
    dec_attn = () if (return_dict and output_attentions) else None
    cross_attn = () if (return_dict and output_attentions) else None
    dec_hidden = () if (return_dict and output_hidden_states) else None
    enc_attn = enc_hidden = None
    if return_dict and is_enc_dec:
        enc_out = model_kwargs["encoder_outputs"]
        enc_attn = enc_out.get("attentions") if output_attentions else None
        enc_hidden = enc_out.get("hidden_states") if output_hidden_states else None

    fill = pad_token_id or eos_token_id[0] if eos_token_id is not None else -1
    # Full-width buffers, as stock's; each step works on their first cur_len + 1
    # columns only (the others hold the fill value in every row, stock's too).
    run_buf = torch.full(
        (batch, num_beams, max_length), fill_value=fill, dtype=torch.int64, device=device
    )
    run_buf[:, :, :cur_len] = input_ids.view(batch, num_beams, cur_len)
    seq_buf = run_buf.detach().clone()
    running_beam_scores = torch.zeros((batch, num_beams), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, num_beams), -1e9, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    early_stop_unsat = torch.ones((batch, 1), dtype=torch.bool, device=device)
    run_bi_buf = torch.full(
        (batch, num_beams, max_length - cur_len), -1, dtype=torch.int32, device=device
    )
    bi_buf = run_bi_buf.detach().clone()
    batch_offset = torch.arange(batch, device=device).view(-1, 1) * num_beams

    stop_plan = _stop_plan(stopping_criteria, device)
    plan: _StepPlan | None = None
    cross_shared: bool | None = None
    # Finished sentences' rows dropped from the batch (_why_not_drop_finished):
    # None until first needed, then whether they can be. sent_ids: each
    # compact row group's sentence (None: all, in order); row_offset: the
    # compact groups' first rows (batch_offset keeps the original ones, which
    # the beam indices hold).
    drop_ok: bool | None = None
    if device.type != "cpu" or not _ext.env_flag(DROP_FINISHED_ENV, True):
        drop_ok = False
    sent_ids = full_seq = full_scores = full_bi = None
    row_offset = batch_offset
    beam_range = torch.arange(num_beams, device=device)

    from integrations import hf_direct, hf_exact_step

    defer_ok = _ext.env_flag(DEFER_REORDER_ENV, True) and _step_verified(model)
    why_not_advance = _why_not_advance(model, gc)
    advance = why_not_advance is None
    if not advance:
        _debug_once(f"seqfuse: beam bookkeeping by transformers' helpers: {why_not_advance}")
    es_code = _early_stopping_code(early_stopping)
    flat_running = input_ids
    model_outputs = _prefill(model, input_ids, gc, model_kwargs, num_beams)
    step_logits = model_outputs.logits
    steps = _DecodingSteps(model)
    first = True
    this_peer_finished = False
    while not this_peer_finished:
        if not first:
            flat_running = run_buf[:, :, :cur_len].reshape(flat_batch, cur_len)
            model_outputs, step_logits = steps(flat_running, model_kwargs)
        first = False
        model_kwargs = model._update_model_kwargs_for_generation(
            model_outputs, model_kwargs, is_encoder_decoder=is_enc_dec
        )
        raw = step_logits[:, -1, :]
        step_logits = None
        maxima = None
        if raw.dtype == torch.float32 and raw.device == device and raw.is_contiguous():
            logits = raw
            # (the group maxima a direct step's LM head noted for them)
            maxima = hf_direct.logit_maxima(logits)
        else:
            logits = raw.to(copy=True, dtype=torch.float32, device=device)
        vocab = logits.shape[-1]
        if plan is None:
            plan = _StepPlan(logits_processor, vocab)

        if return_dict:
            if output_logits:
                raw_logits += (logits.clone(),)
            if output_attentions:
                dec_attn += (
                    (model_outputs.decoder_attentions,)
                    if is_enc_dec
                    else (model_outputs.attentions,)
                )
                if is_enc_dec:
                    cross_attn += (model_outputs.cross_attentions,)
            if output_hidden_states:
                dec_hidden += (
                    (model_outputs.decoder_hidden_states,)
                    if is_enc_dec
                    else (model_outputs.hidden_states,)
                )
        model_outputs = None

        fused, banned = (False, None) if want_scores else plan.bans(cur_len, flat_batch, device)
        if fused and num_beams * vocab >= 2**31:
            fused = False
        picked = None
        if fused:
            picked = _fused_topk(logits, running_beam_scores, banned, num_beams, keep, maxima)
        STATS["fused_steps" if picked is not None else "stock_steps"] += 1
        if picked is not None:
            topk_log_probs, topk_tokens, topk_beams = picked
        else:
            log_probs = nn.functional.log_softmax(logits, dim=-1)
            log_probs = _apply_processors(logits_processor, flat_running, log_probs)
            if want_scores:
                all_scores += (log_probs.clone(),)
            log_probs = log_probs.view(batch, num_beams, vocab) + running_beam_scores[:, :, None]
            topk_log_probs, flat_idx = torch.topk(log_probs.reshape(batch, -1), k=keep)
            topk_beams = flat_idx // vocab
            topk_tokens = flat_idx % vocab
        del logits

        if stop_plan is not None:
            hits = _plan_hits(stop_plan, cur_len, all_scores, topk_tokens, batch, keep, device)
        if advance and stop_plan is not None:
            # the helpers' operations in one C++ call (the same results)
            STATS["advanced_steps"] += 1
            (
                running_beam_scores,
                beam_scores,
                is_sent_finished,
                early_stop_unsat,
                beam_idx,
                go_on,
            ) = torch.ops.seqfuse.hf_beam_advance(
                topk_log_probs,
                topk_tokens,
                topk_beams,
                hits,
                run_buf,
                seq_buf,
                run_bi_buf,
                bi_buf,
                beam_scores,
                is_sent_finished,
                early_stop_unsat,
                batch_offset,
                top_num_beam_mask,
                cur_len,
                prompt_len,
                max_length,
                num_beams,
                float(length_penalty),
                es_code,
            )
            cur_len += 1
            this_peer_finished = not go_on
        else:
            # Stock's _get_top_k_continuations from the chosen (beam, token) pairs.
            w, wb = cur_len + 1, cur_len - prompt_len + 1
            topk_running_beam_indices = model._gather_beams(run_bi_buf[:, :, :wb], topk_beams)
            topk_running_sequences = model._gather_beams(run_buf[:, :, :w], topk_beams)
            topk_running_sequences[:, :, cur_len] = topk_tokens
            topk_running_beam_indices[:, :, cur_len - prompt_len] = topk_beams + batch_offset

            if stop_plan is None:
                hits = stopping_criteria(
                    model._flatten_beam_dim(topk_running_sequences), all_scores
                )
                hits = model._unflatten_beam_dim(hits, batch, keep)

            running_sequences, running_beam_scores, running_beam_indices = (
                model._get_running_beams_for_next_iteration(
                    topk_log_probs=topk_log_probs,
                    topk_running_sequences=topk_running_sequences,
                    topk_running_beam_indices=topk_running_beam_indices,
                    next_token_hits_stopping_criteria=hits,
                    num_beams=num_beams,
                )
            )
            sequences, beam_scores, beam_indices, is_sent_finished = model._update_finished_beams(
                sequences=seq_buf[:, :, :w],
                topk_running_sequences=topk_running_sequences,
                beam_scores=beam_scores,
                topk_log_probs=topk_log_probs,
                beam_indices=bi_buf[:, :, :wb],
                topk_running_beam_indices=topk_running_beam_indices,
                is_early_stop_heuristic_unsatisfied=early_stop_unsat,
                is_sent_finished=is_sent_finished,
                next_token_hits_stopping_criteria=hits,
                top_num_beam_mask=top_num_beam_mask,
                num_beams=num_beams,
                cur_len=cur_len,
                decoder_prompt_len=prompt_len,
                length_penalty=length_penalty,
                early_stopping=early_stopping,
            )

            run_buf[:, :, :w].copy_(running_sequences)
            run_bi_buf[:, :, :wb].copy_(running_beam_indices)
            seq_buf[:, :, :w].copy_(sequences)
            bi_buf[:, :, :wb].copy_(beam_indices)

            # Stock reorders the cache, then runs the early-stop heuristic and the
            # loop's test; neither reads the cache, so they run first here: the
            # reorder can then also drop the sentences they finished.
            col = cur_len - prompt_len
            cur_len += 1
            early_stop_unsat = model._check_early_stop_heuristic(
                is_early_stop_heuristic_unsatisfied=early_stop_unsat,
                running_beam_scores=running_beam_scores,
                beam_scores=beam_scores,
                is_sent_finished=is_sent_finished,
                cur_len=cur_len,
                max_length=max_length,
                decoder_prompt_len=prompt_len,
                early_stopping=early_stopping,
                length_penalty=length_penalty,
            )
            this_peer_finished = not model._beam_search_has_unfinished_sequences(
                early_stop_unsat, is_sent_finished, hits, early_stopping
            )
            beam_idx = model._flatten_beam_dim(running_beam_indices[..., col])
        keep_sents = None
        if not this_peer_finished and drop_ok is not False:
            keep_sents = _sentences_to_keep(early_stop_unsat, is_sent_finished, beam_scores)
            if keep_sents is not None and drop_ok is None:
                why = _why_not_drop_finished(
                    model, return_dict, logits_processor, stop_plan, model_kwargs, flat_batch
                )
                drop_ok = why is None
                if why is not None:
                    _debug_once(f"seqfuse: finished sentences keep their rows: {why}")
                    keep_sents = None
        # beam_idx: compact rows of the beams the next step continues (stock:
        # flat indices)
        if sent_ids is not None:
            beam_idx = beam_idx - (batch_offset - row_offset).repeat_interleave(num_beams)
        if keep_sents is not None:
            kept_rows = (keep_sents.view(-1, 1) * num_beams + beam_range).view(-1)
            if _padding_vanishes(model_kwargs, kept_rows):
                keep_sents = None
        if keep_sents is not None:
            # the kept sentences' rows, reordered, in one gather per cache tensor
            beam_idx = beam_idx.index_select(0, kept_rows)
        cache_key = next((k for k in ALL_CACHE_NAMES if k in model_kwargs), None)
        if cache_key is not None:
            cache = model_kwargs[cache_key]
            if hasattr(model, "_reorder_cache"):
                model_kwargs[cache_key] = model._reorder_cache(cache, beam_idx)
            elif hasattr(cache, "reorder_cache"):
                if cross_shared is None:
                    cross_shared = _cross_cache_shared(cache, batch, num_beams)
                    STATS["cross_cache_kept"] += int(cross_shared)
                # the self-attention cache's reorder: deferred to the next
                # one-call step where there is one (gathered there with the
                # step's K/V in one copy of the history instead of two)
                deferred = defer_ok and hf_exact_step.defer_reorder(cache, beam_idx)
                if type(cache) is not EncoderDecoderCache:
                    if not deferred:
                        cache.reorder_cache(beam_idx)
                else:
                    if not deferred:
                        cache.self_attention_cache.reorder_cache(beam_idx)
                    if not cross_shared:
                        cache.cross_attention_cache.reorder_cache(beam_idx)
                    elif keep_sents is not None:
                        cache.cross_attention_cache.reorder_cache(kept_rows)
            else:
                raise ValueError(
                    f"{model.__class__.__name__} cannot use beam search with a cache currently, "
                    "as the cache cannot be reordered"
                )
        if keep_sents is not None:
            # Finished sentences leave the batch: their results go to the
            # full-batch buffers, every per-sentence tensor keeps the others.
            if sent_ids is None:
                sent_ids = torch.arange(batch, device=device)
                full_seq, full_scores, full_bi = seq_buf, beam_scores, bi_buf
            else:
                full_seq[sent_ids], full_bi[sent_ids] = seq_buf, bi_buf
                full_scores[sent_ids] = beam_scores
            STATS["sentences_dropped"] += batch - keep_sents.numel()
            sent_ids = sent_ids.index_select(0, keep_sents)
            (run_buf, seq_buf, run_bi_buf, bi_buf, running_beam_scores, beam_scores) = (
                t.index_select(0, keep_sents)
                for t in (run_buf, seq_buf, run_bi_buf, bi_buf, running_beam_scores, beam_scores)
            )
            is_sent_finished = is_sent_finished.index_select(0, keep_sents)
            early_stop_unsat = early_stop_unsat.index_select(0, keep_sents)
            batch_offset = batch_offset.index_select(0, keep_sents)
            batch = keep_sents.numel()
            flat_batch = batch * num_beams
            row_offset = torch.arange(batch, device=device).view(-1, 1) * num_beams
            _select_row_kwargs(model_kwargs, kept_rows)

    if sent_ids is not None:
        full_seq[sent_ids], full_bi[sent_ids] = seq_buf, bi_buf
        full_scores[sent_ids] = beam_scores
        seq_buf, beam_scores, bi_buf = full_seq, full_scores, full_bi

    sequences = model._flatten_beam_dim(seq_buf[:, :num_return_sequences, :])
    beam_scores = model._flatten_beam_dim(beam_scores[:, :num_return_sequences])
    beam_indices = model._flatten_beam_dim(bi_buf[:, :num_return_sequences, :])
    max_generated = ((beam_indices + 1).bool()).sum(dim=1).max()
    sequences = sequences[:, : prompt_len + max_generated]
    beam_indices = beam_indices[:, :max_generated]
    if not return_dict:
        return sequences
    cache_key = next((k for k in ALL_CACHE_NAMES if k in model_kwargs), None)
    common = dict(
        sequences=sequences,
        sequences_scores=beam_scores if output_scores else None,
        scores=all_scores,
        logits=raw_logits,
        beam_indices=beam_indices,
        past_key_values=model_kwargs[cache_key] if cache_key is not None else None,
    )
    if is_enc_dec:
        return GenerateBeamEncoderDecoderOutput(
            **common,
            encoder_attentions=enc_attn,
            encoder_hidden_states=enc_hidden,
            decoder_attentions=dec_attn,
            cross_attentions=cross_attn,
            decoder_hidden_states=dec_hidden,
        )
    return GenerateBeamDecoderOnlyOutput(**common, attentions=dec_attn, hidden_states=dec_hidden)


def _kernel_normalises(device) -> bool:
    """Whether the fused op's normaliser gives torch's log_softmax bits here."""
    return device.type == "cpu"


# torch.ops.seqfuse.beam_topk_checks, or None (an extension without it).
_CHECKS_OP: list = [getattr(torch.ops.seqfuse, "beam_topk_checks", None) if _ext._C else None]
# torch.ops.seqfuse.beam_topk_maxima, or None.
_MAXIMA_TOPK: list = [getattr(torch.ops.seqfuse, "beam_topk_maxima", None) if _ext._C else None]


def _checks_in_one_pass(logits, cum, cs) -> bool:
    """Whether ``beam_topk_checks`` takes these tensors (contiguous CPU float32)."""
    return (
        _CHECKS_OP[0] is not None
        and logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and cum.dtype == torch.float32
        and cs.dtype == torch.float32
        and logits.is_contiguous()
        and cum.is_contiguous()
    )


def _fused_topk(logits, running_beam_scores, banned, num_beams: int, keep: int, maxima=None):
    """The top-``keep`` (score, token, beam) per sentence, as stock's ``torch.topk``
    over ``log_softmax(logits) (+ bans) + running scores`` would order them; None
    when the step must run stock's ops (non-finite logits or NaN scores, where
    stock's NaN ordering decides). One host read per step. ``maxima``: the
    logits' group maxima (hf_direct.logit_maxima), which stand for the
    kernel's and the checks' passes over the logits where the CPU kernel runs."""
    vocab = logits.shape[1]
    cum = running_beam_scores.reshape(-1)
    k_op = min(keep + 1, num_beams * vocab)
    if _kernel_normalises(logits.device):
        # The CPU kernel's normaliser is torch's own (same bits): fully fused.
        run = cpu_kernel_for(logits)
        if run is not None and maxima is not None and _MAXIMA_TOPK[0] is not None:
            # the chunk maxima from the group maxima: the same results
            STATS["maxima_steps"] += 1
            cs, ci, cb = _MAXIMA_TOPK[0](
                logits, maxima, cum, num_beams, k_op, -1, 0, 0, 0.0, EOS_ALLOW, banned
            )
        elif run is not None:  # (the op checks its arguments; no backend choice)
            cs, ci, cb = run(logits, cum, num_beams, k_op, -1, 0, 0, 0.0, EOS_ALLOW, banned, False)
        else:
            cs, ci, cb = beam_topk(logits, cum, num_beams, k_op, -1, 0, 0, 0.0, EOS_ALLOW, banned)
    else:
        # Elsewhere the kernel's normaliser may differ from torch's by an ulp:
        # take torch's log-probs, fuse the bans, the accumulation and the top-k.
        lp = nn.functional.log_softmax(logits, dim=-1)
        cs, ci, cb = beam_topk(lp, cum, num_beams, k_op, -1, 0, 0, 0.0, EOS_ALLOW, banned, True)
    if _checks_in_one_pass(logits, cum, cs):
        # the same tests in one pass over the logits (beam_topk_checks), or
        # over their group maxima: a row's maximum is NaN, +inf or -inf
        # exactly when one of its groups' is NaN or +inf, or all are -inf
        bad_host, tie = _CHECKS_OP[0](logits if maxima is None else maxima, cum, cs)
        any_tie = not bad_host and bool(tie.any())
    else:
        bad = ~torch.isfinite(logits.amax(dim=1)).all() | torch.isnan(cum).any()
        if k_op > 1:
            tie = (cs[:, 1:] == cs[:, :-1]).any(dim=1)
            bad_host, any_tie = torch.stack((bad, tie.any())).tolist()
        else:
            bad_host, any_tie = bool(bad), False
    if bad_host:
        return None
    if any_tie:
        sents = tie.nonzero().view(-1)
        STATS["tie_reranks"] += sents.numel()
        row_idx = sents.unsqueeze(1) * num_beams + torch.arange(num_beams, device=sents.device)
        row_idx = row_idx.view(-1)
        # stock's ops on those sentences: log_softmax, the bans, + scores, topk
        ref = beam_topk_reference(
            logits[row_idx],
            cum[row_idx],
            num_beams,
            keep,
            -1,
            0,
            0,
            0.0,
            EOS_ALLOW,
            None if banned is None else banned[row_idx],
        )
        cs, ci, cb = cs[:, :keep].clone(), ci[:, :keep].clone(), cb[:, :keep].clone()
        cs[sents], ci[sents], cb[sents] = ref
        return cs, ci, cb
    return cs[:, :keep], ci[:, :keep], cb[:, :keep]
