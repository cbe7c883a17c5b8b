"""seqfuse::select_active (the end of a beam-search step) against fairseq's
own operations (seqfuse.ops.search.select_active_torch), exactly: the op is
copies and integer compares only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from generation_utils import assert_bit_identical_hypos, random_sample, random_transformer

from seqfuse import _ext
from seqfuse.generation import SequenceGenerator
from seqfuse.generation import sequence_generator as sg
from seqfuse.layers.fairseq import optimize_fairseq_model
from seqfuse.ops import search

pytestmark = pytest.mark.skipif(_ext._C is None, reason="seqfuse._C not built")


def make_case(bsz, beam, step, src, seed, eos_rate):
    g = torch.Generator().manual_seed(seed)
    rows, c2 = bsz * beam, 2 * beam
    eos_mask = torch.rand(bsz, c2, generator=g) < eos_rate
    ignore = torch.rand(bsz, beam, generator=g) < 0.2
    cand_beams = torch.randint(0, beam, (bsz, c2), generator=g)
    cand_bbsz = cand_beams + (torch.arange(bsz) * beam).unsqueeze(1)
    cand_tokens = torch.randint(0, 1000, (bsz, c2), generator=g)
    cand_scores = torch.randn(bsz, c2, generator=g)
    tokens = torch.randint(0, 1000, (rows, step + 5), generator=g)
    scores = torch.randn(rows, step + 3, generator=g)
    attn = None if src == 0 else torch.rand(rows, src, step + 4, generator=g)
    return eos_mask, ignore, cand_bbsz, cand_tokens, cand_scores, tokens, scores, attn


@pytest.mark.parametrize("bsz,beam", [(1, 1), (1, 5), (3, 4), (17, 5), (80, 5)])
@pytest.mark.parametrize("step", [0, 1, 7, 40])
@pytest.mark.parametrize("src", [0, 6, 25])
@pytest.mark.parametrize("eos_rate", [0.0, 0.3, 0.9])
def test_op_equals_fairseq_ops(bsz, beam, step, src, eos_rate):
    """(400 rows, 25 source tokens, step 40: the history copies split over the
    threads, csrc/cpu/select_active_cpu.cc gather_rows.)"""
    case = make_case(bsz, beam, step, src, seed=bsz * 100 + beam * 10 + step, eos_rate=eos_rate)
    ref = copy.deepcopy(case)
    assert search._op_takes(case[0], case[4], case[5], case[6], case[7])
    masks = (case[0].clone(), case[1].clone())
    got = search.select_active(*case, step)
    want = search.select_active_torch(*ref, step)
    for a, b, name in zip(got, want, ("active_bbsz_idx", "active_hypos", "cands_to_ignore")):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for i, name in ((5, "tokens"), (6, "scores"), (7, "attn")):
        if case[i] is not None:
            assert torch.equal(case[i], ref[i]), name
    assert torch.equal(case[0], masks[0]) and torch.equal(case[1], masks[1])  # masks untouched
    assert torch.equal(ref[0], masks[0])


def test_bad_input_is_refused():
    case = list(make_case(2, 3, 2, 4, seed=0, eos_rate=0.3))
    case[2] = case[2] + 100  # a candidate row outside the batch
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.seqfuse.select_active(*case, 2)
    case = list(make_case(2, 3, 2, 4, seed=0, eos_rate=0.3))
    with pytest.raises(RuntimeError, match="step"):
        torch.ops.seqfuse.select_active(*case, 50)
    case[4] = case[4].double()
    assert not search._op_takes(case[0], case[4], case[5], case[6], case[7])


@pytest.mark.parametrize("fused", [False, True])
def test_whole_search_op_vs_torch(monkeypatch, fused):
    """Whole searches (finished hypotheses, shrinking batches, alignment) with
    the CPU ops (select_active, finished_candidates, finite_ties,
    finalize_hypos) and with the
    torch versions (the path of other devices): bit-identical."""
    model, d = random_transformer(50, 4, layers=2, perturb=True)
    if fused:
        assert optimize_fairseq_model(model)[0]
    sample = random_sample(d, bsz=9, seed=2)

    def run():
        gen = SequenceGenerator([model], d, beam_size=4, max_len_b=15, min_len=0)
        with torch.no_grad():
            return gen.generate([model], sample)

    calls = []
    op = search.select_active_torch

    def spy(*a):
        calls.append(1)
        return op(*a)

    def counted(name, fn):
        def f(*a):
            calls.append(name)
            return fn(*a)

        return f

    with_op = run()
    monkeypatch.setattr(search, "_op_takes", lambda *a: False)
    monkeypatch.setattr(search, "select_active_torch", spy)
    monkeypatch.setattr(
        sg, "finished_candidates", counted("finished", search.finished_candidates_torch)
    )
    monkeypatch.setattr(sg, "finite_ties", counted("ties", search.finite_ties_torch))
    monkeypatch.setattr(sg, "finalize_hypos", counted("finalize", search.finalize_hypos_torch))
    with_torch = run()
    assert {1, "finished", "ties", "finalize"} <= set(calls)
    assert_bit_identical_hypos(with_torch, with_op, f"fused={fused}")


@pytest.mark.parametrize("bsz,beam", [(1, 1), (1, 5), (3, 4), (17, 5)])
@pytest.mark.parametrize("eos_rate", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("strided", [False, True])
def test_finished_candidates_op_equals_fairseq_ops(bsz, beam, eos_rate, strided):
    """Which EOS candidates finish (eos mask, take, rank, rows), against
    fairseq's operations: -inf and NaN scores, ignored candidates, finished
    sentences and sentences close to full; candidates as the fused top-k
    leaves them (a column slice) or contiguous."""
    g = torch.Generator().manual_seed(bsz * 10 + beam + int(10 * eos_rate))
    c2, n_sent = 2 * beam, bsz + 3
    eos = 2
    wide = 2 * beam + 1 if strided else 2 * beam
    scores = torch.randn(bsz, wide, generator=g)
    scores[torch.rand(bsz, wide, generator=g) < 0.15] = -math.inf
    scores[torch.rand(bsz, wide, generator=g) < 0.05] = math.nan
    tokens = torch.randint(3, 50, (bsz, wide), generator=g)
    tokens[torch.rand(bsz, wide, generator=g) < eos_rate] = eos
    beams = torch.randint(0, beam, (bsz, wide), generator=g)
    ignore = torch.rand(bsz, beam, generator=g) < 0.2
    done = torch.rand(bsz, generator=g) < 0.2
    n_fin = torch.randint(0, beam + 1, (n_sent,), generator=g)
    sent_ids = torch.randperm(n_sent, generator=g)[:bsz].contiguous()
    args = (scores[:, :c2], tokens[:, :c2], beams[:, :c2], ignore, done, n_fin, sent_ids)
    assert args[0].is_contiguous() != strided or bsz == 1
    got = torch.ops.seqfuse.finished_candidates(*args, eos)
    want = search.finished_candidates_torch(*(a.clone() for a in args), eos)
    names = ("cand_bbsz_idx", "eos_mask", "take", "rank", "sent_n_fin")
    for a, b, name in zip(got, want, names):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got[5] == bool(want[5])
    assert torch.equal(search.finished_candidates(*args, eos)[2], want[2])


def test_finished_candidates_refuses_a_sentence_outside_the_buffers():
    args = [torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long)]
    args += [torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 2, dtype=torch.bool)]
    args += [torch.zeros(2, dtype=torch.bool), torch.zeros(3, dtype=torch.long)]
    args += [torch.tensor([0, 3])]  # sentence 3 of 3
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.seqfuse.finished_candidates(*args, 2)


@pytest.mark.parametrize("strided", [False, True])
def test_finite_ties_op_equals_torch(strided):
    """Rows with two equal finite neighbours (exact ties among the fused
    top-k's candidates), against the torch version: -inf pairs and NaN are
    no tie."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(40, 12, generator=g).sort(dim=1, descending=True).values
    scores[3, 4] = scores[3, 5]  # a tie
    scores[7, 9:] = -math.inf  # -inf pairs: none
    scores[9, 2] = scores[9, 3] = math.nan  # NaN pairs: none
    scores[11, 0] = scores[11, 1] = math.inf  # +inf pairs: none either
    scores[13, 10] = scores[13, 11]  # at the end
    x = scores[:, :11] if strided else scores
    got, any_tie = torch.ops.seqfuse.finite_ties(x)
    want, want_any = search.finite_ties_torch(x)
    assert torch.equal(got, want) and any_tie == bool(want_any)
    assert bool(got[3]) and not bool(got[7]) and not bool(got[9]) and not bool(got[11])
    assert bool(got[13]) != strided
    none, any_none = torch.ops.seqfuse.finite_ties(x[[0, 1, 2, 7, 9]])
    assert not any_none and not bool(none.any())


def _finalize_case(bsz, beam, step, with_attn, seed):
    g = torch.Generator().manual_seed(seed)
    rows, c2, n_sent, src, cols = bsz * beam, 2 * beam + 1, bsz + 2, 7, step + 3
    take = torch.rand(bsz, beam, generator=g) < 0.5
    rank = torch.zeros(bsz, beam, dtype=torch.long)
    for s in range(bsz):  # distinct slots for the taken ones, in candidate order
        rank[s] = torch.randint(0, 2, (1,), generator=g) + take[s].long().cumsum(0) - 1
    take &= rank < beam
    cand_bbsz = torch.randint(0, rows, (bsz, c2), generator=g)
    cand_scores = -torch.rand(bsz, c2, generator=g) * 20
    cand_scores[0, 0] = -math.inf
    tokens = torch.randint(4, 90, (rows, step + 4), generator=g)
    scores = (-torch.rand(rows, step + 2, generator=g) * 3).cumsum(1)
    attn = torch.rand(rows, src, step + 3, generator=g) if with_attn else None
    src_lengths = torch.randint(0, step + 3, (bsz,), generator=g)
    sent_ids = torch.randperm(n_sent, generator=g)[:bsz].contiguous()
    fin = (
        torch.full((n_sent, beam + 1, step + 2), 1, dtype=torch.long),
        torch.zeros(n_sent, beam + 1, dtype=torch.long),
        torch.zeros(n_sent, beam + 1),
        torch.zeros(n_sent, beam + 1, step + 2),
        torch.zeros(n_sent, beam + 1, src, cols) if with_attn else None,
    )
    return (take, rank, cand_bbsz[:, :c2 - 1], cand_scores[:, :c2 - 1], tokens, scores, attn,
            src_lengths, sent_ids), fin  # fmt: skip


@pytest.mark.parametrize("bsz,beam", [(1, 1), (2, 5), (9, 4)])
@pytest.mark.parametrize("step", [0, 1, 6])
@pytest.mark.parametrize("with_attn", [False, True])
@pytest.mark.parametrize(
    "lenpen,match_src", [(None, False), (1.0, False), (0.6, True), (5.0, False)]
)
def test_finalize_op_equals_fairseq_ops(bsz, beam, step, with_attn, lenpen, match_src):
    """The finished hypotheses' tokens (with EOS), positional scores (the
    differences of the cumulative ones), normalised scores, lengths and
    attention, against the torch version of fairseq's finalize: every bit of
    the slots written (slot k, the torch version's sink, aside)."""
    args, fin = _finalize_case(bsz, beam, step, with_attn, seed=bsz * 100 + beam * 10 + step)
    divisor = None if lenpen is None else (step + 1) ** lenpen
    ours = tuple(None if t is None else t.clone() for t in fin)
    search.finalize_hypos_torch(step, *args, *fin, 2, divisor, match_src)
    torch.ops.seqfuse.finalize_hypos(*args, *ours, step, 2, divisor, match_src)
    for want, got, name in zip(fin, ours, ("tokens", "len", "score", "pos", "attn")):
        if want is None:
            continue
        assert torch.equal(got[:, :beam], want[:, :beam]), name
    if bsz > 1:
        assert bool(args[0].any())  # the case writes something


def test_finalize_op_refuses_a_slot_outside_the_buffers():
    args, fin = _finalize_case(2, 3, 2, False, seed=1)
    take, rank = args[0].clone(), args[1].clone()
    take[1, 0], rank[1, 0] = True, 4  # slots 0..3 only
    with pytest.raises(RuntimeError, match="outside the buffers"):
        torch.ops.seqfuse.finalize_hypos(take, rank, *args[2:], *fin, 2, 2, None, False)


def test_finalize_op_and_table_gather_refuse_bad_buffers():
    """Mismatched buffers are refused with a clear error, nothing written:
    attention without its buffer, a table gathered onto itself, lists of
    different lengths."""
    args, fin = _finalize_case(2, 3, 2, True, seed=3)
    before = fin[0].clone()
    with pytest.raises(RuntimeError, match="attn and fin_attn come together"):
        torch.ops.seqfuse.finalize_hypos(*args, *fin[:4], None, 2, 2, None, False)
    assert torch.equal(fin[0], before)
    t = torch.arange(12).view(4, 3)
    with pytest.raises(RuntimeError, match="distinct"):
        torch.ops.seqfuse.gather_table_rows([t], [t], 4, torch.tensor([1, 0]))
    with pytest.raises(RuntimeError, match="1 sources, 2 destinations"):
        torch.ops.seqfuse.gather_table_rows([t], [t.clone(), t.clone()], 4, torch.tensor([0]))
    out = torch.zeros_like(t)
    torch.ops.seqfuse.gather_table_rows([t], [out], 4, torch.tensor([3, 3, 0]))
    assert torch.equal(out[:3], t[[3, 3, 0]])
