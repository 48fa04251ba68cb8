"""The one training/evaluation engine shared by every method.

A *method* is a :class:`groundkit.methods.base.Method` (its docstring lists what the engine calls).
The loop (:func:`fit`): deterministic per-epoch sample order from ``(seed, epoch)``; bf16 autocast on
CUDA; gradient clipping; per-step LR schedule; evaluation every N epochs/steps on the validation
split with best-by-metric checkpoint selection (never on test); atomic safetensors checkpoints with
optimizer/scheduler/RNG state so that ``resume=True`` after a kill continues exactly; a stop on a
non-finite loss that keeps the last good checkpoint; tqdm progress, TensorBoard and JSONL logs.
``train.init_from`` starts from given weights and ``train.subset`` trains on listed samples of the
training split (what a self-paced curriculum needs); :func:`predict` returns per-sample outputs.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as dist_utils
from .checkpoint import (
    atomic_write_text,
    find_run_files,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from .config import save_config, to_dict
from .errors import GroundkitError
from .optim import build_optimizer, build_scheduler
from .runlog import RunLogger

__all__ = [
    "evaluate_samples",
    "predict",
    "Subset",
    "load_subset",
    "NonFiniteLossError",
    "TrainState",
    "seed_everything",
    "resolve_device",
    "epoch_order",
    "move_to_device",
    "train_one_epoch",
    "evaluate",
    "fit",
    "run_eval",
    "write_metrics",
]


class NonFiniteLossError(GroundkitError, RuntimeError):
    """Training stopped because the loss became NaN or infinite."""


@dataclass
class TrainState:
    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # optimisation steps done
    step_in_epoch: int = 0  # steps done within the current epoch
    best_value: float | None = None
    best_step: int = -1


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(pref: str = "auto") -> torch.device:
    """The device for this process (see :func:`groundkit.distributed.init_distributed`)."""
    return dist_utils.init_distributed(pref)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA (``auto`` or ``bf16``), bf16 on CPU only when asked; else a no-op."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(seed) * 1_000_003 + int(epoch)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Sample order of one epoch; a pure function of (seed, epoch) so resume reproduces it."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def _dataset_batch(dataset: Any, indices: list[int]) -> Any:
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    items = [dataset[i] for i in indices]
    collate = getattr(dataset, "collate", None)
    if collate is not None:
        return collate(items)
    return torch.utils.data.default_collate(items)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors of a batch (dict/list/tuple) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not isinstance(batch, str):
        moved = [move_to_device(v, device) for v in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    return batch


def _to_numpy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()
    return x


def _split_samples(out: dict[str, Any], n: int) -> list[dict[str, Any]]:
    per: list[dict[str, Any]] = [{} for _ in range(n)]
    for k, v in out.items():
        v = _to_numpy(v)
        if len(v) != n:
            raise ValueError(f"eval_step output {k!r} has {len(v)} entries for a batch of {n} samples")
        for i in range(n):
            per[i][k] = v[i]
    return per


def _stack(values: list[Any]) -> Any:
    if values and all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
        return np.stack(values)
    if values and all(np.isscalar(v) or (isinstance(v, np.ndarray) and v.ndim == 0) for v in values):
        return np.asarray(values)
    return values


# ----------------------------------------------------------------------------- evaluation


def _sample_outputs(
    method: Any, model: nn.Module, dataset: Any, cfg: Any, device: torch.device
) -> list[tuple[int, dict]]:
    """``(index, per-sample eval_step outputs)`` of every sample, this rank's share gathered from all ranks."""
    n = len(dataset)
    r, w = dist_utils.rank(), dist_utils.world_size()
    local = list(range(r, n, w))  # no padding: each sample once
    records: list[tuple[int, dict]] = []
    bs = cfg.train.eval_batch_size
    with autocast_context(device, cfg.train.precision):
        for start in range(0, len(local), bs):
            idx = local[start : start + bs]
            batch = move_to_device(_dataset_batch(dataset, idx), device)
            out = method.eval_step(model, batch, cfg)
            records.extend(zip(idx, _split_samples(out, len(idx))))
    gathered = dist_utils.all_gather_object(records) if dist_utils.is_distributed() else [records]
    merged = sorted((rec for part in gathered for rec in part), key=lambda t: t[0])
    if len(merged) != n:
        raise RuntimeError(f"evaluation gathered {len(merged)} samples, expected {n}")
    return merged


