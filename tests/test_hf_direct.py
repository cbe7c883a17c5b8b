"""Decoding steps without transformers' forward wrappers (integrations.hf_direct)
for Marian, BART, mBART, FSMT, T5, GPT-2, Llama, Qwen2 and Mistral: the same tensors as the model's own forward,
held to stock transformers' generate run in the same test (bit for bit in
the exact mode, step by step; within 1e-5 in the fused mode), and the
model's forward wherever the direct step cannot reproduce it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import clear_seqfuse_env, make_inputs, make_model  # noqa: E402
from test_hf import assert_same, generate, stock_then_seqfuse  # noqa: E402

import seqfuse  # noqa: E402
from integrations import hf, hf_direct  # noqa: E402
from seqfuse import _ext  # noqa: E402

pytestmark = pytest.mark.skipif(_ext._C is None, reason="needs the compiled extension")

FAMILIES = ("marian", "bart", "mbart", "t5", "gpt2", "llama", "qwen2")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    clear_seqfuse_env(monkeypatch)
    hf._warned.clear()
    hf_direct._CAUSAL_NONE.clear()
    for stats in (hf.STATS, hf_direct.STATS):
        for k in stats:
            stats[k] = 0
    yield


def _direct_expected(kind, model=None) -> bool:
    """Whether this transformers' code is the verified one for ``kind``
    (FSMT's and the decoder-only models' are 5.23's only; under 5.17 they run
    the forward)."""
    model = make_model(kind, seed=0) if model is None else model
    seqfuse.optimize(model)
    try:
        why = hf_direct.problem(model)
    finally:
        hf.restore(model)
    if why is not None:
        assert "is not the verified one" in why, why
        assert kind in ("gpt2", "llama", "qwen2", "mistral", "fsmt"), why
    return why is None


def _check_direct_ran(kind, model=None):
    if _direct_expected(kind, model):
        assert hf_direct.STATS["direct"] > 0, "no direct step ran"
    else:
        assert hf_direct.STATS["direct"] == 0


@pytest.mark.parametrize("num_beams", (1, 3, 5))
@pytest.mark.parametrize("kind", FAMILIES)
def test_exact_mode_steps_are_stock_bit_for_bit(kind, num_beams):
    model = make_model(kind, seed=4)
    ids, mask = make_inputs(kind, model, batch=5, seed=4)
    kw = dict(num_beams=num_beams, max_new_tokens=18, attention_mask=mask)
    if num_beams > 1:
        kw.update(return_dict_in_generate=True, output_scores=True)
    stock, ours = stock_then_seqfuse(model, ids, **kw)
    assert_same(stock, ours, f"{kind} beams={num_beams}")
    if num_beams > 1:  # (greedy search with the exact layers stays stock's loop)
        _check_direct_ran(kind)


@pytest.mark.parametrize("kind", FAMILIES)
def test_fused_mode_steps_match_stock(kind):
    from hf_models import needs_packed_gemm

    if needs_packed_gemm().args[0]:
        pytest.skip(needs_packed_gemm().kwargs["reason"])
    model = make_model(kind, seed=5)
    ids, mask = make_inputs(kind, model, batch=6, seed=5)
    kw = dict(
        num_beams=4,
        max_new_tokens=18,
        attention_mask=mask,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.no_grad():
        stock = model.generate(ids, **kw)
        seqfuse.optimize(model, fused_layers=True)
        try:
            ours = model.generate(ids, **kw)
        finally:
            hf.restore(model)
    _check_direct_ran(kind)
    assert torch.equal(stock.sequences, ours.sequences)
    torch.testing.assert_close(ours.sequences_scores, stock.sequences_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", FAMILIES)
def test_exact_greedy_search_runs_direct_steps(kind, caplog):
    """Greedy search in the exact mode runs seqfuse's greedy loop (every row
    kept) with direct steps where the model takes them: stock's sequences, no
    fallback line; with the direct steps off, Hugging Face's loop and its line."""
    import logging

    model = make_model(kind, seed=14)
    ids, mask = make_inputs(kind, model, batch=6, seed=14)
    kw = dict(
        num_beams=1, do_sample=False, max_new_tokens=16, min_new_tokens=3, attention_mask=mask
    )
    stock = _generate(model, ids, **kw)
    seqfuse.optimize(model)
    try:
        expected = hf_direct.problem(model) is None
        hf._warned.clear()
        with caplog.at_level(logging.WARNING, logger="seqfuse.hf"):
            caplog.clear()
            ours = _generate(model, ids, **kw)
        lines = [r.getMessage() for r in caplog.records if r.name == "seqfuse.hf"]
    finally:
        hf.restore(model)
    assert torch.equal(stock, ours)
    if expected:
        assert hf_direct.STATS["direct"] > 0 and not lines, lines
    else:  # (another transformers release's code: Hugging Face's loop)
        assert hf_direct.STATS["direct"] == 0 and "greedy search" in lines[0]


