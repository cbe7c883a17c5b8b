"""Console scripts: fairseq's command-line tools with the seqfuse plugin.

``seqfuse-generate``, ``seqfuse-interactive`` and ``seqfuse-train`` take exactly
the arguments of ``fairseq-generate``, ``fairseq-interactive`` and
``fairseq-train``; they add ``--user-dir <seqfuse_fairseq>``. When the command
line already names a ``--user-dir`` (fairseq takes one), that one is kept and
the seqfuse plugin is imported beside it. One option of their own:
``--fused-layers`` (removed before fairseq parses the command line) runs the
fused layers, as ``SEQFUSE_FUSED_LAYERS=1`` does: faster, scores within 1e-5
of stock's rather than bit for bit. ``seqfuse-bleu`` runs ``seqfuse.bleu:main``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from seqfuse._ext import FUSED_LAYERS_ENV


def _has_user_dir(argv: Sequence[str]) -> bool:
    return any(a == "--user-dir" or a.startswith("--user-dir=") for a in argv)


def with_user_dir(argv: Sequence[str]) -> list[str]:
    """``argv`` with the seqfuse plugin as ``--user-dir`` unless one is given."""
    argv = list(argv)
    if _has_user_dir(argv):
        import seqfuse_fairseq  # noqa: F401  (registers and hooks on import)

        return argv
    from seqfuse import fairseq_user_dir

    return ["--user-dir", fairseq_user_dir(), *argv]


FUSED_FLAG = "--fused-layers"


def split_fused_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--fused-layers``, and whether it was there."""
    rest = [a for a in argv if a != FUSED_FLAG]
    return rest, len(rest) != len(argv)


def _run_fairseq(module: str, argv: Sequence[str] | None) -> None:
    argv, fused = split_fused_flag(sys.argv[1:] if argv is None else argv)
    argv = with_user_dir(argv)
    saved, saved_env = sys.argv, os.environ.get(FUSED_LAYERS_ENV)
    sys.argv = [saved[0] if saved else module, *argv]
    if fused:
        os.environ[FUSED_LAYERS_ENV] = "1"
    try:
        importlib.import_module(module).cli_main()
    finally:
        sys.argv = saved
        if fused:
            if saved_env is None:
                os.environ.pop(FUSED_LAYERS_ENV, None)
            else:
                os.environ[FUSED_LAYERS_ENV] = saved_env


def generate(argv: Sequence[str] | None = None) -> None:
    """``fairseq-generate`` with seqfuse."""
    _run_fairseq("fairseq_cli.generate", argv)


def interactive(argv: Sequence[str] | None = None) -> None:
    """``fairseq-interactive`` with seqfuse."""
    _run_fairseq("fairseq_cli.interactive", argv)


def train(argv: Sequence[str] | None = None) -> None:
    """``fairseq-train`` with seqfuse."""
    _run_fairseq("fairseq_cli.train", argv)


def bleu(argv: Sequence[str] | None = None):
    """``seqfuse-bleu``: see ``seqfuse.bleu``."""
    from seqfuse.bleu import main

    return main(argv)
