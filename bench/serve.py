"""Serving: requests/s, tokens/s and p50/p95 latency at 1 and 8 concurrent clients on loopback.

Starts the real `llmctl serve` on a quickstart-sized random llama (4 layers, hidden 128,
vocab ~4096) and sends greedy /v1/completions requests of 32 new tokens from closed-loop
clients. Each phase is bounded in count and time. Targets: >= 3x throughput at 8 clients
versus 1, zero errors; one client at >= 2x transformers' `model.generate` on the same model
and prompts in-process (same thread count as the engine), with under 5 ms per request beyond
the tokens themselves (a request's latency minus the same prompt's in-process decode time),
both measured in interleaved rounds (the machine's speed drifts); and when llama.cpp's `llama-server` is found ($LLAMA_CPP_BIN, PATH or
/opt/llamacpp/build/bin), the same phases against it on the same weights (our f32 GGUF), with
8-client tokens/s >= 0.5x its own. Then the safety rails' own cost per request, measured in-process on
the texts the server streamed (prompt check, then every streamed delta through the output
guard): p50 <= 1 ms with the default rails and with redacting/blocking ones.

    .venv/bin/python bench/serve.py      # writes bench/results/serve.json
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from _model import quickstart_model
from common import machine, ratio, write_result

MAX_TOKENS = 32
# (name, concurrent clients, requests, extra request fields)
PHASES = (("clients_1", 1, 16, {}), ("clients_8", 8, 64, {}), ("clients_8_logprobs", 8, 64, {"logprobs": 5}))
PHASE_SECONDS = 60.0  # a phase stops sending new requests after this


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def metric(client, url: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", client.get(url + "/metrics").text, re.M).group(1))


RAILS = {
    "default": {},  # flag PII and secrets on input and output
    "redact_block": {"input": {"secrets": "block", "deny": "block"}, "output": {"pii": "redact", "secrets": "block", "deny": "redact"},
                     "deny": {"words": ["zorp", "frobnicate"], "phrases": ["launch codes"], "regex": [r"(?i)rm\s+-rf\s+/"]}},
}


def rails_cost(samples: list[tuple[str, list[str]]], repeats: int = 5) -> dict:
    """Per-request milliseconds the rails add: input check plus the streamed output guard."""
    from llmctl.config import SafetyConfig
    from llmctl.safety import Rails

    out = {}
    for name, cfg in RAILS.items():
        rails = Rails(SafetyConfig.model_validate(cfg), stage="bench")
        times = []
        for _ in range(repeats):
            for prompt, deltas in samples:
                t0 = time.perf_counter()
                rails.check_input(prompt, "bench")
                g = rails.guard("bench", choice=0)
                sent = "".join(g.feed(d) for d in deltas) + g.finish()
                times.append(time.perf_counter() - t0)
                assert sent == "".join(deltas) or name != "default"
        out[name] = {"p50_ms": round(pct(times, 0.5) * 1000, 4), "p95_ms": round(pct(times, 0.95) * 1000, 4), "requests": len(times)}
    return out


def streamed(client, url: str, prompt: str) -> list[str]:
    """The text deltas of one streamed completion, as a client receives them."""
    import json

    deltas = []
    with client.stream("POST", url + "/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text = json.loads(line[6:])["choices"][0]["text"]
                if text:
                    deltas.append(text)
    return deltas


def single_stream(client, url: str, model_dir: Path, prompts: list[str], threads: int, rounds: int = 3) -> dict:
    """One stream, side by side and interleaved: per round, each prompt over HTTP to the idle
    server (one client), then in this process through llmctl's own decode (the lean path the
    engine runs) and transformers' `model.generate`, greedy, MAX_TOKENS each, same thread count
    as the engine. The machine's speed drifts by tens of percent within seconds, so every
    comparison is within a round (medians over rounds), never best against typical.

    Per-request overhead: a request's latency minus the in-process time of the same prompt in
    the same round (the same tokens: greedy, EOS on everywhere)."""
    import statistics

    import torch

    from llmctl.generation import Sampling, generate_batch
    from llmctl.modeling import load_for_inference

    torch.set_num_threads(threads)
    model, tok = load_for_inference(str(model_dir))  # EOS on, as the server has it: the same tokens on every side
    sp = Sampling(max_new_tokens=MAX_TOKENS)

    def http(p, n=MAX_TOKENS):
        r = client.post(url + "/v1/completions", json={"model": "bench", "prompt": p, "max_tokens": n, "temperature": 0})
        return r.json()["usage"]["completion_tokens"]

    def hf(p):
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        return len(new) - (new[-1] in eos)  # the EOS token is not part of the completion

    eos = {model.generation_config.eos_token_id} if isinstance(model.generation_config.eos_token_id, int) else set(model.generation_config.eos_token_id or [])

    def ours(p, n=MAX_TOKENS):
        return generate_batch(model, tok, [p], sp if n == MAX_TOKENS else Sampling(max_new_tokens=n))[0]["completion_tokens"]

    def timed(fn, p, *a):
        t0 = time.perf_counter()
        n = fn(p, *a)
        return time.perf_counter() - t0, n

    for p in prompts[:2]:  # warm-up
        http(p), hf(p), ours(p)
    per_round, over, fixed = [], [], []
    for _ in range(rounds):
        r = {name: [timed(fn, p) for p in prompts] for name, fn in (("serve", http), ("llmctl", ours), ("generate", hf))}
        per_round.append({k: sum(n for _, n in v) / sum(t for t, _ in v) for k, v in r.items()})
        assert [n for _, n in r["serve"]] == [n for _, n in r["llmctl"]] == [n for _, n in r["generate"]], r  # the same tokens
        over += [ts - tl for (ts, _), (tl, _) in zip(r["serve"], r["llmctl"])]
        # the fixed cost alone: one-token requests, each right after the same in-process generation
        fixed += [timed(http, p, 1)[0] - timed(ours, p, 1)[0] for p in prompts]
    med = {k: statistics.median(x[k] for x in per_round) for k in per_round[0]}
    return {"rounds": rounds, "prompts": len(prompts), "threads": threads,
            **{f"{k}_tokens_per_s": round(v, 1) for k, v in med.items()},
            "serve_vs_generate": round(statistics.median(x["serve"] / x["generate"] for x in per_round), 3),
            "llmctl_vs_generate": round(statistics.median(x["llmctl"] / x["generate"] for x in per_round), 3),
            "serve_overhead_ms_p50": round(pct(over, 0.5) * 1000, 2), "serve_overhead_ms_p95": round(pct(over, 0.95) * 1000, 2),
            "serve_fixed_overhead_ms_p50": round(pct(fixed, 0.5) * 1000, 2), "serve_fixed_overhead_ms_p95": round(pct(fixed, 0.95) * 1000, 2)}


def start(cmd: list[str], ready, env=None) -> tuple[subprocess.Popen, str]:
    """Start a server; `ready(line)` returns its base URL from a line of its stderr."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    url = None
    while url is None:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"{cmd[0]} did not start")
        url = ready(line)
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
    return proc, url


