"""Transformer blocks with extension points that PETL methods fill in.

With no extension installed, ``AdaptableBlock.forward`` is timm's ``Block.forward``: outputs are
bit-identical and the state-dict keys are the same. Extensions live in ``block.petl`` (an
``nn.ModuleDict``) under these keys, each an ``nn.ModuleList`` applied in order:

* ``tokens``        x -> x before the block (insert or replace prompt tokens)
* ``attn_before``   h -> h on norm1's output, before attention (sequential pre-adapter)
* ``attn_after``    y -> y on attention's output, before layer-scale/drop-path (sequential adapter)
* ``attn_parallel`` (x, h) -> delta added to the residual stream beside the attention branch
                    (x: branch input on the residual stream, h: norm1(x)); not under drop-path
* ``mid``           x -> x on the residual stream between the attention and the MLP branch
* ``mlp_before`` / ``mlp_after`` / ``mlp_parallel``  the same for the MLP branch (norm2)
* ``attn_inner`` / ``mlp_inner``  (x, h) -> delta added to the branch's own output, before layer-scale and
                    drop-path (a parallel adapter living inside the sub-layer, as V-PETL's Video-Swin AdaptFormer)
* ``out``           x -> x after the block

Swin blocks (``backbones.swin.AdaptableSwinBlock``) have every point but ``tokens`` and hand extensions
(B, H·W, C) sequences; ConvNeXt blocks (``backbones.convnext.AdaptableConvNeXtBlock``) have only
``mlp_before``/``mlp_after``/``mlp_parallel``/``out`` on channels-last maps. A block's ``extension_keys``
lists its points.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from timm.models.vision_transformer import Block

EXTENSION_KEYS = (
    "tokens",
    "attn_before",
    "attn_after",
    "attn_parallel",
    "mid",
    "mlp_before",
    "mlp_after",
    "mlp_parallel",
    "attn_inner",
    "mlp_inner",
    "out",
)


def add_extension(block: nn.Module, key: str, module: nn.Module) -> nn.Module:
    if key not in EXTENSION_KEYS:
        raise KeyError(f"unknown block extension '{key}'; known: {', '.join(EXTENSION_KEYS)}")
    allowed = getattr(block, "extension_keys", EXTENSION_KEYS)  # Swin/ConvNeXt blocks have fewer
    if key not in allowed:
        raise KeyError(f"block {type(block).__name__} has no extension point '{key}'; it has: {', '.join(allowed)}")
    if key not in block.petl:
        block.petl[key] = nn.ModuleList()
    block.petl[key].append(module)
    return module


def run_branch(
    x: torch.Tensor,
    norm: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    post: Callable[[torch.Tensor], torch.Tensor],
    ext: nn.ModuleDict,
    name: str,
) -> torch.Tensor:
    """x + post(fn(norm(x))) with the branch's extensions (post = layer-scale then drop-path)."""
    h = norm(x)
    y = h
    for m in ext[f"{name}_before"] if f"{name}_before" in ext else ():
        y = m(y)
    y = fn(y)
    for m in ext[f"{name}_after"] if f"{name}_after" in ext else ():
        y = m(y)
    for m in ext[f"{name}_inner"] if f"{name}_inner" in ext else ():
        y = y + m(x, h)
    out = x + post(y)
    for m in ext[f"{name}_parallel"] if f"{name}_parallel" in ext else ():
        out = out + m(x, h)
    return out


WINDOW_EXTENSION_KEYS = ("attn_before", "attn_after", "attn_parallel", "mid", "mlp_before", "mlp_after",
                         "mlp_parallel", "mlp_inner", "out")


def window_block_forward(block: nn.Module, x: torch.Tensor, attn: Callable[[torch.Tensor], torch.Tensor],
                         drop1: Callable, drop2: Callable) -> torch.Tensor:
    """A windowed (Swin-type) block with extensions, on a channels-last map x (B, ..., C).

    Every extension sees the tokens as a (B, N, C) sequence; ``attn`` maps the normed map (same shape as x)
    to the attention output. Shared by the 2-D Swin (timm) and the Video Swin (torchvision) blocks.
    """
    ext, shape = block.petl, x.shape
    block.petl_grid = tuple(shape[1:-1])  # the map's current size, for extensions that need the grid (Mona)
    seq = x.reshape(shape[0], -1, shape[-1])
    h = block.norm1(x).reshape(seq.shape)
    y = _apply_all(ext, "attn_before", h)
    y = attn(y.reshape(shape)).reshape(seq.shape)
    y = _apply_all(ext, "attn_after", y)
    out = seq + drop1(y)
    for m in ext["attn_parallel"] if "attn_parallel" in ext else ():
        out = out + m(seq, h)
    out = _apply_all(ext, "mid", out)
    out = run_branch(out, block.norm2, block.mlp, drop2, ext, "mlp")
    return _apply_all(ext, "out", out).reshape(shape)


def _apply_all(ext: nn.ModuleDict, key: str, x: torch.Tensor) -> torch.Tensor:
    for m in ext[key] if key in ext else ():
        x = m(x)
    return x


class AdaptableBlock(Block):
    """timm ViT block plus the extension points above (see module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.petl = nn.ModuleDict()

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        ext = self.petl
        if len(ext) == 0:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = _apply_all(ext, "tokens", x)

        def attn(h):
            return self.attn(h, attn_mask=attn_mask, is_causal=is_causal)

        x = run_branch(x, self.norm1, attn, lambda y: self.drop_path1(self.ls1(y)), ext, "attn")
        x = _apply_all(ext, "mid", x)
        x = run_branch(x, self.norm2, self.mlp, lambda y: self.drop_path2(self.ls2(y)), ext, "mlp")
        return _apply_all(ext, "out", x)
