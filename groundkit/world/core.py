"""The generator framework of the benchmark world: sizes, seeding, cache directory, manifest, checksums.

:func:`generate` resolves the output directory (default: the user cache), reuses a previous build
whose manifest matches and whose files pass their sha256 checksums, and otherwise builds the task
into a temporary sibling directory, writes ``manifest.json`` and renames it into place, so a
directory with a manifest is always complete. A corrupt or partial build is reported and rebuilt,
never used. Same task, size, seed, knobs and :data:`WORLD_VERSION` give byte-identical files on a
machine, whatever its thread count (a build runs on one torch thread), so the manifest's ``build`` section,
with timings, is the only thing that varies. A task whose bytes go through torch's float kernels (the
``phrase`` task's backbone features) records :func:`groundkit.distributed.float_fingerprint` in its
manifest: a cached build made where those kernels round differently (another CPU instruction set or torch
build) is rebuilt, not reused. docs/benchmark_world.md says what holds across machines.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm import tqdm

from .. import __version__
from ..errors import GroundkitError

__all__ = [
    "WORLD_VERSION",
    "SIZES",
    "TASKS",
    "MANIFEST",
    "TaskUnavailableError",
    "CacheError",
    "default_root",
    "default_out",
    "available_tasks",
    "get_builder",
    "generate",
    "load_manifest",
    "verify",
    "rng_for",
    "parse_knob",
    "check_knobs",
    "write_json",
    "sha256_file",
    "tree_digest",
    "progress_bar",
]

#: version 2: the build runs on one torch thread (version 1's backbone features depended on the thread count);
#: version 3: the small ``pseudo`` world has 1,200 images (400 before: too few human labels for a CPU model to learn
#: to ground from; every other task's files are those of version 2)
WORLD_VERSION = 3
SIZES: tuple[str, ...] = ("tiny", "small", "medium", "large")
MANIFEST = "manifest.json"
_MARKER = ".groundkit_synth"

# task name -> "module:function"; the module is imported only when the task is used.
TASKS: dict[str, str] = {
    "phrase": "groundkit.world.phrase:build",
    "refexp": "groundkit.world.refexp:build",
    "video": "groundkit.world.video:build",
    "pseudo": "groundkit.world.pseudo:build",
    "retrieval": "groundkit.world.retrieval:build",
}


class TaskUnavailableError(GroundkitError, RuntimeError):
    """The task's module is not part of this installation."""


class CacheError(GroundkitError, RuntimeError):
    """An output directory exists but cannot be used or replaced safely."""


def default_root() -> Path:
    """``$GROUNDKIT_DATA``, else the platform's user cache directory + ``groundkit``."""
    env = os.environ.get("GROUNDKIT_DATA")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "groundkit"
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "groundkit" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "groundkit"


def _knob_tag(knobs: Mapping[str, Any]) -> str:
    if not knobs:
        return ""
    blob = json.dumps(dict(knobs), sort_keys=True, default=str).encode()
    return "-k" + hashlib.sha256(blob).hexdigest()[:8]


def default_out(task: str, size: str, seed: int, knobs: Mapping[str, Any] | None = None) -> Path:
    """The cache directory of a build: ``<root>/<task>-<size>-seed<seed>-v<version>[-k<knob hash>]``."""
    return default_root() / f"{task}-{size}-seed{seed}-v{WORLD_VERSION}{_knob_tag(knobs or {})}"


def get_builder(task: str) -> Callable[..., dict]:
    """The ``build`` function of ``task``; :class:`TaskUnavailableError` if its module is missing."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    mod_name, _, attr = TASKS[task].partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise TaskUnavailableError(
                f"task {task!r} is not available in this installation (module {mod_name} not found)"
            ) from e
        raise
    fn = getattr(mod, attr, None)
    if fn is None:
        raise TaskUnavailableError(f"task {task!r}: module {mod_name} has no {attr}()")
    return fn


def available_tasks() -> list[str]:
    """Tasks whose module is installed (found without importing it)."""
    out = []
    for t, spec in TASKS.items():
        try:
            found = importlib.util.find_spec(spec.partition(":")[0]) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            out.append(t)
    return out


# ----------------------------------------------------------------------------------------------
# helpers for builders
# ----------------------------------------------------------------------------------------------


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent generator for (seed, keys...), e.g. ``rng_for(seed, "phrase", "scene", i)``.

    Keys are hashed with CRC32 (stable across runs and platforms), so a given image's content
    does not depend on how many other images are built.
    """
    ent = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(ent))


