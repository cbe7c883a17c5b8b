"""The exact one-call decoding step for Hugging Face Llama (and Qwen2, Mistral).

``seqfuse._C``'s ``hf_llama_stack_step`` issues, for every
``LlamaDecoderLayer`` in one C++ call, the ATen calls that transformers'
layer, ``LlamaAttention`` (sdpa), ``apply_rotary_pos_emb``, ``LlamaMLP``,
``LlamaRMSNorm``, ``sdpa_attention_forward`` (grouped K/V heads included)
and ``DynamicLayer.update`` issue for a one-token step, on tensors of the
same shapes and strides: the result is bit-identical to the stock layers
(tested against them), without the per-op Python work. The rotary
embeddings stay the model's own (``LlamaModel`` computes them once a step and
passes them to every layer; the step takes them from there).

:func:`enable` (called by ``seqfuse.optimize``) changes, in place, the
``LlamaModel``'s class to a subclass of its own whose forward arms its layer
list; inside that forward the list (and the model's ``layers[:n]`` slice of
all of it) iterates as one runner: for a one-token step with initialised
caches and nothing recording the layers, the runner makes the C++ call and
leaves the caches where ``DynamicLayer.update`` would; for anything else it
runs the stock layers in order.

In the fused mode (``integrations.hf_fused``) the call gets the weights'
panel packs and runs the projections on seqfuse's packed GEMM: within 1e-5 of
stock, not bit-identical.

Supported: Llama, Qwen2 and Mistral decoders of the verified code
(transformers 5.17.0 and 5.23.0: their layer, MLP and norm are Llama's; their
attention passes sdpa a sliding window, None for full attention, and sdpa
takes none) with sdpa attention, full-attention layers only, a dynamic cache, silu (or another verified)
activation, with or without projection biases, one or grouped K/V heads.
"""

from __future__ import annotations

import torch
from torch import nn

from integrations import hf_exact_step
from integrations.hf_exact_step import _library_problem, _recorded
from integrations.hf_gpt2_step import _act_code
from seqfuse._patching import cached_for_structure
from seqfuse.source_shape import shape_of

# transformers code the C++ step mirrors, by the shape of its source, in the
# releases where parity is tested (5.17.0 and 5.23.0: the same Llama code;
# their sdpa_attention_forward differs in how grouped K/V heads meet a mask,
# which the step follows per release, see _gqa_mode).
_VERIFIED = {
    "Llama": {
        "Model.forward": {"44a610917ca25934"},
        "DecoderLayer.forward": {"0d3d9ea02351f893"},
        "Attention.forward": {"d0a0e71bdf63bf15"},
        "MLP.forward": {"3c7fa4d277dc1185"},
        "RMSNorm.forward": {"3d8a4725ba889ef7"},
    },
    # Qwen2: Llama's layer, MLP and norm; its attention passes sdpa a
    # sliding window (None for a full-attention layer, and sdpa takes none),
    # its model a mask per layer type (full attention only here)
    "Qwen2": {
        "Model.forward": {"949fbdbc5124d943"},
        "DecoderLayer.forward": {"0d3d9ea02351f893"},
        "Attention.forward": {"fbbb5ce0c5b51567"},
        "MLP.forward": {"3c7fa4d277dc1185"},
        "RMSNorm.forward": {"3d8a4725ba889ef7"},
    },
    # Mistral: Llama's layer, MLP and norm; its attention passes sdpa the
    # config's sliding window and its model builds a sliding-window mask when
    # there is one (no sliding window only here)
    "Mistral": {
        "Model.forward": {"5123b26f88094335"},
        "DecoderLayer.forward": {"0d3d9ea02351f893"},
        "Attention.forward": {"a9dd75f78b06328a"},
        "MLP.forward": {"3c7fa4d277dc1185"},
        "RMSNorm.forward": {"3d8a4725ba889ef7"},
    },
}
_VERIFIED_ROTARY = {
    "apply_rotary_pos_emb": {"9e69c4f73464b9c2"},
    "rotate_half": {"1628c8074911a0d7"},
}
# use_gqa_in_sdpa by release -> whether that release packs the query of a
# one-token step by K/V head when it does not use sdpa's enable_gqa (5.23:
# pack_gqa; 5.17: repeat_kv of K and V)
_GQA_RELEASES = {"3f9b78583ece22b4": True, "e48c257604994220": False}
_GQA_NONE, _GQA_SDPA, _GQA_REPEAT, _GQA_PACK = 0, 1, 2, 3


def _modeling(family: str):
    if family == "Qwen2":
        from transformers.models.qwen2 import modeling_qwen2

        return modeling_qwen2
    if family == "Mistral":
        from transformers.models.mistral import modeling_mistral

        return modeling_mistral
    from transformers.models.llama import modeling_llama

    return modeling_llama


def _cls(family: str, part: str):
    return getattr(_modeling(family), family + part)


