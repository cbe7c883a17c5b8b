"""The package without its extension, `python -m seqfuse.info`, backend choice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import seqfuse
from seqfuse.ops.beam_topk import BACKENDS, beam_topk, which_backend
from seqfuse.ops.dispatch import choose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `seqfuse._C` unimportable, as on a machine where it was never built.
_NO_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "seqfuse._C":
                raise ImportError("blocked for the test")
    sys.meta_path.insert(0, _Block())
    """
)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _NO_EXTENSION + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_info_lists_versions_and_backends():
    out = subprocess.run(
        [sys.executable, "-m", "seqfuse.info"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for key in ("torch", "fairseq", "transformers", "backend cpu extension", "backend cuda"):
        assert key in out.stdout
    assert seqfuse.__version__ in out.stdout
    hf_line = next(x for x in out.stdout.splitlines() if x.startswith("hf integration"))
    assert hf_line.endswith("available (seqfuse.optimize)"), hf_line
    steps = next(x for x in out.stdout.splitlines() if x.startswith("exact decoder steps"))
    # the pinned fairseq and transformers are the versions the steps mirror
    want = "fairseq: verified; transformers: verified; GPT-2: verified; T5: verified; "
    want += "Llama: verified; Qwen2: verified; Mistral: verified; FSMT: verified"
    assert steps.endswith(want), steps
    assert "packed GEMM (fused layers)" in out.stdout
    stacks = next(x for x in out.stdout.splitlines() if x.startswith("fused stacks, one call"))
    assert stacks.endswith("decoder step and encoder"), stacks


def test_source_revision_is_the_checkouts_commit(tmp_path, monkeypatch):
    from seqfuse.info import source_revision

    root = os.path.dirname(os.path.dirname(os.path.abspath(seqfuse.__file__)))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        assert source_revision() == "unknown"
    else:
        assert source_revision().removesuffix("-dirty") == head.stdout.strip()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert source_revision() == "unknown"


def test_import_without_extension_warns_once_and_uses_the_reference():
    out = _run(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import seqfuse
            from seqfuse.ops.beam_topk import beam_topk, beam_topk_reference, which_backend
        msgs = [str(x.message) for x in w if "seqfuse._C" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert not seqfuse.extension_available()
        x = torch.randn(6, 50); cum = torch.randn(6)
        got = beam_topk(x, cum, 3, 6, 1, 3, 2, 0.5)
        ref = beam_topk_reference(x, cum, 3, 6, 1, 3, 2, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        print(which_backend(x))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("reference")
    assert "extension not importable" in out.stdout


def test_generator_without_extension_matches_stock():
    out = _run(
        """
        import sys
        sys.path.insert(0, "tests")
        from generation_utils import random_transformer, random_sample, run_both
        from generation_utils import compare_hypotheses
        model, d = random_transformer(vocab=60, seed=3)
        sample = random_sample(d, bsz=3, seed=1)
        stock, ours = run_both([model], d, sample, {"beam_size": 4, "max_len_b": 10})
        compare_hypotheses(stock, ours, "no extension")
        print("ok")
        """,
        SEQFUSE_QUIET="1",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_backend_choice_explains_refusals(monkeypatch):
    x = torch.randn(4, 10)
    if seqfuse.extension_available():
        assert which_backend(x).startswith("cpu (cuda refused: input not on cuda")
    monkeypatch.setenv("SEQFUSE_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="no backend can run this call.*cpu: SEQFUSE_BACKEND"):
        choose(BACKENDS, x)
    with pytest.raises(RuntimeError, match="no backend"):
        beam_topk(x, None, 1, 3, 1, 3, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"logits": torch.randn(10)}, "logits must be"),
        ({"rows_per_sent": 3}, "not a multiple"),
        ({"k": 41}, "outside"),
        ({"cum_scores": torch.zeros(3)}, "cum_scores"),
        ({"banned": torch.zeros(3, 2, dtype=torch.long)}, "banned"),
    ],
)
def test_bad_op_arguments_are_clear_errors(kwargs, match):
    args = {"logits": torch.randn(4, 10), "cum_scores": None, "rows_per_sent": 4, "k": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        beam_topk(pad=1, unk=3, eos=2, **args)


def test_optimize_rejects_non_hf_models_and_leaves_them_untouched():
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="PreTrainedModel"):
        seqfuse.optimize(model)
    assert type(model) is torch.nn.Linear
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
