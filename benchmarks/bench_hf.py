"""Hugging Face ``model.generate`` beam search: stock vs ``seqfuse.optimize``.

Random-weight models built from configs at real models' sizes (nothing is
downloaded), output length forced (``min_new_tokens == max_new_tokens``) so
that both sides do the same work; and ``fsmt-multi30k``, the trained Multi30k
fairseq model converted to an HF FSMT model, on the test set's sentences with
natural output lengths. Stock and seqfuse runs alternate on the same
model object (``optimize`` / ``restore``), the median of each is reported with
their ratio, and every seqfuse output is checked to equal stock's. Each timed
run follows an untimed two-token ``generate`` on the same side: the steady
state of a model optimised once (``restore`` frees the fused mode's weight
packs, which the next ``optimize`` rebuilds on first use); that first call's
time is reported apart (``fused_first_s``: the packs and the two tokens).

    .venv/bin/python benchmarks/bench_hf.py                 # default grid
    .venv/bin/python benchmarks/bench_hf.py --models marian-small --batch 16 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    # the Multi30k model's size (3+3 layers, d=256, 8k vocab), as a Marian
    "marian-small": ("marian", dict(d=256, layers=3, heads=4, ffn=1024, vocab=8000)),
    # opus-mt-en-de's size
    "marian-opus": ("marian", dict(d=512, layers=6, heads=8, ffn=2048, vocab=58101)),
    # t5-small's size
    "t5-small": ("t5", dict(d=512, layers=6, heads=8, ffn=2048, vocab=32128)),
    # bart-base's size
    "bart-base": ("bart", dict(d=768, layers=6, heads=12, ffn=3072, vocab=50265)),
    # distilgpt2's size (decoder-only; transformers' Conv1D projections)
    "gpt2-distil": ("gpt2", dict(d=768, layers=6, heads=12, ffn=3072, vocab=50257)),
    # a small GPT-2 (the Multi30k model's decoder size)
    "gpt2-small": ("gpt2", dict(d=256, layers=3, heads=4, ffn=1024, vocab=8000)),
    # a small Llama with grouped K/V heads (the Multi30k decoder's width)
    "llama-small": ("llama", dict(d=256, layers=3, heads=4, ffn=1024, vocab=8000, kv=2)),
    # the same as a Qwen2 (biased q/k/v projections)
    "qwen2-small": ("qwen2", dict(d=256, layers=3, heads=4, ffn=1024, vocab=8000, kv=2)),
    # SmolLM-135M's size (30 layers, 9 heads over 3 K/V heads)
    "llama-135m": ("llama", dict(d=576, layers=30, heads=9, ffn=1536, vocab=49152, kv=3)),
    # the trained Multi30k fairseq model as an HF FSMT model: real sentences,
    # natural output lengths (no forcing)
    "fsmt-multi30k": ("fsmt", {}),
}
SHARED_MODEL = os.path.join(ROOT, "..", "shared", "models", "multi30k_en_de")


def multi30k_fsmt():
    """The converted model and the test-set source sentences (token ids)."""
    from fairseq.data import Dictionary
    from fairseq.data import data_utils as du

    from integrations.fairseq_to_hf import fsmt_from_fairseq

    model = fsmt_from_fairseq(os.path.join(SHARED_MODEL, "checkpoint_best.pt"))
    d = Dictionary.load(os.path.join(SHARED_MODEL, "data-bin", "dict.en.txt"))
    ds = du.load_indexed_dataset(os.path.join(SHARED_MODEL, "data-bin", "test.en-de.en"), d)
    return model, [ds[i] for i in range(len(ds))]


def build(kind: str, d: int, layers: int, heads: int, ffn: int, vocab: int, kv: int = 0):
    import transformers as tf

    torch.manual_seed(0)
    seq2seq = dict(
        vocab_size=vocab,
        d_model=d,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
    )
    if kind == "marian":
        cfg = tf.MarianConfig(
            max_position_embeddings=512,
            pad_token_id=vocab - 1,
            eos_token_id=0,
            decoder_start_token_id=vocab - 1,
            bad_words_ids=[[vocab - 1]],
            forced_eos_token_id=0,
            **seq2seq,
        )
        model = tf.MarianMTModel(cfg)
    elif kind == "bart":
        model = tf.BartForConditionalGeneration(tf.BartConfig(forced_eos_token_id=2, **seq2seq))
    elif kind == "t5":
        cfg = tf.T5Config(
            vocab_size=vocab,
            d_model=d,
            d_kv=d // heads,
            d_ff=ffn,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        model = tf.T5ForConditionalGeneration(cfg)
    elif kind in ("llama", "qwen2"):
        conf, cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[kind]
        cfg = conf(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv or heads,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = cls(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=vocab, n_embd=d, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=512
        )
        cfg.pad_token_id = cfg.eos_token_id
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_once(model, ids, mask, beams: int, new_tokens: int, forced: bool = True):
    # forced: exactly new_tokens tokens; otherwise the model's own max_length
    kw = dict(min_new_tokens=new_tokens, max_new_tokens=new_tokens) if forced else {}
    with torch.no_grad():
        _sync(ids.device)
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, num_beams=beams, **kw)
        _sync(ids.device)
        return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fsmt-multi30k,marian-small,marian-opus,t5-small")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--beam", default="5")
    ap.add_argument("--src-len", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=320, help="skip cells with batch*beam above")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument(
        "--fused-layers",
        action="store_true",
        help="also time seqfuse.optimize(model, fused_layers=True) (within 1e-5, not bit for bit)",
    )
    args = ap.parse_args(argv)

    import transformers

    import seqfuse
    from integrations import hf
    from seqfuse.info import source_revision

    rows = []
    for name in args.models.split(","):
        kind, size = MODELS[name]
        sources = None
        if kind == "fsmt":
            model, sources = multi30k_fsmt()
            size = {"vocab": model.config.src_vocab_size}
        else:
            model = build(kind, **size)
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
        forced = sources is None
        new_tokens = args.new_tokens if forced else 200
        g = torch.Generator().manual_seed(1)
        for batch in [int(b) for b in args.batch.split(",")]:
            for beams in [int(b) for b in args.beam.split(",")]:
                if batch * beams > args.max_rows:
                    continue
                if sources is None:
                    ids = torch.randint(5, size["vocab"] - 2, (batch, args.src_len), generator=g)
                else:  # consecutive test sentences, right-padded (pad = 1)
                    from fairseq.data import data_utils

                    ids = data_utils.collate_tokens(sources[:batch], 1, 2)
                mask = (ids != 1).long() if sources is not None else torch.ones_like(ids)
                ids, mask = ids.to(args.device), mask.to(args.device)
                run_once(model, ids, mask, beams, 2, forced)  # warm-up
                sides = ("stock", "seqfuse") + (("fused",) if args.fused_layers else ())
                times = {side: [] for side in sides}
                first: dict = {}
                identical = fused_identical = True
                for r in range(args.repeats):
                    order = sides if r % 2 == 0 else sides[::-1]
                    outs = {}
                    for side in order:
                        if side != "stock":
                            seqfuse.optimize(model, fused_layers=side == "fused")
                        try:
                            t0, _ = run_once(model, ids, mask, beams, 2, forced)  # warm
                            t, outs[side] = run_once(model, ids, mask, beams, new_tokens, forced)
                        finally:
                            hf.restore(model)
                        times[side].append(t)
                        first.setdefault(side, []).append(t0)
                    identical &= torch.equal(outs["stock"], outs["seqfuse"])
                    if "fused" in outs:
                        fused_identical &= torch.equal(outs["stock"], outs["fused"])
                st, sf = statistics.median(times["stock"]), statistics.median(times["seqfuse"])
                row = dict(
                    model=name,
                    batch=batch,
                    beam=beams,
                    stock_s=round(st, 4),
                    seqfuse_s=round(sf, 4),
                    speedup=round(st / sf, 3),
                    identical=identical,
                    sent_s_stock=round(batch / st, 2),
                    sent_s_seqfuse=round(batch / sf, 2),
                )
                line = (
                    f"{name:13s} batch {batch:3d} beam {beams}: stock {st:7.3f}s  "
                    f"seqfuse {sf:7.3f}s  x{st / sf:5.2f}  identical={identical}"
                )
                if args.fused_layers:
                    fu = statistics.median(times["fused"])
                    row.update(
                        fused_s=round(fu, 4),
                        fused_first_s=round(statistics.median(first["fused"]), 4),
                        fused_speedup=round(st / fu, 3),
                        fused_identical_tokens=fused_identical,
                    )
                    line += f"  fused {fu:7.3f}s x{st / fu:5.2f} same tokens={fused_identical}"
                rows.append(row)
                print(line, flush=True)
    result = dict(
        what=f"HF generate beam search, stock vs seqfuse.optimize ({args.device}, {args.dtype})",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads",
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            seqfuse=seqfuse.__version__,
        ),
        git_revision=source_revision(),
        env={k: v for k, v in sorted(os.environ.items()) if k.startswith("SEQFUSE_")},
        settings=vars(args),
        rows=rows,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
