"""LAST, Low-rank Attention Side-Tuning (Tang, Fu, Zhu, Wu; arXiv 2402.04009, 2024) **[reconstructed]**.

No official code is public (the paper's and the awesome-lists' "[Code]" links are empty; V-PETL
Bench's ``LAST`` files are VPT-Shallow/Adapter placeholders). Built from the paper's description:

* the backbone is frozen in parameters *and outputs*: it runs under ``torch.no_grad()``; z₀ is the
  embedding output and z_i the output of the i-th group of ``gap`` blocks (m = depth/gap groups);
* the side network is m Low-rank Self-Attention (LSA) blocks; block i reads the previous side state
  and z_i: x_i = u_{i−1} + z_i, u_i = x_i + LSA_i(x_i), u₀ = z₀;
* LSA(x) = W_o·Attn(LN(x)W_q, LN(x)W_k, LN(x)W_v): tokens are projected to r ≪ d dimensions (``rank``),
  attention runs there (``num_heads`` heads of r/heads dims), W_o projects back to d; no FFN;
* the paper's bias correction: the representation is u_m − Σ_{i<m} z_i (= z_m + Σ_i LSA_i(x_i)); we
  compute it in that second form (exact in floating point), then the backbone's frozen final norm,
  pooling and the task head ``model.head``.

Our choices where the paper text available here is silent (reconstruction, documented): ``gap`` = 1,
one LSA layer per group, r = 16, biases on all projections, W_q/W_k/W_v trunc-normal(0.02) and W_o = 0
(zero-initialised, so the model starts exactly at the frozen model's logits). Count on ViT-B/16:
12·(1,536 + 3·(768·16 + 16) + (16·768 + 768)) = 618,048 excl. head; with the VTAB-average head
(38,044) that is 0.656M, which would match the paper's 0.66M if that figure includes heads
(unverified: the exact r, g and bias choices of the paper could not be read here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.blocks.side import install_side, trunk


class LowRankSelfAttention(nn.Module):
    def __init__(self, dim: int, rank: int, num_heads: int = 1, device=None):
        super().__init__()
        if rank % num_heads:
            raise ValueError(f"method.rank={rank} must be divisible by method.num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim, eps=1e-6, device=device)
        self.q = nn.Linear(dim, rank, device=device)
        self.k = nn.Linear(dim, rank, device=device)
        self.v = nn.Linear(dim, rank, device=device)
        self.o = nn.Linear(rank, dim, device=device)
        if self.q.weight.device.type != "meta":
            for lin in (self.q, self.k, self.v):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            nn.init.zeros_(self.o.weight)
            nn.init.zeros_(self.o.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        h = self.norm(x)

        def heads(t):
            return t.reshape(B, N, self.num_heads, -1).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        return self.o(a.transpose(1, 2).reshape(B, N, -1))


class LASTSide(nn.Module):
    def __init__(self, dim: int, depth: int, rank: int = 16, num_heads: int = 1, gap: int = 1, device=None):
        super().__init__()
        if gap < 1 or depth % gap:
            raise ValueError(f"method.gap={gap} must divide the backbone depth {depth}")
        self.gap = gap
        self.blocks = nn.ModuleList(LowRankSelfAttention(dim, rank, num_heads, device=device) for _ in range(depth // gap))

    def forward(self, z0: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
        zs = outs[self.gap - 1::self.gap]  # z_1..z_m
        u = z0
        corr = None  # Σ LSA_i(x_i)
        for z, lsa in zip(zs, self.blocks):
            x = u + z
            d = lsa(x)
            u = x + d
            corr = d if corr is None else corr + d
        return zs[-1] + corr  # = u_m − Σ_{i<m} z_i


def _last_forward(model, x):
    z0, outs = trunk(model, x, grad=False)
    rep = model.petl_side(z0, outs)
    return model.forward_head(model.norm(rep))


@register("last")
class LAST(Method):
    families = ("vit", "video_vit")
    identity_at_init = True  # W_o = 0: the representation is exactly the frozen z_m at step 0

    def inject(self, model, sites):
        dev = sites.blocks[0].norm1.weight.device
        side = LASTSide(sites.embed_dim, len(sites), int(self.get("rank", 16)), int(self.get("num_heads", 1)),
                        int(self.get("gap", 1)), device=dev)
        install_side(model, side, _last_forward)
