"""One thread owns the model and decodes requests that arrive together as one batch.

Requests are split into sequences (one per `n`); up to `max_batch_size` waiting sequences
start together, share every forward pass (left padding, a KV cache, per-row position ids),
and each samples with its own temperature, top_p and seed. Finished or cancelled rows stop
emitting at once. Tokens reach each request's asyncio queue as they are produced.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    pass


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    loop: Any
    out: Any  # asyncio.Queue of ("delta", text) | ("done", finish_reason, completion_tokens)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    enqueued: float = field(default_factory=time.time)

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might start a stop string (not safe to send yet)."""
    hold = 1 if text.endswith("\ufffd") else 0  # half of a multi-byte character
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _cache_of(out):
    """The KV cache of a forward pass (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


class Engine:
    def __init__(self, model_path: str, max_batch_size: int, max_queue: int, batch_wait_ms: float, metrics, trust_remote_code: bool = False):
        self.model_path = model_path
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.wait = batch_wait_ms / 1000.0
        self.metrics = metrics
        self.trust_remote_code = trust_remote_code
        self.q: queue.Queue[Job] = queue.Queue()
        self.ready = threading.Event()
        self.error: str | None = None
        self.model = None
        self.tok = None
        self.context_length = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="llmctl-engine", daemon=True)

    # ---- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def load(self) -> None:
        from llmctl.modeling import load_for_inference

        self.model, self.tok = load_for_inference(self.model_path, trust_remote_code=self.trust_remote_code)
        self.context_length = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", None)
        self.ready.set()

    def _main(self) -> None:
        try:
            if not self.ready.is_set():
                self.load()
        except Exception as e:  # reported by /health and the CLI
            self.error = f"{type(e).__name__}: {e}"
            return
        while not self._stop.is_set():
            try:
                first = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.time() + self.wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.time()
                try:
                    batch.append(self.q.get(timeout=max(remaining, 0)) if remaining > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
            batch = [j for j in batch if not j.cancelled]
            self.metrics.set_queue(self.q.qsize())
            if batch:
                try:
                    self._decode(batch)
                except Exception as e:  # never leave a client hanging
                    for j in batch:
                        j.push(("error", f"{type(e).__name__}: {e}"))

    def submit(self, jobs: list[Job]) -> None:
        if self.q.qsize() + len(jobs) > self.max_queue:
            raise QueueFull
        for j in jobs:
            self.q.put(j)
        self.metrics.set_queue(self.q.qsize())

    # ---- decoding -------------------------------------------------------------
    def _decode(self, batch: list[Job]) -> None:
        import torch

        model, tok = self.model, self.tok
        dev = model.device
        B = len(batch)
        n = max(len(j.prompt_ids) for j in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((B, n), pad, dtype=torch.long)
        mask = torch.zeros((B, n), dtype=torch.long)
        for i, j in enumerate(batch):
            ids[i, n - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[i, n - len(j.prompt_ids):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        gens = []
        for j in batch:
            g = None
            if j.seed is not None:
                g = torch.Generator(device="cpu").manual_seed(j.seed)
            gens.append(g)
        active = [True] * B
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            past = _cache_of(out)
            logits = out.logits[:, -1, :].float()
            cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            last_pos = pos[:, -1]
            for step in range(max(j.max_tokens for j in batch)):
                nxt = torch.full((B,), pad, dtype=torch.long)
                for i, j in enumerate(batch):
                    if not active[i]:
                        continue
                    if j.cancelled:
                        active[i] = False
                        continue
                    nxt[i] = self._sample(logits[i], j, gens[i])
                for i, j in enumerate(batch):
                    if active[i]:
                        active[i] = self._advance(j, int(nxt[i]), eos_ids)
                if not any(active):
                    break
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
                last_pos = last_pos + 1
                out = model(input_ids=nxt.view(B, 1).to(dev), attention_mask=mask, position_ids=last_pos.view(B, 1), use_cache=True, **{cache_kw: past})
                past = _cache_of(out)
                logits = out.logits[:, -1, :].float()
        for i, j in enumerate(batch):
            if active[i] and not j.cancelled:  # ran out of steps without finishing
                self._finish(j, "length")

    @staticmethod
    def _sample(logits, j: Job, gen) -> int:
        import torch

        if j.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / j.temperature, dim=-1)
        if j.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = sp.cumsum(-1) - sp < j.top_p
            sp = sp * keep
            probs = torch.zeros_like(probs).scatter(0, si, sp)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))

    def _advance(self, j: Job, token: int, eos_ids: set) -> bool:
        """Take one token for a job; False once it has finished."""
        if token in eos_ids:
            self._flush(j, final=True)
            self._finish(j, "stop")
            return False
        j.tokens.append(token)
        text = self.tok.decode(j.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in j.stop if s) if i != -1), default=-1)
        if cut != -1:
            self._send(j, text[:cut])
            self._finish(j, "stop")
            return False
        if len(j.tokens) >= j.max_tokens:
            self._send(j, text)
            self._finish(j, "length")
            return False
        self._send(j, text[: len(text) - _held_back(text, j.stop)])
        return True

    def _flush(self, j: Job, final: bool) -> None:
        self._send(j, self.tok.decode(j.tokens, skip_special_tokens=True))

    @staticmethod
    def _send(j: Job, safe_text: str) -> None:
        if len(safe_text) > j.sent:
            j.push(("delta", safe_text[j.sent:]))
            j.sent = len(safe_text)

    def _finish(self, j: Job, reason: str) -> None:
        self.metrics.add_tokens(len(j.tokens))
        j.push(("done", reason, len(j.tokens)))
