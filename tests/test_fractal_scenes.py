"""The dense pretext data of ``tools.pretrain_micro --task seg``: coloured fractal scenes with per-pixel labels."""
import numpy as np
import pytest

from datasets.synthetic.fractal_scenes import dilate, fractal_scenes, paste


def test_scenes_are_deterministic_and_labelled_per_pixel():
    a_img, a_lab = fractal_scenes(12, classes=4, seed=3, per_class=3)
    b_img, b_lab = fractal_scenes(12, classes=4, seed=3, per_class=3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert a_img.shape == (12, 64, 64, 3) and a_img.dtype == np.uint8
    assert a_lab.shape == (12, 64, 64) and a_lab.dtype == np.uint8
    assert set(np.unique(a_lab)) <= set(range(5)) and len(np.unique(a_lab)) > 2  # background + several categories
    fg = (a_lab > 0).mean((1, 2))
    assert (fg > 0).all() and 0.03 < fg.mean() < 0.7  # every scene has fractals, none is all fractal
    c_img, _ = fractal_scenes(12, classes=4, seed=4, per_class=3)
    assert not np.array_equal(a_img, c_img)


def test_paste_colours_the_labelled_pixels_away_from_the_background():
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    for _ in range(20):
        img = np.full((64, 64, 3), 128.0)
        labels = np.zeros((64, 64), dtype=np.uint8)
        paste(img, labels, mask, 7, rng)
        on = labels == 7
        assert on.any() and set(np.unique(labels)) == {0, 7}
        assert np.abs(img[on].mean(0) - 128.0).sum() >= 110  # at least 120 L1 before pixel noise
        assert np.array_equal(img[~on], np.full((int((~on).sum()), 3), 128.0))  # nothing outside the label


def test_dilate_grows_points_into_regions_and_classes_are_checked():
    pts = np.zeros((1, 5, 5), dtype=bool)
    pts[0, 2, 2] = True
    assert dilate(pts)[0].sum() == 9 and dilate(pts)[0, 1:4, 1:4].all()
    with pytest.raises(ValueError, match="classes=255"):
        fractal_scenes(1, classes=255, seed=0)
