"""Shared pieces of the generator parity tests: small models and hypothesis comparison."""

from __future__ import annotations

import argparse
import copy
import os

import torch
from fairseq.data import Dictionary
from fairseq.models import FairseqEncoder, FairseqEncoderDecoderModel, FairseqIncrementalDecoder
from fairseq.models.transformer import TransformerModel, base_architecture
from fairseq.sequence_generator import SequenceGenerator as StockGenerator

from seqfuse import _ext
from seqfuse.generation import SequenceGenerator
from seqfuse.layers.fairseq import optimize_fairseq_model
from seqfuse.ops.linear import kernel_takes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MODEL = os.path.join(REPO, "..", "shared", "models", "multi30k_en_de")

# Hypothesis scores: fp32 parity tolerance (absolute + relative to the stock value).
SCORE_ATOL = 1e-5
SCORE_RTOL = 1e-5


def packed_gemm_missing() -> bool:
    """seqfuse._C or its packed GEMM kernel (the fused one-call paths) is not here."""
    return _ext._C is None or not kernel_takes(torch.zeros(1, 8), torch.zeros(8, 8))


def fused(model):
    """A copy of ``model`` with seqfuse's fused layers swapped in."""
    model = copy.deepcopy(model)
    ok, why = optimize_fairseq_model(model)
    assert ok, why
    return model


def generate(model, d, sample, **kw):
    """seqfuse's generator on ``model`` (no grad)."""
    gen = SequenceGenerator([model], d, **kw)
    with torch.no_grad():
        return gen.generate([model], sample)


def make_dictionary(n_symbols: int) -> Dictionary:
    d = Dictionary()
    for i in range(n_symbols):
        d.add_symbol(f"w{i}")
    d.finalize(padding_factor=1)
    return d


def compare_hypotheses(stock, ours, context: str = "") -> None:
    """Same hypotheses in the same order: tokens equal, floats within tolerance."""
    assert len(stock) == len(ours), f"{context}: {len(stock)} vs {len(ours)} sentences"
    for i, (hs, ho) in enumerate(zip(stock, ours)):
        assert len(hs) == len(ho), f"{context} sent {i}: {len(hs)} vs {len(ho)} hypotheses"
        for j, (a, b) in enumerate(zip(hs, ho)):
            where = f"{context} sent {i} hypo {j}"
            assert torch.equal(a["tokens"], b["tokens"]), (
                f"{where}: tokens {a['tokens'].tolist()} vs {b['tokens'].tolist()}"
            )
            for key in ("score", "positional_scores", "attention"):
                x, y = a[key], b[key]
                assert x.shape == y.shape, f"{where}: {key} shape {x.shape} vs {y.shape}"
                if x.numel():
                    torch.testing.assert_close(
                        y,
                        x,
                        atol=SCORE_ATOL,
                        rtol=SCORE_RTOL,
                        msg=lambda m, w=where, k=key: f"{w} {k}: {m}",
                    )
            assert torch.equal(a["alignment"], b["alignment"]), f"{where}: alignment"


def run_both(models, tgt_dict, sample, gen_kwargs=None, **generate_kwargs):
    """Generate with stock fairseq and seqfuse from the same RNG state."""
    gen_kwargs = gen_kwargs or {}
    results = []
    for cls in (StockGenerator, SequenceGenerator):
        torch.manual_seed(1234)
        gen = cls(models, tgt_dict, **gen_kwargs)
        results.append(gen.generate(models, sample, **generate_kwargs))
    return results


# Architecture overrides of random_transformer that every layer path must
# reproduce (norm placement, activations, positions, embedding options, heads).
LAYER_VARIANTS = {
    "post-norm relu": {},
    "pre-norm": dict(decoder_normalize_before=True, encoder_normalize_before=True),
    "gelu": dict(activation_fn="gelu"),
    "tanh": dict(activation_fn="tanh"),
    "learned positions": dict(decoder_learned_pos=True, encoder_learned_pos=True),
    "layernorm_embedding, no embed scale": dict(layernorm_embedding=True, no_scale_embedding=True),
    "3 layers, 8 heads, dim 64": dict(layers=3, dim=64, heads=8),
    "1 head": dict(heads=1),
    # a feed-forward width that ends in a partial pair of GEMM panels
    "relu, ffn 72": dict(ffn=72),
}


