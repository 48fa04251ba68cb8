"""The CLIP-VG table the demo runs (:func:`demo_table`: one curriculum seed, SSA and MSA through
:mod:`groundkit.methods.clipvg.curriculum`) and the pieces the documented table shares with it
(``experiments/clipvg_tables.py``): the world's ``data.*`` keys, the curricula, the baseline rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...runs import RunResult, RunSpec, result_from_record, run_many, summarize
from ...runs import format_table as runs_table
from .curriculum import CurriculumConfig, EngineBackend, MSAConfig, SearchConfig, run_msa, run_ssa
from .data import world_paths

__all__ = ["SOURCES", "BASELINES", "world_overrides", "baseline_rows", "curricula", "demo_table"]

SOURCES = ("template", "relation", "caption")


def world_overrides(world: Path) -> dict[str, Any]:
    """The ``data.*`` keys of a built-in ``pseudo`` world: its lists, images and every annotated object (paths of
    one's own: ``world_cpu``'s ``world.size`` builds no other world)."""
    return {f"data.{k}": v for k, v in world_paths(world).items()}


BASELINES = (
    ("random_object", "random object"),
    ("largest_object", "largest object"),
    ("centre_object", "centre object"),
)


def baseline_rows(results: list[RunResult]) -> str:
    """Table rows of the trivial baselines (:func:`groundkit.metrics.refexp_baselines`) on the test split,
    read from the runs' metrics (every run evaluates them on the same test set), mean ± std over runs."""
    rows = ""
    for key, name in BASELINES:
        vals = [r.metrics[key] for r in results if key in r.metrics]
        if vals:
            spread = f" ± {np.std(vals, ddof=1):.2f}" if len(vals) > 1 else ""
            rows += f"\n| {name} (text ignored) | {np.mean(vals):.2f}{spread} | | |"
    return rows


def curricula(
    world: Path,
    out: Path,
    base: str,
    sets: dict[str, Any],
    seed: int,
    jobs: int,
    metric: str = "acc",
    threads: int = 1,
    ssa_evals: int = 4,
    msa_evals: int = 3,
    msa_steps: int = 0,
    runs_dir: Path | None = None,
    echo: Any = None,
) -> dict[str, Any]:
    """SSA on the template source and MSA over the three sources (``msa_steps`` 0: as many as there are),
    sharing one runs folder (default ``<out>/ssa/runs``) so that no selection is trained twice."""
    sep = world / "splits" / "unc" / "train_separate"
    files = {s: str(sep / f"{i + 1}_unc_train_pseudo_{s}.pth") for i, s in enumerate(SOURCES)}
    common = dict(
        config=base,
        set=sets,
        seed=seed,
        jobs=jobs,
        threads=threads,
        metric=metric,
        runs_dir=str(runs_dir or out / "ssa" / "runs"),
    )
    ssa_cfg = CurriculumConfig(
        out=str(out / "ssa"), source=files["template"], search=SearchConfig(max_evals=ssa_evals), **common
    )
    ssa = run_ssa(ssa_cfg, EngineBackend(ssa_cfg), echo)
    msa_cfg = CurriculumConfig(
        out=str(out / "msa"),
        sources=files,
        msa=MSAConfig(h0=0.5, max_steps=msa_steps),
        search=SearchConfig(max_evals=msa_evals),
        **common,
    )
    msa = run_msa(msa_cfg, EngineBackend(msa_cfg), echo)
    return {"ssa": ssa, "msa": msa, "files": files}


def demo_table(
    world: Path,
    out: Path,
    seed: int = 0,
    config: str = "world_cpu",
    sets: dict[str, Any] | None = None,
    jobs: int = 2,
    threads: int = 1,
    ssa_evals: int = 3,
    msa_evals: int = 2,
    msa_steps: int = 1,
    echo: Any = None,
) -> tuple[list[RunResult], str, dict[str, Any]]:
    """The demo's CLIP-VG table from one curriculum seed: the runs SSA and MSA trained anyway (all template
    labels = SSA's measurer, the SSA selection, the merged sources, the MSA selection) plus one fully
    supervised run, each tested once; no run is trained twice. Returns the results, the markdown table and
    ``{"ssa", "msa", "msa_reliability"}`` (the curricula's results; the reliability files and chosen thresholds)."""
    sets = {**world_overrides(world), **(sets or {})}
    runs_dir = out / "runs"
    cur = curricula(
        world, out, config, sets, seed, jobs, "acc", threads, ssa_evals, msa_evals, msa_steps, runs_dir, echo
    )
    ssa, msa = cur["ssa"], cur["msa"]
    full_spec = RunSpec(
        method="clipvg",
        config=config,
        overrides={**sets, "data.supervision": "full"},
        output_dir=str(out / "full_supervision"),
        seed=seed,
        label="full supervision (human labels)",
    )
    full = run_many([full_spec], jobs=1, threads=threads, progress=False)
    h = ssa["final"].get("threshold")
    labelled = [
        ("template source, all labels", ssa["all"]),
        (f"template source, SSA (h* = {h:.2f})" if h is not None else "template source, SSA (kept all)", ssa["final"]),
        ("3 sources merged, all labels", msa["all_merged"]),
    ]
    if msa.get("final"):
        picked = ", ".join(f"{u['source']} h*={u['threshold']:.2f}" for u in msa["steps"])
        labelled.append((f"3 sources, MSA ({picked})", msa["final"]))
    results = [result_from_record(runs_dir / rec["run"], label, seed, status="done") for label, rec in labelled]
    results += full
    keys = ["acc", "miou"]
    table = runs_table(
        summarize(results, keys), keys, header=["clipvg (referring expressions, test)", "Acc@0.5", "mIoU"]
    )
    table += baseline_rows(full)
    n_ssa, n_msa = ssa["trained"] + ssa["reused"], msa["trained"] + msa["reused"]
    table += (
        f"\n\nThe curricula trained {n_ssa} (SSA, {len(ssa['search']['history'])} thresholds tried) and {n_msa}"
        f" (MSA, {len(msa['steps'])} step(s) added; stop: {msa['stop']}) runs; every decision is in"
        f" {out / 'ssa' / 'log.jsonl'} and {out / 'msa' / 'log.jsonl'}."
    )
    return results, table, {"ssa": ssa, "msa": msa, "msa_reliability": str(out / "msa" / "reliability")}
