"""The crosskd feature store: released archives converted once into memory-mapped fp16 arrays.

:func:`convert_released` turns the files of :mod:`groundkit.formats.collaborative_experts` into an
:class:`ExpertStore`: a directory of ``.npy`` arrays in fp16 (vector experts ``[N, D]``, ragged
experts and caption tokens as one flat ``[total, D]`` array plus offsets) that is memory-mapped on
load, so training and evaluation touch only the rows they need (never the reference's float64
``[videos, captions, tokens, dim]`` allocation).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...checkpoint import atomic_dir
from ...formats.collaborative_experts import (
    FeatureError,
    read_expert_pickle,
    read_raw_captions,
    read_split_list,
    read_teacher_pickle,
    read_text_features,
)

__all__ = ["STORE_VERSION", "StoreWriter", "ExpertStore", "convert_released"]

STORE_VERSION = 1


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
        self.meta: dict[str, Any] = {
            "version": STORE_VERSION,
            "video_ids": self.video_ids,
            "experts": {},
            "text": {},
            "teachers": {},
            "splits": {},
            "info": {},
        }

    def _save(self, name: str, arr: np.ndarray) -> None:
        np.save(self.root / f"{name}.npy", arr, allow_pickle=False)

    def add_expert(
        self, name: str, feats: dict[str, np.ndarray | None], dim: int, kind: str = "auto", source: str = ""
    ) -> None:
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
            lens = np.array(
                [0 if feats[v] is None else (1 if feats[v].ndim == 1 else len(feats[v])) for v in self.video_ids]
            )
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

    def add_teacher(
        self, name: str, data: dict[str, tuple[np.ndarray, np.ndarray]], experts: list[str], dim: int
    ) -> None:
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
            raise FeatureError(
                f"{self.root} is not a feature store (no meta.json); build one with `groundkit data convert-experts` or `extract-experts`"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
            self.video_ids: list[str] = list(self.meta["video_ids"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FeatureError(f"{meta_path}: not a readable feature store description ({e})") from None
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
                shape, _, dtype = (
                    np.lib.format.read_array_header_1_0(f)
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0(f)
                )
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
    def expert_batch(
        self, name: str, idx: np.ndarray, max_len: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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

    def text_batch(
        self, text: str, cap_rows: Sequence[Sequence[int]], max_tokens: int
    ) -> tuple[np.ndarray, np.ndarray]:
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
    with atomic_dir(store) as tmp:  # a failure leaves no partial store
        _convert(root, tmp, ids, split_ids, experts, text_feats, raw_captions, teachers, expert_dims, text_dim,
                 missing_ids, progress)  # fmt: skip
    return ExpertStore(store)


def _convert(
    root: Path,
    store: Path,
    ids: list[str],
    split_ids: dict[str, list[str]],
    experts: dict[str, str],
    text_feats: dict[str, str],
    raw_captions: str | None,
    teachers: dict[str, str] | None,
    expert_dims: dict[str, int] | None,
    text_dim: int | None,
    missing_ids: str,
    progress: bool,
) -> None:
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
