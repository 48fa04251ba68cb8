"""The ``phrase`` task of the benchmark world: formats, cross-format consistency and signal."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from groundkit.backbones import FEATURE_DIM
from groundkit.formats import flickr30k_entities as F
from groundkit.text import singular
from groundkit.world import generate, load_manifest, verify
from groundkit.world import phrase as PH
from groundkit.world import scene as S

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate("phrase", "tiny", seed=0, out=tmp_path_factory.mktemp("w") / "phrase-tiny", progress=False)


def _decode(arr: np.ndarray) -> list[list[list[str]]]:
    return [[[t.decode() for t in ph if t] for ph in sent] for sent in arr]


def test_files_and_manifest(world):
    man = load_manifest(world)
    assert verify(world) == []
    assert man["info"]["images"] == dict(zip(SPLITS, PH.SPLIT_SIZES["tiny"]))
    for s in SPLITS:
        assert f"region_features_{s}.hdf5" in man["files"] and f"phrase_features_{s}.hdf5" in man["files"]
    classes = (world / "detector_classes.txt").read_text().split("\n")[:-1]
    assert classes[0] == "__background__" and classes[1:] == S.detector_vocabulary("world")
    ids = F.read_split(world / "flickr30k_entities" / "train.txt")
    assert len(ids) == PH.SPLIT_SIZES["tiny"][0]
    assert (world / "flickr30k_entities" / "flickr30k-images" / f"{ids[0]}.jpg").is_file()


def test_region_hdf5_layout(world):
    C1 = len(S.detector_vocabulary("world")) + 1
    with h5py.File(world / "region_features_train.hdf5", "r") as f:
        keys = list(f.keys())
        assert keys == F.read_split(world / "flickr30k_entities" / "train.txt")
        for k in keys[:5]:
            a = f[k][()]
            assert a.dtype == np.float32 and a.shape == (30, FEATURE_DIM + C1 + 4)
            feats, logits, boxes = a[:, :FEATURE_DIM], a[:, FEATURE_DIM:-4], a[:, -4:]
            assert np.isfinite(a).all() and feats.std() > 0
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert boxes.min() >= 0 and boxes[:, 2].max() <= 320 and boxes[:, 3].max() <= 240
            # proposals sorted by the detector's best foreground probability
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            conf = p[:, 1:].max(1)
            assert (np.diff(conf) <= 1e-6).all()


def test_phrase_hdf5_layout_boxed_first(world):
    with h5py.File(world / "phrase_features_val.hdf5", "r") as f:
        ids = [k for k in f.keys() if not k.endswith("_gt")]
        assert len(ids) == PH.SPLIT_SIZES["tiny"][1]
        for k in ids:
            toks, gt = f[k][()], f[k + "_gt"][()]
            assert toks.dtype.kind == "S" and toks.shape[0] == 5 and toks.shape[1] >= 16 and toks.shape[2] == 10
            assert gt.shape == toks.shape[:2] + (4,)
            for s in range(5):
                has_box = gt[s, :, 3] > 0
                n = int(has_box.sum())
                assert n >= 1 and has_box[:n].all()  # phrases with a box come first
                n_phr = int((toks[s, :, 0] != b"").sum())
                assert (toks[s, n_phr:] == b"").all() and (gt[s, n_phr:] == 0).all()


def test_flickr_files_match_hdf5(world):
    """The Flickr30K Entities files and the HDF5 trio describe the same phrases and boxes."""
    root = world / "flickr30k_entities"
    n_plural = n_nobox = 0
    with h5py.File(world / "phrase_features_test.hdf5", "r") as f:
        for img in F.read_split(root / "test.txt"):
            sents = F.read_sentences(root / "Sentences" / f"{img}.txt")
            ann = F.read_annotations(root / "Annotations" / f"{img}.xml")
            assert (ann["width"], ann["height"], ann["depth"]) == (320, 240, 3)
            assert len(sents) == 5
            toks, gt = _decode(f[img][()]), f[img + "_gt"][()]
            for s, sent in enumerate(sents):
                rows = []
                for ph in sent["phrases"]:
                    bs = ann["boxes"].get(ph["phrase_id"])
                    # the XML is 1-based, the HDF5 boxes 0-based pixels: the reader's -1 restores them
                    box = F.union_box(bs) if bs else None
                    rows.append((ph["phrase"].lower().split(), box))
                    n_plural += bool(bs and len(bs) > 1)
                    if not bs:
                        n_nobox += 1
                        assert ph["phrase_id"] in ann["scene"] + ann["nobox"]
                rows = [r for r in rows if r[1] is not None] + [r for r in rows if r[1] is None]
                got = [p for p in toks[s] if p]
                assert got == [r[0] for r in rows]
                for p, (_, box) in enumerate(rows):
                    want = np.zeros(4) if box is None else np.asarray(box)
                    np.testing.assert_allclose(gt[s, p], want)
    assert n_plural > 0 and n_nobox > 0


def test_glove_and_phrase_to_label(world):
    p2l = json.loads((world / "phrase_to_label.json").read_text())
    classes = S.detector_vocabulary("world")
    assert set(p2l.values()) <= set(classes)
    phrases = set()
    with h5py.File(world / "glove.hdf5", "r") as g:
        dims = {g[w].shape for w in g}
        assert dims == {(50,)}
        words = set(g)
        for s in SPLITS:
            with h5py.File(world / f"phrase_features_{s}.hdf5", "r") as f:
                for k in f:
                    if not k.endswith("_gt"):
                        for sent in _decode(f[k][()]):
                            phrases.update(" ".join(p) for p in sent if p)
    assert phrases == set(p2l)
    assert {w for p in phrases for w in p.split()} <= words
    stats = load_manifest(world)["info"]["stats"]
    acc = np.mean([stats[s]["label_map_accuracy"] for s in SPLITS])
    assert 0.5 < acc < 0.95  # informative, and honestly imperfect
    assert singular("puppies", {"puppy"}) == "puppy" and singular("women", {"woman"}) == "woman"
    # the soft matching matrix the hard map was made from
    with h5py.File(world / "matching_matrix.hdf5", "r") as m:
        ph = [x.decode() for x in m["phrases"][()]]
        cl = [x.decode() for x in m["classes"][()]]
        sc = m["scores"][()]
    assert cl == classes and sc.shape == (len(ph), len(cl)) and set(ph) == set(p2l)
    for i, p in enumerate(ph):
        assert cl[int(np.argmax(sc[i]))] == p2l[p]


def _figures(world) -> dict[str, float]:
    """Teacher, category oracle, chance and proposal upper bound, recomputed from the files."""
    classes = (world / "detector_classes.txt").read_text().split("\n")[:-1]
    p2l = json.loads((world / "phrase_to_label.json").read_text())
    meta = {m["id"]: m for m in map(json.loads, (world / "meta" / "scenes.jsonl").read_text().splitlines())}
    rng = np.random.default_rng(0)
    n = teacher = oracle = rand = upper = 0
    for s in SPLITS:
        with (
            h5py.File(world / f"region_features_{s}.hdf5", "r") as fr,
            h5py.File(world / f"phrase_features_{s}.hdf5", "r") as fp,
        ):
            for img in fr:
                a = fr[img][()]
                logits, boxes = a[:, FEATURE_DIM:-4], a[:, -4:]
                prob = np.exp(logits - logits.max(1, keepdims=True))
                prob /= prob.sum(1, keepdims=True)
                sc = S.Scene.from_dict(meta[img]["scene"])
                src = np.asarray(meta[img]["proposal_source"])
                kind = np.asarray(meta[img]["proposal_kind"])
                toks, gt = _decode(fp[img][()]), fp[img + "_gt"][()]
                for si, sent in enumerate(toks):
                    for pi, words in enumerate(sent):
                        if not words or gt[si, pi, 3] <= 0:
                            continue
                        hits = S.box_iou_np(boxes, gt[si, pi][None])[:, 0] > 0.5
                        n += 1
                        upper += hits.any()
                        rand += hits[rng.integers(len(boxes))]
                        teacher += hits[int(np.argmax(prob[:, classes.index(p2l[" ".join(words)])]))]
                        # oracle: a whole-object proposal made from an object of the phrase's true category
                        inside = [
                            o
                            for o in sc.objects
                            if S.box_iou_np(np.array([o.box]), gt[si, pi][None])[0, 0] > 0
                            and gt[si, pi][0] <= o.box[0]
                            and gt[si, pi][2] >= o.box[2]
                        ]
                        cats = {o.category for o in inside}
                        cand = [
                            r
                            for r in range(len(boxes))
                            if src[r] >= 0 and kind[r] == 0 and sc.objects[src[r]].category in cats
                        ]
                        if cand:
                            oracle += hits[cand[int(np.argmax(prob[cand, 1:].max(1)))]]
    return {"n": n, "teacher": teacher / n, "oracle": oracle / n, "random": rand / n, "upper": upper / n}


def test_signal_between_floor_and_ceiling(world):
    """Chance << detector teacher < category oracle <= proposal upper bound < 1."""
    fig = _figures(world)
    assert fig["n"] > 150
    assert fig["random"] < 0.3
    assert 0.5 < fig["upper"] < 1.0
    assert fig["teacher"] > 2 * fig["random"] + 0.1
    assert fig["teacher"] < fig["upper"] - 0.1
    assert fig["oracle"] > fig["teacher"]
    stats = load_manifest(world)["info"]["stats"]["train"]
    assert stats["chance_r1"] < stats["teacher_r1"] < stats["upper_bound"] < 1.0


def test_region_features_carry_category(world):
    """Backbone features of whole-object proposals: leave-one-out nearest neighbour recovers the
    category far above chance; part boxes and clutter differ from whole boxes."""
    meta = {m["id"]: m for m in map(json.loads, (world / "meta" / "scenes.jsonl").read_text().splitlines())}
    X, y = [], []
    for s in SPLITS:
        with h5py.File(world / f"region_features_{s}.hdf5", "r") as fr:
            for img in fr:
                a = fr[img][()]
                sc = S.Scene.from_dict(meta[img]["scene"])
                for r, (src, kd) in enumerate(zip(meta[img]["proposal_source"], meta[img]["proposal_kind"])):
                    if src >= 0 and kd == 0:
                        X.append(a[r, :FEATURE_DIM])
                        y.append(sc.objects[src].category)
    X = np.asarray(X)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.asarray(y)
    sim = X @ X.T
    np.fill_diagonal(sim, -np.inf)
    acc = float((y[sim.argmax(1)] == y).mean())
    chance = max(np.mean(y == c) for c in set(y))
    assert acc > 2 * chance and acc > 0.3, (acc, chance)


def test_same_seed_byte_identical_and_knobs(tmp_path):
    a = generate("phrase", "tiny", seed=3, out=tmp_path / "a", progress=False, n_images=6, n_proposals=12)
    b = generate("phrase", "tiny", seed=3, out=tmp_path / "b", progress=False, n_images=6, n_proposals=12)
    fa, fb = load_manifest(a)["files"], load_manifest(b)["files"]
    assert fa == fb
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    man = load_manifest(a)
    assert man["info"]["images"] == {"train": 4, "val": 1, "test": 1}
    with h5py.File(a / "region_features_val.hdf5", "r") as f:
        assert f[next(iter(f))].shape[0] == 12


def test_make_image_does_not_depend_on_size():
    classes = S.detector_vocabulary("world")
    k = dict(PH.DEFAULTS)
    r1 = PH.make_image(5, "x", "train", 0, k, classes)
    r2 = PH.make_image(5, "x", "train", 0, k, classes)
    assert r1.scene == r2.scene and np.array_equal(r1.logits, r2.logits) and r1.sentences == r2.sentences


def test_knobs_change_difficulty():
    classes = S.detector_vocabulary("world")
    base = dict(PH.DEFAULTS)

    def part_share(rate):
        ks = dict(base, part_rate=rate, miss_rate=0.0)
        recs = [PH.make_image(i, str(i), "train", 0, ks, classes) for i in range(20)]
        kinds = np.concatenate([r.kind for r in recs])
        return float((kinds == 1).mean())

    assert part_share(0.0) == 0.0 and part_share(0.8) > 0.3
    clean = [
        PH.make_image(i, str(i), "train", 0, dict(base, confusion=0.0, teacher_noise=0.2), classes) for i in range(30)
    ]
    noisy = [
        PH.make_image(i, str(i), "train", 0, dict(base, confusion=0.6, teacher_noise=2.0), classes) for i in range(30)
    ]
    truth = {}
    for r in clean + noisy:
        for sent in r.phrases():
            for toks, eid in sent:
                ent = r.entity(eid)
                if ent.kind == "box":
                    truth[" ".join(toks)] = S.detector_class(r.scene.objects[ent.objects[0]].category, "world")
    assert (
        PH.teacher_stats(clean, truth, classes)["teacher_r1"]
        > PH.teacher_stats(noisy, truth, classes)["teacher_r1"] + 0.05
    )
    with pytest.raises(ValueError, match="unknown knob"):
        generate("phrase", "tiny", out="/nonexistent/x", progress=False, n_imgs=3)


def test_bad_knob_values(tmp_path):
    with pytest.raises(ValueError, match="part_rate"):
        generate("phrase", "tiny", out=tmp_path / "x", progress=False, part_rate=1.5)
    with pytest.raises(ValueError, match="detector"):
        generate("phrase", "tiny", out=tmp_path / "y", progress=False, detector="imagenet")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_every_knob_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "benchmark_world.md").read_text()
    for name in PH.DEFAULTS:
        assert f"`{name}`" in doc, name


def test_prototype_features_without_pixels(tmp_path):
    """The large-size path: no rendering of the world's images, features drawn from a small
    rendered reference set's real features per (category, proposal kind)."""
    out = generate(
        "phrase",
        "tiny",
        seed=1,
        out=tmp_path / "p",
        progress=False,
        n_images=10,
        features="prototype",
        images=False,
        reference_images=12,
    )
    man = load_manifest(out)
    assert man["knobs"]["features"] == "prototype" and "reference_features_s" in man["info"]["timings"]
    assert not (out / "flickr30k_entities" / "flickr30k-images").exists()
    assert len(list((out / "flickr30k_entities" / "Sentences").iterdir())) == 10
    meta = {m["id"]: m for m in map(json.loads, (out / "meta" / "scenes.jsonl").read_text().splitlines())}
    feats, cats = [], []
    with h5py.File(out / "region_features_train.hdf5", "r") as f:
        for k in f:
            a = f[k][()]
            assert a.shape[1] == FEATURE_DIM + len(S.detector_vocabulary("world")) + 1 + 4 and np.isfinite(a).all()
            sc = S.Scene.from_dict(meta[k]["scene"])
            for r, (src, kd) in enumerate(zip(meta[k]["proposal_source"], meta[k]["proposal_kind"])):
                if src >= 0 and kd == 0:
                    feats.append(a[r, :FEATURE_DIM])
                    cats.append(sc.objects[src].category)
    feats, cats = np.asarray(feats), np.asarray(cats)
    # same-category whole-object features are closer than different-category ones
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = f @ f.T
    same = cats[:, None] == cats[None, :]
    np.fill_diagonal(same, False)
    diff = cats[:, None] != cats[None, :]
    assert same.any() and sim[same].mean() > sim[diff].mean()


