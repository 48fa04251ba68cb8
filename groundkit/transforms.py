"""Image transforms for pixel-based grounding that carry the boxes and the text with the pixels.

Shared by the one-stage (co-grounding) and TransVG-style (CLIP-VG) models: letterboxing with an exact inverse, so
predictions map back to original pixels, and seeded training augmentation that keeps boxes, text and (for video)
all frames of a clip consistent.

A *sample* is a dict ``{"image": PIL image or tensor [3, H, W], "boxes": [K, 4] xyxy float, "text": str}``; other
keys pass through. Tensor images are ``uint8`` (0..255) or float (0..1 before :class:`Normalize`). Boxes use the
continuous pixel convention of :mod:`groundkit.boxes` (a box covering the whole image is ``0, 0, W, H``).

Every random transform splits into ``get_params(sample, generator)`` (all random draws, from the explicit
``torch.Generator``; ``None`` means torch's global generator) and a deterministic ``apply(sample, params)``, so
``transform(sample, generator)`` is reproducible from a seed and :func:`apply_to_clip` can apply one draw to every
frame of a video clip. The generator may also be a ``random.Random`` (one ``random()`` per uniform draw, the numbers
``rng.uniform`` gives), as the one-stage grounding code seeds its augmentation.

The training policies of the reference code map onto these transforms as follows (the differences are noted in
the docstrings: exact box geometry, whole-word text matching, no crop retry loop):

* CLIP-VG, with ``scales = [size - 32 * i for i in range(7)]``: ``Compose([RandomSelect(RandomResize(scales),
  Compose([RandomResize([400, 500, 600], side="short"), RandomSizeCrop(384, 600), RandomResize(scales)]), p=0.5,
  first_if_words=DIRECTION_WORDS), ColorJitter(0.4, 0.4, 0.4, p=0.8), Normalize(), Letterbox(size, fill=0.0,
  resize=False)])`` -- no flip (CLIP-VG found it harmful); TransVG adds ``RandomHorizontalFlip()`` after the
  jitter. Evaluation: ``Compose([Normalize(), Letterbox(size, fill=0.0)])``.
* one-stage grounding (YOLOv3-style, co-grounding): flip (``RandomHorizontalFlip(swap_rule="substring",
  pixel_index=True)`` for the official rules), ``RandomHSV(0.5, 0.5, saturation_bug=True)``, ``Letterbox(size)``,
  ``RandomAffine()``; co-grounding draws these in its own order and flips the letterboxed image
  (``groundkit/methods/cogrounding/data.py``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode

from .boxes import clip_boxes, convert_boxes, denormalize_boxes, scale_boxes, translate_boxes

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DIRECTION_WORDS",
    "LetterboxInfo",
    "letterbox",
    "image_size",
    "hsv_scale",
    "swap_left_right",
    "swap_substrings",
    "has_direction_word",
    "flip_boxes",
    "affine_boxes",
    "SampleTransform",
    "Compose",
    "RandomSelect",
    "RandomResize",
    "RandomSizeCrop",
    "OfficialSizeCrop",
    "ColorJitter",
    "RandomHSV",
    "RandomHorizontalFlip",
    "RandomAffine",
    "Normalize",
    "Letterbox",
    "apply_to_clip",
]

ImageLike = Image.Image | torch.Tensor
Sample = dict[str, Any]
Generator = torch.Generator | random.Random | None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Words that name a position in the frame. CLIP-VG (and TransVG) skip the crop branch when the text contains
#: one of "left", "right", "top", "bottom", "middle" (as substrings); the "-most" forms are listed so that the
#: whole-word check used here catches them too.
DIRECTION_WORDS = frozenset(
    {"left", "right", "top", "bottom", "middle", "leftmost", "rightmost", "topmost", "bottommost"}
)

_SWAP = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_SWAP_RE = re.compile(r"\b(?:leftmost|rightmost|left|right)\b", re.IGNORECASE)
_WORD_RE = re.compile(r"\w+")


# ----------------------------------------------------------------------------- text
def _match_case(template: str, word: str) -> str:
    if len(template) > 1 and template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def swap_left_right(text: str) -> str:
    """Swap "left" <-> "right" and "leftmost" <-> "rightmost" in ``text`` (whole words only, so "bright" and
    "leftover" stay; "left-hand" becomes "right-hand"), keeping each word's case ("Left" -> "Right",
    "LEFT" -> "RIGHT"). Applying it twice gives ``text`` back."""
    return _SWAP_RE.sub(lambda m: _match_case(m.group(0), _SWAP[m.group(0).lower()]), text)


def swap_substrings(text: str) -> str:
    """The one-stage grounding code's flip swap: every "right" <-> "left" substring, case-sensitive ("bright" ->
    "bleft", "Left" stays)."""
    return text.replace("right", "\0").replace("left", "right").replace("\0", "left")


def has_direction_word(text: str, words: Collection[str] = DIRECTION_WORDS, whole_words: bool = True) -> bool:
    """Whether ``text`` mentions one of ``words`` (case-insensitive). ``whole_words=False`` matches substrings,
    as the CLIP-VG / TransVG code does ("bright" then counts as "right")."""
    low = text.lower()
    if whole_words:
        lowered = {w.lower() for w in words}
        return any(tok in lowered for tok in _WORD_RE.findall(low))
    return any(w.lower() in low for w in words)


# ----------------------------------------------------------------------------- images
def image_size(image: ImageLike) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or a tensor image [C, H, W]."""
    if isinstance(image, torch.Tensor) and image.ndim != 3:
        raise ValueError(f"image: expected a tensor of shape [3, H, W], got {tuple(image.shape)}")
    if not isinstance(image, (torch.Tensor, Image.Image)):
        raise TypeError(f"image: expected a PIL image or a torch tensor, got {type(image).__name__}")
    h, w = TF.get_size(image)
    return int(w), int(h)


