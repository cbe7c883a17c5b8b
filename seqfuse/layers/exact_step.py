"""The exact incremental decoder step: stock fairseq arithmetic, one C++ call.

A fairseq ``TransformerDecoder`` spends most of a small-batch decode step in
Python: module calls, incremental-state dictionaries, shape asserts, around
forty tensor ops per layer issued one by one. ``seqfuse._C``'s
``decoder_stack_step`` issues the same ATen calls on tensors of the same
shapes, strides and dtypes, in the same order, for every layer in one call, so
its output is bit-identical to the stock layers' (tested against them on every
step) at a fraction of the overhead.

``enable_exact_step(decoder)`` changes the decoder's class to a subclass of its
own class, with the same name (same object: parameters, hooks, ``state_dict``
and ``isinstance`` are unchanged) whose incremental forward takes the one-call path when

- the model is in eval mode, without gradients, in incremental decoding, and
  every layer's K/V cache already exists (the first step runs stock: it builds
  the caches, including the encoder K/V, in fairseq's own format);
- the step's tokens hold no padding, and no earlier step did;
- every layer is a plain ``TransformerDecoderLayer`` whose options the step
  reproduces (checked once by :func:`exact_step_problem`).

Anything else runs the stock forward for that step; the caches stay in
fairseq's format, so the two can alternate. A beam reorder of the
self-attention caches is deferred to the next one-call step, which gathers
the reordered history and appends the step's K/V in one pass (stock copies
the history twice: the reorder's index_select, then the step's cat); a stock
step applies a pending reorder first, with fairseq's own reorder.
"""

from __future__ import annotations

import torch
from fairseq import utils
from fairseq.models.transformer import TransformerDecoderBase
from fairseq.modules import MultiheadAttention
from fairseq.modules.transformer_layer import TransformerDecoderLayer, TransformerDecoderLayerBase

from seqfuse import _ext
from seqfuse._patching import cached_for_structure, mixed_subclass, reorder_incremental_state
from seqfuse.layer_stack import stack_eps, stack_weights
from seqfuse.layers.fairseq import base_mha_problem, decoder_options_problem, ffn_problem
from seqfuse.source_shape import shape_of

_LAYER_TYPES = (TransformerDecoderLayerBase, TransformerDecoderLayer)
# Incremental steps taken by the one-call path ("exact") and by the stock
# layers on an enabled decoder ("stock"): tests and benchmarks read them.
STATS = {"exact": 0, "stock": 0}
# incremental_state key of a beam reorder of the self-attention caches
# deferred to the next one-call step: {"order": int64 tensor}.
DEFERRED_REORDER = "seqfuse.exact_deferred_reorder"
# Activation codes of decoder_stack_step (csrc/exact_decoder.cpp).
_ACTIVATIONS = {"relu": 0, "gelu": 1, "tanh": 2}


# The fairseq code the C++ step re-issues, as in fairseq 0.12 (where parity is
# tested), by the shape of its source (seqfuse.source_shape): other code runs
# the stock layers.
_VERIFIED = {
    "MultiheadAttention.forward": "8c2cb722994bbd62",
    "MultiheadAttention._append_prev_key_padding_mask": "3e7ae0a2f16ecfd3",
    "TransformerDecoderLayerBase.forward": "96054b8a7705d75c",
    "TransformerDecoderBase.extract_features_scriptable": "535b1e7793450f1b",
    "softmax": "797bab71ab83e372",
}


def _library_problem() -> str | None:
    current = {
        "MultiheadAttention.forward": MultiheadAttention.forward,
        "MultiheadAttention._append_prev_key_padding_mask": (
            MultiheadAttention._append_prev_key_padding_mask
        ),
        "TransformerDecoderLayerBase.forward": TransformerDecoderLayerBase.forward,
        "TransformerDecoderBase.extract_features_scriptable": (
            TransformerDecoderBase.extract_features_scriptable
        ),
        "softmax": utils.softmax,
    }
    for name, fn in current.items():
        if shape_of(fn) != _VERIFIED[name]:
            return f"this fairseq's {name} is not the verified one"
    return None


def _activation_code(fn) -> int | None:
    for name, code in _ACTIVATIONS.items():
        if fn is utils.get_activation_fn(name):
            return code
    return None


def _mha_problem(mha, where: str, cross: bool) -> str | None:
    why = base_mha_problem(mha, where)
    if why is not None:
        return why
    if mha.onnx_trace:
        return f"{where}: onnx_trace"
    if mha.self_attention == cross or mha.encoder_decoder_attention != cross:
        return f"{where}: unexpected attention kind"
    if mha.head_dim * mha.num_heads != mha.embed_dim:
        return f"{where}: heads do not split the embedding"
    if type(mha).apply_sparse_mask is not MultiheadAttention.apply_sparse_mask:
        return f"{where}: sparse mask"
    return None


