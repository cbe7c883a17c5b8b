"""Fused fairseq transformer layers (inference), sharing the stock parameters.

``FusedTransformerEncoderLayer.from_layer(layer)`` and
``FusedTransformerDecoderLayer.from_layer(layer)`` build a module of a subclass
of fairseq's layer class that holds the *same* child modules and Parameter
objects as ``layer`` (no copy): state_dict keys and ``load_state_dict`` are
unchanged. In eval mode without autograd the forward runs the fused ops:

    QKV: one GEMM with the concatenated weights (packed once, repacked when a
         parameter changes) -> attention op (key padding, causal, per-sentence
         cross K/V) -> out-projection GEMM -> bias + residual + layer norm op
    FFN: GEMM -> bias + activation op -> GEMM -> bias + residual + layer norm op

In training, or when autograd is needed, or for inputs the fused path does
not cover (ONNX tracing, explicit prev states, a non-causal self-attention
mask), the stock forward runs.
"""

from __future__ import annotations

import copy
import uuid

import torch
from fairseq import utils
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from seqfuse.layers.kv_cache import (
    FIRST_STEP_SHARED,
    ROWS_PER_SOURCE,
    CrossAttnCache,
    SelfAttnCache,
    initial_slots,
)
from seqfuse.ops.add_layernorm import add_layernorm
from seqfuse.ops.attention import attention
from seqfuse.ops.bias_act import bias_act
from seqfuse.ops.linear import linear

MAX_HEAD_DIM = 256  # the CUDA attention kernel keeps one head's query in shared memory


def activation_name(fn) -> str | None:
    """fairseq activation function -> bias_act name, or None if unsupported."""
    for name in ("relu", "gelu", "gelu_accurate", "tanh"):
        if fn is utils.get_activation_fn(name):
            return name
    return None


def _adopt(cls, module: torch.nn.Module):
    """A new ``cls`` instance with the attributes, children, parameters and
    hooks of ``module`` (containers copied, their contents shared)."""
    new = cls.__new__(cls)
    for k, v in vars(module).items():
        new.__dict__[k] = copy.copy(v) if isinstance(v, (dict, set, list)) else v
    return new


def _needs_grad(module: torch.nn.Module, x: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters())


class _Packed:
    """Concatenated weights, rebuilt when any source tensor changes."""

    def __init__(self):
        self._key = None
        self._value: tuple[Tensor, ...] = ()

    def get(self, *groups: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        flat = [t for g in groups for t in g]
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in flat)
        if key != self._key:
            with torch.no_grad():
                self._value = tuple(torch.cat([t.detach() for t in g], 0) for g in groups)
            self._key = key
        return self._value


