"""Self-paced curriculum adapting: SSA (single source) and MSA (multi-source), reconstructed.

The authors released only the reliability scorer (their issue #7); the procedure below follows the
paper (figure 3, algorithm 1) and says where it had to choose.

**SSA** on one pseudo-label source S:
1. train on all of S -> measurer M (this run is also the "all pseudo labels" baseline);
2. reliability r(x) = IoU(M(x), pseudo box) for every x in S; histogram saved (NPZ, JSON, PNG);
3. search the threshold h maximising the validation accuracy of a model trained on
   ``{x in S : r(x) > h}`` (:func:`search_threshold`: a coarse ascending grid that stops at the
   first drop, then parabolic steps through the best three points with golden-section fallback
   until the vertex falls on the best point, the bracket is narrower than ``tol`` or ``max_evals``
   thresholds were tried). Thresholds that keep the same samples share one run.

**MSA** on sources S_1..S_n, D = {} (the selected labels so far):
1. measurers M_i trained on each full S_i; reliabilities r_ji of every S_i under every M_j;
2. step k: *source selection* — for each unused source i, train on D ∪ {x in S_i: r_ii > h0}, keep
   the best i*; *measurer selection* — for every measurer j (j = i*: same-source "SR", else
   cross-source "CR") train on D ∪ {x in S_i*: r_ji* > h0}, keep the best j*; *threshold* — search h
   for (S_i*, M_j*) on top of D; D <- D ∪ {x in S_i*: r_j*i* > h*};
3. **stop rule**: stop when every source is in D, or when a step's best validation accuracy does not
   exceed the previous step's by more than ``min_gain`` (that step is then not added).

Every run trains with the same config (``config`` + ``set``); the selection is written as a
TransVG ``.pth`` list whose content hash names the run, so any selection is trained once: rerunning
after a kill reuses every finished run (and resumes the interrupted one from its checkpoint).
Every evaluation is appended to ``<out>/log.jsonl``, the outcome to ``<out>/result.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ...formats import transvg
from ...runs import RunSpec, run_many
from .. import load_run
from . import pseudo
from .data import GroundingSet

__all__ = [
    "SearchConfig",
    "MSAConfig",
    "CurriculumConfig",
    "SearchResult",
    "search_threshold",
    "Backend",
    "TrainJob",
    "Curriculum",
    "run_ssa",
    "run_msa",
    "load_curriculum_config",
    "register_curriculum",
    "EngineBackend",
]


# ============================================================================ config


@dataclass
class SearchConfig:
    grid: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.6, 0.9])  # coarse pass, ascending
    lo: float = 0.0
    hi: float = 0.95
    tol: float = 0.05  # stop when the bracket around the best threshold is narrower
    max_evals: int = 8  # thresholds tried at most (the coarse pass included)
    patience: int = 1  # the coarse pass stops after this many consecutive non-improvements
    min_keep: int = 32  # a threshold keeping fewer samples is not trained (counts as -inf)
    decimals: int = 2  # thresholds are rounded to this many decimals


@dataclass
class MSAConfig:
    h0: float = 0.5  # threshold for source and measurer selection (the released files' 0.5)
    measurer_selection: bool = True  # False: always the same-source measurer
    min_gain: float = 0.0  # a step must raise the best val metric by more than this
    max_steps: int = 0  # 0: as many as there are sources


@dataclass
class CurriculumConfig:
    config: str = ""  # the clipvg training config every run uses (YAML path or shipped name)
    # the built-in pseudo world ("" = none): built or reused (checksum-verified) at this size and seed, and
    # "{world}" in source, sources and set values becomes its folder
    world: str = ""
    world_seed: int = 0
    set: dict[str, Any] = field(default_factory=dict)  # overrides for every run, e.g. {"train.epochs": 20}
    out: str = "runs/curriculum"
    runs_dir: str = ""  # where the trainings go ("" = <out>/runs); curricula sharing it share their runs
    source: str = ""  # SSA: the pseudo-label .pth list
    sources: dict[str, str] = field(default_factory=dict)  # MSA: name -> .pth list (in this order)
    dataset: str = "unc"  # layout of the lists
    metric: str = "acc"  # validation metric that is maximised
    seed: int = 0  # train.seed of every run
    jobs: int = 1  # runs trained in parallel
    threads: int = 1  # torch threads per run (more threads than free cores makes a shared CPU crawl)
    search: SearchConfig = field(default_factory=SearchConfig)
    msa: MSAConfig = field(default_factory=MSAConfig)


def load_curriculum_config(source: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> CurriculumConfig:
    """A :class:`CurriculumConfig` from a YAML file or dict, then ``key=value`` overrides."""
    data = dict(source) if isinstance(source, dict) else load_yaml(source)
    if overrides:
        data = apply_overrides(CurriculumConfig, data, list(overrides))
    cfg = from_dict(CurriculumConfig, data)
    if cfg.world:
        from ...world import generate  # noqa: PLC0415 (only curricula on the built-in world need it)

        folder = str(generate("pseudo", size=cfg.world, seed=cfg.world_seed, progress=True))
        sub = lambda v: v.replace("{world}", folder) if isinstance(v, str) else v  # noqa: E731
        cfg.source, cfg.sources = sub(cfg.source), {k: sub(v) for k, v in cfg.sources.items()}
        cfg.set = {k: sub(v) for k, v in cfg.set.items()}
    if not isinstance(source, dict):  # relative paths are relative to the YAML file
        base = Path(source).parent

        def rel(p: str) -> str:
            return p if not p or Path(p).is_absolute() else str((base / p).resolve()) if (base / p).exists() else p

        cfg.source = rel(cfg.source)
        cfg.sources = {k: rel(v) for k, v in cfg.sources.items()}
        if cfg.config.endswith((".yaml", ".yml")):
            cfg.config = rel(cfg.config)
    return cfg


# ============================================================================ threshold search


@dataclass
class SearchResult:
    best: float
    value: float
    history: list[tuple[float, float]]  # (threshold, value) in evaluation order
    reason: str  # why the search stopped

    @property
    def ties(self) -> list[float]:
        """Every tried threshold whose value equals the best (the lowest of them, which keeps the most labels,
        is ``best``)."""
        return sorted(h for h, v in self.history if v == self.value and math.isfinite(v))

    @property
    def flat(self) -> bool:
        """True when every trained threshold gave the same value (the curve says nothing)."""
        vals = {v for _, v in self.history if math.isfinite(v)}
        return len(vals) == 1 and sum(math.isfinite(v) for _, v in self.history) > 1


def search_threshold(f: Callable[[float], float | None], cfg: SearchConfig) -> SearchResult:
    """Maximise ``f(h)`` over thresholds with few evaluations; ``f`` returns None for a threshold
    that cannot be trained (too few samples kept), counted as -inf.

    Coarse pass: the grid in ascending order, stopping after ``patience`` consecutive values that do
    not improve on the best. Refinement: the parabola through the best point and its two evaluated
    neighbours proposes the next threshold; when it falls outside the bracket or onto a tried
    threshold, a golden-section point of the wider side is used instead; the search ends when the
    vertex coincides with the best threshold (within ``tol / 2``), the bracket is narrower than
    ``tol``, or ``max_evals`` thresholds were tried.
    """
    memo: dict[float, float] = {}
    order: list[tuple[float, float]] = []
    rnd = lambda h: round(float(h), cfg.decimals)  # noqa: E731

    def ev(h: float) -> float:
        h = rnd(h)
        if h not in memo:
            v = f(h)
            memo[h] = -math.inf if v is None else float(v)
            order.append((h, memo[h]))
        return memo[h]

    best, drops = -math.inf, 0
    for h in sorted(cfg.grid):
        if len(memo) >= cfg.max_evals:
            break
        v = ev(h)
        if v > best:
            best, drops = v, 0
        else:
            drops += 1
            if drops >= cfg.patience:
                break
    reason = "max_evals"
    golden = (3 - math.sqrt(5)) / 2
    while len(memo) < cfg.max_evals:
        pts = sorted(memo.items())
        i = max(range(len(pts)), key=lambda k: (pts[k][1], -k))
        b, fb = pts[i]
        a = pts[i - 1] if i > 0 else None
        c = pts[i + 1] if i + 1 < len(pts) else None
        lo_h = a[0] if a else cfg.lo
        hi_h = c[0] if c else cfg.hi
        if hi_h - lo_h <= cfg.tol or not math.isfinite(fb):
            reason = "bracket" if math.isfinite(fb) else "nothing trainable"
            break
        x = None
        if a and c and all(math.isfinite(v) for v in (a[1], c[1])):
            (xa, ya), (xc, yc) = a, c
            den = (b - xa) * (fb - yc) - (b - xc) * (fb - ya)
            if den != 0:
                vx = b - 0.5 * ((b - xa) ** 2 * (fb - yc) - (b - xc) ** 2 * (fb - ya)) / den
                if abs(vx - b) < cfg.tol / 2:
                    reason = "converged"
                    break
                if xa + cfg.tol / 2 <= vx <= xc - cfg.tol / 2:
                    x = vx
        if x is None or rnd(x) in memo:
            x = b - golden * (b - lo_h) if (b - lo_h) > (hi_h - b) else b + golden * (hi_h - b)
        if rnd(x) in memo:
            reason = "converged"
            break
        ev(x)
    pts = sorted(memo.items())
    h_best, v_best = max(pts, key=lambda t: t[1])
    return SearchResult(h_best, v_best, order, reason)


# ============================================================================ training backend


@dataclass
class TrainJob:
    name: str  # run name (content hash of the selection + config)
    train_file: str  # the .pth list to train on
    label: str  # what it is, for the log


class Backend(Protocol):
    """What the curriculum needs from training: runs (reused when finished) and reliability scores."""

    def train(self, jobs: list[TrainJob]) -> list[dict[str, Any]]:
        """Per job ``{"val": metrics, "test": metrics, "run_dir": str, "reused": bool}``."""
        ...

    def score(self, run_dir: str, pth_file: str) -> np.ndarray:
        """Reliability of every sample of ``pth_file`` under the model of ``run_dir``."""
        ...


# ============================================================================ the procedure


def _digest(entries: list, extra: str) -> str:
    h = hashlib.sha1(extra.encode())
    h.update(repr(entries).encode())
    return h.hexdigest()[:12]


class Curriculum:
    """Shared machinery of SSA and MSA: selections as files, runs, reliability, logging."""

    def __init__(self, cfg: CurriculumConfig, backend: Backend, kind: str, echo: Callable[[str], None] | None = None):
        self.cfg, self.backend, self.kind = cfg, backend, kind
        self.out = Path(cfg.out)
        # selections live beside the runs that train on them, so curricula sharing runs share both
        self.selections = Path(cfg.runs_dir).parent / "selections" if cfg.runs_dir else self.out / "selections"
        self.out.mkdir(parents=True, exist_ok=True)
        self.selections.mkdir(parents=True, exist_ok=True)
        self.echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
        self.config_tag = json.dumps(
            {"config": cfg.config, "set": cfg.set, "seed": cfg.seed}, sort_keys=True, default=str
        )
        self.entries: dict[str, list] = {}
        self.trained = 0
        self.reused = 0
        self.step = 0

    # ---------------------------------------------------------------- bookkeeping

    def log(self, event: dict[str, Any]) -> None:
        event = {"time": round(time.time(), 1), "kind": self.kind, **event}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(event, default=float) + "\n")

    def source_entries(self, name: str, path: str) -> list:
        if name not in self.entries:
            self.entries[name] = transvg.load_raw(path)
        return self.entries[name]

    def selection_file(self, entries: list) -> tuple[str, str]:
        """``(run name, path)`` of the list ``entries``, written once (atomically)."""
        key = _digest(entries, self.config_tag)
        path = self.selections / f"{key}.pth"
        if not path.is_file():
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            transvg.save_list(entries, tmp, self.cfg.dataset)
            os.replace(tmp, path)
        return f"run-{key}", str(path)

    def train(self, selections: list[tuple[str, list]]) -> list[dict[str, Any]]:
        """Train (or reuse) one run per ``(label, entries)``; identical selections share a run."""
        jobs, seen = [], {}
        for label, entries in selections:
            name, path = self.selection_file(entries)
            if name not in seen:
                seen[name] = len(jobs)
                jobs.append(TrainJob(name, path, label))
        results = self.backend.train(jobs)
        for res in results:
            if res.get("reused"):
                self.reused += 1
            else:
                self.trained += 1
        by_name = {j.name: r | {"run": j.name} for j, r in zip(jobs, results)}
        return [by_name[self.selection_file(e)[0]] for _, e in selections]

    def value(self, res: dict[str, Any]) -> float:
        m = res.get("val", {})
        if self.cfg.metric not in m:
            raise KeyError(f"run {res.get('run')}: no validation metric {self.cfg.metric!r} (has {sorted(m)})")
        return float(m[self.cfg.metric])

    def reliability(self, source: str, path: str, measurer: str, run_dir: str) -> np.ndarray:
        """Scores of ``source`` under ``measurer`` (cached with their histogram under ``<out>/reliability``)."""
        stem = self.out / "reliability" / f"{source}_by_{measurer}"
        if stem.with_suffix(".npz").is_file():
            return np.load(stem.with_suffix(".npz"))["reliability"]
        r = self.backend.score(run_dir, path)
        rel = "SR" if source == measurer else "CR"
        files = pseudo.save_histogram(r, stem, title=f"{source} scored by the {measurer} measurer ({rel})")
        self.log(
            {
                "event": "reliability",
                "source": source,
                "measurer": measurer,
                "n": len(r),
                "mean": files.summary["mean"],
                "files": str(stem),
            }
        )
        return r

    def progress(self, msg: str) -> None:
        self.step += 1
        self.echo(f"[{self.kind}] {self.step:>2}: {msg}")

    # ---------------------------------------------------------------- threshold search on top of a base

    def search(self, what: str, base: list, entries: list, r: np.ndarray) -> tuple[SearchResult, dict[float, dict]]:
        """Search h for ``base ∪ {entries: r > h}``; returns the result and per-threshold records."""
        records: dict[float, dict] = {}

        def f(h: float) -> float | None:
            idx = pseudo.select(entries, r, h)
            if len(idx) < self.cfg.search.min_keep:
                self.progress(f"{what} h={h:.2f}: keeps {len(idx)} < min_keep, not trained")
                records[h] = {"kept": len(idx), "skipped": True}
                return None
            sel = base + [entries[i] for i in idx]
            res = self.train([(f"{what} h={h:.2f}", sel)])[0]
            v = self.value(res)
            rec = {
                "threshold": h,
                "kept": len(idx),
                "of": len(entries),
                "train_size": len(sel),
                "val": v,
                "test": res.get("test", {}),
                "run": res["run"],
                "reused": bool(res.get("reused")),
            }
            records[h] = rec
            self.log({"event": "threshold", "what": what, **rec})
            self.progress(
                f"{what} h={h:.2f}: keeps {len(idx)}/{len(entries)} ({100 * len(idx) / len(entries):.1f}%)"
                f" -> val {self.cfg.metric} {v:.4f} ({res['run']}{', reused' if res.get('reused') else ''})"
            )
            return v

        result = search_threshold(f, self.cfg.search)
        return result, records

    def finish(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload = {"kind": self.kind, "trained": self.trained, "reused": self.reused, **payload}
        tmp = self.out / f"result.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(payload, indent=1, default=float))
        os.replace(tmp, self.out / "result.json")
        self.log({"event": "done", **{k: v for k, v in payload.items() if k in ("trained", "reused")}})
        return payload


def run_ssa(cfg: CurriculumConfig, backend: Backend, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Single-source curriculum on ``cfg.source``; returns (and writes) the result."""
    if not cfg.source:
        raise ConfigError("SSA needs `source:` (the pseudo-label .pth list)")
    cur = Curriculum(cfg, backend, "ssa", echo)
    entries = cur.source_entries("source", cfg.source)
    cur.log({"event": "start", "config": to_dict(cfg)})
    full = cur.train([("all labels", entries)])[0]
    v_all = cur.value(full)
    cur.progress(
        f"all {len(entries)} labels -> val {cfg.metric} {v_all:.4f} (measurer {full['run']}"
        f"{', reused' if full.get('reused') else ''})"
    )
    cur.log({"event": "all", "val": v_all, "test": full.get("test", {}), "run": full["run"], "n": len(entries)})
    r = cur.reliability("source", cfg.source, "source", full["run_dir"])
    result, records = cur.search("source", [], entries, r)
    notes = []
    if result.flat:
        notes.append(f"flat validation curve: every trained threshold gives {result.value:.4f}")
    elif len(result.ties) > 1:
        notes.append(f"tie: h in {[round(h, 2) for h in result.ties]} give {result.value:.4f}")
    if len(result.ties) > 1:
        notes.append("rule: the lowest threshold (it keeps the most labels)")
    if result.value > v_all and math.isfinite(result.value):
        final = {**records[result.best], "rule": "the best validation value of the search"}
        head = f"chosen h*={result.best:.2f}: keeps {final['kept']}/{len(entries)}, val {cfg.metric} {result.value:.4f}"
        head += f" > {v_all:.4f} with all labels"
    else:
        rule = "no threshold beats all labels strictly: all labels kept"
        final = {
            "threshold": None,
            "run": full["run"],
            "val": v_all,
            "test": full.get("test", {}),
            "kept": len(entries),
            "rule": rule,
        }
        best = f"the search's best h={result.best:.2f} gives {result.value:.4f}" if math.isfinite(result.value) else ""
        head = f"chosen: all {len(entries)} labels (val {cfg.metric} {v_all:.4f}; {best or 'no threshold trained'}; {rule})"
    if notes:
        final["notes"] = notes
    cur.progress(
        f"{head} ({result.reason}, {len(result.history)} thresholds tried{'; ' if notes else ''}{'; '.join(notes)})"
    )
    return cur.finish(
        {
            "all": {"val": v_all, "test": full.get("test", {}), "run": full["run"]},
            "search": {
                "best": result.best,
                "value": result.value,
                "ties": result.ties,
                "flat": result.flat,
                "history": result.history,
                "reason": result.reason,
            },
            "final": final,
            "reliability": str(cur.out / "reliability" / "source_by_source"),
        }
    )


