"""The fused one-call decoder step: all fused decoder layers in one C++ call.

``FusedTransformerDecoder`` (seqfuse.layers.fairseq) runs an incremental step
layer by layer, each ``FusedTransformerDecoderLayer.fused_forward`` issuing a
dozen seqfuse ops from Python. ``seqfuse._C``'s ``fused_decoder_step`` runs the
same kernels (packed-weight GEMMs, the attention core over the preallocated
caches, add + layernorm, bias + activation) on the same tensors in the same
order for every layer, so its output is bit-identical to the layer-by-layer
path (tested on every step), without the Python and dispatcher work between
the ops that dominates small-batch steps.

It takes a step when

- the decoder is in incremental decoding and every layer's caches exist (the
  first step runs the layers: it allocates the caches and computes the
  encoder K/V once per sentence);
- the step is float32 on the CPU and the packed GEMM kernel runs there;
- every layer is a fused layer with cross-attention, biased projections and
  the same heads, norm placement and activation (checked once per generation,
  with the weight packs gathered then).

The cache bookkeeping (growth, repack, reorder) stays in
``seqfuse.layers.kv_cache``; this call writes the step's K/V into the caches'
next slot. Anything else, or ``SEQFUSE_FUSED_STEP=0``, runs the layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqfuse import _ext
from seqfuse.ops.bias_act import ACTIVATIONS
from seqfuse.ops.linear import kernel_takes, packed

FUSED_STEP_ENV = "SEQFUSE_FUSED_STEP"
# Incremental steps taken by the one-call path ("one_call") and by the layers
# ("layers") of fused decoders: tests and benchmarks read them.
STATS = {"one_call": 0, "layers": 0}
# incremental_state key of the step's plan (looked up once per generation).
PLAN_KEY = "seqfuse.fused_step_plan"


def cached_plan(decoder, x: Tensor) -> dict | str:
    """:func:`step_plan`, reused while the layers' parameters (storage and
    version counter), the step's dtype and device are unchanged."""
    if not _ext.env_flag(FUSED_STEP_ENV, True):
        return f"{FUSED_STEP_ENV}=0"
    params = tuple(
        (p.data_ptr(), -1 if p.is_inference() else p._version) for p in decoder.layers.parameters()
    )
    key = (x.dtype, x.device, params)
    hit = decoder.__dict__.get("_seqfuse_fused_step_plan")
    if hit is not None and hit[0] == key:
        return hit[1]
    plan = step_plan(decoder, x)
    decoder.__dict__["_seqfuse_fused_step_plan"] = (key, plan)
    return plan


def step_plan(decoder, x: Tensor) -> dict | str:
    """The per-generation constants of the one-call step (weight packs, eps,
    scalings, heads), or why the layers must run instead."""
    if not _ext.env_flag(FUSED_STEP_ENV, True):
        return f"{FUSED_STEP_ENV}=0"
    if not _ext.cpu_available()[0]:
        return "the extension is not available"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "not a float32 CPU step"
    layers = list(decoder.layers)
    first = layers[0]
    params: list[Tensor] = []
    nums: list[float] = []
    heads: list[int] = []
    for layer in layers:
        sa, ea = layer.self_attn, layer.encoder_attn
        if ea is None:
            return "a layer without cross-attention"
        if (
            layer.normalize_before != first.normalize_before
            or layer._fused_act != first._fused_act
            or layer._fused_act not in ACTIVATIONS
        ):
            return "layers differ in norm placement or activation"
        if sa.num_heads != ea.num_heads:
            return "self- and cross-attention head counts differ"
        if getattr(layer, "attn_ln", None) is not None or getattr(layer, "ffn_layernorm", None):
            return "extra layer norms (NormFormer)"
        w_qkv, b_qkv = layer._fused_packed_self.get(
            (sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight),
            (sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias),
        )
        gemms = (w_qkv, sa.out_proj.weight, ea.q_proj.weight, ea.out_proj.weight)
        gemms += (layer.fc1.weight, layer.fc2.weight)
        biases = (b_qkv, sa.out_proj.bias, ea.q_proj.bias, ea.out_proj.bias)
        biases += (layer.fc1.bias, layer.fc2.bias)
        norms = (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm)
        norms += (layer.final_layer_norm,)
        if any(b is None for b in biases) or any(
            type(n) is not torch.nn.LayerNorm or n.weight is None or n.bias is None for n in norms
        ):
            return "a projection without bias or a norm without affine parameters"
        if not all(kernel_takes(x[0], w, b) for w, b in zip(gemms, biases)):
            return "the packed GEMM does not take these parameters here"
        ln = [(n.weight.detach(), n.bias.detach()) for n in norms]
        packs = [packed(w) for w in gemms]
        b = [t.detach().contiguous() for t in biases]
        params += [packs[0], b[0], packs[1], b[1], *ln[0]]
        params += [packs[2], b[2], packs[3], b[3], *ln[1]]
        params += [packs[4], b[4], packs[5], b[5], *ln[2]]
        nums += [float(n.eps) for n in norms]
        nums += [float(sa.scaling), float(ea.scaling)]
        heads.append(int(sa.num_heads))
    return {
        "params": params,
        "nums": nums,
        "heads": heads,
        "pre_norm": bool(first.normalize_before),
        "act": ACTIVATIONS[first._fused_act],
    }


def one_call_step(decoder, x: Tensor, incremental_state, step_pad: Tensor, align_layer: int):
    """Every layer of an incremental step in one call: ``x [1, n, C]`` ->
    ``(x [1, n, C], attn weights of align_layer [heads, n, 1, S] or None,
    per-layer outputs)``, or None when the layers must run."""
    caches = [incremental_state.get(layer._fused_key) for layer in decoder.layers]
    if any(c is None or "self" not in c or "cross" not in c for c in caches):
        return None  # the first step: the layers build the caches
    plan = incremental_state.get(PLAN_KEY)
    if plan is None:
        plan = cached_plan(decoder, x)
        incremental_state[PLAN_KEY] = plan
    if isinstance(plan, str):
        return None
    t, n, c = x.shape
    selfs = [cs["self"] for cs in caches]
    crosses = [cs["cross"] for cs in caches]
    slot = selfs[0].length
    for cache in selfs:
        if cache.n != n or cache.length != slot:
            return None  # not in step with the rows (the layers raise the error)
        r_cap, l_cap = cache.capacity
        if n > r_cap or slot + 1 > l_cap:
            cache._grow(n, slot + 1)
    q_per_kv = crosses[0].q_per_kv
    if any(cc.q_per_kv != q_per_kv for cc in crosses):
        return None
    outs, attn = torch.ops.seqfuse.fused_decoder_step(
        x.view(n, c),
        plan["params"],
        plan["nums"],
        [cache.kv for cache in selfs],
        [cache.rows for cache in selfs],
        [cache.pad for cache in selfs],
        slot,
        step_pad.view(n),
        [cc.kv for cc in crosses],
        [cc.map[: cc.n] for cc in crosses],
        [cc.pad for cc in crosses],
        q_per_kv,
        plan["heads"],
        plan["pre_norm"],
        plan["act"],
        align_layer,
    )
    for cache in selfs:
        cache.length = slot + 1
    inner = [o.view(1, n, c) for o in outs]
    return inner[-1], attn, inner
