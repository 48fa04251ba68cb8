"""Readers for the Collaborative Experts / TeachText / CrossKD feature archives and a memory-mapped store.

Released layout (one data set root, e.g. ``MSRVTT/high-quality/structured-symlinks``):

* expert pickles ``{video_id: float[D]}`` (fixed size) or ``{video_id: float[N, D]}`` (variable
  length, e.g. audio/speech), a Python ``float('nan')`` where the expert is missing;
* ``raw-captions.pkl`` ``{video_id: [[token, ...] per caption]}``;
* ``aggregated_text_feats/<name>.pkl`` ``{video_id: [float[n_tokens, D] per caption]}``;
* TeachText teachers ``{video_id: {"vid_embds": {expert: float[d]}, "text_embds": {expert: float[n_caps, d]}}}``;
* split lists, one video id per line.

:func:`convert_released` turns these into an :class:`ExpertStore`: a directory of ``.npy`` arrays
in fp16 (vector experts ``[N, D]``, ragged experts and caption tokens as one flat ``[total, D]``
array plus offsets) that is memory-mapped on load, so training and evaluation touch only the
rows they need (never the reference's float64 ``[videos, captions, tokens, dim]`` allocation).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import DataError

__all__ = [
    "FeatureError",
    "load_pickle",
    "read_split_list",
    "read_expert_pickle",
    "read_raw_captions",
    "read_text_features",
    "read_teacher_pickle",
    "DATASET_LAYOUTS",
    "StoreWriter",
    "ExpertStore",
    "convert_released",
    "RetrievalTrainSet",
    "RetrievalEvalSet",
]

STORE_VERSION = 1


class FeatureError(DataError):
    """A feature file that is missing, lacks a video, or does not have the expected shape."""


# ----------------------------------------------------------------------------- pickle readers


class _Placeholder:
    """Stands in for classes of old pickles (e.g. zsvision's ExpertStore) that are not importable."""

    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"__module__": module})


def load_pickle(path: str | Path) -> Any:
    """Load a pickle written by Python 2 or 3 (``encoding="latin1"``, as the reference's memcache)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"feature file not found: {path}")
    with open(path, "rb") as f:
        return _LenientUnpickler(f, encoding="latin1").load()


def is_missing(x: Any) -> bool:
    """The reference's ``has_missing_values``: a float NaN stands for a missing expert."""
    return isinstance(x, float) and math.isnan(x)


