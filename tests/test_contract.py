"""The command-line contract (DESIGN.md): one JSON object on stdout whatever the exit code."""

from __future__ import annotations

import json

import pytest
from filelock import FileLock

from conftest import run_cli, sentences, tiny_config_dict, write_config
from llmctl.rundir import RunDir


def _one_object(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_json_object_for_config_missing_input_and_lock_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    r = run_cli("prepare", str(bad), "--json")
    obj = _one_object(r.stdout)
    assert r.returncode == 2 and obj["ok"] is False and obj["exit_code"] == 2 and "train.max_stepz" in obj["error"]
    assert obj["error"] in r.stderr  # the human line stays on stderr

    (tmp_path / "docs.txt").write_text("\n\n".join(sentences(40)))
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", data={"paths": [str(tmp_path / "docs.txt")]}))
    r = run_cli("eval", str(path), "--json")
    obj = _one_object(r.stdout)
    assert r.returncode == 3 and obj["ok"] is False and obj["exit_code"] == 3 and "llmctl train" in obj["error"]

    lock_dir = tmp_path / "run" / "prepare"
    lock_dir.mkdir(parents=True)
    with FileLock(lock_dir / ".lock"):  # another writer holds the stage
        r = run_cli("prepare", str(path), "--json")
    obj = _one_object(r.stdout)
    assert r.returncode == 1 and obj["exit_code"] == 1 and "locked" in obj["error"]

    r = run_cli("status", str(tmp_path / "nope"), "--json")
    assert r.returncode == 2 and _one_object(r.stdout)["exit_code"] == 2
    r = run_cli("config", "show", str(path), "--json")
    obj = _one_object(r.stdout)
    assert r.returncode == 0 and obj["ok"] is True and obj["exit_code"] == 0 and obj["train"]["max_steps"] == 4


def test_eval_threshold_failure_keeps_the_metrics_in_json(trained_run):
    path, cfg, rd = trained_run
    args = ("eval", str(path), "--set", "eval.thresholds.perplexity_max=1.5", "--set", "eval.generation=false", "--json")
    for cached in (False, True):
        r = run_cli(*args)
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
