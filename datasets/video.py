"""Video action recognition data: Something-Something v2, HMDB51, Kinetics-400 from csv lists of video files.

Layout (V-PETL Bench / AdaptFormer, spec ``video_dense.md`` §A2)::

    <root>/train.csv  val.csv  test.csv     one line per clip: <video path>,<label>  or  <video path> <label>

No header (a first line whose label is not an integer and that names no video file is skipped as a header);
the delimiter is sniffed per file (comma — V-PETL — else whitespace — the anchor README, AdaptFormer); paths
are absolute (the anchors') or relative to ``<root>/<video_dir>``. Labels are 0 … K − 1. ``root`` may also be
the parent of the dataset folder (``ssv2/``, ``hmdb51/``, ``k400/`` and the spellings in ``folders``).

Roles (the anchors' swap): the per-epoch validation reads **test.csv**, the final multi-view test reads
**val.csv**; for SSv2 and HMDB51 the two are the same file. Split names are the csv names (``train_csv``,
``val_csv``, ``test_csv``) and the default roles are train = trainval = train_csv, val = test_csv,
test = val_csv.

Decoding: decord ``VideoReader(path, num_threads=1, ctx=cpu(0))`` at native resolution, ``get_batch(ids)``
(RGB uint8), as the anchors. Every listed video is decoded once into a cache (below); a missing, empty or
undecodable file stops the run with one line naming the file and its csv line (the anchors skip such files
and draw another index instead).

Cache: frames resized (bilinear, antialiased) to shorter side ``cache_short_side`` (default S, the smallest
side the transforms need: the V-PETL test crop and the base of the multi-scale crop), stored ragged under
``$PETL_BENCH_CACHE/video/<key>/`` (``data.npy`` flat uint8, ``index.npy`` int64 [N, 4] = offset, frames, h,
w; each video [frames, h, w, 3]) and memory-mapped when larger than ``in_memory_max_mb``. Training splits
keep every frame; evaluation splits keep only frames 0, s, 2s, … (the test protocol's sequence) and, for one
spatial view at ``cache_short_side = S``, only the centre S×S crop. The key hashes the csv's paths (resolved)
and labels in order, each file's size and mtime, and the geometry (short side, stride, crop); written to a
temporary folder and renamed when complete. Later epochs and runs decode nothing (``STATS``).
``dataset.cache=false`` decodes the frames each clip needs at every fetch instead (``LiveVideos``: no disk,
slower epochs; same pixels) for data too large to cache.

Deviation: the anchors' per-epoch validation takes one clip per video with a random start (a noisy number used
to pick the checkpoint); here every evaluation split, validation included, uses the deterministic multi-view
test protocol (``eval_views``), so a validation score is reproducible.

Deviation: with the default cache at shorter side S the multi-scale crop is taken from frames already resized
to S (the anchors crop the native 240/320-px frames, then resize the crop to S): the crop covers the same part
of the frame, at slightly lower resolution. ``dataset.cache_short_side=240`` (SSv2/HMDB) or ``320`` (K400)
reproduces the anchors' pixels; evaluation then resizes to S per batch.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from bench.registry import DATASETS
from datasets.base import DataError, Task, resize_uint8
from datasets.clips import SCALES, EvalClips, FrameStore, TrainClips, clip_geometry, eval_views
from datasets.images import Item, cached_ragged, default_cache_dir, sha256_file, shorter_side_size
from datasets.vtab import LazySplits

log = logging.getLogger(__name__)

# key -> (classes, accepted folder spellings)
VIDEO_DATASETS: dict[str, tuple[int, tuple[str, ...]]] = {
    "ssv2": (174, ("ssv2", "SSv2", "SSV2", "sthv2", "something-something-v2", "somethingsomethingv2")),
    "hmdb51": (51, ("hmdb51", "HMDB51", "hmdb")),
    "k400": (400, ("k400", "K400", "kinetics400", "Kinetics400", "kinetics-400", "kinetics")),
}
CSV_FILES = {"train_csv": "train.csv", "val_csv": "val.csv", "test_csv": "test.csv"}
DEFAULT_ROLES = {"train": "train_csv", "val": "test_csv", "trainval": "train_csv", "test": "val_csv"}
VIDEO_SUFFIX = re.compile(r"\.(mp4|webm|avi|mkv|mov|m4v|mpe?g)\b", re.IGNORECASE)
GETTING_DATA = "see README 'Video data'"
# Counts real decodes in this process (tests use it to prove a cache hit decodes nothing).
STATS = {"videos": 0, "frames": 0}


def decord_module():
    """``decord``, imported on first use; a one-line DataError with the install command when missing."""
    try:
        import decord
    except ImportError:
        raise DataError('decoding videos needs decord, which is not installed: pip install -e ".[video]"') from None
    decord.logging.set_level(decord.logging.QUIET)
    return decord


def find_video_dir(root, key: str, names=None) -> Path:
    """The folder holding ``train.csv`` for ``key``: ``root`` itself, or ``root/<spelling>``."""
    if root is None or str(root) == "":
        raise DataError(f"dataset.root is not set for video/{key}: set dataset.root=/path/to/{key} (the folder "
                        f"holding train.csv, val.csv, test.csv) or PETL_BENCH_VIDEO_{key.upper()}; {GETTING_DATA}")
    root = Path(str(root)).expanduser()
    if (root / CSV_FILES["train_csv"]).is_file():
        return root
    names = tuple(names or VIDEO_DATASETS[key][1])
    for n in names:
        if (root / n / CSV_FILES["train_csv"]).is_file():
            return root / n
    where = "does not exist" if not root.exists() else "has no train.csv"
    raise DataError(f"video dataset '{key}' not found: {root} {where} (nor {root}/{names[0]}/train.csv); set "
                    f"dataset.root=/path/to/{key} or PETL_BENCH_VIDEO_{key.upper()}; {GETTING_DATA}")


def _split_label(text: str, sep):
    """(path, label) when ``text`` ends in ``<sep><integer>``, else None."""
    parts = text.rsplit(sep, 1)
    if len(parts) != 2 or not parts[0].strip():
        return None
    try:
        return parts[0].strip(), int(parts[1].strip())
    except ValueError:
        return None


def read_annotations(path: Path, base: Path, num_classes: int | None = None,
                     problems: list[str] | None = None) -> list[Item]:
    """Parse a video csv: ``<path>,<label>`` or ``<path> <label>`` per line (blank lines skipped).

    The delimiter is the first data line's (comma if it parses that way, else whitespace); relative paths are
    joined to ``base``. A bad line raises a one-line DataError naming the file and line, or, when ``problems``
    is a list, is appended to it and skipped (``tools.check_data``).
    """
    if not path.is_file():
        raise DataError(f"csv file missing: {path}; the dataset folder must hold {', '.join(CSV_FILES.values())} "
                        f"(for SSv2/HMDB51 test.csv = val.csv; {GETTING_DATA})")
    items: list[Item] = []
    sep = "unset"
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            where = f"{path} line {n}"
            if sep == "unset":
                for cand in (",", None):
                    if _split_label(text, cand):
                        sep = cand
                        break
                else:
                    if not items and not VIDEO_SUFFIX.search(text):
                        continue  # a header such as "path,label"
            parsed = _split_label(text, sep) if sep != "unset" else None
            problem = None
            if parsed is None:
                form = "'<video path>,<label>'" if sep == "," else "'<video path> <label>'"
                problem = f"{where}: expected {form} with an integer label, got {text[:120]!r}"
            elif num_classes is not None and not 0 <= parsed[1] < num_classes:
                problem = (f"{where}: label {parsed[1]} outside [0, {num_classes}); wrong csv or "
                           "dataset.num_classes?")
            if problem:
                if problems is None:
                    raise DataError(problem)
                problems.append(problem)
                continue
            p = Path(parsed[0]).expanduser()
            items.append(Item(p if p.is_absolute() else base / p, parsed[1], where))
    return items


def open_video(item: Item):
    """A decord VideoReader on ``item.path``; DataError naming the file and csv line when it cannot be opened."""
    decord = decord_module()
    if not item.path.is_file():
        raise DataError(f"video not found: {item.path} (listed in {item.source}); check dataset.root / "
                        f"dataset.video_dir or the csv paths ({GETTING_DATA})")
    try:
        reader = decord.VideoReader(str(item.path), num_threads=1, ctx=decord.cpu(0))
    except Exception as e:  # decord raises RuntimeError / DECORDError
        raise DataError(f"cannot open video {item.path} (listed in {item.source}): {_one_line(e)}; re-download or "
                        "re-encode it as H.264 mp4, or remove its line") from None
    if len(reader) == 0:
        raise DataError(f"video {item.path} (listed in {item.source}) has no frames; re-encode it or remove its line")
    return reader


def _one_line(e: Exception) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[-300:]}"


def read_frames(reader, item: Item, ids: list[int]) -> np.ndarray:
    try:
        return reader.get_batch(ids).asnumpy()
    except Exception as e:
        raise DataError(f"cannot decode frames {ids[0]}..{ids[-1]} of {item.path} (listed in {item.source}): "
                        f"{_one_line(e)}; re-encode it as H.264 mp4 or remove its line") from None


def decode_video(item: Item, short: int, stride: int = 1, crop: int | None = None, chunk: int = 32) -> np.ndarray:
    """uint8 [frames, h, w, 3]: frames 0, stride, 2·stride, … of the file, through ``resize_frames``."""
    reader = open_video(item)
    ids = list(range(0, len(reader), stride))
    out = [resize_frames(read_frames(reader, item, ids[i: i + chunk]), short, crop) for i in range(0, len(ids), chunk)]
    STATS["videos"] += 1
    STATS["frames"] += len(ids)
    return np.ascontiguousarray(np.concatenate(out))


def resize_frames(frames: np.ndarray, short: int, crop: int | None = None) -> np.ndarray:
    """uint8 [n, H, W, 3] -> shorter side ``short`` (bilinear, antialiased), optionally the centre ``crop``²."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    nw, nh = shorter_side_size(w, h, short)
    x = resize_uint8(x.contiguous(), (nh, nw))
    if crop:
        top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
        x = x[:, :, top: top + crop, left: left + crop]
    return x.permute(0, 2, 3, 1).numpy()


