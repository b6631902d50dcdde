"""Dense-prediction decoders (the ``head`` of a ``backbones.swin_det.SwinDet``), built from a dataset's
``decoder`` config: ``retinanet`` (VOC), ``cascade_mask_rcnn`` / ``mask_rcnn`` (COCO), ``upernet`` (ADE20K).

Each decoder is called as ``decoder(images, targets, features)`` where ``features`` maps a padded image batch
[B, 3, H, W] to the backbone's channels-first stage outputs; detection decoders are torchvision detectors
(their own resize/normalise/pad transform, losses and post-processing), segmentation returns logits.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

DECODERS: dict[str, Any] = {}


def register(name: str):
    def deco(fn):
        DECODERS[name] = fn
        return fn
    return deco


def build_decoder(cfg: Mapping[str, Any], in_channels: Sequence[int], num_classes: int, mean, std) -> nn.Module:
    from backbones.dense import rcnn, retinanet, upernet  # noqa: F401  (register)

    name = str(cfg.get("name"))
    if name not in DECODERS:
        raise ValueError(f"unknown decoder dataset.decoder.name={name}; known: {', '.join(sorted(DECODERS))}")
    return DECODERS[name](cfg, list(in_channels), int(num_classes), list(mean), list(std))
