"""Backbones: builders registered by config name, plus the uniform ``sites`` view for methods."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from bench.registry import BACKBONES
from backbones import convnext, swin, video_swin, video_vit, vit  # noqa: F401  (register the families)
from backbones.sites import MethodNotDefinedError, Sites, sites

__all__ = ["build", "sites", "Sites", "MethodNotDefinedError", "head_of"]


def build(cfg: Mapping[str, Any], num_classes: int, drop_path: float = 0.0, device: str | torch.device = "cpu") -> nn.Module:
    builder = BACKBONES.get(cfg["name"])
    return builder(cfg, num_classes=num_classes, drop_path=drop_path, device=device)


def head_of(model: nn.Module) -> nn.Module:
    """The task classifier (what every method trains and what counts as 'head' parameters)."""
    return model.get_classifier()
