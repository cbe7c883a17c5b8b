"""The end of a beam-search step: the candidates that continue, and the
histories gathered for them (fairseq's SequenceGenerator, after finalize).

Contract, per sentence ``s`` (``2k`` candidates, ``k`` beams)::

    mask[s, j]    = eos_mask[s, j] | (j < k & cands_to_ignore[s, j])
    active_hypos  = the k smallest of mask * 2k + j, ascending
    new_ignore    = mask at active_hypos
    active_bbsz_idx[s * k + i] = cand_bbsz_idx[s, active_hypos[s, i]]
    tokens[:, :step + 1] = tokens[active_bbsz_idx, :step + 1]
    tokens[:, step + 1]  = cand_indices at active_hypos
    scores[:, :step]     = scores[active_bbsz_idx, :step]
    scores[:, step]      = cand_scores at active_hypos
    attn[:, :, :step + 2] = attn[active_bbsz_idx, :, :step + 2]   (when given)

``tokens``, ``scores`` and ``attn`` are updated in place; returns
``(active_bbsz_idx [bsz * k], active_hypos [bsz, k], new_ignore [bsz, k])``;
the masks are left as they were. The CPU op (seqfuse._C ``select_active``) does it in one call
with copies and integer compares only, so it equals the torch version
(:func:`select_active_torch`, also the path for other devices and layouts)
exactly.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from seqfuse import _ext


def select_active_torch(eos_mask, cands_to_ignore, cand_bbsz_idx, cand_indices, cand_scores,
                        tokens, scores, attn: Optional[Tensor], step: int):  # fmt: skip
    """fairseq's own operations (the reference)."""
    bsz, cand_size = eos_mask.shape
    beam_size = cands_to_ignore.size(1)
    cand_offsets = torch.arange(cand_size, device=eos_mask.device)
    eos_mask = eos_mask.clone()
    eos_mask[:, :beam_size] = ~((~cands_to_ignore) & (~eos_mask[:, :beam_size]))
    active_mask = torch.add(eos_mask.type_as(cand_offsets) * cand_size, cand_offsets)
    new_cands_to_ignore, active_hypos = torch.topk(active_mask, k=beam_size, dim=1, largest=False)
    new_ignore = new_cands_to_ignore.ge(cand_size)[:, :beam_size]
    active_bbsz_idx = torch.gather(cand_bbsz_idx, dim=1, index=active_hypos).view(-1)
    tokens[:, : step + 1] = torch.index_select(tokens[:, : step + 1], 0, active_bbsz_idx)
    tokens.view(bsz, beam_size, -1)[:, :, step + 1] = torch.gather(
        cand_indices, dim=1, index=active_hypos
    )
    if step > 0:
        scores[:, :step] = torch.index_select(scores[:, :step], 0, active_bbsz_idx)
    scores.view(bsz, beam_size, -1)[:, :, step] = torch.gather(
        cand_scores, dim=1, index=active_hypos
    )
    if attn is not None:
        attn[:, :, : step + 2] = torch.index_select(attn[:, :, : step + 2], 0, active_bbsz_idx)
    return active_bbsz_idx, active_hypos, new_ignore


def _op_takes(eos_mask, cand_scores, tokens, scores, attn) -> bool:
    if _ext._C is None or tokens.device.type != "cpu":
        return False
    if cand_scores.dtype != torch.float32 or scores.dtype != torch.float32:
        return False
    if attn is not None and (attn.dtype != torch.float32 or not attn.is_contiguous()):
        return False
    return tokens.is_contiguous() and scores.is_contiguous()


def select_active(eos_mask, cands_to_ignore, cand_bbsz_idx, cand_indices, cand_scores,
                  tokens, scores, attn: Optional[Tensor], step: int):  # fmt: skip
    """See the module docstring; the CPU op where it takes the inputs."""
    if not _op_takes(eos_mask, cand_scores, tokens, scores, attn):
        return select_active_torch(eos_mask, cands_to_ignore, cand_bbsz_idx, cand_indices,
                                   cand_scores, tokens, scores, attn, step)  # fmt: skip
    return torch.ops.seqfuse.select_active(
        eos_mask.contiguous(), cands_to_ignore.contiguous(), cand_bbsz_idx.contiguous(),
        cand_indices.contiguous(), cand_scores.contiguous(), tokens, scores, attn, step,
    )  # fmt: skip
