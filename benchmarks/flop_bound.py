"""How fast beam search on the Multi30k model can be on this CPU in fp32: the
matrix-multiply work of a real search, over this machine's measured GEMM peak.

One run does three things side by side:

1. runs seqfuse's generator with the fused layers over the Multi30k test set
   (beam 5) and counts the rows it decodes per step and the source tokens it
   encodes (the same search as stock's: the same hypotheses, so the same rows
   from the second step on; stock also decodes `beam` copies of each
   sentence's first step, which seqfuse decodes once);
2. turns them into multiply-add work: per decoder row and layer the QKV,
   attention output, cross-attention query and output, and both FFN
   projections, attention over the cache and the source, and the vocabulary
   projection; per source token and layer the encoder layer and the
   cross-attention K/V;
3. measures the packed GEMM's peak on this machine (the best of a few large
   projections) and stock fairseq's time for the same search.

It prints the search's time at that peak (a lower bound: every flop at the
best GEMM rate, nothing else costs) and the most any fp32 implementation that
does this work could gain over stock here. Not a test: the figures belong to
the machine.

    .venv/bin/python benchmarks/flop_bound.py --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL_DIR = Path(
    os.environ.get("SEQFUSE_SHARED", ROOT.parent / "shared"), "models", "multi30k_en_de"
)


def load():
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(MODEL_DIR / "checkpoint_best.pt")], arg_overrides={"data": str(MODEL_DIR / "data-bin")}
    )
    task.load_dataset("test")
    return models[0].eval(), task


def batches(task, batch: int, sentences: int):
    ds = task.dataset("test")
    ids = sorted(range(min(sentences, len(ds))), key=lambda i: ds.src_sizes[i])
    return [ds.collater([ds[i] for i in ids[s : s + batch]]) for s in range(0, len(ids), batch)]


def count_work(model, task, samples, beam: int) -> dict:
    """Decoder rows (with their self-attention lengths and source lengths)
    and encoder tokens of seqfuse's fused search over ``samples``."""
    import torch

    from seqfuse.generation import SequenceGenerator
    from seqfuse.layers import optimize_fairseq_model

    ok, why = optimize_fairseq_model(model)
    if not ok:
        raise SystemExit(f"optimize_fairseq_model refused: {why}")
    dec = model.decoder
    tally = {"rows": 0, "self_keys": 0, "cross_keys": 0, "src_tokens": 0, "src_attn": 0, "steps": 0}
    src_len = {"S": 0}
    real = type(dec).extract_features_scriptable

    def counting(self, prev_output_tokens, *args, **kw):
        rows, t = prev_output_tokens.shape
        tally["rows"] += rows
        tally["self_keys"] += rows * t  # the step attends to every slot so far
        tally["cross_keys"] += rows * src_len["S"]
        tally["steps"] += 1
        return real(self, prev_output_tokens, *args, **kw)

    gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam)
    dec.extract_features_scriptable = counting.__get__(dec)
    try:
        with torch.no_grad():
            for s in samples:
                src = s["net_input"]["src_tokens"]
                src_len["S"] = src.size(1)
                tally["src_tokens"] += src.numel()
                tally["src_attn"] += src.size(0) * src.size(1) ** 2
                gen.generate([model], s)
    finally:
        del dec.extract_features_scriptable
    return tally


def flops(model, tally: dict) -> dict:
    """Multiply-add flops (2 per multiply-add) of the counted work."""
    enc, dec = model.encoder, model.decoder
    c = dec.embed_dim
    f = dec.layers[0].fc1.out_features
    v = dec.output_projection.out_features
    le, ld = len(enc.layers), len(dec.layers)
    ce = enc.layers[0].embed_dim
    fe = enc.layers[0].fc1.out_features
    per_row_layer = 2 * (3 * c * c + c * c + c * c + c * c + 2 * c * f)
    decoder = tally["rows"] * ld * per_row_layer
    decoder_attn = ld * 4 * c * (tally["self_keys"] + tally["cross_keys"])
    vocab = tally["rows"] * 2 * c * v
    encoder = tally["src_tokens"] * le * 2 * (3 * ce * ce + ce * ce + 2 * ce * fe)
    encoder_attn = le * 4 * ce * tally["src_attn"]
    cross_kv = tally["src_tokens"] * ld * 2 * (ce * 2 * c)
    out = {
        "decoder_gemm": decoder,
        "decoder_attention": decoder_attn,
        "vocab_projection": vocab,
        "encoder_gemm": encoder,
        "encoder_attention": encoder_attn,
        "cross_kv": cross_kv,
    }
    out["total"] = sum(out.values())
    return out


def gemm_peak(repeats: int = 20) -> dict:
    """Best GFLOP/s of seqfuse's packed GEMM over the model's large shapes."""
    import torch

    from seqfuse.ops.linear import packed

    best = {}
    for m, k, n in ((320, 256, 8003), (640, 256, 1024), (640, 1024, 256), (1024, 256, 768)):
        w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(m, k)
        pw = packed(w)
        for _ in range(3):
            torch.ops.seqfuse.linear_packed(x, pw, b, n)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.ops.seqfuse.linear_packed(x, pw, b, n)
        dt = (time.perf_counter() - t0) / repeats
        best[f"{m}x{k}x{n}"] = 2 * m * k * n / dt / 1e9
    return best


def stock_seconds(model, task, samples, beam: int) -> float:
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam)
    with torch.no_grad():
        gen.generate([model], samples[0])  # warm-up
        t0 = time.perf_counter()
        for s in samples:
            gen.generate([model], s)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    import torch

    from seqfuse.info import cpu_description

    torch.set_num_threads(args.threads)
    stock_model, task = load()
    samples = batches(task, args.batch, args.sentences)
    stock_s = stock_seconds(stock_model, task, samples, args.beam)
    fused_model, _ = load()
    tally = count_work(fused_model, task, samples, args.beam)
    work = flops(fused_model, tally)
    peaks = gemm_peak()
    peak = max(peaks.values())
    bound = work["total"] / (peak * 1e9)

    print(f"Multi30k test, {args.sentences} sentences, batch {args.batch}, beam {args.beam}")
    print(f"decoder rows {tally['rows']}, steps {tally['steps']}, source tokens "
          f"{tally['src_tokens']}")  # fmt: skip
    for name, value in work.items():
        print(f"  {name:18s} {value / 1e9:8.1f} GFLOP")
    print("packed GEMM GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print(f"time at {peak:.0f} GFLOP/s: {bound:.2f} s; stock fairseq {stock_s:.2f} s")
    print(f"most any fp32 implementation of this search can gain over stock here: "
          f"{stock_s / bound:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "cpu": cpu_description(),
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "settings": vars(args) | {"json": str(args.json)},
                    "counts": tally,
                    "gflop": {k: v / 1e9 for k, v in work.items()},
                    "gemm_gflops": peaks,
                    "bound_seconds": bound,
                    "stock_seconds": stock_s,
                    "max_ratio_over_stock": stock_s / bound,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
