"""Collaborative Experts (CENet) for text-video retrieval, with the TeachText and CrossKD losses.

Read top to bottom: NetVLAD -> gating units -> CENet (text branch, video branch, collaborative
gating) -> availability-renormalised mixture-of-experts similarity -> losses (bidirectional
max-margin ranking, TeachText SmoothL1 distillation, CrossKD caption/video distillation).

Reference behaviour follows Collaborative Experts / TeachText / CrossKD (``model/model.py``,
``model/net_vlad.py``, ``model/loss.py``): experts are kept in alphabetical order, the text
NetVLAD has ghost clusters, expert NetVLADs do not, and NetVLAD ignores the token mask unless
``use_mask`` is set (a documented fix, off by default).

Collaborative gating has two settings each way (:class:`CENetConfig`):

* ``gating="sequential"`` (the official code): experts are gated one after the other in the
  alphabetical order, and each expert's gated embedding replaces its reduced embedding before the
  later experts build their pairs, so expert m's pairs with earlier experts n < m see gated
  embeddings. ``"parallel"``: the paper's formula, every pair built from the ungated embeddings.
* ``pair_bn="per_pair"`` (the official code, which calls the pair MLP once per expert pair): the
  BatchNorm layers of the pair MLP normalise each pair's rows with that pair's own batch
  statistics and update their running statistics once per pair, in the official call order.
  ``"pooled"``: one normalisation over all pairs' rows, one running-statistics update.

Both only change training-mode outputs through the batch statistics, except the gating order,
which also changes evaluation. ``parallel`` + ``pooled`` is the fully batched fast path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "encode_all",
    "similarity_matrix",
    "NetVLAD",
    "ContextGating",
    "GatedEmbeddingUnit",
    "GatedEmbeddingUnitReasoning",
    "CENetConfig",
    "CENet",
    "moe_similarity",
    "training_similarities",
    "max_margin_ranking_loss",
    "teachtext_loss",
    "rank_distil_loss",
]


class NetVLAD(nn.Module):
    """NetVLAD pooling with ghost clusters (Arandjelovic et al.; ghosts: Zhong et al.).

    Soft assignment over ``clusters + ghost_clusters`` centres (BatchNorm before the softmax), the
    ghost columns are dropped, residuals are intra-normalised per cluster, flattened (feature
    major, as the reference) and L2-normalised. Output dim ``clusters * dim``.
    """

    def __init__(self, dim: int, clusters: int, ghost_clusters: int = 0, use_mask: bool = False):
        super().__init__()
        self.dim, self.clusters, self.ghost_clusters, self.use_mask = dim, clusters, ghost_clusters, use_mask
        init_sc = 1 / math.sqrt(dim)
        self.centroids = nn.Parameter(init_sc * torch.randn(dim, clusters + ghost_clusters))  # assignment
        self.bn = nn.BatchNorm1d(clusters + ghost_clusters)
        self.clusters2 = nn.Parameter(init_sc * torch.randn(1, dim, clusters))  # residual centres
        self.out_dim = clusters * dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, D] (mask [B, N], used only with ``use_mask``) -> [B, clusters * D]."""
        B, N, D = x.shape
        if D != self.dim:
            raise ValueError(f"NetVLAD expects feature dim {self.dim}, got input of shape {tuple(x.shape)}")
        a = self.bn(x.reshape(-1, D) @ self.centroids)
        a = F.softmax(a, dim=1)[:, : self.clusters].reshape(B, N, self.clusters)
        if self.use_mask and mask is not None:
            a = a * mask.to(a.dtype).unsqueeze(-1)
        a_sum = a.sum(dim=1, keepdim=True)  # [B, 1, K]
        vlad = torch.matmul(a.transpose(1, 2), x).transpose(1, 2)  # [B, D, K]
        vlad = vlad - a_sum * self.clusters2
        vlad = F.normalize(vlad, dim=1)  # intra-normalisation over D for each cluster
        return F.normalize(vlad.reshape(B, -1), dim=1)


