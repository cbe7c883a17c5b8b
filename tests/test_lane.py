"""The search lane (seqfuse.generation.lane): runs of beam-search steps in
one C++ call, against the same search with every step in the Python loop
(bit for bit: the same ops on the same tensors) and against stock fairseq's
generator (same tokens, scores within 1e-5)."""

from __future__ import annotations

import copy

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

from seqfuse import _ext
from seqfuse.generation import SequenceGenerator
from seqfuse.generation import lane as search_lane
from seqfuse.layers import kv_cache

pytestmark = pytest.mark.skipif(
    packed_gemm_missing() or not hasattr(_ext._C, "SearchLane"),
    reason="seqfuse._C, its packed GEMM kernel or its search lane not available",
)


def lane_and_loop(monkeypatch, model, d, sample, **kw):
    """(hypotheses with the lane, with every step in the loop, the lane's
    STATS over the first)."""
    monkeypatch.setenv(search_lane.LANE_ENV, "0")
    loop = generate(model, d, sample, **kw)
    monkeypatch.delenv(search_lane.LANE_ENV)
    before = copy.deepcopy(search_lane.STATS)
    lane = generate(model, d, sample, **kw)
    stops = {
        k: v - before["stops"].get(k, 0)
        for k, v in search_lane.STATS["stops"].items()
        if v - before["stops"].get(k, 0)
    }
    stats = {
        "runs": search_lane.STATS["runs"] - before["runs"],
        "steps": search_lane.STATS["steps"] - before["steps"],
        "stops": stops,
    }
    return lane, loop, stats


def stock(model, d, sample, **kw):
    with torch.no_grad():
        return StockGenerator([model], d, **kw).generate([model], sample)


@pytest.mark.parametrize("variant", list(LAYER_VARIANTS))
@pytest.mark.parametrize("max_steps", [None, 1, 3])
def test_lane_bit_identical_to_the_loop(monkeypatch, variant, max_steps):
    """Whole searches: sentences finishing and the batch shrinking, the
    caches growing past their first slots and repacking, the lane handing
    the search back every `max_steps` steps: every bit of every hypothesis is
    the loop's, and the search agrees with stock fairseq's."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)  # start small: growth happens
    monkeypatch.setattr(kv_cache, "REPACK_MIN_BYTES", 0)  # and repacks, small as the caches are
    monkeypatch.setattr(search_lane, "MAX_STEPS", max_steps)
    model, d = ending_transformer(11 + len(variant), 3.0, **LAYER_VARIANTS[variant])
    fast = fused(model)
    sample = random_sample(d, bsz=7, seed=5)
    kw = dict(beam_size=5, max_len_b=24)
    lane, loop, stats = lane_and_loop(monkeypatch, fast, d, sample, **kw)
    assert stats["steps"] > 0, stats
    if max_steps is not None:  # no run past its budget; handed back on budget
        assert stats["steps"] <= stats["runs"] * max_steps, stats
        assert stats["steps"] <= max_steps or stats["stops"].get("budget", 0) > 0, stats
    assert_bit_identical_hypos(loop, lane, variant)
    compare_hypotheses(stock(model, d, sample, **kw), lane, variant)


def ending_transformer(seed: int, eos_scale: float, **overrides):
    """random_transformer whose EOS logit is scaled: sentences end at
    different steps (the batch shrinks) instead of all at max_len."""
    model, d = random_transformer(60, seed, perturb=True, **overrides)
    with torch.no_grad():
        model.decoder.output_projection.weight[d.eos()].mul_(eos_scale)
    return model, d


def test_lane_stops_where_the_loop_has_work(monkeypatch):
    """Caches growing past their first slots, caches repacking as the batch
    shrinks, every sentence finished: the lane stops at each, the loop does
    its part, the lane goes on; every bit is the loop's."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)
    monkeypatch.setattr(kv_cache, "REPACK_MIN_BYTES", 0)
    model, d = ending_transformer(11, 5.0)
    fast = fused(model)
    sample = random_sample(d, bsz=7, seed=5)
    kw = dict(beam_size=5, max_len_b=24)
    lane, loop, stats = lane_and_loop(monkeypatch, fast, d, sample, **kw)
    assert {"grow", "repack", "finished"} <= set(stats["stops"]), stats
    assert_bit_identical_hypos(loop, lane)
    compare_hypotheses(stock(model, d, sample, **kw), lane)


