"""``groundkit bench concurrency``: how much slower two (or more) trainings run side by side than alone.

Each training is a separate ``groundkit train`` process (as a user would start them) on the built-in
world, with a fixed number of steps and no evaluation. Throughput is read from the runs' own
``log.jsonl`` (a record per step): steps per second after ``--warmup`` steps, and for the side-by-side
runs only over the time when all of them were training. The script prints, per scenario, each run's
steps/s and its slowdown against the same training alone, measured in the same invocation:

- ``alone``: one training, ``train.threads`` as given (default 0: the engine's core share);
- ``side by side``: ``--jobs`` trainings started together, same settings;
- with ``--compare-all-cores``: side by side again with every training using all usable cores
  (``train.threads`` = the core count: what groundkit did before the core share).

Results go to ``<out>/concurrency.json``. This is a benchmark script, not a test: figures depend on the
machine and on whatever else runs on it (the load average is printed before and after).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..distributed import usable_cores

__all__ = ["register", "run_benchmark", "steps_per_second"]


def _groundkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "groundkit", *args]


@functools.cache
def _world(task: str, size: str) -> str:
    """The built-in world's folder (built once, then reused from the cache)."""
    out = subprocess.run(
        _groundkit("data", "synth", "--task", task, "--size", size, "--quiet"), capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"groundkit bench concurrency: building the {task} world failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0].strip()


def train_command(method: str, size: str, steps: int, threads: int, out: Path) -> list[str]:
    """The ``groundkit train`` command of one benchmark training (no evaluation, one log record per step)."""
    common = [
        "--output-dir",
        str(out),
        "--overwrite",
        "--final-split",
        "",
        "--set",
        f"train.max_steps={steps}",
        "train.progress=false",
        "train.tensorboard=false",
        "train.val_split=",
        "train.eval_every=0",
        "train.log_every=1",
        "train.ckpt_every_steps=0",
        f"train.threads={threads}",
    ]
    if method == "wang21":
        w = _world("phrase", size)
        files = [
            "--region-feat-path",
            f"{w}/region_features_{{split}}.hdf5",
            "--phrase-feat-path",
            f"{w}/phrase_features_{{split}}.hdf5",
            "--glove-path",
            f"{w}/glove.hdf5",
        ]
        return _groundkit("train", "wang21", "world_reference_nce", *files, *common)
    if method == "crosskd":
        _world("retrieval", size)
        return _groundkit("train", "crosskd", "synth_cecap", *common, f"world.size={size}")
    raise SystemExit(f"groundkit bench concurrency: --method must be wang21 or crosskd, not {method!r}")


def _train_records(run: Path) -> list[tuple[float, int]]:
    out = []
    with open(run / "log.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                out.append((float(r["time"]), int(r["step"])))
    return out


def steps_per_second(records: list[tuple[float, int]], start: float, end: float) -> float | None:
    """Optimisation steps per second between the first and last step logged inside ``[start, end]``."""
    inside = [(t, s) for t, s in records if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def _run_together(cmds: list[list[str]], runs: list[Path], warmup: int) -> list[float | None]:
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    errors = [p.communicate()[1] for p in procs]
    for p, err, run in zip(procs, errors, runs):
        if p.returncode != 0:
            raise SystemExit(f"groundkit bench concurrency: training {run} failed: {err.strip()[-500:]}")
    recs = [_train_records(r) for r in runs]
    start = max(r[min(warmup, len(r) - 1)][0] for r in recs)  # all past their warm-up
    end = min(r[-1][0] for r in recs)  # none finished yet
    return [steps_per_second(r, start, end) for r in recs]


def run_benchmark(
    method: str = "wang21",
    size: str = "small",
    steps: int = 150,
    jobs: int = 2,
    threads: int = 0,
    warmup: int = 10,
    compare_all_cores: bool = False,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Train alone, then ``jobs`` side by side (and optionally side by side on all cores); returns and
    writes ``{"machine", "alone", "scenarios": [{"name", "steps_per_s", "slowdown"}]}``."""
    root = Path(out or tempfile.mkdtemp(prefix="groundkit-concurrency-"))
    root.mkdir(parents=True, exist_ok=True)
    machine = {"usable_cores": usable_cores(), "cpu_count": os.cpu_count(), "load_before": os.getloadavg()}
    alone_dir = root / "alone"
    (alone,) = _run_together([train_command(method, size, steps, threads, alone_dir)], [alone_dir], warmup)
    if not alone:
        raise SystemExit("groundkit bench concurrency: too few steps to measure; raise --steps")
    scenarios = [("side by side", threads)]
    if compare_all_cores:
        scenarios.append(("side by side, every run on all cores", usable_cores()))
    results = []
    for name, t in scenarios:
        dirs = [
            root / f"{name.split(',')[0].replace(' ', '-')}{'-all' if t != threads else ''}-{i}" for i in range(jobs)
        ]
        cmds = [train_command(method, size, steps, t, d) for d in dirs]
        rates = _run_together(cmds, dirs, warmup)
        results.append(
            {
                "name": name,
                "threads": t,
                "steps_per_s": rates,
                "slowdown": [None if r is None else alone / r for r in rates],
            }
        )
    machine["load_after"] = os.getloadavg()
    report = {
        "method": method,
        "size": size,
        "steps": steps,
        "jobs": jobs,
        "threads": threads,
        "machine": machine,
        "alone_steps_per_s": alone,
        "scenarios": results,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (root / "concurrency.json").write_text(json.dumps(report, indent=1))
    report["out"] = str(root)
    return report


def format_report(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        f"{rep['method']} ({rep['size']} world), {rep['steps']} steps per training, "
        f"{m['usable_cores']} usable cores, load average {m['load_before'][0]:.1f} before / "
        f"{m['load_after'][0]:.1f} after",
        "",
        "| scenario | train.threads | steps/s per run | slowdown vs alone |",
        "|---|---|---|---|",
        f"| alone | {rep['threads']} | {rep['alone_steps_per_s']:.2f} | 1.00x |",
    ]
    for s in rep["scenarios"]:
        rates = ", ".join("n/a" if r is None else f"{r:.2f}" for r in s["steps_per_s"])
        slow = ", ".join("n/a" if r is None else f"{r:.2f}x" for r in s["slowdown"])
        lines.append(f"| {s['name']} ({len(s['steps_per_s'])} runs) | {s['threads']} | {rates} | {slow} |")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "concurrency", help="slowdown of trainings run side by side against the same training alone"
    )
    p.add_argument("--method", default="wang21", choices=["wang21", "crosskd"])
    p.add_argument("--size", default="small", help="built-in world size (default: small)")
    p.add_argument("--steps", type=int, default=150, help="optimisation steps per training")
    p.add_argument("--jobs", type=int, default=2, help="trainings side by side")
    p.add_argument("--threads", type=int, default=0, help="train.threads of each training (0: the core share)")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the throughput")
    p.add_argument("--compare-all-cores", action="store_true", help="also run side by side with every run on all cores")
    p.add_argument("--out", default=None, help="folder for the runs and concurrency.json (default: a temp dir)")

    def run(a: argparse.Namespace) -> int:
        rep = run_benchmark(a.method, a.size, a.steps, a.jobs, a.threads, a.warmup, a.compare_all_cores, a.out)
        print(format_report(rep))
        print(f"\nresults: {rep['out']}/concurrency.json")
        return 0

    p.set_defaults(func=run)
