"""``seqfuse.optimize(model, fused_layers=True)``: linear layers on the packed
GEMM. Not bit for bit: the same tokens as stock's generate on these models,
scores and hidden states within 1e-5; stock runs in the same test."""

from __future__ import annotations

import pytest
import torch
from hf_models import clear_seqfuse_env, make_inputs, make_model, needs_packed_gemm

import seqfuse
from integrations import hf, hf_direct, hf_exact_step, hf_fused
from seqfuse.ops import linear as packed_linear

pytestmark = needs_packed_gemm()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clear_seqfuse_env(monkeypatch)


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("kind", ["marian", "bart", "mbart", "t5", "gpt2"])
def test_generate_same_tokens_scores_close(kind):
    model = make_model(kind, seed=1)
    ids, mask = make_inputs(kind, model, batch=4, seed=1)
    kw = dict(num_beams=4, max_new_tokens=12, attention_mask=mask)
    stock = _generate(model, ids, **kw)
    seqfuse.optimize(model, fused_layers=True)
    one_call = True  # every kind here has a one-call step, on packed GEMMs
    for k in hf_exact_step.STATS:
        hf_exact_step.STATS[k] = 0
    try:
        assert hf_fused.enabled(model)
        if kind == "gpt2":
            assert getattr(model.transformer, "_seqfuse_hf_gpt2_exact", False)
            assert type(model.transformer.h[0].attn.c_attn).__name__ == "PackedConv1D"
        elif kind == "t5":
            assert getattr(model.decoder, "_seqfuse_hf_t5_exact", False)
            assert type(model.decoder.block[0].layer[0].SelfAttention.q).__name__ == "PackedLinear"
        else:
            assert getattr(model.get_decoder(), "_seqfuse_hf_exact", False) == one_call
        ours = _generate(model, ids, **kw)
        # scores come with output_scores (their search steps are stock's;
        # the network is the fused one)
        scored = _generate(model, ids, output_scores=True, **kw)
    finally:
        hf.restore(model)
    assert not hf_fused.enabled(model)
    from seqfuse.ops import linear as packed_linear

    assert (id(model.lm_head.weight), False) not in packed_linear._PACKS  # restore freed it
    assert (hf_exact_step.STATS["exact"] > 0) == one_call
    if kind == "gpt2":  # its projections are transformers' Conv1D
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.equal(stock.sequences, ours.sequences)
    stock_scored = _generate(model, ids, output_scores=True, **kw)
    assert stock_scored.sequences_scores is not None
    assert torch.equal(stock_scored.sequences, scored.sequences)
    torch.testing.assert_close(
        scored.sequences_scores, stock_scored.sequences_scores, atol=1e-5, rtol=1e-5
    )


def _bert():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=97,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
    )
    return tf.BertModel(cfg).eval()


def test_encoder_only_forward(caplog):
    model = _bert()
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(ids).last_hidden_state
    out = seqfuse.optimize(model, fused_layers=True)
    assert out is model and hf_fused.enabled(model)
    assert not [r for r in caplog.records if "encoder-only" in r.getMessage()]
    with torch.no_grad():
        ours = model(ids).last_hidden_state
    assert not torch.equal(stock, ours)  # the packed GEMM really ran
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    hf.restore(model)
    assert not hf_fused.enabled(model)


def test_training_and_autograd_use_torch():
    model = _bert().train()
    seqfuse.optimize(model, fused_layers=True)
    ids = torch.randint(0, 97, (2, 7))
    loss = model(ids).last_hidden_state.square().mean()
    loss.backward()
    assert model.encoder.layer[0].attention.self.query.weight.grad is not None
    hf.restore(model)


def test_env_and_disable(monkeypatch):
    monkeypatch.setenv("SEQFUSE_FUSED_LAYERS", "1")
    model = make_model("bart", seed=0)
    seqfuse.optimize(model)
    assert hf_fused.enabled(model)
    hf.restore(model)
    monkeypatch.setenv("SEQFUSE_DISABLE", "1")
    seqfuse.optimize(model)
    assert not hf_fused.enabled(model)
    assert hf_exact_step.problem(model) is None  # (the step itself would be possible)
    assert not getattr(model.get_decoder(), "_seqfuse_hf_exact", False)
    hf.restore(model)


