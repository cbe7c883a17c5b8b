"""The exact one-call decoder step for Hugging Face FSMT models (fairseq's
WMT19 transformers as ported to transformers, and ``integrations.fairseq_to_hf``'s
conversions).

FSMT's decoder layers run an eager attention of their own (``bmm``, the key
padding filled with the dtype's lowest value, ``softmax``, ``bmm``) on
time-major ``[1, bsz, C]`` states. ``seqfuse._C``'s ``hf_fsmt_stack_step``
issues those ATen calls, and ``DynamicLayer.update``'s, for every layer in
one C++ call: bit-identical to the stock layers (tested against them), the
per-op Python work gone. In the fused mode (``fused_layers=True``) the same
call runs the projections on the packed GEMM. The search's deferred beam
reorder of the self-attention cache (``hf_exact_step.defer_reorder``) is
taken here too.

Wiring as ``hf_exact_step``'s: the decoder's class gets a mixin whose forward
arms the layer list (not while attentions or hidden states are collected:
FSMT's loop gathers them layer by layer), and the armed list iterates as one
runner returning the loop's ``(x, self_attn, cross_attn)``. Verified code:
transformers 5.17.0 and 5.23.0 (the layer and attention forwards by the
shape of their source); other code runs the stock layers.
"""

from __future__ import annotations

import torch
from torch import nn

from integrations import hf_exact_step
from seqfuse._patching import cached_for_structure
from seqfuse.layer_stack import gemm_modules
from seqfuse.source_shape import shape_of

# The FSMT code the C++ step re-issues (5.17.0 and 5.23.0: the same shapes).
_LAYER_FORWARD = "54dcc2330be56dfb"
_ATTENTION_FORWARD = "fdad77141cb84a9b"


def _decoder(model):
    from transformers.models.fsmt.modeling_fsmt import FSMTDecoder

    inner = getattr(model, "model", model)
    dec = getattr(inner, "decoder", None)
    return dec if isinstance(dec, FSMTDecoder) else None


def is_fsmt(model) -> bool:
    return _decoder(model) is not None


def _fsmt_library_problem() -> str | None:
    """Why this transformers' FSMT code is not the verified one, or None."""
    from transformers.cache_utils import DynamicLayer
    from transformers.models.fsmt.modeling_fsmt import Attention, DecoderLayer

    if shape_of(DecoderLayer.forward) != _LAYER_FORWARD:
        return "this transformers' FSMT DecoderLayer.forward is not the verified one"
    if shape_of(Attention.forward) != _ATTENTION_FORWARD:
        return "this transformers' FSMT Attention.forward is not the verified one"
    if shape_of(DynamicLayer.update) != hf_exact_step._CACHE_UPDATE:
        return "this transformers' DynamicLayer.update is not the verified one"
    return None


def problem(model) -> str | None:
    """Why the one-call step cannot reproduce this FSMT decoder, or None."""
    from transformers.models.fsmt.modeling_fsmt import Attention, DecoderLayer

    from seqfuse import _ext

    if _ext._C is None:
        return "the compiled extension is not available"
    dec = _decoder(model)
    if dec is None:
        return "not an FSMT model"
    why = _fsmt_library_problem()
    if why is not None:
        return why
    layers = list(dec.layers)
    if not layers:
        return "no decoder layers"
    first = layers[0]
    for i, lay in enumerate(layers):
        where = f"decoder layer {i}"
        if type(lay) is not DecoderLayer:
            return f"{where}: not FSMT's DecoderLayer"
        if type(lay.self_attn) is not Attention or type(lay.encoder_attn) is not Attention:
            return f"{where}: not FSMT's Attention"
        why = hf_exact_step.layer_parts_problem(lay, first, where)
        if why is not None:
            return why
    return None


# Keyword arguments FSMT's loop passes its layers.
_KWARGS = {
    "encoder_attn_mask",
    "decoder_padding_mask",
    "layer_state",
    "causal_mask",
    "output_attentions",
}


