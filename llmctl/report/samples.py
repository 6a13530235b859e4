"""The samples section (generate/outputs.jsonl: each output coloured by surprisal, the top
alternatives on hover) and the explain section (explain/explain.json: signed saliency)."""

from __future__ import annotations

import math
from html import escape

from llmctl.report.common import Section, note, read_json, read_jsonl, surprisal_legend, token_spans

MAX_SAMPLES = 20


def _tip(r: dict) -> str:
    p = math.exp(r["logprob"])
    tip = f"{r['token']!r}: p {p:.3f}, surprisal {-r['logprob']:.2f} nats"
    if r.get("entropy") is not None:
        tip += f", entropy {r['entropy']:.2f}"
    alts = r.get("top") or []
    if alts:
        tip += "\nalternatives: " + "  ".join(f"{a['token']!r} {math.exp(a['logprob']):.3f}" for a in alts)
    return tip


def _sample(rec: dict) -> str:
    prompt = f'<pre class="prompt">{escape(rec.get("prompt", ""))}</pre>'
    lps = rec.get("logprobs")
    if lps:
        spans = [(r["token"], -r["logprob"], _tip(r)) for r in lps]
        covered = sum(len(r["token"]) for r in lps)
        out = token_spans(spans)
        rest = rec.get("output", "")[covered:]
        if rest:
            out += f'<pre class="tokens">{escape(rest)}</pre>'
    else:
        out = f'<pre class="tokens plain">{escape(rec.get("output", ""))}</pre>'
    meta = f"finish: {rec.get('finish_reason')}, {rec.get('completion_tokens', '?')} tokens"
    if rec.get("finish_reason") == "content_filter" or rec.get("safety"):
        rails = ", ".join(f"{e['rail']} {e['action']}" for e in rec.get("safety") or [])
        meta += f' <span class="rail">safety rail: {escape(rails or "content_filter")}</span>'
    return f'<div class="sample" data-sample="{rec.get("index", 0)}">{prompt}{out}<p class="meta">{meta}</p></div>'


def samples_section(rd) -> Section:
    m = rd.manifest("generate")
    recs = read_jsonl(rd.outputs_path, limit=MAX_SAMPLES)
    if not recs:
        why = "no generate/ in this run" if m is None else "generate/outputs.jsonl holds no output"
        return Section("samples", "Samples", "", f"{why}: run 'llmctl generate CONFIG' (with generate.prompts, and generate.logprobs K for colours)")
    parts = []
    if not any(r.get("logprobs") for r in recs):
        parts.append(note("These outputs carry no logprobs, so they are not coloured: set generate.logprobs (e.g. 5) or pass "
                          "--logprobs 5 to llmctl generate."))
    else:
        parts.append(surprisal_legend())
    parts += [_sample(r) for r in recs]
    return Section("samples", "Samples", "".join(parts))


def explain_section(rd) -> Section:
    res = read_json(rd.explain_json_path)
    if not res or not res.get("tokens"):
        return Section("explain", "Explain", "", "no explain/ in this run: run 'llmctl explain CONFIG -p PROMPT'")
    from llmctl.stages.explain import _saliency_legend, _spans, saliency_colour

    tgt = f'<b class="tgt" title="{escape(repr(res["target"]))}">{escape(res["target"])}</b>'
    top = ", ".join(f"{t['token']!r} {math.exp(t['logprob']):.3f}" for t in (res.get("next_token") or {}).get("top", []))
    body = (f"<p>Target <code>{escape(repr(res['target']))}</code>, log p(target | prompt) = {res['target_logprob']:.4f}; "
            f"method: {escape(res.get('method', ''))}.</p>{_saliency_legend(res)}"
            f'<pre class="tokens saliency">{_spans(res, saliency_colour)}{tgt}</pre><p>Next-token top alternatives: {escape(top)}</p>')
    return Section("explain", "Explain", body)
