"""Tiny random Hugging Face models, built from configs (no downloads), with
output layers sharpened and EOS made likely so that hypotheses end at
different lengths, as trained models' do."""

from __future__ import annotations

import torch

KINDS = ("marian", "bart", "mbart", "t5", "gpt2")
# More architectures for the parity tests (a rotary decoder-only model, more
# encoder-decoders with their own special-token handling).
MORE_KINDS = ("llama", "qwen2", "m2m100", "pegasus")
DECODER_ONLY = ("gpt2", "llama", "qwen2")


# (init std, logit spread, EOS bias) per kind: EOS at varied lengths.
TUNING = {
    "marian": (0.1, 2.0, 6.0),
    "bart": (0.5, 3.0, 6.0),
    "mbart": (0.5, 3.0, 7.0),
    "t5": (0.5, 3.0, 8.0),
    "gpt2": (0.5, 3.0, 4.0),
    "llama": (0.5, 3.0, 4.0),
    "qwen2": (0.5, 3.0, 4.0),
    "m2m100": (0.5, 3.0, 6.0),
    "fsmt": (0.5, 3.0, 6.0),
    "pegasus": (0.5, 3.0, 6.0),
}


# The encoder-decoder test models' size.
SMALL = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=128,
)


def fsmt_config(vocab: int = 211, **overrides):
    """A small FSMT configuration (fairseq's transformer as transformers
    ports it, with fairseq's conventions), with ``overrides``."""
    import transformers as tf

    from integrations.fairseq_to_hf import FAIRSEQ_CONVENTIONS

    kw = dict(
        langs=["en", "de"],
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        **SMALL,
        **FAIRSEQ_CONVENTIONS,
    )
    kw.update(overrides)
    return tf.FSMTConfig(**kw)


def make_model(kind: str, seed: int = 0, vocab: int = 211, **tuning):
    import transformers as tf

    init, spread, eos_bias = TUNING[kind]
    init = tuning.get("init", init)
    spread = tuning.get("spread", spread)
    eos_bias = tuning.get("eos_bias", eos_bias)

    torch.manual_seed(seed)
    small = dict(SMALL, init_std=init)
    if kind == "marian":
        cfg = tf.MarianConfig(
            vocab_size=vocab,
            pad_token_id=vocab - 1,
            eos_token_id=0,
            decoder_start_token_id=vocab - 1,
            bad_words_ids=[[vocab - 1]],
            forced_eos_token_id=0,
            **small,
        )
        model = tf.MarianMTModel(cfg)
    elif kind == "bart":
        cfg = tf.BartConfig(
            vocab_size=vocab,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
            **small,
        )
        model = tf.BartForConditionalGeneration(cfg)
    elif kind == "mbart":
        cfg = tf.MBartConfig(
            vocab_size=vocab,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_bos_token_id=7,
            forced_eos_token_id=2,
            **small,
        )
        model = tf.MBartForConditionalGeneration(cfg)
    elif kind == "t5":
        cfg = tf.T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            initializer_factor=init * 2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        model = tf.T5ForConditionalGeneration(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            initializer_range=init,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif kind in ("llama", "qwen2"):
        conf, cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[kind]
        cfg = conf(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=init,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = cls(cfg)
    elif kind == "m2m100":
        cfg = tf.M2M100Config(
            vocab_size=vocab,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_bos_token_id=9,
            **small,
        )
        model = tf.M2M100ForConditionalGeneration(cfg)
    elif kind == "pegasus":
        cfg = tf.PegasusConfig(
            vocab_size=vocab,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            forced_eos_token_id=1,
            **small,
        )
        model = tf.PegasusForConditionalGeneration(cfg)
    elif kind == "fsmt":  # (not in KINDS: the parity fuzz's --hf-kinds, FSMT's own tests)
        cfg = fsmt_config(vocab=vocab, init_std=init)
        model = tf.FSMTForConditionalGeneration(cfg)
    else:
        raise ValueError(kind)
    model.eval()
    # An untied output layer with a bias, calibrated so that logits have a
    # standard deviation of about ``spread`` (random models are otherwise
    # either flat or collapse onto one token), EOS made likely by ``eos_bias``.
    old = model.model.decoder.output_projection if kind == "fsmt" else model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0)
        head.bias.zero_()
        model.config.tie_word_embeddings = False
        if kind == "fsmt":  # (FSMT's "output embeddings" are its decoder's input ones)
            model.model.decoder.output_projection = head
        else:
            model.set_output_embeddings(head)
        ids, mask = make_inputs(kind, model, 4, seed=seed + 1)
        if kind in DECODER_ONLY:
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            dec = torch.full((4, 3), cfg.decoder_start_token_id, dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        if getattr(model, "final_logits_bias", None) is not None:
            model.final_logits_bias.zero_()
        head.weight.mul_(spread / logits.float().std().clamp(min=1e-6))
        head.bias[cfg.eos_token_id] = eos_bias
    return model


def make_inputs(kind: str, model, batch: int, seed: int = 0, src_len: int = 9):
    """input_ids and attention_mask with padding (right for encoders, left for GPT-2)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.vocab_size
    ids = torch.randint(3, vocab - 2, (batch, src_len), generator=g)
    mask = torch.ones_like(ids)
    pad = cfg.pad_token_id
    for b in range(1, batch, 2):
        n = 1 + b % (src_len - 2)
        if kind in DECODER_ONLY:
            ids[b, :n], mask[b, :n] = pad, 0
        else:
            ids[b, -n:], mask[b, -n:] = pad, 0
    if kind not in DECODER_ONLY:
        ids[:, -1] = torch.where(mask[:, -1] == 1, cfg.eos_token_id, ids[:, -1])
    return ids, mask


# Environment switches the HF tests start without.
SEQFUSE_ENV = (
    "SEQFUSE_DISABLE",
    "SEQFUSE_FUSED_LAYERS",
    "SEQFUSE_EXACT_STEP",
    "SEQFUSE_HF_DROP_FINISHED",
    "SEQFUSE_HF_SHARED_PREFILL",
    "SEQFUSE_HF_DEFER_REORDER",
    "SEQFUSE_HF_BEAM_ADVANCE",
    "SEQFUSE_HF_DIRECT_STEP",
    "SEQFUSE_GC_PAUSE",
    "SEQFUSE_HF_KV_ROOMS",
)


def clear_seqfuse_env(monkeypatch) -> None:
    for var in SEQFUSE_ENV:
        monkeypatch.delenv(var, raising=False)


def needs_packed_gemm():
    """Skip mark for the fused-layer tests: the packed GEMM must run here."""
    import pytest

    from seqfuse import _ext

    return pytest.mark.skipif(
        _ext._C is None or not torch.ops.seqfuse.linear_capability(),
        reason="no packed-GEMM kernel here",
    )


def fresh_step_state(monkeypatch) -> None:
    """Default environment and zeroed step counters, for the one-call step tests."""
    from integrations import hf_exact_step

    clear_seqfuse_env(monkeypatch)
    for k in hf_exact_step.STATS:
        hf_exact_step.STATS[k] = 0


def scored_beam_search(model, ids, mask, max_new_tokens: int, **kw):
    """``model.generate`` with 4 beams, returning a dict with per-step scores."""
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            num_beams=4,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_scores=True,
            **kw,
        )
