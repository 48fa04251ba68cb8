"""The ``video`` task: VID-Sentence-style referring expressions over moving objects.

Each video is a scene whose objects move horizontally at constant speed over ``n_frames`` frames.
Most described targets have a same-category distractor, often identical in appearance and moving
the other way (or standing still), so the expression must use motion ("the red car moving left")
and a single frame cannot tell the two apart; the two cross each other. Per-frame difficulties on
the target: *isolated* ones (an occluder in one frame only, a motion-blurred frame) and
*sustained* ones (an occluder over the target for 3-5 consecutive frames, a look-alike
distractor crossing in front of it). Files under ``out``::

    ILSVRC/Data/VID/<split>/<video>/%06d.JPEG             frames (tube frame f is file f-1)
    ILSVRC/Annotations/VID/tubeGt/<split>/<video>.js       every object's track, boxes [x1,y1,x2,y2] (int px)
    ILSVRC/Data/VID/annSamples/<split>_valid_list.txt       "<video>,<track id>" per described track
    ILSVRC/Data/VID/annSamples/<split>_ann_list_v2.txt      "<line index>, <caption>"
    VID/VID_video_level_<split>.pth                         co-grounding index: per described track a list of
                                                            [img_path (relative to out), [x1,y1,x2,y2], caption]
    meta/video_meta.json                                   groundkit metadata: programs, per-frame difficulty flags

Splits: train, val, test (the co-grounding code reads train and test; val is for model selection).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..formats import vid_sentence
from .core import check_knobs, progress_bar, rng_for, write_json
from .scene import CATEGORY_NAMES, Scene, SceneKnobs, SceneObject, box_iou_np, render_scene, sample_scene

__all__ = ["build", "DEFAULTS", "MOTION_WORDS", "SPLITS", "visibility"]

TASK = "video"
SPLITS = ("train", "val", "test")
MOTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("moving left", "going left", "heading to the left"),
    "right": ("moving right", "going right", "heading to the right"),
    "still": ("standing still", "not moving", "staying still"),
}

# VID-Sentence: 6,582 train / 536 val / 536 test captions.
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_videos=[8, 3, 3], n_frames=8, width=160, height=120),
    "small": dict(n_videos=[120, 20, 20], n_frames=12, width=160, height=120),
    "medium": dict(n_videos=[1200, 150, 150], n_frames=16, width=224, height=168),
    "large": dict(n_videos=[5000, 500, 500], n_frames=16, width=160, height=120),
}
_COMMON = dict(
    min_objects=2,
    max_objects=4,
    distractor_rate=0.85,  # described targets with a same-category distractor
    identical_distractor=0.7,  # ... of which the distractor looks the same (only motion tells them apart)
    describe_distractor=True,  # also describe an identical distractor's own track
    isolated_occlusion_rate=0.5,  # videos with a one-frame occluder over the target
    sustained_occlusion_rate=0.4,  # videos with an occluder over the target for 3-5 consecutive frames
    blur_rate=0.12,  # per-frame probability of motion blur (whole frame)
    speed=[1.5, 3.5],  # px per frame at width 160 (scaled with the width)
    render_noise=5.0,
    jpeg_quality=90,
)


def _defaults(size: str) -> dict[str, Any]:
    if size not in DEFAULTS:
        raise ValueError(f"unknown size {size!r}; sizes: {list(DEFAULTS)}")
    return {**_COMMON, **DEFAULTS[size]}


def visibility(box: tuple, fronts: list[tuple], grid: int = 24) -> tuple[float, list[float] | None]:
    """Visible fraction of ``box`` under the boxes ``fronts`` drawn over it, and the bounding box of
    its visible part (None when fully covered), on a ``grid`` x ``grid`` sample of the box."""
    x1, y1, x2, y2 = box
    xs, ys = np.linspace(x1, x2, grid), np.linspace(y1, y2, grid)
    covered = np.zeros((grid, grid), dtype=bool)
    for fx1, fy1, fx2, fy2 in fronts:
        covered |= ((ys >= fy1) & (ys <= fy2))[:, None] & ((xs >= fx1) & (xs <= fx2))[None, :]
    free = ~covered
    if not free.any():
        return 0.0, None
    cols, rows = np.nonzero(free.any(0))[0], np.nonzero(free.any(1))[0]
    vbox = [
        round(float(xs[cols[0]]), 2),
        round(float(ys[rows[0]]), 2),
        round(float(xs[cols[-1]]), 2),
        round(float(ys[rows[-1]]), 2),
    ]
    return float(free.mean()), vbox


def _clip(b: tuple, w: int, h: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = b
    return (max(0.0, x1), max(0.0, y1), min(float(w - 1), x2), min(float(h - 1), y2))


def _add_distractor(
    scene: Scene, target: SceneObject, rng: np.random.Generator, k: dict[str, Any]
) -> tuple[list[SceneObject], bool]:
    """Give the target its same-category distractor (at ``distractor_rate``), made identical or not, and recolour
    the other same-category objects; returns those objects (distractor first) and whether it looks the same."""
    same = [o for o in scene.objects if o.category == target.category and o.id != target.id]
    identical = False
    if rng.random() < k["distractor_rate"]:
        identical = rng.random() < k["identical_distractor"]
        if same:
            d = same[0]
            if identical:
                scene.objects[d.id] = d = replace(d, colour=target.colour, pattern=target.pattern, size=target.size)
        else:  # add one near the target's row, so that the two cross
            d, identical = _new_distractor(scene, target, identical, rng, k)
            scene.objects.append(d)
        same = [d] + [o for o in same if o.id != d.id]
    # every other same-category object gets another colour, so that at most the first distractor
    # looks like the target (and that one always moves differently)
    alt = [c for c in target.cat.palette if c != target.colour] or [target.colour]
    for n, o in enumerate(same):
        if (n > 0 or not identical) and o.colour == target.colour:
            scene.objects[o.id] = replace(o, colour=str(rng.choice(alt)))
    return [scene.objects[o.id] for o in same], identical


def _new_distractor(
    scene: Scene, target: SceneObject, identical: bool, rng: np.random.Generator, k: dict[str, Any]
) -> tuple[SceneObject, bool]:
    """A new object of the target's category in a row just above or below it; returns it and whether it is
    identical (also when the palette has no other colour)."""
    tx1, ty1, tx2, ty2 = target.box
    cat = target.cat
    colour, pattern = target.colour, target.pattern
    if not identical:
        alt = [c for c in cat.palette if c != target.colour]
        colour = str(rng.choice(alt)) if alt else colour
        if colour == target.colour:
            identical = True
    # a row slightly above or below the target's: when they cross, one hides part of the other
    dy = float(rng.choice([-1.0, 1.0])) * rng.uniform(0.55, 0.8) * (ty2 - ty1)
    if ty1 + dy < 0 or ty2 + dy > k["height"] - 1:
        dy = -dy
    d = SceneObject(
        id=len(scene.objects),
        category=target.category,
        colour=colour,
        pattern=pattern,
        box=(tx1, ty1 + dy, tx2, ty2 + dy),
        depth=round(target.depth + 0.001 * (1 if dy > 0 else -1), 4),
        size=target.size,
    )
    return d, identical


def _directions(scene: Scene, target: SceneObject, same: list[SceneObject], rng: np.random.Generator) -> dict[int, str]:
    """Each object's motion (left, right or still); the target and its first distractor never share one."""
    dirs: dict[int, str] = {}
    dirs[target.id] = str(rng.choice(["left", "right", "still"], p=[0.4, 0.4, 0.2]))
    if same:
        choices = [x for x in ("left", "right", "still") if x != dirs[target.id]]
        dirs[same[0].id] = str(rng.choice(choices))
    for o in scene.objects:
        dirs.setdefault(o.id, str(rng.choice(["left", "right", "still"])))
    return dirs


