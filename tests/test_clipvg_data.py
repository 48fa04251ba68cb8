"""CLIP-VG data: letterbox targets and padding masks, cached vs raw samples, the no-crop rule, test = testA + testB."""

import numpy as np
import pytest
import torch
from PIL import Image

from groundkit.errors import DataError
from groundkit.formats import transvg
from groundkit.methods.clipvg.config import ClipVGData, ClipVGModel
from groundkit.methods.clipvg.data import GroundingSet, load_samples, split_file
from groundkit.methods.clipvg.model import ClipVG, build_encoders


@pytest.fixture()
def tiny_data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (100, 50), (200, 30, 30)).save(images / "a.jpg")
    Image.new("RGB", (60, 120), (30, 200, 30)).save(images / "b.jpg")
    rows = [("a.jpg", [10, 10, 30, 30], "The RED box on the left"), ("b.jpg", [10, 70, 30, 90], "green thing")]
    for split in ("train", "val", "testA", "testB"):
        transvg.save_split([transvg.make_entry("unc", f, b, t) for f, b, t in rows], tmp_path / "splits", "unc", split)
    return ClipVGData(
        split_root=str(tmp_path / "splits"),
        image_root=str(images),
        imsize=64,
        max_query_len=8,
        supervision="full",
        cache_dir=str(tmp_path / "cache"),
    )


def test_letterbox_target_and_mask(tiny_data):
    ds = GroundingSet(load_samples(tiny_data, "val"), tiny_data)
    it = ds.raw_item(0)
    # 100x50 -> 64x32, padded 16 rows above: box [10,10,30,30] -> [6.4, 22.4, 19.2, 35.2] on the 64 canvas
    torch.testing.assert_close(it["box"], torch.tensor([0.2, 0.45, 0.2, 0.2]))
    assert it["image"].shape == (3, 64, 64) and it["image_mask"].shape == (64, 64)
    assert it["image_mask"][:16].all() and not it["image_mask"][16:48].any() and it["image_mask"][48:].all()
    assert it["text"] == "the red box on the left"  # lower-cased, no prompt


def test_test_split_is_testa_plus_testb_and_train_follows_supervision(tiny_data):
    assert [p.name for p in split_file(tiny_data, "test")] == ["unc_testA.pth", "unc_testB.pth"]
    assert [p.name for p in split_file(tiny_data, "train")] == ["unc_train.pth"]
    tiny_data.supervision = "pseudo"
    assert [p.name for p in split_file(tiny_data, "train")] == ["unc_train_pseudo.pth"]
    tiny_data.train_file = "/x/sel.pth"
    assert split_file(tiny_data, "train") == [type(split_file(tiny_data, "val")[0])("/x/sel.pth")]
    assert len(load_samples(ClipVGData(**{**tiny_data.__dict__, "train_file": ""}), "test")) == 4


