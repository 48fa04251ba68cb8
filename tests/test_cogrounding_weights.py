"""Released co-grounding checkpoints: an official-layout .pth.tar (written here, with the official names) is
converted by ``groundkit data convert-cogrounding`` onto groundkit's model, every tensor used once, with the
coordinate-channel, anchor-order and vocabulary re-orderings; a wrong file ends in one line."""

from __future__ import annotations

import json

import pytest
import torch

from groundkit.config import load_config
from groundkit.methods.cogrounding.backbones import YoloOutputConv
from groundkit.methods.cogrounding.config import CoGroundingConfig
from groundkit.methods.cogrounding.method import build_model
from groundkit.methods.cogrounding.weights import ANCHOR_PERM, COORD_PERM

torch.set_num_threads(1)
WORDS = ["man", "left", "car", "the", ","]  # the corpus words; the official Dictionary then adds <unk>, <pad>, <eos>
OFFICIAL_VOCAB = WORDS + ["<unk>", "<pad>", "<eos>"]

# groundkit -> official names outside the Darknet (the inverse of the converter's table, written from the official
# model's attribute names: textmodel, sub_attn.fc, loc_embedding, loc_text_embedding, mapping_visu.<s>.conv/bn ...)
RENAME = [
    ("text_encoder.lstm.", "textmodel.rnn."),
    ("text_encoder.", "textmodel."),
    ("sub_attn.score.", "sub_attn.fc."),
    ("loc_attn.score.", "loc_attn.fc."),
    ("coord_embed.", "loc_embedding."),
    ("rel_fc.", "loc_text_embedding."),
    ("lang_mlp.", "mapping_lang."),
]


def _official_name(k: str, dark: dict[str, str]) -> str:
    if k in dark:
        return dark[k]
    for a, b in RENAME:
        if k.startswith(a):
            return b + k[len(a) :]
    parts = k.split(".")
    conv_bn = {"0": "conv", "1": "bn"}
    if parts[0] == "visu_map":  # visu_map.s.{0,1}.t -> mapping_visu.s.{conv,bn}.t
        return f"mapping_visu.{parts[1]}.{conv_bn[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] == "corr_conv":
        return f"corr_conv.{parts[1]}.0.{conv_bn[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] == "fcn_emb":  # fcn_emb.s.k.{0,1}.t
        return f"fcn_emb.{parts[1]}.{parts[2]}.{conv_bn[parts[3]]}.{'.'.join(parts[4:])}"
    if parts[0] == "fcn_out" and parts[2] == "0":
        return f"fcn_out.{parts[1]}.0.{conv_bn[parts[3]]}.{'.'.join(parts[4:])}"
    if parts[0] == "fcn_out":
        return k
    raise AssertionError(f"no official name for {k}")


def _model(co_attention: bool, vocab_file: str):
    cfg = load_config(
        CoGroundingConfig,
        "reference_refcoco",
        {
            "model.darknet_width": 1 / 16,
            "model.dim": 32,
            "model.co_attention": co_attention,
            "model.vocab_file": vocab_file,
        },
        "cogrounding",
    )
    torch.manual_seed(0)
    return build_model(cfg)


def official_checkpoint(model, path) -> dict[str, torch.Tensor]:
    """``model``'s weights in the official layout and order conventions, saved as the official training script does."""
    names = {id(m): n for n, m in model.backbone.named_modules()}
    dark = {}
    for i, m in enumerate(model.backbone.cfg_layers()):
        if m is None:
            continue
        g = "backbone." + names[id(m)]
        dark[f"{g}.conv.weight"] = f"visumodel.module_list.{i}.conv_{i}.weight"
        if isinstance(m, YoloOutputConv):
            dark[f"{g}.conv.bias"] = f"visumodel.module_list.{i}.conv_{i}.bias"
        else:
            for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                dark[f"{g}.bn.{t}"] = f"visumodel.module_list.{i}.batch_norm_{i}.{t}"
    inv_coord = [COORD_PERM.index(j) for j in range(8)]
    inv_anchor = [ANCHOR_PERM.index(j) for j in range(3)]
    gk_vocab = ["<pad>", "<unk>", "<eos>"] + WORDS
    out = {}
    for k, v in model.state_dict().items():
        v = v.clone()
        if k == "text_encoder.embedding.weight":
            v = v[[gk_vocab.index(w) for w in OFFICIAL_VOCAB]]
        elif k == "coord_embed.0.weight":
            v = v[:, inv_coord]
        elif k.startswith("fcn_emb.") and k.endswith(".0.0.weight"):
            D2 = v.shape[1] - 8
            v = torch.cat([v[:, :D2], v[:, D2:][:, inv_coord]], 1)
        elif k.startswith("fcn_out.") and k.split(".")[2] == "1":
            v = v.reshape(3, 5, *v.shape[1:])[inv_anchor].reshape(v.shape)
        out["module." + _official_name(k, dark)] = v
    torch.save({"epoch": 3, "state_dict": out, "best_loss": 0.4, "optimizer": {}}, path)
    return model.state_dict()


