"""A lean forward pass for decoding Llama-family models (llama, mistral, qwen2, qwen3).

Decoding one token of a small model is dominated by Python, not arithmetic: transformers'
forward builds masks, dispatches through attention interfaces and cache classes and checks
kwargs at every layer, and `generate` adds logits processors and stopping criteria on top.
This module runs the same modules' weights in a straight line: the model's own Linear and
RMSNorm parameters (int8 Linears through their packed weights, q/k/v and gate/up stacked into
one call each; int4 and other quantized Linears as modules), one rotary table computed
once by the model's own rotary embedding, and torch's scaled-dot-product attention over a
plain per-layer KV cache. Its logits equal transformers' to float rounding (tests/test_lean.py
compares them, and greedy decoding token for token).

On the CPU with onnxruntime installed, prompts and decode steps run as onnxruntime graphs
(`llmctl/inference/lean_ort.py`): the folded pass of a small float model, or the unfolded pass
of an int8 model (onnxruntime's int8 matmuls) or of a float32 one past the fold limit.

Models it does not cover (other architectures, dynamic/longrope rotary scaling, a sliding
window the sequence would cross) are told apart by `unsupported()` and decoded by
transformers as before. `LLMCTL_LEAN=0` turns it off.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from llmctl.inference.kvcache import KVCache

ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(model) -> str | None:
    """Why the lean path cannot decode this model, or None when it can."""
    if os.environ.get("LLMCTL_LEAN", "1") == "0":
        return "turned off by LLMCTL_LEAN=0"
    c = model.config
    if c.model_type not in ARCHS:
        return f"model_type {c.model_type!r} (lean decoding covers {', '.join(ARCHS)})"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"hidden_act {c.hidden_act!r}"
    inner = getattr(model, "model", None)
    rot = getattr(inner, "rotary_emb", None)
    if rot is None or not isinstance(getattr(rot, "rope_type", None), str):
        return "no single rotary embedding"
    if "dynamic" in rot.rope_type or rot.rope_type == "longrope":
        return f"rotary scaling {rot.rope_type!r} depends on the sequence length"
    if getattr(c, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    for layer in getattr(inner, "layers", []):
        a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if a is None or m is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "unexpected attention layout"
        if not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "unexpected MLP layout"
    return None


def sliding_window(model) -> int | None:
    """The smallest attention window any layer uses (None: full attention everywhere)."""
    c = model.config
    w = getattr(c, "sliding_window", None)
    if not w:
        return None
    types = getattr(c, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    if c.model_type == "qwen2" and not getattr(c, "use_sliding_window", False):
        return None
    return int(w)


def _onednn_linear():
    """oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the kernel torch's own compiler
    emits for CPU linears), or None where this torch build lacks it. On float32 CPU weights it
    reads them at up to twice the rate of `F.linear` (MKL) at the few rows of a decode step,
    where MKL's gemv neither threads nor saturates memory bandwidth: bench/realsize.py measures
    it on the 85M model. `LLMCTL_ONEDNN=0` turns it off."""
    if os.environ.get("LLMCTL_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return None

    def linear(x, w, b=None):
        return op(x, w, b, "none", [], "")

    return linear


ONEDNN_LINEAR = _onednn_linear()


class LeanDecoder:
    """`forward(ids, positions, mask, cache)`: logits of the last position (or every position)."""

    def __init__(self, model, runtime: str | None = None):
        why = unsupported(model)
        if why:
            raise ValueError(f"lean decoding does not cover this model: {why}")
        self.model = model.eval()
        self.key = weights_key(model)  # the weights these copies were made from
        inner = model.model
        c = model.config
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.head = model.lm_head
        self.layers = list(inner.layers)
        a0 = self.layers[0].self_attn
        self.head_dim = getattr(a0, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.n_heads = c.num_attention_heads
        self.n_kv = getattr(c, "num_key_value_heads", None) or self.n_heads
        self.scale = float(getattr(a0, "scaling", self.head_dim**-0.5))
        self.qk_norm = hasattr(a0, "q_norm") and hasattr(a0, "k_norm")
        self.window = sliding_window(model)
        self.context = getattr(c, "max_position_embeddings", None) or 4096
        self._cos = self._sin = None
        self.fast_skipped: str | None = None  # why the weights are not folded (see _fast_plan)
        self.n_params = sum(p.numel() for p in model.parameters())
        # The matmul of the unfolded pass: oneDNN's on float32 CPU weights (see _onednn_linear)
        w = self.embed.weight
        self.linear = ONEDNN_LINEAR if (ONEDNN_LINEAR is not None and w.device.type == "cpu" and w.dtype == torch.float32) else F.linear
        self.plan = [self._layer_plan(layer) for layer in self.layers]
        self.head_w = self._fused(self.head)
        self.final_norm = self._norm_plan(self.norm)
        self.fast = self._fast_plan()
        if self.fast is not None:
            self.plan = None  # only the folded weights are read from here on: free the fused copies
        # Compiled to onnxruntime graphs (llmctl/inference/lean_ort.py) where it can be: the folded pass,
        # or the unfolded one (int8 weights, or float32 past the fold limit).
        self.ort, self.ort_skipped = None, None
        unfolded = None if self.fast is not None else self._unfolded_graphs()  # why not, or None
        if runtime != "torch" and unfolded:
            self.ort_skipped = f"the weights are not folded ({self.fast_skipped}) and {unfolded}"
        if runtime != "torch" and not (self.fast is None and unfolded):
            from llmctl.inference import lean_ort

            self.ort_skipped = lean_ort.available() if self.embed.weight.device.type == "cpu" else "not on the CPU"
            if self.ort_skipped is None:
                try:
                    self.ort = lean_ort.OrtStep(self) if self.fast is not None else lean_ort.OrtUnfolded(self)
                except Exception as e:  # the eager pass computes the same logits
                    self.ort_skipped = f"{type(e).__name__}: {e}"

    @staticmethod
    def _norm_plan(norm):
        """(weight, eps) for a plain RMSNorm (x * rsqrt(mean(x^2) + eps) * weight) that torch's
        fused rms_norm computes in one call on float32; None: call the module."""
        w, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if type(norm).__name__.endswith("RMSNorm") and "Gemma" not in type(norm).__name__ and isinstance(w, torch.Tensor) \
                and w.dtype == torch.float32 and isinstance(eps, float):
            return w, eps
        return None

    # Fused q/k/v and gate/up weights are copies: up to this many parameters the extra memory is
    # small and the saved dispatches are what decode time is made of; a bigger model calls its
    # Linears one by one (its matmuls, not dispatch, dominate there). The model is never altered.
    FUSE_MAX_PARAMS = 50_000_000

    def _fused(self, *mods):
        """(weight, bias, output sizes) for one F.linear over several plain Linears with the same
        input, or (Int8Linears, None, output sizes) over several per-channel int8 ones; None: call
        the modules (one quantized Linear, another kind, or a model too big to copy weights)."""
        if Int8Linears.covers(mods):
            return Int8Linears(mods), None, [m.out_features for m in mods]
        plain = (torch.nn.Parameter, torch.Tensor)
        if not all(type(m) is torch.nn.Linear and type(m.weight) in plain and type(m.weight.data) is torch.Tensor for m in mods):
            return None
        ws = [m.weight for m in mods]
        if len({(w.dtype, w.device) for w in ws}) != 1 or len({m.bias is None for m in mods}) != 1:
            return None
        if len(mods) == 1:
            return ws[0], mods[0].bias, [ws[0].shape[0]]
        if self.n_params > self.FUSE_MAX_PARAMS:
            return None
        with torch.no_grad():
            w = torch.cat([x.detach() for x in ws])
            b = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
        return w, b, [x.shape[0] for x in ws]

    def _layer_plan(self, layer):
        a, m = layer.self_attn, layer.mlp
        plan = {"ln1": self._norm_plan(layer.input_layernorm), "ln2": self._norm_plan(layer.post_attention_layernorm),
                "qkv": self._fused(a.q_proj, a.k_proj, a.v_proj), "o": self._fused(a.o_proj),
                "gu": self._fused(m.gate_proj, m.up_proj), "down": self._fused(m.down_proj)}
        # A model too big to copy fused weights: its plain Linears one by one (still one kernel each)
        plan.update({n: None if plan["qkv"] else self._fused(getattr(a, f"{n}_proj")) for n in "qkv"})
        plan.update({n: None if plan["gu"] else self._fused(getattr(m, f"{n}_proj")) for n in ("gate", "up")})
        return plan

    def _unfoldable(self) -> str | None:
        """Why `_fast_plan` cannot fold this model's weights, or None when it can."""
        if self.qk_norm:
            return "q/k norms sit between the projections and rotary"
        if self.n_params > self.FUSE_MAX_PARAMS:
            return f"{self.n_params / 1e6:.0f}M parameters, above the {self.FUSE_MAX_PARAMS / 1e6:.0f}M up to which weights are copied"
        if self.final_norm is None or not all(p["ln1"] and p["ln2"] for p in self.plan):
            return "a norm is not a plain float32 RMSNorm"
        if any(p[n] and isinstance(p[n][0], Int8Linears) for p in self.plan for n in ("qkv", "o", "gu", "down")):
            return "its Linears are int8 (folded weights are float)"
        if not all(p[n] and isinstance(p[n][0], torch.Tensor) for p in self.plan for n in ("qkv", "o", "gu", "down")):
            return "a projection is not a plain Linear (quantized?)"
        head = self._fused(self.head)
        if head is None or not isinstance(head[0], torch.Tensor) or head[1] is not None:
            return "lm_head is not a plain Linear without bias"
        return None

    def _fast_plan(self):
        """Weights for the one-token decode step of a small model, folded so that a layer is a
        few calls: each RMSNorm's weight into the matmul that follows it, the attention scale
        into the query rows, and rotary's rotate-half into extra rows (rot(x W) = x rot(W)), so
        one matmul gives q, k, v, rot(q) and rot(k); residual adds ride in addmm. None when a
        layer is not plain (quantized, q/k norms, an unusual norm) or the model is too big to
        copy its weights (see FUSE_MAX_PARAMS)."""
        self.fast_skipped = self._unfoldable()
        if self.fast_skipped:
            return None
        head = self._fused(self.head)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim

        def rot(w, heads):  # rotate-half applied to the output rows of each head
            w = w.view(heads, 2, D // 2, *w.shape[1:])
            return torch.cat((-w[:, 1], w[:, 0]), dim=1).reshape(heads * D, *w.shape[3:])

        layers = []
        with torch.no_grad():
            for p in self.plan:
                w, b, _ = p["qkv"]
                wq, wk, wv = w.detach().split([H * D, KV * D, KV * D])
                w = torch.cat([wq * self.scale, wk, wv, rot(wq, H) * self.scale, rot(wk, KV)]) * p["ln1"][0].detach()
                if b is not None:
                    bq, bk, bv = b.detach().split([H * D, KV * D, KV * D])
                    b = torch.cat([bq * self.scale, bk, bv, rot(bq, H) * self.scale, rot(bk, KV)])
                gu = p["gu"][0].detach() * p["ln2"][0].detach()
                # Biases detached too: a Parameter that requires grad cannot become a constant of
                # the onnxruntime graph (tracing raised, and the model lost the compiled step).
                b_o, b_gu, b_down = (None if x is None else x.detach() for x in (p["o"][1], p["gu"][1], p["down"][1]))
                layers.append((w.t().contiguous(), b, p["ln1"][1], p["o"][0].detach().t().contiguous(), b_o,
                               gu.t().contiguous(), b_gu, p["ln2"][1], p["down"][0].detach().t().contiguous(), b_down))
            w_head = (head[0].detach() * self.final_norm[0].detach()).t().contiguous()
        return layers, w_head

    def _forward_folded(self, ids, cos, sin, cache: KVCache, attn_mask, causal: bool, all_logits: bool):
        """The forward pass with the folded weights of `_fast_plan`, on 2-D activations
        [B * n, d]: about a dozen calls per layer instead of thirty."""
        layers, w_head = self.fast
        B, n = ids.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = self.embed(ids.reshape(B * n))
        d = h.shape[-1]

        def norm(x, eps):  # x / rms(x); the weight is folded into the next matmul
            r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return x * torch.addcmul(torch.full_like(r, eps), r, r, value=1.0 / d).rsqrt_()

        for i, (w_qkv, b_qkv, eps1, w_o, b_o, w_gu, b_gu, eps2, w_down, b_down) in enumerate(layers):
            x = norm(h, eps1)
            y = torch.addmm(b_qkv, x, w_qkv) if b_qkv is not None else torch.mm(x, w_qkv)
            # [B, heads, n, D]: a view when n == 1
            y = y.view(B, 2 * H + 3 * KV, 1, D) if n == 1 else y.view(B, n, 2 * H + 3 * KV, D).transpose(1, 2)
            qk = torch.addcmul(y[:, : H + KV] * cos, y[:, H + 2 * KV :], sin)
            k, v = cache.append(i, qk[:, H:], y[:, H + KV : H + 2 * KV])
            o = F.scaled_dot_product_attention(qk[:, :H], k, v, attn_mask=attn_mask, is_causal=causal, scale=1.0,
                                               enable_gqa=KV != H)
            o = o.view(B, H * D) if n == 1 else o.transpose(1, 2).reshape(B * n, H * D)
            h = torch.addmm(h if b_o is None else h + b_o, o, w_o)
            x = norm(h, eps2)
            g, u = (torch.addmm(b_gu, x, w_gu) if b_gu is not None else torch.mm(x, w_gu)).chunk(2, dim=-1)
            h = torch.addmm(h if b_down is None else h + b_down, F.silu(g).mul_(u), w_down)
        if not all_logits:
            h = h.view(B, n, d)[:, -1]
        logits = torch.mm(norm(h, self.final_norm[1]), w_head).float()
        return logits.view(B, n, -1) if all_logits else logits

    # The unfolded graphs of a float32 model hold a packed copy of its weights (the step graph's,
    # for speed; see lean_ort.OrtUnfolded); past this size they are not built.
    UNFOLDED_F32_MAX_PARAMS = 200_000_000

    def _unfolded_graphs(self) -> str | None:
        """Why the unfolded pass cannot be built as onnxruntime graphs (`lean_ort.OrtUnfolded`),
        or None when it can: every projection and the output layer per-channel int8 Linears, or
        plain float32 ones in a model of at most UNFOLDED_F32_MAX_PARAMS; plain RMSNorms."""
        if self.plan is None or self.final_norm is None or not all(p["ln1"] and p["ln2"] for p in self.plan):
            return "a norm is not a plain float32 RMSNorm"
        if self._int8():
            return None

        def plain(e):
            return e is not None and isinstance(e[0], torch.Tensor) and e[0].dtype == torch.float32

        def projections(p):  # stacked (qkv, gu) where the model is small enough to copy, else one by one
            return (["qkv"] if p["qkv"] else ["q", "k", "v"]) + (["gu"] if p["gu"] else ["gate", "up"]) + ["o", "down"]

        if not (plain(self.head_w) and all(plain(p[k]) for p in self.plan for k in projections(p))):
            return "its projections are neither all int8 nor all plain float32 Linears"
        if self.n_params > self.UNFOLDED_F32_MAX_PARAMS:
            return (f"{self.n_params / 1e6:.0f}M float32 parameters, above the {self.UNFOLDED_F32_MAX_PARAMS / 1e6:.0f}M "
                    "up to which onnxruntime's step graph keeps a packed copy of the weights")
        return None

    def _int8(self) -> bool:
        """True when every projection and the output layer are torch's per-channel int8 Linears
        (`--quantize int8`), the weights `lean_ort.OrtUnfolded` takes."""
        return self.plan is not None and self.head_w is not None and isinstance(self.head_w[0], Int8Linears) and all(
            p[n] and isinstance(p[n][0], Int8Linears) and p[n][0].per_channel for p in self.plan for n in ("qkv", "o", "gu", "down"))

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers))

    def _rope(self, positions, signed: bool = False):
        """cos, sin for these positions [B, n] -> [B, 1, n, head_dim], from a table computed once
        by the model's own rotary embedding (so every static scaling type is honoured). `signed`:
        the sine with its first half negated, as `_rotate` takes it."""
        need = int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < need:
            n = max(need, self.context)
            p = torch.arange(n, device=positions.device)[None]
            probe = torch.zeros(1, dtype=self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32,
                                device=positions.device)
            cos, sin = self.model.model.rotary_emb(probe, p)
            self._cos, self._sin = cos[0], sin[0]
            half = sin.shape[-1] // 2
            self._sin_signed = torch.cat((-self._sin[:, :half], self._sin[:, half:]), dim=-1)
        return self._cos[positions][:, None], (self._sin_signed if signed else self._sin)[positions][:, None]

    @staticmethod
    def _rotate(x, cos, sin_signed):
        """x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1): the halves swapped by
        a roll and the minus sign carried by `sin_signed` (four calls, not six). The same products
        and sum as transformers' apply_rotary_pos_emb, to the bit ((-a) * b == a * (-b)); not an
        addcmul, whose fused multiply-add rounds once where they round twice."""
        return (x * cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(sin_signed))

    @torch.inference_mode()
    def forward(self, ids, positions, cache: KVCache, mask=None, all_logits: bool = False, runtime: str | None = None, ort=None):
        """ids, positions: [B, n]; mask: [B, cache.length + n] with 1 for real tokens, or None
        when every row is real (no padding); cache: from `new_cache()`. Returns float logits
        [B, V] for the last position, or [B, n, V] with `all_logits`. Decode steps and prompts
        run on the onnxruntime graphs when built (`runtime="torch"`: the eager pass; `ort`: a
        given OrtStep, for its own check)."""
        B, n = ids.shape
        t0 = cache.length
        if self.window is not None and t0 + n > self.window:
            raise ValueError(f"sequence of {t0 + n} tokens crosses the model's {self.window}-token sliding window")
        ort = ort if ort is not None else (self.ort if runtime != "torch" else None)
        if ort is not None and n == 1 and t0 > 0:  # a decode step, compiled
            pos = positions.numpy()
            if pos.max() < ort.positions:
                return ort.run(ids, pos, cache, mask)
        attn_mask, causal = None, False
        if mask is not None and not bool(mask.all()):
            keep = mask.bool()[:, None, None, :]  # [B, 1, 1, T]
            if n > 1:
                q = torch.arange(t0, t0 + n, device=ids.device)[:, None]
                k = torch.arange(t0 + n, device=ids.device)[None]
                # every query sees itself: padding rows attend to something (no NaN in the cache)
                keep = (keep & (k <= q)) | (k == q)
            # additive, made once for every layer (a boolean mask is converted in each attention call)
            dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32
            attn_mask = torch.zeros(keep.shape, dtype=dtype, device=ids.device).masked_fill_(~keep, float("-inf"))
        elif n > 1:
            if t0 == 0:
                causal = True
            else:
                q = torch.arange(t0, t0 + n, device=ids.device)[:, None]
                attn_mask = torch.arange(t0 + n, device=ids.device)[None] <= q
        if ort is not None and t0 == 0 and n > 1 and not all_logits:  # a prompt: compiled too
            if attn_mask is None or attn_mask.dtype == torch.bool:
                keep = torch.ones(n, n, dtype=torch.bool).tril_() if attn_mask is None else attn_mask
                attn_mask = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
            pos = positions.numpy()
            if pos.max() < ort.positions:
                return ort.prefill(ids, np.ascontiguousarray(pos), cache, attn_mask.view(-1, 1, n, n))
        cos, sin = self._rope(positions, signed=self.fast is None)  # the eager pass's rotary (the graphs hold their own)
        if self.fast is not None:
            return self._forward_folded(ids, cos, sin, cache, attn_mask, causal, all_logits)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = self.embed(ids)
        d = h.shape[-1]
        lin = self.linear

        def fused(x, entry):  # see _fused: plain weights through `lin`, or fused int8 Linears
            w, b, _ = entry
            return lin(x, w, b) if isinstance(w, torch.Tensor) else w(x)

        def proj(x, name, module):  # see _fused; None: the module
            return fused(x, p[name]) if p[name] else module(x)

        for i, (layer, p) in enumerate(zip(self.layers, self.plan)):
            a, m = layer.self_attn, layer.mlp
            # F.rms_norm: on the CPU the same arithmetic as transformers' RMSNorm, to the bit. An int8
            # model needs that: a rounding apart before a quantized Linear can move its input's int8
            # values (a 5-call form with vector_norm put the 85M model's probe 0.1 apart)
            x = F.rms_norm(h, (d,), *p["ln1"]) if p["ln1"] else layer.input_layernorm(h)
            if p["qkv"] and not self.qk_norm:
                # q and k heads rotated together: one set of rotary ops per layer, not two
                qkv = fused(x, p["qkv"]).view(B, n, H + 2 * KV, D).transpose(1, 2)
                qk = self._rotate(qkv[:, : H + KV], cos, sin)
                q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KV :]
            else:
                if p["qkv"]:
                    q, k, v = fused(x, p["qkv"]).split(p["qkv"][2], dim=-1)
                else:
                    q, k, v = proj(x, "q", a.q_proj), proj(x, "k", a.k_proj), proj(x, "v", a.v_proj)
                q, k, v = q.view(B, n, H, D), k.view(B, n, KV, D), v.view(B, n, KV, D).transpose(1, 2)
                if self.qk_norm:
                    q, k = a.q_norm(q), a.k_norm(k)
                q = self._rotate(q.transpose(1, 2), cos, sin)
                k = self._rotate(k.transpose(1, 2), cos, sin)
            k, v = cache.append(i, k, v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scale,
                                               enable_gqa=KV != H)
            o = o.transpose(1, 2).reshape(B, n, H * D)
            h = proj(o, "o", a.o_proj).add_(h)  # the projection's fresh output takes the residual
            x = F.rms_norm(h, (d,), *p["ln2"]) if p["ln2"] else layer.post_attention_layernorm(h)
            if p["gu"]:
                g, u = fused(x, p["gu"]).split(p["gu"][2], dim=-1)
            else:
                g, u = proj(x, "gate", m.gate_proj), proj(x, "up", m.up_proj)
            h = proj(F.silu(g).mul_(u), "down", m.down_proj).add_(h)
        if not all_logits:
            h = h[:, -1:]
        h = F.rms_norm(h, (d,), *self.final_norm) if self.final_norm else self.norm(h)
        logits = (fused(h, self.head_w) if self.head_w else self.head(h)).float()
        return logits if all_logits else logits[:, -1]


