"""crosskd data sets over an :class:`~groundkit.methods.crosskd.store.ExpertStore`: vectorised
training batches (one caption drawn per video, a pure function of (seed, epoch, video)) and the
evaluation set (every caption of every video, with query masks)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...formats.collaborative_experts import DATASET_LAYOUTS, FeatureError
from ..base import GroundingDataset
from .config import CrossKDConfig
from .store import ExpertStore, convert_released

__all__ = [
    "BatchSpec",
    "RetrievalTrainSet",
    "RetrievalEvalSet",
    "open_store",
    "register_store",
    "layout_paths",
    "batch_spec",
    "text_dim",
]


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


class RetrievalTrainSet(GroundingDataset):
    """Training split: one randomly picked caption per video each time it is drawn.

    The pick is a pure function of (seed, epoch, video), set through :meth:`set_epoch` by the
    engine, so a resumed run draws the same captions as an uninterrupted one.

    With ``fuse_captions`` (DiDeMo, ActivityNet) the query is all captions of the video stacked
    and truncated to ``max_tokens["text"]``.
    """

    batched = True

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
        batch.update(
            {"text": torch.from_numpy(text), "text_mask": torch.from_numpy(tmask), "index": torch.as_tensor(idx)}
        )
        if self.spec.teachers:
            tv, tt = zip(*(self.store.teacher_batch(t, idx, pick_rows) for t in self.spec.teachers))
            batch["teacher_video"] = torch.from_numpy(np.stack(tv))  # [K, B, M, d]
            batch["teacher_text"] = torch.from_numpy(np.stack(tt))
        return batch


class RetrievalEvalSet(GroundingDataset):
    """Evaluation split: all videos, ``num_test_captions`` queries per video (padded + masked), or one
    fused paragraph per video. Queries are video-major, as the metric expects."""

    def __init__(
        self,
        store: ExpertStore,
        ids: Sequence[str],
        spec: BatchSpec,
        num_test_captions: int = 20,
        caption_index: dict[str, int] | None = None,
    ):
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


# ----------------------------------------------------------------------------- store resolution


def _root(cfg: CrossKDConfig) -> Path:
    d = cfg.data
    if cfg.world.size and not d.root:
        raise FeatureError(
            f"world.size={cfg.world.size!r} names the built-in world but data.root is not set: build it with "
            "groundkit.world.resolve_world(method, cfg) (groundkit train, the demo and groundkit.runs do this), "
            "or point data.root at the output of 'groundkit data synth --task retrieval'"
        )
    if not d.root:
        raise FeatureError("data.root is empty: point it at the released feature directory (or set world.size)")
    root = Path(d.root).expanduser()
    if not root.is_dir():
        raise FeatureError(f"data.root {root} is not a directory")
    return root


def layout_paths(cfg: CrossKDConfig) -> dict[str, Any]:
    d = cfg.data
    lay = DATASET_LAYOUTS[d.dataset]
    experts = dict(d.experts) if d.experts else dict(lay["experts"])
    text = d.text_path or lay["text_feats"].get(d.text_feat, f"aggregated_text_feats/{d.text_feat}.pkl")
    teachers = dict(d.teachers) if d.teachers else dict(lay["teachers"])
    if d.split_set not in lay["splits"]:
        raise FeatureError(
            f"data.split_set {d.split_set!r} unknown for {d.dataset}; choose from {sorted(lay['splits'])}"
        )
    return {
        "experts": experts,
        "text": {d.text_feat: text},
        "teachers": teachers,
        "splits": lay["splits"][d.split_set],
        "raw_captions": lay["raw_captions"],
        "strip_suffix": lay.get("strip_suffix", False),
        "caption_index": lay.get("test_caption_index", {}).get(d.split_set),
    }


def _source_stamp(root: Path) -> str:
    man = root / "manifest.json"
    return hashlib.sha256(man.read_bytes()).hexdigest()[:16] if man.is_file() else ""


_STORES: dict[str, ExpertStore] = {}


def open_store(cfg: CrossKDConfig, need_teachers: bool | None = None) -> ExpertStore:
    """The feature store for ``cfg``: ``data.store`` if it exists, else converted (once, atomically)
    from the released files under ``data.root`` (or the built-in world) to ``data.store`` / ``<root>.store``."""
    paths = layout_paths(cfg)
    need_teachers = cfg.loss.distil if need_teachers is None else need_teachers
    given = Path(cfg.data.store).expanduser() if cfg.data.store else None
    root = None
    if given is not None and (given / "meta.json").is_file() and not cfg.data.root:
        store_dir, stamp = given, None  # a store on its own (e.g. from extract-experts)
    else:
        root = _root(cfg)
        store_dir = given or root.parent / (root.name + ".store")
        stamp = _source_stamp(root)
    key = str(store_dir.resolve())
    st = _STORES.get(key)
    if st is None and (store_dir / "meta.json").is_file():
        st = ExpertStore(store_dir)
        if stamp and st.meta["info"].get("stamp") != stamp:  # the world was rebuilt: reconvert
            st = None
    missing = (
        st is not None
        and root is not None
        and (
            any(m not in st.experts for m in paths["experts"])
            or cfg.data.text_feat not in st.meta["text"]
            or (need_teachers and any(t not in st.meta["teachers"] for t in paths["teachers"]))
        )
    )
    if root is not None and (st is None or missing):
        tmp = store_dir.parent / f".{store_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        teachers = {k: v for k, v in paths["teachers"].items() if need_teachers or (root / v).is_file()}
        split_files = {}
        for fam in DATASET_LAYOUTS[cfg.data.dataset]["splits"].values():
            for rel in fam.values():
                if (root / rel).is_file() or rel in paths["splits"].values():
                    split_files[Path(rel).stem] = rel
        try:
            convert_released(
                root,
                tmp,
                paths["experts"],
                paths["text"],
                split_files,
                paths["raw_captions"],
                teachers,
                cfg.data.expert_dims,
                cfg.data.text_dim or None,
                paths["strip_suffix"],
                cfg.data.missing_ids,
            )
            meta = json.loads((tmp / "meta.json").read_text())
            meta["info"]["stamp"] = stamp
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except OSError as e:  # e.g. a read-only data folder: the store cannot go beside it
            shutil.rmtree(tmp, ignore_errors=True)
            if e.filename and not str(e.filename).startswith(str(tmp)):
                raise FeatureError(f"{e.filename}: cannot read ({e.strerror or e})") from None
            raise FeatureError(
                f"cannot write the feature store {store_dir} ({e.strerror or e}); "
                "set data.store=DIR to put it in a writable folder"
            ) from None
        except BaseException:  # a bad feature file: no partial store is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = store_dir.parent / f".{store_dir.name}.old-{os.getpid()}"
        if store_dir.exists():
            os.replace(store_dir, old)
        try:
            os.replace(tmp, store_dir)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        st = ExpertStore(store_dir)
    for m in paths["experts"]:
        st.check_expert(m, cfg.data.expert_dims.get(m))
    if cfg.data.text_feat in st.meta["text"]:
        d = st.meta["text"][cfg.data.text_feat]["dim"]
        if cfg.data.text_dim and d != cfg.data.text_dim:
            raise FeatureError(f"text features {cfg.data.text_feat!r} have dim {d}, config says {cfg.data.text_dim}")
    _STORES[key] = st
    return st


def batch_spec(cfg: CrossKDConfig, store: ExpertStore) -> BatchSpec:
    paths = layout_paths(cfg)
    return BatchSpec(
        experts=sorted(paths["experts"]),
        text=cfg.data.text_feat,
        max_tokens=dict(cfg.data.max_tokens),
        teachers=sorted(paths["teachers"]) if cfg.loss.distil else [],
        fuse_captions=cfg.data.fuse_captions,
    )


def text_dim(cfg: CrossKDConfig, store: ExpertStore) -> int:
    if cfg.data.text_feat in store.meta["text"]:
        return int(store.meta["text"][cfg.data.text_feat]["dim"])
    if cfg.data.text_dim > 0:
        return cfg.data.text_dim
    raise FeatureError(
        f"store {store.root} has no text features {cfg.data.text_feat!r} (has {sorted(store.meta['text'])}); "
        "set data.text_dim to build the model without them"
    )


def register_store(store: ExpertStore) -> None:
    """Make ``open_store`` return ``store`` for configs whose ``data.store`` is its directory."""
    _STORES[str(Path(store.root).resolve())] = store
