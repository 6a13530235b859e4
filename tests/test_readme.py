"""The README cannot drift: its config reference is the schema's, its quickstart runs."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO, invoke_cli
from llmctl.config import readme_with_reference

README = (REPO / "README.md").read_text()


def test_config_reference_is_generated_from_schema():
    assert readme_with_reference(README) == README, "run `make docs` to refresh the README's config reference"


def quickstart_commands() -> list[list[str]]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    cmds = [line.split() for b in blocks for line in b.splitlines() if line.startswith("llmctl ")]
    assert cmds, "the quickstart must show llmctl commands"
    return cmds


# A reduced budget for the test; everything else exactly as the README says.
SMALL = ["data.max_bytes=200000", "tokenizer.vocab_size=512", "model.n_layers=1", "model.hidden_size=32", "model.n_heads=2",
         "train.max_steps=4", "train.eval_every=2", "train.save_every=2", "train.max_time=null", "eval.max_examples=4",
         "eval.max_new_tokens=4", "generate.max_new_tokens=4", "export.gguf_types=[f32]"]


@pytest.mark.slow  # each command on tiny data: test_scenarios.py; quickstart.yaml validates: test_configs_dir.py; builtin data: test_pipeline.py
def test_readme_quickstart_runs_as_written(tmp_path):
    run_dir = tmp_path / "run"
    for cmd in quickstart_commands():
        verb = cmd[1]
        args = cmd[1:]
        if verb == "status":
            args = ["status", str(run_dir)]
        else:
            args = args + ["--run-dir", str(run_dir)] + [x for s in SMALL for x in ("--set", s)]
        r = invoke_cli(*args)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    r = invoke_cli("status", str(run_dir), "--json")
    stages = {s["stage"]: s["status"] for s in json.loads(r.stdout)["stages"]}
    assert stages == {s: "complete" for s in ("prepare", "train", "eval", "generate", "export")}


def _passages():
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import passages

    return passages


def test_measured_figures_are_generated_from_bench_results():
    passages = _passages()
    results = passages.load_results()
    for f in passages.FILES:
        text = (REPO / f).read_text()
        assert "<!-- bench:" in text, f
        assert passages.render(text, results) == text, f"{f}: run `python bench/passages.py` to refresh its measured figures"


# Times, rates, speed-ups, shares, sizes per item, and measured numbers in table cells.
FIGURE = re.compile(
    r"\d[\d.,]*\s*(?:min\b|minutes|seconds|requests/s|req/s|tokens/s|x (?:faster|slower))|\d+(?:\.\d+)?x\b"
    r"|\d[\d.,]*\s*(?:ms|MB/s)\b|\d[\d.,]* s\b|\d[\d.,]*\s?%|\d[\d.,]*\s*[KMG]B per\b"
    r"|\|\s*\d+\.\d+(?:\s*/\s*\d+\.\d+)*\s*(?:\([^|]*\))?\s*\|"
)


def _figures_outside_passages(text: str) -> list[str]:
    outside = re.sub(r"<!-- (bench:[\w-]+|config-reference):start -->.*?<!-- \1:end -->", "", text, flags=re.S)
    outside = re.sub(r"```.*?```", "", outside, flags=re.S)  # commands and examples, not measurements
    return [m.group(0) for m in FIGURE.finditer(outside)]


def test_no_measured_figure_outside_the_generated_passages():
    """A time, a rate, a share or a measured number typed by hand goes stale; only generated passages quote them."""
    passages = _passages()
    for f in passages.FILES:
        assert not _figures_outside_passages((REPO / f).read_text()), (f, _figures_outside_passages((REPO / f).read_text()))


def test_hand_typed_figures_are_caught():
    """The check above finds the kinds of figure that used to be typed by hand in README.md and docs/."""
    for typed in ["p50 **0.080 ms** with the default rails", "costs 4% of prepare's CPU time (1.0 s of 22.4 s)",
                  "measured: 2.6 KB per document", "| teacher (4 layers, 150 steps) | 338.3 |", "| KD | 332.0 / 331.0 / 331.0 |",
                  "Loading it costs about 4.5 s", "the scan ran at 25.2 MB/s"]:
        assert _figures_outside_passages(typed), typed
    assert _figures_outside_passages("<!-- bench:x:start -->\n1.0 s\n<!-- bench:x:end -->\n") == []
