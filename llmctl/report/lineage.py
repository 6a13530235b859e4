"""The export section (sizes and perplexity deltas per artifact, from the export manifest's
compression report) and the lineage section (which run, config, data and teacher made the model)."""

from __future__ import annotations

from llmctl.report.common import Section, kv_table, note, table
from llmctl.report.svg import bar_chart

STAGES = ("prepare", "train", "eval", "generate", "export", "explain")


def export_section(rd) -> Section:
    m = rd.manifest("export")
    if m is None:
        return Section("export", "Export", "", "no export/ in this run: run 'llmctl export CONFIG'")
    if m.get("status") != "complete":
        return Section("export", "Export", "", f"export/ is {m.get('status')}: run 'llmctl export CONFIG' to finish it")
    h = m.get("headline") or {}
    files = m.get("files") or {}
    parts = []
    sizes = [(f, float(h[f + "_mb"]), f"{f}: {h[f + '_mb']} MB") for f in m.get("formats", []) if isinstance(h.get(f + "_mb"), (int, float))]
    parts.append(bar_chart(sizes, title="Exported size per format (MB)", unit=" MB", chart_id="export-sizes", cls="s2"))
    rep = m.get("report") or {}
    rows = rep.get("rows") or []
    if rows:
        parts.append(table(rows, ["name", "size_bytes", "perplexity", "ppl_delta_pct", "decode_tokens_per_s", "error"],
                           ["artifact", "bytes", "perplexity", "delta vs f32 (%)", "decode tok/s", "error"]))
        deltas = [(r["name"], float(r["ppl_delta_pct"]), f"{r['name']}: perplexity {r.get('perplexity')} ({r['ppl_delta_pct']:+.3f}% vs f32)")
                  for r in rows if isinstance(r.get("ppl_delta_pct"), (int, float))]
        parts.append(bar_chart(deltas, title="Perplexity change against f32 (%)", unit="%", chart_id="export-ppl", signed=True, cls="s1"))
        parts.append(note(f"Perplexity on {rep.get('perplexity_source')} ({rep.get('perplexity_tokens', 0):,} tokens)."))
    else:
        parts.append(note("No compression report (export.report was off): sizes only."))
    verified = h.get("max_abs_diff") or {}
    if verified:
        parts.append(kv_table([(f"max |logit diff| {k or 'hf'} vs trained model", v) for k, v in verified.items()]))
    parts.append(table([{"file": k, "bytes": v.get("size"), "sha256": (v.get("sha256") or "")[:16]} for k, v in list(files.items())[:30]],
                       ["file", "bytes", "sha256"], ["file", "bytes", "sha256 (first 16)"]))
    return Section("export", "Export", "".join(p for p in parts if p))


def lineage_section(rd) -> Section:
    rows = []
    for s in STAGES:
        m = rd.manifest(s)
        if m is None:
            continue
        rows.append({"stage": s, "status": m.get("status"), "id": (m.get("id") or "")[:12], "config_hash": m.get("config_hash"),
                     "finished": m.get("finished_at") or m.get("started_at"), "inputs": ", ".join(f"{k} {(v.get('id') or '')[:12]}" for k, v in (m.get("lineage") or {}).items())})
    if not rows:
        return Section("lineage", "Lineage", "", "no stage has run in this directory")
    parts = [table(rows, ["stage", "status", "id", "config_hash", "finished", "inputs"], ["stage", "status", "run id", "config hash", "finished", "made from"])]
    prep = (rd.manifest("prepare") or {})
    train = rd.manifest("train") or {}
    cv = train.get("config_values") or {}
    facts = [
        ("run directory", str(rd.root.resolve())),
        ("config file", train.get("config_file") or prep.get("config_file")),
        ("data fingerprint (prepare config hash)", prep.get("config_hash")),
        ("data: documents / train tokens", f"{(prep.get('headline') or {}).get('documents')} / {(prep.get('headline') or {}).get('train_tokens')}" if prep else None),
        ("base model", cv.get("model.name_or_path") or ("from scratch: " + str(cv.get("model.arch")) if cv else None)),
        ("train method", cv.get("train.method")),
        ("teacher", _teacher(train.get("teacher"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in (train.get("versions") or prep.get("versions") or {}).items()) or None),
        ("device", train.get("device") or (train.get("headline") or {}).get("device")),
    ]
    parts.append(kv_table(facts))
    return Section("lineage", "Lineage", "".join(parts))


def _teacher(rec: dict | None) -> str | None:
    if not rec:
        return None
    where = rec.get("run_dir") or rec.get("path") or rec.get("source")
    extra = f", run id {rec['run_id'][:12]}" if rec.get("run_id") else ""
    return f"{where} ({rec.get('kind', '?')}{extra}, model hash {(rec.get('model_hash') or '')[:12]})"
