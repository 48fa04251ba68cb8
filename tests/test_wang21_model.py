"""wang21 model shapes and loss values on hand-computed cases (reference formulas of the official code)."""

from __future__ import annotations

import math

import pytest
import torch

from groundkit.methods.wang21.config import Wang21Config, Wang21DataConfig, Wang21ModelConfig
from groundkit.methods.wang21.model import (
    PhraseEncoder,
    Wang21Model,
    distill_loss,
    distill_neighbourhood,
    distill_neighbourhood_loop,
    image_sentence_scores,
    nce_loss,
    ramp_weight,
    teacher_scores,
    teacher_targets,
)


def _cfg(region_dim: int, lstm_hidden: int, mlp_hidden: int, embed_dim: int) -> Wang21Config:
    return Wang21Config(
        data=Wang21DataConfig(region_dim=region_dim),
        model=Wang21ModelConfig(lstm_hidden=lstm_hidden, mlp_hidden=mlp_hidden, embed_dim=embed_dim),
    )


def test_shapes_and_unit_norm():
    torch.manual_seed(0)
    m = Wang21Model(_cfg(20, 16, 32, 8), word_dim=12, region_mean=0.5, region_std=2.0)
    r, q = m(torch.randn(3, 7, 20), torch.randn(3, 4, 5, 12), torch.ones(3, 4, 5, dtype=torch.bool))
    assert r.shape == (3, 7, 8) and q.shape == (3, 4, 8)
    assert torch.allclose(r.norm(dim=-1), torch.ones(3, 7), atol=1e-5)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    # standardisation is part of the model (buffers saved in checkpoints)
    assert float(m.region.mean) == 0.5 and float(m.region.std) == 2.0
    assert "region.mean" in m.state_dict()
    # TF LSTMCell forget_bias=1.0
    assert torch.all(m.phrase.lstm.bias_ih_l0[16:32] == 1.0)


def test_masked_max_pool_keeps_first_step():
    torch.manual_seed(0)
    enc = PhraseEncoder(word_dim=4, hidden=6, mlp_hidden=8, out_dim=3)
    words = torch.randn(2, 5, 4)
    mask = torch.tensor([[False, True, False, True, False], [False, False, False, False, False]])
    h, _ = enc.lstm(words)
    expect0 = torch.maximum(torch.maximum(h[0, 0], h[0, 1]), h[0, 3])  # step 0 always, then masked steps
    expect1 = h[1, 0]
    pooled = torch.stack([expect0, expect1])
    ref = torch.nn.functional.normalize(enc.fc2(torch.relu(enc.fc1(pooled))), dim=-1)
    assert torch.allclose(enc(words, mask), ref, atol=1e-6)


def test_image_sentence_score_hand_computed():
    # 2 pairs, 2 regions, 2 phrases, 2-d unit vectors
    r = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    pm = torch.tensor([[True, True], [True, False]])
    rm = torch.ones(2, 2, dtype=torch.bool)
    S, own = image_sentence_scores(r, q, pm, rm, 2.0)
    # sentence 0 (both phrases) vs image 0: 2*(1 + 1); vs image 1: 2*(0.6 + 0.8)
    # sentence 1 (first phrase only, q=(0,1)) vs image 0: 2*1; vs image 1: 2*0.8
    assert torch.allclose(S, torch.tensor([[4.0, 2.8], [2.0, 1.6]]))
    assert torch.allclose(own[1], torch.tensor([[0.8, 0.0], [0.6, -1.0]]))
    # a padded region never wins the max
    rm2 = torch.tensor([[True, False], [True, True]])
    S2, _ = image_sentence_scores(r, q, pm, rm2, 2.0)
    assert S2[0, 0] == pytest.approx(2.0 * (1.0 + 0.0))


