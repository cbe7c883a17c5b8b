"""One C++ call for a whole stack of fused layers: the decoder step, the encoder.

``FusedTransformerDecoder`` (seqfuse.layers.fairseq) runs an incremental step
layer by layer, each ``FusedTransformerDecoderLayer.fused_forward`` issuing a
dozen seqfuse ops from Python. ``seqfuse._C``'s ``fused_decoder_step`` runs the
same kernels (packed-weight GEMMs, the attention core over the preallocated
caches, add + layernorm, bias + activation) on the same tensors in the same
order for every layer, so its output is bit-identical to the layer-by-layer
path (tested on every step), without the Python and dispatcher work between
the ops that dominates small-batch steps.

It takes a step when

- the decoder is in incremental decoding, one token per row (the first step
  creates every layer's caches first, as the layers would: empty
  self-attention caches and the encoder K/V once per sentence);
- the step is float32 on the CPU and the packed GEMM kernel runs there;
- every layer is a fused layer with cross-attention, biased projections and
  the same heads, norm placement and activation (checked once per generation,
  with the weight packs gathered then).

The cache bookkeeping (growth, repack, reorder) stays in
``seqfuse.layers.kv_cache``; this call writes the step's K/V into the caches'
next slot.

The encoder likewise: ``fused_encoder_stack`` runs every fused encoder layer
over the embedded source in one call (``FusedTransformerEncoder``), when the
encoder's ``forward_scriptable`` is fairseq 0.12's (whose code around the
layer loop the fused encoder repeats), no intermediate states are asked for,
and the source is float32 on the CPU.

Anything else, or ``SEQFUSE_FUSED_STEP=0``, runs the layers one by one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqfuse import _ext
from seqfuse.layers.transformer import FusedTransformerEncoderLayer, qkv_weights
from seqfuse.ops.bias_act import ACTIVATIONS
from seqfuse.ops.linear import kernel_takes, packed
from seqfuse.source_shape import shape_of

FUSED_STEP_ENV = "SEQFUSE_FUSED_STEP"
# Incremental steps taken by the one-call path ("one_call") and by the layers
# ("layers") of fused decoders, and one-call encoder runs ("encoder"): tests
# and benchmarks read them.
STATS = {"one_call": 0, "layers": 0, "encoder": 0}
# incremental_state key of the step's plan (looked up once per generation).
PLAN_KEY = "seqfuse.fused_step_plan"
# one_call_step's mean_heads for "every head".
ALL_HEADS = 2**31 - 1


def _params_key(module: torch.nn.Module) -> tuple:
    """(storage, version counter) of every parameter under ``module``: a walk
    over the modules' own dicts (what ``parameters()`` visits, without its
    generator machinery; this runs once per generation)."""
    key = []
    todo = [module]
    while todo:
        m = todo.pop()
        for p in m._parameters.values():
            if p is not None:
                key.append((p.data_ptr(), -1 if p.is_inference() else p._version))
        todo.extend(sub for sub in m._modules.values() if sub is not None)
    return tuple(key)


def _cached(stack, x: Tensor, attr: str, build) -> dict | str:
    """``build(stack, x)``, reused while the layers' parameters (storage and
    version counter), the input's dtype and device are unchanged."""
    if not _ext.env_flag(FUSED_STEP_ENV, True):
        return f"{FUSED_STEP_ENV}=0"
    key = (x.dtype, x.device, _params_key(stack.layers))
    hit = stack.__dict__.get(attr)
    if hit is not None and hit[0] == key:
        return hit[1]
    plan = build(stack, x)
    stack.__dict__[attr] = (key, plan)
    return plan


def cached_plan(decoder, x: Tensor) -> dict | str:
    """:func:`step_plan`, reused while nothing it depends on changes."""
    return _cached(decoder, x, "_seqfuse_fused_step_plan", step_plan)