class Int8Linears:
    """Several of torch's dynamically quantized Linears that share an input (q/k/v, gate/up), as
    one fbgemm call over their rows stacked. With a scale per output channel the stacked weight
    holds exactly the separate ones' int8 values and scales, and the input's int8 scale is taken
    over the same input either way, so the outputs are the separate calls' outputs, bit for bit.
    One call instead of three at a decode step's few rows: fbgemm's per-call work (quantizing the
    input, the output's requantization) is most of a small projection's time. The stacked weights
    are an int8 copy (a quarter of the float32 weights they came from); the model is not altered.
    One Linear alone (o, down, the output layer) is called on its own packed weights, without the
    module's Python layers around the kernel."""

    def __init__(self, mods):
        # what the modules' own forward passes (torch.ao.nn.quantized.dynamic.Linear.forward)
        self.reduce_range = mods[0].version is not None and mods[0].version >= 4
        w = mods[0]._packed_params._weight_bias()[0]
        self.per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) and w.q_per_channel_axis() == 0
        if len(mods) == 1:  # its own packed weights, called without the module's Python layers
            self.packed = mods[0]._packed_params._packed_params
            return
        pairs = [m._packed_params._weight_bias() for m in mods]
        ws = [w for w, _ in pairs]
        q = torch._make_per_channel_quantized_tensor(
            torch.cat([w.int_repr() for w in ws]), torch.cat([w.q_per_channel_scales() for w in ws]),
            torch.cat([w.q_per_channel_zero_points() for w in ws]), 0)
        bias = None if pairs[0][1] is None else torch.cat([b.detach() for _, b in pairs])
        self.packed = torch.ops.quantized.linear_prepack(q, bias)

    @staticmethod
    def covers(mods) -> bool:
        """True for one torch.ao dynamic int8 Linear, or several, each with a scale per output row
        (axis 0), of one input size and module version, all with a bias or none."""
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        if not all(type(m) is DynamicLinear and m._packed_params.dtype == torch.qint8 for m in mods):
            return False
        if len(mods) == 1:
            return True
        if len({(m.in_features, m.version) for m in mods}) != 1:
            return False
        pairs = [m._packed_params._weight_bias() for m in mods]
        if len({b is None for _, b in pairs}) != 1:
            return False
        return all(w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) and w.q_per_channel_axis() == 0
                   for w, _ in pairs)

    def __call__(self, x):
        return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=self.reduce_range).to(x.dtype)


