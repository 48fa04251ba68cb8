"""The one training/evaluation engine shared by every method.

A *method* is a :class:`groundkit.methods.base.Method` (its docstring lists what the engine calls).
The loop (:func:`fit`): deterministic per-epoch sample order from ``(seed, epoch)``; bf16 autocast on
CUDA; gradient clipping; per-step LR schedule; evaluation every N epochs/steps on the validation
split with best-by-metric checkpoint selection (never on test); atomic safetensors checkpoints with
optimizer/scheduler/RNG state so that ``resume=True`` after a kill continues exactly; a stop on a
non-finite loss that keeps the last good checkpoint; tqdm progress, TensorBoard and JSONL logs.
``train.init_from`` starts from given weights and ``train.subset`` trains on listed samples of the
training split (what a self-paced curriculum needs); :func:`predict` returns per-sample outputs.

What a run folder guarantees (locking, resume and config-diff policy, signals, ``run.json``,
``metrics.json``) lives in :mod:`groundkit.runfolder`; its public names are importable from here too.
Torch threads come from :class:`~groundkit.distributed.CoreShare` (``train.threads``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as dist_utils
from .checkpoint import CheckpointError, init_weights, latest_checkpoint, load_weights, read_meta
from .config import ConfigError, save_config
from .distributed import CoreShare
from .errors import GroundkitError
from .optim import build_optimizer, build_scheduler
from .runfolder import (
    LENGTH_KEYS,
    NEUTRAL_KEYS,
    RUN_ARTEFACTS,
    RUN_FILE,
    Checkpointer,
    RunFolder,
    RunRecord,
    Signals,
    check_resume,
    config_differences,
    flatten_config,
    read_run_record,
    refuse_training_folder,
    write_method_metrics,
    write_metrics,
)
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
    "epoch_seed",
    "move_to_device",
    "train_one_epoch",
    "evaluate",
    "fit",
    "run_eval",
    # the run folder's names (groundkit.runfolder)
    "write_metrics",
    "RunFolder",
    "read_run_record",
    "config_differences",
    "flatten_config",
    "NEUTRAL_KEYS",
    "LENGTH_KEYS",
    "RUN_ARTEFACTS",
    "RUN_FILE",
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
    train_seconds: float = 0.0  # training time up to this state, summed over resumes


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


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's draws (sample order, loader workers, a dataset's per-epoch draws)."""
    return int(seed) * 1_000_003 + int(epoch)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Sample order of one epoch; a pure function of (seed, epoch) so resume reproduces it."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def _dataset_batch(dataset: Any, indices: list[int]) -> Any:
    """The batch of samples ``indices`` (the dataset protocol of :class:`groundkit.methods.base.GroundingDataset`)."""
    if dataset.batched:
        return dataset.get_batch(indices)
    return dataset.collate([dataset[i] for i in indices])


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors of a batch (dict/list/tuple) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [move_to_device(v, device) for v in batch]
        return type(batch)(*moved) if _is_namedtuple(batch) else type(batch)(moved)
    return batch


def _is_namedtuple(x: Any) -> bool:
    """A NamedTuple is rebuilt from its fields as arguments, other sequences from one iterable."""
    return isinstance(x, tuple) and isinstance(getattr(type(x), "_fields", None), tuple)


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
    """The samples ``indices`` of ``dataset`` behind the same dataset protocol (vectorised ``get_batch``,
    ``collate``, ``set_epoch``): a curriculum trains on the reliable part of a split."""

    def __init__(self, dataset: Any, indices: Any):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.batched = dataset.batched
        n = len(dataset)
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise GroundkitError(f"subset index {bad[0]} is outside the split's {n} samples")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def get_batch(self, indices: list[int]) -> Any:
        return self.dataset.get_batch([self.indices[i] for i in indices])

    def collate(self, items: list[Any]) -> Any:
        return self.dataset.collate(items)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


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


