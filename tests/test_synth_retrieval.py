"""The retrieval task of the benchmark world: released MSRVTT layout, determinism, difficulty knobs."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from groundkit.formats.collaborative_experts import (
    read_expert_pickle,
    read_raw_captions,
    read_split_list,
    read_teacher_pickle,
    read_text_features,
)
from groundkit.world.retrieval import EXPERT_FILES, TEACHER_FILES, TEXT_FILE, build


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("rw") / "a"
    info = build(out, "tiny", seed=3)
    return out, info


def test_layout_and_readers(world):
    out, info = world
    train = read_split_list(out / "train_list_full.txt")
    val = read_split_list(out / "val_list_full.txt")
    test = read_split_list(out / "test_list_full.txt")
    assert (len(train), len(val), len(test)) == (48, 16, 16) and not set(train) & set(test)
    ids = train + val + test
    for name, rel in EXPERT_FILES.items():
        feats, kind, dim = read_expert_pickle(out / rel, ids)
        assert dim == info["experts"][name]
        assert kind == ("ragged" if name == "audio" else "fixed")
    with open(out / EXPERT_FILES["audio"], "rb") as f:
        raw = pickle.load(f)
    nan = [v for v in ids if isinstance(raw[v], float) and math.isnan(raw[v])]
    assert len(nan) == info["missing_audio"] > 0  # a float NaN, as the released pickles
    lens = {raw[v].shape[0] for v in ids if v not in nan}
    assert len(lens) > 1 and all(raw[v].shape[1] == 128 for v in ids if v not in nan)
    caps = read_raw_captions(out / "raw-captions.pkl", ids)
    assert all(len(c) == 20 for c in caps.values())
    text = read_text_features(out / TEXT_FILE, ids, dim=50)
    assert all(a.shape[0] == len(c) for v in ids for a, c in zip(text[v], caps[v]))
    for rel in TEACHER_FILES.values():
        t, experts, d = read_teacher_pickle(out / rel, ids)
        assert experts == sorted(EXPERT_FILES) and t[ids[0]][1].shape == (20, 4, d)


def test_paraphrases_and_near_duplicates(world):
    out, info = world
    atts = json.loads((out / "attributes.json").read_text())
    caps = read_raw_captions(out / "raw-captions.pkl")
    v0 = next(iter(caps))
    assert len({" ".join(c) for c in caps[v0]}) > 10  # 20 captions that paraphrase each other
    ids = list(atts)
    # near-duplicate cluster mates: same object and scene, one of action / colour differs
    pairs = [
        (a, b)
        for a, b in zip(ids, ids[1:])
        if atts[a]["object"] == atts[b]["object"] and atts[a]["scene"] == atts[b]["scene"]
    ]
    assert len(pairs) >= len(ids) // 2
    assert all(sum(atts[a][k] != atts[b][k] for k in ("action", "colour")) >= 1 for a, b in pairs[:10])


def test_same_seed_byte_identical(world, tmp_path):
    out, _ = world
    again = tmp_path / "b"
    build(again, "tiny", seed=3)
    assert _digest(again) == _digest(out)
    other = tmp_path / "c"
    build(other, "tiny", seed=4, cluster_size=1, missing_fraction=0.0)
    d = _digest(other)
    assert d["raw-captions.pkl"] != _digest(out)["raw-captions.pkl"]
    with open(other / EXPERT_FILES["audio"], "rb") as f:
        assert all(isinstance(x, np.ndarray) for x in pickle.load(f).values())
    with pytest.raises(ValueError, match="unknown knob"):
        build(tmp_path / "d", "tiny", seed=0, clusters=3)
