"""Adapter+ (Steitz & Roth, CVPR 2024, "Adapters Strike Back").

Official code: visinf/adapter_plus (HEAD 191c4ab), ``adapter_plus/vit_adapter.py`` (``Adapter``, ``AdapterBlock.
forward_post``) with ``conf/adapter/{base_adapter,adapter_plus}.yaml``. Per block, after the whole block
(the *post-adapter* position, on the residual stream after the MLP residual):

    x ← x + s ⊙ DP(W₂ GELU(W₁ x + b₁) + b₂)

W₁: dim → r, W₂: r → dim with biases, no LayerNorm inside the adapter, dropout 0, the adapter's own
drop-path 0.1 (``drop_path_a``, on the bottleneck output before the scaling), and a learned **channel-wise
scaling** s ∈ R^dim initialised to 1. **Houlsby init**: both weights trunc-normal std 0.01 cut at ±0.02,
both biases 0 (so the adapter is not zero at init and the model differs from the frozen one at step 0).
ViT-B/16, r = 8: 12·(768·8 + 8 + 8·768 + 768 + 768) = 165,984 parameters. Non-linear: not mergeable.

Options (the official ablation axes): ``init: houlsby | lora | bert`` (LoRA init: W₁ kaiming-uniform a=√5 with
PyTorch's default bias, W₂ and b₂ zero, i.e. identity at init; BERT init: N(0, .02²) weights, zero biases),
``scaling: channel | learned | <float>`` (learned = one scalar). ``per_dataset: true`` takes the official
per-dataset bottleneck of ``experiment/vtab/adapter_plus_dim1-32`` and ``experiment/fgvc/adapter_plus_dim1-32``
from ``methods/data/per_dataset_vtab.yaml``; the repository also ships dim1-4 and dim1-8 VTAB tables (set
``method.bottleneck`` per run for those). The default r = 8 is the official default (``conf/adapter/
base_adapter.yaml``, the README example, ``experiment/vtab/adapter_plus_dim8``: one r for every task).

Deviations: none in the module or its position. The official package patches timm's ViT factory; here the
adapter is an ``out`` extension of our blocks (same dataflow). Defined on ViT only (the official code).
"""
from __future__ import annotations

import math

import torch
from timm.layers import DropPath
from torch import nn

from methods.base import Method, register
from methods.blocks.adapter import Bottleneck
from methods.blocks.dataset_params import resolved_cfg


def init_bottleneck(f: Bottleneck, init: str) -> None:
    """Re-initialise a Bottleneck's two linears with one of the official schemes."""
    down, up = f.down, f.up
    if init == "houlsby":  # the paper's std (the Houlsby code uses 1e-3), cut at two std
        for lin in (down, up):
            nn.init.trunc_normal_(lin.weight, std=0.01, a=-0.02, b=0.02)
            nn.init.zeros_(lin.bias)
    elif init == "lora":
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(down.in_features)
        nn.init.uniform_(down.bias, -bound, bound)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
    elif init == "bert":
        for lin in (down, up):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
    else:
        raise ValueError(f"adapter_plus: unknown init '{init}'; choose houlsby (official), lora or bert")


class PostAdapter(nn.Module):
    """x -> x + s ⊙ DP(f(x)) (an ``out`` extension): s per channel, one scalar, or a fixed float."""

    def __init__(self, f: nn.Module, dim: int, scaling="channel", drop_path: float = 0.0, device=None):
        super().__init__()
        self.f = f
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(dim, device=device))
        elif scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, device=device))
        else:
            try:
                self.scaling = float(scaling)
            except (TypeError, ValueError):
                raise ValueError(f"adapter_plus: scaling={scaling!r}; choose channel, learned or a number") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.f(x)) * self.scaling


@register("adapter_plus")
class AdapterPlus(Method):
    families = ("vit",)

    def inject(self, model, sites):
        cfg = resolved_cfg(self)
        hidden, init = int(cfg.get("bottleneck", 8)), str(cfg.get("init", "houlsby"))
        scaling, dp = cfg.get("scaling", "channel"), float(cfg.get("drop_path", 0.1))
        for b in sites:
            dev = b.norm2.weight.device
            f = Bottleneck(b.dim, hidden, act="gelu", dropout=float(cfg.get("dropout", 0.0)), device=dev)
            if dev.type != "meta":
                init_bottleneck(f, init)
            b.extend("out", PostAdapter(f, b.dim, scaling, dp, device=dev))
