"""`llmctl explain`: which prompt tokens the next token (or a given continuation) depends on.

For one prompt it reports
- each prompt token's own logprob under the model (how surprising the prompt is),
- the next-token distribution (top-k, from the raw logits),
- gradient x input saliency: d log p(target | prompt) / d embedding, dotted with the embedding,
  summed over the hidden size (signed; no extra dependency),
- optionally (`--attention`) the attention the target's first position pays to each prompt
  token, averaged over heads, for the last layer and over all layers. Attention maps need the
  eager kernel (sdpa returns none), so the model is switched to it for this command only.

Written to RUN/explain/explain.json and RUN/explain/explain.html; a heatmap on the terminal.
"""

from __future__ import annotations

import html
import json
import math
import sys

from llmctl import console as _console
from llmctl.errors import ConfigError
from llmctl.rundir import RunDir, atomic_write_text


def _full(x):
    """At least float32 (a float64 model keeps its precision)."""
    import torch

    return x if x.dtype == torch.float64 else x.float()


def attribute(model, tok, prompt: str, target: str | None = None, top_k: int = 5, attention: bool = False) -> dict:
    """Logprobs and attributions for `prompt` (-> `target`, default: the greedy next token)."""
    import torch

    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("explain: the prompt is empty")
    dev = model.device
    prompt_ids = torch.tensor([ids], device=dev)
    with torch.no_grad():
        logits = _full(model(input_ids=prompt_ids).logits[0])
    logp = torch.log_softmax(logits, dim=-1)
    prompt_lp = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    next_lp = logp[-1]
    top = torch.topk(next_lp, min(top_k, next_lp.numel()))
    next_top = [{"token": tok.decode([int(t)]), "id": int(t), "logprob": float(v)} for v, t in zip(top.values, top.indices)]
    entropy = float(-(next_lp.exp() * next_lp).sum())

    if target:
        tgt_ids = tok(target, add_special_tokens=False)["input_ids"]
        if not tgt_ids:
            raise ConfigError("explain: --target tokenizes to nothing")
    else:
        tgt_ids = [int(top.indices[0])]
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
        "next_token": {"top": next_top, "entropy": entropy},
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


def _bar(x: float) -> str:
    """A background colour from white (0) to red (1)."""
    g = int(255 * (1 - min(max(x, 0.0), 1.0)))
    return f"#ff{g:02x}{g:02x}"


def _visible(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t")


def render_terminal(res: dict, key: str = "saliency_norm"):
    """A rich Text: each prompt token on a background as red as its attribution."""
    from rich.text import Text

    t = Text()
    for r in res["tokens"]:
        t.append(_visible(r["token"]), style=f"black on {_bar(r[key])}")
    t.append(" -> ", style="bold")
    t.append(_visible(res["target"]), style="bold underline")
    return t


def render_plain(res: dict) -> str:
    lines = [f"{'token':<16} {'saliency':>9} {'logprob':>8}" + ("  attention" if "attention" in res else "")]
    for r in res["tokens"]:
        lp = "" if r["logprob"] is None else f"{r['logprob']:.3f}"
        att = f"  {r['attention_mean']:.3f}" if "attention" in res else ""
        bar = "#" * round(10 * r["saliency_norm"])
        lines.append(f"{_visible(r['token'])[:16]:<16} {r['saliency']:>+9.4f} {lp:>8}{att}  {bar}")
    lines.append(f"-> {_visible(res['target'])!r}  (logprob {res['target_logprob']:.3f})")
    return "\n".join(lines)


def render_html(res: dict) -> str:
    """A self-contained page: the prompt coloured by saliency (and attention), hover for numbers."""

    peak_att = max((r.get("attention_mean", 0.0) for r in res["tokens"]), default=0.0) or 1.0
    heat = {"saliency": lambda r: r["saliency_norm"], "attention": lambda r: r["attention_mean"] / peak_att}

    def spans(kind: str) -> str:
        out = []
        for r in res["tokens"]:
            lp = "n/a" if r["logprob"] is None else f"{r['logprob']:.3f}"
            tip = f"saliency {r['saliency']:+.4f} | logprob {lp}"
            if "attention_mean" in r:
                tip += f" | attention {r['attention_mean']:.3f}"
            out.append(
                f'<span class="t" style="background:{_bar(heat[kind](r))}" title="{html.escape(tip)}">{html.escape(r["token"])}</span>'
            )
        return "".join(out)

    sections = [("Gradient x input saliency", "saliency")]
    if "attention" in res:
        sections.append(("Attention (mean over layers and heads)", "attention"))
    body = "".join(
        f"<h2>{html.escape(title)}</h2><pre>{spans(kind)}<b class=\"tgt\">{html.escape(res['target'])}</b></pre>" for title, kind in sections
    )
    top = "".join(
        f"<tr><td><code>{html.escape(repr(t['token']))}</code></td><td>{t['logprob']:.4f}</td><td>{math.exp(t['logprob']):.4f}</td></tr>"
        for t in res["next_token"]["top"]
    )
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>llmctl explain</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{white-space:pre-wrap;font-size:1.1em;line-height:1.8}"
        ".t{border-radius:3px;padding:1px 0}.tgt{text-decoration:underline}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>"
        f"<h1>llmctl explain</h1><p>Target <code>{html.escape(repr(res['target']))}</code>, "
        f"log p(target | prompt) = {res['target_logprob']:.4f}. Method: {html.escape(res['method'])}. "
        "Hover a token for its numbers.</p>"
        f"{body}<h2>Next-token distribution</h2><p>entropy {res['next_token']['entropy']:.3f} nats</p>"
        f"<table><tr><th>token</th><th>logprob</th><th>p</th></tr>{top}</table>"
        f"<script type=\"application/json\" id=\"data\">{html.escape(json.dumps(res))}</script></body></html>"
    )


def run(cfg, rd: RunDir, *, force: bool = True, model: str | None = None, prompt: str | None = None, target: str | None = None,
        top_k: int = 5, attention: bool = False, **_) -> dict:
    from llmctl.modeling import load_for_inference, resolve_model_path

    con = _console.current()
    if not prompt:
        raise ConfigError("explain: give a prompt with --prompt/-p TEXT")
    path = resolve_model_path(model, rd, cfg, "explain")
    mdl, tok = load_for_inference(path)
    if attention:
        mdl.set_attn_implementation("eager")
    with rd.begin("explain", cfg, inputs=[] if model else ["train"]) as st:
        res = attribute(mdl, tok, prompt, target=target, top_k=top_k, attention=attention)
        res["model"] = path
        atomic_write_text(rd.explain_json_path, json.dumps(res, indent=2) + "\n")
        atomic_write_text(rd.explain_html_path, render_html(res))
        st.headline.update({"prompt_tokens": len(res["tokens"]), "target": res["target"], "target_logprob": round(res["target_logprob"], 4)})
    if not con.json_mode:
        if con.is_tty:
            con.err.print(render_terminal(res))
        else:
            sys.stderr.write(render_plain(res) + "\n")
        return {"target": res["target"], "target_logprob": round(res["target_logprob"], 4), "html": str(rd.explain_html_path), "json": str(rd.explain_json_path)}
    return res
