"""Backend lists shared by the fused layer ops (attention, add_layernorm, ...).

Each op lists the CUDA extension, the CPU extension and its torch reference.
The extension kernels have no backward: a call that needs autograd (grad
enabled and an input requiring it) runs the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from seqfuse.ops.dispatch import Backend, ext_check

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def backends(
    ext_run: Callable,
    reference: Callable,
    tensors_of: Callable[..., tuple],
    extra_cuda_check: Callable[..., str | None] | None = None,
) -> tuple[Backend, Backend, Backend]:
    """(cuda, cpu, reference) backends; ``tensors_of(*args)`` returns the float
    tensors of a call, the first one deciding device and dtype."""

    def make_check(device_type: str, extra: Callable | None) -> Callable[..., str | None]:
        avail = ext_check(device_type)

        def check(*args) -> str | None:
            ts = tensors_of(*args)
            x = ts[0]
            if x.dtype not in FLOAT_DTYPES:
                return f"dtype {x.dtype} not supported"
            if needs_grad(*ts):
                return "autograd requested (the kernels have no backward)"
            why = avail(x)
            if why is None and extra is not None:
                why = extra(*args)
            return why

        return check

    return (
        Backend("cuda", ext_run, make_check("cuda", extra_cuda_check)),
        Backend("cpu", ext_run, make_check("cpu", None)),
        Backend("reference", reference, lambda *a: None),
    )
