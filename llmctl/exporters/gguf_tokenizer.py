"""The tokenizer inside a GGUF: which llama.cpp pre-tokenizer it needs, writing it, reading it back.

llama.cpp tokenizes a byte-level BPE vocabulary with one of a fixed set of pre-tokenizers
(the regular expressions that cut text into words before the merges run), chosen by the
file's `tokenizer.ggml.pre` name. A wrong name loads silently and tokenizes differently
from training (`default` splits ` (`, ` =`, digits and `'s` unlike GPT-2). llama.cpp's own
converter identifies a hub tokenizer by hashing the ids of a fixed probe text; we do the same
with the probe text, but compare against each candidate pre-tokenizer run on this very
vocabulary, so a tokenizer trained by `llmctl prepare` (whose hash no table knows) is
identified too. Anything that is not byte-level BPE split like one of the candidates is
refused: embedding it under a wrong name would export a model that reads text differently.
"""

from __future__ import annotations

import hashlib
import json

from llmctl.errors import ConfigError

_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"
_GPT2 = rf"{_CONTRACTIONS}| ?\p{{L}}+| ?\p{{N}}+| ?[^\s\p{{L}}\p{{N}}]+|\s+(?!\S)"
_CASELESS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# name -> (regexes applied in turn, as llama.cpp's src/llama-vocab.cpp does; ignore_merges).
# Only the names llmctl can identify are written; "default" is here so a file that carries it
# (older llmctl wrote it) is read back the way llama.cpp reads it.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": ((_GPT2,), False),
    "llama-bpe": (
        (rf"{_CASELESS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
        True,
    ),
    "qwen2": (
        (rf"{_CASELESS}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
        False,
    ),
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"), False),
}
IDENTIFIABLE = ("gpt-2", "llama-bpe", "qwen2")

# llama.cpp's probe text (convert_hf_to_gguf.py hashes the ids it gets): whitespace runs,
# emoji, digit runs, Khmer, Chinese, Cyrillic, quote and punctuation runs, contractions.
LLAMA_CPP_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Code and prose of the kind a user trains on: operators, calls, digits, quotes, unicode.
PROBES = (
    LLAMA_CPP_PROBE,
    'def area(r: float) -> float:\n    return 3.14159 * r ** 2  # "pi r squared"\n',
    "for i in range(10):\n\tprint(f'{i:03d}', end=' ')\n",
    "if x == 1 and y != 22: z = (x, y)\nelse:\n    z = [0] * 333",
    "It's the model's job; they'll see what we've done (twice).",
    "Prices rose 12.5% to $1,234.56 on 2024-03-01 -- naïve café façade, Zürich, 東京, Москва.",
    "  leading spaces,\ttabs\r\nand CRLF   trailing   ",
    "emoji 🦙🚀 and symbols <= >= != -> => :: ... ```code```",
    'json = {"key": [1, 2, 3], "nested": {"a": null}}',
    "ALL CAPS WE'RE HERE, MixedCase I'M ok 'tis",
)


def llama_cpp_hash(tok) -> str:
    """sha256 of the ids llama.cpp's probe text gets, as convert_hf_to_gguf.py computes it."""
    return hashlib.sha256(str(tok.encode(LLAMA_CPP_PROBE)).encode()).hexdigest()


def _pre_tokenizer(name: str):
    from tokenizers import Regex, pre_tokenizers

    regexes, _ = PRE_TOKENIZERS[name]
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _rebuild(vocab: dict[str, int], merges: list[tuple[str, str]], name: str, added: list[tuple[str, int, bool]]):
    """A tokenizers.Tokenizer that does what llama.cpp does with this vocabulary under `name`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    _, ignore_merges = PRE_TOKENIZERS[name]
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    t.pre_tokenizer = _pre_tokenizer(name)
    t.decoder = decoders.ByteLevel()
    if added:
        t.add_tokens([AddedToken(s, special=sp, normalized=False) for s, _, sp in added])
    return t


def _describe(tj: dict) -> str:
    def kinds(node) -> str:
        if not node:
            return "none"
        if node.get("type") == "Sequence":
            inner = node.get("pretokenizers") or node.get("normalizers") or []
            return "+".join(kinds(n) for n in inner)
        return node.get("type", "?")

    return f"pre-tokenizer {kinds(tj.get('pre_tokenizer'))}, normalizer {kinds(tj.get('normalizer'))}"


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def identify(tok) -> str:
    """The llama.cpp pre-tokenizer name for `tok`, or ConfigError (exit 2) saying what is unsupported."""
    tj = json.loads(tok.backend_tokenizer.to_str())
    model = tj.get("model") or {}
    what = _describe(tj)
    if model.get("type") != "BPE":
        raise ConfigError(
            f"export gguf: the tokenizer is a {model.get('type')} model ({what}); llmctl embeds only byte-level BPE "
            "tokenizers in GGUF: drop gguf from export.formats, or convert with llama.cpp's convert_hf_to_gguf.py"
        )
    pieces = [s for node in _walk(tj.get("pre_tokenizer")) for s in [node.get("type")]]
    normalizers = [n.get("type") for n in _walk(tj.get("normalizer"))]
    if model.get("byte_fallback") or "Metaspace" in pieces or "Replace" in normalizers or "Prepend" in normalizers:
        raise ConfigError(
            f"export gguf: the tokenizer is SentencePiece-style BPE ({what}, byte_fallback={bool(model.get('byte_fallback'))}); "
            "llmctl embeds only byte-level BPE tokenizers in GGUF: drop gguf from export.formats, or convert with "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    backend = tok.backend_tokenizer
    if backend.pre_tokenizer is None:
        raise ConfigError(f"export gguf: the tokenizer has no pre-tokenizer ({what}); llama.cpp has no such mode")
    own = [[p for p, _ in backend.pre_tokenizer.pre_tokenize_str(t)] for t in PROBES]
    vocab, merges, added = _parts(tok, tj)
    for name in IDENTIFIABLE:
        pre = _pre_tokenizer(name)
        if [[p for p, _ in pre.pre_tokenize_str(t)] for t in PROBES] != own:
            continue
        rebuilt = _rebuild(vocab, merges, name, added)
        bad = [t for t in PROBES if rebuilt.encode(t, add_special_tokens=False).ids != _ids(tok, t)]
        if bad:
            raise ConfigError(
                f"export gguf: the tokenizer splits text like llama.cpp's '{name}' but encodes {bad[0][:40]!r} differently "
                f"({what}, ignore_merges={model.get('ignore_merges', False)}); llama.cpp would not read text the way the "
                "model was trained: drop gguf from export.formats"
            )
        return name
    raise ConfigError(
        f"export gguf: the tokenizer's {what} splits text unlike every llama.cpp pre-tokenizer llmctl can name "
        f"({', '.join(IDENTIFIABLE)}); llama.cpp would tokenize differently from training: drop gguf from export.formats"
    )


def _walk(node):
    if not node:
        return
    yield node
    for child in node.get("pretokenizers") or node.get("normalizers") or []:
        yield from _walk(child)


def _parts(tok, tj: dict):
    """(the model's vocab, merges as pairs, added tokens as (content, id, special))."""
    model = tj["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    added = [(a["content"], a["id"], bool(a.get("special"))) for a in tj.get("added_tokens", [])]
    return dict(model["vocab"]), merges, added


def add_to_writer(w, tok, vocab_size: int, pre: str) -> None:
    """Vocabulary, merges, token types, special ids and BOS/EOS behaviour under llama.cpp's keys."""
    import gguf

    tj = json.loads(tok.backend_tokenizer.to_str())
    vocab, merges, added = _parts(tok, tj)
    added_by_id = {i: sp for _, i, sp in added}
    by_id = {i: t for t, i in tok.get_vocab().items()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:  # embedding rows beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            if i in added_by_id:
                types.append(gguf.TokenType.CONTROL if added_by_id[i] else gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    # What the tokenizer adds on its own: llama.cpp then adds the same (llama-bpe defaults to BOS).
    from llmctl.tokenizer import wants_bos

    plain, full = _ids(tok, "a"), tok("a")["input_ids"]
    w.add_add_bos_token(wants_bos(tok))
    w.add_add_eos_token(tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def from_gguf(path):
    """A transformers fast tokenizer rebuilt from the file alone, splitting text the way llama.cpp will.

    Built from `tokenizer.ggml.*` with gguf's reader and the pre-tokenizer the `pre` name implies
    (transformers' own GGUF tokenizer loader ignores `pre` for GPT-2-type files, so it cannot tell).
    """
    import gguf
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(path))
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {_field(reader, 'tokenizer.ggml.model')!r}, not gpt2")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not one llmctl can read back")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    special = {int(gguf.TokenType.CONTROL): True, int(gguf.TokenType.USER_DEFINED): False}
    added = [(t, i, special[ty]) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in special]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != gguf.TokenType.UNUSED}
    backend = _rebuild(vocab, merges, pre, added)
    names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id"}
    kwargs = {}
    for arg, key in names.items():
        i = _field(reader, f"tokenizer.ggml.{key}")
        if i is not None:
            kwargs[arg] = tokens[int(i)]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs), pre


def check_file(path, tok) -> dict:
    """Ids of every probe text through the embedded tokenizer equal the HF tokenizer's."""
    embedded, pre = from_gguf(path)
    diffs = [t for t in PROBES if _ids(embedded, t) != _ids(tok, t)]
    return {"pre": pre, "probes": len(PROBES), "mismatched": len(diffs), "first_mismatch": diffs[0][:60] if diffs else None}