def read_split_list(path: str | Path, strip_suffix: bool = False) -> list[str]:
    """Video ids of a split list (one per line, blank lines skipped; DiDeMo drops ``.ext`` suffixes)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"split list not found: {path}")
    ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return [i.split(".")[0] for i in ids] if strip_suffix else ids


def _as_array(x: Any, path: Path, vid: str, expect_dim: int | None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] == 0:
        raise FeatureError(f"{path}: video {vid!r} has a feature of shape {a.shape}; expected [..., {expect_dim or 'D'}]")
    if expect_dim is not None and a.shape[-1] != expect_dim:
        raise FeatureError(f"{path}: video {vid!r} has feature dim {a.shape[-1]}, expected {expect_dim} (config/other videos)")
    return a


def read_expert_pickle(
    path: str | Path, video_ids: Sequence[str] | None = None, dim: int | None = None, missing_ids: str = "error"
) -> tuple[dict[str, np.ndarray | None], str, int]:
    """Read one expert pickle -> ({vid: array or None (missing)}, kind "fixed"|"ragged", dim).

    ``video_ids`` restricts and checks coverage: an id absent from the file raises
    :class:`FeatureError` (``missing_ids="nan"`` treats it as a missing expert instead).
    ``dim`` checks every feature's last dimension.
    """
    path = Path(path)
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise FeatureError(f"{path}: expected a dict keyed by video id, got {type(data).__name__}")
    ids = list(data) if video_ids is None else list(video_ids)
    out: dict[str, np.ndarray | None] = {}
    kind = None
    for vid in ids:
        if vid not in data:
            if missing_ids == "nan":
                out[vid] = None
                continue
            raise FeatureError(f"{path}: video id {vid!r} is absent from this expert ({len(data)} videos in the file)")
        x = data[vid]
        if x is None or is_missing(x):
            out[vid] = None
            continue
        a = _as_array(x, path, vid, dim)
        if np.isnan(a).all():
            out[vid] = None
            continue
        dim = a.shape[-1]
        k = "fixed" if a.ndim == 1 else "ragged"
        if a.ndim > 2:
            raise FeatureError(f"{path}: video {vid!r} has a {a.ndim}-d feature {a.shape}; expected [D] or [N, D]")
        if kind is None:
            kind = k
        elif kind != k and k == "ragged":
            kind = "ragged"  # mixed: vectors are stored as length-1 sequences
        out[vid] = np.nan_to_num(a)
    if dim is None:
        raise FeatureError(f"{path}: every requested video is missing this expert; cannot infer its dimension")
    return out, kind or "fixed", int(dim)


def read_raw_captions(path: str | Path, video_ids: Sequence[str] | None = None) -> dict[str, list[list[str]]]:
    """``raw-captions.pkl``: {vid: [[token, ...], ...]}; checks the requested ids are present."""
    path = Path(path)
    return {vid: [list(c) if not isinstance(c, str) else c.split() for c in caps]
            for vid, caps in _video_entries(path, video_ids, "captions")}


def _video_entries(path: Path, video_ids: Sequence[str] | None, what: str) -> Iterator[tuple[str, Any]]:
    """(video id, value) of a pickle keyed by video id, for ``video_ids`` (default: all), each checked present."""
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise FeatureError(f"{path}: expected a dict keyed by video id")
    for vid in (list(data) if video_ids is None else list(video_ids)):
        if vid not in data:
            raise FeatureError(f"{path}: video id {vid!r} has no {what}")
        yield vid, data[vid]


def read_text_features(
    path: str | Path, video_ids: Sequence[str] | None = None, dim: int | None = None
) -> dict[str, list[np.ndarray]]:
    """Per-token text features {vid: [float[n_tokens, D] per caption]}; checks ids and dimension."""
    path = Path(path)
    out = {}
    for vid, caps in _video_entries(path, video_ids, "text features"):
        if isinstance(caps, np.ndarray) and caps.ndim == 2:
            caps = [caps]
        arrs = []
        for c in caps:
            a = _as_array(c, path, vid, dim)
            if a.ndim == 1:
                a = a[None]
            dim = a.shape[-1]
            arrs.append(a)
        out[vid] = arrs
    return out


def read_teacher_pickle(
    path: str | Path, video_ids: Sequence[str], experts: Sequence[str] | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], int]:
    """TeachText teacher pickle -> ({vid: (video [M, d], text [n_caps, M, d])}, experts, d).

    Layout ``{vid: {"vid_embds": {expert: [d]}, "text_embds": {expert: [n_caps, d]}}}``.
    """
    path = Path(path)
    data = load_pickle(path)
    out = {}
    dim = None
    for vid in video_ids:
        if vid not in data:
            raise FeatureError(f"{path}: video id {vid!r} is absent from this teacher")
        rec = data[vid]
        if not isinstance(rec, dict) or "vid_embds" not in rec or "text_embds" not in rec:
            raise FeatureError(f"{path}: entry {vid!r} must be a dict with 'vid_embds' and 'text_embds'")
        if experts is None:
            experts = sorted(rec["vid_embds"])
        try:
            v = np.stack([np.asarray(rec["vid_embds"][m], dtype=np.float32).reshape(-1) for m in experts])
            t = np.stack([np.asarray(rec["text_embds"][m], dtype=np.float32).reshape(-1, v.shape[-1]) for m in experts], axis=1)
        except KeyError as e:
            raise FeatureError(f"{path}: video {vid!r} lacks teacher expert {e.args[0]!r} (expected {list(experts)})") from None
        if dim is not None and v.shape[-1] != dim:
            raise FeatureError(f"{path}: video {vid!r} has teacher dim {v.shape[-1]}, expected {dim}")
        dim = v.shape[-1]
        out[vid] = (np.nan_to_num(v), np.nan_to_num(t))
    return out, list(experts or []), int(dim or 0)


# ----------------------------------------------------------------------------- data set layouts

_MSRVTT_EXPERTS = {
    "audio": "aggregated_audio_feats/Audio_MSRVTT_new.pickle",
    "speech": "aggregated_speech/speech-w2v.pickle",
    "scene.densenet161.0": "aggregated_scene_25fps_256px_stride1_offset0/densenet161-avg.pickle",
    "imagenet.senet154.0": "aggregated_imagenet_25fps_256px_stride1_offset0/senet154-avg.pickle",
    "imagenet.resnext101_32x48d.0": "aggregated_imagenet_25fps_256px_stride1_offset0/resnext101_32x48d-avg.pickle",
    "r2p1d.r2p1d-ig65m.0": "aggregated_r2p1d_30fps_256px_stride32_offset0_inner_stride1/r2p1d-ig65m-avg.pickle",
    "r2p1d.r2p1d-ig65m-kinetics.0": "aggregated_r2p1d_30fps_256px_stride32_offset0_inner_stride1/r2p1d-ig65m-kinetics-avg.pickle",
}
_TEACHERS = {
    "w2v": "teachers/train-full-ce-refined-text-w2v.pkl",
    "gpt2-xl": "teachers/train-full-ce-refined-text-gpt2-xl.pkl",
    "gpt2-xl-finetuned": "teachers/train-full-ce-refined-text-gpt2-xl-finetuned.pkl",
}

# Relative paths of the released archives (``high-quality/structured-symlinks``), per data set, as
# the reference data loaders build them and ``misc/datasets/<ds>/tar_include_hq.txt`` lists them
# (checked for all four data sets). Configs can override any entry.
DATASET_LAYOUTS: dict[str, dict[str, Any]] = {
    "msrvtt": {
        "experts": _MSRVTT_EXPERTS,
        "text_feats": {"gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl", "w2v": "aggregated_text_feats/w2v.pkl", "gpt2-xl": "aggregated_text_feats/gpt2-xl.pkl"},
        "raw_captions": "raw-captions.pkl",
        "teachers": _TEACHERS,
        "splits": {
            "full": {"train": "train_list_full.txt", "val": "val_list_full.txt", "test": "test_list_full.txt"},
            "1k-A": {"train": "train_list_jsfusion.txt", "val": "val_list_jsfusion.txt", "test": "val_list_jsfusion.txt"},
            "1k-B": {"train": "train_list_miech.txt", "val": "test_list_miech.txt", "test": "test_list_miech.txt"},
        },
        "test_caption_index": {"1k-A": "jsfusion_val_caption_idx.pkl"},
    },
    "msvd": {
        # only the kinetics-finetuned R(2+1)D moved to a stride-8 folder (MSVD_dataset.py custom_paths)
        "experts": {k: v.replace("stride32", "stride8") if k == "r2p1d.r2p1d-ig65m-kinetics.0" else v
                    for k, v in _MSRVTT_EXPERTS.items() if k not in ("audio", "speech")},
        "text_feats": {"gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl"},
        "raw_captions": "raw-captions.pkl",
        "teachers": _TEACHERS,
        "splits": {"official": {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}},
    },
    "didemo": {
        "experts": {**{k: v for k, v in _MSRVTT_EXPERTS.items() if k not in ("audio", "speech")},
                    "audio": "aggregated_audio_feats/vggish-audio-raw.pickle", "speech": "aggregated_speech_feats/stt_w2v.pickle"},
        "text_feats": {"gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl"},
        "raw_captions": "raw-captions.pkl",
        "teachers": _TEACHERS,
        "splits": {"official": {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}},
        "strip_suffix": True,
    },
    "activity-net": {
        "experts": {**{k: v for k, v in _MSRVTT_EXPERTS.items() if k not in ("audio", "speech")},
                    "audio": "aggregated_audio/vggish-audio-raw.pickle", "speech": "aggregated_speech/goog_w2v-speech-raw.pickle"},
        "text_feats": {"gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl"},
        "raw_captions": "raw-captions-train-val_1.pkl",
        "teachers": _TEACHERS,
        # val1 is used for model selection *and* reporting in the reference
        "splits": {"val1": {"train": "train_list.txt", "val": "val_1_list.txt", "test": "val_1_list.txt"}},
    },
}


# ----------------------------------------------------------------------------- the store


class StoreWriter:
    """Writes an :class:`ExpertStore` directory one array at a time (bounded memory)."""

    def __init__(self, root: str | Path, video_ids: Sequence[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.video_ids = list(video_ids)
        self.index = {v: i for i, v in enumerate(self.video_ids)}
        if len(self.index) != len(self.video_ids):
            raise FeatureError("duplicate video ids given to the store writer")
        self.meta: dict[str, Any] = {"version": STORE_VERSION, "video_ids": self.video_ids, "experts": {}, "text": {}, "teachers": {}, "splits": {}, "info": {}}

    def _save(self, name: str, arr: np.ndarray) -> None:
        np.save(self.root / f"{name}.npy", arr, allow_pickle=False)

    def add_expert(self, name: str, feats: dict[str, np.ndarray | None], dim: int, kind: str = "auto", source: str = "") -> None:
        """feats {vid: [D] | [N, D] | None (missing)} for every store video."""
        n = len(self.video_ids)
        avail = np.zeros(n, dtype=bool)
        for vid in self.video_ids:
            if vid not in feats:
                raise FeatureError(f"expert {name!r}{' (' + source + ')' if source else ''}: video id {vid!r} absent")
        if kind == "auto":
            kind = "ragged" if any(a is not None and a.ndim == 2 for a in feats.values()) else "fixed"
        if kind == "fixed":
            arr = np.zeros((n, dim), dtype=np.float16)
            for i, vid in enumerate(self.video_ids):
                a = feats[vid]
                if a is not None:
                    arr[i] = a.reshape(-1)
                    avail[i] = True
            self._save(f"expert.{name}", arr)
        else:
            lens = np.array([0 if feats[v] is None else (1 if feats[v].ndim == 1 else len(feats[v])) for v in self.video_ids])
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            arr = np.zeros((int(offsets[-1]), dim), dtype=np.float16)
            for i, vid in enumerate(self.video_ids):
                a = feats[vid]
                if a is not None and lens[i] > 0:
                    arr[offsets[i] : offsets[i + 1]] = a.reshape(-1, dim)
                    avail[i] = True
            self._save(f"expert.{name}", arr)
            self._save(f"expert.{name}.offsets", offsets)
        self._save(f"expert.{name}.avail", avail)
        self.meta["experts"][name] = {"kind": kind, "dim": int(dim), "source": source, "available": int(avail.sum())}

    def add_text(self, name: str, feats: dict[str, list[np.ndarray]], dim: int, encoder: dict | None = None) -> None:
        """Per-token caption features {vid: [float[n_tokens, D] per caption]}, stored ragged."""
        caps_per_vid = np.array([len(feats[v]) for v in self.video_ids], dtype=np.int64)
        vid_off = np.concatenate([[0], np.cumsum(caps_per_vid)]).astype(np.int64)
        tok_lens = np.array([len(c) for v in self.video_ids for c in feats[v]], dtype=np.int64)
        cap_off = np.concatenate([[0], np.cumsum(tok_lens)]).astype(np.int64)
        arr = np.zeros((int(cap_off[-1]), dim), dtype=np.float16)
        k = 0
        for v in self.video_ids:
            for c in feats[v]:
                arr[cap_off[k] : cap_off[k + 1]] = c
                k += 1
        self._save(f"text.{name}", arr)
        self._save(f"text.{name}.cap_offsets", cap_off)
        self._save(f"text.{name}.vid_offsets", vid_off)
        self.meta["text"][name] = {"dim": int(dim), "encoder": encoder or {}}

    def add_teacher(self, name: str, data: dict[str, tuple[np.ndarray, np.ndarray]], experts: list[str], dim: int) -> None:
        """TeachText teacher embeddings: video [N, M, d] and text (ragged over captions) [total_caps, M, d]."""
        vids = np.stack([data[v][0] for v in self.video_ids]).astype(np.float16)
        caps = [data[v][1] for v in self.video_ids]
        off = np.concatenate([[0], np.cumsum([len(c) for c in caps])]).astype(np.int64)
        self._save(f"teacher.{name}.video", vids)
        self._save(f"teacher.{name}.text", np.concatenate(caps).astype(np.float16))
        self._save(f"teacher.{name}.vid_offsets", off)
        self.meta["teachers"][name] = {"experts": experts, "dim": int(dim)}

    def add_captions(self, captions: dict[str, list[list[str]]]) -> None:
        (self.root / "captions.json").write_text(json.dumps([captions[v] for v in self.video_ids]))

    def add_split(self, name: str, ids: Sequence[str]) -> None:
        bad = [v for v in ids if v not in self.index]
        if bad:
            raise FeatureError(f"split {name!r} names video {bad[0]!r}, which is not in the store")
        self.meta["splits"][name] = list(ids)

    def close(self, **info: Any) -> None:
        self.meta["info"].update(info)
        (self.root / "meta.json").write_text(json.dumps(self.meta, indent=1))


class ExpertStore:
    """Memory-mapped features of one data set (see :class:`StoreWriter` for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FeatureError(f"{self.root} is not a feature store (no meta.json); build one with `groundkit data convert-experts` or `extract-experts`")
        self.meta = json.loads(meta_path.read_text())
        self.video_ids: list[str] = self.meta["video_ids"]
        self.index = {v: i for i, v in enumerate(self.video_ids)}
        self._cache: dict[str, np.ndarray] = {}
        self._files: dict[str, tuple[int, int, np.dtype, int]] = {}
        self._captions: list[list[list[str]]] | None = None

    def _load(self, name: str) -> np.ndarray:
        if name not in self._cache:
            p = self.root / f"{name}.npy"
            if not p.is_file():
                raise FeatureError(f"feature store {self.root}: missing array {p.name}")
            self._cache[name] = np.load(p, mmap_mode="r")
        return self._cache[name]

    def _read_rows(self, name: str, start: int, end: int) -> np.ndarray:
        """Rows [start, end) of a 2-d array read with ``pread`` (not mapped): large token arrays read
        once during evaluation do not stay resident in this process."""
        if name not in self._files:
            p = self.root / f"{name}.npy"
            if not p.is_file():
                raise FeatureError(f"feature store {self.root}: missing array {p.name}")
            with open(p, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f))
                offset = f.tell()
            self._files[name] = (os.open(p, os.O_RDONLY), offset, dtype, int(np.prod(shape[1:])))
        fd, offset, dtype, width = self._files[name]
        rb = width * dtype.itemsize
        buf = os.pread(fd, (end - start) * rb, offset + start * rb)
        return np.frombuffer(buf, dtype=dtype).reshape(end - start, width)

    # ---- metadata
    @property
    def experts(self) -> dict[str, dict]:
        return self.meta["experts"]

    def split(self, name: str) -> list[str]:
        if name not in self.meta["splits"]:
            raise FeatureError(f"feature store {self.root}: no split {name!r}; has {sorted(self.meta['splits'])}")
        return self.meta["splits"][name]

    def indices(self, ids: Iterable[str]) -> np.ndarray:
        try:
            return np.array([self.index[v] for v in ids], dtype=np.int64)
        except KeyError as e:
            raise FeatureError(f"feature store {self.root}: unknown video id {e.args[0]!r}") from None

    def check_expert(self, name: str, dim: int | None = None) -> dict:
        if name not in self.experts:
            raise FeatureError(f"feature store {self.root}: no expert {name!r}; has {sorted(self.experts)}")
        info = self.experts[name]
        if dim is not None and dim > 0 and info["dim"] != dim:
            raise FeatureError(f"feature store {self.root}: expert {name!r} has dim {info['dim']}, config says {dim}")
        return info

    # ---- arrays
    def expert_batch(self, name: str, idx: np.ndarray, max_len: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(features fp32 [B, D] or [B, max_len, D] zero-padded/truncated, avail [B] bool, mask [B, max_len] or None)."""
        info = self.check_expert(name)
        avail = np.asarray(self._load(f"expert.{name}.avail")[idx])
        data = self._load(f"expert.{name}")
        if info["kind"] == "fixed":
            return np.asarray(data[idx], dtype=np.float32), avail, None
        off = self._load(f"expert.{name}.offsets")
        L = max_len or int(max((off[i + 1] - off[i]) for i in idx) or 1)
        out = np.zeros((len(idx), L, info["dim"]), dtype=np.float32)
        mask = np.zeros((len(idx), L), dtype=bool)
        for b, i in enumerate(idx):
            s, e = int(off[i]), min(int(off[i + 1]), int(off[i]) + L)
            out[b, : e - s] = data[s:e]
            mask[b, : e - s] = True
        return out, avail, mask

    def num_captions(self, text: str, idx: np.ndarray) -> np.ndarray:
        off = self._load(f"text.{text}.vid_offsets")
        return (off[idx + 1] - off[idx]).astype(np.int64)

    def caption_rows(self, text: str, idx: np.ndarray) -> list[np.ndarray]:
        """Global caption row indices of each video's captions (none if the store has no such text features)."""
        if text not in self.meta["text"]:
            return [np.zeros(0, dtype=np.int64) for _ in idx]
        off = self._load(f"text.{text}.vid_offsets")
        return [np.arange(off[i], off[i + 1]) for i in idx]

    def text_batch(self, text: str, cap_rows: Sequence[Sequence[int]], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Token features for queries; each query is one or more captions (fused: tokens stacked
        then truncated, as the reference's ``fuse_captions``). -> (fp32 [Q, max_tokens, D], mask [Q, max_tokens])."""
        if text not in self.meta["text"]:
            raise FeatureError(f"feature store {self.root}: no text features {text!r}; has {sorted(self.meta['text'])}")
        off = self._load(f"text.{text}.cap_offsets")
        D = self.meta["text"][text]["dim"]
        out = np.zeros((len(cap_rows), max_tokens, D), dtype=np.float32)
        mask = np.zeros((len(cap_rows), max_tokens), dtype=bool)
        for q, rows in enumerate(cap_rows):
            pos = 0
            for r in rows:
                if pos >= max_tokens:
                    break
                s, e = int(off[r]), int(off[r + 1])
                e = min(e, s + max_tokens - pos)
                out[q, pos : pos + e - s] = self._read_rows(f"text.{text}", s, e)
                mask[q, pos : pos + e - s] = True
                pos += e - s
        return out, mask

    def teacher_batch(self, name: str, idx: np.ndarray, cap_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Teacher (video [B, M, d], text [B, M, d]) for videos ``idx`` and their picked caption rows."""
        if name not in self.meta["teachers"]:
            raise FeatureError(f"feature store {self.root}: no teacher {name!r}; has {sorted(self.meta['teachers'])}")
        v = np.asarray(self._load(f"teacher.{name}.video")[idx], dtype=np.float32)
        t = np.asarray(self._load(f"teacher.{name}.text")[cap_rows], dtype=np.float32)
        return v, t

    def captions(self, video_index: int) -> list[str]:
        if self._captions is None:
            p = self.root / "captions.json"
            self._captions = json.loads(p.read_text()) if p.is_file() else []
        if not self._captions:
            return []
        return [" ".join(c) if isinstance(c, list) else c for c in self._captions[video_index]]


def convert_released(
    root: str | Path,
    store: str | Path,
    experts: dict[str, str],
    text_feats: dict[str, str],
    splits: dict[str, str],
    raw_captions: str | None = "raw-captions.pkl",
    teachers: dict[str, str] | None = None,
    expert_dims: dict[str, int] | None = None,
    text_dim: int | None = None,
    strip_suffix: bool = False,
    missing_ids: str = "error",
    progress: bool = False,
) -> ExpertStore:
    """Convert released pickles under ``root`` into a store at ``store``; returns the opened store.

    ``experts``/``text_feats``/``teachers`` map a name to a path relative to ``root``; ``splits``
    maps a split name to a list file. The store holds the union of the split videos. Every
    file is read one at a time and dropped before the next, so peak memory is one pickle.
    """
    root = Path(root)
    split_ids = {name: read_split_list(root / rel, strip_suffix) for name, rel in splits.items()}
    ids: list[str] = list(dict.fromkeys(v for lst in split_ids.values() for v in lst))
    w = StoreWriter(store, ids)
    log = (lambda m: print(m, file=sys.stderr)) if progress else (lambda m: None)
    for name, rel in experts.items():
        log(f"expert {name}: {root / rel}")
        feats, kind, dim = read_expert_pickle(root / rel, ids, (expert_dims or {}).get(name), missing_ids)
        w.add_expert(name, feats, dim, kind, source=str(rel))
        del feats
    for name, rel in text_feats.items():
        log(f"text features {name}: {root / rel}")
        feats_t = read_text_features(root / rel, ids, text_dim)
        dim = next(a.shape[-1] for caps in feats_t.values() for a in caps)
        w.add_text(name, feats_t, dim, encoder={"source": str(rel)})
        del feats_t
    if raw_captions:
        w.add_captions(read_raw_captions(root / raw_captions, ids))
    for name, rel in (teachers or {}).items():
        log(f"teacher {name}: {root / rel}")
        data, exps, d = read_teacher_pickle(root / rel, ids)
        w.add_teacher(name, data, exps, d)
    for name, lst in split_ids.items():
        w.add_split(name, lst)
    w.close(source=str(root))
    return ExpertStore(store)


# ----------------------------------------------------------------------------- data sets


@dataclass
class BatchSpec:
    """What a batch needs from the store (filled from the method config)."""

    experts: list[str]
    text: str
    max_tokens: dict[str, int]
    teachers: list[str]
    fuse_captions: bool = False


def _expert_tensors(store: ExpertStore, spec: BatchSpec, idx: np.ndarray) -> dict[str, Any]:
    feats, masks, avail = {}, {}, []
    for m in sorted(spec.experts):
        x, a, mk = store.expert_batch(m, idx, spec.max_tokens.get(m, 0) if store.experts[m]["kind"] == "ragged" else 0)
        feats[m] = torch.from_numpy(x)
        if mk is not None:
            masks[m] = torch.from_numpy(mk)
        avail.append(a)
    return {"experts": feats, "expert_masks": masks, "avail": torch.from_numpy(np.stack(avail, 1).astype(np.float32))}


class RetrievalTrainSet:
    """Training split: one randomly picked caption per video each time it is drawn.

    The pick is a pure function of (seed, epoch, video), set through :meth:`set_epoch` by the
    engine, so a resumed run draws the same captions as an uninterrupted one.

    With ``fuse_captions`` (DiDeMo, ActivityNet) the query is all captions of the video stacked
    and truncated to ``max_tokens["text"]``.
    """

    def __init__(self, store: ExpertStore, ids: Sequence[str], spec: BatchSpec, seed: int = 0):
        self.store, self.spec = store, spec
        self.idx = store.indices(ids)
        self.cap_rows = store.caption_rows(spec.text, self.idx)
        for i, rows in zip(self.idx, self.cap_rows):
            if len(rows) == 0:
                raise FeatureError(f"video {store.video_ids[i]!r} has no captions in text features {spec.text!r}")
        self.seed, self.epoch = int(seed), 0

    def __len__(self) -> int:
        return len(self.idx)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption picks :meth:`get_batch` returns (called by the engine)."""
        self.epoch = int(epoch)

    def _pick(self, i: int) -> int:
        rows = self.cap_rows[i]
        return int(rows[np.random.default_rng((self.seed, self.epoch, int(i))).integers(len(rows))])

    def get_batch(self, indices: list[int]) -> dict[str, Any]:
        idx = self.idx[np.asarray(indices, dtype=np.int64)]
        if self.spec.fuse_captions:
            picks = [self.cap_rows[i] for i in indices]
            pick_rows = np.array([p[0] for p in picks])
        else:
            pick_rows = np.array([self._pick(int(i)) for i in indices])
            picks = [[r] for r in pick_rows]
        text, tmask = self.store.text_batch(self.spec.text, picks, self.spec.max_tokens["text"])
        batch = _expert_tensors(self.store, self.spec, idx)
        batch.update({"text": torch.from_numpy(text), "text_mask": torch.from_numpy(tmask), "index": torch.as_tensor(idx)})
        if self.spec.teachers:
            tv, tt = zip(*(self.store.teacher_batch(t, idx, pick_rows) for t in self.spec.teachers))
            batch["teacher_video"] = torch.from_numpy(np.stack(tv))  # [K, B, M, d]
            batch["teacher_text"] = torch.from_numpy(np.stack(tt))
        return batch


class RetrievalEvalSet:
    """Evaluation split: all videos, ``num_test_captions`` queries per video (padded + masked), or one
    fused paragraph per video. Queries are video-major, as the metric expects."""

    def __init__(self, store: ExpertStore, ids: Sequence[str], spec: BatchSpec, num_test_captions: int = 20,
                 caption_index: dict[str, int] | None = None):
        self.store, self.spec = store, spec
        self.ids = list(ids)
        self.idx = store.indices(ids)
        rows = store.caption_rows(spec.text, self.idx)
        if spec.fuse_captions:
            self.queries = [[list(r)] for r in rows]
            C = 1
        elif caption_index is not None:  # MSRVTT 1k-A: one fixed caption per video
            self.queries = [[[r[caption_index[v]]]] for v, r in zip(self.ids, rows)]
            C = 1
        else:
            C = max(1, min(num_test_captions, max((len(r) for r in rows), default=1)))
            self.queries = [[[x] for x in r[:C]] for r in rows]
        self.captions_per_video = C
        self.query_masks = np.zeros((len(self.ids), C), dtype=bool)
        for i, q in enumerate(self.queries):
            self.query_masks[i, : len(q)] = True

    def __len__(self) -> int:
        return len(self.idx)

    def video_batch(self, start: int, end: int) -> dict[str, Any]:
        return _expert_tensors(self.store, self.spec, self.idx[start:end])

    def flat_queries(self) -> list[list[int]]:
        """Caption-row groups of all query slots (padding slots are empty lists), video-major."""
        C = self.captions_per_video
        return [q[c] if c < len(q) else [] for q in self.queries for c in range(C)]

    def text_batch(self, groups: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        t, m = self.store.text_batch(self.spec.text, groups, self.spec.max_tokens["text"])
        return {"text": torch.from_numpy(t), "text_mask": torch.from_numpy(m)}
