"""The results table of docs/clipvg.md on the built-in pseudo world.

``python experiments/clipvg_tables.py OUT [--size small] [--seeds 0 1 2] [--jobs 2]``

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

from groundkit.config import parse_override
from groundkit.methods.clipvg.sweeps import BASELINES, baseline_rows, curricula, world_overrides
from groundkit.runs import RunResult, RunSpec, run_many, summarize
from groundkit.runs import format_table as runs_table
from groundkit.world import generate

__all__ = ["main"]


def _selection(cur_out: Path, run: str) -> str:
    return str(cur_out / "selections" / f"{run.removeprefix('run-')}.pth")  # the shared selections folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/clipvg_tables.py", description=__doc__)
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
    cur = curricula(world, out, a.config, sets, a.curriculum_seed, a.jobs, a.metric)
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
