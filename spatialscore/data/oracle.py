"""The shapes-world oracle: from pixels only, find signs and objects, read signs with tesseract, judge every clause.

Pipeline: RGB -> HSV; grey, hollow, rectangular components are sign frames (their inside is OCR'd with tesseract
`--psm 7` and then ignored); every other pixel is classified to a named colour by hue (or black by value); each
colour's connected components above a minimum area are objects, and their shape comes from rotation-invariant
features of the convex hull: solidity (area / hull area) separates stars, hull circularity (4 pi A / P^2) separates
circles (~1), squares (~0.8) and triangles (~0.65); anti-aliased rims are added back before measuring. Boxes are
in pixels and go to the clause judge (clauses.py).

Measured on faithful renders of mixed prompts: every clause right at 96-256 px; at 64 px only ~86% (objects of
8 px lose their shape and 8 px letters defeat OCR), so judge generators' images at 96 px or more.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from spatialscore.data.clauses import Detection, Verdict, evaluate
from spatialscore.data.vocab import COLORS, SIGN_CLASS
from spatialscore.errors import SpatialScoreError

MIN_AREA_FRACTION = 0.0015  # components smaller than this share of the image are noise or anti-aliasing
CHROMA_SATURATION = 0.45
CHROMA_VALUE = 0.35
BLACK_VALUE = 0.30
_HUES = {name: hsv[0] for name, hsv in COLORS.items() if name != "black"}
_EIGHT = np.ones((3, 3), bool)


@dataclass
class OracleResult:
    detections: list[Detection]
    verdict: Verdict

    @property
    def passed(self) -> bool:
        return self.verdict.passed


def to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """rgb float (H, W, 3) in [0, 1] -> hue in degrees, saturation, value."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-9), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-9)
    hue = np.select([mx == r, mx == g], [((g - b) / safe) % 6, (b - r) / safe + 2], (r - g) / safe + 4) * 60.0
    return hue, sat, mx


def classify_hue(hue: np.ndarray) -> np.ndarray:
    """Index into list(_HUES) of the nearest named hue (circular distance)."""
    centres = np.array(list(_HUES.values()))
    dist = np.abs((hue[..., None] - centres + 180.0) % 360.0 - 180.0)
    return dist.argmin(-1)


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (monotone chain) of (N, 2) points, counter-clockwise, no repeated end point."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return pts

    def half(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0:
                out.pop()
            out.append(tuple(p))
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], float)


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(solidity, hull circularity) of a binary component mask, from the hull of its pixel centres."""
    ys, xs = np.nonzero(mask)
    order = np.lexsort((xs, ys))
    ys, xs = ys[order], xs[order]
    first = np.r_[True, ys[1:] != ys[:-1]]
    last = np.r_[ys[1:] != ys[:-1], True]
    # only each row's extreme pixels can be hull vertices
    pts = np.concatenate([np.stack([xs[first], ys[first]], 1), np.stack([xs[last], ys[last]], 1)]).astype(float)
    hull = _hull(pts)
    if len(hull) < 3:
        return 1.0, 0.0
    x, y = hull[:, 0], hull[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    perimeter = float(np.hypot(np.diff(x, append=x[0]), np.diff(y, append=y[0])).sum())
    # pixels reach half a pixel beyond their centres: Pick's correction for the area the pixels cover
    covered = area + perimeter / 2 + 1
    return float(len(xs) / covered), float(4 * math.pi * area / max(perimeter, 1e-9) ** 2)


def classify_shape(mask: np.ndarray) -> str:
    solidity, circularity = shape_features(mask)
    # thresholds sit midway between the ranges measured on 600 rendered shapes at 128 px: solidity star
    # 0.56-0.67 vs others >= 0.86; circularity circle 0.97-0.99, square 0.78-0.88, triangle 0.62-0.73
    if solidity < 0.76:
        return "star"
    if circularity > 0.925:
        return "circle"
    if circularity > 0.758:
        return "square"
    return "triangle"


def find_signs(hue, sat, val) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (x0, y0, x1, y1, exclusive ends) of grey rectangular frames: signs."""
    h, w = val.shape
    grey = (sat < 0.2) & (val > 0.3) & (val < 0.75)
    # a one-pixel opening removes the thin grey anti-aliasing rings around black objects and text
    grey = ndimage.binary_opening(grey, structure=np.ones((2, 2), bool))
    labels, n = ndimage.label(grey, structure=_EIGHT)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if bw < 0.08 * w or bh < 0.06 * h:
            continue
        filled = (labels[sl] == i).mean()
        if filled > 0.6:  # a frame is hollow
            continue
        boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return boxes


