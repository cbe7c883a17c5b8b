"""``seqfuse.attention_heads``: the attention core on Hugging Face's cache
layout (one query per row, heads at their own strides), against torch's
sdpa on the same tensors; and the Hugging Face fused mode's BART-family
step, which takes it for sdpa where the masks are key paddings (and runs
sdpa where a row has no key to attend)."""

from __future__ import annotations

import pytest
import torch
from hf_models import clear_seqfuse_env, make_inputs, make_model, needs_packed_gemm

import seqfuse
from integrations import hf

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.seqfuse, "attention_heads"), reason="seqfuse extension not built"
)

SDPA_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::scaled_dot_product_attention",
)


def _inputs(b, heads, hd, s, seed, capacity=None):
    """q as project_heads leaves it (a transposed view of [b, 1, H * hd]); k
    and v the first s slots of caches holding `capacity` (strided in time)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, heads * hd, generator=g).view(b, 1, heads, hd).transpose(1, 2)
    cap = capacity or s
    k = torch.randn(b, heads, cap, hd, generator=g)[:, :, :s]
    v = torch.randn(b, heads, cap, hd, generator=g)[:, :, :s]
    return q, k, v


def _reference(q, k, v, pad, scaling):
    mask = None if pad is None else ~pad.bool().view(q.size(0), 1, 1, -1)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=scaling)
    return o.transpose(1, 2).reshape(q.size(0), 1, -1)


CASES = [
    # b, heads, hd, s (hd 64 takes the 16-key score blocks; others the general loop)
    (1, 1, 64, 1),
    (5, 4, 64, 7),
    (7, 4, 64, 16),
    (3, 8, 64, 17),
    (2, 2, 64, 40),
    (4, 3, 32, 9),
    (3, 5, 48, 33),
    (2, 3, 17, 5),
]
# grouped K/V heads: b, heads, K/V heads, hd, s
GROUPED = [(3, 4, 2, 64, 9), (2, 9, 3, 64, 20), (4, 6, 1, 32, 7), (2, 4, 2, 24, 17)]


@pytest.mark.parametrize("b,heads,hd,s", CASES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_matches_sdpa(b, heads, hd, s, padded, strided):
    q, k, v = _inputs(b, heads, hd, s, seed=b * 100 + s, capacity=s + 5 if strided else None)
    scaling = hd**-0.5
    pad = None
    if padded:
        g = torch.Generator().manual_seed(s)
        pad = torch.rand(b, s, generator=g) < 0.4
        pad[:, 0] = False  # a key to attend in every row
    got = torch.ops.seqfuse.attention_heads(q, k, v, pad, scaling)
    assert got.shape == (b, 1, heads * hd) and got.is_contiguous()
    torch.testing.assert_close(got, _reference(q, k, v, pad, scaling), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("b,heads,kv_heads,hd,s", GROUPED)
def test_grouped_kv_heads_match_sdpa(b, heads, kv_heads, hd, s):
    """Query head h reads K/V head h / (heads / kv_heads), as sdpa's
    enable_gqa (and repeat_kv) do."""
    g = torch.Generator().manual_seed(b * s)
    q = torch.randn(b, 1, heads * hd, generator=g).view(b, 1, heads, hd).transpose(1, 2)
    k = torch.randn(b, kv_heads, s + 3, hd, generator=g)[:, :, :s]
    v = torch.randn(b, kv_heads, s + 3, hd, generator=g)[:, :, :s]
    pad = torch.rand(b, s, generator=g) < 0.3
    pad[:, -1] = False
    got = torch.ops.seqfuse.attention_heads(q, k, v, pad, hd**-0.5)
    rep = heads // kv_heads
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    torch.testing.assert_close(got, _reference(q, kk, vv, pad, hd**-0.5), rtol=1e-5, atol=2e-6)
    # each K/V head is read by its own query heads: a change to K/V head 0
    # (one key, and every value) moves query heads 0 .. rep - 1 only
    k2, v2 = k.clone(), v.clone()
    k2[:, 0, -1] += 3.0
    v2[:, 0] += 1.0
    before = got.view(b, heads, hd)
    for kx, vx in ((k2, v), (k, v2)):
        moved = torch.ops.seqfuse.attention_heads(q, kx, vx, pad, hd**-0.5).view(b, heads, hd)
        assert not torch.allclose(moved[:, :rep], before[:, :rep])
        assert torch.equal(moved[:, rep:], before[:, rep:])


def test_padding_is_read():
    """Masking a key changes the result (the padding is applied, to the
    right rows): a test that would pass with the padding ignored cannot."""
    q, k, v = _inputs(2, 4, 64, 6, seed=3)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 2] = True
    got = torch.ops.seqfuse.attention_heads(q, k, v, pad, 0.125)
    free = torch.ops.seqfuse.attention_heads(q, k, v, None, 0.125)
    assert torch.equal(got[0], free[0]) and not torch.allclose(got[1], free[1])
    torch.testing.assert_close(got, _reference(q, k, v, pad, 0.125), rtol=1e-5, atol=2e-6)


def test_row_without_keys_is_nan():
    """Every key of a row masked: NaN, as torch's softmax of -inf scores (sdpa
    gives zeros there: the fused step keeps such masks on sdpa)."""
    q, k, v = _inputs(2, 2, 64, 4, seed=4)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[0] = True
    got = torch.ops.seqfuse.attention_heads(q, k, v, pad, 0.125)
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1]).all()


def test_bad_inputs_raise():
    q, k, v = _inputs(2, 4, 64, 5, seed=5)
    op = torch.ops.seqfuse.attention_heads
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k, v, None, 0.125)
    with pytest.raises(RuntimeError, match=r"q must be \[b, H, 1, hd\]"):
        op(q.expand(2, 4, 2, 64), k, v, None, 0.125)
    with pytest.raises(RuntimeError, match="k and v must be"):
        op(q, k[:, :2], v, None, 0.125)
    with pytest.raises(RuntimeError, match="a multiple of G"):
        op(q, k[:, :3], v[:, :3], None, 0.125)
    with pytest.raises(RuntimeError, match="channels must be contiguous"):
        op(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, None, 0.125)
    with pytest.raises(RuntimeError, match="key_pad must be"):
        op(q, k, v, torch.zeros(2, 4, dtype=torch.bool), 0.125)
    with pytest.raises(RuntimeError, match="no keys"):
        op(q, k[:, :, :0], v[:, :, :0], None, 0.125)


def _sdpa_calls(model, ids, mask, **kw) -> tuple[object, int]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)
    calls = sum(e.count for e in prof.key_averages() if e.key in SDPA_OPS)
    return out, calls


@needs_packed_gemm()
@pytest.mark.parametrize("kind", ["marian", "bart", "mbart", "gpt2", "llama", "qwen2"])
def test_fused_step_takes_the_core(kind, monkeypatch):
    """The fused mode's decoder steps run no sdpa (padded inputs: the masks
    are key paddings), the exact mode's do; tokens equal stock's, scores
    within 1e-5, in the same test."""
    clear_seqfuse_env(monkeypatch)
    model = make_model(kind, seed=2)
    ids, mask = make_inputs(kind, model, batch=3, seed=2)
    assert not bool(mask.all())  # padded sources
    kw = dict(num_beams=3, max_new_tokens=8, min_new_tokens=8, output_scores=True)
    stock, _ = _sdpa_calls(model, ids, mask, **kw)
    try:
        seqfuse.optimize(model, fused_layers=False)
        _, exact_calls = _sdpa_calls(model, ids, mask, **kw)
        hf.restore(model)
        seqfuse.optimize(model, fused_layers=True)
        # the encoder and the first step run the model's own layers (sdpa)
        _, first_calls = _sdpa_calls(model, ids, mask, num_beams=3, max_new_tokens=1)
        ours, fused_calls = _sdpa_calls(model, ids, mask, **kw)
    finally:
        hf.restore(model)
    decoder_only = kind in ("gpt2", "llama", "qwen2")
    cfg = model.config
    layers = cfg.num_hidden_layers if decoder_only else cfg.decoder_layers
    per_layer = 1 if decoder_only else 2  # self- (and encoder) attention
    steps = 7  # after the first
    assert exact_calls >= first_calls + steps * layers * per_layer
    assert fused_calls == first_calls
    assert stock.sequences_scores is not None
    assert torch.equal(stock.sequences, ours.sequences)
    torch.testing.assert_close(ours.sequences_scores, stock.sequences_scores, atol=1e-5, rtol=1e-5)


@needs_packed_gemm()
def test_fused_step_keeps_sdpa_for_a_source_without_keys(monkeypatch):
    """A source all padding: its cross-attention rows attend to nothing
    (sdpa: zeros, the core: NaN), so the fused step runs sdpa; the output
    equals stock's tokens, scores within 1e-5."""
    clear_seqfuse_env(monkeypatch)
    model = make_model("bart", seed=4)
    ids, mask = make_inputs("bart", model, batch=3, seed=4)
    mask[1] = 0
    kw = dict(num_beams=3, max_new_tokens=6, min_new_tokens=6, output_scores=True)
    stock, _ = _sdpa_calls(model, ids, mask, **kw)
    try:
        seqfuse.optimize(model, fused_layers=True)
        _, first_calls = _sdpa_calls(model, ids, mask, num_beams=3, max_new_tokens=1)
        ours, fused_calls = _sdpa_calls(model, ids, mask, **kw)
    finally:
        hf.restore(model)
    assert fused_calls > first_calls  # the cross-attention stayed on sdpa
    assert torch.isfinite(ours.sequences_scores).all()
    assert torch.equal(stock.sequences, ours.sequences)
    torch.testing.assert_close(ours.sequences_scores, stock.sequences_scores, atol=1e-5, rtol=1e-5)


