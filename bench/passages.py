"""The measured figures README.md and docs/ quote, generated from bench/results.json.

Each passage sits between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`; a test
keeps them equal to what this renders. After a benchmark run (bench/run_all.py does this):

    python bench/passages.py        # rewrites the marked passages in README.md and docs/*.md
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FILES = ["README.md", "docs/serve.md", "docs/safety.md"]


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s"


def _n(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def _machine(res: dict) -> str:
    m = (res.get("metrics") or {}).get("machine") or {}
    if not m:
        return ""
    threads = f", {m['torch_threads']} torch thread(s)" if m.get("torch_threads") else ""
    return f"{m.get('cpus')} CPUs{threads}, load average {m.get('load_avg_1m')} at the start"


def _quickstart_time(r: dict) -> str:
    q = r.get("quickstart", {}).get("metrics")
    if not q:
        return "Its time on 2 CPU cores is not measured yet for the current task (`python bench/run_all.py quickstart` measures it; see \"Measured\" below)."
    return f"On {q['cpus']} CPU cores the whole run took {_minutes(q['seconds'])} when measured (see \"Measured\" below)."


def _quickstart(r: dict) -> list[str]:
    q = r.get("quickstart", {}).get("metrics")
    if not q:
        return ["- quickstart (`make demo`): not measured yet for the current held-out task (`python bench/run_all.py quickstart`)."]
    e, t = q["eval"], q["train"]
    out = [
        f"- `make demo` (`llmctl run configs/quickstart.yaml`, from scratch, {_machine(r['quickstart'])}): "
        f"{_minutes(q['seconds'])} ({q['seconds_measured_as']}). {q['documents']} stdlib documents, "
        f"{q['train_tokens'] / 1e6:.2f}M training tokens, a {t['parameters'] / 1e6:.2f}M-parameter llama, "
        f"{t['steps']} steps in {t['seconds']:.0f} s.",
        f"  Held-out perplexity {_n(e['init_perplexity'])} before training -> {_n(e['perplexity'])} after "
        f"(unigram baseline {_n(e['baseline_unigram_perplexity'])}). BLEU on {e['examples']} held-out "
        f"line-completion pairs (complete a line of a held-out file from its first half and the lines before it): "
        f"{_n(e['init_bleu'])} before -> {_n(e['bleu'])} after (copy-the-prompt baseline {_n(e['baseline_copy_bleu'])}; "
        f"chrF {_n(e['chrf'])}, exact match {e['exact_match']:.2f}).",
    ]
    if q.get("exports"):
        out.append(f"  Exports: {q['exports']}.")
    return out


ROWS = [  # (benchmark, ratio key in results.json, how README names it)
    ("prepare", "prepare tokens/s vs run_clm.py recipe", "tokens/s vs transformers' run_clm.py recipe (`load_dataset` -> `map` -> `group_texts`)"),
    ("prepare", "prepare peak RSS vs run_clm.py recipe (lower better)", "peak RSS vs the run_clm.py recipe (lower is better)"),
    ("prepare", "prepare tokens/s vs raw encode_batch (the limit)", "tokens/s vs raw `tokenizers` `encode_batch` (the limit)"),
    ("curate", "curation share of prepare CPU time (lower better)", "data curation's share of the quickstart prepare's CPU time (lower is better)"),
    ("train", "train tokens/s llmctl vs bare PyTorch", "tokens/s vs a bare PyTorch loop (best of 3 each)"),
    ("schedule_fit", "step-count bits/byte / time-fitted bits/byte (equal wall time)", "`max_time` run: step-count schedule's bits/byte over the time-fitted one's (equal wall time)"),
    ("generate", "generate batched(8) vs sequential", "batched (8) vs one prompt at a time"),
    ("generate", "generate batched(8) vs transformers pipeline(batch_size=8)", "batched (8) vs `transformers.pipeline` (batch_size=8)"),
    ("generate", "generate one prompt streamed vs bare model.generate", "one prompt streamed vs bare `model.generate`"),
    ("eval", "eval perplexity tokens/s vs lm-eval loglikelihood_rolling", "perplexity tokens/s vs lm-eval `loglikelihood_rolling`"),
    ("eval", "eval log-likelihood relative difference vs lm-eval", "log-likelihood relative difference vs lm-eval (same number)"),
    ("serve", "serve throughput 8 clients vs 1", "requests/s, 8 clients vs 1"),
    ("serve", "llmctl single-stream decode vs transformers generate (in-process)", "single-stream decode (the engine's lean path) vs `model.generate`, in-process"),
    ("serve", "serve 1 client tokens/s vs transformers generate in-process", "1 client over HTTP, tokens/s vs `model.generate` in-process"),
    ("serve", "serve per-request overhead ms (1 client, 1-token requests, p50)", "per-request overhead: a 1-token request's latency minus the same generation in-process, ms (p50; lower is better)"),
    ("serve", "serve overhead ms per 32-token request (1 client, p50)", "the same difference on 32-token requests, ms (p50; adds per-token bookkeeping)"),
    ("serve", "serve 8 clients tokens/s vs llama-server (same weights)", "8 clients, tokens/s vs llama.cpp's `llama-server` (same weights, f32 GGUF)"),
    ("serve", "serve errors (all phases)", "errors (all phases)"),
    ("serve", "serve tokens/s with logprobs=5 vs without (8 clients)", "tokens/s with `logprobs: 5` vs without (8 clients)"),
    ("serve", "safety rails p50 ms per request (default)", "safety rails, p50 ms per request (default rails; lower is better)"),
    ("serve", "safety rails p50 ms per request (redact/block)", "safety rails, p50 ms per request (redact/block; lower is better)"),
    ("safety", "safety detectors: benign fixture lines flagged", "detectors: lines of the benign-code fixture flagged (lower is better)"),
    ("safety", "safety detectors: stdlib lines flagged other than e-mail", "detectors: stdlib lines flagged, other than e-mail (lower is better)"),
    ("safety", "safety detectors: recall, lowest kind", "detectors: recall on the positive examples, lowest kind"),
    ("safety", "safety classifier: benign fixture lines flagged at 0.9, %", "profanity classifier: benign-code fixture lines flagged at 0.9, % (lower is better)"),
    ("safety", "safety classifier: stdlib lines flagged at 0.9, %", "profanity classifier: stdlib lines flagged at 0.9, %"),
    ("compress", "compress --quantize int8 decode vs f32", "`--quantize int8` single-stream decode vs f32"),
    ("compress", "compress --quantize int8 |delta ppl| %", "`--quantize int8` perplexity change vs f32, % (lower is better)"),
    ("compress", "compress gguf q8_0 |delta ppl| %", "GGUF q8_0 perplexity change vs f32, % (lower is better)"),
]


def _fmt(v: float) -> str:
    if v != 0 and abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.2f}"


def _details(r: dict) -> list[str]:
    out = []
    for fn in (_prepare_line, _generate_line, _eval_line, _serve_line, _schedule_line, _compress_line):
        try:
            line = fn(r)
        except (KeyError, TypeError):  # a row from an older benchmark format: not quoted
            line = None
        if line:
            out.append(line)
    return out


def _prepare_line(r: dict) -> str | None:
    p = (r.get("prepare") or {}).get("metrics")
    if p:
        return (f"- prepare ({p['corpus_bytes'] / 1e6:.1f} MB, {p['documents']} documents, block {p['block_size']}, best of {p['rounds']}): "
                   f"llmctl {_n(p['llmctl']['tokens_per_s'], 0)} tokens/s, peak RSS {p['llmctl']['peak_rss_mb']:.0f} MB; "
                   f"run_clm.py recipe {_n(p['run_clm']['tokens_per_s'], 0)} tokens/s, {p['run_clm']['peak_rss_mb']:.0f} MB; "
                f"raw `encode_batch` {_n(p['encode_batch_tokens_per_s'], 0)} tokens/s.")
    return None


def _generate_line(r: dict) -> str | None:
    g = (r.get("generate") or {}).get("metrics")
    if g:
        return (f"- generate ({g['new_tokens']} new tokens, greedy, best of {g['rounds']}): batched {_n(g['batched_tokens_per_s'], 1)}, "
                   f"one at a time {_n(g['sequential_tokens_per_s'], 1)}, pipeline {_n(g['pipeline_tokens_per_s'], 1)} tokens/s; "
                f"one prompt: llmctl streamed {_n(g['single_llmctl_tokens_per_s'], 1)}, `model.generate` {_n(g['single_generate_tokens_per_s'], 1)} tokens/s.")
    return None


def _eval_line(r: dict) -> str | None:
    e = (r.get("eval") or {}).get("metrics")
    if e:
        return (f"- eval ({e['files']} stdlib files as written, {_n(e['tokens'], 0)} tokens, window {e['window']}, batch {e['batch_size']}, "
                   f"end to end, best of {e['rounds']}): llmctl {e['llmctl']['seconds']:.1f} s ({_n(e['llmctl']['tokens_per_s'], 0)} tokens/s, "
                   f"perplexity {e['llmctl']['perplexity']}), lm-eval {e['lm_eval']['seconds']:.1f} s ({_n(e['lm_eval']['tokens_per_s'], 0)} tokens/s, "
                f"perplexity {e['lm_eval']['perplexity']})." + _eval_tasks(e.get("tasks")))
    return None


def _eval_tasks(t: dict | None) -> str:
    if not t:
        return ""
    return (f" A local lm-eval task ({t['questions']} four-way questions, {_n(t['tokens'], 0)} tokens, best of {t['rounds']}): "
            f"`llmctl eval` {t['llmctl']['seconds']:.1f} s ({_n(t['llmctl']['tokens_per_s'], 0)} tokens/s, acc {t['llmctl']['acc']:.4f}), "
            f"`lm_eval --model hf` {t['lm_eval']['seconds']:.1f} s ({_n(t['lm_eval']['tokens_per_s'], 0)} tokens/s, acc {t['lm_eval']['acc']:.4f}).")


def _serve_line(r: dict) -> str | None:
    s = (r.get("serve") or {}).get("metrics")
    if not s or "single_stream" not in s:
        return None
    one, ref = s["single_stream"], s.get("llama_server") or {}
    line = (f"- serve ({s['model']}, {s['max_tokens']} new tokens, greedy, {one['threads']} engine thread(s)): 1 client "
            f"{_n(s['clients_1']['tokens_per_s'], 1)} tokens/s, 8 clients {_n(s['clients_8']['tokens_per_s'], 1)} tokens/s "
            f"(p95 {s['clients_8']['p95_s']:.3f} s); in-process single stream: llmctl {_n(one['llmctl_tokens_per_s'], 1)}, "
            f"`model.generate` {_n(one['generate_tokens_per_s'], 1)} tokens/s; overhead per request "
            + (f"{one['serve_fixed_overhead_ms_p50']:.1f} ms (1-token requests), " if "serve_fixed_overhead_ms_p50" in one else "")
            + f"{one['serve_overhead_ms_p50']:.1f} ms on 32-token requests.")
    if "serve_tokens_per_s" in one:
        line += (f" Interleaved single-stream rounds (median of {one['rounds']}): serve over HTTP {_n(one['serve_tokens_per_s'], 1)} tokens/s, "
                 f"{one['serve_vs_generate']:.2f}x `model.generate`.")
    if "clients_8" in ref and "llmctl_vs_llama_server" in ref["clients_8"]:
        c1, c8 = ref["clients_1"], ref["clients_8"]
        line += (f" Against llama-server on the same weights, alternating rounds (median of {len(c8['rounds'])}): 1 client "
                 f"{_n(c1['llmctl']['tokens_per_s'], 1)} vs {_n(c1['llama_server']['tokens_per_s'], 1)} tokens/s "
                 f"({c1['llmctl_vs_llama_server']:.2f}x), 8 clients {_n(c8['llmctl']['tokens_per_s'], 1)} vs "
                 f"{_n(c8['llama_server']['tokens_per_s'], 1)} tokens/s ({c8['llmctl_vs_llama_server']:.2f}x; rounds "
                 f"{', '.join(f'{x:.2f}' for x in c8['rounds'])}; p95 {c8['llmctl']['p95_s']:.3f} vs {c8['llama_server']['p95_s']:.3f} s).")
    elif "clients_8" in ref:
        line += (f" llama-server on the same weights: 1 client {_n(ref['clients_1']['tokens_per_s'], 1)}, 8 clients "
                 f"{_n(ref['clients_8']['tokens_per_s'], 1)} tokens/s (p95 {ref['clients_8']['p95_s']:.3f} s).")
    elif ref.get("skipped"):
        line += f" llama-server: not measured ({ref['skipped']})."
    lp = (s.get("logprobs_rounds") or {}).get("with_vs_without")
    if lp:
        line += f" `logprobs: 5` vs none at 8 clients, alternating rounds: {', '.join(f'{x:.2f}' for x in lp)}."

    return line


def _schedule_line(r: dict) -> str | None:
    m = (r.get("schedule_fit") or {}).get("metrics")
    if not m:
        return None
    f, s = m["time_fitted"][0], m["step_count"][0]
    return (f"- `train.max_time` schedule ({m['budget_s']:.0f} s budget each, {m['rounds']} alternating rounds, median): time-fitted "
            f"{m['time_fitted_bits_per_byte']:.4f} bits/byte ({f['steps']} steps, ends at lr {f['last_lr']:.1e}) vs step-count "
            f"{m['step_count_bits_per_byte']:.4f} ({s['steps']} of {s['schedule_steps']} planned steps, cut at lr {s['last_lr']:.1e}).")


def _compress_line(r: dict) -> str | None:
    c = (r.get("compress") or {}).get("metrics")
    if not c:
        return None
    parts = []
    for name, t in c["types"].items():
        bits = []
        if t.get("size_ratio") is not None:
            bits.append(f"{t['size_ratio']:.2f} of f32's size")
        if t.get("ppl_delta_pct") is not None:
            bits.append(f"perplexity {t['ppl_delta_pct']:+.2f}%")
        if t.get("decode_tokens_per_s") is not None:
            bits.append(f"{t['decode_tokens_per_s']:.1f} tokens/s")
        if t.get("llama_cpp_decode_tokens_per_s") is not None:
            bits.append(f"{t['llama_cpp_decode_tokens_per_s']:.1f} tokens/s in llama.cpp")
        if bits:
            parts.append(f"{name}: " + ", ".join(bits))
    big = c["scale_decode_tokens_per_s"]
    return (f"- compress ({c['model']}, {c['params'] / 1e6:.2f}M parameters, f32 perplexity {c['f32_perplexity']} on "
            f"{_n(c['perplexity_tokens'], 0)} validation tokens; decode {c['decode_new_tokens']} new tokens, best of {c['rounds']} alternating): "
            + "; ".join(parts) + f". On a {c['scale_model']}: f32 {big.get('f32', 0):.1f}, int8 {big.get('int8', 0):.1f}, "
            f"int4 {big.get('int4', 0):.1f} tokens/s (int8 {c['scale_int8_decode_speedup']:.2f}x f32)." + _linear_bits(c))


def _linear_bits(c: dict) -> str:
    lin = c.get("int8_linear_one_token")
    if not lin:
        return ""
    return (" One Linear at one token, f32 vs the dynamic int8 Linear (microseconds per call): "
            + ", ".join(f"{k} {v['f32_us']:.1f} vs {v['int8_us']:.1f} ({v['int8_speedup']:.2f}x)" for k, v in lin.items()) + ".")


# Rows measured on bench/_model.py's realistic models: they lead "Measured" (the `realistic` passage).
REALISTIC = ["realsize", "compress-85m", "eval-85m", "train-85m", "train-0.5b", "bounded"]
REALISTIC_COMMANDS = [  # (row, command, expected wall time on 2 quiet cores)
    ("85M model", "python bench/_model.py 85m", "prepare and about an hour of training the first time; cached in `~/.cache/llmctl-bench` after"),
    ("0.5B model", "python bench/_model.py 0.5b", "about 5 minutes the first time; cached after"),
    ("realsize", "LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/realsize.py", "serve and generate at 85M against llama-server; about 20 minutes"),
    ("compress-85m", "python bench/compress.py --size 85m", "about 15 minutes"),
    ("eval-85m", "python bench/eval.py --size 85m", "about 10 minutes"),
    ("train-85m", "python bench/train.py --size 85m", "about 15 minutes"),
    ("train-0.5b", "python bench/train.py --size 0.5b", "about 20 minutes"),
    ("bounded", "python bench/bounded.py", "about 20 minutes"),
]


def _params(res: dict) -> str:
    """A row's model_params as README shows it: 88.1M, 1.33M, teacher 1.33M / student 0.70M, or '-' (no model)."""
    p = (res or {}).get("model_params")
    if isinstance(p, dict):
        return " / ".join(f"{k} {_params({'model_params': v})}" for k, v in p.items())
    if not isinstance(p, (int, float)):
        return "-"
    return f"{p / 1e9:.2f}B" if p >= 1e9 else f"{p / 1e6:.1f}M" if p >= 1e7 else f"{p / 1e6:.2f}M"


