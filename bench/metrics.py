"""Metrics: top-1 accuracy, parameter counts and PPT."""
from __future__ import annotations

import math

import torch
from torch import nn


def ppt(top1: float, params: float, c: float = 1e7) -> float:
    """V-PETL Bench's Performance-Parameter Trade-off: top1 · exp(−log10(P/C + 1)).

    ``top1`` is a fraction in [0, 1], ``params`` the trainable parameters excluding the head.
    PPT(0.7144, 0.16e6) = 0.7095.
    """
    return float(top1) * math.exp(-math.log10(float(params) / c + 1.0))


def count_params(model: nn.Module, head: nn.Module) -> dict[str, int]:
    """Trainable parameters excluding and including the head, head and total parameters."""
    head_ids = {id(p) for p in head.parameters()}
    seen: set[int] = set()
    trainable = head_params = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in head_ids:
            head_params += p.numel()
        elif p.requires_grad:
            trainable += p.numel()
    return {
        "trainable_params": trainable,
        "head_params": head_params,
        "trainable_with_head": trainable + sum(p.numel() for p in head.parameters() if p.requires_grad),
        "total_params": total,
    }


def evaluate(model: nn.Module, loader, device: torch.device, autocast=None) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over an image loader (``bench.kinds``' image_cls)."""
    from bench import kinds

    return kinds.get("image_cls").evaluate(model, loader, device, autocast)
