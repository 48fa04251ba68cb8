"""The declared method interface: registry, defaults, loading a run back, and the engine hooks a
curriculum needs (start from weights, train on a subset, per-sample predictions)."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import regression_method as rm
import torch

from groundkit import methods
from groundkit.checkpoint import CheckpointError, find_run_files, load_weights
from groundkit.config import list_configs, load_config
from groundkit.engine import Subset, fit, predict, resolve_device
from groundkit.errors import GroundkitError
from groundkit.methods import Method, available_methods, get_method, load_run

QUIET = {"train.progress": False, "train.tensorboard": False}


def test_registry_lists_working_methods_with_their_declarations():
    names = available_methods()
    assert {"wang21", "crosskd"} <= set(names)
    for name in names:
        m = get_method(name)
        assert isinstance(m, Method) and m.name == name and m.summary
        assert m.default_config in list_configs(name)  # the default names a shipped config
        load_config(m.config_class, m.default_config, method=name)  # and it loads
        for group, table in m.commands.items():
            assert group in ("data", "bench", "predict", "top")
            for spec in table.values():
                mod, _, attr = spec.partition(":")
                assert callable(getattr(importlib.import_module(mod), attr)), spec


def test_unknown_method_is_one_clear_error():
    with pytest.raises(GroundkitError, match="unknown method 'nope'; available: wang21, crosskd"):
        get_method("nope")


class _Minimal(Method):
    """Only the required members: evaluation comes from eval_step + compute_metrics."""

    name = "minimal"
    config_class = rm.RegConfig

    def build_model(self, cfg):
        return rm.METHOD.build_model(cfg)

    def build_dataset(self, cfg, split):
        return rm.METHOD.build_dataset(cfg, split)

    def training_step(self, model, batch, step, cfg):
        return rm.METHOD.training_step(model, batch, step, cfg)

    def eval_step(self, model, batch, cfg):
        return rm.METHOD.eval_step(model, batch, cfg)

    def compute_metrics(self, outputs, dataset, cfg):
        return rm.METHOD.compute_metrics(outputs, dataset, cfg)


def _cfg(tmp_path, name="run", **extra):
    o = {**QUIET, "train.output_dir": str(tmp_path / name), "train.epochs": 2, "train.batch_size": 16}
    o.update(extra)
    return load_config(rm.RegConfig, {}, o)


def test_defaults_need_only_the_required_members(tmp_path):
    m = _Minimal()
    assert m.has_split(None, "test") and m.format_eval({"mse": 1.0}, "val") == "val: mse=1.00"
    res = fit(m, _cfg(tmp_path))
    assert res["final"]["count"] == 32 and res["final"]["mse"] > 0
    with pytest.raises(NotImplementedError, match="no predictor"):
        m.predictor(tmp_path / "run")


def test_run_loads_back_as_method_config_model(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "regression", "regression_method")
    cfg = _cfg(tmp_path, **{"train.best_metric": "mse", "train.best_mode": "min"})
    fit(rm.METHOD, cfg)
    run = tmp_path / "run"
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["method"] == "regression"  # checkpoints name their method
    expected = rm.METHOD.build_model(cfg)
    load_weights(expected, run / "checkpoints" / "best")
    for where in (run, run / "checkpoints" / "best", run / "checkpoints" / "best" / "model.safetensors"):
        method, cfg2, model = load_run(where)
        assert cfg2.train.device == "cpu"  # the run records the device it used, not "auto"
        cfg2.train.device = cfg.train.device
        assert method is rm.METHOD and cfg2 == cfg and not model.training
        for a, b in zip(model.state_dict().values(), expected.state_dict().values()):
            assert torch.equal(a, b)
    _, cfg3, _ = load_run(run, overrides={"data.noise": 0.5})
    assert cfg3.data.noise == 0.5 and cfg.data.noise == 0.1
    with pytest.raises(CheckpointError, match="neither a run directory"):
        find_run_files(tmp_path)


def test_train_on_a_subset_and_from_given_weights(tmp_path):
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(str(i) for i in range(0, 96, 3)))  # 32 of the 96 training samples
    res = fit(rm.METHOD, _cfg(tmp_path, "sub", **{"train.subset": str(subset)}))
    assert res["steps"] == 2 * math.ceil(32 / 16)
    (tmp_path / "bad.txt").write_text("[0, 500]")
    with pytest.raises(GroundkitError, match="subset index 500 is outside the split's 96 samples"):
        fit(rm.METHOD, _cfg(tmp_path, "bad", **{"train.subset": str(tmp_path / "bad.txt")}))
    # zero epochs from given weights: the test metrics are the source run's
    src = fit(rm.METHOD, _cfg(tmp_path, "src"))
    again = fit(rm.METHOD, _cfg(tmp_path, "init", **{"train.epochs": 0, "train.init_from": str(tmp_path / "src")}))
    assert again["final"] == src["final"]


def test_subset_keeps_vectorised_batches():
    ds = rm.METHOD.build_dataset(_cfg_plain(), "train")
    sub = Subset(ds, [5, 1, 7])
    b = sub.get_batch([0, 2])
    assert len(sub) == 3 and b["index"].tolist() == [5, 7]


def _cfg_plain():
    return load_config(rm.RegConfig, {}, QUIET)


def test_predict_gives_one_record_per_sample(tmp_path):
    cfg = _cfg(tmp_path)
    model = rm.METHOD.build_model(cfg)
    ds = rm.METHOD.build_dataset(cfg, "val")
    recs = predict(rm.METHOD, model, ds, cfg, resolve_device("cpu"))
    assert len(recs) == len(ds) and [int(r["index"]) for r in recs] == list(range(len(ds)))
    assert np.isfinite([float(r["sq_err"]) for r in recs]).all() and model.training  # mode restored


def test_partial_weights_load_shared_tensors_and_name_the_rest(tmp_path):
    """``train.init_partial``: an image model's weights into a video model that adds a module."""
    from safetensors.torch import save_model  # noqa: PLC0415

    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(4, 3))
    save_model(small, str(tmp_path / "w.safetensors"))
    big = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match="do not match"):
        load_weights(big, tmp_path / "w.safetensors")
    missing, unexpected = load_weights(big, tmp_path / "w.safetensors", strict=False)
    assert missing == ["1.bias", "1.weight"] and unexpected == []
    assert torch.equal(big[0].weight, small[0].weight)
    wrong = torch.nn.Sequential(torch.nn.Linear(5, 3))
    with pytest.raises(CheckpointError):  # a shape that differs is an error even when partial
        load_weights(wrong, tmp_path / "w.safetensors", strict=False)
