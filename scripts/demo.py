"""seqfuse demo: the same fairseq-interactive command, stock and with seqfuse.

Translates sample sentences (the first ``--lines`` of Multi30k test_2016_flickr)
twice with an unchanged ``fairseq-interactive`` command, beam 5: once stock,
once with ``--user-dir`` pointing at the seqfuse plugin. Prints both
translation times, the speed ratio, a few translations, and whether the
outputs are identical line by line (exit status 1 when they are not). Then the
same checkpoint as a Hugging Face model: ``model.generate`` stock and after
``seqfuse.optimize``, with the same checks.

Model, without any download:
1. ``../shared/models/multi30k_en_de`` (a real stock fairseq transformer) when present;
2. else a tiny transformer trained for a few minutes on a few thousand Multi30k
   lines with ``scripts/train_multi30k.sh`` (cached under benchmarks/work/);
3. else, without ../shared at all, the same recipe on a synthetic corpus.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from seqfuse import bleu  # noqa: E402

SHARED = Path(os.environ.get("SEQFUSE_SHARED", ROOT.parent / "shared"))
SHARED_MODEL = SHARED / "models" / "multi30k_en_de"
SHARED_DATA = SHARED / "data" / "multi30k"
WORK = ROOT / "benchmarks" / "work"


def _train(data_dir: Path, out_dir: Path, *, lines: int, updates: int, vocab: int) -> Path:
    """A small model with the shared model's recipe, cached in ``out_dir``."""
    if (out_dir / "checkpoint_best.pt").is_file():
        return out_dir
    print(f"training a small model in {out_dir} ({lines} lines, {updates} updates) ...")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        MAX_LINES=str(lines),
        MAX_UPDATE=str(updates),
        VOCAB_SIZE=str(vocab),
        MAX_TOKENS="2048",
        VALID_LINES="200",
    )
    log = out_dir.parent / f"{out_dir.name}.train.log"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call(
            ["bash", str(ROOT / "scripts" / "train_multi30k.sh"), str(data_dir), str(out_dir)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    if rc != 0:
        sys.exit(f"demo: training failed (exit {rc}); see {log}")
    return out_dir


def _synthetic_corpus(out: Path, seed: int = 1) -> Path:
    """A toy En->De corpus: target words are a fixed relabelling of source words."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "tu", "ra", "so", "vi", "de", "po", "an", "el"]
    src_words = sorted(
        {"".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(400)}
    )
    tgt_of = {w: w[::-1] + "n" for w in src_words}
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 4000), ("val", 200), ("test_2016_flickr", 300)):
        en, de = [], []
        for _ in range(n):
            words = [rng.choice(src_words) for _ in range(rng.randint(3, 12))]
            en.append(" ".join(words) + " .")
            de.append(" ".join(tgt_of[w] for w in words) + " .")
        (out / f"{split}.en").write_text("\n".join(en) + "\n")
        (out / f"{split}.de").write_text("\n".join(de) + "\n")
    return out


def find_model(args) -> tuple[Path, Path | None]:
    """(model directory, directory holding test_2016_flickr.{en,de}[.gz])."""
    if args.model:
        return Path(args.model), SHARED_DATA if SHARED_DATA.is_dir() else None
    if SHARED_MODEL.joinpath("checkpoint_best.pt").is_file():
        return SHARED_MODEL, SHARED_DATA if SHARED_DATA.is_dir() else None
    if SHARED_DATA.is_dir():
        model = _train(SHARED_DATA, WORK / "demo_multi30k", lines=3000, updates=150, vocab=2000)
        return model, SHARED_DATA
    data = _synthetic_corpus(WORK / "demo_synthetic_data")
    model = _train(data, WORK / "demo_synthetic", lines=4000, updates=150, vocab=500)
    return model, data


def _test_file(data: Path, lang: str) -> Path | None:
    for name in (f"test_2016_flickr.{lang}.gz", f"test_2016_flickr.{lang}"):
        if (data / name).is_file():
            return data / name
    return None


def hf_part(model, sources: list[str], beam: int, batch_size: int) -> bool:
    """The same checkpoint as a Hugging Face model (transformers' FSMT port of
    fairseq's transformer): ``model.generate`` stock, then after
    ``seqfuse.optimize(model)`` (and with ``fused_layers=True``, reported).
    Returns whether the exact path's outputs are identical."""
    try:
        import torch
        from fairseq.data import Dictionary, data_utils

        from integrations import hf
        from integrations.fairseq_to_hf import fsmt_from_fairseq
    except ImportError as e:
        print(f"Hugging Face part skipped: {e}")
        return True
    try:
        hf_model = fsmt_from_fairseq(str(model.checkpoint))
    except ValueError as e:
        print(f"Hugging Face part skipped: {e}")
        return True
    src_dict = Dictionary.load(str(model.data_dir / f"dict.{model.source_lang}.txt"))
    tgt_dict = Dictionary.load(str(model.data_dir / f"dict.{model.target_lang}.txt"))
    sp = None
    if model.spm_model is not None:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model.spm_model))
    ids = []
    for line in sources:
        pieces = " ".join(sp.encode(line, out_type=str)) if sp else line
        ids.append(src_dict.encode_line(pieces, add_if_not_exist=False).long())
    batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]

    def run() -> tuple[float, list]:
        outs, t0 = [], time.perf_counter()
        with torch.no_grad():
            for b in batches:
                x = data_utils.collate_tokens(b, src_dict.pad(), src_dict.eos())
                out = hf_model.generate(
                    x, attention_mask=x.ne(src_dict.pad()).long(), num_beams=beam
                )
                outs.extend(out.tolist())
        return time.perf_counter() - t0, outs

    run()  # warm-up
    t_stock, stock = run()
    hf.optimize(hf_model)
    try:
        t_ours, ours = run()
    finally:
        hf.restore(hf_model)
    hf.optimize(hf_model, fused_layers=True)
    try:
        t_fast, fast = run()
    finally:
        hf.restore(hf_model)
    same = sum(a == b for a, b in zip(stock, ours))
    fast_same = sum(a == b for a, b in zip(stock, fast))
    first = [t for t in ours[0][1:] if t not in (tgt_dict.pad(), tgt_dict.eos())]
    text = tgt_dict.string(torch.tensor(first))
    if sp is not None:
        text = sp.decode(text.split())
    print(f"Hugging Face: the same checkpoint as an FSMT model, model.generate(num_beams={beam})")
    print(
        f"  stock {t_stock:.2f} s, after seqfuse.optimize {t_ours:.2f} s: {t_stock / t_ours:.2f}x"
    )
    print(f"  first translation: {text}")
    print(f"  identical outputs: {same}/{len(sources)}")
    print(
        f"  optimize(fused_layers=True) (scores within 1e-5, not bit for bit): {t_fast:.2f} s, "
        f"{t_stock / t_fast:.2f}x, identical outputs {fast_same}/{len(sources)}"
    )
    return same == len(sources)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="fairseq model directory (default: the shared Multi30k model)")
    p.add_argument("--lines", type=int, default=200, help="sample sentences to translate")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--show", type=int, default=3, help="sample translations to print")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face part")
    args = p.parse_args(argv)

    start = time.perf_counter()
    model_dir, data = find_model(args)
    try:
        model = bleu.resolve_model(model_dir, source_lang="en", target_lang="de")
    except bleu.BleuError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    src_path = _test_file(data, "en") if data else None
    ref_path = _test_file(data, "de") if data else None
    if src_path is not None:
        sources = bleu.read_lines(src_path)[: args.lines]
    else:
        sources = ["A man is riding a bike.", "Two dogs play in the snow."]
    refs = bleu.read_lines(ref_path)[: len(sources)] if ref_path else None

    print(f"model:   {model.checkpoint}")
    print(f"input:   {len(sources)} sentences from {src_path or 'built-in samples'}")
    cmd = bleu.interactive_command(
        model, beam=args.beam, batch_size=args.batch_size, input_path=str(src_path or "samples")
    )
    print("command: fairseq-interactive", " ".join(cmd[1:]))
    print("seqfuse: the same command + --user-dir", bleu.seqfuse_user_dir())
    runs = {}
    for provider in bleu.PROVIDERS:
        try:
            runs[provider] = bleu.translate(
                model, sources, provider=provider, beam=args.beam, batch_size=args.batch_size
            )
        except bleu.BleuError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 2
    stock, fused = runs["stock"], runs["seqfuse"]
    same, rate = bleu.identical_rate(stock.hypotheses, fused.hypotheses)

    print()
    print(
        f"{'':14}{'translation (s)':>16}{'sent/s':>9}{'process (s)':>13}"
        + ("    BLEU" if refs else "")
    )
    for name, t in runs.items():
        row = (
            f"{name:14}{t.translation_seconds:>16.2f}"
            f"{len(sources) / t.translation_seconds:>9.1f}{t.wall_seconds:>13.2f}"
        )
        if refs:
            row += f"{bleu.score(t.hypotheses, refs)['bleu']:>8.2f}"
        print(row)
    print(
        f"speed ratio (stock time / seqfuse time): {stock.translation_seconds / fused.translation_seconds:.2f}x"
    )
    fast = runs.get("seqfuse-fused")
    if fast is not None:
        fast_same, _ = bleu.identical_rate(stock.hypotheses, fast.hypotheses)
        print(
            "seqfuse-fused (SEQFUSE_FUSED_LAYERS=1: fused layers, scores within 1e-5, "
            f"not bit for bit): {stock.translation_seconds / fast.translation_seconds:.2f}x, "
            f"identical translations {fast_same}/{len(sources)}"
        )
    print()
    for i in range(min(args.show, len(sources))):
        print(f"  src:     {sources[i]}")
        print(f"  stock:   {stock.hypotheses[i]}")
        print(f"  seqfuse: {fused.hypotheses[i]}")
    print()
    print(f"identical outputs: {same}/{len(sources)} lines ({100 * rate:.1f}%)")
    print()
    hf_same = args.no_hf or hf_part(model, sources, args.beam, args.batch_size)
    print(f"demo took {time.perf_counter() - start:.0f} s")
    if not hf_same:
        return 1
    if same != len(sources):
        for i, (a, b) in enumerate(zip(stock.hypotheses, fused.hypotheses)):
            if a != b:
                print(f"first difference, line {i}:\n  stock:   {a}\n  seqfuse: {b}")
                break
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
