"""What every section of the report uses: reading run files that may be missing or cut short,
tables, the "nothing here" notice, and tokens coloured by surprisal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Iterable

# Surprisal (-log p, nats) colours run from white at 0 to the full colour at SURPRISAL_MAX and
# beyond: one fixed scale for every section, so the same colour means the same surprise.
SURPRISAL_MAX = 8.0
_HOT = (227, 74, 51)  # ColorBrewer OrRd's dark end: dark text stays readable on it
_WHITE = (255, 255, 255)
_VISIBLE = {" ": "\u00b7", "\n": "\u21b5\n", "\t": "\u21e5"}


@dataclass
class Section:
    key: str  # the anchor and data-section of the page
    title: str
    body: str  # HTML; "" when the run has nothing for this section
    missing: str = ""  # why the section is empty and the command that fills it


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a kill is skipped."""
    out: list[dict] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
                if limit is not None and len(out) >= limit:
                    break
    except OSError:
        return []
    return out


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: Iterable[dict], cols: list[str], headers: list[str] | None = None, cls: str = "") -> str:
    rows = list(rows)
    if not rows:
        return ""
    head = "".join(f"<th>{escape(h)}</th>" for h in (headers or cols))
    body = "".join("<tr>" + "".join(f"<td>{r[c] if isinstance(r.get(c), Raw) else escape(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """A table cell that is already HTML."""


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = [f"<tr><th>{escape(k)}</th><td>{v if isinstance(v, Raw) else escape(fmt(v))}</td></tr>" for k, v in pairs if v is not None]
    return f'<table class="kv">{"".join(rows)}</table>' if rows else ""


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def surprisal_colour(nats: float | None) -> str:
    if nats is None or nats != nats:
        return "#f4f4f4"  # not scored (a prompt token, padding)
    x = min(max(nats / SURPRISAL_MAX, 0.0), 1.0)
    return _hex(tuple(round(w + x * (h - w)) for w, h in zip(_WHITE, _HOT)))


def visible(token: str) -> str:
    return "".join(_VISIBLE.get(c, c) for c in token)


def token_spans(tokens: Iterable[tuple[str, float | None, str]]) -> str:
    """(text, surprisal in nats or None, tooltip) per token, as coloured spans in a <pre>."""
    out = []
    for text, nats, tip in tokens:
        out.append(f'<span class="tok" style="background:{surprisal_colour(nats)}" title="{escape(tip)}">{escape(visible(text))}</span>')
    return f'<pre class="tokens">{"".join(out)}</pre>'


def surprisal_legend() -> str:
    stops = ",".join(surprisal_colour(SURPRISAL_MAX * i / 4) for i in range(5))
    return (f'<div class="legend">surprisal (&minus;log p, nats): 0 <span class="scale" style="background:linear-gradient(to right,{stops})"></span> '
            f'{SURPRISAL_MAX:g}+ &nbsp; grey: not scored; hover a token for its numbers; \u00b7 space, \u21b5 newline, \u21e5 tab</div>')
