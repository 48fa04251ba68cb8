import colorsys
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from groundkit import transforms as T
from groundkit.boxes import normalize_boxes, xyxy_to_cxcywh

torch.set_num_threads(1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def coord_image(w, h):
    """Float image whose channel 0 holds the column index and channel 1 the row index of each pixel."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)])


def random_uint8(w, h, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen(seed))


@pytest.fixture(scope="module")
def photo():
    """scikit-learn's sample photo china.jpg, [427, 640, 3] uint8 (read directly: importing sklearn.datasets
    alone takes about 2 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "images" / "china.jpg"
    if path.is_file():
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    from sklearn.datasets import load_sample_image

    return load_sample_image("china.jpg").copy()


# ----------------------------------------------------------------------------- text
def test_swap_left_right_whole_words_and_case():
    cases = {
        "the man on the left": "the man on the right",
        "Left of the RIGHT dog": "Right of the LEFT dog",
        "leftmost cup, rightmost plate": "rightmost cup, leftmost plate",
        "left-hand side": "right-hand side",
        "bright leftover copyright": "bright leftover copyright",
        "left.right,LEFT": "right.left,RIGHT",
    }
    for text, expected in cases.items():
        assert T.swap_left_right(text) == expected
        assert T.swap_left_right(T.swap_left_right(text)) == text


def test_direction_word_check():
    assert T.has_direction_word("Man at the TOP")
    assert T.has_direction_word("the leftmost one")
    assert not T.has_direction_word("a bright lamp")
    assert T.has_direction_word("a bright lamp", whole_words=False)  # the CLIP-VG substring test
    assert not T.has_direction_word("the tall one")
    assert T.has_direction_word("near the corner", words={"corner"})


# ----------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("w,h,size", [(64, 40, 32), (40, 64, 32), (33, 33, 50), (37, 20, 64), (100, 3, 30)])
def test_letterbox_round_trip_and_mask(w, h, size):
    image = random_uint8(w, h)
    out, info = T.letterbox(image, size)
    assert out.shape == (3, size, size) and out.dtype == torch.uint8
    assert (info.orig_w, info.orig_h, info.size) == (w, h, size)
    assert max(info.resized_w, info.resized_h) == size
    # equal padding on both sides (the odd pixel right / bottom)
    for pad, resized in ((info.pad_left, info.resized_w), (info.pad_top, info.resized_h)):
        assert size - resized - pad - pad in (0, 1)
    mask = info.padding_mask()
    assert mask.shape == (size, size) and mask.dtype == torch.bool
    assert int((~mask).sum()) == info.resized_w * info.resized_h
    fill = torch.tensor([124, 116, 104], dtype=torch.uint8)  # ImageNet mean * 255, rounded
    assert (out.permute(1, 2, 0)[mask] == fill).all()
    rng = np.random.default_rng(w * h)
    xy = rng.uniform(0, [w, h], size=(20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, [w, h], size=(20, 2))], 1).clip(0, [w, h, w, h])
    lb = info.to_letterbox(boxes)
    assert isinstance(lb, np.ndarray)
    assert (lb[:, :2] >= [info.pad_left, info.pad_top]).all()
    assert (lb[:, 2:] <= [info.pad_left + info.resized_w, info.pad_top + info.resized_h]).all()
    np.testing.assert_allclose(info.to_original(lb), boxes, atol=1e-4)
    lbt = info.to_letterbox(torch.from_numpy(boxes).float())
    torch.testing.assert_close(info.to_original(lbt), torch.from_numpy(boxes).float(), atol=1e-4, rtol=0)
    # a model's normalised cxcywh output maps back too
    norm = normalize_boxes(xyxy_to_cxcywh(lb), size, size)
    np.testing.assert_allclose(info.to_original(norm, fmt="cxcywh", normalized=True), boxes, atol=1e-4)


def test_letterbox_boxes_follow_the_pixels():
    w, h, size = 90, 60, 45
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    box = np.array([[20.0, 10.0, 50.0, 40.0]])
    image[:, 10:40, 20:50] = 255
    out, info = T.letterbox(image, size, fill=0)
    ys, xs = torch.nonzero(out[0] > 127, as_tuple=True)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64)
    np.testing.assert_allclose(info.to_letterbox(box), found, atol=1.0)
    # clipping: a prediction spilling into the padding is clipped to the original image
    assert info.to_original(np.array([[0.0, 0.0, size, size]])).tolist() == [[0, 0, w, h]]


