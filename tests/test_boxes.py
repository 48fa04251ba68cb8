import itertools

import numpy as np
import pytest
import torch

import groundkit.metrics
from groundkit import boxes as B

torch.set_num_threads(1)


def random_boxes(n, rng, scale=100.0, dtype=np.float64):
    xy = rng.uniform(0, scale, size=(n, 2))
    wh = rng.uniform(0, scale / 2, size=(n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(dtype)


def iou_reference(a, b, offset=0.0):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]) + offset)
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]) + offset)
            inter = iw * ih
            union = (p[2] - p[0] + offset) * (p[3] - p[1] + offset) + (q[2] - q[0] + offset) * (q[3] - q[1] + offset)
            union -= inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def giou_reference(a, b):
    iou = iou_reference(a, b)
    out = np.zeros_like(iou)
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            enc = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1])
            union -= max(0.0, min(p[2], q[2]) - max(p[0], q[0])) * max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            out[i, j] = iou[i, j] - (enc - union) / enc
    return out


# ----------------------------------------------------------------------------- formats
def test_conversions_hand_values_and_types():
    xyxy = np.array([[1.0, 2.0, 4.0, 6.0]])
    np.testing.assert_array_equal(B.xyxy_to_xywh(xyxy), [[1, 2, 3, 4]])
    np.testing.assert_array_equal(B.xyxy_to_cxcywh(xyxy), [[2.5, 4, 3, 4]])
    np.testing.assert_array_equal(B.xywh_to_xyxy(np.array([[1.0, 2.0, 3.0, 4.0]])), xyxy)
    np.testing.assert_array_equal(B.cxcywh_to_xyxy(np.array([[2.5, 4.0, 3.0, 4.0]])), xyxy)
    np.testing.assert_array_equal(B.convert_boxes(xyxy, "xywh", "cxcywh"), [[3, 5, 4, 6]])  # x + w / 2
    assert isinstance(B.xyxy_to_xywh(xyxy), np.ndarray)
    t = B.xyxy_to_cxcywh(torch.tensor([[0, 0, 3, 4]]))  # integers: promoted to float64, exact halves
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    assert t.tolist() == [[1.5, 2.0, 3.0, 4.0]]
    assert B.xyxy_to_xywh(torch.zeros(2, 4, dtype=torch.float16)).dtype == torch.float16
    # any leading shape, and a single box
    assert B.xyxy_to_xywh(np.zeros((2, 3, 4))).shape == (2, 3, 4)
    np.testing.assert_array_equal(B.xywh_to_xyxy(np.array([1.0, 1, 2, 2])), [1, 1, 3, 3])


def test_conversion_round_trips():
    rng = np.random.default_rng(0)
    boxes = torch.from_numpy(random_boxes(50, rng)).reshape(5, 10, 4)
    for fmt_a, fmt_b in itertools.permutations(B.BOX_FORMATS, 2):
        x = B.convert_boxes(boxes, "xyxy", fmt_a)
        back = B.convert_boxes(B.convert_boxes(x, fmt_a, fmt_b), fmt_b, fmt_a)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="in_fmt"):
        B.convert_boxes(boxes, "yxyx", "xyxy")


def test_normalize_denormalize():
    boxes = np.array([[10.0, 20.0, 110.0, 70.0]])
    np.testing.assert_allclose(B.normalize_boxes(boxes, 200, 100), [[0.05, 0.2, 0.55, 0.7]])
    cxcywh = B.xyxy_to_cxcywh(boxes)  # same operation in every format
    expected = B.xyxy_to_cxcywh(B.normalize_boxes(boxes, 200, 100))
    np.testing.assert_allclose(B.normalize_boxes(cxcywh, 200, 100), expected)
    # one size per image of a batch: [B, N, 4] with sizes [B, 1]
    rng = np.random.default_rng(1)
    batch = torch.from_numpy(random_boxes(6, rng)).reshape(2, 3, 4)
    w, h = torch.tensor([[640.0], [320.0]]), torch.tensor([[480.0], [200.0]])
    norm = B.normalize_boxes(batch, w, h)
    torch.testing.assert_close(norm[1, 2], batch[1, 2] / torch.tensor([320.0, 200, 320, 200], dtype=torch.float64))
    torch.testing.assert_close(B.denormalize_boxes(norm, w, h), batch)
    with pytest.raises(ValueError, match="positive"):
        B.normalize_boxes(boxes, 0, 100)
    with pytest.raises(ValueError, match="width/height"):
        B.normalize_boxes(batch, torch.ones(5), torch.ones(5))


# ----------------------------------------------------------------------------- geometry
def test_area_clip_scale_translate():
    boxes = np.array([[0.0, 0.0, 4.0, 3.0], [2.0, 2.0, 2.0, 5.0]])
    np.testing.assert_array_equal(B.box_area(boxes), [12.0, 0.0])
    np.testing.assert_array_equal(B.box_area(B.xyxy_to_cxcywh(boxes), fmt="cxcywh"), [12.0, 0.0])
    assert B.box_area(np.zeros((2, 3, 4))).shape == (2, 3)
    clipped = B.clip_boxes(np.array([[-5.0, 2.0, 30.0, 8.0], [40.0, 40.0, 50.0, 50.0]]), 20, 10)
    np.testing.assert_array_equal(clipped, [[0, 2, 20, 8], [20, 10, 20, 10]])  # outside: zero-area on the border
    np.testing.assert_array_equal(B.scale_boxes(boxes[:1], 2.0, 0.5), [[0, 0, 8, 1.5]])
    np.testing.assert_array_equal(B.scale_boxes(boxes[:1], 3.0), [[0, 0, 12, 9]])
    np.testing.assert_array_equal(B.translate_boxes(boxes[:1], 1.0, -1.0), [[1, -1, 5, 2]])
    np.testing.assert_array_equal(B.translate_boxes(np.array([[1.0, 1, 4, 3]]), 1.0, -1.0, fmt="xywh"), [[2, 0, 4, 3]])


