"""Generation metrics beside sacreBLEU's: ROUGE-1/2/L (Google's `rouge-score`, Porter stemmer)
and SQuAD's exact match and token F1 (lower case, punctuation and English articles removed,
whitespace collapsed: the normalisation of the official SQuAD v1.1 evaluation script).

`eval.metrics` lists which are computed; the first one listed leads `run`'s summary.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter

from llmctl.errors import ConfigError

# Every metric `eval.metrics` may name; the order is the default order.
GENERATION_METRICS = ("bleu", "chrf", "ter", "rouge1", "rouge2", "rougeL", "exact_match", "token_f1")
ROUGE = ("rouge1", "rouge2", "rougeL")
# Lower is better only for TER.
LOWER_IS_BETTER = {"ter"}

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(hyp: str, ref: str) -> bool:
    return normalize_answer(hyp) == normalize_answer(ref)


def token_f1(hyp: str, ref: str) -> float:
    """SQuAD's F1 over normalised tokens: 1.0 when both are empty, 0.0 when one is."""
    h, r = normalize_answer(hyp).split(), normalize_answer(ref).split()
    if not h or not r:
        return float(h == r)
    common = sum((Counter(h) & Counter(r)).values())
    if common == 0:
        return 0.0
    p, rec = common / len(h), common / len(r)
    return 2 * p * rec / (p + rec)


@functools.lru_cache(maxsize=8)
def _scorer(kinds: tuple[str, ...]):
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError("eval.metrics has ROUGE but rouge-score is not installed: pip install 'llmctl[eval]' "
                          "(or drop rouge1/rouge2/rougeL from eval.metrics)") from None
    return rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)


def rouge_scores(hyps: list[str], refs: list[str], kinds: tuple[str, ...] = ROUGE) -> tuple[dict, list[dict]]:
    """(corpus ROUGE, per-example ROUGE): each the F-measure x 100; the corpus number is the
    mean over examples (as `rouge-score`'s and LLaMA-Factory's reports average them)."""
    if not kinds:
        return {}, [{} for _ in hyps]
    sc = _scorer(kinds)
    per = [{k: round(100 * v.fmeasure, 4) for k, v in sc.score(r, h).items()} for h, r in zip(hyps, refs)]
    n = max(len(per), 1)
    return {k: round(sum(p[k] for p in per) / n, 4) for k in kinds}, per


def squad_scores(hyps: list[str], refs: list[str]) -> tuple[dict, list[dict]]:
    """(mean exact match and token F1 as fractions, per-example values)."""
    em = [exact_match(h, r) for h, r in zip(hyps, refs)]
    f1 = [token_f1(h, r) for h, r in zip(hyps, refs)]
    n = max(len(em), 1)
    per = [{"exact_match": e, "token_f1": round(f, 4)} for e, f in zip(em, f1)]
    return {"exact_match": round(sum(em) / n, 4), "token_f1": round(sum(f1) / n, 4)}, per
