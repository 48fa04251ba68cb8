"""Drawing on images for people to look at: boxes with labels, and a caption strip under a picture.

Shared by every method's demo figures (``groundkit/methods/<name>/visualize.py``) so that boxes look
the same everywhere: a box is ``[x1, y1, x2, y2]`` in the image's pixels, drawn on a copy.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["GREEN", "RED", "ORANGE", "GREY", "BLUE", "font", "draw_boxes", "add_caption", "frame", "spaced_indices"]

#: the demo figures' conventions: true boxes green, a correct prediction orange, a wrong one red
GREEN = (30, 170, 60)
RED = (220, 30, 30)
ORANGE = (245, 140, 0)
GREY = (150, 150, 150)
BLUE = (30, 100, 220)


def font(size: int = 12) -> Any:
    """PIL's built-in font at ``size`` pixels (Pillow < 10.1: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    colors: Sequence[tuple[int, int, int] | str] | tuple[int, int, int],
    labels: Sequence[str] | None = None,
    scale: float = 1.0,
    width: int | None = None,
) -> Image.Image:
    """A copy of ``image`` (resized by ``scale``) with each box outlined in its colour and, when given,
    its label on a filled tag above the box (inside it when there is no room above). Boxes are in the
    original image's pixels; coordinates outside the image are clipped, non-finite boxes skipped."""
    img = image.convert("RGB")
    if scale != 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    if isinstance(colors, tuple) and len(colors) == 3 and all(isinstance(c, int) for c in colors):
        colors = [colors] * len(boxes)  # type: ignore[list-item]
    line = width or max(2, round(max(img.size) / 200))
    f = font(max(11, round(max(img.size) / 40)))
    tags: list[tuple[float, float, float, float]] = []
    for i, box in enumerate(boxes):
        vals = [float(v) * scale for v in box]
        if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
            continue
        x1, x2 = sorted(min(max(v, 0.0), img.width - 1.0) for v in (vals[0], vals[2]))
        y1, y2 = sorted(min(max(v, 0.0), img.height - 1.0) for v in (vals[1], vals[3]))
        c = colors[i % len(colors)]  # type: ignore[index]
        col = c if isinstance(c, str) else tuple(c)  # an RGB triple or any PIL colour string ("#ff2d55")
        d.rectangle([x1, y1, x2, y2], outline=col, width=line)
        label = labels[i] if labels is not None and i < len(labels) else ""
        if label:
            tb = d.textbbox((0, 0), label, font=f)
            tw, th = tb[2] - tb[0], tb[3] - tb[1]
            ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1 + line
            for _ in range(len(tags)):  # move down past the tags already drawn that it would cover
                hit = [t for t in tags if x1 < t[2] and t[0] < x1 + tw + 4 and ty < t[3] and t[1] < ty + th + 4]
                if not hit:
                    break
                ty = max(t[3] for t in hit) + 1
            tags.append((x1, ty, x1 + tw + 4, ty + th + 4))
            d.rectangle(tags[-1], fill=col)
            d.text((x1 + 2 - tb[0], ty + 2 - tb[1]), label, fill=(255, 255, 255), font=f)
    return img


def add_caption(image: Image.Image, lines: Sequence[str], size: int = 13, width_chars: int = 0) -> Image.Image:
    """``image`` with a white strip below holding ``lines`` (each wrapped to the picture's width)."""
    f = font(size)
    chars = width_chars or max(20, int(image.width / (size * 0.55)))
    wrapped = [w for ln in lines for w in (textwrap.wrap(ln, chars) or [""])]
    lh = size + 4
    out = Image.new("RGB", (image.width, image.height + lh * len(wrapped) + (6 if wrapped else 0)), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    d = ImageDraw.Draw(out)
    for j, ln in enumerate(wrapped):
        d.text((4, image.height + 3 + j * lh), ln, fill=(0, 0, 0), font=f)
    return out


def frame(image: Image.Image, color: tuple[int, int, int], width: int = 4) -> Image.Image:
    """``image`` inside a coloured border ``width`` pixels wide."""
    out = Image.new("RGB", (image.width + 2 * width, image.height + 2 * width), color)
    out.paste(image.convert("RGB"), (width, width))
    return out


def spaced_indices(n_items: int, n: int) -> list[int]:
    """``n`` evenly spaced indices of ``range(n_items)`` (all of them when there are fewer), first one 0: which
    samples a figure shows, the same ones on every run."""
    if n <= 0 or n_items <= 0:
        return []
    if n >= n_items:
        return list(range(n_items))
    return sorted({int(i) for i in np.linspace(0, n_items - 1, n).round()})
