"""llama.cpp as a decode engine: a `llama-server` that llmctl starts on a private loopback port,
runs the run's GGUF export on, and talks to for token ids only (`serve.engine: llama.cpp`).

Why: at the realistic size (an 85M llama, f32 weights of 340 MB) decoding is bound by memory
bandwidth, and llama.cpp's kernels run it about twice as fast as torch on the same weights and
precision, and q8_0 about twice torch's dynamic int8 for one stream (bench/serve.py --size 85m).
What stays llmctl's: tokenizing and BOS, context limits, stop strings and hold-back,
incremental detokenization, logprob formatting, auth, rails, audit and metrics. What llama.cpp
does: the forward pass, the KV cache, batching of concurrent sequences, and sampling (its own
sampler chain, set to transformers' order: penalties, temperature, top-k, top-p; greedy is the
same argmax everywhere).

Trusted only after a check at load (`disagreement`): the next-token logprobs llama.cpp gives a
probe prompt are compared with transformers' own forward of the model the GGUF was exported from.

The public surface:
- `find_binary(tool)`: a llama.cpp binary in $LLAMA_CPP_BIN, on PATH, or in /opt/llamacpp/build/bin;
- `GGUF_TYPE`: the GGUF tensor type served for each `serve.quantize`;
- `LlamaServer(gguf, slots, context, threads)`: the subprocess (`start()`, `stop()`, `url`,
  `metrics_text()`: its own Prometheus counters);
- `completion_body(job)`, `stream_tokens(conn, body)`: one sequence's request and its tokens as
  they are made; `post_completion` and `answer_tokens`: the same, read whole; `hang_up(conn)`:
  cancel it from another thread;
- `disagreement(server, model, tok)`: None, or why llama.cpp does not compute what the model does.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from llmctl.errors import ConfigError, LlmctlError

# serve.quantize -> the GGUF type llama.cpp runs (the same precision on both engines).
GGUF_TYPE = {"none": "f32", "int8": "q8_0", "int4": "q4_0"}
# Largest |logprob difference| on the probe, relative to max(1, largest |logit|): float32
# summation order for f32; each type's rounding otherwise (the export's own tolerances).
TOLERANCE = {"f32": 1e-3, "q8_0": 6e-2, "q4_0": 0.4}
START_TIMEOUT_S = 120.0
# transformers' order of the sampling steps (generate's logits processors, llmctl's sampler).
SAMPLERS = ["penalties", "temperature", "top_k", "top_p"]
# llama-server's log threshold (LLAMA_ARG_LOG_VERBOSITY): 2 keeps warnings and errors.
LOG_VERBOSITY = 2
# The fields of a whole answer llmctl reads (llama-server's `response_fields`); the rest
# (its generation settings, timings, the prompt as text) is ~1.7 KB a request to serialize and parse.
ANSWER_FIELDS = ["tokens", "completion_probabilities"]


# llama.cpp's log line prefix off a terminal: elapsed time and level ("0.00.005.712 E ").
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([A-Z]) ")


def find_binary(tool: str) -> Path | None:
    """A llama.cpp binary: in $LLAMA_CPP_BIN (a folder), on PATH, or in /opt/llamacpp/build/bin."""
    env = os.environ.get("LLAMA_CPP_BIN")
    for p in (Path(env) / tool if env else None, shutil.which(tool), Path("/opt/llamacpp/build/bin") / tool):
        if p and Path(p).is_file() and os.access(p, os.X_OK):
            return Path(p)
    return None


def require_server_binary(key: str = "serve.engine") -> Path:
    """llama-server's path, or a ConfigError (exit 2) that says how to get one."""
    b = find_binary("llama-server")
    if b is None:
        raise ConfigError(
            f"{key} llama.cpp: no llama-server found in $LLAMA_CPP_BIN, on PATH or in /opt/llamacpp/build/bin: "
            "install llama.cpp (https://github.com/ggml-org/llama.cpp, e.g. 'brew install llama.cpp') and put llama-server "
            f"on PATH or set LLAMA_CPP_BIN to its folder, or set {key}: torch"
        )
    return b


