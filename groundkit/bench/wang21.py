"""``groundkit bench wang21``: training-step throughput on a Flickr30K-sized problem.

Synthesises random features of Flickr30K's shape in memory (30 proposals of 2048-d ResNet features,
546 detector logits with background, 5 captions x 16 phrases x 10 tokens of 300-d GloVe) and times
the full training step (batch building, forward, NCE + distillation, backward, Adam) of

* ``vectorised``: this package's dataset ``get_batch`` (tensor gathers, on the GPU when present)
  and the vectorised distillation neighbourhood;
* ``per-phrase loop (official)``: the official code's structure, measured in the same run: a Python loop over
  the batch's pairs building numpy arrays (GloVe looked up token by token, region/GT IoU per pair),
  and a Python loop over phrases for the distillation neighbourhood and teacher.

An epoch is 148,915 (image, sentence) pairs (29,783 images x 5 captions); seconds per epoch are
extrapolated from the measured steps. On the CPU only ``--pool-images`` distinct images are held in
memory (all 29,783 x 30 x 2048 float32 would take 7.3 GB) and pair indices wrap around the pool;
the per-step work is the same.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from ..boxes import box_iou
from ..methods.wang21 import METHOD, Wang21Config, Wang21Dataset, Wang21Method
from ..methods.wang21 import method as wang21_method
from ..methods.wang21.model import distill_neighbourhood, distill_neighbourhood_loop, teacher_scores
from .common import measure

FLICKR_PAIRS = 148_915
FLICKR_IMAGES = 29_783


class LoopNeighbourhoodMethod(Wang21Method):
    """The wang21 training step with the per-phrase loop of the distillation neighbourhood
    (:func:`~groundkit.methods.wang21.model.distill_neighbourhood_loop`, the official code's structure) in place
    of the vectorised one; same results. The benchmark's baseline only: the method itself has no such switch."""

    def training_step(self, model: Any, batch: dict[str, torch.Tensor], step: int, cfg: Wang21Config) -> tuple:
        vectorised = wang21_method.distill_neighbourhood
        wang21_method.distill_neighbourhood = distill_neighbourhood_loop
        try:
            return super().training_step(model, batch, step, cfg)
        finally:
            wang21_method.distill_neighbourhood = vectorised


# the swap above relies on the method's training step looking the function up by this name
assert "distill_neighbourhood" in Wang21Method.training_step.__code__.co_names, "wang21 training step changed"
LOOP_METHOD = LoopNeighbourhoodMethod()


def _cfg(k: int = 8):
    cfg = Wang21Config()
    cfg.data.norm_preset = ""
    cfg.data.max_phrases = 16
    cfg.loss.k = k
    cfg.loss.teacher_form = "prob_centered"
    return cfg


def synth_tensors(
    n_images: int,
    n_props: int = 30,
    dim: int = 2048,
    n_logits: int = 546,
    S: int = 5,
    P: int = 16,
    T: int = 10,
    E: int = 300,
    vocab: int = 5000,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random tensors with the dataset's layout (see ``Wang21Dataset.t``)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n_images, n_props, 2, generator=g) * 400
    wh = torch.rand(n_images, n_props, 2, generator=g) * 200 + 10
    n_phr = 2000
    tw = torch.zeros(n_phr + 1, n_logits)
    tw[torch.arange(1, n_phr + 1), torch.randint(1, n_logits, (n_phr,), generator=g)] = 1.0
    ntok = torch.randint(1, T + 1, (n_images, S, P), generator=g)
    token_mask = torch.arange(T)[None, None, None] < ntok[..., None]
    gt_xy = torch.rand(n_images, S, P, 2, generator=g) * 400
    return {
        "region_feats": torch.randn(n_images, n_props, dim, generator=g),
        "region_logits": torch.randn(n_images, n_props, n_logits, generator=g) * 2,
        "region_boxes": torch.cat([xy, xy + wh], -1),
        "region_valid": torch.ones(n_images, n_props, dtype=torch.bool),
        "token_ids": torch.randint(1, vocab + 1, (n_images, S, P, T), generator=g) * token_mask,
        "token_mask": token_mask,
        "phrase_ids": torch.randint(0, n_phr + 1, (n_images, S, P), generator=g),
        "train_valid": torch.ones(n_images, S, P, dtype=torch.bool),
        "eval_valid": torch.ones(n_images, S, P, dtype=torch.bool),
        "gt_boxes": torch.cat([gt_xy, gt_xy + 80], -1),
        "word_table": torch.cat([torch.zeros(1, E), torch.randn(vocab, E, generator=g)]),
        "teacher_w": tw,
    }


class _Runner:
    """Model, optimizer and a batch source; ``run(steps)`` does full training steps."""

    def __init__(self, pool: int, device: str, loop: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.dev = torch.device(device)
        self.cfg = _cfg()
        self.cfg.data.word_dim = 300
        t = synth_tensors(pool, seed=seed)
        self.model = METHOD.build_model(self.cfg).to(self.dev)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.loop = loop
        self.pool, self.S = pool, 5
        self.rng = np.random.default_rng(seed)
        if loop:
            # the official layout: per-image numpy arrays, token strings, a word -> vector dict
            self.feats = list(torch.cat([t["region_feats"], t["region_logits"], t["region_boxes"]], -1).numpy())
            words = np.array([""] + [f"w{i}" for i in range(t["word_table"].shape[0] - 1)], dtype=object)
            self.tokens = words[t["token_ids"].numpy()]
            self.glove = {w: v for w, v in zip(words[1:], t["word_table"][1:].numpy())}
            self.gt = t["gt_boxes"].numpy()
            self.phrase_ids = t["phrase_ids"].numpy()
            self.tw = t["teacher_w"].numpy()
        else:
            self.ds = Wang21Dataset.from_tensors(self.cfg, "train", t, 5).to(self.dev)

    def _loop_batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        D, L = 2048, 546
        rf, rl, rb, words, tmask, gtb, align, tw = [], [], [], [], [], [], [], []
        for ind in idx:
            im, s = divmod(int(ind), self.S)
            row = self.feats[im]
            rf.append(row[:, :D])
            rl.append(row[:, D : D + L])
            rb.append(row[:, -4:])
            w = np.zeros((16, 10, 300), np.float32)
            m = np.zeros((16, 10), bool)
            for p in range(16):
                for k in range(10):
                    tok = self.tokens[im, s, p, k]
                    if tok == "":
                        break
                    v = self.glove.get(tok)
                    if v is not None:
                        w[p, k], m[p, k] = v, True
            words.append(w)
            tmask.append(m)
            gtb.append(self.gt[im, s])
            align.append(box_iou(self.gt[im, s], row[:, -4:]) > 0.5)  # official alignment_gt per pair
            tw.append(self.tw[self.phrase_ids[im, s]])
        b = {
            "region_feats": np.stack(rf),
            "region_logits": np.stack(rl),
            "region_boxes": np.stack(rb),
            "words": np.stack(words),
            "token_mask": np.stack(tmask),
            "gt_boxes": np.stack(gtb),
            "teacher_w": np.stack(tw),
        }
        out = {k: torch.from_numpy(v).to(self.dev) for k, v in b.items()}
        B = len(idx)
        out["region_valid"] = torch.ones(B, 30, dtype=torch.bool, device=self.dev)
        out["train_valid"] = out["token_mask"][..., 0]
        out["image_index"] = torch.as_tensor(idx // self.S, device=self.dev)
        return out

    def step(self, idx: np.ndarray) -> float:
        if self.loop:
            batch = self._loop_batch(idx)
            loss, _ = LOOP_METHOD.training_step(self.model, batch, 2000, self.cfg)
        else:
            batch = self.ds.get_batch(torch.as_tensor(idx))
            loss, _ = METHOD.training_step(self.model, batch, 2000, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def data_step(self, idx: np.ndarray) -> float:
        """Batch building + distillation neighbourhood + teacher only (the parts that were vectorised)."""
        batch = self._loop_batch(idx) if self.loop else self.ds.get_batch(torch.as_tensor(idx))
        scores = torch.randn(len(idx), 16, 30, device=self.dev)
        fn = distill_neighbourhood_loop if self.loop else distill_neighbourhood
        nb = fn(scores, batch["region_boxes"], batch["region_valid"], 8)
        if self.loop:  # per-phrase teacher lookup, as the official structure
            probs = batch["region_logits"].float().softmax(-1)
            cls = batch["teacher_w"].argmax(-1)
            t = torch.stack(
                [torch.stack([probs[b, nb[b, p], cls[b, p]] for p in range(nb.shape[1])]) for b in range(nb.shape[0])]
            )
        else:
            t = teacher_scores(batch["region_logits"], batch["teacher_w"], nb)
        return float(t.sum())

    def run_data(self, steps: int, batch: int = 32) -> float:
        last = 0.0
        for _ in range(steps):
            last = self.data_step(self.rng.integers(0, self.pool * self.S, batch))
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return last

    def run(self, steps: int, batch: int = 32) -> float:
        last = 0.0
        for _ in range(steps):
            idx = self.rng.integers(0, self.pool * self.S, batch)
            last = self.step(idx)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return last


def register(sub: Any) -> None:
    p = sub.add_parser(
        "wang21", help="training-step throughput on a Flickr30K-sized problem (vectorised vs per-phrase loop)"
    )
    p.add_argument("--steps", type=int, default=200, help="timed training steps of the vectorised implementation")
    p.add_argument("--loop-steps", type=int, default=100, help="timed training steps of the loop baseline")
    p.add_argument(
        "--pool-images",
        type=int,
        default=0,
        help="distinct images in memory (default: all 29,783 on GPU, 2,000 on CPU)",
    )
    p.add_argument(
        "--data-steps",
        type=int,
        default=200,
        help="steps of the data-side-only comparison (batch + neighbourhood + teacher)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the benchmark processes")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")

    def run(a: argparse.Namespace) -> int:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
        pool = a.pool_images or (FLICKR_IMAGES if device.startswith("cuda") else 2000)
        res = _run_cli(a.steps, a.loop_steps, pool, device, a.threads, a.data_steps)
        print(format_result(res))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0

    p.set_defaults(func=run)


def _run_cli(
    steps: int, loop_steps: int, pool: int, device: str, threads: int | None, data_steps: int = 200
) -> dict[str, Any]:
    vec = measure(
        "vectorised", _steps_target_n, _setup_n, (pool, device, False, 5, steps), device=device, threads=threads
    )
    base = measure(
        "per-phrase loop (official)",
        _steps_target_n,
        _setup_n,
        (pool, device, True, 5, loop_steps),
        device=device,
        threads=threads,
    )
    res: dict[str, Any] = {
        "device": device,
        "threads": threads,
        "pool_images": pool,
        "batch": 32,
        "epoch_pairs": FLICKR_PAIRS,
    }
    for m, n in ((vec, steps), (base, loop_steps)):
        pps = n * 32 / m.seconds
        res[m.name] = {
            "steps": n,
            "seconds": round(m.seconds, 3),
            "pairs_per_s": round(pps, 1),
            "epoch_seconds_extrapolated": round(FLICKR_PAIRS / pps, 1),
            "peak_gb": round(m.peak_gb, 3),
        }
    res["speedup"] = round(res["vectorised"]["pairs_per_s"] / res["per-phrase loop (official)"]["pairs_per_s"], 2)
    # the vectorised parts alone: batch building + distillation neighbourhood + teacher
    dv = measure(
        "data: vectorised", _data_target, _setup_n, (pool, device, False, 0, data_steps), device=device, threads=threads
    )
    dl = measure(
        "data: per-phrase loop",
        _data_target,
        _setup_n,
        (pool, device, True, 0, data_steps),
        device=device,
        threads=threads,
    )
    res["data_only"] = {
        "steps": data_steps,
        "vectorised_ms_per_step": round(1000 * dv.seconds / data_steps, 2),
        "loop_ms_per_step": round(1000 * dl.seconds / data_steps, 2),
        "speedup": round(dl.seconds / dv.seconds, 1),
    }
    return res


def _data_target(runner: _Runner, steps: int) -> float:
    return runner.run_data(steps)


def _setup_n(pool: int, device: str, loop: bool, warmup: int, steps: int) -> tuple:
    r = _Runner(pool, device, loop)
    r.run(warmup)
    return (r, steps)


def _steps_target_n(runner: _Runner, steps: int) -> float:
    return runner.run(steps)


def format_result(res: dict[str, Any]) -> str:
    lines = [
        f"wang21 training step, batch 32, device {res['device']}, {res['pool_images']} distinct images in memory",
        f"{'implementation':<28} {'steps':>6} {'seconds':>9} {'pairs/s':>9} {'s/epoch (extrap.)':>18}",
    ]
    for name in ("vectorised", "per-phrase loop (official)"):
        r = res[name]
        lines.append(
            f"{name:<28} {r['steps']:>6} {r['seconds']:>9.2f} {r['pairs_per_s']:>9.1f} {r['epoch_seconds_extrapolated']:>18.0f}"
        )
    lines.append(f"speed-up (pairs/s, vectorised / loop): {res['speedup']:.2f}x; epoch = {res['epoch_pairs']:,} pairs")
    d = res.get("data_only")
    if d:
        lines.append(
            f"batch building + distillation neighbourhood + teacher only ({d['steps']} steps): "
            f"vectorised {d['vectorised_ms_per_step']:.2f} ms/step, "
            f"per-phrase loop {d['loop_ms_per_step']:.2f} ms/step ({d['speedup']:.1f}x)"
        )
    return "\n".join(lines)
