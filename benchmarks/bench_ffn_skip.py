"""The second feed-forward product on real ReLU activations: the packed
GEMM dense against skipping the zero inputs (``linear_packed(...,
skip_zeros=True)``), the Multi30k model's decoder layers at beam 5.

Stock fairseq's generator runs the first test sentences; a hook keeps some of
the decoder's fc2 inputs (their rows of zeros as the search makes them).
Each kept input is then multiplied both ways (the best of ``--reps`` calls
each, one and two threads), the outputs compared bit for bit. Prints the
summed times and their ratio; the figures belong to the machine.

    .venv/bin/python benchmarks/bench_ffn_skip.py --batch 64 --json out.json
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


def capture(batch: int, sentences: int, every: int):
    """(fc2 weights and biases per layer, kept inputs as (layer, [rows, ffn]))."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch
    from fairseq import checkpoint_utils
    from fairseq.sequence_generator import SequenceGenerator

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(MODEL_DIR / "checkpoint_best.pt")], arg_overrides={"data": str(MODEL_DIR / "data-bin")}
    )
    model = models[0].eval()
    task.load_dataset("test")
    ds = task.dataset("test")
    ids = sorted(range(min(sentences, len(ds))), key=lambda i: ds.src_sizes[i])
    seen: list = []

    def hook(layer):
        def keep(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].size(-1))
            if x.size(0) >= 3:
                seen.append((layer, x.detach().clone()))

        return keep

    for i, lay in enumerate(model.decoder.layers):
        lay.fc2.register_forward_pre_hook(hook(i))
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=5)
    with torch.no_grad():
        for s in range(0, len(ids), batch):
            gen.generate([model], ds.collater([ds[i] for i in ids[s : s + batch]]))
    weights = [(lay.fc2.weight.detach(), lay.fc2.bias.detach()) for lay in model.decoder.layers]
    return weights, seen[::every]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sentences", type=int, default=128)
    ap.add_argument("--every", type=int, default=4, help="keep every n-th fc2 input")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from seqfuse.info import source_revision
    from seqfuse.ops import linear as packed_linear

    weights, inputs = capture(args.batch, args.sentences, args.every)
    packs = [(packed_linear.packed(w), b) for w, b in weights]
    zeros = sum(float((x == 0).float().mean()) for _, x in inputs) / len(inputs)
    result = dict(
        what="fc2 of the Multi30k decoder on real activations: packed GEMM dense vs zero skipping",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=platform.processor() or platform.machine(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch=torch.__version__,
        revision=source_revision(),
        batch=args.batch,
        sentences=args.sentences,
        inputs=len(inputs),
        rows=[int(x.size(0)) for _, x in inputs],
        zero_fraction=round(zeros, 4),
        threads={},
    )
    for threads in (1, 2):
        torch.set_num_threads(threads)
        total = {False: 0.0, True: 0.0}
        for layer, x in inputs:
            pack, bias = packs[layer]
            outs = {}
            for skip in (False, True):
                best = float("inf")
                for _ in range(args.reps):
                    t = time.perf_counter()
                    outs[skip] = torch.ops.seqfuse.linear_packed(x, pack, bias, bias.numel(), skip)
                    best = min(best, time.perf_counter() - t)
                total[skip] += best
            if not torch.equal(outs[False], outs[True]):
                raise SystemExit("skipping changed a product's bits")
        row = dict(
            dense_ms=round(total[False] * 1e3, 2),
            skip_ms=round(total[True] * 1e3, 2),
            dense_over_skip=round(total[False] / total[True], 3),
        )
        result["threads"][threads] = row
        print(
            f"{threads} thread(s): {len(inputs)} products, {zeros:.0%} zero inputs: dense "
            f"{row['dense_ms']} ms, skipping {row['skip_ms']} ms, {row['dense_over_skip']}x",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
