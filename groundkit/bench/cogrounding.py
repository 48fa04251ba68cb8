"""``groundkit bench cogrounding``: video test throughput, window by window (official) vs per-video feature reuse.

Both paths run in the same process on the same frames and the same model (eval mode, official
sizes by default: 256 px, D = 512, 5-frame windows); the boxes they return are checked to be
equal (bf16: to a tolerance). Prints frames/s of each and the ratio.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from ..methods.cogrounding.config import CoGroundingConfig
from ..methods.cogrounding.inference import ground_video, ground_video_windowed
from ..methods.cogrounding.method import build_model

__all__ = ["run_bench", "register"]


def _model(size: int, dim: int, backbone: str, co_attention: bool) -> Any:
    cfg = CoGroundingConfig()
    cfg.data.image_size, cfg.model.dim, cfg.model.backbone = size, dim, backbone
    cfg.model.pretrained = False  # speed does not depend on the weights
    cfg.model.co_attention = co_attention
    cfg.model.vocab_size = 2000
    return build_model(cfg).eval()


def _time(fn: Any, repeats: int, sync: Any) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def run_bench(
    size: int = 256,
    frames: int = 32,
    videos: int = 1,
    window: int = 5,
    dim: int = 512,
    batch: int = 64,
    device: str = "cpu",
    bf16: bool = False,
    backbone: str = "efficientnet_lite0",
    repeats: int = 2,
    threads: int = 0,
) -> dict[str, Any]:
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = _model(size, dim, backbone, True).to(dev)
    clips = [torch.rand(frames, 3, size, size, device=dev) for _ in range(videos)]
    ids = torch.tensor([3, 40, 500, 7, 2] + [0] * 15, device=dev)
    mask = ids != 0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else torch.no_grad
    res: dict[str, Any] = {}
    outs = {}
    for name, fn in (("window_by_window", ground_video_windowed), ("feature_reuse", ground_video)):

        def go(fn=fn, name=name):
            with torch.no_grad(), ctx():
                outs[name] = [fn(model, c, ids, mask, window=window, batch=batch)["box"] for c in clips]

        go()  # warm-up
        sec = _time(go, repeats, sync)
        res[name] = {"seconds": round(sec, 4), "frames_per_s": round(videos * frames / sec, 2)}
    tol = 1e-3 if not bf16 else 2.0
    diff = max(
        float((a.float() - b.float()).abs().max()) for a, b in zip(outs["window_by_window"], outs["feature_reuse"])
    )
    res["max_box_difference_px"] = round(diff, 5)
    res["same_boxes"] = diff <= tol
    res["ratio"] = round(res["feature_reuse"]["frames_per_s"] / res["window_by_window"]["frames_per_s"], 2)
    res["setting"] = {
        "size": size,
        "frames_per_video": frames,
        "videos": videos,
        "window": window,
        "dim": dim,
        "batch": batch,
        "device": str(dev),
        "bf16": bf16,
        "backbone": backbone,
        "threads": torch.get_num_threads(),
    }
    return res


def register(sub: Any) -> None:
    p = sub.add_parser("cogrounding", help="co-grounding video test speed: window by window vs per-video feature reuse")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=32, help="frames per video")
    p.add_argument("--videos", type=int, default=1)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="frames per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "darknet53"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(a: Any) -> int:
        r = run_bench(
            a.size, a.frames, a.videos, a.window, a.dim, a.batch, a.device, a.bf16, a.backbone, a.repeats, a.threads
        )
        if a.json:
            print(json.dumps(r))
            return 0
        s = r["setting"]
        print(
            f"cogrounding video test, {s['videos']} x {s['frames_per_video']} frames at {s['size']}x{s['size']}, "
            f"window {s['window']}, D {s['dim']}, {s['backbone']}, {s['device']}{' bf16' if s['bf16'] else ''}, "
            f"{s['threads']} threads"
        )
        for k in ("window_by_window", "feature_reuse"):
            print(f"  {k:17s} {r[k]['frames_per_s']:9.2f} frames/s  ({r[k]['seconds']:.3f} s)")
        print(
            f"  ratio {r['ratio']:.2f}x; same boxes: {r['same_boxes']} (max difference {r['max_box_difference_px']} px)"
        )
        return 0

    p.set_defaults(func=run)
