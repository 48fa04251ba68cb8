"""Scenes of the built-in benchmark world: categories, vocabulary, sampling, relations and rendering.

A :class:`Scene` is a background (a scene word such as "park") plus :class:`SceneObject` items,
each with a category, attributes (colour, pattern, size word), a pixel box and a depth (larger =
nearer the viewer, drawn later). :func:`sample_scene` draws one from a seeded
``numpy.random.Generator``; :func:`render_scene` paints it as a real RGB image with PIL (composite
shapes with textures, so an ImageNet backbone sees category differences); :func:`relations` lists
the spatial relations between objects. Every task of :mod:`groundkit.world` builds on these.

Vocabulary: a category has CAPTION words (synonyms / hypernyms / paraphrases, all in GloVe 6B) and
one DETECTOR class name that may differ from them or be shared with another category ("rider" and
"child" are both the detector's "person"); :data:`DETECTOR_CLASSES` also holds classes that never
appear in the world (as a real Open Images / COCO detector has). Co-occurring pairs
(:data:`COOCCURRING_PAIRS`: rider on horse, cup on saucer, lamp on table) appear together at the
rate ``SceneKnobs.cooccurrence``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..boxes import box_iou
from ..text import COCO_CLASSES

__all__ = [
    "Category",
    "SceneObject",
    "Scene",
    "SceneKnobs",
    "CATEGORIES",
    "CATEGORY_NAMES",
    "DETECTOR_CLASSES",
    "WORLD_DETECTOR_CLASSES",
    "COOCCURRING_PAIRS",
    "CONFUSABLE",
    "COCO_CLASSES",
    "TO_COCO",
    "detector_vocabulary",
    "detector_class",
    "COLOURS",
    "BACKGROUNDS",
    "RELATION_WORDS",
    "sample_scene",
    "render_scene",
    "relation",
    "relations",
    "box_iou_np",
    "enclosing_box",
    "visible_fraction",
    "noun_phrase",
    "plural_of",
    "count_word",
    "draw_sample",
]

Box = tuple[float, float, float, float]

# ----------------------------------------------------------------------------------------------
# colours and backgrounds
# ----------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35),
    "green": (40, 150, 50),
    "blue": (35, 70, 200),
    "yellow": (235, 205, 30),
    "orange": (240, 130, 20),
    "purple": (120, 50, 160),
    "pink": (240, 140, 180),
    "brown": (120, 75, 35),
    "black": (25, 25, 25),
    "white": (240, 240, 235),
    "gray": (130, 130, 130),
}

# scene word -> (sky / wall colour, ground colour, flavour); scene words are phrases without a box.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], str]] = {
    "park": ((150, 200, 240), (90, 160, 70), "grass"),
    "street": ((170, 200, 230), (105, 105, 110), "road"),
    "beach": ((130, 190, 245), (225, 205, 150), "sea"),
    "room": ((225, 215, 190), (150, 110, 70), "floor"),
    "field": ((160, 205, 235), (185, 190, 90), "grass"),
    "snow": ((190, 205, 220), (245, 248, 250), "snow"),
}

# ----------------------------------------------------------------------------------------------
# categories
# ----------------------------------------------------------------------------------------------

# A primitive is (kind, x1, y1, x2, y2, role) in the object's unit box; kinds: ellipse, rect,
# rrect (rounded), tri (apex up), itri (apex down), diamond, pie (upper half disc), ring, line,
# trap (narrow top), itrap (narrow bottom). role: "main" (colour attribute + pattern), "dark",
# "light", "skin", or a colour name.
Prim = tuple[str, float, float, float, float, str]


@dataclass(frozen=True)
class Category:
    """One object category of the world.

    ``words``: caption head nouns (first = canonical); ``plurals``: their plural forms (same order);
    ``detector``: the detector's class name for it; ``palette``/``patterns``: attribute values;
    ``aspect``: width / height; ``area``: (min, max) fraction of the image area; ``zone``: where it
    stands ("ground" or "sky"); ``phrase_type``: the Flickr30K Entities type.
    """

    name: str
    words: tuple[str, ...]
    plurals: tuple[str, ...]
    detector: str
    palette: tuple[str, ...]
    patterns: tuple[str, ...]
    aspect: float
    area: tuple[float, float]
    zone: str
    phrase_type: str
    prims: tuple[Prim, ...]


def _cat(name, words, plurals, detector, palette, patterns, aspect, area, zone, ptype, prims) -> Category:
    return Category(
        name,
        tuple(words),
        tuple(plurals),
        detector,
        tuple(palette),
        tuple(patterns),
        aspect,
        area,
        zone,
        ptype,
        tuple(prims),
    )


_PERSON_HEAD = ("ellipse", 0.3, 0.0, 0.7, 0.22, "skin")
CATEGORIES: dict[str, Category] = {
    c.name: c
    for c in [
        _cat(
            "dog",
            ["dog", "puppy", "hound"],
            ["dogs", "puppies", "hounds"],
            "dog",
            ["brown", "black", "white", "gray"],
            ["plain", "spotted"],
            1.4,
            (0.03, 0.09),
            "ground",
            "animals",
            [
                ("ellipse", 0.08, 0.35, 0.82, 0.78, "main"),
                ("ellipse", 0.6, 0.08, 1.0, 0.5, "main"),
                ("tri", 0.62, 0.0, 0.76, 0.2, "dark"),
                ("rect", 0.18, 0.65, 0.28, 1.0, "dark"),
                ("rect", 0.6, 0.65, 0.7, 1.0, "dark"),
                ("rect", 0.0, 0.35, 0.14, 0.45, "dark"),
                ("ellipse", 0.86, 0.22, 0.94, 0.3, "black"),
            ],
        ),
        _cat(
            "cat",
            ["cat", "kitten", "kitty"],
            ["cats", "kittens", "kitties"],
            "cat",
            ["orange", "gray", "black", "white"],
            ["plain", "striped"],
            1.1,
            (0.025, 0.07),
            "ground",
            "animals",
            [
                ("ellipse", 0.05, 0.45, 0.75, 0.95, "main"),
                ("ellipse", 0.5, 0.12, 0.95, 0.55, "main"),
                ("tri", 0.52, 0.0, 0.66, 0.22, "main"),
                ("tri", 0.8, 0.0, 0.94, 0.22, "main"),
                ("ellipse", 0.6, 0.28, 0.67, 0.35, "green"),
                ("ellipse", 0.78, 0.28, 0.85, 0.35, "green"),
                ("line", 0.0, 0.2, 0.08, 0.7, "main"),
            ],
        ),
        _cat(
            "horse",
            ["horse", "pony", "stallion"],
            ["horses", "ponies", "stallions"],
            "horse",
            ["brown", "black", "white"],
            ["plain", "spotted"],
            1.3,
            (0.06, 0.16),
            "ground",
            "animals",
            [
                ("ellipse", 0.1, 0.3, 0.8, 0.65, "main"),
                ("trap", 0.68, 0.05, 0.88, 0.45, "main"),
                ("ellipse", 0.74, 0.0, 1.0, 0.18, "main"),
                ("rect", 0.15, 0.55, 0.22, 1.0, "dark"),
                ("rect", 0.3, 0.55, 0.37, 1.0, "dark"),
                ("rect", 0.58, 0.55, 0.65, 1.0, "dark"),
                ("rect", 0.7, 0.55, 0.77, 1.0, "dark"),
                ("rect", 0.0, 0.32, 0.12, 0.6, "black"),
            ],
        ),
        _cat(
            "rider",
            ["rider", "jockey", "horseman"],
            ["riders", "jockeys", "horsemen"],
            "person",
            ["red", "blue", "green", "yellow"],
            ["plain", "striped"],
            0.55,
            (0.02, 0.05),
            "ground",
            "people",
            [
                _PERSON_HEAD,
                ("ellipse", 0.25, -0.05, 0.75, 0.08, "black"),
                ("trap", 0.15, 0.2, 0.85, 0.65, "main"),
                ("rect", 0.2, 0.6, 0.4, 1.0, "dark"),
                ("rect", 0.6, 0.6, 0.8, 1.0, "dark"),
            ],
        ),
        _cat(
            "man",
            ["man", "guy", "gentleman"],
            ["men", "guys", "gentlemen"],
            "man",
            ["blue", "red", "green", "black", "white"],
            ["plain", "striped", "checked"],
            0.42,
            (0.03, 0.08),
            "ground",
            "people",
            [
                _PERSON_HEAD,
                ("rect", 0.12, 0.22, 0.88, 0.58, "main"),
                ("rect", 0.18, 0.56, 0.46, 1.0, "dark"),
                ("rect", 0.54, 0.56, 0.82, 1.0, "dark"),
            ],
        ),
        _cat(
            "woman",
            ["woman", "lady", "girl"],
            ["women", "ladies", "girls"],
            "woman",
            ["red", "pink", "purple", "yellow", "white"],
            ["plain", "dotted", "striped"],
            0.45,
            (0.03, 0.08),
            "ground",
            "people",
            [
                _PERSON_HEAD,
                ("ellipse", 0.22, 0.0, 0.78, 0.35, "brown"),
                ("ellipse", 0.3, 0.03, 0.7, 0.22, "skin"),
                ("trap", 0.05, 0.22, 0.95, 0.85, "main"),
                ("rect", 0.3, 0.84, 0.42, 1.0, "skin"),
                ("rect", 0.58, 0.84, 0.7, 1.0, "skin"),
            ],
        ),
        _cat(
            "child",
            ["child", "kid", "boy"],
            ["children", "kids", "boys"],
            "person",
            ["yellow", "green", "orange", "blue"],
            ["plain", "striped"],
            0.5,
            (0.012, 0.03),
            "ground",
            "people",
            [
                ("ellipse", 0.22, 0.0, 0.78, 0.34, "skin"),
                ("rect", 0.15, 0.32, 0.85, 0.68, "main"),
                ("rect", 0.22, 0.66, 0.45, 1.0, "blue"),
                ("rect", 0.55, 0.66, 0.78, 1.0, "blue"),
            ],
        ),
        _cat(
            "cup",
            ["cup", "mug"],
            ["cups", "mugs"],
            "mug",
            ["white", "red", "blue", "yellow"],
            ["plain", "dotted"],
            1.1,
            (0.01, 0.025),
            "ground",
            "other",
            [
                ("itrap", 0.05, 0.05, 0.8, 1.0, "main"),
                ("ring", 0.68, 0.25, 1.0, 0.7, "main"),
                ("ellipse", 0.05, 0.0, 0.8, 0.12, "dark"),
            ],
        ),
        _cat(
            "saucer",
            ["saucer", "dish"],
            ["saucers", "dishes"],
            "plate",
            ["white", "blue"],
            ["plain", "striped"],
            3.2,
            (0.008, 0.02),
            "ground",
            "other",
            [("ellipse", 0.0, 0.0, 1.0, 1.0, "main"), ("ellipse", 0.2, 0.2, 0.8, 0.7, "light")],
        ),
        _cat(
            "car",
            ["car", "automobile", "sedan"],
            ["cars", "automobiles", "sedans"],
            "car",
            ["red", "blue", "black", "white", "yellow"],
            ["plain"],
            2.0,
            (0.05, 0.12),
            "ground",
            "vehicles",
            [
                ("rrect", 0.0, 0.4, 1.0, 0.82, "main"),
                ("rrect", 0.2, 0.05, 0.75, 0.48, "main"),
                ("rect", 0.27, 0.12, 0.46, 0.4, "light"),
                ("rect", 0.5, 0.12, 0.69, 0.4, "light"),
                ("ellipse", 0.1, 0.64, 0.3, 1.0, "black"),
                ("ellipse", 0.7, 0.64, 0.9, 1.0, "black"),
            ],
        ),
        _cat(
            "bicycle",
            ["bicycle", "bike", "cycle"],
            ["bicycles", "bikes", "cycles"],
            "bicycle",
            ["red", "blue", "black", "green"],
            ["plain"],
            1.6,
            (0.025, 0.06),
            "ground",
            "vehicles",
            [
                ("ring", 0.0, 0.4, 0.42, 1.0, "black"),
                ("ring", 0.58, 0.4, 1.0, 1.0, "black"),
                ("line", 0.21, 0.7, 0.5, 0.3, "main"),
                ("line", 0.5, 0.3, 0.79, 0.7, "main"),
                ("line", 0.21, 0.7, 0.79, 0.7, "main"),
                ("line", 0.45, 0.1, 0.5, 0.3, "main"),
                ("rect", 0.35, 0.05, 0.58, 0.14, "black"),
            ],
        ),
        _cat(
            "tree",
            ["tree", "oak", "pine"],
            ["trees", "oaks", "pines"],
            "tree",
            ["green", "orange", "yellow"],
            ["plain", "spotted"],
            0.7,
            (0.06, 0.15),
            "ground",
            "other",
            [("rect", 0.42, 0.55, 0.58, 1.0, "brown"), ("ellipse", 0.0, 0.0, 1.0, 0.7, "main")],
        ),
        _cat(
            "flower",
            ["flower", "rose", "blossom"],
            ["flowers", "roses", "blossoms"],
            "flower",
            ["red", "pink", "purple", "yellow", "white"],
            ["plain"],
            0.6,
            (0.008, 0.02),
            "ground",
            "other",
            [
                ("rect", 0.46, 0.45, 0.54, 1.0, "green"),
                ("ellipse", 0.55, 0.6, 0.9, 0.75, "green"),
                ("ellipse", 0.0, 0.0, 0.55, 0.4, "main"),
                ("ellipse", 0.45, 0.0, 1.0, 0.4, "main"),
                ("ellipse", 0.2, 0.15, 0.8, 0.55, "main"),
                ("ellipse", 0.35, 0.12, 0.65, 0.36, "yellow"),
            ],
        ),
        _cat(
            "ball",
            ["ball", "football"],
            ["balls", "footballs"],
            "football",
            ["red", "blue", "yellow", "white", "orange"],
            ["plain", "striped", "dotted", "checked"],
            1.0,
            (0.006, 0.018),
            "ground",
            "other",
            [("ellipse", 0.0, 0.0, 1.0, 1.0, "main")],
        ),
        _cat(
            "kite",
            ["kite"],
            ["kites"],
            "kite",
            ["red", "yellow", "blue", "green"],
            ["plain", "striped", "checked"],
            0.75,
            (0.01, 0.03),
            "sky",
            "other",
            [
                ("diamond", 0.0, 0.0, 1.0, 0.7, "main"),
                ("line", 0.5, 0.7, 0.4, 1.0, "black"),
                ("line", 0.5, 0.0, 0.5, 0.7, "dark"),
            ],
        ),
        _cat(
            "bird",
            ["bird", "sparrow", "pigeon"],
            ["birds", "sparrows", "pigeons"],
            "bird",
            ["blue", "red", "black", "yellow", "brown"],
            ["plain"],
            1.3,
            (0.006, 0.02),
            "sky",
            "animals",
            [
                ("ellipse", 0.1, 0.3, 0.75, 0.85, "main"),
                ("ellipse", 0.55, 0.1, 0.9, 0.5, "main"),
                ("tri", 0.25, 0.05, 0.55, 0.55, "dark"),
                ("itri", 0.85, 0.25, 1.0, 0.38, "orange"),
                ("ellipse", 0.7, 0.22, 0.76, 0.3, "black"),
                ("tri", 0.0, 0.45, 0.2, 0.75, "dark"),
            ],
        ),
        _cat(
            "boat",
            ["boat", "ship", "canoe"],
            ["boats", "ships", "canoes"],
            "boat",
            ["red", "blue", "white"],
            ["plain", "striped"],
            1.2,
            (0.03, 0.08),
            "ground",
            "vehicles",
            [
                ("itrap", 0.0, 0.65, 1.0, 1.0, "main"),
                ("rect", 0.47, 0.0, 0.52, 0.68, "brown"),
                ("tri", 0.52, 0.05, 0.95, 0.62, "white"),
                ("tri", 0.1, 0.15, 0.47, 0.62, "light"),
            ],
        ),
        _cat(
            "umbrella",
            ["umbrella", "parasol"],
            ["umbrellas", "parasols"],
            "umbrella",
            ["red", "blue", "black", "yellow", "purple"],
            ["plain", "striped", "dotted"],
            1.2,
            (0.02, 0.05),
            "ground",
            "other",
            [
                ("pie", 0.0, 0.0, 1.0, 0.9, "main"),
                ("line", 0.5, 0.45, 0.5, 1.0, "black"),
                ("line", 0.5, 1.0, 0.62, 0.93, "black"),
            ],
        ),
        _cat(
            "chair",
            ["chair", "seat", "stool"],
            ["chairs", "seats", "stools"],
            "chair",
            ["brown", "black", "red"],
            ["plain", "checked"],
            0.8,
            (0.015, 0.04),
            "ground",
            "other",
            [
                ("rect", 0.1, 0.0, 0.3, 0.6, "main"),
                ("rect", 0.1, 0.5, 0.95, 0.62, "main"),
                ("rect", 0.12, 0.6, 0.2, 1.0, "dark"),
                ("rect", 0.85, 0.6, 0.93, 1.0, "dark"),
            ],
        ),
        _cat(
            "table",
            ["table", "desk"],
            ["tables", "desks"],
            "table",
            ["brown", "white", "black"],
            ["plain", "checked"],
            1.8,
            (0.03, 0.08),
            "ground",
            "other",
            [
                ("rect", 0.0, 0.0, 1.0, 0.18, "main"),
                ("rect", 0.06, 0.15, 0.14, 1.0, "dark"),
                ("rect", 0.86, 0.15, 0.94, 1.0, "dark"),
            ],
        ),
        _cat(
            "bottle",
            ["bottle", "flask"],
            ["bottles", "flasks"],
            "bottle",
            ["green", "brown", "blue", "white"],
            ["plain"],
            0.36,
            (0.006, 0.018),
            "ground",
            "other",
            [
                ("rect", 0.35, 0.0, 0.65, 0.3, "main"),
                ("rrect", 0.05, 0.25, 0.95, 1.0, "main"),
                ("rect", 0.05, 0.5, 0.95, 0.75, "white"),
            ],
        ),
        _cat(
            "book",
            ["book", "novel"],
            ["books", "novels"],
            "book",
            ["red", "blue", "green", "yellow"],
            ["plain"],
            0.75,
            (0.008, 0.02),
            "ground",
            "other",
            [
                ("rect", 0.0, 0.0, 1.0, 1.0, "main"),
                ("rect", 0.0, 0.0, 0.12, 1.0, "dark"),
                ("rect", 0.9, 0.03, 1.0, 0.97, "white"),
                ("rect", 0.3, 0.2, 0.8, 0.3, "light"),
            ],
        ),
        _cat(
            "clock",
            ["clock"],
            ["clocks"],
            "clock",
            ["black", "red", "blue"],
            ["plain"],
            1.0,
            (0.008, 0.02),
            "ground",
            "other",
            [
                ("ellipse", 0.0, 0.0, 1.0, 1.0, "main"),
                ("ellipse", 0.1, 0.1, 0.9, 0.9, "white"),
                ("line", 0.5, 0.5, 0.5, 0.18, "black"),
                ("line", 0.5, 0.5, 0.75, 0.55, "black"),
            ],
        ),
        _cat(
            "lamp",
            ["lamp", "lantern"],
            ["lamps", "lanterns"],
            "lamp",
            ["yellow", "white", "red"],
            ["plain", "striped"],
            0.6,
            (0.008, 0.025),
            "ground",
            "other",
            [
                ("trap", 0.05, 0.0, 0.95, 0.4, "main"),
                ("rect", 0.45, 0.38, 0.55, 0.9, "gray"),
                ("rect", 0.2, 0.88, 0.8, 1.0, "dark"),
            ],
        ),
        _cat(
            "sign",
            ["sign", "placard"],
            ["signs", "placards"],
            "billboard",
            ["red", "green", "blue", "yellow"],
            ["plain", "striped"],
            0.9,
            (0.015, 0.04),
            "ground",
            "other",
            [
                ("rect", 0.0, 0.0, 1.0, 0.6, "main"),
                ("rect", 0.1, 0.2, 0.9, 0.3, "white"),
                ("rect", 0.44, 0.58, 0.56, 1.0, "gray"),
            ],
        ),
        _cat(
            "bench",
            ["bench"],
            ["benches"],
            "bench",
            ["brown", "green", "gray"],
            ["plain"],
            2.2,
            (0.02, 0.05),
            "ground",
            "other",
            [
                ("rect", 0.0, 0.0, 1.0, 0.2, "main"),
                ("rect", 0.0, 0.28, 1.0, 0.48, "main"),
                ("rect", 0.0, 0.5, 1.0, 0.62, "main"),
                ("rect", 0.06, 0.6, 0.12, 1.0, "black"),
                ("rect", 0.88, 0.6, 0.94, 1.0, "black"),
            ],
        ),
    ]
}
CATEGORY_NAMES: list[str] = list(CATEGORIES)

# Detector vocabulary (background excluded, column 0 of the logits is background): the world's
# detector names first, then classes the detector knows but the world never shows.
WORLD_DETECTOR_CLASSES: list[str] = list(dict.fromkeys(c.detector for c in CATEGORIES.values()))
DETECTOR_CLASSES: list[str] = WORLD_DETECTOR_CLASSES + [
    "wolf",
    "tiger",
    "sheep",
    "cow",
    "truck",
    "bus",
    "motorcycle",
    "vase",
    "bowl",
    "toy",
    "window",
    "building",
    "sofa",
    "shirt",
    "hat",
    "balloon",
]

# (partner placed with anchor, anchor): e.g. a rider sits on a horse.
COOCCURRING_PAIRS: list[tuple[str, str]] = [("rider", "horse"), ("cup", "saucer"), ("lamp", "table")]

# categories the detector confuses (by category name; the confusion goes to the other's detector class)
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "dog": ("cat", "horse"),
    "cat": ("dog",),
    "horse": ("dog", "cow"),
    "rider": ("man", "woman"),
    "man": ("woman", "rider"),
    "woman": ("man",),
    "child": ("woman", "man"),
    "cup": ("bottle", "vase"),
    "saucer": ("bowl", "clock"),
    "car": ("truck", "boat"),
    "bicycle": ("motorcycle",),
    "tree": ("flower",),
    "flower": ("tree",),
    "ball": ("clock", "balloon"),
    "kite": ("umbrella", "bird"),
    "bird": ("kite",),
    "boat": ("car",),
    "umbrella": ("kite", "lamp"),
    "chair": ("bench", "table"),
    "table": ("bench", "chair"),
    "bottle": ("cup", "vase"),
    "book": ("sign",),
    "clock": ("ball",),
    "lamp": ("bottle",),
    "sign": ("book", "window"),
    "bench": ("chair", "sofa"),
}

# The 80 COCO detector classes (the other detector vocabulary the world can speak) and how the
# world's categories and the extra detector classes above map onto them (None: COCO has no class).
TO_COCO: dict[str, str | None] = {
    "dog": "dog",
    "cat": "cat",
    "horse": "horse",
    "rider": "person",
    "man": "person",
    "woman": "person",
    "child": "person",
    "cup": "cup",
    "saucer": "bowl",
    "car": "car",
    "bicycle": "bicycle",
    "tree": "potted plant",
    "flower": "potted plant",
    "ball": "sports ball",
    "kite": "kite",
    "bird": "bird",
    "boat": "boat",
    "umbrella": "umbrella",
    "chair": "chair",
    "table": "dining table",
    "bottle": "bottle",
    "book": "book",
    "clock": "clock",
    "lamp": None,
    "sign": "stop sign",
    "bench": "bench",
    # extra detector classes used as confusions
    "wolf": "dog",
    "tiger": "cat",
    "sheep": "sheep",
    "cow": "cow",
    "truck": "truck",
    "bus": "bus",
    "motorcycle": "motorcycle",
    "vase": "vase",
    "bowl": "bowl",
    "toy": "teddy bear",
    "window": None,
    "building": None,
    "sofa": "couch",
    "shirt": None,
    "hat": None,
    "balloon": None,
}


def detector_vocabulary(vocab: str) -> list[str]:
    """Detector class names (background excluded) of ``vocab``: "world" (41 classes) or "coco" (80)."""
    if vocab == "world":
        return list(DETECTOR_CLASSES)
    if vocab == "coco":
        return list(COCO_CLASSES)
    raise ValueError(f"unknown detector vocabulary {vocab!r}; use 'world' or 'coco'")


def detector_class(name: str, vocab: str) -> str | None:
    """The class a detector of ``vocab`` gives a world category (or an extra class name); None if none."""
    if vocab == "world":
        return CATEGORIES[name].detector if name in CATEGORIES else (name if name in DETECTOR_CLASSES else None)
    if vocab == "coco":
        return TO_COCO.get(name)
    raise ValueError(f"unknown detector vocabulary {vocab!r}; use 'world' or 'coco'")


RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "of"),
    "right": ("right", "of"),
    "above": ("above",),
    "below": ("below",),
    "front": ("in", "front", "of"),
    "behind": ("behind",),
}

_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


def plural_of(word: str) -> str:
    """Plural of a caption noun of the world."""
    for c in CATEGORIES.values():
        if word in c.words:
            return c.plurals[c.words.index(word)]
    raise KeyError(f"{word!r} is not a caption noun of the world")


def count_word(n: int) -> str:
    return _COUNT_WORDS.get(n, "several")


# ----------------------------------------------------------------------------------------------
# scenes
# ----------------------------------------------------------------------------------------------


@dataclass
class SceneObject:
    """One object: ``box`` is (x1, y1, x2, y2) in pixels; ``depth`` orders drawing (larger = in front)."""

    id: int
    category: str
    colour: str
    pattern: str
    box: Box
    depth: float
    size: str = "medium"  # "small" | "medium" | "large", relative to the category's usual area
    partner_of: int | None = None  # id of the anchor object when placed as a co-occurring partner

    @property
    def cat(self) -> Category:
        return CATEGORIES[self.category]

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@dataclass
class Scene:
    """An image's content: ``background`` is a key of :data:`BACKGROUNDS` (a scene word)."""

    width: int
    height: int
    background: str
    horizon: float  # y of the sky/ground boundary in pixels
    objects: list[SceneObject] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        objs = [SceneObject(**{**o, "box": tuple(o["box"])}) for o in d["objects"]]
        return Scene(d["width"], d["height"], d["background"], d["horizon"], objs)

    def by_category(self, category: str) -> list[SceneObject]:
        return [o for o in self.objects if o.category == category]

    def moved(self, shifts: dict[int, tuple[float, float]]) -> Scene:
        """A copy with objects translated by ``{id: (dx, dy)}`` (for video frames)."""
        objs = []
        for o in self.objects:
            dx, dy = shifts.get(o.id, (0.0, 0.0))
            x1, y1, x2, y2 = o.box
            objs.append(replace(o, box=(x1 + dx, y1 + dy, x2 + dx, y2 + dy)))
        return replace(self, objects=objs)