def weights_key(model) -> tuple:
    """What the decoder's folded and fused copies were made from: each parameter's and buffer's
    storage and version counter. An in-place change (`with torch.no_grad(): w.mul_(2)`,
    `load_state_dict`, an optimizer step) bumps the version and a replaced tensor has a new
    storage, so either makes the key differ. (Writes through `w.data` bypass the version
    counter and go unseen.)"""
    return tuple((t.data_ptr(), t._version) for ts in (model.parameters(), model.buffers()) for t in ts)


def decoder_for(model) -> LeanDecoder | None:
    """A LeanDecoder when it covers this model, else None (decode with transformers). The
    decoder is kept on the model and rebuilt when its weights change (see `weights_key`)."""
    why = unsupported(model)
    if why:
        tell_skipped(model, "lean decoding", why, "decoding with transformers")
        return None
    dec = getattr(model, "_llmctl_lean", None)
    if dec is None or dec.key != weights_key(model):
        dec = LeanDecoder(model)
        dec.disagrees = disagreement(dec, model)
        model._llmctl_lean = dec
    if dec.disagrees:
        tell_skipped(model, "lean decoding", dec.disagrees, "decoding with transformers")
        return None
    if dec.ort_skipped:
        tell_skipped(model, "the onnxruntime decode step", dec.ort_skipped, "decoding with the eager lean pass")
    return dec


