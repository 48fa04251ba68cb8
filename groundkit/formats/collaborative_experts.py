"""Collaborative Experts / TeachText / CrossKD feature archives: the released files, read.

Released layout (one data set root, e.g. ``MSRVTT/high-quality/structured-symlinks``):

* expert pickles ``{video_id: float[D]}`` (fixed size) or ``{video_id: float[N, D]}`` (variable
  length, e.g. audio/speech), a Python ``float('nan')`` where the expert is missing;
* ``raw-captions.pkl`` ``{video_id: [[token, ...] per caption]}``;
* ``aggregated_text_feats/<name>.pkl`` ``{video_id: [float[n_tokens, D] per caption]}``;
* TeachText teachers ``{video_id: {"vid_embds": {expert: float[d]}, "text_embds": {expert: float[n_caps, d]}}}``;
* split lists, one video id per line.

:data:`DATASET_LAYOUTS` gives each released data set's relative paths. Pickles are read with an
unpickler that builds no classes it does not know (numpy arrays and plain containers only).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

__all__ = [
    "FeatureError",
    "load_pickle",
    "is_missing",
    "read_split_list",
    "read_expert_pickle",
    "read_raw_captions",
    "read_text_features",
    "read_teacher_pickle",
    "DATASET_LAYOUTS",
]


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
        try:
            return _LenientUnpickler(f, encoding="latin1").load()
        except Exception as e:  # EOFError, UnpicklingError, and whatever a damaged stream makes pickle raise
            reason = "empty file" if path.stat().st_size == 0 else f"{type(e).__name__}: {e}"
            raise FeatureError(f"{path}: not a readable pickle, truncated or corrupt ({reason})") from None


def is_missing(x: Any) -> bool:
    """The reference's ``has_missing_values``: a float NaN stands for a missing expert."""
    return isinstance(x, float) and math.isnan(x)


def read_split_list(path: str | Path, strip_suffix: bool = False) -> list[str]:
    """Video ids of a split list (one per line, blank lines skipped; DiDeMo drops ``.ext`` suffixes)."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"split list not found: {path}")
    try:
        ids = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise FeatureError(f"{path}: not a text split list (one video id per line)") from None
    return [i.split(".")[0] for i in ids] if strip_suffix else ids


def _as_array(x: Any, path: Path, vid: str, expect_dim: int | None) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise FeatureError(
            f"{path}: video {vid!r} has a {type(x).__name__} where a float array [..., {expect_dim or 'D'}] belongs"
        ) from None
    if a.ndim == 0 or a.shape[-1] == 0:
        raise FeatureError(
            f"{path}: video {vid!r} has a feature of shape {a.shape}; expected [..., {expect_dim or 'D'}]"
        )
    if expect_dim is not None and a.shape[-1] != expect_dim:
        raise FeatureError(
            f"{path}: video {vid!r} has feature dim {a.shape[-1]}, expected {expect_dim} (config/other videos)"
        )
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
    out = {}
    for vid, caps in _video_entries(path, video_ids, "captions"):
        if not isinstance(caps, (list, tuple)) or not all(isinstance(c, (str, list, tuple)) for c in caps):
            raise FeatureError(f"{path}: video {vid!r} has {type(caps).__name__}; expected a list of token lists")
        out[vid] = [list(c) if not isinstance(c, str) else c.split() for c in caps]
    return out


def _video_entries(path: Path, video_ids: Sequence[str] | None, what: str) -> Iterator[tuple[str, Any]]:
    """(video id, value) of a pickle keyed by video id, for ``video_ids`` (default: all), each checked present."""
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise FeatureError(f"{path}: expected a dict keyed by video id")
    for vid in list(data) if video_ids is None else list(video_ids):
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
        if not isinstance(caps, (list, tuple)):
            raise FeatureError(
                f"{path}: video {vid!r} has {type(caps).__name__}; expected a list of [tokens, D] arrays"
            )
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
    if not isinstance(data, dict):
        raise FeatureError(f"{path}: expected a dict keyed by video id, got {type(data).__name__}")
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
            t = np.stack(
                [np.asarray(rec["text_embds"][m], dtype=np.float32).reshape(-1, v.shape[-1]) for m in experts], axis=1
            )
        except KeyError as e:
            raise FeatureError(
                f"{path}: video {vid!r} lacks teacher expert {e.args[0]!r} (expected {list(experts)})"
            ) from None
        except (TypeError, ValueError, AttributeError) as e:
            raise FeatureError(
                f"{path}: video {vid!r} has teacher embeddings of the wrong type or shape ({e})"
            ) from None
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
        "text_feats": {
            "gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl",
            "w2v": "aggregated_text_feats/w2v.pkl",
            "gpt2-xl": "aggregated_text_feats/gpt2-xl.pkl",
        },
        "raw_captions": "raw-captions.pkl",
        "teachers": _TEACHERS,
        "splits": {
            "full": {"train": "train_list_full.txt", "val": "val_list_full.txt", "test": "test_list_full.txt"},
            "1k-A": {
                "train": "train_list_jsfusion.txt",
                "val": "val_list_jsfusion.txt",
                "test": "val_list_jsfusion.txt",
            },
            "1k-B": {"train": "train_list_miech.txt", "val": "test_list_miech.txt", "test": "test_list_miech.txt"},
        },
        "test_caption_index": {"1k-A": "jsfusion_val_caption_idx.pkl"},
    },
    "msvd": {
        # only the kinetics-finetuned R(2+1)D moved to a stride-8 folder (MSVD_dataset.py custom_paths)
        "experts": {
            k: v.replace("stride32", "stride8") if k == "r2p1d.r2p1d-ig65m-kinetics.0" else v
            for k, v in _MSRVTT_EXPERTS.items()
            if k not in ("audio", "speech")
        },
        "text_feats": {"gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl"},
        "raw_captions": "raw-captions.pkl",
        "teachers": _TEACHERS,
        "splits": {"official": {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}},
    },
    "didemo": {
        "experts": {
            **{k: v for k, v in _MSRVTT_EXPERTS.items() if k not in ("audio", "speech")},
            "audio": "aggregated_audio_feats/vggish-audio-raw.pickle",
            "speech": "aggregated_speech_feats/stt_w2v.pickle",
        },
        "text_feats": {"gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl"},
        "raw_captions": "raw-captions.pkl",
        "teachers": _TEACHERS,
        "splits": {"official": {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}},
        "strip_suffix": True,
    },
    "activity-net": {
        "experts": {
            **{k: v for k, v in _MSRVTT_EXPERTS.items() if k not in ("audio", "speech")},
            "audio": "aggregated_audio/vggish-audio-raw.pickle",
            "speech": "aggregated_speech/goog_w2v-speech-raw.pickle",
        },
        "text_feats": {"gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl"},
        "raw_captions": "raw-captions-train-val_1.pkl",
        "teachers": _TEACHERS,
        # val1 is used for model selection *and* reporting in the reference
        "splits": {"val1": {"train": "train_list.txt", "val": "val_1_list.txt", "test": "val_1_list.txt"}},
    },
}
