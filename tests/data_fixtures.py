"""Tiny on-disk VTAB-1k and FGVC folders with real JPEG files, for the data tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 40, 30  # landscape, so FGVC's shorter-side resize and crops are exercised


def write_jpeg(path: Path, seed: int, size=(W, H)) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 1, 3))
    noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
    img = np.clip(base + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


VTAB_SIZES = {"train800": 8, "val200": 4, "test": 6}


def make_vtab_task(root: Path, folder: str, num_classes: int, seed: int = 0, separate_copies: bool = False) -> Path:
    """``root/folder`` with the four list files. ``separate_copies`` mimics NOAH's release (the
    train800val200 images are their own files under images/train800val200/); otherwise train800val200
    lists the train800 and val200 files (V-PETL-style)."""
    d = root / folder
    lines = {}
    k = 0
    for split, n in VTAB_SIZES.items():
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            write_jpeg(d / rel, seed * 1000 + k)
            lines[split].append((rel, (k * 7) % num_classes))
            k += 1
    if separate_copies:
        lines["train800val200"] = []
        for i, (rel, lab) in enumerate(lines["train800"] + lines["val200"]):
            new = f"images/train800val200/{i:06d}.jpg"
            (d / new).parent.mkdir(parents=True, exist_ok=True)
            (d / new).write_bytes((d / rel).read_bytes())
            lines["train800val200"].append((new, lab))
    else:
        lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (d / f"{split}.txt").write_text("".join(f"{p} {lab}\n" for p, lab in rows))
    return d


# class ids as in the VPT jsons (1-based, not contiguous here on purpose); val lacks class 5 and test
# lacks class 1: a per-split mapping would give different labels per split, the union mapping does not
FGVC_SPLITS = {
    "train": {"a/0.jpg": 1, "a/1.jpg": 5, "b/2.jpg": 9, "b/3.jpg": 1, "c/4.jpg": 5, "c/5.jpg": 9},
    "val": {"a/6.jpg": 1, "b/7.jpg": 9},
    "test": {"a/8.jpg": 5, "b/9.jpg": 9, "c/10.jpg": 9},
}


def make_fgvc_dataset(root: Path, folder: str, image_dir: str, seed: int = 0) -> Path:
    d = root / folder
    k = 0
    for split, anno in FGVC_SPLITS.items():
        for rel in anno:
            size = (W, H) if k % 2 == 0 else (H, W)  # landscape and portrait
            write_jpeg(d / image_dir / rel, seed * 1000 + k, size=size)
            k += 1
        (d / f"{split}.json").write_text(json.dumps(anno))
    return d
