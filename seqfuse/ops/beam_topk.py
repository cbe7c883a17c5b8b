"""The fused beam-search step: normalise, edit, accumulate and take the top-k.

Contract (one call per decoding step, fairseq 0.12 ``SequenceGenerator`` order):

    lprobs = log_softmax(logits.float())        # skipped when is_logprobs
    lprobs[isnan(lprobs)] = -inf
    lprobs[:, pad] = -inf                       # pad == -1: no pad token to ban
    lprobs[:, unk] -= unk_penalty
    eos_mode == 2 (step >= max_len): every token but eos -> -inf
    eos_mode == 1 (step < min_len):  eos -> -inf
    lprobs[r, banned[r, j]] = -inf for banned[r, j] >= 0   (n-gram blocking, suppression)
    scores = lprobs.view(bsz, rows_per_sent, V) + cum_scores.view(bsz, rows_per_sent, 1)
    top-k over rows_per_sent * V per sentence

Args:
    logits: ``[bsz * rows_per_sent, V]`` fp32/fp16/bf16, the decoder's scores
        (already divided by the temperature, as stock does).
    cum_scores: ``[bsz * rows_per_sent]`` fp32 cumulative beam scores, or None
        (step 0: nothing is added).
    k: candidates per sentence, ``<= rows_per_sent * V``.
    banned: ``[bsz * rows_per_sent, nb]`` int64 token ids, ``-1`` for none.

Returns ``(scores [bsz, k] fp32, tokens [bsz, k] int64, beams [bsz, k] int64)``,
sorted by score, descending. The torch reference computes the full
``[rows, V]`` log-prob tensor (it *is* stock's computation); the C++ and CUDA
kernels never materialise it: a per-chunk maximum gives a provable lower bound
of the k-th score, only tokens above it are scored and sorted exactly.
Exact ties are ordered by lower flat index (``beam * V + token``) in the
kernels; ``torch.topk`` leaves their order unspecified.

``torch.ops.seqfuse.beam_topk_maxima(logits, group_max, cum_scores,
rows_per_sent, k, pad, unk, eos, unk_penalty, eos_mode, banned)`` (CPU,
float32 logits, ``is_logprobs`` False) is ``beam_topk`` given the logits'
group maxima (``[rows, ceil(V / 32)]``, ``linear_packed_maxima``'s: the
maximum of each 32 logits, NaN where one is NaN), from which it takes its
chunk maxima instead of a pass over the logits: the same results, bit for
bit. The maxima must be these logits' own (maxima above them raise when the
bound they give leaves fewer than k tokens; lower ones hide tokens). The
search lane of the fused decoder uses it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqfuse import _ext
from seqfuse.ops.dispatch import Backend, explain, ext_check, forced_backend, pick

EOS_ALLOW, EOS_FORBID, EOS_ONLY = 0, 1, 2


def apply_step_edits(
    lprobs: Tensor,
    pad: int,
    unk: int,
    eos: int,
    unk_penalty: float,
    eos_mode: int,
    banned: Tensor | None,
) -> Tensor:
    """fairseq's in-place edits of a ``[rows, V]`` log-prob tensor (stock order)."""
    lprobs.masked_fill_(lprobs != lprobs, -math.inf)
    if pad >= 0:
        lprobs[:, pad] = -math.inf
    lprobs[:, unk] -= unk_penalty
    if eos_mode == EOS_ONLY:
        lprobs[:, :eos] = -math.inf
        lprobs[:, eos + 1 :] = -math.inf
    elif eos_mode == EOS_FORBID:
        lprobs[:, eos] = -math.inf
    ban_tokens(lprobs, banned, pad)
    return lprobs


def ban_tokens(lprobs: Tensor, banned: Tensor | None, pad: int) -> Tensor:
    """``lprobs[r, banned[r, j]] = -inf`` for ``banned[r, j] >= 0``, in place,
    without a host read: ``-1`` entries hit ``pad``, which is ``-inf`` already
    (with no pad token, ``pad < 0``, they are masked out instead)."""
    if banned is not None and banned.numel() > 0:
        if pad >= 0:
            lprobs.scatter_(1, torch.where(banned >= 0, banned, pad), -math.inf)
        else:
            rows, cols = (banned >= 0).nonzero(as_tuple=True)
            lprobs[rows, banned[rows, cols]] = -math.inf
    return lprobs


