"""What the procedural tasks share: a content-keyed .npz cache and VTAB-1k style splits."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datasets.base import ImageTensorDataset, Task, resize_uint8

log = logging.getLogger(__name__)


def default_cache() -> Path:
    return Path(os.environ.get("PETL_BENCH_CACHE", "~/.cache/petl-bench")).expanduser() / "synthetic"


def atomic_save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached(root: str | Path | None, kind: str, params: dict, make: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays made by ``make()``, cached as ``<root>/<kind>-<hash(params)>.npz`` (generated once)."""
    key = hashlib.sha256(json.dumps({"kind": kind, **params}, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(root or default_cache()).expanduser() / f"{kind}-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    log.info("generating %s %s into %s", kind, params, path)
    arrays = make()
    atomic_save_npz(path, **arrays)
    return arrays


def vtab_cuts(cfg) -> dict[str, slice]:
    """Split name -> slice of the generated examples: train (800), val (200), train800val200, test (the rest)."""
    sizes = cfg["sizes"]
    n_train, n_val = int(sizes["train"]), int(sizes["val"])
    return {"train800": slice(0, n_train), "val200": slice(n_train, n_train + n_val),
            "train800val200": slice(0, n_train + n_val), "test": slice(n_train + n_val, None)}


def vtab_task(cfg, images: np.ndarray, labels: np.ndarray, image_size: int, mean, std, info: dict) -> Task:
    """Split generated examples in order: train (800), val (200), test; train800val200 = the first 1000.

    ``images``: uint8 [N, H, W] (gray) or [N, H, W, 3] (colour).
    """
    x = torch.from_numpy(images)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    x = resize_uint8(x.contiguous(), image_size)
    y = torch.from_numpy(np.asarray(labels)).long()
    splits = {k: ImageTensorDataset(x[s], y[s], mean, std) for k, s in vtab_cuts(cfg).items()}
    return Task(name=cfg["name"], benchmark=cfg.get("benchmark", "embedded"), num_classes=int(cfg["num_classes"]),
                splits=splits, roles=dict(cfg["roles"]), image_size=image_size, mean=list(mean), std=list(std),
                info=info)


def total_size(cfg) -> int:
    s = cfg["sizes"]
    return int(s["train"]) + int(s["val"]) + int(s["test"])
