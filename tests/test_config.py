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
