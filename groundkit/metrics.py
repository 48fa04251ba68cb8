"""Evaluation metrics shared by every method: box IoU, phrase-grounding recall, box accuracy and
text-video retrieval ranks.

All public functions take numpy arrays or torch tensors (CPU or CUDA). Functions returning arrays
give numpy back for numpy input and tensors for tensor input; scalar metrics are Python floats.

Conventions (chosen to match the official code of the re-implemented methods, see the notes in
each docstring):

* Boxes are ``x1, y1, x2, y2`` in continuous coordinates, width ``x2 - x1``. The Fast R-CNN
  convention of older code (width ``x2 - x1 + 1``, or ``+ 0.001`` in the Wang et al. code) is
  available through ``pixel_offset``.
* Retrieval ranks follow Collaborative Experts (``model/metric.py``): 0-based, ties broken by
  *averaging* over the tied positions (McSherry & Najork), so ranks can be ``x.5``; ``R1`` counts
  ranks equal to 0, ``R5/R10/R50`` count ranks strictly below k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from . import distributed as dist_utils

# Box IoU lives in groundkit.boxes (shared with the box transforms) and is re-exported here under the same names.
from .boxes import Array, _to_tensor, box_iou, paired_box_iou

__all__ = [
    "box_iou",
    "paired_box_iou",
    "mean_iou",
    "accuracy_at_iou",
    "refexp_baselines",
    "refexp_baseline_hits",
    "objects_per_image",
    "phrase_recall_at_k",
    "phrase_first_hit",
    "PhraseRecallAccumulator",
    "t2v_metrics",
    "v2t_metrics",
    "retrieval_metrics",
    "v2t_ranks",
    "cols2metrics",
    "RETRIEVAL_KEYS",
]

RETRIEVAL_KEYS = ("R1", "R5", "R10", "R50", "MedR", "MeanR", "geometric_mean_R1-R5-R10")


def _iou_hit(iou: torch.Tensor, threshold: float, inclusive: bool) -> torch.Tensor:
    return iou >= threshold if inclusive else iou > threshold


def accuracy_at_iou(
    pred_boxes: Array, gt_boxes: Array, threshold: float = 0.5, inclusive: bool = False, pixel_offset: float = 0.0
) -> float:
    """Fraction of paired boxes (``pred_boxes[i]`` vs ``gt_boxes[i]``, [N, 4]) with IoU > ``threshold``.

    ``inclusive=True`` uses ``>=`` (CLIP-VG / TransVG ``Acc@0.5``); the default strict ``>`` is the
    Co-Grounding convention.
    """
    iou = _to_tensor(paired_box_iou(pred_boxes, gt_boxes, pixel_offset), "iou")
    if iou.numel() == 0:
        raise ValueError("accuracy_at_iou: no boxes given")
    return float(_iou_hit(iou, threshold, inclusive).double().mean())


def _rows(x: Array, name: str, width: int) -> np.ndarray:
    """``x`` as a float64 numpy array of ``width``-wide rows."""
    return np.asarray(_to_tensor(x, name).double().cpu(), dtype=np.float64).reshape(-1, width)


def objects_per_image(images: Sequence[str], boxes: Array) -> list[np.ndarray]:
    """Per sample, the distinct boxes ``[k, 4]`` referred to in its image (by any sample of the list).

    The annotated objects of a referring-expression file where no object list ships with it (TransVG
    ``.pth`` lists): in RefCOCO every split holds all expressions of its images, so these are the
    image's referred objects."""
    b = _rows(boxes, "boxes", 4)
    if len(b) != len(images):
        raise ValueError(f"objects_per_image: {len(images)} images but {len(b)} boxes")
    groups: dict[str, list[tuple[float, ...]]] = {}
    for img, box in zip(images, b):
        key = tuple(np.round(box, 2).tolist())
        if key not in groups.setdefault(img, []):
            groups[img].append(key)
    return [np.asarray(groups[img], dtype=np.float64) for img in images]


