"""Low-rank linear deltas (LoRA and relatives) on slices of a frozen linear's output."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from methods.blocks.dropout import dropout as make_dropout, dropout_linear
from methods.blocks.merge import WrapsLinear


def qkv_slices(dim: int, targets) -> dict[str, slice]:
    """Output-row slices of a fused qkv linear for the chosen targets among q, k, v."""
    order = {"q": 0, "k": 1, "v": 2}
    bad = [t for t in targets if t not in order]
    if bad:
        raise ValueError(f"unknown qkv target(s) {bad}; choose among q, k, v")
    return {t: slice(order[t] * dim, (order[t] + 1) * dim) for t in targets}


class _AddLowRank(torch.autograd.Function):
    """y[..., a:b] += alpha · z Wᵀ in place (one GEMM accumulating into y, no N×d temporary).

    y must not be saved by the op that made it (true for a linear's output); its gradient passes through
    unchanged, and z, W get theirs from the slice."""

    @staticmethod
    def forward(ctx, y, z, weight, start, stop, alpha):
        y2 = y.view(-1, y.shape[-1])
        z2 = z.reshape(-1, z.shape[-1])
        y2[:, start:stop].addmm_(z2.to(y.dtype), weight.t().to(y.dtype), alpha=alpha)
        ctx.mark_dirty(y)
        ctx.save_for_backward(z, weight)
        ctx.cols, ctx.alpha = (start, stop), alpha
        return y

    @staticmethod
    def backward(ctx, g):
        z, weight = ctx.saved_tensors
        start, stop = ctx.cols
        gs = g.reshape(-1, g.shape[-1])[:, start:stop]
        gz = gw = None
        if ctx.needs_input_grad[1]:
            gz = (gs @ weight.to(gs.dtype)).mul_(ctx.alpha).view(z.shape).to(z.dtype)
        if ctx.needs_input_grad[2]:
            gw = (gs.t() @ z.reshape(-1, z.shape[-1]).to(gs.dtype)).mul_(ctx.alpha).to(weight.dtype)
        return g, gz, gw, None, None, None


def add_low_rank_(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, cols: slice, alpha: float = 1.0):
    """``y[:, cols] += alpha · F.linear(z, weight)`` on the flat rows of ``y``, in place; returns the result.

    ``y``: a linear's tokens × out output that nothing saved for backward, best not a view (a view's
    in-place update makes autograd copy its gradient); ``z``: (..., r) with as many rows; ``weight``: (|cols|, r)."""
    span = _contiguous_span(y, cols)
    if span is None:  # a strided slice or output: add the product out of place
        return add_into_(y, alpha * F.linear(z, weight), cols)
    return _AddLowRank.apply(y, z, weight, *span, float(alpha))


def _contiguous_span(y: torch.Tensor, cols: slice):
    """(start, stop) when ``y`` can take an in-place update of ``y[:, cols]`` (contiguous y, unit-step slice)."""
    start, stop, step = cols.indices(y.shape[-1])
    return (start, stop) if step == 1 and y.is_contiguous() else None


class _AddInto(torch.autograd.Function):
    """y[:, a:b] += d in place; d's gradient is a view of y's (no copy, unlike a slice assignment, whose
    backward clones the whole output gradient twice)."""

    @staticmethod
    def forward(ctx, y, d, start, stop):
        y.view(-1, y.shape[-1])[:, start:stop].add_(d.reshape(-1, stop - start).to(y.dtype))
        ctx.mark_dirty(y)
        ctx.cols, ctx.d_shape, ctx.d_dtype = (start, stop), d.shape, d.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        start, stop = ctx.cols
        gd = g.reshape(-1, g.shape[-1])[:, start:stop].reshape(ctx.d_shape).to(ctx.d_dtype)
        return g, gd, None, None


def add_into_(y: torch.Tensor, d: torch.Tensor, cols: slice) -> torch.Tensor:
    """``y[:, cols] += d`` on the flat rows of ``y`` (same conditions as ``add_low_rank_``); returns the result."""
    span = _contiguous_span(y, cols)
    if span is None:
        out = y.clone()
        out[..., cols] += d.reshape(*out[..., cols].shape).to(y.dtype)
        return out
    return _AddInto.apply(y, d, *span)


class LowRank(nn.Module):
    """ΔW = scale · B A with A: r×in (kaiming-uniform a=√5), B: out×r (zeros): ΔW = 0 at init.

    The delta of input x is scale · B · DP(A · Dropout(x)) (``dropout`` on the input, DropPath ``drop_path``
    per sample; DropPath on the r-wide intermediate is DropPath on the output: it scales whole samples).
    ``add_to`` accumulates it into a linear's output in place."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: Optional[float] = None,
                 dropout: float = 0.0, device=None, drop_path: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1 (got {rank})")
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.dropout = make_dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """DP(A · Dropout(x)), the r-wide intermediate."""
        return self.drop_path(dropout_linear(x, self.A, None, self.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.down(x), self.B) * self.scale

    def add_to(self, y: torch.Tensor, x: torch.Tensor, cols: slice) -> torch.Tensor:
        """y[..., cols] + delta(x), written into ``y`` (see ``add_low_rank_``)."""
        return add_low_rank_(y, self.down(x), self.B, cols, self.scale)

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scale


class DeltaLinear(WrapsLinear, nn.Module):
    """A frozen ``base`` linear plus deltas, each added to a slice of the output rows.

    ``deltas`` maps a name to a module with ``forward(x)`` (the delta output for its slice) and
    ``delta_weight()`` (the equivalent weight, rows of that slice), so ``merged()`` is exact.
    """

    def __init__(self, base: nn.Linear, deltas: Mapping[str, nn.Module], slices: Mapping[str, slice]):
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict(dict(deltas))
        self.slices = dict(slices)
        self.in_features, self.out_features = base.in_features, base.out_features


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x.reshape(-1, x.shape[-1]))  # tokens × out: deltas add into it in place
        for name, delta in self.deltas.items():
            s = self.slices[name]
            if hasattr(delta, "add_to"):
                y = delta.add_to(y, x, s)
            else:
                y = add_into_(y, delta(x), s)
        return y.view(*x.shape[:-1], y.shape[-1])

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = self.base.weight
            for name, delta in self.deltas.items():
                w[self.slices[name]] += delta.delta_weight().to(w.dtype)
        return self.base