def _training_line(c: dict) -> str | None:
    t = c.get("training")
    if not t:
        return None
    s = t.get("settings") or {}
    val = f", validation loss {t['final_val_loss']:.3f} (perplexity {math.exp(t['final_val_loss']):,.1f})" if t.get("final_val_loss") else ""
    wall = f" in {_minutes(c['training_seconds'])}" if c.get("training_seconds") else ""
    return (f"- The 85M model of the compress-85m rows ({_params({'model_params': c['model_params']})} parameters: 12 layers x 768, GQA 12/4, MLP 2048, "
            f"a 16k BPE trained on the builtin corpus) was trained by `llmctl train`: {t['steps']} steps of "
            f"{s.get('micro_batch_size')} x 256 tokens ({t['tokens']:,} tokens, {s.get('precision', 'fp32')}, lr {s.get('lr')}){wall}; "
            f"final training loss {t['final_loss']:.3f}{val}. The eval-85m and train-85m rows measure speed and agreement "
            "(with lm-eval, with a bare peft + Trainer run) on the same architecture, whichever training of it was cached when they ran."
            + (" **Far too short for its perplexity to mean anything: the perplexity deltas below only show the pipeline works.**"
               if t["steps"] < 100 else ""))


def _bounded_lines(b: dict) -> list[str]:
    m = b["metrics"]
    out = [f"- Bounded at 0.5B ({m['model']}; {m['lora_steps']} LoRA steps, only the costs are measured; `{m.get('uptime', '')}`):", "",
           "| stage | wall time | peak RSS |", "|---|---|---|"]
    for name, s in m["stages"].items():
        extra = f" (ready in {s['ready_seconds']:.0f} s, one {s['completion_tokens']}-token completion in {s['request_seconds']:.1f} s)" if name == "serve" else ""
        out.append(f"| {name} | {s['seconds']:.0f} s{extra} | {s['peak_rss_mb'] / 1024:.2f} GB |")
    v = m.get("eval_vocabulary") or {}
    if v:
        out += ["", "  Eval's memory against the vocabulary (the same text, window and batch): " + "; ".join(
            f"{k} vocabulary ({_params({'model_params': x['params']})} parameters): peak RSS {x['peak_rss_mb']:,.0f} MB, of which weights "
            f"{x['weights_mb']:,.0f} MB, the rest {x['working_mb']:,.0f} MB" for k, x in v.items()) + "."]
    if m.get("export_report_seconds") is not None:
        out.append(f"  Export: the formats took {m['export_seconds_formats']:.0f} s, its compression report {m['export_report_seconds']:.0f} s"
                   + (f" ({m['export_report_limit']})" if m.get("export_report_limit") else "") + ".")
    return out