def test_one_call_step_runs_the_packed_gemm(monkeypatch):
    """In the fused mode the C++ decoder step calls the packed GEMM itself:
    the profiler sees more packed products than PackedLinear.forward calls."""
    from torch.profiler import ProfilerActivity, profile

    model = make_model("bart", seed=3)
    ids, mask = make_inputs("bart", model, batch=2, seed=3)
    calls = [0]
    forward = hf_fused.PackedLinear.forward

    def counting(self, x):
        calls[0] += 1
        return forward(self, x)

    monkeypatch.setattr(hf_fused.PackedLinear, "forward", counting)
    seqfuse.optimize(model, fused_layers=True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _generate(model, ids, num_beams=2, max_new_tokens=6, min_new_tokens=6)
    finally:
        hf.restore(model)
    packed = sum(e.count for e in prof.key_averages() if e.key == "seqfuse::linear_packed")
    assert hf_exact_step.STATS["exact"] > 0
    assert packed > calls[0] > 0


# The one-call step op of each kind, and the feed-forward modules
# (first, second product) of each decoder layer.
_STEP_OPS = {
    "fsmt": "hf_fsmt_stack_step",
    "marian": "hf_decoder_stack_step",
    "t5": "hf_t5_stack_step",
    "gpt2": "hf_gpt2_stack_step",
}


def _ffn_pairs(kind, model):
    if kind == "t5":
        return [
            (b.layer[2].DenseReluDense.wi, b.layer[2].DenseReluDense.wo)
            for b in model.decoder.block
        ]
    if kind == "gpt2":
        return [(b.mlp.c_fc, b.mlp.c_proj) for b in model.transformer.h]
    return [(lay.fc1, lay.fc2) for lay in model.model.decoder.layers]


def _kept(kind, model):
    """(the layer list a one-call step keeps its weights on, the second
    feed-forward product's slot, slots per layer, whether transposed)."""
    if kind == "t5":
        return model.decoder.block, 8, 9, False
    if kind == "gpt2":
        return model.transformer.h, 3, 4, True
    return model.model.decoder.layers, 7, 8, False


def _relu_model(kind, act):
    """A model whose decoder feed-forward runs ``act``, its first product's
    bias lowered so that most activations after a ReLU are zeros (as in
    trained models; random ones give about half)."""
    from transformers.activations import ACT2FN

    model = make_model(kind, seed=3)
    if kind in ("fsmt", "marian"):
        for lay in model.model.decoder.layers:
            lay.activation_fn = ACT2FN[act]
    elif kind == "t5":
        for b in model.decoder.block:
            b.layer[2].DenseReluDense.act = ACT2FN[act]
    else:
        for b in model.transformer.h:
            b.mlp.act = ACT2FN[act]
    with torch.no_grad():
        for first, _ in _ffn_pairs(kind, model):
            if first.bias is not None:
                first.bias.sub_(3 * first.weight.std() * first.weight.size(-1) ** 0.5)
    return model


@pytest.mark.parametrize("kind,act", [("fsmt", "relu"), ("marian", "relu"), ("t5", "relu"),
                                      ("gpt2", "relu"), ("marian", "gelu")])  # fmt: skip
def test_one_call_steps_skip_zeros_after_relu_with_finite_weights(monkeypatch, kind, act):
    """The fused mode's one-call steps let the second feed-forward product skip
    zero inputs after a ReLU where every such weight is finite (the same bits
    as the dense product); after any other activation, and with an inf in
    one of those weights, the product is dense."""
    model = _relu_model(kind, act)
    ids, mask = make_inputs(kind, model, batch=3, seed=4)
    kw = dict(num_beams=4, max_new_tokens=10, attention_mask=mask, output_scores=True)
    stock = _generate(model, ids, **kw)
    name = _STEP_OPS[kind]
    real = getattr(torch.ops.seqfuse, name)
    flags: list = []

    def spy(*args):
        flags.append(args[-3])  # skip_zeros (then the K/V rooms)
        assert isinstance(args[-3], bool)
        return real(*args)

    monkeypatch.setattr(torch.ops.seqfuse, name, spy)
    seqfuse.optimize(model, fused_layers=True)
    try:
        skipping = _generate(model, ids, **kw)
        asked, flags[:] = list(flags), []
        with monkeypatch.context() as m:
            m.setattr(hf_exact_step, "skips_zeros", lambda *a, **k: False)
            dense = _generate(model, ids, **kw)
        assert flags and not any(flags)
        # the test on the weights the step keeps: finite, then one inf
        owner, slot, per, transposed = _kept(kind, model)
        present, weights = owner.__dict__["_seqfuse_gemm_weights"][1]

        def finite():
            flags = packed_linear.packs_and_finite(weights, transposed)[1]
            return hf_exact_step.by_slot(present, flags, True)

        assert hf_exact_step.skips_zeros(finite(), slot, per)
        with torch.no_grad():
            _ffn_pairs(kind, model)[-1][1].weight[0, 0] = float("inf")
        assert not hf_exact_step.skips_zeros(finite(), slot, per)
    finally:
        hf.restore(model)
    assert asked and all(f == (act == "relu") for f in asked)
    # skipping gives the dense product's bits, and stock's tokens
    assert torch.equal(skipping.sequences, dense.sequences)
    assert torch.equal(skipping.sequences_scores, dense.sequences_scores)
    for a, b in zip(skipping.scores, dense.scores):
        assert torch.equal(a, b)
    assert torch.equal(skipping.sequences, stock.sequences)


@pytest.mark.parametrize("kind", ["marian", "bart", "t5", "gpt2", "fsmt", "llama"])
def test_direct_steps_hand_the_lm_heads_maxima_to_the_top_k(monkeypatch, kind):
    """A direct step's LM head (with Marian's and BART's final logits bias in
    its epilogue) notes the logits' group maxima, which the fused top-k and
    its checks read instead of passing over the logits: the same candidates
    at every step, bit for bit, as the search without them, and stock's
    tokens."""
    model = make_model(kind, seed=7)
    if getattr(model, "final_logits_bias", None) is not None:
        # the head's bias moved to the model's own (a head with both adds
        # twice, which the GEMM's epilogue cannot, and notes no maxima)
        head = model.get_output_embeddings()
        with torch.no_grad():
            model.final_logits_bias.copy_(head.bias + torch.randn(head.bias.shape) * 0.5)
        head.register_parameter("bias", None)
    ids, mask = make_inputs(kind, model, batch=3, seed=8)
    kw = dict(num_beams=4, max_new_tokens=10, attention_mask=mask)
    stock = _generate(model, ids, **kw)
    real = hf._fused_topk
    picks: list = []

    def recorded(*args):
        out = real(*args)
        picks.append(out)
        return out

    monkeypatch.setattr(hf, "_fused_topk", recorded)
    seqfuse.optimize(model, fused_layers=True)
    try:
        hf.STATS["maxima_steps"] = hf_direct.STATS["direct"] = 0
        with_maxima = _generate(model, ids, **kw)
        used, direct, first = hf.STATS["maxima_steps"], hf_direct.STATS["direct"], list(picks)
        picks.clear()
        with monkeypatch.context() as m:
            m.setattr(hf_direct, "logit_maxima", lambda logits: None)
            without = _generate(model, ids, **kw)
    finally:
        hf.restore(model)
    # (direct steps: every kind under the transformers verified for all, the
    # encoder-decoders but FSMT's under the other)
    assert direct > 0 or kind in ("gpt2", "fsmt", "llama")
    assert (used > 0) == (direct > 0)
    # every step's candidates (scores, tokens, beams) the same bits
    assert len(first) == len(picks)
    for a, b in zip(first, picks):
        assert (a is None) == (b is None)
        for x, y in zip(a or (), b or ()):
            assert torch.equal(x, y)
    assert torch.equal(with_maxima.sequences, without.sequences)
    assert torch.equal(with_maxima.sequences, stock.sequences)


def test_lm_logits_are_the_heads_bits_and_their_maxima_taken_once():
    """``_lm_logits`` gives ``head(h) + extra_bias`` bit for bit (a finite
    weight, one with an inf, a head with its own bias and an extra one);
    ``logit_maxima`` hands the maxima to a view of those logits once, and
    not after they change in place or to other logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 70, bias=False)
    hf_fused.enable(head)
    h = torch.randn(5, 1, 16)
    extra = torch.randn(1, 70)
    with torch.no_grad():
        for bias in (None, extra):
            ref = head(h) if bias is None else head(h) + bias
            got = hf_direct._lm_logits(head, h, bias)
            assert torch.equal(got, ref)
            logits = got[:, -1, :]
            maxima = hf_direct.logit_maxima(logits)
            groups = torch.nn.functional.pad(logits, (0, 96 - 70), value=float("-inf"))
            assert torch.equal(maxima, groups.view(5, 3, 32).amax(-1))
            assert hf_direct.logit_maxima(logits) is None  # taken
        hf_direct._lm_logits(head, h)
        assert hf_direct.logit_maxima(torch.zeros(5, 70)) is None  # other logits
        logits = hf_direct._lm_logits(head, h)[:, -1, :]
        logits[0, 0] = 1.0
        assert hf_direct.logit_maxima(logits) is None  # changed since
        head.weight[3, 2] = float("inf")
        got = hf_direct._lm_logits(head, h, extra)
        assert torch.equal(got.isnan(), (head(h) + extra).isnan())
        torch.testing.assert_close(got, head(h) + extra, rtol=0, atol=0, equal_nan=True)
        biased = torch.nn.Linear(16, 70)
        hf_fused.enable(biased)
        ref = biased(h) + extra  # (two adds: no maxima)
        assert torch.equal(hf_direct._lm_logits(biased, h, extra), ref)
        assert hf_direct.logit_maxima(ref[:, -1, :]) is None


@pytest.mark.parametrize("poison", ["nan", "+inf", "-inf row", "none"])
def test_fused_topk_checks_read_the_maxima_as_the_logits(poison):
    """The fused top-k's checks over the group maxima decline the same steps
    as over the logits (a row with a NaN, a +inf, or all -inf) and give the
    same candidates otherwise."""
    torch.manual_seed(1)
    beams, vocab = 3, 101
    logits = torch.randn(2 * beams, vocab)
    if poison == "nan":
        logits[4, 57] = float("nan")
    elif poison == "+inf":
        logits[1, 100] = float("inf")
    elif poison == "-inf row":
        logits[2] = float("-inf")
    cum = torch.randn(2, beams)
    padded = torch.nn.functional.pad(logits, (0, 128 - vocab), value=float("-inf"))
    groups = padded.view(2 * beams, 4, 32)
    maxima = torch.where(groups.isnan().any(-1), float("nan"), groups.amax(-1)).contiguous()
    plain = hf._fused_topk(logits, cum, None, beams, 2 * beams)
    read = hf._fused_topk(logits, cum, None, beams, 2 * beams, maxima)
    if poison == "none":
        assert plain is not None and read is not None
        for a, b in zip(plain, read):
            assert torch.equal(a, b)
    else:
        assert plain is None and read is None


def _cache_tensors(out) -> list:
    cache = out.past_key_values
    dyn = hf_exact_step.self_cache(cache)
    assert dyn is not None
    assert hf_exact_step.ROOMS not in dyn.__dict__  # dropped when the search ended
    return [t for lay in dyn.layers for t in (lay.keys, lay.values)]


@pytest.mark.parametrize("kind", ["marian", "fsmt", "t5", "gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 4])
def test_kv_rooms_give_the_cats_bits(monkeypatch, kind, beams):
    """The fused greedy steps' self-attention K/V appended in place into
    buffers with room give the same bits as transformers' cat (the sequences;
    stock's tokens); beam search, whose steps reorder, keeps its gather and
    append (the same scores and cache either way)."""
    model = make_model(kind, seed=11)
    ids, mask = make_inputs(kind, model, batch=3, seed=12)
    kw = dict(num_beams=beams, min_new_tokens=12, max_new_tokens=24, attention_mask=mask)

    def generate():
        with torch.no_grad():
            if beams == 1:  # (greedy search with return_dict runs transformers' loop)
                return model.generate(ids, **kw)
            return model.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)

    stock = generate()
    seqfuse.optimize(model, fused_layers=True)
    try:
        hf_exact_step.STATS["room_steps"] = 0
        with_rooms = generate()
        steps = hf_exact_step.STATS["room_steps"]
        monkeypatch.setenv(hf_exact_step.ROOMS_ENV, "0")
        without = generate()
        assert hf_exact_step.STATS["room_steps"] == steps  # off: the cat
    finally:
        hf.restore(model)
    assert (steps > 0) == (beams == 1)
    if beams == 1:
        assert torch.equal(with_rooms, without)
        assert torch.equal(with_rooms, stock)
        return
    assert torch.equal(with_rooms.sequences, without.sequences)
    assert torch.equal(with_rooms.sequences, stock.sequences)
    for a, b in zip(with_rooms.scores, without.scores, strict=True):
        assert torch.equal(a, b)
    kept, cat = _cache_tensors(with_rooms), _cache_tensors(without)
    assert len(kept) == len(cat)
    for a, b in zip(kept, cat):
        assert torch.equal(a, b)


def test_kv_rooms_append_in_place():
    """A layer's step appends in place where the cache is the start of its
    buffer with a slot left (a view taken before still reads the same); a
    cache it did not make, or one past the buffer's room, gets a new buffer;
    an unarmed cache, the exact mode, or a waiting reorder gets none."""
    from types import SimpleNamespace

    layer = SimpleNamespace(keys=torch.randn(2, 3, 5, 4), values=torch.randn(2, 3, 5, 4))
    dyn = SimpleNamespace(layers=[layer])
    packs = [torch.zeros(1)]
    assert hf_exact_step.kv_rooms(dyn, 1, packs, None) == ([], [])  # unarmed
    dyn.__dict__[hf_exact_step.ROOMS] = {}
    assert hf_exact_step.kv_rooms(dyn, 1, [], None) == ([], [])  # exact mode
    assert hf_exact_step.kv_rooms(dyn, 1, packs, torch.tensor([1, 1])) == ([], [])  # reorder
    (k0,), (v0,) = hf_exact_step.kv_rooms(dyn, 1, packs, None)
    assert k0.shape[:2] == (2, 3) and k0.size(2) > 5 and k0.size(3) == 4
    assert k0.untyped_storage().data_ptr() != layer.keys.untyped_storage().data_ptr()
    assert v0.untyped_storage().data_ptr() != k0.untyped_storage().data_ptr()
    layer.keys, layer.values = k0[:, :, :6], v0[:, :, :6]
    (k1,), (v1,) = hf_exact_step.kv_rooms(dyn, 1, packs, None)
    assert k1 is k0 and v1 is v0  # in place
    layer.keys = k0[:, :, : k0.size(2)]  # no slot left: a larger buffer
    (k2,), _ = hf_exact_step.kv_rooms(dyn, 1, packs, None)
    assert k2.size(2) > k0.size(2) and k2.data_ptr() != k0.data_ptr()
    layer.keys = torch.randn(2, 3, 7, 4)  # not the buffer (a stock step's cat)
    (k3,), _ = hf_exact_step.kv_rooms(dyn, 1, packs, None)
    assert k3.data_ptr() != k2.data_ptr() and k3.size(2) > 7
