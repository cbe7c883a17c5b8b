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

seqfuse's generator goes one further on a fused decoder: ``step_logits`` runs
the whole network of a step (the embedding with its scale and positions, the
layers as above, the final norm and the vocabulary projection) in one call,
``fused_decoder_logits``, bit-identical to the decoder's forward (the same
kernels in the same order), when the decoder's forward, extract_features and
output_layer are fairseq 0.12's and the fused decoder's, unreplaced on the
instance.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from seqfuse import _ext
from seqfuse._patching import _structure
from seqfuse.layers.transformer import FusedTransformerEncoderLayer, qkv_weights
from seqfuse.ops.bias_act import ACTIVATIONS
from seqfuse.ops.embedding import POS_FIXED, POS_NONE
from seqfuse.ops.linear import kernel_takes, packed, skips_zeros, tensor_state
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


# module -> (structure count, [(owner's _parameters dict, name, parameter)])
_flat_params: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _walk_parameters(module: torch.nn.Module) -> list[tuple[dict, str, Tensor]]:
    """Every parameter under ``module`` (what ``parameters()`` visits) with the
    dict that holds it, from a walk over the modules' own dicts."""
    found = []
    todo = [module]
    while todo:
        m = todo.pop()
        own = m._parameters
        found += [(own, name, p) for name, p in own.items() if p is not None]
        todo.extend(sub for sub in m._modules.values() if sub is not None)
    return found


def _params_key(module: torch.nn.Module) -> tuple:
    """(storage, version counter) of every parameter under ``module``: in-place
    updates bump the version, ``.data`` swaps and conversions move the storage
    (this runs once per generation). The parameter list is walked once and
    reused until a registration anywhere, or a parameter no longer held where
    it was found (a conversion that writes a module's dict directly)."""
    hit = _flat_params.get(module)
    if (
        hit is not None
        and hit[0] == _structure[0]
        and all(own.get(name) is p for own, name, p in hit[1])
    ):
        params = hit[1]
    else:
        params = _walk_parameters(module)
        _flat_params[module] = (_structure[0], params)
    return tuple(tensor_state(p) for _, _, p in params)


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


def _fc2_skips_zeros(layer) -> float:
    """1.0 when fc2 may skip the activations that are zero (ReLU makes most
    of them zero; the product is the same, bit for bit, when no weight is
    inf or NaN), else 0.0 (every term is multiplied)."""
    return float(layer._fused_act == "relu" and skips_zeros(layer.fc2.weight))


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
_ENCODER_FORWARD = "045a6d2dee543181"


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
        nums += [float(sa.scaling), _fc2_skips_zeros(layer)]
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
        nums += [float(sa.scaling), float(ea.scaling), _fc2_skips_zeros(layer)]
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


def make_room(cache, n: int, slot: int, blocks: bool = False) -> None:
    """Grow a self-attention cache to take a step of ``n`` rows at ``slot``
    (by a block of slots with ``blocks``: the step reads the caches' blocks)."""
    r_cap, l_cap = cache.capacity
    if n > r_cap or slot + 1 > l_cap:
        cache._grow(n, slot + 1, by_block=blocks)


def _step_caches(decoder, n: int, like, incremental_state, enc: Tensor, enc_pad, blocks=False):
    """(self caches, cross caches, slot) of the layers for a step of ``n``
    rows, grown to take it (by a block of slots with ``blocks``: the step
    reads the caches' blocks); created first on the first step (as the layers
    would, from ``like()``: a ``[1, n, C]`` tensor of the step's dtype and
    device); None when the layers must run."""
    caches = [incremental_state.get(layer._fused_key) for layer in decoder.layers]
    if all(c is None for c in caches):
        caches = _first_step_caches(decoder.layers, like(), incremental_state, enc, enc_pad)
    elif any(c is None or "self" not in c or "cross" not in c for c in caches):
        return None  # caches the layers made (the layers keep them in step)
    selfs = [cs["self"] for cs in caches]
    crosses = [cs["cross"] for cs in caches]
    slot = selfs[0].length
    for cache in selfs:
        if cache.n != n or cache.length != slot:
            return None  # not in step with the rows (the layers raise the error)
        make_room(cache, n, slot, blocks)
    q_per_kv = crosses[0].q_per_kv
    if any(cc.q_per_kv != q_per_kv for cc in crosses):
        return None
    return selfs, crosses, slot


def _advance(selfs, slot) -> None:
    """The C++ step wrote ``slot`` of every self-attention cache."""
    for cache in selfs:
        cache.length = slot + 1


