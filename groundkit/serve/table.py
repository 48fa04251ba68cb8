"""The server's own table of runs and of the frames it may show.

Runs are loaded once at start through the registry (:func:`groundkit.methods.method_of_run` and the
method's :meth:`~groundkit.methods.base.Method.predictor`); a request names a run by its name in this
table, and a video by its id in the table of the run's frame folder, listed once at start. No path in
a request is ever joined to a directory.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GroundkitError
from ..methods import method_of_run
from ..methods.base import Predictor
from .images import Limits, image_file_thumbnail, video_thumbnails

__all__ = ["SERVED_KINDS", "KIND_NOTES", "ServedRun", "FrameSource", "load_runs", "parse_run_arg", "run_name"]

log = logging.getLogger("groundkit.serve")

#: predictor kinds the page serves -> what the user does with them
SERVED_KINDS = {
    "image_text": "upload an image and type an expression: the predicted box is drawn",
    "text_video": "type a text: the indexed videos, best first",
}
#: kinds the page does not serve, and why
KIND_NOTES = {
    "regions_text": (
        "this model ranks precomputed region proposals (features from a region HDF5 file), which an "
        "uploaded image does not provide: use `groundkit predict phrase` on the command line"
    ),
    "video_text": "this model grounds an expression in video frames; the page does not take video uploads yet",
}

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _has_frames(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(e.is_file() and Path(e.name).suffix.lower() in FRAME_EXTENSIONS for e in it)
    except OSError:
        return False


class FrameSource:
    """Frames of a video collection on disk, shown beside search results.

    ``root`` holds either video files named by id (``<id>.mp4`` ...; decoded with PyAV) or one folder
    of frame images per video (``<id>/*.jpg`` ...). The folder is listed once; a request's video id
    is only ever a key of that listing. Thumbnails are cached (bounded, least recently used first out).
    """

    def __init__(self, root: str | Path, limits: Limits, frames: int = 4, side: int = 192, cache: int = 128):
        self.root = Path(root)
        self.limits, self.frames, self.side, self.cache_size = limits, frames, side, cache
        self.entries: dict[str, Path] = {}
        try:
            with os.scandir(self.root) as it:
                for e in it:
                    p = Path(e.path)
                    if e.is_dir() and not e.name.startswith(".") and _has_frames(p):
                        self.entries.setdefault(e.name, p)
                    elif e.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
                        self.entries.setdefault(p.stem, p)
        except OSError as err:
            log.warning("frames folder %s cannot be listed: %s", self.root, err)
        self._cache: OrderedDict[str, list[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def has(self, video_id: str) -> bool:
        return video_id in self.entries

    def _make(self, path: Path) -> list[bytes]:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS)
            if not files:
                return []
            n = min(self.frames, len(files))
            pick = [files[round(i * (len(files) - 1) / max(n - 1, 1))] for i in range(n)]
            return [image_file_thumbnail(p, self.side, self.limits) for p in pick]
        return video_thumbnails(path, self.frames, self.side, self.limits.max_pixels)

    def thumbnails(self, video_id: str) -> list[bytes]:
        """The video's thumbnails (JPEG bytes); [] when it has none or they cannot be read."""
        path = self.entries.get(video_id)
        if path is None:
            return []
        with self._lock:
            if video_id in self._cache:
                self._cache.move_to_end(video_id)
                return self._cache[video_id]
        try:
            thumbs = self._make(path)
        except Exception as e:  # an unreadable video or frame: shown as "no frames", logged here
            log.warning("frames of video %r (%s) cannot be read: %s", video_id, path, e)
            thumbs = []
        with self._lock:
            self._cache[video_id] = thumbs
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return thumbs


@dataclass
class ServedRun:
    """One loaded run: its name in the server's table, its predictor and what the page does with it."""

    name: str
    method: str
    summary: str
    kind: str
    predictor: Predictor
    frames: FrameSource | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one call into a model at a time

    @property
    def served(self) -> bool:
        return self.kind in SERVED_KINDS

    @property
    def note(self) -> str:
        return SERVED_KINDS.get(self.kind) or KIND_NOTES.get(self.kind, f"the page does not serve {self.kind!r} models")

    def describe(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "method": self.method,
            "kind": self.kind,
            "summary": self.summary,
            "served": self.served,
            "note": self.note,
        }
        if self.kind == "text_video":
            out["videos_with_frames"] = len(self.frames) if self.frames else 0
        return out


def run_name(path: str | Path) -> str:
    """A run's default name: its run directory's name (``RUN/checkpoints/best`` -> ``RUN``'s name)."""
    p = Path(path).expanduser().resolve()
    if p.is_file():
        p = p.parent
    if p.parent.name == "checkpoints":
        p = p.parent.parent
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", p.name).strip(".-") or "run"
    return name[:64]


def parse_run_arg(arg: str) -> tuple[str | None, str]:
    """``--run PATH`` or ``--run NAME=PATH`` -> (name or None, path)."""
    name, sep, rest = arg.partition("=")
    if sep and _NAME_OK.match(name) and not Path(arg).exists():
        return name, rest
    return None, arg


def load_runs(
    runs: Sequence[str],
    device: str = "cpu",
    videos: str | Path | None = None,
    limits: Limits | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[ServedRun]:
    """Load each ``--run`` (``PATH`` or ``NAME=PATH``) through the registry; names are made unique.

    ``videos``: a folder of the collection's videos or frame folders, shown beside the results of every
    text-video run (default: the folder the predictor names through ``video_files()``, if any)."""
    limits = limits or Limits()
    if videos is not None and not Path(videos).is_dir():
        raise GroundkitError(f"--videos {videos}: no such folder")
    out: list[ServedRun] = []
    taken: set[str] = set()
    for arg in runs:
        name, path = parse_run_arg(arg)
        if not Path(path).expanduser().exists():
            raise GroundkitError(f"--run {path}: no such run directory or checkpoint")
        method = method_of_run(path)
        if progress:
            progress(f"loading {method.name} run {path}")
        try:
            pred = method.predictor(path, device=device)
        except NotImplementedError as e:
            raise GroundkitError(f"--run {path}: {e}") from None
        base = name or run_name(path)
        name, i = base, 2
        while name in taken:
            name, i = f"{base}-{i}", i + 1
        taken.add(name)
        frames = None
        if pred.kind == "text_video":
            src = videos if videos is not None else pred.video_files()
            if src is not None and Path(src).is_dir():
                frames = FrameSource(src, limits)
        out.append(ServedRun(name, method.name, method.summary, pred.kind, pred, frames))
    return out
