"""A batch searched as sub-batches at once, one thread each
(seqfuse.generation.SequenceGenerator._search_in_parts).

Where the generator splits, every sentence's search runs on kernels that
compute each row independently of the batch, so the split search must equal
the whole-batch search bit for bit (torch.equal on every hypothesis tensor);
where a sentence's result could depend on the rest of its batch (sampling, a
length limit taken from the batch, the stock layers' GEMM), it must not split.
Both are checked against the same generator with SEQFUSE_SPLIT_BATCH=0, and
once more against stock fairseq's generator.
"""

from __future__ import annotations

import threading

import pytest
import torch
from fairseq import search
from fairseq.sequence_generator import SequenceGenerator as StockGenerator
from generation_utils import (
    assert_bit_identical_hypos,
    compare_hypotheses,
    fused,
    generate,
    load_multi30k,
    packed_gemm_missing,
    random_sample,
    random_transformer,
)

from seqfuse.generation import sequence_generator as sg

pytestmark = pytest.mark.skipif(
    packed_gemm_missing(), reason="seqfuse._C or its packed GEMM kernel not available"
)


@pytest.fixture
def threads(monkeypatch):
    """Split over `n` threads whatever the machine has."""

    def use(n: int) -> None:
        monkeypatch.setattr(sg, "_split_threads", lambda: n)

    return use


def split_and_whole(monkeypatch, fn):
    """(fn() split, fn() as one batch, parts the split run used)."""
    monkeypatch.delenv(sg.SPLIT_BATCH_ENV, raising=False)
    before = sg.SPLIT_STATS["parts"]
    split = fn()
    parts = sg.SPLIT_STATS["parts"] - before
    monkeypatch.setenv(sg.SPLIT_BATCH_ENV, "0")
    whole = fn()
    monkeypatch.delenv(sg.SPLIT_BATCH_ENV)
    return split, whole, parts


@pytest.mark.parametrize("n_threads", [2, 3])
@pytest.mark.parametrize("beam", [1, 4])
def test_split_search_bit_identical_to_whole_batch(monkeypatch, threads, n_threads, beam):
    """Uneven parts (13 sentences over 2 and 3 threads), beam 1 and 4, a
    length penalty and a repeat n-gram ban: the same hypotheses bit for bit,
    in batch order; and the same as stock's generator within tolerance."""
    threads(n_threads)
    model, d = random_transformer(60, 21, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=13, seed=21, max_len=14)
    kw = dict(beam_size=beam, max_len_b=20, len_penalty=1.3, no_repeat_ngram_size=3)
    split, whole, parts = split_and_whole(monkeypatch, lambda: generate(fast, d, sample, **kw))
    assert parts == n_threads
    assert_bit_identical_hypos(split, whole, f"{n_threads} parts")
    with torch.no_grad():
        stock = StockGenerator([model], d, **kw).generate([model], sample)
    compare_hypotheses(stock, split, "split vs stock")


def test_split_multi30k_bit_identical_with_prefix(monkeypatch, threads):
    """The real model, beam 5, 24 test sentences over 2 threads, with and
    without forced prefix tokens (split with their sentences)."""
    threads(2)
    model, task = load_multi30k()
    fast = fused(model)
    ds = task.dataset("test")
    sample = ds.collater([ds[i] for i in range(40, 64)])
    d = task.target_dictionary
    for prefix in (0, 2):
        kw = dict(beam_size=5, max_len_b=200)
        gen = sg.SequenceGenerator([fast], d, **kw)
        pre = sample["target"][:, :prefix] if prefix else None

        def run(gen=gen, pre=pre):
            with torch.no_grad():
                return gen.generate([fast], sample, prefix_tokens=pre)

        split, whole, parts = split_and_whole(monkeypatch, run)
        assert parts == 2
        assert_bit_identical_hypos(split, whole, f"multi30k, prefix {prefix}")


def test_no_split_where_a_sentence_depends_on_its_batch(monkeypatch, threads):
    """Sampling, --match-source-len (the batch's longest source), the stock
    layers, one thread, or too few sentences: one search over the batch."""
    threads(2)
    model, d = random_transformer(60, 22, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=12, seed=22)

    def parts_of(m, **kw):
        gen = sg.SequenceGenerator([m], d, **kw)
        before = sg.SPLIT_STATS["parts"]
        torch.manual_seed(0)
        gen.generate([m], sample)
        return sg.SPLIT_STATS["parts"] - before

    assert parts_of(fast, beam_size=3) == 2  # the control: this one splits
    sampling = search.Sampling(d, sampling_topk=5)
    assert parts_of(fast, beam_size=3, search_strategy=sampling) == 0
    assert parts_of(fast, beam_size=3, match_source_len=True) == 0
    assert parts_of(model, beam_size=3) == 0  # stock layers: batch-dependent GEMM
    threads(1)
    assert parts_of(fast, beam_size=3) == 0
    threads(8)  # 12 sentences: 3 parts of 4, not 8
    assert parts_of(fast, beam_size=3) == 3
    monkeypatch.setenv(sg.SPLIT_BATCH_ENV, "0")
    assert parts_of(fast, beam_size=3) == 0


def test_split_keeps_the_callers_threads_and_raises_its_errors(monkeypatch, threads):
    """The parts' threads run single-threaded ops without changing the
    caller's thread count; an error inside a part reaches the caller."""
    threads(2)
    model, d = random_transformer(60, 23, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=10, seed=23)
    seen = []
    real = sg.SequenceGenerator._search

    def spy(self, *a, **kw):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(self, *a, **kw)

    monkeypatch.setattr(sg.SequenceGenerator, "_search", spy)
    before = torch.get_num_threads()
    generate(fast, d, sample, beam_size=2)
    assert torch.get_num_threads() == before
    assert sorted(seen) == [("seqfuse-search-0", 1), ("seqfuse-search-1", 1)]
    with pytest.raises(sg.LengthLimitsError, match="min_len"):
        generate(fast, d, sample, beam_size=2, min_len=50, max_len_b=10)
