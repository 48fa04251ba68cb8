"""Co-grounding glue for the engine: model, datasets, training step, evaluation.

Evaluation reports ``Acc@0.5`` (IoU with the GT box in original pixels, after mapping the
letterboxed prediction back) per split; ``test`` is every split of ``data.test_splits``
(``testA/Acc@0.5``, ``testB/Acc@0.5`` and their pooled ``Acc@0.5``). On images it adds the
baselines: a random annotated object (expected accuracy), the largest annotated object, and the
anchor upper bound (any of the head's anchors hits). On video a sample is a frame, each frame
grounded with its test window; ``Acc@0.5 (post)`` is after temporal re-scoring.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...boxes import paired_box_iou
from ...config import ConfigError
from ...distributed import unwrap_model
from ...metrics import refexp_baseline_hits
from ..base import Figure, Method
from .backbones import build_backbone
from .config import CoGroundingConfig
from .data import RefExpDataset, VideoClipDataset, VideoEvalSet, image_splits, load_image_samples, load_videos
from .inference import ground_video, ground_video_windowed, temporal_rescore
from .model import (
    CoGroundingNet,
    LSTMTextEncoder,
    TransformerTextEncoder,
    build_targets,
    confidence_consistency_loss,
    decode_boxes,
    location_loss,
    motion_loss,
    rank_loss,
    rank_partners,
    temporal_offset_loss,
    yolo_loss,
)
from .text import build_tokenizer, resolve_text_path
from .variants import ExtendedCoGroundingNet

log = logging.getLogger("groundkit.cogrounding")

__all__ = ["CoGroundingMethod", "EvalBundle", "build_model", "hits"]


def build_model(cfg: CoGroundingConfig) -> CoGroundingNet:
    m = cfg.model
    backbone = build_backbone(
        m.backbone, m.pretrained, m.darknet_weights, m.darknet_width, m.darknet_taps, m.darknet_bn_momentum
    )
    if m.text_encoder == "lstm":
        text = LSTMTextEncoder(len(build_tokenizer(m)), m.dim)
    else:
        text = TransformerTextEncoder(resolve_text_path(m.text_encoder_path), m.dim, freeze=m.freeze_text_encoder)
    cls = ExtendedCoGroundingNet if m.variant_switches() else CoGroundingNet
    return cls(m, backbone, text, cfg.data.image_size)


def hits(pred: np.ndarray, gt: np.ndarray, cfg: CoGroundingConfig) -> np.ndarray:
    """Per sample: IoU(pred, gt) >= threshold (``eval.inclusive``) or > threshold (official)."""
    iou = np.asarray(
        paired_box_iou(torch.as_tensor(pred, dtype=torch.float64), torch.as_tensor(gt, dtype=torch.float64))
    )
    t = cfg.eval.iou_threshold
    return iou >= t if cfg.eval.inclusive else iou > t


class EvalBundle:
    """The evaluation parts of one requested split (``test`` -> testA + testB ...)."""

    def __init__(self, parts: dict[str, Any]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.values())


class CoGroundingMethod(Method):
    name = "cogrounding"
    config_class = CoGroundingConfig
    default_config = "world_image"
    summary = (
        "referring expressions in images and video with semantic attention and co-grounding (Song et al., CVPR 2021)"
    )
    commands = {
        "predict": {"refexp": "groundkit.methods.cogrounding.predict:register"},
        "bench": {"cogrounding": "groundkit.bench.cogrounding:register"},
        "data": {"convert-cogrounding": "groundkit.methods.cogrounding.weights:register_convert"},
    }

    # ---------------------------------------------------------------- construction

    def build_model(self, cfg: CoGroundingConfig) -> nn.Module:
        return build_model(cfg)

    def _check(self, cfg: CoGroundingConfig) -> None:
        d = cfg.data
        w = cfg.world
        if w.task and w.task not in ("refexp", "video"):
            raise ConfigError(f"world.task={w.task!r}: co-grounding trains on the refexp or the video world")
        if w.task and (w.task == "video") != (d.kind == "vid"):
            raise ConfigError(f"world.task={w.task!r} does not fit data.kind={d.kind!r}")
        if w.size and not d.root:
            raise ConfigError(
                "world.size names the built-in world but data.root is empty: build it with "
                "groundkit.world.resolve_world (groundkit train and groundkit.runs do)"
            )
        if d.cache_backbone and not cfg.model.freeze_backbone:
            raise ConfigError("data.cache_backbone needs model.freeze_backbone=true")
        if d.image_size % 32:
            raise ConfigError(f"data.image_size must be a multiple of 32, got {d.image_size}")
        if not 0 <= d.hsv_jitter <= 1:
            raise ConfigError(f"data.hsv_jitter={d.hsv_jitter}: a fraction in [0, 1] (official 0.5)")
        for key, value in (("train.val_split", cfg.train.val_split), ("data.val_split", d.val_split)):
            if value in d.test_splits or value.startswith("test"):
                raise ConfigError(f"{key}={value!r} is a test split; select models on a validation split")

    def build_dataset(self, cfg: CoGroundingConfig, split: str) -> Any:
        self._check(cfg)
        d = cfg.data
        name = d.train_split if split == "train" else (d.val_split if split == "val" else split)
        if d.kind == "vid":
            if split == "train":
                return VideoClipDataset(cfg, load_videos(cfg, name), train=True)
            return EvalBundle({s: VideoEvalSet(cfg, load_videos(cfg, s)) for s in image_splits(cfg, name)})
        if split == "train":
            return RefExpDataset(cfg, load_image_samples(cfg, name), train=True)
        return EvalBundle(
            {s: RefExpDataset(cfg, load_image_samples(cfg, s), train=False) for s in image_splits(cfg, name)}
        )

    def on_train_start(self, model: nn.Module, dataset: Any, cfg: CoGroundingConfig, device: torch.device) -> None:
        if cfg.data.cache_backbone:
            dataset.attach_backbone(model.backbone)

    # ---------------------------------------------------------------- training

    def training_step(
        self, model: nn.Module, batch: dict, step: int, cfg: CoGroundingConfig
    ) -> tuple[torch.Tensor, dict]:
        L = cfg.loss
        clip_len = int(batch["clip_len"])
        net: CoGroundingNet = unwrap_model(model)
        out = model(
            batch.get("images"),
            batch["ids"],
            batch["mask"],
            clip_len=clip_len,
            backbone_feats=batch.get("backbone_feats"),
            frame_index=batch.get("frame_index"),
        )
        t = build_targets(net, batch["boxes"])
        reg, cls = yolo_loss(net, out, t, L.coord_weight)
        partner, valid = rank_partners(batch["ids"], clip_len, L.rank_negatives_reversal)
        rank = rank_loss(out, t, partner, valid, L.rank_margin, zero_same_cell=not L.rank_same_cell_margin)
        loc = location_loss(out, t, L.loc_on_normalized, L.loc_temperature)
        loss = reg + cls + L.rank_weight * rank + L.loc_weight * loc
        logs = {"box": reg.item(), "anchor_ce": cls.item(), "rank": rank.item(), "loc": loc.item()}
        if "mot_raw" in out:
            mot = motion_loss(out, t, L.motion_candidates)
            loss = loss + L.motion_weight * mot
            logs["motion"] = mot.item()
        if L.temporal_weight > 0:
            tmp = temporal_offset_loss(net, out, t, batch["boxes"], clip_len)
            loss = loss + L.temporal_weight * tmp
            logs["temporal"] = tmp.item()
        if L.confidence_consistency_weight > 0:
            cc = confidence_consistency_loss(out, clip_len)
            loss = loss + L.confidence_consistency_weight * cc
            logs["conf_consistency"] = cc.item()
        with torch.no_grad():
            best = out["conf"].argmax(1)
            logs["train_anchor_acc"] = float((best == t.anchor_index).float().mean())
        return loss, logs

    # ---------------------------------------------------------------- evaluation

    def evaluate(
        self, model: nn.Module, dataset: Any, cfg: CoGroundingConfig, device: torch.device
    ) -> dict[str, float]:
        if not isinstance(dataset, EvalBundle):
            raise ConfigError(
                "cogrounding evaluates the val and test splits; to score the training expressions use "
                "--split test --set data.test_splits=[train]"
            )
        net: CoGroundingNet = unwrap_model(model)
        was = net.training
        net.eval()
        try:
            metrics: dict[str, float] = {}
            pooled: dict[str, list] = {}
            for name, part in dataset.parts.items():
                if cfg.data.cache_backbone:
                    part.attach_backbone(net.backbone)
                res = (
                    self._eval_video(net, part, cfg, device)
                    if isinstance(part, VideoEvalSet)
                    else self._eval_images(net, part, cfg, device)
                )
                for k, v in res.items():
                    pooled.setdefault(k, []).append(v)
                if len(dataset.parts) > 1:
                    metrics.update({f"{name}/{k}": 100.0 * float(np.mean(v)) for k, v in res.items() if len(v)})
            metrics.update(
                {k: 100.0 * float(np.mean(np.concatenate(v))) for k, v in pooled.items() if sum(map(len, v))}
            )
            metrics["samples"] = float(sum(len(v) for v in pooled.get("Acc@0.5", [])))
            return metrics
        finally:
            net.train(was)

    @torch.no_grad()
    def _eval_images(
        self, net: CoGroundingNet, ds: RefExpDataset, cfg: CoGroundingConfig, device: torch.device
    ) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"Acc@0.5": [], "upper_bound": []}
        if cfg.eval.baselines and ds.samples and ds.samples[0].objects:
            out.update({"random_object": [], "largest_object": [], "centre_object": []})
        bs = cfg.train.eval_batch_size
        for s in range(0, len(ds), bs):
            idx = list(range(s, min(len(ds), s + bs)))
            batch = ds.get_batch(idx)
            images = batch.get("images")
            feats = batch.get("backbone_feats")
            res = net(
                images.to(device) if images is not None else None,
                batch["ids"].to(device),
                batch["mask"].to(device),
                backbone_feats=[f.to(device) for f in feats] if feats is not None else None,
            )
            boxes = decode_boxes(net, res["pred"]).cpu()  # [B, A, 4]
            best = res["conf"].argmax(1).cpu()
            for j, i in enumerate(idx):
                lb, gt = batch["letterbox"][j], batch["gt_original"][j].numpy()
                pred = lb.to_original(boxes[j, best[j]])
                out["Acc@0.5"].append(bool(hits(pred[None], gt[None], cfg)[0]))
                allb = lb.to_original(boxes[j])
                out["upper_bound"].append(bool(hits(allb, np.repeat(gt[None], len(allb), 0), cfg).any()))
                if "random_object" in out:
                    base = refexp_baseline_hits(
                        gt[None],
                        [ds.samples[i].objects],
                        [(lb.orig_w, lb.orig_h)],
                        cfg.eval.iou_threshold,
                        cfg.eval.inclusive,
                    )
                    for k, v in base.items():
                        out[k].append(float(v[0]))
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    @torch.no_grad()
    def _eval_video(
        self, net: CoGroundingNet, ds: VideoEvalSet, cfg: CoGroundingConfig, device: torch.device
    ) -> dict[str, np.ndarray]:
        E, P = cfg.eval, cfg.post
        window = E.window if net.co_attention else 1
        out: dict[str, list] = {"Acc@0.5": []}
        if P.enabled:
            out["Acc@0.5 (post)"] = []
        for i in range(len(ds)):
            v = ds.video(i)
            feats = v.get("backbone_feats")
            frames = v["images"].to(device) if "images" in v else None
            fn = ground_video if (E.reuse_features or frames is None) else ground_video_windowed
            kw = {"backbone_feats": [f.to(device) for f in feats]} if frames is None else {}
            r = fn(
                net,
                frames,
                v["ids"].to(device),
                v["mask"].to(device),
                window=window,
                batch=E.batch_frames,
                top_k=P.top_k if P.enabled else 0,
                **kw,
            )
            gt = v["gt_original"].numpy()
            lbs = v["letterbox"]
            pred = np.stack([lb.to_original(b) for lb, b in zip(lbs, r["box"].cpu())])
            out["Acc@0.5"].extend(hits(pred, gt, cfg).tolist())
            if P.enabled:
                choice = temporal_rescore(r["cand_feat"], r["cand_score"], P.window, P.renormalize).cpu()
                cb = r["cand_box"].cpu()
                pp = np.stack([lb.to_original(cb[t, choice[t]]) for t, lb in enumerate(lbs)])
                out["Acc@0.5 (post)"].extend(hits(pp, gt, cfg).tolist())
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    def format_eval(self, metrics: dict[str, float], split: str) -> str:
        keys = [k for k in metrics if k != "samples"]
        return f"{split} ({int(metrics.get('samples', 0))} samples): " + ", ".join(
            f"{k} {metrics[k]:.2f}" for k in keys
        )

    # ---------------------------------------------------------------- inference

    def predictor(self, run: Any, device: str = "cpu", **options: Any) -> Any:
        from .predict import CoGroundingPredictor  # noqa: PLC0415 (predict imports the registry)

        return CoGroundingPredictor(run, device=device, **options)

    def demo_figures(self, run: str | Path, out_dir: Path, n: int = 4) -> list[Figure]:
        """Film strips of ``n`` test videos (video runs) or ``n`` test images (image runs) with the true (green)
        and predicted (red) boxes (:mod:`.visualize`)."""
        from .visualize import demo_figures  # noqa: PLC0415 (visualize imports the predictor, which imports the registry)

        return demo_figures(run, out_dir, n)


METHOD = CoGroundingMethod()
