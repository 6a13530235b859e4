"""Perplexity on held-out data: the one routine `eval` and the export report both call.

`load` reads what eval scores (the prepared `eval.split`, or `eval.text_paths`) once;
`perplexity` scores one model on it with eval's windows, stride and prefix token. Text is
scored in rolling windows, document by document; prompt/completion and chat rows are scored
row by row on their labelled tokens, each with its own prompt as context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmctl.errors import DataError, StageInputError


@dataclass
class HeldOut:
    """Documents (token lists, rolling windows) or masked rows (input_ids + labels), never both."""

    docs: list[list[int]] | None
    rows: list[dict] | None
    source: str
    n_bytes: int
    names: list[str] = field(default_factory=list)
    packed: bool = False  # the prepared text split: one stream of documents joined by EOS
    total_tokens: int | None = None  # set when `load(max_tokens=)` kept only a part

    @property
    def tokens(self) -> int:
        """Scored tokens."""
        if self.docs is not None:
            return sum(len(d) for d in self.docs)
        return sum(1 for r in self.rows for t in r["labels"][1:] if t != -100)


def load(cfg, rd, tok, max_tokens: int | None = None) -> HeldOut:
    """The held-out data eval scores: `eval.text_paths` (each file, or record, one document
    scored as written) or the prepared `eval.split` (text: one stream; other formats: rows).

    `max_tokens` keeps the first documents or rows up to that many scored tokens (a text
    stream is cut there): a cheaper figure, but not eval's.
    """
    e = cfg.eval
    if e.text_paths:
        from llmctl.data.sources import expand_paths, read_documents

        files = expand_paths(e.text_paths, key="eval.text_paths", any_suffix=True)
        docs: list[list[int]] = []
        names: list[str] = []
        n_bytes = 0
        for f in files:
            for text, where in read_documents(f):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                if ids:
                    docs.append(ids)
                    names.append(where)
                    n_bytes += len(text.encode("utf-8"))
        if not docs:
            raise DataError(f"eval.text_paths: no text to score in {', '.join(e.text_paths)}")
        held = HeldOut(docs, None, ",".join(str(f) for f in files), n_bytes, names)
        return _truncate(held, max_tokens, tok) if max_tokens else held
    if not rd.dataset_dir.is_dir():
        raise StageInputError(f"{rd.dataset_dir} is missing: run 'llmctl prepare {cfg.source}' first")
    from datasets import load_from_disk

    ds = load_from_disk(str(rd.dataset_dir))
    if e.split not in ds:
        raise StageInputError(f"{rd.dataset_dir} has no '{e.split}' split: set eval.split to one of {', '.join(ds)} or data.{e.split}_fraction and re-run prepare")
    split = ds[e.split]
    if cfg.data.format == "text":
        ids = [t for row in split["input_ids"] for t in row]
        n_bytes = len(tok.decode(ids, skip_special_tokens=True).encode("utf-8"))
        held = HeldOut([ids], None, f"{rd.dataset_dir}[{e.split}]", n_bytes, [f"{e.split}"], packed=True)
    elif cfg.data.format in ("preference", "unpaired_preference"):  # scored: the chosen (desirable) answers
        from llmctl.data.formats import answers_without_eos, encode_pairs

        if cfg.data.format == "unpaired_preference":
            split = split.filter(lambda x: x, input_columns="label").rename_column("completion", "chosen")
        enc = encode_pairs({"prompt": split["prompt"], "completion": answers_without_eos(tok, split["chosen"])}, tok, cfg.data.block_size, tok.eos_token_id)
        rows = [{"input_ids": i, "labels": lab} for i, lab, d in zip(enc["input_ids"], enc["labels"], enc["_dropped"]) if not d]
        held = HeldOut(None, rows, f"{rd.dataset_dir}[{e.split}] (chosen answers)", _row_bytes(rows, tok),
                       [f"{e.split}[{i}]" for i in range(len(rows))])
    else:
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in split]
        held = HeldOut(None, rows, f"{rd.dataset_dir}[{e.split}] (completion tokens)", _row_bytes(rows, tok),
                       [f"{e.split}[{i}]" for i in range(len(rows))])
    return _truncate(held, max_tokens, tok) if max_tokens else held


def _row_bytes(rows: list[dict], tok) -> int:
    scored = [t for r in rows for t in r["labels"] if t != -100]
    return len(tok.decode(scored, skip_special_tokens=True).encode("utf-8"))


def first_tokens(held: HeldOut, max_tokens: int, tok) -> HeldOut:
    """`held` cut to its first `max_tokens` scored tokens, as `load(max_tokens=)` cuts it."""
    return _truncate(held, max_tokens, tok)


def _truncate(held: HeldOut, max_tokens: int, tok) -> HeldOut:
    total = held.tokens
    if total <= max_tokens:
        return held
    if held.rows is not None:
        keep, n = [], 0
        for r in held.rows:
            k = sum(1 for t in r["labels"][1:] if t != -100)
            if keep and n + k > max_tokens:
                break
            keep.append(r)
            n += k
        return HeldOut(None, keep, held.source, _row_bytes(keep, tok), held.names[: len(keep)], total_tokens=total)
    docs, n = [], 0
    for d in held.docs:
        if n >= max_tokens:
            break
        docs.append(d[: max_tokens - n])
        n += len(docs[-1])
    n_bytes = sum(len(tok.decode(d, skip_special_tokens=True).encode("utf-8")) for d in docs)
    return HeldOut(docs, None, held.source, n_bytes, held.names[: len(docs)], packed=held.packed, total_tokens=total)


def window(cfg, model) -> tuple[int, int]:
    """(window, stride) as eval scores: eval.max_length (else data.block_size) within the
    model's positions; eval.stride (else the window: disjoint windows)."""
    L = cfg.eval.max_length or cfg.data.block_size
    from llmctl.inference.context import context_length

    limit = context_length(model)
    if limit and L > limit:
        L = limit
    stride = cfg.eval.stride or L
    if stride > L:
        from llmctl.errors import ConfigError

        raise ConfigError(f"eval.stride ({stride}) is larger than the window eval.max_length ({L})")
    return L, stride


def prefix_id(tok) -> int:
    """The token every document is conditioned on: BOS, else EOS (as lm-eval)."""
    from llmctl.tokenizer import score_prefix

    return score_prefix(tok)


def perplexity(model, tok, held: HeldOut, cfg, con=None, token_losses: list | None = None) -> dict:
    """Score `model` on `held` as `llmctl eval` does: source, window, stride, prefix token,
    tokens, bytes, mean loss, perplexity, bits per byte. `con`: a progress bar for windows."""
    from contextlib import nullcontext

    from llmctl.metrics import masked_nll, perplexity_summary, rolling_nll, windows

    L, stride = window(cfg, model)
    prefix = prefix_id(tok)
    bs = cfg.eval.batch_size
    if held.docs is not None:
        n_win = sum(len(windows(len(d), L, stride)) for d in held.docs)
        with (con.progress("perplexity", total=n_win, unit="windows") if con is not None else nullcontext()) as prog:
            nll, count = rolling_nll(model, held.docs, prefix, L, stride, batch_size=bs, progress=prog, token_losses=token_losses)
    else:
        nll, count = masked_nll(model, held.rows, tok.pad_token_id, batch_size=bs, token_losses=token_losses)
    return {"source": held.source, "max_length": L, "stride": stride, "prefix_token_id": prefix, **perplexity_summary(nll, count, held.n_bytes)}
