"""`groundkit bench gpu`: its CPU path (every section at tiny sizes) runs end to end and writes the JSON and the
Markdown table; without CUDA the GPU path says so in one line."""

import json

import pytest
import torch

from groundkit.bench.gpu import SECTIONS, markdown
from groundkit.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so(tmp_path, capsys):
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "gpu", "--dry-run", "--sections", "nope"]) == 2


def test_dry_run_runs_every_section_and_writes_the_table(tmp_path, capsys):
    assert main(["bench", "gpu", "--dry-run", "--out", str(tmp_path), "--budget", "600"]) == 0
    rec = json.loads((tmp_path / "gpu_bench.json").read_text())
    by = {r["section"]: r for r in rec["sections"]}
    assert set(by) == {s.name for s in SECTIONS} and rec["environment"]["dry_run"]
    assert by["clipvg_compile"]["status"] == "skipped"
    for name in ("metrics", "wang21", "crosskd", "cogrounding", "clipvg"):
        assert by[name]["status"] == "ok", by[name]
        assert all(v is not None for v in by[name]["figures"].values())
    assert by["metrics"]["figures"]["agree"] and by["cogrounding"]["figures"]["same boxes"]
    assert by["wang21"]["figures"]["speed-up"] > 0 and by["crosskd"]["figures"]["train speed-up"] > 0
    md = (tmp_path / "gpu_bench.md").read_text()
    assert md.startswith("GPU benchmark on CPU (dry run") and md.count("\n| ") == len(SECTIONS) + 1


def test_markdown_marks_missed_targets_and_failures():
    env = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda": "12.x"}
    recs = [
        {"section": "a", "status": "ok", "figures": {"x": 1}, "target": "x > 2", "met": False},
        {"section": "b", "status": "failed", "error": "exit 1: boom", "target": "t"},
        {"section": "c", "status": "ok", "figures": {"y": 3}, "target": "y > 2", "met": True},
    ]
    md = markdown(env, recs)
    assert "on NVIDIA H100 80GB HBM3" in md and "| a | ok | x 1 | x > 2 | **no** |" in md
    assert "| b | failed | exit 1: boom | t |  |" in md and "| c | ok | y 3 | y > 2 | yes |" in md