@dataclass
class SceneKnobs:
    """Parameters of :func:`sample_scene`.

    ``cooccurrence``: probability that an object of a co-occurring pair is placed with its partner
    (and that the partner is not drawn alone); ``same_category``: probability of adding a second
    object of an already chosen category (distractors); ``area_scale`` multiplies object areas;
    ``categories``: restrict to these category names (None = all).
    """

    width: int = 320
    height: int = 240
    min_objects: int = 2
    max_objects: int = 5
    cooccurrence: float = 0.8
    same_category: float = 0.25
    area_scale: float = 1.0
    max_iou: float = 0.25
    categories: tuple[str, ...] | None = None

    @staticmethod
    def from_any(k: SceneKnobs | dict[str, Any] | None) -> SceneKnobs:
        if k is None:
            return SceneKnobs()
        if isinstance(k, SceneKnobs):
            return k
        known = SceneKnobs.__dataclass_fields__
        unknown = set(k) - set(known)
        if unknown:
            raise ValueError(f"unknown scene knobs {sorted(unknown)}; known: {sorted(known)}")
        return SceneKnobs(**k)


def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x1,y1,x2,y2 boxes (continuous convention), as float64 numpy.

    A float64 numpy front to :func:`groundkit.boxes.box_iou` for the generators."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return np.asarray(box_iou(a, b), dtype=np.float64)