def test_exact_greedy_search_without_direct_steps_is_hugging_faces(monkeypatch, caplog):
    import logging

    monkeypatch.setenv(hf_direct.DIRECT_ENV, "0")
    model = make_model("bart", seed=15)
    ids, mask = make_inputs("bart", model, batch=4, seed=15)
    kw = dict(num_beams=1, max_new_tokens=10, attention_mask=mask)
    stock = _generate(model, ids, **kw)
    seqfuse.optimize(model)
    try:
        hf._warned.clear()
        with caplog.at_level(logging.WARNING, logger="seqfuse.hf"):
            caplog.clear()
            ours = _generate(model, ids, **kw)
    finally:
        hf.restore(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "seqfuse.hf"]
    assert torch.equal(stock, ours)
    assert len(lines) == 1 and "num_beams=1 (greedy search)" in lines[0], lines


@pytest.mark.parametrize("kind", ("gpt2", "llama", "qwen2"))
def test_decoder_only_steps_without_an_attention_mask(kind):
    """generate given no attention mask (a decoder-only model's masks then get
    None): bit for bit step by step, and the steps direct."""
    model = make_model(kind, seed=9)
    torch.manual_seed(9)
    ids = torch.randint(3, model.config.vocab_size - 2, (4, 9))
    kw = dict(num_beams=4, max_new_tokens=14, return_dict_in_generate=True, output_scores=True)
    stock, ours = stock_then_seqfuse(model, ids, **kw)
    assert_same(stock, ours, f"{kind} without a mask")
    _check_direct_ran(kind)


@pytest.mark.parametrize("fused", (False, True))
def test_mistral_steps_are_stock(fused):
    """Mistral without a sliding window (its model's one mask is then
    create_causal_mask's): bit for bit step by step in the exact mode, within
    1e-5 fused; with a sliding window the forward runs."""
    from hf_models import needs_packed_gemm
    from test_hf_llama_step import _mistral

    if fused and needs_packed_gemm().args[0]:
        pytest.skip(needs_packed_gemm().kwargs["reason"])
    model = _mistral(7)
    ids, mask = make_inputs("llama", model, batch=4, seed=7)
    kw = dict(
        num_beams=4,
        max_new_tokens=14,
        min_new_tokens=4,
        attention_mask=mask,
        return_dict_in_generate=True,
        output_scores=True,
    )
    if fused:
        stock = _generate(model, ids, **kw)
        seqfuse.optimize(model, fused_layers=True)
        try:
            ours = _generate(model, ids, **kw)
        finally:
            hf.restore(model)
        assert torch.equal(stock.sequences, ours.sequences)
        torch.testing.assert_close(ours.sequences_scores, stock.sequences_scores, rtol=0, atol=1e-5)
    else:
        stock, ours = stock_then_seqfuse(model, ids, **kw)
        assert_same(stock, ours, "mistral")
    _check_direct_ran("mistral", _mistral(7))
    sliding = _mistral(7, sliding_window=4)
    seqfuse.optimize(sliding)
    try:
        assert hf_direct.problem(sliding) is not None
    finally:
        hf.restore(sliding)


