"""Reader and writer of TransVG / Pseudo-Q / CLIP-VG annotation lists (``<split_root>/<ds>/<ds>_<split>.pth``).

Each file is a plain Python list saved with ``torch.save``; an element is one (image, box, phrase)
sample. Layouts, as read by ``TransVGDataset.pull_item`` of the official code:

* ``unc``, ``unc+``, ``gref``, ``gref_umd``: 5-tuple ``(img_file, ann_or_mask_file, bbox, phrase,
  attributes)`` with a COCO box ``[x, y, w, h]``;
* ``referit``: the same 5-tuple with the box already ``[x1, y1, x2, y2]``;
* ``flickr``: 3-tuple ``(img_file, [x1, y1, x2, y2], phrase)``.

Pseudo-label files (``<ds>_train_pseudo.pth`` and the per-source files) use the same tuples with the
string ``'useless placeholder'`` in the unused slots. Files holding only lists, tuples, strings and
numbers load with ``torch.load(weights_only=True)``, so no code is executed on reading.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_path
from ..errors import DataError

__all__ = [
    "DATASETS",
    "PLACEHOLDER",
    "GroundingSample",
    "split_path",
    "make_entry",
    "save_split",
    "save_list",
    "load_raw",
    "parse_entries",
    "load_split",
]

PLACEHOLDER = "useless placeholder"

# dataset key -> (box layout, tuple length, splits known to the official loader)
DATASETS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "referit": ("xyxy", 5, ("train", "val", "trainval", "test", "train_pseudo")),
    "unc": ("xywh", 5, ("train", "val", "trainval", "testA", "testB", "train_pseudo")),
    "unc+": ("xywh", 5, ("train", "val", "trainval", "testA", "testB", "train_pseudo")),
    "gref": ("xywh", 5, ("train", "val", "train_pseudo")),
    "gref_umd": ("xywh", 5, ("train", "val", "test", "train_pseudo")),
    "flickr": ("xyxy", 3, ("train", "val", "test", "train_pseudo")),
}


@dataclass(frozen=True)
class GroundingSample:
    """One referring sample; ``box`` is ``(x1, y1, x2, y2)`` in absolute pixels (floats)."""

    img_file: str
    box: tuple[float, float, float, float]
    phrase: str
    ann: str | None = None  # mask / annotation file slot of the 5-tuples (None for flickr)
    attributes: Any = None  # parsed attribute list of the 5-tuples (None for flickr)

    @property
    def box_xywh(self) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.box
        return (x1, y1, x2 - x1, y2 - y1)


def _check_dataset(dataset: str) -> tuple[str, int, tuple[str, ...]]:
    if dataset not in DATASETS:
        raise DataError(f"unknown TransVG dataset key {dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[dataset]


def split_path(split_root: str | os.PathLike, dataset: str, split: str) -> Path:
    """``<split_root>/<dataset>/<dataset>_<split>.pth`` (the path the official loader opens)."""
    _check_dataset(dataset)
    return Path(split_root) / dataset / f"{dataset}_{split}.pth"


def make_entry(
    dataset: str,
    img_file: str,
    box_xyxy: Sequence[float],
    phrase: str,
    ann: str = PLACEHOLDER,
    attributes: Any = PLACEHOLDER,
) -> tuple:
    """Build one list element in the layout of ``dataset`` from an ``x1y1x2y2`` box.

    Box values are written as Python floats rounded to 2 decimals (as in the released files).
    """
    layout, length, _ = _check_dataset(dataset)
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if layout == "xywh":
        box = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
    else:
        box = [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]
    if length == 3:
        return (str(img_file), box, str(phrase))
    return (str(img_file), ann, box, str(phrase), attributes)


def save_split(entries: list, split_root: str | os.PathLike, dataset: str, split: str) -> Path:
    """Validate ``entries`` and ``torch.save`` them as a plain list; returns the written path.

    The bytes depend only on the entries and the file name, so equal inputs give identical files.
    """
    path = split_path(split_root, dataset, split)
    parse_entries(entries, dataset, source=str(path))  # refuse to write what cannot be read back
    with atomic_path(path) as tmp:
        torch.save(list(entries), tmp)
    return path


def save_list(entries: list, path: str | os.PathLike, dataset: str) -> Path:
    """Like :func:`save_split` for any file name (e.g. CLIP-VG's ``train_separate/1_<ds>_train_pseudo_template.pth``)."""
    path = Path(path)
    parse_entries(entries, dataset, source=str(path))
    with atomic_path(path) as tmp:
        torch.save(list(entries), tmp)
    return path


def load_raw(path: str | os.PathLike, allow_pickle: bool = False) -> list:
    """``torch.load`` a TransVG list; ``weights_only=True`` unless ``allow_pickle`` (trusted files only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TransVG annotation file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError from the weights-only unpickler
        if allow_pickle:
            raise
        raise DataError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({exc}). Files that hold "
            "numpy arrays or other objects need allow_pickle=True; only use it for files you trust."
        ) from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a Python list of samples, got {type(data).__name__}")
    return data


def _as_box(value: Any, where: str) -> tuple[float, float, float, float]:
    try:
        vals = [float(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: box must be 4 numbers, got {value!r}") from exc
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise DataError(f"{where}: box must be 4 finite numbers, got {value!r}")
    return vals[0], vals[1], vals[2], vals[3]


def parse_entries(entries: list, dataset: str, source: str = "<list>", truncate: bool = False) -> list[GroundingSample]:
    """Check each tuple against ``dataset``'s layout and convert boxes to float ``x1y1x2y2``.

    ``truncate=True`` reproduces the official loader's ``np.array(bbox, dtype=int)`` before the
    ``xywh -> xyxy`` addition (integer truncation; reference mode).
    """
    layout, length, _ = _check_dataset(dataset)
    out: list[GroundingSample] = []
    for i, item in enumerate(entries):
        where = f"{source}[{i}]"
        if not isinstance(item, (tuple, list)) or len(item) != length:
            raise DataError(
                f"{where}: dataset {dataset!r} expects {length}-tuples "
                f"({'img_file, bbox, phrase' if length == 3 else 'img_file, ann, bbox, phrase, attributes'}), "
                f"got {type(item).__name__} of length {len(item) if hasattr(item, '__len__') else '?'}"
            )
        if length == 3:
            img_file, bbox, phrase = item
            ann, attributes = None, None
        else:
            img_file, ann, bbox, phrase, attributes = item
        if not isinstance(img_file, str) or not isinstance(phrase, str):
            raise DataError(f"{where}: img_file and phrase must be strings, got {img_file!r}, {phrase!r}")
        a, b, c, d = _as_box(bbox, where)
        if truncate:
            a, b, c, d = (float(int(v)) for v in (a, b, c, d))
        box = (a, b, a + c, b + d) if layout == "xywh" else (a, b, c, d)
        if not (box[2] >= box[0] and box[3] >= box[1]):
            raise DataError(f"{where}: box {list(bbox)} ({layout}) has negative width or height")
        out.append(GroundingSample(img_file, box, phrase, ann, attributes))
    return out


def load_split(
    split_root: str | os.PathLike,
    dataset: str,
    split: str,
    allow_pickle: bool = False,
    truncate: bool = False,
) -> list[GroundingSample]:
    """Read ``<split_root>/<dataset>/<dataset>_<split>.pth`` into validated samples."""
    path = split_path(split_root, dataset, split)
    return parse_entries(load_raw(path, allow_pickle=allow_pickle), dataset, str(path), truncate=truncate)
