"""wang21 on the built-in phrase world: the seed sweeps of docs/wang21.md and the error breakdown by cause.

    python experiments/wang21_tables.py sweep WORLD OUT [--seeds 0 1 2] [--jobs 4] [--variants NAME ...] \\
        [--set KEY=VALUE ...]
    python experiments/wang21_tables.py breakdown RUN WORLD [--split test] [--k 8]

``sweep`` trains and tests each variant of :data:`groundkit.methods.wang21.sweeps.SWEEP_VARIANTS` (default: all)
over the seeds through :func:`groundkit.runs.run_many` (finished runs are reused, so a killed sweep is simply
started again), writes ``OUT/sweep.json`` and ``OUT/table.md`` and prints the table (R@k in percent, mean ± std).
``WORLD`` is the folder of ``groundkit data synth --task phrase``.

``breakdown`` says where the top-1 proposal of each phrase goes, for a trained run (or checkpoint) on a split of
the world it was trained on (reads the world's scene records; never imports the world generator) and prints the
result as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from groundkit.boxes import box_iou
from groundkit.config import ConfigError, parse_override
from groundkit.methods import load_run
from groundkit.methods.wang21.data import Wang21Dataset, resolve_paths
from groundkit.methods.wang21.model import distill_neighbourhood
from groundkit.methods.wang21.sweeps import SWEEP_KEYS, SWEEP_VARIANTS, format_table, sweep_specs
from groundkit.runs import run_many, write_summary

__all__ = ["ERROR_CAUSES", "error_breakdown", "model_scores", "breakdown_of_checkpoint", "main"]

ERROR_CAUSES = (
    "hit",
    "part_of_target",
    "loose_box_of_target",
    "co_occurring_partner",
    "other_object",
    "group_box",
    "clutter",
)


@torch.no_grad()
def error_breakdown(
    score_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    dataset: Wang21Dataset,
    world_dir: str | Path,
    k: int = 8,
    iou_threshold: float = 0.5,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Where the top-1 proposal of each phrase goes, on a split of the built-in phrase world.

    ``score_fn(batch) -> [B, P, N]`` region-phrase scores (e.g. a model's cosines). Uses the world's
    ``meta/scenes.jsonl`` (which object each proposal was drawn from, and how). Causes: ``hit``
    (IoU >= threshold with the GT), a miss on the target object (``part_of_target``: a part box;
    ``loose_box_of_target``: a jittered whole box below the threshold), the target's co-occurring
    partner, another object, a group box, clutter. Per cause, ``fixable_in_neighbourhood`` counts
    misses whose K regions around the top-1 (the reference distillation candidates) hold a hit.
    """
    scenes: dict[str, dict] = {}
    with open(Path(world_dir) / "meta" / "scenes.jsonl") as f:
        for line in f:
            r = json.loads(line)
            scenes[r["id"]] = r
    counts = {c: 0 for c in ERROR_CAUSES}
    fixable = {c: 0 for c in ERROR_CAUSES if c != "hit"}
    n = len(dataset)
    for start in range(0, n, batch_size):
        b = dataset.get_batch(torch.arange(start, min(n, start + batch_size)))
        sim = score_fn(b).float().masked_fill(~b["region_valid"][:, None, :], float("-inf"))
        nb = distill_neighbourhood(sim, b["region_boxes"], b["region_valid"], k)
        for i in range(sim.shape[0]):
            image_id = dataset.image_ids[int(b["image_index"][i])]
            if image_id not in scenes:
                raise KeyError(
                    f"{world_dir}/meta/scenes.jsonl: no scene for image {image_id!r} (not a built-in world of this split?)"
                )
            sc = scenes[image_id]
            objs = sc["scene"]["objects"]
            obj_boxes = torch.tensor([o["box"] for o in objs], dtype=torch.float32).reshape(-1, 4)
            gt = b["gt_boxes"][i].float()  # [P, 4]
            hits = (box_iou(gt, b["region_boxes"][i].float()) >= iou_threshold) & b["region_valid"][i]  # [P, N]
            on_obj = box_iou(gt, obj_boxes) > 0.7 if len(objs) else torch.zeros(len(gt), 0, dtype=torch.bool)  # [P, O]
            for p in torch.nonzero(b["eval_valid"][i]).flatten().tolist():
                hit = hits[p]
                top = int(sim[i, p].argmax())
                if bool(hit[top]):
                    counts["hit"] += 1
                    continue
                targets = set(on_obj[p].nonzero().flatten().tolist())
                src, kind = sc["proposal_source"][top], sc["proposal_kind"][top]
                if src == -1:
                    cause = "clutter"
                elif src == -2:
                    cause = "group_box"
                elif src in targets:
                    cause = "part_of_target" if kind == 1 else "loose_box_of_target"
                elif objs[src].get("partner_of") in targets or any(objs[t].get("partner_of") == src for t in targets):
                    cause = "co_occurring_partner"
                else:
                    cause = "other_object"
                counts[cause] += 1
                if bool(hit[nb[i, p]].any()):
                    fixable[cause] += 1
    total = sum(counts.values())
    return {
        "num_phrases": total,
        "counts": counts,
        "fractions": {c: v / max(total, 1) for c, v in counts.items()},
        "fixable_in_neighbourhood": fixable,
        "k": k,
    }


def model_scores(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``score_fn`` for :func:`error_breakdown`: a wang21 model's region-phrase cosines [B, P, N]."""
    return lambda b: model.phrase_region_scores(b["region_feats"], b["words"], b["token_mask"])


def breakdown_of_checkpoint(
    checkpoint: str | Path, world_dir: str | Path, split: str = "test", k: int = 8
) -> dict[str, Any]:
    """:func:`error_breakdown` of a trained checkpoint on a split of the built-in world it was trained
    on (the region / phrase files named in its config)."""
    _, cfg, model = load_run(checkpoint)
    paths = resolve_paths(cfg.data, split)
    if paths is None:
        raise ConfigError(f"{checkpoint}: its config names no {split} files")
    return error_breakdown(model_scores(model), Wang21Dataset(cfg, split, *paths), world_dir, k=k)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/wang21_tables.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="train + test the variants over seeds; write OUT/sweep.json and OUT/table.md")
    s.add_argument("world", help="a built-in phrase world (groundkit data synth --task phrase --out WORLD)")
    s.add_argument("out", help="results folder (one run folder per variant and seed)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument(
        "--variants", nargs="+", default=None, metavar="NAME", help=f"default: all of {list(SWEEP_VARIANTS)}"
    )
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of every run")
    s.add_argument("--jobs", type=int, default=1, help="trainings at a time")
    s.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the cores shared)")
    b = sub.add_parser("breakdown", help="error breakdown by cause of a trained run on its built-in world")
    b.add_argument("run", help="run folder or checkpoint")
    b.add_argument("world", help="the built-in phrase world the run was trained on")
    b.add_argument("--split", default="test")
    b.add_argument("--k", type=int, default=8, help="distillation neighbourhood size")
    a = p.parse_args(argv)
    try:
        if a.command == "breakdown":
            print(json.dumps(breakdown_of_checkpoint(a.run, a.world, a.split, a.k), indent=1))
            return 0
        out = Path(a.out)
        overrides = dict(parse_override(x) for x in a.set)
        specs = sweep_specs(a.world, out, a.seeds, a.variants, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_many(specs, jobs=a.jobs, threads=a.threads, desc="wang21 runs")
    write_summary(out / "sweep.json", results, SWEEP_KEYS)
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