def test_letterbox_types_fill_offset_and_no_resize():
    image = random_uint8(30, 20)
    pil = TF.to_pil_image(image)
    out_pil, info_pil = T.letterbox(pil, 48)
    out_t, info_t = T.letterbox(image, 48)
    assert isinstance(out_pil, Image.Image) and out_pil.size == (48, 48) and info_pil == info_t
    diff = (TF.pil_to_tensor(out_pil).float() - out_t.float()).abs().mean()
    assert diff < 3.0  # PIL and torch antialiased resize agree closely
    f = image.float() / 255
    out_f, info = T.letterbox(f, 48, fill=0.0, resize=False, offset=(5, 7))
    assert info.scale == 1.0 and (info.pad_left, info.pad_top) == (5, 7)
    torch.testing.assert_close(out_f[:, 7:27, 5:35], f)
    assert out_f.sum() == pytest.approx(float(f.sum()), rel=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        T.letterbox(f, 16, resize=False)
    with pytest.raises(ValueError, match="outside"):
        T.letterbox(f, 48, resize=False, offset=(20, 0))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        T.letterbox(f[None], 48)


# ----------------------------------------------------------------------------- geometric augmentation
def test_flip_mirrors_boxes_and_text_and_is_an_involution():
    image = random_uint8(20, 10)
    sample = {"image": image, "boxes": torch.tensor([[2.0, 1.0, 5.0, 9.0]]), "text": "Left of the lamp", "id": 7}
    flip = T.RandomHorizontalFlip(p=1.0)
    once = flip(sample, gen(0))
    assert torch.equal(once["image"], image.flip(-1))
    assert once["boxes"].tolist() == [[15.0, 1.0, 18.0, 9.0]]
    assert once["text"] == "Right of the lamp" and once["id"] == 7
    twice = flip(once, gen(0))
    assert torch.equal(twice["image"], image) and torch.equal(twice["boxes"], sample["boxes"])
    assert twice["text"] == sample["text"]
    assert T.RandomHorizontalFlip(p=1.0, swap_words=False)(sample)["text"] == sample["text"]
    assert T.RandomHorizontalFlip(p=0.0)(sample)["text"] == sample["text"]
    pil = T.RandomHorizontalFlip(p=1.0)({"image": TF.to_pil_image(image), "boxes": sample["boxes"], "text": ""})
    assert torch.equal(TF.pil_to_tensor(pil["image"]), image.flip(-1))


def test_flip_options_of_the_one_stage_code():
    boxes = torch.tensor([[2.0, 1.0, 5.0, 9.0]], dtype=torch.float64)
    assert T.flip_boxes(boxes, 20).tolist() == [[15.0, 1.0, 18.0, 9.0]]
    assert T.flip_boxes(boxes, 20, pixel_index=True).tolist() == [[14.0, 1.0, 17.0, 9.0]]  # w - x - 1
    assert T.flip_boxes(np.array([2.0, 1.0, 5.0, 9.0]), 20).tolist() == [15.0, 1.0, 18.0, 9.0]  # numpy, one box
    assert T.flip_boxes(torch.zeros(0, 4), 20).shape == (0, 4)
    sample = {"image": random_uint8(20, 10), "boxes": boxes, "text": "bright Left, right"}
    official = T.RandomHorizontalFlip(p=1.0, swap_rule="substring", pixel_index=True)(sample)
    assert official["boxes"].tolist() == [[14.0, 1.0, 17.0, 9.0]] and official["text"] == "bleft Left, left"
    assert T.RandomHorizontalFlip(p=1.0)(sample)["text"] == "bright Right, left"
    assert T.swap_substrings("bright left, right?") == "bleft right, left?"
    assert T.RandomHorizontalFlip(p=1.0).apply({"text": "the left one"}, True) == {"text": "the right one"}
    with pytest.raises(ValueError, match="swap_rule"):
        T.RandomHorizontalFlip(swap_rule="x")


def test_python_random_generator_draws_like_rng_uniform():
    import random  # noqa: PLC0415

    image = random_uint8(16, 8)
    rng, ref = random.Random(4), random.Random(4)
    assert T.RandomHorizontalFlip(p=0.5).get_params({}, rng) == (ref.random() < 0.5)
    assert T.RandomHSV(0.5, 0.3).get_params({"image": image}, rng) == (ref.uniform(0.5, 1.5), ref.uniform(0.7, 1.3))
    steps = T.ColorJitter(0.4, 0.4, 0.4).get_params({"image": image}, rng)
    assert sorted(n for n, _ in steps) == ["brightness", "contrast", "saturation"]
    assert T.RandomResize([10, 20, 30]).get_params({"image": image}, random.Random(0))[0] in (10, 20, 30)
    pipe = train_pipeline()
    sample = {"image": random_uint8(80, 50), "boxes": torch.tensor([[10.0, 5.0, 40.0, 45.0]]), "text": "left dog"}
    a, b = pipe(sample, random.Random(9)), pipe(sample, random.Random(9))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])


