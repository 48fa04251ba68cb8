"""wang21 inference: rank an image's region proposals for free-text phrases with a trained run."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...formats import wang21_hdf5 as wfmt
from ...text import load_word_vectors, tokenize
from .. import load_run
from ..base import Predictor
from .data import word_dim

log = logging.getLogger("groundkit.wang21")

__all__ = ["Wang21Predictor", "predict_phrases", "register_predict"]


# ----------------------------------------------------------------------------- predict


class Wang21Predictor(Predictor):
    """Ranks an image's region proposals (a region HDF5 row) for free-text phrases."""

    kind = "regions_text"
    method = "wang21"

    def __init__(self, run: str | Path, device: str = "cpu", glove_path: str | None = None):
        overrides = {"data.glove_path": glove_path} if glove_path else None
        _, self.cfg, self.model = load_run(run, device=device, overrides=overrides, method="wang21")
        self.device = torch.device(device)

    def ground_regions(self, regions: Any, phrases: list[str], top_k: int = 5) -> list[dict[str, Any]]:
        """``regions``: ``(features [N, D], boxes [N, 4], valid [N])`` arrays of one image. Per phrase:
        ``{"phrase", "tokens", "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}``, best first."""
        feats, boxes, valid = (np.asarray(x) for x in regions)
        cfg = self.cfg
        toks = [tokenize(p)[: cfg.data.max_tokens] for p in phrases]
        vecs = load_word_vectors(cfg.data.glove_path, {t for ts in toks for t in ts})
        T, E = cfg.data.max_tokens, word_dim(cfg.data)
        words = torch.zeros(len(phrases), T, E)
        mask = torch.zeros(len(phrases), T, dtype=torch.bool)
        for i, ts in enumerate(toks):
            for j, t in enumerate(ts):
                if t in vecs:
                    words[i, j], mask[i, j] = torch.from_numpy(vecs[t]), True
            if not mask[i].any():
                log.warning(
                    "phrase %r: no word has a vector in %s; its ranking is meaningless", phrases[i], cfg.data.glove_path
                )
        v = torch.from_numpy(valid.astype(bool))
        with torch.no_grad():
            x = torch.from_numpy(feats)[None].float().to(self.device)
            sim = self.model.phrase_region_scores(x, words[None].to(self.device), mask[None].to(self.device))[0].cpu()
            sim = sim.masked_fill(~v[None], float("-inf"))
        out = []
        for i, p in enumerate(phrases):
            sc, idx = sim[i].topk(min(top_k, int(v.sum())))
            out.append({"phrase": p, "tokens": toks[i], "boxes": boxes[idx.numpy()].tolist(), "scores": sc.tolist()})
        return out


def predict_phrases(
    checkpoint: str | Path,
    region_feat_path: str,
    image_id: str,
    phrases: Sequence[str],
    glove_path: str | None = None,
    top_k: int = 5,
) -> list[dict[str, Any]]:
    """Rank an image's proposals for free-text phrases with a trained checkpoint (a run's
    ``checkpoints/best`` directory; its config is read from ``meta.json``).

    Returns, per phrase, ``{"phrase", "tokens", "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}``
    (the ``top_k`` best proposals, pixel coordinates of the region file).
    """
    pred = Wang21Predictor(checkpoint, glove_path=glove_path)
    reg = wfmt.read_region_hdf5(region_feat_path, pred.cfg.data.region_dim, image_ids=[image_id])
    return pred.ground_regions((reg.features[0], reg.boxes[0], reg.valid[0]), list(phrases), top_k)


def register_predict(sub: Any) -> None:
    p = sub.add_parser("phrase", help="rank an image's proposals for phrases with a trained wang21 checkpoint")
    p.add_argument(
        "--checkpoint",
        "--restore-path",  # the official script's name, kept as an alias
        dest="restore_path",
        required=True,
        help="run directory or checkpoint directory (e.g. RUN/checkpoints/best); --restore-path is an alias",
    )
    p.add_argument("--region-feat-path", required=True, help="region HDF5 holding the image's proposals")
    p.add_argument("--image-id", required=True)
    p.add_argument("--phrase", action="append", required=True, help="phrase text (repeatable)")
    p.add_argument("--glove-path", default=None, help="override the run's word vectors")
    p.add_argument("--top-k", type=int, default=5)

    def run(a: Any) -> int:
        res = predict_phrases(a.restore_path, a.region_feat_path, a.image_id, a.phrase, a.glove_path, a.top_k)
        print(json.dumps(res, indent=1))
        return 0

    p.set_defaults(func=run)
