"""seqfuse's fused layers vs the Hugging Face layers with the same weights.

A random fairseq transformer is converted to transformers' FSMT (its port of
fairseq's architecture, see integrations/fairseq_to_hf.py); the fused encoder
layers and the fused model (``optimize_fairseq_model``) must agree with the
HF layers and the HF model in fp32 (the product's 1e-5 contract)."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

pytest.importorskip("transformers")

from test_layers import assert_close, make_model  # noqa: E402

from integrations.fairseq_to_hf import fsmt_from_fairseq  # noqa: E402
from seqfuse.layers import FusedTransformerEncoderLayer, optimize_fairseq_model  # noqa: E402


def fairseq_and_hf(tmp_path, act="relu", seed=4):
    model, d = make_model(seed=seed, act=act, dim=48, heads=6, layers=2, spread=0.15)
    ckpt = tmp_path / "model.pt"
    args = argparse.Namespace(  # what a fairseq checkpoint records (flat names)
        arch="transformer",
        encoder_embed_dim=48,
        decoder_embed_dim=48,
        encoder_ffn_embed_dim=96,
        decoder_ffn_embed_dim=96,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        activation_fn=act,
        max_source_positions=128,
        max_target_positions=128,
        share_all_embeddings=True,
    )
    torch.save({"args": args, "model": model.state_dict()}, ckpt)
    return model, fsmt_from_fairseq(str(ckpt)), d


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_encoder_layers_match_hf(tmp_path, act):
    model, hf_model, _ = fairseq_and_hf(tmp_path, act)
    t, b = 37, 3
    x = torch.randn(t, b, 48)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, -9:] = True
    for i, stock in enumerate(model.encoder.layers):
        fused = FusedTransformerEncoderLayer.from_layer(stock)
        hf_layer = hf_model.model.encoder.layers[i]
        with torch.no_grad():
            want = hf_layer(x, pad)[0]
            got = fused(x, pad)
        keep = ~pad.t()  # padded positions are garbage in both
        assert_close(got[keep], want[keep], f"encoder layer {i} ({act})")


def test_fused_model_matches_hf_model(tmp_path):
    model, hf_model, _ = fairseq_and_hf(tmp_path, seed=7)
    fused = copy.deepcopy(model)
    assert optimize_fairseq_model(fused)[0]
    src = torch.randint(4, 60, (3, 11))
    src[2, -3:] = 1  # right padding (HF's convention)
    src[:, -1] = torch.where(src[:, -1] == 1, 1, 2)
    prev = torch.randint(4, 60, (3, 8))
    prev[:, 0] = 2
    lens = src.ne(1).sum(1)
    with torch.no_grad():
        got = fused(src, lens, prev)[0]
        want = hf_model(
            input_ids=src, attention_mask=src.ne(1).long(), decoder_input_ids=prev, use_cache=False
        ).logits
    assert_close(got, want, "fused fairseq model vs HF FSMT logits", atol=1e-4)
