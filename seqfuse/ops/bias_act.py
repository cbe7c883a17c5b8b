"""FFN bias + activation, in place: ``x = act(x + bias)``.

Args:
    x: ``[rows, cols]`` fp32/fp16/bf16, contiguous (fc1's GEMM output, no bias).
    bias: ``[cols]`` or None.
    act: one of ``ACTIVATIONS`` (fairseq's names): relu, gelu (erf form, fp32
        math as fairseq's ``utils.gelu``), gelu_accurate (tanh form), tanh, linear.

Returns ``x``. The activation dropout of fairseq is the identity in eval mode;
in training the fused layers run the stock computation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from seqfuse.ops._layer_backends import backends
from seqfuse.ops.dispatch import explain, pick

ACTIVATIONS = {"linear": 0, "relu": 1, "gelu": 2, "gelu_accurate": 3, "tanh": 4}


def _act_reference(x: Tensor, act: int) -> Tensor:
    if act == ACTIVATIONS["relu"]:
        return torch.relu(x)
    if act == ACTIVATIONS["gelu"]:
        return torch.nn.functional.gelu(x.float()).type_as(x)
    if act == ACTIVATIONS["gelu_accurate"]:
        y = x.float()
        return (
            0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y.pow(3))))
        ).type_as(x)
    if act == ACTIVATIONS["tanh"]:
        return torch.tanh(x)
    return x


def bias_act_reference(x: Tensor, bias: Tensor | None, act: int) -> Tensor:
    y = x if bias is None else x + bias
    y = _act_reference(y, act)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return y  # out of place under autograd
    return x.copy_(y)


def _ext_run(x, bias, act):
    return torch.ops.seqfuse.bias_act_(x, bias, act)


def _tensors(x, bias, act):
    return (x, bias)


BACKENDS = backends(_ext_run, bias_act_reference, _tensors)


def bias_act(x: Tensor, bias: Tensor | None, act: int | str) -> Tensor:
    """See the module docstring. Picks the CUDA, CPU or reference backend."""
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"bias_act: unsupported activation {act!r}")
        act = ACTIVATIONS[act]
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"bias_act: x must be a contiguous [rows, cols], got {tuple(x.shape)}")
    backend = pick(BACKENDS, x, bias, act)
    return backend.run(x, bias, act)


def which_backend(x: Tensor) -> str:
    return explain(BACKENDS, x, None, 1)
