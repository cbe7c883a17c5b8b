"""fairseq's own command lines, stock vs with the seqfuse plugin, side by side.

Runs ``fairseq-generate`` (the Multi30k test split, binarised) and
``fairseq-interactive`` (its raw English side through SentencePiece) on the
Multi30k model with beam 5, each command three ways, interleaved, in one run:

- ``stock``: the command as a user has it;
- ``seqfuse``: the same command plus ``--user-dir`` (exact mode: every
  S/H/D/P line is expected to equal stock's);
- ``seqfuse-fused``: that with ``SEQFUSE_FUSED_LAYERS=1`` (same translations,
  scores within 1e-5: the printed score digits may differ).

fairseq-generate runs at the given batch sizes (``--generate-batches``)
and, with ``--generate-max-tokens``, with its own batching by a budget of
source tokens (what it does when given no batch size: ``--max-tokens
12000``: the 1000 Multi30k test sentences in three batches, of 544, 368
and 88).

Times are fairseq's own translation time (fairseq-generate's ``Translated N
sentences ... (R sentences/s`` as N / R, to about 5 digits where its printed
seconds have one decimal; fairseq-interactive's ``translation time: X``), the
median of ``--repeats`` runs; ratios are stock's time over the provider's.
Output: a table, and JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seqfuse import bleu  # noqa: E402
from seqfuse._ext import FUSED_LAYERS_ENV  # noqa: E402
from seqfuse.info import cpu_description, cpu_probe, probe_warning, source_revision  # noqa: E402

SHARED = Path(os.environ.get("SEQFUSE_SHARED", ROOT.parent / "shared"))
PROVIDERS = ("stock", "seqfuse", "seqfuse-fused")
# fairseq-generate prints its time to 0.1 s (about 3% of a 3 s run), and the
# sentences per second it took to 0.01: the time is read from the rate.
_GENERATE_TIME = re.compile(
    r"Translated ([0-9,]+) sentences \([0-9,]+ tokens\) in ([0-9.]+)s \(([0-9.]+) sentences/s"
)
_INTERACTIVE_TIME = re.compile(r"translation time:\s*([0-9.]+)")


def translation_time(output: str) -> float | None:
    """fairseq's translation time in a command's output: fairseq-generate's
    sentences over its sentences per second (its printed seconds when the
    rate is 0), or fairseq-interactive's ``translation time``; None if
    neither is there."""
    m = _GENERATE_TIME.search(output)
    if m is not None:
        sentences = int(m.group(1).replace(",", ""))
        seconds, rate = float(m.group(2)), float(m.group(3))
        return sentences / rate if rate > 0 else seconds
    m = _INTERACTIVE_TIME.search(output)
    return None if m is None else float(m.group(1))


def generate_command(
    model_dir: Path, batch: int | None, beam: int, max_tokens: int | None = None
) -> list[str]:
    """fairseq-generate on the test set: ``--batch-size batch``, or
    ``--max-tokens max_tokens`` (its own batching: batches of up to that many
    source tokens, sorted by length; 12000 is what it takes when given
    neither)."""
    if (batch is None) == (max_tokens is None):
        raise ValueError("give a batch size or a token budget")
    batching = (
        ["--batch-size", str(batch), "--required-batch-size-multiple", "1"]
        if batch is not None
        else ["--max-tokens", str(max_tokens)]
    )
    return [
        bleu._fairseq_tool("fairseq-generate"),
        str(model_dir / "data-bin"),
        "--path",
        str(model_dir / "checkpoint_best.pt"),
        "--gen-subset",
        "test",
        "--beam",
        str(beam),
        *batching,
        "--post-process",
        "sentencepiece",
    ]


def interactive_command(model_dir: Path, batch: int, beam: int, input_path: Path) -> list[str]:
    return [
        bleu._fairseq_tool("fairseq-interactive"),
        str(model_dir),
        "--path",
        str(model_dir / "checkpoint_best.pt"),
        "--source-lang",
        "en",
        "--target-lang",
        "de",
        "--bpe",
        "sentencepiece",
        "--sentencepiece-model",
        str(model_dir / "spm8k.model"),
        "--beam",
        str(beam),
        "--batch-size",
        str(batch),
        "--buffer-size",
        str(batch),
        "--input",
        str(input_path),
    ]


def run(cmd: list[str], provider: str, threads: int) -> tuple[list[str], float, float]:
    """(output lines without timing lines, fairseq's translation time, wall)."""
    env = dict(os.environ)
    env.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # stock needs it, set for all
    env["OMP_NUM_THREADS"] = str(threads)
    env[FUSED_LAYERS_ENV] = "1" if provider == "seqfuse-fused" else "0"
    if provider != "stock":
        cmd = cmd + ["--user-dir", bleu.seqfuse_user_dir()]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        raise SystemExit(f"{provider}: {' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    both = proc.stdout + proc.stderr
    seconds = translation_time(both)
    if seconds is None:
        raise SystemExit(f"{provider}: no translation time in the output of {cmd[0]}")
    lines = [
        line
        for line in proc.stdout.splitlines()
        if line[:2] in ("S-", "T-", "H-", "D-", "P-") and not line.startswith("W-")
    ]
    return lines, seconds, wall


def _by_kind(lines: list[str], kind: str) -> dict[str, list[str]]:
    out = {}
    for line in lines:
        if line.startswith(kind + "-"):
            head, *rest = line.split("\t")
            out[head] = rest
    return out


def compare(stock: list[str], other: list[str]) -> dict:
    """Line-by-line agreement with stock's output."""
    same_lines = sum(a == b for a, b in zip(stock, other)) if len(stock) == len(other) else 0
    d0, d1 = _by_kind(stock, "D"), _by_kind(other, "D")
    same_text = sum(1 for k, v in d0.items() if k in d1 and d1[k][-1] == v[-1])
    h0, h1 = _by_kind(stock, "H"), _by_kind(other, "H")
    diffs = [abs(float(h0[k][0]) - float(h1[k][0])) for k in h0 if k in h1]
    return {
        "lines": len(stock),
        "identical_lines": same_lines,
        "translations": len(d0),
        "identical_translations": same_text,
        "max_score_diff": max(diffs) if diffs else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "multi30k_en_de")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "multi30k")
    ap.add_argument("--generate-batches", default="16,64", help="fairseq-generate --batch-size")
    ap.add_argument(
        "--generate-max-tokens",
        default="",
        help="fairseq-generate --max-tokens (its own batching; 12000 is its default)",
    )
    ap.add_argument("--interactive-batches", default="1,16", help="fairseq-interactive batches")
    ap.add_argument("--lines", type=int, default=400, help="interactive input lines")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="result file stem")
    args = ap.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    if providers[0] != "stock" or any(p not in PROVIDERS for p in providers):
        ap.error(f"--providers: 'stock' first, then any of {PROVIDERS[1:]}")
    if not (args.model / "checkpoint_best.pt").is_file():
        ap.error(f"no checkpoint_best.pt in {args.model}")

    import torch

    probe_before = cpu_probe(args.threads)
    with tempfile.TemporaryDirectory(prefix="seqfuse-bench-cli-") as tmp:
        src = Path(tmp) / "input.en"
        with gzip.open(args.data / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f][: args.lines]
        src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        # (cli, batch size, token budget, command)
        jobs = [
            ("fairseq-generate", int(b), None, generate_command(args.model, int(b), args.beam))
            for b in args.generate_batches.split(",")
            if b
        ]
        jobs += [
            (
                "fairseq-generate",
                None,
                int(t),
                generate_command(args.model, None, args.beam, max_tokens=int(t)),
            )
            for t in args.generate_max_tokens.split(",")
            if t
        ]
        jobs += [
            (
                "fairseq-interactive",
                int(b),
                None,
                interactive_command(args.model, int(b), args.beam, src),
            )
            for b in args.interactive_batches.split(",")
            if b
        ]
        rows = []
        for cli, batch, max_tokens, cmd in jobs:
            times: dict[str, list[float]] = {p: [] for p in providers}
            outputs: dict[str, list[str]] = {}
            for r in range(args.repeats):
                order = providers if r % 2 == 0 else providers[::-1]
                for p in order:
                    out, seconds, _wall = run(cmd, p, args.threads)
                    times[p].append(seconds)
                    outputs.setdefault(p, out)
            med = {p: statistics.median(v) for p, v in times.items()}
            row = {"cli": cli, "batch": batch, "beam": args.beam, "seconds": med}
            if max_tokens is not None:
                row["max_tokens"] = max_tokens
            for p in providers[1:]:
                # paired: the median of each repeat's own ratio (both ran
                # back to back there), steadier on a machine whose speed drifts
                paired = statistics.median(a / b for a, b in zip(times["stock"], times[p]))
                row[p] = {
                    "speedup": med["stock"] / med[p],
                    "speedup_paired": paired,
                    **compare(outputs["stock"], outputs[p]),
                }
            rows.append(row)
            print(_format_row(row, providers), flush=True)

    import fairseq

    import seqfuse

    result = {
        "date": date.today().isoformat(),
        "git_revision": source_revision(),
        "machine": {
            "cpu": cpu_description(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "cpu_probe": {"before": probe_before, "after": cpu_probe(args.threads)},
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "fairseq": fairseq.__version__,
            "seqfuse": seqfuse.__version__,
        },
        "model": str(args.model.name),
        "interactive_lines": args.lines,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"cli-cpu-{args.threads}thread-{result['date']}"
    path = args.results_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    warning = probe_warning(**result["machine"]["cpu_probe"])
    if warning:
        print(warning)
    print(f"wrote {path}")
    return 0


def _format_row(row: dict, providers: list[str]) -> str:
    batching = (
        f"batch {row['batch']:3d}"
        if row["batch"] is not None
        else f"max-tokens {row['max_tokens']}"
    )
    parts = [f"{row['cli']:20s} {batching}  stock {row['seconds']['stock']:.2f}s"]
    for p in providers[1:]:
        r = row[p]
        diff = r["max_score_diff"]
        parts.append(
            f"{p} {row['seconds'][p]:.2f}s {r['speedup']:.2f}x "
            f"(lines {r['identical_lines']}/{r['lines']}, "
            f"translations {r['identical_translations']}/{r['translations']}, "
            f"max score diff {diff:.1e})"
            if diff is not None
            else f"{p} {row['seconds'][p]:.2f}s {r['speedup']:.2f}x"
        )
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
