"""Co-grounding data: referring-expression images and VID-Sentence clips, letterboxed with a record.

Sample lists come from the readers (RefCOCO refer-API files, TransVG ``.pth`` lists, the
co-grounding ``VID_video_level_<split>.pth`` index or VID-Sentence files). Images are letterboxed
to ``data.image_size`` (the record maps boxes back to original pixels for the metric); training
augmentation is the official one, built from :mod:`groundkit.transforms` (flip p=0.5 with the left/right
word swap, HSV jitter, random affine), with the flip always shared by a clip's frames and, with
``data.shared_clip_geometry``, the affine too; the random numbers are drawn in the official order.

Batches (``collate``): ``images [N,3,S,S]`` in [0,1], ``ids``/``mask`` ``[N,T]``, ``boxes [N,4]``
(letterbox pixels), ``clip_len``; frames of a clip are adjacent. With ``data.cache_backbone``
(frozen backbone, no colour/geometric jitter) a batch carries ``backbone_feats`` instead of
images, each image's maps computed once (per flip) by the frozen backbone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from ...distributed import device_fingerprint, padded_chunks, stored_features
from ...errors import DataError
from ...formats import refcoco, transvg, vid_sentence
from ...metrics import objects_per_image
from ...transforms import LetterboxInfo, RandomAffine, RandomHorizontalFlip, RandomHSV, flip_boxes, letterbox_info
from ...transforms import letterbox as _letterbox
from ..base import GroundingDataset
from .config import CoGroundingConfig
from .text import build_tokenizer

__all__ = [
    "ImageSample",
    "VideoSample",
    "load_image_samples",
    "load_videos",
    "letterbox",
    "read_image",
    "RefExpDataset",
    "VideoClipDataset",
    "VideoEvalSet",
    "image_splits",
]

# ----------------------------------------------------------------------------- sample lists


@dataclass(frozen=True)
class ImageSample:
    path: Path
    box: tuple[float, float, float, float]  # x1, y1, x2, y2, original pixels
    text: str
    split: str = ""
    objects: tuple[tuple[float, float, float, float], ...] = ()  # every annotated object of the image (baselines)


@dataclass
class VideoSample:
    """One (track, expression): frame paths in order and the track's boxes ``[T,4]`` (original pixels)."""

    paths: list[Path]
    boxes: np.ndarray
    text: str
    name: str = ""


def image_splits(cfg: CoGroundingConfig, split: str) -> list[str]:
    """``test`` means every split of ``data.test_splits``; other names are themselves."""
    return list(cfg.data.test_splits) if split == "test" else [split]


def load_image_samples(cfg: CoGroundingConfig, split: str) -> list[ImageSample]:
    """Samples of one named split (``train``, ``val``, ``testA`` ...) from refer-API files or TransVG lists."""
    d = cfg.data
    if d.kind == "refcoco":
        data_root = d.data_root or d.root
        if not data_root:
            raise DataError("data.data_root is empty (the folder holding <dataset>/refs(<split_by>).p)")
        data = refcoco.load_refer(data_root, d.dataset, d.split_by, d.image_root or None)
        objects: dict[int, list] = {}
        for a in data.anns.values():
            x, y, w, h = (float(v) for v in a["bbox"])
            objects.setdefault(int(a["image_id"]), []).append((x, y, x + w, y + h))
        out = [
            ImageSample(
                s.image_path,
                _int_box(s.box_xywh) if d.truncate_boxes else s.box_xyxy,
                s.sentence,
                split,
                tuple(objects.get(s.image_id, ())),
            )
            for s in data.samples(split)
        ]
    elif d.kind == "transvg":
        if not d.split_root:
            raise DataError("data.split_root is empty (the folder holding <key>/<key>_<split>.pth)")
        root = Path(d.image_root)
        listed = transvg.load_split(d.split_root, d.transvg_key, split, truncate=d.truncate_boxes)
        # no object list ships with these files: an image's objects are the boxes its expressions refer to
        objs = objects_per_image([s.img_file for s in listed], [s.box for s in listed]) if listed else []
        out = [
            ImageSample(root / s.img_file, s.box, s.phrase, split, tuple(map(tuple, o.tolist())))
            for s, o in zip(listed, objs)
        ]
    else:
        raise DataError(f"data.kind={d.kind!r} has no image samples")
    return out[: d.max_samples] if d.max_samples > 0 else out


def _int_box(xywh: Sequence[float]) -> tuple[float, float, float, float]:
    """The official reader's box: ``np.array(bbox, dtype=int)`` on ``[x, y, w, h]``, then ``x2 = x + w``."""
    x, y, w, h = (float(int(v)) for v in xywh)
    return (x, y, x + w, y + h)


