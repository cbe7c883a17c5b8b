"""The fairseq plugin, driven through fairseq's own command-line tools.

Every parity test runs stock fairseq (no ``--user-dir``) and the plugin on the
same command line in the same test and compares the S/T/H/D/P lines. Models:
a tiny transformer trained here on a few hundred Multi30k lines (seconds), and
the shared Multi30k model (``../shared/models/multi30k_en_de``).

CLI runs are subprocesses (the plugin patches fairseq for the whole process);
in-process tests install the plugin and uninstall it afterwards.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "plugins" / "seqfuse_fairseq"
SHARED = Path(os.environ.get("SEQFUSE_SHARED", ROOT.parent / "shared"))
MULTI30K_DATA = SHARED / "data" / "multi30k"
MULTI30K_MODEL = SHARED / "models" / "multi30k_en_de"
BIN = Path(sys.executable).parent

TINY_ARCH = (
    "--share-all-embeddings --encoder-layers 2 --decoder-layers 2 "
    "--encoder-embed-dim 32 --decoder-embed-dim 32 --encoder-ffn-embed-dim 64 "
    "--decoder-ffn-embed-dim 64 --encoder-attention-heads 2 --decoder-attention-heads 2"
).split()
TINY_TRAIN = (
    "--optimizer adam --lr 5e-3 --max-tokens 2000 --no-epoch-checkpoints --seed 1 "
    "--num-workers 0 --log-format simple --cpu"
).split()
TINY_TEST_LINES = 45  # not a multiple of 8: stock drops the last batch
GEN_LINE = re.compile(r"^[STHDPA]-\d+\t")

_run_cache: dict[tuple, subprocess.CompletedProcess] = {}


# --------------------------------------------------------------------------
# Running fairseq's tools


def _env(plugin: bool, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SEQFUSE_DISABLE", None)
    if plugin:
        # The plugin must load checkpoints under torch's weights-only default.
        env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    else:
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    env.update(extra or {})
    return env


def start(tool: str, args, *, plugin: bool, env: dict | None = None, stdin: str | None = None):
    """Start ``fairseq-<tool> args`` (plus ``--user-dir`` when ``plugin``)."""
    cmd = [str(BIN / f"fairseq-{tool}"), *map(str, args)]
    if plugin:
        cmd += ["--user-dir", str(PLUGIN_DIR)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(plugin, env),
    )
    proc.stdin_text = stdin
    return proc


def finish(proc, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(proc.stdin_text, timeout=timeout)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert res.returncode == 0, f"{' '.join(proc.args)}\n{err[-3000:]}"
    return res


def run(tool: str, args, *, plugin: bool, env: dict | None = None, stdin: str | None = None):
    return finish(start(tool, args, plugin=plugin, env=env, stdin=stdin))


def run_pair(tool: str, args, *, stdin: str | None = None):
    """Stock and plugin runs of the same command line, side by side (each run
    once per command line and session)."""
    keys = [(plugin, tool, tuple(map(str, args)), stdin) for plugin in (False, True)]
    procs = [
        None if key in _run_cache else start(tool, args, plugin=key[0], stdin=stdin) for key in keys
    ]
    for key, proc in zip(keys, procs):
        if proc is not None:
            _run_cache[key] = finish(proc)
    return _run_cache[keys[0]], _run_cache[keys[1]]


def gen_lines(stdout: str) -> list[str]:
    """The S/T/H/D/P lines (not the timing or log lines)."""
    return [line for line in stdout.splitlines() if GEN_LINE.match(line)]


def ids(lines: list[str], kind: str = "H") -> list[int]:
    return [int(line.split("\t", 1)[0][2:]) for line in lines if line.startswith(kind + "-")]


def assert_same_lines(stock: list[str], ours: list[str]) -> None:
    assert stock, "stock printed no hypotheses"
    diffs = [(a, b) for a, b in zip(stock, ours) if a != b]
    assert not diffs and len(stock) == len(ours), (
        f"{len(diffs)} of {len(stock)} lines differ (stock {len(stock)} lines, "
        f"seqfuse {len(ours)}); first: {diffs[:2]}"
    )


def fallback_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "seqfuse: falling back" in line]


def uses_seqfuse(stderr: str) -> bool:
    return "generating with seqfuse.generation.SequenceGenerator" in stderr


def uses_exact_step(stderr: str) -> bool:
    """The plugin's default layers: stock, with the one-call exact step."""
    return "exact one-call decoder step" in stderr


# --------------------------------------------------------------------------
# A tiny model, trained here


def _tok(line: str) -> str:
    return " ".join(re.sub(r"([.,!?;:\"()])", r" \1 ", line.lower()).split())


