"""Data larger than memory (issue #30): .txt sources stream a line at a time, giving the documents
the whole-file reading gave, with the same errors."""

from __future__ import annotations

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
