"""Clips from stored uint8 frames: the video training sampler and transform, and the multi-view test protocol.

Shared by the real video datasets (``datasets/video.py``, frames decoded once into a cache) and the procedural
``synthetic/moving_dsprites`` (frames generated in memory). Protocol (V-PETL Bench / AdaptFormer, both taken from
VideoMAE's loaders; see ``/work/shared/specs/video_dense.md`` §A2):

Training (``TrainClips``): one dense clip per video and epoch. Span L = T·s; start ~ U{0, …, N − L} (0 when the
video is shorter than L); frame ids start, start + s, … where a step is only taken while the next id is < N, so
short videos repeat their last reachable frame (100 frames, T=8, s=4: 8 ids 4 apart, start in [0, 68];
20 frames: 0 4 8 12 16 16 16 16). Transform ``multiscale``: GroupMultiScaleCrop, the same crop for every frame
of the clip: base = min(h, w); crop sides int(base·scale) for scales [1, .875, .75, .66], snapped to S when
within 3 px; a random (height, width) pair of scale indices differing by at most ``max_distort``; the crop
origin one of 13 fixed positions on a grid with steps ((w − cw)//4, (h − ch)//4) (4 corners, centre, 4 edge
centres, 4 quarter points); then resize to S×S (bilinear, antialiased, rounded to uint8 like a PIL resize).
No flip (``flip=True`` adds a clip-level horizontal flip with p = 0.5). Transform ``resize``: the whole frame
resized to S×S (procedural clips, already square). All randomness comes from torch's global RNG, so the run
seed makes an epoch reproducible.

Evaluation (``EvalClips``): the frames 0, s, 2s, … of the video (padded with the last one up to T), of
length L; ``temporal`` clips of T consecutive frames of that sequence starting at int(k·max((L − T)/(n − 1), 0)),
k = 0 … n − 1 (n = 1: the centred clip, start (L − T)//2); every frame's shorter side resized to S; then
``spatial`` crops S×S: 1 = the centre crop (V-PETL's pre-crop: its 3 "crops" are identical), 3 = left/centre/right
(top/centre/bottom for portrait videos) along the long side at int(k·(long − S)/2) (AdaptFormer). Views are
ordered temporal-major (view = t·spatial + c); every batch is [B, V, 3, T, S, S]. The evaluation loop averages
the raw logits over V.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.base import DataError, resize_uint8
from datasets.images import shorter_side_size

SCALES = (1.0, 0.875, 0.75, 0.66)
# crop origins of GroupMultiScaleCrop (more_fix_crop), in grid steps (x, y): corners, centre, edge centres, quarters
FIXED_ORIGINS = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3))


def clip_geometry(cfg) -> tuple[int, int]:
    """(frames T, stride s) from the dataset config (the yamls take them from ``backbone.num_frames/frame_stride``)."""
    t, s = cfg.get("frames"), cfg.get("stride")
    if t is None or s is None:
        raise DataError(f"dataset {cfg.get('name')}: dataset.frames / dataset.stride are not set (the backbone "
                        "config has no num_frames / frame_stride): use a video backbone or set dataset.frames=8 "
                        "dataset.stride=4")
    t, s = int(t), int(s)
    if t < 1 or s < 1:
        raise DataError(f"dataset {cfg.get('name')}: dataset.frames={t} and dataset.stride={s} must be >= 1")
    return t, s


def eval_views(cfg, default_temporal: int = 4, default_spatial: int = 1) -> tuple[int, int]:
    views = cfg.get("eval_views") or {}
    t, c = int(views.get("temporal", default_temporal)), int(views.get("spatial", default_spatial))
    if t < 1 or c < 1:
        raise DataError(f"dataset.eval_views={{temporal: {t}, spatial: {c}}}: both must be >= 1")
    return t, c


def clip_indices(start: int, num_frames: int, frames: int, stride: int) -> list[int]:
    """Ids start, start + s, …: a step is taken only while it stays below ``num_frames`` (repeats the last one)."""
    ids, pos = [], start
    for _ in range(frames):
        ids.append(pos)
        if pos + stride < num_frames:
            pos += stride
    return ids


def train_indices(num_frames: int, frames: int, stride: int) -> list[int]:
    """The training clip of a ``num_frames`` video: random start in [0, N − T·s] (0 if shorter), torch RNG."""
    room = num_frames - frames * stride + 1
    start = int(torch.randint(0, room, (1,))) if room > 0 else 0
    return clip_indices(start, num_frames, frames, stride)


def strided_sequence(num_frames: int, stride: int, frames: int) -> list[int]:
    """Frames 0, s, 2s, … < N, padded with the last id up to ``frames``: the test protocol's decoded sequence."""
    seq = list(range(0, num_frames, stride))
    return seq + [seq[-1]] * max(0, frames - len(seq))


