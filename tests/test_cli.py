"""seqfuse's console scripts: fairseq's tools with the plugin's ``--user-dir``.

``seqfuse-generate ARGS`` must print exactly what ``fairseq-generate ARGS
--user-dir plugins/seqfuse_fairseq`` prints (parity with stock fairseq is
tests/test_plugin.py's subject); the tiny model comes from test_plugin.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_plugin import (  # noqa: F401  (tiny is a fixture)
    BIN,
    PLUGIN_DIR,
    TINY_ARCH,
    TINY_DEFAULT,
    TINY_TRAIN,
    _env,
    finish,
    gen_lines,
    ids,
    start,
    tiny,
    tiny_gen_args,
    uses_seqfuse,
)

import seqfuse
from seqfuse import cli


def start_script(name: str, args, *, stdin: str | None = None):
    """Start the console script ``name`` (no ``--user-dir`` of ours)."""
    proc = subprocess.Popen(
        [str(BIN / name), *map(str, args)],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(plugin=True),
    )
    proc.stdin_text = stdin
    return proc


def test_with_user_dir_adds_the_plugin():
    user_dir = seqfuse.fairseq_user_dir()
    assert Path(user_dir).resolve() == PLUGIN_DIR.resolve()
    argv = ["data-bin", "--path", "m.pt", "--beam", "5"]
    assert cli.with_user_dir(argv) == ["--user-dir", user_dir, *argv]


@pytest.mark.parametrize("given", [["--user-dir", "/elsewhere"], ["--user-dir=/elsewhere"]])
def test_with_user_dir_keeps_the_users(given):
    from seqfuse import fairseq_plugin

    try:
        argv = ["data-bin", *given, "--beam", "5"]
        assert cli.with_user_dir(argv) == argv
        assert "seqfuse_fairseq" in sys.modules  # our plugin is imported beside theirs
    finally:
        fairseq_plugin.uninstall()


def test_console_scripts_declared():
    scripts = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.name.startswith("seqfuse-")
    }
    assert scripts == {
        "seqfuse-generate": "seqfuse.cli:generate",
        "seqfuse-interactive": "seqfuse.cli:interactive",
        "seqfuse-train": "seqfuse.cli:train",
        "seqfuse-bleu": "seqfuse.cli:bleu",
    }
    for name in scripts:
        assert (BIN / name).exists(), f"{name}: run `make install`"


def test_bleu_delegates_to_seqfuse_bleu(monkeypatch):
    seen = []
    fake = types.ModuleType("seqfuse.bleu")
    fake.main = lambda argv=None: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "seqfuse.bleu", fake)
    assert cli.bleu(["--model", "m"]) == 3
    assert seen == [["--model", "m"]]


def test_cli_imports_bleu_lazily():
    code = "import sys, seqfuse.cli; print('seqfuse.bleu' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_run_fairseq_restores_argv(monkeypatch):
    calls = []
    fake = types.ModuleType("fake_fairseq_cli")
    fake.cli_main = lambda: calls.append(list(sys.argv))
    monkeypatch.setitem(sys.modules, "fake_fairseq_cli", fake)
    saved = list(sys.argv)
    cli._run_fairseq("fake_fairseq_cli", ["data", "--beam", "2"])
    assert sys.argv == saved
    assert calls[0][1:] == ["--user-dir", seqfuse.fairseq_user_dir(), "data", "--beam", "2"]


def test_fused_layers_flag_sets_the_env_for_the_run(monkeypatch):
    seen = []
    fake = types.ModuleType("fake_fairseq_cli")
    fake.cli_main = lambda: seen.append((list(sys.argv), os.environ.get("SEQFUSE_FUSED_LAYERS")))
    monkeypatch.setitem(sys.modules, "fake_fairseq_cli", fake)
    monkeypatch.delenv("SEQFUSE_FUSED_LAYERS", raising=False)
    cli._run_fairseq("fake_fairseq_cli", ["data", "--fused-layers", "--beam", "2"])
    assert seen[0][0][1:] == ["--user-dir", seqfuse.fairseq_user_dir(), "data", "--beam", "2"]
    assert seen[0][1] == "1"
    assert "SEQFUSE_FUSED_LAYERS" not in os.environ  # restored after the run
    cli._run_fairseq("fake_fairseq_cli", ["data"])
    assert seen[1][1] is None


@pytest.mark.slow
def test_seqfuse_generate_is_fairseq_generate_with_plugin(tiny):  # noqa: F811
    args = tiny_gen_args(tiny, *TINY_DEFAULT)
    # Both started now (not a cached run): same code, same build.
    ours = start_script("seqfuse-generate", args)
    ref = start("generate", args, plugin=True)
    ours, ref = finish(ours), finish(ref)
    assert gen_lines(ours.stdout) == gen_lines(ref.stdout)
    assert len(ids(gen_lines(ours.stdout))) == 45
    assert uses_seqfuse(ours.stderr)


@pytest.mark.slow
def test_seqfuse_interactive_with_explicit_user_dir(tiny):  # noqa: F811
    text = "".join((tiny.dir / "test.en").read_text().splitlines(keepends=True)[:10])
    args = [tiny.data, "--path", tiny.ckpt, "--source-lang", "en", "--target-lang", "de"]
    args += ["--beam", "3", "--buffer-size", "4", "--batch-size", "4"]
    # A --user-dir already on the command line is kept (here: the plugin itself).
    ours = start_script("seqfuse-interactive", [*args, "--user-dir", PLUGIN_DIR], stdin=text)
    ref = start("interactive", args, plugin=True, stdin=text)
    ours, ref = finish(ours), finish(ref)
    assert gen_lines(ours.stdout) == gen_lines(ref.stdout)
    assert len(ids(gen_lines(ours.stdout))) == 10


@pytest.mark.slow
def test_seqfuse_train_seqfuse_arch(tiny):  # noqa: F811
    import torch

    save = tiny.dir / "ckpt_cli_train"
    proc = start_script(
        "seqfuse-train",
        [tiny.data, "--arch", "seqfuse_transformer", *TINY_ARCH, *TINY_TRAIN]
        + ["--max-update", "3", "--save-dir", save, "--disable-validation"],
    )
    finish(proc)
    state = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert state["cfg"]["model"].arch == "seqfuse_transformer"
    assert state["optimizer_history"][-1]["num_updates"] == 3
