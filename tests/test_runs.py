"""groundkit.runs: many trainings (sequential or in processes), reuse and resume, summaries."""

import copy
import json
import math

import pytest
import regression_method as rm

from groundkit import runs
from groundkit.checkpoint import latest_checkpoint
from groundkit.runs import RunResult, RunsFailedError, RunSpec, format_table, run_many, run_one, seed_specs, summarize

BASE = {
    "train": {
        "epochs": 3,
        "batch_size": 16,
        "seed": 0,
        "ckpt_every_steps": 2,
        "best_metric": "mse",
        "best_mode": "min",
        "tensorboard": False,
        "log_every": 1,
    },
    "optim": {"name": "adamw", "lr": 0.02, "weight_decay": 0.01},
    "sched": {"name": "cosine", "warmup_steps": 3},
}


def specs_for(root, label="reg", seeds=(0, 1), **over):
    return seed_specs(label, rm.METHOD, BASE, seeds, root, overrides=over)


def record(spec):
    return json.loads((runs.Path(spec.output_dir) / "run.json").read_text())


def test_seed_specs_and_slug(tmp_path):
    specs = seed_specs("NCE+Distill (reference)", rm.METHOD, BASE, [3, 5], tmp_path, {"optim.lr": 0.01})
    assert [s.seed for s in specs] == [3, 5] and all(s.label == "NCE+Distill (reference)" for s in specs)
    assert specs[1].output_dir == str(tmp_path / "nce-distill-reference" / "seed5")
    assert specs[0].overrides == {"optim.lr": 0.01} and specs[0].final_split == "test"
    with pytest.raises(ValueError, match="train.seed"):
        RunSpec(rm.METHOD, BASE, {"train.seed": 1}, str(tmp_path / "x"), seed=2, label="x")
    with pytest.raises(ValueError, match="share the output_dir"):
        run_many(specs + [specs[0]], progress=False)


def test_parallel_runs_equal_sequential_runs(tmp_path):
    seq = run_many(specs_for(tmp_path / "seq"), jobs=1, threads=1, progress=False)
    bad = specs_for(tmp_path / "bad", label="bad", seeds=(0,), **{"optim.name": "lion"})
    par = run_many(bad + specs_for(tmp_path / "par"), jobs=2, threads=1, progress=False, raise_on_failure=False)
    assert par[0].status == "failed" and "optim.name" in par[0].error  # reported from the worker, the others ran
    par = par[1:]
    assert [r.status for r in seq] == [r.status for r in par] == ["done", "done"]
    assert [r.seed for r in par] == [0, 1]  # spec order
    assert [r.metrics for r in seq] == [r.metrics for r in par] and [r.best for r in seq] == [r.best for r in par]
    assert seq[0].metrics != seq[1].metrics  # the seed reaches the engine
    assert seq[0].final_split == "test" and seq[0].main_metric == "mse" and seq[0].metrics["count"] == 32.0
    rec = record(specs_for(tmp_path / "par")[1])
    assert rec["status"] == "done" and rec["metrics"] == par[1].metrics and rec["identity"]["config"]["train.seed"] == 1
    assert rec["spec"]["method"] == "regression" and rec["spec"]["label"] == "reg"


