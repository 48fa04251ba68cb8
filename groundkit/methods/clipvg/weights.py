"""CLIP and CLIP-VG weights as users have them, read without running code from the file.

Three kinds of file hold CLIP weights:

- **OpenAI TorchScript archives** (``ViT-B-16.pt``, what the official CLIP-VG code loads): a zip whose
  ``data.pkl`` pickles the scripted module. :func:`read_torchscript` reads it with an unpickler that knows
  only tensors, storages and ``OrderedDict``; every ``__torch__`` class becomes an inert attribute holder,
  nothing of the archive's ``code/`` is compiled or run (``torch.jit.load`` would compile it). The
  tensors are gathered by attribute path, which is the state dict's key.
- **state dicts** (open_clip ``.bin`` / ``.pt``, OpenAI state dicts converted by hand): ``torch.load``
  with ``weights_only=True``; or ``.safetensors``.
- **CLIP-VG checkpoints** (the official ``checkpoint.pth`` / ``best_checkpoint.pth``: ``{"model": state
  dict, "args": Namespace, ...}``): read with ``weights_only=True``, ``argparse.Namespace`` allowed.
  Its ``clip.*`` tensors are the CLIP weights (with the visual positional embedding that the official
  code trains); the copies its wrappers hold (``image_encoder_clip_vg.*``, ``text_encoder_clip_vg.*``)
  must equal them; the rest maps onto :class:`~groundkit.methods.clipvg.model.ClipVG` by
  :func:`official_to_groundkit`.

OpenAI's weights (archives and CLIP-VG checkpoints) were trained with QuickGELU:
:func:`needs_quick_gelu` says so, and the encoders build open_clip's QuickGELU towers for them.
"""

from __future__ import annotations

import argparse
import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import CheckpointError

__all__ = [
    "read_torchscript",
    "read_weights",
    "clip_weights",
    "needs_quick_gelu",
    "official_state_dict",
    "official_to_groundkit",
    "OPENAI_EXTRAS",
]

#: tensors of OpenAI's archives that open_clip's model does not hold (constants and a cached mask)
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")

_STORAGES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Inert:
    """What a ``__torch__`` class of an archive becomes: its pickled attributes, nothing else."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str, path: Path):
        super().__init__(io.BytesIO(data))
        self.zf, self.root, self.path = zf, root, path

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _Inert
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise CheckpointError(f"{self.path}: the TorchScript archive pickles {module}.{name}, which is not a tensor")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unknown storage record {pid!r:.80} in the TorchScript archive")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{self.path}: storage {key} has no known type ({dtype!r:.40})")
        try:
            raw = self.zf.read(f"{self.root}/data/{key}")
        except KeyError:
            raise CheckpointError(f"{self.path}: storage {key} is missing from the archive (truncated?)") from None
        width = torch.empty((), dtype=dtype).element_size()
        if len(raw) < numel * width:
            raise CheckpointError(f"{self.path}: storage {key} holds {len(raw)} bytes, expected {numel * width}")
        return torch.frombuffer(bytearray(raw[: numel * width]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj.clone()
        return
    if isinstance(obj, _Inert) and id(obj) not in seen:
        seen.add(id(obj))
        for name, value in obj.__dict__.get("_state", {}).items():
            _collect(value, f"{prefix}{name}.", out, seen)


def read_torchscript(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a TorchScript archive (e.g. OpenAI's ``ViT-B-16.pt``) by attribute path, read
    without compiling or running the archive's code."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({e})") from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            raise CheckpointError(f"{path}: a zip without <name>/data.pkl is not a TorchScript archive")
        root = pkls[0].split("/")[0]
        try:
            obj = _ArchiveUnpickler(zf.read(pkls[0]), zf, root, path).load()
        except CheckpointError:
            raise
        except Exception as e:  # a torn pickle, a bad CRC, ...
            raise CheckpointError(f"{path}: cannot read the TorchScript archive ({type(e).__name__}: {e})") from None
    out: dict[str, torch.Tensor] = {}
    _collect(obj, "", out, set())
    if not out:
        raise CheckpointError(f"{path}: the TorchScript archive holds no tensors")
    return out


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/code/__torch__.py") or "/code/__torch__/" in n for n in names)


def read_weights(path: str | Path) -> tuple[dict[str, Any], str]:
    """``(content, kind)`` of a weights file: kind ``"torchscript"`` (tensors by attribute path),
    ``"safetensors"`` or ``"pickle"`` (what ``torch.load(weights_only=True)`` returns; argparse
    namespaces, as in training checkpoints, allowed). Nothing from the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if _is_torchscript(path):
        return read_torchscript(path), "torchscript"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            return load_file(str(path)), "safetensors"
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True), "pickle"
    except pickle.UnpicklingError:  # torch's message advises weights_only=False, which would run the file's code
        raise CheckpointError(
            f"{path}: not a readable weights file (not a tensor pickle, or it holds objects other than tensors, "
            "which are never unpickled)"
        ) from None
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: {msg[:200]})") from None


