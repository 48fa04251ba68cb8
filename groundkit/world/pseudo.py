"""The ``pseudo`` task: CLIP-VG / Pseudo-Q pseudo-language labels with structured, measurable noise.

The images and the human labels are those of the ``refexp`` task (written in the same layout: refer
files, ``splits/unc/unc_{train,val,trainval,testA,testB}.pth``), with more crowded scenes. On the
*train* images a simulated detector (class, colour attribute, box) is run; its errors are
structured: a detection is wrong with probability proportional to ``1 + (small_weight-1)*small +
(crowd_weight-1)*crowded``, scaled so that the mean error rate over all detections equals
``noise``. Three pseudo-label sources are built from the detections, as in CLIP-VG:

* ``template`` (Pseudo-Q): ``"{colour} {noun}"``, ``"{noun} on the left/right"``, ``"{noun} in the
  middle"`` (spatial words among same-class detections whose centres spread over 8 % of the width);
* ``relation`` (RelTR-style): ``"{subject} {predicate} {object}"``, box = subject's, predicates also
  misread with probability ``noise * relation_flip`` weighted up among many same-class objects;
* ``caption``: a caption-like sentence paired with the box of the first detection of its entity's
  class (ambiguous when several objects share that class).

Each label's correctness is decided against the ground truth: its query (class, attributes,
location, relation) must select exactly one object and its box must overlap that object with
IoU >= 0.5. Files (beside the refexp files)::

    splits/unc/train_separate/{1_unc_train_pseudo_template,2_unc_train_pseudo_relation,3_unc_train_pseudo_caption}.pth
    splits/unc/unc_train_pseudo.pth      the three sources concatenated in that order (CLIP-VG merge_file.py)
    pseudo/detections_train.json         the simulated detections the labels were built from
    analysis/pseudo_labels.json          per label, in .pth order: correctness flags, conditions (never for training)

Labels are 5-tuples ``(img_file, 'useless placeholder', [x,y,w,h], text, 'useless placeholder')``.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import refcoco, transvg
from . import refexp
from .core import check_knobs, rng_for, write_json
from .scene import CATEGORIES, CONFUSABLE, RELATION_WORDS, Scene, SceneObject, box_iou_np, relation

__all__ = ["build", "DEFAULTS", "SOURCES", "resolve", "load_label_flags"]

TASK = "pseudo"
SOURCES: tuple[str, ...] = ("template", "relation", "caption")
_FILES = {s: f"{i + 1}_unc_train_pseudo_{s}" for i, s in enumerate(SOURCES)}

DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_images=40, width=160, height=120, split_fractions=[0.7, 0.1, 0.1, 0.1]),
    "small": dict(n_images=1200, width=256, height=192, split_fractions=[0.7, 0.1, 0.1, 0.1]),
    "medium": dict(n_images=4000, width=320, height=240, split_fractions=[0.85, 0.075, 0.0375, 0.0375]),
    "large": dict(n_images=20000, width=224, height=168, split_fractions=[0.85, 0.075, 0.0375, 0.0375]),
}
_COMMON = dict(
    min_objects=3,
    max_objects=8,
    same_category=0.5,
    noise=0.25,  # mean probability that a detection is wrong (miss, attribute, class or box)
    small_weight=3.0,  # relative error weight of small objects (area < small_area of the image)
    crowd_weight=2.0,  # relative error weight in crowded scenes (>= crowd_objects objects)
    small_area=0.02,
    crowd_objects=6,
    relation_flip=1.0,  # predicates misread with probability noise * relation_flip * weight
    topn=3,  # objects per image used by the template source (by detection score)
    each_image_query=6,  # labels per image and source (Pseudo-Q: 6)
    spread=0.08,  # left/right need centre spread > spread * width (Pseudo-Q: 50 px of 640)
)


def _defaults(size: str) -> dict[str, Any]:
    if size not in DEFAULTS:
        raise ValueError(f"unknown size {size!r}; sizes: {list(DEFAULTS)}")
    base = {k: v for k, v in refexp._defaults(size).items() if k not in ("min_objects", "max_objects", "same_category")}
    return {**base, **_COMMON, **DEFAULTS[size]}


# ----------------------------------------------------------------------------------------------
# ground-truth resolution of a label's query
# ----------------------------------------------------------------------------------------------


def resolve(query: dict[str, Any], scene: Scene) -> list[int]:
    """Ids of the ground-truth objects a query selects.

    ``query``: ``{"category", "colour" (or None), "location" (left/right/middle or None),
    "relation" (a key of RELATION_WORDS or None), "landmark" (a category or None)}``.
    """
    cands = [
        o
        for o in scene.objects
        if o.category == query["category"] and (query.get("colour") is None or o.colour == query["colour"])
    ]
    loc = query.get("location")
    if loc is not None and cands:
        xs = sorted(cands, key=lambda o: (o.center[0], o.id))
        if loc == "left":
            cands = [xs[0]]
        elif loc == "right":
            cands = [xs[-1]]
        elif loc == "middle":
            cands = [xs[len(xs) // 2]] if len(xs) % 2 == 1 and len(xs) >= 3 else xs
    rel = query.get("relation")
    if rel is not None:
        lms = [o for o in scene.objects if o.category == query["landmark"]]
        cands = [o for o in cands if any(rel in relation(o, lm) for lm in lms)]
    return [o.id for o in cands]


# ----------------------------------------------------------------------------------------------
# simulated detector
# ----------------------------------------------------------------------------------------------


def _conditions(scene: Scene, k: dict[str, Any]) -> dict[int, dict[str, Any]]:
    area = scene.width * scene.height
    crowded = len(scene.objects) >= k["crowd_objects"]
    out = {}
    for o in scene.objects:
        n_same = sum(p.category == o.category for p in scene.objects)
        out[o.id] = {"small": o.area / area < k["small_area"], "crowded": crowded, "n_same": n_same}
    return out


def _weight(c: dict[str, Any], k: dict[str, Any]) -> float:
    return 1.0 + (k["small_weight"] - 1.0) * c["small"] + (k["crowd_weight"] - 1.0) * c["crowded"]


def _detect(scenes: list[Scene], k: dict[str, Any], seed: int) -> list[list[dict[str, Any]]]:
    """Per scene, detections ``{gt, category, colour, box, score, error}``; misses are dropped."""
    conds = [_conditions(s, k) for s in scenes]
    weights = [_weight(c, k) for cs in conds for c in cs.values()]
    mean_w = float(np.mean(weights)) if weights else 1.0
    out = []
    for i, (scene, cs) in enumerate(zip(scenes, conds)):
        rng = rng_for(seed, TASK, "detect", i)
        dets = []
        for o in scene.objects:
            p = min(0.95, k["noise"] * _weight(cs[o.id], k) / mean_w)
            err = None
            if rng.random() < p:
                err = str(rng.choice(["miss", "colour", "box", "class"], p=[0.3, 0.3, 0.25, 0.15]))
            if err == "class":
                alts = [c for c in CONFUSABLE.get(o.category, ()) if c in CATEGORIES]
                err = "class" if alts else "colour"
            if err == "miss":
                dets.append({"gt": o.id, "error": "miss"})
                continue
            x1, y1, x2, y2 = o.box
            w, h = x2 - x1, y2 - y1
            j = 0.04
            box = [
                x1 + rng.normal(0, j) * w,
                y1 + rng.normal(0, j) * h,
                x2 + rng.normal(0, j) * w,
                y2 + rng.normal(0, j) * h,
            ]
            category, colour = o.category, o.colour
            if err == "box":  # a box that misses the object (shifted by most of its size)
                dx = float(rng.choice([-1, 1])) * rng.uniform(0.6, 0.9) * w
                dy = float(rng.choice([-1, 1])) * rng.uniform(0.0, 0.4) * h
                box = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
            elif err == "colour":
                pal = [c for c in CATEGORIES[o.category].palette if c != o.colour] or ["gray"]
                colour = str(rng.choice(pal))
            elif err == "class":
                category = str(rng.choice([c for c in CONFUSABLE[o.category] if c in CATEGORIES]))
            bx1 = min(max(box[0], 0.0), scene.width - 2.0)
            by1 = min(max(box[1], 0.0), scene.height - 2.0)
            bx2 = min(max(box[2], bx1 + 1.0), scene.width - 1.0)
            by2 = min(max(box[3], by1 + 1.0), scene.height - 1.0)
            score = float(
                np.clip(
                    0.55
                    + 0.4 * math.sqrt(o.area / (scene.width * scene.height) / 0.1)
                    - 0.1 * (err is not None)
                    + rng.normal(0, 0.03),
                    0.05,
                    0.99,
                )
            )
            dets.append(
                {
                    "gt": o.id,
                    "category": category,
                    "colour": colour,
                    "box": [round(v, 2) for v in (bx1, by1, bx2, by2)],
                    "score": round(score, 4),
                    "error": err,
                }
            )
        out.append(dets)
    return out


# ----------------------------------------------------------------------------------------------
# label sources
# ----------------------------------------------------------------------------------------------


def _noun(category: str, rng: np.random.Generator) -> str:
    words = CATEGORIES[category].words
    return str(rng.choice(words[1:])) if len(words) > 1 and rng.random() < 0.3 else words[0]


def _det_obj(d: dict[str, Any], scene: Scene) -> SceneObject:
    gt = scene.objects[d["gt"]]
    return replace(gt, category=d["category"], colour=d["colour"], box=tuple(d["box"]))


def _template_labels(scene: Scene, dets: list[dict], k: dict[str, Any], rng: np.random.Generator) -> list[dict]:
    seen = [d for d in dets if d["error"] != "miss"]
    top = sorted(seen, key=lambda d: -d["score"])[: k["topn"]]
    out = []
    for d in top:
        q = {"category": d["category"], "colour": None, "location": None, "relation": None, "landmark": None}
        out.append(
            {
                "template": "attr_noun",
                "query": {**q, "colour": d["colour"]},
                "det": d,
                "text": f"{d['colour']} {_noun(d['category'], rng)}",
            }
        )
        same = sorted(
            [e for e in seen if e["category"] == d["category"]],
            key=lambda e: ((e["box"][0] + e["box"][2]) / 2, e["gt"]),
        )
        if len(same) >= 2:
            cx = [(e["box"][0] + e["box"][2]) / 2 for e in same]
            if cx[-1] - cx[0] > k["spread"] * scene.width:
                loc = (
                    "left"
                    if same[0] is d
                    else "right"
                    if same[-1] is d
                    else ("middle" if len(same) == 3 and same[1] is d else None)
                )
                if loc is not None:
                    word = "in the middle" if loc == "middle" else f"on the {loc}"
                    out.append(
                        {
                            "template": "noun_location",
                            "query": {**q, "location": loc},
                            "det": d,
                            "text": f"{_noun(d['category'], rng)} {word}",
                        }
                    )
                    out.append(
                        {
                            "template": "attr_noun_location",
                            "query": {**q, "colour": d["colour"], "location": loc},
                            "det": d,
                            "text": f"{d['colour']} {_noun(d['category'], rng)} {word}",
                        }
                    )
    return out


def _flip(rel: str) -> str:
    return {"left": "right", "right": "left", "above": "below", "below": "above", "front": "behind", "behind": "front"}[
        rel
    ]


def _relation_labels(
    scene: Scene, dets: list[dict], conds: dict, mean_w: float, k: dict[str, Any], rng: np.random.Generator
) -> list[dict]:
    seen = [d for d in dets if d["error"] != "miss"]
    out = []
    for s in seen:
        for o in seen:
            if o is s or o["category"] == s["category"]:
                continue
            rels = relation(_det_obj(s, scene), _det_obj(o, scene))
            for rel in rels:
                c = conds[s["gt"]]
                w = _weight(c, k) * (2.0 if c["n_same"] >= 3 else 1.0)
                flipped = rng.random() < min(0.95, k["noise"] * k["relation_flip"] * w / mean_w)
                r = _flip(rel) if flipped else rel
                out.append(
                    {
                        "template": "subject_predicate_object",
                        "det": s,
                        "predicate_flipped": flipped,
                        "query": {
                            "category": s["category"],
                            "colour": None,
                            "location": None,
                            "relation": r,
                            "landmark": o["category"],
                        },
                        "text": f"{_noun(s['category'], rng)} {' '.join(RELATION_WORDS[r])} {_noun(o['category'], rng)}",
                    }
                )
    return out


def _caption_labels(scene: Scene, dets: list[dict], k: dict[str, Any], rng: np.random.Generator) -> list[dict]:
    seen = [d for d in dets if d["error"] != "miss"]
    out = []
    by_score = sorted(seen, key=lambda d: -d["score"])
    for d in by_score[: k["topn"] + 1]:
        # the caption names an entity; its box is the best-scoring detection of that class
        box_det = next(e for e in by_score if e["category"] == d["category"])
        others = [e for e in seen if e["category"] != d["category"]]
        q = {"category": d["category"], "colour": d["colour"], "location": None, "relation": None, "landmark": None}
        noun = _noun(d["category"], rng)
        if others and rng.random() < 0.7:
            e = others[int(rng.integers(len(others)))]
            rels = relation(_det_obj(d, scene), _det_obj(e, scene))
            if rels:
                r = str(rng.choice(rels))
                q = {**q, "relation": r, "landmark": e["category"]}
                text = f"a {d['colour']} {noun} {' '.join(RELATION_WORDS[r])} a {_noun(e['category'], rng)}"
            else:
                text = f"a {d['colour']} {noun} and a {_noun(e['category'], rng)}"
        else:
            text = f"a {d['colour']} {noun} in the {scene.background}"
        out.append({"template": "caption", "det": box_det, "query": q, "text": text})
    return out


def _judge(label: dict, scene: Scene) -> dict[str, Any]:
    ids = resolve(label["query"], scene)
    box = np.asarray([label["det"]["box"]])
    ious = box_iou_np(box, np.asarray([o.box for o in scene.objects]))[0]
    best = int(np.argmax(ious))
    text_ok = len(ids) == 1
    box_ok = text_ok and float(ious[ids[0]]) >= 0.5
    return {
        "correct": bool(text_ok and box_ok),
        "text_unique": text_ok,
        "box_matches_referent": bool(box_ok),
        "referents": ids,
        "box_best_gt": best,
        "box_best_iou": round(float(ious[best]), 4),
    }


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------


def load_label_flags(out: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The analysis flags of a pseudo build, per source, in the order of the ``.pth`` files."""
    path = Path(out) / "analysis" / "pseudo_labels.json"
    if not path.is_file():
        raise FileNotFoundError(f"pseudo-label analysis file not found: {path}")
    return json.loads(path.read_text(encoding="utf-8"))["sources"]