def _write_corpus(d: Path) -> None:
    for lang in ("en", "de"):
        with gzip.open(MULTI30K_DATA / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
            train = [_tok(line) for line, _ in zip(f, range(600))]
        with gzip.open(MULTI30K_DATA / f"val.{lang}.gz", "rt", encoding="utf-8") as f:
            val = [_tok(line) for line, _ in zip(f, range(48 + TINY_TEST_LINES))]
        (d / f"train.{lang}").write_text("\n".join(train) + "\n")
        (d / f"valid.{lang}").write_text("\n".join(val[:48]) + "\n")
        (d / f"test.{lang}").write_text("\n".join(val[48:]) + "\n")


def _eval_bleu_train_args(data: Path, save_dir: Path) -> list:
    return [
        data,
        "--arch",
        "transformer",
        *TINY_ARCH,
        *TINY_TRAIN,
        "--max-update",
        "150",
        "--validate-interval",
        "10",
        "--save-dir",
        save_dir,
        "--eval-bleu",
        "--eval-bleu-args",
        '{"beam": 3, "max_len_b": 20}',
        "--batch-size-valid",
        "8",
    ]


_tiny_cache: list = []


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Binarised corpus and a stock ``fairseq-train --eval-bleu`` run (its
    checkpoint is the tiny model). Built once per session, also when another
    test module imports this fixture."""
    if not MULTI30K_DATA.exists():
        pytest.skip(f"{MULTI30K_DATA} not found")
    if not _tiny_cache:
        _tiny_cache.append(_build_tiny(tmp_path_factory.mktemp("tiny")))
    return _tiny_cache[0]


def _build_tiny(d: Path) -> types.SimpleNamespace:
    _write_corpus(d)
    data = d / "bin"
    run(
        "preprocess",
        f"--source-lang en --target-lang de --trainpref {d}/train --validpref {d}/valid "
        f"--testpref {d}/test --destdir {data} --joined-dictionary --nwordssrc 1000 "
        "--workers 1".split(),
        plugin=False,
    )
    stock = run("train", _eval_bleu_train_args(data, d / "ckpt_stock"), plugin=False)
    return types.SimpleNamespace(
        dir=d,
        data=data,
        ckpt=d / "ckpt_stock" / "checkpoint_best.pt",
        ckpt_last=d / "ckpt_stock" / "checkpoint_last.pt",
        train_stock=stock,
    )


def tiny_gen_args(tiny, *extra) -> list:
    return [tiny.data, "--path", tiny.ckpt, "--gen-subset", "test", "--batch-size", "16", *extra]


@pytest.fixture
def plugin():
    """The plugin installed in this process for one test."""
    from seqfuse import fairseq_plugin

    fairseq_plugin.install()
    try:
        yield fairseq_plugin
    finally:
        fairseq_plugin.uninstall()


@pytest.fixture(scope="module")
def tiny_loaded(tiny):
    """(model, task) of the tiny checkpoint, loaded in this process."""
    from fairseq import checkpoint_utils

    from seqfuse import fairseq_plugin

    fairseq_plugin.install()
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(tiny.ckpt)], arg_overrides={"data": str(tiny.data)}
        )
    finally:
        fairseq_plugin.uninstall()
    model = models[0].eval()
    return model, task


# --------------------------------------------------------------------------
# Parity through the CLI


@pytest.mark.slow
def test_generate_parity_tiny_search_options(tiny):
    args = tiny_gen_args(
        tiny,
        *"--beam 5 --nbest 3 --lenpen 1.4 --unkpen 0.7 --no-repeat-ngram-size 2 "
        "--max-len-a 1.2 --max-len-b 3 --min-len 2 --required-batch-size-multiple 1".split(),
    )
    stock, ours = run_pair("generate", args)
    assert_same_lines(gen_lines(stock.stdout), gen_lines(ours.stdout))
    assert uses_seqfuse(ours.stderr) and uses_exact_step(ours.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_generate_parity_tiny_print_alignment(tiny, mode):
    """--print-alignment: the A lines (and every other line) as stock prints them."""
    args = tiny_gen_args(
        tiny,
        *f"--beam 4 --nbest 2 --print-alignment {mode} --required-batch-size-multiple 1".split(),
    )
    stock, ours = run_pair("generate", args)
    stock_lines, our_lines = gen_lines(stock.stdout), gen_lines(ours.stdout)
    assert len(ids(stock_lines, "A")) == 2 * TINY_TEST_LINES
    assert_same_lines(stock_lines, our_lines)
    assert "generating with seqfuse.generation.SequenceGeneratorWithAlignment" in ours.stderr
    assert not fallback_lines(ours.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["--diversity-rate 0.5", "--match-source-len"])
def test_generate_parity_tiny_stock_step_strategies(tiny, option):
    """Search strategies whose step seqfuse's loop calls as stock's loop does."""
    args = tiny_gen_args(
        tiny, *f"--beam 4 --nbest 2 {option} --required-batch-size-multiple 1".split()
    )
    stock, ours = run_pair("generate", args)
    assert_same_lines(gen_lines(stock.stdout), gen_lines(ours.stdout))
    assert uses_seqfuse(ours.stderr) and not fallback_lines(ours.stderr)


@pytest.mark.slow
def test_generate_parity_tiny_retain_dropout(tiny):
    """--retain-dropout: seqfuse's loop on the stock layers (the one-call step
    refuses dropout at inference) draws the same dropout masks as stock."""
    args = tiny_gen_args(tiny, *"--beam 4 --required-batch-size-multiple 1 --seed 3".split())
    stock, ours = run_pair("generate", [*args, "--retain-dropout"])
    lines = gen_lines(stock.stdout)
    assert_same_lines(lines, gen_lines(ours.stdout))
    assert uses_seqfuse(ours.stderr) and not fallback_lines(ours.stderr)
    assert "dropout applied during inference" in ours.stderr  # the step refused it
    # Dropout really was applied: without it, other hypotheses.
    plain, _ = run_pair("generate", args)
    assert gen_lines(plain.stdout) != lines


TINY_DEFAULT = ("--beam", "4")  # and --required-batch-size-multiple 8, fairseq's default


@pytest.mark.slow
def test_generate_parity_tiny_no_sentence_dropped(tiny):
    """Stock drops the last batch when its size is not a multiple of
    --required-batch-size-multiple (8 by default); the plugin keeps it and
    prints everything else exactly as stock does."""
    stock, ours = run_pair("generate", tiny_gen_args(tiny, *TINY_DEFAULT))
    assert uses_seqfuse(ours.stderr) and not uses_seqfuse(stock.stderr)
    assert not fallback_lines(ours.stderr)
    stock_lines, our_lines = gen_lines(stock.stdout), gen_lines(ours.stdout)
    n_input = len((tiny.dir / "test.en").read_text().splitlines())
    assert n_input == TINY_TEST_LINES
    assert sorted(ids(our_lines)) == list(range(n_input))
    assert sorted(ids(our_lines, "S")) == list(range(n_input))
    # Stock really drops sentences here (else this test proves nothing) and
    # what it does print is printed identically, first.
    assert len(ids(stock_lines)) < n_input
    assert_same_lines(stock_lines, our_lines[: len(stock_lines)])


@pytest.mark.slow
def test_train_eval_bleu_parity(tiny):
    """fairseq-train --eval-bleu: same validation (loss, BLEU) and same weights."""

    def valid_records(stdout: str) -> list[dict]:
        records = []
        for line in stdout.splitlines():
            if "valid on 'valid' subset" in line:
                fields = [f.strip().split(" ", 1) for f in line.split("|")[4:]]
                records.append({k: v for k, v in fields if k != "wps"})
        return records

    save = tiny.dir / "ckpt_seqfuse"
    train = run("train", _eval_bleu_train_args(tiny.data, save), plugin=True)
    stock, ours = valid_records(tiny.train_stock.stdout), valid_records(train.stdout)
    assert stock and all("bleu" in r for r in stock)
    assert float(stock[-1]["bleu"]) > 0  # the generator produced real output
    assert stock == ours
    assert uses_seqfuse(train.stdout + train.stderr)
    assert uses_exact_step(train.stdout + train.stderr)
    a = torch.load(tiny.ckpt, weights_only=False)["model"]
    b = torch.load(save / "checkpoint_best.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fallback_cli_ensemble(tiny):
    """An ensemble of two checkpoints: stock output, one warning line (unless
    the generator declares ensembles, then seqfuse's output)."""
    from seqfuse.generation import SequenceGenerator

    args = tiny_gen_args(tiny, "--beam", "4", "--required-batch-size-multiple", "1")
    args[args.index("--path") + 1] = f"{tiny.ckpt}:{tiny.ckpt_last}"
    stock, ours = run_pair("generate", args)
    assert_same_lines(gen_lines(stock.stdout), gen_lines(ours.stdout))
    warnings = fallback_lines(ours.stderr)
    if "ensemble" in getattr(SequenceGenerator, "SUPPORTED_FEATURES", ()):
        assert uses_seqfuse(ours.stderr) and not warnings
        return
    assert len(warnings) == 1, ours.stderr[-2000:]
    assert warnings[0].endswith(
        "seqfuse: falling back to stock SequenceGenerator: an ensemble of 2 models is not supported"
    )
    assert not uses_seqfuse(ours.stderr)


@pytest.mark.slow
def test_seqfuse_disable(tiny):
    args = tiny_gen_args(tiny, *TINY_DEFAULT)
    stock, _ = run_pair("generate", args)
    off = run(
        "generate",
        args,
        plugin=True,
        env={"SEQFUSE_DISABLE": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
    )
    assert gen_lines(off.stdout) == gen_lines(stock.stdout)
    log = off.stdout + off.stderr
    assert log.count("SEQFUSE_DISABLE is set, the plugin is off") == 1
    assert not uses_seqfuse(log) and not fallback_lines(log)


@pytest.mark.slow
def test_seqfuse_arch_from_scratch_and_task(tiny):
    """--arch seqfuse_transformer trains; its checkpoint, relabelled
    ``transformer``, is a stock checkpoint; --task seqfuse_translation
    generates what stock generates from it."""
    save = tiny.dir / "ckpt_arch"
    train = run(
        "train",
        [tiny.data, "--arch", "seqfuse_transformer", *TINY_ARCH, *TINY_TRAIN]
        + ["--max-update", "6", "--save-dir", save, "--disable-validation"],
        plugin=True,
    )
    assert "SeqfuseTransformerModel" in train.stdout + train.stderr
    state = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert state["cfg"]["model"].arch == "seqfuse_transformer"
    state["cfg"]["model"].arch = state["cfg"]["model"]._name = "transformer"
    stock_ckpt = save / "as_transformer.pt"
    torch.save(state, stock_ckpt)

    common = [tiny.data, "--gen-subset", "test", "--batch-size", "16", "--beam", "3"]
    common += ["--required-batch-size-multiple", "1"]
    stock = start("generate", [*common, "--path", stock_ckpt], plugin=False)
    ours = start(
        "generate",
        [*common, "--path", save / "checkpoint_last.pt", "--task", "seqfuse_translation"],
        plugin=True,
    )
    stock, ours = finish(stock), finish(ours)
    assert_same_lines(gen_lines(stock.stdout), gen_lines(ours.stdout))
    assert uses_seqfuse(ours.stderr)


@pytest.mark.slow
def test_multi30k_generate_parity():
    if not (MULTI30K_MODEL / "checkpoint_best.pt").exists():
        pytest.skip("shared Multi30k model not found")
    # --distributed-world-size 8: this process generates shard 0 of the test
    # set's batches (8 batches of 16 sentences, all lengths).
    args = [
        MULTI30K_MODEL / "data-bin",
        "--path",
        MULTI30K_MODEL / "checkpoint_best.pt",
        *"--gen-subset test --beam 5 --batch-size 16 --required-batch-size-multiple 1 "
        "--post-process sentencepiece --distributed-world-size 8".split(),
    ]
    stock, ours = run_pair("generate", args)
    lines = gen_lines(stock.stdout)
    assert len(ids(lines)) >= 100
    assert_same_lines(lines, gen_lines(ours.stdout))
    assert uses_seqfuse(ours.stderr) and uses_exact_step(ours.stderr)


def _multi30k_test_lines(lang: str, n: int) -> list[str]:
    """The first ``n`` raw lines of the Multi30k test set (skips the test
    when the shared model is not there)."""
    if not (MULTI30K_MODEL / "checkpoint_best.pt").exists():
        pytest.skip("shared Multi30k model not found")
    with gzip.open(MULTI30K_DATA / f"test_2016_flickr.{lang}.gz", "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line, _ in zip(f, range(n))]


def _multi30k_interactive_args(options: str) -> list:
    """fairseq-interactive on the Multi30k model, raw text through SentencePiece."""
    return [
        MULTI30K_MODEL,
        "--path",
        MULTI30K_MODEL / "checkpoint_best.pt",
        *f"--source-lang en --target-lang de --bpe sentencepiece {options}".split(),
        "--sentencepiece-model",
        MULTI30K_MODEL / "spm8k.model",
    ]


@pytest.mark.slow
def test_multi30k_interactive_sentencepiece_parity():
    text = "".join(line + "\n" for line in _multi30k_test_lines("en", 24))
    args = _multi30k_interactive_args("--beam 5 --buffer-size 8 --batch-size 8")
    stock, ours = run_pair("interactive", args, stdin=text)
    lines = gen_lines(stock.stdout)
    assert len(ids(lines)) == 24
    assert_same_lines(lines, gen_lines(ours.stdout))
    assert uses_seqfuse(ours.stdout + ours.stderr) and uses_exact_step(ours.stdout + ours.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ordered", "unordered"])
def test_multi30k_interactive_constraints_parity(mode):
    """fairseq-interactive --constraints (tab-separated target phrases after
    each source line): the same C/H/D/P lines as stock, on seqfuse's loop."""
    sources = _multi30k_test_lines("en", 12)
    targets = [line.split() for line in _multi30k_test_lines("de", 12)]
    # 0, 1 or 2 words of the reference as constraints (the second from its end)
    lines = [
        "\t".join([src, *([tgt[1]] if i % 3 else []), *([tgt[-2]] if i % 3 == 2 else [])])
        for i, (src, tgt) in enumerate(zip(sources, targets))
    ]
    args = _multi30k_interactive_args(
        f"--beam 5 --nbest 2 --buffer-size 4 --batch-size 4 --constraints {mode}"
    )
    stock, ours = run_pair("interactive", args, stdin="\n".join(lines) + "\n")
    stock_lines = [line for line in stock.stdout.splitlines() if re.match(r"^[CHDPS]-\d+\t", line)]
    our_lines = [line for line in ours.stdout.splitlines() if re.match(r"^[CHDPS]-\d+\t", line)]
    assert len(ids(stock_lines, "C")) == 12
    assert_same_lines(stock_lines, our_lines)
    assert uses_seqfuse(ours.stdout + ours.stderr)
    assert not fallback_lines(ours.stdout + ours.stderr)


@pytest.mark.slow
def test_multi30k_interactive_print_alignment_fused():
    """fairseq-interactive --print-alignment with the fused layers: the same
    A lines and translations as stock (scores within 1e-5, not printed digits)."""
    text = "".join(line + "\n" for line in _multi30k_test_lines("en", 40))
    args = _multi30k_interactive_args(
        "--beam 5 --nbest 2 --buffer-size 16 --batch-size 16 --print-alignment hard"
    )
    procs = [
        start("interactive", args, plugin=False, stdin=text),
        start("interactive", args, plugin=True, stdin=text, env={"SEQFUSE_FUSED_LAYERS": "1"}),
    ]
    stock, ours = (finish(p) for p in procs)

    def without_scores(stdout: str) -> list[str]:
        # H/D: id, score, text -> id, text; P: scores only, dropped
        out = []
        for line in gen_lines(stdout):
            fields = line.split("\t")
            if fields[0][0] in "HD":
                out.append("\t".join([fields[0], *fields[2:]]))
            elif fields[0][0] != "P":
                out.append(line)
        return out

    lines = without_scores(stock.stdout)
    assert len(ids(lines, "A")) == 80
    assert_same_lines(lines, without_scores(ours.stdout))
    assert "SequenceGeneratorWithAlignment (layers: fused)" in ours.stdout + ours.stderr


# --------------------------------------------------------------------------
# Generator selection, in process


def _gen_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"beam": 3, "max_len_b": 20, **overrides})


def _records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]


@pytest.mark.parametrize(
    "overrides, feature, reason",
    [
        ({"sampling": True}, "sampling", "--sampling is not supported"),
        (
            {"diverse_beam_groups": 3},
            "diverse_beam_groups",
            "--diverse-beam-groups is not supported",
        ),
        ({"diversity_rate": 0.5}, "diversity_rate", "--diversity-rate is not supported"),
        ({"match_source_len": True}, "match_source_len", "--match-source-len is not supported"),
        ({"constraints": "ordered"}, "constraints", "--constraints is not supported"),
        ({"prefix_size": 1}, "prefix_tokens", "--prefix-size is not supported"),
        ({"print_alignment": "hard"}, "print_alignment", "--print-alignment is not supported"),
        ({"retain_dropout": True}, "retain_dropout", "--retain-dropout is not supported"),
    ],
)
def test_fallback_options(tiny_loaded, plugin, caplog, monkeypatch, overrides, feature, reason):
    """Each option falls back with its reason, unless the generator declares
    the feature in SUPPORTED_FEATURES (checked both ways)."""
    from fairseq.sequence_generator import SequenceGenerator, SequenceGeneratorWithAlignment

    from seqfuse.generation import SequenceGenerator as Ours

    model, task = tiny_loaded
    caplog.set_level(logging.INFO, logger="seqfuse")
    declared = set(getattr(Ours, "SUPPORTED_FEATURES", ()))
    monkeypatch.setattr(Ours, "SUPPORTED_FEATURES", frozenset(declared - {feature}), raising=False)
    for _ in range(2):  # logged once per run, however many generators
        gen = task.build_generator([model], _gen_args(**overrides))
        assert type(gen) in (SequenceGenerator, SequenceGeneratorWithAlignment)
    assert _records(caplog) == [plugin.FALLBACK_PREFIX + reason]
    monkeypatch.setattr(Ours, "SUPPORTED_FEATURES", frozenset(declared | {feature}))
    gen = task.build_generator([model], _gen_args(**overrides))
    if feature == "print_alignment":
        from seqfuse.generation import SequenceGeneratorWithAlignment

        assert type(gen) is SequenceGeneratorWithAlignment
        assert gen.extract_alignment.__name__ == "extract_hard_alignment"
    else:
        assert type(gen) is Ours


def test_ensemble_lm_fusion_and_prefix_fn_stay_on_seqfuse(tiny_loaded, plugin, caplog):
    from seqfuse.generation import SequenceGenerator

    model, task = tiny_loaded
    caplog.set_level(logging.INFO, logger="seqfuse")
    ensemble = task.build_generator([model, model], _gen_args())
    lm = task.build_generator(
        [model], _gen_args(), extra_gen_cls_kwargs={"lm_model": model, "lm_weight": 0.1}
    )
    prefix = task.build_generator([model], _gen_args(), prefix_allowed_tokens_fn=lambda b, t: [4])
    assert type(ensemble) is SequenceGenerator and type(lm) is SequenceGenerator
    assert type(prefix) is SequenceGenerator
    assert _records(caplog) == []
    monkeypatch_features = SequenceGenerator.SUPPORTED_FEATURES
    try:  # a generator that does not declare the feature: stock, with the reason
        SequenceGenerator.SUPPORTED_FEATURES = monkeypatch_features - {"prefix_allowed_tokens_fn"}
        task.build_generator([model], _gen_args(), prefix_allowed_tokens_fn=lambda b, t: [4])
    finally:
        SequenceGenerator.SUPPORTED_FEATURES = monkeypatch_features
    assert _records(caplog) == [
        plugin.FALLBACK_PREFIX + "prefix_allowed_tokens_fn is not supported",
    ]


def test_fallback_non_transformer(tiny_loaded, plugin, caplog):
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from fairseq.models.lstm import LSTMModel
    from fairseq.sequence_generator import SequenceGenerator

    _model, task = tiny_loaded
    args = argparse.Namespace(
        encoder_embed_dim=16,
        decoder_embed_dim=16,
        decoder_out_embed_dim=16,
        arch="lstm",
        criterion="cross_entropy",
    )
    ARCH_CONFIG_REGISTRY["lstm"](args)
    lstm = LSTMModel.build_model(args, task).eval()
    caplog.set_level(logging.INFO, logger="seqfuse")
    gen = task.build_generator([lstm], _gen_args())
    assert type(gen) is SequenceGenerator
    assert _records(caplog) == [
        plugin.FALLBACK_PREFIX + "model LSTMModel is not a transformer encoder-decoder"
    ]


def test_seqfuse_generator_selected(tiny_loaded, plugin, caplog):
    from seqfuse.generation import SequenceGenerator

    model, task = tiny_loaded
    caplog.set_level(logging.INFO, logger="seqfuse")
    gen = task.build_generator(
        [model],
        _gen_args(lenpen=1.3, unkpen=0.5, no_repeat_ngram_size=2),
        extra_gen_cls_kwargs={"lm_model": None, "lm_weight": 0.0},  # what generate passes
    )
    assert type(gen) is SequenceGenerator
    assert gen.beam_size == 3 and gen.len_penalty == 1.3 and gen.unk_penalty == 0.5
    assert not _records(caplog)
    # The scorer path (--score-reference) is not a generator: left alone.
    from fairseq.sequence_scorer import SequenceScorer

    assert type(task.build_generator([model], _gen_args(score_reference=True))) is SequenceScorer


def test_generator_declared_features(tiny_loaded, plugin, monkeypatch):
    """A feature the generator declares in SUPPORTED_FEATURES stays on seqfuse."""
    from seqfuse.generation import SequenceGenerator

    model, task = tiny_loaded
    monkeypatch.setattr(SequenceGenerator, "SUPPORTED_FEATURES", {"prefix_tokens"}, raising=False)
    assert type(task.build_generator([model], _gen_args(prefix_size=1))) is SequenceGenerator


def _fake_layers(monkeypatch, result):
    calls = []

    def optimize_fairseq_model(model):
        calls.append(model)
        return result

    mod = types.ModuleType("seqfuse.layers.fairseq")
    mod.optimize_fairseq_model = optimize_fairseq_model
    monkeypatch.setitem(sys.modules, "seqfuse.layers.fairseq", mod)
    return calls


def test_fused_layers_refused_keeps_the_exact_generator(
    tiny, tiny_loaded, plugin, caplog, monkeypatch
):
    from seqfuse.generation import SequenceGenerator

    monkeypatch.setenv(plugin.FUSED_LAYERS_ENV, "1")
    _model, task = tiny_loaded
    model = _fresh_tiny_model(tiny)
    calls = _fake_layers(monkeypatch, (False, "head size 48 is not supported"))
    caplog.set_level(logging.INFO, logger="seqfuse")
    gen = task.build_generator([model], _gen_args())
    assert type(gen) is SequenceGenerator and calls == [model]
    assert not getattr(model, "_seqfuse_fused", False)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == ["seqfuse: fused layers not used: head size 48 is not supported"]


def test_fused_layers_are_opt_in(tiny, tiny_loaded, plugin, monkeypatch):
    from seqfuse.generation import SequenceGenerator

    monkeypatch.delenv(plugin.FUSED_LAYERS_ENV, raising=False)
    _model, task = tiny_loaded
    model = _fresh_tiny_model(tiny)
    calls = _fake_layers(monkeypatch, (True, "ok"))
    assert type(task.build_generator([model], _gen_args())) is SequenceGenerator
    assert calls == []


def test_fused_layers_applied_once_and_not_to_training_models(
    tiny, tiny_loaded, plugin, monkeypatch
):
    from seqfuse.generation import SequenceGenerator

    monkeypatch.setenv(plugin.FUSED_LAYERS_ENV, "1")
    _model, task = tiny_loaded
    model = _fresh_tiny_model(tiny)
    calls = _fake_layers(monkeypatch, (True, "ok"))
    assert type(task.build_generator([model], _gen_args())) is SequenceGenerator
    assert type(task.build_generator([model], _gen_args())) is SequenceGenerator
    assert calls == [model]
    training = _fresh_tiny_model(tiny).train()  # fairseq-train --eval-bleu's case
    assert type(task.build_generator([training], _gen_args())) is SequenceGenerator
    assert calls == [model]


def _fresh_tiny_model(tiny):
    """A model of its own (callers fuse or train it); needs the plugin installed."""
    from fairseq import checkpoint_utils

    models, _ = checkpoint_utils.load_model_ensemble(
        [str(tiny.ckpt)], arg_overrides={"data": str(tiny.data)}
    )
    return models[0].eval()


# --------------------------------------------------------------------------
# Loading, batching, registration, --user-dir


def test_weights_only_loading(tiny, monkeypatch):
    from fairseq import checkpoint_utils

    from seqfuse import fairseq_plugin

    paths = [tiny.ckpt, tiny.ckpt_last]  # the latter holds training meters (numpy)
    if (MULTI30K_MODEL / "checkpoint_best.pt").exists():
        paths.append(MULTI30K_MODEL / "checkpoint_best.pt")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    for path in paths:
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(path)
    fairseq_plugin.install()
    try:
        for path in paths:
            state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
            assert "model" in state
    finally:
        fairseq_plugin.uninstall()
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tiny.ckpt)


