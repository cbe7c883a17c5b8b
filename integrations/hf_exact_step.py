"""The exact one-call decoder step for Hugging Face BART-family decoders.

``seqfuse._C``'s ``hf_decoder_stack_step`` issues, for every decoder layer in
one C++ call, the ATen calls that transformers' decoder layer, its attention
module (sdpa), ``sdpa_attention_forward`` and ``DynamicLayer.update`` issue
for a one-token step, on tensors of the same shapes and strides: the result
is bit-identical to the stock layers (tested against them), without the
per-op Python work.

:func:`enable` (called by ``seqfuse.optimize``) changes, in place,

- the decoder's class to a subclass of its own (same name) whose forward marks
  the layer loop as running, then calls the stock forward: embeddings,
  positions and masks stay transformers' own code;
- the decoder's ``layers`` container's class to a ``ModuleList`` subclass that,
  only inside that forward, iterates as one runner: for a one-token step with
  initialised caches and nothing recording the layers (transformers' output
  collector idle, no other hooks), the runner makes the C++ call and writes
  the caches back where ``DynamicLayer.update`` would; for anything else it
  calls the stock layers in order, as the loop would.

In the fused mode (``integrations.hf_fused``: the layers' linear modules are
``PackedLinear``) the same call is given the weights' panel packs and runs the
projections on seqfuse's packed GEMM: within 1e-5 of stock, not bit-identical.

Supported: decoder layers whose code has the structure verified here (BART,
Marian, PLBart, BlenderbotSmall post-norm; mBART, Pegasus, M2M100, Blenderbot
pre-norm, as of transformers 5.x), sdpa attention, biased projections and
LayerNorms, relu/gelu/silu/tanh. Code of another shape (another transformers
version) runs the stock layers.
"""

from __future__ import annotations

import torch
from torch import nn

from seqfuse._patching import cached_for_structure, mixed_subclass
from seqfuse.layer_stack import gemm_modules, stack_eps, stack_weights
from seqfuse.source_shape import shape_of

# Incremental steps run by the one-call path and by the stock layers.
STATS = {"exact": 0, "stock": 0, "deferred_reorders": 0, "room_steps": 0}

# The transformers code the C++ step mirrors, identified by the shape of its
# source (seqfuse.source_shape: the AST without docstring, comments,
# annotations or formatting): a decoder layer forward (-> pre-norm or not),
# the attention forward, sdpa_attention_forward and DynamicLayer.update, in
# the transformers releases where parity is tested (5.17.0 and 5.23.0:
# tests/test_hf*.py pass under each; docs/HF.md says how a release is
# checked). Code of any other shape runs stock.
_LAYER_FORWARDS = {
    "409dfff0bfed351e": False,  # post-norm: BART, Marian, PLBart, BlenderbotSmall
    "c48ee6be602bea23": True,  # pre-norm: mBART, Pegasus, M2M100, Blenderbot
}
_ATTENTION_FORWARD = "694b802468b7dc06"
# sdpa_attention_forward, by release. For a decoder step (one query token,
# one K/V head per query head, no paged cache, no position bias) both issue
# the same ATen calls: scaled_dot_product_attention, transpose, contiguous;
# 5.23 reshapes the output to its own shape in between (a view, no kernel).
_SDPA_FORWARDS = {
    "b1ca025d495e7bbd": "5.23",
    "0b9f8ced242762f1": "5.17",
}
_CACHE_UPDATE = "d0fce5f3d34119e1"


def _library_problem() -> str | None:
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shape_of(sdpa_attention_forward) not in _SDPA_FORWARDS:
        return "this transformers' sdpa_attention_forward is not the verified one"
    if shape_of(DynamicLayer.update) != _CACHE_UPDATE:
        return "this transformers' DynamicLayer.update is not the verified one"
    return None


RELU = 0  # the C++ steps' activation code of a ReLU


