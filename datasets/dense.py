"""Dense prediction data: COCO 2017 (instance segmentation), Pascal VOC 07+12 (detection), ADE20K (semantic
segmentation), read in their official layouts (spec ``video_dense.md`` §B1, §C2), and the item formats and
transforms the dense task kinds consume (also used by the procedural ``synthetic/shapes_det|seg``).

Layouts::

    dense/coco    <root>/annotations/instances_{train,val}2017.json + <root>/{train2017,val2017}/*.jpg
    dense/voc     <root>/VOCdevkit/VOC2007/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/{trainval,test}.txt}
                  and VOC2012 (trainval); <root> may be the VOCdevkit folder itself
    dense/ade20k  <root>/ADEChallengeData2016/{images,annotations}/{training,validation}/ (*.jpg, *.png);
                  <root> may be ADEChallengeData2016 itself

Annotations are parsed at build time (a missing folder, list, json or xml stops with one line naming the path
and the fix); images are decoded per fetch with PIL (nothing cached: COCO is 18 GB), a corrupt or missing image
stops with one line naming the file.

Detection items (``DetectionSet``) are ``(image, target)``: image float32 [3, H, W] in [0, 1], not normalised
(the torchvision detector normalises and resizes itself); target ``boxes`` float32 [N, 4] xyxy in the image's
pixels, ``labels`` int64 [N] (0-based), ``ignore`` bool [N] (COCO iscrowd, VOC difficult: not trained on, not
counted in evaluation), ``area`` float32 [N] (COCO's annotation area, the evaluation's size ranges),
``image_id`` int, and ``masks`` uint8 [N, H, W] when ``task.info['masks']``. Training: horizontal flip p = 0.5
(``train_flip``). ``collate`` -> (list of images, list of targets).

Segmentation items (``SegmentationSet``): image float32 [3, h, w] normalised with the backbone's mean/std;
target ``mask`` int64 [h, w] (255 = ignore), ``size`` (h, w) before any padding, ``ori_size`` (the file's
(H, W)) and ``image_id``. Training = mmseg's ADE20K pipeline: keep-ratio rescale to ``img_scale`` × U(ratio_range)
→ random ``crop_size`` crop (``cat_max_ratio``: up to 10 re-draws while one class covers ≥ that share of the
crop) → flip 0.5 → PhotoMetricDistortion → normalise → pad to crop_size (image 0, mask 255). Evaluation:
keep-ratio rescale to ``test_scale``, the mask at the ORIGINAL size (logits are resized back, as mmseg).
``collate`` pads the images (0) to the batch's largest → [B, 3, Hm, Wm] and returns the targets as a list;
training masks are padded (255) to [Hm, Wm] as well.

Every random draw uses torch's global RNG, so a seeded run is reproducible.
"""
from __future__ import annotations

import json
import logging
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from bench.registry import DATASETS
from datasets.base import DataError, Task

log = logging.getLogger(__name__)

GETTING_DATA = "see README 'Dense data'"
IGNORE_INDEX = 255

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

# mmseg ADE20KDataset.CLASSES (objectInfo150 order; label k+1 in the png = class k after reduce_zero_label)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------
def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}"


def mask_api():
    """``pycocotools.mask``, imported on first use; a one-line DataError with the install command when missing."""
    try:
        from pycocotools import mask
    except ImportError:
        raise DataError('COCO masks and metrics need pycocotools, which is not installed: pip install -e ".[dense]" '
                        "(or pip install pycocotools)") from None
    return mask


def read_rgb(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file (PIL); a one-line DataError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image not found: {path}; check dataset.root or re-download the images ({GETTING_DATA})") \
            from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {_one_line(e)}; re-download it ({GETTING_DATA})") from None


def read_label_png(path: Path) -> np.ndarray:
    """The raw label indices of a segmentation png (mode L or P: the stored values, no palette conversion)."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im)
    except FileNotFoundError:
        raise DataError(f"label map not found: {path}; check dataset.root ({GETTING_DATA})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read label map {path}: {_one_line(e)}; re-download it ({GETTING_DATA})") from None
    if arr.ndim != 2:
        raise DataError(f"label map {path} has shape {arr.shape}: expected a single-channel png of class indices")
    return arr


def _root(root, key: str, env: str) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"dataset.root is not set for dense/{key}: set dataset.root=/path/to/it or {env} "
                        f"({GETTING_DATA})")
    return Path(str(root)).expanduser()


def _missing(path: Path, what: str, env: str, root: Path) -> DataError:
    return DataError(f"{what} not found: {path} (dataset.root={root}); set dataset.root=/path/to/it or {env} "
                     f"({GETTING_DATA})")


# ----------------------------------------------------------------------------------------------------------
# detection items
# ----------------------------------------------------------------------------------------------------------
class DetRecord:
    """One image's annotations (numpy), the image decoded on demand."""

    __slots__ = ("path", "image_id", "width", "height", "boxes", "labels", "ignore", "area", "segms")

    def __init__(self, path, image_id, width, height, boxes, labels, ignore, area, segms=None):
        self.path, self.image_id, self.width, self.height = path, int(image_id), width, height
        self.boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.ignore = np.asarray(ignore, dtype=bool).reshape(-1)
        self.area = np.asarray(area, dtype=np.float32).reshape(-1)
        self.segms = segms


