"""Helpers of the `groundkit serve` tests: a small real image-grounding method, tiny runs, a server.

``salient`` is a real :class:`~groundkit.methods.base.Method` with a real ``image_text`` Predictor:
its model holds per-channel weights (saved in a real checkpoint), and it answers the bounding box of
the largest connected region whose colour stands out from the image's median colour (numpy/scipy,
deterministic). An expression containing ``SALIENT-FAIL`` makes it raise, to test the 500 path.

Run as a script, this module registers ``salient`` and runs ``groundkit`` with the given arguments
(the load and browser tests start ``groundkit serve`` this way, in a real uvicorn process).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from groundkit.checkpoint import save_checkpoint
from groundkit.config import ExperimentConfig, to_dict
from groundkit.methods.base import Method, Predictor

ROOT = Path(__file__).resolve().parents[1]
FAIL_WORD = "SALIENT-FAIL"


@dataclass
class SalientModel:
    max_side: int = 128  # the saliency map is computed at most this many pixels on a side
    sigma: float = 1.0  # a pixel is salient above mean + sigma * std of the colour distance


@dataclass
class SalientConfig(ExperimentConfig):
    model: SalientModel = field(default_factory=SalientModel)


class SalientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.channel_weights = nn.Parameter(torch.ones(3))


def salient_box(
    image: Image.Image, weights: np.ndarray, max_side: int = 128, sigma: float = 1.0
) -> tuple[list[float], float]:
    """``([x1, y1, x2, y2] in the image's pixels, fraction of the image it covers)``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = arr.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    small = arr[::step, ::step]
    dist = np.sqrt((((small - np.median(small.reshape(-1, 3), axis=0)) ** 2) * weights).sum(-1))
    mask = dist > dist.mean() + sigma * dist.std()
    if not mask.any():
        return [0.0, 0.0, float(w), float(h)], 1.0
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    box = [
        float(xs.min() * step),
        float(ys.min() * step),
        float(min(w, (xs.max() + 1) * step)),
        float(min(h, (ys.max() + 1) * step)),
    ]
    return box, float(sizes.max() / mask.size)


class SalientPredictor(Predictor):
    kind = "image_text"
    method = "salient"

    def __init__(self, run, device="cpu"):
        from groundkit.methods import load_run

        _, self.cfg, model = load_run(run, device=device)
        self.weights = model.channel_weights.detach().cpu().numpy()

    def ground(self, image, texts):
        if any(FAIL_WORD in t for t in texts):
            raise RuntimeError("salient was asked to fail")
        box, frac = salient_box(image, self.weights, self.cfg.model.max_side, self.cfg.model.sigma)
        return [{"text": t, "box": list(box), "score": frac} for t in texts]


class SalientMethod(Method):
    name = "salient"
    config_class = SalientConfig
    summary = "test method: the box of the largest salient region"

    def build_model(self, cfg):
        return SalientNet()

    def build_dataset(self, cfg, split):
        return None

    def training_step(self, model, batch, step, cfg):
        raise NotImplementedError

    def predictor(self, run, device="cpu", **options):
        return SalientPredictor(run, device)


METHOD = SalientMethod()


def register(monkeypatch=None) -> None:
    """Add ``salient`` to the registry (through ``monkeypatch`` in a test, for good in a script)."""
    from groundkit import methods

    if monkeypatch is not None:
        monkeypatch.setitem(methods.METHODS, "salient", "serve_helpers")
    else:
        methods.METHODS["salient"] = "serve_helpers"


def make_salient_run(path: Path) -> Path:
    """A run directory with a real checkpoint of the salient method."""
    cfg = SalientConfig()
    save_checkpoint(path / "checkpoints" / "best", SalientNet(), meta={"method": "salient", "config": to_dict(cfg)})
    return path


def square_image(w: int = 200, h: int = 150, box=(40, 30, 120, 90), colour=(220, 30, 30)) -> Image.Image:
    """A grey image with one coloured rectangle: its salient box is exactly ``box``."""
    arr = np.full((h, w, 3), 128, np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = colour
    return Image.fromarray(arr)


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def china_jpg() -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"


# ----------------------------------------------------------------------------- crosskd tiny run

TINY_SET = [
    "train.epochs=4",
    "train.batch_size=16",
    "train.eval_every=4",
    "train.tensorboard=false",
    "train.progress=false",
    "optim.name=adam",
    "optim.lr=0.01",
    "model.shared_dim=64",
    "sched.step_size=10",
]


def crosskd_run(base: Path) -> tuple[Path, Path]:
    """(world, run): the tiny retrieval world and a crosskd CE+ run trained on it for a few steps;
    made once under ``base`` (the session's pytest base temp) and reused by every serve test module."""
    from groundkit.cli import main
    from groundkit.world.retrieval import build

    root = base / "serve_crosskd"
    world, run = root / "world", root / "run"
    if (root / "done").is_file():
        return world, run
    torch.set_num_threads(1)
    build(world, "tiny", seed=0)
    args = [
        "train",
        "crosskd",
        "synth_cecap",
        "--output-dir",
        str(run),
        "--set",
        f"data.root={world}",
        "world.size=",
        *TINY_SET,
    ]
    assert main(args) == 0
    (root / "done").write_text("ok")
    return world, run


# ----------------------------------------------------------------------------- a real server process


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@contextmanager
def serve_process(args: list[str], timeout: float = 90.0):
    """``groundkit serve --port 0 ARGS`` in a child process (with ``salient`` registered); yields
    ``(base URL, Popen)`` once /healthz answers, and stops the process at the end."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(Path(__file__)), "serve", "--port", "0", "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + timeout
        while url is None:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"groundkit serve exited ({proc.wait()}):\n" + "".join(lines))
            lines.append(line)
            m = re.search(r"listening on (http://\S+?)/? ", line)
            if m:
                url = m.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("groundkit serve did not start in time:\n" + "".join(lines))
        import threading

        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
        import httpx

        while True:
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("groundkit serve does not answer /healthz:\n" + "".join(lines))
            time.sleep(0.1)
        proc.log = lines  # type: ignore[attr-defined]
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    register()
    from groundkit.cli import main

    sys.exit(main(sys.argv[1:]))
