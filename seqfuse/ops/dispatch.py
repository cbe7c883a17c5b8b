"""Backend choice for every op: first backend that fits, with its reasons.

Each op lists backends in priority order (CUDA extension, CPU extension, torch
reference). A backend's ``check(*args)`` returns ``None`` when it can run the
call or a short reason when it cannot; ``choose`` keeps every refusal so
``explain`` can say why a faster backend was not taken.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from seqfuse import _ext

# SEQFUSE_BACKEND=reference|cpu|cuda forces one backend (tests, debugging).
_FORCED_ENV = "SEQFUSE_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str  # "cuda", "cpu" or "reference"
    run: Callable
    check: Callable[..., str | None]


def ext_check(device_type: str) -> Callable[[torch.Tensor], str | None]:
    """Availability check shared by extension backends of ``device_type``."""

    other = f"input not on {device_type}"

    def check(x: torch.Tensor) -> str | None:
        if x.device.type != device_type:
            return other
        ok, why = _ext.cuda_available() if device_type == "cuda" else _ext.cpu_available()
        return None if ok else why

    return check


def forced_backend() -> str | None:
    """The backend SEQFUSE_BACKEND forces, or None (unset or empty)."""
    return os.environ.get(_FORCED_ENV) or None


def choose(backends: Sequence[Backend], *args) -> tuple[Backend, list[tuple[str, str]]]:
    forced = forced_backend()
    refused: list[tuple[str, str]] = []
    for b in backends:
        if forced and b.name != forced:
            refused.append((b.name, f"{_FORCED_ENV}={forced}"))
            continue
        why = b.check(*args)
        if why is None:
            return b, refused
        refused.append((b.name, why))
    reasons = "; ".join(f"{n}: {w}" for n, w in refused)
    raise RuntimeError(f"seqfuse: no backend can run this call ({reasons})")


def pick(backends: Sequence[Backend], *args) -> Backend:
    """``choose``'s backend without recording the refusals (the per-call path
    of the ops); the error, when no backend fits, is ``choose``'s."""
    forced = forced_backend()
    for b in backends:
        if (not forced or b.name == forced) and b.check(*args) is None:
            return b
    return choose(backends, *args)[0]


def explain(backends: Sequence[Backend], *args) -> str:
    """One line: which backend runs this call and why the others were refused."""
    b, refused = choose(backends, *args)
    others = ", ".join(f"{n} refused: {w}" for n, w in refused)
    return f"{b.name}" + (f" ({others})" if others else "")
