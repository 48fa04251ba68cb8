"""CLIP-VG data: TransVG-style ``.pth`` lists -> letterboxed images with padding masks and box targets.

One dataset class serves training and evaluation. Each sample gives the image letterboxed into a
``imsize`` square (``[3, S, S]`` in [0, 1]; the model normalises it and zeroes the padding, as the
official code pads the normalised tensor), its padding mask (True on padding), the text (lower-cased,
inside ``data.prompt``) and the target box as ``(cx, cy, w, h)`` normalised to the canvas.

Training augmentation (``data.augment``), the official policy built from :mod:`groundkit.transforms`:
with probability ``aug_crop_prob`` resize the short side to one of ``aug_crop_resize``, crop a region
of ``aug_crop_size`` that keeps the box, then resize the long side to one of ``aug_scales``;
otherwise only the last resize; never the crop branch when the text holds a direction word; colour
jitter; no flip; the image placed at a random offset of the canvas (``aug_translate``).

**Cached features.** Where the pipeline is deterministic (evaluation, or training without
augmentation) and no encoder parameter trains, :meth:`GroundingSet.attach_cache` runs the frozen
encoders once per distinct image and text and keeps their outputs (fp16); samples then carry
indices into those tables and a batch gathers them. The tables are also stored on disk
(``data.cache_dir``), keyed by the encoders' fingerprint, the canvas size and the normalisation (texts by
the text encoder's fingerprint and the query length only), and extended with what a later run needs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ...boxes import xyxy_to_cxcywh
from ...config import feature_cache_root
from ...distributed import device_fingerprint, padded_chunks, stored_features
from ...engine import epoch_seed
from ...errors import DataError
from ...formats import refcoco, transvg
from ...metrics import objects_per_image, refexp_baselines
from ...transforms import (
    DIRECTION_WORDS,
    ColorJitter,
    Compose,
    Letterbox,
    LetterboxInfo,
    OfficialSizeCrop,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    letterbox,
    swap_left_right,
)
from ..base import GroundingDataset
from .config import ClipVGData

__all__ = ["GroundingSet", "load_samples", "build_train_transform", "split_file", "prepare_text"]


def world_paths(root: str | os.PathLike) -> dict[str, str]:
    """The ``data.*`` paths of a built-in pseudo world (``groundkit data synth --task pseudo``): its TransVG
    lists, its images and the instances.json that lists every object (for the text-blind baselines)."""
    root = Path(root)
    return {
        "split_root": str(root / "splits"),
        "image_root": str(root / "images/mscoco/images/train2014"),
        "instances_file": str(root / "refcoco/instances.json"),
    }


def split_file(d: ClipVGData, split: str) -> list[Path]:
    """The ``.pth`` file(s) of ``split``: ``train`` follows ``data.supervision`` (``train_pseudo`` or
    ``train``) unless ``data.train_file`` names a list; ``test`` is ``<ds>_test.pth`` when it exists,
    else ``testA`` + ``testB`` (RefCOCO / RefCOCO+)."""
    if not d.split_root:
        raise DataError(
            "data.split_root is empty: point it at the folder holding <dataset>/<dataset>_<split>.pth (--split-root;"
            " the built-in world: 'groundkit data synth --task pseudo' prints its folder, WORLD/splits)"
        )
    if split == "train":
        if d.train_file:
            return [Path(d.train_file)]
        split = "train_pseudo" if d.supervision == "pseudo" else "train"
    path = transvg.split_path(d.split_root, d.dataset, split)
    if split == "test" and not path.is_file():
        a, b = (transvg.split_path(d.split_root, d.dataset, s) for s in ("testA", "testB"))
        if a.is_file() and b.is_file():
            return [a, b]
    return [path]


def load_samples(d: ClipVGData, split: str) -> list[transvg.GroundingSample]:
    out: list[transvg.GroundingSample] = []
    for path in split_file(d, split):
        entries = transvg.load_raw(path, allow_pickle=d.allow_pickle)
        out.extend(transvg.parse_entries(entries, d.dataset, str(path), truncate=d.truncate_boxes))
    return out


def prepare_text(phrase: str, d: ClipVGData) -> str:
    text = phrase.lower() if d.lowercase else phrase
    return d.prompt.replace("{pseudo_query}", text) if d.prompt else text


def build_train_transform(d: ClipVGData) -> Compose:
    """The official training augmentation (see the module docstring)."""
    scales = [s for s in d.aug_scales if s <= d.imsize] or [d.imsize]
    official = d.aug_crop_rule == "official"
    cropper = OfficialSizeCrop(*d.aug_crop_size) if official else RandomSizeCrop(*d.aug_crop_size)
    crop = Compose([RandomResize(d.aug_crop_resize, side="short"), cropper, RandomResize(scales)])
    # official: direction words matched as substrings ("bright" holds "right")
    words = ("left", "right", "top", "bottom", "middle") if official else DIRECTION_WORDS
    steps: list[Any] = [
        RandomSelect(RandomResize(scales), crop, p=d.aug_crop_prob, first_if_words=words, whole_words=not official)
    ]
    if d.color_jitter > 0 and d.color_jitter_prob > 0:
        cj = d.color_jitter
        steps.append(ColorJitter(cj, cj, cj, p=d.color_jitter_prob))
    steps.append(Letterbox(d.imsize, fill=0.0, resize=False, random_offset=d.aug_translate))
    return Compose(steps)


def _to_unit_tensor(image: Any) -> torch.Tensor:
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("RGB"))
    return TF.to_dtype(image, torch.float32, scale=True)


class GroundingSet(GroundingDataset):
    """Samples of one split; ``__getitem__`` + ``collate`` (so the engine can use DataLoader workers).

    ``augment``: apply the training augmentation (seeded by ``(seed, epoch, index)``, see
    :meth:`set_epoch`). After :meth:`attach_cache`, items are indices into cached encoder outputs.
    """

    def __init__(
        self,
        samples: list[transvg.GroundingSample],
        d: ClipVGData,
        augment: bool = False,
        seed: int = 0,
        name: str = "",
        flip: float = 0.0,
    ):
        if not samples:
            raise DataError(f"{name or 'dataset'}: no samples")
        if not 0.0 <= flip <= 1.0:
            raise DataError(f"data.flip must be a probability in [0, 1], got {flip}")
        self.samples, self.d, self.augment, self.seed, self.name = samples, d, augment, int(seed), name
        self.flip = float(flip)
        self._flips: tuple[int, torch.Tensor] | None = None  # (epoch, the epoch's draws), see flipped()
        self.image_root = Path(d.image_root) if d.image_root else None
        self.texts = [prepare_text(s.phrase, d) for s in samples]
        self.transform = build_train_transform(d) if augment else None
        self.epoch = 0
        self.cache: dict[str, Any] | None = None
        self._baselines: tuple[float, dict[str, float]] | None = None  # (threshold, baselines) once computed

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def flipped(self, idx: torch.Tensor) -> torch.Tensor:
        """``[len(idx)]`` bool: which samples are mirrored this epoch (``flip``: one draw per sample and epoch from
        ``(seed, epoch)``, the same for the pixel and the cached path, so that a resumed run repeats them)."""
        if self.flip <= 0:
            return torch.zeros(len(idx), dtype=torch.bool)
        if self._flips is None or self._flips[0] != self.epoch:  # drawn once per epoch, not once per batch or item
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) & 0x7FFFFFFF)
            self._flips = (self.epoch, torch.rand(len(self.samples), generator=g) < self.flip)
        return self._flips[1][idx]

    # ---------------------------------------------------------------- raw pipeline

    def open_image(self, i: int) -> Image.Image:
        if self.image_root is None:
            raise DataError("data.image_root is empty: point it at the folder holding the images")
        path = self.image_root / self.samples[i].img_file
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")

    def baselines(self, threshold: float) -> dict[str, float]:
        """Acc@``threshold`` (percent) of the random / largest / most central referred object of each image
        (:func:`groundkit.metrics.refexp_baselines`); image sizes read from the files' headers, once."""
        if self._baselines is None or self._baselines[0] != threshold:
            if self.image_root is None:
                raise DataError("data.image_root is empty: point it at the folder holding the images")
            sizes: dict[str, tuple[int, int]] = {}
            for s in self.samples:
                if s.img_file not in sizes:
                    path = self.image_root / s.img_file
                    if not path.is_file():
                        raise FileNotFoundError(f"image not found: {path}")
                    with Image.open(path) as im:
                        sizes[s.img_file] = im.size
            files = [s.img_file for s in self.samples]
            boxes = np.asarray([s.box for s in self.samples], dtype=np.float64)
            if self.d.instances_file:
                known = refcoco.objects_by_file(self.d.instances_file)
                missing = sorted({f for f in files if f not in known})
                if missing:
                    raise DataError(
                        f"{self.d.instances_file}: no image entry for {len(missing)} image(s) of the"
                        f" {self.name or 'split'}, e.g. {missing[0]!r} (data.instances_file)"
                    )
                objs = [known[f] for f in files]
            else:
                objs = objects_per_image(files, boxes)
            self._baselines = (threshold, refexp_baselines(boxes, objs, [sizes[f] for f in files], threshold))
        return dict(self._baselines[1])

    def raw_item(self, i: int, flip: bool | None = None) -> dict[str, Any]:
        """The letterboxed image, mask, text and target box of sample ``i`` (augmented if training), mirrored when
        ``flip`` (None: as :meth:`flipped` draws it)."""
        s = self.samples[i]
        img = self.open_image(i)
        box = torch.tensor([s.box], dtype=torch.float32)
        if self.transform is not None:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
            out = self.transform({"image": img, "boxes": box, "text": self.texts[i]}, g)
            image, mask, canvas_box, info = out["image"], out["mask"], out["boxes"], out["letterbox"]
        else:
            image, info = letterbox(img, self.d.imsize, fill=0.0)
            canvas_box, mask = info.to_letterbox(box), info.padding_mask()
        target = xyxy_to_cxcywh(torch.as_tensor(canvas_box, dtype=torch.float32)[0] / self.d.imsize)
        item = {
            "image": _to_unit_tensor(image),
            "image_mask": mask,
            "text": self.texts[i],
            "box": target,
            "index": i,
            "letterbox": info,
        }
        if flip is None:
            flip = bool(self.flipped(torch.tensor([i]))[0])
        return mirror(item) if flip else item

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.cache is not None:
            return {"index": i}
        return self.raw_item(i)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        idx = torch.tensor([it["index"] for it in items])
        if self.cache is not None:
            return self.cached_batch(idx)
        return {
            "image": torch.stack([it["image"] for it in items]),
            "image_mask": torch.stack([it["image_mask"] for it in items]),
            "texts": [it["text"] for it in items],
            "box": torch.stack([it["box"] for it in items]),
            "index": idx,
        }

    # ---------------------------------------------------------------- cached encoder outputs

    def _image_keys(self) -> list[str]:
        files = sorted({s.img_file for s in self.samples})
        return files + [f + FLIP_KEY for f in files] if self.flip > 0 else files

    def _text_keys(self) -> list[str]:
        texts = set(self.texts)
        return sorted(texts | {swap_left_right(t) for t in texts} if self.flip > 0 else texts)

    def cache_allowed(self, model: Any) -> bool:
        return self.d.cache_features and not self.augment and not model.encoders.image_features_trainable

    def _cache_dir(self) -> Path:
        if self.d.cache_dir:
            return Path(self.d.cache_dir)
        return feature_cache_root() / "clipvg"

    @torch.no_grad()
    def attach_cache(self, model: Any, device: torch.device, batch_size: int = 64) -> bool:
        """Compute (or load) the encoders' outputs of every image and text of this set; returns
        False (and changes nothing) when caching is not allowed for this set and model."""
        if not self.cache_allowed(model):
            return False
        d, enc = self.d, model.encoders
        # the features of an item are a function of the item alone (and of the kernels, keyed by the device's
        # float fingerprint): computed on one CPU thread in chunks of one size, whatever else is missing
        tag = f"{enc.fingerprint()}|imsize={d.imsize}|norm={model.pix_mean.flatten().tolist()}"
        tag += f"|floats={device_fingerprint(device)}"
        img_tag = f"{tag}|root={self.image_root.resolve() if self.image_root else ''}"
        key = hashlib.sha1(img_tag.encode()).hexdigest()[:16]
        root = self._cache_dir()
        files = self._image_keys()
        img_path = root / f"images-{key}.v3.pt"
        img_store = _load_store(img_path)
        pos = {f: i for i, f in enumerate(img_store["keys"])}
        missing = [f for f in files if f not in pos]
        if missing:
            first = {s.img_file: i for i, s in reversed(list(enumerate(self.samples)))}
            cols: list[list[torch.Tensor]] = [[], [], []]
            for chunk, real in padded_chunks(missing, batch_size):
                items = [self.raw_item(first[f.removesuffix(FLIP_KEY)], f.endswith(FLIP_KEY)) for f in chunk]
                imgs = torch.stack([it["image"] for it in items]).to(device)
                masks = torch.stack([it["image_mask"] for it in items]).to(device)
                with stored_features(device):
                    feats = enc.encode_image(model.normalize_images(imgs, masks))
                cols[0].append(feats[:real].to(torch.float16).cpu())
                cols[1].append(masks[:real].cpu())
                for it in items[:real]:
                    lb = it["letterbox"]
                    geo = [lb.scale, lb.pad_left, lb.pad_top, lb.orig_w, lb.orig_h]
                    cols[2].append(torch.tensor([geo], dtype=torch.float64))
            img_store = _extend_store(img_store, missing, [torch.cat(c) for c in cols])
            _save_store(img_path, img_store)
            pos = {f: i for i, f in enumerate(img_store["keys"])}
        img_feats, img_masks, geos = (c[torch.tensor([pos[f] for f in files])] for c in img_store["cols"])
        # texts depend on the text encoder and the query length only (not on the grid, canvas or normalisation)
        txt_tag = f"{enc.text_fingerprint()}|L={model.max_query_len}|floats={device_fingerprint(device)}"
        txt_key = hashlib.sha1(txt_tag.encode()).hexdigest()[:16]
        txt_path = root / f"texts-{txt_key}.v3.pt"
        txt_store = _load_store(txt_path)
        uniq = self._text_keys()
        tpos = {t: i for i, t in enumerate(txt_store["keys"])}
        todo = [t for t in uniq if t not in tpos]
        if todo:
            tcols: list[list[torch.Tensor]] = [[], []]
            for chunk, real in padded_chunks(todo, 256):
                ids, mask = enc.tokenize(chunk, model.max_query_len)
                with stored_features(device):
                    feats = enc.encode_text(ids.to(device), mask.to(device))
                tcols[0].append(feats[:real].to(torch.float16).cpu())
                tcols[1].append(mask[:real].cpu())
            txt_store = _extend_store(txt_store, todo, [torch.cat(c) for c in tcols])
            _save_store(txt_path, txt_store)
            tpos = {t: i for i, t in enumerate(txt_store["keys"])}
        txt_feats, txt_masks = (c[torch.tensor([tpos[t] for t in uniq])] for c in txt_store["cols"])
        img_pos = {f: i for i, f in enumerate(files)}
        txt_pos = {t: i for i, t in enumerate(uniq)}
        targets = torch.stack([self._target(i, geos[img_pos[s.img_file]]) for i, s in enumerate(self.samples)])
        self.cache = {
            "image_feats": img_feats,
            "image_mask": img_masks,
            "text_feats": txt_feats,
            "text_mask": txt_masks,
            "img_of": torch.tensor([img_pos[s.img_file] for s in self.samples]),
            "txt_of": torch.tensor([txt_pos[t] for t in self.texts]),
            "box": targets,
        }
        if self.flip > 0:  # the mirrored canvas, the swapped text and the mirrored box of every sample
            self.cache["img_of_flip"] = torch.tensor([img_pos[s.img_file + FLIP_KEY] for s in self.samples])
            self.cache["txt_of_flip"] = torch.tensor([txt_pos[swap_left_right(t)] for t in self.texts])
            self.cache["box_flip"] = mirror_boxes(targets)
        return True

    def _target(self, i: int, geo: torch.Tensor) -> torch.Tensor:
        """Target of sample ``i`` on its image's (centred) letterbox, from the stored geometry."""
        scale, left, top, w, h = geo.tolist()
        info = LetterboxInfo(scale, int(left), int(top), int(w), int(h), self.d.imsize)
        canvas = info.to_letterbox(torch.tensor([self.samples[i].box], dtype=torch.float32))
        return xyxy_to_cxcywh(torch.as_tensor(canvas, dtype=torch.float32)[0] / self.d.imsize)

    def cached_batch(self, idx: torch.Tensor) -> dict[str, Any]:
        c = self.cache
        assert c is not None
        im, tx, box = c["img_of"][idx], c["txt_of"][idx], c["box"][idx]
        if self.flip > 0:
            f = self.flipped(idx)
            im = torch.where(f, c["img_of_flip"][idx], im)
            tx = torch.where(f, c["txt_of_flip"][idx], tx)
            box = torch.where(f[:, None], c["box_flip"][idx], box)
        return {
            "image_feats": c["image_feats"][im],
            "image_mask": c["image_mask"][im],
            "text_feats": c["text_feats"][tx],
            "text_mask": c["text_mask"][tx],
            "box": box,
            "index": idx,
        }

    def detach_cache(self) -> None:
        self.cache = None


