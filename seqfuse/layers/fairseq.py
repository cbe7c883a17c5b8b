"""Swap the layers of a fairseq transformer for fused ones, in place.

``optimize_fairseq_model(model)`` checks everything first and then replaces

- every encoder layer by ``FusedTransformerEncoderLayer``,
- every decoder layer by ``FusedTransformerDecoderLayer``,
- the decoder by ``FusedTransformerDecoder`` (fused embedding + positions,
  fused final layer norm, the output projection GEMM),

each holding the same child modules and Parameter objects as the module it
replaces. Anything it cannot run exactly leaves the model untouched and is
reported as ``(False, reason)``.
"""

from __future__ import annotations

import torch
from fairseq.models import FairseqIncrementalDecoder
from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules import (
    LearnedPositionalEmbedding,
    MultiheadAttention,
    SinusoidalPositionalEmbedding,
)
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayer,
    TransformerDecoderLayerBase,
    TransformerEncoderLayer,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from seqfuse._patching import cached_for_structure, reorder_incremental_state, reorder_modules
from seqfuse.layers.fused_step import (
    ALL_HEADS,
    STEP_MEMORY_KEY,
    encoder_stack,
    encoder_stack_takes,
    next_reorder,
    one_call_step,
    step_logits,
)
from seqfuse.layers.fused_step import STATS as FUSED_STEP_STATS
from seqfuse.layers.kv_cache import ROWS_PER_SOURCE, SelfAttnCache
from seqfuse.layers.transformer import (
    MAX_HEAD_DIM,
    FusedTransformerDecoderLayer,
    FusedTransformerEncoderLayer,
    _adopt,
    _needs_grad,
    activation_name,
)
from seqfuse.ops.add_layernorm import add_layernorm
from seqfuse.ops.embedding import POS_FIXED, POS_MAKE, POS_NONE, embedding
from seqfuse.ops.linear import linear

_ENCODER_LAYER_TYPES = (TransformerEncoderLayerBase, TransformerEncoderLayer)
_DECODER_LAYER_TYPES = (TransformerDecoderLayerBase, TransformerDecoderLayer)


def base_mha_problem(mha, what: str) -> str | None:
    """What in a MultiheadAttention neither the fused layers nor the exact
    one-call step (seqfuse.layers.exact_step) reproduce, or None."""
    if type(mha) is not MultiheadAttention:
        return f"{what}: custom attention class {type(mha).__name__}"
    if mha.bias_k is not None or mha.add_zero_attn:
        return f"{what}: add_bias_kv / add_zero_attn"
    if getattr(mha, "skip_embed_dim_check", False):
        return f"{what}: skip_embed_dim_check"
    for p in (mha.q_proj, mha.k_proj, mha.v_proj, mha.out_proj):
        if type(p) is not torch.nn.Linear or p.bias is None:
            return f"{what}: projections must be biased nn.Linear (quant noise?)"
    if getattr(mha.dropout_module, "apply_during_inference", False):
        return f"{what}: dropout applied during inference"
    return None


def decoder_options_problem(layer, where: str) -> str | None:
    """Decoder-layer options neither the fused layers nor the exact step reproduce."""
    if layer.cross_self_attention:
        return f"{where}: cross-self attention"
    if layer.attn_ln is not None or layer.c_attn is not None:
        return f"{where}: scale_heads / scale_attn"
    if layer.ffn_layernorm is not None or layer.w_resid is not None:
        return f"{where}: scale_fc / scale_resids"
    return None


def ffn_problem(layer, where: str) -> str | None:
    """The FFN (and dropout) of an encoder or decoder layer, as both paths need it."""
    for d in (layer.dropout_module, layer.activation_dropout_module):
        if getattr(d, "apply_during_inference", False):
            return f"{where}: dropout applied during inference"
    for fc in (layer.fc1, layer.fc2):
        if type(fc) is not torch.nn.Linear or fc.bias is None:
            return f"{where}: FFN projections must be biased nn.Linear"
    return None


