"""The Swin family on timm's SwinTransformer, its blocks swapped for ``AdaptableSwinBlock``.

Official checkpoints are the Microsoft Swin repo's IN-22k ``.pth`` files (``swin_base_patch4_window7_224_22k.pth``,
``swin_large_patch4_window7_224_22k.pth``, key ``model``). Their layout differs from timm's in three ways,
all handled by timm's ``swin_transformer.checkpoint_filter_fn``: the patch-merging ``downsample`` sits at
the end of a stage there (``layers.i.downsample`` → timm's ``layers.{i+1}.downsample``), the buffers
``relative_position_index``/``attn_mask`` are stored (timm recomputes them), and the head is ``head.*``
(timm: ``head.fc.*``; dropped here). SNELL loads the same file into its own Swin code with the fused qkv.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, checkpoint_filter_fn

from backbones.blocks import WINDOW_EXTENSION_KEYS, window_block_forward
from backbones.checkpoint import check_keys, load_checkpoint
from bench.registry import BACKBONES

SWIN_ARGS = ("img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "qkv_bias")


class AdaptableSwinBlock(SwinTransformerBlock):
    """timm's Swin block plus the extension points of ``backbones.blocks`` except ``tokens`` (the window
    grid fixes the token count). With no extension, ``forward`` is timm's (bit-identical). With extensions,
    every extension sees the block's tokens as a (B, H·W, C) sequence (like a ViT without prefix tokens);
    the attention branch runs on the (B, H, W, C) map in between. Installed by class swap at build time
    (``adaptable_swin_block``), so timm builds the blocks exactly as it would.
    """

    extension_keys = WINDOW_EXTENSION_KEYS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.petl) == 0:
            return super().forward(x)
        return window_block_forward(self, x, self._attn, self.drop_path1, self.drop_path2)


def adaptable_swin_block(block: SwinTransformerBlock) -> AdaptableSwinBlock:
    block.__class__ = AdaptableSwinBlock
    block.petl = nn.ModuleDict()
    return block


def build_swin(cfg: Mapping[str, Any], num_classes: int, drop_path: float = 0.0, device: str | torch.device = "cpu"):
    """Build a Swin from a backbone config; load ``cfg.checkpoint`` if set (not on the meta device)."""
    check_keys(cfg, SWIN_ARGS)
    kwargs = {k: (tuple(cfg[k]) if k in ("depths", "num_heads") else cfg[k])
              for k in SWIN_ARGS if k in cfg and cfg[k] is not None}
    if len(kwargs.get("depths", (2, 2, 6, 2))) != len(kwargs.get("num_heads", (3, 6, 12, 24))):
        raise ValueError(f"backbone '{cfg.get('name')}': backbone.depths and backbone.num_heads need one entry per "
                         f"stage (got {list(kwargs.get('depths', []))} and {list(kwargs.get('num_heads', []))})")
    model = SwinTransformer(num_classes=num_classes, drop_path_rate=drop_path, global_pool="avg", device=device,
                            **kwargs)
    for layer in model.layers:
        for blk in layer.blocks:
            adaptable_swin_block(blk)
    model.petl_family = "swin"
    model.petl_name = cfg.get("name", "swin")
    ckpt = cfg.get("checkpoint")
    if ckpt and torch.device(device).type != "meta":
        load_checkpoint(model, ckpt, model.petl_name, filter_fn=checkpoint_filter_fn, head_prefixes=("head.",))
    return model


for _name in ("swin_b", "swin_l", "swin_micro"):
    BACKBONES.add(_name, build_swin)
