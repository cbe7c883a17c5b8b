"""scripts/parity_fuzz.py: it runs, agrees where seqfuse agrees with stock, and
reports a difference when seqfuse's output is made to differ."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator as StockGenerator
from generation_utils import random_sample, random_transformer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import parity_fuzz  # noqa: E402

import seqfuse.generation  # noqa: E402


def test_fuzz_script_runs_clean(tmp_path):
    out = tmp_path / "fuzz.json"
    args = ["--cases", "10", "--seed", "40", "--no-multi30k", "--json", out, "--all-cases"]
    proc = subprocess.run(
        [sys.executable, ROOT / "scripts" / "parity_fuzz.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["cases"] == 20 and summary["mismatched"] == 0
    # the cases ran generation on both sides (not both raising on bad options)
    assert summary["both_raised"] <= 4, report["results"]
    assert {r["target"] for r in report["results"]} == {"fairseq", "hf"}
    assert "0 mismatched" in proc.stdout
    assert sum(report["breakdown"].values()) == 20 and report["mismatches"] == []


def test_fuzz_script_refuses_bad_arguments():
    with pytest.raises(SystemExit):
        parity_fuzz.main(["--targets", "onnx"])
    with pytest.raises(SystemExit):
        parity_fuzz.main(["--cases", "0"])
    with pytest.raises(SystemExit):
        parity_fuzz.main(["--targets", "hf", "--hf-kinds", "bert"])


def test_hf_kinds_pick_the_models(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "fuzz.json"
    args = ["--cases", "4", "--seed", "7", "--targets", "hf", "--hf-kinds", "fsmt,marian"]
    assert parity_fuzz.main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    kinds = {key.split()[1] for key in report["breakdown"]}
    assert kinds <= {"fsmt", "marian"} and sum(report["breakdown"].values()) == 4
    assert report["summary"]["hf_cases_with_advanced_steps"] > 0


def _stock_hypos(seed=3):
    model, d = random_transformer(vocab=30, seed=seed)
    sample = random_sample(d, bsz=3, seed=seed)
    with torch.no_grad():
        return StockGenerator([model], d, beam_size=3).generate([model], sample)


def test_fairseq_checker_finds_what_differs():
    stock = _stock_hypos()
    assert parity_fuzz.fairseq_problems(stock, copy.deepcopy(stock), exact=True) == []

    tokens = copy.deepcopy(stock)
    tokens[1][0]["tokens"][0] += 1
    assert "tokens" in parity_fuzz.fairseq_problems(stock, tokens, exact=False)[0]

    score = copy.deepcopy(stock)
    score[0][1]["score"] += 1e-3
    assert parity_fuzz.fairseq_problems(stock, score, exact=False)
    # one float32 step off: a difference for the exact modes, none for the fused one
    pos = copy.deepcopy(stock)
    p = pos[2][0]["positional_scores"]
    p[0] = torch.nextafter(p[0], torch.tensor(-math.inf))
    assert parity_fuzz.fairseq_problems(stock, pos, exact=True)
    assert parity_fuzz.fairseq_problems(stock, pos, exact=False) == []

    fewer = copy.deepcopy(stock)
    fewer[0] = fewer[0][:-1]
    assert "hypotheses" in parity_fuzz.fairseq_problems(stock, fewer, exact=True)[0]


def test_fused_positional_tolerance_follows_the_running_score():
    # a long hypothesis whose running score passes -256: float32's spacing
    # there is 2**-15, so a positional score may differ by that much
    n = 300
    pos = torch.full((n,), -1.0)
    a = [[{"tokens": torch.arange(n), "score": pos.sum() / n, "positional_scores": pos,
           "attention": torch.empty(0), "alignment": torch.empty(0)}]]  # fmt: skip
    b = copy.deepcopy(a)
    b[0][0]["positional_scores"][-1] += 2.0**-15
    assert parity_fuzz.fairseq_problems(a, b, exact=False) == []
    b[0][0]["positional_scores"][-1] += 2.0**-12
    assert parity_fuzz.fairseq_problems(a, b, exact=False)
    # a short one keeps the 1e-5 bound
    c = [[dict(a[0][0], tokens=torch.arange(3), positional_scores=torch.full((3,), -1.0))]]
    d = copy.deepcopy(c)
    d[0][0]["positional_scores"][1] += 3e-5
    assert parity_fuzz.fairseq_problems(c, d, exact=False)


def test_fuzz_reports_a_wrong_fairseq_result(monkeypatch, capsys):
    real = seqfuse.generation.SequenceGenerator.generate

    def off_by_a_little(self, models, sample, **kw):
        hypos = real(self, models, sample, **kw)
        hypos[0][0]["score"] = hypos[0][0]["score"] + 1e-3
        return hypos

    monkeypatch.setattr(seqfuse.generation.SequenceGenerator, "generate", off_by_a_little)
    args = ["--cases", "3", "--seed", "7", "--targets", "fairseq", "--no-multi30k"]
    assert parity_fuzz.main(args) == 1
    out = capsys.readouterr().out
    assert "MISMATCH fairseq" in out and "score" in out


def test_fuzz_reports_a_wrong_hf_result(monkeypatch, capsys):
    pytest.importorskip("transformers")
    import seqfuse
    from integrations import hf

    real_optimize, real_restore = seqfuse.optimize, hf.restore

    def optimize(model, **kw):
        real_optimize(model, **kw)
        real_generate = model.generate

        def generate(*a, **k):
            out = real_generate(*a, **k)
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            seqs[0, -1] += 1
            return out

        model.generate = generate
        return model

    def restore(model):
        model.__dict__.pop("generate", None)
        return real_restore(model)

    monkeypatch.setattr(seqfuse, "optimize", optimize)
    monkeypatch.setattr(hf, "restore", restore)
    assert parity_fuzz.main(["--cases", "2", "--seed", "5", "--targets", "hf"]) == 1
    assert "MISMATCH hf" in capsys.readouterr().out


def test_fused_scores_are_judged_against_float64_where_stock_is_off():
    """Past the tolerance, seqfuse's fused score passes only when it is no
    further from the float64 value than stock's."""
    stock = _stock_hypos()
    ours = copy.deepcopy(stock)
    pos = ours[0][0]["positional_scores"]
    pos[1] += 5e-5
    exact = stock[0][0]["positional_scores"].double()

    def reference_at(value):
        def reference(sentence, tokens):
            ref = exact.clone()
            ref[1] = value
            return ref, torch.tensor(0.0, dtype=torch.float64)

        return reference

    assert parity_fuzz.fairseq_problems(stock, ours, exact=False)
    # the float64 value sits where seqfuse's is: stock's was the one off
    closer = reference_at(float(pos[1]))
    assert parity_fuzz.fairseq_problems(stock, ours, exact=False, reference=closer) == []
    # the float64 value is stock's: seqfuse's difference is reported
    stock_is_right = reference_at(float(exact[1]))
    assert parity_fuzz.fairseq_problems(stock, ours, exact=False, reference=stock_is_right)


