"""Fuzz corpus over every reader: each data file groundkit reads, made truncated, zero-byte, garbage,
wrong-shape and wrong-type, and fed to the command that reads it. Every variant must end with exit
status 2 and one line on stderr that names the file (no traceback), and leave no partial output.

Readers without a command of their own are read through ``groundkit data inspect KIND PATH``; the
files of a training (HDF5, pickles, YAML) also go through ``groundkit train``, checkpoints through
``groundkit eval``, released feature pickles through ``convert-experts``, refer files through
``refer-to-transvg``, VID-Sentence through ``vid-sentence-to-pth``, Flickr30K through
``prepare-flickr30k`` and videos through ``extract-experts``.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_model

from groundkit import cli

VARIANTS = ("truncated", "zero-byte", "garbage", "wrong-shape", "wrong-type")


def _garbage(n: int = 300) -> bytes:
    rng = random.Random(n)
    return b"\xff\xfe\x00\x80" + bytes(rng.randrange(256) for _ in range(n))


def _half(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _h5_bytes(tmp: Path, data: dict[str, np.ndarray]) -> bytes:
    p = tmp / "_build.h5"
    with h5py.File(p, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    b = p.read_bytes()
    p.unlink()
    return b


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@dataclass
class Case:
    """A reader fed through a command: ``setup(tmp)`` writes the valid inputs and returns ``(argv, bad
    file, outputs that must not exist afterwards)``; ``variants[v]`` gives the bad file's bytes."""

    setup: Callable[[Path], tuple[list[str], Path, list[Path]]]
    variants: Callable[[Path], dict[str, bytes]]
    kinds: tuple[str, ...] = VARIANTS
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- wang21 HDF5 files


def _region_ok(tmp):
    rows = np.random.default_rng(0).random((3, 4 + 3 + 4)).astype(np.float32)
    rows[:, -4:] = [1, 1, 6, 6]  # boxes x1 y1 x2 y2
    return _h5_bytes(tmp, {"img1": rows})


def _phrase_ok(tmp):
    toks = np.array([[["a", "man", ""], ["the", "dog", ""]]], dtype="S")
    gt = np.array([[[1, 1, 3, 3], [0, 0, 0, 0]]], dtype=np.float32)
    return _h5_bytes(tmp, {"img1": toks, "img1_gt": gt})


def _glove_ok(tmp):
    return _h5_bytes(tmp, {w: np.ones(5, np.float32) for w in ("a", "man", "the", "dog")})


def _region_variants(tmp):
    ok = _region_ok(tmp)
    return {
        "truncated": _half(ok),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": _h5_bytes(tmp, {"img1": np.zeros((3, 9), np.float32)}),
        "wrong-type": _h5_bytes(tmp, {"img1": np.array([["x"] * 11] * 3, dtype="S")}),
    }


def _phrase_variants(tmp):
    return {
        "truncated": _half(_phrase_ok(tmp)),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": _h5_bytes(tmp, {"img1": np.array([["a", "b"]], dtype="S"), "img1_gt": np.zeros((1, 4))}),
        "wrong-type": _h5_bytes(
            tmp, {"img1": np.array([[["a"]]], dtype="S"), "img1_gt": np.array([[["x"] * 4]], dtype="S")}
        ),
    }


def _glove_variants(tmp):
    return {
        "truncated": _half(_glove_ok(tmp)),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": _h5_bytes(tmp, {"a": np.ones(5, np.float32), "man": np.ones(6, np.float32)}),
        "wrong-type": _h5_bytes(tmp, {"a": np.array(["x"] * 5, dtype="S")}),
    }


def _inspect(kind: str, name: str, *opts: str):
    def setup(tmp):
        bad = tmp / name
        return ["data", "inspect", kind, str(bad), *opts], bad, []

    return setup


def _wang21_train(which: str):
    """``groundkit train wang21`` with one of its three files bad; the run folder must not appear."""

    def setup(tmp):
        files = {"region": tmp / "region.h5", "phrase": tmp / "phrase.h5", "glove": tmp / "glove.h5"}
        files["region"].write_bytes(_region_ok(tmp))
        files["phrase"].write_bytes(_phrase_ok(tmp))
        files["glove"].write_bytes(_glove_ok(tmp))
        out = tmp / "run"
        argv = [
            "train",
            "wang21",
            "reference_nce",
            "--region-feat-path",
            str(files["region"]),
            "--phrase-feat-path",
            str(files["phrase"]),
            "--glove-path",
            str(files["glove"]),
            "--output-dir",
            str(out),
            "--set",
            "data.region_dim=4",
            "data.captions_per_image=1",
            "train.progress=false",
        ]
        return argv, files[which], [out]

    return setup


# ----------------------------------------------------------------------------- Collaborative Experts pickles


