"""Scale and shift of features, y = γ ⊙ x + β (SSF and relatives), foldable into the layer before."""
from __future__ import annotations

import torch
from torch import nn

from methods.blocks.merge import write_bias_


class ScaleShift(nn.Module):
    """γ, β over the last dimension. ``init='identity'``: γ = 1, β = 0 exactly;
    ``init='normal'``: γ ~ N(1, std²), β ~ N(0, std²) (the SSF code's init)."""

    def __init__(self, dim: int, init: str = "identity", std: float = 0.02, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, device=device))
        self.shift = nn.Parameter(torch.zeros(dim, device=device))
        if init == "normal" and self.scale.device.type != "meta":
            nn.init.normal_(self.scale, 1.0, std)
            nn.init.normal_(self.shift, 0.0, std)
        elif init not in ("identity", "normal"):
            raise ValueError(f"unknown scale-shift init '{init}'; choose identity or normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class ScaleShiftAfter(nn.Module):
    """``base`` (a Linear or LayerNorm with affine/bias) followed by a ScaleShift; ``merged()`` folds it.

    For channel-last features: W' = γ ⊙ W (row-wise), b' = γ ⊙ b + β.
    """

    def __init__(self, base: nn.Module, ss: ScaleShift):
        super().__init__()
        self.base = base
        self.ss = ss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ss(self.base(x))

    def merged(self) -> nn.Module:
        base, g, b = self.base, self.ss.scale.detach(), self.ss.shift.detach()
        with torch.no_grad():
            w = base.weight
            w.mul_(g.view(-1, *([1] * (w.dim() - 1))).to(w.dtype))
            write_bias_(base, b if base.bias is None else base.bias * g + b)
        return base
