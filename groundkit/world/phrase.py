"""The ``phrase`` task: weakly supervised phrase grounding with a detector to distil from.

Writes, for train/val/test, the Wang et al. (CVPR 2021) HDF5 trio and its side files:

* ``region_features_<split>.hdf5``: ``<image id>`` -> float32 ``[N, D + (C+1) + 4]`` = region
  feature (EfficientNet-Lite0 + RoIAlign, D = 1280), detector logits with background in column 0,
  box x1,y1,x2,y2 in pixels; proposals sorted by detector confidence.
* ``phrase_features_<split>.hdf5``: ``<image id>`` -> bytes ``[5, P, 10]`` tokens ("" = padding,
  P >= 16, phrases with a box first in each sentence) and ``<image id>_gt`` -> float32 ``[5, P, 4]``
  (one box per phrase, the enclosing box for plurals, zeros = no box).
* ``glove.hdf5`` (token -> float32[50]), ``phrase_to_label.json`` (phrase -> detector class, made
  by GloVe similarity of the head noun, as users of the method would; some are wrong) and
  ``matching_matrix.hdf5`` (``phrases`` [M], ``classes`` [C], ``scores`` [M, C]: those cosines),
  ``detector_classes.txt`` (background first).

and the same images in the Flickr30K Entities layout under ``flickr30k_entities/`` (``Sentences``,
``Annotations``, ``flickr30k-images``, ``train.txt``/``val.txt``/``test.txt``), plus
``meta/scenes.jsonl`` (scene, proposal sources) for oracles and tests. Difficulties (knobs):
co-occurring categories, part boxes among the proposals, caption words that differ from detector
class names, a confusable and noisy detector, plural phrases with enclosing-box ground truth and
phrases without a box. See docs/benchmark_world.md.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, ImageDraw

from ..backbones import FEATURE_DIM, region_features
from ..distributed import float_fingerprint
from ..formats import flickr30k_entities as F
from ..formats.wang21_hdf5 import write_matching_matrix
from ..text import GLOVE_PACKAGE, glove_vectors, load_word_vectors, match_phrases
from . import scene as S
from .core import check_knobs, progress_bar, rng_for, write_json

__all__ = [
    "build",
    "DEFAULTS",
    "SPLIT_SIZES",
    "ImageRecord",
    "make_image",
    "teacher_stats",
    "phrase_to_label",
    "phrase_matching",
]

MAX_TOKENS = 10
MIN_PHRASES = 16  # the official training code needs P >= 16
N_SENTENCES = 5
SPLITS = ("train", "val", "test")

SPLIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (24, 4, 4),
    "small": (300, 50, 50),
    "medium": (2400, 300, 300),
    "large": (29783, 1000, 1000),  # Flickr30K Entities' split sizes
}

DEFAULTS: dict[str, Any] = {
    "n_images": 0,  # 0: the size's default; else train = 80 %, val = test = 10 %
    "n_proposals": 30,
    "cooccurrence": 0.8,
    "part_rate": 0.3,
    "clutter": 0.25,
    "miss_rate": 0.05,
    "group_rate": 0.4,
    "confusion": 0.2,
    "teacher_noise": 1.0,
    "synonym_rate": 0.5,
    "plural_rate": 0.4,
    "nobox_rate": 0.5,
    "same_category": 0.3,
    "min_objects": 2,
    "max_objects": 5,
    "detector": "world",  # "world" (41 classes, Open Images-like names) or "coco" (80)
    "features": "auto",  # "backbone" (render + EfficientNet), "prototype" (no pixels), auto: prototype for large
    "images": None,  # write the JPEGs: true / false; unset (None): all sizes but large
    "reference_images": 160,
    "backbone_input": [320, 224],
    "width": 320,
    "height": 240,
    "jpeg_quality": 90,
}

_SCENE_PHRASES: dict[str, list[tuple[str, list[str]]]] = {
    "park": [("in", ["a", "park"]), ("on", ["the", "grass"])],
    "street": [("on", ["the", "street"]), ("on", ["a", "road"])],
    "beach": [("on", ["the", "beach"]), ("by", ["the", "sea"])],
    "room": [("in", ["a", "room"]), ("on", ["the", "floor"])],
    "field": [("in", ["a", "field"]), ("in", ["a", "meadow"])],
    "snow": [("in", ["the", "snow"]), ("on", ["a", "hill"])],
}
_NOTVISUAL = [("on", ["a", "sunny", "day"]), ("in", ["the", "afternoon"]), ("in", ["the", "sunshine"])]
_REL_FALLBACK = [["near"], ["next", "to"], ["beside"]]


@dataclass
class Entity:
    """A Flickr30K Entities entity: objects it refers to (empty for scene / no-box entities)."""

    id: int
    objects: list[int]
    type: str
    kind: str  # "box" | "scene" | "nobox"


@dataclass
class ImageRecord:
    """Everything generated for one image."""

    id: str
    split: str
    scene: S.Scene
    entities: list[Entity]
    sentences: list[list[tuple[list[str], int | None]]]  # segments: (tokens, entity id or None)
    boxes: np.ndarray  # [N, 4] proposals
    source: np.ndarray  # [N] object id the proposal was made from, -1 clutter, -2 group box
    kind: np.ndarray  # [N] 0 whole, 1 part, 2 clutter, 3 group
    logits: np.ndarray  # [N, C+1]
    confused: dict[int, str] = field(default_factory=dict)  # object id -> class the detector says

    def entity(self, eid: int) -> Entity:
        return next(e for e in self.entities if e.id == eid)

    def entity_box(self, eid: int) -> tuple[float, float, float, float] | None:
        e = self.entity(eid)
        if e.kind != "box":
            return None
        return S.enclosing_box(self.scene.objects[o].box for o in e.objects)

    def phrases(self) -> list[list[tuple[list[str], int]]]:
        """Per sentence, the (tokens, entity id) of its phrases, boxed phrases first."""
        out = []
        for sent in self.sentences:
            ph = [(t, e) for t, e in sent if e is not None]
            boxed = [p for p in ph if self.entity(p[1]).kind == "box"]
            rest = [p for p in ph if self.entity(p[1]).kind != "box"]
            out.append(boxed + rest)
        return out


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------


def _captions(
    scene: S.Scene, rng: np.random.Generator, k: dict[str, Any]
) -> tuple[list[Entity], list[list[tuple[list[str], int | None]]]]:
    entities: list[Entity] = []
    for o in scene.objects:
        entities.append(Entity(len(entities) + 1, [o.id], o.cat.phrase_type, "box"))
    by_cat: dict[str, list[int]] = {}
    for o in scene.objects:
        by_cat.setdefault(o.category, []).append(o.id)
    groups = {c: ids for c, ids in by_cat.items() if len(ids) >= 2}
    group_eid = {}
    for c, ids in groups.items():
        entities.append(Entity(len(entities) + 1, list(ids), S.CATEGORIES[c].phrase_type, "box"))
        group_eid[c] = entities[-1].id
    scene_eids: dict[str, int] = {}
    notvisual_eids: dict[str, int] = {}

    def single_np(o: S.SceneObject) -> list[str]:
        sibs = [scene.objects[i] for i in by_cat[o.category] if i != o.id]
        need_colour = any(s.colour != o.colour for s in sibs)
        return S.noun_phrase(o, rng, synonym_rate=k["synonym_rate"], colour_rate=1.0 if need_colour else 0.5)

    def group_np(c: str) -> list[str]:
        ids = groups[c]
        cat = S.CATEGORIES[c]
        noun = (
            cat.plurals[0]
            if (len(cat.words) == 1 or rng.random() >= k["synonym_rate"])
            else str(rng.choice(cat.plurals[1:]))
        )
        det = str(rng.choice([S.count_word(len(ids)), S.count_word(len(ids)), "the", "some"]))
        cols = {scene.objects[i].colour for i in ids}
        toks = [det] + ([next(iter(cols))] if len(cols) == 1 and rng.random() < 0.5 else []) + [noun]
        return toks

    sentences = []
    for _ in range(N_SENTENCES):
        # referents: a plural group replaces its members at plural_rate
        refs: list[tuple[str, Any]] = []
        for c, ids in by_cat.items():
            if c in groups and rng.random() < k["plural_rate"]:
                refs.append(("group", c))
            else:
                refs.extend(("single", i) for i in ids)
        order = rng.permutation(len(refs))
        n_ref = int(rng.integers(1, min(3, len(refs)) + 1))
        chosen = [refs[i] for i in order[:n_ref]]
        segs: list[tuple[list[str], int | None]] = []

        def seg_for(ref: tuple[str, Any]) -> tuple[list[str], int, bool]:
            if ref[0] == "group":
                return group_np(ref[1]), group_eid[ref[1]], True
            o = scene.objects[ref[1]]
            return single_np(o), o.id + 1, False

        t1, e1, pl1 = seg_for(chosen[0])
        if len(chosen) >= 2 and rng.random() < 0.7:
            t2, e2, _ = seg_for(chosen[1])
            rel_words = None
            if chosen[0][0] == "single" and chosen[1][0] == "single":
                rels = S.relation(scene.objects[chosen[0][1]], scene.objects[chosen[1][1]])
                if rels:
                    rel_words = list(S.RELATION_WORDS[str(rng.choice(rels))])
            if rel_words is None:
                rel_words = list(_REL_FALLBACK[int(rng.integers(len(_REL_FALLBACK)))])
            verb = ["are"] if pl1 else [str(rng.choice(["is", "sits", "stands"]))]
            segs += [(t1, e1), (verb + rel_words, None), (t2, e2)]
            if len(chosen) == 3:
                t3, e3, _ = seg_for(chosen[2])
                segs += [(["and"], None), (t3, e3)]
        else:
            segs.append((t1, e1))
            for ref in chosen[1:]:
                t, e, _ = seg_for(ref)
                segs += [(["and"], None), (t, e)]
            plural = pl1 or len(chosen) > 1
            segs.append((["are"] if plural else [str(rng.choice(["is", "sits", "stands"]))], None))
        if rng.random() < k["nobox_rate"]:
            prep, words = _SCENE_PHRASES[scene.background][int(rng.integers(2))]
            key = " ".join(words[1:])
            if key not in scene_eids:
                entities.append(Entity(len(entities) + 1, [], "scene", "scene"))
                scene_eids[key] = entities[-1].id
            segs += [([prep], None), (list(words), scene_eids[key])]
        else:
            segs.append((["outside"] if scene.background != "room" else ["inside"], None))
        if rng.random() < k["nobox_rate"] * 0.3:
            prep, words = _NOTVISUAL[int(rng.integers(len(_NOTVISUAL)))]
            key = " ".join(words)
            if key not in notvisual_eids:
                entities.append(Entity(len(entities) + 1, [], "notvisual", "nobox"))
                notvisual_eids[key] = entities[-1].id
            segs += [([prep], None), (list(words), notvisual_eids[key])]
        segs.append((["."], None))
        sentences.append(segs)
    return entities, sentences


# ----------------------------------------------------------------------------------------------
# proposals and the detector
# ----------------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, box: tuple, scale: float, w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    d = rng.normal(0, scale, 4) * np.array([bw, bh, bw, bh])
    b = [x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3]]
    return list(S._clip_box(b, w, h))


def _part(rng: np.random.Generator, box: tuple, w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    fw, fh = rng.uniform(0.3, 0.65), rng.uniform(0.3, 0.65)
    if rng.random() < 0.5:  # the top (head) part: the usual "discriminative part"
        px = x1 + rng.uniform(0, 1 - fw) * bw
        py = y1 + rng.uniform(0, 0.15) * bh
    else:
        px = x1 + rng.uniform(0, 1 - fw) * bw
        py = y1 + rng.uniform(0, 1 - fh) * bh
    return list(S._clip_box((px, py, px + fw * bw, py + fh * bh), w, h))


def _proposals(
    scene: S.Scene, rng: np.random.Generator, k: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w, h = scene.width, scene.height
    n = int(k["n_proposals"])
    objs = scene.objects
    boxes: list[list[float]] = []
    source: list[int] = []
    kind: list[int] = []
    by_cat: dict[str, list[int]] = {}
    for o in objs:
        by_cat.setdefault(o.category, []).append(o.id)
    for ids in by_cat.values():  # group (enclosing) boxes, as detectors sometimes output
        if len(ids) >= 2 and rng.random() < k["group_rate"]:
            boxes.append(_jitter(rng, S.enclosing_box(objs[i].box for i in ids), 0.05, w, h))
            source.append(-2)
            kind.append(3)
    n_clutter = int(round(k["clutter"] * n))
    n_obj = max(0, n - n_clutter - len(boxes))
    missed = {o.id for o in objs if rng.random() < k["miss_rate"]}
    order = list(rng.permutation(len(objs))) if objs else []
    for j in range(n_obj):
        if not objs:
            break
        o = objs[order[j % len(objs)]]
        first_round = j < len(objs)
        if (first_round or rng.random() >= k["part_rate"]) and o.id not in missed:
            scale = 0.06 if rng.random() < 0.6 else 0.13
            boxes.append(_jitter(rng, o.box, scale, w, h))
            kind.append(0)
        else:
            boxes.append(_part(rng, o.box, w, h))
            kind.append(1)
        source.append(o.id)
    while len(boxes) < n:  # clutter: object-sized boxes anywhere
        bw = rng.uniform(0.08, 0.45) * w
        bh = rng.uniform(0.08, 0.45) * h
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes.append(list(S._clip_box((x1, y1, x1 + bw, y1 + bh), w, h)))
        source.append(-1)
        kind.append(2)
    return (
        np.asarray(boxes[:n], dtype=np.float32),
        np.asarray(source[:n], dtype=np.int64),
        np.asarray(kind[:n], dtype=np.int64),
    )


def _detector(
    scene: S.Scene, boxes: np.ndarray, rng: np.random.Generator, k: dict[str, Any], classes: list[str]
) -> tuple[np.ndarray, dict[int, str]]:
    """Class logits [N, C+1] (background first) of a plausible, imperfect detector.

    Class evidence grows with how much of the proposal the object fills and with its IoU (so part
    boxes get some, whole boxes most); a ``confusion`` fraction of objects is seen as a confusable
    class (the true class second); Gaussian ``teacher_noise`` on everything.
    """
    C = len(classes)
    col = {c: i + 1 for i, c in enumerate(classes)}
    vocab = k["detector"]
    noise = float(k["teacher_noise"])
    N = len(boxes)
    logits = rng.normal(-1.0, 0.5 * noise, (N, C + 1)).astype(np.float64)
    logits[:, 0] = 2.5 + rng.normal(0, 0.3 * noise, N)
    objs = scene.objects
    confused: dict[int, str] = {}
    said: dict[int, tuple[int | None, int | None]] = {}
    for o in objs:
        true = S.detector_class(o.category, vocab)
        cands = [S.detector_class(c, vocab) for c in S.CONFUSABLE.get(o.category, ())]
        cands = [c for c in cands if c is not None and c != true]
        if cands and rng.random() < k["confusion"]:
            wrong = str(rng.choice(cands))
            confused[o.id] = wrong
            said[o.id] = (col[wrong], col[true] if true else None)
        elif true is None:  # the detector has no class for it: weak evidence for a near class
            said[o.id] = (col[cands[0]] if cands else None, None)
        else:
            said[o.id] = (col[true], None)
    if objs and N:
        ob = np.asarray([o.box for o in objs], dtype=np.float64)
        iou = S.box_iou_np(boxes, ob)  # [N, O]
        lt = np.maximum(boxes[:, None, :2], ob[None, :, :2])
        rb = np.minimum(boxes[:, None, 2:], ob[None, :, 2:])
        inter = np.clip(rb - lt, 0, None).prod(-1)
        area = np.clip(boxes[:, 2] - boxes[:, 0], 1e-6, None) * np.clip(boxes[:, 3] - boxes[:, 1], 1e-6, None)
        cov = inter / area[:, None]
        for r in range(N):
            # evidence from every object the proposal covers (a group box sees several)
            score = cov[r] * (0.35 + 0.65 * iou[r])
            for oi in np.nonzero(score > 0.05)[0]:
                main, second = said[int(oi)]
                ev = 4.5 * score[oi] + rng.normal(0, noise)
                if objs[oi].category in S.CATEGORIES and S.detector_class(objs[oi].category, vocab) is None:
                    ev *= 0.5
                if main is not None:
                    logits[r, main] = max(logits[r, main], -1.0 + ev)
                if second is not None:
                    logits[r, second] = max(logits[r, second], -1.0 + 0.7 * ev)
            logits[r, 0] = 2.5 - 3.0 * float(iou[r].max()) + rng.normal(0, 0.3 * noise)
    return logits.astype(np.float32), confused


def _sort_by_confidence(boxes, source, kind, logits):
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf = p[:, 1:].max(1)
    order = np.argsort(-conf, kind="stable")
    return boxes[order], source[order], kind[order], logits[order]


def make_image(index: int, image_id: str, split: str, seed: int, k: dict[str, Any], classes: list[str]) -> ImageRecord:
    """Scene, captions, proposals and detector output of one image (deterministic in seed, index)."""
    knobs = S.SceneKnobs(
        width=k["width"],
        height=k["height"],
        min_objects=k["min_objects"],
        max_objects=k["max_objects"],
        cooccurrence=k["cooccurrence"],
        same_category=k["same_category"],
    )
    scene = S.sample_scene(rng_for(seed, "phrase", "scene", index), knobs)
    entities, sentences = _captions(scene, rng_for(seed, "phrase", "captions", index), k)
    rng = rng_for(seed, "phrase", "detector", index)
    boxes, source, kind = _proposals(scene, rng, k)
    logits, confused = _detector(scene, boxes, rng, k, classes)
    boxes, source, kind, logits = _sort_by_confidence(boxes, source, kind, logits)
    return ImageRecord(image_id, split, scene, entities, sentences, boxes, source, kind, logits, confused)


# ----------------------------------------------------------------------------------------------
# phrase -> detector class, and the figures that bound a method
# ----------------------------------------------------------------------------------------------


def phrase_matching(phrases: list[str], classes: list[str]) -> tuple[dict[str, str], np.ndarray]:
    """Soft phrase x class matching and the hard map made from it (:func:`groundkit.text.match_phrases`
    over all of GloVe 6B 50-d). With 50-d GloVe many matches are wrong, as with real detectors."""
    return match_phrases(phrases, classes, glove_vectors())


def phrase_to_label(phrases: list[str], classes: list[str]) -> dict[str, str]:
    """The hard phrase -> detector class map of :func:`phrase_matching`."""
    return phrase_matching(phrases, classes)[0]


def teacher_stats(
    records: list[ImageRecord], p2l: dict[str, str], classes: list[str], iou_thresh: float = 0.5
) -> dict[str, float]:
    """R@1 of the detector teacher, of a category oracle and of chance, and the proposal upper bound.

    Over phrases with a box; a hit is IoU > ``iou_thresh`` with the (enclosing) GT box. Teacher:
    the proposal with the highest softmax probability of the phrase's mapped class. Category
    oracle: among proposals made from an object of the phrase's true category (whole or part),
    the one with the largest box (knows the category, not the extent). Chance: expected R@1 of a
    uniformly random proposal. Upper bound: any proposal hits.
    """
    col = {c: i + 1 for i, c in enumerate(classes)}
    n = teacher = oracle = chance = upper = mapped_ok = mapped = 0.0
    for rec in records:
        z = rec.logits - rec.logits.max(1, keepdims=True)
        prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        areas = (rec.boxes[:, 2] - rec.boxes[:, 0]) * (rec.boxes[:, 3] - rec.boxes[:, 1])
        src_cat = np.array([rec.scene.objects[s].category if s >= 0 else "" for s in rec.source])
        for sent in rec.phrases():
            for toks, eid in sent:
                gt = rec.entity_box(eid)
                if gt is None:
                    continue
                hits = S.box_iou_np(rec.boxes, np.array([gt]))[:, 0] > iou_thresh
                n += 1
                upper += float(hits.any())
                chance += float(hits.mean())
                phrase = " ".join(toks[:MAX_TOKENS])
                cat = rec.scene.objects[rec.entity(eid).objects[0]].category
                label = p2l.get(phrase)
                if label is not None:
                    teacher += float(hits[int(np.argmax(prob[:, col[label]]))])
                    mapped += 1
                    mapped_ok += float(label == S.detector_class(cat, _vocab_of(classes)))
                cand = np.nonzero(src_cat == cat)[0]
                if len(cand):
                    oracle += float(hits[cand[int(np.argmax(areas[cand]))]])
    d = max(n, 1.0)
    return {
        "phrases_with_box": int(n),
        "teacher_r1": round(teacher / d, 4),
        "category_oracle_r1": round(oracle / d, 4),
        "chance_r1": round(chance / d, 4),
        "upper_bound": round(upper / d, 4),
        "label_map_accuracy": round(mapped_ok / max(mapped, 1.0), 4),
    }


def _vocab_of(classes: list[str]) -> str:
    return "coco" if classes == S.COCO_CLASSES else "world"


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------


def _phrase_arrays(rec: ImageRecord, P: int) -> tuple[np.ndarray, np.ndarray]:
    toks = np.zeros((N_SENTENCES, P, MAX_TOKENS), dtype="S24")
    gt = np.zeros((N_SENTENCES, P, 4), dtype=np.float32)
    for s, sent in enumerate(rec.phrases()):
        for p, (words, eid) in enumerate(sent[:P]):
            for t, w in enumerate(words[:MAX_TOKENS]):
                toks[s, p, t] = w.encode()
            box = rec.entity_box(eid)
            if box is not None:
                gt[s, p] = box
    return toks, gt


def _sentence_markup(rec: ImageRecord, sent: list[tuple[list[str], int | None]]) -> str:
    parts = []
    for i, (words, eid) in enumerate(sent):
        ws = list(words)
        if i == 0:
            ws[0] = ws[0][0].upper() + ws[0][1:]
        if eid is None:
            parts.append(" ".join(ws))
        else:
            e = rec.entity(eid)
            parts.append(f"[/EN#{eid}/{e.type} {' '.join(ws)}]")
    return " ".join(parts)


def _annotation_xml(rec: ImageRecord) -> str:
    sc = rec.scene
    lines = [
        "<annotation>",
        f"\t<filename>{rec.id}.jpg</filename>",
        "\t<size>",
        f"\t\t<width>{sc.width}</width>",
        f"\t\t<height>{sc.height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
    ]
    used = {e for sent in rec.sentences for _, e in sent if e is not None}
    # one <object> per object box, named by every entity (single or plural) that refers to it
    for o in sc.objects:
        names = [e.id for e in rec.entities if e.kind == "box" and o.id in e.objects and e.id in used]
        if not names:
            continue
        x1, y1, x2, y2 = (int(round(v)) + 1 for v in o.box)  # 1-based pixels, as the release
        lines.append("\t<object>")
        lines += [f"\t\t<name>{n}</name>" for n in names]
        lines += [
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x1}</xmin>",
            f"\t\t\t<ymin>{y1}</ymin>",
            f"\t\t\t<xmax>{x2}</xmax>",
            f"\t\t\t<ymax>{y2}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    for e in rec.entities:
        if e.kind != "box" and e.id in used:
            lines += [
                "\t<object>",
                f"\t\t<name>{e.id}</name>",
                f"\t\t<scene>{int(e.kind == 'scene')}</scene>",
                f"\t\t<nobndbox>{int(e.kind == 'nobox')}</nobndbox>",
                "\t</object>",
            ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _h5(f: h5py.File, name: str, data: np.ndarray) -> None:
    f.create_dataset(name, data=data, track_times=False)


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------


def _render(rec: ImageRecord, seed: int, index: int):
    return S.render_scene(rec.scene, rng_for(seed, "phrase", "render", index))


def _reference_pool(
    seed: int, k: dict[str, Any], classes: list[str], progress: bool
) -> dict[tuple[str, int], np.ndarray]:
    """Real backbone features of a rendered reference set, pooled by (category, proposal kind)."""
    recs, ims = [], []
    for i in range(int(k["reference_images"])):
        rec = make_image(10_000_000 + i, f"ref{i}", "ref", seed, k, classes)
        recs.append(rec)
        ims.append(_render(rec, seed, 10_000_000 + i))
    feats = []
    bs = 32
    for s in progress_bar(
        range(0, len(recs), bs), total=math.ceil(len(recs) / bs), desc="reference features", enabled=progress
    ):
        feats += region_features(
            ims[s : s + bs], [r.boxes for r in recs[s : s + bs]], input_size=tuple(k["backbone_input"])
        )
    pool: dict[tuple[str, int], list[np.ndarray]] = {}
    for rec, f in zip(recs, feats):
        for r in range(len(rec.boxes)):
            src, kd = int(rec.source[r]), int(rec.kind[r])
            cat = rec.scene.objects[src].category if src >= 0 else ""
            pool.setdefault((cat, kd if src >= 0 else 2), []).append(f[r])
    return {key: np.stack(v) for key, v in pool.items()}


def _prototype_features(
    rec: ImageRecord, pool: dict[tuple[str, int], np.ndarray], rng: np.random.Generator, std: np.ndarray
) -> np.ndarray:
    out = np.empty((len(rec.boxes), std.shape[0]), dtype=np.float32)
    clutter = pool[("", 2)]
    for r in range(len(rec.boxes)):
        src, kd = int(rec.source[r]), int(rec.kind[r])
        if src == -2:  # group box: whole-object features of the member it overlaps most
            src = int(np.argmax(S.box_iou_np(rec.boxes[r : r + 1], np.array([o.box for o in rec.scene.objects]))[0]))
            kd = 0
        if src >= 0:
            cat = rec.scene.objects[src].category
            arr = pool[(cat, kd)] if (cat, kd) in pool else pool.get((cat, 0), clutter)
        else:
            arr = clutter
        out[r] = arr[int(rng.integers(len(arr)))]
    out += (rng.standard_normal(out.shape, dtype=np.float32) * (0.15 * std)).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------


def _split_sizes(size: str, n_images: int) -> tuple[int, int, int]:
    if n_images <= 0:
        return SPLIT_SIZES[size]
    if n_images < 6:
        raise ValueError(f"phrase: n_images must be >= 6 (got {n_images})")
    v = max(1, n_images // 10)
    return n_images - 2 * v, v, v


_RATE_KNOBS = (
    "cooccurrence",
    "part_rate",
    "clutter",
    "miss_rate",
    "group_rate",
    "confusion",
    "synonym_rate",
    "plural_rate",
    "nobox_rate",
    "same_category",
)


def _phrase_knobs(knobs: dict[str, Any], size: str) -> tuple[dict[str, Any], bool]:
    """The checked knobs with ``features`` resolved, and whether to write the JPEGs (all errors before any file)."""
    k = check_knobs("phrase", knobs, DEFAULTS)
    if k["features"] == "auto":
        k["features"] = "prototype" if size == "large" else "backbone"
    if k["features"] not in ("backbone", "prototype"):
        raise ValueError(f"phrase: features must be 'auto', 'backbone' or 'prototype', got {k['features']!r}")
    if k["images"] not in (None, True, False):
        raise ValueError(f"phrase: knob images must be true or false, got {k['images']!r}")
    write_images = (size != "large") if k["images"] is None else bool(k["images"])
    if not 1 <= int(k["n_proposals"]) <= 1000:
        raise ValueError(f"phrase: n_proposals must be in [1, 1000], got {k['n_proposals']}")
    for name in _RATE_KNOBS:
        if not 0.0 <= float(k[name]) <= 1.0:
            raise ValueError(f"phrase: knob {name} must be in [0, 1], got {k[name]}")
    return k, write_images


@dataclass
class _Build:
    """What the split writers share: the settings, the prototype pool and what the label files are made from."""

    out: Path
    seed: int
    k: dict[str, Any]
    classes: list[str]
    write_images: bool
    progress: bool
    pool: dict[tuple[str, int], np.ndarray] | None = None
    std: np.ndarray | None = None
    all_phrases: set[str] = field(default_factory=set)
    scenes_meta: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(
        default_factory=lambda: {"generate_render_s": 0.0, "features_s": 0.0, "write_s": 0.0}
    )

    @property
    def flickr(self) -> Path:
        return self.out / "flickr30k_entities"


def _make_dirs(b: _Build) -> None:
    """Create the Flickr30K Entities folders (images only when written) and ``meta/``."""
    (b.flickr / "Sentences").mkdir(parents=True)
    (b.flickr / "Annotations").mkdir()
    if b.write_images:
        (b.flickr / "flickr30k-images").mkdir()
    (b.out / "meta").mkdir()


def _load_reference_pool(b: _Build) -> None:
    """Fill ``b.pool`` and ``b.std`` from the rendered reference set, for prototype features."""
    t0 = time.perf_counter()
    b.pool = _reference_pool(b.seed, b.k, b.classes, b.progress)
    allf = np.concatenate(list(b.pool.values()))
    b.std = allf.std(0).astype(np.float32)
    b.timings["reference_features_s"] = round(time.perf_counter() - t0, 2)


def _chunk_features(b: _Build, chunk: list[ImageRecord], ims: list, start: int) -> list[np.ndarray]:
    """Region features of consecutive images from index ``start``: backbone on pixels, or reference prototypes."""
    if b.k["features"] == "backbone":
        return region_features(ims, [r.boxes for r in chunk], input_size=tuple(b.k["backbone_input"]))
    return [
        _prototype_features(r, b.pool, rng_for(b.seed, "phrase", "proto", start + j), b.std)
        for j, r in enumerate(chunk)
    ]


def _write_record(
    b: _Build, rec: ImageRecord, f: np.ndarray, im: Image.Image | None, fr: h5py.File, fp: h5py.File
) -> dict[str, Any]:
    """Write one image's HDF5 entries, Flickr30K Entities files and JPEG; returns its ``scenes.jsonl`` record."""
    if f.shape != (len(rec.boxes), FEATURE_DIM):
        raise RuntimeError(f"features of image {rec.id}: shape {f.shape}, expected {(len(rec.boxes), FEATURE_DIM)}")
    _h5(fr, rec.id, np.concatenate([f, rec.logits, rec.boxes], axis=1).astype(np.float32))
    toks, gt = _phrase_arrays(rec, max(MIN_PHRASES, max(len(x) for x in rec.phrases())))
    _h5(fp, rec.id, toks)
    _h5(fp, rec.id + "_gt", gt)
    (b.flickr / "Sentences" / f"{rec.id}.txt").write_text(
        "".join(_sentence_markup(rec, sn) + "\n" for sn in rec.sentences)
    )
    (b.flickr / "Annotations" / f"{rec.id}.xml").write_text(_annotation_xml(rec))
    if im is not None:
        im.save(b.flickr / "flickr30k-images" / f"{rec.id}.jpg", quality=int(b.k["jpeg_quality"]))
    return {
        "id": rec.id,
        "split": rec.split,
        "scene": rec.scene.to_dict(),
        "proposal_source": rec.source.tolist(),
        "proposal_kind": rec.kind.tolist(),
        "confused": {str(oid): name for oid, name in sorted(rec.confused.items())},
    }


