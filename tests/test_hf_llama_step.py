"""The one-call exact decoding step for Hugging Face Llama.

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
from integrations import hf, hf_exact_step, hf_llama_step
from seqfuse import _ext

pytestmark = pytest.mark.skipif(_ext._C is None, reason="seqfuse._C not built")


MODES: list = []


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    fresh_step_state(monkeypatch)
    MODES.clear()
    real = hf_llama_step._gqa_mode

    def recording(*a):
        MODES.append(real(*a))
        return MODES[-1]

    monkeypatch.setattr(hf_llama_step, "_gqa_mode", recording)
    yield


def _grouped_mode_with_a_mask() -> int:
    """This release's path for grouped heads and a mask: query packing (5.23)
    or repeated K/V (5.17)."""
    from transformers.integrations import sdpa_attention

    packs = hf_llama_step._GQA_RELEASES[hf_llama_step.shape_of(sdpa_attention.use_gqa_in_sdpa)]
    return hf_llama_step._GQA_PACK if packs else hf_llama_step._GQA_REPEAT


def both(model, ids, fused_layers=False, **kw):
    stock = generate(model, ids, **kw)
    seqfuse.optimize(model, fused_layers=fused_layers)
    try:
        assert getattr(model.model, "_seqfuse_hf_llama_exact", False)
        ours = generate(model, ids, **kw)
    finally:
        hf.restore(model)
    assert not getattr(model.model, "_seqfuse_hf_llama_exact", False)
    assert type(model.model.layers) is torch.nn.ModuleList
    return stock, ours


LLAMA_VARIANTS = {
    "grouped K/V heads": {},
    "one K/V head per head, 3 layers": dict(num_key_value_heads=4, num_hidden_layers=3),
    "one K/V head for all": dict(num_key_value_heads=1),
    "biased projections": dict(attention_bias=True, mlp_bias=True),
}


def _llama(seed, **over):
    model = make_model("llama", seed=seed)
    if over:
        cfg = model.config
        for k, v in over.items():
            setattr(cfg, k, v)
        if "num_hidden_layers" in over:
            cfg.layer_types = ["full_attention"] * over["num_hidden_layers"]
        torch.manual_seed(seed)
        fresh = type(model)(cfg).eval()
        fresh.lm_head.weight.data.copy_(model.lm_head.weight.data)
        model = fresh
    return model


@pytest.mark.parametrize("num_beams", (1, 4))
@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_generate_bit_identical(variant, num_beams):
    """Left-padded prompts (a 4-D mask every step: grouped heads meet a mask),
    beam search (seqfuse's loop) and greedy (HF's own loop) over the step."""
    model = _llama(5, **LLAMA_VARIANTS[variant])
    assert hf_llama_step.problem(model) is None
    ids, mask = make_inputs("llama", model, batch=4, seed=5)
    kw = dict(num_beams=num_beams, max_new_tokens=12, min_new_tokens=4, attention_mask=mask)
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, f"{variant} beams={num_beams}")
    assert hf_exact_step.STATS["exact"] > 0
    grouped = model.config.num_key_value_heads < model.config.num_attention_heads
    want = _grouped_mode_with_a_mask() if grouped else hf_llama_step._GQA_NONE
    assert set(MODES) == {want}


@pytest.mark.parametrize("variant", ["grouped K/V heads", "one K/V head per head, 3 layers"])
def test_unpadded_prompt_without_mask(variant):
    """No mask: grouped heads run sdpa's enable_gqa."""
    model = _llama(4, **LLAMA_VARIANTS[variant])
    ids = make_inputs("llama", model, batch=1, seed=4)[0]
    stock, ours = both(model, ids, num_beams=3, max_new_tokens=10, min_new_tokens=10)
    assert_same(stock, ours, "batch 1, no mask")
    assert hf_exact_step.STATS["exact"] > 0
    grouped = model.config.num_key_value_heads < model.config.num_attention_heads
    assert set(MODES) == {hf_llama_step._GQA_SDPA if grouped else hf_llama_step._GQA_NONE}


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_half_precision(dtype):
    model = _llama(2).to(dtype)
    ids, mask = make_inputs("llama", model, batch=3, seed=2)
    stock, ours = both(model, ids, num_beams=3, max_new_tokens=8, attention_mask=mask)
    assert_same(stock, ours, str(dtype))
    assert hf_exact_step.STATS["exact"] > 0


@pytest.mark.parametrize("padded", (True, False))
@pytest.mark.parametrize("num_beams", (1, 4))
def test_qwen2_bit_identical(num_beams, padded):
    """Qwen2 (biased q/k/v, no o bias, a mask per layer type): the same step."""
    model = make_model("qwen2", seed=3)
    assert hf_llama_step.problem(model) is None
    ids, mask = make_inputs("qwen2", model, batch=4 if padded else 1, seed=3)
    kw = dict(num_beams=num_beams, max_new_tokens=12, min_new_tokens=4)
    if padded:
        kw["attention_mask"] = mask
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, f"qwen2 beams={num_beams} padded={padded}")
    assert hf_exact_step.STATS["exact"] > 0
    want = _grouped_mode_with_a_mask() if padded else hf_llama_step._GQA_SDPA
    assert set(MODES) == {want}


def _mistral(seed: int, sliding_window=None):
    """A tiny Mistral with Llama's tuned output layer (EOS at varied lengths)."""
    import transformers as tf

    llama = make_model("llama", seed=seed)
    c = llama.config
    cfg = tf.MistralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=128,
        sliding_window=sliding_window,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = tf.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.lm_head.weight.data.copy_(llama.lm_head.weight.data)
    return model


