"""Many trainings at once: seeds, sweeps and curriculum steps, and their mean ± std tables.

Every place that trains more than one model (the demo, the documentation tables, the CLIP-VG
curriculum) describes each training as a :class:`RunSpec` and hands the list to :func:`run_many`,
so that they all share one behaviour:

- **one folder per run** holding the engine's files, among them ``run.json`` (status, steps, seconds,
  metrics; the engine keeps it, this module adds the spec), written atomically;
- **restartable**: a run whose ``run.json`` records a finished run of the same method, resolved
  config and final split is *reused* without training, and a run that was killed is *resumed* from its
  latest checkpoint, so a killed sweep is simply started again. A folder whose checkpoints were
  trained with a different config is never silently continued (the engine refuses, see :func:`run_one`);
- **parallel without oversubscription**: ``jobs`` runs at a time in spawned processes, the CPU
  cores this process may use divided among the trainings running at the time;
- **isolated failures**: a failing run is reported with its error while the others go on;
- **honest summaries**: :func:`summarize` gives mean, sample standard deviation (ddof=1) and the
  per-seed values; a single run has no standard deviation and is shown as ``mean ± —``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from . import engine
from .checkpoint import atomic_write_text
from .config import load_config, to_dict
from .distributed import usable_cores
from .errors import ConfigMismatchError, GroundkitError
from .methods import get_method
from .runfolder import plain
from .world import resolve_world

__all__ = [
    "RunSpec",
    "RunResult",
    "RunsFailedError",
    "run_one",
    "run_many",
    "seed_specs",
    "summarize",
    "format_table",
    "write_summary",
    "result_from_record",
    "default_threads",
    "usable_cores",
    "slug",
    "IGNORED_KEYS",
]

log = logging.getLogger(__name__)

#: config keys that do not change what a run computes (the engine's list); left out when a folder's run
#: is compared to a spec
IGNORED_KEYS: tuple[str, ...] = engine.NEUTRAL_KEYS

RUN_FILE = engine.RUN_FILE
METRICS_FILE = "metrics.json"


class RunsFailedError(GroundkitError, RuntimeError):
    """One or more runs of :func:`run_many` failed; ``results`` holds every run's result."""

    def __init__(self, message: str, results: list[RunResult]):
        super().__init__(message)
        self.results = results


@dataclass
class RunSpec:
    """One training: ``method`` with ``config`` plus ``overrides``, trained with ``seed`` into ``output_dir``.

    ``method`` is a registry name or a method object; ``config`` a shipped config name, a YAML path or a
    dict. ``seed`` and ``output_dir`` become ``train.seed`` and ``train.output_dir``. ``label`` names the
    variant in tables (runs with the same label are seeds of one variant); ``tags`` are free-form notes
    kept in ``run.json`` and the result.
    """

    method: Any
    config: str | Path | dict[str, Any]
    overrides: dict[str, Any]
    output_dir: str
    seed: int
    label: str
    final_split: str = "test"
    tags: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.output_dir = str(self.output_dir)
        self.overrides = dict(self.overrides or {})
        self.tags = dict(self.tags or {})
        for key, own in (("train.seed", self.seed), ("train.output_dir", self.output_dir)):
            if key in self.overrides and str(self.overrides[key]) != str(own):
                raise ValueError(
                    f"RunSpec {self.label!r}: overrides set {key}={self.overrides[key]!r}, "
                    f"but the spec says {own!r}; set it through the spec's field only"
                )

    @property
    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else str(getattr(self.method, "name", self.method))

    def describe(self) -> dict[str, Any]:
        """JSON-able form of the spec (the method by name)."""
        cfg = self.config if isinstance(self.config, (str, dict)) else str(self.config)
        return {
            "method": self.method_name,
            "config": cfg,
            "overrides": self.overrides,
            "output_dir": self.output_dir,
            "seed": self.seed,
            "label": self.label,
            "final_split": self.final_split,
            "tags": self.tags,
        }


