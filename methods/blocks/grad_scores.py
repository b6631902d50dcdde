"""Gradient statistics of chosen frozen tensors over the first batches of a loader, for data-dependent
selection (SPT's sensitivity Σ(∂L/∂w)², GPS's summed gradient)."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn


def accumulate_grads(model: nn.Module, tensors: list[torch.Tensor], loader: Iterable,
                     loss_of: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
                     batches: Optional[int] = None, square: bool = False) -> tuple[list[torch.Tensor], int]:
    """Σ over the first ``batches`` batches (all when None) of ∂loss/∂t, or of (∂loss/∂t)² with ``square``,
    for every t in ``tensors``; returns (sums, images seen).

    Only ``tensors`` require a gradient meanwhile (no other parameter gradient is built) and the model is in
    train mode (stochastic depth active, as both official implementations do); both are restored after."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    acc = [torch.zeros_like(t) for t in tensors]
    device = tensors[0].device
    was_training = model.training
    images = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for t in tensors:
            t.requires_grad_(True)
        model.train()
        for i, (x, y) in enumerate(loader):
            if batches is not None and i >= batches:
                break
            x, y = x.to(device), y.to(device)
            grads = torch.autograd.grad(loss_of(model, x, y), tensors, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g * g if square else g)
            images += int(y.shape[0])
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
    return acc, images
