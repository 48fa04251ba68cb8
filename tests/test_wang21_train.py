"""wang21 end to end through the CLI on tiny files in the seed's format: train, eval, metrics.json."""

from __future__ import annotations

import json

import pytest
import torch
from test_wang21_data import make_world

from groundkit.cli import main
from groundkit.config import load_config
from groundkit.methods.wang21 import METHOD, Wang21Config, Wang21Dataset, resolve_paths

SMALL = [
    "model.lstm_hidden=32",
    "model.mlp_hidden=64",
    "model.embed_dim=32",
    "data.region_dim=16",
    "data.norm_preset=compute",
    "data.n_proposals=0",
    "data.captions_per_image=0",
    "loss.teacher_form=prob_centered",
    "loss.ramp_every=5",
    "train.progress=false",
    "train.tensorboard=false",
    "optim.lr=3e-3",
    "train.eval_batch_size=16",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("w21")
    p = make_world(root, n_images=48, split="train")
    make_world(root, n_images=12, split="val", glove=False)
    make_world(root, n_images=12, split="test", glove=False)
    return root, p


def _args(root, p, *extra):
    return [
        "--region-feat-path",
        str(root / "region_features_{split}.hdf5"),
        "--phrase-feat-path",
        str(root / "phrase_features_{split}.hdf5"),
        "--glove-path",
        p["glove"],
        *extra,
    ]


def test_train_eval_cli_beats_random(world, tmp_path, capsys):
    torch.set_num_threads(1)
    root, p = world
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "wang21",
            *_args(root, p, "--phrase-to-label-json", p["json"], "--class-names", p["classes"]),
            "--output-dir",
            str(out),
            "--seed",
            "0",
            "--set",
            *SMALL,
            "train.epochs=12",
            "train.batch_size=16",
            "train.eval_every=4",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "wang21" and m["split"] == "test"
    met = m["metrics"]
    assert met["num_phrases"] > 0 and met["num_pairs"] == 24
    assert met["R@1"] <= met["R@5"] <= met["R@10"] <= met["upper_bound"]
    assert met["R@1"] > met["random_R@1"] + 15, met  # percent
    assert 0.0 < met["teacher_R@1"] <= 100.0 and met["teacher_coverage"] == pytest.approx(100.0)
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if r.get("kind") == "train"]
    assert "distill" in train_logs[-1] and train_logs[-1]["ramp"] > 1.0
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    capsys.readouterr()
    # eval of the best checkpoint on the test files, as the seed's eval_model.py
    rc = main(
        [
            "eval",
            "wang21",
            "--region_feat_path",
            str(root / "region_features_test.hdf5"),
            "--phrase_feat_path",
            str(root / "phrase_features_test.hdf5"),
            "--glove_path",
            p["glove"],
            "--restore-path",
            str(out / "checkpoints" / "best"),
            "--output-dir",
            str(tmp_path / "ev"),
            "--set",
            *SMALL,
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| test | " in printed and "upper bound" in printed and "random ranking" in printed
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert ev["R@1"] == pytest.approx(met["R@1"]) and ev["R@10"] == pytest.approx(met["R@10"])
    # predict: rank one test image's proposals for free text with the checkpoint
    rc = main(
        [
            "predict",
            "phrase",
            "--restore-path",
            str(out / "checkpoints" / "best"),
            "--region-feat-path",
            str(root / "region_features_test.hdf5"),
            "--image-id",
            "test0000",
            "--phrase",
            "the red puppy",
            "--top-k",
            "3",
        ]
    )
    assert rc == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred[0]["tokens"] == ["the", "red", "puppy"] and len(pred[0]["boxes"]) == 3
    assert pred[0]["scores"] == sorted(pred[0]["scores"], reverse=True)


def test_seed_command_without_json_is_nce_and_without_val(world, tmp_path):
    """The README's training command: literal file names, no JSON -> NCE, no validation/test files."""
    torch.set_num_threads(1)
    root, p = world
    out = tmp_path / "nce"
    rc = main(
        [
            "train",
            "wang21",
            "--region_feat_path",
            str(root / "region_features_train.hdf5"),
            "--phrase_feat_path",
            str(root / "phrase_features_train.hdf5"),
            "--glove_path",
            p["glove"],
            "--output-dir",
            str(out),
            "--set",
            *SMALL,
            "train.max_steps=3",
        ]
    )
    assert rc == 0
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if r.get("kind") == "train"]
    assert train_logs and all("distill" not in r for r in train_logs)
    assert not [r for r in logs if r.get("kind") == "eval"]
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()


def test_paths_templates_and_eval_override():
    cfg = load_config(
        Wang21Config,
        "reference_distill",
        {
            "data.region_feat_path": "r_{split}.h5",
            "data.phrase_feat_path": "p_{split}.h5",
            "data.test_region_feat_path": "T.h5",
            "data.test_phrase_feat_path": "TP.h5",
        },
        method="wang21",
    )
    assert resolve_paths(cfg.data, "val") == ("r_val.h5", "p_val.h5")
    assert resolve_paths(cfg.data, "test") == ("T.h5", "TP.h5")
    cfg.data.eval_region_feat_path, cfg.data.eval_phrase_feat_path = "E.h5", "EP.h5"
    assert resolve_paths(cfg.data, "test") == ("E.h5", "EP.h5") and resolve_paths(cfg.data, "train") == (
        "r_train.h5",
        "p_train.h5",
    )
    o = METHOD.cli_overrides({"region_feat_path": "a.h5", "phrase_feat_path": "b.h5"}, "train")
    assert o["train.val_split"] == "" and o["data.region_feat_path"] == "a.h5"
    o = METHOD.cli_overrides({"region_feat_path": "a.h5", "phrase_feat_path": "b.h5"}, "eval")
    assert o == {"data.eval_region_feat_path": "a.h5", "data.eval_phrase_feat_path": "b.h5"}


def test_dataset_batches_and_caption_setting(world):
    root, p = world
    over = {
        "data.region_feat_path": str(root / "region_features_{split}.hdf5"),
        "data.phrase_feat_path": str(root / "phrase_features_{split}.hdf5"),
        "data.glove_path": p["glove"],
        "data.region_dim": 16,
        "data.n_proposals": 0,
        "data.phrase_to_label_json": p["json"],
        "data.class_names": p["classes"],
        "data.captions_per_image": 1,
    }
    cfg = load_config(Wang21Config, "reference_distill", over, method="wang21")
    ds = Wang21Dataset(cfg, "train", *resolve_paths(cfg.data, "train"))
    assert len(ds) == 48  # one caption per image: the official code's behaviour with the README's file names
    cfg.data.captions_per_image = 0
    ds = Wang21Dataset(cfg, "train", *resolve_paths(cfg.data, "train"))
    assert len(ds) == 96
    b = ds.get_batch([0, 1, 5])
    assert (
        b["region_feats"].shape == (3, 12, 16)
        and b["words"].shape == (3, 4, 10, 8)
        and b["teacher_w"].shape == (3, 4, 6)
    )
    assert b["image_index"].tolist() == [0, 0, 2]
    # every phrase with tokens maps to exactly one class (hard map)
    tw = b["teacher_w"][b["train_valid"]]
    assert torch.allclose(tw.sum(-1), torch.ones(len(tw)))
    cfg.data.captions_per_image = 3
    with pytest.raises(ValueError, match=r"captions_per_image=3 but the file stores 2 sentences"):
        Wang21Dataset(cfg, "train", *resolve_paths(cfg.data, "train"))


def test_teacher_form_auto_is_a_clear_error(world, tmp_path):
    root, p = world
    over = {
        "data.region_feat_path": str(root / "region_features_{split}.hdf5"),
        "data.phrase_feat_path": str(root / "phrase_features_{split}.hdf5"),
        "data.glove_path": p["glove"],
        "data.region_dim": 16,
        "data.n_proposals": 0,
        "data.phrase_to_label_json": p["json"],
        "data.class_names": p["classes"],
        "data.captions_per_image": 0,
        "model.lstm_hidden": 8,
        "model.mlp_hidden": 8,
        "model.embed_dim": 8,
    }
    cfg = load_config(Wang21Config, "reference_distill", over, method="wang21")
    ds = Wang21Dataset(cfg, "train", *resolve_paths(cfg.data, "train"))
    model = METHOD.build_model(cfg)
    with pytest.raises(ValueError, match=r"the logits have 5 classes"):
        METHOD.training_step(model, ds.get_batch(list(range(8))), 0, cfg)


@pytest.mark.slow
def test_world_tiny_end_to_end(tmp_path):
    """The built-in world's phrase task: prepare-flickr30k reproduces its phrase HDF5, and the world
    config trains through the CLI to above the random ranking."""
    import numpy as np

    from groundkit.formats import wang21_hdf5 as w
    from groundkit.world import generate

    world = generate("phrase", size="tiny", seed=0, out=tmp_path / "world")
    fe = world / "flickr30k_entities"
    ids = [x.strip() for x in (fe / "test.txt").read_text().split() if x.strip()]
    w.prepare_flickr30k(fe, ids, tmp_path / "prep.hdf5")
    a, b = w.read_phrase_hdf5(tmp_path / "prep.hdf5", ids), w.read_phrase_hdf5(world / "phrase_features_test.hdf5", ids)
    assert (a.phrase_strings() == b.phrase_strings()).all()
    assert np.allclose(a.gt_boxes, b.gt_boxes)
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "wang21",
            "world_reference_distill",
            "--region-feat-path",
            str(world / "region_features_{split}.hdf5"),
            "--phrase-feat-path",
            str(world / "phrase_features_{split}.hdf5"),
            "--glove-path",
            str(world / "glove.hdf5"),
            "--phrase-to-label-json",
            str(world / "phrase_to_label.json"),
            "--class-names",
            str(world / "detector_classes.txt"),
            "--output-dir",
            str(out),
            "--set",
            "train.epochs=6",
            "optim.lr=1e-3",
            "train.progress=false",
            "train.tensorboard=false",
        ]
    )
    assert rc == 0
    met = json.loads((out / "metrics.json").read_text())["metrics"]
    assert met["random_R@1"] < met["R@1"] <= met["upper_bound"]


