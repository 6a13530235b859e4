"""`llmctl prepare` for data.format=image_text (called by llmctl.stages.prepare)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmctl.errors import DataError
from llmctl.vision import data as _data
from llmctl.vision.data import SPLITS


def inputs(cfg, counters):
    """(a function giving {split: rows}, the inputs' fingerprint). Reading is deferred: the
    fingerprint alone decides whether prepare is up to date."""
    from llmctl.data import sources

    d = cfg.data
    if d.source == "builtin":
        from llmctl.vision import shapes

        fp = hashlib.sha256(Path(shapes.__file__).read_bytes()).hexdigest()[:16]
        return (lambda: _builtin_splits(cfg)), fp
    if d.source == "hub":
        raise DataError("data.format=image_text reads local files (data.source: files) or the builtin shapes (data.source: builtin); "
                        "hub image datasets are not supported yet: export the rows to JSONL with image files beside it")
    files = sources.expand_paths(d.paths)
    extra = {split: sources.expand_paths(paths, key=f"data.{split}_paths")
             for split, paths in (("validation", d.validation_paths), ("test", d.test_paths)) if paths}
    fp = _data.fingerprint(cfg, files + [f for fs in extra.values() for f in fs])

    def read():
        rows = list(_data.read_rows(sources.iter_files(files, "line", d.on_error, counters), cfg, counters))
        return rows, {s: list(_data.read_rows(sources.iter_files(fs, "line", d.on_error, counters), cfg, counters)) for s, fs in extra.items()}

    return read, fp


def _builtin_splits(cfg):
    seen, held = _data.builtin_rows(cfg)
    return seen, {"test": held} if held else {}


def splits_of(cfg, read, drops: dict, con) -> dict[str, list[dict]]:
    """Rows -> deduplicated (content hash, pHash) -> split -> leakage dropped."""
    im, cur = cfg.data.image, cfg.data.curate
    rows, extra = read()
    if not rows:
        raise DataError(f"the corpus is empty: no usable image_text rows in data ({cfg.data.source}): check data.paths and data.image's field names")
    perceptual = cur.enabled and im.perceptual_dedup
    for part in [rows, *extra.values()]:
        _data.hash_rows(part, perceptual)
    if perceptual and rows[0].get("_phash") is None:
        con.warn("data.image.perceptual_dedup: imagehash is not installed (pip install 'llmctl[vision]'): exact duplicates only")
    if cur.enabled and cur.exact_dedup:
        # Within each source; across the splits it is leakage (below), counted as such.
        rows = _data.dedup(rows, _data.Seen(perceptual, im.phash_distance), drops)
        extra = {k: _data.dedup(v, _data.Seen(perceptual, im.phash_distance), drops) for k, v in extra.items()}
    if cfg.data.source == "builtin":
        fraction = cfg.data.validation_fraction
        cfg_like = cfg.model_copy(update={"data": cfg.data.model_copy(update={"test_fraction": 0.0})})
        splits = _data.split_rows(rows, cfg_like) if fraction > 0 else {"train": rows, "validation": [], "test": []}
    else:
        splits = _data.split_rows(rows, cfg)
    splits.update(extra)
    if cur.enabled and cur.leakage:
        _data.drop_leakage(splits, drops, perceptual, im.phash_distance)
    if not splits["train"]:
        raise DataError("the train split has no image left after deduplication: see prepare/report.json")
    return splits


def processor_for(cfg, train_rows: list[dict], con):
    """The model's processor (tokenizer.name_or_path), or a new BPE + LlavaProcessor trained on the training captions."""
    from llmctl.vision.infer import has_processor, load_processor
    from llmctl.vision.model import new_processor

    name = cfg.tokenizer.name_or_path
    if name:
        if not has_processor(name):
            raise DataError(f"tokenizer.name_or_path: {name} has no image processor (processor_config.json / preprocessor_config.json): "
                            "point it at the image-text model's directory")
        con.step(f"loading processor {name}")
        try:
            return load_processor(name)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"tokenizer.name_or_path: cannot load the processor of {name}: {first}") from None
    from llmctl.tokenizer import train_tokenizer

    con.step(f"training a byte-level BPE tokenizer (vocab {cfg.tokenizer.vocab_size}) on the training captions")
    texts = [f"{r['question']}\n{r['caption']}" for r in train_rows]
    tok = train_tokenizer(texts, cfg, model_max_length=cfg.model.context_length)
    return new_processor(cfg, tok)


def encode_split(proc, rows: list[dict], block_size: int, drops: dict, name: str, prog=None) -> list[dict]:
    from llmctl.vision.infer import encode_example

    out = []
    for i, r in enumerate(rows):
        if prog is not None and i % 100 == 0:
            prog.update(completed=i)
        ex = encode_example(proc, r["question"], r["caption"], r["img"])
        if len(ex["input_ids"]) > block_size:
            drops[f"{name}_too_long"] = drops.get(f"{name}_too_long", 0) + 1
            continue
        out.append(ex)
    return out


