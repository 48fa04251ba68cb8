"""Released co-grounding checkpoints -> groundkit weights.

The official training scripts save ``{"epoch", "state_dict", "best_loss", "optimizer"}`` with
``torch.save`` (``.pth.tar``); the state dict comes from ``nn.DataParallel`` (keys start with
``module.``) and holds the Darknet-53 (``visumodel.module_list.<cfg layer>.conv_<i>`` /
``batch_norm_<i>``), the LSTM text model (``textmodel.*``), the phrase attentions, the location
layers and the head. :func:`official_to_groundkit` maps every tensor once onto
:class:`~groundkit.methods.cogrounding.model.CoGroundingNet`'s names, with three re-orderings:

* the 8 coordinate channels: the official ``generate_coord`` builds its grids with ``meshgrid`` in
  ``ij`` order, so its "x" channels vary along rows: ``(y1, x1, y2, x2, yc, xc, 1/h, 1/w)`` in
  groundkit's terms; the input columns of the first head convolution and of the coordinate
  embedding are permuted to groundkit's ``(x1, y1, x2, y2, xc, yc, ...)``;
* the anchors within a scale: the official list is reversed (``anchors_full[::-1]``), so a scale's
  three anchors come largest first; groundkit keeps them smallest first (the 15 output channels of
  each scale's last convolution are re-ordered by anchor);
* the word embedding: rows follow the official corpus; groundkit's vocabulary is
  ``<pad>, <unk>, <eos>`` then the corpus words (a vocabulary file written beside the weights).

The file is read with ``torch.load(weights_only=True)``: no code in it runs. ``corpus.pth`` (a pickled
``Corpus`` object) is read by an unpickler that accepts only its two classes and plain containers.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import CheckpointError
from .backbones import Darknet53YOLOv3, YoloOutputConv
from .text import EOS, PAD, UNK

__all__ = ["COORD_PERM", "ANCHOR_PERM", "read_official", "read_corpus", "official_to_groundkit", "register_convert"]

#: groundkit coordinate channel j <- official channel COORD_PERM[j]
COORD_PERM = [1, 0, 3, 2, 5, 4, 7, 6]
#: groundkit anchor k of a scale <- official anchor ANCHOR_PERM[k]
ANCHOR_PERM = [2, 1, 0]

# official (without "module.") -> groundkit, for everything but the Darknet; applied in order, first match wins
_RULES: list[tuple[str, str]] = [
    (r"textmodel\.embedding\.weight", "text_encoder.embedding.weight"),
    (r"textmodel\.mlp\.0\.(weight|bias)", r"text_encoder.mlp.0.\1"),
    (r"textmodel\.rnn\.(.+)", r"text_encoder.lstm.\1"),
    (r"(sub|loc|mot)_attn\.fc\.(weight|bias)", r"\1_attn.score.\2"),
    (r"loc_embedding\.(\d)\.(.+)", r"coord_embed.\1.\2"),
    (r"loc_text_embedding\.(\d)\.(.+)", r"rel_fc.\1.\2"),
    (r"mapping_visu\.(\d)\.conv\.weight", r"visu_map.\1.0.weight"),
    (r"mapping_visu\.(\d)\.bn\.(.+)", r"visu_map.\1.1.\2"),
    (r"mapping_lang\.(\d)\.(.+)", r"lang_mlp.\1.\2"),
    (r"corr_conv\.(\d)\.0\.conv\.weight", r"corr_conv.\1.0.weight"),
    (r"corr_conv\.(\d)\.0\.bn\.(.+)", r"corr_conv.\1.1.\2"),
    (r"fcn_emb\.(\d)\.(\d)\.conv\.weight", r"fcn_emb.\1.\2.0.weight"),
    (r"fcn_emb\.(\d)\.(\d)\.bn\.(.+)", r"fcn_emb.\1.\2.1.\3"),
    (r"fcn_out\.(\d)\.0\.conv\.weight", r"fcn_out.\1.0.0.weight"),
    (r"fcn_out\.(\d)\.0\.bn\.(.+)", r"fcn_out.\1.0.1.\2"),
    (r"fcn_out\.(\d)\.1\.(weight|bias)", r"fcn_out.\1.1.\2"),
]


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official co-grounding checkpoint (``module.`` prefixes removed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a bad file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable co-grounding checkpoint (truncated, not a torch file, or holding objects beyond"
            f" tensors and plain containers): {first[:200]}"
        ) from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected {{'state_dict': {{name: tensor}}, ...}} (official layout), got {keys}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


class _CorpusUnpickler(pickle.Unpickler):
    """Builds the official ``Corpus`` / ``Dictionary`` as plain attribute holders; refuses any other class."""

    class _Holder:
        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state)

    def find_class(self, module: str, name: str) -> Any:
        if name in ("Corpus", "Dictionary") and module.endswith("word_utils"):
            return type(name, (self._Holder,), {})
        if (module, name) in {("collections", "OrderedDict"), ("builtins", "dict"), ("builtins", "list")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only the official Corpus is read)")


def read_corpus(path: str | os.PathLike) -> list[str]:
    """The official vocabulary in id order: ``corpus.pth`` (a pickled ``Corpus``, read without running code) or a
    text file with one token per line, line ``i`` being id ``i`` (``"\\n".join(corpus.dictionary.idx2word)``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: vocabulary file not found")
    if path.suffix in (".txt", ".vocab"):
        return path.read_text(encoding="utf-8").splitlines()
    try:
        import zipfile  # noqa: PLC0415

        if zipfile.is_zipfile(path):  # torch.save's zip layout: the pickle is archive/data.pkl
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                corpus = _CorpusUnpickler(z.open(name)).load()
        else:
            with open(path, "rb") as f:
                corpus = _CorpusUnpickler(f).load()
        words = list(corpus.dictionary.idx2word)
    except (pickle.UnpicklingError, AttributeError, EOFError, StopIteration, ValueError) as e:
        raise CheckpointError(f"{path}: not an official corpus.pth ({e})") from None
    if not all(isinstance(w, str) for w in words):
        raise CheckpointError(f"{path}: corpus words must be strings")
    return words


def _darknet_names(width: float) -> dict[str, str]:
    """Official Darknet tensor names -> groundkit's (``backbone.`` prefixed), from ``yolov3.cfg``'s layer order."""
    net = Darknet53YOLOv3(width=width)
    names = {id(m): n for n, m in net.named_modules()}
    out = {}
    for i, m in enumerate(net.cfg_layers()):
        if m is None:
            continue
        g = "backbone." + names[id(m)]
        out[f"visumodel.module_list.{i}.conv_{i}.weight"] = f"{g}.conv.weight"
        if isinstance(m, YoloOutputConv):
            out[f"visumodel.module_list.{i}.conv_{i}.bias"] = f"{g}.conv.bias"
        else:
            for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                out[f"visumodel.module_list.{i}.batch_norm_{i}.{t}"] = f"{g}.bn.{t}"
    return out


def official_to_groundkit(
    sd: dict[str, torch.Tensor], words: list[str], source: str = "<checkpoint>"
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """``(groundkit state dict, groundkit vocabulary words, config overrides)`` from an official state dict and
    its corpus words (official id order). Every official tensor is used once; anything left over or missing
    ends in a :class:`~groundkit.errors.CheckpointError` naming it."""
    stem = sd.get("visumodel.module_list.0.conv_0.weight")
    if stem is None:
        raise CheckpointError(
            f"{source}: no visumodel.module_list.0.conv_0.weight (not an official co-grounding model)"
        )
    width = stem.shape[0] / 32
    dark = _darknet_names(width)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for k, v in sd.items():
        if k in dark:
            out[dark[k]] = v
            used.add(k)
            continue
        for pat, rep in _RULES:
            if re.fullmatch(pat, k):
                out[re.sub(pat, rep, k)] = v
                used.add(k)
                break
    left = sorted(set(sd) - used)
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensor(s) with no groundkit counterpart, e.g. {left[0]!r}")
    missing = sorted(set(dark.values()) - set(out))
    if missing:
        raise CheckpointError(f"{source}: the Darknet lacks {len(missing)} tensor(s), e.g. {missing[0]!r}")
    co_attention = any(k.startswith("corr_conv.") for k in out)
    D = int(out["lang_mlp.0.weight"].shape[0])
    for s in range(3):
        w = out[f"fcn_emb.{s}.0.0.weight"]  # [D, 2D + 8, 1, 1]: visual, language, coordinates
        if w.shape[1] != 2 * D + 8:
            raise CheckpointError(f"{source}: fcn_emb.{s} takes {w.shape[1]} channels; expected {2 * D + 8}")
        out[f"fcn_emb.{s}.0.0.weight"] = torch.cat([w[:, : 2 * D], w[:, 2 * D :][:, COORD_PERM]], 1)
        for t in ("weight", "bias"):
            o = out[f"fcn_out.{s}.1.{t}"]  # [15, ...]: 3 anchors x (tx, ty, tw, th, conf)
            out[f"fcn_out.{s}.1.{t}"] = o.reshape(3, 5, *o.shape[1:])[ANCHOR_PERM].reshape(o.shape)
    out["coord_embed.0.weight"] = out["coord_embed.0.weight"][:, COORD_PERM]
    emb = out["text_encoder.embedding.weight"]
    if len(words) != emb.shape[0]:
        raise CheckpointError(
            f"{source}: the word embedding has {emb.shape[0]} rows but the vocabulary {len(words)} words"
        )
    index = {w: i for i, w in enumerate(words)}
    vocab = list(dict.fromkeys(w.lower() for w in words if w not in (PAD, UNK, EOS)))
    rows = [emb[index[t]] if t in index else torch.zeros_like(emb[0]) for t in (PAD, UNK, EOS)]
    rows += [emb[index[w]] if w in index else emb[[i for i, x in enumerate(words) if x.lower() == w][0]] for w in vocab]
    out["text_encoder.embedding.weight"] = torch.stack(rows)
    overrides = {
        "model.backbone": "darknet53",
        "model.darknet_width": width,
        "model.darknet_taps": "official",
        "model.text_encoder": "lstm",
        "model.tokenizer": "official",
        "model.dim": D,
        "model.co_attention": co_attention,
        "model.bn_momentum_official": True,
    }
    return out, vocab, overrides


def check_loads(sd: dict[str, torch.Tensor], vocab: list[str], overrides: dict[str, Any], source: str) -> None:
    """Build groundkit's model for ``overrides`` (and ``vocab``) and load ``sd`` into it strictly: every tensor
    has its place and shape, and every parameter of the model comes from the checkpoint."""
    import tempfile  # noqa: PLC0415

    from ...config import load_config  # noqa: PLC0415
    from .config import CoGroundingConfig  # noqa: PLC0415
    from .method import build_model  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        vf = Path(tmp) / "vocab.txt"
        vf.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        cfg = load_config(CoGroundingConfig, None, {**overrides, "model.vocab_file": str(vf)}, method="cogrounding")
        model = build_model(cfg)
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape that does not match
        line = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e).splitlines()[0])
        raise CheckpointError(f"{source}: does not fit groundkit's co-grounding model: {line[:240]}") from None
    bad = [f"missing {k}" for k in res.missing_keys] + [f"unexpected {k}" for k in res.unexpected_keys]
    if bad:
        raise CheckpointError(
            f"{source}: does not fit groundkit's co-grounding model: {len(bad)} key(s), e.g. {bad[0]}"
        )


