"""DTL (Fu et al., AAAI 2024): disentangled transfer learning with a compact side network.

Official code (heekhero/DTL ``models/vision_transformer.py``, ``train_vit_vtab.py``): a side stream
R accumulates low-rank projections of the backbone's token stream, ``R ← R + B_i A_i x_i`` with x_i the
input of block i for i in ``lora_before_blocks`` (default 0–11); after each block in
``add_after_blocks`` (default 6–11) the backbone stream gets ``x ← x + swish_β(R)`` with
swish_β(t) = t·σ(βt), β = 100. A_i: r×dim kaiming-uniform(a=√5), B_i: dim×r **zero**, no bias, no
scaling, r = 2. The head reads **GAP over the patch tokens → the pretrained final LayerNorm (frozen)
→ head** instead of the class token. ViT-B/16: 12·2·768·2 = 36,864 parameters. DTL+ (``fusion_size``
3) adds a depthwise 3×3 conv (no bias, PyTorch default init) on the patch part of swish(R) before it is
added (one conv shared by all adding blocks, +6,912).

Implementation: a ``tokens`` extension before each collecting block updates R (a per-forward state
shared by this method's modules, cleared after the last block), an ``out`` extension after each adding
block adds swish_β(R); the pooling is switched with timm's own switches (``global_pool='avg'``, the
final norm moved from ``norm`` to ``fc_norm``), so no backbone code is copied. ``pool: token`` keeps the
backbone's class-token head (a deviation, for ablations).

Deviations: the official argparse default is DTL+ (``--fusion_size 3``); this method's default is plain
DTL (``fusion_size: 0``), the variant with the 36,864 count the benchmark lists. Because the head reads
GAP→LN, the logits at step 0 equal the frozen backbone's *with the same GAP→LN head* (B = 0 ⇒ R = 0),
not the class-token model's, so ``identity_at_init`` is False (tested against the re-pooled reference).
Not mergeable. The official code also has a Swin variant; ``families=("vit",)`` for now.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from methods.base import Method, register
from methods.blocks.lora import LowRank


def parse_blocks(spec, depth: int, key: str) -> list[int]:
    """'0-11' / '6-11' / [6, 7] / '3' -> block indices (the official ``parse_block_info`` format)."""
    if isinstance(spec, (list, tuple)):
        out = [int(v) for v in spec]
    else:
        s = str(spec).strip()
        out = []
        for part in s.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    bad = [i for i in out if not 0 <= i < depth]
    if bad:
        raise ValueError(f"method.{key}={spec!r}: blocks {bad} outside 0..{depth - 1}")
    return sorted(set(out))


class _SideState:
    """The side stream R of the current forward pass (not a module: holds no parameters)."""

    def __init__(self):
        self.R: Optional[torch.Tensor] = None


class DTLCollect(nn.Module):
    """``tokens`` extension: R ← R + B A x (and R reset at the first block)."""

    def __init__(self, state: _SideState, lowrank: Optional[LowRank], reset: bool):
        super().__init__()
        self._state = state
        self.lowrank = lowrank
        self.reset = reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reset:
            self._state.R = None
        if self.lowrank is not None:
            d = self.lowrank(x)
            self._state.R = d if self._state.R is None else self._state.R + d
        return x


class DTLAdd(nn.Module):
    """``out`` extension: x ← x + swish_β(R) (DTL+: depthwise conv on the patch part); clears R at the end."""

    def __init__(self, state: _SideState, beta: float, add: bool, clear: bool, prefix: int,
                 fusion: Optional[nn.Conv2d] = None, grid: tuple[int, int] = (0, 0), owns_fusion: bool = False):
        super().__init__()
        self._state = state
        self.beta, self.add, self.clear, self.prefix, self.grid = float(beta), add, clear, prefix, tuple(grid)
        # the shared DTL+ conv is registered once (in the first adding block), referenced by the others
        if owns_fusion:
            self.fusion = fusion
        else:
            self._fusion = [fusion]

    @property
    def fusion_conv(self) -> Optional[nn.Conv2d]:
        return self._modules["fusion"] if "fusion" in self._modules else self._fusion[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R = self._state.R
        if self.clear:
            self._state.R = None
        if not self.add or R is None:
            return x
        a = R * torch.sigmoid(self.beta * R)
        if self.fusion_conv is not None:
            B, N, C = a.shape
            gh, gw = self.grid
            p = self.prefix
            patches = a[:, p:].reshape(B, gh, gw, C).permute(0, 3, 1, 2)
            patches = self.fusion_conv(patches).permute(0, 2, 3, 1).reshape(B, gh * gw, C)
            a = torch.cat([a[:, :p], patches], dim=1)
        return x + a


@register("dtl")
class DTL(Method):
    families = ("vit",)
    identity_at_init = False  # equal to the frozen backbone with the same GAP->LN head (see docstring)

    def inject(self, model, sites):
        depth = len(sites)
        rank, beta = int(self.get("rank", 2)), float(self.get("beta", 100.0))
        # null = the official 0-11 / 6-11 on 12 blocks; on other depths all blocks / the second half
        collect = parse_blocks(self.get("lora_before_blocks", f"0-{depth - 1}"), depth, "lora_before_blocks")
        add = parse_blocks(self.get("add_after_blocks", f"{depth // 2}-{depth - 1}"), depth, "add_after_blocks")
        fusion_size = int(self.get("fusion_size", 0))
        pool = str(self.get("pool", "avg_ln"))
        if pool not in ("avg_ln", "token"):
            raise ValueError(f"method.pool={pool!r} for dtl: choose avg_ln (official) or token")
        state = _SideState()
        dim, dev = sites.embed_dim, sites.blocks[0].norm1.weight.device
        grid = tuple(sites.patch_embed.grid_size)
        shared_fusion = None
        if fusion_size > 0:  # one depthwise conv shared by every adding block, as the official lora_fusion
            shared_fusion = nn.Conv2d(dim, dim, fusion_size, 1, padding="same", groups=dim, bias=False, device=dev)
        for b in sites:
            i = b.index
            lr = LowRank(dim, dim, rank, device=dev) if i in collect else None
            if lr is not None or i == 0:
                b.extend("tokens", DTLCollect(state, lr, reset=(i == 0)))
            last = i == depth - 1
            if i in add or last:
                owner = i in add and shared_fusion is not None and i == add[0]
                b.extend("out", DTLAdd(state, beta, add=i in add, clear=last, prefix=sites.num_prefix_tokens,
                                       fusion=shared_fusion if i in add else None, grid=grid, owns_fusion=owner))
        if pool == "avg_ln":
            use_gap_then_norm(model)


def use_gap_then_norm(model: nn.Module) -> None:
    """timm ViT head: mean over the patch tokens, then the (pretrained) final norm, then the head."""
    if not isinstance(model.fc_norm, nn.Identity):
        raise ValueError("dtl pool=avg_ln expects a class-token ViT (fc_norm unused); set method.pool=token")
    model.global_pool = "avg"
    model.fc_norm = model.norm
    model.norm = nn.Identity()
