"""VTAB-1k (Zhai et al., 2019), the 19 tasks in the de-facto "processed JPEG + list files" layout.

Layout (NOAH ``data/vtab-source/get_vtab1k.py`` release, also used by FacT, SPT, SNELL, V-PETL)::

    <root>/<task>/train800.txt  val200.txt  train800val200.txt  test.txt  images/...

Each list line is ``<relative image path> <int label>``, the path relative to ``<root>/<task>``.
Folder spellings that circulate (first one found wins, ``folders`` in the yaml):
* ``cifar`` (NOAH's release script and FacT) vs ``cifar100`` (V-PETL, NOAH's own training scripts);
* ``oxford_iiit_pet`` (NOAH release, FacT, V-PETL) vs ``oxford_pet`` (NOAH's training scripts);
* ``diabetic_retinopathy`` (everyone) vs ``diabetic_retinopathy_detection`` (the TFDS builder name);
* all other 16 names are the same everywhere. ``root`` may also point straight at one task folder.

Splits and roles: ``train800``/``val200`` for tuning (``eval.select=best_val``), ``train800val200`` ->
``test`` for the final number (``eval.select=last``), as in VTAB, NOAH, FacT, SPT.

Transforms (official NOAH/FacT/SPT/SNELL): ``Resize((224, 224), bicubic)`` (aspect ratio not kept, no
crop) -> ToTensor -> Normalize. V-PETL uses bilinear: ``dataset.interpolation=bilinear``. The size is the
backbone's ``img_size`` (224 for ViT-B). ``train_aug: true`` adds V-PETL's training augmentation: flip +
timm RandAugment ``rand-m9-mstd0.5-inc1`` after the resize, per sample, training split only (values
per task from V-PETL's configs). Normalisation constants come from the backbone config, not from
here. Deviation: the official loaders decode every JPEG every epoch; we decode once into a cache
(``datasets/images.py``), which changes nothing numerically (PIL resize output is uint8 either way).
Large evaluation splits (over ``in_memory_max_mb`` at S×S) are memory-mapped, and with
``large_split_storage: auto`` cached at native resolution when that is smaller (resized per batch).

Data source: this reads the JPEG export of VTAB-1k (NOAH's script re-encodes TFDS images as JPEG).
VPT reads TFDS tensors directly; users report CIFAR-100 differences of ~10 points between the two
(visinf/adapter_plus#3), so records store the list-file hashes (``task_info.list_sha256``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from bench.registry import DATASETS
from datasets.base import DataError, Task
from datasets.images import (Item, PILAugmentDataset, RaggedResizeDataset, cache_exists, cached_fixed, cached_ragged,
                             decode_native, decode_resized, default_cache_dir, filter_of, native_bytes,
                             randaugment_transform, sha256_file)

log = logging.getLogger(__name__)

NATURAL, SPECIALIZED, STRUCTURED = "natural", "specialized", "structured"
# task -> (classes, group, test size). Test sizes: the standard VTAB test splits (TFDS).
VTAB_TASKS: dict[str, tuple[int, str, int]] = {
    "cifar100": (100, NATURAL, 10000),
    "caltech101": (102, NATURAL, 6084),
    "dtd": (47, NATURAL, 1880),
    "oxford_flowers102": (102, NATURAL, 6149),
    "oxford_iiit_pet": (37, NATURAL, 3669),
    "svhn": (10, NATURAL, 26032),
    "sun397": (397, NATURAL, 21750),
    "patch_camelyon": (2, SPECIALIZED, 32768),
    "eurosat": (10, SPECIALIZED, 5400),
    "resisc45": (45, SPECIALIZED, 6300),
    "diabetic_retinopathy": (5, SPECIALIZED, 42670),
    "clevr_count": (8, STRUCTURED, 15000),
    "clevr_dist": (6, STRUCTURED, 15000),
    "dmlab": (6, STRUCTURED, 22735),
    "kitti": (4, STRUCTURED, 711),
    "dsprites_loc": (16, STRUCTURED, 73728),
    "dsprites_ori": (16, STRUCTURED, 73728),
    "smallnorb_azi": (18, STRUCTURED, 12150),
    "smallnorb_ele": (9, STRUCTURED, 12150),
}
GROUPS = (NATURAL, SPECIALIZED, STRUCTURED)
# other folder spellings in circulation (see module docstring); the canonical name is always tried first
FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "cifar100": ("cifar",),
    "oxford_iiit_pet": ("oxford_pet",),
    "diabetic_retinopathy": ("diabetic_retinopathy_detection",),
}
LIST_FILES = {"train800": "train800.txt", "val200": "val200.txt", "train800val200": "train800val200.txt",
              "test": "test.txt"}
SPLIT_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000}
TRAIN_SPLITS = ("train800", "train800val200")
GETTING_DATA = "see README 'Getting the data'"


def folder_names(task: str) -> tuple[str, ...]:
    return (task,) + FOLDER_ALIASES.get(task, ())


def group_of(task: str) -> str:
    return VTAB_TASKS[task][1]


def find_task_dir(root, task: str, names=None) -> Path:
    """The folder of ``task`` under ``root`` (any accepted spelling), or ``root`` itself if it holds the lists."""
    if root is None or str(root) == "":
        raise DataError(f"dataset.root is not set for vtab/{task}: set dataset.root=/path/to/vtab-1k "
                        f"(the folder holding the 19 task folders) or PETL_BENCH_VTAB; {GETTING_DATA}")
    root = Path(str(root)).expanduser()
    names = tuple(names or folder_names(task))
    for n in names:
        if (root / n).is_dir():
            return root / n
    if (root / "train800.txt").is_file() and root.name in names:
        return root
    where = "does not exist" if not root.exists() else f"has no folder {' or '.join(names)}"
    raise DataError(f"VTAB-1k task '{task}' not found: {root} {where}; expected {root}/{names[0]}/train800.txt etc. "
                    f"Set dataset.root=/path/to/vtab-1k (or PETL_BENCH_VTAB); {GETTING_DATA}")


def read_list(path: Path, base: Path, num_classes: int | None = None) -> list[Item]:
    """Parse a VTAB list file: ``<relative image path> <int label>`` per line (blank lines skipped)."""
    if not path.is_file():
        raise DataError(f"list file missing: {path}; the task folder must hold {', '.join(LIST_FILES.values())} "
                        f"({GETTING_DATA})")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"{path} line {n}: expected '<image path> <label>', got {line.strip()!r} "
                                "(paths must not contain spaces)")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{path} line {n}: label {parts[1]!r} is not an integer") from None
            if num_classes is not None and not 0 <= label < num_classes:
                raise DataError(f"{path} line {n}: label {label} outside [0, {num_classes}); "
                                "wrong task folder or dataset.num_classes?")
            items.append(Item(base / parts[0], label, f"{path} line {n}"))
    return items


class LazySplits(Mapping):
    """Split name -> dataset, built (decoded or loaded from the cache) on first access.

    The engine only touches the splits its protocol uses (``best_val``: train800, val200, test;
    ``last``: train800val200, test), so the others are never decoded.
    """

    def __init__(self, builders: dict[str, Callable[[], object]]):
        self._builders, self._built = dict(builders), {}

    def __getitem__(self, name):
        if name not in self._built:
            if name not in self._builders:
                raise KeyError(name)
            self._built[name] = self._builders[name]()
        return self._built[name]

    def __iter__(self):
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


def build_vtab(cfg, image_size: int, mean, std) -> Task:
    name = str(cfg["name"])
    task = name.split("/", 1)[-1]
    if task not in VTAB_TASKS:
        raise DataError(f"unknown VTAB task '{task}' (dataset.name={name}); choose one of {', '.join(VTAB_TASKS)}")
    classes = int(cfg.get("num_classes") or VTAB_TASKS[task][0])
    folder = find_task_dir(cfg.get("root"), task, cfg.get("folders"))
    interp = str(cfg.get("interpolation", "bicubic"))
    resample = filter_of(interp)
    cache_dir = Path(cfg.get("cache_dir") or default_cache_dir()).expanduser()
    workers = int(cfg.get("decode_workers") or 4)
    mem_mb = float(cfg.get("in_memory_max_mb", 2048))
    aug = bool(cfg.get("train_aug", False))
    ra_cfg = str(cfg.get("randaugment") or "rand-m9-mstd0.5-inc1")
    size = int(image_size)
    info: dict = {
        "source": "vtab-1k list files", "folder": str(folder), "group": VTAB_TASKS[task][1],
        "transform": {"eval": f"Resize(({size}, {size}), {interp}) -> Normalize",
                      "train": (f"Resize(({size}, {size}), {interp}) -> HFlip(0.5) -> RandAugment({ra_cfg})"
                                if aug else f"Resize(({size}, {size}), {interp}) -> Normalize")},
        "list_sha256": {}, "cache": {}, "sizes": {},
    }

    storage = str(cfg.get("large_split_storage") or "auto")
    if storage not in ("auto", "resized", "native"):
        raise DataError(f"dataset.large_split_storage={storage}: choose auto, resized or native")

    def store_native(items, spec) -> bool:
        """Cache a large evaluation split at its own resolution (resized per batch) instead of at size²?"""
        resized = len(items) * 3 * size * size
        if storage == "resized" or resized <= mem_mb * 2**20:
            return False
        if storage == "native":
            return True
        if cache_exists(items, spec, "fixed", cache_dir, (3, size, size)):
            return False
        if cache_exists(items, {"kind": "vtab-native"}, "ragged", cache_dir):
            return True
        return native_bytes(items, workers) < resized  # keep whichever is smaller on disk

    def builder(split: str):
        def build():
            lst = folder / LIST_FILES[split]
            items = read_list(lst, folder, classes)
            info["list_sha256"][split] = sha256_file(lst)
            info["sizes"][split] = len(items)
            labels = torch.tensor([it.label for it in items], dtype=torch.long)
            spec = {"kind": "vtab-resize", "size": size, "interp": interp}
            if split not in TRAIN_SPLITS and store_native(items, spec):
                data, index, meta = cached_ragged(items, {"kind": "vtab-native"}, decode_native, cache_dir, workers,
                                                  mem_mb)
                info["cache"][split] = {**meta, "resolution": "native, resized per batch"}
                return RaggedResizeDataset(data, index, labels, size, resample, mean, std)
            images, meta = cached_fixed(items, spec, lambda it: decode_resized(it, (size, size), resample),
                                        (3, size, size), cache_dir, workers, mem_mb)
            info["cache"][split] = {**meta, "resolution": f"{size}x{size}"}
            tf = randaugment_transform(size, mean, ra_cfg) if aug and split in TRAIN_SPLITS else None
            return PILAugmentDataset(images, labels, mean, std, tf)
        return build

    for split in LIST_FILES:  # fail early, before training, on a missing list file
        if not (folder / LIST_FILES[split]).is_file():
            raise DataError(f"list file missing: {folder / LIST_FILES[split]}; the task folder must hold "
                            f"{', '.join(LIST_FILES.values())} ({GETTING_DATA})")
    splits = LazySplits({s: builder(s) for s in LIST_FILES})
    roles = dict(cfg.get("roles") or {"train": "train800", "val": "val200", "trainval": "train800val200", "test": "test"})
    return Task(name=name, benchmark=str(cfg.get("benchmark", "vtab")), num_classes=classes, splits=splits,
                roles=roles, image_size=size, mean=list(mean), std=list(std), info=info)


for _task in VTAB_TASKS:
    DATASETS.add(f"vtab/{_task}", build_vtab)
