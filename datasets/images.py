"""Image files on disk -> uint8 tensors, decoded and resized once, cached by content.

Shared by the VTAB-1k (``datasets/vtab.py``) and FGVC (``datasets/fgvc.py``) loaders.

Decoding: PIL, ``convert("RGB")``, then PIL ``resize`` with the protocol's filter. This is the same
pipeline as the official loaders (torchvision's ``Resize`` on a PIL image calls PIL's resize), and PIL
returns uint8, so the stored tensors are bit-identical to what ``Resize`` + ``ToTensor`` give the
official code before normalisation.

Cache: one folder per (image list, transform) under ``$PETL_BENCH_CACHE/images`` (default
``~/.cache/petl-bench/images``). The key hashes the list (relative paths and labels in order), the
resolved image folder, each file's size and mtime (a ``stat``, not a read: 70k stats take well under a
second), the output geometry and the filter. Change any image or list line and the key changes.

Storage (why): a VTAB-1k train split is 1000 images (150 MB at 224²) and stays in RAM; a test set of
73,728 images at 224² is 11 GB, so every cache is a ``.npy`` file that is memory-mapped, and only
caches below ``in_memory_max_mb`` are copied into RAM. Evaluation reads the memory map in batch order
(sequential pages); nothing is decoded again in later epochs or runs. For large VTAB evaluation
splits whose originals are small (dSprites 64², 73,728 images: 0.9 GB decoded vs 11 GB at 224²) the
VTAB loader caches the decoded originals instead and resizes per batch (``large_split_storage``),
which gives the same pixels; the test set is evaluated once per run, so the per-batch resize is cheap.

Two layouts:
* fixed: ``images.npy`` uint8 [N, 3, H, W] (VTAB resize, FGVC centre crop);
* ragged: ``data.npy`` flat uint8 + ``index.npy`` int64 [N, 3] (offset, h, w): FGVC training images
  kept at "shorter side = R" so the random crop sees the whole resized image, as in the official
  ``Resize(256) -> RandomCrop(224)``; and VTAB originals for the native storage above.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from datasets.base import DataError, ImageTensorDataset

log = logging.getLogger(__name__)

CACHE_VERSION = 1
FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
# Counts real image decodes in this process (tests use it to prove a cache hit decodes nothing).
STATS = {"decoded": 0}


@dataclass(frozen=True)
class Item:
    """One image of a split: file path, label, and where it was listed (for error messages)."""

    path: Path
    label: int
    source: str  # e.g. "/data/vtab-1k/dtd/train800.txt line 17" or "/data/CUB/train.json key 'x.jpg'"


def filter_of(name: str):
    if name not in FILTERS:
        raise DataError(f"unknown interpolation '{name}'; choose one of {', '.join(FILTERS)} (dataset.interpolation)")
    return FILTERS[name]


def default_cache_dir(kind: str = "images") -> Path:
    """``$PETL_BENCH_CACHE/<kind>`` (default ``~/.cache/petl-bench/<kind>``); videos use ``kind="video"``."""
    return Path(os.environ.get("PETL_BENCH_CACHE", "~/.cache/petl-bench")).expanduser() / kind


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shorter_side_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(w, h) after resizing the shorter side to ``short`` keeping the aspect ratio.

    Same arithmetic as torchvision ``Resize(int)``: the long side is truncated, ``int(short * long / short_side)``.
    """
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def open_rgb(item: Item) -> Image.Image:
    try:
        with Image.open(item.path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {item.path} (listed in {item.source}); check dataset.root "
                        "or re-extract the dataset") from None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise DataError(f"cannot decode image {item.path} (listed in {item.source}): {type(e).__name__}: {e}; "
                        "re-download/re-extract this file or remove its line") from None


