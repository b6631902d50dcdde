"""Swin as a dense-prediction backbone: the mmdet/mmseg "Swin-Det" flavour (spec video_dense.md §B2).

Built on timm's SwinTransformer (same blocks, same parameter names, so every Swin method applies unchanged)
with what the detection/segmentation code of the anchors (Leiyi-Hu/mona, mmdet 2.11 / mmseg 0.11) does:

* any input size: the image is padded right/bottom to a multiple of the patch size; inside every block the
  normed map is padded to a multiple of the window **before** the cyclic shift (mmdet's order; timm rolls
  first), with the shifted-window mask built for the padded size (cached per size), and cropped after the
  reverse shift; patch merging pads odd sizes (timm does);
* windows never shrink to the feature size (``always_partition``): window 7 and shift 3 on every stage;
* no final ``norm``: one new LayerNorm ``norm{i}`` per output stage i (weight 1, bias 0), applied to the stage
  output, returned channels-first [B, C_i, H_i, W_i] (strides 4, 8, 16, 32 on Swin-B/L);
* ``head`` is the task decoder (FPN + detector heads, or UperNet), attached by the dense task kinds and
  counted as the head (trainable for every method, excluded from the method's parameter count).

Totals with norm0–3 (no decoder): Swin-B 86,745,016, Swin-L 194,998,164 (tested). Checkpoints: the official
Swin 22k classification ``.pth`` (key ``model``; ``head.*``, ``norm.*``, ``attn_mask``, ``relative_position_index``
dropped, Microsoft stage layout remapped by timm's filter), an mmdet/mmseg checkpoint (``state_dict`` with
``backbone.*`` keys: the backbone part is taken), or the suite's own timm-layout files (``swin_micro``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn, window_partition, window_reverse

from backbones.checkpoint import check_keys, load_checkpoint
from backbones.swin import SWIN_ARGS, AdaptableSwinBlock


class DetSwinBlock(AdaptableSwinBlock):
    """A Swin block taking any (H, W): pad to the window grid, then shift (mmdet's order)."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        wh, ww = self.window_size
        pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        sh, sw = self.shift_size
        shifted = any(self.shift_size)
        if shifted:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, wh * ww, C)
        mask = self._padded_mask(Hp, Wp, x.device, x.dtype) if shifted else None
        out = self.attn(windows, mask=mask).view(-1, wh, ww, C)
        x = window_reverse(out, self.window_size, Hp, Wp)
        if shifted:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()

    def _padded_mask(self, Hp: int, Wp: int, device, dtype) -> torch.Tensor:
        key = (Hp, Wp, device, dtype)
        cache = self.__dict__.setdefault("_mask_cache", {})
        if key not in cache:
            if len(cache) > 16:
                cache.clear()
            (wh, ww), (sh, sw) = self.window_size, self.shift_size
            img = torch.zeros((1, Hp, Wp, 1), device=device, dtype=dtype)
            cnt = 0
            for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
                for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
                    img[:, hs, ws, :] = cnt
                    cnt += 1
            win = window_partition(img, self.window_size).view(-1, wh * ww)
            diff = win.unsqueeze(1) - win.unsqueeze(2)
            cache[key] = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        return cache[key]


