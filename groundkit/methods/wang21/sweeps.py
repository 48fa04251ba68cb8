"""The seed sweeps the demo runs: wang21's variants on the built-in phrase world as :class:`groundkit.runs.RunSpec`
lists, and their table. The documented sweeps and the error breakdown: ``experiments/wang21_tables.py``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...config import ConfigError, parse_override
from ...runs import RunResult, RunSpec, seed_specs, summarize
from ...runs import format_table as runs_table
from .data import world_files

__all__ = ["SWEEP_VARIANTS", "SWEEP_KEYS", "sweep_specs", "format_table"]


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

#: the metrics of a sweep's table (percent)
SWEEP_KEYS = ("R@1", "R@5", "R@10")


def sweep_specs(
    world_dir: str | Path,
    out_dir: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """:class:`~groundkit.runs.RunSpec` of each variant of :data:`SWEEP_VARIANTS` x seed on a built-in phrase
    world (the files of ``groundkit data synth --task phrase``, the soft teacher's matching matrix included)."""
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
