"""Generator framework (cache, manifest, checksums, CLI) and scenes of the benchmark world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from groundkit.world import core
from groundkit.world import scene as S


class _Dummy:
    """A task builder that writes a few deterministic files and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out: Path, size: str, seed: int, progress: bool, **knobs) -> dict:
        self.calls += 1
        if knobs.get("fail"):
            (out / "half.bin").write_bytes(b"x")
            raise RuntimeError("build failed")
        rng = core.rng_for(seed, "dummy")
        (out / "sub").mkdir()
        (out / "sub" / "a.npy").write_bytes(rng.standard_normal(16).tobytes())
        core.write_json(out / "b.json", {"z": 1, "a": [size, seed], "k": knobs})
        return {"knobs": dict(knobs), "count": 2}


@pytest.fixture
def dummy(monkeypatch):
    d = _Dummy()
    monkeypatch.setattr(core, "get_builder", lambda task: d)
    return d


def test_generate_manifest_reuse_and_corruption(tmp_path, dummy):
    out = core.generate("phrase", "tiny", 3, out=tmp_path / "w", progress=False)
    man = core.load_manifest(out)
    assert (man["task"], man["size"], man["seed"], man["world_version"]) == ("phrase", "tiny", 3, core.WORLD_VERSION)
    assert set(man["files"]) == {"sub/a.npy", "b.json"}
    assert man["files"]["b.json"]["sha256"] == core.sha256_file(out / "b.json")
    assert man["info"] == {"count": 2} and man["build"]["seconds"] >= 0
    assert core.verify(out) == []
    # a valid cache is reused
    core.generate("phrase", "tiny", 3, out=out, progress=False)
    assert dummy.calls == 1
    # a corrupt file (same size) is detected and the build redone
    p = out / "sub" / "a.npy"
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF
    p.write_bytes(bytes(data))
    problems = core.verify(out)
    assert len(problems) == 1 and "sha256" in problems[0]
    core.generate("phrase", "tiny", 3, out=out, progress=False)
    assert dummy.calls == 2 and core.verify(out) == []
    # missing and extra files too
    (out / "b.json").unlink()
    (out / "stray.txt").write_text("x")
    problems = core.verify(out)
    assert any("missing" in q for q in problems) and any("not listed" in q for q in problems)
    core.generate("phrase", "tiny", 3, out=out, progress=False)
    assert dummy.calls == 3 and core.verify(out) == []
    # another seed or other knobs for the same directory is a different build
    core.generate("phrase", "tiny", 4, out=out, progress=False)
    assert dummy.calls == 4 and core.load_manifest(out)["seed"] == 4
    core.generate("phrase", "tiny", 4, out=out, progress=False, n_images=9)
    assert dummy.calls == 5 and core.load_manifest(out)["requested_knobs"] == {"n_images": 9}
    core.generate("phrase", "tiny", 4, out=out, progress=False, force=True, n_images=9)
    assert dummy.calls == 6


def test_same_seed_same_bytes(tmp_path, dummy):
    a = core.generate("phrase", "tiny", 1, out=tmp_path / "a", progress=False)
    b = core.generate("phrase", "tiny", 1, out=tmp_path / "b", progress=False)
    c = core.generate("phrase", "tiny", 2, out=tmp_path / "c", progress=False)
    fa, fb, fc = (core.load_manifest(x)["files"] for x in (a, b, c))
    assert fa == fb and fa != fc


def test_failed_build_leaves_nothing(tmp_path, dummy):
    with pytest.raises(RuntimeError, match="build failed"):
        core.generate("phrase", "tiny", 0, out=tmp_path / "w", progress=False, fail=True)
    assert list(tmp_path.iterdir()) == []


def test_partial_dir_without_manifest_is_rebuilt_but_foreign_dir_kept(tmp_path, dummy):
    out = core.generate("phrase", "tiny", 0, out=tmp_path / "w", progress=False)
    (out / core.MANIFEST).unlink()  # looks like an interrupted copy
    core.generate("phrase", "tiny", 0, out=out, progress=False)
    assert dummy.calls == 2 and core.verify(out) == []
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("do not delete")
    with pytest.raises(core.CacheError, match="not a groundkit synth build"):
        core.generate("phrase", "tiny", 0, out=foreign, progress=False)
    assert (foreign / "thesis.tex").read_text() == "do not delete"


