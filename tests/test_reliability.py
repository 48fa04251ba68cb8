"""Runs that cannot lie or lose work (issue 10) and the engine fixes found beside it.

Each test names the numbered item it covers: ``issue N`` for the items of issue 10, ``engine N`` for
the engine problems found while building groundkit.runs. The kill test (SIGKILL / SIGINT / SIGTERM in a
subprocess) is tests/test_kill.py; the fuzz corpus over every reader is tests/test_fuzz_readers.py.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import regression_method as rm
import torch
from safetensors.torch import load_file

from groundkit import cli
from groundkit.checkpoint import latest_checkpoint
from groundkit.config import load_config
from groundkit.distributed import CoreShare, usable_cores
from groundkit.engine import RUN_FILE, RunFolder, fit
from groundkit.errors import ConfigMismatchError, Interrupted, RunFolderError
from groundkit.formats import flickr30k_entities as fe
from groundkit.methods import get_method

BASE = {
    "train": {
        "epochs": 3,
        "batch_size": 16,
        "seed": 3,
        "ckpt_every_steps": 4,
        "best_metric": "mse",
        "best_mode": "min",
        "progress": False,
        "tensorboard": False,
        "log_every": 1,
    },
    "optim": {"name": "adamw", "lr": 0.02},
    "sched": {"name": "cosine", "warmup_steps": 3},
}


def cfg_for(out, **over):
    return load_config(rm.RegConfig, BASE, {"train.output_dir": str(out), **over})


@pytest.fixture
def reg(monkeypatch):
    """The test regression method, registered for the command line."""
    monkeypatch.setitem(cli.METHODS, "regression", "regression_method")
    return rm.METHOD


def _train_args(out, *extra):
    return ["train", "regression", "--output-dir", str(out), "--set", "train.epochs=1", "train.progress=false", *extra]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _weights(run, name="best"):
    return load_file(str(Path(run) / "checkpoints" / name / "model.safetensors"))


# ----------------------------------------------------------------------------- issue 1: eval reads the run


def test_issue1_eval_rebuilds_from_the_run_and_never_writes_into_it(reg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's default folder, as a careless user would train
    assert cli.main(["train", "regression", "--set", "data.dim=4", "train.epochs=1", "train.progress=false"]) == 0
    run = tmp_path / "runs" / "default"
    before = {n: (run / n).read_bytes() for n in ("metrics.json", "config.yaml")}
    trained = json.loads(before["metrics.json"])["metrics"]["mse"]
    capsys.readouterr()
    # the run alone is enough (a data.dim=4 model: the shipped defaults would build dim 8)
    assert cli.main(["eval", str(run)]) == 0
    assert f"mse={trained:.2f}" in capsys.readouterr().out
    # any of its checkpoints, the old spelling included
    assert cli.main(["eval", "regression", "--restore-path", str(run / "checkpoints" / "best")]) == 0
    assert {n: (run / n).read_bytes() for n in before} == before  # the training run is untouched
    # asked to write: elsewhere yes, into the training run only with --overwrite
    assert cli.main(["eval", str(run), "--output-dir", str(tmp_path / "ev"), "--split", "val"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["split"] == "val" and m["config"]["data"]["dim"] == 4 and m["step"] == 3
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--output-dir", str(run)]) == 2
    assert "--overwrite" in _one_error_line(capsys.readouterr().err)
    assert {n: (run / n).read_bytes() for n in before} == before


# ----------------------------------------------------------------------------- issue 2: --set


def test_issue2_every_set_applies_and_set_before_the_config(reg, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  epochs: 1\n")
    args = cli.build_parser().parse_args(
        ["train", "regression", "--set", "optim.lr=0.5", "--set", "train.seed=9", "train.log_every=3", str(cfg_file)]
    )
    cfg = cli._build_cfg(get_method("regression"), args, "train")
    assert (cfg.optim.lr, cfg.train.seed, cfg.train.log_every, cfg.train.epochs) == (0.5, 9, 3, 1)
    args = cli.build_parser().parse_args(["train", "regression", "--set", "train.seed=1", "--set", "train.seed=2"])
    assert cli._build_cfg(get_method("regression"), args, "train").train.seed == 2  # later wins


# ----------------------------------------------------------------------------- issue 3: run folders


def test_issue3_existing_run_folder_is_refused_then_overwritten(reg, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_args(out)) == 0
    first = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert cli.main(_train_args(out, "optim.lr=0.3")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "already holds a finished run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "metrics.json").read_bytes() == first
    assert cli.main(_train_args(out, "optim.lr=0.3", "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["optim"]["lr"] == 0.3
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [3]  # one run's log (3 steps, one record), not two


def test_issue3_a_folder_in_use_is_locked(tmp_path):
    holder = RunFolder(tmp_path / "run")
    holder.acquire()  # another training holds the folder
    try:
        with pytest.raises(RunFolderError, match="in use by another training"):
            fit(rm.METHOD, cfg_for(tmp_path / "run"))
    finally:
        holder.release()
    assert not (tmp_path / "run" / "metrics.json").exists()
    fit(rm.METHOD, cfg_for(tmp_path / "run"))  # free again


# ----------------------------------------------------------------------------- issue 4: Ctrl-C saves


def test_issue4_sigint_mid_step_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    ref = fit(rm.METHOD, cfg_for(tmp_path / "ref", **{"train.ckpt_every_steps": 0}))
    over = {"train.ckpt_every_steps": 0, "data.signal_at_step": 5}
    with pytest.raises(Interrupted) as ei:
        fit(rm.METHOD, cfg_for(tmp_path / "int", **over))
    assert ei.value.exit_code == 130 and ei.value.step == 6
    assert latest_checkpoint(tmp_path / "int").name == "step-00000006"
    assert json.loads((tmp_path / "int" / RUN_FILE).read_text())["status"] == "interrupted"
    res = fit(rm.METHOD, cfg_for(tmp_path / "int", **over), resume=True)
    assert res["final"] == ref["final"] and res["resumed"]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "int")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- issue 5: one clear line


def test_issue5_bad_config_values_are_one_line(reg, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    assert cli.main(["train", "regression", str(bad), "--output-dir", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(bad) in line and "YAML syntax error at line" in line
    assert cli.main(_train_args(tmp_path / "r", "train.batch_size=0")) == 2
    assert "train.batch_size=0: must be >= 1" in _one_error_line(capsys.readouterr().err)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(_train_args(blocker / "run")) == 2  # an output folder that cannot be created
    assert str(blocker / "run") in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_issue5_a_store_that_cannot_be_written_names_data_store(tmp_path, monkeypatch):
    from groundkit.methods.crosskd import data as kd_data
    from groundkit.methods.crosskd.config import CrossKDConfig

    root = tmp_path / "released"
    root.mkdir()

    def read_only(root_, store, *a, **k):
        raise PermissionError(13, "Permission denied", str(store / "meta.json"))

    monkeypatch.setattr(kd_data, "convert_released", read_only)
    cfg = load_config(CrossKDConfig, {"data": {"root": str(root)}})
    with pytest.raises(kd_data.FeatureError, match="set data.store=DIR"):
        kd_data.open_store(cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["released"]  # no .store.tmp-PID left behind


# ----------------------------------------------------------------------------- issue 6: silent wrong inputs


def test_issue6_explicit_data_root_replaces_the_built_in_world(monkeypatch):
    monkeypatch.setitem(cli.METHODS, "crosskd", "groundkit.methods.crosskd")
    args = cli.build_parser().parse_args(["train", "crosskd", "synth_ce", "--set", "data.root=/data/MSRVTT"])
    cfg = cli._build_cfg(get_method("crosskd"), args, "train")
    assert (cfg.data.root, cfg.world.size) == ("/data/MSRVTT", "")  # what config.yaml will say


def test_issue6_unclosed_flickr_phrase_is_an_error():
    with pytest.raises(fe.DataError, match="not closed with"):
        fe.parse_sentence("[/EN#1/people A man in [/EN#2/clothing a red hat] smiles .", "s.txt:1")


def test_issue6_a_checkpoint_of_another_method_is_named(reg, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_args(out)) == 0
    capsys.readouterr()
    assert cli.main(["eval", "wang21", str(out)]) == 2
    assert f"{out} is a regression run, not a wang21 one" in _one_error_line(capsys.readouterr().err)
    other = copy.copy(rm.METHOD)
    other.name = "other"
    with pytest.raises(ConfigMismatchError, match="is a regression run, not a other one"):
        fit(other, cfg_for(tmp_path / "o", **{"train.init_from": str(out)}))


# ----------------------------------------------------------------------------- issue 7: records


def test_issue7_records_say_what_was_run(reg, tmp_path):
    res = fit(rm.METHOD, cfg_for(tmp_path / "r"))
    cfg_text = (tmp_path / "r" / "config.yaml").read_text()
    assert "device: cpu" in cfg_text and "device: auto" not in cfg_text
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["units"] == "percent" and m["checkpoint"] == "checkpoints/best" and m["step"] == res["best_step"]
    # the README's NCE command: no phrase -> class map, so the NCE model, named and recorded as such
    w21 = get_method("wang21")
    cfg = w21.resolve_config(load_config(w21.config_class, "reference_distill", method="wang21"))
    assert (cfg.loss.distill, cfg.train.output_dir) == (False, "runs/wang21/reference_nce")
    # a run that fails before its first checkpoint leaves nothing behind
    with pytest.raises(Exception, match="non-finite"):
        fit(rm.METHOD, cfg_for(tmp_path / "nan", **{"data.nan_at_step": 0}))
    assert not (tmp_path / "nan").exists()


def test_issue7_wang21_reports_percent():
    from groundkit.methods.wang21.method import to_percent

    m = to_percent({"R@1": 0.25, "upper_bound": 0.5, "teacher_coverage": 1.0, "num_phrases": 469.0})
    assert m == {"R@1": 25.0, "upper_bound": 50.0, "teacher_coverage": 100.0, "num_phrases": 469.0}
    assert get_method("wang21").units == get_method("crosskd").units == "percent"


# ----------------------------------------------------------------------------- issue 9: threads


def test_issue9_threads_come_from_usable_cores_and_are_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("GROUNDKIT_SHARE_DIR", str(tmp_path / "share"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the environment's own cap is checked at the end
    assert usable_cores() == len(os.sched_getaffinity(0)) or usable_cores() >= 1
    saved = torch.get_num_threads()
    with CoreShare(0) as a:
        assert a.threads == usable_cores()
        with CoreShare(0, interval=0.0) as b:  # a second training starts beside the first
            assert b.threads == max(1, usable_cores() // 2) and torch.get_num_threads() == b.threads
            a.interval = 0.0
            assert a.refresh() == max(1, usable_cores() // 2)
        assert a.refresh() == usable_cores()  # it ended: the cores come back
    with CoreShare(1) as c:
        assert c.threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == saved
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a cap set by the user is kept
    with CoreShare(0) as d:
        assert d.threads == 1


def test_issue9_train_threads_key_sets_torch_threads(tmp_path, monkeypatch):
    seen = []
    probe = copy.copy(rm.METHOD)
    probe.training_step = lambda *a: (seen.append(torch.get_num_threads()), rm.METHOD.training_step(*a))[1]
    fit(probe, cfg_for(tmp_path / "r", **{"train.threads": 1, "train.epochs": 1}))
    assert set(seen) == {1}
    assert json.loads((tmp_path / "r" / RUN_FILE).read_text())["threads"] == 1


# ----------------------------------------------------------------------------- engine fixes


def test_engine1_resuming_a_finished_max_steps_run_trains_no_further(tmp_path):
    cfg = cfg_for(tmp_path / "r", **{"train.max_steps": 5})
    res = fit(rm.METHOD, cfg)
    again = fit(rm.METHOD, cfg, resume=True)
    assert res["steps"] == again["steps"] == 5 and again["final"] == res["final"]
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4, 5]


def test_engine2_resume_compares_the_checkpoint_config(tmp_path):
    fit(rm.METHOD, cfg_for(tmp_path / "r"))
    with pytest.raises(ConfigMismatchError, match=r"optim.lr: 0.02 -> 0.05") as ei:
        fit(rm.METHOD, cfg_for(tmp_path / "r", **{"optim.lr": 0.05}), resume=True)
    assert ei.value.differences == [("optim.lr", 0.02, 0.05)]
    with pytest.raises(ConfigMismatchError, match="train.epochs: 3 -> 2"):  # shorter: refused
        fit(rm.METHOD, cfg_for(tmp_path / "r", **{"train.epochs": 2}), resume=True)
    # keys that do not change results may differ; a longer training is allowed (and noted)
    neutral = {"train.log_every": 7, "train.progress": True, "train.tensorboard": True, "train.threads": 1}
    assert fit(rm.METHOD, cfg_for(tmp_path / "r", **neutral), resume=True)["steps"] == 18
    assert fit(rm.METHOD, cfg_for(tmp_path / "r", **{"train.epochs": 4}), resume=True)["steps"] == 24
    assert "training extended from 18 to 24 steps" in (tmp_path / "r" / "log.jsonl").read_text()
    assert fit(rm.METHOD, cfg_for(tmp_path / "r", **{"optim.lr": 0.05}), resume=True, force=True)["steps"] == 24


def _open_files_under(path: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


def test_engine3_logger_closed_on_failure_and_resume_does_not_repeat_steps(tmp_path):
    with pytest.raises(Exception, match="non-finite"):
        fit(rm.METHOD, cfg_for(tmp_path / "nan", **{"data.nan_at_step": 6, "train.tensorboard": True}))
    assert _open_files_under(tmp_path) == []
    killer = copy.copy(rm.METHOD)

    def crash(model, batch, step, cfg):
        if step == 9:  # logged 1..9, checkpoint at 8: step 9 is trained again after the resume
            raise KeyboardInterrupt("killed")
        return rm.METHOD.training_step(model, batch, step, cfg)

    killer.training_step = crash
    with pytest.raises(KeyboardInterrupt):
        fit(killer, cfg_for(tmp_path / "k"))
    fit(rm.METHOD, cfg_for(tmp_path / "k"), resume=True)
    fit(rm.METHOD, cfg_for(tmp_path / "full"))
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("k", "full")]
    steps = [[r["step"] for r in log if r["kind"] == "train"] for log in logs]
    assert steps[0] == steps[1] == list(range(1, 19))
    evals = [[(r["step"], r["split"]) for r in log if r["kind"] == "eval"] for log in logs]
    assert evals[0] == evals[1]


def test_engine4_quiet_runs_print_no_validation_lines(tmp_path, capfd):
    fit(rm.METHOD, cfg_for(tmp_path / "q"))
    out, err = capfd.readouterr()
    assert err == "" and out == ""  # quiet: the caller reports (groundkit train prints the final metrics)
    assert '"kind": "eval"' in (tmp_path / "q" / "log.jsonl").read_text()  # still logged


def test_engine5_load_config_leaves_the_callers_dict_alone():
    src = {"train": {"epochs": 3, "batch_size": 16}, "data": {"dim": 8}}
    frozen = copy.deepcopy(src)
    cfg = load_config(rm.RegConfig, src, {"train.epochs": 5, "data.dim": 2, "optim.lr": 0.5})
    assert (cfg.train.epochs, cfg.data.dim) == (5, 2) and src == frozen


def test_engine6_fit_records_the_finished_run(tmp_path):
    res = fit(rm.METHOD, cfg_for(tmp_path / "r"), record={"note": "kept"})
    rec = json.loads((tmp_path / "r" / RUN_FILE).read_text())
    assert rec["status"] == "done" and rec["note"] == "kept" and rec["method"] == "regression"
    assert rec["steps"] == res["steps"] == 18 and rec["final_split"] == "test"
    assert rec["train_seconds"] == pytest.approx(res["train_seconds"]) and rec["metrics"] == res["final"]
    assert rec["best"] == res["best"] and rec["units"] == "percent"
