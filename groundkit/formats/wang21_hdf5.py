"""The file formats of weakly supervised phrase grounding (Wang et al., CVPR 2021), read and written.

In the official code's exact formats:

* region HDF5: one dataset per image, ``[N, D + C+1 + 4]`` = region feature, detector class logits
  *including background* (column 0), box ``x1, y1, x2, y2`` in pixels;
* phrase HDF5: ``<img>`` -> bytes ``[S, P, T]`` tokens ("" pads; the first empty token ends a phrase,
  the first empty phrase ends a sentence) and ``<img>_gt`` -> ``[S, P, 4]`` one box per phrase
  (all-zero row: no box);
* GloVe HDF5: one dataset per token -> ``[E]`` (any E) (read by :func:`groundkit.text.load_word_vectors`);
* ``phrase_to_label.json``: ``{"<tokens joined by one space>": "<detector class name>"}``;
* detector class names (text file, Open Images label map, or ``coco``);
* the phrase x class matching matrix (HDF5: ``phrases`` [M], ``classes`` [C], ``scores`` [M, C]).

Converters into them: Flickr30K Entities -> phrase HDF5, GloVe text -> HDF5, per-image detector
outputs -> region HDF5. Bad input raises :class:`Wang21DataError` naming the file, the key and the
expected shape; where the official code skipped silently, the skip is counted and logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..checkpoint import atomic_path
from ..errors import DataError
from ..text import COCO_CLASSES, tokenize
from . import flickr30k_entities as fe

log = logging.getLogger("groundkit.wang21")

__all__ = [
    "Wang21DataError",
    "RegionFile",
    "PhraseFile",
    "read_region_hdf5",
    "write_region_hdf5",
    "read_phrase_hdf5",
    "write_phrase_hdf5",
    "phrase_strings_of",
    "load_class_names",
    "read_phrase_to_label",
    "write_matching_matrix",
    "read_matching_matrix",
    "glove_text_to_hdf5",
    "detections_to_hdf5",
    "prepare_flickr30k",
    "open_hdf5",
]


class Wang21DataError(DataError):
    """An input file that does not have the format the method needs (message names file, key, shape)."""


@contextlib.contextmanager
def open_hdf5(path: str | Path, what: str) -> Iterator[h5py.File]:
    """Open an HDF5 file for reading; a missing, truncated or non-HDF5 file (also one that fails while
    being read) is a :class:`Wang21DataError` naming the file."""
    if not os.path.isfile(path):
        raise Wang21DataError(f"{path}: {what} file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise Wang21DataError(f"{path}: not a readable HDF5 file, truncated or corrupt ({_h5_reason(e)})") from None
    try:
        with f:
            yield f
    except (OSError, RuntimeError, KeyError) as e:  # a dataset whose bytes are cut off or damaged
        raise Wang21DataError(f"{path}: {what} file is damaged ({_h5_reason(e)})") from None


def _h5_reason(e: BaseException) -> str:
    text = str(e)
    return text.split("(")[0].strip().rstrip(",") or type(e).__name__


def _numeric(a: Any, path: str, key: str, expect: str) -> None:
    if not isinstance(a, h5py.Dataset):
        raise Wang21DataError(f"{path}: key {key!r} is a group; expected a dataset {expect}")
    if a.dtype.kind not in "fiub":
        raise Wang21DataError(f"{path}: key {key!r} has dtype {a.dtype}; expected numbers {expect}")


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
    with open_hdf5(path, "region feature") as f:
        g = _region_group(f)
        keys = [k for k in g.keys() if isinstance(g[k], h5py.Dataset)]
        if not keys:
            raise Wang21DataError(f"{path}: no per-image datasets (expected one key per image -> [N, D + C+1 + 4])")
        ids = list(image_ids) if image_ids is not None else keys
        first = g[ids[0]] if ids[0] in g else None
        if first is None:
            raise Wang21DataError(f"{path}: key {ids[0]!r} missing (expected [N, D + C+1 + 4] region rows)")
        _numeric(first, path, ids[0], "[N, D + C+1 + 4]")
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
            _numeric(a, path, k, f"[N, {expect}]")
            if a.ndim != 2 or a.shape[1] != expect:
                raise Wang21DataError(
                    f"{path}: key {k!r} has shape {a.shape}; expected [N, {expect}] "
                    f"(= region_dim {region_dim} + {n_logits} logits incl. background + 4 box)"
                )
            rows = np.asarray(a[:n], dtype=np.float32)
            m = rows.shape[0]
            if not np.isfinite(rows).all():
                bad = np.argwhere(~np.isfinite(rows))[0]
                part = "feature" if bad[1] < region_dim else "logit" if bad[1] < region_dim + n_logits else "box"
                raise Wang21DataError(
                    f"{path}: key {k!r} has a non-finite {part} value at row {bad[0]}, column {bad[1]}"
                )
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
    """Write ``{image id: [N, D + C+1 + 4]}`` in the official region format (atomically)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
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
        return np.vectorize(lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x), otypes=[object])(a).astype(
            str
        )
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
    toks_l, gts_l = [], []
    with open_hdf5(path, "phrase feature") as f:
        for k in image_ids:
            if k not in f:
                raise Wang21DataError(
                    f"{path}: key {k!r} missing (expected tokens [S, P, T] for the image of the region file)"
                )
            if f"{k}_gt" not in f:
                raise Wang21DataError(f"{path}: key {k + '_gt'!r} missing (expected ground-truth boxes [S, P, 4])")
            a, g = f[k], f[f"{k}_gt"]
            if not isinstance(a, h5py.Dataset):
                raise Wang21DataError(f"{path}: key {k!r} is a group; expected tokens [S, P, T]")
            _numeric(g, path, f"{k}_gt", "[S, P, 4]")
            if a.ndim != 3:
                raise Wang21DataError(f"{path}: key {k!r} has shape {a.shape}; expected [S, P, T] token strings")
            try:
                t = _decode(a[()])
            except Wang21DataError:
                raise Wang21DataError(f"{path}: key {k!r} has dtype {a.dtype}; expected strings [S, P, T]") from None
            gt = np.asarray(g[()], dtype=np.float32)
            if gt.shape != t.shape[:2] + (4,):
                raise Wang21DataError(
                    f"{path}: key {k + '_gt'!r} has shape {gt.shape}; expected {t.shape[:2] + (4,)} ([S, P, 4])"
                )
            if not np.isfinite(gt).all():
                raise Wang21DataError(f"{path}: key {k + '_gt'!r} has non-finite values")
            bad = (gt[..., 3] > 0) & ((gt[..., 2] < gt[..., 0]) | (gt[..., 3] < gt[..., 1]) | (gt < -1).any(-1))
            if bad.any():
                s, p = map(int, np.argwhere(bad)[0])
                raise Wang21DataError(
                    f"{path}: key {k + '_gt'!r}[{s}, {p}] = {gt[s, p].tolist()}; expected x1 <= x2, y1 <= y2, pixels >= 0"
                )
            toks_l.append(t)
            gts_l.append(gt)
    S = {t.shape[0] for t in toks_l}
    T = {t.shape[2] for t in toks_l}
    if len(S) > 1 or len(T) > 1:
        raise Wang21DataError(
            f"{path}: images differ in sentences per image {sorted(S)} or tokens per phrase {sorted(T)}; expected one [S, *, T]"
        )
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
    """Write ``<img>`` -> bytes ``[S, P, T]`` and ``<img>_gt`` -> ``[S, P, 4]`` (the official format, atomically)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for k, t in tokens.items():
            t = np.asarray(t, dtype=str)
            f.create_dataset(k, data=np.char.encode(t, "utf-8"))
            f.create_dataset(f"{k}_gt", data=np.asarray(gt[k], dtype=np.float32))


# ----------------------------------------------------------------------------- detector classes and phrase -> class


def phrase_strings_of(paths: Iterable[str | Path]) -> list[str]:
    """Sorted distinct phrase strings (tokens joined by a space) of phrase HDF5 files."""
    out: set[str] = set()
    for pf in paths:
        with open_hdf5(pf, "phrase feature") as f:
            ids = [k for k in f if not k.endswith("_gt")]
        out.update(x for x in read_phrase_hdf5(pf, ids).phrase_strings().reshape(-1).tolist() if x)
    return sorted(out)


def load_class_names(source: str | Path) -> list[str]:
    """Detector class names without background: ``coco`` (built in), a text file (one per line;
    a leading ``__background__`` line is dropped) or an Open Images label map (``display_name: "..."``
    entries, as ``oiv2_classes.py``/``.pbtxt``). Names are lower-cased as in the official code."""
    s = str(source)
    if s.lower() == "coco":
        return list(COCO_CLASSES)
    if not os.path.isfile(s):
        raise Wang21DataError(
            f"{s}: detector class name file not found (expected one name per line, a label-map pbtxt, or 'coco')"
        )
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
            raise Wang21DataError(
                f"{path}: key {p!r} maps to {lab!r}, which is not a detector class ({len(class_names)} known, e.g. {class_names[:5]})"
            )
        out[p] = c
    return out


def write_matching_matrix(path: str | Path, phrases: Sequence[str], classes: Sequence[str], scores: np.ndarray) -> None:
    """HDF5 with ``phrases`` [M], ``classes`` [C] (utf-8 strings) and ``scores`` [M, C] float32
    (no timestamps, so the same input gives the same bytes; written atomically)."""
    strings = h5py.string_dtype()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(
            "phrases", data=np.array([p.encode() for p in phrases], dtype=object), dtype=strings, track_times=False
        )
        f.create_dataset(
            "classes", data=np.array([c.encode() for c in classes], dtype=object), dtype=strings, track_times=False
        )
        f.create_dataset("scores", data=np.asarray(scores, dtype=np.float32), track_times=False)


def read_matching_matrix(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Inverse of :func:`write_matching_matrix`, with shape checks."""
    with open_hdf5(path, "matching matrix") as f:
        for k in ("phrases", "classes", "scores"):
            if k not in f:
                raise Wang21DataError(f"{path}: key {k!r} missing (expected phrases [M], classes [C], scores [M, C])")
        _numeric(f["scores"], str(path), "scores", "[M, C]")
        ph = [x.decode() if isinstance(x, bytes) else str(x) for x in f["phrases"][()]]
        cl = [x.decode() if isinstance(x, bytes) else str(x) for x in f["classes"][()]]
        sc = np.asarray(f["scores"][()], dtype=np.float32)
    if sc.shape != (len(ph), len(cl)):
        raise Wang21DataError(f"{path}: key 'scores' has shape {sc.shape}; expected [{len(ph)}, {len(cl)}]")
    return ph, cl, sc


