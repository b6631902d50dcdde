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
factors A, B, a dropout seed and the threshold τ (a scalar); ΔW, the sparsity factor and the input-dropout
mask are rebuilt in backward, and the kernel gradient is written out by hand (no autograd graph).
The official code gets the recomputation from ``torch.utils.checkpoint`` (which still stores each
branch's dropped-out input copy); unlike its reentrant checkpoint (SNELL class), ours gives the factors
a gradient even when x does not require grad (the official code's failure on Swin/ConvNeXt). The input
dropout lives inside the function (inverted dropout as ``nn.Dropout``, with ``methods.blocks.dropout``'s
16-bit masks: p on a 2⁻¹⁶ grid, 0.1 → 0.100006; masks drawn from a per-call seed taken from torch's
default generator).

Transient memory (what the CPU step benchmark's peak RSS sees): on CPU, ΔW, the factor, ∂L/∂ΔW and the
per-piece ratios are built one block of d_in rows at a time (``_BLOCK_ELEMS`` = 2¹⁹ entries), so a
768×3072 branch never holds more than one full-size scratch (|ΔW| for τ, forward only; τ is reused in
backward, so backward does no order statistic); τ comes from numpy's in-place partition instead of
``kthvalue`` (which allocates an int64 index buffer twice the matrix); the dropout mask is regenerated and
applied a chunk at a time (never held whole), on the input in place where the buffer is the function's own
(``pre``) and on the input gradient; DropPath
multiplies the fresh branch output in place. Block-wise sums change float summation order only (outputs
equal the one-block form to ~1e-7 relative). With ``pre`` (a frozen LayerNorm or GELU in front of the
linear, ``methods.blocks.fused_mlp``) the function takes that op's input, saves it instead of the op's
output and rebuilds the output in backward; a ``Deferred`` pre-op's backward then runs in place on the
function's own input-gradient buffer.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from methods.blocks.dropout import drop_mask, dropout_

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


def _dropout_keep(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout keep-mask, regenerated from ``seed`` (so it is never stored); the reference for tests,
    ``_drop_mask`` is its complement."""
    return ~_drop_mask(x, p, seed)


def _seeded(device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _drop_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Where dropout drops, from ``seed``: ``methods.blocks.dropout``'s 16-bit masks (p on a 2⁻¹⁶ grid,
    ``p_effective``); the reference for tests (the function applies it chunk-wise, ``_dropout_``)."""
    return drop_mask(x.shape, round(p * (1 << 16)), x.device, generator=_seeded(x.device, seed))


def _dropout_(t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``t`` ← t ⊙ ¬mask / (1 − p_eff) in place with ``_drop_mask``'s mask for ``seed``, a chunk at a time."""
    return dropout_(t, round(p * (1 << 16)), generator=_seeded(t.device, seed))


_BLOCK_ELEMS = 1 << 19  # ΔW is handled in blocks of d_in rows of at most this many entries (2 MiB in fp32)


def _row_blocks(x: torch.Tensor, d_in: int, d_out: int) -> list:
    """Row blocks of ΔW: several on CPU in fp32 (bounded temporaries), one elsewhere (CUDA under autocast:
    a single ``x @ ΔW`` as before; the caching allocator reuses the buffers)."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return [slice(0, d_in)]
    step = max(1, _BLOCK_ELEMS // max(1, d_out))
    return [slice(i, min(i + step, d_in)) for i in range(0, d_in, step)]


def _delta_rows(A: torch.Tensor, B: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of ΔW with ``kernel_delta``'s arithmetic (each piece scaled, then summed)."""
    w = None
    for p, a in enumerate(ALPHAS):
        term = torch.cdist(A[p, rows], B[p], p=2).mul_(a)
        if w is None:
            w = term
        else:
            w.add_(term)
            del term
    return w


def _threshold(A: torch.Tensor, B: torch.Tensor, blocks: list, sparsity: float, form: str):
    """τ of ``sparsify_threshold`` from one scratch |ΔW| buffer, without ``kthvalue``'s int64 index
    buffer (twice the matrix) on CPU: numpy's in-place partition gives the same order statistic."""
    mag = torch.empty(A.shape[1], B.shape[1], dtype=A.dtype, device=A.device)
    for rows in blocks:
        mag[rows] = _delta_rows(A, B, rows).abs_()
    flat = mag.reshape(-1)
    n = flat.numel()
    k = int(math.floor(sparsity * (n - 1))) + 1 if form == "code" else min(n, max(1, int(math.ceil(sparsity * n))))
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        a = flat.numpy()
        a.partition(k - 1)
        return torch.tensor(a[k - 1], dtype=flat.dtype)
    return flat.kthvalue(k).values


def _factor(w: torch.Tensor, tau, form: str) -> torch.Tensor:
    """F (stop-gradient magnitude factor) for threshold τ; a new tensor, ``w`` untouched."""
    mag = w.abs()
    if form == "code":
        return mag.mul_(mag > tau)
    return mag.sub_(tau).clamp_min_(0)


class KernelDeltaFn(torch.autograd.Function):
    """y = dropout_p(pre(x)) · ΔW^s(A, B), ``pre`` optional (a frozen LayerNorm / GELU, see
    ``methods.blocks.fused_mlp``). Saves only x, A, B, a dropout seed and the threshold τ (a scalar):
    ΔW, the sparsity factor, the dropout mask and pre(x) are rebuilt in backward, and the kernel's gradient
    is written out by hand (∂/∂A_p[i] = α_p Σ_j R_ij (A_p[i] − B_p[j]), R = G/D_p, G = ∂L/∂ΔW ⊙ F), so
    backward needs no autograd graph (but pre's). Temporaries are kept small: on CPU, ΔW, F, G and R are
    only ever built a block of rows at a time (``_row_blocks``; forward needs one full |ΔW| scratch for
    the order statistic τ, backward reuses τ from forward), the dropout mask is regenerated from the seed
    and applied a chunk at a time (never held whole), and the dropped-out pre(x) is written in place. Distances of exactly 0 get zero gradient (as cdist)."""

    @staticmethod
    def forward(ctx, x, A, B, sparsity: float, form: str, p: float, seed: int, pre=None):
        with torch.no_grad():
            d_in, d_out = A.shape[1], B.shape[1]
            blocks = _row_blocks(x, d_in, d_out)
            tau = _threshold(A, B, blocks, sparsity, form) if sparsity > 0 else None
            h = pre(x).contiguous() if pre is not None else x
            if p > 0:  # the dropped-out input, in place where the buffer is ours (pre(x)), else in a copy
                h = _dropout_(h if pre is not None else h.clone(memory_format=torch.contiguous_format), p, seed)
            h2 = h.reshape(-1, d_in)
            # y is a fresh tensor, not a view (DropPath multiplies it in place); blocks accumulate into it
            y = torch.empty(*h.shape[:-1], d_out, dtype=h.dtype, device=h.device) if len(blocks) > 1 else None
            for j, rows in enumerate(blocks):
                w = _delta_rows(A, B, rows)
                if tau is not None:
                    w.mul_(_factor(w, tau, form))
                w = w.to(h.dtype)
                if y is None:
                    y = h @ w  # one block (CUDA / autocast): a single product, as before
                elif j == 0:
                    torch.mm(h2[:, rows], w, out=y.view(-1, d_out))
                else:
                    y.view(-1, d_out).addmm_(h2[:, rows], w)
                del w
        ctx.save_for_backward(x, A, B)
        ctx.sparsity, ctx.form, ctx.p, ctx.seed, ctx.tau, ctx.pre = sparsity, form, p, seed, tau, pre
        return y

    @staticmethod
    def backward(ctx, gy):
        x, A, B = ctx.saved_tensors
        form, p, tau, pre = ctx.form, ctx.p, ctx.tau, ctx.pre
        need_x = ctx.needs_input_grad[0]
        x_leaf = pre_out = None
        # a Deferred pre-op (methods.blocks.fused_mlp) has its own backward: pre(x) is then rebuilt without a
        # graph and freed before that backward runs; any other pre keeps a graph to pull the gradient back
        pre_bwd = getattr(getattr(pre, "__self__", None), "run_backward_", None)
        if pre is not None and need_x and pre_bwd is None:
            x_leaf = x.detach().requires_grad_(True)
            with torch.enable_grad():
                pre_out = pre(x_leaf)
            h, own = pre_out.detach(), False  # pre's graph may need its output: not ours to overwrite
        elif pre is not None:
            with torch.no_grad():
                h, own = pre(x).contiguous(), True
        else:
            h, own = x, False
        with torch.no_grad():
            d_in, d_out = A.shape[1], B.shape[1]
            if p > 0:  # the dropped-out input, as in forward
                h = _dropout_(h if own else h.clone(memory_format=torch.contiguous_format), p, ctx.seed)
            h2, g2 = h.reshape(-1, d_in), gy.reshape(-1, d_out)
            gx2 = torch.empty(h2.shape[0], d_in, dtype=gy.dtype, device=gy.device) if need_x else None
            ga, gb = torch.zeros_like(A), torch.zeros_like(B)
            for rows in _row_blocks(x, d_in, d_out):
                w = _delta_rows(A, B, rows)
                g = h2[:, rows].t().to(A.dtype) @ g2.to(A.dtype)  # ∂L/∂ΔW, these rows
                if tau is not None:
                    f = _factor(w, tau, form)
                    g.mul_(f)
                    if need_x:
                        w.mul_(f)
                    del f
                if need_x:
                    gx2[:, rows] = g2 @ w.t().to(g2.dtype)
                del w
                for i, a in enumerate(ALPHAS):
                    d = torch.cdist(A[i, rows], B[i], p=2)
                    zero = d == 0
                    r = torch.div(g, d, out=d).masked_fill_(zero, 0).mul_(a)  # R = G / D_p, in d's buffer
                    del zero
                    ga[i, rows] = r.sum(1, keepdim=True) * A[i, rows] - r @ B[i]
                    gb[i] += r.sum(0).unsqueeze(1) * B[i] - r.t() @ A[i, rows]
                    del r, d
                del g
            del h, h2
            gx = None
            if need_x:
                gx = gx2.reshape(*gy.shape[:-1], d_in)
                if p > 0:  # the same mask again (same seed), and the same 1/(1-p) scale
                    gx = _dropout_(gx, p, ctx.seed)
                if pre_bwd is not None:  # in place: gx is our own buffer
                    gx = pre_bwd(x, gx.to(x.dtype).contiguous())
                gx = gx.to(pre_out.dtype if pre_out is not None else x.dtype)
        if pre_out is not None and gx is not None:  # through the pre-op (LayerNorm / GELU backward)
            gx = torch.autograd.grad(pre_out, x_leaf, gx)[0]
        return gx, ga, gb, None, None, None, None, None


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
        return self._drop_path_(y)

    def _drop_path_(self, y: torch.Tensor) -> torch.Tensor:
        """timm's DropPath (same draws, same values), applied in place on the fresh branch output."""
        dp = self.drop_path
        prob = getattr(dp, "drop_prob", 0.0)
        if not self.training or not prob or type(dp).__name__ != "DropPath":
            return dp(y)
        keep = 1 - prob
        mask = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep)
        if keep > 0 and getattr(dp, "scale_by_keep", True):
            mask.div_(keep)
        return y.mul_(mask)

    def effective_delta(self) -> torch.Tensor:
        """ΔW^s in the official d_in × d_out orientation (no graph)."""
        with torch.no_grad():
            return sparse_delta(kernel_delta(self.A, self.B), self.sparsity, self.form)

    def delta_weight(self) -> torch.Tensor:
        return self.effective_delta().t()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, sparsity={self.sparsity}, form={self.form}, dropout={self.p}"