def exact_step_problem(decoder) -> str | None:
    """Why the one-call step cannot reproduce this decoder, or None."""
    if _ext._C is None:
        return "the compiled extension is not available"
    if not isinstance(decoder, TransformerDecoderBase):
        return f"decoder class {type(decoder).__name__}"
    for name in (
        "forward",
        "extract_features",
        "extract_features_scriptable",
        "output_layer",
        "reorder_incremental_state_scripting",
    ):
        if getattr(type(decoder), name) is not getattr(TransformerDecoderBase, name):
            return f"decoder class {type(decoder).__name__} overrides {name}"
    why = _library_problem()
    if why is not None:
        return why
    layers = list(decoder.layers)
    if not layers:
        return "no decoder layers"
    if decoder.cross_self_attention:
        return "cross-self attention"
    first = layers[0]
    for i, layer in enumerate(layers):
        where = f"decoder layer {i}"
        if type(layer) not in _LAYER_TYPES or type(layer).forward is not _LAYER_TYPES[0].forward:
            return f"{where}: class {type(layer).__name__}"
        why = decoder_options_problem(layer, where) or ffn_problem(layer, where)
        if why is not None:
            return why
        if layer.onnx_trace:
            return f"{where}: onnx_trace"
        if _activation_code(layer.activation_fn) is None:
            return f"{where}: activation"
        norms = [layer.self_attn_layer_norm, layer.final_layer_norm]
        if layer.encoder_attn is not None:
            norms.append(layer.encoder_attn_layer_norm)
        for ln in norms:
            if type(ln) is not torch.nn.LayerNorm or not ln.elementwise_affine:
                return f"{where}: layer norm {type(ln).__name__}"
            if ln.bias is None:
                return f"{where}: layer norm without bias"
        why = _mha_problem(layer.self_attn, f"{where} self-attention", cross=False)
        if why is None and layer.encoder_attn is not None:
            why = _mha_problem(layer.encoder_attn, f"{where} encoder attention", cross=True)
        if why is not None:
            return why
        if (layer.encoder_attn is None) != (first.encoder_attn is None):
            return "layers differ in having encoder attention"
        if layer.encoder_attn is None:
            return "decoder without encoder attention"
        same = (
            layer.normalize_before == first.normalize_before
            and layer.self_attn.num_heads == first.self_attn.num_heads
            and layer.encoder_attn.num_heads == first.self_attn.num_heads
            and layer.self_attn.scaling == first.self_attn.scaling
            and layer.encoder_attn.scaling == first.self_attn.scaling
            and layer.embed_dim == first.embed_dim
            and layer.activation_fn is first.activation_fn
        )
        if not same:
            return "layers differ in heads, scaling, norm placement or activation"
    return None


def _build_exact_plan(decoder) -> dict:
    layers = list(decoder.layers)
    first = layers[0]
    plan = {
        "weights": stack_weights(layers),
        "self": [lay.self_attn for lay in layers],
        "cross": [lay.encoder_attn for lay in layers],
        "eps": stack_eps(layers),
        "heads": first.self_attn.num_heads,
        "scaling": float(first.self_attn.scaling),
        "act": _activation_code(first.activation_fn),
        "pre_norm": bool(first.normalize_before),
    }
    # The fixed arguments held by one C++ object: a step passes only x and
    # the caches (no dispatcher boxing of the weight list); None with an
    # extension that has none (the op runs then).
    cls = getattr(_ext._C, "ExactStepPlan", None)
    plan["native"] = (
        None
        if cls is None
        else cls(
            plan["weights"],
            plan["eps"],
            plan["heads"],
            plan["scaling"],
            plan["act"],
            plan["pre_norm"],
        )
    )
    # whether its step takes a deferred beam reorder (an older build's does not)
    plan["defers"] = cls is not None and "order" in (cls.step.__doc__ or "")
    return plan