def _fill_value(image: ImageLike, fill: None | float | Sequence[float]) -> float | list[float] | tuple:
    """``fill`` in the form the image type takes; ``None``: the ImageNet mean colour in the image's range."""
    integral = isinstance(image, Image.Image) or not image.is_floating_point()
    if fill is None:
        fill = [m * 255.0 for m in IMAGENET_MEAN] if integral else list(IMAGENET_MEAN)
    values = [float(fill)] * 3 if isinstance(fill, (int, float)) else [float(f) for f in fill]
    if integral:
        values = [float(min(255, max(0, round(v)))) for v in values]
    if isinstance(image, Image.Image):
        return tuple(int(v) for v in values)
    return values


def _resize(image: ImageLike, width: int, height: int, interpolation: InterpolationMode) -> ImageLike:
    if image_size(image) == (width, height):
        return image
    return TF.resize(image, [height, width], interpolation=interpolation, antialias=True)


def hsv_scale(image: ImageLike, saturation: float = 1.0, value: float = 1.0) -> ImageLike:
    """Multiply the HSV saturation and value of an RGB image by ``saturation`` and ``value`` and clip them to
    their range (hue unchanged), as the YOLOv3-style grounding code does through OpenCV's HSV conversion.

    Computed in RGB without a hue round trip: with ``v = max(r, g, b)`` and ``s = 1 - min / max`` every channel
    is ``v * (1 - s * w)`` for a weight ``w`` that depends on the hue only. PIL in, PIL out; tensors [3, H, W]
    keep their dtype (uint8 rounded, float clipped to [0, 1]).
    """
    if isinstance(image, Image.Image):
        out = hsv_scale(TF.pil_to_tensor(image.convert("RGB")), saturation, value)
        return TF.to_pil_image(out)
    image_size(image)
    if image.shape[0] != 3:
        raise ValueError(f"image: expected 3 (RGB) channels, got {tuple(image.shape)}")
    x = image.float() / 255.0 if not image.is_floating_point() else image
    v = x.amax(0, keepdim=True)
    s = 1.0 - x.amin(0, keepdim=True) / v.clamp_min(1e-12)
    s = torch.where(v > 0, s, torch.zeros_like(s))
    new_s = (s * saturation).clamp(0.0, 1.0)
    ratio = torch.where(s > 0, new_s / s.clamp_min(1e-12), torch.ones_like(s))
    y = v - (v - x) * ratio  # saturation changed, value kept
    new_v = (v * value).clamp(0.0, 1.0)
    y = y * torch.where(v > 0, new_v / v.clamp_min(1e-12), torch.zeros_like(v))
    if not image.is_floating_point():
        return (y * 255.0).round_().clamp_(0, 255).to(image.dtype)
    return y.clamp_(0.0, 1.0).to(image.dtype)


def flip_boxes(boxes: Any, width: float, pixel_index: bool = False) -> Any:
    """xyxy boxes [..., 4] mirrored in an image ``width`` wide: ``x -> width - x`` (continuous coordinates), or
    ``width - x - 1`` with ``pixel_index`` (the one-stage grounding code's pixel-index rule). Same type out."""
    off = 1 if pixel_index else 0
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, dtype=np.float64)
    out[..., [0, 2]] = width - out[..., [2, 0]] - off
    return out


def affine_boxes(boxes: Any, matrix: np.ndarray, width: float, height: float) -> np.ndarray:
    """xyxy boxes [K, 4] -> the hull of each box's four corners mapped by the 3x3 ``matrix``, clipped to the
    ``width`` x ``height`` image (float64 numpy)."""
    rows = []
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        pts = matrix @ np.array([[x1, x2, x1, x2], [y1, y1, y2, y2], [1, 1, 1, 1.0]])
        hull = np.array([pts[0].min(), pts[1].min(), pts[0].max(), pts[1].max()])
        rows.append(np.clip(hull, 0, [width, height, width, height]))
    return np.stack(rows) if rows else np.zeros((0, 4))


