"""The lean decoder's KV cache: one growing buffer for every layer, edited row-wise for
continuous batching. Its own module because both the eager lean pass (lean.py) and the
onnxruntime step (lean_ort.py) read and write it, and neither imports the other at the top."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer in one buffer [layers, 2, batch, kv_heads, capacity,
    head_dim] that grows by doubling, so a decode step writes one column in place instead of
    copying the whole cache (at batch 8, `torch.cat` of the cache was 40% of a step), and the
    onnxruntime step (llmctl/inference/lean_ort.py) reads each layer's keys and values as they lie and
    writes every layer's new column in one copy. Rows can be selected and caches stacked, for
    continuous batching."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.buf = None
        self.lens = [0] * n_layers  # filled columns per layer (a forward pass fills them in turn)

    @property
    def length(self) -> int:
        return self.lens[0]

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.shape[4]

    def _reserve(self, like, need: int) -> None:
        """Room for `need` columns, on a buffer shaped after `like` ([B, kv_heads, n, head_dim])."""
        if self.buf is not None and need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity, 64)
        B, KV, _, D = like.shape
        new = like.new_zeros(self.n_layers, 2, B, KV, cap, D)
        if self.buf is not None:
            t = max(self.lens)
            new[..., :t, :] = self.buf[..., :t, :]
        self.buf = new

    def append(self, i: int, k, v):
        """Write k, v ([B, kv_heads, n, head_dim]) after layer i's filled columns; returns the
        filled keys and values (views)."""
        t, n = self.lens[i], k.shape[2]
        self._reserve(k, t + n)
        self.buf[i, 0, :, :, t : t + n] = k
        self.buf[i, 1, :, :, t : t + n] = v
        self.lens[i] = t + n
        return self.buf[i, 0, :, :, : t + n], self.buf[i, 1, :, :, : t + n]

    def append_all(self, kv) -> None:
        """Write every layer's keys and values of n new tokens at once: kv [layers, 2, B, kv_heads,
        n, head_dim], a numpy array (onnxruntime's output; numpy copies it faster than torch)."""
        t, n = self.length, kv.shape[4]
        if self.buf is None or t + n > self.capacity:
            self._reserve(torch.from_numpy(kv[0, 0]), t + n)
        self.buf.numpy()[..., t : t + n, :] = kv
        self.lens = [t + n] * self.n_layers

    def select(self, idx) -> None:
        """Keep only these batch rows."""
        self.buf = self.buf[:, :, idx]

    def drop_leading(self, n: int) -> None:
        """Drop the first `n` time steps (columns no row uses any more)."""
        # copied, not viewed: a contiguous buffer is what onnxruntime reads in place
        self.buf = self.buf[..., n:, :].contiguous()
        self.lens = [t - n for t in self.lens]

    def stack(self, other: "KVCache") -> None:
        """Append `other`'s rows below this cache's, left-padding the shorter in time."""
        ta, tb = self.length, other.length
        t = max(ta, tb)
        a, b = self.buf, other.buf
        out = a.new_zeros(a.shape[0], 2, a.shape[2] + b.shape[2], a.shape[3], max(t, 64), a.shape[5])
        out[:, :, : a.shape[2], :, t - ta : t] = a[..., :ta, :]
        out[:, :, a.shape[2] :, :, t - tb : t] = b[..., :tb, :]
        self.buf = out
        self.lens = [t] * self.n_layers
