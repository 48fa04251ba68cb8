"""The ``groundkit`` command line: train, eval, predict, data, bench, demo.

Methods and tools plug in through the tables below (module paths, imported lazily), so a
subcommand appears only when its module exists and imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Callable

from . import __version__
from .config import ConfigError, load_config
from .errors import GroundkitError

__all__ = ["main", "build_parser", "get_method", "available_methods"]

# method name -> module exposing METHOD (see groundkit.engine.Method)
METHODS: dict[str, str] = {
    "wang21": "groundkit.methods.wang21",
    "crosskd": "groundkit.methods.crosskd",
}

# subcommand tables: name -> "module:function"; function(subparsers) adds a parser with set_defaults(func=...)
DATA_COMMANDS: dict[str, str] = {
    "synth": "groundkit.data.synth.cli:register",
    "prepare-flickr30k": "groundkit.data.wang21:register_prepare_flickr30k",
    "glove-to-hdf5": "groundkit.data.wang21:register_glove_to_hdf5",
    "detections-to-hdf5": "groundkit.data.wang21:register_detections_to_hdf5",
    "phrase-to-label": "groundkit.data.wang21:register_phrase_to_label",
    "extract-experts": "groundkit.data.experts:register_extract",
    "convert-experts": "groundkit.data.experts:register_convert",
    "refer-to-transvg": "groundkit.data.refcoco:register_to_transvg",
    "vid-sentence-to-pth": "groundkit.data.vid_sentence:register_to_video_level",
}
BENCH_COMMANDS: dict[str, str] = {
    "metrics": "groundkit.bench.metrics:register",
    "wang21": "groundkit.bench.wang21:register",
    "crosskd": "groundkit.bench.crosskd:register",
}
PREDICT_COMMANDS: dict[str, str] = {
    "retrieval": "groundkit.retrieval:register_predict",
    "phrase": "groundkit.methods.wang21:register_predict",
}


def _load(spec: str) -> Callable | None:
    """Import ``module:attr``; None if the module is not part of this installation."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            return None
        raise
    return getattr(mod, attr, None)


def available_methods() -> list[str]:
    return [name for name, mod in METHODS.items() if _load(mod + ":METHOD") is not None]


def get_method(name: str) -> Any:
    """The method object registered under ``name``."""
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    m = _load(METHODS[name] + ":METHOD")
    if m is None:
        raise SystemExit(f"method {name!r} is not available in this installation")
    return m


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", help="method name (" + ", ".join(METHODS) + ") or a config YAML that names its method")
    p.add_argument("config", nargs="?", default=None, help="YAML path or shipped config name (default: the method's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys, e.g. optim.lr=1e-4")
    p.add_argument("--output-dir", default=None, help="run directory (train.output_dir)")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")


def _build_cfg(method: Any, args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    overrides: dict[str, Any] = {}
    if hasattr(method, "cli_overrides"):
        overrides.update(method.cli_overrides(extra))
    if args.output_dir:
        overrides["train.output_dir"] = args.output_dir
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    if args.device:
        overrides["train.device"] = args.device
    from .config import parse_override

    for item in args.set:
        k, v = parse_override(item)
        overrides[k] = v
    source = args.config or getattr(method, "default_config", None)
    return load_config(method.config_class, source, overrides, method=method.name)


def _split_method_args(method: Any, rest: list[str], mode: str) -> dict[str, Any]:
    """Parse the method's own flags (e.g. wang21's --region-feat-path) from the leftover argv."""
    if not rest:
        return {}
    if not hasattr(method, "add_cli_args"):
        raise SystemExit(f"unrecognized arguments: {' '.join(rest)}")
    p = argparse.ArgumentParser(prog=f"groundkit {mode} {method.name}", add_help=False)
    method.add_cli_args(p, mode)
    ns, unknown = p.parse_known_args(rest)
    if unknown:
        raise SystemExit(f"unrecognized arguments: {' '.join(unknown)}")
    return {k: v for k, v in vars(ns).items() if v is not None}


def _method_from_yaml(args: argparse.Namespace) -> None:
    """``groundkit train CONFIG.yaml``: take the method from the file's ``method:`` key."""
    from pathlib import Path

    from .config import method_of

    p = Path(args.method)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        name = method_of(p)
        if not name:
            raise SystemExit(f"{p}: no 'method:' key; use 'groundkit {args.command} METHOD {p}'")
        if args.config is not None:
            raise SystemExit(f"give either a method and a config, or one config file; got {args.method} {args.config}")
        args.method, args.config = name, str(p)


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .engine import fit

    _method_from_yaml(args)
    method = get_method(args.method)
    cfg = _build_cfg(method, args, _split_method_args(method, rest, "train"))
    result = fit(method, cfg, resume=args.resume, final_split=args.final_split or None)
    print(f"run directory: {cfg.train.output_dir}")
    return 0 if result else 1


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from .engine import run_eval
    from .runlog import format_metrics

    _method_from_yaml(args)
    method = get_method(args.method)
    extra = _split_method_args(method, rest, "eval")
    cfg = _build_cfg(method, args, extra)
    metrics = run_eval(method, cfg, args.restore_path, split=args.split, output_dir=args.output_dir)
    if hasattr(method, "format_eval"):
        print(method.format_eval(metrics, args.split))
    else:
        print(f"{args.split}: {format_metrics(metrics)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _add_table(sub: Any, name: str, help_: str, table: dict[str, str]) -> None:
    registrars = [(k, _load(v)) for k, v in table.items()]
    registrars = [(k, f) for k, f in registrars if f is not None]
    if not registrars:
        return
    p = sub.add_parser(name, help=help_)
    s = p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
    for _, f in registrars:
        f(s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groundkit", description="Grounding language in images and video; text-video retrieval.")
    parser.add_argument("--version", action="version", version=f"groundkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    methods = available_methods()
    if methods:
        p = sub.add_parser("train", help="train a method (" + ", ".join(methods) + ")")
        _add_common_run_args(p)
        p.add_argument("--resume", action="store_true", help="continue from the run directory's newest checkpoint")
        p.add_argument("--final-split", default="test", help="split evaluated with the best weights at the end ('' to skip)")
        p.set_defaults(func=cmd_train, takes_rest=True)
        p = sub.add_parser("eval", help="evaluate a checkpoint")
        _add_common_run_args(p)
        p.add_argument("--restore-path", required=True, help="checkpoint directory or .safetensors file")
        p.add_argument("--split", default="test")
        p.set_defaults(func=cmd_eval, takes_rest=True)
    _add_table(sub, "predict", "run a trained model on new inputs", PREDICT_COMMANDS)
    _add_table(sub, "data", "generate, convert and prepare data", DATA_COMMANDS)
    _add_table(sub, "bench", "speed and memory benchmarks", BENCH_COMMANDS)
    if _load("groundkit.demo:run_demo") is not None:
        p = sub.add_parser("demo", help="build the built-in benchmark world and run the methods end to end")
        from .demo import add_demo_args

        add_demo_args(p)
        p.set_defaults(func=cmd_demo, takes_rest=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args, rest) if getattr(args, "takes_rest", False) else args.func(args) or 0)
    except (GroundkitError, FileNotFoundError) as e:  # bad input or environment: one line, no traceback
        if os.environ.get("GROUNDKIT_DEBUG"):
            raise
        print(f"groundkit: {'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