def gguf_to_run(cfg, rd, explicit: str | None, quantize: str, section: str) -> str:
    """The GGUF file `<section>.engine: llama.cpp` runs: --model / <section>.model when it names a
    .gguf file, else the run's complete, up-to-date GGUF export of `quantize`'s precision."""
    from llmctl.errors import StageInputError
    from llmctl.hints import command

    qtype = GGUF_TYPE[quantize]
    if explicit:
        if Path(explicit).suffix.lower() == ".gguf" and Path(explicit).is_file():
            return explicit
        raise ConfigError(f"{section}.engine llama.cpp runs a GGUF file, and {explicit} is not one: pass --model FILE.gguf, "
                          f"or leave --model / {section}.model out to use the run's GGUF export")
    f = rd.export_dir("gguf") / f"model-{qtype}.gguf"
    m = rd.manifest("export")
    if m is not None and m.get("status") == "complete" and f.is_file():
        rd.require("export", cfg)  # an export of an older model is stale (exit 3)
        return str(f)
    fix = command("export", cfg, rd.root)
    why = f"{section}.quantize {quantize} runs as {qtype}" if qtype != "f32" else "f32 weights, as trained"
    raise StageInputError(f"{f} is missing ({why}; {section}.engine llama.cpp runs the run's GGUF export): add gguf to export.formats "
                          f"and {qtype} to export.gguf_types in {cfg.source}, then run '{fix}'", hint=fix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when llmctl dies (Linux), so no llama-server outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LlamaServer:
    """One llama-server subprocess on 127.0.0.1, `slots` sequences decoded together, each with
    `context` tokens. Its log is kept (the last lines) for error messages."""

    def __init__(self, gguf: Path, slots: int, context: int, threads: int | None = None, binary: Path | None = None):
        self.gguf, self.slots, self.context, self.threads = Path(gguf), slots, context, threads
        self.binary = binary or require_server_binary()
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log: deque[str] = deque(maxlen=40)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(self.slots), "-c", str(self.slots * self.context), "--no-webui", "--metrics"]
        if self.threads:
            cmd += ["-t", str(self.threads)]
        return cmd

    def start(self) -> None:
        self.port = _free_port()
        # Warnings and errors only (unless the user set it): at its default (info) llama-server
        # logs ~9 lines per request, each read here by a Python thread on the cores llama.cpp
        # decodes on; load errors are logged as errors either way.
        env = {**os.environ, "LLAMA_ARG_LOG_VERBOSITY": os.environ.get("LLAMA_ARG_LOG_VERBOSITY", str(LOG_VERBOSITY))}
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                                     env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        threading.Thread(target=self._drain, name="llama-server-log", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LlmctlError(f"llama-server exited with code {self.proc.returncode} while loading {self.gguf}: {self.last_error()}")
            if self._healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise LlmctlError(f"llama-server did not become ready within {START_TIMEOUT_S:.0f} s on {self.gguf}: {self.last_error()}")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def last_error(self) -> str:
        """Why it failed, in one line: the first error it logged (the cause; the lines after it
        are llama.cpp giving up: "failed to load model", "exiting due to model loading
        error"), without its timestamp; else its last line."""
        lines, bad = [], []
        for raw in self.log:
            m = _LOG_PREFIX.match(raw)
            ln = raw[m.end():].strip() if m else raw.strip()
            if ln:
                lines.append(ln)
                if m.group(1) == "E" if m else ("error" in ln.lower() or "failed" in ln.lower()):
                    bad.append(ln)
        return (bad[:1] or lines[-1:] or ["(no output)"])[0]

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def metrics_text(self) -> str:
        """llama-server's Prometheus text (GET /metrics), or "" when it does not answer in time."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/metrics")
                r = conn.getresponse()
                text = r.read().decode("utf-8", errors="replace")
                return text if r.status == 200 else ""
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)


def completion_body(prompt_ids: list[int], max_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    seed: int | None = None, logprobs: int | None = None, context: int = 4096, stream: bool = True) -> dict:
    """llama-server's /completion request for one sequence: token ids in, token ids out, every
    other sampler of llama.cpp's default chain (min-p, typical, XTC, DRY, mirostat) off. The
    repetition penalty looks at the whole `context` (llama.cpp's default is the last 64 tokens).
    `stream=False`: the tokens come in one answer at the end (no per-token event to read).

    The sampler chain holds only the steps that change anything, in transformers' order; greedy
    decoding (temperature 0) is top-k 1 after any penalties. llama.cpp runs every step it is
    given over the whole vocabulary for each token, even one that leaves the logits as they are:
    with all four in the chain, greedy decoding ran 7% slower at 8 concurrent sequences (85M
    llama, 16k vocabulary, 2 cores)."""
    greedy = temperature <= 0
    active = {"penalties": repetition_penalty != 1.0 or presence_penalty != 0.0 or frequency_penalty != 0.0,
              "temperature": not greedy, "top_k": greedy or bool(top_k), "top_p": not greedy and top_p < 1.0}
    body = {
        "prompt": list(prompt_ids), "n_predict": max_tokens, "stream": bool(stream), "return_tokens": True, "cache_prompt": True,
        "temperature": max(float(temperature), 0.0), "top_k": 1 if greedy else int(top_k or 0), "top_p": float(top_p), "min_p": 0.0,
        "typical_p": 1.0, "xtc_probability": 0.0, "dry_multiplier": 0.0, "mirostat": 0, "top_n_sigma": -1.0,
        "repeat_penalty": float(repetition_penalty), "repeat_last_n": int(context),
        "presence_penalty": float(presence_penalty), "frequency_penalty": float(frequency_penalty),
        "samplers": [x for x in SAMPLERS if active[x]], "seed": -1 if seed is None else int(seed) % 2**32,
    }
    if logprobs is not None:
        # logprobs of the raw logits (before sampling), the sampled token's always included
        body.update(n_probs=max(int(logprobs), 1), post_sampling_probs=False)
    if not stream:
        body["response_fields"] = ANSWER_FIELDS
    return body


def post_completion(conn: http.client.HTTPConnection, body: dict) -> http.client.HTTPResponse:
    """Send one /completion request; its response (status 200), body unread."""
    conn.request("POST", "/completion", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise LlmctlError(f"llama-server answered {r.status}: {r.read()[:300].decode(errors='replace')}")
    return r


def answer_tokens(answer: dict) -> list[tuple[int, float | None, list]]:
    """The (token id, logprob or None, top alternatives) of a whole (non-streamed) answer: one
    read and one JSON parse instead of one of each per token, which on a few cores is CPU
    llama.cpp's own threads get back."""
    return list(_tokens_of(answer))


def stream_tokens(conn: http.client.HTTPConnection, body: dict):
    """Yield (token id, logprob or None, [(id, logprob), ...top]) per generated token, as
    llama-server streams them. Closing the generator (a stop string, a client gone) closes the
    connection, which cancels the sequence in llama-server; so does shutting the connection's
    socket down from another thread while this one waits (`hang_up`). A body with `stream: False`
    is read whole instead: `post_completion`, then `answer_tokens`."""
    r = post_completion(conn, body)
    try:
        while True:
            line = r.readline()
            if not line:
                return
            if not line.startswith(b"data: "):
                continue
            yield from _tokens_of(json.loads(line[6:]))
    finally:
        r.close()


def hang_up(conn: http.client.HTTPConnection) -> None:
    """Shut a connection to llama-server down from any thread: a read blocked on it returns at
    once, and llama-server drops the sequence (it sees the connection close)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass


def _tokens_of(ev: dict):
    if "error" in ev:
        raise LlmctlError(f"llama-server: {ev['error'].get('message', ev['error'])}")
    probs = ev.get("completion_probabilities") or [None] * len(ev.get("tokens") or [])
    for t, p in zip(ev.get("tokens") or [], probs):
        if p is None:
            yield t, None, []
        else:
            yield t, p.get("logprob"), [(a["id"], a["logprob"]) for a in p.get("top_logprobs", [])]


def disagreement(server: LlamaServer, model, tok, qtype: str, k: int = 8) -> str | None:
    """Why llama.cpp's next-token logprobs on a probe prompt differ from the model's own forward
    (beyond the GGUF type's rounding), or None when they agree."""
    import torch

    from llmctl.inference.context import encode_one

    ids = encode_one(tok, "The quick brown fox jumps over the lazy dog. def main():\n    return 0")
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
    ref = torch.log_softmax(logits, dim=-1)
    conn = server.connect()
    try:
        got = list(stream_tokens(conn, completion_body(ids, 1, temperature=0.0, logprobs=k)))
    finally:
        conn.close()
    if not got or not got[0][2]:
        return "llama-server returned no logprobs for the probe"
    diff = max(abs(lp - float(ref[t])) for t, lp in got[0][2])
    tol = TOLERANCE[qtype] * max(1.0, float(logits.abs().max()))
    if not diff <= tol:
        return f"llama.cpp's logprobs on a probe differ from the model's own forward by {diff:.2e} (tolerance {tol:.2e} for {qtype})"
    return None