class LiveVideos:
    """Frames decoded from the files at every fetch (``dataset.cache=false``): no disk cache, no first pass.

    Stands in for a ``FrameStore`` (``num_frames`` / ``frames``) with the same pixels as the cache (each frame's
    shorter side resized to ``short``). For data too large to cache (SSv2 train ~2 TB at S=224); every epoch
    decodes again (only the frames a clip uses). Frame counts are read once per video, on first use.
    """

    def __init__(self, items: list[Item], short: int):
        self.items, self.short, self._counts = list(items), int(short), {}

    def __len__(self) -> int:
        return len(self.items)

    def num_frames(self, i: int) -> int:
        if i not in self._counts:
            self._counts[i] = len(open_video(self.items[i]))
        return self._counts[i]

    def frames(self, i: int, ids: list[int]) -> torch.Tensor:
        item = self.items[i]
        unique = sorted(set(ids))
        decoded = resize_frames(read_frames(open_video(item), item, unique), self.short)
        STATS["videos"] += 1
        STATS["frames"] += len(unique)
        pos = {k: j for j, k in enumerate(unique)}
        return torch.from_numpy(np.ascontiguousarray(decoded[[pos[k] for k in ids]]))


def cached_frames(items: list[Item], short: int, stride: int, crop: int | None, cache_dir: Path, workers: int,
                  in_memory_max_mb: float, label: str = "videos") -> tuple[FrameStore, dict]:
    """The decoded frames of ``items`` (decoded once, content-keyed, atomic, memory-mapped when large)."""
    spec = {"kind": "video-frames", "short": short, "stride": stride, "crop": crop, "resize": "bilinear-antialias"}
    data, index, meta = cached_ragged(items, spec, lambda it: decode_video(it, short, stride, crop), cache_dir,
                                      workers, in_memory_max_mb, dims=lambda a: a.shape[:3],
                                      chunk=max(2, 2 * workers), progress=f"decoding {label}")
    return FrameStore(data, index.view(-1, 4)), meta


