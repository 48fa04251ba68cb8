"""The demo's HTML report: markdown tables as HTML, a page whose every picture exists, training curves
from run logs (missing or empty ones included), and the wang21 / crosskd pictures of tiny trained runs."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import serve_helpers as sh
import torch
from PIL import Image

from groundkit import report
from groundkit.methods import get_method
from groundkit.methods.base import Figure
from groundkit.report import ReportSection, build_report, markdown_to_html, plot_curves, read_log, write_report
from groundkit.runs import RunResult

TABLE = """| variant | R@1 | R@5 | n |
|---|---|---|---|
| NCE (reference) | 9.76 ± 0.50 | 21.95 ± — | 1 |
| <b>bold</b> & co | 1.00 |
some note under the table"""


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def _fake_run(path: Path, steps: int = 5, metric: str = "R@1") -> Path:
    path.mkdir(parents=True)
    lines = [{"kind": "info", "msg": "hello"}]
    for s in range(1, steps + 1):
        lines.append({"kind": "train", "step": s, "epoch": 0, "loss": 3.0 / s})
        lines.append({"kind": "eval", "step": s, "epoch": 0, "split": "val", metric: 10.0 * s})
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n"
    (path / "log.jsonl").write_text(text)
    (path / "config.yaml").write_text(f"train:\n  best_metric: {metric}\n")
    return path


def _png(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_markdown_table_to_html():
    h = markdown_to_html(TABLE)
    assert h.count("<table>") == 1 and h.count("<th>") == 4
    assert "<th>variant</th><th>R@1</th><th>R@5</th><th>n</th>" in h
    assert "<td>9.76 ± 0.50</td>" in h and "---" not in h
    # text is escaped, short rows are padded to the header's width
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in h and "<b>" not in h
    assert "<tr><td>&lt;b&gt;bold&lt;/b&gt; &amp; co</td><td>1.00</td><td></td><td></td></tr>" in h
    assert "<p>some note under the table</p>" in h
    # a table without a separator line has no header
    assert "<thead>" not in markdown_to_html("| a | b |\n| c | d |")


def test_read_log_and_plot_curves_tolerate_missing_and_empty_logs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.jsonl").write_text("")
    good = _fake_run(tmp_path / "good")
    assert read_log(tmp_path / "nowhere") == ([], [])
    train, evals = read_log(good)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5] and len(evals) == 5
    out = plot_curves([("empty", empty), ("missing", tmp_path / "nowhere")], tmp_path / "a.png", "nothing")
    with Image.open(out) as im:
        assert im.width > 100
    out = plot_curves([("empty", empty), ("good", good)], tmp_path / "b.png", "one run")
    with Image.open(out) as im:
        assert im.width >= 900  # two panels: loss and the validation metric


def test_write_report_references_existing_images_only(tmp_path):
    run = _fake_run(tmp_path / "runs" / "r0")
    figs = tmp_path / "figs"
    _png(figs / "one.png")
    _png(figs / "sub" / "two.png")
    section = ReportSection(
        method="wang21",
        title="wang21 <phrase grounding>",
        table=TABLE,
        curves=[("NCE", run), ("gone", tmp_path / "runs" / "gone")],
        figures=[Figure("one.png", "first <pic>"), Figure("sub/two.png", "second"), Figure("absent.png", "lost")],
        figure_dir=figs,
        notes="a note",
    )
    other = ReportSection(method="crosskd", title="crosskd", table="| a | b |\n|---|---|\n| x | 1.5 |")
    # a previous report's pictures are replaced
    _png(tmp_path / "out" / "report" / "img" / "stale.png")
    index = write_report(tmp_path / "out", "demo", [section, other], {"world": "tiny", "machine": "2 cores"})
    assert index == tmp_path / "out" / "report" / "index.html"
    page = index.read_text()
    srcs = _img_srcs(page)
    assert len(srcs) == 3  # curves + the two figures that exist
    for s in srcs:
        assert not s.startswith(("/", "http")) and (index.parent / s).is_file()
    assert sorted(p.name for p in (index.parent / "img").iterdir()) == sorted(Path(s).name for s in srcs)
    assert "9.76 ± 0.50" in page and "<td>1.5</td>" in page and "2 cores" in page
    assert "first &lt;pic&gt;" in page and "wang21 &lt;phrase grounding&gt;" in page
    assert "<script" not in page and "http" not in page and "<link" not in page


def test_build_report_survives_a_failing_figure_hook(tmp_path, monkeypatch, capsys):
    good = _fake_run(tmp_path / "m" / "a")

    class Broken:
        def demo_figures(self, run, out_dir, n=4):
            raise RuntimeError("no pictures today")

    monkeypatch.setattr(report, "get_method", lambda name: Broken())
    runs = [
        RunResult(label="A", seed=0, output_dir=str(good), status="done", seconds=2.0),
        RunResult(label="B", seed=0, output_dir=str(tmp_path / "m" / "b"), status="failed", error="boom"),
    ]
    args = argparse.Namespace(size="tiny", seeds="0", world_seed=0)
    index = build_report(tmp_path, {"wang21": (runs, TABLE)}, args, {"wang21": 3.0})
    page = index.read_text()
    assert "warning: [wang21] report pictures failed: RuntimeError: no pictures today" in capsys.readouterr().out
    assert "pictures failed" in page and "failed: B seed 0: boom" in page
    assert len(_img_srcs(page)) == 1 and all((index.parent / s).is_file() for s in _img_srcs(page))


# ----------------------------------------------------------------------------- the methods' pictures


@pytest.fixture(scope="module")
def wang21_run(tmp_path_factory):
    """A tiny built-in phrase world and a wang21 run trained on it for one epoch with a small model."""
    from groundkit.cli import main
    from groundkit.world import generate

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("report_w21")
    world = generate("phrase", size="tiny", seed=0, out=base / "world")
    out = base / "run"
    args = ["train", "wang21", "world_reference_distill", "--output-dir", str(out)]
    args += ["--region-feat-path", str(world / "region_features_{split}.hdf5")]
    args += ["--phrase-feat-path", str(world / "phrase_features_{split}.hdf5")]
    args += ["--glove-path", str(world / "glove.hdf5"), "--class-names", str(world / "detector_classes.txt")]
    args += ["--phrase-to-label-json", str(world / "phrase_to_label.json")]
    args += ["--set", "train.epochs=1", "model.lstm_hidden=32", "model.mlp_hidden=64", "model.embed_dim=32"]
    args += ["train.progress=false", "train.tensorboard=false"]
    assert main(args) == 0
    return world, out


def test_wang21_demo_figures_draw_boxes_on_the_test_images(wang21_run, tmp_path):
    world, run = wang21_run
    figs = get_method("wang21").demo_figures(run, tmp_path, n=2)
    assert len(figs) == 2
    test_ids = (world / "flickr30k_entities" / "test.txt").read_text().split()
    for f in figs:
        assert f.file.endswith(".png") and "true box (green)" in f.caption
        assert any(i in f.file for i in test_ids) and ("hit" in f.caption or "miss" in f.caption)
        with Image.open(tmp_path / f.file) as im:
            px = im.convert("RGB")
            w, h = px.size
            assert w >= 480
            # the true boxes are drawn in green
            assert any(px.getpixel((x, y)) == (30, 170, 60) for x in range(0, w, 2) for y in range(0, h, 2))


def test_crosskd_demo_figures_show_the_top_videos(tmp_path_factory, tmp_path):
    _, run = sh.crosskd_run(tmp_path_factory.getbasetemp())
    figs = get_method("crosskd").demo_figures(run, tmp_path, n=3)
    assert len(figs) == 3
    for f in figs:
        assert "top 5" in f.caption and "attributes" in f.caption and "features, not pixels" in f.caption
        with Image.open(tmp_path / f.file) as im:
            assert im.width > 5 * 150 and im.height > 112
    assert len({f.file for f in figs}) == 3
