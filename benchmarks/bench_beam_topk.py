"""Micro-benchmark of one beam-search step: the fused op against stock's
computation (log_softmax over the vocabulary, fairseq's edits, + cumulative
scores, torch.topk over beam x vocab).

    python benchmarks/bench_beam_topk.py                 # CPU, and CUDA if present
    python benchmarks/bench_beam_topk.py --device cuda --json out.json

Prints median milliseconds per step for both and their ratio (stock / fused),
side by side, with the context (device, versions, threads).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqfuse.ops.beam_topk import beam_topk, beam_topk_reference, which_backend  # noqa: E402

PAD, UNK, EOS = 1, 3, 2


def _time(fn, device: str, repeat: int, warmup: int = 2, clock=time.perf_counter) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs (CUDA: events)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeat):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = clock()
            fn()
            times.append(clock() - t0)
    return statistics.median(times)


def bench(device: str, bszs, beams, vocabs, repeat: int, dtype: torch.dtype, clock) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for vocab in vocabs:
        for bsz in bszs:
            for beam in beams:
                logits = (torch.randn(bsz * beam, vocab, generator=g) * 3).to(device, dtype)
                cum = (-torch.rand(bsz * beam, generator=g) * 10).to(device) if beam > 1 else None
                args = (logits, cum, beam, 2 * beam, PAD, UNK, EOS)
                t_stock = _time(lambda a=args: beam_topk_reference(*a), device, repeat, clock=clock)
                t_fused = _time(lambda a=args: beam_topk(*a), device, repeat, clock=clock)
                rows.append(
                    {
                        "device": device,
                        "dtype": str(dtype).split(".")[-1],
                        "bsz": bsz,
                        "beam": beam,
                        "vocab": vocab,
                        "backend": which_backend(logits).split(" ")[0],
                        "stock_ms": t_stock * 1e3,
                        "fused_ms": t_fused * 1e3,
                        "ratio": t_stock / t_fused,
                    }
                )
                r = rows[-1]
                print(
                    f"{device:>4} {r['dtype']:>8} {vocab:>6} {bsz:>4} {beam:>4} "
                    f"{r['stock_ms']:>10.3f} {r['fused_ms']:>10.3f} {r['ratio']:>7.1f}x  {r['backend']}",
                    flush=True,
                )
    return rows


def context() -> dict:
    ctx = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        ctx["cuda"] = torch.version.cuda
        ctx["gpu"] = torch.cuda.get_device_name()
    return ctx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    ap.add_argument("--bsz", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--beam", type=int, nargs="+", default=[1, 4, 5])
    ap.add_argument("--vocab", type=int, nargs="+", default=[8003, 32000])
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="CPU timings: wall clock, or the process's CPU time (steadier on a shared or "
        "CPU-quota-throttled machine; sums all threads)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if a.device == "cuda":
            print("bench_beam_topk: no CUDA device", file=sys.stderr)
            return 1
        devices.remove("cuda")
    ctx = context()
    ctx["clock"] = a.clock
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    print(" ".join(f"{k}={v}" for k, v in ctx.items()))
    print(
        f"{'dev':>4} {'dtype':>8} {'vocab':>6} {'bsz':>4} {'beam':>4} {'stock ms':>10} {'fused ms':>10} {'ratio':>8}"
    )
    rows = []
    for device in devices:
        rows += bench(device, a.bsz, a.beam, a.vocab, a.repeat, getattr(torch, a.dtype), clock)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"context": ctx, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
