"""``groundkit bench clipvg``: training images/s and test frames/s, official-like path vs this package's.

Both paths run the same architecture (default: CLIP ViT-B/16 towers with random weights, which is
enough for timing, and the 6-layer fusion transformer) on random 224 x 224 images and expressions:

* ``official-like``: fp32 encoders run at every training step with CLIP's visual positional
  embedding trainable, as in the official code (so the backward pass runs through the whole image
  ViT and nothing can be cached; ``--no-pos-embed-quirk`` drops that), the fusion attention
  computed explicitly (softmax of the scaled products), fp32 throughout;
* ``groundkit``: training from cached encoder outputs (the encoders run once per image per run,
  not once per step; that one-off cost is reported as its own images/s), SDPA attention, bf16
  autocast where the device supports it (CUDA), optional ``--compile`` (torch.compile). Test
  frames/s always include the encoders (a new image must be encoded), in bf16 on CUDA.

One run prints both and the ratios. The timings are steady-state (after ``--warmup`` steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import torch

from ..methods.clipvg.config import ClipVGModel
from ..methods.clipvg.model import ClipVG, build_encoders, clipvg_loss

__all__ = ["run_bench", "register"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, on: bool):
    if on and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _time(fn: Any, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def _model(
    a: argparse.Namespace, device: torch.device, sdpa: bool, enc_dtype: torch.dtype, quirk: bool = False
) -> ClipVG:
    torch.manual_seed(0)
    enc = build_encoders(
        a.encoder,
        clip_name=a.clip_name,
        image_size=a.imsize,
        grid=a.grid,
        pretrained=False,
        trainable_pos_embed=quirk and a.encoder == "clip",
    )
    cfg = ClipVGModel(d_model=a.d_model, num_layers=a.layers, dim_ff=4 * a.d_model, sdpa=sdpa)
    return ClipVG(cfg, enc, a.max_query_len, enc_dtype).to(device)


def run_bench(a: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the official-like path is true fp32
    B, S = a.batch_size, a.imsize
    g = torch.Generator().manual_seed(0)
    images = torch.rand(B, 3, S, S, generator=g).to(device)
    image_mask = torch.zeros(B, S, S, dtype=torch.bool, device=device)
    image_mask[:, int(0.8 * S) :] = True
    texts = [f"the {c} thing on the {s}" for c, s in zip(["red", "blue", "small", "big"] * B, ["left", "right"] * B)][
        :B
    ]
    target = torch.tensor([[0.5, 0.5, 0.2, 0.3]], device=device).expand(B, 4)
    out: dict[str, Any] = {"device": str(device), "encoder": a.encoder, "clip_name": a.clip_name, "batch_size": B}
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    # ---- official-like
    off = _model(a, device, sdpa=False, enc_dtype=torch.float32, quirk=not a.no_pos_embed_quirk).train()
    ids, tmask = off.encoders.tokenize(texts, a.max_query_len)
    ids, tmask = ids.to(device), tmask.to(device)
    raw = {"image": images, "image_mask": image_mask, "text_ids": ids, "text_mask": tmask}
    opt = torch.optim.AdamW([p for p in off.parameters() if p.requires_grad], lr=1e-4)

    def off_train() -> None:
        loss, _ = clipvg_loss(off(raw).boxes, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = _time(off_train, a.steps, a.warmup, device)
    out["official_train_img_s"] = B * a.steps / t
    off.eval()
    with torch.no_grad():
        t = _time(lambda: off(raw), a.steps, a.warmup, device)
    out["official_test_fps"] = B * a.steps / t
    off.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- groundkit
    ours = _model(a, device, sdpa=True, enc_dtype=torch.bfloat16 if bf16 else torch.float32)
    with torch.no_grad(), _autocast(device, bf16):
        t = _time(lambda: ours.encode(images, image_mask, ids, tmask), a.steps, a.warmup, device)
        img_f, txt_f = ours.encode(images, image_mask, ids, tmask)
    out["groundkit_cache_build_img_s"] = B * a.steps / t
    cached = {
        "image_feats": img_f.to(torch.float16),
        "text_feats": txt_f.to(torch.float16),
        "image_mask": image_mask,
        "text_mask": tmask,
    }
    fwd = torch.compile(ours) if a.compile else ours
    ours.train()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda")

    def ours_train() -> None:
        with _autocast(device, bf16):
            loss, _ = clipvg_loss(fwd(cached).boxes, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = _time(ours_train, a.steps, a.warmup + (2 if a.compile else 0), device)
    out["groundkit_train_img_s"] = B * a.steps / t
    ours.eval()
    with torch.no_grad(), _autocast(device, bf16):
        t = _time(lambda: fwd(raw), a.steps, a.warmup + (2 if a.compile else 0), device)
    out["groundkit_test_fps"] = B * a.steps / t
    out["train_ratio"] = out["groundkit_train_img_s"] / out["official_train_img_s"]
    out["test_ratio"] = out["groundkit_test_fps"] / out["official_test_fps"]
    out["bf16"], out["compile"] = bf16, bool(a.compile)
    return out


def _print(r: dict[str, Any]) -> None:
    print(
        f"CLIP-VG benchmark on {r['device']} ({r['encoder']} {r['clip_name'] if r['encoder'] == 'clip' else ''}, "
        f"batch {r['batch_size']}, bf16 {'on' if r['bf16'] else 'off'}, compile {'on' if r['compile'] else 'off'})"
    )
    print(f"{'path':<16}{'train img/s':>14}{'test FPS':>12}")
    print(f"{'official-like':<16}{r['official_train_img_s']:>14.3g}{r['official_test_fps']:>12.3g}")
    print(f"{'groundkit':<16}{r['groundkit_train_img_s']:>14.3g}{r['groundkit_test_fps']:>12.3g}")
    print(f"{'ratio':<16}{r['train_ratio']:>13.2f}x{r['test_ratio']:>11.2f}x")
    print(f"groundkit one-off feature caching: {r['groundkit_cache_build_img_s']:.3g} img/s (once per image and run)")
    if not r["device"].startswith("cuda"):
        print("measured on the CPU; GPU throughput is not measured by this run")


def register(sub: Any) -> None:
    p = sub.add_parser("clipvg", help="CLIP-VG training img/s and test FPS: official-like vs groundkit")
    p.add_argument("--encoder", choices=["clip", "effnet_minilm"], default="clip")
    p.add_argument("--clip-name", default="ViT-B-16")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 4 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 2 on the CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--imsize", type=int, default=224)
    p.add_argument("--grid", type=int, default=14, help="effnet_minilm image grid")
    p.add_argument("--max-query-len", type=int, default=40)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="torch.compile the groundkit path")
    p.add_argument(
        "--no-pos-embed-quirk",
        action="store_true",
        help="official-like path without the trainable CLIP positional embedding (no backward through the ViT)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", default=None, help="also write the figures here")

    def run(a: argparse.Namespace) -> int:
        cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
        a.batch_size = a.batch_size or (64 if cuda else 4)
        a.steps = a.steps or (20 if cuda else 2)
        r = run_bench(a)
        _print(r)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(r, f, indent=1)
        return 0

    p.set_defaults(func=run)
