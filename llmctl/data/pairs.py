"""The builtin held-out task: a function's signature -> the first line of its docstring.

Derived only from held-out (validation/test) documents, so eval reports BLEU on code the
model never trained on.
"""

from __future__ import annotations

import ast
import inspect
from typing import Iterator


def signature_docstring_pairs(source: str, max_per_doc: int = 8) -> Iterator[tuple[str, str]]:
    """(prompt, reference): prompt is the source from `def` up to the opening quotes."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    n = 0
    for node in ast.walk(tree):
        if n >= max_per_doc:
            return
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)):
            continue
        doc = inspect.cleandoc(first.value.value)
        ref = doc.splitlines()[0].strip() if doc.strip() else ""
        if len(ref) < 8 or first.lineno == node.lineno:  # one-line defs and trivial docs say little
            continue
        doc_line = lines[first.lineno - 1]
        col = first.col_offset
        quote = doc_line[col:col + 3] if doc_line[col:col + 3] in ('"""', "'''") else doc_line[col:col + 1]
        if doc_line[col:].lstrip("rRuUbB")[:1] not in ('"', "'"):
            continue
        prefix_len = len(doc_line[col:]) - len(doc_line[col:].lstrip("rRuUbB"))
        head = "".join(lines[node.lineno - 1 : first.lineno - 1])
        prompt = head + doc_line[: col + prefix_len + len(quote)]
        # The docstring must start on the quote line for the reference to follow the prompt.
        rest = doc_line[col + prefix_len + len(quote):].strip()
        if not rest or not ref.startswith(rest[: min(len(rest), 8)].strip()):
            continue
        n += 1
        yield prompt, ref
