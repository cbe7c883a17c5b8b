"""The parameter lists the one-call decoder steps read (csrc/exact_decoder.cpp).

fairseq's TransformerDecoderLayer and transformers' BART-family decoder
layers name their parts alike (``self_attn`` with ``q_proj``/``k_proj``/
``v_proj``/``out_proj``, ``self_attn_layer_norm``, ``encoder_attn``,
``encoder_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``), so one
builder serves both steps. The counts per layer (22 tensors, 8 packs) are
``kWeightsPerLayer`` and ``kPackedPerLayer`` of the C++ side.
"""

from __future__ import annotations

from torch import Tensor


def gemm_modules(layer) -> list:
    """The layer's 8 projections in the order of their weight packs: q, k, v,
    out, cross q, cross out, fc1, fc2."""
    sa, ea = layer.self_attn, layer.encoder_attn
    return [
        sa.q_proj,
        sa.k_proj,
        sa.v_proj,
        sa.out_proj,
        ea.q_proj,
        ea.out_proj,
        layer.fc1,
        layer.fc2,
    ]


def stack_weights(layers) -> list[Tensor]:
    """Every layer's 22 tensors, in the order the C++ steps read them."""
    out: list[Tensor] = []
    for lay in layers:
        sa, ea = lay.self_attn, lay.encoder_attn
        for lin in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj):
            out += [lin.weight, lin.bias]
        out += [lay.self_attn_layer_norm.weight, lay.self_attn_layer_norm.bias]
        for lin in (ea.q_proj, ea.out_proj):
            out += [lin.weight, lin.bias]
        out += [lay.encoder_attn_layer_norm.weight, lay.encoder_attn_layer_norm.bias]
        for lin in (lay.fc1, lay.fc2):
            out += [lin.weight, lin.bias]
        out += [lay.final_layer_norm.weight, lay.final_layer_norm.bias]
    return out


def stack_eps(layers) -> list[float]:
    """Every layer's three layer-norm eps (self, encoder, final)."""
    norms = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
    return [float(getattr(lay, n).eps) for lay in layers for n in norms]
