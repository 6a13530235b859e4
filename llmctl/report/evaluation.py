"""The eval section: every metric against its baselines and the starting model, thresholds
marked pass or fail, the token-loss histogram, and the hardest tokens and documents coloured
by surprisal (eval/results.json, eval/token_losses.jsonl)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from llmctl.report.common import Raw, Section, note, read_json, read_jsonl, surprisal_legend, table, token_spans
from llmctl.report.svg import bar_chart

# metric, lower is better, the baseline's headline key
METRICS = [
    ("perplexity", True, "baseline_unigram_perplexity"),
    ("bits_per_byte", True, None),
    ("bleu", False, "baseline_copy_bleu"),
    ("chrf", False, "baseline_copy_chrf"),
    ("ter", True, None),
    ("exact_match", False, None),
    ("preference_accuracy", False, None),
    ("reward_margin", False, None),
    ("likelihood_accuracy", False, None),
]
CONTEXT = 12  # tokens shown before a hard token
DOC_TOKENS = 160  # tokens shown of a hard document


def _thresholds(cfg, head: dict) -> dict[str, tuple[str, bool]]:
    """metric -> (the threshold as written, met?), with eval's own check."""
    if cfg is None:
        return {}
    from llmctl.stages.evaluate import _check_thresholds

    failed = {f["metric"] for f in _check_thresholds(cfg.eval.thresholds, head)}
    out = {}
    for key, lim in cfg.eval.thresholds.model_dump().items():
        if lim is not None:
            metric = key.rsplit("_", 1)[0]
            out[metric] = (f"{'<=' if key.endswith('_max') else '>='} {lim} (eval.thresholds.{key})", metric not in failed)
    return out


def _metric_rows(head: dict, gates: dict) -> tuple[list[dict], list[str]]:
    rows, charts = [], []
    for metric, lower, base_key in METRICS:
        if not isinstance(head.get(metric), (int, float)) or isinstance(head.get(metric), bool):
            continue
        init, base = head.get(f"init_{metric}"), head.get(base_key) if base_key else None
        gate = gates.get(metric)
        verdict = Raw('<span class="pass">pass</span>' if gate[1] else '<span class="fail">FAIL</span>') if gate else ""
        rows.append({"metric": f"{metric} ({'lower' if lower else 'higher'} is better)", "model": head[metric], "init": init, "baseline": base,
                     "threshold": gate[0] if gate else "", "verdict": verdict})
        bars = [("this model", float(head[metric]), f"{metric} of the trained model: {head[metric]}")]
        if isinstance(init, (int, float)):
            bars.append(("starting model", float(init), f"{metric} of the model before training: {init}"))
        if isinstance(base, (int, float)):
            bars.append(("trivial baseline", float(base), f"{metric} of the baseline ({base_key.removeprefix('baseline_')}): {base}"))
        title = f"{metric} ({'lower' if lower else 'higher'} is better)" + (f"; threshold {gate[0]}: {'pass' if gate[1] else 'FAIL'}" if gate else "")
        charts.append(bar_chart(bars, title=title, chart_id=f"metric-{metric}", cls="s0", compact=True))
    return rows, charts


def _decoder(rd):
    """token id -> text, from the run's tokenizer file (the `tokenizers` library: no torch)."""
    for d in (rd.tokenizer_dir, rd.model_dir):
        f = Path(d) / "tokenizer.json"
        if f.is_file():
            try:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(f))
                return lambda i: tok.decode([i], skip_special_tokens=False)
            except Exception:  # an unreadable tokenizer file: show ids rather than fail the page
                break
    return lambda i: f"[{i}]"


def _hard_tokens(ppl: dict, docs: dict, decode) -> str:
    rows = []
    for h in ppl.get("hardest_tokens") or []:
        d, pos = docs.get(h["document"]), h["position"]
        if d is not None and pos < len(d["ids"]):
            lo = max(0, pos - CONTEXT)
            spans = [(decode(i), loss, f"{decode(i)!r}: surprisal {loss if loss is not None else 'not scored'}")
                     for i, loss in zip(d["ids"][lo : pos + 1], d["losses"][lo : pos + 1])]
            shown = Raw(token_spans(spans))
        else:
            shown = Raw(token_spans([(h.get("context", ""), None, "context"), (h["token"], h["loss"], f"surprisal {h['loss']}")]))
        rows.append({"document": h["document"], "position": pos, "token": repr(h["token"]), "loss": h["loss"], "in context": shown})
    return table(rows, ["document", "position", "token", "loss", "in context"], ["document", "position", "token", "surprisal (nats)", "context, coloured"], cls="hard")


def _hard_docs(ppl: dict, docs: dict, decode) -> str:
    rows = []
    for h in (ppl.get("hardest_documents") or [])[:3]:
        d = docs.get(h["document"])
        shown = ""
        if d is not None:
            spans = [(decode(i), loss, f"{decode(i)!r}: surprisal {loss}") for i, loss in zip(d["ids"][:DOC_TOKENS], d["losses"][:DOC_TOKENS])]
            more = f" (first {DOC_TOKENS} of {len(d['ids'])} tokens)" if len(d["ids"]) > DOC_TOKENS else ""
            shown = Raw(token_spans(spans) + escape(more))
        rows.append({"document": h["document"], "tokens": h["tokens"], "mean_loss": h["mean_loss"], "text": shown})
    return table(rows, ["document", "tokens", "mean_loss", "text"], ["document", "scored tokens", "mean surprisal (nats)", "text, coloured"], cls="hard")


def eval_section(rd, cfg=None) -> Section:
    results = read_json(rd.results_path)
    m = rd.manifest("eval") or {}
    if results is None:
        why = "no eval/ in this run" if not m else f"eval/ is {m.get('status', 'incomplete')} and has no results.json"
        return Section("eval", "Eval", "", f"{why}: run 'llmctl eval CONFIG'")
    head = m.get("headline") or {}
    rows, charts = _metric_rows(head, _thresholds(cfg, head))
    parts = [f"<p>Model <code>{escape(str((results.get('model') or {}).get('path', '')))}</code>, split <code>{escape(str(results.get('split')))}</code>.</p>"]
    parts.append(table(rows, ["metric", "model", "init", "baseline", "threshold", "verdict"],
                       ["metric", "this model", "starting model", "trivial baseline", "threshold", "pass/fail"]))
    if not any(r["threshold"] for r in rows):
        parts.append(note("No eval.thresholds are set: nothing to pass or fail."))
    parts.append('<div class="cols">' + "".join(charts) + "</div>")
    ppl = results.get("perplexity") or {}
    hist = ppl.get("token_loss_histogram") or []
    if hist:
        bars = [(f"{b['from']:g}-{b['to']:g}" if b.get("to") is not None else f"{b['from']:g}+", float(b["tokens"]), f"{b['tokens']:,} tokens") for b in hist]
        parts.append(bar_chart(bars, title=f"Token surprisal histogram (nats; median {ppl.get('median_token_loss')})", chart_id="loss-hist", cls="s1"))
    if ppl.get("hardest_tokens") or ppl.get("hardest_documents"):
        docs = {d.get("document"): d for d in read_jsonl(rd.token_losses_file("eval"))}
        decode = _decoder(rd)
        parts += [surprisal_legend(), "<h3>Hardest tokens</h3>", _hard_tokens(ppl, docs, decode),
                  "<h3>Hardest documents</h3>", _hard_docs(ppl, docs, decode)]
    return Section("eval", "Eval", "".join(p for p in parts if p))
