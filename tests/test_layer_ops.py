"""Fused layer ops (attention, add_layernorm, bias_act, embedding): each
backend against the torch reference, dtypes x odd shapes."""

from __future__ import annotations

import pytest
import torch

from seqfuse import _ext
from seqfuse.ops import add_layernorm as aln_mod
from seqfuse.ops import attention as attn_mod
from seqfuse.ops import bias_act as act_mod
from seqfuse.ops import embedding as emb_mod
from seqfuse.ops.dispatch import choose

# (atol, rtol) per dtype for a kernel against the fp32 reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, dtype, what="", same_precision=None):
    """Fail with the worst element and the count of failing elements. When
    ``same_precision`` (the reference run in ``dtype``) is given, the error may
    also be up to twice that run's error (flash-attn's rule)."""
    atol, rtol = TOL[dtype]
    a, e = actual.float(), expected.float()
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    if same_precision is not None:
        bound = torch.maximum(bound, 2 * (same_precision.float() - e).abs() + atol)
    bad = ~(err <= bound) & ~(a.isnan() & e.isnan())
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[((err - bound) * bad).flatten().argmax()])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off; worst at {idx}: "
            f"{a[idx].item()} vs {e[idx].item()} (tol {bound[idx].item():.3g})"
        )


def _backends(mod):
    names = ["reference"]
    if _ext.cpu_available()[0]:
        names.append("cpu")
    if _ext.cuda_available()[0]:
        names.append("cuda")
    return names


def _run(mod, backend, *args):
    b = next(b for b in mod.BACKENDS if b.name == backend)
    return b.run(*args)


def _devices(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.mark.parametrize("backend", _backends(aln_mod))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [256, 769])
@pytest.mark.parametrize("mode", ["post", "pre", "sum_only", "plain"])
def test_add_layernorm(backend, dtype, cols, mode):
    g = torch.Generator().manual_seed(cols)
    dev = _devices(backend)
    rows = 97
    x, res = (torch.randn(rows, cols, generator=g) for _ in range(2))
    bias, w, beta = (torch.randn(cols, generator=g) for _ in range(3))
    if mode == "plain":
        bias = res = None
    if mode == "sum_only":
        w = beta = None
    want_sum = mode in ("pre", "sum_only")

    def args(dt, d):
        c = lambda t: None if t is None else t.to(d, dt)  # noqa: E731
        return (c(x), c(bias), c(res), c(w), c(beta), 1e-5, want_sum)

    s, n = _run(aln_mod, backend, *args(dtype, dev))
    s_ref, n_ref = aln_mod.add_layernorm_reference(*args(torch.float32, "cpu"))
    s_same, n_same = aln_mod.add_layernorm_reference(*args(dtype, "cpu"))
    if want_sum:
        assert_close(s.cpu(), s_ref, dtype, "sum", s_same)
    else:
        assert s is None
    if w is not None:
        assert_close(n.cpu(), n_ref, dtype, "normed", n_same)


@pytest.mark.parametrize("backend", _backends(act_mod))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", list(act_mod.ACTIVATIONS))
def test_bias_act(backend, dtype, act):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(97, 769, generator=g) * 3
    b = torch.randn(769, generator=g)
    code = act_mod.ACTIVATIONS[act]
    dev = _devices(backend)
    y = _run(act_mod, backend, x.to(dev, dtype).contiguous(), b.to(dev, dtype), code)
    y_ref = act_mod.bias_act_reference(x.clone(), b, code)
    y_same = act_mod.bias_act_reference(x.to(dtype), b.to(dtype), code)
    assert_close(y.cpu(), y_ref, dtype, act, y_same)


def test_bias_act_is_in_place():
    x = torch.randn(5, 8)
    out = act_mod.bias_act(x, torch.randn(8), "relu")
    assert out.data_ptr() == x.data_ptr() and (x >= 0).all()


ATTN_CASES = [
    # (tq, n, s, m, heads, c, q_per_kv, causal, rows, pad)
    (97, 3, 97, 3, 4, 256, 1, 0, None, True),  # full-sequence self-attention, causal + padding
    (1025, 1, 1025, 1, 2, 64, 1, -1, None, True),  # long encoder row
    (5, 4, 97, 2, 1, 769, 2, -1, "1d", True),  # one odd head, shared K/V per sentence
    (1, 6, 13, 8, 4, 256, 1, -1, "2d", True),  # incremental step through parent pointers
    (3, 6, 13, 8, 4, 256, 3, 10, "2d", False),  # causal with an offset
]


