"""DyT, Dynamic Tuning, image part (Zhao et al., NeurIPS 2024; official code NUS-HPC-AI-Lab/Dynamic-Tuning
``models/vision_transformer_IN21K.py`` (``Block``), ``models/dynamic_adapter.py`` (``TokenSelect``,
``Adapter``), ``models/losses.py`` (``AdaLoss``), ``engine_finetune.py`` (``train_one_epoch``),
``main_vtab.py`` and ``train_vtab.sh`` (the VTAB-1k settings)).

Per block, on the residual stream x after the attention branch (the MLP branch's input):

* token dispatcher: logits = Linear(d → 1)(x) for the non-CLS tokens; in training a hard Gumbel-sigmoid
  with a straight-through estimator, s = 1[σ((logit + g₁ − g₂)/τ) > 0.5] with the gradient of the soft
  value (g₁, g₂ ~ Gumbel(0, 1), τ = 5); in evaluation s = 1[σ(logit) > 0.5]; the CLS token always has
  s = 1. Only the selected tokens get the frozen MLP: x ← x + s ⊙ MLP(LN₂(x)) + Adapter(x);
* adapter (parallel, on x, no LayerNorm): up(Dropout₀.₁(ReLU(down(x)))) · 1, bottleneck 16
  (``--ffn_num 16``), down kaiming-uniform(a=√5), up and both biases zero (``init_option='lora'``); the
  dispatcher's linear is timm's trunc-normal(0.02) with zero bias.

ViT-B/16: 12·(25,360 + 769) = **313,548** trainable parameters excluding the head (the missing keys of
the official checkpoint load, which are exactly what it trains besides the head).

Training loss (``training_loss``; the official ``train_one_epoch``): the dynamic model's cross-entropy
+ 2 · (mean(s) − ρ)² (``AdaLoss`` token FLOPs loss; mean over batch, layers and non-CLS tokens; target
ρ = ``token_target_ratio`` 0.5; its minimal-token term has weight 0 in ``main_vtab.py``) + the
cross-entropy of the *complete* model (same weights, every token through the MLP) + KL(complete ‖
dynamic) on the logits with the complete model's logits detached (``distill: false`` drops the last
two, the paper's first version). The complete forward doubles the forward cost of a training step.

Inference here runs the MLP on every token and masks the skipped ones (the official training path,
``complete_model=False``); the official speed-test path gathers only the selected tokens, which gives
the same logits and is what saves FLOPs. ``dispatch_ratio()`` after a forward reports the fraction of
tokens that went through the MLPs. Deviations: the official head weight is re-initialised
trunc-normal(0.01) (ours: the backbone's head init); the official runs use fp16 AMP and the SSF VTAB
split. The video part of DyT is not implemented. Not mergeable (data-dependent routing), not the
identity at init (the dispatcher already skips tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from methods.base import Method, register
from methods.blocks.adapter import Bottleneck, ParallelAdapter


def gumbel_sigmoid_hard(logits: torch.Tensor, tau: float, training: bool, threshold: float = 0.5) -> torch.Tensor:
    """The official ``_gumbel_sigmoid(hard=True)``: a 0/1 value with the soft sigmoid's gradient."""
    if training:
        g1 = -torch.empty_like(logits).exponential_().log()
        g2 = -torch.empty_like(logits).exponential_().log()
        soft = ((logits + g1 - g2) / tau).sigmoid()
    else:
        soft = logits.sigmoid()
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


class TokenDispatcher(nn.Module):
    """``mid`` extension: computes this block's selection s (B, N, 1) from x and leaves x unchanged."""

    def __init__(self, dim: int, prefix: int, tau: float = 5.0, device=None):
        super().__init__()
        self.mlp_head = nn.Linear(dim, 1, device=device)
        self.prefix, self.tau = prefix, tau
        self.complete = False  # set while the complete (teacher) model runs
        self.select = None
        if self.mlp_head.weight.device.type != "meta":
            trunc_normal_(self.mlp_head.weight, std=0.02)
            nn.init.zeros_(self.mlp_head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = gumbel_sigmoid_hard(self.mlp_head(x[:, self.prefix:]).float(), self.tau, self.training)
        self.select = torch.cat([s.new_ones(x.shape[0], self.prefix, 1), s], dim=1)
        return x


class ApplyDispatch(nn.Module):
    """``mlp_after`` extension: y ↦ s ⊙ y (the MLP output of skipped tokens is dropped)."""

    def __init__(self, dispatcher: TokenDispatcher):
        super().__init__()
        self.__dict__["_d"] = dispatcher  # unregistered: the dispatcher lives under petl.mid

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        d = self._d
        return y if d.complete else y * d.select.to(y.dtype)


@register("dyt")
class DyT(Method):
    families = ("vit",)

    def inject(self, model, sites):
        hidden = int(self.get("bottleneck", 16))
        tau = float(self.get("tau", 5.0))
        prefix = sites.num_prefix_tokens
        self.dispatchers = []
        for b in sites:
            dev = b.norm1.weight.device
            d = TokenDispatcher(b.dim, prefix, tau, device=dev)
            b.extend("mid", d)
            b.extend("mlp_after", ApplyDispatch(d))
            adapter = Bottleneck(b.dim, hidden, act="relu", scale=float(self.get("scale", 1.0)),
                                 dropout=float(self.get("adapter_dropout", 0.1)), device=dev)
            b.extend("mlp_parallel", ParallelAdapter(adapter, source="residual"))
            self.dispatchers.append(d)
        self.prefix = prefix

    def _selects(self) -> torch.Tensor:
        """(B, layers, N − prefix) selections of the last forward (the official ``token_select``)."""
        return torch.stack([d.select[:, self.prefix:, 0] for d in self.dispatchers], dim=1)

    def dispatch_ratio(self) -> float:
        return float(self._selects().mean())

    def training_loss(self, model, x, y, logits, loss):
        target, ratio = float(self.get("token_target_ratio", 0.5)), float(self.get("token_loss_ratio", 2.0))
        loss = loss + ratio * (self._selects().mean() - target) ** 2
        if not bool(self.get("distill", True)):
            return loss
        for d in self.dispatchers:
            d.complete = True
        try:
            teacher = model(x)
        finally:
            for d in self.dispatchers:
                d.complete = False
        kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher.detach().float(), -1),
                      reduction="batchmean", log_target=True)
        return loss + F.cross_entropy(teacher.float(), y) + kl
