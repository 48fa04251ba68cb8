"""A benchmark baseline: the official CrossKD / Collaborative Experts training step, re-written.

Not part of the method. :func:`official_like_forward` runs the operations of the official
``CENet.forward`` -> ``CEModule.forward`` -> ``sharded_cross_view_inner_product`` in the same order
(NaN dropping and its checks, NetVLAD with its sanity checks, the text gated units one expert at a
time, the per-pair loop of the collaborative gating over ``itertools.product`` of the experts with
one call of the pair MLP per pair, the Mish written as ``x * tanh(softplus(x))``, the ``[Q, V, M]``
weight tensor, the three similarity matrices built expert by expert with their host copies),
:func:`official_like_loss` the max-margin ranking loss with its index bookkeeping plus the caption
distillation term, and :class:`OfficialLikeRAdam` the per-parameter RAdam of the official
``utils/radam.py`` (decoupled weight decay, one parameter at a time). It uses the modules of a
groundkit :class:`~groundkit.methods.crosskd.model.CENet`, so both run on the same weights; on the same
batch it gives the same outputs as the reference mode (``gating="sequential"``, ``pair_bn="per_pair"``)
up to float rounding (tested).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.crosskd.model import CENet, _key

__all__ = ["official_like_forward", "official_like_loss", "OfficialLikeRAdam", "official_like_step"]


def _mish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(F.softplus(x))


def _drop_nans(x: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
    missing = torch.nonzero(ind == 0).flatten()
    if missing.numel():
        x[missing] = 0
    if torch.isnan(x).sum() > 0:
        raise ValueError("NaNs left in an expert after dropping missing rows")
    return x


def _netvlad(v: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.isnan(torch.sum(x)) or torch.isnan(v.centroids[0][0]):
        raise ValueError("NaN in NetVLAD input or clusters")
    n = x.size()[1]
    x = x.view(-1, v.dim)
    assignment = torch.matmul(x, v.centroids)
    assignment = v.bn(assignment)
    assignment = F.softmax(assignment, dim=1)
    assignment = assignment[:, : v.clusters]
    assignment = assignment.view(-1, n, v.clusters)
    a_sum = torch.sum(assignment, dim=1, keepdim=True)
    a = a_sum * v.clusters2
    assignment = assignment.transpose(1, 2)
    x = x.view(-1, n, v.dim)
    vlad = torch.matmul(assignment, x)
    vlad = vlad.transpose(1, 2)
    vlad = vlad - a
    vlad = F.normalize(vlad)
    vlad = vlad.reshape(-1, v.clusters * v.dim)
    return F.normalize(vlad)


def _context_gating(fc: nn.Linear, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x1 = bn(fc(x))
    return F.glu(torch.cat((x, x1), 1), 1)


def _pair_mlp_shared(net: CENet, x: torch.Tensor) -> torch.Tensor:
    for layer in list(net.g_reason)[1:]:
        x = _mish(x) if isinstance(layer, nn.Mish) else layer(x)
    return x


def official_like_forward(
    net: CENet, experts: dict[str, torch.Tensor], ind: dict[str, torch.Tensor], text: torch.Tensor
):
    """experts {name: [B, D] or [B, N, D]} (missing rows NaN or anything), ind {name: [B]} 0/1,
    text [B, captions, N, text_dim] -> (caption-video S, caption-caption C, video-video V, video
    embeddings {name: [B, d]}), the official training-mode forward (one caption per video)."""
    mods = list(net.experts)
    aggregated = {}
    for m in mods:
        experts[m] = _drop_nans(experts[m], ind[m])
        k = _key(m)
        aggregated[m] = _netvlad(net.video_pooling[k], experts[m]) if k in net.video_pooling else experts[m]
    B, caps, n_words, text_feat_dim = text.size()
    text = text.view(B * caps, n_words, text_feat_dim)
    text = _netvlad(net.text_pooling, text)
    text = text.view(B, caps, -1)
    # CEModule
    B, caps, feat_dim = text.size()
    text = text.view(B * caps, feat_dim)
    text_embd = {}
    for m in mods:
        geu = net.text_geu[_key(m)]
        t = F.normalize(_context_gating(geu.cg.fc, geu.cg.bn, geu.fc(text)))
        text_embd[m] = t.view(B, caps, -1)
    text = text.view(B, caps, -1)
    M = len(mods)
    moe = F.softmax(net.moe_fc(text.view(B * caps, -1)), dim=1).view(B, caps, M)
    for m in mods:
        aggregated[m] = F.normalize(net.reduce_dim[_key(m)](aggregated[m]))
    dev = aggregated[mods[0]].device
    combos = list(itertools.product(aggregated, repeat=2)) if net.cfg.include_self else None
    if combos is None:
        combos = list(itertools.permutations(aggregated, 2))
    for cur in mods:
        mask_num, cur_mask, temp, avai = 0, 0, {}, {}
        for mod0, mod1 in combos:
            if mod0 == cur:
                fused = torch.cat((aggregated[mod0], aggregated[mod1]), 1)
                t = net.g_reason[0](fused)
                t = _pair_mlp_shared(net, t)
                temp[f"{mod0}_{mod1}"] = t
                avai[f"{mod0}_{mod1}"] = (ind[mod0].float() * ind[mod1].float()).to(dev)
        for key in temp:
            cur_mask += temp[key] * avai[key].unsqueeze(1)
            mask_num += avai[key]
        cur_mask = torch.div(cur_mask, (mask_num + 0.00000000001).unsqueeze(1))
        geu = net.video_geu[_key(cur)]
        x = aggregated[cur]
        x2 = geu.fc(x)
        x1 = geu.bn1(cur_mask)
        x2 = geu.bn2(x2)
        gated = F.glu(torch.cat((x, x1 + x2), 1), 1)
        aggregated[cur] = F.normalize(gated)
    # sharded_cross_view_inner_product, training case
    T = text_embd[mods[0]].size(0)
    sims = torch.zeros(T * caps, B, device=dev)
    weights = moe.view(T * caps, -1)
    available = torch.ones(1, B, M, dtype=weights.dtype)
    for i, m in enumerate(mods):
        available[:, :, i] = ind[m]
    available = available.to(weights.device)
    if not set(torch.unique(available).cpu().numpy()).issubset({0, 1}):
        raise ValueError("availability must be 0 or 1")
    wt = weights.view(T * caps, 1, M) * available
    wt = torch.div(wt, wt.sum(2).view(T * caps, B, 1))
    for i, m in enumerate(mods):
        v = aggregated[m].reshape(B, -1)
        t = text_embd[m].view(T * caps, -1)
        t.data.cpu().numpy(), v.data.cpu().numpy()  # the official loop copies both to the host
        sims += wt[:, :, i] * torch.matmul(t, v.t())
    text_sims = torch.zeros(T * caps, T * caps, device=dev)
    for i, m in enumerate(mods):
        t = text_embd[m].view(T * caps, -1)
        text_sims += wt[:, :, i] * torch.matmul(t, t.t())
    vid_sims = torch.zeros(B, B, device=dev)
    for i, m in enumerate(mods):
        v = aggregated[m].reshape(B, -1)
        vid_sims += wt[:, :, i] * torch.matmul(v, v.t())
    if torch.isnan(sims).sum().item():
        raise ValueError("NaN in the similarity matrix")
    return sims, text_sims, vid_sims, aggregated


def official_like_loss(sims: torch.Tensor, text_sims: torch.Tensor, margin: float, cap_t: float) -> torch.Tensor:
    """Max-margin ranking loss (``fix_norm``) + caption distillation, in the official operations."""
    n = sims.size()[0]
    x1 = torch.diag(sims).unsqueeze(1).expand(n, n).contiguous().view(-1, 1)
    x1 = torch.cat((x1, x1), 0)
    x2 = sims.view(-1, 1)
    x3 = sims.transpose(0, 1).contiguous().view(-1, 1)
    x2 = torch.cat((x2, x3), 0)
    F.relu(margin - (x1 - x2))  # computed and discarded by the official code before the fix_norm selection
    keep = torch.ones(sims.shape) - torch.eye(sims.shape[0])
    keep1 = keep.view(-1, 1)
    keep2 = keep.transpose(0, 1).contiguous().view(-1, 1)
    keep_idx = torch.nonzero(torch.cat((keep1, keep2), 0).flatten()).flatten().to(sims.device)
    x1_ = torch.index_select(x1, dim=0, index=keep_idx)
    x2_ = torch.index_select(x2, dim=0, index=keep_idx)
    loss = F.relu(margin - (x1_ - x2_)).mean()
    log_q = torch.log_softmax(sims / cap_t, dim=1)
    p = torch.softmax(text_sims / cap_t, dim=1)
    return loss + 1.0 * F.kl_div(log_q, p, reduction="batchmean")


class OfficialLikeRAdam(torch.optim.Optimizer):
    """The official per-parameter RAdam: moments, a 10-slot step-size cache, decoupled weight decay
    ``p -= lr * wd * p``, then the (rectified) update, one parameter at a time in float32 copies."""

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.buffer = [[None, None, None] for _ in range(10)]

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data.float()
                p32 = p.data.float()
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p32)
                    state["exp_avg_sq"] = torch.zeros_like(p32)
                else:
                    state["exp_avg"] = state["exp_avg"].type_as(p32)
                    state["exp_avg_sq"] = state["exp_avg_sq"].type_as(p32)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                state["step"] += 1
                buffered = self.buffer[int(state["step"] % 10)]
                if state["step"] == buffered[0]:
                    n_sma, step_size = buffered[1], buffered[2]
                else:
                    buffered[0] = state["step"]
                    beta2_t = beta2 ** state["step"]
                    n_sma_max = 2 / (1 - beta2) - 1
                    n_sma = n_sma_max - 2 * state["step"] * beta2_t / (1 - beta2_t)
                    buffered[1] = n_sma
                    if n_sma >= 5:
                        step_size = math.sqrt(
                            (1 - beta2_t)
                            * (n_sma - 4)
                            / (n_sma_max - 4)
                            * (n_sma - 2)
                            / n_sma
                            * n_sma_max
                            / (n_sma_max - 2)
                        ) / (1 - beta1 ** state["step"])
                    else:
                        step_size = 1.0 / (1 - beta1 ** state["step"])
                    buffered[2] = step_size
                if group["weight_decay"] != 0:
                    p32.add_(p32, alpha=-group["weight_decay"] * group["lr"])
                if n_sma >= 5:
                    denom = exp_avg_sq.sqrt().add_(group["eps"])
                    p32.addcdiv_(exp_avg, denom, value=-step_size * group["lr"])
                else:
                    p32.add_(exp_avg, alpha=-step_size * group["lr"])
                p.data.copy_(p32)


def official_like_step(
    net: CENet, opt: torch.optim.Optimizer, batch: dict, margin: float, cap_t: float, teachers: list | None = None
) -> torch.Tensor:
    """One official training iteration: zero_grad, forward, TeachText teacher sims (computed even
    for cecap, under no_grad), ranking + caption distillation loss, backward, RAdam step."""
    opt.zero_grad()
    experts = dict(batch["experts"])
    ind = {m: batch["avail"][:, i] for i, m in enumerate(net.experts)}
    sims, text_sims, _, _ = official_like_forward(net, experts, ind, batch["text"].unsqueeze(1))
    with torch.no_grad():
        new_sims = None
        for t_text, t_vid in teachers or []:
            t_sim = None
            for tt, tv in zip(t_text, t_vid):
                s = torch.matmul(tt.view(-1, tt.shape[-1]), tv.t())
                t_sim = s if t_sim is None else t_sim + s
            new_sims = t_sim if new_sims is None else new_sims + t_sim
        if new_sims is not None:
            new_sims = new_sims / len(teachers)
    loss = official_like_loss(sims, text_sims, margin, cap_t)
    loss.backward()
    opt.step()
    return loss.detach()