@dataclass
class RunResult:
    """What one run gave. ``metrics`` are on ``final_split`` (the best weights), ``best`` on validation.

    ``status`` is ``"done"`` (trained now, possibly resumed), ``"reused"`` (a finished run found in its
    folder; ``seconds`` is then the original training time) or ``"failed"`` (``error`` says why).
    """

    label: str
    seed: int
    output_dir: str
    status: Literal["done", "reused", "failed"]
    metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    final_split: str | None = None
    seconds: float | None = None
    steps: int | None = None
    main_metric: str | None = None
    resumed: bool = False
    error: str | None = None
    method: str = ""
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def line(self) -> str:
        """One line for progress reports: label, seed, main metric, seconds, status."""
        head = f"{self.label} seed {self.seed}"
        if not self.ok:
            return f"{head}: FAILED: {self.error}"
        value = self.metrics.get(self.main_metric) if self.main_metric else None
        metric = "no metrics"
        if isinstance(value, (int, float)):
            metric = f"{self.final_split} {self.main_metric}={value:.4f}"
        secs = f"{self.seconds:.1f}s" if self.seconds is not None else "?s"
        extra = " (reused)" if self.status == "reused" else " (resumed)" if self.resumed else ""
        return f"{head}: {metric}, {secs}{extra}"


def slug(label: str) -> str:
    """A folder name for a label: lower case, runs of other characters replaced by ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "run"


def default_threads(jobs: int) -> int:
    """Torch threads per run when ``jobs`` runs share this process's cores (at least 1)."""
    return max(1, usable_cores() // max(1, int(jobs)))


def _resolve(spec: RunSpec, threads: int | None = None) -> tuple[Any, Any]:
    """(method object, resolved config) of a spec, ``threads`` (when given) as ``train.threads``; raises on an
    unknown method or a bad config/override."""
    method = spec.method
    if isinstance(method, str):
        method = get_method(method)
    overrides = {**spec.overrides, "train.seed": int(spec.seed), "train.output_dir": spec.output_dir}
    if threads:
        overrides["train.threads"] = int(threads)
    source = str(spec.config) if isinstance(spec.config, Path) else spec.config
    cfg = load_config(method.config_class, source, overrides, method=method.name)
    return method, method.resolve_config(resolve_world(method, cfg))


def _identity(method_name: str, cfg: Any, final_split: str) -> dict[str, Any]:
    """What a finished run must match to be reused: method, resolved config (less IGNORED_KEYS), final split,
    and torch's thread count: float results depend on it (``0``, threads shared with the other trainings of
    the machine, is a count that changes with the load, so such a run is reused only for another ``0``)."""
    flat = engine.flatten_config(to_dict(cfg))
    return {
        "method": method_name,
        "config": {k: v for k, v in flat.items() if k not in IGNORED_KEYS},
        "final_split": final_split,
        "threads": int(cfg.train.threads),
    }


def _main_metric(cfg: Any, metrics: Mapping[str, float]) -> str | None:
    best = getattr(getattr(cfg, "train", None), "best_metric", "")
    if best and best in metrics:
        return best
    return next(iter(metrics), None)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _floats(d: Any) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items()}


# ----------------------------------------------------------------------------- running


