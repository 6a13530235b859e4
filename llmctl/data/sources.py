"""Where documents come from: local files, the Hugging Face hub, or the builtin corpus.

Each source yields plain dict records. Readers of local files are our own so that errors
name the file and line; the hub goes through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterator

from llmctl.errors import ConfigError, DataError

SUPPORTED = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# Parts of the stdlib tree that are not the standard library's own code, or are tests.
_BUILTIN_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Counters:
    """Records dropped on the way in (data.on_error: skip)."""

    skipped: int = 0
    reasons: dict = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def expand_paths(patterns: list[str], key: str = "data.paths", any_suffix: bool = False) -> list[Path]:
    """Files, globs and directories -> a sorted, de-duplicated list of supported files.

    With `any_suffix`, files named explicitly or by a glob may have any suffix (read as
    plain text); directories still contribute only supported files.
    """
    out: list[Path] = []
    for pat in patterns:
        p = Path(os.path.expanduser(pat))
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED)
            if not found:
                raise DataError(f"{key}: directory '{pat}' has no {', '.join(SUPPORTED)} files")
            out += found
        elif any(c in pat for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(os.path.expanduser(pat), recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(f"{key}: '{pat}' matches no file")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{key}: '{pat}' not found (check the path; it is relative to the working directory)")
    for f in out:
        if f.suffix.lower() not in SUPPORTED and not any_suffix:
            raise DataError(f"{f}: unsupported file type '{f.suffix}': use one of {', '.join(SUPPORTED)}")
    seen, uniq = set(), []
    for f in out:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            uniq.append(f)
    return uniq


def fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode(raw: bytes, path: Path, on_error: str, counters: Counters) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        if on_error == "skip":
            counters.skip("invalid_utf8")
            return None
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}: convert the file to UTF-8 or set data.on_error: skip") from None


def _first_bad_utf8(path: Path) -> tuple[int, int] | None:
    """(line, byte offset) of the first invalid UTF-8 in a file, read line by line; None if it decodes."""
    offset = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return i, offset + e.start
            offset += len(raw)
    return None


def _text_lines(path: Path) -> Iterator[str]:
    """A text file's lines as `str.splitlines` gives them, read a line at a time: memory holds one
    line, not the file (a corpus may be larger than memory). A byte 0x0A is never inside a UTF-8
    sequence and `\r\n` never straddles two pieces, so decoding piece by piece is exact."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                yield from raw.decode("utf-8").splitlines()
            except UnicodeDecodeError:
                line, byte = _first_bad_utf8(path)
                raise DataError(f"{path}:{line}: invalid UTF-8 at byte {byte}: convert the file to UTF-8 or set data.on_error: skip") from None


def read_file(path: Path, txt_unit: str, on_error: str, counters: Counters) -> Iterator[tuple[dict, str]]:
    """Yield (record, where) for one file; `where` is 'file:line' for messages."""
    suffix = path.suffix.lower()
    if suffix == ".txt" and txt_unit == "file":
        text = _decode(path.read_bytes(), path, on_error, counters)
        if text is not None:
            yield {"text": text}, str(path)
    elif suffix == ".txt":
        if on_error == "skip" and _first_bad_utf8(path) is not None:
            counters.skip("invalid_utf8")  # the whole file, as a file that does not decode
            return
        if txt_unit == "line":
            for i, line in enumerate(_text_lines(path), 1):
                if line.strip():
                    yield {"text": line}, f"{path}:{i}"
        else:  # paragraphs: blocks separated by blank lines
            buf: list[str] = []
            start = 1
            for i, line in enumerate(chain(_text_lines(path), [""]), 1):
                if line.strip():
                    if not buf:
                        start = i
                    buf.append(line)
                elif buf:
                    yield {"text": "\n".join(buf)}, f"{path}:{start}"
                    buf = []
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                line = _decode(raw, path, on_error, counters) if raw.strip() else ""
                if line is None or not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    if on_error == "skip":
                        counters.skip("malformed_json")
                        continue
                    raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}): fix the line or set data.on_error: skip") from None
                if not isinstance(rec, dict):
                    if on_error == "skip":
                        counters.skip("not_an_object")
                        continue
                    raise DataError(f"{path}:{i}: expected a JSON object per line, got {type(rec).__name__}")
                yield rec, f"{path}:{i}"
    elif suffix == ".json":
        text = _decode(path.read_bytes(), path, on_error, counters)
        if text is None:
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                if on_error == "skip":
                    counters.skip("not_an_object")
                    continue
                raise DataError(f"{path}: item {i} is {type(rec).__name__}, expected an object")
            yield rec, f"{path}[{i}]"
    elif suffix == ".csv":
        text = _decode(path.read_bytes(), path, on_error, counters)
        if text is None:
            return
        yield from _read_csv(text, path, on_error, counters)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        row = 0
        for batch in table.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                row += 1
                yield rec, f"{path}[row {row}]"