class _Runner(hf_exact_step._Runner):
    """What FSMT's layer loop gets instead of its layers (one item): the
    loop unpacks ``(x, self_attn, cross_attn)`` from each layer."""

    def __call__(self, x, *args, **kwargs):
        out = self._exact(x, args, kwargs)
        if out is not None:
            hf_exact_step.STATS["exact"] += 1
            return out, None, None
        hf_exact_step.flush_reorders_in(args, kwargs)  # the stock layers read the caches
        hf_exact_step.STATS["stock"] += x.dim() == 3 and x.size(0) == 1
        self_attn = cross_attn = None
        for layer in nn.ModuleList.__iter__(self.layers):
            x, self_attn, cross_attn = layer(x, *args, **kwargs)
        return x, self_attn, cross_attn

    def _exact(self, x, args, kwargs):
        layers = list(nn.ModuleList.__iter__(self.layers))
        if len(args) != 1 or not set(kwargs) <= _KWARGS:
            return None
        if kwargs.get("output_attentions") or kwargs.get("causal_mask") is not None:
            return None
        if kwargs.get("decoder_padding_mask") is not None:
            return None
        if x.dim() != 3 or x.size(0) != 1 or x.dtype != torch.float32:
            return None
        if torch.is_grad_enabled() or layers[0].training:
            return None
        cache = kwargs.get("layer_state")
        n = len(layers)
        if not hf_exact_step.encoder_decoder_cache_ready(cache, n):
            return None
        if hf_exact_step._recorded(layers, owner=self.layers):
            return None
        pad = kwargs.get("encoder_attn_mask")
        if pad is not None and (pad.dim() != 2 or pad.dtype != torch.bool):
            return None
        sc, cc = cache.self_attention_cache, cache.cross_attention_cache
        plan = cached_for_structure(
            self.layers, "_seqfuse_plan", lambda _: hf_exact_step.stack_plan(layers)
        )
        packs, finite = hf_exact_step.fused_gemm(
            layers[0].fc1, x, self.layers, lambda: [m for lay in layers for m in gemm_modules(lay)]
        )
        order = hf_exact_step.pending_order(sc)
        x, new_k, new_v = torch.ops.seqfuse.hf_fsmt_stack_step(
            x,
            plan["weights"],
            [sc.layers[i].keys for i in range(n)],
            [sc.layers[i].values for i in range(n)],
            [cc.layers[i].keys for i in range(n)],
            [cc.layers[i].values for i in range(n)],
            pad,
            plan["eps"],
            plan["heads"],
            plan["scaling"],
            plan["act"],
            packs,
            order,
            # fc2 (the 8th of a layer's 8 products) after a ReLU
            plan["act"] == hf_exact_step.RELU and hf_exact_step.skips_zeros(finite, 7, 8),
            *hf_exact_step.kv_rooms(sc, n, packs, order),
        )
        hf_exact_step.step_took_order(sc)
        for i in range(n):  # where DynamicLayer.update leaves them
            sc.layers[i].keys = new_k[i]
            sc.layers[i].values = new_v[i]
        return x


class ExactLayers(hf_exact_step.ExactLayers):
    runner = _Runner


class _ExactFSMT(hf_exact_step._ExactDecoder):
    """Mixed into FSMTDecoder's class: arms its layer list during forward,
    unless attentions or hidden states are collected layer by layer."""

    _seqfuse_hf_exact = False  # (hf_exact_step's BART-family marker)
    _seqfuse_hf_fsmt_exact = True

    def forward(self, *args, **kwargs):
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            # the stock forward with the layer list as it is (unarmed)
            hf_exact_step.flush_reorders_in(args, kwargs)
            return type(self).__bases__[1].forward(self, *args, **kwargs)
        return super().forward(*args, **kwargs)


def enable(model) -> str | None:
    """Give the model's FSMT decoder the one-call step (in place); returns why
    not, or None. Idempotent."""
    return hf_exact_step.enable_step(
        _decoder(model), "_seqfuse_hf_fsmt_exact", lambda: problem(model), ExactLayers, _ExactFSMT
    )


def disable(model) -> None:
    """Undo :func:`enable`."""
    hf_exact_step.disable_step(_decoder(model), "_seqfuse_hf_fsmt_exact")
