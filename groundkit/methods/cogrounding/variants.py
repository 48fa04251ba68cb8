"""Co-grounding variants beyond the official model (none is in the paper or the official code).

:class:`ExtendedCoGroundingNet` is :class:`~groundkit.methods.cogrounding.model.CoGroundingNet` plus the switches of
``model.motion`` / ``motion_mode`` (a motion term in the co-attention input), ``model.co_residual`` (co-features
``L2norm(v_c + g * corr)`` with a zero-initialised gate), ``model.box_from_centre`` (box offsets from the centre
frame's own maps) and ``model.motion_attention`` (a third semantic attention for the motion phrase, scored against
each cell's Lucas-Kanade motion). :func:`~groundkit.methods.cogrounding.method.build_model` builds it when one of them
is on, so the official network reads without them. Figures: docs/cogrounding.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CoGroundingModelConfig
from .model import CoGroundingNet, ConvBNReLU, PhraseAttention, TextFeatures, _pairs, co_attend, l2n

__all__ = [
    "ExtendedCoGroundingNet",
    "motion_volume",
    "motion_difference",
    "feature_flow",
    "flow_moments",
    "solve_flow",
]


# ----------------------------------------------------------------------------- motion measurements


def motion_volume(query: torch.Tensor, key: torch.Tensor, dt: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Local correlation of two frames' maps, oriented forward in time (not official).

    ``query``, ``key``: ``[B, D, H, W]`` L2-normalised over D; ``dt [B]``: the key frame's offset from the
    query frame in frames. Channel ``(dy, dx)`` of the ``[B, (2r+1)^2, H, W]`` result is
    ``<query(p), key(p + sign(dt) * (dy, dx))>``, so a right-moving object peaks at ``dx > 0`` whether
    the key frame is before or after; pairs with ``dt == 0`` (a window clipped at the video's end
    repeats the centre frame) give zeros, carrying no motion.
    """
    B, D, H, W = query.shape
    r = radius
    kp = F.pad(key, (r, r, r, r))
    vol = torch.stack(
        [
            (query * kp[:, :, r + dy : r + dy + H, r + dx : r + dx + W]).sum(1)
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
        ],
        1,
    )  # [B, (2r+1)^2, H, W], displacements in row-major order: reversing the channels negates them
    dt = dt.to(vol.dtype).view(B, 1, 1, 1)
    return torch.where(dt > 0, vol, vol.flip(1)) * (dt != 0).to(vol.dtype)