def test_batch_by_size_keeps_last_batch(plugin):
    import numpy as np
    from fairseq.data import data_utils

    rng = np.random.default_rng(0)
    stock = plugin._patches[[p[1] for p in plugin._patches].index("batch_by_size")][2]
    for _ in range(50):
        n = int(rng.integers(1, 200))
        indices = rng.permutation(n).astype(np.int64)
        sizes = rng.integers(1, 40, size=n).astype(np.int64)
        kw = dict(
            max_tokens=int(rng.integers(40, 400)),
            max_sentences=int(rng.integers(1, 33)),
            required_batch_size_multiple=int(rng.integers(1, 9)),
        )
        size_of = sizes.__getitem__
        ours = data_utils.batch_by_size(indices, size_of, num_tokens_vec=sizes, **kw)
        theirs = stock(indices, size_of, num_tokens_vec=sizes, **kw)
        assert np.array_equal(np.concatenate(ours), indices)
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
        assert len(ours) - len(theirs) in (0, 1)
        # The training iterator keeps stock batching.
        token = plugin._training_batches.set(True)
        try:
            training = data_utils.batch_by_size(indices, size_of, num_tokens_vec=sizes, **kw)
        finally:
            plugin._training_batches.reset(token)
        assert len(training) == len(theirs)