def enclosing_box(boxes: Iterable[Sequence[float]]) -> Box:
    """The smallest box enclosing all ``boxes`` (the union-box convention for plural phrases)."""
    arr = np.asarray(list(boxes), dtype=np.float64).reshape(-1, 4)
    if len(arr) == 0:
        raise ValueError("enclosing_box needs at least one box")
    return (float(arr[:, 0].min()), float(arr[:, 1].min()), float(arr[:, 2].max()), float(arr[:, 3].max()))


def _clip_box(b: Sequence[float], w: int, h: int) -> Box:
    """Clip to the image and round to whole pixels (boxes are integer-valued floats)."""
    x1, y1, x2, y2 = b
    x1, x2 = max(0.0, min(x1, w - 2.0)), max(0.0, min(x2, w - 1.0))
    y1, y2 = max(0.0, min(y1, h - 2.0)), max(0.0, min(y2, h - 1.0))
    x1, y1, x2, y2 = float(round(x1)), float(round(y1)), float(round(x2)), float(round(y2))
    return (x1, y1, max(x2, x1 + 2.0), max(y2, y1 + 2.0))


def _size_word(cat: Category, area_frac: float) -> str:
    lo, hi = cat.area
    t = (area_frac - lo) / max(hi - lo, 1e-9)
    return "small" if t < 0.3 else ("large" if t > 0.7 else "medium")


