"""``groundkit demo``: build the built-in benchmark world and run the methods end to end.

For each method with a demo it generates (or reuses, checksum-verified) the world's data set,
trains the reference configuration, the paper's distillation and groundkit's improved mode through
:mod:`groundkit.runs` (finished runs are reused, so a killed demo restarts where it stopped),
evaluates on the test split, and prints one table per method. Results go to
``<out>/demo_results.{json,md}``, and an HTML report that opens offline (tables, training curves,
pictures of predictions; :mod:`groundkit.report`) to ``<out>/report/index.html``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import feature_cache_root
from .methods import available_methods
from .methods.base import Figure
from .methods.wang21.sweeps import format_table as wang21_table
from .methods.wang21.sweeps import sweep_specs
from .runs import RunResult, default_threads, format_table, run_many, seed_specs, summarize, write_summary
from .world import default_root, generate

__all__ = ["add_demo_args", "run_demo", "DEMOS"]


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="small", choices=["tiny", "small", "medium"], help="world size (default: small)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (mean ± std over them)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the generated world")
    p.add_argument("--methods", default=",".join(DEMOS), help="comma-separated methods to run")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument(
        "--epochs", type=int, default=0, help="override the configs' epoch counts (clipvg: N x 100 steps; 0: keep)"
    )
    p.add_argument("--jobs", type=int, default=2, help="trainings run at a time")
    p.add_argument(
        "--quick",
        action="store_true",
        help="about 3 minutes on 2 CPU cores: a fraction of each run's training (numbers not converged)",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report (<out>/report/index.html)")
    p.set_defaults(func=run_demo)


def _wang21(args: argparse.Namespace, seeds: list[int], out: Path) -> tuple[list[RunResult], str]:
    world = generate("phrase", size=args.size, seed=args.world_seed)
    _WORLDS.append(Path(world))
    variants = ["NCE (reference)", "NCE+Distill (reference)", "+ log-prob teacher, tempered student"]
    results = run_many(
        sweep_specs(world, out / "wang21", seeds, variants, _budget(args, "wang21")),
        jobs=args.jobs,
        threads=_threads(args),
        desc="wang21 runs",
    )
    return results, wang21_table(results).replace("| variant |", "| wang21 (phrase grounding, test) |", 1)


def _crosskd(args: argparse.Namespace, seeds: list[int], out: Path) -> tuple[list[RunResult], str]:
    variants = [
        ("CE+", "synth_ce"),
        ("CE+ + caption KD (reference)", "synth_cecap"),
        ("CE+ + caption KD (detached, tau 0.1)", "synth_cecap_detach"),
    ]
    o: dict[str, Any] = {"world.size": args.size, "world.seed": args.world_seed, **_budget(args, "crosskd")}
    specs = [
        s for label, name in variants for s in seed_specs(label, "crosskd", name, seeds, out / "crosskd", overrides=o)
    ]
    root = Path(generate("retrieval", size=args.size, seed=args.world_seed, progress=True))  # with its progress bar
    _WORLDS.extend([root, root.with_name(root.name + ".store")])
    results = run_many(specs, jobs=args.jobs, threads=_threads(args), desc="crosskd runs")
    keys = ["t2v_R1", "t2v_R5", "t2v_R10", "t2v_MedR"]
    table = format_table(summarize(results, keys), keys, header="crosskd (text-to-video, test)")
    done = [r for r in results if r.ok]
    n_videos = done[0].metrics.get("num_videos") if done else None
    if n_videos:
        table += f"\n| chance | {100 / n_videos:.2f} | {500 / n_videos:.2f} | {1000 / n_videos:.2f} | {(n_videos + 1) / 2:.1f} | |"
    return results, table


def _cogrounding(args: argparse.Namespace, seeds: list[int], out: Path) -> tuple[list[RunResult], str]:
    from .methods.cogrounding.sweeps import table_specs as cogrounding_specs  # noqa: PLC0415 (demo only)

    names = ["single-frame (SL-Att)", "co-grounding (CG-SL-Att)", "co-grounding + motion attention"]
    extra = _budget(args, "cogrounding")
    root = Path(generate("video", size=args.size, seed=args.world_seed, progress=True))
    _WORLDS.append(root)
    extra["world.seed"] = args.world_seed
    extra["data.feature_cache"] = str(feature_cache_root() / "cogrounding")  # shared by later demos, not in --out
    specs = cogrounding_specs("video", out / "cogrounding", seeds, args.size, extra, names)
    results = run_many(specs, jobs=args.jobs, threads=_threads(args), desc="cogrounding runs")
    rows = summarize(results, ["Acc@0.5", "Acc@0.5 (post)"])
    table_rows = []
    for row in rows:
        table_rows.append({**row, "metrics": {"Acc@0.5": row["metrics"]["Acc@0.5"]}})
        if row["label"].startswith("co-grounding"):
            post = {"Acc@0.5": row["metrics"]["Acc@0.5 (post)"]}
            table_rows.append({**row, "label": f"{row['label']} + post-processing", "metrics": post})
    table = format_table(table_rows, ["Acc@0.5"], header="cogrounding (video, test frames)")
    return results, table


def _clipvg(args: argparse.Namespace, seeds: list[int], out: Path) -> tuple[list[RunResult], str]:
    from .methods.clipvg.sweeps import demo_table as clipvg_table  # noqa: PLC0415 (demo only)
    from .methods.clipvg.visualize import curriculum_figures  # noqa: PLC0415 (demo only)

    world = Path(generate("pseudo", size=args.size, seed=args.world_seed, progress=True))
    _WORLDS.append(world)
    # clipvg trains a fixed number of steps whatever its list (world_cpu): --epochs N means N x 100 steps; the
    # demo's curricula train 16 runs, so each gets 800 steps instead of world_cpu's 3,000, on a 224-pixel canvas
    # whose 14 x 14 tokens come from the stride-8/16 stages (encoding 448 pixels costs 5x more; 7 x 7 tokens do not
    # ground the world's small objects), with a fusion of width 128 (full supervision, seed 0: width 64 gave 27.5 % in
    # 400 steps and 36.2 % in 1,200, width 128 38.2 % in 800; docs/clipvg.md, "Learning on a CPU")
    steps = {"train.max_steps": 100 * args.epochs} if args.epochs else _budget(args, "clipvg")
    sets = {
        "train.max_steps": 800,
        "data.imsize": 224,
        "model.effnet_stages": ["s8", "s16"],
        "model.d_model": 128,
        "model.dim_ff": 256,
    } | steps
    results: list[RunResult] = []
    tables = []
    search = {"ssa_evals": 2, "msa_evals": 1} if getattr(args, "quick", False) else {}  # fewer thresholds
    for seed in seeds:  # one curriculum per training seed (its runs are the table's runs)
        res, table, cur = clipvg_table(
            world, out / "clipvg" / f"seed{seed}", seed, sets=sets, jobs=args.jobs, threads=_threads(args), **search
        )
        results += res
        tables.append(table)
        _FIGURES.setdefault("clipvg", []).extend(curriculum_figures(cur, out / "clipvg" / f"seed{seed}" / "figures"))
    if len(seeds) == 1:
        return results, tables[0]
    keys = ["acc", "miou"]
    table = format_table(
        summarize(results, keys), keys, header=["clipvg (referring expressions, test)", "Acc@0.5", "mIoU"]
    )
    return results, table


#: per method, the overrides of ``--quick`` (about a quarter of each run's training)
QUICK: dict[str, dict[str, Any]] = {
    "wang21": {"train.epochs": 1},
    "crosskd": {"train.epochs": 20},
    "cogrounding": {"train.epochs": 1},
    "clipvg": {"train.max_steps": 150},
}


def _budget(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Training-length overrides of a method's demo runs: ``--epochs``, else ``--quick``'s, else none."""
    if args.epochs:
        return {"train.epochs": args.epochs}
    return dict(QUICK[method]) if getattr(args, "quick", False) else {}


