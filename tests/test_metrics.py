import math

import numpy as np
import pytest
import scipy.stats
import torch

from groundkit.metrics import (
    RETRIEVAL_KEYS,
    PhraseRecallAccumulator,
    accuracy_at_iou,
    box_iou,
    cols2metrics,
    mean_iou,
    paired_box_iou,
    phrase_first_hit,
    phrase_recall_at_k,
    retrieval_metrics,
    t2v_metrics,
    v2t_metrics,
)


# ----------------------------------------------------------------------------- oracles
# Slow, literal re-statements of the Collaborative Experts algorithm: float64 distances, sort each
# row, locate the positions equal to the GT distance, average them; v2t sets padded captions to
# distance 1e8 and keeps the minimum over the video's captions.
def oracle_t2v_cols(sims, query_masks=None):
    dists = -np.asarray(sims, dtype=np.float64)
    Q, V = dists.shape
    C = Q // V
    cols = []
    for i in range(Q):
        row = np.sort(dists[i])
        pos = np.where(row == dists[i, i // C])[0]
        cols.append(pos.mean())
    cols = np.array(cols)
    if query_masks is not None:
        cols = cols[np.asarray(query_masks).reshape(-1).astype(bool)]
    return cols


def oracle_v2t_cols(sims, query_masks=None):
    dists = -np.asarray(sims, dtype=np.float64).T.copy()
    V, Q = dists.shape
    C = Q // V
    out = []
    for j in range(V):
        row = dists[j].copy()
        if query_masks is not None:
            row[~np.asarray(query_masks).reshape(-1).astype(bool)] = 1e8
        srt = np.sort(row)
        best = np.inf
        for c in range(j * C, (j + 1) * C):
            if row[c] == 1e8:
                continue
            best = min(best, np.where(srt == row[c])[0].mean())
        out.append(best)
    return np.array(out)


def oracle_metrics(cols, n):
    m = {
        "R1": 100 * float(np.sum(cols == 0)) / n,
        "R5": 100 * float(np.sum(cols < 5)) / n,
        "R10": 100 * float(np.sum(cols < 10)) / n,
        "R50": 100 * float(np.sum(cols < 50)) / n,
        "MedR": np.median(cols) + 1,
        "MeanR": np.mean(cols) + 1,
    }
    with np.errstate(divide="ignore"):
        m["geometric_mean_R1-R5-R10"] = float(scipy.stats.mstats.gmean([m["R1"], m["R5"], m["R10"]]))
    return m


def assert_metrics_equal(got, want):
    assert set(RETRIEVAL_KEYS) <= set(got)
    for k in RETRIEVAL_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def random_sims(rng, V, C, levels=None, dtype=np.float32):
    """Noisy-diagonal similarities; ``levels`` quantises the values to force many ties."""
    Q = V * C
    sims = rng.normal(size=(Q, V))
    sims[np.arange(Q), np.arange(Q) // C] += 1.5
    if levels is not None:
        sims = np.round(sims * levels) / levels
    return sims.astype(dtype)


# ----------------------------------------------------------------------------- retrieval
def test_t2v_hand_computed_ties():
    # 2 videos x 2 captions. Query 0 (video 0): 0.9 vs 0.9 tie with one other -> rank 0.5.
    # Query 1 (video 0): 0.1 < 0.8 -> rank 1. Query 2 (video 1): 0.7 > 0.2 -> 0.
    # Query 3 (video 1): 0.5 == 0.5 -> 0.5.
    sims = np.array([[0.9, 0.9], [0.1, 0.8], [0.2, 0.7], [0.5, 0.5]], dtype=np.float32)
    m = t2v_metrics(sims, return_ranks=True)
    np.testing.assert_array_equal(m["cols"], [0.5, 1.0, 0.0, 0.5])
    assert m["R1"] == 25.0  # only the exact 0 counts for R1 (official cols == 0)
    assert m["R5"] == 100.0
    assert m["MedR"] == 1.5 and m["MeanR"] == pytest.approx(1.5)


def test_t2v_constant_matrix_is_chance_not_perfect():
    sims = np.zeros((6, 3), dtype=np.float32)
    m = t2v_metrics(sims, return_ranks=True)
    np.testing.assert_array_equal(m["cols"], np.full(6, 1.0))  # mean of positions 0, 1, 2
    assert m["R1"] == 0.0 and m["geometric_mean_R1-R5-R10"] == 0.0 and m["MedR"] == 2.0


def test_v2t_hand_computed_min_over_captions_and_mask():
    # 2 videos x 2 captions; column j holds every caption's score with video j.
    sims = np.array(
        [
            [0.3, 0.1],  # caption 0 of video 0
            [0.9, 0.2],  # caption 1 of video 0
            [0.9, 0.4],  # caption 0 of video 1
            [0.0, 0.3],  # caption 1 of video 1 (padded below)
        ],
        dtype=np.float32,
    )
    # video 0: best own caption 0.9 (caption 1) tied with caption 2 -> rank 0.5.
    # video 1: own captions 0.4 (rank 0) and 0.3 -> min 0.
    m = v2t_metrics(sims, return_ranks=True)
    np.testing.assert_array_equal(m["cols"], [0.5, 0.0])
    # mask caption 1 of video 1 and caption 1 of video 0: video 0's best is now 0.3 behind 0.9 -> 1.
    mask = np.array([[1, 0], [1, 0]], dtype=bool)
    m = v2t_metrics(sims, mask, return_ranks=True)
    np.testing.assert_array_equal(m["cols"], [1.0, 0.0])
    np.testing.assert_array_equal(m["cols"], oracle_v2t_cols(sims, mask))


def test_v2t_tied_own_captions_are_competitors():
    # Two identical own captions tied at the top: the official code averages positions 0 and 1.
    sims = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.5]], dtype=np.float32)
    m = v2t_metrics(sims, return_ranks=True)
    np.testing.assert_array_equal(m["cols"], [0.5, 0.0])
    assert m["R1"] == 50.0


