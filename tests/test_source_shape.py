"""seqfuse.source_shape: what identifies library code the exact steps mirror.

Docstrings, comments, decorators, the name, formatting and the signature's
type annotations do not change a function's shape (a release that only
retypes a signature keeps its steps); any change to what the function runs
(an operation, a default, an argument) does.
"""

from __future__ import annotations

import functools

import torch

from seqfuse.source_shape import source_shape


def base(self, x, scale=2.0, *rest, bias=None, **kw):
    y = x * scale
    if bias is not None:
        y = y + bias
    return y


@functools.cache
def annotated(
    self: object,
    x: torch.Tensor,
    scale: float = 2.0,
    *rest: int,
    bias: torch.Tensor | None = None,
    **kw: dict,
) -> torch.Tensor:
    """A docstring."""
    y = x * scale  # a comment
    if bias is not None:
        y = y + bias
    return y


def other_op(self, x, scale=2.0, *rest, bias=None, **kw):
    y = x * scale
    if bias is not None:
        y = y - bias
    return y


def other_default(self, x, scale=3.0, *rest, bias=None, **kw):
    y = x * scale
    if bias is not None:
        y = y + bias
    return y


def other_argument(self, x, scale=2.0, *rest, bias=None, shift=None, **kw):
    y = x * scale
    if bias is not None:
        y = y + bias
    return y


def test_annotations_docstrings_comments_and_decorators_do_not_count():
    assert source_shape(annotated.__wrapped__) == source_shape(base)


def test_a_change_in_what_runs_changes_the_shape():
    shapes = {source_shape(f) for f in (base, other_op, other_default, other_argument)}
    assert len(shapes) == 4


def test_annotated_assignments_in_the_body_still_count():
    def typed(x):
        y: int = x + 1
        return y

    def untyped(x):
        y = x + 1
        return y

    # only the signature's annotations are dropped; the body is compared as is
    assert source_shape(typed) != source_shape(untyped)