@pytest.mark.parametrize("kind", ("marian", "t5"))
def test_encoder_mask_made_once_while_the_rows_stay(kind, monkeypatch):
    """The direct steps reuse the encoder mask while its inputs are the same
    (no sentence leaves when every hypothesis runs to max_new_tokens): one
    create_bidirectional_mask call for all the steps, stock's results."""
    import transformers.masking_utils as mu

    model = make_model(kind, seed=10)
    ids, mask = make_inputs(kind, model, batch=3, seed=10)
    assert not bool(mask.all())  # (a mask with padding: not None)
    calls = []
    real = mu.create_bidirectional_mask

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    kw = dict(
        num_beams=3,
        max_new_tokens=10,
        min_new_tokens=10,
        attention_mask=mask,
        return_dict_in_generate=True,
        output_scores=True,
    )
    stock = generate(model, ids, **kw)
    monkeypatch.setattr(mu, "create_bidirectional_mask", counted)
    seqfuse.optimize(model)
    try:
        ours = generate(model, ids, **kw)
    finally:
        hf.restore(model)
    assert_same(stock, ours, kind)
    assert hf_direct.STATS["direct"] == 9
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kind, padded",
    [("marian", True), ("bart", False), ("t5", True), ("gpt2", False), ("llama", False),
     ("qwen2", False), ("gpt2", True), ("llama", True)],
)  # fmt: skip
def test_causal_mask_made_once_without_padding(kind, padded, monkeypatch):
    """A one-token step's causal mask is None at every cache length where the
    decoder's own attention mask has no padding (an encoder-decoder's decoder:
    its mask is all ones; a decoder-only prompt without padding: no mask):
    create_causal_mask runs at the first direct step only. A decoder-only
    prompt with padding gets its mask from the call at every step. Stock's
    results bit for bit either way."""
    model = make_model(kind, seed=14)
    if not _direct_expected(kind, model):
        pytest.skip("this transformers' code is not the verified one for this family")
    ids, mask = make_inputs(kind, model, batch=3, seed=14)
    if padded:
        assert not bool(mask.all())
    elif kind in ("gpt2", "llama", "qwen2"):  # prompts without padding, no mask
        torch.manual_seed(14)
        ids, mask = torch.randint(3, model.config.vocab_size - 2, (3, 9)), None
    kw = dict(num_beams=3, max_new_tokens=10, min_new_tokens=10, attention_mask=mask,
              return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert_same(*stock_then_seqfuse(model, ids, **kw), kind)
    assert hf_direct.STATS["direct"] == 9
    made = hf_direct.STATS["causal_masks"]
    assert made == (9 if padded and kind in ("gpt2", "llama") else 1)


def test_causal_mask_not_reused_past_a_patched_function(monkeypatch):
    """create_causal_mask replaced (a user's patch): called at every step."""
    import transformers.masking_utils as mu

    calls = []
    real = mu.create_causal_mask

    def patched(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mu, "create_causal_mask", patched)
    model = make_model("marian", seed=16)
    ids, mask = make_inputs("marian", model, batch=2, seed=16)
    kw = dict(num_beams=2, max_new_tokens=8, min_new_tokens=8, attention_mask=mask,
              return_dict_in_generate=True, output_scores=True)  # fmt: skip
    assert_same(*stock_then_seqfuse(model, ids, **kw), "marian, a patched create_causal_mask")
    assert hf_direct.STATS["direct"] == len(calls) == 7


def test_causal_mask_reuse_follows_its_inputs():
    """_causal_mask_call: the call skipped only after a None for the same
    config, implementation, shapes and no padding; eager attention's mask (a
    tensor) and padded masks are made at every call, equal to stock's."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask

    model = make_model("marian", seed=17)
    cfg = model.model.decoder.config
    cache = DynamicCache(config=model.config)

    def grow():
        kv = torch.zeros(3, 2, 1, 4)
        for layer in range(cfg.decoder_layers):
            cache.update(kv, kv, layer)
        return cache.get_seq_length()

    emb = torch.zeros(3, 1, 8)
    made = lambda: hf_direct.STATS["causal_masks"]  # noqa: E731
    past = grow()
    assert hf_direct._causal_mask_call(cfg, emb, None, cache, None, ones=past + 1) is None
    assert made() == 1
    for _ in range(3):
        past = grow()
        assert hf_direct._causal_mask_call(cfg, emb, None, cache, None, ones=past + 1) is None
    assert made() == 1  # reused
    hf_direct._causal_mask_call(cfg, torch.zeros(2, 1, 8), None, cache, None, ones=past + 1)
    assert made() == 2  # another batch
    padded = torch.ones(3, past + 1)
    padded[1, 0] = 0
    for _ in range(2):  # a padded mask: made every time, stock's
        m = hf_direct._causal_mask_call(cfg, emb, padded, cache, None)
        assert torch.equal(m, create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=padded,
                                                 past_key_values=cache))  # fmt: skip
    assert made() == 4
    other = make_model("marian", seed=18).model.decoder.config  # another config
    hf_direct._causal_mask_call(other, emb, None, cache, None, ones=past + 1)
    assert made() == 5
    other._attn_implementation = "eager"  # a tensor: never reused
    for _ in range(2):
        m = hf_direct._causal_mask_call(other, emb, None, cache, None, ones=past + 1)
        want = create_causal_mask(config=other, inputs_embeds=emb, attention_mask=torch.ones(3, past + 1),
                                  past_key_values=cache)  # fmt: skip
        assert isinstance(m, torch.Tensor) and torch.equal(m, want)
    assert made() == 7


@pytest.mark.parametrize("kind", ("marian", "t5", "gpt2", "llama"))
def test_one_token_causal_mask_is_none_at_every_length(kind):
    """The reuse's premise, on the verified masking code: for a one-token
    query with no padding, create_causal_mask gives None at every cache
    length (and the code is recognised under the versions tested)."""
    import transformers
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask

    if transformers.__version__ in ("5.17.0", "5.23.0"):
        assert hf_direct._masking_verified()
    model = make_model(kind, seed=0)
    decoder_only = kind in ("gpt2", "llama")
    cfg = model.config if decoder_only else model.get_decoder().config
    cache = DynamicCache(config=model.config)
    heads = 2
    for length in range(1, 40):
        kv = torch.zeros(3, heads, 1, 4)
        for layer in range(cfg.num_hidden_layers if decoder_only else cfg.decoder_layers
                           if hasattr(cfg, "decoder_layers") else cfg.num_layers):  # fmt: skip
            cache.update(kv, kv, layer)
        embeds = torch.zeros(3, 1, 8)
        ones = None if decoder_only else torch.ones(3, length + 1)
        pos = torch.full((3, 1), length) if decoder_only else None
        kwargs = {"position_ids": pos} if decoder_only else {}
        assert create_causal_mask(config=cfg, inputs_embeds=embeds, attention_mask=ones,
                                  past_key_values=cache, **kwargs) is None, length  # fmt: skip


@pytest.mark.parametrize("kind", ("marian", "t5"))
def test_direct_steps_under_inference_mode(kind):
    """generate inside torch.inference_mode (inference tensors: no version
    counters), padded sources: stock's sequences and scores bit for bit."""
    model = make_model(kind, seed=13)
    ids, mask = make_inputs(kind, model, batch=4, seed=13)
    kw = dict(
        num_beams=3,
        max_new_tokens=12,
        attention_mask=mask,
        return_dict_in_generate=True,
        output_scores=True,
    )
    with torch.inference_mode():
        stock = model.generate(ids, **kw)
        seqfuse.optimize(model)
        try:
            ours = model.generate(ids, **kw)
        finally:
            hf.restore(model)
    assert hf_direct.STATS["direct"] > 0
    assert torch.equal(stock.sequences, ours.sequences)
    assert torch.equal(stock.sequences_scores, ours.sequences_scores)
    for x, y in zip(stock.scores, ours.scores):
        assert torch.equal(x, y)


def test_encoder_mask_reuse_follows_its_inputs():
    from transformers.masking_utils import create_bidirectional_mask

    model = make_model("marian", seed=11)
    cfg = model.model.decoder.config
    enc, emb = torch.randn(4, 7, 32), torch.randn(4, 1, 32)
    m = torch.ones(4, 7, dtype=torch.long)
    m[0, :2] = 0

    def made(mask, embeds=emb, encoder=enc):
        return create_bidirectional_mask(
            config=cfg, inputs_embeds=embeds, attention_mask=mask, encoder_hidden_states=encoder
        )

    a = hf_direct._encoder_mask(cfg, emb, m, enc)
    assert torch.equal(a, made(m))
    assert hf_direct._encoder_mask(cfg, emb, m, enc) is a
    m[1, :3] = 0  # changed in place
    b = hf_direct._encoder_mask(cfg, emb, m, enc)
    assert torch.equal(b, made(m)) and not torch.equal(a, b)
    m2 = m.clone()  # another tensor: made again
    assert hf_direct._encoder_mask(cfg, emb, m2, enc) is not b
    with torch.inference_mode():  # (inference tensors keep no version counter)
        im = m2.clone()
        d = hf_direct._encoder_mask(cfg, emb, im, enc)
        assert torch.equal(d, made(m2)) and hf_direct._encoder_mask(cfg, emb, im, enc) is d
        im[2, :6] = 0  # changed in place
        assert torch.equal(hf_direct._encoder_mask(cfg, emb, im, enc), made(im))
    # two masks of the same shape and version, different values
    p, q = torch.ones(4, 7, dtype=torch.long), torch.ones(4, 7, dtype=torch.long)
    p[3, :4] = 0
    q[2, :1] = 0
    assert torch.equal(hf_direct._encoder_mask(cfg, emb, p, enc), made(p))
    assert torch.equal(hf_direct._encoder_mask(cfg, emb, q, enc), made(q))
    longer = torch.randn(4, 9, 32)  # another encoder length
    m9 = torch.ones(4, 9, dtype=torch.long)
    m9[2, :5] = 0
    assert torch.equal(hf_direct._encoder_mask(cfg, emb, m9, longer), made(m9, encoder=longer))
    # another dtype, another config
    c = hf_direct._encoder_mask(cfg, emb.double(), m9, longer.double())
    assert torch.equal(c, made(m9, emb.double(), longer.double()))
    other = make_model("marian", seed=12).model.decoder.config
    assert hf_direct._encoder_mask(other, emb.double(), m9, longer.double()) is not c


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, **kw)


