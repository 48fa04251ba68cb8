"""End to end on the tiny built-in world: a short training fits better than chance, the predictor grounds a real
photo and a frame folder, bad input gets one clear line, the benchmark runs."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from groundkit.config import ConfigError, load_config
from groundkit.engine import fit
from groundkit.errors import DataError
from groundkit.methods import get_method
from groundkit.methods.cogrounding.predict import CoGroundingPredictor, register

torch.set_num_threads(1)

WORLD_IMAGE_YAML = "groundkit/methods/cogrounding/configs/world_image.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from groundkit.world import generate

    return generate("refexp", size="tiny", seed=0, out=tmp_path_factory.mktemp("refexp_tiny"), progress=False)


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    from pathlib import Path

    method = get_method("cogrounding")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("cog_run")
    cfg = load_config(
        method.config_class,
        root / WORLD_IMAGE_YAML,
        {
            "world.size": "",
            "data.data_root": str(world),
            "data.image_size": 96,
            "data.val_split": "train",
            "model.dim": 64,
            "model.vocab_size": 2000,
            "model.text_encoder": "lstm",
            "train.epochs": 25,
            "train.batch_size": 16,
            "train.output_dir": str(out),
            "train.eval_every": 25,
            "optim.lr": 0.003,
            "data.flip": False,
        },
    )
    res = fit(method, cfg, final_split=None)
    return out, res


def test_tiny_training_beats_chance(run):
    out, res = run
    m = res["best"]
    # fitted on the training split (a fit check, not generalisation): far above picking a random annotated object
    assert m["samples"] > 40
    assert m["Acc@0.5"] > m["random_object"] + 15, m
    assert m["Acc@0.5"] <= m["upper_bound"]
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()


def test_predict_on_a_real_photo_and_frames(run, tmp_path):
    from sklearn.datasets import load_sample_image

    out, _ = run
    pred = CoGroundingPredictor(out)
    img = load_sample_image("china.jpg")  # 427 x 640 RGB
    res = pred.ground(img, ["the building on the left", "the small red tree"])
    assert [r["text"] for r in res] == ["the building on the left", "the small red tree"]
    for r in res:
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 <= x2 <= 639 and 0 <= y1 <= y2 <= 426 and np.isfinite(r["score"])
    frames = [Image.fromarray(np.roll(img, 8 * k, axis=1)) for k in range(4)]
    v = pred.ground_video(frames, "the building moving right")
    assert len(v["boxes"]) == 4 and len(v["scores"]) == 4
    # the command line writes a boxed image and prints the box
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    register(sub)
    src = tmp_path / "china.jpg"
    Image.fromarray(img).save(src)
    a = p.parse_args(
        ["refexp", str(src), "the building on the left", "--checkpoint", str(out), "--out", str(tmp_path / "boxed.png")]
    )
    assert a.func(a) == 0
    with Image.open(tmp_path / "boxed.png") as im:
        assert im.size == (640, 427)
    fdir = tmp_path / "frames"
    fdir.mkdir()
    for k, f in enumerate(frames):
        f.save(fdir / f"{k:03d}.jpg")
    a = p.parse_args(
        ["refexp", str(fdir), "the building", "--checkpoint", str(out), "--out", str(tmp_path / "vid_out")]
    )
    assert a.func(a) == 0 and len(list((tmp_path / "vid_out").glob("*.png"))) == 4


def test_bad_input_is_one_clear_line(run, tmp_path):
    out, _ = run
    pred = CoGroundingPredictor(out)
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        pred.ground(str(txt), ["the man"])
    with pytest.raises(DataError, match="no such image"):
        pred.ground(str(tmp_path / "missing.jpg"), ["the man"])
    img = Image.new("RGB", (32, 32))
    with pytest.raises(DataError, match="expression is empty"):
        pred.ground(img, ["  "])
    with pytest.raises(DataError, match="no frames"):
        pred.ground_video([], "the man")
    from groundkit.methods.cogrounding.predict import load_frames

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no frames"):
        load_frames(tmp_path / "empty")
    for e in (DataError("x"),):
        assert "\n" not in str(e)
    # a run of another method is refused in one line by the other predictors (exit 2 on the command line)
    from groundkit.cli import main  # noqa: PLC0415

    txt_img = tmp_path / "x.png"
    img.save(txt_img)
    assert main(["predict", "clipvg", str(txt_img), "the man", "--checkpoint", str(out)]) == 2
    with pytest.raises(Exception, match="is a cogrounding run, not a clipvg one"):
        get_method("clipvg").predictor(out)
    # the training split's dataset is for training: evaluating it says how to score those expressions instead
    method = get_method("cogrounding")
    with pytest.raises(ConfigError, match=r"data.test_splits=\[train\]"):
        method.evaluate(pred.model, method.build_dataset(pred.cfg, "train"), pred.cfg, torch.device("cpu"))


def test_bench_reports_ratio():
    from groundkit.bench.cogrounding import run_bench

    r = run_bench(size=64, frames=6, dim=16, repeats=1)
    assert r["same_boxes"] and r["ratio"] > 1.0
    assert json.dumps(r)


@pytest.mark.parametrize("key", ["data.val_split", "train.val_split"])
def test_a_test_split_is_refused_for_model_selection(world, key):
    method = get_method("cogrounding")
    cfg = load_config(
        method.config_class, WORLD_IMAGE_YAML, {"world.size": "", "data.data_root": str(world), key: "testB"}
    )
    with pytest.raises(ConfigError, match=rf"{key}='testB' is a test split"):
        method.build_dataset(cfg, "val")


@pytest.mark.parametrize("suffix, codec", [(".mp4", "mpeg4"), (".avi", "mpeg4"), (".webm", "libvpx")])
def test_video_files_are_decoded_with_pyav(tmp_path, suffix, codec):
    """A small video written here (a bright square moving right) comes back frame by frame, in order."""
    import av

    from groundkit.methods.cogrounding.predict import load_frames

    path = tmp_path / f"clip{suffix}"
    try:
        container = av.open(str(path), mode="w")
        stream = container.add_stream(codec, rate=5)
    except Exception as e:  # a codec this PyAV build lacks
        pytest.skip(f"PyAV cannot write {codec}: {e}")
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for t in range(6):
        a = np.zeros((48, 64, 3), np.uint8)
        a[16:32, 8 * t : 8 * t + 16] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    frames = load_frames(path)
    assert len(frames) == 6 and frames[0].size == (64, 48) and frames[0].mode == "RGB"
    centres = [float(np.nonzero(np.asarray(f.convert("L"))[24] > 128)[0].mean()) for f in frames]
    assert all(b > a for a, b in zip(centres, centres[1:]))  # the square moves right
    (tmp_path / "cut.mp4").write_bytes(path.read_bytes()[:40])
    (tmp_path / "text.mp4").write_text("not a video")
    for bad in ("cut.mp4", "text.mp4"):
        with pytest.raises(DataError, match=rf"{bad}: (cannot decode the video|the video has no frames)") as e:
            load_frames(tmp_path / bad)
        assert "\n" not in str(e.value)
