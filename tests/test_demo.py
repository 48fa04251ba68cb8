"""``groundkit demo``: its arguments, and (slow) the whole demo of the four methods on the tiny world with its report."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from groundkit import demo
from groundkit.cli import main


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    demo.add_demo_args(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_demo_runs_the_four_methods_by_default():
    assert list(demo.DEMOS) == ["wang21", "crosskd", "cogrounding", "clipvg"]
    assert _args().methods.split(",") == list(demo.DEMOS)


def test_budget_epochs_override_quick_and_default():
    assert demo._budget(_args(), "wang21") == {}
    quick = argparse.Namespace(epochs=0, quick=True)
    assert demo._budget(quick, "crosskd") == demo.QUICK["crosskd"]
    assert demo._budget(argparse.Namespace(epochs=3, quick=True), "cogrounding") == {"train.epochs": 3}
    assert set(demo.QUICK) == set(demo.DEMOS)


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit, match="unknown \\['nope'\\]"):
        main(["demo", "--methods", "nope", "--out", "unused"])


@pytest.mark.slow
def test_tiny_demo_of_all_four_methods_writes_tables_and_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "tiny", "--epochs", "1", "--jobs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == f"report: {out / 'report' / 'index.html'}"
    md = (out / "demo_results.md").read_text()
    for head in ("wang21 (phrase", "crosskd (text-to-video", "cogrounding (video", "clipvg (referring"):
        assert head in md
    assert "co-grounding (CG-SL-Att) + post-processing" in md and "co-grounding + motion attention" in md
    assert "random box" in md
    page = (out / "report" / "index.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all((out / "report" / s).is_file() for s in srcs)
    for m in demo.DEMOS:  # every method has pictures of its predictions, not only curves
        assert any(Path(s).name.startswith(m) and "curve" not in s for s in srcs), m
    assert any("reliability" in s for s in srcs)
