"""`llmctl explain`: saliency that is really gradient x input, logprobs, attention, HTML, terminal."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli
from llmctl.stages.explain import attribute, render_html, render_terminal


def _model(rd, dtype=None):
    from llmctl.modeling import load_for_inference

    return load_for_inference(str(rd.model_dir), dtype=dtype)


def test_saliency_is_gradient_times_input(trained_run):
    """Saliency of token i is the directional derivative of log p(target) along its own embedding,
    computed here independently by forward-mode AD (jvp), not by the backward pass explain uses."""
    import torch
    from torch.func import jvp

    _, _, rd = trained_run
    model, tok = _model(rd, dtype=torch.float64)
    prompt = "the quick brown fox jumps"
    res = attribute(model, tok, prompt, target=" over")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    tgt = res["target_ids"]
    full = torch.tensor([ids + tgt])
    n = len(ids)

    def score(emb):
        lp = torch.log_softmax(model(inputs_embeds=emb).logits[0], -1)
        return sum(lp[n - 1 + k, t] for k, t in enumerate(tgt))

    base = model.get_input_embeddings()(full).detach()
    with torch.no_grad():
        assert float(score(base)) == pytest.approx(res["target_logprob"], abs=1e-6)
    model.set_attn_implementation("eager")  # forward-mode AD through plain ops
    peak = max(abs(t["saliency"]) for t in res["tokens"])
    for i in range(n):
        direction = torch.zeros_like(base)
        direction[0, i] = base[0, i]
        expect = float(jvp(score, (base,), (direction,))[1])
        assert res["tokens"][i]["saliency"] == pytest.approx(expect, rel=1e-3, abs=1e-4 * peak)
        assert res["tokens"][i]["saliency_norm"] == pytest.approx(abs(res["tokens"][i]["saliency"]) / peak)
    # prompt logprobs are the teacher-forced ones
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    assert res["tokens"][0]["logprob"] is None
    for i in range(1, n):
        assert res["tokens"][i]["logprob"] == pytest.approx(float(lp[i - 1, ids[i]]), abs=1e-6)
    top = res["next_token"]["top"]
    assert top[0]["id"] == int(lp[-1].argmax()) and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)


def test_attention_rows_are_distributions(trained_run):
    _, _, rd = trained_run
    model, tok = _model(rd)
    model.set_attn_implementation("eager")
    res = attribute(model, tok, "seven wizards quietly judge", attention=True)
    for key in ("attention_last_layer", "attention_mean"):
        assert sum(r[key] for r in res["tokens"]) == pytest.approx(1.0, abs=1e-5)
        assert all(r[key] >= 0 for r in res["tokens"])


def test_terminal_heatmap_and_html(trained_run):
    from rich.console import Console

    _, _, rd = trained_run
    model, tok = _model(rd)
    res = attribute(model, tok, "river stones glow under pale")
    hot = max(range(len(res["tokens"])), key=lambda i: res["tokens"][i]["saliency_norm"])
    con = Console(record=True, force_terminal=True, color_system="truecolor", width=200)
    con.print(render_terminal(res))
    ansi = con.export_text(styles=True)
    assert "48;2;255;0;0" in ansi  # the hottest token on pure red
    page = render_html(res)
    spans = re.findall(r'<span class="t" style="background:(#[0-9a-f]{6})" title="[^"]*">([^<]*)</span>', page)
    assert [s for _, s in spans] == [__import__("html").escape(r["token"]) for r in res["tokens"]]
    assert spans[hot][0] == "#ff0000"
    data = re.search(r'<script type="application/json" id="data">(.*)</script>', page).group(1)
    assert json.loads(__import__("html").unescape(data))["target"] == res["target"]


def test_cli_writes_json_and_html(trained_run):
    path, cfg, rd = trained_run
    r = run_cli("explain", str(path), "-p", "the quick brown", "--attention", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["target"] == out["next_token"]["top"][0]["token"]
    assert all("attention_mean" in t for t in out["tokens"])
    saved = json.loads(rd.explain_json_path.read_text())
    assert saved["tokens"] == out["tokens"]
    assert "<html>" in rd.explain_html_path.read_text()
    r = run_cli("explain", str(path), "-p", "the quick brown")  # plain lines without a TTY
    assert r.returncode == 0 and "saliency" in r.stderr and "->" in r.stderr
    r = run_cli("explain", str(path), "-p", "")
    assert r.returncode == 2 and "prompt" in r.stderr
