"""Co-grounding data: letterbox mapping, flip with the word swap, clip-shared geometry, the official augmentation
through groundkit.transforms (its random draws), tokenizer, post-processing, window inference with feature reuse."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from groundkit.methods.cogrounding.config import CoGroundingConfig
from groundkit.methods.cogrounding.data import (
    ImageSample,
    RefExpDataset,
    VideoClipDataset,
    VideoSample,
    letterbox,
)
from groundkit.methods.cogrounding.inference import (
    ground_video,
    ground_video_windowed,
    temporal_rescore,
    window_indices,
)
from groundkit.methods.cogrounding.text import WordTokenizer, swap_left_right
from groundkit.transforms import RandomAffine, RandomHSV

torch.set_num_threads(1)


def test_letterbox_maps_boxes_both_ways():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 20, 90, 60))  # a white box x 50..89, y 20..59
    lb_img, lb = letterbox(img, 128)
    assert lb_img.size == (128, 128) and lb.scale == pytest.approx(0.64) and lb.pad_left == 0 and lb.pad_top == 32
    box = np.array([50.0, 20.0, 90.0, 60.0])
    m = lb.to_letterbox(box)
    assert np.allclose(m, [32, 44.8, 57.6, 70.4])
    assert np.allclose(lb.to_original(m), box)
    # the pixels are where the mapped box says
    a = np.asarray(lb_img)
    assert a[int(m[1]) + 2, int(m[0]) + 2].min() > 200 and a[int(m[3]) + 2, int(m[2]) + 2].max() < 60
    # padding rows carry the official colour; predictions outside the image are clipped to it
    assert tuple(a[5, 5]) == (124, 116, 104)
    assert np.allclose(lb.to_original(np.array([-10.0, 0.0, 200.0, 127.0])), [0, 0, 200, 100])


def test_tokenizer_groundkit_rules():
    tok = WordTokenizer(max_len=6, vocab_size=3000)
    ids, mask = tok.encode("The man, on the LEFT.")
    words = [tok.itos[i] for i in ids.tolist()]
    assert words == ["the", "man", "on", "the", "left", "<eos>"]
    ids, mask = tok.encode("a xqzzyv dog")
    assert [tok.itos[i] for i in ids[mask].tolist()] == ["a", "<unk>", "dog", "<eos>"] and ids[4:].eq(0).all()
    assert (
        swap_left_right("leftmost car left of the rightmost tree, right?")
        == "rightmost car right of the leftmost tree, left?"
    )


def test_tokenizer_official_rules_and_substring_swap(tmp_path):
    from groundkit.methods.cogrounding.text import swap_substrings  # noqa: PLC0415

    (tmp_path / "corpus.txt").write_text("the man on the left\na dog\n")  # a corpus file: words split on spaces
    tok = WordTokenizer(max_len=6, vocab_file=str(tmp_path / "corpus.txt"), rules="official")
    words = lambda text: [tok.itos[i] for i in tok.encode(text)[0].tolist()]  # noqa: E731
    # separators are tokens (", " one of them, unknown); the final "." goes; 6 tokens = max_len: no <eos>
    assert words("The man, on the LEFT.") == ["the", "man", "<unk>", "on", "the", "left"]
    assert tok.tokens("The man, on the LEFT.")[2] == ", "
    # longer texts are cut with no <eos>; shorter ones get <eos> and padding (id 0, masked)
    assert words("a dog on the left of the man") == ["a", "dog", "on", "the", "left", "<unk>"]
    ids, mask = tok.encode("a dog.")
    assert [tok.itos[i] for i in ids[mask].tolist()] == ["a", "dog", "<eos>"] and not mask[3:].any()
    assert WordTokenizer(max_len=6, vocab_size=3000).tokens("The man, on the LEFT.")[-1] == "<eos>"  # groundkit
    assert swap_substrings("bright left, right?") == "bleft right, left?"
    with pytest.raises(Exception, match="model.tokenizer='x'"):
        WordTokenizer(max_len=6, vocab_size=30, rules="x")


def _scene(tmp_path, name="a.png"):
    img = Image.new("RGB", (160, 120), (20, 20, 20))
    img.paste((250, 0, 0), (10, 30, 50, 70))
    p = tmp_path / name
    img.save(p)
    return p


def test_flip_swaps_words_and_mirrors_box(tmp_path):
    cfg = CoGroundingConfig()
    cfg.data.image_size, cfg.data.affine, cfg.data.hsv_jitter = 64, False, 0.0
    cfg.model.vocab_size = 3000
    p = _scene(tmp_path)
    ds = RefExpDataset(cfg, [ImageSample(p, (10.0, 30.0, 50.0, 70.0), "the red box on the left")] * 16, train=True)
    flipped = plain = 0
    for i in range(16):
        it = ds.item(i)
        text = [ds.tok.itos[t] for t in it["ids"][it["mask"]].tolist()]
        img = it["image"]
        x1, y1, x2, y2 = it["box"]
        inside = img[:, int(y1) + 2 : int(y2) - 1, int(x1) + 2 : int(x2) - 1]
        assert inside[0].mean() > 0.8 and inside[1].mean() < 0.2  # the box follows the red object
        if "right" in text:
            flipped += 1
            assert x1 > 32
        else:
            plain += 1
            assert "left" in text and x2 < 32
    assert flipped > 2 and plain > 2


def official_affine(rng: random.Random, size: int) -> np.ndarray:
    """The official ``random_affine`` matrix, as groundkit computed it before the shared transform."""
    a, s = math.radians(rng.uniform(-5, 5)), rng.uniform(0.9, 1.1)
    c = size / 2
    R = np.array([[s * math.cos(a), -s * math.sin(a), 0], [s * math.sin(a), s * math.cos(a), 0], [0, 0, 1]])
    C, Cb = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1.0]]), np.array([[1, 0, c], [0, 1, c], [0, 0, 1.0]])
    T = np.array([[1, 0, rng.uniform(-0.1, 0.1) * size], [0, 1, rng.uniform(-0.1, 0.1) * size], [0, 0, 1.0]])
    sh = math.tan(math.radians(rng.uniform(-2, 2)))
    Sh = np.array([[1, sh, 0], [math.tan(math.radians(rng.uniform(-2, 2))), 1, 0], [0, 0, 1.0]])
    return T @ Sh @ Cb @ R @ C


def test_shared_transforms_draw_the_official_numbers():
    """Same seed, same draws: the affine matrix bit for bit, the HSV factors as ``rng.uniform`` in that order."""
    canvas = {"image": Image.new("RGB", (64, 64))}
    for seed in range(5):
        assert np.array_equal(
            RandomAffine().get_params(canvas, random.Random(seed)), official_affine(random.Random(seed), 64)
        )
        rng, ref = random.Random(seed), random.Random(seed)
        a, b = ref.uniform(0.5, 1.5), ref.uniform(0.5, 1.5)
        assert RandomHSV(0.5, 0.5).get_params(canvas, rng) == (a, b)
        _, b = ref.uniform(0.5, 1.5), ref.uniform(0.5, 1.5)
        assert RandomHSV(0.5, 0.5, saturation_bug=True).get_params(canvas, rng) == (1.0, b)
        assert (rng.random(), rng.random()) == (ref.random(), ref.random())  # the bug draws S too: the sequence holds


def test_affine_box_follows_the_object():
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (20, 20, 40, 40))
    aff = RandomAffine()
    M = aff.get_params({"image": img}, random.Random(3))
    out = aff.apply({"image": img, "boxes": np.array([[20.0, 20.0, 39.0, 39.0]])}, M)
    box = out["boxes"][0].numpy()
    a = np.asarray(out["image"])[..., 0] > 128
    ys, xs = np.nonzero(a)
    assert abs(xs.min() - box[0]) <= 2 and abs(xs.max() - box[2]) <= 2 and abs(ys.min() - box[1]) <= 2


def test_hsv_saturation_bug_leaves_saturation():
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    s0 = np.asarray(img.convert("HSV"))[..., 1].mean()

    def jitter(seed, bug):
        hsv = RandomHSV(0.5, 0.5, saturation_bug=bug)
        return np.asarray(hsv({"image": img}, random.Random(seed))["image"].convert("HSV"))[..., 1].mean()

    fixed, bug = [jitter(k, False) for k in range(5)], [jitter(k, True) for k in range(5)]
    assert max(abs(b - s0) for b in bug) <= 2 and max(abs(f - s0) for f in fixed) > 10


@pytest.mark.parametrize(("rule", "expected"), [("substring", "bleft Left left"), ("words", "bright Right left")])
def test_flip_swap_rule_reaches_the_tokens(tmp_path, rule, expected):
    cfg = CoGroundingConfig()
    cfg.data.image_size, cfg.data.affine, cfg.data.hsv_jitter, cfg.data.flip_swap = 64, False, 0.0, rule
    cfg.model.vocab_size, cfg.model.tokenizer = 3000, "groundkit"
    ds = RefExpDataset(cfg, [ImageSample(_scene(tmp_path), (10.0, 30.0, 50.0, 70.0), "bright Left right")], True)
    seen = []
    encode = ds.tok.encode
    ds.tok.encode = lambda text: (seen.append(text), encode(text))[1]
    for epoch in range(8):
        ds.set_epoch(epoch)
        ds.item(0)
    assert set(seen) == {"bright Left right", expected}


@pytest.mark.parametrize("shared", [True, False])
def test_clip_geometry_shared_or_per_frame(tmp_path, shared):
    cfg = CoGroundingConfig()
    cfg.data.image_size, cfg.data.hsv_jitter, cfg.data.flip = 64, 0.0, False
    cfg.data.shared_clip_geometry = shared
    cfg.model.vocab_size = 3000
    p = _scene(tmp_path)
    vid = VideoSample([p, p, p], np.array([[10.0, 30.0, 50.0, 70.0]] * 3), "the red box")
    ds = VideoClipDataset(cfg, [vid], train=True)
    assert len(ds) == 3 and ds.clip_len == 2
    b = ds.get_batch([1])
    assert b["images"].shape == (2, 3, 64, 64) and b["clip_len"] == 2
    same = torch.equal(b["images"][0], b["images"][1])
    assert same == shared
    # frame 0's clip is (0, 0): clipped at the start as the official getChunk
    assert ds.get_batch([0])["boxes"].shape == (2, 4)


def test_window_indices_clip_at_the_ends():
    w = window_indices(4, 5)
    assert w.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]


def test_temporal_rescore_fixes_an_isolated_error():
    # 7 frames, 2 candidates: candidate "track" (feature e0) and "distractor" (feature e1).
    # The track scores 1.0, the distractor 0.5, except in frame 3 where the distractor briefly wins (0.9 vs 0.8).
    T = 7
    e = torch.eye(4)
    feats = torch.stack([torch.stack([e[0], e[1]]) for _ in range(T)])  # [T, 2, 4]
    scores = torch.tensor([[1.0, 0.5]] * T)
    scores[3] = torch.tensor([0.8, 0.9])
    assert scores.argmax(1).tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert temporal_rescore(feats, scores, window=5).tolist() == [0] * T
    assert temporal_rescore(feats, scores, window=5, renormalize=False).tolist() == [0] * T
    # a sustained change (the distractor wins from frame 3 on) is kept after its first frames
    scores2 = torch.tensor([[1.0, 0.5]] * 3 + [[0.5, 1.0]] * 4)
    assert temporal_rescore(feats, scores2, window=5).tolist()[-2:] == [1, 1]
    # independent of file names: only the order of the arrays matters
    perm = torch.arange(T - 1, -1, -1)
    assert temporal_rescore(feats[perm], scores[perm]).tolist() == [0] * T


@pytest.mark.parametrize("motion", [False, "corr", "diff", "box_from_centre", "motion_attention"])
def test_feature_reuse_equals_window_by_window(motion):
    from test_cogrounding_model import tiny_net

    mode = motion if motion in ("corr", "diff") else "corr"
    net = tiny_net(
        motion=mode == motion,
        motion_mode=mode,
        box_from_centre=motion == "box_from_centre",
        motion_attention=motion == "motion_attention",
    ).eval()
    if motion == "motion_attention":
        with torch.no_grad():
            net.mot_vel.bias.fill_(0.2)  # the motion scores count in the boxes compared below
            net.mot_log_sigma.fill_(-2.0)
    assert bool(net.extended and net.box_from_centre) == (motion == "box_from_centre")
    frames = torch.rand(7, 3, 64, 64)
    ids = torch.tensor([3, 4, 5, 2, 0, 0])
    a = ground_video(net, frames, ids, ids != 0, window=5, batch=4, top_k=3)
    b = ground_video_windowed(net, frames, ids, ids != 0, window=5, batch=4, top_k=3)
    for k in ("box", "score", "cand_box", "cand_score", "cand_feat"):
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert a["cand_feat"].shape == (7, 3, 16)


def test_transvg_lists_give_each_sample_its_images_referred_objects(tmp_path):
    from groundkit.formats import transvg  # noqa: PLC0415
    from groundkit.methods.cogrounding.data import load_image_samples  # noqa: PLC0415

    rows = [("a.jpg", [0, 0, 10, 10], "left"), ("a.jpg", [20, 0, 30, 10], "right"), ("b.jpg", [5, 5, 9, 9], "it")]
    rows.append(("a.jpg", [0, 0, 10, 10], "the left one"))  # a second expression of the first object
    transvg.save_split([transvg.make_entry("unc", f, b, t) for f, b, t in rows], tmp_path, "unc", "val")
    cfg = CoGroundingConfig()
    cfg.data.kind, cfg.data.split_root, cfg.data.image_root = "transvg", str(tmp_path), str(tmp_path)
    samples = load_image_samples(cfg, "val")
    assert [len(s.objects) for s in samples] == [2, 2, 1, 2]
    assert samples[2].objects == ((5.0, 5.0, 9.0, 9.0),)
    assert samples[0].box in samples[0].objects


def test_official_box_pixels_mirror_in_original_pixels_and_truncate():
    from groundkit.transforms import letterbox_info  # noqa: PLC0415

    cfg = CoGroundingConfig()
    cfg.data.image_size, cfg.data.truncate_boxes = 64, False  # fixed: float boxes
    lb = letterbox_info(100, 50, 64)  # scale 0.64, 16 rows of padding above
    box = np.array([10.0, 10.0, 30.0, 30.0])
    ds = RefExpDataset(cfg, [], train=False)
    np.testing.assert_allclose(ds._canvas_box(box, lb, False), [6.4, 22.4, 19.2, 35.2])
    np.testing.assert_allclose(ds._canvas_box(box, lb, True), [44.8, 22.4, 57.6, 35.2])
    cfg.data.truncate_boxes = True  # official: x' = w - x - 1 in original pixels, integers after the letterbox
    np.testing.assert_array_equal(ds._canvas_box(box, lb, False), [6, 22, 19, 35])
    np.testing.assert_array_equal(ds._canvas_box(box, lb, True), [44, 22, 56, 35])


def test_truncated_boxes_on_reading_refer_and_transvg(tmp_path):
    from groundkit.formats import transvg  # noqa: PLC0415
    from groundkit.methods.cogrounding.data import load_image_samples  # noqa: PLC0415

    transvg.save_split([transvg.make_entry("unc", "a.jpg", [1.7, 2.2, 10.9, 8.5], "x")], tmp_path, "unc", "val")
    cfg = CoGroundingConfig()
    cfg.data.kind, cfg.data.split_root, cfg.data.image_root = "transvg", str(tmp_path), str(tmp_path)
    cfg.data.truncate_boxes = False  # fixed: float boxes
    assert load_image_samples(cfg, "val")[0].box == pytest.approx((1.7, 2.2, 10.9, 8.5))
    cfg.data.truncate_boxes = True  # [x, y, w, h] = [1.7, 2.2, 9.2, 6.3] -> ints [1, 2, 9, 6] -> x2 = 10, y2 = 8
    assert load_image_samples(cfg, "val")[0].box == (1.0, 2.0, 10.0, 8.0)


@pytest.mark.parametrize(
    "name", ["world_image", "improved_refcoco", "improved_vid", "reference_refcoco", "reference_vid"]
)
def test_shipped_configs_drop_the_last_incomplete_batch(name):
    """As the official loader: a training list of 32k + 1 samples would end an epoch on a batch of one, which the
    BatchNorm1d layers refuse in training."""
    from groundkit.config import load_config  # noqa: PLC0415

    assert load_config(CoGroundingConfig, name, None, "cogrounding").train.drop_last
