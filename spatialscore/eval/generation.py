"""Sample a generator on a prompt set, judge the images with the shapes-world oracle, and draw image grids.

Accuracy is the share of prompts whose every clause the oracle confirms (GenEval's rule), overall and per tag; the
oracle reads pixels only, never the reward a run optimised.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from spatialscore.io import atomic_write_bytes


def oracle_accuracy(images: torch.Tensor, metas: list[dict]) -> dict:
    """{"overall": share passed, "by_tag": {tag: share}, "n": N, "passed": [bool]} for images [N, 3, H, W] in [0, 1]."""
    from spatialscore.data.oracle import judge
    from spatialscore.heads.shapes import to_pil

    passed = [judge(to_pil(image), meta).passed for image, meta in zip(images, metas)]
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for ok, meta in zip(passed, metas):
        by_tag[meta.get("tag", "?")].append(ok)
    return {"overall": float(np.mean(passed)) if passed else 0.0, "n": len(passed), "passed": passed,
            "by_tag": {tag: float(np.mean(v)) for tag, v in sorted(by_tag.items())}}


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """An image [3, H, W] in [0, 1] as an H x W x 3 uint8 array."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def image_grid(images: torch.Tensor, columns: int | None = None, captions: list[str] | None = None,
               pad: int = 2) -> Image.Image:
    """A grid of images [N, 3, H, W] in [0, 1], optionally each with a short caption strip under it."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    strip = 12 if captions else 0
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + strip + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = pad + (i % columns) * (w + pad), pad + (i // columns) * (h + strip + pad)
        grid.paste(Image.fromarray(to_uint8(image)), (x, y))
        if captions:
            draw.text((x, y + h), captions[i][: max(1, w // 6)], fill=(0, 0, 0))
    return grid


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None,
              captions: list[str] | None = None) -> Path:
    import io

    buffer = io.BytesIO()
    image_grid(images, columns, captions).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