def _cache_args(selfs, crosses, slot) -> tuple[list, list]:
    """The caches' two runs of the C++ step's arguments: ``self_kv`` to ``slot``
    and ``cross_kv`` to ``q_per_kv``."""
    return [
        [cache.kv for cache in selfs],
        [cache.rows for cache in selfs],
        [cache.pad for cache in selfs],
        slot,
    ], [
        [cc.kv for cc in crosses],
        [cc.map[: cc.n] for cc in crosses],
        [cc.pad for cc in crosses],
        crosses[0].q_per_kv,
    ]


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
    found = _step_caches(decoder, n, lambda: x, incremental_state, enc, enc_pad)
    if found is None:
        return None
    self_args, cross_args = _cache_args(*found)
    outs, attn = torch.ops.seqfuse.fused_decoder_step(
        x.view(n, c),
        plan["params"],
        plan["nums"],
        *self_args,
        None if step_pad is None else step_pad.reshape(n),
        *cross_args,
        plan["heads"],
        plan["pre_norm"],
        plan["act"],
        align_layer,
        mean_heads,
    )
    _advance(found[0], found[2])
    inner = [o.view(1, n, c) for o in outs]
    return inner[-1], attn, inner


# incremental_state key of the whole-network step's plan (once per generation).
LOGITS_PLAN_KEY = "seqfuse.fused_logits_plan"
# incremental_state[STEP_MEMORY_KEY]: the buffer the last whole-network step
# carved its workspace and logits from; the next step reuses it when the
# caller has let go of those logits (a view of it), so a search maps that
# memory once instead of in fresh pages at each step (about 2 GB a pass over
# the Multi30k test set at batch 64, most of the step's page faults).
STEP_MEMORY_KEY = "seqfuse.step_memory"
# fairseq's TransformerDecoderBase.forward and extract_features (0.12), whose
# "extract_features, then output_layer" the whole-network step stands for.
_DECODER_FORWARD = "87ae1748dd29b3c0"
_DECODER_EXTRACT = "bbe6163b038277f7"


def _affine_norm(norm) -> list[Tensor] | str | None:
    if norm is None:
        return None
    if type(norm) is not torch.nn.LayerNorm or norm.weight is None or norm.bias is None:
        return "a layer norm without affine parameters"
    return [norm.weight.detach(), norm.bias.detach()]


def logits_plan(decoder, x: Tensor) -> dict | str:
    """What the whole-network step needs besides the layers' plan (the
    output projection's pack, the embedding and final norms), or why the
    decoder's own forward must run."""
    from fairseq.models.transformer import TransformerDecoderBase

    from seqfuse.layers.fairseq import FusedTransformerDecoder

    cls = type(decoder)
    if (
        cls.forward is not TransformerDecoderBase.forward
        or cls.extract_features is not TransformerDecoderBase.extract_features
        or cls.extract_features_scriptable
        is not FusedTransformerDecoder.extract_features_scriptable
        or cls.output_layer is not FusedTransformerDecoder.output_layer
    ):
        return "the decoder overrides forward, extract_features or output_layer"
    if (
        shape_of(TransformerDecoderBase.forward) != _DECODER_FORWARD
        or shape_of(TransformerDecoderBase.extract_features) != _DECODER_EXTRACT
    ):
        return "this fairseq's TransformerDecoderBase.forward is not the verified one"
    why = decoder._fast_path_problem()
    if why is not None:
        return why
    proj = getattr(decoder, "output_projection", None)
    if decoder.adaptive_softmax is not None or type(proj) is not torch.nn.Linear:
        return "no plain output projection"
    if not kernel_takes(x[0], proj.weight, proj.bias):
        return "the packed GEMM does not take the output projection here"
    table = decoder.embed_tokens.weight
    if table.dtype != torch.float32 or table.device.type != "cpu":
        return "not a float32 CPU embedding"
    norms: list[Tensor] = []
    eps: list[float] = []
    flags = []
    for norm in (decoder.layernorm_embedding, decoder.layer_norm):
        got = _affine_norm(norm)
        if isinstance(got, str):
            return got
        flags.append(got is not None)
        if got is not None:
            norms += got
            eps.append(float(norm.eps))
    step = cached_plan(decoder, x)
    if isinstance(step, str):
        return step
    bias = proj.bias
    plan = {
        "step": step,
        "embed": table.detach().contiguous(),
        # the fixed arguments of fused_decoder_logits (and of the plan object),
        # in runs: norms to the layers' numbers, the layers' shape, the output
        "layers": (norms, flags[0], flags[1], eps, step["params"], step["nums"]),
        "shape": (step["heads"], step["pre_norm"], step["act"]),
        "output": (
            packed(proj.weight),
            None if bias is None else bias.detach().contiguous(),
            int(proj.weight.size(0)),
        ),
        "native": None,
    }
    plan["native"] = _native_plan(decoder, plan)
    return plan


