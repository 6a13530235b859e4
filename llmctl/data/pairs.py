"""The builtin held-out task: complete a line of code from its first half and the lines before it.

The prompt is the preceding lines of a held-out file (up to `context_chars`) plus the line
as written up to the last space before its middle (`data =`, `return self.`...,
`for name in`); the reference is the rest of that line. This is line-level code completion
as CodeXGLUE poses it (the context may end mid-line): what a code model is for, a small
model learns it in minutes, and copying the prompt does poorly at it, so BLEU shows what
training bought.

Derived only from held-out (validation/test) documents, so eval reports BLEU on code the
model never trained on.
"""

from __future__ import annotations

import io
import tokenize
from typing import Iterator

def _code_lines(source: str) -> set[int]:
    """1-based numbers of lines that start a logical line of code with a name.

    Comments, docstring bodies and continuation lines are not code lines.
    """
    out: set[int] = set()
    new_logical = True
    try:
        for t in tokenize.generate_tokens(io.StringIO(source).readline):
            if t.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                new_logical = True
                continue
            if t.type in (tokenize.NL, tokenize.COMMENT, tokenize.ENCODING):
                continue
            if new_logical and t.type == tokenize.NAME:
                out.add(t.start[0])
            new_logical = False
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return set()
    return out


def next_line_pairs(source: str, max_per_doc: int = 8, context_chars: int = 400, min_rest: int = 8) -> Iterator[tuple[str, str]]:
    """(prompt, reference) for up to `max_per_doc` lines spread evenly over the file."""
    lines = source.splitlines(keepends=True)
    candidates = []
    for n in sorted(_code_lines(source)):
        i = n - 1
        if i < 3 or i >= len(lines):  # some context before the line
            continue
        line = lines[i].rstrip("\r\n")
        body = line.lstrip()
        cut = body.rfind(" ", 0, len(body) // 2 + 1)  # the first half, ending at a word boundary
        if cut <= 0:
            continue
        rest = body[cut:].strip()
        if len(rest) < min_rest or rest.endswith("\\"):
            continue
        candidates.append((i, line[: len(line) - len(body) + cut], rest))
    if not candidates:
        return
    step = max(1, len(candidates) // max_per_doc)
    for i, head, rest in candidates[::step][:max_per_doc]:
        ctx, k = "", i
        while k > 0 and len(ctx) + len(lines[k - 1]) <= context_chars:
            k -= 1
            ctx = lines[k] + ctx
        if not ctx.strip():
            continue
        yield ctx + head, rest
