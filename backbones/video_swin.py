"""Video Swin (family ``video_swin``) on torchvision's ``SwinTransformer3d``, with PETL extension points.

torchvision's ``swin3d_b`` is the Video Swin-B architecture parameter for parameter (patch 2×4×4, dim 128,
depths 2,2,18,2, heads 4,8,16,32, window 8×7×7 clamped to the input — 4×7×7 at 8 frames —, the same
2535-row relative-position tables and patch-merging order; 87,638,984 parameters without the head), so it is
used as is with two class swaps made at build time:

* blocks become ``AdaptableVideoSwinBlock``: with no extension the forward is torchvision's; with
  extensions every extension sees the block's tokens as a (B, T·H·W, C) sequence, as on the 2-D Swin;
* window attention becomes ``AdaptableWindowAttention3d``: torchvision's functional attention reads
  ``qkv.weight``/``proj.weight`` directly, which would bypass a method's wrapped linears, so the same
  computation (pad → cyclic shift → windows → attention with relative-position bias and the −100 shift
  mask → merge → unshift → unpad) is written out with ``self.qkv(...)``/``self.proj(...)`` module calls
  (equal to torchvision's to float precision; a test checks). ``kv_prefix`` (optional) supplies prefix keys
  and values shared by every window of the layer (prefix tuning); their logits get no relative-position
  bias and no mask.

Head: the final LayerNorm, then ``head_pool``: ``vpetl`` (default; V-PETL's head: 3-D average pooling with
kernel (2, H', W') and stride 1, a per-position linear classifier, mean over positions — a linear
classifier on a temporal average with the end positions at half weight) or ``avg`` (global mean, as
torchvision/mmaction's I3D head); then ``head`` (Linear).

Checkpoints: the Video Swin release ``swin_base_patch244_window877_kinetics400_22k.pth`` (key
``state_dict``, mmaction layout ``backbone.layers.i.blocks.j.*``, ``backbone.layers.i.downsample.*``,
``cls_head.*``), remapped to torchvision's names (``features.{2i}.{j}.*`` with ``mlp.fc1/fc2`` →
``mlp.0/mlp.3``, ``features.{2i+1}.*``); the stored ``relative_position_index`` buffers and the
classifier are dropped. A torchvision ``swin3d_*`` state dict loads directly.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.video.swin_transformer import (
    ShiftedWindowAttention3d,
    SwinTransformer3d,
    _compute_attention_mask_3d,
    _compute_pad_size_3d,
    _get_window_and_shift_size,
)
from torchvision.models.swin_transformer import SwinTransformerBlock

from backbones.blocks import WINDOW_EXTENSION_KEYS, window_block_forward
from backbones.checkpoint import check_keys, load_checkpoint
from bench.registry import BACKBONES

VIDEO_SWIN_ARGS = ("patch_size", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "num_frames",
                   "frame_stride", "head_pool")


class AdaptableWindowAttention3d(ShiftedWindowAttention3d):
    """torchvision's 3-D (shifted) window attention through its ``qkv``/``proj`` modules (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        window, shift = _get_window_and_shift_size(list(self.shift_size), [t, h, w], list(self.window_size))
        bias = self.get_relative_position_bias(window)
        pad = _compute_pad_size_3d((t, h, w), tuple(window))
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        _, tp, hp, wp, _ = x.shape
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
        grid = (tp // window[0], hp // window[1], wp // window[2])
        nw, n = grid[0] * grid[1] * grid[2], window[0] * window[1] * window[2]
        x = x.view(b, grid[0], window[0], grid[1], window[1], grid[2], window[2], c)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * nw, n, c)

        heads, hd = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).reshape(b * nw, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1) + bias
        if sum(shift) > 0:
            mask = _compute_attention_mask_3d(x, (tp, hp, wp), tuple(window), tuple(shift))
            attn = (attn.view(b, nw, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
        prefix = self._modules.get("kv_prefix")  # set by prefix tuning: a module returning (P_k, P_v), (L, C) each
        if prefix is not None:
            pk, pv = prefix()
            pk = pk.to(q.dtype).view(1, -1, heads, hd).transpose(1, 2)  # 1, heads, L, hd: shared by all windows
            pv = pv.to(v.dtype).view(1, -1, heads, hd).transpose(1, 2)
            attn = torch.cat([q @ pk.transpose(-2, -1), attn], dim=-1)
            v = torch.cat([pv.expand(v.shape[0], -1, -1, -1), v], dim=2)
        attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        x = (attn @ v).transpose(1, 2).reshape(b * nw, n, c)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)

        x = x.view(b, grid[0], grid[1], grid[2], window[0], window[1], window[2], c)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
        return x[:, :t, :h, :w, :].contiguous()


class AdaptableVideoSwinBlock(SwinTransformerBlock):
    """torchvision's Swin block (x: B, T, H, W, C) plus the extension points of ``backbones.blocks`` except
    ``tokens``; extensions see (B, T·H·W, C). The block's ``stochastic_depth`` is the drop-path."""

    extension_keys = WINDOW_EXTENSION_KEYS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.petl) == 0:
            return super().forward(x)
        return window_block_forward(self, x, self.attn, self.stochastic_depth, self.stochastic_depth)


