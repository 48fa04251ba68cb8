"""Region-phrase matching model of Wang et al. (CVPR 2021) and its losses, read top to bottom.

phrase tokens --GloVe--> LSTM --masked max-pool over time--> MLP --L2--> q  [.., P, d]
region feature --(x - mean) / std--> MLP --L2--> r                          [.., N, d]
region-phrase score  s = <r, q> (cosine);  image-sentence score  S = sum_p 2 * max_r s
L = NCE over the batch's images  +  ramp(step) * distillation over the K regions overlapping the best one

``reference`` settings reproduce the official TF code's numbers-affecting behaviour; every
``improved`` change is a separate argument of the loss functions (switched by Wang21LossConfig, config.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from ...boxes import batched_box_iou
from .config import Wang21Config

__all__ = [
    "PhraseEncoder",
    "RegionEncoder",
    "Wang21Model",
    "image_sentence_scores",
    "nce_loss",
    "distill_neighbourhood",
    "distill_neighbourhood_loop",
    "teacher_scores",
    "teacher_targets",
    "distill_loss",
    "ramp_weight",
    "TEACHER_FORMS",
]


def _tf_dense(i: int, o: int) -> nn.Linear:
    """Linear layer initialised as TF1 ``tf.layers.dense`` (Glorot uniform kernel, zero bias)."""
    lin = nn.Linear(i, o)
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class PhraseEncoder(nn.Module):
    """LSTM over word vectors, masked max-pool over time, two-layer MLP, L2 normalisation.

    Max-pool as the official ``lstm_encoder.py``: the first step's output is always included (even
    when token 0 is out of vocabulary); later steps only where ``token_mask`` is True; the LSTM runs
    over padding (zero vectors) too. TF's ``LSTMCell`` adds 1.0 to the forget gate: reproduced by
    initialising the forget-gate bias to 1.
    """

    def __init__(self, word_dim: int, hidden: int = 300, mlp_hidden: int = 1024, out_dim: int = 512):
        super().__init__()
        self.lstm = nn.LSTM(word_dim, hidden, batch_first=True)
        for name, p in self.lstm.named_parameters():
            if "weight" in name:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)
        with torch.no_grad():  # gate order i, f, g, o; TF forget_bias=1.0
            self.lstm.bias_ih_l0[hidden : 2 * hidden].fill_(1.0)
        self.fc1 = _tf_dense(hidden, mlp_hidden)
        self.fc2 = _tf_dense(mlp_hidden, out_dim)

    def forward(self, words: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """words [M, T, E], token_mask [M, T] bool -> unit phrase embeddings [M, out_dim]."""
        # steps after the batch's last unmasked token cannot reach the output (causal LSTM, masked
        # pool): skip them; the result is identical to running all T steps
        if words.shape[1] > 1 and words.shape[0] > 0:
            last = int(torch.nonzero(token_mask.any(0)).max()) + 1 if bool(token_mask.any()) else 1
            words, token_mask = words[:, :last], token_mask[:, :last]
        h, _ = self.lstm(words)  # [M, T, H]
        keep = token_mask.clone()
        keep[:, 0] = True
        pooled = h.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)
        return F.normalize(self.fc2(F.relu(self.fc1(pooled))), dim=-1)


class RegionEncoder(nn.Module):
    """Global scalar standardisation, two-layer MLP, L2 normalisation.

    ``mean``/``std`` are buffers, so a checkpoint carries the statistics it was trained with.
    """

    def __init__(self, in_dim: int, mlp_hidden: int = 1024, out_dim: int = 512, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.fc1 = _tf_dense(in_dim, mlp_hidden)
        self.fc2 = _tf_dense(mlp_hidden, out_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [..., D] -> unit region embeddings [..., out_dim]."""
        x = (feats.float() - self.mean) / self.std
        return F.normalize(self.fc2(F.relu(self.fc1(x))), dim=-1)