def test_random_affine_moves_boxes_with_the_pixels():
    image = torch.zeros(3, 64, 80, dtype=torch.uint8)
    image[:, 20:40, 30:50] = 255  # a white box x 30..49, y 20..39
    box = torch.tensor([[30.0, 20.0, 50.0, 40.0]])
    aff = T.RandomAffine(degrees=5, translate=0.1, scale=(0.9, 1.1), shear=2)
    for seed in range(5):
        M = aff.get_params({"image": image}, gen(seed))
        assert M.shape == (3, 3) and not np.allclose(M, np.eye(3))
        out = aff.apply({"image": image, "boxes": box, "text": "x"}, M)
        assert out["image"].dtype == torch.uint8 and out["image"].shape == image.shape and out["text"] == "x"
        ys, xs = torch.nonzero(out["image"][0] > 128, as_tuple=True)
        b = out["boxes"][0]
        assert out["boxes"].dtype == box.dtype
        assert abs(xs.min() - b[0]) <= 2 and abs(xs.max() + 1 - b[2]) <= 2 and abs(ys.min() - b[1]) <= 2
        pil = aff.apply({"image": TF.to_pil_image(image)}, M)["image"]  # PIL and uint8 tensors warp alike
        assert torch.equal(TF.pil_to_tensor(pil), out["image"])
    # far out of the image: the box is clipped to it; the uncovered pixels take the fill colour
    M = np.array([[1.0, 0, 70], [0, 1, 0], [0, 0, 1]])
    out = aff.apply({"image": image, "boxes": box}, M)
    assert out["boxes"].tolist() == [[80.0, 20.0, 80.0, 40.0]]
    assert out["image"][:, 0, 0].tolist() == [124, 116, 104]  # the ImageNet mean, as the letterbox pads
    assert T.RandomAffine(fill=0).apply({"image": image}, M)["image"][:, 0, 0].tolist() == [0, 0, 0]
    assert T.affine_boxes(np.zeros((0, 4)), M, 80, 64).shape == (0, 4)
    with pytest.raises(TypeError, match="uint8"):
        aff.apply({"image": image.float()}, M)


def test_crop_keeps_boxes_inside_and_pixels_match():
    w, h = 80, 60
    image = coord_image(w, h)
    boxes = torch.tensor([[30.5, 20.2, 50.0, 41.7], [35.0, 25.0, 40.0, 30.0]])
    crop = T.RandomSizeCrop(24, 70)
    sizes = set()
    for seed in range(30):
        out = crop({"image": image, "boxes": boxes, "text": "a dog"}, gen(seed))
        left, top = int(out["image"][0, 0, 0]), int(out["image"][1, 0, 0])
        ch, cw = out["image"].shape[1:]
        sizes.add((cw, ch))
        assert 24 <= cw <= 70 and 24 <= ch <= 60
        torch.testing.assert_close(out["image"], image[:, top : top + ch, left : left + cw])
        torch.testing.assert_close(out["boxes"], boxes - torch.tensor([left, top, left, top], dtype=torch.float32))
        assert (out["boxes"][:, :2] >= 0).all()
        assert (out["boxes"][:, 2] <= cw).all() and (out["boxes"][:, 3] <= ch).all()
    assert len(sizes) > 10  # the crops do vary