def _common_problem(layers, x: Tensor) -> str | None:
    if not _ext.cpu_available()[0]:
        return "the extension is not available"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "not a float32 CPU input"
    first = layers[0]
    for layer in layers:
        if (
            layer.normalize_before != first.normalize_before
            or layer._fused_act != first._fused_act
            or layer._fused_act not in ACTIVATIONS
        ):
            return "layers differ in norm placement or activation"
    return None


def _blocks(x2d: Tensor, blocks) -> list[Tensor] | str:
    """The C++ stacks' parameter list for ``blocks`` of ((weight, bias),
    (weight, bias), LayerNorm): per block the two GEMMs' packs and biases, then
    the norm's weight and bias; or why the stack cannot take them."""
    out: list[Tensor] = []
    for first, second, norm in blocks:
        for w, b in (first, second):
            if b is None:
                return "a projection without bias"
            if not kernel_takes(x2d, w, b):
                return "the packed GEMM does not take these parameters here"
            out += [packed(w), b.detach().contiguous()]
        if type(norm) is not torch.nn.LayerNorm or norm.weight is None or norm.bias is None:
            return "a norm without affine parameters"
        out += [norm.weight.detach(), norm.bias.detach()]
    return out


def _plan(layers, params: list[Tensor], nums: list[float]) -> dict:
    return {
        "params": params,
        "nums": nums,
        "heads": [int(layer.self_attn.num_heads) for layer in layers],
        "pre_norm": bool(layers[0].normalize_before),
        "act": ACTIVATIONS[layers[0]._fused_act],
    }


# fairseq's TransformerEncoderBase.forward_scriptable as the fused encoder
# repeats it around the layer loop (fairseq 0.12), by the shape of its source.
_ENCODER_FORWARD = "f3328021cf33d158"


def encoder_plan(encoder, x: Tensor) -> dict | str:
    """The constants of the one-call encoder stack, or why the layers run."""
    from fairseq.models.transformer import TransformerEncoderBase

    if shape_of(TransformerEncoderBase.forward_scriptable) != _ENCODER_FORWARD:
        return "this fairseq's TransformerEncoderBase.forward_scriptable is not the verified one"
    layers = list(encoder.layers)
    if not layers or not all(type(layer) is FusedTransformerEncoderLayer for layer in layers):
        return "not every encoder layer is a fused layer"
    why = _common_problem(layers, x)
    if why is not None:
        return why
    params: list[Tensor] = []
    nums: list[float] = []
    for layer in layers:
        if layer.return_fc:
            return "return_fc"
        sa = layer.self_attn
        flat = _blocks(
            x[0],
            [
                (qkv_weights(layer, layer._fused_packed), (sa.out_proj.weight, sa.out_proj.bias),
                 layer.self_attn_layer_norm),
                ((layer.fc1.weight, layer.fc1.bias), (layer.fc2.weight, layer.fc2.bias),
                 layer.final_layer_norm),
            ],
        )  # fmt: skip
        if isinstance(flat, str):
            return flat
        params += flat
        nums += [float(layer.self_attn_layer_norm.eps), float(layer.final_layer_norm.eps)]
        nums.append(float(sa.scaling))
    return _plan(layers, params, nums)


def encoder_stack_takes(encoder, src_tokens: Tensor) -> bool:
    """Whether the fused encoder runs its layers in one call for this input."""
    if encoder.training or src_tokens.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters()):
        return False
    probe = encoder.embed_tokens.weight[:1].unsqueeze(0)  # [1, 1, C]: dtype and device
    plan = _cached(encoder, probe, "_seqfuse_fused_encoder_plan", encoder_plan)
    return isinstance(plan, dict)


def encoder_stack(encoder, x: Tensor, key_pad: Tensor | None) -> Tensor:
    """Every fused encoder layer over ``x [T, B, C]`` in one call (after
    :func:`encoder_stack_takes` said yes)."""
    plan = encoder.__dict__["_seqfuse_fused_encoder_plan"][1]
    STATS["encoder"] += 1
    return torch.ops.seqfuse.fused_encoder_stack(
        x, plan["params"], plan["nums"], key_pad, plan["heads"], plan["pre_norm"], plan["act"]
    )


