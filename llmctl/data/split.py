"""The document-level split every prepare uses (text, chat, preference pairs, image rows)."""

from __future__ import annotations

import random
from array import array

from llmctl.errors import DataError


def seeded_split(items, cfg, noun: str = "document(s)") -> dict:
    """train/validation/test by data.validation_fraction and test_fraction (none held out for a
    split with its own paths), after a shuffle seeded by run.seed and data.max_documents: no item
    in two splits. `items`: a list or a datasets.Dataset (split with `select`, not copied)."""
    d = cfg.data
    # 8 bytes an item (a list of ints takes ~40: a corpus of millions of documents); random.shuffle
    # on any sequence draws the same swaps, so the order is the one a list gets
    order = array("q", range(len(items)))
    random.Random(cfg.run.seed).shuffle(order)
    if d.max_documents:
        order = order[: d.max_documents]
    n = len(order)
    n_val = 0 if d.validation_paths else (max(1, round(n * d.validation_fraction)) if d.validation_fraction > 0 else 0)
    n_test = 0 if d.test_paths else (max(1, round(n * d.test_fraction)) if d.test_fraction > 0 else 0)
    if n - n_val - n_test < 1:
        raise DataError(f"corpus has {n} {noun}: too few to hold out {n_val} for validation and {n_test} for test "
                        "(add data, or lower data.validation_fraction / data.test_fraction)")
    parts = {"validation": (0, n_val), "test": (n_val, n_val + n_test), "train": (n_val + n_test, n)}
    if hasattr(items, "select"):
        return {name: _select(items, order[a:b], (cfg.run.seed, d.max_documents, name)) for name, (a, b) in parts.items()}
    return {name: [items[i] for i in order[a:b]] for name, (a, b) in parts.items()}


def _select(ds, idx: array, salt: tuple):
    """`ds.select(idx)`: the same rows, without the Python list of the indices (and its hash) that
    `select` makes. The indices stay one uint64 Arrow array in memory, as `select` keeps them."""
    import numpy as np
    import pyarrow as pa

    if not len(idx) or ds._indices is not None:
        return ds.select(list(idx))
    from datasets import Dataset
    from datasets.fingerprint import Hasher
    from datasets.table import InMemoryTable

    ids = pa.array(np.frombuffer(idx, dtype=np.int64).astype(np.uint64))
    return Dataset(ds.data, info=ds.info.copy(), split=ds.split, indices_table=InMemoryTable(pa.table({"indices": ids})),
                   fingerprint=Hasher.hash((ds._fingerprint, "seeded_split", len(idx), int(idx[0]), *salt)))
