"""A procedural re-creation of dSprites with VTAB's task definitions.

dSprites (Matthey et al., 2017): 64×64 binary images of one shape (square, ellipse, heart) with
6 scales (0.5..1), 40 orientations (0..2π), 32×32 x/y positions: 3·6·40·32·32 = 737,280 latent
combinations. Examples are drawn without replacement from that grid, so the splits are disjoint.
VTAB's tasks bin a latent factor into 16 classes: ``dsprites_loc`` = x-position (32 → 16 bins),
``dsprites_ori`` = orientation (40 → 16 bins: ⌊i·16/40⌋). VTAB-1k sizes: train800, val200,
train800val200 and a fixed test set. Generated deterministically from ``seed`` and cached (.npz).
"""
from __future__ import annotations

import logging

import numpy as np

from bench.registry import DATASETS
from datasets.base import Task
from datasets.synthetic.common import cached, total_size, vtab_task

log = logging.getLogger(__name__)

LATENT_SIZES = {"shape": 3, "scale": 6, "orientation": 40, "pos_x": 32, "pos_y": 32}
TASKS = {  # VTAB task -> (latent factor, number of classes)
    "dsprites_loc": ("pos_x", 16),
    "dsprites_ori": ("orientation", 16),
}
IMAGE = 64


def latent_grid_size() -> int:
    return int(np.prod(list(LATENT_SIZES.values())))


def unravel(indices: np.ndarray) -> dict[str, np.ndarray]:
    coords = np.unravel_index(indices, tuple(LATENT_SIZES.values()))
    return dict(zip(LATENT_SIZES, coords))


def render(shape: int, scale_i: int, orient_i: int, px: int, py: int) -> np.ndarray:
    """One 64×64 binary image (uint8 0/255) of the given latent indices."""
    scale = 0.5 + 0.5 * scale_i / (LATENT_SIZES["scale"] - 1)
    theta = 2 * np.pi * orient_i / LATENT_SIZES["orientation"]
    cx = 12 + 40 * px / (LATENT_SIZES["pos_x"] - 1)
    cy = 12 + 40 * py / (LATENT_SIZES["pos_y"] - 1)
    r = 11.0 * scale
    yy, xx = np.mgrid[0:IMAGE, 0:IMAGE].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    u = (np.cos(theta) * dx + np.sin(theta) * dy) / r
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / r
    return (shape_inside(shape, u, v) * 255).astype(np.uint8)


def shape_inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of sprite ``shape`` (0 square, 1 ellipse, 2 heart) in its own rotated, radius-1 coordinates."""
    if shape == 0:  # square
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == 1:  # ellipse
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
    hu, hv = 1.2 * u, -1.2 * v + 0.2  # heart, point down along -v
    return (hu**2 + hv**2 - 1) ** 3 - hu**2 * hv**3 <= 0


def generate(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    idx = rng.choice(latent_grid_size(), size=n, replace=False)
    lat = unravel(idx)
    imgs = np.stack([
        render(lat["shape"][i], lat["scale"][i], lat["orientation"][i], lat["pos_x"][i], lat["pos_y"][i])
        for i in range(n)
    ])
    return imgs, lat


def cached_sprites(root, n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    def make():
        imgs, lat = generate(n, seed)
        return {"images": imgs, **lat}

    z = cached(root, "dsprites", {"v": 1, "n": n, "seed": seed, "img": IMAGE}, make)
    return z["images"], {k: z[k] for k in LATENT_SIZES}


def labels_for(task: str, lat: dict[str, np.ndarray]) -> np.ndarray:
    factor, classes = TASKS[task]
    return lat[factor] * classes // LATENT_SIZES[factor]


def build_dsprites(cfg, image_size: int, mean, std) -> Task:
    task = cfg["name"].split("/")[-1]
    imgs, lat = cached_sprites(cfg.get("root"), total_size(cfg), int(cfg.get("data_seed", 0)))
    return vtab_task(cfg, imgs, labels_for(task, lat), image_size, mean, std,
                     {"source": "procedural dSprites", "factor": TASKS[task][0]})


for _task in TASKS:
    DATASETS.add(f"synthetic/{_task}", build_dsprites)
