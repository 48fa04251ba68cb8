"""Pictures of a trained co-grounding run for the demo report.

A video run (``data.kind: vid``): for ``n`` test videos (evenly spaced over the test list), one film strip
each, :data:`STRIP_FRAMES` frames evenly spaced over the video in a row, every frame with the true box
(green) and the predicted box (red), its index and hit / miss; the caption gives the expression and the
video's Acc@0.5 over all its frames. An image run: ``n`` test images with the true and predicted boxes, the
caption giving the expression and the IoU. Everything is read from the run folder (its checkpoint's config
names the data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...boxes import paired_box_iou
from ...draw import GREEN, RED, draw_boxes, spaced_indices
from ..base import Figure
from .data import image_splits, load_image_samples, load_videos, read_image
from .method import hits
from .predict import CoGroundingPredictor

__all__ = ["demo_figures", "film_strip", "STRIP_FRAMES", "TRUE_COLOUR", "PRED_COLOUR"]

TRUE_COLOUR = GREEN
PRED_COLOUR = RED
STRIP_FRAMES = 6
#: a tile's long side is brought into this range (integer enlargement below, shrinking above)
TILE_SIDE = (320, 480)
#: single images: enlarged by an integer factor until the long side reaches this
MIN_SIDE = 320
GAP = 4  # pixels between the frames of a strip
BAND = 16  # pixels under each frame for its label


def _tile_scale(size: tuple[int, int]) -> float:
    lo, hi = TILE_SIDE
    long = max(size)
    return float(max(1, lo // long)) if long <= hi else hi / long


def film_strip(
    frames: list[Image.Image], true_boxes: Any, pred_boxes: Any, hit: Any, indices: list[int]
) -> Image.Image:
    """The frames ``indices`` in a row, each with its true (green) and predicted (red) box and a label
    ``t=<index> hit|miss`` under it; every tile has the size of the first frame after scaling."""
    scale = _tile_scale(frames[indices[0]].size)
    tiles = []
    for t in indices:
        tile = draw_boxes(frames[t], [true_boxes[t], pred_boxes[t]], [TRUE_COLOUR, PRED_COLOUR], scale=scale)
        tiles.append((t, tile))
    tw, th = tiles[0][1].size
    strip = Image.new("RGB", (len(tiles) * tw + (len(tiles) - 1) * GAP, th + BAND), "white")
    d = ImageDraw.Draw(strip)
    for k, (t, tile) in enumerate(tiles):
        x = k * (tw + GAP)
        strip.paste(tile.resize((tw, th)) if tile.size != (tw, th) else tile, (x, 0))
        ok = bool(hit[t])
        d.text((x + 3, th + 2), f"t={t} {'hit' if ok else 'miss'}", fill=TRUE_COLOUR if ok else PRED_COLOUR)
    return strip


def _video_figures(pred: CoGroundingPredictor, out_dir: Path, n: int) -> list[Figure]:
    cfg = pred.cfg
    videos = [(s, v) for s in image_splits(cfg, "test") for v in load_videos(cfg, s)]
    post = pred.post_process and cfg.post.top_k > 0
    figs = []
    for k, i in enumerate(spaced_indices(len(videos), n)):
        split, v = videos[i]
        frames = [read_image(p) for p in v.paths]
        res = pred.ground_video(frames, v.text)
        boxes = np.asarray(res["boxes"], dtype=np.float64)
        hit = hits(boxes, np.asarray(v.boxes, dtype=np.float64), cfg)
        shown = spaced_indices(len(frames), STRIP_FRAMES)
        name = f"cogrounding_video_{k}.png"
        film_strip(frames, v.boxes, boxes, hit, shown).save(out_dir / name)
        acc = 100.0 * float(np.mean(hit))
        figs.append(
            Figure(
                name,
                f'video {v.name or f"{split}/{i}"}: "{v.text}" - Acc@0.5 {acc:.1f}% over its {len(frames)} frames'
                f"{' (after temporal re-scoring)' if post and len(frames) > 1 else ''}; frames "
                f"{', '.join(map(str, shown))} shown; green: true box, red: predicted box",
            )
        )
    return figs


def _image_figures(pred: CoGroundingPredictor, out_dir: Path, n: int) -> list[Figure]:
    cfg = pred.cfg
    samples = [s for split in image_splits(cfg, "test") for s in load_image_samples(cfg, split)]
    figs = []
    for k, i in enumerate(spaced_indices(len(samples), n)):
        s = samples[i]
        image = read_image(s.path)
        (res,) = pred.ground(image, [s.text])
        iou = float(paired_box_iou(torch.tensor([res["box"]]), torch.tensor([s.box], dtype=torch.float64))[0])
        ok = bool(hits(np.asarray([res["box"]]), np.asarray([s.box]), cfg)[0])
        name = f"cogrounding_image_{k}.png"
        k = float(max(1, MIN_SIDE // max(image.size)))
        draw_boxes(image, [s.box, res["box"]], [TRUE_COLOUR, PRED_COLOUR], scale=k).save(out_dir / name)
        figs.append(
            Figure(
                name,
                f'{s.split} sample {i}: "{s.text}" - IoU {iou:.2f} ({"hit" if ok else "miss"}); '
                "green: true box, red: predicted box",
            )
        )
    return figs


def demo_figures(run: str | Path, out_dir: Path, n: int = 4, device: str = "cpu") -> list[Figure]:
    """Film strips of ``n`` test videos (a video run) or ``n`` test images with their boxes (an image run),
    written into ``out_dir`` as ``cogrounding_video_<k>.png`` / ``cogrounding_image_<k>.png``."""
    pred = CoGroundingPredictor(run, device=device)
    pred.post_process = pred.cfg.post.enabled
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if pred.cfg.data.kind == "vid":
        return _video_figures(pred, out_dir, n)
    return _image_figures(pred, out_dir, n)
