"""Terminal output that degrades to plain lines without a TTY.

All human output goes to stderr; stdout carries only results (`--json`: one JSON object,
whatever the exit code) and, for `generate`, the generated text. Stages call `current()` to
get the console the CLI configured.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.console import Console as _RichConsole
from rich.table import Table

_current: "Console | None" = None


def current() -> "Console":
    global _current
    if _current is None:
        _current = Console()
    return _current


def set_current(c: "Console") -> None:
    global _current
    _current = c


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def fmt_duration(s: float) -> str:
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:d}:{sec:02d}"


class Console:
    def __init__(self, json_mode: bool = False, quiet: bool = False, force_tty: bool | None = None):
        self.json_mode = json_mode
        self.quiet = quiet
        self._json: dict = {}  # the --json result, written once by `emit_json`
        self.err = _RichConsole(stderr=True, highlight=False, soft_wrap=True)
        self.is_tty = self.err.is_terminal if force_tty is None else force_tty
        if not self.is_tty:
            # No colours or cursor tricks in logs, CI and pipes.
            self.err = _RichConsole(stderr=True, highlight=False, soft_wrap=True, no_color=True, force_terminal=False)

    # ---- messages --------------------------------------------------------------
    def info(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(msg, markup=False)

    def step(self, msg: str) -> None:
        """A headline line for a stage's phase."""
        if not self.quiet:
            self.err.print(f"[bold]>[/bold] {msg}" if self.is_tty else f"> {msg}", markup=self.is_tty)

    def warn(self, msg: str) -> None:
        if self.quiet:
            return
        self.err.print(f"[yellow]warning:[/yellow] {msg}" if self.is_tty else f"warning: {msg}", markup=self.is_tty)

    def error(self, msg: str) -> None:
        text = f"[red]error:[/red] {_escape(msg)}" if self.is_tty else f"error: {msg}"
        self.err.print(text, markup=self.is_tty)

    # ---- progress --------------------------------------------------------------
    def progress(self, description: str, total: float | None = None, unit: str = "it") -> "Progress":
        return Progress(self, description, total, unit)

    # ---- results ---------------------------------------------------------------
    def result(self, data: dict, title: str | None = None) -> None:
        """The stage's result: kept for `emit_json` with --json, else a table on stderr."""
        if self.json_mode:
            self._json = dict(data)
            return
        if self.quiet:
            return
        table = Table(title=title, show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold" if self.is_tty else None)
        table.add_column()
        for k, v in _flatten(data).items():
            table.add_row(k, _fmt(v))
        self.err.print(table)

    def emit_json(self, exit_code: int, error: str | None = None, hint: str | None = None, partial: dict | None = None) -> None:
        """With --json, the one object on stdout: `ok`, `exit_code`, `error` and `hint` when the
        command failed, then the result (or, on failure, what it measured before failing)."""
        if not self.json_mode:
            return
        head: dict = {"ok": exit_code == 0, "exit_code": exit_code}
        if error is not None:
            head["error"] = error
        if hint is not None:
            head["hint"] = hint
        body = {k: v for k, v in {**self._json, **(partial or {})}.items() if k not in head}
        sys.stdout.write(json.dumps(head | body, default=str) + "\n")
        sys.stdout.flush()

    def table(self, rows: list[dict], columns: list[str], title: str | None = None) -> None:
        if self.quiet:
            return
        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for r in rows:
            table.add_row(*(_fmt(r.get(c, "")) for c in columns))
        self.err.print(table)


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def _flatten(d: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and len(v) > 8:
            out[key] = f"[{len(v)} items]"
        else:
            out[key] = v
    return out


class Progress:
    """A rich bar in a terminal; otherwise a plain line every `LLMCTL_LOG_INTERVAL` seconds."""

    def __init__(self, console: Console, description: str, total: float | None, unit: str):
        self.c = console
        self.description = description
        self._total = total
        self.unit = unit
        self.n = 0.0
        self.fields: dict[str, Any] = {}
        self.t0 = time.time()
        self.last = 0.0
        self.interval = float(os.environ.get("LLMCTL_LOG_INTERVAL", "10"))
        self._bar = None
        self._task = None

    @property
    def total(self) -> float | None:
        return self._total

    @total.setter
    def total(self, value: float | None) -> None:
        """Known only once work starts (train learns max_steps from the Trainer): the bar follows."""
        self._total = value
        if self._bar is not None:
            self._bar.update(self._task, total=value)

    def __enter__(self) -> "Progress":
        self.t0 = time.time()
        self.last = self.t0
        if self.c.is_tty and not self.c.quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress as RichProgress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.c.err,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def update(self, advance: float = 0, completed: float | None = None, **fields: Any) -> None:
        self.n = completed if completed is not None else self.n + advance
        self.fields.update(fields)
        if self._bar is not None:
            info = "  ".join(f"{k} {_fmt(v)}" for k, v in self.fields.items())
            self._bar.update(self._task, completed=self.n, info=info)
            return
        now = time.time()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def _line(self) -> None:
        if self.c.quiet:
            return
        elapsed = time.time() - self.t0
        parts = [f"{self.description}:"]
        if self.total:
            pct = 100.0 * self.n / self.total
            parts.append(f"{_fmt(self.n)}/{_fmt(self.total)} {self.unit} ({pct:.0f}%)")
            if self.n > 0:
                eta = elapsed * (self.total - self.n) / self.n
                parts.append(f"eta {fmt_duration(eta)}")
        else:
            parts.append(f"{_fmt(self.n)} {self.unit}")
        parts.append(f"elapsed {fmt_duration(elapsed)}")
        parts += [f"{k} {_fmt(v)}" for k, v in self.fields.items()]
        self.c.err.print("  ".join(parts), markup=False)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc[0] is None:
            self._line()
