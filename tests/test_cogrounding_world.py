"""Co-grounding on the built-in world: the config names its world task (refexp or video) and resolve_world points
data.root at it; the frozen backbone's maps are cached on disk once per split and read back unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from groundkit.config import ConfigError, load_config
from groundkit.methods import get_method
from groundkit.methods.base import Method
from groundkit.methods.cogrounding.config import CoGroundingConfig
from groundkit.methods.cogrounding.data import ImageSample, RefExpDataset
from groundkit.runs import slug
from groundkit.world import resolve_world

torch.set_num_threads(1)

CONFIGS = Path(__file__).resolve().parents[1] / "groundkit/methods/cogrounding/configs"


@pytest.mark.parametrize(("config", "task", "n_train"), [("world_image", "refexp", 1), ("world_video", "video", 1)])
def test_world_task_per_config(config, task, n_train, tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDKIT_DATA", str(tmp_path / "worlds"))
    method = get_method("cogrounding")
    cfg = load_config(method.config_class, CONFIGS / f"{config}.yaml", {"world.size": "tiny"})
    assert cfg.world.task == task
    with pytest.raises(ConfigError, match="resolve_world"):
        method.build_dataset(cfg, "train")  # the method never builds the world itself
    resolve_world(method, cfg)
    assert Path(cfg.data.root).name.startswith(f"{task}-tiny-seed0")
    ds = method.build_dataset(cfg, "train")
    assert len(ds) >= n_train
    # a world task that does not fit the data kind is refused
    bad = load_config(
        method.config_class, CONFIGS / f"{config}.yaml", {"world.task": "video" if task == "refexp" else "refexp"}
    )
    bad.data.root = cfg.data.root
    with pytest.raises(ConfigError, match="does not fit"):
        method.build_dataset(bad, "train")


def test_world_size_without_a_task_is_an_error():
    class NoTask(Method):
        world_task = ""

    cfg = CoGroundingConfig()
    cfg.world.size = "tiny"
    with pytest.raises(ConfigError, match="no world task"):
        resolve_world(NoTask(), cfg)


class _Tiny(torch.nn.Module):
    """A frozen 'backbone' with three maps, counting how many images it saw."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return [torch.nn.functional.avg_pool2d(x, k) * self.w for k in (8, 16, 32)]


def test_feature_cache_file_is_written_once_and_read_back(tmp_path):
    paths = []
    for k in range(3):
        p = tmp_path / f"im{k}.png"
        Image.fromarray(np.full((40, 60, 3), 40 * k, np.uint8)).save(p)
        paths.append(p)
    cfg = CoGroundingConfig()
    cfg.data.image_size, cfg.data.feature_cache, cfg.data.flip = 64, str(tmp_path / "cache"), True
    cfg.model.vocab_size = 100
    samples = [ImageSample(p, (0, 0, 10, 10), "the thing") for p in paths]
    a, bb = RefExpDataset(cfg, samples, train=True), _Tiny()
    a.attach_backbone(bb)
    assert bb.seen == 32  # both flips of 3 images, once, in one chunk padded to 32 (maps independent of the chunk)
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1 and "64px" in files[0].name
    b, bb2 = RefExpDataset(cfg, samples, train=True), _Tiny()
    b.attach_backbone(bb2)
    assert bb2.seen == 0  # read from the file
    fa, fb = a.get_batch([0, 1, 2])["backbone_feats"], b.get_batch([0, 1, 2])["backbone_feats"]
    assert all(torch.equal(x, y) for x, y in zip(fa, fb))
    # another image list (here: evaluation, no flips) gets its own file
    RefExpDataset(cfg, samples, train=False).attach_backbone(_Tiny())
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_cached_maps_give_the_same_boxes_and_letterbox_as_pixels(tmp_path):
    from groundkit.transforms import letterbox, letterbox_info

    for w, h in [(60, 40), (33, 77), (128, 128), (5, 300)]:
        assert letterbox(Image.new("RGB", (w, h)), 64)[1] == letterbox_info(w, h, 64)
    p = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(p)
    cfg = CoGroundingConfig()
    cfg.data.image_size, cfg.model.vocab_size, cfg.data.affine, cfg.data.hsv_jitter = 64, 100, False, 0.0
    samples = [ImageSample(p, (5, 6, 30, 20), "the thing on the left")] * 4
    plain, cached = RefExpDataset(cfg, samples, train=True), RefExpDataset(cfg, samples, train=True)
    cached.attach_backbone(_Tiny())
    a, b = plain.get_batch([0, 1, 2, 3]), cached.get_batch([0, 1, 2, 3])
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["ids"], b["ids"])
    assert a["letterbox"] == b["letterbox"]


