"""Reader (and writer) of the refer-API layout of RefCOCO / RefCOCO+ / RefCOCOg.

Layout (as ``lichengunc/refer`` opens it, ``data_root`` = the refer ``data`` folder)::

    <data_root>/<dataset>/refs(<split_by>).p     pickle of a list of refs
    <data_root>/<dataset>/instances.json         COCO-like {images, annotations, categories}
    <data_root>/images/mscoco/images/train2014/COCO_train2014_<12-digit image id>.jpg

A ref is ``{ref_id, ann_id, image_id, split, sentences: [{tokens, raw, sent_id, sent}], sent_ids,
category_id, file_name}``; its box comes from the annotation ``ann_id`` in ``instances.json``
(``bbox`` = COCO ``[x, y, w, h]``). The image file is the one of ``instances.json``'s image entry
(a ref's own ``file_name`` carries an extra ``_<ann_id>`` suffix and names no file on disk).
The pickle is read with an unpickler that refuses every global, so a file cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from . import transvg

__all__ = [
    "IMAGE_SUBDIR",
    "RefSample",
    "ReferData",
    "refs_path",
    "load_refs_pickle",
    "load_refer",
    "load_instances",
    "objects_by_file",
    "load_samples",
    "save_refs_pickle",
    "save_instances",
    "coco_file_name",
    "TRANSVG_KEYS",
    "to_transvg",
    "register_to_transvg",
]

IMAGE_SUBDIR = "images/mscoco/images/train2014"
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id", "file_name")
SENT_KEYS = ("tokens", "raw", "sent_id", "sent")


def coco_file_name(image_id: int) -> str:
    """COCO train2014 file name of an image id (``COCO_train2014_000000000042.jpg``)."""
    return f"COCO_train2014_{int(image_id):012d}.jpg"


def refs_path(data_root: str | os.PathLike, dataset: str = "refcoco", split_by: str = "unc") -> Path:
    return Path(data_root) / dataset / f"refs({split_by}).p"


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refs pickle references {module}.{name}; only plain lists/dicts/strings/numbers are accepted"
        )


def load_refs_pickle(path: str | os.PathLike) -> list[dict]:
    """Load ``refs(<split_by>).p`` (Python 2 or 3 pickle of a list of dicts) without executing code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"refs pickle not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        refs = _NoGlobalsUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # EOFError and whatever else a cut-off or damaged stream makes pickle raise
        reason = "empty file" if not raw else f"{type(exc).__name__}: {exc}"
        raise DataError(f"{path}: not a readable pickle, truncated or corrupt ({reason})") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a pickled list of refs, got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise DataError(f"{path}[{i}]: expected a dict, got {type(ref).__name__}")
        missing = [k for k in REF_KEYS if k not in ref]
        if missing:
            raise DataError(f"{path}[{i}] (ref_id={ref.get('ref_id')}): missing keys {missing}")
        if not isinstance(ref["sentences"], list):
            raise DataError(f"{path}[{i}].sentences: expected a list, got {type(ref['sentences']).__name__}")
        for j, s in enumerate(ref["sentences"]):
            if not isinstance(s, dict):
                raise DataError(f"{path}[{i}].sentences[{j}]: expected a dict, got {type(s).__name__}")
            miss = [k for k in SENT_KEYS if k not in s]
            if miss:
                raise DataError(f"{path}[{i}].sentences[{j}]: missing keys {miss}")
    return refs


