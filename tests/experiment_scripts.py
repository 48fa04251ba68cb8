"""The repo-level ``experiments/`` scripts, loaded from their files for the tests that exercise them (they are
not part of the installed package, so they cannot be imported by a package name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str) -> ModuleType:
    """``experiments/<name>.py`` as a module (loaded once per test process)."""
    key = f"_experiments_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, EXPERIMENTS / f"{name}.py")
        assert spec is not None and spec.loader is not None, f"no experiments/{name}.py"
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]
