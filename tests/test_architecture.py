"""The layout rules of docs/architecture.md, checked: import layers, no import cycles, lint clean."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "groundkit"

# modules every layer may use; they never import methods, the world or the application layer
CORE = {
    "config",
    "engine",
    "checkpoint",
    "optim",
    "distributed",
    "runlog",
    "errors",
    "metrics",
    "boxes",
    "transforms",
    "text",
    "backbones",
    "bench",
    "draw",
}
APP = {"cli", "demo", "report", "runs", "serve", "__main__"}
# a method's modules that run many trainings or build test inputs: they may use groundkit.runs and the world
ORCHESTRATION = {"bench", "experiments", "curriculum"}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported groundkit module, at module top level?) of one file, relative imports resolved."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        for n in names:
            if n.startswith("groundkit"):
                out.append((n, id(node) in top))
    return out


def _graph() -> dict[str, list[tuple[str, bool]]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for m, p in mods.items():
        graph[m] = [(n, top) for n, top in _imports(p) if n in mods and n != m]
    return graph


def _layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1:
        return "root"
    head = parts[1]
    if head in ("methods", "world", "formats"):
        return head
    return "app" if head in APP else "core" if head in CORE else "other"


def test_every_module_has_a_layer():
    assert {m for m in _graph() if _layer(m) == "other"} == set()


def test_import_layers():
    bad = []
    for mod, deps in _graph().items():
        src = _layer(mod)
        for dep, _ in deps:
            dst = _layer(dep)
            if (
                src == "core"
                and dst in ("methods", "world", "app", "formats")
                and not dep.startswith("groundkit.bench")
            ):
                bad.append(f"{mod} -> {dep} (core imports nothing above it)")
            if src == "formats" and dst in ("methods", "world", "app"):
                bad.append(f"{mod} -> {dep} (formats are shared by methods and the world)")
            if src == "world" and dst in ("methods", "app"):
                bad.append(f"{mod} -> {dep} (the world never imports methods)")
            if src == "methods" and dst in ("world", "app") and mod.rsplit(".", 1)[-1] not in ORCHESTRATION:
                bad.append(f"{mod} -> {dep} (a method's model/data code never imports the world or the app layer)")
    assert bad == []


def test_no_import_cycles_at_module_level():
    graph = {m: sorted({d for d, top in deps if top}) for m, deps in _graph().items()}
    # a package's __init__ importing its own submodules is not a cycle through its parent
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, []):
            if m.startswith(d + "."):  # importing a parent package: the parent is already initialising
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
    reason="ruff is installed by the test extra",
)
def test_ruff_lint_and_format_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    lint = subprocess.run([ruff, "check", "groundkit", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run([ruff, "format", "--check", "groundkit", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout[-3000:]


def test_every_internal_import_names_an_existing_module():
    """Lazy imports inside functions are not run by most tests: check their targets exist."""
    mods = {_module(p) for p in PKG.rglob("*.py")}
    missing = []
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("groundkit")):
                target = next(n for n, _ in _imports_of(node, p))
                if target not in mods:
                    missing.append(f"{p.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert missing == []


def _imports_of(node: ast.ImportFrom, path: Path) -> list[tuple[str, bool]]:
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    if node.level:
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        return [(".".join(base + ([node.module] if node.module else [])), False)]
    return [(node.module or "", False)]
