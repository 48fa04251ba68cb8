"""CLIP and CLIP-VG weights as users have them (files made here with random weights, in the official layouts):
OpenAI TorchScript archives read without running their code, open_clip state dicts, official CLIP-VG checkpoints;
QuickGELU where the weights need it; the converted fusion computes what the official layers compute."""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groundkit.checkpoint import CheckpointError
from groundkit.methods.clipvg.config import ClipVGModel
from groundkit.methods.clipvg.model import ClipVG, EncoderError, OpenClipEncoders
from groundkit.methods.clipvg.weights import clip_weights, official_to_groundkit, read_torchscript

NAME = "GkTinyViT"  # a two-block ViT + two-block text tower, registered with open_clip below
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random OpenAI-style CLIP (QuickGELU) of the tiny config: ``(model, state dict)``."""
    import open_clip

    d = tmp_path_factory.mktemp("configs")
    (d / f"{NAME}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME, pretrained=None, force_quick_gelu=True).eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def openai_archive(tiny_clip, tmp_path_factory):
    """The tiny CLIP traced and saved as OpenAI's archives are: TorchScript, fp16, with their constants."""
    model, _ = tiny_clip

    class Traced(nn.Module):
        def __init__(self, clip):
            super().__init__()
            for name, child in clip.named_children():
                self.add_module(name, child)
            for name in ("positional_embedding", "text_projection", "logit_scale"):
                setattr(self, name, getattr(clip, name))
            for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
                self.register_buffer(name, torch.tensor(value))
            self.clip = [clip]

        def forward(self, image, text):
            return self.clip[0].encode_image(image), self.clip[0].encode_text(text)

    path = tmp_path_factory.mktemp("openai") / "ViT-Tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            Traced(copy.deepcopy(model)), (torch.randn(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long))
        )
        torch.jit.save(traced.half(), str(path))
    return path


def test_torchscript_archive_is_read_without_running_its_code(openai_archive, tiny_clip, monkeypatch):
    _, sd = tiny_clip
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load compiles the archive's code"))
    got = read_torchscript(openai_archive)
    assert {"input_resolution", "context_length", "vocab_size"} <= set(got)
    for k, v in sd.items():
        if k == "attn_mask":
            continue
        assert got[k].dtype == torch.float16 and torch.equal(got[k].float(), v.half().float()), k
    clip, provenance = clip_weights(openai_archive)
    assert provenance == "openai" and not any(k.endswith("attn_mask") for k in clip)


def test_openai_archive_builds_quickgelu_towers_that_match_the_source(openai_archive, tiny_clip, tmp_path):
    from open_clip.transformer import QuickGELU

    model, sd = tiny_clip
    enc = OpenClipEncoders(NAME, str(openai_archive), levels=(0, 1), image_size=32)
    assert enc.quick_gelu and isinstance(enc.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    x = torch.randn(2, 5, 64)
    half = {k: v.half().float() for k, v in sd.items()}  # the archive's weights, as stored
    model.load_state_dict(half)
    with torch.no_grad():
        torch.testing.assert_close(enc.visual.transformer.resblocks[1](x), model.visual.transformer.resblocks[1](x))
    # the same weights under plain GELU (what a name without -quickgelu built before) compute something else
    plain = OpenClipEncoders(NAME, str(openai_archive), levels=(0, 1), image_size=32, activation="gelu")
    with torch.no_grad():
        diff = (plain.visual.transformer.resblocks[1](x) - model.visual.transformer.resblocks[1](x)).abs().max()
    assert not plain.quick_gelu and diff > 1e-4


def test_state_dict_files_load_and_wrong_files_are_one_line(tiny_clip, openai_archive, tmp_path):
    from safetensors.torch import save_file

    _, sd = tiny_clip
    torch.save(sd, tmp_path / "open_clip.bin")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "weights.safetensors"))
    for name in ("open_clip.bin", "wrapped.pt", "weights.safetensors"):
        enc = OpenClipEncoders(NAME, str(tmp_path / name), levels=(0, 1), image_size=32)
        assert not enc.quick_gelu  # a plain state dict does not say: the model name decides
        assert torch.equal(enc.visual.conv1.weight, sd["visual.conv1.weight"])
    assert OpenClipEncoders(
        NAME, str(tmp_path / "open_clip.bin"), (0, 1), image_size=32, activation="quick_gelu"
    ).quick_gelu
    # wrong model, truncated archive, garbage, not CLIP: one line naming the file, no pickle executed
    with pytest.raises(EncoderError, match=r"ViT-Tiny.pt: not ViT-S-32 weights: \d+ tensors missing"):
        OpenClipEncoders("ViT-S-32", str(openai_archive), levels=(0, 1))
    raw = openai_archive.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"visual.conv1.weight": Evil()}))
    for name, pattern in [
        ("cut.pt", "cut.pt: not a readable"),
        ("junk.pt", "junk.pt: not a readable weights file"),
        ("other.pt", "other.pt: no CLIP ViT weights"),
        ("evil.pt", "evil.pt: not a readable weights file"),
        ("missing.pt", "CLIP checkpoint not found"),
    ]:
        with pytest.raises((CheckpointError, EncoderError), match=pattern) as e:
            OpenClipEncoders(NAME, str(tmp_path / name), levels=(0, 1), image_size=32)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- official CLIP-VG checkpoints


