"""``groundkit bench crosskd``: CENet training throughput, and full test evaluation at MSR-VTT full-test size.

Evaluation = token features on disk -> caption and video embeddings -> similarity matrix -> t2v
and v2t metrics, for ``--videos`` x ``--captions`` queries (default 2,990 x 20, the MSR-VTT full
test) with MSR-VTT data shapes (7 experts of the released dims, audio/speech variable length,
GPT-2-XL 1600-d tokens, up to 37 per caption). Two implementations, each in a fresh process with
the same model weights:

* ``groundkit``: fp16 memory-mapped store, captions encoded in mini-batches, similarities in query
  chunks (never ``[queries, videos, experts]``), :mod:`groundkit.metrics`;
* ``reference approach`` (a baseline measured in the same run, kept here only as a reference
  point): the Collaborative Experts evaluation path: features held as loaded pickles, a float64
  ``[videos, captions, max_tokens, text_dim]`` text array (28 GB at full size) and float64 expert
  arrays, float32 copies of them, text embeddings of every query kept, the ``[queries, videos,
  experts]`` mixture-of-experts weight tensor, and the reference metric approach
  (:func:`groundkit.bench.metrics.run_baseline`).

The baseline cannot run at full size on a 24 GiB machine; it runs at ``--baseline-videos`` (and
groundkit at that size too, for a like-for-like ratio); its full-size memory is given by the sizes
of its arrays (arithmetic, printed as such). The model is CENet with the MSR-VTT expert dims and,
by default, a reduced text side (``--text-clusters 4 --shared-dim 256``) so that the model's own
FLOPs, identical in both implementations, do not hide the rest on a CPU; ``--full-model`` uses 28
clusters and 768 dims.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...bench.common import Measurement, measure, print_table
from ...bench.metrics import run_baseline as baseline_metrics
from ...config import load_config
from ...metrics import t2v_metrics, v2t_metrics
from ...world import resolve_world
from .config import CrossKDConfig
from .data import BatchSpec, RetrievalEvalSet
from .method import METHOD, similarity_matrix
from .model import CENet, CENetConfig
from .store import ExpertStore, StoreWriter

MSRVTT_VIDEOS, MSRVTT_CAPTIONS = 2990, 20
EXPERT_DIMS = {
    "audio": 128,
    "imagenet.resnext101_32x48d.0": 2048,
    "imagenet.senet154.0": 2048,
    "r2p1d.r2p1d-ig65m-kinetics.0": 512,
    "r2p1d.r2p1d-ig65m.0": 512,
    "scene.densenet161.0": 2208,
    "speech": 300,
}
MAX_TOKENS = {"text": 37, "audio": 29, "speech": 32}


def _model(text_dim: int, clusters: int, shared: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = CENet(
        CENetConfig(
            expert_dims=dict(EXPERT_DIMS),
            vlad_clusters={"text": clusters, "audio": 8, "speech": 19},
            ghost_clusters=1,
            text_dim=text_dim,
            shared_dim=shared,
        )
    )
    return m.eval()


def _features(videos: int, captions: int, text_dim: int, seed: int) -> tuple[list[str], dict, dict]:
    """Random features shaped like the released MSR-VTT pickles: experts {name: {vid: arr | nan}}, text {vid: [arr]}."""
    rng = np.random.default_rng(seed)
    ids = [f"video{i}" for i in range(videos)]
    experts: dict[str, dict[str, Any]] = {}
    for m, d in EXPERT_DIMS.items():
        e = {}
        for v in ids:
            if m in ("audio", "speech"):
                e[v] = (
                    float("nan")
                    if rng.random() < 0.1
                    else rng.standard_normal((int(rng.integers(2, 40)), d), dtype=np.float32)
                )
            else:
                e[v] = rng.standard_normal(d, dtype=np.float32)
        experts[m] = e
    text = {
        v: [
            rng.standard_normal((int(rng.integers(6, 20)), text_dim), dtype=np.float32)
            for _ in range(captions - (1 if i < 6 else 0))
        ]
        for i, v in enumerate(ids)
    }
    return ids, experts, text


# ----------------------------------------------------------------------------- groundkit path


def setup_groundkit(
    videos: int, captions: int, text_dim: int, clusters: int, shared: int, seed: int, workdir: str
) -> tuple:
    ids, experts, text = _features(videos, captions, text_dim, seed)
    w = StoreWriter(Path(workdir) / f"store-{videos}", ids)
    for m, e in experts.items():
        w.add_expert(m, {v: (None if isinstance(x, float) else x) for v, x in e.items()}, EXPERT_DIMS[m])
    w.add_text("gpt2-xl-finetune", text, text_dim)
    w.add_split("test", ids)
    w.close()
    del experts, text
    store = ExpertStore(w.root)
    spec = BatchSpec(experts=sorted(EXPERT_DIMS), text="gpt2-xl-finetune", max_tokens=dict(MAX_TOKENS), teachers=[])
    ds = RetrievalEvalSet(store, ids, spec, num_test_captions=captions)
    return _model(text_dim, clusters, shared, seed), ds


def run_groundkit(model: torch.nn.Module, ds: Any, device: str = "cpu") -> dict[str, Any]:
    dev = torch.device(device)
    model = model.to(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        sims = similarity_matrix(model, ds, dev, batch_size=256)
    t1 = time.perf_counter()
    t2v, v2t = t2v_metrics(sims, ds.query_masks), v2t_metrics(sims, ds.query_masks)
    return {"t2v": t2v, "v2t": v2t, "sims_s": t1 - t0, "metrics_s": time.perf_counter() - t1}


# ----------------------------------------------------------------------------- reference approach


def setup_baseline(videos: int, captions: int, text_dim: int, clusters: int, shared: int, seed: int) -> tuple:
    ids, experts, text = _features(videos, captions, text_dim, seed)
    return _model(text_dim, clusters, shared, seed), ids, experts, text, captions


def run_baseline(model: torch.nn.Module, ids: list[str], experts: dict, text: dict, captions: int) -> dict[str, Any]:
    """The reference's evaluation path (see the module docstring)."""
    t0 = time.perf_counter()
    V, T, D = len(ids), MAX_TOKENS["text"], next(iter(text.values()))[0].shape[-1]
    text_retrieval = np.zeros((V, captions, T, D))  # float64, as the reference
    query_masks = np.zeros((V, captions))
    for i, v in enumerate(ids):
        for j, c in enumerate(text[v][:captions]):
            n = min(len(c), T)
            text_retrieval[i, j, :n] = c[:n]
            query_masks[i, j] = 1
    feats, ind = {}, {}
    for m, e in experts.items():
        if m in MAX_TOKENS:
            arr = np.zeros((V, MAX_TOKENS[m], EXPERT_DIMS[m]))
        else:
            arr = np.zeros((V, EXPERT_DIMS[m]))
        avail = np.zeros(V)
        for i, v in enumerate(ids):
            x = e[v]
            if isinstance(x, float) and math.isnan(x):
                continue
            if m in MAX_TOKENS:
                n = min(len(x), MAX_TOKENS[m])
                arr[i, :n] = x[:n]
            else:
                arr[i] = x
            avail[i] = 1
        feats[m], ind[m] = torch.from_numpy(arr).float(), torch.from_numpy(avail)
    text_t = torch.from_numpy(text_retrieval).float().view(V * captions, T, D)
    with torch.no_grad():
        a = torch.stack([ind[m] for m in model.experts], 1).float()
        vid = model.encode_video(feats, a)
        ts, ws = [], []
        for s in range(0, V * captions, 256):
            t, w = model.encode_text(text_t[s : s + 256])
            ts.append(t)
            ws.append(w)
        t, w = torch.cat(ts), torch.cat(ws)
        moe = w.unsqueeze(1) * a.unsqueeze(0)  # [Q, V, M]
        moe = moe / moe.sum(-1, keepdim=True)
        sims = torch.zeros(V * captions, V)
        for k in range(len(model.experts)):
            sims += moe[:, :, k] * (t[:, k] @ vid[:, k].T)
    t1 = time.perf_counter()
    res = baseline_metrics(sims.numpy(), query_masks.astype(bool))
    return {"t2v": res["t2v"], "v2t": res["v2t"], "sims_s": t1 - t0, "metrics_s": time.perf_counter() - t1}


