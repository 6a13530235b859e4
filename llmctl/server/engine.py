"""One thread owns the model and decodes every running request together, step by step.

Continuous batching: the engine keeps one running batch of sequences (one per choice of a
request; a request with `n: 3` is three sequences). Before each decoding step, sequences
that are waiting are prefilled together (left padding, per-row position ids) and merged
into the running batch's KV cache; after each step, finished or cancelled sequences leave
the batch and their cache rows are dropped, so a freed slot is reused at the next step.
Every sequence samples with its own temperature, top_k, top_p, penalties and seed (by the
sampler `generate` uses, llmctl/inference/sampling.py), and stops on its own EOS, stop strings or
max_tokens (the inference core's stop rule, incremental detokenizer and logprobs). Tokens reach each request's asyncio queue as they are produced.

Models whose cache cannot be merged row-wise (anything but plain DynamicLayer caches, e.g.
sliding-window attention) fall back to batch-at-a-time: waiting sequences start together
once the running batch has drained.
"""

from __future__ import annotations

import inspect
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llmctl.inference.context import context_length, leading_bos
from llmctl.inference.detok import TokenPieces, step, text_ends
from llmctl.inference.logprobs import prompt_entries, sampled
from llmctl.inference.stops import release


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One sequence to generate. The engine thread writes, the event loop reads `out`."""

    prompt_ids: list[int]
    max_tokens: int
    logprobs: int | None = None  # None: off; K >= 0: each token's logprob (raw logits) and its top K alternatives
    echo_logprobs: bool = False  # also the prompt tokens' logprobs (completions with echo)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    loop: Any = None
    out: Any = None  # asyncio.Queue of ("delta", text, logprob entries) | ("done", finish_reason, completion_tokens) | ("error", msg)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # False: the client reads the whole answer at once, so text is handed over when the sequence
    # ends (one event-loop wake-up per sequence instead of one per token).
    stream: bool = True
    _cancelled: bool = field(default=False, repr=False)
    finished: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: int = 0
    enqueued: float = field(default_factory=time.time)
    # With logprobs: one (logprob, [(id, logprob), ...top]) per sampled token, the text length
    # decoded after each token, how many entries were sent, and the prompt's (echo).
    lps: list = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    lp_sent: int = 0
    prompt_lps: list | None = None
    # Incremental detokenization: the text so far, and the token window still being decoded.
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    _sampling: Any = field(default=None, repr=False, compare=False)
    images: Any = None  # image-text models: the processor's image tensors (pixel_values...) for this prompt's image tokens
    _on_cancel: Any = field(default=None, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """Set by the event loop when the client is gone (or a guard blocks the sequence)."""
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self._cancelled = value
        hook = self._on_cancel
        if value and hook is not None:
            hook()

    def when_cancelled(self, hook) -> None:
        """Call `hook()` (from whichever thread cancels) the moment this sequence is cancelled,
        or now if it already is; `None` unregisters. For an engine thread blocked on I/O, which
        then needs no polling to notice a client that hung up."""
        self._on_cancel = hook
        if hook is not None and self._cancelled:
            hook()

    def sampling(self):
        """The sampler's settings for this sequence (llmctl/inference/sampling.py, the one `generate` uses)."""
        if self._sampling is None:
            from llmctl.inference.sampling import SamplingParams

            self._sampling = SamplingParams(
                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            )
        return self._sampling

    def take_logprobs(self, upto: int) -> list:
        """Entries of the tokens whose text lies within the first `upto` characters, not yet sent."""
        if self.logprobs is None:
            return []
        k = self.lp_sent
        while k < len(self.tokens) and self.ends[k] <= upto:
            k += 1
        out = [(self.tokens[i], *self.lps[i], self.ends[i - 1] if i else 0) for i in range(self.lp_sent, k)]
        self.lp_sent = k
        return out

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone
            self.cancelled = True


def _cache_of(out):
    """The KV cache of a forward pass (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def _lean_cache(cache) -> bool:
    """A cache of llmctl's lean decoder, which merges row-wise (asked every step: no import)."""
    global _KVCache
    if _KVCache is None:
        from llmctl.inference.kvcache import KVCache

        _KVCache = KVCache
    return isinstance(cache, _KVCache)


_KVCache = None


