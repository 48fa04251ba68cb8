"""Uploaded images in, drawn images and video thumbnails out, for the web page.

Everything here works on bytes and on paths from the server's own tables, never on a path taken from a
request. An upload is judged by its content (not its name or declared type): its size, the image type
PIL identifies, its pixel count (checked from the header before any pixel is decoded: the
decompression-bomb guard) and a full decode.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from ..draw import draw_boxes as shared_draw_boxes

__all__ = [
    "ALLOWED_FORMATS",
    "InputError",
    "Limits",
    "decode_upload",
    "draw_boxes",
    "encode_png",
    "size_text",
    "image_file_thumbnail",
    "thumbnail_jpeg",
    "video_thumbnails",
]

#: image types accepted by content (PIL's format names) -> what the page calls them
ALLOWED_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "GIF": "GIF"}

#: colours of the drawn boxes, one per expression (cycled)
BOX_COLOURS = ["#ff2d55", "#00c853", "#2979ff", "#ffab00", "#d500f9", "#00b8d4", "#ff6d00", "#64dd17"]


class InputError(Exception):
    """A request the server refuses: an HTTP status and a message for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_upload_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_text: int = 200
    max_texts: int = 8
    max_k: int = 50
    display_side: int = 800  # the drawn image's longer side (boxes are reported in original pixels)


def size_text(n: float) -> str:
    """A byte count for a message: KB under 1 MB, else MB with one decimal."""
    return f"{n / 1024:.0f} KB" if n < 1024 * 1024 else f"{n / (1024 * 1024):.1f} MB"


def decode_upload(data: bytes, limits: Limits) -> Image.Image:
    """The uploaded bytes as an RGB image, or :class:`InputError` (413 too large, 415 not a supported
    image, 400 empty, damaged or too many pixels)."""
    if not data:
        raise InputError(400, "the uploaded file is empty: choose an image file")
    if len(data) > limits.max_upload_bytes:
        raise InputError(413, f"the image file is larger than the {size_text(limits.max_upload_bytes)} limit")
    kinds = ", ".join(ALLOWED_FORMATS.values())
    with warnings.catch_warnings():
        # PIL warns (then raises) on huge images; both become the 400 below
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise InputError(415, f"the file is not an image (its content is none of: {kinds})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(400, _too_many_pixels(None, limits)) from None
        except Exception as e:  # a header PIL recognises but cannot parse
            raise InputError(400, f"the image file is damaged ({type(e).__name__})") from None
        if img.format not in ALLOWED_FORMATS:
            raise InputError(415, f"unsupported image type {img.format}: send {kinds}")
        w, h = img.size
        if w < 1 or h < 1:
            raise InputError(400, "the image has no pixels")
        if w * h > limits.max_pixels:  # before any pixel is decoded
            raise InputError(400, _too_many_pixels((w, h), limits))
        try:
            img.verify()
            img = Image.open(io.BytesIO(data))  # verify() leaves the image unusable
            img.load()
            img = ImageOps.exif_transpose(img)  # boxes in the orientation the user sees
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(400, _too_many_pixels((w, h), limits)) from None
        except Exception as e:
            raise InputError(400, f"the image file is damaged or truncated ({type(e).__name__})") from None
    return img.convert("RGB")


def _too_many_pixels(size: tuple[int, int] | None, limits: Limits) -> str:
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "too many pixels"
    return f"the image is {what}; the limit is {limits.max_pixels:,} pixels (decompression-bomb guard)"


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def draw_boxes(img: Image.Image, results: Sequence[dict[str, Any]], display_side: int = 800) -> Image.Image:
    """A copy of ``img`` at most ``display_side`` pixels on its longer side with each result's box
    (original-pixel ``[x1, y1, x2, y2]``) drawn and labelled with its expression number and score."""
    s = min(1.0, display_side / max(img.size))
    labels = []
    for i, r in enumerate(results):
        score = r.get("score")
        labels.append(
            f"{i + 1}" + (f"  {score:.2f}" if isinstance(score, (int, float)) and math.isfinite(score) else "")
        )
    return shared_draw_boxes(img, [r["box"] for r in results], BOX_COLOURS, labels, scale=s)


def thumbnail_jpeg(img: Image.Image, side: int = 192) -> bytes:
    img = img.convert("RGB")
    img.thumbnail((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def video_thumbnails(path: Path, n: int, side: int = 192, max_pixels: int = 40_000_000) -> list[bytes]:
    """``n`` frames spread over a video file (seeking, so a long video is not decoded whole), as JPEG
    thumbnails; PyAV decodes (``pip install av``)."""
    import av  # noqa: PLC0415 (optional, loaded on first use)

    out: list[bytes] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.width * stream.height > max_pixels:
            raise ValueError(f"{stream.width}x{stream.height} video frames exceed the pixel limit")
        tb = float(stream.time_base) if stream.time_base else 0.0
        if stream.duration and tb:
            duration = float(stream.duration * tb)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        if duration <= 0 or not tb:  # no duration: the first n frames
            for frame in container.decode(stream):
                out.append(thumbnail_jpeg(frame.to_image(), side))
                if len(out) >= n:
                    break
            return out
        start = float(stream.start_time * tb) if stream.start_time else 0.0
        for i in range(n):
            t = start + duration * (i + 0.5) / n
            container.seek(int(t / tb), stream=stream, backward=True, any_frame=False)
            best = None
            for frame in container.decode(stream):
                best = frame
                if frame.pts is not None and frame.pts * tb >= t:
                    break
            if best is not None:
                out.append(thumbnail_jpeg(best.to_image(), side))
    return out


def image_file_thumbnail(path: Path, side: int, limits: Limits) -> bytes:
    """A frame image file of the collection (a path from the server's table) as a JPEG thumbnail,
    with the same pixel guard as uploads."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > limits.max_pixels:
                raise ValueError(f"{path.name}: {img.size[0]}x{img.size[1]} exceeds the pixel limit")
            return thumbnail_jpeg(img, side)