def test_disable_installs_nothing(monkeypatch):
    from fairseq.data import data_utils
    from fairseq.tasks.fairseq_task import FairseqTask

    from seqfuse import fairseq_plugin

    before = (FairseqTask.build_generator, data_utils.batch_by_size)
    monkeypatch.setenv("SEQFUSE_DISABLE", "1")
    fairseq_plugin.install()
    try:
        assert not fairseq_plugin.installed()
        assert (FairseqTask.build_generator, data_utils.batch_by_size) == before
    finally:
        fairseq_plugin.uninstall()


def test_uninstall_restores_stock():
    from fairseq import utils
    from fairseq.data import data_utils
    from fairseq.tasks.fairseq_task import FairseqTask
    from fairseq.trainer import Trainer

    from seqfuse import fairseq_plugin

    def current():
        return (
            FairseqTask.build_generator,
            data_utils.batch_by_size,
            Trainer.get_train_iterator,
            utils.import_user_module,
            len(torch.serialization.get_safe_globals()),
        )

    before = current()
    fairseq_plugin.install()
    assert fairseq_plugin.installed() and current() != before
    fairseq_plugin.uninstall()
    assert current() == before


ARCHS = [
    "transformer",
    "transformer_iwslt_de_en",
    "transformer_wmt_en_de",
    "transformer_vaswani_wmt_en_de_big",
    "transformer_vaswani_wmt_en_fr_big",
    "transformer_wmt_en_de_big",
    "transformer_wmt_en_de_big_t2t",
]


