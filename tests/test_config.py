from dataclasses import dataclass, field
from typing import Literal

import pytest

from groundkit.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


@dataclass
class Model:
    dim: int = 4
    kind: Literal["a", "b"] = "a"
    scales: tuple[float, float] = (1.0, 2.0)
    path: str | None = None


@dataclass
class Cfg(ExperimentConfig):
    model: Model = field(default_factory=Model)


def test_defaults_and_nested_override():
    cfg = load_config(Cfg, {"model": {"dim": 8}}, ["optim.lr=3e-4", "train.batch_size=64", "model.kind=b"])
    assert cfg.model.dim == 8 and cfg.model.kind == "b"
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.batch_size == 64


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, {"model": {"dimm": 8}})
    msg = str(e.value)
    assert "model.dimm" in msg and "dim" in msg and "kind" in msg
    with pytest.raises(ConfigError, match="unknown key optim.lrr"):
        load_config(Cfg, None, ["optim.lrr=1"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.dim=abc", "model.dim: expected int"),
        ("model.kind=c", "expected one of"),
        ("train.compile=3", "expected bool"),
        ("model.scales=[1]", "expected 2 values"),
    ],
)
def test_wrong_types_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(Cfg, None, [override])


def test_yaml_roundtrip_and_base(tmp_path):
    cfg = load_config(Cfg, None, ["model.path=/x", "optim.name=radam"])
    save_config(cfg, tmp_path / "a.yaml")
    again = load_config(Cfg, tmp_path / "a.yaml")
    assert to_dict(again) == to_dict(cfg)
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  dim: 16\n")
    b = load_config(Cfg, tmp_path / "b.yaml")
    assert b.model.dim == 16 and b.model.path == "/x" and b.optim.name == "radam"


def test_from_dict_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="model"):
        from_dict(Cfg, {"model": 3})
    assert apply_overrides(Cfg, {}, {"model.dim": 2}) == {"model": {"dim": 2}}


def test_the_world_section_and_its_earlier_names():
    """Every config has one world section; the earlier data.synth_* / data.world_task keys (old run folders,
    old command lines) load under their new names, and a YAML naming a section keeps the method's other defaults."""
    from groundkit.methods import get_method  # noqa: PLC0415

    cls = get_method("cogrounding").config_class
    old_run = {"data": {"kind": "vid", "synth_size": "small", "synth_seed": 2, "world_task": "video"}}
    cfg = load_config(cls, old_run)
    assert (cfg.world.size, cfg.world.seed, cfg.world.task, cfg.data.kind) == ("small", 2, "video", "vid")
    cfg = load_config(cls, "world_image", ["data.synth_size=tiny", "world.seed=4"], method="cogrounding")
    assert (cfg.world.size, cfg.world.seed, cfg.world.task) == ("tiny", 4, "refexp")
    assert not hasattr(cfg.data, "synth_size")
    # `train: {epochs: 3}` starts from the method's train defaults (best metric, drop_last), not TrainConfig's
    cfg = load_config(cls, {"train": {"epochs": 3}})
    assert (cfg.train.epochs, cfg.train.best_metric, cfg.train.drop_last) == (3, "Acc@0.5", True)
    for name in ("wang21", "crosskd", "cogrounding", "clipvg"):
        assert get_method(name).config_class().world.size == ""
