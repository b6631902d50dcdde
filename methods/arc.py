"""ARC, Adapter Re-Composing (Dong et al., NeurIPS 2023; official: DavidYanAnDe/ARC ``Model/ARC_ViT.py``).

Official ViT design, reproduced:

* one down-projection U ∈ R^{d×r} (r = ``rank`` = 50) per position, **shared by all blocks**; the
  up-projection is exactly Uᵀ (same tensor, so its gradient accumulates from every block);
* per block l a rescale row s_l ∈ R^{1×r} and a bias b_l ∈ R^d:
  Adapter_l(h) = h + Dropout(h·(U ⊙ s_l))·Uᵀ + b_l, with dropout p = ``dropout`` (0.1) on the bottleneck;
* placed after the LayerNorm, before the sub-layer, inside the residual branch (``attn_before`` for the
  attention adapter; ``arc`` also puts one at ``mlp_before``); ``arc_att`` has only the attention one;
* init: U xavier-uniform; s_att zeros (the attention adapter is the exact identity at init); s_mlp
  xavier-uniform on the 1×r row (latest official commit a8407d7, ±0.34 for r=50; ``mlp_scale_init:
  zeros`` restores the earlier identity init); b zeros.
* trained: U, s, b (and the head). Everything else frozen. The official VTAB script
  (``vtab_ARC_train.py`` + ``ARC_new.py``) unfreezes nothing but the head through a name mismatch; we follow
  the correct ``ARC_ViT.py`` freezing (tested: only-head training fails the tests).

Counts on ViT-B/16 excl. head: ``arc`` 2·768·50 + 12·2·(50+768) = 96,432; ``arc_att`` 48,216.

Head: the official head is zero-initialised (``zero_head=True``). ``zero_head: false`` (default) keeps the
suite's head init so every method starts from the same classifier (and ``arc_att`` is then exactly the
frozen model at step 0); ``zero_head: true`` reproduces the official init.

``merge`` folds each adapter into the next linear (qkv for the attention adapter, fc1 for the MLP
adapter): with M = I + U diag(s) Uᵀ (symmetric), W' = W·M and c' = c + W·b; parameter-free inference.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from methods.base import Method, register
from methods.blocks.merge import write_bias_

POSITIONS = {"attn": ("attn_before", "qkv"), "mlp": ("mlp_before", "fc1")}


class SharedProjections(nn.Module):
    """The shared down-projections U (one per position), attached once to the model (``petl_arc``)."""

    def __init__(self, dim: int, rank: int, positions, device=None):
        super().__init__()
        self.U = nn.ParameterDict({p: nn.Parameter(torch.empty(dim, rank, device=device)) for p in positions})
        if device is None or torch.device(device).type != "meta":
            for u in self.U.values():
                nn.init.xavier_uniform_(u)


class ARCAdapter(nn.Module):
    """h + Dropout(h·(U ⊙ s))·Uᵀ + b, with U read from the shared bank (not registered here)."""

    def __init__(self, bank: SharedProjections, position: str, dim: int, rank: int, scale_init: str = "zeros",
                 dropout: float = 0.1, device=None):
        super().__init__()
        if scale_init not in ("zeros", "xavier"):
            raise ValueError(f"method.mlp_scale_init must be 'zeros' or 'xavier' (got '{scale_init}')")
        self._bank = (bank,)  # a tuple: the shared U is registered once, on the model
        self.position = position
        self.scale = nn.Parameter(torch.zeros(1, rank, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if scale_init == "xavier" and self.scale.device.type != "meta":
            nn.init.xavier_uniform_(self.scale)

    @property
    def U(self) -> torch.Tensor:
        return self._bank[0].U[self.position]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        U = self.U
        return h + self.dropout(h @ (U * self.scale)) @ U.t() + self.bias

    def matrix(self) -> torch.Tensor:
        """M = I + U diag(s) Uᵀ, so that (dropout off) forward(h) = h·M + b."""
        U = self.U
        return torch.eye(U.shape[0], dtype=U.dtype, device=U.device) + (U * self.scale) @ U.t()


class _ARCBase(Method):
    families = ("vit", "video_vit")
    mergeable = True
    positions: tuple[str, ...] = ("attn", "mlp")

    def inject(self, model, sites):
        rank, dropout = int(self.get("rank", 50)), float(self.get("dropout", 0.1))
        mlp_init = str(self.get("mlp_scale_init", "xavier"))
        dev = sites.blocks[0].norm1.weight.device
        bank = SharedProjections(sites.embed_dim, rank, self.positions, device=dev)
        model.petl_arc = bank
        for b in sites:
            for pos in self.positions:
                key, _ = POSITIONS[pos]
                init = "zeros" if pos == "attn" else mlp_init
                b.extend(key, ARCAdapter(bank, pos, b.dim, rank, init, dropout, device=dev))
        if self.get("zero_head", False):
            head = model.get_classifier()
            if head.weight.device.type != "meta":
                with torch.no_grad():
                    head.weight.zero_()
                    if head.bias is not None:
                        head.bias.zero_()

    def merge(self, model):
        from backbones import sites as get_sites

        with torch.no_grad():
            for b in get_sites(model):
                for pos in self.positions:
                    key, lin_name = POSITIONS[pos]
                    if key not in b.block.petl:
                        continue
                    for ad in list(b.block.petl[key]):
                        lin = b.linear(lin_name)
                        if lin.bias is None:
                            raise ValueError(f"ARC merge needs a bias on {b.linear_path(lin_name)} to absorb the adapter bias")
                        W = lin.weight.data
                        M = ad.matrix().to(W.dtype)
                        write_bias_(lin, lin.bias + W @ ad.bias.to(W.dtype))
                        lin.weight.data = W @ M
                    del b.block.petl[key]
        if hasattr(model, "petl_arc"):
            del model.petl_arc
        return model


@register("arc")
class ARC(_ARCBase):
    positions = ("attn", "mlp")


@register("arc_att")
class ARCAtt(_ARCBase):
    identity_at_init = True  # s_att = 0, b = 0 (with the default zero_head: false)
    positions = ("attn",)