# ----------------------------------------------------------------------------- letterbox
@dataclass(frozen=True)
class LetterboxInfo:
    """Where an ``orig_w`` x ``orig_h`` image sits in its ``size`` x ``size`` letterbox canvas: resized by
    ``scale`` (to ``round(orig_w * scale)`` x ``round(orig_h * scale)`` pixels) and shifted by
    ``pad_left``, ``pad_top``."""

    scale: float
    pad_left: int
    pad_top: int
    orig_w: int
    orig_h: int
    size: int

    @property
    def resized_w(self) -> int:
        return max(1, round(self.orig_w * self.scale))

    @property
    def resized_h(self) -> int:
        return max(1, round(self.orig_h * self.scale))

    @property
    def scale_x(self) -> float:
        """Exact horizontal scale of the pixels (``resized_w / orig_w``, ``scale`` up to rounding)."""
        return self.resized_w / self.orig_w

    @property
    def scale_y(self) -> float:
        return self.resized_h / self.orig_h

    def to_letterbox(self, boxes: Any, clip: bool = True) -> Any:
        """xyxy boxes [..., 4] in original pixels -> canvas pixels (clipped to the image area of the canvas
        unless ``clip=False``). numpy in, numpy out."""
        out = scale_boxes(boxes, self.scale_x, self.scale_y)
        if clip:
            out = clip_boxes(out, self.resized_w, self.resized_h)
        return translate_boxes(out, self.pad_left, self.pad_top)

    def to_original(self, boxes: Any, fmt: str = "xyxy", normalized: bool = False, clip: bool = True) -> Any:
        """Boxes [..., 4] predicted on the canvas -> xyxy boxes in original pixels, clipped to the original
        image unless ``clip=False``. ``fmt`` is the input format; ``normalized=True`` for boxes in canvas units
        (divided by ``size``), e.g. a TransVG / CLIP-VG ``cxcywh`` regression output."""
        if normalized:
            boxes = denormalize_boxes(boxes, self.size, self.size)
        if fmt != "xyxy":
            boxes = convert_boxes(boxes, fmt, "xyxy")
        out = translate_boxes(boxes, -self.pad_left, -self.pad_top)
        out = scale_boxes(out, 1.0 / self.scale_x, 1.0 / self.scale_y)
        return clip_boxes(out, self.orig_w, self.orig_h) if clip else out

    def padding_mask(self, device: str | torch.device | None = None) -> torch.Tensor:
        """Bool [size, size], True on padding (the key padding mask of a transformer over the canvas)."""
        mask = torch.ones((self.size, self.size), dtype=torch.bool, device=device)
        mask[self.pad_top : self.pad_top + self.resized_h, self.pad_left : self.pad_left + self.resized_w] = False
        return mask


def _letterbox_geometry(w: int, h: int, size: int, resize: bool) -> tuple[float, int, int]:
    if size <= 0:
        raise ValueError(f"size: expected a positive canvas side, got {size}")
    if resize:
        scale = size / max(w, h)
        return scale, max(1, round(w * scale)), max(1, round(h * scale))
    if w > size or h > size:
        raise ValueError(f"image of {w}x{h} does not fit a {size}x{size} canvas without resizing (resize=False)")
    return 1.0, w, h


