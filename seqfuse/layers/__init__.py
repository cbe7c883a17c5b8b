"""Fused encoder/decoder layers with the parameters of the layers they replace."""

from seqfuse.layers.fairseq import FusedTransformerDecoder, optimize_fairseq_model
from seqfuse.layers.transformer import FusedTransformerDecoderLayer, FusedTransformerEncoderLayer

__all__ = [
    "FusedTransformerDecoder",
    "FusedTransformerDecoderLayer",
    "FusedTransformerEncoderLayer",
    "optimize_fairseq_model",
]
