"""Dense per-cell targets from a scene graph, for auxiliary supervision of image backbones.

The image is cut into grid x grid cells; the cell holding an object's centre is labelled with the object's colour,
shape (signs are a shape of their own), the centre's offset inside the cell and the prompt entry the object stands
for (its group), and for signs the set of letters on them. When two centres share a cell the larger object wins.
Sign letters are also listed one by one with the centre of their glyph (`glyphs`), so a model can learn to spot
each letter where it is drawn.
Models that learn to read these off the pixels find objects, bindings and positions in minutes instead of hours.

`relation_targets` lists the prompt's relations as (group a, relation, group b) rows, so a model can be told which
displacement the prompt expects between the objects of two groups.
"""

from __future__ import annotations

import string

import numpy as np

from spatialscore.data.scene import Obj, Scene
from spatialscore.data.vocab import COLORS, RELATIONS, SHAPES, SIGN_CLASS

CELL_COLORS = ("none", *COLORS)
CELL_SHAPES = ("none", *SHAPES, SIGN_CLASS)
LETTERS = string.ascii_uppercase + string.digits
MAX_RELATIONS = 6
MAX_GLYPHS = 16
# The displacement (x right, y down) of A from B that "A <relation> B" asks for.
RELATION_DIRECTIONS = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}


def cell_targets(scene: Scene, grid: int, meta: dict | None = None) -> dict[str, np.ndarray]:
    """Per-cell targets; with the prompt's metadata also what the prompt asks of the object in each cell
    (`asked_color`, `asked_shape`: its entry's colour and class, 0 where the entry names none or there is none)."""
    entries = (meta or {}).get("include", [])
    color = np.zeros((grid, grid), np.uint8)
    shape = np.zeros((grid, grid), np.uint8)
    offset = np.zeros((grid, grid, 2), np.float32)
    letters = np.zeros((grid, grid, len(LETTERS)), np.uint8)  # a sign's letters, at the sign's cell
    group = np.zeros((grid, grid), np.uint8)  # the include entry's index + 1; 0: no object, or one no entry asked for
    asked_color = np.zeros((grid, grid), np.uint8)
    asked_shape = np.zeros((grid, grid), np.uint8)
    items = sorted(scene.items(), key=lambda it: it.size if isinstance(it, Obj) else it.w * it.h)
    for item in items:  # smallest first, so a larger object in the same cell overwrites it
        col, row = min(int(item.x * grid), grid - 1), min(int(item.y * grid), grid - 1)
        offset[row, col] = (item.x * grid - col - 0.5, item.y * grid - row - 0.5)
        group[row, col] = item.group + 1
        entry = entries[item.group] if 0 <= item.group < len(entries) else {}
        asked_color[row, col] = CELL_COLORS.index(entry["color"]) if entry.get("color") else 0
        asked_shape[row, col] = CELL_SHAPES.index(entry["class"]) if entry else 0
        if isinstance(item, Obj):
            color[row, col] = CELL_COLORS.index(item.color)
            shape[row, col] = CELL_SHAPES.index(item.shape)
            letters[row, col] = 0
        else:
            color[row, col] = 0
            shape[row, col] = CELL_SHAPES.index(SIGN_CLASS)
            letters[row, col] = [ch in item.text for ch in LETTERS]
    out = {"color": color, "shape": shape, "offset": offset, "letters": letters, "group": group,
           "glyphs": glyph_targets(scene),
           "items": np.array(len(scene.items()), np.uint8)}
    return out | ({"asked_color": asked_color, "asked_shape": asked_shape} if meta is not None else {})


def relation_targets(meta: dict) -> np.ndarray:
    """[MAX_RELATIONS, 3] int8 rows (group a, relation index, group b), groups counted from 1 as in `group`;
    unused rows are -1."""
    rows = np.full((MAX_RELATIONS, 3), -1, np.int8)
    relations = [(i + 1, RELATIONS.index(e["position"][0]), int(e["position"][1]) + 1)
                 for i, e in enumerate(meta.get("include", [])) if e.get("position")]
    if relations:
        rows[:len(relations[:MAX_RELATIONS])] = relations[:MAX_RELATIONS]
    return rows


def glyph_targets(scene: Scene) -> np.ndarray:
    """[MAX_GLYPHS, 3] float32 rows (x, y, letter index): the centre of every sign letter as the renderer draws it
    (the text is centred on the sign, glyphs advance by the font's widths); unused rows are -1."""
    from spatialscore.data.render import sign_font
    from spatialscore.data.scene import SIGN_FONT

    rows = np.full((MAX_GLYPHS, 3), -1, np.float32)
    font, n = sign_font(100), 0
    for sign in scene.signs:
        start = sign.x - font.getlength(sign.text) / 100 * SIGN_FONT / 2
        for k, ch in enumerate(sign.text):
            if ch in LETTERS and n < MAX_GLYPHS:
                middle = (font.getlength(sign.text[:k]) + font.getlength(sign.text[:k + 1])) / 2
                rows[n] = (start + middle / 100 * SIGN_FONT, sign.y, LETTERS.index(ch))
                n += 1
    return rows
