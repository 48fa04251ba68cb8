"""The per-method benchmarks of groundkit.bench compare like with like: their baselines compute what the method
computes (here: the wang21 training step with the per-phrase loop neighbourhood, a switch the method lacks)."""

from __future__ import annotations

import torch

from groundkit.bench import wang21 as bench_wang21
from groundkit.methods.wang21 import METHOD, Wang21Dataset
from groundkit.methods.wang21 import method as wang21_method
from groundkit.methods.wang21.model import distill_neighbourhood


def test_wang21_loop_baseline_runs_the_loop_and_gives_the_method_s_loss(monkeypatch):
    calls = []
    loop = bench_wang21.distill_neighbourhood_loop
    monkeypatch.setattr(bench_wang21, "distill_neighbourhood_loop", lambda *a: calls.append(1) or loop(*a))
    torch.manual_seed(0)
    cfg = bench_wang21._cfg()
    cfg.data.word_dim, cfg.data.region_dim = 300, 32
    ds = Wang21Dataset.from_tensors(cfg, "train", bench_wang21.synth_tensors(4, dim=32, n_logits=11), 5)
    model = METHOD.build_model(cfg)
    batch = ds.get_batch(torch.arange(8))
    loss, logs = METHOD.training_step(model, batch, 2000, cfg)
    assert not calls
    loss_loop, logs_loop = bench_wang21.LOOP_METHOD.training_step(model, batch, 2000, cfg)
    assert calls and "distill" in logs
    assert torch.allclose(loss, loss_loop, atol=1e-6) and abs(logs["distill"] - logs_loop["distill"]) < 1e-6
    assert wang21_method.distill_neighbourhood is distill_neighbourhood  # the method is left as it was
