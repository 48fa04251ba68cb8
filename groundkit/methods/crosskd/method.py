"""Cross-modal retrieval with knowledge distillation (Tran et al., ACCV 2022) on Collaborative Experts.

The method glue: CENet construction from the store's experts, the training step (max-margin ranking,
TeachText distillation, caption-caption similarity distilled into caption-video similarity), and
evaluation (t2v / v2t R@1/5/10/50, MdR, MnR with the CE tie rule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...distributed import unwrap_model
from ...formats.collaborative_experts import FeatureError, load_pickle
from ...metrics import t2v_metrics, v2t_metrics
from ..base import Figure, Method
from .config import CrossKDConfig
from .data import RetrievalEvalSet, RetrievalTrainSet, _root, batch_spec, layout_paths, open_store, text_dim
from .model import (
    CENet,
    CENetConfig,
    encode_all,
    max_margin_ranking_loss,
    rank_distil_loss,
    similarity_matrix,
    teacher_similarity,
    teachtext_loss,
)

__all__ = ["CrossKDMethod", "METHOD", "encode_all", "similarity_matrix"]


# ----------------------------------------------------------------------------- the method


class CrossKDMethod(Method):
    name = "crosskd"
    config_class = CrossKDConfig
    default_config = "synth_cecap"
    summary = (
        "text-video retrieval: Collaborative Experts with cross-modal caption distillation (Tran et al., ACCV 2022)"
    )
    world_task = "retrieval"
    commands = {
        "data": {
            "extract-experts": "groundkit.methods.crosskd.extract:register_extract",
            "convert-experts": "groundkit.methods.crosskd.extract:register_convert",
        },
        "bench": {"crosskd": "groundkit.bench.crosskd:register"},
        "predict": {"retrieval": "groundkit.methods.crosskd.predict:register_predict"},
    }

    def predictor(self, run: str | Path, device: str = "cpu", **options: Any) -> Any:
        """A :class:`~groundkit.methods.crosskd.predict.Retriever` over the run's test videos
        (``store=``, ``split=`` choose another collection)."""
        from .predict import Retriever  # noqa: PLC0415 (predict imports this module)

        return Retriever.from_checkpoint(run, device=device, **options)

    def demo_figures(self, run: str | Path, out_dir: Path, n: int = 4) -> list[Figure]:
        """``n`` test captions as queries with their top-5 videos (see :mod:`.visualize`)."""
        from .visualize import retrieval_figures  # noqa: PLC0415 (drawing is only needed by the demo report)

        return retrieval_figures(run, out_dir, n)

    def build_model(self, cfg: CrossKDConfig) -> CENet:
        store = open_store(cfg)
        paths = layout_paths(cfg)
        dims = {m: store.experts[m]["dim"] for m in paths["experts"]}
        clusters = dict(cfg.model.vlad_clusters)
        for m in paths["experts"]:
            if store.experts[m]["kind"] == "ragged" and m not in clusters:
                raise FeatureError(f"expert {m!r} is variable-length: give it NetVLAD clusters in model.vlad_clusters")
        clusters = {k: v for k, v in clusters.items() if k == "text" or k in dims}
        return CENet(
            CENetConfig(
                expert_dims=dims,
                vlad_clusters=clusters,
                ghost_clusters=cfg.model.ghost_clusters,
                text_dim=text_dim(cfg, store),
                shared_dim=cfg.model.shared_dim,
                num_g_layers=cfg.model.num_g_layers,
                use_mish=cfg.model.use_mish,
                use_bn_reason=cfg.model.use_bn_reason,
                include_self=cfg.model.include_self,
                vlad_use_mask=cfg.model.vlad_use_mask,
                gating=cfg.model.gating,
                pair_bn=cfg.model.pair_bn,
            )
        )

    def has_split(self, cfg: CrossKDConfig, split: str) -> bool:
        return split in ("train", "val", "test")

    def data_source(self, cfg: CrossKDConfig, split: str) -> dict[str, Any]:
        d = cfg.data
        split_list = layout_paths(cfg)["splits"].get(split)
        return {"split": split, "split_list": split_list, "root": d.root, "store": d.store, "world": cfg.world.size}

    def build_dataset(self, cfg: CrossKDConfig, split: str) -> RetrievalTrainSet | RetrievalEvalSet:
        store = open_store(cfg)
        paths = layout_paths(cfg)
        if split not in paths["splits"]:
            raise FeatureError(f"unknown split {split!r}; choose from {sorted(paths['splits'])}")
        ids = store.split(Path(paths["splits"][split]).stem)
        spec = batch_spec(cfg, store)
        if split == "train":
            return RetrievalTrainSet(store, ids, spec, seed=cfg.train.seed)
        cap_idx = None
        if split == "test" and paths["caption_index"]:
            root = _root(cfg)
            cap_idx = load_pickle(root / paths["caption_index"])
        return RetrievalEvalSet(store, ids, spec, cfg.data.num_test_captions, cap_idx)

    def training_step(
        self, model: torch.nn.Module, batch: dict, step: int, cfg: CrossKDConfig
    ) -> tuple[torch.Tensor, dict]:
        if batch["text"].shape[0] < 2:  # no negatives (and BatchNorm needs two samples): skip the step
            return sum(p.sum() * 0.0 for p in model.parameters()), {}
        lc = cfg.loss
        caption_kd = lc.caption_kd and lc.cap_w > 0
        # build only the matrices the loss uses (the one-hot control needs no caption-caption matrix)
        out = model(batch, text_sims=caption_kd and lc.kd_target == "captions", video_sims=lc.vid_w > 0)
        S = out["sims"].float()
        l_rank = max_margin_ranking_loss(S, lc.margin)
        loss, logs = l_rank, {"loss_rank": float(l_rank.detach())}
        if lc.distil:
            T = teacher_similarity(batch["teacher_text"].float(), batch["teacher_video"].float())
            l_tt = teachtext_loss(S, T)
            loss = loss + lc.distil_weight * l_tt
            logs["loss_teachtext"] = float(l_tt.detach())
        if caption_kd:
            if lc.kd_target == "identity":  # control: same loss with one-hot targets, no caption-caption grades
                C = torch.eye(len(S), device=S.device, dtype=S.dtype) * 1e4 * lc.cap_t
            else:
                C = out["text_sims"].float()
            l_cap = rank_distil_loss(S, C, lc.cap_t, lc.detach_target)
            loss = loss + lc.cap_w * l_cap
            logs["loss_caption_kd"] = float(l_cap.detach())
        if lc.vid_w > 0:
            l_vid = rank_distil_loss(S.T, out["video_sims"].float(), lc.vid_t, lc.detach_target)
            loss = loss + lc.vid_w * l_vid
            logs["loss_video_kd"] = float(l_vid.detach())
        return loss, logs

    @torch.no_grad()
    def evaluate(
        self, model: torch.nn.Module, dataset: RetrievalEvalSet, cfg: CrossKDConfig, device: torch.device
    ) -> dict[str, float]:
        model = unwrap_model(model)
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
                f"  [{p}] R@1: {metrics[p + '_R1']:.2f}, R@5: {metrics[p + '_R5']:.2f}, R@10: {metrics[p + '_R10']:.2f}, "
                f"R@50: {metrics[p + '_R50']:.2f}, MdR: {metrics[p + '_MedR']:.2f}, MnR: {metrics[p + '_MeanR']:.2f}, "
                f"geometric_mean_R1-R5-R10: {metrics[p + '_geometric_mean_R1-R5-R10']:.2f}"
            )
        return "\n".join(lines)


METHOD = CrossKDMethod()
