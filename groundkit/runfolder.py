"""The run folder of a training (:func:`groundkit.engine.fit`) and what it guarantees.

- :class:`RunFolder`: locked while a training uses it; one that holds a run is refused unless ``resume`` or
  ``overwrite``; a training that fails before its first checkpoint leaves the folder as it was found.
- :func:`check_resume`: a resume with another config is refused (:data:`NEUTRAL_KEYS` may differ,
  :data:`LENGTH_KEYS` may grow) unless ``force``.
- :class:`Signals`: SIGINT/SIGTERM are remembered; the loop saves a checkpoint at the end of the step and
  raises :class:`~groundkit.errors.Interrupted`.
- :class:`Checkpointer`: ``checkpoints/`` (numbered checkpoints named by ``latest``, the ``best`` weights).
- :class:`RunRecord`: ``run.json`` records the status, steps, seconds and metrics; :func:`write_metrics`
  writes ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist_utils
from .checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, load_weights, read_meta, save_checkpoint
from .config import ConfigError, to_dict
from .errors import ConfigMismatchError, Interrupted, RunFolderError

try:  # run-folder locks (POSIX); elsewhere folders are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "NEUTRAL_KEYS",
    "LENGTH_KEYS",
    "RUN_ARTEFACTS",
    "RUN_FILE",
    "LOCK_FILE",
    "plain",
    "flatten_config",
    "config_differences",
    "format_differences",
    "check_resume",
    "read_run_record",
    "RunRecord",
    "RunFolder",
    "Signals",
    "Checkpointer",
    "write_metrics",
    "write_method_metrics",
    "refuse_training_folder",
]

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


# ----------------------------------------------------------------------------- config comparison


def plain(obj: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings, so stored and fresh values compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested config dict (JSON-normalised values)."""
    if prefix == "":
        d = plain(d)
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


def _total_steps(flat: dict[str, Any], steps_per_epoch: int) -> int:
    m = int(flat.get("train.max_steps") or 0)
    return m if m > 0 else int(flat.get("train.epochs") or 0) * steps_per_epoch


def check_resume(method: str, meta: dict[str, Any], cfg: Any, ckpt: Path, steps_per_epoch: int, force: bool) -> str:
    """Refuse to continue a checkpoint of another method, or of another config unless ``force``; returns a
    note for the log when the run only grows longer (or was forced)."""
    name = meta.get("method")
    if name and name != method:
        raise ConfigMismatchError(f"{ckpt} is a {name} run, not a {method} one")
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


# ----------------------------------------------------------------------------- run.json


