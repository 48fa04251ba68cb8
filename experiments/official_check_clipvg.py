"""Reference-mode check: the official CLIP-VG model beside groundkit's ClipVG, with the same random ViT-B/16
weights in OpenAI's layout, the same two photos and expressions (docs/clipvg.md, "Reference mode checked against
the official code"). The official code is imported from a checkout of its repository given on the command line;
nothing of it is copied here.

    python experiments/official_check_clipvg.py OFFICIAL_CHECKOUT WORK_DIR
"""

import argparse
import sys
import types
from pathlib import Path

import torch
import torchvision

official_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
work.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(2)
# the official code needs pkg_resources.packaging and checks torchvision's version as a float of 3 characters
import packaging.version  # noqa: E402

sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
real_version = torchvision.__version__
torchvision.__version__ = "0.10.0"
sys.path.insert(0, str(official_dir))
import models.clip.clip as official_clip  # noqa: E402
from models.clip_vg import ML_CLIP_VG  # noqa: E402
from utils.loss_utils import trans_vg_loss  # noqa: E402

torchvision.__version__ = real_version

import open_clip  # noqa: E402

from groundkit.methods.clipvg.config import ClipVGModel  # noqa: E402
from groundkit.methods.clipvg.model import ClipVG, OpenClipEncoders, clipvg_loss  # noqa: E402
from groundkit.methods.clipvg.weights import official_to_groundkit  # noqa: E402

torch.manual_seed(0)
# random OpenAI-layout ViT-B/16 weights (open_clip's QuickGELU model has OpenAI's names)
oc = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
sd = {k: v for k, v in oc.state_dict().items()}
# the official clip.load on the CPU: build_model(state_dict) (fp16 weights) then .float()
official_clip.load = lambda name, device="cpu", **k: (official_clip.build_model(dict(sd)).float().to(device), None)
args = argparse.Namespace(
    model="ViT-B/16",
    device="cpu",
    imsize=224,
    max_query_len=77,
    vl_hidden_dim=512,
    vl_dropout=0.0,
    vl_nheads=8,
    vl_dim_feedforward=2048,
    vl_enc_layers=6,
)
torch.manual_seed(1)
off = ML_CLIP_VG(args).eval()
ckpt = work / "checkpoint.pth"
torch.save({"model": off.state_dict(), "args": args, "epoch": 0}, ckpt)

# groundkit's model from the official checkpoint: CLIP from its clip.* (QuickGELU chosen), the rest converted
enc = OpenClipEncoders("ViT-B-16", str(ckpt), levels=(0, 3, 7, 11), trainable_pos_embed=True, image_size=224)
gk_cfg = ClipVGModel(dropout=0.0, normalize="imagenet", sdpa=False, image_mask="bilinear")
gk = ClipVG(gk_cfg, enc, 77).eval()
gk.load_state_dict(official_to_groundkit(ckpt, num_layers=6))
print("quick_gelu:", enc.quick_gelu)

# inputs: a real photo (scikit-learn's china.jpg, 640x427) and flower.jpg, the official test transform
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_sample_image  # noqa: E402