def default_threads() -> int:
    """CPU threads for the model: all cores but one, which is left to the HTTP event loop.

    Decoding a small batch is many tiny matmuls; oversubscribed OpenMP threads spin against
    each other and the event loop (measured: 2 threads on a busy 2-core machine were 25x
    slower per step than 1).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(n - 1, 16))


class _Batch:
    """The running sequences: jobs, KV cache, attention mask, next positions, last logits."""

    def __init__(self, jobs, cache, mask, pos, logits, gens):
        self.jobs: list[Job] = jobs
        self.cache = cache
        self.mask = mask  # [B, T] 1 where the cache holds a real token
        self.pos = pos  # [B] position id of each row's next token
        self.logits = logits  # [B, V] float: the distribution of each row's next token
        self.gens = gens  # per-row torch.Generator (seeded requests) or None

    def __len__(self) -> int:
        return len(self.jobs)


class Engine:
    def __init__(
        self,
        model_path: str,
        max_batch_size: int,
        max_queue: int,
        batch_wait_ms: float,
        metrics,
        trust_remote_code: bool = False,
        device: str = "auto",
        threads: int | None = None,
        quantize: str | None = None,
        warm=None,
    ):
        self.model_path = model_path
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.wait = batch_wait_ms / 1000.0
        self.metrics = metrics
        self.trust_remote_code = trust_remote_code
        self.device_pref = device
        self.threads = threads
        self.quantize = quantize
        self.warm = warm  # called after the model loads, before ready (e.g. the rails' detectors)
        self.q: queue.Queue[Job] = queue.Queue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.model = None
        self.tok = None
        self.context_length: int | None = None
        self.vocab_size = 0
        self.steps = 0  # forward passes, for tests and metrics
        self._pending: list[Job] = []  # being prefilled: failed with the batch if that raises
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="llmctl-engine", daemon=True)

    # ---- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; it loads the model first unless `load()` already did."""
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def engine_metrics(self) -> str:
        """More Prometheus text for /metrics from the engine itself (none here). Blocking: call
        it off the event loop."""
        return ""

    def load(self) -> None:
        import torch

        from llmctl.modeling import load_for_inference, pick_device

        device = pick_device(self.device_pref)
        if device.type == "cpu":
            torch.set_num_threads(self.threads or default_threads())
        self.processor = None
        from llmctl.vision.infer import is_image_text

        if is_image_text(self.model_path):  # its processor turns a request's images into pixel_values
            from llmctl.vision.infer import OWN_POSITIONS, load_model

            self.model, self.processor = load_model(self.model_path, device, quantize=self.quantize)
            self.tok = self.processor.tokenizer
            if self.model.config.model_type in OWN_POSITIONS:
                from llmctl.errors import ConfigError

                raise ConfigError(f"serve: {self.model.config.model_type} places its tokens with 3-D (M-RoPE) positions computed from the "
                                  "image grid, which this engine's batched decoding does not pass: use 'llmctl generate --image', or "
                                  "export hf and serve that directory with vLLM")
        else:
            self.model, self.tok = load_for_inference(
                self.model_path, device=device, trust_remote_code=self.trust_remote_code, quantize=self.quantize, quantize_key="serve.quantize"
            )
        self.device = self.model.device  # a property that walks the parameters: read once
        self.context_length = context_length(self.model)
        self.vocab_size = self.model.get_input_embeddings().weight.shape[0]
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        from llmctl.inference.lean import decoder_for, tell_skipped

        # The lean forward pass (llmctl/inference/lean.py) when it covers the model for every length served.
        self.lean = decoder_for(self.model)
        if self.lean is not None and self.lean.window is not None and self.lean.window < (self.context_length or 1 << 30):
            tell_skipped(self.model, "lean decoding", f"its {self.lean.window}-token sliding window is shorter than the context served",
                         "decoding with transformers")
            self.lean = None
        if self.warm is not None:
            # Ready means fast: the first requests must not share the CPU and the GIL with a
            # detector loading (the moderation classifier's model takes seconds to unpickle).
            self.warm()
        self.ready.set()

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's sequences, all or none; QueueFull past `max_queue` waiting."""
        if self.q.qsize() + len(jobs) > self.max_queue:
            raise QueueFull
        for j in jobs:
            self.q.put(j)
        self.metrics.set_queue(self.q.qsize())

    def _loaded(self) -> bool:
        """Load the model unless loaded already; a failure is kept for /health and the CLI."""
        try:
            if not self.ready.is_set():
                self.load()
            return True
        except BaseException as e:  # reported by /health and the CLI
            self.error = e
            return False

    def _main(self) -> None:
        if not self._loaded():
            return
        batch: _Batch | None = None
        while not self._stop.is_set():
            try:
                batch = self._admit(batch)
                if batch is None:
                    continue
                batch = self._step(batch)
            except Exception as e:  # never leave a client hanging: fail this batch, keep serving
                failed = (batch.jobs if batch is not None else []) + self._drain_pending()
                for j in failed:
                    j.push(("error", f"{type(e).__name__}: {e}"))
                batch = None
            self.metrics.set_running(len(batch) if batch is not None else 0)

    # ---- scheduling -----------------------------------------------------------
    def _drain_pending(self) -> list[Job]:
        out, self._pending = self._pending, []
        return out

    def _admit(self, batch: _Batch | None) -> _Batch | None:
        """Prefill waiting sequences and merge them into the running batch."""
        room = self.max_batch_size - (len(batch) if batch is not None else 0)
        if room <= 0:
            return batch
        if batch is not None and not self._mergeable(batch):
            return batch  # batch-at-a-time model: newcomers wait for this batch to drain
        new: list[Job] = []
        if batch is None:
            # Idle: wait for a first request, then a moment for others arriving with it.
            try:
                new.append(self.q.get(timeout=0.1))
            except queue.Empty:
                return None
            deadline = time.monotonic() + self.wait
            while len(new) < room:
                left = deadline - time.monotonic()
                try:
                    new.append(self.q.get(timeout=left) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
        else:
            while len(new) < room:
                try:
                    new.append(self.q.get_nowait())
                except queue.Empty:
                    break
        self.metrics.set_queue(self.q.qsize())
        new = [j for j in new if not j.cancelled]
        if not new:
            return batch
        self._pending = new
        fresh = self._prefill(new)
        self._pending = []
        return fresh if batch is None else self._merge(batch, fresh)

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token for every row, drop finished rows, run the next forward pass."""
        import torch

        tokens = self._sample(batch)
        self._record_logprobs(batch, tokens)
        live = []
        made = 0
        for i, j in enumerate(batch.jobs):
            if j.cancelled or j.finished:
                continue
            n = len(j.tokens)
            if self._advance(j, tokens[i]):
                live.append(i)
            else:
                j.finished = True
            made += len(j.tokens) - n
        self.metrics.add_tokens(made)
        if not live:
            return None
        if len(live) < len(batch) and self._mergeable(batch):
            # Finished rows leave; a batch-at-a-time cache keeps them (masked) until it drains.
            batch = self._select(batch, live)
            tokens = [tokens[i] for i in live]
        dev = self.device
        B = len(batch)
        batch.mask = torch.cat([batch.mask, torch.ones((B, 1), dtype=batch.mask.dtype, device=dev)], dim=1)
        ids = torch.tensor(tokens, dtype=torch.long, device=dev).view(B, 1)
        if self.lean is not None:
            batch.logits = self.lean.forward(ids, batch.pos.view(B, 1), batch.cache, mask=batch.mask)
            self.steps += 1
            self.metrics.add_forward()
            batch.pos = batch.pos + 1
            return batch
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=batch.mask,
                position_ids=batch.pos.view(B, 1),
                use_cache=True,
                **{self._cache_kw: batch.cache},
            )
        self.steps += 1
        self.metrics.add_forward()
        batch.cache = _cache_of(out)
        batch.logits = out.logits[:, -1, :].float()
        batch.pos = batch.pos + 1
        return batch

    # ---- cache surgery ----------------------------------------------------------
    def _prefill(self, jobs: list[Job]) -> _Batch:
        import torch

        dev = self.device
        B = len(jobs)
        n = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((B, n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, n), dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, n - len(j.prompt_ids):] = torch.tensor(j.prompt_ids, dtype=torch.long)
            mask[i, n - len(j.prompt_ids):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        echo = any(j.echo_logprobs for j in jobs)
        from llmctl.inference.sampling import generator

        gens = [generator(j.seed) for j in jobs]
        if self.lean is not None:
            from llmctl.inference.lean import decoder_for

            self.lean = decoder_for(self.model) or self.lean  # rebuilt if the weights changed since
            cache = self.lean.new_cache()
            logits = self.lean.forward(ids, pos, cache, mask=mask, all_logits=echo)
            self.steps += 1
            self.metrics.add_forward()
            if echo:
                self._prompt_logprobs(jobs, logits, n)
                logits = logits[:, -1]
            return _Batch(jobs, cache, mask, pos[:, -1] + 1, logits, gens)
        kw = {"logits_to_keep": 1} if self._keep_kw and not echo else {}
        pics = [j.images for j in jobs if j.images is not None]
        if pics:  # image features fill the image tokens in row order
            kw.update({k: torch.cat([p[k] for p in pics]).to(dev) for k in pics[0]})
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        self.steps += 1
        self.metrics.add_forward()
        if echo:
            self._prompt_logprobs(jobs, out.logits, n)
        return _Batch(jobs, _cache_of(out), mask, pos[:, -1] + 1, out.logits[:, -1, :].float(), gens)

    @staticmethod
    def _layers(cache):
        return getattr(cache, "layers", None)

    def _mergeable(self, batch: _Batch) -> bool:
        from transformers.cache_utils import DynamicLayer

        if _lean_cache(batch.cache):
            return True

        layers = self._layers(batch.cache)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        """One batch from two: left-pad the shorter cache and mask in time, stack rows."""
        import torch
        import torch.nn.functional as F

        if not (self._mergeable(a) and self._mergeable(b)):
            raise RuntimeError("cannot merge these KV caches")  # _admit checks first
        ta, tb = a.mask.shape[1], b.mask.shape[1]
        T = max(ta, tb)
        if _lean_cache(a.cache):
            a.cache.stack(b.cache)
        for la, lb in zip(self._layers(a.cache) or [], self._layers(b.cache) or []):
            # keys/values: [B, heads, T, head_dim]; pad the T axis on the left with zeros (masked).
            la.keys = torch.cat([F.pad(la.keys, (0, 0, T - ta, 0)), F.pad(lb.keys, (0, 0, T - tb, 0))], dim=0)
            la.values = torch.cat([F.pad(la.values, (0, 0, T - ta, 0)), F.pad(lb.values, (0, 0, T - tb, 0))], dim=0)
        a.mask = torch.cat([F.pad(a.mask, (T - ta, 0)), F.pad(b.mask, (T - tb, 0))], dim=0)
        a.pos = torch.cat([a.pos, b.pos])
        a.logits = torch.cat([a.logits, b.logits])
        a.jobs = a.jobs + b.jobs
        a.gens = a.gens + b.gens
        return a

    def _select(self, batch: _Batch, keep: list[int]) -> _Batch:
        """Keep only these rows; drop leading cache columns no remaining row uses."""
        import torch

        idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        lean = _lean_cache(batch.cache)
        if lean:
            batch.cache.select(idx)
        else:
            batch.cache.batch_select_indices(idx)
        batch.mask = batch.mask[idx]
        batch.pos = batch.pos[idx]
        batch.logits = batch.logits[idx]
        batch.jobs = [batch.jobs[i] for i in keep]
        batch.gens = [batch.gens[i] for i in keep]
        used = batch.mask.any(dim=0).nonzero()
        lead = int(used[0]) if len(used) else 0
        if lead > 0 and lean:
            batch.cache.drop_leading(lead)
            batch.mask = batch.mask[:, lead:]
        elif lead > 0 and self._mergeable(batch):
            for layer in self._layers(batch.cache):
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]
            batch.mask = batch.mask[:, lead:]
        return batch

    # ---- logprobs -----------------------------------------------------------------
    def leading_bos(self, ids: list[int]) -> int:
        """1 when a prompt opens with BOS and has more (`inference.context.leading_bos`)."""
        return leading_bos(self.tok, ids)

    @property
    def wants_bos(self) -> bool:
        """`tokenizer.wants_bos` of the served tokenizer, asked once (it encodes twice to tell)."""
        known = self.__dict__.get("_wants_bos")
        if known is None or known[0] is not self.tok:
            from llmctl.tokenizer import wants_bos

            known = self.__dict__["_wants_bos"] = (self.tok, wants_bos(self.tok))
        return known[1]

    def _prompt_logprobs(self, jobs: list[Job], logits, n: int) -> None:
        """Each echo job's prompt tokens' logprobs, from the prefill. The first prompt token is
        scored after BOS (`tokenizer.score_prefix`: EOS if there is none), as eval scores the
        first token of a document, so every entry has a number: from the prefill when the
        prompt opens with BOS (itself not echoed), else from one more forward pass."""
        import torch

        from llmctl.tokenizer import score_prefix

        first = score_prefix(self.tok)
        start = None
        if first is not None and any(j.echo_logprobs and not self.leading_bos(j.prompt_ids) for j in jobs):
            with torch.inference_mode():
                start = torch.log_softmax(self.model(input_ids=torch.tensor([[first]], device=self.model.device)).logits[0, -1].float(), dim=-1)
        for i, j in enumerate(jobs):
            if not j.echo_logprobs:
                continue
            lead = self.leading_bos(j.prompt_ids)
            ids = j.prompt_ids[lead:]
            k = len(ids)
            rows = torch.log_softmax(logits[i, n - k : n - 1].float(), dim=-1)  # predicts the echoed tokens 1..k-1
            row0 = torch.log_softmax(logits[i, n - k - 1].float(), dim=-1) if lead else start  # after the BOS
            j.prompt_lps = prompt_entries(self.tok.decode, ids, row0, rows, j.logprobs or 0)

    def token_text(self, token: int) -> str:
        """A token's text alone (cached: logprobs name every token and alternative)."""
        return self._pieces().text(token)

    def token_bytes(self, token: int) -> list[int]:
        """The UTF-8 bytes a token stands for (byte-level BPE tokens can be part of a character)."""
        return self._pieces().bytes(token)

    def _pieces(self) -> TokenPieces:
        pieces = self.__dict__.get("_token_pieces")
        if pieces is None or pieces.tok is not self.tok:
            pieces = self.__dict__["_token_pieces"] = TokenPieces(self.tok)
        return pieces

    def _record_logprobs(self, batch: _Batch, tokens: list[int]) -> None:
        """Logprobs of the sampled tokens under the raw logits (before temperature, top-p and
        penalties, as vLLM reports them by default), for the rows that asked, in one batched
        call (`inference.logprobs.sampled`)."""
        rows = [i for i, j in enumerate(batch.jobs) if j.logprobs is not None and not (j.cancelled or j.finished)]
        if not rows:
            return
        every = len(rows) == len(batch.jobs)
        x = batch.logits if every else batch.logits[rows]
        for i, e in zip(rows, sampled(x, [tokens[i] for i in rows], [batch.jobs[i].logprobs for i in rows])):
            batch.jobs[i].lps.append(e)

    # ---- sampling ---------------------------------------------------------------
    def _sample(self, batch: _Batch) -> list[int]:
        """Each running row's next token, by the sampler `generate` uses (finished rows: pad)."""
        from llmctl.inference.sampling import next_tokens

        jobs = batch.jobs
        params = [None if (j.cancelled or j.finished) else j.sampling() for j in jobs]
        return next_tokens(batch.logits, params, [j.prompt_ids for j in jobs], [j.tokens for j in jobs], batch.gens, skip=self.pad_id)

    # ---- per-sequence bookkeeping -------------------------------------------------
    def _detokenize(self, j: Job, final: bool = False) -> None:
        """Extend `j.text` by the new tokens (`inference.detok.step`: a short window each step,
        not the whole output); text that ends in half a character waits for the next token,
        unless this is the last one."""
        delta, j.prefix_offset, j.read_offset = step(self.tok, j.tokens, j.prefix_offset, j.read_offset, final=final)
        j.text += delta

    def _text_ends(self, j: Job) -> None:
        """Each token's text offset (`j.ends`) for a sequence that was not decoded as it grew
        (a whole answer with logprobs and no stop strings), once, at its end."""
        j.ends += text_ends(self.tok, j.tokens, j.text, self.token_bytes)[len(j.ends):]

    def _advance(self, j: Job, token: int) -> bool:
        """Take one token for a sequence; False once it has finished."""
        # Text is needed as it grows only to stream it or find stop strings; otherwise it is
        # decoded once, at the end (and logprobs' text offsets found then).
        growing = j.stream or bool(j.stop)
        if token in self.eos_ids:
            if j.logprobs is not None:
                j.lps.pop()  # the EOS token is not part of the completion
            self._detokenize(j, final=True)
            if j.logprobs is not None and not growing:
                self._text_ends(j)
            self._send(j, j.text, final=True)
            self._finish(j, "stop")
            return False
        j.tokens.append(token)
        last = len(j.tokens) >= j.max_tokens
        if not (last or growing):
            return True  # nothing to decode, search or send before the end
        seen = len(j.text)
        self._detokenize(j, final=last)
        text = j.text
        if j.logprobs is not None:
            if growing:
                j.ends.append(len(text))
            else:
                self._text_ends(j)
        safe, stopped = release(text, j.stop, seen, final=last)  # the one stop rule, with its hold-back
        if stopped or last:
            self._send(j, text[:safe], final=True)
            self._finish(j, "stop" if stopped else "length")
            return False
        self._send(j, text[:safe])
        return True

    @staticmethod
    def _send(j: Job, safe_text: str, final: bool = False) -> None:
        if not (j.stream or final):
            return
        lps = j.take_logprobs(len(safe_text))
        if len(safe_text) > j.sent or lps:
            j.push(("delta", safe_text[j.sent:], lps))
            j.sent = len(safe_text)

    def _finish(self, j: Job, reason: str) -> None:
        j.push(("done", reason, len(j.tokens)))
