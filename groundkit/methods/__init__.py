"""The one registry of methods, read by the command line, the demo, the benchmarks and the web page.

Each entry names the package that holds the method (``groundkit/methods/<name>/``, exposing
``METHOD``, a :class:`~groundkit.methods.base.Method`). Packages are imported on first use, so
``groundkit --help`` stays fast and a method whose optional dependencies are missing only
disappears from the list.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, find_run_files, load_weights, read_meta
from ..config import apply_overrides, from_dict, load_yaml, migrate_keys
from ..errors import GroundkitError
from .base import Method, Predictor

__all__ = [
    "METHODS",
    "Method",
    "Predictor",
    "available_methods",
    "get_method",
    "load_run",
    "run_config",
    "run_method",
    "method_of_run",
    "find_run_files",
]

#: method name -> package holding ``METHOD``
METHODS: dict[str, str] = {
    "wang21": "groundkit.methods.wang21",
    "crosskd": "groundkit.methods.crosskd",
    "cogrounding": "groundkit.methods.cogrounding",
    "clipvg": "groundkit.methods.clipvg",
}


class UnknownMethodError(GroundkitError, KeyError):
    """A method name that is not registered or cannot be imported here."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _import(name: str) -> Method | None:
    mod_name = METHODS[name]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            return None
        raise
    return getattr(mod, "METHOD", None)


def available_methods() -> list[str]:
    """Registered methods that import in this installation."""
    return [n for n in METHODS if _import(n) is not None]


def get_method(name: str) -> Method:
    """The method registered under ``name``."""
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    m = _import(name)
    if m is None:
        raise UnknownMethodError(f"method {name!r} is not available in this installation")
    return m


def run_method(path: str | Path) -> str:
    """The method name a run directory or checkpoint was trained with."""
    ck, run = find_run_files(path)
    name = read_meta(ck).get("method")
    if not name and (run / "config.yaml").is_file():
        name = load_yaml(run / "config.yaml").get("method")
    if not name:
        raise CheckpointError(f"{ck}: the checkpoint names no method and {run}/config.yaml is missing")
    return str(name)


def method_of_run(path: str | Path) -> Method:
    """The registered method that trained a run directory or checkpoint (read from its metadata,
    without building the model)."""
    return get_method(run_method(path))


def run_config(
    path: str | Path, method: str | None = None, overrides: dict[str, Any] | None = None
) -> tuple[Method, Any, Path]:
    """``(method, config, checkpoint directory)`` of a run directory or any of its checkpoints, the config
    being the one it was trained with plus ``overrides``. ``method``: the method the caller expects
    (another one is a one-line :class:`~groundkit.checkpoint.CheckpointError`)."""
    ck, run = find_run_files(path)
    meta = read_meta(ck)
    name = meta.get("method")
    cfg_dict = meta.get("config")
    if (name is None or cfg_dict is None) and (run / "config.yaml").is_file():
        data = load_yaml(run / "config.yaml")
        name = name or data.pop("method", None)
        data.pop("method", None)
        cfg_dict = cfg_dict if cfg_dict is not None else data
    if not name or cfg_dict is None:
        raise CheckpointError(f"{ck}: the checkpoint names no method/config and {run}/config.yaml is missing")
    if method is not None and name != method:
        raise CheckpointError(f"{path} is a {name} run, not a {method} one")
    m = get_method(name)
    cfg_dict = migrate_keys(cfg_dict)  # a run of an earlier version names the built-in world in data.synth_*
    if overrides:
        cfg_dict = apply_overrides(m.config_class, cfg_dict, overrides)
    return m, from_dict(m.config_class, cfg_dict), ck


def load_run(
    path: str | Path, device: str | Any = "cpu", overrides: dict[str, Any] | None = None, method: str | None = None
) -> tuple[Method, Any, Any]:
    """``(method, config, model in eval mode)`` from a run directory or any of its checkpoints.

    The method and the config come from the checkpoint's own metadata (older checkpoints: the run's
    ``config.yaml``), so a model is always rebuilt the way it was trained; ``overrides``
    (``{"data.x": value}``) change what the caller wants changed, e.g. the evaluation files. ``method``
    names the method the caller expects: a run of another method is refused in one line.
    """
    m, cfg, ck = run_config(path, method, overrides)
    model = m.build_model(cfg)
    load_weights(model, ck)
    model.to(device)
    return m, cfg, model.eval()