class ExactStepDecoder(TransformerDecoderBase):
    """Mixed into a decoder's own class by :func:`enable_exact_step`."""

    _seqfuse_exact_step = True

    def _exact_plan(self):
        """Per-module constants of the one-call step, built once and reused
        until a module or parameter is registered anywhere (a layer or
        weight replaced)."""
        return cached_for_structure(self, "_seqfuse_exact_plan", _build_exact_plan)

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out=None,
        incremental_state=None,
        full_context_alignment: bool = False,
        alignment_layer: int | None = None,
        alignment_heads: int | None = None,
    ):
        out = None
        incremental = incremental_state is not None
        if (
            incremental
            and not self.training
            and not full_context_alignment
            and encoder_out is not None
            and not torch.is_grad_enabled()
        ):
            out = self._exact_step(
                prev_output_tokens, encoder_out, incremental_state, alignment_layer, alignment_heads
            )
        if out is not None:
            STATS["exact"] += 1
        else:
            STATS["stock"] += incremental
            if incremental:
                self._apply_deferred_reorder(incremental_state)
            out = super().extract_features_scriptable(
                prev_output_tokens,
                encoder_out,
                incremental_state,
                full_context_alignment,
                alignment_layer,
                alignment_heads,
            )
        return out

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        """fairseq's reorder, except that the self-attention caches' reorder
        is deferred to the next one-call step when that step will take it
        (``ExactStepPlan.step``'s ``order``: the reordered cache is gathered
        and the step's K/V appended in one pass, instead of stock's copy of
        the reordered history followed by the ``cat`` that copies it again).
        Successive reorders compose; anything that reads the caches otherwise
        (a stock step) applies the pending reorder first, as stock would have."""
        plan = self._exact_plan()
        if incremental_state is not None and self._can_defer(plan, incremental_state, new_order):
            pending = incremental_state.get(DEFERRED_REORDER)
            order = new_order if pending is None else pending["order"].index_select(0, new_order)
            incremental_state[DEFERRED_REORDER] = {"order": order}
            reorder_incremental_state(self, incremental_state, new_order, skip=plan["self"])
            return
        self._apply_deferred_reorder(incremental_state)
        reorder_incremental_state(self, incremental_state, new_order)

    def _can_defer(self, plan, incremental_state, new_order) -> bool:
        """Whether the next step can take the self-attention caches' reorder:
        the one-call object with its ``order`` argument, a CPU int64 order,
        and caches of the one-call step's kind (no key padding)."""
        if plan["native"] is None or not plan["defers"]:
            return False
        if new_order.device.type != "cpu" or new_order.dtype != torch.long:
            return False
        for mha in plan["self"]:
            buf = mha._get_input_buffer(incremental_state)
            k = buf.get("prev_key")
            if k is None or k.device.type != "cpu" or buf.get("prev_key_padding_mask") is not None:
                return False
        return True

    def _apply_deferred_reorder(self, incremental_state) -> None:
        """Apply a reorder deferred by ``reorder_incremental_state_scripting``
        to the self-attention caches, with stock's own reorder."""
        if incremental_state is None:
            return
        pending = incremental_state.pop(DEFERRED_REORDER, None)
        if pending is not None:
            for mha in self._exact_plan()["self"]:
                mha.reorder_incremental_state(incremental_state, pending["order"])

    def _exact_step(
        self, prev_output_tokens, encoder_out, incremental_state, alignment_layer, alignment_heads
    ):
        """The step through decoder_stack_step, or None when it must run stock."""
        if len(encoder_out["encoder_out"]) == 0:
            return None
        plan = self._exact_plan()
        self_bufs = [mha._get_input_buffer(incremental_state) for mha in plan["self"]]
        self_k, self_v, cross_k, cross_v, cross_pad = [], [], [], [], []
        for buf in self_bufs:
            k = buf.get("prev_key")
            if k is None or buf.get("prev_key_padding_mask") is not None:
                return None
            self_k.append(k)
            self_v.append(buf["prev_value"])
        for mha in plan["cross"]:
            buf = mha._get_input_buffer(incremental_state)
            k = buf.get("prev_key")
            if k is None:
                return None
            cross_k.append(k)
            cross_v.append(buf["prev_value"])
            cross_pad.append(buf.get("prev_key_padding_mask"))
        tokens = prev_output_tokens[:, -1:]
        if tokens.eq(self.padding_idx).any():
            return None

        # The embedding prologue, op for op as the stock decoder computes it.
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(
                prev_output_tokens, incremental_state=incremental_state
            )[:, -1:]
        x = self.embed_scale * self.embed_tokens(tokens.contiguous())
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        x = x.transpose(0, 1)

        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        if plan["native"] is not None:
            # a pending reorder exists only when the object takes one
            pending = incremental_state.pop(DEFERRED_REORDER, None)
            order = () if pending is None else (pending["order"],)
            x, new_k, new_v, inner, attn = plan["native"].step(
                x, self_k, self_v, cross_k, cross_v, cross_pad, alignment_layer, *order
            )
        else:
            x, new_k, new_v, inner, attn = torch.ops.seqfuse.decoder_stack_step(
                x,
                plan["weights"],
                self_k,
                self_v,
                cross_k,
                cross_v,
                cross_pad,
                plan["eps"],
                plan["heads"],
                plan["scaling"],
                plan["act"],
                plan["pre_norm"],
                alignment_layer,
            )
        for buf, k, v in zip(self_bufs, new_k, new_v):  # the dicts held in incremental_state
            buf["prev_key"] = k
            buf["prev_value"] = v
        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {"attn": [attn], "inner_states": list(inner)}


def enable_exact_step(decoder) -> str | None:
    """Give ``decoder`` the one-call incremental step (in place); returns why
    not, or None. Idempotent."""
    if getattr(decoder, "_seqfuse_exact_step", False):
        return None
    why = exact_step_problem(decoder)
    if why is not None:
        return why
    decoder.__class__ = mixed_subclass(ExactStepDecoder, type(decoder))
    return None


def disable_exact_step(decoder) -> None:
    """Undo :func:`enable_exact_step`."""
    if getattr(decoder, "_seqfuse_exact_step", False):
        decoder.__class__ = type(decoder).__bases__[1]
        decoder.__dict__.pop("_seqfuse_exact_plan", None)
        decoder.__dict__.pop("_seqfuse_reorder", None)
