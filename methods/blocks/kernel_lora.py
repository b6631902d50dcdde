"""Kernelised low-rank deltas with competition-based sparsification (SNELL's building block).

ΔW (d_in × d_out, the official orientation, applied as y += x·ΔW) is a piecewise-linear kernel of two
pairs of low-dimensional factors:

    ΔW_ij = α₁·‖A₁[i] − B₁[j]‖₂ + α₂·‖A₂[i] − B₂[j]‖₂,   α = (+0.1, −0.1) fixed,

with A_p ∈ R^{d_in × r/2}, B_p ∈ R^{d_out × r/2} (``A`` and ``B`` hold both pieces), so A and B together
have r·(d_in + d_out) parameters, the same as LoRA-r, while ΔW is generically full-rank.

Sparsification (official code form, ``form='code'``): with s = ``sparsity`` and τ the s-quantile of |ΔW|
(torch.quantile's linear interpolation), ΔW^s = ΔW ⊙ stopgrad(|ΔW| ⊙ 1[|ΔW| > τ]). We compute τ with
``kthvalue``: for distinct magnitudes, "> quantile(s)" keeps exactly the entries above the
(⌊s·(mn−1)⌋+1)-th smallest one, whatever the interpolation weight, so the kept set is identical to the
official one and needs no sort of the whole matrix (``torch.quantile`` also refuses inputs over 2²⁴
entries). ``form='paper'`` uses the paper's eq. 5, ΔW ⊙ stopgrad(max(|ΔW| − τ, 0)) with τ the ⌈s·mn⌉-th smallest
magnitude (the paper's definition; the stop-gradient on the factor is kept as in the code form). s = 0 is plain
kernelised LoRA (the official ``KLoRA`` class: ΔW used as is, no magnitude factor).

Memory: ``KernelDeltaFn`` is a custom autograd function that saves only the branch input x, the
factors A, B and a dropout seed; ΔW, the sparsity factor and the input-dropout mask are rebuilt in
backward, and the kernel gradient is written out by hand (no autograd graph, a few d_in×d_out buffers).
The official code gets the recomputation from ``torch.utils.checkpoint`` (which still stores each
branch's dropped-out input copy); unlike its reentrant checkpoint (SNELL class), ours gives the factors
a gradient even when x does not require grad (the official code's failure on Swin/ConvNeXt). The input
dropout lives inside the function (same distribution as ``nn.Dropout``: zero with probability p, scale
1/(1−p); masks drawn from a per-call seed taken from torch's default generator).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

ALPHAS = (0.1, -0.1)
FORMS = ("code", "paper")


def kernel_delta(A: torch.Tensor, B: torch.Tensor, alphas=ALPHAS) -> torch.Tensor:
    """ΔW = Σ_p α_p · cdist(A_p, B_p): A (P, d_in, r/2), B (P, d_out, r/2) → (d_in, d_out)."""
    w = None
    for p, a in enumerate(alphas):
        term = torch.cdist(A[p], B[p], p=2) * a
        w = term if w is None else w + term
    return w


def sparsify_threshold(mag: torch.Tensor, sparsity: float, form: str = "code") -> torch.Tensor:
    """τ as an order statistic of |ΔW|.

    code: entries > τ are exactly those the official ``> torch.quantile(|ΔW|, s)`` rule keeps (the
    (⌊s·(mn−1)⌋+1)-th smallest magnitude); paper: Δw_s = the ⌈s·mn⌉-th smallest magnitude (eq. 5).
    """
    flat = mag.reshape(-1)
    n = flat.numel()
    if form == "code":
        k = int(math.floor(sparsity * (n - 1))) + 1
    else:
        k = min(n, max(1, int(math.ceil(sparsity * n))))
    return flat.kthvalue(k).values


def sparse_delta(w: torch.Tensor, sparsity: float, form: str = "code") -> torch.Tensor:
    """ΔW^s (see module docstring); ``w`` may carry a graph, the magnitude factor never does."""
    if sparsity <= 0:
        return w
    mag = w.detach().abs()
    tau = sparsify_threshold(mag, sparsity, form)
    if form == "code":
        factor = mag * (mag > tau)
    else:  # paper eq. 5
        factor = (mag - tau).clamp_min(0)
    return w * factor


def _magnitude_factor(w: torch.Tensor, sparsity: float, form: str) -> torch.Tensor:
    """stopgrad factor F with ΔW^s = ΔW ⊙ F (a new tensor; ``w`` is left untouched)."""
    mag = w.abs()
    tau = sparsify_threshold(mag, sparsity, form)
    if form == "code":
        return mag.mul_(mag > tau)
    return mag.sub_(tau).clamp_min_(0)


def _dropout_keep(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout keep-mask, regenerated from ``seed`` (so it is never stored)."""
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    return torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float32) >= p


