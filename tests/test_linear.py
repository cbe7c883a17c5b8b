"""The packed-weight GEMM (seqfuse.ops.linear) against torch's, in float64.

The kernel is checked against a float64 product (not against torch's fp32
GEMM, which has rounding errors of its own), with the error bound of an fp32
dot product: |err| <= K * eps * sum_k |x_k w_k| (plus the bias's rounding).
"""

from __future__ import annotations

import pytest
import torch

from seqfuse import _ext
from seqfuse.ops import linear as lin_mod
from seqfuse.ops.dispatch import choose
from seqfuse.ops.linear import linear

pytestmark = pytest.mark.skipif(_ext._C is None, reason="seqfuse._C not built")


def _has_kernel() -> bool:
    return _ext._C is not None and bool(torch.ops.seqfuse.linear_capability())


needs_kernel = pytest.mark.skipif(not _has_kernel(), reason="no AVX2/AVX-512 kernel here")


def check(y, x, w, b):
    exact = x.double() @ w.double().t()
    scale = x.double().abs() @ w.double().abs().t()
    if b is not None:
        exact = exact + b.double()
        scale = scale + b.double().abs()
    bound = (x.size(1) + 2) * torch.finfo(torch.float32).eps * scale + 1e-30
    err = (y.double() - exact).abs()
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert bool((err <= bound).all()), f"worst error {float((err / bound).max()):.2f} x the bound"


SHAPES = [
    (1, 1, 1),
    (5, 256, 8003),
    (6, 17, 15),
    (7, 769, 33),
    (13, 64, 16),
    (3, 1024, 256),
    (97, 256, 1025),
    (0, 8, 8),
]


@needs_kernel
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64(m, k, n, with_bias):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    backend, _ = choose(lin_mod.BACKENDS, x, w, b)
    assert backend.name == "cpu"
    check(linear(x, w, b), x, w, b)


@needs_kernel
@pytest.mark.parametrize("n", [70, 1000])  # 3 panel pairs; 32 (several groups of pairs)
def test_rows_do_not_depend_on_the_batch_or_threads(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 96, generator=g)
    w = torch.randn(n, 96, generator=g)
    full = linear(x, w)
    for rows in (slice(0, 1), slice(4, 9), slice(17, 23)):
        assert torch.equal(linear(x[rows].contiguous(), w), full[rows])
    # Every block height the kernel may take (a product of m rows ends with a
    # block of m mod the capability's height).
    for m in range(1, 23):
        assert torch.equal(linear(x[:m].contiguous(), w), full[:m]), f"{m} rows"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(linear(x, w), full)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(320, 256, 1024), (97, 64, 8003)])
