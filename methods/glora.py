"""GLoRA, generalised LoRA (Chavan et al., 2023; official code Arnav0400/ViT-Slim ``GLoRA/layer.py``,
``GLoRA/utils.py``, ``GLoRA/supernet.py``, ``GLoRA/evolution_utils.py``).

Every ``nn.Linear`` of the ViT except the head (qkv, proj, fc1, fc2 of every block: the official
``set_glora`` wraps every Linear but ``head``; patch-embed is a conv) becomes, with frozen W₀, b₀,

    y = x (W₀ + W₀ ⊙ A + B)ᵀ + b₀ + b₀ ⊙ D + E + W₀ C

with support tensors A, B (out × in), C (in × 1), D, E (out). Each support tensor takes one of the
official path choices: A, B ∈ {``LoRA_r``, ``vector``, ``constant``, ``none``}, C ∈ {``LoRA_r``,
``vector``, ``none``}, D, E ∈ {``vector``, ``constant``, ``none``}. ``LoRA_r`` is X_d X_u with X_d (out×r,
zeros) and X_u (r×in, xavier-uniform) (for C: C_d in×r zeros, C_u r×1 xavier-uniform); ``vector`` is one
column (out×1 for A/B, broadcast along the input; in×1 for C; out for D/E); ``constant`` a scalar; every
trained tensor starts at zero, so the model equals the frozen one at step 0 (``identity_at_init``).
No scaling factor. ``merge`` writes W₀ + W₀⊙A + B and b₀ + b₀⊙D + E + W₀C into the linear (exact).

The searched-config format: ``config`` is what the official evolution search stores per candidate, a
list with one dict ``{'A': 'LoRA_4', 'B': 'vector', 'C': 'none', 'D': 'constant', 'E': 'vector'}`` per
wrapped linear in ``named_modules`` order (block 0 qkv, proj, fc1, fc2, block 1 ...), 48 on ViT-B; a
single dict applies to every linear; a string is a json/yaml file holding such a list, or the official
search checkpoint ``checkpoint-<epoch>.pth.tar`` (its best candidate, ``keep_top_k[50][0]``). ``config: null``
(default) trains every path at its largest choice (A, B, C ``LoRA_r``, D, E ``vector``), which is
exactly the tensor set of the official supernet: r = 4 (the official ``--rank`` default) gives, per
linear, 2r(out+in) + r(in+1) + 2·out, i.e. 32,260 (qkv) + 16,900 (proj) + 39,940 (fc1) + 44,548 (fc2)
= 133,648 per block and **1,603,776** on ViT-B/16. A searched subnet trains only its chosen tensors,
counted as the official ``get_param_tensor`` (LoRA r·(out+in), C LoRA r·(in+1), vector out or in,
constant 1).

Deviations (and why): (1) the official method trains a weight-sharing supernet (500 epochs, every
linear samples one of the 4·4·3·3·3 = 432 path combinations per forward), runs an evolutionary search
on val200 under a parameter limit and reports the chosen subnet with the supernet's weights (no
retraining). Here a *fixed* configuration is trained from the initialisation (a retrain of a searched
or hand-given subnet); the supernet training and the evolution search are a follow-up, not part of
this file. (2) In a subnet, a ``vector``/``constant`` path of the official supernet reads the first
column / entry of the rank-r tensor (``Xd[:, 0]``, ``Xd[0, 0]``); a fixed-config retrain creates just
that column or scalar (same count as ``get_param_tensor``, same zero init).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.blocks.merge import WrapsLinear

SUPPORTS = ("A", "B", "C", "D", "E")
CHOICES = {"A": ("lora", "vector", "constant", "none"), "B": ("lora", "vector", "constant", "none"),
           "C": ("lora", "vector", "none"), "D": ("vector", "constant", "none"), "E": ("vector", "constant", "none")}


def parse_choice(support: str, choice: str, default_rank: int) -> tuple[str, int]:
    """('lora', r) / ('vector', 0) / ...  from an official choice string such as 'LoRA_4'."""
    c = str(choice)
    kind = "lora" if c.lower().startswith("lora") else c.lower()
    if kind not in CHOICES[support]:
        raise ValueError(f"glora: support tensor {support} cannot be '{choice}' (choices: "
                         f"{', '.join('LoRA_r' if k == 'lora' else k for k in CHOICES[support])})")
    rank = int(c.split("_")[1]) if kind == "lora" and "_" in c else default_rank
    return kind, rank


class GLoRALinear(WrapsLinear, nn.Module):
    """A frozen linear with GLoRA's support tensors; ``merged()`` returns the folded linear."""

    def __init__(self, base: nn.Linear, config: dict, rank: int):
        super().__init__()
        self.base = base
        out_f, in_f = base.out_features, base.in_features
        dev = base.weight.device
        meta = dev.type == "meta"
        self.kinds = {}
        for s in SUPPORTS:
            kind, r = parse_choice(s, config.get(s, "none"), rank)
            self.kinds[s] = kind
            rows = in_f if s == "C" else out_f
            if kind == "lora":
                cols = 1 if s == "C" else in_f
                self.register_parameter(f"{s}d", nn.Parameter(torch.zeros(rows, r, device=dev)))
                up = nn.Parameter(torch.empty(r, cols, device=dev))
                if not meta:
                    nn.init.xavier_uniform_(up)
                self.register_parameter(f"{s}u", up)
            elif kind == "vector":
                self.register_parameter(f"{s}d", nn.Parameter(torch.zeros(rows, device=dev)))
            elif kind == "constant":
                self.register_parameter(f"{s}d", nn.Parameter(torch.zeros((), device=dev)))
        self.in_features, self.out_features = in_f, out_f

    def support(self, s: str):
        """The support tensor as it enters the formula (broadcastable), or None for 'none'."""
        kind = self.kinds[s]
        if kind == "none":
            return None
        d = getattr(self, f"{s}d")
        if kind == "lora":
            return d @ getattr(self, f"{s}u")
        return d.unsqueeze(1) if kind == "vector" and s in ("A", "B", "C") else d

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.base.weight, self.base.bias
        A, B, C, D, E = (self.support(s) for s in SUPPORTS)
        w2 = w if A is None else w + w * A
        if B is not None:
            w2 = w2 + B
        b2 = b
        if b is not None and D is not None:
            b2 = b2 + b * D
        for extra in (E, None if C is None else (w @ C).squeeze(1)):
            if extra is not None:
                b2 = extra.expand(self.out_features) if b2 is None else b2 + extra
        return w2, b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.folded()
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w, b = self.folded()
            self.base.weight.copy_(w)
            if b is not None:
                if self.base.bias is None:
                    self.base.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
                else:
                    self.base.bias.copy_(b)
        return self.base


