"""Co-grounding network and losses: shapes, targets and losses on hand-checkable inputs, attention masks,
Darknet weight files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from groundkit.methods.cogrounding.backbones import (
    Backbone,
    Darknet53YOLOv3,
    DarknetWeightsError,
    load_darknet_weights,
    save_darknet_weights,
)
from groundkit.methods.cogrounding.config import CoGroundingModelConfig
from groundkit.methods.cogrounding.model import (
    CoGroundingNet,
    LSTMTextEncoder,
    PhraseAttention,
    Targets,
    build_targets,
    co_attend,
    coord_features,
    decode_boxes,
    location_loss,
    motion_loss,
    rank_loss,
    rank_partners,
    temporal_offset_loss,
    yolo_loss,
)
from groundkit.methods.cogrounding.variants import ExtendedCoGroundingNet, feature_flow

torch.set_num_threads(1)


class TinyBackbone(Backbone):
    """Strided convolutions with the backbone contract (fast)."""

    channels = (8, 6, 4)

    def __init__(self):
        super().__init__()
        self.c8 = nn.Sequential(nn.Conv2d(3, 4, 3, 8, 1))
        self.c16 = nn.Conv2d(4, 6, 3, 2, 1)
        self.c32 = nn.Conv2d(6, 8, 3, 2, 1)

    def forward(self, x):
        f8 = self.c8(x)
        f16 = self.c16(f8)
        return [self.c32(f16), f16, f8]


def tiny_net(
    co_attention=True, size=64, dim=16, motion=False, motion_mode="corr", box_from_centre=False, motion_attention=False
):
    torch.manual_seed(0)
    cfg = CoGroundingModelConfig(
        dim=dim,
        co_attention=co_attention,
        motion=motion,
        motion_mode=motion_mode,
        box_from_centre=box_from_centre,
        motion_attention=motion_attention,
    )
    cls = ExtendedCoGroundingNet if cfg.variant_switches() else CoGroundingNet
    return cls(cfg, TinyBackbone(), LSTMTextEncoder(50, dim), size)


def text_batch(n, lengths):
    ids = torch.zeros(n, 6, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, :L] = torch.arange(3, 3 + L)
    return ids, ids != 0


def test_forward_shapes_and_score_product():
    net = tiny_net().eval()
    ids, mask = text_batch(4, [3, 5, 2, 6])
    out = net(torch.rand(4, 3, 64, 64), ids, mask, clip_len=2)
    grids = [2, 4, 8]
    M = sum(g * g for g in grids)
    assert [tuple(p.shape) for p in out["pred"]] == [(4, 3, 5, g, g) for g in grids]
    assert out["sim"].shape == (4, M) and out["loc"].shape == (4, M) and out["conf"].shape == (4, 3 * M)
    assert out["sim"].abs().max() <= 1 + 1e-5  # cosines
    assert torch.allclose(out["loc"].min(1).values, torch.zeros(4), atol=1e-6)
    assert torch.allclose(out["loc"].max(1).values, torch.ones(4), atol=1e-4)
    # final score of anchor a at cell m = conf_raw * sim_m * loc_m (anchors ordered scale, anchor, cell)
    s, a, y, x = 1, 2, 3, 1
    m = 4 + y * 4 + x
    k = 3 * 4 + a * 16 + y * 4 + x
    expect = out["pred"][s][0, a, 4, y, x] * out["sim"][0, m] * out["loc"][0, m]
    assert torch.allclose(out["conf"][0, k], expect, atol=1e-6)
    assert torch.allclose(out["conf_raw"][0, k], out["pred"][s][0, a, 4, y, x])
    boxes = decode_boxes(net, out["pred"])
    assert boxes.shape == (4, 3 * M, 4) and (boxes[..., 2] > boxes[..., 0]).all()


def test_coord_features_corners():
    c = coord_features(4)
    assert c.shape == (8, 4, 4)
    assert torch.allclose(c[:, 0, 0], torch.tensor([-1, -1, -0.5, -0.5, -0.75, -0.75, 0.25, 0.25]))
    assert torch.allclose(c[:4, 3, 3], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_phrase_attention_ignores_padding():
    att = PhraseAttention(4)
    ctx = torch.randn(2, 5, 4)
    emb = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    a, e = att(ctx, emb, mask)
    assert torch.all(a[0, 2:] == 0) and torch.allclose(a.sum(1), torch.ones(2))
    assert torch.allclose(e.norm(dim=1), torch.ones(2))
    # changing padded tokens changes nothing
    emb2 = emb.clone()
    emb2[0, 3] = 100
    assert torch.allclose(att(ctx, emb2, mask)[1], e)


def test_lstm_sentence_vector_is_last_valid_token():
    enc = LSTMTextEncoder(20, 4).eval()
    ids, mask = text_batch(2, [2, 4])
    _, ctx, sent = enc(ids, mask)
    assert torch.allclose(sent[0], ctx[0, 1]) and torch.allclose(sent[1], ctx[1, 3])
    assert torch.all(ctx[0, 2:] == 0)  # padding positions carry nothing


def test_co_attention_finds_the_matching_position():
    D, g = 8, 3
    key = torch.nn.functional.normalize(torch.randn(1, D, g, g), dim=1)
    # query: the key's features shifted by one cell to the right
    query = torch.roll(key, shifts=1, dims=3)
    att = co_attend(query, key, temperature=100.0)
    assert torch.allclose(att, query, atol=1e-3)


def test_build_targets_hand_checked():
    net = tiny_net(size=64)
    # 64 px input: anchors scaled by 64/416; a 20x30 box centred at (40, 24)
    t = build_targets(net, torch.tensor([[30.0, 9.0, 50.0, 39.0]]))
    anc = (
        torch.tensor([[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90], [156, 198], [373, 326]])
        * 64
        / 416
    )
    ious = [min(20, w) * min(30, h) / (600 + w * h - min(20, w) * min(30, h)) for w, h in anc.tolist()]
    best = int(np.argmax(ious))  # smallest-first index
    scale = 2 - best // 3
    a = best % 3
    g = [2, 4, 8][scale]
    assert int(t.scale) == scale and int(t.anchor) == a
    assert int(t.gi) == math.floor(40 * g / 64) and int(t.gj) == math.floor(24 * g / 64)
    aw, ah = anc[best].tolist()
    assert torch.allclose(
        t.txywh[0], torch.tensor([40 * g / 64 % 1, 24 * g / 64 % 1, math.log(20 / aw), math.log(30 / ah)]), atol=1e-5
    )
    offs = [0, 4, 20]
    assert int(t.cell_index) == offs[scale] + int(t.gj) * g + int(t.gi)
    assert int(t.anchor_index) == 3 * offs[scale] + a * g * g + int(t.gj) * g + int(t.gi)


def test_yolo_loss_is_zero_regression_at_the_target():
    net = tiny_net().eval()
    boxes = torch.tensor([[30.0, 9.0, 50.0, 39.0], [2.0, 2.0, 60.0, 62.0]])
    t = build_targets(net, boxes)
    ids, mask = text_batch(2, [3, 3])
    out = net(torch.rand(2, 3, 64, 64), ids, mask)
    for i in range(2):  # write the exact targets into the predictions
        s = int(t.scale[i])
        p = out["pred"][s]
        p.data[i, t.anchor[i], 0, t.gj[i], t.gi[i]] = torch.logit(t.txywh[i, 0].clamp(1e-4, 1 - 1e-4))
        p.data[i, t.anchor[i], 1, t.gj[i], t.gi[i]] = torch.logit(t.txywh[i, 1].clamp(1e-4, 1 - 1e-4))
        p.data[i, t.anchor[i], 2:4, t.gj[i], t.gi[i]] = t.txywh[i, 2:]
    reg, cls = yolo_loss(net, out, t)
    assert reg.item() < 1e-6
    # decoding the target anchor gives back the box
    dec = decode_boxes(net, out["pred"])[torch.arange(2), t.anchor_index]
    assert torch.allclose(dec, boxes, atol=1e-2)
    # classification: CE of the final scores with the GT anchor as target
    assert torch.isclose(cls, torch.nn.functional.cross_entropy(out["conf"], t.anchor_index))


def test_rank_partners_reference_and_fixed():
    ids = torch.tensor([[5, 2], [5, 2], [7, 2], [7, 2], [9, 2], [9, 2]])
    p, v = rank_partners(ids, 2, reference=True)
    assert p.tolist() == [5, 4, 3, 2, 1, 0] and v.all()
    # with 3 clips reversal maps the middle clip onto itself (the same sentence): the fixed mode does not
    assert ids[p[2]].tolist() == ids[2].tolist()
    p, v = rank_partners(ids, 2, reference=False)
    assert p.tolist() == [2, 3, 4, 5, 0, 1] and v.all()
    same = torch.tensor([[5, 2]] * 4)
    _, v = rank_partners(same, 2, reference=False)
    assert not v.any()


def test_rank_loss_hand_computed():
    class T:  # minimal Targets
        cell_index = torch.tensor([0, 1])

    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = [torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[0.6, 0.8]], [[0.8, 0.6]]]])]  # [2, D=2, 1, 2]
    sim = torch.einsum("bd,bdm->bm", e, feats[0].flatten(2))  # [[1, 0], [0.8, 0.6]]
    out = {"sim": sim, "feats": feats, "text": type("X", (), {"e_sub": e})()}
    partner, valid = torch.tensor([1, 0]), torch.tensor([True, True])
    loss = rank_loss(out, T, partner, valid, margin=0.1)
    # sample 0: pos = 1; neg1 = <e_1, f_0[:, cell 0]> = 0; neg2 = sim[0, cell 1] = 0  -> 0
    # sample 1: pos = 0.6; neg1 = <e_0, f_1[:, cell 1]> = 0.8 -> 0.3; neg2 = sim[1, cell 0] = 0.8 -> 0.3
    assert torch.isclose(loss, torch.tensor(0.6 / 4))
    # both GT cells 0: the second term of each pair compares the cell with itself; groundkit skips it, the official
    # code adds the margin (0.1 per sample)
    T.cell_index = torch.tensor([0, 0])
    sim0 = sim[:, 0]  # sample 0: pos 1, neg1 0 -> 0; sample 1: pos 0.8, neg1 <e_0, f_1[:, 0]> = 0.6 -> 0
    assert float(sim0[1]) == pytest.approx(0.8)
    assert torch.isclose(rank_loss(out, T, partner, valid, 0.1), torch.tensor(0.0))
    assert torch.isclose(rank_loss(out, T, partner, valid, 0.1, zero_same_cell=False), torch.tensor(0.2 / 4))


def test_location_loss_reference_vs_fixed():
    class T:
        cell_index = torch.tensor([2])

    raw = torch.tensor([[-1.0, 0.0, 1.0]])
    out = {"loc_raw": raw, "loc": (raw + 1) / 2}
    ref = location_loss(out, T, reference=True)
    fixed = location_loss(out, T, reference=False, temperature=0.1)
    assert torch.isclose(ref, -torch.log_softmax(torch.tensor([0.0, 0.5, 1.0]), 0)[2])
    assert torch.isclose(fixed, -torch.log_softmax(torch.tensor([-10.0, 0.0, 10.0]), 0)[2])
    assert fixed < 0.01 < ref  # the [0,1] logits can never make the softmax confident


def test_temporal_offset_loss_zero_for_consistent_motion():
    net = tiny_net().eval()
    boxes = torch.tensor([[10.0, 10.0, 30.0, 40.0], [14.0, 10.0, 34.0, 40.0]])
    t = build_targets(net, boxes)
    ids, mask = text_batch(2, [3, 3])
    out = net(torch.rand(2, 3, 64, 64), ids, mask, clip_len=2)
    for i in range(2):
        s = int(t.scale[i])
        p = out["pred"][s].data
        p[i, t.anchor[i], 0, t.gj[i], t.gi[i]] = torch.logit(t.txywh[i, 0].clamp(1e-4, 1 - 1e-4))
        p[i, t.anchor[i], 1, t.gj[i], t.gi[i]] = torch.logit(t.txywh[i, 1].clamp(1e-4, 1 - 1e-4))
        p[i, t.anchor[i], 2:4, t.gj[i], t.gi[i]] = t.txywh[i, 2:]
    assert temporal_offset_loss(net, out, t, boxes, 2).item() < 1e-8
    # shifting one frame's prediction by 8 px breaks the consistency
    s = int(t.scale[1])
    out["pred"][s].data[1, t.anchor[1], 2, t.gj[1], t.gi[1]] += 0.5
    assert temporal_offset_loss(net, out, t, boxes, 2).item() > 1e-4


def test_clip_pairs_attend_to_each_other():
    net = tiny_net().eval()
    ids, mask = text_batch(4, [3, 3, 4, 4])
    x = torch.rand(4, 3, 64, 64)
    out = net(x, ids, mask, clip_len=2)
    # frame 0 of clip 0 only depends on frames 0 and 1: changing frame 2 leaves it unchanged
    x2 = x.clone()
    x2[2] = torch.rand(3, 64, 64)
    out2 = net(x2, ids, mask, clip_len=2)
    assert torch.allclose(out["conf"][0], out2["conf"][0], atol=1e-5)
    assert not torch.allclose(out["conf"][2], out2["conf"][2], atol=1e-5)
    single = tiny_net(co_attention=False).eval()
    assert single.corr_conv is None


def test_darknet_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    a = Darknet53YOLOv3(width=1 / 16).eval()
    for m in a.modules():  # random BN statistics so that every value matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    assert len(a.cfg_order()) == 75
    path = save_darknet_weights(a, tmp_path / "tiny.weights", seen=1234)
    b = Darknet53YOLOv3(weights_path=str(path), width=1 / 16).eval()
    x = torch.rand(1, 3, 64, 64)
    fa, fb = a(x), b(x)
    assert [tuple(f.shape) for f in fa] == [(1, 64, 2, 2), (1, 32, 4, 4), (1, 16, 8, 8)]
    assert all(torch.equal(u, v) for u, v in zip(fa, fb))
    info = load_darknet_weights(b, path)
    assert info == {"version": 2, "seen": 1234, "layers": 75}
    with pytest.raises(DarknetWeightsError, match="needs"):
        load_darknet_weights(Darknet53YOLOv3(width=1 / 8), path)
    bad = tmp_path / "short.weights"
    bad.write_bytes(b"\x00\x00")
    with pytest.raises(DarknetWeightsError, match="too short"):
        load_darknet_weights(b, bad)


def test_darknet_header_version_01_has_int32_seen(tmp_path):
    m = Darknet53YOLOv3(width=1 / 16)
    p = tmp_path / "v01.weights"
    with open(p, "wb") as f:
        np.asarray([0, 1, 0, 77], dtype=np.int32).tofile(f)  # major 0, minor 1: 32-bit "seen"
        for layer in m.cfg_order():
            n = (
                sum(
                    t.numel()
                    for t in (
                        layer.bn.bias,
                        layer.bn.weight,
                        layer.bn.running_mean,
                        layer.bn.running_var,
                        layer.conv.weight,
                    )
                )
                if hasattr(layer, "bn")
                else layer.conv.bias.numel() + layer.conv.weight.numel()
            )
            np.full(n, 0.5, dtype=np.float32).tofile(f)
    info = load_darknet_weights(m, p)
    assert info["seen"] == 77 and m.stem.conv.weight.detach().flatten()[0].item() == 0.5


def test_transformer_text_encoder_from_local_minilm():
    from groundkit.methods.cogrounding.config import CoGroundingModelConfig
    from groundkit.methods.cogrounding.model import TransformerTextEncoder
    from groundkit.methods.cogrounding.text import build_tokenizer, resolve_text_path

    mc = CoGroundingModelConfig(text_encoder="transformer", max_tokens=8)
    tok = build_tokenizer(mc)
    enc = TransformerTextEncoder(resolve_text_path(mc.text_encoder_path), dim=16, freeze=True)
    ids, mask = (torch.stack(t) for t in zip(*[tok.encode("the man on the left"), tok.encode("a dog")]))
    emb, ctx, sent = enc(ids, mask)
    assert emb.shape == (2, 8, 16) and ctx.shape == (2, 8, 32) and sent.shape == (2, 32)
    assert not any(p.requires_grad for p in enc.encoder.parameters())
    net = CoGroundingNet(CoGroundingModelConfig(dim=16), TinyBackbone(), enc, 64).eval()
    out = net(torch.rand(2, 3, 64, 64), ids, mask)
    assert out["conf"].shape == (2, 3 * 84)


def test_top_down_path_carries_coarse_features_to_fine_scales():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 2, 2), torch.randn(2, 6, 4, 4), torch.randn(2, 4, 8, 8)]
    plain = tiny_net(co_attention=False).eval()
    td = tiny_net(co_attention=False).eval()
    td.top_down = True
    a, b = plain.encode_frames(backbone_feats=feats), td.encode_frames(backbone_feats=feats)
    assert [x.shape for x in a] == [x.shape for x in b]
    assert torch.allclose(a[0], b[0])  # the coarsest scale has nothing above it
    assert not torch.allclose(a[1], b[1]) and not torch.allclose(a[2], b[2])
    # the finest scale now depends on the coarsest map
    feats2 = [feats[0] + 1.0, feats[1], feats[2]]
    assert torch.allclose(plain.encode_frames(backbone_feats=feats2)[2], a[2])
    assert not torch.allclose(td.encode_frames(backbone_feats=feats2)[2], b[2])
    assert all(torch.allclose(x.norm(dim=1), torch.ones(())) for x in b)


def _blob_maps(x0: int, D: int = 8, G: int = 9) -> torch.Tensor:
    """``[1, D, G, G]`` L2-normalised maps: a flat background and a distinct feature at column ``x0``, row 4."""
    v = torch.zeros(1, D, G, G)
    v[:, 0] = 1.0
    v[0, :, 4, x0] = torch.tensor([0.0, 1.0] + [0.0] * (D - 2))
    return v


def test_motion_volume_is_oriented_forward_in_time():
    from groundkit.methods.cogrounding.variants import motion_volume

    # the blob is at column 4 at time t and at column 5 at t + 1 (moving right): centre t, neighbour t + 1
    vc, v_next, v_prev = _blob_maps(4), _blob_maps(5), _blob_maps(3)
    right, left, still = 5, 3, 4  # channels (dy=0, dx=+1), (0, -1), (0, 0) of the 3x3 volume
    fwd = motion_volume(vc, v_next, torch.tensor([1]))[0, :, 4, 4]
    assert fwd.argmax().item() == right and fwd[right] == 1.0 and fwd[left] == 0.0
    # the same motion seen from the previous frame (blob at column 3 at t - 1) peaks at the same channel
    bwd = motion_volume(vc, v_prev, torch.tensor([-1]))[0, :, 4, 4]
    assert torch.equal(fwd, bwd)
    # a left-moving blob peaks at dx = -1; a repeated frame (dt = 0, a clipped window) carries nothing
    assert motion_volume(vc, v_prev, torch.tensor([1]))[0, :, 4, 4].argmax().item() == left
    assert not motion_volume(vc, vc, torch.tensor([0])).any()
    assert motion_volume(vc, vc, torch.tensor([2]))[0, :, 4, 4].argmax().item() == still


def test_motion_difference_is_linear_in_a_sub_cell_shift_and_forward_in_time():
    from groundkit.methods.cogrounding.variants import motion_difference

    # a smooth ramp along x shifted by a fraction of a cell: the derivative is the shift times the slope
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    vc = x * 0.1
    for shift in (0.25, 0.5):
        later = (x - shift) * 0.1  # the pattern moved right by `shift` cells one frame later
        d_next = motion_difference(vc, later, torch.tensor([1]))
        assert torch.allclose(d_next, torch.full_like(vc, -0.1 * shift))
        earlier = (x + shift) * 0.1  # ... and where it was one frame before: the same derivative
        assert torch.allclose(motion_difference(vc, earlier, torch.tensor([-1])), d_next)
        # two frames away: divided by the offset, the same per-frame derivative
        far = (x - 2 * shift) * 0.1
        assert torch.allclose(motion_difference(vc, far, torch.tensor([2])), d_next)
    assert not motion_difference(vc, vc + 1.0, torch.tensor([0])).any()  # a repeated frame carries nothing


@pytest.mark.parametrize("mode", ["corr", "diff"])
def test_motion_term_sees_the_order_of_frames(mode):
    net = tiny_net(motion=True, motion_mode=mode).eval()
    if mode == "corr":
        assert net.corr_conv[0][0].in_channels == 2 * 16 + 9 and net.motion_conv is None
    else:
        assert net.corr_conv[0][0].in_channels == 2 * 16 and net.motion_conv[0][0][0].in_channels == 2 * 16
    ids, mask = text_batch(2, [3, 3])
    x = torch.rand(2, 3, 64, 64)
    out = net(x, ids, mask, clip_len=2, frame_index=torch.tensor([4, 5]))
    # the same two frames in the other order: the official co-attention cannot tell, the motion term can
    swapped = net(x, ids, mask, clip_len=2, frame_index=torch.tensor([5, 4]))
    assert not torch.allclose(out["conf"], swapped["conf"], atol=1e-5)
    plain = tiny_net().eval()
    a = plain(x, ids, mask, clip_len=2, frame_index=torch.tensor([4, 5]))
    b = plain(x, ids, mask, clip_len=2, frame_index=torch.tensor([5, 4]))
    assert torch.allclose(a["conf"], b["conf"])
    with pytest.raises(ValueError, match="frame offsets"):
        net.cofeatures(net.encode_frames(x[:1]), [f.unsqueeze(1) for f in net.encode_frames(x[1:])])


def test_residual_co_features_start_at_the_single_frame_model():
    ids, mask = text_batch(4, [3, 3, 4, 4])
    x = torch.rand(4, 3, 64, 64)
    single = tiny_net(co_attention=False).eval()
    torch.manual_seed(0)
    net = ExtendedCoGroundingNet(
        CoGroundingModelConfig(dim=16, co_residual=True), TinyBackbone(), LSTMTextEncoder(50, 16), 64
    ).eval()
    net.load_state_dict(single.state_dict(), strict=False)  # the co-attention layers keep their initialisation
    a = single(x, ids, mask, clip_len=1)
    b = net(x, ids, mask, clip_len=2)
    assert torch.allclose(a["conf"], b["conf"], atol=1e-6)  # gate 0: exactly the image model
    b["conf"].sum().backward()  # ... and the gate learns from there
    assert net.co_gate.grad is not None and net.co_gate.grad.abs().sum() > 0
    with torch.no_grad():
        net.co_gate.fill_(1.0)
    assert not torch.allclose(a["conf"], net(x, ids, mask, clip_len=2)["conf"], atol=1e-4)


def test_box_from_centre_regresses_on_the_frames_own_maps():
    torch.manual_seed(0)
    net = ExtendedCoGroundingNet(
        CoGroundingModelConfig(dim=16, box_from_centre=True), TinyBackbone(), LSTMTextEncoder(50, 16), 64
    ).eval()
    ids, mask = text_batch(2, [3, 3])
    x = torch.rand(2, 3, 64, 64)
    out = net(x, ids, mask, clip_len=2, frame_index=torch.tensor([4, 5]))
    alone = net.ground(net.encode_frames(x), net.encode_text(ids, mask))  # each frame without its neighbour
    for p, q in zip(out["pred"], alone["pred"]):
        assert torch.allclose(p[:, :, :4], q[:, :, :4], atol=1e-6)  # offsets: the frame's own maps
        assert not torch.allclose(p[:, :, 4], q[:, :, 4], atol=1e-4)  # confidence: the co-features


def test_feature_flow_measures_a_sub_cell_shift_forward_in_time():
    # a smooth pattern moving 0.25 cell per frame to the right (and 0.1 down)
    ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    pat = lambda dx, dy: torch.stack(  # noqa: E731
        [torch.sin(0.6 * (xs - dx) + k) * torch.cos(0.5 * (ys - dy) - k) for k in range(8)]
    )
    f0, f1 = pat(0.0, 0.0)[None], pat(0.25, 0.1)[None]
    flow = feature_flow(f0, f1, torch.tensor([1.0]))[0, :, 3:9, 3:9].mean((1, 2))
    assert torch.allclose(flow, torch.tensor([0.25, 0.1]), atol=0.03), flow
    # the neighbour before the centre frame: the same motion, forward in time
    back = feature_flow(f1, f0, torch.tensor([-1.0]))[0, :, 3:9, 3:9].mean((1, 2))
    assert torch.allclose(back, torch.tensor([0.25, 0.1]), atol=0.03), back
    assert torch.allclose(feature_flow(f0, f1, torch.tensor([2.0]))[0, :, 3:9, 3:9].mean((1, 2)), flow / 2)
    assert feature_flow(f0, f0, torch.tensor([1.0])).abs().max() < 1e-5  # no motion
    assert feature_flow(f0, f1, torch.tensor([0.0])).abs().max() == 0  # a clipped window repeats the frame
    flat = torch.ones(1, 8, 12, 12)
    assert feature_flow(flat, flat + 0.1, torch.tensor([1.0])).abs().max() < 1e-4  # no texture: no motion


def test_motion_attention_scores_cells_by_the_velocity_of_the_motion_phrase():
    ids, mask = text_batch(4, [3, 3, 4, 4])
    x = torch.rand(4, 3, 64, 64)
    fi = torch.tensor([4, 5, 7, 8])
    plain = tiny_net().eval()
    net = tiny_net(motion_attention=True).eval()
    net.load_state_dict(plain.state_dict(), strict=False)  # the motion branch keeps its initialisation
    a = plain(x, ids, mask, clip_len=2, frame_index=fi)
    b = net(x, ids, mask, clip_len=2, frame_index=fi)
    assert b["mot_raw"].shape == (4, net.n_cells) and b["text"].e_mot.shape == (4, 16)
    # velocity 0, sigma 1 cell/frame at the start: the scores of the model without it, up to -|flow|^2 / 2
    flow = torch.cat([m.flatten(2) for m in net.motion_maps(*_window(net, x))], 2)
    assert torch.allclose(b["mot_raw"], -(flow**2).sum(1) / 2, atol=1e-5)
    per_anchor = torch.cat(
        [
            b["mot_raw"][:, o : o + g * g].unsqueeze(1).expand(-1, 3, -1).flatten(1)
            for o, g in zip(net.cell_offsets(), net.grids)
        ],
        1,
    )
    assert torch.allclose(b["conf"] - a["conf"], per_anchor, atol=1e-5)  # added to each anchor of its cell
    # the motion loss teaches the phrase its velocity: the velocity layer and sigma learn from the first step ...
    t = build_targets(net, torch.tensor([[4.0, 4, 20, 20], [30, 30, 50, 60], [10, 40, 30, 60], [0, 0, 63, 63]]))
    motion_loss(b, t).backward()
    for p in (net.mot_vel.weight, net.mot_vel.bias, net.mot_log_sigma):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert net.visu_map[0][0].weight.grad is None  # the flow is a measurement: no gradient into the maps
    # ... and, once the velocity layer is not zero, the attention over the words and the words themselves
    net.zero_grad()
    with torch.no_grad():
        net.mot_vel.weight.normal_()
    motion_loss(net(x, ids, mask, clip_len=2, frame_index=fi), t).backward()
    for p in (net.mot_attn.score.weight, net.text_encoder.embedding.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # a phrase that expects a rightward motion ranks a right-moving cell above a left-moving one
    with torch.no_grad():
        net.mot_vel.bias.copy_(torch.tensor([0.3, 0.0]))
        net.mot_log_sigma.fill_(math.log(0.2))
    maps = [torch.zeros(1, 2, g, g) for g in net.grids]
    maps[2][0, 0, 1, 1], maps[2][0, 0, 5, 5] = 0.3, -0.3
    out = net.ground(net.encode_frames(x[:1]), net.encode_text(ids[:1], mask[:1]), motion=maps)
    right, left = net.cell_offsets()[2] + 1 * 8 + 1, net.cell_offsets()[2] + 5 * 8 + 5
    assert out["mot_raw"][0, right] > out["mot_raw"][0, left] + 2
    # a single frame has no motion: no scores, no loss; the image model has no branch at all
    alone = net(x, ids, mask, clip_len=1)
    assert "mot_raw" not in alone and motion_loss(alone, t).item() == 0.0
    assert type(tiny_net(co_attention=False, motion_attention=True)) is CoGroundingNet  # no effect without co-attention


def _window(net, x):
    """The centre maps, neighbours and offsets of ``forward`` for pairs of frames 4,5 and 7,8."""
    v = net.encode_frames(x)
    idx = torch.tensor([[1], [0], [3], [2]])
    return v, [f[idx] for f in v], torch.tensor([[1], [-1], [1], [-1]])


def test_motion_maps_ignore_neighbours_at_the_same_frame():
    net = tiny_net(motion_attention=True).eval()
    v = net.encode_frames(torch.rand(3, 3, 64, 64))
    centre = [f[:1] for f in v]
    # a window clipped at the video's end repeats the centre frame (dt = 0): the mean is over the real neighbour
    both = net.motion_maps(centre, [f[1:2].unsqueeze(1).expand(-1, 2, -1, -1, -1) for f in v], torch.tensor([[0, 1]]))
    one = net.motion_maps(centre, [f[1:2].unsqueeze(1) for f in v], torch.tensor([[1]]))
    for p, q, g in zip(both, one, net.grids):
        assert p.shape == (1, 2, g, g) and torch.allclose(p, q, atol=1e-6)
    assert one[2].abs().sum() > 0
    with pytest.raises(ValueError, match="frame offsets"):
        net.motion_maps(centre, [f[1:2].unsqueeze(1) for f in v], None)


def test_motion_loss_over_candidates_ignores_cells_the_model_does_not_consider():
    # 6 cells; the model hesitates between cells 1 (target) and 4; cell 5 is background the model scores low
    mot = torch.tensor([[-1.0, 0.0, -1.0, -1.0, -0.5, 3.0]], requires_grad=True)
    out = {"mot_raw": mot, "cell_score": torch.tensor([[0.1, 5.0, 0.2, 0.0, 4.0, -2.0]]), "conf": torch.zeros(1, 18)}
    t = Targets(*(torch.zeros(1, dtype=torch.long),) * 4, torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), None)
    t.cell_index = torch.tensor([1])
    restricted = motion_loss(out, t, candidates=2)
    # only cells 1 and 4 count: -log softmax([0, -0.5])[0]
    assert torch.allclose(restricted, -torch.log_softmax(torch.tensor([0.0, -0.5]), 0)[0])
    restricted.backward()
    assert mot.grad[0, 5] == 0 and mot.grad[0, 4] > 0 and mot.grad[0, 1] < 0
    assert motion_loss(out, t) > restricted  # over all cells the background's 3.0 dominates
    # the GT cell always counts, even when the model does not rank it among its candidates
    t.cell_index = torch.tensor([3])
    assert torch.allclose(motion_loss(out, t, candidates=2), -torch.log_softmax(torch.tensor([0.0, -1.0, -0.5]), 0)[1])


@pytest.mark.parametrize("taps, layers", [("official", (78, 90, 102)), ("head", (80, 92, 104))])
def test_darknet_taps_are_the_official_cfg_layers(taps, layers):
    """The official darknet.py saves x on entering each [yoloconvolutional] block: the outputs of yolov3.cfg layers
    78 / 90 / 102. Hooks on those layers (numbered as in the .cfg) see exactly the backbone's maps."""
    torch.manual_seed(0)
    m = Darknet53YOLOv3(width=1 / 16, taps=taps).eval()
    cfg = m.cfg_layers()
    assert len(cfg) == 107 and sum(c is not None for c in cfg) == len(m.cfg_order()) == 75
    seen = {}
    for i in layers:
        cfg[i].register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, out))
    maps = m(torch.rand(2, 3, 64, 64))
    for i, f in zip(layers, maps):
        torch.testing.assert_close(f, seen[i], rtol=0, atol=0)
    assert [f.shape[1] for f in maps] == list(m.channels) and [f.shape[-1] for f in maps] == [2, 4, 8]
    # the convolutions outside the computation take no gradient; every BatchNorm has the official momentum 0.1
    frozen = {n.split(".")[0] for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == ({"out0", "out1", "out2"} | ({"pre0", "pre1", "pre2", "set2"} if taps == "official" else set()))
    assert {b.momentum for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)} == {0.1}
    sum(f.sum() for f in m.train()(torch.rand(2, 3, 64, 64))).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_frozen_text_encoder_states_are_computed_once_in_eval_mode():
    from groundkit.methods.cogrounding.model import TransformerTextEncoder  # noqa: PLC0415
    from groundkit.methods.cogrounding.text import HFTokenizer, resolve_text_path  # noqa: PLC0415

    path = resolve_text_path("minilm")
    tok = HFTokenizer(path, 12)
    enc = [tok.encode(t) for t in ("the cat on the left", "a big dog", "the cat on the left")]
    ids, mask = torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc])
    frozen = TransformerTextEncoder(path, 16, freeze=True).train()
    assert not frozen.encoder.training  # no dropout in a frozen encoder
    emb, ctx, sent = frozen(ids, mask)
    assert len(frozen._states) == 2  # two distinct texts
    calls = []
    frozen.encoder.register_forward_hook(lambda *a: calls.append(1))
    again = frozen.hidden_states(ids[:1], mask[:1])
    assert not calls and torch.equal(again[0], frozen.hidden_states(ids, mask)[2])  # from the cache, bit for bit
    with torch.no_grad():
        h = frozen.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(frozen.hidden_states(ids, mask), h, rtol=1e-4, atol=1e-5)
    sent.sum().backward()  # the projections still train
    assert frozen.to_ctx.weight.grad is not None
    trained = TransformerTextEncoder(path, 16, freeze=False).train()
    trained(ids, mask)
    assert trained.encoder.training and not trained._states


