"""``groundkit bench gpu``: every GPU target of the project from one command, each against a baseline measured in
the same run, written as a JSON and a Markdown table.

Each section runs one of the project's benchmarks in a child process (``python -m groundkit bench ...``) with a
time limit of its own, so a section that fails or runs long is reported and the others still run; the whole
command keeps within ``--budget`` seconds (default 480: GPU time comes in minutes). Sections and targets:

=====================  ===========================================================  ======================
section                figure (baseline in the same run)                            target
=====================  ===========================================================  ======================
metrics                t2v + v2t retrieval metrics at the MSR-VTT full-test shape    < 10 ms
                       (2,990 videos x 20 captions; the official numpy ops on CPU)
wang21                 seconds per Flickr30K epoch, extrapolated from timed steps    <= 15 s
                       (the official per-phrase loop)
crosskd                CENet training samples/s vs the official-like step; the       >= 3x
                       full MSR-VTT test evaluation
cogrounding            test frames/s with feature reuse, bf16, 256 px (window by     >= 300 frames/s
                       window)
clipvg                 training and test images/s, ViT-B/16 with random weights      >= 1,500 / >= 3,000
                       (the official-like fp32 path)
clipvg_compile         the same with ``torch.compile``                               (reported)
=====================  ===========================================================  ======================

Switches measured where they help: bf16 (cogrounding, clipvg), SDPA and the fused AdamW (clipvg's groundkit
path), ``torch.compile`` (clipvg_compile); peak memory where the benchmark reports it. Nothing is installed
or downloaded. Without CUDA the command says so and stops; ``--dry-run`` runs every section at tiny sizes on
the CPU (what the test suite does), to check the whole path before GPU time is spent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SECTIONS", "Section", "run_sections", "register"]


@dataclass
class Section:
    """One benchmark: its command-line arguments on the GPU and at tiny CPU sizes, how to read its JSON and the
    target its headline figure must meet."""

    name: str
    gpu_args: list[str]
    cpu_args: list[str]
    read: Callable[[dict[str, Any]], dict[str, Any]]  # the benchmark's JSON -> the figures reported
    target: str  # in words, for the table
    met: Callable[[dict[str, Any]], bool | None] = lambda f: None
    timeout_s: int = 120
    json_to_stdout: bool = False  # the benchmark prints its JSON instead of writing a file
    gpu_only: bool = False


def _metrics(r: dict[str, Any]) -> dict[str, Any]:
    rows = {row["name"]: row for row in r["rows"]}
    ours = next(v for k, v in rows.items() if k.startswith("t2v_metrics + v2t_metrics"))
    base = rows.get("baseline (official ops)")
    out = {"t2v+v2t ms": round(1000 * min(ours["times"]), 2), "peak GB": round(ours["peak_gb"], 3)}
    if base:
        out["baseline ms"] = round(1000 * min(base["times"]), 1)
        out["speed-up"] = round(min(base["times"]) / min(ours["times"]), 1)
    out["agree"] = r.get("agree")
    return out


def _wang21(r: dict[str, Any]) -> dict[str, Any]:
    vec, loop = r["vectorised"], r["per-phrase loop (official)"]
    return {
        "epoch s": vec["epoch_seconds_extrapolated"],
        "pairs/s": vec["pairs_per_s"],
        "loop epoch s": loop["epoch_seconds_extrapolated"],
        "speed-up": r["speedup"],
        "peak GB": vec["peak_gb"],
    }


def _crosskd(r: dict[str, Any]) -> dict[str, Any]:
    t = r["train"]
    out = {
        "train samples/s": round(t["fast"]["median_samples_per_s"], 1),
        "official-like samples/s": round(t["official"]["median_samples_per_s"], 1),
        "train speed-up": round(t["fast"]["median_samples_per_s"] / t["official"]["median_samples_per_s"], 2),
        "train peak GB": round(t["peak_gb_all"], 3),
    }
    full = r.get("groundkit_full")
    if full:
        out["full test eval s"] = round(full["seconds"], 3)
        out["full test peak GB"] = round(full["peak_gb"], 3)
    return out


def _cogrounding(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "frames/s (reuse)": r["feature_reuse"]["frames_per_s"],
        "frames/s (window by window)": r["window_by_window"]["frames_per_s"],
        "speed-up": r["ratio"],
        "same boxes": r["same_boxes"],
    }


def _clipvg(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "train img/s": round(r["groundkit_train_img_s"], 1),
        "test img/s": round(r["groundkit_test_fps"], 1),
        "official-like train img/s": round(r["official_train_img_s"], 1),
        "official-like test img/s": round(r["official_test_fps"], 1),
        "train speed-up": round(r["train_ratio"], 2),
        "test speed-up": round(r["test_ratio"], 2),
        "bf16": r["bf16"],
        "compile": r["compile"],
    }


_CLIPVG_GPU = [
    "clipvg",
    "--device",
    "cuda",
    "--encoder",
    "clip",
    "--batch-size",
    "64",
    "--steps",
    "20",
    "--warmup",
    "3",
]
_CLIPVG_CPU = ["clipvg", "--device", "cpu", "--encoder", "effnet_minilm", "--batch-size", "2", "--steps", "1"]
_CLIPVG_CPU += ["--warmup", "0", "--imsize", "64", "--grid", "2", "--d-model", "32", "--layers", "1"]
_CLIPVG_CPU += ["--max-query-len", "8"]

SECTIONS: list[Section] = [
    Section(
        "metrics",
        ["metrics", "--device", "cuda", "--repeats", "5", "--threads", "1"],
        ["metrics", "--videos", "60", "--captions", "2", "--device", "cpu", "--repeats", "1", "--threads", "1"],
        _metrics,
        "t2v + v2t < 10 ms",
        lambda f: f["t2v+v2t ms"] < 10,
        timeout_s=90,
    ),
    Section(
        "wang21",
        ["wang21", "--device", "cuda", "--steps", "200", "--loop-steps", "10", "--data-steps", "50"],
        ["wang21", "--device", "cpu", "--steps", "2", "--loop-steps", "1", "--data-steps", "1", "--pool-images", "40"],
        _wang21,
        "epoch <= 15 s",
        lambda f: f["epoch s"] <= 15,
        timeout_s=100,
    ),
    Section(
        "crosskd",
        ["crosskd", "--device", "cuda", "--train-steps", "15", "--baseline-videos", "300"],
        ["crosskd", "--device", "cpu", "--videos", "40", "--captions", "2", "--baseline-videos", "20"]
        + ["--text-dim", "64", "--train-steps", "2", "--train-warmup", "1", "--batch-size", "8"]
        + ["--train-text-clusters", "4", "--train-shared-dim", "64", "--threads", "1"],
        _crosskd,
        "train >= 3x official-like",
        lambda f: f["train speed-up"] >= 3,
        timeout_s=150,
    ),
    Section(
        "cogrounding",
        ["cogrounding", "--device", "cuda", "--bf16", "--size", "256", "--frames", "64", "--videos", "4"]
        + ["--batch", "64", "--repeats", "3", "--json"],
        ["cogrounding", "--device", "cpu", "--size", "64", "--frames", "6", "--dim", "32", "--batch", "6"]
        + ["--repeats", "1", "--threads", "1", "--json"],
        _cogrounding,
        ">= 300 frames/s (feature reuse, bf16, 256 px)",
        lambda f: f["frames/s (reuse)"] >= 300,
        timeout_s=90,
        json_to_stdout=True,
    ),
    Section(
        "clipvg",
        _CLIPVG_GPU,
        _CLIPVG_CPU,
        _clipvg,
        "train >= 1,500 img/s, test >= 3,000 img/s",
        lambda f: f["train img/s"] >= 1500 and f["test img/s"] >= 3000,
        timeout_s=120,
    ),
    Section(
        "clipvg_compile",
        _CLIPVG_GPU + ["--compile"],
        [],
        _clipvg,
        "(torch.compile: reported)",
        timeout_s=150,
        gpu_only=True,
    ),
]


def _run_one(s: Section, dry_run: bool, timeout: float, work: Path) -> dict[str, Any]:
    args = list(s.cpu_args if dry_run else s.gpu_args)
    out_json = work / f"{s.name}.json"
    if not s.json_to_stdout:
        args += ["--json", str(out_json)]
    cmd = [sys.executable, "-m", "groundkit", "bench", *args]
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"section": s.name, "command": "groundkit bench " + " ".join(args), "target": s.target}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return rec | {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1)}
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [""])[-1][:300]
        return rec | {"status": "failed", "error": f"exit {p.returncode}: {tail}"}
    try:
        if s.json_to_stdout:
            raw = json.loads(next(line for line in reversed(p.stdout.splitlines()) if line.startswith("{")))
        else:
            raw = json.loads(out_json.read_text())
        figures = s.read(raw)
    except Exception as e:  # a benchmark whose output changed shape
        return rec | {"status": "failed", "error": f"cannot read its figures ({type(e).__name__}: {e})"}
    met = s.met(figures)
    return rec | {"status": "ok", "figures": figures, "met": met}


def run_sections(
    sections: list[Section], dry_run: bool, budget_s: float, work: Path, echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run ``sections`` in order within ``budget_s`` seconds; one record per section (skipped when the budget
    left is under its time limit)."""
    t0, out = time.perf_counter(), []
    for s in sections:
        if dry_run and s.gpu_only:
            out.append({"section": s.name, "status": "skipped", "why": "GPU only", "target": s.target})
            continue
        left = budget_s - (time.perf_counter() - t0)
        if left < min(s.timeout_s, 30):
            out.append({"section": s.name, "status": "skipped", "why": f"{left:.0f} s of the budget left"})
            continue
        echo(f"[bench gpu] {s.name} (at most {min(s.timeout_s, left):.0f} s) ...")
        rec = _run_one(s, dry_run, min(s.timeout_s, left), work)
        echo(
            f"[bench gpu] {s.name}: {rec['status']} in {rec.get('seconds', 0)} s {rec.get('figures', rec.get('error', ''))}"
        )
        out.append(rec)
    return out


