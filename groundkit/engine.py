"""The one training/evaluation engine shared by every method.

A *method* is a :class:`groundkit.methods.base.Method` (its docstring lists what the engine calls).
The loop (:func:`fit`): deterministic per-epoch sample order from ``(seed, epoch)``; bf16 autocast on
CUDA; gradient clipping; per-step LR schedule; evaluation every N epochs/steps on the validation
split with best-by-metric checkpoint selection (never on test); atomic safetensors checkpoints with
optimizer/scheduler/RNG state so that ``resume=True`` after a kill continues exactly; a stop on a
non-finite loss that keeps the last good checkpoint; tqdm progress, TensorBoard and JSONL logs.
``train.init_from`` starts from given weights and ``train.subset`` trains on listed samples of the
training split (what a self-paced curriculum needs); :func:`predict` returns per-sample outputs.

Run folders (:class:`RunFolder`): locked while a training uses them; one that holds a run is refused
unless ``resume`` or ``overwrite``; a resume with another config is refused (:data:`NEUTRAL_KEYS` may
differ, :data:`LENGTH_KEYS` may grow) unless ``force``; SIGINT/SIGTERM save a checkpoint at the end of
the step and raise :class:`~groundkit.errors.Interrupted`; ``run.json`` records the status, steps,
seconds and metrics; a training that fails before its first checkpoint leaves the folder as it was.
Torch threads come from :class:`~groundkit.distributed.CoreShare` (``train.threads``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import signal
import socket
import threading
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
    CheckpointError,
    atomic_write_text,
    find_run_files,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_meta,
    save_checkpoint,
)
from .config import ConfigError, save_config, to_dict
from .distributed import CoreShare
from .errors import ConfigMismatchError, GroundkitError, Interrupted, RunFolderError
from .optim import build_optimizer, build_scheduler
from .runlog import RunLogger

try:  # run-folder locks (POSIX); elsewhere folders are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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
    "RunFolder",
    "read_run_record",
    "config_differences",
    "flatten_config",
    "NEUTRAL_KEYS",
    "LENGTH_KEYS",
    "RUN_ARTEFACTS",
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
    of ranks is skipped so that every rank takes part in every step (with ``drop_last`` any incomplete one). Datasets with a vectorised
    ``get_batch`` are gathered in this process; others go through a DataLoader with
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
        loader_seed=_epoch_seed(tc.seed, state.epoch),
        drop_last=tc.drop_last,
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


# ----------------------------------------------------------------------------- run folders

#: config keys that do not change what a run computes (where it writes, what it shows, which device it ran
#: on, where its feature caches live: their contents are a function of the inputs alone); a resumed run may
#: differ in them, and ``groundkit.runs`` ignores them when it compares a folder's run with a spec. The
#: thread count may differ on resume too, but ``groundkit.runs`` compares it (float results depend on it).
NEUTRAL_KEYS: tuple[str, ...] = (
    "train.output_dir",
    "train.progress",
    "train.tensorboard",
    "train.log_every",
    "train.device",
    "train.threads",
    "train.num_workers",
    "data.cache_dir",  # clipvg
    "data.feature_cache",  # cogrounding
)
#: keys that set the length of training: a resumed run may train *longer* (the total number of steps
#: may grow, e.g. more epochs for a finished run), never shorter. A schedule that depends on the total
#: (cosine, poly) then follows the new length, so such a result is not that of a run trained that long
#: from the start; the log notes the extension.
LENGTH_KEYS: tuple[str, ...] = ("train.epochs", "train.max_steps")
#: what a training writes into its folder (``overwrite`` removes these, nothing else)
RUN_ARTEFACTS: tuple[str, ...] = ("checkpoints", "tb", "metrics.json", "run.json", "config.yaml", "log.jsonl")
RUN_FILE = "run.json"
LOCK_FILE = ".lock"


def _plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings, so stored and fresh values compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested config dict (JSON-normalised values)."""
    if prefix == "":
        d = _plain(d)
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten_config(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: Any = NEUTRAL_KEYS) -> list[tuple]:
    """``(key, old value, new value)`` of the keys whose values differ, ``ignore`` left out."""
    a, b = flatten_config(old), flatten_config(new)
    keys = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in keys]