def _place_partner(rng: np.random.Generator, partner: str, anchor: SceneObject, w: int, h: int) -> Box:
    ax1, ay1, ax2, ay2 = anchor.box
    aw, ah = ax2 - ax1, ay2 - ay1
    cx = (ax1 + ax2) / 2 + rng.uniform(-0.08, 0.08) * aw
    if partner == "rider":  # sits on the horse's back
        pw, ph = aw * rng.uniform(0.38, 0.46), ah * rng.uniform(0.85, 1.0)
        cx = ax1 + aw * rng.uniform(0.35, 0.5)
        bottom = ay1 + ah * rng.uniform(0.5, 0.6)
    elif partner == "cup":  # stands in the middle of the saucer
        pw = aw * rng.uniform(0.5, 0.62)
        ph = pw / CATEGORIES["cup"].aspect
        bottom = ay1 + ah * 0.55
    else:  # lamp on the table top
        ph = ah * rng.uniform(0.8, 1.1)
        pw = ph * CATEGORIES[partner].aspect
        cx = ax1 + aw * rng.uniform(0.25, 0.75)
        bottom = ay1 + ah * 0.05
    return _clip_box((cx - pw / 2, bottom - ph, cx + pw / 2, bottom), w, h)


def _sample_box(rng: np.random.Generator, cat: Category, k: SceneKnobs, horizon: float) -> tuple[Box, float]:
    w, h = k.width, k.height
    frac = rng.uniform(*cat.area) * k.area_scale
    area = frac * w * h
    aspect = cat.aspect * math.exp(rng.uniform(-0.12, 0.12))
    bw = min(math.sqrt(area * aspect), w * 0.9)
    bh = min(area / bw, h * 0.9)
    x1 = rng.uniform(0, max(w - bw, 1.0))
    if cat.zone == "sky":
        y1 = rng.uniform(2, max(horizon - bh * 0.7, 3))
    else:
        bottom = rng.uniform(min(horizon + bh * 0.25, h - 1), h - 1)
        y1 = bottom - bh
        if y1 < 0:
            y1 = 0.0
    return _clip_box((x1, y1, x1 + bw, y1 + bh), w, h), frac


