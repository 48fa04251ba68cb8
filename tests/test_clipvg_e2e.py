"""CLIP-VG end to end on the tiny built-in pseudo world: training beats random boxes, the curriculum
resumes after a kill without retraining finished runs, and the predictor grounds a real photo."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from groundkit.engine import fit
from groundkit.methods import get_method
from groundkit.methods.clipvg.curriculum import CurriculumConfig, EngineBackend, SearchConfig, run_ssa
from groundkit.world import generate

# the fixes on, as configs/improved.yaml (the defaults are the official code's)
TINY = {
    "data": {"max_query_len": 12, "augment": False, "supervision": "full", "truncate_boxes": False},
    "model": {
        "normalize": "encoder",
        "image_mask": "nearest",
        "attn_init": "xavier",
        "encoder": "effnet_minilm",
        "grid": 4,
        "d_model": 32,
        "nhead": 4,
        "num_layers": 1,
        "dim_ff": 64,
        "effnet_stages": ["s16", "s32"],
        "dropout": 0.0,
    },
    "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
    "sched": {"name": "cosine", "interval": "step"},
    "train": {
        "drop_last": False,
        "precision": "auto",
        "epochs": 1,
        "threads": 1,
        "max_steps": 120,
        "batch_size": 16,
        "eval_every": 0,
        "tensorboard": False,
        "progress": False,
        "best_metric": "acc",
        "log_every": 1000,
    },
}


@pytest.fixture(scope="module")
def world():
    return generate("pseudo", size="tiny", seed=0, progress=False)


def config(world, tmp, **over):
    from groundkit.config import apply_overrides, from_dict

    method = get_method("clipvg")
    data = apply_overrides(
        method.config_class,
        TINY,
        {
            "data.split_root": str(world / "splits"),
            "data.image_root": str(world / "images/mscoco/images/train2014"),
            "data.cache_dir": str(tmp / "cache"),
            "train.output_dir": str(tmp / "run"),
            **over,
        },
    )
    return method, from_dict(method.config_class, data)


def random_box_acc(method, cfg, split, draws=20):
    ds = method.build_dataset(cfg, split)
    rng = np.random.default_rng(0)
    t = torch.stack([ds.raw_item(i)["box"] for i in range(len(ds))])
    hits = []
    for _ in range(draws):
        xy = np.sort(rng.uniform(0, 1, (len(ds), 2, 2)), axis=1)  # random x1 < x2, y1 < y2
        pred = torch.tensor(np.stack([xy[:, 0, 0], xy[:, 0, 1], xy[:, 1, 0], xy[:, 1, 1]], 1), dtype=torch.float32)
        from groundkit.boxes import cxcywh_to_xyxy, paired_box_iou

        hits.append(float((paired_box_iou(pred, cxcywh_to_xyxy(t)) >= 0.5).float().mean()))
    return float(np.mean(hits))


def test_tiny_training_beats_random_and_predicts_a_photo(world, tmp_path):
    torch.set_num_threads(1)
    method, cfg = config(world, tmp_path, **{"train.val_split": "train"})
    res = fit(method, cfg, final_split="train")
    acc = res["final"]["acc"]
    assert acc > 100 * random_box_acc(method, cfg, "train") + 5  # percent
    from sklearn.datasets import load_sample_image

    from groundkit.methods.clipvg.predict import draw_boxes

    photo = load_sample_image("china.jpg")  # 427 x 640 real photo
    pred = method.predictor(tmp_path / "run")
    out = pred.ground(photo, ["the tall building on the left", "the red roof"])
    assert [o["text"] for o in out] == ["the tall building on the left", "the red roof"]
    assert all("score" not in o for o in out)  # the official model has no confidence: no made-up score
    for o in out:
        x1, y1, x2, y2 = o["box"]
        assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 427
    from PIL import Image

    img = draw_boxes(Image.fromarray(photo), out)
    img.save(tmp_path / "boxed.png")
    assert img.size == (640, 427)
    from groundkit.errors import DataError  # noqa: PLC0415

    with pytest.raises(DataError, match="expression is empty"):
        pred.ground(photo, ["  "])
    # the command line: stdout holds only JSON lines (the backbone package's loading line goes to stderr)
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    cmd = [sys.executable, "-m", "groundkit", "predict", "clipvg", str(tmp_path / "boxed.png"), "the red roof"]
    done = subprocess.run([*cmd, "--checkpoint", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["text"] == "the red roof"
    empty = subprocess.run([*cmd[:-1], "", "--checkpoint", str(tmp_path / "run")], capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stdout == "" and len(empty.stderr.strip().splitlines()) == 1


def test_curriculum_resumes_after_a_kill_without_retraining(world, tmp_path):
    torch.set_num_threads(1)
    method, cfg = config(world, tmp_path, **{"train.max_steps": 4})
    over = {k: v for k, v in json.loads(json.dumps(TINY)).items()}
    cur = CurriculumConfig(
        config=str(tmp_path / "base.yaml"),
        out=str(tmp_path / "ssa"),
        source=str(world / "splits/unc/train_separate/1_unc_train_pseudo_template.pth"),
        search=SearchConfig(grid=[0.0, 0.5], max_evals=2, min_keep=1),
        set={
            "data.split_root": cfg.data.split_root,
            "data.image_root": cfg.data.image_root,
            "data.cache_dir": cfg.data.cache_dir,
            "train.max_steps": 4,
        },
    )
    import yaml

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"method": "clipvg", **over}))
    backend = EngineBackend(cur)
    calls = []

    class Killed(Exception):
        pass

    class KilledAfterFirstRun(EngineBackend):
        def train(self, jobs):
            if calls:
                raise Killed()  # the process dies while the second run is being set up
            calls.append(jobs)
            return super().train(jobs)

    with pytest.raises(Killed):
        run_ssa(cur, KilledAfterFirstRun(cur), echo=lambda s: None)
    first = calls[0][0].name
    lines = []
    res = run_ssa(cur, backend, echo=lines.append)
    assert res["reused"] >= 1 and res["trained"] >= 1
    assert "reused" in lines[0] and first in lines[0]  # the finished run was read back, not trained again
    log = [json.loads(x) for x in (tmp_path / "ssa" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log].count("start") == 2 and log[-1]["event"] == "done"


def test_shipped_curriculum_configs_run_as_documented(tmp_path, capsys):
    """The shipped built-in-world YAMLs resolve their world and run through `groundkit curriculum` (here on the
    tiny world with short trainings); the RefCOCO ones name the released files' layout."""
    from groundkit.cli import main
    from groundkit.methods.clipvg.curriculum import load_curriculum_config, shipped_curriculum

    torch.set_num_threads(1)
    for name in ("ssa_world", "msa_world"):
        cfg = load_curriculum_config(shipped_curriculum(name), ["world=tiny"])
        paths = [cfg.source] if cfg.source else list(cfg.sources.values())
        assert paths and all(Path(p).is_file() for p in paths), paths
        assert Path(cfg.set["data.split_root"]).is_dir() and "{world}" not in json.dumps(cfg.set)
    ref = load_curriculum_config(shipped_curriculum("msa_refcoco"))
    assert list(ref.sources) == ["template", "relation", "caption"]
    assert ref.sources["caption"].endswith("unc/train_separate/3_unc_train_pseudo_caption_0_5.pth")
    assert main(["curriculum", "ssa", "nope"]) == 2
    assert "ssa_world" in capsys.readouterr().err
    args = ["curriculum", "ssa", "ssa_world", "--out", str(tmp_path / "ssa"), "--set", "world=tiny"]
    args += ["search.max_evals=2", f"runs_dir={tmp_path / 'runs'}"]
    small = {"train.max_steps": 4, "data.cache_dir": str(tmp_path / "cache")}
    import yaml

    shipped = yaml.safe_load(shipped_curriculum("ssa_world").read_text())
    mine = tmp_path / "ssa_world.yaml"
    mine.write_text(yaml.safe_dump({**shipped, "set": {**shipped["set"], **small}}))
    args[2] = str(mine)
    assert main(args) == 0
    res = json.loads((tmp_path / "ssa" / "result.json").read_text())
    assert res["final"]["run"] and res["trained"] >= 2
