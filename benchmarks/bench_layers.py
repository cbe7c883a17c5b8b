"""Stock fairseq layers vs seqfuse fused layers under fairseq's stock
SequenceGenerator on the Multi30k En->De model (CPU, beam 5).

Each (layers, batch size) runs in a fresh subprocess so that its peak memory
(ru_maxrss) is its own; stock and fused runs are interleaved and their
sentences/s ratio is printed side by side. ``--profile`` prints where the time
of one fused and one stock batch goes (torch.profiler, self CPU time).

    .venv/bin/python benchmarks/bench_layers.py --batches 16 64 128 --sentences 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO.parent / "shared" / "models" / "multi30k_en_de"


def _load(fused: bool):
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    import torch
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(MODEL_DIR / "checkpoint_best.pt")], arg_overrides={"data": str(MODEL_DIR / "data-bin")}
    )
    model = models[0].eval()
    if fused:
        from seqfuse.layers import optimize_fairseq_model

        ok, why = optimize_fairseq_model(model)
        if not ok:
            raise SystemExit(f"optimize_fairseq_model refused: {why}")
    task.load_dataset("test")
    torch.set_grad_enabled(False)
    return model, task


def _batches(task, batch: int, sentences: int):
    ds = task.dataset("test")
    ids = list(range(min(sentences, len(ds))))
    ids.sort(key=lambda i: ds.src_sizes[i])  # fairseq batches by length too
    return [ds.collater([ds[i] for i in ids[s : s + batch]]) for s in range(0, len(ids), batch)]


def worker(fused: bool, batch: int, sentences: int, beam: int) -> dict:
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    model, task = _load(fused)
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam)
    batches = _batches(task, batch, sentences)
    gen.forward(batches[0])  # warm-up (allocator, thread pool)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    n = tokens = 0
    for b in batches:
        hypos = gen.forward(b)
        n += len(hypos)
        tokens += sum(len(h[0]["tokens"]) for h in hypos)
    dt = time.perf_counter() - t0
    return {
        "layers": "fused" if fused else "stock",
        "batch": batch,
        "sentences": n,
        "seconds": dt,
        "sent_per_s": n / dt,
        "tok_per_s": tokens / dt,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "maxrss_before_mb": rss_before / 1024,
        "threads": torch.get_num_threads(),
    }


def profile(batch: int, beam: int) -> None:
    import torch
    from fairseq.sequence_generator import SequenceGenerator

    for fused in (False, True):
        model, task = _load(fused)
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam)
        b = _batches(task, batch, batch)[0]
        gen.forward(b)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            gen.forward(b)
        print(f"== {'fused' if fused else 'stock'} layers, batch {batch}, beam {beam}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument(
        "--repeats", type=int, default=1, help="interleaved repeats; the median is reported"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0: torch's default)"
    )
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--worker", nargs=2, metavar=("LAYERS", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_layers.json"
    )
    args = ap.parse_args()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        res = worker(args.worker[0] == "fused", int(args.worker[1]), args.sentences, args.beam)
        print(json.dumps(res))
        return
    if args.profile:
        profile(args.batches[0], args.beam)
        return
    import torch

    ctx = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "beam": args.beam,
        "sentences": args.sentences,
    }
    print(json.dumps(ctx))
    rows = []
    print(
        f"{'batch':>5} {'stock sent/s':>12} {'fused sent/s':>12} {'speedup':>8} {'stock MB':>9} {'fused MB':>9}"
    )
    for batch in args.batches:
        runs: dict[str, list[dict]] = {"stock": [], "fused": []}
        for _ in range(args.repeats):
            for layers in ("stock", "fused"):  # interleaved, fresh processes
                cmd = [sys.executable, __file__, "--worker", layers, str(batch)]
                cmd += [
                    "--sentences",
                    str(args.sentences),
                    "--beam",
                    str(args.beam),
                    "--threads",
                    str(args.threads),
                ]
                out = subprocess.run(
                    cmd,
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "SEQFUSE_QUIET": "1"},
                )
                runs[layers].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {k: statistics.median(r["sent_per_s"] for r in v) for k, v in runs.items()}
        mem = {k: max(r["maxrss_mb"] for r in v) for k, v in runs.items()}
        row = {
            "batch": batch,
            **{f"{k}_sent_per_s": v for k, v in med.items()},
            "speedup": med["fused"] / med["stock"],
        }
        row.update({f"{k}_maxrss_mb": v for k, v in mem.items()})
        rows.append(row)
        print(
            f"{batch:>5} {med['stock']:>12.2f} {med['fused']:>12.2f} {row['speedup']:>7.2f}x "
            f"{mem['stock']:>9.0f} {mem['fused']:>9.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"context": ctx, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
