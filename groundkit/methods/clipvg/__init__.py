"""clipvg: CLIP-VG (Xiao et al., 2023), self-paced curriculum adapting of CLIP for visual grounding.

Files: ``config.py`` (typed config, the LR / batch-size rule) -> ``data.py`` (TransVG ``.pth`` lists,
letterbox, augmentation, cached encoder outputs) -> ``model.py`` (frozen encoders, [REG] fusion
transformer, box head, L1 + GIoU) -> ``method.py`` (training step, Acc@0.5, curriculum backend);
``pseudo.py`` (pseudo-label generation, reliability histograms), ``curriculum.py`` (SSA / MSA,
``groundkit curriculum``), ``predict.py`` (inference), ``sweeps.py`` (the demo's table).
"""

from .config import ClipVGConfig, ClipVGData, ClipVGEval, ClipVGLoss, ClipVGModel, scaled_lr
from .method import METHOD, ClipVGMethod
from .model import ClipVG, EfficientMiniLMEncoders, FrozenEncoders, OpenClipEncoders, build_encoders, clipvg_loss

__all__ = [
    "METHOD",
    "ClipVGMethod",
    "ClipVGConfig",
    "ClipVGData",
    "ClipVGModel",
    "ClipVGLoss",
    "ClipVGEval",
    "scaled_lr",
    "ClipVG",
    "FrozenEncoders",
    "OpenClipEncoders",
    "EfficientMiniLMEncoders",
    "build_encoders",
    "clipvg_loss",
]