def register_convert(sub: Any) -> None:
    """``groundkit data convert-cogrounding CHECKPOINT --corpus corpus.pth --out FILE.safetensors``."""
    p = sub.add_parser(
        "convert-cogrounding", help="an official co-grounding .pth.tar -> groundkit weights for train.init_from"
    )
    p.add_argument("checkpoint", help="official checkpoint ({'state_dict': ..., ...}, .pth.tar)")
    p.add_argument("--corpus", required=True, help="the official corpus.pth, or a text file of its words in id order")
    p.add_argument("--out", required=True, help="the .safetensors file to write (its vocabulary beside it, .vocab.txt)")

    def run(a: argparse.Namespace) -> int:
        from safetensors.torch import save_file  # noqa: PLC0415

        out = Path(a.out)
        if out.suffix != ".safetensors":
            raise CheckpointError(f"--out {out}: expected a .safetensors file name")
        sd, vocab, overrides = official_to_groundkit(read_official(a.checkpoint), read_corpus(a.corpus), a.checkpoint)
        out.parent.mkdir(parents=True, exist_ok=True)
        vocab_file = out.with_suffix(".vocab.txt")
        check_loads(sd, vocab, overrides, a.checkpoint)
        for path, write in (
            (vocab_file, lambda t: Path(t).write_text("\n".join(vocab) + "\n", encoding="utf-8")),
            (out, lambda t: save_file({k: v.contiguous() for k, v in sd.items()}, str(t))),
        ):
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            write(tmp)
            os.replace(tmp, path)  # atomic: never a partial file
        overrides |= {
            "model.vocab_file": str(vocab_file.resolve()),
            "model.max_tokens": 20,
            "train.init_from": str(out.resolve()),
        }
        print(json.dumps({"weights": str(out), "tensors": len(sd), "words": len(vocab), "set": overrides}))
        return 0

    p.set_defaults(func=run)
