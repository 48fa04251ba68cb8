"""Box operations shared by the grounding methods: format conversion, IoU / GIoU, clipping and scaling.

Thin, checked wrappers around ``torchvision.ops`` so every method converts and compares boxes the same way.

Conventions:

* ``xyxy`` is ``x1, y1, x2, y2`` in continuous pixel coordinates (width ``x2 - x1``), ``xywh`` is the
  top-left corner plus size (COCO / refer annotations), ``cxcywh`` the centre plus size (DETR-style
  regression targets). "Normalised" boxes divide x-like values by the image width and y-like values by
  the image height, which is the same operation in all three formats.
* Functions take torch tensors or numpy arrays; box results are numpy for numpy input and tensors
  otherwise. Integer input is promoted to float64 (exact); float dtypes are kept.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_area as _tv_box_area
from torchvision.ops import box_convert as _tv_box_convert
from torchvision.ops import box_iou as _tv_box_iou
from torchvision.ops import clip_boxes_to_image as _tv_clip_boxes
from torchvision.ops import generalized_box_iou as _tv_giou
from torchvision.ops import generalized_box_iou_loss as _tv_giou_loss

__all__ = [
    "BOX_FORMATS",
    "convert_boxes",
    "xyxy_to_xywh",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "cxcywh_to_xyxy",
    "normalize_boxes",
    "denormalize_boxes",
    "box_area",
    "clip_boxes",
    "scale_boxes",
    "translate_boxes",
    "box_iou",
    "paired_box_iou",
    "batched_box_iou",
    "generalized_box_iou",
    "paired_generalized_box_iou",
]

Array = np.ndarray | torch.Tensor
Size = float | int | Array

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


# ----------------------------------------------------------------------------- helpers
def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if any(s < 0 for s in x.strides) or not x.dtype.isnative:
            x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))  # torch cannot view these
        with warnings.catch_warnings():  # read-only (e.g. memory-mapped) arrays are only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(x)
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as e:  # pragma: no cover - message only
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}") from e


def _float(t: torch.Tensor) -> torch.Tensor:
    """Floating view of ``t``: float dtypes kept, integers/bools promoted to float64 (exact)."""
    return t if t.is_floating_point() else t.to(torch.float64)


def _check_boxes(t: torch.Tensor, name: str, pixel_offset: float) -> None:
    if t.ndim != 2 or t.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape [N, 4] (x1, y1, x2, y2), got {tuple(t.shape)}")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: boxes contain NaN or inf")
    if t.numel():
        wh = t[:, 2:] - t[:, :2] + pixel_offset
        if bool((wh < 0).any()):
            bad = int(torch.nonzero((wh < 0).any(1))[0])
            raise ValueError(f"{name}: box {bad} has x2 < x1 or y2 < y1: {t[bad].tolist()}")


def _check_any_boxes(t: torch.Tensor, name: str) -> None:
    if t.ndim < 1 or t.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape [..., 4], got {tuple(t.shape)}")


def _out_like(result: torch.Tensor, *inputs: Any) -> Array:
    """numpy if every input was numpy, else the tensor."""
    if all(isinstance(i, np.ndarray) for i in inputs):
        return result.cpu().numpy()
    return result


def _boxes_in(boxes: Any, name: str = "boxes") -> torch.Tensor:
    t = _float(_to_tensor(boxes, name))
    _check_any_boxes(t, name)
    return t


def _xy_factors(t: torch.Tensor, x: Size, y: Size, name_x: str, name_y: str) -> torch.Tensor:
    """[..., 4] factors ``(x, y, x, y)`` broadcastable against boxes ``t`` [..., 4]."""
    fx = _to_tensor(x, name_x).to(device=t.device, dtype=t.dtype)
    fy = _to_tensor(y, name_y).to(device=t.device, dtype=t.dtype)
    try:
        fx, fy = torch.broadcast_tensors(fx, fy)
        f = torch.stack([fx, fy, fx, fy], dim=-1)
        torch.broadcast_shapes(f.shape, t.shape)
    except RuntimeError as e:
        raise ValueError(
            f"{name_x}/{name_y}: expected scalars or tensors broadcastable to boxes.shape[:-1]={tuple(t.shape[:-1])}, "
            f"got {tuple(fx.shape)} and {tuple(fy.shape)}"
        ) from e
    return f


# ----------------------------------------------------------------------------- formats
def convert_boxes(boxes: Array, in_fmt: str, out_fmt: str) -> Array:
    """Convert boxes [..., 4] between ``"xyxy"``, ``"xywh"`` and ``"cxcywh"`` (``torchvision.ops.box_convert``).

    Works for absolute and for normalised boxes alike (the conversions are linear). -> [..., 4].
    """
    for fmt, arg in ((in_fmt, "in_fmt"), (out_fmt, "out_fmt")):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"{arg}: expected one of {BOX_FORMATS}, got {fmt!r}")
    t = _boxes_in(boxes)
    return _out_like(_tv_box_convert(t, in_fmt, out_fmt), boxes)


def xyxy_to_xywh(boxes: Array) -> Array:
    """``x1, y1, x2, y2`` -> ``x, y, w, h`` (top-left corner and size), [..., 4]."""
    return convert_boxes(boxes, "xyxy", "xywh")


def xywh_to_xyxy(boxes: Array) -> Array:
    """``x, y, w, h`` (top-left corner and size, COCO / refer) -> ``x1, y1, x2, y2``, [..., 4]."""
    return convert_boxes(boxes, "xywh", "xyxy")


def xyxy_to_cxcywh(boxes: Array) -> Array:
    """``x1, y1, x2, y2`` -> ``cx, cy, w, h``, [..., 4]."""
    return convert_boxes(boxes, "xyxy", "cxcywh")


def cxcywh_to_xyxy(boxes: Array) -> Array:
    """``cx, cy, w, h`` -> ``x1, y1, x2, y2``, [..., 4]."""
    return convert_boxes(boxes, "cxcywh", "xyxy")


def normalize_boxes(boxes: Array, width: Size, height: Size) -> Array:
    """Divide boxes [..., 4] (any of :data:`BOX_FORMATS`) by the image size: x values and widths by
    ``width``, y values and heights by ``height``. ``width``/``height`` are scalars or tensors of shape
    broadcastable to ``boxes.shape[:-1]`` (one size per image of a batch). -> [..., 4] in [0, 1] for
    boxes inside the image."""
    t = _boxes_in(boxes)
    f = _xy_factors(t, width, height, "width", "height")
    if bool((f <= 0).any()):
        raise ValueError("width/height: image sizes must be positive")
    return _out_like(t / f, boxes)


def denormalize_boxes(boxes: Array, width: Size, height: Size) -> Array:
    """Inverse of :func:`normalize_boxes`: boxes [..., 4] in [0, 1] -> pixels of a ``width`` x ``height`` image."""
    t = _boxes_in(boxes)
    return _out_like(t * _xy_factors(t, width, height, "width", "height"), boxes)


# ----------------------------------------------------------------------------- geometry
def box_area(boxes: Array, fmt: str = "xyxy") -> Array:
    """Area of boxes [..., 4] in format ``fmt`` -> [...] (``torchvision.ops.box_area``)."""
    if fmt not in BOX_FORMATS:
        raise ValueError(f"fmt: expected one of {BOX_FORMATS}, got {fmt!r}")
    t = _boxes_in(boxes)
    if fmt != "xyxy":
        t = _tv_box_convert(t, fmt, "xyxy")
    area = _tv_box_area(t.reshape(-1, 4)).reshape(t.shape[:-1])
    return _out_like(area, boxes)


def clip_boxes(boxes: Array, width: float, height: float) -> Array:
    """Clip ``xyxy`` boxes [..., 4] to the image ``[0, width] x [0, height]``
    (``torchvision.ops.clip_boxes_to_image``). A box outside the image becomes a zero-area box on its border."""
    t = _boxes_in(boxes)
    return _out_like(_tv_clip_boxes(t, (height, width)), boxes)


def scale_boxes(boxes: Array, scale_x: Size, scale_y: Size | None = None) -> Array:
    """Multiply x coordinates of boxes [..., 4] (any format) by ``scale_x`` and y coordinates by ``scale_y``
    (default ``scale_x``), e.g. to follow an image resize from ``(w, h)`` to ``(w * scale_x, h * scale_y)``."""
    t = _boxes_in(boxes)
    f = _xy_factors(t, scale_x, scale_x if scale_y is None else scale_y, "scale_x", "scale_y")
    return _out_like(t * f, boxes)


def translate_boxes(boxes: Array, dx: Size, dy: Size, fmt: str = "xyxy") -> Array:
    """Shift boxes [..., 4] by ``(dx, dy)`` pixels (padding: positive, cropping: negative offsets).
    Only the position changes; for ``xywh``/``cxcywh`` the size columns stay as they are."""
    if fmt not in BOX_FORMATS:
        raise ValueError(f"fmt: expected one of {BOX_FORMATS}, got {fmt!r}")
    t = _boxes_in(boxes)
    f = _xy_factors(t, dx, dy, "dx", "dy")
    if fmt != "xyxy":
        f = f * f.new_tensor([1.0, 1.0, 0.0, 0.0])
    return _out_like(t + f, boxes)


# ----------------------------------------------------------------------------- IoU
def box_iou(a: Array, b: Array, pixel_offset: float = 0.0) -> Array:
    """Pairwise IoU of boxes ``a`` [N, 4] and ``b`` [M, 4] (x1, y1, x2, y2) -> [N, M].

    Continuous-coordinate convention (width = x2 - x1) through ``torchvision.ops.box_iou``.
    ``pixel_offset`` adds a constant to every width and height (and intersection side), i.e. the
    Fast R-CNN convention used by older code: ``1.0`` for integer pixel boxes, ``0.001`` for the
    Wang et al. (CVPR 2021) evaluation. Pairs whose union is empty (two zero-area boxes) get 0.
    """
    ta, tb = _float(_to_tensor(a, "a")), _float(_to_tensor(b, "b"))
    _check_boxes(ta, "a", pixel_offset)
    _check_boxes(tb, "b", pixel_offset)
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    ta, tb = ta.to(dtype), tb.to(device=ta.device, dtype=dtype)
    if pixel_offset:
        off = ta.new_tensor([0.0, 0.0, pixel_offset, pixel_offset])
        ta, tb = ta + off, tb + off
    iou = _tv_box_iou(ta, tb).nan_to_num_(0.0)
    return _out_like(iou, a, b)


def paired_box_iou(a: Array, b: Array, pixel_offset: float = 0.0) -> Array:
    """IoU of corresponding boxes ``a[i]`` and ``b[i]`` ([N, 4] each) -> [N] (same convention as
    :func:`box_iou`; an empty union gives 0)."""
    ta, tb = _float(_to_tensor(a, "a")), _float(_to_tensor(b, "b"))
    _check_boxes(ta, "pred_boxes", pixel_offset)
    _check_boxes(tb, "gt_boxes", pixel_offset)
    if ta.shape != tb.shape:
        raise ValueError(f"paired boxes must have the same shape [N, 4], got {tuple(ta.shape)} and {tuple(tb.shape)}")
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    ta, tb = ta.to(dtype), tb.to(device=ta.device, dtype=dtype)
    lt = torch.maximum(ta[:, :2], tb[:, :2])
    rb = torch.minimum(ta[:, 2:], tb[:, 2:])
    inter_wh = (rb - lt + pixel_offset).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    area_a = (ta[:, 2] - ta[:, 0] + pixel_offset) * (ta[:, 3] - ta[:, 1] + pixel_offset)
    area_b = (tb[:, 2] - tb[:, 0] + pixel_offset) * (tb[:, 3] - tb[:, 1] + pixel_offset)
    union = area_a + area_b - inter
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(inter))
    return _out_like(iou, a, b)


def batched_box_iou(a: Array, b: Array, pixel_offset: float = 0.0) -> Array:
    """Per-item pairwise IoU: ``a`` [B, N, 4] and ``b`` [B, M, 4] (x1, y1, x2, y2) -> [B, N, M], where
    ``out[k] == box_iou(a[k], b[k])`` (same ``pixel_offset`` and empty-union conventions)."""
    ta, tb = _float(_to_tensor(a, "a")), _float(_to_tensor(b, "b"))
    for t, name in ((ta, "a"), (tb, "b")):
        if t.ndim != 3 or t.shape[-1] != 4:
            raise ValueError(f"{name}: expected boxes of shape [B, N, 4] (x1, y1, x2, y2), got {tuple(t.shape)}")
    if ta.shape[0] != tb.shape[0]:
        raise ValueError(
            f"a, b: batch sizes differ (expected [B, N, 4] and [B, M, 4]), got {tuple(ta.shape)} and {tuple(tb.shape)}"
        )
    _check_boxes(ta.reshape(-1, 4), "a", pixel_offset)
    _check_boxes(tb.reshape(-1, 4), "b", pixel_offset)
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    ta, tb = ta.to(dtype), tb.to(device=ta.device, dtype=dtype)
    if pixel_offset:
        off = ta.new_tensor([0.0, 0.0, pixel_offset, pixel_offset])
        ta, tb = ta + off, tb + off
    if ta.shape[0] == 0 or ta.shape[1] == 0 or tb.shape[1] == 0:
        iou = ta.new_zeros((ta.shape[0], ta.shape[1], tb.shape[1]))
    else:  # vmap: torchvision < 0.22 only accepts 2-D boxes
        iou = torch.vmap(_tv_box_iou)(ta, tb).nan_to_num_(0.0)
    return _out_like(iou, a, b)


def _giou_inputs(a: Any, b: Any, names: tuple[str, str], check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _float(_to_tensor(a, names[0])), _float(_to_tensor(b, names[1]))
    for t, name in ((ta, names[0]), (tb, names[1])):
        if check:
            _check_boxes(t, name, 0.0)
        elif t.ndim != 2 or t.shape[-1] != 4:
            raise ValueError(f"{name}: expected boxes of shape [N, 4] (x1, y1, x2, y2), got {tuple(t.shape)}")
    dtype = torch.promote_types(ta.dtype, tb.dtype)
    return ta.to(dtype), tb.to(device=ta.device, dtype=dtype)


def generalized_box_iou(a: Array, b: Array, check: bool = True) -> Array:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of ``a`` [N, 4] and ``b`` [M, 4] (xyxy) -> [N, M],
    in [-1, 1], through ``torchvision.ops.generalized_box_iou``.

    Pairs of two zero-area boxes (empty union, NaN in torchvision) take the value of
    :func:`paired_generalized_box_iou` (0 for identical boxes, about -1 for distant ones).
    ``check=False`` skips the value checks (finite, x2 >= x1), which synchronise with the GPU.
    """
    ta, tb = _giou_inputs(a, b, ("a", "b"), check)
    if ta.shape[0] == 0 or tb.shape[0] == 0:
        return _out_like(ta.new_zeros((ta.shape[0], tb.shape[0])), a, b)
    g = _tv_giou(ta, tb)
    bad = torch.isnan(g)
    if bool(bad.any()):
        i, j = torch.nonzero(bad, as_tuple=True)
        g = g.index_put((i, j), 1.0 - _tv_giou_loss(ta[i], tb[j], reduction="none"))
    return _out_like(g, a, b)


def paired_generalized_box_iou(a: Array, b: Array, eps: float = 1e-7, check: bool = True) -> Array:
    """Generalised IoU of corresponding boxes ``a[i]``, ``b[i]`` ([N, 4] each, xyxy) -> [N], for an
    L1 + GIoU box loss (``loss = 1 - paired_generalized_box_iou(pred, target)``).

    ``1 - torchvision.ops.generalized_box_iou_loss``: ``eps`` is added to the union and enclosing areas,
    so the value (and its gradient) is finite for degenerate boxes; it equals the diagonal of
    :func:`generalized_box_iou` up to that ``eps``. ``check=False`` skips the value checks.
    """
    ta, tb = _giou_inputs(a, b, ("a", "b"), check)
    if ta.shape != tb.shape:
        raise ValueError(f"paired boxes must have the same shape [N, 4], got {tuple(ta.shape)} and {tuple(tb.shape)}")
    g = 1.0 - _tv_giou_loss(ta, tb, reduction="none", eps=eps)
    return _out_like(g, a, b)
