import pytest
import torch
from omegaconf import OmegaConf

from bench.engine import protocol_splits
from bench.optim import build_scheduler, default_param_groups


def test_protocols():
    assert protocol_splits("last") == ("trainval", None)
    assert protocol_splits("best_val") == ("train", "val")
    assert protocol_splits("best_test") == ("trainval", "test")
    with pytest.raises(ValueError, match="eval.select=oops"):
        protocol_splits("oops")


def test_schedule_is_per_iteration_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    cfg = OmegaConf.create({"epochs": 10, "warmup_epochs": 2, "lr": 1e-3, "min_lr": 1e-5, "warmup_lr": 1e-6})
    sched = build_scheduler(opt, cfg, steps_per_epoch=16)
    lrs = []
    for step in range(1, 161):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step_update(step)
    assert lrs[0] == pytest.approx(1e-6)  # first iteration at warmup_lr, no epoch-level off-by-one
    assert lrs[1] > lrs[0] and lrs[16] > lrs[15]  # rises within the first epoch, per iteration
    assert lrs[32] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)  # peak right after warm-up
    assert lrs[-1] < 2e-5
    assert all(b <= a for a, b in zip(lrs[32:], lrs[33:]))  # continuous cosine decay after warm-up


def test_weight_decay_groups():
    m = torch.nn.Linear(3, 2)
    g_all = default_param_groups(m, 0.1, no_decay_1d=False)
    assert len(g_all) == 1 and g_all[0]["weight_decay"] == 0.1
    g = default_param_groups(m, 0.1, no_decay_1d=True)
    assert [len(x["params"]) for x in g] == [1, 1] and g[1]["weight_decay"] == 0.0
