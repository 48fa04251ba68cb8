"""CLIP-VG curriculum: the threshold search, the MSA stop rule, and resuming after a kill."""

import json
import math

import numpy as np
import pytest

from groundkit.methods.clipvg.curriculum import (
    CurriculumConfig,
    MSAConfig,
    SearchConfig,
    run_msa,
    run_ssa,
    search_threshold,
)
from groundkit.methods.clipvg.pseudo import write_labels


@pytest.mark.parametrize("peak", [0.12, 0.35, 0.47, 0.66, 0.83])
def test_search_finds_the_max_of_a_curve_with_few_evaluations(peak):
    calls = []

    def f(h):
        calls.append(h)
        return 0.6 - (h - peak) ** 2

    res = search_threshold(f, SearchConfig())
    assert abs(res.best - peak) <= 0.03
    assert len(calls) <= 7 and len(set(calls)) == len(calls)  # a 0.01 grid would need 96, the 0.1 grid 10
    assert res.history[: len(calls)] == [(round(h, 2), pytest.approx(0.6 - (h - peak) ** 2)) for h in calls]


def test_search_skips_untrainable_thresholds_and_respects_max_evals():
    res = search_threshold(lambda h: None if h > 0.5 else h, SearchConfig(max_evals=5))
    assert res.best <= 0.5 and len(res.history) <= 5
    assert all(v == -math.inf for h, v in res.history if h > 0.5)


# ---------------------------------------------------------------------------- a fake training backend


def make_source(tmp_path, name, n, good_fraction, rng):
    """n labels with a hidden 'good' flag (stored in the text) and a reliability that separates them."""
    good = rng.random(n) < good_fraction
    labels = [(f"img{i}.jpg", [1.0, 1.0, 5.0, 5.0], f"{name} {i} {'good' if g else 'bad'}") for i, g in enumerate(good)]
    path = write_labels(labels, tmp_path / f"{name}.pth")
    r = np.where(good, rng.uniform(0.3, 1.0, n), rng.uniform(0.0, 0.6, n)).astype(np.float32)
    return str(path), r


class FakeBackend:
    """Val accuracy = good labels minus 1.5x bad labels, saturating: the best threshold is neither 0 nor high."""

    def __init__(self, reliabilities, penalty=1.5):
        self.rel, self.penalty, self.trained = reliabilities, penalty, []

    def train(self, jobs):
        out = []
        for j in jobs:
            from groundkit.formats import transvg

            texts = [e[3] for e in transvg.load_raw(j.train_file)]
            good = sum(t.endswith("good") for t in texts)
            bad = len(texts) - good
            val = (good - self.penalty * bad) / 400.0 + 0.5 * (1 - math.exp(-len(texts) / 100))
            self.trained.append(j.label)
            out.append({"val": {"acc": val}, "test": {"acc": val}, "run_dir": j.name, "reused": False})
        return out

    def score(self, run_dir, pth_file):
        from groundkit.formats import transvg

        name = transvg.load_raw(pth_file)[0][3].split()[0]
        return self.rel[name]


