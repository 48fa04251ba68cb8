"""Atomic checkpoints that load without executing pickled code.

A checkpoint is a directory::

    model.safetensors     model weights (safetensors)
    training_state.pt     optimizer / scheduler state and torch RNG states, loaded with weights_only=True
    meta.json             step, epoch, best metric, python/numpy RNG states, resolved config

It is written to a temporary directory and renamed into place, so a kill never leaves a half
written checkpoint; ``latest`` (a one-line text file, also replaced atomically) names the newest.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .distributed import unwrap_model
from .errors import ConfigMismatchError, GroundkitError

__all__ = [
    "find_run_files",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights",
    "init_weights",
    "latest_checkpoint",
    "rng_state",
    "set_rng_state",
    "atomic_write_text",
    "atomic_path",
    "atomic_dir",
    "read_meta",
    "CheckpointError",
]


class CheckpointError(GroundkitError, RuntimeError):
    """A checkpoint path that is missing, incomplete or does not match the model."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer; renamed to ``path`` when the block succeeds and
    removed when it fails, so a failed or killed conversion never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory: filled under a temporary name, then put in place of
    ``path`` (an existing ``path`` is replaced); removed entirely when the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states: JSON-able parts and tensors separated."""
    py = random.getstate()
    np_state = np.random.get_state()
    json_part = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all()) if torch.cuda.device_count() else None
    return {"json": json_part, "tensors": tensors}


def set_rng_state(json_part: dict[str, Any], tensors: dict[str, Any]) -> None:
    py = json_part["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json_part["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if tensors.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))


def save_checkpoint(
    ckpt_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    meta: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; returns its final path."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir.parent, prefix=f".{ckpt_dir.name}.tmp"))
    try:
        save_model(unwrap_model(model), str(tmp / "model.safetensors"))
        rng = rng_state()
        state = {"rng": rng["tensors"]}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if extra_state:
            state["extra"] = extra_state
        torch.save(state, tmp / "training_state.pt")
        m = dict(meta or {})
        m["rng"] = rng["json"]
        (tmp / "meta.json").write_text(json.dumps(m, indent=1, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if ckpt_dir.exists():
            old = ckpt_dir.with_name(f".{ckpt_dir.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(ckpt_dir, old)
            os.replace(tmp, ckpt_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt_dir


def _weights_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise CheckpointError(f"no checkpoint weights at {p} (expected a checkpoint directory or a .safetensors file)")
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: expected a .safetensors file; pickled checkpoints are not loaded")
    return p


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load model weights from a checkpoint directory or a ``.safetensors`` file. Returns the model's keys
    the file lacks and the file's keys the model lacks (both empty when ``strict``); a tensor whose shape
    differs is an error either way."""
    p = _weights_file(path)
    try:
        missing, unexpected = load_model(unwrap_model(model), str(p), strict=strict)
        return sorted(missing), sorted(unexpected)
    except SafetensorError as e:
        raise CheckpointError(f"{p}: not a readable safetensors file, truncated or corrupt ({e})") from None
    except RuntimeError as e:
        raise CheckpointError(f"{p}: weights do not match the model built from the config: {e}") from None


def init_weights(model: torch.nn.Module, init_from: str | Path, method: str, partial: bool = False) -> str:
    """``train.init_from``: weights of a run directory, a checkpoint directory or a .safetensors file (a run or
    checkpoint of another method than ``method`` is refused). ``partial``: the file may lack some of the model's
    tensors (they keep their initialisation) or hold tensors the model lacks; returns a note naming them."""
    p = Path(init_from)
    if p.is_dir():
        ck, _ = find_run_files(p)
        name = read_meta(ck).get("method")
        if name and name != method:
            raise ConfigMismatchError(f"train.init_from={init_from}: {ck} is a {name} run, not a {method} one")
        p = ck
    missing, unexpected = load_weights(model, p, strict=not partial)
    if not (missing or unexpected):
        return ""
    return f" (partial: {len(missing)} tensors kept their initialisation, e.g. {missing[:3]}; {len(unexpected)} unused)"


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``; a missing or unreadable one is a :class:`CheckpointError`."""
    p = Path(ckpt_dir) / "meta.json"
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing (not a complete checkpoint)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{p}: not readable JSON, truncated or corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_checkpoint(
    ckpt_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore weights, optimizer/scheduler and RNG states; returns meta (step, epoch, ...)."""
    ckpt_dir = Path(ckpt_dir)
    load_weights(model, ckpt_dir)
    meta_path = ckpt_dir / "meta.json"
    state_path = ckpt_dir / "training_state.pt"
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (need meta.json and training_state.pt)")
    meta = read_meta(ckpt_dir)
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, or a pickle that is not plain tensors
        raise CheckpointError(f"{state_path}: not a readable training state, truncated or corrupt ({e})") from None
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(meta["rng"], state["rng"])
    meta["extra_state"] = state.get("extra", {})
    return meta


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or "/" in name:
        return None
    p = Path(run_dir) / "checkpoints" / name
    return p if (p / "model.safetensors").is_file() and (p / "meta.json").is_file() else None


def find_run_files(path: str | Path) -> tuple[Path, Path]:
    """``(checkpoint directory, run directory)`` for a run directory, a checkpoint directory, or a
    checkpoint's ``.safetensors`` file. A run directory gives its best checkpoint (else its latest)."""
    p = Path(path).expanduser()
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if (p / "checkpoints").is_dir():
        best = p / "checkpoints" / "best"
        ck = best if (best / "meta.json").is_file() else latest_checkpoint(p)
        if ck is None:
            raise CheckpointError(f"{p}: run directory holds no checkpoint yet")
        return ck, p
    if (p / "meta.json").is_file():
        run = p.parent.parent if p.parent.name == "checkpoints" else p
        return p, run
    raise CheckpointError(f"{path}: neither a run directory (with checkpoints/) nor a checkpoint (with meta.json)")
