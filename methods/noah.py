"""NOAH retrain (Zhang et al., 2022): per-layer VPT-Deep prompts, LoRA and adapter sizes from a searched subnet.

Official code (ZhangYuanhan-AI/NOAH ``model/supernet_vision_transformer_timm.py``,
``model/module/adapter_super.py``, retrain configs ``experiments/NOAH/subnet/VTAB/*.yaml``): a
supernet holds all three modules at size 100; the retrain config gives, per block i, a prompt length
p_i, a LoRA rank l_i and an adapter dim a_i (values in {1, 5, 10} for VTAB; 0 = module off), and
retraining uses the first p_i / l_i / a_i slices. Per block:

* prompts: block i drops the previous block's p_{i-1} prompt tokens from the *end* of the sequence and
  appends its own p_i (block 0 appends p_0); the class token stays at index 0 and feeds the head.
  Dropout 0.1 on the prompts. 768·p_i parameters.
* LoRA on the fused qkv: A (l_i×dim, kaiming-uniform a=√5), B (3·dim×l_i, zero), no scaling,
  dropout 0.1 on its input. 4·768·l_i parameters.
* adapter after the MLP: z + W₂ Dropout₀.₁(QuickGELU(W₁ z + b₁)) + b₂ with W₁: dim→a_i, W₂: a_i→dim,
  xavier-uniform weights and N(0, 1e-6²) biases (the declared init). 1537·a_i + 768 parameters.

The subnets ship as data (``methods/data/noah_subnets_vtab.yaml``, our transcription of the 19 VTAB
retrain configs). ``subnet: auto`` picks the run's dataset (last component of its name, e.g.
``vtab/cifar100``); a dataset without a subnet is an error; a model built outside the runner (no
dataset known) gets ``cifar100``. ``subnet: <name>`` picks one explicitly; ``prompt`` / ``lora`` /
``adapter`` lists override it. On a backbone with fewer than 12 blocks the first ones are used.

Deviations (and why): (1) the official retrain starts from the trained supernet's slices; we start
from the declared inits (the supernet stage is not part of this method). (2) The supernet's model-level
prompt tokens (and their position embedding) are counted by NOAH but are overwritten by block 0's
prompts before any attention, so they are dead; we do not create them. (3) NOAH applies the adapter
to the MLP output *after* drop-path; here it sits before the block's drop-path (identical when
drop-path is off, e.g. at evaluation). Not mergeable (prompts, adapter non-linearity).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.blocks.affine_branches import quick_gelu
from methods.blocks.dataset_params import dataset_key, load_data
from methods.blocks.lora import DeltaLinear, LowRank
from methods.blocks.prompts import Prompts

log = logging.getLogger(__name__)
SUBNET_FILE = "noah_subnets_vtab.yaml"
SUPERNET_PROMPTS = 100  # NOAH's supernet prompt length (sets the xavier bound of the prompt init)


class NoahPrompts(nn.Module):
    """``tokens`` extension: drop the previous block's ``drop`` prompt tokens from the end, append these."""

    def __init__(self, prompts: Prompts, drop: int):
        super().__init__()
        self.prompts = prompts
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop:
            x = x[:, : x.shape[1] - self.drop]
        return torch.cat([x, self.prompts.expand(x.shape[0]).to(x.dtype)], dim=1)


class NoahAdapter(nn.Module):
    """z -> z + W2 drop(QuickGELU(W1 z + b1)) + b2 (``mlp_after`` extension)."""

    def __init__(self, dim: int, hidden: int, dropout: float, device=None):
        super().__init__()
        self.down = nn.Linear(dim, hidden, device=device)
        self.up = nn.Linear(hidden, dim, device=device)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.down.weight.device.type != "meta":
            for lin in (self.down, self.up):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.up(self.drop(quick_gelu(self.down(z))))


def load_subnet(name: str) -> dict[str, list[int]]:
    subnets = load_data(SUBNET_FILE)["subnets"]
    if name not in subnets:
        raise ValueError(f"method.subnet={name!r}: no NOAH subnet of that name in methods/data/{SUBNET_FILE} "
                         f"(known: {', '.join(sorted(subnets))}); or give method.prompt/lora/adapter lists")
    return {k: list(v) for k, v in subnets[name].items()}


@register("noah")
class NOAH(Method):
    families = ("vit",)

    def choose_subnet(self) -> tuple[str, dict[str, list[int]]]:
        name = str(self.get("subnet", "auto"))
        if name == "auto":
            ds = dataset_key(self.context.get("dataset"))
            if ds is None:
                name = "cifar100"
            elif ds in load_data(SUBNET_FILE)["subnets"]:
                name = ds
            else:
                raise ValueError(f"method.subnet=auto: NOAH has no published subnet for dataset '{ds}'; "
                                 f"set method.subnet=<one of the VTAB subnets> or method.prompt/lora/adapter lists")
        sub = load_subnet(name)
        for k in ("prompt", "lora", "adapter"):
            if self.cfg.get(k) is not None:
                sub[k] = [int(v) for v in self.cfg[k]]
                name = "custom"
        return name, sub

    def inject(self, model, sites):
        name, sub = self.choose_subnet()
        depth = len(sites)
        for k, v in sub.items():
            if len(v) < depth:
                raise ValueError(f"NOAH subnet '{name}' gives {len(v)} {k} sizes for a {depth}-block backbone; "
                                 f"give method.{k} with {depth} values")
            if any(int(x) < 0 for x in v):
                raise ValueError(f"NOAH subnet '{name}': negative {k} size in {v}")
        if any(len(v) > depth for v in sub.values()):
            log.warning("NOAH subnet '%s' has 12 layers; using its first %d on this %d-block backbone", name, depth, depth)
        self.subnet = {"name": name, **{k: [int(x) for x in v[:depth]] for k, v in sub.items()}}
        p_drop = float(self.get("prompt_dropout", 0.1))
        l_drop = float(self.get("lora_dropout", 0.1))
        a_drop = float(self.get("adapter_dropout", 0.1))
        bound = self.get("prompt_init_bound")
        dim = sites.embed_dim
        bound = float(bound) if bound is not None else math.sqrt(6.0 / (dim * (SUPERNET_PROMPTS + 1)))
        prompts, loras, adapters = self.subnet["prompt"], self.subnet["lora"], self.subnet["adapter"]
        prev = 0  # prompt tokens currently at the end of the sequence
        for b in sites:
            i, dev = b.index, b.norm1.weight.device
            if prompts[i] > 0:
                p = Prompts(prompts[i], dim, bound, p_drop, device=dev)
                b.extend("tokens", NoahPrompts(p, drop=prev))
                prev = prompts[i]
            if loras[i] > 0:
                qkv = b.linear("qkv")
                lr = LowRank(dim, qkv.out_features, loras[i], alpha=loras[i], dropout=l_drop, device=dev)
                b.set_linear("qkv", DeltaLinear(qkv, {"lora": lr}, {"lora": slice(0, qkv.out_features)}))
            if adapters[i] > 0:
                b.extend("mlp_after", NoahAdapter(dim, adapters[i], a_drop, device=dev))

    def describe(self) -> dict:
        return {**super().describe(), **({"subnet_used": self.subnet} if hasattr(self, "subnet") else {})}
