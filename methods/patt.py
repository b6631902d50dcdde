"""PATT, parallel attention on keys and values (Yu et al., "Towards a Unified View on Visual PETL",
arXiv 2210.00788; code bruceyo/V-PETL = V-PETL Bench ``VideoActionRecognition/``, ``--att_prefix_mode patt_kv``).

Inside every attention layer, beside the frozen qkv projection and on the same tokens z (the window tokens
on Swin): Δ = W₂ tanh(W₁ z + b₁) + b₂ with W₁: C→m, W₂: m→2C; Δ = [Δk, Δv] is split per head exactly like
qkv and added as K ← K + λΔk, V ← V + λΔv (λ = ``scale`` = 0.8, the README_original command; the parser's
default is 0.2), then standard attention. Implemented as a delta on the k and v rows of the fused qkv
output (``DeltaLinear``), so it composes with any family that has a qkv linear.

Init: PyTorch's default Linear init for both layers (not zero), as the official code: K and V are
perturbed at step 0 (not identity at init; the spec calls this out). Not mergeable (tanh).
Params per block 3mC + m + 2C: Video Swin-B at m = 128: 4,647,424. ``mid_dim`` for VideoMAE ViT-B is not
published; ``videomae_b`` defaults to m = 32 (2,093,184; the README's BAPAT 2.06M − AdaptFormer 1.19M
suggests m ≈ 31) [unverified].
"""
from __future__ import annotations

import torch
from torch import nn

from methods.base import Method, register
from methods.blocks import DeltaLinear


class KVParallel(nn.Module):
    """z → λ·(W₂ tanh(W₁ z + b₁) + b₂), the (Δk, Δv) rows of a qkv output."""

    def __init__(self, dim: int, mid: int, scale: float, device=None):
        super().__init__()
        self.down = nn.Linear(dim, mid, device=device)
        self.up = nn.Linear(mid, 2 * dim, device=device)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.tanh(self.down(x))) * self.scale


def inject_patt(method: Method, sites) -> None:
    mid, scale = int(method.get("mid_dim", 128)), float(method.get("patt_scale", 0.8))
    if mid < 1:
        raise ValueError(f"{method.name}: method.mid_dim={mid} must be >= 1")
    for b in sites:
        qkv = b.linear("qkv")
        delta = KVParallel(b.dim, mid, scale, device=qkv.weight.device)
        b.set_linear("qkv", DeltaLinear(qkv, {"kv": delta}, {"kv": slice(b.dim, 3 * b.dim)}))


@register("patt")
class PATT(Method):
    families = ("vit", "swin", "video_vit", "video_swin")

    def inject(self, model, sites):
        inject_patt(self, sites)
