"""Fused ops: each has a torch reference (also the fallback) and extension backends."""

from seqfuse.ops.beam_topk import beam_topk, beam_topk_reference

__all__ = ["beam_topk", "beam_topk_reference"]