def _environment(dry_run: bool) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    env: dict[str, Any] = {"torch": torch.__version__, "dry_run": dry_run}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    else:
        env.update(gpu=None, cpu_threads=torch.get_num_threads())
    return env


def markdown(env: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """The table of a run: one row per section with its figures, target and whether it was met."""
    where = env.get("gpu") or "CPU (dry run, tiny sizes: not the targets' sizes)"
    lines = [
        f"GPU benchmark on {where}, torch {env['torch']}" + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
        "",
        "| section | status | figures | target | met |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        figs = ", ".join(f"{k} {v}" for k, v in r.get("figures", {}).items()) or r.get("error") or r.get("why", "")
        met = {True: "yes", False: "**no**", None: ""}[r.get("met")] if r.get("status") == "ok" else ""
        lines.append(f"| {r['section']} | {r['status']} | {figs} | {r.get('target', '')} | {met} |")
    return "\n".join(lines) + "\n"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gpu",
        help="every GPU target from one command (JSON + Markdown), each against a baseline in the same run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="bench_gpu", help="folder for gpu_bench.json and gpu_bench.md")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together (default 480)")
    p.add_argument("--sections", nargs="*", default=None, help=f"a subset of {[s.name for s in SECTIONS]}")
    p.add_argument("--dry-run", action="store_true", help="every section at tiny sizes on the CPU (no CUDA needed)")

    def run(a: argparse.Namespace) -> int:
        import torch  # noqa: PLC0415

        if not a.dry_run and not torch.cuda.is_available():
            print(
                "groundkit bench gpu: no CUDA device here; run it on a GPU machine, or pass --dry-run for the tiny "
                "CPU path",
                file=sys.stderr,
            )
            return 2
        names = [s.name for s in SECTIONS]
        bad = [n for n in a.sections or [] if n not in names]
        if bad:
            print(f"groundkit bench gpu: unknown sections {bad}; sections: {', '.join(names)}", file=sys.stderr)
            return 2
        chosen = [s for s in SECTIONS if a.sections is None or s.name in a.sections]
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        env = _environment(a.dry_run)
        with tempfile.TemporaryDirectory(prefix="groundkit-bench-gpu-") as tmp:
            echo = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
            records = run_sections(chosen, a.dry_run, a.budget, Path(tmp), echo)
        (out / "gpu_bench.json").write_text(json.dumps({"environment": env, "sections": records}, indent=1))
        table = markdown(env, records)
        (out / "gpu_bench.md").write_text(table)
        print(table)
        print(f"written: {out / 'gpu_bench.json'}, {out / 'gpu_bench.md'}")
        return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1

    p.set_defaults(func=run)
