"""`llmctl explain`: which prompt tokens the next token (or a given continuation) depends on.

For one prompt it reports
- each prompt token's own logprob under the model (how surprising the prompt is),
- the next-token distribution (top-k, from the raw logits),
- gradient x input saliency: d log p(target | prompt) / d embedding, dotted with the embedding,
  summed over the hidden size (signed; no extra dependency),
- optionally (`--attention`) the attention the target's first position pays to each prompt
  token, averaged over heads, for the last layer and over all layers. Attention maps need the
  eager kernel (sdpa returns none), so the model is switched to it for this command only.

On a chat run (data.format: chat) the prompt is first rendered as a user turn through the chat
template, as `generate` sends it (llmctl/chat.py), and the attributions cover the rendered
tokens; `--raw` explains the text as given.

Written to RUN/explain/explain.json and RUN/explain/explain.html; a heatmap on the terminal
(`-q` silences it). Both colour a token by the sign of its saliency: one hue where it supports
the prediction, another where it opposes it, with whitespace drawn visibly.
"""

from __future__ import annotations

import html
import json
import math
import sys

from llmctl import console as _console
from llmctl.chat import plain_prompts_as_chat, render_chat, user_turn
from llmctl.errors import ConfigError
from llmctl.rundir import RunDir, atomic_write_text


def _full(x):
    """At least float32 (a float64 model keeps its precision)."""
    import torch

    return x if x.dtype == torch.float64 else x.float()


def attribute(model, tok, prompt: str, target: str | None = None, top_k: int = 5, attention: bool = False) -> dict:
    """Logprobs and attributions for `prompt` (-> `target`, default: the greedy next token)."""
    import torch

    from llmctl.inference.logprobs import entropy, top
    from llmctl.tokenizer import with_bos

    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("explain: the prompt is empty")
    ids = with_bos(tok, ids)  # the prompt as generate and serve feed it
    dev = model.device
    prompt_ids = torch.tensor([ids], device=dev)
    with torch.no_grad():
        logits = _full(model(input_ids=prompt_ids).logits[0])
    logp = torch.log_softmax(logits, dim=-1)
    prompt_lp = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    alts = top(logp[-1], top_k)  # the next token's distribution, as generate --logprobs reports it
    next_top = [{"token": tok.decode([t]), "id": t, "logprob": v} for t, v in alts]

    if target:
        tgt_ids = tok(target, add_special_tokens=False)["input_ids"]
        if not tgt_ids:
            raise ConfigError("explain: --target tokenizes to nothing")
    else:
        tgt_ids = [alts[0][0]]
    full = torch.tensor([ids + tgt_ids], device=dev)
    n = len(ids)
    emb = model.get_input_embeddings()(full).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, output_attentions=attention)
    lp = torch.log_softmax(_full(out.logits[0]), dim=-1)
    # log p(target | prompt): target token k is predicted at position n - 1 + k.
    score = sum(lp[n - 1 + k, t] for k, t in enumerate(tgt_ids))
    model.zero_grad(set_to_none=True)
    score.backward()
    sal = _full((emb.grad[0, :n] * emb[0, :n]).sum(-1).detach()).tolist()

    tokens = [tok.decode([t]) for t in ids]
    rows = [{"index": i, "id": t, "token": s, "logprob": prompt_lp[i], "saliency": sal[i]} for i, (t, s) in enumerate(zip(ids, tokens))]
    peak = max((abs(s) for s in sal), default=0.0) or 1.0
    for r in rows:
        r["saliency_norm"] = abs(r["saliency"]) / peak
    result = {
        "prompt": prompt,
        "target": tok.decode(tgt_ids),
        "target_ids": tgt_ids,
        "target_logprob": float(score.detach()),
        "next_token": {"top": next_top, "entropy": entropy(logp[-1])},
        "method": "gradient x input on input embeddings, summed over the hidden size",
        "tokens": rows,
    }
    if attention:
        atts = out.attentions
        if not atts or atts[0] is None:
            raise ConfigError("explain: this model returned no attention weights (needs the eager attention kernel)")
        # [layers, heads, T, T] -> the row of the position that predicts the first target token.
        stack = torch.stack([a[0] for a in atts]).float()
        row = stack[:, :, n - 1, :n].mean(dim=1)  # [layers, n]
        last, mean = row[-1].tolist(), row.mean(0).tolist()
        for r, a, m in zip(rows, last, mean):
            r["attention_last_layer"] = a
            r["attention_mean"] = m
        result["attention"] = "mean over heads of the attention from the position predicting the target's first token"
    return result


