"""Datasets: builders registered by config name (e.g. ``synthetic/dsprites_loc``)."""
from __future__ import annotations

from bench.registry import DATASETS
from datasets import synthetic  # noqa: F401  (registers the procedural tasks)
from datasets import dense, fgvc, video, vtab  # noqa: F401  (register vtab/, fgvc/, video/, dense/<name>)
from datasets.base import DataError, ImageTensorDataset, Task, make_loader

__all__ = ["build", "benchmark_order", "benchmark_groups", "Task", "DataError", "ImageTensorDataset", "make_loader"]


def benchmark_order(benchmark: str) -> list[str]:
    """Canonical dataset order of a benchmark (the leaderboard's column order)."""
    if benchmark == "vtab":
        return list(vtab.VTAB_TASKS)
    if benchmark == "fgvc":
        return list(fgvc.FGVC_DATASETS)
    if benchmark == "embedded":
        return ["dsprites_loc", "dsprites_ori", "clevr_count", "textures"]
    if benchmark == "video":
        return list(video.VIDEO_DATASETS)
    if benchmark == "embedded_video":
        return ["moving_dsprites"]
    if benchmark in ("coco", "voc", "ade20k"):
        return [benchmark]
    if benchmark == "embedded_dense":
        return ["shapes_det", "shapes_seg"]
    return []


def benchmark_groups(benchmark: str) -> dict[str, list[str]]:
    """Dataset groups of a benchmark (VTAB: natural / specialized / structured)."""
    if benchmark == "vtab":
        groups: dict[str, list[str]] = {}
        for task, (_, group, _) in vtab.VTAB_TASKS.items():
            groups.setdefault(group, []).append(task)
        return groups
    return {}


def build(cfg, image_size: int, mean, std) -> Task:
    return DATASETS.get(cfg["name"])(cfg, image_size=image_size, mean=mean, std=std)
