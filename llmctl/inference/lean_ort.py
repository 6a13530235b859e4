"""The lean decode step of a small model as one ONNX graph, run by onnxruntime.

A decode step of a quickstart-sized model is about a hundred tiny tensor operations; in eager
PyTorch each costs a Python call and a dispatch (several microseconds), more than its
arithmetic. onnxruntime runs the same step from C++ with no per-operation Python. Measured on
this project's 2-core CPU with the 4-layer, 128-wide quickstart model, side by side: a step
took 0.6-1.1 ms against 1.4-2.4 ms eager at batch 1, and 1.3-2.3 ms against 2.4-3.9 ms at
batch 8 (bench/serve.py and bench/generate.py measure what users see).

The graph is traced from the folded weights of `LeanDecoder` (RMSNorm weights, attention
scale and rotary's rotate-half inside the matmuls), so it computes what the eager folded path
computes; `OrtStep` checks that on a probe when it is built and is dropped if the two
disagree. It reads the `KVCache` buffers in place (their unfilled columns masked) and returns
only the new token's keys and values, which the cache writes in one copy. Prompts (prefill)
stay on the eager path, where one call covers many tokens.

Used wherever llmctl decodes through `llmctl.inference.lean.decoder_for` (`generate`, `serve`, eval's
generation) when onnxruntime is installed (the `onnx` and `serve` extras) and the model is on
the CPU; `LLMCTL_LEAN_ORT=0` keeps the eager path.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from llmctl.inference.kvcache import KVCache

TOLERANCE = 1e-4  # probe logits: ORT against the eager folded pass (float32 rounding)
# onnxruntime's option that lets a session's threads spin between its kernels and after a run
SPINNING = "session.intra_op.allow_spinning"


def available() -> str | None:
    """Why the ORT step cannot be used here, or None when it can."""
    if os.environ.get("LLMCTL_LEAN_ORT", "1") == "0":
        return "turned off by LLMCTL_LEAN_ORT=0"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    return None


class _Graph(torch.nn.Module):
    """The folded weights of a LeanDecoder, for tracing to ONNX."""

    def __init__(self, dec):
        super().__init__()
        layers, w_head = dec.fast
        self.embed = dec.embed.weight.detach()
        self.layers = layers
        self.w_head = w_head
        self.eps = dec.final_norm[1]
        self.H, self.KV, self.D = dec.n_heads, dec.n_kv, dec.head_dim
        self.ones = torch.ones(self.embed.shape[1])
        # the model's own rotary table for every position of its context ([positions, D])
        cos, sin = dec._rope(torch.arange(dec.context)[None])
        self.cos, self.sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()

    def norm(self, x, eps):  # the pattern onnxruntime fuses into one SimplifiedLayerNormalization
        return x / torch.sqrt(torch.pow(x, 2).mean(-1, keepdim=True) + eps) * self.ones

    def mlp(self, h, w_o, b_o, o, w_gu, b_gu, eps2, w_down, b_down):
        """The attention output's projection and residual, then the MLP block and its residual."""
        h = h + o @ w_o
        if b_o is not None:
            h = h + b_o
        gu = self.norm(h, eps2) @ w_gu
        if b_gu is not None:
            gu = gu + b_gu
        gate, up = gu.split([w_down.shape[0], w_down.shape[0]], dim=-1)
        h = h + (F.silu(gate) * up) @ w_down
        return h if b_down is None else h + b_down


