"""The ViT family on timm's VisionTransformer, built with ``AdaptableBlock`` blocks.

Checkpoints (``backbone.checkpoint=PATH``; format detected from the file, see ``backbones.checkpoint``):

* supervised IN-21k ``ViT-B_16.npz`` / ``ViT-L_16.npz`` / ``ViT-H_14.npz`` (the original 2020 Google release,
  = timm ``vit_*.orig_in21k``): read by timm's own ``_load_weights``; the npz 21k head and pre-logits are ignored;
* MAE ``mae_pretrain_vit_base.pth`` (key ``model``, timm names; decoder keys, if any, are dropped);
* MoCo v3 ``linear-vit-b-300ep.pth.tar`` (key ``state_dict``, ``module.`` prefixes, timm names since MoCo's
  ``VisionTransformerMoCo`` subclasses timm's ViT; its head is dropped) or the pre-training
  ``vit-b-300ep.pth.tar`` (``module.base_encoder.`` prefix, as MoCo's ``convert_to_deit.py`` reads it);
* any timm ViT ``.pth``/``.safetensors`` state dict (through timm's ``checkpoint_filter_fn``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from backbones.blocks import AdaptableBlock
from backbones.checkpoint import load_checkpoint, prepare_vit
from bench.registry import BACKBONES

VIT_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token", "global_pool")


def build_vit(cfg: Mapping[str, Any], num_classes: int, drop_path: float = 0.0, device: str | torch.device = "cpu"):
    """Build a ViT from a backbone config; load ``cfg.checkpoint`` if set (not on the meta device)."""
    kwargs = {k: cfg[k] for k in VIT_ARGS if k in cfg and cfg[k] is not None}
    kwargs.setdefault("global_pool", "token")
    model = VisionTransformer(
        num_classes=num_classes,
        drop_path_rate=drop_path,
        block_fn=AdaptableBlock,
        norm_layer=None,  # timm default: LayerNorm eps 1e-6
        device=device,
        **kwargs,
    )
    model.petl_family = "vit"
    model.petl_name = cfg.get("name", "vit")
    ckpt = cfg.get("checkpoint")
    if ckpt and torch.device(device).type != "meta":
        load_checkpoint(model, ckpt, model.petl_name, filter_fn=checkpoint_filter_fn, prepare=prepare_vit, allow_npz=True)
    return model


for _name in ("vit_b16", "vit_b16_mae", "vit_b16_mocov3", "vit_l16", "vit_h14", "vit_micro"):
    BACKBONES.add(_name, build_vit)
