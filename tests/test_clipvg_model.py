"""CLIP-VG model: shapes, padding masks, attention paths, the L1 + GIoU loss on hand-checked boxes."""

import pytest
import torch

from groundkit.methods.clipvg.config import ClipVGModel
from groundkit.methods.clipvg.model import ClipVG, FusionLayer, build_encoders, clipvg_loss


@pytest.fixture(scope="module")
def offline_model():
    torch.manual_seed(0)
    enc = build_encoders("effnet_minilm", grid=4, pretrained=False)
    return ClipVG(ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=64), enc, 12).eval()


def batch_for(model, n=2, size=128):
    ids, mask = model.encoders.tokenize(["red dog on the left", "the man"][:n], model.max_query_len)
    image_mask = torch.zeros(n, size, size, dtype=torch.bool)
    image_mask[:, 96:] = True  # bottom quarter is padding
    return {"image": torch.rand(n, 3, size, size), "image_mask": image_mask, "text_ids": ids, "text_mask": mask}


def test_shapes_and_box_range(offline_model):
    m = offline_model
    b = batch_for(m)
    img, txt = m.encode(b["image"], b["image_mask"], b["text_ids"], b["text_mask"])
    assert img.shape == (2, 1 + 4 * 4, 40 + 112 + 320 + 1280) and txt.shape == (2, 12, 384)
    boxes = m(b).boxes
    assert boxes.shape == (2, 4) and bool(((boxes > 0) & (boxes < 1)).all())
    # only the fusion part trains
    assert all(not p.requires_grad for p in m.encoders.parameters())
    assert m.trainable_parameters() == sum(p.numel() for n, p in m.named_parameters() if not n.startswith("encoders"))


def test_cached_features_give_the_same_boxes(offline_model):
    m = offline_model
    b = batch_for(m)
    img, txt = m.encode(b["image"], b["image_mask"], b["text_ids"], b["text_mask"])
    cached = {"image_feats": img, "text_feats": txt, "image_mask": b["image_mask"], "text_mask": b["text_mask"]}
    torch.testing.assert_close(m(cached).boxes, m(b).boxes)


def test_padding_is_ignored(offline_model):
    m = offline_model
    b = batch_for(m)
    pad = m.image_token_mask(b["image_mask"])
    assert pad.shape == (2, 17) and not bool(pad[:, 0].any())  # the global token is never padding
    assert pad[0, 1:].view(4, 4)[3].all() and not pad[0, 1:].view(4, 4)[:3].any()
    img, txt = m.encode(b["image"], b["image_mask"], b["text_ids"], b["text_mask"])
    out = m.fuse(img, pad, txt, b["text_mask"])
    img2, txt2 = img.clone(), txt.clone()
    img2[pad] = 1e3 * torch.randn_like(img2[pad])  # padded image tokens
    txt2[~b["text_mask"]] = 1e3  # padded text tokens
    torch.testing.assert_close(m.fuse(img2, pad, txt2, b["text_mask"]), out)


def test_sdpa_equals_explicit_attention():
    torch.manual_seed(1)
    layer = FusionLayer(16, 4, 32, dropout=0.0, sdpa=True).eval()
    x, pos = torch.randn(3, 7, 16), torch.randn(1, 7, 16)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[0, 5:] = False
    a = layer(x, pos, keep)
    layer.sdpa = False
    torch.testing.assert_close(layer(x, pos, keep), a, rtol=1e-5, atol=1e-5)