def test_what_the_direct_step_cannot_reproduce_runs_the_forward(monkeypatch):
    model = make_model("marian", seed=6)
    ids, mask = make_inputs("marian", model, batch=3, seed=6)
    kw = dict(num_beams=3, max_new_tokens=10, attention_mask=mask)
    stock = _generate(model, ids, **kw)
    seqfuse.optimize(model)
    try:
        assert hf_direct.problem(model) is None
        assert torch.equal(_generate(model, ids, **kw), stock)
        assert hf_direct.STATS["direct"] > 0

        def runs_forward(**extra):
            hf_direct.STATS["direct"] = 0
            out = _generate(model, ids, **kw, **extra)
            assert hf_direct.STATS["direct"] == 0, extra
            return out

        # the switch
        monkeypatch.setenv(hf_direct.DIRECT_ENV, "0")
        assert torch.equal(runs_forward(), stock)
        monkeypatch.delenv(hf_direct.DIRECT_ENV)
        # a hook on a module the step calls: it must see its calls
        calls = []
        handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
        try:
            assert torch.equal(runs_forward(), stock)
        finally:
            handle.remove()
        assert len(calls) > 1
        # a decoder attention mask, attentions: the forward reads them
        dmask = torch.ones(ids.shape[0], 1, dtype=torch.long)
        runs_forward(decoder_attention_mask=dmask)
        runs_forward(output_attentions=True, return_dict_in_generate=True)
        # a transformers whose decoder code has another shape
        monkeypatch.setitem(hf_direct._FAMILIES["marian"], "MarianDecoder.forward", {"0" * 16})
        assert "MarianDecoder.forward" in hf_direct.problem(model)
        assert torch.equal(runs_forward(), stock)
    finally:
        hf.restore(model)


