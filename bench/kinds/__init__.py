"""Task kinds: what a dataset's ``Task.kind`` selects in the engine.

A kind owns everything that differs between kinds of task: how a batch becomes a training loss, how an
evaluation split becomes metrics (its primary ``metric`` and any sub-metrics), and which metric the
records and leaderboards report. The engine, the records and the leaderboard only see
``kind.metric`` and the dict ``kind.evaluate`` returns, so a new kind (detection, segmentation) is one
module here plus ``register``; nothing in the engine changes.

* ``image_cls``: images [B, 3, H, W] → logits; cross-entropy; ``top1`` (and ``top5``).
* ``video_cls``: clips [B, 3, T, H, W] for training; evaluation batches carry every view of a video,
  [B, V, 3, T, H, W]: logits are averaged over the V views (the anchors' raw-logit averaging), then
  ``top1``/``top5``.
* ``detection`` / ``segmentation`` (``bench.kinds.dense``): a Swin-Det backbone with the dataset's decoder as
  its head; COCO box/mask AP or VOC07 mAP@0.5; mIoU.
"""
from __future__ import annotations

from bench.kinds.base import TaskKind, get, names, register
from bench.kinds import classification, dense  # noqa: F401  (register image_cls, video_cls, detection, segmentation)

__all__ = ["TaskKind", "get", "names", "register"]
