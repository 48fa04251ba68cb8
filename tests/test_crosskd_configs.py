"""The eight CrossKD settings load, convert a released-layout fixture of their data set, train a step and evaluate."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from groundkit.config import load_config
from groundkit.engine import evaluate
from groundkit.formats.collaborative_experts import DATASET_LAYOUTS, FeatureError
from groundkit.methods.crosskd import METHOD, CrossKDConfig

SETTINGS = [f"{ds}_{k}" for ds in ("msrvtt", "msvd", "didemo", "activity-net") for k in ("cecap", "ttcap")]


def _dump(p: Path, obj) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_layout(root: Path, dataset: str, n: int = 12, text_dim: int = 8) -> list[str]:
    lay = DATASET_LAYOUTS[dataset]
    rng = np.random.default_rng(1)
    ids = [f"v{i}" for i in range(n)]
    for name, rel in lay["experts"].items():
        if name in ("audio", "speech"):
            d = {
                v: (
                    float("nan") if i % 4 == 0 else rng.standard_normal((int(rng.integers(1, 6)), 4)).astype(np.float32)
                )
                for i, v in enumerate(ids)
            }
        else:
            d = {v: rng.standard_normal(6).astype(np.float32) for v in ids}
        _dump(root / rel, d)
    caps = {v: [["w"] * int(rng.integers(2, 6)) for _ in range(3)] for v in ids}
    _dump(root / lay["raw_captions"], caps)
    _dump(
        root / lay["text_feats"]["gpt2-xl-finetune"],
        {v: [rng.standard_normal((len(c), text_dim)).astype(np.float32) for c in caps[v]] for v in ids},
    )
    experts = sorted(lay["experts"])
    for rel in lay["teachers"].values():
        _dump(
            root / rel,
            {
                v: {
                    "vid_embds": {m: rng.standard_normal(5) for m in experts},
                    "text_embds": {m: rng.standard_normal((3, 5)) for m in experts},
                }
                for v in ids
            },
        )
    fam = next(iter(lay["splits"].values()))
    lists = {"train": ids[:6], "val": ids[6:9], "test": ids[9:]}
    for split, rel in fam.items():
        (root / rel).write_text("\n".join(lists[split]) + "\n")
    for extra in lay.get("test_caption_index", {}).values():
        _dump(root / extra, {v: 0 for v in ids})
    return ids


@pytest.mark.parametrize("name", SETTINGS)
def test_setting_runs_on_released_layout(name, tmp_path):
    torch.manual_seed(0)
    cfg = load_config(CrossKDConfig, name, method="crosskd")
    make_layout(tmp_path / "feats", cfg.data.dataset)
    clusters = dict(cfg.model.vlad_clusters, text=2)
    cfg = load_config(
        CrossKDConfig,
        name,
        {
            "data.root": str(tmp_path / "feats"),
            "data.text_dim": 8,
            "model.shared_dim": 16,
            "model.vlad_clusters": clusters,
        },
        method="crosskd",
    )
    model = METHOD.build_model(cfg)
    assert len(model.experts) == (5 if cfg.data.dataset == "msvd" else 7)
    tr = METHOD.build_dataset(cfg, "train")
    batch = tr.get_batch(list(range(len(tr))))
    loss, logs = METHOD.training_step(model, batch, 0, cfg)
    loss.backward()
    assert torch.isfinite(loss) and "loss_caption_kd" in logs and (("loss_teachtext" in logs) == cfg.loss.distil)
    m = evaluate(METHOD, model, METHOD.build_dataset(cfg, "test"), cfg, torch.device("cpu"))
    assert {"t2v_R1", "v2t_R1", "t2v_geometric_mean_R1-R5-R10"} <= set(m)
    if cfg.data.fuse_captions:
        assert m["num_queries"] == m["num_videos"]


def test_dimension_mismatch_with_config_is_clear(tmp_path):
    make_layout(tmp_path / "feats", "msvd")
    cfg = load_config(
        CrossKDConfig, "msvd_cecap", {"data.root": str(tmp_path / "feats")}, method="crosskd"
    )  # config says 1600-d text
    with pytest.raises(FeatureError, match="expected 1600"):
        METHOD.build_model(cfg)
    cfg = load_config(
        CrossKDConfig,
        "msvd_cecap",
        {
            "data.root": str(tmp_path / "feats"),
            "data.text_dim": 8,
            "data.store": str(tmp_path / "s"),
            "data.expert_dims": {"scene.densenet161.0": 2208},
        },
        method="crosskd",
    )
    with pytest.raises(FeatureError, match="expected 2208"):
        METHOD.build_model(cfg)


def test_msvd_layout_r2p1d_folders():
    """MSVD: only the Kinetics-finetuned R(2+1)D expert lives in the stride-8 folder (as the reference's
    MSVD data loader and archive list have it); the plain IG-65M one stays at stride 32."""
    from groundkit.formats.collaborative_experts import DATASET_LAYOUTS

    ex = DATASET_LAYOUTS["msvd"]["experts"]
    assert "_stride8_" in ex["r2p1d.r2p1d-ig65m-kinetics.0"] and "_stride32_" in ex["r2p1d.r2p1d-ig65m.0"]
    assert set(ex) == set(DATASET_LAYOUTS["msrvtt"]["experts"]) - {"audio", "speech"}