def test_default_out_uses_env_and_knob_hash(tmp_path, monkeypatch, dummy):
    monkeypatch.setenv("GROUNDKIT_DATA", str(tmp_path / "cache"))
    out = core.generate("phrase", "small", 5, progress=False)
    assert out == tmp_path / "cache" / f"phrase-small-seed5-v{core.WORLD_VERSION}"
    out2 = core.generate("phrase", "small", 5, progress=False, n_images=10)
    assert out2 != out and out2.name.startswith(out.name + "-k")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        core.generate("nope", "tiny")
    with pytest.raises(ValueError, match="unknown size"):
        core.generate("phrase", "huge")
    with pytest.raises(ValueError, match="seed"):
        core.generate("phrase", "tiny", seed=-1)


def test_missing_task_module_is_unavailable(monkeypatch):
    monkeypatch.setitem(core.TASKS, "ghost", "groundkit.world._no_such_task:build")
    with pytest.raises(core.TaskUnavailableError, match="ghost"):
        core.get_builder("ghost")
    assert "ghost" not in core.available_tasks()


def test_knob_parsing_and_checking():
    assert core.parse_knob("rate=0.5") == ("rate", 0.5)
    assert core.parse_knob("n=3") == ("n", 3)
    assert core.parse_knob("name=coco") == ("name", "coco")
    assert core.parse_knob("size=[1, 2]") == ("size", [1, 2])
    with pytest.raises(ValueError):
        core.parse_knob("novalue")
    d = {"rate": 0.5, "n": 3, "mode": "a"}
    assert core.check_knobs("t", {"rate": 1, "n": 4.0}, d) == {"rate": 1.0, "n": 4, "mode": "a"}
    with pytest.raises(ValueError, match="unknown knob"):
        core.check_knobs("t", {"rte": 1}, d)
    with pytest.raises(ValueError, match="integer"):
        core.check_knobs("t", {"n": 2.5}, d)
    with pytest.raises(ValueError, match="str"):
        core.check_knobs("t", {"mode": 3}, d)


def test_rng_for_is_stable_and_independent():
    a = core.rng_for(0, "x", 1).integers(0, 1 << 30, 4)
    assert (a == core.rng_for(0, "x", 1).integers(0, 1 << 30, 4)).all()
    assert (a != core.rng_for(0, "x", 2).integers(0, 1 << 30, 4)).any()
    assert (a != core.rng_for(1, "x", 1).integers(0, 1 << 30, 4)).any()


