"""Token embedding lookup x scale + positional embedding, written time-major.

Contract::

    out[t, b] = round(round(scale * table[tokens[b, t]]) + pos_table[pos[b, t]])
    pos_mode 0: no positions; 1: fairseq ``make_positions`` (pad + running count
    of non-pad tokens, pad at pads); 2: ``fixed_pos`` for every token (fairseq's
    incremental step: pad + prefix length).
    zero_pads: out[t, b] *= 0 where tokens[b, t] == pad (fairseq's encoder).

Args:
    tokens: int64 ``[batch, time]`` (any strides).
    table: ``[vocab, cols]`` fp32/fp16/bf16 (the embedding weight).
    scale: the embedding scale (``sqrt(embed_dim)`` unless disabled).
    pos_table: ``[positions, cols]`` (sinusoidal buffer or learned weight) or None.
    pad: the padding index.

Returns ``[time, batch, cols]`` in ``table.dtype``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seqfuse.ops._layer_backends import backends
from seqfuse.ops.dispatch import explain, pick

POS_NONE, POS_MAKE, POS_FIXED = 0, 1, 2


def make_positions(tokens: Tensor, pad: int) -> Tensor:
    mask = tokens.ne(pad).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad


def embedding_reference(
    tokens: Tensor,
    table: Tensor,
    scale: float,
    pos_table: Tensor | None,
    pad: int,
    pos_mode: int = POS_NONE,
    fixed_pos: int = 0,
    zero_pads: bool = False,
) -> Tensor:
    x = scale * torch.nn.functional.embedding(tokens, table)
    if pos_mode == POS_MAKE:
        x = x + torch.nn.functional.embedding(make_positions(tokens, pad), pos_table)
    elif pos_mode == POS_FIXED:
        x = x + pos_table[fixed_pos]
    if zero_pads:
        x = x * (1 - tokens.eq(pad).unsqueeze(-1).type_as(x))
    return x.transpose(0, 1).contiguous()


def _ext_run(tokens, table, scale, pos_table, pad, pos_mode, fixed_pos, zero_pads):
    return torch.ops.seqfuse.embedding(
        tokens,
        table.contiguous(),
        float(scale),
        None if pos_table is None else pos_table.contiguous(),
        pad,
        pos_mode,
        fixed_pos,
        zero_pads,
    )


def _tensors(tokens, table, scale, pos_table, *rest):
    return (table, pos_table)


BACKENDS = backends(_ext_run, embedding_reference, _tensors)


def embedding(
    tokens: Tensor,
    table: Tensor,
    scale: float,
    pos_table: Tensor | None,
    pad: int,
    pos_mode: int = POS_NONE,
    fixed_pos: int = 0,
    zero_pads: bool = False,
) -> Tensor:
    """See the module docstring. Picks the CUDA, CPU or reference backend."""
    if (pos_table is None) != (pos_mode == POS_NONE):
        raise ValueError("embedding: pos_table goes with pos_mode 1 or 2")
    if pos_table is not None and pos_table.dtype != table.dtype:
        pos_table = pos_table.to(table.dtype)
    args = (tokens, table, scale, pos_table, pad, pos_mode, fixed_pos, zero_pads)
    backend = pick(BACKENDS, *args)
    return backend.run(*args)


def which_backend(table: Tensor) -> str:
    return explain(BACKENDS, None, table, 1.0, None, 0, 0, 0, False)