def test_loss_on_hand_checked_boxes():
    t = torch.tensor([[0.6, 0.5, 0.2, 0.2]])
    loss, logs = clipvg_loss(t.clone(), t)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)  # GIoU has eps 1e-7 in its areas
    # [0.4, 0.4, 0.6, 0.6] vs [0.5, 0.4, 0.7, 0.6]: L1 0.1, IoU 0.02 / 0.06 = 1/3, hull = union -> GIoU 1/3
    loss, logs = clipvg_loss(torch.tensor([[0.5, 0.5, 0.2, 0.2]]), t)
    assert logs["l1"] == pytest.approx(0.1, abs=1e-6) and logs["giou"] == pytest.approx(2 / 3, abs=1e-5)
    assert loss.item() == pytest.approx(0.1 + 2 / 3, abs=1e-5)
    # disjoint boxes: [0, 0, 0.2, 0.2] vs [0.8, 0.8, 1, 1]: IoU 0, hull 1, union 0.08 -> GIoU -0.92
    loss, logs = clipvg_loss(torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([[0.9, 0.9, 0.2, 0.2]]))
    assert logs["l1"] == pytest.approx(1.6, abs=1e-5) and logs["giou"] == pytest.approx(1.92, abs=1e-5)
    # the batch mean, weights 1:1 by default
    p = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])
    loss, logs = clipvg_loss(p, t.expand(2, 4), l1_weight=2.0, giou_weight=0.5)
    assert loss.item() == pytest.approx(2.0 * 0.05 + 0.5 * 1 / 3, abs=1e-5)


def test_open_clip_encoders_multi_level_random_weights():
    enc = build_encoders("clip", clip_name="ViT-S-32", levels=(0, 3, 7, 11), image_size=224)
    ids, mask = enc.tokenize(["a dog on the left"], 16)
    assert ids.shape == (1, 16) and int(mask.sum()) == 7  # start, 5 words, end
    with torch.no_grad():
        img = enc.encode_image(torch.zeros(1, 3, 224, 224))
        txt = enc.encode_text(ids, mask)
    assert enc.grid == 7 and img.shape == (1, 50, 4 * 384) and txt.shape == (1, 16, 384)
    assert not enc.image_features_trainable
    quirk = build_encoders("clip", clip_name="ViT-S-32", trainable_pos_embed=True)
    assert quirk.image_features_trainable
    assert [n for n, p in quirk.named_parameters() if p.requires_grad] == ["visual.positional_embedding"]


def test_checkpoints_leave_out_frozen_packaged_encoders(tmp_path, offline_model):
    from groundkit.checkpoint import load_weights, save_checkpoint

    m = offline_model
    m.encoders.from_source = True  # as with the packaged weights
    try:
        keys = m.state_dict().keys()
        assert keys and not any(k.startswith("encoders.") for k in keys)
        save_checkpoint(tmp_path / "ck", m)
        torch.manual_seed(5)
        other = ClipVG(ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=64), m.encoders, 12).eval()
        load_weights(other, tmp_path / "ck")
        b = batch_for(m)
        torch.testing.assert_close(other(b).boxes, m(b).boxes)
    finally:
        m.encoders.from_source = False
    assert any(k.startswith("encoders.") for k in m.state_dict())  # random encoders are stored


