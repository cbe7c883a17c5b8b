"""Hugging Face greedy search (``num_beams=1``) with fused layers: seqfuse's
loop, in which finished sequences leave the batch (stock keeps decoding them,
appending the pad token, until every sequence is done). Compared with stock
and with the same fused model keeping every row
(``SEQFUSE_HF_DROP_FINISHED=0``), run in the same test: the same sequences."""

from __future__ import annotations

import logging

import pytest
import torch
from hf_models import DECODER_ONLY, KINDS, MORE_KINDS, make_inputs, make_model

import seqfuse
from integrations import hf
from seqfuse import _ext

pytestmark = pytest.mark.skipif(
    _ext._C is None or not torch.ops.seqfuse.linear_capability(),
    reason="no packed-GEMM kernel here",
)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for var in ("SEQFUSE_DISABLE", "SEQFUSE_FUSED_LAYERS", "SEQFUSE_EXACT_STEP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(hf.DROP_FINISHED_ENV, raising=False)


def _greedy(model, ids, monkeypatch, drop: bool | None = None, **kw):
    if drop is not None:
        monkeypatch.setenv(hf.DROP_FINISHED_ENV, "1" if drop else "0")
    hf.STATS["sentences_dropped"] = 0
    with torch.no_grad():
        out = model.generate(ids, num_beams=1, do_sample=False, **kw)
    return out, hf.STATS["sentences_dropped"]


@pytest.mark.parametrize("kind", KINDS + MORE_KINDS)
def test_same_sequences_as_stock_and_every_row_kept(kind, monkeypatch, caplog):
    dropped = 0
    for seed in (0, 1, 2):
        model = make_model(kind, seed=seed)
        ids, mask = make_inputs(kind, model, batch=8, seed=seed, src_len=10)
        kw = dict(attention_mask=mask, max_new_tokens=24)
        stock, _ = _greedy(model, ids, monkeypatch, **kw)
        seqfuse.optimize(model, fused_layers=True)
        try:
            with caplog.at_level(logging.WARNING, logger="seqfuse.hf"):
                caplog.clear()
                kept, n_kept = _greedy(model, ids, monkeypatch, drop=False, **kw)
                ours, n = _greedy(model, ids, monkeypatch, drop=True, **kw)
        finally:
            hf.restore(model)
        assert not caplog.records  # seqfuse's loop ran: no fallback line
        assert n_kept == 0
        dropped += n
        assert torch.equal(kept, ours)
        assert torch.equal(stock, ours)  # these models' fused logits keep stock's tokens
    assert dropped > 0


@pytest.mark.parametrize(
    "opts",
    [
        dict(no_repeat_ngram_size=2),
        dict(min_new_tokens=4, bad_words_ids=[[7], [9, 11]]),
    ],
    ids=lambda o: ",".join(o),
)
@pytest.mark.parametrize("kind, seed", [("marian", 1), ("t5", 0)])
def test_row_wise_processors(kind, seed, opts, monkeypatch):
    model = make_model(kind, seed=seed)
    ids, mask = make_inputs(kind, model, batch=9, seed=0, src_len=10)
    kw = dict(attention_mask=mask, max_new_tokens=20, **opts)
    stock, _ = _greedy(model, ids, monkeypatch, **kw)
    seqfuse.optimize(model, fused_layers=True)
    try:
        ours, n = _greedy(model, ids, monkeypatch, drop=True, **kw)
    finally:
        hf.restore(model)
    assert n > 0
    assert torch.equal(stock, ours)


def test_decoder_only_left_padding(monkeypatch):
    kind = DECODER_ONLY[0]
    model = make_model(kind, seed=0)
    ids, mask = make_inputs(kind, model, batch=9, seed=2, src_len=12)
    kw = dict(attention_mask=mask, max_new_tokens=30)
    stock, _ = _greedy(model, ids, monkeypatch, **kw)
    seqfuse.optimize(model, fused_layers=True)
    try:
        ours, n = _greedy(model, ids, monkeypatch, drop=True, **kw)
    finally:
        hf.restore(model)
    assert n > 0
    assert torch.equal(stock, ours)


def test_hugging_faces_loop_elsewhere(monkeypatch, caplog):
    """The exact mode, sampling, return_dict_in_generate and processors with
    state sized by the batch or indexed by sentence (prefix_allowed_tokens_fn
    is given the sentence's index; the repetition penalty can hold a per-row
    prompt length) run Hugging Face's own loop, with one line naming the
    reason."""
    model = make_model("bart", seed=0)
    ids, mask = make_inputs("bart", model, batch=4, seed=0)
    kw = dict(attention_mask=mask, max_new_tokens=10)
    cases = [
        (False, {}, "greedy search"),
        (True, dict(do_sample=True), "sampling"),
        (True, dict(return_dict_in_generate=True), "return_dict_in_generate"),
        (True, dict(prefix_allowed_tokens_fn=lambda b, s: list(range(50))), "Prefix"),
        (True, dict(repetition_penalty=1.3), "RepetitionPenalty"),
    ]
    for fused, extra, reason in cases:
        hf._warned.clear()
        seqfuse.optimize(model, fused_layers=fused)
        try:
            with caplog.at_level(logging.WARNING, logger="seqfuse.hf"):
                caplog.clear()
                with torch.no_grad():
                    model.generate(ids, num_beams=1, **kw, **extra)
        finally:
            hf.restore(model)
        lines = [r.getMessage() for r in caplog.records if r.name == "seqfuse.hf"]
        assert len(lines) == 1 and reason in lines[0], (reason, lines)
        assert lines[0].startswith(hf.FALLBACK_PREFIX)