def _place_moving(
    scene: Scene,
    target: SceneObject,
    same: list[SceneObject],
    dirs: dict[int, str],
    rng: np.random.Generator,
    k: dict[str, Any],
) -> tuple[list[SceneObject], dict[int, float]]:
    """Speeds and start positions that keep every object in view; the target and its distractor start on
    opposite sides so that they cross. Returns the objects at frame 0 and their velocities (px per frame)."""
    W, T = k["width"], k["n_frames"]
    scale = W / 160.0
    vel: dict[int, float] = {}
    objects = []
    for o in scene.objects:
        v = {"left": -1.0, "right": 1.0, "still": 0.0}[dirs[o.id]] * rng.uniform(*k["speed"]) * scale
        x1, y1, x2, y2 = o.box
        bw = x2 - x1
        travel = abs(v) * (T - 1)
        if travel > W - bw - 2:  # too fast for the frame: slow down so the object stays in view
            v = math.copysign(max(W - bw - 2, 0) / max(T - 1, 1), v) if v else 0.0
            travel = abs(v) * (T - 1)
        lo = 1.0 + (travel if v < 0 else 0.0)
        hi = W - bw - 1.0 - (travel if v > 0 else 0.0)
        if o.id == target.id or (same and o.id == same[0].id):
            # the target and its distractor start on opposite sides so that they cross mid-video
            goes_right = v > 0 or (v == 0 and dirs.get(target.id) == "left" and o.id != target.id)
            frac = rng.uniform(0.0, 0.3) if goes_right else rng.uniform(0.7, 1.0)
            if v == 0:
                frac = rng.uniform(0.35, 0.65)
            nx1 = lo + frac * max(hi - lo, 0.0)
        else:
            nx1 = rng.uniform(lo, max(lo, hi))
        objects.append(replace(o, box=(nx1, y1, nx1 + bw, y2)))
        vel[o.id] = v
    if same:  # the distractor meets the target in a middle frame (they cross or pass each other)
        _meet_target(objects, vel, target.id, same[0].id, rng, k)
    return objects, vel