class SwinDet(SwinTransformer):
    """timm's SwinTransformer in the Swin-Det flavour (module doc). ``forward_features`` returns the list
    of normed stage outputs [B, C_i, H_i, W_i] for ``out_indices``; ``forward`` runs the decoder ``head``."""

    def init_dense(self, out_indices: Sequence[int]) -> None:
        self.out_indices = tuple(int(i) for i in out_indices)
        dims = [int(layer.blocks[0].norm1.normalized_shape[0]) for layer in self.layers]
        bad = [i for i in self.out_indices if not 0 <= i < len(dims)]
        if bad:
            raise ValueError(f"dense backbone out_indices {list(self.out_indices)}: this Swin has stages 0..{len(dims) - 1}")
        del self.norm
        self.head = nn.Identity()
        for i in range(len(dims)):  # one per stage, as the anchors' counts (norm0-3 also when VOC reads C3-C5)
            self.add_module(f"norm{i}", nn.LayerNorm(dims[i], device=self.layers[0].blocks[0].norm1.weight.device))
        self.out_channels = [dims[i] for i in self.out_indices]
        self.out_strides = [self.patch_embed.patch_size[0] * 2 ** i for i in self.out_indices]
        self.petl_no_grad = False   # E3VA: the frozen backbone runs without autograd
        self.petl_stage_taps: Optional[nn.Module] = None  # E3VA: (stage, normed map, sequence) -> map

    def get_classifier(self) -> nn.Module:
        return self.head

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channels-last stage outputs (before the output norms), for every stage."""
        p = self.patch_embed.patch_size
        ph, pw = (p[0] - x.shape[-2] % p[0]) % p[0], (p[1] - x.shape[-1] % p[1]) % p[1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        x = self.patch_embed(x)
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        self.petl_stage_shapes = [tuple(o.shape) for o in outs]
        return outs

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad() if self.petl_no_grad and torch.is_grad_enabled() else _null():
            maps = self.stage_maps(x)
            normed = [(i, getattr(self, f"norm{i}")(maps[i])) for i in self.out_indices]
        if self.petl_stage_taps is not None:
            normed = [(i, self.petl_stage_taps(i, y)) for i, y in normed]
        return [y.permute(0, 3, 1, 2).contiguous() for _, y in normed]

    def forward(self, images, targets=None):
        return self.head(images, targets, self.forward_features)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def dense_checkpoint_filter(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Official Swin classification files, mmdet/mmseg detector files (``backbone.*``) or timm-layout files
    → this model's keys (the decoder and the classification ``norm``/``head`` are dropped)."""
    sd = state_dict.get("model", state_dict.get("state_dict", state_dict))
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") or k.startswith("norm.")
                                               or k.startswith("neck.") or k.startswith("decode_head."))}
    if "layers.0.downsample.reduction.weight" in sd:  # Microsoft layout: merging at the end of a stage
        sd = checkpoint_filter_fn(sd, model)
    return {k: v for k, v in sd.items() if "attn_mask" not in k and "relative_position_index" not in k}


def build_swin_det(cfg: Mapping[str, Any], out_indices: Optional[Sequence[int]] = None, drop_path: float = 0.0,
                   device: str | torch.device = "cpu") -> SwinDet:
    check_keys(cfg, SWIN_ARGS)
    kwargs = {k: (tuple(cfg[k]) if k in ("depths", "num_heads") else cfg[k])
              for k in SWIN_ARGS if k in cfg and cfg[k] is not None}
    model = SwinDet(num_classes=0, drop_path_rate=drop_path, global_pool="avg", always_partition=True,
                    strict_img_size=False, device=device, **kwargs)
    for layer in model.layers:
        for blk in layer.blocks:
            blk.__class__ = DetSwinBlock
            blk.petl = nn.ModuleDict()
    model.init_dense(range(len(model.layers)) if out_indices is None else out_indices)
    model.petl_family = "swin"
    model.petl_name = cfg.get("name", "swin")
    model.petl_dense = True
    ckpt = cfg.get("checkpoint")
    if ckpt and torch.device(device).type != "meta":
        # norm{i} are new (identity affine) and the decoder is built later: only the backbone must match
        load_checkpoint(model, ckpt, model.petl_name, filter_fn=dense_checkpoint_filter,
                        head_prefixes=("head.",), allow_missing=tuple(f"norm{i}." for i in model.out_indices))
    return model


def frozen_patch_embed(model: SwinDet) -> None:
    """mmdet ``frozen_stages=1`` (the VOC recipe): the patch embedding is frozen even for full fine-tuning."""
    for p in model.patch_embed.parameters():
        p.requires_grad_(False)


FeaturesFn = Callable[[torch.Tensor], list]
