"""Process-group set-up from torchrun/SLURM environment variables, and small collectives."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "barrier",
    "all_gather_object",
    "all_gather_with_grad",
    "all_reduce_flag",
    "cleanup",
]


def _env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's or SLURM's variables; (0, 0, 1) if none."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        return int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0)), int(os.environ["SLURM_NTASKS"])
    return 0, 0, 1


def init_distributed(device_pref: str = "auto") -> torch.device:
    """Initialise the default process group when launched by torchrun/srun; return this rank's device.

    CUDA ranks use NCCL and the GPU ``LOCAL_RANK``; CPU ranks use gloo.
    """
    r, local, world = _env_world()
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref not in ("auto", "cpu", "cuda") and not device_pref.startswith("cuda"):
        raise ValueError(f"train.device: expected auto, cpu, cuda or cuda:N, got {device_pref!r}")
    if device_pref.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={device_pref!r} but CUDA is not available on this machine")
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=r, world_size=world)
    if use_cuda:
        if device_pref.startswith("cuda:") and world == 1:
            dev = torch.device(device_pref)
        else:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from all ranks along dim 0, keeping the gradient of the local part.

    Used by batch-contrastive losses so every rank sees the global batch's negatives.
    """
    if not is_distributed():
        return x
    parts = [torch.zeros_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    parts[rank()] = x
    return torch.cat(parts, dim=0)


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
