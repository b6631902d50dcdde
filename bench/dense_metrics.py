"""Dense prediction metrics (pure functions, no training code); every score in percent (0–100).

* ``coco_eval``: COCO AP via pycocotools ``COCOeval`` on in-memory COCO objects built from the target dicts
  (``ignore`` -> ``iscrowd=1``; masks RLE-encoded), iou types ``bbox`` and ``segm``.
* ``voc07_map``: Pascal VOC mAP@0.5 as mmdet's ``eval_map`` (``tpfp_default``) and the VOC devkit: difficult
  (ignored) ground truths are neither TP nor FP when a detection's best match, 11-point interpolation
  (``use_07_metric``) or the all-point area; the mean runs over classes with at least one non-difficult gt.
* ``SegConfusion``: a confusion matrix accumulated over a dataset; mIoU = nanmean of IoU over classes whose
  union is non-zero, mAcc over classes present in the labels, aAcc (mmseg semantics).

``gts[i]`` and ``preds[i]`` always describe the same image. A gt dict: ``boxes`` [N, 4] xyxy, ``labels`` [N]
(0-based), optional ``ignore`` [N] bool, ``masks`` [N, H, W], ``area`` [N] (COCO's annotation area; default the
mask area, else the box area). A prediction dict: ``boxes`` [M, 4] xyxy, ``scores`` [M], ``labels`` [M],
optional ``masks`` [M, H, W] or [M, 1, H, W] (bool/uint8, or float probabilities binarised at 0.5).
Tensors or numpy arrays.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

COCO_KEYS = ("ap", "ap50", "ap75", "ap_s", "ap_m", "ap_l")  # COCOeval.stats[0:6]


def _np(x, dtype=None) -> np.ndarray:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def _binary_masks(m) -> Optional[np.ndarray]:
    if m is None:
        return None
    m = _np(m)
    if m.ndim == 4:  # torchvision MaskRCNN: [N, 1, H, W] probabilities
        m = m[:, 0]
    if m.dtype.kind == "f":
        m = m >= 0.5
    return np.asfortranarray(m.astype(np.uint8))


def _encode(masks: np.ndarray) -> list[dict]:
    from pycocotools import mask as mask_api

    if masks.shape[0] == 0:
        return []
    return list(_quiet(mask_api.encode, np.asfortranarray(masks.transpose(1, 2, 0))))


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = boxes.reshape(-1, 4).astype(np.float64)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)


def _quiet(fn, *args):
    """Run a pycocotools call with its prints sent to the debug log (and numpy 2's DeprecationWarning about
    pycocotools' ``__array__`` silenced)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = fn(*args)
    if buf.getvalue().strip():
        log.debug("pycocotools: %s", " | ".join(buf.getvalue().strip().splitlines()))
    return out


def coco_eval(gts: Sequence[dict], preds: Sequence[dict], iou_types=("bbox", "segm"),
              num_classes: Optional[int] = None) -> dict[str, float]:
    """COCO AP (pycocotools) in percent: ``box_ap, box_ap50, box_ap75, box_ap_s, box_ap_m, box_ap_l`` and the same
    with ``mask_`` for ``segm``. No predictions at all -> 0.0 everywhere; a size range without ground truth keeps
    pycocotools' -1.0 (undefined, not scaled). ``num_classes`` (optional) lists the categories 0..K-1; else those
    seen in gts and preds."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(gts) != len(preds):
        raise ValueError(f"coco_eval: {len(gts)} ground-truth images but {len(preds)} predictions")
    iou_types = tuple(iou_types)
    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise ValueError(f"coco_eval: unknown iou type {t!r} (bbox, segm)")
    want_segm = "segm" in iou_types
    images, anns, dets = [], [], []
    labels_seen: set[int] = set()
    for i, (gt, pr) in enumerate(zip(gts, preds)):
        iid = i + 1
        g_boxes = _np(gt["boxes"], np.float64).reshape(-1, 4)
        g_labels = _np(gt["labels"], np.int64).reshape(-1)
        n = len(g_labels)
        g_ignore = _np(gt.get("ignore"), bool) if gt.get("ignore") is not None else np.zeros(n, bool)
        g_masks = _binary_masks(gt.get("masks"))
        p_masks = _binary_masks(pr.get("masks"))
        if want_segm and g_masks is None:
            raise ValueError("coco_eval: iou type 'segm' needs gt 'masks' (pass iou_types=('bbox',) for boxes only)")
        if want_segm and p_masks is None and len(_np(pr["labels"]).reshape(-1)):
            raise ValueError("coco_eval: iou type 'segm' needs predicted 'masks'")
        if g_masks is not None:
            h, w = g_masks.shape[-2:]
        elif p_masks is not None:
            h, w = p_masks.shape[-2:]
        else:
            h, w = gt.get("size", (0, 0))
        images.append({"id": iid, "height": int(h), "width": int(w)})
        xywh = _xywh(g_boxes)
        g_rles = _encode(g_masks) if (want_segm and g_masks is not None) else [None] * n
        if gt.get("area") is not None:
            area = _np(gt["area"], np.float64).reshape(-1)
        elif g_masks is not None:
            area = g_masks.reshape(n, -1).sum(1).astype(np.float64)
        else:
            area = xywh[:, 2] * xywh[:, 3]
        for k in range(n):
            a = {"id": len(anns) + 1, "image_id": iid, "category_id": int(g_labels[k]), "bbox": xywh[k].tolist(),
                 "area": float(area[k]), "iscrowd": int(bool(g_ignore[k]))}
            if g_rles[k] is not None:
                a["segmentation"] = g_rles[k]
            anns.append(a)
            labels_seen.add(int(g_labels[k]))
        p_boxes = _xywh(_np(pr["boxes"], np.float64))
        p_scores = _np(pr["scores"], np.float64).reshape(-1)
        p_labels = _np(pr["labels"], np.int64).reshape(-1)
        p_rles = _encode(p_masks) if (want_segm and p_masks is not None) else [None] * len(p_labels)
        for k in range(len(p_labels)):
            d = {"image_id": iid, "category_id": int(p_labels[k]), "bbox": p_boxes[k].tolist(),
                 "score": float(p_scores[k])}
            if p_rles[k] is not None:
                d["segmentation"] = p_rles[k]
            dets.append(d)
            labels_seen.add(int(p_labels[k]))
    prefixes = {"bbox": "box_", "segm": "mask_"}
    out = {f"{prefixes[t]}{k}": 0.0 for t in iou_types for k in COCO_KEYS}
    if not dets or not anns:
        return out
    cats = range(int(num_classes)) if num_classes is not None else sorted(labels_seen)
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": int(c)} for c in cats]}
    _quiet(coco_gt.createIndex)
    for t in iou_types:
        det_t = dets if t == "bbox" else [d for d in dets if "segmentation" in d]
        if not det_t:
            continue
        if t == "bbox":
            det_t = [{k: v for k, v in d.items() if k != "segmentation"} for d in det_t]
        coco_dt = _quiet(coco_gt.loadRes, det_t)
        ev = COCOeval(coco_gt, coco_dt, iouType=t)
        _quiet(ev.evaluate)
        _quiet(ev.accumulate)
        _quiet(ev.summarize)
        for k, v in zip(COCO_KEYS, ev.stats[:6]):
            out[f"{prefixes[t]}{k}"] = float(v) * 100.0 if v >= 0 else -1.0
    return out


# ----------------------------------------------------------------------------------------------------------
# Pascal VOC
# ----------------------------------------------------------------------------------------------------------
def box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [len(a), len(b)] of xyxy boxes (mmdet 2.x coordinates: area = (x2 - x1) * (y2 - y1), no +1)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = np.maximum(area_a[:, None] + area_b[None] - inter, np.finfo(np.float32).eps)
    return inter / union


def average_precision(recalls: np.ndarray, precisions: np.ndarray, mode: str = "11points") -> float:
    """mmdet ``average_precision``: ``11points`` (VOC07) or ``area`` (all points, VOC2010+)."""
    if mode == "11points":
        ap = 0.0
        for thr in np.arange(0, 1 + 1e-3, 0.1):
            p = precisions[recalls >= thr]
            ap += float(p.max()) if p.size else 0.0
        return ap / 11.0
    if mode == "area":
        mrec = np.concatenate([[0.0], recalls, [1.0]])
        mpre = np.concatenate([[0.0], precisions, [0.0]])
        for i in range(len(mpre) - 1, 0, -1):
            mpre[i - 1] = max(mpre[i - 1], mpre[i])
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
    raise ValueError(f"average_precision: mode {mode!r} (11points, area)")


def voc07_map(gts: Sequence[dict], preds: Sequence[dict], num_classes: int, iou_thr: float = 0.5,
              use_07_metric: bool = True) -> dict:
    """VOC mAP in percent: ``box_ap50`` (mean over classes with >= 1 non-difficult gt), ``per_class`` (AP per
    class, None where the class has no non-difficult gt), ``num_gts`` per class. Per class, detections of all
    images are ranked by score (stable for ties); each matches the gt of highest IoU in its image: IoU >= thr and
    the gt is ignored (difficult) -> neither TP nor FP; not yet covered -> TP; else FP."""
    if len(gts) != len(preds):
        raise ValueError(f"voc07_map: {len(gts)} ground-truth images but {len(preds)} predictions")
    mode = "11points" if use_07_metric else "area"
    gt_all = []
    for gt in gts:
        labels = _np(gt["labels"], np.int64).reshape(-1)
        ign = _np(gt.get("ignore"), bool).reshape(-1) if gt.get("ignore") is not None else np.zeros(len(labels), bool)
        gt_all.append((_np(gt["boxes"], np.float64).reshape(-1, 4), labels, ign))
    pr_all = [(_np(p["boxes"], np.float64).reshape(-1, 4), _np(p["scores"], np.float64).reshape(-1),
               _np(p["labels"], np.int64).reshape(-1)) for p in preds]
    per_class: list[Optional[float]] = []
    num_gts: list[int] = []
    for c in range(int(num_classes)):
        scores, tps, fps = [], [], []
        n_gt = 0
        for (gb, gl, gi), (pb, ps, pl) in zip(gt_all, pr_all):
            g_sel = gl == c
            boxes_c, ign_c = gb[g_sel], gi[g_sel]
            n_gt += int((~ign_c).sum())
            d_sel = pl == c
            det_b, det_s = pb[d_sel], ps[d_sel]
            if len(det_s) == 0:
                continue
            order = np.argsort(-det_s, kind="stable")
            det_b, det_s = det_b[order], det_s[order]
            tp, fp = np.zeros(len(det_s)), np.zeros(len(det_s))
            if len(boxes_c) == 0:
                fp[:] = 1
            else:
                ious = box_iou_np(det_b, boxes_c)
                best, arg = ious.max(1), ious.argmax(1)
                covered = np.zeros(len(boxes_c), bool)
                for k in range(len(det_s)):
                    if best[k] >= iou_thr:
                        g = arg[k]
                        if ign_c[g]:
                            continue
                        if not covered[g]:
                            covered[g] = True
                            tp[k] = 1
                        else:
                            fp[k] = 1
                    else:
                        fp[k] = 1
            scores.append(det_s)
            tps.append(tp)
            fps.append(fp)
        num_gts.append(n_gt)
        if n_gt == 0:
            per_class.append(None)
            continue
        if not scores:
            per_class.append(0.0)
            continue
        s = np.concatenate(scores)
        order = np.argsort(-s, kind="stable")
        tp = np.cumsum(np.concatenate(tps)[order])
        fp = np.cumsum(np.concatenate(fps)[order])
        eps = np.finfo(np.float32).eps
        recalls = tp / max(n_gt, eps)
        precisions = tp / np.maximum(tp + fp, eps)
        per_class.append(average_precision(recalls, precisions, mode) * 100.0)
    valid = [a for a in per_class if a is not None]
    return {"box_ap50": float(np.mean(valid)) if valid else 0.0, "per_class": per_class, "num_gts": num_gts,
            "mode": mode}


# ----------------------------------------------------------------------------------------------------------
# semantic segmentation
# ----------------------------------------------------------------------------------------------------------
class SegConfusion:
    """Confusion matrix ``mat[label, pred]`` (int64, CPU) accumulated over ``update(pred, label)`` calls; pixels
    whose label is ``ignore_index`` are left out. ``scores()``: mIoU, mAcc, aAcc in percent (mmseg's
    ``eval_metrics``: IoU = intersection / union, nanmean over classes with a non-zero union; Acc =
    intersection / label area, nanmean over classes present in the labels; aAcc = all correct / all labelled)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred, label) -> None:
        pred, label = torch.as_tensor(pred), torch.as_tensor(label)
        if pred.shape != label.shape:
            raise ValueError(f"SegConfusion.update: pred {tuple(pred.shape)} and label {tuple(label.shape)} differ")
        label = label.reshape(-1).long()
        pred = pred.reshape(-1).to(label.device).long()
        keep = label != self.ignore_index
        label, pred = label[keep], pred[keep]
        k = self.num_classes
        if label.numel() and (int(label.min()) < 0 or int(label.max()) >= k):
            raise ValueError(f"SegConfusion.update: label values outside [0, {k}) other than {self.ignore_index}")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
            raise ValueError(f"SegConfusion.update: predicted classes outside [0, {k})")
        self.mat += torch.bincount(label * k + pred, minlength=k * k).reshape(k, k).cpu()

    def merge(self, other: "SegConfusion") -> "SegConfusion":
        self.mat += other.mat
        return self

    def per_class(self) -> dict[str, list[float]]:
        m = self.mat.double()
        inter = m.diag()
        area_label, area_pred = m.sum(1), m.sum(0)
        union = area_label + area_pred - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
        acc = torch.where(area_label > 0, inter / area_label.clamp(min=1), torch.full_like(inter, float("nan")))
        return {"iou": (iou * 100).tolist(), "acc": (acc * 100).tolist()}

    def scores(self) -> dict[str, float]:
        pc = self.per_class()
        iou, acc = np.array(pc["iou"]), np.array(pc["acc"])
        total = float(self.mat.sum())
        with np.errstate(all="ignore"):
            miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
            macc = float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0
        aacc = float(self.mat.diag().sum()) / total * 100.0 if total else 0.0
        return {"miou": miou, "macc": macc, "aacc": aacc}