# Signed colours (ColorBrewer RdBu ends, distinguishable with red-green colour blindness):
# a token whose saliency is positive raises log p(target) -- it supports the prediction -- and
# one whose saliency is negative lowers it. The background runs from white (0) to the full
# colour at the prompt's largest |saliency|. Each full colour keeps TEXT readable on it (WCAG AA,
# contrast >= 4.5:1), so no token's text washes out however strong its attribution.
SUPPORT = (67, 147, 195)
OPPOSE = (214, 96, 77)
ATTENTION = (158, 154, 200)  # unsigned: white to purple
TEXT = "#111111"
_WHITE = (255, 255, 255)

# Whitespace a reader could not see; the real text is in the HTML tooltip and the JSON.
_VISIBLE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d", "\u00a0": "\u237d"}
WHITESPACE_KEY = "\u00b7 space, \u21b5 newline, \u21e5 tab"


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def _tint(full, x: float) -> tuple[int, int, int]:
    """White blended towards `full` by x in [0, 1]."""
    x = min(max(x, 0.0), 1.0)
    return tuple(round(w + x * (f - w)) for w, f in zip(_WHITE, full))


def saliency_colour(r: dict) -> str:
    """The token's background: its sign picks the hue, |saliency| / peak the intensity."""
    return _hex(_tint(SUPPORT if r["saliency"] >= 0 else OPPOSE, r["saliency_norm"]))


def visible(token: str) -> str:
    """The token with each whitespace character drawn as a mark (a space as a middle dot)."""
    return "".join(_VISIBLE.get(c, c) for c in token)


def _ends_line(token: str) -> bool:
    return token.endswith("\n")


def _legend_terminal():
    from rich.text import Text

    t = Text("saliency: ")
    t.append(" supports ", style=f"{TEXT} on {_hex(SUPPORT)}")
    t.append(" ")
    t.append(" opposes ", style=f"{TEXT} on {_hex(OPPOSE)}")
    t.append(f" the prediction (stronger = larger |saliency|); {WHITESPACE_KEY}\n")
    return t


def render_terminal(res: dict):
    """A rich Text: a legend line, then each prompt token on its signed colour, whitespace visible."""

    t = _legend_terminal()
    for r in res["tokens"]:
        t.append(visible(r["token"]), style=f"{TEXT} on {saliency_colour(r)}")
        if _ends_line(r["token"]):
            t.append("\n")  # keep the prompt's lines
    t.append(" -> ", style="bold")
    t.append(visible(res["target"]), style="bold underline")
    return t


def render_plain(res: dict) -> str:
    """For logs without colour: a row per token, the bar's sign (+ supports, - opposes) its saliency's."""
    lines = [f"{'token':<16} {'saliency':>9} {'logprob':>8}" + ("  attention" if "attention" in res else "")]
    for r in res["tokens"]:
        lp = "" if r["logprob"] is None else f"{r['logprob']:.3f}"
        att = f"  {r['attention_mean']:.3f}" if "attention" in res else ""
        bar = ("+" if r["saliency"] >= 0 else "-") * round(10 * r["saliency_norm"])
        lines.append(f"{visible(r['token'])[:16]:<16} {r['saliency']:>+9.4f} {lp:>8}{att}  {bar}")
    lines.append(f"-> {visible(res['target'])!r}  (logprob {res['target_logprob']:.3f})")
    lines.append(f"(+ supports the prediction, - opposes it; {WHITESPACE_KEY})")
    return "\n".join(lines)


