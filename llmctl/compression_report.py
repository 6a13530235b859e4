"""The compression report: each exported artifact's size, perplexity and decode speed vs f32.

Every artifact is loaded the way a user would load it (an HF directory with
`from_pretrained`, a GGUF file with transformers' GGUF reader, which dequantizes to float32)
and scored with `llmctl eval`'s own perplexity routine (llmctl/heldout.py) on eval's held-out
data, windows and stride: the f32 row is the number `llmctl eval` reports. Rows for our own
runtime quantization (`--quantize int8|int4` on the f32 model) are measured the same way.

An evaluation, not an exporter: `llmctl export` calls `build` after writing (export.report),
and it sits beside heldout.py so the exporters import nothing eval-side.

Decode tokens/s is our own single-stream greedy decode (transformers `generate`). It is
not measured for GGUF files: dequantized to float32 they run at f32 speed in transformers,
which says nothing about llama.cpp's speed on the quantized file.
"""

from __future__ import annotations

import time
from pathlib import Path

DECODE_PROMPT = "def main():\n    "
# The report may take at most this many times the export's own seconds: past it, every row scores
# the same first tokens of the held-out data (never fewer than REPORT_MIN_TOKENS), and says so.
# export.report_max_tokens, when set, is the user's choice and is kept as it is.
REPORT_BUDGET_X = 3.0
REPORT_MIN_TOKENS = 4096
PROBE_TOKENS = 512


def heldout_data(cfg, rd, tok, max_tokens: int | None):
    """(eval's held-out data, or None; None, or why it is missing)."""
    from llmctl import heldout
    from llmctl.errors import LlmctlError

    try:
        return heldout.load(cfg, rd, tok, max_tokens=max_tokens), None
    except LlmctlError as e:
        return None, str(e)
    except (OSError, ValueError) as e:
        return None, f"cannot read {rd.dataset_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def decode_tokens_per_s(model, tok, new_tokens: int, reps: int = 2) -> float | None:
    """Best-of-`reps` single-stream greedy decode speed as `llmctl generate` decodes (the lean
    path where it covers the model, else `model.generate`), exactly `new_tokens` each (no EOS)."""
    if new_tokens <= 0:
        return None
    import torch

    from llmctl.generation import Sampling, _lean_for, lean_generate

    from llmctl.inference.context import encode_one

    ids = torch.tensor([encode_one(tok, DECODE_PROMPT)], device=model.device)  # BOS as generate feeds it
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = dict(do_sample=False, temperature=None, top_k=None, top_p=None, pad_token_id=tok.pad_token_id, eos_token_id=None)
    dec = _lean_for(model, enc["input_ids"].shape[1] + new_tokens)

    def one(n: int) -> int:
        if dec is not None:
            out, _ = lean_generate(dec, tok, enc, Sampling(max_new_tokens=n), n, set())
        else:
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, **kw)
        return out.shape[1] - enc["input_ids"].shape[1]

    best = 0.0
    with torch.no_grad():
        one(2)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            n = one(new_tokens)
            best = max(best, n / (time.perf_counter() - t0))
    return round(best, 1)


def fit_to_budget(held, model, tok, cfg, n_rows: int, load_s: float, allowed_s: float):
    """(held, None), or (its first tokens, a line saying so) when scoring `n_rows` artifacts on all
    of `held` would not fit in `allowed_s`: the rate is measured on PROBE_TOKENS with `model`, and
    each row is charged `load_s` for loading."""
    import time

    from llmctl import heldout

    total = held.tokens
    if total <= REPORT_MIN_TOKENS:
        return held, None
    probe = heldout.first_tokens(held, PROBE_TOKENS, tok)
    t0 = time.perf_counter()
    heldout.perplexity(model, tok, probe, cfg)
    rate = probe.tokens / max(time.perf_counter() - t0, 1e-6)  # tokens/s, the first call's warm-up included: conservative
    fits = int(rate * max(allowed_s - n_rows * load_s, 0.0) / n_rows)
    if fits >= total:
        return held, None
    keep = max(REPORT_MIN_TOKENS, fits)
    line = (f"report limited to the first {keep} of {total} held-out tokens, so that it takes about {REPORT_BUDGET_X:g}x the export's own time "
            f"(scoring all of them in {n_rows} rows would take about {n_rows * (total / rate + load_s):.0f} s); "
            f"set export.report_max_tokens to choose")
    return heldout.first_tokens(held, keep, tok), line