def sample_scene(rng: np.random.Generator, knobs: SceneKnobs | dict[str, Any] | None = None) -> Scene:
    """Draw a scene: a background and ``min_objects..max_objects`` objects (pairs count as two)."""
    k = SceneKnobs.from_any(knobs)
    w, h = k.width, k.height
    names = list(k.categories) if k.categories else CATEGORY_NAMES
    bad = [n for n in names if n not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; known: {CATEGORY_NAMES}")
    partners = {p: a for p, a in COOCCURRING_PAIRS}
    anchors = {a: p for p, a in COOCCURRING_PAIRS}
    background = str(rng.choice(sorted(BACKGROUNDS)))
    horizon = float(h * rng.uniform(0.38, 0.55))
    n_target = int(rng.integers(k.min_objects, k.max_objects + 1))
    objects: list[SceneObject] = []

    def add(
        cat_name: str, box: Box, frac: float, partner_of: int | None = None, colour: str | None = None
    ) -> SceneObject:
        cat = CATEGORIES[cat_name]
        x1, y1, x2, y2 = box
        depth = y2 / h + (0.01 if partner_of is not None else 0.0)
        o = SceneObject(
            id=len(objects),
            category=cat_name,
            colour=colour or str(rng.choice(cat.palette)),
            pattern=str(rng.choice(cat.patterns)),
            box=box,
            depth=round(depth, 4),
            size=_size_word(cat, frac),
            partner_of=partner_of,
        )
        objects.append(o)
        return o

    def free(box: Box) -> bool:
        if not objects:
            return True
        return float(box_iou_np(np.array([box]), np.array([o.box for o in objects])).max()) <= k.max_iou

    tries = 0
    while len(objects) < n_target and tries < 60:
        tries += 1
        if objects and rng.random() < k.same_category:
            name = objects[int(rng.integers(len(objects)))].category
            if name in partners and partners[name] in names:
                continue
        else:
            name = str(rng.choice(names))
        pair_partner = None
        if name in partners:  # a partner: drawn with its anchor at the co-occurrence rate, else alone
            if partners[name] in names and rng.random() < k.cooccurrence:
                name, pair_partner = partners[name], name
        elif name in anchors and anchors[name] in names and rng.random() < k.cooccurrence:
            pair_partner = anchors[name]
        cat = CATEGORIES[name]
        box, frac = _sample_box(rng, cat, k, horizon)
        if not free(box):
            continue
        anchor = add(name, box, frac)
        if pair_partner is not None:
            pbox = _place_partner(rng, pair_partner, anchor, w, h)
            pfrac = (pbox[2] - pbox[0]) * (pbox[3] - pbox[1]) / (w * h) / max(k.area_scale, 1e-9)
            add(pair_partner, pbox, pfrac, partner_of=anchor.id)
    return Scene(w, h, background, round(horizon, 1), objects)


# ----------------------------------------------------------------------------------------------
# relations
# ----------------------------------------------------------------------------------------------


def relation(a: SceneObject, b: SceneObject) -> list[str]:
    """Spatial relations of ``a`` with respect to ``b`` (keys of :data:`RELATION_WORDS`).

    left/right when the horizontal centres differ by more than a third of the wider box and the
    boxes overlap little horizontally; above/below likewise vertically; front/behind when the
    boxes overlap (IoU > 0.02 or one contains part of the other) and depths differ.
    """
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    (acx, acy), (bcx, bcy) = a.center, b.center
    out = []
    hov = max(0.0, min(ax2, bx2) - max(ax1, bx1)) / max(1e-6, min(ax2 - ax1, bx2 - bx1))
    vov = max(0.0, min(ay2, by2) - max(ay1, by1)) / max(1e-6, min(ay2 - ay1, by2 - by1))
    if hov < 0.3 and abs(acx - bcx) > max(ax2 - ax1, bx2 - bx1) / 3:
        out.append("left" if acx < bcx else "right")
    if vov < 0.3 and abs(acy - bcy) > max(ay2 - ay1, by2 - by1) / 3:
        out.append("above" if acy < bcy else "below")
    if hov > 0 and vov > 0 and a.depth != b.depth:
        out.append("front" if a.depth > b.depth else "behind")
    return out


def relations(scene: Scene) -> list[tuple[int, str, int]]:
    """All (subject id, relation, object id) triples of a scene."""
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a.id != b.id:
                out.extend((a.id, r, b.id) for r in relation(a, b))
    return out


def visible_fraction(scene: Scene, obj_id: int, grid: int = 32) -> float:
    """Fraction of an object's box not covered by the boxes of objects drawn in front of it."""
    o = scene.objects[obj_id]
    x1, y1, x2, y2 = o.box
    xs = np.linspace(x1, x2, grid)
    ys = np.linspace(y1, y2, grid)
    gx, gy = np.meshgrid(xs, ys)
    covered = np.zeros_like(gx, dtype=bool)
    for p in scene.objects:
        if p.id != o.id and p.depth > o.depth:
            px1, py1, px2, py2 = p.box
            covered |= (gx >= px1) & (gx <= px2) & (gy >= py1) & (gy <= py2)
    return float(1.0 - covered.mean())


# ----------------------------------------------------------------------------------------------
# words
# ----------------------------------------------------------------------------------------------


def noun_phrase(
    obj: SceneObject,
    rng: np.random.Generator,
    synonym_rate: float = 0.5,
    colour_rate: float = 0.6,
    pattern_rate: float = 0.2,
    size_rate: float = 0.15,
    determiner: str | None = None,
) -> list[str]:
    """Tokens of a noun phrase naming ``obj``: [determiner] [size] [colour] [pattern] noun."""
    cat = obj.cat
    noun = cat.words[0] if (len(cat.words) == 1 or rng.random() >= synonym_rate) else str(rng.choice(cat.words[1:]))
    toks = [determiner or str(rng.choice(["a", "the"]))]
    if obj.size != "medium" and rng.random() < size_rate:
        toks.append(obj.size)
    if rng.random() < colour_rate:
        toks.append(obj.colour)
    if obj.pattern != "plain" and rng.random() < pattern_rate:
        toks.append(obj.pattern)
    toks.append(noun)
    if toks[0] == "a" and toks[1][0] in "aeiou":
        toks[0] = "an"
    return toks


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    if f >= 1:
        return tuple(int(c + (255 - c) * (f - 1)) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * f) for c in rgb)  # type: ignore[return-value]


