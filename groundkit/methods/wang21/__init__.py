"""wang21: weakly supervised phrase grounding by contrastive knowledge distillation (Wang et al., CVPR 2021).

Files: ``config.py`` (typed config) -> ``data.py`` (features as tensors) -> ``model.py`` (encoders,
NCE and distillation losses) -> ``method.py`` (training step, evaluation) ; ``prepare.py`` (data
tools), ``predict.py`` (inference), ``sweeps.py`` (the demo's seed sweeps).
"""

from .config import Wang21Config, Wang21DataConfig, Wang21EvalConfig, Wang21LossConfig, Wang21ModelConfig
from .data import Wang21Dataset, resolve_paths
from .method import METHOD, Wang21Method

__all__ = [
    "METHOD",
    "Wang21Method",
    "Wang21Config",
    "Wang21DataConfig",
    "Wang21ModelConfig",
    "Wang21LossConfig",
    "Wang21EvalConfig",
    "Wang21Dataset",
    "resolve_paths",
]