def test_crop_falls_back_to_no_crop():
    image = coord_image(50, 40)
    sample = {"image": image, "boxes": torch.tensor([[2.0, 2.0, 48.0, 38.0]]), "text": "the cat"}
    assert T.RandomSizeCrop(10, 30)(sample, gen(0))["image"] is image  # box wider than max_size
    small = {**sample, "boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]])}
    assert T.RandomSizeCrop(45, 100)(small, gen(0))["image"] is image  # image narrower than min_size
    assert T.RandomSizeCrop(10, 40, p=0.0)(small, gen(0))["image"] is image
    words = T.RandomSizeCrop(10, 40, no_crop_words=T.DIRECTION_WORDS)
    assert words({**small, "text": "the cat on the Left"}, gen(0))["image"] is image
    assert words({**small, "text": "the cat"}, gen(0))["image"].shape != image.shape
    no_boxes = T.RandomSizeCrop(10, 20)({"image": image, "text": ""}, gen(0))
    assert max(no_boxes["image"].shape[1:]) <= 20 and "boxes" not in no_boxes


def test_random_select_policy():
    image = coord_image(50, 40)
    crop = T.RandomSizeCrop(10, 20)
    select = T.RandomSelect(T.Compose([]), crop, p=1.0, first_if_words=T.DIRECTION_WORDS)
    assert select({"image": image, "text": "top shelf"}, gen(0))["image"] is image
    assert select({"image": image, "text": "the shelf"}, gen(0))["image"].shape[1] <= 20


def test_random_resize_sides():
    image = random_uint8(60, 30)
    boxes = torch.tensor([[6.0, 3.0, 30.0, 27.0]])
    out = T.RandomResize([40])({"image": image, "boxes": boxes, "text": ""})
    assert out["image"].shape == (3, 20, 40)
    torch.testing.assert_close(out["boxes"], boxes * 40 / 60)
    out = T.RandomResize([45], side="short")({"image": TF.to_pil_image(image), "boxes": boxes, "text": ""})
    assert out["image"].size == (90, 45)
    out = T.RandomResize([45], side="short", max_size=70)({"image": image, "boxes": boxes, "text": ""})
    assert out["image"].shape == (3, 35, 70)
    chosen = {T.RandomResize([10, 20, 30])({"image": image}, gen(s))["image"].shape[2] for s in range(20)}
    assert chosen == {10, 20, 30}


# ----------------------------------------------------------------------------- photometric augmentation
def test_hsv_scale_matches_colorsys():
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 1, size=(3, 1, 200)).astype(np.float32)
    rgb[:, 0, :5] = [[0.2], [0.2], [0.2]]  # grey: saturation 0
    rgb[:, 0, 5] = 0.0  # black
    for a, b in ((1.3, 0.7), (0.5, 1.5), (2.0, 2.0)):
        out = T.hsv_scale(torch.from_numpy(rgb), a, b).numpy()
        for i in range(rgb.shape[2]):
            hh, ss, vv = colorsys.rgb_to_hsv(*rgb[:, 0, i])
            ref = colorsys.hsv_to_rgb(hh, min(ss * a, 1.0), min(vv * b, 1.0))
            np.testing.assert_allclose(out[:, 0, i], ref, atol=1e-5)
    u8 = random_uint8(16, 8)
    assert torch.equal(T.hsv_scale(u8, 1.0, 1.0), u8)
    pil = T.hsv_scale(TF.to_pil_image(u8), 1.2, 0.8)
    assert isinstance(pil, Image.Image)
    assert torch.equal(TF.pil_to_tensor(pil), T.hsv_scale(u8, 1.2, 0.8))


def test_color_jitter_and_hsv_params():
    image = random_uint8(16, 8)
    sample = {"image": image, "text": "x"}
    jitter = T.ColorJitter(0.4, 0.4, 0.4)
    steps = jitter.get_params(sample, gen(3))
    assert sorted(n for n, _ in steps) == ["brightness", "contrast", "saturation"]
    assert all(0.6 <= f <= 1.4 for _, f in steps)
    expected = image
    for name, f in steps:
        expected = getattr(TF, f"adjust_{name}")(expected, f)
    assert torch.equal(jitter(sample, gen(3))["image"], expected)
    assert T.ColorJitter(p=0.0)(sample, gen(0))["image"] is image
    a, b = T.RandomHSV(0.5, 0.5).get_params(sample, gen(1))
    assert 0.5 <= a <= 1.5 and 0.5 <= b <= 1.5
    assert T.RandomHSV(0.0, 0.5).get_params(sample, gen(1))[0] == 1.0
    # the one-stage code's bug: S drawn (so the later draws do not move) but not applied
    assert T.RandomHSV(0.5, 0.5, saturation_bug=True).get_params(sample, gen(1)) == (1.0, b)
    with pytest.raises(ValueError, match="brightness"):
        T.ColorJitter(brightness=1.5)


def test_normalize():
    image = random_uint8(6, 4)
    out = T.Normalize()({"image": TF.to_pil_image(image)})["image"]
    mean = torch.tensor(T.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(T.IMAGENET_STD)[:, None, None]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (image.float() / 255 - mean) / std)
    torch.testing.assert_close(T.Normalize()({"image": image.float() / 255})["image"], out)