@dataclass(frozen=True)
class RefSample:
    """One (referring sentence, target box) pair; boxes in absolute pixels."""

    ref_id: int
    ann_id: int
    image_id: int
    split: str
    category_id: int
    category: str
    sent_id: int
    sentence: str  # the normalised ``sent`` field
    raw: str
    tokens: tuple[str, ...]
    file_name: str  # image file name from instances.json
    image_path: Path
    width: int
    height: int
    box_xywh: tuple[float, float, float, float]

    @property
    def box_xyxy(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.box_xywh
        return (x, y, x + w, y + h)


@dataclass
class ReferData:
    """The joined refer files: refs plus instances indexed by id."""

    refs: list[dict]
    images: dict[int, dict]
    anns: dict[int, dict]
    cats: dict[int, dict]
    image_dir: Path

    def splits(self) -> list[str]:
        return sorted({r["split"] for r in self.refs})

    def samples(self, split: str | None = None) -> list[RefSample]:
        """One sample per sentence, optionally restricted to ``split`` (``train``, ``val``, ``testA`` ...)."""
        out: list[RefSample] = []
        for ref in self.refs:
            if split is not None and ref["split"] != split:
                continue
            ann = self.anns[ref["ann_id"]]
            img = self.images[ref["image_id"]]
            cat = self.cats[ref["category_id"]]
            box = tuple(float(v) for v in ann["bbox"])
            for s in ref["sentences"]:
                out.append(
                    RefSample(
                        ref_id=int(ref["ref_id"]),
                        ann_id=int(ref["ann_id"]),
                        image_id=int(ref["image_id"]),
                        split=str(ref["split"]),
                        category_id=int(ref["category_id"]),
                        category=str(cat["name"]),
                        sent_id=int(s["sent_id"]),
                        sentence=str(s["sent"]),
                        raw=str(s["raw"]),
                        tokens=tuple(s["tokens"]),
                        file_name=str(img["file_name"]),
                        image_path=self.image_dir / img["file_name"],
                        width=int(img["width"]),
                        height=int(img["height"]),
                        box_xywh=box,  # type: ignore[arg-type]
                    )
                )
        if split is not None and not out and split not in self.splits():
            raise DataError(f"split {split!r} not in the refs; available: {self.splits()}")
        return out


def load_instances(inst_path: str | os.PathLike) -> tuple[dict[int, dict], dict[int, dict], dict[int, dict]]:
    """A checked COCO-like ``instances.json``: images, annotations and categories indexed by id."""
    inst_path = Path(inst_path)
    if not inst_path.is_file():
        raise FileNotFoundError(f"instances file not found: {inst_path}")
    try:
        with open(inst_path, encoding="utf-8") as f:
            inst = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{inst_path}: not valid JSON, truncated or corrupt ({e})") from None
    if not isinstance(inst, dict):
        raise DataError(f"{inst_path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if key not in inst or not isinstance(inst[key], list):
            raise DataError(f"{inst_path}: missing list {key!r}")
    try:
        images = {int(im["id"]): im for im in inst["images"]}
        anns = {int(a["id"]): a for a in inst["annotations"]}
        cats = {int(c["id"]): c for c in inst["categories"]}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{inst_path}: an image, annotation or category without an integer 'id' ({e!r})") from None
    for im in inst["images"]:
        if not isinstance(im.get("file_name"), str):
            raise DataError(f"{inst_path}: image id={im['id']} has no 'file_name' string")
    for a in inst["annotations"]:
        bbox = a.get("bbox") if isinstance(a, dict) else None
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) for v in bbox)
            or bbox[2] < 0
            or bbox[3] < 0
        ):
            raise DataError(f"{inst_path}: annotation id={a.get('id')} has bad bbox {bbox!r} (want [x,y,w,h])")
    return images, anns, cats