def _role_colour(role: str, main: tuple[int, int, int], skin: tuple[int, int, int]) -> tuple[int, int, int]:
    if role == "main":
        return main
    if role == "dark":
        return _shade(main, 0.55)
    if role == "light":
        return _shade(main, 1.55)
    if role == "skin":
        return skin
    return COLOURS[role]


def _draw_prim(
    d: ImageDraw.ImageDraw, kind: str, x1: float, y1: float, x2: float, y2: float, fill: Any, bw: float, bh: float
) -> None:
    X1, Y1, X2, Y2 = x1 * bw, y1 * bh, x2 * bw, y2 * bh
    lw = max(1, int(round(min(bw, bh) * 0.07)))
    if kind == "ellipse":
        d.ellipse([X1, Y1, X2, Y2], fill=fill)
    elif kind == "rect":
        d.rectangle([X1, Y1, X2, Y2], fill=fill)
    elif kind == "rrect":
        d.rounded_rectangle([X1, Y1, X2, Y2], radius=max(1, int(min(X2 - X1, Y2 - Y1) * 0.25)), fill=fill)
    elif kind == "tri":
        d.polygon([((X1 + X2) / 2, Y1), (X2, Y2), (X1, Y2)], fill=fill)
    elif kind == "itri":
        d.polygon([(X1, Y1), (X2, Y1), ((X1 + X2) / 2, Y2)], fill=fill)
    elif kind == "diamond":
        d.polygon([((X1 + X2) / 2, Y1), (X2, (Y1 + Y2) / 2), ((X1 + X2) / 2, Y2), (X1, (Y1 + Y2) / 2)], fill=fill)
    elif kind == "pie":
        d.pieslice([X1, Y1, X2, Y2 + (Y2 - Y1)], 180, 360, fill=fill)
    elif kind == "ring":
        d.ellipse([X1, Y1, X2, Y2], outline=fill, width=lw)
    elif kind == "line":
        d.line([(X1, Y1), (X2, Y2)], fill=fill, width=lw)
    elif kind == "trap":
        dx = (X2 - X1) * 0.25
        d.polygon([(X1 + dx, Y1), (X2 - dx, Y1), (X2, Y2), (X1, Y2)], fill=fill)
    elif kind == "itrap":
        dx = (X2 - X1) * 0.2
        d.polygon([(X1, Y1), (X2, Y1), (X2 - dx, Y2), (X1 + dx, Y2)], fill=fill)
    else:
        raise ValueError(f"unknown primitive {kind!r}")


