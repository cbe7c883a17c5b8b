"""Bias + residual + layer norm in one pass over each row.

Contract::

    s = x + bias            (rounded to x.dtype; skipped when bias is None)
    s = residual + s        (rounded; skipped when residual is None)
    normed = layer_norm(s, weight, beta, eps)   (fp32 statistics; None when weight is None)

Args:
    x: ``[rows, cols]`` fp32/fp16/bf16, contiguous (a GEMM output without bias).
    bias: ``[cols]`` or None.
    residual: ``[rows, cols]`` or None.
    weight, beta: ``[cols]`` layer-norm affine parameters, or both None (the
        op then returns only the sum: bias + residual of a pre-norm block).
    eps: layer-norm epsilon.
    want_sum: also return ``s`` (pre-norm blocks keep it as the next residual).

Returns ``(s or None, normed or None)``. This is fairseq's
``dropout(out_proj(x)) + residual -> LayerNorm`` in eval mode (dropout is the
identity there); in training the fused layers run the stock computation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqfuse.ops._layer_backends import backends
from seqfuse.ops.dispatch import explain, pick


def add_layernorm_reference(
    x: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    weight: Tensor | None,
    beta: Tensor | None,
    eps: float = 1e-5,
    want_sum: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    s = x if bias is None else x + bias
    if residual is not None:
        s = residual + s
    normed = None
    if weight is not None:
        normed = torch.nn.functional.layer_norm(s, (s.size(-1),), weight, beta, eps)
    return (s if want_sum else None), normed


def _ext_run(x, bias, residual, weight, beta, eps, want_sum):
    s, normed = torch.ops.seqfuse.add_layernorm(
        x.contiguous(),
        bias,
        None if residual is None else residual.contiguous(),
        weight,
        beta,
        float(eps),
        bool(want_sum),
    )
    return (s if want_sum else None), (normed if weight is not None else None)


def _tensors(x, bias, residual, weight, beta, *rest):
    return (x, bias, residual, weight, beta)


BACKENDS = backends(_ext_run, add_layernorm_reference, _tensors)


def add_layernorm(
    x: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    weight: Tensor | None,
    beta: Tensor | None,
    eps: float = 1e-5,
    want_sum: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """See the module docstring. Picks the CUDA, CPU or reference backend."""
    if x.dim() != 2:
        raise ValueError(f"add_layernorm: x must be [rows, cols], got {tuple(x.shape)}")
    if weight is None and not want_sum:
        raise ValueError("add_layernorm: nothing to compute (no weight, want_sum=False)")
    backend = pick(BACKENDS, x, bias, residual, weight, beta, eps, want_sum)
    return backend.run(x, bias, residual, weight, beta, eps, want_sum)


def which_backend(x: Tensor) -> str:
    return explain(BACKENDS, x, None, None, None, None, 1e-5, True)
