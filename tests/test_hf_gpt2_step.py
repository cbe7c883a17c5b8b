"""The one-call exact decoding step for Hugging Face GPT-2.

Stock ``generate`` and the optimised model run on the same weights in the same
test; the exact step is compared bit for bit (test_hf.assert_same), the fused
mode (packed GEMMs inside the same call) on tokens and within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import fresh_step_state, make_inputs, make_model
from test_hf import assert_same, generate

import seqfuse
from integrations import hf, hf_exact_step, hf_gpt2_step
from seqfuse import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason="seqfuse._C not built")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    fresh_step_state(monkeypatch)
    yield


def both(model, ids, fused_layers=False, **kw):
    stock = generate(model, ids, **kw)
    seqfuse.optimize(model, fused_layers=fused_layers)
    try:
        assert getattr(model.transformer, "_seqfuse_hf_gpt2_exact", False)
        ours = generate(model, ids, **kw)
    finally:
        hf.restore(model)
    assert not getattr(model.transformer, "_seqfuse_hf_gpt2_exact", False)
    return stock, ours


GPT2_VARIANTS = {
    "gelu_new": {},
    "relu, 3 layers": dict(activation_function="relu", n_layer=3),
    "inverse layer-idx scaling": dict(scale_attn_by_inverse_layer_idx=True),
    "unscaled attention": dict(scale_attn_weights=False),
}


def _gpt2(seed, **over):
    model = make_model("gpt2", seed=seed)
    if over:
        cfg = model.config
        for k, v in over.items():
            setattr(cfg, k, v)
        torch.manual_seed(seed)
        model = type(model)(cfg).eval()
    return model


@pytest.mark.parametrize("num_beams", (1, 4))
@pytest.mark.parametrize("variant", list(GPT2_VARIANTS))
def test_generate_bit_identical(variant, num_beams):
    """Left-padded prompts (a 4-D mask every step), beam search (seqfuse's
    loop) and greedy (HF's own loop) over the one-call step."""
    model = _gpt2(5, **GPT2_VARIANTS[variant])
    ids, mask = make_inputs("gpt2", model, batch=4, seed=5)
    kw = dict(num_beams=num_beams, max_new_tokens=12, min_new_tokens=4, attention_mask=mask)
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, f"{variant} beams={num_beams}")
    assert hf_exact_step.STATS["exact"] > 0


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision(dtype):
    model = _gpt2(2).to(dtype)
    ids, mask = make_inputs("gpt2", model, batch=3, seed=2)
    stock, ours = both(model, ids, num_beams=3, max_new_tokens=8, attention_mask=mask)
    assert_same(stock, ours, str(dtype))
    assert hf_exact_step.STATS["exact"] > 0


def test_unpadded_prompt_without_mask():
    model = _gpt2(4)
    ids = make_inputs("gpt2", model, batch=1, seed=4)[0]
    stock, ours = both(model, ids, num_beams=3, max_new_tokens=10, min_new_tokens=10)
    assert_same(stock, ours, "batch 1, no mask")
    assert hf_exact_step.STATS["exact"] > 0


def test_fused_mode_packed_gemm():
    from seqfuse.ops.linear import kernel_takes

    if not kernel_takes(torch.zeros(1, 8), torch.zeros(8, 8)):
        pytest.skip("no packed GEMM kernel on this CPU")
    model = _gpt2(6)
    ids, mask = make_inputs("gpt2", model, batch=4, seed=6)
    kw = dict(num_beams=4, max_new_tokens=10, attention_mask=mask, output_scores=False)
    (a, _), (b, _) = both(model, ids, fused_layers=True, **kw)
    assert torch.equal(a, b)
    assert hf_exact_step.STATS["exact"] > 0


def test_recorded_outputs_and_training_run_the_stock_blocks():
    model = _gpt2(7)
    ids, mask = make_inputs("gpt2", model, batch=2, seed=7)
    kw = dict(
        num_beams=2,
        max_new_tokens=6,
        attention_mask=mask,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, "hidden states")
    for x, y in zip(stock[0].hidden_states, ours[0].hidden_states):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    assert hf_exact_step.STATS["exact"] == 0 and hf_exact_step.STATS["stock"] > 0


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(attn="eager"), "attention implementation"),
        (dict(add_cross_attention=True), "cross-attention"),
    ],
)
def test_problems(change, reason):
    if "attn" in change:
        model = _gpt2(1)
        model.config._attn_implementation = change["attn"]
    else:
        model = _gpt2(1, **change)
    assert reason in hf_gpt2_step.problem(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_cuda_bit_identical(dtype):
    why = hf_gpt2_step._gpt2_library_problem()  # the GPU image's transformers may differ
    if why is not None:
        pytest.skip(why)
    model = _gpt2(8).to(device="cuda", dtype=dtype)
    ids, mask = make_inputs("gpt2", model, batch=4, seed=8)
    stock, ours = both(
        model, ids.cuda(), num_beams=4, max_new_tokens=12, attention_mask=mask.cuda()
    )
    assert_same(stock, ours, f"cuda gpt2 {dtype}")
    assert hf_exact_step.STATS["exact"] > 0