@pytest.mark.parametrize("co_attention", [False, True])
def test_convert_official_checkpoint(tmp_path, capsys, co_attention):
    from safetensors.torch import load_file  # noqa: PLC0415

    from groundkit.cli import main  # noqa: PLC0415

    (tmp_path / "words.txt").write_text("\n".join(WORDS) + "\n")
    model = _model(co_attention, str(tmp_path / "words.txt"))
    with torch.no_grad():
        model.coord_embed[0].weight.copy_(torch.arange(64.0).view(8, 8))
    ref = official_checkpoint(model, tmp_path / "official.pth.tar")
    (tmp_path / "corpus.txt").write_text("\n".join(OFFICIAL_VOCAB) + "\n")  # official ids, one per line
    out = tmp_path / "conv" / "model.safetensors"
    cmd = ["data", "convert-cogrounding", str(tmp_path / "official.pth.tar"), "--corpus", str(tmp_path / "corpus.txt")]
    assert main([*cmd, "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["set"]["model.co_attention"] is co_attention and info["set"]["model.darknet_width"] == 1 / 16
    assert info["words"] == len(WORDS) and (tmp_path / "conv" / "model.vocab.txt").read_text().split() == WORDS
    got = load_file(str(out))
    assert set(got) == set(ref)  # every tensor once, nothing missing
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    # the official coordinate channel 0 is groundkit's y1 (channel 1): the input columns were swapped back
    official = torch.load(tmp_path / "official.pth.tar", weights_only=True)["state_dict"]
    torch.testing.assert_close(official["module.loc_embedding.0.weight"][:, 0], got["coord_embed.0.weight"][:, 1])
    # the official anchors of a scale come largest first
    o = official["module.fcn_out.0.1.bias"].view(3, 5)
    torch.testing.assert_close(o[2], got["fcn_out.0.1.bias"].view(3, 5)[0])


def test_convert_wrong_files_end_in_one_line(tmp_path, capsys):
    from groundkit.cli import main  # noqa: PLC0415

    (tmp_path / "words.txt").write_text("\n".join(WORDS) + "\n")
    official_checkpoint(_model(False, str(tmp_path / "words.txt")), tmp_path / "ok.pth.tar")
    (tmp_path / "corpus.txt").write_text("\n".join(OFFICIAL_VOCAB) + "\n")
    out = str(tmp_path / "x.safetensors")
    ok = str(tmp_path / "ok.pth.tar")
    blob = (tmp_path / "ok.pth.tar").read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(blob[: len(blob) // 2])
    sd = torch.load(ok, weights_only=True)
    sd["state_dict"]["module.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "extra.pth.tar")
    (tmp_path / "short.txt").write_text("man\n")
    cases = [
        ([str(tmp_path / "nope.pth.tar"), "--corpus", str(tmp_path / "corpus.txt")], "checkpoint not found"),
        ([str(tmp_path / "cut.pth.tar"), "--corpus", str(tmp_path / "corpus.txt")], "not a readable co-grounding"),
        ([str(tmp_path / "extra.pth.tar"), "--corpus", str(tmp_path / "corpus.txt")], "'extra.weight'"),
        ([ok, "--corpus", str(tmp_path / "short.txt")], "has 8 rows but the vocabulary 1 words"),
        ([ok, "--corpus", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "x.pt")], "expected a .safetensors"),
    ]
    for args, msg in cases:
        argv = ["data", "convert-cogrounding", *args] + ([] if "--out" in args else ["--out", out])
        assert main(argv) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0], err
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x.*"))  # nothing left behind
