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


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast=None) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over a loader."""
    model.eval()
    correct = seen = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        seen += y.numel()
    return {"top1": 100.0 * correct / max(seen, 1), "loss": loss_sum / max(seen, 1), "n": seen}