def test_second_run_reuses_finished_runs_without_training(tmp_path, monkeypatch, capsys):
    specs = specs_for(tmp_path)
    first = run_many(specs, threads=1, progress=False)
    stamp = [(latest_checkpoint(s.output_dir) / "model.safetensors").stat().st_mtime_ns for s in specs]

    def no_training(*a, **k):
        raise AssertionError("fit called for a finished run")

    monkeypatch.setattr("groundkit.engine.fit", no_training)
    again = run_many(specs, threads=1, progress=False)
    assert [r.status for r in again] == ["reused", "reused"]
    assert [r.metrics for r in again] == [r.metrics for r in first] and again[0].best == first[0].best
    assert again[0].seconds == pytest.approx(first[0].seconds)
    assert stamp == [(latest_checkpoint(s.output_dir) / "model.safetensors").stat().st_mtime_ns for s in specs]
    monkeypatch.setattr(runs, "_run_pool", no_training)  # jobs > 1: finished runs start no process
    assert [r.status for r in run_many(specs, jobs=2, threads=1, progress=True)] == ["reused", "reused"]
    err = capsys.readouterr().err
    assert f"reg seed 1: test mse={first[1].metrics['mse']:.4f}" in err and "(reused)" in err

    # another thread count is another run (float results depend on it): never answered by these
    def pool(specs, todo, *a):
        raise AssertionError(f"trains {todo}")

    monkeypatch.setattr(runs, "_run_pool", pool)
    with pytest.raises(AssertionError, match=r"trains \[0, 1\]"):
        run_many(specs, jobs=2, threads=2, progress=False)
    r = run_one(specs[0])  # threads 0: shared with the machine's other trainings
    assert r.status == "failed" and "fit called" in r.error
    monkeypatch.undo()
    # killed after fit() wrote metrics.json but before run.json said "done": resumed from the final
    # checkpoint, which only evaluates again (no training step)
    path = runs.Path(specs[0].output_dir) / "run.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "status": "running"}))
    r = run_one(specs[0])
    assert r.status == "done" and r.resumed and r.steps == first[0].steps
    assert r.metrics == first[0].metrics and r.best == first[0].best
    assert record(specs[0])["status"] == "done"
    # a changed config is not reused, and not silently continued from the other config's checkpoints
    changed = specs_for(tmp_path, **{"optim.lr": 0.05})[0]
    r = run_one(changed)
    assert r.status == "failed" and "optim.lr: 0.02 -> 0.05" in r.error


def test_failing_runs_fail_alone_and_are_reported(tmp_path):
    good = specs_for(tmp_path / "good", seeds=(0,))
    bad = specs_for(tmp_path / "bad", label="bad key", seeds=(0,), **{"optim.lrr": 0.1})
    nan = specs_for(tmp_path / "nan", label="nan", seeds=(0,), **{"data.nan_at_step": 3})
    with pytest.raises(RunsFailedError) as ei:
        run_many(bad + good + nan, threads=1, progress=False)
    msg = str(ei.value)
    assert "2 of 3 runs failed" in msg and "bad key seed 0" in msg and "optim.lrr" in msg
    assert "nan seed 0" in msg and "NonFiniteLossError" in msg
    res = ei.value.results
    assert [r.status for r in res] == ["failed", "done", "failed"] and res[1].metrics["count"] == 32.0
    assert not runs.Path(bad[0].output_dir).exists()  # a config error touches no folder
    assert record(nan[0])["status"] == "failed" and "non-finite" in record(nan[0])["error"]
    quiet = run_many(bad + good, threads=1, progress=False, raise_on_failure=False)
    assert [r.status for r in quiet] == ["failed", "reused"]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    (full,) = specs_for(tmp_path / "full", seeds=(4,))
    (spec,) = specs_for(tmp_path / "killed", seeds=(4,))
    ref = run_one(full, threads=1)

    # a kill that leaves the config unchanged (the same spec, run again): resumed automatically
    killer = copy.copy(rm.METHOD)

    def step_then_die(model, batch, step, cfg):
        if step == 9:
            raise KeyboardInterrupt("killed")
        return rm.METHOD.training_step(model, batch, step, cfg)

    killer.training_step = step_then_die
    with pytest.raises(KeyboardInterrupt):
        run_one(RunSpec(killer, BASE, {}, spec.output_dir, spec.seed, spec.label), threads=1)
    assert record(spec)["status"] == "interrupted" and not (runs.Path(spec.output_dir) / "metrics.json").exists()
    r = run_one(spec, threads=1)
    assert r.status == "done" and r.resumed and r.metrics == ref.metrics and r.best == ref.best

    # a kill through the config (data.crash_at_step): continuing needs resume=True since the config changed
    (crashing,) = specs_for(tmp_path / "crash", seeds=(4,), **{"data.crash_at_step": 9})
    (after,) = specs_for(tmp_path / "crash", seeds=(4,))
    with pytest.raises(KeyboardInterrupt):
        run_one(crashing, threads=1)
    refused = run_one(after, threads=1)
    assert refused.status == "failed" and "data.crash_at_step: 9 -> -1" in refused.error
    r = run_one(after, threads=1, resume=True)
    assert r.status == "done" and r.resumed and r.metrics == ref.metrics
    assert run_one(after, threads=1).status == "reused"


