"""Mona, the multi-cognitive visual adapter (Yin et al., CVPR 2025, "5%>100%: Breaking Performance Shackles of
Full Fine-Tuning on Visual Recognition Tasks").

Official code: Leiyi-Hu/mona (HEAD 5deeac9), ``Swin-Transformer-Classification/mmcls/models/backbones/
swin_transformer_mona.py`` (the classification backbone; ``Swin-Transformer-Object-Detection/mmdet`` and
``Swin-Transformer-Semantic-Segmentation/mmseg`` hold the same ``Mona``/``MonaOp``). Per module, on the residual
stream x (B, N, C) with N = H·W tokens:

* scaled LayerNorm x̂ = γ ⊙ LN(x) + γₓ ⊙ x (γ = 1e-6, γₓ = 1 at init, both per channel);
* p = W₁ x̂ + b₁ (C → 64), laid out as a (64, H, W) map;
* MonaOp: q = (DW3×3(p) + DW5×5(p) + DW7×7(p)) / 3 + p (depth-wise, 'same' zero padding, with bias),
  r = q + Conv1×1(q) (64 → 64, with bias);
* out = x + W₂ · Dropout₀.₁(GELU(r)) + b₂ (64 → C).

Two per block: M₁ on the stream after the attention residual (``mid``: x₁ = M₁(x + DP(Attn(LN₁ x)))), M₂ after
the MLP residual (``out``: x₂ = M₂(x₁ + DP(MLP(LN₂ x₁)))); neither is under drop-path. Init as the official
backbone's ``init_weights`` leaves the new modules (they are not in the checkpoint): both linears trunc-normal
std .02 with zero bias, LayerNorm 1/0, the convolutions PyTorch's default, γ = 1e-6, γₓ = 1. The bottleneck is
64 whatever the block width (the constructor's ``factor`` argument is unused officially); ``bottleneck`` sets it.
Per module 133·C + 9,728 parameters (MonaOp 640 + 1,664 + 3,200 + 4,160 = 9,664): ViT-B/16 24·(133·768 + 9,728)
= 2,684,928; Swin-B 2·(133·12,032 + 24·9,728) = 3,667,456 (specs/video_dense.md, the dense tables). W₂ is not
zero, so the model differs from the frozen one at step 0; the GELU and convolutions make it non-mergeable.

Families: Swin (the official backbone; each block's own H×W, ``input_resolution``) and ViT. **Deviation: the
official repository has no ViT variant** (its classification code is the same Swin backbone), so on ViT we place
the modules exactly as on Swin and lay the patch tokens out on ``patch_embed.grid_size``; the prefix (class)
token has no grid position, so it goes through MonaOp as a 1×1 map (with zero padding only the centre taps and
the biases act on it; the same convention as Convpass here), and through every token-wise step like any token.
The official per-stage LayerNorms ``norm0..3`` of the dense backbone are frozen identity-affine norms outside the
blocks and add nothing here. MonaOp runs as one depth-wise 7×7 filter with the averaged kernels plus the identity
folded in, applied as a banded matrix product (the same linear map as the official three convolutions + identity,
equal to float rounding; ``tests/test_methods_issue15_a.py`` checks it against the official dataflow).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register


def on_grid(z: torch.Tensor, op: nn.Module, grid: tuple[int, int], prefix: int = 0) -> torch.Tensor:
    """``op`` on a token sequence z (B, N, C): the N - prefix patch tokens as a (B, H, W, C) grid (``op(grid)``),
    each prefix token as its own 1×1 map (``op.point(tokens)``, the same op on a 1×1 zero-padded map)."""
    B, N, C = z.shape
    h, w = grid
    if N != prefix + h * w:
        raise ValueError(f"mona expects {prefix} prefix + {h}x{w} grid tokens, got a sequence of {N}")
    patches = op(z[:, prefix:].reshape(B, h, w, C))
    return torch.cat([op.point(z[:, :prefix]), patches], dim=1) if prefix else patches


def shift_index(h: int, w: int, k: int, device=None) -> torch.Tensor:
    """(HW, HW) map from (output position, input position) to the tap index of a k×k 'same' zero-padded filter,
    or k·k where the input position is outside the window (a zero)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = ys.reshape(1, -1) - ys.reshape(-1, 1) + k // 2  # input row - output row + radius, per (out, in) pair
    dx = xs.reshape(1, -1) - xs.reshape(-1, 1) + k // 2
    inside = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
    return torch.where(inside, dy * k + dx, torch.full_like(dy, k * k)).to(device)


