"""Co-grounding network with semantic attention (Song et al., CVPR 2021), and its losses.

Read top to bottom: building blocks, the language encoders, the network (visual mapping ->
co-attention across frames -> fusion and YOLOv3-style three-scale head -> subject attention ->
location/relation attention -> final anchor scores), box targets and decoding, then the losses
(YOLO, rank, location, temporal consistency). Shapes use ``B`` frames, ``T`` tokens, ``D`` the
embedding size, ``M`` the number of cells over the three scales and ``A = 3 M`` anchors.

Scale order is coarse to fine (stride 32, 16, 8) as in the official code; cells are flattened per
scale in row-major ``(y, x)`` order and scales concatenated; anchors are ordered (scale, anchor,
cell).

``reference`` switches (see :class:`~groundkit.methods.cogrounding.config.CoGroundingModelConfig`
and ``...LossConfig``) keep the official behaviour where it is a bug: BatchNorm momentum 0.999 (PyTorch
semantics) in the ConvBNReLU blocks, the location loss on min-max normalised scores, rank negatives by batch
reversal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...distributed import padded_chunks, stored_features
from .backbones import Backbone
from .config import CoGroundingModelConfig

__all__ = [
    "YOLOV3_ANCHORS",
    "ConvBNReLU",
    "LSTMTextEncoder",
    "TransformerTextEncoder",
    "PhraseAttention",
    "CoGroundingNet",
    "coord_features",
    "co_attend",
    "Targets",
    "build_targets",
    "decode_boxes",
    "yolo_loss",
    "rank_partners",
    "rank_loss",
    "location_loss",
    "motion_loss",
    "temporal_offset_loss",
    "confidence_consistency_loss",
]

#: YOLOv3 COCO anchors (pixels at 416), smallest first; scale 0 (stride 32) takes the last three.
YOLOV3_ANCHORS: tuple[tuple[int, int], ...] = (
    (10, 13),
    (16, 30),
    (33, 23),
    (30, 61),
    (62, 45),
    (59, 119),
    (116, 90),
    (156, 198),
    (373, 326),
)


# ----------------------------------------------------------------------------- building blocks


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU; ``bn_momentum`` 0.999 reproduces the official setting."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, bn_momentum: float = 0.1):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
            nn.BatchNorm2d(c_out, momentum=bn_momentum),
            nn.ReLU(inplace=True),
        )


def l2n(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.normalize(x, p=2, dim=dim, eps=1e-12)


def coord_features(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """``[8, grid, grid]``: per cell (x_min, y_min, x_max, y_max, x_ctr, y_ctr, 1/grid, 1/grid), corners in [-1, 1]."""
    i = torch.arange(grid, dtype=torch.float32, device=device)
    lo, hi = i / grid * 2 - 1, (i + 1) / grid * 2 - 1
    x1, y1 = lo.view(1, grid).expand(grid, grid), lo.view(grid, 1).expand(grid, grid)
    x2, y2 = hi.view(1, grid).expand(grid, grid), hi.view(grid, 1).expand(grid, grid)
    inv = torch.full((grid, grid), 1.0 / grid, device=device)
    return torch.stack([x1, y1, x2, y2, (x1 + x2) / 2, (y1 + y2) / 2, inv, inv])


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)


# ----------------------------------------------------------------------------- language


class LSTMTextEncoder(nn.Module):
    """Embedding -> Dropout -> Linear+ReLU -> bidirectional LSTM (the official LSTM mode).

    ``forward(ids [B,T] long, mask [B,T] bool) -> (embedded [B,T,D], context [B,T,2D], sentence [B,2D])``;
    the sentence vector is the context at the last valid token (both directions), as the official code.
    """

    def __init__(self, vocab_size: int, dim: int, dropout: float = 0.2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True))
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.out_dim = 2 * dim

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = self.mlp(self.drop(self.embedding(ids)))
        lengths = mask.sum(1).clamp(min=1)
        packed = nn.utils.rnn.pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        ctx, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        last = (lengths - 1).view(-1, 1, 1).expand(-1, 1, ctx.shape[2])
        return emb, ctx, ctx.gather(1, last).squeeze(1)


class TransformerTextEncoder(nn.Module):
    """Any ``transformers`` encoder from a local folder (the offline MiniLM here), projected to the LSTM's shapes.

    Same ``forward`` contract as :class:`LSTMTextEncoder`: token states give ``embedded`` (D) and
    ``context`` (2D); the sentence vector is the masked mean of the context.
    """

    def __init__(self, path: str, dim: int, freeze: bool = True):
        super().__init__()
        from transformers import AutoModel  # noqa: PLC0415 (optional, heavy)

        self.encoder = AutoModel.from_pretrained(path, local_files_only=True)
        if freeze:
            self.encoder.requires_grad_(False)
        self.freeze = freeze
        h = self.encoder.config.hidden_size
        self.to_emb = nn.Linear(h, dim)
        self.to_ctx = nn.Linear(h, 2 * dim)
        self.out_dim = 2 * dim
        # frozen: each expression's token states are computed once (eval mode, chunks of one size on one CPU thread,
        # so a state does not depend on what was computed beside it) and kept in memory; a training then re-runs
        # only the small projections (the encoder dominated a step: 10-15 samples/s on 2 cores before)
        self._states: dict[bytes, torch.Tensor] = {}

    def train(self, mode: bool = True) -> TransformerTextEncoder:
        super().train(mode)
        if self.freeze:
            self.encoder.eval()  # frozen: no dropout in the encoder
        return self

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states ``[B, T, H]`` (from the cache when frozen)."""
        if not self.freeze:
            return self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        keys = [r.tobytes() for r in torch.cat([ids, mask.long()], 1).cpu().numpy()]
        missing = list(dict.fromkeys(k for k in keys if k not in self._states))
        if missing:
            rows = {k: i for i, k in enumerate(keys)}
            with torch.no_grad(), stored_features(ids.device):
                for chunk, real in padded_chunks(missing, 16):
                    idx = torch.tensor([rows[k] for k in chunk], device=ids.device)
                    h = self.encoder(input_ids=ids[idx], attention_mask=mask[idx].long()).last_hidden_state
                    for j, k in enumerate(chunk[:real]):
                        self._states[k] = h[j]
        return torch.stack([self._states[k] for k in keys])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.hidden_states(ids, mask)
        ctx = self.to_ctx(h)
        m = mask.unsqueeze(-1).to(ctx.dtype)
        return self.to_emb(h), ctx, (ctx * m).sum(1) / m.sum(1).clamp(min=1)