def test_the_variants_live_outside_the_official_network():
    """The not-official switches need ExtendedCoGroundingNet; with them off it is the official network, parameter
    for parameter and output for output (so official checkpoints load into either)."""
    cfg = CoGroundingModelConfig(dim=16)
    nets = []
    for cls in (CoGroundingNet, ExtendedCoGroundingNet):
        torch.manual_seed(0)
        nets.append(cls(cfg, TinyBackbone(), LSTMTextEncoder(50, 16), 64).eval())
    base, ext = nets
    assert list(base.state_dict()) == list(ext.state_dict())
    for (k, a), b in zip(base.state_dict().items(), ext.state_dict().values()):
        assert torch.equal(a, b), k
    ids, mask = text_batch(4, [3, 5, 2, 6])
    x = torch.rand(4, 3, 64, 64)
    assert torch.equal(base(x, ids, mask, clip_len=2)["conf"], ext(x, ids, mask, clip_len=2)["conf"])
    for switch in ("motion", "co_residual", "box_from_centre", "motion_attention"):
        with pytest.raises(ValueError, match=f"model.{switch} needs ExtendedCoGroundingNet"):
            CoGroundingNet(
                CoGroundingModelConfig(dim=16, **{switch: True}), TinyBackbone(), LSTMTextEncoder(50, 16), 64
            )