def test_float64_judgement_compares_worst_errors_not_positions():
    """Stock and seqfuse round each position independently: seqfuse passes
    when its worst error from float64 is within the tolerance of stock's
    worst, wherever the positions fall; it fails when its worst is further."""
    stock = _stock_hypos()
    exact = stock[0][0]["positional_scores"].double()
    assert exact.numel() >= 3

    def reference(sentence, tokens):
        return exact.clone(), torch.tensor(0.0, dtype=torch.float64)

    off_stock = copy.deepcopy(stock)
    off_stock[0][0]["positional_scores"][0] += 1.5e-5  # stock's worst: position 0
    ours = copy.deepcopy(stock)
    ours[0][0]["positional_scores"][2] += 2e-5  # seqfuse's worst: position 2
    assert parity_fuzz.fairseq_problems(off_stock, ours, exact=False)
    assert parity_fuzz.fairseq_problems(off_stock, ours, exact=False, reference=reference) == []
    ours[0][0]["positional_scores"][2] += 3e-5  # now 5e-5 off: further than stock's + 1e-5
    assert parity_fuzz.fairseq_problems(off_stock, ours, exact=False, reference=reference)


def _step_output(delta: float, where: int = 1):
    """A one-step generate output whose scores row [10, 0.5, -3, -inf] has
    ``delta`` added at ``where``."""
    from types import SimpleNamespace

    row = torch.tensor([[10.0, 0.5, -3.0, float("-inf")]])
    shift = torch.zeros_like(row)
    shift[0, where] = delta
    return SimpleNamespace(
        sequences=torch.tensor([[1, 2]]),
        sequences_scores=None,
        beam_indices=None,
        scores=(row + shift,),
    )


def test_per_step_scores_held_to_their_rows_scale():
    """Per-step scores (greedy search's logits, beam search's
    log-probabilities): the fused rule scales 1e-5 by each row's largest
    finite magnitude (a log-probability's rounding grows with the logits'
    spread, as a logit's with its size); the exact rule stays bit for bit;
    infinities must sit in the same places."""
    from types import SimpleNamespace

    out = _step_output
    base = out(0.0)
    check = parity_fuzz.hf_problems
    assert check(base, out(5e-5), exact=False) == []  # < 1e-5 * 10
    assert check(base, out(9e-5, where=0), exact=False) == []
    assert check(base, out(2e-4), exact=False) == ["per-step scores differ"]
    assert check(base, out(5e-5), exact=True) == ["per-step scores differ"]
    # a row of small magnitudes keeps the plain 1e-5
    small = SimpleNamespace(**{**vars(base), "scores": (torch.tensor([[-0.2, -1.9]]),)})
    off = SimpleNamespace(**{**vars(base), "scores": (torch.tensor([[-0.2, -1.9 + 3e-5]]),)})
    assert check(small, off, exact=False) == ["per-step scores differ"]
    moved_inf = out(0.0)
    moved_inf.scores = (torch.tensor([[10.0, 0.5, float("-inf"), -3.0]]),)
    assert check(base, moved_inf, exact=False) == ["per-step scores differ"]


def test_hf_per_step_scores_judged_against_float64():
    """Fused per-step scores outside the row rule pass when seqfuse's worst
    error from the float64 run is within the rule of stock's worst; not when
    it is further, nor without a float64 run (its sequences not stock's), nor
    in the exact mode."""
    out = _step_output
    check = parity_fuzz.hf_problems
    stock, ours = out(1.5e-4, where=0), out(-1.0e-4, where=2)  # 2.5e-4 apart
    assert check(stock, ours, exact=False) == ["per-step scores differ"]
    ref = out(0.0)
    assert check(stock, ours, exact=False, reference=lambda: ref) == []  # 1e-5 vs 1.5e-5
    further = out(-2.6e-4, where=2)  # 2.6e-5 of the row: further than 1.5e-5 + 1e-5
    assert check(stock, further, exact=False, reference=lambda: ref) == ["per-step scores differ"]
    assert check(stock, ours, exact=False, reference=lambda: None) == ["per-step scores differ"]
    assert check(stock, ours, exact=True, reference=lambda: ref) == ["per-step scores differ"]
    moved_inf = out(0.0)
    moved_inf.scores = (torch.tensor([[10.0, 0.5, float("-inf"), -3.0]]),)
    assert check(stock, moved_inf, exact=False, reference=lambda: ref) == ["per-step scores differ"]
