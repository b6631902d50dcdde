"""Convpass (Jie & Deng, 2022): convolutional bypasses beside attention and MLP.

Official code (JieShibo/PETL-ViT ``convpass/vtab/convpass.py``): per block
``x ← x + DP(Attn(LN1 x)) + s·DP(C_a(LN1 x))`` and ``x ← x + DP(MLP(LN2 x)) + s·DP(C_m(LN2 x))``
(DP = drop-path, drawn independently for the bypass). A bypass C: down Linear(dim→8, xavier, bias 0)
→ QuickGELU → the patch tokens as an 8×14×14 map through Conv2d(8→8, 3×3, pad 1, bias) (the class
token goes through the same conv as a 1×1 map, so only the centre tap and the bias act on it) →
QuickGELU → Dropout(0.1) → up Linear(8→dim, **zero** weight and bias). Conv init: ``xavier_init``
false = zeros with the centre tap I₈, true = xavier-uniform; bias 0. ViT-B/16: 24·(6,152 + 584 +
6,912) = 327,552 parameters. The up-projection is zero, so the model equals the frozen one at step 0.

Deviations: none in function; the grid comes from the backbone (``patch_embed.grid_size``) instead of
the hard-coded 14×14, and every prefix token is treated like the class token. ``variant: attn`` is the
official ``convpass_attn`` (attention bypass only). Official per-dataset scale and conv init ship in
``methods/data/per_dataset_vtab.yaml`` (``per_dataset=true``). The official code also defines Swin
bypasses; ``families=("vit",)`` for now. Not mergeable (non-linear bypass).
"""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from methods.base import Method, register
from methods.blocks.affine_branches import quick_gelu
from methods.blocks.dataset_params import resolved_cfg


class ConvBypass(nn.Module):
    def __init__(self, dim: int, hidden: int, grid: tuple[int, int], prefix: int, scale: float,
                 xavier_init: bool, dropout: float, drop_path: float, device=None):
        super().__init__()
        self.hidden, self.grid, self.prefix, self.scale = hidden, tuple(grid), prefix, float(scale)
        self.down = nn.Linear(dim, hidden, device=device)
        self.conv = nn.Conv2d(hidden, hidden, 3, 1, 1, device=device)
        self.up = nn.Linear(hidden, dim, device=device)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if self.down.weight.device.type != "meta":
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
            if xavier_init:
                nn.init.xavier_uniform_(self.conv.weight)
            else:
                with torch.no_grad():
                    self.conv.weight.zero_()
                    self.conv.weight[:, :, 1, 1] = torch.eye(hidden)
            nn.init.zeros_(self.conv.bias)

    def bypass(self, h: torch.Tensor) -> torch.Tensor:
        B, N, _ = h.shape
        gh, gw = self.grid
        p = self.prefix
        if N != p + gh * gw:
            raise ValueError(f"convpass expects {p} prefix + {gh}x{gw} patch tokens, got a sequence of {N}")
        z = quick_gelu(self.down(h))
        patches = z[:, p:].reshape(B, gh, gw, self.hidden).permute(0, 3, 1, 2)
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(B, gh * gw, self.hidden)
        if p:
            pre = self.conv(z[:, :p].reshape(B * p, 1, 1, self.hidden).permute(0, 3, 1, 2)).reshape(B, p, self.hidden)
            z = torch.cat([pre, patches], dim=1)
        else:
            z = patches
        return self.up(self.drop(quick_gelu(z)))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The ``*_parallel`` extension: (x, h = norm(x)) -> s · DP(C(h))."""
        return self.drop_path(self.bypass(h)) * self.scale


@register("convpass")
class Convpass(Method):
    families = ("vit",)
    identity_at_init = True

    def inject(self, model, sites):
        cfg = resolved_cfg(self)
        hidden, scale = int(cfg.get("dim", 8)), float(cfg.get("scale", 1.0))
        xavier, dropout = bool(cfg.get("xavier_init", False)), float(cfg.get("dropout", 0.1))
        variant = str(cfg.get("variant", "both"))
        if variant not in ("both", "attn"):
            raise ValueError(f"method.variant={variant!r} for convpass: choose both (convpass) or attn (convpass_attn)")
        grid = tuple(sites.patch_embed.grid_size)
        for b in sites:
            dev = b.norm1.weight.device
            for key, dp in (("attn_parallel", b.block.drop_path1), ("mlp_parallel", b.block.drop_path2)):
                if key == "mlp_parallel" and variant == "attn":
                    continue
                b.extend(key, ConvBypass(b.dim, hidden, grid, sites.num_prefix_tokens, scale, xavier, dropout,
                                         float(getattr(dp, "drop_prob", 0.0)), device=dev))
