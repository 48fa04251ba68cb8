"""Where a trained CLIP-VG run goes wrong on a referring-expression split, by the object its box lands on.

Every expression of the split is grounded by the run (``ClipVGPredictor``, the pixels, as ``groundkit predict``);
the predicted box is matched to the image's annotated objects (a COCO-like ``instances.json`` with categories, as
RefCOCO's refer folder and the built-in ``pseudo`` world ship) and counted as one of:

* ``right``: IoU >= 0.5 with the target (Acc@0.5);
* ``loose box on the target``: the object it overlaps most is the target, with IoU in [0.3, 0.5);
* ``another object of the category``: it overlaps (IoU >= 0.3) another object of the target's category most;
* ``an object of another category``: it overlaps (IoU >= 0.3) an object of another category most;
* ``no object``: no object with IoU >= 0.3.

    python experiments/clipvg_errors.py RUN [--split test]

reads the split, images and ``data.instances_file`` from the run's config and prints the shares in percent.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import torch
from PIL import Image
from torchvision.ops import box_iou

from groundkit.formats import refcoco
from groundkit.methods.clipvg.data import load_samples
from groundkit.methods.clipvg.predict import ClipVGPredictor

KINDS = (
    "right",
    "loose box on the target",
    "another object of the category",
    "an object of another category",
    "no object",
)


def objects_with_categories(path: str) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """file name -> (boxes ``[k, 4]`` x1 y1 x2 y2, category ids) of every annotated object."""
    images, anns, _ = refcoco.load_instances(path)
    out: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for a in anns.values():
        x, y, w, h = (float(v) for v in a["bbox"])
        boxes, cats = out[images[int(a["image_id"])]["file_name"]]
        boxes.append((x, y, x + w, y + h))
        cats.append(int(a["category_id"]))
    return {f: (torch.tensor(b, dtype=torch.float64).reshape(-1, 4), c) for f, (b, c) in out.items()}


def classify(pred: torch.Tensor, target: torch.Tensor, objects: torch.Tensor, cats: list[int]) -> str:
    """One of :data:`KINDS` for a predicted box ``[4]`` and its target ``[4]`` among the image's objects."""
    if box_iou(pred[None], target[None])[0, 0] >= 0.5:
        return KINDS[0]
    target_obj = int(box_iou(target[None], objects)[0].argmax())
    overlaps = box_iou(pred[None], objects)[0]
    best = int(overlaps.argmax())
    if overlaps[best] < 0.3:
        return KINDS[4]
    if best == target_obj:
        return KINDS[1]
    return KINDS[2] if cats[best] == cats[target_obj] else KINDS[3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a trained clipvg run directory")
    ap.add_argument("--split", default="test")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    predictor = ClipVGPredictor(args.run)
    d = predictor.cfg.data
    if not d.instances_file:
        raise SystemExit(f"{args.run}: its config names no data.instances_file (the objects and their categories)")
    objects = objects_with_categories(d.instances_file)
    by_image = defaultdict(list)
    for s in load_samples(d, args.split):
        by_image[s.img_file].append(s)
    counts: Counter[str] = Counter()
    for file, samples in by_image.items():
        with Image.open(Path(d.image_root) / file) as im:
            results = predictor.ground(im.convert("RGB"), [s.phrase for s in samples])
        boxes, cats = objects[file]
        for s, r in zip(samples, results):
            pred = torch.tensor(r["box"], dtype=torch.float64)
            counts[classify(pred, torch.tensor(s.box, dtype=torch.float64), boxes, cats)] += 1
    n = sum(counts.values())
    print(f"{args.run}, {args.split}: {n} expressions")
    for kind in KINDS:
        print(f"  {kind:<32} {100 * counts[kind] / n:6.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
