"""Multi-head attention core on time-major tensors with heads packed in channels.

Contract (one call per attention block; no projections, those are GEMMs)::

    g(n) = n // q_per_kv                       logical kv row of query row n
    m(g, j) = kv_rows[g] (1-D), kv_rows[g, j] (2-D) or g (None)   physical row
    score[n, h, i, j] = dot(round(q[i, n, h] * scaling), k[j, m(g(n), j), h])
    masked (-inf): key_pad[m, j] != 0, or j > causal_offset + i (causal_offset >= 0)
    p = softmax(score) in fp32                  (all keys masked -> NaN, as stock)
    out[i, n, h] = sum_j round(p[n, h, i, j]) * v[j, m, h]

Args:
    q: ``[tq, n, heads * dim]`` (any strides, channels contiguous), unscaled.
    k, v: ``[s, m, heads * dim]`` (any strides, channels contiguous): a
        projection output, or the first ``s`` slots of a preallocated cache.
    kv_rows: int64 ``[n // q_per_kv]`` or ``[n // q_per_kv, s]`` (any strides),
        or None. A 2-D map lets a beam-search cache reorder by rewriting this
        small table instead of moving K/V (parent pointers per slot); a 1-D map
        selects the sentence of a shared cross-attention K/V.
    key_pad: bool/uint8 ``[m, s]`` (any strides) or None.
    heads: number of heads; scaling: the query scale (``head_dim ** -0.5``).
    q_per_kv: query rows per kv row (beam size when cross K/V is shared).
    causal_offset: -1 for none; else the slot of query 0 (keys after the
        query's own slot are masked).
    need_weights: also return the fp32 probabilities ``[heads, n, tq, s]``.

Returns ``(out [tq, n, heads * dim] in q.dtype, weights or None)``.

``torch.ops.seqfuse.attention_heads(q, k, v, key_pad, scaling)`` (CPU,
float32) is the same core for one query per row in Hugging Face's cache
layout: q ``[b, H, 1, hd]``, k and v ``[b, H, s, hd]`` (each head's channels
contiguous, other strides free), key_pad bool/uint8 ``[b, s]`` or None;
returns ``[b, 1, H * hd]`` (the heads merged). The Hugging Face fused mode's
BART-family step (``hf_decoder_stack_step`` with weight packs) takes it for
sdpa where the masks are key paddings.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqfuse.ops._layer_backends import backends
from seqfuse.ops.dispatch import explain, pick

CUDA_MAX_KEYS = 8192  # kAttentionCudaMaxKeys in csrc/kernels/layer_kernels.h


def _physical_rows(kv_rows: Tensor | None, g: int, s: int, device) -> Tensor:
    if kv_rows is None:
        return torch.arange(g, device=device).view(g, 1).expand(g, s)
    if kv_rows.dim() == 1:
        return kv_rows.view(g, 1).expand(g, s)
    return kv_rows[:, :s]


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_rows: Tensor | None,
    key_pad: Tensor | None,
    heads: int,
    scaling: float,
    q_per_kv: int = 1,
    causal_offset: int = -1,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    tq, n, c = q.shape
    s = k.size(0)
    d = c // heads
    g = n // q_per_kv
    rows = _physical_rows(kv_rows, g, s, q.device)  # [g, s]
    slots = torch.arange(s, device=q.device).view(1, s).expand(g, s)
    kl = k[slots, rows].view(g, s, heads, d).permute(0, 2, 1, 3)  # [g, h, s, d]
    vl = v[slots, rows].view(g, s, heads, d).permute(0, 2, 1, 3)
    qh = (q * scaling).reshape(tq, g, q_per_kv, heads, d).permute(1, 2, 3, 0, 4)  # [g, b, h, tq, d]
    scores = torch.einsum("gbhtd,ghsd->gbhts", qh, kl)
    mask = torch.zeros(g, s, dtype=torch.bool, device=q.device)
    if key_pad is not None:
        mask = key_pad.bool()[rows, slots]
    mask = mask.view(g, 1, 1, 1, s)
    if causal_offset >= 0:
        i = torch.arange(tq, device=q.device).view(tq, 1)
        j = torch.arange(s, device=q.device).view(1, s)
        mask = mask | (j > causal_offset + i).view(1, 1, 1, tq, s)
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    out = torch.einsum("gbhts,ghsd->gbhtd", probs.to(q.dtype), vl)
    out = out.reshape(n, heads, tq, d).permute(2, 0, 1, 3).reshape(tq, n, c).contiguous()
    weights = probs.reshape(n, heads, tq, s).transpose(0, 1) if need_weights else None
    return out, weights


def _ext_run(q, k, v, kv_rows, key_pad, heads, scaling, q_per_kv, causal_offset, need_weights):
    out, w = torch.ops.seqfuse.attention(
        q, k, v, kv_rows, key_pad, heads, float(scaling), q_per_kv, causal_offset, need_weights
    )
    return out, (w if need_weights else None)


def _tensors(q, k, v, *rest):
    return (q, k, v)


def _cuda_extra(q, k, *rest):
    return None if k.size(0) <= CUDA_MAX_KEYS else f"{k.size(0)} keys > {CUDA_MAX_KEYS}"


BACKENDS = backends(_ext_run, attention_reference, _tensors, _cuda_extra)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_rows: Tensor | None = None,
    key_pad: Tensor | None = None,
    heads: int = 1,
    scaling: float = 1.0,
    q_per_kv: int = 1,
    causal_offset: int = -1,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """See the module docstring. Picks the CUDA, CPU or reference backend."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("attention: q, k, v must be [time, rows, channels]")
    if q.size(2) % heads != 0 or q.size(1) % q_per_kv != 0:
        raise ValueError("attention: channels % heads or rows % q_per_kv is not 0")
    if key_pad is not None and key_pad.dtype not in (torch.bool, torch.uint8):
        key_pad = key_pad.ne(0)
    args = (q, k, v, kv_rows, key_pad, heads, scaling, q_per_kv, causal_offset, need_weights)
    backend = pick(BACKENDS, *args)
    return backend.run(*args)


def which_backend(q: Tensor, k: Tensor) -> str:
    return explain(BACKENDS, q, k, k, None, None, 1, 1.0, 1, -1, False)