def _detections_entry(image_id: int, img: str, ds: list[dict[str, Any]]) -> dict[str, Any]:
    """One image's record in ``pseudo/detections_train.json``: the detections the labels were built from."""
    return {
        "image_id": image_id,
        "file_name": img,
        "detections": [
            {
                "box": d["box"],
                "class": CATEGORIES[d["category"]].detector,
                "category": d["category"],
                "attribute": d["colour"],
                "score": d["score"],
            }
            for d in ds
            if d["error"] != "miss"
        ],
    }


def _source_labels(
    source: str,
    scene: Scene,
    ds: list[dict[str, Any]],
    conds: dict[int, dict[str, Any]],
    mean_w: float,
    k: dict[str, Any],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """One source's labels for one image, at most ``each_image_query`` of them (a random subset, in order)."""
    if source == "template":
        cands = _template_labels(scene, ds, k, rng)
    elif source == "relation":
        cands = _relation_labels(scene, ds, conds, mean_w, k, rng)
    else:
        cands = _caption_labels(scene, ds, k, rng)
    if len(cands) > k["each_image_query"]:
        keep = sorted(rng.choice(len(cands), size=k["each_image_query"], replace=False).tolist())
        cands = [cands[i] for i in keep]
    return cands


def _label_flags(
    lab: dict[str, Any], image_id: int, scene: Scene, conds: dict[int, dict[str, Any]], ann_of: list[int]
) -> dict[str, Any]:
    """The analysis record of one label: its correctness against the ground truth and its conditions."""
    c = conds[lab["det"]["gt"]]
    j = _judge(lab, scene)
    return {
        "image_id": image_id,
        "text": lab["text"],
        "template": lab["template"],
        **j,
        "referent_ann_ids": [ann_of[i] for i in j["referents"]],
        "box_best_ann_id": ann_of[j["box_best_gt"]],
        "detection_error": lab["det"]["error"],
        "predicate_flipped": lab.get("predicate_flipped", False),
        "small": c["small"],
        "crowded": c["crowded"],
        "n_same_class": c["n_same"],
    }


def _write_pseudo_files(
    out: Path, entries: dict[str, list], flags: dict[str, list], det_json: list[dict[str, Any]]
) -> None:
    """Write the per-source and merged label files, the detections and the analysis flags."""
    root = out / "splits" / "unc"
    (root / "train_separate").mkdir(parents=True, exist_ok=True)
    for s in SOURCES:
        transvg.save_list(entries[s], root / "train_separate" / f"{_FILES[s]}.pth", "unc")
    transvg.save_split([e for s in SOURCES for e in entries[s]], out / "splits", "unc", "train_pseudo")
    (out / "pseudo").mkdir(exist_ok=True)
    write_json(out / "pseudo" / "detections_train.json", {"version": 1, "images": det_json})
    (out / "analysis").mkdir(exist_ok=True)
    write_json(
        out / "analysis" / "pseudo_labels.json",
        {"version": 1, "files": {s: f"splits/unc/train_separate/{_FILES[s]}.pth" for s in SOURCES}, "sources": flags},
    )


def _source_stats(flags: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per source: label count and error rates overall and by condition (small, crowded, same-class count)."""
    per_source = {}
    for s in SOURCES:
        f = flags[s]
        err = lambda sel: round(1.0 - float(np.mean([x["correct"] for x in sel])), 4) if sel else None  # noqa: E731
        per_source[s] = {
            "labels": len(f),
            "error_rate": err(f),
            "error_rate_small": err([x for x in f if x["small"]]),
            "error_rate_not_small": err([x for x in f if not x["small"]]),
            "error_rate_crowded": err([x for x in f if x["crowded"]]),
            "error_rate_not_crowded": err([x for x in f if not x["crowded"]]),
            "error_rate_3plus_same_class": err([x for x in f if x["n_same_class"] >= 3]),
            "error_rate_unique_class": err([x for x in f if x["n_same_class"] == 1]),
        }
    return per_source


def build(out: Path, size: str, seed: int, progress: bool = False, **knobs: Any) -> dict[str, Any]:
    """Write the refexp world (crowded) plus pseudo labels; returns counts, error rates and knobs."""
    k = check_knobs(TASK, knobs, _defaults(size))
    if not 0.0 <= k["noise"] <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {k['noise']}")
    out = Path(out)
    world = refexp.write_world(out, seed, {kk: v for kk, v in k.items()}, progress, task=TASK)
    train = [m for m in world["scenes"] if m["split"] == "train"]
    scenes = [Scene.from_dict(m["scene"]) for m in train]
    dets = _detect(scenes, k, seed)
    conds_all = [_conditions(s, k) for s in scenes]
    mean_w = float(np.mean([_weight(c, k) for cs in conds_all for c in cs.values()])) if scenes else 1.0
    entries: dict[str, list] = {s: [] for s in SOURCES}
    flags: dict[str, list] = {s: [] for s in SOURCES}
    det_json = []
    for m, scene, ds, conds in zip(train, scenes, dets, conds_all):
        image_id = m["image_id"]
        img = refcoco.coco_file_name(image_id)
        det_json.append(_detections_entry(image_id, img, ds))
        for source in SOURCES:
            rng = rng_for(seed, TASK, source, image_id)
            for lab in _source_labels(source, scene, ds, conds, mean_w, k, rng):
                x1, y1, x2, y2 = lab["det"]["box"]
                entries[source].append(transvg.make_entry("unc", img, (x1, y1, x2, y2), lab["text"]))
                flags[source].append(_label_flags(lab, image_id, scene, conds, m["ann_ids"]))
    _write_pseudo_files(out, entries, flags, det_json)
    all_dets = [d for ds in dets for d in ds]
    return {
        **refexp._stats(world),
        "pseudo": {
            "train_images": len(train),
            "detections": len(all_dets),
            "detection_error_rate": round(float(np.mean([d["error"] is not None for d in all_dets])), 4)
            if all_dets
            else None,
            "sources": _source_stats(flags),
        },
        "knobs": k,
    }
