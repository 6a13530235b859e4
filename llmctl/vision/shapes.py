"""The builtin image-text dataset: synthetic shape scenes drawn with Pillow, seeded.

A scene is a group of one or two shapes of one colour beside a single shape of another
colour-shape pair; its caption names both, the count and where the group is:
"two red circles left of a blue square". The test split holds out whole pairings of the
two (colour, shape) objects, so every word is seen in training but a held-out caption's
combination never is: a test of compositional generalisation, not of memory.
"""

from __future__ import annotations

import io
import random
from itertools import product
from typing import Iterator

COLORS = {"red": (215, 38, 38), "green": (34, 160, 60), "blue": (40, 70, 225), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two"}
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (245, 245, 245)


def pairings() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Every (group object, single object) pairing of two different (colour, shape) kinds."""
    kinds = list(product(COLORS, SHAPES))
    return [(a, b) for a in kinds for b in kinds if a != b]


def held_out_pairings(seed: int, fraction: float) -> set:
    """The pairings the test split uses and training never sees (at least one when fraction > 0)."""
    if fraction <= 0:
        return set()
    pairs = pairings()
    random.Random(seed).shuffle(pairs)
    return set(pairs[: max(1, round(len(pairs) * fraction))])


def caption(count: int, a: tuple[str, str], relation: str, b: tuple[str, str]) -> str:
    plural = "s" if count > 1 else ""
    return f"{COUNTS[count]} {a[0]} {a[1]}{plural} {relation} a {b[0]} {b[1]}"


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


def _regions(relation: str, size: int) -> tuple[tuple, tuple]:
    """(the group's half, the single shape's half) of the canvas as (x0, y0, x1, y1)."""
    h = size // 2
    left, right, top, bottom = (0, 0, h, size), (h, 0, size, size), (0, 0, size, h), (0, h, size, size)
    return {"left of": (left, right), "right of": (right, left), "above": (top, bottom), "below": (bottom, top)}[relation]


def _slots(region: tuple, count: int, shape_px: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """`count` non-overlapping boxes inside `region`, placed along its long side, jittered."""
    x0, y0, x1, y1 = region
    w, h = x1 - x0, y1 - y0
    along_y = h >= w
    n_cells = max(count, 1)
    boxes = []
    for i in range(count):
        if along_y:
            cx0, cy0, cw, ch = x0, y0 + i * h // n_cells, w, h // n_cells
        else:
            cx0, cy0, cw, ch = x0 + i * w // n_cells, y0, w // n_cells, h
        s = min(shape_px, cw - 2, ch - 2)
        px = cx0 + rng.randint(1, max(1, cw - s - 1))
        py = cy0 + rng.randint(1, max(1, ch - s - 1))
        boxes.append((px, py, px + s - 1, py + s - 1))
    return boxes


def draw_scene(count: int, a: tuple[str, str], relation: str, b: tuple[str, str], size: int, rng: random.Random):
    """A PIL image of the scene the caption describes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    group, single = _regions(relation, size)
    shape_px = max(5, size * 9 // 32 + rng.randint(-1, 1))
    for box in _slots(group, count, shape_px if count == 1 else max(5, size * 7 // 32), rng):
        _draw_shape(draw, a[1], box, COLORS[a[0]])
    for box in _slots(single, 1, shape_px, rng):
        _draw_shape(draw, b[1], box, COLORS[b[0]])
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


FLIP = {"right of": "left of", "below": "above"}


def scenes(n: int, seed: int, size: int, test_fraction: float) -> Iterator[tuple[dict, str]]:
    """(record, split) for `n` scenes: {image: PNG bytes, caption}; 'test' for held-out pairings,
    'seen' for the rest (prepare splits those into train and validation).

    One caption per picture: with a single shape on each side, "a blue square above a red
    circle" and "a red circle below a blue square" are the same scene, so such scenes are
    always named left-to-right or top-to-bottom (the pair swapped, the relation flipped)."""
    rng = random.Random(seed)
    held = held_out_pairings(seed, test_fraction)
    all_pairs = pairings()
    for i in range(n):
        a, b = rng.choice(all_pairs)
        count, relation = rng.choice(list(COUNTS)), rng.choice(RELATIONS)
        if count == 1 and relation in FLIP:
            a, b, relation = b, a, FLIP[relation]
        img = draw_scene(count, a, relation, b, size, rng)
        yield {"image": png_bytes(img), "caption": caption(count, a, relation, b)}, ("test" if (a, b) in held else "seen")