def decode_resized(item: Item, size: tuple[int, int], resample) -> np.ndarray:
    """[3, H, W] uint8: RGB image resized to ``size`` = (w, h)."""
    im = open_rgb(item)
    STATS["decoded"] += 1
    if im.size != size:
        im = im.resize(size, resample)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def decode_center_crop(item: Item, short: int, crop: int, resample) -> np.ndarray:
    """[3, crop, crop] uint8: shorter side -> ``short``, then the centre ``crop``² (torchvision CenterCrop rounding)."""
    im = open_rgb(item)
    STATS["decoded"] += 1
    size = shorter_side_size(*im.size, short)
    if im.size != size:
        im = im.resize(size, resample)
    w, h = im.size
    if w < crop or h < crop:
        raise DataError(f"{item.path}: resized to {w}x{h}, smaller than the crop {crop}")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    im = im.crop((left, top, left + crop, top + crop))
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def decode_shorter(item: Item, short: int, resample) -> np.ndarray:
    """[3, h, w] uint8 with the shorter side resized to ``short``."""
    im = open_rgb(item)
    STATS["decoded"] += 1
    size = shorter_side_size(*im.size, short)
    if im.size != size:
        im = im.resize(size, resample)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def decode_native(item: Item) -> np.ndarray:
    """[3, h, w] uint8 at the file's own resolution."""
    im = open_rgb(item)
    STATS["decoded"] += 1
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def native_bytes(items: Sequence[Item], workers: int = 4) -> int:
    """Bytes of the decoded RGB images at their own resolution, from the file headers (no decoding)."""
    def size(it: Item) -> int:
        try:
            with Image.open(it.path) as im:
                w, h = im.size
        except Exception:  # unreadable: decoding will report it with file and line
            return 0
        return 3 * w * h
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return sum(pool.map(size, items))


def cache_exists(items: Sequence[Item], spec: dict, layout: str, cache_dir: Path, shape=None) -> bool:
    extra = {"layout": layout} if shape is None else {"layout": layout, "shape": list(shape)}
    return (Path(cache_dir) / content_key(items, {**spec, **extra}) / "done").is_file()


def content_key(items: Sequence[Item], spec: dict) -> str:
    """Hash of the list (paths, labels), each file's size and mtime, and the transform spec."""
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **spec}, sort_keys=True).encode())
    for it in items:
        try:
            st = os.stat(it.path)
            sig = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            sig = "missing"
        h.update(f"{os.path.abspath(it.path)}\t{it.label}\t{sig}\n".encode())
    return h.hexdigest()[:20]


