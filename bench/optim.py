"""Optimiser and per-iteration learning-rate schedule."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn


def default_param_groups(model: nn.Module, weight_decay: float, no_decay_1d: bool,
                         no_decay_keys: Sequence[str] = ()) -> list[dict]:
    """All trainable tensors; with ``no_decay_1d`` biases and 1-D tensors get no weight decay
    (SPT/SNELL convention); without it every tensor is decayed (V-PETL Bench convention). A tensor whose name
    contains one of ``no_decay_keys`` gets none either (mmdet/mmseg ``paramwise_cfg`` custom keys)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = (no_decay_1d and (p.ndim <= 1 or name.endswith(".bias"))) or any(k in name for k in no_decay_keys)
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], train_cfg) -> torch.optim.Optimizer:
    name = str(train_cfg.get("optimizer", "adamw")).lower()
    lr = float(train_cfg["lr"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(train_cfg.get("betas", (0.9, 0.999))))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(train_cfg.get("momentum", 0.9)))
    raise ValueError(f"unknown optimizer train.optimizer={name}; choose adamw or sgd")


class StepwiseLR:
    """Linear warm-up then ``step`` (×0.1 after each milestone epoch) or ``poly`` ((1 - t/T)^power down to
    ``min_lr``), set per iteration like the cosine (``step_update(step)``); mmdet/mmseg's schedules."""

    def __init__(self, opt, kind: str, total: int, warmup: int, warmup_lr: float, min_lr: float,
                 milestones: list[int], power: float):
        self.opt, self.kind, self.total, self.warmup = opt, kind, total, warmup
        self.warmup_lr, self.min_lr, self.milestones, self.power = warmup_lr, min_lr, milestones, power
        self.base = [g["lr"] for g in opt.param_groups]
        self.step_update(0)

    def _lr(self, base: float, step: int) -> float:
        if step < self.warmup:
            return self.warmup_lr + (base - self.warmup_lr) * step / self.warmup
        if self.kind == "step":
            return base * 0.1 ** sum(step >= m for m in self.milestones)
        frac = min(1.0, step / self.total)
        return (base - self.min_lr) * (1 - frac) ** self.power + self.min_lr

    def step_update(self, step: int) -> None:
        for g, base in zip(self.opt.param_groups, self.base):
            g["lr"] = self._lr(base, step)

    def state_dict(self) -> dict:
        return {"base": self.base}

    def load_state_dict(self, state: dict) -> None:
        self.base = list(state["base"])


def build_scheduler(opt: torch.optim.Optimizer, train_cfg, steps_per_epoch: int):
    """timm cosine with linear warm-up, stepped per iteration (``step_update(step)``).

    Warm-up rises linearly from ``warmup_lr`` to ``lr`` over ``warmup_epochs``, then the cosine runs from
    ``lr`` to ``min_lr`` over the remaining iterations (``warmup_prefix=True``: continuous). The anchors
    step per epoch after the epoch (epochs 0 and 1 both at ``warmup_lr``) and do not shift the cosine by the
    warm-up (a jump at its end); we keep their end points, not those artefacts.
    """
    total = max(1, int(train_cfg["epochs"]) * steps_per_epoch)
    if train_cfg.get("max_steps"):
        total = max(1, min(total, int(train_cfg["max_steps"])))
    steps = train_cfg.get("warmup_steps")
    warmup = int(steps) if steps is not None else int(round(float(train_cfg.get("warmup_epochs", 0)) * steps_per_epoch))
    warmup = min(warmup, total - 1) if warmup > 0 else 0
    kind = str(train_cfg.get("schedule", "cosine") or "cosine")
    if kind in ("step", "poly"):
        return StepwiseLR(opt, kind, total, warmup, float(train_cfg.get("warmup_lr", 1e-6)),
                          float(train_cfg.get("min_lr", 0.0)),
                          [int(round(float(m) * steps_per_epoch)) for m in (train_cfg.get("milestones") or [])],
                          float(train_cfg.get("poly_power", 1.0)))
    if kind != "cosine":
        raise ValueError(f"unknown train.schedule={kind}; choose cosine, step or poly")
    return CosineLRScheduler(
        opt,
        t_initial=total - warmup,
        lr_min=float(train_cfg.get("min_lr", 1e-5)),
        warmup_t=warmup,
        warmup_lr_init=float(train_cfg.get("warmup_lr", 1e-6)),
        warmup_prefix=True,
        t_in_epochs=False,
    )
