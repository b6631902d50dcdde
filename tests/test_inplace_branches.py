"""Low-rank branches accumulated into a frozen linear's output in place (LoRA, SPT's LoRA and adapters):
outputs and gradients equal the out-of-place formulas, and autograd accepts every layout."""
import pytest
import torch
import torch.nn.functional as F

from methods.blocks import dropout as dmod
from methods.blocks.lora import DeltaLinear, LowRank, add_low_rank_
from methods.spt import AdapterBranch, LoRABranch, SPTLinear

D = torch.float64


@pytest.mark.parametrize("cols", [slice(0, 12), slice(4, 8), slice(8, 12)])
def test_add_low_rank_equals_out_of_place_and_passes_gradcheck(cols):
    torch.manual_seed(0)
    w0 = torch.randn(12, 5, dtype=D)
    x = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    z = torch.randn(2, 3, 2, dtype=D, requires_grad=True)
    up = torch.randn(cols.stop - cols.start, 2, dtype=D, requires_grad=True)

    def inplace(x_, z_, up_):
        return add_low_rank_(F.linear(x_.reshape(-1, 5), w0), z_, up_, cols, 0.5)

    def reference(x_, z_, up_):
        y = F.linear(x_.reshape(-1, 5), w0)
        return torch.cat([y[:, :cols.start], y[:, cols] + 0.5 * F.linear(z_, up_).reshape(6, -1), y[:, cols.stop:]], 1)

    assert torch.allclose(inplace(x, z, up), reference(x, z, up))
    g = torch.randn(6, 12, dtype=D)
    for a, r in zip(torch.autograd.grad(inplace(x, z, up), (x, z, up), g),
                    torch.autograd.grad(reference(x, z, up), (x, z, up), g)):
        assert torch.allclose(a, r)
    assert torch.autograd.gradcheck(inplace, (x, z, up))


def test_add_low_rank_on_an_output_without_grad_history():
    """At the first block the frozen linear's input needs no gradient: only the branch gets one."""
    x = torch.randn(4, 6)
    z = torch.randn(4, 2, requires_grad=True)
    up = torch.randn(6, 2, requires_grad=True)
    y = add_low_rank_(F.linear(x, torch.randn(6, 6)), z, up, slice(0, 6))
    y.sum().backward()
    assert torch.allclose(up.grad, z.detach().sum(0).expand(6, 2))


def test_delta_linear_lora_equals_formula_with_dropout(monkeypatch):
    monkeypatch.setattr(dmod, "drop_mask", lambda shape, p, dev: torch.arange(torch.Size(shape).numel()).view(shape) % 3 == 0)
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 24, dtype=D).requires_grad_(False)
    deltas = {t: LowRank(8, 8, 2, alpha=4, dropout=0.25) for t in "qv"}
    for lr in deltas.values():
        lr.to(D).B.data.normal_()
    m = DeltaLinear(base, deltas, {"q": slice(0, 8), "v": slice(16, 24)}).train()
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    keep = (torch.arange(80).view(2, 5, 8) % 3 != 0)
    xd = torch.where(keep, x, 0) / (1 - deltas["q"].dropout.p_effective)
    ref = base(x) + torch.cat([2 * xd @ (deltas["q"].B @ deltas["q"].A).T, torch.zeros(2, 5, 8, dtype=D),
                               2 * xd @ (deltas["v"].B @ deltas["v"].A).T], -1)
    y = m(x)
    assert y.shape == (2, 5, 24) and torch.allclose(y, ref)
    params = [x, *[p for lr in deltas.values() for p in (lr.A, lr.B)]]
    g = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, r)


@pytest.mark.parametrize("variant,dropout", [("lora", 0.0), ("lora", 0.2), ("adapter", 0.0), ("adapter", 0.2)])
def test_spt_linear_branches_and_sparse_delta_pass_gradcheck(monkeypatch, variant, dropout):
    """q and v branches (adapters read and write their slice of the output) plus sparse weight and bias
    deltas on a fused qkv: gradcheck in float64 with a fixed dropout mask, DropPath off."""
    monkeypatch.setattr(dmod, "drop_mask", lambda shape, p, dev: torch.arange(torch.Size(shape).numel()).view(shape) % 4 == 1)
    torch.manual_seed(1)
    dim = 6
    base = torch.nn.Linear(dim, 3 * dim, dtype=D).requires_grad_(False)
    mk = (lambda: LoRABranch(dim, dim, 2, dropout, 0.0)) if variant == "lora" else (lambda: AdapterBranch(dim, 2, dropout, 0.0))
    branches = {"q": mk().to(D), "v": mk().to(D)}
    for br in branches.values():
        for p in br.parameters():
            p.data.normal_()
    src = "input" if variant == "lora" else "output"
    m = SPTLinear(base, torch.tensor([3, 40, 41, 100]), torch.tensor([7, 8]), branches,
                  {"q": slice(0, dim), "v": slice(2 * dim, 3 * dim)}, {"q": src, "v": src}).train()
    with torch.no_grad():
        m.delta.normal_()
        m.bias_delta.normal_()
    x = torch.randn(2, 3, dim, dtype=D, requires_grad=True)
    params = [p for p in m.parameters() if p.requires_grad]

    def reference(x_):
        y = F.linear(x_, m.effective_weight(), m.effective_bias())
        outs = []
        for n in ("q", "v"):
            s = m.slices[n]
            outs.append((s, branches[n](x_ if src == "input" else y[..., s])))
        y = y.clone()
        for s, o in outs:
            y[..., s] = y[..., s] + o
        return y

    y = m(x)
    assert torch.allclose(y, reference(x))
    g = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(m(x), [x, *params], g), torch.autograd.grad(reference(x), [x, *params], g)):
        assert torch.allclose(a, r)
    assert torch.autograd.gradcheck(lambda x_: m(x_), (x,))


@pytest.mark.parametrize("cols", [slice(0, 12), slice(4, 8)])
def test_add_into_equals_slice_assignment_and_passes_gradcheck(cols):
    """The path of deltas without a low-rank form (SNELL's kernels, FacT, VeRA, ...)."""
    from methods.blocks.lora import add_into_

    torch.manual_seed(0)
    w0 = torch.randn(12, 5, dtype=D)
    x = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    d = torch.randn(2, 3, cols.stop - cols.start, dtype=D, requires_grad=True)

    def inplace(x_, d_):
        return add_into_(F.linear(x_.reshape(-1, 5), w0), d_ * 2, cols)

    def reference(x_, d_):
        y = F.linear(x_.reshape(-1, 5), w0)
        y[:, cols] = y[:, cols] + (d_ * 2).reshape(6, -1)
        return y

    assert torch.allclose(inplace(x, d), reference(x, d))
    assert torch.autograd.gradcheck(inplace, (x, d))


@pytest.mark.parametrize("name", ["lora", "spt_lora", "spt_adapter", "snell", "noah"])
def test_branches_under_bf16_autocast(name):
    """The runner trains under bf16 autocast on a GPU: the in-place and fused branch functions must take
    mixed dtypes (bf16 activations, fp32 weights) and give every trained fp32 tensor a finite gradient.
    CPU autocast stands in for CUDA's here."""
    from helpers import build, images
    from test_spt import tiny_loader

    over = {"budget": "4k"} if name.startswith("spt") else {}
    model, m = build(name, **over)
    if m.needs_prepare:
        m.prepare(model, tiny_loader(), torch.nn.CrossEntropyLoss())
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images(4)).float().logsumexp(-1).mean()
    loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained
    for n, p in trained:
        assert p.dtype == torch.float32
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
