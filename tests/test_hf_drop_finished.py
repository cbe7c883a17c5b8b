"""Hugging Face generate with fused layers: the rows of finished sentences
leave the batch. Stock decodes every sentence until the last one is done;
seqfuse stops decoding a sentence once nothing can change its result: in beam
search once the early-stop heuristic has closed it, in greedy search (seqfuse's
loop, Hugging Face's steps) once it has ended.
Checked against the same fused model with every row kept
(``SEQFUSE_HF_DROP_FINISHED=0``) and against stock, run in the same test: the
same tokens and beams, scores within the fused mode's 1e-5 (torch's CPU
attention rounds a row differently in a smaller batch, by about 1e-7)."""

from __future__ import annotations

import logging

import pytest
import torch
from hf_models import (
    DECODER_ONLY,
    KINDS,
    MORE_KINDS,
    clear_seqfuse_env,
    make_inputs,
    make_model,
    needs_packed_gemm,
)

import seqfuse
from integrations import hf

pytestmark = needs_packed_gemm()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clear_seqfuse_env(monkeypatch)


def _run(model, ids, monkeypatch, drop: bool, **kw):
    monkeypatch.setenv(hf.DROP_FINISHED_ENV, "1" if drop else "0")
    hf.STATS["sentences_dropped"] = 0
    with torch.no_grad():
        out = model.generate(ids, **kw)
    return out, hf.STATS["sentences_dropped"]


def _three_ways(model, ids, monkeypatch, **kw):
    """(stock, fused with every row kept, fused with finished sentences
    dropped, how many were dropped) on the same model."""
    with torch.no_grad():
        stock = model.generate(ids, **kw)
    seqfuse.optimize(model, fused_layers=True)
    try:
        kept, n_kept = _run(model, ids, monkeypatch, drop=False, **kw)
        ours, n = _run(model, ids, monkeypatch, drop=True, **kw)
    finally:
        hf.restore(model)
    assert n_kept == 0
    return stock, kept, ours, n


def _check_outputs(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.beam_indices, b.beam_indices)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beams", [4, 1], ids=["beam", "greedy"])
@pytest.mark.parametrize("kind", KINDS + MORE_KINDS)
def test_same_as_every_row_kept_and_stock_tokens(kind, beams, monkeypatch, caplog):
    dropped_any = 0
    for seed in (0, 1, 2):
        model = make_model(kind, seed=seed)
        ids, mask = make_inputs(kind, model, batch=8, seed=seed, src_len=10)
        kw = dict(attention_mask=mask, num_beams=beams, max_new_tokens=24)
        with caplog.at_level(logging.WARNING, logger="seqfuse.hf"):
            caplog.clear()
            stock, kept, ours, n = _three_ways(model, ids, monkeypatch, **kw)
        assert not caplog.records  # seqfuse's loops ran: no fallback line
        dropped_any += n
        assert torch.equal(ours, kept)
        assert torch.equal(ours, stock)  # these models' fused logits keep stock's tokens
    assert dropped_any > 0


