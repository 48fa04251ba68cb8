"""Reader of the Flickr30K Entities annotations (``Sentences/<id>.txt`` and ``Annotations/<id>.xml``).

Sentences mark each entity phrase as ``[/EN#<entity id>/<type>[/<type>...] words]``; the reader
returns the plain sentence and, per phrase, its first word index in that sentence, text, entity
id and type list (the fields of the release's own parser). Annotations are Pascal VOC-like XML: one
``<object>`` per box naming one or more entity ids, coordinates 1-based (returned 0-based, as the
release's parser does), and box-less objects flagged ``<nobndbox>`` / ``<scene>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["read_sentences", "parse_sentence", "read_annotations", "union_box", "read_split", "phrase_boxes"]


def parse_sentence(line: str, where: str = "<string>") -> dict[str, Any]:
    """One annotated sentence -> ``{"sentence", "phrases": [{first_word_index, phrase, phrase_id, phrase_type}]}``."""
    words: list[str] = []
    phrases: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for token in line.split():
        if current is not None and token.startswith("[/EN#"):
            raise DataError(
                f"{where}: phrase [/EN#{current['phrase_id']}/... is not closed with ']' before the next phrase {token!r}"
            )
        if current is None and token.startswith("[/EN#"):
            parts = token[1:].split("/")  # "", "EN#<id>", type, ...
            if len(parts) < 3 or not parts[1].startswith("EN#"):
                raise DataError(f"{where}: malformed phrase tag {token!r} (expected [/EN#<id>/<type> ...)")
            current = {"first_word_index": len(words), "phrase_id": parts[1][3:], "phrase_type": parts[2:], "words": []}
            continue
        if current is not None:
            closing = token.endswith("]")
            word = token[:-1] if closing else token
            if word:
                current["words"].append(word)
                words.append(word)
            if closing:
                phrases.append(
                    {
                        "first_word_index": current["first_word_index"],
                        "phrase": " ".join(current["words"]),
                        "phrase_id": current["phrase_id"],
                        "phrase_type": current["phrase_type"],
                    }
                )
                current = None
            continue
        words.append(token)
    if current is not None:
        raise DataError(f"{where}: phrase [/EN#{current['phrase_id']}/... is not closed with ']'")
    return {"sentence": " ".join(words), "phrases": phrases}


def read_sentences(path: str | Path) -> list[dict[str, Any]]:
    """All annotated sentences of ``Sentences/<id>.txt`` (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file of annotated sentences") from None
    if not text.strip():
        raise DataError(f"{path}: empty; expected one annotated sentence per line")
    return [parse_sentence(line, f"{path}:{i + 1}") for i, line in enumerate(text.split("\n")) if line.strip()]


def _int(el: ET.Element, tag: str, where: str) -> int:
    child = el.find(tag)
    if child is None or child.text is None:
        raise DataError(f"{where}: <{el.tag}> has no <{tag}>")
    try:
        return int(float(child.text.strip()))
    except ValueError:
        raise DataError(f"{where}: <{tag}> is {child.text!r}, expected a number") from None


def _flag(el: ET.Element, tag: str, where: str) -> bool:
    child = el.find(tag)
    if child is None or not child.text:
        return False
    try:
        return int(child.text.strip()) > 0
    except ValueError:
        raise DataError(f"{where}: <{tag}> is {child.text!r}, expected 0 or 1") from None


def read_annotations(path: str | Path) -> dict[str, Any]:
    """``Annotations/<id>.xml`` -> ``{"width", "height", "depth", "boxes": {id: [[x1,y1,x2,y2], ...]},
    "scene": [ids], "nobox": [ids]}``; boxes 0-based (the file's 1-based values minus one)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: no <size> element")
    out: dict[str, Any] = {"boxes": {}, "scene": [], "nobox": []}
    for tag in ("width", "height", "depth"):
        out[tag] = _int(size, tag, str(path))
    for obj in root.findall("object"):
        names = [n.text.strip() for n in obj.findall("name") if n.text]
        if not names:
            raise DataError(f"{path}: an <object> without <name>")
        bb = obj.find("bndbox")
        if bb is not None:
            box = [_int(bb, t, str(path)) - 1 for t in ("xmin", "ymin", "xmax", "ymax")]
            for n in names:
                out["boxes"].setdefault(n, []).append(box)
            continue
        nob = _flag(obj, "nobndbox", str(path))
        sc = _flag(obj, "scene", str(path))
        for n in names:
            if nob:
                out["nobox"].append(n)
            if sc:
                out["scene"].append(n)
    return out


def union_box(boxes: Iterable[Sequence[float]]) -> list[float]:
    """The enclosing box of several boxes (the weak-supervision convention for multi-box phrases)."""
    bs = [list(map(float, b)) for b in boxes]
    if not bs:
        raise DataError("union_box of no boxes")
    for b in bs:
        if len(b) != 4:
            raise DataError(f"union_box: box {b} does not have 4 coordinates")
    return [min(b[0] for b in bs), min(b[1] for b in bs), max(b[2] for b in bs), max(b[3] for b in bs)]


def phrase_boxes(sentences: list[dict[str, Any]], annotations: dict[str, Any]) -> list[list[list[float] | None]]:
    """Per sentence, per phrase, the union box of the phrase's entity (None: no box)."""
    out = []
    for s in sentences:
        row: list[list[float] | None] = []
        for p in s["phrases"]:
            bs = annotations["boxes"].get(p["phrase_id"])
            row.append(union_box(bs) if bs else None)
        out.append(row)
    return out


def read_split(path: str | Path) -> list[str]:
    """Image ids of ``train.txt`` / ``val.txt`` / ``test.txt``."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").split("\n") if ln.strip()]
