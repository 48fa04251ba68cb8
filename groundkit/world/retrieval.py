"""Retrieval task of the benchmark world: Collaborative Experts features in the MSRVTT layout.

Every video is a tuple of attributes (object, colour, action, scene). Videos come in
*near-duplicate clusters* that share object and scene and differ in action or colour, so
non-matching pairs are graded (a cluster mate is "less wrong" than a random video), which is the
difficulty caption distillation addresses. Experts (prototype + noise features, not rendered
frames; see docs/benchmark_world.md): appearance (object, colour, a little scene), motion (action,
a little object), scene (scene), and a variable-length audio-like expert ``[n, 128]`` (action,
object) that a fraction of videos lack (a float NaN, as the released pickles). Twenty captions per
video paraphrase each other (synonyms, word order, optional colour/scene: varying specificity);
per-token text features are GloVe 6B 50-d vectors. Three TeachText-style teachers hold noisy
attribute embeddings in the teacher pickle layout.

Written files (MSRVTT ``structured-symlinks`` layout, pickle protocol 4, fixed insertion order)::

    aggregated_imagenet_25fps_256px_stride1_offset0/synth-appearance-avg.pickle   {vid: float32[128]}
    aggregated_r2p1d_30fps_256px_stride32_offset0_inner_stride1/synth-motion-avg.pickle {vid: float32[64]}
    aggregated_scene_25fps_256px_stride1_offset0/synth-scene-avg.pickle           {vid: float32[64]}
    aggregated_audio_feats/Audio_MSRVTT_new.pickle                                {vid: float32[n,128] | nan}
    aggregated_text_feats/glove-50d.pkl                                           {vid: [float32[n_tok,50]]}
    raw-captions.pkl                                                              {vid: [[tok, ...]]}
    teachers/train-full-ce-refined-text-{w2v,gpt2-xl,gpt2-xl-finetuned}.pkl
    {train,val,test}_list_full.txt, attributes.json
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..text import GLOVE_PACKAGE, load_word_vectors
from .core import check_knobs, progress_bar, rng_for

__all__ = ["build", "EXPERT_FILES", "TEXT_FILE", "TEACHER_FILES", "DEFAULTS"]

PROTOCOL = 4

OBJECTS = {
    "dog": ["dog", "puppy", "hound"],
    "cat": ["cat", "kitten"],
    "horse": ["horse", "pony"],
    "man": ["man", "guy", "gentleman"],
    "woman": ["woman", "lady"],
    "child": ["child", "kid", "boy"],
    "bird": ["bird", "parrot"],
    "car": ["car", "automobile", "vehicle"],
    "bicycle": ["bicycle", "bike"],
    "boat": ["boat", "ship"],
    "robot": ["robot", "android", "machine"],
    "ball": ["ball", "sphere"],
    "cow": ["cow", "cattle"],
    "sheep": ["sheep", "lamb"],
    "truck": ["truck", "lorry"],
    "bear": ["bear"],
    "rabbit": ["rabbit", "bunny"],
    "duck": ["duck"],
    "train": ["train", "locomotive"],
    "monkey": ["monkey", "ape"],
}
COLOURS = {
    "red": ["red", "crimson"],
    "blue": ["blue", "navy"],
    "green": ["green"],
    "yellow": ["yellow", "golden"],
    "black": ["black", "dark"],
    "white": ["white", "pale"],
    "brown": ["brown"],
    "orange": ["orange"],
    "pink": ["pink"],
    "grey": ["grey", "gray"],
}
ACTIONS = {
    "running": ["running", "sprinting", "jogging"],
    "jumping": ["jumping", "leaping", "hopping"],
    "spinning": ["spinning", "rotating", "twirling"],
    "sliding": ["sliding", "gliding"],
    "falling": ["falling", "tumbling"],
    "swimming": ["swimming", "paddling"],
    "dancing": ["dancing"],
    "rolling": ["rolling"],
    "waiting": ["waiting", "resting", "sitting"],
    "turning": ["turning"],
    "climbing": ["climbing"],
    "flying": ["flying", "soaring"],
    "walking": ["walking", "strolling"],
    "shaking": ["shaking", "trembling"],
    "bouncing": ["bouncing"],
    "floating": ["floating", "drifting"],
}
SCENES = {
    "beach": ["beach", "shore", "coast"],
    "forest": ["forest", "woods"],
    "kitchen": ["kitchen"],
    "street": ["street", "road"],
    "park": ["park", "garden"],
    "desert": ["desert"],
    "snow": ["snow"],
    "field": ["field", "meadow"],
    "river": ["river", "stream"],
    "city": ["city", "town"],
    "stadium": ["stadium", "arena"],
    "room": ["room", "bedroom"],
}
ATTRS = {"object": list(OBJECTS), "colour": list(COLOURS), "action": list(ACTIONS), "scene": list(SCENES)}
SYN = {"object": OBJECTS, "colour": COLOURS, "action": ACTIONS, "scene": SCENES}

EXPERT_FILES = {
    "appearance": "aggregated_imagenet_25fps_256px_stride1_offset0/synth-appearance-avg.pickle",
    "motion": "aggregated_r2p1d_30fps_256px_stride32_offset0_inner_stride1/synth-motion-avg.pickle",
    "scene": "aggregated_scene_25fps_256px_stride1_offset0/synth-scene-avg.pickle",
    "audio": "aggregated_audio_feats/Audio_MSRVTT_new.pickle",
}
EXPERT_DIMS = {"appearance": 128, "motion": 64, "scene": 64, "audio": 128}
# which attributes each expert sees, with weights
EXPERT_ATTRS = {
    "appearance": {"object": 1.0, "colour": 0.8, "scene": 0.3},
    "motion": {"action": 1.0, "object": 0.3},
    "scene": {"scene": 1.0, "colour": 0.2},
    "audio": {"action": 0.8, "object": 0.6},
}
TEXT_FILE = "aggregated_text_feats/glove-50d.pkl"
TEACHER_FILES = {
    "w2v": "teachers/train-full-ce-refined-text-w2v.pkl",
    "gpt2-xl": "teachers/train-full-ce-refined-text-gpt2-xl.pkl",
    "gpt2-xl-finetuned": "teachers/train-full-ce-refined-text-gpt2-xl-finetuned.pkl",
}
TEACHER_NOISE = {"w2v": 0.9, "gpt2-xl": 0.7, "gpt2-xl-finetuned": 0.5}
TEACHER_DIM = 32

SIZE_SPLITS = {"tiny": (48, 16, 16), "small": (240, 60, 100), "medium": (1500, 200, 500), "large": (6513, 497, 2990)}

DEFAULTS: dict[str, Any] = {
    "cluster_size": 4,  # videos per near-duplicate cluster (1: every video unique)
    "near_dup_fraction": 0.8,  # fraction of videos that belong to a near-duplicate cluster
    "missing_fraction": 0.3,  # fraction of videos without the audio expert (NaN)
    "noise": 1.0,  # feature noise relative to the attribute signal
    "captions_per_video": 20,
    "p_colour": 0.6,  # probability a caption mentions the colour (specificity)
    "p_scene": 0.6,  # probability a caption mentions the scene
}


def _videos(rng: np.random.Generator, n: int, k: dict[str, Any]) -> list[dict[str, str]]:
    """Attribute tuples of ``n`` videos, cluster mates adjacent."""
    out: list[dict[str, str]] = []
    cs = max(1, int(k["cluster_size"]))
    while len(out) < n:
        base = {a: ATTRS[a][rng.integers(len(ATTRS[a]))] for a in ATTRS}
        if cs > 1 and rng.random() < k["near_dup_fraction"]:
            size = min(cs, n - len(out))
            vary = "action" if rng.random() < 0.5 else "colour"
            vals = rng.choice(len(ATTRS[vary]), size=size, replace=False)
            for v in vals:
                out.append({**base, vary: ATTRS[vary][int(v)]})
        else:
            out.append(base)
    return out


def _caption(rng: np.random.Generator, att: dict[str, str], k: dict[str, Any]) -> list[str]:
    def w(a: str) -> str:
        syns = SYN[a][att[a]]
        return syns[rng.integers(len(syns))]

    colour = [w("colour")] if rng.random() < k["p_colour"] else []
    scene = rng.random() < k["p_scene"]
    obj, act = w("object"), w("action")
    prep = ["in", "on", "near"][rng.integers(3)]
    t = rng.integers(6)
    if t == 0:
        toks = ["a", *colour, obj, "is", act] + ([prep, "the", w("scene")] if scene else [])
    elif t == 1:
        toks = ["there", "is", "a", *colour, obj, act] + ([prep, "the", w("scene")] if scene else [])
    elif t == 2:
        toks = (["in", "the", w("scene")] if scene else []) + ["a", *colour, obj, "keeps", act]
    elif t == 3:
        toks = ["video", "of", "a", *colour, obj, act] + ([prep, "a", w("scene")] if scene else [])
    elif t == 4:
        toks = ["someone", "films", "a", *colour, obj, "that", "is", act] + (
            ["outside", "the", w("scene")] if scene else []
        )
    else:
        toks = ["the", *colour, obj, act, ["quickly", "slowly", "today"][rng.integers(3)]] + (
            [prep, "the", w("scene")] if scene else []
        )
    return toks


def _mentioned(toks: list[str], att: dict[str, str]) -> dict[str, bool]:
    s = set(toks)
    return {a: bool(s & set(SYN[a][att[a]])) for a in ATTRS}


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=PROTOCOL)


# caption words besides the attribute synonyms (see _caption)
_CAPTION_WORDS = {
    "a",
    "is",
    "in",
    "on",
    "near",
    "the",
    "there",
    "keeps",
    "video",
    "of",
    "someone",
    "films",
    "that",
    "outside",
    "quickly",
    "slowly",
    "today",
}


def _write_experts(
    out: Path, seed: int, ids: list[str], aidx: list[dict[str, int]], k: dict[str, Any], progress: bool
) -> np.ndarray:
    """Write the four expert pickles (attribute prototypes + noise); returns which videos lack the audio expert."""
    n = len(ids)
    # attribute prototypes, per expert (each expert has its own random view of an attribute)
    prng = rng_for(seed, "retrieval", "prototypes")
    protos = {
        e: {a: prng.standard_normal((len(ATTRS[a]), EXPERT_DIMS[e])).astype(np.float32) for a in EXPERT_ATTRS[e]}
        for e in EXPERT_FILES
    }
    frng = rng_for(seed, "retrieval", "features")
    missing = frng.random(n) < k["missing_fraction"]
    feats: dict[str, dict[str, Any]] = {e: {} for e in EXPERT_FILES}
    for i, vid in enumerate(progress_bar(ids, total=n, desc="retrieval features", enabled=progress)):
        for e in EXPERT_FILES:
            sig = sum(wt * protos[e][a][aidx[i][a]] for a, wt in EXPERT_ATTRS[e].items())
            if e == "audio":
                if missing[i]:
                    feats[e][vid] = float("nan")
                    continue
                L = int(frng.integers(3, 13))
                x = sig[None] + k["noise"] * frng.standard_normal((L, EXPERT_DIMS[e])).astype(np.float32) * 1.5
            else:
                x = sig + k["noise"] * frng.standard_normal(EXPERT_DIMS[e]).astype(np.float32)
            feats[e][vid] = x.astype(np.float32)
    for e, rel in EXPERT_FILES.items():
        _dump(out / rel, feats[e])
    return missing


def _write_captions(
    out: Path, seed: int, ids: list[str], atts: list[dict[str, str]], k: dict[str, Any]
) -> dict[str, list[list[str]]]:
    """Write the raw captions and their per-token GloVe features; returns the captions."""
    vocab = sorted({w for d in SYN.values() for syns in d.values() for s in syns for w in [s]} | _CAPTION_WORDS)
    glove = load_word_vectors(GLOVE_PACKAGE, vocab)
    lacking = [w for w in vocab if w not in glove]
    if lacking:
        raise RuntimeError(f"GloVe lacks words of the retrieval vocabulary: {lacking}")
    crng = rng_for(seed, "retrieval", "captions")
    raw: dict[str, list[list[str]]] = {}
    text: dict[str, list[np.ndarray]] = {}
    for i, vid in enumerate(ids):
        caps = [_caption(crng, atts[i], k) for _ in range(int(k["captions_per_video"]))]
        raw[vid] = caps
        text[vid] = [np.stack([glove[w] for w in c]).astype(np.float32) for c in caps]
    _dump(out / "raw-captions.pkl", raw)
    _dump(out / TEXT_FILE, text)
    return raw


def _write_teachers(
    out: Path,
    seed: int,
    ids: list[str],
    atts: list[dict[str, str]],
    aidx: list[dict[str, int]],
    raw: dict[str, list[list[str]]],
) -> None:
    """Write the TeachText-style teachers: per expert, noisy embeddings of the attributes that expert sees;
    the text side only knows the attributes the caption mentions."""
    trng = rng_for(seed, "retrieval", "teachers")
    experts = sorted(EXPERT_FILES)
    tproj = {
        e: {a: trng.standard_normal((len(ATTRS[a]), TEACHER_DIM)).astype(np.float32) for a in EXPERT_ATTRS[e]}
        for e in experts
    }
    scale = 1.0 / np.sqrt(len(experts))  # sum over experts of unit-norm products stays in [-1, 1]

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8) * scale).astype(np.float32)

    mention = np.array(
        [[[_mentioned(c, atts[i])[a] for a in ATTRS] for c in raw[vid]] for i, vid in enumerate(ids)], dtype=np.float32
    )  # [N, C, A]
    aidx_arr = {a: np.array([x[a] for x in aidx]) for a in ATTRS}
    attr_pos = {a: j for j, a in enumerate(ATTRS)}
    for name, rel in TEACHER_FILES.items():
        nz = TEACHER_NOISE[name]
        vemb, temb = {}, {}
        for e in experts:
            v = sum(wt * tproj[e][a][aidx_arr[a]] for a, wt in EXPERT_ATTRS[e].items())  # [N, d]
            t = sum(
                wt * mention[:, :, attr_pos[a], None] * tproj[e][a][aidx_arr[a]][:, None]
                for a, wt in EXPERT_ATTRS[e].items()
            )  # [N, C, d]
            vemb[e] = unit(v + nz * trng.standard_normal(v.shape).astype(np.float32))
            temb[e] = unit(t + nz * trng.standard_normal(t.shape).astype(np.float32))
        data = {
            vid: {"vid_embds": {e: vemb[e][i] for e in experts}, "text_embds": {e: temb[e][i] for e in experts}}
            for i, vid in enumerate(ids)
        }
        _dump(out / rel, data)


def build(out: Path, size: str = "small", seed: int = 0, progress: bool = False, **knobs: Any) -> dict:
    """Write the retrieval world into ``out``; returns {"knobs", counts...} for the manifest."""
    k = check_knobs("retrieval", knobs, DEFAULTS)
    if size not in SIZE_SPLITS:
        raise ValueError(f"retrieval: unknown size {size!r}; sizes: {', '.join(SIZE_SPLITS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_tr, n_va, n_te = SIZE_SPLITS[size]
    rng = rng_for(seed, "retrieval", "videos")
    # split by cluster: cluster mates stay in one split, so test has graded non-matches too
    atts = _videos(rng, n_tr, k) + _videos(rng, n_va, k) + _videos(rng, n_te, k)
    n = len(atts)
    width = max(4, len(str(n - 1)))
    ids = [f"video{i:0{width}d}" for i in range(n)]
    aidx = [{a: ATTRS[a].index(v[a]) for a in ATTRS} for v in atts]
    missing = _write_experts(out, seed, ids, aidx, k, progress)
    raw = _write_captions(out, seed, ids, atts, k)
    _write_teachers(out, seed, ids, atts, aidx, raw)
    for name, sl in (("train", slice(0, n_tr)), ("val", slice(n_tr, n_tr + n_va)), ("test", slice(n_tr + n_va, n))):
        (out / f"{name}_list_full.txt").write_text("\n".join(ids[sl]) + "\n")
    (out / "attributes.json").write_text(json.dumps({vid: atts[i] for i, vid in enumerate(ids)}, indent=0))
    clusters = sum(
        1
        for i in range(1, n)
        if atts[i]["object"] == atts[i - 1]["object"] and atts[i]["scene"] == atts[i - 1]["scene"]
    )
    return {
        "knobs": k,
        "videos": n,
        "splits": {"train": n_tr, "val": n_va, "test": n_te},
        "captions_per_video": int(k["captions_per_video"]),
        "missing_audio": int(missing.sum()),
        "near_duplicate_neighbours": int(clusters),
        "experts": {e: EXPERT_DIMS[e] for e in EXPERT_FILES},
        "text_feat": "glove-50d",
        "chance_R1_test": 100.0 / n_te,
    }