def run_one(spec: RunSpec, threads: int | None = None, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train and test one spec in this process, or reuse/resume what its folder already holds.

    - the folder's ``run.json`` (written by :func:`groundkit.engine.fit`) records a finished run of the
      same method, resolved config (less :data:`IGNORED_KEYS`) and final split: the result is read back
      (status ``"reused"``), nothing is trained;
    - the folder holds checkpoints of the same config: training resumes from the latest one (a run that had
      already finished its training is only evaluated again);
    - the folder holds checkpoints of a *different* config: the run fails with the differing keys named,
      unless ``resume=True`` (continue from that checkpoint anyway, e.g. after changing a knob that does
      not affect the weights) or ``overwrite=True`` (delete the run files in the folder and start over);
    - otherwise it trains from scratch.

    ``threads`` fixes torch's threads for this run (``train.threads``; default: the engine shares the
    cores among the trainings running on the machine). Exceptions are caught and returned as status
    ``"failed"``; KeyboardInterrupt/SystemExit propagate (the next call resumes).
    """
    base = RunResult(
        label=spec.label,
        seed=int(spec.seed),
        output_dir=spec.output_dir,
        status="failed",
        method=spec.method_name,
        tags=dict(spec.tags),
    )
    try:
        method, cfg = _resolve(spec, threads)
    except Exception as e:  # bad method name, config or override: the folder is left untouched
        return dataclasses.replace(base, error=f"{type(e).__name__}: {e}")
    identity = _identity(method.name, cfg, spec.final_split)
    if not overwrite:
        done = _reused(spec, cfg, identity, base)
        if done is not None:
            return done
    t0 = time.perf_counter()
    try:
        res = engine.fit(
            method,
            cfg,
            resume=True,
            final_split=spec.final_split,
            overwrite=overwrite,
            force=resume,
            record={"spec": spec.describe(), "identity": identity},
        )
    except ConfigMismatchError as e:
        return dataclasses.replace(
            base,
            error=f"{spec.output_dir} is not this run's folder: {e}".replace(
                "pass --force to continue it anyway, or --overwrite to start over",
                "pass resume=True to continue from it anyway or overwrite=True to start over",
            ),
        )
    except Exception as e:
        return dataclasses.replace(base, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    return _finished(base, cfg, "done", res.get("final"), res, resumed=bool(res.get("resumed")))


def _finished(
    base: RunResult, cfg: Any, status: str, metrics: Any, rec: dict[str, Any], resumed: bool = False
) -> RunResult:
    """``base`` filled from a finished run's record (``fit``'s result or the ``run.json`` it wrote)."""
    m = _floats(metrics)
    return dataclasses.replace(
        base,
        status=status,
        metrics=m,
        best=_floats(rec.get("best")),
        final_split=rec.get("final_split"),
        seconds=rec.get("train_seconds"),
        steps=rec.get("steps"),
        main_metric=_main_metric(cfg, m),
        resumed=resumed,
    )


def _reused(spec: RunSpec, cfg: Any, identity: dict[str, Any], base: RunResult) -> RunResult | None:
    """The result a finished run of this spec left in its folder, or None."""
    out = Path(spec.output_dir)
    rec = engine.read_run_record(out)
    if not rec or rec.get("status") != "done" or not (out / METRICS_FILE).is_file():
        return None
    if plain(rec.get("identity")) != plain(identity):
        return None
    return _finished(base, cfg, "reused", rec.get("metrics"), rec)


def _quiet(spec: RunSpec) -> RunSpec:
    """The spec with the engine's per-run progress bars off (run_many draws one bar for all runs)."""
    if "train.progress" in spec.overrides:
        return spec
    return dataclasses.replace(spec, overrides={**spec.overrides, "train.progress": False})