def tiny_model(grid: int) -> ClipVG:
    """A small CLIP-VG on the offline encoders with random weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    return ClipVG(
        ClipVGModel(d_model=16, nhead=2, num_layers=1, dim_ff=16),
        build_encoders("effnet_minilm", grid=grid, pretrained=False),
        8,
    ).eval()


def test_cached_batches_equal_raw_batches(tiny_data):
    model = tiny_model(grid=2)
    raw = GroundingSet(load_samples(tiny_data, "val"), tiny_data)
    rb = raw.collate([raw[i] for i in range(2)])
    cached = GroundingSet(load_samples(tiny_data, "val"), tiny_data)
    assert cached.attach_cache(model, torch.device("cpu"))
    cb = cached.collate([cached[i] for i in range(2)])
    torch.testing.assert_close(cb["box"], rb["box"])
    assert torch.equal(cb["image_mask"], rb["image_mask"])
    ids, mask = model.encoders.tokenize(rb["texts"], 8)
    with torch.no_grad():
        a = model({**rb, "text_ids": ids, "text_mask": mask}).boxes
        b = model(cb).boxes
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # fp16 storage of the cached features
    assert any(p.name.startswith("images-") for p in (cached._cache_dir()).iterdir())
    # augmentation or a trainable encoder parameter forbid caching
    assert not GroundingSet(load_samples(tiny_data, "val"), tiny_data, augment=True).attach_cache(model, "cpu")


def test_flip_mirrors_canvas_box_and_words_alike_on_the_pixel_and_the_cached_path(tiny_data):
    model = tiny_model(grid=2)
    samples = load_samples(tiny_data, "train")
    plain = GroundingSet(samples, tiny_data)
    raw = GroundingSet(samples, tiny_data, flip=1.0)  # every sample mirrored
    it, ref = raw.raw_item(0), plain.raw_item(0)
    assert it["text"] == "the red box on the right" and raw.raw_item(1)["text"] == "green thing"
    assert torch.equal(it["image"], ref["image"].flip(-1)) and torch.equal(it["image_mask"], ref["image_mask"].flip(-1))
    torch.testing.assert_close(it["box"], torch.tensor([0.8, 0.45, 0.2, 0.2]))
    cached = GroundingSet(samples, tiny_data, flip=1.0)
    assert cached.attach_cache(model, torch.device("cpu"))
    cb, rb = cached.collate([cached[i] for i in range(2)]), raw.collate([raw[i] for i in range(2)])
    torch.testing.assert_close(cb["box"], rb["box"])
    assert torch.equal(cb["image_mask"], rb["image_mask"])
    ids, mask = model.encoders.tokenize(rb["texts"], 8)
    with torch.no_grad():
        torch.testing.assert_close(
            model(cb).boxes, model({**rb, "text_ids": ids, "text_mask": mask}).boxes, atol=2e-3, rtol=0
        )
    # half the samples: one draw per sample and epoch, repeatable, and other draws in other epochs
    half = GroundingSet(samples * 50, tiny_data, flip=0.5, seed=1)
    idx = torch.arange(100)
    draws = [half.flipped(idx)]
    half.set_epoch(1)
    draws.append(half.flipped(idx))
    assert 30 < int(draws[0].sum()) < 70 and not torch.equal(draws[0], draws[1])
    half.set_epoch(0)
    assert torch.equal(half.flipped(idx), draws[0])
    assert not GroundingSet(samples, tiny_data).flipped(idx[:2]).any()
    with pytest.raises(DataError, match="data.flip"):
        GroundingSet(samples, tiny_data, flip=1.5)


def test_direction_words_are_never_cropped(tiny_data):
    tiny_data.aug_crop_prob = 1.0
    tiny_data.aug_crop_resize = [60]
    tiny_data.aug_crop_size = (20, 40)
    tiny_data.aug_scales = [64]
    ds = GroundingSet(load_samples(tiny_data, "train"), tiny_data, augment=True, seed=3)
    for epoch in range(4):
        ds.set_epoch(epoch)
        left = ds.raw_item(0)  # "... on the left": never the crop branch, so the whole 2:1 image is kept
        kept = (~left["image_mask"]).sum(0).max().item(), (~left["image_mask"]).sum(1).max().item()
        assert kept == (32, 64) or kept == (64, 32)
        other = ds.raw_item(1)  # the crop branch (1:2 image cropped to at most 40 px, resized to 64)
        rows, cols = (~other["image_mask"]).sum(0).max().item(), (~other["image_mask"]).sum(1).max().item()
        assert max(rows, cols) == 64 and (rows, cols) != (64, 32)
        b = other["box"]
        assert bool(((b[:2] - b[2:] / 2) >= -1e-4).all() and ((b[:2] + b[2:] / 2) <= 1 + 1e-4).all())


def test_default_feature_cache_is_outside_the_data(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDKIT_FEATURE_CACHE", str(tmp_path / "features"))
    tiny_data.cache_dir = ""
    ds = GroundingSet(load_samples(tiny_data, "val"), tiny_data)
    assert ds._cache_dir() == tmp_path / "features" / "clipvg"  # never beside the (checksummed) splits


def test_text_features_are_shared_across_image_settings(tiny_data):
    """A new grid re-encodes the images, not the texts (the text store is keyed by the text encoder alone)."""
    stores = []
    for grid in (2, 3):
        model = tiny_model(grid)
        ds = GroundingSet(load_samples(tiny_data, "val"), tiny_data)
        assert ds.attach_cache(model, torch.device("cpu"))
        stores.append(ds)
    names = sorted(p.name for p in stores[0]._cache_dir().iterdir())
    assert sum(n.startswith("images-") for n in names) == 2
    assert sum(n.startswith("texts-") for n in names) == 1
    torch.testing.assert_close(stores[0].cache["text_feats"], stores[1].cache["text_feats"])
    assert stores[0].cache["image_feats"].shape[1] != stores[1].cache["image_feats"].shape[1]


def test_cached_features_do_not_depend_on_the_cache_history_or_threads(tiny_data, tmp_path):
    """An image's or text's cached features are a function of it alone: the same bits whether it was encoded
    beside other missing items or alone, on one thread or two (runs that share a cache get the same numbers)."""
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(12):
        size = (int(rng.integers(40, 130)), int(rng.integers(40, 130)))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(images / f"c{i}.png")
    rows = [(f"c{i}.png", [5, 5, 30, 30], f"object number {i} on the right") for i in range(12)]
    transvg.save_split([transvg.make_entry("unc", f, b, t) for f, b, t in rows], tmp_path / "splits", "unc", "extra")
    model = tiny_model(grid=2)
    one = ClipVGData(**{**tiny_data.__dict__, "cache_dir": str(tmp_path / "cache_a")})
    first = GroundingSet(load_samples(one, "val"), one)  # a.jpg, b.jpg and their texts encoded first
    assert first.attach_cache(model, torch.device("cpu"))
    later = GroundingSet(load_samples(one, "val") + load_samples(one, "extra"), one)
    assert later.attach_cache(model, torch.device("cpu"))
    fresh = ClipVGData(**{**tiny_data.__dict__, "cache_dir": str(tmp_path / "cache_b")})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        direct = GroundingSet(load_samples(fresh, "val") + load_samples(fresh, "extra"), fresh)
        assert direct.attach_cache(model, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    for key in ("image_feats", "text_feats", "image_mask", "text_mask"):
        assert torch.equal(later.cache[key], direct.cache[key]), key


def test_official_crop_rule_matches_direction_words_as_substrings(tiny_data):
    from groundkit.methods.clipvg.data import build_train_transform
    from groundkit.transforms import OfficialSizeCrop, RandomSelect

    tiny_data.aug_crop_rule = "official"
    select = build_train_transform(tiny_data).transforms[0]
    assert isinstance(select, RandomSelect) and not select.whole_words
    assert any(isinstance(t, OfficialSizeCrop) for t in select.second.transforms)
    g = torch.Generator().manual_seed(0)
    picks = {select._pick({"text": "the bright laptop"}, g) is select.first for _ in range(20)}
    assert picks == {True}  # "bright" holds "right": never the crop branch, as in the official code
    tiny_data.aug_crop_rule = "keep_box"
    select = build_train_transform(tiny_data).transforms[0]
    assert {select._pick({"text": "the bright laptop"}, g) is select.first for _ in range(20)} == {True, False}


def test_baselines_from_referred_boxes_or_an_instances_file(tiny_data, tmp_path):
    import json  # noqa: PLC0415

    ds = GroundingSet(load_samples(tiny_data, "test"), tiny_data, name="test")
    # each image holds one referred object: every text-blind baseline picks it
    assert ds.baselines(0.5) == {"random_object": 100.0, "largest_object": 100.0, "centre_object": 100.0}
    # an instances.json with more objects: a.jpg (100 x 50) gains a larger object in its centre
    inst = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [10, 10, 20, 20], "category_id": 1},
            {"id": 2, "image_id": 1, "bbox": [35, 5, 30, 40], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "box"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    d = ClipVGData(**{**tiny_data.__dict__, "instances_file": str(tmp_path / "instances.json")})
    with pytest.raises(DataError, match=r"instances.json: no image entry for 1 image\(s\) of the test, e.g. 'b.jpg'"):
        GroundingSet(load_samples(d, "test"), d, name="test").baselines(0.5)
    inst["images"].append({"id": 2, "file_name": "b.jpg", "width": 60, "height": 120})
    inst["annotations"].append({"id": 3, "image_id": 2, "bbox": [10, 70, 20, 20], "category_id": 1})
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    got = GroundingSet(load_samples(d, "test"), d, name="test").baselines(0.5)
    # a.jpg: 2 objects, the target is neither the largest nor the central one; b.jpg: 1 object (2 samples each)
    assert got == pytest.approx({"random_object": 75.0, "largest_object": 50.0, "centre_object": 50.0})


def test_the_built_in_world_fills_the_empty_paths():
    from pathlib import Path  # noqa: PLC0415

    from groundkit.config import load_config  # noqa: PLC0415
    from groundkit.methods.clipvg.method import METHOD  # noqa: PLC0415

    cfg = load_config(METHOD.config_class, "world_cpu", None, "clipvg")
    assert cfg.world.size == "small" and not METHOD.own_data(cfg)
    METHOD.use_world(cfg, Path("/w"))
    d = cfg.data
    assert (d.split_root, d.image_root, d.instances_file) == (
        "/w/splits",
        "/w/images/mscoco/images/train2014",
        "/w/refcoco/instances.json",
    )
    # paths of one's own (the command line's --split-root) keep the config on them: no world is built
    mine = load_config(
        METHOD.config_class, "world_cpu", METHOD.cli_overrides({"split_root": "/mine"}, "train"), "clipvg"
    )
    assert METHOD.own_data(mine) and mine.data.split_root == "/mine"
