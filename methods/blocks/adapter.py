"""Bottleneck adapters: down-projection, activation, up-projection (zero-initialised), scale."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "identity": nn.Identity, None: nn.Identity}


class Bottleneck(nn.Module):
    """f(x) = scale · up(drop(act(down(LN?(x))))), up initialised to zero so f = 0 at init.

    ``layernorm='in'`` puts a LayerNorm on the input (AdaptFormer's option); down uses PyTorch's
    default Linear init (kaiming-uniform a=√5) with zero bias. ``init='trunc_normal'``: both projections
    trunc-normal(std .02), biases 0 (the dense anchors' Swin init; not identity at step 0).
    """

    def __init__(self, dim: int, hidden: int, act: Optional[str] = "gelu", bias: bool = True,
                 scale: float = 1.0, layernorm: Optional[str] = None, dropout: float = 0.0,
                 out_dim: Optional[int] = None, init: str = "zero", device=None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation '{act}'; known: gelu, relu, identity")
        self.norm = nn.LayerNorm(dim, device=device) if layernorm == "in" else nn.Identity()
        self.down = nn.Linear(dim, hidden, bias=bias, device=device)
        self.act = ACTIVATIONS[act]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(hidden, out_dim or dim, bias=bias, device=device)
        self.scale = scale
        if init not in ("zero", "trunc_normal"):
            raise ValueError(f"unknown adapter init '{init}'; choose zero or trunc_normal")
        if self.down.weight.device.type != "meta":
            if init == "trunc_normal":  # the dense anchors: the backbone's init (trunc-normal .02) on every Linear
                nn.init.trunc_normal_(self.down.weight, std=0.02)
                nn.init.trunc_normal_(self.up.weight, std=0.02)
            else:
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.up.weight)
            if bias:
                nn.init.zeros_(self.down.bias)
                nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.drop(self.act(self.down(self.norm(x))))) * self.scale


class SequentialAdapter(nn.Module):
    """y -> y + f(y): for the ``*_before``/``*_after`` block extension points."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.f(y)


class ParallelAdapter(nn.Module):
    """(x, h) -> f(x or h): for the ``*_parallel`` extension points.

    ``source='residual'`` feeds the branch input on the residual stream (AdaptFormer),
    ``source='normed'`` feeds the norm's output.
    """

    def __init__(self, f: nn.Module, source: str = "residual"):
        super().__init__()
        if source not in ("residual", "normed"):
            raise ValueError(f"parallel adapter source must be 'residual' or 'normed' (got '{source}')")
        self.f = f
        self.source = source

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.f(x if self.source == "residual" else h)
