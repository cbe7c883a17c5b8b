"""fairseq ``--user-dir`` plugin: ``--user-dir plugins/seqfuse_fairseq``.

Thin on purpose: the code lives in ``seqfuse.fairseq_plugin``.
"""

from seqfuse.fairseq_plugin import install

install()