def _ce_root(tmp: Path) -> Path:
    root = tmp / "released"
    root.mkdir(exist_ok=True)
    for split in ("train", "val", "test"):
        (root / f"{split}_list_full.txt").write_text("v1\nv2\n")
    (root / "feat.pkl").write_bytes(_pickle({"v1": np.ones(4, np.float32), "v2": np.zeros(4, np.float32)}))
    (root / "text.pkl").write_bytes(_pickle({v: [np.ones((3, 5), np.float32)] for v in ("v1", "v2")}))
    (root / "raw-captions.pkl").write_bytes(_pickle({v: [["a", "dog"]] for v in ("v1", "v2")}))
    return root


def _ce_variants(tmp):
    ok = _pickle({"v1": np.ones(4, np.float32), "v2": np.zeros(4, np.float32)})
    return {
        "truncated": _half(ok),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": _pickle({"v1": np.ones((2, 3, 4), np.float32), "v2": np.ones(4, np.float32)}),
        "wrong-type": _pickle({"v1": "a caption, not features", "v2": np.ones(4, np.float32)}),
    }


def _convert_experts(tmp):
    root = _ce_root(tmp)
    out = tmp / "store"
    argv = ["data", "convert-experts", "--root", str(root), "--out", str(out)]
    argv += ["--expert", "e=feat.pkl", "--text", "t=text.pkl"]
    return argv, root / "feat.pkl", [out]


def _crosskd_train(tmp):
    root = _ce_root(tmp)
    out = tmp / "run"
    argv = ["train", "crosskd", "synth_ce", "--output-dir", str(out), "--set", f"data.root={root}"]
    argv += ["data.experts={e: feat.pkl}", "data.text_path=text.pkl", "data.text_feat=t", "train.progress=false"]
    return argv, root / "feat.pkl", [out, tmp / "released.store"]


# ----------------------------------------------------------------------------- refer (RefCOCO) pickles and JSON

_REF = {
    "ref_id": 1,
    "ann_id": 10,
    "image_id": 5,
    "split": "train",
    "sentences": [{"tokens": ["a", "man"], "raw": "a man", "sent_id": 1, "sent": "a man"}],
    "sent_ids": [1],
    "category_id": 1,
    "file_name": "COCO_train2014_000000000005_10.jpg",
}
_INSTANCES = {
    "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 20, "height": 20}],
    "annotations": [{"id": 10, "image_id": 5, "bbox": [1, 1, 5, 5], "category_id": 1}],
    "categories": [{"id": 1, "name": "person"}],
}


def _refer(which: str):
    def setup(tmp):
        d = tmp / "refer" / "refcoco"
        d.mkdir(parents=True)
        (d / "refs(unc).p").write_bytes(_pickle([_REF]))
        (d / "instances.json").write_text(json.dumps(_INSTANCES))
        out = tmp / "splits"
        argv = ["data", "refer-to-transvg", "--data-root", str(tmp / "refer"), "--split-root", str(out)]
        return argv, d / ("refs(unc).p" if which == "refs" else "instances.json"), [out]

    return setup


def _refs_variants(tmp):
    return {
        "truncated": _half(_pickle([_REF])),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": _pickle([{"ref_id": 1, "ann_id": 10}]),
        "wrong-type": _pickle({"refs": [_REF]}),
    }


def _instances_variants(tmp):
    return {
        "truncated": _half(json.dumps(_INSTANCES).encode()),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": json.dumps({**_INSTANCES, "images": [{"file_name": "x.jpg"}]}).encode(),
        "wrong-type": json.dumps([_INSTANCES]).encode(),
    }


# ----------------------------------------------------------------------------- TransVG and co-grounding .pth lists


def _transvg_variants(tmp):
    ok = [("a.jpg", "10.pth", [1.0, 2.0, 3.0, 4.0], "a man", [])]
    return {
        "truncated": _half(_torch_bytes(ok)),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": _torch_bytes([("a.jpg", [1.0, 2.0, 3.0, 4.0], "a man")]),
        "wrong-type": _torch_bytes({"samples": ok}),
    }


def _video_level_variants(tmp):
    ok = [[["f/000000.JPEG", [1, 1, 4, 4], "a dog"]]]
    return {
        "truncated": _half(_torch_bytes(ok)),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": _torch_bytes([[["f/000000.JPEG", [1, 1, 4, 4]]]]),
        "wrong-type": _torch_bytes([[["f/000000.JPEG", ["x", 1, 4, 4], "a dog"]]]),
    }


# ----------------------------------------------------------------------------- VID-Sentence JSON and lists

_TRACK = {"frame": 1, "bbox": [1, 1, 4, 4], "frame_size": [10, 10], "class": "dog", "class_index": 1}
_TRACK.update({"occluded": 0, "generated": 0, "name": "n"})
_TUBE = {"video": "vid1", "annotations": [{"id": "0", "track": [_TRACK]}]}