def _meet_target(
    objects: list[SceneObject],
    vel: dict[int, float],
    target_id: int,
    distractor_id: int,
    rng: np.random.Generator,
    k: dict[str, Any],
) -> None:
    """Move the distractor's start (in ``objects``) so that it is level with the target in a middle frame."""
    W, T = k["width"], k["n_frames"]
    d0, t0 = objects[distractor_id], objects[target_id]
    tc = rng.uniform(0.3, 0.7) * (T - 1)
    dw = d0.box[2] - d0.box[0]
    vd, vt = vel[d0.id], vel[t0.id]
    lo = 1.0 + max(0.0, -vd * (T - 1))
    hi = W - dw - 1.0 - max(0.0, vd * (T - 1))
    nx1 = min(max(t0.box[0] + (vt - vd) * tc, lo), max(lo, hi))
    objects[d0.id] = replace(d0, box=(nx1, d0.box[1], nx1 + dw, d0.box[3]))


def _difficulty_events(rng: np.random.Generator, k: dict[str, Any]) -> tuple[list[dict[str, Any]], list[bool]]:
    """The target's occlusion events (isolated, sustained) and the per-frame motion-blur flags."""
    T = k["n_frames"]
    events: list[dict[str, Any]] = []
    if rng.random() < k["isolated_occlusion_rate"] and T >= 3:
        f = int(rng.integers(1, T - 1))
        events.append({"kind": "isolated", "frame": f, "cover": float(rng.uniform(0.7, 1.0))})
    if rng.random() < k["sustained_occlusion_rate"] and T >= 5:
        # an occluder that stays over the target for several consecutive frames
        length = int(rng.integers(3, min(5, T - 1) + 1))
        f0 = int(rng.integers(0, T - length + 1))
        events.append(
            {
                "kind": "sustained",
                "frame": f0,
                "length": length,
                "cover": float(rng.uniform(0.7, 1.0)),
                "side": str(rng.choice(["left", "right"])),
            }
        )
    blur = [bool(rng.random() < k["blur_rate"]) for _ in range(T)]
    return events, blur


