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
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .config import RENAMED_KEYS, ConfigError, load_config, method_of, parse_override
from .demo import add_demo_args
from .engine import fit, run_eval
from .errors import GroundkitError, Interrupted, RunFolderError
from .methods import METHODS, Method, available_methods, get_method, run_config, run_method
from .runlog import format_metrics
from .world import resolve_world

__all__ = ["main", "build_parser"]

# commands that belong to no single method: name -> "module:register_function"
CORE_COMMANDS: dict[str, dict[str, str]] = {
    "data": {
        "synth": "groundkit.world.cli:register",
        "refer-to-transvg": "groundkit.formats.refcoco:register_to_transvg",
        "vid-sentence-to-pth": "groundkit.formats.vid_sentence:register_to_video_level",
        "inspect": "groundkit.formats.inspect:register",
    },
    "bench": {
        "metrics": "groundkit.bench.metrics:register",
        "concurrency": "groundkit.bench.concurrency:register",
        "gpu": "groundkit.bench.gpu:register",
    },
    "predict": {},
}
# top-level commands outside the groups
TOP_COMMANDS: dict[str, str] = {
    "summarize": "groundkit.runs:register_summarize",
    "serve": "groundkit.serve.cli:register",
}


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


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set optim.lr=1e-4 train.epochs=3 (repeatable; all apply, later wins)",
    )