def test_ssa_with_a_fake_backend_beats_all_labels(tmp_path):
    rng = np.random.default_rng(0)
    path, r = make_source(tmp_path, "template", 300, 0.6, rng)
    cfg = CurriculumConfig(source=path, out=str(tmp_path / "ssa"))
    lines = []
    res = run_ssa(cfg, FakeBackend({"template": r}), echo=lines.append)
    assert res["final"]["val"] > res["all"]["val"] and 0.0 < res["final"]["threshold"] < 0.9
    assert res["final"]["threshold"] == res["search"]["best"] and "threshold" not in res  # one answer
    assert f"chosen h*={res['final']['threshold']:.2f}" in lines[-1]
    assert len(lines) >= 3 and all(line.startswith("[ssa]") for line in lines)
    assert (tmp_path / "ssa" / "reliability" / "source_by_source.png").is_file()
    log = [json.loads(x) for x in (tmp_path / "ssa" / "log.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "threshold" for e in log) == len(res["search"]["history"])


def test_msa_stop_rule_and_measurer_choice(tmp_path):
    rng = np.random.default_rng(1)
    srcs, rel = {}, {}
    for name, frac in (("template", 0.8), ("relation", 0.35), ("caption", 0.7)):
        srcs[name], rel[name] = make_source(tmp_path, name, 200, frac, rng)
    backend = FakeBackend({})
    # measurer j scores source i: same-source is informative, cross-source is noise
    backend.score = lambda run_dir, pth: (
        rel[pth.rsplit("/", 1)[1][:-4]] if run_dir == backend_measurer[pth] else rng.uniform(0, 1, 200).astype("f")
    )
    backend_measurer = {}
    orig_train = backend.train

    def train(jobs):
        out = orig_train(jobs)
        for j, o in zip(jobs, out):
            if j.label.startswith("measurer "):
                backend_measurer[srcs[j.label.split()[1]]] = o["run_dir"]
        return out

    backend.train = train
    cfg = CurriculumConfig(sources=srcs, out=str(tmp_path / "msa"), msa=MSAConfig(h0=0.5, min_gain=0.0))
    lines = []
    res = run_msa(cfg, backend, echo=lines.append)
    steps = res["steps"]
    assert steps[0]["source"] == "template" and steps[0]["measurer"] == "template"  # SR beats a noisy CR
    assert "stop" in res and (len(steps) == 3 or "not above" in res["stop"])
    vals = [s["val"] for s in steps]
    assert vals == sorted(vals) and all(b > a for a, b in zip(vals, vals[1:]))  # every kept step improved
    assert any("stop" in line or "adds" in line for line in lines)


def test_msa_stops_when_a_step_does_not_improve(tmp_path):
    rng = np.random.default_rng(2)
    srcs, rel = {}, {}
    for name, frac in (("template", 0.9), ("relation", 0.05)):
        srcs[name], rel[name] = make_source(tmp_path, name, 200, frac, rng)
    backend = FakeBackend({}, penalty=6.0)
    backend.score = lambda run_dir, pth: np.zeros(200, "f") if "relation" in pth else rel["template"]
    cfg = CurriculumConfig(
        sources=srcs,
        out=str(tmp_path / "msa"),
        msa=MSAConfig(measurer_selection=False),
        runs_dir=str(tmp_path / "shared" / "runs"),
    )
    res = run_msa(cfg, backend, echo=lambda s: None)
    assert [s["source"] for s in res["steps"]] == ["template"] and "not above" in res["stop"]
    assert (tmp_path / "shared" / "selections").is_dir() and (tmp_path / "msa" / "result.json").is_file()


def test_curriculum_command_line_and_yaml(tmp_path):
    import argparse

    from groundkit.methods.clipvg.curriculum import load_curriculum_config, register_curriculum

    (tmp_path / "t.pth").write_bytes(b"")
    (tmp_path / "c.yaml").write_text("config: world_cpu\nsource: t.pth\nout: o\nsearch: {max_evals: 3}\n")
    parser = argparse.ArgumentParser()
    register_curriculum(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["curriculum", "ssa", str(tmp_path / "c.yaml"), "--set", "jobs=2"])
    assert args.kind == "ssa" and callable(args.func)
    cfg = load_curriculum_config(args.config, args.set)
    assert cfg.jobs == 2 and cfg.search.max_evals == 3 and cfg.source == str(tmp_path / "t.pth")
    with pytest.raises(Exception, match="unknown key"):
        load_curriculum_config(args.config, ["search.budget=3"])


def test_ssa_flat_curve_keeps_all_labels_and_says_why(tmp_path):
    """A flat validation curve (every run scores the same): the result says so, the printed choice, result.json
    and the run used agree (all labels), and the tie-breaking rule is named."""
    rng = np.random.default_rng(0)
    path, r = make_source(tmp_path, "template", 300, 0.6, rng)

    class Flat(FakeBackend):
        def train(self, jobs):
            out = super().train(jobs)
            return [{**o, "val": {"acc": 0.0}, "test": {"acc": 0.0}} for o in out]

    lines = []
    res = run_ssa(CurriculumConfig(source=path, out=str(tmp_path / "flat")), Flat({"template": r}), echo=lines.append)
    assert res["search"]["flat"] and len(res["search"]["ties"]) == len(res["search"]["history"]) > 1
    final = res["final"]
    assert final["threshold"] is None and final["kept"] == 300 and final["run"] == res["all"]["run"]
    assert "all labels kept" in final["rule"] and any("flat validation curve" in n for n in final["notes"])
    assert "chosen: all 300 labels" in lines[-1] and "flat validation curve" in lines[-1]
    saved = json.loads((tmp_path / "flat" / "result.json").read_text())
    assert saved["final"] == json.loads(json.dumps(final)) and "threshold" not in saved
