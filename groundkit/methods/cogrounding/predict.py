"""One-call inference with a trained co-grounding run: an image and expressions, or a video and one expression.

``groundkit predict refexp IMAGE "the man on the left" --checkpoint RUN --out boxed.png`` and
``groundkit predict refexp FRAMES_DIR_OR_VIDEO "the red car moving left" --checkpoint RUN --out OUT_DIR``.
Bad input (an unreadable or non-image file, an empty expression, a video with no frames) is one
:class:`~groundkit.errors.DataError` line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...draw import draw_boxes
from ...errors import DataError
from ...text import check_expression
from .. import load_run
from ..base import Predictor
from .data import letterbox, read_image, to_tensor
from .inference import ground_video, temporal_rescore
from .model import decode_boxes
from .text import build_tokenizer

__all__ = ["CoGroundingPredictor", "load_frames", "draw_box", "register"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def _as_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"image array must be [H, W, 3], got shape {list(image.shape)}")
        return Image.fromarray(image.astype(np.uint8), "RGB")
    return read_image(image)


def load_frames(source: str | Path) -> list[Image.Image]:
    """Frames of a video: a folder of images (sorted by name) or a video file (mp4, avi, webm, ... decoded with
    PyAV, all frames of the first video stream in order)."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{p}: the folder holds no frames ({', '.join(IMAGE_SUFFIXES)})")
        return [read_image(f) for f in files]
    if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        return read_video_frames(p)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    raise DataError(f"{p}: not a folder of frames or a video file ({', '.join(VIDEO_SUFFIXES)})")


def read_video_frames(path: Path) -> list[Image.Image]:
    """Every frame of the first video stream of ``path`` as RGB images (PyAV); one line naming the file when it
    cannot be read."""
    import av  # noqa: PLC0415 (a dependency; loaded only for video files)

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: holds no video stream")
            frames = [f.to_image() for f in container.decode(video=0)]
    except DataError:
        raise
    except Exception as e:  # an unreadable or truncated container, an unknown codec
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise DataError(
            f"{path}: cannot decode the video ({type(e).__name__}: {first}); give a folder of frames"
        ) from None
    if not frames:
        raise DataError(f"{path}: the video has no frames")
    return [f.convert("RGB") for f in frames]


def draw_box(image: Image.Image, box: Sequence[float], label: str = "") -> Image.Image:
    """A copy of ``image`` with ``box`` (and ``label`` on it) in red."""
    return draw_boxes(image, [box], (255, 40, 40), [label] if label else None)


class CoGroundingPredictor(Predictor):
    """A trained run, ready to ground expressions in images (``ground``) and videos (``ground_video``)."""

    kind = "image_text"
    kinds = ("image_text", "video_text")
    method = "cogrounding"

    def __init__(self, run: str | Path, device: str = "cpu", post_process: bool = True):
        _, self.cfg, self.model = load_run(run, device=device, method="cogrounding")
        self.device = torch.device(device)
        self.tok = build_tokenizer(self.cfg.model)
        self.size = self.cfg.data.image_size
        self.post_process = post_process

    @torch.no_grad()
    def ground(self, image: Any, texts: list[str]) -> list[dict[str, Any]]:
        """Per text ``{"text", "box": [x1, y1, x2, y2], "score"}`` in the image's pixels."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise DataError("no expression given")
        texts = [check_expression(t) for t in texts]
        img = _as_image(image)
        lb_img, lb = letterbox(img, self.size)
        x = to_tensor(lb_img).unsqueeze(0).to(self.device)
        enc = [self.tok.encode(t) for t in texts]
        ids = torch.stack([e[0] for e in enc]).to(self.device)
        mask = torch.stack([e[1] for e in enc]).to(self.device)
        v = self.model.encode_frames(x)
        out = self.model.ground([f.expand(len(texts), -1, -1, -1) for f in v], self.model.encode_text(ids, mask))
        boxes = decode_boxes(self.model, out["pred"]).cpu()
        best = out["conf"].argmax(1).cpu()
        res = []
        for i, t in enumerate(texts):
            res.append(
                {
                    "text": t,
                    "box": [round(float(c), 2) for c in lb.to_original(boxes[i, best[i]])],
                    "score": float(out["conf"][i, best[i]]),
                }
            )
        return res

    @torch.no_grad()
    def ground_video(self, frames: list[Any], text: str) -> dict[str, Any]:
        """``{"text", "boxes": [[x1, y1, x2, y2] per frame], "scores": [...]}`` (post-processed when enabled)."""
        text = check_expression(text)
        if not frames:
            raise DataError("the video has no frames")
        imgs = [_as_image(f) for f in frames]
        lbs, xs = [], []
        for im in imgs:
            li, lb = letterbox(im, self.size)
            lbs.append(lb)
            xs.append(to_tensor(li))
        ids, mask = self.tok.encode(text)
        window = self.cfg.eval.window if self.model.co_attention else 1
        post = self.post_process and self.cfg.post.top_k > 0
        r = ground_video(
            self.model,
            torch.stack(xs).to(self.device),
            ids.to(self.device),
            mask.to(self.device),
            window=window,
            batch=self.cfg.eval.batch_frames,
            top_k=self.cfg.post.top_k if post else 0,
        )
        boxes, scores = r["box"].cpu(), r["score"].cpu()
        if post and len(imgs) > 1:
            choice = temporal_rescore(
                r["cand_feat"], r["cand_score"], self.cfg.post.window, self.cfg.post.renormalize
            ).cpu()
            t = torch.arange(len(imgs))
            boxes, scores = r["cand_box"].cpu()[t, choice], r["cand_score"].cpu()[t, choice]
        return {
            "text": text,
            "boxes": [[round(float(c), 2) for c in lb.to_original(b)] for lb, b in zip(lbs, boxes)],
            "scores": [float(s) for s in scores],
        }


def register(sub: Any) -> None:
    """``groundkit predict refexp SOURCE TEXT --checkpoint RUN [--out PATH]``."""
    p = sub.add_parser(
        "refexp", help="ground a referring expression in an image, a folder of frames or a video (cogrounding)"
    )
    p.add_argument("source", help="image file, folder of frames, or video file")
    p.add_argument("text", help="the referring expression")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint of a cogrounding training")
    p.add_argument("--out", default=None, help="image: boxed image file; video: folder for the annotated frames")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-post-process", action="store_true", help="video: skip the temporal re-scoring")

    def run(a: Any) -> int:
        for t in [a.text] if isinstance(a.text, str) else a.text:  # before the model loads
            check_expression(t)
        pred = CoGroundingPredictor(a.checkpoint, device=a.device, post_process=not a.no_post_process)
        src = Path(a.source)
        if src.is_dir() or src.suffix.lower() in VIDEO_SUFFIXES:
            frames = load_frames(src)
            res = pred.ground_video(frames, a.text)
            if a.out:
                out = Path(a.out)
                out.mkdir(parents=True, exist_ok=True)
                for i, (f, b) in enumerate(zip(frames, res["boxes"])):
                    draw_box(f, b, a.text if i == 0 else "").save(out / f"{i:06d}.png")
                res["out"] = str(out)
        else:
            img = read_image(src)
            (res,) = pred.ground(img, [a.text])
            if a.out:
                draw_box(img, res["box"], a.text).save(a.out)
                res["out"] = a.out
        print(json.dumps(res))
        return 0

    p.set_defaults(func=run)
