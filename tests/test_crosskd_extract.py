"""``groundkit data extract-experts`` on a few tiny videos written here with PyAV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from groundkit.cli import main  # noqa: E402
from groundkit.formats.collaborative_experts import FeatureError  # noqa: E402
from groundkit.methods.crosskd.extract import extract_experts, read_frames  # noqa: E402
from groundkit.methods.crosskd.store import ExpertStore  # noqa: E402


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("vids")
    rng = np.random.default_rng(0)
    moving = np.zeros((6, 64, 64, 3), dtype=np.uint8)
    for t in range(6):  # a white square sliding right over blue
        moving[t, :, :, 2] = 160
        moving[t, 20:40, 5 + 8 * t : 25 + 8 * t] = 255
    still = np.repeat(rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8), 4, axis=0)
    write_video(d / "moving.mp4", moving)
    write_video(d / "still.mp4", still)
    write_video(d / "single.mp4", still[:1])
    (d / "captions.json").write_text(
        json.dumps(
            {
                "moving": ["a white square slides right", "a box moves"],
                "still": ["noise that does not move"],
                "single": ["one frame"],
            }
        )
    )
    return d


def test_read_frames(videos):
    f = read_frames(videos / "moving.mp4", num_frames=4, size=32)
    assert f.shape == (4, 32, 32, 3) and f.dtype == np.uint8
    with pytest.raises(FeatureError, match="video not found"):
        read_frames(videos / "nope.mp4")


def test_extract_experts_store(videos, tmp_path):
    st = extract_experts(
        videos, tmp_path / "store", captions=videos / "captions.json", num_frames=4, size=96, progress=False
    )
    st = ExpertStore(st.root)
    assert sorted(st.video_ids) == ["moving", "single", "still"]
    assert {k: v["dim"] for k, v in st.experts.items()} == {"appearance": 1280, "motion": 1280, "scene": 5120}
    idx = st.indices(["moving", "still", "single"])
    motion, avail, _ = st.expert_batch("motion", idx)
    assert avail.tolist() == [True, True, False]  # one frame: no motion expert
    assert np.abs(motion[0]).mean() > 5 * np.abs(motion[1]).mean()  # the sliding square moves, the still video does not
    app, avail, _ = st.expert_batch("appearance", idx)
    assert avail.all() and np.isfinite(app).all()
    text = st.meta["text"]["all-minilm-l6-v2"]
    assert text["dim"] == 384 and text["encoder"]["kind"] == "transformers"
    rows = st.caption_rows("all-minilm-l6-v2", idx)
    assert [len(r) for r in rows] == [2, 1, 1]
    assert st.captions(st.index["moving"])[0] == "a white square slides right"


def test_extract_cli_errors(videos, tmp_path, capsys):
    (tmp_path / "caps.json").write_text(json.dumps({"moving": ["x"]}))
    rc = main(
        [
            "data",
            "extract-experts",
            "--videos",
            str(videos),
            "--out",
            str(tmp_path / "s"),
            "--captions",
            str(tmp_path / "caps.json"),
            "--num-frames",
            "2",
            "--size",
            "64",
            "--quiet",
        ]
    )
    assert rc == 2 and "no captions for video" in capsys.readouterr().err
    rc = main(["data", "extract-experts", "--videos", str(tmp_path / "none"), "--out", str(tmp_path / "s2")])
    assert rc == 2 and "no such file or directory" in capsys.readouterr().err