def _mha_problem(mha, embed_dim: int, what: str) -> str | None:
    why = base_mha_problem(mha, what)
    if why is not None:
        return why
    if getattr(mha, "use_xformers", False):
        return f"{what}: xformers attention config"
    if mha.head_dim * mha.num_heads != embed_dim or mha.head_dim > MAX_HEAD_DIM:
        return f"{what}: unsupported head size {mha.head_dim} (max {MAX_HEAD_DIM})"
    if mha.k_proj.in_features != mha.v_proj.in_features:
        return f"{what}: kdim != vdim"
    return None


def _layer_problem(layer, i: int, kind: str) -> str | None:
    where = f"{kind} layer {i}"
    if kind == "encoder":
        if type(layer) not in _ENCODER_LAYER_TYPES:
            return f"{where}: unsupported class {type(layer).__name__}"
        if layer.return_fc:
            return f"{where}: return_fc"
    else:
        if type(layer) not in _DECODER_LAYER_TYPES:
            return f"{where}: unsupported class {type(layer).__name__}"
        why = decoder_options_problem(layer, where)
        if why is not None:
            return why
    if layer.quant_noise and layer.quant_noise > 0:
        return f"{where}: quant noise"
    if activation_name(layer.activation_fn) is None:
        return f"{where}: unsupported activation"
    why = ffn_problem(layer, where) or _mha_problem(
        layer.self_attn, layer.embed_dim, f"{where} self-attention"
    )
    if why is None and kind == "decoder" and layer.encoder_attn is not None:
        why = _mha_problem(layer.encoder_attn, layer.embed_dim, f"{where} encoder attention")
    return why


def _stack_problem(stack, kind: str, training: bool) -> str | None:
    if getattr(stack, "quant_noise", None) is not None:
        return f"{kind}: quant noise on embeddings"
    layerdrop = getattr(stack, "encoder_layerdrop", getattr(stack, "decoder_layerdrop", 0.0))
    if training and layerdrop > 0:
        return f"{kind}: layerdrop during training"
    for i, layer in enumerate(stack.layers):
        if isinstance(layer, FusedTransformerEncoderLayer | FusedTransformerDecoderLayer):
            return f"{kind}: already optimised"
        why = _layer_problem(layer, i, kind)
        if why is not None:
            return why
    return None


def optimize_fairseq_model(model: torch.nn.Module) -> tuple[bool, str]:
    """Swap a fairseq transformer's layers for fused ones in place.

    Returns ``(True, summary)``, or ``(False, reason)`` with the model untouched.
    """
    from fairseq.models.transformer import TransformerModelBase

    if not isinstance(model, TransformerModelBase):
        return False, f"not a fairseq transformer ({type(model).__name__})"
    if hasattr(model, "alignment_heads") or hasattr(model, "full_context_alignment"):
        return False, "alignment model (alignment heads)"
    from seqfuse.layers.exact_step import disable_exact_step

    disable_exact_step(model.decoder)  # the fused decoder replaces it
    enc, dec = model.encoder, model.decoder
    if not isinstance(enc, TransformerEncoderBase) or not isinstance(dec, TransformerDecoderBase):
        return False, "encoder/decoder are not fairseq transformer stacks"
    if getattr(dec, "adaptive_softmax", None) is not None:
        return False, "adaptive softmax"
    if dec.cross_self_attention:
        return False, "cross-self attention"
    if len(dec.layers) == 0 or any(type(m).__name__ == "BaseLayer" for m in dec.layers):
        return False, "decoder has no layers or BASE layers"
    for stack, kind in ((enc, "encoder"), (dec, "decoder")):
        why = _stack_problem(stack, kind, model.training)
        if why is not None:
            return False, why
    # Checks passed: swap (nothing below can fail half-way).
    for i, layer in enumerate(enc.layers):
        enc.layers[i] = FusedTransformerEncoderLayer.from_layer(layer)
    for i, layer in enumerate(dec.layers):
        dec.layers[i] = FusedTransformerDecoderLayer.from_layer(layer)
    model.encoder = FusedTransformerEncoder.from_encoder(enc)
    model.decoder = FusedTransformerDecoder.from_decoder(dec)
    fast = model.decoder._fast_path_problem()
    note = "decoder fast path" if fast is None else f"decoder uses stock embedding/output ({fast})"
    return True, f"fused {len(enc.layers)} encoder + {len(dec.layers)} decoder layers; {note}"