def build_video(cfg, image_size: int, mean, std) -> Task:
    name = str(cfg["name"])
    key = name.split("/", 1)[-1]
    if key not in VIDEO_DATASETS:
        raise DataError(f"unknown video dataset '{key}' (dataset.name={name}); choose one of "
                        f"{', '.join(VIDEO_DATASETS)}")
    frames, stride = clip_geometry(cfg)
    temporal, spatial = eval_views(cfg)
    classes = int(cfg.get("num_classes") or VIDEO_DATASETS[key][0])
    folder = find_video_dir(cfg.get("root"), key, cfg.get("folders"))
    base = folder / str(cfg.get("video_dir") or "")
    size = int(image_size)
    short = int(cfg.get("cache_short_side") or size)
    if short < size:
        raise DataError(f"dataset.cache_short_side={short} is smaller than the clip size {size}; use >= {size} or null")
    scales = [float(x) for x in (cfg.get("scales") or SCALES)]
    max_distort = int(cfg.get("max_distort", 1))
    flip = bool(cfg.get("train_flip", False))
    cache_dir = Path(cfg.get("cache_dir") or default_cache_dir("video")).expanduser()
    workers = int(cfg.get("decode_workers") or 4)
    mem_mb = float(cfg.get("in_memory_max_mb", 2048))
    use_cache = bool(cfg.get("cache", True))
    csvs = dict(cfg.get("csv") or CSV_FILES)
    roles = dict(cfg.get("roles") or DEFAULT_ROLES)
    for role, split in roles.items():
        if split not in csvs:
            raise DataError(f"dataset.roles.{role}={split}: choose one of {', '.join(csvs)}")
    train_splits = {roles[r] for r in ("train", "trainval") if r in roles}
    both = train_splits & {roles[r] for r in roles if r not in ("train", "trainval")}
    if both:
        raise DataError(f"dataset.roles: split {sorted(both)[0]} is used for training and evaluation; a training split "
                        "yields one random clip per video, an evaluation split all views: map them to different csvs")
    for split, fname in csvs.items():  # fail early, before decoding anything
        if not (folder / fname).is_file():
            raise DataError(f"csv file missing: {folder / fname}; the dataset folder must hold "
                            f"{', '.join(csvs.values())} (for SSv2/HMDB51 test.csv = val.csv; {GETTING_DATA})")
    pre_crop = size if spatial == 1 and short == size else None
    crop_text = ("CenterCrop" if spatial == 1 else f"{spatial} crops along the long side (left/centre/right)")
    train_text = (f"GroupMultiScaleCrop(scales={scales}, max_distort={max_distort}, 13 fixed origins) -> "
                  f"Resize(({size}, {size}), bilinear){' -> HFlip(0.5)' if flip else ''} -> Normalize")
    info: dict = {
        "source": "video csv lists (decord)", "folder": str(folder), "video_dir": str(base),
        "frames": frames, "stride": stride, "clip_size": size,
        "sampler": f"train: one clip of {frames} frames at stride {stride}, start ~ U{{0..N-{frames * stride}}}, "
                   "short videos repeat their last reachable frame",
        "transform": {
            "train": train_text,
            "eval": (f"frames 0,{stride},{2 * stride},..; {temporal} clips of {frames} at int(k*max((L-T)/(n-1),0)); "
                     f"Resize(shorter {size}, bilinear) -> {crop_text} {size} -> Normalize"),
        },
        "train_transform": train_text,
        "eval_views": {"temporal": temporal, "spatial": spatial, "views": temporal * spatial,
                       "order": "temporal-major", "aggregation": "mean of raw logits"},
        "cache_short_side": short, "csv": {s: str(folder / f) for s, f in csvs.items()},
        "csv_sha256": {s: sha256_file(folder / f) for s, f in csvs.items()}, "sizes": {}, "cache": {},
    }

    def builder(split: str):
        def build():
            items = read_annotations(folder / csvs[split], base, classes)
            if not items:
                raise DataError(f"{folder / csvs[split]} lists no videos")
            labels = torch.tensor([it.label for it in items], dtype=torch.long)
            info["sizes"][split] = len(items)
            label = f"{key} {split}"
            training = split in train_splits
            if not use_cache:  # decode the frames each fetch needs; the eval stride applies to the file's frames
                info["cache"][split] = {"cache": None, "storage": "none: decoded at every fetch"}
                store, eval_stride = LiveVideos(items, short), stride
            elif training:
                store, meta = cached_frames(items, short, 1, None, cache_dir, workers, mem_mb, label)
                info["cache"][split] = {**meta, "frames": "all", "short_side": short}
            else:  # the cache holds frames 0, s, 2s, .. already
                store, meta = cached_frames(items, short, stride, pre_crop, cache_dir, workers, mem_mb, label)
                info["cache"][split] = {**meta, "frames": f"0,{stride},{2 * stride},..", "short_side": short,
                                        "crop": pre_crop}
                eval_stride = 1
            if training:
                return TrainClips(store, labels, frames, stride, size, mean, std, "multiscale", scales, max_distort,
                                  flip)
            return EvalClips(store, labels, frames, size, mean, std, temporal, spatial, stride=eval_stride)
        return build

    splits = LazySplits({s: builder(s) for s in csvs})
    return Task(name=name, benchmark=str(cfg.get("benchmark", "video")), num_classes=classes, splits=splits,
                roles=roles, image_size=size, mean=list(mean), std=list(std), info=info, kind="video_cls")


for _key in VIDEO_DATASETS:
    DATASETS.add(f"video/{_key}", build_video)
