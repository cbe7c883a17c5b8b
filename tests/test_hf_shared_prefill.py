"""The first forward runs once per sentence in the fused mode
(``integrations.hf._prefill``): a decoder-only model's prompt, an
encoder-decoder's first step, which generate expands to ``num_beams``
identical rows each. The packed GEMM's rows do not depend on each other, so
with a batch-invariant attention (torch's math sdpa) the cache and logits of
one row, repeated, are the bits every row would compute. torch's default
CPU sdpa is not always batch-invariant (MKL's dispatch on AVX2 with two
threads rounds a row differently in a larger batch): there the results are
within the fused mode's 1e-5, the same tokens. Compared with the same fused
search running every row, and with stock, in the same test."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hf_models import DECODER_ONLY, clear_seqfuse_env, make_inputs, make_model, needs_packed_gemm

import seqfuse
from integrations import hf

pytestmark = needs_packed_gemm()

KINDS = ["gpt2", "llama", "qwen2", "marian", "bart", "t5"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clear_seqfuse_env(monkeypatch)
    hf.STATS["shared_prefills"] = 0


def _generate(model, ids, math_sdpa=False, **kw):
    """(sequences of the fused search, (sequences, scores) with per-step
    scores requested: each step through stock's ops); ``math_sdpa``: with
    torch's math attention, whose rows do not depend on the batch."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext():
        plain = model.generate(ids, **kw)
        scored = model.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
    return plain, scored.sequences, scored.sequences_scores


def _prompt_rows(model):
    """Counts the rows of every call of the decoder's token embedding (a
    hook there, not on a layer, so the one-call step still runs)."""
    rows: list[int] = []
    dec = model if not model.config.is_encoder_decoder else model.get_decoder()
    emb = dec.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape))
    return rows, handle


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beams", [2, 5])
def test_shared_prompt_bit_identical(kind, beams, monkeypatch):
    """With the math attention: shared and every row bit for bit. With
    torch's default attention: the same sequences, scores within 1e-5."""
    model = make_model(kind, seed=7)
    ids, mask = make_inputs(kind, model, batch=5, seed=7, src_len=13)
    kw = dict(attention_mask=mask, num_beams=beams, max_new_tokens=9, min_new_tokens=9)
    stock = _generate(model, ids, **kw)
    seqfuse.optimize(model, fused_layers=True)
    try:
        monkeypatch.setenv("SEQFUSE_HF_SHARED_PREFILL", "0")
        every_row = _generate(model, ids, math_sdpa=True, **kw)
        every_row_default = _generate(model, ids, **kw)
        assert hf.STATS["shared_prefills"] == 0
        monkeypatch.delenv("SEQFUSE_HF_SHARED_PREFILL")
        rows, handle = _prompt_rows(model)
        try:
            shared = _generate(model, ids, math_sdpa=True, **kw)
        finally:
            handle.remove()
        shared_default = _generate(model, ids, **kw)
    finally:
        hf.restore(model)
    assert hf.STATS["shared_prefills"] == 4
    # the prompt (decoder-only) or the first step on one row per sentence,
    # then every beam's row
    first = (5, 13) if kind in DECODER_ONLY else (5, 1)
    assert rows[:2] == [first, (5 * beams, 1)]
    for a, b in zip(shared, every_row):
        assert torch.equal(a, b)
    for ours in (shared, shared_default):
        assert torch.equal(ours[0], every_row_default[0]) and torch.equal(ours[1], stock[1])
        assert torch.equal(ours[0], stock[0])
        torch.testing.assert_close(ours[2], every_row_default[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[2], stock[2], atol=1e-5, rtol=1e-5)


def test_exact_mode_runs_every_row():
    """Without fused layers the products are torch's, whose rows may depend
    on the batch: the prompt runs on every row, as stock's, bit for bit."""
    model = make_model("gpt2", seed=3)
    ids, mask = make_inputs("gpt2", model, batch=3, seed=3)
    kw = dict(attention_mask=mask, num_beams=3, max_new_tokens=6)
    stock = _generate(model, ids, **kw)
    seqfuse.optimize(model)
    try:
        ours = _generate(model, ids, **kw)
    finally:
        hf.restore(model)
    assert hf.STATS["shared_prefills"] == 0
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)


def _why(model, ids, mask, beams, **extra):
    from transformers import GenerationConfig

    gc = GenerationConfig(num_beams=beams)
    kwargs = {"attention_mask": mask, "use_cache": True, **extra}
    return hf._why_not_share_prefill(model, ids, gc, kwargs, beams)


def test_reasons_to_run_every_row(monkeypatch):
    model = make_model("llama", seed=1)
    seqfuse.optimize(model, fused_layers=True)
    try:
        ids = torch.randint(3, 100, (2, 6)).repeat_interleave(3, dim=0)
        mask = torch.ones_like(ids)
        assert _why(model, ids, mask, 3) is None
        other = ids.clone()
        other[1, 0] += 1  # beam 1 of sentence 0 starts elsewhere
        assert "different rows" in _why(model, other, mask, 3)
        assert "generate arguments" in _why(model, ids, mask, 3, inputs_embeds=torch.zeros(6, 6, 8))
        assert "one beam" in _why(model, ids, mask, 1)
        monkeypatch.setenv("SEQFUSE_HF_SHARED_PREFILL", "0")
        assert "SEQFUSE_HF_SHARED_PREFILL=0" in _why(model, ids, mask, 3)
    finally:
        hf.restore(model)
    seqfuse.optimize(model)  # exact mode
    try:
        monkeypatch.delenv("SEQFUSE_HF_SHARED_PREFILL")
        assert "fused_layers=False" in _why(model, ids, mask, 3)
    finally:
        hf.restore(model)
    enc_dec = make_model("bart", seed=1)
    seqfuse.optimize(enc_dec, fused_layers=True)
    try:
        from transformers.modeling_outputs import BaseModelOutput

        start = torch.full((6, 1), 2)
        enc = torch.randn(2, 5, enc_dec.config.d_model).repeat_interleave(3, dim=0)
        src_mask = torch.ones(6, 5, dtype=torch.long)
        plain = BaseModelOutput(last_hidden_state=enc)
        assert _why(enc_dec, start, src_mask, 3, encoder_outputs=plain) is None
        states = BaseModelOutput(last_hidden_state=enc, hidden_states=(enc, enc))
        assert "more than its last hidden state" in _why(
            enc_dec, start, src_mask, 3, encoder_outputs=states
        )
        other = enc.clone()
        other[4] += 1  # beam 1 of sentence 1 attends to another encoder output
        assert "different rows" in _why(
            enc_dec, start, src_mask, 3, encoder_outputs=BaseModelOutput(last_hidden_state=other)
        )
    finally:
        hf.restore(enc_dec)
