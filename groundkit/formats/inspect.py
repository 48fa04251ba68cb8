"""``groundkit data inspect KIND PATH``: read a data file with groundkit's reader and print what it holds.

A quick check of a file before a long conversion or training: the file is read exactly as the methods
read it, so a bad file gives the same one-line error (exit status 2) naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..text import load_word_vectors
from . import collaborative_experts as ce
from . import flickr30k_entities as fe
from . import refcoco, transvg, vid_sentence
from . import wang21_hdf5 as w21

__all__ = ["KINDS", "inspect", "read_image", "register"]


def read_image(path: str | Path) -> Image.Image:
    """An RGB image; a missing, truncated or non-image file is a :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image, truncated or corrupt ({e})") from None


#: feature widths tried when --region-dim is not given (ResNet-101 2048, the built-in world's EfficientNet 1280 ...)
#: with the detector class counts (plus background) they are seen with: COCO 80 / 90, Visual Genome 1600
REGION_DIMS = (2048, 1280, 1024, 512)
CLASS_COUNTS = (81, 91, 1601)


def region_dim_of(path: str) -> int:
    """The feature width of a region HDF5 whose rows are ``D + C+1 + 4`` wide: the ``D`` of :data:`REGION_DIMS`
    that leaves the class count of a ``detector_classes.txt`` beside the file (the built-in world writes one), else
    a known one (:data:`CLASS_COUNTS`); one line asking for ``--region-dim`` otherwise."""
    with w21.open_hdf5(path, "region feature") as f:
        g = w21._region_group(f)
        first = next((g[k] for k in g if isinstance(g[k], h5py.Dataset)), None)
        width = int(first.shape[1]) if first is not None and first.ndim == 2 else 0
    classes = Path(path).parent / "detector_classes.txt"  # beside the built-in world's files: one name per logit
    counts = CLASS_COUNTS
    if classes.is_file():
        names = [line for line in classes.read_text(encoding="utf-8").splitlines() if line.strip()]
        counts = (len(names) + (0 if names[:1] == ["__background__"] else 1),)
    for d in REGION_DIMS:
        if width - d - 4 in counts:
            return d
    raise DataError(f"{path}: rows of {width} columns fit no known feature width + class count; give --region-dim")


def _region(p: str, a: argparse.Namespace) -> dict[str, Any]:
    dim = a.region_dim or region_dim_of(p)
    r = w21.read_region_hdf5(p, dim)
    out = {"images": len(r.image_ids), "proposals": int(r.features.shape[1]), "logits": int(r.logits.shape[-1])}
    return {**out, "region_dim": dim}


def _phrase(p: str, a: argparse.Namespace) -> dict[str, Any]:
    with w21.open_hdf5(p, "phrase feature") as f:
        ids = [k for k in f if not k.endswith("_gt")]
    r = w21.read_phrase_hdf5(p, ids)
    return {"images": len(ids), "phrases": int(r.phrase_exists.sum())}


def _glove(p: str, a: argparse.Namespace) -> dict[str, Any]:
    if not Path(p).is_file():
        raise DataError(f"{p}: word vector file not found")
    v = load_word_vectors(p)
    return {"words": len(v), "dim": int(next(iter(v.values())).shape[0]) if v else 0}


def _ce_expert(p: str, a: argparse.Namespace) -> dict[str, Any]:
    feats, kind, dim = ce.read_expert_pickle(p)
    return {"videos": len(feats), "kind": kind, "dim": dim}


def _ce_text(p: str, a: argparse.Namespace) -> dict[str, Any]:
    t = ce.read_text_features(p)
    return {"videos": len(t), "captions": sum(len(c) for c in t.values())}


def _ce_captions(p: str, a: argparse.Namespace) -> dict[str, Any]:
    c = ce.read_raw_captions(p)
    return {"videos": len(c), "captions": sum(len(x) for x in c.values())}


def _ce_teacher(p: str, a: argparse.Namespace) -> dict[str, Any]:
    data = ce.load_pickle(p)
    if not isinstance(data, dict):
        raise ce.FeatureError(f"{p}: expected a dict keyed by video id, got {type(data).__name__}")
    t, experts, dim = ce.read_teacher_pickle(p, list(data))
    return {"videos": len(t), "experts": experts, "dim": dim}