def phases(url: str, model_name: str, extra_body: dict, which=PHASES) -> dict:
    import httpx

    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16))

    def one(i, deadline, extra=None):
        if time.perf_counter() > deadline:
            return None
        t0 = time.perf_counter()
        body = {"model": model_name, "prompt": f"request number {i} says", "max_tokens": MAX_TOKENS, "temperature": 0,
                **extra_body, **(extra or {})}
        r = client.post(url + "/v1/completions", json=body)
        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
        return time.perf_counter() - t0, ok, r.json()["usage"]["completion_tokens"] if ok else 0

    one(-1, float("inf"))  # warm-up
    res = {}
    for name, conc, n, extra in which:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(conc) as ex:
            out = [o for o in ex.map(lambda i: one(i, t0 + PHASE_SECONDS, extra), range(n)) if o is not None]
        wall = time.perf_counter() - t0
        lats = [o[0] for o in out]
        tokens = sum(o[2] for o in out)
        res[name] = {"requests": len(out), "seconds": round(wall, 2), "rps": round(len(out) / wall, 3),
                     "tokens_per_s": round(tokens / wall, 1), "p50_s": round(pct(lats, 0.5), 4), "p95_s": round(pct(lats, 0.95), 4),
                     "errors": sum(not o[1] for o in out)}
    return res


