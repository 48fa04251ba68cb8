"""The ``refexp`` task: RefCOCO-style referring expressions, in the refer-API and TransVG/CLIP-VG formats.

Each image holds several objects; most referred targets share their category with one or more
distractors, so an expression must disambiguate by attribute ("the small striped dog"), location
("the leftmost car") or relation to a landmark ("the car left of the tree"). Every expression is
built from the scene's metadata so that it picks out exactly its target (check with the oracle
parser of the tests). Files written under ``out``::

    refcoco/refs(unc).p            refer-API refs (pickle protocol 2), splits train/val/testA/testB
    refcoco/instances.json         COCO-like images / annotations (bbox [x,y,w,h]) / categories
    images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg
    splits/unc/unc_<split>.pth     TransVG/CLIP-VG 5-tuples (img, "<ann_id>.pth", [x,y,w,h], phrase, attrs)
                                   for train, val, trainval, testA, testB
    splits/flickr/flickr_<split>.pth  the same samples as Flickr-style 3-tuples (img, [x1,y1,x2,y2], phrase);
                                   train, val, test (= testA + testB)
    meta/refexp_scenes.json        groundkit metadata: every scene's objects and each sentence's program

testA holds people targets (categories rider, man, woman, child), testB other targets, mirroring
RefCOCO's people / objects test splits; train and val mix both. ``meta/`` is for analysis and
oracles only, never read by a training method.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import refcoco, transvg
from .core import check_knobs, progress_bar, rng_for, write_json
from .scene import (
    CATEGORIES,
    CATEGORY_NAMES,
    RELATION_WORDS,
    Scene,
    SceneKnobs,
    SceneObject,
    relation,
    render_scene,
    sample_scene,
)

__all__ = [
    "build",
    "DEFAULTS",
    "PEOPLE",
    "SIZE_WORDS",
    "LOCATION_WORDS",
    "sample_image",
    "expression_candidates",
    "write_world",
]

TASK = "refexp"
PEOPLE: tuple[str, ...] = tuple(n for n, c in CATEGORIES.items() if c.phrase_type == "people")
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("big", "large")}
# location word -> (axis, extreme): the target is the extreme one of its category along the axis
LOCATION_WORDS: dict[str, tuple[str, str]] = {
    "left": ("x", "min"),
    "leftmost": ("x", "min"),
    "right": ("x", "max"),
    "rightmost": ("x", "max"),
    "top": ("y", "min"),
    "upper": ("y", "min"),
    "bottom": ("y", "max"),
    "lower": ("y", "max"),
}
_LOC_TEMPLATES = {
    "left": ("{np} on the left", "left {np}", "leftmost {np}"),
    "right": ("{np} on the right", "right {np}", "rightmost {np}"),
    "top": ("{np} at the top", "top {np}", "upper {np}"),
    "bottom": ("{np} at the bottom", "bottom {np}", "lower {np}"),
}
_SPLITS = ("train", "val", "testA", "testB")

# size -> defaults; the real RefCOCO (unc) has 19,994 images, 50,000 refs, 142,210 expressions.
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_images=32, width=160, height=120, split_fractions=[0.625, 0.125, 0.125, 0.125]),
    "small": dict(n_images=400, width=256, height=192, split_fractions=[0.7, 0.1, 0.1, 0.1]),
    "medium": dict(n_images=4000, width=320, height=240, split_fractions=[0.85, 0.075, 0.0375, 0.0375]),
    "large": dict(n_images=20000, width=224, height=168, split_fractions=[0.85, 0.075, 0.0375, 0.0375]),
}
_COMMON = dict(
    min_objects=3,  # objects per scene (co-occurring pairs count as two)
    max_objects=7,
    same_category=0.55,  # scene sampler: chance of adding another object of a present category
    distractor_rate=0.9,  # fraction of refs whose target has a same-category distractor (when possible)
    max_refs_per_image=3,
    max_sents_per_ref=3,
    synonym_rate=0.4,  # chance of a caption synonym instead of the canonical noun
    extra_attribute_rate=0.25,  # chance of a true but unnecessary colour word in location/relation expressions
    render_noise=6.0,
    jpeg_quality=90,
    write_images=True,
)


def _defaults(size: str) -> dict[str, Any]:
    if size not in DEFAULTS:
        raise ValueError(f"unknown size {size!r}; sizes: {list(DEFAULTS)}")
    return {**_COMMON, **DEFAULTS[size]}


# ----------------------------------------------------------------------------------------------
# scenes and expressions
# ----------------------------------------------------------------------------------------------


def _dups(scene: Scene) -> dict[str, list[SceneObject]]:
    groups: dict[str, list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault(o.category, []).append(o)
    return groups


def sample_image(rng: np.random.Generator, k: dict[str, Any], split: str, tries: int = 40) -> Scene:
    """A scene for one image; testA scenes contain several people, testB several non-people objects.

    Scenes are redrawn (up to ``tries``) until they offer a target with a same-category distractor
    in the split's category group.
    """
    cats = tuple(CATEGORY_NAMES)
    if split == "testA":
        others = [c for c in CATEGORY_NAMES if c not in PEOPLE]
        cats = PEOPLE + tuple(str(c) for c in rng.choice(others, size=4, replace=False))
    knobs = SceneKnobs(
        width=k["width"],
        height=k["height"],
        min_objects=k["min_objects"],
        max_objects=k["max_objects"],
        same_category=k["same_category"],
        categories=cats,
    )
    scene = None
    for _ in range(tries):
        scene = sample_scene(rng, knobs)
        groups = _dups(scene)
        if any(len(v) > 1 and _in_group(name, split) for name, v in groups.items()):
            return scene
    assert scene is not None
    return scene


def _in_group(category: str, split: str) -> bool:
    if split == "testA":
        return category in PEOPLE
    if split == "testB":
        return category not in PEOPLE
    return True


def _noun(obj: SceneObject, rng: np.random.Generator, synonym_rate: float) -> str:
    words = obj.cat.words
    if len(words) > 1 and rng.random() < synonym_rate:
        return str(rng.choice(words[1:]))
    return words[0]


def _attr_words(obj: SceneObject, attrs: tuple[str, ...], rng: np.random.Generator) -> list[str]:
    out = []
    for a in ("size", "colour", "pattern"):  # fixed English adjective order
        if a not in attrs:
            continue
        if a == "size":
            out.append(str(rng.choice(SIZE_WORDS[obj.size])))
        elif a == "colour":
            out.append(obj.colour)
        else:
            out.append(obj.pattern)
    return out


def _usable_attrs(obj: SceneObject) -> dict[str, str]:
    a = {"colour": obj.colour}
    if obj.size in SIZE_WORDS:
        a["size"] = obj.size
    if obj.pattern != "plain":
        a["pattern"] = obj.pattern
    return a


def _differs(d: SceneObject, t: SceneObject, attr: str) -> bool:
    if attr == "size":  # "small" excludes medium and large distractors, "big" excludes small and medium
        return d.size != t.size
    return getattr(d, attr) != getattr(t, attr)


def expression_candidates(scene: Scene, target: SceneObject, min_gap: float = 0.1) -> list[dict[str, Any]]:
    """Programs that pick out ``target`` alone: dicts ``{"kind", "attrs", "location", "relation", "landmark"}``.

    kinds: ``category`` (no same-category object), ``attribute`` (a minimal set of attributes no
    distractor shares), ``location`` (extreme of its category along x or y, by at least
    ``min_gap`` of the image size), ``relation`` (a spatial relation to a landmark whose category
    is unique, held by no distractor).
    """
    same = [o for o in scene.objects if o.category == target.category and o.id != target.id]
    out: list[dict[str, Any]] = []
    base = {"attrs": [], "location": None, "relation": None, "landmark": None}
    if not same:
        out.append({**base, "kind": "category"})
    usable = _usable_attrs(target)
    subsets = [("colour",), ("size",), ("pattern",), ("size", "colour"), ("colour", "pattern"), ("size", "pattern")]
    found: list[set] = []
    for sub in subsets:
        if not all(a in usable for a in sub):
            continue
        if any(set(f) <= set(sub) for f in found):  # keep minimal sets only
            continue
        if all(any(_differs(d, target, a) for a in sub) for d in same):
            found.append(set(sub))
            out.append({**base, "kind": "attribute", "attrs": list(sub)})
    if same:
        group = same + [target]
        for axis, size in (("x", scene.width), ("y", scene.height)):
            idx = 0 if axis == "x" else 1
            c = sorted((o.center[idx], o.id) for o in group)
            if c[0][1] == target.id and c[1][0] - c[0][0] > min_gap * size:
                out.append({**base, "kind": "location", "location": "left" if axis == "x" else "top"})
            if c[-1][1] == target.id and c[-1][0] - c[-2][0] > min_gap * size:
                out.append({**base, "kind": "location", "location": "right" if axis == "x" else "bottom"})
    counts = {name: len(v) for name, v in _dups(scene).items()}
    for lm in scene.objects:
        if lm.category == target.category or counts[lm.category] != 1:
            continue
        for rel in relation(target, lm):
            if all(rel not in relation(d, lm) for d in same):
                out.append({**base, "kind": "relation", "relation": rel, "landmark": lm.id})
    return out


def _render_text(
    scene: Scene, target: SceneObject, prog: dict[str, Any], rng: np.random.Generator, k: dict[str, Any]
) -> str:
    noun = _noun(target, rng, k["synonym_rate"])
    attrs = tuple(prog["attrs"])
    if prog["kind"] in ("location", "relation") and rng.random() < k["extra_attribute_rate"]:
        attrs = ("colour",)
        prog["extra_attrs"] = ["colour"]
    np_words = _attr_words(target, attrs, rng) + [noun]
    det = "the " if rng.random() < 0.6 else ""
    if prog["kind"] == "location":
        tmpl = str(rng.choice(_LOC_TEMPLATES[prog["location"]]))
        return det + tmpl.format(np=" ".join(np_words))
    if prog["kind"] == "relation":
        lm = scene.objects[prog["landmark"]]
        rel = prog["relation"]
        words = " ".join(RELATION_WORDS[rel])
        if rel in ("left", "right") and rng.random() < 0.5:
            words = f"to the {rel} of"
        lm_np = ([lm.colour] if rng.random() < 0.3 else []) + [_noun(lm, rng, k["synonym_rate"])]
        return f"{det}{' '.join(np_words)} {words} the {' '.join(lm_np)}"
    return det + " ".join(np_words)


def _r_attributes(target: SceneObject, prog: dict[str, Any], text: str) -> list[tuple[str, list[str]]]:
    """The r1..r8 attribute slots of the TransVG tuples (head noun, colour, size, absolute location,
    relative location, generic attribute, related object, other words)."""
    toks = text.split()
    noun = next((t for t in toks if t in target.cat.words), target.cat.words[0])
    colour = [t for t in toks if t == target.colour][:1]
    size = [t for t in toks if any(t in v for v in SIZE_WORDS.values())]
    loc = [t for t in toks if t in LOCATION_WORDS] if prog["kind"] == "location" else []
    rel = list(RELATION_WORDS[prog["relation"]]) if prog["kind"] == "relation" else []
    pattern = [t for t in toks if t == target.pattern and t != "plain"]
    lm = []
    if prog["kind"] == "relation":
        lm = [toks[-1]]
    used = set([noun] + colour + size + loc + rel + pattern + lm + ["the", "to", "on", "at"])
    other = [t for t in toks if t not in used]
    return [
        ("r1", [noun]),
        ("r2", colour),
        ("r3", size),
        ("r4", loc),
        ("r5", rel),
        ("r6", pattern),
        ("r7", lm),
        ("r8", other),
    ]


def _choose_targets(scene: Scene, split: str, rng: np.random.Generator, k: dict[str, Any]) -> list[SceneObject]:
    groups = _dups(scene)
    eligible = [o for o in scene.objects if _in_group(o.category, split)]
    with_d = [o for o in eligible if len(groups[o.category]) > 1]
    without = [o for o in eligible if len(groups[o.category]) == 1]
    n = int(rng.integers(1, k["max_refs_per_image"] + 1))
    chosen: list[SceneObject] = []
    for _ in range(n):
        pool = with_d if (with_d and (rng.random() < k["distractor_rate"] or not without)) else without
        pool = [o for o in pool if o not in chosen]
        if not pool:
            pool = [o for o in eligible if o not in chosen]
            if not pool:
                break
        chosen.append(pool[int(rng.integers(len(pool)))])
    return chosen


def _split_of(n: int, fractions: list[float], seed: int) -> list[str]:
    if len(fractions) != 4 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"split_fractions must be 4 non-negative numbers (train, val, testA, testB) summing to 1, got {fractions}"
        )
    counts = [int(round(f * n)) for f in fractions[1:]]
    train = n - sum(counts)
    labels = ["train"] * train + ["val"] * counts[0] + ["testA"] * counts[1] + ["testB"] * counts[2]
    order = rng_for(seed, TASK, "split").permutation(n)
    out = [""] * n
    for pos, i in enumerate(order):
        out[int(i)] = labels[pos]
    return out


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _image_entry(image_id: int, fname: str, scene: Scene) -> dict[str, Any]:
    """The COCO ``images`` entry of one image."""
    return {
        "id": image_id,
        "file_name": fname,
        "height": scene.height,
        "width": scene.width,
        "license": 0,
        "coco_url": "",
        "flickr_url": "",
        "date_captured": "",
    }


def _object_annotations(
    scene: Scene, image_id: int, first_ann_id: int, cat_ids: dict[str, int]
) -> list[dict[str, Any]]:
    """The COCO ``annotations`` of one image's objects, in object order, with ids from ``first_ann_id``."""
    anns = []
    for n, o in enumerate(scene.objects):
        x1, y1, x2, y2 = o.box
        w, h = round(x2 - x1, 2), round(y2 - y1, 2)
        anns.append(
            {
                "id": first_ann_id + n,
                "image_id": image_id,
                "category_id": cat_ids[o.category],
                "bbox": [round(x1, 2), round(y1, 2), w, h],
                "area": round(w * h, 2),
                "iscrowd": 0,
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
            }
        )
    return anns