def refexp_baseline_hits(
    gt_boxes: Array,
    objects: Sequence[Array],
    image_sizes: Array,
    threshold: float = 0.5,
    inclusive: bool = True,
) -> dict[str, np.ndarray]:
    """Per sample, the hits of the trivial referring-expression baselines that ignore the text.

    ``gt_boxes`` [N, 4], ``objects[i]`` [k_i, 4] the annotated objects of sample i's image (the target
    among them), ``image_sizes`` [N, 2] as (width, height). ``random_object``: the expected hit of one
    object drawn uniformly (a fraction); ``largest_object``: the object of largest area;
    ``centre_object``: the object whose centre lies nearest the image centre (0 or 1)."""
    gt, sizes = _rows(gt_boxes, "gt_boxes", 4), _rows(image_sizes, "image_sizes", 2)
    if not (len(gt) == len(objects) == len(sizes)):
        raise ValueError(f"refexp_baselines: {len(gt)} boxes, {len(objects)} object lists, {len(sizes)} sizes")
    out: dict[str, list[float]] = {"random_object": [], "largest_object": [], "centre_object": []}
    for g, objs, (w, h) in zip(gt, objects, sizes):
        o = _rows(objs, "objects", 4)
        if not len(o):
            raise ValueError("refexp_baselines: a sample's image has no objects (its own box must be one)")
        hit = _iou_hit(torch.as_tensor(box_iou(o, g[None])[:, 0]), threshold, inclusive).double().numpy()
        out["random_object"].append(float(hit.mean()))
        out["largest_object"].append(float(hit[int(((o[:, 2] - o[:, 0]) * (o[:, 3] - o[:, 1])).argmax())]))
        d = ((o[:, 0] + o[:, 2]) / 2 - w / 2) ** 2 + ((o[:, 1] + o[:, 3]) / 2 - h / 2) ** 2
        out["centre_object"].append(float(hit[int(d.argmin())]))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def refexp_baselines(
    gt_boxes: Array,
    objects: Sequence[Array],
    image_sizes: Array,
    threshold: float = 0.5,
    inclusive: bool = True,
) -> dict[str, float]:
    """Acc@``threshold`` in percent of :func:`refexp_baseline_hits`' three baselines (random, largest and
    most central object). A model that does not beat all three has not read the expression."""
    hits = refexp_baseline_hits(gt_boxes, objects, image_sizes, threshold, inclusive)
    if not len(hits["random_object"]):
        raise ValueError("refexp_baselines: no samples")
    return {k: 100.0 * float(v.mean()) for k, v in hits.items()}


def mean_iou(pred_boxes: Array, gt_boxes: Array, pixel_offset: float = 0.0) -> float:
    """Mean IoU of paired boxes ([N, 4] each)."""
    iou = _to_tensor(paired_box_iou(pred_boxes, gt_boxes, pixel_offset), "iou")
    if iou.numel() == 0:
        raise ValueError("mean_iou: no boxes given")
    return float(iou.double().mean())


# ----------------------------------------------------------------------------- phrase recall
def phrase_first_hit(
    scores: Array,
    proposals: Array,
    gt_boxes: Array,
    iou_threshold: float = 0.5,
    inclusive: bool = False,
    pixel_offset: float = 0.0,
) -> torch.Tensor:
    """For each phrase, the 0-based position in its score ranking of the first proposal that hits
    its GT box (IoU > ``iou_threshold``, ``>=`` when ``inclusive``); ``inf`` when no proposal hits.

    ``scores`` [P, N] over ``proposals`` [N, 4]; ``gt_boxes`` [P, 4] -> float64 tensor [P].
    Ties in ``scores`` are broken deterministically by a stable sort: among equal scores the proposal
    with the lower index ranks first. A phrase is a hit at k iff ``first_hit < k``.
    """
    s = _to_tensor(scores, "scores")
    props = _to_tensor(proposals, "proposals")
    gt = _to_tensor(gt_boxes, "gt_boxes")
    if s.ndim != 2:
        raise ValueError(f"scores: expected [P, N] (phrases x proposals), got {tuple(s.shape)}")
    P, N = s.shape
    if props.ndim != 2 or props.shape != (N, 4):
        raise ValueError(f"proposals: expected [N, 4] with N={N} (scores.shape[1]), got {tuple(props.shape)}")
    if gt.ndim != 2 or gt.shape != (P, 4):
        raise ValueError(f"gt_boxes: expected [P, 4] with P={P} (scores.shape[0]), got {tuple(gt.shape)}")
    if P == 0 or N == 0:
        return torch.full((P,), math.inf, dtype=torch.float64, device=s.device)
    if s.is_floating_point() and bool(torch.isnan(s).any()):
        raise ValueError("scores contain NaN")
    iou = _to_tensor(box_iou(gt, props, pixel_offset), "iou").to(s.device)  # [P, N]
    hit = _iou_hit(iou, iou_threshold, inclusive)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    hit_sorted = hit.gather(1, order)
    any_hit = hit_sorted.any(1)
    first = hit_sorted.to(torch.uint8).argmax(1)  # first True (argmax returns the first maximum)
    return torch.where(any_hit, first.to(torch.float64), math.inf)