def _is_causal(mask: Tensor) -> bool:
    t = mask.size(0)
    if mask.dim() != 2 or mask.size(1) != t:
        return False
    upper = torch.ones(t, t, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def _ln(mod) -> tuple[Tensor, Tensor, float]:
    return mod.weight, mod.bias, mod.eps


def _attn_cfg(mha) -> tuple[int, float]:
    return mha.num_heads, mha.scaling


class FusedTransformerEncoderLayer(TransformerEncoderLayerBase):
    """fairseq ``TransformerEncoderLayerBase`` with a fused inference forward."""

    @classmethod
    def from_layer(cls, layer: TransformerEncoderLayerBase) -> FusedTransformerEncoderLayer:
        new = _adopt(cls, layer)
        new._fused_packed = _Packed()
        new._fused_act = activation_name(layer.activation_fn)
        return new

    def forward(self, x, encoder_padding_mask: Tensor | None, attn_mask: Tensor | None = None):
        if self.training or attn_mask is not None or self.return_fc or _needs_grad(self, x):
            return super().forward(x, encoder_padding_mask, attn_mask)
        t, n, c = x.shape
        sa = self.self_attn
        x2, qkv = _self_attn_qkv(self, self._fused_packed, x)
        heads, scaling = _attn_cfg(sa)
        a, _ = attention(
            qkv[..., :c],
            qkv[..., c : 2 * c],
            qkv[..., 2 * c :],
            None,
            encoder_padding_mask,
            heads,
            scaling,
        )
        o = linear(a.view(t * n, c), sa.out_proj.weight)
        x2, h = _residual_norm(
            o, sa.out_proj.bias, x2, self.self_attn_layer_norm, self.final_layer_norm, self
        )
        x2 = _ffn(self, h, x2)
        return x2.view(t, n, c)


def qkv_weights(layer, packed: _Packed) -> tuple[Tensor, Tensor]:
    """``layer.self_attn``'s Q, K and V weights and biases, each concatenated
    (kept in ``packed`` while the sources are unchanged)."""
    sa = layer.self_attn
    return packed.get(
        (sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight),
        (sa.q_proj.bias, sa.k_proj.bias, sa.v_proj.bias),
    )


def _self_attn_qkv(layer, packed, x: Tensor) -> tuple[Tensor, Tensor]:
    """Q, K and V of ``layer.self_attn`` in one GEMM (after the pre-norm when
    ``normalize_before``): ``x [T, N, C]`` -> ``(x as [T*N, C], qkv [T, N, 3C])``."""
    t, n, c = x.shape
    w_qkv, b_qkv = qkv_weights(layer, packed)
    x2 = x.reshape(t * n, c)
    h = x2
    if layer.normalize_before:
        h = add_layernorm(x2, None, None, *_ln(layer.self_attn_layer_norm))[1]
    return x2, linear(h, w_qkv, b_qkv).view(t, n, 3 * c)


def _residual_norm(o, bias, residual, own_ln, next_ln, layer):
    """Post-norm: (new x, new x) = LN_own(residual + o + bias).
    Pre-norm: (residual + o + bias, LN_next(that sum)) in one pass."""
    if layer.normalize_before:
        return add_layernorm(o, bias, residual, *_ln(next_ln), want_sum=True)
    y = add_layernorm(o, bias, residual, *_ln(own_ln))[1]
    return y, y


def _ffn(layer, h: Tensor, residual: Tensor) -> Tensor:
    f = linear(h, layer.fc1.weight)
    bias_act(f, layer.fc1.bias, layer._fused_act)
    o = linear(f, layer.fc2.weight)
    if layer.normalize_before:
        return add_layernorm(o, layer.fc2.bias, residual, None, None, want_sum=True)[0]
    return add_layernorm(o, layer.fc2.bias, residual, *_ln(layer.final_layer_norm))[1]


class FusedTransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq ``TransformerDecoderLayerBase`` with a fused inference forward and
    preallocated incremental caches (see ``seqfuse.layers.kv_cache``)."""

    @classmethod
    def from_layer(cls, layer: TransformerDecoderLayerBase) -> FusedTransformerDecoderLayer:
        new = _adopt(cls, layer)
        new._fused_packed_self = _Packed()
        new._fused_packed_cross = _Packed()
        new._fused_act = activation_name(layer.activation_fn)
        new._fused_key = f"seqfuse.{uuid.uuid4()}"
        return new

    # -- incremental state ------------------------------------------------------
    def _caches(self, incremental_state) -> dict:
        key = self._fused_key
        state = incremental_state.get(key)
        if state is None:
            state = {}
            incremental_state[key] = state
        return state

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Reorder this layer's caches (rows index the previous step's rows)."""
        if incremental_state is None:
            return incremental_state
        state = incremental_state.get(self._fused_key)
        if state is not None:
            for cache in state.values():
                cache.reorder(new_order)
        return incremental_state

    # -- forward ----------------------------------------------------------------
    def forward(
        self,
        x,
        encoder_out: Tensor | None = None,
        encoder_padding_mask: Tensor | None = None,
        incremental_state=None,
        prev_self_attn_state=None,
        prev_attn_state=None,
        self_attn_mask: Tensor | None = None,
        self_attn_padding_mask: Tensor | None = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        causal = False
        stock = (
            self.training
            or prev_self_attn_state is not None
            or prev_attn_state is not None
            or self.onnx_trace
            or _needs_grad(self, x)
        )
        if not stock and self_attn_mask is not None:
            causal = _is_causal(self_attn_mask)
            stock = not causal
        if stock:
            return super().forward(
                x,
                encoder_out,
                encoder_padding_mask,
                incremental_state,
                prev_self_attn_state,
                prev_attn_state,
                self_attn_mask,
                self_attn_padding_mask,
                need_attn,
                need_head_weights,
            )
        need_weights = need_attn or need_head_weights or (not self.training and self.need_attn)
        return self.fused_forward(
            x,
            encoder_out,
            encoder_padding_mask,
            incremental_state,
            causal,
            self_attn_padding_mask,
            need_weights,
            need_head_weights,
        )

    def fused_forward(
        self,
        x: Tensor,
        encoder_out: Tensor | None,
        encoder_padding_mask: Tensor | None,
        incremental_state,
        causal: bool,
        self_attn_padding_mask: Tensor | None,
        need_weights: bool,
        need_head_weights: bool,
    ):
        """The fused computation; ``x [T, N, C]``, returns ``(x, attn, None)``."""
        t, n, c = x.shape
        sa = self.self_attn
        heads, scaling = _attn_cfg(sa)
        x2, qkv = _self_attn_qkv(self, self._fused_packed_self, x)
        caches = self._caches(incremental_state) if incremental_state is not None else None
        if caches is not None:
            cache = caches.get("self")
            if cache is None:
                cache = self._self_cache(incremental_state, n, t, c, qkv)
                caches["self"] = cache
            cache.append(qkv[..., c:], self_attn_padding_mask)
            k, v, rows, pad = cache.views()
            offset = cache.length - t if causal else -1
            a, _ = attention(qkv[..., :c], k, v, rows, pad, heads, scaling, 1, offset)
        else:
            a, _ = attention(
                qkv[..., :c],
                qkv[..., c : 2 * c],
                qkv[..., 2 * c :],
                None,
                self_attn_padding_mask,
                heads,
                scaling,
                1,
                0 if causal else -1,
            )
        o = linear(a.view(t * n, c), sa.out_proj.weight)
        has_cross = self.encoder_attn is not None and encoder_out is not None
        next_ln = self.encoder_attn_layer_norm if has_cross else self.final_layer_norm
        x2, h = _residual_norm(o, sa.out_proj.bias, x2, self.self_attn_layer_norm, next_ln, self)

        attn = None
        if has_cross:
            ea = self.encoder_attn
            cache = caches.get("cross") if caches is not None else None
            if cache is None:
                cache = self._cross_cache(encoder_out, encoder_padding_mask, n, incremental_state)
                if caches is not None:
                    caches["cross"] = cache
            q = linear(h, ea.q_proj.weight, ea.q_proj.bias).view(t, n, c)
            k, v, rows, pad = cache.views()
            a, w = attention(
                q, k, v, rows, pad, heads, ea.scaling, cache.q_per_kv, -1, need_weights
            )
            if w is not None:
                attn = w if need_head_weights else w.mean(dim=0)
            o = linear(a.view(t * n, c), ea.out_proj.weight)
            x2, h = _residual_norm(
                o, ea.out_proj.bias, x2, self.encoder_attn_layer_norm, self.final_layer_norm, self
            )
        x2 = _ffn(self, h, x2)
        return x2.view(t, n, c), attn, None

    def _self_cache(self, incremental_state, n: int, t: int, c: int, like: Tensor):
        """An empty self-attention cache for a first call of ``n`` rows and
        ``t`` tokens; with ``FIRST_STEP_SHARED = k`` in the incremental state
        it has room for the k rows per row that follow the first reorder."""
        expand = int(incremental_state.get(FIRST_STEP_SHARED) or 1)
        rows = n * expand
        return SelfAttnCache(rows, initial_slots(rows, 2 * t), c, like, expand)

    def _cross_cache(
        self, enc: Tensor, enc_pad: Tensor | None, n: int, incremental_state=None
    ) -> CrossAttnCache:
        """K/V of the encoder output, once per source when ``n`` query rows
        share a source: with the incremental state's ``ROWS_PER_SOURCE = k``
        ``enc`` has one row per source or k copies of each; without it, copies
        as many as fairseq's ``set_beam_size`` gave the encoder attention.
        With its ``FIRST_STEP_SHARED = k`` the ``n`` rows are one per source
        now and ``k`` per source from the first reorder on."""
        per_source = shared = None
        if incremental_state is not None:
            per_source = incremental_state.get(ROWS_PER_SOURCE)
            shared = incremental_state.get(FIRST_STEP_SHARED)
        ea = self.encoder_attn
        s, rows, ce = enc.shape
        k = int(per_source or 0)
        later = 0
        if shared and int(shared) > 1 and rows == n:  # one row per source, for now
            beam, q_per_kv, later = int(shared), 1, int(shared)
        elif k > 1 and rows * k == n:  # one encoder row per source
            beam = q_per_kv = k
        else:
            beam = int(getattr(ea, "beam_size", 1))
            if k > 1 and rows == n and rows % k == 0:
                beam = k
            share = beam > 1 and rows == n and rows % beam == 0
            if share:  # rows of one sentence are identical (the encoder output is repeated)
                enc = enc[:, ::beam]
                enc_pad = enc_pad[::beam] if enc_pad is not None else None
            q_per_kv = beam if share else n // enc.size(1)
        w_kv, b_kv = self._fused_packed_cross.get(
            (ea.k_proj.weight, ea.v_proj.weight), (ea.k_proj.bias, ea.v_proj.bias)
        )
        sent = enc.size(1)
        kv = linear(enc.reshape(s * sent, ce), w_kv, b_kv).view(s, sent, -1)
        pad = enc_pad.bool() if enc_pad is not None else None
        return CrossAttnCache(kv, pad, q_per_kv, beam, later)
