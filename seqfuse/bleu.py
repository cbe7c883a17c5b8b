"""Translate a test set with stock fairseq and with seqfuse, score both with sacreBLEU.

Both runs are the same unchanged ``fairseq-interactive`` command; the seqfuse run
adds ``--user-dir`` pointing at the seqfuse fairseq plugin. The report gives
BLEU and chrF (with sacreBLEU signatures), the share of sentences whose
translation is identical in both runs, and the speed ratio stock / seqfuse.

Usage::

    seqfuse-bleu --model ../shared/models/multi30k_en_de \\
        --src ../shared/data/multi30k/test_2016_flickr.en.gz \\
        --ref ../shared/data/multi30k/test_2016_flickr.de.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from seqfuse._ext import FUSED_LAYERS_ENV

# "seqfuse-fused": the plugin with SEQFUSE_FUSED_LAYERS=1 (the fused layers:
# same translations expected, scores within 1e-5 of stock's, not bit for bit).
PROVIDERS = ("stock", "seqfuse", "seqfuse-fused")


class BleuError(Exception):
    """A user-facing error: bad paths, empty input, unsupported model kind."""


@dataclass
class FairseqModel:
    """Where the pieces of a fairseq translation model live."""

    checkpoint: Path
    data_dir: Path  # holds dict.<src>.txt and dict.<tgt>.txt
    spm_model: Path | None
    source_lang: str
    target_lang: str


@dataclass
class Translation:
    """Output of one ``fairseq-interactive`` run, in input order."""

    provider: str
    hypotheses: list[str]  # detokenised text, one per input line
    scores: list[float]  # fairseq's hypothesis score per line
    wall_seconds: float  # the whole subprocess, start-up and model loading included
    translation_seconds: float  # fairseq's own "translation time"
    command: list[str] = field(default_factory=list)


def read_lines(path: str | os.PathLike) -> list[str]:
    """Lines of a text file (``.gz`` read transparently), without line ends."""
    path = Path(path)
    if not path.is_file():
        raise BleuError(f"file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def _lang_of(path: Path) -> str | None:
    name = path.name.removesuffix(".gz")
    suffix = Path(name).suffix
    return suffix[1:] if len(suffix) in (3, 4) else None


def _checkpoint_source_lang(checkpoint: Path, langs: list[str]) -> str | None:
    """The source language the checkpoint was trained with, when it says."""
    try:
        import torch

        state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return None
    for cfg in ((state.get("cfg") or {}).get("task"), state.get("args")):
        lang = getattr(cfg, "source_lang", None) if cfg is not None else None
        if lang is None and isinstance(cfg, dict):
            lang = cfg.get("source_lang")
        if lang in langs:
            return lang
    return None


def resolve_model(
    model: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    spm_model: str | os.PathLike | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
) -> FairseqModel:
    """Find checkpoint, dictionaries and SentencePiece model from what was given.

    ``model`` is a fairseq checkpoint (``.pt``) or a directory holding
    ``checkpoint_best.pt`` (or one ``.pt``). A Hugging Face model directory
    (``config.json``) is recognised and refused: not yet supported.
    """
    model = Path(model)
    if not model.exists():
        raise BleuError(f"model not found: {model}")
    if model.is_dir():
        if (model / "config.json").is_file() and not list(model.glob("*.pt")):
            raise BleuError(
                f"{model} looks like a Hugging Face model directory; Hugging Face models "
                "are not yet supported by seqfuse-bleu (pass a fairseq checkpoint)"
            )
        if (model / "checkpoint_best.pt").is_file():
            checkpoint = model / "checkpoint_best.pt"
        else:
            candidates = sorted(model.glob("*.pt"))
            if len(candidates) != 1:
                raise BleuError(
                    f"{model}: expected checkpoint_best.pt or exactly one .pt file, "
                    f"found {len(candidates)}"
                )
            checkpoint = candidates[0]
    else:
        checkpoint = model
    data = Path(data_dir) if data_dir is not None else checkpoint.parent
    if not data.is_dir():
        raise BleuError(f"data directory not found: {data}")
    dicts = sorted(p.name for p in data.glob("dict.*.txt"))
    if source_lang is None or target_lang is None:
        langs = [name.split(".")[1] for name in dicts]
        if source_lang is None and target_lang is None and len(langs) == 2:
            source_lang = _checkpoint_source_lang(checkpoint, langs)
        if len(langs) != 2:
            raise BleuError(
                f"{data}: cannot infer the language pair from {dicts}; "
                "pass --source-lang and --target-lang"
            )
        if source_lang is None and target_lang is None:
            raise BleuError(
                f"cannot tell the translation direction between {langs} (the checkpoint "
                "does not record it); pass --source-lang"
            )
        source_lang = source_lang or [x for x in langs if x != target_lang][0]
        target_lang = target_lang or [x for x in langs if x != source_lang][0]
    for lang in (source_lang, target_lang):
        if not (data / f"dict.{lang}.txt").is_file():
            raise BleuError(f"dictionary not found: {data / f'dict.{lang}.txt'}")
    if spm_model is None:
        found = sorted(data.glob("*.model")) or sorted(checkpoint.parent.glob("*.model"))
        spm = found[0] if len(found) == 1 else None
    else:
        spm = Path(spm_model)
        if not spm.is_file():
            raise BleuError(f"SentencePiece model not found: {spm}")
    return FairseqModel(checkpoint, data, spm, source_lang, target_lang)


def seqfuse_user_dir() -> str:
    """The seqfuse fairseq plugin directory (``--user-dir``)."""
    try:
        import seqfuse

        return seqfuse.fairseq_user_dir()
    except ImportError:
        return str(Path(__file__).resolve().parent.parent / "plugins" / "seqfuse_fairseq")


def _fairseq_tool(name: str) -> str:
    """A fairseq console script of this interpreter's environment."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BleuError(f"{name} not found (is fairseq installed in this environment?)")
    return found


