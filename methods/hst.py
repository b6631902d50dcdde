"""HST, Hierarchical Side-Tuning (Lin et al., 2023; official: AFeng-x/HST ``models/vit_hsn.py``,
``models/vit_custom_modules.py``).

Reproduced from the official code:

* main path: before frozen block l a learnable meta token M_l (U(±√(3/d)) = ±0.0625 on ViT-B, the
  official xavier on a 1×1×d tensor) is prepended in front of CLS, [M_l, CLS, patches]; after the block
  G_l = token 0 (meta output) and F_l = the patch tokens (as a 2-D map) are recorded and M_l is dropped;
* a 4-stage pyramid side network (dims 32/48/64/72, cross-attention heads 2/4/8/12, 3 side blocks per
  stage, MLP ratio 4, qkv bias). Stage 1 stem on the *image*: Conv3×3 s2 (no bias) → BN → ReLU → Conv2×2
  s2 → LN; stages 2–4: Conv3×3 s2 p1 → LN (grids 56², 28², 14², 7² at 224²);
* per side block ("adaptive feature bridge"): v = T_s(bilinear(F_l → stage grid)), m = LN_l(T_s(G_l)),
  g = mean of v over tokens, with one T_s = Linear(768 → dim_s) per stage; the block is
  x ← x + DP(CrossAttn(q = LN₁x, kv = [m; g])); x ← x + v; x ← x + DP(MLP(LN₂x));
* after each stage LN(dim_s); output: mean over tokens → BatchNorm1d(72, affine=False, eps 1e-6) →
  ``model.head`` = a new Linear(72 → C) (trunc-normal 0.02). The ViT's CLS/final norm are not used;
* init as the official code: Linear trunc-normal 0.02 / zero bias, LN (1, 0), conv He-normal (fan_out);
  LayerNorm eps as the official (1e-6 inside side blocks and stage norms, 1e-5 in stems and LN_l);
* trainable: the side network, meta tokens, T_s, the head **and the frozen ViT's block LayerNorms**
  (norm1/norm2 of every block, 36,864 on ViT-B: the official ``freeze_vit`` rule "'block' and 'norm' in
  the name"; ``train_vit_norms: false`` turns this off);
* side DropPath linspace(0, ``drop_path``, 12) as the official (which also applies it to the ViT).

Not a gradient-free side net: meta tokens and LayerNorms live inside the ViT, so its forward keeps a
graph (as the official code). Count on ViT-B/16: 764,840 excl. head (100-class head 7,300).

Deviation: the official code pairs side block j of stage i with ViT layer ``block_indices`` (3 per stage
on a 12-block ViT) and has one LN_l per ViT layer. We pair side block j (0..11) with ViT layer
⌊j·L/12⌋ and keep LN_l per side block: identical on 12-block ViTs, and defined for other depths.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath, trunc_normal_

from methods.base import Method, register
from methods.blocks.side import embed, install_side


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, device=device)
        self.k = nn.Linear(dim, dim, device=device)
        self.v = nn.Linear(dim, dim, device=device)
        self.proj = nn.Linear(dim, dim, device=device)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape

        def heads(t):
            return t.reshape(B, t.shape[1], self.num_heads, C // self.num_heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(kv)), heads(self.v(kv)))
        return self.proj(a.transpose(1, 2).reshape(B, N, C))


class SideBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, device=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, device=device)
        self.attn = CrossAttention(dim, num_heads, device=device)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, device=device)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, device=device), nn.GELU(), nn.Linear(hidden, dim, device=device))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, kv, v):
        x = x + self.drop_path(self.attn(self.norm1(x), kv))
        x = x + v
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stem(nn.Module):
    """Stage 1: the image → conv pyramid stem; later stages: Conv3×3 s2 p1 on the previous map. Then LN."""

    def __init__(self, in_ch: int, dim: int, first: bool, device=None):
        super().__init__()
        if first:
            self.conv = nn.Sequential(
                nn.Conv2d(in_ch, dim, 3, 2, padding=1, bias=False, device=device), nn.BatchNorm2d(dim, device=device),
                nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 2, 2, device=device))
        else:
            self.conv = nn.Conv2d(in_ch, dim, 3, 2, padding=1, device=device)
        self.norm = nn.LayerNorm(dim, device=device)

    def forward(self, x):
        x = self.conv(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class HierarchicalSide(nn.Module):
    def __init__(self, embed_dim: int, vit_depth: int, dims, heads, depths, mlp_ratio=4.0, drop_path=0.0,
                 in_chans: int = 3, device=None):
        super().__init__()
        if not (len(dims) == len(heads) == len(depths)):
            raise ValueError("method.dims, method.heads and method.depths must have the same length (one per stage)")
        n_side = sum(depths)
        self.vit_depth = vit_depth
        bound = math.sqrt(3.0 / embed_dim)  # = official xavier on a (1, 1, d) tensor
        self.meta = nn.Parameter(torch.empty(vit_depth, 1, embed_dim, device=device))
        self.stage_of = [s for s, d in enumerate(depths) for _ in range(d)]
        self.layer_of = [j * vit_depth // n_side for j in range(n_side)]
        dpr = torch.linspace(0, drop_path, n_side).tolist() if n_side > 1 else [drop_path]
        self.stems = nn.ModuleList(Stem(in_chans if s == 0 else dims[s - 1], dims[s], s == 0, device) for s in range(len(dims)))
        self.bridges = nn.ModuleList(nn.Linear(embed_dim, d, device=device) for d in dims)
        self.meta_norms = nn.ModuleList(nn.LayerNorm(dims[s], device=device) for s in self.stage_of)
        self.blocks = nn.ModuleList(SideBlock(dims[s], heads[s], mlp_ratio, dpr[j], device) for j, s in enumerate(self.stage_of))
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-6, device=device) for d in dims)
        self.fc_norm = nn.BatchNorm1d(dims[-1], affine=False, eps=1e-6, device=device)
        self.depths = list(depths)
        if self.meta.device.type != "meta":
            self.apply(_init)
            nn.init.uniform_(self.meta, -bound, bound)

    def forward(self, image: torch.Tensor, metas: list[torch.Tensor], maps: list[torch.Tensor]) -> torch.Tensor:
        B = image.shape[0]
        x, j = image, 0
        for s, (stem, bridge, norm) in enumerate(zip(self.stems, self.bridges, self.stage_norms)):
            x, H, W = stem(x)
            for _ in range(self.depths[s]):
                layer = self.layer_of[j]
                v = bridge(F.interpolate(maps[layer], size=(H, W), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2))
                m = self.meta_norms[j](bridge(metas[layer]))
                kv = torch.cat([m, v.mean(dim=1, keepdim=True)], dim=1)
                x = self.blocks[j](x, kv, v)
                j += 1
            x = norm(x)
            if s != len(self.stems) - 1:
                x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        return self.fc_norm(x.mean(dim=1))


def _hst_forward(model, x):
    side = model.petl_side
    h = embed(model, x)
    B, npt = h.shape[0], model.num_prefix_tokens
    gh, gw = model.patch_embed.grid_size if hasattr(model.patch_embed, "grid_size") else (None, None)
    metas, maps = [], []
    for l, blk in enumerate(model.blocks):
        h = blk(torch.cat([side.meta[l].expand(B, -1, -1), h], dim=1))
        metas.append(h[:, :1])
        p = h[:, 1 + npt:]
        n = p.shape[1]
        if gh is None or gh * gw != n:
            gh = gw = int(round(n ** 0.5))
        maps.append(p.transpose(1, 2).reshape(B, -1, gh, gw))
        h = h[:, 1:]
    return model.head(side(x, metas, maps))


@register("hst")
class HST(Method):
    families = ("vit",)

    def inject(self, model, sites):
        dev = sites.blocks[0].norm1.weight.device
        dims = [int(d) for d in self.get("dims", [32, 48, 64, 72])]
        side = HierarchicalSide(
            sites.embed_dim, len(sites), dims, [int(h) for h in self.get("heads", [2, 4, 8, 12])],
            [int(d) for d in self.get("depths", [3, 3, 3, 3])], float(self.get("mlp_ratio", 4.0)),
            float(self.get("drop_path", 0.1)), device=dev)
        install_side(model, side, _hst_forward)
        old = model.get_classifier()
        num_classes = old.out_features
        head = nn.Linear(dims[-1], num_classes, device=old.weight.device)
        if head.weight.device.type != "meta":
            _init(head)
        model.head = head  # the task head sits on the side net's 72-d output (still model.head)
        if self.get("train_vit_norms", True):
            for b in sites:
                for p in list(b.norm1.parameters()) + list(b.norm2.parameters()):
                    p.requires_grad_(True)
