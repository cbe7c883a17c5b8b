"""Console scripts: fairseq's command-line tools with the seqfuse plugin.

``seqfuse-generate``, ``seqfuse-interactive`` and ``seqfuse-train`` take exactly
the arguments of ``fairseq-generate``, ``fairseq-interactive`` and
``fairseq-train``; they add ``--user-dir <seqfuse_fairseq>``. When the command
line already names a ``--user-dir`` (fairseq takes one), that one is kept and
the seqfuse plugin is imported beside it. ``seqfuse-bleu`` runs
``seqfuse.bleu:main``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence


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


def _run_fairseq(module: str, argv: Sequence[str] | None) -> None:
    argv = with_user_dir(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = [saved[0] if saved else module, *argv]
    try:
        importlib.import_module(module).cli_main()
    finally:
        sys.argv = saved


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