def _load_of(res: dict, part: str | None = None):
    """The load a row was measured at: its part's machine (realsize measures generate and serve apart), else the run's."""
    m = (res or {}).get("metrics") or {}
    return (m.get(f"{part}_machine") or m.get("machine") or {}).get("load_avg_1m", "not recorded")


def _realsize_lines(m: dict) -> list[str]:
    """Each side's tokens/s at 85M: generate in-process, serve at 1/4/8 clients."""
    out = []
    g = m.get("generate")
    if g:
        one = f", oneDNN's {g['onednn_matmuls_only_tokens_per_s']}" if "onednn_matmuls_only_tokens_per_s" in g else ""
        cpp = f" (engine llama.cpp, f32 GGUF: {g['llmctl_llama_cpp_tokens_per_s']})" if "llmctl_llama_cpp_tokens_per_s" in g else ""
        out.append(f"- generate at 85M, one stream, {g['threads']} thread(s), {g['new_tokens']} new tokens (tokens/s): llmctl {g['llmctl_tokens_per_s']}{cpp}, "
                   f"transformers `generate` {g['hf_generate_tokens_per_s']} (static cache {g['hf_generate_static_cache_tokens_per_s']}); "
                   f"the weights' matmuls alone, the ceiling of any torch decode: MKL's {g['torch_matmuls_only_tokens_per_s']}{one}. Decode path: {g['lean_path']}.")
    s = m.get("serve") or {}
    for prec, ref in (("f32", "f32 GGUF"), ("int8", "q8_0 GGUF")):
        if prec not in s:
            continue
        rows = "; ".join(f"{k.split('_')[1]} client(s): llmctl {v['llmctl_torch_tokens_per_s']} (engine llama.cpp {v['llmctl_llama_cpp_tokens_per_s']}), "
                         f"llama-server {v['llama_server_tokens_per_s']}" for k, v in s[prec].items() if k.startswith("clients_"))
        what = "`llmctl serve`" if prec == "f32" else "`llmctl serve --quantize int8`"
        out.append(f"- serve at 85M, {what} against llama-server on the {ref}, tokens/s ({m.get('threads', '?')} model threads each side): {rows}.")
    return out


