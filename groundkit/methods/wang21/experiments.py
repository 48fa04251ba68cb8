"""wang21 experiments on the built-in world: the seed-sweep variants of docs/wang21.md and the
error breakdown by cause (reads the world's scene records; never imports the world generator)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...boxes import box_iou
from ...config import ConfigError, parse_override
from ...runs import RunResult, RunSpec, run_many, seed_specs, summarize, write_summary
from ...runs import format_table as runs_table
from .. import load_run
from .data import Wang21Dataset, resolve_paths, world_files
from .model import distill_neighbourhood

__all__ = [
    "SWEEP_VARIANTS",
    "sweep_specs",
    "run_sweep",
    "format_table",
    "error_breakdown",
    "model_scores",
    "breakdown_of_checkpoint",
]


# ----------------------------------------------------------------------------- seed sweep


# name -> (shipped config, overrides). Distillation variants get the world's phrase_to_label.json;
# the soft teacher gets the phrase x class matrix built by `groundkit data phrase-to-label`.
SWEEP_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "NCE (reference)": ("world_reference_nce", []),
    "NCE+Distill (reference)": ("world_reference_distill", []),
    "+ both NCE directions": ("world_reference_distill", ["loss.both_directions=true"]),
    "+ mask same image": ("world_reference_distill", ["loss.mask_same_image=true"]),
    "+ learned temperature": ("world_reference_distill", ["loss.learn_scale=true"]),
    "+ soft teacher (matrix)": ("world_reference_distill", ["loss.soft_teacher=true"]),
    "+ log-prob teacher, tempered student": (
        "world_reference_distill",
        ["loss.teacher_form=log_prob", "loss.teacher_temperature=0.5", "loss.student_scale=10.0"],
    ),
    "improved (all flags)": ("world_improved", []),
}


def sweep_specs(
    world_dir: str | Path,
    out_dir: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """:class:`~groundkit.runs.RunSpec` of each variant of :data:`SWEEP_VARIANTS` x seed on a built-in phrase
    world (the files of ``groundkit data synth --task phrase``); builds the soft teacher's matrix when needed."""
    world, out = Path(world_dir), Path(out_dir)
    names = list(variants or SWEEP_VARIANTS)
    unknown = [n for n in names if n not in SWEEP_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown wang21 sweep variants {unknown}; known: {list(SWEEP_VARIANTS)}")
    common = {f"data.{k}": v for k, v in world_files(world).items()}
    specs = []
    for name in names:
        base, extra = SWEEP_VARIANTS[name]
        o = dict(common)
        o.update(parse_override(e) for e in extra)
        o.update(overrides or {})
        specs += seed_specs(name, "wang21", base, seeds, out, overrides=o)
    return specs


def run_sweep(
    world_dir: str | Path,
    out_dir: str | Path = "runs/wang21_sweep",
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    jobs: int = 1,
    desc: str = "wang21 runs",
) -> list[RunResult]:
    """Train + test each variant over ``seeds`` (``jobs`` at a time; finished runs are reused); writes
    ``<out_dir>/sweep.json`` and ``table.md`` and prints the table (R@k in percent, mean ± std)."""
    out = Path(out_dir)
    results = run_many(sweep_specs(world_dir, out, seeds, variants, overrides), jobs=jobs, desc=desc)
    write_summary(out / "sweep.json", results, SWEEP_KEYS)
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    return results


SWEEP_KEYS = ("R@1", "R@5", "R@10")


def format_table(results: Sequence[RunResult]) -> str:
    """Markdown table of R@1/5/10 (percent, mean ± std over seeds) plus the baselines the runs report."""
    table = runs_table(summarize(results, SWEEP_KEYS), SWEEP_KEYS, header="variant", show_n=True)
    done = [r for r in results if r.ok]
    if not done:
        return table
    x = done[0].metrics
    cells = " | ".join(f"{x.get(f'random_R@{k}', float('nan')):.2f}" for k in (1, 5, 10))
    lines = [table, f"| random ranking (expected) | {cells} | |"]
    if "teacher_R@1" in x:
        cov = x.get("teacher_coverage", float("nan"))
        lines.append(f"| detector teacher alone (mapped phrases, {cov:.0f}%) | {x['teacher_R@1']:.2f} | | | |")
    lines.append(f"| proposal upper bound | {x['upper_bound']:.2f} | | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- diagnosis on the built-in world

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