def _pattern_layer(
    pattern: str, colour: tuple[int, int, int], bw: int, bh: int, rng: np.random.Generator
) -> Image.Image:
    img = Image.new("RGB", (bw, bh), colour)
    if pattern == "plain":
        return img
    d = ImageDraw.Draw(img)
    alt = _shade(colour, 0.45) if sum(colour) > 300 else _shade(colour, 1.7)
    period = max(4, int(min(bw, bh) / 5))
    if pattern == "striped":
        for x in range(-bh, bw, period):
            d.line([(x, 0), (x + bh, bh)], fill=alt, width=max(1, period // 2 - 1))
    elif pattern in ("dotted", "spotted"):
        r = max(1, period // 4) if pattern == "dotted" else max(2, period // 2)
        step = period if pattern == "dotted" else int(period * 1.6)
        off = int(rng.integers(0, step))
        for yy in range(off, bh + step, step):
            for xx in range(off + (yy // step % 2) * step // 2, bw + step, step):
                d.ellipse([xx - r, yy - r, xx + r, yy + r], fill=alt)
    elif pattern == "checked":
        for yy in range(0, bh, period):
            for xx in range(((yy // period) % 2) * period, bw, 2 * period):
                d.rectangle([xx, yy, xx + period - 1, yy + period - 1], fill=alt)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return img


def _render_object(canvas: Image.Image, o: SceneObject, rng: np.random.Generator) -> None:
    x1, y1, x2, y2 = o.box
    ox, oy = int(math.floor(x1)), int(math.floor(y1))
    bw, bh = max(2, int(math.ceil(x2)) - ox), max(2, int(math.ceil(y2)) - oy)
    main = COLOURS[o.colour]
    skin = (225, 180, 140) if o.id % 3 else (160, 110, 75)
    layer = Image.new("RGB", (bw, bh), (0, 0, 0))
    mask = Image.new("L", (bw, bh), 0)
    main_mask = Image.new("L", (bw, bh), 0)
    dl, dm, dmm = ImageDraw.Draw(layer), ImageDraw.Draw(mask), ImageDraw.Draw(main_mask)
    for kind, px1, py1, px2, py2, role in o.cat.prims:
        col = _role_colour(role, main, skin)
        _draw_prim(dl, kind, px1, py1, px2, py2, col, bw, bh)
        _draw_prim(dm, kind, px1, py1, px2, py2, 255, bw, bh)
        _draw_prim(dmm, kind, px1, py1, px2, py2, 255 if role == "main" else 0, bw, bh)
    if o.pattern != "plain":
        layer.paste(_pattern_layer(o.pattern, main, bw, bh, rng), (0, 0), main_mask)
    canvas.paste(layer, (ox, oy), mask)


def render_scene(scene: Scene, rng: np.random.Generator | None = None, noise: float = 6.0) -> Image.Image:
    """Paint ``scene`` as an RGB image (objects in depth order; ``noise`` = pixel noise std)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    w, h = scene.width, scene.height
    sky, ground, flavour = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (w, h), sky)
    d = ImageDraw.Draw(img)
    hz = int(scene.horizon)
    d.rectangle([0, hz, w, h], fill=ground)
    if flavour == "sea":
        d.rectangle([0, hz, w, hz + max(4, (h - hz) // 4)], fill=(40, 110, 190))
    elif flavour == "road":
        for x in range(int(rng.integers(0, 40)), w, 60):
            d.rectangle([x, hz + (h - hz) * 0.55, x + 28, hz + (h - hz) * 0.6], fill=(235, 235, 235))
    elif flavour == "floor":
        for x in range(0, w, 40):
            d.line([(x, hz), (x - 30, h)], fill=_shade(ground, 0.8), width=2)
    elif flavour == "grass":
        for _ in range(40):
            gx, gy = rng.uniform(0, w), rng.uniform(hz, h)
            d.line([(gx, gy), (gx + rng.uniform(-2, 2), gy - 5)], fill=_shade(ground, 0.75), width=1)
    if flavour != "floor" and rng.random() < 0.6:  # a cloud or two
        for _ in range(int(rng.integers(1, 3))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, max(hz * 0.5, 2))
            d.ellipse([cx - 25, cy - 8, cx + 25, cy + 8], fill=(248, 248, 250))
    for o in sorted(scene.objects, key=lambda o: (o.depth, o.id)):
        _render_object(img, o, rng)
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def draw_sample(
    image: Image.Image,
    boxes: Sequence[tuple[Sequence[float], str]],
    captions: Sequence[str] = (),
    scale: int = 2,
) -> Image.Image:
    """An illustration: ``image`` enlarged, each (box, label) drawn, captions printed below."""
    palette = [
        (230, 25, 75),
        (60, 180, 75),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
    ]
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    line_h = 14
    out = Image.new("RGB", (big.width, big.height + line_h * len(captions) + 6), (255, 255, 255))
    out.paste(big, (0, 0))
    d = ImageDraw.Draw(out)
    for i, (box, label) in enumerate(boxes):
        col = palette[i % len(palette)]
        x1, y1, x2, y2 = (v * scale for v in box)
        d.rectangle([x1, y1, x2, y2], outline=col, width=2)
        tw = int(d.textlength(label, font=font)) + 4
        d.rectangle([x1, y1 - 12, x1 + tw, y1], fill=col)
        d.text((x1 + 2, y1 - 12), label, fill=(255, 255, 255), font=font)
    for j, cap in enumerate(captions):
        d.text((4, big.height + 3 + j * line_h), cap, fill=(0, 0, 0), font=font)
    return out