def parse_knob(item: str) -> tuple[str, Any]:
    """``"name=value"`` -> (name, value) with value read as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise ValueError(f"knob {item!r} must look like name=value")
    k, _, v = item.partition("=")
    k = k.strip()
    if not k:
        raise ValueError(f"knob {item!r} has an empty name")
    try:
        val = yaml.safe_load(v)
    except yaml.YAMLError:
        val = v
    return k, val


def check_knobs(task: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``given`` into ``defaults``; an unknown name or a value of the wrong type is an error."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"task {task!r}: unknown knob(s) {unknown}; known: {sorted(defaults)}")
    out = dict(defaults)
    for k, v in given.items():
        d = defaults[k]
        if (
            d is not None
            and not isinstance(d, bool)
            and isinstance(d, (int, float))
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        ):
            if isinstance(d, int) and not float(v).is_integer():
                raise ValueError(f"task {task!r}: knob {k} expects an integer, got {v!r}")
            v = type(d)(v)
        elif d is not None and not isinstance(v, type(d)):
            raise ValueError(f"task {task!r}: knob {k} expects {type(d).__name__}, got {v!r}")
        out[k] = v
    return out


def write_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline (deterministic bytes)."""
    Path(path).write_text(json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def tree_digest(root: str | Path) -> str:
    """One sha256 over every file under ``root`` (relative paths and contents, sorted): equal
    digests mean byte-identical builds."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def progress_bar(it: Iterable, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator:
    """tqdm over ``it`` when ``enabled`` (written to stderr), else ``it`` itself."""
    if not enabled:
        return iter(it)

    return iter(tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True))


# ----------------------------------------------------------------------------------------------
# manifest and verification
# ----------------------------------------------------------------------------------------------


def _list_files(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST, _MARKER):
                out.append(rel)
    return out


def load_manifest(out: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a build directory (FileNotFoundError if absent)."""
    path = Path(out) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: not valid JSON ({e})") from e


def verify(out: str | Path, full: bool = True) -> list[str]:
    """Problems found in a build directory (empty list = complete and intact).

    Checks that the manifest exists and parses, every listed file exists with its size and (when
    ``full``) sha256, and no unlisted file is present.
    """
    out = Path(out)
    if not out.is_dir():
        return [f"{out}: not a directory"]
    try:
        man = load_manifest(out)
    except FileNotFoundError:
        return [f"{out}: no {MANIFEST} (partial or foreign directory)"]
    except CacheError as e:
        return [str(e)]
    files = man.get("files")
    if not isinstance(files, dict):
        return [f"{out / MANIFEST}: no 'files' table"]
    problems = []
    for rel, meta in sorted(files.items()):
        p = out / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
            continue
        size = p.stat().st_size
        if size != meta.get("bytes"):
            problems.append(f"{p}: {size} bytes, manifest says {meta.get('bytes')}")
            continue
        if full and sha256_file(p) != meta.get("sha256"):
            problems.append(f"{p}: sha256 differs from the manifest (corrupt)")
    extra = sorted(set(_list_files(out)) - set(files))
    problems.extend(f"{out / rel}: not listed in the manifest" for rel in extra)
    return problems


def _matches(man: Mapping[str, Any], task: str, size: str, seed: int, knobs: Mapping[str, Any]) -> str | None:
    want = {"task": task, "size": size, "seed": seed, "world_version": WORLD_VERSION}
    for k, v in want.items():
        if man.get(k) != v:
            return f"manifest has {k}={man.get(k)!r}, wanted {v!r}"
    got = man.get("requested_knobs", {})
    if json.dumps(got, sort_keys=True, default=str) != json.dumps(dict(knobs), sort_keys=True, default=str):
        return f"manifest has knobs {got}, wanted {dict(knobs)}"
    built = man.get("float_fingerprint")
    if built is not None:
        from ..distributed import float_fingerprint  # noqa: PLC0415 (torch only for builds that used it)

        if built != float_fingerprint():
            return (
                f"built where torch's float kernels round differently (fingerprint {built}, here {float_fingerprint()})"
            )
    return None


def _safe_to_replace(out: Path) -> bool:
    return (out / _MARKER).exists() or (out / MANIFEST).exists() or not any(out.iterdir())


def generate(
    task: str,
    size: str = "small",
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    **knobs: Any,
) -> Path:
    """Build (or reuse) the world's ``task`` data set and return its directory.

    ``knobs`` are passed to the task's ``build``; ``force`` rebuilds even a valid cache. An existing
    directory that is not a groundkit build is never deleted (:class:`CacheError`).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {', '.join(SIZES)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    build = get_builder(task)
    out = Path(out).expanduser() if out is not None else default_out(task, size, seed, knobs)
    log = lambda msg: print(f"[groundkit synth] {msg}", file=sys.stderr) if progress else None  # noqa: E731
    if out.exists():
        if not out.is_dir():
            raise CacheError(f"{out} exists and is not a directory")
        if not _safe_to_replace(out):
            raise CacheError(f"{out} exists, is not empty and is not a groundkit synth build; choose another --out")
        if not force and (out / MANIFEST).exists():
            problems = verify(out)
            reason = None
            if not problems:
                reason = _matches(load_manifest(out), task, size, seed, knobs)
                if reason is None:
                    log(f"using the verified cache {out}")
                    return out
                log(f"{out}: a different build ({reason}); rebuilding")
            else:
                shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
                log(f"{out}: the cached build is corrupt or partial ({shown}); rebuilding")
        elif not force:
            log(f"{out}: partial build without a manifest; rebuilding")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / _MARKER).write_text("groundkit synthetic benchmark world build\n")
    t0 = time.perf_counter()
    try:
        from ..distributed import fixed_threads  # noqa: PLC0415 (torch: only when a build starts)

        with fixed_threads(1):  # the bytes must not depend on the thread count
            info = build(tmp, size=size, seed=seed, progress=progress, **knobs)
        seconds = time.perf_counter() - t0
        files = {}
        for rel in _list_files(tmp):
            p = tmp / rel
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}

        man = {
            "task": task,
            "size": size,
            "seed": seed,
            "world_version": WORLD_VERSION,
            "groundkit_version": __version__,
            "requested_knobs": dict(knobs),
            "knobs": info.pop("knobs", {}),
            **({"float_fingerprint": info.pop("float_fingerprint")} if "float_fingerprint" in info else {}),
            "info": info,
            "files": files,
            "build": {
                "seconds": round(seconds, 2),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": 1,  # every build runs on one thread (fixed_threads above)
            },
        }
        write_json(tmp / MANIFEST, man)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built {task}/{size}/seed {seed} in {seconds:.1f}s -> {out}")
    return out