def _read_csv(text: str, path: Path, on_error: str, counters: Counters) -> Iterator[tuple[dict, str]]:
    """Records of a CSV file, parsed by the csv module on the whole text: a quoted field keeps
    its newlines. `where` is the line the record starts on."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV header ({e})") from None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if on_error == "skip":
                counters.skip("malformed_csv")
                continue
            raise DataError(f"{path}:{start}: malformed CSV ({e}): fix the record or set data.on_error: skip") from None
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            if on_error == "skip":
                counters.skip("malformed_csv")
                continue
            raise DataError(f"{path}:{start}: {len(row)} fields where the header has {len(header)}: quote fields that hold commas, or set data.on_error: skip")
        yield dict(zip(header, row)), f"{path}:{start}"


def read_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(text, where) per document of a file, each exactly as written.

    Structured files (.jsonl, .json, .csv, .parquet) give one document per record's `text`
    field; any other file is one document: its whole text, blank lines and all.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".csv", ".parquet"):
        for rec, where in read_file(path, "file", "error", Counters()):
            text = rec.get("text")
            if not isinstance(text, str):
                raise DataError(f"{where}: no 'text' field to score")
            yield text, where
    else:
        yield _decode(path.read_bytes(), path, "error", Counters()), str(path)


def iter_files(files: list[Path], txt_unit: str, on_error: str, counters: Counters) -> Iterator[tuple[dict, str]]:
    for f in files:
        yield from read_file(f, txt_unit, on_error, counters)


def iter_hub(name: str, config: str | None, split: str, cache_dir: str | None = None, token_env: str = "HF_TOKEN") -> Iterator[tuple[dict, str]]:
    """A Hugging Face dataset by name (or a local dataset folder, through the same call)."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, config, split=split, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise DataError(f"data.hub_name: cannot load dataset '{name}' (config {config}, split {split}){offline}: {first}") from None
    except Exception as e:  # datasets raises many types for a bad name/config/split
        if type(e).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError", "HfHubHTTPError", "OfflineModeIsEnabled"):
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"data.hub_name: cannot load dataset '{name}': {first}") from None
        raise
    for i, rec in enumerate(ds):
        yield rec, f"{name}[{split}][{i}]"


# --------------------------------------------------------------------------- builtin
def builtin_files(seed: int, max_bytes: int | None) -> list[Path]:
    """The Python standard library's own .py files (no tests, no site-packages).

    A seeded shuffle before the byte cap keeps a capped corpus diverse.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        f for f in root.rglob("*.py")
        if not (_BUILTIN_SKIP & set(f.relative_to(root).parts[:-1])) and f.is_file()
    )
    if not files:
        raise DataError(f"builtin corpus: no .py files under {root} (is this a full Python install?)")
    random.Random(seed).shuffle(files)
    if max_bytes:
        out, total = [], 0
        for f in files:
            if total >= max_bytes:
                break
            out.append(f)
            total += f.stat().st_size
        files = out
    return files


def builtin_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def builtin_fingerprint(files: list[Path]) -> str:
    return hashlib.sha256((sys.version + fingerprint(files)).encode()).hexdigest()[:16]


def iter_builtin(files: list[Path], counters: Counters) -> Iterator[tuple[dict, str]]:
    root = builtin_root()
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            counters.skip("invalid_utf8")
            continue
        if text.strip():
            yield {"text": text, "path": str(f.relative_to(root))}, str(f)


def check_field(rec: dict, name: str, key: str, where: str) -> None:
    if name not in rec:
        fields = ", ".join(sorted(map(str, rec))) or "none"
        raise DataError(f"{where}: record has no field '{name}' (fields: {fields}): set {key} to the right field")


def require_config(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
