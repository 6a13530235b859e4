"""The document-level split every prepare uses (text, chat, preference pairs, image rows)."""

from __future__ import annotations

import random

from llmctl.errors import DataError


def seeded_split(items, cfg, noun: str = "document(s)") -> dict:
    """train/validation/test by data.validation_fraction and test_fraction (none held out for a
    split with its own paths), after a shuffle seeded by run.seed and data.max_documents: no item
    in two splits. `items`: a list or a datasets.Dataset (split with `select`, not copied)."""
    d = cfg.data
    order = list(range(len(items)))
    random.Random(cfg.run.seed).shuffle(order)
    if d.max_documents:
        order = order[: d.max_documents]
    n = len(order)
    n_val = 0 if d.validation_paths else (max(1, round(n * d.validation_fraction)) if d.validation_fraction > 0 else 0)
    n_test = 0 if d.test_paths else (max(1, round(n * d.test_fraction)) if d.test_fraction > 0 else 0)
    if n - n_val - n_test < 1:
        raise DataError(f"corpus has {n} {noun}: too few to hold out {n_val} for validation and {n_test} for test "
                        "(add data, or lower data.validation_fraction / data.test_fraction)")
    pick = (lambda idx: items.select(idx)) if hasattr(items, "select") else (lambda idx: [items[i] for i in idx])
    return {"validation": pick(order[:n_val]), "test": pick(order[n_val : n_val + n_test]), "train": pick(order[n_val + n_test :])}
