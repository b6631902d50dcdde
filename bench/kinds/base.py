"""The task-kind interface and its registry (see ``bench.kinds``)."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

import torch
from torch import nn


class TaskKind:
    """Base class. ``metric`` is the primary metric (higher is better); ``metrics`` lists every key
    ``evaluate`` returns that is a score (the rest, e.g. ``loss`` and ``n``, are bookkeeping)."""

    name: str = "?"
    metric: str = "?"
    metrics: tuple[str, ...] = ()

    def loss_fn(self, train_cfg) -> Callable:
        """The training criterion, called as ``loss_fn(output, target)``; methods' ``prepare`` get it too."""
        raise NotImplementedError

    def to_device(self, batch, device: torch.device):
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def batch_size(self, batch) -> int:
        return int(batch[1].shape[0])

    def train_loss(self, model: nn.Module, batch, loss_fn: Callable, method=None) -> torch.Tensor:
        """The step's loss; a method may add its own terms (``Method.training_loss``, e.g. DyT's FLOPs loss)."""
        x, y = batch
        logits = model(x)
        loss = loss_fn(logits, y)
        return method.training_loss(model, x, y, logits, loss) if method is not None else loss

    def evaluate(self, model: nn.Module, loader, device: torch.device,
                 autocast: Optional[Callable] = None, max_batch: Optional[int] = None) -> dict[str, Any]:
        raise NotImplementedError

    # multi-process runs (``bench.distributed``): True when ``evaluate`` on disjoint shards of a split can be
    # combined exactly by ``merge_eval``; otherwise every rank evaluates the whole split (dense kinds)
    shardable_eval: bool = False

    def merge_eval(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One result over the whole split from ``evaluate``'s results on disjoint shards."""
        raise NotImplementedError

    families: Optional[tuple[str, ...]] = None  # backbone families that take this kind's inputs (None = any)

    def check_backbone(self, family: str, backbone: str, dataset: str) -> None:
        """One-line error before any training when the backbone cannot take this kind's inputs."""
        if self.families is not None and family not in self.families:
            raise ValueError(f"dataset '{dataset}' is a {self.name} task, which backbone '{backbone}' (family "
                             f"{family}) cannot take: pick a backbone of family {' or '.join(self.families)}")

    def for_task(self, task) -> "TaskKind":
        """This kind configured for one task (e.g. detection: the dataset's evaluator decides the metric)."""
        return self

    def build_model(self, cfg, device):
        """Backbone (+ task head) for this kind; classification: the backbone with its classifier."""
        import backbones

        return backbones.build(cfg.backbone, num_classes=int(cfg.dataset.num_classes),
                               drop_path=float(cfg.train.get("drop_path", 0.0)), device=device)

    def protocol(self, task) -> dict:
        """Facts about the evaluation protocol for the record (e.g. video views)."""
        return {}


_KINDS: dict[str, TaskKind] = {}


def register(kind: TaskKind) -> TaskKind:
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> TaskKind:
    if name not in _KINDS:
        close = difflib.get_close_matches(str(name), sorted(_KINDS), n=1, cutoff=0.0)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown task kind '{name}' (a dataset's Task.kind).{hint} Known: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def names() -> list[str]:
    return sorted(_KINDS)
