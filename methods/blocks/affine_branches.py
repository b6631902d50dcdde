"""Linear (affine) low-rank branches around a frozen linear that fold exactly into its weights.

Used by RepAdapter (an affine adapter on a linear's *input*) and Hydra (parallel and sequential
branches on a linear's input and output). Every branch is ``f(x) = s · up(drop(down(x)))`` with no
non-linearity, so in eval mode it is the affine map ``x ↦ W x + b`` given by ``affine()``; the wrappers'
``merged()`` fold it into the wrapped ``nn.Linear`` (exact up to float rounding).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.blocks.merge import WrapsLinear, write_bias_


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's QuickGELU, x·σ(1.702x) (used by Convpass and NOAH's adapter)."""
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


class AffineBottleneck(nn.Module):
    """f(x) = s · up(drop(down(x))): down Linear(in→r, bias), up (r→out, bias) optionally grouped.

    ``groups > 1`` makes ``up`` a grouped 1×1 convolution (RepAdapter's ``conv_B``): the r inputs and
    the ``out`` outputs are split into ``groups`` contiguous groups, output group g reads input group g
    only. Its weight is stored as (out, r/groups) like ``Conv1d(r, out, 1, groups).weight[..., 0]``.
    Init: down xavier-uniform (``down_init='xavier'``) or PyTorch's default, zero down bias; up weight
    and bias zero, so f = 0 at init while down has a non-zero init (never both factors zero).
    """

    def __init__(self, in_features: int, rank: int, out_features: Optional[int] = None, groups: int = 1,
                 scale: float = 1.0, dropout: float = 0.0, down_init: str = "xavier", device=None):
        super().__init__()
        out_features = out_features or in_features
        if rank < 1:
            raise ValueError(f"adapter rank/hidden dim must be >= 1 (got {rank})")
        if rank % groups or out_features % groups:
            raise ValueError(f"groups={groups} must divide the hidden dim ({rank}) and the output dim ({out_features})")
        self.in_features, self.out_features, self.rank, self.groups = in_features, out_features, rank, groups
        self.scale = float(scale)
        self.down = nn.Linear(in_features, rank, bias=True, device=device)
        self.up_weight = nn.Parameter(torch.zeros(out_features, rank // groups, device=device))
        self.up_bias = nn.Parameter(torch.zeros(out_features, device=device))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.down.weight.device.type != "meta":
            if down_init == "xavier":
                nn.init.xavier_uniform_(self.down.weight)
            elif down_init != "default":
                raise ValueError(f"unknown down_init '{down_init}'; choose xavier or default")
            nn.init.zeros_(self.down.bias)

    def up_dense(self) -> torch.Tensor:
        """The up-projection as a dense (out, r) matrix (block-diagonal when grouped)."""
        if self.groups == 1:
            return self.up_weight
        og, ig = self.out_features // self.groups, self.rank // self.groups
        blocks = [self.up_weight[g * og:(g + 1) * og] for g in range(self.groups)]
        return torch.block_diag(*blocks) if og and ig else self.up_weight.new_zeros(self.out_features, self.rank)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(h, self.up_weight, self.up_bias)
        hs = h.chunk(self.groups, dim=-1)
        ws = self.up_weight.chunk(self.groups, dim=0)
        return torch.cat([F.linear(a, w) for a, w in zip(hs, ws)], dim=-1) + self.up_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.down(x))) * self.scale

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with f(x) = W x + b in eval mode: W = s·U·D, b = s·(U·b_D + b_U)."""
        u = self.up_dense()
        w = self.scale * (u @ self.down.weight)
        b = self.scale * (u @ self.down.bias + self.up_bias)
        return w, b


class InputAdapterLinear(WrapsLinear, nn.Module):
    """y = base(x + f(x)): a residual affine adapter on the input of a frozen linear (RepAdapter).

    ``merged()``: base(x + W_f x + b_f) = W (I + W_f) x + (W b_f + b).
    """

    def __init__(self, base: nn.Linear, f: AffineBottleneck):
        super().__init__()
        self.base = base
        self.f = f
        self.in_features, self.out_features = base.in_features, base.out_features


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x + self.f(x))

    def merged(self) -> nn.Linear:
        base = self.base
        with torch.no_grad():
            wf, bf = (t.to(torch.float64) for t in self.f.affine())
            w = base.weight.to(torch.float64)
            new_w = w + w @ wf
            new_b = w @ bf + (base.bias.to(torch.float64) if base.bias is not None else 0.0)
            base.weight.copy_(new_w.to(base.weight.dtype))
            write_bias_(base, new_b.to(base.weight.dtype))
        return base


class BranchedLinear(WrapsLinear, nn.Module):
    """y = base(x) + par(x) + seq(base(x)) (Hydra's parallel and sequential branches on one linear).

    ``merged()``: W' = W + W_p + W_s W, b' = b + b_p + W_s b + b_s.
    """

    def __init__(self, base: nn.Linear, par: Optional[AffineBottleneck], seq: Optional[AffineBottleneck]):
        super().__init__()
        self.base = base
        self.par = par
        self.seq = seq
        self.in_features, self.out_features = base.in_features, base.out_features


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        out = y
        if self.par is not None:
            out = out + self.par(x)
        if self.seq is not None:
            out = out + self.seq(y)
        return out

    def merged(self) -> nn.Linear:
        base = self.base
        with torch.no_grad():
            w = base.weight.to(torch.float64)
            b = base.bias.to(torch.float64) if base.bias is not None else torch.zeros(base.out_features, dtype=torch.float64, device=w.device)
            new_w, new_b = w.clone(), b.clone()
            if self.par is not None:
                wp, bp = (t.to(torch.float64) for t in self.par.affine())
                new_w += wp
                new_b += bp
            if self.seq is not None:
                ws, bs = (t.to(torch.float64) for t in self.seq.affine())
                new_w += ws @ w
                new_b += ws @ b + bs
            base.weight.copy_(new_w.to(base.weight.dtype))
            write_bias_(base, new_b.to(base.weight.dtype))
        return base