def segm_to_mask(segm, h: int, w: int) -> np.ndarray:
    """uint8 [h, w] of a COCO segmentation: polygons (list), uncompressed RLE (counts list) or compressed RLE."""
    mask = mask_api()
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]  # degenerate polygons (mmdet drops them too)
        if not polys:
            return np.zeros((h, w), dtype=np.uint8)
        rle = mask.merge(mask.frPyObjects(polys, h, w))
    elif isinstance(segm.get("counts"), list):
        rle = mask.frPyObjects(segm, h, w)
    else:
        rle = segm
    with warnings.catch_warnings():  # pycocotools 2.0.x on numpy 2: "__array__ ... copy keyword" DeprecationWarning
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.ascontiguousarray(mask.decode(rle), dtype=np.uint8)


def to_image_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, H, W] (contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


class DetectionSet(Dataset):
    """Detection items over ``records`` (``DetRecord``) or any source with ``__len__``, ``image(i)`` (uint8
    [H, W, 3]) and ``target(i, h, w)`` (numpy dict: boxes, labels, ignore, area, masks opt.)."""

    def __init__(self, source, masks: bool, flip: bool = False, repeat: int = 1, crop: Optional["CropPolicy"] = None):
        self.source, self.masks, self.flip = source, bool(masks), bool(flip)
        self.repeat, self.crop = max(1, int(repeat)), crop  # mmdet RepeatDataset; COCO's second training policy

    def __len__(self) -> int:
        return len(self.source) * self.repeat

    def __getitem__(self, i: int):
        i = i % len(self.source)
        img = self.source.image(i)
        h, w = img.shape[:2]
        t = self.source.target(i, h, w, self.masks)
        image = to_image_tensor(img).float().div_(255.0)
        target = {"boxes": torch.from_numpy(t["boxes"]).float().reshape(-1, 4),
                  "labels": torch.from_numpy(t["labels"]).long(),
                  "ignore": torch.from_numpy(t["ignore"]).bool(),
                  "area": torch.from_numpy(t["area"]).float(),
                  "image_id": int(t["image_id"])}
        if self.masks:
            target["masks"] = torch.from_numpy(t["masks"]).to(torch.uint8).reshape(-1, h, w)
        if self.flip and bool(torch.rand(()) < 0.5):
            image, target = hflip_detection(image, target)
        if self.crop is not None:
            image, target = self.crop(image, target)
        return image, target

    @staticmethod
    def collate(samples):
        return [s[0] for s in samples], [s[1] for s in samples]


def hflip_detection(image: torch.Tensor, target: dict):
    w = image.shape[-1]
    out = dict(target)
    b = target["boxes"]
    out["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1) if len(b) else b.clone()
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


class CropPolicy:
    """mmdet's COCO AutoAugment pair, second policy: with probability ``p`` resize keep-ratio to a short side drawn
    from ``short`` (long side <= ``max_long``), then crop an absolute-range ``crop`` = [lo, hi] box (height and width
    each drawn in [lo, min(side, hi)], mmdet RandomCrop ``absolute_range``, negative crops allowed); boxes are
    shifted and clipped and those left without area dropped, masks cropped. The final multi-scale resize of both
    policies is the detector's own (``decoder.min_size``), so the first policy is the identity here."""

    def __init__(self, p: float = 0.5, short: Sequence[int] = (400, 500, 600), max_long: int = 1333,
                 crop: Sequence[int] = (384, 600)):
        self.p, self.short, self.max_long = float(p), [int(v) for v in short], int(max_long)
        self.lo, self.hi = int(crop[0]), int(crop[1])

    def __call__(self, image: torch.Tensor, target: dict):
        if not bool(torch.rand(()) < self.p):
            return image, target
        h, w = image.shape[-2:]
        s = self.short[int(torch.randint(len(self.short), ()))]
        nh, nw = rescale_size(h, w, (self.max_long, s))
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
        t = dict(target)
        t["boxes"] = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        if "masks" in target:
            m = target["masks"]
            t["masks"] = F.interpolate(m[None].float(), size=(nh, nw), mode="nearest")[0].to(m.dtype) if len(m) \
                else m.new_zeros((0, nh, nw))
        ch = int(torch.randint(min(nh, self.lo), min(nh, self.hi) + 1, ()))
        cw = int(torch.randint(min(nw, self.lo), min(nw, self.hi) + 1, ()))
        oy, _, ox, _ = crop_box(nh, nw, (ch, cw))
        image = image[..., oy:oy + ch, ox:ox + cw]
        b = t["boxes"] - torch.tensor([ox, oy, ox, oy], dtype=t["boxes"].dtype)
        b[:, 0::2] = b[:, 0::2].clamp(0, cw)
        b[:, 1::2] = b[:, 1::2].clamp(0, ch)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        t["boxes"] = b[keep]
        for k in ("labels", "ignore"):
            t[k] = t[k][keep]
        t["area"] = ((t["boxes"][:, 2] - t["boxes"][:, 0]) * (t["boxes"][:, 3] - t["boxes"][:, 1])).float()
        if "masks" in t:
            t["masks"] = t["masks"][keep][:, oy:oy + ch, ox:ox + cw].contiguous()
        return image, t


def crop_policy(cfg) -> Optional[CropPolicy]:
    """``dataset.train_crop`` ({p, short, max_long, crop}) or None."""
    c = cfg.get("train_crop")
    if not c:
        return None
    return CropPolicy(float(c.get("p", 0.5)), list(c.get("short", (400, 500, 600))), int(c.get("max_long", 1333)),
                      list(c.get("crop", (384, 600))))


class RecordSource:
    """``DetectionSet`` source over parsed ``DetRecord`` s (COCO, VOC)."""

    def __init__(self, records: list[DetRecord]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> np.ndarray:
        r = self.records[i]
        img = read_rgb(r.path)
        if r.height is not None and img.shape[:2] != (r.height, r.width):
            raise DataError(f"image {r.path} is {img.shape[1]}x{img.shape[0]} but its annotation says "
                            f"{r.width}x{r.height}; re-download the image or the annotations")
        return img

    def target(self, i: int, h: int, w: int, masks: bool) -> dict:
        r = self.records[i]
        t = {"boxes": r.boxes, "labels": r.labels, "ignore": r.ignore, "area": r.area, "image_id": r.image_id}
        if masks:
            t["masks"] = (np.stack([segm_to_mask(s, h, w) for s in r.segms]) if r.segms
                          else np.zeros((0, h, w), dtype=np.uint8))
        return t


# ----------------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------------
def parse_coco(ann_file: Path, image_dir: Path, training: bool, filter_empty: bool = True,
               min_box_size: float = 1.0) -> tuple[list[DetRecord], list[int], list[str]]:
    """(records, sorted category ids, class names) of an ``instances_*.json``, mmdet CocoDataset's rules:
    a box [x, y, w, h] -> [x, y, x + w, y + h]; dropped when w or h < ``min_box_size``, area <= 0, or it does not
    overlap the image; ``iscrowd`` -> ignore; category ids -> 0..K-1 in sorted id order. Training splits drop
    images with no non-crowd box left (``filter_empty``)."""
    if not ann_file.is_file():
        raise DataError(f"COCO annotation file not found: {ann_file}; download annotations_trainval2017.zip and "
                        f"unpack it into dataset.root (or set PETL_BENCH_COCO) ({GETTING_DATA})")
    if not image_dir.is_dir():
        raise DataError(f"COCO image folder not found: {image_dir}; unpack {image_dir.name}.zip into dataset.root "
                        f"(or set PETL_BENCH_COCO) ({GETTING_DATA})")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        images = data["images"]
        anns = data.get("annotations", [])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot parse COCO annotation file {ann_file}: {_one_line(e)}; re-download it") from None
    cat_ids = [int(c["id"]) for c in cats]
    label_of = {c: k for k, c in enumerate(cat_ids)}
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(int(a["image_id"]), []).append(a)
    records = []
    for im in images:
        iid, w_img, h_img = int(im["id"]), int(im["width"]), int(im["height"])
        boxes, labels, ignore, area, segms = [], [], [], [], []
        for a in by_image.get(iid, ()):
            x, y, w, h = (float(v) for v in a["bbox"])
            inter_w = max(0.0, min(x + w, w_img) - max(x, 0.0))
            inter_h = max(0.0, min(y + h, h_img) - max(y, 0.0))
            if inter_w * inter_h == 0 or float(a.get("area", w * h)) <= 0 or w < min_box_size or h < min_box_size:
                continue
            if int(a["category_id"]) not in label_of:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[int(a["category_id"])])
            ignore.append(bool(a.get("iscrowd", 0)))
            area.append(float(a.get("area", w * h)))
            segms.append(a.get("segmentation") or [[x, y, x + w, y, x + w, y + h, x, y + h]])
        if training and filter_empty and not any(not g for g in ignore):
            continue
        records.append(DetRecord(image_dir / im["file_name"], iid, w_img, h_img, boxes, labels, ignore, area, segms))
    return records, cat_ids, [str(c.get("name", c["id"])) for c in cats]


def _det_info(evaluator: str, masks: bool, names, num_images: dict, flip: bool, **extra) -> dict:
    return {"evaluator": evaluator, "masks": masks, "class_names": list(names), "num_images": num_images,
            "item": "image float32 [3,H,W] in [0,1] (not normalised); target boxes xyxy, labels, ignore, area, "
                    "image_id" + (", masks uint8 [N,H,W]" if masks else ""),
            "transform": {"train": "HFlip(0.5)" if flip else "none", "eval": "none (original image)"}, **extra}


def build_coco(cfg, image_size: int, mean, std) -> Task:
    env = "PETL_BENCH_COCO"
    root = _root(cfg.get("root"), "coco", env)
    if not root.is_dir():
        raise _missing(root, "COCO folder", env, root)
    ann_files = dict(cfg.get("ann_files") or {"train2017": "annotations/instances_train2017.json",
                                              "val2017": "annotations/instances_val2017.json"})
    image_dirs = dict(cfg.get("image_dirs") or {"train2017": "train2017", "val2017": "val2017"})
    roles = dict(cfg.get("roles") or {"train": "train2017", "val": "val2017", "trainval": "train2017",
                                      "test": "val2017"})
    train_splits = {roles[r] for r in ("train", "trainval") if r in roles}
    flip = bool(cfg.get("train_flip", True))
    masks = bool(cfg.get("masks", True))
    for split in ann_files:  # every file checked before anything is parsed
        for p, what in ((root / ann_files[split], "COCO annotation file"),
                        (root / image_dirs[split], "COCO image folder")):
            if not p.exists():
                raise _missing(p, what, env, root)
    splits, names, num = {}, None, {}
    for split in ann_files:
        recs, cat_ids, names_s = parse_coco(root / ann_files[split], root / image_dirs[split], split in train_splits,
                                            bool(cfg.get("filter_empty_gt", True)),
                                            float(cfg.get("min_box_size", 1.0)))
        if names is not None and names_s != names:
            raise DataError(f"{root / ann_files[split]} lists other categories than the other splits' json")
        names, num[split] = names_s, len(recs)
        train = split in train_splits
        splits[split] = DetectionSet(RecordSource(recs), masks, flip=flip and train,
                                     repeat=int(cfg.get("repeat", 1)) if train else 1,
                                     crop=crop_policy(cfg) if train else None)
    classes = int(cfg.get("num_classes") or len(names))
    if classes != len(names):
        raise DataError(f"dataset.num_classes={classes} but {root / next(iter(ann_files.values()))} has "
                        f"{len(names)} categories")
    info = _det_info("coco", masks, names, num, flip, source="COCO 2017 instances json (pycocotools masks)",
                     folder=str(root), category_ids=cat_ids,
                     filters="boxes with w or h < 1, zero area or outside the image dropped; iscrowd -> ignore; "
                             "training images without a non-crowd box dropped")
    return Task(name=str(cfg["name"]), benchmark=str(cfg.get("benchmark", "coco")), num_classes=classes,
                splits=splits, roles=roles, image_size=int(image_size), mean=list(mean), std=list(std), info=info,
                kind="detection")


# ----------------------------------------------------------------------------------------------------------
# Pascal VOC
# ----------------------------------------------------------------------------------------------------------
def find_voc_devkit(root: Path) -> Path:
    for base in (root / "VOCdevkit", root):
        if (base / "VOC2007").is_dir() or (base / "VOC2012").is_dir():
            return base
    where = "does not exist" if not root.exists() else "holds no VOCdevkit/VOC2007 or VOC2012 folder"
    raise DataError(f"Pascal VOC not found: {root} {where}; set dataset.root=/path/to/VOCdevkit (or its parent) or "
                    f"PETL_BENCH_VOC ({GETTING_DATA})")


def _xml_int(node, tag: str, path: Path) -> int:
    el = node.find(tag)
    if el is None or el.text is None:
        raise DataError(f"{path}: <{tag}> missing in an object's <bndbox>; re-download the annotations")
    return int(float(el.text))


def parse_voc_xml(path: Path, class_index: dict[str, int]) -> tuple[list, list, list, Optional[int], Optional[int]]:
    """(boxes, labels, ignore, width, height) of one VOC xml, mmdet 2.11 XMLDataset's rules: integer coordinates
    (int(float(text))) minus 1 on all four; difficult=1 -> ignore; names outside the 20 classes skipped."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DataError(f"VOC annotation not found: {path}; re-download the VOC tar ({GETTING_DATA})") from None
    except (ET.ParseError, OSError) as e:
        raise DataError(f"cannot parse VOC annotation {path}: {_one_line(e)}; re-download it") from None
    root = tree.getroot()
    size = root.find("size")
    w = h = None
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        w, h = int(float(size.find("width").text)), int(float(size.find("height").text))
    boxes, labels, ignore = [], [], []
    for obj in root.findall("object"):
        name_el = obj.find("name")
        name = (name_el.text or "").strip() if name_el is not None else ""
        if name not in class_index:
            continue
        diff = obj.find("difficult")
        difficult = 0 if diff is None or diff.text is None else int(diff.text)
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{path}: an object has no <bndbox>; re-download the annotations")
        boxes.append([_xml_int(bb, t, path) - 1 for t in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(class_index[name])
        ignore.append(bool(difficult))
    return boxes, labels, ignore, w, h


def parse_voc_list(devkit: Path, year: str, list_name: str, class_index: dict[str, int],
                   offset: int = 0) -> list[DetRecord]:
    d = devkit / year
    lst = d / "ImageSets" / "Main" / f"{list_name}.txt"
    ids = [line.strip() for line in lst.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for k, stem in enumerate(ids):
        boxes, labels, ignore, w, h = parse_voc_xml(d / "Annotations" / f"{stem}.xml", class_index)
        area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        records.append(DetRecord(d / "JPEGImages" / f"{stem}.jpg", offset + k, w, h, boxes, labels, ignore, area))
    return records


def build_voc(cfg, image_size: int, mean, std) -> Task:
    env = "PETL_BENCH_VOC"
    root = _root(cfg.get("root"), "voc", env)
    devkit = find_voc_devkit(root)
    names = list(cfg.get("class_names") or VOC_CLASSES)
    class_index = {n: k for k, n in enumerate(names)}
    lists = {"trainval0712": [str(s) for s in (cfg.get("train_lists") or ["VOC2007/trainval", "VOC2012/trainval"])],
             "test07": [str(s) for s in (cfg.get("test_lists") or ["VOC2007/test"])]}
    roles = dict(cfg.get("roles") or {"train": "trainval0712", "val": "test07", "trainval": "trainval0712",
                                      "test": "test07"})
    flip = bool(cfg.get("train_flip", True))
    used: dict[str, list[str]] = {}
    for split, entries in lists.items():
        used[split] = []
        for entry in entries:
            year, _, lname = entry.partition("/")
            lst = devkit / year / "ImageSets" / "Main" / f"{lname}.txt"
            if lst.is_file():
                used[split].append(entry)
            elif split == "test07" or not (devkit / year).is_dir():
                if split == "test07":
                    raise _missing(lst, "VOC list", env, root)
                log.info("VOC: %s not present, training without it", entry)
            else:
                raise _missing(lst, "VOC list", env, root)
        if not used[split]:
            raise DataError(f"no VOC list of {', '.join(entries)} found under {devkit}; set dataset.root=/path/to/"
                            f"VOCdevkit or {env} ({GETTING_DATA})")
    splits, num = {}, {}
    train_splits = {roles[r] for r in ("train", "trainval") if r in roles}
    for split, entries in used.items():
        recs: list[DetRecord] = []
        for entry in entries:
            year, _, lname = entry.partition("/")
            recs += parse_voc_list(devkit, year, lname, class_index, offset=len(recs))
        num[split] = len(recs)
        train = split in train_splits
        splits[split] = DetectionSet(RecordSource(recs), masks=False, flip=flip and train,
                                     repeat=int(cfg.get("repeat", 1)) if train else 1,
                                     crop=crop_policy(cfg) if train else None)
    info = _det_info("voc07", False, names, num, flip, source="Pascal VOC xml (mmdet 2.11 XMLDataset rules)",
                     folder=str(devkit), lists=used, train_sets=" + ".join(used["trainval0712"]),
                     coordinates="integer xml coordinates minus 1 on all four; difficult=1 -> ignore")
    classes = int(cfg.get("num_classes") or len(names))
    return Task(name=str(cfg["name"]), benchmark=str(cfg.get("benchmark", "voc")), num_classes=classes,
                splits=splits, roles=roles, image_size=int(image_size), mean=list(mean), std=list(std), info=info,
                kind="detection")


# ----------------------------------------------------------------------------------------------------------
# segmentation transforms (mmseg's ADE20K pipeline in torch)
# ----------------------------------------------------------------------------------------------------------
def rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv.imrescale's keep-ratio size: the largest size with long side <= max(scale), short <= min(scale)."""
    long_s, short_s = max(scale), min(scale)
    f = min(long_s / max(h, w), short_s / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w], bilinear (cv2 INTER_LINEAR: half-pixel centres, no antialias)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _coin() -> bool:
    return bool(torch.randint(2, ()).item())


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(float(lo), float(hi)))


def crop_box(h: int, w: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    oy = int(torch.randint(max(h - crop[0], 0) + 1, ()))
    ox = int(torch.randint(max(w - crop[1], 0) + 1, ()))
    return oy, oy + crop[0], ox, ox + crop[1]


def random_crop(img: torch.Tensor, mask: torch.Tensor, crop: tuple[int, int], cat_max_ratio: float = 1.0,
                ignore_index: int = IGNORE_INDEX):
    """mmseg RandomCrop: a uniform crop (clipped to the image when smaller); with ``cat_max_ratio`` < 1 up to 10
    re-draws while the crop holds < 2 classes or one class covers >= that share of its non-ignored pixels."""
    h, w = mask.shape
    y1, y2, x1, x2 = crop_box(h, w, crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            _, cnt = torch.unique(mask[y1:y2, x1:x2][mask[y1:y2, x1:x2] != ignore_index], return_counts=True)
            if len(cnt) > 1 and float(cnt.max()) / float(cnt.sum()) < cat_max_ratio:
                break
            y1, y2, x1, x2 = crop_box(h, w, crop)
    return img[:, y1:y2, x1:x2], mask[y1:y2, x1:x2]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """float RGB [3, H, W] in 0..255 -> HSV with OpenCV's 8-bit ranges (H in [0, 180), S and V in 0..255)."""
    r, g, b = x[0], x[1], x[2]
    v, _ = x.max(0)
    mn, _ = x.min(0)
    d = v - mn
    s = torch.where(v > 0, d / v.clamp(min=1e-6) * 255.0, torch.zeros_like(v))
    dd = d.clamp(min=1e-6)
    h = torch.where(v == r, 60.0 * (g - b) / dd, torch.where(v == g, 120.0 + 60.0 * (b - r) / dd,
                                                               240.0 + 60.0 * (r - g) / dd))
    h = torch.where(d > 0, h, torch.zeros_like(h)) % 360.0
    return torch.stack([h / 2.0, s, v])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv[0] * 2.0, hsv[1] / 255.0, hsv[2]
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + h / 60.0) % 6.0
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out)


def photometric_distortion(img: torch.Tensor, brightness_delta: float = 32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta: int = 18) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on uint8 RGB [3, H, W]: brightness ±delta, contrast (before or after the
    colour steps, at random), saturation, hue ±delta (OpenCV's 0..180 hue), each with p 0.5; every step clips to
    0..255 and truncates to integers like mmseg's uint8 round trips."""
    x = img.float()
    if _coin():
        x = (x + _uniform(-brightness_delta, brightness_delta)).clamp_(0, 255).floor_()
    contrast_first = _coin()

    def contrast(x):
        if _coin():
            x = (x * _uniform(*contrast_range)).clamp_(0, 255).floor_()
        return x

    if contrast_first:
        x = contrast(x)
    if _coin():
        hsv = rgb_to_hsv(x)
        hsv[1] = (hsv[1] * _uniform(*saturation_range)).clamp_(0, 255).floor_()
        x = hsv_to_rgb(hsv).round_().clamp_(0, 255)
    if _coin():
        hsv = rgb_to_hsv(x)
        hsv[0] = (hsv[0].round() + int(torch.randint(-int(hue_delta), int(hue_delta), ()))) % 180.0
        x = hsv_to_rgb(hsv).round_().clamp_(0, 255)
    if not contrast_first:
        x = contrast(x)
    return x.to(torch.uint8)


def _pair(v) -> Optional[tuple[int, int]]:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v), int(v)
    a, b = list(v)
    return int(a), int(b)


class SegPipeline:
    """The segmentation transform settings (yaml keys of the same names; ``None`` switches a step off)."""

    def __init__(self, cfg):
        self.img_scale = _pair(cfg.get("img_scale"))
        rr = cfg.get("ratio_range")
        self.ratio_range = None if rr is None else (float(rr[0]), float(rr[1]))
        self.crop_size = _pair(cfg.get("crop_size"))  # (h, w)
        cmr = cfg.get("cat_max_ratio")
        self.cat_max_ratio = 1.0 if cmr is None else float(cmr)  # 1.0 = no re-draws
        self.flip = bool(cfg.get("train_flip", True))
        pmd = cfg.get("photometric")
        self.photometric = dict(pmd) if pmd else None
        self.pad_to_crop = bool(cfg.get("pad_to_crop", True))
        self.test_scale = _pair(cfg.get("test_scale"))
        self.ignore_index = int(cfg.get("ignore_index", IGNORE_INDEX))

    def describe(self) -> dict:
        train = []
        if self.img_scale:
            train.append(f"Resize(img_scale={self.img_scale}, ratio_range={self.ratio_range}, keep_ratio)")
        if self.crop_size:
            train.append(f"RandomCrop({self.crop_size}, cat_max_ratio={self.cat_max_ratio})")
        if self.flip:
            train.append("HFlip(0.5)")
        if self.photometric:
            train.append(f"PhotoMetricDistortion({self.photometric})")
        train.append("Normalize")
        if self.crop_size and self.pad_to_crop:
            train.append(f"Pad({self.crop_size}, image 0, mask {self.ignore_index})")
        ev = (f"Resize({self.test_scale}, keep_ratio) -> " if self.test_scale else "") + "Normalize; mask at the " \
             "original size"
        return {"train": " -> ".join(train), "eval": ev}

    def train(self, img: torch.Tensor, mask: torch.Tensor):
        if self.img_scale:
            scale = self.img_scale
            if self.ratio_range:
                r = float(torch.rand(())) * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
                scale = (int(scale[0] * r), int(scale[1] * r))
            size = rescale_size(img.shape[1], img.shape[2], scale)
            img, mask = resize_image(img, size), resize_mask(mask, size)
        if self.crop_size:
            img, mask = random_crop(img, mask, self.crop_size, self.cat_max_ratio, self.ignore_index)
        if self.flip and bool(torch.rand(()) < 0.5):
            img, mask = img.flip(-1), mask.flip(-1)
        if self.photometric:
            img = photometric_distortion(img, **self.photometric)
        return img.contiguous(), mask.contiguous()

    def eval(self, img: torch.Tensor):
        if self.test_scale:
            img = resize_image(img, rescale_size(img.shape[1], img.shape[2], self.test_scale))
        return img


class SegmentationSet(Dataset):
    """Segmentation items over a source with ``__len__`` and ``sample(i)`` -> (uint8 [H, W, 3], int64 [H, W]
    labels with 255 = ignore, already reduced)."""

    def __init__(self, source, training: bool, pipeline: SegPipeline, mean, std):
        self.source, self.training, self.pipeline = source, bool(training), pipeline
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img_np, label = self.source.sample(i)
        img = to_image_tensor(img_np)
        mask = torch.as_tensor(label, dtype=torch.int64)
        ori = (int(img.shape[1]), int(img.shape[2]))
        p = self.pipeline
        if self.training:
            img, mask = p.train(img, mask)
        else:
            img = p.eval(img)
        x = (img.float().div_(255.0) - self.mean) / self.std
        size = (int(x.shape[1]), int(x.shape[2]))
        if self.training and p.crop_size and p.pad_to_crop:
            x = pad_to(x, p.crop_size, 0.0)
            mask = pad_to(mask, p.crop_size, p.ignore_index)
        image_id = int(getattr(self.source, "offset", 0)) + int(i)
        return x, {"mask": mask, "size": size, "ori_size": ori, "image_id": image_id}

    def collate(self, samples):
        hm = max(s[0].shape[1] for s in samples)
        wm = max(s[0].shape[2] for s in samples)
        images = torch.stack([pad_to(s[0], (hm, wm), 0.0) for s in samples])
        targets = [dict(s[1]) for s in samples]
        if self.training:
            for t in targets:
                t["mask"] = pad_to(t["mask"], (hm, wm), self.pipeline.ignore_index)
        return images, targets


def pad_to(x: torch.Tensor, size: tuple[int, int], value) -> torch.Tensor:
    """Pad the last two dims at the bottom/right to at least ``size`` (mmseg Pad)."""
    ph, pw = max(size[0] - x.shape[-2], 0), max(size[1] - x.shape[-1], 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), value=value)


