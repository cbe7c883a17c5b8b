"""A decoding step's forward without transformers' wrappers, for Marian,
BART, mBART, FSMT, T5, GPT-2, Llama, Qwen2 and Mistral models whose decoder
has the one-call layer step.

After the first step, seqfuse's beam search (integrations.hf) calls the
model's forward once a step: ``prepare_inputs_for_generation``, the
generation model's, the model's and the decoder's forwards with their
decorators and output records, then ``_update_model_kwargs_for_generation``.
For a one-token step whose layers take the one-call step
(integrations.hf_exact_step and its FSMT, T5, GPT-2 and Llama forms), the tensors those
calls make are few: the token's embedding and position, the attention
masks, the layers' step, an embedding or final layer norm, the LM head and
its bias. :func:`step` makes exactly those calls, with the same modules,
functions and arguments as the verified code (below, by the shape of its
source, seqfuse.source_shape), and returns the logits: the same tensors, bit
for bit, without about a millisecond of Python a step. The search then
calls transformers' own ``_update_model_kwargs_for_generation`` as after a
forward (:class:`CacheOnly`: the step's cache is its only output it reads).

It runs only where that reproduction is certain: the model's classes and
their forwards are the verified ones (Marian, BART, mBART and T5 under
transformers 5.17 and 5.23; FSMT, GPT-2, Llama, Qwen2 and Mistral under 5.23), the cache is an
initialised one of dynamic layers, the search's model_kwargs hold nothing a
forward would read besides the encoder output and its mask (decoder-only: the
attention mask, the position ids and ``logits_to_keep``) and the cache, no
module has a hook (other than transformers' idle output capture) and nothing
asks for attentions or hidden states. Anywhere else, and for any step the
layers' one-call step declines (nothing is changed before it), the model's
own forward runs. ``SEQFUSE_HF_DIRECT_STEP=0`` turns it off.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from integrations import hf_fused
from seqfuse import _ext
from seqfuse.ops import linear as packed_linear
from seqfuse.source_shape import shape_of

DIRECT_ENV = "SEQFUSE_HF_DIRECT_STEP"

STATS = {"direct": 0, "causal_masks": 0}

# torch.ops.seqfuse.linear_packed_maxima, or None (no extension).
_MAXIMA_OP: list = [getattr(torch.ops.seqfuse, "linear_packed_maxima", None) if _ext._C else None]

# family -> {qualified function: its verified source shapes}: transformers
# 5.23, and 5.17 where its code differs (its decoder forwards skip layerdrop
# on `self.training` alone, which eval mode never reaches; its
# prepare_inputs_for_generation differs in the token-type keys, a
# compileable cache's mask and the device move, none of which a step here
# has). The same calls for a decoder step in both.
_FAMILIES = {
    "marian": {
        "MarianMTModel.forward": {"44cb9b6492fdcf21"},
        "MarianModel.forward": {"7e6924b46992a7a0"},
        "MarianDecoder.forward": {"b1c5169a77234ccd", "e45ca04f1644a4cd"},
        "MarianSinusoidalPositionalEmbedding.forward": {"e7e4e20ec762ede6"},
    },
    "bart": {
        "BartForConditionalGeneration.forward": {"cc1a44e14862509f"},
        "BartModel.forward": {"28f3faaed7f510ac"},
        "BartDecoder.forward": {"4783a991ea37a922", "7b7714e7584a3ef2"},
        "BartLearnedPositionalEmbedding.forward": {"e129b3fc4666ab86"},
        "BartScaledWordEmbedding.forward": {"5391be5d305e8e89"},
    },
    "mbart": {
        "MBartForConditionalGeneration.forward": {"0e6a18ff8acd5302"},
        "MBartModel.forward": {"8cd1bfa57263a656"},
        "MBartDecoder.forward": {"f1b3f761e672af62", "d8f0ccfbda802fc2"},
        "MBartLearnedPositionalEmbedding.forward": {"e129b3fc4666ab86"},
        "MBartScaledWordEmbedding.forward": {"5391be5d305e8e89"},
    },
    # FSMT: 5.23 only (5.17's decoder embeds the positions of every token so
    # far and keeps the last)
    "fsmt": {
        "FSMTForConditionalGeneration.forward": {"afdb783aecd56347"},
        "FSMTModel.forward": {"4c74449be6bb1803"},
        "FSMTDecoder.forward": {"d9bf7a665d615be7"},
        "SinusoidalPositionalEmbedding.forward": {"13bed42b55e313a5"},
        "SinusoidalPositionalEmbedding.make_positions": {"47802777032a04a5"},
        "invert_mask": {"76d13e78ba6967fe"},
    },
    # GPT-2 (decoder-only): its LM head model's and model's forwards and the
    # LM head's slice
    "gpt2": {
        "GPT2LMHeadModel.forward": {"4ee593c2a690095e"},
        "GPT2Model.forward": {"e0f822cb14838a73"},
        "slice_logits_to_keep": {"bdb1a45d8cf8abfe"},
    },
    # T5 (5.17 and 5.23: the same code): the generation model's and the
    # decoder stack's forwards
    "t5": {
        "T5ForConditionalGeneration.forward": {"1e7827cb5351e891"},
        "T5Stack.forward": {"84023a61603ddc83"},
    },
    # Llama (decoder-only, rotary positions), and Qwen2 and Mistral (Llama's
    # generation forward; their models differ from Llama's in the masks they
    # build, the same create_causal_mask call where every layer has full
    # attention: see _decoder_only_problem)
    "llama": {
        "LlamaForCausalLM.forward": {"ecc7f0f20572ca79"},
        "LlamaModel.forward": {"44a610917ca25934"},
        "slice_logits_to_keep": {"bdb1a45d8cf8abfe"},
    },
    "qwen2": {
        "Qwen2ForCausalLM.forward": {"ecc7f0f20572ca79"},
        "Qwen2Model.forward": {"949fbdbc5124d943"},
        "slice_logits_to_keep": {"bdb1a45d8cf8abfe"},
    },
    "mistral": {
        "MistralForCausalLM.forward": {"ecc7f0f20572ca79"},
        "MistralModel.forward": {"5123b26f88094335"},
        "slice_logits_to_keep": {"bdb1a45d8cf8abfe"},
    },
}
# Each family's classes by role (the token embedding: None for a plain
# nn.Embedding), and the marker of the decoder's one-call layer step.
_ROLES = {
    "marian": (
        "MarianMTModel",
        "MarianModel",
        "MarianDecoder",
        "MarianSinusoidalPositionalEmbedding",
        None,
    ),
    "bart": (
        "BartForConditionalGeneration",
        "BartModel",
        "BartDecoder",
        "BartLearnedPositionalEmbedding",
        "BartScaledWordEmbedding",
    ),
    "mbart": (
        "MBartForConditionalGeneration",
        "MBartModel",
        "MBartDecoder",
        "MBartLearnedPositionalEmbedding",
        "MBartScaledWordEmbedding",
    ),
    "fsmt": (
        "FSMTForConditionalGeneration",
        "FSMTModel",
        "FSMTDecoder",
        "SinusoidalPositionalEmbedding",
        None,
    ),
}
_MARKERS = {"fsmt": "_seqfuse_hf_fsmt_exact"}
# decoder-only families: (generation model, base model, its attribute, the
# one-call step's marker on it)
_DECODER_ONLY = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model", "transformer", "_seqfuse_hf_gpt2_exact"),
    "llama": ("LlamaForCausalLM", "LlamaModel", "model", "_seqfuse_hf_llama_exact"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Model", "model", "_seqfuse_hf_llama_exact"),
    "mistral": ("MistralForCausalLM", "MistralModel", "model", "_seqfuse_hf_llama_exact"),
}
_GENERATION = {
    "prepare_inputs_for_generation": {"d77e78d57cab535a", "0bce3f021ffa26c4"},
    "_update_model_kwargs_for_generation": {"159384a4f2dce36e"},
}
# The search's model_kwargs a direct step reproduces (any other key, or an
# output request, sends the step to the model's forward).
_KWARGS = frozenset({"attention_mask", "encoder_outputs", "past_key_values", "use_cache"})
_DECODER_ONLY_KWARGS = frozenset(
    {"attention_mask", "position_ids", "logits_to_keep", "past_key_values", "use_cache"}
)
_FALSE_KWARGS = frozenset({"output_attentions", "output_hidden_states"})


class CacheOnly:
    """What ``_update_model_kwargs_for_generation`` reads of a direct step's
    outputs: the cache (the same object the step updated in place)."""

    def __init__(self, model_kwargs: dict):
        self.past_key_values = model_kwargs.get("past_key_values")

    def __contains__(self, name) -> bool:
        return name == "past_key_values" and self.past_key_values is not None


def _count_step() -> None:
    """A direct step ran (its layer step counts as the one-call step's)."""
    from integrations import hf_exact_step

    hf_exact_step.STATS["exact"] += 1
    STATS["direct"] += 1


def _base(model) -> type:
    """The model's class before seqfuse.optimize's patch."""
    return getattr(type(model), "_seqfuse_base", type(model))


def _family(model) -> str | None:
    name = _base(model).__name__
    if name == "T5ForConditionalGeneration":
        return "t5"
    for fam, roles in _DECODER_ONLY.items():
        if roles[0] == name:
            return fam
    return next((fam for fam, roles in _ROLES.items() if roles[0] == name), None)


def _module(fam: str):
    """The family's modeling module in transformers."""
    import importlib

    return importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")


def _code(mod, qual: str):
    """``Class.function`` or a module-level ``function`` of ``mod``, or None."""
    obj = mod
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj


def generation_helper_problem(model, name: str, shapes) -> str | None:
    """Why ``model``'s GenerationMixin helper ``name`` is not the verified
    code (the model's class or the instance replaces it, or its source has
    none of ``shapes``), or None."""
    from transformers.generation.utils import GenerationMixin

    mine = getattr(GenerationMixin, name, None)
    theirs = getattr(model, name, None)  # (a bound method, or a static one)
    if getattr(theirs, "__func__", theirs) is not mine:
        return f"the model overrides {name}"
    if mine is None or shape_of(mine) not in shapes:
        return f"this transformers' {name} is not the verified one"
    return None


def problem(model) -> str | None:
    """Why this model's steps cannot be direct (checked once per model), or None."""
    if not _ext.env_flag(DIRECT_ENV, True):
        return f"{DIRECT_ENV}=0"
    fam = _family(model)
    if fam is None:
        return (
            f"{type(model).__name__} is not a Marian, BART, mBART, FSMT, T5, GPT-2, Llama, "
            "Qwen2 or Mistral model"
        )
    mod = _module(fam)
    for qual, shapes in _FAMILIES[fam].items():
        fn = _code(mod, qual)
        if fn is None or shape_of(fn) not in shapes:
            return f"this transformers' {qual} is not the verified one"
    for name, shapes in _GENERATION.items():
        why = generation_helper_problem(model, name, shapes)
        if why is not None:
            return why
    if fam in _DECODER_ONLY:
        return _decoder_only_problem(model, fam, mod)
    if fam == "t5":
        return _t5_problem(model, mod)
    lm_cls, inner_cls, dec_cls, pos_cls, tok_cls = (
        None if n is None else getattr(mod, n) for n in _ROLES[fam]
    )
    if _base(model) is not lm_cls or type(model.model) is not inner_cls:
        return "the model's classes are not the verified ones"
    if (
        type(model).forward is not lm_cls.forward
        or type(model.model).forward is not inner_cls.forward
    ):
        return "the model's forward is not the verified one"
    dec = model.model.decoder
    marker = _MARKERS.get(fam, "_seqfuse_hf_exact")
    if not getattr(dec, marker, False) or type(dec).__bases__[1] is not dec_cls:
        return "the decoder has no one-call step"
    if type(dec.embed_positions) is not pos_cls:
        return "the positional embedding's class is not the verified one"
    if type(dec.embed_tokens) is not (tok_cls or nn.Embedding):
        return "the token embedding's class is not the verified one"
    if fam in ("bart", "mbart"):
        norms = [dec.layernorm_embedding] + ([dec.layer_norm] if fam == "mbart" else [])
        if any(type(n) is not nn.LayerNorm for n in norms):
            return "a decoder layer norm is not an nn.LayerNorm"
    return None


def _decoder_only_problem(model, fam: str, mod) -> str | None:
    lm_name, inner_name, attr, marker = _DECODER_ONLY[fam]
    lm_cls, inner_cls = getattr(mod, lm_name), getattr(mod, inner_name)
    inner = getattr(model, attr, None)
    if _base(model) is not lm_cls or inner is None:
        return "the model's classes are not the verified ones"
    if type(model).forward is not lm_cls.forward:
        return "the model's forward is not the verified one"
    if not getattr(inner, marker, False) or type(inner).__bases__[1] is not inner_cls:
        return "the model has no one-call layer step"
    if inner_cls.forward is not type(inner).__bases__[1].forward:
        return "the model's forward is not the verified one"
    if getattr(model.config, "add_cross_attention", False):
        return "cross-attention blocks"
    embeddings = (inner.wte, inner.wpe) if fam == "gpt2" else (inner.embed_tokens,)
    if any(type(e) is not nn.Embedding for e in embeddings):
        return "the embeddings are not nn.Embedding"
    if fam == "gpt2":
        return None
    cfg = inner.config
    if len(inner.layers) != cfg.num_hidden_layers:  # (the models run layers[:n])
        return "the model runs some of its layers"
    # one mask for every layer, create_causal_mask's: Qwen2 without
    # sliding-window layers, Mistral without a sliding window
    if fam == "qwen2" and (
        inner.has_sliding_layers or any(t != "full_attention" for t in cfg.layer_types)
    ):
        return "sliding-window layers"
    if fam == "mistral" and cfg.sliding_window is not None:
        return "a sliding window"
    return None


def _t5_problem(model, mod) -> str | None:
    lm_cls, stack_cls = mod.T5ForConditionalGeneration, mod.T5Stack
    if _base(model) is not lm_cls or type(model).forward is not lm_cls.forward:
        return "the model's class or forward is not the verified one"
    dec = getattr(model, "decoder", None)
    if not getattr(dec, "_seqfuse_hf_t5_exact", False) or type(dec).__bases__[1] is not stack_cls:
        return "the decoder has no one-call step"
    if not (dec.is_decoder and dec.config.is_decoder and model.config.is_encoder_decoder):
        return "the decoder stack is not an encoder-decoder model's decoder"
    # (the stack's forward decorator passes a config's is_causal on to every block)
    if getattr(dec.config, "is_causal", None) is not None:
        return "the decoder's config sets is_causal"
    return None


def _hooked(model) -> bool:
    """Whether anything would see a module's calls: transformers collecting
    outputs, or a hook besides its idle output capture on any module."""
    from integrations.hf_exact_step import _recorded

    return _recorded(model.modules(), lambda m: (m,))


def usable(model, model_kwargs: dict) -> str | None:
    """Why this search's steps cannot be direct, or None (checked once per search)."""
    why = problem(model)
    if why is not None:
        return why
    if model.training:
        return "the model is training"
    decoder_only = _family(model) in _DECODER_ONLY
    allowed = _DECODER_ONLY_KWARGS if decoder_only else _KWARGS
    for k, v in model_kwargs.items():
        if k in _FALSE_KWARGS:
            if v:
                return f"{k} requested"
        elif k not in allowed:
            return f"model_kwargs {k!r}"
    if decoder_only:
        # (no attention mask: the models' masks get None, as from the forward)
        for k, optional in (("attention_mask", True), ("position_ids", False)):
            v = model_kwargs.get(k)
            if not (v is None and optional) and not (torch.is_tensor(v) and v.dim() == 2):
                return f"no 2-D {k}"
    if model_kwargs.get("use_cache") is not True:
        return "use_cache is not True"
    cfg = model.config
    if getattr(cfg, "output_attentions", False) or getattr(cfg, "output_hidden_states", False):
        return "the model's config asks for attentions or hidden states"
    if _hooked(model):
        return "a module has a hook"
    return None


def step(model, tokens: torch.Tensor, model_kwargs: dict):
    """The logits [rows, 1, vocab] of a one-token step (``tokens`` [rows, 1]),
    or None where the layers' one-call step declines (nothing was changed
    then: the caller runs the model's forward)."""
    from transformers.cache_utils import EncoderDecoderCache

    from integrations import hf_exact_step

    fam = _family(model)
    if fam == "gpt2":
        return _gpt2_step(model, tokens, model_kwargs)
    if fam in ("llama", "qwen2", "mistral"):
        return _llama_step(model, tokens, model_kwargs, fam)
    cache = model_kwargs.get("past_key_values")
    enc_out = model_kwargs.get("encoder_outputs")
    if type(cache) is not EncoderDecoderCache or enc_out is None:
        return None
    enc = enc_out[0]
    enc_mask = model_kwargs.get("attention_mask")
    if fam == "t5":
        return _t5_step(model, tokens, cache, enc, enc_mask)
    dec = model.model.decoder
    if fam == "fsmt":
        return _fsmt_step(dec, tokens, cache, enc, enc_mask)
    # the decoder forward's calls, for input_ids = tokens
    embeds = dec.embed_tokens(tokens)
    if fam == "marian":
        embeds = embeds * dec.embed_scale
    batch, seq = embeds.size()[:-1]
    past = cache.get_seq_length()
    position_ids = torch.arange(seq, device=embeds.device) + past
    # (the decoder forward's attention mask: ones [batch, past + seq])
    causal_mask, encoder_mask = _decoder_masks(dec, embeds, past + seq, cache, enc_mask, enc)
    if fam == "marian":
        h = embeds + dec.embed_positions((batch, seq), past, position_ids=position_ids)
    elif fam == "bart":
        positions = dec.embed_positions(tokens, past, position_ids=position_ids)
        h = dec.layernorm_embedding(embeds + positions.to(embeds.device))
    else:
        positions = dec.embed_positions(tokens, past, position_ids=position_ids)
        h = dec.layernorm_embedding(embeds + positions.to(embeds.device))
    # (dropout: the identity in eval mode)
    runner = hf_exact_step._Runner(dec.layers)
    kwargs = {"encoder_attention_mask": encoder_mask, "past_key_values": cache, "use_cache": True}
    h = runner._exact(h, (causal_mask, enc), kwargs)
    if h is None:
        return None
    _count_step()
    if fam == "mbart":
        h = dec.layer_norm(h)
    if fam == "bart":
        return _lm_logits(model.lm_head, h, model.final_logits_bias.to(h.device))
    return _lm_logits(model.lm_head, h, model.final_logits_bias)


# The group maxima (``[rows, ceil(vocab / 32)]``, linear_packed_maxima's) of
# the last logits a direct step's LM head made on the packed GEMM: [weak
# reference to the logits, their storage and version, the maxima]. The beam search takes
# them for its fused top-k (logit_maxima) instead of a pass over the logits.
_MAXIMA: list = []


def _lm_logits(head, h, extra_bias=None):
    """``head(h)`` (``+ extra_bias``, the model's own add after it): in the
    fused mode, where the packed GEMM takes it, the same product with the
    bias (the head's, or ``extra_bias`` added in the GEMM's epilogue: the
    same one rounding of the same sum) that also notes the logits' group
    maxima (``_MAXIMA``). The same bits either way: the product is dense,
    as the head's own forward is for a weight that is not finite and the
    same as its zero skipping for one that is."""
    _MAXIMA.clear()
    x = h.reshape(-1, h.size(-1))
    bias = head.bias if extra_bias is None else extra_bias.reshape(-1)
    if (
        type(head) is hf_fused.PackedLinear
        and x.size(-1) == head.in_features
        and (head.bias is None or extra_bias is None)
        and (bias is None or bias.size(0) == head.out_features)
        and _MAXIMA_OP[0] is not None
        and packed_linear.kernel_takes(x, head.weight, bias)
    ):
        b = None if bias is None else bias.contiguous()
        y, maxima = _MAXIMA_OP[0](x, packed_linear.packed(head.weight), b, head.out_features)
        _MAXIMA[:] = [weakref.ref(y), packed_linear.tensor_state(y), maxima]
        return y.view(*h.shape[:-1], head.out_features)
    logits = head(h)
    return logits if extra_bias is None else logits + extra_bias


def logit_maxima(logits: torch.Tensor):
    """The group maxima a direct step noted for these logits (``[rows,
    vocab]``, a view of the LM head's output, unchanged since), else None;
    taken once."""
    if not _MAXIMA:
        return None
    ref, state, maxima = _MAXIMA
    _MAXIMA.clear()
    y = ref()
    if (
        y is None
        or logits.dim() != 2
        or logits.data_ptr() != y.data_ptr()
        or tuple(logits.shape) != tuple(y.shape)
        or logits.stride() != y.stride()
        or packed_linear.tensor_state(y) != state
    ):
        return None
    return maxima


def _decoder_masks(dec, inputs_embeds, ones: int | None, cache, enc_mask, enc) -> tuple:
    """An encoder-decoder's decoder forward's two masks: create_causal_mask's
    (the decoder's own ``attention_mask`` argument: ones [batch, ``ones``], or
    None) and the encoder's."""
    causal_mask = _causal_mask_call(
        dec.config, inputs_embeds, None, cache.self_attention_cache, None, ones=ones
    )
    return causal_mask, _encoder_mask(dec.config, inputs_embeds, enc_mask, enc)


# transformers' masking code whose one-token causal mask is known (5.17.0 and
# 5.23.0, read): with the sdpa mask function, no padding (no attention mask,
# or one of ones), a cache that is not compileable and nothing traced,
# create_causal_mask returns None (sdpa's is_causal skip) for a query of one
# token whatever the cache's length (_ignore_causal_mask_sdpa: q_length == 1
# and no padding; no local window in a full-attention mask; a one-token
# query's position ids hold no packed sequence).
_MASKING = {
    "create_causal_mask": {"946de2fbae812519", "2c6f5e0f88800880"},
    "_preprocess_mask_arguments": {"a139adab5982dc6a"},
    "sdpa_mask": {"9816e078b0fbc909", "2ec8fc89abddf638"},
    "_ignore_causal_mask_sdpa": {"ccac7d67c233f728", "8acf176e8206928c"},
    "find_packed_sequence_indices": {"00eb669a30107d89"},
}


def _masking_verified() -> bool:
    """Whether transformers' masking functions (as they are now: a patched
    one is not) are the verified ones."""
    from transformers import masking_utils as mu

    return all(shape_of(getattr(mu, n, None)) in shapes for n, shapes in _MASKING.items())


# The last one-token causal mask that create_causal_mask returned as None:
# [weak reference to the config, the call's key (everything it reads but the
# cache's length)].
_CAUSAL_NONE: list = []


def _causal_mask_call(config, inputs_embeds, attention_mask, cache, position_ids, ones=None):
    """``create_causal_mask(config=config, inputs_embeds=inputs_embeds,
    attention_mask=attention_mask, past_key_values=cache[, position_ids=...])``
    (``ones``: the attention mask is ``torch.ones(batch, ones)``).

    A one-token step with no padding gets None from the verified masking code
    (_MASKING) at every cache length; once a call has returned None, a later
    call with the same config, attention implementation and its mask function,
    embeddings' shape, dtype and device, cache class and the same absence of
    padding returns None without the call's 0.1-0.3 ms of Python."""
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        create_causal_mask,
        sdpa_mask,
    )

    key = None
    if (ones is not None or attention_mask is None) and inputs_embeds.size(1) == 1:
        impl = config._attn_implementation
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS.get(impl) if isinstance(impl, str) else None
        compileable = getattr(cache, "is_compileable", False)
        key = (
            impl,
            mask_fn,
            create_causal_mask,
            getattr(config, "is_causal", True),
            tuple(inputs_embeds.shape),
            inputs_embeds.dtype,
            inputs_embeds.device,
            type(cache),
            compileable,
            ones is None,
            position_ids is None,
        )
        if (
            _CAUSAL_NONE
            and _CAUSAL_NONE[0]() is config
            and _CAUSAL_NONE[1] == key
            and not torch.compiler.is_compiling()
        ):
            return None
    if ones is not None:
        attention_mask = torch.ones(inputs_embeds.size(0), ones, device=inputs_embeds.device)
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    STATS["causal_masks"] += 1
    mask = create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        past_key_values=cache,
        **kwargs,
    )
    if (
        mask is None
        and key is not None
        and impl == "sdpa"
        and mask_fn is sdpa_mask
        and not compileable
        and not torch.compiler.is_compiling()
        and _masking_verified()
    ):
        _CAUSAL_NONE[:] = [weakref.ref(config), key]
    return mask


