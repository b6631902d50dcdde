"""Tiny COCO / Pascal VOC / ADE20K folders in the exact official layouts and file formats, for the dense data tests.

* ``write_coco``: ``annotations/instances_{train,val}2017.json`` (COCO json: images, annotations with polygon
  segmentations, one ``iscrowd=1`` object as uncompressed RLE — as in the real files — categories listed out of
  id order with non-contiguous ids) and ``{train2017,val2017}/*.jpg``.
* ``write_voc``: ``VOCdevkit/VOC2007`` (trainval + test) and ``VOC2012`` (trainval): VOC xml annotations (one
  ``difficult`` object, one float coordinate), ``JPEGImages/*.jpg``, ``ImageSets/Main/*.txt``.
* ``write_ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}/`` with .jpg images and
  single-channel (mode L) .png label maps holding 0 ("other") and values up to 150.

The expected parse results are module constants (``COCO_*``, ``VOC_*``) so the tests compare against numbers
written here, not against the reader.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COCO_W, COCO_H = 48, 40
# categories as written (out of id order, ids not contiguous): sorted ids 1, 3, 18 -> labels 0, 1, 2
COCO_CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
                   {"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"}]
COCO_CLASS_NAMES = ["person", "car", "dog"]
PERSON_POLY = [4.0, 6.0, 20.0, 6.0, 20.0, 30.0, 4.0, 30.0]   # rectangle x 4..20, y 6..30
DOG_POLY = [24.0, 30.0, 44.0, 30.0, 34.0, 10.0]              # triangle
CROWD_BOX = (10, 5, 21, 11)                                  # x, y, w, h of the crowd car (RLE rows 5..15, cols 10..30)
# training images kept: 101 (person, dog; a 0.5 px wide car is dropped), 102 (crowd car + person);
# 103 (crowd only) and 104 (no annotation) are dropped from train2017; val2017 keeps both of its images
COCO_TRAIN_KEPT = [101, 102]
COCO_VAL_IDS = [201, 202]


def write_jpeg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.astype(np.uint8)).save(path, quality=95)


def noise_image(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(60, 120, (1, 1, 3)) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a binary mask (column-major runs, starting with the run of zeros)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            prev, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def crowd_mask() -> np.ndarray:
    x, y, w, h = CROWD_BOX
    m = np.zeros((COCO_H, COCO_W), dtype=np.uint8)
    m[y:y + h, x:x + w] = 1
    return m


def _poly_ann(aid, iid, cat, poly, crowd=0):
    xs, ys = poly[0::2], poly[1::2]
    x, y = min(xs), min(ys)
    w, h = max(xs) - x, max(ys) - y
    # shoelace area (what COCO's area field holds for polygons, up to rasterisation)
    area = 0.5 * abs(sum(xs[i] * ys[(i + 1) % len(xs)] - xs[(i + 1) % len(xs)] * ys[i] for i in range(len(xs))))
    return {"id": aid, "image_id": iid, "category_id": cat, "segmentation": [list(poly)], "area": area,
            "bbox": [x, y, w, h], "iscrowd": crowd}


def write_coco(root, seed: int = 0) -> Path:
    """``root`` with a COCO 2017 layout: 4 train2017 images (2 kept for training), 2 val2017 images."""
    root = Path(root)
    crowd = {"id": 0, "image_id": 102, "category_id": 3, "segmentation": rle_uncompressed(crowd_mask()),
             "area": float(crowd_mask().sum()), "bbox": list(map(float, CROWD_BOX)), "iscrowd": 1}
    splits = {
        "train2017": ([101, 102, 103, 104], [
            _poly_ann(1, 101, 1, PERSON_POLY), _poly_ann(2, 101, 18, DOG_POLY),
            {"id": 3, "image_id": 101, "category_id": 3, "segmentation": [[1, 1, 1.5, 1, 1.5, 6, 1, 6]],
             "area": 2.5, "bbox": [1.0, 1.0, 0.5, 5.0], "iscrowd": 0},          # w < 1: dropped
            {**crowd, "id": 4},
            _poly_ann(5, 102, 1, [30.0, 20.0, 40.0, 20.0, 40.0, 36.0, 30.0, 36.0]),
            {**crowd, "id": 6, "image_id": 103},                                # crowd only: image dropped
        ]),
        "val2017": ([201, 202], [
            _poly_ann(7, 201, 1, PERSON_POLY), _poly_ann(8, 201, 3, [26.0, 8.0, 42.0, 8.0, 42.0, 20.0, 26.0, 20.0]),
        ]),
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, (ids, anns) in splits.items():
        images = []
        for iid in ids:
            name = f"{iid:012d}.jpg"
            write_jpeg(root / split / name, noise_image(COCO_W, COCO_H, seed * 1000 + iid))
            images.append({"id": iid, "file_name": name, "width": COCO_W, "height": COCO_H, "license": 1,
                           "coco_url": "", "date_captured": "2013-11-14 16:28:13", "flickr_url": ""})
        doc = {"info": {"description": "petl-bench test fixture", "version": "1.0", "year": 2017},
               "licenses": [{"id": 1, "name": "test", "url": ""}], "images": images, "annotations": anns,
               "categories": COCO_CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


# ---------------------------------------------------------------------------------------------------- VOC
VOC_W, VOC_H = 50, 40
# (year, list, stem) -> objects (name, xmin, ymin, xmax, ymax as written, difficult)
VOC_OBJECTS = {
    ("VOC2007", "000001"): [("dog", "5", "6", "30", "35", 0), ("person", "32", "2", "48", "38", 1)],
    ("VOC2007", "000002"): [("car", "10.0", "12", "40", "30", 0)],
    ("VOC2007", "000003"): [("aeroplane", "1", "1", "50", "40", 0), ("tvmonitor", "20", "20", "30", "28", 1)],
    ("VOC2007", "000004"): [("bird", "8", "9", "16", "18", 0)],
    ("VOC2012", "2008_000001"): [("sheep", "3", "4", "20", "21", 0), ("horse", "22", "5", "45", "33", 0)],
}
VOC_LISTS = {("VOC2007", "trainval"): ["000001", "000002"], ("VOC2007", "test"): ["000003", "000004"],
             ("VOC2012", "trainval"): ["2008_000001"]}


def voc_xml(year: str, stem: str, objects) -> str:
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for n, x1, y1, x2, y2, d in objects)
    return (f"<annotation><folder>{year}</folder><filename>{stem}.jpg</filename><source><database>The {year} "
            f"Database</database><annotation>PASCAL {year}</annotation><image>flickr</image></source>"
            f"<owner><name>test</name></owner><size><width>{VOC_W}</width><height>{VOC_H}</height><depth>3</depth>"
            f"</size><segmented>0</segmented>{objs}</annotation>\n")


def write_voc(root, years=("VOC2007", "VOC2012"), devkit: bool = True, seed: int = 0) -> Path:
    """``root/VOCdevkit/<year>/...`` (``devkit=False``: ``root/<year>/...``). Returns the VOCdevkit folder."""
    base = Path(root) / "VOCdevkit" if devkit else Path(root)
    k = 0
    for (year, stem), objs in VOC_OBJECTS.items():
        if year not in years:
            continue
        d = base / year
        (d / "Annotations").mkdir(parents=True, exist_ok=True)
        (d / "Annotations" / f"{stem}.xml").write_text(voc_xml(year, stem, objs))
        write_jpeg(d / "JPEGImages" / f"{stem}.jpg", noise_image(VOC_W, VOC_H, seed * 1000 + k))
        k += 1
    for (year, lname), stems in VOC_LISTS.items():
        if year not in years:
            continue
        p = base / year / "ImageSets" / "Main" / f"{lname}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(f"{s}\n" for s in stems))
    return base


# ---------------------------------------------------------------------------------------------------- ADE20K
ADE_SIZES = {"training": [(40, 30), (30, 44), (36, 36)], "validation": [(44, 32), (32, 40)]}  # (w, h) per image


def ade_label(w: int, h: int, k: int) -> np.ndarray:
    """uint8 [h, w]: left third 0 ("other"), middle third class 1 + k, right third 150 - k; the top rows 12."""
    lab = np.zeros((h, w), dtype=np.uint8)
    lab[:, w // 3: 2 * w // 3] = 1 + k
    lab[:, 2 * w // 3:] = 150 - k
    lab[:3, :] = 12
    return lab


def write_ade20k(root, seed: int = 0, inside: bool = True) -> Path:
    """``root/ADEChallengeData2016/...`` (``inside=False``: directly under ``root``). Returns that folder."""
    base = Path(root) / "ADEChallengeData2016" if inside else Path(root)
    k = 0
    for split, sizes in ADE_SIZES.items():
        tag = "train" if split == "training" else "val"
        for i, (w, h) in enumerate(sizes, 1):
            stem = f"ADE_{tag}_{i:08d}"
            write_jpeg(base / "images" / split / f"{stem}.jpg", noise_image(w, h, seed * 1000 + k))
            p = base / "annotations" / split / f"{stem}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ade_label(w, h, k)).save(p)  # uint8 2-D: mode L
            k += 1
    return base