def interactive_command(
    model: FairseqModel,
    *,
    beam: int = 5,
    batch_size: int = 64,
    lenpen: float = 1.0,
    seqfuse: bool = False,
    input_path: str = "-",
    extra: list[str] | None = None,
) -> list[str]:
    """The ``fairseq-interactive`` command line; seqfuse adds only ``--user-dir``."""
    cmd = [
        _fairseq_tool("fairseq-interactive"),
        str(model.data_dir),
        "--path",
        str(model.checkpoint),
        "--source-lang",
        model.source_lang,
        "--target-lang",
        model.target_lang,
        "--beam",
        str(beam),
        "--nbest",
        "1",
        "--lenpen",
        str(lenpen),
        "--batch-size",
        str(batch_size),
        "--buffer-size",
        str(max(batch_size, 1) * 4),
        "--input",
        input_path,
    ]
    if model.spm_model is not None:
        cmd += ["--bpe", "sentencepiece", "--sentencepiece-model", str(model.spm_model)]
    if seqfuse:
        cmd += ["--user-dir", seqfuse_user_dir()]
    return cmd + list(extra or [])


_TRANSLATION_TIME = re.compile(r"translation time:\s*([0-9.]+)")


def translate(
    model: FairseqModel,
    lines: list[str],
    *,
    provider: str = "stock",
    beam: int = 5,
    batch_size: int = 64,
    lenpen: float = 1.0,
    progress: bool = False,
    extra: list[str] | None = None,
) -> Translation:
    """Translate ``lines`` with one ``fairseq-interactive`` subprocess.

    ``provider`` is ``"stock"``, ``"seqfuse"`` (the same command plus the
    plugin's ``--user-dir``) or ``"seqfuse-fused"`` (that with
    ``SEQFUSE_FUSED_LAYERS=1``).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if not lines:
        raise BleuError("nothing to translate: the source is empty")
    env = dict(os.environ)
    # Stock checkpoints pickle an argparse.Namespace; torch >= 2.6 refuses to
    # unpickle it by default. Set for both runs so they differ only in --user-dir.
    env.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    env["PYTHONUNBUFFERED"] = "1"  # translations stream in for the progress bar
    env[FUSED_LAYERS_ENV] = "1" if provider == "seqfuse-fused" else "0"
    hyps: dict[int, str] = {}
    scores: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="seqfuse-bleu-") as tmp:
        src = Path(tmp) / "input.txt"
        src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        err_path = Path(tmp) / "stderr.txt"
        cmd = interactive_command(
            model,
            beam=beam,
            batch_size=batch_size,
            lenpen=lenpen,
            seqfuse=provider != "stock",
            input_path=str(src),
            extra=extra,
        )
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(lines), desc=provider, unit="sent", file=sys.stderr)
        start = time.perf_counter()
        with open(err_path, "w", encoding="utf-8") as err:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, encoding="utf-8"
            )
            assert proc.stdout is not None
            for raw in proc.stdout:
                if not raw.startswith("D-"):
                    continue
                head, score, text = (raw.rstrip("\n").split("\t", 2) + ["", ""])[:3]
                idx = int(head[2:])
                hyps[idx] = text
                scores[idx] = float(score)
                if bar is not None:
                    bar.update(1)
            rc = proc.wait()
        wall = time.perf_counter() - start
        if bar is not None:
            bar.close()
        stderr = err_path.read_text(encoding="utf-8", errors="replace")
    if rc != 0:
        tail = "\n".join(stderr.splitlines()[-25:])
        raise BleuError(f"{provider} fairseq-interactive failed (exit {rc}):\n{tail}")
    missing = [i for i in range(len(lines)) if i not in hyps]
    if missing:
        raise BleuError(f"{provider}: no translation for {len(missing)} lines (first {missing[0]})")
    match = _TRANSLATION_TIME.search(stderr)
    seconds = float(match.group(1)) if match else wall
    return Translation(
        provider=provider,
        hypotheses=[hyps[i] for i in range(len(lines))],
        scores=[scores[i] for i in range(len(lines))],
        wall_seconds=wall,
        translation_seconds=seconds,
        command=cmd,
    )


def score(hypotheses: list[str], references: list[str]) -> dict:
    """sacreBLEU BLEU and chrF of detokenised hypotheses, with signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def identical_rate(a: list[str], b: list[str]) -> tuple[int, float]:
    """Number and share of positions where ``a`` and ``b`` hold the same string."""
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
    same = sum(x == y for x, y in zip(a, b))
    return same, (same / len(a) if a else 1.0)


