"""CrossKD (Tran et al., ACCV 2022) on Collaborative Experts / TeachText: configs, data, losses, evaluation.

``cecap``: CE+ with caption distillation, ``L = L_rank + cap_w KD_tau(S, C)``;
``ttcap``: TeachText-CE+ with caption distillation, ``L = L_rank + L_TT + cap_w KD_tau(S, C)``.
Setting ``loss.caption_kd=false`` gives plain CE+ / TeachText-CE+. Evaluation encodes videos and
captions in mini-batches, computes the availability-renormalised similarity in query chunks on
the model's device and reports Collaborative Experts t2v/v2t metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import ExperimentConfig, OptimConfig, SchedConfig, TrainConfig
from ..data.crosskd import (
    DATASET_LAYOUTS,
    BatchSpec,
    ExpertStore,
    FeatureError,
    RetrievalEvalSet,
    RetrievalTrainSet,
    convert_released,
    load_pickle,
)
from ..models.cenet import (
    CENet,
    CENetConfig,
    max_margin_ranking_loss,
    moe_similarity,
    rank_distil_loss,
    teacher_similarity,
    teachtext_loss,
)

__all__ = ["CrossKDData", "CrossKDModel", "CrossKDLoss", "CrossKDConfig", "CrossKDMethod", "METHOD", "open_store", "encode_all", "similarity_matrix"]


@dataclass
class CrossKDData:
    """Where the features are and how queries are built."""

    dataset: Literal["msrvtt", "msvd", "didemo", "activity-net"] = "msrvtt"  # released layout (paths, split lists)
    root: str = ""  # released-layout directory (e.g. data/MSRVTT/high-quality/structured-symlinks)
    synth_size: str = ""  # tiny|small|medium|large: use the built-in world (generated/cached) as root
    synth_seed: int = 0
    store: str = ""  # converted store directory ("" = <root>.store beside the root)
    split_set: str = "full"  # split family of the layout (msrvtt: full | 1k-A | 1k-B)
    experts: dict[str, str] = field(default_factory=dict)  # name -> path under root ({} = the layout's CrossKD experts)
    expert_dims: dict[str, int] = field(default_factory=dict)  # checked against the files when given
    text_feat: str = "gpt2-xl-finetune"
    text_path: str = ""  # path under root ("" = the layout's file for text_feat)
    text_dim: int = 0  # checked when > 0
    teachers: dict[str, str] = field(default_factory=dict)  # name -> path ({} = the layout's three TeachText teachers)
    max_tokens: dict[str, int] = field(default_factory=lambda: {"text": 37, "audio": 29, "speech": 32})
    fuse_captions: bool = False  # DiDeMo / ActivityNet paragraph queries
    num_test_captions: int = 20
    missing_ids: Literal["error", "nan"] = "error"  # a video absent from an expert pickle


@dataclass
class CrossKDModel:
    """CENet architecture (defaults: the CrossKD MSRVTT configs)."""

    vlad_clusters: dict[str, int] = field(default_factory=lambda: {"text": 28, "audio": 8, "speech": 19})
    ghost_clusters: int = 1
    shared_dim: int = 768
    num_g_layers: int = 3
    use_mish: bool = True
    use_bn_reason: bool = True
    include_self: bool = True
    vlad_use_mask: bool = False  # reference: NetVLAD ignores the token mask


@dataclass
class CrossKDLoss:
    margin: float = 0.09381161988446174
    distil: bool = False  # TeachText SmoothL1 distillation (ttcap)
    distil_weight: float = 1.0
    caption_kd: bool = True  # CrossKD caption distillation (cecap / ttcap)
    cap_w: float = 1.0
    cap_t: float = 5.0
    vid_w: float = 0.0  # the optional video-side term (0 in every released config)
    vid_t: float = 5.0
    detach_target: bool = False  # reference: the caption-caption target is not detached
    kd_target: Literal["captions", "identity"] = "captions"  # "identity": one-hot targets (InfoNCE), an ablation control


def _optim() -> OptimConfig:
    return OptimConfig(name="radam", lr=1e-3, weight_decay=1e-5)


def _sched() -> SchedConfig:
    return SchedConfig(name="step", interval="epoch", step_size=1, gamma=0.95)


def _train() -> TrainConfig:
    return TrainConfig(epochs=100, batch_size=64, eval_batch_size=256, best_metric="t2v_geometric_mean_R1-R5-R10", best_mode="max",
                       output_dir="runs/crosskd", log_every=20)


@dataclass
class CrossKDConfig(ExperimentConfig):
    data: CrossKDData = field(default_factory=CrossKDData)
    model: CrossKDModel = field(default_factory=CrossKDModel)
    loss: CrossKDLoss = field(default_factory=CrossKDLoss)
    optim: OptimConfig = field(default_factory=_optim)
    sched: SchedConfig = field(default_factory=_sched)
    train: TrainConfig = field(default_factory=_train)


# ----------------------------------------------------------------------------- store resolution


def _root(cfg: CrossKDConfig) -> Path:
    d = cfg.data
    if d.synth_size:
        from ..data.synth import generate

        return Path(generate("retrieval", size=d.synth_size, seed=d.synth_seed, progress=False))
    if not d.root:
        raise FeatureError("data.root is empty: point it at the released feature directory (or set data.synth_size)")
    root = Path(d.root).expanduser()
    if not root.is_dir():
        raise FeatureError(f"data.root {root} is not a directory")
    return root


def _layout_paths(cfg: CrossKDConfig) -> dict[str, Any]:
    d = cfg.data
    lay = DATASET_LAYOUTS[d.dataset]
    experts = dict(d.experts) if d.experts else dict(lay["experts"])
    text = d.text_path or lay["text_feats"].get(d.text_feat, f"aggregated_text_feats/{d.text_feat}.pkl")
    teachers = dict(d.teachers) if d.teachers else dict(lay["teachers"])
    if d.split_set not in lay["splits"]:
        raise FeatureError(f"data.split_set {d.split_set!r} unknown for {d.dataset}; choose from {sorted(lay['splits'])}")
    return {"experts": experts, "text": {d.text_feat: text}, "teachers": teachers, "splits": lay["splits"][d.split_set],
            "raw_captions": lay["raw_captions"], "strip_suffix": lay.get("strip_suffix", False),
            "caption_index": lay.get("test_caption_index", {}).get(d.split_set)}


def _source_stamp(root: Path) -> str:
    man = root / "manifest.json"
    return hashlib.sha256(man.read_bytes()).hexdigest()[:16] if man.is_file() else ""


_STORES: dict[str, ExpertStore] = {}


def open_store(cfg: CrossKDConfig, need_teachers: bool | None = None) -> ExpertStore:
    """The feature store for ``cfg``: ``data.store`` if it exists, else converted (once, atomically)
    from the released files under ``data.root`` (or the built-in world) to ``data.store`` / ``<root>.store``."""
    paths = _layout_paths(cfg)
    need_teachers = cfg.loss.distil if need_teachers is None else need_teachers
    given = Path(cfg.data.store).expanduser() if cfg.data.store else None
    root = None
    if given is not None and (given / "meta.json").is_file() and not (cfg.data.root or cfg.data.synth_size):
        store_dir, stamp = given, None  # a store on its own (e.g. from extract-experts)
    else:
        root = _root(cfg)
        store_dir = given or root.parent / (root.name + ".store")
        stamp = _source_stamp(root)
    key = str(store_dir.resolve())
    st = _STORES.get(key)
    if st is None and (store_dir / "meta.json").is_file():
        st = ExpertStore(store_dir)
        if stamp and st.meta["info"].get("stamp") != stamp:  # the world was rebuilt: reconvert
            st = None
    missing = st is not None and root is not None and (
        any(m not in st.experts for m in paths["experts"]) or cfg.data.text_feat not in st.meta["text"]
        or (need_teachers and any(t not in st.meta["teachers"] for t in paths["teachers"]))
    )
    if root is not None and (st is None or missing):
        tmp = store_dir.parent / f".{store_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        teachers = {k: v for k, v in paths["teachers"].items() if need_teachers or (root / v).is_file()}
        split_files = {}
        for fam in DATASET_LAYOUTS[cfg.data.dataset]["splits"].values():
            for rel in fam.values():
                if (root / rel).is_file() or rel in paths["splits"].values():
                    split_files[Path(rel).stem] = rel
        convert_released(root, tmp, paths["experts"], paths["text"], split_files, paths["raw_captions"], teachers,
                         cfg.data.expert_dims, cfg.data.text_dim or None, paths["strip_suffix"], cfg.data.missing_ids)
        meta = json.loads((tmp / "meta.json").read_text())
        meta["info"]["stamp"] = stamp
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = store_dir.parent / f".{store_dir.name}.old-{os.getpid()}"
        if store_dir.exists():
            os.replace(store_dir, old)
        try:
            os.replace(tmp, store_dir)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        st = ExpertStore(store_dir)
    for m in paths["experts"]:
        st.check_expert(m, cfg.data.expert_dims.get(m))
    if cfg.data.text_feat in st.meta["text"]:
        d = st.meta["text"][cfg.data.text_feat]["dim"]
        if cfg.data.text_dim and d != cfg.data.text_dim:
            raise FeatureError(f"text features {cfg.data.text_feat!r} have dim {d}, config says {cfg.data.text_dim}")
    _STORES[key] = st
    return st


def _spec(cfg: CrossKDConfig, store: ExpertStore) -> BatchSpec:
    paths = _layout_paths(cfg)
    return BatchSpec(experts=sorted(paths["experts"]), text=cfg.data.text_feat, max_tokens=dict(cfg.data.max_tokens),
                     teachers=sorted(paths["teachers"]) if cfg.loss.distil else [], fuse_captions=cfg.data.fuse_captions)


def _text_dim(cfg: CrossKDConfig, store: ExpertStore) -> int:
    if cfg.data.text_feat in store.meta["text"]:
        return int(store.meta["text"][cfg.data.text_feat]["dim"])
    if cfg.data.text_dim > 0:
        return cfg.data.text_dim
    raise FeatureError(f"store {store.root} has no text features {cfg.data.text_feat!r} (has {sorted(store.meta['text'])}); "
                       "set data.text_dim to build the model without them")


# ----------------------------------------------------------------------------- encode + similarity


@torch.no_grad()
def encode_all(model: CENet, ds: RetrievalEvalSet, device: torch.device, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(video embeddings [V, M, d], availability [V, M]) of every video of ``ds``."""
    embs, avails = [], []
    for s in range(0, len(ds), batch_size):
        b = ds.video_batch(s, min(len(ds), s + batch_size))
        b = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device)) for k, v in b.items()}
        embs.append(model.encode_video(b["experts"], b["avail"], b["expert_masks"]).float())
        avails.append(b["avail"])
    return torch.cat(embs), torch.cat(avails)


