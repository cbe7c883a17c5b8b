"""Parity fuzzing: seqfuse against stock on random option combinations.

Each case draws a model, a batch and generation options from its seed, runs
stock and seqfuse on them in this process, and compares what they return:

- ``fairseq``: a random fairseq transformer (random depth, width, heads, norm
  placement, activation, vocabulary, output sharpness) or, when present, the
  Multi30k model of ``../shared``, with a random mix of beam size,
  length and unk penalties, max/min length limits, no-repeat n-grams,
  temperature, prefix tokens, ``--match-source-len``, sampling, diverse
  siblings, diverse beam search, lexical constraints or
  ``prefix_allowed_tokens_fn``; seqfuse's generator runs on the stock layers
  or the exact one-call step (now and then in float16 or bfloat16), or on the
  fused layers (not with sampling: a cumulative distribution that moves by
  1e-7 sends some uniform draw to a neighbouring token). Stock layers and the
  exact step must give every hypothesis bit for bit; the fused layers the
  same tokens, and scores within 1e-5, or for positional scores two units in
  the last place of the hypothesis's largest running score (a positional
  score is the difference of two running scores and carries their rounding;
  see the README), or, past those, no further from a float64 teacher-forced
  evaluation than stock's.
- ``hf``: a tiny random Hugging Face model (Marian, BART, mBART, T5, GPT-2,
  Llama, Qwen2, M2M100, Pegasus) with a random mix of beams (1: greedy), returned
  sequences, length penalty, early stopping, new-token limits, no-repeat
  n-grams, repetition penalty, bad words and per-step scores;
  ``seqfuse.optimize`` must give the same sequences and scores bit for bit,
  ``seqfuse.optimize(fused_layers=True)`` the same sequences and beams with
  scores within 1e-5.
- ``cli`` (on request): ``fairseq-generate`` (a shard of the valid or test
  set, random batching, beam options, sampling, diverse siblings,
  ``--match-source-len``, ``--retain-dropout``, ``--print-alignment``,
  ``--score-reference``, ``--post-process``, ``--fp16``) or
  ``fairseq-interactive`` (raw test lines through SentencePiece, now and then
  an empty line and unknown characters) on the Multi30k model, stock and with
  ``--user-dir`` side by side: the same exit status and, for every sentence
  stock prints, the same S/T/H/D/P/A/C lines (with the plugin no sentence is
  dropped: stock's batching may drop the last incomplete batch).

Where stock raises, seqfuse must raise an exception of the same type (or a
subclass of it). One line per mismatch, a summary, ``--json`` for the record;
the exit status is 1 when any case differs.

    .venv/bin/python scripts/parity_fuzz.py --cases 300 --seed 0
    .venv/bin/python scripts/parity_fuzz.py --cases 40 --targets cli

The models come from the test suite's builders (``tests/generation_utils.py``,
``tests/hf_models.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

SCORE_TOL = 1e-5
TARGETS = ("fairseq", "hf", "cli")


# --------------------------------------------------------------------- checks
def ulp32(x: float) -> float:
    """A unit in the last place of float32 at ``x``."""
    x = abs(x)
    if x < 2.0**-126:
        return 2.0**-149
    return 2.0 ** (math.frexp(x)[1] - 24)


def _close(x: torch.Tensor, y: torch.Tensor, atol: float) -> bool:
    # equal infinities (-inf scores) are equal; anything else within tolerance
    return bool(((x == y) | ((x - y).abs() <= atol + SCORE_TOL * y.abs())).all())


def fairseq_problems(stock, ours, exact: bool, reference=None) -> list[str]:
    """What differs between two fairseq hypothesis lists (empty: nothing).

    ``reference(sentence, tokens)``, for the fused layers: the hypothesis's
    positional log-probabilities and score computed in float64. A score
    outside the tolerance is then accepted when seqfuse's is no further from
    the float64 value than stock's (plus the tolerance): stock's own fp32
    error can exceed 1e-5 on an ill-conditioned model (a 4-wide layer norm)."""
    if len(stock) != len(ours):
        return [f"{len(stock)} vs {len(ours)} sentences"]
    found = []
    for i, (hs, ho) in enumerate(zip(stock, ours)):
        if len(hs) != len(ho):
            found.append(f"sentence {i}: {len(hs)} vs {len(ho)} hypotheses")
            continue
        for j, (a, b) in enumerate(zip(hs, ho)):
            where = f"sentence {i} hypothesis {j}"
            if not torch.equal(a["tokens"], b["tokens"]):
                found.append(f"{where}: tokens {a['tokens'].tolist()} vs {b['tokens'].tolist()}")
                continue
            for key in ("score", "positional_scores", "attention", "alignment"):
                x, y = a.get(key), b.get(key)
                if x is None or y is None:
                    if (x is None) != (y is None):
                        found.append(f"{where}: {key} missing on one side")
                    continue
                if x.shape != y.shape:
                    found.append(f"{where}: {key} shape {tuple(x.shape)} vs {tuple(y.shape)}")
                elif exact or key == "alignment" or not x.is_floating_point():
                    if not torch.equal(x, y):
                        found.append(f"{where}: {key} not bit-identical")
                else:
                    atol = SCORE_TOL
                    if key == "positional_scores" and x.numel():
                        running = x.double().cumsum(0).abs().max().item()
                        atol = max(SCORE_TOL, 2 * ulp32(running))
                    if not _close(y, x, atol) and not _no_further(
                        reference, i, a["tokens"], key, x, y, atol
                    ):
                        diff = (y - x).abs().nan_to_num(math.inf).max().item()
                        found.append(f"{where}: {key} differs by {diff:.3g}")
    return found


def _no_further(reference, sentence, tokens, key, x, y, atol) -> bool:
    """Whether seqfuse's ``y`` is within ``atol`` of being as close to the
    float64 reference as stock's ``x`` (False without a reference): its
    worst error over the hypothesis's positions against stock's worst. Two
    fp32 implementations round each position independently, so a position
    by position comparison would ask seqfuse to beat stock's luckiest
    position (a 201-step hypothesis of a 4-wide random model: seqfuse's
    worst positional error 1.24e-5, stock's 1.12e-5, but at one position
    stock's was 9e-7)."""
    if reference is None or key not in ("score", "positional_scores"):
        return False
    positional, score = reference(sentence, tokens)
    ref = positional if key == "positional_scores" else score
    err_stock = (x.double() - ref).abs().max()
    err_ours = (y.double() - ref).abs().max()
    return bool(err_ours <= err_stock + atol)


def hf_problems(stock, ours, exact: bool = True, reference=None) -> list[str]:
    """What differs between two ``generate`` outputs (tensor or ModelOutput):
    bit for bit when ``exact``, else the same tokens and beams with scores
    within 1e-5. The per-step scores (processed logits in greedy search,
    log-probabilities in beam search) carry the fused layers' rounding
    (the GEMM's, the attention core's), whose error scales with the logits'
    size: a log-probability is a logit minus their logsumexp. There each row
    is held to 1e-5 of its largest finite magnitude (at least 1e-5): for
    log-probabilities that is about the row's logit spread.

    ``reference()``, for the fused mode: the same generate on a float64 copy
    of the model (None where its sequences or beams are not stock's). Per-step
    scores outside the rule are then accepted when seqfuse's worst error
    from the float64 run's is within the rule of stock's worst (as the fairseq
    side's hypotheses: stock's own fp32 error can exceed the rule on a large
    random model over many steps)."""

    def same_rows(x, y):
        if exact:
            return same(x, y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        fin = torch.isfinite(x)
        if not torch.equal(fin, torch.isfinite(y)) or not torch.equal(x[~fin], y[~fin]):
            return False
        x64, y64 = x.double(), y.double()
        scale = torch.where(fin, x64.abs(), torch.zeros_like(x64)).amax(dim=-1, keepdim=True)
        tol = SCORE_TOL * scale.clamp(min=1.0)
        return bool(((x64 - y64).abs() <= tol)[fin].all())

    def same(x, y):
        if x is None or y is None:
            return x is None and y is None
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            nan = torch.isnan(x)
            if not torch.equal(nan, torch.isnan(y)):
                return False
            if exact:
                return torch.equal(x[~nan], y[~nan])
            return _close(y[~nan].double(), x[~nan].double(), SCORE_TOL)
        return torch.equal(x, y)

    if isinstance(stock, torch.Tensor) or isinstance(ours, torch.Tensor):
        return [] if same(stock, ours) else ["sequences differ"]
    found = [] if same(stock.sequences, ours.sequences) else ["sequences differ"]
    for name in ("sequences_scores", "beam_indices"):
        if not same(getattr(stock, name, None), getattr(ours, name, None)):
            found.append(f"{name} differ")
    a, b = getattr(stock, "scores", None), getattr(ours, "scores", None)
    if (a is None) != (b is None) or (a is not None and len(a) != len(b)):
        found.append("per-step scores: different step counts")
    elif a is not None and not all(same_rows(x, y) for x, y in zip(a, b)):
        if exact or reference is None or not _steps_no_further(a, b, reference()):
            found.append("per-step scores differ")
    return found


def _steps_no_further(stock_steps, our_steps, ref) -> bool:
    """Whether seqfuse's per-step scores are, at worst, within the row rule
    of stock's worst error from the float64 run's ``ref`` (None: no judgement)."""
    ref_steps = None if ref is None else getattr(ref, "scores", None)
    if ref_steps is None or len(ref_steps) != len(stock_steps):
        return False

    def worst(steps):
        w = 0.0
        for x, r in zip(steps, ref_steps):
            if x.shape != r.shape:
                return math.inf
            fin = torch.isfinite(r)
            if not torch.equal(fin, torch.isfinite(x)):
                return math.inf
            r64 = r.double()
            scale = torch.where(fin, r64.abs(), torch.zeros_like(r64)).amax(dim=-1, keepdim=True)
            err = ((x.double() - r64).abs() / scale.clamp(min=1.0))[fin]
            if err.numel():
                w = max(w, float(err.max()))
        return w

    return worst(our_steps) <= worst(stock_steps) + SCORE_TOL


def _failures(desc: str, stock_exc, ours_exc) -> dict:
    """The result of a case where stock or seqfuse raised: agreement when
    both raised and seqfuse's error is of stock's type (or a subclass)."""
    if stock_exc is not None and isinstance(ours_exc, type(stock_exc)):
        return {"case": desc, "problems": [], "raised": repr(stock_exc)[:200]}
    return {"case": desc, "problems": [f"stock raised {stock_exc!r}, seqfuse {ours_exc!r}"]}


# -------------------------------------------------------------------- fairseq
class _Multi30k:
    loaded = None

    @classmethod
    def get(cls):
        if cls.loaded is None:
            from generation_utils import SHARED_MODEL, load_multi30k

            if not Path(SHARED_MODEL, "checkpoint_best.pt").is_file():
                cls.loaded = False
            else:
                cls.loaded = load_multi30k()
        return cls.loaded or None


def fairseq_case(seed: int, multi30k: bool) -> dict:
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator as Stock
    from generation_utils import fused, random_sample, random_transformer

    from seqfuse.generation import SequenceGenerator
    from seqfuse.layers.exact_step import enable_exact_step

    rnd = random.Random(seed)
    m30 = _Multi30k.get() if multi30k and rnd.random() < 0.25 else None
    if m30 is not None:
        model, task = m30
        d = task.target_dictionary
        ds = task.dataset("test")
        picked = rnd.sample(range(len(ds)), rnd.randint(1, 12))
        sample = ds.collater([ds[i] for i in picked])
        what = "multi30k"
    else:
        heads = rnd.choice([1, 2, 3, 4])
        arch = dict(layers=rnd.choice([1, 2, 3]), dim=heads * rnd.choice([4, 5, 8, 9, 16]))
        if rnd.random() < 0.3:
            arch.update(decoder_normalize_before=True, encoder_normalize_before=True)
        if rnd.random() < 0.2:
            arch["activation_fn"] = rnd.choice(["gelu", "tanh"])
        vocab = rnd.choice([9, 13, 20, 50, 200])
        sharp = rnd.choice([1.0, 4.0, 10.0])
        model, d = random_transformer(
            vocab, seed, heads=heads, sharp=sharp, perturb=rnd.random() < 0.5, **arch
        )
        sample = random_sample(d, rnd.randint(1, 7), seed, 1, rnd.choice([3, 8, 20]))
        what = f"random transformer vocab={vocab} heads={heads} {arch}"

    beam = rnd.choice([1, 2, 3, 4, 5, 8])
    opts: dict = {"beam_size": beam}
    draws = [
        (0.3, "len_penalty", lambda: rnd.choice([0.0, 0.5, 1.5, 3.0])),
        (0.2, "normalize_scores", lambda: False),
        (0.2, "unk_penalty", lambda: rnd.choice([-2.0, 0.5, 3.0])),
        (0.3, "max_len_b", lambda: rnd.choice([1, 2, 5, 10, 30])),
        (0.2, "max_len_a", lambda: rnd.choice([0.0, 0.5, 1.2])),
        (0.2, "min_len", lambda: rnd.choice([1, 2, 4])),
        (0.3, "no_repeat_ngram_size", lambda: rnd.choice([1, 2, 3])),
        (0.15, "temperature", lambda: rnd.choice([0.5, 1.5])),
        (0.1, "max_len", lambda: rnd.choice([3, 6])),
        (0.1, "match_source_len", lambda: True),
    ]
    for p, name, value in draws:
        if rnd.random() < p:
            opts[name] = value()
    strategy = None
    r = rnd.random()
    if r < 0.12:
        topk, topp = rnd.choice([-1, 3, 10]), rnd.choice([-1.0, 0.5, 0.9])
        strategy = ("sampling", lambda: search.Sampling(d, topk, topp))
    elif r < 0.2:
        rate = rnd.choice([0.3, 1.0])
        strategy = ("diverse siblings", lambda: search.DiverseSiblingsSearch(d, rate))
    elif r < 0.26 and beam % 2 == 0:
        strength = rnd.choice([0.2, 0.8])
        strategy = ("diverse beam", lambda: search.DiverseBeamSearch(d, 2, strength))
        # fairseq 0.12's DiverseBeamSearch indexes its state by sample id
        sample["id"] = torch.arange(sample["net_input"]["src_tokens"].size(0))
    run_opts = {}
    if r >= 0.26 and r < 0.34 and beam > 1:
        from fairseq.token_generation_constraints import pack_constraints

        mode = rnd.choice(["ordered", "unordered"])
        strategy = (f"constraints {mode}", lambda: search.LexicallyConstrainedBeamSearch(d, mode))
        n_sent = sample["net_input"]["src_tokens"].size(0)
        run_opts["constraints"] = pack_constraints(
            [
                [
                    torch.tensor(
                        [rnd.randrange(d.nspecial, len(d)) for _ in range(rnd.randint(1, 2))]
                    )
                    for _ in range(rnd.randint(0, 2))
                ]
                for _ in range(n_sent)
            ]
        )
    elif r >= 0.34 and r < 0.4:
        allowed = sorted(rnd.sample(range(d.nspecial, len(d)), min(len(d) - d.nspecial, 6)))
        allowed = [d.eos(), *allowed]

        def prefix_fn(batch_id, prefix):
            return allowed

        strategy = (
            "prefix_allowed_tokens_fn",
            lambda: search.PrefixConstrainedBeamSearch(d, prefix_fn),
        )
    if rnd.random() < 0.2 and not opts.get("match_source_len"):
        n = rnd.randint(1, 3)
        prefix = sample["net_input"]["src_tokens"][:, -n - 1 : -1]
        run_opts["prefix_tokens"] = prefix.clamp(min=d.nspecial)
    # Sampling with the fused layers is not drawn: a cumulative distribution
    # that moves by 1e-7 picks another token for a uniform draw that falls in
    # between, then the batch finishes differently and every later draw
    # differs (the same distributions, not the same samples; see the README).
    fused_ok = strategy is None or strategy[0] != "sampling"
    layers = rnd.choice(["stock", "exact", "fused"] if fused_ok else ["stock", "exact"])
    dtype = torch.float32
    if layers != "fused" and rnd.random() < 0.15:  # half precision on the CPU: exact too
        dtype = rnd.choice([torch.float16, torch.bfloat16])
        model = copy.deepcopy(model).to(dtype)
        what += f" {dtype}"

    ours_model = model
    if layers == "fused":
        ours_model = fused(model)
    elif layers == "exact":
        ours_model = copy.deepcopy(model)
        enable_exact_step(ours_model.decoder)

    def run(cls, m):
        kw = dict(opts)
        if strategy is not None:
            kw["search_strategy"] = strategy[1]()
        torch.manual_seed(seed)
        try:
            with torch.no_grad():
                return cls([m], d, **kw).generate([m], sample, **run_opts), None
        except Exception as e:  # compared below
            return None, e

    stock, stock_exc = run(Stock, model)
    ours, ours_exc = run(SequenceGenerator, ours_model)
    desc = (
        f"{what}; layers={layers}; options={opts}; strategy={strategy and strategy[0]}; "
        f"prefix={'prefix_tokens' in run_opts}"
    )
    if stock_exc is not None or ours_exc is not None:
        return _failures(desc, stock_exc, ours_exc)
    reference = None
    if layers == "fused":
        reference = _float64_reference(model, d, sample, opts)
    problems = fairseq_problems(stock, ours, exact=layers != "fused", reference=reference)
    return {"case": desc, "problems": problems}


def _float64_reference(model, d, sample, opts):
    """(sentence, tokens) -> the hypothesis's positional log-probabilities and
    score from a float64 copy of ``model``, teacher-forced, with the
    temperature, unk penalty and length normalisation of ``opts``."""
    cache: dict = {}

    def reference(sentence, tokens):
        if "model" not in cache:
            cache["model"] = copy.deepcopy(model).double().eval()
        net = sample["net_input"]
        prev = torch.cat([tokens.new_tensor([d.eos()]), tokens[:-1]]).unsqueeze(0)
        src = net["src_tokens"][sentence : sentence + 1]
        with torch.no_grad():
            logits = cache["model"](src, net["src_lengths"][sentence : sentence + 1], prev)[0][0]
        logits = logits / opts.get("temperature", 1.0)
        positional = torch.log_softmax(logits, -1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        positional = positional - opts.get("unk_penalty", 0.0) * tokens.eq(d.unk())
        score = positional.sum()
        if opts.get("normalize_scores", True):
            score = score / len(tokens) ** opts.get("len_penalty", 1.0)
        return positional, score

    return reference


# ------------------------------------------------------------------------- HF
_hf_models: dict = {}


def hf_case(seed: int, kinds: tuple[str, ...] | None = None) -> dict:
    from hf_models import KINDS, MORE_KINDS, make_inputs, make_model

    import seqfuse
    from integrations import hf

    rnd = random.Random(seed)
    kind = rnd.choice(kinds or (KINDS + MORE_KINDS))
    key = (kind, seed % 3)
    if key not in _hf_models:
        _hf_models[key] = make_model(kind, seed=seed % 3).eval()
    model = _hf_models[key]
    ids, mask = make_inputs(
        kind, model, rnd.choice([1, 2, 3, 4, 5, 8, 12]), seed=seed, src_len=rnd.choice([4, 9, 14])
    )
    beams = rnd.randint(1, 6)  # 1: greedy search
    kw = dict(num_beams=beams, do_sample=False, max_new_tokens=rnd.choice([3, 8, 20, 40]))
    draws = [
        (0.4, "num_return_sequences", lambda: rnd.randint(1, beams)),
        (0.4, "length_penalty", lambda: rnd.choice([-1.0, 0.0, 0.6, 2.0])),
        (0.5, "early_stopping", lambda: rnd.choice([True, False, "never"])),
        (0.2, "min_new_tokens", lambda: rnd.choice([1, 3, 6])),
        (0.2, "no_repeat_ngram_size", lambda: rnd.choice([1, 2, 3])),
        (0.15, "repetition_penalty", lambda: rnd.choice([0.8, 1.3])),
        (0.15, "bad_words_ids", lambda: [[rnd.randint(3, 50)], [rnd.randint(3, 50)] * 2]),
    ]
    for p, name, value in draws:
        if rnd.random() < p:
            kw[name] = value()
    if rnd.random() < 0.25:
        kw.update(output_scores=True, return_dict_in_generate=True)
    fused = rnd.random() < 0.3  # seqfuse's kernels (fused_layers=True)
    desc = f"{kind} batch={ids.size(0)} fused_layers={fused} {kw}"

    def run():
        try:
            with torch.no_grad():
                return model.generate(ids, attention_mask=mask, **kw), None
        except Exception as e:  # compared below
            return None, e

    stock, stock_exc = run()
    from integrations import hf_direct

    seqfuse.optimize(model, fused_layers=fused)
    before = (hf.STATS["sentences_dropped"], hf.STATS["advanced_steps"], hf_direct.STATS["direct"])
    try:
        ours, ours_exc = run()
    finally:
        hf.restore(model)
    after = (hf.STATS["sentences_dropped"], hf.STATS["advanced_steps"], hf_direct.STATS["direct"])
    dropped, advanced, direct = (a - b for a, b in zip(after, before))
    if stock_exc is not None or ours_exc is not None:
        return _failures(desc, stock_exc, ours_exc)

    def reference():
        """The same generate on a float64 copy of the stock model, when its
        sequences and beams are stock's."""
        twin = copy.deepcopy(model).double()
        try:
            with torch.no_grad():
                ref = twin.generate(ids, attention_mask=mask, **kw)
        except Exception:
            return None
        for name in ("sequences", "beam_indices"):
            x, y = getattr(stock, name, None), getattr(ref, name, None)
            if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
                return None
        return ref

    problems = hf_problems(stock, ours, exact=not fused, reference=reference)
    return {
        "case": desc,
        "problems": problems,
        "sentences_dropped": dropped,
        "advanced_steps": advanced,
        "direct_steps": direct,
    }


# ------------------------------------------------------------------------ CLI
SHARED = ROOT.parent / "shared"
M30K_MODEL = SHARED / "models" / "multi30k_en_de"
M30K_DATA = SHARED / "data" / "multi30k"
OUT_LINE = re.compile(r"^[STHDPAC]-\d+\t")


def _cli_generate_args(rnd: random.Random) -> list[str]:
    beam = rnd.choice([1, 2, 5, 8])
    args = [str(M30K_MODEL / "data-bin"), "--path", str(M30K_MODEL / "checkpoint_best.pt")]
    args += ["--gen-subset", rnd.choice(["valid", "test"]), "--beam", str(beam)]
    if rnd.random() < 0.5:
        batch = rnd.choice([1, 7, 32])
        args += ["--batch-size", str(batch)]
        shards = {1: 40, 7: 20, 32: 6}[batch]
    else:
        tokens = rnd.choice([300, 2000])
        args += ["--max-tokens", str(tokens)]
        shards = {300: 20, 2000: 4}[tokens]
    # one shard of the batches (fairseq-generate shards them by its world size)
    args += ["--distributed-world-size", str(shards)]
    args += ["--distributed-rank", str(rnd.randrange(shards))]
    args += ["--required-batch-size-multiple", str(rnd.choice([1, 8]))]
    flags = [
        (0.4, lambda: ["--nbest", str(rnd.randint(1, beam))]),
        (0.3, lambda: ["--lenpen", str(rnd.choice([0.0, 0.6, 2.0]))]),
        (0.2, lambda: ["--unkpen", str(rnd.choice([-1.0, 2.0]))]),
        (0.2, lambda: ["--max-len-a", "0.5", "--max-len-b", str(rnd.choice([2, 5, 10]))]),
        (0.2, lambda: ["--min-len", str(rnd.choice([2, 5]))]),
        (0.3, lambda: ["--no-repeat-ngram-size", str(rnd.choice([1, 2, 3]))]),
        (0.15, lambda: ["--prefix-size", str(rnd.choice([1, 2]))]),
        (0.1, lambda: ["--temperature", "0.8"]),
        (0.3, lambda: ["--post-process", "sentencepiece"]),
        (0.1, lambda: ["--print-alignment", rnd.choice(["hard", "soft"])]),
        (0.05, lambda: ["--score-reference"]),
        (0.05, lambda: ["--unnormalized"]),
        (0.05, lambda: ["--fp16"]),
    ]
    r = rnd.random()
    if r < 0.1:
        args += ["--sampling", "--seed", str(rnd.randint(1, 9))]
        args += rnd.choice([[], ["--sampling-topk", "5"], ["--sampling-topp", "0.8"]])
    elif r < 0.15:
        args += ["--diversity-rate", "0.5"]
    elif r < 0.2:
        args += ["--match-source-len"]
    elif r < 0.25:
        args += ["--retain-dropout", "--seed", str(rnd.randint(1, 9))]
    for p, make in flags:
        if rnd.random() < p:
            args += make()
    if "--sampling" in args:  # fairseq-generate: --sampling requires --nbest = --beam
        args += ["--nbest", str(beam)]
    return args


def _cli_interactive(rnd: random.Random) -> tuple[list[str], str]:
    import gzip

    beam = rnd.choice([1, 2, 5])
    batch = rnd.choice([1, 4, 16])
    args = [str(M30K_MODEL), "--path", str(M30K_MODEL / "checkpoint_best.pt")]
    args += ["--source-lang", "en", "--target-lang", "de", "--bpe", "sentencepiece"]
    args += ["--sentencepiece-model", str(M30K_MODEL / "spm8k.model"), "--beam", str(beam)]
    args += ["--batch-size", str(batch), "--buffer-size", str(batch * rnd.choice([1, 2]))]
    if rnd.random() < 0.4:
        args += ["--nbest", str(rnd.randint(1, beam))]
    if rnd.random() < 0.3:
        args += ["--lenpen", str(rnd.choice([0.0, 0.6, 2.0]))]
    if rnd.random() < 0.2:
        args += ["--no-repeat-ngram-size", "2"]
    if rnd.random() < 0.1:
        args += ["--print-alignment"]
    with gzip.open(M30K_DATA / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    picked = [lines[i] for i in rnd.sample(range(len(lines)), rnd.randint(1, 20))]
    if rnd.random() < 0.2:  # an empty line and unknown characters
        picked.insert(rnd.randrange(len(picked) + 1), "")
        picked.append("\u4e2d\u6587 \u2603 qqqzzz")
    return args, "".join(line + "\n" for line in picked)


def cli_case(seed: int) -> dict:
    """fairseq-generate or fairseq-interactive on the Multi30k model, stock and
    with the plugin (seqfuse's defaults: the exact path), side by side: the
    same exit status and the same S/T/H/D/P/A/C lines."""
    import os
    import subprocess

    rnd = random.Random(seed)
    if not (M30K_MODEL / "checkpoint_best.pt").is_file():
        return {"case": "no Multi30k model", "problems": [], "skipped": True}
    tool = rnd.choice(["generate", "interactive"])
    stdin = None
    if tool == "generate":
        args = _cli_generate_args(rnd)
    else:
        args, stdin = _cli_interactive(rnd)
    bin_dir = Path(sys.executable).parent
    procs = []
    for plugin in (False, True):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for key in ("SEQFUSE_DISABLE", "SEQFUSE_FUSED_LAYERS", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
            env.pop(key, None)
        if not plugin:
            env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # stock fairseq needs it
        cmd = [str(bin_dir / f"fairseq-{tool}"), *args]
        if plugin:
            cmd += ["--user-dir", str(ROOT / "plugins" / "seqfuse_fairseq")]
        procs.append(
            subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    (out_s, err_s), (out_o, err_o) = (p.communicate(stdin, timeout=600) for p in procs)
    rc_s, rc_o = (p.returncode for p in procs)
    desc = f"fairseq-{tool} {' '.join(a for a in args if not a.startswith('/'))}"
    if rc_s != 0 or rc_o != 0:

        def error(err):
            tail = [line for line in err.strip().splitlines() if line and not line[0].isspace()]
            return tail[-1].split(":")[0] if tail else "?"

        if rc_s != 0 and rc_o != 0 and error(err_s) == error(err_o):
            return {"case": desc, "problems": [], "raised": error(err_s)}
        return {
            "case": desc,
            "problems": [f"exit {rc_s} ({error(err_s)}) vs {rc_o} ({error(err_o)})"],
        }

    def by_id(out):
        lines: dict = {}
        for line in out.splitlines():
            if OUT_LINE.match(line):
                lines.setdefault(int(line.split("\t", 1)[0][2:]), []).append(line)
        return lines

    stock, ours = by_id(out_s), by_id(out_o)
    problems = []
    if not stock:
        problems.append("stock printed no hypotheses")
    # With the plugin no sentence is dropped (stock's batching may drop the
    # last incomplete batch): every sentence stock prints, seqfuse prints the same.
    missing = sorted(set(stock) - set(ours))
    if missing:
        problems.append(f"sentences {missing[:5]} missing with the plugin")
    diff = [i for i in stock if i in ours and stock[i] != ours[i]]
    if diff:
        i = diff[0]
        problems.append(f"{len(diff)} sentences differ, first: {stock[i]} vs {ours[i]}"[:400])
    return {"case": desc, "problems": problems, "extra_sentences": len(set(ours) - set(stock))}


# ----------------------------------------------------------------------- main
def _breakdown(results: list) -> dict:
    """Cases per target and kind: fairseq by layers and search, HF by model
    and layers."""
    counts: dict = {}
    for r in results:
        if r["target"] == "fairseq" and "layers=" in r["case"]:
            layers = r["case"].split("layers=")[1].split(";")[0]
            strategy = r["case"].split("strategy=")[1].split(";")[0]
            key = f"fairseq layers={layers} search={strategy if strategy != 'None' else 'beam'}"
        elif r["target"] == "hf" and " " in r["case"]:
            kind = r["case"].split(" ")[0]
            fused = "fused" if "fused_layers=True" in r["case"] else "exact"
            key = f"hf {kind} {fused}"
        elif r["target"] == "cli" and r["case"].startswith("fairseq-"):
            key = f"cli {r['case'].split(' ')[0]}"
        else:
            key = f"{r['target']} ?"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _context() -> dict:
    import platform
    from datetime import datetime, timezone

    ctx = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    from seqfuse.info import source_revision

    ctx["git_revision"] = source_revision()
    for mod in ("fairseq", "transformers"):
        try:
            ctx[mod] = __import__(mod).__version__
        except Exception as e:  # not installed
            ctx[mod] = f"not available ({type(e).__name__})"
    return ctx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100, help="cases per target (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="first case's seed (default 0)")
    ap.add_argument(
        "--targets",
        default="fairseq,hf",
        help="comma-separated: fairseq, hf (default: both), cli (fairseq's CLIs on the Multi30k "
        "model, two processes per case)",
    )
    ap.add_argument("--no-multi30k", action="store_true", help="random models only")
    ap.add_argument(
        "--hf-kinds",
        help="comma-separated Hugging Face model kinds for the hf target (default: every kind "
        "of the HF tests' KINDS and MORE_KINDS; fsmt also takes part when named)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", help="write the summary, mismatches and case counts here")
    ap.add_argument("--all-cases", action="store_true", help="--json lists every case too")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        ap.error(f"--targets: choose among {', '.join(TARGETS)}")
    if args.cases < 1:
        ap.error("--cases must be at least 1")
    hf_kinds = None
    if args.hf_kinds:
        from hf_models import KINDS, MORE_KINDS

        hf_kinds = tuple(k.strip() for k in args.hf_kinds.split(",") if k.strip())
        bad_kinds = [k for k in hf_kinds if k not in KINDS + MORE_KINDS + ("fsmt",)]
        if bad_kinds or not hf_kinds:
            ap.error(f"--hf-kinds: choose among {', '.join(KINDS + MORE_KINDS + ('fsmt',))}")
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # fallback lines and fairseq's info
    warnings.filterwarnings("ignore")

    results, start = [], time.perf_counter()
    for target in targets:
        for seed in range(args.seed, args.seed + args.cases):
            try:
                if target == "fairseq":
                    res = fairseq_case(seed, multi30k=not args.no_multi30k)
                elif target == "hf":
                    res = hf_case(seed, hf_kinds)
                else:
                    res = cli_case(seed)
            except Exception as e:  # a crash in the harness itself is a finding too
                res = {"case": "?", "problems": [f"harness error: {e!r}"]}
            res.update(target=target, seed=seed)
            results.append(res)
            for problem in res["problems"]:
                print(f"MISMATCH {target} seed={seed}: {problem} [{res['case']}]", flush=True)
    bad = [r for r in results if r["problems"]]
    raised = sum(1 for r in results if "raised" in r)
    summary = {
        "cases": len(results),
        "mismatched": len(bad),
        "both_raised": raised,
        "seconds": round(time.perf_counter() - start, 1),
        "targets": targets,
        "first_seed": args.seed,
    }
    if "hf" in targets:  # finished sentences that left the batch (fused layers)
        with_drops = [r for r in results if r.get("sentences_dropped")]
        summary["hf_cases_with_sentences_dropped"] = len(with_drops)
        summary["hf_sentences_dropped"] = sum(r["sentences_dropped"] for r in with_drops)
        # the steps whose bookkeeping was one C++ call, and the direct steps
        for key in ("advanced_steps", "direct_steps"):
            summary[f"hf_cases_with_{key}"] = sum(1 for r in results if r.get(key))
    print(
        f"parity_fuzz: {len(results)} cases ({', '.join(targets)}), {len(bad)} mismatched, "
        f"{raised} where stock and seqfuse raised the same error, {summary['seconds']} s"
    )
    if args.json:
        report = {"summary": summary, "context": _context(), "breakdown": _breakdown(results)}
        report["mismatches"] = bad
        report["raised"] = [r for r in results if "raised" in r]
        if args.all_cases:
            report["results"] = results
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
