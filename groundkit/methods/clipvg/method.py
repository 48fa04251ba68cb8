"""CLIP-VG as a groundkit method: model and data from the config, L1 + GIoU training, Acc@0.5.

Evaluation runs the model over every sample once (sharded without padding under DDP) and reports
``acc`` (top-1 Acc@``eval.iou_threshold``: IoU of the clamped predicted box with the target) and
``miou`` in percent, and ``n``; :meth:`ClipVGMethod.sample_ious` gives the per-sample IoUs (reliability).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...boxes import cxcywh_to_xyxy, paired_box_iou
from ...distributed import unwrap_model
from ...engine import predict
from ..base import Figure, Method, Predictor
from .config import ClipVGConfig
from .data import GroundingSet, load_samples, split_file, world_paths
from .model import ClipVG, EncoderError, build_encoders, clipvg_loss, token_box_loss, token_loss
from .predict import ClipVGPredictor

__all__ = ["ClipVGMethod", "METHOD", "build_clipvg", "encoder_dtype"]


def encoder_dtype(cfg: ClipVGConfig) -> torch.dtype:
    p = cfg.model.encoder_precision
    if p in ("auto", "official"):  # official: CLIP in fp16 on CUDA (clip.load), fp32 on the CPU
        cuda = torch.cuda.is_available() and cfg.train.device in ("auto", "cuda") or cfg.train.device.startswith("cuda")
        return (torch.bfloat16 if p == "auto" else torch.float16) if cuda else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def build_clipvg(cfg: ClipVGConfig) -> ClipVG:
    m = cfg.model
    if m.encoder == "clip" and not m.clip_checkpoint and not m.allow_random_encoders:
        raise EncoderError(
            "model.clip_checkpoint is empty: give a local open_clip/OpenAI checkpoint of "
            f"{m.clip_name} (nothing is downloaded), use model.encoder=effnet_minilm (offline "
            "pretrained pair), or set model.allow_random_encoders=true for tests and timing"
        )
    enc = build_encoders(
        m.encoder,
        clip_name=m.clip_name,
        clip_checkpoint=m.clip_checkpoint,
        levels=m.clip_levels,
        trainable_pos_embed=m.trainable_pos_embed and m.encoder == "clip",  # the EfficientNet pair has none
        image_size=cfg.data.imsize,
        activation=m.clip_activation,
        grid=m.grid,
        pretrained=m.pretrained,
        text_model=m.text_model,
        stages=m.effnet_stages,
    )
    return ClipVG(m, enc, cfg.data.max_query_len, encoder_dtype(cfg))


def _inputs(model: ClipVG, batch: dict[str, Any]) -> dict[str, Any]:
    """Tokenise the texts of a raw batch (cached batches carry text features already)."""
    if "texts" in batch:
        ids, mask = model.encoders.tokenize(batch["texts"], model.max_query_len)
        dev = batch["image"].device
        batch = {**batch, "text_ids": ids.to(dev), "text_mask": mask.to(dev)}
    return batch


class ClipVGMethod(Method):
    name = "clipvg"
    config_class = ClipVGConfig
    default_config = "offline"
    world_task = "pseudo"  # world.size (world_cpu: small) trains on the built-in pseudo world
    summary = "CLIP-VG (Xiao et al., 2023): frozen encoders, [REG] fusion transformer, pseudo labels + curriculum"
    commands = {
        "data": {"convert-clipvg": "groundkit.methods.clipvg.weights:register_convert"},
        "bench": {"clipvg": "groundkit.bench.clipvg:register"},
        "predict": {"clipvg": "groundkit.methods.clipvg.predict:register"},
        "top": {"curriculum": "groundkit.methods.clipvg.curriculum:register_curriculum"},
    }

    def build_model(self, cfg: ClipVGConfig) -> nn.Module:
        return build_clipvg(cfg)

    def has_split(self, cfg: ClipVGConfig, split: str) -> bool:
        try:
            return all(p.is_file() for p in split_file(cfg.data, split))
        except Exception:
            return False

    def build_dataset(self, cfg: ClipVGConfig, split: str) -> GroundingSet | None:
        if split != "train" and not self.has_split(cfg, split):
            return None
        train = split == "train"
        return GroundingSet(
            load_samples(cfg.data, split),
            cfg.data,
            augment=train and cfg.data.augment,
            seed=cfg.train.seed,
            name=split,
            flip=cfg.data.flip if train else 0.0,
        )

    def on_train_start(self, model: nn.Module, dataset: GroundingSet, cfg: ClipVGConfig, device: torch.device) -> None:
        dataset.attach_cache(unwrap_model(model), device)

    def training_step(self, model: nn.Module, batch: Any, step: int, cfg: ClipVGConfig) -> tuple[torch.Tensor, dict]:
        out = model(_inputs(unwrap_model(model), batch))
        loss, logs = clipvg_loss(out.boxes, batch["box"], cfg.loss.l1_weight, cfg.loss.giou_weight)
        if out.token_logits is not None and cfg.loss.token_weight > 0:
            lt = token_loss(out.token_logits, batch["box"])
            loss = loss + cfg.loss.token_weight * lt
            logs["token"] = float(lt.detach())
            if out.token_boxes is not None:
                lb = token_box_loss(out.token_boxes, out.token_logits, batch["box"])
                loss = loss + cfg.loss.token_weight * lb
                logs["token_box"] = float(lb.detach())
        return loss, logs

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, model: nn.Module, dataset: Any, cfg: ClipVGConfig, device: torch.device) -> dict[str, float]:
        if dataset is None:
            return {}
        dataset.attach_cache(unwrap_model(model), device)
        return super().evaluate(model, dataset, cfg, device)

    def eval_step(self, model: nn.Module, batch: Any, cfg: ClipVGConfig) -> dict[str, Any]:
        out = model(_inputs(unwrap_model(model), batch))
        pred = cxcywh_to_xyxy(out.boxes.float()).clamp(0.0, 1.0)
        target = cxcywh_to_xyxy(batch["box"].float())
        return {"iou": paired_box_iou(pred, target), "pred": out.boxes.float()}

    def compute_metrics(self, outputs: dict[str, Any], dataset: Any, cfg: ClipVGConfig) -> dict[str, float]:
        """``acc`` (Acc@``eval.iou_threshold``) and ``miou`` in percent, ``n`` samples."""
        iou = np.asarray(outputs["iou"], dtype=np.float64)
        if not len(iou):
            return {"acc": 0.0, "miou": 0.0, "n": 0.0}
        out = {
            "acc": 100.0 * float((iou >= cfg.eval.iou_threshold).mean()),
            "miou": 100.0 * float(iou.mean()),
            "n": float(len(iou)),
        }
        if cfg.eval.baselines and isinstance(dataset, GroundingSet) and len(dataset) == len(iou):
            out.update(dataset.baselines(cfg.eval.iou_threshold))
        return out

    def sample_ious(
        self, model: nn.Module, dataset: GroundingSet, cfg: ClipVGConfig, device: torch.device | str = "cpu"
    ) -> np.ndarray:
        """IoU of the model's box with each sample's box (the reliability of pseudo labels)."""
        dataset.attach_cache(unwrap_model(model), torch.device(device))
        return np.asarray([float(r["iou"]) for r in predict(self, model, dataset, cfg, device)], dtype=np.float32)

    # ---------------------------------------------------------------- inference and command line

    def predictor(self, run: str | Path, device: str = "cpu", **options: Any) -> Predictor:
        return ClipVGPredictor(run, device=device, **options)

    def demo_figures(self, run: str | Path, out_dir: Path, n: int = 4) -> list[Figure]:
        """``n`` test samples with the true (green) and predicted (red) box (:mod:`.visualize`)."""
        from .visualize import demo_figures  # noqa: PLC0415 (drawing code is loaded only when pictures are asked for)

        return demo_figures(run, out_dir, n)

    def add_cli_args(self, parser: argparse.ArgumentParser, mode: str) -> None:
        parser.add_argument(
            "--split-root", default=None, help="folder of <dataset>/<dataset>_<split>.pth (data.split_root)"
        )
        parser.add_argument("--image-root", default=None, help="folder of the images (data.image_root)")
        parser.add_argument("--clip-checkpoint", default=None, help="local CLIP weights (model.clip_checkpoint)")
        parser.add_argument("--supervision", choices=["pseudo", "full"], default=None, help="data.supervision")

    def cli_overrides(self, args: dict[str, Any], mode: str) -> dict[str, Any]:
        keys = {
            "split_root": "data.split_root",
            "image_root": "data.image_root",
            "clip_checkpoint": "model.clip_checkpoint",
            "supervision": "data.supervision",
        }
        return {keys[k]: v for k, v in args.items() if k in keys and v is not None}

    def own_data(self, cfg: ClipVGConfig) -> bool:
        return bool(cfg.data.split_root or cfg.data.image_root)

    def use_world(self, cfg: ClipVGConfig, root: Path) -> None:
        """The built-in pseudo world's splits, images and instances.json for the empty paths."""
        for key, path in world_paths(root).items():
            if not getattr(cfg.data, key):
                setattr(cfg.data, key, path)


METHOD = ClipVGMethod()