def objects_by_file(inst_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every annotated object of each image of an ``instances.json``: file name -> boxes ``[k, 4]`` (x1 y1 x2 y2)."""
    images, anns, _ = load_instances(inst_path)
    out: dict[str, list] = {im["file_name"]: [] for im in images.values()}
    for a in anns.values():
        im = images.get(int(a.get("image_id", -1)))
        if im is None:
            raise DataError(f"{inst_path}: annotation id={a['id']} names image_id {a.get('image_id')!r}, not listed")
        x, y, w, h = (float(v) for v in a["bbox"])
        out[im["file_name"]].append((x, y, x + w, y + h))
    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in out.items()}


def load_refer(
    data_root: str | os.PathLike,
    dataset: str = "refcoco",
    split_by: str = "unc",
    image_dir: str | os.PathLike | None = None,
) -> ReferData:
    """Load and join ``refs(<split_by>).p`` and ``instances.json``; every reference is checked."""
    data_root = Path(data_root)
    refs = load_refs_pickle(refs_path(data_root, dataset, split_by))
    inst_path = data_root / dataset / "instances.json"
    images, anns, cats = load_instances(inst_path)
    for ref in refs:
        if not isinstance(ref["ann_id"], int) or not isinstance(ref["image_id"], int):
            raise DataError(f"ref_id={ref['ref_id']}: ann_id and image_id must be integers")
        if ref["ann_id"] not in anns:
            raise DataError(f"ref_id={ref['ref_id']}: ann_id {ref['ann_id']} not in {inst_path}")
        if ref["image_id"] not in images:
            raise DataError(f"ref_id={ref['ref_id']}: image_id {ref['image_id']} not in {inst_path}")
        if anns[ref["ann_id"]]["image_id"] != ref["image_id"]:
            raise DataError(f"ref_id={ref['ref_id']}: ann {ref['ann_id']} belongs to another image")
        if ref["category_id"] not in cats:
            raise DataError(f"ref_id={ref['ref_id']}: category_id {ref['category_id']} not in {inst_path}")
    img_dir = Path(image_dir) if image_dir is not None else data_root / IMAGE_SUBDIR
    return ReferData(refs=refs, images=images, anns=anns, cats=cats, image_dir=img_dir)


def load_samples(
    data_root: str | os.PathLike,
    dataset: str = "refcoco",
    split_by: str = "unc",
    split: str | None = None,
    image_dir: str | os.PathLike | None = None,
) -> list[RefSample]:
    """Shortcut: :func:`load_refer` then :meth:`ReferData.samples`."""
    return load_refer(data_root, dataset, split_by, image_dir).samples(split)


def save_refs_pickle(refs: list[dict], path: str | os.PathLike) -> Path:
    """Write refs as a protocol-2 pickle (readable by the Python 2 and 3 refer API); deterministic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return path


def save_instances(instances: dict, path: str | os.PathLike) -> Path:
    """Write ``instances.json`` with sorted keys (byte-stable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(instances, f, sort_keys=True, separators=(",", ":"))
    return path


# refer dataset/splitBy -> TransVG dataset key
TRANSVG_KEYS: dict[tuple[str, str], str] = {
    ("refcoco", "unc"): "unc",
    ("refcoco+", "unc"): "unc+",
    ("refcocog", "google"): "gref",
    ("refcocog", "umd"): "gref_umd",
}


def to_transvg(
    data_root: str | os.PathLike,
    split_root: str | os.PathLike,
    dataset: str = "refcoco",
    split_by: str = "unc",
    key: str | None = None,
) -> dict[str, int]:
    """Convert refer-API files to TransVG/CLIP-VG ``<split_root>/<key>/<key>_<split>.pth`` lists.

    One 5-tuple ``(image file, "<ann_id>.pth", [x,y,w,h], sentence, [])`` per sentence, one file per
    refer split plus ``trainval`` (train + val); returns the number of samples per written file.
    The attribute slot is left empty (the released files carry a parser's output there, unused by
    training). ``key`` defaults to the usual name of ``(dataset, split_by)`` (``unc``, ``unc+``,
    ``gref``, ``gref_umd``).
    """
    key = key or TRANSVG_KEYS.get((dataset, split_by))
    if key is None:
        raise DataError(f"no TransVG key known for dataset={dataset!r} split_by={split_by!r}; pass key=")
    data = load_refer(data_root, dataset, split_by)
    per: dict[str, list] = {}
    for ref in data.refs:
        img = data.images[ref["image_id"]]["file_name"]
        x, y, w, h = (float(v) for v in data.anns[ref["ann_id"]]["bbox"])
        for s in ref["sentences"]:
            per.setdefault(ref["split"], []).append(
                transvg.make_entry(key, img, (x, y, x + w, y + h), s["sent"], f"{ref['ann_id']}.pth", [])
            )
    if "train" in per and "val" in per:
        per["trainval"] = per["train"] + per["val"]
    counts = {}
    for split, entries in sorted(per.items()):
        transvg.save_split(entries, split_root, key, split)
        counts[split] = len(entries)
    return counts


def register_to_transvg(subparsers: Any) -> None:
    """``groundkit data refer-to-transvg``: refer-API files -> TransVG/CLIP-VG ``.pth`` lists."""
    p = subparsers.add_parser(
        "refer-to-transvg",
        help="convert RefCOCO/+/g refer-API files (refs(*).p + instances.json) to TransVG/CLIP-VG .pth split lists",
    )
    p.add_argument("--data-root", required=True, help="refer data folder (holds <dataset>/refs(<split_by>).p)")
    p.add_argument(
        "--split-root", required=True, help="output folder; files go to <split-root>/<key>/<key>_<split>.pth"
    )
    p.add_argument("--dataset", default="refcoco", choices=["refcoco", "refcoco+", "refcocog"])
    p.add_argument("--split-by", default="unc", choices=["unc", "google", "umd"])
    p.add_argument("--key", default=None, help="TransVG dataset key (default: unc, unc+, gref or gref_umd)")

    def run(args: Any) -> int:
        try:
            counts = to_transvg(args.data_root, args.split_root, args.dataset, args.split_by, args.key)
        except ValueError as e:
            raise DataError(f"refer-to-transvg: {e}") from None
        print(json.dumps(counts, sort_keys=True))
        return 0

    p.set_defaults(func=run)