def realistic(r: dict) -> str:
    busy = sorted({b for b in REALISTIC if r.get(b) and not (isinstance(_load_of(r[b]), (int, float)) and _load_of(r[b]) <= 2.5)})
    lines = ["At the size users run (issue #26), on 2 CPU cores; each row records the machine's load."
             + (f" **Provisional** ({', '.join(busy)}): measured while other jobs shared the cores (load above 2.5);"
                " rerun on a quiet machine with the commands at the end." if busy else " Every row was measured on a quiet machine."), ""]
    c = (r.get("compress-85m") or {}).get("metrics")
    if c and _training_line(c):
        lines.append(_training_line(c))
    rows = [(b, k, v) for b in REALISTIC for k, v in ((r.get(b) or {}).get("ratios") or {}).items()]
    if rows:
        lines += ["", "| benchmark | model params | ratio | value | target | met | load |", "|---|---|---|---|---|---|---|"]
        for b, k, row in rows:
            met = "-" if row["pass"] is None else "yes" if row["pass"] else "**no**"
            load = _load_of(r.get(b), "serve" if " serve " in f" {k} " else "generate" if b == "realsize" else None)
            label = k.replace("|", "\\|")  # |delta ppl| inside a table cell
            lines.append(f"| {b} | {_params(r[b])} | {label} | {_fmt(row['value'])} | {row['target']} | {met} | {load} |")
        lines.append("")
    if (r.get("realsize") or {}).get("metrics"):
        lines += _realsize_lines(r["realsize"]["metrics"])
    if c:
        t = c["types"]
        parts = [f"{name}: perplexity {x['perplexity']:.3f} ({x.get('ppl_delta_pct', 0):+.2f}%)" for name, x in t.items() if x.get("perplexity") is not None]
        cpp = [f"{name}: {x['llama_cpp_perplexity']:.3f} ({x['llama_cpp_ppl_delta_pct']:+.2f}%)" for name, x in t.items()
               if x.get("llama_cpp_perplexity") is not None and x.get("llama_cpp_ppl_delta_pct") is not None]
        lines.append(f"- compress-85m, perplexity on the first {c['perplexity_tokens']:,} validation tokens (ours): " + "; ".join(parts) + ".")
        if cpp:
            lines.append(f"  In llama.cpp itself (`llama-perplexity -c {c['llama_cpp_perplexity_ctx']}`, the same text): " + "; ".join(cpp) + ".")
    b = r.get("bounded")
    if b and b.get("metrics"):
        lines += _bounded_lines(b)
    lines += ["", "Commands (each writes its row; `python bench/run_all.py NAME` also merges it into `bench/results.json`):", ""]
    lines += [f"- {what}: `{cmd}`: {t}" for what, cmd, t in REALISTIC_COMMANDS]
    return "\n".join(lines)


def measured(r: dict) -> str:
    lines = ["Measured on this project's development machine (2 CPU cores, no GPU), shared with other",
             "jobs while measuring, so absolute figures are noisy (the load average is recorded with each",
             "benchmark in `bench/results.json`); ratios compare sides run alternately in the same conditions.", ""]
    lines += _quickstart(r)
    lines += ["- `make bench` (`bench/results.json`; load: the machine's 1-minute load average when measured):", "",
              "| benchmark | model params | ratio | value | target | met | load |", "|---|---|---|---|---|---|---|"]
    known = {(b, k) for b, k, _ in ROWS}
    extra = [(b, k, k) for b, res in r.items() for k in ((res or {}).get("ratios") or {}) if (b, k) not in known and b not in REALISTIC]
    for bench, key, label in ROWS + extra:  # a benchmark added later shows under its own ratio name
        row = ((r.get(bench) or {}).get("ratios") or {}).get(key)
        m = (r.get(bench) or {}).get("metrics") or {}
        part = m.get(f"machine_{(m.get('ratio_parts') or {}).get(key)}")  # a bench of parts measured apart: that part's load
        load = part["load_avg_1_5_15m_start"][0] if part else (m.get("machine") or {}).get("load_avg_1m", "not recorded")
        if row is None:
            lines.append(f"| {bench} | {_params(r.get(bench))} | {label} | not measured | | | |")
        else:
            met = "-" if row["pass"] is None else "yes" if row["pass"] else "**no**"
            lines.append(f"| {bench} | {_params(r.get(bench))} | {label} | {_fmt(row['value'])} | {row['target']} | {met} | {load} |")
    details = _details(r)
    if details:
        lines += [""] + details
    return "\n".join(lines)


