"""UperNet (the anchors' ADE20K decoder: mmseg 0.11 ``UPerHead`` + auxiliary ``FCNHead``).

UPerHead, channels 512: a pyramid-pooling module on the last stage (adaptive average pools 1, 2, 3, 6, each
1×1 conv-BN-ReLU, upsampled and concatenated with the input, then a 3×3 conv-BN-ReLU); 1×1 lateral
conv-BN-ReLU on the other stages; top-down addition with bilinear upsampling; a 3×3 conv-BN-ReLU on each
level but the last; all levels upsampled to the finest, concatenated, fused by a 3×3 conv-BN-ReLU; Dropout2d
0.1; 1×1 classifier. Auxiliary FCN head on the third stage (C4): one 3×3 conv-BN-ReLU to 256, Dropout2d 0.1,
1×1 classifier, loss weight 0.4 (training only). Logits are resized to the input size (bilinear,
align_corners False). BatchNorm becomes SyncBatchNorm under DDP (``nn.SyncBatchNorm.convert_sync_batchnorm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbones.dense import register


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        ppm = [top] + [_up(m(top), top.shape[-2:]) for m in self.ppm]
        lat = [m(f) for m, f in zip(self.lateral, feats[:-1])] + [self.bottleneck(torch.cat(ppm, 1))]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[-2:])
        outs = [m(x) for m, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_up(o, size) for o in outs[1:]], 1))
        return self.cls(self.drop(fused))


class FCNHead(nn.Module):
    def __init__(self, cin: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(cin, channels, 3)
        self.drop = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.drop(self.conv(x)))


class UperNetDecoder(nn.Module):
    """``decoder(images [B,3,H,W], targets, features)`` → logits [B, K, H, W]; in training mode also the
    auxiliary logits (a tuple)."""

    def __init__(self, in_channels: list[int], num_classes: int, channels: int = 512, aux_channels: int = 256,
                 aux_index: int = 2, aux: bool = True):
        super().__init__()
        self.decode = UPerHead(in_channels, channels, num_classes)
        self.aux_index = min(aux_index, len(in_channels) - 1)
        self.aux = FCNHead(in_channels[self.aux_index], aux_channels, num_classes) if aux else None

    def forward(self, images, targets, features):
        feats = features(images)
        size = images.shape[-2:]
        logits = _up(self.decode(feats), size)
        if self.training and self.aux is not None:
            return logits, _up(self.aux(feats[self.aux_index]), size)
        return logits


@register("upernet")
def build_upernet(cfg, in_channels, num_classes, mean, std) -> nn.Module:
    return UperNetDecoder(in_channels, num_classes, int(cfg.get("channels", 512)), int(cfg.get("aux_channels", 256)),
                          int(cfg.get("aux_index", 2)), bool(cfg.get("aux", True)))
