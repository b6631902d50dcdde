"""Two more procedural VTAB-style tasks.

``clevr_count``: CLEVR's counting task as VTAB defines it (count all objects, 3–10 → 8 classes), rendered as
2-D scenes: 3–10 objects (sphere-like shaded discs, cubes drawn as squares, cylinders drawn as capsules) of
8 colours and 2 sizes on a grey floor with a soft gradient, placed without overlapping more than a little.

``textures``: a natural-looking, DTD-like texture classification task with 12 classes (stripes in four
orientations, checkerboard, dots, grid, zigzag, rings, smooth blobs, fine grain, bricks), each with random
colours, scale, phase and noise.
"""
from __future__ import annotations

import numpy as np

from bench.registry import DATASETS
from datasets.base import Task
from datasets.synthetic.common import cached, total_size, vtab_task

COLOURS = np.array([[173, 35, 35], [42, 75, 215], [29, 105, 20], [129, 74, 25], [129, 38, 192],
                    [41, 208, 208], [255, 238, 51], [87, 87, 87]], dtype=np.float64)
SIZE = 64


def _grid(size: int = SIZE):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return xx, yy


def clevr_scene(count: int, rng: np.random.Generator) -> np.ndarray:
    xx, yy = _grid()
    floor = 110 + 40 * (yy / SIZE)[..., None] + rng.normal(0, 3, (SIZE, SIZE, 1))
    img = np.repeat(floor, 3, axis=2)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = rng.choice([4.5, 7.0])
        cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
        if any((cx - x) ** 2 + (cy - y) ** 2 < (0.8 * (r + q)) ** 2 for x, y, q in placed):
            continue
        placed.append((cx, cy, r))
    for cx, cy, r in sorted(placed, key=lambda p: p[1]):  # far (top) first
        colour = COLOURS[rng.integers(len(COLOURS))]
        kind = rng.integers(3)
        dx, dy = xx - cx, yy - cy
        if kind == 0:  # sphere: shaded disc
            mask = dx**2 + dy**2 <= r**2
            shade = 1.15 - 0.5 * np.sqrt(((dx + r / 3) ** 2 + (dy + r / 3) ** 2)) / r
        elif kind == 1:  # cube: square
            mask = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
            shade = np.where(dy < -0.3 * r, 1.15, 0.9)
        else:  # cylinder: capsule
            mask = (np.abs(dx) <= 0.7 * r) & (np.abs(dy) <= r) | ((dx / (0.7 * r)) ** 2 + ((dy + r) / (0.3 * r)) ** 2 <= 1)
            shade = 1.0 - 0.25 * dx / r
        shadow = ((dx - 2) ** 2 + (dy - r - 1) ** 2 <= (0.9 * r) ** 2) & ~mask
        img[shadow] *= 0.8
        img[mask] = (colour * np.clip(shade, 0.4, 1.3)[..., None])[mask]
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def generate_clevr(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 11, size=n)
    return {"images": np.stack([clevr_scene(int(c), rng) for c in counts]), "labels": counts - 3}


TEXTURES = ("stripes_h", "stripes_v", "stripes_d1", "stripes_d2", "checker", "dots", "grid", "zigzag",
            "rings", "blobs", "grain", "bricks")


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    coarse = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, SIZE, endpoint=False)
    i = t.astype(int)
    f = t - i
    f = f * f * (3 - 2 * f)
    a = coarse[i][:, i] * (1 - f)[None] + coarse[i][:, i + 1] * f[None]
    b = coarse[i + 1][:, i] * (1 - f)[None] + coarse[i + 1][:, i + 1] * f[None]
    return a * (1 - f)[:, None] + b * f[:, None]


def texture(kind: int, rng: np.random.Generator) -> np.ndarray:
    xx, yy = _grid()
    period = rng.uniform(6, 12)
    phase = rng.uniform(0, period)
    wobble = rng.uniform(-0.15, 0.15)  # a little rotation jitter keeps orientation classes apart
    u = xx * np.cos(wobble) + yy * np.sin(wobble)
    v = -xx * np.sin(wobble) + yy * np.cos(wobble)
    name = TEXTURES[kind]
    if name.startswith("stripes"):
        axis = {"stripes_h": v, "stripes_v": u, "stripes_d1": (u + v) / np.sqrt(2), "stripes_d2": (u - v) / np.sqrt(2)}[name]
        f = np.sin(2 * np.pi * (axis + phase) / period) > 0
    elif name == "checker":
        f = (np.floor((u + phase) / period) + np.floor((v + phase) / period)) % 2 == 0
    elif name == "dots":
        f = ((u + phase) % period - period / 2) ** 2 + ((v + phase) % period - period / 2) ** 2 < (period / 4) ** 2
    elif name == "grid":
        f = (((u + phase) % period) < 1.6) | (((v + phase) % period) < 1.6)
    elif name == "zigzag":
        f = np.sin(2 * np.pi * (v + 2.5 * np.abs(((u / period) % 1) - 0.5) * period + phase) / period) > 0
    elif name == "rings":
        cx, cy = rng.uniform(0, SIZE, 2)
        f = np.sin(2 * np.pi * (np.hypot(xx - cx, yy - cy) + phase) / period) > 0
    elif name == "blobs":
        f = _smooth_noise(rng, int(rng.integers(3, 6))) > 0.5
    elif name == "grain":
        f = _smooth_noise(rng, int(rng.integers(20, 32))) > 0.5
    else:  # bricks
        row = np.floor((v + phase) / (period * 0.6))
        f = (((v + phase) % (period * 0.6)) < 1.5) | ((((u + phase + (row % 2) * period) % (2 * period))) < 1.5)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(c1 - c2).sum() < 150:
        c2 = rng.uniform(0, 255, 3)
    img = np.where(f[..., None], c1, c2) * rng.uniform(0.85, 1.0) + rng.normal(0, 8, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_textures(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(TEXTURES), size=n)
    return {"images": np.stack([texture(int(k), rng) for k in labels]), "labels": labels}


GENERATORS = {"clevr_count": (generate_clevr, "procedural CLEVR-style counting (3-10 objects)"),
              "textures": (generate_textures, "procedural DTD-style textures (12 classes)")}


def build_shapes(cfg, image_size: int, mean, std) -> Task:
    task = cfg["name"].split("/")[-1]
    make, source = GENERATORS[task]
    n, seed = total_size(cfg), int(cfg.get("data_seed", 0))
    z = cached(cfg.get("root"), task, {"v": 1, "n": n, "seed": seed}, lambda: make(n, seed))
    return vtab_task(cfg, z["images"], z["labels"], image_size, mean, std, {"source": source})


for _task in GENERATORS:
    DATASETS.add(f"synthetic/{_task}", build_shapes)
