"""Hugging Face fused generate with the self-attention K/V in buffers with
room (``SEQFUSE_HF_KV_ROOMS``, on by default) against transformers' cat, in
one process, alternated round by round (the median and the best of each).
Each round checks that both give the same sequences and, for beam search,
the same per-step scores, bit for bit (the script fails otherwise). Greedy
steps append in place; beam search's steps, which reorder, keep their
gather and append either way (its rows are the control).

    .venv/bin/python benchmarks/bench_kv_rooms.py --models marian-small,gpt2-small \\
        --batch 16 --beams 1,5 --new-tokens 30,120 --rounds 6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="marian-small,gpt2-small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--beams", default="1,5")
    ap.add_argument("--new-tokens", default="30,120")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import bench_hf
    import torch

    import seqfuse
    from integrations import hf, hf_exact_step
    from seqfuse.info import source_revision

    rows = []
    for name in args.models.split(","):
        kind, size = bench_hf.MODELS[name]
        torch.manual_seed(0)
        model = bench_hf.build(kind, **size)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, size["vocab"] - 2, (args.batch, 20), generator=g)
        mask = torch.ones_like(ids)
        seqfuse.optimize(model, fused_layers=True)
        try:
            for beams in map(int, args.beams.split(",")):
                for nt in map(int, args.new_tokens.split(",")):

                    def run(on: bool, beams=beams, nt=nt, model=model, ids=ids, mask=mask):
                        os.environ[hf_exact_step.ROOMS_ENV] = "1" if on else "0"
                        kw = dict(num_beams=beams, min_new_tokens=nt, max_new_tokens=nt)
                        if beams > 1:
                            kw.update(return_dict_in_generate=True, output_scores=True)
                        with torch.no_grad():
                            t = time.perf_counter()
                            out = model.generate(ids, attention_mask=mask, **kw)
                            return time.perf_counter() - t, out

                    run(True), run(False)  # warm-up
                    times: dict = {True: [], False: []}
                    steps0 = hf_exact_step.STATS["room_steps"]
                    for r in range(args.rounds):
                        outs = {}
                        for on in (True, False) if r % 2 == 0 else (False, True):
                            t, outs[on] = run(on)
                            times[on].append(t)
                        a, b = outs[True], outs[False]
                        if beams == 1:
                            same = torch.equal(a, b)
                        else:
                            same = torch.equal(a.sequences, b.sequences) and all(
                                torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True)
                            )
                        if not same:
                            raise SystemExit(f"{name} beams {beams}: outputs differ")
                    on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
                    row = dict(
                        model=name,
                        batch=args.batch,
                        beams=beams,
                        new_tokens=nt,
                        rooms_s=round(on_s, 4),
                        cat_s=round(off_s, 4),
                        speedup=round(off_s / on_s, 3),
                        best_speedup=round(min(times[False]) / min(times[True]), 3),
                        room_steps=hf_exact_step.STATS["room_steps"] - steps0,
                        identical=True,
                    )
                    rows.append(row)
                    print(
                        f"{name:12s} batch {args.batch} beams {beams} new tokens {nt:4d}: "
                        f"rooms {on_s:.3f}s cat {off_s:.3f}s x{off_s / on_s:.3f} "
                        f"(best x{row['best_speedup']:.3f}) identical",
                        flush=True,
                    )
        finally:
            hf.restore(model)
            os.environ.pop(hf_exact_step.ROOMS_ENV, None)
    result = dict(
        what="HF fused generate: K/V rooms vs transformers' cat, alternated in one process",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        revision=source_revision(),
        rows=rows,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
