"""The seed tables of docs/cogrounding.md, built as :class:`groundkit.runs.RunSpec` lists on the built-in world.

``python experiments/cogrounding_tables.py image OUT [--size medium] [--seeds 0 1 2] [--jobs 2]
[--set k=v ...]`` (refexp world, SL-Att and its baselines) or ``video OUT [--size small]`` (video world: single
frame, co-grounding, + temporal loss, and the residual co-features / motion variants; ``--variants``
picks some). Every run is a normal run folder ``OUT/<variant>/seed<k>/``
trained through :func:`groundkit.runs.run_many`, so a rerun reuses finished runs and resumes killed ones;
the frozen backbone's maps are computed once per split into ``OUT/features`` and shared by every run.

``heldout OUT [--world-seed 1]`` evaluates every finished run of a video table on another draw of its world
(``world.seed``): its train and test videos (2,676 frames for ``small``) were seen by no run, eight times the
test split, so the variants' differences are measured with less noise. Results go to
``OUT/<variant>/seed<k>/heldout-world<seed>/metrics.json`` (reused when present).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from groundkit.config import ConfigError
from groundkit.engine import read_run_record, run_eval
from groundkit.methods import run_config
from groundkit.methods.cogrounding.sweeps import VIDEO_VARIANTS, table_specs
from groundkit.runs import RunResult, format_table, run_many, slug, summarize, write_summary
from groundkit.world import resolve_world

__all__ = ["IMAGE_KEYS", "VIDEO_KEYS", "tables", "run_table", "heldout_table", "main"]

IMAGE_KEYS = (
    "testA/Acc@0.5",
    "testB/Acc@0.5",
    "Acc@0.5",
    "random_object",
    "largest_object",
    "centre_object",
    "upper_bound",
)
VIDEO_KEYS = ("Acc@0.5", "Acc@0.5 (post)")


def tables(kind: str, results: list[RunResult]) -> str:
    """Test-split table (mean ± std over seeds) and, for video, the validation table of the selected epochs."""
    keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    text = format_table(summarize(results, keys), keys)
    best = summarize(results, ("Acc@0.5",), source="best")
    text += "\n\nvalidation (selected epoch):\n\n" + format_table(best, ("Acc@0.5",), header=["variant", "val Acc@0.5"])
    return text


def run_table(
    kind: str,
    out: str | Path,
    seeds: list[int],
    size: str = "",
    extra: dict[str, Any] | None = None,
    names: list[str] | None = None,
    jobs: int = 1,
    threads: int | None = 1,
) -> tuple[list[RunResult], str]:
    """Train (or reuse) every run of one table (``threads`` torch threads per run); writes ``OUT/summary.json``
    and returns the results and the table."""
    results = run_many(table_specs(kind, out, seeds, size, extra, names), jobs=jobs, threads=threads)
    keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    write_summary(Path(out) / "summary.json", results, keys)
    return results, tables(kind, results)


def heldout_table(
    out: str | Path, world_seed: int = 1, names: list[str] | None = None, threads: int | None = 1
) -> tuple[dict[str, dict[int, dict[str, float]]], str]:
    """Evaluate the finished runs under ``out`` (a video table) on the train and test videos of world draw
    ``world_seed``; returns ``{variant: {seed: metrics}}`` and a table (mean ± std over seeds, and each variant
    paired by seed with the single-frame runs)."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    overrides = {"data.root": "", "world.seed": world_seed, "data.test_splits": ["train", "test"]}
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name in names or list(VIDEO_VARIANTS):
        for run in sorted((out / slug(name)).glob("seed*")):
            rec = read_run_record(run)
            if not rec or rec.get("status") != "done":
                continue
            dest = run / f"heldout-world{world_seed}"
            if (dest / "metrics.json").is_file():
                metrics = json.loads((dest / "metrics.json").read_text())["metrics"]
            else:
                if rec.get("identity", {}).get("config", {}).get("world.seed") == world_seed:
                    raise ConfigError(f"{run} was trained on world seed {world_seed}: pick another --world-seed")
                method, cfg, ck = run_config(run, "cogrounding", overrides)
                metrics = run_eval(method, resolve_world(method, cfg), ck, split="test", output_dir=dest)
            results.setdefault(name, {})[int(run.name[4:])] = metrics
    single = results.get("single-frame (SL-Att)", {})
    paired_key = "paired vs single-frame"
    rows, ahead = [], []
    for name, runs in results.items():
        for k in sorted(runs):
            m = dict(runs[k])
            if k in single and name != "single-frame (SL-Att)":
                m[paired_key] = runs[k]["Acc@0.5"] - single[k]["Acc@0.5"]
            rows.append(
                RunResult(label=name, seed=k, output_dir=str(out / slug(name) / f"seed{k}"), status="done", metrics=m)
            )
        diff = [r.metrics[paired_key] for r in rows if r.label == name and paired_key in r.metrics]
        if diff:
            ahead.append(f"- {name}: ({sum(d > 0 for d in diff)} of {len(diff)} ahead)")
    keys = ("Acc@0.5", "Acc@0.5 (post)", paired_key)
    table = format_table(summarize(rows, keys), keys)
    if ahead:
        table += "\n\nseeds ahead of the single-frame run of the same seed:\n" + "\n".join(ahead)
    return results, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/cogrounding_tables.py")
    p.add_argument("kind", choices=["image", "video", "heldout"])
    p.add_argument("out", help="results folder (one run folder per variant and seed)")
    p.add_argument("--size", default="", help="world size (default: the config's world.size)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--world-seed", type=int, default=1, help="heldout: the world draw to evaluate on")
    a = p.parse_args(argv)
    if a.kind == "heldout":
        try:
            _, table = heldout_table(a.out, a.world_seed, a.variants, a.threads)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(table)
        return 0
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    _, table = run_table(a.kind, a.out, a.seeds, a.size, extra, a.variants, a.jobs, a.threads)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
