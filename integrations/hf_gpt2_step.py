"""The exact one-call decoding step for Hugging Face GPT-2.

``seqfuse._C``'s ``hf_gpt2_stack_step`` issues, for every ``GPT2Block`` in one
C++ call, the ATen calls that transformers' block, ``GPT2Attention`` (sdpa),
``GPT2MLP``, ``Conv1D``, the activation, ``sdpa_attention_forward`` and
``DynamicLayer.update`` issue for a one-token step, on tensors of the same
shapes and strides: the result is bit-identical to the stock blocks (tested
against them), without the per-op Python work.

:func:`enable` (called by ``seqfuse.optimize``) changes, in place,

- the ``GPT2Model``'s class to a subclass of its own (same name) whose forward
  marks the block loop as running, then calls the stock forward: embeddings,
  positions and the causal mask stay transformers' own code;
- the class of its block list ``h`` to a ``ModuleList`` subclass that, only
  inside that forward, iterates as one runner: for a one-token step with
  initialised caches and nothing recording the blocks, the runner makes the
  C++ call and leaves the caches where ``DynamicLayer.update`` would; for
  anything else it calls the stock blocks in order, as the loop would.

In the fused mode (``integrations.hf_fused``: the ``Conv1D`` modules are
``PackedConv1D``) the call gets the weights' panel packs and runs the
projections on seqfuse's packed GEMM, as ``PackedConv1D`` does: within 1e-5
of stock, not bit-identical.

Supported: GPT-2 blocks of the verified code (transformers 5.x) with sdpa
attention, no cross-attention, and gelu_new/gelu/relu/silu/tanh. Anything
else runs the stock blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from integrations import hf_exact_step
from integrations.hf_exact_step import _activation_code, _library_problem, _recorded
from seqfuse._patching import cached_for_structure
from seqfuse.source_shape import shape_of

# transformers 5.x code the C++ step mirrors, by the shape of its source
# (seqfuse.source_shape), as in the releases where parity is tested (5.17.0
# and 5.23.0).
_VERIFIED = {
    "GPT2Model.forward": {"e0f822cb14838a73"},
    "GPT2Block.forward": {"66d8e9905099fd02"},
    "GPT2Attention.forward": {"4042cd03f2f8511a"},
    "GPT2MLP.forward": {"1dc1407965754f9d"},
    "Conv1D.forward": {"bd218b054dc87317"},
    "NewGELUActivation.forward": {"191d686030e1fdfd"},
    # 5.23, 5.17: they differ in the offloaded cache's stream waits only (an
    # offloaded cache runs the stock layers, see below)
    "Cache.update": {"2752c1b2f40db711", "b1f2a9f72c84245f"},
}
_NEW_GELU = 5  # hf_gpt2_stack_step's code for NewGELUActivation


def _gpt2_library_problem() -> str | None:
    from transformers.activations import NewGELUActivation
    from transformers.cache_utils import Cache
    from transformers.models.gpt2 import modeling_gpt2
    from transformers.pytorch_utils import Conv1D

    current = {
        "GPT2Model.forward": modeling_gpt2.GPT2Model.forward,
        "GPT2Block.forward": modeling_gpt2.GPT2Block.forward,
        "GPT2Attention.forward": modeling_gpt2.GPT2Attention.forward,
        "GPT2MLP.forward": modeling_gpt2.GPT2MLP.forward,
        "Conv1D.forward": Conv1D.forward,
        "NewGELUActivation.forward": NewGELUActivation.forward,
        "Cache.update": Cache.update,
    }
    for name, fn in current.items():
        if shape_of(fn) not in _VERIFIED[name]:
            return f"this transformers' {name} is not the verified one"
    return _library_problem()


def _act_code(act) -> int | None:
    if type(act).__name__ == "NewGELUActivation" and type(act).__module__ == (
        "transformers.activations"
    ):
        return _NEW_GELU
    return _activation_code(act)


def _transformer(model):
    """The model's ``GPT2Model`` (the model itself or its ``transformer``)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

    if isinstance(model, GPT2Model):
        return model
    inner = getattr(model, "transformer", None)
    return inner if isinstance(inner, GPT2Model) else None


def _conv_types() -> tuple:
    from transformers.pytorch_utils import Conv1D

    from integrations.hf_fused import _conv1d_types

    return (Conv1D, *_conv1d_types().values())


