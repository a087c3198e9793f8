"""The default shapes-world renderer: PIL drawing at 4x, box-filtered down (anti-aliased edges), any image size."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spatialscore.data.scene import SIGN_BORDER, SIGN_FONT, Scene
from spatialscore.data.vocab import COLORS, SHAPES

SUPERSAMPLE = 4
SIGN_FILL = (252, 252, 250)
SIGN_EDGE = (128, 128, 128)
INK = (15, 15, 15)


@lru_cache(maxsize=64)
def sign_font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font: identical on every machine, no system font needed."""
    return ImageFont.load_default(size=px)


def _draw_objects(draw: ImageDraw.ImageDraw, scene: Scene, W: int, H: int, fill) -> None:
    for obj in scene.objects:
        poly = obj.polygon()
        if poly is None:
            r = obj.radius
            draw.ellipse([(obj.x - r) * W, (obj.y - r) * H, (obj.x + r) * W, (obj.y + r) * H], fill=fill(obj))
        else:
            draw.polygon([(float(px) * W, float(py) * H) for px, py in poly], fill=fill(obj))


# The number of classes in each of render_labels' maps: background, the shapes, and signs / background and the colours
SHAPE_CLASSES, COLOR_CLASSES = len(SHAPES) + 2, len(COLORS) + 1


def render_labels(scene: Scene, size: int) -> np.ndarray:
    """Class maps of a scene, uint8 [2, size, size]: the shape (1 + index in SHAPES; 1 + len(SHAPES) for a sign)
    and the colour (1 + index in COLORS; 0 for signs) under each pixel, 0 where the background shows. A generator's
    training target besides the pixels (train.layout_weight), never an input."""
    shape_map, colour_map = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    colours = list(COLORS)
    _draw_objects(ImageDraw.Draw(shape_map), scene, size, size, lambda o: 1 + SHAPES.index(o.shape))
    _draw_objects(ImageDraw.Draw(colour_map), scene, size, size, lambda o: 1 + colours.index(o.color))
    for sign in scene.signs:
        x0, y0, x1, y1 = sign.bbox()
        ImageDraw.Draw(shape_map).rectangle([x0 * size, y0 * size, x1 * size, y1 * size], fill=SHAPE_CLASSES - 1)
        ImageDraw.Draw(colour_map).rectangle([x0 * size, y0 * size, x1 * size, y1 * size], fill=0)
    return np.stack([np.asarray(shape_map), np.asarray(colour_map)])


def render(scene: Scene, size: int | tuple[int, int] = 128) -> Image.Image:
    w, h = (size, size) if isinstance(size, int) else size
    W, H = w * SUPERSAMPLE, h * SUPERSAMPLE
    img = Image.new("RGB", (W, H), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    _draw_objects(draw, scene, W, H, lambda o: o.rgb)
    side = min(W, H)
    for sign in scene.signs:
        x0, y0, x1, y1 = sign.bbox()
        draw.rectangle([x0 * W, y0 * H, x1 * W, y1 * H], fill=SIGN_FILL, outline=SIGN_EDGE,
                       width=max(1, round(SIGN_BORDER * side)))
        font = sign_font(max(4, round(SIGN_FONT * side)))
        draw.text((sign.x * W, sign.y * H), sign.text, fill=INK, font=font, anchor="mm")
    return img.resize((w, h), Image.BOX)
