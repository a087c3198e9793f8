"""Scenes of the shapes world: objects and signs in normalised coordinates (x right, y down, both in [0, 1]).

A scene is resolution-free; `render.py` draws it at any size. `sample_scene` places the objects a prompt's metadata
asks for so that every relation holds with a clear margin under GenEval's position rule — faithful scenes are
unambiguous — and `scene_detections` turns a scene into exact detections for the clause judge.
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import asdict, dataclass, field

import numpy as np

from spatialscore.data.clauses import Detection, relation_strength
from spatialscore.data.vocab import CHROMATIC, COLORS, SIGN_CLASS
from spatialscore.errors import SpatialScoreError

# Circumradius of each shape as a fraction of its nominal size, chosen so the shapes look about equally big.
_RADIUS = {"circle": 0.5, "square": 0.5 * 0.85 * math.sqrt(2), "triangle": 0.55, "star": 0.56}
STAR_INNER = 0.45
SIGN_FONT = 0.12  # letter height as a fraction of the image side
SIGN_BORDER = 0.025
SIGN_PAD = 0.03
MARGIN = 0.02  # gap between items and to the canvas edge
RELATION_MARGIN = 0.12  # faithful relations hold beyond GenEval's 0.5 threshold by at least this much


@dataclass
class Obj:
    shape: str
    color: str
    x: float
    y: float
    size: float
    rotation: float = 0.0
    rgb: tuple[int, int, int] = (0, 0, 0)
    group: int = -1  # index of the prompt's include entry this object stands for (-1: none)

    @property
    def radius(self) -> float:
        return self.size * _RADIUS[self.shape]

    def polygon(self) -> np.ndarray | None:
        """Vertices (N, 2) in normalised coordinates; None for a circle."""
        r, rot = self.radius, math.radians(self.rotation)
        if self.shape == "circle":
            return None
        if self.shape == "square":
            angles = np.deg2rad([45, 135, 225, 315])
            radii = np.full(4, r)
        elif self.shape == "triangle":
            angles = np.deg2rad([-90, 30, 150])
            radii = np.full(3, r)
        else:  # star: alternating outer and inner vertices, a point upwards
            angles = np.deg2rad(np.arange(10) * 36 - 90)
            radii = np.where(np.arange(10) % 2 == 0, r, r * STAR_INNER)
        angles = angles + rot
        return np.stack([self.x + radii * np.cos(angles), self.y + radii * np.sin(angles)], axis=1)

    def bbox(self) -> tuple[float, float, float, float]:
        poly = self.polygon()
        if poly is None:
            r = self.radius
            return (self.x - r, self.y - r, self.x + r, self.y + r)
        return (float(poly[:, 0].min()), float(poly[:, 1].min()), float(poly[:, 0].max()), float(poly[:, 1].max()))


@dataclass
class Sign:
    text: str
    x: float
    y: float
    w: float
    h: float
    group: int = -1

    def bbox(self) -> tuple[float, float, float, float]:
        return (self.x - self.w / 2, self.y - self.h / 2, self.x + self.w / 2, self.y + self.h / 2)


@dataclass
class Scene:
    objects: list[Obj] = field(default_factory=list)
    signs: list[Sign] = field(default_factory=list)
    background: tuple[int, int, int] = (245, 245, 245)

    def items(self) -> list[Obj | Sign]:
        return [*self.objects, *self.signs]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "signs": [asdict(s) for s in self.signs],
                "background": list(self.background)}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = [Obj(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"]]
        return cls(objects, [Sign(**s) for s in d["signs"]], tuple(d["background"]))


def scene_detections(scene: Scene) -> list[Detection]:
    """Exact detections straight from the scene graph (what a perfect oracle would see)."""
    dets = [Detection(o.shape, o.color, o.bbox()) for o in scene.objects]
    return dets + [Detection(SIGN_CLASS, None, s.bbox(), text=s.text) for s in scene.signs]


def sample_shade(color: str, rng: random.Random) -> tuple[int, int, int]:
    """A random shade near a named colour (hue +-5 degrees, saturation and value +-0.08)."""
    h, s, v = COLORS[color]
    if color == "black":
        r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.03, 0.17))
    else:
        hue = ((h + rng.uniform(-5, 5)) % 360) / 360
        r, g, b = colorsys.hsv_to_rgb(hue, min(1.0, s + rng.uniform(-0.08, 0.08)), min(1.0, v + rng.uniform(-0.08, 0.04)))
    return (round(r * 255), round(g * 255), round(b * 255))


def sample_background(rng: random.Random) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.07), rng.uniform(0.92, 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def sign_size(text: str) -> tuple[float, float]:
    """Normalised (w, h) of a sign holding `text`, from the sign font's advance widths."""
    from spatialscore.data.render import sign_font

    width = sign_font(100).getlength(text) / 100 * SIGN_FONT
    return width + 2 * (SIGN_PAD + SIGN_BORDER), SIGN_FONT * 1.3 + 2 * (SIGN_PAD + SIGN_BORDER)


def _radius(item: Obj | Sign) -> float:
    return item.radius if isinstance(item, Obj) else math.hypot(item.w, item.h) / 2


def _keepout(item: Obj | Sign) -> tuple[float, float, float, float]:
    if isinstance(item, Obj):
        r = item.radius + MARGIN / 2
        return (item.x - r, item.y - r, item.x + r, item.y + r)
    x0, y0, x1, y1 = item.bbox()
    return (x0 - MARGIN / 2, y0 - MARGIN / 2, x1 + MARGIN / 2, y1 + MARGIN / 2)


