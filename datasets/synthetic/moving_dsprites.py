"""Moving dSprites: a procedural video task whose class is the direction of motion (no download).

Each clip is 16 gray frames of 32×32 (``dataset.clip_frames``). A bright target sprite (dSprites' square,
ellipse or heart, radius U(3, 5) px, random orientation and spin) moves in a straight line at ``dataset.speed``
px/frame (default U(0.5, 0.8)) in one of 8 directions (class k = k·45° counter-clockwise from "right", ±10°
jitter), starting within ±``dataset.start_box`` px of the centre (default 3), so the class is the displacement
between the first and later frames. ``start_box: null`` starts it anywhere instead (the original design below:
no single frame tells the class; at chance for lora on ``video_micro`` in the 5-epoch budget). A dimmer distractor sprite of random
shape moves in a uniformly random direction. The world wraps around (sprites leaving one side re-enter on the
other), so every frame's sprite positions are uniform over the image whatever the class: a single frame
cannot tell the class, only the motion does. Background level U(0, 40) with per-pixel noise N(0, 6²); target
intensity U(190, 255), distractor U(80, 140); sprites rendered with 2×2 supersampling (soft edges).

Sizes like VTAB-1k (``sizes`` in the yaml): train800, val200, train800val200 and a test set; roles like
``dsprites_loc``. Generated deterministically from ``dataset.data_seed`` and cached (.npz, uint8, kept in
memory). Splits follow the video interface (``datasets/clips.py``): training clips are T frames at stride s
with a random start (no crop, no flip; frames resized to S when S ≠ 32), evaluation = ``eval_views.temporal``
clips (default 1: the centred clip) of the stride-s sequence, one spatial view (the whole frame).
"""
from __future__ import annotations

import numpy as np

from bench.registry import DATASETS
from datasets.base import Task
from datasets.clips import EvalClips, FrameStore, TrainClips, clip_geometry, eval_views
from datasets.synthetic.common import cached, total_size, vtab_cuts
from datasets.synthetic.dsprites import shape_inside

SIZE, FRAMES, CLASSES = 32, 16, 8  # FRAMES: the default clip length (dataset.clip_frames)
SUPER = 2  # supersampling factor
WINDOW = 14  # rendered patch side (px), > 2 × the largest sprite reach (1.15 × radius 5)