def phrase_recall_at_k(
    scores: Array,
    proposals: Array,
    gt_boxes: Array,
    ks: Sequence[int] = (1, 5, 10),
    iou_threshold: float = 0.5,
    inclusive: bool = False,
    pixel_offset: float = 0.0,
) -> dict[int, int]:
    """Number of phrases of one image that are hits at each k (Wang et al. 2021 ``eval_model.py``).

    A phrase is a hit at k if any of its top-k scored proposals has IoU > ``iou_threshold`` with its
    GT box (``>=`` when ``inclusive``). ``scores`` [P, N], ``proposals`` [N, 4], ``gt_boxes`` [P, 4];
    k > N means all N proposals. Ties: lower proposal index first (see :func:`phrase_first_hit`).
    Divide by the number of phrases (or use :class:`PhraseRecallAccumulator`) for R@k.
    """
    first = phrase_first_hit(scores, proposals, gt_boxes, iou_threshold, inclusive, pixel_offset)
    return {int(k): int((first < int(k)).sum()) for k in _check_ks(ks)}


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


class PhraseRecallAccumulator:
    """Dataset-level phrase-grounding recall: R@k over all phrases plus the proposal upper bound.

    ``update`` once per image; ``compute`` returns ``{"R@1": frac, ..., "upper_bound": frac,
    "num_phrases": n}`` where ``upper_bound`` is the fraction of phrases for which *any* proposal
    hits. Counts are integers, so accumulators from different processes add exactly: ``merge`` one
    into another, or call ``all_reduce()`` under ``torch.distributed``.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 5, 10),
        iou_threshold: float = 0.5,
        inclusive: bool = False,
        pixel_offset: float = 0.0,
    ) -> None:
        self.ks = _check_ks(ks)
        self.iou_threshold = float(iou_threshold)
        self.inclusive = bool(inclusive)
        self.pixel_offset = float(pixel_offset)
        self.hits = {k: 0 for k in self.ks}
        self.upper = 0
        self.num_phrases = 0

    def update(self, scores: Array, proposals: Array, gt_boxes: Array, mask: Array | None = None) -> None:
        """Add one image: ``scores`` [P, N], ``proposals`` [N, 4], ``gt_boxes`` [P, 4]; ``mask`` [P]
        (bool) selects the phrases that count (e.g. those with a GT box)."""
        first = phrase_first_hit(scores, proposals, gt_boxes, self.iou_threshold, self.inclusive, self.pixel_offset)
        if mask is not None:
            m = _to_tensor(mask, "mask").to(first.device)
            if m.shape != first.shape:
                raise ValueError(f"mask: expected shape [P]={tuple(first.shape)}, got {tuple(m.shape)}")
            first = first[m.bool()]
        self.num_phrases += int(first.numel())
        for k in self.ks:
            self.hits[k] += int((first < k).sum())
        self.upper += int(torch.isfinite(first).sum())

    def merge(self, other: PhraseRecallAccumulator) -> PhraseRecallAccumulator:
        """Add the counts of ``other`` (same settings) into this accumulator; returns self."""
        if (other.ks, other.iou_threshold, other.inclusive, other.pixel_offset) != (
            self.ks,
            self.iou_threshold,
            self.inclusive,
            self.pixel_offset,
        ):
            raise ValueError("cannot merge PhraseRecallAccumulators with different ks/threshold/inclusive/pixel_offset")
        for k in self.ks:
            self.hits[k] += other.hits[k]
        self.upper += other.upper
        self.num_phrases += other.num_phrases
        return self

    def state(self) -> dict[str, Any]:
        return {"hits": dict(self.hits), "upper": self.upper, "num_phrases": self.num_phrases}

    def all_reduce(self) -> PhraseRecallAccumulator:
        """Sum the counts of every rank into this accumulator (no-op when not distributed)."""
        states = dist_utils.all_gather_object(self.state())
        if len(states) > 1:
            self.hits = {k: sum(s["hits"][k] for s in states) for k in self.ks}
            self.upper = sum(s["upper"] for s in states)
            self.num_phrases = sum(s["num_phrases"] for s in states)
        return self

    def compute(self) -> dict[str, float]:
        if self.num_phrases == 0:
            raise ValueError("PhraseRecallAccumulator.compute: no phrases were added")
        n = self.num_phrases
        out: dict[str, float] = {f"R@{k}": self.hits[k] / n for k in self.ks}
        out["upper_bound"] = self.upper / n
        out["num_phrases"] = n
        return out


# ----------------------------------------------------------------------------- retrieval
def _check_sims(sims: Any) -> tuple[torch.Tensor, int, int, int]:
    s = _to_tensor(sims, "sims")
    if s.ndim != 2:
        raise ValueError(f"sims: expected a [num_queries, num_videos] matrix, got shape {tuple(s.shape)}")
    Q, V = s.shape
    if V == 0 or Q == 0 or Q % V:
        raise ValueError(
            f"sims: num_queries ({Q}) must be a positive multiple of num_videos ({V}); queries are ordered "
            "video-major (num_videos x captions_per_video), pad missing captions and pass query_masks"
        )
    return s, Q, V, Q // V


def _check_mask(query_masks: Any, Q: int, V: int, C: int, device: torch.device) -> torch.Tensor | None:
    if query_masks is None:
        return None
    m = _to_tensor(query_masks, "query_masks")
    if m.numel() != Q or (m.ndim == 2 and tuple(m.shape) != (V, C)) or m.ndim > 2:
        raise ValueError(
            f"query_masks: expected shape [num_videos, captions_per_video] = [{V}, {C}] (or [{Q}]), got {tuple(m.shape)}"
        )
    return m.reshape(-1).to(device=device).bool()


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # Exact: float16/bfloat16 -> float32 and integers -> float64 are lossless, so every comparison
    # gives the same answer as the official float64 code on the same values.
    if t.dtype == torch.float64 or not t.is_floating_point():
        return torch.float64
    return torch.float32


def _chunk_rows(n_cols: int, itemsize: int, chunk_bytes: int | None, device: torch.device) -> int:
    if chunk_bytes is None:
        # GPU: large chunks, few kernel launches. CPU, one thread: a chunk about the size of a core's
        # L2 cache (measured fastest). CPU, several threads: every op is a parallel region ending in a
        # barrier, so larger chunks (fewer barriers) win, by far on a busy machine.
        threads = torch.get_num_threads()
        if device.type != "cpu":
            chunk_bytes = 256 << 20
        else:
            chunk_bytes = (2 << 20) if threads <= 1 else min(256 << 20, (32 << 20) * threads)
    return max(1, int(chunk_bytes) // max(1, n_cols * itemsize))


_NAN_MESSAGE = "sims contains NaN (padded rows included: fill them with any finite value); ranks are undefined"


def _sign_sum(x: torch.Tensor, ref: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum(sign(x - ref), dim)`` by comparisons (exact with infinities, where ``inf - inf`` is NaN)."""
    return (x > ref).sum(dim, dtype=torch.float64) - (x < ref).sum(dim, dtype=torch.float64)


