"""wang21 data: one split's (image, sentence) pairs as tensors, with teacher class weights per phrase."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import h5py
import numpy as np
import torch

from ...config import ConfigError
from ...formats import wang21_hdf5 as wfmt
from ...text import GLOVE_PACKAGE, is_glove_package, load_word_vectors
from ..base import GroundingDataset
from .config import Wang21Config, Wang21DataConfig
from .prepare import REGION_NORM_PRESETS, phrase_class_weights

log = logging.getLogger("groundkit.wang21")

__all__ = ["Wang21Dataset", "resolve_paths", "word_dim", "norm_stats"]


# ----------------------------------------------------------------------------- data


def world_files(root: str | os.PathLike) -> dict[str, str]:
    """The ``data.*`` files of a built-in phrase world (``groundkit data synth --task phrase``): region and phrase
    features per split, its GloVe subset, detector classes, phrase-to-class map and the matching matrix that map
    came from."""
    root = os.fspath(root)
    return {
        "region_feat_path": os.path.join(root, "region_features_{split}.hdf5"),
        "phrase_feat_path": os.path.join(root, "phrase_features_{split}.hdf5"),
        "glove_path": os.path.join(root, "glove.hdf5"),
        "class_names": os.path.join(root, "detector_classes.txt"),
        "phrase_to_label_json": os.path.join(root, "phrase_to_label.json"),
        "matching_matrix_path": os.path.join(root, "matching_matrix.hdf5"),
    }


def resolve_paths(d: Wang21DataConfig, split: str) -> tuple[str, str] | None:
    """(region, phrase) files of ``split``, or None when the config names none."""
    if split != "train" and d.eval_region_feat_path:
        if not d.eval_phrase_feat_path:
            raise ConfigError("data.eval_region_feat_path is set but data.eval_phrase_feat_path is not")
        return d.eval_region_feat_path, d.eval_phrase_feat_path
    own = {
        "val": (d.val_region_feat_path, d.val_phrase_feat_path),
        "test": (d.test_region_feat_path, d.test_phrase_feat_path),
    }.get(split)
    if own and own[0]:
        if not own[1]:
            raise ConfigError(f"data.{split}_region_feat_path is set but data.{split}_phrase_feat_path is not")
        return own
    r, p = d.region_feat_path, d.phrase_feat_path
    if "{split}" in r:
        return r.format(split=split), p.format(split=split)
    if split == "train" and r:
        if not p:
            raise ConfigError("data.region_feat_path is set but data.phrase_feat_path is not")
        return r, p
    return None


def word_dim(d: Wang21DataConfig) -> int:
    """Word-vector dimension: ``data.word_dim`` or read from the GloVe source."""
    if d.word_dim > 0:
        return d.word_dim
    if is_glove_package(d.glove_path):
        return 50
    if not d.glove_path or not os.path.isfile(d.glove_path):
        raise ConfigError(f"data.glove_path={d.glove_path!r}: file not found (GloVe HDF5 or {GLOVE_PACKAGE!r})")
    with wfmt.open_hdf5(d.glove_path, "word vector") as f:
        for k in f:
            if not isinstance(f[k], h5py.Dataset):
                raise wfmt.Wang21DataError(f"{d.glove_path}: key {k!r} is a group; expected a word vector [E]")
            return int(np.prod(f[k].shape))
    raise ConfigError(f"{d.glove_path}: no word vectors")


def norm_stats(d: Wang21DataConfig) -> tuple[float, float]:
    if d.norm_preset in ("", "compute"):
        return d.region_mean, d.region_std
    if d.norm_preset not in REGION_NORM_PRESETS:
        raise ConfigError(
            f"data.norm_preset={d.norm_preset!r}; expected one of {sorted(REGION_NORM_PRESETS)}, 'compute' or ''"
        )
    return REGION_NORM_PRESETS[d.norm_preset]


def _read_split(
    d: Wang21DataConfig, region_path: str, phrase_path: str
) -> tuple[wfmt.RegionFile, wfmt.PhraseFile, int]:
    """Region and phrase features of one split, and ``S``: the sentences per image used
    (``data.captions_per_image``; 0: all that the file stores)."""
    dtype = np.float16 if d.feature_dtype == "float16" else np.float32
    reg = wfmt.read_region_hdf5(region_path, d.region_dim, d.n_proposals, dtype=dtype)
    phr = wfmt.read_phrase_hdf5(phrase_path, reg.image_ids, max_tokens=d.max_tokens)
    S_file = phr.tokens.shape[1]
    S = d.captions_per_image if d.captions_per_image > 0 else S_file
    if S > S_file:
        raise wfmt.Wang21DataError(
            f"{phrase_path}: data.captions_per_image={S} but the file stores {S_file} sentences per image ([S, P, T] with S={S_file})"
        )
    return reg, phr, S


def _word_ids(
    d: Wang21DataConfig, toks: np.ndarray, tmask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The split's vocabulary as rows of a word-vector table (row 0: padding / no vector): token ids into the
    table, the table [V + 1, E], and the vocabulary's counts (distinct words, those without a vector)."""
    vocab = sorted(set(toks[tmask].tolist()))
    vecs = load_word_vectors(d.glove_path, vocab)
    wd = word_dim(d)
    known = [w for w in vocab if w in vecs]
    for w in known:
        if vecs[w].shape[0] != wd:
            raise wfmt.Wang21DataError(
                f"{d.glove_path}: key {w!r} has {vecs[w].shape[0]} values; expected [{wd}] (data.word_dim)"
            )
    table = np.zeros((len(known) + 1, wd), dtype=np.float32)
    index = {w: i + 1 for i, w in enumerate(known)}
    for w, i in index.items():
        table[i] = vecs[w]
    ids = (
        np.vectorize(lambda w: index.get(w, 0), otypes=[np.int64])(toks)
        if toks.size
        else np.zeros(toks.shape, np.int64)
    )
    counts = {"vocab": len(vocab), "vocab_without_vector": len(vocab) - len(known)}
    return np.where(tmask, ids, 0), table, counts