def _map_ordered(fn: Callable, items: Sequence[Item], workers: int, chunk: int = 256, progress: str | None = None):
    """Yield ``fn(item)`` in order; decodes in a thread pool (PIL and decord release the GIL while decoding).

    ``chunk`` bounds how many results are in flight (videos: a few per worker); ``progress`` = a tqdm label.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), desc=progress, unit="file", leave=False)
    try:
        if workers <= 1:
            for it in items:
                yield fn(it)
                if bar is not None:
                    bar.update(1)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i in range(0, len(items), chunk):
                for out in pool.map(fn, items[i: i + chunk]):
                    yield out
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _finish(tmp: Path, final: Path) -> None:
    (tmp / "done").write_text("ok")
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _load_npy(path: Path, in_memory_max_mb: float) -> tuple[np.ndarray, str]:
    mm = np.load(path, mmap_mode="r")
    if mm.nbytes <= in_memory_max_mb * 2**20:
        return np.array(mm), "memory"
    # copy-on-write map: writable for torch.from_numpy, nothing is ever written back to the file
    return np.load(path, mmap_mode="c"), "memmap"


def cached_fixed(items: Sequence[Item], spec: dict, decode: Callable[[Item], np.ndarray], shape: tuple[int, int, int],
                 cache_dir: Path, workers: int = 4, in_memory_max_mb: float = 2048) -> tuple[torch.Tensor, dict]:
    """uint8 [N, *shape] of the decoded items, from the cache or decoded once into it."""
    key = content_key(items, {**spec, "layout": "fixed", "shape": list(shape)})
    final = Path(cache_dir) / key
    if not (final / "done").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}-"))
        try:
            arr = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(items), *shape))
            log.info("decoding %d images into %s", len(items), final)
            for i, img in enumerate(_map_ordered(decode, list(items), workers)):
                if img.shape != tuple(shape):
                    raise DataError(f"{items[i].path}: decoded to {img.shape}, expected {tuple(shape)}")
                arr[i] = img
            arr.flush()
            del arr
            _finish(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    arr, where = _load_npy(final / "images.npy", in_memory_max_mb)
    return torch.from_numpy(arr), {"cache": str(final), "storage": where, "key": key}


def cached_ragged(items: Sequence[Item], spec: dict, decode: Callable[[Item], np.ndarray], cache_dir: Path,
                  workers: int = 4, in_memory_max_mb: float = 2048, dims: Callable[[np.ndarray], tuple] | None = None,
                  chunk: int = 256, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(flat uint8 buffer, int64 [N, 1 + len(dims)] (offset, *dims)) of variable-size decoded items.

    ``dims(array)`` gives the index columns after the offset: images [3, h, w] -> (h, w) (default); videos
    [frames, h, w, 3] pass ``lambda a: a.shape[:3]`` -> (frames, h, w).
    """
    dims = dims or (lambda a: a.shape[1:])
    key = content_key(items, {**spec, "layout": "ragged"})
    final = Path(cache_dir) / key
    if not (final / "done").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}-"))
        try:
            index = None
            offset = 0
            log.info("decoding %d files into %s", len(items), final)
            with open(tmp / "data.bin", "wb") as f:
                for i, img in enumerate(_map_ordered(decode, list(items), workers, chunk, progress)):
                    row = (offset, *dims(img))
                    if index is None:
                        index = np.zeros((len(items), len(row)), dtype=np.int64)
                    index[i] = row
                    f.write(np.ascontiguousarray(img).tobytes())
                    offset += img.size
            # wrap the raw bytes as a .npy (header + data) without holding them in memory
            data = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=np.uint8, shape=(max(offset, 1),))
            with open(tmp / "data.bin", "rb") as f:
                pos = 0
                for block in iter(lambda: f.read(1 << 26), b""):
                    data[pos: pos + len(block)] = np.frombuffer(block, dtype=np.uint8)
                    pos += len(block)
            data.flush()
            del data
            os.unlink(tmp / "data.bin")
            np.save(tmp / "index.npy", index if index is not None else np.zeros((0, 3), dtype=np.int64))
            _finish(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    data, where = _load_npy(final / "data.npy", in_memory_max_mb)
    index = np.load(final / "index.npy")
    return torch.from_numpy(data), torch.from_numpy(index), {"cache": str(final), "storage": where, "key": key}


def _normalise(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float().div_(255.0) - mean) / std


class PILAugmentDataset(ImageTensorDataset):
    """``ImageTensorDataset`` whose training images go through per-sample PIL transforms.

    ``pil_transform`` maps a PIL image to a PIL image (e.g. flip + timm RandAugment); it runs on the
    stored (already resized) uint8 image, so the order resize -> flip -> RandAugment of the official
    pipeline is kept.
    """

    def __init__(self, images, labels, mean, std, pil_transform: Optional[Callable] = None):
        super().__init__(images, labels, mean, std)
        self.pil_transform = pil_transform

    def batch(self, idx):
        imgs = self.images[idx]
        if self.pil_transform is not None:
            hwc = imgs.permute(0, 2, 3, 1).contiguous().numpy()  # [B, H, W, 3], augmented in place
            for j in range(hwc.shape[0]):
                hwc[j] = np.asarray(self.pil_transform(Image.fromarray(hwc[j])), dtype=np.uint8)
            imgs = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
        return _normalise(imgs, self.mean, self.std), self.labels[idx]


class RaggedCropDataset(torch.utils.data.Dataset):
    """Variable-size uint8 images (shorter side = R) -> random ``crop``² crop + horizontal flip (p=0.5).

    Equivalent to torchvision ``RandomCrop(crop)`` + ``RandomHorizontalFlip()`` applied after ``Resize(R)``:
    the crop offset is uniform over every valid position of the resized image. Uses torch's global RNG.
    """

    def __init__(self, data: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, crop: int,
                 mean: Sequence[float], std: Sequence[float], flip: bool = True):
        self.data, self.index, self.labels = data, index, labels.long()
        self.crop, self.flip = crop, flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def image(self, i: int) -> torch.Tensor:
        off, h, w = (int(v) for v in self.index[i])
        return self.data[off: off + 3 * h * w].view(3, h, w)

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx).view(-1)
        out = torch.empty(len(idx), 3, self.crop, self.crop, dtype=torch.uint8)
        c = self.crop
        for j, i in enumerate(idx.tolist()):
            img = self.image(i)
            h, w = img.shape[1:]
            top = int(torch.randint(0, h - c + 1, (1,)))
            left = int(torch.randint(0, w - c + 1, (1,)))
            patch = img[:, top: top + c, left: left + c]
            if self.flip and torch.rand(1).item() < 0.5:
                patch = patch.flip(-1)
            out[j] = patch
        return _normalise(out, self.mean, self.std), self.labels[idx]

    def __getitem__(self, i: int):
        x, y = self.batch([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]):
        return self.batch(indices)


