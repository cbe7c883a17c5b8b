"""seqfuse.generation.SequenceGenerator vs fairseq's stock SequenceGenerator.

Every test runs stock fairseq and seqfuse on the same model and batch, in the
same test, and compares the hypothesis dicts (tokens equal; score,
positional_scores and attention within the fp32 tolerance).
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
from fairseq import search
from fairseq.sequence_generator import SequenceGenerator as StockGenerator
from generation_utils import (
    REPO,
    SCORE_ATOL,
    SCORE_RTOL,
    ToyDecoder,
    ToyEncoder,
    ToyModel,
    compare_hypotheses,
    fused,
    load_multi30k,
    make_dictionary,
    packed_gemm_missing,
    random_sample,
    random_transformer,
    run_both,
)
from torch import Tensor

from seqfuse.generation import SequenceGenerator
from seqfuse.generation.sequence_generator import _descending_order, ngram_banned_tokens


# --------------------------------------------------------------------------- toy
def toy_model(vocab=12, steps=6, n_sent=4, seed=0, prefix_shift=0.0, out_len=lambda n: n):
    g = torch.Generator().manual_seed(seed)
    d = make_dictionary(vocab - 4)
    table = torch.rand(n_sent, steps, len(d), generator=g) ** 3
    table[:, :, d.pad()] = 0
    table[:, 2:, d.eos()] *= 8  # make EOS likely after a few steps
    table = table / table.sum(-1, keepdim=True)
    model = ToyModel(ToyEncoder(d, out_len), ToyDecoder(d, table, prefix_shift))
    return model.eval(), d


TOY_CONFIGS = {
    "default": {},
    "no_normalize": {"normalize_scores": False},
    "lenpen_0.6": {"len_penalty": 0.6},
    "lenpen_5": {"len_penalty": 5.0},
    "max_len_b_3": {"max_len_b": 3},
    "max_len_a": {"max_len_a": 0.5, "max_len_b": 2},
    "min_len_4": {"min_len": 4},
    "unk_penalty": {"unk_penalty": 2.0},
    "unk_bonus": {"unk_penalty": -3.0},
    "temperature": {"temperature": 0.7},
    "match_source_len": {"match_source_len": True},
    "max_len": {"max_len": 4},
}


@pytest.mark.parametrize("config", sorted(TOY_CONFIGS))
@pytest.mark.parametrize("beam", [1, 2, 4])
@pytest.mark.parametrize("prefix_shift", [0.0, 0.7])
def test_toy_decoder_options(config, beam, prefix_shift):
    model, d = toy_model(prefix_shift=prefix_shift)
    sample = random_sample(d, bsz=5, seed=beam, min_len=3, max_len=8)
    kwargs = dict(TOY_CONFIGS[config], beam_size=beam)
    stock, ours = run_both([model], d, sample, kwargs)
    compare_hypotheses(stock, ours, f"{config} beam={beam}")


@pytest.mark.parametrize("out_len", [lambda n: 1, lambda n: n + 3, lambda n: 2 * n])
def test_encoder_output_length_differs(out_len):
    model, d = toy_model(out_len=out_len, prefix_shift=0.3)
    sample = random_sample(d, bsz=4, seed=3)
    stock, ours = run_both([model], d, sample, {"beam_size": 3})
    compare_hypotheses(stock, ours, "encoder length")


def test_extra_net_input_keys_reach_the_encoder():
    model, d = toy_model(prefix_shift=0.3)
    sample = random_sample(d, bsz=3, seed=1)
    sample["net_input"]["extra_feature"] = torch.ones(3)
    stock, ours = run_both([model], d, sample, {"beam_size": 2})
    compare_hypotheses(stock, ours, "extra net_input")


def test_vocab_smaller_than_candidates():
    # 2 * beam > number of usable tokens: -inf candidates must be handled as stock does.
    model, d = toy_model(vocab=6, prefix_shift=0.5)
    sample = random_sample(d, bsz=3, seed=2)
    stock, ours = run_both([model], d, sample, {"beam_size": 4, "max_len_b": 4})
    compare_hypotheses(stock, ours, "tiny vocab")


# ------------------------------------------------------------ random transformers
@pytest.mark.parametrize("seed", range(6))
def test_random_transformer_many_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    vocab = [20, 57, 300, 1000][seed % 4]
    model, d = random_transformer(vocab=vocab, seed=seed, sharp=[1.0, 4.0, 8.0][seed % 3])
    for beam in (1, 2, 5, 16):
        bsz = int(torch.randint(1, 9, (1,), generator=g))
        sample = random_sample(d, bsz=bsz, seed=seed * 31 + beam)
        stock, ours = run_both([model], d, sample, {"beam_size": beam, "max_len_b": 12})
        compare_hypotheses(stock, ours, f"seed={seed} vocab={vocab} beam={beam} bsz={bsz}")


@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_no_repeat_ngram(ngram):
    model, d = random_transformer(vocab=40, seed=7, sharp=2.0)
    sample = random_sample(d, bsz=4, seed=5)
    kwargs = {"beam_size": 4, "no_repeat_ngram_size": ngram, "max_len_b": 15}
    stock, ours = run_both([model], d, sample, kwargs)
    compare_hypotheses(stock, ours, f"ngram={ngram}")


def test_ngram_banned_tokens_matches_stock_blocker():
    from fairseq.ngram_repeat_block import NGramRepeatBlock

    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 4):
        blocker = NGramRepeatBlock(n, use_extension=False)
        for step in range(0, 9):
            tokens = torch.randint(4, 8, (6, 12), generator=g)
            tokens[:, step + 1 :] = 1
            tokens[:, 0] = 2
            lprobs = torch.zeros(6, 10)
            expected = blocker(tokens, lprobs.clone(), 2, 3, step)
            got = lprobs.clone()
            banned = ngram_banned_tokens(tokens, step, n)
            if banned is not None:
                rows, cols = (banned >= 0).nonzero(as_tuple=True)
                got[rows, banned[rows, cols]] = float("-inf")
            assert torch.equal(expected, got), f"n={n} step={step}"


@pytest.mark.parametrize("seed", range(6))
def test_hypothesis_order_is_stocks_sort(seed):
    """The finished hypotheses' order (stock: torch.sort of their scores,
    descending): the same for distinct scores, exact ties, -inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    pool = [-0.5, -1.25, float("-inf"), float("nan"), -3.0, 0.0]
    cases = [[], [-1.0]]
    for n in range(2, 12):
        cases.append(torch.randn(n, generator=g).tolist())  # distinct
        picks = torch.randint(0, len(pool), (n,), generator=g).tolist()
        cases.append([pool[i] for i in picks])  # ties, -inf, NaN
        cases.append((torch.randint(-3, 1, (n,), generator=g) / 4).tolist())  # finite ties
    for values in cases:
        values = torch.tensor(values, dtype=torch.float32).tolist()  # as the search holds them
        _, want = torch.sort(torch.tensor(values), descending=True)
        assert _descending_order(values) == want.tolist(), values


