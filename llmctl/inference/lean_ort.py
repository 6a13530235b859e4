"""The lean decoder's prompts and decode steps as ONNX graphs, run by onnxruntime.

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
only the new token's keys and values, which the cache writes in one copy. A second graph
takes prompts (prefill) on an empty cache.

A model whose weights are not folded (past the fold limit, q/k norms, or quantized with
`--quantize int8`) gets graphs of the unfolded pass (`_Unfolded`, `OrtUnfolded`): onnxruntime's
int8 matmul on an int8 model's own int8 weights, or Gemm on a float32 model's own weights. At
85M parameters a decode step took about half the eager pass's time, int8 or float32.

Used wherever llmctl decodes through `llmctl.inference.lean.decoder_for` (`generate`, `serve`, eval's
generation) when onnxruntime is installed (the `onnx` and `serve` extras) and the model is on
the CPU; `LLMCTL_LEAN_ORT=0` keeps the eager path.
"""

from __future__ import annotations

import collections
import io
import os
import tempfile
import warnings
from pathlib import Path

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


def _prompt_attention(q, k, v, mask):
    """A prompt's attention: q [B, H, n, D]; k, v [B, KV, n, D], each kv head serving H / KV
    query heads; mask additive, [B|1, 1, n, n]. Returns [B, n, H * D]."""
    B, H, n, D = q.shape
    KV = k.shape[1]
    if H > KV:
        k = k.unsqueeze(2).expand(B, KV, H // KV, n, D).reshape(B, H, n, D)
        v = v.unsqueeze(2).expand(B, KV, H // KV, n, D).reshape(B, H, n, D)
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + mask, dim=-1)
    return torch.matmul(p, v).transpose(1, 2).reshape(B, n, H * D)


class _Prefill(_Graph):
    """A prompt on an empty cache: ids and positions [B, n]; mask [B|1, 1, n, n] additive
    (causal and padding). Returns the last position's logits [B, V] and the keys and
    values of every layer [layers, 2, B, KV, n, D]."""

    def forward(self, ids, pos, mask):
        H, KV, D = self.H, self.KV, self.D
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
            h = self.mlp(h, w_o, b_o, _prompt_attention(q, k, v, mask), w_gu, b_gu, eps2, w_down, b_down)
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
        return self.norm(h, self.eps) @ self.w_head, torch.stack(new).view(len(self.layers), 2, -1, KV, 1, D)


# The file a graph's placeholders for the caller's tensors name as their external data (see _session)
SHARED_FILE = "shared-with-the-caller"


def _session(model: bytes, threads: int | None, spin: bool, shared: dict | None = None, prepack: bool = True):
    """An onnxruntime CPU session on `threads` threads (torch's count by default); `spin`: its
    threads spin between runs; `shared`: initializers as OrtValues over memory the caller keeps
    alive, used in place; `prepack`: weights copied into onnxruntime's packed layouts. Options of
    its own: onnxruntime warns on stderr when a set entry is set again.

    A shared initializer is named in the graph as external data in SHARED_FILE and handed over
    with `add_initializer`, which onnxruntime uses in place; `add_external_initializers` copies
    into each session. Measured with 377 MB of float32 Gemm weights: the session took 10 MB
    unpacked and 383 MB packed, against 381 and 757 MB copied. onnxruntime checks that the file
    exists but reads none of it: an empty one, for the session's creation only."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry(SPINNING, "0")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not shared:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    for name, value in shared.items():
        so.add_initializer(name, value)
    with tempfile.TemporaryDirectory(prefix="llmctl-ort-") as d:
        (Path(d) / SHARED_FILE).touch()
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", d)
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy())


class _Sessions:
    """What a LeanDecoder calls on its onnxruntime graphs: `prefill` and `run` over a prompt
    session (`prefill_sess`) and a step session (`sess`) whose cache inputs are `past_names`."""

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
        logits, new = self.sess.run(None, _step_feed(self.past_names, ids, pos, cache, mask))
        cache.append_all(new)
        return torch.from_numpy(logits)


class OrtStep(_Sessions):
    """onnxruntime sessions over `_Step` and `_Prefill`, for a LeanDecoder whose folded plan exists."""

    exact = True  # the folded pass's arithmetic, to float rounding

    def __init__(self, dec, threads: int | None = None):

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
            return _session(buf.getvalue(), threads, spin)

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



def _step_feed(past_names: list[str], ids, pos: np.ndarray, cache, mask) -> dict:
    """The inputs of a step graph (`_Step`, `_Unfolded`'s step): the new tokens, their positions, the
    additive mask over the cache buffers' columns and the new token, and each layer's keys and
    values as the cache holds them (read in place)."""
    B = ids.shape[0]
    t0, C = cache.length, cache.capacity  # columns past t0 are masked
    bias = np.full((1 if mask is None else B, 1, 1, C + 1), -np.inf, dtype=np.float32)
    if mask is None:
        bias[..., :t0] = 0.0
    else:
        bias[:, 0, 0, :t0][mask[:, :t0].numpy() != 0] = 0.0
    bias[..., C] = 0.0  # the new token sees itself
    past = cache.buf.view(len(past_names), *cache.buf.shape[2:]).numpy()  # each layer's keys, values: contiguous
    return {"ids": _np(ids).reshape(B), "pos": np.ascontiguousarray(pos.reshape(B)), "mask": bias, **dict(zip(past_names, past))}


# ----------------------------------------------------------------------------- the unfolded pass: int8, or float32 past the fold limit


class _Unfolded(torch.nn.Module):
    """The lean pass unfolded, as the eager pass computes it (RMSNorm times its weight, rotary
    on q and k, the attention scale on q), for a model whose weights are not folded: its
    projections and output layer all torch's per-channel int8 Linears (`--quantize int8`), or
    all plain float32 Linears (a model past the fold limit, or with q/k norms). A float weight
    is the model's own tensor, handed to onnxruntime as it lies (`external`; `F.linear` on 2-D inputs, which the
    exporter writes as Gemm on the [out, in] weight as it lies). Each int8 weight is held as two named
    buffers, `<name>_q` (its int8 values, [in, out]) and `<name>_s` (a scale per output channel),
    and used as `x @ (q.float() * s)`: run in torch that is the float matmul by the dequantized
    weight (the probe's reference), and `_int8_matmuls` turns each such matmul of the exported graph
    into onnxruntime's int8 one. Its two graphs, `step` and `prefill` (`mode`), take and return
    what `_Step` and `_Prefill` do."""

    def __init__(self, dec):
        super().__init__()
        self.H, self.KV, self.D = dec.n_heads, dec.n_kv, dec.head_dim
        self.scale = dec.scale
        self.embed = dec.embed.weight.detach()
        cos, sin = dec._rope(torch.arange(dec.context)[None], signed=True)
        self.cos, self.sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()  # sin: its first half negated
        self.names: list[str] = []  # the int8 weights
        self.external = {"embed": self.embed}  # the model's own float tensors, handed to the sessions as they lie
        self.mode = "step"
        self.fed = None  # the large tensors as traced inputs (see forward)
        self.int8 = dec._int8()
        # int8 without q/k norms: the attention scale rides in the q rows' weight scales (and biases)
        self.scaled_q = self.int8 and not dec.qk_norm
        q_rows = (self.H * self.D, self.scale) if self.scaled_q else None
        self.layers = []
        for i, (layer, p) in enumerate(zip(dec.layers, dec.plan)):
            a = layer.self_attn
            qk = None
            if dec.qk_norm:
                qk = (self._norm(dec._norm_plan(a.q_norm)), self._norm(dec._norm_plan(a.k_norm)))
            self.layers.append((self._norm(p["ln1"]), self._lin(f"l{i}_qkv", p, "qkv", "qkv", q_rows), qk, self._lin(f"l{i}_o", p, "o"),
                                self._norm(p["ln2"]), self._lin(f"l{i}_gu", p, "gu", ("gate", "up")), self._lin(f"l{i}_down", p, "down")))
        self.final = self._norm(dec.final_norm)
        self.inter = dec.model.config.intermediate_size  # the MLP's gate and up widths
        self.head = self._lin("head", {"head": dec.head_w}, "head")

    def _lin(self, name: str, plan: dict, key: str, parts=(), rows_times=None):
        """A projection of the plan: its int8 weights (`_int8`), or the model's own float32
        weights, one Linear or several with the same input (`parts`: the plan's keys for them
        when they are not stacked), handed over as they lie."""
        entry = plan.get(key)
        if entry and hasattr(entry[0], "packed"):  # lean.Int8Linears (lean imports this module)
            return self._int8(name, entry, rows_times)
        entries = [entry] if entry else [plan.get(k) for k in parts]
        if not entries or not all(e and isinstance(e[0], torch.Tensor) and e[0].dtype == torch.float32 for e in entries):
            raise ValueError("a projection is neither a per-channel int8 Linear nor a plain float32 one")
        out = []
        for j, (w, b, _) in enumerate(entries):
            self.external[f"{name}_w{j}"] = w.detach()
            # a bias (zeros where there is none) makes the exporter write Gemm(transB=1) on the
            # [out, in] weight as it lies, not a transposed copy of it
            out.append((f"{name}_w{j}", torch.zeros(w.shape[0]) if b is None else b.detach()))
        return "f", name, out, None

    @staticmethod
    def _norm(plan):
        if plan is None:
            raise ValueError("a norm is not a plain float32 RMSNorm")
        return plan[0].detach(), plan[1]

    def _int8(self, name: str, entry, rows_times=None):
        """Register the int8 weight of a plan entry (one or several stacked Int8Linears); `rows_times`:
        (n, c), the first n output channels' scales and biases times c."""
        w, b = entry[0].packed.unpack()
        if w.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric) or w.q_per_channel_axis() != 0 \
                or bool(w.q_per_channel_zero_points().any()):
            raise ValueError("int8 weights without a scale per output channel and zero point 0")
        scales, b = w.q_per_channel_scales().float(), None if b is None else b.detach().float().clone()
        if rows_times is not None:
            n, c = rows_times
            scales[:n] *= c
            if b is not None:
                b[:n] *= c
        self.register_buffer(f"{name}_q", w.int_repr().t().contiguous())
        self.register_buffer(f"{name}_s", scales)
        self.names.append(name)
        return "q", name, None, b

    def lin(self, x, entry):
        kind, name, parts, b = entry
        if kind == "q":
            y = x @ (self.w(f"{name}_q").float() * self.w(f"{name}_s"))
            return y if b is None else y + b
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # Gemm takes 2-D
        ys = [F.linear(x2, self.w(w), bias) for w, bias in parts]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def norm(x, w, eps):  # the pattern onnxruntime fuses into one SimplifiedLayerNormalization
        return x / torch.sqrt(torch.pow(x, 2).mean(-1, keepdim=True) + eps) * w

    def rotate(self, x, cos, sin_signed):  # x * cos + rotate_half(x) * sin, the minus sign in the table
        h = self.D // 2
        return x * cos + torch.cat([x[..., h:], x[..., :h]], dim=-1) * sin_signed

    def qkv(self, h, ln1, qkv, qk, cos, sin, split):
        """The layer's q, k and v ([B, heads, n, D]) of h [B, n, d] (n = 1: h [B, d]); `split`
        turns [.., heads * D] into [B, heads, n, D]."""
        H, KV, D = self.H, self.KV, self.D
        y = self.lin(self.norm(h, *ln1), qkv)
        v = split(y[..., (H + KV) * D :], KV)
        if qk is None:  # q and k rotated together (an int8 model's q rows already carry the attention scale)
            qk_ = self.rotate(split(y[..., : (H + KV) * D], H + KV), cos, sin)
            return qk_[:, :H] if self.scaled_q else qk_[:, :H] * self.scale, qk_[:, H:], v
        q, k = self.norm(split(y[..., : H * D], H), *qk[0]), self.norm(split(y[..., H * D : (H + KV) * D], KV), *qk[1])
        return self.rotate(q, cos, sin) * self.scale, self.rotate(k, cos, sin), v

    def mlp(self, h, o, o_w, ln2, gu, down):
        h = h + self.lin(o, o_w)
        gate, up = self.lin(self.norm(h, *ln2), gu).split([self.inter, self.inter], dim=-1)  # static: no shape ops
        return h + self.lin(F.silu(gate) * up, down)


    def big(self) -> list[str]:
        """The large tensors: the rotary tables, every int8 weight and its scales, and the model's
        own float tensors (`external`)."""
        return ["cos", "sin", *(f"{n}_{x}" for n in self.names for x in "qs"), *self.external]

    def w(self, name: str):
        if self.fed is not None:
            return self.fed[name]
        return self.external[name] if name in self.external else getattr(self, name)

    def forward(self, *args):
        """The graph `mode` names. Traced for export, the large tensors come last, as inputs:
        as constants they made torch's exporter run ONNX shape inference over their bytes (6 s
        of the 85M model's 7-second export); `OrtUnfolded._session` makes them initializers."""
        n = 3 + 2 * len(self.layers) if self.mode == "step" else 3  # ids, pos, mask (and the cache's layers)
        self.fed = dict(zip(self.big(), args[n:])) if len(args) > n else None
        try:
            return self.step(*args[:n]) if self.mode == "step" else self.prefill(*args[:n])
        finally:
            self.fed = None

    def step(self, ids, pos, mask, *past):  # inputs and outputs: `_Step`'s
        H, KV, D = self.H, self.KV, self.D
        g = H // KV
        cos, sin = F.embedding(pos, self.w("cos")).view(-1, 1, 1, D), F.embedding(pos, self.w("sin")).view(-1, 1, 1, D)
        h = F.embedding(ids, self.w("embed"))  # [B, d]
        new = []
        for i, (ln1, qkv, qk, o_w, ln2, gu, down) in enumerate(self.layers):
            q, k, v = self.qkv(h, ln1, qkv, qk, cos, sin, lambda y, heads: y.reshape(-1, heads, 1, D))
            new += [k, v]
            q = q.reshape(-1, KV, g, D)  # query heads grouped by the kv head they share
            pk, pv = past[2 * i], past[2 * i + 1]
            s = torch.cat([torch.matmul(q, pk.transpose(-1, -2)), torch.matmul(q, k.transpose(-1, -2))], dim=-1) + mask
            p = torch.softmax(s, dim=-1)
            o = torch.matmul(p[..., :-1], pv) + p[..., -1:] * v  # [B, KV, g, D]
            h = self.mlp(h, o.reshape(-1, H * D), o_w, ln2, gu, down)
        return self.lin(self.norm(h, *self.final), self.head), torch.stack(new).view(len(self.layers), 2, -1, KV, 1, D)

    def prefill(self, ids, pos, mask):  # inputs and outputs: `_Prefill`'s
        KV, D = self.KV, self.D
        B, n = ids.shape[0], ids.shape[1]
        cos, sin = F.embedding(pos, self.w("cos")).unsqueeze(1), F.embedding(pos, self.w("sin")).unsqueeze(1)  # [B, 1, n, D]
        h = F.embedding(ids, self.w("embed"))  # [B, n, d]
        new = []
        for ln1, qkv, qk, o_w, ln2, gu, down in self.layers:
            q, k, v = self.qkv(h, ln1, qkv, qk, cos, sin, lambda y, heads: y.view(B, n, heads, D).transpose(1, 2))
            new += [k, v]
            h = self.mlp(h, _prompt_attention(q, k, v, mask), o_w, ln2, gu, down)
        return self.lin(self.norm(h[:, -1], *self.final), self.head), torch.stack(new).view(len(self.layers), 2, B, KV, n, D)


# Activations are quantized per row to 7 bits around a zero point of 64 (symmetric: the scale is
# the row's largest magnitude over 63). 7 bits, not 8, as fbgemm's `reduce_range` does it and for
# the same reason: on AVX2 without VNNI, MLAS's u8 x s8 kernel adds pairs of products in int16
# (vpmaddubsw), which saturates when uint8 values near 255 meet int8 weights near +-128; at 127 at
# most a pair stays below 2^15.
ACT_ZERO = 64
ACT_MAX = 63


def _int8_matmuls(proto, names) -> None:
    """Replace, in an exported `_Unfolded` graph, each `x @ (Cast(<name>_q) * <name>_s)` by an int8
    matmul: x quantized per row (see ACT_MAX), MatMulInteger by the int8 weight, the int32 result
    times the row's scale and the channel's scale. The float weights never exist in the graph."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    made = {o: n for n in g.node for o in n.output}
    dequant = {}  # output of Mul(Cast(<name>_q), <name>_s) -> name
    for name in names:
        for n in g.node:
            if n.op_type == "Mul" and f"{name}_s" in n.input:
                cast = made.get(n.input[0] if n.input[1] == f"{name}_s" else n.input[1])
                if cast is not None and cast.op_type == "Cast" and list(cast.input) == [f"{name}_q"]:
                    dequant[n.output[0]] = (name, n, cast)
    if len(dequant) != len(names):
        raise RuntimeError(f"found {len(dequant)} of {len(names)} int8 weights in the exported graph")
    # each weight's scales over ACT_MAX: the int32 sums times (the row's largest magnitude) times these
    scales = {f"{name}_s" for name in names}
    kept = []
    for t in g.initializer:
        if t.name in scales:
            kept.append(numpy_helper.from_array(numpy_helper.to_array(t) / np.float32(ACT_MAX), t.name + "/act"))
    for name in scales:
        g.initializer.remove(next(t for t in g.initializer if t.name == name))
    g.initializer.extend(kept + [numpy_helper.from_array(np.array(ACT_ZERO, np.uint8), "int8/zero"),
                                 numpy_helper.from_array(np.array(1e-30, np.float32), "int8/tiny"),
                                 numpy_helper.from_array(np.array(1.0 / ACT_MAX, np.float32), "int8/step")])
    nodes, dropped = [], {id(n) for _, n, c in dequant.values()} | {id(c) for _, n, c in dequant.values()}
    for n in g.node:
        if id(n) in dropped:
            continue
        if n.op_type != "MatMul" or n.input[1] not in dequant:
            nodes.append(n)
            continue
        name = dequant[n.input[1]][0]
        x, p = n.input[0], f"int8/{name}/"
        nodes += [
            helper.make_node("Abs", [x], [p + "abs"]),
            helper.make_node("ReduceMax", [p + "abs"], [p + "max0"], axes=[-1], keepdims=1),
            helper.make_node("Max", [p + "max0", "int8/tiny"], [p + "max"]),  # an all-zero row: no 0 / 0
            helper.make_node("Div", [x, p + "max"], [p + "xs"]),  # in [-1, 1]
            helper.make_node("QuantizeLinear", [p + "xs", "int8/step", "int8/zero"], [p + "xq"]),  # round(63 x) + 64
            helper.make_node("MatMulInteger", [p + "xq", f"{name}_q", "int8/zero"], [p + "acc"]),
            helper.make_node("Cast", [p + "acc"], [p + "accf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [p + "max", f"{name}_s/act"], [p + "ss"]),
            helper.make_node("Mul", [p + "accf", p + "ss"], list(n.output)),
        ]
    del g.node[:]
    g.node.extend(nodes)


INT8_BOUND = 2.0  # the onnxruntime int8 step's distance from float may be this many times torch's int8


class OrtUnfolded(_Sessions):
    """The prompts and decode steps of a model whose weights are not folded, as onnxruntime
    graphs of `_Unfolded`: an int8 model's matmuls in int8 (see `_int8_matmuls`), a float32
    model's as Gemm on its own weights. The weights (the model's float tensors, an int8 model's
    int8 ones) are shared with the sessions, not copied into them (see `_session`): the prompt
    graph reads them where they lie, and the step graph holds the one copy it packs for speed.
    Measured with `llmctl serve` at 85M after four requests: 1.34 GB resident on the f32 model
    against 0.93 GB on the eager pass (1.79 when each session copied the weights), int8 1.54
    against 1.12 (was 1.84); hence LeanDecoder.UNFOLDED_F32_MAX_PARAMS. Measured on this project's 2-core AVX2 CPU at
    85M parameters: the 48 int8 projections took 4.6 ms at one row against fbgemm's 7.1 (the
    calls alone); the float32 ones 12.5-13 ms against oneDNN's 18-20.5 (packed; 15 unpacked);
    and the glue between them runs in C++. Keeping prompts off torch also keeps torch's OpenMP
    threads, which spin on after a prompt, off the cores the next steps run on (`llmctl serve`
    at one client: the first step after an eager int8 prompt took 25-65 ms, not 7).

    A float32 model's graphs compute the eager pass's arithmetic to float rounding (`exact`;
    checked to TOLERANCE like `OrtStep`). An int8 model's are not torch's int8 arithmetic to the bit: onnxruntime quantizes each row's activations on
    its own (a row's batch mates and padding no longer set its scale, as fbgemm's one scale per
    call does; float rounding in the batched kernels can still move a value across a rounding
    step now and then) and to 7 bits around a fixed zero point. `_probe` holds it to torch's: on a
    probe its logits and new keys and values may be at most INT8_BOUND times as far from the
    float matmul by the dequantized weights (the same int8 weights, activations not rounded) as
    torch's int8 pass is."""

    def __init__(self, dec, threads: int | None = None):
        self.dec = dec
        self.L, self.KV, self.D = len(dec.layers), dec.n_kv, dec.head_dim
        self.positions = dec.context
        self.graph = _Unfolded(dec).eval()
        self.exact = not self.graph.int8
        self.values = []  # the OrtValues over the model's own tensors: alive as long as the sessions
        B, C, n = 2, 4, 3
        past = [torch.zeros(B, self.KV, C, self.D) for _ in range(2 * self.L)]
        self.past_names = [f"past.{i}.{kv}" for i in range(self.L) for kv in "kv"]
        self.ops = {}  # per graph, what it is made of (tests read it)
        self.graph_bytes = {}  # per graph, the size of its ONNX (the shared weights are not in it)
        self.sess = self._session("step", (torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), torch.zeros(B, 1, 1, C + 1), *past),
                                  ["ids", "pos", "mask", *self.past_names],
                                  {"ids": {0: "B"}, "pos": {0: "B"}, "mask": {0: "Bm", 3: "C1"}, "logits": {0: "B"},
                                   **{x: {0: "B", 2: "C"} for x in self.past_names}, "new": {2: "B"}}, threads, spin=True, prepack=True)
        # Float weights are packed into onnxruntime's faster layout for the step graph only: at 85M the
        # prompt graph's session took 384 MB unpacked, 605 packed, and a 64-token prompt ran about as
        # fast either way (129-156 ms packed, 153-174 unpacked, 3 rounds)
        self.prefill_sess = self._session(
            "prefill", (torch.zeros(B, n, dtype=torch.long), torch.zeros(B, n, dtype=torch.long), torch.zeros(B, 1, n, n)), ["ids", "pos", "mask"],
            {"ids": {0: "B", 1: "n"}, "pos": {0: "B", 1: "n"}, "mask": {0: "Bm", 2: "n", 3: "n"}, "logits": {0: "B"}, "new": {2: "B", 4: "n"}},
            threads, spin=os.environ.get("LLMCTL_ORT_PREFILL_SPIN", "0") == "1", prepack=self.graph.int8)  # spin: see OrtStep
        self._probe()
        self.graph = None  # the float reference is for the probe only

    def _session(self, mode: str, example, names, axes, threads, spin: bool, prepack: bool):
        import onnx
        import onnxruntime as ort
        from onnx import helper, numpy_helper

        g = self.graph
        g.mode = mode
        big = g.big()
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # the large tensors traced as inputs (see _Unfolded.forward), made initializers below
            torch.onnx.export(g, (*example, *(g.w(b) for b in big)), buf, input_names=names + big,
                              output_names=["logits", "new"], dynamic_axes=axes, opset_version=17, dynamo=False)
        proto = onnx.load_from_string(buf.getvalue())
        del buf
        inputs = [i for i in proto.graph.input if i.name not in big]
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
        # Shared with the sessions, not copied into the graph's bytes (see _session): the model's own
        # float tensors, and the int8 weights (the sessions' packed copies are made from them)
        shared = {}
        for b in big:
            if b not in g.external and not (b.endswith("_q") and b[:-2] in g.names):  # scales, rotary tables: copied in
                proto.graph.initializer.append(numpy_helper.from_array(g.w(b).numpy(), b))
                continue
            a = np.ascontiguousarray(g.w(b).numpy())  # the tensor itself when contiguous (as weights are)
            t = proto.graph.initializer.add()
            t.name, t.data_type, t.data_location = b, helper.np_dtype_to_tensor_dtype(a.dtype), onnx.TensorProto.EXTERNAL
            t.dims.extend(a.shape)
            t.external_data.add(key="location", value=SHARED_FILE)
            shared[b] = ort.OrtValue.ortvalue_from_numpy(a)  # holds `a`, which holds the tensor
        _int8_matmuls(proto, g.names)
        self.ops[mode] = collections.Counter(n.op_type for n in proto.graph.node)
        # what reads the model's own tensors: Gemm and the embedding's Gather, never a copy-making op
        self.ops[mode + " on the model's tensors"] = collections.Counter(n.op_type for n in proto.graph.node if set(n.input) & set(g.external))
        self.values += shared.values()
        data = proto.SerializeToString()
        self.graph_bytes[mode] = len(data)
        return _session(data, threads, spin, shared=shared, prepack=prepack)

    def _probe(self) -> None:
        """A prompt, then two steps: logits and keys and values within INT8_BOUND of torch's int8
        distance from the float reference (see the class); raise otherwise."""
        g = torch.Generator().manual_seed(0)
        V = self.dec.embed.weight.shape[0]
        ids = torch.randint(0, V, (2, 7), generator=g)
        mask = torch.ones(2, 7, dtype=torch.long)
        pos = torch.arange(7).expand(2, 7)
        eager, ours = KVCache(self.L), KVCache(self.L)
        causal = torch.zeros(5, 5).masked_fill_(~torch.ones(5, 5, dtype=torch.bool).tril_(), float("-inf")).view(1, 1, 5, 5)
        self.graph.mode = "prefill"
        with torch.no_grad():
            ref = self.graph(ids[:, :5], pos[:, :5], causal)
        got = self.prefill_sess.run(None, {"ids": _np(ids[:, :5]), "pos": _np(pos[:, :5]), "mask": _np(causal)})
        e_logits = self.dec.forward(ids[:, :5], pos[:, :5], eager, runtime="torch")
        ours.append_all(got[1])
        err_ort = max(float((torch.from_numpy(a) - b).abs().max()) for a, b in zip(got, ref))
        err_torch = max(float((e_logits - ref[0]).abs().max()), float((eager.buf[..., :5, :] - ref[1]).abs().max()))
        self.graph.mode = "step"
        for t in (5, 6):
            feed = _step_feed(self.past_names, ids[:, t : t + 1], pos[:, t].numpy(), ours, mask[:, : t + 1])
            with torch.no_grad():
                ref = self.graph(*(torch.from_numpy(feed[k]) for k in ("ids", "pos", "mask", *self.past_names)))
            got = self.sess.run(None, feed)
            e_logits = self.dec.forward(ids[:, t : t + 1], pos[:, t : t + 1], eager, mask=mask[:, : t + 1], runtime="torch")
            err_ort = max(err_ort, *(float((torch.from_numpy(a) - b).abs().max()) for a, b in zip(got, ref)))
            err_torch = max(err_torch, float((e_logits - ref[0]).abs().max()), float((eager.buf[..., t : t + 1, :] - ref[1]).abs().max()))
            ours.append_all(got[1])
        scale = max(1.0, float(ref[0].abs().max()))
        self.probe_errors = {"onnxruntime": err_ort, "torch": err_torch}
        if self.exact:  # float weights: both are the same arithmetic, to float rounding
            if not max(err_ort, err_torch) <= TOLERANCE * scale:
                raise RuntimeError(f"onnxruntime's logits differ from the eager pass by {max(err_ort, err_torch):.2e}")
        elif not err_ort <= INT8_BOUND * err_torch + 1e-4 * scale:
            raise RuntimeError(f"onnxruntime's int8 step is {err_ort:.2e} from the float weights' logits, torch's int8 pass {err_torch:.2e}")
