"""``groundkit data synth``: build a task of the benchmark world from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import DataError
from .core import SIZES, TASKS, generate, load_manifest, parse_knob

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate the built-in benchmark world (real data sets' formats)",
        description="Generate one task of the built-in benchmark world. Same task/size/seed/knobs give byte-identical files; "
        "a verified cached build is reused, a corrupt one is rebuilt.",
    )
    p.add_argument("--task", required=True, choices=list(TASKS), help="which data set to write")
    p.add_argument(
        "--size",
        default="small",
        choices=list(SIZES),
        help="tiny (tests), small (CPU demo), medium, large (GPU benchmarks)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: $GROUNDKIT_DATA or the user cache)")
    p.add_argument(
        "--set",
        dest="knobs",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="task knob, repeatable (see docs/benchmark_world.md)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a valid build exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    knobs: dict[str, Any] = {}
    try:
        for item in args.knobs:
            k, v = parse_knob(item)
            knobs[k] = v
        out = generate(
            args.task, size=args.size, seed=args.seed, out=args.out, progress=not args.quiet, force=args.force, **knobs
        )
    except ValueError as e:  # a bad knob: reported by the CLI as one line
        raise DataError(f"data synth: {e}") from None
    man = load_manifest(out)
    print(out)
    info = man.get("info", {})
    summary = {"task": man["task"], "size": man["size"], "seed": man["seed"], "build_seconds": man["build"]["seconds"]}
    summary.update({k: info[k] for k in ("images", "videos", "stats") if k in info})
    print(json.dumps(summary, sort_keys=True))
    return 0
