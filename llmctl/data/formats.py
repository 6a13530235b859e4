"""Turn records into training rows: packed text blocks, or masked prompt/completion and chat.

Batched functions for `datasets.map`: they see a batch of documents and return rows, so
memory stays bounded by the batch, never the corpus.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import numpy as np

IGNORE = -100


def pad_right(rows: list[dict], pad_id: int):
    """Rows of input_ids/labels of any lengths as (ids, labels, attention_mask) long tensors,
    right-padded with `pad_id` (labels with IGNORE, mask 0): the one batch builder of training
    and scoring."""
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.as_tensor(r["input_ids"])
        labels[i, :k] = torch.as_tensor(r["labels"])
        mask[i, :k] = 1
    return ids, labels, mask


def pack_text(texts: Iterable[str], tok, block_size: int, eos_id: int, stats: dict, batch_docs: int = 1000) -> Iterator[dict]:
    """`pack_blocks`, a block at a time as {input_ids, labels} lists."""
    for blocks in pack_blocks(texts, tok, block_size, eos_id, stats, batch_docs):
        for row in blocks.tolist():
            yield {"input_ids": row, "labels": row}


def pack_blocks(texts: Iterable[str], tok, block_size: int, eos_id: int, stats: dict, batch_docs: int = 1000) -> Iterator[np.ndarray]:
    """Tokenize documents in batches, join them with EOS, yield the full `block_size` blocks of
    each batch as one (n, block_size) int32 array. Each document starts with BOS when the
    tokenizer wants it (`tokenizer.wants_bos`).

    The remainder carries over between batches, so only the corpus's last partial block is
    dropped (counted in stats['dropped_tokens']). Memory is bounded by one batch.
    """
    from llmctl.tokenizer import wants_bos

    carry = np.empty(0, dtype=np.int32)
    batch: list[str] = []
    head = [tok.bos_token_id] if wants_bos(tok) else []

    def flush(batch: list[str], carry: np.ndarray):
        enc = tok._tokenizer.encode_batch(batch, add_special_tokens=False)
        parts = [carry]
        for e in enc:
            parts.append(np.asarray(head + e.ids, dtype=np.int32))
            parts.append(np.array([eos_id], dtype=np.int32))
            stats["tokens"] += len(head) + len(e.ids) + 1
        stream = np.concatenate(parts)
        n = len(stream) // block_size
        if n:
            yield stream[: n * block_size].reshape(n, block_size)
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


def blocks_table(blocks: np.ndarray):
    """(n, block_size) token ids as the Arrow table of packed text: input_ids int32, labels int64
    (the same ids), built from the array without a Python list per block."""
    import pyarrow as pa

    n, size = blocks.shape
    offsets = pa.array(np.arange(0, (n + 1) * size, size, dtype=np.int32))
    flat = blocks.reshape(-1)
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat)),
                     "labels": pa.ListArray.from_arrays(offsets, pa.array(flat.astype(np.int64)))})


def encode_pairs(batch: dict, tok, block_size: int, eos_id: int) -> dict:
    """[BOS] + prompt + completion + EOS; loss only on the completion. BOS as `wants_bos`
    says; prompts are cut from the left (after the BOS)."""
    from llmctl.tokenizer import wants_bos

    head = [tok.bos_token_id] if wants_bos(tok) else []
    p_enc = tok._tokenizer.encode_batch(batch["prompt"], add_special_tokens=False)
    c_enc = tok._tokenizer.encode_batch(batch["completion"], add_special_tokens=False)
    ids_out, labels_out, truncated, dropped, n_tok, n_bytes = [], [], [], [], [], []
    for p, c, pt, ct in zip(p_enc, c_enc, batch["prompt"], batch["completion"]):
        comp = c.ids + [eos_id]
        prompt = head + p.ids
        trunc = 0
        if len(prompt) + len(comp) > block_size:
            keep = block_size - len(comp) - len(head)
            if keep < 1:  # the completion alone does not fit: nothing sensible to learn
                dropped.append(1)
                ids_out.append([])
                labels_out.append([])
                truncated.append(0)
                n_tok.append(0)
                n_bytes.append(0)
                continue
            prompt = head + prompt[len(head) :][-keep:]
            trunc = 1
        ids_out.append(prompt + comp)
        labels_out.append([IGNORE] * len(prompt) + comp)
        truncated.append(trunc)
        dropped.append(0)
        n_tok.append(len(prompt) + len(comp))
        n_bytes.append(len((pt + ct).encode("utf-8")))
    return {"input_ids": ids_out, "labels": labels_out, "_truncated": truncated, "_dropped": dropped, "_tokens": n_tok, "_bytes": n_bytes}


# Why a chat row is dropped, as prepare reports it.
CHAT_DROP_REASONS = {
    "too_long": "the last assistant turn does not fit in data.block_size even with all earlier turns cut (raise data.block_size)",
    "no_assistant_span": "the chat template renders no assistant text for it (check tokenizer.chat_template)",
}
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _render(tok, msgs: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Most hub chat templates have no `{% generation %}` markers, so the span of assistant
    turn k is found by rendering the conversation prefix by prefix: what rendering
    `msgs[:k+1]` adds to `msgs[:k]` with the generation prompt is the turn as the model
    must produce it, end-of-turn token included. A turn whose prefix the template renders
    differently (some templates rewrite earlier turns) is left unlabelled.
    """
    full = _render(tok, msgs)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _render(tok, msgs[:k], add_generation_prompt=True) if k else ""
        upto = full if k == len(msgs) - 1 else _render(tok, msgs[: k + 1])
        if upto.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def _encode_conversation(tok, msgs: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids and, per token, whether it belongs to an assistant turn. BOS first as
    `wants_bos` says (templates that write it themselves get no second one)."""
    from llmctl.tokenizer import with_bos

    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    if _GENERATION_BLOCK.search(template or ""):
        enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
    else:
        text, spans = assistant_spans(tok, msgs)
        # Tokenized as apply_chat_template does (no special tokens added: the template's own stay).
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [any(start < e and end > s for s, e in spans) for start, end in enc["offset_mapping"]]
    full = with_bos(tok, ids)
    return full, [False] * (len(full) - len(ids)) + mask


def _fit_conversation(tok, msgs: list[dict], block_size: int) -> tuple[list[int], list[bool], int, str]:
    """(ids, mask, truncated, drop reason) with history cut from the left to fit block_size.

    Whole earlier turns go first (a system message stays, the kept part starts at a user
    turn); if even the last exchange is too long, tokens are cut from its left so the last
    assistant turn and its end-of-turn token survive.
    """
    system = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    rest = msgs[len(system):]
    starts = [i for i, m in enumerate(rest) if i == 0 or m["role"] == "user"]
    last_assistant = max(i for i, m in enumerate(rest) if m["role"] == "assistant")
    starts = [i for i in starts if i <= last_assistant]
    ids, mask = [], []
    for n, i in enumerate(starts):
        ids, mask = _encode_conversation(tok, system + rest[i:])
        if not any(mask):
            return [], [], 0, "no_assistant_span"
        if len(ids) <= block_size:
            return ids, mask, int(n > 0), ""
    # The last exchange alone is too long: keep its end, provided the last turn fits
    # with at least one token of context before it.
    start = max(i for i, m in enumerate(mask) if m)
    while start > 0 and mask[start - 1]:
        start -= 1
    lead = 1 if ids and ids[0] == tok.bos_token_id and not mask[0] else 0  # a BOS stays first
    if len(ids) - start + lead >= block_size:
        return [], [], 0, "too_long"
    return ids[:lead] + ids[len(ids) - block_size + lead :], mask[:lead] + mask[len(mask) - block_size + lead :], 1, ""


def encode_chat(batch: dict, tok, block_size: int) -> dict:
    """Render with the chat template; loss only on assistant turns (end-of-turn included).

    Too long a conversation loses its earliest turns, never the last assistant turn.
    `_reason` says why a dropped row was dropped (a key of CHAT_DROP_REASONS).
    """
    ids_out, labels_out, truncated, dropped, reasons, n_tok, n_bytes = [], [], [], [], [], [], []
    for msgs in batch["messages"]:
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        ids, mask, trunc, reason = _fit_conversation(tok, msgs, block_size)
        if reason:
            ids_out.append([])
            labels_out.append([])
            truncated.append(0)
            dropped.append(1)
            reasons.append(reason)
            n_tok.append(0)
            n_bytes.append(0)
            continue
        ids_out.append(ids)
        labels_out.append([i if m else IGNORE for i, m in zip(ids, mask)])
        truncated.append(trunc)
        dropped.append(0)
        reasons.append("")
        n_tok.append(len(ids))
        n_bytes.append(sum(len(str(m.get("content", "")).encode("utf-8")) for m in msgs))
    return {"input_ids": ids_out, "labels": labels_out, "_truncated": truncated, "_dropped": dropped, "_reason": reasons, "_tokens": n_tok, "_bytes": n_bytes}


def render_chat_pair(tok, prompt_msgs: list[dict], chosen: str, rejected: str) -> dict:
    """A chat preference pair as text: {prompt: the shared turns rendered with the generation
    prompt, chosen/rejected: what rendering each assistant turn adds after it (end-of-turn
    included), or the bare content where the template rewrites earlier turns}."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in prompt_msgs]
    prompt = _render(tok, msgs, add_generation_prompt=True)

    def answer(text: str) -> str:
        full = _render(tok, msgs + [{"role": "assistant", "content": text}])
        out = full[len(prompt):] if full.startswith(prompt) and len(full) > len(prompt) else text
        # Ending on EOS itself (not the template's newline after it): TRL adds EOS to an answer
        # that does not end with it, and one is enough.
        return out.rstrip() if tok.eos_token and out.rstrip().endswith(tok.eos_token) else out

    return {"prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected)}


def answers_without_eos(tok, answers: list[str]) -> list[str]:
    """Answers with a trailing EOS text removed: encode_pairs adds the EOS token itself."""
    eos = tok.eos_token or ""
    return [a[: -len(eos)] if eos and a.endswith(eos) else a for a in answers]
