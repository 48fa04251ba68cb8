"""The shared engine: resume after a kill, DDP equivalence, non-finite stop, metrics.json."""

import json
import socket

import numpy as np
import pytest
import regression_method as rm
import torch
from safetensors.torch import load_file

from groundkit.checkpoint import CheckpointError, latest_checkpoint, load_weights
from groundkit.config import load_config
from groundkit.distributed import unwrap_model
from groundkit.engine import NonFiniteLossError, epoch_order, fit, move_to_device, run_eval

BASE = {
    "train": {
        "epochs": 3,
        "batch_size": 16,
        "seed": 7,
        "ckpt_every_steps": 2,
        "best_metric": "mse",
        "best_mode": "min",
        "progress": False,
        "tensorboard": False,
        "log_every": 1,
    },
    "optim": {"name": "adamw", "lr": 0.02, "weight_decay": 0.01},
    "sched": {"name": "cosine", "warmup_steps": 3},
}


def cfg_for(tmp, **over):
    flat = {"train.output_dir": str(tmp)}
    flat.update(over)
    return load_config(rm.RegConfig, BASE, flat)


def weights(run_dir, name="best"):
    return load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))


def test_fit_writes_run_files_and_learns(tmp_path):
    res = fit(rm.METHOD, cfg_for(tmp_path / "a"), final_split="test")
    run = tmp_path / "a"
    m = json.loads((run / "metrics.json").read_text())
    assert set(m) == {"task", "split", "units", "metrics", "checkpoint", "step", "data", "config"}
    assert m["split"] == "test" and m["task"] == "regression" and m["units"] == "percent"
    assert m["checkpoint"] == "checkpoints/best" and m["step"] == res["best_step"] and m["data"]["split"] == "test"
    assert m["metrics"]["count"] == 32.0
    assert (run / "config.yaml").is_file() and (run / "log.jsonl").is_file()
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] and "samples_per_s" in train[0] and "lr" in train[0]
    # best checkpoint is the one with the lowest validation mse among the evaluated epochs
    evals = [r["mse"] for r in recs if r["kind"] == "eval" and r["split"] == "val"]
    assert res["best"]["mse"] == pytest.approx(min(evals))
    assert latest_checkpoint(run) is not None


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    fit(rm.METHOD, cfg_for(tmp_path / "full"), final_split="test")
    with pytest.raises(KeyboardInterrupt):
        fit(rm.METHOD, cfg_for(tmp_path / "killed", **{"data.crash_at_step": 9}), final_split="test")
    ck = latest_checkpoint(tmp_path / "killed")
    assert ck is not None and json.loads((ck / "meta.json").read_text())["train_state"]["step"] == 8
    # the crash was configured, so the config differs: continuing needs force=True
    fit(rm.METHOD, cfg_for(tmp_path / "killed"), resume=True, force=True, final_split="test")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "killed")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())["metrics"]
    mb = json.loads((tmp_path / "killed" / "metrics.json").read_text())["metrics"]
    assert ma == mb


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* step 5"):
        fit(rm.METHOD, cfg_for(tmp_path, **{"data.nan_at_step": 5}), final_split="test")
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "step-00000004"
    w = load_file(str(ck / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())


def test_eval_from_checkpoint_and_bad_paths(tmp_path):
    cfg = cfg_for(tmp_path / "r")
    fit(rm.METHOD, cfg, final_split="test")
    m = run_eval(rm.METHOD, cfg, tmp_path / "r" / "checkpoints" / "best", split="test", output_dir=tmp_path / "e")
    ref = json.loads((tmp_path / "r" / "metrics.json").read_text())["metrics"]
    assert m["mse"] == pytest.approx(ref["mse"], rel=1e-6)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["split"] == "test"
    model = rm.METHOD.build_model(cfg)
    with pytest.raises(CheckpointError, match="no checkpoint weights"):
        load_weights(model, tmp_path / "missing")
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="pickled checkpoints are not loaded"):
        load_weights(model, tmp_path / "w.pt")


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 1))
    assert not torch.equal(epoch_order(50, 3, 1), epoch_order(50, 3, 2))
    assert sorted(epoch_order(50, 3, 1).tolist()) == list(range(50))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    """Same global batch: 2 gloo processes end with the weights of 1 process (tolerance 1e-5)."""
    over = {
        "dropout": 0.0,
        "data": {"n_val": 33},
    }  # dropout masks differ per rank; odd val size tests exactly-once eval
    cfg_dict = {**BASE, **over}
    single = load_config(rm.RegConfig, cfg_dict, {"train.output_dir": str(tmp_path / "one")})
    fit(rm.METHOD, single, final_split="test")
    torch.multiprocessing.spawn(
        rm.ddp_worker, args=(2, _free_port(), cfg_dict, str(tmp_path / "two")), nprocs=2, join=True
    )
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-5, rtol=0)
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())["metrics"]
    assert mb["count"] == 33.0 and ma["mse"] == pytest.approx(mb["mse"], abs=1e-5)