def step_plan(decoder, x: Tensor) -> dict | str:
    """The constants of the one-call decoder step (weight packs, eps,
    scalings, heads), or why the layers must run instead."""
    layers = list(decoder.layers)
    why = _common_problem(layers, x)
    if why is not None:
        return why
    params: list[Tensor] = []
    nums: list[float] = []
    for layer in layers:
        sa, ea = layer.self_attn, layer.encoder_attn
        if ea is None:
            return "a layer without cross-attention"
        if sa.num_heads != ea.num_heads:
            return "self- and cross-attention head counts differ"
        if getattr(layer, "attn_ln", None) is not None or getattr(layer, "ffn_layernorm", None):
            return "extra layer norms (NormFormer)"
        flat = _blocks(
            x[0],
            [
                (qkv_weights(layer, layer._fused_packed_self),
                 (sa.out_proj.weight, sa.out_proj.bias), layer.self_attn_layer_norm),
                ((ea.q_proj.weight, ea.q_proj.bias), (ea.out_proj.weight, ea.out_proj.bias),
                 layer.encoder_attn_layer_norm),
                ((layer.fc1.weight, layer.fc1.bias), (layer.fc2.weight, layer.fc2.bias),
                 layer.final_layer_norm),
            ],
        )  # fmt: skip
        if isinstance(flat, str):
            return flat
        params += flat
        norms = (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm)
        nums += [float(n.eps) for n in norms]
        nums += [float(sa.scaling), float(ea.scaling)]
    return _plan(layers, params, nums)


def _first_step_caches(layers, x: Tensor, incremental_state, enc: Tensor, enc_pad) -> list:
    """The caches the layer path's first step creates (its layers' own
    ``_self_cache`` and ``_cross_cache``)."""
    _, n, c = x.shape
    caches = []
    for layer in layers:
        state = layer._caches(incremental_state)
        state["self"] = layer._self_cache(incremental_state, n, 1, c, x)
        state["cross"] = layer._cross_cache(enc, enc_pad, n, incremental_state)
        caches.append(state)
    return caches


def one_call_step(
    decoder,
    x: Tensor,
    incremental_state,
    step_pad: Tensor,
    align_layer: int,
    enc: Tensor,
    enc_pad: Tensor | None,
    mean_heads: int = -1,
):
    """Every layer of an incremental step in one call: ``x [1, n, C]`` ->
    ``(x [1, n, C], attn weights of align_layer or None, per-layer outputs)``,
    or None when the layers must run. The weights are per head,
    ``[heads, n, 1, S]``, or with ``mean_heads >= 0`` their mean over the
    first ``mean_heads`` heads, ``[n, 1, S]`` (the decoder's ``_head_mean``,
    the same operations). The first step creates the caches first, as the
    layers would."""
    t, n, c = x.shape
    if t != 1:
        return None
    plan = incremental_state.get(PLAN_KEY)
    if plan is None:
        plan = cached_plan(decoder, x)
        incremental_state[PLAN_KEY] = plan
    if isinstance(plan, str):
        return None
    caches = [incremental_state.get(layer._fused_key) for layer in decoder.layers]
    if all(c is None for c in caches):
        caches = _first_step_caches(decoder.layers, x, incremental_state, enc, enc_pad)
    elif any(c is None or "self" not in c or "cross" not in c for c in caches):
        return None  # caches the layers made (the layers keep them in step)
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
        None if step_pad is None else step_pad.reshape(n),
        [cc.kv for cc in crosses],
        [cc.map[: cc.n] for cc in crosses],
        [cc.pad for cc in crosses],
        q_per_kv,
        plan["heads"],
        plan["pre_norm"],
        plan["act"],
        align_layer,
        mean_heads,
    )
    for cache in selfs:
        cache.length = slot + 1
    inner = [o.view(1, n, c) for o in outs]
    return inner[-1], attn, inner
