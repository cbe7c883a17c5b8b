"""The logits' group maxima: the vocabulary projection notes them as it stores
the logits (``linear_packed_maxima``), and the search step takes its chunk
maxima from them instead of a pass over the logits (``beam_topk_maxima``, the
search lane's form of ``beam_topk``).

The maxima are checked against torch's ``amax`` over groups of 32 logits, and
``beam_topk_maxima`` against ``beam_topk`` on the same logits, bit for bit,
over the inputs of the beam_topk tests (ties, dead rows, NaN, infinities,
edits, banned tokens).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_beam_topk import ADVERSARIAL, make_banned, make_inputs, specials

from seqfuse import _ext
from seqfuse.ops.beam_topk import EOS_ALLOW, EOS_FORBID, EOS_ONLY

GROUP = 32

pytestmark = pytest.mark.skipif(
    not _ext.cpu_available()[0] or torch.ops.seqfuse.linear_capability() == "",
    reason="needs the extension with a packed GEMM kernel (AVX2 or AVX-512)",
)


def reference_maxima(y: torch.Tensor) -> torch.Tensor:
    """[M, ceil(N / 32)]: each group's maximum, NaN where the group holds a NaN."""
    m, n = y.shape
    groups = (n + GROUP - 1) // GROUP
    padded = torch.full((m, groups * GROUP), -math.inf)
    padded[:, :n] = y
    padded = padded.view(m, groups, GROUP)
    out = padded.masked_fill(padded.isnan(), -math.inf).amax(-1)  # infinities kept
    out[padded.isnan().any(-1)] = math.nan
    return out


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Equal values (infinities included), NaN where the other is NaN."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what or None)


@pytest.mark.parametrize("m", (1, 2, 3, 7, 10, 11, 25, 64))
@pytest.mark.parametrize("n", (1, 5, 31, 32, 33, 100, 130, 8003))
def test_linear_maxima_against_torch(m, n):
    g = torch.Generator().manual_seed(m * 10007 + n)
    k = 40
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g)
    # infinities and NaN in some columns (through the bias: every row of them)
    if n > 3:
        bias[n // 2] = math.inf
        bias[n // 3] = -math.inf
        bias[n - 1] = math.nan
    pack = torch.ops.seqfuse.pack_linear_weight(w)
    y, maxima = torch.ops.seqfuse.linear_packed_maxima(x, pack, bias, n)
    plain = torch.ops.seqfuse.linear_packed(x, pack, bias, n, False)
    assert_same(y, plain, "the product's outputs differ from linear_packed's")
    assert maxima.shape == (m, (n + GROUP - 1) // GROUP)
    assert_same(maxima, reference_maxima(plain))


def test_linear_maxima_without_bias_and_row_nan():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 16, generator=g)
    x[4, 3] = math.nan  # every output of row 4 is NaN
    w = torch.randn(300, 16, generator=g)
    y, maxima = torch.ops.seqfuse.linear_packed_maxima(
        x, torch.ops.seqfuse.pack_linear_weight(w), None, 300
    )
    assert bool(maxima[4].isnan().all()) and not bool(maxima[torch.arange(9) != 4].isnan().any())
    assert_same(maxima, reference_maxima(y))


CASES = ("random",) + ADVERSARIAL


def both(logits, cum, rows, k, unk_penalty=0.0, eos_mode=EOS_ALLOW, banned=None, pad=None):
    vocab = logits.size(1)
    sp = specials(vocab)
    if pad is not None:
        sp["pad"] = pad
    args = (rows, k, sp["pad"], sp["unk"], sp["eos"], unk_penalty, eos_mode, banned)
    plain = torch.ops.seqfuse.beam_topk(logits, cum, *args, False)
    got = torch.ops.seqfuse.beam_topk_maxima(logits, reference_maxima(logits), cum, *args)
    return plain, got


def assert_identical(plain, got):
    for a, b, what in zip(plain, got, ("scores", "tokens", "beams")):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("vocab", (5, 33, 130, 5125, 8003))
@pytest.mark.parametrize("rows", (1, 5))
@pytest.mark.parametrize("case", CASES)
def test_beam_topk_maxima_is_beam_topk(case, rows, vocab):
    bsz = 3
    x, cum = make_inputs(case, bsz, rows, vocab, torch.float32, seed=vocab + rows)
    k = min(2 * rows, rows * vocab)
    for c in (None, cum):
        assert_identical(*both(x, c, rows, k))


@pytest.mark.parametrize("eos_mode", (EOS_ALLOW, EOS_FORBID, EOS_ONLY))
@pytest.mark.parametrize("unk_penalty", (0.0, -3.0, 2.0))
def test_beam_topk_maxima_edits(unk_penalty, eos_mode):
    vocab, rows = 5125, 4
    x, cum = make_inputs("random", 3, rows, vocab, torch.float32, seed=11)
    banned = make_banned(x.size(0), vocab, x, seed=12)
    for pad in (None, -1):
        got = both(x, cum, rows, 2 * rows + 1, unk_penalty, eos_mode, banned, pad)
        assert_identical(*got)


def test_beam_topk_maxima_reads_the_maxima():
    """The op takes its chunk maxima from the given ones: a group maximum
    understated below the sentence's bound hides the best token."""
    vocab, rows = 1000, 2
    x, _ = make_inputs("random", 1, rows, vocab, torch.float32, seed=3)
    cum = torch.zeros(rows)
    x[0, 500] = 50.0  # the best token by far
    maxima = reference_maxima(x)
    sp = specials(vocab)
    args = (cum, rows, 4, sp["pad"], sp["unk"], sp["eos"], 0.0, EOS_ALLOW, None)
    _, tokens, beams = torch.ops.seqfuse.beam_topk_maxima(x, maxima, *args)
    assert (int(beams[0, 0]), int(tokens[0, 0])) == (0, 500)
    maxima[0, 500 // GROUP] = -1e30
    _, tokens, beams = torch.ops.seqfuse.beam_topk_maxima(x, maxima, *args)
    assert (int(beams[0, 0]), int(tokens[0, 0])) != (0, 500)


def test_beam_topk_maxima_bad_inputs_raise():
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    good = reference_maxima(x)
    args = (None, 2, 4, 1, 3, 2, 0.0, EOS_ALLOW, None)
    with pytest.raises(RuntimeError, match="group_max must be"):
        torch.ops.seqfuse.beam_topk_maxima(x, good[:, :3].contiguous(), *args)
    with pytest.raises(RuntimeError, match="group_max must be"):
        torch.ops.seqfuse.beam_topk_maxima(x, good.double(), *args)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.seqfuse.beam_topk_maxima(x.half(), good, *args)
    # maxima above every logit of their groups: the bound leaves too few tokens
    with pytest.raises(RuntimeError, match="not the logits' own"):
        torch.ops.seqfuse.beam_topk_maxima(x, good + 20.0, *args)
