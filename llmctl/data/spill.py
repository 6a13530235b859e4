"""On-disk indexes with bounded memory, for curation's dedup index (llmctl.data.curate) when the
corpus is larger than memory.

`KeyRuns` is a multimap from uint64 keys to pairs of uint64 values, written in batches (a flush
of curation's in-memory index) and looked up in batches (the documents of one Arrow batch):
- each flush becomes a run: a flat file of 24-byte records sorted by key; runs are merged as
  they come (a binary counter: a run is merged into the one before it while that one is less
  than twice its size), so there are O(log n) of them and each record is rewritten O(log n) times;
  merges read and write fixed-size chunks, never a whole run;
- a Bloom filter of fixed size answers most lookups of absent keys (nearly all of them: a
  document rarely shares an LSH band or an exact key with another) without reading a file;
- each run keeps every FENCE-th key in memory (8 bytes per FENCE records: 1/768 of its size on
  disk), so a lookup reads one window of records with `os.pread`. Files are read, never
  memory-mapped: the pages sit in the kernel's cache, not in the process.

`RecordLog` holds fixed-size records by their position (append, then read one by one).

Keys are hashes (uniform bits): the Bloom filter's positions are bit slices of a multiply.
Nothing here knows what the keys mean; the caller checks that a found record is the one it
asked for (the values carry what the key alone does not say).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REC = np.dtype([("k", "<u8"), ("a", "<u8"), ("b", "<u8")])
FENCE = 256  # records per block: one lookup reads at most two blocks (12 KB) per run
MERGE_CHUNK = 1 << 18  # records per chunk read while merging runs (6 MB)
BLOOM_CHUNK = 1 << 16  # keys added to a Bloom filter at a time (2 MB of bit positions)
# odd 64-bit multipliers: four independent bit positions of a key in the Bloom filter
_PROBES = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64)


class Bloom:
    """A Bloom filter over uint64 hash keys: `nbytes` (at most 512 MB), 4 probes."""

    def __init__(self, nbytes: int):
        self.nbits = min(max(int(nbytes), 8), 1 << 29) * 8
        self.bits = np.zeros(self.nbits // 8, dtype=np.uint8)

    def _positions(self, keys):
        """Bit positions: the top 32 bits of key x probe, scaled to [0, nbits) (multiply-shift)."""
        with np.errstate(over="ignore"):
            h = (keys.astype(np.uint64)[:, None] * _PROBES[None, :]) >> np.uint64(32)
            return (h * np.uint64(self.nbits)) >> np.uint64(32)

    def add(self, keys) -> None:
        # BLOOM_CHUNK keys at a time: a spill's million band keys at once made ~7 temporaries of 32 MB
        for start in range(0, len(keys), BLOOM_CHUNK):
            pos = np.sort(self._positions(keys[start : start + BLOOM_CHUNK]).ravel())
            byte = pos >> np.uint64(3)
            first = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])  # the bits of one byte, or-ed together
            mask = np.bitwise_or.reduceat(np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8), first)
            self.bits[byte[first]] |= mask

    def maybe(self, keys):
        """A bool mask: False where the key is surely absent."""
        pos = self._positions(keys)
        return ((self.bits[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1).all(axis=1)


class _Run:
    def __init__(self, path: Path, n: int, fences):
        self.path, self.n, self.fences = path, n, fences
        self.fd = os.open(path, os.O_RDONLY)

    def read(self, start: int, count: int):
        count = max(0, min(count, self.n - start))
        return np.frombuffer(os.pread(self.fd, count * REC.itemsize, start * REC.itemsize), dtype=REC)

    def find(self, x: int):
        """The records whose key is x."""
        # fences[blk] < x <= fences[blk + 1]: the first record >= x lies in (blk*F, (blk+1)*F]
        blk = max(int(np.searchsorted(self.fences, np.uint64(x), "left")) - 1, 0)
        start, out = blk * FENCE, []
        while start < self.n:
            recs = self.read(start, 2 * FENCE)
            lo, hi = np.searchsorted(recs["k"], np.uint64(x), "left"), np.searchsorted(recs["k"], np.uint64(x), "right")
            out.append(recs[lo:hi].copy())  # a view would keep the whole window (12 KB) alive per record found
            if hi < len(recs):  # the equal keys end inside this window
                break
            start += len(recs)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def close(self, remove: bool = True) -> None:
        os.close(self.fd)
        if remove:
            self.path.unlink(missing_ok=True)


class KeyRuns:
    """uint64 key -> (a, b) records in sorted runs on disk, a Bloom filter in memory (see the module)."""

    def __init__(self, folder: Path, name: str, bloom_bytes: int):
        self.folder, self.name = Path(folder), name
        self.bloom = Bloom(bloom_bytes)
        self.runs: list[_Run] = []
        self.files = 0
        self.lookups = self.reads = 0

    def _path(self) -> Path:
        self.files += 1
        return self.folder / f"{self.name}-{self.files:06d}.bin"

    def add(self, k, a, b) -> None:
        """One batch of records (a flush): a new run, then merges."""
        if not len(k):
            return
        recs = np.empty(len(k), dtype=REC)
        recs["k"], recs["a"], recs["b"] = k, a, b
        self.add_records(recs)

    def add_records(self, recs) -> None:
        """`add`, of a REC array (which this sorts in place)."""
        if not len(recs):
            return
        order = np.argsort(recs["k"], kind="stable")
        for f in REC.names:  # a field at a time: one copy of a column, not of the records
            recs[f] = recs[f][order]
        del order
        self.bloom.add(recs["k"])
        path = self._path()
        with open(path, "wb") as f:
            f.write(memoryview(recs.view(np.uint8)))  # no bytes copy
        self.runs.append(_Run(path, len(recs), recs["k"][::FENCE].copy()))
        while len(self.runs) >= 2 and self.runs[-2].n < 2 * self.runs[-1].n:
            self.runs[-2:] = [self._merge(*self.runs[-2:])]

    def _merge(self, x: _Run, y: _Run) -> _Run:
        """Merge two runs chunk by chunk into a new one (memory: a few chunks)."""
        path, fences = self._path(), []
        i = j = written = 0
        with open(path, "wb") as f:
            while i < x.n or j < y.n:
                a, b = x.read(i, MERGE_CHUNK), y.read(j, MERGE_CHUNK)
                more_a, more_b = i + len(a) < x.n, j + len(b) < y.n
                # take everything up to the smaller last key of the chunks that do not end their run
                ends = [c["k"][-1] for c, more in ((a, more_a), (b, more_b)) if more and len(c)]
                if ends:
                    pivot = min(ends)
                    a = a[: np.searchsorted(a["k"], pivot, "right")]
                    b = b[: np.searchsorted(b["k"], pivot, "right")]
                m = np.concatenate([a, b])
                m = m[np.argsort(m["k"], kind="stable")]
                f.write(m.tobytes())
                # a copy: a view would keep the whole chunk alive until the merge ends (every
                # record of the merged run in memory: 200 MB merging 8.4 million band keys)
                fences.append(m["k"][(-written) % FENCE :: FENCE].copy())
                i, j, written = i + len(a), j + len(b), written + len(m)
        x.close()
        y.close()
        return _Run(path, written, np.concatenate(fences))

    def lookup(self, keys):
        """The stored records whose key equals keys[q], with q: (q, a, b) arrays."""
        keys = np.asarray(keys, dtype=np.uint64)
        maybe = np.flatnonzero(self.bloom.maybe(keys)) if len(keys) and self.runs else []
        qs, found = [], []
        self.lookups += len(keys)
        for q in maybe:
            for run in self.runs:
                self.reads += 1
                recs = run.find(int(keys[q]))
                if len(recs):
                    qs.append(np.full(len(recs), q, dtype=np.int64))
                    found.append(recs)
        if not found:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64)
        recs = np.concatenate(found)
        return np.concatenate(qs), recs["a"], recs["b"]

    def close(self) -> None:
        for run in self.runs:
            run.close()
        self.runs = []


class RecordLog:
    """Fixed-size numpy records by position: `append` a batch, `get` one (read with os.pread)."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), 0
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def append(self, recs) -> None:
        os.pwrite(self.fd, memoryview(np.ascontiguousarray(recs, dtype=self.dtype).view(np.uint8)), self.n * self.dtype.itemsize)
        self.n += len(recs)

    def get(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return np.frombuffer(os.pread(self.fd, self.dtype.itemsize, i * self.dtype.itemsize), dtype=self.dtype)[0]

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
