"""The seed tables the demo runs: co-grounding's image and video variants on the built-in world as
:class:`groundkit.runs.RunSpec` lists. The documented tables (and the held-out evaluation):
``experiments/cogrounding_tables.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...runs import RunSpec, seed_specs

__all__ = ["IMAGE_VARIANTS", "VIDEO_VARIANTS", "table_specs"]

#: variant -> (shipped config, overrides)
IMAGE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "SL-Att (image model)": ("world_image", {}),
}
VIDEO_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "single-frame (SL-Att)": ("world_video", {"model.co_attention": False, "loss.train_clip_len": 1}),
    "co-grounding (CG-SL-Att)": ("world_video", {}),
    "co-grounding + temporal loss": ("world_video", {"loss.temporal_weight": 5.0}),
    "co-grounding + motion term": ("world_video", {"model.motion": True}),
    "co-grounding, residual": ("world_video", {"model.co_residual": True}),
    "co-grounding, residual + motion term": ("world_video", {"model.co_residual": True, "model.motion": True}),
    "co-grounding, residual + motion difference": (
        "world_video",
        {"model.co_residual": True, "model.motion": True, "model.motion_mode": "diff"},
    ),
    "co-grounding, residual + motion difference, box from centre": (
        "world_video",
        {"model.co_residual": True, "model.motion": True, "model.motion_mode": "diff", "model.box_from_centre": True},
    ),
    "co-grounding, residual + temporal loss": ("world_video", {"model.co_residual": True, "loss.temporal_weight": 5.0}),
    "co-grounding, residual + motion attention, loss over all cells": (
        "world_video",
        {"model.co_residual": True, "model.motion_attention": True, "loss.motion_candidates": 0},
    ),
    "co-grounding + motion attention": ("world_video", {"model.motion_attention": True}),
    "co-grounding, residual + motion attention, candidate loss": (
        "world_video",
        {"model.co_residual": True, "model.motion_attention": True, "loss.motion_candidates": 8},
    ),
}


def table_specs(
    kind: str,
    out: str | Path,
    seeds: list[int],
    size: str = "",
    extra: dict[str, Any] | None = None,
    names: list[str] | None = None,
) -> list[RunSpec]:
    """One :func:`~groundkit.runs.seed_specs` group per variant of the ``image`` or ``video`` table.

    ``size`` picks the world (default: the config's ``world.size``); ``extra`` overrides every run.
    """
    variants = IMAGE_VARIANTS if kind == "image" else VIDEO_VARIANTS
    out = Path(out)
    common: dict[str, Any] = {"data.feature_cache": str(out / "features")}
    if size:
        common["world.size"] = size
    specs: list[RunSpec] = []
    for name in names or list(variants):
        cfg_name, ov = variants[name]
        specs += seed_specs(name, "cogrounding", cfg_name, seeds, out, overrides={**common, **ov, **(extra or {})})
    return specs