def load_config(config, n_linears: int, rank: int) -> list[dict]:
    """The per-linear configs from ``method.config`` (None, one dict, a list of dicts, or a json/yaml file)."""
    if config is None:
        full = {"A": f"LoRA_{rank}", "B": f"LoRA_{rank}", "C": f"LoRA_{rank}", "D": "vector", "E": "vector"}
        return [full] * n_linears
    if isinstance(config, (str, Path)) and str(config).endswith((".pth", ".tar")):
        # the official evolution checkpoint (checkpoint-<epoch>.pth.tar): keep_top_k[50] sorted by val accuracy
        config = torch.load(config, map_location="cpu", weights_only=False)["keep_top_k"][50][0]
    elif isinstance(config, (str, Path)):
        text = Path(config).read_text(encoding="utf-8")
        if str(config).endswith((".yaml", ".yml")):
            import yaml

            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    if hasattr(config, "items"):
        return [dict(config)] * n_linears
    configs = [dict(c) for c in config]
    if len(configs) != n_linears:
        raise ValueError(f"glora: method.config gives {len(configs)} layer configs for {n_linears} wrapped linears "
                         "(one per qkv/proj/fc1/fc2 of every block, in that order)")
    return configs


def param_count(configs: list[dict], shapes: list[tuple[int, int]], rank: int) -> int:
    """Trainable count by the official ``get_param_tensor`` rule (shapes: (out, in) per linear)."""
    total = 0
    for cfg, (out_f, in_f) in zip(configs, shapes):
        for s in SUPPORTS:
            kind, r = parse_choice(s, cfg.get(s, "none"), rank)
            o, i = (in_f, 1) if s == "C" else (out_f, in_f)
            total += {"lora": r * (o + i), "vector": o, "constant": 1, "none": 0}[kind]
    return total


@register("glora")
class GLoRA(Method):
    families = ("vit",)
    mergeable = True
    identity_at_init = True

    def inject(self, model, sites):
        rank = int(self.get("rank", 4))
        if rank < 1:
            raise ValueError(f"glora: rank must be >= 1 (got {rank}); set method.rank")
        names = ("qkv", "proj", "fc1", "fc2")
        configs = load_config(self.cfg.get("config"), len(sites) * len(names), rank)
        it = iter(configs)
        for b in sites:
            for n in names:
                b.set_linear(n, GLoRALinear(b.linear(n), next(it), rank))
        self.n_configs = len(configs)

