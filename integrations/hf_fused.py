"""Fused layers for Hugging Face models: every ``nn.Linear`` on the packed GEMM.

``seqfuse.optimize(model, fused_layers=True)`` (or ``SEQFUSE_FUSED_LAYERS=1``)
changes, in place, the class of each plain ``nn.Linear`` module of the model
(attention projections, FFNs, the LM head; encoder-only models such as BERT
included) to :class:`PackedLinear`, whose forward runs seqfuse's packed-weight
GEMM (``seqfuse.ops.linear``) for fp32 CPU inputs without autograd and the
stock ``F.linear`` otherwise. Parameters, ``state_dict`` and hooks are the
module's own; :func:`disable` restores the class.

The GEMM rounds differently from torch's BLAS (about 1e-6 relative in fp32):
outputs agree with stock's within 1e-5, not bit for bit, which is why this is
opt-in. The default ``seqfuse.optimize`` keeps every product torch's.
"""

from __future__ import annotations

from torch import Tensor, nn

from seqfuse.ops.linear import linear


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose inference forward uses the packed-weight GEMM."""

    _seqfuse_packed_linear = True

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.size(-1) != self.in_features:
            return super().forward(x)
        y = linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def enable(model: nn.Module) -> int:
    """Swap the class of every plain ``nn.Linear`` in ``model``; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = PackedLinear
            n += 1
    return n


def disable(model: nn.Module) -> None:
    for m in model.modules():
        if type(m) is PackedLinear:
            m.__class__ = nn.Linear


def enabled(model: nn.Module) -> bool:
    return any(type(m) is PackedLinear for m in model.modules())
