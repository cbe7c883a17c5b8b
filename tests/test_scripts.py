"""The user-facing scripts run with tiny settings and report sane, computed results.

demo, seqfuse-bleu, benchmark and the training recipe are run as a user runs
them (subprocesses of this interpreter); the figures they print or write are
checked against ranges and against each other, never against stored values.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SEQFUSE_SHARED", ROOT.parent / "shared"))
MODEL = SHARED / "models" / "multi30k_en_de"
DATA = SHARED / "data" / "multi30k"
needs_shared = pytest.mark.skipif(
    not (MODEL / "checkpoint_best.pt").is_file() or not DATA.is_dir(),
    reason="../shared Multi30k model or data missing",
)

sys.path.insert(0, str(ROOT))
from seqfuse import bleu  # noqa: E402


def _run(args: list, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def _script_report(tmp_path, script: str, *args) -> dict:
    """Run a benchmark script writing ``t.json`` under ``tmp_path``; its report."""
    r = _run([script, *args, "--results-dir", tmp_path, "--name", "t"], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((tmp_path / "t.json").read_text())


# ----------------------------------------------------------------- seqfuse.bleu units


def test_identical_rate_counts_differences():
    assert bleu.identical_rate(["a", "b", "c"], ["a", "b", "c"]) == (3, 1.0)
    same, rate = bleu.identical_rate(["a", "b", "c", "d"], ["a", "x", "c", "y"])
    assert (same, rate) == (2, 0.5)
    with pytest.raises(ValueError):
        bleu.identical_rate(["a"], ["a", "b"])


def test_score_ranks_hypotheses():
    refs = ["Ein Hund rennt über die Wiese.", "Zwei Männer spielen Fußball im Park."]
    perfect = bleu.score(refs, refs)
    poor = bleu.score(["Eine Katze schläft.", "Ein Auto."], refs)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert 0.0 <= poor["bleu"] < 20.0 and poor["chrf"] < perfect["chrf"]
    assert "tok:13a" in perfect["bleu_signature"] and "nc:6" in perfect["chrf_signature"]


def test_read_lines_gz_and_plain(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny z\n")
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("x\ny z\n")
    assert bleu.read_lines(tmp_path / "a.txt") == bleu.read_lines(tmp_path / "a.txt.gz")
    assert bleu.read_lines(tmp_path / "a.txt") == ["x", "y z"]
    with pytest.raises(bleu.BleuError, match="not found"):
        bleu.read_lines(tmp_path / "missing.txt")


def test_bleu_cli_errors(tmp_path, capsys):
    src, ref = tmp_path / "src.en", tmp_path / "ref.de"
    src.write_text("A dog.\n")
    ref.write_text("Ein Hund.\n")
    assert (
        bleu.main(["--model", str(tmp_path / "nope.pt"), "--src", str(src), "--ref", str(ref)]) == 2
    )
    assert "model not found" in capsys.readouterr().err

    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert bleu.main(["--model", str(hf), "--src", str(src), "--ref", str(ref)]) == 2
    assert "not yet supported" in capsys.readouterr().err

    fake = tmp_path / "fs"
    fake.mkdir()
    (fake / "checkpoint_best.pt").write_bytes(b"")
    for lang in ("en", "de"):
        (fake / f"dict.{lang}.txt").write_text("a 1\n")
    empty = tmp_path / "empty.en"
    empty.write_text("")
    assert bleu.main(["--model", str(fake), "--src", str(empty), "--ref", str(ref)]) == 2
    assert "empty" in capsys.readouterr().err
    two = tmp_path / "two.en"
    two.write_text("A.\nB.\n")
    assert bleu.main(["--model", str(fake), "--src", str(two), "--ref", str(ref)]) == 2
    assert "has 2 lines" in capsys.readouterr().err
    missing_ref = ["--model", str(fake), "--src", str(src), "--ref", str(tmp_path / "x.de")]
    assert bleu.main(missing_ref) == 2
    assert "file not found" in capsys.readouterr().err


@needs_shared
def test_resolve_shared_model():
    m = bleu.resolve_model(MODEL, source_lang="en")
    assert m.checkpoint.name == "checkpoint_best.pt"
    assert (m.source_lang, m.target_lang) == ("en", "de")
    assert bleu.resolve_model(MODEL, target_lang="en").source_lang == "de"
    with pytest.raises(bleu.BleuError, match="--source-lang"):
        bleu.resolve_model(MODEL)  # the shared checkpoint does not record its direction
    assert m.spm_model is not None and m.spm_model.name == "spm8k.model"
    cmd = bleu.interactive_command(m, seqfuse=True)
    stock = bleu.interactive_command(m, seqfuse=False)
    assert cmd[: len(stock)] == stock and cmd[len(stock)] == "--user-dir"


# ----------------------------------------------------------------- end-to-end scripts


@pytest.mark.slow
@needs_shared
def test_bleu_eval_script(tmp_path):
    out = tmp_path / "report.json"
    hyp_dir = tmp_path / "hyps"
    r = _run(
        [
            "scripts/bleu_eval.py",
            "--model", MODEL,
            "--src", DATA / "test_2016_flickr.en.gz",
            "--ref", DATA / "test_2016_flickr.de.gz",
            "--max-sentences", 16,
            "--batch-size", 8,
            "--json", out,
            "--hyp-dir", hyp_dir,
        ]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sentences"] == 16
    refs = bleu.read_lines(DATA / "test_2016_flickr.de.gz")[:16]
    for name in ("stock", "seqfuse", "seqfuse-fused"):
        p = report["providers"][name]
        # The shared model scores 36.5 on the whole test set; 16 sentences vary.
        assert 15.0 < p["bleu"] < 70.0 and 40.0 < p["chrf"] < 85.0
        assert p["translation_seconds"] > 0
        hyps = (hyp_dir / f"{name}.hyp").read_text().splitlines()
        assert hyps == report["hypotheses"][name] and len(hyps) == 16
        assert p["bleu"] == pytest.approx(bleu.score(hyps, refs)["bleu"])
    same, rate = bleu.identical_rate(report["hypotheses"]["stock"], report["hypotheses"]["seqfuse"])
    assert report["identical"] == same and report["identical_rate"] == rate
    assert "identical outputs:" in r.stdout and "BLEU signature: nrefs:1" in r.stdout


@pytest.mark.slow
@needs_shared
def test_demo(tmp_path):
    r = _run(["scripts/demo.py", "--lines", 12, "--batch-size", 8, "--show", 1])
    assert r.returncode in (0, 1), r.stderr[-3000:]
    out = r.stdout
    assert "speed ratio (stock time / seqfuse time):" in out
    line = next(x for x in out.splitlines() if x.startswith("identical outputs:"))
    same = int(line.split(":")[1].split("/")[0])
    # the Hugging Face part: the same checkpoint, generate stock vs seqfuse.optimize
    assert "after seqfuse.optimize" in out, out[-2000:]
    hf_line = next(x for x in out.splitlines() if x.startswith("  identical outputs:"))
    hf_same = int(hf_line.split(":")[1].split("/")[0])
    # exit status 1 exactly when some line differs
    assert (r.returncode == 0) == (same == 12 and hf_same == 12)
    assert out.count("  stock:   ") == 1 and out.count("  seqfuse: ") == 1
    # the fast mode's line: its ratio and identical translations
    fast = next(x for x in out.splitlines() if x.startswith("seqfuse-fused (SEQFUSE_FUSED_LAYERS"))
    assert 0 <= int(fast.rsplit(" ", 1)[1].split("/")[0]) <= 12
    assert "optimize(fused_layers=True)" in out


@pytest.mark.slow
@needs_shared
def test_benchmark_small(tmp_path):
    providers = "fairseq,seqfuse,seqfuse-fused,hf,ctranslate2,seqfuse-hf"
    report = _script_report(
        tmp_path,
        "scripts/benchmark.py",
        "--models", "multi30k",
        "--providers", providers,
        "--device", "cpu",
        "--batch-sizes", "4,8",
        "--beams", "2",
        "--sentences", 8,
        "--repeats", 1,
        "--threads", 1,
        "--no-profile",
    )  # fmt: skip
    ctx = report["context"]
    for key in ("date", "git_revision", "cpu", "cpu_count", "threads", "devices", "versions"):
        assert key in ctx
    assert ctx["versions"]["torch"] and ctx["versions"]["fairseq"]
    for when in ("before", "after"):  # the machine check around the run
        probe = ctx["cpu_probe"][when]
        assert probe["threads"] == 1 and probe["gflops_one_thread"] > 0
        assert probe["scaling"] == pytest.approx(
            probe["gflops_threads"] / probe["gflops_one_thread"], abs=0.01
        )
    rows = report["results"]
    ran = {row["provider"] for row in rows}
    skipped = {s["provider"] for s in report["skipped"]}
    assert {"fairseq", "seqfuse", "seqfuse-fused", "hf", "seqfuse-hf"} <= ran
    assert ran | skipped == set(providers.split(","))  # every provider ran or says why not
    for row in rows:
        assert row["sentences"] == 8 and row["batch"] in (4, 8) and row["beam"] == 2
        assert row["tokens_per_s"] > 0 and row["sentences_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["target_tokens"] / row["median_seconds"])
        assert 50 < row["peak_mem_mb"] < 64_000 and row["mem_kind"] == "rss"
        if row["provider"] == "ctranslate2":  # its allocations are not torch's
            assert row["gen_peak_mb"] is None
        else:  # generation's own peak: well under the process's
            assert 0 < row["gen_peak_mb"] < row["peak_mem_mb"] / 2
            assert row["gen_mem_kind"] == "cpu_profiler"
    by = {(row["provider"], row["batch"]): row for row in rows}
    for batch in (4, 8):
        stock = by[("fairseq", batch)]
        assert 10.0 < stock["bleu"] < 80.0
        for name in ("seqfuse", "seqfuse-fused"):
            fused = by[(name, batch)]
            same = stock["outputs_sha1"] == fused["outputs_sha1"]
            assert (fused["identical_to_stock"] == 1.0) == same
        assert by[("hf", batch)]["target_tokens"] == 8 * by[("hf", batch)]["forced_len"]
        # HF generate after seqfuse.optimize: the same outputs as stock HF's
        assert by[("seqfuse-hf", batch)]["outputs_sha1"] == by[("hf", batch)]["outputs_sha1"]
    ratio = {(x["batch"], x["beam"]): x for x in report["ratios"]}
    for batch in (4, 8):
        expect = by[("seqfuse", batch)]["tokens_per_s"] / by[("fairseq", batch)]["tokens_per_s"]
        assert ratio[(batch, 2)]["seqfuse_vs_stock"] == pytest.approx(expect)
        for name, key in (("seqfuse", "seqfuse"), ("seqfuse-fused", "seqfuse_fused")):
            mem = by[(name, batch)]["gen_peak_mb"] / by[("fairseq", batch)]["gen_peak_mb"]
            assert ratio[(batch, 2)][f"{key}_gen_mem_vs_stock"] == pytest.approx(mem)
    with open(tmp_path / "t.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    if "ctranslate2" in ran:
        assert "seqfuse_vs_ctranslate2" in ratio[(4, 2)]
    if (tmp_path / "t.png").exists():
        assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@needs_shared
def test_bench_cli_smoke(tmp_path):
    """fairseq-interactive stock vs with the plugin, side by side, on a few
    lines: the row, the comparison and the machine check land in the file."""
    report = _script_report(
        tmp_path,
        "benchmarks/bench_cli.py",
        "--generate-batches", "",
        "--interactive-batches", 4,
        "--lines", 8,
        "--repeats", 1,
        "--providers", "stock,seqfuse-fused",
    )  # fmt: skip
    (row,) = report["rows"]
    assert row["cli"] == "fairseq-interactive" and row["batch"] == 4
    fused = row["seqfuse-fused"]
    assert fused["translations"] == 8 and fused["identical_translations"] == 8
    assert fused["speedup"] == pytest.approx(
        row["seconds"]["stock"] / row["seconds"]["seqfuse-fused"]
    )
    assert fused["speedup_paired"] == pytest.approx(fused["speedup"])  # one repeat: one pair
    probe = report["machine"]["cpu_probe"]
    assert probe["before"]["threads"] == probe["after"]["threads"] == 2


def test_cpu_probe_measures_and_restores_threads():
    import torch

    from seqfuse.info import cpu_probe

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = cpu_probe(2, seconds=0.05)
        assert torch.get_num_threads() == 1  # the caller's count is back
    finally:
        torch.set_num_threads(before)
    assert probe["threads"] == 2
    assert probe["gflops_one_thread"] > 0 and probe["gflops_threads"] > 0
    assert probe["scaling"] == pytest.approx(
        probe["gflops_threads"] / probe["gflops_one_thread"], abs=0.01
    )


def test_probe_warning_names_what_moved():
    from seqfuse.info import probe_warning

    def probe(one, many, threads=2):
        return {"threads": threads, "gflops_one_thread": one, "gflops_threads": many,
                "scaling": round(many / one, 2)}  # fmt: skip

    quiet = probe(100.0, 195.0)
    assert probe_warning(quiet, probe(102.0, 190.0)) is None
    shared = probe_warning(quiet, probe(100.0, 110.0))
    assert shared.startswith("machine check: ")
    assert "after the run 2 threads multiplied matrices 1.1x" in shared
    assert "went from 195.0 to 110.0 GFLOP/s" in shared
    slower = probe_warning(probe(150.0, 290.0), probe(100.0, 195.0))
    assert "went from 290.0 to 195.0" in slower and "threads multiplied" not in slower
    assert probe_warning(probe(100.0, 100.0, threads=1), probe(100.0, 100.0, threads=1)) is None


def _benchmark():
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    return benchmark


# ------------------------------------------------- benchmark: generation memory


def test_generation_peak_bytes_known_allocations():
    """The running peak of what the call allocates: freed blocks count while
    live, what was allocated before the call and freed inside is not subtracted."""
    import torch

    peak_of = _benchmark().generation_peak_bytes
    mib = 2**20

    def alloc_free_alloc():
        a = torch.empty(10 * mib, dtype=torch.uint8)
        del a
        return torch.empty(3 * mib, dtype=torch.uint8)

    out, peak = peak_of(alloc_free_alloc)
    assert out.numel() == 3 * mib and peak == 10 * mib

    held = [torch.ones(5 * mib, dtype=torch.uint8)]

    def frees_an_older_tensor():
        held.clear()
        x = torch.empty(mib, dtype=torch.uint8)
        return x, torch.empty(2 * mib, dtype=torch.uint8)

    _, peak = peak_of(frees_an_older_tensor)
    assert peak == 3 * mib
    assert peak_of(lambda: None) == (None, 0)


def test_generation_peak_bytes_not_lowered_by_earlier_garbage():
    """A block allocated while an earlier profile ran and left in a reference
    cycle is freed when the cycle is collected; collected inside the window,
    its free would lower the call's peak."""
    import gc

    import torch

    peak_of = _benchmark().generation_peak_bytes
    mib = 2**20

    def leave_a_cycle():
        box = {"t": torch.empty(4 * mib, dtype=torch.uint8)}
        box["self"] = box

    peak_of(leave_a_cycle)

    def collects_then_allocates():
        gc.collect()
        return torch.empty(mib, dtype=torch.uint8)

    _, peak = peak_of(collects_then_allocates)
    assert peak == mib


