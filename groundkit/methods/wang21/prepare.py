"""wang21 data preparation: official constants, teacher class weights, and the ``groundkit data`` tools.

``prepare-flickr30k``, ``glove-to-hdf5``, ``detections-to-hdf5`` (converters in
:mod:`groundkit.formats.wang21_hdf5`) and ``phrase-to-label`` (phrase -> class map by
:func:`groundkit.text.match_phrases`, plus the full phrase x class matrix for the soft teacher).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...formats.wang21_hdf5 import (
    Wang21DataError,
    detections_to_hdf5,
    glove_text_to_hdf5,
    load_class_names,
    phrase_strings_of,
    prepare_flickr30k,
    write_matching_matrix,
)
from ...text import GLOVE_PACKAGE, load_word_vectors, match_phrases, matching_vocabulary

__all__ = [
    "REGION_NORM_PRESETS",
    "FEATURE_DIMS",
    "official_settings_from_paths",
    "phrase_class_weights",
]


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
    return {
        "dataset": ds,
        "feature_type": arch,
        "region_dim": FEATURE_DIMS[arch],
        "detector_labels": det,
        "captions_per_image": ratio,
        "norm_preset": key,
        "region_mean": mean,
        "region_std": std,
    }


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


def _print(stats: dict[str, Any]) -> None:
    print(json.dumps(stats, indent=1, default=str))


def register_prepare_flickr30k(sub: Any) -> None:
    p = sub.add_parser(
        "prepare-flickr30k", help="Flickr30K Entities Sentences + Annotations -> phrase HDF5 (union GT boxes)"
    )
    p.add_argument("--root", required=True, help="folder with Sentences/ and Annotations/")
    p.add_argument("--image-list", required=True, help="text file of image ids (e.g. test.txt of the official split)")
    p.add_argument("--out", required=True, help="output phrase HDF5")
    p.add_argument("--max-phrases", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--sentences-per-image", type=int, default=5)
    p.add_argument("--keep-case", action="store_true", help="do not lower-case tokens")

    def run(a: argparse.Namespace) -> int:
        ids = [ln.strip() for ln in Path(a.image_list).read_text().splitlines() if ln.strip()]
        _print(
            prepare_flickr30k(a.root, ids, a.out, a.max_phrases, a.max_tokens, a.sentences_per_image, not a.keep_case)
        )
        return 0

    p.set_defaults(func=run)


def register_glove_to_hdf5(sub: Any) -> None:
    p = sub.add_parser("glove-to-hdf5", help="GloVe text file -> HDF5 (one dataset per word)")
    p.add_argument("--glove-txt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--phrase-feat-path", nargs="*", default=[], help="keep only words used in these phrase HDF5 files")

    def run(a: argparse.Namespace) -> int:
        vocab = {w for p in phrase_strings_of(a.phrase_feat_path) for w in p.split()} if a.phrase_feat_path else None
        _print(glove_text_to_hdf5(a.glove_txt, a.out, vocab))
        return 0

    p.set_defaults(func=run)


def register_detections_to_hdf5(sub: Any) -> None:
    p = sub.add_parser("detections-to-hdf5", help="per-image detector outputs (.npz) -> region HDF5")
    p.add_argument(
        "--det-dir", required=True, help="folder of <image id>.npz with boxes, logits|scores, features[, image_size]"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--n-proposals", type=int, default=30)
    p.add_argument("--add-background", action="store_true", help="the detector has no background column: prepend one")
    p.add_argument(
        "--scores-are-probs", action="store_true", help="class scores are probabilities (stored as log-probabilities)"
    )

    def run(a: argparse.Namespace) -> int:
        _print(detections_to_hdf5(a.det_dir, a.out, a.n_proposals, a.add_background, a.scores_are_probs))
        return 0

    p.set_defaults(func=run)


def register_phrase_to_label(sub: Any) -> None:
    p = sub.add_parser(
        "phrase-to-label", help="phrase -> detector class map (and phrase x class matrix) by word-vector similarity"
    )
    p.add_argument("--phrase-feat-path", nargs="+", required=True, help="phrase HDF5 file(s) whose phrases to map")
    p.add_argument("--classes", required=True, help="detector class names: text file, label-map pbtxt, or 'coco'")
    p.add_argument("--glove-path", required=True, help=f"GloVe HDF5 or {GLOVE_PACKAGE!r}")
    p.add_argument("--out", required=True, help="phrase_to_label.json")
    p.add_argument("--matrix-out", default=None, help="also write the phrase x class cosine matrix (HDF5)")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum cosine for a phrase to be mapped")

    def run(a: argparse.Namespace) -> int:
        plist = phrase_strings_of(a.phrase_feat_path)
        classes = load_class_names(a.classes)
        vecs = load_word_vectors(a.glove_path, matching_vocabulary(plist, classes))
        if not vecs:
            raise Wang21DataError(f"{a.glove_path}: none of the phrase or class words has a vector")
        mapping, sim = match_phrases(plist, classes, vecs, threshold=a.threshold, exact_first=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(mapping, indent=0, sort_keys=True))
        if a.matrix_out:
            write_matching_matrix(a.matrix_out, plist, classes, sim)
        _print(
            {
                "phrases": len(plist),
                "mapped": len(mapping),
                "unmapped": len(plist) - len(mapping),
                "classes": len(classes),
            }
        )
        return 0

    p.set_defaults(func=run)
