"""`llmctl explain`: saliency that is really gradient x input, logprobs, attention, HTML, terminal."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import build_trained_run, invoke_cli, tiny_config_dict, write_config
from llmctl.stages.explain import OPPOSE, SUPPORT, attribute, render_html, render_plain, render_terminal


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
    full = SUPPORT if res["tokens"][hot]["saliency"] > 0 else OPPOSE
    assert "48;2;%d;%d;%d" % full in ansi  # the hottest token in its sign's full colour
    page = _Page(render_html(res))
    tokens = page.sections[0]
    assert [t["title"].split(" | ")[0] for t in tokens] == [repr(r["token"]) for r in res["tokens"]]
    assert tokens[hot]["bg"] == full
    assert json.loads(page.data)["target"] == res["target"]


def test_cli_writes_json_and_html(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("explain", str(path), "-p", "the quick brown", "--attention", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["target"] == out["next_token"]["top"][0]["token"]
    assert all("attention_mean" in t for t in out["tokens"])
    saved = json.loads(rd.explain_json_path.read_text())
    assert saved["tokens"] == out["tokens"]
    page = _Page(rd.explain_html_path.read_text())
    assert len(page.sections) == 2 and len(page.legends) == 2  # saliency and attention, each with its legend
    assert all(len(sec) == len(out["tokens"]) for sec in page.sections)
    r = invoke_cli("explain", str(path), "-p", "the quick brown")  # plain lines without a TTY
    assert r.returncode == 0 and "saliency" in r.stderr and "->" in r.stderr
    r = invoke_cli("explain", str(path), "-p", "")
    assert r.returncode == 2 and "prompt" in r.stderr


# --- HTML and terminal rendering, on a hand-made result so each sign and whitespace kind is pinned.


def _synthetic():
    """A result as attribute() returns it: one token per kind the renderers must handle."""
    toks = [("Hello", 0.5), (" ", -2.0), ("world", 1.0), ("\n", 0.25), ("\t", -0.5), ("<b>&", 0.0)]
    peak = max(abs(s) for _, s in toks)
    rows = [{"index": i, "id": i, "token": t, "logprob": None if i == 0 else -1.5, "saliency": s, "saliency_norm": abs(s) / peak}
            for i, (t, s) in enumerate(toks)]
    return {"prompt": "".join(t for t, _ in toks), "target": " next", "target_ids": [9], "target_logprob": -2.25,
            "next_token": {"top": [{"token": " next", "id": 9, "logprob": -2.25}], "entropy": 3.0},
            "method": "gradient x input", "tokens": rows, "chat_template": False}


def _rgb(css: str) -> tuple[int, int, int]:
    css = css.strip().lstrip("#")
    return tuple(int(css[i : i + 2], 16) for i in (0, 2, 4))


def _luminance(rgb) -> float:
    def lin(c):
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a, b) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


class _Page(HTMLParser):
    """The page's token spans (per section), legend swatches, CSS, data blob and external references."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[dict]] = []
        self.legends: list[dict] = []  # {"text": str, "swatches": {label: rgb}}
        self.css = self.data = ""
        self.external: list[str] = []
        self._stack: list[tuple[str, dict]] = []
        self._span: dict | None = None
        self._swatch: tuple | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if a.get(k):
                self.external.append(a[k])
        cls = (a.get("class") or "").split()
        if tag == "pre" and "tokens" in cls:
            self.sections.append([])
        if "legend" in cls:
            self.legends.append({"text": "", "swatches": {}})
        if tag == "span" and "t" in cls and self.sections:
            bg = re.search(r"background:\s*(#[0-9a-fA-F]{6})", a.get("style", ""))
            self._span = {"bg": _rgb(bg.group(1)), "title": a.get("title", ""), "text": "", "classes": cls}
            self.sections[-1].append(self._span)
        if "swatch" in cls:
            bg = re.search(r"background:\s*(#[0-9a-fA-F]{6})", a.get("style", ""))
            self._swatch = (_rgb(bg.group(1)), a.get("data-label", ""))
            self.legends[-1]["swatches"][self._swatch[1]] = self._swatch[0]
        self._stack.append((tag, a))

    def handle_endtag(self, tag):
        while self._stack:
            t, _ = self._stack.pop()
            if t == tag:
                break
        if tag == "span":
            self._span = None

    def handle_data(self, data):
        tag, a = self._stack[-1] if self._stack else ("", {})
        if tag == "style":
            self.css += data
        elif tag == "script" and a.get("type") == "application/json":
            self.data += data
        if self._span is not None:
            self._span["text"] += data
        if self.legends and any("legend" in (x.get("class") or "").split() for _, x in self._stack):
            self.legends[-1]["text"] += data


def _on_line(bg, full) -> float:
    """bg = white + m * (full - white) for one m in [0, 1]: returns m (asserts it is on that line)."""
    ms = [(255 - b) / (255 - f) for b, f in zip(bg, full) if f != 255]
    assert max(ms) - min(ms) < 0.02, (bg, full)
    return sum(ms) / len(ms)


