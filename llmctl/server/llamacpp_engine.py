"""`serve.engine: llama.cpp`: the engine's jobs decoded by a llama-server that llmctl manages
(llmctl/inference/llamacpp.py), on the run's GGUF export.

It takes the same jobs as the torch engine (engine.py) and hands tokens back the same way:
every per-sequence rule (EOS, stop strings and hold-back, incremental detokenization,
logprob entries and text offsets, finish reasons) is the torch engine's own `_advance`, run on
the token ids llama-server streams. One worker thread per slot (serve.max_batch_size) takes
a waiting job, streams it from llama-server, and takes the next; llama-server batches the
slots' sequences together. Echoed prompt logprobs need the prompt's logits, which
llama-server does not return: such a request gets a 400 (server/jobs.py).
"""

from __future__ import annotations

import http.client
import json
import threading

from llmctl.inference.context import context_length
from llmctl.server.engine import Engine, Job


class LlamaCppEngine(Engine):
    prompt_logprobs = False  # llama-server returns no logits for prompt tokens: echo + logprobs is a 400

    def __init__(self, model_path: str, gguf_path: str, max_batch_size: int, max_queue: int, metrics,
                 trust_remote_code: bool = False, threads: int | None = None, quantize: str | None = None, warm=None):
        super().__init__(model_path, max_batch_size, max_queue, 0.0, metrics, trust_remote_code=trust_remote_code,
                         device="cpu", threads=threads, quantize=quantize, warm=warm)
        self.gguf_path = gguf_path
        self.server = None
        self.running = 0
        self._lock = threading.Lock()

    def load(self) -> None:
        """The tokenizer and the reference model; llama-server on the GGUF; the check; then the
        reference model is let go (llama.cpp holds the weights from here on)."""
        from llmctl.inference.llamacpp import GGUF_TYPE, LlamaServer, disagreement
        from llmctl.errors import LlmctlError
        from llmctl.modeling import load_for_inference

        model, self.tok = load_for_inference(self.model_path, trust_remote_code=self.trust_remote_code)
        self.context_length = context_length(model)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        eos = model.generation_config.eos_token_id
        eos = self.tok.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.server = LlamaServer(self.gguf_path, self.max_batch_size, self.context_length or 4096, threads=self.threads)
        self.server.start()
        try:
            why = disagreement(self.server, model, self.tok, GGUF_TYPE[self.quantize or "none"])
            if why:
                raise LlmctlError(f"serve.engine llama.cpp: {why}; not serving it (set serve.engine: torch to serve with transformers)")
        except BaseException:
            self.server.stop()  # never left running behind a failed load
            raise
        del model
        if self.warm is not None:
            self.warm()
        self.ready.set()

    def stop(self) -> None:
        self._stop.set()
        for _ in range(self.max_batch_size):
            self.q.put(None)
        if self.server is not None:
            self.server.stop()

    def engine_metrics(self) -> str:
        """llama-server's own counters, as it serves them on /metrics (`llamacpp:` names: decode
        calls, busy slots per decode, tokens, requests processing and deferred)."""
        return self.server.metrics_text() if self.server is not None and self.ready.is_set() else ""

    def _main(self) -> None:
        if not self._loaded():
            return
        workers = [threading.Thread(target=self._worker, name=f"llmctl-llamacpp-{i}", daemon=True) for i in range(self.max_batch_size)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _worker(self) -> None:
        conn = None  # this worker's connection to llama-server, kept alive between whole answers
        while not self._stop.is_set():
            j = self.q.get()  # no timeout: stop() wakes every worker with a None
            if j is None:
                break
            self.metrics.set_queue(self.q.qsize())
            if j.cancelled:
                continue
            self._running(+1)
            try:
                conn = self._decode(j, conn)
            except Exception as e:  # never leave a client hanging
                conn = None
                j.push(("error", f"{type(e).__name__}: {e}"))
            finally:
                self._running(-1)
        if conn is not None:
            conn.close()

    def _running(self, d: int) -> None:
        with self._lock:
            self.running += d
            self.metrics.set_running(self.running)

    def _decode(self, j: Job, conn):
        """Decode one sequence on llama-server through the torch engine's per-token rules; return
        the connection when it can carry the next request (else None, closed).

        A sequence nobody reads as it grows (a non-streamed answer without stop strings) is asked
        for in one piece: the same tokens through the same rules, without a read, a JSON parse
        and a thread wake-up per token in this process, which shares the cores with llama.cpp's.
        Its connection stays open for the worker's next sequence (llama-server keeps it alive, as
        any HTTP client's pool would): no connect, accept and close per request.

        A streamed sequence gets a connection of its own: closing it (a stop string, EOS, a client
        gone) is what cancels the sequence in llama-server."""
        from llmctl.inference.llamacpp import answer_tokens, completion_body, hang_up, post_completion, stream_tokens

        if j.echo_logprobs:
            j.push(("error", "echo with logprobs needs the prompt's logits, which serve.engine llama.cpp does not return"))
            return conn
        whole = not (j.stream or j.stop)
        body = completion_body(j.prompt_ids, j.max_tokens, j.temperature, j.top_k, j.top_p, j.repetition_penalty,
                               j.presence_penalty, j.frequency_penalty, j.seed, j.logprobs, context=self.server.context,
                               stream=not whole)
        if conn is not None and not whole:
            conn.close()
            conn = None
        reused = conn is not None
        if conn is None:
            conn = self.server.connect()
            conn.connect()
        # A client that hangs up shuts this connection down from the event loop's thread: the
        # read below returns at once and llama-server drops the sequence. Nothing here polls.
        j.when_cancelled(lambda: hang_up(conn))
        keep = reusable = False
        stream, n = None, 0
        try:
            if whole:
                try:
                    r = post_completion(conn, body)
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    if not reused or j.cancelled:
                        raise
                    conn.close()  # llama-server closed the kept connection while it was idle: a new one
                    conn.connect()
                    r = post_completion(conn, body)
                answer = json.loads(r.read())
                # the answer is read: from here a hang-up has nothing to cancel. Unregistered
                # first, then asked: a hook that fired meanwhile has set `cancelled` before it ran
                j.when_cancelled(None)
                reusable = not (j.cancelled or r.will_close)
                tokens = answer_tokens(answer)
            else:
                tokens = stream = stream_tokens(conn, body)
            for t, lp, top in tokens:
                if j.cancelled:
                    break
                if j.logprobs is not None:
                    j.lps.append((lp, top[: j.logprobs]))
                n += 1
                if not self._advance(j, t):
                    break
            else:
                if not j.cancelled:  # llama-server ended it first (its context is full)
                    self._detokenize(j, final=True)
                    self._send(j, j.text, final=True)
                    self._finish(j, "length")
            keep = reusable
        except (OSError, http.client.HTTPException):
            if not j.cancelled:  # the connection was shut down because the client hung up
                raise
        finally:
            j.when_cancelled(None)
            j.finished = True
            self.steps += n
            self.metrics.add_tokens(n)
            if stream is not None:
                stream.close()
            if not keep:
                conn.close()
        return conn if keep else None