@pytest.mark.parametrize("levels", [None, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_retrieval_matches_oracle_random(levels, masked):
    rng = np.random.default_rng(0 if levels is None else levels)
    V, C = 37, 5
    sims = random_sims(rng, V, C, levels)
    mask = None
    if masked:
        mask = rng.random((V, C)) > 0.25
        mask[:, 0] = True  # every video keeps at least one caption
    for chunk in (1 << 10, 1 << 20):  # a tiny chunk exercises the chunk boundaries
        got = t2v_metrics(sims, mask, return_ranks=True, chunk_bytes=chunk)
        want_cols = oracle_t2v_cols(sims, mask)
        np.testing.assert_array_equal(got["cols"], want_cols)
        assert_metrics_equal(got, oracle_metrics(want_cols, len(want_cols)))
        got = v2t_metrics(sims, mask, return_ranks=True, chunk_bytes=chunk)
        want_cols = oracle_v2t_cols(sims, mask)
        np.testing.assert_array_equal(got["cols"], want_cols)
        assert_metrics_equal(got, oracle_metrics(want_cols, V))
    if levels is not None:
        assert np.any(want_cols % 1 == 0.5)  # the test really had ties


def test_retrieval_metrics_single_pass_matches_separate_calls():
    rng = np.random.default_rng(5)
    sims = random_sims(rng, 15, 4, levels=2)
    mask = np.ones((15, 4), dtype=bool)
    mask[3, 1:] = False
    both = retrieval_metrics(sims, mask, return_ranks=True, chunk_bytes=4096)
    for name, fn in (("t2v", t2v_metrics), ("v2t", v2t_metrics)):
        alone = fn(sims, mask, return_ranks=True)
        np.testing.assert_array_equal(both[name]["cols"], alone["cols"])
        assert_metrics_equal(both[name], alone)
    with pytest.raises(ValueError, match="directions"):
        retrieval_metrics(sims, directions=("x2y",))


def test_retrieval_numpy_torch_float64_agree():
    rng = np.random.default_rng(3)
    sims = random_sims(rng, 20, 3, levels=3)
    mask = np.ones((20, 3), dtype=bool)
    mask[4, 2] = mask[7, 1] = False
    for fn in (t2v_metrics, v2t_metrics):
        a = fn(sims, mask, return_ranks=True)
        b = fn(torch.from_numpy(sims), torch.from_numpy(mask), return_ranks=True)
        c = fn(sims.astype(np.float64), mask, return_ranks=True)
        for other in (b, c):
            np.testing.assert_array_equal(a["cols"], other["cols"])
            assert_metrics_equal(a, other)
        # low-precision tensors are ranked exactly (upcast, never rounded further)
        bf = torch.from_numpy(sims).to(torch.bfloat16)
        d = fn(bf, mask.reshape(-1), return_ranks=True)
        e = fn(bf.float().numpy(), mask, return_ranks=True)
        np.testing.assert_array_equal(d["cols"], e["cols"])


def test_retrieval_accepts_reversed_and_read_only_arrays(recwarn):
    rng = np.random.default_rng(4)
    sims = random_sims(rng, 10, 3, levels=3)
    rev = np.ascontiguousarray(sims[::-1])[::-1]  # negative strides, same values
    ro = sims.copy()
    ro.flags.writeable = False
    want = t2v_metrics(sims, return_ranks=True)["cols"]
    np.testing.assert_array_equal(t2v_metrics(rev, return_ranks=True)["cols"], want)
    np.testing.assert_array_equal(t2v_metrics(ro, return_ranks=True)["cols"], want)
    np.testing.assert_array_equal(t2v_metrics(sims.astype(">f4"), return_ranks=True)["cols"], want)
    assert not [w for w in recwarn if "writable" in str(w.message)]


def test_retrieval_bad_inputs():
    with pytest.raises(ValueError, match="multiple"):
        t2v_metrics(np.zeros((7, 3), np.float32))
    with pytest.raises(ValueError, match="query_masks"):
        t2v_metrics(np.zeros((6, 3), np.float32), np.ones((3, 3), bool))
    bad = np.zeros((6, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        t2v_metrics(bad)
    with pytest.raises(ValueError, match="NaN"):
        v2t_metrics(bad)
    mask = np.ones((3, 2), bool)
    mask[1] = False
    with pytest.raises(ValueError, match="no valid caption"):
        v2t_metrics(np.zeros((6, 3), np.float32), mask)


def test_retrieval_infinite_scores_ranked_exactly():
    """inf - inf is NaN: rows and columns with infinite ties are counted again by comparisons."""
    rng = np.random.default_rng(6)
    V, C = 9, 3
    sims = random_sims(rng, V, C, levels=3)
    sims[0, :3] = np.inf  # query 0: its GT (video 0) tied at +inf with videos 1, 2
    sims[4, 1] = np.inf  # query 4's GT (video 1) alone at +inf
    sims[7, :] = -np.inf  # query 7: everything tied at -inf
    sims[10, 5] = np.inf  # a padded caption at +inf must not count for v2t
    mask = np.ones((V, C), bool)
    mask[3, 1] = False
    for chunk in (1 << 8, 1 << 20):
        got = t2v_metrics(sims, mask, return_ranks=True, chunk_bytes=chunk)
        np.testing.assert_array_equal(got["cols"], oracle_t2v_cols(sims, mask))
        got = v2t_metrics(sims, mask, return_ranks=True, chunk_bytes=chunk)
        np.testing.assert_array_equal(got["cols"], oracle_v2t_cols(sims, mask))


def test_cols2metrics_geometric_mean_matches_scipy():
    cols = np.array([0, 0, 1, 3, 7, 12, 60, 0.5, 4.5])
    m = cols2metrics(cols)
    assert_metrics_equal(m, oracle_metrics(cols, len(cols)))
    assert m["geometric_mean_R1-R5-R10"] == pytest.approx(scipy.stats.gmean([m["R1"], m["R5"], m["R10"]]))


# ----------------------------------------------------------------------------- boxes
def test_box_iou_values_and_types():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], dtype=np.float32)
    b = np.array([[0, 0, 10, 10], [10, 10, 20, 20], [0, 0, 5, 10]], dtype=np.float32)
    iou = box_iou(a, b)
    assert isinstance(iou, np.ndarray) and iou.shape == (2, 3)
    np.testing.assert_allclose(iou[0], [1.0, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(iou[1, 0], 25 / 175, atol=1e-6)
    t = box_iou(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), iou)
    # Fast R-CNN "+1" convention: touching boxes overlap by one pixel row/column.
    iou1 = box_iou(a[:1], b[1:2], pixel_offset=1.0)
    np.testing.assert_allclose(iou1, [[1 / (121 + 121 - 1)]], rtol=1e-6)
    # paired IoU is the diagonal of the pairwise matrix
    np.testing.assert_allclose(paired_box_iou(a, b[:2]), np.diag(box_iou(a, b[:2])), atol=1e-7)
    np.testing.assert_allclose(
        paired_box_iou(a, b[:2], pixel_offset=1.0), np.diag(box_iou(a, b[:2], pixel_offset=1.0)), atol=1e-7
    )
    # zero-area boxes: 0, not NaN
    z = np.array([[1, 1, 1, 1]], dtype=np.float32)
    assert box_iou(z, z)[0, 0] == 0.0 and paired_box_iou(z, z)[0] == 0.0


def test_box_checks():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        box_iou(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="x2 < x1"):
        box_iou(np.array([[5.0, 0, 1, 1]]), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="same shape"):
        accuracy_at_iou(np.zeros((2, 4)), np.zeros((3, 4)))


def test_accuracy_at_iou_threshold_convention():
    gt = np.array([[0, 0, 10, 10]] * 3, dtype=np.float64)
    pred = np.array([[0, 0, 10, 10], [0, 0, 5, 10], [0, 0, 2, 10]], dtype=np.float64)  # IoU 1, 0.5, 0.2
    assert accuracy_at_iou(pred, gt) == pytest.approx(1 / 3)  # strict >
    assert accuracy_at_iou(pred, gt, inclusive=True) == pytest.approx(2 / 3)  # >= (CLIP-VG)
    assert mean_iou(pred, gt) == pytest.approx((1 + 0.5 + 0.2) / 3)


# ----------------------------------------------------------------------------- phrase recall
def _phrase_case():
    proposals = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10], [50, 50, 60, 60]], dtype=np.float32)
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [100, 100, 110, 110]], dtype=np.float32)
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.3],  # phrase 0: order 1, 2, 3, 0; hits are 0 and 2 -> first hit at 1
            [0.2, 0.2, 0.2, 0.2],  # phrase 1: all tied -> order 0, 1, 2, 3 (stable); hit 1 -> 1
            [0.4, 0.3, 0.2, 0.1],  # phrase 2: no proposal hits
        ],
        dtype=np.float32,
    )
    return scores, proposals, gt


