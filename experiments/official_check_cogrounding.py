"""Reference-mode check of co-grounding's backbone: the official Darknet (``model/darknet.py`` with
``model/yolov3.cfg``) beside groundkit's ``Darknet53YOLOv3``, both loading one seeded ``.weights`` file that
groundkit writes, on the same letterboxed input (docs/cogrounding.md, "Reference mode checked against the official
code"). The official code is imported from a checkout of its repository given on the command line; nothing of it
is copied here (its ``utils`` package imports OpenCV, which the backbone does not use: a stub stands in when
OpenCV is missing; ``pytorch_pretrained_bert``, imported for the BERT text model: stubs stand in, the LSTM is
used; and ``collections.Iterable``, gone since Python 3.10: an alias is set).

    python experiments/official_check_cogrounding.py OFFICIAL_CHECKOUT WORK_DIR
"""

import os
import sys
import types
from pathlib import Path

import torch

official_dir, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
work.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(2)
try:
    import cv2  # noqa: F401
except ImportError:
    sys.modules["cv2"] = types.ModuleType("cv2")
import collections  # noqa: E402
import collections.abc  # noqa: E402

collections.Iterable = collections.abc.Iterable  # the official utils import it from collections (Python < 3.10)
sys.path.insert(0, str(official_dir))
os.chdir(official_dir)  # the official Darknet opens ./model/yolov3.cfg
from model.darknet import Darknet  # noqa: E402

from groundkit.methods.cogrounding.backbones import Darknet53YOLOv3, save_darknet_weights  # noqa: E402

torch.manual_seed(0)
ours = Darknet53YOLOv3()
with torch.no_grad():  # random BatchNorm statistics and affine terms, so every layer matters
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.normal_(1, 0.1)
            m.bias.normal_(0, 0.1)
weights = save_darknet_weights(ours, work / "seeded.weights")
ours = Darknet53YOLOv3(weights_path=str(weights)).eval()
head = Darknet53YOLOv3(weights_path=str(weights), taps="head").eval()
official = Darknet(config_path="./model/yolov3.cfg")
official.load_weights(str(weights))
official.eval()

