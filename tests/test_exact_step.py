"""The exact one-call decoder step against fairseq's own decoder layers.

Every comparison is bit for bit (torch.equal): the step issues stock's ATen
calls, so anything short of identical is a bug. Stock runs on a deep copy of
the same model in the same test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fairseq.models.transformer import TransformerDecoder
from fairseq.sequence_generator import SequenceGenerator as StockGenerator
from generation_utils import (
    LAYER_VARIANTS,
    assert_bit_identical_hypos,
    decoder_steps,
    load_multi30k,
    random_sample,
    random_transformer,
)

from seqfuse import _ext
from seqfuse.generation import SequenceGenerator
from seqfuse.layers import exact_step
from seqfuse.layers.exact_step import (
    disable_exact_step,
    enable_exact_step,
    exact_step_problem,
)

pytestmark = pytest.mark.skipif(_ext._C is None, reason="seqfuse._C not built")


def build(vocab=60, seed=0, **kw):
    """A random transformer with moved layer norms and biases."""
    return random_transformer(vocab, seed, perturb=True, **kw)


def pair(model):
    """(stock copy, copy with the exact step)."""
    fast = copy.deepcopy(model)
    assert enable_exact_step(fast.decoder) is None
    return model, fast


def check_stock_generator(model, d, sample, context="", **kw):
    """fairseq's generator over the stock layers vs over the exact step."""
    stock, fast = pair(model)
    assert_bit_identical_hypos(
        generate(StockGenerator, stock, d, sample, **kw),
        generate(StockGenerator, fast, d, sample, **kw),
        context,
    )


def generate(gen_cls, model, d, sample, **kw):
    gen = gen_cls([model], d, **kw)
    with torch.no_grad():
        return gen.generate([model], sample)


@pytest.mark.parametrize("route", ["plan object", "op"])
@pytest.mark.parametrize("variant", list(LAYER_VARIANTS))
@pytest.mark.parametrize("beam", [1, 3, 5])
def test_generate_bit_identical(monkeypatch, variant, beam, route):
    """Stock's generator over stock layers vs stock's and seqfuse's generators
    over the exact step: beam 1 takes the bmm cross attention, beam > 1 the
    per-sentence einsum; finished sentences shrink the batch. The step runs
    through the C++ plan object, or through the op (an extension without
    the object)."""
    if route == "op":
        build_plan = exact_step._build_exact_plan
        monkeypatch.setattr(
            exact_step, "_build_exact_plan", lambda dec: dict(build_plan(dec), native=None)
        )
    model, d = build(seed=len(variant) + beam, **LAYER_VARIANTS[variant])
    stock, fast = pair(model)
    sample = random_sample(d, bsz=6, seed=beam)
    kw = dict(beam_size=beam, max_len_b=14)
    ref = generate(StockGenerator, stock, d, sample, **kw)
    before = exact_step.STATS["exact"]
    assert_bit_identical_hypos(ref, generate(StockGenerator, fast, d, sample, **kw), variant)
    assert_bit_identical_hypos(ref, generate(SequenceGenerator, fast, d, sample, **kw), variant)
    assert exact_step.STATS["exact"] > before


