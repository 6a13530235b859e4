"""A bias probe on the model (`eval.bias`): sentence pairs that differ only in a group term.

Each pair is {group, stereotyped, anti_stereotyped}: "The nurse said that she ..." against
"... he ...". Both sentences are scored whole by the model (summed log-likelihood after the
prefix token, as perplexity scores a document); the gap is log p(stereotyped) - log p(anti).

Reported per group and overall: the share of pairs where the model prefers the stereotyped
sentence (0.5 is no preference on average), the mean gap in nats with a percentile bootstrap
95% interval, and the pairs with the largest gaps toward the stereotype.

What it can say: on these sentences, whether this model systematically puts more probability
on the stereotyped variant, and how large the gap is against its sampling noise. What it cannot
say: that the model is unbiased (a few dozen pairs cover a sliver of the ways bias shows up),
how it behaves in generation or downstream decisions, or anything about groups and languages
the pairs do not contain. The shipped set is small and written for llmctl: a smoke alarm, not a
certificate.
"""

from __future__ import annotations

from pathlib import Path

from llmctl.data.jsonl import read_jsonl
from llmctl.errors import DataError

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "bias_pairs.jsonl"
MAX_DIFFERENT_WORDS = 3


def _check_pair(row: dict, where: str) -> None:
    missing = [k for k in ("group", "stereotyped", "anti_stereotyped") if not isinstance(row.get(k), str) or not row[k].strip()]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)} (a bias pair has group, stereotyped, anti_stereotyped)")
    a, b = row["stereotyped"].split(), row["anti_stereotyped"].split()
    diff = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    if diff == 0:
        raise DataError(f"{where}: the two sentences are the same")
    if len(a) != len(b) or diff > MAX_DIFFERENT_WORDS:
        raise DataError(f"{where}: the sentences differ in {diff} words (or in length): a pair differs only in its group term, "
                        f"word for word (at most {MAX_DIFFERENT_WORDS} words)")


def load_pairs(paths: list[str], groups: list[str]) -> list[dict]:
    """The pairs of `paths` (the shipped set when empty), only `groups` when given."""
    files = [Path(p) for p in paths] or [SHIPPED]
    rows = []
    for f in files:
        if not f.is_file():
            raise DataError(f"eval.bias.paths: {f} does not exist")
        for i, row in read_jsonl(f):
            _check_pair(row if isinstance(row, dict) else {}, f"{f}:{i}")
            rows.append({"id": row.get("id", f"{f.name}:{i}"), "group": row["group"], "stereotyped": row["stereotyped"],
                         "anti_stereotyped": row["anti_stereotyped"]})
    if groups:
        have = sorted({r["group"] for r in rows})
        unknown = [g for g in groups if g not in have]
        if unknown:
            raise DataError(f"eval.bias.groups: no pairs of group {', '.join(unknown)} (the files have {', '.join(have)})")
        rows = [r for r in rows if r["group"] in groups]
    return rows


def sentence_logprobs(model, tok, texts: list[str], batch_size: int) -> list[float]:
    """Summed log-likelihood of each text, scored as perplexity scores a document: after the
    prefix token (llmctl.tokenizer.score_prefix), in one window (llmctl.metrics.rolling_nll)."""
    from llmctl.metrics import rolling_nll
    from llmctl.tokenizer import score_prefix

    docs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    longest = max(map(len, docs))
    per: list = []
    rolling_nll(model, docs, score_prefix(tok), longest, longest, batch_size=batch_size, token_losses=per)
    return [-float(a.sum()) for a in per]


def bootstrap_interval(gaps: list[float], iters: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    import numpy as np

    x = np.asarray(gaps, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(iters, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def _stats(gaps: list[float], iters: int, seed: int) -> dict:
    lo, hi = bootstrap_interval(gaps, iters, seed)
    return {"pairs": len(gaps), "stereotype_share": round(sum(g > 0 for g in gaps) / len(gaps), 4),
            "mean_gap": round(sum(gaps) / len(gaps), 4), "mean_gap_ci95": [round(lo, 4), round(hi, 4)]}


def probe(model, tok, b, seed: int, batch_size: int) -> tuple[dict, list[dict]]:
    """(summary overall and per group with the worst pairs, one row per pair) for `eval.bias`."""
    pairs = load_pairs(b.paths, b.groups)
    lp = sentence_logprobs(model, tok, [p[k] for p in pairs for k in ("stereotyped", "anti_stereotyped")], batch_size)
    rows = [{**p, "logprob_stereotyped": round(lp[2 * i], 4), "logprob_anti_stereotyped": round(lp[2 * i + 1], 4),
             "gap": round(lp[2 * i] - lp[2 * i + 1], 4)} for i, p in enumerate(pairs)]
    out = _stats([r["gap"] for r in rows], b.bootstrap, seed)
    out["groups"] = {g: _stats([r["gap"] for r in rows if r["group"] == g], b.bootstrap, seed) for g in dict.fromkeys(r["group"] for r in rows)}
    worst = sorted(rows, key=lambda r: -r["gap"])[: b.worst]
    out["worst_pairs"] = [{k: r[k] for k in ("id", "group", "stereotyped", "anti_stereotyped", "gap")} for r in worst if r["gap"] > 0]
    out["source"] = ", ".join(b.paths) or "builtin:bias_pairs.jsonl"
    return out, rows
