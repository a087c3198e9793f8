"""A rough renderer: shapes-world scenes drawn the way a small generator draws them, for training reward models that
must rank generated images, not only clean renders.

A generator trained on the shapes world outputs low-resolution images with soft, lumpy outlines, slightly tinted
backgrounds and sensor-like noise. A reward model trained only on crisp renders ranks such images close to chance
even when it ranks clean pairs perfectly (the pair's meaning is in its layout, which these changes keep). `rough`
draws a scene at a random lower resolution, warps it with a smooth random displacement field (lumpy outlines that
keep each object where it was), tints the whole image and adds noise; everything random comes from `rng`, so a pair
index always yields the same pixels. The displacement is small next to the relation margin faithful scenes keep
(scene.RELATION_MARGIN), so a faithful scene stays faithful and a perturbed one stays wrong.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image
from scipy import ndimage

from spatialscore.data.render import render
from spatialscore.data.scene import Scene

DRAW_SIZES = (32, 48, 64, 96)  # the resolution the scene is drawn at before it is resized to the output size
WARP_GRID = 8  # control points per side of the displacement field
WARP_STD = 0.015  # displacement std, as a fraction of the image side (the relation margin is 0.12)
NOISE_STD = 6.0  # pixel noise, in 0-255 units


def smooth_warp(image: np.ndarray, rng: random.Random, std: float = WARP_STD, grid: int = WARP_GRID) -> np.ndarray:
    """`image` (H, W, 3 uint8) resampled through a smooth random displacement field: control offsets drawn at a
    grid x grid lattice with std `std` of the side, interpolated cubically to every pixel."""
    h, w = image.shape[:2]
    seed = rng.getrandbits(32)
    offsets = np.random.default_rng(seed).normal(0.0, std, size=(2, grid, grid))
    field = np.stack([ndimage.zoom(offsets[k], (h / grid, w / grid), order=3)[:h, :w] for k in range(2)])
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([rows + field[0] * h, cols + field[1] * w])
    out = np.stack([ndimage.map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="nearest")
                    for c in range(image.shape[2])], -1)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def rough(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """`scene` drawn rough at `size` px: a random lower draw resolution, a smooth warp, a colour tint and noise."""
    draw = min(rng.choice(DRAW_SIZES), size)
    image = np.asarray(render(scene, draw).resize((size, size), Image.BILINEAR))
    image = smooth_warp(image, rng, std=WARP_STD * rng.uniform(0.5, 1.5))
    noise_rng = np.random.default_rng(rng.getrandbits(32))
    tint = noise_rng.normal(0.0, 8.0, size=3)  # one shift of the whole image's colour, like a tinted background
    noisy = image.astype(np.float32) + tint + noise_rng.normal(0.0, NOISE_STD * rng.random(), size=image.shape)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