def test_arch_registration():
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    from seqfuse import fairseq_plugin

    fairseq_plugin.register_names()
    fairseq_plugin.register_names()  # idempotent
    for arch in ARCHS:
        assert ARCH_MODEL_REGISTRY["seqfuse_" + arch] is fairseq_plugin.SeqfuseTransformerModel
        a, b = argparse.Namespace(), argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](a)
        ARCH_CONFIG_REGISTRY["seqfuse_" + arch](b)
        assert vars(a) == vars(b)


@pytest.mark.parametrize("arch", ["transformer", "transformer_iwslt_de_en"])
def test_state_dict_compatible_both_ways(tiny_loaded, arch):
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    from seqfuse import fairseq_plugin

    fairseq_plugin.register_names()
    _model, task = tiny_loaded

    def build(name, seed):
        args = argparse.Namespace(
            arch=name,
            encoder_layers=2,
            decoder_layers=2,
            encoder_embed_dim=32,
            decoder_embed_dim=32,
            encoder_ffn_embed_dim=48,
            decoder_ffn_embed_dim=48,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            share_all_embeddings=True,
        )
        ARCH_CONFIG_REGISTRY[name](args)
        torch.manual_seed(seed)
        return ARCH_MODEL_REGISTRY[name].build_model(args, task).eval()

    stock, ours = build(arch, 0), build("seqfuse_" + arch, 1)
    assert type(ours) is fairseq_plugin.SeqfuseTransformerModel
    src = torch.randint(4, 50, (2, 7))
    lengths = torch.tensor([7, 7])
    prev = torch.randint(4, 50, (2, 5))
    for dst, srcm in ((ours, stock), (stock, ours)):
        missing, unexpected = dst.load_state_dict(srcm.state_dict(), strict=True)
        assert not missing and not unexpected
        with torch.no_grad():
            assert torch.equal(dst(src, lengths, prev)[0], srcm(src, lengths, prev)[0])