def test_prefix_tokens():
    model, d = random_transformer(vocab=50, seed=3)
    sample = random_sample(d, bsz=4, seed=9)
    prefix = torch.randint(d.nspecial, len(d), (4, 2))
    stock, ours = run_both([model], d, sample, {"beam_size": 3}, prefix_tokens=prefix)
    compare_hypotheses(stock, ours, "prefix")


def test_tokens_to_suppress():
    model, d = random_transformer(vocab=30, seed=4, sharp=3.0)
    sample = random_sample(d, bsz=3, seed=2)
    kwargs = {"beam_size": 4, "tokens_to_suppress": ("w3", "w5", "w6")}
    stock, ours = run_both([model], d, sample, kwargs)
    compare_hypotheses(stock, ours, "suppress")


def test_ensemble_of_two_models():
    m1, d = random_transformer(vocab=60, seed=1)
    m2, _ = random_transformer(vocab=60, seed=2)
    sample = random_sample(d, bsz=3, seed=4)
    stock, ours = run_both([m1, m2], d, sample, {"beam_size": 3})
    compare_hypotheses(stock, ours, "ensemble")


def test_lm_fusion():
    model, d = random_transformer(vocab=60, seed=5)
    lm, _ = random_transformer(vocab=60, seed=6)

    class DecoderOnlyLM(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens):
            enc = self.m.encoder(tokens[:, :1], torch.ones(tokens.size(0), dtype=torch.long))
            return self.m.decoder(tokens, encoder_out=enc)

        def get_normalized_probs(self, out, log_probs, sample=None):
            return self.m.get_normalized_probs(out, log_probs, sample)

    sample = random_sample(d, bsz=3, seed=8)
    kwargs = {"beam_size": 3, "lm_model": DecoderOnlyLM(lm), "lm_weight": 0.3, "max_len_b": 12}
    stock, ours = run_both([model], d, sample, kwargs)
    compare_hypotheses(stock, ours, "lm fusion")


