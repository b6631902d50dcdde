"""The mini-VTAB's other tasks and the fractal pretraining images."""
import numpy as np
import pytest

from datasets.synthetic.fractals import fill_rate, fractal_dataset, make_categories, rasterise
from datasets.synthetic.shapes import TEXTURES, build_shapes, clevr_scene, generate_clevr, generate_textures
from helpers import compose_cfg


def test_clevr_labels_are_counts_minus_three():
    z = generate_clevr(40, seed=3)
    assert z["images"].shape == (40, 64, 64, 3) and z["images"].dtype == np.uint8
    assert z["labels"].min() >= 0 and z["labels"].max() <= 7


@pytest.mark.parametrize("count", [3, 10])
def test_clevr_scene_shows_that_many_objects(count):
    img = clevr_scene(count, np.random.default_rng(count))
    objects = np.abs(img.astype(int) - np.median(img.reshape(-1, 3), 0)).sum(2) > 60
    assert components(objects) >= count - 1  # touching objects may merge into one blob


def components(mask: np.ndarray) -> int:
    """Number of 4-connected components of a boolean image (blobs of < 4 pixels ignored)."""
    seen = np.zeros_like(mask)
    n = 0
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        stack, size = [(i, j)], 0
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            size += 1
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < mask.shape[0] and 0 <= d < mask.shape[1] and mask[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    stack.append((c, d))
        n += size >= 4
    return n


def test_textures_cover_all_classes_deterministically():
    a, b = generate_textures(60, seed=2), generate_textures(60, seed=2)
    assert np.array_equal(a["images"], b["images"]) and set(a["labels"]) == set(range(len(TEXTURES)))


@pytest.mark.parametrize("name,classes", [("synthetic/clevr_count", 8), ("synthetic/textures", 12)])
def test_vtab_format(tmp_path, name, classes):
    cfg = compose_cfg([f"dataset={name}", f"dataset.root={tmp_path}", "dataset.sizes.test=50"]).dataset
    task = build_shapes(cfg, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    assert task.num_classes == classes and len(task.splits["train800val200"]) == 1000 and len(task.splits["test"]) == 50
    x, y = task.splits["test"].__getitems__(list(range(4)))
    assert x.shape == (4, 3, 32, 32) and int(y.max()) < classes


def test_fractal_categories_fill_and_repeat():
    cats = make_categories(3, seed=0)
    assert len(cats) == 3 and all(2 <= c.shape[0] <= 4 and c.shape[1] == 6 for c in cats)
    imgs, labels = fractal_dataset(3, 4, 32, seed=0)
    imgs2, _ = fractal_dataset(3, 4, 32, seed=0)
    assert np.array_equal(imgs, imgs2) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert min(fill_rate(i) for i in imgs) > 0.02
    # instances of a category look alike more than instances of different categories
    f = imgs.reshape(12, -1).astype(float) / 255
    same = np.mean([np.abs(f[i] - f[j]).mean() for c in range(3) for i in range(4 * c, 4 * c + 4) for j in range(i + 1, 4 * c + 4)])
    diff = np.mean([np.abs(f[i] - f[j]).mean() for i in range(12) for j in range(12) if i // 4 != j // 4])
    assert same < diff


def test_rasterise_ignores_escaping_points():
    pts = np.random.default_rng(0).random((1, 1000, 2))
    pts[0, 0] = [1e5, 1e5]
    assert fill_rate(rasterise(pts, 16)[0]) > 0.5
