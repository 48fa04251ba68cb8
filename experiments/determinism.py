"""The measurements behind docs/benchmark_world.md ("Determinism"), docs/architecture.md ("Same run, same result")
and the tolerances of tests/test_regression_results.py. Other CPUs are imitated on this one by limiting the
instruction sets of torch's kernels (environment variables read when torch starts, so each variant is a child
process).

    python experiments/determinism.py world       # phrase small world: 1 vs 2 threads, other kernel sets
    python experiments/determinism.py regression  # regression runs under other kernel sets (and +1 % changes)
    python experiments/determinism.py process     # the same CLIP-VG run as a process's first and second training
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> environment of the child process
    "base": {},
    "mkl_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "aten_onednn_avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
}


def _child(code: str, env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip().splitlines()[-1]


_BUILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from groundkit.world import generate
print(generate("phrase", size="small", seed=0, out=sys.argv[2], progress=False))
"""


def world() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="determinism-world-"))
    built = {}
    for name, env, threads in [("1 thread", {}, 1), ("2 threads", {}, 2)] + [
        (k, v, 1) for k, v in VARIANTS.items() if k != "base"
    ]:
        built[name] = Path(_child(_BUILD, env, str(threads), str(tmp / name.replace(" ", "_"))))
    ref = built["1 thread"]
    for name, folder in built.items():
        for split in ("train", "val", "test"):
            a, b = (h5py.File(f / f"region_features_{split}.hdf5", "r") for f in (ref, folder))
            diff = total = other_cols = 0
            for key in a:
                x, y = a[key][()], b[key][()]
                diff += int((x[:, :1280] != y[:, :1280]).sum())
                total += x[:, :1280].size
                other_cols += int(not np.array_equal(x[:, 1280:], y[:, 1280:]))
            print(
                f"{name:>18} {split:>5}: {diff:,} of {total:,} feature values differ; rows with other columns: {other_cols}"
            )


_RECORD = """
import json, sys, tempfile
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from test_regression_results import RUNS, run_record
from groundkit.distributed import float_fingerprint
extra = json.loads(sys.argv[2])
out = {"fingerprint": float_fingerprint()}
out.update({n: run_record(n, Path(tempfile.mkdtemp()), extra.get(n, {})) for n in RUNS if not extra or n in extra})
print(json.dumps(out))
"""


def regression() -> None:
    tests = str(ROOT / "tests")
    base = json.loads(_child(_RECORD, {}, tests, "{}"))
    changes = {
        "NCE temperature +1 %": {"wang21_reference_distill": {"loss.phrase_scale": 2.02}},
        "crosskd margin +1 %": {"crosskd_caption_kd": {"loss.margin": 0.09381161988446174 * 1.01}},
    }
    rows = [(k, env, {}) for k, env in VARIANTS.items() if k != "base"] + [(k, {}, c) for k, c in changes.items()]
    for label, env, change in rows:
        got = json.loads(_child(_RECORD, {"GROUNDKIT_DATA": tempfile.mkdtemp(), **env}, tests, json.dumps(change)))
        for run in (k for k in got if k != "fingerprint"):
            b, g = base[run], got[run]
            metric = max(abs(g["metrics"][k] - b["metrics"][k]) for k in b["metrics"])
            losses = [abs(x - y) / abs(y) for x, y in zip(g["losses"], b["losses"])]
            print(
                f"{label:>22} {run:>26}: max metric difference {metric:.3f}, early losses (relative) "
                + ", ".join(f"{v:.1e}" for v in losses)
            )


_TWICE = """
import json, sys
from pathlib import Path
from groundkit.world import generate
from groundkit.runs import RunSpec, run_one
out = Path(sys.argv[1])
world = generate("pseudo", size="small", seed=0, progress=False)
for tag in ("first", "second"):
    o = {"data.split_root": str(world / "splits"), "data.image_root": str(world / "images/mscoco/images/train2014"),
         "model.feat_norm": True, "model.token_centre": True, "train.max_steps": 150,
         "data.train_file": str(world / "splits/unc/train_separate/1_unc_train_pseudo_template.pth"),
         "data.cache_dir": str(out / f"cache_{tag}")}
    r = run_one(RunSpec("clipvg", "world_cpu", o, str(out / f"run_{tag}"), 0, tag), threads=1)
    print(tag, json.dumps(r.metrics), flush=True)
"""


def process() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _TWICE, tempfile.mkdtemp(prefix="determinism-process-")],
        capture_output=True,
        text=True,
        check=True,
    )
    print("\n".join(line for line in out.stdout.splitlines() if line.startswith(("first", "second"))))


if __name__ == "__main__":
    {"world": world, "regression": regression, "process": process}[sys.argv[1] if len(sys.argv) > 1 else "world"]()