# The last encoder mask made (_encoder_mask): its inputs, and the mask.
_ENCODER_MASK: list = []


def _encoder_mask(config, inputs_embeds, enc_mask, enc):
    """The decoder's ``create_bidirectional_mask`` call for the encoder output.

    Its result depends on the config (its attention implementation and that
    implementation's mask function), the step embeddings' shape, dtype and
    device, the encoder mask's values and the encoder output's shape, dtype
    and device; while the sentences in the batch stay the same none of these
    changes from one step to the next (the search replaces the mask tensor
    when rows leave), so the mask made for the last step is reused where all
    of them are the same: the same mask tensor object holding the same values
    as then (compared with a copy: inference tensors keep no version counter,
    and a 4-D mask is returned as it is, so the result may be the mask
    itself), and the same everything else. About 0.15 ms of Python a step at
    batch 1, against a few microseconds for the comparison.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_bidirectional_mask

    impl = config._attn_implementation
    key = (
        impl,
        ALL_MASK_ATTENTION_FUNCTIONS.get(impl) if isinstance(impl, str) else None,
        tuple(inputs_embeds.shape),
        inputs_embeds.dtype,
        inputs_embeds.device,
        None if enc_mask is None else (tuple(enc_mask.shape), enc_mask.dtype, enc_mask.device),
        tuple(enc.shape),
        enc.dtype,
        enc.device,
    )
    if _ENCODER_MASK:
        config_ref, mask_ref, values, last_key, mask = _ENCODER_MASK
        if config_ref() is config and last_key == key:
            if enc_mask is None:
                if mask_ref is None:
                    return mask
            elif mask_ref is not None and mask_ref() is enc_mask and torch.equal(enc_mask, values):
                return mask
    mask = create_bidirectional_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=enc_mask,
        encoder_hidden_states=enc,
    )
    _ENCODER_MASK[:] = [
        weakref.ref(config),
        None if enc_mask is None else weakref.ref(enc_mask),
        None if enc_mask is None else enc_mask.clone(),
        key,
        mask,
    ]
    return mask


def _fsmt_step(dec, tokens, cache, enc, enc_mask):
    """FSMTModel's and FSMTDecoder's calls for a cached one-token step (no
    decoder padding or causal mask then), on time-major states; the logits
    are the decoder's output projection."""
    from integrations import hf_fsmt_step

    pad = _module("fsmt").invert_mask(enc_mask) if enc_mask is not None else None
    past = cache.get_seq_length()
    positions = dec.embed_positions(tokens, past_key_values_length=past)
    x = dec.embed_tokens(tokens) * dec.embed_scale
    x += positions
    # (dropout: the identity in eval mode)
    x = x.transpose(0, 1)
    kwargs = {
        "encoder_attn_mask": pad,
        "decoder_padding_mask": None,
        "layer_state": cache,
        "causal_mask": None,
        "output_attentions": False,
    }
    x = hf_fsmt_step._Runner(dec.layers)._exact(x, (enc.transpose(0, 1),), kwargs)
    if x is None:
        return None
    _count_step()
    return _lm_logits(dec.output_projection, x.transpose(0, 1))