@pytest.mark.parametrize("threshold", ["default", "never"])
def test_lane_skips_the_repacks_the_caches_skip(monkeypatch, threshold):
    """A shrink that frees less than REPACK_MIN_BYTES repacks no cache, and
    the lane (which checks the same sizes in C++) does not stop for it: with
    the default threshold this small model's caches never repack, and with
    none reachable neither do any; every bit is still the loop's."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)
    if threshold == "never":
        monkeypatch.setattr(kv_cache, "REPACK_MIN_BYTES", 1 << 62)
    repacks = []
    for cls in (kv_cache.SelfAttnCache, kv_cache.CrossAttnCache):
        original = cls.repack

        def counted(self, *args, _original=original, **kw):
            repacks.append(type(self).__name__)
            return _original(self, *args, **kw)

        monkeypatch.setattr(cls, "repack", counted)
    model, d = ending_transformer(11, 5.0)
    fast = fused(model)
    sample = random_sample(d, bsz=7, seed=5)
    kw = dict(beam_size=5, max_len_b=24)
    lane, loop, stats = lane_and_loop(monkeypatch, fast, d, sample, **kw)
    assert repacks == [], repacks  # the batch shrinks, as in the test above
    assert "repack" not in stats["stops"] and stats["stops"].get("grow", 0) > 0, stats
    assert_bit_identical_hypos(loop, lane)
    compare_hypotheses(stock(model, d, sample, **kw), lane)


@pytest.mark.parametrize(
    "options",
    [
        dict(min_len=7),
        dict(unk_penalty=2.5),
        dict(unk_penalty=-1.0),
        dict(len_penalty=0.4),
        dict(normalize_scores=False),
        dict(max_len_b=5),  # sentences reach max_len: the loop takes that step
        dict(beam_size=2),
        dict(beam_size=8),
        dict(match_source_len=True),
    ],
    ids=str,
)
def test_lane_follows_the_generators_options(monkeypatch, options):
    model, d = random_transformer(40, 23, perturb=True, sharp=1.5)
    fast = fused(model)
    sample = random_sample(d, bsz=5, seed=2)
    kw = dict(beam_size=4, max_len_b=16)
    kw.update(options)
    lane, loop, stats = lane_and_loop(monkeypatch, fast, d, sample, **kw)
    assert stats["steps"] > 0, stats
    if "max_len_b" in options:
        assert stats["stops"].get("max_len", 0) > 0, stats
    assert_bit_identical_hypos(loop, lane, str(options))
    compare_hypotheses(stock(model, d, sample, **kw), lane, str(options))


def test_lane_hands_exact_ties_to_the_loop(monkeypatch):
    """Twin tokens (equal output-projection rows) give exactly equal scores:
    the lane stops inside such a step and the loop picks stock's order."""
    model, d = random_transformer(40, 31, perturb=True)
    with torch.no_grad():
        w = model.decoder.output_projection.weight  # shared with the embeddings
        for t in range(d.nspecial, len(d) - 1, 3):
            w[t + 1].copy_(w[t])
    fast = fused(model)
    sample = random_sample(d, bsz=6, seed=4)
    kw = dict(beam_size=5, max_len_b=14)
    lane, loop, stats = lane_and_loop(monkeypatch, fast, d, sample, **kw)
    assert stats["stops"].get("tie", 0) > 0 and stats["steps"] > 0, stats
    assert_bit_identical_hypos(loop, lane, "ties")
    compare_hypotheses(stock(model, d, sample, **kw), lane, "ties")


@pytest.mark.parametrize(
    "gen_kw, gen_call_kw, why",
    [
        (dict(temperature=0.7), {}, "temperature"),
        (dict(no_repeat_ngram_size=2), {}, "n-gram"),
        (dict(beam_size=1), {}, "plain beam search"),
        ({}, dict(prefix_tokens=torch.tensor([[7], [8], [9], [10]])), "prefix"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_lane_leaves_what_it_does_not_do_to_the_loop(monkeypatch, gen_kw, gen_call_kw, why):
    """Options the lane does not run take every step in the loop (results as
    without the lane, tested with stock elsewhere); the reason is named."""
    model, d = random_transformer(40, 5, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=4, seed=1)
    kw = dict(beam_size=3, max_len_b=10)
    kw.update(gen_kw)
    gen = SequenceGenerator([fast], d, **kw)
    before = search_lane.STATS["steps"]
    seen = {}
    real = search_lane.lane_problem

    def spy(*a, **k):
        seen["why"] = real(*a, **k)
        return seen["why"]

    monkeypatch.setattr("seqfuse.generation.sequence_generator.lane_problem", spy)
    with torch.no_grad():
        gen.generate([fast], sample, **gen_call_kw)
    assert search_lane.STATS["steps"] == before
    assert seen["why"] is not None and why in seen["why"], seen


def test_lane_off_by_switch_and_on_by_default(monkeypatch):
    model, d = random_transformer(40, 6, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=3, seed=7)
    monkeypatch.setenv(search_lane.LANE_ENV, "0")
    before = search_lane.STATS["steps"]
    generate(fast, d, sample, beam_size=3, max_len_b=10)
    assert search_lane.STATS["steps"] == before
    monkeypatch.delenv(search_lane.LANE_ENV)
    generate(fast, d, sample, beam_size=3, max_len_b=10)
    assert search_lane.STATS["steps"] > before


def test_lane_refuses_a_state_it_cannot_run():
    """A lane filled wrongly raises a clear error instead of searching."""
    from seqfuse.layers import fused_step

    model, d = random_transformer(40, 8)
    decoder = fused(model).decoder
    with torch.no_grad():
        plan = fused_step.logits_plan(decoder, decoder.embed_tokens.weight[:1].unsqueeze(0))
    assert isinstance(plan, dict), plan
    lane = _ext._C.SearchLane()
    lane.beam = 3
    with pytest.raises(RuntimeError, match="per-layer lists"):
        plan["native"].search(lane, -1)


def test_multi30k_lane_bit_identical_to_the_loop(monkeypatch):
    """The real model, batches of 16 sorted sentences as fairseq-generate
    makes them."""
    model, task = load_multi30k()
    fast = fused(model)
    ds = task.dataset("test")
    ids = sorted(range(64), key=lambda i: ds.src_sizes[i])
    d = task.target_dictionary
    kw = dict(beam_size=5, max_len_a=0, max_len_b=200)
    for s in range(0, 64, 16):
        sample = ds.collater([ds[i] for i in ids[s : s + 16]])
        lane, loop, stats = lane_and_loop(monkeypatch, fast, d, sample, **kw)
        assert stats["steps"] > 0, stats
        assert_bit_identical_hypos(loop, lane, f"batch at {s}")
