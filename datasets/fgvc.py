"""FGVC: CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars with VPT's json splits.

Layout (VPT, KMnP/vpt ``src/data/datasets/json_dataset.py``; V-PETL's FGVC loader is the same)::

    <root>/<dataset folder>/train.json  val.json  test.json  <image dir>/...

Each json is an object ``{"<image path relative to the image dir>": <class id>, ...}``. Image dir:
CUB ``images``, NABirds ``images``, Stanford Dogs ``Images``, Stanford Cars and Oxford Flowers the dataset
folder itself. Folder spellings accepted (``folders`` in the yaml): VPT's catalogue names and V-PETL's
(``CUB_200_2011``, ``nabirds``, ``OxfordFlower``, ``StanfordDogs``, ``StanfordCars``) and a few common
variants; ``root`` may also point straight at the dataset folder.

Labels. Official: class ids are sorted and made contiguous *per split file* (VPT and V-PETL), so a split
that lacks a class would shift every later label. Deviation (fix): we map over the sorted **union** of
the ids in train/val/test.json, so a class id means the same class in every split.

Splits and roles. Official: VPT trains on ``train.json``, picks the epoch on ``val.json`` and reports
``test.json`` (its ``trainval`` loader is dead code: the dataset class rejects that split name);
V-PETL trains on ``train.json`` and evaluates ``test.json`` only. So the default roles are
train=train, val=val, trainval=train, test=test: the final (``eval.select=last``) run trains on
train.json like both anchors. ``dataset.roles.trainval=train+val`` trains the final run on train+val
instead (``train+val`` is built on demand).

Transforms (VPT ``transforms.py``, V-PETL): train ``Resize(256)`` (shorter side, bilinear) ->
``RandomCrop(224)`` -> ``RandomHorizontalFlip`` -> Normalize; eval ``Resize(256)`` -> ``CenterCrop(224)``.
Sizes follow the backbone: crop = ``image_size``, resize = round(image_size·256/224). Decoding happens
once: eval images are cached centre-cropped; training images are cached at "shorter side = resize"
(variable size, ``RaggedCropDataset``) and cropped/flipped per batch, so the random crop covers the
whole resized image exactly as the official pipeline does.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from bench.registry import DATASETS
from datasets.base import DataError, Task
from datasets.images import (Item, PILAugmentDataset, RaggedCropDataset, cached_fixed, cached_ragged,
                             decode_center_crop, decode_shorter, default_cache_dir, filter_of, sha256_file)
from datasets.vtab import LazySplits

log = logging.getLogger(__name__)

# key -> (classes, canonical folder, accepted folder spellings, image sub-folder, (train, val, test) sizes)
FGVC_DATASETS: dict[str, tuple[int, str, tuple[str, ...], str, tuple[int, int, int]]] = {
    "cub": (200, "CUB_200_2011", ("CUB_200_2011", "CUB", "cub", "CUB-200-2011", "cub200"), "images",
            (5394, 600, 5794)),
    "nabirds": (555, "nabirds", ("nabirds", "NABirds", "NAbirds"), "images", (21536, 2393, 24633)),
    "flowers": (102, "OxfordFlower", ("OxfordFlower", "OxfordFlowers", "oxford_flowers", "flowers", "Flowers102"), "",
                (1020, 1020, 6149)),
    "dogs": (120, "StanfordDogs", ("StanfordDogs", "Stanford_Dogs", "stanford_dogs", "dogs"), "Images",
             (10800, 1200, 8580)),
    "cars": (196, "StanfordCars", ("StanfordCars", "Stanford_Cars", "stanford_cars", "cars"), "", (7329, 815, 8041)),
}
SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}
TRAIN_SPLITS = ("train", "train+val")
GETTING_DATA = "see README 'Getting the data'"


def find_dataset_dir(root, key: str, names=None) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"dataset.root is not set for fgvc/{key}: set dataset.root=/path/to/fgvc (the folder holding "
                        f"{FGVC_DATASETS[key][1]}/) or PETL_BENCH_FGVC; {GETTING_DATA}")
    root = Path(str(root)).expanduser()
    names = tuple(names or FGVC_DATASETS[key][2])
    for n in names:
        if (root / n).is_dir():
            return root / n
    if (root / "train.json").is_file() and (root / "test.json").is_file():
        return root
    where = "does not exist" if not root.exists() else f"has no folder {' or '.join(names)}"
    raise DataError(f"FGVC dataset '{key}' not found: {root} {where}; expected {root}/{names[0]}/train.json etc. "
                    f"Set dataset.root=/path/to/fgvc (or PETL_BENCH_FGVC); {GETTING_DATA}")


def read_split(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"split file missing: {path}; the VPT json splits (train.json, val.json, test.json) go in the "
                        f"dataset folder ({GETTING_DATA})")
    try:
        with open(path, encoding="utf-8") as f:
            anno = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-download the VPT split files") from None
    if not isinstance(anno, dict) or not anno:
        raise DataError(f"{path} must be a non-empty JSON object {{image path: class id}}")
    return anno


def class_mapping(annos: dict[str, dict]) -> dict:
    """Sorted union of the class ids of every split -> 0..K-1."""
    ids = set()
    for split, anno in annos.items():
        for k, v in anno.items():
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise DataError(f"{split}.json key {k!r}: class id {v!r} must be an integer (or a string)")
            ids.add(v)
    if len({type(v) for v in ids}) > 1:
        raise DataError(f"class ids mix integers and strings across {', '.join(s + '.json' for s in annos)}")
    return {v: i for i, v in enumerate(sorted(ids))}


def build_fgvc(cfg, image_size: int, mean, std) -> Task:
    name = str(cfg["name"])
    key = name.split("/", 1)[-1]
    if key not in FGVC_DATASETS:
        raise DataError(f"unknown FGVC dataset '{key}' (dataset.name={name}); choose one of {', '.join(FGVC_DATASETS)}")
    folder = find_dataset_dir(cfg.get("root"), key, cfg.get("folders"))
    image_dir = folder / str(cfg.get("image_dir", FGVC_DATASETS[key][3]) or "")
    if not image_dir.is_dir():
        raise DataError(f"image folder missing: {image_dir} (dataset.image_dir); extract the {key} images there "
                        f"({GETTING_DATA})")
    annos = {s: read_split(folder / f) for s, f in SPLIT_FILES.items()}
    mapping = class_mapping(annos)
    classes = int(cfg.get("num_classes") or FGVC_DATASETS[key][0])
    if len(mapping) != classes:
        raise DataError(f"{folder}: {len(mapping)} distinct class ids in train/val/test.json but "
                        f"dataset.num_classes={classes}; wrong folder or split files?")
    size = int(image_size)
    resize = int(cfg.get("resize") or round(size * 256 / 224))
    interp = str(cfg.get("interpolation", "bilinear"))
    resample = filter_of(interp)
    cache_dir = Path(cfg.get("cache_dir") or default_cache_dir()).expanduser()
    workers = int(cfg.get("decode_workers") or 4)
    mem_mb = float(cfg.get("in_memory_max_mb", 2048))

    def items_of(split: str) -> list[Item]:
        parts = split.split("+")
        out = []
        for p in parts:
            src = folder / SPLIT_FILES[p]
            out += [Item(image_dir / k, mapping[v], f"{src} key {k!r}") for k, v in annos[p].items()]
        return out

    info: dict = {
        "source": "VPT json splits", "folder": str(folder), "image_dir": str(image_dir),
        "label_mapping": "sorted union of train/val/test class ids",
        "transform": {"train": f"Resize({resize}, {interp}) -> RandomCrop({size}) -> HFlip(0.5) -> Normalize",
                      "eval": f"Resize({resize}, {interp}) -> CenterCrop({size}) -> Normalize"},
        "split_sha256": {s: sha256_file(folder / f) for s, f in SPLIT_FILES.items()},
        "sizes": {s: len(a) for s, a in annos.items()}, "cache": {},
    }

    def builder(split: str):
        def build():
            items = items_of(split)
            labels = torch.tensor([it.label for it in items], dtype=torch.long)
            spec = {"kind": "fgvc", "resize": resize, "interp": interp}
            if split in TRAIN_SPLITS:
                data, index, meta = cached_ragged(items, spec, lambda it: decode_shorter(it, resize, resample),
                                                  cache_dir, workers, mem_mb)
                info["cache"][split] = meta
                return RaggedCropDataset(data, index, labels, size, mean, std)
            images, meta = cached_fixed(items, {**spec, "crop": size},
                                        lambda it: decode_center_crop(it, resize, size, resample),
                                        (3, size, size), cache_dir, workers, mem_mb)
            info["cache"][split] = meta
            return PILAugmentDataset(images, labels, mean, std, None)
        return build

    roles = dict(cfg.get("roles") or {"train": "train", "val": "val", "trainval": "train", "test": "test"})
    names = ["train", "val", "test", "train+val"]
    for role, split in roles.items():
        if split not in names:
            raise DataError(f"dataset.roles.{role}={split}: choose one of {', '.join(names)}")
    splits = LazySplits({s: builder(s) for s in names})
    return Task(name=name, benchmark=str(cfg.get("benchmark", "fgvc")), num_classes=classes, splits=splits,
                roles=roles, image_size=size, mean=list(mean), std=list(std), info=info)


for _key in FGVC_DATASETS:
    DATASETS.add(f"fgvc/{_key}", build_fgvc)