def serve(r: dict) -> str:
    s = (r.get("serve") or {}).get("metrics")
    if not s:
        return "Numbers: not measured yet (`python bench/run_all.py serve`)."
    c1, c8 = s["clients_1"], s["clients_8"]
    rt = r["serve"]["ratios"]["serve throughput 8 clients vs 1"]["value"]
    errs = c1["errors"] + c8["errors"]
    return (f"Numbers (`bench/serve.py`, from `bench/results.json`: {s['model']}, {s['max_tokens']} new tokens, greedy, CPU, "
            f"2 shared cores): 1 client {c1['rps']:.2f} requests/s (p50 {c1['p50_s']:.2f} s), 8 clients {c8['rps']:.2f} requests/s "
            f"(p50 {c8['p50_s']:.2f} s, p95 {c8['p95_s']:.2f} s), {rt:.1f}x, {c8['tokens_per_s']:.0f} tokens/s, "
            f"{'zero errors' if errs == 0 else f'{errs} errors'}.")


def _pct(n: int, of: int) -> str:
    p = 100 * n / of if of else 0.0
    return f"{p:.3f}%" if 0 < p < 0.1 else f"{p:.1f}%"


def _rails_cost(r: dict) -> str:
    s = (r.get("serve") or {}).get("metrics") or {}
    rails = s.get("safety_rails")
    head = "- **Rails per request** (`bench/serve.py`"
    if not rails:
        return head + "): not measured yet (`python bench/run_all.py serve`)."
    d, rb = rails["default"], rails["redact_block"]
    target = ((r["serve"].get("ratios") or {}).get("safety rails p50 ms per request (default)") or {}).get("target", "-")
    where = _machine(r["serve"]) or "machine and load not recorded"
    return (f"{head}: the real server's streamed {s.get('max_tokens')}-token answers on the quickstart-sized model, then each "
            f"request's prompt check plus every streamed delta through the output guard, in-process, {d['requests']} requests; "
            f"{where}): p50 **{d['p50_ms']:.3f} ms** with the default rails (flag PII and secrets), **{rb['p50_ms']:.3f} ms** "
            f"with redacting/blocking rails and deny lists (p95 {d['p95_ms']:.2f} / {rb['p95_ms']:.2f} ms). Target: p50 {target} ms.")


def _kinds(by_kind: dict) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items(), key=lambda kv: -kv[1])) or "none"


def safety(r: dict) -> str:
    """docs/safety.md's costs and measurements: bench/serve.py's rails cost, bench/safety.py's detectors."""
    lines = ["Measured with `make bench` (figures from `bench/results.json`) on the development machine, 2 CPU",
             "cores shared with other jobs.", "", _rails_cost(r)]
    res = r.get("safety") or {}
    m = res.get("metrics")
    if not m:
        lines.append("- Detectors and classifier (`bench/safety.py`): not measured yet (`python bench/run_all.py safety`).")
        return "\n".join(lines)
    b, s, c = m["benign_fixture"], m["stdlib"], m["classifier"]
    mods = ", ".join(m["stdlib_modules"])
    benign = "no line flagged" if b["flagged_lines"] == 0 else f"{b['flagged_lines']} lines flagged ({_kinds(b['by_kind'])})"
    other = s["flagged_lines_other_than_email"]
    ex = "; ".join(f"`{e['line']}`" for e in s["examples"][:2])
    lines += [
        f"- **Detectors on benign code** (`bench/safety.py`, {_machine(res)}; `tests/fixtures/benign_code.txt`, "
        f"{b['lines']} lines of code look-alikes: versions, decorators, hashes, UUIDs, git remotes, placeholders): "
        f"{benign} (target: none). On the {s['lines']:,} non-empty lines ({s['files']} files, {s['bytes'] / 1e6:.1f} MB) of "
        f"the Python {m['python']} standard library's {mods} (each file scanned whole), {s['flagged_lines']} lines are "
        f"flagged, by kind: {_kinds(s['by_kind'])}"
        + (f" (e.g. {ex}, shown redacted)" if ex else "")
        + f"; {'no line' if other == 0 else f'{other} line' + ('' if other == 1 else 's')} with any other kind (target: none; the "
        f"authors' e-mail addresses are real PII). The scan ran at {s['mb_per_s']:.1f} MB/s.",
    ]
    rec = m["recall"]
    shown = ", ".join(f"{v['of']} {k}" for k, v in rec.items())
    if all(v["found"] == v["of"] for v in rec.values()):
        got = "100% for every kind"
    else:
        got = ", ".join(f"{k} {_pct(v['found'], v['of'])}" for k, v in rec.items())
    lines.append(f"- **Recall** on the positive examples in `tests/fixtures/safety_positives.json` (the ones "
                 f"`tests/test_safety.py` asserts on; {shown}): {got} (target: at least 95% for each).")
    if "skipped" in c:
        lines.append(f"- **The classifier**: not measured ({c['skipped']}).")
        return "\n".join(lines)
    st, bt, t = c["stdlib"], c["benign"], str(c["default_threshold"])
    at = st["flagged_at"]
    counts = ", ".join((f"**{n} at {th} ({_pct(n, st['lines'])})**" if th == t else f"{n} at {th}" if i else f"{n} flagged at threshold {th} ({_pct(n, st['lines'])})")
                       for i, (th, n) in enumerate(at.items()))
    top = ", ".join(f"`{x['line']}` {x['score']:.3f}" for x in st["top"][:3])
    btop = bt["top"][0] if bt["top"] else None
    bline = (f"On the benign fixture {bt['flagged_at'][t]} line{'' if bt['flagged_at'][t] == 1 else 's'} of {bt['lines']} at {t}"
             + (f" (its top score: \"{btop['line']}\", {btop['score']:.2f})" if btop else "") + ".")
    lines.append(f"- **The classifier** ({c['package']}; a line's score is its highest sentence's) on the same "
                 f"{st['lines']:,} stdlib lines: {counts}; the top scores: {top}. {bline} Loading it takes "
                 f"{c['load_seconds_median']:.1f} s in a fresh interpreter (median of {len(c['load_seconds'])}; "
                 f"scikit-learn); serve does it after the model loads, before it reports ready.")
    return "\n".join(lines)


