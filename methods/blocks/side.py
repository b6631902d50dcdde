"""Side networks: run the frozen backbone as a feature extractor and predict from a trainable side net.

No copy of the backbone is made. A side method attaches its network as ``model.petl_side`` (new
state-dict keys ``petl_side.*``; the backbone's keys are unchanged) and replaces the model's
``forward`` by an instance attribute that runs ``trunk(model, x)`` (the backbone's own patch embedding,
position embedding and blocks) and then the side network. The task classifier stays ``model.head``
(so ``head_of(model)`` / ``get_classifier()`` and the "excl. head" counts are right); a side net whose
output width differs from the backbone's replaces ``model.head`` by a new ``Linear``.

``trunk(..., grad=False)`` runs under ``torch.no_grad()``: no graph is built for the backbone, and the
side network receives detached features (the memory point of side-tuning).
"""
from __future__ import annotations

import types
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Token embedding exactly as timm's ``VisionTransformer.forward_features`` before the blocks."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def trunk(model: nn.Module, x: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(embedding output, [output of every block]) of the backbone; without a graph unless ``grad``."""
    with nullcontext() if grad else torch.no_grad():
        e = embed(model, x)
        outs, h = [], e
        for blk in model.blocks:
            h = blk(h)
            outs.append(h)
    return e, outs


def install_side(model: nn.Module, side: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
    """Attach ``side`` as ``model.petl_side`` and make ``model(x)`` call ``forward(model, x)``."""
    model.petl_side = side
    model.forward = types.MethodType(forward, model)


def pool_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's own token pooling (class token for ``global_pool='token'``)."""
    if hasattr(model, "pool"):
        return model.pool(x)
    return x[:, 0] if getattr(model, "global_pool", "token") == "token" else x[:, model.num_prefix_tokens:].mean(1)
