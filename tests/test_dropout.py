"""FastDropout: the inverted-dropout function with p on a 2^-16 grid, identity in eval, exact gradient."""
import pytest
import torch
from torch import nn

from methods.blocks.dropout import FastDropout, dropout


def test_drop_rate_scale_and_gradient():
    torch.manual_seed(0)
    d = FastDropout(0.1).train()
    assert d.p_effective == 6554 / 65536 and abs(d.p_effective - 0.1) < 2 ** -17
    x = torch.rand(400, 1000) + 0.5
    x.requires_grad_(True)
    y = d(x)
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / x.numel()) ** 0.5  # within 4 sigma of 400k Bernoulli draws
    assert torch.allclose(y[kept], x.detach()[kept] / (1 - d.p_effective))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, torch.where(kept, g / (1 - d.p_effective), torch.zeros_like(g)))


def test_masks_independent_across_calls_and_positions():
    torch.manual_seed(1)
    d = FastDropout(0.5).train()
    x = torch.ones(64, 64, 4)  # element counts not divisible by 4 are covered by the next test
    a, b = d(x) != 0, d(x) != 0
    assert not torch.equal(a, b)
    agree = (a == b).float().mean().item()
    assert abs(agree - 0.5) < 0.03  # two independent fair masks agree half the time
    odd = d(torch.ones(3, 5, 7))
    assert odd.shape == (3, 5, 7) and set(odd.unique().tolist()) <= {0.0, 2.0}


def test_eval_and_zero_p_are_identity():
    x = torch.randn(5, 7)
    assert FastDropout(0.3).eval()(x) is x
    assert isinstance(dropout(0.0), nn.Identity)
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)