_TESSERACT_ARGS = ["--psm", "7", "-c", "tessedit_char_whitelist=ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
                   "-c", "load_system_dawg=0", "-c", "load_freq_dawg=0"]


def tesseract(image: Image.Image) -> str:
    """One line of text from tesseract, run on a PNG through stdin/stdout. OMP_THREAD_LIMIT=1 only for this child:
    OpenMP threads cost more than they give on a one-line crop (134 vs 175 ms here), and set in our own environment
    the limit would leak into every later child process and stall torch's OpenMP there."""
    exe = shutil.which("tesseract")
    if exe is None:
        raise SpatialScoreError("the oracle needs the `tesseract` program: run launch/setup.sh "
                                "(or `apt-get install tesseract-ocr`)")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    result = subprocess.run([exe, "stdin", "stdout", *_TESSERACT_ARGS], input=buffer.getvalue(), capture_output=True,
                            env={**os.environ, "OMP_THREAD_LIMIT": "1"})
    if result.returncode != 0:
        raise SpatialScoreError(f"tesseract failed: {result.stderr.decode(errors='replace').strip()[:200]}")
    return result.stdout.decode(errors="replace").strip()


def read_text(image: Image.Image, box: tuple[int, int, int, int]) -> str:
    """OCR the inside of a sign frame: cropped inside the frame, upscaled, binarised, padded, one text line."""
    x0, y0, x1, y1 = box
    inset = max(1, round(0.12 * (y1 - y0)))
    crop = image.crop((x0 + inset, y0 + inset, x1 - inset, y1 - inset)).convert("L")
    scale = max(1, round(96 / max(crop.height, 1)))
    crop = crop.resize((crop.width * scale, crop.height * scale), Image.LANCZOS)
    crop = crop.point(lambda p: 255 if p > 140 else 0)
    padded = Image.new("L", (crop.width + 40, crop.height + 40), 255)
    padded.paste(crop, (20, 20))
    return tesseract(padded)


def detect(image: Image.Image, ocr: bool = True) -> list[Detection]:
    """All signs and objects in an image, boxes in pixels."""
    image = image.convert("RGB")
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    hue, sat, val = to_hsv(rgb)
    h, w = val.shape
    detections: list[Detection] = []
    ignore = np.zeros((h, w), bool)
    for box in find_signs(hue, sat, val):
        x0, y0, x1, y1 = box
        ignore[y0:y1, x0:x1] = True
        text = read_text(image, box) if ocr else None
        detections.append(Detection(SIGN_CLASS, None, (float(x0), float(y0), float(x1), float(y1)), text=text))
    chroma = (sat >= CHROMA_SATURATION) & (val >= CHROMA_VALUE) & ~ignore
    black = (val < BLACK_VALUE) & ~ignore
    hue_class = classify_hue(hue)
    masks = {name: chroma & (hue_class == i) for i, name in enumerate(_HUES)}
    masks["black"] = black
    min_area = MIN_AREA_FRACTION * h * w
    background = np.median(rgb[(sat < 0.15) & (val > 0.75) & ~ignore], axis=0) if (~ignore).any() else np.ones(3)
    for color, mask in masks.items():
        if not mask.any():
            continue
        labels, n = ndimage.label(mask, structure=_EIGHT)
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if (labels[sl] == i).sum() < min_area:
                continue
            grown = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)
            comp = _with_edges(labels[grown] == i, rgb[grown], background)
            ys, xs = np.nonzero(comp)
            box = (float(grown[1].start + xs.min()), float(grown[0].start + ys.min()),
                   float(grown[1].start + xs.max() + 1), float(grown[0].start + ys.max() + 1))
            detections.append(Detection(classify_shape(comp), color, box))
    return detections


def _with_edges(core: np.ndarray, rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Add the anti-aliased rim: neighbours of the core that are at least half-way from the background to the
    object's colour. Without it small shapes lose their corners and tips, and triangles start to look round."""
    colour = rgb[core].mean(0)
    ring = ndimage.binary_dilation(core, structure=_EIGHT) & ~core
    axis = colour - background
    alpha = (rgb[ring] - background) @ axis / max(float(axis @ axis), 1e-9)
    full = core.copy()
    full[ring] = alpha >= 0.5
    return full


def judge(image: Image.Image, meta: dict) -> OracleResult:
    """Decide every clause of a prompt's metadata from the image's pixels."""
    needs_text = bool(meta.get("text")) or any(e.get("class") == SIGN_CLASS for e in meta.get("include", []))
    detections = detect(image, ocr=needs_text)
    return OracleResult(detections, evaluate(meta, detections))
