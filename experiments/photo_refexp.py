"""A referring-expression set made of real photographs, in the official RefCOCO ``unc`` layout.

The built-in worlds draw their objects; this set pastes photographs of everyday objects (the scikit-image and
scikit-learn samples: an astronaut, a cat, a coffee cup, a rocket, a motorcycle, a cameraman, coins, a pagoda,
a flower, a horse) at several sizes and positions on textured backgrounds (brick, grass, gravel, tinted). Every
instance is a jittered crop of its photograph, possibly mirrored, with its colours shifted. Images hold 3-5
objects; most hold two of one class, which their expressions tell apart by side ("the cat on the left") or size
("the bigger cup"); an object alone of its class is named by class ("the kitten", "a pagoda"). Every object of an
image is referred once, so the trivial baselines (random, largest, most central object) are exact.

    pip install scikit-image           # the photographs (scikit-learn ships with the test extra)
    python experiments/photo_refexp.py OUT [--train 800 --val 100 --test 200 --seed 0]

writes ``OUT/images/*.jpg``, ``OUT/splits/unc/unc_{train,val,testA,testB}.pth`` (5-tuples, COCO ``[x, y, w, h]``
boxes) and ``OUT/instances.json`` (every image's objects, COCO-like, for ``data.instances_file``). Train with::

    groundkit train clipvg world_cpu --split-root OUT/splits --image-root OUT/images \\
        --set data.supervision=full data.instances_file=OUT/instances.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from groundkit.formats import transvg

#: class -> (photograph, crop box x1 y1 x2 y2 in its pixels, names the expressions use)
OBJECTS: dict[str, tuple[str, tuple[int, int, int, int], tuple[str, ...]]] = {
    "astronaut": ("astronaut", (10, 20, 370, 512), ("astronaut", "woman in a space suit", "astronaut")),
    "cat": ("chelsea", (0, 0, 451, 300), ("cat", "kitten", "cat")),
    "cup": ("coffee", (120, 10, 560, 400), ("cup", "coffee cup", "cup of coffee")),
    "rocket": ("rocket", (230, 60, 420, 427), ("rocket", "rocket on its launch pad", "rocket")),
    "motorcycle": ("motorcycle_left", (40, 150, 700, 480), ("motorcycle", "motorbike", "red motorcycle")),
    "cameraman": ("camera", (40, 20, 420, 512), ("cameraman", "man with a camera", "photographer")),
    "coins": ("coins", (0, 0, 384, 303), ("coins", "tray of coins", "old coins")),
    "pagoda": ("china.jpg", (40, 20, 370, 427), ("pagoda", "tower", "temple")),
    "flower": ("flower.jpg", (140, 60, 470, 380), ("flower", "orange flower", "dahlia")),
    "horse": ("horse", (0, 0, 400, 328), ("horse", "black horse", "horse")),
}
TEXTURES = ("brick", "grass", "gravel")
CANVASES = ((640, 480), (500, 375), (480, 640))


def load_photos() -> dict[str, Image.Image]:
    """The photographs and textures, read from the installed packages (no network)."""
    try:
        import skimage.data  # noqa: PLC0415 (optional dependency of this script only)
        from sklearn.datasets import load_sample_image  # noqa: PLC0415
    except ImportError as exc:
        sys.exit(f"this script needs scikit-image and scikit-learn ({exc}); pip install scikit-image scikit-learn")
    root = Path(skimage.data.__file__).parent
    out: dict[str, Image.Image] = {}
    for name in {p for p, _, _ in OBJECTS.values()} | set(TEXTURES):
        if name.endswith(".jpg"):
            out[name] = Image.fromarray(load_sample_image(name))
        elif name == "horse":  # a binary silhouette: dark horse on a light ground
            out[name] = Image.fromarray(
                np.where(skimage.data.horse()[..., None], 235, 40).astype(np.uint8).repeat(3, 2)
            )
        else:
            file = root / (f"{name}.png" if (root / f"{name}.png").is_file() else f"{name}.jpg")
            out[name] = Image.open(file).convert("RGB")
    return out


@dataclass
class Placed:
    cls: str
    box: tuple[float, float, float, float]  # x1 y1 x2 y2

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _instance(photo: Image.Image, crop: tuple, long_side: int, rng: np.random.Generator) -> Image.Image:
    """A jittered crop of the photograph at ``long_side`` pixels, maybe mirrored, colours shifted."""
    x1, y1, x2, y2 = crop
    w, h = x2 - x1, y2 - y1
    j = rng.uniform(-0.08, 0.08, 4) * np.array([w, h, w, h])
    box = (max(0, x1 + j[0]), max(0, y1 + j[1]), min(photo.width, x2 + j[2]), min(photo.height, y2 + j[3]))
    im = photo.crop(tuple(int(round(v)) for v in box))
    scale = long_side / max(im.size)
    im = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))


def _background(textures: dict[str, Image.Image], size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    tex = textures[TEXTURES[int(rng.integers(len(TEXTURES)))]]
    s = rng.uniform(0.5, 1.0)
    cw, ch = int(tex.width * s), int(tex.height * s)
    x, y = int(rng.integers(0, tex.width - cw + 1)), int(rng.integers(0, tex.height - ch + 1))
    bg = np.asarray(tex.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR).convert("L"), dtype=np.float32)
    tint = rng.uniform(0.45, 1.0, 3)
    return Image.fromarray(np.clip(bg[..., None] * tint * rng.uniform(0.6, 1.1), 0, 255).astype(np.uint8))


def _scene(photos: dict[str, Image.Image], rng: np.random.Generator) -> tuple[Image.Image, list[Placed]]:
    size = CANVASES[int(rng.integers(len(CANVASES)))]
    canvas = _background(photos, size, rng)
    n = int(rng.integers(3, 6))
    classes = list(OBJECTS)
    want: list[str] = []
    for _ in range(int(rng.choice([0, 1, 1, 2]))):  # pairs of one class (most images hold one)
        want += [str(rng.choice([c for c in classes if c not in want]))] * 2
    while len(want) < n:
        want.append(str(rng.choice([c for c in classes if c not in want])))
    placed: list[Placed] = []
    short = min(size)
    for cls in want[:n]:
        photo_name, crop, _ = OBJECTS[cls]
        for _ in range(40):
            inst = _instance(photos[photo_name], crop, int(rng.uniform(0.22, 0.5) * short), rng)
            if inst.width >= size[0] or inst.height >= size[1]:
                continue
            x, y = int(rng.integers(0, size[0] - inst.width)), int(rng.integers(0, size[1] - inst.height))
            box = (float(x), float(y), float(x + inst.width), float(y + inst.height))
            if all(_iou(box, p.box) <= 0.05 for p in placed):
                canvas.paste(inst, (x, y))
                placed.append(Placed(cls, box))
                break
    return canvas, placed


def expressions(placed: list[Placed], rng: np.random.Generator) -> list[str]:
    """One expression per object: its class name, or with side / size where another shares its class."""
    out = []
    for i, p in enumerate(placed):
        name = str(rng.choice(OBJECTS[p.cls][2]))
        same = [q for j, q in enumerate(placed) if q.cls == p.cls and j != i]
        if not same:
            out.append(str(rng.choice([f"the {name}", name, f"a {name}", f"the {name} in the picture"])))
            continue
        other = same[0]
        ratio = p.area / other.area
        by_size = (ratio >= 2.0 or ratio <= 0.5) and rng.random() < 0.5
        if by_size:
            word = str(rng.choice(["bigger", "big", "large"] if ratio > 1 else ["smaller", "small", "little"]))
            out.append(f"the {word} {name}")
        else:
            side = "left" if p.cx < other.cx else "right"
            out.append(str(rng.choice([f"the {name} on the {side}", f"{side} {name}", f"the {side}most {name}"])))
    return out


def build(out: Path, counts: dict[str, int], seed: int) -> dict[str, int]:
    """Write the set; returns the number of expressions per split."""
    photos = load_photos()
    (out / "images").mkdir(parents=True, exist_ok=True)
    coco: dict[str, list] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i + 1, "name": c} for i, c in enumerate(OBJECTS)]
    cat_id = {c: i + 1 for i, c in enumerate(OBJECTS)}
    sizes = {}
    for k, (split, n_images) in enumerate(counts.items()):
        rng = np.random.default_rng([seed, k])
        entries = []
        for i in range(n_images):
            canvas, placed = _scene(photos, rng)
            name = f"{split}_{i:05d}.jpg"
            canvas.save(out / "images" / name, quality=92)
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": name, "width": canvas.width, "height": canvas.height})
            for p in placed:
                x1, y1, x2, y2 = p.box
                coco["annotations"].append(
                    {
                        "id": len(coco["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": cat_id[p.cls],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": p.area,
                        "iscrowd": 0,
                    }
                )
            for p, text in zip(placed, expressions(placed, rng)):
                entries.append(transvg.make_entry("unc", name, p.box, text, ann=f"{name}.{p.cls}"))
        if split == "test":  # RefCOCO's two test splits: here simply the two halves of the test images
            half = [e for e in entries if int(e[0].split("_")[1][:5]) < n_images // 2]
            transvg.save_split(half, out / "splits", "unc", "testA")
            transvg.save_split([e for e in entries if e not in half], out / "splits", "unc", "testB")
        else:
            transvg.save_split(entries, out / "splits", "unc", split)
        sizes[split] = len(entries)
    (out / "instances.json").write_text(json.dumps(coco))
    return sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/photo_refexp.py", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=800, help="training images")
    p.add_argument("--val", type=int, default=100, help="validation images")
    p.add_argument("--test", type=int, default=200, help="test images (split into testA / testB)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    sizes = build(a.out, {"train": a.train, "val": a.val, "test": a.test}, a.seed)
    print(f"{a.out}: " + ", ".join(f"{k} {v} expressions" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