def _write_split(b: _Build, split: str, count: int, index: int) -> list[ImageRecord]:
    """Generate, featurise and write one split's images (global indices from ``index``), in chunks of 32."""
    ids = [str(1_000_000 + index + i) for i in range(count)]
    (b.flickr / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    records: list[ImageRecord] = []
    with (
        h5py.File(b.out / f"region_features_{split}.hdf5", "w") as fr,
        h5py.File(b.out / f"phrase_features_{split}.hdf5", "w") as fp,
    ):
        bs = 32
        for s in progress_bar(
            range(0, count, bs), total=math.ceil(count / bs), desc=f"phrase {split}", enabled=b.progress
        ):
            t0 = time.perf_counter()
            chunk = [make_image(index + j, ids[j], split, b.seed, b.k, b.classes) for j in range(s, min(s + bs, count))]
            need_px = b.write_images or b.k["features"] == "backbone"
            ims = [_render(r, b.seed, index + s + j) for j, r in enumerate(chunk)] if need_px else []
            t1 = time.perf_counter()
            feats = _chunk_features(b, chunk, ims, index + s)
            t2 = time.perf_counter()
            for j, rec in enumerate(chunk):
                b.scenes_meta.append(_write_record(b, rec, feats[j], ims[j] if b.write_images else None, fr, fp))
                for sent in rec.phrases():
                    b.all_phrases.update(" ".join(t[:MAX_TOKENS]) for t, _ in sent)
            records.extend(chunk)
            t3 = time.perf_counter()
            b.spent["generate_render_s"] += t1 - t0
            b.spent["features_s"] += t2 - t1
            b.spent["write_s"] += t3 - t2
    return records


def _write_labels(out: Path, phrases: list[str], classes: list[str]) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Write the phrase -> class map, its matching matrix, the class list and GloVe; returns the map and vectors."""
    p2l, match = phrase_matching(phrases, classes)
    write_json(out / "phrase_to_label.json", p2l)
    write_matching_matrix(out / "matching_matrix.hdf5", phrases, classes, match)  # the soft matching behind the map
    (out / "detector_classes.txt").write_text("".join(c + "\n" for c in ["__background__"] + classes))
    vocab = sorted({w for p in phrases for w in p.split()} | {w for c in classes for w in c.split()})

    vecs = load_word_vectors(GLOVE_PACKAGE, vocab)
    with h5py.File(out / "glove.hdf5", "w") as fg:
        for w in vocab:
            if w in vecs:
                _h5(fg, w, vecs[w])
    return p2l, vecs


def _build_info(
    b: _Build, sizes: tuple[int, int, int], phrases: list[str], n_glove: int, stats: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """The manifest's ``info`` of a phrase build: counts, figures, timings and file names."""
    n_phr = sum(st["phrases_with_box"] for st in stats.values())
    info = {
        "knobs": b.k,
        "images": dict(zip(SPLITS, sizes)),
        "captions_per_image": N_SENTENCES,
        "feature_dim": FEATURE_DIM,
        "detector_classes": len(b.classes),
        "logit_columns": len(b.classes) + 1,
        "n_proposals": int(b.k["n_proposals"]),
        "phrases_with_box": n_phr,
        "distinct_phrases": len(phrases),
        "glove_words": n_glove,
        "stats": stats,
        "timings": b.timings,
        "files": {
            "region_features": {s: f"region_features_{s}.hdf5" for s in SPLITS},
            "phrase_features": {s: f"phrase_features_{s}.hdf5" for s in SPLITS},
            "glove": "glove.hdf5",
            "phrase_to_label": "phrase_to_label.json",
            "matching_matrix": "matching_matrix.hdf5",
            "detector_classes": "detector_classes.txt",
            "flickr30k_entities": "flickr30k_entities",
        },
    }
    if b.k["features"] == "backbone":  # the region features went through torch's float kernels
        info["float_fingerprint"] = float_fingerprint()
    return info


def build(out: Path, size: str = "small", seed: int = 0, progress: bool = True, **knobs: Any) -> dict[str, Any]:
    """Write the phrase task under ``out``; returns counts, knobs and teacher/oracle figures."""
    k, write_images = _phrase_knobs(knobs, size)
    classes = S.detector_vocabulary(k["detector"])
    sizes = _split_sizes(size, int(k["n_images"]))
    b = _Build(Path(out), seed, k, classes, write_images, progress)
    _make_dirs(b)
    if k["features"] == "prototype":
        _load_reference_pool(b)

    records: dict[str, list[ImageRecord]] = {}
    index = 0
    for split, count in zip(SPLITS, sizes):
        records[split] = _write_split(b, split, count, index)
        index += count
    b.timings.update({name: round(v, 2) for name, v in b.spent.items()})

    t0 = time.perf_counter()
    phrases = sorted(b.all_phrases)
    p2l, vecs = _write_labels(b.out, phrases, classes)
    with open(b.out / "meta" / "scenes.jsonl", "w", encoding="utf-8") as fm:
        for m in b.scenes_meta:
            fm.write(json.dumps(m, sort_keys=True) + "\n")
    stats = {s: teacher_stats(records[s], p2l, classes) for s in SPLITS}
    b.timings["labels_stats_s"] = round(time.perf_counter() - t0, 2)
    write_json(b.out / "meta" / "stats.json", stats)
    return _build_info(b, sizes, phrases, len(vecs), stats)


# ----------------------------------------------------------------------------------------------
# illustrations (docs/images)
# ----------------------------------------------------------------------------------------------


def illustrate(world: str | Path, image_id: str, proposals: bool = False, scale: int = 2):
    """A PIL image of one generated image read back from its files: the Flickr30K Entities captions
    and phrase boxes (enclosing box for plurals) or, with ``proposals``, the detector proposals
    (green whole, orange part, gray clutter, blue group) with the top-1 class of the five best."""

    world = Path(world)
    root = world / "flickr30k_entities"
    img = Image.open(root / "flickr30k-images" / f"{image_id}.jpg").convert("RGB")
    sents = F.read_sentences(root / "Sentences" / f"{image_id}.txt")
    ann = F.read_annotations(root / "Annotations" / f"{image_id}.xml")
    captions = [s["sentence"] for s in sents]
    if not proposals:
        boxes, seen = [], set()
        for s in sents:
            for p in s["phrases"]:
                bs = ann["boxes"].get(p["phrase_id"])
                if bs and p["phrase_id"] not in seen:
                    seen.add(p["phrase_id"])
                    boxes.append((F.union_box(bs), f"{p['phrase_id']}: {p['phrase']}"))
        return S.draw_sample(img, boxes, captions, scale=scale)
    split = next(s for s in SPLITS if image_id in F.read_split(root / f"{s}.txt"))
    classes = (world / "detector_classes.txt").read_text().split("\n")[:-1]
    meta = next(
        json.loads(ln)
        for ln in (world / "meta" / "scenes.jsonl").read_text().splitlines()
        if f'"id": "{image_id}"' in ln
    )
    with h5py.File(world / f"region_features_{split}.hdf5", "r") as f:
        a = f[image_id][()]
    logits, boxes = a[:, -(len(classes) + 4) : -4], a[:, -4:]
    big = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    d = ImageDraw.Draw(big)
    colours = {0: (40, 200, 40), 1: (255, 140, 0), 2: (150, 150, 150), 3: (30, 90, 255)}
    for r in reversed(range(len(boxes))):
        x1, y1, x2, y2 = (float(v) * scale for v in boxes[r])
        d.rectangle([x1, y1, x2, y2], outline=colours[meta["proposal_kind"][r]], width=3 if r < 5 else 1)
        if r < 5:
            d.text((x1 + 3, y1 + 2), f"{r}:{classes[int(np.argmax(logits[r]))]}", fill=(0, 0, 0))
    return big