def letterbox_info(width: int, height: int, size: int) -> LetterboxInfo:
    """The :class:`LetterboxInfo` that :func:`letterbox` (centred, resized) gives a ``width`` x ``height`` image,
    without touching pixels (e.g. when only boxes are mapped)."""
    scale, nw, nh = _letterbox_geometry(int(width), int(height), int(size), True)
    return LetterboxInfo(scale, (size - nw) // 2, (size - nh) // 2, int(width), int(height), int(size))


def letterbox(
    image: ImageLike,
    size: int,
    fill: None | float | Sequence[float] = None,
    resize: bool = True,
    offset: tuple[int, int] | None = None,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
) -> tuple[ImageLike, LetterboxInfo]:
    """Fit ``image`` into a ``size`` x ``size`` square keeping its aspect ratio -> (image [3, size, size] of the
    input's type, :class:`LetterboxInfo`).

    The long side is resized to ``size`` (``resize=False``: no resize, the image must already fit) and the rest
    is padded with ``fill``, equally on both sides (the odd pixel goes right / bottom), as the one-stage and
    TransVG / CLIP-VG code do. ``offset=(pad_left, pad_top)`` places the image elsewhere (random translation).
    ``fill=None`` pads with the ImageNet mean colour in the image's range; pass ``0.0`` for a normalised tensor.
    The padding mask is ``info.padding_mask()``. Boxes move with the integer padding actually applied (the
    one-stage code shifts them by the unrounded half padding, half a pixel off when the padding is odd).
    """
    w, h = image_size(image)
    scale, nw, nh = _letterbox_geometry(w, h, int(size), resize)
    if offset is None:
        left, top = (size - nw) // 2, (size - nh) // 2
    else:
        left, top = int(offset[0]), int(offset[1])
        if not (0 <= left <= size - nw and 0 <= top <= size - nh):
            raise ValueError(f"offset: {tuple(offset)} puts the {nw}x{nh} image outside the {size}x{size} canvas")
    out = _resize(image, nw, nh, interpolation)
    out = TF.pad(out, [left, top, size - nw - left, size - nh - top], fill=_fill_value(image, fill))
    return out, LetterboxInfo(scale, left, top, w, h, int(size))


# ----------------------------------------------------------------------------- randomness
def _rand(generator: Generator) -> float:
    """Uniform in [0, 1): one ``random()`` of a ``random.Random``, else one ``torch.rand`` draw."""
    if isinstance(generator, random.Random):
        return generator.random()
    return float(torch.rand((), generator=generator))


def _uniform(lo: float, hi: float, generator: Generator) -> float:
    return lo + (hi - lo) * _rand(generator)


def _randint(lo: int, hi: int, generator: Generator) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    if isinstance(generator, random.Random):
        return generator.randint(lo, hi)
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _permutation(n: int, generator: Generator) -> list[int]:
    """A random order of ``range(n)``."""
    if isinstance(generator, random.Random):
        return generator.sample(range(n), n)
    return torch.randperm(n, generator=generator).tolist()


def _coin(p: float, generator: Generator) -> bool:
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return _rand(generator) < p


def _boxes_of(sample: Sample) -> torch.Tensor | None:
    boxes = sample.get("boxes")
    if boxes is None:
        return None
    t = torch.as_tensor(boxes)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.ndim != 2 or t.shape[-1] != 4:
        raise ValueError(f"sample['boxes']: expected [K, 4] xyxy boxes, got {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------- transform protocol
class SampleTransform:
    """A transform of a sample dict. Subclasses draw their random parameters in :meth:`get_params` and apply
    them deterministically in :meth:`apply`; neither modifies the input dict."""

    def get_params(self, sample: Sample, generator: Generator) -> Any:
        """Random parameters for ``sample`` (its image size, boxes and text may be read)."""
        return None

    def apply(self, sample: Sample, params: Any) -> Sample:
        raise NotImplementedError

    def __call__(self, sample: Sample, generator: Generator = None) -> Sample:
        return self.apply(sample, self.get_params(sample, generator))

    def apply_clip(self, samples: Sequence[Sample], generator: Generator = None) -> list[Sample]:
        """One draw of the parameters, applied to every frame sample of a clip. The draw sees the first frame's
        image and text and the boxes of all frames together (a crop then keeps every frame's box)."""
        params = self.get_params(_clip_view(samples), generator)
        return [self.apply(s, params) for s in samples]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _clip_view(samples: Sequence[Sample]) -> Sample:
    if not samples:
        raise ValueError("a clip needs at least one frame")
    sizes = {image_size(s["image"]) for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a clip must have the same size, got {sorted(sizes)}")
    view = dict(samples[0])
    boxes = [b for b in (_boxes_of(s) for s in samples) if b is not None]
    if boxes:
        view["boxes"] = torch.cat([b.to(boxes[0].dtype) for b in boxes], 0)
    return view


class Compose(SampleTransform):
    """Apply ``transforms`` in order (each draws from the same generator)."""

    def __init__(self, transforms: Iterable[SampleTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: Generator = None) -> Sample:
        for t in self.transforms:
            sample = t(sample, generator)
        return sample

    def apply_clip(self, samples: Sequence[Sample], generator: Generator = None) -> list[Sample]:
        out = list(samples)
        for t in self.transforms:
            out = t.apply_clip(out, generator)
        return out

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class RandomSelect(SampleTransform):
    """``second`` with probability ``p``, else ``first``; always ``first`` when the text contains one of
    ``first_if_words`` (CLIP-VG: no crop branch for texts with a direction word)."""

    def __init__(
        self,
        first: SampleTransform,
        second: SampleTransform,
        p: float = 0.5,
        first_if_words: Collection[str] | None = None,
        whole_words: bool = True,
    ) -> None:
        self.first, self.second, self.p = first, second, float(p)
        self.first_if_words = None if first_if_words is None else frozenset(first_if_words)
        self.whole_words = whole_words

    def _pick(self, sample: Sample, generator: Generator) -> SampleTransform:
        if self.first_if_words and has_direction_word(sample.get("text", ""), self.first_if_words, self.whole_words):
            return self.first
        return self.second if _coin(self.p, generator) else self.first

    def __call__(self, sample: Sample, generator: Generator = None) -> Sample:
        return self._pick(sample, generator)(sample, generator)

    def apply_clip(self, samples: Sequence[Sample], generator: Generator = None) -> list[Sample]:
        return self._pick(_clip_view(samples), generator).apply_clip(samples, generator)


# ----------------------------------------------------------------------------- geometric transforms
class RandomResize(SampleTransform):
    """Resize, keeping the aspect ratio, so that the ``side`` ("long" or "short") becomes a size drawn from
    ``sizes``; with ``side="short"``, ``max_size`` caps the long side. Boxes follow (exact per-axis scale).
    ``RandomResize([s])`` is a plain resize."""

    def __init__(
        self,
        sizes: Sequence[int],
        side: str = "long",
        max_size: int | None = None,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    ) -> None:
        if side not in ("long", "short"):
            raise ValueError(f"side: expected 'long' or 'short', got {side!r}")
        if not sizes or any(int(s) <= 0 for s in sizes):
            raise ValueError(f"sizes: expected positive sizes, got {sizes!r}")
        self.sizes = [int(s) for s in sizes]
        self.side, self.max_size, self.interpolation = side, max_size, interpolation

    def get_params(self, sample: Sample, generator: Generator) -> tuple[int, int]:
        w, h = image_size(sample["image"])
        target = self.sizes[_randint(0, len(self.sizes) - 1, generator) if len(self.sizes) > 1 else 0]
        ref = max(w, h) if self.side == "long" else min(w, h)
        ratio = target / ref
        if self.max_size is not None and max(w, h) * ratio > self.max_size:
            ratio = self.max_size / max(w, h)
        return max(1, round(w * ratio)), max(1, round(h * ratio))

    def apply(self, sample: Sample, params: tuple[int, int]) -> Sample:
        out = dict(sample)
        w, h = image_size(sample["image"])
        nw, nh = params
        out["image"] = _resize(sample["image"], nw, nh, self.interpolation)
        boxes = _boxes_of(sample)
        if boxes is not None:
            out["boxes"] = scale_boxes(boxes, nw / w, nh / h)
        return out


class RandomSizeCrop(SampleTransform):
    """Crop a random ``cw`` x ``ch`` region (sides in [``min_size``, ``max_size``]) that keeps every box of the
    sample fully inside; boxes are shifted into the crop.

    The crop size is drawn uniformly among the sizes that can hold the boxes' enclosing box (clipped to the
    image), then the position uniformly among the positions that keep it inside, so no retry loop is needed.
    No crop when none fits (box larger than ``max_size``, image smaller than ``min_size``), with probability
    ``1 - p``, or when the text contains one of ``no_crop_words`` (e.g. :data:`DIRECTION_WORDS`).
    """

    def __init__(
        self,
        min_size: int,
        max_size: int,
        p: float = 1.0,
        no_crop_words: Collection[str] | None = None,
        whole_words: bool = True,
    ) -> None:
        if not 0 < int(min_size) <= int(max_size):
            raise ValueError(f"min_size, max_size: expected 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size, self.p = int(min_size), int(max_size), float(p)
        self.no_crop_words = None if no_crop_words is None else frozenset(no_crop_words)
        self.whole_words = whole_words

    def get_params(self, sample: Sample, generator: Generator) -> tuple[int, int, int, int] | None:
        """-> ``(left, top, width, height)`` of the crop, or None for no crop."""
        if self.no_crop_words and has_direction_word(sample.get("text", ""), self.no_crop_words, self.whole_words):
            return None
        if not _coin(self.p, generator):
            return None
        w, h = image_size(sample["image"])
        boxes = _boxes_of(sample)
        if boxes is not None and boxes.numel():
            enc = clip_boxes(torch.cat([boxes[:, :2].amin(0), boxes[:, 2:].amax(0)]), w, h).tolist()
            lo_x, hi_x = math.floor(enc[0]), math.ceil(enc[2])  # the crop must span [lo_x, hi_x]
            lo_y, hi_y = math.floor(enc[1]), math.ceil(enc[3])
        else:
            lo_x, hi_x, lo_y, hi_y = w, 0, h, 0  # nothing to keep
        min_w, max_w = max(self.min_size, hi_x - lo_x), min(w, self.max_size)
        min_h, max_h = max(self.min_size, hi_y - lo_y), min(h, self.max_size)
        if min_w > max_w or min_h > max_h:
            return None
        cw = _randint(min_w, max_w, generator)
        ch = _randint(min_h, max_h, generator)
        left = _randint(max(0, hi_x - cw), min(lo_x, w - cw), generator)
        top = _randint(max(0, hi_y - ch), min(lo_y, h - ch), generator)
        return left, top, cw, ch

    def apply(self, sample: Sample, params: tuple[int, int, int, int] | None) -> Sample:
        if params is None:
            return dict(sample)
        left, top, cw, ch = params
        out = dict(sample)
        out["image"] = TF.crop(sample["image"], top, left, ch, cw)
        boxes = _boxes_of(sample)
        if boxes is not None:
            out["boxes"] = clip_boxes(translate_boxes(boxes, -left, -top), cw, ch)
        return out


class OfficialSizeCrop(RandomSizeCrop):
    """TransVG's and CLIP-VG's ``RandomSizeCrop``, for reference mode: up to ``max_try`` draws of a crop size
    (each side in [``min_size``, min(side, ``max_size``)]) and a position; the first draw whose (top, left) lies
    below the box centre's (x, y) (the official code compares ``cx > top`` and ``cy > left``: axes swapped) is
    taken, and the box is cut to the crop, so it may lose part or all of the object; no crop after ``max_try``
    failed draws. :class:`RandomSizeCrop` is the fixed version (the box always inside); the crop itself is its
    ``apply`` (boxes shifted and clipped to the crop)."""

    def __init__(self, min_size: int, max_size: int, max_try: int = 20) -> None:
        super().__init__(min_size, max_size)
        self.max_try = int(max_try)

    def get_params(self, sample: Sample, generator: Generator) -> tuple[int, int, int, int] | None:
        w, h = image_size(sample["image"])
        if min(w, h) < self.min_size:
            return None  # the official randint would fail; its pipeline never gets here (short side >= 400)
        boxes = _boxes_of(sample)
        cx, cy = ((boxes[0, 0] + boxes[0, 2]) / 2, (boxes[0, 1] + boxes[0, 3]) / 2) if boxes is not None else (0, 0)
        for _ in range(self.max_try):
            cw = _randint(self.min_size, min(w, self.max_size), generator)
            ch = _randint(self.min_size, min(h, self.max_size), generator)
            top, left = _randint(0, h - ch, generator), _randint(0, w - cw, generator)
            if cx > top and cy > left:
                return left, top, cw, ch
        return None


class RandomHorizontalFlip(SampleTransform):
    """Mirror the image and the boxes (:func:`flip_boxes`: ``x -> W - x``; ``pixel_index``: ``W - x - 1``) with
    probability ``p`` and, with ``swap_words``, swap "left" / "right" in the text: ``swap_rule="words"``
    (:func:`swap_left_right`, whole words) or ``"substring"`` (:func:`swap_substrings`, the one-stage grounding
    code's rule). Keys absent from the sample are left out (a text alone can be swapped)."""

    def __init__(
        self, p: float = 0.5, swap_words: bool = True, swap_rule: str = "words", pixel_index: bool = False
    ) -> None:
        if swap_rule not in ("words", "substring"):
            raise ValueError(f"swap_rule: expected 'words' or 'substring', got {swap_rule!r}")
        self.p, self.swap_words, self.swap_rule, self.pixel_index = float(p), swap_words, swap_rule, pixel_index

    def get_params(self, sample: Sample, generator: Generator) -> bool:
        return _coin(self.p, generator)

    def apply(self, sample: Sample, params: bool) -> Sample:
        out = dict(sample)
        if not params:
            return out
        boxes = _boxes_of(sample)
        if boxes is not None:
            out["boxes"] = flip_boxes(boxes, image_size(sample["image"])[0], self.pixel_index)
        if "image" in sample:
            out["image"] = TF.horizontal_flip(sample["image"])
        if self.swap_words and isinstance(sample.get("text"), str):
            swap = swap_left_right if self.swap_rule == "words" else swap_substrings
            out["text"] = swap(sample["text"])
        return out


class Letterbox(SampleTransform):
    """:func:`letterbox` as a sample transform: sets ``image`` [3, size, size], ``boxes`` (canvas pixels),
    ``mask`` (bool [size, size], True on padding) and ``letterbox`` (:class:`LetterboxInfo`, to map predictions
    back). ``random_offset=True`` places the image at a random position (TransVG's ``aug_translate``)."""

    def __init__(
        self,
        size: int,
        fill: None | float | Sequence[float] = None,
        resize: bool = True,
        random_offset: bool = False,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    ) -> None:
        self.size, self.fill, self.resize = int(size), fill, resize
        self.random_offset, self.interpolation = random_offset, interpolation

    def get_params(self, sample: Sample, generator: Generator) -> tuple[int, int] | None:
        if not self.random_offset:
            return None
        w, h = image_size(sample["image"])
        _, nw, nh = _letterbox_geometry(w, h, self.size, self.resize)
        return _randint(0, self.size - nw, generator), _randint(0, self.size - nh, generator)

    def apply(self, sample: Sample, params: tuple[int, int] | None) -> Sample:
        out = dict(sample)
        out["image"], info = letterbox(sample["image"], self.size, self.fill, self.resize, params, self.interpolation)
        boxes = _boxes_of(sample)
        if boxes is not None:
            out["boxes"] = info.to_letterbox(boxes)
        out["mask"] = info.padding_mask()
        out["letterbox"] = info
        return out


class RandomAffine(SampleTransform):
    """The one-stage grounding code's ``random_affine``: rotation by up to ``degrees`` about the centre, scale
    in ``scale``, translation by up to ``translate`` of each side, shear by up to ``shear`` degrees on each axis.
    The image (PIL or uint8 tensor) is warped bilinearly over ``fill`` (``None``: the ImageNet mean colour); each
    box becomes the hull of its warped corners, clipped to the image (:func:`affine_boxes`)."""

    def __init__(
        self,
        degrees: float = 5.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        shear: float = 2.0,
        fill: None | float | Sequence[float] = None,
    ) -> None:
        self.degrees, self.translate, self.shear = float(degrees), float(translate), float(shear)
        self.scale, self.fill = (float(scale[0]), float(scale[1])), fill

    def get_params(self, sample: Sample, generator: Generator) -> np.ndarray:
        """-> the 3x3 matrix ``M`` (output pixel = ``M`` @ input pixel); drawn in the official order: angle,
        scale, x and y translation, x and y shear."""
        w, h = image_size(sample["image"])
        a = math.radians(_uniform(-self.degrees, self.degrees, generator))
        s = _uniform(*self.scale, generator)
        tx = _uniform(-self.translate, self.translate, generator) * w
        ty = _uniform(-self.translate, self.translate, generator) * h
        shx = math.tan(math.radians(_uniform(-self.shear, self.shear, generator)))
        shy = math.tan(math.radians(_uniform(-self.shear, self.shear, generator)))
        R = np.array([[s * math.cos(a), -s * math.sin(a), 0], [s * math.sin(a), s * math.cos(a), 0], [0, 0, 1]])
        C = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1.0]])
        Cb = np.array([[1, 0, w / 2], [0, 1, h / 2], [0, 0, 1.0]])
        T = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])
        Sh = np.array([[1, shx, 0], [shy, 1, 0], [0, 0, 1.0]])
        return T @ Sh @ Cb @ R @ C

    def apply(self, sample: Sample, params: np.ndarray | None) -> Sample:
        out = dict(sample)
        if params is None:
            return out
        image = sample["image"]
        w, h = image_size(image)
        if isinstance(image, torch.Tensor) and image.dtype != torch.uint8:
            raise TypeError(f"RandomAffine: expected a PIL image or a uint8 tensor, got {image.dtype}")
        pil = image if isinstance(image, Image.Image) else TF.to_pil_image(image)
        inv = tuple(np.linalg.inv(params)[:2].ravel())
        warped = pil.transform(
            (w, h), Image.AFFINE, inv, resample=Image.BILINEAR, fillcolor=_fill_value(pil, self.fill)
        )
        out["image"] = warped if isinstance(image, Image.Image) else TF.pil_to_tensor(warped)
        boxes = _boxes_of(sample)
        if boxes is not None:
            out["boxes"] = torch.as_tensor(affine_boxes(boxes, params, w, h), dtype=boxes.dtype)
        return out


