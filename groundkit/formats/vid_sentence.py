"""Reader (and writer) of the VID-Sentence layout and of the co-grounding per-video ``.pth`` index.

VID-Sentence (on top of ImageNet VID), ``root`` = the ILSVRC folder::

    Annotations/VID/tubeGt/<split>/<video>.js      {"video", "annotations": [{"id": "0", "track": [...]}]}
    Data/VID/<split>/<video>/%06d.JPEG             frame f (1-based in the track) is file f-1
    Data/VID/annSamples/<split>_valid_list.txt      line i: "<video>,<track id>"
    Data/VID/annSamples/<split>_ann_list_v2.txt     lines "<i>, <caption>" (i = 0-based line of the valid list)

A track entry is ``{"frame", "bbox": [x1,y1,x2,y2], "frame_size": [H, W], "class", "class_index",
"occluded", "generated", "name"}``. The co-grounding code reads instead
``VID/VID_video_level_<split>.pth``: a list of videos (one per described track), each a list of
``[img_path, [x1,y1,x2,y2] (int), phrase]`` per frame. Paths written by groundkit are relative to
``root``; :func:`load_video_level` resolves them against an ``image_root``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_path
from ..errors import DataError

__all__ = [
    "VidTrack",
    "tube_path",
    "frame_path",
    "load_vid_sentence",
    "load_video_level",
    "save_video_level",
    "write_tube_json",
    "TRACK_KEYS",
    "to_video_level",
    "register_to_video_level",
]

TRACK_KEYS = ("frame", "bbox", "frame_size", "class", "class_index", "occluded", "generated", "name")


def tube_path(root: str | os.PathLike, split: str, video: str) -> Path:
    return Path(root) / "Annotations" / "VID" / "tubeGt" / split / f"{video}.js"


def frame_path(root: str | os.PathLike, split: str, video: str, frame: int) -> Path:
    """Image of 1-based track frame ``frame`` (stored as ``%06d.JPEG % (frame - 1)``)."""
    return Path(root) / "Data" / "VID" / split / video / f"{frame - 1:06d}.JPEG"


@dataclass
class VidTrack:
    """One described object track: its captions, per-frame boxes ``[T, 4]`` (x1y1x2y2) and images."""

    index: int  # line of the valid list
    video: str
    track_id: str
    captions: list[str]
    frames: list[int]  # 1-based frame numbers, as in the tube file
    boxes: np.ndarray  # float64 [T, 4]
    image_paths: list[Path]
    frame_size: tuple[int, int]  # (H, W)
    category: str
    occluded: np.ndarray  # int64 [T]
    extra: dict = field(default_factory=dict)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"VID-Sentence list file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.rstrip("\n") for ln in f if ln.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text list") from None


def _read_tube(tp: Path) -> dict:
    if not tp.is_file():
        raise FileNotFoundError(f"tube file not found: {tp}")
    try:
        with open(tp, encoding="utf-8") as f:
            tube = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{tp}: not valid JSON, truncated or corrupt ({e})") from None
    if not isinstance(tube, dict) or not isinstance(tube.get("annotations", []), list):
        raise DataError(f"{tp}: expected a JSON object with an 'annotations' list")
    return tube


def load_vid_sentence(root: str | os.PathLike, split: str) -> list[VidTrack]:
    """Join valid list, caption list and tube files of ``split``; one :class:`VidTrack` per described track."""
    root = Path(root)
    ann_dir = root / "Data" / "VID" / "annSamples"
    valid = _read_lines(ann_dir / f"{split}_valid_list.txt")
    caps: dict[int, list[str]] = {}
    cap_file = ann_dir / f"{split}_ann_list_v2.txt"
    for n, line in enumerate(_read_lines(cap_file)):
        head, sep, caption = line.partition(",")
        if not sep or not head.strip().isdigit():
            raise DataError(f"{cap_file}:{n + 1}: expected '<instance index>, <caption>', got {line!r}")
        idx = int(head)
        if idx >= len(valid):
            raise DataError(f"{cap_file}:{n + 1}: instance index {idx} beyond the {len(valid)} valid-list lines")
        caps.setdefault(idx, []).append(caption.strip())
    if not caps:
        raise DataError(f"{cap_file}: no captions (expected lines '<instance index>, <caption>')")
    tube_cache: dict[str, dict] = {}
    out: list[VidTrack] = []
    for idx in sorted(caps):
        video, sep, tid = valid[idx].partition(",")
        if not sep:
            raise DataError(f"{ann_dir / f'{split}_valid_list.txt'}:{idx + 1}: expected '<video>,<track id>'")
        video, tid = video.strip(), tid.strip()
        tp = tube_path(root, split, video)
        if video not in tube_cache:
            tube_cache[video] = _read_tube(tp)
        tube = tube_cache[video]
        ann = next((a for a in tube.get("annotations", []) if isinstance(a, dict) and str(a.get("id")) == tid), None)
        if ann is None:
            raise DataError(f"{tp}: no annotation with id {tid!r} (referenced by valid-list line {idx + 1})")
        track = ann.get("track")
        if not isinstance(track, list) or not track:
            raise DataError(f"{tp}: annotation {tid!r} has an empty or missing 'track'")
        for j, e in enumerate(track):
            if not isinstance(e, dict):
                raise DataError(f"{tp}: annotation {tid!r} track[{j}] is {type(e).__name__}; expected an object")
            miss = [k for k in ("frame", "bbox", "frame_size") if k not in e]
            if miss:
                raise DataError(f"{tp}: annotation {tid!r} track[{j}] lacks keys {miss}")
            if not isinstance(e["bbox"], list) or len(e["bbox"]) != 4:
                raise DataError(f"{tp}: annotation {tid!r} track[{j}].bbox must be [x1,y1,x2,y2]")
        try:
            frames = [int(e["frame"]) for e in track]
            boxes = np.asarray([[float(v) for v in e["bbox"]] for e in track], dtype=np.float64)
            h, w = (int(v) for v in track[0]["frame_size"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{tp}: annotation {tid!r}: frame, bbox and frame_size must be numbers ({e})") from None
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            raise DataError(f"{tp}: annotation {tid!r} has boxes with x2<x1 or y2<y1")
        out.append(
            VidTrack(
                index=idx,
                video=video,
                track_id=tid,
                captions=caps[idx],
                frames=frames,
                boxes=boxes,
                image_paths=[frame_path(root, split, video, fr) for fr in frames],
                frame_size=(h, w),
                category=str(track[0].get("class", "")),
                occluded=np.asarray([int(e.get("occluded", 0)) for e in track], dtype=np.int64),
            )
        )
    return out


def write_tube_json(root: str | os.PathLike, split: str, video: str, annotations: list[dict]) -> Path:
    """Write ``tubeGt/<split>/<video>.js`` (sorted keys, byte-stable)."""
    for a in annotations:
        for e in a["track"]:
            miss = [k for k in TRACK_KEYS if k not in e]
            if miss:
                raise DataError(f"track entry of {video}/{a.get('id')} lacks keys {miss}")
    p = tube_path(root, split, video)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        json.dump({"video": video, "annotations": annotations}, f, sort_keys=True, separators=(",", ":"))
    return p


def save_video_level(videos: list[list[list]], path: str | os.PathLike) -> Path:
    """``torch.save`` a co-grounding index (list of videos of ``[img_path, [x1,y1,x2,y2], phrase]``)."""
    _check_video_level(videos, str(path))
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(videos, tmp)
    return path


def _check_video_level(videos: list, where: str) -> None:
    if not isinstance(videos, list):
        raise DataError(f"{where}: expected a list of videos, got {type(videos).__name__}")
    for v, frames in enumerate(videos):
        if not isinstance(frames, (list, tuple)) or not frames:
            raise DataError(f"{where}[{v}]: expected a non-empty list of frames")
        for f, item in enumerate(frames):
            if not isinstance(item, (list, tuple)) or len(item) != 3:
                raise DataError(f"{where}[{v}][{f}]: expected [img_path, [x1,y1,x2,y2], phrase], got {item!r}")
            img, box, phrase = item
            if not isinstance(img, str) or not isinstance(phrase, str):
                raise DataError(f"{where}[{v}][{f}]: img_path and phrase must be strings")
            try:
                vals = [float(x) for x in (box.tolist() if hasattr(box, "tolist") else box)]
            except (TypeError, ValueError):
                raise DataError(f"{where}[{v}][{f}]: bad box {box!r} (want 4 numbers [x1,y1,x2,y2])") from None
            if len(vals) != 4 or not all(math.isfinite(x) for x in vals) or vals[2] < vals[0] or vals[3] < vals[1]:
                raise DataError(f"{where}[{v}][{f}]: bad box {box!r} (want [x1,y1,x2,y2], x2>=x1, y2>=y1)")


def load_video_level(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, allow_pickle: bool = False
) -> list[list[tuple[Path, np.ndarray, str]]]:
    """Read a ``VID_video_level_<split>.pth`` index; relative image paths are joined to ``image_root``.

    Returns per video a list of ``(image path, box float64 [4] x1y1x2y2, phrase)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video-level index not found: {path}")
    try:
        videos = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:
        if allow_pickle:
            raise
        raise DataError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({exc}); "
            "pass allow_pickle=True only for files you trust"
        ) from exc
    _check_video_level(videos, str(path))
    base = Path(image_root) if image_root is not None else None
    out = []
    for frames in videos:
        vid = []
        for img, box, phrase in frames:
            p = Path(img)
            if base is not None and not p.is_absolute():
                p = base / p
            vid.append((p, np.asarray([float(x) for x in box], dtype=np.float64), phrase))
        out.append(vid)
    return out


