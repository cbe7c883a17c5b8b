"""The one-call exact decoder step for Hugging Face BART-family decoders.

Stock ``generate`` and the optimised model run on the same weights in the same
test; everything is compared bit for bit (test_hf.assert_same). The broader
option matrix of test_hf.py runs with the step on as well (``seqfuse.optimize``
enables it).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import make_inputs, make_model
from test_hf import assert_same, generate

import seqfuse
from integrations import hf, hf_exact_step
from seqfuse import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason="seqfuse._C not built")

EXACT_KINDS = ("marian", "bart", "mbart", "pegasus", "m2m100")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("SEQFUSE_DISABLE", raising=False)
    monkeypatch.delenv("SEQFUSE_EXACT_STEP", raising=False)
    for k in hf_exact_step.STATS:
        hf_exact_step.STATS[k] = 0
    yield


def both(model, ids, **kw):
    stock = generate(model, ids, **kw)
    seqfuse.optimize(model)
    try:
        assert getattr(model.get_decoder(), "_seqfuse_hf_exact", False)
        ours = generate(model, ids, **kw)
    finally:
        hf.restore(model)
    return stock, ours


@pytest.mark.parametrize("num_beams", (1, 4))
@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_generate_bit_identical(kind, num_beams):
    """Beam search (seqfuse's loop) and greedy (HF's own loop) over the step;
    padded sources exercise the cross-attention mask."""
    model = make_model(kind, seed=3)
    ids, mask = make_inputs(kind, model, batch=5, seed=3)
    kw = dict(num_beams=num_beams, max_new_tokens=16, attention_mask=mask)
    if num_beams == 1:  # greedy: these models would end most sentences at once
        kw["min_new_tokens"] = 6
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, f"{kind} beams={num_beams}")
    assert hf_exact_step.STATS["exact"] > 0


def test_replaced_weight_is_followed():
    """The step's plan is built anew after a weight is replaced between two
    generate calls: the second equals stock's with the new weight."""
    model = make_model("bart", seed=4)
    ids, mask = make_inputs("bart", model, batch=3, seed=4)
    kw = dict(num_beams=3, max_new_tokens=10, attention_mask=mask)
    seqfuse.optimize(model)
    try:
        before = generate(model, ids, **kw)
        fc2 = model.get_decoder().layers[-1].fc2
        g = torch.Generator().manual_seed(2)
        fc2.weight = torch.nn.Parameter(torch.randn(fc2.weight.shape, generator=g) * 0.5)
        ours = generate(model, ids, **kw)
        assert hf_exact_step.STATS["exact"] > 0
    finally:
        hf.restore(model)
    stock = generate(model, ids, **kw)
    assert_same(stock, ours, "after the replacement")
    assert not torch.equal(before[0], stock[0])  # the replacement changed the output


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision(dtype):
    model = make_model("marian", seed=1).to(dtype)
    ids, mask = make_inputs("marian", model, batch=3, seed=1)
    stock, ours = both(model, ids, num_beams=3, max_new_tokens=10, attention_mask=mask)
    assert_same(stock, ours, str(dtype))
    assert hf_exact_step.STATS["exact"] > 0


def test_recorded_outputs_run_the_stock_layers():
    """output_hidden_states is recorded by hooks on the layers: those steps
    call the stock layers, and every hidden state matches."""
    model = make_model("bart", seed=2)
    ids, mask = make_inputs("bart", model, batch=3, seed=2)
    kw = dict(
        num_beams=3,
        max_new_tokens=8,
        attention_mask=mask,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, "recorded outputs")
    for a, b in zip(stock[0].decoder_hidden_states, ours[0].decoder_hidden_states):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert hf_exact_step.STATS["exact"] == 0 and hf_exact_step.STATS["stock"] > 0


def test_unsupported_models_are_named():
    eager = make_model("marian", seed=0)
    eager.config._attn_implementation = "eager"
    assert "sdpa only" in hf_exact_step.problem(eager)
    assert hf_exact_step.problem(make_model("t5", seed=0)) is not None
    assert "encoder-decoder" in hf_exact_step.problem(make_model("gpt2", seed=0))


def test_layer_code_of_another_shape_runs_stock():
    """A decoder layer whose forward is not a verified structure (here a
    subclass that adds a residual scale) is refused, and generate stays exact."""
    model = make_model("bart", seed=5)
    base = type(model.get_decoder().layers[0])

    class Scaled(base):
        def forward(self, hidden_states, *args, **kwargs):
            return 0.5 * super().forward(hidden_states, *args, **kwargs)

    for layer in model.get_decoder().layers:
        layer.__class__ = Scaled
    assert "not a verified layer structure" in hf_exact_step.problem(model)
    ids, mask = make_inputs("bart", model, batch=3, seed=5)
    stock, ours = both_unpatched(model, ids, num_beams=3, max_new_tokens=8, attention_mask=mask)
    assert_same(stock, ours, "scaled layers")


def both_unpatched(model, ids, **kw):
    """Stock vs optimize where the step must not be enabled."""
    stock = generate(model, ids, **kw)
    seqfuse.optimize(model)
    try:
        assert not getattr(model.get_decoder(), "_seqfuse_hf_exact", False)
        ours = generate(model, ids, **kw)
    finally:
        hf.restore(model)
    return stock, ours


def test_eager_attention_still_optimises_exactly():
    model = make_model("marian", seed=4)
    model.config._attn_implementation = "eager"
    ids, mask = make_inputs("marian", model, batch=3, seed=4)
    stock, ours = both_unpatched(model, ids, num_beams=3, max_new_tokens=10, attention_mask=mask)
    assert_same(stock, ours, "eager")


def test_layers_iterate_normally_outside_forward_and_restore():
    model = make_model("mbart", seed=0)
    dec = model.get_decoder()
    cls, layer_types = type(dec), [type(m) for m in dec.layers]
    seqfuse.optimize(model)
    assert [type(m) for m in dec.layers] == layer_types  # outside forward: the layers
    assert type(dec).__name__ == cls.__name__ and isinstance(dec, cls)
    hf.restore(model)
    assert type(dec) is cls and type(dec.layers) is torch.nn.ModuleList


def test_env_turns_it_off(monkeypatch):
    monkeypatch.setenv("SEQFUSE_EXACT_STEP", "0")
    model = make_model("marian", seed=0)
    seqfuse.optimize(model)
    try:
        assert not getattr(model.get_decoder(), "_seqfuse_hf_exact", False)
    finally:
        hf.restore(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("kind", ("marian", "mbart"))
def test_cuda_bit_identical(kind, dtype):
    why = hf_exact_step._library_problem()  # the GPU image's transformers may differ
    if why is not None:
        pytest.skip(why)
    model = make_model(kind, seed=6).to(device="cuda", dtype=dtype)
    ids, mask = make_inputs(kind, model, batch=4, seed=6)
    stock, ours = both(
        model, ids.cuda(), num_beams=4, max_new_tokens=12, attention_mask=mask.cuda()
    )
    assert_same(stock, ours, f"cuda {kind} {dtype}")
    assert hf_exact_step.STATS["exact"] > 0