def _add_train_args(p: argparse.ArgumentParser, method: Method) -> None:
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help=f"YAML path or shipped config name (default: {method.default_config or 'the defaults'})",
    )
    _add_set(p)
    p.add_argument("--output-dir", default=None, help="run directory (train.output_dir)")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (train.threads; 0: share the cores)")
    p.add_argument("--resume", action="store_true", help="continue the run directory's newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete the run directory's run files and start over")
    p.add_argument("--force", action="store_true", help="with --resume: continue although the config changed")
    p.add_argument(
        "--final-split", default="test", help="split evaluated with the best weights at the end ('' to skip)"
    )


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", default=None, help="run directory, or one of its checkpoints")
    p.add_argument("--restore-path", default=None, help="the same as RUN (a checkpoint directory or .safetensors)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    _add_set(p)
    p.add_argument("--output-dir", default=None, help="write metrics.json and config.yaml here (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="allow --output-dir to be a training run's folder")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")


def _set_items(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in [x for group in args.set for x in group]:
        k, v = parse_override(item)
        out[k] = v
    return out


def _explicit_root(overrides: dict[str, Any]) -> dict[str, Any]:
    """A ``data.root`` given on the command line replaces the built-in world a shipped config names."""
    if overrides.get("data.root") and "world.size" not in {RENAMED_KEYS.get(k, k) for k in overrides}:
        return {**overrides, "world.size": ""}
    return overrides


def _overrides(method: Method, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    extra = {k: v for k, v in vars(args).items() if k not in _RESERVED and v is not None}
    overrides: dict[str, Any] = dict(method.cli_overrides(extra, mode))
    if getattr(args, "output_dir", None) and mode == "train":
        overrides["train.output_dir"] = args.output_dir
    if getattr(args, "seed", None) is not None:
        overrides["train.seed"] = args.seed
    if getattr(args, "threads", None) is not None:
        overrides["train.threads"] = args.threads
    if args.device or mode == "eval":  # eval: the training machine's device may not exist here
        overrides["train.device"] = args.device or "auto"
    overrides.update(_set_items(args))
    return _explicit_root(overrides)


_RESERVED = {
    "command",
    "method",
    "config",
    "run",
    "set",
    "output_dir",
    "seed",
    "device",
    "threads",
    "resume",
    "overwrite",
    "force",
    "final_split",
    "restore_path",
    "split",
    "func",
}


def _fix_set_swallowing(args: argparse.Namespace, slot: str = "config") -> None:
    """``--set a=1 CONFIG``: argparse gives CONFIG to --set; take it back as the config name (or run)."""
    for group in args.set:
        for item in list(group):
            if "=" not in item:
                if getattr(args, slot) is not None:
                    raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
                setattr(args, slot, item)
                group.remove(item)


def _build_cfg(method: Method, args: argparse.Namespace, mode: str) -> Any:
    _fix_set_swallowing(args)
    source = args.config or method.default_config or None
    return load_config(method.config_class, source, _overrides(method, args, mode), method=method.name)


def cmd_train(args: argparse.Namespace) -> int:
    method = get_method(args.method)
    cfg = resolve_world(method, _build_cfg(method, args, "train"), progress=True)
    result = fit(
        method,
        cfg,
        resume=args.resume,
        final_split=args.final_split or None,
        overwrite=args.overwrite,
        force=args.force,
    )
    if not cfg.train.progress and result.get("final"):  # a quiet training printed nothing itself
        print(f"{result['final_split']}: {format_metrics(result['final'])}")
    print(f"run directory: {result.get('run_dir', cfg.train.output_dir)}")
    return 0 if result else 1


def cmd_eval(args: argparse.Namespace) -> int:
    """Rebuild the data and the model from the run's own config; flags change only what they name."""
    method = get_method(args.method)
    _fix_set_swallowing(args, "run")
    if args.run and args.restore_path and args.run != args.restore_path:
        if Path(args.run).exists():
            raise ConfigError(f"eval takes one run: {args.run!r} or --restore-path {args.restore_path!r}")
        # the old spelling "eval METHOD CONFIG --restore-path CKPT": the run's own config is used
        print(
            f"groundkit: note: {args.run!r} ignored: eval rebuilds the model and the data from the run's own "
            "config (change keys with --set)",
            file=sys.stderr,
        )
    path = args.restore_path or args.run
    if not path:
        raise ConfigError("eval needs the run directory (or a checkpoint) to evaluate")
    _, cfg, ck = run_config(path, method=method.name, overrides=_overrides(method, args, "eval"))
    cfg = resolve_world(method, cfg)
    metrics = run_eval(method, cfg, ck, split=args.split, output_dir=args.output_dir, overwrite=args.overwrite)
    print(method.format_eval(metrics, args.split))
    if args.output_dir:
        print(f"metrics: {os.path.join(args.output_dir, 'metrics.json')}")
    return 0


def _add_run_commands(sub: Any, methods: list[str]) -> None:
    p_train = sub.add_parser("train", help="train a method (" + ", ".join(methods) + ")")
    p_eval = sub.add_parser("eval", help="evaluate a trained run (its own config; METHOD may be left out)")
    s_train = p_train.add_subparsers(dest="method", required=True, metavar="METHOD")
    s_eval = p_eval.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name in methods:
        m = get_method(name)
        p = s_train.add_parser(name, help=m.summary, description=m.summary)
        _add_train_args(p, m)
        m.add_cli_args(p.add_argument_group(f"{name} options"), "train")
        p.set_defaults(func=cmd_train)
        p = s_eval.add_parser(name, help=m.summary, description=m.summary)
        _add_eval_args(p)
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
    for spec in [*TOP_COMMANDS.values(), *command_table("top").values()]:  # the methods' own top-level commands
        _load(spec)(sub)

    p = sub.add_parser("demo", help="build the built-in benchmark world and run the methods end to end")
    add_demo_args(p)
    return parser


def _method_from_yaml(argv: list[str]) -> list[str]:
    """``groundkit train RUN/config.yaml ...``: insert the method the file's ``method:`` key names;
    ``groundkit eval RUN ...`` (or ``--restore-path RUN``): insert the method the run was trained with."""
    if len(argv) >= 2 and argv[0] == "train" and argv[1] not in METHODS:
        p = Path(argv[1])
        if p.suffix in (".yaml", ".yml") and p.is_file():
            name = method_of(p)
            if not name:
                raise ConfigError(f"{p}: no 'method:' key; use 'groundkit {argv[0]} METHOD {p}'")
            return [argv[0], name, *argv[1:]]
    if len(argv) >= 2 and argv[0] == "eval" and argv[1] not in METHODS:
        run = argv[1] if not argv[1].startswith("-") else None
        if "--restore-path" in argv[:-1]:
            run = argv[argv.index("--restore-path") + 1]
        if run and Path(run).exists():
            return [argv[0], run_method(run), *argv[1:]]
        if run and ("/" in run or "\\" in run or run.startswith(".")):  # a path, not a method name
            raise RunFolderError(f"{run}: no such run directory (give a run folder or one of {', '.join(METHODS)})")
    return argv


def _resume_hint(argv: list[str]) -> str:
    cmd = ["groundkit", *argv]
    if argv[:1] != ["train"]:  # the demo and sweeps resume their runs when started again
        return f"{' '.join(shlex.quote(a) for a in cmd)} (finished runs are reused)"
    if "--resume" not in cmd:
        cmd.append("--resume")
    return " ".join(shlex.quote(a) for a in cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = _method_from_yaml(argv)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except Interrupted as e:  # a signal during training: the checkpoint is saved
        print(f"groundkit: interrupted: {e}; continue with: {_resume_hint(argv)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"groundkit: interrupted; continue with: {_resume_hint(argv)}", file=sys.stderr)
        return 130
    except (GroundkitError, OSError) as e:  # bad input or environment: one line, no traceback
        if os.environ.get("GROUNDKIT_DEBUG"):
            raise
        print(
            f"groundkit: {'config error' if isinstance(e, ConfigError) else 'error'}: {_one_line(e)}", file=sys.stderr
        )
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, GroundkitError) and e.filename:
        text = f"{e.filename}: {e.strerror or e}"
        if isinstance(e, PermissionError):
            text += " (a read-only folder? choose another --output-dir, or data.store= for a feature store)"
    else:
        text = str(e)
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
