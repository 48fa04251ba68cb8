"""Optimizers and learning-rate schedules from the typed config."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig, SchedConfig

__all__ = ["RAdam", "build_optimizer", "build_scheduler"]


class RAdam(torch.optim.RAdam):
    """Rectified Adam (Liu et al. 2020) with a multi-tensor / fused step.

    Same hyper-parameters, update rule and state (``step``, ``exp_avg``, ``exp_avg_sq``; state dicts
    load either way) as :class:`torch.optim.RAdam`, with ``decoupled_weight_decay=True`` giving the
    decay of the official RAdam used by Collaborative Experts / CrossKD (``p -= lr * wd * p``, not
    added to the gradient). Faster on the CPU, where ``torch.optim.RAdam`` makes several temporary
    copies of every parameter per step:

    * rectified steps (``rho_t > 5``) run the fused Adam kernel with rescaled constants. With
      ``r_t`` the rectification term, the RAdam update ``lr r_t sqrt(1 - b2^t) / (1 - b1^t) *
      m / (sqrt(v) + eps)`` is the Adam update with ``lr' = lr r_t`` and ``eps' = eps / sqrt(1 -
      b2^t)``; decoupled decay ``lr wd`` is kept by passing ``wd' = wd / r_t``. One pass over each
      parameter, its gradient and its two moments.
    * the first few steps (``rho_t <= 5``, plain momentum) and devices without the fused kernel
      use ``torch._foreach_*`` operations.

    ``maximize``, ``capturable`` and ``differentiable`` are not supported.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self.fused = _HAS_FUSED_ADAM if fused is None else bool(fused and _HAS_FUSED_ADAM)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch.optim.Optimizer signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("maximize") or group.get("capturable") or group.get("differentiable"):
                raise ValueError("groundkit.optim.RAdam: maximize / capturable / differentiable are not supported")
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RAdam does not support sparse gradients")
                st = self.state[p]
                if len(st) == 0:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                buckets.setdefault((p.device, p.dtype, float(st["step"])), []).append(p)
            for (_, _, t), ps in buckets.items():
                self._update(group, ps, t)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], t: float) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / bc2
        rect = (
            math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) if rho_t > 5 else 0
        )
        if rect and self.fused and params[0].device.type in ("cpu", "cuda"):
            steps = [torch.full((), t, dtype=torch.float32, device=params[0].device)] * len(params)  # read only
            if decoupled:
                torch._fused_adamw_(  # noqa: SLF001
                    params, grads, m, v, [], steps, lr=lr * rect, beta1=b1, beta2=b2,
                    weight_decay=wd / rect, eps=eps / math.sqrt(bc2), amsgrad=False, maximize=False,
                )  # fmt: skip
            else:
                torch._fused_adam_(  # noqa: SLF001
                    params, grads, m, v, [], steps, lr=lr * rect, beta1=b1, beta2=b2,
                    weight_decay=wd, eps=eps / math.sqrt(bc2), amsgrad=False, maximize=False,
                )  # fmt: skip
            return
        if wd != 0:
            if decoupled:
                torch._foreach_mul_(params, 1 - lr * wd)
            else:
                grads = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1 - b2)
        if rect:
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, -lr * rect * math.sqrt(bc2) / bc1)
        else:
            torch._foreach_add_(params, m, alpha=-lr / bc1)


_HAS_FUSED_ADAM = hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_adamw_")


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
        # decoupled_weight_decay: a field of method configs that opt in (crosskd); the plain OptimConfig has none
        decoupled = bool(getattr(cfg, "decoupled_weight_decay", False))
        return RAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, decoupled_weight_decay=decoupled)
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
