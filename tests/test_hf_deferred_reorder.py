"""The beam reorder of the self-attention cache, deferred to the next
one-call decoder step (``integrations.hf_exact_step.defer_reorder``): the
step gathers the reordered history with its new K/V in one copy, where
stock's ``reorder_cache`` copies the history and ``DynamicLayer.update``
copies it again. Exact mode: bit-identical to stock's generate, run in the
same test; a step that runs the stock layers, and the end of the search,
apply the deferred reorder first."""

from __future__ import annotations

import pytest
import torch
from hf_models import fresh_step_state, make_inputs, make_model, scored_beam_search

import seqfuse
from integrations import hf, hf_exact_step

KINDS = ("marian", "bart", "t5", "gpt2", "llama", "qwen2")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    fresh_step_state(monkeypatch)


def _generate(model, ids, mask, **kw):
    return scored_beam_search(model, ids, mask, max_new_tokens=10, **kw)


def _layers(cache):
    sc = getattr(cache, "self_attention_cache", cache)
    return [(lay.keys, lay.values) for lay in sc.layers]


def _assert_same(stock, ours):
    assert torch.equal(ours.sequences, stock.sequences)
    assert torch.equal(ours.sequences_scores, stock.sequences_scores)
    # the cache generate returns: every deferred reorder applied
    for (k0, v0), (k1, v1) in zip(_layers(stock.past_key_values), _layers(ours.past_key_values)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    sc = hf_exact_step.self_cache(ours.past_key_values)
    assert hf_exact_step.pending_order(sc) is None


@pytest.mark.parametrize("kind", KINDS)
def test_deferred_reorder_bit_identical(kind, monkeypatch):
    model = make_model(kind, seed=11)
    ids, mask = make_inputs(kind, model, batch=3, seed=11)
    stock = _generate(model, ids, mask)
    seqfuse.optimize(model)
    try:
        ours = _generate(model, ids, mask)
        deferred = hf_exact_step.STATS["deferred_reorders"]
        monkeypatch.setenv("SEQFUSE_HF_DEFER_REORDER", "0")
        at_once = _generate(model, ids, mask)
    finally:
        hf.restore(model)
    assert deferred > 0 and hf_exact_step.STATS["deferred_reorders"] == deferred
    assert hf_exact_step.STATS["exact"] > 0
    _assert_same(stock, ours)
    _assert_same(stock, at_once)


@pytest.mark.parametrize("kind", ("marian", "t5", "gpt2", "llama"))
def test_stock_layers_apply_it_first(kind):
    """A hook on a decoder layer sends every step to the stock layers: each
    applies the reorder deferred by the search before they read the cache."""
    model = make_model(kind, seed=12)
    ids, mask = make_inputs(kind, model, batch=3, seed=12)
    stock = _generate(model, ids, mask)
    seqfuse.optimize(model)
    dec = model.get_decoder() if model.config.is_encoder_decoder else model
    layer = next(m for m in dec.modules() if type(m).__name__.endswith(("Layer", "Block")))
    handle = layer.register_forward_pre_hook(lambda _m, _a: None)
    try:
        ours = _generate(model, ids, mask)
    finally:
        handle.remove()
        hf.restore(model)
    assert hf_exact_step.STATS["exact"] == 0 and hf_exact_step.STATS["stock"] > 0
    assert hf_exact_step.STATS["deferred_reorders"] == 0
    _assert_same(stock, ours)


def test_defer_composes_and_flushes():
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    keys = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 3, 2).contiguous()
    cache.update(keys, keys + 10, 0)
    first, second = torch.tensor([2, 2, 0, 1], dtype=torch.int32), torch.tensor([3, 0, 0, 2])
    assert hf_exact_step.defer_reorder(cache, first)
    assert hf_exact_step.defer_reorder(cache, second)  # composed: first[second]
    assert torch.equal(hf_exact_step.pending_order(cache), torch.tensor([1, 2, 2, 0]))
    assert torch.equal(cache.layers[0].keys, keys)  # nothing moved yet
    hf_exact_step.flush_reorder(cache)
    assert hf_exact_step.pending_order(cache) is None
    assert torch.equal(cache.layers[0].keys, keys.index_select(0, torch.tensor([1, 2, 2, 0])))
    assert not hf_exact_step.defer_reorder(object(), first)  # not a dynamic cache
