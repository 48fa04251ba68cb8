"""Weakly supervised phrase grounding by contrastive knowledge distillation (Wang et al., CVPR 2021).

The method glue for the engine: model construction, training step (NCE over image-sentence pairs
plus the ramped distillation from detector class probabilities), evaluation (R@1/5/10 per (image,
sentence) pair, proposal upper bound, random-ranking and teacher-alone baselines) and the CLI flags
that mirror the official scripts. ``reference`` configs reproduce the official code; each
improvement is its own flag in :class:`~groundkit.methods.wang21.config.Wang21LossConfig`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import distributed as dist_utils
from ...boxes import box_iou
from ...config import ConfigError
from ...metrics import PhraseRecallAccumulator
from ...text import GLOVE_PACKAGE
from ..base import Figure, Method, Predictor
from .config import Wang21Config
from .data import Wang21Dataset, norm_stats, resolve_paths, word_dim, world_files
from .model import (
    Wang21Model,
    distill_loss,
    distill_neighbourhood,
    image_sentence_scores,
    nce_loss,
    ramp_weight,
    teacher_scores,
    teacher_targets,
)
from .predict import Wang21Predictor

log = logging.getLogger("groundkit.wang21")

__all__ = ["Wang21Method", "METHOD", "to_percent"]


# ----------------------------------------------------------------------------- method

#: the metrics that are rates (fractions from the accumulators); everything else is a count
_RATE_PREFIXES = ("R@", "random_R@", "teacher_R@", "upper_bound", "teacher_coverage")


def to_percent(metrics: dict[str, float]) -> dict[str, float]:
    """The one place where wang21's rates become percentages (groundkit reports every method's rates in
    percent): each rate is multiplied by 100.0 exactly once, counts are kept."""
    return {k: 100.0 * v if k.startswith(_RATE_PREFIXES) else v for k, v in metrics.items()}


class Wang21Method(Method):
    name = "wang21"
    config_class = Wang21Config
    default_config = "reference_distill"
    world_task = "phrase"  # world.size (the world_* configs: small) trains on the built-in phrase world
    summary = "weakly supervised phrase grounding by contrastive knowledge distillation (Wang et al., CVPR 2021)"
    commands = {
        "data": {
            "prepare-flickr30k": "groundkit.methods.wang21.prepare:register_prepare_flickr30k",
            "glove-to-hdf5": "groundkit.methods.wang21.prepare:register_glove_to_hdf5",
            "detections-to-hdf5": "groundkit.methods.wang21.prepare:register_detections_to_hdf5",
            "phrase-to-label": "groundkit.methods.wang21.prepare:register_phrase_to_label",
        },
        "bench": {"wang21": "groundkit.bench.wang21:register"},
        "predict": {"phrase": "groundkit.methods.wang21.predict:register_predict"},
    }

    # -- construction
    def build_model(self, cfg: Wang21Config) -> nn.Module:
        mean, std = norm_stats(cfg.data)
        return Wang21Model(cfg, word_dim(cfg.data), mean, std)

    def own_data(self, cfg: Wang21Config) -> bool:
        d = cfg.data
        return bool(d.region_feat_path or d.eval_region_feat_path)

    def use_world(self, cfg: Wang21Config, root: Path) -> None:
        """The built-in phrase world's files for every empty path (its own GloVe subset, detector classes,
        phrase-to-class map and matching matrix)."""
        for key, path in world_files(root).items():
            if getattr(cfg.data, key) in ("", GLOVE_PACKAGE):  # empty, or the default GloVe package
                setattr(cfg.data, key, path)

    def resolve_config(self, cfg: Wang21Config) -> Wang21Config:
        """Distillation without a teacher source (no phrase -> class map, no soft teacher) trains the NCE
        model: say so in the config, and name a shipped NCE+Distill default folder after the NCE model."""
        if cfg.loss.distill and not cfg.data.phrase_to_label_json and not cfg.loss.soft_teacher:
            cfg.loss.distill = False
            head, sep, tail = cfg.train.output_dir.rpartition("reference_distill")
            if sep and not tail.strip("/"):
                cfg.train.output_dir = head + "reference_nce" + tail
        return cfg

    def data_source(self, cfg: Wang21Config, split: str) -> dict[str, Any]:
        paths = resolve_paths(cfg.data, split)
        return {
            "split": split,
            "region_feat_path": paths[0] if paths else None,
            "phrase_feat_path": paths[1] if paths else None,
            "glove_path": cfg.data.glove_path,
            "phrase_to_label_json": cfg.data.phrase_to_label_json,
        }

    def has_split(self, cfg: Wang21Config, split: str) -> bool:
        paths = resolve_paths(cfg.data, split)
        return paths is not None and os.path.isfile(paths[0])

    def build_dataset(self, cfg: Wang21Config, split: str) -> Wang21Dataset | None:
        paths = resolve_paths(cfg.data, split)
        if paths is None:
            if split == "train":
                raise ConfigError(
                    "no training files: set data.region_feat_path and data.phrase_feat_path (--region-feat-path/"
                    "--phrase-feat-path); the built-in world: 'groundkit data synth --task phrase' prints its folder"
                )
            return None
        ds = Wang21Dataset(cfg, split, *paths)
        log.info("wang21 %s: %s", split, ds.stats)
        return ds

    def on_train_start(self, model: nn.Module, dataset: Wang21Dataset, cfg: Wang21Config, device: torch.device) -> None:
        dataset.place(device)
        if cfg.data.norm_preset == "compute":
            f, v = dataset.t["region_feats"], dataset.t["region_valid"]
            x = f[v].double()
            model.region.mean.fill_(float(x.mean()))
            model.region.std.fill_(float(x.std().clamp(min=1e-6)))
            log.info(
                "region feature normalisation from the training split: mean %.5f std %.5f",
                float(model.region.mean),
                float(model.region.std),
            )
        if cfg.loss.distill and dataset.teacher_w is None and (cfg.data.phrase_to_label_json or cfg.loss.soft_teacher):
            raise ConfigError("distillation requested but no teacher weights were built")

    # -- training
    def training_step(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, cfg: Wang21Config
    ) -> tuple[torch.Tensor, dict]:
        m = dist_utils.unwrap_model(model)
        lc = cfg.loss
        r, q = model(batch["region_feats"], batch["words"], batch["token_mask"])
        pmask, rmask = batch["train_valid"], batch["region_valid"]
        S, own = image_sentence_scores(r, q, pmask, rmask, m.scale())
        l_nce = nce_loss(S, batch["image_index"], lc.both_directions, lc.mask_same_image)
        loss = lc.nce_weight * l_nce
        with torch.no_grad():
            pos = S.diagonal()
            neg = S.masked_fill(torch.eye(S.shape[0], dtype=torch.bool, device=S.device), float("-inf")).amax(1)
        logs = {
            "nce": float(l_nce.detach()),
            "precision@1": float((pos > neg).float().mean()),
            "scale": float(m.scale().detach()),
        }
        if lc.distill and "teacher_w" in batch:
            idx = distill_neighbourhood(own, batch["region_boxes"], rmask, lc.k)
            valid_k = torch.gather(rmask[:, None, :].expand(-1, idx.shape[1], -1), 2, idx)
            t = teacher_scores(batch["region_logits"], batch["teacher_w"], idx)
            y = teacher_targets(
                t, lc.teacher_form, batch["region_logits"].shape[-1] - 1, lc.teacher_temperature, valid_k
            )
            dmask = pmask & (batch["teacher_w"].sum(-1) > 0)
            l_dis = distill_loss(own, idx, y, dmask, m.distill_scale(), valid_k)
            w = ramp_weight(step, lc.ramp_start, lc.ramp_every, lc.ramp_max)
            loss = loss + w * l_dis
            logs.update({"distill": float(l_dis.detach()), "ramp": w, "distilled_phrases": float(dmask.sum())})
        return loss, logs

    # -- evaluation
    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, dataset: Wang21Dataset | None, cfg: Wang21Config, device: torch.device
    ) -> dict[str, float]:
        """R@k over all (image, sentence) pairs (phrases with a GT box), the proposal upper bound, and
        (``eval.baselines``) the expected R@k of a random ranking and the teacher's own R@k."""
        if dataset is None:
            return {}
        m = dist_utils.unwrap_model(model)
        dataset.place(device)
        ec = cfg.eval
        mk = lambda: PhraseRecallAccumulator(ec.ks, ec.iou_threshold, ec.inclusive, ec.pixel_offset)  # noqa: E731
        acc, teacher_acc = mk(), mk()
        rand_hits = {k: 0.0 for k in ec.ks}
        n_teacher_eval = 0
        bs = max(1, cfg.train.eval_batch_size)
        n = len(dataset)
        # under DDP each rank takes every world-th batch; the integer counts are summed below
        for start in range(dist_utils.rank() * bs, n, dist_utils.world_size() * bs):
            b = dataset.get_batch(torch.arange(start, min(n, start + bs)))
            b = {k: v.to(device) for k, v in b.items()}
            sim = m.phrase_region_scores(b["region_feats"], b["words"], b["token_mask"]).float().cpu()
            boxes, valid_r, gt, ev = (b[k].cpu() for k in ("region_boxes", "region_valid", "gt_boxes", "eval_valid"))
            tsc = None
            if ec.baselines and "teacher_w" in b:
                tsc = torch.einsum("bnc,bpc->bpn", b["region_logits"].float().softmax(-1), b["teacher_w"].float()).cpu()
                mapped = (b["teacher_w"].sum(-1) > 0).cpu()
            for i in range(sim.shape[0]):
                vr, ei = valid_r[i], ev[i]
                if not bool(ei.any()):
                    continue
                props = boxes[i][vr]
                acc.update(sim[i][:, vr], props, gt[i], mask=ei)
                if ec.baselines:
                    hit = box_iou(gt[i][ei], props, ec.pixel_offset)
                    hit = hit >= ec.iou_threshold if ec.inclusive else hit > ec.iou_threshold
                    nprop, h = int(vr.sum()), hit.sum(1)
                    for k in ec.ks:
                        kk = min(k, nprop)
                        # P(no hit among a random k of nprop) = C(nprop - h, kk) / C(nprop, kk)
                        miss = torch.tensor([math.comb(nprop - int(x), kk) / math.comb(nprop, kk) for x in h.tolist()])
                        rand_hits[k] += float((1 - miss).sum())
                    if tsc is not None and bool((ei & mapped[i]).any()):
                        teacher_acc.update(tsc[i][:, vr], props, gt[i], mask=ei & mapped[i])
                        n_teacher_eval += int((ei & mapped[i]).sum())
        acc.all_reduce()
        if ec.baselines:
            teacher_acc.all_reduce()
            parts = dist_utils.all_gather_object((rand_hits, n_teacher_eval))
            rand_hits = {k: sum(p[0][k] for p in parts) for k in ec.ks}
            n_teacher_eval = sum(p[1] for p in parts)
        out = acc.compute()
        out["num_pairs"] = n
        if ec.baselines:
            for k in ec.ks:
                out[f"random_R@{k}"] = rand_hits[k] / max(out["num_phrases"], 1)
            if n_teacher_eval:
                t = teacher_acc.compute()
                out["teacher_R@1"] = t["R@1"]
                out["teacher_coverage"] = n_teacher_eval / out["num_phrases"]
        return to_percent(out)

    # -- CLI
    def add_cli_args(self, parser: Any, mode: str) -> None:
        """Flags of the official scripts (dashes or underscores)."""

        def add(name: str, help_: str) -> None:
            parser.add_argument(
                f"--{name}", f"--{name.replace('-', '_')}", dest=name.replace("-", "_"), default=None, help=help_
            )

        add("region-feat-path", "region HDF5 (train: training file or a {split} template; eval: the file to evaluate)")
        add("phrase-feat-path", "phrase HDF5 (same rules as --region-feat-path)")
        add("glove-path", f"GloVe HDF5 or {GLOVE_PACKAGE!r}")
        add(
            "phrase-to-label-json", "phrase -> detector class JSON (train: enables NCE+Distill; eval: teacher baseline)"
        )
        add("matching-matrix", "phrase x class matrix HDF5 (soft teacher)")
        add("class-names", "detector class names: file, label-map pbtxt or 'coco'")
        if mode == "train":
            add("val-region-feat-path", "validation region HDF5 (best-by-validation checkpoint)")
            add("val-phrase-feat-path", "validation phrase HDF5")
            add("test-region-feat-path", "test region HDF5 (evaluated with the best weights at the end)")
            add("test-phrase-feat-path", "test phrase HDF5")

    def cli_overrides(self, args: dict[str, Any], mode: str) -> dict[str, Any]:
        o: dict[str, Any] = {}
        simple = {
            "glove_path": "data.glove_path",
            "phrase_to_label_json": "data.phrase_to_label_json",
            "matching_matrix": "data.matching_matrix_path",
            "class_names": "data.class_names",
        }
        for k, key in simple.items():
            if args.get(k):
                o[key] = args[k]
        reg, phr = args.get("region_feat_path"), args.get("phrase_feat_path")
        if mode == "eval":
            if reg:
                o["data.eval_region_feat_path"] = reg
            if phr:
                o["data.eval_phrase_feat_path"] = phr
            return o
        for k in ("val_region_feat_path", "val_phrase_feat_path", "test_region_feat_path", "test_phrase_feat_path"):
            if args.get(k):
                o[f"data.{k}"] = args[k]
        if reg:
            o["data.region_feat_path"] = reg
        if phr:
            o["data.phrase_feat_path"] = phr
        if reg and "{split}" not in reg:
            # training files given on the command line: validate/test only on files also given there
            if not args.get("val_region_feat_path"):
                o["train.val_split"] = ""
        return o

    def predictor(self, run: str | Path, device: str = "cpu", **options: Any) -> Predictor:
        """A :class:`~groundkit.methods.wang21.predict.Wang21Predictor` (``glove_path=`` replaces the run's word vectors)."""
        return Wang21Predictor(run, device=device, **options)

    def demo_figures(self, run: str | Path, out_dir: Path, n: int = 4) -> list[Figure]:
        """``n`` test images with, per phrase, the true box and the top-ranked proposal (see :mod:`.visualize`)."""
        from .visualize import phrase_figures  # noqa: PLC0415 (drawing is only needed by the demo report)

        return phrase_figures(run, out_dir, n)

    def format_eval(self, metrics: dict[str, float], split: str) -> str:
        """The README's table (percent), plus the proposal upper bound and the baselines."""
        if not metrics:
            return f"{split}: no files to evaluate"
        ks = [k for k in (1, 5, 10) if f"R@{k}" in metrics]
        head = "| split (%) | " + " | ".join(f"R@{k}" for k in ks) + " | upper bound |"
        rows = [head, "|" + "---|" * (len(ks) + 2)]
        rows.append(
            f"| {split} | " + " | ".join(f"{metrics[f'R@{k}']:.2f}" for k in ks) + f" | {metrics['upper_bound']:.2f} |"
        )
        if f"random_R@{ks[0]}" in metrics:
            rows.append("| random ranking | " + " | ".join(f"{metrics[f'random_R@{k}']:.2f}" for k in ks) + " | |")
        extra = f"{int(metrics.get('num_phrases', 0))} phrases with a box in {int(metrics.get('num_pairs', 0))} (image, sentence) pairs"
        if "teacher_R@1" in metrics:
            cov = metrics["teacher_coverage"]
            extra += f"; detector teacher alone R@1 {metrics['teacher_R@1']:.2f} on the {cov:.1f}% of phrases it maps"
        return "\n".join(rows) + "\n" + extra


METHOD = Wang21Method()