def test_error_breakdown_causes(world):
    """The world's diagnosis: a score that picks a GT-hitting box is all hits; one that picks clutter
    is all clutter; a part box of the target is a part error; counts always sum to the phrases."""
    import torch
    from experiment_scripts import load_experiment

    from groundkit.config import load_config
    from groundkit.methods.wang21 import Wang21Config, Wang21Dataset, resolve_paths
    from groundkit.metrics import box_iou

    error_breakdown = load_experiment("wang21_tables").error_breakdown

    over = {
        "data.region_feat_path": str(world / "region_features_{split}.hdf5"),
        "data.phrase_feat_path": str(world / "phrase_features_{split}.hdf5"),
        "data.glove_path": str(world / "glove.hdf5"),
    }
    cfg = load_config(Wang21Config, "world_reference_nce", over, method="wang21")
    ds = Wang21Dataset(cfg, "test", *resolve_paths(cfg.data, "test"))
    scenes = {json.loads(x)["id"]: json.loads(x) for x in (world / "meta" / "scenes.jsonl").read_text().splitlines()}

    def by_rule(rule):
        def fn(b):
            B, P, N = b["gt_boxes"].shape[0], b["gt_boxes"].shape[1], b["region_boxes"].shape[1]
            out = torch.zeros(B, P, N)
            for i in range(B):
                kind = torch.tensor(scenes[ds.image_ids[int(b["image_index"][i])]]["proposal_kind"])
                iou = box_iou(b["gt_boxes"][i].float(), b["region_boxes"][i].float())  # [P, N]
                out[i] = rule(iou, kind)
            return out

        return fn

    oracle = error_breakdown(by_rule(lambda iou, kind: iou), ds, world)
    n = oracle["num_phrases"]
    assert n > 20 and sum(oracle["counts"].values()) == n
    hits_possible = oracle["counts"]["hit"]
    assert hits_possible / n > 0.8  # the best-IoU box hits unless no proposal does (upper bound ~0.9)
    clutter = error_breakdown(
        by_rule(lambda iou, kind: (kind == 2).float()[None].expand_as(iou) - 1e-3 * iou), ds, world
    )
    assert clutter["counts"]["clutter"] + clutter["counts"]["hit"] == n and clutter["counts"]["clutter"] > 0.9 * n
    part = error_breakdown(
        by_rule(lambda iou, kind: (kind == 1).float()[None] * (iou > 0.05).float() + 0.01 * iou), ds, world
    )
    assert part["counts"]["part_of_target"] > 0.3 * n, part["counts"]