def random_transformer(
    vocab: int,
    seed: int,
    layers: int = 2,
    dim: int = 32,
    heads: int = 4,
    sharp: float = 4.0,
    perturb: bool = False,
    ffn: int | None = None,
    **overrides,
):
    """A small random fairseq transformer; ``sharp`` scales the output projection
    so that distributions are peaked (more realistic search than near-uniform);
    ``perturb`` moves layer norms and biases off their initial 1 / 0; ``ffn``:
    the feed-forward width (2 * dim by default);
    ``overrides`` are architecture arguments (activation_fn, ...)."""
    torch.manual_seed(seed)
    d = make_dictionary(vocab - 4)
    args = argparse.Namespace(
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_embed_dim=dim,
        decoder_embed_dim=dim,
        encoder_ffn_embed_dim=2 * dim if ffn is None else ffn,
        decoder_ffn_embed_dim=2 * dim if ffn is None else ffn,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        share_all_embeddings=True,
        dropout=0.0,
        max_source_positions=256,
        max_target_positions=256,
        **overrides,
    )
    base_architecture(args)

    class _Task:
        source_dictionary = d
        target_dictionary = d

    model = TransformerModel.build_model(args, _Task())
    with torch.no_grad():
        model.decoder.output_projection.weight.mul_(sharp)
        if perturb:
            for name, p in model.named_parameters():
                if "layer_norm" in name or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval(), d


def load_multi30k():
    """(model in eval mode, task) of ../shared/models/multi30k_en_de with its
    test split loaded; skips the test when the model is not there."""
    import pytest

    if not os.path.exists(os.path.join(SHARED_MODEL, "checkpoint_best.pt")):
        pytest.skip("../shared/models/multi30k_en_de not present")
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from fairseq import checkpoint_utils

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(SHARED_MODEL, "checkpoint_best.pt")],
        arg_overrides={"data": os.path.join(SHARED_MODEL, "data-bin")},
    )
    task.load_dataset("test")
    return models[0].eval(), task


