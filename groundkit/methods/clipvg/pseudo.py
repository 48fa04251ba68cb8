"""Pseudo-language labels (template, relation, caption) and their reliability.

Generation writes TransVG-style ``.pth`` lists (``img_file, 'useless placeholder', box, text,
'useless placeholder'``), so a pseudo-label file trains exactly like a human-labelled split.

* :func:`template_labels` — Pseudo-Q's template labels from per-image detections with attributes:
  people / clothes / things, tiny boxes dropped, per-group overlap suppression, attributes,
  clothes attached to people, spatial words among same-class objects, the top-n objects, templates,
  ``each_image_query`` labels sampled per image.
* :func:`relation_labels` — subject–predicate–object triplets read from a file (a scene-graph
  model's output), thresholded, the top ones per image, box = the subject's.
* :func:`caption_labels` — image captions read from a file, each paired with the detection of the
  first caption word that names a detected class.

Input files (JSON)::

    detections: {"images": [{"file_name", "width"?, "height"?, "detections": [
                    {"box": [x1,y1,x2,y2], "class", "score", "attribute"?, "attribute_score"?}]}]}
    relations:  {"images": [{"file_name", "relations": [{"subject": {"class", "box", "score"},
                    "predicate", "predicate_score", "object": {"class", "box", "score"}}]}]}
    captions:   {"images": [{"file_name", "captions": ["a man riding a horse", ...]}]}

Reliability (:func:`reliability_scores`): a measurer model's predicted box for each pseudo label
against the label's box, ``r = IoU`` (CLIP-VG ``evaluate_for_filtering``); :func:`save_histogram`
writes the 1000-bin histogram as NPZ + JSON and a PNG plot (:func:`plot_histogram`, which can also
mark a chosen threshold).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ...errors import DataError
from ...formats import transvg

__all__ = [
    "TemplateOptions",
    "template_labels",
    "relation_labels",
    "caption_labels",
    "write_labels",
    "merge_sources",
    "select",
    "reliability_histogram",
    "save_histogram",
    "plot_histogram",
]

PEOPLE = (
    "man",
    "woman",
    "person",
    "people",
    "boy",
    "girl",
    "child",
    "kid",
    "lady",
    "guy",
    "rider",
    "player",
    "skier",
    "surfer",
    "skateboarder",
    "baby",
)
CLOTHES = (
    "shirt",
    "jacket",
    "coat",
    "hat",
    "cap",
    "helmet",
    "pants",
    "jeans",
    "shorts",
    "dress",
    "skirt",
    "shoes",
    "shoe",
    "sweater",
    "hoodie",
    "glasses",
    "scarf",
    "vest",
    "uniform",
    "suit",
    "boots",
)
_UPPER = ("hat", "cap", "helmet", "glasses")
_LOWER = ("pants", "jeans", "shorts", "skirt", "shoes", "shoe", "boots")


@dataclass
class TemplateOptions:
    """Pseudo-Q's settings (``pseudo_query_generation.py``), as fractions where they were pixels."""

    min_area: float = 1.0 / 64  # drop people / things smaller than this fraction of the image
    nms_iou: float = 0.4  # per group, overlapping boxes keep the higher score
    attr_score: float = 0.3  # attributes below this score are ignored
    cloth_inside: float = 0.75  # a cloth belongs to a person when this much of it is inside
    spread: float = 50.0 / 640  # left/right (top/bottom) need centres spread over this fraction of the width (height)
    behind_ratio: float = 0.4  # smallest/largest area below this: "behind" / "front"
    topn: int = 3
    each_image_query: int = 6
    seed: int = 20211024
    people: tuple[str, ...] = PEOPLE
    clothes: tuple[str, ...] = CLOTHES


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _inside(inner: Sequence[float], outer: Sequence[float]) -> float:
    ix = max(0.0, min(inner[2], outer[2]) - max(inner[0], outer[0]))
    iy = max(0.0, min(inner[3], outer[3]) - max(inner[1], outer[1]))
    area = (inner[2] - inner[0]) * (inner[3] - inner[1])
    return ix * iy / area if area > 0 else 0.0


def _image_size(entry: dict[str, Any], image_root: str | Path | None) -> tuple[float, float]:
    if "width" in entry and "height" in entry:
        return float(entry["width"]), float(entry["height"])
    if image_root is None:
        raise DataError(f"{entry.get('file_name')}: no width/height in the file and no image_root to read them from")
    with Image.open(Path(image_root) / entry["file_name"]) as im:
        return float(im.width), float(im.height)


def _suppress(objs: list[dict], iou: float) -> list[dict]:
    keep: list[dict] = []
    for o in sorted(objs, key=lambda d: -d["score"]):
        if all(_iou(o["box"], k["box"]) <= iou for k in keep):
            keep.append(o)
    return keep