def _unwrap(content: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ``{"state_dict": ...}`` / ``{"model": ...}`` unwrapped,
    ``module.`` (DDP) stripped."""
    for key in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if not isinstance(content, dict) or not content:
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(content).__name__}"
        )
    out = {}
    for k, v in content.items():
        if isinstance(v, torch.Tensor):
            out[k[len("module.") :] if k.startswith("module.") else k] = v
    if not out:
        raise CheckpointError(f"{path}: the state dict holds no tensors")
    return out


#: the official CLIP-VG wrappers' copies of CLIP tensors: wrapper prefix -> CLIP prefix
_OFFICIAL_COPIES = {
    "image_encoder_clip_vg.transformer.": "clip.visual.transformer.",
    "image_encoder_clip_vg.": "clip.visual.",
    "text_encoder_clip_vg.": "clip.",
}


def clip_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """``(CLIP state dict in open_clip / OpenAI names, provenance)`` of any supported file; provenance is
    ``"openai"`` (TorchScript archive), ``"clipvg"`` (official CLIP-VG checkpoint: its ``clip.*``) or
    ``"state_dict"``. Raises :class:`CheckpointError` naming the file for anything else."""
    path = Path(path)
    content, kind = read_weights(path)
    if kind == "torchscript":
        sd = {k: v for k, v in content.items() if not k.endswith(".attn_mask") and k != "attn_mask"}
        return sd, "openai"
    sd = _unwrap(content, path)
    if "clip.visual.conv1.weight" in sd:
        return {k[len("clip.") :]: v for k, v in sd.items() if k.startswith("clip.")}, "clipvg"
    if "visual.conv1.weight" not in sd:
        some = ", ".join(sorted(sd)[:4])
        raise CheckpointError(f"{path}: no CLIP ViT weights (no visual.conv1.weight; keys start {some})")
    return sd, "state_dict"


def needs_quick_gelu(provenance: str) -> bool:
    """OpenAI's CLIP (its archives, and CLIP-VG checkpoints made from them) uses QuickGELU; a plain state
    dict does not say, so the model name decides (open_clip's ``*-quickgelu`` names)."""
    return provenance in ("openai", "clipvg")


def official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of an official CLIP-VG checkpoint (read once; nothing executed)."""
    path = Path(path)
    sd = _unwrap(read_weights(path)[0], path)
    if "clip.visual.conv1.weight" not in sd or "vl_pos_embed.weight" not in sd:
        raise CheckpointError(
            f"{path}: not an official CLIP-VG checkpoint (no clip.visual.conv1.weight / vl_pos_embed)"
        )
    return sd


def official_to_groundkit(
    path: str | Path, num_layers: int | None = None, sd: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The non-CLIP tensors of an official CLIP-VG checkpoint under :class:`ClipVG`'s names (plus the trained
    visual positional embedding as ``encoders.visual.positional_embedding``). Every tensor of the file is
    used once: the CLIP copies are checked equal to ``clip.*``, the official code's unused ``visu_proj`` is
    the only one left out; anything else is an error naming the keys. ``sd``: the file's
    :func:`official_state_dict`, when the caller has read it already."""
    path = Path(path)
    sd = official_state_dict(path) if sd is None else sd
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def need(src: str) -> torch.Tensor:
        if src not in sd:
            raise CheckpointError(f"{path}: official key {src} is missing")
        used.add(src)
        return sd[src]

    def take(src: str, dst: str) -> None:
        out[dst] = need(src).float()

    for k in sd:
        if k.startswith("clip."):
            used.add(k)  # the encoders' weights (clip_weights)
        for wrap, clip in _OFFICIAL_COPIES.items():
            if k.startswith(wrap):
                src = clip + k[len(wrap) :]
                if src in sd and torch.equal(sd[k], sd[src]):
                    used.add(k)
                    break
                raise CheckpointError(f"{path}: {k} is not a copy of {src}, as the official model's wrappers are")
    take("clip.visual.positional_embedding", "encoders.visual.positional_embedding")
    for name in ("weight", "bias"):
        take(f"ml_visu_proj.{name}", f"visu_proj.{name}")
        take(f"text_proj.{name}", f"text_proj.{name}")
    used.update(k for k in sd if k.startswith("visu_proj."))  # defined but never called by the official code
    take("reg_token.weight", "reg_token.weight")
    take("vl_pos_embed.weight", "pos_embed.weight")
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith("vl_transformer.encoder.layers.")})
    if num_layers is not None and len(layers) != num_layers:
        raise CheckpointError(f"{path}: {len(layers)} fusion layers, the model has {num_layers}")
    for i in layers:
        src = f"vl_transformer.encoder.layers.{i}."
        w, b = need(src + "self_attn.in_proj_weight"), need(src + "self_attn.in_proj_bias")
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"layers.{i}.{proj}.weight"] = w.chunk(3)[j].float().clone()
            out[f"layers.{i}.{proj}.bias"] = b.chunk(3)[j].float().clone()
        for mod in ("self_attn.out_proj", "linear1", "linear2", "norm1", "norm2"):
            for name in ("weight", "bias"):
                take(f"{src}{mod}.{name}", f"layers.{i}.{mod.replace('self_attn.', '')}.{name}")
    heads = sorted({int(k.split(".")[2]) for k in sd if k.startswith("bbox_embed.layers.")})
    for i in heads:
        for name in ("weight", "bias"):
            take(f"bbox_embed.layers.{i}.{name}", f"head.layers.{i}.{name}")
    left = sorted(set(sd) - used)
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensors have no place in the model: {', '.join(left[:5])}")
    return out