def test_generation_peak_bytes_of_a_generation():
    """A tiny model's beam search has a positive peak, and a block held through
    the call raises it by that block's size."""
    import torch
    from fairseq.sequence_generator import SequenceGenerator
    from generation_utils import random_sample, random_transformer

    peak_of = _benchmark().generation_peak_bytes
    model, d = random_transformer(300, seed=1)
    sample = random_sample(d, bsz=4, seed=2)
    gen = SequenceGenerator([model], d, beam_size=3, max_len_b=10)
    extra = 4 * 2**20

    def with_extra():
        block = torch.empty(extra, dtype=torch.uint8)
        return gen.generate([model], sample), block

    with torch.no_grad():
        gen.generate([model], sample)  # warm-up
        hypos, base = peak_of(lambda: gen.generate([model], sample))
        (hypos2, _), more = peak_of(with_extra)
    assert len(hypos) == 4 and 10_000 < base < 50 * 2**20
    assert all(torch.equal(a[0]["tokens"], b[0]["tokens"]) for a, b in zip(hypos, hypos2))
    assert abs(more - base - extra) < 64 * 1024, (base, more)


def test_memory_ratios_and_preset():
    bench = _benchmark()
    where = dict(model="multi30k", device="cpu", dtype="fp32", batch=128, beam=5)
    rows = [
        where | dict(provider="fairseq", tokens_per_s=100.0, gen_peak_mb=200.0),
        where | dict(provider="seqfuse", tokens_per_s=110.0, gen_peak_mb=180.0),
        where | dict(provider="seqfuse-fused", tokens_per_s=150.0, gen_peak_mb=90.0),
        where | dict(provider="ctranslate2", tokens_per_s=300.0, gen_peak_mb=None),
    ]
    (r,) = bench.ratios(rows)
    assert r["seqfuse_vs_stock"] == pytest.approx(1.1)
    assert r["seqfuse_fused_vs_stock"] == pytest.approx(1.5)
    assert r["seqfuse_fused_vs_ctranslate2"] == pytest.approx(0.5)
    assert r["seqfuse_gen_mem_vs_stock"] == pytest.approx(0.9)
    assert r["seqfuse_fused_gen_mem_vs_stock"] == pytest.approx(0.45)
    args = bench.apply_sweep(bench.build_parser().parse_args(["--memory"]))
    assert (args.models, args.batch_sizes, args.beams) == (["multi30k"], [128], [5])
    assert args.providers == "fairseq,seqfuse,seqfuse-fused" and args.sentences == 1000
    args = bench.apply_sweep(bench.build_parser().parse_args(["--memory", "--sentences", "64"]))
    assert args.sentences == 64
    default = bench.apply_sweep(bench.build_parser().parse_args([]))
    assert "seqfuse-fused" not in default.providers.split(",")


