"""Video inference: test windows with per-video feature reuse, and temporal post-processing.

At test time frame ``t`` is grounded with the window ``t - w//2 ... t + w//2`` (indices clipped
to the video, as the official ``getChunk``); the centre frame attends to the other window
positions. The official code re-runs the backbone and the language encoder for every window, so
each frame passes the backbone ``w`` times. :func:`ground_video` computes each frame's visual
maps and the expression's features once and gathers them per window; :func:`ground_video_windowed`
is the window-by-window reference (same numbers, ``w`` times the visual work).

:func:`temporal_rescore` is the official post-processing, on arrays in frame order (independent
of file names): each frame's top-k candidates are re-scored by the scores of their most similar
candidates in the neighbouring frames.
"""

from __future__ import annotations

import torch

from .model import CoGroundingNet, decode_boxes

__all__ = ["window_indices", "ground_video", "ground_video_windowed", "top_candidates", "temporal_rescore"]


def window_indices(n_frames: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """``[n_frames, window]`` frame indices ``t - window//2 .. t + (window-1)//2``, clipped to the video."""
    off = torch.arange(window, device=device) - window // 2
    return (torch.arange(n_frames, device=device).unsqueeze(1) + off).clamp(0, n_frames - 1)


def _neighbours(win: torch.Tensor) -> torch.Tensor:
    """Window positions other than the centre: ``[n, window - 1]``."""
    c = win.shape[1] // 2
    return torch.cat([win[:, :c], win[:, c + 1 :]], 1)


def _head(model: CoGroundingNet, v: list[torch.Tensor], centre: torch.Tensor, neigh: torch.Tensor | None, text) -> dict:
    vc = [x[centre] for x in v]
    vn = [x[neigh] for x in v] if neigh is not None and model.co_attention else None
    dt = neigh - centre.unsqueeze(1) if vn is not None else None
    return model.ground(
        model.cofeatures(vc, vn, dt),
        text.index(torch.zeros(len(centre), dtype=torch.long, device=centre.device)),
        centre=vc,
        motion=model.motion_maps(vc, vn, dt),
    )


def _collect(model: CoGroundingNet, out: dict, top_k: int) -> dict[str, torch.Tensor]:
    boxes = decode_boxes(model, out["pred"])  # [n, A, 4]
    best = out["conf"].argmax(1)
    n = boxes.shape[0]
    res = {"box": boxes[torch.arange(n), best], "score": out["conf"].gather(1, best[:, None]).squeeze(1)}
    if top_k > 0:
        res.update(top_candidates(model, out, boxes, top_k))
    return res


@torch.no_grad()
def ground_video(
    model: CoGroundingNet,
    frames: torch.Tensor | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    window: int = 5,
    batch: int = 64,
    top_k: int = 0,
    backbone_feats: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Ground one expression in every frame of one video, each frame's features computed once.

    ``frames [T,3,S,S]`` in [0,1], ``ids``/``mask`` ``[L]``. Returns ``box [T,4]`` (letterbox pixels),
    ``score [T]`` and with ``top_k`` the candidates ``cand_box [T,k,4]``, ``cand_score [T,k]``,
    ``cand_feat [T,k,D]`` for :func:`temporal_rescore`. ``backbone_feats`` (per scale ``[T,C,G,G]``)
    replace ``frames`` when the backbone maps are already known.
    """
    src = frames if frames is not None else backbone_feats[0]
    T, dev = src.shape[0], src.device
    v_parts = [
        model.encode_frames(frames[s : s + batch])
        if frames is not None
        else model.encode_frames(backbone_feats=[f[s : s + batch] for f in backbone_feats])
        for s in range(0, T, batch)
    ]
    v = [torch.cat([p[k] for p in v_parts]) for k in range(len(v_parts[0]))]
    text = model.encode_text(ids.view(1, -1), mask.view(1, -1))
    win = window_indices(T, window, dev)
    neigh = _neighbours(win) if window > 1 else None
    parts = []
    for s in range(0, T, batch):
        centre = torch.arange(s, min(T, s + batch), device=dev)
        parts.append(_collect(model, _head(model, v, centre, None if neigh is None else neigh[centre], text), top_k))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def ground_video_windowed(
    model: CoGroundingNet,
    frames: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    window: int = 5,
    batch: int = 64,
    top_k: int = 0,
) -> dict[str, torch.Tensor]:
    """The official way: every window runs the backbone on its ``window`` frames and the language
    encoder again. Same outputs as :func:`ground_video`."""
    T = frames.shape[0]
    win = window_indices(T, window, frames.device)
    per_batch = max(1, batch // window)
    parts = []
    for s in range(0, T, per_batch):
        w = win[s : s + per_batch]  # [n, window]
        n = w.shape[0]
        v = model.encode_frames(frames[w.reshape(-1)])  # n * window frames through the backbone
        text = model.encode_text(ids.view(1, -1).expand(n, -1), mask.view(1, -1).expand(n, -1))
        pos = torch.arange(n, device=frames.device) * window
        c = window // 2
        centre = pos + c
        neigh = torch.stack([pos + j for j in range(window) if j != c], 1) if window > 1 else None
        use = neigh is not None and model.co_attention
        dt = _neighbours(w) - w[:, c : c + 1] if use else None
        vc = [x[centre] for x in v]
        vn = [x[neigh] for x in v] if use else None
        out = model.ground(model.cofeatures(vc, vn, dt), text, centre=vc, motion=model.motion_maps(vc, vn, dt))
        parts.append(_collect(model, out, top_k))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def top_candidates(model: CoGroundingNet, out: dict, boxes: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Top-``k`` anchors by final score: boxes ``[n,k,4]``, scores ``[n,k]`` and the ``D``-d (co-)feature
    at each anchor's scale and cell ``[n,k,D]`` (the official cache's ``visu_feat``)."""
    conf = out["conf"]
    score, idx = conf.topk(min(k, conf.shape[1]), dim=1)
    n = conf.shape[0]
    feats = torch.cat([f.flatten(2) for f in out["feats"]], 2)  # [n, D, M]
    # anchor index -> cell index: anchors are (scale, anchor, cell) with 3 anchors per cell
    a_off = torch.tensor(model.anchor_offsets(), device=idx.device)
    c_off = torch.tensor(model.cell_offsets(), device=idx.device)
    g2 = torch.tensor([g * g for g in model.grids], device=idx.device)
    scale = (idx.unsqueeze(-1) >= a_off).sum(-1) - 1
    cell = c_off[scale] + (idx - a_off[scale]) % g2[scale]
    feat = feats.gather(2, cell.unsqueeze(1).expand(-1, feats.shape[1], -1)).transpose(1, 2)  # [n, k, D]
    rows = torch.arange(n, device=idx.device).unsqueeze(1)
    return {"cand_box": boxes[rows, idx], "cand_score": score, "cand_feat": feat}


def temporal_rescore(
    feats: torch.Tensor, scores: torch.Tensor, window: int = 5, renormalize: bool = True
) -> torch.Tensor:
    """Index ``[T]`` of the chosen candidate per frame after temporal re-scoring (official post-processing).

    ``feats [T,k,D]``, ``scores [T,k]`` of one video in frame order. For frame ``t``, candidate
    ``i`` and each frame ``f`` of ``t - window//2 .. t + window//2``:
    ``w_raw[i,f] = max_j <feat_t,i, feat_f,j>``, ``s_ref[i,f] = score_f,j*``; ``w = softmax_f(w_raw)``;
    ``fused[i] = sum_f w[i,f] s_ref[i,f]``; the chosen candidate is ``argmax_i fused``. Frames
    beyond the video ends: the official code gives them zero weight after the softmax
    (``renormalize=False``); by default the softmax runs over the existing frames only.
    """
    T, k, _ = feats.shape
    half = window // 2
    offsets = torch.arange(-half, half + 1, device=feats.device)
    f_idx = torch.arange(T, device=feats.device).unsqueeze(1) + offsets  # [T, F]
    exists = (f_idx >= 0) & (f_idx < T)
    f_idx = torch.where(exists, f_idx, torch.arange(T, device=feats.device).unsqueeze(1))  # official: the centre frame
    sim = torch.einsum("tid,tfjd->tifj", feats.float(), feats[f_idx].float())  # [T, k, F, k]
    w_raw, j = sim.max(-1)  # [T, k, F]
    s_ref = scores.float()[f_idx].unsqueeze(1).expand(-1, k, -1, -1).gather(3, j.unsqueeze(-1)).squeeze(-1)  # [T, k, F]
    ex = exists.unsqueeze(1).expand(-1, k, -1)
    if renormalize:
        w = torch.softmax(w_raw.masked_fill(~ex, float("-inf")), dim=2)
    else:
        w = torch.softmax(w_raw, dim=2) * ex.float()
    return (w * s_ref).sum(2).argmax(1)