imgs, masks, raw = [], [], []
for name in ("china.jpg", "flower.jpg"):
    im = Image.fromarray(load_sample_image(name))
    r = 224 / max(im.size)
    im = TF.resize(im, (round(im.height * r), round(im.width * r)))  # official resize_according_to_long_side
    t = TF.to_tensor(im)
    h, w = t.shape[1:]
    top, left = round((224 - h) / 2 - 0.1), round((224 - w) / 2 - 0.1)
    x = torch.zeros(3, 224, 224)
    x[:, top : top + h, left : left + w] = TF.normalize(t, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    m = torch.ones(224, 224, dtype=torch.int32)
    m[top : top + h, left : left + w] = 0
    u = torch.zeros(3, 224, 224)
    u[:, top : top + h, left : left + w] = t
    imgs.append(x), masks.append(m), raw.append(u)
texts = ["the temple roof on the left", "a red flower in the middle"]
x, m, u = torch.stack(imgs), torch.stack(masks), torch.stack(raw)
ids = official_clip.tokenize(texts)  # [2, 77]
text_mask = ids > 0


class NT:
    def __init__(self, t, mask):
        self.tensors, self.mask = t, mask


def report(name, a, b):
    d = (a.float() - b.float()).abs().max().item()
    rel = d / max(b.float().abs().max().item(), 1e-12)
    print(f"{name}: max abs diff {d:.3g} (relative {rel:.3g})")


with torch.no_grad():
    gk_ids, gk_mask = enc.tokenize(texts, 77)
    print("token ids equal:", torch.equal(gk_ids, ids), "text mask equal:", torch.equal(gk_mask, text_mask))
    f_img_off = off.image_encoder_clip_vg(x)
    f_txt_off = off.text_encoder_clip_vg(ids)
    f_img_gk, f_txt_gk = gk.encode(u, m.bool(), gk_ids, gk_mask)
    report("normalised image", gk.normalize_images(u, m.bool()), x)
    report("image features [2, 197, 3072]", f_img_gk, f_img_off)
    report("text features [2, 77, 512]", f_txt_gk, f_txt_off)
    vm, tm = off.get_masks(NT(x, m), NT(ids, text_mask))
    print(
        "image-token mask equal:", torch.equal(gk.image_token_mask(m.bool())[:, 1:], vm), int(vm.sum()), "padded tokens"
    )
    b_off = off(NT(x, m), NT(ids, text_mask))
    b_gk = gk({"image": u, "image_mask": m.bool(), "text_ids": gk_ids, "text_mask": gk_mask}).boxes
    report("boxes", b_gk, b_off)

target = torch.tensor([[0.3, 0.4, 0.3, 0.5], [0.5, 0.5, 0.4, 0.4]])
off.train(), gk.train()
lo = trans_vg_loss(off(NT(x, m), NT(ids, text_mask)), target)
lo = lo["loss_bbox"] + lo["loss_giou"]
lg, _ = clipvg_loss(gk({"image": u, "image_mask": m.bool(), "text_ids": gk_ids, "text_mask": gk_mask}).boxes, target)
print(f"loss: official {lo.item():.7f}, groundkit {lg.item():.7f}")
p_off = [p for p in off.parameters() if p.requires_grad]
p_gk = [p for p in gk.parameters() if p.requires_grad]
print(
    "trainable tensors:",
    len(p_off),
    "official (visu_proj unused:",
    2,
    ")",
    len(p_gk),
    "groundkit;",
    sum(p.numel() for p in p_off),
    "vs",
    sum(p.numel() for p in p_gk),
    "parameters",
)
o1 = torch.optim.AdamW(p_off, lr=2.5e-4, weight_decay=1e-4)
o2 = torch.optim.AdamW(p_gk, lr=2.5e-4, weight_decay=1e-4)
lo.backward(), lg.backward()
g_off, g_gk = off.clip.visual.positional_embedding.grad, enc.visual.positional_embedding.grad
report("gradient of the trainable positional embedding", g_gk, g_off)
report("gradient of the [REG] token", gk.reg_token.weight.grad, off.reg_token.weight.grad)
flip = ((g_off > 0) != (g_gk > 0)) & (g_off != 0)
print(
    f"positional-embedding gradient: {int(flip.sum())} of {g_off.numel()} elements change sign, all with |g| <= "
    f"{float(g_off[flip].abs().max()) if flip.any() else 0:.2g} (Adam's first step moves each by about lr whatever |g|)"
)
o1.step(), o2.step()
off.eval(), gk.eval()
with torch.no_grad():
    b_off = off(NT(x, m), NT(ids, text_mask))
    b_gk = gk({"image": u, "image_mask": m.bool(), "text_ids": gk_ids, "text_mask": gk_mask}).boxes
    report("boxes after one AdamW step", b_gk, b_off)
    report(
        "trained positional embedding after the step",
        enc.visual.positional_embedding,
        off.clip.visual.positional_embedding,
    )
