"""prepare's image_text path: rows -> checked images -> deduplicated -> split (leakage checked
on the images) -> processor -> encoded rows in RUN/prepare/dataset, held-out pairs with their
images in RUN/prepare/pairs, and the counts in stats.json and report.json.

Rows are `{image: path relative to the data file, caption, question?}` (names in data.image);
the builtin source draws synthetic shape scenes (llmctl.vision.shapes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

from llmctl.data.split import seeded_split
from llmctl.errors import DataError
from llmctl.vision import images as _img

SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------- rows
def _data_file(where: str) -> Path:
    """The data file of a 'file:line' location."""
    head, _, tail = where.rpartition(":")
    return Path(head if head and tail.isdigit() else where)


def read_rows(recs, cfg, counters) -> Iterator[dict]:
    """Checked rows {raw, img, caption, question, _id} from file records; bad ones raise
    'file:line: why: fix' (exit 2) or are counted with data.on_error: skip."""
    d, im = cfg.data, cfg.data.image
    for rec, where in recs:
        try:
            if d.messages_field in rec and im.field not in rec:  # a chat row with an image part
                rec = chat_row(rec, d.messages_field, where, im)
            for field, key in ((im.field, "data.image.field"), (im.caption_field, "data.image.caption_field")):
                if field not in rec:
                    raise DataError(f"{where}: record has no field '{field}' (fields: {', '.join(sorted(rec)) or 'none'}): set {key} to the right field")
            path, cap = rec[im.field], rec[im.caption_field]
            if not isinstance(path, str) or not path.strip() or not isinstance(cap, str) or not cap.strip():
                raise DataError(f"{where}: '{im.field}' must be an image path and '{im.caption_field}' a non-empty caption")
            q = rec.get(im.question_field)
            if q is not None and not isinstance(q, str):
                raise DataError(f"{where}: '{im.question_field}' must be text")
            full = Path(path) if Path(path).is_absolute() else _data_file(where).parent / path
            raw, img = _img.load_checked(full, where, im.max_bytes, im.max_pixels)
        except DataError:
            if d.on_error == "skip":
                counters.skip("bad_image_or_record")
                continue
            raise
        yield {"raw": raw, "img": img, "caption": cap.strip(), "question": (q or im.prompt).strip(), "_id": where}


def chat_row(rec: dict, field: str, where: str, im) -> dict:
    """{image, caption, question} of a chat row: a user turn whose content holds one
    `{"type": "image", "path"|"image": PATH}` part (and text parts: the question), then the
    assistant's answer (the caption)."""
    msgs = rec[field]
    if not (isinstance(msgs, list) and len(msgs) >= 2 and all(isinstance(m, dict) for m in msgs)
            and msgs[-1].get("role") == "assistant" and msgs[-2].get("role") == "user"):
        raise DataError(f"{where}: '{field}' must end with a user turn (holding the image) and the assistant's answer")
    content = msgs[-2].get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": str(content)}]
    paths = [p.get("path") or p.get("image") for p in parts if isinstance(p, dict) and p.get("type") == "image"]
    if len(paths) != 1 or not isinstance(paths[0], str):
        raise DataError(f"{where}: the user turn must hold exactly one {{\"type\": \"image\", \"path\": ...}} part (it has {len(paths)})")
    text = " ".join(str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") == "text").strip()
    answer = msgs[-1].get("content")
    return {im.field: paths[0], im.caption_field: answer if isinstance(answer, str) else "", **({im.question_field: text} if text else {})}


def builtin_rows(cfg) -> tuple[list[dict], list[dict]]:
    """(seen rows, held-out-pairing rows) of the synthetic shapes dataset."""
    from llmctl.vision import shapes

    seen, held = [], []
    for i, (rec, split) in enumerate(shapes.scenes(cfg.data.image.builtin_images, cfg.run.seed, cfg.model.vision.image_size,
                                                   cfg.data.test_fraction)):
        row = {"raw": rec["image"], "img": _img.open_rgb(rec["image"]), "caption": rec["caption"],
               "question": cfg.data.image.prompt, "_id": f"shapes#{i}"}
        (held if split == "test" else seen).append(row)
    return seen, held


def fingerprint(cfg, files: list[Path]) -> str:
    """The inputs' fingerprint: the data files and every image file they name (size, mtime)."""
    from llmctl.data.sources import Counters, iter_files

    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        for rec, where in iter_files([f], "line", "skip", Counters()):
            p = rec.get(cfg.data.image.field)
            if isinstance(p, str):
                full = Path(p) if Path(p).is_absolute() else _data_file(where).parent / p
                s = full.stat() if full.is_file() else None
                h.update(f"{full}|{s.st_size if s else -1}|{s.st_mtime_ns if s else -1}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- dedup, split, leakage
class Seen:
    """Content and perceptual hashes of kept images: exact and near duplicates."""

    def __init__(self, perceptual: bool, distance: int):
        self.exact: set[str] = set()
        self.phashes: list[int] = []
        self.perceptual = perceptual
        self.distance = distance

    def match(self, row: dict) -> str | None:
        """'exact' or 'near' if the row's image duplicates a kept one, else None."""
        if row["_sha"] in self.exact:
            return "exact"
        ph = row.get("_phash")
        if self.perceptual and ph is not None:
            if any(_img.hamming(ph, o) <= self.distance for o in self.phashes):
                return "near"
        return None

    def add(self, row: dict) -> None:
        self.exact.add(row["_sha"])
        if row.get("_phash") is not None:
            self.phashes.append(row["_phash"])


def hash_rows(rows: list[dict], perceptual: bool) -> None:
    for r in rows:
        r["_sha"] = _img.content_hash(r["img"])
        r["_phash"] = _img.perceptual_hash(r["img"]) if perceptual else None


def dedup(rows: list[dict], seen: Seen, drops: dict) -> list[dict]:
    """Rows whose image is not a duplicate of an earlier one, keeping the first."""
    out = []
    for r in rows:
        why = seen.match(r)
        if why:
            drops[f"{why}_duplicate_image"] = drops.get(f"{why}_duplicate_image", 0) + 1
            continue
        seen.add(r)
        out.append(r)
    return out


def split_rows(rows: list[dict], cfg) -> dict[str, list[dict]]:
    """A seeded shuffle into train/validation/test by data.validation_fraction and test_fraction."""
    return seeded_split(rows, cfg, "image row(s)")


def drop_leakage(splits: dict, drops: dict, perceptual: bool, distance: int) -> None:
    """Held-out rows whose image (exact, or near by pHash) is in the training split are dropped."""
    train = Seen(perceptual, distance)
    for r in splits["train"]:
        train.add(r)
    for name in ("validation", "test"):
        kept = []
        for r in splits.get(name, []):
            why = train.match(r)
            if why:
                key = f"{name}_{why}_leak"
                drops[key] = drops.get(key, 0) + 1
            else:
                kept.append(r)
        splits[name] = kept
