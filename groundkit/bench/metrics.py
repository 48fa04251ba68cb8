"""``groundkit bench metrics``: text-video retrieval metrics at the MSR-VTT full-test shape.

Times :func:`groundkit.metrics.t2v_metrics` + :func:`groundkit.metrics.v2t_metrics` on a synthetic
similarity matrix of 59,800 queries x 2,990 videos (20 captions per video, two videos with 19, as
in MSR-VTT) against a **baseline measured in the same run** that performs the operations of the official
Collaborative Experts ``t2v_metrics`` / ``v2t_metrics`` in the same order, on the float32 matrix the
official evaluation passes them: full-row ``np.sort`` of the whole matrix, ground-truth positions
located by comparing the whole sorted matrix and tie averaging with a reduce pass (t2v); a Python
loop over videos that sorts each video's caption column (a strided row of the transposed view) and
looks up each of its captions (v2t). The baseline lives here only as a reference point, it is not a metric of the
package. A third row times :func:`groundkit.metrics.retrieval_metrics`, which gives both directions
in one pass over the matrix. Every implementation runs in a fresh process (see
:mod:`groundkit.bench.common`) from the same float32 matrix, built before timing starts, and the
benchmark fails (exit status 1) unless all give the same ranks and metrics (1e-6).
Default ``--threads 1``: the baseline's numpy sort is single-threaded, and on a shared CPU
oversubscribed torch threads are slower, not faster.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import scipy.stats
import torch

from ..metrics import retrieval_metrics, t2v_metrics, v2t_metrics
from .common import Measurement, measure, print_table

MSRVTT_VIDEOS = 2990
MSRVTT_CAPTIONS = 20


# ----------------------------------------------------------------------------- inputs
def make_inputs(videos: int, captions: int, seed: int = 0, padded: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic ``sims`` [videos*captions, videos] float32 with a noisy diagonal (each caption's
    own video gets a per-caption boost, so ranks spread from 0 to thousands), a sprinkle of exact
    ties, and ``query_masks`` [videos, captions] with the last caption of ``padded`` videos missing."""
    rng = np.random.default_rng(seed)
    Q = videos * captions
    sims = rng.standard_normal((Q, videos), dtype=np.float32)
    q = np.arange(Q)
    sims[q, q // captions] += rng.uniform(0.5, 4.0, size=Q).astype(np.float32)
    # exact ties (as produced by e.g. low-precision embeddings): copy the GT score onto one other
    # video for 1% of the queries
    tie_q = rng.choice(Q, size=max(1, Q // 100), replace=False)
    sims[tie_q, (tie_q // captions + 1) % videos] = sims[tie_q, tie_q // captions]
    mask = np.ones((videos, captions), dtype=bool)
    if padded:
        mask[rng.choice(videos, size=min(padded, videos), replace=False), captions - 1] = False
    return sims, mask


def make_inputs_on(videos: int, captions: int, seed: int, device: str) -> tuple[Any, Any]:
    sims, mask = make_inputs(videos, captions, seed)
    if device == "cpu":
        return sims, mask

    return torch.from_numpy(sims).to(device), torch.from_numpy(mask).to(device)


# ----------------------------------------------------------------------------- baseline
def _baseline_cols2metrics(cols: np.ndarray, n: int) -> dict[str, float]:
    m = {
        "R1": 100 * float(np.sum(cols == 0)) / n,
        "R5": 100 * float(np.sum(cols < 5)) / n,
        "R10": 100 * float(np.sum(cols < 10)) / n,
        "R50": 100 * float(np.sum(cols < 50)) / n,
        "MedR": float(np.median(cols)) + 1,
        "MeanR": float(np.mean(cols)) + 1,
    }
    m["geometric_mean_R1-R5-R10"] = float(scipy.stats.mstats.gmean([m["R1"], m["R5"], m["R10"]]))
    return m


def baseline_t2v(sims: np.ndarray, query_masks: np.ndarray | None) -> tuple[dict[str, float], np.ndarray]:
    """Baseline (the official ``t2v_metrics``' operations in order, not a package metric): distances in
    the input's dtype (float32, as the official evaluation passes), full-row sort, GT distances
    gathered through per-element flat indices, positions found by comparing the whole sorted matrix,
    ties averaged with a second comparison pass and a reduce."""
    num_queries, num_vids = sims.shape
    dists = -sims
    sorted_dists = np.sort(dists, axis=1)
    queries_per_video = num_queries // num_vids
    gt_idx = [
        [
            np.ravel_multi_index([ii, jj], (num_queries, num_vids))
            for ii in range(jj * queries_per_video, (jj + 1) * queries_per_video)
        ]
        for jj in range(num_vids)
    ]
    gt_idx = np.array(gt_idx)
    gt_dists = dists.reshape(-1)[gt_idx.reshape(-1)]
    gt_dists = gt_dists[:, np.newaxis]
    rows, cols = np.where((sorted_dists - gt_dists) == 0)
    if rows.size > num_queries:  # ties: average the tied positions of each row
        assert np.unique(rows).size == num_queries, "issue in metric evaluation"
        locs = np.argwhere((sorted_dists - gt_dists) == 0)
        steps = np.diff(locs[:, 0])
        splits = np.nonzero(steps)[0] + 1
        splits = np.insert(splits, 0, 0)
        summed_cols = np.add.reduceat(locs[:, 1], splits)
        counts = np.diff(np.append(splits, locs.shape[0]))
        cols = summed_cols / counts
    assert cols.size == num_queries
    if query_masks is not None:
        assert query_masks.size == num_queries, "invalid query mask shape"
        cols = cols[query_masks.reshape(-1).astype(bool)]
        assert cols.size == query_masks.sum(), "masking was not applied correctly"
        num_queries = query_masks.sum()
    return _baseline_cols2metrics(cols, int(num_queries)), np.asarray(cols, dtype=np.float64)


def baseline_v2t(sims: np.ndarray, query_masks: np.ndarray | None) -> tuple[dict[str, float], np.ndarray]:
    """Baseline (the official ``v2t_metrics``' operations in order): a negated view of the transposed
    matrix (strided rows, the input's dtype), a Python loop over videos that re-marks the padded
    captions at distance 1e8, sorts the video's row and searches each of its captions in it."""
    sims = sims.T
    num_queries, num_caps = sims.shape
    dists = -sims
    caps_per_video = num_caps // num_queries
    missing_val = 1e8
    query_ranks = []
    for ii in range(num_queries):
        row_dists = dists[ii, :]
        if query_masks is not None:
            row_dists[np.logical_not(query_masks.reshape(-1))] = missing_val
        sorted_dists = np.sort(row_dists)
        min_rank = np.inf
        for jj in range(ii * caps_per_video, (ii + 1) * caps_per_video):
            if row_dists[jj] == missing_val:
                continue
            ranks = np.where((sorted_dists - row_dists[jj]) == 0)[0]
            rank = ranks.mean()
            if rank < min_rank:
                min_rank = rank
        query_ranks.append(min_rank)
    cols = np.array(query_ranks)
    return _baseline_cols2metrics(cols, num_queries), cols


# ----------------------------------------------------------------------------- timed targets
def run_baseline(sims: Any, query_masks: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    t2v, t2v_cols = baseline_t2v(sims, query_masks)
    t1 = time.perf_counter()
    v2t, v2t_cols = baseline_v2t(sims, query_masks)
    t2 = time.perf_counter()
    return {"t2v": t2v, "v2t": v2t, "t2v_cols": t2v_cols, "v2t_cols": v2t_cols, "t2v_s": t1 - t0, "v2t_s": t2 - t1}


def run_groundkit(sims: Any, query_masks: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    t2v = t2v_metrics(sims, query_masks, return_ranks=True)
    t1 = time.perf_counter()
    v2t = v2t_metrics(sims, query_masks, return_ranks=True)
    t2 = time.perf_counter()
    return {
        "t2v_cols": t2v.pop("cols"),
        "v2t_cols": v2t.pop("cols"),
        "t2v": t2v,
        "v2t": v2t,
        "t2v_s": t1 - t0,
        "v2t_s": t2 - t1,
    }


def run_groundkit_fused(sims: Any, query_masks: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    both = retrieval_metrics(sims, query_masks, return_ranks=True)
    dt = time.perf_counter() - t0
    return {
        "t2v_cols": both["t2v"].pop("cols"),
        "v2t_cols": both["v2t"].pop("cols"),
        "t2v": both["t2v"],
        "v2t": both["v2t"],
        "t2v_s": dt,
        "v2t_s": 0.0,
    }


def check_same(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-6) -> list[str]:
    """Differences between two results (empty when they agree within ``tol``)."""
    problems = []
    for d in ("t2v", "v2t"):
        ca, cb = np.asarray(a[f"{d}_cols"]), np.asarray(b[f"{d}_cols"])
        if ca.shape != cb.shape or not np.allclose(ca, cb, rtol=0, atol=tol):
            problems.append(f"{d} ranks differ")
        for k, v in a[d].items():
            if abs(float(v) - float(b[d][k])) > tol:
                problems.append(f"{d} {k}: {v} vs {b[d][k]}")
    return problems


# ----------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    videos, captions = args.videos, args.captions
    Q = videos * captions
    print(
        f"retrieval metrics: {Q} queries x {videos} videos ({captions} captions per video, "
        f"{Q * videos * 4 / 2**30:.2f} GB float32), device {args.device}, threads {args.threads}, seed {args.seed}",
        flush=True,
    )
    setup_args = (videos, captions, args.seed, args.device)
    rows: list[Measurement] = []
    base = None
    if not args.skip_baseline:
        base = measure(
            "baseline (official ops)",
            run_baseline,
            make_inputs_on,
            (videos, captions, args.seed, "cpu"),
            repeats=args.baseline_repeats,
            threads=args.threads,
        )
        rows.append(base)
    where = "" if args.device == "cpu" else f" [{args.device}]"  # peak memory is then CUDA allocations
    ours = measure(
        "t2v_metrics + v2t_metrics" + where,
        run_groundkit,
        make_inputs_on,
        setup_args,
        repeats=args.repeats,
        device=args.device,
        threads=args.threads,
    )
    rows.append(ours)
    if not args.skip_fused:
        rows.append(
            measure(
                "retrieval_metrics (1 pass)" + where,
                run_groundkit_fused,
                make_inputs_on,
                setup_args,
                repeats=args.repeats,
                device=args.device,
                threads=args.threads,
            )
        )
    print_table(rows, baseline=base.name if base else None)
    for r in rows:
        res = r.result
        split = f"t2v {res['t2v_s']:.3f} s, v2t {res['v2t_s']:.3f} s" if res["v2t_s"] else f"both {res['t2v_s']:.3f} s"
        print(
            f"  {r.name}: {split} (last repeat); all repeats {[round(t, 3) for t in r.times]} s wall, "
            f"{[round(t, 3) for t in r.cpu_times]} s CPU"
        )
    if base is not None:
        cb = min(base.cpu_times)
        print(
            "  CPU-time speed-ups (fastest repeats): "
            + ", ".join(f"{r.name} {cb / min(r.cpu_times):.1f}x" for r in rows[1:])
        )
    res = ours.result
    for d in ("t2v", "v2t"):
        m = res[d]
        print(f"  {d}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
    status = 0
    for r in rows[1:]:
        problems = check_same(rows[0].result, r.result)
        if problems:
            print(f"MISMATCH between {rows[0].name} and {r.name}: " + "; ".join(problems[:10]))
            status = 1
    if status == 0 and len(rows) > 1:
        print("all implementations agree (ranks and metrics within 1e-6)")
    if args.json:
        out = {
            "videos": videos,
            "captions": captions,
            "device": args.device,
            "threads": args.threads,
            "rows": [r.to_dict() for r in rows],
            "agree": status == 0,
            "t2v": res["t2v"],
            "v2t": res["v2t"],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return status


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "metrics",
        help="retrieval metrics (t2v + v2t) at MSR-VTT full-test size vs the reference approach",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--videos", type=int, default=MSRVTT_VIDEOS, help="number of videos (default: MSR-VTT full test, 2990)"
    )
    p.add_argument("--captions", type=int, default=MSRVTT_CAPTIONS, help="captions per video (default 20)")
    p.add_argument("--device", default="cpu", help="device for groundkit.metrics: cpu | cuda | cuda:N (baseline: CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of groundkit.metrics (fastest reported)")
    p.add_argument("--baseline-repeats", type=int, default=1, help="timed repeats of the baseline")
    p.add_argument("--skip-baseline", action="store_true", help="time groundkit.metrics only (no agreement check)")
    p.add_argument("--skip-fused", action="store_true", help="do not time the single-pass retrieval_metrics")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads in every process (default 1: the baseline's numpy sort is single-threaded)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=run)
