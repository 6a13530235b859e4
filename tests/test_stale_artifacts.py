"""Artifacts that no longer match the run are never used or quoted: exports, other models' evals."""

from __future__ import annotations

import shutil

import pytest

from conftest import invoke_cli
from llmctl.errors import StageInputError
from llmctl.modeling import resolve_model_path
from llmctl.stages import export


def _fake_export(rd, cfg):
    with rd.begin("export", cfg, inputs=["train"]) as st:
        shutil.copytree(rd.model_dir, rd.export_dir("hf"))
        st.manifest["formats"] = ["hf"]


@pytest.mark.timeout(300)  # the refusal runs in this process: a serve that starts instead must not hang the suite
def test_serve_refuses_an_export_of_an_older_model(trained_run):
    path, cfg, rd = trained_run
    _fake_export(rd, cfg)
    assert resolve_model_path(None, rd, cfg, "serve", prefer_export=True) == str(rd.export_dir("hf"))
    with rd.begin("train", cfg, inputs=["prepare"]):  # retrained since the export
        pass
    assert resolve_model_path(None, rd, cfg, "generate") == str(rd.model_dir)  # generate uses the new model
    with pytest.raises(StageInputError, match=r"export is stale \(train/ was re-run since it ran\).*llmctl export .*--force"):
        resolve_model_path(None, rd, cfg, "serve", prefer_export=True)
    r = invoke_cli("serve", str(path), "--port", "0")
    assert r.returncode == 3 and "export is stale" in r.stderr and "Traceback" not in r.stderr


def test_model_card_quotes_only_the_runs_own_current_eval(trained_run, tmp_path):
    from llmctl.config import load_config
    from llmctl.stages import evaluate

    path, cfg, rd = trained_run
    cfg = load_config(path, ["eval.generation=false"])
    other = tmp_path / "other"
    shutil.copytree(rd.model_dir, other)
    theirs = evaluate.run(cfg, rd, model=str(other))
    card = export._model_card(cfg, rd, ["hf"])
    assert "not evaluated" in card and str(theirs["perplexity"]) not in card
    ours = evaluate.run(cfg, rd)
    assert f"perplexity {ours['perplexity']}" in export._model_card(cfg, rd, ["hf"])
    with rd.begin("train", cfg, inputs=["prepare"]):  # retrained: that eval describes an older model
        pass
    assert "not evaluated" in export._model_card(cfg, rd, ["hf"])
