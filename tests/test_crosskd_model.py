"""CENet pieces and the CE / TeachText / CrossKD losses on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from groundkit.methods.crosskd.model import (
    CENet,
    CENetConfig,
    NetVLAD,
    max_margin_ranking_loss,
    moe_similarity,
    moe_weights,
    rank_distil_loss,
    teacher_similarity,
    teachtext_loss,
)


def test_netvlad_shapes_and_ghost_clusters():
    torch.manual_seed(0)
    v = NetVLAD(dim=5, clusters=3, ghost_clusters=2)
    assert v.centroids.shape == (5, 5) and v.clusters2.shape == (1, 5, 3) and v.out_dim == 15
    out = v(torch.randn(4, 7, 5))
    assert out.shape == (4, 15)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
    # intra-normalised: each of the 3 cluster blocks (feature-major layout) has the same norm before the final L2
    blocks = out.reshape(4, 5, 3).norm(dim=1)
    assert torch.allclose(blocks, torch.full((4, 3), 1 / math.sqrt(3)), atol=1e-5)
    # ghost clusters absorb assignment mass: a large ghost logit leaves the residuals = -a_sum*c -> still finite
    with pytest.raises(ValueError, match="feature dim 5"):
        v(torch.randn(2, 3, 4))


def test_netvlad_mask_is_ignored_by_default():
    torch.manual_seed(0)
    v = NetVLAD(4, 2).eval()
    x = torch.randn(1, 3, 4)
    m = torch.tensor([[True, True, False]])
    assert torch.allclose(v(x, m), v(x))  # reference quirk
    vm = NetVLAD(4, 2, use_mask=True).eval()
    vm.load_state_dict(v.state_dict())
    assert torch.allclose(vm(x, m), vm(x[:, :2]), atol=1e-6)


def test_moe_renormalised_by_availability_hand_case():
    w = torch.tensor([[0.5, 0.3, 0.2]])
    avail = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    ww = moe_weights(w, avail)
    assert torch.allclose(ww[0, 0], torch.tensor([0.5 / 0.7, 0.0, 0.2 / 0.7]))
    assert torch.allclose(ww[0, 1], w[0])
    # per-expert dot products 1, 2, 3 for video 0 and 4, 5, 6 for video 1 (1-d embeddings)
    t = torch.ones(1, 3, 1)
    v = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [6.0]]])
    S = moe_similarity(t, w, v, avail)
    assert torch.allclose(S, torch.tensor([[(0.5 * 1 + 0.2 * 3) / 0.7, 0.5 * 4 + 0.3 * 5 + 0.2 * 6]]))


def test_moe_similarity_extra_matrices_match():
    torch.manual_seed(0)
    t = F.normalize(torch.randn(4, 3, 8), dim=-1)
    v = F.normalize(torch.randn(4, 3, 8), dim=-1)
    w = torch.softmax(torch.randn(4, 3), 1)
    a = torch.tensor([[1.0, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1]])
    S, C, V = moe_similarity(t, w, v, a, extra=True)
    assert torch.allclose(S, moe_similarity(t, w, v, a), atol=1e-6)
    ww = moe_weights(w, a)
    assert torch.allclose(C[1, 2], (ww[1, 2] * (t[1] * t[2]).sum(-1)).sum(), atol=1e-6)
    assert torch.allclose(C.diagonal(), torch.ones(4), atol=1e-5)  # C_ii = sum of weights = 1


def test_max_margin_off_diagonal_mean_hand_case():
    S = torch.tensor([[0.5, 0.3], [0.6, 0.2]])
    m = 0.1
    # pairs (i != j): t2v rows: max(0, m - S_ii + S_ij); v2t: max(0, m - S_ii + S_ji)
    terms = [max(0, m - 0.5 + 0.3), max(0, m - 0.2 + 0.6), max(0, m - 0.5 + 0.6), max(0, m - 0.2 + 0.3)]
    assert max_margin_ranking_loss(S, m).item() == pytest.approx(sum(terms) / 4)
    assert max_margin_ranking_loss(torch.tensor([[0.3]]), m).item() == 0.0  # no negatives, no NaN


def test_kl_with_temperature_hand_case():
    S = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    C = torch.tensor([[1.0, 0.5], [0.2, 1.0]])
    tau = 2.0
    p = torch.softmax(C / tau, 1)
    q = torch.softmax(S / tau, 1)
    want = (p * (p.log() - q.log())).sum() / 2  # batchmean
    assert rank_distil_loss(S, C, tau).item() == pytest.approx(want.item(), rel=1e-5)
    assert rank_distil_loss(C, C, tau).item() == pytest.approx(0.0, abs=1e-7)


def test_detach_target_gradient():
    S = torch.tensor([[1.0, 0.0], [0.2, 0.7]], requires_grad=True)
    C = torch.tensor([[1.0, 0.5], [0.2, 1.0]], requires_grad=True)
    rank_distil_loss(S, C, 1.0).backward()
    assert C.grad is not None and C.grad.abs().sum() > 0  # reference: gradients reach the target
    S.grad, C.grad = None, None
    rank_distil_loss(S, C, 1.0, detach_target=True).backward()
    assert C.grad is None and S.grad.abs().sum() > 0


def test_teachtext_mean_of_teachers_smoothl1():
    tt = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[0.5, 0.0]], [[0.0, 0.5]]]])  # [K=2, B=2, M=1, d=2]
    tv = tt.clone()
    T = teacher_similarity(tt, tv)
    assert torch.allclose(T, torch.tensor([[0.625, 0.0], [0.0, 0.625]]))
    S = torch.tensor([[0.625, 2.0], [0.1, 0.625]])
    # Huber(beta=1): 0.5 x^2 below 1, |x| - 0.5 above
    assert teachtext_loss(S, T).item() == pytest.approx((0 + 1.5 + 0.5 * 0.01 + 0) / 4)


def test_cenet_forward_shapes_and_missing_experts():
    torch.manual_seed(0)
    net = CENet(
        CENetConfig(expert_dims={"b.x.0": 6, "a": 3}, vlad_clusters={"text": 2, "a": 2}, text_dim=5, shared_dim=8)
    )
    assert net.experts == ["a", "b.x.0"]  # alphabetical, dotted names allowed
    batch = {
        "text": torch.randn(3, 4, 5),
        "experts": {"a": torch.randn(3, 7, 3), "b.x.0": torch.randn(3, 6)},
        "avail": torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]),
    }
    out = net(batch)
    assert out["sims"].shape == (3, 3) and out["text_emb"].shape == (3, 2, 8) and out["video_emb"].shape == (3, 2, 8)
    assert torch.allclose(out["moe"].sum(1), torch.ones(3), atol=1e-6)
    assert (out["sims"].abs() <= 1 + 1e-5).all()
    # video 1 lacks expert "a": its similarity uses "b.x.0" only
    s = (out["text_emb"][:, 1] * out["video_emb"][1, 1]).sum(-1)
    assert torch.allclose(out["sims"][:, 1], s, atol=1e-5)