def random_sample(d: Dictionary, bsz: int, seed: int, min_len: int = 3, max_len: int = 12):
    """A left-padded batch like fairseq's translation datasets produce."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (bsz,), generator=g)
    T = int(lengths.max()) + 1
    src = torch.full((bsz, T), d.pad(), dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        toks = torch.randint(d.nspecial, len(d), (n,), generator=g)
        src[i, T - n - 1 : T - 1] = toks
        src[i, T - 1] = d.eos()
    return {
        "id": torch.arange(bsz),
        "net_input": {"src_tokens": src, "src_lengths": lengths + 1},
    }


class ToyEncoder(FairseqEncoder):
    """Encoder whose output length differs from the source (``out_len``)."""

    def __init__(self, d, out_len_fn):
        super().__init__(d)
        self.out_len_fn = out_len_fn

    def forward(self, src_tokens, src_lengths=None, **kwargs):
        bsz = src_tokens.size(0)
        n = self.out_len_fn(src_tokens.size(1))
        return {
            "encoder_out": [src_tokens[:, :1].float().expand(bsz, n).t().unsqueeze(-1)],
            "src_ids": [src_tokens[:, -2:-1].clone()],  # identifies the sentence
        }

    def reorder_encoder_out(self, encoder_out, new_order):
        return {
            "encoder_out": [encoder_out["encoder_out"][0].index_select(1, new_order)],
            "src_ids": [encoder_out["src_ids"][0].index_select(0, new_order)],
        }


class ToyDecoder(FairseqIncrementalDecoder):
    """Fixed-probability decoder: ``table[sentence_id, step]`` gives the
    distribution, optionally shifted by the previous token so that beams of one
    sentence see different distributions."""

    def __init__(self, d, table: torch.Tensor, prefix_shift: float = 0.0):
        super().__init__(d)
        self.table = table  # [n_sentences, steps, V] probabilities
        self.prefix_shift = prefix_shift

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        step = prev_output_tokens.size(1) - 1
        sent = encoder_out["src_ids"][0][:, 0] % self.table.size(0)
        probs = self.table[sent, min(step, self.table.size(1) - 1)]
        logits = probs.clamp_min(1e-30).log()
        if self.prefix_shift:
            last = prev_output_tokens[:, -1:].float()
            logits = logits + self.prefix_shift * torch.sin(
                last * torch.arange(logits.size(-1)).float()
            )
        enc_len = encoder_out["encoder_out"][0].size(0)
        attn = torch.softmax(
            torch.arange(enc_len).float().expand(logits.size(0), 1, enc_len) * (step + 1) * 0.1, -1
        )
        return logits.unsqueeze(1), {"attn": [attn]}

    def reorder_incremental_state(self, incremental_state, new_order):
        pass


class ToyModel(FairseqEncoderDecoderModel):
    def max_decoder_positions(self):
        return 1024


def assert_bit_identical_hypos(a, b, context: str = "") -> None:
    """Same hypotheses, every tensor equal bit for bit (torch.equal)."""
    for i, (ha, hb) in enumerate(zip(a, b)):
        assert len(ha) == len(hb), context
        for j, (x, y) in enumerate(zip(ha, hb)):
            where = f"{context} sentence {i} hypothesis {j}"
            for key in ("tokens", "score", "positional_scores", "attention"):
                if x[key] is None:
                    assert y[key] is None, f"{where}: {key}"
                else:
                    assert torch.equal(x[key], y[key]), f"{where}: {key}"


def _forward_step(decoder, tokens, enc, state):
    x, extra = decoder(tokens, encoder_out=enc, incremental_state=state)
    return x, extra["attn"][0], extra["inner_states"]


def decoder_steps(decoder, enc, tokens, orders, step=_forward_step):
    """Run ``decoder`` incrementally over ``tokens``; before step t the caches
    (and the encoder output) are reordered by ``orders[t]`` when given.
    Returns each step's ``step(decoder, tokens[:, :t], enc, state)``: by
    default the forward's (logits, alignment attention, inner states)."""
    state: dict = {}
    outs = []
    with torch.no_grad():
        for t in range(1, tokens.size(1) + 1):
            order = orders.get(t)
            if order is not None:
                decoder.reorder_incremental_state_scripting(state, order)
                tokens = tokens.index_select(0, order)
                enc = {
                    "encoder_out": [enc["encoder_out"][0].index_select(1, order)],
                    "encoder_padding_mask": [enc["encoder_padding_mask"][0].index_select(0, order)],
                }
            outs.append(step(decoder, tokens[:, :t], enc, state))
    return outs


def reorder_scenario(model, d, n_tokens: int, seed: int):
    """(fused copy of ``model``, encoder output with 4 beam copies of 3
    sentences, tokens [12, n_tokens] with one padding token, reorders: inside
    sentences at step 3, sentence 0 finished at step 5, inside again at 9)."""
    fast = fused(model)
    fast.decoder.set_beam_size(4)
    sample = random_sample(d, bsz=3, seed=seed)
    with torch.no_grad():
        enc = fast.encoder(**sample["net_input"])
        enc = fast.encoder.reorder_encoder_out(enc, torch.arange(3).repeat_interleave(4))
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, len(d), (12, n_tokens), generator=gen)
    tokens[:, 0] = d.eos()
    tokens[5, 6] = d.pad()
    orders = {
        3: torch.tensor([1, 1, 0, 2, 4, 4, 7, 5, 8, 8, 8, 9]),  # reorder within sentences
        5: torch.tensor([4, 5, 6, 7, 8, 9, 10, 11]),  # sentence 0 finished: shrink
        9: torch.tensor([3, 2, 1, 0, 4, 4, 4, 4]),
    }
    return fast, enc, tokens, orders