# ----------------------------------------------------------------------------- pipelines, determinism, clips
def train_pipeline(size=64):
    return T.Compose(
        [
            T.RandomSelect(
                T.RandomResize([size, size - 16]),
                T.Compose([T.RandomResize([48, 56], side="short"), T.RandomSizeCrop(32, 60), T.RandomResize([size])]),
                p=0.5,
                first_if_words=T.DIRECTION_WORDS,
            ),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.4, 0.4, 0.4, p=0.8),
            T.RandomHSV(0.5, 0.5),
            T.Normalize(),
            T.Letterbox(size, fill=0.0, resize=False, random_offset=True),
        ]
    )


def test_determinism_for_a_fixed_generator():
    sample = {"image": random_uint8(80, 50), "boxes": torch.tensor([[10.0, 5.0, 40.0, 45.0]]), "text": "left dog"}
    pipe = train_pipeline()
    runs = [pipe(sample, gen(s)) for s in (5, 5, 6, 7, 8)]
    assert torch.equal(runs[0]["image"], runs[1]["image"]) and torch.equal(runs[0]["boxes"], runs[1]["boxes"])
    assert runs[0]["text"] == runs[1]["text"] and runs[0]["letterbox"] == runs[1]["letterbox"]
    assert any(not torch.equal(runs[0]["image"], r["image"]) for r in runs[2:])
    assert {r["text"] for r in runs} <= {"left dog", "right dog"}
    for r in runs:
        assert r["image"].shape == (3, 64, 64) and r["mask"].shape == (64, 64)
        assert (r["image"].permute(1, 2, 0)[r["mask"]] == 0).all()
    assert sample["text"] == "left dog" and sample["image"].dtype == torch.uint8  # the input is untouched


def test_clip_variant_applies_one_geometry_to_all_frames():
    t, w, h = 4, 70, 50
    base = coord_image(w, h)
    frames = torch.stack([base + torch.tensor([0.0, 0.0, float(i)])[:, None, None] for i in range(t)])
    boxes = torch.tensor(
        [[[10.0, 10.0, 30.0, 30.0]], [[20.0, 12.0, 40.0, 35.0]], [[30.0, 15.0, 52.0, 40.0]], [[10.0, 10.0, 30.0, 30.0]]]
    )
    pipe = T.Compose(
        [T.RandomResize([60, 80]), T.RandomSizeCrop(30, 60), T.RandomHorizontalFlip(p=1.0), T.Letterbox(96, fill=-1.0)]
    )
    for seed in range(5):
        out = T.apply_to_clip(pipe, frames, boxes, "the left car", gen(seed))
        assert out["frames"].shape == (t, 3, 96, 96) and out["boxes"].shape == (t, 1, 4)
        assert out["text"] == "the right car" and out["mask"].shape == (96, 96)
        for i in range(1, t):  # identical pixel geometry: the coordinate channels agree on every frame
            torch.testing.assert_close(out["frames"][i, :2], out["frames"][0, :2])
            torch.testing.assert_close(out["frames"][i, 2], out["frames"][0, 2] + i * (out["frames"][0, 2] >= 0))
        torch.testing.assert_close(out["boxes"][3], out["boxes"][0])  # same input box, same output box
        # one affine map for all frames: fit it on frames 0 and 1, check it on frame 2
        x_in, x_out = boxes[:, 0, [0, 2]].flatten(), out["boxes"][:, 0, [2, 0]].flatten()
        slope = (x_out[2] - x_out[0]) / (x_in[2] - x_in[0])
        torch.testing.assert_close(x_out[4:6], x_out[0:2] + slope * (x_in[4:6] - x_in[0:2]), atol=1e-3, rtol=0)
        info = out["letterbox"]
        inner = out["boxes"].reshape(-1, 4)
        assert (inner[:, :2] >= torch.tensor([info.pad_left, info.pad_top]) - 1e-4).all()
        far = torch.tensor([info.pad_left + info.resized_w, info.pad_top + info.resized_h])
        assert (inner[:, 2:] <= far + 1e-4).all()
    # a one-frame clip is the single-sample transform
    single = pipe({"image": frames[1], "boxes": boxes[1], "text": "x"}, gen(11))
    clip = T.apply_to_clip(pipe, [frames[1]], [boxes[1]], "x", gen(11))
    assert torch.equal(clip["frames"][0], single["image"]) and torch.equal(clip["boxes"][0], single["boxes"])
    with pytest.raises(ValueError, match="same size"):
        T.apply_to_clip(pipe, [frames[0], frames[0, :, :10]], None, "x", gen(0))
    with pytest.raises(ValueError, match="one entry per frame"):
        T.apply_to_clip(pipe, frames, boxes[:2], "x", gen(0))