class FusedTransformerEncoder(TransformerEncoderBase):
    """fairseq ``TransformerEncoderBase`` whose inference forward runs the
    fused layers in one call (seqfuse.layers.fused_step.encoder_stack); the
    embedding, masks, final norm and output dict are fairseq's own code."""

    @classmethod
    def from_encoder(cls, enc: TransformerEncoderBase) -> FusedTransformerEncoder:
        sub = cls if type(enc) is TransformerEncoderBase else _fused_subclass(type(enc), cls)
        return _adopt(sub, enc)

    def forward_scriptable(
        self,
        src_tokens,
        src_lengths: Tensor | None = None,
        return_all_hiddens: bool = False,
        token_embeddings: Tensor | None = None,
    ):
        if return_all_hiddens or not encoder_stack_takes(self, src_tokens):
            return super().forward_scriptable(
                src_tokens, src_lengths, return_all_hiddens, token_embeddings
            )
        # fairseq 0.12's forward_scriptable (verified by encoder_stack_takes),
        # with the layer loop as one call.
        encoder_padding_mask = src_tokens.eq(self.padding_idx)
        has_pads = encoder_padding_mask.any()
        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)
        x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x) * has_pads.type_as(x))
        x = x.transpose(0, 1)
        x = encoder_stack(self, x, encoder_padding_mask if has_pads else None)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        src_lengths = (
            src_tokens.ne(self.padding_idx)
            .sum(dim=1, dtype=torch.int32)
            .reshape(-1, 1)
            .contiguous()
        )
        return {
            "encoder_out": [x],
            "encoder_padding_mask": [encoder_padding_mask],
            "encoder_embedding": [encoder_embedding],
            "encoder_states": [],
            "fc_results": [],
            "src_tokens": [],
            "src_lengths": [src_lengths],
        }


def _fused_reorder_layers(decoder):
    """(the fused layers, the stock attention modules' state keys) when the
    module walk of a reorder finds nothing else with state; else False."""
    layers, stock_keys = [], []
    for module, state_key in reorder_modules(decoder):
        if state_key is not None:
            stock_keys.append(state_key)
        elif isinstance(module, FusedTransformerDecoderLayer) and (
            type(module).reorder_incremental_state
            is FusedTransformerDecoderLayer.reorder_incremental_state
        ):
            layers.append(module)
        elif (
            type(module).reorder_incremental_state
            is not FairseqIncrementalDecoder.reorder_incremental_state
        ):
            return False  # another module with state of its own
    return (layers, stock_keys) if layers else False


