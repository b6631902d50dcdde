"""The backbone slot of a torchvision detector: our Swin stage outputs → torchvision's FPN.

torchvision detectors call ``self.backbone(images.tensors)`` and expect an ordered dict of 256-channel maps.
``FeatureSlot`` holds only the FPN (decoder parameters); the Swin features come from the function the
``SwinDet`` hands in for the duration of one call (``using``), so the backbone is never registered twice.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7


class FeatureSlot(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, extra: str = "maxpool",
                 in_levels: Optional[Sequence[int]] = None):
        super().__init__()
        self.in_levels = list(range(len(in_channels))) if in_levels is None else list(in_levels)
        chans = [in_channels[i] for i in self.in_levels]
        if extra == "maxpool":  # mmdet FPN num_outs = levels + 1: max-pool P6 (Mask/Cascade R-CNN)
            blocks = LastLevelMaxPool()
        elif extra == "p6p7":   # RetinaNet add_extra_convs='on_input': P6 from C5, P7 from P6
            blocks = LastLevelP6P7(chans[-1], out_channels)
        elif extra == "none":
            blocks = None
        else:
            raise ValueError(f"decoder.fpn_extra={extra}: choose maxpool, p6p7 or none")
        self.fpn = FeaturePyramidNetwork(chans, out_channels, extra_blocks=blocks)
        self.out_channels = out_channels
        self._features: Optional[Callable[[torch.Tensor], list]] = None

    @contextlib.contextmanager
    def using(self, features: Callable[[torch.Tensor], list]):
        self._features = features
        try:
            yield
        finally:
            self._features = None

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if self._features is None:
            raise RuntimeError("FeatureSlot called outside SwinDet.forward (no backbone features bound)")
        feats = self._features(x)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.in_levels)))


def min_sizes(cfg, default: int) -> tuple[int, ...]:
    """``decoder.min_size``: one short side, or several (multi-scale training picks one per image)."""
    v = cfg.get("min_size", default)
    return (int(v),) if isinstance(v, (int, float)) else tuple(int(x) for x in v)
