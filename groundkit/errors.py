"""Errors about the user's input or environment: the CLI reports them in one line, without a traceback
(set ``GROUNDKIT_DEBUG=1`` for the traceback). Each also derives from the built-in type callers expect.

:class:`Interrupted` is not an error: a training stopped by SIGINT/SIGTERM after saving a resumable
checkpoint. It derives from ``KeyboardInterrupt`` so that ``except Exception`` handlers do not swallow it.
"""

from __future__ import annotations

import signal

__all__ = ["GroundkitError", "DataError", "RunFolderError", "ConfigMismatchError", "Interrupted"]


class GroundkitError(Exception):
    """Base of groundkit's user-facing errors (bad config, bad data file, unusable checkpoint)."""


class DataError(GroundkitError, ValueError):
    """A data file that is missing a key, has the wrong shape or holds invalid values; the message
    names the file, the key and what was expected."""


class RunFolderError(GroundkitError, RuntimeError):
    """A run folder that already holds a run (and neither resume nor overwrite was asked), or that
    another process is using."""


class ConfigMismatchError(GroundkitError, ValueError):
    """``resume`` of a run whose checkpoint was trained with a different config; ``differences``
    lists ``(key, checkpoint value, current value)``."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]] | None = None):
        super().__init__(message)
        self.differences = list(differences or [])


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving ``checkpoint`` at ``step``; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, run_dir: str):
        self.signum, self.step, self.checkpoint, self.run_dir = int(signum), int(step), checkpoint, run_dir
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {signum}"
        saved = f"checkpoint saved at step {step} ({checkpoint})" if checkpoint else "no checkpoint saved yet"
        super().__init__(f"{name}: training stopped; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