def test_item_datasets_with_loader_workers_match_vectorised_batches(tmp_path):
    """An unbatched dataset (``__getitem__`` + ``collate``), through a DataLoader with workers, trains exactly
    like a batched one (``get_batch``)."""
    fit(rm.METHOD, cfg_for(tmp_path / "vec"), final_split="test")
    fit(rm.ITEM_METHOD, cfg_for(tmp_path / "items", **{"train.num_workers": 1}), final_split="test")
    a, b = weights(tmp_path / "vec"), weights(tmp_path / "items")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_every_n_epochs_still_resumes_exactly(tmp_path):
    """``train.ckpt_every_epochs``: fewer saves for tiny epochs; a kill loses only recomputable work."""
    every = {"train.ckpt_every_epochs": 2, "train.ckpt_every_steps": 0}
    fit(rm.METHOD, cfg_for(tmp_path / "full"), final_split="test")
    with pytest.raises(KeyboardInterrupt):  # 6 steps per epoch: killed in epoch 2, epoch 1 was not saved
        fit(rm.METHOD, cfg_for(tmp_path / "killed", **every, **{"data.crash_at_step": 9}), final_split="test")
    assert latest_checkpoint(tmp_path / "killed") is None
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 3: epoch 2 (step 12) was saved
        fit(rm.METHOD, cfg_for(tmp_path / "k2", **every, **{"data.crash_at_step": 17}), final_split="test")
    ck = latest_checkpoint(tmp_path / "k2")
    assert json.loads((ck / "meta.json").read_text())["train_state"]["step"] == 12
    for run in ("killed", "k2"):
        fit(rm.METHOD, cfg_for(tmp_path / run, **every), resume=True, force=True, final_split="test")
        a, b = weights(tmp_path / "full"), weights(tmp_path / run)
        for k in a:
            assert torch.equal(a[k], b[k]), (run, k)


def test_drop_last_leaves_out_each_epochs_incomplete_batch(tmp_path):
    # 96 training samples in batches of 40: 3 steps an epoch (40, 40, 16), or 2 with drop_last
    full = fit(rm.METHOD, cfg_for(tmp_path / "a", **{"train.batch_size": 40, "train.epochs": 2}), final_split=None)
    dropped = fit(
        rm.METHOD,
        cfg_for(tmp_path / "b", **{"train.batch_size": 40, "train.epochs": 2, "train.drop_last": True}),
        final_split=None,
    )
    assert full["steps"] == 6 and dropped["steps"] == 4
    with pytest.raises(Exception, match="make no full batch of 128"):
        fit(rm.METHOD, cfg_for(tmp_path / "c", **{"train.batch_size": 128, "train.drop_last": True}), final_split=None)


def test_unwrap_model_strips_wrappers_in_either_order():
    """DDP-style ``.module`` (DataParallel here: no process group needed) and torch.compile's ``_orig_mod``."""
    net = torch.nn.Linear(2, 1)
    assert unwrap_model(net) is net
    assert unwrap_model(torch.nn.DataParallel(torch.compile(net))) is net
    assert unwrap_model(torch.compile(torch.nn.DataParallel(net))) is net


def test_move_to_device_keeps_the_batch_structure():
    from typing import NamedTuple  # noqa: PLC0415

    class Pair(NamedTuple):
        x: torch.Tensor
        y: list

    out = move_to_device({"p": Pair(torch.ones(1), [torch.zeros(1), "s"]), "t": (torch.ones(2),)}, torch.device("cpu"))
    assert isinstance(out["p"], Pair) and out["p"].y[1] == "s" and isinstance(out["t"], tuple)