def _native_plan(decoder, plan: dict):
    """The plan's fixed arguments held by one C++ object (``_C.DecoderLogitsPlan``),
    whose ``step`` takes only the tokens and the caches; None with an
    extension that has none (the op runs then)."""
    cls = getattr(_ext._C, "DecoderLogitsPlan", None)
    if cls is None:
        return None
    return cls(
        plan["embed"],
        float(decoder.embed_scale),
        int(decoder.padding_idx),
        *plan["layers"],
        *plan["shape"],
        *plan["output"],
    )


# Attributes that, set on a decoder instance, replace what the whole-network
# step stands for (a wrapper around forward, say): the decoder's forward runs.
_INSTANCE_OVERRIDES = ("forward", "extract_features", "extract_features_scriptable", "output_layer")


# incremental_state[NEXT_STEPS_KEY]: what a whole-network step found (the
# caches, the position table, the plan object), so that the search's next
# steps skip the lookups and checks whose answers cannot change between them
# (``_next_step``); anything that does change (rows, slots past the caches'
# room, positions past the table) takes the full path, which grows or
# rebuilds what it must.
NEXT_STEPS_KEY = "seqfuse.next_steps"


class _NextSteps:
    __slots__ = (
        "decoder",
        "plan",
        "native",
        "keys",
        "states",
        "selfs",
        "crosses",
        "pos",
        "limit",
        "pad",
    )

    def __init__(self, decoder, plan, incremental_state, selfs, crosses, pos):
        self.decoder = decoder
        self.plan = plan
        self.native = plan["native"]
        self.keys = [layer._fused_key for layer in decoder.layers]
        self.states = [incremental_state[key] for key in self.keys]
        self.selfs = selfs
        self.crosses = crosses
        self.pos = pos
        # the longest prefix the table holds without growing (a learned
        # table's bounds are the kernel's to check, as on the full path)
        from fairseq.modules import SinusoidalPositionalEmbedding

        self.limit = 1 << 62
        positions = decoder.embed_positions
        if isinstance(positions, SinusoidalPositionalEmbedding):
            self.limit = pos.size(0) - positions.padding_idx - 1
        self.pad = int(decoder.padding_idx)

    def holds(self, decoder, incremental_state) -> bool:
        """Whether ``incremental_state`` still holds, for ``decoder``, the
        layers' cache states this was built from."""
        if self.decoder is not decoder:
            return False
        return all(incremental_state.get(k) is st for k, st in zip(self.keys, self.states))


def _next_step(nxt: _NextSteps, decoder, prev_output_tokens: Tensor, incremental_state):
    """``step_logits`` for a step after a whole-network step of the same
    search, or None (the full path then runs). ``step_logits``, the caller,
    has checked that the decoder is not training."""
    if torch.is_grad_enabled():
        return None
    if incremental_state.get(LOGITS_PLAN_KEY) is not nxt.plan:
        return None
    if not nxt.holds(decoder, incremental_state):
        return None
    n, slen = prev_output_tokens.shape
    if slen > nxt.limit:
        return None
    selfs, crosses = nxt.selfs, nxt.crosses
    slot = selfs[0].length
    for cache in selfs:
        if cache.n != n or cache.length != slot:
            return None
        r_cap, l_cap = cache.capacity
        if n > r_cap or slot + 1 > l_cap:
            return None  # the caches grow first
    q_per_kv = crosses[0].q_per_kv
    for cc in crosses:
        if cc.q_per_kv != q_per_kv:
            return None
    return _native_step(
        nxt.native, prev_output_tokens, nxt.pos, nxt.pad + slen, selfs, crosses, slot,
        q_per_kv, incremental_state,
    )  # fmt: skip


def _native_step(native, tokens, pos, pos_end, selfs, crosses, slot, q_per_kv, incremental_state):
    """The plan object's step over the caches (``pos_end``: the padding index
    plus the prefix length), in the step memory the last step left unless this
    step would replace it (rows changed past 9/8: dropped first, the two never
    held at once); the caches then hold ``slot``."""
    memory = incremental_state.pop(STEP_MEMORY_KEY, None)
    if memory is not None and not native.step_memory_fits(memory, tokens.size(0)):
        memory = None
    logits, attn, memory = native.step(
        tokens,
        pos,
        POS_NONE if pos is None else POS_FIXED,
        pos_end,
        [cache.blocks for cache in selfs],
        [cache.rows for cache in selfs],
        [cache.pad for cache in selfs],
        slot,
        [cc.kv for cc in crosses],
        [cc.map for cc in crosses],
        [cc.n for cc in crosses],
        [cc.pad for cc in crosses],
        q_per_kv,
        memory,
    )
    incremental_state[STEP_MEMORY_KEY] = memory
    _advance(selfs, slot)
    STATS["one_call"] += 1
    return logits, attn