def test_phrase_recall_at_k_and_tie_rule():
    scores, proposals, gt = _phrase_case()
    first = phrase_first_hit(scores, proposals, gt)
    assert first.tolist() == [1, 1, math.inf]
    assert phrase_recall_at_k(scores, proposals, gt, ks=(1, 2, 10)) == {1: 0, 2: 2, 10: 2}
    # tie rule: with all scores tied, moving the hitting proposal to index 0 makes it first
    proposals2 = proposals[[1, 0, 2, 3]]
    assert phrase_first_hit(scores, proposals2, gt)[1] == 0
    assert phrase_first_hit(scores, proposals2, gt).tolist() == [0, 0, math.inf]
    # torch input, k > N
    out = phrase_recall_at_k(torch.from_numpy(scores), torch.from_numpy(proposals), torch.from_numpy(gt), ks=(100,))
    assert out == {100: 2}


def test_phrase_recall_threshold_convention():
    proposals = np.array([[0, 0, 5, 10]], dtype=np.float32)  # IoU exactly 0.5 with the GT
    gt = np.array([[0, 0, 10, 10]], dtype=np.float32)
    scores = np.ones((1, 1), dtype=np.float32)
    assert phrase_recall_at_k(scores, proposals, gt, ks=(1,)) == {1: 0}
    assert phrase_recall_at_k(scores, proposals, gt, ks=(1,), inclusive=True) == {1: 1}