def baseline_full_size_gb(videos: int, captions: int, text_dim: int) -> float:
    """Bytes of the reference path's large arrays at a size (float64 text + float32 copy + [Q,V,M] weights + sims)."""
    Q = videos * captions
    text64 = videos * captions * MAX_TOKENS["text"] * text_dim * 8
    return (text64 * 1.5 + Q * videos * len(EXPERT_DIMS) * 4 * 2 + Q * videos * 4 * 2) / float(1 << 30)


# ----------------------------------------------------------------------------- training throughput


def setup_train(batch: int, steps: int) -> tuple:
    cfg = resolve_world(
        METHOD, load_config(CrossKDConfig, "synth_cecap", {"data.synth_size": "small"}, method="crosskd")
    )
    torch.manual_seed(0)
    model = METHOD.build_model(cfg)
    ds = METHOD.build_dataset(cfg, "train")
    return model, ds, cfg, batch, steps


def run_train(model: torch.nn.Module, ds: Any, cfg: Any, batch: int, steps: int) -> dict[str, float]:
    opt = torch.optim.RAdam(model.parameters(), lr=1e-3)
    model.train()
    n = 0
    t0 = time.perf_counter()
    for s in range(steps):
        idx = [(s * batch + i) % len(ds) for i in range(batch)]
        loss, _ = METHOD.training_step(model, ds.get_batch(idx), s, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += batch
    return {"samples_per_s": n / (time.perf_counter() - t0)}


# ----------------------------------------------------------------------------- CLI


def run(args: argparse.Namespace) -> int:
    clusters, shared = (28, 768) if args.full_model else (args.text_clusters, args.shared_dim)
    rows: list[Measurement] = []
    out: dict[str, Any] = {
        "videos": args.videos,
        "captions": args.captions,
        "text_dim": args.text_dim,
        "text_clusters": clusters,
        "shared_dim": shared,
        "cuda": torch.cuda.is_available(),
        "threads": args.threads,
    }
    tr = measure(
        "train (synth_cecap, small world)",
        run_train,
        setup_train,
        (args.batch_size, args.train_steps),
        threads=args.threads,
    )
    out["train_samples_per_s"] = tr.result["samples_per_s"]
    print(
        f"training: {tr.result['samples_per_s']:.1f} samples/s (CENet synth_cecap, batch {args.batch_size}, "
        f"{args.train_steps} steps, CPU threads {args.threads})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        bv = args.baseline_videos
        if not args.skip_baseline:
            base = measure(
                f"reference approach @{bv}",
                run_baseline,
                setup_baseline,
                (bv, args.captions, args.text_dim, clusters, shared, args.seed),
                threads=args.threads,
            )
            small = measure(
                f"groundkit @{bv}",
                _run_gk_dev,
                setup_groundkit,
                (bv, args.captions, args.text_dim, clusters, shared, args.seed, tmp),
                threads=args.threads,
            )
            diff = abs(base.result["t2v"]["R1"] - small.result["t2v"]["R1"]) + abs(
                base.result["v2t"]["R1"] - small.result["v2t"]["R1"]
            )
            rows += [base, small]
            out["baseline"] = base.to_dict() | {"t2v": base.result["t2v"], "v2t": base.result["v2t"]}
            out["groundkit_same_size"] = small.to_dict() | {"t2v": small.result["t2v"], "v2t": small.result["v2t"]}
            out["same_size_speedup"] = base.seconds / small.seconds
            out["same_size_R1_abs_diff"] = diff
        full = measure(
            f"groundkit @{args.videos}",
            _run_gk_dev,
            setup_groundkit,
            (args.videos, args.captions, args.text_dim, clusters, shared, args.seed, tmp),
            threads=args.threads,
        )
        rows.append(full)
        out["groundkit_full"] = full.to_dict() | {
            "sims_s": full.result["sims_s"],
            "metrics_s": full.result["metrics_s"],
        }
    print_table(
        rows,
        baseline=None if args.skip_baseline else rows[0].name,
        title=f"full evaluation (encode + similarity + t2v/v2t metrics), {args.captions} captions per video",
    )
    est = baseline_full_size_gb(args.videos, args.captions, args.text_dim)
    out["baseline_full_size_gb_arrays"] = est
    print(f"reference approach at {args.videos} videos: its arrays alone need {est:.1f} GB (arithmetic, not run)")
    if not args.skip_baseline:
        # the reference path is linear in V for its data arrays and quadratic for the [Q, V, M] weights; extrapolate
        # its time with the measured split (data+encode linear, similarity/metrics quadratic) -- labelled as an estimate
        r = args.videos / args.baseline_videos
        est_s = base.result["sims_s"] * r + base.result["metrics_s"] * r * r
        out["baseline_full_size_s_estimate"] = est_s
        out["full_size_speedup_estimate"] = est_s / full.seconds
        print(
            f"same-size speed-up (measured, {args.baseline_videos} videos): {out['same_size_speedup']:.1f}x; "
            f"R@1 agreement |diff| = {diff:.2e}"
        )
        print(
            f"estimated reference time at {args.videos} videos: {est_s:.0f} s "
            f"(linear data/encode x{r:.0f}, quadratic metrics x{r * r:.0f}) "
            f"-> estimated speed-up {out['full_size_speedup_estimate']:.1f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


def _run_gk_dev(model: torch.nn.Module, ds: Any) -> dict[str, Any]:
    """groundkit path on CUDA when present, else CPU."""
    return run_groundkit(model, ds, "cuda" if torch.cuda.is_available() else "cpu")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "crosskd",
        help="CENet training samples/s and full MSR-VTT-size evaluation time/memory vs the reference approach",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--videos", type=int, default=MSRVTT_VIDEOS)
    p.add_argument("--captions", type=int, default=MSRVTT_CAPTIONS)
    p.add_argument(
        "--baseline-videos",
        type=int,
        default=300,
        help="size at which the reference approach is run (it needs 28 GB at 2990)",
    )
    p.add_argument("--text-dim", type=int, default=1600)
    p.add_argument("--text-clusters", type=int, default=4)
    p.add_argument("--shared-dim", type=int, default=256)
    p.add_argument(
        "--full-model", action="store_true", help="28 text clusters, 768-d shared space (the reference's MSR-VTT model)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=run)
