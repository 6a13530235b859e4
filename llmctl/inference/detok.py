"""Incremental detokenization: the text of a growing list of tokens, as a full decode would give
it, without decoding the whole output at every token (that is O(n^2) in its length).

The method (as vLLM's and TGI's): decode a short window that starts a few tokens back, so that
merges across token boundaries decode as a full decode would, and keep only what it adds;
text that ends in half a multi-byte character waits for the next token, unless this is the
last one. `tokenizers.decoders.DecodeStream` does the same inside the tokenizers library but
is not used: it never hands out a half character at the end of the output (a reply cut by
max_tokens loses its last U+FFFD, which a full decode keeps), it has no way to ask for text
once more at the end, and it skips transformers' own `decode` (its clean-up of spaces).

Used by serve's engine (streamed and whole answers) and `generate`'s terminal stream.
"""

from __future__ import annotations

import codecs
import sys
from typing import Callable, Sequence


def step(tok, tokens: Sequence[int], prefix_offset: int, read_offset: int, final: bool = False) -> tuple[str, int, int]:
    """(the text that `tokens[read_offset:]` add, the new prefix_offset, the new read_offset).
    Start with both offsets at 0 and pass back what this returns; `final`: no token follows,
    so text ending in half a character is handed out as it decodes."""
    before = tok.decode(tokens[prefix_offset:read_offset], skip_special_tokens=True)
    now = tok.decode(tokens[prefix_offset:], skip_special_tokens=True)
    if len(now) > len(before) and (final or not now.endswith("\ufffd")):
        return now[len(before):], read_offset, len(tokens)
    return "", prefix_offset, read_offset


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (transformers' own table)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        _BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}
    return _BYTE_DECODER


_BYTE_DECODER: dict[str, int] | None = None


class TokenPieces:
    """Each token's text alone and the UTF-8 bytes it stands for, cached (logprobs name every
    token and alternative)."""

    def __init__(self, tok):
        self.tok = tok
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tok.decode([token])
        return self._text[token]

    def bytes(self, token: int) -> list[int]:
        """Byte-level BPE tokens can be part of a character: their bytes, from the byte alphabet."""
        if token not in self._bytes:
            piece = self.tok.convert_ids_to_tokens(token)
            byte_of = byte_decoder()
            if isinstance(piece, str) and piece and all(c in byte_of for c in piece):
                self._bytes[token] = [byte_of[c] for c in piece]
            else:
                self._bytes[token] = list(self.tok.decode([token]).encode("utf-8"))
        return self._bytes[token]


def text_ends(tok, tokens: Sequence[int], text: str, token_bytes: Callable[[int], list[int]]) -> list[int]:
    """Each token's text offset: the length of the text a stream has handed out once that token
    is in (as `step` gives it token by token), for a sequence decoded once at its end into
    `text`. From the tokens' UTF-8 bytes (byte-level BPE), kept when they spell `text` exactly;
    otherwise by replaying `step`."""
    pieces, ends, n, tail = [], [], 0, ""
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    for i, t in enumerate(tokens):
        final = i == len(tokens) - 1
        piece = dec.decode(bytes(token_bytes(t)), final=final)
        pieces.append(piece)
        n += len(piece)
        tail = piece[-1:] or tail
        # as a stream does: text that ends in half a character waits for the next token
        half = dec.getstate()[0] or tail == "\ufffd"
        ends.append(n if final or not half else (ends[-1] if ends else 0))
    if "".join(pieces) == text:
        return ends
    ends, streamed, prefix, read = [], "", 0, 0
    for i in range(len(tokens)):
        delta, prefix, read = step(tok, tokens[: i + 1], prefix, read, final=i == len(tokens) - 1)
        streamed += delta
        ends.append(len(streamed))
    return ends


class TextStream:
    """A streamer for `generate` (transformers' `put`/`end` protocol, one sequence): the new
    tokens' text as `step` decodes it, cut at the first stop string and holding back what could
    still become one (`stops.release`). Each piece goes to `on_finalized_text(text,
    stream_end)`, as transformers' TextStreamer hands it; the first `put` (the prompt) is
    skipped."""

    def __init__(self, tok, stops: Sequence[str] = ()):
        self.tok, self.stops = tok, tuple(stops)
        self.tokens: list[int] = []
        self.text, self.prefix, self.read, self.sent = "", 0, 0, 0
        self.prompt_seen = self.ended = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextStream streams one sequence only")
        if not self.ended:
            self.tokens += value.reshape(-1).tolist()
            self._emit(final=False)

    def end(self) -> None:
        if not self.ended:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        from llmctl.inference.stops import release

        seen = len(self.text)
        delta, self.prefix, self.read = step(self.tok, self.tokens, self.prefix, self.read, final=final)
        self.text += delta
        n, stopped = release(self.text, self.stops, seen, final=final)
        piece = self.text[self.sent : n] if n > self.sent else ""
        self.sent = max(self.sent, n)
        self.ended = final or stopped
        if piece or self.ended:
            self.on_finalized_text(piece, stream_end=self.ended)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        sys.stdout.write(text + ("\n" if stream_end else ""))
        sys.stdout.flush()