@pytest.mark.parametrize("skip_zeros", [False, True])
def test_products_of_many_tasks_do_not_depend_on_threads(m, k, n, skip_zeros):
    """Products of many tasks hand them out in chunks to whichever thread is
    free (csrc/cpu/task_queue.h): 2 and 3 threads (more than the cores here,
    so the chunks land unevenly) give one thread's bits, dense and skipping
    zeros."""
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, k, generator=g)
    if skip_zeros:
        x = x.clamp(min=0)  # a ReLU's output: about half zeros
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    pack = lin_mod.packed(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.seqfuse.linear_packed(x, pack, b, n, skip_zeros)
        for t in (2, 3):
            torch.set_num_threads(t)
            for _ in range(3):
                got = torch.ops.seqfuse.linear_packed(x, pack, b, n, skip_zeros)
                assert torch.equal(got, one), f"{t} threads"
    finally:
        torch.set_num_threads(threads)
    check(one, x, w, b)


@needs_kernel
def test_strided_rows_and_repack_after_an_update():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(9, 40, generator=g)
    x = big[:, 3:35]  # rows 40 apart
    w = torch.nn.Parameter(torch.randn(20, 32, generator=g), requires_grad=False)
    check(linear(x, w), x, w, None)
    with torch.no_grad():
        w.mul_(-2.0)  # in place: a new version, the pack must follow
    check(linear(x, w), x, w, None)
    w.data = torch.randn(20, 32, generator=g)  # new storage
    check(linear(x, w), x, w, None)


@needs_kernel
def test_group_packs_follow_their_weights():
    """packs_for (a one-call step's packs, looked up as a group): the packs of
    the weights as they are now, after an in-place update, a new storage, a
    replaced weight object; a dead weight's group is freed."""
    g = torch.Generator().manual_seed(2)

    def fresh(w):
        return torch.ops.seqfuse.pack_linear_weight_checked(w.detach())[0]

    ws = [
        torch.nn.Parameter(torch.randn(20, 32, generator=g), requires_grad=False) for _ in range(3)
    ]
    first = lin_mod.packs_for(ws)
    assert all(torch.equal(p, fresh(w)) for p, w in zip(first, ws))
    assert all(a is b for a, b in zip(lin_mod.packs_for(ws), first))  # a hit
    with torch.no_grad():
        ws[1].mul_(-2.0)  # in place: a new version
    packs = lin_mod.packs_for(ws)
    assert torch.equal(packs[1], fresh(ws[1])) and not torch.equal(packs[1], first[1])
    ws[2].data = torch.randn(20, 32, generator=g)  # new storage
    packs = lin_mod.packs_for(ws)
    assert torch.equal(packs[2], fresh(ws[2]))
    other = torch.nn.Parameter(ws[0].detach().clone() * 3, requires_grad=False)
    packs = lin_mod.packs_for([other, ws[1], ws[2]])  # another object in a slot
    assert torch.equal(packs[0], fresh(other))
    assert [
        torch.equal(a, b) for a, b in zip(lin_mod.packs_for(ws[::-1]), lin_mod.packs_for(ws)[::-1])
    ] == [True] * 3
    n = len(lin_mod._GROUPS)
    del other, packs
    assert len(lin_mod._GROUPS) == n - 1  # its group went with it
    lin_mod.drop_packs(ws[:1])
    assert not lin_mod._GROUPS
    with torch.inference_mode():
        frozen = [torch.randn(20, 32, generator=g) for _ in range(2)]
    a = lin_mod.packs_for(frozen)
    assert all(x is y for x, y in zip(lin_mod.packs_for(frozen), a))
    assert all(torch.equal(p, fresh(w)) for p, w in zip(a, frozen))


def test_reference_for_what_the_kernel_does_not_take():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(6, 8, dtype=torch.bfloat16)
    assert "dtype" in lin_mod.which_backend(x, w)
    assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
    xg = torch.randn(4, 8, requires_grad=True)
    wg = torch.randn(6, 8)
    y = linear(xg, wg)
    y.sum().backward()  # the reference: autograd works
    assert torch.allclose(xg.grad, wg.sum(0).expand(4, 8))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"x \[M, K\] and weight \[N, K\]"):
        linear(torch.randn(3, 4), torch.randn(5, 6))
    if _ext._C is not None:
        p = torch.ops.seqfuse.pack_linear_weight(torch.randn(20, 8))
        with pytest.raises(RuntimeError, match="does not match"):
            torch.ops.seqfuse.linear_packed(torch.randn(2, 8), p, None, 40)
        with pytest.raises(RuntimeError, match="packed weight must be"):
            torch.ops.seqfuse.linear_packed(torch.randn(2, 9), p, None, 20)


@needs_kernel
def test_inference_mode_weights():
    with torch.inference_mode():
        w = torch.randn(24, 16)
        x = torch.randn(3, 16)
        check(linear(x, w), x, w, None)
    x2 = torch.randn(2, 16)
    check(linear(x2, w), x2, w, None)  # an inference tensor used outside the mode


@needs_kernel
@pytest.mark.parametrize("with_bias", [True, False])
def test_weight_stored_k_by_n(with_bias):
    """linear_kn: GPT-2's Conv1D layout, x @ W[K, N] + b, packed from W.t()."""
    from seqfuse.ops.linear import linear_kn

    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 48, generator=g)
    w_kn = torch.randn(48, 70, generator=g)
    b = torch.randn(70, generator=g) if with_bias else None
    y = linear_kn(x, w_kn, b)
    check(y, x, w_kn.t(), b)
    assert torch.equal(y, linear(x, w_kn.t().contiguous(), b))  # the same panels
    with torch.no_grad():
        w_kn.add_(1.0)  # repacked after an in-place change
    check(linear_kn(x, w_kn, b), x, w_kn.t(), b)