def _threads(args: argparse.Namespace) -> int:
    """Fixed torch threads per run (the usable cores divided among ``--jobs``): float results depend on
    the thread count, so the demo's numbers repeat exactly on a machine with as many cores."""
    return default_threads(args.jobs)


#: the built-in world folders the demo used (reported with their size at the end)
_WORLDS: list[Path] = []

#: per method, pictures its demo drew besides the runs' own (absolute paths; e.g. reliability histograms)
_FIGURES: dict[str, list[Figure]] = {}

#: method name -> the demo of its ablation table
DEMOS: dict[str, Callable[[argparse.Namespace, list[int], Path], tuple[list[RunResult], str]]] = {
    "wang21": _wang21,
    "crosskd": _crosskd,
    "cogrounding": _cogrounding,
    "clipvg": _clipvg,
}


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    have = set(available_methods())
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in DEMOS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; demo runs: {', '.join(DEMOS)}")
    results: dict[str, Any] = {"size": args.size, "seeds": seeds, "world_seed": args.world_seed, "methods": {}}
    print(
        f"groundkit demo: built-in benchmark world, size {args.size}, training seeds {seeds}, output {out}", flush=True
    )
    for_report: dict[str, tuple[list[RunResult], str]] = {}
    seconds_of: dict[str, float] = {}
    for m in wanted:
        if m not in have:
            print(f"[{m}] not available in this installation; skipped", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"[{m}] building the world and training ...", flush=True)
        runs, table = DEMOS[m](args, seeds, out)
        seconds = round(time.perf_counter() - t0, 1)
        results["methods"][m] = {"table": table, "seconds": seconds, "runs": [r.__dict__ for r in runs]}
        for_report[m], seconds_of[m] = (runs, table), seconds
        write_summary(out / m / "summary.json", runs, sorted({k for r in runs if r.ok for k in r.metrics}))
        print(f"\n{table}\n({m}: {seconds:.0f} s)\n", flush=True)
    (out / "demo_results.json").write_text(json.dumps(results, indent=1, default=str))
    md = [f"# groundkit demo (world size {args.size}, seeds {seeds})", ""]
    md += [results["methods"][m]["table"] + "\n" for m in results["methods"]]
    (out / "demo_results.md").write_text("\n".join(md))
    print(f"results: {out / 'demo_results.md'}")
    ckpt = sum(_size(p) for p in out.rglob("checkpoints"))
    worlds = sorted(set(_WORLDS))
    print(
        f"disk: {_mb(_size(out))} under {out} ({_mb(ckpt)} of it checkpoints; delete the folder when done), "
        f"{_mb(sum(_size(w) for w in worlds))} of built-in worlds ({', '.join(w.name for w in worlds)}) "
        f"cached under {default_root()} (GROUNDKIT_DATA moves them)"
    )
    if not getattr(args, "no_report", False):
        from .report import build_report  # noqa: PLC0415 (matplotlib and the drawing code load only here)

        try:
            print(f"report: {build_report(out, for_report, args, seconds_of, extra_figures=_FIGURES)}")
        except Exception as e:  # noqa: BLE001 (the results are written; a report failure does not fail the demo)
            print(f"warning: the HTML report was not written: {type(e).__name__}: {e}".splitlines()[0])
    return 0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"