@pytest.mark.parametrize("num_beams", (1, 4))
def test_mistral_bit_identical(num_beams):
    """Mistral (no sliding window): the same step."""
    model = _mistral(3)
    assert hf_llama_step.problem(model) is None
    ids, mask = make_inputs("llama", model, batch=4, seed=3)
    kw = dict(num_beams=num_beams, max_new_tokens=12, min_new_tokens=4, attention_mask=mask)
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, f"mistral beams={num_beams}")
    assert hf_exact_step.STATS["exact"] > 0
    assert "sliding-window" in hf_llama_step.problem(_mistral(3, sliding_window=4))


def test_fused_mode_packed_gemm():
    from seqfuse.ops.linear import kernel_takes

    if not kernel_takes(torch.zeros(1, 8), torch.zeros(8, 8)):
        pytest.skip("no packed GEMM kernel on this CPU")
    model = _llama(6, **LLAMA_VARIANTS["biased projections"])
    ids, mask = make_inputs("llama", model, batch=4, seed=6)
    kw = dict(num_beams=4, max_new_tokens=10, attention_mask=mask)
    kw.update(output_scores=True, return_dict_in_generate=True)
    (a, _), (b, _) = both(model, ids, fused_layers=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.sequences_scores, b.sequences_scores, rtol=0, atol=1e-5)
    assert hf_exact_step.STATS["exact"] > 0


def test_recorded_outputs_run_the_stock_layers():
    model = _llama(7)
    ids, mask = make_inputs("llama", model, batch=2, seed=7)
    kw = dict(num_beams=2, max_new_tokens=6, attention_mask=mask)
    kw.update(output_hidden_states=True, return_dict_in_generate=True)
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, "hidden states")
    for x, y in zip(stock[0].hidden_states, ours[0].hidden_states):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    assert hf_exact_step.STATS["exact"] == 0 and hf_exact_step.STATS["stock"] > 0


def test_problems():
    eager = _llama(1)
    eager.config._attn_implementation = "eager"
    assert "sdpa only" in hf_llama_step.problem(eager)
    assert "not a Llama, Qwen2 or Mistral model" in hf_llama_step.problem(
        make_model("gpt2", seed=0)
    )
    odd = _llama(1)
    odd.model.layers[1].mlp.act_fn = torch.nn.Softplus()
    assert "activation" in hf_llama_step.problem(odd)
    # a refused model still generates, through the stock layers
    ids, mask = make_inputs("llama", eager, batch=2, seed=1)
    stock = generate(eager, ids, num_beams=2, max_new_tokens=5, attention_mask=mask)
    seqfuse.optimize(eager)
    try:
        assert not getattr(eager.model, "_seqfuse_hf_llama_exact", False)
        ours = generate(eager, ids, num_beams=2, max_new_tokens=5, attention_mask=mask)
    finally:
        hf.restore(eager)
    assert_same(stock, ours, "eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_cuda_bit_identical(dtype):
    why = hf_llama_step._llama_library_problem()  # the GPU image's transformers may differ
    if why is not None:
        pytest.skip(why)
    model = _llama(8).to(device="cuda", dtype=dtype)
    ids, mask = make_inputs("llama", model, batch=4, seed=8)
    stock, ours = both(
        model, ids.cuda(), num_beams=4, max_new_tokens=12, attention_mask=mask.cuda()
    )
    assert_same(stock, ours, f"cuda llama {dtype}")
    assert hf_exact_step.STATS["exact"] > 0


def test_bad_arguments_are_clear_errors():
    """The C++ steps check their per-layer lists before touching a tensor."""
    x = torch.zeros(2, 1, 8)
    kv = [torch.zeros(2, 2, 3, 4)]
    w = [torch.zeros(1)] * 16
    cos = sin = torch.zeros(2, 1, 4)
    op = torch.ops.seqfuse.hf_llama_stack_step
    with pytest.raises(RuntimeError, match="expected 16 weights, got 15"):
        op(x, w[:-1], kv, kv, cos, sin, None, [1e-6, 1e-6], 2, 2, 4, 0.5, 4, 0, [])
    with pytest.raises(RuntimeError, match="expected 2 eps, got 1"):
        op(x, w, kv, kv, cos, sin, None, [1e-6], 2, 2, 4, 0.5, 4, 0, [])
    with pytest.raises(RuntimeError, match="packed weights: none or 7, got 3"):
        op(x, w, kv, kv, cos, sin, None, [1e-6, 1e-6], 2, 2, 4, 0.5, 4, 0, w[:3])
    with pytest.raises(RuntimeError, match="gqa mode 1 for 2 heads over 2"):
        op(x, w, kv, kv, cos, sin, None, [1e-6, 1e-6], 2, 2, 4, 0.5, 4, 1, [])
    with pytest.raises(
        RuntimeError, match="K/V rooms: none or one K and one V a layer, got 2 and 1"
    ):
        op(x, w, kv, kv, cos, sin, None, [1e-6, 1e-6], 2, 2, 4, 0.5, 4, 0, [], None, kv + kv, kv)
    t5 = torch.ops.seqfuse.hf_t5_stack_step
    bias = torch.zeros(1, 2, 1, 4)
    with pytest.raises(RuntimeError, match="expected 12 weights, got 16"):
        t5(x, w, kv, kv, kv, kv, bias, None, None, [1e-6] * 3, 2, 4, 0, False, True, [])
    with pytest.raises(RuntimeError, match="fp16 runs the stock blocks"):
        t5(x.half(), w[:12], kv, kv, kv, kv, bias, None, None, [1e-6] * 3, 2, 4, 0, False, True, [])
