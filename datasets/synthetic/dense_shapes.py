"""Procedural dense-prediction tasks: ``synthetic/shapes_det`` (instance detection + masks, COCO-style metric) and
``synthetic/shapes_seg`` (semantic segmentation, mIoU), the embedded stand-ins for COCO/VOC and ADE20K.

Each image is 64×64 RGB: a textured background (two random colours blended by smooth value noise, plus pixel
noise N(0, 8²)) with 1–4 shapes of 3 classes — disc, square, triangle (equilateral) — each inscribed in a
circle of random diameter U(10, 28) px, randomly rotated, in a random colour at least 120 (L1 over RGB) away
from the background under it, with pixel noise N(0, 6²). Shapes are placed without overlapping (their
circles keep 2 px apart; a shape that finds no room after 60 tries is left out), so every instance mask is the
whole shape and the boxes (pixel-edge xyxy: [min x, min y, max x + 1, max y + 1]) are tight around the masks.
Colour and size are independent of the class: only the shape tells it.

Generated deterministically from ``dataset.data_seed`` (``sizes``: train, test) and cached like the other
procedural sets (``.npz``: images, instance maps, per-instance classes). Detection: labels 0..2, no ignore,
masks uint8 [N, 64, 64], train flip 0.5. Segmentation: class 0 = background, 1..3 = the shapes (4 classes,
no reduce-zero-label, 255 only as padding), the segmentation pipeline of ``datasets.dense`` with every
resize/crop step off by default (``crop_size: null``), so training sees the whole image (+ flip).
"""
from __future__ import annotations

import numpy as np

from bench.registry import DATASETS
from datasets.base import Task
from datasets.dense import DetectionSet, SegmentationSet, SegPipeline
from datasets.synthetic.common import cached
from datasets.synthetic.shapes import _smooth_noise as _smooth  # the same 64 px value noise

SIZE = 64
CLASSES = ("disc", "square", "triangle")
MAX_SHAPES = 4


def background(rng: np.random.Generator) -> np.ndarray:
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = _smooth(rng, int(rng.integers(2, 6)))[..., None]
    return c1 * (1 - t) + c2 * t + rng.normal(0, 8, (SIZE, SIZE, 3))


def shape_mask(kind: int, cx: float, cy: float, diameter: float, angle: float) -> np.ndarray:
    """bool [SIZE, SIZE]: pixel centres inside the shape inscribed in the circle (cx, cy, diameter / 2)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    r = diameter / 2.0
    if kind == 0:  # disc
        return dx * dx + dy * dy <= r * r
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 1:  # square inscribed in the circle
        half = r / np.sqrt(2.0)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle inscribed in the circle: inside every edge's half-plane (inradius r / 2)
    inside = np.ones((SIZE, SIZE), dtype=bool)
    for k in range(3):
        a = np.pi / 2 + 2 * np.pi * k / 3 + np.pi  # normal towards the edge opposite vertex k
        inside &= u * np.cos(a) + v * np.sin(a) <= r / 2.0
    return inside


def contrasting_colour(under: np.ndarray, rng: np.random.Generator, min_l1: float = 120.0,
                       tries: int = 30) -> np.ndarray:
    """A uniform random RGB colour at least ``min_l1`` (L1) from ``under``, redrawn up to ``tries`` times (the
    last draw is kept if none is)."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(tries):
        if np.abs(colour - under).sum() >= min_l1:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


def scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 [SIZE, SIZE, 3] image, uint8 [SIZE, SIZE] instance map 0 = background / j + 1, int8 [MAX] classes)."""
    img = background(rng)
    inst = np.zeros((SIZE, SIZE), dtype=np.uint8)
    classes = np.full(MAX_SHAPES, -1, dtype=np.int8)
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        for _try in range(60):
            d = rng.uniform(10, 28)
            cx, cy = rng.uniform(d / 2 + 1, SIZE - d / 2 - 1, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (d / 2 + q / 2 + 2) ** 2 for x, y, q in placed):
                break
        else:
            continue
        kind = int(rng.integers(len(CLASSES)))
        m = shape_mask(kind, cx, cy, d, rng.uniform(0, 2 * np.pi))
        colour = contrasting_colour(img[m].mean(0), rng)
        img[m] = colour + rng.normal(0, 6, (int(m.sum()), 3))
        j = len(placed)
        inst[m] = j + 1
        classes[j] = kind
        placed.append((cx, cy, d))
    return np.clip(np.round(img), 0, 255).astype(np.uint8), inst, classes


def generate(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [scene(rng) for _ in range(n)]
    return {"images": np.stack([o[0] for o in out]), "instances": np.stack([o[1] for o in out]),
            "classes": np.stack([o[2] for o in out])}


def instance_targets(inst: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """Boxes (tight, pixel-edge xyxy), labels, masks of one instance map."""
    ids = [j for j in range(MAX_SHAPES) if classes[j] >= 0 and (inst == j + 1).any()]
    masks = np.stack([(inst == j + 1) for j in ids]).astype(np.uint8) if ids else np.zeros((0,) + inst.shape, np.uint8)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray([classes[j] for j in ids], dtype=np.int64),
            "ignore": np.zeros(len(ids), dtype=bool), "area": masks.reshape(len(ids), -1).sum(1).astype(np.float32),
            "masks": masks}


def semantic_labels(inst: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """int64 [H, W]: 0 background, class + 1 inside a shape."""
    lut = np.zeros(MAX_SHAPES + 1, dtype=np.int64)
    lut[1:] = np.where(classes >= 0, classes.astype(np.int64) + 1, 0)
    return lut[inst]


class ShapesDet:
    def __init__(self, z: dict, cut: slice, offset: int):
        self.images, self.inst, self.classes = z["images"][cut], z["instances"][cut], z["classes"][cut]
        self.offset = offset

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]

    def target(self, i: int, h: int, w: int, masks: bool) -> dict:
        t = instance_targets(self.inst[i], self.classes[i])
        t["image_id"] = self.offset + i
        if not masks:
            t.pop("masks")
        return t


class ShapesSeg(ShapesDet):
    def sample(self, i: int):
        return self.images[i], semantic_labels(self.inst[i], self.classes[i])


def _data(cfg):
    sizes = cfg["sizes"]
    n_train, n_test = int(sizes["train"]), int(sizes["test"])
    seed = int(cfg.get("data_seed", 0))
    z = cached(cfg.get("root"), "dense_shapes", {"v": 1, "n": n_train + n_test, "seed": seed, "size": SIZE},
               lambda: generate(n_train + n_test, seed))
    return z, {"train": (slice(0, n_train), 0), "test": (slice(n_train, n_train + n_test), n_train)}, \
        {"train": n_train, "test": n_test}


SOURCE = "procedural shapes (disc, square, triangle; 64x64, 1-4 per image, textured background)"


def build_shapes_det(cfg, image_size: int, mean, std) -> Task:
    z, cuts, num = _data(cfg)
    flip, masks = bool(cfg.get("train_flip", True)), bool(cfg.get("masks", True))
    splits = {name: DetectionSet(ShapesDet(z, cut, off), masks, flip=flip and name == "train")
              for name, (cut, off) in cuts.items()}
    info = {"evaluator": str(cfg.get("evaluator", "coco")), "masks": masks, "class_names": list(CLASSES),
            "num_images": num, "source": SOURCE,
            "transform": {"train": "HFlip(0.5)" if flip else "none", "eval": "none (original image)"}}
    return Task(name=str(cfg["name"]), benchmark=str(cfg.get("benchmark", "embedded_dense")),
                num_classes=int(cfg["num_classes"]), splits=splits, roles=dict(cfg["roles"]),
                image_size=int(image_size), mean=list(mean), std=list(std), info=info, kind="detection")


def build_shapes_seg(cfg, image_size: int, mean, std) -> Task:
    z, cuts, num = _data(cfg)
    pipe = SegPipeline(cfg)
    splits = {name: SegmentationSet(ShapesSeg(z, cut, off), name == "train", pipe, mean, std)
              for name, (cut, off) in cuts.items()}
    info = {"evaluator": "miou", "masks": False, "class_names": ["background", *CLASSES], "num_images": num,
            "ignore_index": pipe.ignore_index, "reduce_zero_label": False, "source": SOURCE,
            "transform": pipe.describe()}
    return Task(name=str(cfg["name"]), benchmark=str(cfg.get("benchmark", "embedded_dense")),
                num_classes=int(cfg["num_classes"]), splits=splits, roles=dict(cfg["roles"]),
                image_size=int(image_size), mean=list(mean), std=list(std), info=info, kind="segmentation")


DATASETS.add("synthetic/shapes_det", build_shapes_det)
DATASETS.add("synthetic/shapes_seg", build_shapes_seg)
