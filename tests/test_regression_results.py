"""Fixed-seed results of each method on the built-in small world must not change.

``tests/data/regression_metrics.json`` holds, per run, the test metrics and the training losses of the first
logged steps, recorded together with :func:`groundkit.distributed.float_fingerprint` of the recording
process. The runs use one torch thread and a world built in the one defined way (:func:`groundkit.world.
generate`, one thread), in the suite's own data folder (``tests/conftest.py``).

- Where the fingerprint is the recorded one (same torch build, same CPU kernels), a run is a true bit-exact
  repeat: every value must be equal.
- Elsewhere (another CPU instruction set or torch build) the last bits of every float differ, the world's
  backbone features included, and training amplifies them: the early losses must agree within
  ``LOSS_RTOL`` and each metric within ``METRIC_ATOL`` (measured, see docs/benchmark_world.md: "Across
  machines"). A 1 % change of a loss temperature or margin still moves the early losses well past
  ``LOSS_RTOL`` (checked by ``test_regression_catches_a_small_change``). The measurements:
``python experiments/determinism.py regression``.

Re-record only for a deliberate change of results:
``GROUNDKIT_RECORD_REGRESSION=1 pytest tests/test_regression_results.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from groundkit.config import load_config
from groundkit.distributed import fixed_threads, float_fingerprint
from groundkit.engine import fit
from groundkit.methods import get_method
from groundkit.world import generate, resolve_world

EXPECTED = Path(__file__).parent / "data" / "regression_metrics.json"

RUNS: dict[str, tuple[str, str, dict]] = {
    "wang21_reference_distill": ("wang21", "world_reference_distill", {"train.epochs": 2}),
    "wang21_logprob_teacher": (
        "wang21",
        "world_reference_distill",
        {
            "train.epochs": 2,
            "loss.teacher_form": "log_prob",
            "loss.teacher_temperature": 0.5,
            "loss.student_scale": 10.0,
        },
    ),
    "crosskd_caption_kd": ("crosskd", "synth_cecap_detach", {"train.epochs": 30, "world.size": "small"}),
}

#: how many logged training losses are compared (the first ones, before float noise grows)
N_LOSSES = 3
#: relative tolerance of those losses on another float fingerprint (measured across 4 simulated CPU kernel sets:
#: at most 1.0e-5; a 1 % change of the NCE temperature moves the third loss by 8.3e-4, of the margin by 2.4e-3)
LOSS_RTOL = 1e-4
#: absolute tolerance of each metric (percent points or ranks) on another float fingerprint (measured: at most 1.92)
METRIC_ATOL = 4.0


def _world_overrides(world: Path) -> dict:
    return {
        "data.region_feat_path": f"{world}/region_features_{{split}}.hdf5",
        "data.phrase_feat_path": f"{world}/phrase_features_{{split}}.hdf5",
        "data.glove_path": f"{world}/glove.hdf5",
        "data.class_names": f"{world}/detector_classes.txt",
        "data.phrase_to_label_json": f"{world}/phrase_to_label.json",
    }


def run_record(name: str, out: Path, extra: dict | None = None) -> dict:
    """Train and test regression run ``name`` on one thread: ``{"metrics": {...}, "losses": [...]}``."""
    method_name, base, overrides = RUNS[name]
    method = get_method(method_name)
    o = {"train.seed": 0, "train.progress": False, "train.tensorboard": False, "train.output_dir": str(out / name)}
    o["train.threads"] = 1  # float results depend on the thread count: pinned (the engine would share the cores)
    if method_name == "wang21":
        o.update(_world_overrides(Path(generate("phrase", size="small", seed=0, progress=False))))
    o.update(overrides)
    o.update(extra or {})
    cfg = load_config(method.config_class, base, o, method=method_name)
    with fixed_threads(1):
        final = fit(method, resolve_world(method, cfg))["final"]
    logged = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
    losses = [float(e["loss"]) for e in logged if e.get("kind") == "train"][:N_LOSSES]
    return {"metrics": {k: float(v) for k, v in final.items()}, "losses": losses}


def differences(got: dict, expected: dict, exact: bool) -> list[str]:
    """What differs between two run records: every value when ``exact``, else beyond the tolerances."""
    out = []
    for k, want in expected["metrics"].items():
        have = got["metrics"].get(k)
        if have is None or (have != want if exact else abs(have - want) > METRIC_ATOL):
            out.append(f"{k}: {have} (recorded {want})")
    if len(got["losses"]) != len(expected["losses"]):
        out.append(f"{len(got['losses'])} logged losses (recorded {len(expected['losses'])})")
    for i, (have, want) in enumerate(zip(got["losses"], expected["losses"])):
        if have != want if exact else not math.isclose(have, want, rel_tol=LOSS_RTOL):
            out.append(f"loss #{i}: {have!r} (recorded {want!r})")
    return out


def _expected() -> dict:
    return json.loads(EXPECTED.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_fixed_seed_metrics_unchanged(name, tmp_path):
    got = run_record(name, tmp_path)
    if os.environ.get("GROUNDKIT_RECORD_REGRESSION"):
        data = _expected() if EXPECTED.is_file() else {}
        if data.get("float_fingerprint") not in (None, float_fingerprint()):
            data = {}  # every run of the file is recorded under one fingerprint
        data["float_fingerprint"] = float_fingerprint()
        data.setdefault("runs", {})[name] = got
        EXPECTED.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        pytest.skip("recorded")
    data = _expected()
    exact = data["float_fingerprint"] == float_fingerprint()
    diff = differences(got, data["runs"][name], exact)
    assert not diff, (
        ("bit-exact repeat" if exact else "another float fingerprint, within tolerance") + ": " + "; ".join(diff)
    )


@pytest.mark.parametrize(
    "name, change",
    [
        ("wang21_reference_distill", {"loss.phrase_scale": 2.0 * 1.01}),  # NCE temperature 0.5 -> 0.495
        ("crosskd_caption_kd", {"loss.margin": 0.09381161988446174 * 1.01}),
    ],
)
def test_regression_catches_a_small_change(name, change, tmp_path):
    """A 1 % change of a loss constant fails the cross-machine comparison, not only the bit-exact one."""
    got = run_record(name, tmp_path, change)
    diff = differences(got, _expected()["runs"][name], exact=False)
    assert any(d.startswith("loss #") for d in diff), diff
