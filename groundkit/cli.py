"""The ``groundkit`` command line: train, eval, predict, data, bench, demo.

Methods come from the one registry (:mod:`groundkit.methods`): ``train`` and ``eval`` get a
sub-command per method carrying that method's own flags (so ``groundkit train wang21 --help`` lists
them), and each method adds its ``data`` / ``bench`` / ``predict`` sub-commands through
:attr:`~groundkit.methods.base.Method.commands`. Modules are imported when their command is built.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError, load_config, method_of, parse_override
from .demo import add_demo_args
from .engine import fit, run_eval
from .errors import GroundkitError
from .methods import METHODS, Method, available_methods, get_method
from .world import resolve_world

__all__ = ["main", "build_parser"]

# commands that belong to no single method: name -> "module:register_function"
CORE_COMMANDS: dict[str, dict[str, str]] = {
    "data": {
        "synth": "groundkit.world.cli:register",
        "refer-to-transvg": "groundkit.formats.refcoco:register_to_transvg",
        "vid-sentence-to-pth": "groundkit.formats.vid_sentence:register_to_video_level",
    },
    "bench": {"metrics": "groundkit.bench.metrics:register"},
    "predict": {},
}
# top-level commands outside the groups
TOP_COMMANDS: dict[str, str] = {"summarize": "groundkit.runs:register_summarize"}


def _load(spec: str) -> Callable[..., Any]:
    mod_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod_name), attr)


def command_table(group: str) -> dict[str, str]:
    """``{command: "module:register"}`` of a command group, the core's first, then each method's."""
    table = dict(CORE_COMMANDS.get(group, {}))
    for name in available_methods():
        table.update(get_method(name).commands.get(group, {}))
    return table


# ----------------------------------------------------------------------------- train / eval


def _add_common_run_args(p: argparse.ArgumentParser, method: Method) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help=f"YAML path or shipped config name (default: {method.default_config or 'the defaults'})",
    )
    p.add_argument(
        "--set",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set optim.lr=1e-4 train.epochs=3 (repeatable; later wins)",
    )
    p.add_argument("--output-dir", default=None, help="run directory (train.output_dir)")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")


def _overrides(method: Method, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    extra = {k: v for k, v in vars(args).items() if k not in _RESERVED and v is not None}
    overrides: dict[str, Any] = dict(method.cli_overrides(extra, mode))
    if args.output_dir:
        overrides["train.output_dir"] = args.output_dir
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    if args.device:
        overrides["train.device"] = args.device
    for item in [x for group in args.set for x in group]:
        k, v = parse_override(item)
        overrides[k] = v
    return overrides


_RESERVED = {
    "command",
    "method",
    "config",
    "set",
    "output_dir",
    "seed",
    "device",
    "resume",
    "final_split",
    "restore_path",
    "split",
    "func",
}


def _fix_set_swallowing(args: argparse.Namespace) -> None:
    """``--set a=1 CONFIG``: argparse gives CONFIG to --set; take it back as the config name."""
    for group in args.set:
        for item in list(group):
            if "=" not in item:
                if args.config is not None:
                    raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
                args.config = item
                group.remove(item)


def _build_cfg(method: Method, args: argparse.Namespace, mode: str) -> Any:
    _fix_set_swallowing(args)
    source = args.config or method.default_config or None
    return load_config(method.config_class, source, _overrides(method, args, mode), method=method.name)


def cmd_train(args: argparse.Namespace) -> int:
    method = get_method(args.method)
    cfg = resolve_world(method, _build_cfg(method, args, "train"), progress=True)
    result = fit(method, cfg, resume=args.resume, final_split=args.final_split or None)
    print(f"run directory: {cfg.train.output_dir}")
    return 0 if result else 1


def cmd_eval(args: argparse.Namespace) -> int:
    method = get_method(args.method)
    cfg = resolve_world(method, _build_cfg(method, args, "eval"))
    metrics = run_eval(method, cfg, args.restore_path, split=args.split, output_dir=args.output_dir)
    print(method.format_eval(metrics, args.split))
    return 0


def _add_run_commands(sub: Any, methods: list[str]) -> None:
    p_train = sub.add_parser("train", help="train a method (" + ", ".join(methods) + ")")
    p_eval = sub.add_parser("eval", help="evaluate a checkpoint")
    s_train = p_train.add_subparsers(dest="method", required=True, metavar="METHOD")
    s_eval = p_eval.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name in methods:
        m = get_method(name)
        p = s_train.add_parser(name, help=m.summary, description=m.summary)
        _add_common_run_args(p, m)
        p.add_argument("--resume", action="store_true", help="continue from the run directory's newest checkpoint")
        p.add_argument(
            "--final-split", default="test", help="split evaluated with the best weights at the end ('' to skip)"
        )
        m.add_cli_args(p.add_argument_group(f"{name} options"), "train")
        p.set_defaults(func=cmd_train)
        p = s_eval.add_parser(name, help=m.summary, description=m.summary)
        _add_common_run_args(p, m)
        p.add_argument("--restore-path", required=True, help="checkpoint directory or .safetensors file")
        p.add_argument("--split", default="test")
        m.add_cli_args(p.add_argument_group(f"{name} options"), "eval")
        p.set_defaults(func=cmd_eval)


# ----------------------------------------------------------------------------- parser


def _add_group(sub: Any, name: str, help_: str) -> None:
    table = command_table(name)
    if not table:
        return
    p = sub.add_parser(name, help=help_)
    s = p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
    for spec in table.values():
        _load(spec)(s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groundkit", description="Grounding language in images and video; text-video retrieval."
    )
    parser.add_argument("--version", action="version", version=f"groundkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    methods = available_methods()
    if methods:
        _add_run_commands(sub, methods)
    _add_group(sub, "predict", "run a trained model on new inputs")
    _add_group(sub, "data", "generate, convert and prepare data")
    _add_group(sub, "bench", "speed and memory benchmarks")
    for spec in TOP_COMMANDS.values():
        _load(spec)(sub)

    p = sub.add_parser("demo", help="build the built-in benchmark world and run the methods end to end")
    add_demo_args(p)
    return parser


def _method_from_yaml(argv: list[str]) -> list[str]:
    """``groundkit train RUN/config.yaml ...``: insert the method the file's ``method:`` key names."""
    if len(argv) >= 2 and argv[0] in ("train", "eval") and argv[1] not in METHODS:
        p = Path(argv[1])
        if p.suffix in (".yaml", ".yml") and p.is_file():
            name = method_of(p)
            if not name:
                raise ConfigError(f"{p}: no 'method:' key; use 'groundkit {argv[0]} METHOD {p}'")
            return [argv[0], name, *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _method_from_yaml(argv)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (GroundkitError, FileNotFoundError) as e:  # bad input or environment: one line, no traceback
        if os.environ.get("GROUNDKIT_DEBUG"):
            raise
        print(f"groundkit: {'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
