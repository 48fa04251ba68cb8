"""Typed config of co-grounding: data, model, loss, eval and post-processing sections.

Defaults are the official code's behaviour (the rule of every method, docs/architecture.md): each groundkit fix
or extension is a switch whose default is the official side, listed in docs/cogrounding.md. The shipped
``configs/improved_*.yaml`` and ``world_*.yaml`` turn the fixes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import DataConfig, ExperimentConfig, OptimConfig, ParamGroup, SchedConfig, TrainConfig

__all__ = [
    "CoGroundingDataConfig",
    "CoGroundingModelConfig",
    "CoGroundingLossConfig",
    "CoGroundingEvalConfig",
    "PostProcessConfig",
    "CoGroundingConfig",
]


@dataclass
class CoGroundingDataConfig(DataConfig):
    """Where the samples come from. ``kind``: ``refcoco`` (refer-API files), ``transvg`` (``.pth``
    lists) or ``vid`` (the co-grounding ``VID_video_level_<split>.pth`` index or VID-Sentence files)."""

    kind: Literal["refcoco", "transvg", "vid"] = "refcoco"
    # the built-in world (world.size; world.task: refexp for images, video for clips) sets data.root, which stands
    # for data_root (refcoco) or index_root=<root>/VID + image_root (vid)
    # refcoco (refer API): <data_root>/<dataset>/refs(<split_by>).p + instances.json; images in image_root
    data_root: str = ""
    dataset: str = "refcoco"
    split_by: str = "unc"
    # transvg: <split_root>/<key>/<key>_<split>.pth, images under image_root
    split_root: str = ""
    transvg_key: str = "unc"
    # vid: index files <index_root>/VID_video_level_<split>.pth (relative image paths joined to image_root),
    # or VID-Sentence files under vid_sentence_root (the ILSVRC folder) when index_root is empty
    index_root: str = ""
    vid_sentence_root: str = ""
    image_root: str = ""
    train_split: str = "train"
    val_split: str = "val"  # model selection; never a test split
    test_splits: list[str] = field(default_factory=lambda: ["testA", "testB"])  # evaluated together as "test"
    max_samples: int = 0  # >0: keep the first N samples of each split (quick runs)
    frame_stride: int = 1  # video: use every k-th frame as a training centre frame
    # images
    image_size: int = 256  # letterbox side (official 256)
    augment: bool = True
    flip: bool = True  # horizontal flip p=0.5 with left/right word swap (shared by the frames of a clip)
    hsv_jitter: float = 0.5  # fraction for S and V jitter (official 0.5); 0 disables
    hsv_saturation_bug: bool = True  # official: only V is scaled (the S line is missing); false = fixed
    affine: bool = True  # random affine (rot 5, translate 0.1, scale 0.9-1.1, shear 2)
    shared_clip_geometry: bool = False  # official: an affine per frame; true (fixed): one for all frames of a clip
    # official pixel rules: boxes cut to integers on reading (np.array(bbox, dtype=int) before xywh -> xyxy),
    # mirrored in original pixels as x' = w - x - 1, and cut again after the letterbox; false = float boxes
    truncate_boxes: bool = True
    # the flip's word swap: "substring" (official: str.replace of right/left, so "bright" becomes "bleft") or
    # "words" (fixed: whole words, "bright" stays)
    flip_swap: Literal["words", "substring"] = "substring"
    cache_backbone: bool = False  # with a frozen backbone and no geometric/colour jitter: backbone maps computed once
    # with cache_backbone: a folder where each split's maps are kept on disk (one file per backbone, image size and
    # image list), so that seeds and variants of a sweep compute them once; "" keeps them in memory only
    feature_cache: str = ""


@dataclass
class CoGroundingModelConfig:
    # official: Darknet-53 + YOLOv3 neck (weights from model.darknet_weights); not official: the packaged EfficientNet
    backbone: Literal["efficientnet_lite0", "darknet53"] = "darknet53"
    pretrained: bool = True  # EfficientNet-Lite0: the packaged ImageNet weights
    darknet_weights: str = ""  # path to an original yolov3.weights file
    darknet_width: float = 1.0
    # which Darknet maps feed the head: "official" (the input of each [yoloconvolutional] block, yolov3.cfg layers
    # 78 / 90 / 102, as the official darknet.py) or "head" (the 3x3 convolution before each YOLO output, 80 / 92 / 104)
    darknet_taps: Literal["official", "head"] = "official"
    darknet_bn_momentum: float = 0.1  # every Darknet BatchNorm2d (official: PyTorch's default 0.1)
    freeze_backbone: bool = False
    text_encoder: Literal["lstm", "transformer"] = "lstm"
    text_encoder_path: str = "minilm"  # transformer: a local model folder, or "minilm" (the offline package)
    freeze_text_encoder: bool = True
    vocab_size: int = 20000  # LSTM: most frequent GloVe 6B words
    vocab_file: str = ""  # LSTM: own vocabulary, one word per line (overrides vocab_size)
    max_tokens: int = 20  # official --time 20
    # LSTM tokens: "official" (the official Corpus.tokenize: punctuation runs kept as tokens, a final "." dropped,
    # max_tokens words with no <eos> when the text is that long or longer; vocab_file lines split on whitespace as
    # the official corpus) or "groundkit" (words only, punctuation dropped, at most max_tokens - 1 words + <eos>)
    tokenizer: Literal["groundkit", "official"] = "official"
    dim: int = 512  # official emb_size 512
    lang_dropout: float = 0.1  # dropout of the language MLP (official 0.1)
    co_attention: bool = True  # CG-SL-Att; False = SL-Att (image model / single-frame baseline)
    # not official: top-down path over the mapped scales (coarse -> fine) for backbones without a YOLO neck
    # (EfficientNet-Lite0); the Darknet-53 backbone already ends in the YOLOv3 neck
    top_down: bool = False
    # not official: the local correlation volume of the centre and each neighbour frame (oriented forward in
    # time) added to the co-attention input, so that co-grounding can see motion ("the car moving left")
    motion: bool = False
    motion_radius: int = 1
    # corr: the correlation volume above; diff: a 3 x 3 convolution over the centre map and the temporal derivative
    # (neighbour - centre) / dt, which sees sub-cell motion
    motion_mode: Literal["corr", "diff"] = "corr"
    # not official: box offsets from the centre frame's own maps, confidence / similarity / location from the
    # co-features (which choose the object); costs a second pass of the head
    box_from_centre: bool = False
    # not official: co-features L2norm(v_c + g * corr) with a zero-initialised gate g per scale (the official ones are
    # corr alone), so fine-tuning a co-grounding model from an image model starts from that model's predictions
    co_residual: bool = False
    # not official: a third semantic attention for the motion phrase ("moving left"), which predicts a velocity; each
    # cell adds the log-likelihood of its Lucas-Kanade motion in the window under it to its score (co-grounding only)
    motion_attention: bool = False
    attention_temperature: float = 10.0
    # official: momentum 0.999 in the head's ConvBNReLU blocks (running stats ~ the last batch), as the official
    # ConvBatchNormReLU; false (fixed): 0.1. The BatchNorm1d layers (language MLP, coordinate and location
    # embeddings) keep PyTorch's 0.1 in both modes, as the official nn.BatchNorm1d
    bn_momentum_official: bool = True
    anchors: list[list[float]] = field(
        default_factory=lambda: [
            [10, 13],
            [16, 30],
            [33, 23],
            [30, 61],
            [62, 45],
            [59, 119],
            [116, 90],
            [156, 198],
            [373, 326],
        ]
    )
    anchor_reference: float = 416.0  # anchors are given for this input side and scaled to image_size

    def variant_switches(self) -> list[str]:
        """The not-official switches that are on and take effect (each needs co-attention): they select the
        :class:`~groundkit.methods.cogrounding.variants.ExtendedCoGroundingNet`."""
        names = ("motion", "co_residual", "box_from_centre", "motion_attention")
        return [n for n in names if getattr(self, n)] if self.co_attention else []


@dataclass
class CoGroundingLossConfig:
    """Official weights: L = L_yolo + 100 L_rank + 1 L_loc."""

    coord_weight: float = 5.0
    rank_weight: float = 100.0
    rank_margin: float = 0.1
    loc_weight: float = 1.0
    rank_negatives_reversal: bool = True  # official: negatives by batch reversal (may pick the same sentence)
    # official: a partner whose GT cell is the own cell still gives its second rank term, the constant margin
    rank_same_cell_margin: bool = True
    loc_on_normalized: bool = True  # official: location CE on min-max normalised [0,1] scores
    loc_temperature: float = 0.1  # fixed (loc_on_normalized false): CE on raw cosines / temperature
    motion_weight: float = 1.0  # CE of the cells' motion log-likelihoods (model.motion_attention only)
    motion_candidates: int = 8  # that CE over the GT cell and the model's k best cells (0: over all cells)
    temporal_weight: float = 0.0  # temporal consistency (official offset_loss weight 5; never run there)
    confidence_consistency_weight: float = 0.0  # MSE between consecutive frames' anchor distributions
    train_clip_len: int = 2  # frames per training clip (official: pairs t-1, t)


@dataclass
class PostProcessConfig:
    """Temporal re-scoring of each frame's top-k candidates (official post_processing.py)."""

    enabled: bool = True  # also report Acc@0.5 after post-processing on video
    top_k: int = 5
    window: int = 5  # frames t-2..t+2
    renormalize: bool = False  # official: zero weight, no renormalisation; fixed: softmax over the frames that exist