def register_convert(sub: Any) -> None:
    """``groundkit data convert-clipvg CHECKPOINT --out FILE``: an official CLIP-VG checkpoint's trained
    part as a ``.safetensors`` for ``train.init_from`` (the CLIP weights stay in the checkpoint, read by
    ``model.clip_checkpoint``)."""
    p = sub.add_parser(
        "convert-clipvg", help="an official CLIP-VG checkpoint.pth -> groundkit weights for train.init_from"
    )
    p.add_argument("checkpoint", help="official checkpoint.pth / best_checkpoint.pth ({'model': state dict, ...})")
    p.add_argument("--out", required=True, help="the .safetensors file to write")

    def run(a: argparse.Namespace) -> int:
        import json  # noqa: PLC0415
        import os  # noqa: PLC0415

        from safetensors.torch import save_file  # noqa: PLC0415

        out = Path(a.out)
        if out.suffix != ".safetensors":
            raise CheckpointError(f"--out {out}: expected a .safetensors file name")
        official = official_state_dict(a.checkpoint)  # read once: a ViT-B/16 checkpoint is hundreds of MB
        sd = official_to_groundkit(a.checkpoint, sd=official)
        patch = int(official["clip.visual.conv1.weight"].shape[-1])
        grid = int(round((official["clip.visual.positional_embedding"].shape[0] - 1) ** 0.5))
        rows, width = sd["pos_embed.weight"].shape
        layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        os.replace(tmp, out)
        overrides = {
            "model.encoder": "clip",
            "model.clip_checkpoint": str(Path(a.checkpoint).resolve()),
            "model.d_model": int(width),
            "model.num_layers": layers,
            "data.imsize": grid * patch,
            "data.max_query_len": int(rows) - 2 - grid * grid,
            "train.init_from": str(out.resolve()),
        }
        print(json.dumps({"weights": str(out), "tensors": len(sd), "set": overrides}))
        return 0

    p.set_defaults(func=run)