def read_run_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` a training keeps in its folder (status, steps, seconds, metrics), or None."""
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunRecord:
    """The ``run.json`` of one training, rewritten atomically by the main process at each change of status.

    ``record`` (the caller's fields) comes first; ``state`` (step, epoch, train_seconds) and ``resumed_from``
    are read at each write."""

    def __init__(self, run_dir: Path, method: str, device: torch.device, threads: int, record: dict, state: Any):
        self.run_dir, self.method, self.device, self.threads = Path(run_dir), method, device, threads
        self.record, self.state = record, state
        self.resumed_from: int | None = None
        self.started = time.time()

    def write(self, status: str, **fields: Any) -> None:
        if not dist_utils.is_main():
            return
        rec = {
            **self.record,
            "status": status,
            "method": self.method,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started,
            "updated": time.time(),
            "resumed_from": self.resumed_from,
            "steps": self.state.step,
            "epochs_done": self.state.epoch,
            "train_seconds": self.state.train_seconds,
            "threads": self.threads,
            "device": str(self.device),
            "world_size": dist_utils.world_size(),
            **fields,
        }
        atomic_write_text(self.run_dir / RUN_FILE, json.dumps(rec, indent=1, default=str))

    def done(self, result: dict[str, Any], units: str) -> None:
        """A finished training: its final split and metrics, the best validation metrics and their step."""
        self.write(
            "done",
            finished=time.time(),
            final_split=result.get("final_split"),
            metrics=result.get("final", {}),
            best=result.get("best", {}),
            best_step=result.get("best_step"),
            units=units,
            train_seconds=result["train_seconds"],
        )

    def write_failure(self, error: BaseException) -> str:
        """Record a training that stopped on ``error`` (when a checkpoint is left to resume from); returns the
        status: ``interrupted`` for a KeyboardInterrupt (signals included), else ``failed``."""
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        if dist_utils.is_main() and latest_checkpoint(self.run_dir) is not None:
            with contextlib.suppress(Exception):
                self.write(status, error=f"{type(error).__name__}: {error}")
        return status


# ----------------------------------------------------------------------------- the folder


class RunFolder:
    """A run directory held by one training: locked while in use, refused when it holds another run,
    and left as it was found when the training fails before its first checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created = False
        self._made: list[Path] = []
        self._lock: Any = None
        self._fresh = False

    @classmethod
    def claim(cls, path: str | Path, resume: bool, overwrite: bool) -> RunFolder:
        """The folder, locked by the main process and ready for a training (called by every process; all of
        them raise when the main one cannot use it): one that holds a run is refused unless ``resume`` or
        ``overwrite`` (its run files are deleted first)."""
        folder = cls(path)
        problem: BaseException | None = None
        if dist_utils.is_main():
            try:
                folder._prepare(resume, overwrite)
            except BaseException as e:
                folder.release()
                problem = e
        if dist_utils.all_reduce_flag(problem is not None):
            if problem is not None:
                raise problem
            raise RunFolderError(f"{folder.path}: the main process could not use the run folder")
        return folder

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        self.acquire()
        self.remove_partial_writes()
        found = self.artefacts()
        if found and not resume and not overwrite:
            raise RunFolderError(
                f"{self.path} already holds {self.describe()}; pass --resume to continue it "
                "or --overwrite to replace it"
            )
        if overwrite or (found and latest_checkpoint(self.path) is None):
            self.clear()
        if latest_checkpoint(self.path) is None:
            self.mark_fresh()

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


def refuse_training_folder(out: Path, overwrite: bool) -> None:
    """An evaluation's output folder may not hold a training run (unless ``overwrite``)."""
    holds = [n for n in ("checkpoints", RUN_FILE, "log.jsonl") if (out / n).exists()]
    if holds and not overwrite:
        raise RunFolderError(
            f"{out} holds a training run; evaluation results go elsewhere (another --output-dir), "
            "or pass --overwrite to replace its metrics.json and config.yaml"
        )


# ----------------------------------------------------------------------------- signals


class Signals:
    """SIGINT / SIGTERM during training: remember the first one (the loop saves and stops at the end of
    the step); a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
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

    def pending(self) -> bool:
        """Whether any process received a signal (a collective: every process calls it at the same point)."""
        return dist_utils.all_reduce_flag(bool(self.signum))

    def stop_if_pending(self, step: int, run_dir: Path) -> None:
        """Raise :class:`~groundkit.errors.Interrupted` (naming the newest checkpoint) if :meth:`pending`."""
        if self.pending():
            last = latest_checkpoint(run_dir)
            raise Interrupted(self.signum or signal.SIGINT, step, str(last) if last else None, str(run_dir))


# ----------------------------------------------------------------------------- checkpoints/


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class Checkpointer:
    """The ``checkpoints/`` folder of one training: :meth:`resume` restores a checkpoint, :meth:`save` writes
    a numbered one (``latest`` names it, the older ones are removed), :meth:`best` keeps the weights that
    improve ``train.best_metric``, :meth:`last` is the newest complete checkpoint and :meth:`use_best` loads
    the best weights for the final evaluation. ``state`` is the loop's :class:`~groundkit.engine.TrainState`;
    its ``train_seconds`` count from :meth:`start` on, added to those of the runs it resumes."""

    def __init__(self, method: str, cfg: Any, model: Any, optimizer: Any, scheduler: Any, state: Any):
        self.run_dir = Path(cfg.train.output_dir)
        self.root = self.run_dir / "checkpoints"
        self.method, self.cfg = method, cfg
        self.model, self.optimizer, self.scheduler, self.state = model, optimizer, scheduler, state
        self.logger: Any = None
        self._base, self._t0 = state.train_seconds, time.perf_counter()

    def resume(self, ckpt: Path, device: torch.device) -> tuple[int, int]:
        """Weights, optimizer, schedule and RNG states as they were at ``ckpt``, and its ``state``; returns
        where the log continues: ``(log offset, step)``."""
        meta = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, map_location=device)
        self.state = type(self.state)(**meta["train_state"])
        return int(meta.get("log_offset", 1 << 62)), self.state.step

    def start(self, logger: Any) -> None:
        """Training starts: checkpoints record ``logger``'s offset; the clock starts."""
        self.logger = logger
        self._base, self._t0 = self.state.train_seconds, time.perf_counter()

    def seconds(self) -> float:
        """Training seconds up to now, summed over resumes."""
        return self._base + time.perf_counter() - self._t0

    def _meta(self, **extra: Any) -> dict[str, Any]:
        self.state.train_seconds = self.seconds()
        return {"method": self.method, "train_state": self.state.__dict__.copy(), "config": to_dict(self.cfg), **extra}

    def last(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save(self) -> None:
        """A numbered checkpoint of the current step, written by the main process; every process waits for it."""
        if dist_utils.is_main():
            name = f"step-{self.state.step:08d}"
            meta = self._meta(log_offset=self.logger.offset())
            save_checkpoint(self.root / name, self.model, self.optimizer, self.scheduler, meta=meta)
            atomic_write_text(self.root / "latest", name)
            for p in self.root.glob("step-*"):
                if p.name != name:
                    shutil.rmtree(p, ignore_errors=True)
        dist_utils.barrier()

    def best(self, metrics: dict[str, float]) -> None:
        """Keep the weights as ``best`` when ``metrics`` improve ``train.best_metric`` (main process)."""
        tc, state = self.cfg.train, self.state
        if tc.best_metric not in metrics:
            raise ConfigError(f"train.best_metric={tc.best_metric!r} is not among the metrics: {sorted(metrics)}")
        v = float(metrics[tc.best_metric])
        if _improved(v, state.best_value, tc.best_mode):
            state.best_value, state.best_step = v, state.step
            save_checkpoint(self.root / "best", self.model, meta=self._meta(metrics=metrics))
            self.logger.info(f"new best {tc.best_metric}={v:.4f} at step {state.step}")

    def use_best(self) -> dict[str, Any]:
        """After training: the ``best`` weights into the model (the final weights become ``best`` when none were
        kept); the main process returns ``{"best": its validation metrics, "best_step": its step}``."""
        main, best_dir, out = dist_utils.is_main(), self.root / "best", {}
        if main and self.cfg.train.best_metric and best_dir.is_dir():
            load_weights(self.model, best_dir)
            best_meta = read_meta(best_dir)
            out["best"] = best_meta.get("metrics", {})
            out["best_step"] = best_meta.get("train_state", {}).get("step")
        elif main and not best_dir.exists():
            save_checkpoint(best_dir, self.model, meta=self._meta())
            out["best_step"] = self.state.step
        elif main:
            out["best_step"] = read_meta(best_dir).get("train_state", {}).get("step")
        dist_utils.barrier()
        if dist_utils.is_distributed() and not main and best_dir.is_dir():
            load_weights(self.model, best_dir)
        return out


# ----------------------------------------------------------------------------- metrics.json


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


def write_method_metrics(
    path: Path, method: Any, cfg: Any, split: str, metrics: dict[str, float], checkpoint: Path, step: int | None
) -> None:
    """:func:`write_metrics` of ``method``'s evaluation of ``split``: its units and the data it read."""
    data = method.data_source(cfg, split)
    write_metrics(
        path, method.name, split, metrics, cfg, units=method.units, checkpoint=checkpoint, step=step, data=data
    )