def test_replaced_weight_is_followed():
    """The step's plan (and the C++ object holding the weights) is built anew
    after a weight is replaced: the next generation equals stock's with the
    new weight, not the old one's."""
    model, d = build(seed=9)
    stock, fast = pair(model)
    sample = random_sample(d, bsz=3, seed=5)
    kw = dict(beam_size=3, max_len_b=10)
    first = generate(SequenceGenerator, fast, d, sample, **kw)
    assert_bit_identical_hypos(generate(StockGenerator, stock, d, sample, **kw), first, "before")
    g = torch.Generator().manual_seed(1)
    new = torch.randn(fast.decoder.layers[-1].fc2.weight.shape, generator=g)
    for m in (stock, fast):
        m.decoder.layers[-1].fc2.weight = torch.nn.Parameter(new.clone())
    again = generate(SequenceGenerator, fast, d, sample, **kw)
    assert_bit_identical_hypos(generate(StockGenerator, stock, d, sample, **kw), again, "after")
    assert any(
        not torch.equal(a[0]["tokens"], b[0]["tokens"]) for a, b in zip(first, again)
    ) or any(a[0]["score"] != b[0]["score"] for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bit_identical(dtype):
    model, d = build(seed=3)
    sample = random_sample(d, bsz=4, seed=1)
    check_stock_generator(model.to(dtype), d, sample, str(dtype), beam_size=4, max_len_b=10)


def test_decoder_steps_with_reorders_and_shrinking():
    """Decoder-level: logits, alignment attention and every inner state, step
    by step, through beam reorders and a batch that shrinks."""
    model, d = build(seed=7, layers=3)
    stock, fast = pair(model)
    sample = random_sample(d, bsz=3, seed=2)
    rows = 3 * 4  # 3 sentences x beam 4
    for dec in (stock.decoder, fast.decoder):
        dec.set_beam_size(4)
    with torch.no_grad():
        enc = stock.encoder(**sample["net_input"])
        order = torch.arange(3).repeat_interleave(4)
        enc = stock.encoder.reorder_encoder_out(enc, order)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, len(d), (rows, 8), generator=g)
    tokens[:, 0] = d.eos()
    orders = {
        3: torch.tensor([1, 1, 0, 2, 4, 4, 7, 5, 8, 8, 8, 9]),  # reorder within sentences
        5: torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]),  # sentence 0 finished: shrink
    }
    ref = decoder_steps(stock.decoder, enc, tokens, orders)
    before = dict(exact_step.STATS)
    got = decoder_steps(fast.decoder, enc, tokens, orders)
    assert exact_step.STATS["exact"] - before["exact"] == tokens.size(1) - 1  # all but the first
    for t, ((x0, a0, s0), (x1, a1, s1)) in enumerate(zip(ref, got)):
        assert torch.equal(x0, x1), f"logits, step {t}"
        assert torch.equal(a0, a1), f"attention, step {t}"
        assert len(s0) == len(s1)
        for i, (u, v) in enumerate(zip(s0, s1)):
            assert torch.equal(u, v), f"inner state {i}, step {t}"


def _steps_with_reorders(decoder, enc, tokens, plan, pad_at=None, strided=False):
    """Incremental steps over ``tokens``; before step t every order in
    ``plan[t]`` is applied in turn (the tokens and encoder rows with it).
    ``pad_at`` = (rows, column): those tokens are pads (that step runs stock);
    ``strided``: the self-attention caches are swapped for non-contiguous
    copies before each step that takes a deferred reorder (the gather then
    takes ATen's index_select and cat). Returns (logits, attention) per step and the
    pending deferred reorders seen before each step."""
    state: dict = {}
    outs, pending = [], []
    tokens = tokens.clone()
    if pad_at is not None:
        tokens[pad_at[0], pad_at[1]] = decoder.padding_idx
    with torch.no_grad():
        for t in range(1, tokens.size(1) + 1):
            for order in plan.get(t, []):
                decoder.reorder_incremental_state_scripting(state, order)
                tokens = tokens.index_select(0, order)
                enc = {
                    "encoder_out": [enc["encoder_out"][0].index_select(1, order)],
                    "encoder_padding_mask": [enc["encoder_padding_mask"][0].index_select(0, order)],
                }
            pending.append(exact_step.DEFERRED_REORDER in state)
            if strided and pending[-1]:
                for mha in decoder._exact_plan()["self"]:
                    buf = mha._get_input_buffer(state)
                    for name in ("prev_key", "prev_value"):
                        buf[name] = buf[name].transpose(0, 1).contiguous().transpose(0, 1)
                        assert not buf[name].is_contiguous()
            x, extra = decoder(tokens[:, :t], encoder_out=enc, incremental_state=state)
            outs.append((x, extra["attn"][0]))
    return outs, pending