# ------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "topk,topp,temperature", [(-1, -1.0, 1.0), (5, -1.0, 1.0), (-1, 0.6, 1.0), (10, -1.0, 0.5)]
)
def test_sampling_draws_what_stock_draws(topk, topp, temperature):
    model, d = random_transformer(vocab=80, seed=11, sharp=1.5)
    sample = random_sample(d, bsz=4, seed=12)
    strategy = search.Sampling(d, sampling_topk=topk, sampling_topp=topp)
    kwargs = {
        "beam_size": 3,
        "search_strategy": strategy,
        "temperature": temperature,
        "max_len_b": 15,
    }
    stock, ours = run_both([model], d, sample, kwargs)
    compare_hypotheses(stock, ours, "sampling")


def test_sampling_filtered_distribution_and_statistics():
    """Top-k/top-p sampling only ever draws from the filtered support, with
    frequencies matching the filtered distribution."""
    model, d = random_transformer(vocab=40, seed=13, sharp=1.0)
    sample = random_sample(d, bsz=1, seed=14)
    src = sample["net_input"]
    with torch.no_grad():
        enc = model.encoder(src["src_tokens"], src["src_lengths"])
        prev = torch.full((1, 1), d.eos())
        lprobs = model.get_normalized_probs(model.decoder(prev, encoder_out=enc), True)[0, -1]
    lprobs[d.pad()] = float("-inf")
    lprobs[d.eos()] = float("-inf")  # step 0 < min_len: stock forbids EOS
    topk = 6
    allowed = set(lprobs.topk(topk).indices.tolist())
    probs = lprobs.topk(topk).values.exp()
    probs = probs / probs.sum()
    expected = dict(zip(lprobs.topk(topk).indices.tolist(), probs.tolist()))
    counts: dict[int, int] = {}
    n = 0
    torch.manual_seed(0)
    gen = SequenceGenerator(
        [model], d, beam_size=8, max_len_b=1, search_strategy=search.Sampling(d, topk)
    )
    for _ in range(40):
        for hypo in gen.generate([model], sample)[0]:
            t = int(hypo["tokens"][0])
            assert t in allowed
            counts[t] = counts.get(t, 0) + 1
            n += 1
    # Pearson chi-square against the filtered distribution, 5 d.o.f.: p > 0.001.
    chi2 = sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in expected.items())
    assert chi2 < 20.5, (chi2, counts, expected)


# ----------------------------------------------------------------- fallbacks
class _OwnBeamSearch(search.BeamSearch):
    """A search strategy seqfuse does not know: its step may do anything."""