_CSS = (
    f'body{{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:{TEXT};'
    "background:#fff;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.5}"
    'code,.tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace}'
    ".tokens{white-space:pre-wrap;overflow-wrap:anywhere;font-size:1.05em;line-height:2.1;padding:.6em;border:1px solid #ddd;border-radius:4px}"
    f".t{{color:{TEXT};border-radius:3px;padding:2px 1px;box-shadow:inset 0 0 0 1px rgba(0,0,0,.08)}}"
    ".tgt{text-decoration:underline;font-weight:bold}"
    ".legend{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center;margin:.4em 0;font-size:.95em}"
    f".swatch{{color:{TEXT};padding:1px 6px;border-radius:3px}}"
    ".scale{display:inline-block;width:10em;height:.9em;border:1px solid #ccc;vertical-align:middle}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
)


def _gradient(stops) -> str:
    # A CSS gradient is drawn locally: no url(), nothing fetched.
    return "linear-gradient(to right," + ",".join(_hex(c) for c in stops) + ")"


def _saliency_legend(res: dict) -> str:
    peak = max((abs(r["saliency"]) for r in res["tokens"]), default=0.0)
    return (
        '<div class="legend">'
        f'<span><span class="swatch" data-label="supports" style="background:{_hex(SUPPORT)}">supports</span> '
        "the prediction: raises log p(target)</span>"
        f'<span><span class="swatch" data-label="opposes" style="background:{_hex(OPPOSE)}">opposes</span> '
        "it: lowers log p(target)</span>"
        f'<span>&minus;{peak:.3g} <span class="scale" style="background:{_gradient([OPPOSE, _WHITE, SUPPORT])}"></span> '
        f"+{peak:.3g}: colour strength is |saliency| relative to the largest in this prompt</span>"
        f"<span>{html.escape(WHITESPACE_KEY)}; hover a token for its text and numbers</span>"
        "</div>"
    )


def _attention_legend(peak: float) -> str:
    return (
        '<div class="legend">'
        f'<span><span class="swatch" data-label="attended" style="background:{_hex(ATTENTION)}">attended</span> '
        "attention is unsigned: stronger colour = more attention from the position predicting the target</span>"
        f'<span>0 <span class="scale" style="background:{_gradient([_WHITE, ATTENTION])}"></span> {peak:.3g}</span>'
        "</div>"
    )


def _tooltip(r: dict) -> str:
    lp = "n/a" if r["logprob"] is None else f"{r['logprob']:.3f}"
    tip = f"{r['token']!r} | saliency {r['saliency']:+.4f} | logprob {lp}"
    if "attention_mean" in r:
        tip += f" | attention {r['attention_mean']:.3f}"
    return tip


def _spans(res: dict, colour) -> str:
    out = []
    for r in res["tokens"]:
        out.append(f'<span class="t" style="background:{colour(r)}" title="{html.escape(_tooltip(r))}">{html.escape(visible(r["token"]))}</span>')
        if _ends_line(r["token"]):
            out.append("\n")  # the mark is in the span; the line break keeps the prompt's layout
    return "".join(out)


