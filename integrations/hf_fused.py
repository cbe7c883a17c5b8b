"""Fused layers for Hugging Face models: every ``nn.Linear`` on the packed GEMM.

``seqfuse.optimize(model, fused_layers=True)`` (or ``SEQFUSE_FUSED_LAYERS=1``)
changes, in place, the class of each plain ``nn.Linear`` module of the model
(attention projections, FFNs, the LM head; encoder-only models such as BERT
included) to :class:`PackedLinear`, and of each transformers ``Conv1D``
(GPT-2's projections) to a packed subclass of it, whose forward runs seqfuse's packed-weight
GEMM (``seqfuse.ops.linear``) for fp32 CPU inputs without autograd and the
stock ``F.linear`` otherwise. Parameters, ``state_dict`` and hooks are the
module's own; :func:`disable` restores the class.

The GEMM rounds differently from torch's BLAS (about 1e-6 relative in fp32):
outputs agree with stock's within 1e-5, not bit for bit, which is why this is
opt-in. The default ``seqfuse.optimize`` keeps every product torch's.
"""

from __future__ import annotations

from torch import Tensor, nn

from seqfuse.ops.linear import drop_packs, linear, linear_kn


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose inference forward uses the packed-weight GEMM."""

    _seqfuse_packed_linear = True

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.size(-1) != self.in_features:
            return super().forward(x)
        y = linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def _conv1d_types() -> dict:
    """transformers' Conv1D (GPT-2's linear layer, weight ``[in, out]``) -> its packed class."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return {}
    if _PACKED_CONV1D.get(Conv1D) is None:

        class PackedConv1D(Conv1D):
            """A ``Conv1D`` whose inference forward uses the packed-weight GEMM."""

            _seqfuse_packed_linear = True

            def forward(self, x: Tensor) -> Tensor:
                y = linear_kn(x.reshape(-1, x.size(-1)), self.weight, self.bias)
                return y.view(*x.shape[:-1], self.nf)

        _PACKED_CONV1D[Conv1D] = PackedConv1D
    return _PACKED_CONV1D


_PACKED_CONV1D: dict[type, type] = {}


def enable(model: nn.Module) -> int:
    """Swap the class of every plain ``nn.Linear`` (and transformers ``Conv1D``)
    in ``model``; returns how many."""
    swaps = {nn.Linear: PackedLinear, **_conv1d_types()}
    n = 0
    for m in model.modules():
        packed_cls = swaps.get(type(m))
        if packed_cls is not None:
            m.__class__ = packed_cls
            n += 1
    return n


def disable(model: nn.Module) -> None:
    """Restore the classes and free the weight packs."""
    for m in model.modules():
        if getattr(type(m), "_seqfuse_packed_linear", False):
            m.__class__ = type(m).__bases__[0]
            drop_packs([m.weight])


def enabled(model: nn.Module) -> bool:
    return any(getattr(type(m), "_seqfuse_packed_linear", False) for m in model.modules())