def randaugment_transform(size: int, mean: Sequence[float], config: str = "rand-m9-mstd0.5-inc1",
                          interpolation: str = "bicubic") -> Callable:
    """Horizontal flip + timm RandAugment, exactly the ops timm's ``create_transform`` builds.

    Official (V-PETL ``train_aug``): ``create_transform(224, is_training=True, color_jitter=0.4,
    auto_augment='rand-m9-mstd0.5-inc1', re_prob=0, interpolation='bicubic')`` with its first op
    (RandomResizedCrop) replaced by a plain resize. We build the same timm pipeline and keep its flip and
    RandAugment ops (the resize is already done in the cache; ToTensor/Normalize happen per batch).
    """
    from timm.data import create_transform
    from torchvision import transforms as T

    full = create_transform(size, is_training=True, color_jitter=0.4, auto_augment=config, re_prob=0.0,
                            interpolation=interpolation, mean=tuple(mean))
    keep = [t for t in full.transforms if type(t).__name__ in ("RandomHorizontalFlip", "RandAugment")]
    if len(keep) != 2:
        raise DataError(f"timm create_transform gave {full}; expected a flip and a RandAugment op "
                        f"(dataset.randaugment={config!r})")
    for op in getattr(keep[1], "ops", []):
        if "Posterize" in getattr(op, "name", ""):
            op.aug_fn = _posterize_zero_bits(op.aug_fn)
    return T.Compose(keep)


def _posterize_zero_bits(fn: Callable) -> Callable:
    """timm's PosterizeIncreasing can ask for 0 bits at high sampled magnitudes (m=9 + noise). Pillow < 10
    returned an all-black image for that; newer Pillow raises ``ValueError``. Return black as the old
    Pillow did, so the augmentation matches what the official code got under its pinned versions."""
    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return fn(img, bits_to_keep, **kwargs)
    return posterize


class RaggedResizeDataset(RaggedCropDataset):
    """Images cached at their own resolution, resized to ``size``² per batch (PIL, same filter as the fixed cache).

    Used for large VTAB test sets whose decoded originals are much smaller than their 224² copies (e.g.
    dSprites 64², 73,728 images: 0.9 GB instead of 11 GB). Gives exactly the pixels of the fixed cache.
    """

    def __init__(self, data, index, labels, size: int, resample, mean, std):
        super().__init__(data, index, labels, size, mean, std, flip=False)
        self.resample = resample

    def batch(self, idx):
        idx = torch.as_tensor(idx).view(-1)
        s = self.crop
        out = np.empty((len(idx), s, s, 3), dtype=np.uint8)
        for j, i in enumerate(idx.tolist()):
            im = Image.fromarray(np.ascontiguousarray(self.image(i).permute(1, 2, 0).numpy()))
            out[j] = np.asarray(im.resize((s, s), self.resample) if im.size != (s, s) else im, dtype=np.uint8)
        x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
        return _normalise(x, self.mean, self.std), self.labels[idx]