def _coverage(shape: int, cx: np.ndarray, cy: np.ndarray, theta: np.ndarray, r: float) -> np.ndarray:
    """[F, SIZE, SIZE] in [0, 1]: the sprite's area fraction per pixel, on a wrapped (toroidal) image.

    Rendered in a WINDOW² patch around each centre (a sprite reaches at most 1.15·r < WINDOW/2 px), placed with
    wrapped pixel indices."""
    f = len(cx)
    x0, y0 = np.floor(cx).astype(int) - WINDOW // 2, np.floor(cy).astype(int) - WINDOW // 2
    sub = (np.arange(WINDOW * SUPER) + 0.5) / SUPER
    dx = (x0 - cx)[:, None, None] + sub[None, None, :]
    dy = (y0 - cy)[:, None, None] + sub[None, :, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    inside = shape_inside(shape, (c * dx + s * dy) / r, (-s * dx + c * dy) / r)
    patch = inside.reshape(f, WINDOW, SUPER, WINDOW, SUPER).mean(axis=(2, 4))
    out = np.zeros((f, SIZE, SIZE))
    iy = (y0[:, None] + np.arange(WINDOW)) % SIZE
    ix = (x0[:, None] + np.arange(WINDOW)) % SIZE
    out[np.arange(f)[:, None, None], iy[:, :, None], ix[:, None, :]] = patch
    return out


def _path(rng: np.random.Generator, angle: float, speed: float, frames: int,
          start: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Positions over time; ``start`` = None: anywhere (wrapping world), else within ±start px of the centre."""
    t = np.arange(frames)
    x0, y0 = rng.uniform(0, SIZE, size=2) if start is None else SIZE / 2 + rng.uniform(-start, start, size=2)
    return (x0 + speed * np.cos(angle) * t) % SIZE, (y0 - speed * np.sin(angle) * t) % SIZE  # image y points down


SPEED = (0.6, 1.2)  # the target's speed range, px/frame (dataset.speed)


def clip(label: int, rng: np.random.Generator, frames: int = FRAMES, speed=SPEED, distractor: bool = True,
         start: float | None = None) -> np.ndarray:
    """uint8 [frames, SIZE, SIZE] of one clip of class ``label`` (``start``: the target's start box, see _path)."""
    t = np.arange(frames)
    img = rng.uniform(0, 40) + rng.normal(0, 6, (frames, SIZE, SIZE))
    sprites = [  # (intensity, shape, radius, direction, speed): distractor first, target on top
        (rng.uniform(80, 140), int(rng.integers(3)), rng.uniform(2.5, 4.0), rng.uniform(0, 2 * np.pi),
         rng.uniform(0.3, 1.2)),
        (rng.uniform(190, 255), int(rng.integers(3)), rng.uniform(3.0, 5.0),
         label * np.pi / 4 + np.deg2rad(rng.uniform(-10, 10)), rng.uniform(*speed)),
    ]
    if not distractor:
        sprites = sprites[1:]
    for i, (level, shape, r, angle, speed) in enumerate(sprites):
        cx, cy = _path(rng, angle, speed, frames, start if i == len(sprites) - 1 else None)
        theta = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.2, 0.2) * t
        a = _coverage(shape, cx, cy, theta, r)
        img = img * (1 - a) + level * a
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def generate(n: int, seed: int, frames: int = FRAMES, speed=SPEED, distractor: bool = True,
             start: float | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(CLASSES, size=n)
    return {"clips": np.stack([clip(int(k), rng, frames, speed, distractor, start) for k in labels]), "labels": labels}


def build_moving_dsprites(cfg, image_size: int, mean, std) -> Task:
    frames, stride = clip_geometry(cfg)
    temporal, _ = eval_views(cfg, default_temporal=1)
    n, seed, length = total_size(cfg), int(cfg.get("data_seed", 0)), int(cfg.get("clip_frames") or FRAMES)
    speed = tuple(float(v) for v in (cfg.get("speed") or SPEED))
    distractor = bool(cfg.get("distractor", True))
    start = cfg.get("start_box")
    start = None if start is None else float(start)
    params = {"v": 1, "n": n, "seed": seed, "frames": length, "size": SIZE}
    if speed != SPEED or not distractor or start is not None:  # (the wrapping default keeps its cache key)
        params.update(speed=list(speed), distractor=distractor, start_box=start)
    z = cached(cfg.get("root"), "moving_dsprites", params,
               lambda: generate(n, seed, length, speed, distractor, start))
    labels = z["labels"].astype(np.int64)
    size = int(image_size)
    splits = {}
    for name, cut in vtab_cuts(cfg).items():
        store = FrameStore.from_dense(z["clips"][cut])
        if name.startswith("train"):
            splits[name] = TrainClips(store, labels[cut], frames, stride, size, mean, std, transform="resize")
        else:
            splits[name] = EvalClips(store, labels[cut], frames, size, mean, std, temporal, 1, stride=stride)
    train_text = f"random start, {frames} frames at stride {stride} -> Resize(({size}, {size})) -> Normalize"
    info = {"source": "procedural moving dSprites (class = direction of motion, 8 classes)",
            "train_transform": train_text,
            "frames": frames, "stride": stride, "clip_frames": length, "clip_size": size,
            "transform": {"train": train_text,
                          "eval": f"{temporal} clip(s) of frames 0,{stride},.. (1 = centred) -> "
                                  f"Resize(({size}, {size})) -> Normalize"},
            "eval_views": {"temporal": temporal, "spatial": 1, "views": temporal, "order": "temporal-major",
                           "aggregation": "mean of raw logits"}}
    return Task(name=cfg["name"], benchmark=cfg.get("benchmark", "embedded_video"), num_classes=int(cfg["num_classes"]),
                splits=splits, roles=dict(cfg["roles"]), image_size=size, mean=list(mean), std=list(std), info=info,
                kind="video_cls")


DATASETS.add("synthetic/moving_dsprites", build_moving_dsprites)
