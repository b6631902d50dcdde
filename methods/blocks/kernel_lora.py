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

Memory: ``KernelDeltaFn`` is a custom autograd function that saves only the branch input x and the
factors A, B; ΔW (and the cdist graph) is rebuilt in backward. This is what the official code gets from
``torch.utils.checkpoint``; unlike its reentrant checkpoint (SNELL class), it gives the factors a
gradient even when x does not require grad (the official code's failure on Swin/ConvNeXt).
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


class KernelDeltaFn(torch.autograd.Function):
    """y = x · ΔW^s(A, B) with ΔW rebuilt in backward (never stored for autograd)."""

    @staticmethod
    def forward(ctx, x, A, B, sparsity: float, form: str):
        with torch.no_grad():
            w = sparse_delta(kernel_delta(A, B), sparsity, form)
            y = x @ w.to(x.dtype)
        ctx.save_for_backward(x, A, B)
        ctx.sparsity, ctx.form = sparsity, form
        return y

    @staticmethod
    def backward(ctx, gy):
        x, A, B = ctx.saved_tensors
        with torch.enable_grad():
            a, b = A.detach().requires_grad_(True), B.detach().requires_grad_(True)
            w = sparse_delta(kernel_delta(a, b), ctx.sparsity, ctx.form)
            gw = x.reshape(-1, x.shape[-1]).t().to(w.dtype) @ gy.reshape(-1, gy.shape[-1]).to(w.dtype)
            ga, gb = torch.autograd.grad(w, (a, b), gw)
        gx = (gy @ w.detach().t().to(gy.dtype)) if ctx.needs_input_grad[0] else None
        return gx, ga, gb, None, None


class KernelDelta(nn.Module):
    """One SNELL branch: drop_path(dropout(x) · ΔW^s) for a d_in → d_out linear.

    Init: kaiming-uniform(a=√5) on the 3-D factor tensors as the official code (PyTorch's fan-in of a
    (2, d, r/2) tensor is d·r/2, so bound = 1/√(d·r/2)). ``delta_weight()`` returns (ΔW^s)ᵀ in the
    ``nn.Linear`` orientation (out × in) so ``DeltaLinear.merged()`` folds it exactly (eval mode).
    """

    def __init__(self, d_in: int, d_out: int, rank: int, sparsity: float = 0.0, form: str = "code",
                 dropout: float = 0.0, drop_path: float = 0.0, device=None):
        super().__init__()
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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = KernelDeltaFn.apply(self.dropout(x), self.A, self.B, self.sparsity, self.form)
        return self.drop_path(y)

    def effective_delta(self) -> torch.Tensor:
        """ΔW^s in the official d_in × d_out orientation (no graph)."""
        with torch.no_grad():
            return sparse_delta(kernel_delta(self.A, self.B), self.sparsity, self.form)

    def delta_weight(self) -> torch.Tensor:
        return self.effective_delta().t()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sparsity={self.sparsity}, form={self.form}"