def render_html(res: dict) -> str:
    """A self-contained page (no network): the prompt coloured by signed saliency (and attention),
    a legend for each, whitespace visible, hover for a token's text and numbers."""
    peak_att = max((r.get("attention_mean", 0.0) for r in res["tokens"]), default=0.0) or 1.0
    sections = [("Gradient x input saliency", _saliency_legend(res), saliency_colour)]
    if "attention" in res:
        sections.append(("Attention (mean over layers and heads)", _attention_legend(peak_att), lambda r: _hex(_tint(ATTENTION, r["attention_mean"] / peak_att))))
    tgt = f'<b class="tgt" title="{html.escape(repr(res["target"]))}">{html.escape(visible(res["target"]))}</b>'
    body = "".join(f'<h2>{html.escape(title)}</h2>{legend}<pre class="tokens">{_spans(res, colour)}{tgt}</pre>' for title, legend, colour in sections)
    top = "".join(
        f"<tr><td><code>{html.escape(repr(t['token']))}</code></td><td>{t['logprob']:.4f}</td><td>{math.exp(t['logprob']):.4f}</td></tr>"
        for t in res["next_token"]["top"]
    )
    chat = ""
    if res.get("chat_template"):
        chat = (f"<p>The prompt <code>{html.escape(repr(res.get('user_prompt', '')))}</code> was rendered as a user turn through the model's "
                "chat template, as <code>generate</code> sends it; the attributions cover the rendered text (<code>--raw</code> explains the prompt as given).</p>")
    # JSON inside <script> is raw text: only '<' must not appear (no '</script>' or '<!--').
    data = json.dumps(res).replace("<", "\\u003c")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>llmctl explain</title><style>{_CSS}</style></head><body>'
        f"<h1>llmctl explain</h1><p>Target <code>{html.escape(repr(res['target']))}</code>, "
        f"log p(target | prompt) = {res['target_logprob']:.4f}. Method: {html.escape(res['method'])}.</p>{chat}"
        f"{body}<h2>Next-token distribution</h2><p>entropy {res['next_token']['entropy']:.3f} nats</p>"
        f"<table><tr><th>token</th><th>logprob</th><th>p</th></tr>{top}</table>"
        f'<script type="application/json" id="data">{data}</script></body></html>'
    )


def run(cfg, rd: RunDir, *, force: bool = True, model: str | None = None, prompt: str | None = None, target: str | None = None,
        top_k: int = 5, attention: bool = False, raw: bool = False, image: str | None = None, **_) -> dict:
    from llmctl.modeling import load_for_inference, resolve_model_path

    con = _console.current()
    if not prompt:
        raise ConfigError("explain: give a prompt with --prompt/-p TEXT")
    if image:  # patch saliency over the image: llmctl/vision/explain.py
        from llmctl.vision.explain import run as explain_image

        return explain_image(cfg, rd, model=model, image_path=image, prompt=prompt, target=target, con=con)
    path = resolve_model_path(model, rd, cfg, "explain")
    mdl, tok = load_for_inference(path)
    if attention:
        mdl.set_attn_implementation("eager")
    # The prompt the model would really see: on a chat run, generate sends it as a user turn.
    as_chat = plain_prompts_as_chat(cfg, tok, path, raw)
    if as_chat:
        con.info("explain: data.format is chat, so the prompt is explained as a user turn through the chat template (--raw explains the text as it is)")
    text = render_chat(tok, user_turn(prompt)) if as_chat else prompt
    with rd.begin("explain", cfg, inputs=[] if model else ["train"]) as st:
        res = attribute(mdl, tok, text, target=target, top_k=top_k, attention=attention)
        res["chat_template"] = as_chat
        if as_chat:
            res["user_prompt"] = prompt
        res["model"] = path
        atomic_write_text(rd.explain_json_path, json.dumps(res, indent=2) + "\n")
        atomic_write_text(rd.explain_html_path, render_html(res))
        st.headline.update({"prompt_tokens": len(res["tokens"]), "target": res["target"], "target_logprob": round(res["target_logprob"], 4)})
    if con.json_mode:
        return res
    if not con.quiet:
        if con.is_tty:
            con.err.print(render_terminal(res))
        else:
            sys.stderr.write(render_plain(res) + "\n")
    return {"target": res["target"], "target_logprob": round(res["target_logprob"], 4), "html": str(rd.explain_html_path), "json": str(rd.explain_json_path)}