def next_reorder(decoder, incremental_state, new_order: Tensor) -> bool:
    """The caches' reorder between two steps of a search whose last step was
    a whole-network step, when its rows stay as many (beams reordered within
    their sentences, no repack, no first reorder after a shared first step):
    every layer's parent table gathered by one op call, the cross-attention
    maps untouched (as ``CrossAttnCache.reorder`` leaves them then). False:
    the caller's full reorder runs instead."""
    nxt = incremental_state.get(NEXT_STEPS_KEY)
    if nxt is None or not nxt.holds(decoder, incremental_state):
        return False
    selfs, crosses = nxt.selfs, nxt.crosses
    n = selfs[0].n
    if (
        new_order.numel() != n
        or new_order.dtype != torch.long
        or new_order.device.type != "cpu"
        or not new_order.is_contiguous()
    ):
        return False
    for cache in selfs:
        if cache.expand != 1 or cache.length == 0 or cache.n != n or cache.repacks_at(n):
            return False
    for cc in crosses:
        if cc.later_q_per_kv or cc.n * cc.beam != n:
            return False
    torch.ops.seqfuse.gather_table_rows.default(
        [c.rows for c in selfs], [c.rows_alt for c in selfs], n, new_order
    )
    for cache in selfs:
        cache._gathered(n)  # the gathered tables swapped in (no repack: checked above)
    return True


def step_logits(decoder, prev_output_tokens: Tensor, encoder_out, incremental_state):
    """An incremental step of the whole network (embedding, every layer, the
    final norm, the vocabulary projection) in one C++ call: ``(logits
    [n, vocab], the alignment weights averaged over heads [n, S])``,
    bit-identical to ``decoder(prev_output_tokens, encoder_out,
    incremental_state)``'s output and attention at the last position; or
    None, and then that call must run. One call instead of the forward's
    dozen ops from Python: most of a small-batch step's time outside the
    kernels."""
    if incremental_state is None or decoder.training or encoder_out is None:
        return None
    nxt = incremental_state.get(NEXT_STEPS_KEY)
    if nxt is not None:
        got = _next_step(nxt, decoder, prev_output_tokens, incremental_state)
        if got is not None:
            return got
    if not encoder_out["encoder_out"] or any(a in decoder.__dict__ for a in _INSTANCE_OVERRIDES):
        return None
    plan = incremental_state.get(LOGITS_PLAN_KEY)
    if plan is None:
        probe = decoder.embed_tokens.weight[:1].unsqueeze(0)  # [1, 1, C]
        plan = logits_plan(decoder, probe)
        if isinstance(plan, dict) and torch.is_grad_enabled():
            if any(p.requires_grad for p in decoder.parameters()):
                plan = "autograd requested"
        incremental_state[LOGITS_PLAN_KEY] = plan
    if isinstance(plan, str) or torch.is_grad_enabled():
        return None
    enc = encoder_out["encoder_out"][0]
    enc_pad = None
    if len(encoder_out["encoder_padding_mask"]) > 0:
        enc_pad = encoder_out["encoder_padding_mask"][0]
    if enc.dtype != torch.float32 or enc.device.type != "cpu":
        return None
    n, slen = prev_output_tokens.shape
    table = decoder.embed_tokens.weight
    pos_table = decoder._pos_table(slen)  # grows a sinusoidal table as the forward does
    if pos_table is not None and pos_table.dtype != table.dtype:
        return None

    # on the first step, [1, n, C] for the caches' shapes, dtype and device (no data read)
    def like():
        return table[:1].unsqueeze(0).expand(1, n, table.size(1))

    native = plan["native"]
    found = _step_caches(decoder, n, like, incremental_state, enc, enc_pad, native is not None)
    if found is None:
        return None
    pad = decoder.padding_idx
    if native is not None:
        selfs, crosses, slot = found
        pos = None if pos_table is None else pos_table.contiguous()
        got = _native_step(
            native, prev_output_tokens, pos, pad + slen, selfs, crosses, slot,
            crosses[0].q_per_kv, incremental_state,
        )  # fmt: skip
        incremental_state[NEXT_STEPS_KEY] = _NextSteps(
            decoder, plan, incremental_state, selfs, crosses, pos
        )
        return got
    step = plan["step"]
    self_args, cross_args = _cache_args(*found)
    logits, attn = torch.ops.seqfuse.fused_decoder_logits(
        prev_output_tokens[:, -1:],
        plan["embed"],
        float(decoder.embed_scale),
        None if pos_table is None else pos_table.contiguous(),
        pad,
        POS_NONE if pos_table is None else POS_FIXED,
        pad + slen,
        *plan["layers"],
        *self_args,
        *cross_args,
        *plan["shape"],
        len(step["heads"]) - 1,
        ALL_HEADS,
        *plan["output"],
    )
    _advance(found[0], found[2])
    STATS["one_call"] += 1
    return logits, attn.select(1, 0)
