"""Comparison helpers for seqfuse's tests: the one tolerance table and an assert
that says where and how badly two tensors differ.

The tolerance is chosen by the dtype the compared values were *computed* in
(an fp32 score computed from fp16 logits is compared with the fp32 entry).
"""

from __future__ import annotations

import torch
from torch import Tensor

# (atol, rtol) per computation dtype: |actual - expected| <= atol + rtol * |expected|.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for values computed in ``dtype``."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def separated(a: float, b: float, dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``a`` and ``b`` differ by more than the tolerance (so their order
    cannot be a rounding artefact). Equal infinities and NaN are not separated."""
    atol, rtol = tolerance(dtype)
    gap = abs(a - b)
    if gap != gap:  # inf - inf or NaN
        return False
    return gap > atol + rtol * max(abs(a), abs(b))


def assert_close(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype | None = None,
    what: str = "",
    equal_nan: bool = False,
) -> None:
    """Element-wise closeness with the table's tolerance for ``dtype`` (default:
    ``expected.dtype``). Non-finite values must match exactly (inf == inf,
    -inf == -inf; NaN == NaN only with ``equal_nan``). On failure the message
    gives how many elements fail, the worst one, its index and both values.
    """
    label = f"{what}: " if what else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    atol, rtol = tolerance(dtype or expected.dtype)
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    both_nan = torch.isnan(a) & torch.isnan(e)
    nonfinite = ~torch.isfinite(a) | ~torch.isfinite(e)
    bad_nonfinite = nonfinite & (a != e)
    if equal_nan:
        bad_nonfinite &= ~both_nan
    finite = ~nonfinite
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bound = atol + rtol * e.abs()
    bad = (finite & (err > bound)) | bad_nonfinite
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    lines = [f"{label}{n_bad}/{a.numel()} elements differ (atol={atol:g}, rtol={rtol:g})"]
    if int(bad_nonfinite.sum()):
        idx = tuple(int(i) for i in bad_nonfinite.nonzero()[0])
        lines.append(
            f"  {int(bad_nonfinite.sum())} non-finite mismatches; first at {idx}: "
            f"actual {a[idx].item()} expected {e[idx].item()}"
        )
    if int((finite & bad).sum()):
        excess = torch.where(finite, err - bound, torch.full_like(err, -float("inf")))
        flat = int(excess.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        lines.append(
            f"  worst at {idx}: actual {a[idx].item():.9g} expected {e[idx].item():.9g} "
            f"(|diff| {err[idx].item():.3g}, allowed {bound[idx].item():.3g})"
        )
    raise AssertionError("\n".join(lines))