def image_stats(rows: list[dict]) -> dict:
    if not rows:
        return {"images": 0}
    ws = [r["img"].size[0] for r in rows]
    hs = [r["img"].size[1] for r in rows]
    return {"images": len(rows), "width_min": min(ws), "width_max": max(ws), "height_min": min(hs), "height_max": max(hs),
            "bytes": sum(len(r["raw"]) for r in rows), "distinct_captions": len({r["caption"] for r in rows})}


def build(cfg, rd, read, counters, build_dir: Path, con) -> dict:
    """Everything prepare writes for image_text, under `build_dir`; the headline (with stats and report)."""
    from datasets import Dataset, DatasetDict

    drops: dict = {}
    # The model's own processor first: one it cannot load is refused before the images are read.
    proc = processor_for(cfg, [], con) if cfg.tokenizer.name_or_path else None
    splits = splits_of(cfg, read, drops, con)
    con.info("images: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items() if v))
    if proc is None:
        proc = processor_for(cfg, splits["train"], con)
    proc.save_pretrained(build_dir / "tokenizer")
    data, stats_splits = {}, {}
    for name in SPLITS:
        if not splits.get(name):
            continue
        with con.progress(f"processing {name}", total=len(splits[name]), unit="images") as prog:
            enc = encode_split(proc, splits[name], cfg.data.block_size, drops, name, prog)
            prog.update(completed=len(splits[name]))
        if not enc:
            raise DataError(f"the {name} split has no example that fits data.block_size={cfg.data.block_size}: raise it "
                            f"(the image alone takes {len(encode_split(proc, splits[name][:1], 1 << 30, {}, name)[0]['input_ids'])} tokens with its prompt)")
        data[name] = Dataset.from_list(enc)
        stats_splits[name] = {**image_stats(splits[name]), "examples": len(enc), "documents": len(enc),
                              "tokens": sum(len(e["input_ids"]) for e in enc),
                              "answer_tokens": sum(sum(1 for x in e["labels"] if x != -100) for e in enc)}
    DatasetDict(data).save_to_disk(str(build_dir / "dataset"))
    from llmctl.data.curate import summary_lines

    for line in summary_lines(_report(stats_splits, counters, drops)):
        con.info(line)
    pairs = {name: Dataset.from_dict({"prompt": [r["question"] for r in splits[name]], "reference": [r["caption"] for r in splits[name]],
                                       "image": [r["raw"] for r in splits[name]]})
             for name in ("validation", "test") if splits.get(name)}
    if pairs:
        DatasetDict(pairs).save_to_disk(str(build_dir / "pairs"))
    return _headline(cfg, proc, stats_splits, pairs, counters, drops)


def _report(stats_splits: dict, counters, drops: dict) -> dict:
    """prepare/report.json in the shape of the text curation report (llmctl.data.curate: `llmctl status`
    and prepare print it with the same code), plus the image counts and sizes."""
    def leaked(name: str) -> int:
        return drops.get(f"{name}_exact_leak", 0) + drops.get(f"{name}_near_leak", 0)

    splits = {}
    kept = sum(v["images"] + leaked(k) for k, v in stats_splits.items())
    dedup = [("exact dedup (content hash)", drops.get("exact_duplicate_image", 0)), ("near dedup (pHash)", drops.get("near_duplicate_image", 0))]
    splits["all (before the split)"] = {"documents_before": kept + sum(n for _, n in dedup), "documents_after": kept,
                                        "steps": [{"step": s, "removed": n} for s, n in dedup]}
    for name, v in stats_splits.items():
        steps = [("leakage (image in train)", leaked(name)), ("too long for data.block_size", drops.get(f"{name}_too_long", 0))]
        splits[name] = {"documents_before": v["images"] + leaked(name), "documents_after": v["examples"],
                        "steps": [{"step": s, "removed": n} for s, n in steps],
                        "images": v["images"], "sizes": {x: v[x] for x in v if x.startswith(("width", "height"))}}
    return {"content": "image", "format": "image_text", "splits": splits, "images": {k: v["images"] for k, v in stats_splits.items()},
            "dropped": drops, "bad_records_skipped": counters.reasons, "pii": {"action": "off", "by_kind": {}, "documents": 0}}


def _headline(cfg, proc, stats_splits: dict, pairs: dict, counters, drops: dict) -> dict:
    stats = {"format": "image_text", "source": cfg.data.source, "block_size": cfg.data.block_size, "vocab_size": len(proc.tokenizer),
             "skipped_records": counters.skipped, "skipped_reasons": counters.reasons, "splits": stats_splits,
             "pairs": {k: len(v) for k, v in pairs.items()}}
    report = _report(stats_splits, counters, drops)
    tr = stats_splits["train"]
    return {"documents": sum(s["examples"] for s in stats_splits.values()), "images": sum(s["images"] for s in stats_splits.values()),
            "train_tokens": tr["tokens"], "validation_tokens": stats_splits.get("validation", {}).get("tokens", 0),
            "vocab_size": len(proc.tokenizer), "bytes_per_token": round(tr["bytes"] / max(tr["tokens"], 1), 4),
            "skipped_records": counters.skipped, "pairs": sum(stats["pairs"].values()), "curated_out": sum(drops.values()),
            "stats": stats, "report": report}
