"""Perturbations that turn a faithful scene into a rejected one: swap, flip, count, attribute, text.

Each perturbation edits a copy of the scene and returns None when it cannot apply (nothing to swap, no room).
`make_rejected` chains 1-3 of them and keeps the result only if the exact judge finds a clear failure: a missing
or miscounted object, a wrong colour or text, or a relation broken by at least FAIL_MARGIN — so the oracle, which
sees only pixels, can tell every rejected image from its chosen one.
"""

from __future__ import annotations

import copy
import random
import string

from spatialscore.data.clauses import evaluate
from spatialscore.data.scene import (RELATION_MARGIN, Obj, Scene, Sign, fits, new_object, place_free,
                                     place_relative, relation_margin, sample_shade, scene_detections)
from spatialscore.data.vocab import CHROMATIC, OPPOSITE, SIGN_CLASS

FAIL_MARGIN = 0.1
# Thin glyphs merge with their neighbours at 128 px ("IION" reads as "ION"); never introduce them.
_REPLACEMENT_LETTERS = [c for c in string.ascii_uppercase if c not in "IJ"]


def _members(scene: Scene, group: int) -> list[Obj | Sign]:
    return [item for item in scene.items() if item.group == group]


def _relations(meta: dict) -> list[tuple[int, str, int]]:
    return [(i, e["position"][0], int(e["position"][1]))
            for i, e in enumerate(meta.get("include", [])) if e.get("position")]


def applicable(meta: dict) -> list[str]:
    """The kinds that can make this prompt's scene unfaithful."""
    kinds = []
    if _relations(meta):
        kinds += ["swap", "flip"]
    if meta.get("include"):
        kinds.append("count")
    if any(e.get("color") for e in meta.get("include", [])):
        kinds.append("attribute")
    if meta.get("text"):
        kinds.append("text")
    return kinds


def swap(scene: Scene, meta: dict, rng: random.Random) -> bool:
    """Two related objects exchange places, which reverses their relation."""
    i, _, j = rng.choice(_relations(meta))
    a, b = rng.choice(_members(scene, i) or [None]), rng.choice(_members(scene, j) or [None])
    if a is None or b is None:
        return False
    (a.x, a.y), (b.x, b.y) = (b.x, b.y), (a.x, a.y)
    return fits(a, scene.items()) and fits(b, scene.items())


def flip(scene: Scene, meta: dict, rng: random.Random) -> bool:
    """One relation reversed: `a left of b` becomes `a right of b`, by mirroring `a` across `b` or, when there is no
    room on that side, moving `b` across `a` instead."""
    i, rel, j = rng.choice(_relations(meta))
    members, anchors = _members(scene, i), _members(scene, j)
    if not members or not anchors:
        return False
    a, b = rng.choice(members), anchors[0]
    for mover, fixed, goal in ((a, b, OPPOSITE[rel]), (b, a, rel)):
        start = (mover.x, mover.y)
        if rel in ("left of", "right of"):
            mover.x = 2 * fixed.x - mover.x
        else:
            mover.y = 2 * fixed.y - mover.y
        if fits(mover, scene.items()) and relation_margin(mover, goal, fixed) >= RELATION_MARGIN:
            return True
        if place_relative(mover, goal, fixed, scene.items(), rng):
            return True
        mover.x, mover.y = start
    return False


def count(scene: Scene, meta: dict, rng: random.Random) -> bool:
    """One object more or fewer. Entries with an exclude bound (counting prompts) go either way; others only lose
    one, since an extra object does not contradict "a red circle"."""
    include = meta.get("include", [])
    index = rng.randrange(len(include))
    entry, members = include[index], _members(scene, index)
    bounded = any(x["class"] == entry["class"] and x.get("color") == entry.get("color")
                  for x in meta.get("exclude", []))
    if bounded and (not members or rng.random() < 0.5) and entry["class"] != SIGN_CLASS:
        extra = new_object(entry["class"], entry.get("color"), rng, small=True)
        extra.group = index
        if not place_free(extra, scene.items(), rng):
            return False
        scene.objects.append(extra)
        return True
    if not members:
        return False
    victim = rng.choice(members)
    if isinstance(victim, Sign):
        scene.signs.remove(victim)
    else:
        scene.objects.remove(victim)
    return True


def attribute(scene: Scene, meta: dict, rng: random.Random) -> bool:
    """Two objects of differently coloured entries exchange colours; with only one coloured entry, it is recoloured."""
    include = meta.get("include", [])
    coloured = [i for i, e in enumerate(include) if e.get("color") and _members(scene, i)]
    if not coloured:
        return False
    distinct = [(i, j) for i in coloured for j in coloured if i < j and include[i]["color"] != include[j]["color"]]
    if distinct:
        i, j = rng.choice(distinct)
        a, b = rng.choice(_members(scene, i)), rng.choice(_members(scene, j))
        if isinstance(a, Obj) and isinstance(b, Obj):
            (a.color, a.rgb), (b.color, b.rgb) = (b.color, b.rgb), (a.color, a.rgb)
            return True
    a = rng.choice(_members(scene, rng.choice(coloured)))
    if not isinstance(a, Obj):
        return False
    a.color = rng.choice([c for c in (*CHROMATIC, "black") if c != a.color])
    a.rgb = sample_shade(a.color, rng)
    return True


def text(scene: Scene, meta: dict, rng: random.Random) -> bool:
    """One letter of a sign changes."""
    if not scene.signs:
        return False
    sign = rng.choice(scene.signs)
    k = rng.randrange(len(sign.text))
    letter = rng.choice([c for c in _REPLACEMENT_LETTERS if c != sign.text[k]])
    sign.text = sign.text[:k] + letter + sign.text[k + 1:]
    return True


PERTURBATIONS = {"swap": swap, "flip": flip, "count": count, "attribute": attribute, "text": text}


def clearly_fails(meta: dict, scene: Scene) -> bool:
    """True when some clause fails beyond doubt (relations by more than FAIL_MARGIN)."""
    verdict = evaluate(meta, scene_detections(scene))
    return any(c.kind != "position" or c.margin is None or c.margin < -FAIL_MARGIN for c in verdict.failures())


def make_rejected(scene: Scene, meta: dict, kinds: list[str], rng: random.Random) -> Scene | None:
    """Apply `kinds` in order to a copy of `scene`; None if one cannot apply or the result is not clearly wrong."""
    rejected = copy.deepcopy(scene)
    for kind in kinds:
        if not PERTURBATIONS[kind](rejected, meta, rng):
            return None
    return rejected if clearly_fails(meta, rejected) else None
