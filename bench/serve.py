"""Serving requests/s and p50/p95 latency at 1 and 8 concurrent clients on loopback."""

from __future__ import annotations

import concurrent.futures as cf
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _model import quickstart_model
from common import ratio, write_result

MAX_TOKENS = 32
REQUESTS_1, REQUESTS_8 = 12, 48


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = quickstart_model(tmp / "m")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "bench", "dir": str(tmp / "run")}, "serve": {"model": str(model), "max_batch_size": 8, "max_queue": 256}}))
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "serve", str(cfg), "--port", "0"], stderr=subprocess.PIPE, text=True)
    url = None
    while url is None:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("server did not start")
        m = re.search(r"on (http://[\d.]+:\d+)/v1", line)
        url = m.group(1) if m else None
    try:
        client = httpx.Client(timeout=120)
        body = lambda i: {"model": "bench", "prompt": f"request number {i} says", "max_tokens": MAX_TOKENS, "temperature": 0}  # noqa: E731

        def one(i):
            t0 = time.perf_counter()
            r = client.post(url + "/v1/completions", json=body(i))
            return time.perf_counter() - t0, r.status_code

        one(-1)  # warm-up
        res = {}
        for conc, n in ((1, REQUESTS_1), (8, REQUESTS_8)):
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(conc) as ex:
                out = list(ex.map(one, range(n)))
            wall = time.perf_counter() - t0
            lats = [o[0] for o in out]
            res[conc] = {"requests": n, "rps": round(n / wall, 3), "p50_s": round(pct(lats, 0.5), 4), "p95_s": round(pct(lats, 0.95), 4),
                         "errors": sum(o[1] != 200 for o in out)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    metrics = {"clients_1": res[1], "clients_8": res[8], "max_tokens": MAX_TOKENS}
    write_result("serve", metrics, {
        "serve throughput 8 clients vs 1": ratio(res[8]["rps"] / res[1]["rps"], 3.0),
        "serve errors (8 clients)": ratio(float(res[8]["errors"] + res[1]["errors"]), 0.0, higher_is_better=False),
    })


if __name__ == "__main__":
    main()