@pytest.mark.parametrize("backend", _backends(attn_mod))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES, ids=[f"case{i}" for i in range(len(ATTN_CASES))])
def test_attention(backend, dtype, case):
    tq, n, s, m, heads, c, qpk, causal, rows_kind, with_pad = case
    if backend == "reference" and tq * s > 200_000 and dtype != torch.float32:
        pytest.skip("reference vs reference on a long row: nothing to learn")
    g = torch.Generator().manual_seed(tq + s)
    groups = n // qpk
    q = torch.randn(tq, n, 3 * c, generator=g)[..., c : 2 * c]  # strided view, as from a QKV GEMM
    k = torch.randn(s + 4, m, 2 * c, generator=g)[:s, :, :c]  # a cache's first s slots
    v = torch.randn(s + 4, m, 2 * c, generator=g)[:s, :, c:]
    rows = None
    if rows_kind == "1d":
        rows = torch.randint(0, m, (groups,), generator=g)
    elif rows_kind == "2d":
        rows = torch.randint(0, m, (groups, s + 7), generator=g)
    pad = None
    if with_pad:
        pad = torch.rand(s, m, generator=g) < 0.25
        pad[0] = False  # every row keeps one key
        pad = pad.t()  # [m, s], strided
    need_w = True
    args = lambda dt, d: (  # noqa: E731
        q.to(d, dt),
        k.to(d, dt),
        v.to(d, dt),
        None if rows is None else rows.to(d),
        None if pad is None else pad.to(d),
        heads,
        (c // heads) ** -0.5,
        qpk,
        causal,
        need_w,
    )
    out, w = _run(attn_mod, backend, *args(dtype, _devices(backend)))
    out_ref, w_ref = attn_mod.attention_reference(*args(torch.float32, "cpu"))
    out_same, w_same = attn_mod.attention_reference(*args(dtype, "cpu"))
    assert out.shape == (tq, n, c) and out.is_contiguous()
    assert_close(out.cpu(), out_ref, dtype, "out", out_same)
    assert_close(w.cpu(), w_ref, dtype, "weights", w_same)


@pytest.mark.parametrize("s", [1, 2, 5, 7, 8, 9, 15, 16, 17, 40])
@pytest.mark.parametrize("dim", [64, 48])
def test_attention_probabilities_are_torch_softmax_bits(s, dim):
    """The CPU kernel's probabilities are torch's CPU softmax of its scores,
    bit for bit: stock's F.softmax(scores, dtype=float32). Small integer
    queries and keys and a power-of-two scale make every score exact in any
    summation order, so the scores are known here and the softmax alone is
    compared (widths below, at and past a vector; the 64-wide path and the
    general one)."""
    if not _ext.cpu_available()[0]:
        pytest.skip("no CPU extension")
    g = torch.Generator().manual_seed(s * 100 + dim)
    heads, n, m = 3, 4, 2
    c = heads * dim
    q = torch.randint(-3, 4, (1, n, c), generator=g).float()
    k = torch.randint(-3, 4, (s, m, c), generator=g).float()
    v = torch.randn(s, m, c, generator=g)
    rows = torch.randint(0, m, (n, s), generator=g)
    pad = torch.rand(m, s, generator=g) < 0.2
    pad[:, 0] = False
    scaling = 0.125
    _, w = _run(attn_mod, "cpu", q, k, v, rows, pad, heads, scaling, 1, -1, True)
    kr = k[torch.arange(s).view(1, s), rows]  # [n, s, c]: each row's keys
    qs = (q[0] * scaling).view(n, heads, dim)
    scores = torch.einsum("nhd,nshd->hns", qs, kr.view(n, s, heads, dim))
    masked = pad[rows, torch.arange(s).view(1, s)]  # [n, s]
    scores = scores.masked_fill(masked.unsqueeze(0), float("-inf"))
    want = torch.softmax(scores, dim=-1)
    assert torch.equal(w.view(heads, n, s), want)


@pytest.mark.parametrize("backend", _backends(emb_mod))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [emb_mod.POS_NONE, emb_mod.POS_MAKE, emb_mod.POS_FIXED])
def test_embedding(backend, dtype, mode):
    g = torch.Generator().manual_seed(mode)
    pad = 1
    tokens = torch.randint(2, 5125, (5, 97), generator=g)
    tokens[0, :10] = pad  # left padding
    tokens[1, -7:] = pad  # right padding
    table = torch.randn(5125, 769, generator=g)
    pos = torch.randn(200, 769, generator=g) if mode != emb_mod.POS_NONE else None
    fixed = pad + 97
    dev = _devices(backend)
    zero = mode == emb_mod.POS_MAKE
    cast = lambda t, dt, d: None if t is None else t.to(d, dt)  # noqa: E731
    out = _run(
        emb_mod,
        backend,
        tokens.to(dev),
        cast(table, dtype, dev),
        16.0,
        cast(pos, dtype, dev),
        pad,
        mode,
        fixed,
        zero,
    )
    ref = emb_mod.embedding_reference(tokens, table, 16.0, pos, pad, mode, fixed, zero)
    same = emb_mod.embedding_reference(
        tokens, table.to(dtype), 16.0, cast(pos, dtype, "cpu"), pad, mode, fixed, zero
    )
    assert out.shape == (97, 5, 769)
    assert_close(out.cpu(), ref, dtype, "embedding", same)


def test_dispatch_refuses_ext_under_autograd():
    x = torch.randn(4, 8, requires_grad=True)
    b, refused = choose(aln_mod.BACKENDS, x, None, None, torch.ones(8), torch.zeros(8), 1e-5, False)
    assert b.name == "reference"
    assert any("autograd" in why for _, why in refused)


def test_embedding_rejects_out_of_range_tokens():
    if not _ext.cpu_available()[0]:
        pytest.skip("no CPU extension")
    with pytest.raises(RuntimeError):
        _run(emb_mod, "cpu", torch.tensor([[7]]), torch.randn(5, 4), 1.0, None, 1, 0, 0, False)


@pytest.mark.parametrize("table", ["per_slot", "per_row"])
def test_attention_rejects_out_of_range_kv_rows(table):
    """Physical rows come from the caller: one outside k's rows is refused
    before any key is read."""
    if not _ext.cpu_available()[0]:
        pytest.skip("no CPU extension")
    q = torch.randn(1, 4, 8)
    k = torch.randn(3, 2, 8)
    rows = (
        torch.zeros(4, 3, dtype=torch.long)
        if table == "per_slot"
        else torch.zeros(4, dtype=torch.long)
    )
    _run(attn_mod, "cpu", q, k, k, rows, None, 2, 1.0, 1, -1, False)  # in range: runs
    bad = rows.clone()
    bad.view(-1)[-1] = 2
    with pytest.raises(RuntimeError, match="kv_rows outside"):
        _run(attn_mod, "cpu", q, k, k, bad, None, 2, 1.0, 1, -1, False)