def _spatial(objs: list[dict], W: float, H: float, opt: TemplateOptions) -> None:
    """Adds ``o["where"]``: location words among same-class objects (left/right/middle, top/bottom,
    front/behind), following Pseudo-Q's rules."""
    by_class: dict[str, list[dict]] = {}
    for o in objs:
        o["where"] = []
        by_class.setdefault(o["noun"], []).append(o)
    for group in by_class.values():
        n = len(group)
        if n < 2:
            continue
        cx = [(o["box"][0] + o["box"][2]) / 2 for o in group]
        cy = [(o["box"][1] + o["box"][3]) / 2 for o in group]
        area = [(o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) for o in group]
        if max(cx) - min(cx) > opt.spread * W:
            if n <= 3:
                order = np.argsort(cx, kind="stable")
                group[order[0]]["where"].append("left")
                group[order[-1]]["where"].append("right")
                if n == 3:
                    group[order[1]]["where"].append("middle")
            else:
                for o, x in zip(group, cx):
                    if x < W / 4:
                        o["where"].append("left")
                    elif x > 3 * W / 4:
                        o["where"].append("right")
        if max(cy) - min(cy) > opt.spread * H:
            if n <= 3:
                order = np.argsort(cy, kind="stable")
                group[order[0]]["where"].append("top")
                group[order[-1]]["where"].append("bottom")
            else:
                for o, y in zip(group, cy):
                    if y < H / 4:
                        o["where"].append("top")
                    elif y > 3 * H / 4:
                        o["where"].append("bottom")
        big = max(area)
        if big > 0:
            for o, a in zip(group, area):
                if n <= 3:
                    if a == min(area) and a / big < opt.behind_ratio:
                        o["where"].append("behind")
                    elif a == big and min(area) / big < opt.behind_ratio:
                        o["where"].append("front")
                elif a / big < opt.behind_ratio:
                    o["where"].append("behind")


def _rel_phrase(where: str) -> str:
    return {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "middle": "in the middle",
        "front": "in the front",
        "behind": "in the behind",
    }[where]


def _candidates(o: dict) -> list[str]:
    noun, attr = o["noun"], o.get("attr")
    out = []
    np_ = f"{attr} {noun}" if attr else noun
    out.append(np_)
    for w in o["where"]:
        rel = _rel_phrase(w)
        out.append(f"{noun} {rel}")
        if attr:
            out.append(f"{attr} {noun} {rel}")
            out.append(f"{rel} {attr} {noun}")
    for c in o.get("clothes", []):
        out.append(f"{noun} in {c}")
        out.append(f"{c} {noun}")
        for w in o["where"]:
            out.append(f"{noun} in {c} {_rel_phrase(w)}")
            out.append(f"{_rel_phrase(w)} {noun} in {c}")
    return out


def template_labels(
    detections: list[dict[str, Any]], opt: TemplateOptions | None = None, image_root: str | Path | None = None
) -> list[tuple[str, list[float], str]]:
    """Pseudo-Q template labels ``(file_name, [x1, y1, x2, y2], text)`` from per-image detections."""
    opt = opt or TemplateOptions()
    rng = np.random.default_rng(opt.seed)
    out: list[tuple[str, list[float], str]] = []
    for entry in detections:
        W, H = _image_size(entry, image_root)
        people, clothes, things = [], [], []
        for d in entry.get("detections", []):
            x1, y1, x2, y2 = (float(v) for v in d["box"])
            x1, y1 = max(x1, 1.0), max(y1, 1.0)
            if x2 <= x1 or y2 <= y1:
                continue
            cls = str(d["class"]).lower().strip()
            attr = d.get("attribute")
            if attr is not None and float(d.get("attribute_score", 1.0)) <= opt.attr_score:
                attr = None
            noun = cls
            if attr and attr in cls.split():  # "white dog" class with attribute "white" -> noun "dog"
                noun = " ".join(w for w in cls.split() if w != attr) or cls
            o = {
                "box": [x1, y1, x2, y2],
                "noun": noun,
                "attr": attr,
                "score": float(d.get("score", 1.0)),
                "clothes": [],
            }
            area = (x2 - x1) * (y2 - y1) / (W * H)
            if cls in opt.clothes:
                clothes.append(o)
            elif area >= opt.min_area:
                (people if cls in opt.people else things).append(o)
        people, things, clothes = (_suppress(g, opt.nms_iou) for g in (people, things, clothes))
        for c in clothes:  # attach clothes to the person that holds them
            for p in people:
                if _inside(c["box"], p["box"]) <= opt.cloth_inside:
                    continue
                cy = (c["box"][1] + c["box"][3]) / 2
                ph = p["box"][3] - p["box"][1]
                if c["noun"] in _UPPER and cy > p["box"][1] + 0.25 * ph:
                    continue
                if c["noun"] in _LOWER and cy < p["box"][1] + 0.5 * ph:
                    continue
                p["clothes"].append(f"{c['attr']} {c['noun']}" if c["attr"] else c["noun"])
                break
        _spatial(people + things, W, H, opt)
        top = (sorted(people, key=lambda o: -o["score"]) + sorted(things, key=lambda o: -o["score"]))[: opt.topn]
        cands = [(o, t) for o in top for t in _candidates(o)]
        if len(cands) > opt.each_image_query:
            keep = sorted(rng.choice(len(cands), size=opt.each_image_query, replace=False).tolist())
            cands = [cands[i] for i in keep]
        out.extend((entry["file_name"], [round(v, 2) for v in o["box"]], t) for o, t in cands)
    return out