def format_differences(diffs: list[tuple], limit: int = 6) -> str:
    shown = [f"{k}: {o!r} -> {n!r}" for k, o, n in diffs[:limit]]
    return "; ".join(shown) + (f"; ... ({len(diffs) - limit} more)" if len(diffs) > limit else "")


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` a training keeps in its folder (status, steps, seconds, metrics), or None."""
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunFolder:
    """A run directory held by one training: locked while in use, refused when it holds another run,
    and left as it was found when the training fails before its first checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created = False
        self._made: list[Path] = []
        self._lock: Any = None
        self._fresh = False

    def acquire(self) -> None:
        """Create and lock the folder; :class:`RunFolderError` if another process holds it."""
        try:
            self.created = not self.path.exists()
            # the folders this call creates, deepest first (a failed first training removes them again)
            self._made = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            f = open(self.path / LOCK_FILE, "a+")
        except OSError as e:
            raise RunFolderError(
                f"{self.path}: cannot create the run folder ({e.strerror or e}); choose another --output-dir"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                owner = f.read().strip()
                f.close()
                raise RunFolderError(
                    f"{self.path} is in use by another training ({owner or 'another process'}); "
                    "wait for it to finish or choose another --output-dir"
                ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock = f

    def artefacts(self) -> list[str]:
        return [n for n in RUN_ARTEFACTS if (self.path / n).exists()]

    def remove_partial_writes(self) -> None:
        """Temporary files and folders of atomic writes cut short by a kill (held lock: no writer is
        running). The files they were replacing are intact."""
        stale = (".tmp", ".old")
        targets = [p for n in RUN_ARTEFACTS for p in self.path.glob(f".{n}.*")]
        targets += [p for p in (self.path / "checkpoints").glob(".*") if any(t in p.name for t in stale)]
        targets += list((self.path / "checkpoints").glob(".latest.*"))
        for p in targets:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

    def describe(self) -> str:
        rec = read_run_record(self.path) or {}
        status = rec.get("status")
        if status == "done":
            return f"a finished run ({rec.get('steps')} steps)"
        if latest_checkpoint(self.path) is not None:
            return f"an unfinished run (checkpoint {latest_checkpoint(self.path).name})"
        return f"the files of another run ({', '.join(self.artefacts())})"

    def clear(self) -> None:
        for name in RUN_ARTEFACTS:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def mark_fresh(self) -> None:
        """This training starts the folder's run: a failure before the first checkpoint undoes it."""
        self._fresh = True

    def release(self, failed: bool = False) -> None:
        if failed and self._fresh and latest_checkpoint(self.path) is None:
            self.clear()  # nothing worth keeping: leave the folder as it was found
        if failed and self.created and (self._fresh or not self.artefacts()):
            with contextlib.suppress(OSError):  # a folder (and parents) this training made and never used
                (self.path / LOCK_FILE).unlink()
                for p in self._made:
                    p.rmdir()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class _Signals:
    """SIGINT / SIGTERM during training: remember the first one (the loop saves and stops at the end of
    the step); a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without saving")
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# ----------------------------------------------------------------------------- fit


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _relative(path: str | Path, base: str | Path) -> str:
    p, b = Path(path).resolve(), Path(base).resolve()
    try:
        return str(p.relative_to(b))
    except ValueError:
        return str(p)


def write_metrics(
    path: str | Path,
    task: str,
    split: str,
    metrics: dict[str, float],
    cfg: Any,
    units: str = "percent",
    checkpoint: str | Path | None = None,
    step: int | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """``metrics.json``, written atomically: ``{"task", "split", "units", "metrics", "checkpoint", "step",
    "data", "config"}`` (``units``: rates in percent; ``checkpoint`` relative to the file's folder when
    inside it; ``step``: the optimisation step of those weights; ``data``: the files evaluated)."""
    path = Path(path)
    payload = {
        "task": task,
        "split": split,
        "units": units,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "checkpoint": None if checkpoint is None else _relative(checkpoint, path.parent),
        "step": step,
        "data": data or {},
        "config": to_dict(cfg),
    }
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))


def _total_steps(flat: dict[str, Any], steps_per_epoch: int) -> int:
    m = int(flat.get("train.max_steps") or 0)
    return m if m > 0 else int(flat.get("train.epochs") or 0) * steps_per_epoch


def _check_resume(method: Any, meta: dict[str, Any], cfg: Any, ckpt: Path, steps_per_epoch: int, force: bool) -> str:
    """Refuse to continue a checkpoint of another method, or of another config unless ``force``; returns a
    note for the log when the run only grows longer (or was forced)."""
    name = meta.get("method")
    if name and name != method.name:
        raise ConfigMismatchError(f"{ckpt} is a {name} run, not a {method.name} one")
    old = meta.get("config")
    if not isinstance(old, dict):
        return ""
    new = to_dict(cfg)
    diffs = config_differences(old, new, ignore=NEUTRAL_KEYS + LENGTH_KEYS)
    a, b = flatten_config(old), flatten_config(new)
    old_total, new_total = _total_steps(a, steps_per_epoch), _total_steps(b, steps_per_epoch)
    length = [(k, a.get(k), b.get(k)) for k in LENGTH_KEYS if a.get(k) != b.get(k)]
    if new_total < old_total:
        diffs += length
    if diffs and not force:
        raise ConfigMismatchError(
            f"{ckpt} was trained with another config ({format_differences(diffs)}); resume it with the same "
            "config, pass --force to continue it anyway, or --overwrite to start over",
            diffs,
        )
    notes = []
    if diffs:
        notes.append(f"resumed despite a changed config ({format_differences(diffs)})")
    if length and new_total >= old_total:
        notes.append(f"training extended from {old_total} to {new_total} steps ({format_differences(length)})")
    return "; ".join(notes)


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
    run_dir = Path(tc.output_dir)
    main = dist_utils.is_main()
    folder = RunFolder(run_dir)
    problem: BaseException | None = None
    if main:
        try:
            folder.acquire()
            folder.remove_partial_writes()
            found = folder.artefacts()
            if found and not resume and not overwrite:
                raise RunFolderError(
                    f"{run_dir} already holds {folder.describe()}; pass --resume to continue it "
                    "or --overwrite to replace it"
                )
            if overwrite or (found and latest_checkpoint(run_dir) is None):
                folder.clear()
            if latest_checkpoint(run_dir) is None:
                folder.mark_fresh()
        except BaseException as e:
            folder.release()
            problem = e
    if dist_utils.all_reduce_flag(problem is not None):
        if problem is not None:
            raise problem
        raise RunFolderError(f"{run_dir}: the main process could not use the run folder")

    logger: RunLogger | None = None
    status = "failed"
    state = TrainState()
    last: Path | None = None
    started, resumed_from, threads_used = time.time(), None, cores.threads

    def write_record(status_: str, **fields: Any) -> None:
        if not main:
            return
        rec = {
            **record,
            "status": status_,
            "method": method.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": started,
            "updated": time.time(),
            "resumed_from": resumed_from,
            "steps": state.step,
            "epochs_done": state.epoch,
            "train_seconds": state.train_seconds,
            "threads": threads_used,
            "device": str(device),
            "world_size": dist_utils.world_size(),
            **fields,
        }
        atomic_write_text(run_dir / RUN_FILE, json.dumps(rec, indent=1, default=str))

    try:
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
        last = latest_checkpoint(run_dir) if resume else None
        note, resume_at = "", None
        if last is not None:  # refuse another method or config before any work
            note = _check_resume(method, read_meta(last), cfg, last, steps_per_epoch, force)
        model = method.build_model(cfg)
        init_note = ""
        if tc.init_from and last is None:
            init_note = _init_weights(method, model, tc.init_from, partial=tc.init_partial)
        model = model.to(device)
        method.on_train_start(model, train_set.dataset if isinstance(train_set, Subset) else train_set, cfg, device)
        optimizer = build_optimizer(model, cfg.optim)
        total_steps = tc.max_steps if tc.max_steps > 0 else steps_per_epoch * tc.epochs
        scheduler = build_scheduler(optimizer, cfg.sched, total_steps, steps_per_epoch)
        if last is not None:  # weights, optimizer, schedule and RNG states, as they were at the checkpoint
            meta = load_checkpoint(last, model, optimizer, scheduler, map_location=device)
            state = TrainState(**meta["train_state"])
            resumed_from = state.step
            resume_at = (int(meta.get("log_offset", 1 << 62)), state.step)

        if main:
            save_config(cfg, run_dir / "config.yaml", method=method.name)
        logger = RunLogger(run_dir, enabled=main, tensorboard=tc.tensorboard, progress=tc.progress, resume_at=resume_at)
        if last is not None:
            logger.info(f"resumed from {last} (epoch {state.epoch + 1}, step {state.step})")
        elif resume:
            logger.info(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; starting from scratch")
        if note:
            logger.warn(note)
        if tc.init_from and last is None:
            logger.info(f"weights initialised from {tc.init_from}{init_note}")
        base_seconds, t_start = state.train_seconds, time.perf_counter()
        write_record("running")
        with _Signals() as signals:
            result = _train_and_test(
                method,
                cfg,
                model,
                optimizer,
                scheduler,
                train_set,
                val_set,
                state,
                device,
                logger,
                cores,
                signals,
                final_split,
                steps_per_epoch,
                lambda: base_seconds + time.perf_counter() - t_start,
            )
        result.update(run_dir=str(run_dir), resumed=last is not None)
        write_record(
            "done",
            finished=time.time(),
            final_split=result.get("final_split"),
            metrics=result.get("final", {}),
            best=result.get("best", {}),
            best_step=result.get("best_step"),
            units=method.units,
            train_seconds=result["train_seconds"],
        )
        status = "done"
        return result
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        if main and latest_checkpoint(run_dir) is not None:
            with contextlib.suppress(Exception):
                write_record(status, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if logger is not None:
            logger.close()
        if main:
            folder.release(failed=status != "done")


def _init_weights(method: Any, model: nn.Module, init_from: str, partial: bool = False) -> str:
    """``train.init_from``: weights of a run directory, a checkpoint directory or a .safetensors file.
    ``partial``: the file may lack some of the model's tensors (they keep their initialisation) or hold
    tensors the model lacks; returns a note naming them."""
    p = Path(init_from)
    if p.is_dir():
        ck, _ = find_run_files(p)
        name = read_meta(ck).get("method")
        if name and name != method.name:
            raise ConfigMismatchError(f"train.init_from={init_from}: {ck} is a {name} run, not a {method.name} one")
        p = ck
    missing, unexpected = load_weights(model, p, strict=not partial)
    if not (missing or unexpected):
        return ""
    return f" (partial: {len(missing)} tensors kept their initialisation, e.g. {missing[:3]}; {len(unexpected)} unused)"


def _train_and_test(
    method: Any,
    cfg: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    train_set: Any,
    val_set: Any,
    state: TrainState,
    device: torch.device,
    logger: RunLogger,
    cores: CoreShare,
    signals: _Signals,
    final_split: str | None,
    steps_per_epoch: int,
    seconds: Any,
) -> dict[str, Any]:
    """The training loop, the best-checkpoint selection and the final evaluation of :func:`fit`."""
    tc = cfg.train
    run_dir = Path(tc.output_dir)
    main = dist_utils.is_main()
    ckpt_root = run_dir / "checkpoints"
    train_model: nn.Module = model
    if dist_utils.is_distributed():
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tc.compile:
        train_model = torch.compile(train_model)

    def meta(**extra: Any) -> dict[str, Any]:
        state.train_seconds = seconds()
        return {"method": method.name, "train_state": state.__dict__.copy(), "config": to_dict(cfg), **extra}

    def save(name: str) -> Path:
        p = save_checkpoint(ckpt_root / name, model, optimizer, scheduler, meta=meta(log_offset=logger.offset()))
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
                raise ConfigError(f"train.best_metric={tc.best_metric!r} is not among the metrics: {sorted(metrics)}")
            v = float(metrics[tc.best_metric])
            if _improved(v, state.best_value, tc.best_mode):
                state.best_value, state.best_step = v, state.step
                save_checkpoint(ckpt_root / "best", model, meta=meta(metrics=metrics))
                logger.info(f"new best {tc.best_metric}={v:.4f} at step {state.step}")

    def checkpoint_now() -> None:
        if main:
            name = f"step-{state.step:08d}"
            save(name)
            prune(name)
        dist_utils.barrier()

    def interrupted() -> bool:
        return dist_utils.all_reduce_flag(bool(signals.signum))

    def stop_if_interrupted() -> None:
        if interrupted():
            last = latest_checkpoint(run_dir)
            raise Interrupted(signals.signum or signal.SIGINT, state.step, str(last) if last else None, str(run_dir))

    def on_step_end(st: TrainState) -> bool:
        cores.refresh()
        if tc.eval_every_steps > 0 and st.step % tc.eval_every_steps == 0:
            run_validation()
        if tc.ckpt_every_steps > 0 and st.step % tc.ckpt_every_steps == 0:
            checkpoint_now()
        return (tc.max_steps > 0 and st.step >= tc.max_steps) or interrupted()

    n_epochs = tc.epochs if tc.max_steps <= 0 else math.ceil(tc.max_steps / steps_per_epoch)
    stopped = tc.max_steps > 0 and state.step >= tc.max_steps  # a resumed run that already reached the end
    while state.epoch < n_epochs and not stopped:
        stopped = train_one_epoch(
            method, train_model, train_set, optimizer, scheduler, cfg, state, device, logger, on_step_end
        )
        if state.step_in_epoch >= steps_per_epoch:
            if tc.eval_every > 0 and (state.epoch + 1) % tc.eval_every == 0:
                run_validation()
            state.epoch += 1
            state.step_in_epoch = 0
        if stopped or state.epoch >= n_epochs or state.epoch % tc.ckpt_every_epochs == 0 or interrupted():
            checkpoint_now()
        stop_if_interrupted()
    if tc.eval_every == 0 or (stopped and tc.eval_every_steps == 0):
        run_validation()
        checkpoint_now()
    stop_if_interrupted()
    elapsed = state.train_seconds = seconds()
    logger.info(f"training done: {state.step} steps in {elapsed:.1f}s")

    result: dict[str, Any] = {"steps": state.step, "train_seconds": elapsed}
    best_dir = ckpt_root / "best"
    if main and tc.best_metric and best_dir.is_dir():
        load_weights(model, best_dir)
        best_meta = read_meta(best_dir)
        result["best"] = best_meta.get("metrics", {})
        result["best_step"] = best_meta.get("train_state", {}).get("step")
    elif main and not best_dir.exists():
        save_checkpoint(best_dir, model, meta=meta())
        result["best_step"] = state.step
    elif main:
        result["best_step"] = read_meta(best_dir).get("train_state", {}).get("step")
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
            write_metrics(
                run_dir / "metrics.json",
                method.name,
                split,
                metrics,
                cfg,
                units=method.units,
                checkpoint=best_dir,
                step=result.get("best_step"),
                data=method.data_source(cfg, split),
            )
            logger.print_metrics(split, metrics)
    return result  # a signal during the final evaluation comes too late to save anything: the run is done


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
        holds = [n for n in ("checkpoints", RUN_FILE, "log.jsonl") if (out / n).exists()]
        if holds and not overwrite:
            raise RunFolderError(
                f"{out} holds a training run; evaluation results go elsewhere (another --output-dir), "
                "or pass --overwrite to replace its metrics.json and config.yaml"
            )
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
        write_metrics(
            out / "metrics.json",
            method.name,
            split,
            metrics,
            cfg,
            units=method.units,
            checkpoint=ck,
            step=step,
            data=method.data_source(cfg, split),
        )
    return metrics