class _MultiSource:
    """One MSA run: the sources, their measurers and reliabilities, and the selection built step by step."""

    def __init__(self, cur: Curriculum, cfg: CurriculumConfig):
        self.cur, self.cfg, self.m = cur, cfg, cfg.msa
        self.src = {name: cur.source_entries(name, p) for name, p in cfg.sources.items()}
        self.measurers: dict[str, dict[str, Any]] = {}
        self.rel: dict[tuple[str, str], np.ndarray] = {}
        self.selected: list = []
        self.used: list[dict[str, Any]] = []
        self.best_so_far = -math.inf
        self.best_rec: dict[str, Any] | None = None

    def train_measurers(self) -> dict[str, Any]:
        """Train on all sources merged (the baseline) and one measurer per full source; returns the baseline."""
        cur = self.cur
        merged = [e for name in self.src for e in self.src[name]]
        allres = cur.train([("all sources merged", merged)] + [(f"measurer {n}", self.src[n]) for n in self.src])
        v_merged = cur.value(allres[0])
        self.measurers = {n: res for n, res in zip(self.src, allres[1:])}
        cur.progress(
            f"all sources merged ({len(merged)} labels) -> val {self.cfg.metric} {v_merged:.4f}; measurers: "
            + ", ".join(f"{n} {cur.value(r):.4f}" for n, r in self.measurers.items())
        )
        cur.log({"event": "all", "val": v_merged, "test": allres[0].get("test", {}), "run": allres[0]["run"]})
        for n, res in self.measurers.items():
            cur.log(
                {
                    "event": "measurer",
                    "source": n,
                    "val": cur.value(res),
                    "test": res.get("test", {}),
                    "run": res["run"],
                }
            )
        return allres[0]

    def r_of(self, source: str, measurer: str) -> np.ndarray:
        """Reliabilities of ``source`` under ``measurer``'s model (computed once)."""
        if (source, measurer) not in self.rel:
            self.rel[(source, measurer)] = self.cur.reliability(
                source, self.cfg.sources[source], measurer, self.measurers[measurer]["run_dir"]
            )
        return self.rel[(source, measurer)]

    def kept(self, source: str, measurer: str, h: float) -> list:
        """The selection so far plus the labels of ``source`` that ``measurer`` scores above ``h``."""
        return self.selected + [
            self.src[source][i] for i in pseudo.select(self.src[source], self.r_of(source, measurer), h)
        ]

    def remaining(self) -> list[str]:
        """The sources not added yet, in config order."""
        return [n for n in self.src if n not in {u["source"] for u in self.used}]

    def pick_source(self, k: int, remaining: list[str]) -> tuple[str, float]:
        """Source selection at h0 with the same-source measurer: ``(best source, its val)``."""
        cur, h0 = self.cur, self.m.h0
        res = cur.train([(f"step {k} + {n} (SR, h0={h0})", self.kept(n, n, h0)) for n in remaining])
        vals = {n: cur.value(r) for n, r in zip(remaining, res)}
        for n, r in zip(remaining, res):
            cur.log({"event": "source_candidate", "step": k, "source": n, "val": vals[n], "run": r["run"]})
        pick = max(remaining, key=lambda n: vals[n])
        cur.progress(
            f"step {k} source selection at h0={h0}: "
            + ", ".join(f"{n} {v:.4f}" for n, v in vals.items())
            + f" -> {pick}"
        )
        return pick, vals[pick]

    def pick_measurer(self, k: int, pick: str, v_pick: float) -> str:
        """Measurer selection for ``pick`` at h0: the same-source one (SR) against each other (CR)."""
        cur, h0 = self.cur, self.m.h0
        meas_vals = {pick: v_pick}
        if self.m.measurer_selection and len(self.src) > 1:
            others = [j for j in self.src if j != pick]
            res = cur.train([(f"step {k} {pick} by {j} (CR, h0={h0})", self.kept(pick, j, h0)) for j in others])
            for j, r in zip(others, res):
                meas_vals[j] = cur.value(r)
                cur.log(
                    {
                        "event": "measurer_candidate",
                        "step": k,
                        "source": pick,
                        "measurer": j,
                        "relation": "CR",
                        "val": meas_vals[j],
                        "run": r["run"],
                    }
                )
        meas = max(meas_vals, key=lambda j: (meas_vals[j], j == pick))
        cur.progress(
            f"step {k} measurer for {pick}: "
            + ", ".join(f"{j} ({'SR' if j == pick else 'CR'}) {v:.4f}" for j, v in meas_vals.items())
            + f" -> {meas}"
        )
        return meas

    def add(self, k: int, pick: str, meas: str) -> str | None:
        """Search the threshold for ``(pick, meas)`` on top of the selection and add what it keeps;
        returns the stop reason instead when the gain is not above ``min_gain``."""
        cur, metric = self.cur, self.cfg.metric
        r = self.r_of(pick, meas)
        result, records = cur.search(f"step {k} {pick} by {meas}", self.selected, self.src[pick], r)
        rec = records[result.best]
        gain = result.value - self.best_so_far
        cur.log(
            {
                "event": "step",
                "step": k,
                "source": pick,
                "measurer": meas,
                "threshold": result.best,
                "val": result.value,
                "gain": gain if math.isfinite(gain) else None,
                "record": rec,
            }
        )
        if math.isfinite(self.best_so_far) and gain <= self.m.min_gain:
            stop = (
                f"step {k} ({pick}) reached val {metric} {result.value:.4f}, not above "
                f"{self.best_so_far:.4f} + min_gain {self.m.min_gain}"
            )
            cur.progress(f"stop: {stop}")
            return stop
        idx = pseudo.select(self.src[pick], r, result.best)
        self.selected = self.selected + [self.src[pick][i] for i in idx]
        n = len(self.src[pick])
        self.used.append(
            {
                "source": pick,
                "measurer": meas,
                "threshold": result.best,
                "kept": len(idx),
                "of": n,
                "val": result.value,
                "run": rec["run"],
            }
        )
        self.best_so_far, self.best_rec = result.value, rec
        cur.progress(
            f"step {k} adds {pick} (measurer {meas}, h*={result.best:.2f}, {len(idx)}/{n} labels)"
            f" -> val {metric} {result.value:.4f}, {len(self.selected)} labels selected"
        )
        return None

    def steps(self) -> str:
        """Add sources step by step until the stop rule; returns why it stopped."""
        n_steps = self.m.max_steps or len(self.src)
        stop_reason = "all sources used" if n_steps >= len(self.src) else f"msa.max_steps={n_steps} steps done"
        for k in range(1, n_steps + 1):
            remaining = self.remaining()
            if not remaining:
                return "all sources used"
            pick, v_pick = self.pick_source(k, remaining)
            meas = self.pick_measurer(k, pick, v_pick)
            stop = self.add(k, pick, meas)
            if stop is not None:
                return stop
        return stop_reason


