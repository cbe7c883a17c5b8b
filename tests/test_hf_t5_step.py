"""The one-call exact decoder step for Hugging Face T5.

Stock ``generate`` (and stock decoder forwards) and the optimised model run on
the same weights in the same test; the exact step is compared bit for bit
(test_hf.assert_same), the fused mode (packed GEMMs inside the same call) on
tokens and within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import fresh_step_state, make_inputs, make_model
from test_hf import assert_same, generate

import seqfuse
from integrations import hf, hf_exact_step, hf_t5_step
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
        assert getattr(model.decoder, "_seqfuse_hf_t5_exact", False)
        ours = generate(model, ids, **kw)
    finally:
        hf.restore(model)
    assert not getattr(model.decoder, "_seqfuse_hf_t5_exact", False)
    assert not getattr(model.encoder, "_seqfuse_hf_t5_exact", False)
    return stock, ours


T5_VARIANTS = {
    "relu, 2 layers": {},
    "gated gelu_new, 3 layers": dict(
        feed_forward_proj="gated-gelu", num_layers=3, num_decoder_layers=3
    ),
    "inner dim != d_model": dict(d_kv=12, num_heads=3),
    "few buckets": dict(relative_attention_num_buckets=4, relative_attention_max_distance=6),
}


def _t5(seed, **over):
    model = make_model("t5", seed=seed)
    if over:
        import transformers as tf

        base = model.config.to_dict()
        for derived in ("is_gated_act", "dense_act_fn"):  # T5Config derives them
            base.pop(derived, None)
        cfg = tf.T5Config(**{**base, **over})
        torch.manual_seed(seed)
        fresh = type(model)(cfg).eval()
        # the tuned output layer of make_model (EOS at varied lengths)
        fresh.lm_head.weight.data.copy_(model.lm_head.weight.data)
        model = fresh
    return model


@pytest.mark.parametrize("num_beams", (1, 4))
@pytest.mark.parametrize("variant", list(T5_VARIANTS))
def test_generate_bit_identical(variant, num_beams):
    """Padded sources (a bool cross-attention mask every step), beam search
    (seqfuse's loop) and greedy (HF's own loop) over the one-call step."""
    model = _t5(5, **T5_VARIANTS[variant])
    assert hf_t5_step.problem(model) is None
    gated = type(model.decoder.block[0].layer[2].DenseReluDense).__name__.startswith("T5DenseGated")
    assert gated == ("gated" in variant)
    ids, mask = make_inputs("t5", model, batch=4, seed=5)
    kw = dict(num_beams=num_beams, max_new_tokens=12, min_new_tokens=4, attention_mask=mask)
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, f"{variant} beams={num_beams}")
    assert hf_exact_step.STATS["exact"] > 0


def test_unpadded_sources_without_mask():
    """No encoder mask: the biases reach sdpa unmasked (create_position_bias_mask's
    first branch)."""
    model = _t5(4)
    ids = make_inputs("t5", model, batch=1, seed=4)[0]
    stock, ours = both(model, ids, num_beams=3, max_new_tokens=10, min_new_tokens=10)
    assert_same(stock, ours, "batch 1, no mask")
    assert hf_exact_step.STATS["exact"] > 0


def test_decoder_steps_with_a_padded_decoder_mask():
    """Incremental decoder forwards with a left-padded decoder prompt: a 4-D
    self-attention mask every step; logits and caches bit for bit."""
    model = _t5(6)
    ids, mask = make_inputs("t5", model, batch=3, seed=6)
    g = torch.Generator().manual_seed(6)
    dec = torch.randint(2, model.config.vocab_size, (3, 9), generator=g)
    dmask = torch.ones_like(dec)
    dmask[1, :3] = 0
    dmask[2, :1] = 0

    def run():
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                decoder_input_ids=dec[:, :4],
                decoder_attention_mask=dmask[:, :4],
                use_cache=True,
            )
            logits, past = [out.logits], out.past_key_values
            for t in range(4, dec.size(1)):
                out = model(
                    encoder_outputs=(out.encoder_last_hidden_state,),
                    attention_mask=mask,
                    decoder_input_ids=dec[:, t : t + 1],
                    decoder_attention_mask=dmask[:, : t + 1],
                    past_key_values=past,
                    use_cache=True,
                )
                logits.append(out.logits)
                past = out.past_key_values
        return logits, past

    stock_logits, stock_past = run()
    seqfuse.optimize(model)
    try:
        ours_logits, ours_past = run()
    finally:
        hf.restore(model)
    assert hf_exact_step.STATS["exact"] == dec.size(1) - 4
    for a, b in zip(stock_logits, ours_logits):
        assert torch.equal(a, b)
    for i in range(len(stock_past.self_attention_cache.layers)):
        sa, sb = stock_past.self_attention_cache.layers[i], ours_past.self_attention_cache.layers[i]
        assert torch.equal(sa.keys, sb.keys) and torch.equal(sa.values, sb.values)


def test_bfloat16():
    model = _t5(2).to(torch.bfloat16)
    ids, mask = make_inputs("t5", model, batch=3, seed=2)
    stock, ours = both(model, ids, num_beams=3, max_new_tokens=8, attention_mask=mask)
    assert_same(stock, ours, "bfloat16")
    assert hf_exact_step.STATS["exact"] > 0


def test_float16_runs_the_stock_blocks():
    """T5Block clamps fp16 activations, which the step does not mirror."""
    model = _t5(3).to(torch.float16)
    ids, mask = make_inputs("t5", model, batch=2, seed=3)
    stock, ours = both(model, ids, num_beams=2, max_new_tokens=6, attention_mask=mask)
    assert_same(stock, ours, "float16")
    assert hf_exact_step.STATS["exact"] == 0 and hf_exact_step.STATS["stock"] > 0


@pytest.mark.parametrize("variant", ["relu, 2 layers", "gated gelu_new, 3 layers"])
def test_fused_mode_packed_gemm(variant):
    from seqfuse.ops.linear import kernel_takes

    if not kernel_takes(torch.zeros(1, 8), torch.zeros(8, 8)):
        pytest.skip("no packed GEMM kernel on this CPU")
    model = _t5(7, **T5_VARIANTS[variant])
    ids, mask = make_inputs("t5", model, batch=4, seed=7)
    kw = dict(num_beams=4, max_new_tokens=10, attention_mask=mask)
    kw.update(output_scores=True, return_dict_in_generate=True)
    (a, _), (b, _) = both(model, ids, fused_layers=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.sequences_scores, b.sequences_scores, rtol=0, atol=1e-5)
    assert hf_exact_step.STATS["exact"] > 0


def test_recorded_outputs_run_the_stock_blocks():
    model = _t5(8)
    ids, mask = make_inputs("t5", model, batch=2, seed=8)
    kw = dict(num_beams=2, max_new_tokens=6, attention_mask=mask)
    kw.update(output_hidden_states=True, return_dict_in_generate=True)
    stock, ours = both(model, ids, **kw)
    assert_same(stock, ours, "hidden states")
    for x, y in zip(stock[0].decoder_hidden_states, ours[0].decoder_hidden_states):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    assert hf_exact_step.STATS["exact"] == 0 and hf_exact_step.STATS["stock"] > 0


def test_problems():
    eager = _t5(1)
    eager.config._attn_implementation = "eager"
    assert "sdpa only" in hf_t5_step.problem(eager)
    assert "not a T5 decoder" in hf_t5_step.problem(make_model("bart", seed=0))
    biased = _t5(1)
    layer = biased.decoder.block[1].layer[0].SelfAttention
    layer.q = torch.nn.Linear(layer.q.in_features, layer.q.out_features, bias=True)
    assert "bias-free" in hf_t5_step.problem(biased)
    # a model the step refuses still generates, through the stock blocks
    ids, mask = make_inputs("t5", eager, batch=2, seed=1)
    stock, ours = generate(eager, ids, num_beams=2, max_new_tokens=5, attention_mask=mask), None
    seqfuse.optimize(eager)
    try:
        assert not getattr(eager.decoder, "_seqfuse_hf_t5_exact", False)
        ours = generate(eager, ids, num_beams=2, max_new_tokens=5, attention_mask=mask)
    finally:
        hf.restore(eager)
    assert_same(stock, ours, "eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_bit_identical(dtype):
    why = hf_t5_step._t5_library_problem()  # the GPU image's transformers may differ
    if why is not None:
        pytest.skip(why)
    model = _t5(9, **T5_VARIANTS["gated gelu_new, 3 layers"]).to(device="cuda", dtype=dtype)
    ids, mask = make_inputs("t5", model, batch=4, seed=9)
    stock, ours = both(
        model, ids.cuda(), num_beams=4, max_new_tokens=12, attention_mask=mask.cuda()
    )
    assert_same(stock, ours, f"cuda t5 {dtype}")
    assert hf_exact_step.STATS["exact"] > 0