def _refer(p: str, a: argparse.Namespace) -> dict[str, Any]:
    d = refcoco.load_refer(p, a.dataset or "refcoco", a.split_by)
    return {"refs": len(d.refs), "images": len(d.images), "splits": d.splits()}


def _refs_pickle(p: str, a: argparse.Namespace) -> dict[str, Any]:
    return {"refs": len(refcoco.load_refs_pickle(p))}


def _transvg(p: str, a: argparse.Namespace) -> dict[str, Any]:
    return {"samples": len(transvg.parse_entries(transvg.load_raw(p), a.dataset or "unc", source=p))}


def _vid_sentence(p: str, a: argparse.Namespace) -> dict[str, Any]:
    tracks = vid_sentence.load_vid_sentence(p, a.split)
    return {"tracks": len(tracks), "captions": sum(len(t.captions) for t in tracks)}


def _video_level(p: str, a: argparse.Namespace) -> dict[str, Any]:
    return {"videos": len(vid_sentence.load_video_level(p))}


def _sentences(p: str, a: argparse.Namespace) -> dict[str, Any]:
    if not Path(p).is_file():
        raise DataError(f"{p}: sentence file not found")
    s = fe.read_sentences(p)
    return {"sentences": len(s), "phrases": sum(len(x["phrases"]) for x in s)}


def _annotations(p: str, a: argparse.Namespace) -> dict[str, Any]:
    if not Path(p).is_file():
        raise DataError(f"{p}: annotation file not found")
    r = fe.read_annotations(p)
    return {"width": r["width"], "height": r["height"], "entities_with_boxes": len(r["boxes"])}


def _image(p: str, a: argparse.Namespace) -> dict[str, Any]:
    im = read_image(p)
    return {"width": im.width, "height": im.height}


#: kind -> (reader, what PATH is)
KINDS: dict[str, tuple[Callable[[str, argparse.Namespace], dict[str, Any]], str]] = {
    "region-hdf5": (_region, "wang21 region HDF5 (--region-dim)"),
    "phrase-hdf5": (_phrase, "wang21 phrase HDF5"),
    "glove-hdf5": (_glove, "GloVe HDF5 (one dataset per word)"),
    "ce-expert": (_ce_expert, "Collaborative Experts expert pickle"),
    "ce-text": (_ce_text, "CE per-token text feature pickle"),
    "ce-captions": (_ce_captions, "CE raw-captions.pkl"),
    "ce-teacher": (_ce_teacher, "TeachText teacher pickle"),
    "refer": (_refer, "refer data folder (--dataset, --split-by)"),
    "refs-pickle": (_refs_pickle, "refer refs(<split_by>).p"),
    "transvg": (_transvg, "TransVG / CLIP-VG .pth list (--dataset)"),
    "vid-sentence": (_vid_sentence, "VID-Sentence ILSVRC folder (--split)"),
    "video-level": (_video_level, "co-grounding VID_video_level_<split>.pth"),
    "flickr30k-sentences": (_sentences, "Flickr30K Entities Sentences/<id>.txt"),
    "flickr30k-annotations": (_annotations, "Flickr30K Entities Annotations/<id>.xml"),
    "image": (_image, "an image file"),
}


def inspect(kind: str, path: str | Path, **options: Any) -> dict[str, Any]:
    """Read ``path`` as ``kind`` (see :data:`KINDS`); a summary of what it holds."""
    if kind not in KINDS:
        raise DataError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    a = argparse.Namespace(region_dim=0, dataset="", split_by="unc", split="val")
    vars(a).update(options)
    return KINDS[kind][0](str(path), a)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect", help="read a data file with groundkit's reader and print what it holds (a bad file: one line)"
    )
    p.add_argument("kind", choices=list(KINDS), help="; ".join(f"{k}: {v[1]}" for k, v in KINDS.items()))
    p.add_argument("path")
    p.add_argument(
        "--region-dim", type=int, default=0, help="region-hdf5: feature width (data.region_dim; default: from the file)"
    )
    p.add_argument("--dataset", default="", help="refer: refcoco|refcoco+|refcocog; transvg: unc, gref, flickr ...")
    p.add_argument("--split-by", default="unc", help="refer: unc | google | umd")
    p.add_argument("--split", default="val", help="vid-sentence: train | val | test")

    def run(a: argparse.Namespace) -> int:
        out = KINDS[a.kind][0](a.path, a)
        print(json.dumps({"kind": a.kind, "path": a.path, **out}))
        return 0

    p.set_defaults(func=run)
