"""seqfuse: drop-in fused inference for fairseq and Hugging Face sequence models.

Public entry points:
- ``seqfuse.generation.SequenceGenerator``: fairseq's generator, same contract.
- ``seqfuse.fairseq_user_dir()``: the path to pass as ``--user-dir``.
- ``seqfuse.optimize(model)``: patch a Hugging Face model in place.
"""

from __future__ import annotations

import os

from seqfuse import _ext
from seqfuse.version import __version__

__all__ = ["__version__", "fairseq_user_dir", "optimize"]


def fairseq_user_dir() -> str:
    """Directory to give fairseq's ``--user-dir`` (the ``seqfuse_fairseq`` plugin)."""
    try:
        import seqfuse_fairseq  # installed beside seqfuse (plugins/seqfuse_fairseq)
    except ImportError:
        # Run from a checkout that was not installed: the plugin beside the package.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        here = os.path.join(root, "plugins", "seqfuse_fairseq")
        if os.path.isfile(os.path.join(here, "__init__.py")):
            return here
        raise
    return os.path.dirname(os.path.abspath(seqfuse_fairseq.__file__))


def optimize(model, **kwargs):
    """Patch a Hugging Face model in place so ``model.generate`` runs seqfuse's
    beam search: same tokens and scores as Hugging Face's, fused search step,
    exact one-call decoder step where the decoder allows.
    ``fused_layers=True`` also runs the linear layers on seqfuse's
    packed-weight GEMM (outputs within 1e-5 of stock's, not bit for bit).

    Returns the model. See ``integrations.hf`` for what is fused and what falls
    back (one warning line). ``integrations.hf.restore(model)`` undoes it.
    """
    from integrations.hf import optimize as _optimize

    return _optimize(model, **kwargs)


def extension_available() -> bool:
    return _ext._C is not None
