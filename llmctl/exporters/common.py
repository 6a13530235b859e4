"""The fixed verification batch and logit comparison shared by every format."""

from __future__ import annotations

VERIFY_TEXTS = [
    "def main():\n    \"\"\"Run the program.\"\"\"",
    "The quick brown fox jumps over the lazy dog.",
    "import os",
]


def verify_batch(tok, max_len: int = 32):
    """Right-padded ids and mask for VERIFY_TEXTS (compare only real positions)."""
    import torch

    rows = [tok(t, add_special_tokens=False)["input_ids"][:max_len] or [tok.eos_token_id] for t in VERIFY_TEXTS]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id if tok.pad_token_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def reference_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def max_diff(a, b, mask) -> float:
    """Largest |a - b| over real (unpadded) positions."""
    import torch

    a = torch.as_tensor(a, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    sel = torch.as_tensor(mask).bool()
    return float((a - b).abs()[sel].max())
