"""One-call CLIP-VG inference: an image and expressions -> one box per expression, in the image's pixels.

``groundkit predict clipvg IMAGE "text" [...] --checkpoint RUN_OR_CKPT [--out boxed.png]`` prints one
JSON line per expression and, with ``--out``, draws the boxes on the image. From Python::

    from groundkit.methods import get_method
    p = get_method("clipvg").predictor("runs/clipvg")
    p.ground(PIL.Image.open("photo.jpg"), ["the man on the left"])
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ...draw import draw_boxes as shared_draw_boxes
from ...errors import DataError
from ...formats.inspect import read_image
from ...text import check_expression
from ...transforms import letterbox
from .. import load_run
from ..base import Predictor
from .data import prepare_text
from .model import cells_inside

__all__ = ["ClipVGPredictor", "draw_boxes", "register"]

_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


class ClipVGPredictor(Predictor):
    """A trained CLIP-VG run (its best checkpoint) or checkpoint directory, ready to ground."""

    kind = "image_text"
    method = "clipvg"

    def __init__(self, run: str | Path, device: str = "cpu", **options: Any):
        _, self.cfg, self.model = load_run(run, device=device, method="clipvg")
        self.device = torch.device(device)

    @torch.no_grad()
    def ground(self, image: Any, texts: list[str]) -> list[dict[str, Any]]:
        """Per text ``{"text", "box": [x1, y1, x2, y2]}`` in the photo's pixels, with ``"score"`` when the model
        has a token head (``model.token_head`` / ``token_centre``): the token softmax's probability mass on the grid
        cells whose centre lies inside the box. The official model regresses one box and has no confidence: no
        score then."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise DataError("no expression given")
        texts = [check_expression(t) for t in texts]
        if isinstance(image, (str, Path)):
            image = read_image(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image).convert("RGB")
        elif isinstance(image, Image.Image):
            image = image.convert("RGB")
        d, m = self.cfg.data, self.model
        canvas, info = letterbox(image, d.imsize, fill=0.0)
        x = TF.to_dtype(TF.pil_to_tensor(canvas), torch.float32, scale=True)[None].to(self.device)
        mask = info.padding_mask(self.device)[None]
        ids, tmask = m.encoders.tokenize([prepare_text(t, d) for t in texts], m.max_query_len)
        n = len(texts)
        batch = {
            "image": x.expand(n, -1, -1, -1),
            "image_mask": mask.expand(n, -1, -1),
            "text_ids": ids.to(self.device),
            "text_mask": tmask.to(self.device),
        }
        out = m(batch)
        boxes = out.boxes.float().cpu()
        orig = info.to_original(boxes, fmt="cxcywh", normalized=True)
        results = [{"text": t, "box": [round(float(v), 2) for v in b]} for t, b in zip(texts, orig)]
        if out.token_logits is not None:
            for r, mass in zip(results, box_mass(out.token_logits.float().cpu(), boxes)):
                r["score"] = round(float(mass), 4)
        return results


def box_mass(token_logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``[B]`` probability mass of the grid tokens' softmax (``token_logits [B, g*g]``, padding at -inf) on the
    cells whose centre lies inside ``boxes [B, 4]`` (normalised cxcywh on the canvas)."""
    inside = cells_inside(boxes, math.isqrt(token_logits.shape[1]))
    return (token_logits.softmax(dim=1) * inside).sum(1)


def draw_boxes(image: Image.Image, results: list[dict[str, Any]], width: int = 3) -> Image.Image:
    """A copy of ``image`` with each result's box and text drawn."""
    boxes, texts = [r["box"] for r in results], [r["text"] for r in results]
    return shared_draw_boxes(image, boxes, list(_COLOURS), texts, width=width)


def register(sub: Any) -> None:
    p = sub.add_parser("clipvg", help="CLIP-VG: boxes for referring expressions in an image")
    p.add_argument("image", help="image file")
    p.add_argument("texts", nargs="+", help="one or more expressions")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or .safetensors")
    p.add_argument("--out", default=None, help="write the image with the boxes drawn here")
    p.add_argument("--device", default="cpu")

    def run(a: Any) -> int:
        for t in a.texts:  # before the model loads: a wrong input costs nothing
            check_expression(t)
        image = read_image(a.image)
        pred = ClipVGPredictor(a.checkpoint, device=a.device)
        results = pred.ground(image, list(a.texts))
        for r in results:
            print(json.dumps(r))
        if a.out:
            draw_boxes(image, results).save(a.out)
            print(f"wrote {a.out}", file=sys.stderr)  # stdout holds only the JSON lines
        return 0

    p.set_defaults(func=run)