def test_fallback_warns_once_and_matches_stock(caplog, monkeypatch):
    from seqfuse.generation import sequence_generator as sg

    monkeypatch.setattr(sg, "_warned", set())
    model, d = random_transformer(vocab=40, seed=2)
    sample = random_sample(d, bsz=2, seed=3)
    strategy = _OwnBeamSearch(d)
    kwargs = {"beam_size": 4, "search_strategy": strategy}
    with caplog.at_level(logging.WARNING, logger="seqfuse.generation"):
        stock, ours = run_both([model], d, sample, kwargs)
        SequenceGenerator([model], d, **kwargs).generate([model], sample)
    compare_hypotheses(stock, ours, "a strategy of the user's")
    lines = [r.getMessage() for r in caplog.records if "_OwnBeamSearch" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "not supported" in lines[0]


def _stock_step_strategy(name, d):
    if name == "match_source_len":  # what --match-source-len builds
        strategy = search.LengthConstrainedBeamSearch(d, 1, 0, 1, 0)
        return {"search_strategy": strategy, "match_source_len": True}
    if name == "diverse beam":  # --diverse-beam-groups 2
        return {"search_strategy": search.DiverseBeamSearch(d, 2, 0.5)}
    if name == "prefix_allowed_tokens_fn":  # no token w0; odd sentences: no w1 after a w2

        def allowed(batch_id: int, sent: Tensor) -> list[int]:
            last = int(sent[-1])
            banned = {d.index("w0")} | (
                {d.index("w1")} if batch_id % 2 and last == d.index("w2") else set()
            )
            return [t for t in range(len(d)) if t not in banned]

        strategy = search.PrefixConstrainedBeamSearch(d, allowed)
        return {"search_strategy": strategy}
    return {"search_strategy": search.DiverseSiblingsSearch(d, 0.5)}  # --diversity-rate


@pytest.mark.parametrize("layers", ["stock", "fused"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "name", ["match_source_len", "diverse beam", "diverse siblings", "prefix_allowed_tokens_fn"]
)
def test_stock_step_strategies_run_in_seqfuse_loop(caplog, monkeypatch, name, seed, layers):
    """Length-constrained, diverse beam and diverse siblings search: seqfuse's
    loop calls the strategy's step as stock's does, with the same results
    (no fallback to stock's loop)."""
    from seqfuse.generation import sequence_generator as sg

    if layers == "fused" and packed_gemm_missing():
        pytest.skip("seqfuse._C with the packed GEMM is not built")
    monkeypatch.setattr(sg, "_warned", set())
    stock_loop_calls = []
    stock_generate = sg.StockSequenceGenerator._generate

    def counting(self, *args, **kwargs):
        stock_loop_calls.append(type(self))
        return stock_generate(self, *args, **kwargs)

    monkeypatch.setattr(sg.StockSequenceGenerator, "_generate", counting)
    model, d = random_transformer(vocab=60, seed=20 + seed, sharp=2.0, perturb=True)
    sample = random_sample(d, bsz=5, seed=seed)
    kwargs = {"beam_size": 4, "max_len_b": 14, **_stock_step_strategy(name, d)}
    with caplog.at_level(logging.WARNING, logger="seqfuse.generation"):
        torch.manual_seed(0)
        stock = StockGenerator([model], d, **kwargs).generate([model], sample)
        ours_model = fused(model) if layers == "fused" else model
        ours = SequenceGenerator([ours_model], d, **kwargs).generate([ours_model], sample)
    compare_hypotheses(stock, ours, name)
    assert stock_loop_calls == [StockGenerator]  # stock's own run only
    assert not [r for r in caplog.records if "falling back" in r.getMessage()]


def test_constraints_without_a_constrained_search_are_refused_as_stock_does():
    from fairseq.token_generation_constraints import pack_constraints

    model, d = random_transformer(vocab=40, seed=2)
    sample = random_sample(d, bsz=1, seed=3)
    constraints = pack_constraints([[torch.tensor([5, 6])]])
    for cls in (StockGenerator, SequenceGenerator):
        with pytest.raises(NotImplementedError, match="search method doesn't support them"):
            cls([model], d, beam_size=2).generate([model], sample, constraints=constraints)


@pytest.mark.parametrize("layers", ["stock", "fused"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["ordered", "unordered"])
def test_lexical_constraints_run_in_seqfuse_loop(caplog, monkeypatch, mode, seed, layers):
    """--constraints: LexicallyConstrainedBeamSearch's step, state updates and
    pruning called by seqfuse's loop where stock's calls them; same results."""
    from fairseq.token_generation_constraints import pack_constraints

    from seqfuse.generation import sequence_generator as sg

    if layers == "fused" and packed_gemm_missing():
        pytest.skip("seqfuse._C with the packed GEMM is not built")
    monkeypatch.setattr(sg, "_warned", set())
    model, d = random_transformer(vocab=60, seed=seed, sharp=2.0, perturb=True)
    sample = random_sample(d, bsz=5, seed=seed)
    g = torch.Generator().manual_seed(seed)

    def phrase():
        return torch.randint(d.nspecial, len(d), (int(torch.randint(1, 3, (1,), generator=g)),))

    per_sentence = [[phrase() for _ in range(i % 3)] for i in range(5)]  # 0, 1 or 2 phrases
    constraints = pack_constraints(per_sentence)
    kwargs = {"beam_size": 4, "max_len_b": 16}
    results = []
    with caplog.at_level(logging.WARNING, logger="seqfuse.generation"):
        ours_model = fused(model) if layers == "fused" else model
        for cls, m in ((StockGenerator, model), (SequenceGenerator, ours_model)):
            strategy = search.LexicallyConstrainedBeamSearch(d, mode)
            gen = cls([m], d, search_strategy=strategy, **kwargs)
            results.append(gen.generate([m], sample, constraints=constraints))
    compare_hypotheses(*results, f"constraints {mode}")
    assert not [r for r in caplog.records if "falling back" in r.getMessage()]
    # GPU-style bookkeeping: finished sentences stay a few steps, their
    # constraint states with them.
    strategy = search.LexicallyConstrainedBeamSearch(d, mode)
    gen = SequenceGenerator([model], d, search_strategy=strategy, **kwargs)
    gen.compact_every = 3
    compare_hypotheses(results[0], gen.generate([model], sample, constraints=constraints))
    # The constraints acted: without them stock's search finds other hypotheses.
    free = StockGenerator([model], d, **kwargs).generate([model], sample)
    assert any(not torch.equal(a[0]["tokens"], b[0]["tokens"]) for a, b in zip(free, results[0]))


@pytest.mark.parametrize("layers", ["stock", "fused"])
def test_constraints_unmet_at_max_len_fail_as_stock_does(layers):
    """Lexical constraints longer than max_len leave no finite candidate at
    max_len: stock's loop asserts there (its search does not stop at
    max_len), and so does seqfuse's, instead of returning fewer hypotheses."""
    from fairseq.token_generation_constraints import pack_constraints

    if layers == "fused" and packed_gemm_missing():
        pytest.skip("seqfuse._C with the packed GEMM is not built")
    model, d = random_transformer(vocab=40, seed=4)
    sample = random_sample(d, bsz=3, seed=4)
    long_phrase = torch.arange(d.nspecial, d.nspecial + 4)
    constraints = pack_constraints([[long_phrase]] * 3)
    ours_model = fused(model) if layers == "fused" else model
    for mode in ("ordered", "unordered"):
        for cls, m in ((StockGenerator, model), (SequenceGenerator, ours_model)):
            strategy = search.LexicallyConstrainedBeamSearch(d, mode)
            gen = cls([m], d, search_strategy=strategy, beam_size=3, max_len_b=2)
            with pytest.raises(AssertionError, match="2 < 2"):
                gen.generate([m], sample, constraints=constraints)
        # with room for the phrase, both finish and agree
        results = []
        for cls, m in ((StockGenerator, model), (SequenceGenerator, ours_model)):
            strategy = search.LexicallyConstrainedBeamSearch(d, mode)
            gen = cls([m], d, search_strategy=strategy, beam_size=3, max_len_b=8)
            results.append(gen.generate([m], sample, constraints=constraints))
        compare_hypotheses(*results, f"constraints {mode}")


def test_seqfuse_disable_env(monkeypatch):
    monkeypatch.setenv("SEQFUSE_DISABLE", "1")
    model, d = random_transformer(vocab=40, seed=2)
    gen = SequenceGenerator([model], d, beam_size=2)
    assert "SEQFUSE_DISABLE" in gen._fallback_reason(None)


@pytest.mark.parametrize("limits", [dict(max_len_b=5), dict(match_source_len=True)])
def test_min_len_above_max_len_is_a_clear_error(limits):
    model, d = random_transformer(vocab=40, seed=2)
    sample = random_sample(d, bsz=2, seed=3, max_len=6)
    kw = dict(beam_size=2, min_len=50, **limits)
    # stock fails an assert; seqfuse's error is an AssertionError too (code
    # written against stock catches it) and a ValueError naming the values
    with pytest.raises(AssertionError, match="min_len"):
        StockGenerator([model], d, **kw).generate([model], sample)
    with pytest.raises(AssertionError, match=r"min_len \(50\) cannot be larger than max_len"):
        SequenceGenerator([model], d, **kw).generate([model], sample)
    with pytest.raises(ValueError):
        SequenceGenerator([model], d, **kw).generate([model], sample)


def test_is_a_stock_generator_subclass():
    # fairseq's CLIs and user code type-check or poke at stock attributes.
    model, d = random_transformer(vocab=40, seed=2)
    gen = SequenceGenerator([model], d, beam_size=2)
    assert isinstance(gen, StockGenerator)
    assert gen.symbols_to_strip_from_output == {d.eos()}


# ----------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def multi30k():
    model, task = load_multi30k()
    itr = task.get_batch_iterator(
        task.dataset("test"), max_sentences=24, required_batch_size_multiple=1
    ).next_epoch_itr(shuffle=False)
    batches = [b for _, b in zip(range(3), itr)]
    return model, task.target_dictionary, batches


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        {"beam_size": 5},
        {"beam_size": 1},
        {"beam_size": 4, "len_penalty": 0.6, "unk_penalty": 0.5},
        {"beam_size": 5, "normalize_scores": False, "max_len_a": 1.2, "max_len_b": 10},
    ],
    ids=["beam5", "greedy", "lenpen_unk", "no_norm_maxlen"],
)
def test_multi30k_model(multi30k, kwargs):
    model, d, batches = multi30k
    for b in batches:
        stock, ours = run_both([model], d, b, kwargs)
        compare_hypotheses(stock, ours, f"multi30k {kwargs}")


@pytest.mark.slow
def test_multi30k_scores_bit_identical(multi30k):
    """On the CPU the fused step reproduces torch's log_softmax bit for bit."""
    model, d, batches = multi30k
    stock, ours = run_both([model], d, batches[0], {"beam_size": 5})
    for hs, ho in zip(stock, ours):
        for a, b in zip(hs, ho):
            assert torch.equal(a["tokens"], b["tokens"])
            assert torch.equal(a["positional_scores"], b["positional_scores"])


# ------------------------------------------------------- GPU-style bookkeeping
@pytest.mark.parametrize("seed", range(4))
def test_compacting_every_few_steps_matches_stock(seed):
    """The GPU default reads 'all finished?' back only every few steps, so
    finished sentences stay in the batch for a while; their rows must not leak
    into anyone's hypotheses."""
    model, d = toy_model(prefix_shift=0.5, seed=seed)
    sample = random_sample(d, bsz=6, seed=seed)
    for every in (2, 3, 5):
        for beam in (1, 3):
            kwargs = {"beam_size": beam, "len_penalty": 0.8}
            torch.manual_seed(0)
            stock = StockGenerator([model], d, **kwargs).generate([model], sample)
            gen = SequenceGenerator([model], d, **kwargs)
            gen.compact_every = every
            compare_hypotheses(stock, gen.generate([model], sample), f"every={every}")


@pytest.mark.parametrize(
    "name", ["match_source_len", "diverse beam", "diverse siblings", "prefix_allowed_tokens_fn"]
)
def test_compacting_every_few_steps_with_stateful_strategies(name):
    """Strategies with per-sentence state (source lengths, group overlap, the
    prefix function's batch ids) follow rows that stay after finishing."""
    for seed in range(3):
        model, d = random_transformer(vocab=60, seed=seed, sharp=2.0, perturb=True)
        sample = random_sample(d, bsz=6, seed=seed)
        kwargs = {"beam_size": 4, "max_len_b": 14}
        stock = StockGenerator([model], d, **kwargs, **_stock_step_strategy(name, d))
        stock = stock.generate([model], sample)
        for every in (2, 3):
            gen = SequenceGenerator([model], d, **kwargs, **_stock_step_strategy(name, d))
            gen.compact_every = every
            compare_hypotheses(stock, gen.generate([model], sample), f"{name} every={every}")


# ---------------------------------------------------------------------- memory
def _generation_peak(gen, model, sample) -> int:
    """Peak tensor bytes one generate call allocates (scripts/benchmark.py's measure)."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from benchmark import generation_peak_bytes

    gen.generate([model], sample)  # warm-up
    return generation_peak_bytes(lambda: gen.generate([model], sample))[1]


def test_generation_peak_memory_below_stock():
    """No [rows, vocab] log-prob tensor, and a step's logits are freed before
    the next decoder call: where the vocabulary dominates, seqfuse's generation
    peaks well under stock's, with stock's hypotheses."""
    model, d = random_transformer(8000, seed=1)
    sample = random_sample(d, bsz=16, seed=2, min_len=5, max_len=12)
    kwargs = {"beam_size": 5, "max_len_b": 20}
    stock, ours = run_both([model], d, sample, kwargs)
    compare_hypotheses(stock, ours, "memory")
    peak_stock = _generation_peak(StockGenerator([model], d, **kwargs), model, sample)
    peak_ours = _generation_peak(SequenceGenerator([model], d, **kwargs), model, sample)
    assert 0 < peak_ours < 0.6 * peak_stock, (peak_ours, peak_stock)


def test_multi30k_fused_generation_peak_under_half_of_stock():
    """#5's memory goal on the real model: 128 test sentences, beam 5, fused
    layers (one-call steps, caches by blocks, the step's reused memory): the
    generation peaks under half of stock's, with stock's best tokens."""
    if packed_gemm_missing():
        pytest.skip("seqfuse._C or its packed GEMM kernel not available")
    model, task = load_multi30k()
    fast = fused(model)
    ds = task.dataset("test")
    sample = ds.collater([ds[i] for i in range(128)])
    d = task.target_dictionary
    kwargs = {"beam_size": 5, "max_len_b": 200}
    stock_gen = StockGenerator([model], d, **kwargs)
    ours_gen = SequenceGenerator([fast], d, **kwargs)
    peak_stock = _generation_peak(stock_gen, model, sample)
    peak_ours = _generation_peak(ours_gen, fast, sample)
    assert 0 < peak_ours < 0.5 * peak_stock, (peak_ours, peak_stock)
    with torch.no_grad():
        stock = stock_gen.generate([model], sample)
        ours = ours_gen.generate([fast], sample)
    for i, (hs, ho) in enumerate(zip(stock, ours)):
        assert torch.equal(hs[0]["tokens"], ho[0]["tokens"]), f"sentence {i}"


def test_attention_buffers_grow_with_the_steps_taken():
    """The attention buffers follow the steps decoded, not max_len: a max_len
    20 times what the hypotheses need costs next to no memory."""
    model, d = toy_model(out_len=lambda n: 400)  # long encoder output: wide attention rows
    sample = random_sample(d, bsz=4, seed=1)
    peaks = {}
    for max_len_b in (12, 240):
        kwargs = {"beam_size": 4, "max_len_b": max_len_b}
        stock, ours = run_both([model], d, sample, kwargs)
        compare_hypotheses(stock, ours, f"max_len_b={max_len_b}")
        assert max(len(h["tokens"]) for hs in ours for h in hs) < 12  # all end early
        peaks[max_len_b] = _generation_peak(SequenceGenerator([model], d, **kwargs), model, sample)
    # sized by max_len, attn and the finished attention would add about 13 MB
    assert 0 < peaks[240] - peaks[12] < 2 * 2**20, peaks


# --------------------------------------------------------------------------
# --print-alignment: fairseq's SequenceGeneratorWithAlignment on seqfuse's search


def _soft_floats(alignment) -> list[list[float]]:
    return [[float(p) for p in row] for row in alignment]


@pytest.mark.parametrize("layers", ["stock", "fused"])
@pytest.mark.parametrize("full_context", [False, True], ids=["search attention", "full context"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_alignment_generator_matches_stock(mode, full_context, layers):
    """Same hypotheses and the same alignments as stock's generator with
    alignment: from the attention the search kept, or (a model with
    ``full_context_alignment``) from a teacher-forced pass."""
    from fairseq.sequence_generator import SequenceGeneratorWithAlignment as StockAligned

    from seqfuse.generation import SequenceGeneratorWithAlignment

    if layers == "fused" and packed_gemm_missing():
        pytest.skip("seqfuse._C with the packed GEMM is not built")
    model, d = random_transformer(vocab=40, seed=7, perturb=True)
    ours_model = fused(model) if layers == "fused" else model
    for m in (model, ours_model):
        m.full_context_alignment = full_context
    sample = random_sample(d, bsz=6, seed=3)
    kw = dict(beam_size=3, max_len_b=14, print_alignment=mode)
    with torch.no_grad():
        stock = StockAligned([model], d, **kw).generate([model], sample)
        gen = SequenceGeneratorWithAlignment([ours_model], d, **kw)
        ours = gen.generate([ours_model], sample)
    assert isinstance(gen, SequenceGenerator)
    n_aligned = 0
    for i, (hs, ho) in enumerate(zip(stock, ours, strict=True)):
        for j, (a, b) in enumerate(zip(hs, ho, strict=True)):
            assert torch.equal(a["tokens"], b["tokens"]), (i, j)
            torch.testing.assert_close(b["score"], a["score"], atol=SCORE_ATOL, rtol=SCORE_RTOL)
            if mode == "soft" and layers == "fused":  # printed with 6 decimals
                x, y = _soft_floats(a["alignment"]), _soft_floats(b["alignment"])
                torch.testing.assert_close(torch.tensor(y), torch.tensor(x), atol=2e-6, rtol=0)
            else:
                assert a["alignment"] == b["alignment"], (i, j)
            n_aligned += len(a["alignment"]) > 0
    assert n_aligned == sum(len(h) for h in stock)  # every hypothesis has an alignment


def test_alignment_generator_refuses_an_unknown_mode():
    from seqfuse.generation import SequenceGeneratorWithAlignment

    model, d = random_transformer(vocab=20, seed=1)
    with pytest.raises(ValueError, match="'hard' or 'soft'"):
        SequenceGeneratorWithAlignment([model], d, beam_size=2, print_alignment="both")


class _CollectorSpy:
    """Wraps a decoder's forward to record whether Python's cyclic collector
    was on at each step (and can fail a step, to test the restore)."""

    def __init__(self, decoder, fail_at=None):
        self._seen, self._decoder, self._fail_at = [], decoder, fail_at
        real = decoder.forward

        def forward(*args, **kwargs):
            import gc

            self._seen.append(gc.isenabled())
            if self._fail_at is not None and len(self._seen) == self._fail_at:
                raise RuntimeError("step failed on purpose")
            return real(*args, **kwargs)

        decoder.forward = forward

    def close(self):
        del self._decoder.forward


@pytest.mark.parametrize("setting", ["default", "off_by_env", "already_off", "step_fails"])
def test_collector_paused_in_the_search_and_restored(monkeypatch, setting):
    """The search runs with Python's cyclic collector paused (a full collection
    walks every object the process holds) and leaves it as it found it: on
    again after a search, off if it was off, on after a failed step;
    SEQFUSE_GC_PAUSE=0 leaves it on. The hypotheses are stock's either way."""
    import gc

    if setting == "off_by_env":
        monkeypatch.setenv("SEQFUSE_GC_PAUSE", "0")
    else:
        monkeypatch.delenv("SEQFUSE_GC_PAUSE", raising=False)
    model, d = random_transformer(vocab=40, seed=3)
    sample = random_sample(d, bsz=3, seed=3)
    stock = StockGenerator([model], d, beam_size=3).generate([model], sample)
    spy = _CollectorSpy(model.decoder, fail_at=2 if setting == "step_fails" else None)
    was = gc.isenabled()
    try:
        if setting == "already_off":
            gc.disable()
        else:
            gc.enable()
        gen = SequenceGenerator([model], d, beam_size=3)
        if setting == "step_fails":
            with pytest.raises(RuntimeError, match="on purpose"):
                gen.generate([model], sample)
        else:
            ours = gen.generate([model], sample)
        after = gc.isenabled()
    finally:
        spy.close()
        (gc.enable if was else gc.disable)()
    assert spy._seen, "the decoder was not called"
    expect_during = setting == "off_by_env"
    assert set(spy._seen) == {expect_during}, spy._seen
    assert after == (setting != "already_off")
    if setting != "step_fails":
        compare_hypotheses(stock, ours)