@torch.no_grad()
def similarity_matrix(model: CENet, ds: RetrievalEvalSet, device: torch.device, batch_size: int = 256) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- the method


class CrossKDMethod:
    name = "crosskd"
    config_class = CrossKDConfig
    default_config = "synth_cecap"

    def build_model(self, cfg: CrossKDConfig) -> CENet:
        store = open_store(cfg)
        paths = _layout_paths(cfg)
        dims = {m: store.experts[m]["dim"] for m in paths["experts"]}
        clusters = dict(cfg.model.vlad_clusters)
        for m in paths["experts"]:
            if store.experts[m]["kind"] == "ragged" and m not in clusters:
                raise FeatureError(f"expert {m!r} is variable-length: give it NetVLAD clusters in model.vlad_clusters")
        clusters = {k: v for k, v in clusters.items() if k == "text" or k in dims}
        return CENet(CENetConfig(
            expert_dims=dims, vlad_clusters=clusters, ghost_clusters=cfg.model.ghost_clusters,
            text_dim=_text_dim(cfg, store), shared_dim=cfg.model.shared_dim,
            num_g_layers=cfg.model.num_g_layers, use_mish=cfg.model.use_mish, use_bn_reason=cfg.model.use_bn_reason,
            include_self=cfg.model.include_self, vlad_use_mask=cfg.model.vlad_use_mask,
        ))

    def has_split(self, cfg: CrossKDConfig, split: str) -> bool:
        return split in ("train", "val", "test")

    def build_dataset(self, cfg: CrossKDConfig, split: str) -> RetrievalTrainSet | RetrievalEvalSet:
        store = open_store(cfg)
        paths = _layout_paths(cfg)
        if split not in paths["splits"]:
            raise FeatureError(f"unknown split {split!r}; choose from {sorted(paths['splits'])}")
        ids = store.split(Path(paths["splits"][split]).stem)
        spec = _spec(cfg, store)
        if split == "train":
            return RetrievalTrainSet(store, ids, spec, seed=cfg.train.seed)
        cap_idx = None
        if split == "test" and paths["caption_index"]:
            root = _root(cfg)
            cap_idx = load_pickle(root / paths["caption_index"])
        return RetrievalEvalSet(store, ids, spec, cfg.data.num_test_captions, cap_idx)

    def training_step(self, model: torch.nn.Module, batch: dict, step: int, cfg: CrossKDConfig) -> tuple[torch.Tensor, dict]:
        if batch["text"].shape[0] < 2:  # no negatives (and BatchNorm needs two samples): skip the step
            return sum(p.sum() * 0.0 for p in model.parameters()), {}
        out = model(batch)
        S = out["sims"].float()
        lc = cfg.loss
        l_rank = max_margin_ranking_loss(S, lc.margin)
        loss, logs = l_rank, {"loss_rank": float(l_rank.detach())}
        if lc.distil:
            T = teacher_similarity(batch["teacher_text"].float(), batch["teacher_video"].float())
            l_tt = teachtext_loss(S, T)
            loss = loss + lc.distil_weight * l_tt
            logs["loss_teachtext"] = float(l_tt.detach())
        if lc.caption_kd and lc.cap_w > 0:
            C = out["text_sims"].float()
            if lc.kd_target == "identity":  # control: same loss with one-hot targets, no caption-caption grades
                C = torch.eye(len(C), device=C.device, dtype=C.dtype) * 1e4 * lc.cap_t
            l_cap = rank_distil_loss(S, C, lc.cap_t, lc.detach_target)
            loss = loss + lc.cap_w * l_cap
            logs["loss_caption_kd"] = float(l_cap.detach())
        if lc.vid_w > 0:
            l_vid = rank_distil_loss(S.T, out["video_sims"].float(), lc.vid_t, lc.detach_target)
            loss = loss + lc.vid_w * l_vid
            logs["loss_video_kd"] = float(l_vid.detach())
        return loss, logs

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, dataset: RetrievalEvalSet, cfg: CrossKDConfig, device: torch.device) -> dict[str, float]:
        from ..metrics import t2v_metrics, v2t_metrics

        model = getattr(model, "module", model)
        sims = similarity_matrix(model, dataset, device, cfg.train.eval_batch_size)
        qm = dataset.query_masks
        out = {}
        for prefix, fn in (("t2v", t2v_metrics), ("v2t", v2t_metrics)):
            for k, v in fn(sims, qm).items():
                out[f"{prefix}_{k}"] = float(v)
        out["num_videos"] = float(len(dataset))
        out["num_queries"] = float(qm.sum())
        return out

    def format_eval(self, metrics: dict[str, float], split: str) -> str:
        lines = [f"{split}: {int(metrics.get('num_videos', 0))} videos, {int(metrics.get('num_queries', 0))} queries"]
        for p in ("t2v", "v2t"):
            lines.append(
                f"  [{p}] R@1: {metrics[p + '_R1']:.1f}, R@5: {metrics[p + '_R5']:.1f}, R@10: {metrics[p + '_R10']:.1f}, "
                f"R@50: {metrics[p + '_R50']:.1f}, MdR: {metrics[p + '_MedR']:.1f}, MnR: {metrics[p + '_MeanR']:.1f}, "
                f"geometric_mean_R1-R5-R10: {metrics[p + '_geometric_mean_R1-R5-R10']:.2f}"
            )
        return "\n".join(lines)


METHOD = CrossKDMethod()


# ----------------------------------------------------------------------------- several seeds


def seed_summary(run_dirs: list[str | Path], keys: tuple[str, ...] = ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_R50", "t2v_MedR", "t2v_MeanR",
                                                                          "v2t_R1", "v2t_R5", "v2t_R10")) -> dict[str, tuple[float, float, int]]:
    """Mean and sample standard deviation over runs (their ``metrics.json``), as the CE/TeachText tables report."""
    rows = []
    for d in run_dirs:
        p = Path(d) / "metrics.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no metrics.json (run not finished?)")
        rows.append(json.loads(p.read_text())["metrics"])
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=np.float64)
        out[k] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v))
    return out


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m groundkit.methods.crosskd", description="summaries of CrossKD runs")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="mean (std) over seeds of the runs' metrics.json")
    s.add_argument("runs", nargs="+")
    a = p.parse_args(argv)
    summ = seed_summary(a.runs)
    n = next(iter(summ.values()))[2]
    print(f"{n} runs: " + "  ".join(f"{k} {m:.2f} ({sd:.2f})" for k, (m, sd, _) in summ.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