def _activation_code(act) -> int | None:
    """The C++ step's code for a decoder layer's activation module, or None."""
    cls = type(act)
    if cls is nn.ReLU:
        return RELU
    if cls is nn.Tanh:
        return 2
    if cls is nn.SiLU:
        return 4
    if cls.__module__ != "transformers.activations":
        return None
    if cls.__name__ == "SiLUActivation":  # forward: nn.functional.silu
        return 4
    if cls.__name__ == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu:
        return 3
    return None


def _decoder(model):
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    return dec if isinstance(dec, nn.Module) else None


def _linear_types() -> tuple:
    from integrations.hf_fused import PackedLinear

    return (nn.Linear, PackedLinear)


def problem(model) -> str | None:
    """Why the one-call step cannot reproduce this model's decoder, or None."""
    from seqfuse import _ext

    if _ext._C is None:
        return "the compiled extension is not available"
    if not getattr(model.config, "is_encoder_decoder", False):
        return "not an encoder-decoder model"
    dec = _decoder(model)
    if dec is None or not isinstance(getattr(dec, "layers", None), nn.ModuleList):
        return "no decoder layer list"
    layers = list(dec.layers)
    if not layers:
        return "no decoder layers"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r} (sdpa only)"
    why = _library_problem()
    if why is not None:
        return why
    first = layers[0]
    for i, lay in enumerate(layers):
        where = f"decoder layer {i}"
        if type(lay) is not type(first):
            return "decoder layers of different classes"
        if shape_of(type(lay).forward) not in _LAYER_FORWARDS:
            return f"{where}: {type(lay).__name__}.forward is not a verified layer structure"
        for attn in (lay.self_attn, lay.encoder_attn):
            if shape_of(type(attn).forward) != _ATTENTION_FORWARD:
                return f"{where}: {type(attn).__name__}.forward is not the verified attention"
        why = layer_parts_problem(lay, first, where)
        if why is not None:
            return why
    return None


def layer_parts_problem(lay, first, where: str) -> str | None:
    """Why a BART-shaped decoder layer's parts (biased projections, affine
    layer norms, a known activation, heads that split the embedding, the
    first layer's heads, scaling and activation) are not what the C++ steps
    take, or None. FSMT's layers have the same parts."""
    linears = _linear_types()
    if _activation_code(lay.activation_fn) is None:
        return f"{where}: activation {type(lay.activation_fn).__name__}"
    for ln in (lay.self_attn_layer_norm, lay.encoder_attn_layer_norm, lay.final_layer_norm):
        if type(ln) is not nn.LayerNorm or not ln.elementwise_affine or ln.bias is None:
            return f"{where}: layer norm {type(ln).__name__}"
    for attn in (lay.self_attn, lay.encoder_attn):
        for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            if type(p) not in linears or p.bias is None:
                return f"{where}: projections must be biased nn.Linear"
        if attn.num_heads != first.self_attn.num_heads or attn.scaling != first.self_attn.scaling:
            return "attention modules differ in heads or scaling"
        if attn.head_dim * attn.num_heads != attn.embed_dim:
            return f"{where}: heads do not split the embedding"
    for lin in (lay.fc1, lay.fc2):
        if type(lin) not in linears or lin.bias is None:
            return f"{where}: FFN projections must be biased nn.Linear"
    if type(lay.activation_fn) is not type(first.activation_fn):
        return "decoder layers differ in activation"
    return None


def stack_plan(layers) -> dict:
    """A BART-shaped layer stack's weights, eps, heads, scaling and
    activation code, as the C++ steps take them (FSMT's too)."""
    first = layers[0]
    return {
        "weights": stack_weights(layers),
        "eps": stack_eps(layers),
        "heads": first.self_attn.num_heads,
        "scaling": float(first.self_attn.scaling),
        "act": _activation_code(first.activation_fn),
    }


def _plan(layers) -> dict:
    return {**stack_plan(layers), "pre_norm": _LAYER_FORWARDS[shape_of(type(layers[0]).forward)]}


# Keyword arguments the decoder passes its layers that the one-call step
# reproduces (the rest send the step to the stock layers).
_QUIET_KWARGS = {"encoder_attention_mask", "past_key_values", "use_cache", "cache_position"}


