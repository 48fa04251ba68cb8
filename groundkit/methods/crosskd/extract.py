"""Expert features for your own videos, token-level text features, and the released-archive converter.

``groundkit data extract-experts --videos DIR --out STORE`` decodes every video (PyAV), samples
frames uniformly in time, runs the offline ImageNet EfficientNet-Lite0 and writes a feature store
(:class:`~groundkit.data.crosskd.ExpertStore`) with these experts:

* ``appearance`` (1280): backbone features averaged over space and time (the CE "avg" aggregation);
* ``motion`` (1280): mean absolute difference of consecutive frames' pooled features, a cheap motion
  descriptor computed from the same backbone (no video network ships offline); missing for
  single-frame videos;
* ``scene`` (5120): 2x2 spatial grid of backbone features averaged over time (spatial layout; a
  stand-in for the Places365 DenseNet of the reference, which is not available offline);
* any TorchScript backbone given with ``--backbone NAME=PATH`` (``[B,3,S,S]`` ImageNet-normalised
  RGB -> ``[B,D]`` or a ``[B,C,H,W]`` map, averaged over space and time).

With ``--captions FILE`` (JSON ``{video_id: [caption, ...]}``) the captions are tokenised into
``captions.json`` and encoded per token by a transformers model (``--text-model PATH``; default: the
offline all-MiniLM-L6-v2 package) for training. ``convert-experts`` turns released CE/TeachText
pickles into a store.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...backbones import load_backbone, minilm_path
from ...checkpoint import atomic_dir
from ...formats.collaborative_experts import DATASET_LAYOUTS, FeatureError, read_split_list
from ...text import glove_package, tokenize
from .store import ExpertStore, StoreWriter, convert_released

__all__ = [
    "VIDEO_EXTENSIONS",
    "read_frames",
    "probe_video",
    "FrameExperts",
    "GloveTokenEncoder",
    "TransformersTokenEncoder",
    "minilm_path",
    "text_encoder_for_store",
    "extract_experts",
    "register_extract",
    "register_convert",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- video decoding


def read_frames(path: str | Path, num_frames: int = 16, size: int = 224) -> np.ndarray:
    """``num_frames`` RGB frames sampled uniformly over the video, resized to size x size: uint8 [T, S, S, 3].

    Decodes with PyAV (``pip install av``); a video shorter than ``num_frames`` gives all its frames.
    """
    try:
        import av  # noqa: PLC0415 (heavy, loaded on first use)
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("extract-experts needs PyAV to decode video: pip install 'av>=10'") from e
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"video not found: {path}")
    frames = []
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            for fr in c.decode(stream):
                frames.append(fr.to_image())
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise FeatureError(f"{path}: cannot decode video ({e})") from None
    if not frames:
        raise FeatureError(f"{path}: no video frames decoded")
    pick = np.unique(np.linspace(0, len(frames) - 1, num=min(num_frames, len(frames))).round().astype(int))

    return np.stack([np.asarray(frames[i].convert("RGB").resize((size, size), Image.BILINEAR)) for i in pick])


def probe_video(path: str | Path) -> None:
    """Open ``path`` as a video (container and a video stream) without decoding it; a file that is not
    one is a :class:`FeatureError` naming it."""
    try:
        import av  # noqa: PLC0415 (heavy, loaded on first use)
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("extract-experts needs PyAV to decode video: pip install 'av>=10'") from e
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise FeatureError(f"{path}: empty file, not a video")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise FeatureError(f"{path}: no video stream")
    except av.error.FFmpegError as e:
        raise FeatureError(f"{path}: not a readable video ({e})") from None


# ----------------------------------------------------------------------------- visual experts


class FrameExperts:
    """Per-frame backbone -> the appearance / motion / scene experts (+ TorchScript backbones)."""

    def __init__(self, backbones: dict[str, str] | None = None, device: str = "cpu", batch_size: int = 32):
        self.device = torch.device(device)
        self.effnet = load_backbone().to(self.device)
        self.extra = {}
        for name, p in (backbones or {}).items():
            if not Path(p).is_file():
                raise FeatureError(f"--backbone {name}: no TorchScript file at {p}")
            self.extra[name] = torch.jit.load(str(p), map_location=self.device).eval()
        self.batch_size = batch_size

    def dims(self) -> dict[str, int | None]:
        return {"appearance": 1280, "motion": 1280, "scene": 5120, **{k: None for k in self.extra}}

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> dict[str, np.ndarray | None]:
        """uint8 [T, S, S, 3] -> {expert: float32 vector or None (missing)}."""
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255.0)
        maps = []
        for s in range(0, len(x), self.batch_size):
            xb = ((x[s : s + self.batch_size] - 0.5) / 0.5).to(self.device)  # EfficientNet-Lite scaling
            maps.append(self.effnet.extract_features(xb).float().cpu())
        fmap = torch.cat(maps)  # [T, 1280, h, w]
        pooled = fmap.mean((2, 3))  # [T, 1280]
        out: dict[str, np.ndarray | None] = {
            "appearance": pooled.mean(0).numpy(),
            "motion": (pooled[1:] - pooled[:-1]).abs().mean(0).numpy() if len(pooled) > 1 else None,
            "scene": torch.nn.functional.adaptive_avg_pool2d(fmap, 2).mean(0).reshape(-1).numpy(),
        }
        for name, net in self.extra.items():
            feats = []
            for s in range(0, len(x), self.batch_size):
                y = net(((x[s : s + self.batch_size] - _MEAN) / _STD).to(self.device)).float().cpu()
                feats.append(y.mean((2, 3)) if y.dim() == 4 else y.reshape(len(y), -1))
            out[name] = torch.cat(feats).mean(0).numpy()
        return out


# ----------------------------------------------------------------------------- text encoders


class GloveTokenEncoder:
    """GloVe 6B 50-d word vectors per token (unknown words skipped); the built-in world's text features."""

    dim = 50

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` without a vector (left out of its encoding)."""
        index, _ = glove_package()
        return [w for w in tokenize(text) if w not in index]

    def encode_tokens(self, text: str) -> np.ndarray:
        index, vectors = glove_package()
        rows = [index[w] for w in tokenize(text) if w in index]
        if not rows:
            return np.zeros((1, self.dim), dtype=np.float32)
        return vectors[rows].astype(np.float32)


class TransformersTokenEncoder:
    """Last-layer hidden state per token of any ``transformers`` model on local disk (``AutoModel``)."""

    def __init__(self, path: str | Path, device: str = "cpu", max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415 (heavy, loaded on first use)

        p = Path(path)
        if not p.exists():
            raise FeatureError(f"text model not found at {p} (a local transformers model directory is required)")
        self.tok = AutoTokenizer.from_pretrained(str(p))
        self.model = AutoModel.from_pretrained(str(p)).eval().to(device)
        self.device, self.max_length = device, max_length
        self.dim = int(self.model.config.hidden_size)
        self.path = str(p)

    @torch.inference_mode()
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        enc = self.tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        h = self.model(**enc).last_hidden_state.float().cpu().numpy()
        lens = enc["attention_mask"].sum(1).cpu().numpy()
        return [h[i, : int(lens[i])].astype(np.float32) for i in range(len(texts))]

    def encode_tokens(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]


def text_encoder_for_store(store: ExpertStore, text_feat: str, device: str = "cpu") -> Any:
    """The encoder that produced ``text_feat`` in ``store`` (recorded at extraction; GloVe by name)."""
    info = store.meta["text"].get(text_feat, {})
    enc = info.get("encoder", {})
    if enc.get("kind") == "transformers":
        return TransformersTokenEncoder(enc["path"], device=device)
    if enc.get("kind") == "glove" or text_feat.startswith("glove"):
        return GloveTokenEncoder()
    raise FeatureError(
        f"the store's text features {text_feat!r} came from {enc.get('source', 'an unknown model')}; pass "
        "text_encoder=TransformersTokenEncoder(<local path of that model>) to encode free-text queries the same way"
    )


# ----------------------------------------------------------------------------- extraction


def _list_videos(videos: str | Path) -> list[Path]:
    d = Path(videos)
    if d.is_file():
        return [d]
    if not d.is_dir():
        raise FeatureError(f"--videos {d}: no such file or directory")
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not files:
        raise FeatureError(f"--videos {d}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    return files


def extract_experts(
    videos: str | Path,
    out: str | Path,
    captions: str | Path | None = None,
    text_model: str | Path | None = None,
    text_name: str = "",
    num_frames: int = 16,
    size: int = 224,
    backbones: dict[str, str] | None = None,
    splits: dict[str, str] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> ExpertStore:
    """Extract the experts of every video under ``videos`` (id = file stem) into a store at ``out``."""
    files = _list_videos(videos)
    ids = [p.stem for p in files]
    if len(set(ids)) != len(ids):
        raise FeatureError("two videos share a file name stem; video ids must be unique")
    caps = None
    caps = None
    if captions is not None:  # check captions before the (slow) extraction
        cp = Path(captions)
        if not cp.is_file():
            raise FeatureError(f"--captions {cp}: file not found")
        try:
            caps = json.loads(cp.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise FeatureError(f"--captions {cp}: not valid JSON ({e})") from None
        if not isinstance(caps, dict):
            raise FeatureError(f"--captions {cp}: expected a JSON object {{video_id: [caption, ...]}}")
        absent = [v for v in ids if v not in caps]
        if absent:
            raise FeatureError(
                f"--captions {cp}: no captions for video {absent[0]!r} ({len(absent)} videos lack captions)"
            )
    for p in files:  # every file opens as a video before the (slow) backbone is loaded
        probe_video(p)
    fe = FrameExperts(backbones, device=device)
    feats: dict[str, dict[str, np.ndarray | None]] = {}
    for i, (vid, p) in enumerate(zip(ids, files)):
        res = fe(read_frames(p, num_frames, size))
        for k, v in res.items():
            feats.setdefault(k, {})[vid] = v
        if progress:
            print(f"[extract-experts] {i + 1}/{len(files)} {p.name}", file=sys.stderr)
    with atomic_dir(out) as tmp:  # a failure leaves no partial store
        _write_store(tmp, ids, feats, caps, text_model, text_name, splits, device, videos, num_frames, size)
    return ExpertStore(out)


def _write_store(
    out: Path,
    ids: list[str],
    feats: dict[str, dict[str, np.ndarray | None]],
    caps: dict[str, list[str]] | None,
    text_model: str | Path | None,
    text_name: str,
    splits: dict[str, str] | None,
    device: str,
    videos: str | Path,
    num_frames: int,
    size: int,
) -> None:
    w = StoreWriter(out, ids)
    for k, d in feats.items():
        dim = next((v.shape[-1] for v in d.values() if v is not None), None)
        if dim is None:
            print(f"[extract-experts] expert {k}: missing for every video; not written", file=sys.stderr)
            continue
        w.add_expert(k, d, int(dim), "fixed", source=f"extract-experts:{k}")
    if caps is not None:
        path = Path(text_model) if text_model else minilm_path()
        enc = TransformersTokenEncoder(path, device=device)
        name = text_name or (path.name if text_model else "all-minilm-l6-v2")
        text = {v: enc.encode_batch(caps[v]) for v in ids}
        w.add_text(name, text, enc.dim, encoder={"kind": "transformers", "path": str(path)})
        w.add_captions({v: [tokenize(c) for c in caps[v]] for v in ids})
    w.add_split("all", ids)
    for name, lst in (splits or {}).items():
        w.add_split(name, read_split_list(lst))
    w.close(source=str(videos), num_frames=num_frames, size=size)


# ----------------------------------------------------------------------------- CLI


def _pairs(items: Iterable[str], flag: str) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise FeatureError(f"{flag} {it!r}: expected NAME=PATH")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def register_extract(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "extract-experts", help="extract CE expert features (+ caption token features) from your videos into a store"
    )
    p.add_argument("--videos", required=True, help="a video file or a directory searched recursively")
    p.add_argument("--out", required=True, help="store directory to write")
    p.add_argument("--captions", default=None, help="JSON {video_id: [caption, ...]} (video id = file stem)")
    p.add_argument(
        "--text-model",
        default=None,
        help="local transformers model for token features (default: offline all-MiniLM-L6-v2)",
    )
    p.add_argument("--text-name", default="", help="name of the text features in the store")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument(
        "--backbone", action="append", default=[], metavar="NAME=PATH", help="extra TorchScript image backbone"
    )
    p.add_argument(
        "--split", action="append", default=[], metavar="NAME=LIST", help="split list to record in the store"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")

    def run(a: argparse.Namespace) -> int:
        try:
            st = extract_experts(
                a.videos,
                a.out,
                a.captions,
                a.text_model,
                a.text_name,
                a.num_frames,
                a.size,
                _pairs(a.backbone, "--backbone"),
                _pairs(a.split, "--split"),
                a.device,
                not a.quiet,
            )
        except ImportError as e:
            raise FeatureError(f"extract-experts: {e}") from None
        print(
            json.dumps(
                {
                    "store": str(st.root),
                    "videos": len(st.video_ids),
                    "experts": {k: v["dim"] for k, v in st.experts.items()},
                    "text": {k: v["dim"] for k, v in st.meta["text"].items()},
                }
            )
        )
        return 0

    p.set_defaults(func=run)


def register_convert(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert-experts", help="convert released CE/TeachText feature pickles into a memory-mapped store"
    )
    p.add_argument(
        "--root", required=True, help="released feature directory (e.g. MSRVTT/high-quality/structured-symlinks)"
    )
    p.add_argument("--out", required=True, help="store directory to write")
    p.add_argument("--dataset", default="msrvtt", choices=sorted(DATASET_LAYOUTS))
    p.add_argument(
        "--expert", action="append", default=[], metavar="NAME=RELPATH", help="expert pickles (default: the layout's)"
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="NAME=RELPATH",
        help="text feature pickles (default: the layout's that exist)",
    )
    p.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="NAME=RELPATH",
        help="TeachText teachers (default: the layout's that exist)",
    )
    p.add_argument("--missing-ids", default="error", choices=["error", "nan"])

    def run(a: argparse.Namespace) -> int:
        root = Path(a.root)
        lay = DATASET_LAYOUTS[a.dataset]
        experts = _pairs(a.expert, "--expert") or dict(lay["experts"])
        text = _pairs(a.text, "--text") or {k: v for k, v in lay["text_feats"].items() if (root / v).is_file()}
        teachers = _pairs(a.teacher, "--teacher") or {k: v for k, v in lay["teachers"].items() if (root / v).is_file()}
        splits = {
            Path(rel).stem: rel for fam in lay["splits"].values() for rel in fam.values() if (root / rel).is_file()
        }
        if not splits:
            raise FeatureError(f"convert-experts: no split lists of {a.dataset} under {root}")
        st = convert_released(
            root,
            a.out,
            experts,
            text,
            splits,
            lay["raw_captions"],
            teachers,
            strip_suffix=lay.get("strip_suffix", False),
            missing_ids=a.missing_ids,
            progress=True,
        )
        print(
            json.dumps(
                {
                    "store": str(st.root),
                    "videos": len(st.video_ids),
                    "experts": {k: v["dim"] for k, v in st.experts.items()},
                    "splits": {k: len(v) for k, v in st.meta["splits"].items()},
                }
            )
        )
        return 0

    p.set_defaults(func=run)