def test_cached_maps_use_the_frozen_backbones_running_statistics(tmp_path):
    """A new module is in training mode: caching must not use batch statistics nor move the running ones,
    or the maps a model trains on differ from the ones its predictor computes."""
    paths = []
    for k in range(4):
        p = tmp_path / f"im{k}.png"
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    cfg = CoGroundingConfig()
    cfg.data.image_size, cfg.model.vocab_size = 64, 100
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(0.02)

    class _BN(_Tiny):
        def forward(self, x):
            return super().forward(bn(x))

    bb = _BN()
    bb.bn = bn
    assert bb.training
    before = bn.running_mean.clone()
    ds = RefExpDataset(cfg, [ImageSample(p, (0, 0, 10, 10), "the thing") for p in paths], train=False)
    ds.attach_backbone(bb)
    maps = ds.get_batch([0, 1, 2, 3])["backbone_feats"]
    assert torch.equal(bn.running_mean, before) and bb.training  # statistics untouched, mode restored
    pixels = RefExpDataset(cfg, ds.samples, train=False).get_batch([0, 1, 2, 3])["images"]
    with torch.no_grad():
        live = bb.eval()(pixels)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(maps, live))


def test_video_table_with_motion_attention_and_heldout_world(tmp_path, monkeypatch):
    """Two variants of the video table train on the tiny world (the motion loss is logged), and ``heldout`` scores
    them on another draw of the world, pairing each variant with the single-frame run of its seed."""
    import json

    from experiment_scripts import load_experiment

    tables = load_experiment("cogrounding_tables")
    heldout_table, run_table = tables.heldout_table, tables.run_table

    monkeypatch.setenv("GROUNDKIT_DATA", str(tmp_path / "worlds"))
    names = ["single-frame (SL-Att)", "co-grounding, residual + motion attention, candidate loss"]
    extra = {"train.epochs": 1, "train.batch_size": 4, "data.frame_stride": 4, "model.dim": 16, "model.vocab_size": 500}
    results, _ = run_table("video", tmp_path / "table", [0], size="tiny", extra=extra, names=names)
    assert [r.status for r in results] == ["done", "done"]
    log = tmp_path / "table" / "co-grounding-residual-motion-attention-candidate-loss" / "seed0" / "log.jsonl"
    assert any("motion" in json.loads(line) for line in log.read_text().splitlines() if '"train"' in line)
    scores, table = heldout_table(tmp_path / "table", world_seed=1, names=names)
    assert set(scores) == set(names)
    for name in names:
        m = scores[name][0]
        assert m["samples"] > 0 and 0.0 <= m["Acc@0.5"] <= 100.0 and "train/Acc@0.5" in m
        assert (tmp_path / "table" / slug(name) / "seed0" / "heldout-world1" / "metrics.json").is_file()
    assert "(0 of 1 ahead)" in table or "(1 of 1 ahead)" in table
    assert len(list((tmp_path / "worlds").glob("video-tiny-seed1*"))) == 1  # the other draw was built
    with pytest.raises(ConfigError, match="trained on world seed 0"):
        heldout_table(tmp_path / "table", world_seed=0, names=names[:1])