def evaluate(
    model: FairseqModel,
    sources: list[str],
    references: list[str],
    *,
    providers: tuple[str, ...] = PROVIDERS,
    beam: int = 5,
    batch_size: int = 64,
    lenpen: float = 1.0,
    progress: bool = False,
) -> dict:
    """Translate with each provider, score, compare; returns the report dict."""
    if not sources:
        raise BleuError("the source file is empty")
    if len(sources) != len(references):
        raise BleuError(
            f"source and reference differ in length: {len(sources)} vs {len(references)} lines"
        )
    report: dict = {
        "model": {k: None if v is None else str(v) for k, v in asdict(model).items()},
        "sentences": len(sources),
        "beam": beam,
        "batch_size": batch_size,
        "lenpen": lenpen,
        "providers": {},
    }
    outputs: dict[str, Translation] = {}
    for provider in providers:
        t = translate(
            model,
            sources,
            provider=provider,
            beam=beam,
            batch_size=batch_size,
            lenpen=lenpen,
            progress=progress,
        )
        outputs[provider] = t
        report["providers"][provider] = {
            **score(t.hypotheses, references),
            "translation_seconds": t.translation_seconds,
            "wall_seconds": t.wall_seconds,
            "sentences_per_second": len(sources) / t.translation_seconds
            if t.translation_seconds > 0
            else None,
        }
    if "stock" in outputs and "seqfuse" in outputs:
        same, rate = identical_rate(outputs["stock"].hypotheses, outputs["seqfuse"].hypotheses)
        report["identical"] = same
        report["identical_rate"] = rate
        report["first_differences"] = [
            {"line": i, "stock": a, "seqfuse": b}
            for i, (a, b) in enumerate(
                zip(outputs["stock"].hypotheses, outputs["seqfuse"].hypotheses)
            )
            if a != b
        ][:5]
        s, f = outputs["stock"].translation_seconds, outputs["seqfuse"].translation_seconds
        report["speed_ratio"] = s / f if f > 0 else None
    report["hypotheses"] = {p: t.hypotheses for p, t in outputs.items()}
    return report