class _Prefill(_Graph):
    """A prompt on an empty cache: ids and positions [B, n]; mask [B|1, 1, n, n] additive
    (causal and padding). Returns the last position's logits [B, V] and the keys and
    values of every layer [layers, 2, B, KV, n, D]."""

    def forward(self, ids, pos, mask):
        H, KV, D = self.H, self.KV, self.D
        g = H // KV
        B, n = ids.shape[0], ids.shape[1]
        cos, sin = F.embedding(pos, self.cos).unsqueeze(1), F.embedding(pos, self.sin).unsqueeze(1)  # [B, 1, n, D]
        h = F.embedding(ids, self.embed)  # [B, n, d]
        new = []
        for w_qkv, b_qkv, eps1, w_o, b_o, w_gu, b_gu, eps2, w_down, b_down in self.layers:
            y = self.norm(h, eps1) @ w_qkv
            if b_qkv is not None:
                y = y + b_qkv
            qk, v, rot = y.view(B, n, 2 * H + 3 * KV, D).transpose(1, 2).split([H + KV, KV, H + KV], dim=1)
            q, k = (qk * cos + rot * sin).split([H, KV], dim=1)  # [B, heads, n, D]
            new += [k, v]
            if g > 1:  # each kv head serves g query heads
                k = k.unsqueeze(2).expand(B, KV, g, n, D).reshape(B, H, n, D)
                v = v.unsqueeze(2).expand(B, KV, g, n, D).reshape(B, H, n, D)
            p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + mask, dim=-1)
            o = torch.matmul(p, v).transpose(1, 2).reshape(B, n, H * D)
            h = self.mlp(h, w_o, b_o, o, w_gu, b_gu, eps2, w_down, b_down)
        logits = self.norm(h[:, -1], self.eps) @ self.w_head
        return logits, torch.stack(new).view(len(self.layers), 2, B, KV, n, D)


class _Step(_Graph):
    """One decode step (one new token per row).

    ids, pos [B] (the new token and its position); mask [B|1, 1, 1, C+1] additive
    (0 or -inf) over the cache buffers' C columns and the new token; past: per layer keys and
    values [B, KV, C, D], the cache buffers read as they are (the unfilled columns are masked).
    Returns logits [B, V] and the new token's keys and values [layers, 2, B, KV, 1, D].

    With one token per row every reshape has a constant shape (the batch is -1) and no
    transpose is needed: a layer is about 30 onnxruntime kernels."""

    def forward(self, ids, pos, mask, *past):
        H, KV, D = self.H, self.KV, self.D
        g = H // KV
        cos, sin = F.embedding(pos, self.cos).view(-1, 1, 1, D), F.embedding(pos, self.sin).view(-1, 1, 1, D)
        h = F.embedding(ids, self.embed)  # [B, d]
        new = []
        for i, (w_qkv, b_qkv, eps1, w_o, b_o, w_gu, b_gu, eps2, w_down, b_down) in enumerate(self.layers):
            y = self.norm(h, eps1) @ w_qkv
            if b_qkv is not None:
                y = y + b_qkv
            qk, v, rot = y.view(-1, 2 * H + 3 * KV, 1, D).split([H + KV, KV, H + KV], dim=1)
            q, k = (qk * cos + rot * sin).split([H, KV], dim=1)  # [B, heads, 1, D]
            new += [k, v]
            # Query heads grouped by the kv head they share ([B, KV, g, D]); attention over the
            # cache buffers as they are and over the new token, so the cache is never copied.
            q = q.reshape(-1, KV, g, D)
            pk, pv = past[2 * i], past[2 * i + 1]
            s = torch.cat([torch.matmul(q, pk.transpose(-1, -2)), torch.matmul(q, k.transpose(-1, -2))], dim=-1) + mask
            p = torch.softmax(s, dim=-1)
            o = torch.matmul(p[..., :-1], pv) + p[..., -1:] * v  # [B, KV, g, D]
            h = self.mlp(h, w_o, b_o, o.reshape(-1, H * D), w_gu, b_gu, eps2, w_down, b_down)
        return self.norm(h, self.eps) @ self.w_head, torch.stack(new).view(len(self.layers), 2, *new[0].shape)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy())


