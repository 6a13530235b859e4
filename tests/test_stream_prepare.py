"""Data larger than memory (issue #30): .txt sources stream a line at a time, giving the documents
the whole-file reading gave, with the same errors."""

from __future__ import annotations

import json
import sys
import tracemalloc

import pytest

from llmctl.data.sources import Counters, read_file
from llmctl.errors import DataError

TRICKY = "first para\nstill first\r\n\r\nsecond\rsplit by CR\n\n\n  \nthird \u2028 with LS\x85NEL\nlast without newline"


def _whole_file(text: str, unit: str) -> list[str]:
    """What read_file gave before it streamed: str.splitlines over the whole decoded text."""
    lines = text.splitlines()
    if unit == "line":
        return [x for x in lines if x.strip()]
    out, buf = [], []
    for line in lines + [""]:
        if line.strip():
            buf.append(line)
        elif buf:
            out.append("\n".join(buf))
            buf = []
    return out


@pytest.mark.parametrize("unit", ["line", "paragraph"])
def test_streamed_txt_gives_the_documents_of_whole_file_reading(tmp_path, unit):
    p = tmp_path / "c.txt"
    p.write_bytes(TRICKY.encode())
    got = [rec["text"] for rec, _ in read_file(p, unit, "error", Counters())]
    assert got == _whole_file(TRICKY, unit) and len(got) >= 3


def test_invalid_utf8_names_line_and_byte_or_skips_the_file(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok line\n\nsecond ok\nbroken \xff here\n")
    with pytest.raises(DataError, match=r"bad.txt:4: invalid UTF-8 at byte 26"):
        list(read_file(p, "paragraph", "error", Counters()))
    c = Counters()
    assert list(read_file(p, "line", "skip", c)) == [] and c.reasons == {"invalid_utf8": 1}


def test_reading_a_large_txt_holds_one_paragraph_not_the_file(tmp_path):
    p = tmp_path / "big.txt"
    para = ("word " * 200 + "\n") * 3 + "\n"  # ~3 KB paragraphs
    with open(p, "w") as f:
        for _ in range(8000):  # ~24 MB
            f.write(para)
    tracemalloc.start()
    n = sum(1 for _ in read_file(p, "paragraph", "error", Counters()))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 8000 and peak < 2_000_000, peak  # whole-file reading: ~50 MB (the bytes, the text, its lines)


# --------------------------------------------------------------------------- bounded RSS (#30)
# A memory-mapped Arrow file's pages count in the process's RSS once read. Packed blocks are written
# straight into the dataset folder (no cache file mapped and copied by save_to_disk), and the raw
# documents, read in the split's shuffled order, a batch at a time with their pages dropped after each.

class _NoProgress:
    def update(self, **_):
        pass


class _FakeTok:
    """One id per 2 bytes of text: fast enough to pack tens of MB in a test."""

    bos_token_id = None
    eos_token_id = 0

    class _T:
        @staticmethod
        def encode_batch(texts, add_special_tokens=False):
            from types import SimpleNamespace

            return [SimpleNamespace(ids=list(range(1, len(t) // 2 + 1))) for t in texts]

    _tokenizer = _T()

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1]}


def _rss_file_kb() -> int:
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("RssFile:"))


def _peak_while(fn, measure, interval: float = 0.002) -> float:
    """The most `measure()` read while `fn` ran (sampled every `interval` s), and after it."""
    import threading
    import time

    peak, done = [measure()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], measure())
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], measure())


def _peak_rss_file_growth_mb(fn) -> float:
    """The most this process's file-backed resident memory grew above its start while `fn` ran (sampled)."""
    start = _rss_file_kb()
    return (_peak_while(fn, _rss_file_kb) - start) / 1024


