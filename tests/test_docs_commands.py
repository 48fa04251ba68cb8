"""Every ``groundkit ...`` command in the README's and the docs' code blocks parses with the current command line:
a renamed flag, subcommand or choice breaks this test instead of the reader. Placeholders (``METHOD``, ``...``) and
optional parts in brackets are not commands and are left out; paths need not exist (parsing reads no file)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from groundkit.cli import build_parser
from groundkit.methods import available_methods

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = {"METHOD", "..."}


def doc_commands() -> list[tuple[str, int, str]]:
    """``(file, line number, command)`` of each ``groundkit`` line inside a fenced code block."""
    out = []
    for f in DOCS:
        lines = f.read_text(encoding="utf-8").splitlines()
        fenced = False
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.lstrip().startswith("```"):
                fenced = not fenced
                i += 1
                continue
            start = i
            while fenced and line.rstrip().endswith("\\") and i + 1 < len(lines):  # continuation lines
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            m = re.match(r"^\s*(?:[A-Z_]+=\S*\s+)*(?:\.venv/bin/)?groundkit\s+(.*)$", line) if fenced else None
            if m:
                out.append((f.name, start + 1, m.group(1)))
            i += 1
    return out


def _argv(command: str) -> list[str] | None:
    cmd = re.split(r"\s+#", command)[0]  # a trailing comment
    argv = shlex.split(cmd)
    for j, a in enumerate(argv):  # optional parts and alternatives: what comes before them must parse
        if a.startswith("[") or a == "|":
            argv = argv[:j]
            break
    if not argv or PLACEHOLDERS & set(argv) or len(argv) == 1:
        return None
    if argv[0] == "eval" and argv[1] not in available_methods():  # "eval RUN": the method comes from the run
        argv = ["eval", available_methods()[0], *argv[1:]]
    return argv


COMMANDS = doc_commands()


def test_the_docs_hold_commands():
    assert len(COMMANDS) >= 40 and {f for f, _, _ in COMMANDS} >= {"README.md", "clipvg.md", "cogrounding.md"}


@pytest.mark.parametrize("where, line, command", COMMANDS, ids=[f"{f}:{n}" for f, n, _ in COMMANDS])
def test_doc_command_parses(where, line, command):
    argv = _argv(command)
    if argv is None:
        pytest.skip("a placeholder, not a command")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code:
            pytest.fail(f"{where}:{line}: groundkit {command}\n{err.getvalue().strip()}")


def test_every_run_folder_the_docs_read_is_one_they_write():
    """``eval RUN``, ``--checkpoint RUN``, ``serve --run RUN`` under ``runs/`` name a folder that a documented
    ``train`` writes (its ``--output-dir``, else its config's ``train.output_dir``): a renamed folder breaks this."""
    from groundkit.config import load_config  # noqa: PLC0415
    from groundkit.methods import get_method  # noqa: PLC0415

    written, read = set(), []
    for where, line, command in COMMANDS:
        argv = _argv(command)
        if argv is None:
            continue
        for flag in ("--output-dir", "--out"):
            if flag in argv:
                written.add(argv[argv.index(flag) + 1].rstrip("/"))
        if argv[0] == "train" and "--output-dir" not in argv:
            m = get_method(argv[1])
            name = argv[2] if len(argv) > 2 and not argv[2].startswith("-") else m.default_config
            written.add(load_config(m.config_class, name, None, argv[1]).train.output_dir.rstrip("/"))
        if argv[0] == "eval":
            read.append((where, line, argv[2] if len(argv) > 2 else ""))
        for flag in ("--checkpoint", "--run", "--restore-path"):
            if flag in argv:
                read.append((where, line, argv[argv.index(flag) + 1].split("=")[-1]))
    assert "runs/crosskd/synth_cecap" in written
    unwritten = [
        f"{w}:{n}: {p}"
        for w, n, p in read
        if p.startswith("runs/") and not any(p.rstrip("/") == o or p.startswith(o + "/") for o in written)
    ]
    assert not unwritten, unwritten
