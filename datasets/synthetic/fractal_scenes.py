"""Formula-driven segmentation scenes: FractalDB-style fractals pasted into coloured images, labelled per pixel.

The dense pretext task of ``python -m tools.pretrain_micro --task seg`` (in the spirit of formula-driven
supervised pretraining for segmentation, e.g. SegRCDB, ICCV 2023): classification pretraining of a backbone as
small as ``swin_micro`` pools its stage maps into nearly constant features (their spatial std after the
output norm drops from ~0.9 to ~0.2), which a detector or a segmenter cannot localise from. Per-pixel labels
keep the maps spatial.

A scene is ``size``×``size`` RGB:
- background: two random colours blended along a random linear gradient, plus pixel noise N(0, 8²)
  (deliberately not the value-noise textures of ``synthetic/shapes_*``);
- 2–5 fractals of ``classes`` IFS categories (``fractals.fractal_dataset``, one random instance each), rendered at
  32 px, closed by a 3×3 dilation so a fractal is a region rather than a point cloud, resized (nearest) to a side
  of U(12, 40) px, pasted at a random position (later fractals cover earlier ones) in a random colour at least
  120 (L1 over RGB) from the background under it, with pixel noise N(0, 6²).

Labels: uint8 [size, size], 0 = background, category + 1 on a fractal's pixels. Deterministic from ``seed``.
"""
from __future__ import annotations

import numpy as np

from datasets.synthetic.dense_shapes import contrasting_colour
from datasets.synthetic.fractals import fractal_dataset

RENDER = 32


def dilate(masks: np.ndarray) -> np.ndarray:
    """bool [N, H, W] → its 3×3 dilation."""
    p = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    h, w = masks.shape[1:]
    out = np.zeros_like(masks)
    for dy in range(3):
        for dx in range(3):
            out |= p[:, dy:dy + h, dx:dx + w]
    return out


def gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    a = rng.uniform(0, 2 * np.pi)
    t = np.cos(a) * xx + np.sin(a) * yy
    t = ((t - t.min()) / max(np.ptp(t), 1e-9))[..., None]
    return c1 * (1 - t) + c2 * t + rng.normal(0, 8, (size, size, 3))


def paste(img: np.ndarray, labels: np.ndarray, mask: np.ndarray, label: int, rng: np.random.Generator) -> None:
    side = int(rng.integers(12, 41))
    idx = (np.arange(side) * mask.shape[0] / side).astype(np.int64)
    m = mask[idx][:, idx]
    size = img.shape[0]
    y0, x0 = rng.integers(-side // 4, size - side + side // 4 + 1, size=2)
    ys, xs = slice(max(y0, 0), min(y0 + side, size)), slice(max(x0, 0), min(x0 + side, size))
    m = m[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]
    if not m.any():
        return
    region = img[ys, xs]
    colour = contrasting_colour(region[m].mean(0), rng)
    region[m] = colour + rng.normal(0, 6, (int(m.sum()), 3))
    labels[ys, xs][m] = label


def fractal_scenes(n: int, classes: int, seed: int, size: int = 64, per_class: int = 20,
                   max_fractals: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, size, size, 3], labels uint8 [n, size, size]); ``classes`` ≤ 254."""
    if not 1 <= classes <= 254:
        raise ValueError(f"fractal_scenes: classes={classes} must be in 1..254 (uint8 labels)")
    shapes, cats = fractal_dataset(classes, per_class, RENDER, seed)
    shapes = dilate(shapes > 0)
    rng = np.random.default_rng(seed + 2)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        img = gradient_background(rng, size)
        for _ in range(int(rng.integers(2, max_fractals + 1))):
            j = int(rng.integers(len(shapes)))
            paste(img, labels[i], shapes[j], int(cats[j]) + 1, rng)
        images[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return images, labels
