"""The results table of docs/clipvg.md on the built-in pseudo world.

``python -m groundkit.methods.clipvg.experiments OUT [--size small] [--seeds 0 1 2] [--jobs 2]``

1. builds (or reuses) the ``pseudo`` world and trains with the shipped ``world_cpu`` config;
2. runs SSA on the template source and MSA on the three sources (template, relation, caption)
   with ``--curriculum-seed`` (each curriculum is dozens of trainings; running it once per seed is
   what a GPU is for);
3. trains, for every seed, the variants: all template labels, the SSA selection, all three sources
   merged, the MSA selection, full supervision (human train labels), beside the text-blind baselines;
4. writes ``OUT/summary.json`` and ``OUT/table.md`` (test = testA + testB; val in brackets).

Every training goes through :func:`groundkit.runs.run_many`, so a killed run of this script is
simply started again. Each selection is trained again for every seed in its own folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ...config import parse_override
from ...runs import RunResult, RunSpec, result_from_record, run_many, summarize
from ...runs import format_table as runs_table
from ...world import generate
from .curriculum import CurriculumConfig, EngineBackend, MSAConfig, SearchConfig, run_msa, run_ssa
from .data import world_paths

__all__ = ["world_overrides", "baseline_rows", "demo_table", "main"]

SOURCES = ("template", "relation", "caption")


def world_overrides(world: Path) -> dict[str, Any]:
    """The ``data.*`` keys of a built-in ``pseudo`` world: its lists, images and every annotated object (paths of
    one's own: ``world_cpu``'s ``data.synth_size`` builds no other world)."""
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


def _curricula(
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
    cur = _curricula(
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


def _selection(cur_out: Path, run: str) -> str:
    return str(cur_out / "selections" / f"{run.removeprefix('run-')}.pth")  # the shared selections folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m groundkit.methods.clipvg.experiments", description=__doc__)
    p.add_argument("out")
    p.add_argument("--size", default="small")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--curriculum-seed", type=int, default=0)
    p.add_argument("--config", default="world_cpu")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--metric", default="acc", help="validation metric the curricula maximise (acc or miou)")
    a = p.parse_args(argv)
    out = Path(a.out)
    world = generate("pseudo", size=a.size, seed=a.world_seed, progress=False)
    sets = {
        **world_overrides(world),
        "data.cache_dir": str(out / "feature_cache"),
        **dict(parse_override(s) for s in a.set),
    }
    cur = _curricula(world, out, a.config, sets, a.curriculum_seed, a.jobs, a.metric)
    ssa_file = _selection(out / "ssa", cur["ssa"]["final"]["run"])
    msa_final = cur["msa"]["final"] or {}
    variants = {
        "template, all labels": {"data.train_file": cur["files"]["template"]},
        "template, SSA": {"data.train_file": ssa_file},
        "3 sources merged, all labels": {"data.train_file": str(world / "splits/unc/unc_train_pseudo.pth")},
        "3 sources, MSA": {"data.train_file": _selection(out / "ssa", msa_final["run"])} if msa_final else None,
        "full supervision": {"data.supervision": "full"},
    }
    specs = []
    for label, over in variants.items():
        if over is None:
            continue
        for seed in a.seeds:
            specs.append(
                RunSpec(
                    method="clipvg",
                    config=a.config,
                    overrides={**sets, **over},
                    output_dir=str(out / "table" / label.replace(" ", "_").replace(",", "") / f"seed{seed}"),
                    seed=seed,
                    label=label,
                )
            )
    results: list[RunResult] = run_many(specs, jobs=a.jobs, threads=1, progress=False)
    rows = summarize(results, ["acc", "miou"])
    val = summarize(results, ["acc", "miou"], source="best")
    table = runs_table(rows, ["acc", "miou"], header=["variant", "test Acc@0.5", "test mIoU"])
    table += baseline_rows(results[:1])
    summary = {
        "world": str(world),
        "size": a.size,
        "seeds": a.seeds,
        "curriculum_seed": a.curriculum_seed,
        "test": rows,
        "val": val,
        "baselines": {k: results[0].metrics.get(k) for k, _ in BASELINES} if results else {},
        "ssa": {k: cur["ssa"][k] for k in ("search", "final", "all", "trained", "reused")},
        "msa": {k: cur["msa"][k] for k in ("steps", "stop", "final", "all_merged", "measurers", "trained", "reused")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