def beam_topk_reference(
    logits: Tensor,
    cum_scores: Tensor | None,
    rows_per_sent: int,
    k: int,
    pad: int,
    unk: int,
    eos: int,
    unk_penalty: float = 0.0,
    eos_mode: int = EOS_ALLOW,
    banned: Tensor | None = None,
    is_logprobs: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    n, vocab = logits.shape
    bsz = n // rows_per_sent
    if is_logprobs:
        lprobs = logits.float().clone()
    else:
        lprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    apply_step_edits(lprobs, pad, unk, eos, unk_penalty, eos_mode, banned)
    lprobs = lprobs.view(bsz, rows_per_sent, vocab)
    if cum_scores is not None:
        lprobs = lprobs + cum_scores.view(bsz, rows_per_sent, 1).float()
    scores, flat = torch.topk(lprobs.view(bsz, -1), k)
    return scores, flat.fmod(vocab), torch.div(flat, vocab, rounding_mode="trunc")


def _check_args(logits: Tensor, cum_scores, rows_per_sent: int, k: int, banned) -> None:
    if logits.dim() != 2:
        raise ValueError(f"beam_topk: logits must be [rows, vocab], got {tuple(logits.shape)}")
    n, vocab = logits.shape
    if rows_per_sent < 1 or n % rows_per_sent != 0:
        raise ValueError(f"beam_topk: {n} rows is not a multiple of rows_per_sent={rows_per_sent}")
    if not 1 <= k <= rows_per_sent * vocab:
        raise ValueError(f"beam_topk: k={k} outside [1, {rows_per_sent * vocab}]")
    if cum_scores is not None and cum_scores.numel() != n:
        raise ValueError(f"beam_topk: cum_scores has {cum_scores.numel()} values for {n} rows")
    if banned is not None and (banned.dim() != 2 or banned.size(0) != n):
        raise ValueError(f"beam_topk: banned must be [{n}, nb], got {tuple(banned.shape)}")


def _ext_run(
    logits, cum_scores, rows_per_sent, k, pad, unk, eos, unk_penalty, eos_mode, banned, is_logprobs
):
    return torch.ops.seqfuse.beam_topk(
        logits.contiguous(),
        None if cum_scores is None else cum_scores.float().contiguous(),
        rows_per_sent,
        k,
        pad,
        unk,
        eos,
        float(unk_penalty),
        eos_mode,
        None if banned is None else banned.long().contiguous(),
        is_logprobs,
    )


def _dtype_check(check):
    def f(logits, *args):
        if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {logits.dtype} not supported"
        return check(logits)

    return f


BACKENDS = (
    Backend("cuda", _ext_run, _dtype_check(ext_check("cuda"))),
    Backend("cpu", _ext_run, _dtype_check(ext_check("cpu"))),
    Backend("reference", beam_topk_reference, lambda *a: None),
)


def beam_topk(
    logits: Tensor,
    cum_scores: Tensor | None,
    rows_per_sent: int,
    k: int,
    pad: int,
    unk: int,
    eos: int,
    unk_penalty: float = 0.0,
    eos_mode: int = EOS_ALLOW,
    banned: Tensor | None = None,
    is_logprobs: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """See the module docstring. Picks the CUDA, CPU or reference backend."""
    _check_args(logits, cum_scores, rows_per_sent, k, banned)
    backend = pick(BACKENDS, logits)
    return backend.run(
        logits,
        cum_scores,
        rows_per_sent,
        k,
        pad,
        unk,
        eos,
        unk_penalty,
        eos_mode,
        banned,
        is_logprobs,
    )


def cpu_kernel_for(logits: Tensor):
    """The CPU backend's run (``beam_topk``'s arguments, ``is_logprobs``
    positional) when ``beam_topk`` would take it for ``logits`` as they are (a
    contiguous float32 CPU tensor, the extension loaded, no other backend
    forced), else None. A search that builds valid arguments itself calls it
    every step without the per-call checks and backend choice (a few percent
    of a small batch's step)."""
    if (
        _ext._C is None
        or logits.dtype != torch.float32
        or logits.device.type != "cpu"
        or not logits.is_contiguous()
        or forced_backend() not in (None, "cpu")
    ):
        return None
    return _ext_run


def which_backend(logits: Tensor) -> str:
    """Which backend would run ``beam_topk`` on ``logits``, and why not the others."""
    return explain(BACKENDS, logits)
