"""The ``refexp`` task of the benchmark world: formats, determinism and the disambiguation signal."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from groundkit.formats import refcoco, transvg
from groundkit.world import refexp
from groundkit.world.core import tree_digest
from groundkit.world.scene import CATEGORIES, COLOURS, Scene, relation

WORD2CAT = {w: name for name, c in CATEGORIES.items() for w in c.words}
SIZE2WORD = {w: s for s, ws in refexp.SIZE_WORDS.items() for w in ws}
PATTERNS = {p for c in CATEGORIES.values() for p in c.patterns}
REL_HEADS = {"left": "left", "right": "right", "above": "above", "below": "below", "front": "front", "behind": "behind"}


def _parse_np(tokens: list[str]) -> tuple[str | None, dict[str, str], int]:
    """Attributes and the category of the first noun phrase; returns (category, attrs, index after the noun)."""
    attrs: dict[str, str] = {}
    for i, t in enumerate(tokens):
        if t in WORD2CAT:
            return WORD2CAT[t], attrs, i + 1
        if t in COLOURS:
            attrs["colour"] = t
        elif t in SIZE2WORD:
            attrs["size"] = SIZE2WORD[t]
        elif t in PATTERNS:
            attrs["pattern"] = t
    return None, attrs, len(tokens)


def oracle_resolve(sentence: str, scene: Scene) -> list[int]:
    """Ids of the objects a sentence can denote, read from the words alone (independent of the generator)."""
    toks = sentence.split()
    cat, attrs, after = _parse_np(toks)
    cands = [o for o in scene.objects if o.category == cat and all(getattr(o, k) == v for k, v in attrs.items())]
    # relation: "<np> [to the] left of the <np>", "above the <np>", "in front of the <np>", "behind the <np>"
    rel = None
    for j, t in enumerate(toks):
        if t in ("left", "right") and j + 1 < len(toks) and toks[j + 1] == "of":
            rel, lm_toks = t, toks[j + 2 :]
        elif t in ("above", "below", "behind") or (t == "front" and j + 1 < len(toks) and toks[j + 1] == "of"):
            rel, lm_toks = REL_HEADS[t], toks[j + 1 :]
    if rel is not None:
        lcat, lattrs, _ = _parse_np(lm_toks)
        lms = [o for o in scene.objects if o.category == lcat and all(getattr(o, k) == v for k, v in lattrs.items())]
        if len(lms) != 1:
            return [o.id for o in cands] if not lms else []
        return [o.id for o in cands if rel in relation(o, lms[0])]
    locs = [t for t in toks if t in refexp.LOCATION_WORDS]
    if locs and cands:
        axis, ext = refexp.LOCATION_WORDS[locs[0]]
        idx = 0 if axis == "x" else 1
        key = lambda o: o.center[idx]
        best = min(cands, key=key) if ext == "min" else max(cands, key=key)
        return [best.id]
    return [o.id for o in cands]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("refexp_tiny")
    info = refexp.build(out, "tiny", seed=3, progress=False)
    return out, info


def test_refer_files_read_back(tiny):
    out, info = tiny
    data = refcoco.load_refer(out)
    assert data.splits() == ["testA", "testB", "train", "val"]
    samples = data.samples()
    assert len(samples) == info["sentences"] > 50
    assert len(data.refs) == info["refs"]
    for s in samples:
        x1, y1, x2, y2 = s.box_xyxy
        assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
        assert s.image_path.is_file()
        assert s.sentence == " ".join(s.tokens) and s.sentence.lower() == s.raw.lower()
    s = samples[0]
    with Image.open(s.image_path) as im:
        assert im.mode == "RGB" and im.size == (s.width, s.height) == (160, 120)
    # testA = people targets, testB = the others (the RefCOCO people / objects split)
    assert {x.category for x in data.samples("testA")} <= set(refexp.PEOPLE)
    assert not {x.category for x in data.samples("testB")} & set(refexp.PEOPLE)


def test_transvg_splits_match_refer(tiny):
    out, _ = tiny
    data = refcoco.load_refer(out)
    for split in ("train", "val", "testA", "testB"):
        ref_samples = data.samples(split)
        tv = transvg.load_split(out / "splits", "unc", split)
        assert len(tv) == len(ref_samples)
        for a, b in zip(tv, ref_samples):
            assert a.img_file == b.file_name and a.phrase == b.sentence
            assert a.ann == f"{b.ann_id}.pth"
            assert np.allclose(a.box, b.box_xyxy, atol=0.02)
            assert [slot for slot, _ in a.attributes] == [f"r{i}" for i in range(1, 9)]
    trainval = transvg.load_split(out / "splits", "unc", "trainval")
    assert len(trainval) == len(data.samples("train")) + len(data.samples("val"))
    fl = transvg.load_split(out / "splits", "flickr", "test")
    assert len(fl) == len(data.samples("testA")) + len(data.samples("testB"))
    # the refer -> TransVG converter, run on the refer files, gives the same samples as the written lists
    refcoco.to_transvg(out, out / "converted")
    for split in ("train", "val", "trainval", "testA", "testB"):
        conv = transvg.load_split(out / "converted", "unc", split)
        direct = transvg.load_split(out / "splits", "unc", split)
        assert [(c.img_file, c.phrase, c.ann) for c in conv] == [(d.img_file, d.phrase, d.ann) for d in direct]
        assert np.allclose([c.box for c in conv], [d.box for d in direct], atol=0.02)


def test_expressions_disambiguate(tiny):
    out, info = tiny
    meta = json.loads((out / "meta" / "refexp_scenes.json").read_text())
    data = refcoco.load_refer(out)
    sents = {s.sent_id: s for s in data.samples()}
    resolved = with_distractor = n = 0
    category_only_unique = 0
    for m in meta["images"]:
        scene = Scene.from_dict(m["scene"])
        for sm in m["sentences"]:
            n += 1
            text = sents[sm["sent_id"]].sentence
            ids = oracle_resolve(text, scene)
            resolved += ids == [sm["target"]]
            tgt = scene.objects[sm["target"]]
            same = [o for o in scene.objects if o.category == tgt.category]
            with_distractor += len(same) > 1
            category_only_unique += len(same) == 1
    # every expression, read from its words only, picks out its target
    assert resolved == n, f"{n - resolved} of {n} expressions do not resolve to their target"
    # most targets have a same-category distractor: the category alone is not enough
    assert with_distractor / n > 0.8
    assert info["refs_with_same_category_distractor"] > 0.8
    assert set(info["expression_kinds"]) >= {"attribute", "location", "relation"}
    # floors: knowing the category alone leaves the target ambiguous; chance is lower still
    tr = info["splits"]["train"]
    assert tr["chance"] < tr["category_oracle"] < 0.7


_digest = tree_digest


def test_byte_identical_for_same_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    refexp.build(a, "tiny", seed=5, progress=False, n_images=10)
    refexp.build(b, "tiny", seed=5, progress=False, n_images=10)
    refexp.build(c, "tiny", seed=6, progress=False, n_images=10)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_bad_knobs(tmp_path):
    with pytest.raises(ValueError, match="unknown knob"):
        refexp.build(tmp_path, "tiny", seed=0, progress=False, n_imgs=3)
    with pytest.raises(ValueError, match="split_fractions"):
        refexp.build(tmp_path, "tiny", seed=0, progress=False, split_fractions=[0.5, 0.5, 0.5, 0.5])


def test_generate_through_framework(tmp_path):
    from groundkit.world import generate, load_manifest, verify

    out = generate("refexp", "tiny", 0, tmp_path / "w", progress=False, n_images=6)
    man = load_manifest(out)
    assert verify(out) == []
    assert man["info"]["images"] == 6 and man["knobs"]["n_images"] == 6
    assert "refcoco/refs(unc).p" in man["files"] and "splits/unc/unc_testB.pth" in man["files"]


def test_every_knob_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "benchmark_world.md").read_text()
    section = doc.split("\n## refexp\n", 1)[1].split("\n## ", 1)[0]
    for size in refexp.DEFAULTS:
        for name in refexp._defaults(size):
            assert f"`{name}`" in section, name
