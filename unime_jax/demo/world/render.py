"""Drawing a scene: flat-coloured polygons on a white canvas, no antialiasing (every pixel is the
background or one of the scene's colours)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from unime_jax.demo.world.scenes import BACKGROUND, COLOURS, Scene

# ----------------------------------------------------------------------------------------------
# Rendering


# Unit 5-point star (outer radius 1, inner 0.45), nudged down to centre it in its box.
_STAR_UNIT: tuple[tuple[float, float], ...] = tuple(
    (
        (1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
        0.05 + (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5),
    )
    for k in range(10)
)


def _polygon(name: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if name == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if name == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if name == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if name == "star":
        return [(cx + r * u, cy + r * v) for u, v in _STAR_UNIT]
    if name == "cross":
        w = 0.33 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {name!r}")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw ``scene`` on a ``size``×``size`` white RGB canvas (exact colours, no antialiasing)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * size, o.y * size, o.radius * size
        fill = COLOURS[o.desc.colour]
        if o.desc.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o.desc.shape, cx, cy, r), fill=fill)
    return img