#: the feature-cache key of an image's mirrored canvas is its file name with this suffix
FLIP_KEY = "\x00flip"


def mirror(item: dict[str, Any]) -> dict[str, Any]:
    """A letterboxed sample mirrored left to right: canvas, padding mask, box (``cx -> 1 - cx``) and "left" /
    "right" swapped in the text (whole words); the letterbox geometry is left as it was (targets only)."""
    return {
        **item,
        "image": item["image"].flip(-1),
        "image_mask": item["image_mask"].flip(-1),
        "text": swap_left_right(item["text"]),
        "box": mirror_boxes(item["box"]),
    }


def mirror_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised ``(cx, cy, w, h)`` boxes ``[..., 4]`` of a canvas mirrored left to right: ``cx -> 1 - cx``."""
    return torch.cat([1.0 - boxes[..., :1], boxes[..., 1:]], dim=-1)


def _load_store(path: Path) -> dict[str, Any]:
    """A feature store ``{"keys": [str] * N, "cols": [Tensor[N, ...], ...]}``: a few stacked tensors (one
    file read of a few arrays, memory-mapped), not one tensor per image or text. Empty when absent or unreadable."""
    empty: dict[str, Any] = {"keys": [], "cols": []}
    if not path.is_file():
        return empty
    try:
        store = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a torn or foreign file: recompute
        return empty
    ok = isinstance(store, dict) and isinstance(store.get("keys"), list) and isinstance(store.get("cols"), list)
    return store if ok and all(len(c) == len(store["keys"]) for c in store["cols"]) else empty


def _extend_store(store: dict[str, Any], keys: list[str], cols: list[torch.Tensor]) -> dict[str, Any]:
    if store["keys"] and len(store["cols"]) != len(cols):
        store = {"keys": [], "cols": []}  # a different layout: start over
    if not store["keys"]:
        return {"keys": list(keys), "cols": cols}
    return {"keys": store["keys"] + list(keys), "cols": [torch.cat([a, b]) for a, b in zip(store["cols"], cols)]}


def _save_store(path: Path, store: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(store, tmp)
    os.replace(tmp, path)
