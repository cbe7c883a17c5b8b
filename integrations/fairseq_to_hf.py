"""A fairseq ``transformer`` checkpoint as a Hugging Face model, same weights.

``fsmt_from_fairseq(checkpoint)`` builds an ``FSMTForConditionalGeneration``
(transformers' port of fairseq's transformer: post-norm layers, fairseq's
sinusoidal positions, scaled embeddings) holding the checkpoint's tensors, so
one trained model can be run through fairseq's generator and through
``model.generate`` (with or without ``seqfuse.optimize``). Architectures FSMT
cannot express (pre-norm, learned positions, layernorm_embedding, a final
layer norm, adaptive inputs/softmax, head sizes that differ between encoder
and decoder) are refused with a ValueError naming the option.

    .venv/bin/python -m integrations.fairseq_to_hf CKPT OUT_DIR
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _model_args(state: dict):
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        return cfg["model"]
    if state.get("args") is not None:
        return state["args"]
    raise ValueError("checkpoint has neither cfg.model nor args: not a fairseq checkpoint")


def _get(a, name, default=None):
    if isinstance(a, dict):
        return a.get(name, default)
    try:
        return getattr(a, name)
    except AttributeError:
        try:
            return a[name]
        except (KeyError, TypeError):
            return default


# What an FSMT model of a fairseq checkpoint takes from fairseq's conventions:
# the special symbols' ids (bos 0, pad 1, eos 2, which also starts the
# target), scaled embeddings, an untied output projection, no forced EOS.
FAIRSEQ_CONVENTIONS = dict(
    scale_embedding=True,
    tie_word_embeddings=False,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=None,
)


def fsmt_from_fairseq(checkpoint: str, langs=("src", "tgt")):
    """Load a fairseq transformer checkpoint into an FSMT model (eval mode)."""
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    from seqfuse.fairseq_plugin import _checkpoint_globals

    # weights-only loading, allowing exactly what fairseq checkpoints pickle
    with torch.serialization.safe_globals(_checkpoint_globals()):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    a = _model_args(state)
    sd = state["model"]
    refused = {
        "encoder_normalize_before": "pre-norm encoder",
        "decoder_normalize_before": "pre-norm decoder",
        "encoder_learned_pos": "learned encoder positions",
        "decoder_learned_pos": "learned decoder positions",
        "layernorm_embedding": "layernorm_embedding",
        "no_scale_embedding": "unscaled embeddings",
        "adaptive_input": "adaptive input",
        "no_token_positional_embeddings": "no positional embeddings",
    }
    for opt, what in refused.items():
        if _get(a, opt, False):
            raise ValueError(f"fsmt_from_fairseq: {what} ({opt}) has no FSMT equivalent")
    if _get(a, "adaptive_softmax_cutoff", None):
        raise ValueError("fsmt_from_fairseq: adaptive softmax has no FSMT equivalent")
    if any(k.startswith(("encoder.layer_norm", "decoder.layer_norm")) for k in sd):
        raise ValueError("fsmt_from_fairseq: a final layer norm has no FSMT equivalent")
    d = _get(a, "encoder_embed_dim")
    if _get(a, "decoder_embed_dim") != d:
        raise ValueError("fsmt_from_fairseq: encoder and decoder widths differ")
    act = _get(a, "activation_fn", "relu") or "relu"
    src_vocab = sd["encoder.embed_tokens.weight"].shape[0]
    tgt_vocab = sd["decoder.embed_tokens.weight"].shape[0]
    cfg = FSMTConfig(
        langs=list(langs),
        src_vocab_size=src_vocab,
        tgt_vocab_size=tgt_vocab,
        d_model=d,
        encoder_layers=_get(a, "encoder_layers"),
        decoder_layers=_get(a, "decoder_layers"),
        encoder_attention_heads=_get(a, "encoder_attention_heads"),
        decoder_attention_heads=_get(a, "decoder_attention_heads"),
        encoder_ffn_dim=_get(a, "encoder_ffn_embed_dim"),
        decoder_ffn_dim=_get(a, "decoder_ffn_embed_dim"),
        activation_function=act,
        max_position_embeddings=max(
            _get(a, "max_source_positions", 1024), _get(a, "max_target_positions", 1024)
        ),
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        num_beams=5,
        **FAIRSEQ_CONVENTIONS,
    )
    model = FSMTForConditionalGeneration(cfg)
    own = model.state_dict()
    new = {}
    for k, v in sd.items():
        if k.endswith(".version") or "embed_positions" in k:
            continue  # fairseq's sinusoidal positions are computed, as FSMT's
        key = "model." + k
        if key not in own:
            raise ValueError(f"fsmt_from_fairseq: no FSMT parameter for {k}")
        if own[key].shape != v.shape:
            raise ValueError(
                f"fsmt_from_fairseq: {k} has shape {tuple(v.shape)}, "
                f"FSMT expects {tuple(own[key].shape)}"
            )
        new[key] = v
    if "model.decoder.output_projection.weight" not in new:
        new["model.decoder.output_projection.weight"] = sd["decoder.embed_tokens.weight"]
    missing = [k for k in own if k not in new and "embed_positions" not in k]
    if missing:
        raise ValueError(f"fsmt_from_fairseq: the checkpoint lacks {missing[:3]}...")
    model.load_state_dict(new, strict=False)
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fairseq transformer checkpoint -> HF FSMT model")
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    model = fsmt_from_fairseq(args.checkpoint)
    os.makedirs(args.out_dir, exist_ok=True)
    model.save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
