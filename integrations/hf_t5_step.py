"""The exact one-call decoder step for Hugging Face T5.

``seqfuse._C``'s ``hf_t5_stack_step`` issues, for every decoder ``T5Block``
in one C++ call, the ATen calls that transformers' block,
``T5LayerSelfAttention``, ``T5LayerCrossAttention``, ``T5LayerFF`` (plain or
gated), ``T5Attention`` (sdpa, relative position bias),
``create_position_bias_mask``, ``sdpa_attention_forward``, ``T5LayerNorm``
and ``DynamicLayer.update`` issue for a one-token step, on tensors of the same
shapes and strides: the result is bit-identical to the stock blocks (tested
against them), without the per-op Python work. The step's relative position
bias comes from the first block's own ``compute_bias``, called as that block
calls it.

:func:`enable` (called by ``seqfuse.optimize``) changes, in place, the
decoder ``T5Stack``'s class to a subclass of its own whose forward arms its
block list ``block``; inside that forward the list iterates as one runner:
for a one-token step with initialised caches and nothing recording the
blocks, the runner makes the C++ call and leaves the caches where
``DynamicLayer.update`` would; for anything else it runs the stock blocks in
order, passing the position biases on as the stack's loop does.

In the fused mode (``integrations.hf_fused``: the linear modules are
``PackedLinear``) the call gets the weights' panel packs and runs the
projections on seqfuse's packed GEMM: within 1e-5 of stock, not
bit-identical.

Supported: T5 decoders of the verified code (transformers 5.17.0 and 5.23.0)
with sdpa attention, relu or gelu_new (gated) feed-forward layers and fp32 or
bf16 weights (T5Block clamps fp16 activations: fp16 runs the stock blocks).
"""

from __future__ import annotations

import torch
from torch import nn

from integrations import hf_exact_step
from integrations.hf_exact_step import _library_problem, _recorded
from integrations.hf_gpt2_step import _act_code
from seqfuse._patching import cached_for_structure
from seqfuse.source_shape import shape_of

# transformers code the C++ step mirrors, by the shape of its source
# (seqfuse.source_shape), in the releases where parity is tested (5.17.0 and
# 5.23.0: the same T5 code; their create_position_bias_mask differs in a
# final .contiguous(), which the step repeats where the release has it).
_VERIFIED = {
    "T5Stack.forward": {"84023a61603ddc83"},
    "T5Block.forward": {"7303b013819e3a90"},
    "T5LayerSelfAttention.forward": {"7cd12e017e4f4d60"},
    "T5LayerCrossAttention.forward": {"0aed023731b4e649"},
    "T5Attention.forward": {"38c97d6782df9350"},
    "T5LayerFF.forward": {"9558a50ca289ecad"},
    "T5DenseActDense.forward": {"cf462a23d79a0c60"},
    "T5DenseGatedActDense.forward": {"feae9385e2dfc77b"},
    "T5LayerNorm.forward": {"382e2c42a51f6071"},
}
# create_position_bias_mask -> whether it returns the mask made contiguous
# (the step follows the release; sdpa reads the mask's values, so the results
# agree either way: tests/test_hf_t5_step.py passes under both)
_BIAS_MASKS = {"6cbbe43a6aeed4fb": True, "921fb2c29bd9bd8f": False}


def _modeling():
    from transformers.models.t5 import modeling_t5

    return modeling_t5


def _bias_mask_contiguous() -> bool | None:
    from transformers.integrations import sdpa_attention

    fn = getattr(sdpa_attention, "create_position_bias_mask", None)
    return None if fn is None else _BIAS_MASKS.get(shape_of(fn))


def _t5_library_problem() -> str | None:
    m = _modeling()
    for name, shapes in _VERIFIED.items():
        cls, attr = name.split(".")
        if shape_of(getattr(getattr(m, cls), attr)) not in shapes:
            return f"this transformers' {name} is not the verified one"
    if _bias_mask_contiguous() is None:
        return "this transformers' create_position_bias_mask is not the verified one"
    return _library_problem()


def _stack(model):
    """The model's T5 decoder stack, or None."""
    m = _modeling()
    dec = getattr(model, "decoder", None)
    return dec if isinstance(dec, m.T5Stack) and dec.is_decoder else None


def is_t5(model) -> bool:
    return _stack(model) is not None


def _ff_parts(ff) -> tuple:
    """(wi or wi_0, wi_1 or None, wo, gated) of a T5LayerFF's DenseReluDense."""
    d = ff.DenseReluDense
    if type(d) is _modeling().T5DenseGatedActDense:
        return d.wi_0, d.wi_1, d.wo, True
    return d.wi, None, d.wo, False


