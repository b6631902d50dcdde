"""SNF, shortcut adaptation via normalizing flow (Wang et al.; official: Wang-Yaoming/SNF ``flow.py``, ``snf.py``).

The identity shortcut of both residual branches of every block is replaced by a learnable invertible
flow applied per token; the residual branches stay frozen:

    x ← NF_a(x) + DropPath(Attn(LN₁ x)),    x ← NF_m(x) + DropPath(MLP(LN₂ x)).

NF(z), d = 768: an element-wise affine z ← μ + exp(ℓ)⊙z, then K = ``flows`` planar flows
z ← z + u⊙tanh(w·z + b) (w, u ∈ R^d, b ∈ R). Init μ = ℓ = 0 (exact identity), w, u, b ~ U(±0.01).
Per flow module 2d + K(2d+1) parameters: 36,864 + 36,888·K on ViT-B/16 (K=0: 36,864, the paper's
"0.036M"; K=6: 258,192, V-PETL Bench's "0.25M"). Default K=0 (the paper's headline); the official
``flow_length`` default is 16 (627,072).

Implementation: the flow is installed at the ``*_parallel`` extension points and returns NF(x) − x
(computed as the accumulated increments, so K=0 at init adds an exact 0: the model equals the frozen
one bit for bit). Deviations: the official timm hook binds a CLIP-style forward (``ln_1``,
``attention``) that would crash on a timm Block and applies no DropPath; we use the formula above with
the block's own DropPath on the residual branch (as the official EVA path). The official code also
computes a log-det term that the block never uses; ``log_det()`` exposes it, nothing trains on it.
"""
from __future__ import annotations

import torch
from torch import nn

from methods.base import Method, register


class ShortcutFlow(nn.Module):
    """(x, h) -> NF(x) − x for a ``*_parallel`` extension point (h unused)."""

    def __init__(self, dim: int, flows: int = 0, init_range: float = 0.01, device=None):
        super().__init__()
        if flows < 0:
            raise ValueError(f"method.flows must be >= 0 (got {flows})")
        self.mu = nn.Parameter(torch.zeros(dim, device=device))
        self.log_scale = nn.Parameter(torch.zeros(dim, device=device))
        self.flows = flows
        if flows == 0:  # no empty tensors: they would be trainable parameters without a gradient
            self.register_parameter("w", None)
            self.register_parameter("u", None)
            self.register_parameter("b", None)
            return
        self.w = nn.Parameter(torch.empty(flows, dim, device=device))
        self.u = nn.Parameter(torch.empty(flows, dim, device=device))
        self.b = nn.Parameter(torch.empty(flows, device=device))
        if self.w.device.type != "meta":
            for p in (self.w, self.u, self.b):
                nn.init.uniform_(p, -init_range, init_range)

    def forward(self, x: torch.Tensor, h: torch.Tensor = None) -> torch.Tensor:
        d = self.mu + torch.expm1(self.log_scale) * x  # affine increment: μ + (e^ℓ − 1)·x
        z = x + d
        for k in range(self.flows):
            step = self.u[k] * torch.tanh(z @ self.w[k] + self.b[k]).unsqueeze(-1)
            d = d + step
            z = z + step
        return d

    def log_det(self, x: torch.Tensor) -> torch.Tensor:
        """Σℓ + Σ_k log|1 + uₖ·ψₖ(z)| per token (exposed for completeness; unused in training, as official)."""
        ld = self.log_scale.sum().expand(x.shape[:-1]).clone()
        z = self.mu + torch.exp(self.log_scale) * x
        for k in range(self.flows):
            a = torch.tanh(z @ self.w[k] + self.b[k])
            psi = (1 - a ** 2).unsqueeze(-1) * self.w[k]
            ld = ld + torch.log((1 + psi @ self.u[k]).abs() + 1e-8)
            z = z + self.u[k] * a.unsqueeze(-1)
        return ld


@register("snf")
class SNF(Method):
    families = ("vit", "video_vit")
    identity_at_init = True  # exact for the default K=0; K>0 deviates by ~the U(±0.01) planar terms

    def inject(self, model, sites):
        flows, rng = int(self.get("flows", 0)), float(self.get("init_range", 0.01))
        for b in sites:
            dev = b.norm1.weight.device
            b.extend("attn_parallel", ShortcutFlow(b.dim, flows, rng, device=dev))
            b.extend("mlp_parallel", ShortcutFlow(b.dim, flows, rng, device=dev))
