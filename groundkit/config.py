"""Typed configuration: dataclasses loaded from YAML, overridden from the command line.

One config system for every method. A method's config is a dataclass whose fields are
other dataclasses (``data``, ``model``, ``loss`` ...) plus the shared ``optim``, ``sched``
and ``train`` sections defined here. YAML files shipped under ``groundkit/methods/<method>/configs/``
fill it; ``--set a.b=value`` overrides single keys. Unknown keys and wrong types are rejected
with a message naming the key and listing the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import GroundkitError

__all__ = [
    "ConfigError",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "ExperimentConfig",
    "DataConfig",
    "WorldConfig",
    "RENAMED_KEYS",
    "migrate_keys",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "load_config",
    "save_config",
    "config_dir",
    "list_configs",
    "resolve_config_path",
    "method_of",
]

T = TypeVar("T")


class ConfigError(GroundkitError, ValueError):
    """A config file or override that does not fit the typed schema."""


# ----------------------------------------------------------------------------- shared sections


@dataclass
class ParamGroup:
    """Parameters whose name contains ``match`` get their own lr multiplier / weight decay."""

    match: str = ""
    lr_mult: float = 1.0
    weight_decay: float | None = None


@dataclass
class OptimConfig:
    """Optimizer: the ones the four seeds use (Adam, AdamW, RAdam, RMSprop)."""

    name: Literal["adam", "adamw", "radam", "rmsprop", "sgd"] = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    fused: bool = True  # fused kernels on CUDA; ignored on CPU
    param_groups: list[ParamGroup] = field(default_factory=list)


@dataclass
class SchedConfig:
    """Learning-rate schedule, stepped per optimisation step or per epoch."""

    name: Literal["constant", "step", "poly", "cosine"] = "constant"
    interval: Literal["step", "epoch"] = "step"
    warmup_steps: int = 0  # linear warm-up, counted in optimisation steps
    step_size: int = 1  # for "step": decay every step_size intervals
    gamma: float = 0.1  # for "step"
    power: float = 0.9  # for "poly"
    min_lr_ratio: float = 0.0  # for "cosine"/"poly": final lr = lr * min_lr_ratio


@dataclass
class TrainConfig:
    """The shared training loop's knobs."""

    epochs: int = 1
    max_steps: int = 0  # >0 stops after this many optimisation steps (overrides epochs)
    batch_size: int = 32  # global batch (split across DDP ranks)
    drop_last: bool = False  # leave out each epoch's last incomplete batch (as the official TransVG/CLIP-VG loaders)
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    eval_every: int = 1  # evaluate every N epochs (0: only at the end)
    eval_every_steps: int = 0  # >0: also evaluate every N steps
    val_split: str = "val"
    best_metric: str = ""  # metric name used for best-checkpoint selection ("" = last)
    best_mode: Literal["max", "min"] = "max"
    ckpt_every_steps: int = 0  # >0: also checkpoint every N steps (for resume)
    ckpt_every_epochs: int = 1  # checkpoint at the end of every N-th epoch (and when stopping); >1 for tiny epochs
    log_every: int = 10
    num_workers: int = 0
    threads: int = 0  # torch threads; 0: the cores this process may use, shared with other groundkit trainings
    init_from: str = ""  # start from these weights (a run directory, checkpoint directory or .safetensors)
    init_partial: bool = False  # init_from may lack parameters of this model (e.g. an image model for the video one)
    subset: str = ""  # train only on these samples of the training split (JSON list or one index per line)
    output_dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True  # false: quiet (no progress bar, no per-evaluation lines; log.jsonl keeps them)

    def __post_init__(self) -> None:
        for name, low in _TRAIN_MINIMA.items():
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value < low:
                raise ConfigError(f"train.{name}={value}: must be >= {low}")


#: the smallest valid value of TrainConfig's integer knobs
_TRAIN_MINIMA = {
    "epochs": 0,
    "max_steps": 0,
    "batch_size": 1,
    "eval_batch_size": 1,
    "eval_every": 0,
    "eval_every_steps": 0,
    "ckpt_every_steps": 0,
    "ckpt_every_epochs": 1,
    "log_every": 1,
    "num_workers": 0,
    "threads": 0,
}


@dataclass
class DataConfig:
    """What every method's ``data`` section has (each method's subclasses it with its own files and options)."""

    root: str = ""  # the folder the data sets live in; the built-in world (``world.size``) sets it


@dataclass
class WorldConfig:
    """The built-in benchmark world a config trains on (docs/benchmark_world.md). ``size`` empty: the data that
    the ``data`` section names. Otherwise the application layer (``groundkit train``, the demo, :mod:`groundkit.runs`)
    calls :func:`groundkit.world.resolve_world`, which builds the world once and sets ``data.root``."""

    size: str = ""  # tiny | small | medium | large
    seed: int = 0
    task: str = ""  # "" = the method's world task (``Method.world_task``); co-grounding: refexp or video


@dataclass
class ExperimentConfig:
    """Base class for every method's config: its own sections (``data`` at least) plus world/optim/sched/train."""

    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


#: keys renamed since earlier versions (run folders and commands that still use them load with the new names)
RENAMED_KEYS = {"data.synth_size": "world.size", "data.synth_seed": "world.seed", "data.world_task": "world.task"}