def _short(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


def curate(r: dict) -> str:
    """README's data-curation paragraph: what curation did to the quickstart corpus and its CPU cost."""
    res = r.get("curate") or {}
    c = res.get("metrics")
    if not c:
        return "Its cost on the quickstart corpus is not measured yet (`python bench/run_all.py curate`)."
    share = res["ratios"]["curation share of prepare CPU time (lower better)"]
    removed = sum(c["removed"].values())
    steps = ", ".join(f"{k} {n}" for k, n in c["removed"].items()) or "none"
    ex = c.get("near_duplicate_examples") or []
    eg = f"; e.g. `{_short(ex[0][0])}` is a near duplicate of `{_short(ex[0][1])}`, Jaccard {ex[0][2]:.2f}" if ex else ""
    names = {"email": "e-mail addresses", "ip": "IP addresses", "phone": "phone numbers", "credit_card": "card numbers",
             "secret": "secrets", "private_key": "private keys"}
    pii = " and ".join(f"{n} {names.get(k, k)}" for k, n in c["pii"].items()) or "nothing"
    where = _machine(res) or "load not recorded"
    return (f"On the quickstart corpus (its first {c['corpus_bytes_cap'] / 1e6:.0f} MB; `python bench/run_all.py curate`, {where}) "
            f"curation removes {removed} of {c['documents_before']} documents ({steps}{eg}), redacts {pii}, and costs "
            f"{share['value'] * 100:.1f}% of prepare's CPU time ({c['prepare_cpu_seconds']:.1f} s with curation, "
            f"{c['prepare_cpu_seconds_without_curation']:.1f} s without; the curation step itself {c['curation_step_cpu_seconds']:.1f} s "
            f"of CPU; target: at most {float(share['target'].split()[-1]) * 100:.0f}%).")


def curate_summary(r: dict) -> str:
    """README's example of prepare's curation summary: the one bench/curate.py's run printed."""
    c = (r.get("curate") or {}).get("metrics") or {}
    if not c.get("summary"):
        return "(An example appears here once `python bench/run_all.py curate` has recorded one.)"
    return "\n".join([f"From `bench/curate.py`'s run (the quickstart corpus, its first {c['corpus_bytes_cap'] / 1e6:.0f} MB):", "",
                      "```text", *c["summary"], "```"])


def distill(r: dict) -> str:
    """README's distillation results: bench/distill.py's perplexities, verdict and speeds."""
    res = r.get("distill") or {}
    d = res.get("metrics")
    if not d:
        return "Not measured yet (`python bench/run_all.py distill`)."
    rt = res["ratios"]
    sizes = d.get("size_settings")
    if d["size"] == "full":
        head = "Measured at the quickstart size"
    else:
        head = f"Measured so far only at the **reduced `{d['size']}` size**"
    where = _machine(res) or "load not recorded"
    setup = f" ({sizes['max_bytes'] / 1e3:,.0f} KB of the corpus" + "".join(f", {k} {v}" for k, v in sizes.get("model", {}).items()) + ")" if sizes else ""
    lines = [f"{head} ({where}; {d['parallel_seeds']} seed(s) at a time, `LLMCTL_BENCH_JOBS`){setup}: a {d['teacher_layers']}-layer "
             f"teacher trained {d['teacher_steps']} steps, {d['student_layers']}-layer students {d['student_steps']} steps, alpha "
             f"{d['alpha']}, T {d['temperature']}."]
    if d["size"] != "full":
        lines[0] += " The quickstart-size run (`python bench/distill.py full`) has not been made yet."
    seeds = d["seeds"]
    ids = " / ".join(str(s["seed"]) for s in seeds)

    def per(key: str) -> str:
        have = [s for s in seeds if s.get(key) is not None]
        cell = " / ".join(f"{s[key]:.1f}" for s in have)
        return cell + ("" if len(have) == len(seeds) else f" (seed{'s' if len(have) > 1 else ''} {', '.join(str(s['seed']) for s in have)} only)")

    dropped = {tuple(s.get("pruned_layers") or ()) for s in seeds if s.get("pruned_layers")}
    pruned = f" (block influence dropped layers {', '.join(map(str, next(iter(dropped))))})" if len(dropped) == 1 else ""
    legacy = "random_kd_ppl" in seeds[0]  # older results: KD vs CE on the pruned init, random init + KD alongside
    rows = ([("pruned init" + pruned + " + KD", "kd_ppl"), ("pruned init, CE only", "ce_ppl"), ("random init + KD", "random_kd_ppl")] if legacy else
            [("random init + KD", "kd_ppl"), ("random init, CE only", "ce_ppl"), ("pruned init" + pruned + " + KD", "pruned_kd_ppl"),
             ("pruned init, CE only", "pruned_ce_ppl")])
    lines += ["", f"| model | validation perplexity (seeds {ids}) |", "|---|---|",
              f"| teacher ({d['teacher_layers']} layers, {d['teacher_steps']} steps) | {d['teacher_val_ppl']:.1f} |"]
    lines += [f"| {label}, {d['student_steps']} steps | {per(key)} |" for label, key in rows] + [""]
    kd = rt["ce_ppl / kd_ppl, worst seed"]
    verdict = f"The target (KD below CE-only on every seed{'' if legacy else ', random-init student'}) is **{'met' if kd['pass'] else 'not met'}**"
    if d.get("gap_closed_by_kd_mean") is None:
        cost = d["kd_ppl_mean"] / d["ce_ppl_mean"] - 1
        verdict += (f": the teacher ({d['teacher_val_ppl']:.1f}) is no better than the CE-only students (mean {d['ce_ppl_mean']:.1f}), "
                    f"so there is no gap to close, and pulling towards it {'costs' if cost > 0 else 'gains'} {abs(cost) * 100:.1f}% perplexity.")
    else:
        verdict += f": KD closes {d['gap_closed_by_kd_mean'] * 100:.0f}% of the gap between the CE-only students and the teacher (mean)."
    if legacy:
        rr, how = rt["random_kd_ppl / pruned_kd_ppl, worst"], "Random init ends {:.2f} times the pruned init's perplexity (worst seed)."
    else:
        rr, how = rt["random-init KD ppl / pruned-init KD ppl, worst"], "Random init + KD ends {:.2f} times the pruned init + KD's perplexity."
        if all(s.get("pruned_ce_ppl") is not None and s.get("pruned_kd_ppl") is not None for s in seeds[:1]):
            s0 = seeds[0]
            how += (f" From the pruned init, KD gives {s0['pruned_kd_ppl']:.1f} against CE-only {s0['pruned_ce_ppl']:.1f}: 500 more steps of plain "
                    f"CE already reach the teacher ({d['teacher_val_ppl']:.1f}), which is far from converged, so pulling towards it cannot help there.") \
                if s0["pruned_ce_ppl"] <= d["teacher_val_ppl"] else ""
    sp = rt["student / teacher generation speed"]
    lines.append(f"{verdict} {how.format(rr['value'])} With the teacher, "
                 f"training runs {d['teacher_overhead_tokens_per_s'] * 100:.0f}% fewer tokens/s than CE only (median over seeds); "
                 f"the student generates {d['student_gen_tokens_per_s']:.1f} tokens/s against the teacher's "
                 f"{d['teacher_gen_tokens_per_s']:.1f} ({sp['value']:.2f} times; target {sp['target']}).")
    return "\n".join(lines)


def preference(r: dict) -> str:
    """README's preference results: bench/preference.py's demo, safety demo and memory parts."""
    res = r.get("preference") or {}
    m = res.get("metrics") or {}

    def load(part: str, timed: bool = True) -> str:
        mm = m.get(f"machine_{part}") or {}
        if not mm:
            return "load not recorded"
        busy = timed and mm["load_avg_1_5_15m_start"][0] > 2 * (mm.get("cpus") or 1)
        return (f"{mm.get('cpus')} CPUs, load average {mm['load_avg_1_5_15m_start'][0]} at the start"
                + (": a busy machine, so provisional" if busy else ""))

    def sft(rec: dict | None) -> str:
        if not rec or rec.get("steps") is None:
            return ""
        ppl = f", validation perplexity {rec['val_ppl']:.1f}" if rec.get("val_ppl") else ""
        return f" (trained {rec['steps']} steps in {rec['seconds'] / 60:.0f} min{ppl})"

    def ms(d: dict, pct: bool = False) -> str:
        if not d:
            return "-"
        f = 100 if pct else 1
        return f"{d['mean'] * f:.{1 if pct else 3}f} ± {d['stdev'] * f:.{1 if pct else 3}f}"

    out = []
    if m.get("demo_runs"):
        seeds = ", ".join(str(x) for x in m["demo_seeds"])
        pairs = sorted({x["pairs"] for x in m["demo_runs"]})
        steps = [x.get("dpo_steps") for x in m["demo_runs"]]
        trained = f"DPO steps {'/'.join(map(str, steps))} (of 300; `train.max_time` 10m), " if None not in steps else ""
        out += [f"**The demo** (`configs/dpo.yaml` on the quickstart model{sft(m.get('demo_sft'))}, {m['demo_model_params'] / 1e6:.2f}M parameters; "
                f"run seeds {seeds}, each its own held-out split of {'/'.join(map(str, pairs))} pairs; {trained}{load('demo')}), "
                "mean ± spread over the seeds:", "",
                "| on the held-out pairs | the quickstart model (before) | after DPO |", "|---|---|---|",
                f"| preference accuracy (implicit reward) | {ms(m['demo_before_preference_accuracy'])} | {ms(m['demo_after_preference_accuracy'])} |",
                f"| likelihood accuracy (chosen likelier) | {ms(m['demo_before_likelihood_accuracy'])} | {ms(m['demo_after_likelihood_accuracy'])} |",
                f"| BLEU, generated vs chosen continuation | {ms(m['demo_before_bleu'])} | {ms(m['demo_after_bleu'])} |", ""]
    else:
        out += ["The demo's before/after numbers are not measured yet (`python bench/preference.py --parts demo`).", ""]
    if m.get("safety_after"):
        b, a = m["safety_before"], m["safety_after"]
        cats = ", ".join(f"{k} {v}" for k, v in m["safety_after_refused_by_category"].items())
        method = m.get("safety_method", "dpo").upper()
        steps = m.get("safety_steps", m.get("safety_dpo_steps"))
        st = f"{steps} {method} steps of 150 (`train.max_time` 15m); " if steps is not None else ""
        out += [f"**The safety demo** (`configs/orpo-safety.yaml` on the quickstart model{sft(m.get('safety_sft'))}; {st}{load('safety')}): "
                f"on the {m['safety_prompts']} red-team prompts, with the rails off:", "",
                f"| red-team eval | the quickstart model (before) | after {method} |", "|---|---|---|",
                f"| answers that refuse | {b['refused_rate_off'] * 100:.1f}% | {a['refused_rate_off'] * 100:.1f}% |",
                f"| answers a detector flags | {b['flagged_rate_off'] * 100:.1f}% | {a['flagged_rate_off'] * 100:.1f}% |",
                f"| held-out pairs: likelihood accuracy | {b['likelihood_accuracy']:.3f} | {a['likelihood_accuracy']:.3f} |", "",
                f"Refusals after, per category: {cats}. Held-out preference accuracy after: {a['preference_accuracy']:.3f} "
                f"on {m['safety_pairs_heldout']} pairs."
                + (f" {method} ranked the held-out refusals above compliance but did not change what the model writes greedily: "
                   "its likelihood of the refusals did not overtake its own continuations." if a["refused_rate_off"] <= b["refused_rate_off"]
                   and a["preference_accuracy"] > 0.5 else ""), ""]
    else:
        out += ["The safety demo's red-team numbers are not measured yet (`python bench/preference.py --parts safety`).", ""]
    if m.get("big_model_params"):
        big = m["big_model_params"] / 1e6
        out += [f"**LoRA-DPO memory** ({load('memory', timed=False)}): at {big:.0f}M parameters ({m['big_steps']} steps, batch {m['big_batch']}, "
                f"max length {m['big_max_length']}) full DPO peaks at {m['big_full_dpo_peak_rss_mb']:,.0f} MB of RSS and LoRA-DPO at "
                f"{m['big_lora_dpo_peak_rss_mb']:,.0f} MB ({m['big_lora_dpo_peak_rss_mb'] / m['big_full_dpo_peak_rss_mb']:.2f} times; "
                f"target <= 0.6)."]
        if m.get("model_params"):
            out[-1] += (f" At the quickstart's {m['model_params'] / 1e6:.1f}M the fixed cost of the process dominates: "
                        f"{m['lora_dpo_peak_rss_mb'] / m['llmctl_dpo_peak_rss_mb']:.2f} times.")
    return "\n".join(out).rstrip()


def compress_report(r: dict) -> str:
    """README's example of `llmctl export`'s compression report: the one bench/compress.py measured."""
    res = r.get("compress") or {}
    c = res.get("metrics") or {}
    rep = c.get("export_report")
    if not rep:
        return "  (An example report appears here once `python bench/run_all.py compress` has measured one.)"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from llmctl.compression_report import table

    return "\n".join([f"  `bench/compress.py`'s run ({c['model']}, {_machine(res) or 'load not recorded'}; decode speeds "
                      "are measured apart, see \"Measured\" below):", "", "```", *table(rep), "```"])


def code_passk(r: dict) -> str:
    """README's eval.code passage: pass@k before and after the fine-tune of configs/code_passk.yaml."""
    c = (r.get("code_passk") or {}).get("metrics")
    if not c:
        return "Not measured yet (`python bench/run_all.py code_passk` runs it)."
    ks = [k for k in ("pass@1", "pass@5", "pass@10") if k in c["after"]]
    rows = ["| model | " + " | ".join(ks) + " | outcomes (pass / fail / timeout / error) |", "|---|" + "---|" * (len(ks) + 1)]
    for name, key in (("before training (seeded init)", "before"), ("after 150 steps on the train half", "after"),
                      (f"the same model on the {c.get('test_tasks', '?')} test tasks", "after_on_test_tasks")):
        if key not in c:
            continue
        o = c[key].get("outcomes") or {}
        rows.append(f"| {name} | " + " | ".join(_fmt(c[key][k]) for k in ks) + " | "
                    + (" / ".join(str(o.get(x, "-")) for x in ("pass", "fail", "timeout", "error")) if o else "-") + " |")
    return (f"From `bench/code_passk.py` ({c['tasks']} train tasks x {c['samples']} samples, temperature {c['temperature']}; "
            f"{_machine(r.get('code_passk', {}))}):\n\n" + "\n".join(rows))


def vision(r: dict) -> str:
    """README's vision quickstart figures: bench/vision.py's run of configs/vision-quickstart.yaml."""
    res = r.get("vision") or {}
    q = (res.get("metrics") or {}).get("quickstart")
    if not q:
        return "Not measured yet (`python bench/run_all.py vision`)."
    s = q["splits"]
    init = q.get("init") or {}

    def row(name: str, what: str) -> str:
        d = s.get(name) or {}
        return (f"| {what} | {d.get('examples')} | {d.get('exact_match', 0):.3f} | {d.get('baseline_majority_exact_match', 0):.3f} | "
                f"{d.get('bleu', 0):.1f} | {d.get('baseline_majority_bleu', 0):.1f} |")

    ex = q["sample"]
    # the quickstart's own machine when it was kept from an earlier run (bench/vision.py --keep-quickstart)
    where = _machine({"metrics": {"machine": q["machine"]}}) if q.get("machine") else _machine(res)
    lines = [f"Measured ({where or 'load not recorded'}): {_minutes(q['seconds'])} ({q['seconds_measured_as']}) for "
             f"{q['images']:,} scenes and a {q['parameters'] / 1e6:.2f}M-parameter model trained {q['steps']} steps; caption perplexity "
             f"{init.get('perplexity', float('nan')):.1f} untrained -> {q['perplexity']:.3f} (test split). The untrained model's exact match is "
             f"{init.get('exact_match', 0):.3f}, BLEU {init.get('bleu', 0):.1f}; the majority caption is \"{q['majority_caption']}\".", "",
             "| held-out split | images | exact match | majority caption | BLEU | majority BLEU |", "|---|---|---|---|---|---|",
             row("validation", "validation (seen pairings, new pictures)"), row("test", "test (unseen pairings)"), "",
             f"A test picture, its reference \"{ex['reference']}\" and the model's caption \"{ex['prediction']}\" "
             f"(eval's greedy caption, from `eval/predictions.jsonl`; `llmctl generate configs/vision-quickstart.yaml --image PATH` captions any picture):", "", "![a held-out scene](docs/vision-sample.png)"]
    return "\n".join(lines)


def prepare_scale(r: dict) -> str:
    """`prepare`'s peak memory as the corpus grows, against plain `datasets` (bench/prepare_scale.py)."""
    res = r.get("prepare_scale")
    if not res:
        return "Not measured yet: `BENCH_SCALE_MB=1024,4096 python bench/prepare_scale.py`."
    m = res["metrics"]
    sizes = m["sizes_mb"]

    def size(mb: int) -> str:
        return f"{mb // 1024} GB" if mb % 1024 == 0 else f"{mb} MB"

    parts = []
    for mb in sizes:
        row = m["runs"][str(mb)]
        for side, what in (("llmctl", "llmctl"), ("llmctl_curated", "llmctl with curation")):
            if side in row:
                x = row[side]
                parts.append(f"{what} at {size(mb)} of JSONL: peak RSS {x['rss_mb']:,.0f} MB (anonymous {x['anon_mb']:,.0f} MB), {x['seconds']:.0f} s")
        if "datasets" in row:
            d = row["datasets"]
            parts.append(f"plain `datasets` at {size(mb)}: {d['rss_mb']:,.0f} MB, {d['seconds']:.0f} s")
    skipped = [size(mb) for mb in sizes if "datasets" not in m["runs"][str(mb)]]
    if skipped and "datasets" in m["runs"][str(sizes[0])]:
        parts.append(f"plain `datasets` not run at {', '.join(skipped)} (BENCH_SCALE_PLAIN_MAX_MB)")
    g = m.get("growth") or {}
    grow = "; ".join(f"{k.split('.')[0]} {v * 100:+.0f}%" for k, v in g.items() if k.endswith(".rss_mb"))
    mach = m.get("machine") or {}
    return (f"Measured (`BENCH_SCALE_MB={','.join(map(str, sizes))} BENCH_SCALE_SIDES={','.join(k for k in ('llmctl', 'llmctl_curated', 'datasets') if k in m['runs'][str(sizes[0])])} "
            f"python bench/prepare_scale.py`, {mach.get('cpus')} CPUs, load {mach.get('load_avg_1m')} at the start): " + "; ".join(parts)
            + f". Peak RSS from {size(sizes[0])} to {size(sizes[-1])}: {grow}.")


PASSAGES = {"quickstart-time": _quickstart_time, "realistic": realistic, "code-passk": code_passk, "vision": vision, "measured": measured, "serve": serve, "safety": safety, "curate": curate,
            "distill": distill, "preference": preference,
            "compress-report": compress_report, "curate-summary": curate_summary, "prepare-scale": prepare_scale}


def render(text: str, results: dict) -> str:
    """`text` with every marked passage replaced by its rendering from `results`."""
    for name, fn in PASSAGES.items():
        pat = re.compile(rf"(<!-- bench:{name}:start -->\n)(?:.*?\n)?(<!-- bench:{name}:end -->)", re.S)
        text = pat.sub(lambda m: m.group(1) + fn(results) + "\n" + m.group(2), text)
    return text


def load_results() -> dict:
    return json.loads((HERE / "results.json").read_text())


def main() -> int:
    results = load_results()
    for f in FILES:
        p = REPO / f
        old = p.read_text()
        new = render(old, results)
        if new != old:
            p.write_text(new)
            print(f"updated {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