def _capturing_hook(hook) -> bool:
    """transformers' output-capturing hook: inert unless outputs are being collected."""
    return getattr(hook, "__name__", "") == "output_capturing_hook" and getattr(
        hook, "__module__", ""
    ).startswith("transformers.")


def _recorded(layers, parts=lambda lay: (lay, lay.self_attn, lay.encoder_attn), owner=None) -> bool:
    """Whether anything would see the layers' calls: transformers collecting
    hidden states or attentions (with its hooks), or any other hook on a
    layer or on its ``parts``. With an ``owner`` (the layer list), the list
    of modules is kept on it until a module or parameter is registered
    anywhere (the hooks are read at every call)."""
    try:
        from transformers.utils.output_capturing import _active_collector

        if _active_collector.get():
            return True
    except ImportError:  # a transformers without output capturing: hooks decide
        pass
    if owner is None:
        modules = [m for lay in layers for m in parts(lay)]
    else:
        modules = cached_for_structure(
            owner, "_seqfuse_hooked_parts", lambda _: [m for lay in layers for m in parts(lay)]
        )
    for m in modules:
        if m._forward_pre_hooks or (
            m._forward_hooks and not all(map(_capturing_hook, m._forward_hooks.values()))
        ):
            return True
    return bool(nn.modules.module._global_forward_hooks) or bool(
        nn.modules.module._global_forward_pre_hooks
    )


def encoder_decoder_cache_ready(cache, n: int) -> bool:
    """Whether ``cache`` is an EncoderDecoderCache whose first ``n`` layers
    hold initialised dynamic self- and cross-attention caches, the cross ones
    computed (a step the one-call steps can take)."""
    from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

    if not isinstance(cache, EncoderDecoderCache):
        return False
    sc, cc = cache.self_attention_cache, cache.cross_attention_cache
    if len(sc.layers) < n or len(cc.layers) < n:
        return False
    for i in range(n):
        if not cache.is_updated.get(i):
            return False
        for lay in (sc.layers[i], cc.layers[i]):
            if type(lay) is not DynamicLayer or not lay.is_initialized:
                return False
    return True


def fused_packs(probe, x, owner, modules, transposed: bool = False) -> list:
    """The panel packs of the weights of the modules ``modules()`` lists
    (None: an empty placeholder) when ``probe`` runs in the fused mode (one of
    ``hf_fused``'s packed classes) and the packed kernel takes ``x``; else
    none (torch's products). The list and its weights are kept on ``owner``
    (the layer list) until a module or parameter is registered anywhere, and
    the packs while every weight keeps its storage and version: a step's 24
    attribute lookups and pack lookups were about 50 us. ``transposed``: the
    weights are stored ``[in, out]`` (GPT-2's Conv1D)."""
    return fused_gemm(probe, x, owner, modules, transposed)[0]


def fused_gemm(probe, x, owner, modules, transposed: bool = False) -> tuple[list, list]:
    """(:func:`fused_packs`, per slot whether its weight is finite: True for an
    empty one; none without packs), from one lookup of the kept packs."""
    if not getattr(type(probe), "_seqfuse_packed_linear", False):
        return [], []
    from seqfuse.ops import linear as packed_linear

    w = probe.weight.t() if transposed else probe.weight
    if not packed_linear.kernel_takes(x.view(-1, x.size(-1)), w):
        return [], []
    present, weights = cached_for_structure(
        owner, "_seqfuse_gemm_weights", lambda _: _weights(modules())
    )
    packs, finite = packed_linear.packs_and_finite(weights, transposed)
    if len(packs) == len(present):
        return packs, finite
    empty = torch.empty(0)
    return by_slot(present, packs, empty), by_slot(present, finite, True)


def by_slot(present: list, values: list, fill) -> list:
    """``values`` (one per present slot) spread over the slots, ``fill`` in the
    empty ones."""
    found = iter(values)
    return [next(found) if here else fill for here in present]


