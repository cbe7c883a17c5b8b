"""Identify library code by the shape of its source.

seqfuse's exact one-call decoder steps re-issue, from C++, the tensor ops of
specific fairseq and transformers functions. They are enabled only when those
functions are the versions the steps were written and tested against;
``source_shape`` is how that is checked: a hash of the function's syntax tree
without docstring, comments, decorators, type annotations or formatting
(none of which changes what the function runs: a release that only retypes a
signature, as transformers 5.23 did over 5.17, keeps the shape).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap


def source_shape(fn) -> str:
    """A 16-hex-digit hash of ``fn``'s code (docstring, comments, decorators,
    name, the signature's type annotations and formatting ignored)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    f = tree.body[0]
    body = f.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            body = body[1:]
    f.body, f.decorator_list, f.name, f.returns = body, [], "forward", None
    a = f.args
    for arg in [*a.posonlyargs, *a.args, a.vararg, *a.kwonlyargs, a.kwarg]:
        if arg is not None:
            arg.annotation = None
    dump = ast.dump(f, annotate_fields=False, include_attributes=False)
    return hashlib.sha1(dump.encode()).hexdigest()[:16]


@functools.cache
def shape_of(fn) -> str | None:
    """``source_shape(fn)``, cached; None when the source is not available."""
    try:
        return source_shape(fn)
    except (OSError, TypeError, SyntaxError):
        return None