def test_phrase_accumulator_mask_merge_and_oracle():
    rng = np.random.default_rng(0)
    acc, acc_a, acc_b = PhraseRecallAccumulator(), PhraseRecallAccumulator(), PhraseRecallAccumulator()
    hits = {1: 0, 5: 0, 10: 0}
    upper = total = 0
    for img in range(12):
        N, P = int(rng.integers(3, 15)), int(rng.integers(1, 6))
        xy = rng.uniform(0, 50, size=(N, 2))
        proposals = np.concatenate([xy, xy + rng.uniform(5, 40, size=(N, 2))], 1).astype(np.float32)
        src = rng.integers(0, N, size=P)  # each GT box is a jittered proposal (or a far-away box)
        gt = proposals[src] + rng.uniform(-3, 3, size=(P, 4)).astype(np.float32)
        gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 1)
        gt[rng.random(P) < 0.2] += 500
        scores = np.round(rng.normal(size=(P, N)), 1).astype(np.float32)  # rounding forces ties
        scores[np.arange(P), src] += rng.choice([0.0, 1.0], size=P).astype(np.float32)
        mask = rng.random(P) > 0.3
        acc.update(scores, proposals, gt, mask)
        (acc_a if img % 2 else acc_b).update(torch.from_numpy(scores), proposals, gt, torch.from_numpy(mask))
        # oracle: python loop, stable descending order (lower index first among ties)
        iou = box_iou(gt, proposals)
        for p in range(P):
            if not mask[p]:
                continue
            total += 1
            order = sorted(range(N), key=lambda n: (-scores[p, n], n))
            hit = [iou[p, n] > 0.5 for n in order]
            upper += any(hit)
            for k in hits:
                hits[k] += any(hit[:k])
    got = acc.compute()
    assert got["num_phrases"] == total
    for k in (1, 5, 10):
        assert got[f"R@{k}"] == pytest.approx(hits[k] / total)
    assert got["upper_bound"] == pytest.approx(upper / total)
    assert 0 < got["R@1"] < got["R@5"] <= got["R@10"] <= got["upper_bound"] < 1
    assert acc_a.merge(acc_b).compute() == got
    assert acc.all_reduce().compute() == got  # not distributed: unchanged
    with pytest.raises(ValueError, match="no phrases"):
        PhraseRecallAccumulator().compute()
    with pytest.raises(ValueError, match="gt_boxes"):
        acc.update(np.zeros((2, 3)), np.zeros((3, 4)), np.zeros((3, 4)))