def test_cli_runs_dummy(tmp_path, dummy, capsys):
    import argparse

    from groundkit.world import cli

    parser = argparse.ArgumentParser(prog="groundkit data")
    cli.register(parser.add_subparsers())

    def main(argv):
        return parser.parse_args(argv[1:]).func(parser.parse_args(argv[1:]))

    rc = main(
        [
            "data",
            "synth",
            "--task",
            "phrase",
            "--size",
            "tiny",
            "--seed",
            "2",
            "--out",
            str(tmp_path / "c"),
            "--set",
            "n_images=8",
            "--quiet",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0] == str(tmp_path / "c")
    assert json.loads(lines[1])["seed"] == 2
    assert core.load_manifest(tmp_path / "c")["requested_knobs"] == {"n_images": 8}
    from groundkit.cli import CORE_COMMANDS
    from groundkit.cli import main as groundkit_main

    capsys.readouterr()
    rc = groundkit_main(
        ["data", "synth", "--task", "phrase", "--size", "tiny", "--out", str(tmp_path / "c"), "--set", "bad", "--quiet"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["groundkit: error: data synth: knob 'bad' must look like name=value"]

    assert CORE_COMMANDS["data"]["synth"] == "groundkit.world.cli:register"


# ------------------------------------------------------------------------------------------------
# scenes
# ------------------------------------------------------------------------------------------------


def test_vocabulary_is_in_glove_and_detector_names_differ():
    from groundkit.text import glove_package as load_glove

    index, vectors = load_glove()
    assert vectors.shape[1] == 50
    for c in S.CATEGORIES.values():
        assert len(c.words) == len(c.plurals)
        for w in c.words + c.plurals + c.palette:
            assert w in index, w
    for name in S.DETECTOR_CLASSES + S.COCO_CLASSES:
        assert all(w in index for w in name.split()), name
    assert len(S.CATEGORIES) >= 20
    # the vocabulary gap: many caption words are not detector class names, and some classes are shared
    gap = [w for c in S.CATEGORIES.values() for w in c.words if w not in S.DETECTOR_CLASSES]
    assert len(gap) > 20
    assert S.CATEGORIES["rider"].detector == S.CATEGORIES["child"].detector == "person"


def test_sample_scene_is_deterministic_and_valid():
    k = S.SceneKnobs()
    a = S.sample_scene(core.rng_for(0, "s", 1), k)
    b = S.sample_scene(core.rng_for(0, "s", 1), k)
    assert a == b
    for i in range(50):
        sc = S.sample_scene(core.rng_for(0, "s", i), k)
        assert sc.background in S.BACKGROUNDS
        assert 2 <= len(sc.objects) <= k.max_objects + 1  # a pair may add one over the target
        for o in sc.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= k.width and 0 <= y1 < y2 <= k.height
            assert o.colour in o.cat.palette and o.pattern in o.cat.patterns
            assert all(float(v).is_integer() for v in o.box)
    assert S.Scene.from_dict(a.to_dict()) == a


def test_cooccurrence_knob():
    def pair_stats(rate):
        with_rider = horses = 0
        for i in range(300):
            sc = S.sample_scene(core.rng_for(1, "c", i), {"cooccurrence": rate})
            for h in sc.by_category("horse"):
                horses += 1
                with_rider += any(o.partner_of == h.id and o.category == "rider" for o in sc.objects)
        return with_rider / max(horses, 1)

    assert pair_stats(1.0) == 1.0
    assert pair_stats(0.0) == 0.0
    assert 0.2 < pair_stats(0.5) < 0.8


def test_relations():
    a = S.SceneObject(0, "dog", "brown", "plain", (10, 100, 60, 140), depth=0.5)
    b = S.SceneObject(1, "tree", "green", "plain", (200, 50, 260, 140), depth=0.5)
    c = S.SceneObject(2, "kite", "red", "plain", (20, 5, 50, 30), depth=0.1)
    d = S.SceneObject(3, "cat", "black", "plain", (40, 110, 80, 150), depth=0.7)
    assert S.relation(a, b) == ["left"] and S.relation(b, a) == ["right"]
    assert "above" in S.relation(c, a) and "below" in S.relation(a, c)
    assert "front" in S.relation(d, a) and "behind" in S.relation(a, d)
    sc = S.Scene(320, 240, "park", 100.0, [a, b, c, d])
    assert (0, "left", 1) in S.relations(sc)
    assert S.visible_fraction(sc, 1) == 1.0 and S.visible_fraction(sc, 0) < 1.0
    assert S.enclosing_box([a.box, b.box]) == (10, 50, 260, 140)
    moved = sc.moved({0: (5, 0)})
    assert moved.objects[0].box == (15, 100, 65, 140) and sc.objects[0].box == (10, 100, 60, 140)


def test_render_is_deterministic_and_draws_objects():
    sc = S.sample_scene(core.rng_for(0, "r", 0))
    im1 = S.render_scene(sc, core.rng_for(0, "px", 0))
    im2 = S.render_scene(sc, core.rng_for(0, "px", 0))
    assert im1.size == (sc.width, sc.height) and im1.mode == "RGB"
    assert np.array_equal(np.asarray(im1), np.asarray(im2))
    empty = S.render_scene(
        S.Scene(sc.width, sc.height, sc.background, sc.horizon, []), core.rng_for(0, "px", 0), noise=0
    )
    full = np.asarray(S.render_scene(sc, core.rng_for(0, "px", 0), noise=0), dtype=np.int32)
    diff = np.abs(full - np.asarray(empty, dtype=np.int32)).sum(-1) > 30
    for o in sc.objects:  # every object changed pixels inside its box
        x1, y1, x2, y2 = (int(v) for v in o.box)
        assert diff[y1:y2, x1:x2].mean() > 0.1, o.category
    assert diff.mean() < 0.9