x = torch.rand(2, 3, 256, 256)
with torch.no_grad():
    ref = official(ours.normalize(x))  # the official loader normalises before the model
    mine, old = ours(x), head(x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


print("map         shape               official taps: rel. diff   max abs   |  head taps (80/92/104): rel. diff")
for name, r, m, o in zip(("stride 32", "stride 16", "stride 8"), ref, mine, old):
    print(f"{name:10}  {tuple(r.shape)!s:18}  {rel(m, r):.2e}  {float((m - r).abs().max()):.2e}  |  {rel(o, r):.3f}")
print(
    "BatchNorm momenta: official",
    sorted({b.momentum for b in official.modules() if isinstance(b, torch.nn.BatchNorm2d)}),
    "groundkit",
    sorted({b.momentum for b in ours.modules() if isinstance(b, torch.nn.BatchNorm2d)}),
)

# the tokenizer: the official Corpus.tokenize beside WordTokenizer(rules="official"), one vocabulary
from utils.word_utils import Corpus  # noqa: E402

from groundkit.methods.cogrounding.text import WordTokenizer, swap_substrings  # noqa: E402

texts = [
    "The man, on the LEFT.",
    "bright red car at the right",
    "a dog",
    "the woman's bag on the left side of the table next to the man in a white shirt holding a cup.",
    "left-most guy ?!",
    "the man . with a hat",
]
corpus_file = work / "corpus.txt"
corpus_file.write_text("\n".join(texts[:3]) + "\n")
official_corpus = Corpus()
official_corpus.load_file(str(corpus_file))
official_corpus.dictionary.add_word("<eos>")
ours_tok = WordTokenizer(max_len=20, vocab_file=str(corpus_file), rules="official")
agree = 0
for t in texts:
    off = [official_corpus.dictionary[int(i)] for i in official_corpus.tokenize(t.lower(), 20)]
    off = [w for w in off if w != "<pad>"]
    mine_t = [w if w in ours_tok.stoi else "<unk>" for w in ours_tok.tokens(t)]
    agree += off == mine_t
    if off != mine_t:
        print("differs:", t, off, mine_t)
print(f"tokenizer: {agree} of {len(texts)} texts give the same tokens")
flips = ["bright left, right?", "the leftmost cup on the right"]
official_swap = [
    p.replace("right", "*&^special^&*").replace("left", "right").replace("*&^special^&*", "left") for p in flips
]
print("substring swap equal:", [swap_substrings(p) for p in flips] == official_swap)

# the whole image model: the official grounding_model (SL-Att, LSTM) with random weights, saved as the official
# training script saves it, converted by groundkit and run beside it
torch.Tensor.cuda = lambda self, *a, **k: self  # the official generate_coord moves its grid to CUDA
for mod in ("pytorch_pretrained_bert", "pytorch_pretrained_bert.tokenization", "pytorch_pretrained_bert.modeling"):
    sys.modules.setdefault(mod, types.ModuleType(mod))  # imported for the BERT text model, unused with the LSTM
sys.modules["pytorch_pretrained_bert.tokenization"].BertTokenizer = None
sys.modules["pytorch_pretrained_bert.modeling"].BertModel = None
from model.grounding_model_semantic_attn import grounding_model  # noqa: E402

from groundkit.config import load_config  # noqa: E402
from groundkit.methods.cogrounding.config import CoGroundingConfig  # noqa: E402
from groundkit.methods.cogrounding.method import build_model  # noqa: E402
from groundkit.methods.cogrounding.weights import official_to_groundkit, read_corpus, read_official  # noqa: E402

(official_dir / "saved_models").mkdir(exist_ok=True)
save_darknet_weights(ours, official_dir / "saved_models" / "yolov3.weights")  # the official model loads it by name
# a corpus whose first word is <pad>: the official LSTM lengths count the ids that are not 0
(work / "corpus_full.txt").write_text("<pad>\n" + "\n".join(texts) + "\n")
corpus = Corpus()
corpus.load_file(str(work / "corpus_full.txt"))
corpus.dictionary.add_word("<eos>")
torch.manual_seed(1)
off_model = grounding_model(corpus=corpus, emb_size=512, coordmap=True, leaky=False)
with torch.no_grad():
    for m in off_model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.normal_(1, 0.1)
            m.bias.normal_(0, 0.1)
torch.save(
    {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in off_model.state_dict().items()}, "best_loss": 0.5},
    work / "official_model.pth.tar",
)
torch.save(corpus, work / "corpus.pth")
sd, vocab, overrides = official_to_groundkit(
    read_official(work / "official_model.pth.tar"), read_corpus(work / "corpus.pth"), "official_model.pth.tar"
)
(work / "vocab.txt").write_text("\n".join(vocab) + "\n")
cfg = load_config(
    CoGroundingConfig, "reference_refcoco", {**overrides, "model.vocab_file": str(work / "vocab.txt")}, "cogrounding"
)
gk = build_model(cfg)
gk.load_state_dict(sd, strict=True)
off_model.eval()
gk.eval()
x = torch.rand(2, 3, 256, 256)
phrases = ["The man, on the LEFT.", "bright red car at the right"]
off_ids = torch.stack([corpus.tokenize(p.lower(), 20) for p in phrases])
tok = WordTokenizer(max_len=20, vocab_file=str(work / "vocab.txt"), rules="official")
enc = [tok.encode(p) for p in phrases]
with torch.no_grad():
    outbox, sim_score, loc_score, _ = off_model(gk.backbone.normalize(x), off_ids, (off_ids != 0).long())
    res = gk(x, torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc]))
conf = res["conf"].split([3 * g * g for g in gk.grids], 1)
worst = {"box": 0.0, "score": 0.0}
for s, ob in enumerate(outbox):
    B, _, h, w = ob.shape
    ob = ob.view(B, 3, 5, h, w)[:, [2, 1, 0]]  # the official anchors come largest first
    worst["box"] = max(worst["box"], float((ob[:, :, :4] - res["pred"][s][:, :, :4]).abs().max()))
    worst["score"] = max(worst["score"], float((ob[:, :, 4].reshape(B, -1) - conf[s]).abs().max()))
best_off = torch.cat([o.view(o.shape[0], 3, 5, -1)[:, [2, 1, 0], 4].reshape(o.shape[0], -1) for o in outbox], 1)
print(
    f"converted image model ({len(sd)} tensors): head outputs max |diff| {worst['box']:.2e},"
    f" final scores max |diff| {worst['score']:.2e}; best anchor equal: {bool((best_off.argmax(1) == res['conf'].argmax(1)).all())}"
)
