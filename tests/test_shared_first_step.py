"""Beam search's first step on one decoder row per sentence (fused layers).

Every beam of a sentence starts from BOS, so stock decodes ``beam`` identical
rows at the first step and keeps the first row's candidates. seqfuse's fused
decoder computes each row on its own (the packed GEMM's rows do not depend on
the batch; attention, norms and activations are per row), so the generator
decodes one row per sentence there and the caches hand that row to every beam
at the first reorder. Searches with it on and off (SEQFUSE_SHARED_FIRST_STEP=0)
must agree bit for bit, and with stock fairseq within the parity tolerance.
"""

from __future__ import annotations

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator as StockGenerator
from generation_utils import (
    LAYER_VARIANTS,
    assert_bit_identical_hypos,
    compare_hypotheses,
    fused,
    generate,
    load_multi30k,
    packed_gemm_missing,
    random_sample,
    random_transformer,
)

from seqfuse.generation import SequenceGenerator
from seqfuse.generation import sequence_generator as sg
from seqfuse.layers import fused_step
from seqfuse.layers.kv_cache import CrossAttnCache, SelfAttnCache

pytestmark = pytest.mark.skipif(
    packed_gemm_missing(), reason="seqfuse._C or its packed GEMM kernel not available"
)


def shared_and_not(monkeypatch, fn):
    """(fn() decoding every row at the first step, fn() sharing it, shared steps)."""
    monkeypatch.setenv(sg.SHARED_FIRST_STEP_ENV, "0")
    before = sg.STATS["shared_first_steps"]
    every_row = fn()
    assert sg.STATS["shared_first_steps"] == before
    monkeypatch.delenv(sg.SHARED_FIRST_STEP_ENV)
    shared = fn()
    return every_row, shared, sg.STATS["shared_first_steps"] - before


@pytest.mark.parametrize("variant", list(LAYER_VARIANTS))
@pytest.mark.parametrize("one_call", [True, False])
def test_bit_identical_to_every_row(monkeypatch, variant, one_call):
    model, d = random_transformer(60, 7 + len(variant), perturb=True, **LAYER_VARIANTS[variant])
    fast = fused(model)
    if not one_call:
        monkeypatch.setenv(fused_step.FUSED_STEP_ENV, "0")
    sample = random_sample(d, bsz=6, seed=3)
    kw = dict(beam_size=4, max_len_b=20)
    every_row, shared, n = shared_and_not(monkeypatch, lambda: generate(fast, d, sample, **kw))
    assert n == 1
    assert_bit_identical_hypos(every_row, shared, variant)
    with torch.no_grad():
        stock = StockGenerator([model], d, **kw).generate([model], sample)
    compare_hypotheses(stock, shared, variant)


@pytest.mark.parametrize(
    "options",
    [
        dict(no_repeat_ngram_size=2),
        dict(min_len=0),  # sentences may end at the first step: the batch shrinks there
        dict(unk_penalty=-2.0, max_len_b=3),
        dict(max_len_a=0, max_len_b=1),  # the first step is also the last but one
    ],
    ids=["ngram", "min_len0", "unk_penalty", "short"],
)
def test_options_and_first_step_endings(monkeypatch, options):
    model, d = random_transformer(40, 11, layers=3, perturb=True)
    with torch.no_grad():  # make EOS likely from the start
        model.decoder.output_projection.weight[d.eos()].mul_(3.0)
    fast = fused(model)
    sample = random_sample(d, bsz=7, seed=5)
    kw = dict(beam_size=5, max_len_b=12)
    kw.update(options)
    every_row, shared, n = shared_and_not(monkeypatch, lambda: generate(fast, d, sample, **kw))
    assert n == 1
    assert_bit_identical_hypos(every_row, shared, str(options))
    with torch.no_grad():
        stock = StockGenerator([model], d, **kw).generate([model], sample)
    compare_hypotheses(stock, shared, str(options))
    if options.get("min_len") == 0:  # the case is exercised: some hypothesis ends at once
        assert any(len(h["tokens"]) == 1 for hs in stock for h in hs)


def test_not_taken_where_rows_may_differ(monkeypatch):
    """Beam 1, prefix tokens and a stock (unfused) model decode every row."""
    model, d = random_transformer(40, 2)
    sample = random_sample(d, bsz=3, seed=1)
    before = sg.STATS["shared_first_steps"]
    generate(fused(model), d, sample, beam_size=1, max_len_b=6)
    generate(model, d, sample, beam_size=3, max_len_b=6)
    gen = SequenceGenerator([fused(model)], d, beam_size=3, max_len_b=6)
    prefix = torch.full((3, 1), 5, dtype=torch.long)
    with torch.no_grad():
        gen.generate(gen.model.models, sample, prefix_tokens=prefix)
    assert sg.STATS["shared_first_steps"] == before


def test_caches_hand_the_row_to_every_beam():
    """A self-attention cache written for one row per source, then reordered
    with beam-space indices, reads as one written for all beams."""
    torch.manual_seed(0)
    beam, src, c = 3, 4, 8
    like = torch.zeros(1)
    kv0 = torch.randn(1, src, 2 * c)
    shared = SelfAttnCache(src * beam, 8, c, like, expand=beam)
    shared.append(kv0, None)
    full = SelfAttnCache(src * beam, 8, c, like)
    full.append(kv0.repeat_interleave(beam, dim=1), None)
    order = torch.tensor([0, 0, 0, 3, 3, 3, 9, 9, 9])  # sentence 2 finished at once
    shared.reorder(order)
    full.reorder(order)
    step = torch.randn(1, order.numel(), 2 * c)
    shared.append(step, None)
    full.append(step, None)
    ra, rb = shared.views()[2], full.views()[2]
    for a, b in zip(shared.views()[:2], full.views()[:2]):
        for r in range(order.numel()):  # logical row r, slot s: a[s, rows[r, s]]
            for s in range(2):
                assert torch.equal(a[s, ra[r, s]], b[s, rb[r, s]])
    cross = CrossAttnCache(torch.randn(5, src, 2 * c), None, 1, beam, later_q_per_kv=beam)
    cross.reorder(order)
    assert cross.q_per_kv == beam and cross.n == 3
    assert cross.views()[2].tolist() == [0, 1, 3]


def test_multi30k(monkeypatch):
    """The real model, beam 5, 24 test sentences: bit-identical with and
    without the shared first step; stock's tokens."""
    model, task = load_multi30k()
    fast = fused(model)
    ds = task.dataset("test")
    sample = ds.collater([ds[i] for i in range(24)])
    d = task.target_dictionary
    kw = dict(beam_size=5, max_len_b=200)
    every_row, shared, n = shared_and_not(monkeypatch, lambda: generate(fast, d, sample, **kw))
    assert n == 1
    assert_bit_identical_hypos(every_row, shared, "multi30k")
    with torch.no_grad():
        stock = StockGenerator([model], d, **kw).generate([model], sample)
    for hs, ho in zip(stock, shared):
        assert torch.equal(hs[0]["tokens"], ho[0]["tokens"])