def _plan_video(rng: np.random.Generator, k: dict[str, Any]) -> dict[str, Any]:
    """Sample objects, the target, its distractor, velocities and the difficulty events of one video."""
    scene = sample_scene(
        rng,
        SceneKnobs(
            width=k["width"],
            height=k["height"],
            min_objects=k["min_objects"],
            max_objects=k["max_objects"],
            cooccurrence=0.0,
            same_category=0.3,
        ),
    )
    objs = [o for o in scene.objects if o.cat.zone == "ground"] or scene.objects
    target = objs[int(rng.integers(len(objs)))]
    same, identical = _add_distractor(scene, target, rng, k)
    dirs = _directions(scene, target, same, rng)
    objects, vel = _place_moving(scene, target, same, dirs, rng, k)
    scene = replace(scene, objects=objects)
    target = scene.objects[target.id]
    events, blur = _difficulty_events(rng, k)
    return {
        "scene": scene,
        "target": target.id,
        "distractor": same[0].id if same else None,
        "identical": identical,
        "dirs": dirs,
        "vel": vel,
        "events": events,
        "blur": blur,
    }


def _frame_boxes(plan: dict[str, Any], t: int) -> dict[int, tuple[float, float, float, float]]:
    out = {}
    for o in plan["scene"].objects:
        x1, y1, x2, y2 = o.box
        dx = plan["vel"][o.id] * t
        out[o.id] = (x1 + dx, y1, x2 + dx, y2)
    return out


def _occluders(plan: dict[str, Any], t: int, boxes: dict[int, tuple]) -> list[tuple[float, float, float, float, str]]:
    tb = boxes[plan["target"]]
    occ = []
    for e in plan["events"]:
        if e["kind"] == "isolated" and e["frame"] == t:
            w = (tb[2] - tb[0]) * e["cover"]
            occ.append((tb[0] - 1, tb[1] - 4, tb[0] + w + 1, tb[3] + 4, "isolated"))
        elif e["kind"] == "sustained" and e["frame"] <= t < e["frame"] + e["length"]:
            w = (tb[2] - tb[0]) * e["cover"]
            x1 = tb[0] - 1 if e["side"] == "left" else tb[2] - w - 1
            occ.append((x1, tb[1] - 10, x1 + w + 2, tb[3] + 6, "sustained"))
    return occ


