"""The exact one-call decoder step for Hugging Face FSMT models
(``integrations.hf_fsmt_step``): every step's ATen calls from C++, compared
with stock's generate in the same test, bit for bit (sequences, scores and
the returned caches); the fused mode within 1e-5 with the same tokens."""

from __future__ import annotations

import os

import pytest
import torch
from hf_models import fresh_step_state, fsmt_config, needs_packed_gemm, scored_beam_search

import seqfuse
from integrations import hf, hf_exact_step, hf_fsmt_step

SHARED_MODEL = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "models", "multi30k_en_de"
)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    fresh_step_state(monkeypatch)


def _fsmt(act="relu", seed=0, layers=2):
    from transformers import FSMTForConditionalGeneration

    torch.manual_seed(seed)
    cfg = fsmt_config(
        src_vocab_size=97,
        tgt_vocab_size=89,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        activation_function=act,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    model = FSMTForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a spread of logits, so that beams differ
        model.model.decoder.output_projection.weight.mul_(8.0)
    return model


def _inputs(batch=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 97, (batch, length), generator=g)
    ids[:, -1] = 2
    for b in range(1, batch, 2):  # left padding, as fairseq's collater
        ids[b, : 1 + b % (length - 3)] = 1
    return ids, ids.ne(1).long()


def _generate(model, ids, mask, **kw):
    return scored_beam_search(model, ids, mask, max_new_tokens=12, **kw)


def _assert_identical(stock, ours):
    assert torch.equal(ours.sequences, stock.sequences)
    assert torch.equal(ours.sequences_scores, stock.sequences_scores)
    a, b = stock.past_key_values, ours.past_key_values
    for x, y in zip(a.self_attention_cache.layers, b.self_attention_cache.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("layers", [1, 3])
def test_exact_step_bit_identical(act, layers):
    model = _fsmt(act, seed=layers, layers=layers)
    ids, mask = _inputs(seed=layers)
    stock = _generate(model, ids, mask)
    seqfuse.optimize(model)
    try:
        assert getattr(model.model.decoder, "_seqfuse_hf_fsmt_exact", False)
        ours = _generate(model, ids, mask)
    finally:
        hf.restore(model)
    assert not getattr(model.model.decoder, "_seqfuse_hf_fsmt_exact", False)
    assert hf_exact_step.STATS["exact"] > 0 and hf_exact_step.STATS["deferred_reorders"] > 0
    _assert_identical(stock, ours)


def test_without_padding_and_collected_attentions():
    model = _fsmt(seed=5)
    ids, _ = _inputs(seed=5)
    ids[:, :] = torch.where(ids == 1, 7, ids)
    stock = _generate(model, ids, None)
    stock_attn = _generate(model, ids, None, output_attentions=True)
    seqfuse.optimize(model)
    try:
        ours = _generate(model, ids, None)
        exact = hf_exact_step.STATS["exact"]
        ours_attn = _generate(model, ids, None, output_attentions=True)
    finally:
        hf.restore(model)
    _assert_identical(stock, ours)
    assert exact > 0 and hf_exact_step.STATS["exact"] == exact  # attentions: stock layers
    _assert_identical(stock_attn, ours_attn)
    for a, b in zip(stock_attn.cross_attentions[-1], ours_attn.cross_attentions[-1]):
        assert torch.equal(a, b)


@needs_packed_gemm()
def test_fused_mode_same_tokens():
    model = _fsmt(seed=6)
    ids, mask = _inputs(seed=6)
    stock = _generate(model, ids, mask)
    seqfuse.optimize(model, fused_layers=True)
    try:
        ours = _generate(model, ids, mask)
    finally:
        hf.restore(model)
    assert hf_exact_step.STATS["exact"] > 0
    assert torch.equal(ours.sequences, stock.sequences)
    torch.testing.assert_close(ours.sequences_scores, stock.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED_MODEL, "checkpoint_best.pt")),
    reason="the shared Multi30k model is not here",
)
def test_multi30k_model(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from integrations.fairseq_to_hf import fsmt_from_fairseq

    model = fsmt_from_fairseq(os.path.join(SHARED_MODEL, "checkpoint_best.pt"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 8000, (5, 14), generator=g)
    ids[:, -1] = 2
    ids[1, :5] = 1
    mask = ids.ne(1).long()
    stock = _generate(model, ids, mask)
    seqfuse.optimize(model)
    try:
        ours = _generate(model, ids, mask)
    finally:
        hf.restore(model)
    assert hf_exact_step.STATS["exact"] > 0
    _assert_identical(stock, ours)


def test_problems():
    from hf_models import make_model

    assert hf_fsmt_step.problem(make_model("bart")) == "not an FSMT model"
    model = _fsmt()
    assert hf_fsmt_step.problem(model) is None
    model.model.decoder.layers[1].fc1.bias = None
    assert "biased" in hf_fsmt_step.problem(model)
    model = _fsmt(act="silu")
    assert hf_fsmt_step.problem(model) is None  # silu is one of the step's activations
    model.model.decoder.layers[0].activation_fn = torch.nn.Softplus()
    assert "activation" in hf_fsmt_step.problem(model)
