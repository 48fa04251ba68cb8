"""Readers of the Collaborative Experts / TeachText feature archives and the memory-mapped store."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from groundkit.formats.collaborative_experts import (
    FeatureError,
    read_expert_pickle,
    read_raw_captions,
    read_split_list,
    read_teacher_pickle,
    read_text_features,
)
from groundkit.methods.crosskd.data import BatchSpec, RetrievalEvalSet, RetrievalTrainSet
from groundkit.methods.crosskd.store import ExpertStore, convert_released

IDS = ["video0", "video1", "video2", "video3"]


def _dump(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # old protocol, as the released (Python 2/3) pickles


def make_released(root: Path) -> dict:
    """A 4-video data set in the released MSRVTT layout."""
    rng = np.random.default_rng(0)
    app = {v: rng.standard_normal(6).astype(np.float32) for v in IDS}
    audio = {v: rng.standard_normal((i + 2, 3)).astype(np.float32) for i, v in enumerate(IDS)}
    audio["video1"] = float("nan")  # missing expert, as in Audio_MSRVTT_new.pickle
    caps = {v: [["a", "dog", str(i)], ["the", "cat"]] for i, v in enumerate(IDS)}
    caps["video3"] = [["only", "one"]]
    text = {v: [rng.standard_normal((len(c), 5)).astype(np.float32) for c in caps[v]] for v in IDS}
    teach = {
        v: {
            "vid_embds": {"app": rng.standard_normal(4), "audio": rng.standard_normal(4)},
            "text_embds": {
                "app": rng.standard_normal((len(caps[v]), 4)),
                "audio": rng.standard_normal((len(caps[v]), 4)),
            },
        }
        for v in IDS
    }
    _dump(root / "aggregated_imagenet_25fps_256px_stride1_offset0/senet154-avg.pickle", app)
    _dump(root / "aggregated_audio_feats/Audio_MSRVTT_new.pickle", audio)
    _dump(root / "raw-captions.pkl", caps)
    _dump(root / "aggregated_text_feats/w2v.pkl", text)
    _dump(root / "teachers/t.pkl", teach)
    (root / "train_list_full.txt").write_text("video0\nvideo1\n\n")
    (root / "test_list_full.txt").write_text("video2\nvideo3\n")
    return {"app": app, "audio": audio, "caps": caps, "text": text, "teach": teach}


EXPERTS = {
    "app": "aggregated_imagenet_25fps_256px_stride1_offset0/senet154-avg.pickle",
    "audio": "aggregated_audio_feats/Audio_MSRVTT_new.pickle",
}


def test_readers_released_layout(tmp_path):
    src = make_released(tmp_path)
    assert read_split_list(tmp_path / "train_list_full.txt") == ["video0", "video1"]
    feats, kind, dim = read_expert_pickle(tmp_path / EXPERTS["app"], IDS)
    assert kind == "fixed" and dim == 6 and np.allclose(feats["video2"], src["app"]["video2"])
    feats, kind, dim = read_expert_pickle(tmp_path / EXPERTS["audio"], IDS)
    assert kind == "ragged" and dim == 3 and feats["video1"] is None and feats["video3"].shape == (5, 3)
    caps = read_raw_captions(tmp_path / "raw-captions.pkl", IDS)
    assert caps["video3"] == [["only", "one"]]
    text = read_text_features(tmp_path / "aggregated_text_feats/w2v.pkl", IDS, dim=5)
    assert [a.shape for a in text["video0"]] == [(3, 5), (2, 5)]
    teach, experts, d = read_teacher_pickle(tmp_path / "teachers/t.pkl", IDS)
    assert experts == ["app", "audio"] and d == 4 and teach["video0"][1].shape == (2, 2, 4)


def test_reader_errors_are_clear(tmp_path):
    make_released(tmp_path)
    with pytest.raises(FeatureError, match="not found"):
        read_expert_pickle(tmp_path / "nope.pickle")
    with pytest.raises(FeatureError, match=r"video id 'video9' is absent"):
        read_expert_pickle(tmp_path / EXPERTS["app"], IDS + ["video9"])
    feats, _, _ = read_expert_pickle(tmp_path / EXPERTS["app"], IDS + ["video9"], missing_ids="nan")
    assert feats["video9"] is None
    with pytest.raises(FeatureError, match=r"feature dim 6, expected 2048"):
        read_expert_pickle(tmp_path / EXPERTS["app"], IDS, dim=2048)
    with pytest.raises(FeatureError, match="expected 300"):
        read_text_features(tmp_path / "aggregated_text_feats/w2v.pkl", IDS, dim=300)
    with pytest.raises(FeatureError, match="split list not found"):
        read_split_list(tmp_path / "val_list_full.txt")


def test_store_round_trip_fp16_ragged(tmp_path):
    src = make_released(tmp_path)
    st = convert_released(
        tmp_path,
        tmp_path / "store",
        EXPERTS,
        {"w2v": "aggregated_text_feats/w2v.pkl"},
        {"train_list_full": "train_list_full.txt", "test_list_full": "test_list_full.txt"},
        teachers={"t": "teachers/t.pkl"},
    )
    st = ExpertStore(st.root)  # reopen from disk
    assert st.split("test_list_full") == ["video2", "video3"]
    assert np.load(st.root / "expert.app.npy", mmap_mode="r").dtype == np.float16
    idx = st.indices(IDS)
    x, avail, mask = st.expert_batch("app", idx)
    assert np.allclose(x, np.stack([src["app"][v] for v in IDS]), atol=2e-3) and avail.all() and mask is None
    x, avail, mask = st.expert_batch("audio", idx, max_len=4)
    assert x.shape == (4, 4, 3) and avail.tolist() == [True, False, True, True]
    assert mask.sum(1).tolist() == [2, 0, 4, 4]  # video3 has 5 steps, truncated to 4
    assert np.allclose(x[2, :4], src["audio"]["video2"], atol=2e-3) and not x[1].any()
    rows = st.caption_rows("w2v", idx)
    assert [len(r) for r in rows] == [2, 2, 2, 1]
    t, m = st.text_batch("w2v", [[rows[0][0]], [rows[1][0], rows[1][1]]], max_tokens=4)
    assert m.sum(1).tolist() == [3, 4]  # fused query: 3 + 2 tokens truncated to 4
    assert np.allclose(t[0, :3], src["text"]["video0"][0], atol=2e-3)
    assert np.allclose(t[1, 3], src["text"]["video1"][1][0], atol=2e-3)
    tv, tt = st.teacher_batch("t", idx[:1], np.array([rows[0][1]]))
    assert np.allclose(tt[0, 0], src["teach"]["video0"]["text_embds"]["app"][1], atol=2e-3)
    assert st.captions(0) == ["a dog 0", "the cat"]
    with pytest.raises(FeatureError, match="has dim 6, config says 7"):
        st.check_expert("app", 7)
    with pytest.raises(FeatureError, match="no expert 'flow'"):
        st.check_expert("flow")


def test_datasets_batches_and_query_masks(tmp_path):
    make_released(tmp_path)
    st = convert_released(
        tmp_path,
        tmp_path / "store",
        EXPERTS,
        {"w2v": "aggregated_text_feats/w2v.pkl"},
        {"train_list_full": "train_list_full.txt", "test_list_full": "test_list_full.txt"},
        teachers={"t": "teachers/t.pkl"},
    )
    spec = BatchSpec(experts=["app", "audio"], text="w2v", max_tokens={"text": 4, "audio": 3}, teachers=["t"])
    tr = RetrievalTrainSet(st, st.split("train_list_full"), spec, seed=0)
    b = tr.get_batch([0, 1])
    assert b["text"].shape == (2, 4, 5) and b["experts"]["audio"].shape == (2, 3, 3)
    assert b["avail"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert b["teacher_video"].shape == (1, 2, 2, 4) and b["teacher_text"].shape == (1, 2, 2, 4)
    ev = RetrievalEvalSet(st, IDS, spec, num_test_captions=20)
    assert ev.captions_per_video == 2 and ev.query_masks.tolist() == [[True, True]] * 3 + [[True, False]]
    assert len(ev.flat_queries()) == 8 and ev.flat_queries()[7] == []
    fused = RetrievalEvalSet(st, IDS, BatchSpec(["app"], "w2v", {"text": 4}, [], fuse_captions=True))
    assert fused.captions_per_video == 1 and fused.text_batch(fused.flat_queries())["text_mask"].sum(1).tolist() == [
        4,
        4,
        4,
        2,
    ]


def test_convert_experts_cli(tmp_path, capsys):
    import json

    from groundkit.cli import main

    make_released(tmp_path)
    args = [
        "data",
        "convert-experts",
        "--root",
        str(tmp_path),
        "--out",
        str(tmp_path / "st"),
        "--dataset",
        "msrvtt",
        "--expert",
        f"app={EXPERTS['app']}",
        "--expert",
        f"audio={EXPERTS['audio']}",
        "--text",
        "w2v=aggregated_text_feats/w2v.pkl",
        "--teacher",
        "t=teachers/t.pkl",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        out["videos"] == 4
        and out["experts"] == {"app": 6, "audio": 3}
        and out["splits"] == {"train_list_full": 2, "test_list_full": 2}
    )
    assert main(args[:-2] + ["--expert", "flow=missing.pickle"]) == 2
    assert "feature file not found" in capsys.readouterr().err
