"""The end of a beam-search step: the EOS candidates that become finished
hypotheses (:func:`finished_candidates`), then the candidates that continue
and the histories gathered for them (:func:`select_active`), as fairseq's
SequenceGenerator does after finalize.

select_active's contract, per sentence ``s`` (``2k`` candidates, ``k`` beams)::

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
the masks are left as they were. The CPU op (seqfuse._C ``select_active``)
does it in one call with copies and integer compares only, so it equals the
torch version (:func:`select_active_torch`, also the path for other devices
and layouts) exactly. The CPU ops read the candidate tensors with a row
stride: the fused top-k's column slices go in without a copy.
"""

from __future__ import annotations

import math
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


def _rows_contiguous(t: Tensor) -> bool:
    """A 2-D tensor whose rows are contiguous (a column slice of one is):
    the CPU ops read candidates with a row stride."""
    return t.dim() == 2 and (t.stride(1) == 1 or t.size(1) <= 1) and t.stride(0) >= t.size(1)


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
    if not _rows_contiguous(cand_indices):
        cand_indices = cand_indices.contiguous()
    if not _rows_contiguous(cand_scores):
        cand_scores = cand_scores.contiguous()
    return torch.ops.seqfuse.select_active(
        eos_mask.contiguous(), cands_to_ignore.contiguous(), cand_bbsz_idx.contiguous(),
        cand_indices, cand_scores, tokens, scores, attn, step,
    )  # fmt: skip


def finished_candidates_torch(cand_scores, cand_indices, cand_beams, cands_to_ignore, done, n_fin,
                              sent_ids, eos: int):  # fmt: skip
    """Which EOS candidates finish this step (the torch reference). With
    ``bsz`` sentences, ``2k`` candidates and ``k`` beams, returns
    ``(cand_bbsz_idx [bsz, 2k], eos_mask [bsz, 2k], take [bsz, k],
    rank [bsz, k], sent_n_fin [bsz], any take)``: the candidates' rows, the
    EOS candidates that are not -inf (nor ignored among the first ``k``), the
    ones taken (in unfinished sentences, while the sentence has room) and the
    slot each would take among its sentence's ``n_fin`` finished ones. "any
    take" is a bool tensor here (no host read), a bool from the CPU op."""
    bsz, beam_size = cands_to_ignore.shape
    offsets = (torch.arange(bsz, device=cand_beams.device) * beam_size).unsqueeze(1)
    cand_bbsz_idx = cand_beams.add(offsets)
    eos_mask = cand_indices.eq(eos) & cand_scores.ne(-math.inf)
    eos_mask[:, :beam_size][cands_to_ignore] = False
    take = eos_mask[:, :beam_size] & ~done.unsqueeze(1)
    sent_n_fin = n_fin[sent_ids]
    rank = sent_n_fin.unsqueeze(1) + take.long().cumsum(1) - 1
    take &= rank < beam_size
    return cand_bbsz_idx, eos_mask, take, rank, sent_n_fin, take.any()


def finished_candidates(cand_scores, cand_indices, cand_beams, cands_to_ignore, done, n_fin,
                        sent_ids, eos: int):  # fmt: skip
    """See :func:`finished_candidates_torch`; one CPU op call where it takes
    the inputs (the same results exactly: integer compares and counts)."""
    args = (cand_scores, cand_indices, cand_beams, cands_to_ignore, done, n_fin, sent_ids)
    if (
        _ext._C is None
        or cand_scores.device.type != "cpu"
        or cand_scores.dtype != torch.float32
        or not all(_rows_contiguous(t) for t in args[:3])
        or not all(t.is_contiguous() for t in args[3:])
    ):
        return finished_candidates_torch(*args, eos)
    return torch.ops.seqfuse.finished_candidates(*args, eos)


