"""The fused beam-search step (``seqfuse.ops.beam_topk``) against stock's
computation (``beam_topk_reference``: log_softmax + fairseq's edits + cum +
torch.topk). On the CPU the scores are stock's bit for bit. On a GPU the CUDA
kernel is checked against stock on the GPU, and against the CPU kernel bit for
bit on log-prob inputs (where no normaliser is computed).

Scores are compared as sorted values with the fp32 tolerance; tokens and beams
are compared exactly where the reference's choice is not decided by a
(near-)tie, and elsewhere every chosen (beam, token) must carry the score the
kernel claims for it.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqfuse.ops.beam_topk import (
    EOS_ALLOW,
    EOS_FORBID,
    EOS_ONLY,
    apply_step_edits,
    beam_topk,
    beam_topk_reference,
    cpu_kernel_for,
    which_backend,
)
from seqfuse.testing import assert_close, separated

VOCABS = (2, 5, 5125, 8003, 58101)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NEG_INF = -math.inf


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    # The extension must run: a missing build fails instead of falling back.
    monkeypatch.setenv("SEQFUSE_BACKEND", "cpu")


def specials(vocab: int) -> dict:
    """pad/unk/eos ids valid for any vocabulary size (they may coincide when tiny)."""
    return {"pad": 1 % vocab, "unk": 3 % vocab, "eos": 2 % vocab}


def make_inputs(case: str, bsz: int, rows: int, vocab: int, dtype, seed: int):
    """Logits [bsz * rows, vocab] in ``dtype`` and cum scores [bsz * rows] (fp32)."""
    g = torch.Generator().manual_seed(seed)
    n = bsz * rows
    x = torch.randn(n, vocab, generator=g) * 3
    cum = -torch.rand(n, generator=g) * 20
    if case == "ties":  # every token of every row equal, equal cum per sentence
        x = torch.full((n, vocab), 0.5)
        cum = cum.view(bsz, rows)[:, :1].expand(bsz, rows).reshape(n).clone()
    elif case == "grid":  # few distinct values: many exact ties
        x = torch.randint(-4, 4, (n, vocab), generator=g).float() / 4
        cum = torch.randint(-3, 1, (n,), generator=g).float()
    elif case == "dup_beams":  # beams duplicated, as at step 0 of stock
        x = x.view(bsz, rows, vocab)[:, :1].expand(bsz, rows, vocab).reshape(n, vocab).clone()
        cum = torch.zeros(n)
    elif case == "dead_rows":  # rows entirely -inf (log_softmax -> NaN -> -inf)
        x[::2] = NEG_INF
    elif case == "nan":
        x[0, vocab // 2] = math.nan
        x[n - 1, :] = math.nan
    elif case == "pos_inf":
        x[0, 0] = math.inf
        x[n // 2, vocab - 1] = math.inf
    elif case == "partial_neg_inf":
        x[torch.rand(n, vocab, generator=g) < 0.5] = NEG_INF
    elif case == "cum_neg_inf":
        cum[1::2] = NEG_INF
    elif case != "random":
        raise ValueError(case)
    return x.to(dtype), cum


def make_banned(n: int, vocab: int, logits, seed: int):
    """[n, 3]: the row's current maximum, a random token, -1 padding."""
    g = torch.Generator().manual_seed(seed)
    b = torch.full((n, 3), -1, dtype=torch.long)
    b[:, 0] = logits.float().nan_to_num(nan=NEG_INF).argmax(dim=1)
    b[::2, 1] = torch.randint(0, vocab, (n,), generator=g)[::2]
    return b