def _vid(which: str):
    def setup(tmp):
        root = tmp / "ILSVRC"
        lists = root / "Data" / "VID" / "annSamples"
        lists.mkdir(parents=True)
        (lists / "val_valid_list.txt").write_text("vid1,0\n")
        (lists / "val_ann_list_v2.txt").write_text("0, a dog runs\n")
        tube = root / "Annotations" / "VID" / "tubeGt" / "val" / "vid1.js"
        tube.parent.mkdir(parents=True)
        tube.write_text(json.dumps(_TUBE))
        out = tmp / "VID_video_level_val.pth"
        argv = ["data", "vid-sentence-to-pth", "--root", str(root), "--split", "val", "--out", str(out)]
        return argv, tube if which == "tube" else lists / "val_ann_list_v2.txt", [out]

    return setup


def _tube_variants(tmp):
    bad_box = {**_TUBE, "annotations": [{"id": "0", "track": [{**_TRACK, "bbox": [1, 1, 4]}]}]}
    return {
        "truncated": _half(json.dumps(_TUBE).encode()),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": json.dumps(bad_box).encode(),
        "wrong-type": json.dumps([_TUBE]).encode(),
    }


def _caption_list_variants(tmp):
    return {
        "truncated": b"0",
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": b"0 a dog runs without the comma\n",
        "wrong-type": b"first, a dog runs\n",
    }


# ----------------------------------------------------------------------------- Flickr30K Entities

_SENT = "[/EN#1/people A man] rides [/EN#2/animals a horse] .\n"
_XML = (
    "<annotation><size><width>20</width><height>20</height><depth>3</depth></size>"
    "<object><name>1</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
    "</annotation>"
)


def _flickr(which: str):
    def setup(tmp):
        root = tmp / "flickr"
        (root / "Sentences").mkdir(parents=True)
        (root / "Annotations").mkdir()
        (root / "Sentences" / "1.txt").write_text(_SENT)
        (root / "Annotations" / "1.xml").write_text(_XML)
        (tmp / "ids.txt").write_text("1\n")
        out = tmp / "phrase.h5"
        argv = ["data", "prepare-flickr30k", "--root", str(root), "--image-list", str(tmp / "ids.txt")]
        argv += ["--out", str(out), "--sentences-per-image", "1"]
        bad = root / ("Sentences/1.txt" if which == "sentences" else "Annotations/1.xml")
        return argv, bad, [out]

    return setup