def problem(model) -> str | None:
    """Why the one-call step cannot reproduce this model's blocks, or None."""
    from seqfuse import _ext

    if _ext._C is None:
        return "the compiled extension is not available"
    tr = _transformer(model)
    if tr is None:
        return "not a GPT-2 model"
    blocks = list(tr.h)
    if not blocks:
        return "no blocks"
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r} (sdpa only)"
    if getattr(model.config, "add_cross_attention", False):
        return "cross-attention blocks"
    why = _gpt2_library_problem()
    if why is not None:
        return why
    convs = _conv_types()
    first = blocks[0]
    for i, b in enumerate(blocks):
        where = f"block {i}"
        if type(b).__name__ != "GPT2Block" or type(b.attn).__name__ != "GPT2Attention":
            return f"{where}: not a GPT2Block with GPT2Attention"
        if _act_code(b.mlp.act) is None:
            return f"{where}: activation {type(b.mlp.act).__name__}"
        if type(b.mlp.act) is not type(first.mlp.act):
            return "blocks differ in activation"
        for ln in (b.ln_1, b.ln_2):
            if type(ln) is not nn.LayerNorm or not ln.elementwise_affine or ln.bias is None:
                return f"{where}: layer norm {type(ln).__name__}"
        for conv in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
            if type(conv) not in convs:
                return f"{where}: projections must be Conv1D"
        if b.attn.num_heads != first.attn.num_heads:
            return "blocks differ in heads"
        if b.attn.layer_idx != i:
            return f"{where}: attention layer_idx {b.attn.layer_idx}"
    return None


def _plan(blocks) -> dict:
    weights, eps, scalings = [], [], []
    for b in blocks:
        for m in (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc, b.mlp.c_proj):
            weights += [m.weight, m.bias]
        eps += [float(b.ln_1.eps), float(b.ln_2.eps)]
        scalings.append(float(b.attn.scaling))
    return {
        "weights": weights,
        "eps": eps,
        "scalings": scalings,
        "heads": int(blocks[0].attn.num_heads),
        "act": _act_code(blocks[0].mlp.act),
    }


# Keyword arguments GPT2Model passes its blocks that the step reproduces.
_QUIET_KWARGS = {"encoder_attention_mask", "use_cache", "position_ids", "cache_position"}


class _Runner(hf_exact_step._Runner):
    """What the block loop gets instead of its blocks (one item)."""

    def _exact(self, x, args, kwargs):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        blocks = list(nn.ModuleList.__iter__(self.layers))
        if len(args) != 3 or not set(kwargs) <= _QUIET_KWARGS:
            return None
        cache, mask, enc = args
        if enc is not None or kwargs.get("encoder_attention_mask") is not None:
            return None
        if x.dim() != 3 or x.size(1) != 1 or torch.is_grad_enabled() or blocks[0].training:
            return None
        if type(cache) is not DynamicCache or len(cache.layers) < len(blocks):
            return None
        if cache.offloading:
            return None
        layers = cache.layers
        for i in range(len(blocks)):
            if type(layers[i]) is not DynamicLayer or not layers[i].is_initialized:
                return None
        if _recorded(blocks, lambda b: (b, b.ln_1, b.attn, b.ln_2, b.mlp), self.layers):
            return None
        # built once, anew after any module or parameter registration
        plan = cached_for_structure(self.layers, "_seqfuse_plan", lambda _: _plan(blocks))
        n = len(blocks)
        packs, finite = hf_exact_step.fused_gemm(
            blocks[0].mlp.c_fc,
            x,
            self.layers,
            lambda: [
                m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
            ],
            transposed=True,
        )
        order = hf_exact_step.pending_order(cache)
        x, new_k, new_v = torch.ops.seqfuse.hf_gpt2_stack_step(
            x,
            plan["weights"],
            [layers[i].keys for i in range(n)],
            [layers[i].values for i in range(n)],
            mask,
            plan["eps"],
            plan["scalings"],
            plan["heads"],
            plan["act"],
            packs,
            order,
            # the MLP's c_proj (the last of a block's 4 products) after a ReLU
            plan["act"] == hf_exact_step.RELU and hf_exact_step.skips_zeros(finite, 3, 4),
            *hf_exact_step.kv_rooms(cache, n, packs, order),
        )
        hf_exact_step.step_took_order(cache)
        for i in range(n):  # where DynamicLayer.update leaves them
            layers[i].keys = new_k[i]
            layers[i].values = new_v[i]
        return x


class ExactBlocks(hf_exact_step.ExactLayers):
    """The model's own block list (same modules); inside the model's forward it
    iterates as one :class:`_Runner`."""

    runner = _Runner


class _ExactGPT2(hf_exact_step._ExactDecoder):
    """Mixed into the GPT2Model's own class: arms the block list during forward."""

    _seqfuse_hf_exact = False  # (hf_exact_step's BART-family marker)
    _seqfuse_hf_gpt2_exact = True
    _seqfuse_layer_list = "h"


def enable(model) -> str | None:
    """Give the model's GPT-2 blocks the one-call step (in place); returns why
    not, or None. Idempotent."""
    return hf_exact_step.enable_step(
        _transformer(model),
        "_seqfuse_hf_gpt2_exact",
        lambda: problem(model),
        ExactBlocks,
        _ExactGPT2,
    )


def disable(model) -> None:
    """Undo :func:`enable`."""
    hf_exact_step.disable_step(_transformer(model), "_seqfuse_hf_gpt2_exact")