@pytest.mark.parametrize("case", ["composed", "pad after a reorder", "strided caches"])
def test_deferred_cache_reorder(case):
    """The self-attention caches' beam reorder is deferred to the next
    one-call step (gathered with the step's K/V in one pass): reorders
    compose, a step that runs stock applies the pending one first, caches
    in another layout take the same result; logits and attention equal the
    stock layers' bit for bit at every step."""
    model, d = build(seed=11, layers=2)
    stock, fast = pair(model)
    sample = random_sample(d, bsz=3, seed=6)
    for dec in (stock.decoder, fast.decoder):
        dec.set_beam_size(4)
    with torch.no_grad():
        enc = stock.encoder(**sample["net_input"])
        enc = stock.encoder.reorder_encoder_out(enc, torch.arange(3).repeat_interleave(4))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, len(d), (12, 9), generator=g)
    tokens[:, 0] = d.eos()
    within = torch.tensor([1, 1, 0, 2, 4, 4, 7, 5, 8, 8, 8, 9])
    shrink = torch.tensor([4, 5, 6, 7, 8, 9, 10, 11])
    plan = {3: [within, within.flip(0)], 5: [shrink, torch.tensor([3, 2, 1, 0, 4, 4, 4, 4])]}
    kw = {}
    if case == "pad after a reorder":
        kw["pad_at"] = (slice(None), 4)  # step 5, right after its two reorders
    elif case == "strided caches":
        kw["strided"] = True
    ref, _ = _steps_with_reorders(stock.decoder, enc, tokens, plan, pad_at=kw.get("pad_at"))
    before = dict(exact_step.STATS)
    got, pending = _steps_with_reorders(fast.decoder, enc, tokens, plan, **kw)
    assert pending[2] and pending[4], "the reorders were not deferred"
    if case == "pad after a reorder":
        assert exact_step.STATS["stock"] - before["stock"] >= 2  # the first step and the pad's
    for t, ((x0, a0), (x1, a1)) in enumerate(zip(ref, got)):
        assert torch.equal(x0, x1), f"logits, step {t + 1}"
        assert torch.equal(a0, a1), f"attention, step {t + 1}"


def test_padding_token_runs_stock_and_stays_exact():
    """A pad among a step's tokens (stock then keeps a self-attention padding
    mask in the cache): that step and every later one run the stock layers."""
    model, d = build(seed=5)
    stock, fast = pair(model)
    sample = random_sample(d, bsz=2, seed=4)
    with torch.no_grad():
        enc = stock.encoder(**sample["net_input"])
    tokens = torch.randint(4, len(d), (2, 6), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = d.eos()
    tokens[1, 3] = d.pad()
    ref = decoder_steps(stock.decoder, enc, tokens, {})
    before = dict(exact_step.STATS)
    got = decoder_steps(fast.decoder, enc, tokens, {})
    assert exact_step.STATS["exact"] - before["exact"] == 2  # steps 2 and 3
    assert exact_step.STATS["stock"] - before["stock"] == 4  # 1, 4 (pad), 5, 6
    for (x0, a0, _), (x1, a1, _) in zip(ref, got):
        assert torch.equal(x0, x1) and torch.equal(a0, a1)


def test_training_and_grad_run_stock():
    model, d = build(seed=1)
    _, fast = pair(model)
    sample = random_sample(d, bsz=2, seed=0)
    enc = fast.encoder(**sample["net_input"])
    tokens = torch.full((2, 3), d.eos())
    before = dict(exact_step.STATS)
    state: dict = {}
    for t in (1, 2, 3):  # gradients enabled: stock every step
        fast.decoder(tokens[:, :t], encoder_out=enc, incremental_state=state)
    assert exact_step.STATS["exact"] == before["exact"]
    assert exact_step.STATS["stock"] - before["stock"] == 3


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(activation_fn="gelu_accurate"), "activation"),
        (dict(scale_attn=True), "scale_heads / scale_attn"),
        (dict(scale_fc=True), "scale_fc"),
        (dict(cross_self_attention=True), "cross-self attention"),
    ],
)
def test_unsupported_options_are_named(overrides, reason):
    model, _ = build(seed=0, **overrides)
    why = exact_step_problem(model.decoder)
    assert why is not None and reason in why
    cls = type(model.decoder)
    assert enable_exact_step(model.decoder) == why
    assert type(model.decoder) is cls


def test_decoder_subclass_overriding_forward_is_refused():
    class Custom(TransformerDecoder):
        def extract_features_scriptable(self, *a, **kw):
            return super().extract_features_scriptable(*a, **kw)

    model, _ = build(seed=0)
    model.decoder.__class__ = Custom
    assert "overrides extract_features_scriptable" in exact_step_problem(model.decoder)