# ----------------------------------------------------------------------------- converters


def glove_text_to_hdf5(
    text_path: str | Path, out_path: str | Path, vocab: Iterable[str] | None = None
) -> dict[str, int]:
    """Convert a GloVe text file (``word v1 ... vE`` per line) to the official HDF5 (one dataset per word).

    Words that cannot be HDF5 names (containing "/" or equal to ".") are skipped and counted;
    ``vocab`` keeps only those words. Returns counts.
    """
    wanted = None if vocab is None else set(vocab)
    n_written = n_skipped = 0
    dim = None
    if not os.path.isfile(text_path):
        raise Wang21DataError(f"{text_path}: GloVe text file not found")
    with (
        atomic_path(out_path) as tmp,
        open(text_path, encoding="utf-8", errors="strict") as fin,
        h5py.File(tmp, "w") as f,
    ):
        for lineno, line in enumerate(_text_lines(fin, text_path), 1):
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
            try:
                vec = np.asarray(vals, dtype=np.float32)
            except ValueError:
                raise Wang21DataError(f"{text_path}: line {lineno} ({w!r}) has a value that is not a number") from None
            f.create_dataset(w, data=vec)
            n_written += 1
    if n_skipped:
        log.warning("%s: %d words skipped (not valid HDF5 names or duplicates)", text_path, n_skipped)
    return {"written": n_written, "skipped": n_skipped, "dim": dim or 0}


