"""Turn records into training rows: packed text blocks, or masked prompt/completion and chat.

Batched functions for `datasets.map`: they see a batch of documents and return rows, so
memory stays bounded by the batch, never the corpus.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

IGNORE = -100


def pack_text(texts: Iterable[str], tok, block_size: int, eos_id: int, stats: dict, batch_docs: int = 1000) -> Iterator[dict]:
    """Tokenize documents in batches, join them with EOS, yield full `block_size` blocks.

    The remainder carries over between batches, so only the corpus's last partial block is
    dropped (counted in stats['dropped_tokens']). Memory is bounded by one batch.
    """
    carry = np.empty(0, dtype=np.int32)
    batch: list[str] = []

    def flush(batch: list[str], carry: np.ndarray):
        enc = tok._tokenizer.encode_batch(batch, add_special_tokens=False)
        parts = [carry]
        for e in enc:
            parts.append(np.asarray(e.ids, dtype=np.int32))
            parts.append(np.array([eos_id], dtype=np.int32))
            stats["tokens"] += len(e.ids) + 1
        stream = np.concatenate(parts)
        n = len(stream) // block_size
        for row in stream[: n * block_size].reshape(n, block_size).tolist():
            yield {"input_ids": row, "labels": row}
        stats["kept_tokens"] += n * block_size
        return stream[n * block_size :]

    for text in texts:
        batch.append(text)
        stats["documents"] += 1
        stats["bytes"] += len(text.encode("utf-8"))
        if len(batch) >= batch_docs:
            carry = yield from flush(batch, carry)
            batch = []
    if batch:
        carry = yield from flush(batch, carry)
    stats["dropped_tokens"] += len(carry)


def encode_pairs(batch: dict, tok, block_size: int, eos_id: int) -> dict:
    """Prompt + completion + EOS; loss only on the completion. Prompts are cut from the left."""
    p_enc = tok._tokenizer.encode_batch(batch["prompt"], add_special_tokens=False)
    c_enc = tok._tokenizer.encode_batch(batch["completion"], add_special_tokens=False)
    ids_out, labels_out, truncated, dropped, n_tok, n_bytes = [], [], [], [], [], []
    for p, c, pt, ct in zip(p_enc, c_enc, batch["prompt"], batch["completion"]):
        comp = c.ids + [eos_id]
        prompt = p.ids
        trunc = 0
        if len(prompt) + len(comp) > block_size:
            keep = block_size - len(comp)
            if keep < 1:  # the completion alone does not fit: nothing sensible to learn
                dropped.append(1)
                ids_out.append([])
                labels_out.append([])
                truncated.append(0)
                n_tok.append(0)
                n_bytes.append(0)
                continue
            prompt = prompt[-keep:]
            trunc = 1
        ids_out.append(prompt + comp)
        labels_out.append([IGNORE] * len(prompt) + comp)
        truncated.append(trunc)
        dropped.append(0)
        n_tok.append(len(prompt) + len(comp))
        n_bytes.append(len((pt + ct).encode("utf-8")))
    return {"input_ids": ids_out, "labels": labels_out, "_truncated": truncated, "_dropped": dropped, "_tokens": n_tok, "_bytes": n_bytes}


def encode_chat(batch: dict, tok, block_size: int) -> dict:
    """Render with the chat template; loss only on assistant tokens (generation mask)."""
    ids_out, labels_out, truncated, dropped, n_tok, n_bytes = [], [], [], [], [], []
    for msgs in batch["messages"]:
        enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        mask = list(enc["assistant_masks"])
        trunc = 0
        if len(ids) > block_size:
            ids, mask, trunc = ids[:block_size], mask[:block_size], 1
        labels = [i if m else IGNORE for i, m in zip(ids, mask)]
        if not any(m for m in mask):
            dropped.append(1)
            ids_out.append([])
            labels_out.append([])
            truncated.append(0)
            n_tok.append(0)
            n_bytes.append(0)
            continue
        ids_out.append(ids)
        labels_out.append(labels)
        truncated.append(trunc)
        dropped.append(0)
        n_tok.append(len(ids))
        n_bytes.append(sum(len(str(m.get("content", "")).encode("utf-8")) for m in msgs))
    return {"input_ids": ids_out, "labels": labels_out, "_truncated": truncated, "_dropped": dropped, "_tokens": n_tok, "_bytes": n_bytes}
