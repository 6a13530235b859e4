"""Counterfactual data augmentation (`data.curate.counterfactual: gender`).

Each training document that contains a gendered word gets a copy with every such word swapped
(he <-> she, man <-> woman, king <-> queen, ...), case kept. The copy is added to the training
split only: held-out splits stay as written, so eval numbers keep meaning the same thing.

Word swaps are not grammar: `her` is `his` before a word and `him` otherwise, `his` is `her`
before a word and `hers` otherwise; names, titles with no pair and other languages are left
alone. It balances the counts the data report shows, not the world the text describes.
"""

from __future__ import annotations

import re

# One direction; the map below has both.
GENDER_PAIRS = [
    ("he", "she"), ("him", "her"), ("himself", "herself"), ("man", "woman"), ("men", "women"), ("boy", "girl"),
    ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"), ("sons", "daughters"),
    ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"), ("husbands", "wives"), ("king", "queen"),
    ("kings", "queens"), ("uncle", "aunt"), ("uncles", "aunts"), ("nephew", "niece"), ("nephews", "nieces"),
    ("gentleman", "lady"), ("gentlemen", "ladies"), ("male", "female"), ("males", "females"), ("mr", "mrs"),
    ("sir", "madam"), ("lord", "lady"), ("prince", "princess"), ("princes", "princesses"), ("boyfriend", "girlfriend"),
    ("grandfather", "grandmother"), ("grandson", "granddaughter"), ("dad", "mom"), ("actor", "actress"),
    ("waiter", "waitress"), ("monk", "nun"), ("groom", "bride"), ("emperor", "empress"), ("duke", "duchess"),
]
_SWAP = {}
for _a, _b in GENDER_PAIRS:
    _SWAP.setdefault(_a, _b)
    _SWAP.setdefault(_b, _a)
_SWAP["his"] = "her"  # before a noun; "hers" when it stands alone (see _swap_word)
_SWAP["hers"] = "his"
_WORD = re.compile(r"[A-Za-z]+")
_FUNCTION_WORDS = frozenset("a an the his her my your our their its this that these those to and or but in on at with for from by "
                            "of as if so than then when while up down out off over again too very".split())
GROUPS = {"gender": _SWAP}


def _case_like(src: str, word: str) -> str:
    if src.isupper() and len(src) > 1:
        return word.upper()
    if src[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _swap_word(word: str, rest: str) -> str:
    """`word` swapped; `rest` is the text after it (her/his depend on whether a word follows)."""
    low = word.lower()
    nxt = rest.lstrip(" \t")
    follow = (_WORD.match(nxt).group().lower() if _WORD.match(nxt) else "")
    # "her" before a noun is possessive (his); before a function word it is an object (him)
    before_word = bool(follow) and rest[:1] in (" ", "\t") and follow not in _FUNCTION_WORDS
    if low == "her":
        return _case_like(word, "his" if before_word else "him")
    if low == "his":
        return _case_like(word, "her" if before_word else "hers")
    return _case_like(word, _SWAP[low])


def swap(text: str, group: str = "gender") -> tuple[str, int]:
    """(text with the group's words swapped, how many were swapped)."""
    table = GROUPS[group]
    out, last, n = [], 0, 0
    for m in _WORD.finditer(text):
        if m.group().lower() in table:
            out.append(text[last : m.start()])
            out.append(_swap_word(m.group(), text[m.end() : m.end() + 40]))
            last, n = m.end(), n + 1
    out.append(text[last:])
    return "".join(out), n


def swap_row(row: dict, fmt: str, group: str = "gender") -> tuple[dict, int]:
    """A document of any supported format with its words swapped in every text field."""
    if fmt == "text":
        t, n = swap(row["text"], group)
        return {**row, "text": t}, n
    if fmt == "prompt_completion":
        p, a = swap(row["prompt"], group)
        c, b = swap(row["completion"], group)
        return {**row, "prompt": p, "completion": c}, a + b
    if fmt == "chat":
        msgs, n = [], 0
        for m in row["messages"]:
            t, k = swap(m["content"], group)
            msgs.append({**m, "content": t})
            n += k
        return {**row, "messages": msgs}, n
    raise ValueError(f"counterfactual augmentation does not apply to data.format={fmt}")


def _balance(texts, groups: dict[str, list[str]]) -> dict:
    """Words, and each term group's count and rate per 10k words (the data report's term groups)."""
    from llmctl.data.curate import term_counts

    terms = frozenset(t.lower().encode() for ts in groups.values() for t in ts)
    group_of = {t.lower(): g for g, ts in groups.items() for t in ts}
    words, counts = 0, {g: 0 for g in groups}
    for text in texts:
        w, c = term_counts(text.lower().encode("utf-8", "surrogatepass"), terms)
        words += w
        for t, k in c.items():
            counts[group_of[t]] += k
    return {"words": words, "groups": {g: {"count": n, "per_10k_words": round(1e4 * n / max(words, 1), 2)} for g, n in counts.items()}}


def augment(ds, fmt: str, group: str, term_groups: dict[str, list[str]]):
    """(the training split with a swapped copy right after each document that has a group
    word, the report: documents added, words swapped, term balance before and after)."""
    from llmctl.data.curate import doc_text

    swapped = {"docs": 0, "words": 0}

    def batch(b: dict) -> dict:
        keys = list(b)
        out: dict[str, list] = {k: [] for k in keys}
        for i in range(len(b[keys[0]])):
            row = {k: b[k][i] for k in keys}
            copy, n = swap_row(row, fmt, group)
            for r in ([row, copy] if n else [row]):
                for k in keys:
                    out[k].append(r[k])
        return out

    before = _balance((doc_text(r, fmt) for r in ds), term_groups)
    new = ds.map(batch, batched=True, batch_size=512, load_from_cache_file=False, desc=None)
    added = len(new) - len(ds)
    after = _balance((doc_text(r, fmt) for r in new), term_groups)
    for r in ds:  # the words swapped, for the report (the same pass the copies made)
        n = swap_row(r, fmt, group)[1]
        swapped["docs"] += bool(n)
        swapped["words"] += n
    return new, {"group": group, "documents_added": added, "words_swapped": swapped["words"],
                 "term_groups_before": before, "term_groups_after": after,
                 "note": "the copies are added after curation: the train split's documents and tokens after curation include them"}
