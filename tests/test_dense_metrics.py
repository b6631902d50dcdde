"""Dense metrics (``bench/dense_metrics.py``): COCO AP through pycocotools, VOC07 11-point mAP with difficult
objects, and the confusion-matrix mIoU, against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.dense_metrics import COCO_KEYS, SegConfusion, average_precision, coco_eval, voc07_map
from datasets.synthetic import dense_shapes


def shapes_gts(n: int = 6) -> list[dict]:
    z = dense_shapes.generate(n, 5)
    out = []
    for i in range(n):
        t = dense_shapes.instance_targets(z["instances"][i], z["classes"][i])
        out.append({k: torch.from_numpy(t[k]) for k in ("boxes", "labels", "ignore", "masks")})
    return out


def perfect(gts):
    return [{"boxes": g["boxes"].clone(), "labels": g["labels"].clone(), "scores": torch.ones(len(g["labels"])),
             "masks": g["masks"].clone()} for g in gts]


# ---------------------------------------------------------------- COCO


def test_coco_perfect_predictions_score_100_box_and_mask():
    gts = shapes_gts()
    out = coco_eval(gts, perfect(gts))
    assert set(out) == {f"{p}{k}" for p in ("box_", "mask_") for k in COCO_KEYS}
    for p in ("box_", "mask_"):
        assert out[f"{p}ap"] == pytest.approx(100.0) and out[f"{p}ap50"] == pytest.approx(100.0)
        assert out[f"{p}ap75"] == pytest.approx(100.0) and out[f"{p}ap_s"] == pytest.approx(100.0)
        assert out[f"{p}ap_m"] == -1.0 and out[f"{p}ap_l"] == -1.0  # 64x64 shapes are all "small": undefined
    # torchvision MaskRCNN output: float probabilities [N, 1, H, W], binarised at 0.5
    soft = [{**p, "masks": p["masks"][:, None].float() * 0.9} for p in perfect(gts)]
    assert coco_eval(gts, soft)["mask_ap"] == pytest.approx(100.0)


def test_coco_empty_predictions_are_zero_and_boxes_only():
    gts = shapes_gts(3)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
              "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)} for _ in gts]
    out = coco_eval(gts, empty)
    assert all(v == 0.0 for v in out.values()) and len(out) == 12
    box = coco_eval([{k: v for k, v in g.items() if k != "masks"} for g in gts],
                    [{k: v for k, v in p.items() if k != "masks"} for p in perfect(gts)], iou_types=("bbox",))
    assert set(box) == {f"box_{k}" for k in COCO_KEYS} and box["box_ap"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="segm"):
        coco_eval([{k: v for k, v in g.items() if k != "masks"} for g in gts], perfect(gts))


def test_coco_hand_computed_half_recall_and_crowd_ignore():
    masks = torch.zeros(3, 64, 64, dtype=torch.uint8)
    masks[0, 2:22, 2:22] = 1
    masks[1, 30:50, 30:50] = 1
    masks[2, 40:60, 2:22] = 1
    gt = {"boxes": torch.tensor([[2., 2, 22, 22], [30, 30, 50, 50], [2, 40, 22, 60]]),
          "labels": torch.tensor([0, 0, 0]), "ignore": torch.tensor([False, False, True]), "masks": masks}
    # one of the two non-crowd objects found; a detection on the crowd region is neither TP nor FP
    pred = {"boxes": torch.tensor([[2., 2, 22, 22], [2, 40, 22, 60]]), "labels": torch.tensor([0, 0]),
            "scores": torch.tensor([0.9, 0.8]), "masks": masks[[0, 2]]}
    out = coco_eval([gt], [pred])
    # precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points -> 51/101
    assert out["box_ap"] == pytest.approx(100 * 51 / 101, abs=1e-6)
    assert out["mask_ap"] == pytest.approx(100 * 51 / 101, abs=1e-6)
    assert out["box_ap50"] == pytest.approx(100 * 51 / 101, abs=1e-6)


# ---------------------------------------------------------------- VOC07


def voc_example():
    """Class 0: gts A (img0), B (img0, difficult), C (img1); class 1: only a difficult gt; class 2: a gt, no
    detection. Detections of class 0 by score: A (TP), on B (ignored), img1 background (FP), C (TP), A again (FP)."""
    A, B, C = [0., 0, 10, 10], [20., 20, 30, 30], [0., 0, 10, 10]
    gts = [{"boxes": torch.tensor([A, B, [40., 40, 50, 50]]), "labels": torch.tensor([0, 0, 1]),
            "ignore": torch.tensor([False, True, True])},
           {"boxes": torch.tensor([C, [30., 0, 40, 10]]), "labels": torch.tensor([0, 2]),
            "ignore": torch.tensor([False, False])}]
    preds = [{"boxes": torch.tensor([[0., 0, 10, 9.5], [20, 20, 30, 30], [0, 1, 10, 10], [40, 40, 50, 50]]),
              "scores": torch.tensor([0.9, 0.8, 0.5, 0.95]), "labels": torch.tensor([0, 0, 0, 1])},
             {"boxes": torch.tensor([[50., 50, 60, 60], [0, 0, 10, 10]]), "scores": torch.tensor([0.7, 0.6]),
              "labels": torch.tensor([0, 0])}]
    return gts, preds


def test_voc07_11_point_hand_example_with_difficult():
    gts, preds = voc_example()
    out = voc07_map(gts, preds, num_classes=3)
    # class 0: TP, (ignored), FP, TP, FP over 2 gts -> recall .5 .5 1 1, precision 1 .5 .667 .5
    # 11-point: thresholds 0..0.5 -> 1.0 (6 points), 0.6..1.0 -> 2/3 (5 points)
    ap0 = (6 * 1.0 + 5 * (2 / 3)) / 11 * 100
    assert out["per_class"][0] == pytest.approx(ap0)
    assert out["per_class"][1] is None and out["num_gts"] == [2, 0, 1]  # only a difficult gt: not in the mean
    assert out["per_class"][2] == 0.0
    assert out["box_ap50"] == pytest.approx((ap0 + 0.0) / 2)
    area = voc07_map(gts, preds, num_classes=3, use_07_metric=False)
    assert area["per_class"][0] == pytest.approx((0.5 * 1.0 + 0.5 * (2 / 3)) * 100)  # all-point: 83.33
    assert voc07_map(gts, [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                            "labels": torch.zeros(0, dtype=torch.long)}] * 2, 3)["box_ap50"] == 0.0
    perfect = [{"boxes": g["boxes"], "labels": g["labels"], "scores": torch.ones(len(g["labels"]))} for g in gts]
    assert voc07_map(gts, perfect, 3)["box_ap50"] == pytest.approx(100.0)


def test_average_precision_modes():
    r, p = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert average_precision(r, p, "11points") == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)
    assert average_precision(r, p, "area") == pytest.approx(0.75)


# ---------------------------------------------------------------- mIoU


def test_seg_confusion_hand_example_and_absent_classes():
    label = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 3], [1, 2, 2, 0]])
    c = SegConfusion(4)
    c.update(pred, label)
    s = c.scores()
    # IoU: c0 1/3, c1 2/3, c2 2/3, c3 absent from labels and (non-ignored) preds -> left out
    assert s["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert s["macc"] == pytest.approx(100 * (1 / 2 + 1 + 2 / 3) / 3)
    assert s["aacc"] == pytest.approx(100 * 5 / 7)
    assert math.isnan(c.per_class()["iou"][3]) and set(s) == {"miou", "macc", "aacc"}
    # the same pixels over two updates (and merged accumulators) give the same matrix
    a, b = SegConfusion(4), SegConfusion(4)
    a.update(pred[0], label[0])
    b.update(pred[1], label[1])
    assert torch.equal(a.merge(b).mat, c.mat)
    # a class predicted but never labelled has IoU 0 and counts in the mean
    d = SegConfusion(4)
    d.update(torch.tensor([3, 1]), torch.tensor([0, 1]))
    assert d.scores()["miou"] == pytest.approx(100 * (0 + 1 + 0) / 3)
    with pytest.raises(ValueError):
        d.update(torch.tensor([4]), torch.tensor([0]))
    with pytest.raises(ValueError):
        d.update(torch.zeros(2, 2), torch.zeros(4))