def skips_zeros(finite: list, slot: int, per_layer: int) -> bool:
    """Whether the fused step's product at ``slot`` of each layer (``per_layer``
    slots a layer; ``finite``: :func:`fused_gemm`'s flags) may skip zero
    inputs: there are packs and each of those weights is finite (the same
    bits as the dense product). The steps ask it of the second feed-forward
    product after a ReLU."""
    return bool(finite) and len(finite) % per_layer == 0 and all(finite[slot::per_layer])


def _weights(modules) -> tuple[list, list]:
    """(per slot of the modules list: whether it holds a module, their weights)."""
    return [m is not None for m in modules], [m.weight for m in modules if m is not None]


# A beam reorder of a self-attention cache that seqfuse's beam search
# (integrations.hf) deferred to the next one-call step: the composed row order,
# kept on the DynamicCache. The step gathers the reordered history and
# appends its K/V in one pass (gather_append: the values and layout of
# stock's reorder_cache and then DynamicLayer.update's cat, one copy of the
# history instead of two); anything else applies it first (flush_reorder).
PENDING_ORDER = "_seqfuse_pending_order"


def self_cache(cache):
    """The DynamicCache of a cache's self-attention (the cache itself for a
    decoder-only model), or None."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    if type(cache) is EncoderDecoderCache:
        cache = cache.self_attention_cache
    return cache if type(cache) is DynamicCache else None


def defer_reorder(cache, order) -> bool:
    """Defer ``cache.reorder_cache(order)`` of a self-attention DynamicCache
    to the next one-call step; False where it cannot be (not a DynamicCache)."""
    dyn = self_cache(cache)
    if dyn is None:
        return False
    order = order.to(torch.long)  # (the search's beam indices are int32)
    prev = dyn.__dict__.get(PENDING_ORDER)
    dyn.__dict__[PENDING_ORDER] = order if prev is None else prev.index_select(0, order)
    return True


def pending_order(dyn):
    """The reorder deferred to this step (int64 [rows]), or None."""
    return None if dyn is None else dyn.__dict__.get(PENDING_ORDER)


def step_took_order(dyn) -> None:
    """The one-call step applied the deferred reorder."""
    if dyn is not None and dyn.__dict__.pop(PENDING_ORDER, None) is not None:
        STATS["deferred_reorders"] += 1


def flush_reorder(cache) -> None:
    """Apply a deferred reorder with the cache's own ``reorder_cache``."""
    dyn = self_cache(cache)
    order = None if dyn is None else dyn.__dict__.pop(PENDING_ORDER, None)
    if order is not None:
        dyn.reorder_cache(order)


def flush_reorders_in(args, kwargs) -> None:
    from transformers.cache_utils import Cache

    for v in (*args, *kwargs.values()):
        if isinstance(v, Cache):
            flush_reorder(v)


# The fused mode's self-attention caches with room to grow. transformers'
# DynamicLayer.update makes every step a new tensor one slot longer (torch.cat):
# a copy of the whole history into freshly mapped memory, whose page faults
# and copy grow with the length. While seqfuse's greedy search runs
# (arm_rooms ... release_rooms), a one-call step of the fused mode with no
# reorder waiting appends into a buffer with spare slots instead
# (append_into in csrc/exact_decoder.cpp): where the cache is the start of
# the layer's buffer it writes its slot in place, nothing else moves;
# otherwise it copies the cache into a new buffer with room for half as many
# slots again (at least ROOM_MIN_GROWTH). The cache always holds a valid
# tensor: a view of the first t slots of the buffer, the values of the cat's
# result (strides of the buffer's capacity), and a view taken earlier still
# reads what it read. Beam search does not arm its cache: its steps take a
# deferred reorder with the one-pass gather and append into new memory
# (gather_append), and gathering into a second buffer instead measured
# slower (benchmarks/bench_kv_rooms.py); a step with a reorder waiting gets
# no room in any case. Nothing
# outside the search writes into a buffer: the record is dropped when the
# search ends, and a cache the search did not arm (a user's, a later
# generate) starts a new buffer by copying. SEQFUSE_HF_KV_ROOMS=0 keeps the
# cat.
ROOMS = "_seqfuse_kv_rooms"
ROOMS_ENV = "SEQFUSE_HF_KV_ROOMS"
ROOM_MIN_GROWTH = 16  # spare slots of a new buffer: at least these, or half its length


