"""Learnable prompt tokens and the token-sequence operations that place them."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class Prompts(nn.Module):
    """``num`` learnable tokens of width ``dim``, uniform(−bound, bound) init.

    The default bound √(6/dim) is V-PETL Bench's; VPT's own is √(6/(3·p²+dim)).
    """

    def __init__(self, num: int, dim: int, bound: Optional[float] = None, dropout: float = 0.0, device=None):
        super().__init__()
        if num < 1:
            raise ValueError(f"number of prompts must be >= 1 (got {num})")
        self.bound = bound if bound is not None else math.sqrt(6.0 / dim)
        self.tokens = nn.Parameter(torch.empty(1, num, dim, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.tokens.device.type != "meta":
            nn.init.uniform_(self.tokens, -self.bound, self.bound)

    @property
    def num(self) -> int:
        return self.tokens.shape[1]

    def expand(self, batch: int) -> torch.Tensor:
        return self.dropout(self.tokens.expand(batch, -1, -1))


class InsertPrompts(nn.Module):
    """x = [prefix, P, rest]: insert prompts after the ``prefix`` tokens (the class token)."""

    def __init__(self, prompts: Prompts, prefix: int = 1):
        super().__init__()
        self.prompts = prompts
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prompts.expand(x.shape[0]).to(x.dtype)
        return torch.cat([x[:, : self.prefix], p, x[:, self.prefix:]], dim=1)


class ReplacePrompts(nn.Module):
    """Replace the prompt tokens at positions prefix..prefix+L with this layer's prompts (VPT-Deep)."""

    def __init__(self, prompts: Prompts, prefix: int = 1):
        super().__init__()
        self.prompts = prompts
        self.prefix = prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prompts.expand(x.shape[0]).to(x.dtype)
        return torch.cat([x[:, : self.prefix], p, x[:, self.prefix + p.shape[1]:]], dim=1)