def run_many(
    specs: Sequence[RunSpec],
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
    raise_on_failure: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    desc: str = "runs",
) -> list[RunResult]:
    """Run every spec (see :func:`run_one`) and return the results in spec order.

    ``jobs == 1`` runs them one after the other in this process; otherwise in a pool of ``jobs``
    spawned processes, each with ``threads`` torch threads (default: the engine divides the usable cores among
    the trainings running at the time, see :class:`groundkit.distributed.CoreShare`). Runs whose
    folder already holds their finished result are read back here without starting a process. A
    failing run does not stop the others; at the end :class:`RunsFailedError` lists every failure
    (unless ``raise_on_failure=False``). One line per finished run (label, seed, main metric, seconds)
    is written through tqdm when ``progress`` (the bar labelled ``desc``), else to the ``groundkit.runs`` logger.
    """
    specs = [_quiet(s) for s in specs]
    dirs: dict[str, str] = {}
    for s in specs:
        key = os.path.abspath(s.output_dir)
        if key in dirs:
            raise ValueError(f"runs {dirs[key]!r} and {s.label!r} (seed {s.seed}) share the output_dir {s.output_dir}")
        dirs[key] = f"{s.label} seed {s.seed}"

    bar = tqdm(total=len(specs), desc=desc, unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    bar.refresh()  # shown from the start, before the first run ends
    results: list[RunResult | None] = [None] * len(specs)

    def report(i: int, r: RunResult) -> None:
        results[i] = r
        msg = f"[{sum(x is not None for x in results)}/{len(specs)}] {r.line()}"
        if progress:
            bar.write(msg, file=sys.stderr)
        else:
            (log.info if r.ok else log.error)(msg)
        bar.update(1)

    try:
        if jobs <= 1:
            for i, s in enumerate(specs):
                report(i, run_one(s, threads=threads, resume=resume, overwrite=overwrite))
        else:
            todo = []
            for i, s in enumerate(specs):
                done = _finished_result(s, threads)
                if done is not None:
                    report(i, done)
                else:
                    todo.append(i)
            if todo:
                _run_pool(specs, todo, jobs, threads, resume, overwrite, report)
    finally:
        bar.close()
    final = [r for r in results if r is not None]
    failed = [r for r in final if not r.ok]
    if failed and raise_on_failure:
        lines = "\n".join(f"  {r.label} seed {r.seed} ({r.output_dir}): {r.error}" for r in failed)
        raise RunsFailedError(f"{len(failed)} of {len(final)} runs failed:\n{lines}", final)
    return final


def _finished_result(spec: RunSpec, threads: int | None) -> RunResult | None:
    """The reused result of a spec whose folder holds it, else None (cheap: no training, no process)."""
    try:
        method, cfg = _resolve(spec, threads)
    except Exception:
        return None  # the worker reports the error
    base = RunResult(
        label=spec.label,
        seed=int(spec.seed),
        output_dir=spec.output_dir,
        status="failed",
        method=spec.method_name,
        tags=dict(spec.tags),
    )
    return _reused(spec, cfg, _identity(method.name, cfg, spec.final_split), base)


def _stop_with_parent() -> None:
    """Linux: one SIGTERM to this worker when the process that started it dies (a killed demo or sweep leaves
    no orphan training behind; the training saves a checkpoint and stops).

    The kernel sends the parent-death signal each time the worker is handed on: to another thread of the dying
    parent, then to init, so two or more arrive within milliseconds, and the engine reads a second SIGTERM as
    "stop at once, without saving". The death signal is therefore SIGUSR1, turned into a single SIGTERM."""
    if not sys.platform.startswith("linux"):
        return
    fired: list[bool] = []

    def on_parent_death(signum: int, frame: Any) -> None:
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        signal.signal(signal.SIGUSR1, on_parent_death)
        libc.prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_POOL_PARENT: int | None = None  # in a pool worker: the pid of the process that started it


def _init_worker(threads: int | None) -> None:
    # Ctrl-C reaches every process of the terminal: an idle worker ignores it (no traceback), a training
    # handles it (the engine installs its own handler for the training loop: save, then stop)
    global _POOL_PARENT
    _POOL_PARENT = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_with_parent()
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        torch.set_num_threads(threads)


def _pool_run(spec: RunSpec, threads: int | None, resume: bool, overwrite: bool) -> RunResult:
    """:func:`run_one` in a pool worker. The parent's death stops a training through its SIGTERM (the run saves
    and ends), but the worker would then wait for the next task forever: its task queue holds both ends of its
    pipe, so it never sees the parent go. A worker whose parent is gone exits after its run."""
    try:
        return run_one(spec, threads, resume, overwrite)
    finally:  # a finished, failed or interrupted run alike
        if _POOL_PARENT is not None and os.getppid() != _POOL_PARENT:
            os._exit(0)  # nobody is left to read the result; the run's folder holds it


def _run_pool(
    specs: list[RunSpec], todo: list[int], jobs: int, threads: int | None, resume: bool, overwrite: bool, report: Any
) -> None:
    ctx = mp.get_context("spawn")
    workers = min(int(jobs), len(todo))
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as ex:
        futures = {ex.submit(_pool_run, specs[i], threads, resume, overwrite): i for i in todo}
        try:
            _collect(futures, specs, report)
        except KeyboardInterrupt:  # runs not started are dropped; running ones save a checkpoint and stop
            ex.shutdown(wait=True, cancel_futures=True)
            raise


def _collect(futures: dict[Any, int], specs: list[RunSpec], report: Any) -> None:
    for fut in as_completed(futures):
        i = futures[fut]
        s = specs[i]
        try:
            r = fut.result()
        except (Exception, KeyboardInterrupt) as e:  # a worker that died, or a result that did not pickle
            kind = "worker process died" if isinstance(e, BrokenProcessPool) else type(e).__name__
            r = RunResult(
                label=s.label,
                seed=int(s.seed),
                output_dir=s.output_dir,
                status="failed",
                method=s.method_name,
                tags=dict(s.tags),
                error=f"{kind}: {e}",
            )
        report(i, r)


def seed_specs(
    label: str,
    method: Any,
    config: str | Path | dict[str, Any],
    seeds: Iterable[int],
    out_root: str | Path,
    overrides: dict[str, Any] | None = None,
    final_split: str = "test",
    tags: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """One variant over several seeds: a spec per seed in ``out_root/<slug(label)>/seed<k>``."""
    folder = Path(out_root) / slug(label)
    return [
        RunSpec(
            method=method,
            config=config,
            overrides=dict(overrides or {}),
            output_dir=str(folder / f"seed{k}"),
            seed=int(k),
            label=label,
            final_split=final_split,
            tags=dict(tags or {}),
        )
        for k in seeds
    ]


# ----------------------------------------------------------------------------- summaries


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def summarize(
    results: Sequence[RunResult],
    keys: Sequence[str],
    scale: float = 1.0,
    source: Literal["final", "best"] = "final",
) -> list[dict[str, Any]]:
    """Per label (in order of first appearance), over its successful runs and for each key:
    ``{"mean", "std" (ddof=1; None for fewer than 2 values), "n", "values"}``, values multiplied by
    ``scale``. ``values`` line up with the row's ``seeds`` (None where a run lacks the key). ``source``
    picks the final-split metrics or the best validation metrics. Failed runs are counted in ``failed``.
    """
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.label, []).append(r)
    rows = []
    for label, runs in groups.items():
        good = [r for r in runs if r.ok]
        row: dict[str, Any] = {
            "label": label,
            "n": len(good),
            "failed": len(runs) - len(good),
            "seeds": [r.seed for r in good],
            "metrics": {},
        }
        for k in keys:
            vals = [(r.metrics if source == "final" else r.best).get(k) for r in good]
            vals = [None if v is None else float(v) * scale for v in vals]
            present = [v for v in vals if v is not None]
            mean, std = _mean_std(present)
            row["metrics"][k] = {"mean": mean, "std": std, "n": len(present), "values": vals}
        rows.append(row)
    return rows


def _cell(stat: Mapping[str, Any], digits: int) -> str:
    if stat.get("mean") is None:
        return "n/a"
    mean = stat["mean"]
    std = stat.get("std")
    return f"{mean:.{digits}f} ± {'—' if std is None else f'{std:.{digits}f}'}"


def format_table(
    summary: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    header: str | Sequence[str] | None = None,
    digits: int = 2,
    show_n: bool = True,
) -> str:
    """Markdown table of :func:`summarize` rows: one row per label, a ``mean ± std`` cell per key.

    ``header`` is the first column's title (default ``variant``) or the titles of all columns
    (label column first, then one per key). ``show_n`` adds the number of runs (``+k failed`` if any), titled
    ``n``, or ``runs`` when a key is itself named ``n``.
    """
    if header is None or isinstance(header, str):
        titles = [header or "variant", *keys]
    else:
        titles = list(header)
        if len(titles) != len(keys) + 1:
            raise ValueError(f"header has {len(titles)} titles for {len(keys) + 1} columns")
    if show_n:
        titles.append("runs" if "n" in keys else "n")  # a metric named n (samples) keeps its own column
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in summary:
        cells = [str(row["label"]), *(_cell(row["metrics"].get(k, {}), digits) for k in keys)]
        if show_n:
            cells.append(f"{row['n']}" + (f" (+{row['failed']} failed)" if row.get("failed") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(
    path: str | Path,
    results: Sequence[RunResult],
    keys: Sequence[str],
    scale: float = 1.0,
    source: Literal["final", "best"] = "final",
) -> dict[str, Any]:
    """Write ``{"keys", "scale", "source", "summary", "runs"}`` as JSON (atomically); returns it."""
    payload = {
        "keys": list(keys),
        "scale": scale,
        "source": source,
        "summary": summarize(results, keys, scale=scale, source=source),
        "runs": [dataclasses.asdict(r) for r in results],
    }
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))
    return payload


def result_from_record(
    run_dir: str | Path, label: str, seed: int, status: Literal["done", "reused"] = "reused"
) -> RunResult:
    """The :class:`RunResult` of a finished engine run folder, from its ``run.json`` (test and validation
    metrics, steps, seconds), e.g. for runs another driver (the CLIP-VG curriculum) trained through this module."""
    rec = _read_json(Path(run_dir) / "run.json")
    if rec is None or rec.get("status") != "done":
        raise GroundkitError(f"{Path(run_dir) / 'run.json'}: no finished run recorded")
    base = RunResult(
        label=label, seed=int(seed), output_dir=str(run_dir), status="failed", method=rec.get("method", "")
    )
    return _finished(base, None, status, rec.get("metrics"), rec)


def results_from_dirs(run_dirs: Sequence[str | Path], label: str | None = None) -> list[RunResult]:
    """:class:`RunResult` of finished run directories (their ``metrics.json`` and ``config.yaml``), for
    runs trained by hand (``groundkit train`` once per seed). ``label`` defaults to each run's config name
    without its seed, so runs of one variant group together."""
    out = []
    for d in run_dirs:
        p = Path(d) / "metrics.json"
        rec = _read_json(p)
        if rec is None or "metrics" not in rec:
            raise GroundkitError(f"{p}: no metrics.json with 'metrics' (run not finished?)")
        cfg = rec.get("config", {})
        seed = int(cfg.get("train", {}).get("seed", 0))
        name = label or re.sub(r"[_-]?s(eed)?\d+$", "", Path(d).resolve().name) or Path(d).name
        out.append(
            RunResult(
                label=name,
                seed=seed,
                output_dir=str(d),
                status="reused",
                metrics=dict(rec["metrics"]),
                final_split=rec.get("split"),
                method=str(rec.get("task", "")),
            )
        )
    return out


def register_summarize(subparsers: Any) -> None:
    """``groundkit summarize RUN_DIR ...``: mean ± std over finished runs, one row per variant."""
    p = subparsers.add_parser(
        "summarize", help="mean ± std (ddof=1) of finished runs' metrics.json, one row per variant"
    )
    p.add_argument("runs", nargs="+", help="run directories (a variant's seeds share a name up to _s<seed> / -seed<k>)")
    p.add_argument("--keys", nargs="+", default=None, help="metrics to show (default: every metric of the first run)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply values (100 for fractions -> percent)")
    p.add_argument("--label", default=None, help="one label for all the runs")

    def run(a: Any) -> int:
        results = results_from_dirs(a.runs, a.label)
        keys = a.keys or [k for k in results[0].metrics if not k.startswith("num_")]
        print(format_table(summarize(results, keys, a.scale), keys))
        return 0

    p.set_defaults(func=run)