def run_msa(cfg: CurriculumConfig, backend: Backend, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Multi-source curriculum over ``cfg.sources``; returns (and writes) the result."""
    if len(cfg.sources) < 1:
        raise ConfigError("MSA needs `sources:` (name -> pseudo-label .pth list)")
    cur = Curriculum(cfg, backend, "msa", echo)
    msa = _MultiSource(cur, cfg)
    cur.log({"event": "start", "config": to_dict(cfg)})
    merged = msa.train_measurers()
    stop_reason = msa.steps()
    return cur.finish(
        {
            "all_merged": {"val": cur.value(merged), "test": merged.get("test", {}), "run": merged["run"]},
            "measurers": {
                n: {"val": cur.value(r), "test": r.get("test", {}), "run": r["run"]} for n, r in msa.measurers.items()
            },
            "steps": msa.used,
            "stop": stop_reason,
            "final": msa.best_rec,
            "selected": len(msa.selected),
        }
    )


# ============================================================================ the engine backend


class EngineBackend:
    """Trains curriculum runs with :func:`groundkit.runs.run_many` (finished runs are reused, killed
    ones resumed) and scores reliabilities with a run's best checkpoint."""

    def __init__(self, cfg: Any, device: str = "cpu"):
        self.cfg, self.device = cfg, device

    def train(self, jobs: list[Any]) -> list[dict[str, Any]]:
        c = self.cfg
        specs = [
            RunSpec(
                method="clipvg",
                config=c.config or "offline",
                overrides={**c.set, "data.train_file": j.train_file},
                output_dir=str(Path(c.runs_dir or Path(c.out) / "runs") / j.name),
                seed=c.seed,
                label=j.label,
                tags={"train_file": j.train_file},
            )
            for j in jobs
        ]
        results = run_many(specs, jobs=c.jobs, threads=c.threads, progress=False)
        return [
            {
                "val": r.best,
                "test": r.metrics,
                "run_dir": r.output_dir,
                "reused": r.status == "reused",
                "seconds": r.seconds,
            }
            for r in results
        ]

    def score(self, run_dir: str, pth_file: str) -> np.ndarray:
        method, cfg, model = load_run(run_dir, device=self.device)
        entries = transvg.load_raw(pth_file)
        samples = transvg.parse_entries(entries, cfg.data.dataset, pth_file, truncate=cfg.data.truncate_boxes)
        ds = GroundingSet(samples, cfg.data, augment=False, name=Path(pth_file).name)
        return method.sample_ious(model, ds, cfg, self.device)


# ============================================================================ command line


def register_curriculum(sub: Any) -> None:
    """Adds ``groundkit curriculum ssa|msa CONFIG [--set key=value ...] [--jobs N]``."""
    p = sub.add_parser("curriculum", help="CLIP-VG self-paced curriculum: ssa (one source) or msa (several)")
    p.add_argument("kind", choices=["ssa", "msa"])
    p.add_argument(
        "config",
        help="curriculum YAML, or a shipped one by name (groundkit/methods/clipvg/configs/curriculum/): ssa_world / "
        "msa_world (the built-in world), ssa_refcoco / msa_refcoco (the released RefCOCO pseudo labels)",
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override curriculum keys, e.g. jobs=2")
    p.add_argument("--out", default=None, help="output directory (out)")
    p.set_defaults(func=_cli, takes_rest=False)


def shipped_curriculum(name: str) -> Path:
    """The path of a YAML given by path or by the name of a shipped curriculum config
    (``configs/curriculum/<name>.yaml``)."""
    p = Path(name)
    if p.is_file():
        return p
    folder = Path(__file__).parent / "configs" / "curriculum"
    if (folder / f"{name}.yaml").is_file():
        return folder / f"{name}.yaml"
    names = sorted(q.stem for q in folder.glob("*.yaml"))
    raise ConfigError(f"no curriculum config {name!r}: not a file, and the shipped ones are {', '.join(names)}")


def _cli(args: Any) -> int:
    overrides = list(args.set) + ([f"out={args.out}"] if args.out else [])
    cfg = load_curriculum_config(shipped_curriculum(args.config), overrides)
    backend = EngineBackend(cfg)
    res = (run_ssa if args.kind == "ssa" else run_msa)(cfg, backend)
    print(json.dumps({k: res[k] for k in ("final", "trained", "reused") if k in res}, indent=1, default=float))
    return 0