def _relu_like(m: int, k: int, density: float, seed: int) -> torch.Tensor:
    """ReLU-like activations: most entries zero, rows of a group of 5 (the
    beams of a sentence) sharing most of their nonzero columns."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.rand((m + 4) // 5, k, generator=g) < density
    mask = groups.repeat_interleave(5, 0)[:m] & (torch.rand(m, k, generator=g) < 0.8)
    return torch.randn(m, k, generator=g).abs() * mask


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 1024, 256), (7, 769, 33), (13, 64, 48),
                                   (97, 1025, 17), (320, 1024, 256), (0, 8, 8)])  # fmt: skip
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_skipping_zeros_gives_the_dense_bits(m, k, n, density):
    """fc2 after a ReLU skips, per row block, the columns that are zero in all
    its rows: the same outputs as the dense product, bit for bit, from all-zero
    to fully dense inputs (the kernel then takes the dense loop)."""
    g = torch.Generator().manual_seed(m + k + n)
    x = _relu_like(m, k, density, seed=m * 7 + k) if density < 1.0 else torch.randn(m, k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    pack = lin_mod.packed(w)
    dense = torch.ops.seqfuse.linear_packed(x, pack, b, n, False)
    sparse = torch.ops.seqfuse.linear_packed(x, pack, b, n, True)
    assert torch.equal(dense, sparse)
    check(sparse, x, w, b)


@needs_kernel
def test_skipping_zeros_keeps_nan_and_signed_zero_inputs():
    """A NaN input is not a zero (its column is multiplied); -0.0 is (its
    products add nothing): the dense bits either way, NaN where dense has it."""
    x = _relu_like(12, 96, 0.2, seed=3)
    x[2, 5] = float("nan")
    x[7, 40:60] = -0.0
    x[8] = 0.0  # a whole row of zeros
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(4))
    pack = lin_mod.packed(w)
    dense = torch.ops.seqfuse.linear_packed(x, pack, None, 40, False)
    sparse = torch.ops.seqfuse.linear_packed(x, pack, None, 40, True)
    assert torch.equal(dense.isnan(), sparse.isnan()) and bool(sparse[2].isnan().all())
    ok = ~dense.isnan()
    assert torch.equal(dense[ok], sparse[ok])
    assert torch.equal(sparse[8], torch.zeros(40))


@needs_kernel
def test_linear_skips_zeros_only_for_a_finite_weight():
    """``linear`` skips zero inputs (same bits as the dense product) when its
    weight is finite; an inf weight makes it multiply every term, so its NaNs
    (0 * inf) are where the dense product has them."""
    x = _relu_like(30, 128, 0.1, seed=8)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(9))
    dense = torch.ops.seqfuse.linear_packed(x, lin_mod.packed(w), None, 64, False)
    assert torch.equal(linear(x, w), dense)
    w2 = w.clone()
    w2[5, 17] = float("inf")
    got = linear(x, w2)
    want = torch.ops.seqfuse.linear_packed(x, lin_mod.packed(w2), None, 64, False)
    assert bool(got.isnan().any()) and torch.equal(got.isnan(), want.isnan())
    skipped = torch.ops.seqfuse.linear_packed(x, lin_mod.packed(w2), None, 64, True)
    assert not torch.equal(skipped.isnan(), want.isnan())  # why the check matters


def _pack_by_torch(w: torch.Tensor) -> torch.Tensor:
    """The panel layout by torch ops: [N, K] -> zero-padded [P * 16, K] -> [P, K, 16]."""
    n, k = w.shape
    panels = -(-n // 16)
    padded = torch.zeros(panels * 16, k)
    padded[:n] = w
    return padded.view(panels, 16, k).transpose(1, 2).contiguous()


@pytest.mark.parametrize("shape", [(1, 1), (15, 3), (16, 7), (33, 64), (1025, 97), (8003, 256)])
def test_pack_layout_and_finite_flag(shape):
    """pack_linear_weight(_checked): torch's panel layout bit for bit, from
    contiguous and transposed (strided) weights, and the finite flag false
    for an inf or a NaN anywhere, the last (partial) panel included."""
    g = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=g)
    for src in (w, w.t().contiguous().t()):  # [N, K] with strides (K, 1) and (1, N)
        pack, finite = torch.ops.seqfuse.pack_linear_weight_checked(src)
        assert torch.equal(pack, _pack_by_torch(w)) and finite
        assert torch.equal(torch.ops.seqfuse.pack_linear_weight(src), pack)
    n, k = shape
    for bad in (float("inf"), float("-inf"), float("nan")):
        for r, c in {(0, 0), (n - 1, k - 1), (n // 2, k // 3)}:
            w2 = w.clone()
            w2[r, c] = bad
            pack, finite = torch.ops.seqfuse.pack_linear_weight_checked(w2)
            assert not finite, (bad, r, c)
            assert torch.equal(pack.isnan(), _pack_by_torch(w2).isnan())
            assert torch.equal(pack.nan_to_num(0.0), _pack_by_torch(w2).nan_to_num(0.0))
            assert lin_mod.skips_zeros(w2) is False
    assert lin_mod.skips_zeros(w) is True