def format_report(report: dict) -> str:
    lines = [
        f"{report['sentences']} sentences, beam {report['beam']}, batch {report['batch_size']}",
        f"{'provider':<10}{'BLEU':>8}{'chrF':>8}{'time (s)':>10}{'sent/s':>9}",
    ]
    for name, r in report["providers"].items():
        sps = r["sentences_per_second"]
        lines.append(
            f"{name:<10}{r['bleu']:>8.2f}{r['chrf']:>8.2f}{r['translation_seconds']:>10.2f}"
            f"{sps if sps is not None else float('nan'):>9.1f}"
        )
    first = next(iter(report["providers"].values()))
    lines.append(f"BLEU signature: {first['bleu_signature']}")
    lines.append(f"chrF signature: {first['chrf_signature']}")
    if "identical" in report:
        lines.append(
            f"identical outputs: {report['identical']}/{report['sentences']} "
            f"({100 * report['identical_rate']:.1f}%)"
        )
        for d in report["first_differences"]:
            lines.append(f"  line {d['line']}: stock={d['stock']!r} seqfuse={d['seqfuse']!r}")
        if report["speed_ratio"] is not None:
            lines.append(f"speed ratio stock/seqfuse time: {report['speed_ratio']:.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqfuse-bleu",
        description="Translate with stock fairseq and with seqfuse; sacreBLEU, chrF, "
        "identical-output rate and speed ratio.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="fairseq checkpoint (.pt) or a directory holding checkpoint_best.pt "
        "(Hugging Face model directories: not yet supported)",
    )
    p.add_argument("--data-dir", help="directory with dict.<lang>.txt (default: the model's)")
    p.add_argument("--spm-model", help="SentencePiece model (default: the one *.model found)")
    p.add_argument("--source-lang", help="default: inferred from the dictionaries")
    p.add_argument("--target-lang", help="default: inferred from the dictionaries")
    p.add_argument("--src", required=True, help="raw source text, one sentence a line (.gz ok)")
    p.add_argument("--ref", required=True, help="raw reference text, same lines (.gz ok)")
    p.add_argument("--max-sentences", type=int, help="use only the first N lines")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help="comma-separated subset of stock,seqfuse (default: both)",
    )
    p.add_argument("--json", help="write the report (with hypotheses) here")
    p.add_argument("--hyp-dir", help="write <provider>.hyp files here")
    p.add_argument(
        "--require-identical",
        action="store_true",
        help="exit with status 3 when stock and seqfuse translations differ",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        providers = tuple(x.strip() for x in args.providers.split(",") if x.strip())
        bad = [x for x in providers if x not in PROVIDERS]
        if bad or not providers:
            raise BleuError(f"unknown providers {bad}; choose from {PROVIDERS}")
        if args.max_sentences is not None and args.max_sentences < 1:
            raise BleuError("--max-sentences must be at least 1")
        source_lang = args.source_lang
        if source_lang is None and args.target_lang is None:
            source_lang = _lang_of(Path(args.src))  # test.en(.gz) -> en
        model = resolve_model(
            args.model, args.data_dir, args.spm_model, source_lang, args.target_lang
        )
        sources = read_lines(args.src)
        references = read_lines(args.ref)
        if not sources:
            raise BleuError(f"the source file is empty: {args.src}")
        if len(sources) != len(references):
            raise BleuError(
                f"{args.src} has {len(sources)} lines but {args.ref} has {len(references)}"
            )
        if args.max_sentences is not None:
            sources = sources[: args.max_sentences]
            references = references[: args.max_sentences]
        report = evaluate(
            model,
            sources,
            references,
            providers=providers,
            beam=args.beam,
            batch_size=args.batch_size,
            lenpen=args.lenpen,
            progress=not args.no_progress and len(sources) >= 100,
        )
    except BleuError as e:
        print(f"seqfuse-bleu: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.hyp_dir:
        out = Path(args.hyp_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, hyps in report["hypotheses"].items():
            (out / f"{name}.hyp").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.require_identical and report.get("identical_rate", 1.0) < 1.0:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