@torch.no_grad()
def evaluate_samples(method: Any, model: nn.Module, dataset: Any, cfg: Any, device: torch.device) -> dict[str, float]:
    """The default :meth:`Method.evaluate`: ``eval_step`` over every sample (each exactly once under
    DDP), outputs stacked in dataset order, then ``compute_metrics``."""
    merged = _sample_outputs(method, model, dataset, cfg, device)
    keys = merged[0][1].keys() if merged else []
    outputs = {k: _stack([rec[1][k] for rec in merged]) for k in keys}
    return method.compute_metrics(outputs, dataset, cfg)


@torch.no_grad()
def evaluate(method: Any, model: nn.Module, dataset: Any, cfg: Any, device: torch.device) -> dict[str, float]:
    """Evaluate ``model`` on ``dataset`` in eval mode; every sample is counted exactly once under DDP."""
    was_training = model.training
    model.eval()
    try:
        return method.evaluate(model, dataset, cfg, device)
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(
    method: Any, model: nn.Module, dataset: Any, cfg: Any, device: torch.device | str = "cpu"
) -> list[dict[str, Any]]:
    """Per-sample ``eval_step`` outputs (numpy values) of every sample of ``dataset``, in order."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        return [rec for _, rec in _sample_outputs(method, model, dataset, cfg, device)]
    finally:
        model.train(was_training)


class Subset:
    """The samples ``indices`` of ``dataset``, keeping its vectorised ``get_batch`` / ``collate`` /
    ``set_epoch`` (a curriculum trains on the reliable part of a split)."""

    def __init__(self, dataset: Any, indices: Any):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        n = len(dataset)
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise GroundkitError(f"subset index {bad[0]} is outside the split's {n} samples")
        if hasattr(dataset, "get_batch"):
            self.get_batch = lambda idx: dataset.get_batch([self.indices[i] for i in idx])
        if hasattr(dataset, "collate"):
            self.collate = dataset.collate
        if hasattr(dataset, "set_epoch"):
            self.set_epoch = dataset.set_epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def load_subset(path: str | Path) -> list[int]:
    """Sample indices from a file: a JSON list, or one integer per line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise GroundkitError(f"train.subset={str(path)!r}: cannot read ({e.strerror})") from None
    try:
        vals = json.loads(text) if text.lstrip().startswith("[") else [int(x) for x in text.split()]
    except ValueError as e:
        raise GroundkitError(f"{p}: expected a JSON list of sample indices or one integer per line ({e})") from None
    if not vals:
        raise GroundkitError(f"{p}: the subset is empty")
    return [int(v) for v in vals]


# ----------------------------------------------------------------------------- training


def _rank_batches(
    dataset: Any, order: torch.Tensor, batch_size: int, start: int, num_workers: int = 0, loader_seed: int = 0
) -> Iterator[tuple[int, int, Any]]:
    """(global size, local size, this rank's batch) for each global batch from index ``start`` on.

    Each global batch is split round-robin over the ranks; a final batch smaller than the number
    of ranks is skipped so that every rank takes part in every step. Datasets with a vectorised
    ``get_batch`` are gathered in this process; others go through a DataLoader with
    ``num_workers`` over the same index batches, seeded by ``loader_seed`` so that the global RNG
    (dropout, and what a resumed run restores) is left untouched.
    """
    world, r = dist_utils.world_size(), dist_utils.rank()
    order_l = order.tolist()
    sizes, chunks = [], []
    for b in range(start, math.ceil(len(order_l) / batch_size)):
        g = order_l[b * batch_size : (b + 1) * batch_size]
        if len(g) < world:
            continue
        sizes.append(len(g))
        chunks.append(g[r::world])
    if num_workers > 0 and not hasattr(dataset, "get_batch"):
        batches: Iterator[Any] = iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_sampler=chunks,
                num_workers=num_workers,
                collate_fn=getattr(dataset, "collate", None) or torch.utils.data.default_collate,
                generator=torch.Generator().manual_seed(loader_seed),
            )
        )
    else:
        batches = (_dataset_batch(dataset, idx) for idx in chunks)
    for n_global, idx, batch in zip(sizes, chunks, batches):
        yield n_global, len(idx), batch


