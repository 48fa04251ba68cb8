"""The ``pseudo`` task of the benchmark world: CLIP-VG pseudo-label files and their structured noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from groundkit.formats import refcoco, transvg
from groundkit.world import pseudo
from groundkit.world.core import tree_digest
from groundkit.world.scene import Scene, box_iou_np


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("pseudo")
    info = pseudo.build(out, "tiny", seed=4, progress=False, n_images=120, noise=0.3)
    return out, info


def test_files_and_flags(world):
    out, info = world
    merged = transvg.load_split(out / "splits", "unc", "train_pseudo")
    flags = pseudo.load_label_flags(out)
    per_source = []
    for i, s in enumerate(pseudo.SOURCES):
        path = out / "splits" / "unc" / "train_separate" / f"{i + 1}_unc_train_pseudo_{s}.pth"
        raw = torch.load(path, weights_only=True)
        items = transvg.parse_entries(raw, "unc", str(path))
        assert len(items) == len(flags[s]) == info["pseudo"]["sources"][s]["labels"] > 20
        assert all(r[1] == r[4] == transvg.PLACEHOLDER for r in raw)
        assert [x.phrase for x in items] == [f["text"] for f in flags[s]]
        per_source += items
    assert merged == per_source  # merge_file.py order: template, relation, caption
    meta = {m["image_id"]: m for m in json.loads((out / "meta" / "pseudo_scenes.json").read_text())["images"]}
    data = refcoco.load_refer(out)
    train_imgs = {m for m, v in meta.items() if v["split"] == "train"}
    for x, f in zip(per_source, [f for s in pseudo.SOURCES for f in flags[s]]):
        iid = int(x.img_file.split("_")[-1].split(".")[0])
        assert iid in train_imgs  # pseudo labels only on train images; val/test keep human labels
        scene = Scene.from_dict(meta[iid]["scene"])
        x1, y1, x2, y2 = x.box
        assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
        # flag consistency: a correct label overlaps its single referent with IoU >= 0.5
        if f["correct"]:
            assert len(f["referents"]) == 1
            assert box_iou_np(np.array([x.box]), np.array([scene.objects[f["referents"][0]].box]))[0, 0] >= 0.5 - 0.01
    for split in ("val", "testA", "testB"):
        human = transvg.load_split(out / "splits", "unc", split)
        assert len(human) == len(data.samples(split)) > 0
        assert not {h.img_file for h in human} & {x.img_file for x in per_source}


def _rate(flags, sel) -> float:
    xs = [f for f in flags if sel(f)]
    assert len(xs) >= 15, "too few labels in a condition for a rate"
    return 1.0 - float(np.mean([f["correct"] for f in xs]))


def test_noise_is_structured(world):
    out, info = world
    flags = pseudo.load_label_flags(out)
    assert abs(info["pseudo"]["detection_error_rate"] - 0.3) < 0.06  # the knob sets the detector's error rate
    pooled = flags["template"] + flags["relation"]
    assert _rate(pooled, lambda f: f["small"]) > _rate(pooled, lambda f: not f["small"]) + 0.05
    rel = flags["relation"]
    assert _rate(rel, lambda f: f["crowded"]) > _rate(rel, lambda f: not f["crowded"]) + 0.05
    assert _rate(rel, lambda f: f["n_same_class"] >= 3) > _rate(rel, lambda f: f["n_same_class"] == 1) + 0.3
    # the sources differ: relation labels are the least reliable
    rates = {s: _rate(flags[s], lambda f: True) for s in pseudo.SOURCES}
    assert rates["relation"] > rates["template"] + 0.1


def test_noise_knob_moves_error_rates(tmp_path):
    lo = pseudo.build(tmp_path / "lo", "tiny", seed=4, progress=False, n_images=60, noise=0.0)
    hi = pseudo.build(tmp_path / "hi", "tiny", seed=4, progress=False, n_images=60, noise=0.5)
    assert lo["pseudo"]["detection_error_rate"] == 0.0
    assert abs(hi["pseudo"]["detection_error_rate"] - 0.5) < 0.08
    for s in pseudo.SOURCES:
        assert hi["pseudo"]["sources"][s]["error_rate"] > lo["pseudo"]["sources"][s]["error_rate"] + 0.05, s
    # with a noise-free detector, labels on objects whose class is unique in the image are right
    assert lo["pseudo"]["sources"]["template"]["error_rate_unique_class"] <= 0.05


_digest = tree_digest


def test_byte_identical_for_same_seed(tmp_path):
    pseudo.build(tmp_path / "a", "tiny", seed=9, progress=False, n_images=12)
    pseudo.build(tmp_path / "b", "tiny", seed=9, progress=False, n_images=12)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    with pytest.raises(ValueError, match="noise must be in"):
        pseudo.build(tmp_path / "c", "tiny", seed=9, progress=False, noise=1.5)


def test_every_knob_is_documented():
    from pathlib import Path

    from groundkit.world import refexp

    doc = (Path(__file__).resolve().parents[1] / "docs" / "benchmark_world.md").read_text()
    sections = {t: doc.split(f"\n## {t}\n", 1)[1].split("\n## ", 1)[0] for t in ("refexp", "pseudo")}
    for size in pseudo.DEFAULTS:
        for name in pseudo._defaults(size):
            where = "refexp" if name in refexp._defaults(size) and name not in pseudo._COMMON else "pseudo"
            assert f"`{name}`" in sections[where], (name, where)