def llama_server(model_dir: Path, tmp: Path):
    """llama.cpp's llama-server on our f32 GGUF of the same weights: (process, url, info), or
    (None, None, {"skipped": why})."""
    import socket

    from llmctl.exporters import gguf as gguf_x
    from llmctl.modeling import load_for_inference

    binary = gguf_x.llama_cpp("llama-server")
    if binary is None:
        return None, None, {"skipped": "llama-server not found ($LLAMA_CPP_BIN, PATH, /opt/llamacpp/build/bin)"}
    model, tok = load_for_inference(str(model_dir))
    (tmp / "gguf").mkdir(exist_ok=True)
    path = gguf_x.write(model, tok, tmp / "gguf", "f32", "bench")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = model.config.max_position_embeddings
    cmd = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-np", "8", "-c", str(8 * ctx), "--no-webui"]
    proc, url = start(cmd, lambda line: f"http://127.0.0.1:{port}" if "listening" in line or "server is listening" in line else None)
    return proc, url, {"binary": str(binary), "gguf": path.name, "threads": "llama-server default"}


def side_by_side(url: str, ref_url: str, rounds: int = 3) -> dict:
    """The same closed-loop phases against llmctl and llama-server, alternating (per round: ours
    and theirs at 1 client, then at 8), `rounds` times: the machine's speed drifts by tens of
    percent, so each ratio is taken within a round and the median round is reported. llama-server
    runs with ignore_eos (every request makes MAX_TOKENS, as many or more than ours with EOS on)."""
    import statistics

    per = {"clients_1": [], "clients_8": []}
    for _ in range(rounds):
        for name, conc, n in (("clients_1", 1, 16), ("clients_8", 8, 64)):
            a = phases(url, "bench", {}, [(name, conc, n, {})])[name]
            b = phases(ref_url, "bench", {"ignore_eos": True}, [(name, conc, n, {})])[name]
            per[name].append((a["tokens_per_s"] / b["tokens_per_s"], a, b))
    out = {}
    for name, rows in per.items():
        mid = sorted(rows, key=lambda x: x[0])[len(rows) // 2]
        out[name] = {"llmctl_vs_llama_server": round(statistics.median(x[0] for x in rows), 3),
                     "rounds": [round(x[0], 3) for x in rows], "llmctl": mid[1], "llama_server": mid[2],
                     "errors": sum(x[1]["errors"] + x[2]["errors"] for x in rows)}
    # ours at 8 clients vs 1, within each round
    out["llmctl_8_vs_1_rps"] = round(statistics.median(c8[1]["rps"] / c1[1]["rps"] for c1, c8 in zip(per["clients_1"], per["clients_8"])), 3)
    return out


def main() -> None:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    at_start = machine()
    model = quickstart_model(tmp / "m")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "bench", "dir": str(tmp / "run")},
                                   "serve": {"model": str(model), "max_batch_size": 8, "max_queue": 256}}))
    ref_proc, ref_url, ref = llama_server(model, tmp)  # idle until its rounds: no CPU taken from ours
    proc, url = start([sys.executable, "-m", "llmctl", "serve", str(cfg), "--port", "0"],
                      lambda line: (m.group(1) if (m := re.search(r" on (http://[\d.]+:\d+)/v1", line)) else None))
    res = {}
    try:
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16))
        f0 = metric(client, url, "llmctl_forward_passes_total")
        res = phases(url, "bench", {})
        forwards = metric(client, url, "llmctl_forward_passes_total") - f0
        res["clients_all"] = {"forward_passes": forwards, "tokens_per_forward_pass": round(sum(r["tokens_per_s"] * r["seconds"] for r in res.values()) / max(forwards, 1), 2)}
        # logprobs' cost: with and without, alternating (the machine's speed drifts between phases)
        lp, lp_errors = [], 0
        for _ in range(5):
            a = phases(url, "bench", {}, [("plain", 8, 64, {})])["plain"]
            b = phases(url, "bench", {}, [("logprobs", 8, 64, {"logprobs": 5})])["logprobs"]
            lp.append(b["tokens_per_s"] / a["tokens_per_s"])
            lp_errors += a["errors"] + b["errors"]
        res["logprobs_rounds"] = {"with_vs_without": [round(x, 3) for x in lp], "errors": lp_errors}
        prompts = [f"request number {i} says" for i in range(16)]
        safety = rails_cost([(p, streamed(client, url, p)) for p in prompts])
        from llmctl.server.engine import default_threads

        single = single_stream(client, url, model, [f"request number {i} says" for i in range(8)], default_threads())
        if ref_url is not None:
            ref.update(side_by_side(url, ref_url, rounds=5))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        if ref_proc is not None:
            ref_proc.send_signal(signal.SIGTERM)
            try:
                ref_proc.wait(30)
            except subprocess.TimeoutExpired:
                ref_proc.kill()
    metrics = {**res, "single_stream": single, "llama_server": ref, "max_tokens": MAX_TOKENS, "model": "llama 4 layers, hidden 128, vocab 4096 (a BPE trained on the stdlib's source)", "server_exit_code": code, "safety_rails": safety, "machine": at_start}
    ratios = {
        "serve 1 client tokens/s vs transformers generate in-process": ratio(single["serve_vs_generate"], 2.0),
        "llmctl single-stream decode vs transformers generate (in-process)": ratio(single["llmctl_vs_generate"], 2.0),
        # A request's fixed cost: a one-token request's latency minus the same one-token generation
        # in-process. The same difference on MAX_TOKENS requests is reported beside it (it adds
        # the engine's per-token bookkeeping and the machine's drift over a longer request).
        "serve per-request overhead ms (1 client, 1-token requests, p50)": ratio(single["serve_fixed_overhead_ms_p50"], 5.0, higher_is_better=False),
        "serve overhead ms per 32-token request (1 client, p50)": ratio(single["serve_overhead_ms_p50"], None),
    }
    if "clients_8" in ref:  # median of alternating rounds
        ratios["serve 8 clients tokens/s vs llama-server (same weights)"] = ratio(ref["clients_8"]["llmctl_vs_llama_server"], 0.5)
    write_result("serve", metrics, {**ratios,
        # within alternating rounds when llama-server ran (the phases above ran once each, minutes apart)
        "serve throughput 8 clients vs 1": ratio(ref.get("llmctl_8_vs_1_rps") or res["clients_8"]["rps"] / res["clients_1"]["rps"], 3.0),
        "serve errors (all phases)": ratio(float(sum(r.get("errors", 0) for r in res.values())), 0.0, higher_is_better=False),
        "serve tokens/s with logprobs=5 vs without (8 clients)": ratio(sorted(res["logprobs_rounds"]["with_vs_without"])[2], 0.9),  # median of 5 alternating rounds
        "safety rails p50 ms per request (default)": ratio(safety["default"]["p50_ms"], 1.0, higher_is_better=False),
        "safety rails p50 ms per request (redact/block)": ratio(safety["redact_block"]["p50_ms"], 1.0, higher_is_better=False),
    })


if __name__ == "__main__":
    main()
