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
    import seqfuse_fairseq  # installed beside seqfuse (plugins/seqfuse_fairseq)

    return os.path.dirname(os.path.abspath(seqfuse_fairseq.__file__))


def optimize(model, **kwargs):
    """Patch a Hugging Face model so ``model.generate`` runs seqfuse's search.

    Not available in this version: raises NotImplementedError (the model is
    left untouched) rather than patching anything approximately.
    """
    try:
        from integrations.hf import optimize as _optimize
    except ModuleNotFoundError as err:
        if err.name not in ("integrations", "integrations.hf"):
            raise
        raise NotImplementedError(
            "seqfuse.optimize: the Hugging Face integration is not part of this version; "
            "the model was left unchanged"
        ) from None
    return _optimize(model, **kwargs)


def extension_available() -> bool:
    return _ext._C is not None
