"""Datasets: builders registered by config name (e.g. ``synthetic/dsprites_loc``)."""
from __future__ import annotations

from bench.registry import DATASETS
from datasets import synthetic  # noqa: F401  (registers the procedural tasks)
from datasets import fgvc, vtab  # noqa: F401  (register vtab/<task> and fgvc/<name>)
from datasets.base import DataError, ImageTensorDataset, Task, make_loader

__all__ = ["build", "Task", "DataError", "ImageTensorDataset", "make_loader"]


def build(cfg, image_size: int, mean, std) -> Task:
    return DATASETS.get(cfg["name"])(cfg, image_size=image_size, mean=mean, std=std)
