"""Pictures of a trained CLIP-VG run for the demo report.

* :func:`demo_figures` — test samples of the run (evenly spaced over its test list), each image with the
  true box (green) and the predicted box (red); the caption holds the expression and the IoU.
* :func:`reliability_figure` — a reliability histogram written by the curriculum
  (``reliability/<source>_by_<measurer>.{npz,json}``) with the chosen threshold marked and the kept
  fraction in the title.

Everything is read from the run folder (its checkpoint's config names ``data.split_root`` and
``data.image_root``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...boxes import paired_box_iou
from ...draw import GREEN, RED, draw_boxes, spaced_indices
from ...errors import DataError
from ..base import Figure
from .data import load_samples, split_file
from .predict import ClipVGPredictor
from .pseudo import plot_histogram

__all__ = ["demo_figures", "reliability_figure", "curriculum_figures", "TRUE_COLOUR", "PRED_COLOUR", "MIN_SIDE"]

TRUE_COLOUR = GREEN
PRED_COLOUR = RED
#: small images are enlarged by an integer factor until their long side reaches this (for legibility)
MIN_SIDE = 320


def demo_figures(run: str | Path, out_dir: Path, n: int = 4, device: str = "cpu") -> list[Figure]:
    """``n`` test samples of ``run`` (evenly spaced over the test list; the validation list when the run has
    no test list) as ``clipvg_sample_<k>.png`` in ``out_dir``: the image with the true box (green) and the
    predicted box (red); the caption gives the expression and the IoU."""
    pred = ClipVGPredictor(run, device=device)
    d = pred.cfg.data
    split = next((s for s in ("test", "val") if all(p.is_file() for p in split_file(d, s))), None)
    if split is None:
        raise DataError(f"{run}: no test or validation list under data.split_root={d.split_root!r}")
    samples = load_samples(d, split)
    if not d.image_root:
        raise DataError(f"{run}: data.image_root is empty in the run's config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = []
    for k, i in enumerate(spaced_indices(len(samples), n)):
        s = samples[i]
        path = Path(d.image_root) / s.img_file
        if not path.is_file():
            raise DataError(f"{path}: image of {split} sample {i} not found")
        with Image.open(path) as im:
            image = im.convert("RGB")
        (res,) = pred.ground(image, [s.phrase])
        iou = float(paired_box_iou(torch.tensor([res["box"]]), torch.tensor([s.box], dtype=torch.float32))[0])
        name = f"clipvg_sample_{k}.png"
        k = max(1, MIN_SIDE // max(image.size))  # small world images enlarged for legibility
        draw_boxes(image, [s.box, res["box"]], [TRUE_COLOUR, PRED_COLOUR], scale=k).save(out_dir / name)
        verdict = "hit" if iou >= pred.cfg.eval.iou_threshold else "miss"
        figs.append(
            Figure(
                name,
                f'{split} sample {i}: "{s.phrase}" - IoU {iou:.2f} ({verdict}); green: true box, red: predicted box',
            )
        )
    return figs


def _scores(source: str | Path) -> tuple[np.ndarray, str]:
    """The reliability scores and title of a histogram given as its ``.npz``, ``.json`` or common stem."""
    p = Path(source)
    stem = p.with_suffix("") if p.suffix in (".npz", ".json", ".png") else p
    npz, js = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
    if not npz.is_file():
        raise DataError(f"{npz}: no reliability scores (the curriculum writes <source>_by_<measurer>.npz)")
    with np.load(npz) as data:
        if "reliability" not in data:
            raise DataError(f"{npz}: no 'reliability' array (has {sorted(data.files)})")
        r = np.asarray(data["reliability"], dtype=np.float64)
    title = stem.name
    if js.is_file():
        try:
            title = str(json.loads(js.read_text(encoding="utf-8")).get("title") or title)
        except (json.JSONDecodeError, AttributeError):
            pass
    return r, title


def reliability_figure(hist_json_or_npz: str | Path, threshold: float, out_path: str | Path, bins: int = 50) -> Path:
    """The reliability histogram of ``hist_json_or_npz`` (the ``.npz`` or ``.json`` the curriculum wrote, or their
    stem) with a vertical line at ``threshold`` and the kept fraction (``r > threshold``) in the title; written as a
    PNG to ``out_path``, which is returned."""
    r, title = _scores(hist_json_or_npz)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return plot_histogram(r, out, title, bins, threshold=float(threshold))


def curriculum_figures(cur: dict[str, Any], folder: Path) -> list[Figure]:
    """The reliability histograms the curricula of :func:`~groundkit.methods.clipvg.sweeps.demo_table`
    chose thresholds on (``cur``: its ``{"ssa", "msa", "msa_reliability"}``), each with its chosen threshold,
    as ``reliability_<k>.png`` in ``folder``; :class:`Figure` records with absolute paths."""
    ssa, msa = cur["ssa"], cur["msa"]
    todo = [
        (Path(ssa["reliability"]), ssa["final"]["threshold"], "SSA: the template source scored by its own measurer")
    ]
    stems = Path(cur["msa_reliability"])
    for u in msa.get("steps", []):
        how = "same-source" if u["source"] == u["measurer"] else "cross-source"
        what = f"MSA: {u['source']} by the {u['measurer']} measurer ({how})"
        todo.append((stems / f"{u['source']}_by_{u['measurer']}", u["threshold"], what))
    figs = []
    for i, (stem, h, what) in enumerate(todo):
        if h is None or not stem.with_suffix(".npz").is_file():
            continue
        path = reliability_figure(stem, h, Path(folder) / f"reliability_{i}.png")
        caption = f"{what}; red line: the chosen threshold h* = {h:.2f} (labels with r > h* are kept)"
        figs.append(Figure(str(path.resolve()), caption))
    return figs
