"""The kill test: ``groundkit train`` in a subprocess, SIGKILLed at random points (during steps,
checkpoint writes, evaluations), then ``--resume`` until it finishes, ends with the metrics and the
weights of an uninterrupted run; SIGINT / SIGTERM save a resumable checkpoint and exit 130 / 143."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# the regression test method, registered for this one command line
LAUNCH = (
    f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(ROOT)!r}]; "
    "from groundkit import cli; cli.METHODS['regression'] = 'regression_method'; "
    "sys.exit(cli.main(sys.argv[1:]))"
)
STEPS = 36  # 6 epochs of 6 steps


def _cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        LAUNCH,
        "train",
        "regression",
        "--output-dir",
        str(out),
        "--seed",
        "5",
        "--threads",
        "1",
        "--set",
        "train.epochs=6",
        "train.batch_size=16",
        "train.ckpt_every_steps=1",
        "train.eval_every_steps=5",
        "train.best_metric=mse",
        "train.best_mode=min",
        "train.log_every=1",
        "train.progress=false",
        "train.tensorboard=false",
        "optim.name=adamw",
        "optim.lr=0.02",
        "sched.name=cosine",
        "data.step_sleep=0.03",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _logged_step(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except OSError:
        return -1
    steps = [json.loads(x).get("step", -1) for x in lines if x.endswith("}")]
    return max(steps, default=-1)


def _start_and_signal(
    out: Path, sig: int, at_step: int, extra_delay: float, resume: bool
) -> subprocess.CompletedProcess:
    """Start a training, send ``sig`` once it logged ``at_step`` (plus ``extra_delay`` s), wait for it."""
    cmd = _cmd(out, "--resume") if resume else _cmd(out)
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while p.poll() is None and _logged_step(out) < at_step and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra_delay)
    if p.poll() is None:
        p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def _result(out: Path) -> tuple[dict, dict]:
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return metrics, load_file(str(out / "checkpoints" / "best" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "uninterrupted"
    r = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return _result(out)


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all((a[1][k] == b[1][k]).all() for k in a[1])


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(reference, tmp_path):
    out = tmp_path / "killed"
    rng = random.Random(10)
    for attempt in range(2):
        # aim at a random logged step, then a random few ms into the step / checkpoint write after it
        at = rng.randrange(1 + 15 * attempt, 15 * (attempt + 1))
        r = _start_and_signal(out, signal.SIGKILL, at, rng.uniform(0, 0.04), resume=attempt > 0)
        assert r.returncode == -signal.SIGKILL, r.stderr
    r = subprocess.run(_cmd(out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert _same(_result(out), reference)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x["kind"] == "train"] == list(range(1, STEPS + 1))  # each step once
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]  # no half-written file left


def test_sigint_then_sigterm_save_resumable_checkpoints(reference, tmp_path):
    out = tmp_path / "stopped"
    for sig, code, at, resume in ((signal.SIGINT, 130, 8, False), (signal.SIGTERM, 143, 20, True)):
        r = _start_and_signal(out, sig, at, 0.01, resume=resume)
        assert r.returncode == code, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "training stopped; checkpoint saved at step" in lines[0] and "--resume" in lines[0]
        rec = json.loads((out / "run.json").read_text())
        assert rec["status"] == "interrupted" and rec["steps"] >= at
    r = subprocess.run(_cmd(out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _same(_result(out), reference)


SWEEP = """
import sys
import regression_method as rm
from groundkit.runs import run_many, seed_specs

if __name__ == "__main__":
    base = {"train": {"epochs": 40, "batch_size": 16, "progress": False, "tensorboard": False, "log_every": 1,
                      "best_metric": "mse", "best_mode": "min"}, "data": {"step_sleep": 0.05}}
    run_many(seed_specs("reg", rm.METHOD, base, [0, 1, 2], sys.argv[1]), jobs=2, threads=1, progress=False)
"""


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux")
def test_sweep_workers_stop_when_the_sweep_is_killed(tmp_path):
    """A run_many sweep killed with SIGKILL leaves no worker behind: the trainings save and stop, and the
    workers exit instead of waiting for tasks that will never come."""
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}  # the workers import the test method
    out = tmp_path / "runs"
    p = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if all(_logged_step(out / "reg" / f"seed{k}") >= 3 for k in (0, 1)):
            break
        time.sleep(0.05)
    workers = _children(p.pid)
    assert p.poll() is None and len(workers) >= 2, p.stderr.read() if p.poll() is not None else workers
    p.kill()
    p.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived the killed sweep"
    for k in (0, 1):  # the interrupted trainings saved a checkpoint to resume from
        assert json.loads((out / "reg" / f"seed{k}" / "run.json").read_text())["status"] in ("interrupted", "done")
