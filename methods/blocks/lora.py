"""Low-rank linear deltas (LoRA and relatives) on slices of a frozen linear's output."""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.blocks.merge import WrapsLinear


def qkv_slices(dim: int, targets) -> dict[str, slice]:
    """Output-row slices of a fused qkv linear for the chosen targets among q, k, v."""
    order = {"q": 0, "k": 1, "v": 2}
    bad = [t for t in targets if t not in order]
    if bad:
        raise ValueError(f"unknown qkv target(s) {bad}; choose among q, k, v")
    return {t: slice(order[t] * dim, (order[t] + 1) * dim) for t in targets}


class LowRank(nn.Module):
    """ΔW = scale · B A with A: r×in (kaiming-uniform a=√5), B: out×r (zeros): ΔW = 0 at init."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: Optional[float] = None,
                 dropout: float = 0.0, device=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1 (got {rank})")
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

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
        y = self.base(x)
        for name, delta in self.deltas.items():
            s = self.slices[name]
            y[..., s] = y[..., s] + delta(x)
        return y

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = self.base.weight
            for name, delta in self.deltas.items():
                w[self.slices[name]] += delta.delta_weight().to(w.dtype)
        return self.base
