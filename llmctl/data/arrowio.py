"""Arrow files larger than memory without their pages in the process (issue #30).

A memory-mapped Arrow file's pages count in the process's resident memory once read, and stay
there until the mapping goes: reading a whole corpus through `datasets` leaves the whole corpus
resident (page cache the kernel could drop, but RSS all the same). Three rules keep prepare's
peak RSS flat as the corpus grows:

- what prepare writes for `train` is written straight into the dataset folder, in
  `Dataset.save_to_disk`'s layout (`SplitWriter`): no cache file mapped, then copied page by page;
- the documents, read in the split's shuffled order, are read in place with `os.pread` (`texts`):
  through the mapping each random read would leave ~200 KB resident (the kernel maps 64 KB around
  every page fault);
- what is still read through a mapping is read a batch at a time, its pages dropped after each
  batch (`batches`, `Releasing`): the page cache keeps them, the next read faults them back in.

The last two need Linux (/proc/self/maps, madvise); elsewhere `texts` reads through `batches`
and `release` does nothing.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Iterator

_MADV_DONTNEED = 4  # Linux: drop the range's pages from this process; a file mapping re-reads them
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise


def release(paths) -> int:
    """Drop this process's resident pages of the read-only mappings of `paths` (files); the bytes
    of mapping advised. A read-only file mapping holds nothing that is not in the file, so the
    next access reads the same bytes back (from the page cache, or the disk)."""
    if not sys.platform.startswith("linux"):
        return 0
    want = {os.path.realpath(p) for p in paths}
    if not want:
        return 0
    madvise, done = _madvise(), 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            # address perms offset dev inode path; a writable mapping may hold changes: never dropped
            if len(parts) < 6 or "w" in parts[1] or parts[5].rstrip("\n") not in want:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if madvise(start, end - start, _MADV_DONTNEED) == 0:
                done += end - start
    return done


def mapped_files(ds) -> list[str]:
    """The Arrow files a `datasets.Dataset` reads through a mapping (its data and indices)."""
    return [c["filename"] for c in getattr(ds, "cache_files", None) or []]


def batches(ds, batch_size: int = 1000, **kwargs) -> Iterator:
    """`ds.iter(batch_size)`, dropping the mapped pages of `ds`'s files after each batch: what is
    resident is what one batch touched, however large the files (read in order, about the batch;
    in a random order, up to ~200 KB a row). A batch in the default format is a copy; one in the
    arrow format may point into the mapping, which is still safe (read back on access)."""
    files = mapped_files(ds)
    for batch in ds.iter(batch_size=batch_size, **kwargs):
        yield batch
        release(files)


def texts(ds, column: str = "text", batch_size: int = 1000) -> Iterator[list[str]]:
    """One string column of `ds`, in its row order (through its indices), a list per batch.

    When `ds` reads memory-mapped Arrow files (as prepare's raw documents, curation's output and
    any `Dataset.from_file` do), the strings are read with `os.pread` at their place in the file:
    nothing is mapped, the page cache holds what was read. A random read through the mapping
    would leave ~200 KB resident per document (the kernel maps 64 KB around each page fault, and a
    document's offsets and bytes are two faults or more): a shuffled split's first 1000 documents
    would map 200 MB. Anything else (an in-memory table, a column cast or renamed) is read through
    `batches`."""
    col = _PreadColumn.open(ds, column)
    if col is None:
        for batch in batches(ds.select_columns([column]), batch_size=batch_size):
            yield batch[column]
        return
    import numpy as np

    idx = getattr(ds, "_indices", None)
    idx_files = mapped_files(ds) if idx is not None else []
    try:
        for start in range(0, len(ds), batch_size):
            stop = min(start + batch_size, len(ds))
            rows = idx.column(0).slice(start, stop - start).to_numpy().astype(np.int64) if idx is not None else np.arange(start, stop)
            yield col.read(rows)
            if idx_files:
                release(idx_files)  # an indices mapping on disk (curation's kept documents), read in order
    finally:
        col.close()


def with_indices(ds, rows):
    """`ds.select(rows)` for an integer array `rows`, without `select`'s Python list of them: the
    indices one uint64 Arrow array in memory (through `ds`'s own indices when it has them)."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    ids = pa.array(np.asarray(rows, dtype=np.uint64))
    if ds._indices is not None:
        ids = ds._indices.column(0).take(ids)
    return Dataset(ds.data, info=ds.info.copy(), split=ds.split, indices_table=InMemoryTable(pa.table({"indices": ids})),
                   fingerprint=ds._fingerprint)


def select_to_file(ds, chunks: Iterator, path, fingerprint: str):
    """`ds.select(rows)` for the rows of `chunks` (integer arrays, in order) with its indices mapping
    written to the Arrow file `path`, a chunk at a time, as `ds.filter` writes it: nothing of the
    rows is in memory but a chunk, and nothing of `ds` is read."""
    import numpy as np
    import pyarrow as pa
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    base = ds._indices.column(0) if ds._indices is not None else None
    with ArrowWriter(features=Features({"indices": Value("uint64")}), path=str(path), unit="indices") as w:
        for rows in chunks:
            ids = pa.array(np.asarray(rows, dtype=np.uint64))
            w.write_table(pa.table({"indices": base.take(ids) if base is not None else ids}))
        w.finalize()
    out = ds._new_dataset_with_indices(indices_cache_file_name=str(path), fingerprint=fingerprint)
    release([path])  # the headers read when it opened
    return out


class RowReader:
    """Single rows of some columns of `ds`, read at random (`reader[i]` -> {column: value}): each
    string column with `os.pread` (`_PreadColumn`), nothing mapped; any other column through the
    mapping, its pages dropped every `release_every` rows (each random read would leave ~200 KB
    resident). `close()` closes the files."""

    def __init__(self, ds, columns: list[str], release_every: int = 64):
        self.ds, self.columns, self.every, self.reads = ds, list(columns), release_every, 0
        self.pread = {c: p for c in self.columns if (p := _PreadColumn.open(ds, c)) is not None}
        others = [c for c in self.columns if c not in self.pread]
        self.mapped = ds.select_columns(others) if others else None
        self.files = mapped_files(ds)

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        row = {}
        if self.pread:
            j = int(self.ds._indices.column(0)[i].as_py()) if self.ds._indices is not None else int(i)
            for c, col in self.pread.items():
                row[c] = col.read(np.array([j], dtype=np.int64))[0]
        if self.mapped is not None:
            row.update(self.mapped[int(i)])
            self.reads += 1
            if self.reads % self.every == 0:
                release(self.files)
        return {c: row[c] for c in self.columns}

    def batch(self, positions) -> dict[str, list]:
        """The rows at `positions` (in order), {column: values}: strings read in place; any other
        column through the mapping, its pages dropped after."""
        import numpy as np
        import pyarrow as pa

        pos = np.asarray(positions, dtype=np.int64)
        out: dict[str, list] = {}
        if self.pread:
            idx = self.ds._indices
            rows = idx.column(0).take(pa.array(pos)).to_numpy().astype(np.int64) if idx is not None else pos
            for c, col in self.pread.items():
                out[c] = col.read(rows)
        if self.mapped is not None:
            out.update(with_indices(self.mapped, pos).to_dict())
            release(self.files)
        return {c: out[c] for c in self.columns}

    def close(self) -> None:
        for col in self.pread.values():
            col.close()
        self.pread = {}
        if self.mapped is not None:
            release(self.files)


def _maps() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of this process's read-only file mappings."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and "w" not in parts[1] and parts[5].startswith("/"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, int(parts[2], 16), parts[5].rstrip("\n")))
    return out


_KEEPS_COLUMNS = ("select", "drop", "replace_schema_metadata")


class _PreadColumn:
    """Where each string of one column lies in its Arrow files, found from the addresses of the
    mapped buffers (no page is touched), then read with pread. Per row in memory: its offset
    within its batch (4 bytes, 8 for large_string)."""

    def __init__(self):
        self.fds: list[int] = []
        self.row_starts: list[int] = []  # first global row of each file
        self.parts: list[tuple] = []  # per file: (batch row starts, batch data positions, offsets)

    @classmethod
    def open(cls, ds, column: str):
        if not sys.platform.startswith("linux"):
            return None
        try:
            from datasets.table import ConcatenationTable, MemoryMappedTable
        except ImportError:
            return None
        data = getattr(ds, "data", None)
        if isinstance(data, MemoryMappedTable):
            tables = [data]
        elif isinstance(data, ConcatenationTable) and all(len(row) == 1 and isinstance(row[0], MemoryMappedTable) for row in data.blocks):
            tables = [row[0] for row in data.blocks]
        else:
            return None
        # a table replays its transforms on the file when unpickled: with only column selections
        # (and metadata), the dataset's column `column` is the file's
        if any(op[0] not in _KEEPS_COLUMNS for t in tables for op in (t.replays or [])):
            return None
        col, maps, row = cls(), _maps(), 0
        try:
            for t in tables:
                if col._layout(t, column, maps) is None:
                    col.close()
                    return None
                col.row_starts.append(row)
                row += t.num_rows
        except OSError:
            col.close()
            return None
        if row != data.num_rows:
            col.close()
            return None
        return col

    def _layout(self, t, column: str, maps):
        import numpy as np
        import pyarrow as pa

        if column not in t.column_names:
            return None
        arr = t.table.column(column)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)) or arr.null_count:
            return None
        path = os.path.realpath(t.path)
        fd = os.open(path, os.O_RDONLY)
        self.fds.append(fd)
        width = 8 if pa.types.is_large_string(arr.type) else 4
        starts, data_pos, offsets, row = [], [], [], 0
        for chunk in arr.chunks:
            if chunk.offset:
                return None
            _, obuf, dbuf = chunk.buffers()
            opos = _file_offset(obuf.address, path, maps)
            dpos = _file_offset(dbuf.address, path, maps) if dbuf is not None and dbuf.size else 0
            if opos is None or dpos is None:
                return None
            raw = os.pread(fd, (len(chunk) + 1) * width, opos)
            offsets.append(np.frombuffer(raw, dtype=np.int64 if width == 8 else np.int32))
            starts.append(row)
            data_pos.append(dpos)
            row += len(chunk)
        if row != t.num_rows:
            return None
        self.parts.append((np.array(starts, dtype=np.int64), np.array(data_pos, dtype=np.int64),
                           np.concatenate(offsets) if offsets else np.zeros(0, dtype=np.int64)))
        return self.parts[-1]

    def read(self, rows) -> list[str]:
        import numpy as np

        f = np.searchsorted(self.row_starts, rows, side="right") - 1
        out: list[str] = [""] * len(rows)
        for i in np.unique(f):
            sel = np.nonzero(f == i)[0]
            local = rows[sel] - self.row_starts[i]
            bstarts, dpos, offs = self.parts[i]
            b = np.searchsorted(bstarts, local, side="right") - 1
            k = local + b  # each batch's offsets hold one more entry than its rows
            begin = dpos[b] + offs[k]
            length = offs[k + 1] - offs[k]
            fd = self.fds[i]
            for j, pos, n in zip(sel.tolist(), begin.tolist(), length.tolist()):
                out[j] = os.pread(fd, n, pos).decode("utf-8") if n else ""
        return out

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _file_offset(address: int, path: str, maps) -> int | None:
    for start, end, off, p in maps:
        if start <= address < end and p == path:
            return address - start + off
    return None


