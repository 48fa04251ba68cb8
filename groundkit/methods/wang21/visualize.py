"""wang21 pictures for the demo report: test images with, per phrase, the true box and the model's
top-ranked proposal.

The images are looked up beside the region file in the Flickr30K Entities layout
(``flickr30k_entities/flickr30k-images/<id>.jpg`` or ``flickr30k-images/<id>.jpg``); without them the
boxes are drawn on a blank canvas of the proposals' extent, and the caption says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...boxes import box_iou
from ...draw import GREEN, ORANGE, RED, add_caption, draw_boxes, spaced_indices
from ...formats import wang21_hdf5 as wfmt
from .. import load_run
from ..base import Figure
from .data import Wang21Dataset, resolve_paths

__all__ = ["phrase_figures", "find_image"]


def find_image(region_path: str | Path, image_id: str) -> Path | None:
    """The picture of ``image_id`` near a region file (Flickr30K Entities layout), or None."""
    base = Path(region_path).parent
    for folder in (base / "flickr30k_entities" / "flickr30k-images", base / "flickr30k-images", base / "images"):
        for ext in (".jpg", ".jpeg", ".png"):
            p = folder / f"{image_id}{ext}"
            if p.is_file():
                return p
    return None


@torch.no_grad()
def phrase_figures(
    run: str | Path, out_dir: str | Path, n: int = 4, phrases_per_image: int = 3, split: str = "test"
) -> list[Figure]:
    """PNG files in ``out_dir``, one per image for ``n`` images of ``split`` spread over the split: for up
    to ``phrases_per_image`` phrases of one sentence, the true box (green) and the top-ranked proposal
    (orange when it is a hit at the evaluation's IoU threshold, red when not)."""
    _, cfg, model = load_run(run, device="cpu", method="wang21")
    model.eval()
    paths = resolve_paths(cfg.data, split)
    if paths is None:
        return []
    ds = Wang21Dataset(cfg, split, *paths)
    phr = wfmt.read_phrase_hdf5(paths[1], ds.image_ids, max_tokens=cfg.data.max_tokens)
    strings = phr.phrase_strings()[:, : ds.S]  # [I, S, P]
    ev = ds.t["eval_valid"]  # [I, S, P]
    usable = [i for i in range(len(ds.image_ids)) if bool(ev[i].any())]
    picks = [usable[j] for j in spaced_indices(len(usable), n)]
    if not picks:
        return []
    ec = cfg.eval
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for i in dict.fromkeys(picks):
        s = int(ev[i].sum(-1).argmax())  # the sentence with the most phrases that have a box
        b = ds.get_batch([i * ds.S + s])
        sim = model.phrase_region_scores(b["region_feats"], b["words"], b["token_mask"])[0].float()
        valid = b["region_valid"][0].bool()
        sim = sim.masked_fill(~valid[None], float("-inf"))
        props = b["region_boxes"][0].float()
        gt = b["gt_boxes"][0].float()
        phrases = [p for p in np.nonzero(b["eval_valid"][0].numpy())[0]][:phrases_per_image]
        boxes, colours, labels, lines = [], [], [], []
        for k, p in enumerate(phrases, 1):
            top = int(sim[p].argmax())
            iou = float(box_iou(gt[p : p + 1], props[top : top + 1], ec.pixel_offset)[0, 0])
            hit = iou >= ec.iou_threshold if ec.inclusive else iou > ec.iou_threshold
            boxes += [gt[p].tolist(), props[top].tolist()]
            colours += [GREEN, ORANGE if hit else RED]
            labels += [f"{k} true", f"{k} {'hit' if hit else 'miss'}"]
            lines.append(f'{k}. "{strings[i, s, p]}": {"hit" if hit else "miss"} (IoU {iou:.2f})')
        image_id = ds.image_ids[i]
        path = find_image(paths[0], image_id)
        if path is not None:
            img = Image.open(path).convert("RGB")
        else:
            ext = props[valid].max(0).values if bool(valid.any()) else torch.tensor([0, 0, 320, 240])
            img = Image.new("RGB", (max(32, int(ext[2]) + 1), max(32, int(ext[3]) + 1)), (235, 235, 235))
        scale = max(1.0, 480 / max(img.size))
        pic = draw_boxes(img, boxes, colours, labels, scale=scale)
        pic = add_caption(pic, lines)
        name = f"wang21_{image_id}.png"
        pic.save(out / name)
        where = "" if path is not None else " (image file not found: boxes on a blank canvas)"
        figures.append(
            Figure(
                name,
                f"test image {image_id}{where}: per phrase, the true box (green) and the model's top-ranked "
                f"proposal (orange: hit, IoU above {ec.iou_threshold}; red: miss). " + "; ".join(lines),
            )
        )
    return figures