# ----------------------------------------------------------------------------- photometric transforms
class ColorJitter(SampleTransform):
    """With probability ``p``, brightness, contrast and saturation factors drawn from ``[1 - x, 1 + x]`` (and a
    hue shift from ``[-hue, hue]``), applied in a random order through torchvision's ``adjust_*`` (the blend
    formulas of PIL's ``ImageEnhance`` used by TransVG / CLIP-VG: ``ColorJitter(0.4, 0.4, 0.4, p=0.8)``)."""

    def __init__(
        self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.0, p: float = 1.0
    ) -> None:
        for name, value, top in (
            ("brightness", brightness, 1.0),
            ("contrast", contrast, 1.0),
            ("saturation", saturation, 1.0),
            ("hue", hue, 0.5),
        ):
            if not 0.0 <= float(value) <= top:
                raise ValueError(f"{name}: expected a value in [0, {top}], got {value}")
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)
        self.hue, self.p = float(hue), float(p)

    def get_params(self, sample: Sample, generator: Generator) -> list[tuple[str, float]]:
        if not _coin(self.p, generator):
            return []
        ops = [
            (n, x)
            for n, x in (
                ("brightness", self.brightness),
                ("contrast", self.contrast),
                ("saturation", self.saturation),
                ("hue", self.hue),
            )
            if x > 0
        ]
        order = _permutation(len(ops), generator)
        steps = []
        for i in order:
            name, x = ops[i]
            lo, hi = (-x, x) if name == "hue" else (1.0 - x, 1.0 + x)
            steps.append((name, _uniform(lo, hi, generator)))
        return steps

    def apply(self, sample: Sample, params: list[tuple[str, float]]) -> Sample:
        out = dict(sample)
        image = sample["image"]
        fns = {
            "brightness": TF.adjust_brightness,
            "contrast": TF.adjust_contrast,
            "saturation": TF.adjust_saturation,
            "hue": TF.adjust_hue,
        }
        for name, factor in params:
            image = fns[name](image, factor)
        out["image"] = image
        return out


