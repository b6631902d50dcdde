"""The ConvNeXt family on timm's ConvNeXt, its blocks swapped for ``AdaptableConvNeXtBlock``.

Official checkpoints are the FB ConvNeXt repo's IN-22k ``.pth`` files (``convnext_base_22k_224.pth``, key
``model``); timm's ``convnext.checkpoint_filter_fn`` maps its names (``downsample_layers.0`` → ``stem``,
``downsample_layers.i`` → ``stages.i.downsample``, ``stages.i.j`` → ``stages.i.blocks.j``, ``dwconv`` →
``conv_dw``, ``pwconv1/2`` → ``mlp.fc1/2``, final ``norm`` → ``head.norm``, ``head`` → ``head.fc``), the same
renaming SNELL does by hand. ``head.norm`` (the final LayerNorm after pooling) is backbone, loaded and
frozen; only ``head.fc`` is the task head. (SNELL's ConvNeXt trains ``head.norm`` too, 2,048 parameters on
ConvNeXt-B, because its trainable-name filter matches "head"; here it counts as backbone.) The block MLP is channels-last ``Linear`` (``conv_mlp=False``,
timm's default and the FB layout), which is what LoRA-like methods need.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, checkpoint_filter_fn

from backbones.blocks import _apply_all
from backbones.checkpoint import check_keys, load_checkpoint
from bench.registry import BACKBONES

CONVNEXT_ARGS = ("depths", "dims", "patch_size", "ls_init_value")


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _cf(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


class AdaptableConvNeXtBlock(ConvNeXtBlock):
    """timm's ConvNeXt block with the MLP-branch extension points and ``out``.

    The block is x + drop_path(γ · fc2(act(fc1(norm(dwconv(x)))))); ``norm`` is the only norm and sits
    in front of the MLP (it plays ``norm2``). Extensions see channels-last maps (B, H, W, C):
    ``mlp_before`` on norm's output, ``mlp_after`` on fc2's output before the layer scale γ and drop-path,
    ``mlp_parallel(x, h)`` with x the block input and h norm's output, added to the residual stream, and
    ``out`` after the block. There is no attention branch, no token sequence and no second residual
    point, so ``tokens``/``attn_*``/``mid`` do not exist here. With no extension, ``forward`` is timm's.
    """

    extension_keys = ("mlp_before", "mlp_after", "mlp_parallel", "out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = self.petl
        if len(ext) == 0:
            return super().forward(x)
        shortcut = x
        h = self.norm(_cl(self.conv_dw(x)))
        y = _apply_all(ext, "mlp_before", h)
        y = self.mlp(y)
        y = _cf(_apply_all(ext, "mlp_after", y))
        if self.gamma is not None:
            y = y.mul(self.gamma.reshape(1, -1, 1, 1))
        out = self.drop_path(y) + self.shortcut(shortcut)
        for m in ext["mlp_parallel"] if "mlp_parallel" in ext else ():
            out = out + _cf(m(_cl(shortcut), h))
        if "out" in ext:
            out = _cf(_apply_all(ext, "out", _cl(out)))
        return out


def adaptable_convnext_block(block: ConvNeXtBlock) -> AdaptableConvNeXtBlock:
    if block.use_conv_mlp:
        raise ValueError("ConvNeXt with conv_mlp=True is not supported: PETL sites need the Linear MLP")
    block.__class__ = AdaptableConvNeXtBlock
    block.petl = nn.ModuleDict()
    return block


def build_convnext(cfg: Mapping[str, Any], num_classes: int, drop_path: float = 0.0,
                   device: str | torch.device = "cpu"):
    """Build a ConvNeXt from a backbone config; load ``cfg.checkpoint`` if set (not on the meta device)."""
    check_keys(cfg, CONVNEXT_ARGS)
    kwargs = {k: (tuple(cfg[k]) if k in ("depths", "dims") else cfg[k])
              for k in CONVNEXT_ARGS if k in cfg and cfg[k] is not None}
    if len(kwargs.get("depths", (3, 3, 9, 3))) != 4 or len(kwargs.get("dims", (96, 192, 384, 768))) != 4:
        raise ValueError(f"backbone '{cfg.get('name')}': backbone.depths and backbone.dims need 4 entries, one per "
                         f"ConvNeXt stage (got {list(kwargs.get('depths', []))} and {list(kwargs.get('dims', []))})")
    model = ConvNeXt(num_classes=num_classes, drop_path_rate=drop_path, conv_mlp=False, global_pool="avg",
                     device=device, **kwargs)
    for stage in model.stages:
        for blk in stage.blocks:
            adaptable_convnext_block(blk)
    model.petl_family = "convnext"
    model.petl_name = cfg.get("name", "convnext")
    ckpt = cfg.get("checkpoint")
    if ckpt and torch.device(device).type != "meta":
        load_checkpoint(model, ckpt, model.petl_name, filter_fn=checkpoint_filter_fn, head_prefixes=("head.fc.",))
    return model


for _name in ("convnext_b", "convnext_micro"):
    BACKBONES.add(_name, build_convnext)
