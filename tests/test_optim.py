import math

import pytest
import torch

from groundkit.config import OptimConfig, ParamGroup, SchedConfig
from groundkit.optim import build_optimizer, build_scheduler


def lrs(cfg: SchedConfig, total=10, spe=5, lr=1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sch = build_scheduler(opt, cfg, total, spe)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


def test_schedules():
    assert lrs(SchedConfig(name="constant")) == [1.0] * 10
    assert lrs(SchedConfig(name="step", interval="epoch", step_size=1, gamma=0.95)) == pytest.approx(
        [1.0] * 5 + [0.95] * 5
    )
    warm = lrs(SchedConfig(name="constant", warmup_steps=4))
    assert warm[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    cos = lrs(SchedConfig(name="cosine"))
    assert (
        cos[0] == 1.0
        and cos[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
        and cos == sorted(cos, reverse=True)
    )
    poly = lrs(SchedConfig(name="poly", power=1.0))
    assert poly[3] == pytest.approx(0.7)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("radam", torch.optim.RAdam),
        ("rmsprop", torch.optim.RMSprop),
    ],
)
def test_optimizers_and_param_groups(name, cls):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    cfg = OptimConfig(
        name=name, lr=0.1, weight_decay=0.01, param_groups=[ParamGroup(match="1.", lr_mult=0.1, weight_decay=0.0)]
    )
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, cls)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert opt.param_groups[1]["weight_decay"] == 0.0