def test_clip_crop_keeps_every_frames_box():
    frames = [TF.to_pil_image(random_uint8(80, 60, seed=i)) for i in range(3)]
    boxes = [torch.tensor([[5.0, 5.0, 20.0, 20.0]]), torch.tensor([[50.0, 30.0, 70.0, 50.0]]), torch.zeros(0, 4)]
    for seed in range(10):
        out = T.apply_to_clip(T.RandomSizeCrop(20, 80), frames, boxes, "", gen(seed))
        w, h = out["frames"][0].size
        assert all(f.size == (w, h) for f in out["frames"])
        for b_in, b_out in zip(boxes[:2], out["boxes"][:2]):
            assert (b_out >= 0).all() and (b_out[:, 2] <= w).all() and (b_out[:, 3] <= h).all()
            torch.testing.assert_close(b_out[:, 2:] - b_out[:, :2], b_in[:, 2:] - b_in[:, :2])  # not clipped
        assert out["boxes"][2].shape == (0, 4)


def test_bad_sample_boxes():
    with pytest.raises(ValueError, match=r"sample\['boxes'\]: expected \[K, 4\]"):
        T.RandomHorizontalFlip(p=1.0)({"image": random_uint8(4, 4), "boxes": torch.zeros(4), "text": ""})


# ----------------------------------------------------------------------------- a real photo
def test_real_photo(photo):
    h, w = photo.shape[:2]
    image = torch.from_numpy(photo).permute(2, 0, 1).contiguous()
    box = np.array([[120.0, 80.0, 380.0, 300.0]])
    out, info = T.letterbox(image, 320)
    assert (info.resized_w, info.resized_h, info.pad_top) == (320, 214, 53)
    # the region a box covers has the same colour before and after letterboxing
    x1, y1, x2, y2 = np.round(info.to_letterbox(box)[0]).astype(int)
    before = image[:, 80:300, 120:380].float().mean((1, 2))
    after = out[:, y1:y2, x1:x2].float().mean((1, 2))
    torch.testing.assert_close(after, before, atol=2.0, rtol=0)
    np.testing.assert_allclose(info.to_original(info.to_letterbox(box)), box, atol=1e-4)
    # PIL and tensor inputs through the whole training pipeline
    pil = Image.fromarray(photo)
    sample = {"image": pil, "boxes": torch.from_numpy(box).float(), "text": "the roof on the left"}
    res = train_pipeline(128)(sample, gen(0))
    assert res["image"].shape == (3, 128, 128) and res["image"].dtype == torch.float32
    b = res["boxes"][0]
    assert 0 <= b[0] < b[2] <= 128 and 0 <= b[1] < b[3] <= 128
    res_t = train_pipeline(128)({**sample, "image": image}, gen(0))
    assert res_t["letterbox"] == res["letterbox"] and torch.equal(res_t["boxes"], res["boxes"])
    assert (res_t["image"] - res["image"]).abs().mean() < 0.1  # PIL and torch kernels differ slightly
    assert (w, h) == (640, 427)


def test_official_size_crop_takes_the_first_draw_past_the_swapped_check_and_cuts_the_box():
    """TransVG / CLIP-VG RandomSizeCrop: accepted when cx > top and cy > left (axes swapped), the box cut to
    the crop; the fixed RandomSizeCrop keeps the box whole."""
    from PIL import Image

    from groundkit.transforms import OfficialSizeCrop

    img = Image.new("RGB", (600, 500))
    box = torch.tensor([[500.0, 20.0, 590.0, 60.0]])  # cx 545, cy 40: accepted only when left < 40
    crop = OfficialSizeCrop(384, 600)
    cut = 0
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        params = crop.get_params({"image": img, "boxes": box}, g)
        if params is None:
            continue
        left, top, cw, ch = params
        assert 545 > top and 40 > left and 384 <= cw <= 600 and 384 <= ch <= 500
        out = crop.apply({"image": img, "boxes": box}, params)
        b = out["boxes"][0]
        assert out["image"].size == (cw, ch) and bool((b[2:] <= torch.tensor([cw, ch])).all())
        cut += bool(b[2] - b[0] < 90 or b[3] - b[1] < 40)
    assert cut > 0  # the object is cut on some draws
    assert crop.get_params({"image": Image.new("RGB", (300, 300)), "boxes": box}, torch.Generator()) is None