def _retrieval_ranks(
    sims: Any, query_masks: Any, t2v: bool, v2t: bool, chunk_bytes: int | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One pass over ``sims`` in row chunks giving the tie-averaged t2v ranks (all queries) and/or
    v2t ranks (one per video).

    With ``gt_i`` the score of query ``i`` with its own video, the CE rank (mean position of the GT
    among its ties in the sorted row) is ``#{higher} + #{tied others} / 2 = (V - 1 + sum_j sign(s_ij
    - gt_i)) / 2``. The sign of a float difference is exact (IEEE subtraction never rounds a non-zero
    difference to zero or flips its sign, with denormals enabled), so this equals the official
    float64 sort-and-search result bit for bit. For v2t, the minimum over a video's captions of their
    ranks is the rank of its highest-scoring valid caption ``best_j``, so the column counts
    ``sum_i valid_i sign(s_ij - best_j)`` over the valid captions give all videos in the same pass
    (summed over all rows, then the few padded rows are subtracted). Per chunk: one sum (a NaN
    check: only a non-finite sum leads to a search for NaN, and a chunk with infinite scores, whose
    differences can be NaN, is counted by comparisons instead) and three vectorised operations
    (subtract, sign, sum).
    """
    s, Q, V, C = _check_sims(sims)
    valid = _check_mask(query_masks, Q, V, C, s.device) if v2t else None
    wd = _work_dtype(s)
    idx = torch.arange(Q, device=s.device)
    gt = s[idx, idx // C].to(wd)  # [Q]: score of each caption with its own video
    if v2t:
        if valid is not None:
            per_video = valid.view(V, C).sum(1)
            if bool((per_video == 0).any()):
                bad = int(torch.nonzero(per_video == 0)[0])
                raise ValueError(f"query_masks: video {bad} has no valid caption; v2t rank is undefined")
            best = gt.masked_fill(~valid, -math.inf).view(V, C).amax(1)  # [V]
            padded = torch.nonzero(~valid).view(-1)
            n_valid = Q - int(padded.numel())
        else:
            best, padded, n_valid = gt.view(V, C).amax(1), None, Q
        col_acc = torch.zeros(V, dtype=torch.float64, device=s.device)
    rows = _chunk_rows(V, torch.finfo(wd).bits // 8, chunk_bytes, s.device)
    rows = min(rows, Q)
    row_sign = torch.empty(Q, dtype=torch.float64, device=s.device) if t2v else None
    sum_dtype = wd if V < (1 << 24) else torch.float64  # sums of +-1 stay exact
    buf = torch.empty((rows, V), dtype=wd, device=s.device)
    for a in range(0, Q, rows):
        b = min(Q, a + rows)
        blk = s[a:b]
        if blk.dtype != wd:
            blk = blk.to(wd)
        out = buf[: b - a]
        if not bool(torch.isfinite(blk.sum())):
            if bool(torch.isnan(blk).any()):
                raise ValueError(_NAN_MESSAGE)
            if t2v:  # infinite scores: inf - inf is NaN, count by comparisons
                row_sign[a:b] = _sign_sum(blk, gt[a:b, None], 1)
            if v2t:
                col_acc += _sign_sum(blk, best[None, :], 0)
            continue
        if t2v:
            torch.sub(blk, gt[a:b, None], out=out)
            out.sign_()
            row_sign[a:b] = out.sum(1, dtype=sum_dtype)
        if v2t:
            torch.sub(blk, best[None, :], out=out)
            out.sign_()
            col_acc += out.sum(0)  # chunk sums of +-1 over < 2**24 rows are exact integers
    t2v_out = v2t_out = None
    if t2v:
        t2v_out = row_sign.add_(V - 1).mul_(0.5).cpu().numpy()
    if v2t:
        if padded is not None and padded.numel():
            # padded captions never compete: take their (few) rows back out of the column sums
            col_acc -= _sign_sum(s[padded].to(wd), best[None, :], 0)
        v2t_out = col_acc.add_(n_valid - 1).mul_(0.5).cpu().numpy()
    return t2v_out, v2t_out


def v2t_ranks(sims: Array, query_masks: Array | None = None, chunk_bytes: int | None = None) -> np.ndarray:
    """Tie-averaged 0-based rank, for each video, of its best-ranked valid caption among all valid
    captions (Collaborative Experts ``v2t_metrics``; padded captions never compete, as with the
    official distance 1e8). Equal to the tie-averaged rank of the video's highest-scoring valid
    caption, so other captions of the same video count as competitors. -> float64 [num_videos].
    """
    return _retrieval_ranks(sims, query_masks, False, True, chunk_bytes)[1]


def cols2metrics(cols: Array, num_queries: int | None = None) -> dict[str, float]:
    """Retrieval summary of 0-based ranks ``cols`` (Collaborative Experts ``cols2metrics``).

    ``R1 = 100 |rank == 0| / N`` (a rank of 0.5 from a tie at the top is not a hit),
    ``R{5,10,50} = 100 |rank < k| / N``, ``MedR = median + 1``, ``MeanR = mean + 1``,
    ``geometric_mean_R1-R5-R10`` (0 when any of them is 0).
    """
    c = np.asarray(cols.cpu() if isinstance(cols, torch.Tensor) else cols, dtype=np.float64).reshape(-1)
    n = int(c.size if num_queries is None else num_queries)
    if n <= 0 or c.size == 0:
        raise ValueError("cols2metrics: no queries")
    m: dict[str, float] = {
        "R1": 100.0 * float(np.sum(c == 0)) / n,
        "R5": 100.0 * float(np.sum(c < 5)) / n,
        "R10": 100.0 * float(np.sum(c < 10)) / n,
        "R50": 100.0 * float(np.sum(c < 50)) / n,
        "MedR": float(np.median(c)) + 1.0,
        "MeanR": float(np.mean(c)) + 1.0,
    }
    stats = [m["R1"], m["R5"], m["R10"]]
    m["geometric_mean_R1-R5-R10"] = 0.0 if min(stats) <= 0 else float(np.exp(np.mean(np.log(stats))))
    return m


def t2v_metrics(
    sims: Array, query_masks: Array | None = None, return_ranks: bool = False, chunk_bytes: int | None = None
) -> dict[str, Any]:
    """Text-to-video retrieval metrics (Collaborative Experts semantics).

    ``sims`` [num_queries, num_videos], queries video-major (query ``i`` belongs to video
    ``i // captions_per_video``); ``query_masks`` [num_videos, captions_per_video] removes padded
    queries. Returns the :data:`RETRIEVAL_KEYS` (R@k in percent) and, with ``return_ranks``,
    ``"cols"``: the tie-averaged ranks of the kept queries (float64 numpy).
    Runs on the device of ``sims`` in bounded memory (one chunk of ``chunk_bytes`` at a time). On a
    shared, busy CPU ``torch.set_num_threads(1)`` is much faster than oversubscribed threads.
    """
    return retrieval_metrics(sims, query_masks, return_ranks, chunk_bytes, directions=("t2v",))["t2v"]


def v2t_metrics(
    sims: Array, query_masks: Array | None = None, return_ranks: bool = False, chunk_bytes: int | None = None
) -> dict[str, Any]:
    """Video-to-text retrieval metrics (Collaborative Experts semantics): for each video the rank of
    its best-ranked valid caption among all valid captions (see :func:`v2t_ranks`).

    Same inputs as :func:`t2v_metrics` (``sims`` is still [num_queries, num_videos]); metrics are
    over the ``num_videos`` videos; ``"cols"`` (with ``return_ranks``) has one rank per video.
    """
    return retrieval_metrics(sims, query_masks, return_ranks, chunk_bytes, directions=("v2t",))["v2t"]


def retrieval_metrics(
    sims: Array,
    query_masks: Array | None = None,
    return_ranks: bool = False,
    chunk_bytes: int | None = None,
    directions: Sequence[str] = ("t2v", "v2t"),
) -> dict[str, dict[str, Any]]:
    """``{"t2v": t2v_metrics(...), "v2t": v2t_metrics(...)}`` computed in a single pass over ``sims``."""
    unknown = set(directions) - {"t2v", "v2t"}
    if unknown or not directions:
        raise ValueError(f"directions must be a non-empty subset of ('t2v', 'v2t'), got {tuple(directions)}")
    s, Q, V, C = _check_sims(sims)
    valid = _check_mask(query_masks, Q, V, C, torch.device("cpu"))
    t2v_cols, v2t_cols = _retrieval_ranks(s, query_masks, "t2v" in directions, "v2t" in directions, chunk_bytes)
    out: dict[str, dict[str, Any]] = {}
    if t2v_cols is not None:
        if valid is not None:
            t2v_cols = t2v_cols[valid.numpy()]
        out["t2v"] = cols2metrics(t2v_cols)
        if return_ranks:
            out["t2v"]["cols"] = t2v_cols
    if v2t_cols is not None:
        out["v2t"] = cols2metrics(v2t_cols)
        if return_ranks:
            out["v2t"]["cols"] = v2t_cols
    return out