class OfficialLayer(nn.Module):
    """The official fusion layer (TransVG's post-norm encoder layer over nn.MultiheadAttention), eval mode."""

    def __init__(self, d, h, ff):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, h, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, src, mask, pos):  # src [L, B, D], mask [B, L] True = ignored
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src, key_padding_mask=mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class OfficialHead(nn.Module):
    def __init__(self, d, layers=3):
        super().__init__()
        dims = [d] * layers + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def official_checkpoint(sd, path, d=32, L=6, n_img=5, layers=2):
    """An official-layout CLIP-VG checkpoint (``{"model": state dict, "args": Namespace, ...}``) and the
    official fusion's modules that it holds."""
    torch.manual_seed(1)
    mods = nn.ModuleDict(
        {
            "visu_proj": nn.Linear(512, d),
            "text_proj": nn.Linear(32, d),
            "reg_token": nn.Embedding(1, d),
            "vl_pos_embed": nn.Embedding(1 + L + n_img, d),
            "ml_visu_proj": nn.Linear(2 * 64, d),
            "bbox_embed": OfficialHead(d),
        }
    ).eval()
    fusion = nn.ModuleList(OfficialLayer(d, 4, 48) for _ in range(layers)).eval()
    model = {f"clip.{k}": v for k, v in sd.items() if k != "attn_mask"}
    for k, v in sd.items():
        if k.startswith("visual.") and not k.startswith("visual.transformer."):
            model[f"image_encoder_clip_vg.{k[len('visual.') :]}"] = v
        if k.startswith("visual.transformer.resblocks."):
            model[f"image_encoder_clip_vg.transformer.{k[len('visual.transformer.') :]}"] = v
        if k.split(".")[0] in ("transformer", "positional_embedding", "ln_final", "text_projection", "token_embedding"):
            model[f"text_encoder_clip_vg.{k}"] = v
    model.update(mods.state_dict())
    model.update({f"vl_transformer.encoder.layers.{k}": v for k, v in fusion.state_dict().items()})
    args = argparse.Namespace(model="ViT-B/16", imsize=32, max_query_len=L, lr=2.5e-4)
    torch.save({"model": model, "args": args, "epoch": 10, "optimizer": {}}, path)
    return mods, fusion