def _res(label, seed, mse, status="done"):
    if status == "failed":
        return RunResult(label=label, seed=seed, output_dir=f"/x/{label}/{seed}", status=status, error="boom")
    return RunResult(
        label=label,
        seed=seed,
        output_dir=f"/x/{label}/{seed}",
        status=status,
        metrics={"mse": mse, "acc": 0.5},
        best={"mse": mse / 2},
    )


def test_summarize_and_format_table_on_known_numbers(tmp_path):
    results = [
        _res("A", 0, 0.10),
        _res("B", 0, 0.40),
        _res("A", 1, 0.20),
        _res("A", 2, 0.30),
        _res("B", 1, None, status="failed"),
    ]
    rows = summarize(results, ["mse", "acc", "missing"], scale=100)
    a, b = rows
    assert [a["label"], b["label"]] == ["A", "B"] and (a["n"], b["n"], b["failed"]) == (3, 1, 1)
    assert a["seeds"] == [0, 1, 2] and a["metrics"]["mse"]["values"] == pytest.approx([10.0, 20.0, 30.0])
    assert a["metrics"]["mse"]["mean"] == pytest.approx(20.0) and a["metrics"]["mse"]["std"] == pytest.approx(10.0)
    assert a["metrics"]["acc"]["std"] == pytest.approx(0.0) and b["metrics"]["mse"]["std"] is None
    assert a["metrics"]["missing"] == {"mean": None, "std": None, "n": 0, "values": [None, None, None]}
    assert summarize(results, ["mse"], source="best")[0]["metrics"]["mse"]["mean"] == pytest.approx(0.1)
    table = format_table(rows, ["mse", "acc"], header="toy (test)")
    assert table.splitlines() == [
        "| toy (test) | mse | acc | n |",
        "|---|---|---|---|",
        "| A | 20.00 ± 10.00 | 50.00 ± 0.00 | 3 |",
        "| B | 40.00 ± — | 50.00 ± — | 1 (+1 failed) |",
    ]
    assert "| B | 40.0 ± — |" in format_table(rows, ["mse"], header=["", "MSE"], digits=1, show_n=False)
    assert format_table(rows, ["missing"]).splitlines()[2] == "| A | n/a | 3 |"
    out = runs.write_summary(tmp_path / "s.json", results, ["mse"], scale=100)
    back = json.loads((tmp_path / "s.json").read_text())
    assert back["summary"] == out["summary"] and len(back["runs"]) == 5 and back["runs"][4]["status"] == "failed"
    assert math.isclose(back["summary"][0]["metrics"]["mse"]["std"], 10.0)


def test_default_threads_divides_usable_cores(monkeypatch):
    import os

    n = runs.usable_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    monkeypatch.setattr(runs, "usable_cores", lambda: 8)
    assert [runs.default_threads(j) for j in (1, 2, 3, 8, 20, 0)] == [8, 4, 2, 1, 1, 8]


def test_result_from_record_reads_a_finished_run_folder(tmp_path):
    (done,) = run_many(specs_for(tmp_path, seeds=(0,)), jobs=1, threads=1, progress=False)
    got = runs.result_from_record(done.output_dir, "by hand", 0, status="done")
    assert (got.label, got.seed, got.status, got.method) == ("by hand", 0, "done", "regression")
    assert got.metrics == done.metrics and got.best == done.best and got.steps == done.steps
    assert got.final_split == "test" and got.seconds == pytest.approx(done.seconds)
    with pytest.raises(runs.GroundkitError, match="no finished run recorded"):
        runs.result_from_record(tmp_path / "nowhere", "x", 0)


def test_a_metric_named_n_keeps_its_column_and_the_run_count_is_runs():
    rows = [
        {"label": "a", "n": 2, "metrics": {"acc": {"mean": 50.0, "std": 1.0, "n": 2}, "n": {"mean": 798.0, "n": 2}}}
    ]
    head = format_table(rows, ["acc", "n"]).splitlines()[0]
    assert head == "| variant | acc | n | runs |"
    assert format_table(rows, ["acc"]).splitlines()[0] == "| variant | acc | n |"
