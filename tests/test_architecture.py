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
    "runfolder",
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
    "draw",
}
# the application layer may import anything; groundkit.bench holds the benchmarks (each method's too), which the
# library itself never imports (the command line loads them from their "module:function" strings)
APP = {"cli", "demo", "report", "runs", "serve", "bench", "__main__"}
# a method's modules that run many trainings: they may use groundkit.runs and the world
ORCHESTRATION = {"sweeps", "curriculum"}
# the repo-level script folders, outside the package: the package never imports them
SCRIPT_FOLDERS = ("experiments", "benchmarks")


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` statement of ``package`` reads from."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


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
            prefix = _from_module(node, package)
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
            if src == "core" and dst in ("methods", "world", "app", "formats"):
                bad.append(f"{mod} -> {dep} (core imports nothing above it)")
            if src == "formats" and dst in ("methods", "world", "app"):
                bad.append(f"{mod} -> {dep} (formats are shared by methods and the world)")
            if src == "world" and dst in ("methods", "app"):
                bad.append(f"{mod} -> {dep} (the world never imports methods)")
            if src == "methods" and dst in ("world", "app") and mod.rsplit(".", 1)[-1] not in ORCHESTRATION:
                bad.append(f"{mod} -> {dep} (a method's model/data code never imports the world or the app layer)")
    assert bad == []


def _all_imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import statement of one file, relative ones resolved."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = _from_module(node, package)
            out += [(prefix, node.lineno)] + [(f"{prefix}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Call) and _names_import_call(node.func) and node.args:
            arg = node.args[0]  # importlib.import_module("x") / __import__("x"): an import too
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.append((arg.value, node.lineno))
    return out


def _names_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def test_the_package_never_imports_the_repo_scripts():
    """``experiments/`` and ``benchmarks/`` at the repository root are scripts beside the package, not part of it:
    no module of groundkit imports them."""
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {name}"
        for p in PKG.rglob("*.py")
        for name, line in _all_imports(p)
        if name.split(".")[0] in SCRIPT_FOLDERS
    ]
    assert bad == []


def test_only_groundkit_bench_imports_groundkit_bench():
    """The benchmarks live in groundkit/bench/; the rest of the library never imports them (the command line loads
    a benchmark lazily from its "groundkit.bench.<name>:register" string, which is not an import)."""
    bad = []
    for p in PKG.rglob("*.py"):
        if _module(p).startswith("groundkit.bench"):
            continue
        for name, line in _all_imports(p):
            if name == "groundkit.bench" or name.startswith("groundkit.bench."):
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {name}")
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


#: the modules that drive every method (engine, run folder, command line, world resolution, many runs): they call
#: what methods/base.py declares (the Method hooks, GroundingDataset, the config's data / world sections) and never
#: probe a config, a dataset or a model with hasattr
DRIVERS = ("engine.py", "runfolder.py", "cli.py", "config.py", "runs.py", "demo.py", "world/__init__.py")
#: names under which a config, a dataset or a model travels in the library
PROBED = {"cfg", "config", "data", "dataset", "ds", "method", "model", "batch"}
#: the engine stays a training loop (DETR's engine.py is 151 lines; the run folder lives in runfolder.py)
ENGINE_MAX_LINES = 750
#: the longest function the library may hold
FUNCTION_MAX_LINES = 100


def _hasattr_calls(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.lineno, ast.unparse(node))
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
    ]


def _root_name(node: ast.expr) -> str:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else ""


def test_no_hasattr_probing_of_configs_datasets_or_models():
    """The interface is declared, not probed: no hasattr at all in the driving modules, and nowhere in the library
    on a config, dataset, model or method (open_clip objects and numpy-or-list values may still be asked)."""
    bad = [f"{f}:{line} {src}" for f in DRIVERS for line, src in _hasattr_calls(PKG / f)]
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr":
                if node.args and _root_name(node.args[0]).split("_")[0] in PROBED:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert sorted(set(bad)) == []


def test_the_engine_is_a_loop_and_no_function_is_long():
    n = len((PKG / "engine.py").read_text().splitlines())
    assert n <= ENGINE_MAX_LINES, f"groundkit/engine.py has {n} lines; the run folder belongs in runfolder.py"
    long = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > FUNCTION_MAX_LINES:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({size} lines)")
    assert long == []
