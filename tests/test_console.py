"""Console output without a TTY: plain periodic lines, JSON results on stdout only."""

from __future__ import annotations

import json

from llmctl.console import Console


def test_plain_progress_lines_without_tty(capsys, monkeypatch):
    monkeypatch.setenv("LLMCTL_LOG_INTERVAL", "0")
    c = Console(force_tty=False)
    with c.progress("train", total=4, unit="steps") as p:
        for i in range(4):
            p.update(advance=1, loss=1.0 / (i + 1))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train:")]
    assert len(lines) >= 4
    assert "4/4 steps (100%)" in lines[-1] and "loss" in lines[-1]
    assert "\x1b[" not in err  # no cursor tricks or colours


def test_json_result_only_on_stdout(capsys):
    c = Console(json_mode=True, force_tty=False)
    c.info("hello")
    c.result({"a": 1, "b": {"c": 2.5}})
    out, err = capsys.readouterr()
    assert json.loads(out) == {"a": 1, "b": {"c": 2.5}}
    assert "hello" in err and "hello" not in out


def test_human_result_goes_to_stderr(capsys):
    Console(force_tty=False).result({"perplexity": 12.3456, "nested": {"x": 1}})
    out, err = capsys.readouterr()
    assert out == "" and "perplexity" in err and "nested.x" in err
