"""Process-group set-up from torchrun/SLURM environment variables, small collectives, and the CPU
threads of a process (the cores it may really use, shared with the other groundkit trainings on the
machine: see :class:`CoreShare`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
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
    "all_reduce_flag",
    "unwrap_model",
    "cleanup",
    "usable_cores",
    "CoreShare",
    "fixed_threads",
    "float_fingerprint",
    "padded_chunks",
    "stored_features",
    "device_fingerprint",
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


def all_reduce_flag(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers, nested in
    either order; an unwrapped model is returned as it is."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- CPU threads

try:  # POSIX advisory locks; elsewhere the share degrades to "alone"
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota``), None when unlimited/unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """CPU cores this process may really use: its affinity mask (not the machine's count), capped by a
    cgroup CPU quota when there is one; at least 1."""
    n = len(_affinity())
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, int(limit))
    return max(1, n)


def _share_dir() -> Path:
    """Where the trainings of this user register (``$GROUNDKIT_SHARE_DIR`` or the temp folder)."""
    env = os.environ.get("GROUNDKIT_SHARE_DIR")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(env) if env else Path(tempfile.gettempdir()) / f"groundkit-{uid}" / "trainings"


class CoreShare:
    """The torch thread count of one training, shared with the other groundkit trainings on this machine.

    With ``requested > 0`` the count is fixed. With ``requested == 0`` (``train.threads: 0``) the process
    registers itself (a file it keeps locked in :func:`_share_dir`, released by the kernel if the process
    dies) and uses ``usable_cores() // n`` threads, ``n`` being the number of live registered trainings
    whose cores overlap its own (and at most ``OMP_NUM_THREADS`` when that is set); :meth:`refresh`
    re-counts every ``interval`` seconds, so a training that starts or ends beside it changes its thread
    count within seconds. Two trainings on a 2-core machine thus run on one thread each instead of four
    threads fighting over two cores (OpenMP threads that wait on each other slow both runs down many
    times over). Float results can depend on the thread count: set ``train.threads`` for bit-exact
    repeats of a run on a busy machine.
    """

    def __init__(self, requested: int = 0, interval: float = 2.0):
        self.requested, self.interval = int(requested), float(interval)
        self.cores = _affinity()
        self._file: Any = None
        self._path: Path | None = None
        self._checked = 0.0
        self.threads = self.requested if self.requested > 0 else usable_cores()
        self._saved = torch.get_num_threads()

    def __enter__(self) -> CoreShare:
        if self.requested <= 0 and fcntl is not None:
            with contextlib.suppress(OSError):
                self._register()
        self._apply(self._count() if self.requested <= 0 else self.requested, force=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _register(self) -> None:
        d = _share_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{os.getpid()}-{id(self)}.tmp"
        f = open(tmp, "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps({"pid": os.getpid(), "cores": sorted(self.cores)}))
        f.flush()
        path = d / f"{os.getpid()}-{id(self)}.lock"
        os.replace(tmp, path)  # visible only once locked: a reader never mistakes it for a dead one
        self._file, self._path = f, path

    def _live(self) -> int:
        """Registered trainings (this one included) alive and sharing a core with this one."""
        if self._path is None:
            return 1
        n = 0
        for p in self._path.parent.glob("*.lock"):
            if p == self._path:
                n += 1
                continue
            try:
                with open(p) as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:  # held: its owner is running
                        info = json.loads(f.read() or "{}")
                        if not info.get("cores") or self.cores & set(info["cores"]):
                            n += 1
                        continue
                    p.unlink()  # its owner died without cleaning up
            except (OSError, ValueError):
                continue
        return max(1, n)

    def _count(self) -> int:
        n = usable_cores() // self._live()
        cap = os.environ.get("OMP_NUM_THREADS", "")
        if cap.isdigit() and int(cap) > 0:  # the environment's own limit is kept
            n = min(n, int(cap))
        return max(1, n)

    def _apply(self, n: int, force: bool = False) -> None:
        if force or n != self.threads:
            self.threads = n
            torch.set_num_threads(n)
        self._checked = time.monotonic()

    def refresh(self) -> int:
        """Re-count the trainings beside this one (at most every ``interval`` s); the current thread count."""
        if self.requested <= 0 and time.monotonic() - self._checked >= self.interval:
            self._apply(self._count())
        return self.threads

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self._file.close()
            self._file = self._path = None
        torch.set_num_threads(self._saved)


# ----------------------------------------------------------------------------- float reproducibility


@contextlib.contextmanager
def fixed_threads(n: int = 1) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block and restored after it.

    On the CPU a reduction split over threads sums in another order, so a float result can change its last
    bits with the thread count; code whose output is stored and shared (world features, feature caches)
    runs inside this block so that its bytes do not depend on the machine's or the caller's threads.
    """
    saved = torch.get_num_threads()
    if n != saved:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


_FINGERPRINT: str | None = None


def float_fingerprint() -> str:
    """A short hash of the torch version and of the bits a few CPU float kernels produce on one thread.

    The kernels (GEMM, dense and depthwise convolution, softmax, sums and the usual activations on seeded
    inputs) are those that the stored features go through. Two processes with the same fingerprint round
    alike; another CPU instruction set (AVX2 vs AVX-512 in MKL, oneDNN or ATen), another torch build or
    another BLAS changes it. Used to tell a bit-exact repeat from one that can only be close.
    """
    global _FINGERPRINT
    if _FINGERPRINT is None:
        import torch.nn.functional as F  # noqa: PLC0415

        with fixed_threads(1):
            g = torch.Generator().manual_seed(0)
            a, b = torch.randn(37, 200, generator=g), torch.randn(200, 96, generator=g)
            x, w = torch.randn(2, 16, 15, 15, generator=g), torch.randn(24, 16, 3, 3, generator=g)
            dw = torch.randn(16, 1, 3, 3, generator=g)
            outs = [a @ b, F.conv2d(x, w, padding=1), F.conv2d(x, dw, groups=16), torch.softmax(a, 1), a.sum(1)]
            outs += [f(a) for f in (torch.sigmoid, torch.exp, torch.tanh, F.silu, F.gelu)]
            h = hashlib.sha256(torch.__version__.encode())
            for o in outs:
                h.update(o.contiguous().numpy().tobytes())
        _FINGERPRINT = h.hexdigest()[:16]
    return _FINGERPRINT


def padded_chunks(items: Sequence[Any], size: int) -> Iterator[tuple[list[Any], int]]:
    """``items`` in chunks of exactly ``size`` (the last padded by repeating its last item), each with the
    number of real items at its front.

    A kernel's result for one row depends on the batch's size (another GEMM blocking on the CPU), not on the
    other rows: features computed in chunks of one size are a function of each item alone, whatever else was
    missing from a cache and encoded beside it.
    """
    if size < 1:
        raise ValueError(f"padded_chunks: size must be >= 1, got {size}")
    for s in range(0, len(items), size):
        chunk = list(items[s : s + size])
        yield chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)


def stored_features(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context in which features that a cache shares between runs are computed: one thread on the CPU
    (see :func:`fixed_threads`), nothing to fix on an accelerator."""
    return fixed_threads(1) if torch.device(device).type == "cpu" else contextlib.nullcontext()


def device_fingerprint(device: torch.device | str) -> str:
    """:func:`float_fingerprint` on the CPU, the accelerator's name and torch version elsewhere: a feature
    cache keyed by it is never shared by processes whose kernels round differently."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return float_fingerprint()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return f"{name}|torch {torch.__version__}"
