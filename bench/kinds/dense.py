"""Dense prediction kinds: ``detection`` (boxes, optionally instance masks) and ``segmentation`` (per pixel).

Both build their model as a Swin-Det backbone (``backbones.swin_det``) with the dataset's ``decoder`` as its
head (``backbones.dense``): the decoder is trainable for every method and is the "head" of the parameter
report, so ``trainable_params`` counts backbone parameters only, as the anchors' "Params" column.

* ``detection``: batches are (list of images [3,H,W] in [0,1], list of targets); the loss is the sum of the
  detector's loss dict; ignored objects (COCO crowd, VOC difficult) are not trained on. Evaluation collects
  the detections of the split and scores them with the dataset's ``evaluator``: ``coco`` (pycocotools box AP,
  and mask AP when the task has masks; primary ``box_ap``) or ``voc07`` (mAP@0.5, 11-point; ``box_ap50``).
* ``segmentation``: batches are (images [B,3,H,W] normalised and padded, list of targets with ``mask``);
  loss = CE(ignore 255) + 0.4 · CE(auxiliary head); evaluation: logits cropped to each image's own size,
  resized to its label map, arg-max, one confusion matrix over the split → ``miou`` (+ ``macc``, ``aacc``).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.kinds.base import TaskKind, register


def _move(t: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}


class DenseKind(TaskKind):
    families = ("swin",)

    def build_model(self, cfg, device):
        """Swin-Det backbone + the dataset's decoder as ``head`` (the dataset's ``decoder`` block)."""
        from backbones.dense import build_decoder
        from backbones.swin_det import build_swin_det, frozen_patch_embed

        dec = cfg.dataset.decoder
        model = build_swin_det(cfg.backbone, out_indices=dec.get("out_indices"),
                               drop_path=float(cfg.train.get("drop_path", 0.0)), device=device)
        with torch.device(device):
            model.head = build_decoder(dec, model.out_channels, int(cfg.dataset.num_classes), list(cfg.backbone.mean),
                                       list(cfg.backbone.std))
        if bool(dec.get("frozen_patch_embed", False)):
            model.petl_after_apply = frozen_patch_embed
        return model

    def loss_fn(self, train_cfg) -> Callable:
        return lambda out, target: out  # the decoder computes its own losses

    def batch_size(self, batch) -> int:
        return len(batch[1])


class Detection(DenseKind):
    name = "detection"
    metric = "box_ap"
    metrics = ("box_ap", "box_ap50", "box_ap75", "box_ap_s", "box_ap_m", "box_ap_l",
               "mask_ap", "mask_ap50", "mask_ap75", "mask_ap_s", "mask_ap_m", "mask_ap_l")
    evaluator = "coco"
    masks = False
    num_classes: Optional[int] = None

    def for_task(self, task) -> "Detection":
        k = copy.copy(self)
        info = task.info or {}
        k.evaluator = str(info.get("evaluator", "coco"))
        k.masks = bool(info.get("masks", False))
        k.num_classes = task.num_classes
        if k.evaluator == "voc07":
            k.metric, k.metrics = "box_ap50", ("box_ap50",)
        elif not k.masks:
            k.metrics = tuple(m for m in self.metrics if m.startswith("box_"))
        return k

    def protocol(self, task) -> dict:
        return {"evaluator": (task.info or {}).get("evaluator", "coco")}

    def to_device(self, batch, device):
        images, targets = batch
        return [x.to(device, non_blocking=True) for x in images], [_move(t, device) for t in targets]

    @staticmethod
    def train_targets(targets: list[dict], masks: bool) -> list[dict]:
        out = []
        for t in targets:
            keep = ~t["ignore"] if "ignore" in t else torch.ones(len(t["labels"]), dtype=torch.bool)
            d = {"boxes": t["boxes"][keep].float(), "labels": t["labels"][keep].long()}
            if masks and "masks" in t:
                d["masks"] = t["masks"][keep]
            out.append(d)
        return out

    def train_loss(self, model: nn.Module, batch, loss_fn: Callable, method=None) -> torch.Tensor:
        images, targets = batch
        losses = model(images, self.train_targets(targets, self.masks))
        loss = sum(losses.values())
        return method.training_loss(model, images, targets, losses, loss) if method is not None else loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device,
                 autocast: Optional[Callable] = None, max_batch: Optional[int] = None) -> dict[str, Any]:
        from bench import dense_metrics

        model.eval()
        gts, preds = [], []
        for batch in loader:
            images, targets = self.to_device(batch, device)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                out = model(images)
            for t, o in zip(targets, out):
                gts.append({k: v.cpu() if torch.is_tensor(v) else v for k, v in t.items()})
                p = {"boxes": o["boxes"].float().cpu(), "scores": o["scores"].float().cpu(), "labels": o["labels"].cpu()}
                if self.masks and "masks" in o:
                    p["masks"] = (o["masks"][:, 0] > 0.5).to(torch.uint8).cpu()
                preds.append(p)
        if self.evaluator == "voc07":
            res = dense_metrics.voc07_map(gts, preds, int(self.num_classes))
            scores = {"box_ap50": res["box_ap50"]}
        else:
            scores = dense_metrics.coco_eval(gts, preds, ("bbox", "segm") if self.masks else ("bbox",),
                                             num_classes=self.num_classes)
        return {**scores, "n": len(gts), "views": 1}


class Segmentation(DenseKind):
    name = "segmentation"
    metric = "miou"
    metrics = ("miou", "macc", "aacc")
    num_classes: Optional[int] = None
    aux_weight = 0.4

    def for_task(self, task) -> "Segmentation":
        k = copy.copy(self)
        k.num_classes = task.num_classes
        k.ignore_index = int((task.info or {}).get("ignore_index", 255))
        return k

    ignore_index = 255

    def to_device(self, batch, device):
        images, targets = batch
        return images.to(device, non_blocking=True), [_move(t, device) for t in targets]

    def _labels(self, targets, shape) -> torch.Tensor:
        out = torch.full((len(targets), *shape), self.ignore_index, dtype=torch.long, device=targets[0]["mask"].device)
        for i, t in enumerate(targets):
            m = t["mask"]
            out[i, : m.shape[-2], : m.shape[-1]] = m
        return out

    def train_loss(self, model: nn.Module, batch, loss_fn: Callable, method=None) -> torch.Tensor:
        images, targets = batch
        out = model(images)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        y = self._labels(targets, images.shape[-2:])
        loss = F.cross_entropy(logits.float(), y, ignore_index=self.ignore_index)
        if aux is not None:
            loss = loss + self.aux_weight * F.cross_entropy(aux.float(), y, ignore_index=self.ignore_index)
        return method.training_loss(model, images, y, logits, loss) if method is not None else loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device,
                 autocast: Optional[Callable] = None, max_batch: Optional[int] = None) -> dict[str, Any]:
        from bench.dense_metrics import SegConfusion

        model.eval()
        conf, n = SegConfusion(int(self.num_classes), self.ignore_index), 0
        for batch in loader:
            images, targets = self.to_device(batch, device)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                logits = model(images)
            for i, t in enumerate(targets):
                h, w = t.get("size", images.shape[-2:])
                lg = logits[i: i + 1, :, :h, :w].float()
                if lg.shape[-2:] != t["mask"].shape[-2:]:
                    lg = F.interpolate(lg, size=t["mask"].shape[-2:], mode="bilinear", align_corners=False)
                conf.update(lg.argmax(1)[0].cpu(), t["mask"].cpu())
                n += 1
        return {**conf.scores(), "n": n, "views": 1}


register(Detection())
register(Segmentation())
