"""The demo's HTML report: one folder (``<out>/report/``) holding ``index.html`` and its ``img/`` PNGs.

The page is self-contained: inline CSS, no script, nothing fetched; images are referenced by relative
paths, so the folder opens offline from disk (or can be zipped and sent). Each method gets a
:class:`ReportSection`: its results table (the demo's GitHub-markdown table, converted here), the
training curves of its runs (from each run's ``log.jsonl``) and the pictures its
:meth:`~groundkit.methods.base.Method.demo_figures` draws from one trained run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import get_method
from .methods.base import Figure
from .runs import RunResult

__all__ = [
    "ReportSection",
    "FIGURE_RUNS",
    "markdown_to_html",
    "read_log",
    "plot_curves",
    "write_report",
    "build_report",
]

#: per method, the demo variant whose trained run the report's pictures show (else the last run that finished)
FIGURE_RUNS: dict[str, str] = {
    "wang21": "NCE+Distill (reference)",
    "crosskd": "CE+ + caption KD (detached, tau 0.1)",
    "cogrounding": "co-grounding + motion attention",
    "clipvg": "template source, SSA",  # the label goes on with the chosen threshold
}


@dataclass
class ReportSection:
    """One method's part of the report. ``figures`` are files in ``figure_dir`` (copied into the report)."""

    method: str
    title: str
    table: str = ""
    curves: list[tuple[str, Path]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    figure_dir: Path | None = None
    notes: str = ""


# ----------------------------------------------------------------------------- markdown tables


def _cells(line: str) -> list[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|"):
        s = s[:-1]
    return [c.strip() for c in s.split("|")]


_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def markdown_to_html(text: str) -> str:
    """GitHub-markdown pipe tables (and the plain lines between them) as HTML; every text escaped.

    A table is a run of lines starting with ``|``; when its second line is a ``|---|`` separator, the
    first line is the header. Rows with fewer cells than the header are padded with empty cells."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip().startswith("|"):
            if line.strip():
                out.append(f"<p>{html.escape(line.strip())}</p>")
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].strip().startswith("|"):
            block.append(lines[i])
            i += 1
        head: list[str] = []
        if len(block) >= 2 and _SEPARATOR.match(block[1]):
            head, body = _cells(block[0]), block[2:]
        else:
            body = block
        rows = [_cells(b) for b in body if not _SEPARATOR.match(b)]
        width = max([len(head)] + [len(r) for r in rows])
        t = ["<table>"]
        if head:
            head += [""] * (width - len(head))
            t.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead>")
        t.append("<tbody>")
        for r in rows:
            r = r + [""] * (width - len(r))
            t.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
        t.append("</tbody></table>")
        out.append("\n".join(t))
    return "\n".join(out)


# ----------------------------------------------------------------------------- training curves


def read_log(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of a run's ``log.jsonl``; ([], []) when it is missing or unreadable.
    Unparsable lines are skipped; a step logged twice (a resumed run) keeps its last record."""
    path = Path(run_dir) / "log.jsonl"
    train: dict[int, dict[str, Any]] = {}
    evals: dict[tuple[int, str], dict[str, Any]] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [], []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            continue
        if rec.get("kind") == "train" and isinstance(rec.get("loss"), (int, float)):
            train[int(rec["step"])] = rec
        elif rec.get("kind") == "eval":
            evals[(int(rec["step"]), str(rec.get("split", "")))] = rec
    return [train[s] for s in sorted(train)], [evals[k] for k in sorted(evals)]


def _best_metric(run_dir: Path) -> str | None:
    """The run's ``train.best_metric`` (from its ``config.yaml``), if it names one."""
    try:
        import yaml  # noqa: PLC0415

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        m = (cfg.get("train") or {}).get("best_metric")
        return str(m) if m else None
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def plot_curves(runs: Sequence[tuple[str, Path]], path: Path, title: str, metric: str | None = None) -> Path:
    """A PNG at ``path``: training loss against step, one line per run, and (when the logs hold
    validation records) the validation ``metric`` against step beside it. ``metric`` defaults to the
    first run's ``train.best_metric``. Runs without a readable log are left out; with none at all the
    picture says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (heavy; only the report needs it)
    from matplotlib.figure import Figure as MplFigure  # noqa: PLC0415

    logs = []
    for label, run_dir in runs:
        train, evals = read_log(run_dir)
        if train or evals:
            logs.append((label, Path(run_dir), train, [e for e in evals if e.get("split") == "val"]))
    if metric is None:
        metric = next((m for _, d, _, _ in logs if (m := _best_metric(d))), None)
    if metric is None:
        metric = next((k for _, _, _, ev in logs for k in ("R@1", "accuracy", "t2v_R1") if ev and k in ev[0]), None)
    has_val = any(metric and any(isinstance(e.get(metric), (int, float)) for e in ev) for _, _, _, ev in logs)
    fig = MplFigure(figsize=(10 if has_val else 5.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2) if has_val else [fig.subplots(1, 1)]
    ax = axes[0]
    if not logs:
        ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    for label, _, train, ev in logs:
        pts = [(r["step"], r["loss"]) for r in train if math.isfinite(float(r["loss"]))]
        line = None
        if pts:
            (line,) = ax.plot(*zip(*pts), label=label, lw=1.3)
        if has_val and metric:
            vals = [(e["step"], e[metric]) for e in ev if isinstance(e.get(metric), (int, float))]
            if vals:
                kw = {"color": line.get_color()} if line is not None else {}
                axes[1].plot(*zip(*vals), marker="o", ms=3, lw=1.3, label=label, **kw)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss", fontsize=10)
    if logs:
        ax.legend(fontsize=7)
    if has_val:
        axes[1].set_xlabel("step")
        axes[1].set_ylabel(f"val {metric}")
        axes[1].set_title(f"validation {metric}", fontsize=10)
        axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------- the page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #1d1d1f; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; color: #444; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f4; }
tbody tr:nth-child(even) { background: #fafafa; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; font-size: 0.92em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 100%; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #333; max-width: 560px; }
.notes { font-size: 0.9em; color: #555; white-space: pre-wrap; }
nav a { margin-right: 1em; }
"""


def _img_name(method: str, stem: str, used: set[str]) -> str:
    stem = stem if stem.startswith(f"{method}_") else f"{method}_{stem}"
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "img"
    name, k = f"{base}.png", 1
    while name in used:
        k += 1
        name = f"{base}-{k}.png"
    used.add(name)
    return name


def _figure_html(src: str, caption: str) -> str:
    return (
        f'<figure><img src="img/{html.escape(src)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def write_report(out_dir: str | Path, title: str, sections: Sequence[ReportSection], meta: Mapping[str, Any]) -> Path:
    """Write ``<out_dir>/report/index.html`` and its pictures under ``report/img/`` (replacing a previous
    report's); returns the path of ``index.html``. A figure whose file is missing is left out."""
    report = Path(out_dir) / "report"
    img = report / "img"
    if img.is_dir():
        shutil.rmtree(img)
    img.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    body = [f"<h1>{html.escape(title)}</h1>", '<dl class="meta">']
    for k, v in meta.items():
        body.append(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>")
    body.append("</dl>")
    if len(sections) > 1:
        body.append(
            "<nav>"
            + "".join(f'<a href="#{html.escape(s.method)}">{html.escape(s.method)}</a>' for s in sections)
            + "</nav>"
        )
    for s in sections:
        body.append(f'<h2 id="{html.escape(s.method)}">{html.escape(s.title)}</h2>')
        if s.table:
            body.append(markdown_to_html(s.table))
        if s.notes:
            body.append(f'<p class="notes">{html.escape(s.notes)}</p>')
        name = _img_name(s.method, "curves", used) if s.curves else ""
        if name:
            try:
                plot_curves(s.curves, img / name, f"{s.method}: training curves")
            except Exception as e:  # noqa: BLE001 (a picture never fails the report)
                print(f"warning: [{s.method}] training curves not drawn: {type(e).__name__}: {e}".splitlines()[0])
                name = ""
        if name:
            body.append("<h3>Training curves</h3>")
            body.append(
                '<div class="figs">'
                + _figure_html(
                    name, "training loss per step (one line per run) and, where logged, the validation metric"
                )
                + "</div>"
            )
        figs = []
        for f in s.figures:
            src = (Path(s.figure_dir) / f.file) if s.figure_dir is not None else Path(f.file)
            if not src.is_file():
                continue
            name = _img_name(s.method, Path(f.file).stem, used)
            shutil.copyfile(src, img / name)
            figs.append(_figure_html(name, f.caption))
        if figs:
            body.append("<h3>Predictions</h3>")
            body.append('<div class="figs">' + "\n".join(figs) + "</div>")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    index = report / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return index


# ----------------------------------------------------------------------------- the demo's report


def _figure_run(method: str, runs: Sequence[RunResult]) -> RunResult | None:
    done = [r for r in runs if r.ok]
    want = FIGURE_RUNS.get(method)
    picked = [r for r in done if want and r.label.startswith(want)]
    return picked[0] if picked else (done[-1] if done else None)


def _machine() -> str:
    import torch  # noqa: PLC0415

    dev = "cpu"
    if torch.cuda.is_available():
        dev = f"cuda ({torch.cuda.get_device_name(0)})"
    return f"{platform.node() or 'this machine'}: {os.cpu_count()} CPU cores, torch device {dev}"


def build_report(
    out: str | Path,
    results_by_method: Mapping[str, tuple[Sequence[RunResult], str]],
    args: argparse.Namespace,
    seconds: Mapping[str, float],
    n_figures: int = 4,
    extra_figures: Mapping[str, Sequence[Figure]] | None = None,
) -> Path:
    """The demo's report from each method's ``(runs, table)``: the table, every run's training curves
    and the pictures of one run (:data:`FIGURE_RUNS`). A method whose pictures fail gets a note and a
    one-line warning; the report is still written."""
    out = Path(out)
    sections = []
    with tempfile.TemporaryDirectory(prefix="groundkit-report-") as tmp:
        for m, (runs, table) in results_by_method.items():
            seeds = {r.seed for r in runs}
            curves = [
                (r.label if len(seeds) <= 1 else f"{r.label} (seed {r.seed})", Path(r.output_dir)) for r in runs if r.ok
            ]
            reused = sum(r.status == "reused" for r in runs)
            train_s = sum(r.seconds or 0.0 for r in runs if r.ok)
            notes = [
                f"{len(runs)} runs under {out / m} ({reused} reused from an earlier demo); "
                f"training time {train_s:.0f} s in all, this demo {seconds.get(m, 0.0):.0f} s"
            ]
            notes += [f"failed: {r.label} seed {r.seed}: {r.error}" for r in runs if not r.ok]
            section = ReportSection(method=m, title=m, table=table, curves=curves)
            run = _figure_run(m, runs)
            if run is not None:
                fdir = Path(tmp) / m
                fdir.mkdir(parents=True, exist_ok=True)
                try:
                    section.figures = list(get_method(m).demo_figures(run.output_dir, fdir, n_figures))
                    section.figure_dir = fdir
                    if section.figures:
                        notes.append(f"pictures: run {run.label!r}, seed {run.seed} ({run.output_dir})")
                except Exception as e:  # noqa: BLE001 (a picture never fails the demo)
                    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    print(f"warning: [{m}] report pictures failed: {msg}", flush=True)
                    notes.append(f"pictures failed: {msg}")
            # pictures the method's demo drew itself (absolute paths, which figure_dir / path keeps as they
            # are), e.g. the CLIP-VG reliability histograms with their chosen thresholds
            section.figures += [f for f in (extra_figures or {}).get(m, []) if Path(f.file).is_file()]
            section.notes = "\n".join(notes)
            sections.append(section)
        meta = {
            "world": f"built-in benchmark world, size {args.size}, world seed {args.world_seed}",
            "training seeds": str(getattr(args, "seeds", "")),
            "methods": ", ".join(results_by_method) or "none",
            "demo time": f"{sum(seconds.values()):.0f} s ("
            + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items())
            + "; finished runs found in the output folder are reused, not trained again)",
            "finished": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": _machine(),
            "results": str(out / "demo_results.md"),
        }
        return write_report(out, "groundkit demo report", sections, meta)
