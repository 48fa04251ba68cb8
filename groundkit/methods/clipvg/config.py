"""Typed config of CLIP-VG: data / model / loss / eval sections plus the shared optim, sched, train.

Defaults are the official code's (the rule of every method, docs/architecture.md): ViT-B/16, 224 letterbox, 6
fusion layers of width 512, AdamW, weight decay 1e-4, cosine per epoch, batch 64 per GPU, and every official quirk;
each groundkit fix or extension is a switch whose default is the official side (``configs/improved.yaml`` and
``world_cpu.yaml`` turn the fixes on). Speed switches (SDPA, feature caching) change nothing beyond float rounding
and are on.

Learning rate and batch size (one GPU / CPU): the official runs use a global batch of 384
(6 GPUs x 64) at lr 2.5e-4; with another global batch ``B`` use ``lr = 2.5e-4 * sqrt(B / 384)``
(:func:`scaled_lr`; square-root scaling for AdamW), i.e. 1.0e-4 for one GPU at batch 64. The
official code run on one GPU with the 384-batch lr does not learn (CLIP-VG issue #9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ...config import DataConfig, ExperimentConfig, OptimConfig, SchedConfig, TrainConfig

__all__ = [
    "ClipVGData",
    "ClipVGModel",
    "ClipVGLoss",
    "ClipVGEval",
    "ClipVGConfig",
    "scaled_lr",
    "OFFICIAL_LR",
    "OFFICIAL_BATCH",
    "DIRECTION_WORDS",
]

OFFICIAL_LR = 2.5e-4
OFFICIAL_BATCH = 384
#: the official pipeline never crops a sample whose text holds one of these words
DIRECTION_WORDS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")


def scaled_lr(batch_size: int, base_lr: float = OFFICIAL_LR, base_batch: int = OFFICIAL_BATCH) -> float:
    """The documented rule: ``base_lr * sqrt(batch_size / base_batch)``."""
    return base_lr * math.sqrt(batch_size / base_batch)


@dataclass
class ClipVGData(DataConfig):
    """Where the TransVG-style ``.pth`` lists and the images are, and the image/text pipeline."""

    # the built-in pseudo world (world.size: tiny|small|medium) fills the paths below (groundkit.world.resolve_world),
    # unless split_root / image_root name data of one's own (then no world is built)
    split_root: str = ""  # <split_root>/<dataset>/<dataset>_<split>.pth
    image_root: str = ""  # folder holding the images the lists name
    dataset: Literal["unc", "unc+", "gref", "gref_umd", "referit", "flickr"] = "unc"
    supervision: Literal["pseudo", "full"] = "pseudo"  # train on <ds>_train_pseudo.pth or <ds>_train.pth
    train_file: str = ""  # a .pth list to train on instead (e.g. a curriculum selection)
    train_subset: str = ""  # a file of sample indices into the training list (one per line, or .npy / .json)
    imsize: int = 224  # letterbox canvas side
    max_query_len: int = 77  # text tokens (CLIP: 77 with start/end tokens)
    prompt: str = "{pseudo_query}"  # e.g. "find the region that corresponds to the description {pseudo_query}"
    lowercase: bool = True
    truncate_boxes: bool = True  # official: np.array(bbox, dtype=int) before xywh -> xyxy; false = float boxes
    allow_pickle: bool = False  # .pth lists holding numpy objects (trusted files only)
    augment: bool = True  # official training augmentation (no flip; no crop with direction words)
    aug_scales: list[int] = field(default_factory=lambda: [224 - 32 * i for i in range(7)])
    aug_crop_prob: float = 0.5  # chance of the resize-crop branch (never with direction words)
    aug_crop_resize: list[int] = field(default_factory=lambda: [400, 500, 600])  # short side before cropping
    aug_crop_size: tuple[int, int] = (384, 600)  # min / max crop side
    # "official": the official crop (20 tries, accepted when cx > top and cy > left, the box cut to the crop) and
    # substring matching of left/right/top/bottom/middle ("bright" and "laptop" then block the crop); "keep_box"
    # (fixed): the crop always holds the box, direction words matched as whole words
    aug_crop_rule: Literal["keep_box", "official"] = "official"
    color_jitter: float = 0.4  # brightness / contrast / saturation strength
    color_jitter_prob: float = 0.8
    aug_translate: bool = True  # random letterbox offset in training
    # not official (its training never flips): mirror a training sample with this probability, "left" / "right"
    # swapped in its text; works with cached features (the mirrored canvas is encoded once more)
    flip: float = 0.0
    # a COCO-like instances.json (RefCOCO's refer folder has one) listing every annotated object of the images: the
    # trivial baselines pick among those; "" = among the boxes the split's expressions refer to
    instances_file: str = ""
    cache_features: bool = True  # cache the frozen encoders' outputs (used only where the pipeline is deterministic)
    cache_dir: str = ""  # "" = $GROUNDKIT_FEATURE_CACHE or ~/.cache/groundkit-features, under clipvg/


@dataclass
class ClipVGModel:
    encoder: Literal["clip", "effnet_minilm"] = "clip"
    clip_name: str = "ViT-B-16"  # any open_clip ViT
    clip_checkpoint: str = ""  # local weights file; "" = random weights (allowed only with allow_random_encoders)
    # auto: QuickGELU for OpenAI's weights (TorchScript archives, CLIP-VG checkpoints) and *-quickgelu names
    clip_activation: Literal["auto", "gelu", "quick_gelu"] = "auto"
    clip_levels: list[int] = field(default_factory=lambda: [0, 3, 7, 11])  # ViT-L/14: [0, 7, 15, 23]
    allow_random_encoders: bool = False  # random CLIP weights, for tests and timing
    pretrained: bool = True  # effnet_minilm: the packaged weights (False: random, tests)
    text_model: str = ""  # effnet_minilm: a local Hugging Face folder instead of the packaged MiniLM
    grid: int = 7  # effnet_minilm: image tokens are 1 + grid**2
    effnet_stages: list[str] = field(default_factory=lambda: ["s8", "s16", "s32", "head"])  # concatenated levels
    d_model: int = 512
    nhead: int = 8
    num_layers: int = 6
    dim_ff: int = 2048
    dropout: float = 0.1
    head_layers: int = 3  # layers of the [REG] box MLP
    sdpa: bool = True  # fused scaled-dot-product attention (False: the explicit softmax of the official code)
    # auto: bf16 on CUDA, fp32 on CPU; official: fp16 on CUDA (clip.load's conversion), fp32 on CPU
    encoder_precision: Literal["auto", "official", "fp32", "bf16", "fp16"] = "official"
    normalize: Literal["encoder", "imagenet"] = "imagenet"  # official: ImageNet mean/std in front of CLIP (fixed: the
    # encoder's own)
    # official: CLIP's visual positional embedding keeps training (so its image features cannot be cached)
    trainable_pos_embed: bool = True
    # which image tokens are padding: "bilinear" (official: the pixel mask resized bilinearly to the grid and
    # rounded, about each patch's centre) or "nearest" (each patch's top-left pixel)
    image_mask: Literal["nearest", "bilinear"] = "bilinear"
    # fusion attention init: "official" (nn.MultiheadAttention in the official encoder: one Xavier over the stacked
    # [3D, D] in_proj, zero in_proj and out_proj biases) or "xavier" (per q/k/v projection, default biases)
    attn_init: Literal["xavier", "official"] = "official"
    # beyond the official model (off by default; see docs/clipvg.md, Model)
    feat_norm: bool = False  # LayerNorm on each image level and on the text tokens before the projections
    pos_init: Literal["random", "sine"] = "random"  # sine: image rows of the position embedding start as 2-D sine
    pos_input: bool = False  # also add the position embedding to the fusion input (values carry positions)
    token_head: bool = False  # a score per fused grid token, trained to point at the object (loss.token_weight)
    # box centre = the tokens' softmax-weighted cell centre + a [REG] offset (implies token_head)
    token_centre: bool = False
    # every grid token regresses its object's box; the box is the best token's neighbourhood's (implies token_head,
    # replaces token_centre and the [REG] head; loss.token_weight also weighs the tokens' box L1)
    token_box: bool = False


@dataclass
class ClipVGLoss:
    l1_weight: float = 1.0
    giou_weight: float = 1.0
    token_weight: float = 1.0  # with model.token_head: cross-entropy of the grid tokens against the box's cells


@dataclass
class ClipVGEval:
    iou_threshold: float = 0.5
    # random / largest / most central referred object of the image (metrics random_object, largest_object,
    # centre_object), beside every evaluation
    baselines: bool = True


def _optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=scaled_lr(64), weight_decay=1e-4)


def _sched() -> SchedConfig:
    return SchedConfig(name="cosine", interval="epoch")


def _train() -> TrainConfig:
    return TrainConfig(
        epochs=110,
        batch_size=64,
        eval_batch_size=128,
        seed=13,
        best_metric="acc",
        best_mode="max",
        output_dir="runs/clipvg",
        log_every=20,
        precision="fp32",  # official: the fusion in fp32 (the encoders: model.encoder_precision)
        drop_last=True,  # as the official loader
    )


@dataclass
class ClipVGConfig(ExperimentConfig):
    data: ClipVGData = field(default_factory=ClipVGData)
    model: ClipVGModel = field(default_factory=ClipVGModel)
    loss: ClipVGLoss = field(default_factory=ClipVGLoss)
    eval: ClipVGEval = field(default_factory=ClipVGEval)
    optim: OptimConfig = field(default_factory=_optim)
    sched: SchedConfig = field(default_factory=_sched)
    train: TrainConfig = field(default_factory=_train)
