"""Search strategies independent of the layers that produce the logits."""

from seqfuse.generation.sequence_generator import (
    SequenceGenerator,
    SequenceGeneratorWithAlignment,
)

__all__ = ["SequenceGenerator", "SequenceGeneratorWithAlignment"]