def full_scores(logits, cum, rows, pad, unk, eos, unk_penalty, eos_mode, banned, is_logprobs):
    """Stock's complete score tensor [bsz, rows * vocab] (fp32)."""
    n, vocab = logits.shape
    if is_logprobs:
        lp = logits.float().clone()
    else:
        lp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    apply_step_edits(lp, pad, unk, eos, unk_penalty, eos_mode, banned)
    lp = lp.view(n // rows, rows, vocab)
    if cum is not None:
        lp = lp + cum.view(n // rows, rows, 1)
    return lp.reshape(n // rows, rows * vocab)


def check(
    logits, cum, rows, k, unk_penalty=0.0, eos_mode=EOS_ALLOW, banned=None, is_logprobs=False
):
    """Runs the dispatched op and checks it against the reference; returns its output."""
    vocab = logits.size(1)
    sp = specials(vocab)
    args = (logits, cum, rows, k, sp["pad"], sp["unk"], sp["eos"], unk_penalty, eos_mode, banned)
    scores, tokens, beams = beam_topk(*args, is_logprobs=is_logprobs)
    ref_scores, ref_tokens, ref_beams = beam_topk_reference(*args, is_logprobs=is_logprobs)
    full = full_scores(
        logits,
        cum,
        rows,
        sp["pad"],
        sp["unk"],
        sp["eos"],
        unk_penalty,
        eos_mode,
        banned,
        is_logprobs,
    )
    bsz = full.size(0)
    assert scores.shape == tokens.shape == beams.shape == (bsz, k)
    assert scores.dtype == torch.float32 and tokens.dtype == beams.dtype == torch.long

    # Values: the k best scores, in order, as stock's.
    assert_close(scores, ref_scores, torch.float32, "sorted scores")
    # On the CPU the normaliser is torch's own: the values are stock's bits.
    if logits.device.type == "cpu":
        assert torch.equal(scores, ref_scores), "scores are not stock's bit for bit"
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()), "scores not sorted descending"
    # Every chosen (beam, token) exists once and has the claimed score.
    assert bool(((tokens >= 0) & (tokens < vocab) & (beams >= 0) & (beams < rows)).all())
    flat = beams * vocab + tokens
    for b in range(bsz):
        assert flat[b].unique().numel() == k, f"sentence {b}: a candidate is chosen twice"
    assert_close(scores, full.gather(1, flat), torch.float32, "claimed scores")

    # Identity where stock's choice is not a tie.
    full_sorted = full.sort(dim=1, descending=True).values
    for b in range(bsz):
        s = full_sorted[b].tolist()
        if k < len(s) and not separated(s[k - 1], s[k]):
            continue
        if all(separated(s[j], s[j + 1]) for j in range(k - 1)):
            assert tokens[b].tolist() == ref_tokens[b].tolist(), f"sentence {b}: tokens"
            assert beams[b].tolist() == ref_beams[b].tolist(), f"sentence {b}: beams"
        else:
            assert set(flat[b].tolist()) == set((ref_beams[b] * vocab + ref_tokens[b]).tolist())
    return scores, tokens, beams


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rows", (1, 2, 5, 16))
@pytest.mark.parametrize("vocab", VOCABS)
def test_random_shapes(vocab, rows, dtype):
    seed = vocab * 31 + rows
    bsz = 3 if vocab < 50000 else 2
    x, cum = make_inputs("random", bsz, rows, vocab, dtype, seed)
    k = min(2 * rows, rows * vocab)
    # Vary the edits with the shape so that every option meets every size.
    unk_penalty = (0.0, -2.5, 1.5)[seed % 3]
    eos_mode = (EOS_ALLOW, EOS_FORBID, EOS_ONLY)[(seed // 3) % 3]
    banned = make_banned(bsz * rows, vocab, x, seed) if seed % 2 else None
    check(x, None if rows == 1 and seed % 2 else cum, rows, k, unk_penalty, eos_mode, banned)


ADVERSARIAL = (
    "ties",
    "grid",
    "dup_beams",
    "dead_rows",
    "nan",
    "pos_inf",
    "partial_neg_inf",
    "cum_neg_inf",
)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("vocab", (5, 5125))
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_adversarial_rows(case, vocab, dtype):
    rows, bsz = 4, 3
    x, cum = make_inputs(case, bsz, rows, vocab, dtype, seed=vocab + len(case))
    check(x, cum, rows, 2 * rows)
    check(x, cum, rows, 2 * rows, unk_penalty=-1.0, banned=make_banned(bsz * rows, vocab, x, 7))


@pytest.mark.parametrize("is_logprobs", (False, True))
@pytest.mark.parametrize("eos_mode", (EOS_ALLOW, EOS_FORBID, EOS_ONLY))
@pytest.mark.parametrize("unk_penalty", (0.0, -3.0, 2.0))
def test_edits(unk_penalty, eos_mode, is_logprobs):
    rows, bsz, vocab = 5, 4, 8003
    x, cum = make_inputs("random", bsz, rows, vocab, torch.float32, seed=11)
    if is_logprobs:
        x = torch.log_softmax(x, dim=-1)
    # A negative penalty must be able to lift unk into the top-k.
    x[:, specials(vocab)["unk"]] = x.max(dim=1).values - 0.5
    check(
        x,
        cum,
        rows,
        2 * rows,
        unk_penalty,
        eos_mode,
        make_banned(bsz * rows, vocab, x, 3),
        is_logprobs,
    )


def test_banned_current_maximum_and_padding():
    rows, bsz, vocab = 3, 2, 5125
    x, cum = make_inputs("random", bsz, rows, vocab, torch.float32, seed=5)
    order = x.argsort(dim=1, descending=True)
    banned = torch.full((bsz * rows, 6), -1, dtype=torch.long)
    banned[:, 0] = order[:, 0]  # the maximum
    banned[:, 2] = order[:, 1]  # the runner-up, after a -1
    banned[:, 3] = order[:, 0]  # a duplicate id
    scores, tokens, beams = check(x, cum, rows, 2 * rows, banned=banned)
    chosen = beams * vocab + tokens
    for b in range(bsz):
        for r in range(rows):
            for t in order[b * rows + r, :2].tolist():
                assert r * vocab + t not in chosen[b].tolist()


@pytest.mark.parametrize("vocab", (5, 5125))
def test_no_pad_token(vocab):
    """pad=-1 (Hugging Face models ban no pad by default): every token is scored,
    -1 entries of ``banned`` ban nothing, and the result is stock's bit for bit."""
    rows, bsz = 3, 2
    x, cum = make_inputs("random", bsz, rows, vocab, torch.float32, seed=vocab)
    x[:, 1] = x.max(dim=1).values + 1.0  # token 1 (fairseq's pad) is every row's best
    banned = torch.full((bsz * rows, 2), -1, dtype=torch.long)
    banned[0, 1] = 3
    k = min(2 * rows, rows * vocab)
    args = (x, cum, rows, k, -1, 0, 2, 0.0, EOS_ALLOW, banned)
    scores, tokens, beams = beam_topk(*args)
    ref = beam_topk_reference(*args)
    full = torch.log_softmax(x, dim=-1)
    full[0, 3] = NEG_INF
    full = (full.view(bsz, rows, vocab) + cum.view(bsz, rows, 1)).view(bsz, -1)
    want_scores, want_flat = full.topk(k)
    assert torch.equal(scores, ref[0]) and torch.equal(scores, want_scores)
    assert torch.equal(beams * vocab + tokens, want_flat)
    assert bool((tokens[:, 0] == 1).all()), "token 1 must not be treated as a pad"
    with pytest.raises((RuntimeError, ValueError)):
        beam_topk(x, cum, rows, k, -2, 0, 2)


@pytest.mark.parametrize("vocab", (2, 5, 130, 5125))
@pytest.mark.parametrize("rows", (1, 3, 16))
def test_large_k(vocab, rows):
    """k up to rows * vocab (tau = -inf keeps every token); k around the chunk count."""
    x, cum = make_inputs("random", 2, rows, vocab, torch.float32, seed=vocab + rows)
    nch = rows * math.ceil(vocab / 128)
    for k in sorted({1, min(nch, rows * vocab), min(nch + 1, rows * vocab), rows * vocab}):
        check(x, cum, rows, k, unk_penalty=-0.5)
    x[0] = NEG_INF
    check(x, cum, rows, rows * vocab)


def test_tie_order_is_score_desc_then_flat_index():
    """Exact ties come out by (score desc, flat index asc); values on a grid so
    that the kernel and torch agree on which scores are equal."""
    rows, bsz, vocab = 4, 3, 777
    for case in ("ties", "grid", "dup_beams"):
        x, cum = make_inputs(case, bsz, rows, vocab, torch.float32, seed=2)
        if case == "dup_beams":
            x = (x * 4).round() / 4
        sp = specials(vocab)
        full = full_scores(
            x, cum, rows, sp["pad"], sp["unk"], sp["eos"], 0.0, EOS_ALLOW, None, False
        )
        k = 3 * rows
        scores, tokens, beams = beam_topk(x, cum, rows, k, sp["pad"], sp["unk"], sp["eos"])
        expected = full.sort(dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(beams * vocab + tokens, expected), case
        flat = beams * vocab + tokens
        same = scores[:, 1:] == scores[:, :-1]
        assert bool((flat[:, 1:] > flat[:, :-1])[same].all())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("float32", "bfloat16"))
@pytest.mark.parametrize(
    "case", ("eos_only", "eos_only_cum_neg_inf", "dead_rows", "all_dead", "tiny_vocab")
)
def test_unbounded_tie_order(case, dtype):
    """Without a bound (tau = -inf: fewer than k chunk maxima score above -inf)
    the -inf scores tie: they come out by flat index, after every finite score,
    as stock's complete sort orders them (max_len steps, dead rows, tiny
    vocabularies)."""
    rows, bsz = 5, 3
    vocab = 5 if case == "tiny_vocab" else 8003
    x, cum = make_inputs("random", bsz, rows, vocab, dtype, seed=len(case))
    eos_mode = EOS_ONLY if case.startswith("eos_only") else EOS_ALLOW
    if case == "eos_only_cum_neg_inf":
        cum[1::2] = NEG_INF
    elif case == "dead_rows":
        x[1:rows] = NEG_INF  # sentence 0: row 0 has 3 finite logits, the rest are dead
        x[0, 3:] = NEG_INF
        x[rows + 1 :: 2] = NEG_INF  # later sentences: every other row dead
    elif case == "all_dead":
        x[:] = NEG_INF
    sp = specials(vocab)
    k = rows * vocab if case == "tiny_vocab" else 2 * rows
    full = full_scores(x, cum, rows, sp["pad"], sp["unk"], sp["eos"], 0.0, eos_mode, None, False)
    out = beam_topk(x, cum, rows, k, sp["pad"], sp["unk"], sp["eos"], 0.0, eos_mode)
    scores, tokens, beams = out
    expected = full.sort(dim=1, descending=True, stable=True)
    assert torch.equal(scores, expected.values[:, :k]), case
    assert torch.equal(beams * vocab + tokens, expected.indices[:, :k]), case
    assert bool((scores == NEG_INF).any()), "the case must reach -inf candidates"


def test_bad_inputs_raise():
    x = torch.randn(6, 50)
    with pytest.raises(ValueError, match="logits must be"):
        beam_topk(x[0], None, 1, 2, 1, 3, 2)
    with pytest.raises(ValueError, match="multiple of rows_per_sent"):
        beam_topk(x, None, 4, 2, 1, 3, 2)
    with pytest.raises(ValueError, match="k=301"):
        beam_topk(x, None, 6, 301, 1, 3, 2)
    with pytest.raises(ValueError, match="cum_scores"):
        beam_topk(x, torch.zeros(5), 3, 2, 1, 3, 2)
    with pytest.raises(ValueError, match="banned"):
        beam_topk(x, None, 3, 2, 1, 3, 2, banned=torch.zeros(5, 2, dtype=torch.long))
    op = torch.ops.seqfuse.beam_topk
    ok = (None, 3, 2, 1, 3, 2, 0.0, 0, None, False)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x.double(), *ok)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x.long(), *ok)
    with pytest.raises(RuntimeError, match="k=0"):
        op(x, None, 3, 0, 1, 3, 2, 0.0, 0, None, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x.t(), None, 1, 2, 1, 3, 2, 0.0, 0, None, False)
    with pytest.raises(RuntimeError, match="token ids"):
        op(x, None, 3, 2, 50, 3, 2, 0.0, 0, None, False)
    with pytest.raises(RuntimeError, match="eos_mode"):
        op(x, None, 3, 2, 1, 3, 2, 0.0, 3, None, False)
    with pytest.raises(RuntimeError, match="cum_scores"):
        op(x, torch.zeros(6, dtype=torch.float64), 3, 2, 1, 3, 2, 0.0, 0, None, False)
    with pytest.raises(RuntimeError, match="banned"):
        op(x, None, 3, 2, 1, 3, 2, 0.0, 0, torch.zeros(6, 2, dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="banned"):
        op(x, None, 3, 2, 1, 3, 2, 0.0, 0, torch.zeros(6, dtype=torch.long), False)


def test_forced_reference_backend(monkeypatch):
    x, cum = make_inputs("random", 2, 5, 5125, torch.float32, seed=9)
    assert which_backend(x) == "cpu" or which_backend(x).startswith("cpu ")
    monkeypatch.setenv("SEQFUSE_BACKEND", "reference")
    assert which_backend(x).startswith("reference")
    got = beam_topk(x, cum, 5, 10, 1, 3, 2, unk_penalty=0.5)
    want = beam_topk_reference(x, cum, 5, 10, 1, 3, 2, unk_penalty=0.5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ CUDA


def _cuda_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    from seqfuse import _ext

    return _ext.cuda_available()[0]


gpu = pytest.mark.skipif(not _cuda_usable(), reason="no CUDA device or no CUDA build of seqfuse._C")


def run_both(monkeypatch, x, cum, rows, k, **kw):
    """(CPU output, CUDA output) of the dispatched op on the same inputs; the
    CUDA call runs under torch's sync debug mode (it must not synchronise)."""
    sp = specials(x.size(1))
    banned = kw.pop("banned", None)
    monkeypatch.setenv("SEQFUSE_BACKEND", "cpu")
    cpu = beam_topk(x, cum, rows, k, sp["pad"], sp["unk"], sp["eos"], banned=banned, **kw)
    monkeypatch.setenv("SEQFUSE_BACKEND", "cuda")
    dev = torch.device("cuda")
    xd, cumd = x.to(dev), None if cum is None else cum.to(dev)
    bannedd = None if banned is None else banned.to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu_out = beam_topk(
            xd, cumd, rows, k, sp["pad"], sp["unk"], sp["eos"], banned=bannedd, **kw
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return cpu, tuple(t.cpu() for t in gpu_out)


def assert_bitwise(cpu, gpu_out, what=""):
    for name, a, b in zip(("scores", "tokens", "beams"), cpu, gpu_out):
        if not torch.equal(a, b):
            diff = (a != b).nonzero()
            raise AssertionError(
                f"{what} {name}: {diff.size(0)} differ, first at {diff[0].tolist()}"
            )


def check_cuda(monkeypatch, x, cum, rows, k, **kw):
    """The CUDA op against stock's computation on the GPU (same rules as the CPU
    tests, without the bit-exactness: the CUDA normaliser is seqfuse's own)."""
    monkeypatch.setenv("SEQFUSE_BACKEND", "cuda")
    dev = torch.device("cuda")
    banned = kw.pop("banned", None)
    check(
        x.to(dev),
        None if cum is None else cum.to(dev),
        rows,
        k,
        banned=None if banned is None else banned.to(dev),
        **kw,
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rows", (1, 5, 16))
@pytest.mark.parametrize("vocab", VOCABS)
def test_cuda_against_stock(monkeypatch, vocab, rows, dtype):
    seed = vocab + rows
    x, cum = make_inputs("random", 4, rows, vocab, dtype, seed)
    banned = make_banned(4 * rows, vocab, x, seed)
    k = min(2 * rows, rows * vocab)
    check_cuda(monkeypatch, x, cum, rows, k)
    check_cuda(monkeypatch, x, cum, rows, k, unk_penalty=-2.0, eos_mode=EOS_FORBID, banned=banned)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rows", (1, 5, 16))
@pytest.mark.parametrize("vocab", VOCABS)
def test_cuda_matches_cpu_bitwise_on_logprobs(monkeypatch, vocab, rows, dtype):
    """Without a normaliser the two backends run the same float operations and
    the same selection: identical bits, tie order included."""
    seed = vocab + rows
    x, cum = make_inputs("random", 4, rows, vocab, dtype, seed)
    lp = x.float().log_softmax(-1).to(dtype)
    banned = make_banned(4 * rows, vocab, x, seed)
    k = min(2 * rows, rows * vocab)
    for kw in ({}, {"unk_penalty": -2.0, "eos_mode": EOS_FORBID, "banned": banned}):
        out = run_both(monkeypatch, lp, cum, rows, k, is_logprobs=True, **kw)
        assert_bitwise(*out, what=str(sorted(kw)))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", ADVERSARIAL)
@pytest.mark.parametrize("vocab", (5, 5125, 32000))
def test_cuda_adversarial(monkeypatch, case, vocab):
    x, cum = make_inputs(case, 3, 4, vocab, torch.float32, seed=1)
    check_cuda(monkeypatch, x, cum, 4, 8)
    check_cuda(monkeypatch, x, cum, 4, 8, eos_mode=EOS_ONLY, unk_penalty=-1.0)
    if case in ("ties", "grid", "dup_beams", "partial_neg_inf", "cum_neg_inf"):
        # Exact ties: both backends order them by (score desc, flat index asc).
        out = run_both(monkeypatch, x.float(), cum, 4, 8, is_logprobs=True)
        assert_bitwise(*out, what=case)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "vocab,rows,k",
    [(5, 16, 80), (5125, 4, 20500), (8003, 1, 3000), (32000, 5, 10), (58101, 2, 2049)],
)
def test_cuda_overflow_paths(monkeypatch, vocab, rows, k):
    """More survivors than the shared buffer (all ties, k > buffer, k = rows * vocab)."""
    for case in ("ties", "random", "grid"):
        x, cum = make_inputs(case, 2, rows, vocab, torch.float32, seed=3)
        check_cuda(monkeypatch, x, cum, rows, k)
        assert_bitwise(*run_both(monkeypatch, x, cum, rows, k, is_logprobs=True), what=case)


@pytest.mark.parametrize("forced", [None, "cpu", "reference"])
def test_cpu_kernel_for_is_the_kernel_beam_topk_runs(monkeypatch, forced):
    """A search's direct call (``cpu_kernel_for``) is offered exactly where
    ``beam_topk`` would run the CPU kernel on the tensor as it is, and gives
    ``beam_topk``'s results bit for bit."""
    if forced is None:
        monkeypatch.delenv("SEQFUSE_BACKEND", raising=False)
    else:
        monkeypatch.setenv("SEQFUSE_BACKEND", forced)
    x, cum = make_inputs("random", 3, 5, 5125, torch.float32, seed=4)
    cases = {
        "contiguous": x,
        "strided": x.view(3, 5, -1)[:, 0],  # step 0's first beam of each sentence
        "float64": x.double(),
        "half": x.half(),
    }
    for name, t in cases.items():
        kernel = cpu_kernel_for(t)
        try:
            backend = which_backend(t).split(" ")[0]
        except RuntimeError:  # forced to a backend that refuses it
            backend = None
        takes = backend == "cpu" and t.is_contiguous() and t.dtype == torch.float32
        assert (kernel is not None) == takes, name
        if kernel is None:
            continue
        rows = t.size(0) // 3
        c = cum[: t.size(0)].contiguous()
        got = kernel(t, c, rows, 11, 1, 3, 2, 0.5, EOS_ALLOW, None, False)
        want = beam_topk(t, c, rows, 11, 1, 3, 2, unk_penalty=0.5)
        for a, b in zip(got, want):
            assert torch.equal(a, b), name
    if forced != "reference":
        assert cpu_kernel_for(x) is not None