@pytest.mark.parametrize(
    "opts",
    [
        dict(early_stopping=True),
        dict(early_stopping="never", length_penalty=-1.0),
        dict(early_stopping=False, length_penalty=-1.0),
        dict(length_penalty=0.0, num_return_sequences=3),
        dict(min_new_tokens=3, bad_words_ids=[[5]]),
        dict(no_repeat_ngram_size=2),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("kind", ["marian", "gpt2"])
def test_scores_and_beam_indices(kind, opts, monkeypatch):
    """sequences_scores and beam_indices come only with return_dict_in_generate,
    where the rows are kept (the returned cache covers every sentence): the
    test lets them drop there to compare what the search returns."""
    real = hf._why_not_drop_finished
    monkeypatch.setattr(hf, "_why_not_drop_finished", lambda m, rd, *a: real(m, False, *a))
    dropped = 0
    for seed in (0, 2):
        model = make_model(kind, seed=seed)
        ids, mask = make_inputs(kind, model, batch=7, seed=seed + 1)
        kw = dict(attention_mask=mask, num_beams=4, max_new_tokens=16, **opts)
        kw.update(return_dict_in_generate=True, output_scores=True)
        stock, kept, ours, n = _three_ways(model, ids, monkeypatch, **kw)
        dropped += n
        _check_outputs(kept, ours)
        _check_outputs(stock, ours)
    assert dropped > 0


def test_rows_kept(monkeypatch, caplog):
    """The exact mode, a logits processor with state sized by the batch (the
    repetition penalty's per-row prompt length) and return_dict_in_generate
    keep every row."""
    model = make_model("bart", seed=0)
    ids, mask = make_inputs("bart", model, batch=8, seed=0)
    kw = dict(attention_mask=mask, num_beams=4, max_new_tokens=20)
    cases = [
        (False, {}, "exact mode"),
        (True, dict(repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
        (True, dict(return_dict_in_generate=True), "return_dict_in_generate"),
    ]
    for fused, extra, reason in cases:
        hf._noted.clear()  # the line is written once per reason
        seqfuse.optimize(model, fused_layers=fused)
        try:
            with caplog.at_level(logging.DEBUG, logger="seqfuse.hf"):
                caplog.clear()
                _, n = _run(model, ids, monkeypatch, drop=True, **kw, **extra)
                _run(model, ids, monkeypatch, drop=True, **kw, **extra)
        finally:
            hf.restore(model)
        assert n == 0
        assert caplog.text.count(reason) == 1, caplog.text


def test_decoder_only_masks_and_positions_follow(monkeypatch):
    """Left-padded prompts: the attention mask and position ids of the kept
    rows go with them (a wrong selection changes the tokens)."""
    kind = DECODER_ONLY[0]
    model = make_model(kind, seed=2)
    ids, mask = make_inputs(kind, model, batch=9, seed=5, src_len=12)
    kw = dict(attention_mask=mask, num_beams=3, max_new_tokens=24)
    stock, kept, ours, n = _three_ways(model, ids, monkeypatch, **kw)
    assert n > 0
    assert torch.equal(kept, ours)
    assert torch.equal(stock, ours)


@pytest.fixture(params=["op", "aten"])
def keep_form(request, monkeypatch):
    """_sentences_to_keep through the C++ op, and through its ATen form."""
    if request.param == "op":
        if hf._KEEP_OP[0] is None:
            pytest.skip("the extension has no hf_sentences_to_keep")
    else:
        monkeypatch.setattr(hf, "_KEEP_OP", [None])
    return request.param


def test_sentences_to_keep_rules(keep_form):
    unsat = torch.tensor([[False], [False], [False], [False], [False], [True]])
    finished = torch.ones(6, 3, dtype=torch.bool)
    finished[1, 2] = False  # a slot still open
    scores = torch.tensor(
        [
            [-1.0, -2.0, -3.0],  # closed: leaves
            [-1.0, -2.0, -3.0],
            [-1.0, -1.0, -3.0],  # a tie topk could reorder
            [-1.0, -2.0, -2e9],  # a slot near the penalties
            [-1.0, -2.0, float("nan")],
            [-1.0, -2.0, -3.0],  # heuristic still open
        ]
    )
    keep = hf._sentences_to_keep(unsat, finished, scores)
    assert keep.tolist() == [1, 2, 3, 4, 5]
    assert hf._sentences_to_keep(unsat[1:], finished[1:], scores[1:]) is None
    # the -1e8 bound is strict; one beam has no order to check
    edge = torch.tensor([[-1e8], [-99999992.0], [float("inf")], [float("-inf")], [0.0]])
    keep = hf._sentences_to_keep(
        torch.zeros(5, 1, dtype=torch.bool), torch.ones(5, 1, dtype=torch.bool), edge
    )
    assert keep.tolist() == [0, 2, 3]


def _keep_aten(unsat, finished, scores):
    """The ATen form, whatever _KEEP_OP holds."""
    saved = hf._KEEP_OP[0]
    hf._KEEP_OP[0] = None
    try:
        return hf._sentences_to_keep(unsat, finished, scores)
    finally:
        hf._KEEP_OP[0] = saved


@pytest.mark.parametrize("seed", range(4))
def test_sentences_to_keep_op_matches_aten_form(seed):
    """The C++ op against the ATen form on random states full of the edge
    cases: ties, NaN, infinities, the -1e8 bound, open slots and heuristics."""
    if hf._KEEP_OP[0] is None:
        pytest.skip("the extension has no hf_sentences_to_keep")
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(
        [float("nan"), float("inf"), float("-inf"), -1e8, -99999992.0, -1e9, -1.5]
    )
    for beams in (1, 2, 5):
        for sents in (1, 3, 17):
            for _ in range(20):
                scores = -torch.rand(sents, beams, generator=g).cumsum(1)
                pick = torch.rand(sents, beams, generator=g) < 0.15
                idx = torch.randint(0, len(special), (sents, beams), generator=g)
                scores = torch.where(pick, special[idx], scores)
                if beams > 1:  # ties between neighbours
                    tie = torch.rand(sents, generator=g) < 0.2
                    scores[tie, 1] = scores[tie, 0]
                finished = torch.rand(sents, beams, generator=g) < 0.9
                unsat = torch.rand(sents, 1, generator=g) < 0.2
                want = _keep_aten(unsat, finished, scores)
                got = hf._sentences_to_keep(unsat, finished, scores)
                assert (want is None) == (got is None), (scores, finished, unsat)
                if want is not None:
                    assert torch.equal(want, got)


# ------------------------------------------------------------ greedy search
def _greedy(model, ids, monkeypatch, drop: bool | None = None, **kw):
    if drop is not None:
        monkeypatch.setenv(hf.DROP_FINISHED_ENV, "1" if drop else "0")
    hf.STATS["sentences_dropped"] = 0
    with torch.no_grad():
        out = model.generate(ids, num_beams=1, do_sample=False, **kw)
    return out, hf.STATS["sentences_dropped"]


def _stock_and_fused(model, ids, monkeypatch, **kw):
    """(stock's sequences, the fused model's with finished sequences dropped,
    how many were dropped)."""
    stock, _ = _greedy(model, ids, monkeypatch, **kw)
    seqfuse.optimize(model, fused_layers=True)
    try:
        ours, n = _greedy(model, ids, monkeypatch, drop=True, **kw)
    finally:
        hf.restore(model)
    return stock, ours, n


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
    stock, ours, n = _stock_and_fused(model, ids, monkeypatch, **kw)
    assert n > 0
    assert torch.equal(stock, ours)


def test_decoder_only_left_padding(monkeypatch):
    kind = DECODER_ONLY[0]
    model = make_model(kind, seed=0)
    ids, mask = make_inputs(kind, model, batch=9, seed=2, src_len=12)
    kw = dict(attention_mask=mask, max_new_tokens=30)
    stock, ours, n = _stock_and_fused(model, ids, monkeypatch, **kw)
    assert n > 0
    assert torch.equal(stock, ours)


def test_hugging_faces_loop_elsewhere(monkeypatch, caplog):
    """The exact mode without direct steps, sampling, return_dict_in_generate and processors with
    state sized by the batch or indexed by sentence (prefix_allowed_tokens_fn
    is given the sentence's index; the repetition penalty can hold a per-row
    prompt length) run Hugging Face's own loop, with one line naming the
    reason."""
    model = make_model("bart", seed=0)
    ids, mask = make_inputs("bart", model, batch=4, seed=0)
    kw = dict(attention_mask=mask, max_new_tokens=10)
    cases = [
        (False, {}, "greedy search"),  # (with the direct steps off, below)
        (True, dict(do_sample=True), "sampling"),
        (True, dict(return_dict_in_generate=True), "return_dict_in_generate"),
        (True, dict(prefix_allowed_tokens_fn=lambda b, s: list(range(50))), "Prefix"),
        (True, dict(repetition_penalty=1.3), "RepetitionPenalty"),
    ]
    from integrations import hf_direct

    for fused, extra, reason in cases:
        # the exact mode's greedy search runs seqfuse's loop where the steps
        # can be direct (tests/test_hf_direct.py): here they cannot
        if fused:
            monkeypatch.delenv(hf_direct.DIRECT_ENV, raising=False)
        else:
            monkeypatch.setenv(hf_direct.DIRECT_ENV, "0")
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
