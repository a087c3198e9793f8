"""The default shapes-world renderer: PIL drawing at 4x, box-filtered down (anti-aliased edges), any image size."""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from spatialscore.data.scene import SIGN_BORDER, SIGN_FONT, Scene

SUPERSAMPLE = 4
SIGN_FILL = (252, 252, 250)
SIGN_EDGE = (128, 128, 128)
INK = (15, 15, 15)


@lru_cache(maxsize=64)
def sign_font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font: identical on every machine, no system font needed."""
    return ImageFont.load_default(size=px)


def render(scene: Scene, size: int | tuple[int, int] = 128) -> Image.Image:
    w, h = (size, size) if isinstance(size, int) else size
    W, H = w * SUPERSAMPLE, h * SUPERSAMPLE
    img = Image.new("RGB", (W, H), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        poly = obj.polygon()
        if poly is None:
            r = obj.radius
            draw.ellipse([(obj.x - r) * W, (obj.y - r) * H, (obj.x + r) * W, (obj.y + r) * H], fill=obj.rgb)
        else:
            draw.polygon([(float(px) * W, float(py) * H) for px, py in poly], fill=obj.rgb)
    side = min(W, H)
    for sign in scene.signs:
        x0, y0, x1, y1 = sign.bbox()
        draw.rectangle([x0 * W, y0 * H, x1 * W, y1 * H], fill=SIGN_FILL, outline=SIGN_EDGE,
                       width=max(1, round(SIGN_BORDER * side)))
        font = sign_font(max(4, round(SIGN_FONT * side)))
        draw.text((sign.x * W, sign.y * H), sign.text, fill=INK, font=font, anchor="mm")
    return img.resize((w, h), Image.BOX)