def test_sine_position_embedding_matches_detr():
    from groundkit.methods.clipvg.model import sine_position_embedding

    g, d = 3, 8
    e = sine_position_embedding(g, d).view(g, g, d)
    # DETR PositionEmbeddingSine(num_pos_feats=d/2, normalize=True) on an unpadded g x g mask
    ones = torch.ones(1, g, g)
    y, x = ones.cumsum(1) / g * 2 * torch.pi, ones.cumsum(2) / g * 2 * torch.pi
    dim_t = 10000 ** (2 * (torch.arange(d // 2) // 2) / (d // 2))
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack([px[..., 0::2].sin(), px[..., 1::2].cos()], dim=4).flatten(3)
    py = torch.stack([py[..., 0::2].sin(), py[..., 1::2].cos()], dim=4).flatten(3)
    torch.testing.assert_close(e, torch.cat([py, px], dim=3)[0])


def test_learning_options_build_and_keep_defaults(offline_model):
    m = offline_model
    assert not m.feat_norm and m.pos_init == "random" and not m.pos_input and not hasattr(m, "visu_norm")
    torch.manual_seed(0)
    opt = ClipVG(
        ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=64, feat_norm=True, pos_init="sine", pos_input=True),
        m.encoders,
        12,
    ).eval()
    assert len(opt.visu_norm) == len(m.encoders.level_dims) and sum(m.encoders.level_dims) == m.encoders.image_dim
    img_rows = opt.pos_embed.weight[1 + 12 :]
    assert float(img_rows[0].detach().abs().sum()) == 0.0  # the global token's row
    from groundkit.methods.clipvg.model import sine_position_embedding

    torch.testing.assert_close(img_rows[1:], sine_position_embedding(4, 32))
    b = batch_for(opt)
    boxes = opt(b).boxes
    assert boxes.shape == (2, 4) and bool(((boxes > 0) & (boxes < 1)).all())
    # the per-level norm makes the boxes invariant to a per-level scale of the image features
    img, txt = opt.encode(b["image"], b["image_mask"], b["text_ids"], b["text_mask"])
    scale = torch.cat([torch.full((c,), 3.0 + i) for i, c in enumerate(opt.encoders.level_dims)])
    a = opt({"image_feats": img, "text_feats": txt, "image_mask": b["image_mask"], "text_mask": b["text_mask"]})
    s = opt(
        {"image_feats": img * scale, "text_feats": txt * 2, "image_mask": b["image_mask"], "text_mask": b["text_mask"]}
    )
    torch.testing.assert_close(a.boxes, s.boxes, atol=5e-3, rtol=0)  # up to the norms' eps
    with pytest.raises(ValueError):
        ClipVG(ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=64, pos_init="fixed"), m.encoders, 12)


def test_token_targets_cover_the_box_cells_and_the_loss_points_at_them():
    from groundkit.methods.clipvg.model import token_loss, token_targets

    # a box over the left two columns and top row of a 4 x 4 grid; a box smaller than a cell gets its centre cell
    boxes = torch.tensor([[0.25, 0.125, 0.5, 0.25], [0.6, 0.6, 0.02, 0.02]])
    q = token_targets(boxes, 4).view(2, 4, 4)
    assert torch.allclose(q[0, 0, :2], torch.full((2,), 0.5)) and q[0].sum() == 1 and (q[0, 1:] == 0).all()
    assert q[1, 2, 2] == 1.0 and q[1].sum() == 1
    # logits peaked on the target cells give a lower loss than flat ones; padding tokens are ignored
    flat = torch.zeros(2, 16)
    peaked = flat.clone()
    peaked[0, [0, 1]] = 5.0
    peaked[1, 10] = 5.0
    assert token_loss(peaked, boxes) < token_loss(flat, boxes)
    padded = peaked.clone()
    padded[:, 12:] = float("-inf")
    assert torch.isfinite(token_loss(padded, boxes))
    assert token_loss(torch.full((1, 16), float("-inf")), boxes[:1]) == 0  # nothing left to score


def test_token_head_scores_every_grid_token_and_masks_padding(offline_model):
    from groundkit.methods.clipvg.model import token_loss

    m = offline_model
    assert m.token_head is None and m(batch_for(m)).token_logits is None  # off by default
    torch.manual_seed(0)
    t = ClipVG(ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=64, token_head=True), m.encoders, 12).eval()
    b = batch_for(t)
    out = t(b)
    assert out.token_logits.shape == (2, 16)
    grid = out.token_logits.view(2, 4, 4)
    assert torch.isinf(grid[:, 3]).all() and torch.isfinite(grid[:, :3]).all()  # the padded bottom row
    # the auxiliary loss reaches the fusion layers
    t.train()
    loss = token_loss(t(b).token_logits, torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.4, 0.3, 0.3]]))
    loss.backward()
    assert t.layers[0].linear1.weight.grad.abs().sum() > 0
    assert t.token_head.weight.grad.abs().sum() > 0 and t.visu_proj.weight.grad.abs().sum() > 0