def test_nce_hand_computed():
    S = torch.tensor([[4.0, 2.8], [2.0, 1.6]])
    l0 = -math.log(math.exp(4.0) / (math.exp(4.0) + math.exp(2.8)))
    l1 = -math.log(math.exp(1.6) / (math.exp(2.0) + math.exp(1.6)))
    assert nce_loss(S).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # image -> sentence direction
    c0 = -math.log(math.exp(4.0) / (math.exp(4.0) + math.exp(2.0)))
    c1 = -math.log(math.exp(1.6) / (math.exp(2.8) + math.exp(1.6)))
    assert nce_loss(S, both_directions=True).item() == pytest.approx(0.5 * ((l0 + l1) / 2 + (c0 + c1) / 2), rel=1e-6)
    # both pairs show the same image: with masking neither is a negative of the other -> loss 0
    same = torch.tensor([7, 7])
    assert nce_loss(S, same, mask_same_image=True).item() == pytest.approx(0.0, abs=1e-7)
    assert nce_loss(S, torch.tensor([1, 2]), mask_same_image=True).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_teacher_targets_official_formulas():
    t = torch.tensor([[0.9, 0.05, 0.05, 0.0]])
    oi = teacher_targets(t, "auto", n_classes=545)
    assert torch.allclose(oi, torch.softmax(t - t.mean(-1, keepdim=True), -1))
    assert torch.allclose(oi, torch.softmax(t, -1), atol=1e-7)  # centring does not change a softmax
    e = torch.exp(t[0])
    assert oi[0, 0].item() == pytest.approx((e[0] / e.sum()).item(), rel=1e-6)
    # max/min ratio is at most e for probabilities (very soft targets)
    assert (oi.max() / oi.min()).item() <= math.e + 1e-5
    coco = teacher_targets(t, "auto", n_classes=80)
    assert torch.allclose(coco, torch.softmax(t / 2, -1))
    with pytest.raises(
        ValueError, match=r"545 \(Open Images v2\) or 80.*the logits have 20 classes.*loss.teacher_form"
    ):
        teacher_targets(t, "auto", n_classes=20)
    lp = teacher_targets(t, "log_prob", n_classes=20, temperature=0.5)
    expect = torch.softmax(torch.log(t.clamp(min=1e-12)) / 0.5, -1)
    assert torch.allclose(lp, expect) and lp[0, 0] > 0.99
    # padded proposals get no target mass
    v = torch.tensor([[True, True, False, True]])
    assert teacher_targets(t, "prob_centered", 545, valid=v)[0, 2] == 0


def test_teacher_scores_hard_and_soft():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [1.0, 0.0, 3.0]]])  # 1 image, 2 regions, bg + 2 classes
    probs = logits.softmax(-1)
    idx = torch.tensor([[[1, 0]]])
    hard = torch.tensor([[[0.0, 1.0, 0.0]]])
    assert torch.allclose(
        teacher_scores(logits, hard, idx), torch.stack([probs[0, 1, 1], probs[0, 0, 1]]).view(1, 1, 2)
    )
    soft = torch.tensor([[[0.0, 0.25, 0.75]]])
    exp = 0.25 * probs[0, :, 1] + 0.75 * probs[0, :, 2]
    assert torch.allclose(teacher_scores(logits, soft, idx)[0, 0], exp[[1, 0]])


def test_distill_loss_hand_computed():
    student = torch.tensor([[[0.5, -0.2, 0.1]]])
    idx = torch.tensor([[[2, 0]]])
    target = torch.tensor([[[0.7, 0.3]]])
    z = torch.tensor([0.1, 0.5])
    logp = z.log_softmax(0)
    expect = -(0.7 * logp[0] + 0.3 * logp[1])
    assert distill_loss(student, idx, target, torch.tensor([[True]])).item() == pytest.approx(expect.item(), rel=1e-6)
    # student scale multiplies the cosines
    logp10 = (10 * z).log_softmax(0)
    assert distill_loss(student, idx, target, torch.tensor([[True]]), scale=10.0).item() == pytest.approx(
        -(0.7 * logp10[0] + 0.3 * logp10[1]).item(), rel=1e-6
    )
    # an unmapped phrase contributes nothing; the mean is over distillable phrases only
    student2 = student.expand(1, 2, 3)
    idx2 = idx.expand(1, 2, 2)
    tgt2 = target.expand(1, 2, 2)
    assert distill_loss(student2, idx2, tgt2, torch.tensor([[True, False]])).item() == pytest.approx(
        expect.item(), rel=1e-6
    )
    assert distill_loss(student, idx, target, torch.tensor([[False]])).item() == 0.0


