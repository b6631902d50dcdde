"""LST, Ladder Side-Tuning (Sung et al., NeurIPS 2022), vision variant **[reconstructed]**.

The official code (ylsung/Ladder-Side-Tuning) is for T5; no official vision code exists. The mapping
to ViT follows the spec (``image_extra.md`` §6) and reproduces V-PETL Bench's "2.38M" exactly:

* side network = the backbone shape with every width divided by r (``reduction`` = 8): width 96,
  12 heads of dim 8, MLP 384, one timm ``Block`` per backbone block (pre-LN, qkv bias);
* s₀ = Down₀(E) (E = the embedding output, CLS and position embedding included);
* for each block i: z_i = μ_i·s_{i−1} + (1−μ_i)·Down_i(h_i), s_i = SideBlock_i(z_i), with the gate
  μ_i = σ(α_i/T), α_i = 0 at init (μ = 0.5), T = 0.1, and h_i the frozen block's output;
* y = Head(Up(LN_side(s_L))[:, 0]); Up: 96 → 768 so the task head stays ``model.head`` on 768;
* the backbone runs under ``torch.no_grad()``: no gradient, no graph, detached features.

Init: timm's ViT init for the side blocks (trunc-normal 0.02, zero bias, LN 1/0), PyTorch default for
Down/Up. The official T5 code instead initialises the side blocks by Fisher-pruning the backbone's
weights to 1/r width; not implemented here (deviation). Not function-preserving at init.

Count on ViT-B/16 (r=8): 73,824 + 12·73,824 + 12 + 12·111,840 + 192 + 74,496 = 2,376,492 excl. head.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import Block, init_weights_vit_timm

from methods.base import Method, register
from methods.blocks.side import install_side, trunk


class LadderSide(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, reduction: int = 8, mlp_ratio: float = 4.0,
                 temperature: float = 0.1, drop_path: float = 0.0, device=None):
        super().__init__()
        if dim % reduction:
            raise ValueError(f"method.reduction={reduction} must divide the embedding width {dim}")
        side = dim // reduction
        if side % num_heads:
            raise ValueError(f"side width {side} (= {dim}/method.reduction) must be divisible by the {num_heads} heads")
        self.temperature = temperature
        self.first_down = nn.Linear(dim, side, device=device)
        self.downs = nn.ModuleList(nn.Linear(dim, side, device=device) for _ in range(depth))
        self.gates = nn.Parameter(torch.zeros(depth, device=device))
        self.blocks = nn.ModuleList(
            Block(side, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path, device=device)
            for _ in range(depth))
        self.norm = nn.LayerNorm(side, eps=1e-6, device=device)
        self.up = nn.Linear(side, dim, device=device)
        if self.gates.device.type != "meta":
            for blk in self.blocks:
                blk.apply(init_weights_vit_timm)

    def forward(self, e: torch.Tensor, hs: list[torch.Tensor]) -> torch.Tensor:
        s = self.first_down(e)
        mus = torch.sigmoid(self.gates / self.temperature)
        for i, (h, blk) in enumerate(zip(hs, self.blocks)):
            s = blk(mus[i] * s + (1 - mus[i]) * self.downs[i](h))
        return self.up(self.norm(s))


def _lst_forward(model, x):
    e, hs = trunk(model, x, grad=False)
    z = model.petl_side(e, hs)
    return model.head(model.head_drop(z[:, 0]))


@register("lst")
class LST(Method):
    families = ("vit", "video_vit")

    def inject(self, model, sites):
        dev = sites.blocks[0].norm1.weight.device
        side = LadderSide(sites.embed_dim, len(sites), sites.blocks[0].num_heads, int(self.get("reduction", 8)),
                          float(self.get("mlp_ratio", 4.0)), float(self.get("temperature", 0.1)),
                          float(self.get("drop_path", 0.0)), device=dev)
        install_side(model, side, _lst_forward)