def _sentence_variants(tmp):
    return {
        "truncated": _SENT[:18].encode(),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": b"[/EN#1/people A man [/EN#2/animals a horse] .\n",
        "wrong-type": b"[/EN#1 A man] rides .\n",
    }


def _xml_variants(tmp):
    return {
        "truncated": _half(_XML.encode()),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": b"<annotation><object><name>1</name></object></annotation>",
        "wrong-type": _XML.replace("<width>20</width>", "<width>wide</width>").encode(),
    }


# ----------------------------------------------------------------------------- checkpoints, configs, media


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import regression_method  # noqa: F401  (the test method)

    cli.METHODS["regression"] = "regression_method"
    out = tmp_path_factory.mktemp("ckpt") / "run"
    rc = cli.main(["train", "regression", "--output-dir", str(out), "--set", "train.epochs=1", "train.progress=false"])
    assert rc == 0
    yield out
    del cli.METHODS["regression"]


def _checkpoint_setup(tmp, run: Path):
    import shutil

    copy = tmp / "run"
    shutil.copytree(run, copy)
    return ["eval", str(copy)], copy / "checkpoints" / "best" / "model.safetensors", [copy / "metrics.json.eval"]


def _safetensors_variants(tmp):
    p = tmp / "_other.safetensors"
    save_model(torch.nn.Linear(3, 2), str(p))
    other = p.read_bytes()
    p.unlink()
    return {
        "truncated": b"",  # replaced below by half of the real file
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": other,
        "wrong-type": _torch_bytes({"0.weight": torch.zeros(16, 8)}),
    }


def _yaml(tmp):
    bad = tmp / "cfg.yaml"
    out = tmp / "run"
    return ["train", "regression", str(bad), "--output-dir", str(out)], bad, [out]


def _yaml_variants(tmp):
    return {
        "truncated": b"train:\n  epochs: [1, 2\n",
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": b"train: 5\n",
        "wrong-type": b"- train\n- optim\n",
    }


def _png(size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _image_variants(tmp):
    ok = _png()
    return {
        "truncated": _half(ok),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": ok[:16] + (0).to_bytes(4, "big") + ok[20:],  # a header claiming 0 pixels wide
        "wrong-type": json.dumps({"not": "an image"}).encode(),
    }


def _video_bytes(tmp, audio_only: bool = False) -> bytes:
    av = pytest.importorskip("av")
    p = tmp / "_v.mp4"
    with av.open(str(p), "w") as c:
        if audio_only:
            s = c.add_stream("aac", rate=8000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 8000
            for pkt in [*s.encode(frame), *s.encode()]:
                c.mux(pkt)
        else:
            s = c.add_stream("mpeg4", rate=5)
            s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
            for i in range(4):
                fr = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
                for pkt in s.encode(fr):
                    c.mux(pkt)
            for pkt in s.encode():
                c.mux(pkt)
    b = p.read_bytes()
    p.unlink()
    return b


def _video(tmp):
    d = tmp / "videos"
    d.mkdir()
    out = tmp / "store"
    return ["data", "extract-experts", "--videos", str(d), "--out", str(out), "--quiet"], d / "clip.mp4", [out]


def _video_variants(tmp):
    return {
        "truncated": _half(_video_bytes(tmp)),
        "zero-byte": b"",
        "garbage": _garbage(),
        "wrong-shape": _video_bytes(tmp, audio_only=True),  # a container without a video stream
        "wrong-type": json.dumps({"not": "a video"}).encode(),
    }


CASES: dict[str, Case] = {
    "region-hdf5": Case(_inspect("region-hdf5", "region.h5", "--region-dim", "4"), _region_variants),
    "phrase-hdf5": Case(_inspect("phrase-hdf5", "phrase.h5"), _phrase_variants),
    "glove-hdf5": Case(_inspect("glove-hdf5", "glove.h5"), _glove_variants),
    "train-region-hdf5": Case(_wang21_train("region"), _region_variants),
    "train-phrase-hdf5": Case(_wang21_train("phrase"), _phrase_variants),
    "train-glove-hdf5": Case(_wang21_train("glove"), _glove_variants),
    "ce-pickle": Case(_inspect("ce-expert", "feat.pkl"), _ce_variants),
    "convert-experts-pickle": Case(_convert_experts, _ce_variants),
    "train-crosskd-pickle": Case(_crosskd_train, _ce_variants, kinds=("truncated", "garbage", "wrong-type")),
    "refer-pickle": Case(_refer("refs"), _refs_variants),
    "refer-json": Case(_refer("instances"), _instances_variants),
    "transvg-pth": Case(_inspect("transvg", "unc_train.pth", "--dataset", "unc"), _transvg_variants),
    "video-level-pth": Case(_inspect("video-level", "VID_video_level_val.pth"), _video_level_variants),
    "vid-sentence-json": Case(_vid("tube"), _tube_variants),
    "vid-sentence-list": Case(_vid("captions"), _caption_list_variants),
    "flickr30k-sentences": Case(_flickr("sentences"), _sentence_variants),
    "flickr30k-xml": Case(_flickr("xml"), _xml_variants),
    "yaml-config": Case(_yaml, _yaml_variants),
    "image": Case(_inspect("image", "photo.png"), _image_variants),
    "video": Case(_video, _video_variants),
}


def _leftovers(paths: list[Path]) -> list[Path]:
    """Outputs that exist, and temporary files beside them."""
    out = [p for p in paths if p.exists()]
    for p in paths:
        if p.parent.is_dir():
            out += [q for q in p.parent.iterdir() if q.name.startswith(".") and "tmp" in q.name]
    return out


def _check(argv: list[str], bad: Path, outputs: list[Path], capsys) -> None:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("groundkit")]  # progress notes may precede it
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]) and "Traceback" not in err, err
    assert str(bad) in lines[0], lines[0]
    assert _leftovers(outputs) == [], _leftovers(outputs)


@pytest.mark.parametrize("reader", list(CASES))
def test_every_bad_variant_is_one_line_naming_the_file(reader, tmp_path, capsys, monkeypatch):
    import regression_method  # noqa: F401

    monkeypatch.setitem(cli.METHODS, "regression", "regression_method")
    case = CASES[reader]
    variants = case.variants(tmp_path)
    for kind in case.kinds:
        work = tmp_path / kind
        work.mkdir()
        argv, bad, outputs = case.setup(work)
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(variants[kind])
        _check(argv, bad, outputs, capsys)


@pytest.mark.parametrize("kind", VARIANTS)
def test_bad_checkpoints_are_one_line_naming_the_file(kind, trained_run, tmp_path, capsys):
    argv, bad, outputs = _checkpoint_setup(tmp_path, trained_run)
    variants = _safetensors_variants(tmp_path)
    variants["truncated"] = _half(bad.read_bytes())
    before = sorted(p.relative_to(bad.parents[2]) for p in bad.parents[2].rglob("*"))
    bad.write_bytes(variants[kind])
    _check(argv, bad, outputs, capsys)
    assert sorted(p.relative_to(bad.parents[2]) for p in bad.parents[2].rglob("*")) == before  # eval wrote nothing
