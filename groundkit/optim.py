"""Optimizers and learning-rate schedules from the typed config."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig, SchedConfig

__all__ = ["build_optimizer", "build_scheduler"]


def _param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into groups by name substring (first match wins)."""
    groups: list[dict] = [{"params": [], "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    for g in cfg.param_groups:
        groups.append(
            {
                "params": [],
                "lr": cfg.lr * g.lr_mult,
                "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay,
            }
        )
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        idx = next((i + 1 for i, g in enumerate(cfg.param_groups) if g.match and g.match in name), 0)
        groups[idx]["params"].append(p)
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam / AdamW / RAdam / RMSprop / SGD over the model's trainable parameters."""
    groups = _param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = {"fused": True} if cfg.fused and on_cuda else {}
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fused)
    if cfg.name == "radam":
        return torch.optim.RAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, eps=cfg.eps, momentum=cfg.momentum)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimisation step.

    ``interval="epoch"`` schedules change only at epoch boundaries (as StepLR per epoch does),
    while warm-up is always per step. ``total_steps`` bounds poly/cosine decay.
    """
    spe = max(1, steps_per_epoch)
    total = max(1, total_steps)

    def factor(step: int) -> float:
        warm = 1.0
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            warm = (step + 1) / cfg.warmup_steps
        t = step // spe if cfg.interval == "epoch" else step
        t_total = math.ceil(total / spe) if cfg.interval == "epoch" else total
        if cfg.name == "constant":
            f = 1.0
        elif cfg.name == "step":
            f = cfg.gamma ** (t // max(1, cfg.step_size))
        elif cfg.name == "poly":
            frac = min(1.0, t / max(1, t_total))
            f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - frac) ** cfg.power
        elif cfg.name == "cosine":
            frac = min(1.0, t / max(1, t_total))
            f = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        else:
            raise ValueError(f"sched.name: unknown schedule {cfg.name!r}")
        return warm * f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
