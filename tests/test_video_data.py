"""Video data: csv parsing, the training sampler and transform, the multi-view test protocol, the decoded-frame
cache, one-line errors, synthetic/moving_dsprites, and ``tools.check_data video`` (spec video_dense.md §A2, §D 16-18).

Fixtures are real lossless H.264 mp4 files written with PyAV (``tests/video_fixtures.py``) whose frame k has
red level 8 + 10k and green/blue ramps along x/y, so a test can read back which frames and crop it got.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
from bench import ROOT
from datasets import make_loader
from datasets.base import DataError
from datasets.clips import (FIXED_ORIGINS, EvalClips, FrameStore, TrainClips, clip_indices, multiscale_crop_box,
                            spatial_origins, strided_sequence, temporal_starts, train_indices)
from datasets.synthetic import moving_dsprites
from datasets.video import STATS, find_video_dir, read_annotations
from helpers import compose_cfg
from tools import check_data
from video_fixtures import frame_image, frame_index, write_mp4, write_video_folder

MEAN = STD = [0.5, 0.5, 0.5]
COUNTS = [20, 24, 12]  # frames per fixture video, cycled (train videos first, then test)
W, H = 40, 32


def cfg_for(root, **over) -> dict:
    return {"name": "video/hmdb51", "root": str(root), "num_classes": 3, "frames": 4, "stride": 2,
            "decode_workers": 2, **over}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo the (0.5, 0.5) normalisation."""
    return (x * 0.5 + 0.5) * 255


def red_indices(clip: torch.Tensor) -> list[int]:
    """Frame indices of a normalised [3, T, S, S] clip, read from its red level."""
    return [frame_index(v) for v in to_uint8(clip[0]).mean((-1, -2)).tolist()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_video_folder(tmp_path_factory.mktemp("hmdb51"), n_train=4, n_test=3, num_classes=3, frames=COUNTS,
                              size=(W, H))


# ---------------------------------------------------------------- annotations (§D-16)

def test_annotations_both_delimiters_header_and_relative_paths(tmp_path):
    (tmp_path / "a.csv").write_text(f"{tmp_path}/v/x.mp4,3\n\nv/y.mp4,0\n")
    (tmp_path / "b.csv").write_text("path label\nv/with space.mp4 2\n/abs/z.webm 1\n")
    a = read_annotations(tmp_path / "a.csv", tmp_path / "base", 4)
    assert [(it.path, it.label) for it in a] == [(tmp_path / "v/x.mp4", 3), (tmp_path / "base/v/y.mp4", 0)]
    assert a[1].source == f"{tmp_path / 'a.csv'} line 3"
    b = read_annotations(tmp_path / "b.csv", tmp_path, 4)
    assert [(it.path, it.label) for it in b] == [(tmp_path / "v/with space.mp4", 2), (Path("/abs/z.webm"), 1)]
    assert b[0].source.endswith("b.csv line 2")


@pytest.mark.parametrize("text,classes,match", [
    ("a.mp4,1\nb.mp4;2\n", 3, r"b\.csv line 2: expected '<video path>,<label>' with an integer label"),
    ("a.mp4 1\nb.mp4\n", 3, r"b\.csv line 2: expected '<video path> <label>'"),
    ("a.mp4\n", 3, r"b\.csv line 1: expected"),
    ("a.mp4,1\nb.mp4,3\n", 3, r"b\.csv line 2: label 3 outside \[0, 3\)"),
    ("a.mp4,-1\n", 3, r"line 1: label -1 outside"),
])
def test_annotation_errors_are_one_line_with_file_and_line(tmp_path, text, classes, match):
    (tmp_path / "b.csv").write_text(text)
    with pytest.raises(DataError, match=match) as e:
        read_annotations(tmp_path / "b.csv", tmp_path, classes)
    assert "\n" not in str(e.value)
    problems: list[str] = []
    read_annotations(tmp_path / "b.csv", tmp_path, classes, problems=problems)
    assert len(problems) == 1


def test_missing_root_and_csv(tmp_path, folder):
    with pytest.raises(DataError, match="dataset.root is not set for video/ssv2"):
        find_video_dir(None, "ssv2")
    with pytest.raises(DataError, match=r"'hmdb51' not found: .*nope does not exist.*PETL_BENCH_VIDEO_HMDB51"):
        datasets.build(cfg_for(tmp_path / "nope"), image_size=32, mean=MEAN, std=STD)
    (tmp_path / "hmdb51").mkdir()
    (tmp_path / "hmdb51/train.csv").write_text((folder / "train.csv").read_text())
    assert find_video_dir(tmp_path, "hmdb51") == tmp_path / "hmdb51"  # the parent of the dataset folder works too
    with pytest.raises(DataError, match=r"csv file missing: .*hmdb51/val\.csv.*test\.csv = val\.csv") as e:
        datasets.build(cfg_for(tmp_path), image_size=32, mean=MEAN, std=STD)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="dataset.frames / dataset.stride are not set.*video backbone"):
        datasets.build(cfg_for(folder, frames=None), image_size=32, mean=MEAN, std=STD)


