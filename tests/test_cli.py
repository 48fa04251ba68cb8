import subprocess
import sys

import pytest

from groundkit.cli import build_parser, main


def _subcommands(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def test_help_lists_only_working_subcommands():
    subs = _subcommands(build_parser())
    assert set(subs) <= {"train", "eval", "predict", "data", "bench", "demo", "summarize", "serve", "curriculum"}
    for sub in subs.values():  # every listed subcommand, and each of its own subcommands, has a working --help
        assert sub.format_help()
        for inner in _subcommands(sub).values():
            assert inner.format_help()
    r = subprocess.run([sys.executable, "-m", "groundkit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(name in r.stdout for name in subs)


def test_config_error_is_reported(capsys, monkeypatch):
    import regression_method as rm

    from groundkit import cli

    monkeypatch.setitem(cli.METHODS, "regression", "regression_method")
    code = main(["train", "regression", "--set", "optim.lrr=1", "--output-dir", "/tmp/never"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key optim.lrr" in err and "lr" in err
    assert rm.METHOD.name == "regression"


def test_train_and_eval_via_cli(tmp_path, monkeypatch, capsys):
    from groundkit import cli

    monkeypatch.setitem(cli.METHODS, "regression", "regression_method")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "regression",
                "--output-dir",
                str(out),
                "--set",
                "train.epochs=2",
                "train.progress=false",
                "train.best_metric=mse",
                "train.best_mode=min",
            ]
        )
        == 0
    )
    assert (out / "metrics.json").is_file() and any((out / "tb").iterdir())
    assert (
        main(
            [
                "eval",
                "regression",
                "--restore-path",
                str(out / "checkpoints" / "best"),
                "--output-dir",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert "test:" in capsys.readouterr().out


def test_summarize_groups_seeds(tmp_path, monkeypatch, capsys):
    from groundkit import cli

    monkeypatch.setitem(cli.METHODS, "regression", "regression_method")
    for seed in (0, 1):
        out = tmp_path / f"reg_s{seed}"
        args = ["--output-dir", str(out), "--seed", str(seed), "--set", "train.epochs=1", "train.progress=false"]
        assert main(["train", "regression", *args]) == 0
    capsys.readouterr()
    assert main(["summarize", str(tmp_path / "reg_s0"), str(tmp_path / "reg_s1"), "--keys", "mse"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| reg |"))
    assert "±" in row and row.rstrip().endswith("| 2 |")  # one row for both seeds, n = 2
    assert main(["summarize", str(tmp_path / "nothing")]) == 2  # not a finished run: one clear error


def test_rerun_from_saved_config(tmp_path, monkeypatch):
    from groundkit import cli

    monkeypatch.setitem(cli.METHODS, "regression", "regression_method")
    out = tmp_path / "run"
    assert (
        main(["train", "regression", "--output-dir", str(out), "--set", "train.epochs=1", "train.progress=false"]) == 0
    )
    text = (out / "config.yaml").read_text()
    assert text.startswith("method: regression")
    again = tmp_path / "again"
    assert main(["train", str(out / "config.yaml"), "--output-dir", str(again)]) == 0
    assert (again / "metrics.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "runs/nope"], "runs/nope: no such run directory"),
        (["train", "wang21"], "no training files"),  # and no empty runs/wang21 left behind
        (["train", "clipvg", "offline", "--output-dir", "a/b/run"], "data.split_root is empty"),
        (["eval", "./nope", "--split", "test"], "./nope: no such run directory"),
        (["data", "convert-cogrounding", "nope.pth.tar", "--corpus", "c.txt", "--out", "x.safetensors"], "not found"),
        (
            [
                "predict",
                "phrase",
                "--checkpoint",
                "nope",
                "--region-feat-path",
                "r.h5",
                "--image-id",
                "1",
                "--phrase",
                "a",
            ],
            "nope",
        ),
    ],
)
def test_wrong_inputs_end_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    """A wrong input: exit status 2, one line on stderr naming the problem, nothing on stdout, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert cap.out == "" and len(err) == 1 and message in err[0] and "Traceback" not in cap.err, cap.err
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_eval_lines_use_the_metric_names_and_two_decimals():
    from groundkit.methods import get_method  # noqa: PLC0415

    line = get_method("clipvg").format_eval({"acc": 85.296, "miou": 72.3, "n": 798.0, "largest_object": 25.06}, "test")
    assert line == "test: acc=85.30  miou=72.30  n=798.00  largest_object=25.06"  # the names of log.jsonl
    m = {f"{p}_{k}": 29.65 for p in ("t2v", "v2t") for k in ("R1", "R5", "R10", "R50", "MedR", "MeanR")}
    m |= {"t2v_geometric_mean_R1-R5-R10": 1.0, "v2t_geometric_mean_R1-R5-R10": 1.0, "num_videos": 3, "num_queries": 3}
    assert "R@1: 29.65," in get_method("crosskd").format_eval(m, "test")


def test_predict_names_a_truncated_image_before_loading_a_model(tmp_path, capsys):
    from PIL import Image  # noqa: PLC0415

    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "ok.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:100])
    assert main(["predict", "clipvg", str(tmp_path / "cut.jpg"), "the cup", "--checkpoint", "no/such/run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'cut.jpg'}: not a readable image, truncated or corrupt" in err[0]
