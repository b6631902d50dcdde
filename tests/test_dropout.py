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


# -- dropout fused with a down-projection ------------------------------------------------------------
from methods.blocks import dropout as dmod  # noqa: E402
from methods.blocks.dropout import dropout_linear  # noqa: E402


def _fixed_masks(monkeypatch, seed=0, p=0.3):
    """Replace the random drop mask by a seeded one, so two calls see the same mask."""
    def mask(shape, p_levels, device):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(shape, generator=g) < p_levels / 65536
    monkeypatch.setattr(dmod, "drop_mask", mask)
    return mask


def test_dropout_linear_is_linear_of_dropout(monkeypatch):
    """Outputs and all three gradients equal F.linear(mask·x/(1-p), W, b) with the same mask."""
    mask = _fixed_masks(monkeypatch)
    d = FastDropout(0.3).train()
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    z = dropout_linear(x, w, b, d)
    keep = ~mask(x.shape, d.p_levels, None)
    ref = torch.nn.functional.linear(torch.where(keep, x, 0) / (1 - d.p_effective), w, b)
    assert torch.allclose(z, ref)
    g = torch.randn_like(z)
    grads = torch.autograd.grad(z, (x, w, b), g)
    ref_grads = torch.autograd.grad(ref, (x, w, b), g)
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a, r)
    assert torch.autograd.gradcheck(lambda x_, w_, b_: dropout_linear(x_, w_, b_, d), (x, w, b))


def test_dropout_linear_rate_eval_and_no_bias():
    torch.manual_seed(0)
    d = FastDropout(0.1).train()
    x = torch.rand(300, 64) + 0.5
    eye = torch.eye(64)
    z = dropout_linear(x, eye, None, d)  # identity weight: z is the dropped-out input itself
    kept = z != 0
    assert abs((1 - kept.float().mean().item()) - 0.1) < 4 * (0.1 * 0.9 / x.numel()) ** 0.5
    assert torch.allclose(z[kept], x[kept] / (1 - d.p_effective))
    d.eval()
    w = torch.randn(5, 64)
    assert torch.equal(dropout_linear(x, w, None, d), torch.nn.functional.linear(x, w))
    assert torch.equal(dropout_linear(x, w, None, nn.Identity()), torch.nn.functional.linear(x, w))
