"""Image and video classification: cross-entropy, top-1/top-5, multi-view logit averaging for video."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from bench.kinds.base import TaskKind, register


def _chunks(x: torch.Tensor, size: Optional[int]):
    if not size or x.shape[0] <= size:
        yield x
        return
    for i in range(0, x.shape[0], size):
        yield x[i: i + size]


class Classification(TaskKind):
    metric = "top1"
    metrics = ("top1", "top5")
    views_dim: Optional[int] = None  # evaluation inputs with one more leading dim carry views (video)

    def loss_fn(self, train_cfg) -> Callable:
        return nn.CrossEntropyLoss(label_smoothing=float(train_cfg.get("label_smoothing", 0.0) or 0.0))

    def logits(self, model: nn.Module, x: torch.Tensor, max_batch: Optional[int]) -> torch.Tensor:
        """Logits per example; inputs carrying views ([B, V, ...]) are averaged over the V views."""
        views = x.dim() == self.views_dim
        flat = x.flatten(0, 1) if views else x
        out = torch.cat([model(c).float() for c in _chunks(flat, max_batch)])
        return out.view(x.shape[0], x.shape[1], -1).mean(1) if views else out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device,
                 autocast: Optional[Callable] = None, max_batch: Optional[int] = None) -> dict[str, Any]:
        model.eval()
        correct1 = correct5 = seen = 0
        loss_sum = 0.0
        views = None
        for batch in loader:
            x, y = self.to_device(batch, device)
            if views is None:
                views = int(x.shape[1]) if x.dim() == self.views_dim else 1
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                logits = self.logits(model, x, max_batch)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(-1).sum().item()
            seen += y.numel()
        n = max(seen, 1)
        return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": seen,
                "views": views or 1}


    shardable_eval = True

    def merge_eval(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Shards' results → the whole split's: top-k are exact counts (``100·correct/n`` recovered by rounding),
        the loss is the n-weighted mean."""
        seen = sum(int(p["n"]) for p in parts)
        n = max(seen, 1)
        c1 = sum(round(p["top1"] * int(p["n"]) / 100.0) for p in parts)
        c5 = sum(round(p["top5"] * int(p["n"]) / 100.0) for p in parts)
        loss = sum(p["loss"] * int(p["n"]) for p in parts)
        views = next((p["views"] for p in parts if int(p["n"])), 1)
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "n": seen, "views": views}


class ImageClassification(Classification):
    name = "image_cls"
    families = ("vit", "swin", "convnext")


class VideoClassification(Classification):
    """Clips [B, 3, T, H, W]; evaluation batches [B, V, 3, T, H, W] average the raw logits of the V views
    (temporal clips × spatial crops, as the anchors do) before the argmax. ``max_batch`` bounds how many
    clips go through the model at once (``eval.batch_size``)."""

    name = "video_cls"
    families = ("video_vit", "video_swin")
    views_dim = 6

    def protocol(self, task) -> dict:
        info = task.info or {}
        return {k: info[k] for k in ("frames", "stride", "eval_views", "train_transform") if k in info}


register(ImageClassification())
register(VideoClassification())
