"""`llmctl report CONFIG|RUN`: RUN/report.html from a real tiny run (`llmctl run`, then
`llmctl explain`), checked as text and in a real browser (charts drawn with one point per
logged step, no console error, no request beyond the file itself); bad input is one line and
its exit code."""

from __future__ import annotations

import json
import re

import pytest

from browser_util import Browser, needs_browser, screenshot
from conftest import invoke_cli, write_config
from llmctl.rundir import RunDir

TINY = {
    "run": {"name": "rep", "seed": 1},
    "data": {"source": "builtin", "max_bytes": 100_000, "block_size": 32, "validation_fraction": 0.2},
    "tokenizer": {"vocab_size": 400},
    "model": {"n_layers": 1, "n_heads": 2, "hidden_size": 32, "context_length": 64},
    "train": {"max_steps": 12, "eval_every": 4, "save_every": 12, "log_every": 1, "micro_batch_size": 4, "warmup_steps": 2},
    "eval": {"max_examples": 4, "max_new_tokens": 4, "compare_init": True, "hardest": 5, "thresholds": {"perplexity_max": 1.0e9}},
    "generate": {"prompts": ["def main():"], "max_new_tokens": 6, "logprobs": 3},
    "export": {"formats": ["hf"], "report_max_tokens": 64, "report_decode_tokens": 0},
}
MAX_BYTES = 2_000_000  # the budget for the quickstart's page


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    d = json.loads(json.dumps(TINY))
    d["run"]["dir"] = str(tmp / "run")
    path = write_config(tmp / "c.yaml", d)
    r = invoke_cli("run", str(path), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    e = invoke_cli("explain", str(path), "-p", "def main():", "-q")
    assert e.returncode == 0, e.stderr[-2000:]
    return path, RunDir(tmp / "run"), out


def _metrics(rd):
    recs = [json.loads(line) for line in rd.metrics_path.read_text().splitlines()]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


def test_run_writes_the_report_and_report_rewrites_it(run):
    path, rd, out = run
    assert out["report"] == str(rd.report_html_path) and rd.report_html_path.is_file()  # `llmctl run` ends with it
    r = invoke_cli("report", str(rd.root), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["sections"] == ["data", "training", "eval", "samples", "export", "explain", "lineage"] and res["empty_sections"] == {}
    page = rd.report_html_path.read_text()
    assert res["bytes"] == len(page.encode()) < MAX_BYTES
    # self-contained: nothing to fetch (the SVG namespace is a name, not a request)
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|url\(|@import", page)
    assert set(re.findall(r"https?://[^\"' )]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert not list(rd.root.glob(".report.html*"))  # the atomic write left no temporary behind


def test_report_holds_the_run_numbers(run):
    path, rd, _ = run
    page = rd.report_html_path.read_text()
    train, val = _metrics(rd)
    loss = re.search(r'data-chart="loss-step".*?</svg>', page, re.S).group(0)
    assert re.search(rf'data-series="train loss" data-points="{len(train)}"', loss)
    assert re.search(rf'data-series="validation loss" data-points="{len(val)}"', loss)
    head = rd.manifest("eval")["headline"]
    assert f"{head['perplexity']:,.4g}" in page and f"{head['init_perplexity']:,.4g}" in page
    assert '<span class="pass">pass</span>' in page  # perplexity_max 1e9 is met
    # samples: the generated tokens, each with its top alternatives on hover
    rec = json.loads(rd.outputs_path.read_text().splitlines()[0])
    first = rec["logprobs"][0]
    assert "alternatives: " + repr(first["top"][0]["token"]) in page.replace("&#x27;", "'")
    assert 'data-label="supports"' in page  # the explain section's signed legend
    assert rd.manifest("train")["id"][:12] in page and rd.manifest("prepare")["config_hash"] in page


def test_data_and_export_charts_hold_every_row(run):
    _, rd, _ = run
    page = rd.report_html_path.read_text()
    report = json.loads(rd.report_path.read_text())
    steps = [s for info in report["splits"].values() for s in info["steps"]]
    curation = re.search(r'data-chart="curation".*?</svg>', page, re.S).group(0)
    assert curation.count('<g class="bar"') == len(steps) and steps
    rows = [r for r in rd.manifest("export")["report"]["rows"] if r.get("ppl_delta_pct") is not None]
    deltas = re.search(r'data-chart="export-ppl".*?</svg>', page, re.S).group(0)
    assert [m for m in re.findall(r'data-label="([^"]+)"', deltas)] == [r["name"] for r in rows] and rows


def test_time_plan_and_resumes_are_marked(tmp_path):
    """metrics.jsonl as train writes it: a time-fitted plan that moved twice, and a second
    process (the clock starts again) that resumed from step 6."""
    from llmctl.report.training import training_section

    rd = RunDir(tmp_path / "run")
    rd.metrics_path.parent.mkdir(parents=True)
    recs = [{"step": 0, "elapsed_s": 1.0, "val_loss": 6.0}]
    plan = {2: 100, 4: 100, 6: 80, 8: 80, 10: 90, 12: 90}
    for step in (2, 4, 6):
        recs.append({"step": step, "elapsed_s": step * 1.0, "loss": 6 - step / 10, "lr": 1e-3, "grad_norm": 1.0, "tokens": step * 64,
                     "tokens_per_s": 64.0, "planned_steps": plan[step]})
    for step in (8, 10, 12):  # a new process: elapsed_s counts from its own start
        recs.append({"step": step, "elapsed_s": (step - 6) * 1.0, "loss": 6 - step / 10, "lr": 1e-3, "grad_norm": 1.0,
                     "tokens": step * 64, "tokens_per_s": 64.0, "planned_steps": plan[step]})
    rd.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    body = training_section(rd).body
    marks = re.findall(r'data-marker="([^"]+)"', body)
    assert [m for m in marks if "plan" in m] == ["plan at step 2: end at step 100", "re-plan at step 6: end at step 80",
                                                 "re-plan at step 10: end at step 90"]
    assert marks.count("resumed at step 8") == 2  # on the loss chart and the throughput chart
    assert "2 (resumed at step 8)" in body
    assert 'data-series="train loss" data-points="6"' in body


def test_report_of_a_config_uses_its_thresholds(run):
    path, rd, _ = run
    r = invoke_cli("report", str(path), "--set", "eval.thresholds.perplexity_max=1.5")
    assert r.returncode == 0, r.stderr
    page = rd.report_html_path.read_text()
    assert '<span class="fail">FAIL</span>' in page and "&lt;= 1.5 (eval.thresholds.perplexity_max)" in page


def test_bad_input_is_one_line_and_its_exit_code(tmp_path, run):
    r = invoke_cli("report", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such run directory" in r.stderr and "Traceback" not in r.stderr
    r = invoke_cli("report", str(run[1].root), "--set", "eval.thresholds.perplexity_max=1")
    assert r.returncode == 2 and "--set applies to a CONFIG" in r.stderr
    (tmp_path / "empty").mkdir()
    r = invoke_cli("report", str(tmp_path / "empty"), "--json")
    assert r.returncode == 3 and "holds no stage output" in json.loads(r.stdout)["error"] and "Traceback" not in r.stderr
    assert not (tmp_path / "empty" / "report.html").exists()
    # a run with only prepare: every later section is marked empty and names its command
    import shutil

    _, rd, _ = run
    part = tmp_path / "part"
    shutil.copytree(rd.stage_dir("prepare"), part / "prepare")
    r = invoke_cli("report", str(part), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["sections"] == ["data", "lineage"]
    assert "llmctl train CONFIG" in res["empty_sections"]["training"] and "llmctl eval CONFIG" in res["empty_sections"]["eval"]
    page = (part / "report.html").read_text()
    assert page.count('data-empty="1"') == 5


@needs_browser
def test_report_renders_in_a_browser(run):
    _, rd, _ = run
    train, val = _metrics(rd)
    b = Browser()
    try:
        with b.page() as (page, log):
            url = rd.report_html_path.resolve().as_uri()
            page.goto(url)
            page.wait_for_load_state("load")
            count = "(sel) => { const p = document.querySelector(sel); return p ? p.points.numberOfItems : -1 }"
            for chart in ("loss-step", "loss-tokens"):
                base = f'svg[data-chart="{chart}"] g[data-series="train loss"] polyline'
                assert page.evaluate(count, base) == len(train), chart
                assert page.locator(f'svg[data-chart="{chart}"] g[data-series="validation loss"] circle').count() == len(val)
            assert page.evaluate(count, 'svg[data-chart="loss-step"] g[data-series="learning rate"] polyline') == len(train)
            box = page.locator('svg[data-chart="loss-step"] g[data-series="train loss"] polyline').bounding_box()
            assert box["width"] > 200 and box["height"] > 20  # drawn, not collapsed
            assert page.locator("svg.chart").count() >= 8
            assert page.locator("#samples span.tok").count() == len(json.loads(rd.outputs_path.read_text().splitlines()[0])["logprobs"])
            assert log.urls() == [url]  # the file itself, nothing else
            log.assert_clean()
            screenshot(page, "report.png")
    finally:
        b.close()