def test_breakdown_of_a_trained_checkpoint(world, tmp_path):
    """From a run's checkpoint: the causes cover every test phrase and the hits are the run's R@1
    (up to the tie rule at IoU = 0.5 exactly)."""
    import torch
    from experiment_scripts import load_experiment

    from groundkit.config import load_config
    from groundkit.engine import fit
    from groundkit.methods.wang21 import METHOD, Wang21Config

    breakdown_of_checkpoint = load_experiment("wang21_tables").breakdown_of_checkpoint

    torch.set_num_threads(1)
    over = {
        "data.region_feat_path": str(world / "region_features_{split}.hdf5"),
        "data.phrase_feat_path": str(world / "phrase_features_{split}.hdf5"),
        "data.glove_path": str(world / "glove.hdf5"),
        "train.max_steps": 3,
        "train.batch_size": 8,
        "train.progress": False,
        "train.tensorboard": False,
        "train.output_dir": str(tmp_path / "run"),
        "model.lstm_hidden": 16,
        "model.mlp_hidden": 32,
        "model.embed_dim": 16,
    }
    final = fit(METHOD, load_config(Wang21Config, "world_reference_nce", over, method="wang21"))["final"]
    r = breakdown_of_checkpoint(tmp_path / "run" / "checkpoints" / "best", world)
    n = r["num_phrases"]
    assert n == final["num_phrases"] and sum(r["counts"].values()) == n
    assert abs(100 * r["fractions"]["hit"] - final["R@1"]) <= 100.0 / n  # R@1 in percent