# ---------------------------------------------------------------- training sampler (§D-17) and transform

def test_training_sampler_spec_cases():
    torch.manual_seed(0)
    starts = set()
    for _ in range(300):
        ids = train_indices(100, 8, 4)
        assert len(ids) == 8 and all(b - a == 4 for a, b in zip(ids, ids[1:])) and 0 <= ids[0] <= 68
        starts.add(ids[0])
    assert min(starts) == 0 and max(starts) == 68 and len(starts) > 60  # start ~ U{0..68}
    assert train_indices(20, 8, 4) == [0, 4, 8, 12, 16, 16, 16, 16]  # short video: last reachable frame repeats
    assert {train_indices(32, 8, 4)[0] for _ in range(50)} == {0}  # exactly one span
    assert {train_indices(33, 8, 4)[0] for _ in range(50)} == {0, 1}
    assert clip_indices(5, 8, 4, 2) == [5, 7, 7, 7] and train_indices(1, 8, 4) == [0] * 8


def test_multiscale_crop_sizes_pairs_and_13_origins():
    torch.manual_seed(0)
    boxes = [multiscale_crop_box(240, 320, 224) for _ in range(3000)]
    sides = [int(240 * s) for s in (1, .875, .75, .66)]  # 240 210 180 158: none within 3 px of 224
    pairs = {(sides[i], sides[j]) for i in range(4) for j in range(4) if abs(i - j) <= 1}  # max_distort 1
    assert {(ch, cw) for _, _, ch, cw in boxes} == pairs and len(pairs) == 10
    for top, left, ch, cw in boxes:
        assert top + ch <= 240 and left + cw <= 320
        if ch < 240:  # both grid steps > 0: the origin is one of the 13 fixed positions
            assert (left / ((320 - cw) // 4), top / ((240 - ch) // 4)) in FIXED_ORIGINS
    big = [b for b in boxes if b[2:] == (158, 180)]
    assert len({b[:2] for b in big}) == 13  # 4 corners, centre, 4 edge centres, 4 quarter points
    assert {multiscale_crop_box(226, 300, 224)[2] for _ in range(200)} >= {224}  # within 3 px of S snaps to S


def test_train_clips_same_crop_for_all_frames_and_flip_option():
    # frame k: red = 10k, green = x ramp; so a clip's green pattern tells the crop, red the frame
    clips = np.stack([np.stack([frame_image(k, 64, 48) for k in range(24)])])  # [1, 24, 48, 64, 3]
    ds = TrainClips(FrameStore.from_dense(clips), torch.tensor([1]), 8, 2, 32, MEAN, STD)
    torch.manual_seed(3)
    for _ in range(20):
        x, y = ds.__getitems__([0])
        assert x.shape == (1, 3, 8, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        green = x[0, 1]
        assert torch.allclose(green, green[:1].expand_as(green))  # same crop for every frame
        ids = red_indices(x[0])
        assert all(b - a == 2 for a, b in zip(ids, ids[1:])) and 0 <= ids[0] <= 24 - 16
    flips = TrainClips(FrameStore.from_dense(clips), torch.tensor([1]), 8, 2, 32, MEAN, STD, flip=True)
    signs = {bool((g := flips.__getitems__([0])[0][0, 1, 0, 0])[0] > g[-1]) for _ in range(30)}
    assert signs == {True, False}  # flipped (green decreasing) and not
    for _ in range(5):  # without flip green always increases left to right
        row = ds.__getitems__([0])[0][0, 1, 0, 0]
        assert row[0] < row[-1]


# ---------------------------------------------------------------- test protocol (§D-18)

def test_temporal_and_spatial_view_positions():
    assert strided_sequence(24, 2, 4) == list(range(0, 24, 2)) and strided_sequence(5, 2, 8) == [0, 2, 4, 4, 4, 4, 4, 4]
    assert temporal_starts(12, 4, 4) == [0, 2, 5, 8] and temporal_starts(8, 8, 4) == [0, 0, 0, 0]
    assert temporal_starts(10, 4, 1) == [3]  # one view: the centred clip
    assert spatial_origins(32, 48, 32, 1) == [(0, 8)] and spatial_origins(32, 48, 32, 3) == [(0, 0), (0, 8), (0, 16)]
    assert spatial_origins(48, 32, 32, 3) == [(0, 0), (8, 0), (16, 0)]  # portrait: along the height


@pytest.mark.parametrize("spatial", [1, 3])
def test_eval_views_4x1_and_4x3(spatial):
    clips = np.stack([np.stack([frame_image(k, 64, 48) for k in range(24)])])  # landscape 64x48
    ds = EvalClips(FrameStore.from_dense(clips), torch.tensor([2]), 4, 32, MEAN, STD, temporal=4, spatial=spatial,
                   stride=2)
    x, y = ds.__getitems__([0])
    assert x.shape == (1, 4 * spatial, 3, 4, 32, 32) and y.tolist() == [2]
    views = x[0].view(4, spatial, 3, 4, 32, 32)
    for t, start in enumerate([0, 2, 5, 8]):  # on the stride-2 sequence 0, 2, .., 22
        for c in range(spatial):
            assert red_indices(views[t, c]) == [2 * (start + j) for j in range(4)]
    green = to_uint8(views[:, :, 1]).mean((-1, -2, -3))  # [4, spatial]: which part of the width
    if spatial == 3:
        assert (green[:, 0] < green[:, 1] - 20).all() and (green[:, 1] < green[:, 2] - 20).all()  # left/centre/right
    else:
        assert torch.allclose(green[:, 0], torch.full((4,), 127.5), atol=2)  # the centre crop


# ---------------------------------------------------------------- decoded videos, cache, determinism

def test_video_task_decodes_the_written_frames(folder):
    task = datasets.build(cfg_for(folder), image_size=32, mean=MEAN, std=STD)
    assert task.kind == "video_cls" and task.num_classes == 3 and task.image_size == 32
    assert task.roles == {"train": "train_csv", "val": "test_csv", "trainval": "train_csv", "test": "val_csv"}
    test = task.split("test")
    x, y = next(iter(make_loader(test, batch_size=2, shuffle=False)))
    assert x.shape == (2, 4, 3, 4, 32, 32) and x.dtype == torch.float32 and y.tolist() == [0, 1]
    # test video 0 has 24 frames (COUNTS cycled over 4 train + 3 test videos): stride-2 sequence of 12
    frames = to_uint8(x[0]).permute(0, 2, 3, 4, 1)  # [V, T, S, S, 3]
    for v, start in enumerate([0, 2, 5, 8]):
        for j in range(4):
            k = 2 * (start + j)
            want = torch.from_numpy(frame_image(k, W, H)[:, 4:36].astype(np.float32))  # centre crop of 40x32
            err = (frames[v, j] - want).abs()
            assert err.mean() < 3 and err.max() < 24, (v, j, err.mean(), err.max())
    train = task.split("train")
    torch.manual_seed(0)
    x, y = train.__getitems__([0, 1, 2, 3])
    assert x.shape == (4, 3, 4, 32, 32) and y.tolist() == [0, 1, 2, 0]
    for i in range(4):
        ids = red_indices(x[i])
        n = COUNTS[i % 3]
        assert ids == clip_indices(ids[0], n, 4, 2) and 0 <= ids[0] <= n - 8
    info = task.info
    assert info["frames"] == 4 and info["stride"] == 2 and info["eval_views"]["views"] == 4
    assert set(info["csv_sha256"]) == {"train_csv", "val_csv", "test_csv"}
    assert "GroupMultiScaleCrop" in info["transform"]["train"]
    assert Path(info["cache"]["val_csv"]["cache"]).is_dir() and info["cache"]["val_csv"]["crop"] == 32


def test_cache_hit_decodes_nothing_and_file_changes_invalidate(folder, tmp_path):
    cfg = cfg_for(folder, cache_dir=str(tmp_path / "cache"), eval_views={"temporal": 2, "spatial": 3})
    first = datasets.build(cfg, image_size=32, mean=MEAN, std=STD)
    before = dict(STATS)
    a = first.split("test").__getitems__([0, 1, 2])[0]
    first.split("train")
    assert STATS["videos"] - before["videos"] == 3 + 4
    mid = dict(STATS)
    again = datasets.build(cfg, image_size=32, mean=MEAN, std=STD)
    b = again.split("test").__getitems__([0, 1, 2])[0]
    again.split("train"), again.split("val")  # val role = test.csv: same content as val.csv -> same cache
    assert STATS == mid and torch.equal(a, b)
    # train.csv (all frames) and one eval cache: val.csv and test.csv list the same videos, so they share a key
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 2
    victim = folder / "videos/test/0001.mp4"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    datasets.build(cfg, image_size=32, mean=MEAN, std=STD).split("test")
    assert STATS["videos"] - mid["videos"] == 3  # the key changed: the list is decoded again


def test_large_caches_are_memory_mapped(folder, tmp_path):
    small = datasets.build(cfg_for(folder, cache_dir=str(tmp_path)), image_size=32, mean=MEAN, std=STD)
    mapped = datasets.build(cfg_for(folder, cache_dir=str(tmp_path), in_memory_max_mb=0), image_size=32, mean=MEAN,
                            std=STD)
    a, b = small.split("test").__getitems__([0, 2])[0], mapped.split("test").__getitems__([0, 2])[0]
    assert small.info["cache"]["val_csv"]["storage"] == "memory"
    assert mapped.info["cache"]["val_csv"]["storage"] == "memmap"
    assert torch.equal(a, b) and (Path(mapped.info["cache"]["val_csv"]["cache"]) / "index.npy").is_file()

def test_training_clips_are_reproducible_under_the_seed(folder):
    train = datasets.build(cfg_for(folder), image_size=32, mean=MEAN, std=STD).split("train")

    def draw(seed):
        torch.manual_seed(seed)
        return torch.cat([train.__getitems__([0, 1, 2, 3])[0] for _ in range(3)])

    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_space_delimited_relative_lists_and_portrait_videos(tmp_path):
    root = write_video_folder(tmp_path / "ds", 2, 2, 2, frames=10, size=(32, 40), delimiter=" ", absolute=False)
    assert (root / "train.csv").read_text().startswith("videos/train/0000.mp4 0\n")
    task = datasets.build(cfg_for(root, num_classes=2, eval_views={"temporal": 4, "spatial": 3}), image_size=32,
                          mean=MEAN, std=STD)
    x, _ = task.split("test").__getitems__([1])
    assert x.shape == (1, 12, 3, 4, 32, 32)
    blue = to_uint8(x[0, :, 2]).mean((-1, -2, -3)).view(4, 3)  # portrait: crops go top/centre/bottom
    assert (blue[:, 0] < blue[:, 1]).all() and (blue[:, 1] < blue[:, 2]).all()
    assert red_indices(x[0, 0]) == [0, 2, 4, 6]  # 10 frames at stride 2 = 0 2 4 6 8; starts 0, 0, 0, 1


def test_cache_at_a_larger_short_side_is_resized_per_batch(folder, tmp_path):
    task = datasets.build(cfg_for(folder, cache_short_side=40, cache_dir=str(tmp_path)), image_size=32, mean=MEAN,
                          std=STD)
    x, _ = task.split("test").__getitems__([0])
    assert x.shape == (1, 4, 3, 4, 32, 32) and task.info["cache"]["val_csv"]["crop"] is None
    assert red_indices(x[0, 0]) == [0, 2, 4, 6]
    with pytest.raises(DataError, match="cache_short_side=16 is smaller than the clip size 32"):
        datasets.build(cfg_for(folder, cache_short_side=16), image_size=32, mean=MEAN, std=STD)



@pytest.mark.parametrize("spatial", [1, 3])
def test_without_cache_the_same_clips_are_decoded_at_every_fetch(folder, tmp_path, spatial):
    views = {"temporal": 4, "spatial": spatial}
    cached = datasets.build(cfg_for(folder, eval_views=views), image_size=32, mean=MEAN, std=STD)
    live = datasets.build(cfg_for(folder, eval_views=views, cache=False, cache_dir=str(tmp_path)), image_size=32,
                          mean=MEAN, std=STD)
    assert torch.equal(cached.split("test").__getitems__([0, 1, 2])[0], live.split("test").__getitems__([0, 1, 2])[0])
    for role in ("train", "test"):
        cached.split(role), live.split(role)
    before = dict(STATS)
    torch.manual_seed(5)
    a = cached.split("train").__getitems__([0, 1, 2, 3])[0]
    assert STATS == before  # the cache decodes nothing
    torch.manual_seed(5)
    b = live.split("train").__getitems__([0, 1, 2, 3])[0]
    assert torch.equal(a, b) and STATS["videos"] - before["videos"] == 4
    assert not list(tmp_path.iterdir()) and live.info["cache"]["train_csv"]["cache"] is None

# ---------------------------------------------------------------- one-line errors naming the file

def test_missing_and_corrupt_videos_name_file_and_csv_line(folder, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    good = folder / "videos/train/0000.mp4"
    (root / "garbage.mp4").write_bytes(b"\x00\x01not a video" * 200)
    for name in ("train.csv", "val.csv"):
        (root / name).write_text(f"{good},0\n{good},1\n")
    (root / "test.csv").write_text(f"{good},0\n{root / 'missing.mp4'},1\n")
    task = datasets.build(cfg_for(root, cache_dir=str(tmp_path / "c")), image_size=32, mean=MEAN, std=STD)
    with pytest.raises(DataError, match=r"video not found: .*missing\.mp4 \(listed in .*test\.csv line 2\)") as e:
        task.split("val")  # val role = test.csv
    assert "\n" not in str(e.value)
    (root / "test.csv").write_text(f"{good},0\ngarbage.mp4,1\n")
    task = datasets.build(cfg_for(root, cache_dir=str(tmp_path / "c")), image_size=32, mean=MEAN, std=STD)
    with pytest.raises(DataError, match=r"cannot open video .*garbage\.mp4 \(listed in .*test\.csv line 2\)") as e:
        task.split("val")
    assert "\n" not in str(e.value)
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no half-written cache left


def test_missing_decord_says_how_to_install(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    task = datasets.build(cfg_for(folder, cache_dir=str(tmp_path)), image_size=32, mean=MEAN, std=STD)
    with pytest.raises(DataError, match=r'needs decord, which is not installed: pip install -e "\.\[video\]"'):
        task.split("test")


def test_video_yamls_compose_and_take_frames_from_the_backbone():
    cfg = compose_cfg(["dataset=video/ssv2"])
    assert cfg.dataset.num_classes == 174 and cfg.dataset.benchmark == "video"
    assert cfg.dataset.frames is None and cfg.dataset.roles.test == "val_csv" and cfg.dataset.roles.val == "test_csv"
    assert cfg.dataset.eval_views.temporal == 4 and cfg.dataset.train_flip is False
    cfg = compose_cfg(["dataset=video/hmdb51", "+backbone.num_frames=8", "+backbone.frame_stride=2"])
    assert (cfg.dataset.frames, cfg.dataset.stride, cfg.dataset.num_classes) == (8, 2, 51)
    assert compose_cfg(["dataset=video/k400"]).dataset.num_classes == 400
    assert datasets.benchmark_order("video") == ["ssv2", "hmdb51", "k400"]


# ---------------------------------------------------------------- synthetic/moving_dsprites

def small_md_cfg(**over):
    cfg = compose_cfg(["dataset=synthetic/moving_dsprites", "dataset.frames=8", "dataset.stride=2",
                       "dataset.sizes.train=48", "dataset.sizes.val=16", "dataset.sizes.test=32"]).dataset
    for k, v in over.items():
        cfg[k] = v
    return cfg


def test_moving_dsprites_splits_follow_the_video_interface():
    t0 = time.perf_counter()
    task = datasets.build(small_md_cfg(), image_size=32, mean=MEAN, std=STD)
    assert time.perf_counter() - t0 < 30
    assert task.kind == "video_cls" and task.benchmark == "embedded_video" and task.num_classes == 8
    assert {k: len(task.splits[k]) for k in task.splits} == {"train800": 48, "val200": 16, "train800val200": 64,
                                                               "test": 32}
    x, y = task.split("train").__getitems__(list(range(5)))
    assert x.shape == (5, 3, 8, 32, 32) and y.dtype == torch.int64
    x, y = task.split("test").__getitems__([0, 1])
    assert x.shape == (2, 1, 3, 8, 32, 32)  # one (centred) view of frames 0, 2, .., 14
    x, _ = datasets.build(small_md_cfg(), image_size=48, mean=MEAN, std=STD).split("train").__getitems__([0])
    assert x.shape == (1, 3, 8, 48, 48)
    longer = datasets.build(small_md_cfg(clip_frames=20), image_size=32, mean=MEAN, std=STD)
    assert longer.splits["test"].store.num_frames(0) == 20 and longer.info["clip_frames"] == 20
    assert "train_transform" in longer.info and longer.info["eval_views"]["views"] == 1


def test_moving_dsprites_is_deterministic_and_motion_defines_the_class():
    a = moving_dsprites.generate(160, seed=0)
    b = moving_dsprites.generate(160, seed=0)
    assert np.array_equal(a["clips"], b["clips"]) and np.array_equal(a["labels"], b["labels"])
    assert not np.array_equal(moving_dsprites.generate(8, seed=1)["clips"], a["clips"][:8])
    assert a["clips"].shape == (160, 16, 32, 32) and a["clips"].dtype == np.uint8
    assert set(np.unique(a["labels"])) == set(range(8))
    # the displacement of the bright target between frames 0 and 8 (circular cross-correlation) gives the class
    correct = 0
    for clip, label in zip(a["clips"], a["labels"]):
        m0, m1 = (clip[0] > 170).astype(float), (clip[8] > 170).astype(float)
        corr = np.real(np.fft.ifft2(np.fft.fft2(m1) * np.conj(np.fft.fft2(m0))))
        dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
        dy, dx = (dy + 16) % 32 - 16, (dx + 16) % 32 - 16
        direction = int(np.round(np.arctan2(-dy, dx) / (np.pi / 4))) % 8
        correct += direction == label
    assert correct / len(a["labels"]) > 0.85
    # ... while a single frame does not: the target's position in frame 0 is spread over the image in every class
    for k in range(8):
        ys, xs = np.nonzero(a["clips"][a["labels"] == k][:, 0] > 170)[1:]
        assert xs.std() > 6 and ys.std() > 6


# ---------------------------------------------------------------- tools.check_data video

@pytest.fixture(scope="module")
def check_root(tmp_path_factory, folder):
    root = tmp_path_factory.mktemp("video")
    ssv2 = write_video_folder(root / "ssv2", 2, 2, 174, frames=8, size=(32, 32))
    (ssv2 / "videos/test/0001.mp4").write_bytes(b"broken" * 100)
    with open(ssv2 / "train.csv", "a") as f:
        f.write(f"{ssv2}/videos/train/0000.mp4,200\nnot a line\n{ssv2}/videos/nope.mp4,3\n")
    write_video_folder(root / "HMDB51", 2, 1, 51, frames=8, size=(32, 32), delimiter=" ")
    return root


def test_check_video_rows(check_root):
    table = check_data.load_table()
    assert table["video"]["ssv2"]["files"]["val.csv"]["lines"] == 24777
    assert [f["lines"] for f in table["video"]["hmdb51"]["files"].values()] == [3570, 1530, 1530]
    table["video"]["hmdb51"]["files"] = {k: {"lines": n, "sha256": "unknown"}
                                         for k, n in (("train.csv", 2), ("val.csv", 1), ("test.csv", 1))}
    rows = {r["dataset"]: r for r in check_data.check_video(check_root, set(), False, 2, table)}
    assert list(rows) == ["ssv2", "hmdb51", "k400"] and rows["k400"]["found"] is None
    h = rows["hmdb51"]
    assert h["found"].endswith("HMDB51") and check_data.is_clean(h)
    assert h["labels"]["train.csv"] == {"min": 0, "max": 1, "distinct": 2, "classes": 51}
    s = rows["ssv2"]
    assert not check_data.is_clean(s) and s["files"]["train.csv"]["lines"] == 4
    assert any("train.csv line 4: expected" in e for e in s["errors"])
    assert any("1 label(s) outside [0, 174) (first: " in e and "train.csv line 3" in e for e in s["errors"])
    bad = sorted(s["unreadable"])
    assert len(bad) == 2 and any("nope.mp4" in u and "train.csv line 5): missing" in u for u in bad)
    assert any("0001.mp4 (" in u and "val.csv line 2): RuntimeError" in u for u in bad)  # first listing wins
    # k400's line counts are unknown (null): any count is fine
    assert check_data.is_clean({"found": "x", "errors": [], "unreadable": [],
                                "files": {"train.csv": {"lines": 5, "expected": None}}})


def test_check_video_cli(check_root, capsys):
    out = subprocess.run([sys.executable, "-m", "tools.check_data", "video", str(check_root), "--only", "hmdb51",
                          "--decode"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr  # the fixture's counts are not HMDB51's 3570/1530/1530
    assert "train.csv            lines      2 / 3570   WRONG" in out.stdout
    assert "labels 0..1 (2 distinct) of 51 classes" in out.stdout and "unreadable videos: 0" in out.stdout
    assert check_data.main(["video", str(check_root / "HMDB51"), "--only", "hmdb51", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["found"] == str(check_root / "HMDB51") and rows[0]["unreadable"] == []
    assert check_data.main(["video", str(check_root), "--only", "ssv2"]) == 1
    text = capsys.readouterr().out
    assert "unreadable videos: 2" in text and "error: " in text
    assert text.strip().endswith("1/1 found, 0 complete and readable")
    assert check_data.main(["video", str(check_root), "--only", "ucf101"]) == 2
    assert "unknown video dataset(s) ucf101" in capsys.readouterr().err