PROBE_TOLERANCE = 1e-4  # relative to the largest logit: float32 rounding of the folded weights


def disagreement(dec: "LeanDecoder", model) -> str | None:
    """Why the decoder, as it will run (onnxruntime graphs where built), does not compute what
    the model's own forward computes on a probe (a padded prompt, then a decode step); None
    when it does. A second implementation of the model's math is trusted only this way."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, dec.embed.weight.shape[0], (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    if getattr(model, "llmctl_quantization", None) is None:
        mask[1, :2] = 0  # left padding, as batched prompts have
    # (not for a quantized model: its activations' int8 scale spans every row of a call, padding
    # rows too, whose values no two implementations share, so a padded batch is not one answer)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dev = dec.embed.weight.device
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    with torch.no_grad():
        # The model's own forward as `generate` calls it: the prompt, then one step on its cache. (One
        # call over all six tokens is not the same computation for a dynamically quantized model:
        # its activations' int8 scale is taken per call, over whatever rows the call holds.)
        # logits_to_keep=1, as generate asks: the output layer on the last position only (what a
        # quantized output layer's activation scale is taken over)
        first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], use_cache=True, logits_to_keep=1)
        step = model(ids[:, 5:], attention_mask=mask, position_ids=pos[:, 5:], use_cache=True, logits_to_keep=1,
                     **{"cache" if "cache" in first else "past_key_values": first["cache" if "cache" in first else "past_key_values"]})
        ref = [first.logits[:, -1].float(), step.logits[:, -1].float()]
        cache = dec.new_cache()
        # An onnxruntime step that is not exact (int8: its own rounding of the activations) was held to
        # the eager pass when it was built (OrtUnfolded._probe); the eager pass is held to the model here
        rt = None if getattr(dec.ort, "exact", True) else "torch"
        got = [dec.forward(ids[:, :5], pos[:, :5], cache, mask=mask[:, :5], runtime=rt),
               dec.forward(ids[:, 5:], pos[:, 5:], cache, mask=mask, runtime=rt)]
    diff = max(float((g.float() - r).abs().max()) for g, r in zip(got, ref))
    ref = torch.stack(ref)
    if not diff <= PROBE_TOLERANCE * max(1.0, float(ref.abs().max())):
        return f"its logits differ from the model's own forward by {diff:.2e} on a probe"
    return None


def tell_skipped(model, path: str, why: str, instead: str) -> None:
    """One line on stderr saying why a faster decode path is not used for this model: once per
    model and reason, not per request."""
    said = model.__dict__.setdefault("_llmctl_skips", set())
    if (path, why) in said:
        return
    said.add((path, why))
    from llmctl import console

    console.current().info(f"{path} is off for this model: {why}; {instead}")

