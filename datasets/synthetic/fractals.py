"""FractalDB-style formula-driven images (Kataoka et al., "Pre-training without Natural Images", ACCV 2020).

A category is an iterated function system (IFS): 2–4 affine maps w_j(p) = A_j p + b_j with the six parameters
drawn from U(−1, 1) and probabilities ∝ |det A_j|. A system is kept when its attractor fills at least
``min_fill`` of its bounding image (the paper's "filling rate" test rejects degenerate, line- or point-like
systems). Instances of a category perturb every parameter by a factor U(1 − jitter, 1 + jitter) (the paper's
intra-category variation) and are flipped at random. Images are rendered by the chaos game: the visited points
are drawn white on black. Everything is deterministic from the seed.
"""
from __future__ import annotations

import numpy as np

BURN_IN = 20


def sample_system(rng: np.random.Generator, min_maps: int = 2, max_maps: int = 4) -> np.ndarray:
    n = int(rng.integers(min_maps, max_maps + 1))
    return rng.uniform(-1.0, 1.0, size=(n, 6))


def probabilities(params: np.ndarray) -> np.ndarray:
    det = np.abs(params[:, 0] * params[:, 3] - params[:, 1] * params[:, 2]) + 1e-6
    return det / det.sum()


def chaos_points(params: np.ndarray, n_points: int, rng: np.random.Generator, batch: int = 1) -> np.ndarray:
    """Points [batch, n_points, 2] visited by ``batch`` independent chaos games on one system
    (``params`` [n_maps, 6]) or on per-instance systems (``params`` [batch, n_maps, 6])."""
    per_instance = params.ndim == 3
    p = params if per_instance else np.broadcast_to(params, (batch, *params.shape))
    probs = np.stack([probabilities(q) for q in p])
    cum = np.cumsum(probs, axis=1)
    xy = np.zeros((batch, 2))
    out = np.empty((batch, n_points, 2))
    rows = np.arange(batch)
    for t in range(n_points + BURN_IN):
        j = (rng.random((batch, 1)) > cum).sum(1).clip(max=p.shape[1] - 1)
        m = p[rows, j]  # [batch, 6]
        x = m[:, 0] * xy[:, 0] + m[:, 1] * xy[:, 1] + m[:, 4]
        y = m[:, 2] * xy[:, 0] + m[:, 3] * xy[:, 1] + m[:, 5]
        xy = np.stack([x, y], 1)
        if not np.isfinite(xy).all() or np.abs(xy).max() > 1e6:
            xy = np.nan_to_num(xy, nan=0.0, posinf=0.0, neginf=0.0).clip(-1e6, 1e6)
        if t >= BURN_IN:
            out[:, t - BURN_IN] = xy
    return out


def rasterise(points: np.ndarray, size: int) -> np.ndarray:
    """uint8 [batch, size, size]: points scaled so that the central 99 % fill the image (aspect kept;
    the few escaping points of a non-contractive map do not shrink the shape)."""
    b = points.shape[0]
    lo = np.quantile(points, 0.005, axis=1, keepdims=True)
    hi = np.quantile(points, 0.995, axis=1, keepdims=True)
    span = np.maximum((hi - lo).max(2, keepdims=True), 1e-9)
    centre = (lo + hi) / 2
    uv = (points - centre) / span * (size - 2) + size / 2
    ij = np.clip(uv.astype(np.int64), 0, size - 1)
    img = np.zeros((b, size, size), dtype=np.uint8)
    rows = np.repeat(np.arange(b), points.shape[1])
    img[rows, ij[..., 1].ravel(), ij[..., 0].ravel()] = 255
    return img


def fill_rate(img: np.ndarray) -> float:
    return float((img > 0).mean())


def make_categories(n: int, seed: int, min_fill: float = 0.12, probe_size: int = 32, probe_points: int = 4000,
                    max_tries: int = 100000) -> list[np.ndarray]:
    """``n`` IFS categories that pass the filling-rate test."""
    rng = np.random.default_rng(seed)
    cats: list[np.ndarray] = []
    tries = 0
    while len(cats) < n:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(f"only {len(cats)} of {n} fractal categories passed min_fill={min_fill}")
        params = sample_system(rng)
        img = rasterise(chaos_points(params, probe_points, rng), probe_size)[0]
        if fill_rate(img) >= min_fill:
            cats.append(params)
    return cats


def render_category(params: np.ndarray, per_class: int, size: int, rng: np.random.Generator,
                    jitter: float = 0.1, n_points: int = 3000) -> np.ndarray:
    """``per_class`` instances [per_class, size, size] uint8 of one category."""
    p = params[None] * rng.uniform(1 - jitter, 1 + jitter, size=(per_class, *params.shape))
    img = rasterise(chaos_points(p, n_points, rng, batch=per_class), size)
    flip = rng.random(per_class) < 0.5
    img[flip] = img[flip][:, :, ::-1]
    return img


def fractal_dataset(classes: int, per_class: int, size: int, seed: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [classes·per_class, size, size], labels) in class order."""
    cats = make_categories(classes, seed)
    rng = np.random.default_rng(seed + 1)
    imgs = np.concatenate([render_category(c, per_class, size, rng, **kw) for c in cats])
    labels = np.repeat(np.arange(classes), per_class)
    return imgs, labels