def build(cfg, rd, tok, artifacts: list[dict], con, export_seconds: float | None = None) -> dict:
    """Measure every artifact; `artifacts`: [{"name", "path", "kind": hf|gguf|runtime, "quantize"?}].

    The first row is the float32 reference (the trained model). Failures to load or score an
    artifact are recorded in its row, not raised: the export itself was verified already.
    `export_seconds`: the export's own time; with it (and no export.report_max_tokens) the report
    keeps to REPORT_BUDGET_X times that, scoring fewer held-out tokens if it must (fit_to_budget).
    """
    from llmctl import heldout
    from llmctl.errors import Interrupted
    from llmctl.modeling import load_for_inference
    from llmctl.quantize import model_bytes

    e = cfg.export
    t_start = time.perf_counter()
    held, skipped = heldout_data(cfg, rd, tok, e.report_max_tokens)
    scored: dict = {}
    rows: list[dict] = []
    ref: dict = {}
    limit = None
    decode = e.report_decode_tokens > 0
    n_decode = sum(1 for a in artifacts if a["kind"] != "gguf")
    for a in artifacts:
        row = {"name": a["name"], "path": str(a["path"]), "loader": a.get("loader", "")}
        size = model_bytes(Path(a["path"])) if a["kind"] != "runtime" else None
        row["size_bytes"] = size
        try:
            import torch

            t_load = time.perf_counter()
            model, mtok = load_for_inference(str(a["path"]), device=torch.device("cpu"), quantize=a.get("quantize"))
            if not rows and held is not None and export_seconds and e.report_max_tokens is None:
                now = time.perf_counter()
                held, limit = fit_to_budget(held, model, tok, cfg, len(artifacts), now - t_load, REPORT_BUDGET_X * export_seconds - (now - t_start))
                if limit:
                    con.warn(f"export: {limit}")
            if held is not None:
                # Eval's routine, the run's token ids: every artifact reads the same tokens.
                scored = heldout.perplexity(model, tok, held, cfg)
                row["perplexity"] = scored["perplexity"]
            if not rows and decode and export_seconds and n_decode:
                # Decode timing is the slowest part at real size: drop it from every row (and say so)
                # when the report would run past its budget and decode timing is a good part of it.
                now = time.perf_counter()
                rate = decode_tokens_per_s(model, mtok, 4, reps=1) or 1.0  # tokens/s after its own warm-up
                decode_s = n_decode * (2 + 2 * e.report_decode_tokens) / rate
                others_s = (len(artifacts) - 1) * (now - t_load)  # each row loads and scores as the reference did
                allowed = REPORT_BUDGET_X * export_seconds
                total = (time.perf_counter() - t_start) + others_s + decode_s
                if total > allowed and decode_s >= 0.25 * total:  # past the budget, and decode is a real part of why
                    decode = False
                    line = (f"decode tokens/s not measured: timing {n_decode} rows would take about {decode_s:.0f} s, past the report's budget "
                            f"of {REPORT_BUDGET_X:g}x the export's own {export_seconds:.0f} s; measure one artifact with `llmctl generate`")
                    limit = f"{limit}; {line}" if limit else line
                    con.warn(f"export: {line}")
            if a["kind"] != "gguf" and decode:
                row["decode_tokens_per_s"] = decode_tokens_per_s(model, mtok, e.report_decode_tokens)
            del model
        except Interrupted:  # SIGINT/SIGTERM stop the export; they are not a row's failure
            raise
        except Exception as exc:  # a row that cannot be measured says why; the export stands
            row["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        if not ref:
            ref = row
        f32_size = ref.get("size_bytes")
        if size and f32_size:
            row["size_ratio"] = round(size / f32_size, 4)
        if row.get("perplexity") is not None and ref.get("perplexity"):
            row["ppl_delta_pct"] = round(100 * (row["perplexity"] / ref["perplexity"] - 1), 3)
        if row.get("decode_tokens_per_s") and ref.get("decode_tokens_per_s"):
            row["decode_speedup"] = round(row["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 3)
        rows.append(row)
        con.info(f"  report {row['name']}: " + ", ".join(f"{k} {row[k]}" for k in ("size_bytes", "perplexity", "ppl_delta_pct", "decode_tokens_per_s", "error") if row.get(k) is not None))
    notes = [
        "perplexity: llmctl eval's routine on eval's held-out data, window and stride (prompt/completion and chat rows: each completion after its own prompt).",
        "GGUF files are scored through transformers' GGUF reader, which dequantizes to float32: the perplexity is the file's, decode speed is not measured (use llama.cpp).",
        "decode tokens/s: best of 2 single-stream greedy runs on this machine's CPU; noisy on a shared machine.",
    ]
    if held is not None and held.total_tokens is not None and not limit:
        notes.insert(0, f"perplexity over the first {held.tokens} of {held.total_tokens} held-out tokens (export.report_max_tokens): not the number llmctl eval reports.")
    return {
        "reference": artifacts[0]["name"] if artifacts else None,
        "perplexity_source": held.source if held is not None else None,
        "perplexity_tokens": held.tokens if held is not None else 0,
        "perplexity_of_tokens": (held.total_tokens or held.tokens) if held is not None else 0,  # eval's count
        "perplexity_skipped": skipped,
        "window": scored.get("max_length"),
        "stride": scored.get("stride"),
        "decode_new_tokens": e.report_decode_tokens,
        "notes": ([limit] if limit else []) + notes,
        "limit": limit,
        "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def table(report: dict) -> list[str]:
    """The report as aligned text lines (printed at the end of `llmctl export`)."""
    head = f"{'artifact':<24} {'size':>10} {'vs f32':>7} {'perplexity':>11} {'delta':>8} {'tok/s':>7} {'speed':>6}"
    lines = [head, "-" * len(head)]

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in report.get("rows", []):
        size = f"{r['size_bytes'] / 1e6:.2f} MB" if r.get("size_bytes") else "-"
        delta = f"{r['ppl_delta_pct']:+.2f}%" if r.get("ppl_delta_pct") is not None else "-"
        lines.append(
            f"{r['name']:<24} {size:>10} {num(r.get('size_ratio'), '.3f'):>7} {num(r.get('perplexity'), '.3f'):>11} "
            f"{delta:>8} {num(r.get('decode_tokens_per_s'), '.1f'):>7} {num(r.get('decode_speedup'), '.2f'):>6}"
            + (f"  ({r['error']})" if r.get("error") else "")
        )
    if report.get("limit"):
        lines.append(report["limit"])
    if report.get("perplexity_skipped"):
        lines.append(f"perplexity not measured: {report['perplexity_skipped']}")
    else:
        part = "" if report.get("perplexity_of_tokens", report["perplexity_tokens"]) == report["perplexity_tokens"] else f" (the first of {report['perplexity_of_tokens']}: not eval's number)"
        stride = f", stride {report['stride']}" if report.get("stride") not in (None, report.get("window")) else ""
        lines.append(f"perplexity: {report['perplexity_tokens']} tokens{part} of {report['perplexity_source']}, window {report['window']}{stride}")
    return lines
