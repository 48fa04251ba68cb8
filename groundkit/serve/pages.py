"""The HTML of the web page: one server-rendered page, its stylesheet and a little vanilla JavaScript.

Every value that comes from a request or a model is escaped; nothing is loaded from another host
(the page works offline).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from .images import ALLOWED_FORMATS, BOX_COLOURS, Limits
from .table import ServedRun

__all__ = ["render_page", "frame_url", "STYLE", "SCRIPT"]

STYLE = """
:root { --fg: #1d1d1f; --muted: #6e6e73; --line: #d2d2d7; --accent: #0a66c2; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: #f5f5f7; }
header { background: #1d1d1f; color: #fff; padding: 12px 24px; display: flex; align-items: baseline; gap: 12px; }
header h1 { font-size: 20px; margin: 0; }
header span { color: #c7c7cc; font-size: 13px; }
main { max-width: 980px; margin: 0 auto; padding: 20px 24px 40px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; margin-bottom: 16px; }
label { display: block; font-weight: 600; margin: 8px 0 4px; }
input[type=text], select, input[type=number] { width: 100%; padding: 8px 10px; border: 1px solid var(--line);
       border-radius: 6px; font: inherit; }
input[type=number] { width: 6em; }
input[type=file] { font: inherit; }
button { margin-top: 12px; background: var(--accent); color: #fff; border: 0; border-radius: 6px; padding: 9px 18px;
         font: inherit; font-weight: 600; cursor: pointer; }
button:disabled { opacity: .6; cursor: progress; }
.hint, .note { color: var(--muted); font-size: 13px; }
.error { border-color: var(--bad); background: #fdecea; color: var(--bad); font-weight: 600; }
.row { display: flex; gap: 12px; align-items: end; }
.row > div:first-child { flex: 1; }
#result-image { max-width: 100%; height: auto; border-radius: 6px; display: block; margin: 8px 0; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: middle; }
ol#videos { padding-left: 1.6em; }
ol#videos li { padding: 8px 0; border-bottom: 1px solid var(--line); }
.vid { font-weight: 600; font-family: ui-monospace, monospace; }
.score { color: var(--muted); margin-left: 8px; font-variant-numeric: tabular-nums; }
.caption { display: block; margin: 2px 0 4px; }
.frames { display: flex; gap: 6px; margin-top: 6px; flex-wrap: wrap; }
.frames img { height: 96px; border-radius: 4px; }
"""

SCRIPT = """
(function () {
  var choose = document.getElementById('choose');
  var select = document.getElementById('run');
  if (choose && select) {
    select.addEventListener('change', function () { choose.submit(); });
    var go = document.getElementById('choose-button');
    if (go) go.style.display = 'none';
  }
  var form = document.getElementById('ground-form');
  if (form) {
    form.addEventListener('submit', function (ev) {
      var input = document.getElementById('image');
      var limit = parseInt(form.getAttribute('data-max-bytes'), 10);
      var msg = document.getElementById('client-error');
      var text = document.getElementById('text');
      var maxText = parseInt(text.getAttribute('data-max-text'), 10);
      if (text.value.length > maxText) {
        ev.preventDefault();
        msg.textContent = 'The expression is ' + text.value.length + ' characters long; the limit is ' +
          maxText + '. Shorten it (nothing was cut).';
        msg.hidden = false;
        return;
      }
      if (input && input.files.length && input.files[0].size > limit) {
        ev.preventDefault();
        msg.textContent = 'The file is ' + (input.files[0].size / 1048576).toFixed(1) +
          ' MB; the limit is ' + (limit / 1048576).toFixed(1) + ' MB.';
        msg.hidden = false;
        return;
      }
      var b = document.getElementById('submit');
      if (b) { b.disabled = true; b.textContent = 'Working\\u2026'; }
    });
  }
  var search = document.getElementById('search-form');
  if (search) {
    search.addEventListener('submit', function () {
      var b = document.getElementById('submit');
      if (b) { b.disabled = true; b.textContent = 'Searching\\u2026'; }
    });
  }
})();
"""

# the table's swatches repeat the drawn boxes' colours
STYLE += "".join(f".c{i} {{ background: {c}; }}\n" for i, c in enumerate(BOX_COLOURS))


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _run_picker(runs: Sequence[ServedRun], current: ServedRun | None) -> str:
    opts = []
    for r in runs:
        sel = " selected" if current is not None and r.name == current.name else ""
        tag = "" if r.served else " (not on this page)"
        opts.append(f'<option value="{_e(r.name)}"{sel}>{_e(r.name)} \u2014 {_e(r.method)}, {_e(r.kind)}{tag}</option>')
    return (
        '<form id="choose" class="card" method="get" action="/">'
        '<label for="run">Model run</label>'
        f'<select id="run" name="run">{"".join(opts)}</select>'
        '<button id="choose-button" type="submit">Choose</button>'
        "</form>"
    )


def _ground_form(run: ServedRun, limits: Limits, text: str) -> str:
    kinds = ", ".join(ALLOWED_FORMATS.values())
    accept = "image/jpeg,image/png,image/webp,image/bmp,image/gif"
    mb = limits.max_upload_bytes / (1024 * 1024)
    return (
        f'<form id="ground-form" class="card" method="post" action="/ground" enctype="multipart/form-data" '
        f'data-max-bytes="{limits.max_upload_bytes}">'
        f'<input type="hidden" name="run" value="{_e(run.name)}">'
        '<label for="image">Image</label>'
        f'<input id="image" name="image" type="file" accept="{accept}" required>'
        '<label for="text">Expression</label>'
        f'<input id="text" name="text" type="text" data-max-text="{limits.max_text}" required '
        f'placeholder="e.g. the man in the red shirt" value="{_e(text)}">'
        '<button id="submit" type="submit">Ground</button>'
        '<p id="client-error" class="error card" role="alert" hidden></p>'
        f'<p class="hint">{_e(kinds)} up to {mb:g} MB and {limits.max_pixels:,} pixels; '
        f"expression up to {limits.max_text} characters.</p>"
        "</form>"
    )


def _search_form(run: ServedRun, limits: Limits, text: str, k: int) -> str:
    return (
        '<form id="search-form" class="card" method="get" action="/search">'
        f'<input type="hidden" name="run" value="{_e(run.name)}">'
        '<div class="row"><div><label for="text">Text</label>'
        f'<input id="text" name="text" type="text" data-max-text="{limits.max_text}" required '
        f'placeholder="e.g. a dog is running on the beach" value="{_e(text)}"></div>'
        f'<div><label for="k">Videos</label><input id="k" name="k" type="number" min="1" max="{limits.max_k}" '
        f'value="{int(k)}"></div></div>'
        '<button id="submit" type="submit">Search</button>'
        f'<p class="hint">Text up to {limits.max_text} characters; up to {limits.max_k} videos.</p>'
        "</form>"
    )


def _ground_result(result: dict[str, Any], png: bytes) -> str:
    rows = []
    for i, r in enumerate(result["results"]):
        x1, y1, x2, y2 = (f"{v:.1f}" for v in r["box"])
        score = "" if r.get("score") is None else f"{r['score']:.3f}"
        rows.append(
            f'<tr><td><span class="swatch c{i % len(BOX_COLOURS)}"></span> {i + 1}</td><td>{_e(r["text"])}</td>'
            f'<td class="x1">{x1}</td><td class="y1">{y1}</td><td class="x2">{x2}</td><td class="y2">{y2}</td>'
            f"<td>{score}</td></tr>"
        )
    w, h = result["width"], result["height"]
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        '<section id="result" class="card"><h2>Result</h2>'
        f'<img id="result-image" src="{src}" alt="the image with the predicted box drawn">'
        '<table id="boxes"><thead><tr><th>#</th><th>expression</th><th>x1</th><th>y1</th><th>x2</th><th>y2</th>'
        f"<th>score</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f'<p class="note">Image {w}\u00d7{h} pixels; boxes are [x1, y1, x2, y2] in its pixels.</p></section>'
    )


def _search_result(run: ServedRun, result: dict[str, Any]) -> str:
    items = []
    for hit in result["results"]:
        vid = hit["video_id"]
        if hit["frames"]:
            imgs = "".join(f'<img src="{_e(u)}" alt="frame {j + 1} of {_e(vid)}">' for j, u in enumerate(hit["frames"]))
            frames = f'<div class="frames">{imgs}</div>'
        elif run.frames is not None and len(run.frames):
            frames = '<div class="note">no frames on disk for this video</div>'
        else:
            frames = ""
        cap = f'<span class="caption">{_e(hit["caption"])}</span>' if hit.get("caption") else ""
        items.append(
            f'<li><span class="vid">{_e(vid)}</span><span class="score">{hit["score"]:.4f}</span>{cap}{frames}</li>'
        )
    if run.frames is None or not len(run.frames):
        note = (
            '<p id="no-frames" class="note">This collection has no frames on disk (the built-in world stores '
            "features only): ids, scores and a caption of each video are shown. Start the server with <code>--videos DIR</code> "
            "(<code>ID.mp4</code> files or <code>ID/</code> frame folders) to see frames.</p>"
        )
    else:
        note = ""
    empty = "" if items else '<p class="note">No video was found.</p>'
    return (
        f'<section id="result" class="card"><h2>Top {len(items)} videos for \u201c{_e(result["text"])}\u201d</h2>'
        f'{note}{empty}<ol id="videos">{"".join(items)}</ol></section>'
    )


def render_page(
    runs: Sequence[ServedRun],
    limits: Limits,
    current: ServedRun | None = None,
    *,
    text: str = "",
    k: int = 10,
    error: str | None = None,
    ground: tuple[dict[str, Any], bytes] | None = None,
    search: dict[str, Any] | None = None,
) -> str:
    """The whole page: the run picker, the form for the chosen run's kind, an error, a result."""
    parts = []
    if not runs:
        parts.append(
            '<div class="card" id="no-runs"><h2>No model run is loaded</h2><p>Start the page with a trained run:'
            "<br><code>groundkit serve --run runs/crosskd/synth_cecap</code><br>(train one with "
            "<code>groundkit train METHOD</code> or <code>groundkit demo</code>).</p></div>"
        )
    else:
        current = current or runs[0]
        parts.append(_run_picker(runs, current))
        intro = f"<strong>{_e(current.method)}</strong>: {_e(current.summary)}" if current.summary else ""
        parts.append(f'<p class="note" id="run-note">{intro}<br>{_e(current.note)}</p>')
        if current.kind == "image_text":
            parts.append(_ground_form(current, limits, text))
        elif current.kind == "text_video":
            parts.append(_search_form(current, limits, text, k))
    if error:
        parts.append(f'<div id="error" class="card error" role="alert">{_e(error)}</div>')
    if ground is not None and current is not None:
        parts.append(_ground_result(*ground))
    if search is not None and current is not None:
        parts.append(_search_result(current, search))
    title = "groundkit" + (f" \u2014 {_e(current.name)}" if current is not None else "")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{title}</title><link rel="stylesheet" href="/style.css"></head><body>'
        "<header><h1>groundkit</h1><span>try a trained model by hand \u2014 this page runs on your machine</span>"
        f"</header><main>{''.join(parts)}</main>"
        '<script src="/app.js"></script></body></html>'
    )


def frame_url(run: str, video_id: str, index: int) -> str:
    return f"/frames/{quote(run, safe='')}/{quote(video_id, safe='')}/{index}"