def to_video_level(
    root: str | os.PathLike,
    split: str,
    out_path: str | os.PathLike,
    relative_to: str | os.PathLike | None = None,
) -> int:
    """Write the co-grounding ``VID_video_level_<split>.pth`` index from VID-Sentence files.

    One entry per (described track, caption): the track's frames as ``[img_path, [x1,y1,x2,y2]
    (int), caption]``. Image paths are absolute, or relative to ``relative_to`` when given (the
    co-grounding loader uses them verbatim, so relative paths need that working directory).
    Returns the number of entries. (The official conversion script was never released.)
    """
    tracks = load_vid_sentence(root, split)
    base = Path(relative_to).resolve() if relative_to is not None else None
    videos = []
    for tr in tracks:
        paths = []
        for p in tr.image_paths:
            p = p.resolve()
            paths.append(str(p.relative_to(base)) if base is not None else str(p))
        boxes = [[int(round(v)) for v in b] for b in tr.boxes.tolist()]
        for cap in tr.captions:
            videos.append([[p, b, cap] for p, b in zip(paths, boxes)])
    save_video_level(videos, out_path)
    return len(videos)


def register_to_video_level(subparsers: Any) -> None:
    """``groundkit data vid-sentence-to-pth``: VID-Sentence files -> co-grounding video-level index."""
    p = subparsers.add_parser(
        "vid-sentence-to-pth",
        help="convert VID-Sentence (tubeGt + annSamples lists) to the co-grounding VID_video_level_<split>.pth index",
    )
    p.add_argument("--root", required=True, help="the ILSVRC folder (holds Annotations/VID/tubeGt and Data/VID)")
    p.add_argument("--split", required=True, help="train, val or test")
    p.add_argument("--out", required=True, help="output .pth file, e.g. data/VID/VID_video_level_test.pth")
    p.add_argument("--relative-to", default=None, help="write image paths relative to this folder (default: absolute)")

    def run(args: Any) -> int:
        try:
            n = to_video_level(args.root, args.split, args.out, args.relative_to)
        except ValueError as e:
            raise DataError(f"vid-sentence-to-pth: {e}") from None
        print(f"{args.out}: {n} videos")
        return 0

    p.set_defaults(func=run)