# ----------------------------------------------------------------------------- IoU
def test_box_iou_moved_and_reexported():
    assert groundkit.metrics.box_iou is B.box_iou
    assert groundkit.metrics.paired_box_iou is B.paired_box_iou


def test_box_iou_against_brute_force():
    rng = np.random.default_rng(2)
    a, b = random_boxes(7, rng), random_boxes(5, rng)
    for offset in (0.0, 1.0, 0.001):
        np.testing.assert_allclose(B.box_iou(a, b, pixel_offset=offset), iou_reference(a, b, offset), atol=1e-12)
        np.testing.assert_allclose(
            B.paired_box_iou(a[:5], b, pixel_offset=offset), np.diag(iou_reference(a[:5], b, offset)), atol=1e-12
        )
    # hand value: half overlap
    assert B.box_iou(np.array([[0.0, 0, 2, 2]]), np.array([[1.0, 0, 3, 2]]))[0, 0] == pytest.approx(1 / 3)


def test_batched_box_iou():
    rng = np.random.default_rng(3)
    a = random_boxes(3 * 4, rng).reshape(3, 4, 4)
    b = random_boxes(3 * 6, rng).reshape(3, 6, 4)
    for offset in (0.0, 1.0):
        out = B.batched_box_iou(a, b, pixel_offset=offset)
        assert isinstance(out, np.ndarray) and out.shape == (3, 4, 6)
        for k in range(3):
            np.testing.assert_allclose(out[k], iou_reference(a[k], b[k], offset), atol=1e-12)
    t = B.batched_box_iou(torch.from_numpy(a).float(), torch.from_numpy(b))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    z = np.zeros((2, 1, 4))  # zero-area boxes: 0, not NaN
    assert (B.batched_box_iou(z, z) == 0).all()
    assert B.batched_box_iou(np.zeros((2, 0, 4)), np.zeros((2, 3, 4))).shape == (2, 0, 3)


def test_generalized_box_iou_values():
    a = np.array([[0.0, 0, 2, 2], [0.0, 0, 1, 1]])
    b = np.array([[1.0, 1, 3, 3], [2.0, 0, 3, 1]])
    g = B.generalized_box_iou(a, b)
    assert g[0, 0] == pytest.approx(1 / 7 - 2 / 9)  # inter 1, union 7, enclosing 9
    assert g[1, 1] == pytest.approx(-1 / 3)  # disjoint: IoU 0, enclosing 3, union 2
    rng = np.random.default_rng(4)
    x, y = random_boxes(6, rng), random_boxes(8, rng)
    ref = giou_reference(x, y)
    np.testing.assert_allclose(B.generalized_box_iou(x, y), ref, atol=1e-12)
    assert ((ref >= -1) & (ref <= 1)).all()
    np.testing.assert_allclose(B.paired_generalized_box_iou(x, y[:6]), np.diag(ref[:, :6]), atol=1e-6)
    np.testing.assert_allclose(B.paired_generalized_box_iou(x, x), np.ones(6), atol=1e-6)


def test_generalized_box_iou_degenerate_and_gradient():
    pt = np.array([[1.0, 1, 1, 1], [5.0, 5, 5, 5]])  # two zero-area boxes
    g = B.generalized_box_iou(pt, pt)
    assert np.isfinite(g).all()
    assert g[0, 0] == pytest.approx(0.0) and g[0, 1] == pytest.approx(-1.0, abs=1e-6)
    np.testing.assert_allclose(B.paired_generalized_box_iou(pt, pt[::-1].copy()), [-1.0, -1.0], atol=1e-6)
    # the L1 + GIoU loss use: finite gradients, also for a zero-area prediction
    pred = torch.tensor([[0.2, 0.2, 0.6, 0.7], [0.5, 0.5, 0.5, 0.5]], requires_grad=True)
    target = torch.tensor([[0.1, 0.2, 0.5, 0.8], [0.5, 0.5, 0.5, 0.5]])
    loss = (1 - B.paired_generalized_box_iou(pred, target)).sum() + (pred - target).abs().sum()
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert B.generalized_box_iou(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)


def test_shape_and_value_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^a: expected boxes of shape \[N, 4\]"):
        B.box_iou(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"^b: expected boxes of shape \[N, 4\]"):
        B.box_iou(np.zeros((2, 4)), np.zeros((4,)))
    with pytest.raises(ValueError, match="same shape"):
        B.paired_box_iou(np.zeros((2, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"^b: expected boxes of shape \[B, N, 4\]"):
        B.batched_box_iou(np.zeros((2, 3, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="batch sizes differ"):
        B.batched_box_iou(np.zeros((2, 3, 4)), np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match=r"^b: expected boxes of shape \[N, 4\]"):
        B.generalized_box_iou(np.zeros((2, 4)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"^b: expected boxes of shape \[N, 4\]"):
        B.paired_generalized_box_iou(np.zeros((2, 4)), np.zeros((2, 2)), check=False)
    with pytest.raises(ValueError, match=r"^boxes: expected boxes of shape \[\.\.\., 4\]"):
        B.xyxy_to_cxcywh(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"^boxes: expected boxes of shape \[\.\.\., 4\]"):
        B.clip_boxes(np.zeros(()), 10, 10)
    with pytest.raises(ValueError, match="x2 < x1"):
        B.generalized_box_iou(np.array([[5.0, 0, 1, 1]]), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        B.batched_box_iou(np.full((1, 1, 4), np.nan), np.zeros((1, 1, 4)))