def problem(model) -> str | None:
    """Why the one-call step cannot reproduce this model's decoder, or None."""
    from seqfuse import _ext

    if _ext._C is None:
        return "the compiled extension is not available"
    dec = _stack(model)
    if dec is None:
        return "not a T5 decoder"
    blocks = list(dec.block)
    if not blocks:
        return "no decoder blocks"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r} (sdpa only)"
    why = _t5_library_problem()
    if why is not None:
        return why
    m = _modeling()
    linears = hf_exact_step._linear_types()
    first = blocks[0]
    if not getattr(first.layer[0].SelfAttention, "has_relative_attention_bias", False):
        return "the first block has no relative attention bias"
    for i, b in enumerate(blocks):
        where = f"decoder block {i}"
        parts = (m.T5LayerSelfAttention, m.T5LayerCrossAttention, m.T5LayerFF)
        if (
            type(b) is not m.T5Block
            or len(b.layer) != 3
            or any(type(p) is not t for p, t in zip(b.layer, parts))
        ):
            return f"{where}: not a T5Block with self-, cross-attention and feed-forward layers"
        sa, ca, ff = b.layer[0].SelfAttention, b.layer[1].EncDecAttention, b.layer[2]
        if type(sa) is not m.T5Attention or type(ca) is not m.T5Attention:
            return f"{where}: attention is not T5Attention"
        for norm in (b.layer[0].layer_norm, b.layer[1].layer_norm, ff.layer_norm):
            if type(norm) is not m.T5LayerNorm:
                return f"{where}: layer norm {type(norm).__name__}"
        wi, wi1, wo, gated = _ff_parts(ff)
        if gated != _ff_parts(first.layer[2])[3]:
            return "decoder blocks differ in their feed-forward layers"
        projections = (sa.q, sa.k, sa.v, sa.o, ca.q, ca.o, wi, wo) + ((wi1,) if gated else ())
        for p in projections:
            if type(p) not in linears or p.bias is not None:
                return f"{where}: projections must be bias-free nn.Linear"
        if len({p.weight.dtype for p in projections}) != 1:
            return f"{where}: projections of different dtypes"
        act = ff.DenseReluDense.act
        if _act_code(act) is None or type(act) is not type(first.layer[2].DenseReluDense.act):
            return f"{where}: activation {type(act).__name__}"
        for a in (sa, ca):
            if (a.n_heads, a.key_value_proj_dim) != (
                first.layer[0].SelfAttention.n_heads,
                first.layer[0].SelfAttention.key_value_proj_dim,
            ):
                return "attention modules differ in heads or head size"
            if a.layer_idx != i:
                return f"{where}: attention layer_idx {a.layer_idx}"
    return None


def _projections(block) -> tuple:
    """A block's projections in the step's pack order (None: no wi_1)."""
    sa, ca = block.layer[0].SelfAttention, block.layer[1].EncDecAttention
    wi, wi1, wo, _ = _ff_parts(block.layer[2])
    return (sa.q, sa.k, sa.v, sa.o, ca.q, ca.o, wi, wi1, wo)


def _plan(blocks) -> dict:
    w0 = blocks[0].layer[0].SelfAttention.q.weight
    empty = torch.empty(0, dtype=w0.dtype, device=w0.device)  # an absent weight
    weights, eps = [], []
    for b in blocks:
        q, k, v, o, cq, co, wi, wi1, wo = _projections(b)
        norms = [lay.layer_norm for lay in b.layer]  # self-attention, cross-attention, FF
        weights += [norms[0].weight, q.weight, k.weight, v.weight, o.weight]
        weights += [norms[1].weight, cq.weight, co.weight]
        weights += [norms[2].weight, wi.weight, empty if wi1 is None else wi1.weight, wo.weight]
        eps += [float(n.variance_epsilon) for n in norms]
    first = blocks[0]
    return {
        "weights": weights,
        "eps": eps,
        "heads": int(first.layer[0].SelfAttention.n_heads),
        "head_dim": int(first.layer[0].SelfAttention.key_value_proj_dim),
        "act": _act_code(first.layer[2].DenseReluDense.act),
        "gated": _ff_parts(first.layer[2])[3],
    }


def _parts(b) -> tuple:
    """The modules of a block whose hooks would see its calls."""
    sa, ca, ff = b.layer
    return (b, sa, sa.SelfAttention, sa.layer_norm, ca, ca.EncDecAttention, ca.layer_norm, ff)


