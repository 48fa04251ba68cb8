"""End to end on the tiny retrieval world: train + eval through the CLI, the Retriever, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from groundkit.cli import main
from groundkit.world.retrieval import build

TINY_SET = [
    "train.epochs=20",
    "train.batch_size=16",
    "train.eval_every=10",
    "train.tensorboard=false",
    "train.progress=false",
    "optim.name=adam",
    "optim.lr=0.01",
    "model.shared_dim=64",
    "sched.step_size=10",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("crosskd")
    world = base / "world"
    build(world, "tiny", seed=0)
    run = base / "run"
    rc = main(
        [
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
    )
    assert rc == 0
    return world, run


def test_train_beats_chance_and_writes_metrics(trained):
    world, run = trained
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "crosskd" and m["split"] == "test"
    met = m["metrics"]
    chance = 100.0 / met["num_videos"]  # 16 test videos x 20 captions
    assert met["num_videos"] == 16 and met["num_queries"] == 320
    assert met["t2v_R1"] > 1.5 * chance, met
    assert met["t2v_MedR"] < (met["num_videos"] + 1) / 2, met
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert any("loss_caption_kd" in r for r in log if r["kind"] == "train")


def test_eval_cli_prints_t2v_v2t(trained, capsys, tmp_path):
    world, run = trained
    rc = main(
        [
            "eval",
            str(run / "checkpoints" / "best"),  # the model and the data as the run was trained
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "[t2v] R@1:" in out and "[v2t] R@1:" in out and "MdR:" in out and "MnR:" in out
    again = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    first = json.loads((run / "metrics.json").read_text())["metrics"]
    assert again["t2v_R1"] == pytest.approx(first["t2v_R1"]) and again["v2t_MeanR"] == pytest.approx(first["v2t_MeanR"])


def test_retriever_exact_and_sensible(trained):
    from groundkit.methods.crosskd import similarity_matrix
    from groundkit.methods.crosskd.predict import Retriever

    world, run = trained
    r = Retriever.from_checkpoint(run / "checkpoints" / "best", split="test")
    assert len(r.video_ids) == 16 and len(r.patterns) >= 2  # the audio expert is missing for some videos
    # FAISS per availability pattern == brute-force similarity of the evaluation path
    sims = similarity_matrix(r.model, r.dataset, torch.device("cpu"))
    atts = json.loads((world / "attributes.json").read_text())
    caps = [r.store.captions(r.store.index[v])[0] for v in r.video_ids]
    hits = r.search(caps, k=16)
    for qi, ranked in enumerate(hits):
        scores = [s for _, s in ranked]
        assert scores == sorted(scores, reverse=True) and len(ranked) == 16
        row = sims[qi * r.dataset.captions_per_video]  # the first caption of video qi
        for vid, s in ranked:
            assert s == pytest.approx(float(row[r.video_ids.index(vid)]), abs=1e-4)
    # sensible order: own video ranked above the median for most queries
    ranks = [[v for v, _ in h].index(r.video_ids[i]) for i, h in enumerate(hits)]
    assert np.mean(ranks) < 7.5, ranks
    v2t = r.search_video(r.video_ids[0], k=5)
    assert len(v2t) == 5 and all(isinstance(c, str) for c, _, _ in v2t) and v2t[0][2] >= v2t[-1][2]
    assert atts[r.video_ids[0]]["object"]  # attributes file readable


def test_predict_cli(trained, capsys):
    world, run = trained
    rc = main(
        [
            "predict",
            "retrieval",
            "--checkpoint",
            str(run),
            "--query",
            "a dog is running",
            "-k",
            "3",
            "--json",
            "--video-id",
            "video0070",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["t2v"]["a dog is running"]) == 3 and len(out["v2t"]["video0070"]) == 3
    # an empty query and k < 1 end in one line (exit 2), not in rankings or a faiss assertion
    base = ["predict", "retrieval", "--checkpoint", str(run), "--json"]
    for extra, msg in (
        (["--query", "  "], "query is empty"),
        (["--query", "a dog", "-k", "0"], "must be a whole number >= 1"),
        (["--video-id", "video0070", "-k", "-2"], "must be a whole number >= 1"),
        (["--query", "xyzzyq qwzzrt"], "none of its words is known to the text encoder (xyzzyq, qwzzrt)"),
    ):
        assert main(base + extra) == 2, extra
        cap = capsys.readouterr()
        err = cap.err.strip().splitlines()
        assert cap.out == "" and len(err) == 1 and msg in err[0], (extra, err)
    # a query with an unknown word: ranked, and the word is named (stderr, and in the JSON)
    assert main(base + ["--query", "a dog xyzzyq"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["unknown_words"] == {"a dog xyzzyq": ["xyzzyq"]} and "xyzzyq" in cap.err


def test_resume_draws_the_same_captions(tmp_path, trained):
    """Killed after 5 steps and resumed: bit-identical weights (the caption picks are a function of
    (seed, epoch, video), not of a generator that a restart would reset)."""
    world, _ = trained
    common = [
        "--set",
        f"data.root={world}",
        "world.size=",
        *TINY_SET,
        "train.epochs=3",
        "train.eval_every=0",
        "train.ckpt_every_steps=1",
    ]
    assert main(["train", "crosskd", "synth_cecap", "--output-dir", str(tmp_path / "full"), *common]) == 0
    assert (
        main(["train", "crosskd", "synth_cecap", "--output-dir", str(tmp_path / "cut"), *common, "train.max_steps=5"])
        == 0
    )
    assert main(["train", "crosskd", "synth_cecap", "--output-dir", str(tmp_path / "cut"), "--resume", *common]) == 0
    from safetensors.torch import load_file

    from groundkit.checkpoint import latest_checkpoint

    ca, cb = latest_checkpoint(tmp_path / "full"), latest_checkpoint(tmp_path / "cut")
    assert ca.name == cb.name == "step-00000009"
    a, b = load_file(str(ca / "model.safetensors")), load_file(str(cb / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_caption_picks_depend_on_epoch_only(trained):
    from groundkit.config import load_config
    from groundkit.methods.crosskd import METHOD, CrossKDConfig

    world, _ = trained
    cfg = load_config(
        CrossKDConfig,
        "synth_cecap",
        {"data.root": str(world), "world.size": "", "train.seed": 3},
        method="crosskd",
    )
    a, b = METHOD.build_dataset(cfg, "train"), METHOD.build_dataset(cfg, "train")
    idx = list(range(len(a)))
    b.get_batch(idx[:7])  # drawing other batches first changes nothing
    for ep in (0, 4):
        a.set_epoch(ep), b.set_epoch(ep)
        assert torch.equal(a.get_batch(idx)["text"], b.get_batch(idx)["text"])
    a.set_epoch(0)
    b.set_epoch(1)
    assert not torch.equal(a.get_batch(idx)["text"], b.get_batch(idx)["text"])