def temporal_starts(length: int, frames: int, views: int) -> list[int]:
    """Starts of ``views`` clips of ``frames`` in a sequence of ``length``: int(k·max((L − T)/(n − 1), 0))."""
    if views == 1:
        return [max(length - frames, 0) // 2]
    tick = max((length - frames) / (views - 1), 0.0)
    return [int(k * tick) for k in range(views)]


def spatial_origins(h: int, w: int, size: int, views: int) -> list[tuple[int, int]]:
    """(top, left) of ``views`` size² crops of an h×w frame whose shorter side is ``size``."""
    centre = (int(round((h - size) / 2.0)), int(round((w - size) / 2.0)))
    if views == 1:
        return [centre]
    step = (max(h, w) - size) / (views - 1)
    if h >= w:
        return [(int(k * step), centre[1]) for k in range(views)]
    return [(centre[0], int(k * step)) for k in range(views)]


def multiscale_crop_box(h: int, w: int, size: int, scales: Sequence[float] = SCALES,
                        max_distort: int = 1) -> tuple[int, int, int, int]:
    """(top, left, crop h, crop w) of GroupMultiScaleCrop with fixed origins, drawn from torch's RNG."""
    base = min(h, w)
    sides = [size if abs(int(base * x) - size) < 3 else int(base * x) for x in scales]
    pairs = [(sides[i], sides[j]) for i in range(len(sides)) for j in range(len(sides)) if abs(i - j) <= max_distort]
    ch, cw = pairs[int(torch.randint(0, len(pairs), (1,)))]
    ch, cw = min(ch, h), min(cw, w)
    gx, gy = FIXED_ORIGINS[int(torch.randint(0, len(FIXED_ORIGINS), (1,)))]
    return gy * ((h - ch) // 4), gx * ((w - cw) // 4), ch, cw


class FrameStore:
    """uint8 frames of N videos, ragged: ``data`` flat, ``index`` int64 [N, 4] = (offset, frames, h, w).

    Video i is ``data[offset: offset + frames·h·w·c]`` viewed as [frames, h, w, c] (c = 3 RGB, or 1 gray).
    ``data`` may be a memory map (the video cache) or an in-memory tensor (procedural clips). The clip datasets
    only call ``num_frames(i)`` and ``frames(i, ids)``, so any object with those two methods can stand in for it
    (``datasets.video.LiveVideos`` decodes the requested frames from the files instead).
    """

    def __init__(self, data: torch.Tensor, index: torch.Tensor, channels: int = 3):
        if index.dim() != 2 or index.shape[1] != 4:
            raise DataError(f"frame index must be [N, 4] (offset, frames, h, w), got {tuple(index.shape)}")
        self.data, self.index, self.channels = data, index.long(), int(channels)

    @classmethod
    def from_dense(cls, clips) -> "FrameStore":
        """From uint8 [N, F, H, W] (gray) or [N, F, H, W, C]."""
        x = torch.as_tensor(np.ascontiguousarray(clips))
        if x.dim() == 4:
            x = x[..., None]
        n, f, h, w, c = x.shape
        per = f * h * w * c
        index = torch.tensor([[i * per, f, h, w] for i in range(n)], dtype=torch.long).view(n, 4)
        return cls(x.reshape(-1), index, c)

    def __len__(self) -> int:
        return self.index.shape[0]

    def num_frames(self, i: int) -> int:
        return int(self.index[i, 1])

    def video(self, i: int) -> torch.Tensor:
        off, f, h, w = (int(v) for v in self.index[i])
        return self.data[off: off + f * h * w * self.channels].view(f, h, w, self.channels)

    def frames(self, i: int, ids: list[int]) -> torch.Tensor:
        """uint8 [len(ids), h, w, c]: frames ``ids`` of video i."""
        return self.video(i)[ids]


class _ClipDataset(Dataset):
    def __init__(self, store: FrameStore, labels: torch.Tensor, frames: int, size: int, mean, std):
        if len(store) != len(labels):
            raise DataError(f"{len(store)} videos but {len(labels)} labels")
        self.store, self.labels = store, torch.as_tensor(labels).long()
        self.frames, self.size = int(frames), int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _normalise(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 [..., T, c, S, S] -> normalised float [..., 3, T, S, S]."""
        lead = clips.shape[:-4]
        x = clips.reshape(-1, *clips.shape[-4:]).transpose(1, 2)  # [M, c, T, S, S]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1, -1)
        x = (x.float().div_(255.0) - self.mean) / self.std
        return x.reshape(*lead, *x.shape[1:])

    def __getitem__(self, i: int):
        x, y = self.batch([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]):
        return self.batch(indices)


class TrainClips(_ClipDataset):
    """Training split: (x float [B, 3, T, S, S] normalised, y int64 [B]); one random clip per video per fetch."""

    def __init__(self, store: FrameStore, labels, frames: int, stride: int, size: int, mean, std,
                 transform: str = "multiscale", scales: Sequence[float] = SCALES, max_distort: int = 1,
                 flip: bool = False):
        super().__init__(store, labels, frames, size, mean, std)
        if transform not in ("multiscale", "resize"):
            raise DataError(f"train transform {transform!r}: choose multiscale or resize")
        self.stride, self.transform = int(stride), transform
        self.scales, self.max_distort, self.flip = tuple(float(s) for s in scales), int(max_distort), bool(flip)

    def clip(self, i: int) -> torch.Tensor:
        """uint8 [T, c, S, S] of video i (draws from torch's RNG)."""
        ids = train_indices(self.store.num_frames(i), self.frames, self.stride)
        x = self.store.frames(i, ids)  # [T, h, w, c]
        if self.transform == "multiscale":
            top, left, ch, cw = multiscale_crop_box(x.shape[1], x.shape[2], self.size, self.scales, self.max_distort)
            x = x[:, top: top + ch, left: left + cw]
        x = resize_uint8(x.permute(0, 3, 1, 2).contiguous(), self.size)
        if self.flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        return x

    def batch(self, idx):
        idx = torch.as_tensor(idx).view(-1)
        clips = torch.stack([self.clip(i) for i in idx.tolist()])
        return self._normalise(clips), self.labels[idx]


class EvalClips(_ClipDataset):
    """Evaluation split: (x float [B, V, 3, T, S, S], y int64 [B]) with V = temporal × spatial fixed views.

    ``stride`` applies to the stored frames: 1 for the video cache (it already holds frames 0, s, 2s, …),
    s for clips stored at full frame rate.
    """

    def __init__(self, store: FrameStore, labels, frames: int, size: int, mean, std, temporal: int = 4,
                 spatial: int = 1, stride: int = 1):
        super().__init__(store, labels, frames, size, mean, std)
        self.temporal, self.spatial, self.stride = int(temporal), int(spatial), int(stride)
        self.views = self.temporal * self.spatial

    def views_of(self, i: int) -> torch.Tensor:
        """uint8 [V, T, c, S, S] of video i."""
        seq = strided_sequence(self.store.num_frames(i), self.stride, self.frames)
        starts = temporal_starts(len(seq), self.frames, self.temporal)
        needed = sorted({k for st in starts for k in seq[st: st + self.frames]})
        frames = self.store.frames(i, needed)  # every frame the views use, fetched once
        pos = {k: j for j, k in enumerate(needed)}
        s = self.size
        out = []
        for start in starts:
            x = frames[[pos[k] for k in seq[start: start + self.frames]]]
            x = x.permute(0, 3, 1, 2).contiguous()  # [T, c, h, w]
            h, w = x.shape[-2:]
            if min(h, w) != s:
                nw, nh = shorter_side_size(w, h, s)
                x = resize_uint8(x, (nh, nw))
                h, w = nh, nw
            for top, left in spatial_origins(h, w, s, self.spatial):
                out.append(x[:, :, top: top + s, left: left + s])
        return torch.stack(out)

    def batch(self, idx):
        idx = torch.as_tensor(idx).view(-1)
        clips = torch.stack([self.views_of(i) for i in idx.tolist()])
        return self._normalise(clips), self.labels[idx]
