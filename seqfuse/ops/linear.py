"""``y = x W^T + b`` with the weight packed once: the fused layers' GEMMs.

Contract::

    linear(x [M, K], weight [N, K], bias [N] | None) -> [M, N]
    y[m, n] = sum_k x[m, k] * weight[n, k]  (+ bias[n])

CPU backend (AVX2 / AVX-512, torch's CPU capability decides): the weight is
packed into 16-column panels on first use and the pack is kept while the
weight's storage and version counter are unchanged (an in-place update
repacks; an inference-mode tensor, which has no version counter, is assumed
not to change in place). A pack is a second copy of its weight, freed with it.
Each output is one sequential dot product over k, so a row's result depends
neither on the other rows (batch composition) nor on the thread count. Each
block of rows skips the k where all its rows of x are zero (after a ReLU,
most of them): the same bits, since a skipped term adds exactly nothing when
the weight is finite (checked once per pack; the op's ``skip_zeros``). It
differs from torch's BLAS in rounding only (about 1e-6 relative): the fused
layers use it; the exact paths keep torch's GEMMs. Reference (also the
fallback: other devices, dtypes, capabilities, autograd): ``F.linear``.

``torch.ops.seqfuse.linear_packed_maxima(x, pack, bias, n) -> (y, maxima)``
(CPU, float32, dense) is the same product that also returns, for each row,
the maximum of every group of 32 outputs (``[M, ceil(n / 32)]``; NaN where a
group holds a NaN), noted by each GEMM task as it stores its outputs, still
in L1: the fused decoder's vocabulary projection in the search lane, whose
candidate step (``beam_topk_maxima``, seqfuse/ops/beam_topk.py) then reads
those maxima instead of passing over the logits for its chunk maxima.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from seqfuse.ops._layer_backends import needs_grad
from seqfuse.ops.dispatch import Backend, explain, ext_check, pick

# (id(weight), transposed) -> (weakref to weight, storage pointer, version, packed)
_PACKS: dict[tuple[int, bool], tuple] = {}


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def packed(weight: Tensor, transposed: bool = False) -> Tensor:
    """The weight's panel pack, built on first use and after any change.
    ``transposed``: ``weight`` is stored ``[K, N]`` (GPT-2's Conv1D) and the
    pack is that of ``weight.t()``."""
    return _pack_entry(weight, transposed)[3]


def skips_zeros(weight: Tensor, transposed: bool = False) -> bool:
    """Whether products with this weight may skip zero inputs (every weight
    finite), as its cached pack records it."""
    return _pack_entry(weight, transposed)[4]


def tensor_state(w: Tensor) -> tuple[int, int]:
    """(storage pointer, version) of a tensor: a weight as its pack was taken,
    a step's logits as their maxima were noted. Inference tensors keep no
    version counter (and cannot change outside inference mode): theirs is -1,
    the state the storage alone."""
    return w.data_ptr(), -1 if w.is_inference() else w._version


def _pack_entry(weight: Tensor, transposed: bool) -> tuple:
    """(weakref, storage pointer, version, pack, finite): the cached pack and
    whether every weight is finite (then the product may skip zero inputs)."""
    key = (id(weight), transposed)
    entry = _PACKS.get(key)
    ptr, version = tensor_state(weight)
    if entry is not None and entry[0]() is weight and entry[1:3] == (ptr, version):
        return entry
    with torch.no_grad():
        w = weight.detach()
        pack, finite = torch.ops.seqfuse.pack_linear_weight_checked(w.t() if transposed else w)
    ref = weakref.ref(weight, lambda _r, k=key: _PACKS.pop(k, None))
    entry = (ref, ptr, version, pack, finite)
    _PACKS[key] = entry
    return entry


# The packs of a list of weights that a one-call step passes together:
# (transposed, id of each weight) -> (weak references, each weight's (storage
# pointer, version), packs, whether each weight is finite). A hit needs the
# same weight objects in the same state as when the packs were taken; a weight
# that dies takes its groups with it. About 0.3 us a weight a step, against
# 3 us for its own lookup.
_GROUPS: dict[tuple, tuple] = {}


def _group(weights, transposed: bool) -> tuple:
    key = (transposed, *map(id, weights))
    state = list(map(tensor_state, weights))
    hit = _GROUPS.get(key)
    if hit is not None and hit[1] == state and all(r() is w for r, w in zip(hit[0], weights)):
        return hit
    entries = [_pack_entry(w, transposed) for w in weights]

    def forget(_ref, k=key):
        _GROUPS.pop(k, None)

    group = (
        [weakref.ref(w, forget) for w in weights],
        state,
        [e[3] for e in entries],
        [e[4] for e in entries],
    )
    _GROUPS[key] = group
    return group


def packs_for(weights, transposed: bool = False) -> list[Tensor]:
    """``[packed(w, transposed) for w in weights]``, the list kept while every
    weight is the same object with the same storage and version."""
    return _group(weights, transposed)[2]


def packs_and_finite(weights, transposed: bool = False) -> tuple[list[Tensor], list[bool]]:
    """(:func:`packs_for`, ``[skips_zeros(w, transposed) for w in weights]``:
    whether every value of each weight is finite, so that its products may
    skip zero inputs), from the one kept group."""
    group = _group(weights, transposed)
    return group[2], group[3]


def drop_packs(weights) -> None:
    """Free the packs of these weights (they are rebuilt on next use)."""
    for w in weights:
        for transposed in (False, True):
            _PACKS.pop((id(w), transposed), None)
    _GROUPS.clear()  # (the groups hold the same packs)


def _cpu_run(x, weight, bias):
    b = bias.contiguous() if bias is not None else None
    entry = _pack_entry(weight, False)
    # Zero inputs (after a ReLU, most) are skipped where the weight is finite:
    # the same bits (see the module docstring).
    return torch.ops.seqfuse.linear_packed(x, entry[3], b, weight.size(0), entry[4])


_cpu_available = ext_check("cpu")
_capability: list[str] = []


def _kernel_capability() -> str:
    if not _capability:
        _capability.append(torch.ops.seqfuse.linear_capability())
    return _capability[0]


def _cpu_check(x, weight, bias) -> str | None:
    why = _cpu_available(x)
    if why is not None:
        return why
    if not _kernel_capability():
        return "no AVX2/AVX-512 kernel for this CPU"
    for t in (x, weight, bias):
        if t is not None and t.dtype != torch.float32:
            return f"dtype {t.dtype} (the CPU kernel is fp32)"
    if needs_grad(x, weight, bias):
        return "autograd requested (the kernel has no backward)"
    if x.dim() != 2 or x.stride(-1) != 1:
        return "x must be [M, K] with contiguous rows"
    return None


BACKENDS = (
    Backend("cpu", _cpu_run, _cpu_check),
    Backend("reference", linear_reference, lambda *a: None),
)


def linear_kn(x: Tensor, weight_kn: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight_kn + bias`` for a weight stored ``[K, N]`` (GPT-2's Conv1D):
    the packed kernel on the transpose's pack, else ``torch.addmm``."""
    if x.dim() != 2 or weight_kn.dim() != 2 or x.size(1) != weight_kn.size(0):
        raise ValueError(
            f"linear_kn: x [M, K] and weight [K, N] expected, got {tuple(x.shape)} and "
            f"{tuple(weight_kn.shape)}"
        )
    if pick(BACKENDS, x, weight_kn.t(), bias).name == "cpu":
        b = bias.contiguous() if bias is not None else None
        entry = _pack_entry(weight_kn, True)
        return torch.ops.seqfuse.linear_packed(x, entry[3], b, weight_kn.size(1), entry[4])
    if bias is None:
        return x @ weight_kn
    return torch.addmm(bias, x, weight_kn)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """See the module docstring."""
    if x.dim() != 2 or weight.dim() != 2 or x.size(1) != weight.size(1):
        raise ValueError(
            f"linear: x [M, K] and weight [N, K] expected, got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    backend = pick(BACKENDS, x, weight, bias)
    return backend.run(x, weight, bias)


def kernel_takes(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``linear(x, weight, bias)`` would run the packed CPU kernel."""
    return pick(BACKENDS, x, weight, bias).name == "cpu"


def which_backend(x: Tensor, weight: Tensor) -> str:
    return explain(BACKENDS, x, weight, None)