def _t5_step(model, tokens, cache, enc, enc_mask):
    """T5ForConditionalGeneration's and the decoder T5Stack's calls for a
    cached one-token step (no decoder attention mask: the search passes none)."""
    from integrations import hf_t5_step

    dec = model.decoder
    inputs_embeds = dec.embed_tokens(tokens)
    causal_mask, encoder_mask = _decoder_masks(dec, inputs_embeds, None, cache, enc_mask, enc)
    # (dropout: the identity in eval mode); the blocks' positional arguments
    # as the stack's loop passes them to its first block
    args = (causal_mask, None, enc, encoder_mask, None)
    h = hf_t5_step._Runner(dec.block)._exact(inputs_embeds, args, {"past_key_values": cache})
    if h is None:
        return None
    _count_step()
    h = dec.final_layer_norm(h)
    if model.config.scale_decoder_outputs:
        h = h * (model.model_dim**-0.5)
    return _lm_logits(model.lm_head, h)


def _prepared(tokens, model_kwargs: dict):
    """A decoder-only step's inputs as prepare_inputs_for_generation gives
    them (the token, the last position id, each a contiguous copy; the
    attention mask), with the cache; None where the cache is not dynamic."""
    from transformers.cache_utils import DynamicCache

    cache = model_kwargs.get("past_key_values")
    if type(cache) is not DynamicCache:
        return None
    contiguous = torch.contiguous_format
    input_ids = tokens.clone(memory_format=contiguous)
    position_ids = model_kwargs["position_ids"][..., -1:].clone(memory_format=contiguous)
    return cache, input_ids, position_ids, model_kwargs.get("attention_mask")


