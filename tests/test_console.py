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
    assert out == "" and "hello" in err  # the object is written once, by the error boundary, with the exit code
    c.emit_json(0)
    assert json.loads(capsys.readouterr().out) == {"ok": True, "exit_code": 0, "a": 1, "b": {"c": 2.5}}
    c.emit_json(4, error="thresholds not met", partial={"failed": ["x"]})
    assert json.loads(capsys.readouterr().out) == {"ok": False, "exit_code": 4, "error": "thresholds not met", "a": 1, "b": {"c": 2.5}, "failed": ["x"]}


def test_human_result_goes_to_stderr(capsys):
    Console(force_tty=False).result({"perplexity": 12.3456, "nested": {"x": 1}})
    out, err = capsys.readouterr()
    assert out == "" and "perplexity" in err and "nested.x" in err


def test_terminal_bar_learns_its_total_and_shows_an_eta(capsys):
    # train only learns max_steps from the Trainer, after the bar started
    c = Console(force_tty=True)
    with c.progress("train", total=None, unit="steps") as p:
        p.total = 100
        p.update(completed=0)
        p.update(completed=40, loss=2.5)
        task = p._bar.tasks[0]
        assert task.total == 100 and task.completed == 40
        assert "40/100" in p._bar.columns[2].render(task).plain  # MofN: the total is shown


def test_quiet_silences_warnings_too(capsys, monkeypatch):
    import logging
    import signal
    import warnings

    from llmctl.cli import _guard

    for var in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY"):  # restored after the test
        monkeypatch.setenv(var, "default" if var == "PYTHONWARNINGS" else "warning")
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    with _guard(quiet=True) as con:
        con.warn("a console warning")
        warnings.warn("a library warning", UserWarning)
        logging.getLogger("some.library").warning("a logged warning")
    logging.disable(logging.NOTSET)
    warnings.resetwarnings()
    assert capsys.readouterr().err == ""
