"""Stop strings: the one rule for where they cut the text, and how much text to hold back while
streaming (generate's results and its terminal stream, serve's engine, eval's generations).

The text ends before the earliest stop string; the stop string itself is never part of it.
While text streams, its tail that could still grow into a stop string (and half a multi-byte
character, which decodes as U+FFFD) waits until the next token settles it; at the end nothing
waits.
"""

from __future__ import annotations

from typing import Sequence


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Where the earliest stop string begins in `text` (searching from `start`), -1 when none."""
    return min((i for i in (text.find(s, start) for s in stops if s) if i != -1), default=-1)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    i = find_stop(text, stops)
    return (text, False) if i == -1 else (text[:i], True)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might start a stop string (not safe to send yet)."""
    hold = 1 if text.endswith("\ufffd") else 0  # half of a multi-byte character
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def release(text: str, stops: Sequence[str], seen: int = 0, final: bool = False) -> tuple[int, bool]:
    """(how many characters of a growing `text` may be sent now, whether a stop string ends it
    there). `seen`: how long the text was when last asked; a stop string can only end in the
    new text, so the search starts where one could begin. `final`: no more text comes."""
    longest = max((len(s) for s in stops), default=0)
    cut = find_stop(text, stops, max(0, seen - longest + 1))
    if cut != -1:
        return cut, True
    if final:
        return len(text), False
    return len(text) - held_back(text, stops), False
