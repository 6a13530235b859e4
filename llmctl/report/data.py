"""The data section: prepare's curation report (prepare/report.json) as charts: what each
step removed, the length histogram, the language mix, the term-group balance, PII; and the
split sizes (prepare/stats.json)."""

from __future__ import annotations

from llmctl.report.common import Section, note, read_json, table
from llmctl.report.svg import bar_chart, grouped_columns


def _removed(report: dict) -> str:
    rows = []
    for split, info in (report.get("splits") or {}).items():
        for s in info.get("steps") or []:
            tok = ""
            if "tokens_before" in s and "tokens_after" in s:
                tok = f", {s['tokens_before'] - s['tokens_after']:,} tokens"
            rows.append((f"{split}: {s['step']}", float(s.get("removed") or 0),
                         f"{split}, {s['step']}: {s.get('removed', 0):,} of {s.get('documents_before', 0):,} documents removed{tok}"))
    return bar_chart(rows, title="What curation removed, per step (documents)", chart_id="curation", cls="s1")


def _lengths(report: dict) -> str:
    hist = (report.get("length_histogram_words") or {}).get("train") or {}
    before, after = hist.get("before") or {}, hist.get("after") or {}
    bins = list(dict.fromkeys([*before, *after]))
    if not bins:
        return ""
    return grouped_columns(bins, {"before curation": [before.get(b, 0) for b in bins], "after": [after.get(b, 0) for b in bins]},
                           title="Document length (words), train split", y_label="documents", chart_id="lengths")


def _languages(report: dict) -> str:
    langs = report.get("languages") or {}
    after = langs.get("after") or {}
    if not after:
        return note("Language mix: not measured (data.curate.language is off for this source).")
    before = langs.get("before") or {}
    rows = [(k, float(v), f"{k}: {v:,} documents kept of {before.get(k, v):,}") for k, v in list(after.items())[:20]]
    return bar_chart(rows, title="Language mix (documents kept)", chart_id="languages", cls="s2")


def _terms(report: dict) -> str:
    tg = report.get("term_groups") or {}
    groups = tg.get("groups") or {}
    if not groups:
        return note("Term-group balance: not measured (no data.curate.term_groups).")
    rows = []
    for g, v in groups.items():
        top = ", ".join(f"{t} {n}" for t, n in list((v.get("top_terms") or {}).items())[:8]) or "none"
        rows.append((g, float(v.get("per_10k_words") or 0.0), f"{g}: {v.get('count', 0):,} mentions, {v.get('per_10k_words')} per 10k words; top terms: {top}"))
    return bar_chart(rows, title=f"Term-group balance, train split (mentions per 10k words, of {tg.get('words', 0):,} words)",
                     chart_id="terms", cls="s3")


def _pii(report: dict) -> str:
    pii = report.get("pii") or {}
    kinds = pii.get("by_kind") or {}
    if not kinds:
        return note("PII: none found." if pii else "")
    verb = "redacted" if pii.get("action") == "redact" else pii.get("action", "found")
    rows = [(k, float(v), f"{k}: {v:,} {verb}") for k, v in kinds.items()]
    return bar_chart(rows, title=f"PII {verb} (in {pii.get('documents', 0):,} documents)", chart_id="pii", cls="s4")


def data_section(rd) -> Section:
    report = read_json(rd.report_path)
    stats = read_json(rd.stats_path)
    if report is None and stats is None:
        missing = "no prepare/ in this run" if rd.manifest("prepare") is None else "prepare/ has no report.json or stats.json"
        return Section("data", "Data", "", f"{missing}: run 'llmctl prepare CONFIG'")
    parts = []
    if stats:
        rows = [{"split": k, **v} for k, v in (stats.get("splits") or {}).items()]
        parts.append(f"<p>Format <code>{stats.get('format')}</code>, source <code>{stats.get('source')}</code>, "
                     f"vocabulary {stats.get('vocab_size', 0):,}, block size {stats.get('block_size')}.</p>")
        parts.append(table(rows, ["split", "documents", "tokens", "blocks", "bytes_per_token"],
                           ["split", "documents", "tokens", "blocks", "bytes/token"]))
    if report:
        parts += [_removed(report), _lengths(report), _languages(report), _terms(report), _pii(report)]
    else:
        parts.append(note("No curation report (prepare/report.json): curation was off or prepare predates it."))
    return Section("data", "Data", "".join(p for p in parts if p))
