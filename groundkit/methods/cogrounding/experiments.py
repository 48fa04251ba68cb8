"""The seed tables of docs/cogrounding.md: train and test each variant on a built-in world folder, 3 seeds.

``python -m groundkit.methods.cogrounding.results image WORLD OUT [--seeds 0 1 2] [--set k=v ...]`` (refexp
world) or ``video WORLD OUT`` (video world). Each run writes ``OUT/<variant>/seed<k>/`` (a normal run
directory) and one line to ``OUT/results.jsonl``; ``summarize OUT`` prints mean ± std per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ...config import load_config
from ...engine import fit
from .. import get_method

__all__ = ["IMAGE_VARIANTS", "VIDEO_VARIANTS", "run_variants", "summarize"]

CONFIG_DIR = Path(__file__).parent / "configs"

#: variant -> (shipped config, overrides)
IMAGE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "SL-Att (image model)": ("world_image", {}),
}
VIDEO_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "single-frame (SL-Att)": ("world_video", {"model.co_attention": False, "loss.train_clip_len": 1}),
    "co-grounding (CG-SL-Att)": ("world_video", {}),
    "co-grounding + temporal loss": ("world_video", {"loss.temporal_weight": 5.0}),
}


def _world_overrides(kind: str, world: Path) -> dict[str, Any]:
    if kind == "image":
        return {"data.data_root": str(world)}
    return {"data.index_root": str(world / "VID"), "data.image_root": str(world)}


def run_variants(
    kind: str,
    world: str | Path,
    out: str | Path,
    seeds: list[int],
    extra: dict[str, Any] | None = None,
    names: list[str] | None = None,
) -> list[dict[str, Any]]:
    method = get_method("cogrounding")
    variants = IMAGE_VARIANTS if kind == "image" else VIDEO_VARIANTS
    world, out = Path(world), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names or list(variants):
        cfg_name, ov = variants[name]
        for seed in seeds:
            run_dir = out / name.split(" (")[0].replace(" ", "_").replace("+", "plus") / f"seed{seed}"
            o = {
                **_world_overrides(kind, world),
                **ov,
                **(extra or {}),
                "train.seed": seed,
                "train.output_dir": str(run_dir),
            }
            cfg = load_config(method.config_class, CONFIG_DIR / f"{cfg_name}.yaml", o)
            t0 = time.time()
            res = fit(method, cfg, final_split="test")
            row = {
                "variant": name,
                "seed": seed,
                "seconds": round(time.time() - t0, 1),
                "steps": res["steps"],
                "val": res.get("best", {}),
                "test": res.get("final", {}),
                "overrides": o,
            }
            rows.append(row)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def summarize(out: str | Path, split: str = "test") -> str:
    rows = [json.loads(ln) for ln in open(Path(out) / "results.jsonl") if ln.strip()]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r[split] if k not in keys and k != "samples"]
    lines = ["| variant | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name, rs in by.items():
        cells = []
        for k in keys:
            v = [r[split][k] for r in rs if k in r[split]]
            if not v:
                cells.append("")
                continue
            m = sum(v) / len(v)
            sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
            cells.append(f"{m:.2f} ± {sd:.2f}")
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m groundkit.methods.cogrounding.results")
    p.add_argument("kind", choices=["image", "video", "summarize"])
    p.add_argument("world", help="world folder (image/video) or the results folder (summarize)")
    p.add_argument("out", nargs="?", default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--split", default="test")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.kind == "summarize":
        print(summarize(a.world, a.split))
        return 0
    torch.set_num_threads(a.threads)
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    run_variants(a.kind, a.world, a.out, a.seeds, extra, a.variants)
    print(summarize(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