def finite_ties_torch(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, any)``: the rows of ``scores [bsz, c]`` where two neighbouring
    entries are equal and finite, and whether there is one (a tensor)."""
    eq = (scores[:, 1:] == scores[:, :-1]) & torch.isfinite(scores[:, 1:])
    rows = eq.any(dim=1)
    return rows, rows.any()


def finite_ties(scores: Tensor):
    """See :func:`finite_ties_torch`; one CPU op call (``any`` a bool) where it
    takes the input."""
    if (
        _ext._C is None
        or scores.device.type != "cpu"
        or scores.dtype != torch.float32
        or not _rows_contiguous(scores)
    ):
        return finite_ties_torch(scores)
    return torch.ops.seqfuse.finite_ties(scores)


def finalize_hypos_torch(step, take, rank, cand_bbsz_idx, cand_scores, tokens, scores, attn,
                         src_lengths, sent_ids, fin_tokens, fin_len, fin_score, fin_pos, fin_attn,
                         eos: int, divisor: Optional[float], match_source_len: bool):  # fmt: skip
    """Write the EOS hypotheses selected by ``take`` ([bsz, k]) into the
    per-sentence buffers at ``rank``, as fairseq's finalize_hypos builds them
    (the torch version; slot ``k`` of the buffers takes the writes not taken).
    ``divisor``: the length penalty's ``(step + 1) ** lenpen`` when scores are
    normalised, else None."""
    beam_size = take.size(1)
    rows = cand_bbsz_idx[:, :beam_size].reshape(-1)
    eos_scores = cand_scores[:, :beam_size].reshape(-1)
    slot = torch.where(take, rank, torch.full_like(rank, beam_size)).view(-1)
    sid = sent_ids.repeat_interleave(beam_size)

    toks = tokens.index_select(0, rows)[:, 1 : step + 2]
    toks[:, step] = eos
    pos = scores.index_select(0, rows)[:, : step + 1]
    pos[:, step] = eos_scores
    pos[:, 1:] = pos[:, 1:] - pos[:, :-1]
    if divisor is not None:
        eos_scores = eos_scores / divisor
    if match_source_len:
        src = src_lengths.repeat_interleave(beam_size)
        eos_scores = torch.where(step > src, torch.tensor(-math.inf), eos_scores)
    fin_tokens[sid, slot, : step + 1] = toks
    fin_pos[sid, slot, : step + 1] = pos
    fin_score[sid, slot] = eos_scores
    fin_len[sid, slot] = step + 1
    if fin_attn is not None:
        fin_attn[sid, slot, :, : step + 1] = attn.index_select(0, rows)[:, :, 1 : step + 2]


def finalize_hypos(step, take, rank, cand_bbsz_idx, cand_scores, tokens, scores, attn,
                   src_lengths, sent_ids, fin_tokens, fin_len, fin_score, fin_pos, fin_attn,
                   eos: int, divisor: Optional[float], match_source_len: bool):  # fmt: skip
    """See :func:`finalize_hypos_torch`; one CPU op call where it takes the
    inputs (copies, one subtraction per position and the one division: the
    same bits). The op writes only the taken hypotheses (not slot ``k``)."""
    if (
        _ext._C is None
        or tokens.device.type != "cpu"
        or cand_scores.dtype != torch.float32
        or scores.dtype != torch.float32
        or not (tokens.is_contiguous() and scores.is_contiguous())
        or not (_rows_contiguous(cand_bbsz_idx) and _rows_contiguous(cand_scores))
        or not (take.is_contiguous() and rank.is_contiguous())
        or not (src_lengths.is_contiguous() and sent_ids.is_contiguous())
        or (attn is not None and not attn.is_contiguous())
        or src_lengths.dtype != torch.long
    ):
        return finalize_hypos_torch(step, take, rank, cand_bbsz_idx, cand_scores, tokens, scores,
                                    attn, src_lengths, sent_ids, fin_tokens, fin_len, fin_score,
                                    fin_pos, fin_attn, eos, divisor, match_source_len)  # fmt: skip
    torch.ops.seqfuse.finalize_hypos(
        take, rank, cand_bbsz_idx, cand_scores, tokens, scores, attn, src_lengths, sent_ids,
        fin_tokens, fin_len, fin_score, fin_pos, fin_attn, step, eos, divisor, match_source_len,
    )  # fmt: skip
