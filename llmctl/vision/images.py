"""Reading and checking images: one place decides what a bad image is, for prepare,
generate and serve. Hashes for deduplication and leakage: content (sha256 of the decoded
pixels) and perceptual (imagehash's pHash, where installed)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from llmctl.errors import DataError

FIX = "fix or remove the file, or set data.on_error: skip to drop such rows"


class BadImage(ValueError):
    """An image that cannot be used: the message says why (without where: callers add it)."""


def decode(raw: bytes, max_pixels: int):
    """The RGB PIL image in `raw`, fully decoded (a truncated file fails here, not later).
    BadImage for corrupt, truncated, empty or oversized (in pixels) images."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut file is an error, not a grey half
    if not raw:
        raise BadImage("the image file is empty")
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            w, h = probe.size
            if w * h > max_pixels:
                raise BadImage(f"the image is {w}x{h} = {w * h} pixels, more than data.image.max_pixels={max_pixels}")
            probe.load()
            return probe.convert("RGB")
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"the image is too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        what = "truncated" if "truncated" in str(e).lower() else "not a readable image"
        raise BadImage(f"the image is {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def read_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of an image file; BadImage when it is missing, not a file, or too big."""
    if not path.exists():
        raise BadImage(f"image file {path} does not exist")
    if not path.is_file():
        raise BadImage(f"image path {path} is not a file")
    size = path.stat().st_size
    if size > max_bytes:
        raise BadImage(f"image file {path} is {size} bytes, more than data.image.max_bytes={max_bytes}")
    return path.read_bytes()


def load_checked(path: Path, where: str, max_bytes: int, max_pixels: int, fix: str = FIX):
    """(raw bytes, RGB image) of an image a data row names; DataError 'where: why: fix' if bad."""
    try:
        raw = read_file(path, max_bytes)
        return raw, decode(raw, max_pixels)
    except BadImage as e:
        raise DataError(f"{where}: {e}: {fix}") from None


def content_hash(img) -> str:
    """sha256 of the decoded pixels and size: the same picture saved twice (PNG vs a re-save) is one."""
    h = hashlib.sha256(f"{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()[:32]


def perceptual_hash(img) -> int | None:
    """64-bit pHash as an int (imagehash, the vision extra); None without imagehash."""
    try:
        import imagehash
    except ImportError:
        return None
    return int(str(imagehash.phash(img)), 16)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def open_rgb(raw: bytes, max_pixels: int = 1 << 40):
    """An image already checked (or drawn by llmctl) as RGB."""
    return decode(raw, max_pixels)
