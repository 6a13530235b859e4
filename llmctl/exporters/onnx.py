"""ONNX (logits from input_ids + attention_mask, dynamic batch and length) for onnxruntime.

The TorchScript exporter (dynamo=False) gives one self-contained file in under a second; no
KV-cache variant: a cache-less graph is what onnxruntime's generic runners and our verifier
need, and a cached decoder needs past-key-value plumbing per architecture.
"""

from __future__ import annotations

import warnings
from pathlib import Path

TOLERANCE = 1e-3


def write(model, tok, out: Path, cfg) -> dict:
    import torch

    try:
        import onnx  # noqa: F401
    except ImportError:
        from llmctl.errors import ConfigError

        raise ConfigError("export.formats has onnx but onnx is not installed: pip install 'llmctl[onnx]'") from None

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.long)
    mask = torch.ones_like(ids)
    axes = {"batch": 0, "seq": 1}
    dyn = {k: {v: n for n, v in axes.items()} for k in ("input_ids", "attention_mask", "logits")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LogitsOnly(model.eval()), (ids, mask), str(out / "model.onnx"),
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes=dyn, opset_version=cfg.export.onnx_opset, dynamo=False,
        )
    tok.save_pretrained(out)
    return {"opset": cfg.export.onnx_opset, "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"], "kv_cache": False}


def verify(out: Path, ref, ids, mask, cfg) -> tuple[float, float]:
    import onnxruntime as ort

    from llmctl.exporters.common import max_diff

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return max_diff(logits, ref, mask), TOLERANCE