class ContextGating(nn.Module):
    """``x * sigmoid(BN(W x + b))`` (the reference writes it as GLU over a concatenation)."""

    def __init__(self, dim: int, use_bn: bool = True):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim) if use_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.glu(torch.cat((x, self.bn(self.fc(x))), dim=1), dim=1)


class GatedEmbeddingUnit(nn.Module):
    """Text-side GEU: ``normalize(CG(W x + b))``, in [B, in_dim] -> out [B, out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = True):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.cg = ContextGating(out_dim, use_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.cg(self.fc(x)), dim=-1)


class GatedEmbeddingUnitReasoning(nn.Module):
    """Video-side GEU after collaborative gating: ``normalize(psi * sigmoid(BN1(T) + BN2(W psi + b)))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.bn1 = nn.BatchNorm1d(dim)
        self.bn2 = nn.BatchNorm1d(dim)

    def forward(self, psi: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gate = self.bn1(t) + self.bn2(self.fc(psi))
        return F.normalize(F.glu(torch.cat((psi, gate), dim=1), dim=1), dim=-1)


@dataclass
class CENetConfig:
    """Architecture of CENet; the defaults are the CrossKD MSRVTT settings."""

    expert_dims: dict[str, int] = field(default_factory=dict)  # raw input dim per expert
    vlad_clusters: dict[str, int] = field(default_factory=dict)  # experts pooled by NetVLAD (variable length) + "text"
    ghost_clusters: int = 1  # text NetVLAD only (experts get none, as the reference)
    text_dim: int = 1600
    shared_dim: int = 768  # ce_shared_dim
    num_g_layers: int = 3
    use_mish: bool = True
    use_bn_reason: bool = True
    include_self: bool = True
    vlad_use_mask: bool = False  # reference: the token mask is ignored
    gating: str = "sequential"  # official: later experts' pairs see gated earlier experts; "parallel": paper formula
    pair_bn: str = "per_pair"  # official: batch statistics per expert pair; "pooled": over all pairs at once

    def __post_init__(self) -> None:
        if self.gating not in ("sequential", "parallel"):
            raise ValueError(f"CENetConfig.gating must be 'sequential' or 'parallel', got {self.gating!r}")
        if self.pair_bn not in ("per_pair", "pooled"):
            raise ValueError(f"CENetConfig.pair_bn must be 'per_pair' or 'pooled', got {self.pair_bn!r}")


def _batch_norm_per_group(x: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """Training-mode BatchNorm of ``x`` [B, G, d] with separate batch statistics for each of the G
    groups, as G separate calls of ``bn`` on [B, d] would give, including G running-statistics
    updates in group order. One fused kernel: the G groups are G * d channels of one batch (its
    momentum-1 running buffers receive the groups' batch means and unbiased variances), then the G
    exponential-average updates are folded into one: ``r <- (1-f)^G r + sum_g f (1-f)^(G-1-g) s_g``."""
    B, G, d = x.shape
    w = bn.weight.repeat(G) if bn.weight is not None else None
    b = bn.bias.repeat(G) if bn.bias is not None else None
    track = bn.track_running_stats and bn.running_mean is not None
    mean = bn.running_mean.new_zeros(G * d) if track else None  # the dtype of the running statistics
    var = bn.running_var.new_ones(G * d) if track else None
    y = F.batch_norm(x.reshape(B, G * d), mean, var, w, b, True, 1.0, bn.eps)
    if track:
        with torch.no_grad():
            mean, var = mean.view(G, d), var.view(G, d)
            if bn.momentum is None:  # cumulative average: one update at a time
                for g in range(G):
                    bn.num_batches_tracked.add_(1)
                    f = 1.0 / float(bn.num_batches_tracked)
                    bn.running_mean.mul_(1 - f).add_(mean[g], alpha=f)
                    bn.running_var.mul_(1 - f).add_(var[g], alpha=f)
            else:
                f = bn.momentum
                c = f * (1 - f) ** torch.arange(G - 1, -1, -1, dtype=torch.float64)
                c = c.to(device=x.device, dtype=mean.dtype)
                bn.running_mean.mul_((1 - f) ** G).add_(c @ mean)
                bn.running_var.mul_((1 - f) ** G).add_(c @ var)
                bn.num_batches_tracked.add_(G)
    return y.reshape(B, G, d)


def _key(m: str) -> str:
    """Module-safe key of an expert name (released names contain dots, e.g. ``imagenet.senet154.0``)."""
    return m.replace(".", "__")


class CENet(nn.Module):
    """Collaborative Experts with pairwise collaborative gating and a mixture-of-experts text side.

    ``encode_text`` gives per-expert unit-norm caption embeddings + MoE weights, ``encode_video``
    per-expert unit-norm video embeddings; :func:`moe_similarity` combines them with the video's
    expert availability.
    """

    def __init__(self, cfg: CENetConfig):
        super().__init__()
        if not cfg.expert_dims:
            raise ValueError("CENetConfig.expert_dims is empty: name at least one expert and its dimension")
        if "text" not in cfg.vlad_clusters:
            raise ValueError("CENetConfig.vlad_clusters needs a 'text' entry (clusters of the text NetVLAD)")
        self.cfg = cfg
        self.experts = sorted(cfg.expert_dims)  # alphabetical, as the reference's compute_dims
        d = cfg.shared_dim
        # text branch
        self.text_pooling = NetVLAD(cfg.text_dim, cfg.vlad_clusters["text"], cfg.ghost_clusters, cfg.vlad_use_mask)
        text_out = self.text_pooling.out_dim
        self.moe_fc = nn.Linear(text_out, len(self.experts))
        self.text_geu = nn.ModuleDict({_key(m): GatedEmbeddingUnit(text_out, d) for m in self.experts})
        # video branch
        self.video_pooling = nn.ModuleDict(
            {
                _key(m): NetVLAD(cfg.expert_dims[m], cfg.vlad_clusters[m], 0, cfg.vlad_use_mask)
                for m in self.experts
                if m in cfg.vlad_clusters
            }
        )
        in_dims = {
            m: (self.video_pooling[_key(m)].out_dim if _key(m) in self.video_pooling else cfg.expert_dims[m])
            for m in self.experts
        }
        self.reduce_dim = nn.ModuleDict({_key(m): nn.Linear(in_dims[m], d) for m in self.experts})
        act = nn.Mish() if cfg.use_mish else nn.ReLU()
        layers: list[nn.Module] = [nn.Linear(2 * d, d)]
        for _ in range(cfg.num_g_layers - 1):
            if cfg.use_bn_reason:
                layers.append(nn.BatchNorm1d(d))
            layers += [act, nn.Linear(d, d)]
        self.g_reason = nn.Sequential(*layers)
        self.video_geu = nn.ModuleDict({_key(m): GatedEmbeddingUnitReasoning(d) for m in self.experts})

    # ------------------------------------------------------------------ text
    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [Q, T, text_dim] (mask [Q, T]) -> (embeddings [Q, M, shared_dim], MoE weights [Q, M])."""
        t = self.text_pooling(tokens, mask)
        w = F.softmax(self.moe_fc(t), dim=1)
        emb = torch.stack([self.text_geu[_key(m)](t) for m in self.experts], dim=1)
        return emb, w

    # ------------------------------------------------------------------ video
    def encode_video(
        self, experts: dict[str, torch.Tensor], avail: torch.Tensor, masks: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """experts {name: [B, D] or [B, N, D] (NetVLAD experts)}, avail [B, M] -> embeddings [B, M, shared_dim].

        Missing experts must already be zero-filled (``avail`` = 0); they are masked out of the
        collaborative gating average and of the similarity.
        """
        masks = masks or {}
        psi = []
        for m in self.experts:
            if m not in experts:
                raise KeyError(f"CENet: expert {m!r} missing from the batch (have {sorted(experts)})")
            x = experts[m]
            if _key(m) in self.video_pooling:
                x = self.video_pooling[_key(m)](x, masks.get(m))
            elif x.dim() != 2:
                raise ValueError(f"expert {m!r}: expected a [B, D] vector feature, got shape {tuple(x.shape)}")
            psi.append(F.normalize(self.reduce_dim[_key(m)](x), dim=-1))
        return self.collaborative_gating(torch.stack(psi, dim=1), avail.to(psi[0].dtype))

    def _partners(self, M: int) -> list[list[int]]:
        """Expert n paired with expert m, in the official order (all n, or n != m without include_self)."""
        return [[n for n in range(M) if self.cfg.include_self or n != m] for m in range(M)]

    def _pair_mlp_average(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``T = sum_k mask_k g_k / (sum_k mask_k + 1e-11)`` for h [B, P, K, d], the first layer's output of
        P x K expert pairs (P gated experts, K partners each), mask [B, P, K] -> T [B, P, d].

        The layers after the first run on every pair's rows, except the last Linear: it commutes with
        the weighted average (``sum_k w_k (W z_k + b) = W sum_k w_k z_k + b sum_k w_k``), so it runs
        once per expert instead of once per pair.
        """
        per_pair = self.training and self.cfg.pair_bn == "per_pair"
        B, P, K, d = h.shape
        layers = list(self.g_reason)[1:]
        last = layers.pop() if layers and isinstance(layers[-1], nn.Linear) else None
        x = h.reshape(B, P * K, d)
        for layer in layers:
            if isinstance(layer, nn.BatchNorm1d):  # per pair: P * K groups of B rows, in the official call order
                x = _batch_norm_per_group(x, layer) if per_pair else layer(x.reshape(-1, d)).reshape(B, P * K, d)
            else:
                x = layer(x)
        w = mask / (mask.sum(2, keepdim=True) + 1e-11)  # [B, P, K]
        z = torch.matmul(w.unsqueeze(2), x.reshape(B, P, K, -1)).squeeze(2)  # [B, P, d]
        if last is None:
            return z
        T = F.linear(z, last.weight)
        return T + last.bias * w.sum(2, keepdim=True) if last.bias is not None else T

    def collaborative_gating(self, psi: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Pairwise collaborative gating: psi [B, M, d] (reduced, unit-norm expert embeddings), a [B, M]
        availability -> video embeddings [B, M, d].

        ``T_m = sum_n a_m a_n g([x_m; x_n]) / (sum_n a_m a_n + 1e-11)`` and
        ``v_m = normalize(psi_m * sigmoid(BN(T_m) + BN(W psi_m + b)))``, with ``x_m = psi_m`` and
        ``x_n`` = the gated ``v_n`` for n < m under ``gating="sequential"`` (the official code), the
        ungated ``psi_n`` under ``"parallel"`` (the paper). The first layer of g is applied to the two
        halves separately, ``W [x_m; x_n] + b = W_1 x_m + W_2 x_n + b``, so each embedding is projected
        once instead of once per pair; the last layer after the average (see :meth:`_pair_mlp_average`).
        """
        B, M, d = psi.shape
        first = self.g_reason[0]
        w1, w2 = first.weight[:, :d], first.weight[:, d:]
        p1 = F.linear(psi, w1, first.bias)  # [B, M, d]: the x_m half of every pair, with the bias
        p2 = F.linear(psi, w2)  # [B, M, d]: the x_n half, from ungated embeddings
        partners = self._partners(M)
        geus = [self.video_geu[_key(m)] for m in self.experts]
        if self.cfg.gating == "parallel":
            n_idx = torch.tensor(partners, device=psi.device)  # [M, K]
            T = self._pair_mlp_average(p1.unsqueeze(2) + p2[:, n_idx], a.unsqueeze(2) * a[:, n_idx])
            return torch.stack([geus[m](psi[:, m], T[:, m]) for m in range(M)], dim=1)
        halves = list(p2.unbind(1))  # x_n half of each expert, replaced by the gated one once it exists
        out = []
        for m in range(M):
            part = partners[m]
            h = p1[:, m : m + 1] + torch.stack([halves[n] for n in part], dim=1)  # [B, K, d]
            T = self._pair_mlp_average(h.unsqueeze(1), (a[:, m : m + 1] * a[:, part]).unsqueeze(1))[:, 0]
            v = geus[m](psi[:, m], T)
            out.append(v)
            if m + 1 < M:
                halves[m] = F.linear(v, w2)
        return torch.stack(out, dim=1)

    def forward(self, batch: dict, text_sims: bool = False, video_sims: bool = False) -> dict[str, torch.Tensor | None]:
        """Training forward: one caption per video. Returns S [B, B] (caption x video) and, only when
        asked for, C [B, B] (caption x caption, ``text_sims``) and V [B, B] (video x video,
        ``video_sims``), all with the query-dependent, availability-renormalised MoE weights, plus the
        embeddings. Matrices not asked for are None."""
        t, w = self.encode_text(batch["text"], batch.get("text_mask"))
        v = self.encode_video(batch["experts"], batch["avail"], batch.get("expert_masks"))
        S, C, V = training_similarities(t, w, v, batch["avail"], text_sims, video_sims)
        return {"sims": S, "text_sims": C, "video_sims": V, "text_emb": t, "moe": w, "video_emb": v}


def moe_weights(w: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """w [Q, M] (text MoE) x avail [V, M] -> renormalised weights [Q, V, M] (the reference's layout)."""
    ww = w.unsqueeze(1) * avail.to(w.dtype).unsqueeze(0)
    return ww / ww.sum(-1, keepdim=True).clamp_min(1e-12)


def moe_similarity(
    text: torch.Tensor, w: torch.Tensor, video: torch.Tensor, avail: torch.Tensor, extra: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``S_ij = sum_m w_m(t_i) a_m(v_j) <t_im, v_jm> / sum_m w_m(t_i) a_m(v_j)``.

    text [Q, M, d], w [Q, M], video [V, M, d], avail [V, M] -> S [Q, V]. Memory O(Q V) per expert
    (never [Q, V, M]) unless ``extra`` (training batches): then (S, C, Vv) with the caption-caption matrix
    ``C_ij = sum_m w_hat_m(i, j) <t_im, t_jm>`` and video-video ``V_ij = sum_m w_hat_m(i, j) <v_im, v_jm>``
    (training case, Q == V, CrossKD's ``cross_view_text_matrix`` / ``cross_view_vid_matrix``).
    """
    a = avail.to(text.dtype)
    if not extra:
        num = text.new_zeros(text.shape[0], video.shape[0])
        den = text.new_zeros(text.shape[0], video.shape[0])
        for m in range(text.shape[1]):
            wm = w[:, m : m + 1] * a[:, m].unsqueeze(0)  # [Q, V]
            num = num + wm * (text[:, m] @ video[:, m].T)
            den = den + wm
        return num / den.clamp_min(1e-12)
    return training_similarities(text, w, video, avail, True, True)


def training_similarities(
    text: torch.Tensor, w: torch.Tensor, video: torch.Tensor, avail: torch.Tensor, text_sims: bool, video_sims: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(S, C or None, V or None) of a training batch (one caption per video, Q == V), see
    :func:`moe_similarity`. Two-step contractions: per-expert inner products by one batched matmul
    [M, Q, d] x [M, d, V], then the weighted sum over experts (never a [Q, V, M, d] intermediate)."""
    if (text_sims or video_sims) and text.shape[0] != video.shape[0]:
        raise ValueError("caption-caption / video-video matrices need one caption per video (Q == V)")
    a = avail.to(text.dtype)
    ww = w.T.unsqueeze(2) * a.T.unsqueeze(1)  # [M, Q, V]
    ww = ww / ww.sum(0, keepdim=True).clamp_min(1e-12)
    tm, vm = text.transpose(0, 1), video.transpose(0, 1)  # [M, Q, d], [M, V, d]
    S = (ww * torch.bmm(tm, vm.transpose(1, 2))).sum(0)
    C = (ww * torch.bmm(tm, tm.transpose(1, 2))).sum(0) if text_sims else None
    Vv = (ww * torch.bmm(vm, vm.transpose(1, 2))).sum(0) if video_sims else None
    return S, C, Vv


# ----------------------------------------------------------------------------- losses


def max_margin_ranking_loss(sims: torch.Tensor, margin: float) -> torch.Tensor:
    """Bidirectional max-margin ranking loss averaged over off-diagonal pairs (``fix_norm``).

    ``1/(2B(B-1)) sum_{i != j} [max(0, m - S_ii + S_ij) + max(0, m - S_ii + S_ji)]``; sims [B, B].
    A batch of one has no negatives: the loss is 0 (with a graph) instead of NaN.
    """
    B = sims.shape[0]
    if B < 2:
        return sims.sum() * 0.0
    diag = sims.diagonal().unsqueeze(1)  # S_ii per row
    off = ~torch.eye(B, dtype=torch.bool, device=sims.device)
    t2v = F.relu(margin - diag + sims)[off]
    v2t = F.relu(margin - diag + sims.T)[off]
    return torch.cat((t2v, v2t)).mean()


def teacher_similarity(teacher_text: torch.Tensor, teacher_video: torch.Tensor) -> torch.Tensor:
    """TeachText teacher sims, mean over teachers of plain sums over experts.

    teacher_text [K, B, M, d], teacher_video [K, B, M, d] -> [B, B].
    """
    return torch.einsum("kimd,kjmd->kij", teacher_text, teacher_video).mean(0)


def teachtext_loss(sims: torch.Tensor, teacher_sims: torch.Tensor) -> torch.Tensor:
    """``mean_ij SmoothL1(S_ij - T_ij)`` (beta 1), the TeachText distillation term."""
    return F.smooth_l1_loss(sims, teacher_sims.to(sims.dtype), reduction="mean", beta=1.0)


def rank_distil_loss(
    student: torch.Tensor, target: torch.Tensor, temperature: float, detach_target: bool = False
) -> torch.Tensor:
    """CrossKD ``KD_tau(X, Y) = (1/B) sum_i KL(softmax(Y_i/tau) || softmax(X_i/tau))``.

    student X [B, N] (caption-video sims), target Y [B, N] (caption-caption sims). The reference
    does not detach Y (gradients reach the text branch through the target too); ``detach_target``
    stops that.
    """
    if detach_target:
        target = target.detach()
    return F.kl_div(
        F.log_softmax(student / temperature, dim=1), F.softmax(target / temperature, dim=1), reduction="batchmean"
    )


# ----------------------------------------------------------------------------- whole-split encoding


@torch.no_grad()
def encode_all(model: CENet, ds: Any, device: torch.device, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(video embeddings [V, M, d], availability [V, M]) of every video of ``ds``."""
    embs, avails = [], []
    for s in range(0, len(ds), batch_size):
        b = ds.video_batch(s, min(len(ds), s + batch_size))
        b = {
            k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in b.items()
        }
        embs.append(model.encode_video(b["experts"], b["avail"], b["expert_masks"]).float())
        avails.append(b["avail"])
    return torch.cat(embs), torch.cat(avails)


@torch.no_grad()
def similarity_matrix(model: CENet, ds: Any, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """[num_videos * captions_per_video, num_videos] float32 sims, queries video-major; captions are
    encoded ``batch_size`` at a time and never all held at once."""
    v, a = encode_all(model, ds, device, batch_size)
    groups = ds.flat_queries()
    sims = torch.empty(len(groups), len(ds), dtype=torch.float32, device=device)
    for s in range(0, len(groups), batch_size):
        tb = ds.text_batch(groups[s : s + batch_size])
        t, w = model.encode_text(tb["text"].to(device), tb["text_mask"].to(device))
        sims[s : s + len(t)] = moe_similarity(t.float(), w.float(), v, a)
    return sims