class _Runner(hf_exact_step._Runner):
    """What the stack's block loop gets instead of its blocks (one item)."""

    def __call__(self, hidden_states, *args, **kwargs):
        out = self._exact(hidden_states, args, kwargs)
        if out is not None:
            hf_exact_step.STATS["exact"] += 1
            return out, None, None
        hf_exact_step.flush_reorders_in(args, kwargs)  # the stock blocks read the reordered caches
        hf_exact_step.STATS["stock"] += hidden_states.dim() == 3 and hidden_states.size(1) == 1
        # the stack's loop: the first block's position biases passed on
        mask, bias, enc, enc_mask, enc_bias = (list(args) + [None] * 5)[:5]
        for block in nn.ModuleList.__iter__(self.layers):
            hidden_states, self_bias, cross_bias = block(
                hidden_states, mask, bias, enc, enc_mask, enc_bias, *args[5:], **kwargs
            )
            bias = self_bias
            if block.is_decoder and enc is not None:
                enc_bias = cross_bias
        return hidden_states, bias, enc_bias

    def _exact(self, x, args, kwargs):
        blocks = list(nn.ModuleList.__iter__(self.layers))
        if len(args) != 5 or set(kwargs) != {"past_key_values"}:
            return None
        self_mask, bias, enc, enc_mask, enc_bias = args
        if enc is None or bias is not None or enc_bias is not None:
            return None
        if x.dim() != 3 or x.size(1) != 1 or torch.is_grad_enabled() or blocks[0].training:
            return None
        if x.dtype == torch.float16:  # T5Block's clamps: not mirrored
            return None
        cache = kwargs["past_key_values"]
        n = len(blocks)
        if not hf_exact_step.encoder_decoder_cache_ready(cache, n):
            return None
        sc, cc = cache.self_attention_cache, cache.cross_attention_cache
        if _recorded(blocks, _parts, self.layers):
            return None
        contiguous = _bias_mask_contiguous()
        if contiguous is None:
            return None
        plan = cached_for_structure(self.layers, "_seqfuse_plan", lambda _: _plan(blocks))
        # the first block's relative position bias, as its attention computes it
        attn = blocks[0].layer[0].SelfAttention
        past = cache.get_seq_length(attn.layer_idx)
        bias = attn.compute_bias(1, past + 1, device=x.device, past_seen_tokens=past)
        packs, finite = hf_exact_step.fused_gemm(
            blocks[0].layer[0].SelfAttention.q,
            x,
            self.layers,
            lambda: [m for b in blocks for m in _projections(b)],
        )
        order = hf_exact_step.pending_order(sc)
        x, new_k, new_v = torch.ops.seqfuse.hf_t5_stack_step(
            x,
            plan["weights"],
            [sc.layers[i].keys for i in range(n)],
            [sc.layers[i].values for i in range(n)],
            [cc.layers[i].keys for i in range(n)],
            [cc.layers[i].values for i in range(n)],
            bias,
            self_mask,
            enc_mask,
            plan["eps"],
            plan["heads"],
            plan["head_dim"],
            plan["act"],
            plan["gated"],
            contiguous,
            packs,
            order,
            # wo (the last of a block's 9 products) after a ReLU
            plan["act"] == hf_exact_step.RELU and hf_exact_step.skips_zeros(finite, 8, 9),
            *hf_exact_step.kv_rooms(sc, n, packs, order),
        )
        hf_exact_step.step_took_order(sc)
        for i in range(n):  # where DynamicLayer.update leaves them
            sc.layers[i].keys = new_k[i]
            sc.layers[i].values = new_v[i]
        return x


class ExactBlocks(hf_exact_step.ExactLayers):
    """The decoder stack's own block list (same modules); inside the stack's
    forward it iterates as one :class:`_Runner`."""

    runner = _Runner


class _ExactT5(hf_exact_step._ExactDecoder):
    """Mixed into the decoder T5Stack's own class: arms its block list during forward."""

    _seqfuse_hf_exact = False  # (hf_exact_step's BART-family marker)
    _seqfuse_hf_t5_exact = True
    _seqfuse_layer_list = "block"


def enable(model) -> str | None:
    """Give the model's T5 decoder the one-call step (in place); returns why
    not, or None. Idempotent."""
    return hf_exact_step.enable_step(
        _stack(model), "_seqfuse_hf_t5_exact", lambda: problem(model), ExactBlocks, _ExactT5
    )


def disable(model) -> None:
    """Undo :func:`enable`."""
    hf_exact_step.disable_step(_stack(model), "_seqfuse_hf_t5_exact")
