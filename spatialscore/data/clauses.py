"""Judging a prompt's metadata against detected objects, clause by clause.

The rules follow GenEval's evaluator (include entries with count/color/position, exclude entries, and its position
rule: the centre offset shrunk by 0.1 * (size_a + size_b), normalised, beyond 0.5), extended with colour-aware
matching (an entry with a colour matches only objects of that colour, so "a red circle left of a blue circle" is
well defined) and text clauses read from signs. The same judge serves the pixel oracle and exact scene graphs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

POSITION_THRESHOLD = 0.1


@dataclass
class Detection:
    cls: str
    color: str | None
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (any consistent unit)
    text: str | None = None


@dataclass
class Clause:
    kind: str  # presence | color | position | count | text
    target: str  # human-readable: "red circle", "circle left of square", "text 'HELLO'"
    passed: bool
    detail: str = ""
    margin: float | None = None  # position clauses: how far beyond the 0.5 threshold the weakest pair is


@dataclass
class Verdict:
    clauses: list[Clause] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.clauses)

    def failures(self) -> list[Clause]:
        return [c for c in self.clauses if not c.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed,
                "clauses": [{"kind": c.kind, "target": c.target, "passed": c.passed, "detail": c.detail}
                            for c in self.clauses]}


def relation_offset(box_a, box_b) -> tuple[float, float]:
    """GenEval's normalised, size-shrunk offset of A relative to B; a component beyond +-0.5 makes a relation."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    dims = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    off = (ca[0] - cb[0], ca[1] - cb[1])
    norm = math.hypot(*off)
    if norm < 1e-9:
        return (0.0, 0.0)
    revised = [math.copysign(max(abs(o) - POSITION_THRESHOLD * d, 0.0), o) for o, d in zip(off, dims)]
    return (revised[0] / norm, revised[1] / norm)


def relation_strength(box_a, rel: str, box_b) -> float:
    """How far `a rel b` is beyond GenEval's 0.5 threshold (negative: the relation does not hold)."""
    dx, dy = relation_offset(box_a, box_b)
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[rel] - 0.5


def relations(box_a, box_b) -> set[str]:
    dx, dy = relation_offset(box_a, box_b)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def normalise_text(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


def describe(entry: dict) -> str:
    return f"{entry['color']} {entry['class']}" if entry.get("color") else entry["class"]


def _matches(det: Detection, cls: str, color: str | None) -> bool:
    return det.cls == cls and (color is None or det.color == color)


def evaluate(meta: dict, detections: list[Detection]) -> Verdict:
    """Every clause of `meta` (GenEval format + `text`) judged against `detections`."""
    verdict = Verdict()
    groups: list[list[Detection] | None] = []
    includes = meta.get("include", [])
    for entry in includes:
        cls, color, count = entry["class"], entry.get("color"), int(entry.get("count", 1))
        of_class = [d for d in detections if d.cls == cls]
        ok = len(of_class) >= count
        verdict.clauses.append(Clause("presence", f"{count} x {cls}", ok, f"found {len(of_class)}"))
        matched = [d for d in of_class if _matches(d, cls, color)]
        if ok and color is not None:
            ok = len(matched) >= count
            found = sorted({d.color or "?" for d in of_class})
            verdict.clauses.append(Clause("color", f"{count} x {color} {cls}", ok, f"colours seen: {found}"))
        if "position" in entry and entry["position"]:
            rel, target = entry["position"][0], int(entry["position"][1])
            anchors = groups[target] if 0 <= target < len(groups) else None
            name = f"{describe(entry)} {rel} {describe(includes[target])}" if 0 <= target < len(includes) else rel
            if not ok or not anchors:
                verdict.clauses.append(Clause("position", name, False, "object or its reference not found"))
                ok = False
            else:
                strengths = [(relation_strength(d.box, rel, a.box), d, a) for d in matched for a in anchors]
                weakest, d, a = min(strengths, key=lambda t: t[0])
                ok = weakest > 0
                detail = "" if ok else f"seen: {sorted(relations(d.box, a.box)) or 'no relation'}"
                verdict.clauses.append(Clause("position", name, ok, detail, margin=weakest))
        groups.append(matched if ok else None)
    for entry in meta.get("exclude", []):
        cls, color, count = entry["class"], entry.get("color"), int(entry["count"])
        n = sum(_matches(d, cls, color) for d in detections)
        verdict.clauses.append(Clause("count", f"fewer than {count} x {describe(entry)}", n < count, f"found {n}"))
    read = {normalise_text(d.text) for d in detections if d.text}
    for text in meta.get("text", []):
        ok = normalise_text(text) in read
        verdict.clauses.append(Clause("text", f"text {text!r}", ok, f"read: {sorted(read)}"))
    return verdict
