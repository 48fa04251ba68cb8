"""A small linear-regression method used to test the shared engine (resume, DDP, non-finite stop)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from groundkit.config import ExperimentConfig
from groundkit.methods.base import GroundingDataset, Method


@dataclass
class RegData:
    n_train: int = 96
    n_val: int = 32
    dim: int = 8
    noise: float = 0.1
    nan_at_step: int = -1  # make the loss NaN at this step (tests the non-finite stop)
    crash_at_step: int = -1  # raise at this step (simulates a killed process)
    signal_at_step: int = -1  # send SIGINT to this process at this step (a Ctrl-C in the middle of a step)
    step_sleep: float = 0.0  # seconds slept per training step (gives a kill test time to aim)


@dataclass
class RegConfig(ExperimentConfig):
    data: RegData = field(default_factory=RegData)
    dropout: float = 0.1


class RegDataset(GroundingDataset):
    batched = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def get_batch(self, idx: list[int]) -> dict:
        i = torch.as_tensor(idx, dtype=torch.long)
        return {"x": self.x[i], "y": self.y[i], "index": i}


class RegressionMethod(Method):
    name = "regression"
    config_class = RegConfig

    def build_model(self, cfg: RegConfig) -> nn.Module:
        return nn.Sequential(nn.Linear(cfg.data.dim, 16), nn.Tanh(), nn.Dropout(cfg.dropout), nn.Linear(16, 1))

    def build_dataset(self, cfg: RegConfig, split: str) -> RegDataset:
        g = torch.Generator().manual_seed(1234)
        w = torch.randn(cfg.data.dim, 1, generator=g)
        n = {"train": cfg.data.n_train, "val": cfg.data.n_val, "test": cfg.data.n_val}[split]
        gs = torch.Generator().manual_seed({"train": 1, "val": 2, "test": 3}[split])
        x = torch.randn(n, cfg.data.dim, generator=gs)
        y = x @ w + cfg.data.noise * torch.randn(n, 1, generator=gs)
        return RegDataset(x, y)

    def training_step(self, model, batch, step, cfg):
        pred = model(batch["x"])
        loss = ((pred - batch["y"]) ** 2).mean()
        if step == cfg.data.crash_at_step:
            raise KeyboardInterrupt(f"simulated kill at step {step}")
        if step == cfg.data.signal_at_step:
            os.kill(os.getpid(), signal.SIGINT)
        if cfg.data.step_sleep > 0:
            time.sleep(cfg.data.step_sleep)
        if step == cfg.data.nan_at_step:
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach())}

    def eval_step(self, model, batch, cfg):
        err = ((model(batch["x"]) - batch["y"]) ** 2).squeeze(1)
        return {"index": batch["index"], "sq_err": err}

    def compute_metrics(self, outputs, dataset, cfg):
        idx = np.asarray(outputs["index"])
        assert len(idx) == len(dataset) and (np.sort(idx) == np.arange(len(dataset))).all()
        return {"mse": float(np.mean(outputs["sq_err"])), "count": float(len(idx))}


METHOD = RegressionMethod()


def ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out_dir: str) -> None:
    """Entry point of one DDP process (gloo, CPU) for the engine tests."""
    from groundkit import distributed
    from groundkit.config import load_config
    from groundkit.engine import fit

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    cfg = load_config(RegConfig, cfg_dict, {"train.output_dir": out_dir})
    try:
        fit(METHOD, cfg, final_split="test")
    finally:
        distributed.cleanup()


class ItemDataset(GroundingDataset):
    """The same data served one sample at a time (no ``get_batch``): exercises the DataLoader path."""

    def __init__(self, base: RegDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.base.x[i], "y": self.base.y[i], "index": torch.tensor(i)}


class ItemRegressionMethod(RegressionMethod):
    def build_dataset(self, cfg: RegConfig, split: str) -> ItemDataset:
        return ItemDataset(super().build_dataset(cfg, split))


ITEM_METHOD = ItemRegressionMethod()