def _raw_docs(tmp_path, n: int, size: int = 2000):
    """n distinct documents of `size` bytes in an Arrow file, as prepare reads them, and a config."""
    import random

    from conftest import tiny_config_dict, write_config

    from llmctl.config import load_config
    from llmctl.stages import prepare

    rng = random.Random(0)
    alphabet = "abcdefghij klmnop"
    docs = ({"text": f"{i} " + "".join(rng.choices(alphabet, k=size)), "_id": f"d:{i}"} for i in range(n))
    ds = prepare._to_arrow(docs, tmp_path / "build" / "cache" / "raw.arrow")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", data={"block_size": 256, "validation_fraction": 0.05}, model={"context_length": 256})))
    return ds, cfg


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile, /proc/self/maps: Linux")
def test_reading_a_shuffled_split_maps_none_of_the_corpus(tmp_path):
    """The split's documents read in its shuffled order: through the mapping (what prepare did),
    every random read leaves ~200 KB resident (the kernel maps 64 KB around each fault), so the
    whole 32 MB file is resident; read in place with pread, none of it."""
    from llmctl.data import arrowio
    from llmctl.data.split import seeded_split

    ds, cfg = _raw_docs(tmp_path, 16000)  # 32 MB of text
    train = seeded_split(ds, cfg)["train"]
    got: list[str] = []
    grew = _peak_rss_file_growth_mb(lambda: [got.extend(b) for b in arrowio.texts(train, "text", batch_size=1000)])
    assert grew < 4, grew
    n = [0]

    def mapped():
        for batch in train.iter(batch_size=1000):
            n[0] += len(batch["text"])

    assert _peak_rss_file_growth_mb(mapped) > 24 and n[0] == len(got) == len(train)


def test_texts_reads_what_the_dataset_holds(tmp_path):
    """arrowio.texts in place (shuffled indices in memory, indices on disk, several files, a column
    selection) and through the mapping (in memory, a renamed column): the dataset's own strings."""
    from datasets import Dataset, concatenate_datasets

    from llmctl.data import arrowio
    from llmctl.data.split import seeded_split

    ds, cfg = _raw_docs(tmp_path, 2500, size=50)
    ds2, _ = _raw_docs(tmp_path / "b", 700, size=30)
    cases = {
        "file": ds,
        "shuffled": seeded_split(ds, cfg)["train"],
        "filtered": ds.filter(lambda t: "a" in t[:4], input_columns="text", cache_file_name=str(tmp_path / "f.arrow")),
        "two files": concatenate_datasets([ds2, ds]).select_columns(["text"]),
        "in memory": Dataset.from_dict({"text": ["x", "", "y\u00e9"] * 700}),
        "renamed": ds.rename_columns({"text": "t", "_id": "text"}),
    }
    for name, d in cases.items():
        assert [t for b in arrowio.texts(d, "text", batch_size=300) for t in b] == d["text"], name
    assert 0 < len(cases["filtered"]) < len(ds) and cases["filtered"]._indices is not None
    assert arrowio._PreadColumn.open(cases["two files"], "text") is not None
    assert arrowio._PreadColumn.open(cases["renamed"], "text") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile: Linux")
def test_packing_a_split_maps_none_of_its_blocks(tmp_path):
    """Today's _pack_split wrote a cache file, mapped it, and save_to_disk read every page of it: the
    process held the packed split (here ~100 MB) in RSS. Now nothing of it is mapped."""
    from datasets import load_from_disk

    from llmctl.data.split import seeded_split
    from llmctl.stages import prepare

    ds, cfg = _raw_docs(tmp_path, 8000)  # 16 MB of text, 8M tokens: ~96 MB of packed blocks
    splits = seeded_split(ds, cfg)
    stats = {"splits": {}}
    con = type("Con", (), {"progress": lambda self, *a, **k: _Ctx(), "warn": lambda self, m: None})()
    build = tmp_path / "build"
    grew = _peak_rss_file_growth_mb(lambda: prepare._tokenize(cfg, splits, _FakeTok(), build, con, stats))
    tr = stats["splits"]["train"]
    packed_mb = tr["blocks"] * 256 * 12 / 2**20
    assert packed_mb > 80 and grew < 8, (grew, packed_mb)  # before: the packed split, mapped (~100 MB)
    out = load_from_disk(str(build / "dataset"))
    assert list(out) == ["train", "validation"] and len(out["train"]) == tr["blocks"]


