"""The model's context: how many positions it takes, prompts as the model sees them (BOS by the
one rule in `llmctl.tokenizer`), and what happens when prompt and new tokens would not fit:
`generate` and eval cut the prompt from the left and stop at the context (`fit_to_context`);
serve refuses the request instead (`room` tells it how many tokens are left)."""

from __future__ import annotations

from typing import Sequence

from llmctl.tokenizer import wants_bos, with_bos


def context_length(model) -> int | None:
    """Positions the model can take; None when its config sets no limit."""
    for c in (model.config, getattr(model.config, "text_config", None)):  # an image-text model's limit is its language model's
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            v = getattr(c, name, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def encode(tok, texts: Sequence[str]) -> tuple[list[list[int]], bool]:
    """(each text's token ids as the model sees them, whether they open with BOS): encoded
    without special tokens, then BOS first when `wants_bos` (asked once for all)."""
    want = wants_bos(tok)
    return [with_bos(tok, x, want) for x in tok(list(texts), add_special_tokens=False)["input_ids"]], want


def encode_one(tok, text: str, want: bool | None = None) -> list[int]:
    """One text's token ids as the model sees them (`encode` for a single text); `want`: the
    tokenizer's `wants_bos`, when the caller knows it (it costs two encodings to ask)."""
    return with_bos(tok, tok(text, add_special_tokens=False)["input_ids"], want)


def leading_bos(tok, ids: list[int]) -> int:
    """1 when a prompt opens with BOS (added by the BOS rule, or sent so) and has more: that
    BOS is the context of the first token, not text to echo."""
    return int(len(ids) > 1 and ids[0] == getattr(tok, "bos_token_id", None))


def fit_to_context(ids: list[list[int]], max_new_tokens: int, ctx: int | None, bos: int | None = None) -> tuple[list[list[int]], int, list[int]]:
    """(prompts cut from the left, new tokens allowed, tokens cut per prompt).

    Prompt + new tokens must stay within the context: models with learned absolute
    positions (gpt2) crash past it, and rotary ones degrade. New tokens keep up to half of
    the context (all of `max_new_tokens` when it is smaller); a prompt longer than the rest
    loses its beginning (after a leading `bos`, which stays); generation then stops at the
    context.
    """
    if ctx is None:
        return ids, max_new_tokens, [0] * len(ids)
    reserve = min(max_new_tokens, max(ctx // 2, 1))
    keep = ctx - reserve
    cut = [max(len(x) - keep, 0) for x in ids]
    ids = [x[:1] + x[c + 1 :] if c and bos is not None and x[0] == bos else x[c:] for x, c in zip(ids, cut)]
    longest = max((len(x) for x in ids), default=0)
    return ids, min(max_new_tokens, ctx - longest), cut


def room(ctx: int | None, prompt_len: int) -> int | None:
    """New tokens that fit after a prompt of `prompt_len` tokens; None when there is no limit."""
    return ctx - prompt_len if ctx else None