def steps_in(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimisation steps of an epoch of ``n`` samples (``drop_last``: the last incomplete batch is left out)."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _rank_batches(
    dataset: Any,
    order: torch.Tensor,
    batch_size: int,
    start: int,
    num_workers: int = 0,
    loader_seed: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[int, int, Any]]:
    """(global size, local size, this rank's batch) for each global batch from index ``start`` on.

    Each global batch is split round-robin over the ranks; a final batch smaller than the number
    of ranks is skipped so that every rank takes part in every step (with ``drop_last`` any incomplete one).
    ``batched`` datasets are gathered in this process (``get_batch``); others go through a DataLoader with
    ``num_workers`` over the same index batches, seeded by ``loader_seed`` so that the global RNG
    (dropout, and what a resumed run restores) is left untouched.
    """
    world, r = dist_utils.world_size(), dist_utils.rank()
    order_l = order.tolist()
    sizes, chunks = [], []
    for b in range(start, steps_in(len(order_l), batch_size, drop_last)):
        g = order_l[b * batch_size : (b + 1) * batch_size]
        if len(g) < world:
            continue
        sizes.append(len(g))
        chunks.append(g[r::world])
    if num_workers > 0 and not dataset.batched:
        batches: Iterator[Any] = iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_sampler=chunks,
                num_workers=num_workers,
                collate_fn=dataset.collate,
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
    dataset.set_epoch(state.epoch)  # per-epoch random choices inside the dataset (resumable)
    steps_in_epoch = steps_in(len(dataset), tc.batch_size, tc.drop_last)
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
        loader_seed=epoch_seed(tc.seed, state.epoch),
        drop_last=tc.drop_last,
    ):
        batch = move_to_device(batch, device)
        with autocast_context(device, tc.precision):
            loss, logs = method.training_step(model, batch, state.step, cfg)
        if world > 1:
            loss = loss * (n_local * world / n_global)
        _stop_if_not_finite(loss, state, logger, bar)
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
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            _log_step(logger, bar, state, loss, logs, optimizer.param_groups[0]["lr"], gnorm, rate)
        bar.update(1)
        if on_step_end is not None and on_step_end(state):
            stop = True
            break
    bar.close()
    return stop


def _stop_if_not_finite(loss: torch.Tensor, state: TrainState, logger: RunLogger, bar: Any) -> None:
    """:class:`NonFiniteLossError` on every process when the loss is NaN or infinite on any, before the update."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if dist_utils.all_reduce_flag(bad):
        bar.close()
        last = latest_checkpoint(logger.run_dir)
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at step {state.step} (epoch {state.epoch + 1}); "
            f"training stopped, weights not updated. Last good checkpoint: {last or 'none yet'}"
        )


def _log_step(
    logger: RunLogger, bar: Any, state: TrainState, loss: torch.Tensor, logs: Any, lr: float, gnorm: Any, rate: float
) -> None:
    """The training log record of a step: loss, learning rate, samples per second, gradient norm, the method's logs."""
    rec = {"loss": float(loss.detach()), "lr": lr, "samples_per_s": rate}
    if gnorm is not None:
        rec["grad_norm"] = gnorm
    rec.update({k: float(v) for k, v in (logs or {}).items()})
    logger.log_train(state.step, state.epoch, rec)
    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", sps=f"{rec['samples_per_s']:.0f}")


# ----------------------------------------------------------------------------- fit