def fits(item: Obj | Sign, others: list[Obj | Sign]) -> bool:
    """Inside the canvas (with a margin) and not overlapping any other item."""
    x0, y0, x1, y1 = _keepout(item)
    if x0 < MARGIN / 2 or y0 < MARGIN / 2 or x1 > 1 - MARGIN / 2 or y1 > 1 - MARGIN / 2:
        return False
    for other in others:
        if other is item:
            continue
        a0, b0, a1, b1 = _keepout(other)
        if x0 < a1 and a0 < x1 and y0 < b1 and b0 < y1:
            return False
    return True


def relation_margin(item_a: Obj | Sign, rel: str, item_b: Obj | Sign) -> float:
    return relation_strength(item_a.bbox(), rel, item_b.bbox())


def place_relative(item: Obj | Sign, rel: str, anchor: Obj | Sign, others: list, rng: random.Random,
                   tries: int = 60) -> bool:
    """Move `item` to a random free spot where `item rel anchor` holds with RELATION_MARGIN. False if none found."""
    direction = {"left of": 180.0, "right of": 0.0, "above": 270.0, "below": 90.0}[rel]
    for _ in range(tries):
        angle = math.radians(direction + rng.uniform(-30, 30))
        closest = _radius(item) + _radius(anchor) + MARGIN
        dist = closest + (0.65 - closest) * rng.random() ** 2  # near the anchor is likelier: leaves room for others
        item.x, item.y = anchor.x + dist * math.cos(angle), anchor.y + dist * math.sin(angle)
        if fits(item, others) and relation_margin(item, rel, anchor) >= RELATION_MARGIN:
            return True
    return False


def place_free(item: Obj | Sign, others: list, rng: random.Random, tries: int = 200) -> bool:
    for _ in range(tries):
        item.x, item.y = rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95)
        if fits(item, others):
            return True
    return False


def new_object(shape: str, color: str | None, rng: random.Random, small: bool = False, scale: float = 1.0) -> Obj:
    color = color or rng.choice([*CHROMATIC, "black"])
    size = scale * (rng.uniform(0.12, 0.16) if small else rng.uniform(0.12, 0.2))
    rotation = rng.uniform(-15, 15) if shape != "circle" else 0.0
    return Obj(shape, color, 0.5, 0.5, size, rotation, sample_shade(color, rng))


COMPOSITIONS = ("free", "centred")
CENTRE_JITTER = 0.1  # a centred group's centre lies within this of the canvas centre (where the canvas allows)


def sample_scene(meta: dict, rng: random.Random, tries: int = 200, scale: float = 1.0,
                 composition: str = "free") -> Scene:
    """A scene faithful to a prompt's metadata: every include entry drawn `count` times, relations with a margin;
    `scale` multiplies the objects' sizes (a generator's training scenes may use bigger objects). `composition`
    "centred": a scene with a relation is moved as a whole so that its items' bounding box sits near the canvas
    centre, the way a photograph frames its subjects; "a circle left of a square" then puts the circle in the left
    half and the square in the right one, instead of the pair anywhere on the canvas (`centre_group`)."""
    if composition not in COMPOSITIONS:
        raise SpatialScoreError(f"composition must be one of {COMPOSITIONS}, got {composition!r}")
    for _ in range(tries):
        scene = _try_scene(meta, rng, scale)
        if scene is not None:
            if composition == "centred" and any(e.get("position") for e in meta.get("include", [])):
                centre_group(scene, rng)
            return scene
    raise SpatialScoreError(f"could not place the objects of prompt {meta.get('prompt')!r} after {tries} tries")


def centre_group(scene: Scene, rng: random.Random, jitter: float = CENTRE_JITTER) -> None:
    """Translate every item of `scene` together so the centre of their keep-out boxes lies within `jitter` of the
    canvas centre (clamped so everything stays inside): relations, gaps and sizes are unchanged."""
    items = scene.items()
    boxes = [_keepout(item) for item in items]
    low, high = MARGIN / 2, 1 - MARGIN / 2
    shifts = []
    for axis in (0, 1):
        lo, hi = min(b[axis] for b in boxes), max(b[axis + 2] for b in boxes)
        want = 0.5 + rng.uniform(-jitter, jitter) - (lo + hi) / 2
        shifts.append(min(max(want, low - lo), high - hi))
    for item in items:
        item.x += shifts[0]
        item.y += shifts[1]


def _try_scene(meta: dict, rng: random.Random, scale: float = 1.0) -> Scene | None:
    scene = Scene(background=sample_background(rng))
    texts = list(meta.get("text", []))
    groups: list[list[Obj | Sign]] = []
    many = sum(int(e.get("count", 1)) for e in meta.get("include", [])) > 3
    for index, entry in enumerate(meta.get("include", [])):
        group: list[Obj | Sign] = []
        for _ in range(int(entry.get("count", 1))):
            if entry["class"] == SIGN_CLASS:
                text = texts.pop(0) if texts else "SIGN"
                item: Obj | Sign = Sign(text, 0.5, 0.5, *sign_size(text))
            else:
                item = new_object(entry["class"], entry.get("color"), rng, small=many, scale=scale)
            item.group = index
            placed = scene.items()
            position = entry.get("position")
            if position:
                rel, target = position[0], int(position[1])
                ok = all(place_relative(item, rel, anchor, placed, rng) for anchor in groups[target][:1])
                ok = ok and all(relation_margin(item, rel, a) >= RELATION_MARGIN for a in groups[target])
            else:
                ok = place_free(item, placed, rng)
            if not ok:
                return None
            (scene.signs if isinstance(item, Sign) else scene.objects).append(item)
            group.append(item)
        groups.append(group)
    for text in texts:  # text asked for without a sign entry: add a free sign
        sign = Sign(text, 0.5, 0.5, *sign_size(text))
        if not place_free(sign, scene.items(), rng):
            return None
        scene.signs.append(sign)
    return scene