# ----------------------------------------------------------------------------------------------------------
# ADE20K
# ----------------------------------------------------------------------------------------------------------
def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 (other) -> 255, k -> k - 1, 255 stays 255."""
    lab = label.astype(np.int64)
    out = lab - 1
    out[(lab == 0) | (lab == 255)] = IGNORE_INDEX
    return out


class AdeSource:
    def __init__(self, pairs: list[tuple[Path, Path]], reduce_zero: bool):
        self.pairs, self.reduce_zero = pairs, bool(reduce_zero)

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, i: int):
        img_path, lab_path = self.pairs[i]
        img = read_rgb(img_path)
        lab = read_label_png(lab_path)
        if lab.shape != img.shape[:2]:
            raise DataError(f"label map {lab_path} is {lab.shape[1]}x{lab.shape[0]} but its image {img_path} is "
                            f"{img.shape[1]}x{img.shape[0]}; re-download the dataset")
        return img, (reduce_zero_label(lab) if self.reduce_zero else lab.astype(np.int64))


def find_ade_dir(root: Path) -> Path:
    for base in (root / "ADEChallengeData2016", root):
        if (base / "images").is_dir() and (base / "annotations").is_dir():
            return base
    where = "does not exist" if not root.exists() else "holds no ADEChallengeData2016/{images,annotations}"
    raise DataError(f"ADE20K not found: {root} {where}; unpack ADEChallengeData2016.zip and set dataset.root=/path/to/"
                    f"it (or its parent) or PETL_BENCH_ADE20K ({GETTING_DATA})")


def ade_pairs(base: Path, split: str) -> list[tuple[Path, Path]]:
    img_dir, lab_dir = base / "images" / split, base / "annotations" / split
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DataError(f"ADE20K folder not found: {d}; the dataset folder must hold images/{{training,validation}}"
                            f" and annotations/{{training,validation}} ({GETTING_DATA})")
    imgs = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg")
    if not imgs:
        raise DataError(f"no .jpg images in {img_dir} ({GETTING_DATA})")
    pairs = []
    for p in imgs:
        lab = lab_dir / f"{p.stem}.png"
        if not lab.is_file():
            raise DataError(f"label map missing for {p}: expected {lab} ({GETTING_DATA})")
        pairs.append((p, lab))
    return pairs


def build_ade20k(cfg, image_size: int, mean, std) -> Task:
    env = "PETL_BENCH_ADE20K"
    root = _root(cfg.get("root"), "ade20k", env)
    base = find_ade_dir(root)
    roles = dict(cfg.get("roles") or {"train": "training", "val": "validation", "trainval": "training",
                                      "test": "validation"})
    train_splits = {roles[r] for r in ("train", "trainval") if r in roles}
    pipe = SegPipeline(cfg)
    reduce_zero = bool(cfg.get("reduce_zero_label", True))
    splits, num = {}, {}
    for split in ("training", "validation"):
        pairs = ade_pairs(base, split)
        num[split] = len(pairs)
        splits[split] = SegmentationSet(AdeSource(pairs, reduce_zero), split in train_splits, pipe, mean, std)
    names = list(ADE20K_CLASSES)
    classes = int(cfg.get("num_classes") or len(names))
    info = {"evaluator": "miou", "masks": False, "class_names": names[:classes], "num_images": num,
            "ignore_index": pipe.ignore_index, "reduce_zero_label": reduce_zero, "folder": str(base),
            "source": "ADEChallengeData2016 (SceneParsing, 150 classes)", "transform": pipe.describe(),
            "item": "image float32 [3,h,w] normalised; target mask int64 (255 ignore), size, ori_size, image_id"}
    return Task(name=str(cfg["name"]), benchmark=str(cfg.get("benchmark", "ade20k")), num_classes=classes,
                splits=splits, roles=roles, image_size=int(image_size), mean=list(mean), std=list(std), info=info,
                kind="segmentation")


DATASETS.add("dense/coco", build_coco)
DATASETS.add("dense/voc", build_voc)
DATASETS.add("dense/ade20k", build_ade20k)