class VideoSwin(SwinTransformer3d):
    """``SwinTransformer3d`` with the suite's head (``head_pool``) and timm's ``get_classifier``."""

    head_pool = "vpetl"

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"a video backbone takes clips [B, 3, T, H, W], got a tensor of shape {tuple(x.shape)}")
        x = self.features(self.pos_drop(self.patch_embed(x)))
        return self.norm(x).permute(0, 4, 1, 2, 3)  # B, C, T', H', W'

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_pool == "avg" or x.shape[2] == 1:
            return x.mean((2, 3, 4))
        # V-PETL: avg_pool3d(kernel (2, H', W'), stride 1) -> (T'-1) positions, classifier per position, mean
        return F.avg_pool3d(x, (2, x.shape[3], x.shape[4]), stride=1).mean((2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(x)))


def build_video_swin(cfg: Mapping[str, Any], num_classes: int, drop_path: float = 0.0, device: str | torch.device = "cpu"):
    check_keys(cfg, VIDEO_SWIN_ARGS)
    pool = str(cfg.get("head_pool", "vpetl"))
    if pool not in ("vpetl", "avg"):
        raise ValueError(f"backbone '{cfg.get('name')}': backbone.head_pool={pool} must be vpetl or avg")
    with torch.device(device):
        model = VideoSwin(patch_size=list(cfg["patch_size"]), embed_dim=int(cfg["embed_dim"]),
                          depths=list(cfg["depths"]), num_heads=list(cfg["num_heads"]),
                          window_size=list(cfg["window_size"]), mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
                          stochastic_depth_prob=drop_path, num_classes=num_classes)
    model.head_pool = pool
    for stage in model.features[0::2]:
        for blk in stage:
            blk.__class__ = AdaptableVideoSwinBlock
            blk.petl = nn.ModuleDict()
            blk.attn.__class__ = AdaptableWindowAttention3d
    model.petl_family = "video_swin"
    model.petl_name = cfg.get("name", "video_swin")
    ckpt = cfg.get("checkpoint")
    if ckpt and torch.device(device).type != "meta":
        load_checkpoint(model, ckpt, model.petl_name, prepare=functools.partial(official_to_torchvision, model=model),
                        head_prefixes=("head.", "cls_head."))
    return model


def official_to_torchvision(sd: dict, model: nn.Module) -> dict:
    """Video Swin release (mmaction layout) → torchvision ``SwinTransformer3d`` names (see module doc). The
    relative-position index buffers are not taken from files (they are a function of the window): the
    model's own are kept."""
    index = {k: v for k, v in model.state_dict().items() if k.endswith("relative_position_index")}
    if not any(k.startswith("backbone.") for k in sd):
        return {**{k: v for k, v in sd.items() if not k.endswith("relative_position_index")}, **index}
    out = dict(index)
    for k, v in sd.items():
        if not k.startswith("backbone.") or k.endswith(("relative_position_index", "attn_mask")):
            continue
        k = k[len("backbone."):]
        parts = k.split(".")
        if parts[0] == "layers":
            i = int(parts[1])
            if parts[2] == "blocks":
                rest = ".".join(parts[4:]).replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
                k = f"features.{2 * i}.{parts[3]}.{rest}"
            elif parts[2] == "downsample":
                k = f"features.{2 * i + 1}.{'.'.join(parts[3:])}"
        out[k] = v
    return out


for _name in ("video_swin_b", "video_swin_micro"):
    BACKBONES.add(_name, build_video_swin)