def _llama_library_problem(family: str = "Llama") -> str | None:
    from transformers.integrations import sdpa_attention

    m = _modeling(family)
    for name, shapes in _VERIFIED[family].items():
        part, attr = name.split(".")
        if shape_of(getattr(_cls(family, part), attr)) not in shapes:
            return f"this transformers' {family}{name} is not the verified one"
    for name, shapes in _VERIFIED_ROTARY.items():
        if shape_of(getattr(m, name)) not in shapes:
            return f"this transformers' {family} {name} is not the verified one"
    if shape_of(sdpa_attention.use_gqa_in_sdpa) not in _GQA_RELEASES:
        return "this transformers' use_gqa_in_sdpa is not the verified one"
    return _library_problem()


def _family(model) -> str | None:
    """The family ("Llama", "Qwen2", "Mistral") of such a model or its inner model, else None."""
    for family in _VERIFIED:
        try:
            base = _cls(family, "Model")
        except (ImportError, AttributeError):  # pragma: no cover
            continue
        if isinstance(model, base) or isinstance(getattr(model, "model", None), base):
            return family
    return None


def _inner(model):
    """The model's Llama-family base model (the model itself or its ``model``), or None."""
    family = _family(model)
    if family is None:
        return None
    return model if isinstance(model, _cls(family, "Model")) else model.model


def is_llama(model) -> bool:
    return _inner(model) is not None


def _projections(layer) -> tuple:
    a, f = layer.self_attn, layer.mlp
    return (a.q_proj, a.k_proj, a.v_proj, a.o_proj, f.gate_proj, f.up_proj, f.down_proj)


def problem(model) -> str | None:
    """Why the one-call step cannot reproduce this model's layers, or None."""
    from seqfuse import _ext

    if _ext._C is None:
        return "the compiled extension is not available"
    inner = _inner(model)
    if inner is None:
        return "not a Llama, Qwen2 or Mistral model"
    layers = list(inner.layers)
    if not layers:
        return "no decoder layers"
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {cfg._attn_implementation!r} (sdpa only)"
    if len(layers) != cfg.num_hidden_layers:
        return "the layer list and num_hidden_layers differ"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return "layers other than full attention"
    if getattr(cfg, "sliding_window", None) is not None and _family(model) == "Mistral":
        return "sliding-window attention"
    family = _family(model)
    why = _llama_library_problem(family)
    if why is not None:
        return why
    linears = hf_exact_step._linear_types()
    first = layers[0]
    for i, lay in enumerate(layers):
        where = f"decoder layer {i}"
        if type(lay) is not _cls(family, "DecoderLayer") or type(lay.self_attn) is not _cls(
            family, "Attention"
        ):
            return f"{where}: not a {family}DecoderLayer with {family}Attention"
        if type(lay.mlp) is not _cls(family, "MLP"):
            return f"{where}: MLP {type(lay.mlp).__name__}"
        for norm in (lay.input_layernorm, lay.post_attention_layernorm):
            if type(norm) is not _cls(family, "RMSNorm"):
                return f"{where}: norm {type(norm).__name__}"
        projections = _projections(lay)
        if any(type(p) not in linears for p in projections):
            return f"{where}: projections must be nn.Linear"
        if len({p.weight.dtype for p in projections}) != 1:
            return f"{where}: projections of different dtypes"
        act = lay.mlp.act_fn
        if _act_code(act) is None or type(act) is not type(first.mlp.act_fn):
            return f"{where}: activation {type(act).__name__}"
        a, a0 = lay.self_attn, first.self_attn
        if (a.head_dim, a.num_key_value_groups, a.scaling) != (
            a0.head_dim,
            a0.num_key_value_groups,
            a0.scaling,
        ):
            return "attention modules differ in heads, head size or scaling"
        if a.layer_idx != i:
            return f"{where}: attention layer_idx {a.layer_idx}"
        if a.head_dim % 2:
            return f"{where}: odd head size"
        if getattr(a, "sliding_window", None) is not None:
            return f"{where}: sliding-window attention"
    return None


def _plan(layers, cfg) -> dict:
    w0 = layers[0].self_attn.q_proj.weight
    empty = torch.empty(0, dtype=w0.dtype, device=w0.device)  # an absent weight
    weights, eps = [], []
    for lay in layers:
        q, k, v, o, gate, up, down = _projections(lay)
        weights.append(lay.input_layernorm.weight)
        for p in (q, k, v, o):
            weights += [p.weight, empty if p.bias is None else p.bias]
        weights.append(lay.post_attention_layernorm.weight)
        for p in (gate, up, down):
            weights += [p.weight, empty if p.bias is None else p.bias]
        eps += [
            float(lay.input_layernorm.variance_epsilon),
            float(lay.post_attention_layernorm.variance_epsilon),
        ]
    a = layers[0].self_attn
    heads = int(cfg.num_attention_heads)
    return {
        "weights": weights,
        "eps": eps,
        "heads": heads,
        "kv_heads": heads // int(a.num_key_value_groups),
        "head_dim": int(a.head_dim),
        "scaling": float(a.scaling),
        "act": _act_code(layers[0].mlp.act_fn),
    }