def test_official_checkpoint_converts_with_every_tensor_once_and_fuses_as_the_official_code(tiny_clip, tmp_path):
    _, sd = tiny_clip
    ckpt = tmp_path / "checkpoint.pth"
    mods, fusion = official_checkpoint(sd, ckpt)
    clip, provenance = clip_weights(ckpt)
    assert provenance == "clipvg" and set(clip) == {k for k in sd if k != "attn_mask"}
    enc = OpenClipEncoders(NAME, str(ckpt), levels=(0, 1), image_size=32, trainable_pos_embed=True)
    assert enc.quick_gelu  # CLIP-VG is built on OpenAI's CLIP
    model = ClipVG(ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=48), enc, 6).eval()
    model.load_state_dict(official_to_groundkit(ckpt, num_layers=2))
    # the official forward over the same encoder outputs and masks
    B, L = 3, 6
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(B, 5, 128, generator=g), torch.randn(B, L, 32, generator=g)
    text_mask = torch.arange(L)[None] < torch.tensor([[6], [3], [1]])
    image_pad = torch.zeros(B, 5, dtype=torch.bool)
    image_pad[1, 3:] = True
    with torch.no_grad():
        src = torch.cat(
            [mods["reg_token"].weight.expand(B, 1, -1), mods["text_proj"](txt), mods["ml_visu_proj"](img)], 1
        )
        mask = torch.cat([torch.zeros(B, 1, dtype=torch.bool), ~text_mask, image_pad], 1)
        x, pos = src.transpose(0, 1), mods["vl_pos_embed"].weight[:, None].expand(-1, B, -1)
        for layer in fusion:
            x = layer(x, mask, pos)
        want = mods["bbox_embed"](x[0]).sigmoid()
        got = model.fuse(img, image_pad, txt, text_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the check can fail: with the query and key projections of one layer swapped the boxes move
    swapped = official_to_groundkit(ckpt)
    swapped["layers.1.q_proj.weight"], swapped["layers.1.k_proj.weight"] = (
        swapped["layers.1.k_proj.weight"],
        swapped["layers.1.q_proj.weight"],
    )
    model.load_state_dict(swapped)
    with torch.no_grad():
        assert (model.fuse(img, image_pad, txt, text_mask) - want).abs().max() > 1e-3


def test_official_checkpoint_errors_name_the_file(tiny_clip, tmp_path):
    _, sd = tiny_clip
    ckpt = tmp_path / "checkpoint.pth"
    official_checkpoint(sd, ckpt)
    blob = torch.load(ckpt, weights_only=False)
    blob["model"]["extra_head.weight"] = torch.zeros(3)
    torch.save(blob, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra.pth: 1 tensors have no place in the model: extra_head.weight"):
        official_to_groundkit(tmp_path / "extra.pth")
    blob["model"].pop("extra_head.weight")
    blob["model"]["image_encoder_clip_vg.conv1.weight"] = blob["model"]["image_encoder_clip_vg.conv1.weight"] + 1
    torch.save(blob, tmp_path / "copy.pth")
    with pytest.raises(
        CheckpointError, match=r"copy.pth: image_encoder_clip_vg.conv1.weight is not a copy of clip.visual"
    ):
        official_to_groundkit(tmp_path / "copy.pth")
    with pytest.raises(CheckpointError, match="2 fusion layers, the model has 6"):
        official_to_groundkit(ckpt, num_layers=6)
    torch.save(sd, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not an official CLIP-VG checkpoint"):
        official_to_groundkit(tmp_path / "plain.pt")


def test_convert_command_writes_init_weights(tiny_clip, tmp_path, capsys):
    from groundkit.checkpoint import load_weights
    from groundkit.cli import main

    _, sd = tiny_clip
    ckpt = tmp_path / "checkpoint.pth"
    official_checkpoint(sd, ckpt)
    out = tmp_path / "conv" / "clipvg.safetensors"
    assert main(["data", "convert-clipvg", str(ckpt), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        info["set"]["model.num_layers"] == 2
        and info["set"]["data.imsize"] == 32
        and info["set"]["data.max_query_len"] == 6
    )
    enc = OpenClipEncoders(NAME, info["set"]["model.clip_checkpoint"], levels=(0, 1), image_size=32)
    model = ClipVG(ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=48), enc, 6)
    assert load_weights(model, out, strict=True) == ([], [])
    assert main(["data", "convert-clipvg", str(tmp_path / "nope.pth"), "--out", str(out)]) == 2