class FusedTransformerDecoder(TransformerDecoderBase):
    """fairseq ``TransformerDecoderBase`` whose inference forward embeds with the
    fused embedding op, runs the fused layers and the fused final layer norm."""

    @classmethod
    def from_decoder(cls, dec: TransformerDecoderBase) -> FusedTransformerDecoder:
        # A subclass of the decoder's own class keeps its overrides and isinstance.
        sub = cls if type(dec) is TransformerDecoderBase else _fused_subclass(type(dec))
        return _adopt(sub, dec)

    def _fast_path_problem(self) -> str | None:
        if self.project_in_dim is not None or self.project_out_dim is not None:
            return "project_in/out_dim"
        if self.quant_noise is not None:
            return "quant noise"
        if getattr(self.dropout_module, "apply_during_inference", False):
            return "dropout applied during inference"
        pos = self.embed_positions
        if pos is not None and type(pos) not in (
            SinusoidalPositionalEmbedding,
            LearnedPositionalEmbedding,
        ):
            return f"positions {type(pos).__name__}"
        if type(self.embed_tokens) is not torch.nn.Embedding:
            return "embedding is not nn.Embedding"
        if not all(isinstance(m, FusedTransformerDecoderLayer) for m in self.layers):
            return "layers not fused"
        return None

    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        if not self._reorder_fused_caches(incremental_state, new_order):
            reorder_incremental_state(self, incremental_state, new_order)

    def reorders_only_fused_caches(self, incremental_state) -> bool:
        """Whether a reorder of ``incremental_state`` is the fused layers'
        caches' alone, every layer's (``_reorder_fused_caches`` takes it)."""
        layers = cached_for_structure(self, "_seqfuse_fused_reorder", _fused_reorder_layers)
        return (
            layers is not False
            and len(layers[0]) == len(self.layers)
            and not any(k in incremental_state for k in layers[1])
        )

    def _reorder_fused_caches(self, incremental_state, new_order) -> bool:
        """The reorder when the only state to reorder is the fused layers'
        caches (what the module walk would find): every layer's
        self-attention tables in one op call (``SelfAttnCache.reorder_all``),
        then the cross-attention maps. False when anything else holds state."""
        if incremental_state is None:
            return False
        layers = cached_for_structure(self, "_seqfuse_fused_reorder", _fused_reorder_layers)
        if layers is False or any(k in incremental_state for k in layers[1]):
            return False
        if next_reorder(self, incremental_state, new_order):
            return True  # between whole-network steps, rows kept: the tables only
        selfs, crosses = [], []
        for layer in layers[0]:
            state = incremental_state.get(layer._fused_key)
            if state is None:
                continue
            if state.keys() != {"self", "cross"}:
                return False
            selfs.append(state["self"])
            crosses.append(state["cross"])
        if any(cache.repacks_at(new_order.numel()) for cache in selfs):
            # The caches repack for the rows still decoding: the step's
            # memory (sized for the rows before, more than are left) goes
            # first, so the two are never held at once.
            incremental_state.pop(STEP_MEMORY_KEY, None)
        SelfAttnCache.reorder_all(selfs, new_order)
        for cache in crosses:
            cache.reorder(new_order)
        return True

    def output_layer(self, features):
        """The vocabulary projection through seqfuse's packed-weight GEMM."""
        proj = getattr(self, "output_projection", None)
        if (
            self.adaptive_softmax is not None
            or type(proj) is not torch.nn.Linear
            or self.training
            or _needs_grad(self, features)
        ):
            return super().output_layer(features)
        b, t, c = features.shape
        return linear(features.reshape(b * t, c), proj.weight, proj.bias).view(b, t, -1)

    def step_logits(self, prev_output_tokens, encoder_out, incremental_state):
        """An incremental step of the whole network in one C++ call, or None
        (see ``seqfuse.layers.fused_step.step_logits``)."""
        return step_logits(self, prev_output_tokens, encoder_out, incremental_state)

    def takes_encoder_out_per_source(self) -> bool:
        """Whether an incremental call may get one encoder output row per
        source, with ``incremental_state[ROWS_PER_SOURCE] = k`` decoder rows
        per source, instead of k copies of each (the fast path's layers share
        each source's cross-attention K/V by its k rows)."""
        return not self.training and self._fast_path_problem() is None

    def _pos_table(self, slen: int) -> Tensor | None:
        pos = self.embed_positions
        if pos is None:
            return None
        if isinstance(pos, SinusoidalPositionalEmbedding):
            max_pos = pos.padding_idx + 1 + slen
            if max_pos > pos.weights.size(0):  # grow the table exactly as stock does
                pos.weights = SinusoidalPositionalEmbedding.get_embedding(
                    max_pos, pos.embedding_dim, pos.padding_idx
                ).to(pos.weights)
            return pos.weights
        return pos.weight

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out=None,
        incremental_state=None,
        full_context_alignment: bool = False,
        alignment_layer: int | None = None,
        alignment_heads: int | None = None,
    ):
        if (
            self.training
            or full_context_alignment
            or self._fast_path_problem() is not None
            or _needs_grad(self, self.embed_tokens.weight)
        ):
            return super().extract_features_scriptable(
                prev_output_tokens,
                _copies_per_row(encoder_out, incremental_state, prev_output_tokens.size(0)),
                incremental_state,
                full_context_alignment,
                alignment_layer,
                alignment_heads,
            )
        bs, slen = prev_output_tokens.size()
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1
        enc = padding_mask = None
        if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
            enc = encoder_out["encoder_out"][0]
        if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
            padding_mask = encoder_out["encoder_padding_mask"][0]

        pos_table = self._pos_table(slen)
        pad = self.padding_idx
        tokens = prev_output_tokens
        if incremental_state is not None:
            tokens = prev_output_tokens[:, -1:]
            mode, fixed = POS_FIXED, pad + slen
        else:
            mode, fixed = POS_MAKE, 0
        if pos_table is None:
            mode = POS_NONE
        x = embedding(
            tokens, self.embed_tokens.weight, self.embed_scale, pos_table, pad, mode, fixed
        )
        t, _, c = x.shape
        if self.layernorm_embedding is not None:
            ln = self.layernorm_embedding
            x = add_layernorm(x.view(t * bs, c), None, None, ln.weight, ln.bias, ln.eps)[1].view(
                t, bs, c
            )

        self_attn_padding_mask = None
        if incremental_state is not None:
            # Written into the cache every step (no host sync on a `.any()`).
            self_attn_padding_mask = tokens.eq(pad)
        elif tokens.eq(pad).any():
            self_attn_padding_mask = tokens.eq(pad)

        attn = None
        averaged = False
        inner_states = [x]
        one_call = None
        # The one-call step averages the alignment heads itself.
        mean_heads = ALL_HEADS if alignment_heads is None else alignment_heads
        if incremental_state is not None and enc is not None:
            one_call = one_call_step(
                self,
                x,
                incremental_state,
                self_attn_padding_mask,
                alignment_layer,
                enc,
                padding_mask,
                mean_heads if mean_heads > 0 else -1,
            )
            FUSED_STEP_STATS["one_call" if one_call is not None else "layers"] += 1
        if one_call is not None:
            x, layer_attn, layer_outputs = one_call
            inner_states += layer_outputs
            if layer_attn is not None:
                attn = layer_attn.float().to(x)
                averaged = mean_heads > 0
        else:
            causal = incremental_state is None
            for idx, layer in enumerate(self.layers):
                align = idx == alignment_layer
                x, layer_attn, _ = layer.fused_forward(
                    x,
                    enc,
                    padding_mask,
                    incremental_state,
                    causal,
                    self_attn_padding_mask,
                    align,
                    align,
                )
                inner_states.append(x)
                if layer_attn is not None and align:
                    attn = layer_attn.float().to(x)
        if attn is not None and not averaged:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = _head_mean(attn)
        if self.layer_norm is not None:
            ln = self.layer_norm
            x = add_layernorm(x.view(t * bs, c), None, None, ln.weight, ln.bias, ln.eps)[1].view(
                t, bs, c
            )
        x = x.transpose(0, 1)
        return x, {"attn": [attn], "inner_states": inner_states}