def test_token_centre_puts_the_box_centre_at_the_scored_cells(offline_model):
    m = offline_model
    torch.manual_seed(0)
    t = ClipVG(ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=64, token_centre=True), m.encoders, 12).eval()
    assert t.token_head is not None
    b = batch_for(t)
    img, txt = t.encode(b["image"], b["image_mask"], b["text_ids"], b["text_mask"])
    pad = t.image_token_mask(b["image_mask"])
    with torch.no_grad():  # a token head that scores every cell alike
        t.token_head.weight.zero_()
        t.token_head.bias.zero_()
    boxes, tokens, token_boxes = t.fuse(img, pad, txt, b["text_mask"], return_tokens=True)
    assert token_boxes is None and torch.isinf(tokens[:, 12:]).all()  # padded bottom row
    # flat scores over the 12 unpadded cells: the centre is their mean, (0.5, 0.375), up to one cell of offset
    assert ((boxes[:, 0] - 0.5).abs() <= 0.25 + 1e-6).all() and ((boxes[:, 1] - 0.375).abs() <= 0.25 + 1e-6).all()
    with torch.no_grad():
        t.head.layers[-1].weight.zero_()
        t.head.layers[-1].bias.zero_()  # [REG] offsets sigmoid(0) = 0.5: no offset
    boxes = t.fuse(img, pad, txt, b["text_mask"])
    torch.testing.assert_close(boxes[:, :2], torch.tensor([[0.5, 0.375]] * 2))


def test_token_box_regresses_a_box_per_cell_and_reads_the_best_tokens_neighbourhood(offline_model):
    from groundkit.methods.clipvg.model import neighbourhood_box, token_box_loss

    m = offline_model
    torch.manual_seed(0)
    t = ClipVG(ClipVGModel(d_model=32, nhead=4, num_layers=2, dim_ff=64, token_box=True), m.encoders, 12).eval()
    assert t.head is None and t.token_head is not None and not t.token_centre
    b = batch_for(t)
    out = t(b)
    assert out.token_boxes.shape == (2, 16, 4) and out.boxes.shape == (2, 4)
    # a token's box stays within one cell of its own cell centre (a 4 x 4 grid: cells 0.25 wide)
    centres = torch.tensor([[(c + 0.5) / 4, (r + 0.5) / 4] for r in range(4) for c in range(4)])
    assert ((out.token_boxes[..., :2] - centres).abs() <= 0.25 + 1e-6).all()
    # the box is the neighbourhood of the best token: scores split between two far cells pick one object's box
    logits = torch.full((1, 16), -10.0)
    logits[0, 0], logits[0, 15] = 2.0, 1.9
    tb = torch.zeros(1, 16, 4)
    tb[0, 0], tb[0, 15] = torch.tensor([0.1, 0.1, 0.2, 0.2]), torch.tensor([0.9, 0.9, 0.1, 0.1])
    torch.testing.assert_close(neighbourhood_box(logits, tb), torch.tensor([[0.1, 0.1, 0.2, 0.2]]), atol=1e-3, rtol=0)
    # the dense loss reads the tokens inside the target box only, and trains the fusion layers
    target = torch.tensor([[0.125, 0.125, 0.25, 0.25]])  # cell 0 alone
    assert token_box_loss(tb, logits, target) == pytest.approx(0.15, abs=1e-6)  # |0.025| * 2 + |0.05| * 2
    t.train()
    o = t(b)
    token_box_loss(o.token_boxes, o.token_logits, torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.4, 0.3, 0.3]])).backward()
    assert t.layers[0].linear1.weight.grad.abs().sum() > 0 and t.token_box.layers[0].weight.grad.abs().sum() > 0


