"""One rule for what a default means (docs/architecture.md, "What a default means"): every config field's default is
the official code's behaviour, and the shipped `reference*` configs set no behaviour flag to another value.

The official-behaviour tables of the method docs name each flag with its official value (`section.key: value`); the
dataclass defaults must hold those values, so a doc row and the code cannot drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from groundkit.config import list_configs, load_config, to_dict
from groundkit.methods import get_method

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: the docs whose tables start with "| official behaviour (the default) | flag: official value |"
TABLE_DOCS = {"clipvg": "clipvg.md", "cogrounding": "cogrounding.md"}
#: a `section.key: value` pair in a table cell
#: not behaviour: the official run's schedule (6-GPU batch and its lr), and speed switches that change results only by
#: float rounding (SDPA instead of the explicit softmax), on by default
NOT_FLAGS = ("train.batch_size", "optim.lr", "model.sdpa")
PAIR = re.compile(r"`((?:data|model|loss|eval|post|train|optim)\.[a-z_]+): ([^`]+)`")


def official_pairs(method: str) -> list[tuple[str, object]]:
    """The (dotted key, official value) pairs of the official-behaviour table of ``method``'s doc."""
    pairs, in_table = [], False
    for line in (DOCS / TABLE_DOCS[method]).read_text().splitlines():
        if line.startswith("| official behaviour (the default)"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            in_table = False
        if in_table and not line.startswith("|---"):
            cell = line.split("|")[2]
            pairs += [(k, yaml.safe_load(v)) for k, v in PAIR.findall(cell)]
    return pairs


def _value(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return to_dict(cfg)


@pytest.mark.parametrize("method", sorted(TABLE_DOCS))
def test_the_defaults_are_the_official_values_the_docs_name(method):
    pairs = official_pairs(method)
    assert len(pairs) >= 8, f"the official-behaviour table of docs/{TABLE_DOCS[method]} was not found"
    defaults = get_method(method).config_class()
    wrong = {k: (v, _value(defaults, k)) for k, v in pairs if _value(defaults, k) != v and k not in NOT_FLAGS}
    assert not wrong, f"defaults differ from the official values in docs/{TABLE_DOCS[method]}: {wrong}"


@pytest.mark.parametrize("method", sorted(TABLE_DOCS))
def test_reference_configs_keep_every_official_value(method):
    pairs = [(k, v) for k, v in official_pairs(method) if k not in NOT_FLAGS]
    cls = get_method(method).config_class
    names = [n for n in list_configs(method) if n.startswith("reference")]
    assert names
    for name in names:
        cfg = load_config(cls, name, method=method)
        wrong = {k: _value(cfg, k) for k, v in pairs if _value(cfg, k) != v}
        assert not wrong, f"{method} {name} changes official behaviour: {wrong}"


@pytest.mark.parametrize(("method", "name"), [("clipvg", "improved"), ("cogrounding", "improved_refcoco")])
def test_improved_configs_change_official_behaviour(method, name):
    cfg = load_config(get_method(method).config_class, name, method=method)
    changed = [k for k, v in official_pairs(method) if _value(cfg, k) != v]
    assert len(changed) >= 5, changed