def test_html_legend_signed_colours_and_readable_text():
    res = _synthetic()
    page = _Page(render_html(res))
    assert len(page.sections) == 1 and len(page.legends) >= 1
    legend = page.legends[0]
    assert "support" in legend["text"] and "oppose" in legend["text"]
    support, oppose = legend["swatches"]["supports"], legend["swatches"]["opposes"]
    assert (support, oppose) == (SUPPORT, OPPOSE) and support != oppose
    spans = page.sections[0]
    assert len(spans) == len(res["tokens"])
    for span, r in zip(spans, res["tokens"]):
        full = SUPPORT if r["saliency"] > 0 else OPPOSE
        if r["saliency"] == 0:
            assert span["bg"] == (255, 255, 255)
        else:
            # the sign picks the hue, |saliency| / peak the intensity
            assert _on_line(span["bg"], full) == pytest.approx(r["saliency_norm"], abs=0.02)
    assert spans[1]["bg"] == OPPOSE  # the peak, and negative: opposes at full strength
    assert spans[2]["bg"] != spans[0]["bg"] and _on_line(spans[0]["bg"], SUPPORT) < _on_line(spans[2]["bg"], SUPPORT)
    # dark text, readable on every background (WCAG AA: 4.5:1), in a named font stack
    rule = re.search(r"\.t\s*\{[^}]*\}", page.css).group(0)
    text = _rgb(re.search(r"(?<![-\w])color:\s*(#[0-9a-fA-F]{6})", rule).group(1))
    assert _luminance(text) < 0.05
    assert all(_contrast(text, s["bg"]) >= 4.5 for s in spans)
    assert all(_contrast(text, c) >= 4.5 for c in legend["swatches"].values())
    assert re.search(r"font-family:[^;}]*(sans-serif|monospace)", page.css)


def test_html_shows_whitespace_and_is_self_contained():
    res = _synthetic()
    raw = render_html(res)
    page = _Page(raw)
    spans = page.sections[0]
    assert spans[1]["text"] == "\u00b7" and repr(" ") in spans[1]["title"]  # a space token is a visible dot
    assert spans[3]["text"] == "\u21b5" and repr("\n") in spans[3]["title"]
    assert spans[4]["text"] == "\u21e5" and repr("\t") in spans[4]["title"]
    assert spans[5]["text"] == "<b>&"  # markup in a token is text, not HTML
    assert all(s["text"].strip() for s in spans)  # no token is invisible
    # no network: nothing fetched by src/href, no CSS imports or urls, no remote fonts or scripts
    assert page.external == [] and not re.search(r"@import|url\(|https?://", raw)
    assert json.loads(page.data) == json.loads(json.dumps(res))  # the data blob is plain JSON


def test_terminal_heatmap_is_signed_and_shows_whitespace():
    from rich.console import Console

    res = _synthetic()
    con = Console(record=True, force_terminal=True, color_system="truecolor", width=200)
    con.print(render_terminal(res))
    ansi = con.export_text(styles=True, clear=False)
    text = con.export_text()
    assert "48;2;%d;%d;%d" % OPPOSE in ansi  # the negative peak
    assert "48;2;%d;%d;%d" % SUPPORT in ansi  # the legend's supports swatch at least
    assert "\u00b7" in text and "\u21b5" in text and "\u21e5" in text
    assert "supports" in text and "opposes" in text
    plain = render_plain(res)  # logs without colour: the sign is in the bar
    assert "\u00b7" in plain and "\u21b5" in plain and re.search(r"-{3,}", plain) and re.search(r"\+{3,}", plain)


def test_quiet_silences_the_heatmap_but_writes_results(trained_run):
    path, cfg, rd = trained_run
    r = invoke_cli("explain", str(path), "-p", "the quick brown", "-q")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr
    assert json.loads(rd.explain_json_path.read_text())["tokens"] and rd.explain_html_path.is_file()
    r = invoke_cli("explain", str(path), "--quiet", "-p", "the quick brown", "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["tokens"]


@pytest.fixture
def chat_run(tmp_path):
    """A trained run whose config says data.format: chat, its tokenizer carrying a chat template."""
    from transformers import AutoTokenizer

    from llmctl.config import load_config
    from llmctl.tokenizer import DEFAULT_CHAT_TEMPLATE

    path = write_config(tmp_path / "chat.yaml", tiny_config_dict(tmp_path / "run", data={"format": "chat"}))
    cfg = load_config(path)
    rd = build_trained_run(Path(cfg.run.dir), cfg)
    tok = AutoTokenizer.from_pretrained(rd.model_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(rd.model_dir)
    return path, rd, tok


def test_chat_run_explains_the_prompt_through_the_chat_template(chat_run):
    from llmctl.chat import render_chat, user_turn

    path, rd, tok = chat_run
    rendered = render_chat(tok, user_turn("the quick brown"))
    assert rendered != "the quick brown"
    r = invoke_cli("explain", str(path), "-p", "the quick brown", "--json")
    assert r.returncode == 0, r.stderr
    assert "chat template" in r.stderr
    out = json.loads(r.stdout)
    assert out["prompt"] == rendered and out["chat_template"] is True and out["user_prompt"] == "the quick brown"
    # the attributions cover every token of the rendered prompt, as generate would feed it
    assert [t["id"] for t in out["tokens"]] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert "".join(t["token"] for t in out["tokens"]) == rendered
    # --raw: the text as given
    r = invoke_cli("explain", str(path), "-p", "the quick brown", "--raw", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt"] == "the quick brown" and out["chat_template"] is False and "user_prompt" not in out
    assert [t["id"] for t in out["tokens"]] == tok("the quick brown", add_special_tokens=False)["input_ids"]


def test_chat_run_without_a_template_names_raw(chat_run):
    path, rd, tok = chat_run
    tok.chat_template = None
    tok.save_pretrained(rd.model_dir)
    cfgfile = rd.model_dir / "tokenizer_config.json"
    cfg = json.loads(cfgfile.read_text())
    cfg.pop("chat_template", None)
    cfgfile.write_text(json.dumps(cfg))
    (rd.model_dir / "chat_template.jinja").unlink(missing_ok=True)
    r = invoke_cli("explain", str(path), "-p", "the quick brown")
    assert r.returncode == 2 and "--raw" in r.stderr and "Traceback" not in r.stderr
