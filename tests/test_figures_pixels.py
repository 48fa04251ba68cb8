"""Demo figures of tiny runs: each method's demo_figures writes n PNG files of the expected size with the true box
drawn, and the reliability figure draws its threshold line where the threshold is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_clipvg_e2e import config as clipvg_config

from groundkit.config import load_config
from groundkit.engine import fit
from groundkit.errors import DataError
from groundkit.methods import get_method
from groundkit.methods.base import Figure
from groundkit.world import generate

torch.set_num_threads(1)

QUIET = {"train.progress": False, "train.tensorboard": False, "train.threads": 1, "train.log_every": 1000}


def _colour_pixels(path, colour) -> int:
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    return int((a == np.asarray(colour, dtype=np.uint8)).all(-1).sum())


def _check(figs, out, n, sizes, colour):
    assert len(figs) == n and all(isinstance(f, Figure) for f in figs)
    assert len({f.file for f in figs}) == n
    for f, size in zip(figs, sizes):
        assert (out / f.file).is_file() and f.caption
        with Image.open(out / f.file) as im:
            assert im.format == "PNG" and im.size == size
        assert _colour_pixels(out / f.file, colour) > 20  # the true box is drawn


def test_clipvg_test_samples_with_true_and_predicted_boxes(tmp_path):
    from groundkit.methods.clipvg import visualize

    world = generate("pseudo", size="tiny", seed=0, progress=False)
    method, cfg = clipvg_config(world, tmp_path, **{"train.max_steps": 2, "train.batch_size": 8, "train.val_split": ""})
    fit(method, cfg, final_split=None)
    out = tmp_path / "figs"
    figs = method.demo_figures(tmp_path / "run", out, n=3)
    from groundkit.methods.clipvg.data import load_samples

    samples = load_samples(cfg.data, "test")
    picked = [int(f.caption.split(":")[0].split()[-1]) for f in figs]
    assert picked == [0, len(samples) // 2, len(samples) - 1]  # evenly spaced over the test list, deterministic
    sizes = []
    for i in picked:
        with Image.open(world / "images/mscoco/images/train2014" / samples[i].img_file) as im:
            k = max(1, visualize.MIN_SIDE // max(im.size))
            sizes.append((im.width * k, im.height * k))
    _check(figs, out, 3, sizes, visualize.TRUE_COLOUR)
    assert all(samples[i].phrase in f.caption and "IoU" in f.caption for i, f in zip(picked, figs))
    assert [f.file for f in method.demo_figures(tmp_path / "run", out, n=3)] == [f.file for f in figs]


def _cogrounding_run(tmp_path, config, over):
    from pathlib import Path

    method = get_method("cogrounding")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        method.config_class,
        root / f"groundkit/methods/cogrounding/configs/{config}.yaml",
        {
            "world.size": "",
            "data.image_size": 64,
            "data.val_split": "train",
            "model.dim": 16,
            "model.vocab_size": 500,
            "model.text_encoder": "lstm",
            "train.epochs": 1,
            "train.output_dir": str(tmp_path / "run"),
            **QUIET,
            **over,
        },
    )
    fit(method, cfg, final_split=None)
    return method, tmp_path / "run"


def test_cogrounding_video_film_strips(tmp_path):
    from groundkit.methods.cogrounding import visualize

    world = generate("video", size="tiny", seed=0, progress=False)
    method, run = _cogrounding_run(tmp_path, "world_video", {"data.root": str(world), "data.frame_stride": 4})
    out = tmp_path / "figs"
    figs = method.demo_figures(run, out, n=2)
    frame = next((world / "ILSVRC/Data/VID/test").rglob("*.JPEG"))
    with Image.open(frame) as im:
        w, h = im.size
    k = max(1, visualize.TILE_SIDE[0] // max(w, h))  # small frames: enlarged by an integer factor
    m = visualize.STRIP_FRAMES
    size = (m * w * k + (m - 1) * visualize.GAP, h * k + visualize.BAND)
    _check(figs, out, 2, [size, size], visualize.TRUE_COLOUR)
    assert all("Acc@0.5" in f.caption and '"' in f.caption for f in figs)


def test_cogrounding_image_run_draws_test_images(tmp_path):
    from groundkit.methods.cogrounding import visualize

    world = generate("refexp", size="tiny", seed=0, progress=False)
    method, run = _cogrounding_run(tmp_path, "world_image", {"data.data_root": str(world)})
    out = tmp_path / "figs"
    figs = method.demo_figures(run, out, n=2)
    assert all(f.file.startswith("cogrounding_image_") and "IoU" in f.caption for f in figs)
    sizes = []
    for f in figs:
        with Image.open(out / f.file) as im:
            sizes.append(im.size)
    assert all(max(s) >= visualize.MIN_SIDE for s in sizes)
    _check(figs, out, 2, sizes, visualize.TRUE_COLOUR)


def test_reliability_figure_draws_the_threshold_line(tmp_path):
    from groundkit.methods.clipvg.pseudo import PLOT_MARGINS, THRESHOLD_COLOUR, save_histogram
    from groundkit.methods.clipvg.visualize import reliability_figure

    rng = np.random.default_rng(0)
    r = np.concatenate([rng.beta(5, 2, 400), np.zeros(20)]).astype(np.float32)
    files = save_histogram(r, tmp_path / "reliability" / "template_by_template", title="template SR")
    left, right, top, bottom = PLOT_MARGINS
    for source, h in ((files.json, 0.3), (files.npz, 0.62), (files.npz.with_suffix(""), 0.0)):
        path = reliability_figure(source, h, tmp_path / f"h{h}.png")
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        W, H = a.shape[1], a.shape[0]
        line = (a == np.asarray(THRESHOLD_COLOUR, dtype=np.uint8)).all(-1)
        x = round(left + (W - left - right) * h)
        rows = line[top : H - bottom, x]
        assert rows.sum() > 0.9 * (H - top - bottom - 2), (source, h)  # a full-height line at the threshold
        cols = np.flatnonzero(line[top + 30 : H - bottom].any(0))
        assert cols.min() >= x - 1 and cols.max() <= x + 1  # and nowhere else (its label sits at the top)
    # the plot without a threshold (what the curriculum writes) has no line
    with Image.open(files.png) as im:
        assert not (np.asarray(im.convert("RGB")) == np.asarray(THRESHOLD_COLOUR, dtype=np.uint8)).all(-1).any()
    with pytest.raises(DataError, match="npz"):
        reliability_figure(tmp_path / "missing.json", 0.5, tmp_path / "x.png")