class RandomHSV(SampleTransform):
    """With probability ``p``, scale HSV saturation and value by factors drawn from ``[1 - saturation,
    1 + saturation]`` and ``[1 - value, 1 + value]`` (:func:`hsv_scale`), the YOLOv3-style grounding
    augmentation (fraction 0.5). ``saturation_bug=True`` is the one-stage grounding code: the saturation factor
    is drawn but never applied (only V changes; the draws stay those of the fixed version)."""

    def __init__(self, saturation: float = 0.5, value: float = 0.5, p: float = 1.0, saturation_bug: bool = False):
        if not (0.0 <= saturation <= 1.0 and 0.0 <= value <= 1.0):
            raise ValueError(f"saturation, value: expected fractions in [0, 1], got {saturation}, {value}")
        self.saturation, self.value, self.p = float(saturation), float(value), float(p)
        self.saturation_bug = saturation_bug

    def get_params(self, sample: Sample, generator: Generator) -> tuple[float, float] | None:
        if not _coin(self.p, generator):
            return None
        a = _uniform(1.0 - self.saturation, 1.0 + self.saturation, generator) if self.saturation else 1.0
        b = _uniform(1.0 - self.value, 1.0 + self.value, generator) if self.value else 1.0
        return (1.0 if self.saturation_bug else a), b

    def apply(self, sample: Sample, params: tuple[float, float] | None) -> Sample:
        out = dict(sample)
        if params is not None:
            out["image"] = hsv_scale(sample["image"], *params)
        return out