# --------------------------------------------------------------------------- writing
class SplitWriter:
    """One split of a `save_to_disk` folder, written as tables arrive: shards
    data-XXXXX-of-NNNNN.arrow through `datasets`' own ArrowWriter, then state.json and
    dataset_info.json. `datasets.load_from_disk` reads it as it reads save_to_disk's.

    Batches of 1000 rows (fewer for rows over 100 KB) and one shard up to 500 MB, as save_to_disk
    writes them: below that size the shard's bytes are the ones save_to_disk writes for the same
    rows. Above it, a new shard starts when one reaches 500 MB (save_to_disk divides the rows
    evenly, knowing their total first): the same rows in the same order. Nothing is kept but
    the current batch, and nothing is mapped."""

    def __init__(self, folder: Path, features):
        from datasets import config
        from datasets.utils.py_utils import convert_file_size_to_int

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.features = features
        self.rows = 0
        self.shard_bytes = convert_file_size_to_int(config.MAX_SHARD_SIZE)
        self._row_group = convert_file_size_to_int(config.MAX_ROW_GROUP_SIZE)
        self._batch_rows = None  # save_to_disk's writer_batch_size, from the first rows' size
        self._pending: list = []
        self._pending_rows = 0
        self._shards: list[Path] = []
        self._writer = None
        self._written = 0  # bytes in the current shard

    def write(self, table) -> None:
        if not table.num_rows:
            return
        if self._batch_rows is None:
            from datasets import config

            per_row = max(1, table.nbytes // table.num_rows)
            self._batch_rows = max(1, min(config.DEFAULT_MAX_BATCH_SIZE, self._row_group // per_row))
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self._batch_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        import pyarrow as pa

        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending)
        full = table.num_rows if final else table.num_rows // self._batch_rows * self._batch_rows
        for start in range(0, full, self._batch_rows):
            self._write_batch(table.slice(start, min(self._batch_rows, full - start)))
        rest = table.slice(full)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def _write_batch(self, batch) -> None:
        from datasets.arrow_writer import ArrowWriter

        if self._writer is not None and self._written >= self.shard_bytes:
            self._writer.finalize()
            self._writer.close()
            self._writer = None
        if self._writer is None:
            self._shards.append(self.folder / f".data-{len(self._shards):05d}.arrow.part")
            self._writer = ArrowWriter(features=self.features, path=str(self._shards[-1]), embed_local_files=True)
            self._written = 0
        self._writer.write_table(batch)
        self._written += batch.nbytes
        self.rows += batch.num_rows

    def close(self) -> int:
        """Write what is pending, name the shards, write state.json and dataset_info.json; the rows."""
        from datasets.arrow_writer import ArrowWriter
        from datasets.fingerprint import generate_random_fingerprint
        from datasets.info import DatasetInfo
        from datasets.utils.py_utils import asdict  # save_to_disk's: no None fields

        self._flush(final=True)
        if self._writer is None and not self._shards:  # no rows: one empty shard, as save_to_disk writes
            self._shards.append(self.folder / ".data-00000.arrow.part")
            self._writer = ArrowWriter(features=self.features, path=str(self._shards[-1]), embed_local_files=True)
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None
        n = len(self._shards)
        names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
        for part, name in zip(self._shards, names):
            os.replace(part, self.folder / name)
        # save_to_disk's state: a Dataset with no format, no split name; a fresh fingerprint, as
        # today's (it hashed the build folder's path and times)
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": generate_random_fingerprint(),
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        with open(self.folder / "state.json", "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        info = asdict(DatasetInfo(features=self.features))
        with open(self.folder / "dataset_info.json", "w", encoding="utf-8") as f:
            json.dump({k: info[k] for k in sorted(info)}, f, indent=2)
        return self.rows

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_dataset_dict(folder: Path, splits: list[str]) -> None:
    """dataset_dict.json of a `DatasetDict.save_to_disk` folder whose splits are written."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / "dataset_dict.json", "w", encoding="utf-8") as f:
        json.dump({"splits": list(splits)}, f)


class Releasing:
    """A batched `datasets.map` function that drops the mapped pages of `files` every `every`
    calls: `map` reads its input (a shuffled split of the corpus) through a mapping, in this
    process or in each worker, which maps the files itself."""

    def __init__(self, fn, files: list[str], every: int = 4):
        self.fn, self.files, self.every, self.calls = fn, list(files), every, 0

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls += 1
        if self.calls % self.every == 0:
            release(self.files)
        return out