class KernelDeltaFn(torch.autograd.Function):
    """y = dropout_p(x) · ΔW^s(A, B). Saves only x, A, B (and a seed): ΔW, the sparsity factor and the
    dropout mask are rebuilt in backward, and the kernel's gradient is written out by hand
    (∂/∂A_p[i] = α_p Σ_j R_ij (A_p[i] − B_p[j]), R = G/D_p, G = ∂L/∂ΔW ⊙ F), so backward needs a few
    d_in×d_out buffers and no autograd graph. Distances of exactly 0 get zero gradient (as cdist)."""

    @staticmethod
    def forward(x, A, B, sparsity: float, form: str, p: float, seed: int, pre=None):
        with torch.no_grad():
            if pre is not None:  # the branch input is pre(x); only x is saved, pre(x) is rebuilt in backward
                x = pre(x)
            w = kernel_delta(A, B)
            if sparsity > 0:
                w.mul_(_magnitude_factor(w, sparsity, form))
            if p > 0:
                x = x * _dropout_keep(x, p, seed).to(x.dtype) / (1 - p)
            y = x @ w.to(x.dtype)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, A, B, sparsity, form, p, seed = inputs[:7]
        ctx.save_for_backward(x, A, B)
        ctx.sparsity, ctx.form, ctx.p, ctx.seed = sparsity, form, p, seed
        ctx.pre, ctx.n_inputs = (inputs[7] if len(inputs) > 7 else None), len(inputs)

    @staticmethod
    def backward(ctx, gy):
        x, A, B = ctx.saved_tensors
        s, form, p = ctx.sparsity, ctx.form, ctx.p
        x_leaf = pre_out = None
        if ctx.pre is not None:  # rebuild the branch input pre(x); keep its graph only to pull gx back to x
            if ctx.needs_input_grad[0]:
                x_leaf = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    pre_out = ctx.pre(x_leaf)
                x = pre_out.detach()
            else:
                with torch.no_grad():
                    x = ctx.pre(x)
        with torch.no_grad():
            dists = [torch.cdist(A[i], B[i], p=2) for i in range(len(ALPHAS))]
            w = dists[0] * ALPHAS[0]
            for a, d in zip(ALPHAS[1:], dists[1:]):
                w.add_(d, alpha=a)
            factor = _magnitude_factor(w, s, form) if s > 0 else None
            keep = _dropout_keep(x, p, ctx.seed).to(x.dtype) / (1 - p) if p > 0 else None
            gx = None
            if ctx.needs_input_grad[0]:
                if factor is not None:
                    w.mul_(factor)
                gx = gy @ w.t().to(gy.dtype)
                if keep is not None:
                    gx = gx.mul_(keep.to(gx.dtype))
                gx = gx.to(x.dtype)
            del w
            xd = x * keep if keep is not None else x
            g = xd.reshape(-1, xd.shape[-1]).t().to(A.dtype) @ gy.reshape(-1, gy.shape[-1]).to(A.dtype)
            del xd, keep
            if factor is not None:
                g.mul_(factor)
                del factor
            ga, gb = torch.empty_like(A), torch.empty_like(B)
            for i, (a, d) in enumerate(zip(ALPHAS, dists)):
                r = torch.div(g, d)
                r.masked_fill_(d == 0, 0).mul_(a)
                ga[i] = r.sum(1, keepdim=True) * A[i] - r @ B[i]
                gb[i] = r.sum(0).unsqueeze(1) * B[i] - r.t() @ A[i]
                del r
        if pre_out is not None and gx is not None:  # through the pre-op (LayerNorm / GELU backward)
            gx = torch.autograd.grad(pre_out, x_leaf, gx)[0]
        return (gx, ga, gb) + (None,) * (ctx.n_inputs - 3)