# ----------------------------------------------------------------------------- benchmark smoke test
def test_bench_metrics_baseline_agrees_small():
    from groundkit.bench.metrics import check_same, make_inputs, run_baseline, run_groundkit, run_groundkit_fused

    sims, mask = make_inputs(50, 4, seed=1)
    base = run_baseline(sims, mask)
    assert np.any(base["t2v_cols"] % 1 == 0.5)  # the synthetic matrix has exact ties
    assert not mask.all()
    assert check_same(base, run_groundkit(sims, mask)) == []
    assert check_same(base, run_groundkit_fused(torch.from_numpy(sims), torch.from_numpy(mask))) == []
    other = run_groundkit(sims[:, ::-1].copy(), mask)  # a different matrix must be caught
    assert check_same(base, other)


# ----------------------------------------------------------------------------- referring-expression baselines


def test_refexp_baselines_hand_computed():
    from groundkit.metrics import objects_per_image, refexp_baseline_hits, refexp_baselines

    # image a (100 x 100): a big box in a corner, a small one in the centre; image b: one object only
    big, small, only = [0, 0, 60, 60], [45, 45, 55, 55], [10, 10, 20, 20]
    gt = np.array([big, small, only], dtype=float)
    objs = objects_per_image(["a", "a", "b"], gt)
    assert [len(o) for o in objs] == [2, 2, 1]
    sizes = [(100, 100), (100, 100), (40, 40)]
    hits = refexp_baseline_hits(gt, objs, sizes)
    np.testing.assert_allclose(hits["random_object"], [0.5, 0.5, 1.0])
    np.testing.assert_array_equal(hits["largest_object"], [1, 0, 1])
    np.testing.assert_array_equal(hits["centre_object"], [0, 1, 1])
    pct = refexp_baselines(gt, objs, sizes)
    assert pct == pytest.approx({"random_object": 200 / 3, "largest_object": 200 / 3, "centre_object": 200 / 3})
    # a duplicated expression does not duplicate its object; boxes within 0.005 px are one object
    assert len(objects_per_image(["a", "a"], [big, [0, 0, 60.001, 60]])[0]) == 1
    with pytest.raises(ValueError, match="3 boxes, 2 object lists"):
        refexp_baselines(gt, objs[:2], sizes)
    with pytest.raises(ValueError, match="no objects"):
        refexp_baselines(gt[:1], [np.zeros((0, 4))], sizes[:1])


def test_refexp_baselines_strict_threshold():
    from groundkit.metrics import refexp_baseline_hits

    # IoU exactly 0.5: a hit with >= (CLIP-VG), not with > (co-grounding's official rule)
    gt, other = [0, 0, 10, 10], [0, 0, 10, 20]
    objs = [np.array([other], dtype=float)]
    assert refexp_baseline_hits([gt], objs, [(20, 20)], 0.5, inclusive=True)["largest_object"][0] == 1
    assert refexp_baseline_hits([gt], objs, [(20, 20)], 0.5, inclusive=False)["largest_object"][0] == 0
