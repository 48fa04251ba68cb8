"""crosskd pictures for the demo report: for a few test captions, the top-ranked videos.

Videos are shown by a frame from the store's source folder when it has one (``<id>.jpg``, ``<id>/*.jpg``).
Collections without pixels (the built-in world's videos are attribute tuples: features, not frames)
get a card drawn from the video's ``attributes.json`` entry (object in its colour, a mark for the
action, the scene as background), and the caption says that the pictures are drawn, not frames.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageColor, ImageDraw

from ...draw import GREEN, GREY, add_caption, font, frame
from ..base import Figure

__all__ = ["retrieval_figures", "attribute_card", "load_attributes"]

CARD = (150, 112)

_SCENES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {  # scene -> (sky/back, ground)
    "beach": ((150, 200, 240), (232, 212, 160)),
    "forest": ((120, 170, 120), (40, 95, 45)),
    "kitchen": ((235, 230, 215), (180, 150, 120)),
    "street": ((170, 190, 215), (115, 115, 120)),
    "park": ((160, 205, 240), (105, 170, 85)),
    "desert": ((245, 220, 170), (220, 180, 110)),
    "snow": ((210, 225, 240), (248, 250, 252)),
    "field": ((165, 210, 245), (160, 195, 80)),
    "river": ((165, 205, 235), (60, 120, 185)),
    "city": ((185, 190, 205), (140, 140, 155)),
    "stadium": ((120, 150, 200), (60, 145, 60)),
    "room": ((225, 215, 200), (170, 130, 95)),
}
_PEOPLE = {"man", "woman", "child", "robot", "person", "boy", "girl"}
_VEHICLES = {"car", "truck", "bus", "bicycle", "boat", "train", "motorcycle"}
_UP = {"jumping", "flying", "climbing", "bouncing", "floating"}
_ROUND = {"spinning", "rolling", "turning"}
_WAVE = {"shaking", "swimming", "dancing"}


def _hashed(name: str) -> tuple[int, int, int]:
    h = hashlib.sha1(name.encode()).digest()
    return (60 + h[0] % 160, 60 + h[1] % 160, 60 + h[2] % 160)


def _rgb(colour: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(colour)[:3]  # type: ignore[return-value]
    except ValueError:
        return _hashed(colour)


def attribute_card(att: dict[str, str], size: tuple[int, int] = CARD) -> Image.Image:
    """A small picture of a video from its attributes: the scene's colours as background, the object
    as a silhouette in its colour, and a mark for the action (lines, an arrow up, a circle, a wave)."""
    w, h = size
    sky, ground = _SCENES.get(
        att.get("scene", ""), (_hashed(att.get("scene", "") + "/sky"), _hashed(att.get("scene", "")))
    )
    img = Image.new("RGB", size, sky)
    d = ImageDraw.Draw(img)
    hz = int(h * 0.55)
    d.rectangle([0, hz, w, h], fill=ground)
    col = _rgb(att.get("colour", "grey"))
    edge = tuple(max(0, c - 90) for c in col)
    obj = att.get("object", "")
    cx, base = w // 2, int(h * 0.85)
    if obj in _PEOPLE:
        d.rectangle([cx - 10, base - 46, cx + 10, base - 12], fill=col, outline=edge)
        d.ellipse([cx - 8, base - 64, cx + 8, base - 48], fill=(225, 185, 150) if obj != "robot" else col, outline=edge)
        d.rectangle([cx - 9, base - 12, cx - 3, base], fill=edge)
        d.rectangle([cx + 3, base - 12, cx + 9, base], fill=edge)
    elif obj in _VEHICLES:
        d.rounded_rectangle([cx - 34, base - 30, cx + 34, base - 8], radius=6, fill=col, outline=edge)
        d.rectangle([cx - 16, base - 42, cx + 14, base - 30], fill=col, outline=edge)
        for x in (cx - 20, cx + 20):
            d.ellipse([x - 8, base - 16, x + 8, base], fill=(30, 30, 30))
    elif obj in ("ball", "sphere"):
        d.ellipse([cx - 16, base - 32, cx + 16, base], fill=col, outline=edge, width=2)
    else:  # an animal: body, head, legs
        d.ellipse([cx - 30, base - 34, cx + 22, base - 10], fill=col, outline=edge)
        d.ellipse([cx + 14, base - 46, cx + 36, base - 26], fill=col, outline=edge)
        for x in (cx - 22, cx - 8, cx + 4, cx + 14):
            d.rectangle([x, base - 14, x + 5, base], fill=edge)
    act = att.get("action", "")
    mark = (20, 20, 20)
    if act in _UP:
        d.line([(18, base - 4), (18, base - 44)], fill=mark, width=3)
        d.polygon([(10, base - 40), (26, base - 40), (18, base - 52)], fill=mark)
    elif act in _ROUND:
        d.arc([6, base - 46, 34, base - 18], 30, 330, fill=mark, width=3)
    elif act in _WAVE:
        pts = [(6 + 4 * i, base - 30 + (6 if i % 2 else -6)) for i in range(8)]
        d.line(pts, fill=mark, width=2)
    elif act not in ("waiting", "resting", "sitting", ""):
        for k in range(3):
            d.line([(6, base - 40 + 12 * k), (30, base - 40 + 12 * k)], fill=mark, width=2)
    return img


def load_attributes(root: str | Path | None) -> dict[str, dict[str, str]]:
    """``attributes.json`` of a collection folder (video id -> attributes), or {} when there is none."""
    if not root:
        return {}
    p = Path(root) / "attributes.json"
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _frame_of(folder: str | None, vid: str) -> Image.Image | None:
    if not folder:
        return None
    base = Path(folder)
    for p in (base / f"{vid}.jpg", base / f"{vid}.png"):
        if p.is_file():
            return Image.open(p).convert("RGB")
    frames = sorted((base / vid).glob("*.jpg")) if (base / vid).is_dir() else []
    return Image.open(frames[len(frames) // 2]).convert("RGB") if frames else None


def _card(att: dict[str, str] | None, picture: Image.Image | None, lines: list[str], correct: bool) -> Image.Image:
    if picture is not None:
        pic = picture.copy()
        pic.thumbnail(CARD)
        canvas = Image.new("RGB", CARD, (255, 255, 255))
        canvas.paste(pic, ((CARD[0] - pic.width) // 2, (CARD[1] - pic.height) // 2))
    elif att:
        canvas = attribute_card(att)
    else:
        canvas = Image.new("RGB", CARD, (230, 230, 230))
    card = frame(canvas, GREEN if correct else GREY, 5 if correct else 2)
    card = frame(card, (255, 255, 255), 5 - (5 if correct else 2) + 2)
    return add_caption(card, lines, size=11, width_chars=28)


def _compose(query: str, cards: list[Image.Image], footer: list[str]) -> Image.Image:
    f = font(14)
    head_h = 26
    w = sum(c.width for c in cards) + 8 * (len(cards) + 1)
    h = max(c.height for c in cards) + head_h + 8
    img = Image.new("RGB", (max(w, 300), h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((8, 5), f'query: "{query}"', fill=(0, 0, 0), font=f)
    x = 8
    for c in cards:
        img.paste(c, (x, head_h))
        x += c.width + 8
    return add_caption(img, footer, size=12)


def retrieval_figures(
    run: str | Path, out_dir: str | Path, n: int = 4, k: int = 5, device: str = "cpu"
) -> list[Figure]:
    """PNG files in ``out_dir``: for ``n`` test videos spread over the split, one of its captions as the
    query and the ``k`` best-ranked videos, the video the caption belongs to framed in green."""
    from .predict import Retriever  # noqa: PLC0415 (FAISS; only when pictures are asked for)

    r = Retriever.from_checkpoint(run, split="test", device=device)
    vids = r.video_ids
    if not vids or n <= 0:
        return []
    atts = load_attributes(getattr(r.cfg.data, "root", ""))
    folder = r.video_files()
    picks = list(dict.fromkeys(round(j * (len(vids) - 1) / max(1, n - 1)) for j in range(min(n, len(vids)))))
    queries, owners = [], []
    for j in picks:
        caps = r.store.captions(r.store.index[vids[j]])
        if caps:
            queries.append(caps[0])
            owners.append(vids[j])
    if not queries:
        return []
    ranked: Any = r.search(queries, k=len(vids))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drawn = _frame_of(folder, vids[0]) is None
    figures = []
    for q, (query, owner, hits) in enumerate(zip(queries, owners, ranked)):
        rank = next((i + 1 for i, (v, _) in enumerate(hits) if v == owner), None)
        cards = []
        for i, (v, score) in enumerate(hits[:k]):
            a = atts.get(v)
            desc = (
                f"{a.get('colour', '')} {a.get('object', '')}, {a.get('action', '')}, {a.get('scene', '')}" if a else ""
            )
            lines = [f"#{i + 1} {v}  {score:.3f}"] + ([desc] if desc else [])
            cards.append(_card(a, None if drawn else _frame_of(folder, v), lines, v == owner))
        where = f"rank {rank} of {len(vids)}" if rank else f"not among the {len(vids)} ranked"
        how = (
            "pictures drawn from each video's attributes (object, colour, action, scene): this collection stores "
            "features, not pixels"
            if drawn
            else "a frame of each video"
        )
        footer = [f"the caption's own video ({owner}, green frame): {where}"]
        pic = _compose(query, cards, footer)
        name = f"crosskd_query{q}_{owner}.png"
        pic.save(out / name)
        figures.append(
            Figure(
                name,
                f'text-to-video search for "{query}" (a caption of test video {owner}): the top {k} of '
                f"{len(vids)} test videos with their scores; the caption's own video is framed in green ({where}). "
                f"Shown: {how}.",
            )
        )
    return figures