@pytest.mark.parametrize("fused", (False, True))
def test_fsmt_steps_are_stock(fused):
    """FSMT (transformers 5.23's decoder; 5.17's embeds every position so far
    and runs the model's forward): bit for bit in the exact mode (sequences,
    scores, the returned caches), the same tokens and scores within 1e-5 fused."""
    from hf_models import needs_packed_gemm
    from test_hf_fsmt_step import _assert_identical, _fsmt, _generate, _inputs

    if fused and needs_packed_gemm().args[0]:
        pytest.skip(needs_packed_gemm().kwargs["reason"])
    model = _fsmt(seed=8, layers=2)
    ids, mask = _inputs(batch=5, seed=8)
    stock = _generate(model, ids, mask)
    seqfuse.optimize(model, fused_layers=fused)
    try:
        why = hf_direct.problem(model)
        ours = _generate(model, ids, mask)
    finally:
        hf.restore(model)
    if why is not None:
        assert "FSMTDecoder.forward" in why  # (transformers 5.17)
        assert hf_direct.STATS["direct"] == 0
    else:
        assert hf_direct.STATS["direct"] > 0
    if fused:
        assert torch.equal(ours.sequences, stock.sequences)
        torch.testing.assert_close(ours.sequences_scores, stock.sequences_scores, rtol=0, atol=1e-5)
    else:
        _assert_identical(stock, ours)


def test_other_models_and_the_stock_decoder_say_why():
    pegasus = make_model("pegasus", seed=0)
    assert "not a Marian, BART, mBART, FSMT, T5, GPT-2, Llama, Qwen2" in hf_direct.problem(pegasus)
    t5 = make_model("t5", seed=0)  # not optimised: no one-call step
    assert "one-call step" in hf_direct.problem(t5)
    bart = make_model("bart", seed=0)
    # not optimised: the decoder has no one-call step
    assert "one-call step" in hf_direct.problem(bart)
