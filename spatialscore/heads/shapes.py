"""Built-in heads that read images with the shapes-world oracle's detector (colour segmentation, hull-based
shapes, tesseract on signs): `oracle`, `counting`, `text` and `binding`. They are exact on shapes-world images
and serve as the reference rewards that learned heads are compared with; `counting` can also count with an
open-vocabulary detector (heads/detector.py), for images from outside the shapes world."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from spatialscore.data.clauses import Detection, evaluate, normalise_text
from spatialscore.data.oracle import detect
from spatialscore.data.vocab import SIGN_CLASS
from spatialscore.errors import SpatialScoreError
from spatialscore.heads import RewardHead, RewardOutput, register_head
from spatialscore.heads.detector import OpenVocabDetector, load_owlv2, tiny_owlv2


def to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def text_similarity(asked: str, read: str) -> float:
    """1 - normalised edit distance, on uppercase letters and digits only."""
    asked, read = normalise_text(asked), normalise_text(read)
    return 1.0 - edit_distance(asked, read) / max(len(asked), len(read), 1)


class _DetectingHead(RewardHead):
    needs_meta = True

    def score(self, images, prompts, meta) -> RewardOutput:
        rows = []
        for image, m in zip(images, meta):
            wants_text = bool(m.get("text")) or any(e.get("class") == SIGN_CLASS for e in m.get("include", []))
            rows.append(self.judge(detect(to_pil(image), ocr=wants_text), m))
        scores = torch.tensor([r[0] for r in rows], dtype=torch.float32)
        extras = {k: torch.tensor([r[1][k] for r in rows], dtype=torch.float32) for k in (rows[0][1] if rows else {})}
        return RewardOutput(scores, extras)

    def judge(self, detections: list[Detection], meta: dict) -> tuple[float, dict[str, float]]:
        raise NotImplementedError


@register_head("oracle")
class OracleHead(_DetectingHead):
    """Shapes world only: share of the prompt's clauses the image satisfies (extras: passed = all of them).

    `dense_position=True` grades relations instead of passing or failing them, for policy-gradient RL: a binary
    clause gives no signal between two wrong layouts, and most of a weak base's layouts are wrong. Each position
    clause whose objects are found scores 1 + clamp(2 * margin, -1, 1), in [0, 2] (margin: how far beyond
    GenEval's 0.5 offset threshold the weakest pair is, negative when the relation fails; 0 when an object is
    missing), the other clauses their share in [0, 1]; the sum is divided by 1 + 2 * (number of position clauses),
    so the score stays in [0, 1]. `passed` is unchanged."""

    def __init__(self, dense_position: bool = False):
        self.dense_position = bool(dense_position)

    def judge(self, detections, meta):
        verdict = evaluate(meta, detections)
        if not self.dense_position:
            share = sum(c.passed for c in verdict.clauses) / max(len(verdict.clauses), 1)
            return share, {"passed": float(verdict.passed)}
        positions = [c for c in verdict.clauses if c.kind == "position"]
        others = [c.passed for c in verdict.clauses if c.kind != "position"]
        graded = sum(0.0 if c.margin is None else 1.0 + max(-1.0, min(1.0, 2.0 * c.margin)) for c in positions)
        score = (sum(others) / max(len(others), 1) + graded) / (1 + 2 * len(positions))
        return score, {"passed": float(verdict.passed)}


def count_reward(found: list[int], asked: list[int]) -> float:
    """Mean exp(-|found - asked|): 1 per exact count, falling off with each object too many or too few."""
    terms = [math.exp(-abs(f - a)) for f, a in zip(found, asked)]
    return sum(terms) / len(terms) if terms else 1.0


def query_phrase(entry: dict) -> str:
    """The detector query for one include entry: its colour (when given) and class."""
    return " ".join(["a photo of a", *([entry["color"]] if entry.get("color") else []), entry["class"]])


@register_head("counting")
class CountingHead(_DetectingHead):
    """Mean exp(-|found - asked|) over the prompt's objects (class and colour), 1.0 when every count is right.

    Objects are found by the shapes-world oracle, or with `detector=<a local OWLv2 directory>` by an
    open-vocabulary detector queried with "a photo of a {color} {class}" (`tiny=True`: a random tiny one, for
    tests); `threshold` is the detector's box probability cut-off."""

    def __init__(self, detector: str | None = None, tiny: bool = False, threshold: float = 0.3):
        if not 0 <= threshold <= 1:
            raise SpatialScoreError(f"head 'counting': threshold must lie in [0, 1], got {threshold}")
        if detector:
            self.detector = OpenVocabDetector(*load_owlv2(detector, "head 'counting': detector"), threshold)
        elif tiny:
            self.detector = OpenVocabDetector(*tiny_owlv2(), threshold)
        else:
            self.detector = None

    def score(self, images, prompts, meta) -> RewardOutput:
        if self.detector is None:
            return super().score(images, prompts, meta)
        entries = [m.get("include", []) for m in meta]
        found = self.detector.count(images, [[query_phrase(e) for e in es] for es in entries])
        scores = [count_reward(f, [int(e.get("count", 1)) for e in es]) for f, es in zip(found, entries)]
        return RewardOutput(torch.tensor(scores, dtype=torch.float32))

    def judge(self, detections, meta):
        entries = meta.get("include", [])
        found = [sum(d.cls == e["class"] and e.get("color") in (None, d.color) for d in detections) for e in entries]
        return count_reward(found, [int(e.get("count", 1)) for e in entries]), {}


@register_head("text")
class TextHead(_DetectingHead):
    """Per asked word, the best 1 - normalised edit distance among the signs read by OCR (0 with no sign)."""

    def judge(self, detections, meta):
        read = [d.text for d in detections if d.text]
        words = meta.get("text", [])
        sims = [max((text_similarity(w, r) for r in read), default=0.0) for w in words]
        return (sum(sims) / len(sims) if sims else 1.0), {"signs": float(len(read))}


@register_head("binding")
class BindingHead(_DetectingHead):
    """Share of coloured objects in the prompt that appear with their own colour (attribute binding)."""

    def judge(self, detections, meta):
        coloured = [e for e in meta.get("include", []) if e.get("color")]
        bound = [sum(d.cls == e["class"] and d.color == e["color"] for d in detections) >= int(e.get("count", 1))
                 for e in coloured]
        return (sum(bound) / len(bound) if bound else 1.0), {}