class MonaOp(nn.Module):
    """Depth-wise 3/5/7 filters averaged, plus identity; then a 1×1 projection, plus identity.

    The averaged filters plus the identity are ONE depth-wise k_max×k_max filter (the mean of the zero-padded kernels
    with 1 added at the centre, and the mean bias): the same linear map as the three convolutions and the identity.
    It is applied as a per-channel (HW × HW) banded matrix product (one batched GEMM; CPU depth-wise convolution
    kernels are many times slower on these small maps); gradients reach every kernel through the sum."""

    def __init__(self, channels: int, kernels=(3, 5, 7), device=None):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, device=device)
                                   for k in kernels)
        self.projector = nn.Conv2d(channels, channels, 1, device=device)
        self.k = max(kernels)
        self._index = {}  # (h, w, device) -> shift_index

    def kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight C×k×k, bias C) of the averaged filters plus the identity."""
        n, k = len(self.convs), self.k
        w = sum(F.pad(c.weight[:, 0], [(k - c.kernel_size[0]) // 2] * 4) for c in self.convs) / n
        centre = torch.zeros_like(w)
        centre[:, k // 2, k // 2] = 1.0
        return w + centre, sum(c.bias for c in self.convs) / n

    def project(self, q: torch.Tensor) -> torch.Tensor:
        """q + Conv1×1(q) on tokens (..., C)."""
        return q + F.linear(q, self.projector.weight[:, :, 0, 0], self.projector.bias)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """On a token grid p (B, H, W, C); returns (B, H·W, C)."""
        B, h, w, C = p.shape
        key = (h, w, p.device)
        if key not in self._index:
            self._index[key] = shift_index(h, w, self.k, p.device)
        kw, b = self.kernel()
        taps = torch.cat([kw.reshape(C, -1), kw.new_zeros(C, 1)], dim=1)
        band = taps[:, self._index[key]]  # (C, HW_out, HW_in)
        q = torch.einsum("cpq,bqc->bpc", band.to(p.dtype), p.reshape(B, h * w, C)) + b
        return self.project(q)

    def point(self, z: torch.Tensor) -> torch.Tensor:
        """The op on tokens (..., C) each taken as a 1×1 map: zero padding leaves the centre taps and the biases."""
        kw, b = self.kernel()
        return self.project(z * kw[:, self.k // 2, self.k // 2] + b)


class Mona(nn.Module):
    """x -> x + W₂ Drop(GELU(MonaOp(W₁ (γ LN(x) + γₓ x)))), on the residual stream (a ``mid``/``out`` extension)."""

    def __init__(self, dim: int, grid: tuple[int, int], prefix: int = 0, bottleneck: int = 64, dropout: float = 0.1,
                 kernels=(3, 5, 7), device=None):
        super().__init__()
        self.grid, self.prefix = tuple(int(g) for g in grid), int(prefix)
        self.grid_fn = None  # Swin blocks: the block's current map size (dense inputs of any size)
        self.norm = nn.LayerNorm(dim, device=device)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6, device=device))
        self.gammax = nn.Parameter(torch.ones(dim, device=device))
        self.project1 = nn.Linear(dim, bottleneck, device=device)
        self.adapter_conv = MonaOp(bottleneck, kernels, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.project2 = nn.Linear(bottleneck, dim, device=device)
        if self.project1.weight.device.type != "meta":
            for lin in (self.project1, self.project2):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        grid = self.grid_fn() if self.grid_fn is not None else self.grid
        p = on_grid(p, self.adapter_conv, grid, self.prefix)
        return x + self.project2(self.dropout(F.gelu(p)))


@register("mona")
class MonaMethod(Method):
    families = ("vit", "swin")

    def inject(self, model, sites):
        hidden, dropout = int(self.get("bottleneck", 64)), float(self.get("dropout", 0.1))
        kernels = tuple(int(k) for k in self.get("kernels", [3, 5, 7]))
        if hidden < 1 or not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"mona: bottleneck must be >= 1 and kernels odd (got {hidden}, {list(kernels)})")
        vit_grid = tuple(sites.patch_embed.grid_size) if sites.family == "vit" else None
        for b in sites:
            grid = vit_grid or tuple(b.block.input_resolution)
            for key in ("mid", "out"):  # M1 after the attention residual, M2 after the MLP residual
                m = b.extend(key, Mona(b.dim, grid, sites.num_prefix_tokens, hidden, dropout, kernels,
                                       device=b.norm2.weight.device))
                if sites.family == "swin":
                    blk = b.block
                    m.grid_fn = lambda blk=blk: getattr(blk, "petl_grid", None) or tuple(blk.input_resolution)