def _text_lines(f: Any, path: str | Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError:
        raise Wang21DataError(f"{path}: not a UTF-8 text file") from None


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

    Read with :mod:`groundkit.formats.flickr30k_entities` (boxes 0-based, as the release's own parser).
    Per sentence, phrases with a box come first (the official evaluation assumes it), then boxless
    ones; the ground truth of a phrase is the union (enclosing box) of all its entity's boxes (the
    weak-supervision convention), clipped to the image (counted). Returns counts.
    """
    root = Path(root)
    stats = {
        "images": 0,
        "sentences": 0,
        "phrases": 0,
        "phrases_with_box": 0,
        "phrases_dropped_over_max": 0,
        "boxes_clipped": 0,
        "boxes_degenerate": 0,
        "tokens_truncated": 0,
    }
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
            log.warning(
                "%s: %d sentences, expected %d (padded with empty sentences)",
                sent_path,
                len(sents),
                sentences_per_image,
            )
        lim = np.array([ann["width"] - 1, ann["height"] - 1] * 2, dtype=np.float32)
        toks = np.full((sentences_per_image, max_phrases, max_tokens), "", dtype=object)
        gt = np.zeros((sentences_per_image, max_phrases, 4), dtype=np.float32)
        for s, (sent, boxes) in enumerate(
            zip(sents[:sentences_per_image], fe.phrase_boxes(sents[:sentences_per_image], ann))
        ):
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
        try:
            d = dict(np.load(fp, allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:  # zip or npy damaged, or not an .npz at all
            raise Wang21DataError(f"{fp}: not a readable .npz file, truncated or corrupt ({e})") from None
        for k in ("boxes", "features"):
            if k not in d:
                raise Wang21DataError(
                    f"{fp}: key {k!r} missing (expected boxes [N, 4], logits or scores [N, C], features [N, D])"
                )
        lk = "logits" if "logits" in d else "scores" if "scores" in d else None
        if lk is None:
            raise Wang21DataError(f"{fp}: key 'logits' (or 'scores') missing (expected [N, C] class logits)")
        try:
            boxes, feats, cls = (np.asarray(d[k], dtype=np.float32) for k in ("boxes", "features", lk))
        except (TypeError, ValueError):
            raise Wang21DataError(f"{fp}: keys 'boxes', 'features', {lk!r} must hold numbers") from None
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
            raise Wang21DataError(
                f"{fp}: rows have {row.shape[1]} columns; the first file had {width} (same D and C needed)"
            )
        rows_out[fp.stem] = row
        stats["images"] += 1
        stats["rows"] += row.shape[0]
    write_region_hdf5(out_path, rows_out)
    if stats["boxes_clipped"]:
        log.warning("detections-to-hdf5: %d boxes clipped to the image", stats["boxes_clipped"])
    return stats


# ----------------------------------------------------------------------------- CLI registrars