class _Ctx:
    def __enter__(self):
        return _NoProgress()

    def __exit__(self, *a):
        return False


def _old_split_order(n: int, seed: int, n_val: int) -> tuple[list[int], list[int]]:
    """seeded_split's order as it was: a shuffled list (validation first, then train)."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:n_val], order[n_val:]


def test_seeded_split_of_a_dataset_is_the_rows_select_gave(tmp_path):
    from llmctl.data.split import seeded_split

    ds, cfg = _raw_docs(tmp_path, 300, size=20)
    got = seeded_split(ds, cfg)
    val, train = _old_split_order(300, cfg.run.seed, 15)
    assert got["validation"]["_id"] == ds.select(val)["_id"] and got["train"]["_id"] == ds.select(train)["_id"]
    assert got["test"].num_rows == 0
    assert seeded_split(list(range(300)), cfg) == {"validation": val, "test": [], "train": train}


def test_split_writer_writes_the_bytes_save_to_disk_writes(tmp_path):
    """Packed blocks written as they come are the shard, dataset_info.json and state.json (but its
    fresh fingerprint) that save_to_disk wrote from the mapped cache file, for the same blocks."""
    import numpy as np
    import pyarrow as pa
    from datasets import DatasetDict, Features, List, Value

    from llmctl.data import arrowio, formats
    from llmctl.stages import prepare

    blocks = np.random.default_rng(0).integers(0, 5000, size=(2500, 16), dtype=np.int32)
    old = prepare._to_arrow(({"input_ids": r, "labels": r} for r in blocks.tolist()), tmp_path / "cache" / "train.arrow", chunk=2048,
                            schema=pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int64()))]))
    DatasetDict({"train": old}).save_to_disk(str(tmp_path / "old"))
    w = arrowio.SplitWriter(tmp_path / "new" / "train", Features({"input_ids": List(Value("int32")), "labels": List(Value("int64"))}))
    for a, b in ((0, 700), (700, 2000), (2000, 2500)):  # uneven arrivals: batches of 1000 all the same
        w.write(formats.blocks_table(blocks[a:b]))
    assert w.close() == 2500
    arrowio.write_dataset_dict(tmp_path / "new", ["train"])
    for f in ("dataset_dict.json", "train/data-00000-of-00001.arrow", "train/dataset_info.json"):
        assert (tmp_path / "new" / f).read_bytes() == (tmp_path / "old" / f).read_bytes(), f
    state = [json.loads((tmp_path / d / "train" / "state.json").read_text()) for d in ("new", "old")]
    assert state[0].pop("_fingerprint") != state[1].pop("_fingerprint") and state[0] == state[1]
    assert sorted(p.name for p in (tmp_path / "new" / "train").iterdir()) == sorted(p.name for p in (tmp_path / "old" / "train").iterdir())


def test_split_writer_starts_a_shard_at_the_size_limit(tmp_path):
    import numpy as np
    from datasets import Features, List, Value, load_from_disk

    from llmctl.data import arrowio, formats

    blocks = np.arange(3000 * 8, dtype=np.int32).reshape(3000, 8)
    w = arrowio.SplitWriter(tmp_path / "d" / "train", Features({"input_ids": List(Value("int32")), "labels": List(Value("int64"))}))
    w.shard_bytes = 50_000  # a shard holds whole batches of 1000 rows (~100 KB each): three shards
    w.write(formats.blocks_table(blocks))
    w.close()
    arrowio.write_dataset_dict(tmp_path / "d", ["train"])
    names = sorted(p.name for p in (tmp_path / "d" / "train").iterdir())
    assert names == [f"data-0000{i}-of-00003.arrow" for i in range(3)] + ["dataset_info.json", "state.json"]
    got = load_from_disk(str(tmp_path / "d"))["train"]
    assert got["input_ids"] == blocks.tolist() and got["labels"] == blocks.tolist()


def test_prepare_text_gives_the_blocks_and_stats_of_packing_the_split_in_order(tmp_path):
    """The whole stage on a small corpus: the blocks are pack_text over the documents in the order
    the shuffled split had before (a list), validation likewise; the stats count them."""
    import random

    from conftest import sentences, tiny_config_dict, write_config
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from llmctl.config import load_config
    from llmctl.data.formats import pack_text
    from llmctl.rundir import RunDir
    from llmctl.stages import prepare

    docs = [" ".join(sentences(random.Random(i).randint(1, 6), seed=i)) for i in range(120)]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", data={"paths": [str(f)], "validation_fraction": 0.1, "block_size": 16})))
    prepare.run(cfg, RunDir(cfg.run.dir))
    rd = RunDir(cfg.run.dir)
    tok = AutoTokenizer.from_pretrained(rd.tokenizer_dir)
    out = load_from_disk(str(rd.dataset_dir))
    stats = json.loads(rd.stats_path.read_text())
    for name, order in zip(("validation", "train"), _old_split_order(len(docs), cfg.run.seed, 12)):
        s = {"documents": 0, "bytes": 0, "tokens": 0, "kept_tokens": 0, "dropped_tokens": 0}
        want = [r["input_ids"] for r in pack_text([docs[i] for i in order], tok, 16, tok.eos_token_id, s)]
        assert out[name]["input_ids"] == want and out[name]["labels"] == want, name
        st = stats["splits"][name]
        assert (st["documents"], st["tokens"], st["blocks"], st["dropped_tail_tokens"], st["bytes"]) == (
            s["documents"], s["tokens"], len(want), s["dropped_tokens"], s["bytes"])
    assert out["train"].features["input_ids"].feature.dtype == "int32" and out["train"].features["labels"].feature.dtype == "int64"


# --------------------------------------------------------------------------- curation, bounded (#30)
def _resident_mb(root) -> float:
    """This process's resident pages (MB) of the mapped files under `root` (/proc/self/smaps)."""
    root, kb, mine = str(root), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split(None, 5)
                mine = len(parts) == 6 and parts[5].startswith(root)
            elif head == "Rss:" and mine:
                kb += int(line.split()[1])
    return kb / 1024