def load_videos(cfg: CoGroundingConfig, split: str) -> list[VideoSample]:
    """One :class:`VideoSample` per (track, caption) of ``split``."""
    d = cfg.data
    out: list[VideoSample] = []
    index_root = d.index_root or (str(Path(d.root) / "VID") if d.root else "")
    image_root = d.image_root or d.root
    if index_root:
        path = Path(index_root) / f"VID_video_level_{split}.pth"
        for i, frames in enumerate(vid_sentence.load_video_level(path, image_root=image_root or None)):
            out.append(
                VideoSample(
                    [p for p, _, _ in frames], np.stack([b for _, b, _ in frames]), frames[0][2], f"{split}/{i}"
                )
            )
    elif d.vid_sentence_root:
        for tr in vid_sentence.load_vid_sentence(d.vid_sentence_root, split):
            for c in tr.captions:
                out.append(VideoSample(list(tr.image_paths), tr.boxes, c, f"{tr.video}/{tr.track_id}"))
    else:
        raise DataError(
            "data.kind='vid' needs data.index_root (VID_video_level_<split>.pth files) or data.vid_sentence_root"
        )
    return out[: d.max_samples] if d.max_samples > 0 else out


# ----------------------------------------------------------------------------- image pipeline


def read_image(path: str | Path) -> Image.Image:
    """An RGB image, or one clear :class:`DataError` line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such image file")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{p}: not a readable image ({e.__class__.__name__})") from None


def _image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header (no decoding), or the clear error of :func:`read_image`."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError):
        return read_image(path).size


def letterbox(img: Image.Image, size: int) -> tuple[Image.Image, LetterboxInfo]:
    """Long side to ``size``, padded to a square with the official colour (the ImageNet mean), centred."""
    return _letterbox(img, size)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


_Policy = tuple[RandomHorizontalFlip, RandomHSV | None, RandomAffine | None]


# ----------------------------------------------------------------------------- datasets


class _Base(GroundingDataset):
    """Shared: tokenizer, letterbox, augmentation, optional frozen-backbone feature cache."""

    def __init__(self, cfg: CoGroundingConfig, train: bool):
        self.cfg, self.train = cfg, train
        self.tok = build_tokenizer(cfg.model)
        self.size = cfg.data.image_size
        self.epoch = 0
        self._backbone: torch.nn.Module | None = None
        self._cache: dict[tuple[str, bool], list[torch.Tensor]] = {}
        self._sizes: dict[str, tuple[int, int]] = {}  # image path -> (width, height)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> random.Random:
        return random.Random(hash((self.cfg.train.seed, self.epoch, index)) & 0xFFFFFFFF)

    def attach_backbone(self, backbone: torch.nn.Module | None) -> None:
        """Serve backbone maps (computed once per image and flip) instead of images; with
        ``data.feature_cache`` every map of the split is read from (or computed once into) a file there."""
        self._backbone = backbone
        if backbone is not None and self.cfg.data.feature_cache and not self._cache:
            self._load_feature_file(self.feature_keys())

    def feature_keys(self) -> list[tuple[str, bool]]:
        """Every (image path, flipped) whose maps this dataset can ask for."""
        raise NotImplementedError

    def _flips(self) -> tuple[bool, ...]:
        d = self.cfg.data
        return (False, True) if (self.train and d.augment and d.flip) else (False,)

    def feature_file(self, keys: list[tuple[str, bool]]) -> Path:
        """The cache file of ``keys`` under ``data.feature_cache``: named by a hash of the backbone settings,
        the letterbox size and the keys, so a different image list or backbone never reads stale maps."""
        m = self.cfg.model
        # "eval-bn": maps computed with the backbone in eval mode (earlier files used batch statistics)
        dev = next(self._backbone.parameters()).device if self._backbone is not None else "cpu"
        ident = [m.backbone, m.pretrained, m.darknet_weights, m.darknet_width, self.size, sorted(keys), "eval-bn"]
        ident += ["padded-32", device_fingerprint(dev)]  # maps of one image alone, from kernels that round alike
        tag = hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]
        return Path(self.cfg.data.feature_cache) / f"{m.backbone}_{self.size}px_{tag}.pt"

    def _load_feature_file(self, keys: list[tuple[str, bool]]) -> None:
        path = self.feature_file(keys)
        if path.is_file():
            blob = torch.load(path, map_location="cpu", weights_only=True)
            for i, (p, f) in enumerate(blob["keys"]):
                self._cache[(p, bool(f))] = [m[i] for m in blob["maps"]]
            return
        self._features(keys)
        maps = [torch.stack([self._cache[k][s] for k in keys]) for s in range(3)]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"keys": [[p, f] for p, f in keys], "maps": maps}, tmp)
        os.replace(tmp, path)  # atomic: parallel runs of a sweep never read a half-written file

    def _policy(self) -> _Policy:
        """The official augmentation as shared transforms (flip, HSV jitter, random affine), from the config."""
        d = self.cfg.data
        flip = RandomHorizontalFlip(0.5 if d.flip else 0.0, swap_rule=d.flip_swap)
        hsv = RandomHSV(d.hsv_jitter, d.hsv_jitter, saturation_bug=d.hsv_saturation_bug) if d.hsv_jitter > 0 else None
        return flip, hsv, (RandomAffine() if d.affine and self._backbone is None else None)

    def _frame(self, path: Path, box: np.ndarray, flip: bool) -> dict[str, Any]:
        """A frame letterboxed, then mirrored when ``flip`` (image None with cached maps), its box by _canvas_box."""
        if self._backbone is not None:  # cached maps: only the letterbox record is needed, not the pixels
            key = str(path)
            if key not in self._sizes:
                self._sizes[key] = _image_size(path)
            lb = letterbox_info(*self._sizes[key], self.size)
            return {"image": None, "boxes": self._canvas_box(box, lb, flip)[None], "letterbox": lb}
        img, lb = letterbox(read_image(path), self.size)
        return {
            "image": TF.horizontal_flip(img) if flip else img,
            "boxes": self._canvas_box(box, lb, flip)[None],
            "letterbox": lb,
        }

    def _jitter(self, frames: list[dict[str, Any]], rng: random.Random | None) -> list[dict[str, Any]]:
        """HSV jitter and affine, drawn in the official order: a shared affine first, else each frame's before its HSV."""
        if rng is None or self._backbone is not None:
            return frames
        _, hsv, affine = self._policy()
        shared = (
            affine.get_params(frames[0], rng) if affine is not None and self.cfg.data.shared_clip_geometry else None
        )
        out = []
        for s in frames:
            params = shared if shared is not None or affine is None else affine.get_params(s, rng)
            s = hsv(s, rng) if hsv is not None else s
            out.append(affine.apply(s, params) if affine is not None else s)
        return out

    def _pixels(self, frame: dict[str, Any]) -> tuple[torch.Tensor | None, np.ndarray, LetterboxInfo]:
        """(image tensor or None, box clipped to the canvas, letterbox record) of a frame."""
        box = np.clip(np.asarray(frame["boxes"], dtype=np.float64)[0], 0, self.size)
        return (to_tensor(frame["image"]) if frame["image"] is not None else None), box, frame["letterbox"]

    def _canvas_box(self, box: np.ndarray, lb: LetterboxInfo, flip: bool) -> np.ndarray:
        """``box`` (original pixels) on the letterbox canvas, mirrored when ``flip``; with ``data.truncate_boxes`` the
        official rules: mirrored in original pixels (``w - x - 1``), cut to integers after the letterbox."""
        box = np.asarray(box, dtype=np.float64)
        if self.cfg.data.truncate_boxes:
            box = flip_boxes(box, lb.orig_w, pixel_index=True) if flip else box
            return np.trunc(lb.to_letterbox(box))
        b = lb.to_letterbox(box)
        return flip_boxes(b, self.size) if flip else b

    def _text(self, text: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of ``text``, its left/right swapped when the sample is mirrored (``data.flip_swap``)."""
        return self.tok.encode(self._policy()[0].apply({"text": text}, flip)["text"])

    def _features(self, keys: list[tuple[str, bool]]) -> list[torch.Tensor]:
        missing = [k for k in dict.fromkeys(keys) if k not in self._cache]
        # chunks of one size on one CPU thread: an image's maps do not depend on what was computed beside it
        for chunk, real in padded_chunks(missing, 32):
            imgs = []
            for p, flip in chunk:
                im, _ = letterbox(read_image(p), self.size)
                imgs.append(to_tensor(TF.horizontal_flip(im) if flip else im))
            dev = next(self._backbone.parameters()).device
            mode = self._backbone.training
            self._backbone.eval()  # frozen: running statistics, never the batch's (nor updating them)
            try:
                with torch.no_grad(), stored_features(dev):
                    maps = self._backbone(torch.stack(imgs).to(dev))
            finally:
                self._backbone.train(mode)
            for j, k in enumerate(chunk[:real]):
                self._cache[k] = [m[j].cpu() for m in maps]
        return [torch.stack([self._cache[k][s] for k in keys]) for s in range(3)]

    def _augment_plan(self, index: int) -> tuple[bool, random.Random | None]:
        d = self.cfg.data
        if not (self.train and d.augment):
            return False, None
        rng = self._rng(index)
        return self._policy()[0].get_params({}, rng), rng

    def _finish(self, items: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "ids": torch.stack([i["ids"] for i in items]),
            "mask": torch.stack([i["mask"] for i in items]),
            "boxes": torch.tensor(np.stack([i["box"] for i in items]), dtype=torch.float32),
            "clip_len": self.clip_len,
        }
        if self._backbone is not None:
            batch["backbone_feats"] = self._features([i["key"] for i in items])
        else:
            batch["images"] = torch.stack([i["image"] for i in items])
        return batch

    clip_len = 1


class RefExpDataset(_Base):
    """Referring expressions in images; one sample per (image, expression)."""

    batched = True

    def __init__(self, cfg: CoGroundingConfig, samples: Sequence[ImageSample], train: bool):
        super().__init__(cfg, train)
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def feature_keys(self) -> list[tuple[str, bool]]:
        paths = dict.fromkeys(str(s.path) for s in self.samples)
        return [(p, f) for p in paths for f in self._flips()]

    def item(self, index: int) -> dict:
        s = self.samples[index]
        flip, rng = self._augment_plan(index)
        img, box, lb = self._pixels(self._jitter([self._frame(s.path, np.asarray(s.box), flip)], rng)[0])
        ids, mask = self._text(s.text, flip)
        return {"image": img, "box": box, "ids": ids, "mask": mask, "letterbox": lb, "key": (str(s.path), flip)}

    def get_batch(self, indices: list[int]) -> dict[str, Any]:
        items = [self.item(i) for i in indices]
        batch = self._finish(items)
        batch["letterbox"] = [i["letterbox"] for i in items]
        batch["gt_original"] = torch.tensor([self.samples[i].box for i in indices], dtype=torch.float64)
        return batch


class VideoClipDataset(_Base):
    """Training clips: one sample per (video, centre frame ``t``), frames ``t - clip_len + 1 .. t`` clipped
    at the start (official ``getChunk`` with k = 2 gives the pair ``(t-1, t)``)."""

    batched = True

    def __init__(self, cfg: CoGroundingConfig, videos: Sequence[VideoSample], train: bool = True):
        super().__init__(cfg, train)
        self.videos = list(videos)
        self.clip_len = max(1, cfg.loss.train_clip_len)
        stride = max(1, cfg.data.frame_stride)
        self.index = [(v, t) for v, vid in enumerate(self.videos) for t in range(0, len(vid.paths), stride)]

    def __len__(self) -> int:
        return len(self.index)

    def feature_keys(self) -> list[tuple[str, bool]]:
        paths = dict.fromkeys(str(p) for v in self.videos for p in v.paths)
        return [(p, f) for p in paths for f in self._flips()]

    def items(self, index: int) -> list[dict]:
        v, t = self.index[index]
        vid = self.videos[v]
        frames = [max(0, t - self.clip_len + 1 + k) for k in range(self.clip_len)]
        flip, rng = self._augment_plan(index)
        ids, mask = self._text(vid.text, flip)
        out = []
        jittered = self._jitter([self._frame(vid.paths[f], vid.boxes[f], flip) for f in frames], rng)
        for f, frame in zip(frames, jittered):
            img, box, lb = self._pixels(frame)
            out.append(
                {
                    "image": img,
                    "box": box,
                    "ids": ids,
                    "mask": mask,
                    "letterbox": lb,
                    "key": (str(vid.paths[f]), flip),
                    "frame": f,
                }
            )
        return out

    def get_batch(self, indices: list[int]) -> dict[str, Any]:
        items = [it for i in indices for it in self.items(i)]
        batch = self._finish(items)
        batch["frame_index"] = torch.tensor([it["frame"] for it in items], dtype=torch.long)  # clipped at 0
        return batch


class VideoEvalSet(_Base):
    """Whole videos for evaluation: ``video(i)`` gives frames (or backbone maps), boxes and the letterbox records."""

    def __init__(self, cfg: CoGroundingConfig, videos: Sequence[VideoSample]):
        super().__init__(cfg, train=False)
        self.videos = list(videos)

    def __len__(self) -> int:
        return len(self.videos)

    def feature_keys(self) -> list[tuple[str, bool]]:
        return [(p, False) for p in dict.fromkeys(str(p) for v in self.videos for p in v.paths)]

    def video(self, i: int) -> dict[str, Any]:
        vid = self.videos[i]
        items = [self._pixels(self._frame(p, b, False)) for p, b in zip(vid.paths, vid.boxes)]
        ids, mask = self.tok.encode(vid.text)
        out = {
            "ids": ids,
            "mask": mask,
            "letterbox": [lb for _, _, lb in items],
            "gt_original": torch.tensor(vid.boxes, dtype=torch.float64),
        }
        if self._backbone is not None:
            out["backbone_feats"] = self._features([(str(p), False) for p in vid.paths])
        else:
            out["images"] = torch.stack([img for img, _, _ in items])
        return out