def relation_labels(
    relations: list[dict[str, Any]], score: float = 0.2, top: int = 10, each_image_query: int = 0, seed: int = 0
) -> list[tuple[str, list[float], str]]:
    """RelTR-style labels: triplets whose subject, predicate and object scores all exceed ``score``,
    the ``top`` ones per image by their product (all of them, as the official script keeps; ``each_image_query``
    > 0 samples that many instead, not official); text ``"<subject> <predicate> <object>"``, box = the subject's."""
    rng = np.random.default_rng(seed)
    out = []
    for entry in relations:
        good = []
        for r in entry.get("relations", []):
            s, o = r["subject"], r["object"]
            ps, pp, po = float(s.get("score", 1)), float(r.get("predicate_score", 1)), float(o.get("score", 1))
            if min(ps, pp, po) > score:
                good.append((ps * pp * po, r))
        good = [r for _, r in sorted(good, key=lambda t: -t[0])[:top]]
        if 0 < each_image_query < len(good):
            good = [good[i] for i in sorted(rng.choice(len(good), size=each_image_query, replace=False).tolist())]
        for r in good:
            text = f"{r['subject']['class']} {r['predicate']} {r['object']['class']}".lower()
            out.append((entry["file_name"], [round(float(v), 2) for v in r["subject"]["box"]], text))
    return out


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def caption_labels(
    captions: list[dict[str, Any]], detections: list[dict[str, Any]], each_image_query: int = 6
) -> list[tuple[str, list[float], str]]:
    """Each caption paired with the best-scoring detection of the first caption word (singularised)
    that names a detected class; captions naming no detected class are dropped. (The official code
    finds the entity with spaCy's dependency parse; this uses word order, which needs no model.)"""
    dets = {e["file_name"]: e.get("detections", []) for e in detections}
    out = []
    for entry in captions:
        best: dict[str, dict] = {}
        for d in dets.get(entry["file_name"], []):
            c = str(d["class"]).lower()
            if c not in best or float(d.get("score", 1)) > float(best[c].get("score", 1)):
                best[c] = d
        n = 0
        for cap in entry.get("captions", []):
            words = [_singular(w) for w in re.findall(r"[a-z]+", cap.lower())]
            hit = next((w for w in words if w in best), None)
            if hit is None:
                continue
            out.append((entry["file_name"], [round(float(v), 2) for v in best[hit]["box"]], cap.strip()))
            n += 1
            if n >= each_image_query:
                break
    return out


def write_labels(labels: list[tuple[str, list[float], str]], path: str | Path, dataset: str = "unc") -> Path:
    """Write ``(file, xyxy box, text)`` labels as a TransVG ``.pth`` list in ``dataset``'s layout."""
    entries = [transvg.make_entry(dataset, f, box, text) for f, box, text in labels]
    return transvg.save_list(entries, path, dataset)


def merge_sources(files: Sequence[str | Path], out: str | Path, dataset: str = "unc") -> Path:
    """Concatenate per-source lists in the order of their leading integer (CLIP-VG ``merge_file.py``:
    ``1_<ds>_train_pseudo_template_0_5.pth``, ``2_...``) into one list."""

    def key(p: Path) -> tuple[int, str]:
        m = re.match(r"(\d+)_", p.name)
        return (int(m.group(1)) if m else 1 << 30, p.name)

    entries: list = []
    for p in sorted((Path(f) for f in files), key=key):
        entries.extend(transvg.load_raw(p))
    return transvg.save_list(entries, out, dataset)