def test_paired_ratios_take_each_repeats_own_pair():
    """On a machine whose speed drifts, the median of each repeat's own ratio
    (the providers ran in turn, on about the same machine) next to the ratio
    of the medians."""
    bench = _benchmark()
    where = dict(model="multi30k", device="cpu", dtype="fp32", batch=64, beam=5)

    def row(provider, tokens, times):
        med = statistics.median(times)
        return where | dict(
            provider=provider, target_tokens=tokens, times=times, tokens_per_s=tokens / med
        )

    rows = [
        row("fairseq", 100, [10.0, 20.0, 10.0]),  # a slow machine in the second repeat
        row("seqfuse-fused", 100, [4.0, 9.0, 5.0]),
        row("ctranslate2", 100, [6.0]),  # repeats missing: no pairs
    ]
    (r,) = bench.ratios(rows)
    assert r["seqfuse_fused_vs_stock"] == pytest.approx(2.0)  # 10 / 5
    assert r["seqfuse_fused_vs_stock_paired"] == pytest.approx(20.0 / 9.0)  # of 2.5, 2.22, 2.0
    assert "seqfuse_fused_vs_ctranslate2_paired" not in r
    assert r["seqfuse_fused_vs_ctranslate2"] == pytest.approx(1.2)


def test_base_model_shape(tmp_path):
    benchmark = _benchmark()
    import torch

    ckpt = benchmark.make_base_model(tmp_path / "base")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd, args = state["model"], state["args"]
    assert state["model"]["encoder.embed_tokens.weight"].shape == (32000, 512)
    assert args.encoder_layers == args.decoder_layers == 6
    assert args.encoder_attention_heads == 8 and args.decoder_ffn_embed_dim == 2048
    assert sd["decoder.layers.5.fc1.weight"].shape == (2048, 512)
    assert "decoder.layers.6.fc1.weight" not in sd


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="../shared Multi30k data missing")
def test_train_recipe_short(tmp_path):
    out = tmp_path / "model"
    env = dict(
        MAX_LINES="400", VALID_LINES="40", MAX_UPDATE="3", VOCAB_SIZE="400", MAX_TOKENS="1024"
    )
    r = subprocess.run(
        ["bash", "scripts/train_multi30k.sh", str(DATA), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHON=sys.executable, **env),
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("checkpoint_best.pt", "dict.en.txt", "dict.de.txt", "spm8k.model"):
        assert (out / name).is_file(), name
    assert (out / "data-bin" / "test.en-de.en.bin").is_file()
    assert (out / "raw" / "train.en").read_text().count("\n") == 400
    assert (out / "raw" / "val.de").read_text().count("\n") == 40
    import torch

    state = torch.load(out / "checkpoint_best.pt", map_location="cpu", weights_only=False)
    cfg = state["cfg"]["model"]
    assert (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads) == (3, 256, 4)
    assert state["optimizer_history"][-1]["num_updates"] == 3
    assert "last_optimizer_state" not in state
    # joined dictionary: the SentencePiece pieces (minus <unk>) + fairseq's 4 specials
    n_dict = len((out / "dict.en.txt").read_text().splitlines())
    assert n_dict == 400 - 1
    assert state["model"]["encoder.embed_tokens.weight"].shape[0] == n_dict + 4


def test_bench_hf_smoke(tmp_path):
    """benchmarks/bench_hf.py as a user runs it: stock vs seqfuse.optimize
    side by side, output checked identical, a results file with the context."""
    out = tmp_path / "hf.json"
    r = _run(
        [
            "benchmarks/bench_hf.py",
            "--models", "marian-small,t5-small",
            "--batch", "2",
            "--beam", "3",
            "--new-tokens", "3",
            "--repeats", "1",
            "--fused-layers",
            "--out", out,
        ]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [row["model"] for row in res["rows"]] == ["marian-small", "t5-small"]
    assert all(
        row["identical"] and row["stock_s"] > 0 and row["seqfuse_s"] > 0 for row in res["rows"]
    )
    assert all(row["fused_s"] > 0 and "fused_identical_tokens" in row for row in res["rows"])
    assert all(row["fused_first_s"] > 0 for row in res["rows"])  # the untimed first call
    assert res["versions"]["transformers"] and res["device"]
    assert r.stdout.count("identical=True") == 2


@needs_shared
def test_bleu_dtypes_smoke(tmp_path):
    """scripts/bleu_dtypes.py: per-dtype BLEU of stock and seqfuse on the same
    batches, with the identical-hypothesis count (stock == seqfuse in bf16 too)."""
    out = tmp_path / "d.json"
    r = _run(
        ["scripts/bleu_dtypes.py", "--sentences", 12, "--batch-size", 6,
         "--dtypes", "float32,bfloat16", "--out", out]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["dtype"] for row in rows] == ["float32", "bfloat16"]
    for row in rows:
        assert row["sentences"] == 12 and row["identical"] == 12
        assert 5 < row["stock"]["bleu"] < 90 and row["stock"]["bleu"] == row["seqfuse"]["bleu"]
    assert rows[1]["bleu_change_vs_fp32"]["stock"] == pytest.approx(
        rows[1]["stock"]["bleu"] - rows[0]["stock"]["bleu"], abs=0.011
    )


@needs_shared
def test_bench_ffn_skip_smoke(tmp_path):
    """benchmarks/bench_ffn_skip.py: real fc2 inputs of the Multi30k decoder,
    mostly zeros, multiplied dense and skipping (the script itself refuses
    outputs that differ), both timed, with the context."""
    out = tmp_path / "skip.json"
    r = _run(
        ["benchmarks/bench_ffn_skip.py", "--batch", 4, "--sentences", 4, "--every", 6,
         "--reps", 2, "--json", out]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["inputs"] > 0 and len(res["rows"]) == res["inputs"]
    assert 0.5 < res["zero_fraction"] < 1.0  # (trained ReLU activations)
    for row in res["threads"].values():
        assert row["dense_ms"] > 0 and row["skip_ms"] > 0
    assert res["cpu_capability"] and res["torch"]


def test_bench_kv_rooms_smoke(tmp_path):
    """benchmarks/bench_kv_rooms.py: fused generate with the K/V rooms and
    with transformers' cat, alternated (the script itself refuses outputs
    that differ), greedy and beam search."""
    out = tmp_path / "rooms.json"
    r = _run(
        ["benchmarks/bench_kv_rooms.py", "--models", "gpt2-small", "--batch", 2, "--beams", "1,2",
         "--new-tokens", 4, "--rounds", 2, "--json", out]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["beams"] for row in rows] == [1, 2]
    for row in rows:  # (beam search's reordering steps keep their gather)
        assert row["identical"] and (row["room_steps"] > 0) == (row["beams"] == 1)
        assert row["rooms_s"] > 0 and row["cat_s"] > 0


# ------------------------------------------------ benchmarks/flop_bound.py: the count


def test_flop_bound_counts_what_torch_counts():
    """flop_bound's multiply-add count of an encoder pass and of incremental
    decoder steps equals torch's FlopCounterMode on stock fairseq doing them."""
    from generation_utils import random_sample, random_transformer
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flop_bound

    model, d = random_transformer(60, 1, layers=2, dim=32, heads=4)
    sample = random_sample(d, bsz=3, seed=0)
    src = sample["net_input"]["src_tokens"]
    b, s = src.shape
    steps = 6
    tokens = torch.randint(4, len(d), (b, steps), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        enc = model.encoder(**sample["net_input"])
        state: dict = {}
        for t in range(1, steps + 1):
            model.decoder(tokens[:, :t], encoder_out=enc, incremental_state=state)
    tally = {
        "rows": b * steps,
        "self_keys": sum(b * t for t in range(1, steps + 1)),
        "cross_keys": b * s * steps,
        "src_tokens": b * s,
        "src_attn": b * s * s,
    }
    ours = flop_bound.flops(model, tally)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # The decoder's incremental attention is torch.bmm; the encoder's runs
    # through scaled_dot_product_attention, which the counter does not count
    # on the CPU: every other flop is a matrix product it sees.
    assert counts.get("aten.bmm", 0) == ours["decoder_attention"], (ours, counts)
    assert ours["encoder_attention"] > 0
    seen = ours["total"] - ours["encoder_attention"]
    assert seen == counter.get_total_flops(), (ours, counts)


def test_bench_cli_reads_fairseqs_time_from_its_rate():
    """fairseq-generate prints its translation time to 0.1 s and its rate to
    0.01 sentences/s: bench_cli takes the time from the rate (about 5
    significant digits), and fairseq-interactive's 3-decimal time as is."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_cli

    seconds = 3.2749
    # fairseq_cli/generate.py's line for 1,000 sentences in `seconds`
    line = (
        "Translated {:,} sentences ({:,} tokens) in {:.1f}s ({:.2f} sentences/s, {:.2f} tokens/s)"
    )
    out = "INFO:fairseq_cli.generate:" + line.format(1000, 13583, seconds, 1000 / seconds, 4147.6)
    got = bench_cli.translation_time("H-0\t-0.1\tx\n" + out + "\n")
    assert got == pytest.approx(seconds, rel=2e-5)  # the printed 3.3 s would be 0.8% off
    interactive = "INFO:fairseq_cli.interactive:Total time: 5.123 seconds; translation time: 4.567"
    assert bench_cli.translation_time(interactive) == pytest.approx(4.567)
    assert bench_cli.translation_time("no timing here") is None


def test_bench_cli_generate_batching_flags(tmp_path):
    """fairseq-generate by batch size (with fairseq's batch multiple off), or
    by its own token budget (--max-tokens, no batch size): one or the other."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_cli

    by_size = bench_cli.generate_command(tmp_path, 64, 5)
    i = by_size.index("--batch-size")
    assert by_size[i + 1] == "64" and "--max-tokens" not in by_size
    assert by_size[by_size.index("--required-batch-size-multiple") + 1] == "1"
    by_tokens = bench_cli.generate_command(tmp_path, None, 5, max_tokens=12000)
    assert by_tokens[by_tokens.index("--max-tokens") + 1] == "12000"
    assert "--batch-size" not in by_tokens and "--required-batch-size-multiple" not in by_tokens
    assert by_tokens[by_tokens.index("--beam") + 1] == "5"
    for batch, tokens in ((64, 12000), (None, None)):
        with pytest.raises(ValueError, match="batch size or a token budget"):
            bench_cli.generate_command(tmp_path, batch, 5, max_tokens=tokens)