def _bmm_calls(model, ids, mask, **kw):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = model.generate(
            ids, attention_mask=mask, num_beams=4, return_dict_in_generate=True, **kw
        )
    return out, sum(e.count for e in prof.key_averages() if e.key == "aten::bmm")


@needs_packed_gemm()
@pytest.mark.parametrize("all_padding", [False, True])
def test_fsmt_fused_step_takes_the_core(all_padding, monkeypatch):
    """FSMT's eager attention (bmm, the padding filled with the lowest float,
    softmax, bmm) in the fused mode's steps: the core where every source row
    has a key (no bmm in the steps after the first), the eager attention for
    the cross-attention when a source is all padding (its softmax averages
    every value there); stock's tokens, scores within 1e-5, either way."""
    from test_hf_fsmt_step import _fsmt, _inputs

    clear_seqfuse_env(monkeypatch)
    model = _fsmt(seed=6)
    ids, mask = _inputs(seed=6)
    assert not bool(mask.all())  # padded sources
    if all_padding:
        mask[1] = 0
    kw = dict(max_new_tokens=10, min_new_tokens=10, output_scores=True)
    stock, _ = _bmm_calls(model, ids, mask, **kw)
    seqfuse.optimize(model, fused_layers=True)
    try:
        _, first = _bmm_calls(model, ids, mask, max_new_tokens=1)
        ours, calls = _bmm_calls(model, ids, mask, **kw)
    finally:
        hf.restore(model)
    if all_padding:
        assert calls >= first + 9 * model.config.decoder_layers * 2  # cross: eager (2 bmm)
    else:
        assert calls == first
    assert stock.sequences_scores is not None and torch.isfinite(ours.sequences_scores).all()
    assert torch.equal(stock.sequences, ours.sequences)
    torch.testing.assert_close(ours.sequences_scores, stock.sequences_scores, atol=1e-5, rtol=1e-5)