def migrate_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the keys of :data:`RENAMED_KEYS` moved to their new place (a copy; ``data`` unchanged)."""
    out = copy.deepcopy(data)
    for old, new in RENAMED_KEYS.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        section = out.get(osec)
        if isinstance(section, dict) and okey in section:
            out.setdefault(nsec, {})
            out[nsec].setdefault(nkey, section.pop(okey))
    return out


# ----------------------------------------------------------------------------- dict <-> dataclass


def feature_cache_root() -> Path:
    """Where frozen encoders' outputs are cached across runs: ``$GROUNDKIT_FEATURE_CACHE``, else
    ``$XDG_CACHE_HOME/groundkit-features`` (``~/.cache/groundkit-features``); never inside a data folder (a
    checksummed world would count the cache as corruption)."""
    base = os.environ.get("GROUNDKIT_FEATURE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "groundkit-features"
    )
    return Path(base)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``; raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if args and len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        (a,) = args or (Any,)
        return [_coerce(v, a, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        ka, va = args or (Any, Any)
        return {_coerce(k, ka, key): _coerce(v, va, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected str, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; valid keys"
            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Dataclass (nested) -> plain dict/list values, suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_key(d: dict, cls: type, dotted: str, raw: Any) -> None:
    """Set ``d[a][b]... = raw`` for ``dotted`` = "a.b...", checking each key against ``cls``."""
    parts = dotted.split(".")
    cur_cls: Any = cls
    cur = d
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(cur_cls):
            raise ConfigError(f"{'.'.join(parts[:i])} is not a section; cannot set {dotted}")
        names = {f.name for f in dataclasses.fields(cur_cls)}
        if p not in names:
            where = ".".join(parts[:i]) or "<root>"
            raise ConfigError(
                f"unknown key {'.'.join(parts[: i + 1])}; valid keys in {where}: {', '.join(sorted(names))}"
            )
        if i == len(parts) - 1:
            cur[p] = raw
        else:
            nxt = cur.get(p)
            if nxt is None:
                nxt = {}
                cur[p] = nxt
            elif not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: expected a mapping (a config section), got {nxt!r}")
            cur = nxt
            cur_cls = typing.get_type_hints(cur_cls)[p]


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ("optim.lr", 1e-4), values parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(cls: type[T], data: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a copy of a config dict (validated against ``cls``); ``data``
    and its nested dicts are left unchanged. Renamed keys (:data:`RENAMED_KEYS`) are set under their new name."""
    out = copy.deepcopy(data)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for k, v in items:
        _set_key(out, cls, RENAMED_KEYS.get(k, k), v)
    return out


def config_dir(method: str) -> Path:
    """Folder of the YAML configs shipped with ``method`` (``groundkit/methods/<method>/configs``)."""
    return Path(__file__).parent / "methods" / method / "configs"


def list_configs(method: str) -> list[str]:
    """Names of the shipped configs for ``method``."""
    d = config_dir(method)
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def resolve_config_path(method: str, name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a config shipped for ``method``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    shipped = config_dir(method) / f"{p.stem if p.suffix in ('.yaml', '.yml') else name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"config {str(name_or_path)!r} is neither a YAML file nor a shipped config of {method!r}; "
        f"shipped: {', '.join(list_configs(method)) or '(none)'}"
    )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping; an unreadable file or a syntax error is a :class:`ConfigError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ConfigError(f"{path}: the config file is empty")
        data = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected YAML)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    method: str | None = None,
) -> T:
    """Config of type ``cls`` from a YAML path / shipped name / dict, then ``overrides``.

    A YAML file may hold ``base: <name or path>`` to start from another config
    (one level of reuse, resolved against the same method's shipped configs). Every value not given keeps the
    default of ``cls`` (for a method config: the method's own section defaults).
    """
    data: dict[str, Any] = {}
    if isinstance(source, dict):
        data = migrate_keys(source)
    elif source is not None:
        path = resolve_config_path(method, source) if method else Path(source)
        data = migrate_keys(load_yaml(path))
        named = data.pop("method", None)
        if named is not None and method is not None and named != method:
            raise ConfigError(f"{path}: config is for method {named!r}, not {method!r}")
        if "base" in data:
            base_src = data.pop("base")
            base_path = resolve_config_path(method, base_src) if method else Path(path).parent / base_src
            base_data = load_yaml(base_path)
            base_data.pop("method", None)
            data = _merge(migrate_keys(base_data), data)
    if overrides:
        try:
            data = apply_overrides(cls, data, overrides)
        except ConfigError as e:
            where = f" (in {source})" if isinstance(source, (str, Path)) and "expected a mapping" in str(e) else ""
            raise ConfigError(f"{e}{where}") from None
    try:
        # a section the YAML names starts from the method's defaults for it (its default_factory), not the bare
        # section class: `train: {epochs: 3}` keeps the method's batch size, best metric, precision, ...
        return from_dict(cls, _merge(to_dict(cls()), data))
    except ConfigError as e:
        where = f" (in {source})" if isinstance(source, (str, Path)) else ""
        raise ConfigError(f"{e}{where}") from None


def save_config(cfg: Any, path: str | Path, method: str | None = None) -> None:
    """Write the fully resolved config as YAML (with ``method:`` first when given, so
    ``groundkit train <run>/config.yaml`` re-runs it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = ({"method": method} if method else {}) | to_dict(cfg)
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def method_of(path: str | Path) -> str | None:
    """The ``method:`` named at the top of a config YAML, if any."""
    try:
        return load_yaml(path).get("method")
    except (OSError, ConfigError, yaml.YAMLError):
        return None
