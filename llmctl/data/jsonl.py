"""JSON Lines files that users hand to llmctl outside `data.sources` (prompt files, code tasks,
bias pairs): one parsed value per non-blank line, with its line number; a malformed line is a
DataError naming file:line. (`data.sources` reads its JSONL in `llmctl.data.sources`, which can
also skip bad lines under `data.on_error: skip`.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from llmctl.errors import DataError


def read_jsonl(path: Path | str) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of `path`."""
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}): fix the line") from None