def test_official_image_mask_is_torchvision_resize_of_the_pixel_mask():
    """model.image_mask=bilinear: the official get_masks (torchvision Resize of the int pixel mask to the grid,
    bilinear without antialias as in torchvision 0.10, then bool); nearest marks fewer tokens."""
    from torchvision.transforms import Resize

    torch.manual_seed(0)
    enc = build_encoders("effnet_minilm", grid=14, pretrained=False)
    official = ClipVG(ClipVGModel(d_model=16, nhead=2, num_layers=1, dim_ff=16, image_mask="bilinear"), enc, 4)
    nearest = ClipVG(ClipVGModel(d_model=16, nhead=2, num_layers=1, dim_ff=16, image_mask="nearest"), enc, 4)
    masks = []
    for w, h in [(640, 480), (375, 500), (500, 333), (224, 224)]:
        s = 224 / max(w, h)
        nw, nh = round(w * s), round(h * s)
        top, left = round((224 - nh) / 2 - 0.1), round((224 - nw) / 2 - 0.1)  # the official centred pad
        m = torch.ones(224, 224, dtype=torch.int32)
        m[top : top + nh, left : left + nw] = 0
        masks.append(m)
    pix = torch.stack(masks)
    want = Resize([14, 14], antialias=False)(pix).to(torch.bool).flatten(1)
    got = official.image_token_mask(pix.bool())
    assert torch.equal(got[:, 1:], want) and not got[:, 0].any()
    near = nearest.image_token_mask(pix.bool())
    assert not torch.equal(got[:2], near[:2]) and torch.equal(got[3], near[3])  # they differ, except unpadded


def test_official_attention_init_is_one_xavier_over_the_stacked_projection():
    torch.manual_seed(0)
    enc = build_encoders("effnet_minilm", grid=2, pretrained=False)
    m = ClipVG(ClipVGModel(d_model=64, nhead=4, num_layers=2, dim_ff=32, attn_init="official"), enc, 4)
    bound = (6 / (3 * 64 + 64)) ** 0.5  # xavier_uniform_ over in_proj_weight [3D, D]
    for layer in m.layers:
        w = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
        for b in (layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias, layer.out_proj.bias):
            assert not b.any()
    fixed = ClipVG(ClipVGModel(d_model=64, nhead=4, num_layers=1, dim_ff=32, attn_init="xavier"), enc, 4)
    assert fixed.layers[0].q_proj.weight.abs().max() > bound and fixed.layers[0].q_proj.bias.any()


def test_box_score_is_the_token_mass_inside_the_box():
    from groundkit.methods.clipvg.predict import box_mass

    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, float("-inf")]])  # 2x2 grid, row-major
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])  # the top-left cell; the whole canvas
    mass = box_mass(logits, boxes)
    torch.testing.assert_close(mass, torch.tensor([torch.softmax(logits[0], 0)[0].item(), 1.0]))
    assert box_mass(logits[:1], torch.tensor([[0.75, 0.75, 0.4, 0.4]])) < 1e-3  # bottom-right cell only


def test_a_processs_first_model_is_initialised_like_every_later_one():
    """Loading the packaged encoders (cached per process) must not draw from the global RNG: a process's first
    CLIP-VG model and a later one built from the same seed get the same fusion weights (the first used to differ,
    so a curriculum run gave another result when it was its worker's first training)."""
    from groundkit.backbones import load_backbone
    from groundkit.methods.clipvg import model as M

    load_backbone.cache_clear()
    M._pretrained_text_model.cache_clear()
    built = []
    for _ in range(2):
        torch.manual_seed(0)
        enc = build_encoders("effnet_minilm", grid=2, pretrained=True)
        built.append(ClipVG(ClipVGModel(d_model=16, nhead=2, num_layers=1, dim_ff=16), enc, 4))
    for (k, a), (_, b) in zip(built[0].state_dict().items(), built[1].state_dict().items()):
        assert torch.equal(a, b), k


def test_effnet_stages_pick_the_concatenated_levels():
    """model.effnet_stages: each named stage's channels in order (stride 4: 24, 8: 40, 16: 112), after a global token;
    an unknown stage ends in one error naming the choices."""
    from groundkit.methods.clipvg.model import EncoderError

    torch.manual_seed(0)
    enc = build_encoders("effnet_minilm", grid=4, pretrained=False, stages=["s4", "s8", "s16"])
    assert enc.level_dims == (24, 40, 112) and enc.image_dim == 176
    out = enc.encode_image(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 1 + 16, 176)
    with pytest.raises(EncoderError, match="choose from"):
        build_encoders("effnet_minilm", grid=4, pretrained=False, stages=["s2"])