def arm_rooms(cache) -> None:
    """Let the fused one-call steps keep this cache's self-attention K/V in
    buffers with room (seqfuse's search, before its first step)."""
    from seqfuse import _ext

    dyn = self_cache(cache)
    if dyn is not None and _ext.env_flag(ROOMS_ENV, True):
        dyn.__dict__[ROOMS] = {}


def release_rooms(cache) -> None:
    """Drop the buffers' record (the search ends): the cache keeps its
    views; nothing writes into their buffers any more."""
    dyn = self_cache(cache)
    if dyn is not None:
        dyn.__dict__.pop(ROOMS, None)


def _room(rooms: dict, key, cur):
    """The buffer this step's K or V goes into: the layer's, where ``cur``
    (the cache) is its start and a slot is left; else a new one."""
    t = cur.size(2)
    buf = rooms.get(key)
    if (
        buf is not None
        and cur.data_ptr() == buf.data_ptr()
        and cur.stride() == buf.stride()
        and cur.size(0) == buf.size(0)
        and buf.size(2) > t
    ):
        return buf
    cap = t + 1 + max(ROOM_MIN_GROWTH, (t + 1) // 2)
    buf = rooms[key] = cur.new_empty((cur.size(0), cur.size(1), cap, cur.size(3)))
    return buf


def kv_rooms(dyn, n: int, packs, order) -> tuple[list, list]:
    """(K rooms, V rooms) a layer for a one-call step of the fused mode on
    the armed self-attention cache ``dyn`` (a DynamicCache) with no reorder
    waiting, or ([], []): the step then appends as transformers does (or
    gathers and appends). n: the step's layers."""
    rooms = None if dyn is None or not packs or order is not None else dyn.__dict__.get(ROOMS)
    if rooms is None:
        return [], []
    room_k, room_v = [], []
    for i, lay in enumerate(dyn.layers[:n]):
        room_k.append(_room(rooms, (i, 0), lay.keys))
        room_v.append(_room(rooms, (i, 1), lay.values))
    STATS["room_steps"] += 1
    return room_k, room_v


class _Runner:
    """What the decoder's layer loop gets instead of its layers (one item)."""

    def __init__(self, layers: ExactLayers):
        self.layers = layers

    def __call__(self, hidden_states, *args, **kwargs):
        out = self._exact(hidden_states, args, kwargs)
        if out is not None:
            STATS["exact"] += 1
            return out
        flush_reorders_in(args, kwargs)  # the stock layers read the reordered caches
        STATS["stock"] += hidden_states.dim() == 3 and hidden_states.size(1) == 1
        for layer in nn.ModuleList.__iter__(self.layers):
            hidden_states = layer(hidden_states, *args, **kwargs)
        return hidden_states

    def _exact(self, x, args, kwargs):
        layers = list(nn.ModuleList.__iter__(self.layers))
        if len(args) != 2 or not set(kwargs) <= _QUIET_KWARGS:
            return None
        if x.dim() != 3 or x.size(1) != 1 or torch.is_grad_enabled() or layers[0].training:
            return None
        self_mask, enc = args
        cache = kwargs.get("past_key_values")
        n = len(layers)
        if enc is None or not encoder_decoder_cache_ready(cache, n):
            return None
        sc, cc = cache.self_attention_cache, cache.cross_attention_cache
        if _recorded(layers, owner=self.layers):
            return None
        # built once, anew after any module or parameter registration (a
        # layer or weight replaced)
        plan = cached_for_structure(self.layers, "_seqfuse_plan", lambda _: _plan(layers))
        # (the GEMM weights' packs in the fused mode)
        packs, finite = fused_gemm(
            layers[0].fc1, x, self.layers, lambda: [m for lay in layers for m in gemm_modules(lay)]
        )
        order = pending_order(sc)
        x, new_k, new_v = torch.ops.seqfuse.hf_decoder_stack_step(
            x,
            plan["weights"],
            [sc.layers[i].keys for i in range(n)],
            [sc.layers[i].values for i in range(n)],
            [cc.layers[i].keys for i in range(n)],
            [cc.layers[i].values for i in range(n)],
            self_mask,
            kwargs.get("encoder_attention_mask"),
            plan["eps"],
            plan["heads"],
            plan["scaling"],
            plan["act"],
            plan["pre_norm"],
            packs,
            order,
            # fc2 (the 8th of a layer's 8 products) after a ReLU
            plan["act"] == RELU and skips_zeros(finite, 7, 8),
            *kv_rooms(sc, n, packs, order),
        )
        step_took_order(sc)
        for i in range(n):  # where DynamicLayer.update leaves them
            sc.layers[i].keys = new_k[i]
            sc.layers[i].values = new_v[i]
        return x


class ExactLayers(nn.ModuleList):
    """The decoder's own layer list (same modules); inside the decoder's
    forward it iterates as one runner (``runner``, a :class:`_Runner`)."""

    _seqfuse_armed = False
    runner = _Runner

    def __iter__(self):
        if self.__dict__.get("_seqfuse_armed"):
            return iter((self.runner(self),))
        return super().__iter__()


class _ExactDecoder:
    """Mixed into the decoder's own class: arms its layer list (the attribute
    ``_seqfuse_layer_list``) during forward."""

    _seqfuse_hf_exact = True
    _seqfuse_layer_list = "layers"

    def forward(self, *args, **kwargs):
        layers = getattr(self, self._seqfuse_layer_list)
        armed = layers.__dict__.get("_seqfuse_armed", False)
        layers.__dict__["_seqfuse_armed"] = not self.training
        if self.training:  # the stock layers run: a deferred reorder first
            flush_reorders_in(args, kwargs)
        try:
            return super().forward(*args, **kwargs)
        finally:
            layers.__dict__["_seqfuse_armed"] = armed


def install(module, layer_list: str, list_cls: type, mixin: type) -> None:
    """Arm ``module``'s ``layer_list`` (a ModuleList) as ``list_cls`` and mix
    ``mixin`` into ``module``'s class (in place)."""
    getattr(module, layer_list).__class__ = list_cls
    # as_base: transformers keys per-class registries (output capturing) by str(class)
    module.__class__ = mixed_subclass(mixin, type(module), as_base=True)


def uninstall(module, layer_list: str) -> None:
    """Undo :func:`install`."""
    module.__class__ = type(module).__bases__[1]
    layers = getattr(module, layer_list)
    layers.__class__ = nn.ModuleList
    layers.__dict__.pop("_seqfuse_plan", None)
    layers.__dict__.pop("_seqfuse_armed", None)


def enable_step(module, marker: str, problem, list_cls: type, mixin: type) -> str | None:
    """Install a one-call step on ``module`` (the decoder a step family finds
    in the model, or None) unless its class already says ``marker``: when
    ``problem()`` has no objection, its layer list (``mixin``'s
    ``_seqfuse_layer_list``) becomes ``list_cls`` and ``mixin`` joins its
    class. Returns the objection, or None. Every step family's ``enable``."""
    if module is not None and getattr(module, marker, False):
        return None
    why = problem()
    if why is not None:
        return why
    install(module, mixin._seqfuse_layer_list, list_cls, mixin)
    return None


def disable_step(module, marker: str) -> None:
    """Undo :func:`enable_step` where ``module``'s class says ``marker``."""
    if module is not None and getattr(module, marker, False):
        uninstall(module, type(module)._seqfuse_layer_list)


def enable(model) -> str | None:
    """Give the model's decoder the one-call step (in place); returns why not,
    or None. Idempotent."""
    return enable_step(
        _decoder(model), "_seqfuse_hf_exact", lambda: problem(model), ExactLayers, _ExactDecoder
    )


def disable(model) -> None:
    """Undo :func:`enable`."""
    disable_step(_decoder(model), "_seqfuse_hf_exact")
