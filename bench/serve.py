"""Serving: requests/s, tokens/s and p50/p95 latency at 1 and 8 concurrent clients on loopback.

Starts the real `llmctl serve` on a quickstart-sized random llama (4 layers, hidden 128,
vocab ~4096) and sends greedy /v1/completions requests of 32 new tokens from closed-loop
clients. Each phase is bounded in count and time. Target: >= 3x throughput at 8 clients
versus 1, zero errors. Then the safety rails' own cost per request, measured in-process on
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
from common import ratio, write_result

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


def main() -> None:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = quickstart_model(tmp / "m")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "bench", "dir": str(tmp / "run")},
                                   "serve": {"model": str(model), "max_batch_size": 8, "max_queue": 256}}))
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(cfg), "--port", "0"], stderr=subprocess.PIPE, text=True)
    url = None
    while url is None:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("server did not start")
        m = re.search(r" on (http://[\d.]+:\d+)/v1", line)
        url = m.group(1) if m else None
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
    res = {}
    try:
        client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=16))

        def one(i, deadline, extra=None):
            if time.perf_counter() > deadline:
                return None
            t0 = time.perf_counter()
            body = {"model": "bench", "prompt": f"request number {i} says", "max_tokens": MAX_TOKENS, "temperature": 0, **(extra or {})}
            r = client.post(url + "/v1/completions", json=body)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
            return time.perf_counter() - t0, ok, r.json()["usage"]["completion_tokens"] if ok else 0

        one(-1, float("inf"))  # warm-up
        for name, conc, n, extra in PHASES:
            f0 = metric(client, url, "llmctl_forward_passes_total")
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(conc) as ex:
                out = [o for o in ex.map(lambda i: one(i, t0 + PHASE_SECONDS, extra), range(n)) if o is not None]
            wall = time.perf_counter() - t0
            forwards = metric(client, url, "llmctl_forward_passes_total") - f0
            lats = [o[0] for o in out]
            tokens = sum(o[2] for o in out)
            res[name] = {"requests": len(out), "seconds": round(wall, 2), "rps": round(len(out) / wall, 3),
                         "tokens_per_s": round(tokens / wall, 1), "p50_s": round(pct(lats, 0.5), 4), "p95_s": round(pct(lats, 0.95), 4),
                         "tokens_per_forward_pass": round(tokens / max(forwards, 1), 2), "errors": sum(not o[1] for o in out)}
        prompts = [f"request number {i} says" for i in range(16)]
        safety = rails_cost([(p, streamed(client, url, p)) for p in prompts])
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    metrics = {**res, "max_tokens": MAX_TOKENS, "model": "llama 4 layers, hidden 128, vocab 4096", "server_exit_code": code, "safety_rails": safety}
    write_result("serve", metrics, {
        "serve throughput 8 clients vs 1": ratio(res["clients_8"]["rps"] / res["clients_1"]["rps"], 3.0),
        "serve errors (all phases)": ratio(float(sum(r["errors"] for r in res.values())), 0.0, higher_is_better=False),
        "serve tokens/s with logprobs=5 vs without (8 clients)": ratio(res["clients_8_logprobs"]["tokens_per_s"] / res["clients_8"]["tokens_per_s"], 0.9),
        "safety rails p50 ms per request (default)": ratio(safety["default"]["p50_ms"], 1.0, higher_is_better=False),
        "safety rails p50 ms per request (redact/block)": ratio(safety["redact_block"]["p50_ms"], 1.0, higher_is_better=False),
    })


if __name__ == "__main__":
    main()