def _peak_resident_mb(fn, root) -> float:
    """The most of the files under `root` this process held resident while `fn` ran (sampled), and after."""
    return _peak_while(fn, lambda: _resident_mb(root), 0.003)


def _dup_docs(tmp_path, n: int = 6000):
    """n distinct ~2 KB documents, then a copy of every 4th and a near copy (one word more) of every
    4th other, shuffled into train/validation as prepare splits them; the config."""
    import random

    from conftest import tiny_config_dict, write_config

    from llmctl.config import load_config
    from llmctl.data.split import seeded_split
    from llmctl.stages import prepare

    rng = random.Random(0)
    base = [f"{i} " + "".join(rng.choices("abcdefghij klmnop", k=2000)) for i in range(n)]
    docs = base + base[::4] + ["zq " + t for t in base[2::4]]
    ds = prepare._to_arrow(({"text": t, "_id": f"d:{i}"} for i, t in enumerate(docs)), tmp_path / "build" / "cache" / "raw.arrow")
    cur = {"enabled": True, "language": False, "quality": {"enabled": False}, "pii": {"action": "off"}}
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", data={"validation_fraction": 0.05, "curate": cur})))
    return seeded_split(ds, cfg), cfg


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux")
def test_curation_leaves_no_page_of_its_files_resident(tmp_path):
    """Curation's files (the documents, the annotated split: ~20 MB here) are read through mappings
    whose pages count in RSS: annotating left the annotated file's pages resident (the headers of its
    64-row record batches, read when it opened: measured ~240 MB of a 256 MB corpus's), as did
    the kept-documents filter (`_drop` read through the mapping), the near-duplicate checks (each
    candidate read at random through the mapping) and the token count of the removed documents
    (`select` of them, read at random: the whole file here). Now they are read in place (pread) or
    their pages dropped."""
    from llmctl.data import curate

    splits, cfg = _dup_docs(tmp_path)
    cache = tmp_path / "build" / "cache"
    p = curate.plan(cfg.data)
    assert p.exact_dedup and p.near_dedup and not p.quality
    annotated = {}
    during_annotate = _peak_resident_mb(lambda: annotated.update(
        {name: curate._annotate(name, splits[name], "text", p, 0, 1, cache) for name in ("train", "validation")}), cache)
    size = (cache / "curate-train.arrow").stat().st_size / 2**20
    after_annotate = _resident_mb(cache)
    assert size > 18 and after_annotate < 2, (after_annotate, size)  # before: 10-20 MB
    # the documents read in place, 1000 a call: not through map's mapping (~250 KB a document), and
    # 1000-row record batches whose headers, read when the output opens, map 64 KB each
    assert during_annotate < 6, during_annotate  # before: ~25 MB (the input's pages, 140 headers)
    ids = curate._DocIds(annotated)
    dedup = curate._Dedup(annotated, "text", p, ids, cache / "dedup-index")
    reasons = {}
    during_dedup = _peak_resident_mb(lambda: reasons.update({n: dedup.split(n, annotated[n]) for n in annotated}), cache)
    dedup.close()
    assert during_dedup < 6, during_dedup  # one Arrow batch's columns; before: the candidates' pages too
    tally = curate._Tally()
    kept = {n: curate._split_report(n, annotated[n], reasons[n], p, ids, tally, cache)[0] for n in annotated}
    removed = sum(tally.removed_n["train"].values())
    assert tally.removed_n["train"]["exact_dedup"] > 1000 and tally.removed_n["train"]["near_dedup"] > 1000
    assert len(kept["train"]) == len(splits["train"]) - removed
    assert _resident_mb(cache) < 2

    # the tokens of the removed documents: read in place, not through a `select`'s mapping
    report = {"splits": {n: {"steps": []} for n in annotated}, "_annotated": annotated, "_reasons": reasons}

    class Tok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[0] * (len(t) // 4) for t in texts]}

    during_tokens = _peak_resident_mb(lambda: curate.add_tokens(report, Tok(), "text", {"train": 1, "validation": 1}), cache)
    assert report["splits"]["train"]["tokens_before"] > 1 + 1000 * 500
    assert during_tokens < 4, during_tokens


def test_select_to_file_and_row_reader_give_the_dataset_rows(tmp_path):
    """arrowio.select_to_file is `select` with its indices on disk; with_indices is `select`;
    RowReader reads the rows `ds[i]` gives (in place for strings, through the mapping for the rest)."""
    import numpy as np
    from datasets import Dataset

    from llmctl.data import arrowio

    ds, cfg = _raw_docs(tmp_path, 500, size=40)
    ds = ds.map(lambda r: {"n": len(r["text"]), "msgs": [{"role": "user", "content": r["text"][:5]}]},
                cache_file_name=str(tmp_path / "m.arrow"))
    rows = np.array([3, 4, 77, 200, 499])
    sel = arrowio.select_to_file(ds, iter([rows[:2], rows[2:]]), tmp_path / "sel.arrow", "fp")
    assert sel.to_list() == ds.select(rows.tolist()).to_list() and sel.cache_files[-1]["filename"].endswith("sel.arrow")
    twice = arrowio.select_to_file(sel, iter([np.array([4, 0])]), tmp_path / "sel2.arrow", "fp2")  # through sel's indices
    assert twice.to_list() == ds.select([499, 3]).to_list()
    assert arrowio.with_indices(sel, [1, 2]).to_list() == ds.select([4, 77]).to_list()
    for d in (ds, sel, Dataset.from_list(ds.to_list())):
        r = arrowio.RowReader(d, ["msgs", "text", "n"], release_every=2)
        assert [r[i] for i in range(len(d))] == [{k: row[k] for k in ("msgs", "text", "n")} for row in d]
        r.close()


def test_a_spilled_index_lookup_keeps_only_the_records_it_found():
    """Each key found on disk is read in a window of 2 x FENCE records (12 KB); the found records
    kept views of their windows until the lookup returned: 10,000 near duplicates in one Arrow
    batch (25 bands each) held 120 MB. Now 24 bytes a record."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from llmctl.data import spill

    with tempfile.TemporaryDirectory() as d:
        store = spill.KeyRuns(Path(d), "t", 1 << 16)
        keys = np.random.default_rng(0).integers(0, 2**63, size=200_000, dtype=np.uint64)
        store.add(keys, np.arange(len(keys), dtype=np.uint64), keys)
        needles = keys[::40]  # 5,000 keys, each found once
        tracemalloc.start()
        try:
            q, a, b = store.lookup(needles)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        store.close()
    assert len(q) == len(needles) and (b == needles[q]).all()
    assert peak < 4 << 20, peak  # before: 5,000 windows of 12 KB (60 MB)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux")
def test_preference_pairs_are_written_without_a_copy_or_the_split_resident(tmp_path):
    """Preference pairs were copied in the split's order (flatten_indices: a cache file as large as
    the split, read through the mapping in a random order) and saved by save_to_disk reading the
    copy through its mapping: the split (here ~35 MB) was resident twice over, and on disk twice. Now they are
    read in place a batch at a time and written into the dataset folder; load_from_disk reads it."""
    import random

    from conftest import tiny_config_dict, write_config
    from datasets import load_from_disk

    from llmctl.config import load_config
    from llmctl.data.split import seeded_split
    from llmctl.stages import prepare

    class Tok:
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [range(len(t) // 2) for t in texts]}

    rng = random.Random(0)
    rows = ({"prompt": f"{i} " + "".join(rng.choices("abcdefgh ", k=1500)), "chosen": "".join(rng.choices("ijkl ", k=1500)),
             "rejected": "".join(rng.choices("mnop ", k=1500)), "_id": f"d:{i}"} for i in range(8000))
    build = tmp_path / "build"
    ds = prepare._to_arrow(rows, build / "cache" / "raw.arrow")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", data={"format": "preference", "validation_fraction": 0.1},
                                                                         train={"method": "dpo"})))
    splits = seeded_split(ds, cfg)
    stats = {"splits": {}}
    con = type("Con", (), {"progress": lambda self, *a, **k: _Ctx(), "warn": lambda self, m: None, "info": lambda self, m: None})()
    grew = _peak_resident_mb(lambda: prepare._tokenize(cfg, splits, Tok(), build, con, stats), build)
    raw_mb = (build / "cache" / "raw.arrow").stat().st_size / 2**20
    copies = [f for f in build.rglob("*.arrow") if "dataset" not in f.parts and f.name != "raw.arrow"]
    assert raw_mb > 30 and grew < 8 and not copies, (grew, raw_mb, copies)  # before: 69 MB, and a cache file per split
    out = load_from_disk(str(build / "dataset"))
    assert list(out) == ["train", "validation"] and len(out["train"]) == stats["splits"]["train"]["examples"] == len(splits["train"])
    i = 17
    assert out["train"][i] == {k: splits["train"][i][k] for k in ("prompt", "chosen", "rejected")}
    assert stats["splits"]["train"]["tokens"] == sum(len(r[k]) // 2 for r in splits["train"] for k in ("prompt", "chosen", "rejected"))


def test_merging_spilled_runs_holds_a_few_chunks_not_the_runs(tmp_path, monkeypatch):
    """Merging two runs on disk reads and writes them MERGE_CHUNK records at a time; each merged
    chunk's every FENCE-th key was kept as a view, which kept the whole chunk alive until the merge
    ended: the merged run was in memory (curated prepare of 1 GB: +200 MB merging 8.4 million band
    keys, more at each doubling). Here 2 x 100,000 records (4.8 MB) merged 2,048 at a time."""
    import numpy as np

    from llmctl.data import spill

    monkeypatch.setattr(spill, "MERGE_CHUNK", 2048)
    store = spill.KeyRuns(tmp_path, "t", 1 << 16)
    rng = np.random.default_rng(0)
    keys = [rng.integers(0, 2**63, size=n, dtype=np.uint64) for n in (120_000, 50_000)]
    for k in keys:
        store.add(k, k, k)
    assert [r.n for r in store.runs] == [120_000, 50_000]  # not merged yet (the first is over twice the second)
    tracemalloc.start()
    try:
        run = store._merge(*store.runs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    store.runs = [run]
    allk = np.concatenate(keys)
    q, a, b = store.lookup(allk[::997])
    store.close()
    assert run.n == 170_000 and (a == allk[::997][q]).all() and len(q) == len(allk[::997])
    assert peak < 1 << 20, peak  # before: 4.1 MB (every merged chunk)


def test_a_bloom_filter_takes_keys_a_chunk_at_a_time():
    """A spill adds a million band keys to the Bloom filter: their bit positions (4 a key), sorted,
    shifted and masked, were ~7 arrays of 32 MB at once. Now BLOOM_CHUNK keys at a time."""
    import numpy as np

    from llmctl.data import spill

    bloom = spill.Bloom(1 << 20)
    keys = np.random.default_rng(1).integers(0, 2**63, size=400_000, dtype=np.uint64)
    tracemalloc.start()
    try:
        bloom.add(keys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bloom.maybe(keys).all()
    assert peak < 16 << 20, peak  # before: ~51 MB (400,000 x 4 positions, several copies)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux")
def test_encoding_pairs_maps_none_of_the_split(tmp_path):
    """Prompt/completion pairs were copied (flatten_indices), encoded into a cache file, its columns
    summed and filtered through the mapping, and the kept rows saved by save_to_disk reading them
    through the mapping: the encoded split (here ~44 MB) was resident. Now it is read a batch at a
    time, its pages dropped, the kept rows written into the dataset folder; load_from_disk reads it."""
    import random

    from conftest import tiny_config_dict, write_config
    from datasets import load_from_disk

    from llmctl.config import load_config
    from llmctl.stages import prepare

    rng = random.Random(0)
    # ~512 tokens a pair (_FakeTok: 2 characters a token); a quarter of the prompts cut, a quarter of
    # the completions too long for a block (dropped)
    rows = ({"prompt": f"{i} " + "".join(rng.choices("abcdefgh ", k=rng.choice([500, 500, 500, 1800]))),
             "completion": "".join(rng.choices("ijklmn ", k=rng.choice([500, 500, 500, 2200]))), "_id": f"d:{i}"} for i in range(8000))
    build = tmp_path / "build"
    ds = prepare._to_arrow(rows, build / "cache" / "raw.arrow")
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "run", data={"format": "prompt_completion", "block_size": 1024},
                                                                         model={"context_length": 1024})))
    stats = {"splits": {}}
    con = type("Con", (), {"progress": lambda self, *a, **k: _Ctx(), "warn": lambda self, m: None, "info": lambda self, m: None})()
    grew = _peak_resident_mb(lambda: prepare._tokenize(cfg, {"train": ds}, _FakeTok(), build, con, stats), build)
    tr = stats["splits"]["train"]
    encoded_mb = (build / "cache" / "train.arrow").stat().st_size / 2**20
    assert encoded_mb > 40 and grew < 16, (grew, encoded_mb)  # before: the encoded split (and a copy of the documents)
    assert 1500 < tr["dropped_records"] < 2500 and 1000 < tr["truncated_records"] < 2000
    out = load_from_disk(str(build / "dataset"))
    assert list(out) == ["train"] and len(out["train"]) == tr["examples"] == 8000 - tr["dropped_records"]
    assert out["train"][0]["labels"][:3] == [-100] * 3 and len(out["train"][0]["input_ids"]) == len(out["train"][0]["labels"])