def fit(
    method: Any,
    cfg: Any,
    resume: bool = False,
    final_split: str | None = "test",
    overwrite: bool = False,
    force: bool = False,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``method`` with config ``cfg``; returns ``{"steps", "train_seconds", "best", "final",
    "final_split", "run_dir", "resumed"}``.

    The run folder ``train.output_dir`` is locked while the training uses it. A folder that already holds
    a run is refused unless ``resume`` (continue from its newest checkpoint; a checkpoint trained with
    another config is refused unless ``force``, see :data:`NEUTRAL_KEYS` and :data:`LENGTH_KEYS`) or
    ``overwrite`` (its run files are deleted first). Checkpoints go to ``checkpoints/``; the best by
    ``train.best_metric`` on the validation split is kept as ``best``. A resumed run equals an
    uninterrupted one with the same seed. SIGINT/SIGTERM save a checkpoint at the end of the current step
    and raise :class:`~groundkit.errors.Interrupted`. ``final_split`` is evaluated with the best weights
    at the end (skipped if the method has no such split) and written to ``metrics.json``. ``run.json``
    records the status (running, done, failed, interrupted), steps, seconds and metrics, plus ``record``.
    A training that fails before its first checkpoint leaves the folder as it found it.
    """
    cfg = method.resolve_config(copy.deepcopy(cfg))
    tc = cfg.train
    with CoreShare(tc.threads) as cores:
        device = resolve_device(tc.device)
        tc.device = str(device) if not dist_utils.is_distributed() else device.type  # what was used
        return _fit(method, cfg, device, cores, resume, final_split, overwrite, force, record or {})


@dataclass
class _Training:
    """What one :func:`fit` works on (built by :func:`_prepare`)."""

    method: Any
    cfg: Any
    device: torch.device
    model: nn.Module
    train_set: Any
    val_set: Any
    steps_per_epoch: int
    ckpt: Checkpointer  # optimizer, scheduler and TrainState beside the checkpoints
    last: Path | None  # the checkpoint resumed from
    resume_at: tuple[int, int] | None  # where the resumed log continues
    note: str  # why a changed config was accepted on resume
    init_note: str  # what train.init_from left out
    logger: Any = None


def _fit(
    method: Any,
    cfg: Any,
    device: torch.device,
    cores: CoreShare,
    resume: bool,
    final_split: str | None,
    overwrite: bool,
    force: bool,
    record: dict[str, Any],
) -> dict[str, Any]:
    tc = cfg.train
    seed_everything(tc.seed)
    run_dir, main = Path(tc.output_dir), dist_utils.is_main()
    folder = RunFolder.claim(run_dir, resume, overwrite)
    run = RunRecord(run_dir, method.name, device, cores.threads, record, TrainState())
    status = "failed"
    job: _Training | None = None
    try:
        job = _prepare(method, cfg, device, resume, force)
        run.state = job.ckpt.state
        run.resumed_from = job.ckpt.state.step if job.last is not None else None
        if main:
            save_config(cfg, run_dir / "config.yaml", method=method.name)
        job.logger = RunLogger(
            run_dir, enabled=main, tensorboard=tc.tensorboard, progress=tc.progress, resume_at=job.resume_at
        )
        _log_start(job, resume)
        job.ckpt.start(job.logger)
        run.write("running")
        with Signals() as signals:
            result = _train_and_test(job, cores, signals, final_split)
        result.update(run_dir=str(run_dir), resumed=job.last is not None)
        run.done(result, units=method.units)
        status = "done"
        return result
    except BaseException as e:
        status = run.write_failure(e)
        raise
    finally:
        if job is not None and job.logger is not None:
            job.logger.close()
        if main:
            folder.release(failed=status != "done")


def _prepare(method: Any, cfg: Any, device: torch.device, resume: bool, force: bool) -> _Training:
    """Datasets, model, optimizer and schedule of a training; on ``resume`` all of them (and the RNG states)
    as they were at the newest checkpoint, once :func:`~groundkit.runfolder.check_resume` accepts it."""
    tc = cfg.train
    train_set = method.build_dataset(cfg, "train")
    if tc.subset:
        train_set = Subset(train_set, load_subset(tc.subset))
    if train_set is None or len(train_set) == 0:
        raise GroundkitError(f"{method.name}: the training split is empty")
    val_set = method.build_dataset(cfg, tc.val_split) if tc.val_split else None
    steps_per_epoch = steps_in(len(train_set), tc.batch_size, tc.drop_last)
    if steps_per_epoch == 0:
        raise GroundkitError(
            f"{method.name}: {len(train_set)} training samples make no full batch of {tc.batch_size} (train.drop_last)"
        )
    last = latest_checkpoint(Path(tc.output_dir)) if resume else None
    note = ""
    if last is not None:  # refuse another method or config before any work
        note = check_resume(method.name, read_meta(last), cfg, last, steps_per_epoch, force)
    model = method.build_model(cfg)
    init_note = ""
    if tc.init_from and last is None:
        init_note = init_weights(model, tc.init_from, method.name, partial=tc.init_partial)
    model = model.to(device)
    method.on_train_start(model, train_set.dataset if isinstance(train_set, Subset) else train_set, cfg, device)
    optimizer = build_optimizer(model, cfg.optim)
    total_steps = tc.max_steps if tc.max_steps > 0 else steps_per_epoch * tc.epochs
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps, steps_per_epoch)
    ckpt = Checkpointer(method.name, cfg, model, optimizer, scheduler, TrainState())
    resume_at = ckpt.resume(last, device) if last is not None else None
    return _Training(
        method, cfg, device, model, train_set, val_set, steps_per_epoch, ckpt, last, resume_at, note, init_note
    )


def _log_start(job: _Training, resume: bool) -> None:
    tc, state, logger = job.cfg.train, job.ckpt.state, job.logger
    if job.last is not None:
        logger.info(f"resumed from {job.last} (epoch {state.epoch + 1}, step {state.step})")
    elif resume:
        logger.info(f"--resume: no checkpoint in {job.ckpt.root}; starting from scratch")
    if job.note:
        logger.warn(job.note)
    if tc.init_from and job.last is None:
        logger.info(f"weights initialised from {tc.init_from}{job.init_note}")


def _training_model(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """``model`` as the loop runs it: wrapped in DDP under torchrun, compiled with ``train.compile``."""
    if dist_utils.is_distributed():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        model = torch.compile(model)
    return model


def _train_and_test(job: _Training, cores: CoreShare, signals: Signals, final_split: str | None) -> dict[str, Any]:
    """The training loop, the best-checkpoint selection and the final evaluation of :func:`fit`."""
    elapsed = _train(job, cores, signals)
    result: dict[str, Any] = {"steps": job.ckpt.state.step, "train_seconds": elapsed}
    result.update(job.ckpt.use_best())
    _test(job, final_split, result)
    return result  # a signal during the final evaluation comes too late to save anything: the run is done


def _train(job: _Training, cores: CoreShare, signals: Signals) -> float:
    """Epochs up to ``train.epochs`` / ``train.max_steps`` with the configured validations and checkpoints; a
    signal saves a checkpoint and raises :class:`~groundkit.errors.Interrupted`. Returns the training seconds."""
    method, cfg, device, logger = job.method, job.cfg, job.device, job.logger
    tc, ckpt, state = cfg.train, job.ckpt, job.ckpt.state
    model = _training_model(job.model, device, tc.compile)

    def on_step_end(st: TrainState) -> bool:
        cores.refresh()
        if tc.eval_every_steps > 0 and st.step % tc.eval_every_steps == 0:
            _validate(job)
        if tc.ckpt_every_steps > 0 and st.step % tc.ckpt_every_steps == 0:
            ckpt.save()
        return (tc.max_steps > 0 and st.step >= tc.max_steps) or signals.pending()

    n_epochs = tc.epochs if tc.max_steps <= 0 else math.ceil(tc.max_steps / job.steps_per_epoch)
    stopped = tc.max_steps > 0 and state.step >= tc.max_steps  # a resumed run that already reached the end
    while state.epoch < n_epochs and not stopped:
        stopped = train_one_epoch(
            method, model, job.train_set, ckpt.optimizer, ckpt.scheduler, cfg, state, device, logger, on_step_end
        )
        if state.step_in_epoch >= job.steps_per_epoch:
            if tc.eval_every > 0 and (state.epoch + 1) % tc.eval_every == 0:
                _validate(job)
            state.epoch += 1
            state.step_in_epoch = 0
        if stopped or state.epoch >= n_epochs or state.epoch % tc.ckpt_every_epochs == 0 or signals.pending():
            ckpt.save()
        signals.stop_if_pending(state.step, ckpt.run_dir)
    if tc.eval_every == 0 or (stopped and tc.eval_every_steps == 0):
        _validate(job)
        ckpt.save()
    signals.stop_if_pending(state.step, ckpt.run_dir)
    elapsed = state.train_seconds = ckpt.seconds()
    logger.info(f"training done: {state.step} steps in {elapsed:.1f}s")
    return elapsed


def _validate(job: _Training) -> None:
    """Evaluate on the validation split (if any); the main process keeps improved weights as ``best``."""
    if job.val_set is None:
        return
    cfg, state = job.cfg, job.ckpt.state
    metrics = evaluate(job.method, job.model, job.val_set, cfg, job.device)
    job.logger.log_eval(state.step, state.epoch, cfg.train.val_split, metrics)
    if dist_utils.is_main() and cfg.train.best_metric:
        job.ckpt.best(metrics)


def _test(job: _Training, final_split: str | None, result: dict[str, Any]) -> None:
    """Evaluate the model (the best weights) on ``final_split``, or on the validation split when the method
    has no such split; adds ``final`` and ``final_split`` to ``result`` and writes ``metrics.json``."""
    method, cfg, tc, state = job.method, job.cfg, job.cfg.train, job.ckpt.state
    split = final_split if final_split and method.has_split(cfg, final_split) else tc.val_split
    if not split:
        return
    ds = job.val_set if split == tc.val_split and job.val_set is not None else method.build_dataset(cfg, split)
    metrics = evaluate(method, job.model, ds, cfg, job.device)
    job.logger.log_eval(state.step, state.epoch, split, metrics)
    result["final"] = metrics
    result["final_split"] = split
    if dist_utils.is_main():
        best, step = job.ckpt.root / "best", result.get("best_step")
        write_method_metrics(Path(tc.output_dir) / "metrics.json", method, cfg, split, metrics, best, step)
        job.logger.print_metrics(split, metrics)


def run_eval(
    method: Any,
    cfg: Any,
    checkpoint: str | Path,
    split: str = "test",
    output_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, float]:
    """Evaluate a checkpoint (directory or .safetensors) on ``split`` with ``cfg`` (the config it was
    trained with, see :func:`groundkit.methods.load_run`). Writes ``metrics.json`` and ``config.yaml``
    only when ``output_dir`` is given; a folder holding a training run is refused unless ``overwrite``."""
    out = Path(output_dir) if output_dir else None
    if out is not None and dist_utils.is_main():
        refuse_training_folder(out, overwrite)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    with CoreShare(cfg.train.threads):
        model = method.build_model(cfg).to(device)
        ck = Path(checkpoint)
        load_weights(model, ck)
        ds = method.build_dataset(cfg, split)
        if ds is None:
            raise ConfigError(f"{method.name}: the config names no {split!r} data to evaluate")
        metrics = evaluate(method, model, ds, cfg, device)
    if out is not None and dist_utils.is_main():
        ck_dir = ck if ck.is_dir() else ck.parent
        step = None
        with contextlib.suppress(CheckpointError):
            step = read_meta(ck_dir).get("train_state", {}).get("step")
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml", method=method.name)
        write_method_metrics(out / "metrics.json", method, cfg, split, metrics, ck, step)
    return metrics