def _motion_blur(img: Image.Image, length: int) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    acc = np.zeros_like(a)
    for s in range(length):
        acc += np.roll(a, s - length // 2, axis=1)
    return Image.fromarray(np.clip(acc / length, 0, 255).astype(np.uint8))


def _render_frame(plan: dict[str, Any], t: int, k: dict[str, Any], video_seed: list) -> tuple[Image.Image, dict]:
    boxes = _frame_boxes(plan, t)
    scene_t = replace(plan["scene"], objects=[replace(o, box=boxes[o.id]) for o in plan["scene"].objects])
    # the same generator state every frame: a static background and stable textures
    img = render_scene(scene_t, np.random.default_rng(video_seed), noise=0.0)
    d = ImageDraw.Draw(img)
    occ = _occluders(plan, t, boxes)
    for x1, y1, x2, y2, kind in occ:
        col = (110, 90, 70) if kind == "sustained" else (95, 95, 100)
        d.rectangle([x1, y1, x2, y2], fill=col)
        for yy in range(int(y1), int(y2), 6):
            d.line([(x1, yy), (x2, yy)], fill=(col[0] - 25, col[1] - 25, col[2] - 25), width=1)
    frng = np.random.default_rng(video_seed + [t])
    if plan["blur"][t]:
        img = _motion_blur(img, int(frng.integers(5, 10)))
    if k["render_noise"] > 0:
        arr = np.asarray(img, dtype=np.float32) + frng.normal(0, k["render_noise"], (img.height, img.width, 3)).astype(
            np.float32
        )
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    W, H = img.width, img.height
    # visible fraction of every object: objects drawn over it and occluders
    vis, vbox = {}, {}
    for o in scene_t.objects:
        fronts = [boxes[p.id] for p in scene_t.objects if p.id != o.id and (p.depth, p.id) > (o.depth, o.id)]
        fronts += [b[:4] for b in occ]
        vis[o.id], vbox[o.id] = visibility(_clip(boxes[o.id], W, H), fronts)
    return img, {
        "boxes": boxes,
        "visible": vis,
        "visible_box": vbox,
        "occluders": [b[4] for b in occ if _overlaps(b, boxes[plan["target"]])],
    }


def _overlaps(a: tuple, b: tuple) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _noun_phrase(obj: SceneObject, rng: np.random.Generator, with_colour: bool) -> str:
    words = obj.cat.words
    noun = str(rng.choice(words[1:])) if len(words) > 1 and rng.random() < 0.4 else words[0]
    return " ".join(([obj.colour] if with_colour else []) + [noun])


def _caption(plan: dict[str, Any], oid: int, other: int | None, rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    scene = plan["scene"]
    obj = scene.objects[oid]
    same = [o for o in scene.objects if o.category == obj.category and o.id != oid]
    looks_same = [o for o in same if o.colour == obj.colour]
    motion = plan["dirs"][oid]
    if looks_same:
        if any(plan["dirs"][o.id] == motion for o in looks_same):
            raise AssertionError("a look-alike distractor moves the same way; the plan forbids this")
        kind = "motion"
        need_colour = any(plan["dirs"][o.id] == motion for o in same)  # a differently coloured one moves alike
        np_ = _noun_phrase(obj, rng, with_colour=need_colour or rng.random() < 0.5)
    elif same and not looks_same:
        kind = (
            "attribute+motion"
            if rng.random() < 0.5 and all(plan["dirs"][o.id] != motion for o in same)
            else "attribute"
        )
        np_ = _noun_phrase(obj, rng, with_colour=True)
    else:
        kind = "category+motion" if rng.random() < 0.5 else "category"
        np_ = _noun_phrase(obj, rng, with_colour=rng.random() < 0.5)
    text = f"the {np_}"
    if kind.endswith("motion"):
        text += " " + str(rng.choice(MOTION_WORDS[motion]))
    return text, {
        "kind": kind,
        "motion": motion,
        "same_category": [o.id for o in same],
        "looks_same": [o.id for o in looks_same],
    }


def _write_split(out: Path, split: str, n_videos: int, seed: int, k: dict[str, Any], progress: bool) -> dict[str, Any]:
    root = out / "ILSVRC"
    T, W, H = k["n_frames"], k["width"], k["height"]
    valid_lines, cap_lines, video_level, metas = [], [], [], []
    n_frames_total = 0
    for i in progress_bar(range(n_videos), total=n_videos, desc=f"video {split}", enabled=progress):
        video = f"synth_vid_{split}_{i:06d}"
        rng = rng_for(seed, TASK, split, i)
        plan = _plan_video(rng, k)
        video_seed = [int(seed), 1709, SPLITS.index(split), i]
        frames = []
        fdir = root / "Data" / "VID" / split / video
        fdir.mkdir(parents=True, exist_ok=True)
        for t in range(T):
            img, info = _render_frame(plan, t, k, video_seed)
            img.save(fdir / f"{t:06d}.JPEG", format="JPEG", quality=k["jpeg_quality"])
            frames.append(info)
        n_frames_total += T
        # tubes for every object (as ImageNet VID annotates every object)
        anns = []
        for o in plan["scene"].objects:
            track = []
            for t, info in enumerate(frames):
                x1, y1, x2, y2 = _clip(info["boxes"][o.id], W, H)
                track.append(
                    {
                        "frame": t + 1,
                        "bbox": [int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2))],
                        "frame_size": [H, W],
                        "class": o.category,
                        "class_index": CATEGORY_NAMES.index(o.category) + 1,
                        "occluded": int(info["visible"][o.id] < 0.5),
                        "generated": 0,
                        "name": o.cat.detector,
                    }
                )
            anns.append({"id": str(o.id), "track": track})
        vid_sentence.write_tube_json(root, split, video, anns)
        described = [plan["target"]]
        if plan["distractor"] is not None and plan["identical"] and k["describe_distractor"]:
            described.append(plan["distractor"])
        for oid in described:
            other = plan["distractor"] if oid == plan["target"] else plan["target"]
            text, prog = _caption(plan, oid, other, rng)
            idx = len(valid_lines)
            valid_lines.append(f"{video},{oid}")
            cap_lines.append(f"{idx}, {text}")
            tube = anns[oid]["track"]
            video_level.append(
                [[f"ILSVRC/Data/VID/{split}/{video}/{t:06d}.JPEG", e["bbox"], text] for t, e in enumerate(tube)]
            )
            metas.append(
                {
                    "objects": [
                        {"id": o.id, "category": o.category, "colour": o.colour, "motion": plan["dirs"][o.id]}
                        for o in plan["scene"].objects
                    ],
                    "index": idx,
                    "video": video,
                    "track_id": str(oid),
                    "caption": text,
                    "program": prog,
                    "primary": oid == plan["target"],
                    "distractor_track": None if other is None else str(other),
                    "identical_distractor": plan["identical"],
                    "events": plan["events"] if oid == plan["target"] else [],
                    "frames": [
                        {
                            "visible": round(f["visible"][oid], 4),
                            "visible_box": f["visible_box"][oid],
                            "distractor_visible": None if other is None else round(f["visible"][other], 4),
                            "distractor_visible_box": None if other is None else f["visible_box"][other],
                            "blur": plan["blur"][t],
                            "occluder": f["occluders"] if oid == plan["target"] else [],
                            "iou_with_distractor": (
                                round(
                                    float(box_iou_np(np.array([f["boxes"][oid]]), np.array([f["boxes"][other]]))[0, 0]),
                                    4,
                                )
                                if other is not None
                                else 0.0
                            ),
                        }
                        for t, f in enumerate(frames)
                    ],
                }
            )
    ann_dir = root / "Data" / "VID" / "annSamples"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"{split}_valid_list.txt").write_text("".join(ln + "\n" for ln in valid_lines), encoding="utf-8")
    (ann_dir / f"{split}_ann_list_v2.txt").write_text("".join(ln + "\n" for ln in cap_lines), encoding="utf-8")
    vid_sentence.save_video_level(video_level, out / "VID" / f"VID_video_level_{split}.pth")
    return {"videos": n_videos, "frames": n_frames_total, "described_tracks": len(valid_lines), "meta": metas}