def _ref_sentences(
    scene: Scene,
    target: SceneObject,
    cands: list[dict[str, Any]],
    ref_id: int,
    first_sent_id: int,
    rng: np.random.Generator,
    k: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Up to ``max_sents_per_ref`` distinct expressions of one ref, drawn from its candidate programs;
    returns the refer-API sentences and their metadata (program, TransVG attribute slots)."""
    n_s = int(rng.integers(1, k["max_sents_per_ref"] + 1))
    order = rng.permutation(len(cands))
    sentences, sent_meta, seen = [], [], set()
    for j in order:
        if len(sentences) >= n_s:
            break
        prog = dict(cands[int(j)])
        text = _render_text(scene, target, prog, rng, k)
        if text in seen:
            continue
        seen.add(text)
        sent_id = first_sent_id + len(sentences)
        raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text
        sentences.append({"tokens": text.split(), "raw": raw, "sent_id": sent_id, "sent": text})
        sent_meta.append(
            {
                "sent_id": sent_id,
                "ref_id": ref_id,
                "target": target.id,
                "program": prog,
                "r_attrs": _r_attributes(target, prog, text),
            }
        )
    return sentences, sent_meta


def _image_refs(
    scene: Scene,
    split: str,
    image_id: int,
    obj_ann: dict[int, int],
    first_ids: tuple[int, int],
    rng: np.random.Generator,
    k: dict[str, Any],
    cat_ids: dict[str, int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The refs of one image (targets chosen for its split), numbered from ``first_ids`` = (ref id, sentence id);
    returns the refer-API refs and their sentences' metadata."""
    ref_id, sent_id = first_ids
    refs, sent_meta = [], []
    for t in _choose_targets(scene, split, rng, k):
        cands = expression_candidates(scene, t)
        if not cands:
            continue
        sentences, meta = _ref_sentences(scene, t, cands, ref_id, sent_id, rng, k)
        sent_meta += meta
        sent_id += len(sentences)
        refs.append(
            {
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": f"COCO_train2014_{image_id:012d}_{obj_ann[t.id]}.jpg",
                "ann_id": obj_ann[t.id],
                "ref_id": ref_id,
                "image_id": image_id,
                "split": split,
                "sentences": sentences,
                "category_id": cat_ids[t.category],
            }
        )
        ref_id += 1
    return refs, sent_meta


def write_world(
    out: Path,
    seed: int,
    k: dict[str, Any],
    progress: bool = False,
    task: str = TASK,
) -> dict[str, Any]:
    """Sample, render and write the refexp world under ``out``; returns the in-memory records.

    Shared with the ``pseudo`` task (which adds pseudo labels on the same kind of images).
    Returns ``{"images": [...], "refs": [...], "scenes": {...}, "cat_ids": {...}}``.
    """
    out = Path(out)
    img_dir = out / refcoco.IMAGE_SUBDIR
    img_dir.mkdir(parents=True, exist_ok=True)
    splits = _split_of(k["n_images"], list(k["split_fractions"]), seed)
    cat_ids = {name: i + 1 for i, name in enumerate(CATEGORY_NAMES)}
    images, anns, refs, scenes_meta = [], [], [], []
    n_sents = 0
    for i in progress_bar(range(k["n_images"]), total=k["n_images"], desc=f"{task} images", enabled=progress):
        rng = rng_for(seed, task, "image", i)
        split = splits[i]
        scene = sample_image(rng, k, split)
        image_id = i + 1
        fname = refcoco.coco_file_name(image_id)
        if k["write_images"]:
            img = render_scene(scene, rng, noise=k["render_noise"])
            img.save(img_dir / fname, format="JPEG", quality=k["jpeg_quality"])
        images.append(_image_entry(image_id, fname, scene))
        obj_anns = _object_annotations(scene, image_id, len(anns) + 1, cat_ids)
        anns += obj_anns
        obj_ann = {o.id: a["id"] for o, a in zip(scene.objects, obj_anns)}
        img_refs, sent_meta = _image_refs(scene, split, image_id, obj_ann, (len(refs), n_sents), rng, k, cat_ids)
        refs += img_refs
        n_sents += len(sent_meta)
        scenes_meta.append(
            {
                "image_id": image_id,
                "split": split,
                "scene": scene.to_dict(),
                "ann_ids": [obj_ann[o.id] for o in scene.objects],
                "sentences": sent_meta,
            }
        )
    _write_annotations(out, task, images, anns, refs, scenes_meta, cat_ids)
    return {"images": images, "refs": refs, "scenes": scenes_meta, "cat_ids": cat_ids, "anns": anns}


def _write_annotations(
    out: Path,
    task: str,
    images: list[dict],
    anns: list[dict],
    refs: list[dict],
    scenes_meta: list[dict],
    cat_ids: dict[str, int],
) -> None:
    """Write the refer-API refs and instances, the scene metadata and the TransVG / Flickr-style splits."""
    instances = {
        "images": images,
        "annotations": anns,
        "categories": [
            {"id": cat_ids[n], "name": n, "supercategory": CATEGORIES[n].phrase_type} for n in CATEGORY_NAMES
        ],
    }
    refcoco.save_refs_pickle(refs, refcoco.refs_path(out, "refcoco", "unc"))
    refcoco.save_instances(instances, out / "refcoco" / "instances.json")
    (out / "meta").mkdir(exist_ok=True)
    write_json(out / "meta" / f"{task}_scenes.json", {"version": 1, "images": scenes_meta})
    _write_transvg(out, refs, anns, scenes_meta)


def _write_transvg(out: Path, refs: list[dict], anns: list[dict], scenes_meta: list[dict]) -> None:
    ann_by_id = {a["id"]: a for a in anns}
    r_by_sent = {s["sent_id"]: s["r_attrs"] for m in scenes_meta for s in m["sentences"]}
    per: dict[str, list] = {s: [] for s in _SPLITS}
    per_f: dict[str, list] = {s: [] for s in _SPLITS}
    for ref in refs:
        a = ann_by_id[ref["ann_id"]]
        x, y, w, h = a["bbox"]
        img = refcoco.coco_file_name(ref["image_id"])
        for s in ref["sentences"]:
            attrs = [(slot, list(words)) for slot, words in r_by_sent[s["sent_id"]]]
            per[ref["split"]].append(
                transvg.make_entry("unc", img, (x, y, x + w, y + h), s["sent"], f"{ref['ann_id']}.pth", attrs)
            )
            per_f[ref["split"]].append(transvg.make_entry("flickr", img, (x, y, x + w, y + h), s["sent"]))
    root = out / "splits"
    for s in _SPLITS:
        transvg.save_split(per[s], root, "unc", s)
    transvg.save_split(per["train"] + per["val"], root, "unc", "trainval")
    transvg.save_split(per_f["train"], root, "flickr", "train")
    transvg.save_split(per_f["val"], root, "flickr", "val")
    transvg.save_split(per_f["testA"] + per_f["testB"], root, "flickr", "test")


def _stats(world: dict[str, Any]) -> dict[str, Any]:
    refs = world["refs"]
    by_split: dict[str, dict[str, int]] = {}
    img_split = {m["image_id"]: m["split"] for m in world["scenes"]}
    floors: dict[str, tuple[list, list]] = {s: ([], []) for s in _SPLITS}
    for m in world["scenes"]:
        objs = m["scene"]["objects"]
        for sm in m["sentences"]:
            cat = objs[sm["target"]]["category"]
            floors[m["split"]][0].append(1.0 / len(objs))
            floors[m["split"]][1].append(1.0 / sum(o["category"] == cat for o in objs))
    for s in _SPLITS:
        by_split[s] = {
            "images": sum(1 for v in img_split.values() if v == s),
            "refs": sum(1 for r in refs if r["split"] == s),
            "sentences": sum(len(r["sentences"]) for r in refs if r["split"] == s),
            # expected accuracy of a random object (chance) and of a random object of the
            # right category (category oracle); the expression oracle is 1.0 by construction
            "chance": round(float(np.mean(floors[s][0])), 4) if floors[s][0] else None,
            "category_oracle": round(float(np.mean(floors[s][1])), 4) if floors[s][1] else None,
        }
    kinds: dict[str, int] = {}
    with_distractor = 0
    for m in world["scenes"]:
        cats = [o["category"] for o in m["scene"]["objects"]]
        for s in m["sentences"]:
            kinds[s["program"]["kind"]] = kinds.get(s["program"]["kind"], 0) + 1
        for r in {s["target"] for s in m["sentences"]}:
            with_distractor += cats.count(m["scene"]["objects"][r]["category"]) > 1
    n_refs = len(refs)
    return {
        "images": len(world["images"]),
        "objects": len(world["anns"]),
        "refs": n_refs,
        "sentences": sum(len(r["sentences"]) for r in refs),
        "splits": by_split,
        "expression_kinds": kinds,
        "refs_with_same_category_distractor": round(with_distractor / max(n_refs, 1), 4),
    }


def build(out: Path, size: str, seed: int, progress: bool = False, **knobs: Any) -> dict[str, Any]:
    """Write the refexp world (see the module docstring) and return counts and knobs for the manifest."""
    k = check_knobs(TASK, knobs, _defaults(size))
    world = write_world(Path(out), seed, k, progress)
    return {**_stats(world), "knobs": k}