def _head(model, fam: str, hidden_states, model_kwargs: dict):
    """After a layer step that ran: the count, then the LM head on the kept
    positions (slice_logits_to_keep, as the generation model's forward)."""
    _count_step()
    keep = model_kwargs.get("logits_to_keep", 0)
    return _lm_logits(model.lm_head, _module(fam).slice_logits_to_keep(hidden_states, keep))


def _causal_mask(inner, inputs_embeds, attention_mask, cache, position_ids):
    """The decoder-only models' create_causal_mask call."""
    return _causal_mask_call(inner.config, inputs_embeds, attention_mask, cache, position_ids)


def _gpt2_step(model, tokens, model_kwargs: dict):
    """GPT2LMHeadModel's and GPT2Model's calls for a cached one-token step."""
    from integrations import hf_gpt2_step

    prepared = _prepared(tokens, model_kwargs)
    if prepared is None:
        return None
    cache, input_ids, position_ids, attention_mask = prepared
    inner = model.transformer
    inner.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
    input_shape = input_ids.size()
    input_ids = input_ids.view(-1, input_shape[-1])
    batch_size = input_ids.shape[0]
    inputs_embeds = inner.wte(input_ids)
    position_embeds = inner.wpe(position_ids)
    hidden_states = inputs_embeds + position_embeds.to(inputs_embeds.device)
    if attention_mask is not None and attention_mask.ndim < 4:
        attention_mask = attention_mask.view(batch_size, -1)
    causal_mask = _causal_mask(inner, inputs_embeds, attention_mask, cache, position_ids)
    hidden_states = inner.drop(hidden_states)
    output_shape = (-1,) + input_shape[1:] + (hidden_states.size(-1),)
    kwargs = {"encoder_attention_mask": None, "use_cache": True, "position_ids": position_ids}
    runner = hf_gpt2_step._Runner(inner.h)
    hidden_states = runner._exact(hidden_states, (cache, causal_mask, None), kwargs)
    if hidden_states is None:
        return None
    return _head(model, "gpt2", inner.ln_f(hidden_states).view(output_shape), model_kwargs)


def _llama_step(model, tokens, model_kwargs: dict, fam: str = "llama"):
    """LlamaForCausalLM's and LlamaModel's calls for a cached one-token step
    (Qwen2's and Mistral's where their one mask is create_causal_mask's)."""
    from integrations import hf_llama_step

    prepared = _prepared(tokens, model_kwargs)
    if prepared is None:
        return None
    cache, input_ids, position_ids, attention_mask = prepared
    inner = model.model
    inputs_embeds = inner.embed_tokens(input_ids)
    causal_mask = _causal_mask(inner, inputs_embeds, attention_mask, cache, position_ids)
    hidden_states = inputs_embeds
    position_embeddings = inner.rotary_emb(hidden_states, position_ids=position_ids)
    kwargs = {
        "attention_mask": causal_mask,
        "position_embeddings": position_embeddings,
        "position_ids": position_ids,
        "past_key_values": cache,
        "use_cache": True,
    }
    hidden_states = hf_llama_step._Runner(inner.layers)._exact(hidden_states, (), kwargs)
    if hidden_states is None:
        return None
    return _head(model, fam, inner.norm(hidden_states), model_kwargs)