def test_seqfuse_translation_task(tiny_loaded, monkeypatch):
    from fairseq.tasks import TASK_REGISTRY

    from seqfuse import fairseq_plugin
    from seqfuse.generation import SequenceGenerator

    fairseq_plugin.register_names()
    model, task = tiny_loaded
    cls = TASK_REGISTRY["seqfuse_translation"]
    assert cls is fairseq_plugin.SeqfuseTranslationTask
    ours = cls(task.cfg, task.src_dict, task.tgt_dict)
    # Its own generator choice, with or without the global hook ...
    assert type(ours.build_generator([model], _gen_args())) is SequenceGenerator
    # ... and stock's under SEQFUSE_DISABLE.
    monkeypatch.setenv("SEQFUSE_DISABLE", "1")
    assert type(ours.build_generator([model], _gen_args())) is not SequenceGenerator


def test_import_user_module_accepts_plugin(tmp_path, monkeypatch):
    """--user-dir from the repository, from seqfuse.fairseq_user_dir(), and from
    another copy (an installed seqfuse_fairseq beside the repository's)."""
    import shutil

    from fairseq import utils

    import seqfuse
    from seqfuse import fairseq_plugin

    copy = tmp_path / "site" / "seqfuse_fairseq"
    shutil.copytree(PLUGIN_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(utils.import_user_module, "memo", set(), raising=False)
    try:
        import seqfuse_fairseq  # noqa: F401  (installs the plugin on first import)

        fairseq_plugin.install()
        assert fairseq_plugin.installed()
        for path in (PLUGIN_DIR, seqfuse.fairseq_user_dir(), copy, str(PLUGIN_DIR) + "/"):
            utils.import_user_module(argparse.Namespace(user_dir=str(path)))
        stock = fairseq_plugin._patches[
            [p[1] for p in fairseq_plugin._patches].index("import_user_module")
        ][2]
        # fairseq itself accepts the directory the imported module came from ...
        stock(argparse.Namespace(user_dir=seqfuse.fairseq_user_dir()))
        # ... and, without the plugin's hook, refuses another copy.
        with pytest.raises(ImportError, match="not globally unique"):
            stock(argparse.Namespace(user_dir=str(copy)))
    finally:
        fairseq_plugin.uninstall()


# --------------------------------------------------------------------------
# BART (bart_base-shaped, small and untrained)

BART_SMALL = dict(
    encoder_layers=2,
    decoder_layers=2,
    encoder_embed_dim=32,
    decoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    decoder_ffn_embed_dim=64,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
)


@pytest.mark.slow
def test_bart_translation_parity(tiny):
    save = tiny.dir / "ckpt_bart"
    run(
        "train",
        [tiny.data, "--arch", "bart_base", *TINY_ARCH, *TINY_TRAIN]
        + ["--max-update", "3", "--save-dir", save, "--disable-validation"],
        plugin=False,
    )
    args = [tiny.data, "--path", save / "checkpoint_last.pt", "--gen-subset", "test"]
    args += "--batch-size 16 --beam 4 --max-len-b 10 --unkpen 5".split()
    args += ["--required-batch-size-multiple", "1"]
    stock, ours = run_pair("generate", args)
    assert_same_lines(gen_lines(stock.stdout), gen_lines(ours.stdout))
    assert uses_seqfuse(ours.stderr), ours.stderr[-2000:]


def test_translation_from_pretrained_bart(tiny_loaded, plugin):
    """The task builds fairseq's SequenceGenerator itself (EOS = the target
    language tag): with the plugin it gets seqfuse's, and the same hypotheses.

    (Upstream-main fairseq never sets the task's ``args``, which the task
    reads; the test sets it as a working fairseq would.)"""
    import copy

    from fairseq.models import ARCH_CONFIG_REGISTRY
    from fairseq.models.bart import BARTModel
    from fairseq.tasks.translation_from_pretrained_bart import TranslationFromPretrainedBARTTask

    from seqfuse.generation import SequenceGenerator as Ours

    _model, base = tiny_loaded
    cfg = argparse.Namespace(**vars(copy.deepcopy(base.cfg)), langs="en,de")
    cfg.source_lang, cfg.target_lang = "en", "de"
    task = TranslationFromPretrainedBARTTask(
        cfg, copy.deepcopy(base.src_dict), copy.deepcopy(base.tgt_dict)
    )
    task.args = cfg
    margs = argparse.Namespace(arch="bart_base", **BART_SMALL)
    ARCH_CONFIG_REGISTRY["bart_base"](margs)
    torch.manual_seed(0)
    stock_model = BARTModel.build_model(margs, task).eval()
    our_model = copy.deepcopy(stock_model)

    src = [
        base.src_dict.encode_line(line, add_if_not_exist=False).long()
        for line in ("a man is riding a bike .", "two dogs play in the snow .", "a girl .")
    ]
    dataset = task.build_dataset_for_inference(src, [len(s) for s in src])
    sample = dataset.collater([dataset[i] for i in range(len(src))])
    gen_args = _gen_args(max_len_b=8)

    ours = task.build_generator([our_model], gen_args)
    assert type(ours) is Ours and ours.eos == task.tgt_dict.index("[de]")
    plugin.uninstall()
    stock = task.build_generator([stock_model], gen_args)
    assert type(stock) is not Ours and stock.eos == ours.eos
    with torch.no_grad():
        a = stock.generate([stock_model], sample)
        b = ours.generate([our_model], sample)
    for hs, ho in zip(a, b):
        assert [h["tokens"].tolist() for h in hs] == [h["tokens"].tolist() for h in ho]
        assert [h["score"].item() for h in hs] == [h["score"].item() for h in ho]
