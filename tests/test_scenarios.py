"""The scenario matrix: every stage with default settings on every data format.

Each feature has its own tests; this tier finds where two of them meet and break. For each
format (text, prompt_completion, chat, and preference trained with DPO) one tiny run goes through prepare with default
curation, train, eval (with `--json` and a failing threshold), generate, explain, export with
its report, one served request and status, all through the real CLI in this process. Then
it checks what must agree across commands:

- prepare keeps the format's data (default curation deletes no short answers);
- eval's perplexity equals the export report's f32 perplexity;
- generate and serve give the same text for the same prompt, seed and sampling settings;
- status is complete after each stage, and nothing is stale at the end;
- `--json` prints one object on stdout whatever the exit code;
- a printed hint, run as printed, does what it says.
"""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest

from conftest import WORDS, sentences, tiny_config_dict, write_config

FORMATS = ("text", "prompt_completion", "chat", "preference")
PROMPT = "the quick brown"
# Sampling on, with every knob a user turns: generate and serve must agree token for token.
SAMPLING = {"do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 7, "max_new_tokens": 12}
N_RECORDS = 240


def _write_data(tmp: Path, fmt: str) -> tuple[Path, int]:
    """A data file of the format, shaped the way users' data is (short answers for turns)."""
    rng = random.Random(3)
    if fmt == "text":
        paras = [" ".join(sentences(4, seed=i)) for i in range(N_RECORDS)]
        path = tmp / "docs.txt"
        path.write_text("\n\n".join(paras) + "\n")
        return path, len(paras)
    rows = []
    for i, q in enumerate(sentences(N_RECORDS, seed=11, length=(2, 5))):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))  # short answers: "yes", "river stones"
        if fmt == "prompt_completion":
            rows.append({"prompt": f"{q} ({i})", "completion": " " + answer})
        elif fmt == "preference":  # short answers too; rejected is another plausible answer
            other = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            rows.append({"prompt": f"{q} ({i})", "chosen": " " + answer, "rejected": " " + other + " no"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": answer}]})
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(rows)


def _config(tmp: Path, fmt: str, data_path: Path) -> Path:
    train = {"method": "dpo"} if fmt == "preference" else {}
    d = tiny_config_dict(
        tmp / "run",
        data={"format": fmt, "paths": [str(data_path)], "block_size": 48},
        model={"context_length": 128},
        train=train,
        eval={"max_examples": 6, "max_new_tokens": 6},
        generate={**SAMPLING, "prompts": [PROMPT]},
        export={"formats": ["hf"], "report": True, "report_decode_tokens": 0},
    )
    del d["data"]["curate"]  # default curation: what a user gets
    return write_config(tmp / f"{fmt}.yaml", d)


def cli(*args: str):
    """`llmctl ARGS` in this process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from llmctl.cli import app

    r = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def one_json(out: str) -> dict:
    """stdout under --json: exactly one JSON object."""
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1, f"--json printed {len(lines)} lines on stdout: {out!r}"
    return json.loads(lines[0])


def states(cfg: Path) -> dict[str, str]:
    code, out, err = cli("status", str(cfg), "--json")
    assert code == 0, err
    return {r["stage"]: r["status"] for r in one_json(out)["stages"]}


class Scenario:
    """One format's run through every stage; each step's outputs kept for the invariant tests."""

    def __init__(self, tmp: Path, fmt: str):
        self.fmt = fmt
        self.data, self.n_records = _write_data(tmp, fmt)
        self.cfg = _config(tmp, fmt, self.data)
        self.run_dir = tmp / "run"
        self.steps: dict[str, tuple[int, str, str]] = {}
        self.states: dict[str, dict[str, str]] = {}

    def step(self, name: str, *args: str) -> tuple[int, str, str]:
        self.steps[name] = res = cli(*args)
        self.states[name] = states(self.cfg)
        return res

    def run(self) -> "Scenario":
        c = str(self.cfg)
        self.step("prepare", "prepare", c, "--json")
        self.step("train", "train", c, "--json")
        self.step("eval_gate", "eval", c, "--json", "--set", "eval.thresholds.perplexity_max=1.0001")
        self.step("eval", "eval", c, "--json")  # thresholds are checked on every run, the results are cached
        self.step("generate", "generate", c, "--json")
        self.step("explain", "explain", c, "-p", PROMPT, "--json", "-q")
        self.step("export", "export", c, "--json")
        return self

    def json(self, name: str) -> dict:
        code, out, err = self.steps[name]
        return one_json(out)


@pytest.fixture(scope="module", params=FORMATS)
def scenario(request, tmp_path_factory):
    return Scenario(tmp_path_factory.mktemp(request.param), request.param).run()


def test_every_stage_succeeds_and_status_is_complete_after_each(scenario):
    for name in ("prepare", "train", "eval", "generate", "explain", "export"):
        code, out, err = scenario.steps[name]
        assert code == 0, f"{scenario.fmt}: {name} exited {code}: {err[-2000:]}"
        res = one_json(out)
        assert res.get("ok", True) is True, res
    after = {"prepare": ["prepare"], "train": ["prepare", "train"], "eval": ["prepare", "train", "eval"],
             "generate": ["prepare", "train", "eval", "generate"], "export": ["prepare", "train", "eval", "generate", "export"]}
    for name, stages in after.items():
        got = scenario.states[name]
        assert all(got.get(s) == "complete" for s in stages), f"{scenario.fmt}: after {name}: {got}"


def test_default_curation_keeps_the_formats_data(scenario):
    from llmctl.rundir import RunDir

    report = json.loads(RunDir(scenario.run_dir).report_path.read_text())
    splits = report["splits"].values()
    kept, seen = sum(s["documents_after"] for s in splits), sum(s["documents_before"] for s in splits)
    assert kept >= 0.9 * seen, f"{scenario.fmt}: default curation kept {kept} of {seen}: {report}"


def test_a_failed_threshold_still_prints_the_metrics_as_json(scenario):
    code, out, err = scenario.steps["eval_gate"]
    assert code == 4, err
    res = one_json(out)
    assert res["ok"] is False and res["exit_code"] == 4 and res["error"], res
    assert res["perplexity"] > 1.0001
    assert [f["metric"] for f in res["failed_thresholds"]] == ["perplexity"], res
    assert res["perplexity"] == scenario.json("eval")["perplexity"]


def test_eval_perplexity_equals_the_export_reports_f32_perplexity(scenario):
    ppl = scenario.json("eval")["perplexity"]
    report = json.loads((scenario.run_dir / "export" / "manifest.json").read_text())["report"]
    f32 = next(r for r in report["rows"] if r["name"] == report["reference"])
    assert f32["perplexity"] == pytest.approx(ppl, rel=1e-4), (scenario.fmt, ppl, report)


def test_generate_and_serve_give_the_same_text_for_the_same_seed(scenario):
    from fastapi.testclient import TestClient

    from llmctl.config import load_config
    from llmctl.modeling import resolve_model_path
    from llmctl.rundir import RunDir
    from llmctl.server.app import create_app
    from llmctl.server.engine import Engine
    from llmctl.server.metrics import Metrics

    out = [json.loads(x) for x in (scenario.run_dir / "generate" / "outputs.jsonl").read_text().splitlines()]
    assert len(out) == 1 and PROMPT in out[0]["prompt"]
    cfg = load_config(scenario.cfg)
    path = resolve_model_path(None, RunDir(scenario.run_dir), cfg, "serve", prefer_export=True)
    engine = Engine(path, 4, 16, 0, Metrics(), device="cpu", threads=1)
    engine.start()
    assert engine.ready.wait(60), engine.error
    try:
        client = TestClient(create_app(engine, "m", 64, None, Metrics()))
        knobs = {k: SAMPLING[k] for k in ("temperature", "top_k", "top_p", "seed")} | {"max_tokens": SAMPLING["max_new_tokens"]}
        if scenario.fmt == "chat":  # generate sends a plain prompt on a chat run as a user turn
            r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": PROMPT}], **knobs})
            text = r.json()["choices"][0]["message"]["content"]
        else:
            r = client.post("/v1/completions", json={"model": "m", "prompt": PROMPT, **knobs})
            text = r.json()["choices"][0]["text"]
        assert r.status_code == 200, r.text
    finally:
        engine.stop()
    assert text == out[0]["output"], (scenario.fmt, text, out[0])


def test_nothing_is_stale_at_the_end_and_a_printed_hint_does_what_it_says(scenario, tmp_path):
    assert set(scenario.states["export"].values()) <= {"complete", "missing", "absent", "-"}, scenario.states["export"]
    if scenario.fmt != "text":
        return  # the hint's path is the same for every format
    # A stage whose input is missing names the command that makes it, with the user's flags.
    other = tmp_path / "other-run"
    code, out, err = cli("train", str(scenario.cfg), "--set", f"run.dir={other}", "--json")
    assert code == 3 and one_json(out)["exit_code"] == 3, (code, out, err)
    hint = re.search(r"'(llmctl [^\n]*?)'(?: first|$)", err, re.M)
    assert hint, err
    argv = shlex.split(hint.group(1))
    assert argv[:2] == ["llmctl", "prepare"], argv
    code, out, err = cli(*argv[1:])
    assert code == 0, err
    assert (other / "prepare" / "manifest.json").is_file()  # the hint prepared the run the user named
