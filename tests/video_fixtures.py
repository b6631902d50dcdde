"""Tiny on-disk video datasets (real H.264 mp4 files written with PyAV) in the anchors' csv layout.

Frame k of every video encodes its index: the red channel is the uniform level ``level(k)``
(``frame_index`` inverts it); green ramps 0 → 255 from left to right and blue from top to bottom, so a
test can tell which frames and which spatial crop a clip came from. Lossless H.264 (crf 0, yuv420p):
decoded levels are within ~2 of the written ones (more near strong colour edges).

decord 0.6.0 cannot decode some small widths: 16, 24, 48 and 72 px ("DECORDArrayCopyFromTo: The size must
exactly match"; every other even width from 16 to 128 works, any height works, and so do real sizes such as
320×240, 426×240, 340×256). ``write_mp4`` refuses those widths.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

STEP = 10  # red level step per frame index (supports up to 25 frames)
DECORD_BAD_WIDTHS = (16, 24, 48, 72)


def level(k: int, frames: int = 25) -> int:
    return 8 + k * step_for(frames)


def step_for(frames: int) -> int:
    return max(1, min(STEP, 240 // max(frames - 1, 1)))


def frame_index(red_mean: float, frames: int = 25) -> int:
    return int(round((red_mean - 8) / step_for(frames)))


def frame_image(k: int, w: int, h: int, frames: int = 25) -> np.ndarray:
    """uint8 [h, w, 3] of frame k."""
    red = np.full((h, w), level(k, frames), dtype=np.float64)
    green = np.repeat(np.linspace(0, 255, w)[None, :], h, 0)
    blue = np.repeat(np.linspace(0, 255, h)[:, None], w, 1)
    return np.stack([red, green, blue], -1).round().astype(np.uint8)


def write_mp4(path: Path, frames: int, w: int, h: int, fps: int = 12, codec: str = "libx264",
              index_frames: int = 25) -> Path:
    """An mp4 with ``frames`` frames of w×h (even sizes) whose frame k is ``frame_image(k)``."""
    import av

    if w in DECORD_BAD_WIDTHS:
        raise ValueError(f"width {w}: decord 0.6.0 cannot decode mp4 files {w} px wide; use e.g. 40, 56 or 64")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0"}
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(k, w, h, index_frames), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_video_folder(root, n_train: int, n_test: int, num_classes: int, frames=16, size=(40, 32),
                       delimiter: str = ",", absolute: bool = True) -> Path:
    """``root`` with ``videos/{train,test}/*.mp4`` and ``train.csv``, ``val.csv``, ``test.csv`` (val = test,
    as SSv2/HMDB51), no header; labels ``i % num_classes``. Returns ``root``.

    ``frames``: one count for every video, or a sequence cycled over the videos (train first, then test).
    ``size``: (w, h) or one int (square); keep w/h even. ``delimiter``: "," (V-PETL) or " " (AdaptFormer).
    ``absolute``: absolute paths in the csvs (the anchors'), else relative to ``root``.
    """
    root = Path(root)
    counts: Sequence[int] = [frames] if isinstance(frames, int) else list(frames)
    w, h = (size, size) if isinstance(size, int) else size
    rows: dict[str, list[str]] = {"train": [], "test": []}
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            rel = Path("videos") / split / f"{i:04d}.mp4"
            write_mp4(root / rel, counts[k % len(counts)], w, h, index_frames=max(25, *counts))
            k += 1
            rows[split].append(f"{(root / rel) if absolute else rel}{delimiter}{i % num_classes}\n")
    (root / "train.csv").write_text("".join(rows["train"]))
    (root / "val.csv").write_text("".join(rows["test"]))
    (root / "test.csv").write_text("".join(rows["test"]))
    return root
