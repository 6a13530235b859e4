"""The safety rails (llmctl.safety) at the HTTP boundary: prompts are checked before they are
tokenized, collected outputs before they leave, and streamed text passes through a guard."""

from __future__ import annotations

from llmctl.safety import CONTENT_FILTER, Blocked, Rails
from llmctl.server.engine import Job
from llmctl.server.schemas import ApiError


def checked_input(rails: Rails, text: str, rid: str, param: str) -> str:
    """The prompt text after the input rails; a block is a 400 naming the rail."""
    try:
        return rails.check_input(text, rid, param=param)
    except Blocked as b:
        raise ApiError(
            400, f"{param}: refused by the safety rail '{b.rail}' ({', '.join(b.kinds)})",
            param=param, code=CONTENT_FILTER, headers={"x-request-id": rid},
        ) from None


def checked_outputs(rails: Rails, results: list[tuple[str, str, list]], rid: str) -> list[tuple[str, str, bool, list | None]]:
    """(text, finish_reason, blocked, logprobs) per choice after the output rails. A choice
    whose text a rail changed keeps no logprobs: their tokens would show what was removed."""
    if not rails.active("output"):
        return [(t, r, False, lps) for t, r, lps in results]
    out = []
    for i, (raw, reason, lps) in enumerate(results):
        text, blocked = rails.check_output(raw, rid, choice=i)
        out.append((text, CONTENT_FILTER if blocked else reason, blocked, lps if text == raw else None))
    return out


def guards_for(rails: Rails, jobs: list[Job], rid: str) -> list | None:
    """One output guard per streamed choice, or None when no output rail is on."""
    return [rails.guard(rid, choice=i) for i in range(len(jobs))] if rails.active("output") else None