class Wang21Model(nn.Module):
    """Phrase and region encoders plus the image-sentence and distillation logit scales.

    Word vectors are data (looked up by the dataset; the official code fed fixed GloVe vectors),
    so a checkpoint works with any vocabulary of the same word dimension.
    """

    def __init__(self, cfg: Wang21Config, word_dim: int, region_mean: float = 0.0, region_std: float = 1.0):
        """``cfg``: the model sizes (``cfg.model``), the region width (``cfg.data.region_dim``) and the logit scales
        (``cfg.loss``); ``word_dim`` and the region normalisation come from the data files."""
        super().__init__()
        m, loss = cfg.model, cfg.loss
        self.phrase = PhraseEncoder(word_dim, m.lstm_hidden, m.mlp_hidden, m.embed_dim)
        self.region = RegionEncoder(cfg.data.region_dim, m.mlp_hidden, m.embed_dim, region_mean, region_std)
        # log of the per-phrase factor of the image-sentence score (official: 2.0, fixed)
        self.log_scale = nn.Parameter(torch.tensor(math.log(loss.phrase_scale)), requires_grad=loss.learn_scale)
        # log of the student's distillation logit scale (official: 1.0, i.e. raw cosines)
        self.log_distill_scale = nn.Parameter(
            torch.tensor(math.log(loss.student_scale)), requires_grad=loss.learn_student_scale
        )

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def distill_scale(self) -> torch.Tensor:
        return self.log_distill_scale.clamp(max=math.log(100.0)).exp()

    def encode_phrases(self, words: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """words [..., T, E] (zero rows for padding / no vector), token_mask [..., T] -> q [..., d]."""
        lead = words.shape[:-2]
        q = self.phrase(words.reshape(-1, *words.shape[-2:]).float(), token_mask.reshape(-1, token_mask.shape[-1]))
        return q.reshape(*lead, -1)

    def forward(
        self, region_feats: torch.Tensor, words: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """region_feats [B, N, D], words [B, P, T, E], token_mask [B, P, T] -> (r [B, N, d], q [B, P, d])."""
        return self.region(region_feats), self.encode_phrases(words, token_mask)

    def phrase_region_scores(
        self, region_feats: torch.Tensor, words: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        """Cosine of every phrase with every region of its own image: same inputs as forward -> [B, P, N]."""
        r, q = self(region_feats, words, token_mask)
        return torch.einsum("bpd,bnd->bpn", q, r)


# ----------------------------------------------------------------------------- losses


def image_sentence_scores(
    r: torch.Tensor,
    q: torch.Tensor,
    phrase_mask: torch.Tensor,
    region_mask: torch.Tensor,
    scale: torch.Tensor | float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence i vs image j: ``S[i, j] = sum_p scale * max_n <r_jn, q_ip>`` over valid phrases.

    r [B, N, d], q [B, P, d], phrase_mask [B, P], region_mask [B, N] (padded proposals never win
    the max) -> (S [B sentences, B images], region-phrase scores of the paired image [B, P, N]).
    """
    sim = torch.einsum("ipd,jnd->ijpn", q, r)  # [B, B, P, N]
    sim = sim.masked_fill(~region_mask[None, :, None, :], float("-inf"))
    best = sim.amax(-1) * phrase_mask[:, None, :].to(sim.dtype)  # [B, B, P]
    S = scale * best.sum(-1)
    own = torch.diagonal(sim, dim1=0, dim2=1).permute(2, 0, 1)  # [B, P, N]
    return S, own


def nce_loss(
    S: torch.Tensor,
    image_index: torch.Tensor | None = None,
    both_directions: bool = False,
    mask_same_image: bool = False,
) -> torch.Tensor:
    """InfoNCE over the batch's images (official: one direction, sentence -> its image among B).

    S [B, B] (rows sentences, columns images; the pair i is on the diagonal). ``mask_same_image``
    removes other columns/rows showing the same image (false negatives when an image's two
    captions share a batch); ``both_directions`` adds image -> sentence.
    """
    B = S.shape[0]
    target = torch.arange(B, device=S.device)
    if mask_same_image and image_index is not None:
        same = (image_index[:, None] == image_index[None, :]) & ~torch.eye(B, dtype=torch.bool, device=S.device)
        S = S.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(S, target)
    if both_directions:
        loss = 0.5 * (loss + F.cross_entropy(S.t(), target))
    return loss


def distill_neighbourhood(
    scores: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor, k: int = 8
) -> torch.Tensor:
    """The K regions most overlapping the best-scoring region, per phrase (vectorised).

    scores [B, P, N] (region-phrase scores of the paired image), boxes [B, N, 4], region_mask [B, N]
    -> indices [B, P, K] (the best region itself first: its IoU with itself is 1). Ties in IoU go to
    the lower region index. ``k <= 0`` (or k > N) takes all N proposals.
    """
    k = scores.shape[-1] if k <= 0 else min(k, scores.shape[-1])
    s = scores.detach().masked_fill(~region_mask[:, None, :], float("-inf"))
    best = s.argmax(-1)  # [B, P]
    b = boxes.float()
    iou = batched_box_iou(b, b)  # [B, N, N]
    iou_best = torch.gather(iou, 1, best.unsqueeze(-1).expand(-1, -1, iou.shape[-1]))  # [B, P, N]
    iou_best = iou_best.masked_fill(~region_mask[:, None, :], -1.0)
    # stable descending sort: equal IoU -> lower index first (deterministic, like the loop reference)
    order = torch.sort(iou_best, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def distill_neighbourhood_loop(
    scores: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor, k: int = 8
) -> torch.Tensor:
    """Per-phrase Python loop with the same result as :func:`distill_neighbourhood` (the official
    code's structure; kept as the test oracle and the benchmark baseline)."""
    B, P, N = scores.shape
    k = N if k <= 0 else min(k, N)
    out = torch.empty(B, P, k, dtype=torch.long, device=scores.device)
    for b in range(B):
        valid = region_mask[b]
        iou = box_iou(boxes[b].float(), boxes[b].float()).nan_to_num(0.0)
        for p in range(P):
            s = scores[b, p].detach().masked_fill(~valid, float("-inf"))
            best = int(s.argmax())
            row = iou[best].masked_fill(~valid, -1.0)
            out[b, p] = torch.sort(row, descending=True, stable=True).indices[:k]
    return out


# Teacher target forms. "auto" is the official dispatch on the detector's class count.
TEACHER_FORMS = ("auto", "prob_centered", "prob_half", "log_prob")


def teacher_scores(det_logits: torch.Tensor, class_weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Detector probability of the phrase's class(es) for each neighbourhood region.

    det_logits [B, N, C+1] (background included), class_weights [B, P, C+1] (one-hot for the hard
    phrase -> class map, a distribution for the soft matching matrix), idx [B, P, K] -> t [B, P, K]:
    ``t_k = sum_c w_c * softmax(det_logits[r_k])[c]``.
    """
    probs = det_logits.float().softmax(-1)  # [B, N, C+1]
    per_region = torch.einsum("bnc,bpc->bpn", probs, class_weights.float())  # [B, P, N]
    return torch.gather(per_region, 2, idx)


def teacher_targets(
    t: torch.Tensor, form: str, n_classes: int, temperature: float = 1.0, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Teacher distribution over the K regions from class probabilities ``t`` [..., K].

    Official (``form="auto"``): ``softmax(t - mean t)`` for the 545 Open Images v2 classes,
    ``softmax(t / 2)`` for the 80 COCO classes, any other count an error. ``prob_centered`` /
    ``prob_half`` force one of them; ``log_prob`` (improved) is ``softmax(log t / temperature)``,
    a sharp target that follows the detector's ranking. ``valid`` [..., K] drops padded proposals
    (only needed when an image has fewer than K proposals).
    """
    if form == "auto":
        if n_classes == 545:
            form = "prob_centered"
        elif n_classes == 80:
            form = "prob_half"
        else:
            raise ValueError(
                f"loss.teacher_form='auto' follows the official code, which knows only 545 (Open Images v2) or 80 "
                f"(COCO) detector classes; the logits have {n_classes} classes. Set loss.teacher_form to "
                f"'prob_centered' (the 545-class rule), 'prob_half' (the 80-class rule) or 'log_prob'."
            )
    if valid is None:
        valid = torch.ones_like(t, dtype=torch.bool)
    if form == "prob_centered":
        mean = (t * valid).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
        z = t - mean
    elif form == "prob_half":
        z = t / 2.0
    elif form == "log_prob":
        z = t.clamp(min=1e-12).log() / temperature
    else:
        raise ValueError(f"unknown teacher form {form!r}; expected one of {TEACHER_FORMS}")
    return z.masked_fill(~valid, float("-inf")).softmax(-1)


def distill_loss(
    student_scores: torch.Tensor,
    idx: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy between the teacher target and ``softmax(scale * cosine)`` over the K regions.

    student_scores [B, P, N], idx [B, P, K], target [B, P, K], mask [B, P] (distillable phrases)
    -> mean over distillable phrases (0 when there are none).
    """
    z = torch.gather(student_scores, 2, idx) * scale
    if valid is not None:
        z = z.masked_fill(~valid, float("-inf"))
    logp = z.log_softmax(-1)
    ce = -torch.where(target > 0, target * logp, torch.zeros_like(logp)).sum(-1)
    m = mask.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp(min=1.0)


def ramp_weight(step: int, start: float = 0.001, every: int = 500, maximum: float = 3.0) -> float:
    """Official distillation weight ``min(0.001 + floor(step / 500), 3.0)``."""
    return min(start + step // every, maximum)