def _head_mean(attn: Tensor) -> Tensor:
    """``attn [heads, ...]`` averaged over heads, summed head by head: the same
    order for every element whatever the row count (torch's mean over dim 0
    picks its order by the inner size), so a row's weights do not depend on
    the batch it is decoded in."""
    acc = attn[0].clone()
    for h in range(1, attn.size(0)):
        acc.add_(attn[h])
    return acc.div_(attn.size(0))


def _copies_per_row(encoder_out, incremental_state, rows: int):
    """An encoder output with one row per source (``ROWS_PER_SOURCE``) as the
    stock decoder wants it: repeated to one copy per decoder row."""
    k = incremental_state.get(ROWS_PER_SOURCE) if incremental_state is not None else None
    if not k or encoder_out is None or len(encoder_out["encoder_out"]) == 0:
        return encoder_out
    enc = encoder_out["encoder_out"][0]
    if enc.size(1) * k != rows or k == 1:
        return encoder_out
    out = dict(encoder_out)
    out["encoder_out"] = [enc.repeat_interleave(k, dim=1)]
    if len(encoder_out.get("encoder_padding_mask", [])) > 0:
        out["encoder_padding_mask"] = [
            encoder_out["encoder_padding_mask"][0].repeat_interleave(k, dim=0)
        ]
    return out


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _fused_subclass(base: type, mixin: type = None) -> type:
    """``mixin`` (default ``FusedTransformerDecoder``) behaviour on top of a
    fairseq encoder/decoder subclass."""
    mixin = mixin or FusedTransformerDecoder
    sub = _SUBCLASSES.get((mixin, base))
    if sub is None:
        sub = type(f"Fused{base.__name__}", (mixin, base), {})
        _SUBCLASSES[(mixin, base)] = sub
    return sub