def _text_stats(ids: np.ndarray, tmask: np.ndarray, exists: np.ndarray, vocab_stats: dict[str, int]) -> dict[str, int]:
    """Token, vocabulary and phrase counts of a split, with those that have no word vector."""
    in_vocab = tmask & (ids > 0)
    return {
        "tokens": int(tmask.sum()),
        "tokens_without_vector": int((tmask & (ids == 0)).sum()),
        **vocab_stats,
        "phrases": int(exists.sum()),
        "phrases_without_any_vector": int((exists & ~in_vocab.any(-1)).sum()),
    }


def _warn_missing_vectors(stats: dict[str, int], phrase_path: str, glove_path: str) -> None:
    if stats["tokens_without_vector"]:
        log.warning(
            "%s: %d of %d tokens (%d distinct words) have no vector in %s (zero vector, excluded from max-pool, as the official code)",
            phrase_path,
            stats["tokens_without_vector"],
            stats["tokens"],
            stats["vocab_without_vector"],
            glove_path,
        )
    if stats["phrases_without_any_vector"]:
        log.warning(
            "%s: %d phrases have no word with a vector (skipped in training)",
            phrase_path,
            stats["phrases_without_any_vector"],
        )


class Wang21Dataset(GroundingDataset):
    """(image, sentence) pairs of one split, every array a tensor; ``get_batch`` gathers by index.

    Pair ``i`` is image ``i // S``, sentence ``i % S`` with ``S = captions_per_image`` (the
    official ``ind // 5, ind % 5`` order).
    """

    batched = True

    def __init__(self, cfg: Wang21Config, split: str, region_path: str, phrase_path: str):
        d = cfg.data
        self.split, self.cfg = split, cfg
        reg, phr, S = _read_split(d, region_path, phrase_path)
        self.image_ids, self.S = reg.image_ids, S
        self.n_logits = reg.logits.shape[-1]
        tmask = phr.token_mask[:, :S]
        ids, table, vocab_stats = _word_ids(d, phr.tokens[:, :S], tmask)
        exists = phr.phrase_exists[:, :S]
        train_valid = exists & (tmask & (ids > 0)).any(-1)  # official: >= 1 in-vocabulary token
        self.stats = {"images": len(self.image_ids), "pairs": len(self.image_ids) * S}
        self.stats.update(_text_stats(ids, tmask, exists, vocab_stats))
        _warn_missing_vectors(self.stats, phrase_path, d.glove_path)
        phrase_ids = self._attach_teacher(cfg, phr.phrase_strings()[:, :S], phrase_path)
        T = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        self.t: dict[str, torch.Tensor] = {
            "region_feats": T(reg.features),
            "region_logits": T(reg.logits),
            "region_boxes": T(reg.boxes),
            "region_valid": T(reg.valid),
            "token_ids": T(ids),
            "token_mask": T(tmask),
            "phrase_ids": T(phrase_ids),
            "train_valid": T(train_valid),
            "eval_valid": T(exists & (phr.gt_boxes[:, :S, :, 3] > 0)),
            "gt_boxes": T(phr.gt_boxes[:, :S]),
            "word_table": T(table),
        }
        if self.teacher_w is not None:
            self.t["teacher_w"] = self.teacher_w
        self.device = torch.device("cpu")

    def _attach_teacher(self, cfg: Wang21Config, strings: np.ndarray, phrase_path: str) -> np.ndarray:
        """Ids of the distinct phrase strings [I, S, P]; sets ``teacher_w`` (class weights per distinct phrase)
        when a teacher source is configured, else None."""
        uniq, inv = np.unique(strings.reshape(-1), return_inverse=True)
        phrase_ids = inv.reshape(strings.shape).astype(np.int64)
        self.teacher_w: torch.Tensor | None = None
        source = self._teacher_source(cfg)
        if source is not None:
            w, tstats = self._teacher_weights(cfg, list(uniq), source)
            w[uniq == ""] = 0
            self.teacher_w = torch.from_numpy(w)
            self.stats.update({f"teacher_{k}": v for k, v in tstats.items()})
            log.info(
                "%s: teacher covers %d of %d distinct phrases (%d class ids beyond the %d logits skipped)",
                phrase_path,
                tstats["mapped"],
                tstats["phrases"],
                tstats["class_out_of_range"],
                self.n_logits,
            )
        return phrase_ids

    @classmethod
    def from_tensors(
        cls, cfg: Wang21Config, split: str, tensors: dict[str, torch.Tensor], captions_per_image: int
    ) -> Wang21Dataset:
        """A dataset from ready tensors (the keys of ``self.t``), e.g. synthetic features for benchmarks."""
        self = cls.__new__(cls)
        self.split, self.cfg, self.S = split, cfg, captions_per_image
        self.t = dict(tensors)
        self.image_ids = [str(i) for i in range(self.t["region_feats"].shape[0])]
        self.n_logits = self.t["region_logits"].shape[-1]
        self.teacher_w = self.t.get("teacher_w")
        self.stats = {"images": len(self.image_ids), "pairs": len(self)}
        self.device = self.t["region_feats"].device
        return self

    @staticmethod
    def _teacher_source(cfg: Wang21Config) -> str | None:
        d, lc = cfg.data, cfg.loss
        if lc.soft_teacher:
            if not d.matching_matrix_path:
                raise ConfigError(
                    "loss.soft_teacher=true needs data.matching_matrix_path (groundkit data phrase-to-label --matrix-out)"
                )
            return "matrix"
        return "json" if d.phrase_to_label_json else None

    def _teacher_weights(self, cfg: Wang21Config, strings: list[str], source: str) -> tuple[np.ndarray, dict]:
        d, lc = cfg.data, cfg.loss
        if not d.class_names:
            raise ConfigError(
                "data.class_names (detector class names: a file, a label-map pbtxt or 'coco') is needed to read the phrase -> class map"
            )
        names = wfmt.load_class_names(d.class_names)
        if source == "json":
            return phrase_class_weights(
                strings, self.n_logits, hard_map=wfmt.read_phrase_to_label(d.phrase_to_label_json, names)
            )
        return phrase_class_weights(
            strings,
            self.n_logits,
            matrix=wfmt.read_matching_matrix(d.matching_matrix_path),
            class_names=names,
            threshold=lc.match_threshold,
            temperature=lc.match_temperature,
            top_k=lc.match_top_k,
        )

    def __len__(self) -> int:
        return len(self.image_ids) * self.S

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.t.values())

    def to(self, device: torch.device | str) -> Wang21Dataset:
        device = torch.device(device)
        self.t = {k: v.to(device) for k, v in self.t.items()}
        self.device = device
        return self

    def place(self, device: torch.device) -> None:
        """Move all features to ``device`` if policy and free memory allow (GPU only)."""
        pol = self.cfg.data.features_on_device
        if device.type == "cpu" or pol == "never" or self.device == device:
            return
        if pol == "auto" and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes() > 0.5 * free:
                log.info(
                    "%s features (%.1f GB) stay on the CPU (GPU free: %.1f GB)",
                    self.split,
                    self.nbytes() / 1e9,
                    free / 1e9,
                )
                return
        self.to(device)

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors of the pairs ``indices`` (B): regions [B, N, ...], phrases [B, P, ...] (vectorised gathers)."""
        t = self.t
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        img, sent = idx // self.S, idx % self.S
        tok = t["token_ids"][img, sent]  # [B, P, T]
        batch = {
            "image_index": img,
            "region_feats": t["region_feats"][img],
            "region_logits": t["region_logits"][img],
            "region_boxes": t["region_boxes"][img],
            "region_valid": t["region_valid"][img],
            "words": t["word_table"][tok],
            "token_mask": t["token_mask"][img, sent],
            "train_valid": t["train_valid"][img, sent],
            "eval_valid": t["eval_valid"][img, sent],
            "gt_boxes": t["gt_boxes"][img, sent],
        }
        if "teacher_w" in t:
            pid = t["phrase_ids"][img, sent]
            batch["teacher_w"] = t["teacher_w"][pid]
        P, maxp = batch["train_valid"].shape[1], self.cfg.data.max_phrases
        if self.split == "train" and 0 < maxp < P:  # official ReferIt case: sample max_phrases phrases
            keep = torch.rand(idx.shape[0], P, device=self.device).argsort(1)[:, :maxp]
            for k in ("words", "token_mask", "train_valid", "eval_valid", "gt_boxes", "teacher_w"):
                if k in batch:
                    v = batch[k]
                    batch[k] = torch.gather(
                        v, 1, keep.view(*keep.shape, *([1] * (v.ndim - 2))).expand(-1, -1, *v.shape[2:])
                    )
        return batch
