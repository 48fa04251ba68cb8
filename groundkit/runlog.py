"""Run logging: a tqdm progress bar, TensorBoard scalars and a JSON-lines log (rank 0 only).

``progress=False`` is the quiet mode: no bar and no lines on stderr (evaluations, notes); everything
still goes to ``log.jsonl``. A resumed run cuts ``log.jsonl`` back to where its checkpoint was taken
(:meth:`RunLogger.offset` is stored in every checkpoint) and purges later TensorBoard steps, so the
log holds each step once."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["RunLogger", "format_metrics"]


class _NullBar:
    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, **kw: Any) -> None: ...

    def close(self) -> None: ...


def format_metrics(metrics: dict[str, float], digits: int = 2) -> str:
    return "  ".join(f"{k}={v:.{digits}f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


class RunLogger:
    """Writes ``log.jsonl`` (one record per logged step/eval) and TensorBoard events under ``run_dir``."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        resume_at: tuple[int, int] | None = None,
    ):
        """``resume_at=(log offset, step)``: continue a run whose checkpoint was taken when ``log.jsonl``
        held ``offset`` bytes, at optimisation step ``step`` (later records and TensorBoard steps go)."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.show_progress = progress and enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "log.jsonl"
            self._jsonl = open(path, "a")
            if resume_at is not None and resume_at[0] < path.stat().st_size:
                self._jsonl.truncate(max(0, resume_at[0]))
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (heavy, loaded on first use)

                    purge = resume_at[1] + 1 if resume_at is not None else None
                    self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)
                except ImportError:  # tensorboard is a dependency; stay usable without it
                    self._tb = None

    def offset(self) -> int:
        """Bytes written to ``log.jsonl`` so far (what a checkpoint records for a later resume)."""
        if self._jsonl is None:
            return 0
        self._jsonl.flush()
        return self._jsonl.tell()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def progress(self, total: int, initial: int = 0, desc: str = "") -> Any:
        if not self.show_progress:
            return _NullBar()
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)

    def _write(self, rec: dict[str, Any]) -> None:
        if self._jsonl is not None:
            rec = {"time": round(time.time(), 3), **rec}
            self._jsonl.write(json.dumps(rec) + "\n")
            self._jsonl.flush()

    def log_train(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", "step": step, "epoch": epoch, **values})
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def log_eval(self, step: int, epoch: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write(
            {"kind": "eval", "step": step, "epoch": epoch, "split": split, **{k: float(v) for k, v in metrics.items()}}
        )
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), step)
        self.info(f"[{split} @ step {step}] {format_metrics(metrics)}")

    def info(self, msg: str) -> None:
        """A note: on stderr unless quiet, always in ``log.jsonl``."""
        if self.enabled:
            if self.show_progress:
                tqdm.write(msg, file=sys.stderr)
            self._write({"kind": "info", "msg": msg})

    def warn(self, msg: str) -> None:
        """Something the user should see even in quiet mode (stderr and ``log.jsonl``)."""
        if self.enabled:
            tqdm.write(f"warning: {msg}", file=sys.stderr)
            self._write({"kind": "warning", "msg": msg})

    def print_metrics(self, split: str, metrics: dict[str, float]) -> None:
        """The final metrics on stdout (not in quiet mode: whoever ran a quiet training reports them)."""
        if self.show_progress:
            print(f"{split}: {format_metrics(metrics)}", flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