def _gqa_mode(layers, mask, keys) -> int | None:
    """How this release's sdpa_attention_forward runs grouped K/V heads for a
    one-token step with this mask (None: a path the step does not take)."""
    from transformers.integrations import sdpa_attention

    if layers[0].self_attn.num_key_value_groups == 1:
        return _GQA_NONE
    if sdpa_attention.use_gqa_in_sdpa(mask, keys, keys):
        return _GQA_SDPA
    packs = _GQA_RELEASES.get(shape_of(sdpa_attention.use_gqa_in_sdpa))
    if packs is None:
        return None
    if packs:
        from transformers.utils.import_utils import is_torchdynamo_compiling

        if is_torchdynamo_compiling():
            return None
        return _GQA_PACK
    return _GQA_REPEAT


# Keyword arguments LlamaModel passes its layers that the step reproduces.
_KWARGS = {"attention_mask", "position_embeddings", "position_ids", "past_key_values", "use_cache"}


class _Runner(hf_exact_step._Runner):
    """What the layer loop gets instead of its layers (one item)."""

    def _exact(self, x, args, kwargs):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = list(nn.ModuleList.__iter__(self.layers))
        if args or not set(kwargs) <= _KWARGS:
            return None
        if x.dim() != 3 or x.size(1) != 1 or torch.is_grad_enabled() or layers[0].training:
            return None
        cache = kwargs.get("past_key_values")
        if type(cache) is not DynamicCache or len(cache.layers) < len(layers) or cache.offloading:
            return None
        n = len(layers)
        for i in range(n):
            if type(cache.layers[i]) is not DynamicLayer or not cache.layers[i].is_initialized:
                return None
        pe = kwargs.get("position_embeddings")
        if not isinstance(pe, tuple) or len(pe) != 2:
            return None
        cos, sin = pe
        if cos.dim() != 3 or cos.size(1) != 1 or cos.shape != sin.shape:
            return None
        if _recorded(layers, lambda lay: (lay, lay.self_attn, lay.mlp), self.layers):
            return None
        mask = kwargs.get("attention_mask")
        gqa = _gqa_mode(layers, mask, cache.layers[0].keys)
        if gqa is None:
            return None
        cfg = layers[0].self_attn.config
        plan = cached_for_structure(self.layers, "_seqfuse_plan", lambda _: _plan(layers, cfg))
        packs = hf_exact_step.fused_packs(
            layers[0].self_attn.q_proj,
            x,
            self.layers,
            lambda: [p for lay in layers for p in _projections(lay)],
        )
        order = hf_exact_step.pending_order(cache)
        x, new_k, new_v = torch.ops.seqfuse.hf_llama_stack_step(
            x,
            plan["weights"],
            [cache.layers[i].keys for i in range(n)],
            [cache.layers[i].values for i in range(n)],
            cos,
            sin,
            mask,
            plan["eps"],
            plan["heads"],
            plan["kv_heads"],
            plan["head_dim"],
            plan["scaling"],
            plan["act"],
            gqa,
            packs,
            order,
            *hf_exact_step.kv_rooms(cache, n, packs, order),
        )
        hf_exact_step.step_took_order(cache)
        for i in range(n):  # where DynamicLayer.update leaves them
            cache.layers[i].keys = new_k[i]
            cache.layers[i].values = new_v[i]
        return x


class ExactLayers(hf_exact_step.ExactLayers):
    """The model's own layer list (same modules); inside the model's forward it,
    and its slice of every layer (``layers[:num_hidden_layers]``), iterate as
    one :class:`_Runner`."""

    runner = _Runner

    def __getitem__(self, idx):
        if (
            isinstance(idx, slice)
            and self.__dict__.get("_seqfuse_armed")
            and range(len(self))[idx] == range(len(self))
        ):
            return self
        return super().__getitem__(idx)


class _ExactLlama(hf_exact_step._ExactDecoder):
    """Mixed into the LlamaModel's own class: arms its layer list during forward."""

    _seqfuse_hf_exact = False  # (hf_exact_step's BART-family marker)
    _seqfuse_hf_llama_exact = True
    _seqfuse_layer_list = "layers"


def enable(model) -> str | None:
    """Give the model's Llama layers the one-call step (in place); returns why
    not, or None. Idempotent."""
    return hf_exact_step.enable_step(
        _inner(model), "_seqfuse_hf_llama_exact", lambda: problem(model), ExactLayers, _ExactLlama
    )


def disable(model) -> None:
    """Undo :func:`enable`."""
    hf_exact_step.disable_step(_inner(model), "_seqfuse_hf_llama_exact")