def test_ramp_schedule():
    assert ramp_weight(0) == pytest.approx(0.001)
    assert ramp_weight(499) == pytest.approx(0.001)
    assert ramp_weight(500) == pytest.approx(1.001)
    assert ramp_weight(1000) == pytest.approx(2.001)
    assert ramp_weight(1500) == pytest.approx(3.0)
    assert ramp_weight(100000) == pytest.approx(3.0)
    assert ramp_weight(250, every=100) == pytest.approx(2.001)


def test_neighbourhood_vectorised_equals_loop():
    g = torch.Generator().manual_seed(0)
    B, P, N, K = 6, 5, 14, 8
    xy = torch.randint(0, 50, (B, N, 2), generator=g).float()
    wh = torch.randint(1, 40, (B, N, 2), generator=g).float()
    boxes = torch.cat([xy, xy + wh], -1)
    boxes[:, 3] = boxes[:, 2]  # duplicate boxes: exact IoU ties
    boxes[:, 5] = boxes[:, 2]
    scores = torch.randn(B, P, N, generator=g)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, -3:] = False
    vec = distill_neighbourhood(scores, boxes, valid, K)
    loop = distill_neighbourhood_loop(scores, boxes, valid, K)
    assert vec.shape == (B, P, K)
    assert torch.equal(vec, loop)
    best = scores.masked_fill(~valid[:, None], float("-inf")).argmax(-1)
    assert torch.equal(vec[..., 0], torch.where(torch.isin(best, torch.tensor([2, 3, 5])), vec[..., 0], best))
    assert not torch.isin(vec[0], torch.arange(N - 3, N)).any()  # padded regions never selected (enough valid ones)


def test_training_gradients_flow_through_both_losses():
    torch.manual_seed(0)
    m = Wang21Model(_cfg(10, 8, 16, 8), word_dim=6)
    r, q = m(torch.randn(4, 9, 10), torch.randn(4, 3, 4, 6), torch.ones(4, 3, 4, dtype=torch.bool))
    pm, rm = torch.ones(4, 3, dtype=torch.bool), torch.ones(4, 9, dtype=torch.bool)
    S, own = image_sentence_scores(r, q, pm, rm, m.scale())
    boxes = torch.rand(4, 9, 2) * 50
    boxes = torch.cat([boxes, boxes + 20], -1)
    idx = distill_neighbourhood(own, boxes, rm, 4)
    w = torch.zeros(4, 3, 6)
    w[..., 2] = 1
    t = teacher_scores(torch.randn(4, 9, 6), w, idx)
    y = teacher_targets(t, "prob_centered", 5)
    loss = nce_loss(S) + distill_loss(own, idx, y, pm)
    loss.backward()
    assert m.region.fc1.weight.grad.abs().sum() > 0 and m.phrase.lstm.weight_ih_l0.grad.abs().sum() > 0
    assert torch.isfinite(loss)


def test_skipping_trailing_padding_is_exact():
    torch.manual_seed(0)
    enc = PhraseEncoder(word_dim=4, hidden=6, mlp_hidden=8, out_dim=3)
    words = torch.randn(3, 10, 4)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, [0, 2]] = True
    h, _ = enc.lstm(words)  # full 10 steps, as the official unrolled LSTM
    keep = mask.clone()
    keep[:, 0] = True
    pooled = h.masked_fill(~keep[..., None], float("-inf")).amax(1)
    ref = torch.nn.functional.normalize(enc.fc2(torch.relu(enc.fc1(pooled))), dim=-1)
    assert torch.allclose(enc(words, mask), ref, atol=1e-6)