class PhraseAttention(nn.Module):
    """Semantic attention over tokens: ``a = softmax_t(Linear(context_t))``, phrase ``= L2norm(sum_t a_t e_t)``.

    ``forward(context [B,T,2D], embedded [B,T,D], mask [B,T]) -> (weights [B,T], phrase [B,D])``.
    """

    def __init__(self, ctx_dim: int):
        super().__init__()
        self.score = nn.Linear(ctx_dim, 1)

    def forward(
        self, context: torch.Tensor, embedded: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = masked_softmax(self.score(context).squeeze(-1), mask, dim=1)
        return a, l2n(torch.bmm(a.unsqueeze(1), embedded).squeeze(1), dim=1)


# ----------------------------------------------------------------------------- co-attention


def co_attend(query: torch.Tensor, key: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """Features of ``key`` gathered for each position of ``query`` by cosine attention.

    ``query``, ``key``: ``[B, D, H, W]`` L2-normalised over D. ``A = query^T key`` ``[B, HW, HW]``;
    returns ``key . softmax_key-positions(temperature * A)^T`` as ``[B, D, H, W]``.
    """
    B, D, H, W = query.shape
    q, k = query.flatten(2), key.flatten(2)  # [B, D, HW]
    att = torch.softmax(temperature * torch.bmm(q.transpose(1, 2), k), dim=2)  # [B, HWq, HWk]
    return torch.bmm(k, att.transpose(1, 2)).view(B, D, H, W)


def _pairs(centre: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``centre [B,D,G,G]`` and ``neighbours [B,K,D,G,G]`` as ``B*K`` (centre, neighbour) pairs ``[B*K,D,G,G]``."""
    B, K = neighbours.shape[:2]
    return (
        centre.unsqueeze(1).expand(-1, K, -1, -1, -1).reshape(B * K, *centre.shape[1:]),
        neighbours.reshape(B * K, *neighbours.shape[2:]),
    )


# ----------------------------------------------------------------------------- network


@dataclass
class TextFeatures:
    """Language side of one batch: computed once per expression, shared by every frame that uses it."""

    mask: torch.Tensor  # [B, T] bool
    flang: torch.Tensor  # [B, D] sentence feature fused into the visual maps
    sub_attn: torch.Tensor  # [B, T] subject attention
    e_sub: torch.Tensor  # [B, D]
    loc_attn: torch.Tensor  # [B, T] location/relation attention
    e_loc: torch.Tensor  # [B, D]
    mot_attn: torch.Tensor | None = None  # [B, T] motion attention (``motion_attention`` only)
    e_mot: torch.Tensor | None = None  # [B, D]

    def index(self, idx: torch.Tensor) -> TextFeatures:
        keys = ("mask", "flang", "sub_attn", "e_sub", "loc_attn", "e_loc", "mot_attn", "e_mot")
        return TextFeatures(*(None if getattr(self, k) is None else getattr(self, k)[idx] for k in keys))


class CoGroundingNet(nn.Module):
    """SL-Att (images) and CG-SL-Att (video windows): YOLOv3-style grounding with semantic attention.

    Built from its :class:`~groundkit.methods.cogrounding.config.CoGroundingModelConfig` (every switch is
    documented there), the two encoders (``backbone``, a :class:`~groundkit.methods.cogrounding.backbones.Backbone`;
    ``text_encoder``, the contract of :class:`LSTMTextEncoder`) and the letterbox side ``image_size`` ``S`` (the
    relation layer is sized by the cells of that input). ``co_attention`` gives CG-SL-Att; ``motion``,
    ``motion_attention``, ``co_residual`` and ``box_from_centre`` are not official (docs/cogrounding.md).

    The three stages are separate methods so that a video's frames are encoded once and reused by
    every window (:meth:`encode_frames`, :meth:`encode_text`, :meth:`ground`); :meth:`forward`
    chains them for a batch of clips.
    """

    #: whether the class has the not-official switches (:class:`~groundkit.methods.cogrounding.variants.ExtendedCoGroundingNet`)
    extended: ClassVar[bool] = False

    def __init__(self, cfg: CoGroundingModelConfig, backbone: Backbone, text_encoder: nn.Module, image_size: int):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        if cfg.motion_mode not in ("corr", "diff"):
            raise ValueError(f"motion_mode must be 'corr' or 'diff', got {cfg.motion_mode!r}")
        if cfg.variant_switches() and not self.extended:
            raise ValueError(f"model.{cfg.variant_switches()[0]} needs ExtendedCoGroundingNet (build_model picks it)")
        self.backbone, self.text_encoder = backbone, text_encoder
        self.image_size, self.dim, self.co_attention = image_size, cfg.dim, cfg.co_attention
        self.attention_temperature = cfg.attention_temperature
        self.freeze_backbone = cfg.freeze_backbone
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()  # frozen BN statistics from the start (a new module is in training mode)
        self.grids = [image_size // s for s in (32, 16, 8)]
        self.n_cells = sum(g * g for g in self.grids)
        bn = 0.999 if cfg.bn_momentum_official else 0.1  # of the ConvBNReLU blocks (BatchNorm1d: 0.1 in both modes)
        self.visu_map = nn.ModuleList(ConvBNReLU(c, cfg.dim, 1, bn) for c in backbone.channels)
        # top-down path (not official): a backbone without a detection neck (EfficientNet-Lite0 taps) gives the
        # fine scales only low-level features; v_s += upsample(v_{s-1}) carries the coarse scale's semantics
        # down, as the YOLOv3 neck inside the official Darknet backbone does
        self.top_down = cfg.top_down
        self._build_cofeatures(cfg, bn)
        self._build_head(cfg, bn, text_encoder.out_dim)
        a = torch.tensor(cfg.anchors, dtype=torch.float32).view(3, 3, 2).flip(0)  # scale 0 <- largest anchors
        self.register_buffer("anchors_px", a * (image_size / cfg.anchor_reference), persistent=False)  # [3, 3, 2]

    def _build_cofeatures(self, cfg: CoGroundingModelConfig, bn: float) -> None:
        """The co-attention layer of each scale (CG-SL-Att; none for the image model)."""
        D = cfg.dim
        self.corr_conv = nn.ModuleList(ConvBNReLU(2 * D, D, 1, bn) for _ in self.grids) if cfg.co_attention else None

    def _build_head(self, cfg: CoGroundingModelConfig, bn: float, ctx: int) -> None:
        """Language MLP, fusion and YOLO head per scale, the semantic attentions and the relation layer."""
        D = cfg.dim
        self.lang_mlp = nn.Sequential(
            nn.Linear(ctx, D),
            nn.BatchNorm1d(D),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.lang_dropout),
            nn.Linear(D, D),
            nn.BatchNorm1d(D),
            nn.ReLU(inplace=True),
        )
        self.fcn_emb = nn.ModuleList(
            nn.Sequential(ConvBNReLU(2 * D + 8, D, 1, bn), ConvBNReLU(D, D, 3, bn), ConvBNReLU(D, D, 1, bn))
            for _ in self.grids
        )
        self.fcn_out = nn.ModuleList(
            nn.Sequential(ConvBNReLU(D, D // 2, 1, bn), nn.Conv2d(D // 2, 3 * 5, 1)) for _ in self.grids
        )
        self.sub_attn = PhraseAttention(ctx)
        self.loc_attn = PhraseAttention(ctx)
        self.coord_embed = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True))
        self.rel_fc = nn.Sequential(nn.Linear(self.n_cells, D), nn.BatchNorm1d(D), nn.ReLU(inplace=True))
        for g in self.grids:
            self.register_buffer(f"coord_{g}", coord_features(g), persistent=False)

    def train(self, mode: bool = True) -> CoGroundingNet:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen BN statistics
        return self

    # ---------------------------------------------------------------- stage 1: frames

    def encode_frames(
        self, images: torch.Tensor | None = None, backbone_feats: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``images [B,3,S,S]`` in [0,1] (or ready backbone maps) -> per scale ``v_s [B,D,G_s,G_s]``, L2-normalised over D."""
        if backbone_feats is None:
            if self.freeze_backbone:
                with torch.no_grad():
                    backbone_feats = self.backbone(images)
            else:
                backbone_feats = self.backbone(images)
        maps = [m(f) for m, f in zip(self.visu_map, backbone_feats)]
        if self.top_down:
            for s in range(1, len(maps)):
                maps[s] = maps[s] + F.interpolate(maps[s - 1], size=maps[s].shape[-2:], mode="nearest")
        return [l2n(v, dim=1) for v in maps]

    # ---------------------------------------------------------------- stage 2: text

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        """``ids [B,T]``, ``mask [B,T]`` -> :class:`TextFeatures` (sentence feature and both semantic attentions)."""
        emb, ctx, sent = self.text_encoder(ids, mask)
        return self.text_features(emb, ctx, sent, mask)

    def text_features(
        self, emb: torch.Tensor, ctx: torch.Tensor, sent: torch.Tensor, mask: torch.Tensor
    ) -> TextFeatures:
        """The text encoder's outputs (``emb``, ``ctx [B,T,*]``, ``sent [B,*]``) -> :class:`TextFeatures`."""
        flang = l2n(self.lang_mlp(sent), dim=1)
        a_sub, e_sub = self.sub_attn(ctx, emb, mask)
        a_loc, e_loc = self.loc_attn(ctx, emb, mask)
        return TextFeatures(mask, flang, a_sub, e_sub, a_loc, e_loc)

    # ---------------------------------------------------------------- stage 3: grounding

    def cofeatures(
        self, centre: list[torch.Tensor], neighbours: list[torch.Tensor] | None, dt: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Co-grounding features of the centre frames.

        ``centre``: per scale ``[B,D,G,G]``; ``neighbours``: per scale ``[B,K,D,G,G]`` (the other frames
        of each window); ``dt [B,K]``: each neighbour's frame offset from the centre (used by the motion
        variants only). Per neighbour ``j``: ``L2norm(corr_conv(cat[v_c, co_attend(v_c, v_j)]))``, averaged over
        ``j`` (not re-normalised, as the official test model). Without co-attention (image model) the
        features are ``centre`` itself.
        """
        if self.corr_conv is None or neighbours is None:
            return centre
        out = []
        for s, (vc, vn) in enumerate(zip(centre, neighbours)):
            B, K = vn.shape[:2]
            vc_k, vn_k = _pairs(vc, vn)
            corr = self.pair_features(s, vc_k, vn_k, None if dt is None else dt.reshape(B * K))
            out.append(corr.view(B, K, *corr.shape[1:]).mean(1))
        return out

    def pair_features(self, s: int, vc: torch.Tensor, vn: torch.Tensor, dt: torch.Tensor | None) -> torch.Tensor:
        """Co-features ``[P,D,G,G]`` of ``P`` (centre ``vc``, neighbour ``vn``) pairs at scale ``s``."""
        return l2n(self.corr_conv[s](torch.cat([vc, co_attend(vc, vn, self.attention_temperature)], 1)), dim=1)

    def motion_maps(
        self, centre: list[torch.Tensor], neighbours: list[torch.Tensor] | None, dt: torch.Tensor | None
    ) -> list[torch.Tensor] | None:
        """None: the official model measures no motion (the motion attention variant does)."""
        return None

    def ground(
        self,
        feats: list[torch.Tensor],
        text: TextFeatures,
        centre: list[torch.Tensor] | None = None,
        motion: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Head on (co-)features ``feats`` (per scale ``[B,D,G,G]``) and ``text`` (B rows).

        ``centre``: the centre frames' own maps (same shapes) and ``motion``: the window's :meth:`motion_maps`,
        both used by the not-official variants only (:mod:`groundkit.methods.cogrounding.variants`).

        Returns ``pred``: per scale ``[B,3,5,G,G]`` raw (tx, ty, tw, th, conf); ``conf_raw`` ``[B,A]``;
        ``sim`` ``[B,M]`` subject cosine per cell; ``loc_raw`` ``[B,M]`` and ``loc`` ``[B,M]`` (min-max
        normalised to [0,1]) location scores; ``conf`` ``[B,A]`` final scores
        ``conf_raw * sim * loc``; ``feats`` (the input, for the rank loss and post-processing).
        """
        B = feats[0].shape[0]
        preds, sims = [], []
        for s, (v, g) in enumerate(zip(feats, self.grids)):
            coord = getattr(self, f"coord_{g}").unsqueeze(0).expand(B, -1, -1, -1).to(v.dtype)
            lang = text.flang.view(B, -1, 1, 1).expand(-1, -1, g, g).to(v.dtype)
            preds.append(self.scale_pred(s, v, lang, coord, None if centre is None else centre[s]))
            sims.append(torch.einsum("bd,bdyx->byx", text.e_sub.to(v.dtype), v).flatten(1))
        sim = torch.cat(sims, 1)  # [B, M]
        conf_raw = torch.cat([p[:, :, 4].flatten(1) for p in preds], 1)  # [B, A] (scale, anchor, cell)
        # location / relation attention over all cells of the three scales
        coords = torch.cat([getattr(self, f"coord_{g}").flatten(1).t() for g in self.grids], 0)  # [M, 8]
        E = l2n(self.coord_embed(coords), dim=1)  # [M, 8]
        anchor_mean = torch.cat([p[:, :, 4].mean(1).flatten(1) for p in preds], 1)  # [B, M]
        obj = l2n(anchor_mean * sim, dim=1)
        rel = (E @ E.t()).unsqueeze(0) * obj.unsqueeze(1)  # [B, M, M]: <E_m, E_m'> * obj_m'
        G = l2n(self.rel_fc(rel.reshape(B * self.n_cells, -1)).view(B, self.n_cells, -1), dim=2)  # [B, M, D]
        loc_raw = torch.einsum("bmd,bd->bm", G, text.e_loc.to(G.dtype))
        lo, hi = loc_raw.min(1, keepdim=True).values, loc_raw.max(1, keepdim=True).values
        loc = (loc_raw - lo) / (hi - lo + 1e-6)
        conf = conf_raw * self.per_anchor(sim) * self.per_anchor(loc)
        return {
            "pred": preds,
            "conf_raw": conf_raw,
            "sim": sim,
            "loc_raw": loc_raw,
            "loc": loc,
            "feats": feats,
            "conf": conf,
        }

    def scale_pred(
        self, s: int, v: torch.Tensor, lang: torch.Tensor, coord: torch.Tensor, centre: torch.Tensor | None
    ) -> torch.Tensor:
        """Head output ``[B,3,5,G,G]`` of scale ``s`` from the (co-)features ``v``, the tiled sentence feature
        ``lang`` and the coordinate maps ``coord`` (``centre``: the box-from-centre variant's input)."""
        B, g = v.shape[0], v.shape[-1]
        return self.fcn_out[s](self.fcn_emb[s](torch.cat([v, lang, coord], 1))).view(B, 3, 5, g, g)

    def per_anchor(self, t: torch.Tensor) -> torch.Tensor:
        """A value per cell ``[B,M]`` repeated for the cell's three anchors: ``[B,A]`` in (scale, anchor, cell) order."""
        return torch.cat(
            [
                t[:, o : o + g * g].unsqueeze(1).expand(-1, 3, -1).flatten(1)
                for o, g in zip(self.cell_offsets(), self.grids)
            ],
            1,
        )

    def forward(
        self,
        images: torch.Tensor | None,
        ids: torch.Tensor,
        mask: torch.Tensor,
        clip_len: int = 1,
        backbone_feats: Sequence[torch.Tensor] | None = None,
        frame_index: torch.Tensor | None = None,
    ) -> dict:
        """Training/eval forward on clips of ``clip_len`` consecutive frames sharing one expression.

        ``images [N,3,S,S]`` with ``N = n_clips * clip_len`` (frames of a clip adjacent), ``ids``/``mask``
        ``[N,T]``, ``frame_index [N]`` each frame's index in its video (for the motion term; default: the
        position in the clip). With co-attention every frame attends to the other frames of its clip (pairs
        in training); with ``clip_len == 1`` or no co-attention each frame is grounded alone.
        """
        v = self.encode_frames(images, backbone_feats)
        text = self.encode_text(ids, mask)
        neighbours, dt = None, None
        if self.corr_conv is not None and clip_len > 1:
            n = torch.arange(v[0].shape[0], device=v[0].device)
            pos = n % clip_len
            idx = torch.stack([n - pos + (pos + k) % clip_len for k in range(1, clip_len)], 1)  # [N, clip_len - 1]
            neighbours = [x[idx] for x in v]  # [N, K, D, G, G]
            f = pos if frame_index is None else frame_index.to(pos.device)
            dt = f[idx] - f.unsqueeze(1)  # [N, K]
        dt = dt if neighbours is not None else None
        out = self.ground(
            self.cofeatures(v, neighbours, dt), text, centre=v, motion=self.motion_maps(v, neighbours, dt)
        )
        out["text"] = text
        return out

    # ---------------------------------------------------------------- helpers

    def cell_offsets(self) -> list[int]:
        offs, o = [], 0
        for g in self.grids:
            offs.append(o)
            o += g * g
        return offs

    def anchor_offsets(self) -> list[int]:
        return [3 * o for o in self.cell_offsets()]


# ----------------------------------------------------------------------------- targets and decoding


@dataclass
class Targets:
    """Per frame: the GT anchor (scale, anchor, cell), regression targets and flat indices."""

    scale: torch.Tensor  # [B] long
    anchor: torch.Tensor  # [B] long (0..2 within the scale)
    gi: torch.Tensor  # [B] long, column
    gj: torch.Tensor  # [B] long, row
    txywh: torch.Tensor  # [B, 4]: frac(cx), frac(cy), log(w / aw), log(h / ah)
    anchor_index: torch.Tensor  # [B] index into the A = 3M anchors
    cell_index: torch.Tensor  # [B] index into the M cells


def build_targets(model: CoGroundingNet, boxes: torch.Tensor) -> Targets:
    """GT anchors for ``boxes [B,4]`` (x1, y1, x2, y2 in letterbox pixels), as the official ``build_target``.

    The anchor is the best of the 9 by shape-only IoU; the cell is ``floor(centre * G / S)`` of that scale.
    """
    S = model.image_size
    b = boxes.float()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    w, h = (b[:, 2] - b[:, 0]).clamp(min=1e-3), (b[:, 3] - b[:, 1]).clamp(min=1e-3)
    anc = model.anchors_px.reshape(9, 2)  # pixels, scale-major
    inter = torch.minimum(w[:, None], anc[None, :, 0]) * torch.minimum(h[:, None], anc[None, :, 1])
    iou = inter / (w[:, None] * h[:, None] + anc[None, :, 0] * anc[None, :, 1] - inter)
    best = iou.argmax(1)
    scale, a = best // 3, best % 3
    grids = torch.tensor(model.grids, device=b.device)
    g = grids[scale].float()
    fx, fy = cx * g / S, cy * g / S
    top = (g - 1).long()
    gi = torch.minimum(fx.floor().long().clamp(min=0), top)
    gj = torch.minimum(fy.floor().long().clamp(min=0), top)
    aw, ah = anc[best, 0], anc[best, 1]
    txywh = torch.stack([fx - gi, fy - gj, torch.log(w / aw + 1e-16), torch.log(h / ah + 1e-16)], 1)
    cell_off = torch.tensor(model.cell_offsets(), device=b.device)[scale]
    cell = gj * grids[scale] + gi
    return Targets(scale, a, gi, gj, txywh, 3 * cell_off + a * grids[scale] ** 2 + cell, cell_off + cell)


def decode_boxes(model: CoGroundingNet, preds: list[torch.Tensor]) -> torch.Tensor:
    """All anchors' boxes ``[B, A, 4]`` (x1, y1, x2, y2 letterbox pixels) from per-scale ``[B,3,5,G,G]``."""
    out = []
    for s, (p, g) in enumerate(zip(preds, model.grids)):
        stride = model.image_size / g
        ys, xs = torch.meshgrid(torch.arange(g, device=p.device), torch.arange(g, device=p.device), indexing="ij")
        cx = (torch.sigmoid(p[:, :, 0].float()) + xs) * stride
        cy = (torch.sigmoid(p[:, :, 1].float()) + ys) * stride
        anc = model.anchors_px[s].view(1, 3, 2, 1, 1)
        w = torch.exp(p[:, :, 2].float().clamp(max=10)) * anc[:, :, 0]
        h = torch.exp(p[:, :, 3].float().clamp(max=10)) * anc[:, :, 1]
        out.append(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).flatten(1, 3))
    return torch.cat(out, 1)


def gather_anchor(model: CoGroundingNet, preds: list[torch.Tensor], t: Targets) -> torch.Tensor:
    """Raw predictions ``[B, 5]`` at each frame's GT anchor."""
    rows = []
    for i in range(t.scale.shape[0]):
        s = int(t.scale[i])
        rows.append(preds[s][i, t.anchor[i], :, t.gj[i], t.gi[i]])
    return torch.stack(rows)


# ----------------------------------------------------------------------------- losses


def yolo_loss(
    model: CoGroundingNet, out: dict, t: Targets, coord_weight: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(box regression, anchor classification)``: ``coord_weight * sum of 4 MSEs`` at the GT anchor
    (sigmoid for x, y) and the cross-entropy of the final scores over all anchors against the GT anchor."""
    p = gather_anchor(model, out["pred"], t).float()
    reg = sum(
        F.mse_loss(v, t.txywh[:, k])
        for k, v in enumerate((torch.sigmoid(p[:, 0]), torch.sigmoid(p[:, 1]), p[:, 2], p[:, 3]))
    )
    cls = F.cross_entropy(out["conf"].float(), t.anchor_index)
    return coord_weight * reg, cls


def rank_partners(ids: torch.Tensor, clip_len: int, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partner [N], valid [N])``: the sample that provides each frame's negatives.

    Reference: batch reversal ``N-1-i`` (the middle clip can be its own negative). Fixed: the
    first frame of the next clip with a different expression (rolled), invalid when every clip in
    the batch shares the expression.
    """
    N = ids.shape[0]
    if reference:
        return torch.arange(N - 1, -1, -1, device=ids.device), torch.ones(N, dtype=torch.bool, device=ids.device)
    n_clips = N // clip_len
    partner = torch.arange(N, device=ids.device)
    valid = torch.zeros(N, dtype=torch.bool, device=ids.device)
    clip_ids = ids.view(n_clips, clip_len, -1)[:, 0]
    for c in range(n_clips):
        for shift in range(1, n_clips):
            o = (c + shift) % n_clips
            if not torch.equal(clip_ids[o], clip_ids[c]):
                partner[c * clip_len : (c + 1) * clip_len] = o * clip_len + torch.arange(clip_len, device=ids.device)
                valid[c * clip_len : (c + 1) * clip_len] = True
                break
    return partner, valid


def rank_loss(
    out: dict,
    t: Targets,
    partner: torch.Tensor,
    valid: torch.Tensor,
    margin: float = 0.1,
    zero_same_cell: bool = True,
) -> torch.Tensor:
    """Subject-attention ranking: the GT cell's cosine with its own subject phrase must beat by ``margin``

    (1) the partner's subject phrase at the same cell and (2) its own phrase at the partner's GT
    cell: ``sum_i [max(0, m + neg1 - pos) + max(0, m + neg2 - pos)] / (2 N_valid)``. Pairs whose
    partner GT cell equals the own cell give no second term (``zero_same_cell``); the official code
    computes it anyway, so it adds the constant ``margin`` there (``zero_same_cell=False``).
    """
    sim, text = out["sim"].float(), out["text"]
    feats = torch.cat([f.flatten(2) for f in out["feats"]], 2).float()  # [N, D, M]
    i = torch.arange(sim.shape[0], device=sim.device)
    pos = sim[i, t.cell_index]
    own_cell = feats[i, :, t.cell_index]  # [N, D]
    neg1 = (text.e_sub[partner].float() * own_cell).sum(1)
    neg2 = sim[i, t.cell_index[partner]]
    same_cell = t.cell_index[partner] == t.cell_index
    l1 = F.relu(margin + neg1 - pos)
    zero = same_cell & (partner != i) if zero_same_cell else torch.zeros_like(same_cell)
    l2 = torch.where(zero, torch.zeros_like(pos), F.relu(margin + neg2 - pos))
    v = valid.float()
    return ((l1 + l2) * v).sum() / (2 * v.sum()).clamp(min=1)


def location_loss(out: dict, t: Targets, reference: bool, temperature: float = 0.1) -> torch.Tensor:
    """Cross-entropy over the M cells against the GT centre cell.

    Reference: the min-max normalised scores in [0, 1] used as logits (a nearly flat softmax);
    fixed: the raw cosine scores divided by ``temperature``.
    """
    logits = out["loc"] if reference else out["loc_raw"] / temperature
    return F.cross_entropy(logits.float(), t.cell_index)


def motion_loss(out: dict, t: Targets, candidates: int = 0) -> torch.Tensor:
    """Cross-entropy of the motion log-likelihoods ``mot_raw`` against the GT centre cell (``motion_attention``;
    zero when the batch had no neighbours): it teaches the motion phrase its velocity.

    ``candidates`` 0: over all M cells. ``k > 0``: over the GT cell and the ``k`` cells the rest of the model
    scores highest (``cell_score``, no gradient), so the motion term learns to separate the objects the model
    hesitates between (a look-alike moving the other way) rather than objects from the flat background.
    """
    if "mot_raw" not in out:
        return out["conf"].new_zeros(())
    logits = out["mot_raw"].float()
    if candidates > 0:
        top = out["cell_score"].detach().topk(min(candidates, logits.shape[1]), 1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
        keep[torch.arange(len(keep), device=keep.device), t.cell_index] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(logits, t.cell_index)


def temporal_offset_loss(
    model: CoGroundingNet, out: dict, t: Targets, boxes: torch.Tensor, clip_len: int
) -> torch.Tensor:
    """Temporal consistency (the official ``offset_loss``, defined but never run): the change of the box
    predicted at each frame's GT anchor between consecutive frames of a clip must match the change
    of the GT box; MSE on (cx, cy, w, h) / S. ``boxes [N,4]`` letterbox pixels, clips adjacent."""
    N = boxes.shape[0]
    if clip_len < 2 or N < 2:
        return boxes.new_zeros(())
    all_boxes = decode_boxes(model, out["pred"])  # [N, A, 4]
    pred = all_boxes[torch.arange(N, device=boxes.device), t.anchor_index]
    cxcywh = lambda b: (
        torch.stack(
            [
                (b[:, 0] + b[:, 2]) / 2,
                (b[:, 1] + b[:, 3]) / 2,  # noqa: E731
                b[:, 2] - b[:, 0],
                b[:, 3] - b[:, 1],
            ],
            1,
        )
        / model.image_size
    )
    p, g = cxcywh(pred).view(-1, clip_len, 4), cxcywh(boxes.float()).view(-1, clip_len, 4)
    return F.mse_loss(p[:, 1:] - p[:, :-1], g[:, 1:] - g[:, :-1])


def confidence_consistency_loss(out: dict, clip_len: int) -> torch.Tensor:
    """The official ``confidence_loss`` idea (never called there): MSE between consecutive frames'
    anchor-score distributions (softmax over anchors) within a clip."""
    conf = out["conf"].float()
    if clip_len < 2:
        return conf.new_zeros(())
    p = torch.softmax(conf, 1).view(-1, clip_len, conf.shape[1])
    return F.mse_loss(p[:, 1:], p[:, :-1]) * conf.shape[1]
