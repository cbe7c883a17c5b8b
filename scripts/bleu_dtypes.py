"""BLEU of the Multi30k model in fp32, fp16 and bf16: stock fairseq vs seqfuse.

For each dtype the model is cast (``model.to(dtype)``, as ``--fp16`` does) and
the test set is translated by fairseq's stock ``SequenceGenerator`` and by
``seqfuse.generation.SequenceGenerator`` (beam 5) on the same batches. Prints,
per dtype: sacreBLEU and chrF of each, the BLEU change against fp32, and how
many hypotheses (tokens and score) are identical between stock and seqfuse.
Runs on the CPU by default (half-precision GEMMs on a CPU are slow: use
``--sentences``), on a GPU with ``--device cuda``.

    .venv/bin/python scripts/bleu_dtypes.py --out benchmarks/results/bleu-dtypes.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_MODEL = (
    Path(os.environ.get("SEQFUSE_SHARED", ROOT.parent / "shared")) / "models" / "multi30k_en_de"
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(SHARED_MODEL))
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--sentences", type=int, default=1000, help="first N test sentences")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)

    import sacrebleu
    import torch
    from fairseq import checkpoint_utils, utils
    from fairseq.sequence_generator import SequenceGenerator as Stock

    import seqfuse
    from seqfuse import fairseq_plugin
    from seqfuse.generation import SequenceGenerator as Seqfuse

    fairseq_plugin.install()  # weights-only loading of the checkpoint
    model_dir = Path(args.model_dir)
    if not (model_dir / "checkpoint_best.pt").is_file():
        print(f"bleu_dtypes: no checkpoint_best.pt in {model_dir}", file=sys.stderr)
        return 2
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(model_dir / "checkpoint_best.pt")], arg_overrides={"data": str(model_dir / "data-bin")}
    )
    task.load_dataset("test")
    ds = task.dataset("test")
    tgt = task.target_dictionary
    n = min(args.sentences, len(ds))
    # the first n test sentences, batched by length as fairseq-generate does
    order = sorted(range(n), key=lambda i: (ds.num_tokens(i), i))
    chunks = [order[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
    batches = [ds.collater([ds[i] for i in c]) for c in chunks]

    def detok(tokens):
        return tgt.string(utils.strip_pad(tokens, tgt.pad()), "sentencepiece")

    refs = {}
    for b in batches:
        for i, sid in enumerate(b["id"].tolist()):
            refs[sid] = detok(b["target"][i])
    ids = sorted(refs)

    rows, base = [], {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        model = models[0].to(device=args.device, dtype=dtype).eval()
        out = {}
        for side, cls in (("stock", Stock), ("seqfuse", Seqfuse)):
            gen = cls([model], tgt, beam_size=args.beam)
            hyps, t0 = {}, time.perf_counter()
            for b in batches:
                b = utils.move_to_cuda(b) if args.device.startswith("cuda") else b
                with torch.no_grad():
                    res = gen.generate([model], b)
                for i, sid in enumerate(b["id"].tolist()):
                    hyps[sid] = (res[i][0]["tokens"].cpu(), float(res[i][0]["score"]))
            out[side] = (hyps, time.perf_counter() - t0)
        scores = {}
        for side, (hyps, secs) in out.items():
            text = [detok(hyps[s][0]) for s in ids]
            ref = [refs[s] for s in ids]
            scores[side] = dict(
                bleu=round(sacrebleu.corpus_bleu(text, [ref]).score, 2),
                chrf=round(sacrebleu.corpus_chrf(text, [ref]).score, 2),
                seconds=round(secs, 2),
            )
        same = sum(
            torch.equal(out["stock"][0][s][0], out["seqfuse"][0][s][0])
            and out["stock"][0][s][1] == out["seqfuse"][0][s][1]
            for s in ids
        )
        if not base:
            base = scores
        row = dict(
            dtype=name,
            sentences=len(ids),
            stock=scores["stock"],
            seqfuse=scores["seqfuse"],
            identical=same,
            bleu_change_vs_fp32=dict(
                stock=round(scores["stock"]["bleu"] - base["stock"]["bleu"], 2),
                seqfuse=round(scores["seqfuse"]["bleu"] - base["seqfuse"]["bleu"], 2),
            ),
        )
        rows.append(row)
        print(
            f"{name:9s} stock BLEU {scores['stock']['bleu']:6.2f} ({scores['stock']['seconds']:6.1f} s)"
            f"  seqfuse BLEU {scores['seqfuse']['bleu']:6.2f} ({scores['seqfuse']['seconds']:6.1f} s)"
            f"  change vs fp32 {row['bleu_change_vs_fp32']['seqfuse']:+.2f}"
            f"  identical (tokens and score) {same}/{len(ids)}",
            flush=True,
        )
    result = dict(
        what="Multi30k test BLEU per dtype, stock fairseq vs seqfuse generator, beam "
        f"{args.beam}",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=args.device if args.device != "cpu" else f"CPU ({platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        versions=dict(torch=torch.__version__, seqfuse=seqfuse.__version__,
                      python=platform.python_version()),
        rows=rows,
    )  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
