"""The command-line contract (DESIGN.md): one JSON object on stdout whatever the exit code,
and hints that, run as printed, do what they say."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import REPO, build_prepared_run, invoke_cli, sentences, tiny_config_dict, write_config
from llmctl.config import load_config
from llmctl.rundir import RunDir

ENV = {"PYTHONPATH": str(REPO)}  # the commands below run outside the repository


def _one_object(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def _argv(hint: str) -> list[str]:
    """A printed hint as the argv that runs it here (`llmctl` is `python -m llmctl`)."""
    args = shlex.split(hint)
    assert args[0] == "llmctl", hint
    return [sys.executable, "-m", "llmctl", *args[1:]]


def test_json_object_for_config_missing_input_and_lock_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    r = invoke_cli("prepare", str(bad), "--json")
    obj = _one_object(r.stdout)
    assert r.returncode == 2 and obj["ok"] is False and obj["exit_code"] == 2 and "train.max_stepz" in obj["error"]
    assert obj["error"] in r.stderr  # the human line stays on stderr
    for args in (("eval", "--json"), ("eval", str(bad), "--bogus", "--json")):  # command-line mistakes, found by the parser
        r = invoke_cli(*args)
        obj = _one_object(r.stdout)
        assert r.returncode == 2 and obj["exit_code"] == 2 and obj["error"] in ("Missing argument 'CONFIG'.", "No such option: --bogus")
        assert "Usage: llmctl eval" in r.stderr

    (tmp_path / "docs.txt").write_text("\n\n".join(sentences(40)))
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", data={"paths": [str(tmp_path / "docs.txt")]}))
    r = invoke_cli("eval", str(path), "--json")
    obj = _one_object(r.stdout)
    assert r.returncode == 3 and obj == {"ok": False, "exit_code": 3, "error": obj["error"], "hint": f"llmctl train {path}"}

    lock_dir = tmp_path / "run" / "prepare"
    lock_dir.mkdir(parents=True)
    with FileLock(lock_dir / ".lock"):  # another writer holds the stage
        r = invoke_cli("prepare", str(path), "--json")
    obj = _one_object(r.stdout)
    assert r.returncode == 1 and obj["exit_code"] == 1 and "locked" in obj["error"]

    r = invoke_cli("status", str(tmp_path / "nope"), "--json")
    assert r.returncode == 2 and _one_object(r.stdout)["exit_code"] == 2
    r = invoke_cli("config", "show", str(path), "--json")
    obj = _one_object(r.stdout)
    assert r.returncode == 0 and obj["ok"] is True and obj["exit_code"] == 0 and obj["train"]["max_steps"] == 4


def test_eval_threshold_failure_keeps_the_metrics_in_json(trained_run):
    path, cfg, rd = trained_run
    args = ("eval", str(path), "--set", "eval.thresholds.perplexity_max=1.5", "--set", "eval.generation=false", "--json")
    for cached in (False, True):
        r = invoke_cli(*args)
        assert r.returncode == 4, r.stderr
        obj = _one_object(r.stdout)
        assert obj["ok"] is False and obj["exit_code"] == 4 and "perplexity_max" in obj["error"]
        assert obj["perplexity"] > 1.5 and obj.get("cached", False) is cached
        (failed,) = obj["failed_thresholds"]
        assert failed["threshold"] == "eval.thresholds.perplexity_max" and failed["limit"] == 1.5
        assert failed["metric"] == "perplexity" and failed["value"] == obj["perplexity"]


def test_run_json_names_the_stage_that_failed(tiny_cfg):
    from llmctl.errors import ThresholdError
    from llmctl.pipeline import run_pipeline

    _, cfg = tiny_cfg

    class Done:
        @staticmethod
        def run(cfg, rd, force):
            return {"cached": True}

    class Gate:
        @staticmethod
        def run(cfg, rd, force):
            raise ThresholdError("eval thresholds not met", result={"perplexity": 9.0})

    with pytest.raises(ThresholdError) as e:
        run_pipeline(cfg, RunDir(cfg.run.dir), {"prepare": Done, "eval": Gate}.get, ("prepare", "eval"))
    assert e.value.result == {"perplexity": 9.0, "failed_stage": "eval", "ran": [], "skipped_up_to_date": ["prepare"]}


def _wait_for_loss(rd: RunDir, after_step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if rd.metrics_path.is_file():
            steps = [json.loads(line)["step"] for line in rd.metrics_path.read_text().splitlines() if '"loss"' in line]
            if any(s > after_step for s in steps):
                return
        time.sleep(0.1)
    raise AssertionError(f"no training step after {after_step}")


def test_interrupted_train_hint_resumes_without_force(tmp_path):
    d = tiny_config_dict(tmp_path / "run", train={"max_steps": 100000, "save_every": 100000, "eval_every": 100000, "log_every": 1})
    (tmp_path / "my configs").mkdir()
    path = write_config(tmp_path / "my configs" / "c.yaml", d)  # a space: the hint must quote it
    cfg = load_config(path, ["train.lr=0.001"])
    rd = build_prepared_run(Path(cfg.run.dir), cfg)
    cmd = [sys.executable, "-m", "llmctl", "train", str(path), "--force", "--set", "train.lr=0.001", "--json"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_loss(rd, 0, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    obj = _one_object(out)
    assert obj["ok"] is False and obj["exit_code"] == 130 and "SIGINT" in obj["error"]
    hint, step = obj["hint"], obj["step"]
    assert f"run '{hint}' to resume from step {step}" in err and step >= 1
    # The hint keeps the --set that the checkpoint was written with (or it could not resume) and
    # drops --force (which would delete the checkpoint); the path with a space is quoted.
    assert "--force" not in shlex.split(hint) and shlex.split(hint)[2:] == [str(path), "--set", "train.lr=0.001"]
    # status: the step it stopped at, of its total; complete and up to date for everything else
    r = invoke_cli("status", str(rd.root), "--json")
    rows = {row["stage"]: row for row in _one_object(r.stdout)["stages"]}
    assert rows["train"]["status"] == "interrupted" and (rows["train"]["step"], rows["train"]["total_steps"]) == (step, 100000)
    assert rows["train"]["why"] == f"interrupted at step {step}/100000" and rows["prepare"]["status"] == "complete"
    r = invoke_cli("status", str(rd.root), env={"COLUMNS": "200"})  # the table's "headline" column, unwrapped
    assert f"(interrupted at step {step}/100000)" in r.stderr, r.stderr

    proc = subprocess.Popen(_argv(hint), cwd=tmp_path, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_loss(rd, step, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"step-{step:06d} (step {step})" in err and "resuming from" in err
    logged = [json.loads(line)["step"] for line in rd.metrics_path.read_text().splitlines() if '"loss"' in line]
    assert logged[0] == 1 and step + 1 in logged  # the first run's records kept, and it went on from its step


def test_missing_and_stale_input_hints_keep_set_flags(tmp_path):
    (tmp_path / "docs.txt").write_text("\n\n".join(sentences(60)))
    d = tiny_config_dict(tmp_path / "unused", data={"paths": [str(tmp_path / "docs.txt")]})
    del d["run"]["dir"]  # runs/<run.name> under the working directory
    path = write_config(tmp_path / "c.yaml", d)

    def run(*args):  # `python -m llmctl ARGS` in tmp_path, in this process
        assert args[:3] == (sys.executable, "-m", "llmctl"), args
        return invoke_cli(*args[3:], cwd=tmp_path)

    sets = ["--set", "run.name=x"]
    r = run(sys.executable, "-m", "llmctl", "train", str(path), *sets, "--json")
    assert r.returncode == 3, r.stderr
    hint = _one_object(r.stdout)["hint"]
    assert f"run '{hint}' first" in r.stderr and shlex.split(hint) == ["llmctl", "prepare", str(path), *sets]
    r = run(*_argv(hint))
    assert r.returncode == 0, r.stderr
    rd = RunDir(tmp_path / "runs" / "x")  # the run the user named, not runs/t
    assert rd.manifest("prepare")["status"] == "complete" and not (tmp_path / "runs" / "t").exists()

    sets += ["--set", "data.block_size=16"]  # prepare is now stale for this command
    r = run(sys.executable, "-m", "llmctl", "train", str(path), *sets, "--json")
    assert r.returncode == 3, r.stderr
    hint = _one_object(r.stdout)["hint"]
    assert shlex.split(hint) == ["llmctl", "prepare", str(path), *sets, "--force"]
    r = run(*_argv(hint))
    assert r.returncode == 0, r.stderr
    assert rd.require("prepare", load_config(path, [sets[1], sets[3]]))["status"] == "complete"


def test_hint_commands_quote_and_give_values_back_exactly(tmp_path):
    from llmctl.hints import command, set_flags

    path = write_config(tmp_path / "a b.yaml", tiny_config_dict(tmp_path / "run"))
    cfg = load_config(path, ["run.seed=3", "data.text_field=my field"])
    assert shlex.split(command("train", cfg, tmp_path / "other run", "--force")) == [
        "llmctl", "train", str(path), "--set", "run.seed=3", "--set", "data.text_field=my field", "--run-dir", str(tmp_path / "other run"), "--force"]
    assert "--run-dir" not in command("train", cfg, cfg.run.dir)  # the config's own run directory
    # Values as YAML reads them back: a string that looks like a number, null or a list stays itself.
    pairs = [("data.text_field", "1e-3"), ("data.prompt_field", "null"), ("data.paths", ["x y.txt", "z.txt"]), ("train.lr", 0.0003)]
    back = load_config(path, shlex.split(set_flags(pairs))[1::2])
    assert (back.data.text_field, back.data.prompt_field, back.data.paths, back.train.lr) == ("1e-3", "null", ["x y.txt", "z.txt"], 0.0003)


def test_status_compares_each_stage_with_its_own_config(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run"))
    cfg = load_config(path)
    rd = RunDir(tmp_path / "run")
    with rd.begin("prepare", cfg):
        pass
    with rd.begin("train", load_config(path, ["train.lr=0.001"]), inputs=["prepare"]):  # llmctl train c.yaml --set train.lr=0.001
        pass

    def rows(*args):
        r = invoke_cli("status", *args, "--json")
        assert r.returncode == 0, r.stderr
        return {row["stage"]: row for row in _one_object(r.stdout)["stages"]}

    assert rows(str(rd.root))["train"]["status"] == "complete" and "why" not in rows(str(rd.root))["train"]
    assert rows(str(path))["train"]["status"] == "stale"  # a config given: compared with that config
    assert rows(str(path), "--set", "train.lr=0.001")["train"]["status"] == "complete"
    with rd.begin("prepare", cfg):  # its input re-run since: stale, whatever it recorded
        pass
    train = rows(str(rd.root))["train"]
    assert train["status"] == "stale" and "re-run" in train["why"]


def test_status_of_a_killed_train_says_where_it_resumes(tmp_path):
    from llmctl.rundir import atomic_write_json

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run")))
    rd = RunDir(tmp_path / "run")
    with rd.begin("train", cfg) as st:
        pass
    m = rd.manifest("train")
    m.update(status="running", progress={"step": 47, "total": 200, "checkpoint_step": 40, "first_step": 0, "time": time.time()})
    atomic_write_json(rd.manifest_path("train"), m)  # as SIGKILL leaves it: running, and nobody holds the lock
    row = {r["stage"]: r for r in rd.status()}["train"]
    assert row["status"] == "interrupted" and row["why"].startswith("interrupted at step 47/200, resumes from step 40; its process is gone")
    assert st.manifest["id"] == m["id"]


def test_config_validate_warns_about_footguns_and_the_fix_works(tmp_path):
    d = tiny_config_dict(tmp_path / "run", train={"max_steps": 10, "warmup_steps": 10}, model={"lora": {"enabled": True}},
                         data={"source": "builtin", "format": "chat"})
    path = write_config(tmp_path / "c.yaml", d)
    r = invoke_cli("config", "validate", str(path))
    assert r.returncode == 0, r.stderr  # warnings, not errors
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3 and "(3 warnings)" in r.stderr, r.stderr
    assert "train.warmup_steps (10) >= train.max_steps (10)" in warnings[0] and "model.lora.enabled with no model.name_or_path" in warnings[1]
    assert "data.format is chat but data.source is builtin" in warnings[2]

    # prepare refuses it (exit 2) with fixes that work: either one validates without a warning.
    r = invoke_cli("prepare", str(path))
    assert r.returncode == 2 and "Set data.format: text" in r.stderr and "data.source: files" in r.stderr, r.stderr
    assert "messages_field" not in r.stderr  # not a field name: the builtin corpus has no conversations at all
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    fixed = ["--set", "train.warmup_steps=1", "--set", "model.lora.enabled=false"]
    for fix in (["--set", "data.format=text"], ["--set", "data.source=files", "--set", f"data.paths=[{chats}]"]):
        r = invoke_cli("config", "validate", str(path), *fixed, *fix)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