class Normalize(SampleTransform):
    """Image -> float32 tensor [3, H, W], ``(x - mean) / std`` on the 0..1 scale (PIL and uint8 are divided
    by 255 first; float tensors are taken as 0..1). Defaults: :data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def apply(self, sample: Sample, params: Any) -> Sample:
        out = dict(sample)
        image = sample["image"]
        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(image.convert("RGB"))
        image = TF.to_dtype(image, torch.float32, scale=True)
        out["image"] = TF.normalize(image, self.mean, self.std)
        return out


# ----------------------------------------------------------------------------- video clips
def apply_to_clip(
    transform: SampleTransform,
    frames: torch.Tensor | Sequence[ImageLike],
    boxes_per_frame: torch.Tensor | Sequence[Any] | None,
    text: str,
    generator: Generator = None,
) -> dict[str, Any]:
    """Apply ``transform`` to a video clip with one draw of its random parameters for all frames, so the
    frames stay aligned (same resize, crop, flip, colour change, letterbox placement).

    ``frames``: a [T, 3, H, W] tensor or a sequence of T images of one size; ``boxes_per_frame``: [T, K, 4]
    or a sequence of T [K_t, 4] xyxy boxes (``None``: no boxes). Returns ``{"frames", "boxes", "text"}``
    with frames / boxes in the input's container type (a stacked tensor for tensor input, else lists), plus
    the keys a transform adds (``mask``, ``letterbox``), taken from the first frame: they are equal for all.
    """
    frame_list = list(frames.unbind(0)) if isinstance(frames, torch.Tensor) else list(frames)
    if boxes_per_frame is None:
        box_list: list[Any] = [None] * len(frame_list)
    elif isinstance(boxes_per_frame, torch.Tensor):
        box_list = list(boxes_per_frame.unbind(0))
    else:
        box_list = list(boxes_per_frame)
    if len(box_list) != len(frame_list):
        raise ValueError(f"boxes_per_frame: expected one entry per frame ({len(frame_list)}), got {len(box_list)}")
    samples = []
    for image, boxes in zip(frame_list, box_list):
        s: Sample = {"image": image, "text": text}
        if boxes is not None:
            s["boxes"] = boxes
        samples.append(s)
    out = transform.apply_clip(samples, generator)
    images = [s["image"] for s in out]
    result: dict[str, Any] = {k: v for k, v in out[0].items() if k not in ("image", "boxes", "text")}
    result["frames"] = torch.stack(images) if isinstance(frames, torch.Tensor) else images
    if boxes_per_frame is None:
        result["boxes"] = None
    else:
        boxes_out = [torch.as_tensor(s["boxes"]) for s in out]
        result["boxes"] = torch.stack(boxes_out) if isinstance(boxes_per_frame, torch.Tensor) else boxes_out
    result["text"] = out[0]["text"]
    return result
