"""CLIP-VG pseudo labels: Pseudo-Q templates, relation / caption sources, merging, reliability histograms."""

import json

import numpy as np
import pytest

from groundkit.formats import transvg
from groundkit.methods.clipvg.pseudo import (
    TemplateOptions,
    caption_labels,
    merge_sources,
    relation_labels,
    reliability_histogram,
    save_histogram,
    select,
    template_labels,
    write_labels,
)

DETS = [
    {
        "file_name": "a.jpg",
        "width": 640,
        "height": 480,
        "detections": [
            {"box": [10, 100, 110, 400], "class": "man", "score": 0.9, "attribute": "tall", "attribute_score": 0.8},
            {"box": [500, 120, 600, 420], "class": "man", "score": 0.8, "attribute": "old", "attribute_score": 0.2},
            {"box": [20, 110, 100, 200], "class": "shirt", "score": 0.7, "attribute": "red", "attribute_score": 0.9},
            {"box": [300, 300, 310, 305], "class": "cup", "score": 0.95},  # tiny: dropped
            {"box": [505, 125, 598, 418], "class": "man", "score": 0.5},  # overlaps the second man: suppressed
            {"box": [250, 200, 400, 350], "class": "white dog", "score": 0.6, "attribute": "white"},
        ],
    }
]


def test_template_labels_follow_the_pseudo_q_rules():
    labels = template_labels(DETS, TemplateOptions(each_image_query=100))
    texts = {t for _, _, t in labels}
    # left / right between the two men; the low-score attribute is ignored; the cloth goes to the left man
    assert {"tall man", "man on the left", "tall man on the left", "man on the right", "man"} <= texts
    assert "man in red shirt" in texts and "red shirt man" in texts
    assert not any("old" in t or "cup" in t for t in texts)
    assert "white dog" in texts and "white white dog" not in texts  # attribute word removed from the class
    boxes = {t: b for _, b, t in labels}
    assert boxes["man on the right"] == [500.0, 120.0, 600.0, 420.0]  # the higher-scoring duplicate kept
    # top-n by score with people first, and the per-image sample size
    few = template_labels(DETS, TemplateOptions(each_image_query=4, topn=1))
    assert len(few) == 4 and all(t.split()[-1] in ("man", "left", "shirt") or "man" in t for _, _, t in few)


def test_relation_and_caption_sources():
    rels = [
        {
            "file_name": "a.jpg",
            "relations": [
                {
                    "subject": {"class": "Man", "box": [1, 2, 3, 4], "score": 0.9},
                    "predicate": "riding",
                    "predicate_score": 0.8,
                    "object": {"class": "horse", "box": [0, 0, 9, 9], "score": 0.9},
                },
                {
                    "subject": {"class": "dog", "box": [5, 5, 6, 6], "score": 0.1},
                    "predicate": "on",
                    "predicate_score": 0.9,
                    "object": {"class": "grass", "box": [0, 0, 9, 9], "score": 0.9},
                },
            ],
        }
    ]
    assert relation_labels(rels) == [("a.jpg", [1.0, 2.0, 3.0, 4.0], "man riding horse")]
    # the official script keeps all of the top 10 (12 good triplets here); sampling is an option
    many = [
        {
            "subject": {"class": f"man{i}", "box": [i, 0, i + 1, 1], "score": 0.9},
            "predicate": "near",
            "predicate_score": 0.5 + i / 100,
            "object": {"class": "tree", "box": [0, 0, 1, 1], "score": 0.9},
        }
        for i in range(12)
    ]
    kept = relation_labels([{"file_name": "b.jpg", "relations": many}])
    assert [t for _, _, t in kept] == [f"man{i} near tree" for i in range(11, 1, -1)]
    assert len(relation_labels([{"file_name": "b.jpg", "relations": many}], each_image_query=6)) == 6
    caps = [{"file_name": "a.jpg", "captions": ["Two dogs play near a man", "a sunny sky"]}]
    out = caption_labels(caps, DETS)
    # "dogs" -> "dog" is no detected class ("white dog" is), so the first match is "man": the best man's box
    assert out == [("a.jpg", [10.0, 100.0, 110.0, 400.0], "Two dogs play near a man")]


def test_write_merge_and_select(tmp_path):
    a = write_labels([("a.jpg", [0, 0, 10, 10], "one")], tmp_path / "2_unc_train_pseudo_relation.pth")
    b = write_labels([("b.jpg", [5, 5, 20, 30], "two")], tmp_path / "1_unc_train_pseudo_template.pth")
    merged = merge_sources([a, b], tmp_path / "unc" / "unc_train_pseudo.pth")
    samples = transvg.load_split(tmp_path, "unc", "train_pseudo")
    assert merged.is_file() and [s.phrase for s in samples] == ["two", "one"]  # by leading integer
    assert samples[0].box == (5.0, 5.0, 20.0, 30.0)
    entries = transvg.load_raw(merged)
    assert select(entries, np.array([0.2, 0.7]), 0.5) == [1] and select(entries, np.array([0.2, 0.7]), None) == [0, 1]
    with pytest.raises(ValueError):
        select(entries, np.array([0.1]), 0.5)


def test_reliability_histogram_files(tmp_path):
    r = np.array([0.0, 0.0, 0.05, 0.5, 0.85, 0.86, 1.0], dtype=np.float32)
    counts, edges = reliability_histogram(r, bins=10)
    assert counts.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 2, 1] and edges[-1] == 1.0
    files = save_histogram(r, tmp_path / "h" / "template_by_template", title="SR")
    data = np.load(files.npz)
    assert data["counts"].sum() == 5 and len(data["counts"]) == 1000 and data["reliability"].tolist() == r.tolist()
    summary = json.loads(files.json.read_text())
    assert summary["zero"] == 2 and summary["kept_above"]["0.5"] == pytest.approx(3 / 7)
    assert files.png.read_bytes()[:4] == b"\x89PNG"
