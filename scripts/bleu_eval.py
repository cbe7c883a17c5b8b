"""Stock vs seqfuse fairseq translation: sacreBLEU, chrF, identical rate, speed.

Thin wrapper of ``seqfuse.bleu`` (also installed as ``seqfuse-bleu``); run with
``--help`` for the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seqfuse.bleu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