def build(out: Path, size: str, seed: int, progress: bool = False, **knobs: Any) -> dict[str, Any]:
    """Write the video world (see the module docstring); returns counts and knobs for the manifest."""
    k = check_knobs(TASK, knobs, _defaults(size))
    if len(k["n_videos"]) != 3 or any(int(n) < 0 for n in k["n_videos"]):
        raise ValueError(f"n_videos must be 3 counts (train, val, test), got {k['n_videos']}")
    if k["n_frames"] < 2:
        raise ValueError(f"n_frames must be >= 2, got {k['n_frames']}")
    k["speed"] = [float(v) for v in k["speed"]]
    out = Path(out)
    counts, meta = {}, {}
    for split, n in zip(SPLITS, k["n_videos"]):
        res = _write_split(out, split, int(n), seed, k, progress)
        meta[split] = res.pop("meta")
        counts[split] = res
    (out / "meta").mkdir(exist_ok=True)
    write_json(out / "meta" / "video_meta.json", {"version": 1, "splits": meta})
    tracks = [m for s in meta.values() for m in s]
    frames = [f for m in tracks for f in m["frames"]]
    return {
        "splits": counts,
        "frames_occluded": round(sum(f["visible"] < 0.5 for f in frames) / max(len(frames), 1), 4),
        "frames_blurred": round(sum(f["blur"] for f in frames) / max(len(frames), 1), 4),
        "tracks_with_same_category_distractor": round(
            sum(bool(m["program"]["same_category"]) for m in tracks) / max(len(tracks), 1), 4
        ),
        "knobs": {**k, "speed": list(k["speed"])},
    }