class OrtStep:
    """onnxruntime sessions over `_Step` and `_Prefill`, for a LeanDecoder whose folded plan exists."""

    def __init__(self, dec, threads: int | None = None):
        import onnxruntime as ort

        self.dec = dec
        self.L, self.KV, self.D = len(dec.layers), dec.n_kv, dec.head_dim
        self.positions = dec.context  # the graphs' rotary tables cover positions below this
        B, C, n = 2, 4, 3
        past = [torch.zeros(B, self.KV, C, self.D) for _ in range(2 * self.L)]
        self.past_names = [f"past.{i}.{kv}" for i in range(self.L) for kv in "kv"]

        def session(graph, example, names, axes, spin: bool = True):
            buf = io.BytesIO()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph.eval(), example, buf, input_names=names, output_names=["logits", "new"], dynamic_axes=axes,
                                  opset_version=17, dynamo=False)
            # options of its own: onnxruntime warns on stderr when a set entry is set again
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads or torch.get_num_threads()
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            if not spin:
                so.add_session_config_entry(SPINNING, "0")
            return ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])

        self.sess = session(
            _Step(dec), (torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), torch.zeros(B, 1, 1, C + 1), *past),
            ["ids", "pos", "mask", *self.past_names],
            {"ids": {0: "B"}, "pos": {0: "B"}, "mask": {0: "Bm", 3: "C1"}, "logits": {0: "B"},
             **{x: {0: "B", 2: "C"} for x in self.past_names}, "new": {2: "B"}})
        self.prefill_sess = session(
            _Prefill(dec), (torch.zeros(B, n, dtype=torch.long), torch.zeros(B, n, dtype=torch.long), torch.zeros(B, 1, n, n)),
            ["ids", "pos", "mask"],
            {"ids": {0: "B", 1: "n"}, "pos": {0: "B", 1: "n"}, "mask": {0: "Bm", 2: "n", 3: "n"},
             "logits": {0: "B"}, "new": {2: "B", 4: "n"}},
            # Each session has its own threads, which spin for a while after a run. Steps run back
            # to back and gain from it; a prompt comes once per request, and its session's threads
            # spinning on after it took the cores the next steps needed. Serving a 32M llama on 2
            # cores (bench/serve_32m.py, 7 rounds): 1.11x / 1.27x / 1.18x the tokens/s at 1 / 4 / 8
            # clients with the prompt graph's threads asleep between runs. LLMCTL_ORT_PREFILL_SPIN=1 lets them spin.
            spin=os.environ.get("LLMCTL_ORT_PREFILL_SPIN", "0") == "1")
        self._probe()

    def _probe(self) -> None:
        """The sessions must compute what the eager folded pass computes; raise otherwise."""
        g = torch.Generator().manual_seed(0)
        V = self.dec.embed.weight.shape[0]
        ids = torch.randint(0, V, (2, 6), generator=g)
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = KVCache(self.L), KVCache(self.L)
        ref = [self.dec.forward(ids[:, :5], pos[:, :5], caches[0], mask=mask[:, :5], runtime="torch"),
               self.dec.forward(ids[:, 5:], pos[:, 5:], caches[0], mask=mask, runtime="torch")]
        got = [self.dec.forward(ids[:, :5], pos[:, :5], caches[1], mask=mask[:, :5], ort=self),
               self.dec.forward(ids[:, 5:], pos[:, 5:], caches[1], mask=mask, ort=self)]
        diff = max(*(float((a - b).abs().max()) for a, b in zip(got, ref)), float((caches[0].buf - caches[1].buf).abs().max()))
        if not diff <= TOLERANCE * max(1.0, float(ref[1].abs().max())):
            raise RuntimeError(f"onnxruntime's logits differ from the eager pass by {diff:.2e}")

    def prefill(self, ids, pos: np.ndarray, cache, attn_mask):
        """A prompt ids [B, n] at positions `pos` on an empty cache, with its additive mask
        [B|1, 1, n, n] (causal and padding). Returns float logits [B, V] of the last position."""
        logits, new = self.prefill_sess.run(None, {"ids": _np(ids), "pos": pos, "mask": _np(attn_mask)})
        cache.append_all(new)
        return torch.from_numpy(logits)

    def run(self, ids, pos: np.ndarray, cache, mask):
        """One decode step: ids [B, 1] at positions `pos` after the tokens in `cache` (a
        lean.KVCache, written in place); mask [B, cache.length + 1] with 1 for real tokens, or
        None. Returns float logits [B, V]."""
        B = ids.shape[0]
        t0 = cache.length
        C = cache.capacity  # columns past t0 are masked
        bias = np.full((1 if mask is None else B, 1, 1, C + 1), -np.inf, dtype=np.float32)
        if mask is None:
            bias[..., :t0] = 0.0
        else:
            bias[:, 0, 0, :t0][mask[:, :t0].numpy() != 0] = 0.0
        bias[..., C] = 0.0  # the new token sees itself
        past = cache.buf.view(2 * self.L, *cache.buf.shape[2:]).numpy()  # each layer's keys, values: contiguous
        feed = {"ids": _np(ids).reshape(B), "pos": np.ascontiguousarray(pos.reshape(B)), "mask": bias, **dict(zip(self.past_names, past))}
        logits, new = self.sess.run(None, feed)
        cache.append_all(new)
        return torch.from_numpy(logits)
