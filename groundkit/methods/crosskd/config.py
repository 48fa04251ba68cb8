"""crosskd config: the released Collaborative Experts / CrossKD settings as typed fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import DataConfig, ExperimentConfig, OptimConfig, SchedConfig, TrainConfig

__all__ = ["CrossKDData", "CrossKDModel", "CrossKDLoss", "CrossKDOptim", "CrossKDConfig"]


@dataclass
class CrossKDData(DataConfig):
    """Where the features are and how queries are built."""

    dataset: Literal["msrvtt", "msvd", "didemo", "activity-net"] = "msrvtt"  # released layout (paths, split lists)
    root: str = ""  # released-layout directory (e.g. data/MSRVTT/high-quality/structured-symlinks)
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
    # collaborative gating, reference = the official code (see groundkit.methods.crosskd.model):
    gating: Literal["sequential", "parallel"] = "sequential"  # "parallel": the paper's formula (ungated pairs)
    pair_bn: Literal["per_pair", "pooled"] = "per_pair"  # BatchNorm statistics of the pair MLP


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
    kd_target: Literal["captions", "identity"] = (
        "captions"  # "identity": one-hot targets (InfoNCE), an ablation control
    )


@dataclass
class CrossKDOptim(OptimConfig):
    """The shared optimizer section plus the weight-decay form of RAdam (``groundkit.optim.RAdam``)."""

    name: Literal["adam", "adamw", "radam", "rmsprop", "sgd"] = "radam"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    # reference: the official RAdam decays the weights (p -= lr * wd * p); false: wd * p added to the gradient
    decoupled_weight_decay: bool = True


def _optim() -> CrossKDOptim:
    return CrossKDOptim()


def _sched() -> SchedConfig:
    return SchedConfig(name="step", interval="epoch", step_size=1, gamma=0.95)


def _train() -> TrainConfig:
    return TrainConfig(
        epochs=100,
        batch_size=64,
        eval_batch_size=256,
        best_metric="t2v_geometric_mean_R1-R5-R10",
        best_mode="max",
        output_dir="runs/crosskd",
        log_every=20,
    )


@dataclass
class CrossKDConfig(ExperimentConfig):
    data: CrossKDData = field(default_factory=CrossKDData)
    model: CrossKDModel = field(default_factory=CrossKDModel)
    loss: CrossKDLoss = field(default_factory=CrossKDLoss)
    optim: CrossKDOptim = field(default_factory=_optim)
    sched: SchedConfig = field(default_factory=_sched)
    train: TrainConfig = field(default_factory=_train)
