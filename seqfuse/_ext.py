"""Loading of the compiled extension ``seqfuse._C``: optional, never JIT-built.

``import seqfuse`` works without it (one warning); every op then runs its torch
reference. ``status()`` says what is available and why not.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings

import torch

_C = None
_IMPORT_ERROR: str | None = None
_WARNED = False

try:
    from seqfuse import _C  # type: ignore[attr-defined,no-redef]
except Exception as e:  # ImportError, or an ABI mismatch (OSError / undefined symbol)
    _C = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def _warn_once() -> None:
    global _WARNED
    if not _WARNED and _IMPORT_ERROR is not None and os.environ.get("SEQFUSE_QUIET") != "1":
        _WARNED = True
        warnings.warn(
            "seqfuse: compiled extension seqfuse._C not available "
            f"({_IMPORT_ERROR}); using torch reference kernels (build it with `make install`).",
            RuntimeWarning,
            stacklevel=3,
        )


def build_info() -> str:
    return _C.build_info() if _C is not None else ""


def cpu_available() -> tuple[bool, str]:
    """Whether the C++ CPU kernels can run, and why not."""
    if _C is None:
        return False, f"extension not importable ({_IMPORT_ERROR})"
    return True, "ok"


def cuda_available() -> tuple[bool, str]:
    """Whether the CUDA kernels can run, and why not."""
    if _C is None:
        return False, f"extension not importable ({_IMPORT_ERROR})"
    if "cuda" not in build_info():
        return False, "extension built without CUDA (no CUDA torch or nvcc at build time)"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, "ok"


# Switches read by both integrations (fairseq plugin, Hugging Face optimize).
DISABLE_ENV = "SEQFUSE_DISABLE"  # every seqfuse path off (stock behaviour)
FUSED_LAYERS_ENV = "SEQFUSE_FUSED_LAYERS"  # the fused layers (within 1e-5, opt-in)
EXACT_STEP_ENV = "SEQFUSE_EXACT_STEP"  # the exact one-call decoder step (on by default)
GC_PAUSE_ENV = "SEQFUSE_GC_PAUSE"  # Python's cyclic collector paused in a search (on by default)


def env_flag(name: str, default: bool) -> bool:
    """An on/off environment switch: unset -> ``default``; empty or "0" -> off."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip() not in ("", "0")


def disabled() -> bool:
    """SEQFUSE_DISABLE=1 turns every seqfuse path off (stock behaviour)."""
    return env_flag(DISABLE_ENV, False)


if _C is None:
    _warn_once()


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused for the block, then restored.

    A search creates a few dozen short-lived tensor objects per step (views,
    index tensors, hypothesis dicts); each few hundred allocations start a
    collection, and the occasional full one walks every object the process
    holds (the model's modules, the imported libraries): at batch 64 on the
    Multi30k model that was about 4% of a search, spent in the main thread
    while the other threads wait. Tensors are freed by reference counting
    whatever the collector does; cycles made during the block are collected at
    the next collection after it. A collector already off stays off;
    SEQFUSE_GC_PAUSE=0 leaves it alone.
    """
    pause = gc.isenabled() and env_flag(GC_PAUSE_ENV, True)
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if pause:
            gc.enable()