def train_one_epoch(
    method: Any,
    model: nn.Module,
    dataset: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: Any,
    state: TrainState,
    device: torch.device,
    logger: RunLogger,
    on_step_end: Any = None,
) -> bool:
    """One pass over the training set from ``state.step_in_epoch``; updates ``state`` in place.

    ``on_step_end(state)`` runs after every optimisation step (checkpointing, step evaluation) and
    may return True to stop (``max_steps`` reached); the function then returns True.
    Under DDP each rank's loss is rescaled by its share of the global batch, so the averaged
    gradient equals the single-process gradient of the same global batch for per-sample losses.
    """
    tc = cfg.train
    world = dist_utils.world_size()
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the number of processes ({world})")
    order = epoch_order(len(dataset), tc.seed, state.epoch, shuffle=True)
    if hasattr(dataset, "set_epoch"):  # per-epoch random choices inside the dataset (resumable)
        dataset.set_epoch(state.epoch)
    steps_in_epoch = math.ceil(len(dataset) / tc.batch_size)
    model.train()
    bar = logger.progress(
        total=steps_in_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{tc.epochs}"
    )
    t0, seen, stop = time.perf_counter(), 0, False
    for n_global, n_local, batch in _rank_batches(
        dataset,
        order,
        tc.batch_size,
        state.step_in_epoch,
        tc.num_workers,
        loader_seed=_epoch_seed(tc.seed, state.epoch),
    ):
        batch = move_to_device(batch, device)
        with autocast_context(device, tc.precision):
            loss, logs = method.training_step(model, batch, state.step, cfg)
        if world > 1:
            loss = loss * (n_local * world / n_global)
        bad = not bool(torch.isfinite(loss.detach()).all())
        if dist_utils.all_reduce_flag(bad):
            bar.close()
            last = latest_checkpoint(logger.run_dir)
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {state.step} (epoch {state.epoch + 1}); "
                f"training stopped, weights not updated. Last good checkpoint: {last or 'none yet'}"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = None
        if tc.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        optimizer.step()
        scheduler.step()
        state.step += 1
        state.step_in_epoch += 1
        seen += n_global
        if state.step % max(1, tc.log_every) == 0 or state.step_in_epoch == steps_in_epoch:
            dt = max(time.perf_counter() - t0, 1e-9)
            rec = {"loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"], "samples_per_s": seen / dt}
            if gnorm is not None:
                rec["grad_norm"] = gnorm
            rec.update({k: float(v) for k, v in (logs or {}).items()})
            logger.log_train(state.step, state.epoch, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples_per_s']:.0f}")
        bar.update(1)
        if on_step_end is not None and on_step_end(state):
            stop = True
            break
    bar.close()
    return stop


# ----------------------------------------------------------------------------- fit


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def write_metrics(path: str | Path, task: str, split: str, metrics: dict[str, float], cfg: Any) -> None:
    """``metrics.json``: {"task", "split", "metrics", "config"}, written atomically."""
    payload = {
        "task": task,
        "split": split,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "config": to_dict(cfg),
    }
    atomic_write_text(path, json.dumps(payload, indent=1))


def fit(method: Any, cfg: Any, resume: bool = False, final_split: str | None = "test") -> dict[str, Any]:
    """Train ``method`` with config ``cfg``; returns {"best": val metrics, "final": final-split metrics}.

    Checkpoints go to ``<output_dir>/checkpoints/``; the best one by ``train.best_metric`` on the
    validation split is kept as ``best``. With ``resume`` the newest checkpoint is restored and
    training continues so that the result equals an uninterrupted run with the same seed.
    ``final_split`` is evaluated with the best weights at the end (skipped if the method has no
    such split) and written to ``metrics.json``.
    """
    tc = cfg.train
    device = resolve_device(tc.device)
    seed_everything(tc.seed)
    run_dir = Path(tc.output_dir)
    main = dist_utils.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", method=method.name)
    logger = RunLogger(run_dir, enabled=main, tensorboard=tc.tensorboard, progress=tc.progress)

    train_set = method.build_dataset(cfg, "train")
    if tc.subset:
        train_set = Subset(train_set, load_subset(tc.subset))
    val_set = method.build_dataset(cfg, tc.val_split) if tc.val_split else None
    model = method.build_model(cfg)
    if tc.init_from and not resume:
        load_weights(model, find_run_files(tc.init_from)[0] if Path(tc.init_from).is_dir() else tc.init_from)
        logger.info(f"weights initialised from {tc.init_from}")
    model = model.to(device)
    method.on_train_start(model, train_set.dataset if isinstance(train_set, Subset) else train_set, cfg, device)
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = math.ceil(len(train_set) / tc.batch_size)
    total_steps = tc.max_steps if tc.max_steps > 0 else steps_per_epoch * tc.epochs
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps, steps_per_epoch)

    state = TrainState()
    ckpt_root = run_dir / "checkpoints"
    if resume:
        last = latest_checkpoint(run_dir)
        if last is None:
            logger.info(f"--resume: no checkpoint in {ckpt_root}; starting from scratch")
        else:
            meta = load_checkpoint(last, model, optimizer, scheduler, map_location=device)
            st = meta["train_state"]
            state = TrainState(**st)
            logger.info(f"resumed from {last} (epoch {state.epoch + 1}, step {state.step})")
    train_model: nn.Module = model
    if dist_utils.is_distributed():
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tc.compile:
        train_model = torch.compile(train_model)

    def save(name: str) -> Path:
        meta = {"method": method.name, "train_state": state.__dict__.copy(), "config": to_dict(cfg)}
        p = save_checkpoint(ckpt_root / name, model, optimizer, scheduler, meta=meta)
        atomic_write_text(ckpt_root / "latest", name)
        return p

    def prune(keep: str) -> None:
        for p in ckpt_root.glob("step-*"):
            if p.name != keep:
                shutil.rmtree(p, ignore_errors=True)

    def run_validation() -> None:
        if val_set is None:
            return
        metrics = evaluate(method, model, val_set, cfg, device)
        logger.log_eval(state.step, state.epoch, tc.val_split, metrics)
        if main and tc.best_metric:
            if tc.best_metric not in metrics:
                raise KeyError(f"train.best_metric={tc.best_metric!r} is not among the metrics: {sorted(metrics)}")
            v = float(metrics[tc.best_metric])
            if _improved(v, state.best_value, tc.best_mode):
                state.best_value, state.best_step = v, state.step
                save_checkpoint(
                    ckpt_root / "best",
                    model,
                    meta={
                        "method": method.name,
                        "train_state": state.__dict__.copy(),
                        "metrics": metrics,
                        "config": to_dict(cfg),
                    },
                )
                logger.info(f"new best {tc.best_metric}={v:.4f} at step {state.step}")

    def checkpoint_now() -> None:
        if main:
            name = f"step-{state.step:08d}"
            save(name)
            prune(name)
        dist_utils.barrier()

    def on_step_end(st: TrainState) -> bool:
        if tc.eval_every_steps > 0 and st.step % tc.eval_every_steps == 0:
            run_validation()
        if tc.ckpt_every_steps > 0 and st.step % tc.ckpt_every_steps == 0:
            checkpoint_now()
        return tc.max_steps > 0 and st.step >= tc.max_steps

    t_start = time.perf_counter()
    n_epochs = tc.epochs if tc.max_steps <= 0 else math.ceil(tc.max_steps / steps_per_epoch)
    stopped = False
    while state.epoch < n_epochs and not stopped:
        stopped = train_one_epoch(
            method, train_model, train_set, optimizer, scheduler, cfg, state, device, logger, on_step_end
        )
        epoch_done = state.step_in_epoch >= steps_per_epoch
        if epoch_done:
            if tc.eval_every > 0 and (state.epoch + 1) % tc.eval_every == 0:
                run_validation()
            state.epoch += 1
            state.step_in_epoch = 0
        checkpoint_now()
    if tc.eval_every == 0 or (stopped and tc.eval_every_steps == 0):
        run_validation()
        checkpoint_now()
    elapsed = time.perf_counter() - t_start
    logger.info(f"training done: {state.step} steps in {elapsed:.1f}s")

    result: dict[str, Any] = {"steps": state.step, "train_seconds": elapsed}
    best_dir = ckpt_root / "best"
    if main and tc.best_metric and best_dir.is_dir():
        load_weights(model, best_dir)
        result["best"] = json.loads((best_dir / "meta.json").read_text()).get("metrics", {})
    elif main and not best_dir.exists():
        save_checkpoint(
            best_dir, model, meta={"method": method.name, "train_state": state.__dict__.copy(), "config": to_dict(cfg)}
        )
    dist_utils.barrier()
    if dist_utils.is_distributed() and not main and best_dir.is_dir():
        load_weights(model, best_dir)
    split = final_split if final_split and method.has_split(cfg, final_split) else tc.val_split
    if split:
        ds = val_set if split == tc.val_split and val_set is not None else method.build_dataset(cfg, split)
        metrics = evaluate(method, model, ds, cfg, device)
        logger.log_eval(state.step, state.epoch, split, metrics)
        result["final"] = metrics
        result["final_split"] = split
        if main:
            write_metrics(run_dir / "metrics.json", method.name, split, metrics, cfg)
            logger.print_metrics(split, metrics)
    logger.close()
    return result


def run_eval(
    method: Any, cfg: Any, checkpoint: str | Path, split: str = "test", output_dir: str | Path | None = None
) -> dict[str, float]:
    """Evaluate a checkpoint (directory or .safetensors) on ``split``; writes metrics.json."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = method.build_model(cfg).to(device)
    load_weights(model, checkpoint)
    ds = method.build_dataset(cfg, split)
    metrics = evaluate(method, model, ds, cfg, device)
    if dist_utils.is_main():
        out = Path(output_dir or cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml", method=method.name)
        write_metrics(out / "metrics.json", method.name, split, metrics, cfg)
    return metrics
