"""Evaluation breadth (issue #29): ROUGE / exact match / token F1, lm-eval tasks, pass@k in a
sandbox, the bias probe and counterfactual augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import invoke_cli
from llmctl.config import load_config


# --------------------------------------------------------------------------- generation metrics
def test_squad_normalisation_exact_match_and_token_f1():
    from llmctl.evaluation.textmetrics import exact_match, normalize_answer, token_f1

    assert normalize_answer("  The  Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert exact_match("the Paris.", "paris") and not exact_match("paris france", "paris")
    # common tokens {sat}: precision 1/2, recall 1/4 (articles dropped from both) -> F1 1/3
    assert token_f1("the cats sat", "the cat sat on the mat") == pytest.approx(1 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c d") == 0.0


def test_rouge_uses_the_porter_stemmer_and_averages_over_examples():
    from rouge_score import rouge_scorer

    from llmctl.metrics import text_metrics

    hyps, refs = ["the cats sat", "a dog ran home quickly"], ["the cat sat on the mat", "the dog ran home"]
    out = text_metrics(hyps, refs, ["rouge1", "rouge2", "rougeL"])
    # by hand, example 1 with stemming (cats -> cat): unigram P 3/3, R 3/6 -> F 2/3
    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    first = sc.score(refs[0], hyps[0])["rouge1"].fmeasure
    assert first == pytest.approx(2 / 3)
    for k in ("rouge1", "rouge2", "rougeL"):
        want = sum(sc.score(r, h)[k].fmeasure for h, r in zip(hyps, refs)) / 2 * 100
        assert out[k] == pytest.approx(want, abs=1e-4)
    assert "bleu" not in out and "signatures" not in out  # only what eval.metrics asked for


def test_eval_metrics_choose_what_is_computed_and_what_leads(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("eval", str(path), "--set", "eval.metrics=[token_f1, rougeL]", "--set", "eval.perplexity=false", "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    g = json.loads(rd.results_path.read_text())["generation"]
    assert {"token_f1", "rougeL", "copy_prompt_token_f1", "copy_prompt_rougeL"} <= set(g) and "bleu" not in g and "rouge1" not in g
    assert head["generation_lead"] == "token_f1" and "baseline_copy_rougeL" in head
    preds = [json.loads(line) for line in rd.predictions_path.read_text().splitlines()]
    assert {"token_f1", "rougeL"} <= set(preds[0]) and "bleu" not in preds[0]
    from llmctl.evaluation.textmetrics import token_f1

    assert g["token_f1"] == pytest.approx(sum(token_f1(p["prediction"], p["reference"]) for p in preds) / len(preds), abs=1e-4)
    from llmctl.pipeline import summarize

    s = summarize(rd)
    assert next(k for k in s if k in ("token_f1", "rougeL", "bleu")) == "token_f1"
    assert s["token_f1"]["copy_prompt_baseline"] == g["copy_prompt_token_f1"]


def test_thresholds_min_and_max_gate_any_headline_metric(trained_run):
    path, cfg, rd = trained_run
    base = ["--set", "eval.metrics=[rougeL]", "--set", "eval.perplexity=false"]
    r = invoke_cli("eval", str(path), *base, "--set", "eval.thresholds.min.rougeL=101", "--json")
    assert r.returncode == 4, r.stderr
    out = json.loads(r.stdout)
    assert out["failed_thresholds"][0]["threshold"] == "eval.thresholds.min.rougeL" and "rougeL" in out["error"]
    r = invoke_cli("eval", str(path), *base, "--set", "eval.thresholds.max.rougeL=100")
    assert r.returncode == 0, r.stderr
    r = invoke_cli("eval", str(path), *base, "--set", "eval.thresholds.min.tasks.nope.acc=0.5")
    assert r.returncode == 4 and "tasks.nope.acc was not measured" in r.stderr
    bad = invoke_cli("eval", str(path), "--set", "eval.thresholds.min.rougeL=high")
    assert bad.returncode == 2 and "eval.thresholds.min" in bad.stderr and "Traceback" not in bad.stderr
