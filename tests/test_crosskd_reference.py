"""crosskd reference mode = the official CENet / RAdam, each behaviour pinned on tiny inputs:
collaborative gating order, per-pair BatchNorm statistics, decoupled RAdam weight decay; and the
whole training step against the official-like baseline of the benchmark."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from groundkit.bench.crosskd_official_like import OfficialLikeRAdam, official_like_forward, official_like_step
from groundkit.methods.crosskd import METHOD, CrossKDConfig
from groundkit.methods.crosskd.model import (
    CENet,
    CENetConfig,
    _batch_norm_per_group,
    moe_weights,
    training_similarities,
)
from groundkit.optim import RAdam, build_optimizer


def _net(gating="sequential", pair_bn="per_pair", experts=None, d=4, seed=0) -> CENet:
    torch.manual_seed(seed)
    experts = experts or {"a": 3, "b": 5}
    return CENet(
        CENetConfig(
            expert_dims=experts, vlad_clusters={"text": 2}, text_dim=3, shared_dim=d, gating=gating, pair_bn=pair_bn
        )
    )


def _batch(net: CENet, B=4, seed=1, missing=True) -> dict:
    g = torch.Generator().manual_seed(seed)
    avail = torch.ones(B, len(net.experts))
    if missing:
        avail[1, 0] = 0
    experts = {
        m: torch.randn(B, net.cfg.expert_dims[m], generator=g) * avail[:, i : i + 1] for i, m in enumerate(net.experts)
    }
    return {"text": torch.randn(B, 5, 3, generator=g), "experts": experts, "avail": avail}


def _g(net: CENet, x_m: torch.Tensor, x_n: torch.Tensor) -> torch.Tensor:
    return net.g_reason(torch.cat((x_m, x_n), 1))  # eval mode: row-wise


# ----------------------------------------------------------------------------- 1. gating order


@pytest.mark.parametrize("gating", ["sequential", "parallel"])
def test_gating_order_two_experts_by_hand(gating):
    """Expert a (first) pairs with ungated psi_a, psi_b; expert b pairs with psi_b and, in the
    official order, with the *gated* v_a (the paper: the ungated psi_a)."""
    net = _net(gating).eval()
    psi = F.normalize(torch.randn(3, 2, 4), dim=-1)
    a = torch.ones(3, 2)
    with torch.no_grad():
        v = net.collaborative_gating(psi, a)
        geu_a, geu_b = net.video_geu["a"], net.video_geu["b"]
        T_a = (_g(net, psi[:, 0], psi[:, 0]) + _g(net, psi[:, 0], psi[:, 1])) / (2 + 1e-11)
        v_a = geu_a(psi[:, 0], T_a)
        partner = v_a if gating == "sequential" else psi[:, 0]
        T_b = (_g(net, psi[:, 1], partner) + _g(net, psi[:, 1], psi[:, 1])) / (2 + 1e-11)
        v_b = geu_b(psi[:, 1], T_b)
    assert torch.allclose(v[:, 0], v_a, atol=1e-6)
    assert torch.allclose(v[:, 1], v_b, atol=1e-6)


def test_gating_order_changes_only_later_experts_and_masks_missing():
    seq, par = _net("sequential").eval(), _net("parallel").eval()
    psi = F.normalize(torch.randn(3, 2, 4), dim=-1)
    a = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        vs, vp = seq.collaborative_gating(psi, a), par.collaborative_gating(psi, a)
    assert torch.allclose(vs[:, 0], vp[:, 0], atol=1e-6)  # the first expert never sees a gated partner
    assert not torch.allclose(vs[0, 1], vp[0, 1], atol=1e-4)  # the second does (both available)
    # a missing partner is masked out of the average: row 2 lacks expert a, so b's T uses (b, b) only
    assert torch.allclose(vs[2, 1], vp[2, 1], atol=1e-6)


def test_include_self_false_pairs():
    net = _net(experts={"a": 3, "b": 5, "c": 2}).eval()
    net.cfg.include_self = False
    psi = F.normalize(torch.randn(2, 3, 4), dim=-1)
    with torch.no_grad():
        v = net.collaborative_gating(psi, torch.ones(2, 3))
        T_a = (_g(net, psi[:, 0], psi[:, 1]) + _g(net, psi[:, 0], psi[:, 2])) / (2 + 1e-11)
    assert torch.allclose(v[:, 0], net.video_geu["a"](psi[:, 0], T_a), atol=1e-6)


# ----------------------------------------------------------------------------- 2. per-pair BatchNorm


def test_batch_norm_per_group_hand_case():
    bn = torch.nn.BatchNorm1d(1)  # momentum 0.1, running (0, 1)
    x = torch.tensor([[[0.0], [10.0]], [[2.0], [30.0]]])  # [B=2, G=2, d=1]: group 0 {0, 2}, group 1 {10, 30}
    y = _batch_norm_per_group(x, bn)
    assert torch.allclose(y, torch.tensor([[[-1.0], [-1.0]], [[1.0], [1.0]]]), atol=1e-4)  # each group by itself
    # two updates in group order, unbiased variances 2 and 200
    assert bn.running_mean.item() == pytest.approx(0.9 * (0.1 * 1.0) + 0.1 * 20.0)  # 2.09
    assert bn.running_var.item() == pytest.approx(0.9 * (0.9 * 1.0 + 0.1 * 2.0) + 0.1 * 200.0)  # 20.99
    assert int(bn.num_batches_tracked) == 2
    pooled = torch.nn.BatchNorm1d(1)(x.reshape(4, 1))  # one set of statistics: mean 10.5
    assert not torch.allclose(pooled.reshape(2, 2, 1), y, atol=1e-2)


def test_batch_norm_per_group_equals_separate_calls_with_gradients():
    torch.manual_seed(0)
    bn1, bn2 = torch.nn.BatchNorm1d(6), torch.nn.BatchNorm1d(6)
    bn1.weight.data.uniform_(0.5, 2)
    bn1.bias.data.normal_()
    bn2.load_state_dict(bn1.state_dict())
    x = torch.randn(5, 3, 6, requires_grad=True)
    y1 = _batch_norm_per_group(x, bn1)
    y2 = torch.stack([bn2(x[:, g]) for g in range(3)], 1)
    assert torch.allclose(y1, y2, atol=1e-6)
    gy = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, (x, bn1.weight, bn1.bias), gy)
    g2 = torch.autograd.grad(y2, (x, bn2.weight, bn2.bias), gy)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(bn1, k).float(), getattr(bn2, k).float(), atol=1e-6)


@pytest.mark.parametrize("pair_bn, updates", [("per_pair", 3 * 3), ("pooled", 1)])
def test_pair_mlp_running_stat_updates(pair_bn, updates):
    for gating in ("sequential", "parallel"):
        net = _net(gating, pair_bn, experts={"a": 3, "b": 5, "c": 2}).train()
        net(_batch(net))
        bns = [m for m in net.g_reason if isinstance(m, torch.nn.BatchNorm1d)]
        # sequential gating calls the pair MLP once per expert: pooled statistics are then per expert
        want = updates if pair_bn == "per_pair" or gating == "parallel" else 3
        assert [int(b.num_batches_tracked) for b in bns] == [want, want]


def test_pair_bn_mode_does_not_matter_in_eval():
    a, b = _net("sequential", "per_pair").eval(), _net("sequential", "pooled").eval()
    batch = _batch(a)
    with torch.no_grad():
        assert torch.allclose(a(batch)["sims"], b(batch)["sims"])


# ----------------------------------------------------------------------------- 3. decoupled RAdam


def test_radam_decoupled_weight_decay_hand_case():
    """Zero gradients: decoupled decay shrinks the weight by (1 - lr wd) per step and nothing else;
    coupled decay turns wd * p into a gradient that Adam normalises (another trajectory: 0.745, not 0.599)."""
    for fused in (True, False):
        p = torch.nn.Parameter(torch.ones(1))
        opt = RAdam([p], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True, fused=fused)
        for _ in range(10):  # steps 1-5 plain momentum, 6-10 rectified
            p.grad = torch.zeros(1)
            opt.step()
        assert p.item() == pytest.approx(0.95**10, rel=1e-6)
        q = torch.nn.Parameter(torch.ones(1))
        coupled = RAdam([q], lr=0.1, weight_decay=0.5, decoupled_weight_decay=False, fused=fused)
        ref = torch.nn.Parameter(torch.ones(1))
        torch_coupled = torch.optim.RAdam([ref], lr=0.1, weight_decay=0.5)
        for _ in range(10):
            q.grad, ref.grad = torch.zeros(1), torch.zeros(1)
            coupled.step()
            torch_coupled.step()
        assert q.item() == pytest.approx(ref.item(), rel=1e-6) and abs(q.item() - 0.95**10) > 0.1


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("decoupled", [True, False])
def test_radam_matches_official_and_torch(fused, decoupled):
    torch.manual_seed(0)
    init = [torch.randn(4, 3), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(25)]

    def run(make):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = make(ps)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return ps

    ours = run(lambda ps: RAdam(ps, lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled, fused=fused))
    if decoupled:
        want = run(lambda ps: OfficialLikeRAdam(ps, lr=0.01, weight_decay=0.1))
    else:
        want = run(lambda ps: torch.optim.RAdam(ps, lr=0.01, weight_decay=0.1))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, want))


def test_radam_state_dict_interchangeable_with_torch():
    p = torch.nn.Parameter(torch.ones(3))
    opt = RAdam([p], lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)
    p.grad = torch.ones(3)
    opt.step()
    other = torch.optim.RAdam([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert (
        other.param_groups[0]["decoupled_weight_decay"]
        and float(other.state[other.param_groups[0]["params"][0]]["step"]) == 1
    )
    back = RAdam([p], lr=0.1)
    back.load_state_dict(other.state_dict())
    p.grad = torch.ones(3)
    back.step()
    assert float(back.state[p]["step"]) == 2


def test_crosskd_config_optimizer_is_decoupled_radam():
    cfg = CrossKDConfig()
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    assert isinstance(opt, RAdam) and opt.param_groups[0]["decoupled_weight_decay"]
    assert opt.param_groups[0]["weight_decay"] == 1e-5 and opt.param_groups[0]["lr"] == 1e-3
    cfg.optim.decoupled_weight_decay = False
    assert not build_optimizer(torch.nn.Linear(2, 2), cfg.optim).param_groups[0]["decoupled_weight_decay"]


# ----------------------------------------------------------------------------- fast path pieces


def test_forward_builds_only_requested_matrices():
    net = _net().train()
    out = net(_batch(net))
    assert out["text_sims"] is None and out["video_sims"] is None
    out = net(_batch(net), text_sims=True)
    assert out["text_sims"] is not None and out["video_sims"] is None


def test_training_similarities_two_step_matches_three_operand_einsum():
    torch.manual_seed(0)
    t, v = F.normalize(torch.randn(5, 3, 8), dim=-1), F.normalize(torch.randn(5, 3, 8), dim=-1)
    w = torch.softmax(torch.randn(5, 3), 1)
    a = torch.tensor([[1.0, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])
    S, C, V = training_similarities(t, w, v, a, True, True)
    ww = moe_weights(w, a)
    assert torch.allclose(S, torch.einsum("qvm,qmd,vmd->qv", ww, t, v), atol=1e-6)
    assert torch.allclose(C, torch.einsum("qvm,qmd,vmd->qv", ww, t, t), atol=1e-6)
    assert torch.allclose(V, torch.einsum("qvm,qmd,vmd->qv", ww, v, v), atol=1e-6)


# ----------------------------------------------------------------------------- against the official-like step


def test_reference_forward_matches_official_like_forward():
    net = _net(experts={"a": 3, "b": 5, "c": 2}, d=6).train()
    other = copy.deepcopy(net)
    batch = _batch(net, B=6)
    out = net(batch, text_sims=True, video_sims=True)
    ind = {m: batch["avail"][:, i] for i, m in enumerate(net.experts)}
    experts = {m: x.clone() for m, x in batch["experts"].items()}
    S, C, V, vid = official_like_forward(other, experts, ind, batch["text"].unsqueeze(1))
    assert torch.allclose(out["sims"], S, atol=1e-6)
    assert torch.allclose(out["text_sims"], C, atol=1e-6)
    assert torch.allclose(out["video_sims"], V, atol=1e-6)
    assert torch.allclose(out["video_emb"], torch.stack([vid[m] for m in net.experts], 1), atol=1e-6)
    for k, v in net.state_dict().items():  # 9 running-stat updates of each pair-MLP BatchNorm, same values
        assert torch.allclose(v.float(), other.state_dict()[k].float(), atol=1e-6), k
    # the paper formula with pooled statistics does not reproduce it
    fast = _net("parallel", "pooled", experts={"a": 3, "b": 5, "c": 2}, d=6).train()
    assert not torch.allclose(fast(batch)["sims"], S, atol=1e-4)


def test_reference_gradients_match_official_like_step():
    cfg = CrossKDConfig()
    net = _net(experts={"a": 3, "b": 5, "c": 2}, d=6).train()
    other = copy.deepcopy(net)
    batch = _batch(net, B=6)
    loss, _ = METHOD.training_step(net, batch, 0, cfg)
    loss.backward()
    no_update = torch.optim.SGD(other.parameters(), lr=0.0)
    loss_o = official_like_step(other, no_update, batch, cfg.loss.margin, cfg.loss.cap_t)
    assert loss.item() == pytest.approx(loss_o.item(), rel=1e-5)
    for (k, a), b in zip(net.named_parameters(), other.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), k


def test_reference_training_steps_match_official_like_steps():
    """Forward, ranking + caption distillation loss, backward and decoupled RAdam: after 7 steps (the
    last rectified) losses and weights agree. (Biases that feed a BatchNorm have a zero gradient up
    to rounding noise, which Adam normalises into lr-sized steps, hence the weight tolerance.)"""
    cfg = CrossKDConfig()
    cfg.optim.lr = 1e-2
    cfg.optim.weight_decay = 1e-2
    net = _net(experts={"a": 3, "b": 5, "c": 2}, d=6).train()
    other = copy.deepcopy(net)
    opt = build_optimizer(net, cfg.optim)
    opt_o = OfficialLikeRAdam(other.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    for s in range(7):
        batch = _batch(net, B=6, seed=s)
        loss, _ = METHOD.training_step(net, batch, s, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_o = official_like_step(other, opt_o, batch, cfg.loss.margin, cfg.loss.cap_t)
        assert loss.item() == pytest.approx(loss_o.item(), rel=1e-4)
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-3), k