class KernelDelta(nn.Module):
    """One SNELL branch: drop_path(dropout(x) · ΔW^s) for a d_in → d_out linear.

    ``recompute=False`` is the paper's "storing ΔW" ablation (plain autograd through the kernel; same
    values and gradients, more memory).

    Init: kaiming-uniform(a=√5) on the 3-D factor tensors as the official code (PyTorch's fan-in of a
    (2, d, r/2) tensor is d·r/2, so bound = 1/√(d·r/2)). ``delta_weight()`` returns (ΔW^s)ᵀ in the
    ``nn.Linear`` orientation (out × in) so ``DeltaLinear.merged()`` folds it exactly (eval mode).
    """

    def __init__(self, d_in: int, d_out: int, rank: int, sparsity: float = 0.0, form: str = "code",
                 dropout: float = 0.0, drop_path: float = 0.0, recompute: bool = True, device=None):
        super().__init__()
        self.recompute = bool(recompute)
        if rank < 2 or rank % 2:
            raise ValueError(f"method.rank must be an even integer >= 2 (got {rank}): each of the 2 kernel pieces uses rank/2")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"method.sparsity must be in [0, 1) (got {sparsity}): the fraction of ΔW entries zeroed")
        if form not in FORMS:
            raise ValueError(f"method.sparse_form must be one of {FORMS} (got '{form}')")
        from timm.layers import DropPath

        self.sparsity, self.form, self.rank = float(sparsity), form, rank
        self.A = nn.Parameter(torch.empty(len(ALPHAS), d_in, rank // 2, device=device))
        self.B = nn.Parameter(torch.empty(len(ALPHAS), d_out, rank // 2, device=device))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"method.dropout must be in [0, 1) (got {dropout})")
        self.p = float(dropout)  # input dropout, applied inside KernelDeltaFn (mask regenerated, never stored)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, pre=None) -> torch.Tensor:
        """drop_path(dropout(pre(x)) · ΔW^s); ``pre`` (a deterministic function of x, e.g. the frozen
        LayerNorm or the GELU in front of this linear) is applied inside ``KernelDeltaFn``, which then
        saves x instead of pre(x) and rebuilds pre(x) in backward (``methods.blocks.fused_mlp``)."""
        p = self.p if self.training else 0.0
        if not self.recompute:  # ablation "SNELL storing ΔW": plain autograd, ΔW kept for backward
            x = pre(x) if pre is not None else x
            x = nn.functional.dropout(x, p, training=p > 0)
            return self.drop_path(x @ sparse_delta(kernel_delta(self.A, self.B), self.sparsity, self.form).to(x.dtype))
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        if pre is None:
            y = KernelDeltaFn.apply(x, self.A, self.B, self.sparsity, self.form, p, seed)
        else:
            y = KernelDeltaFn.apply(x, self.A, self.B, self.sparsity, self.form, p, seed, pre)
        return self.drop_path(y)

    def effective_delta(self) -> torch.Tensor:
        """ΔW^s in the official d_in × d_out orientation (no graph)."""
        with torch.no_grad():
            return sparse_delta(kernel_delta(self.A, self.B), self.sparsity, self.form)

    def delta_weight(self) -> torch.Tensor:
        return self.effective_delta().t()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sparsity={self.sparsity}, form={self.form}, dropout={self.p}"
