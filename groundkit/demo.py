"""``groundkit demo``: build the built-in benchmark world and run the methods end to end.

For each available method it generates (or reuses, checksum-verified) the world's data set, trains
the reference configuration, the paper's distillation and groundkit's improved mode, evaluates on
the test split, and prints one table per method. Results go to ``<out>/demo_results.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_demo_args", "run_demo"]


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="small", choices=["tiny", "small", "medium"], help="world size (default: small)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (mean ± std over them)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the generated world")
    p.add_argument("--methods", default="wang21,crosskd", help="comma-separated methods to run")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--epochs", type=int, default=0, help="override the configs' epoch counts (0: keep)")


def _mean_std(vals: list[float]) -> str:
    a = np.asarray(vals, dtype=float)
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def _wang21(args: argparse.Namespace, seeds: list[int], out: Path) -> dict[str, Any]:
    from .data.synth import generate
    from .methods import wang21

    world = generate("phrase", size=args.size, seed=args.world_seed)
    variants = ["NCE (reference)", "NCE+Distill (reference)", "+ log-prob teacher, tempered student"]
    extra = [f"train.epochs={args.epochs}"] if args.epochs else []
    rows = wang21.run_sweep(world, out_dir=out / "wang21", seeds=seeds, variants=variants, overrides=extra, jobs=2, threads=1)
    table = ["| wang21 (phrase grounding, test) | R@1 | R@5 | R@10 |", "|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['variant']} | " + " | ".join(_mean_std([100 * x[f"R@{k}"] for x in r["runs"]]) for k in (1, 5, 10)) + " |")
    first = rows[0]["runs"][0]
    table.append("| random ranking | " + " | ".join(f"{100 * first.get(f'random_R@{k}', float('nan')):.2f}" for k in (1, 5, 10)) + " |")
    table.append(f"| proposal upper bound | {100 * first['upper_bound']:.2f} | | |")
    return {"world": str(world), "rows": rows, "table": "\n".join(table)}


def _crosskd(args: argparse.Namespace, seeds: list[int], out: Path) -> dict[str, Any]:
    from .config import load_config
    from .engine import fit
    from .methods.crosskd import METHOD

    variants = [("CE+", "synth_ce"), ("CE+ + caption KD (reference)", "synth_cecap"), ("CE+ + caption KD (detached, tau 0.1)", "synth_cecap_detach")]
    rows = []
    for label, name in variants:
        runs = []
        for seed in seeds:
            o: dict[str, Any] = {
                "data.synth_size": args.size,
                "data.synth_seed": args.world_seed,
                "train.seed": seed,
                "train.output_dir": str(out / "crosskd" / name / f"seed{seed}"),
                "train.progress": False,
                "train.tensorboard": False,
            }
            if args.epochs:
                o["train.epochs"] = args.epochs
            cfg = load_config(METHOD.config_class, name, o, method="crosskd")
            runs.append(fit(METHOD, cfg)["final"])
        rows.append({"variant": label, "runs": runs})
    keys = ["R1", "R5", "R10", "MedR"]
    table = ["| crosskd (text-to-video, test) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        table.append(f"| {r['variant']} | " + " | ".join(_mean_std([x[f"t2v_{k}"] for x in r["runs"]]) for k in keys) + " |")
    n_videos = rows[0]["runs"][0].get("num_videos")
    if n_videos:
        table.append(f"| chance | {100 / n_videos:.2f} | {500 / n_videos:.2f} | {1000 / n_videos:.2f} | {(n_videos + 1) / 2:.1f} |")
    return {"rows": rows, "table": "\n".join(table)}


RUNNERS = {"wang21": _wang21, "crosskd": _crosskd}


def run_demo(args: argparse.Namespace) -> int:
    from .cli import available_methods

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    have = set(available_methods())
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in RUNNERS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; demo runs: {', '.join(RUNNERS)}")
    results: dict[str, Any] = {"size": args.size, "seeds": seeds, "world_seed": args.world_seed, "methods": {}}
    print(f"groundkit demo: built-in benchmark world, size {args.size}, training seeds {seeds}", flush=True)
    for m in wanted:
        if m not in have:
            print(f"[{m}] not available in this installation; skipped", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"[{m}] building the world and training ...", flush=True)
        res = RUNNERS[m](args, seeds, out)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results["methods"][m] = res
        print(f"\n{res['table']}\n({m}: {res['seconds']:.0f} s)\n", flush=True)
    (out / "demo_results.json").write_text(json.dumps(results, indent=1, default=float))
    md = [f"# groundkit demo (world size {args.size}, seeds {seeds})", ""]
    md += [results["methods"][m]["table"] + "\n" for m in results["methods"]]
    (out / "demo_results.md").write_text("\n".join(md))
    print(f"results: {out / 'demo_results.md'}")
    return 0