def test_enable_keeps_the_module_and_disable_restores():
    model, _ = build(seed=2)
    dec = model.decoder
    cls = type(dec)
    keys = {k: v.data_ptr() for k, v in dec.state_dict().items()}
    assert enable_exact_step(dec) is None
    assert enable_exact_step(dec) is None  # idempotent
    assert isinstance(dec, cls) and type(dec).__name__ == cls.__name__
    assert {k: v.data_ptr() for k, v in dec.state_dict().items()} == keys
    disable_exact_step(dec)
    assert type(dec) is cls


def test_bad_arguments_are_clear_errors():
    model, d = build(seed=0)
    _, fast = pair(model)
    plan = fast.decoder._exact_plan()
    x = torch.zeros(1, 2, 32)
    k = torch.zeros(2, 4, 1, 8)
    args = [plan["weights"], [k, k], [k, k], [], [], [], plan["eps"], 4, 0.5, 0, False, -1]
    with pytest.raises(RuntimeError, match="expected 44 weights"):
        torch.ops.seqfuse.decoder_stack_step(x, plan["weights"][:-1], *args[1:])
    with pytest.raises(RuntimeError, match="self-attention cache must be"):
        torch.ops.seqfuse.decoder_stack_step(torch.zeros(1, 3, 32), *args)
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.seqfuse.decoder_stack_step(x, *args[:-3], 7, False, -1)


@pytest.mark.slow
def test_multi30k_bit_identical():
    """The real model: 48 test sentences, beam 5, stock generator over stock
    layers vs seqfuse's generator over the exact step."""
    model, task = load_multi30k()
    ds = task.dataset("test")
    stock, fast = pair(model)
    d = task.target_dictionary
    before = exact_step.STATS["exact"]
    for start in (0, 24):
        sample = ds.collater([ds[i] for i in range(start, start + 24)])
        assert_bit_identical_hypos(
            generate(StockGenerator, stock, d, sample, beam_size=5),
            generate(SequenceGenerator, fast, d, sample, beam_size=5),
            f"multi30k from {start}",
        )
    assert exact_step.STATS["exact"] > before


def test_layer_norm_eps_per_norm():
    """Each of a layer's three norms reads its own eps."""
    model, d = build(seed=11, layers=2)
    for i, layer in enumerate(model.decoder.layers):
        norms = (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm)
        for j, ln in enumerate(norms):
            ln.eps = 10.0 ** -(1 + 2 * i + j)
    sample = random_sample(d, bsz=3, seed=5)
    check_stock_generator(model, d, sample, "eps", beam_size=2, max_len_b=8)


def test_plugin_enables_it_by_default(monkeypatch):
    from seqfuse import fairseq_plugin as plugin

    monkeypatch.delenv(plugin.FUSED_LAYERS_ENV, raising=False)
    monkeypatch.setenv(plugin.EXACT_STEP_ENV, "0")
    model, _ = build(seed=0)
    assert plugin._fuse_layers(model) is None
    assert not getattr(model.decoder, "_seqfuse_exact_step", False)
    monkeypatch.delenv(plugin.EXACT_STEP_ENV)
    assert plugin._fuse_layers(model) is None
    assert model.decoder._seqfuse_exact_step
    assert plugin._model_reason(model) is None  # still a supported model


def test_unverified_fairseq_code_is_refused(monkeypatch):
    """A fairseq whose attention code has another shape (another version)
    runs the stock layers."""
    from fairseq.modules.multihead_attention import MultiheadAttention

    def forward(self, query, key, value, **kw):  # a different implementation
        return None, None

    monkeypatch.setattr(MultiheadAttention, "forward", forward)
    model, _ = build(seed=0)
    assert "MultiheadAttention.forward is not the verified one" in exact_step_problem(model.decoder)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_bit_identical(dtype):
    """The step is device-generic (ATen calls only): on a GPU too, stock's bits."""
    model, d = build(seed=9, layers=3)
    sample = random_sample(d, bsz=5, seed=9)
    sample["net_input"] = {k: v.cuda() for k, v in sample["net_input"].items()}
    before = exact_step.STATS["exact"]
    model = model.to(device="cuda", dtype=dtype)
    check_stock_generator(model, d, sample, f"cuda {dtype}", beam_size=4, max_len_b=12)
    assert exact_step.STATS["exact"] > before