def select(entries: list, reliability: np.ndarray, threshold: float | None) -> list[int]:
    """Indices of the entries with ``r > threshold`` (all of them for ``None``)."""
    if len(entries) != len(reliability):
        raise ValueError(f"{len(entries)} entries but {len(reliability)} reliability scores")
    if threshold is None:
        return list(range(len(entries)))
    return np.flatnonzero(np.asarray(reliability) > threshold).tolist()


# ----------------------------------------------------------------------------- histograms


def reliability_histogram(r: np.ndarray, bins: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``(counts [bins], edges [bins + 1])`` of the scores over (0, 1]; r = 0 (no overlap at all)
    is left out as in the paper's figure and counted separately by :func:`save_histogram`."""
    r = np.asarray(r, dtype=np.float64)
    counts, edges = np.histogram(r[r > 0], bins=bins, range=(0.0, 1.0))
    return counts, edges


@dataclass
class HistogramFiles:
    npz: Path
    json: Path
    png: Path
    summary: dict[str, Any] = field(default_factory=dict)


def save_histogram(
    r: np.ndarray, out_stem: str | Path, title: str = "", bins: int = 1000, plot_bins: int = 50
) -> HistogramFiles:
    """Write ``<stem>.npz`` (scores, counts, edges), ``<stem>.json`` (summary, the kept fraction per
    threshold) and ``<stem>.png`` (a bar plot with ``plot_bins`` bars)."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    r = np.asarray(r, dtype=np.float32)
    counts, edges = reliability_histogram(r, bins)
    np.savez_compressed(stem.with_suffix(".npz"), reliability=r, counts=counts, edges=edges)
    summary = {
        "title": title,
        "n": int(len(r)),
        "mean": float(r.mean()) if len(r) else 0.0,
        "zero": int((r <= 0).sum()),
        "bins": bins,
        "kept_above": {f"{h:.1f}": float((r > h).mean()) if len(r) else 0.0 for h in np.arange(0, 1.0, 0.1)},
    }
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot_histogram(r, stem.with_suffix(".png"), title, plot_bins)
    return HistogramFiles(stem.with_suffix(".npz"), stem.with_suffix(".json"), stem.with_suffix(".png"), summary)


#: margins (left, right, top, bottom) of :func:`plot_histogram`'s plot area, in pixels
PLOT_MARGINS = (50, 15, 30, 40)
#: colour of the threshold line of :func:`plot_histogram`
THRESHOLD_COLOUR = (220, 30, 30)


def plot_histogram(
    r: np.ndarray,
    path: str | Path,
    title: str = "",
    bins: int = 50,
    size: tuple[int, int] = (640, 360),
    threshold: float | None = None,
) -> Path:
    """A histogram bar plot of the scores ``r`` drawn with PIL (no plotting library needed), written to
    ``path``. ``threshold``: a vertical line at ``h`` (x = left margin + plot width * h) and the fraction
    kept by :func:`select` (``r > h``) in the title."""
    r = np.asarray(r, dtype=np.float64)
    W, H = size
    left, right, top, bottom = PLOT_MARGINS
    counts, _ = np.histogram(r[r > 0], bins=bins, range=(0.0, 1.0))
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    head = f"{title}  (n={len(r)}, r=0: {int((r <= 0).sum())})"
    if threshold is not None:
        kept = int((r > threshold).sum())
        head += f"  h={threshold:g}: kept {kept} ({100.0 * kept / max(len(r), 1):.1f}%)"
    d.text((left, 8), head, fill="black")
    pw, ph = W - left - right, H - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    peak = max(int(counts.max()) if len(counts) else 0, 1)
    bw = pw / bins
    for i, c in enumerate(counts):
        if c:
            h = ph * c / peak
            d.rectangle([left + i * bw + 1, top + ph - h, left + (i + 1) * bw - 1, top + ph], fill=(70, 110, 180))
    for k in range(0, 11, 2):
        x = left + pw * k / 10
        d.line([x, top + ph, x, top + ph + 4], fill="black")
        d.text((x - 8, top + ph + 6), f"{k / 10:.1f}", fill="black")
    if threshold is not None:
        x = round(left + pw * min(max(float(threshold), 0.0), 1.0))
        d.line([x, top + 1, x, top + ph - 1], fill=THRESHOLD_COLOUR, width=2)
        label = f"h={threshold:g}"
        lx = x + 4 if x + 4 + 6 * len(label) < left + pw else x - 4 - 6 * len(label)
        d.text((lx, top + 4), label, fill=THRESHOLD_COLOUR)
    d.text((left + pw / 2 - 40, H - 18), "reliability (IoU)", fill="black")
    d.text((5, top), str(peak), fill="black")
    d.text((5, top + ph - 10), "0", fill="black")
    out = Path(path)
    im.save(out)
    return out
