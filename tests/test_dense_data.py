"""Dense prediction data: the COCO / VOC / ADE20K readers on tiny folders in the official formats
(``tests/dense_fixtures.py``), the detection and segmentation items and transforms, collate, one-line errors,
the yamls, and the procedural ``synthetic/shapes_det|seg`` (spec video_dense.md §B1, §C2)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import datasets
from bench import CONF_DIR
from datasets import make_loader
from datasets.base import DataError, ImageTensorDataset
from datasets.dense import (ADE20K_CLASSES, VOC_CLASSES, hsv_to_rgb, photometric_distortion, random_crop,
                            reduce_zero_label, rescale_size, rgb_to_hsv)
from datasets.synthetic import dense_shapes
from dense_fixtures import (ADE_SIZES, COCO_CLASS_NAMES, COCO_H, COCO_W, CROWD_BOX, VOC_OBJECTS, ade_label,
                            crowd_mask, write_ade20k, write_coco, write_voc)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
DENSE = {"dense/coco": ("detection", "coco", 80, "coco"), "dense/voc": ("detection", "voc", 20, "voc07"),
         "dense/ade20k": ("segmentation", "ade20k", 150, "miou"),
         "synthetic/shapes_det": ("detection", "embedded_dense", 3, "coco"),
         "synthetic/shapes_seg": ("segmentation", "embedded_dense", 4, "miou")}


def cfg_of(name: str, **over):
    return OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / "dataset" / f"{name}.yaml"), over)


def build(name: str, **over):
    return datasets.build(cfg_of(name, **over), 224, MEAN, STD)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    write_voc(root)
    return root


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    write_ade20k(root)
    return root


def one_line_error(fn, *needles):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, msg
    return msg


# ---------------------------------------------------------------- yamls


def test_dense_yamls_kinds_benchmarks_classes_and_info(coco_root, voc_root, ade_root):
    roots = {"dense/coco": coco_root, "dense/voc": voc_root, "dense/ade20k": ade_root}
    for name, (kind, bench, classes, evaluator) in DENSE.items():
        cfg = cfg_of(name)
        assert cfg.name == name and cfg.kind == kind and cfg.benchmark == bench and cfg.num_classes == classes
        over = {"root": str(roots[name])} if name in roots else {"sizes": {"train": 6, "test": 4}}
        if name == "dense/coco":
            over["num_classes"] = 3  # the fixture has 3 categories
        task = build(name, **over)
        assert task.kind == kind and task.benchmark == bench
        info = task.info
        assert info["evaluator"] == evaluator and isinstance(info["masks"], bool)
        assert set(info["num_images"]) == set(task.splits) and len(info["class_names"]) == task.num_classes
        assert set(task.roles) == {"train", "val", "trainval", "test"}
        assert task.roles["train"] == task.roles["trainval"] and task.roles["val"] == task.roles["test"]
        if kind == "segmentation":
            assert info["ignore_index"] == 255
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert ADE20K_CLASSES[:3] == ("wall", "building", "sky") and ADE20K_CLASSES[-1] == "flag"


def test_strict_keys_accept_dense_yaml_keys_and_reject_typos():
    from bench.checks import ConfigError, check_keys
    from helpers import compose_cfg

    cfg = compose_cfg(["dataset=dense/ade20k", "dataset.crop_size=[64,64]", "dataset.photometric=null"])
    check_keys(cfg)
    assert cfg.dataset.crop_size == [64, 64] and cfg.dataset.kind == "segmentation"
    with pytest.raises(ConfigError, match="dataset.crop_sise"):
        check_keys(compose_cfg(["dataset=dense/ade20k", "+dataset.crop_sise=1"]))


# ---------------------------------------------------------------- COCO


def test_coco_reader_mapping_boxes_crowd_masks_and_filters(coco_root):
    task = build("dense/coco", root=str(coco_root), num_classes=3, train_flip=False, train_crop=None)
    assert task.info["class_names"] == COCO_CLASS_NAMES and task.info["category_ids"] == [1, 3, 18]
    assert task.info["num_images"] == {"train2017": 2, "val2017": 2} and task.info["masks"] is True
    train, test = task.split("train"), task.split("test")
    img, t = train[0]
    assert img.dtype == torch.float32 and img.shape == (3, COCO_H, COCO_W) and 0 <= img.min() and img.max() <= 1
    assert t["image_id"] == 101
    # person (id 1 -> 0) and dog (id 18 -> 2); the 0.5-px-wide car is dropped
    assert t["boxes"].tolist() == [[4, 6, 20, 30], [24, 10, 44, 30]] and t["labels"].tolist() == [0, 2]
    assert t["ignore"].tolist() == [False, False] and t["masks"].dtype == torch.uint8
    assert t["masks"].shape == (2, COCO_H, COCO_W)
    person = torch.zeros(COCO_H, COCO_W, dtype=torch.uint8)
    person[6:30, 4:20] = 1
    assert torch.equal(t["masks"][0], person)  # polygon rasterised by pycocotools
    ys, xs = torch.nonzero(t["masks"][1], as_tuple=True)
    assert 24 <= xs.min() and xs.max() < 44 and 10 <= ys.min() and ys.max() < 30
    _, t2 = train[1]
    x, y, w, h = CROWD_BOX
    assert t2["image_id"] == 102 and t2["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert t2["labels"].tolist() == [1, 0] and t2["ignore"].tolist() == [True, False]
    assert torch.equal(t2["masks"][0], torch.from_numpy(crowd_mask()))  # uncompressed RLE decoded
    # evaluation keeps the image without annotations
    assert [test[i][1]["image_id"] for i in range(len(test))] == [201, 202]
    assert test[1][1]["boxes"].shape == (0, 4) and test[1][1]["masks"].shape == (0, COCO_H, COCO_W)


def test_coco_training_flip_is_seeded_and_consistent(coco_root):
    task = build("dense/coco", root=str(coco_root), num_classes=3, train_crop=None)
    ref_img, ref_t = build("dense/coco", root=str(coco_root), num_classes=3, train_flip=False,
                           train_crop=None).split("train")[0]
    train = task.split("train")
    flipped = []
    for seed in range(6):
        torch.manual_seed(seed)
        img, t = train[0]
        torch.manual_seed(seed)
        img2, t2 = train[0]
        assert torch.equal(img, img2) and torch.equal(t["boxes"], t2["boxes"])  # reproducible
        if torch.equal(img, ref_img):
            assert torch.equal(t["boxes"], ref_t["boxes"])
            flipped.append(False)
            continue
        assert torch.equal(img, ref_img.flip(-1)) and torch.equal(t["masks"], ref_t["masks"].flip(-1))
        for box, m in zip(t["boxes"], t["masks"]):  # boxes follow the flipped masks
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert abs(box[0] - xs.min()) <= 1 and abs(box[2] - (xs.max() + 1)) <= 1
        assert t["boxes"][0].tolist() == [COCO_W - 20, 6, COCO_W - 4, 30]
        flipped.append(True)
    assert any(flipped) and not all(flipped)
    test = task.split("test")
    torch.manual_seed(0)
    first = [test[0][0] for _ in range(4)]
    assert all(torch.equal(f, first[0]) for f in first)  # evaluation items are never flipped


def test_collate_and_make_loader(coco_root, ade_root):
    det = build("dense/coco", root=str(coco_root), num_classes=3).split("test")
    images, targets = next(iter(make_loader(det, 2, shuffle=False)))
    assert isinstance(images, list) and len(images) == 2 and isinstance(targets, list)
    assert images[0].shape == (3, COCO_H, COCO_W) and "boxes" in targets[0]
    seg = build("dense/ade20k", root=str(ade_root), img_scale=[96, 32], crop_size=[24, 24], test_scale=[96, 32])
    x, ts = next(iter(make_loader(seg.split("train"), 3, shuffle=False)))
    assert x.shape == (3, 3, 24, 24) and all(t["mask"].shape == (24, 24) for t in ts)
    x, ts = next(iter(make_loader(seg.split("test"), 2, shuffle=False)))
    sizes = [t["size"] for t in ts]
    assert x.shape == (2, 3, max(s[0] for s in sizes), max(s[1] for s in sizes))
    assert [tuple(t["mask"].shape) for t in ts] == [(h, w) for w, h in ADE_SIZES["validation"]]  # original sizes
    for xi, (h, w) in zip(x, sizes):  # padding is 0 outside each image
        assert float(xi[:, h:].abs().sum()) == 0 and float(xi[:, :, w:].abs().sum()) == 0
    # a plain classification dataset keeps its batched path
    ds = ImageTensorDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), [0.5] * 3, [0.5] * 3)
    xb, yb = next(iter(make_loader(ds, 4, shuffle=False)))
    assert xb.shape == (4, 3, 8, 8) and yb.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- VOC


def test_coco_crop_policy_boxes_masks_and_probability(coco_root):
    """mmdet's second COCO policy: resize to a short side in {400, 500, 600}, crop 384-600; boxes shifted and
    clipped into the crop, emptied boxes dropped with their masks; p = 0 is the identity."""
    from datasets.dense import CropPolicy

    plain = build("dense/coco", root=str(coco_root), num_classes=3, train_flip=False, train_crop=None).split("train")
    img0, t0 = plain[0]
    torch.manual_seed(0)
    same = CropPolicy(p=0.0)(img0, t0)
    assert same[0] is img0 and same[1] is t0
    crop = build("dense/coco", root=str(coco_root), num_classes=3, train_flip=False,
                 train_crop={"p": 1.0, "short": [400, 500, 600], "max_long": 1333, "crop": [384, 600]}).split("train")
    sizes = set()
    for seed in range(8):
        torch.manual_seed(seed)
        img, t = crop[0]
        h, w = img.shape[-2:]
        sizes.add((h, w))
        assert 384 <= h <= 600 and 384 <= w <= 600
        b = t["boxes"]
        assert len(b) == len(t["labels"]) == len(t["ignore"]) == len(t["masks"]) <= len(t0["boxes"])
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        assert t["masks"].shape[-2:] == (h, w) and img.dtype == img0.dtype
        for box, m in zip(b, t["masks"]):  # masks stay under their boxes
            ys, xs = torch.nonzero(m, as_tuple=True)
            if len(xs):
                assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
    assert len(sizes) > 1
    assert len(build("dense/coco", root=str(coco_root), num_classes=3).split("test")[0][1]["boxes"]) \
        == len(build("dense/coco", root=str(coco_root), num_classes=3, train_crop=None).split("test")[0][1]["boxes"])


def test_voc_repeat_dataset_triples_an_epoch(voc_root):
    task = build("dense/voc", root=str(voc_root), train_flip=False)  # dense/voc.yaml: repeat 3 (RepeatDataset x3)
    train, test = task.split("train"), task.split("test")
    assert len(train) == 3 * task.info["num_images"]["trainval0712"] and len(test) == task.info["num_images"]["test07"]
    assert torch.equal(train[1][0], train[1 + 3][0]) and train[2][1]["image_id"] == train[8][1]["image_id"]
    assert len(build("dense/voc", root=str(voc_root), repeat=1).split("train")) == 3


def test_voc_reader_minus_one_rule_difficult_and_years(voc_root, tmp_path):
    for root in (voc_root, voc_root / "VOCdevkit"):  # the parent or the VOCdevkit folder itself
        task = build("dense/voc", root=str(root), train_flip=False)
        assert task.info["num_images"] == {"trainval0712": 3, "test07": 2}
        assert task.info["train_sets"] == "VOC2007/trainval + VOC2012/trainval" and task.info["masks"] is False
        assert task.info["class_names"] == list(VOC_CLASSES)
    train = task.split("train")
    expected = [VOC_OBJECTS[("VOC2007", "000001")], VOC_OBJECTS[("VOC2007", "000002")],
                VOC_OBJECTS[("VOC2012", "2008_000001")]]
    for i, objs in enumerate(expected):
        img, t = train[i]
        assert img.shape == (3, 40, 50) and "masks" not in t and t["image_id"] == i
        assert t["boxes"].tolist() == [[int(float(v)) - 1 for v in o[1:5]] for o in objs]
        assert t["labels"].tolist() == [VOC_CLASSES.index(o[0]) for o in objs]
        assert t["ignore"].tolist() == [bool(o[5]) for o in objs]
    assert train[0][1]["boxes"].tolist() == [[4, 5, 29, 34], [31, 1, 47, 37]]  # xml 5,6,30,35 / 32,2,48,38
    assert train[1][1]["boxes"].tolist() == [[9, 11, 39, 29]]                   # "10.0" -> 9
    test = task.split("test")
    assert test[0][1]["labels"].tolist() == [0, 19] and test[0][1]["ignore"].tolist() == [False, True]
    only07 = tmp_path / "voc07"
    write_voc(only07, years=("VOC2007",))
    task = build("dense/voc", root=str(only07))
    assert task.info["num_images"] == {"trainval0712": 2, "test07": 2} and task.info["train_sets"] == "VOC2007/trainval"


# ---------------------------------------------------------------- ADE20K


def test_ade_reader_reduce_zero_label_eval_resize_and_original_mask(ade_root):
    for root in (ade_root, ade_root / "ADEChallengeData2016"):
        task = build("dense/ade20k", root=str(root))
        assert task.kind == "segmentation" and task.info["num_images"] == {"training": 3, "validation": 2}
        assert task.info["reduce_zero_label"] is True and task.num_classes == 150
    test = task.split("test")
    for i, (w, h) in enumerate(ADE_SIZES["validation"]):
        x, t = test[i]
        nh, nw = rescale_size(h, w, (2048, 512))
        assert x.shape == (3, nh, nw) and t["size"] == (nh, nw) and t["ori_size"] == (h, w)
        raw = ade_label(w, h, 3 + i)
        assert t["mask"].dtype == torch.int64 and t["mask"].shape == (h, w)
        assert torch.equal(t["mask"], torch.from_numpy(reduce_zero_label(raw)))
        m = t["mask"]
        assert (m[raw == 0] == 255).all() and (m[raw == 12] == 11).all() and (m[torch.from_numpy(raw) == 150 - 3 - i]
                                                                              == 149 - 3 - i).all()
    assert reduce_zero_label(np.array([0, 1, 150, 255], np.uint8)).tolist() == [255, 0, 149, 255]


def test_ade_training_pipeline_rescale_crop_pad_and_seed(ade_root):
    task = build("dense/ade20k", root=str(ade_root), img_scale=[128, 32], crop_size=[40, 40], test_scale=[128, 32])
    train = task.split("train")
    torch.manual_seed(3)
    a = [train[i] for i in range(3)]
    torch.manual_seed(3)
    b = [train[i] for i in range(3)]
    for (xa, ta), (xb, tb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ta["mask"], tb["mask"])  # a seeded run is reproducible
        assert xa.shape == (3, 40, 40) and ta["mask"].shape == (40, 40)  # padded to crop_size
        h, w = ta["size"]
        assert h <= 40 and w <= 40
        assert (ta["mask"][h:] == 255).all() and (ta["mask"][:, w:] == 255).all()
        assert set(ta["mask"].unique().tolist()) <= set(range(150)) | {255}
    # ratio range: the rescaled short side lies in [16, 64] for img_scale (128, 32) x [0.5, 2]
    sizes = set()
    for s in range(6):
        torch.manual_seed(s)
        sizes.add(train[0][1]["size"])
    assert len(sizes) > 1


def test_random_crop_cat_max_ratio_and_photometric():
    mask = torch.zeros(64, 64, dtype=torch.int64)
    mask[:, 32:] = 1
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    for seed in range(15):
        torch.manual_seed(seed)
        _, m = random_crop(img, mask, (32, 32), cat_max_ratio=0.75)
        _, cnt = m.unique(return_counts=True)
        assert len(cnt) == 2 and cnt.max() / cnt.sum() < 0.75
    _, m = random_crop(img, mask[:20, :20], (32, 32), 0.75)
    assert m.shape == (20, 20)  # an image smaller than the crop is kept whole
    rgb = torch.randint(0, 256, (3, 16, 16)).float()
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-3)
    hsv = rgb_to_hsv(torch.tensor([[[255.0]], [[0.0]], [[0.0]]]))
    assert hsv.flatten().tolist() == [0.0, 255.0, 255.0]  # red: OpenCV H 0, S 255, V 255
    x = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    torch.manual_seed(0)
    outs = [photometric_distortion(x) for _ in range(8)]
    torch.manual_seed(0)
    assert all(torch.equal(o, photometric_distortion(x)) for o in outs)
    assert all(o.dtype == torch.uint8 and o.shape == x.shape for o in outs) and any(not torch.equal(o, x) for o in outs)
    gray = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    torch.manual_seed(1)
    g = photometric_distortion(gray, brightness_delta=0, contrast_range=(1, 1))
    assert torch.equal(g, gray)  # saturation and hue leave a gray image alone


# ---------------------------------------------------------------- errors


def test_missing_root_folders_and_json_are_one_line_errors(tmp_path, coco_root):
    missing = tmp_path / "nowhere"
    one_line_error(lambda: build("dense/coco", root=str(missing)), missing, "dataset.root", "PETL_BENCH_COCO")
    one_line_error(lambda: build("dense/voc", root=str(missing)), missing, "dataset.root", "PETL_BENCH_VOC")
    one_line_error(lambda: build("dense/ade20k", root=str(missing)), missing, "dataset.root", "PETL_BENCH_ADE20K")
    empty = tmp_path / "empty"
    (empty / "train2017").mkdir(parents=True)
    one_line_error(lambda: build("dense/coco", root=str(empty)), empty / "annotations" / "instances_train2017.json",
                   "PETL_BENCH_COCO")
    voc = tmp_path / "voc_notest"
    write_voc(voc, years=("VOC2007",))
    (voc / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt").unlink()
    one_line_error(lambda: build("dense/voc", root=str(voc)), "test.txt")
    ade = tmp_path / "ade_nolabel"
    base = write_ade20k(ade)
    lab = base / "annotations" / "validation" / "ADE_val_00000002.png"
    lab.unlink()
    one_line_error(lambda: build("dense/ade20k", root=str(ade)), lab)
    import shutil
    shutil.rmtree(base / "annotations" / "validation")
    one_line_error(lambda: build("dense/ade20k", root=str(ade)), base / "annotations" / "validation")


def test_corrupt_image_is_a_one_line_error_naming_the_file(tmp_path):
    root = write_coco(tmp_path / "coco")
    bad = root / "val2017" / f"{201:012d}.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated jpeg
    task = build("dense/coco", root=str(root), num_classes=3)  # builds: images are decoded per fetch
    one_line_error(lambda: task.split("test")[0], bad)
    (root / "val2017" / f"{202:012d}.jpg").unlink()
    one_line_error(lambda: task.split("test")[1], f"{202:012d}.jpg", "not found")
    ade = write_ade20k(tmp_path / "ade")
    png = ade / "annotations" / "training" / "ADE_train_00000001.png"
    png.write_bytes(b"not a png")
    one_line_error(lambda: build("dense/ade20k", root=str(tmp_path / "ade")).split("train")[0], png)
    Image.new("L", (5, 5)).save(png)  # wrong size
    one_line_error(lambda: build("dense/ade20k", root=str(tmp_path / "ade")).split("train")[0], png, "5x5")


# ---------------------------------------------------------------- procedural shapes


def test_shapes_generation_is_deterministic_tight_and_consistent():
    t0 = time.perf_counter()
    z = dense_shapes.generate(576, 0)  # the yaml's 384 + 192 images
    took = time.perf_counter() - t0
    assert took < 6.0, took  # ~0.6 s on an idle core (spec: < 2 s); loose bound for shared machines
    z2 = dense_shapes.generate(8, 0)
    assert all(np.array_equal(z[k][:8], z2[k]) for k in z)  # same seed, same data
    assert not np.array_equal(dense_shapes.generate(8, 1)["images"], z2["images"])
    counts = (z["classes"] >= 0).sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and z["images"].shape == (576, 64, 64, 3)
    per_class = np.bincount(z["classes"][z["classes"] >= 0], minlength=3)
    assert per_class.min() > 0.8 * per_class.mean()  # balanced classes
    sizes = {0: [], 1: [], 2: []}
    for i in range(64):
        t = dense_shapes.instance_targets(z["instances"][i], z["classes"][i])
        seg = dense_shapes.semantic_labels(z["instances"][i], z["classes"][i])
        assert len(t["boxes"]) == counts[i] and t["masks"].shape == (counts[i], 64, 64)
        union = np.zeros((64, 64), bool)
        for box, m, lab in zip(t["boxes"], t["masks"], t["labels"]):
            ys, xs = np.nonzero(m)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # tight
            assert (seg[m.astype(bool)] == lab + 1).all()  # seg labels = the instance's class + 1
            assert not (union & m.astype(bool)).any()  # no overlap
            union |= m.astype(bool)
            sizes[int(lab)].append(max(box[2] - box[0], box[3] - box[1]))
        assert (seg[~union] == 0).all()
    assert all(4 <= min(v) and max(v) <= 29 for v in sizes.values())


def test_shapes_tasks_items(tmp_path):
    assert not build("synthetic/shapes_det", root=str(tmp_path), sizes={"train": 6, "test": 4}).info["masks"]  # retinanet
    det = build("synthetic/shapes_det", root=str(tmp_path), sizes={"train": 6, "test": 4}, masks=True)
    assert det.kind == "detection" and det.info["masks"] and det.info["class_names"] == ["disc", "square", "triangle"]
    img, t = det.split("test")[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert t["masks"].shape[1:] == (64, 64) and t["labels"].max() < 3 and not t["ignore"].any()
    assert t["image_id"] == 6  # ids run over train then test
    seg = build("synthetic/shapes_seg", root=str(tmp_path), sizes={"train": 6, "test": 4})
    assert seg.kind == "segmentation" and seg.num_classes == 4 and seg.info["class_names"][0] == "background"
    x, ts = seg.split("train").collate([seg.split("train")[i] for i in range(3)])
    assert x.shape == (3, 3, 64, 64) and all(tt["mask"].shape == (64, 64) for tt in ts)
    x, tt = seg.split("test")[0]
    z = dense_shapes.generate(10, 0)
    ref = dense_shapes.semantic_labels(z["instances"][6], z["classes"][6])  # test image 0 = generated image 6
    assert torch.equal(tt["mask"], torch.from_numpy(ref))  # the same images as shapes_det
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(x * std + mean, det.split("test")[0][0], atol=1e-5)  # normalised with the given mean/std
