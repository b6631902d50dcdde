import numpy as np
import torch

from datasets.synthetic.dsprites import LATENT_SIZES, build_dsprites, cached_sprites, generate, labels_for, latent_grid_size
from helpers import compose_cfg


def test_latent_grid_and_vtab_binning():
    assert latent_grid_size() == 737_280
    lat = {"pos_x": np.arange(32), "orientation": np.arange(40)}
    assert labels_for("dsprites_loc", lat).tolist() == [i // 2 for i in range(32)]
    ori = labels_for("dsprites_ori", lat)
    assert ori.min() == 0 and ori.max() == 15 and ori.tolist() == [i * 16 // 40 for i in range(40)]


def test_generation_is_deterministic_and_binary():
    a, la = generate(20, seed=7)
    b, lb = generate(20, seed=7)
    assert np.array_equal(a, b) and all(np.array_equal(la[k], lb[k]) for k in LATENT_SIZES)
    assert a.shape == (20, 64, 64) and set(np.unique(a)) <= {0, 255}
    assert (a > 0).reshape(20, -1).sum(1).min() > 10  # every image shows a shape


def test_position_label_matches_pixels():
    imgs, lat = generate(200, seed=1)
    xs = np.array([np.nonzero(im.max(0))[0].mean() for im in imgs])
    corr = np.corrcoef(xs, lat["pos_x"])[0, 1]
    assert corr > 0.98


def test_vtab_1k_splits_sizes_cache(tmp_path):
    cfg = compose_cfg([f"dataset.root={tmp_path}", "dataset.sizes.test=300"]).dataset
    task = build_dsprites(cfg, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    sizes = {k: len(v) for k, v in task.splits.items()}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 300}
    assert task.num_classes == 16 and task.roles["trainval"] == "train800val200"
    x, y = task.splits["train800"].__getitems__([0, 1, 2])
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert len(list(tmp_path.glob("dsprites-*.npz"))) == 1
    imgs, _ = cached_sprites(tmp_path, 1300, 0)  # served from the cache file
    assert imgs.shape == (1300, 64, 64)
    ori = build_dsprites(compose_cfg([f"dataset.root={tmp_path}", "dataset=synthetic/dsprites_ori",
                                      "dataset.sizes.test=300"]).dataset, 32, [0.5] * 3, [0.5] * 3)
    assert torch.equal(ori.splits["test"].images, task.splits["test"].images)  # same images, other labels
    assert not torch.equal(ori.splits["test"].labels, task.splits["test"].labels)