def motion_difference(query: torch.Tensor, key: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """Temporal derivative of the maps, ``(key - query) / dt`` (not official; ``model.motion_mode: diff``).

    ``query``, ``key``: ``[B, D, H, W]``; ``dt [B]``: the key frame's offset in frames. Unlike a correlation
    over whole-cell displacements it is linear in a sub-cell shift, so an object that moves a fraction of a
    stride-8 cell per frame still leaves a signal; compared with the spatial gradient (a 3 x 3 convolution
    over ``cat[query, derivative]``) its sign gives the direction, forward in time whichever side the key
    frame is on. Pairs with ``dt == 0`` (a clipped window repeating the centre frame) give zeros.
    """
    dt = dt.to(query.dtype).view(-1, 1, 1, 1)
    safe = torch.where(dt == 0, torch.ones_like(dt), dt)
    return (key - query) / safe * (dt != 0).to(query.dtype)


def flow_moments(query: torch.Tensor, key: torch.Tensor, dt: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Lucas-Kanade moments ``[B, 5, H, W]``: ``<I_x I_x>, <I_x I_y>, <I_y I_y>, <I_x I_t>, <I_y I_t>`` summed over
    the channels and averaged over a ``window`` x ``window`` neighbourhood (``I_x``, ``I_y`` central differences
    of ``query``, ``I_t = (key - query) / dt``; the last two are 0 where ``dt == 0``). Moments add up, so
    several neighbours and larger cells are pooled before :func:`solve_flow`."""
    qx = F.pad(query, (1, 1, 0, 0), mode="replicate")
    qy = F.pad(query, (0, 0, 1, 1), mode="replicate")
    ix, iy = (qx[..., 2:] - qx[..., :-2]) / 2, (qy[..., 2:, :] - qy[..., :-2, :]) / 2
    it = motion_difference(query, key, dt)
    m = torch.stack([(ix * ix).sum(1), (ix * iy).sum(1), (iy * iy).sum(1), (ix * it).sum(1), (iy * it).sum(1)], 1)
    return F.avg_pool2d(m, window, 1, window // 2, count_include_pad=False)


def solve_flow(moments: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``[B, 2, H, W]`` motion (x, y) from :func:`flow_moments`: the 2 x 2 least-squares solution of
    ``I_x u + I_y v + I_t = 0``, with a ridge relative to each frame's mean gradient energy so that flat
    regions stay at 0."""
    a, b, c, p, q = moments.unbind(1)
    eps = ridge * (a + c).flatten(1).mean(1).view(-1, 1, 1) + 1e-8
    a, c = a + eps, c + eps
    det = a * c - b * b
    return torch.stack([-(c * p - b * q) / det, -(a * q - b * p) / det], 1)


def feature_flow(query: torch.Tensor, key: torch.Tensor, dt: torch.Tensor, window: int = 3) -> torch.Tensor:
    """Lucas-Kanade motion of the maps from ``query`` to ``key``, ``[B, 2, H, W]`` (x, y) in cells per frame (not official).

    ``query``, ``key``: ``[B, D, H, W]``; ``dt [B]``: the key frame's offset in frames. Per cell, the least-squares
    solution of ``I_x u + I_y v + I_t = 0`` over the channels and a ``window`` x ``window`` neighbourhood,
    forward in time whichever side the key frame is on. Valid for motions below about one cell per frame
    (objects here move a quarter of a stride-8 cell); ``dt == 0`` pairs give zeros.
    """
    return solve_flow(flow_moments(query, key, dt, window))


# ----------------------------------------------------------------------------- the network


class ExtendedCoGroundingNet(CoGroundingNet):
    """CG-SL-Att with the not-official switches of ``model`` (see the module docstring); the official parts and the
    parameter names are :class:`CoGroundingNet`'s, so an official checkpoint loads into it and vice versa."""

    extended = True

    def _build_cofeatures(self, cfg: CoGroundingModelConfig, bn: float) -> None:
        """Co-attention layers with the motion term's input channels, the motion convolution and the residual gate."""
        D, co = cfg.dim, cfg.co_attention
        # motion term: the co-attention pools a neighbour's features without their position, so objects that differ
        # only in motion look the same to it; the local correlation volume of the centre and neighbour maps
        # (FlowNet-style, oriented forward in time) is added to its input
        self.motion, self.motion_radius = bool(cfg.motion and co), cfg.motion_radius
        self.motion_mode = cfg.motion_mode
        m_ch = (2 * cfg.motion_radius + 1) ** 2 if (self.motion and cfg.motion_mode == "corr") else 0
        # diff: the temporal derivative has a signal for sub-cell motion; a 3 x 3 convolution compares it with the
        # centre map's spatial structure (the sign of d/dt against d/dx is the direction)
        self.motion_conv = (
            nn.ModuleList(nn.Sequential(ConvBNReLU(2 * D, D, 3, bn), ConvBNReLU(D, D, 1, bn)) for _ in self.grids)
            if (self.motion and cfg.motion_mode == "diff")
            else None
        )
        self.corr_conv = nn.ModuleList(ConvBNReLU(2 * D + m_ch, D, 1, bn) for _ in self.grids) if co else None
        # residual co-features: L2norm(v_c + g_s * corr) with a zero-initialised gate per scale, so a co-grounding
        # model started from a single-frame (image) model begins exactly where that model is
        self.co_gate = nn.Parameter(torch.zeros(len(self.grids))) if (co and cfg.co_residual) else None
        # box from the centre: the co-features choose the anchor (confidence, similarity, location), the centre
        # frame's own maps regress its box, so the other frames cannot blur a clear frame's box
        self.box_from_centre = bool(cfg.box_from_centre and co)

    def _build_head(self, cfg: CoGroundingModelConfig, bn: float, ctx: int) -> None:
        """The motion attention's layers, then the official head."""
        # motion attention: a third phrase attention picks the motion words ("moving left"), a linear layer turns
        # them into an expected velocity, and each cell scores the Gaussian log-likelihood of its Lucas-Kanade
        # motion (:func:`feature_flow`, parameter-free) under it; the scores are added to the final scores and
        # trained by their own cross-entropy (the motion loss). Velocity 0 and sigma 1 cell/frame at the start:
        # sub-cell motions change the scores by a few hundredths
        self.motion_attention = bool(cfg.motion_attention and cfg.co_attention)
        if self.motion_attention:
            self.mot_attn = PhraseAttention(ctx)
            self.mot_vel = nn.Linear(cfg.dim, 2)
            nn.init.zeros_(self.mot_vel.weight)
            nn.init.zeros_(self.mot_vel.bias)
            self.mot_log_sigma = nn.Parameter(torch.zeros(()))
        super()._build_head(cfg, bn, ctx)

    def text_features(
        self, emb: torch.Tensor, ctx: torch.Tensor, sent: torch.Tensor, mask: torch.Tensor
    ) -> TextFeatures:
        """As :meth:`CoGroundingNet.text_features`, plus the motion attention ``mot_attn [B,T]`` / ``e_mot [B,D]``."""
        text = super().text_features(emb, ctx, sent, mask)
        if self.motion_attention:
            text.mot_attn, text.e_mot = self.mot_attn(ctx, emb, mask)
        return text

    def cofeatures(
        self, centre: list[torch.Tensor], neighbours: list[torch.Tensor] | None, dt: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """As :meth:`CoGroundingNet.cofeatures`; the motion term needs ``dt [B,K]``."""
        if self.motion and neighbours is not None and dt is None:
            raise ValueError("the motion term needs the neighbours' frame offsets dt [B, K]")
        return super().cofeatures(centre, neighbours, dt)

    def pair_features(self, s: int, vc: torch.Tensor, vn: torch.Tensor, dt: torch.Tensor | None) -> torch.Tensor:
        """``L2norm(corr_conv(cat[v_c, co_attend(v_c, v_j), motion]))`` (+ the residual gate) for ``P`` pairs."""
        parts = [vc, co_attend(vc, vn, self.attention_temperature)]
        if self.motion and self.motion_conv is None:
            parts.append(motion_volume(vc, vn, dt, self.motion_radius))
        x = self.corr_conv[s](torch.cat(parts, 1))
        if self.motion_conv is not None:
            x = x + self.motion_conv[s](torch.cat([vc, motion_difference(vc, vn, dt)], 1))
        corr = l2n(x, dim=1)
        if self.co_gate is not None:
            corr = l2n(vc + self.co_gate[s] * corr, dim=1)
        return corr

    def motion_maps(
        self, centre: list[torch.Tensor], neighbours: list[torch.Tensor] | None, dt: torch.Tensor | None
    ) -> list[torch.Tensor] | None:
        """Per scale ``[B,2,G,G]``: each cell's motion (x, y) in finest-scale cells per frame (``motion_attention``).

        The Lucas-Kanade moments (:func:`flow_moments`) of the finest maps, averaged over the neighbours with
        ``dt != 0`` and over each coarser cell's area, then solved (:func:`solve_flow`): a coarse cell's
        motion is that of its textured part (the object), not diluted by flat background. No gradient (a
        measurement, not a layer). None without the branch or without neighbours.
        """
        if not self.motion_attention or neighbours is None:
            return None
        if dt is None:
            raise ValueError("the motion attention needs the neighbours' frame offsets dt [B, K]")
        with torch.no_grad():
            vc, vn = centre[-1].float(), neighbours[-1].float()
            B, K = vn.shape[:2]
            m = flow_moments(*_pairs(vc, vn), dt.reshape(B * K)).view(B, K, 5, *vc.shape[2:])
            valid = (dt != 0).to(m.dtype).view(B, K, 1, 1, 1)
            m = (m * valid).sum(1) / valid.sum(1).clamp(min=1)  # dt == 0 pairs carry no motion: left out
            return [solve_flow(F.adaptive_avg_pool2d(m, g)).to(centre[0].dtype) for g in self.grids]

    def scale_pred(
        self, s: int, v: torch.Tensor, lang: torch.Tensor, coord: torch.Tensor, centre: torch.Tensor | None
    ) -> torch.Tensor:
        """With ``box_from_centre`` the box offsets (tx, ty, tw, th) come from the head on ``centre``."""
        p = super().scale_pred(s, v, lang, coord, centre)
        if self.box_from_centre and centre is not None and centre is not v:
            B, g = v.shape[0], v.shape[-1]
            xb = self.fcn_emb[s](torch.cat([centre, lang, coord], 1))
            p = torch.cat([self.fcn_out[s](xb).view(B, 3, 5, g, g)[:, :, :4], p[:, :, 4:]], 2)
        return p

    def ground(
        self,
        feats: list[torch.Tensor],
        text: TextFeatures,
        centre: list[torch.Tensor] | None = None,
        motion: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """As :meth:`CoGroundingNet.ground`; with ``motion`` (the :meth:`motion_maps` of the window) also ``mot_raw
        [B,M]``, the log-likelihood ``-|flow - u(phrase)|^2 / (2 sigma^2)`` of each cell's motion under the velocity
        the motion phrase expects, added to every anchor's score, and ``cell_score [B,M]`` (each cell's best score
        without it: the motion loss's candidates)."""
        res = super().ground(feats, text, centre)
        if motion is None or text.e_mot is None:
            return res
        conf, B = res["conf"], feats[0].shape[0]
        vel = self.mot_vel(text.e_mot).view(B, 2, 1)  # [B, 2] expected motion, cells per frame
        flow = torch.cat([m.flatten(2) for m in motion], 2).to(vel.dtype)  # [B, 2, M]
        mot = -((flow - vel) ** 2).sum(1) / (2 * torch.exp(2 * self.mot_log_sigma))
        res["mot_raw"] = mot  # [B, M]
        res["cell_score"] = torch.cat(
            [c.view(B, 3, g * g).amax(1) for c, g in zip(conf.split([3 * g * g for g in self.grids], 1), self.grids)],
            1,
        )
        res["conf"] = conf + self.per_anchor(mot.to(conf.dtype))
        return res
