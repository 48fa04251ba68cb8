"""The ``groundkit serve`` command: load the runs, bind the socket, run uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys
from typing import Any

from ..errors import GroundkitError
from .images import Limits

__all__ = ["register", "cmd_serve", "is_loopback"]

NO_RUN = (
    "give at least one --run RUN_DIR (a trained run directory or checkpoint), e.g. "
    "`groundkit serve --run runs/crosskd/synth_cecap`; train one with `groundkit train METHOD` or `groundkit demo`"
)
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page to try trained runs by hand (and a JSON API)",
        description="Serve a local web page (and a JSON API) on trained runs: upload an image and type an "
        "expression to see the box drawn (image grounding runs), or type a text to see the ranked videos "
        "(retrieval runs). Bound to 127.0.0.1 unless --host says otherwise; the page has no login.",
    )
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="[NAME=]RUN_DIR",
        help="a run directory or checkpoint to serve (repeatable); NAME= names it on the page",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="cpu", help="device of the models (cpu, cuda, cuda:N)")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest image upload in MB (default 8)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40M)")
    p.add_argument("--max-text", type=int, default=200, help="longest expression in characters (default 200)")
    p.add_argument(
        "--videos",
        default=None,
        metavar="DIR",
        help="folder of the searched collection's videos (ID.mp4 ...) or frames (ID/*.jpg) to show beside "
        "search results (default: the folder the run's store was extracted from, if any)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise GroundkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.run:
        raise GroundkitError(NO_RUN)
    if not 0 <= args.port <= 65535:
        raise GroundkitError(f"--port {args.port}: must be from 0 to 65535")
    if args.max_upload_mb <= 0 or args.max_text < 1 or args.max_pixels < 1:
        raise GroundkitError("--max-upload-mb, --max-pixels and --max-text must be positive")
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels, max_text=args.max_text
    )
    import uvicorn  # noqa: PLC0415 (the web stack loads only for this command)

    from .app import create_app  # noqa: PLC0415
    from .table import load_runs  # noqa: PLC0415

    say = lambda msg: print(f"groundkit serve: {msg}", file=sys.stderr, flush=True)
    runs = load_runs(args.run, device=args.device, videos=args.videos, limits=limits, progress=say)
    loopback = is_loopback(args.host)
    if not loopback:
        say(f"warning: bound to {args.host}, reachable from other machines; the page has no login")
    app = create_app(runs, limits, allowed_hosts=LOOPBACK_NAMES if loopback else None)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{args.host.strip('[]')}]" if ":" in args.host else args.host
    for r in runs:
        say(f"run {r.name!r}: {r.method}, {r.kind} \u2014 {r.note}")
    print(f"groundkit serve: listening on http://{shown}:{port}/ (Ctrl+C stops)", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, limit_concurrency=64, timeout_keep_alive=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except (KeyboardInterrupt, asyncio.CancelledError):  # uvicorn re-raises the Ctrl+C it handled, after shutdown
        pass
    say("stopped")
    return 0