@dataclass
class CoGroundingEvalConfig:
    iou_threshold: float = 0.5
    inclusive: bool = False  # official: IoU strictly > 0.5; true: IoU >= 0.5
    window: int = 5  # test window (official 5, centred, clipped at the video ends)
    reuse_features: bool = True  # each frame's backbone/text features once per video (False: window by window)
    baselines: bool = True  # random-box, largest-box (and the anchor upper bound) on images
    batch_frames: int = 64


@dataclass
class CoGroundingConfig(ExperimentConfig):
    data: CoGroundingDataConfig = field(default_factory=CoGroundingDataConfig)
    model: CoGroundingModelConfig = field(default_factory=CoGroundingModelConfig)
    loss: CoGroundingLossConfig = field(default_factory=CoGroundingLossConfig)
    eval: CoGroundingEvalConfig = field(default_factory=CoGroundingEvalConfig)
    post: PostProcessConfig = field(default_factory=PostProcessConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="rmsprop", lr=1e-4, weight_decay=5e-4, param_groups=[ParamGroup(match="backbone.", lr_mult=0.1)]
        )
    )
    sched: SchedConfig = field(default_factory=lambda: SchedConfig(name="poly", interval="epoch", power=0.9))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=100,
            batch_size=32,
            eval_batch_size=64,
            best_metric="Acc@0.5",
            output_dir="runs/cogrounding",
            # as the official DataLoader: a last batch of one sample would stop the BatchNorm1d layers in training
            drop_last=True,
            precision="fp32",  # the official code runs fp32 (no autocast)
        )
    )