def test_cli_data_error_is_one_line(world, tmp_path, capsys):
    """A data error reaches the user as one line naming the file and the setting, without a traceback."""
    root, p = world
    rc = main(
        [
            "train",
            "wang21",
            *_args(root, p),
            "--output-dir",
            str(tmp_path / "r"),
            "--set",
            *SMALL,
            "data.captions_per_image=3",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("groundkit: error:") and "captions_per_image=3" in err and "phrase_features_train.hdf5" in err
    assert "Traceback" not in err


def _eval_overrides(root, p):
    return {
        "data.region_feat_path": str(root / "region_features_{split}.hdf5"),
        "data.phrase_feat_path": str(root / "phrase_features_{split}.hdf5"),
        "data.glove_path": p["glove"],
        "data.region_dim": 16,
        "data.n_proposals": 0,
        "data.phrase_to_label_json": p["json"],
        "data.class_names": p["classes"],
        "data.captions_per_image": 0,
        "model.lstm_hidden": 8,
        "model.mlp_hidden": 8,
        "model.embed_dim": 8,
        "train.eval_batch_size": 5,
    }


def ddp_eval_worker(rank: int, world: int, port: int, over: dict, out: str) -> None:
    """One gloo process: evaluate the same (seeded) model on the test split; rank 0 writes the metrics."""
    import os

    from groundkit import distributed

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    distributed.init_distributed("cpu")
    try:
        cfg = load_config(Wang21Config, "reference_distill", over, method="wang21")
        torch.manual_seed(0)
        model = METHOD.build_model(cfg)
        ds = METHOD.build_dataset(cfg, "test")
        seen: list[int] = []
        get = ds.get_batch
        ds.get_batch = lambda idx: (seen.extend(int(i) for i in idx), get(idx))[1]
        m = METHOD.evaluate(model, ds, cfg, torch.device("cpu"))
        with open(f"{out}.rank{rank}", "w") as f:
            json.dump(seen, f)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(m, f)
    finally:
        distributed.cleanup()


def test_eval_under_ddp_counts_each_pair_once(world, tmp_path):
    """2 processes split the test pairs (24 pairs in batches of 5: uneven shares) and sum the counts:
    the same R@k, upper bound and baselines as one process."""
    import socket

    root, p = world
    over = _eval_overrides(root, p)
    cfg = load_config(Wang21Config, "reference_distill", over, method="wang21")
    torch.manual_seed(0)
    one = METHOD.evaluate(METHOD.build_model(cfg), METHOD.build_dataset(cfg, "test"), cfg, torch.device("cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_eval_worker, args=(2, port, over, str(tmp_path / "two.json")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two.json").read_text())
    shares = [json.loads((tmp_path / f"two.json.rank{r}").read_text()) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(24)) and all(shares)  # each pair on exactly one rank
    assert two["num_phrases"] == one["num_phrases"] and one["num_pairs"] == 24
    for k in ("R@1", "R@5", "R@10", "upper_bound", "random_R@1", "teacher_R@1", "teacher_coverage"):
        assert two[k] == pytest.approx(one[k], abs=1e-9), k


def test_world_configs_find_their_world():
    """``world_*`` configs name the built-in world (world.size): resolve_world builds it and fills every empty
    path; region files of one's own keep the config on them and build no world."""
    from pathlib import Path  # noqa: PLC0415

    from groundkit.config import load_config  # noqa: PLC0415
    from groundkit.methods.wang21.config import Wang21Config  # noqa: PLC0415
    from groundkit.methods.wang21.method import METHOD  # noqa: PLC0415
    from groundkit.world import resolve_world  # noqa: PLC0415

    cfg = resolve_world(METHOD, load_config(Wang21Config, "world_reference_nce", {"world.size": "tiny"}, "wang21"))
    root = Path(cfg.data.root)
    assert cfg.data.region_feat_path == str(root / "region_features_{split}.hdf5")
    assert Path(cfg.data.glove_path) == root / "glove.hdf5" and Path(cfg.data.class_names).is_file()
    assert all(Path(cfg.data.region_feat_path.format(split=s)).is_file() for s in ("train", "val", "test"))
    own = load_config(Wang21Config, "world_reference_nce", {"data.region_feat_path": "/mine/r.h5"}, "wang21")
    own = resolve_world(METHOD, own)
    assert own.data.root == "" and own.data.region_feat_path == "/mine/r.h5"
