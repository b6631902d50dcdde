"""LoRand's low-rank-synthesised bottleneck (Yin et al., CVPR 2023, "1% VS 100%"), shared with E3VA.

W_down = Σ_i P_i K_i Q_i (C×m) and W_up = Σ_i P'_i K_i Q'_i (m×C), i = 1..α, with P_i ∈ R^{C×β}, Q_i ∈ R^{β×m},
P'_i ∈ R^{m×β}, Q'_i ∈ R^{β×C} and the β×β kernels K_i **shared** between the two projections; f(z) =
GELU(z W_down + b_d) W_up + b_u. Parameters α(2βC + 2βm + β²) + m + C; α = 2, β = 8, m = C/2 reproduces the
paper's 1.20 M on Swin-B (two per block). Factors: kaiming-uniform(a=√5) as matrices, biases uniform(±1/√fan_in)
(PyTorch's Linear defaults); no code of the paper is public, so this init is our choice.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _kaiming(t: torch.Tensor) -> None:
    for m in t:  # each factor as its own matrix
        nn.init.kaiming_uniform_(m, a=math.sqrt(5))


class LoRandBottleneck(nn.Module):
    def __init__(self, dim: int, mid: int, branches: int = 2, kernel: int = 8, residual: bool = True, device=None):
        super().__init__()
        a, b = branches, kernel
        self.p_down = nn.Parameter(torch.empty(a, dim, b, device=device))
        self.kernel = nn.Parameter(torch.empty(a, b, b, device=device))
        self.q_down = nn.Parameter(torch.empty(a, b, mid, device=device))
        self.p_up = nn.Parameter(torch.empty(a, mid, b, device=device))
        self.q_up = nn.Parameter(torch.empty(a, b, dim, device=device))
        self.b_down = nn.Parameter(torch.empty(mid, device=device))
        self.b_up = nn.Parameter(torch.empty(dim, device=device))
        self.act = nn.GELU()
        self.residual = residual
        if device is None or torch.device(device).type != "meta":
            for t in (self.p_down, self.kernel, self.q_down, self.p_up, self.q_up):
                _kaiming(t.data)
            nn.init.uniform_(self.b_down, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
            nn.init.uniform_(self.b_up, -1 / math.sqrt(mid), 1 / math.sqrt(mid))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.einsum("acb,abk,akm->cm", self.p_down, self.kernel, self.q_down)
        up = torch.einsum("amb,abk,akc->mc", self.p_up, self.kernel, self.q_up)
        return down, up

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        down, up = self.weights()
        out = self.act(z @ down + self.b_down) @ up + self.b_up
        return z + out if self.residual else out
