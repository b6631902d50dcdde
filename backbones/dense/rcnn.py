"""Cascade Mask R-CNN (the anchors' COCO detector) and Mask R-CNN, on torchvision's R-CNN parts.

torchvision has Mask R-CNN but no cascade; ``CascadeRoIHeads`` adds it with torchvision's matcher, sampler,
box coder, RoI pooling and mask loss, following mmdet 2.11's ``CascadeRoIHead`` as the Swin configs set it:

* 3 stages, IoU thresholds 0.5 / 0.6 / 0.7 (positive = negative threshold), 512 RoIs per image at 25 %
  positives with the ground-truth boxes added, stage loss weights 1 / 0.5 / 0.25;
* box head "4conv1fc": four 3×3 convs (256, BatchNorm, ReLU) + one FC 1024; class-specific regression with
  target stds (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067) (box-coder weights
  are their inverses); cross-entropy + GIoU on the decoded boxes × 10, averaged over the sampled RoIs;
* each stage refines its RoIs for the next one (assigned class, or the predicted class for negatives),
  detached, ground-truth copies removed;
* one mask head per stage (4 convs + deconv, 28×28, binary CE on the positives);
* test: logits averaged over the stages, boxes from the last stage's regression, score 0.05, NMS 0.5,
  100 detections; mask probabilities averaged over the three mask heads.

``mask_rcnn`` is the same with one stage (IoU 0.5, the first stds). RPN: anchors 32-512 (mmdet scale 8 on
strides 4-64), ratios 0.5/1/2, IoU 0.7/0.3, 256 samples at 50 %, 2000 proposals for training, 1000 for test,
NMS 0.7. Known differences from mmcv (documented in the README): torchvision's ``MultiScaleRoIAlign`` uses
sampling ratio 2 and ``aligned=False`` (mmcv: adaptive, aligned); the FPN init is kaiming-uniform (mmdet:
xavier); SyncBN is plain BatchNorm on one process.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops, generalized_box_iou_loss

from backbones.dense import register
from backbones.dense.fpn import FeatureSlot, min_sizes

CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
CASCADE_WEIGHTS = (1.0, 0.5, 0.25)


class CascadeRoIHeads(nn.Module):
    def __init__(self, num_classes: int, channels: int, levels: list[str], stages: int = 3, masks: bool = True,
                 giou_weight: float = 10.0, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections: int = 100, rois_per_image: int = 512, positive_fraction: float = 0.25,
                 head_channels: int = 256, fc_channels: int = 1024, mask_channels: int = 256):
        super().__init__()
        box_pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2) if masks else None
        self.stages = nn.ModuleList()
        for iou, std in zip(CASCADE_IOUS[:stages], CASCADE_STDS[:stages]):
            head = FastRCNNConvFCHead((channels, 7, 7), [head_channels] * 4, [fc_channels], norm_layer=nn.BatchNorm2d)
            self.stages.append(RoIHeads(
                box_pool, head, FastRCNNPredictor(fc_channels, num_classes + 1), iou, iou, rois_per_image,
                positive_fraction, tuple(1.0 / s for s in std), score_thresh, nms_thresh, detections,
                mask_roi_pool=mask_pool,
                mask_head=MaskRCNNHeads(channels, [mask_channels] * 4, 1) if masks else None,
                mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1) if masks else None))
        self.weights = CASCADE_WEIGHTS[:stages]
        self.giou_weight = giou_weight
        self.masks = masks

    # -- training ------------------------------------------------------------------------------------------
    @staticmethod
    def _sample(st: RoIHeads, proposals, targets):
        gt_boxes = [t["boxes"] for t in targets]
        props = [torch.cat([p, g]) for p, g in zip(proposals, gt_boxes)]
        is_gt = [torch.cat([torch.zeros(len(p), dtype=torch.bool, device=p.device),
                            torch.ones(len(g), dtype=torch.bool, device=p.device)]) for p, g in zip(proposals, gt_boxes)]
        matched, labels = st.assign_targets_to_proposals(props, gt_boxes, [t["labels"] for t in targets])
        keep = st.subsample(labels)
        out = []
        for i, k in enumerate(keep):
            g = gt_boxes[i]
            mg = g[matched[i][k]] if len(g) else torch.zeros((len(k), 4), device=props[i].device)
            out.append((props[i][k], matched[i][k], labels[i][k], mg, is_gt[i][k]))
        return [list(x) for x in zip(*out)]

    def _stage(self, st: RoIHeads, features, rois, image_shapes):
        feats = st.box_head(st.box_roi_pool(features, rois, image_shapes))
        return st.box_predictor(feats)

    @staticmethod
    def _refine(st: RoIHeads, deltas, rois, cls, image_shapes):
        flat = torch.cat(rois)
        d = deltas.reshape(flat.shape[0], -1, 4)[torch.arange(flat.shape[0], device=flat.device), cls]
        boxes = st.box_coder.decode_single(d, flat).detach()
        out = list(boxes.split([len(r) for r in rois]))
        return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(out, image_shapes)]

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _losses(self, features, proposals, image_shapes, targets):
        losses, props = {}, proposals
        for t, (st, w) in enumerate(zip(self.stages, self.weights)):
            rois, matched, labels, gt_boxes, is_gt = self._sample(st, props, targets)
            logits, deltas = self._stage(st, features, rois, image_shapes)
            lab, n = torch.cat(labels), max(1, sum(len(r) for r in rois))
            losses[f"s{t}_cls"] = w * F.cross_entropy(logits, lab)
            pos = torch.where(lab > 0)[0]
            d = deltas.reshape(lab.shape[0], -1, 4)[pos, lab[pos]]
            pred = st.box_coder.decode_single(d, torch.cat(rois)[pos])
            losses[f"s{t}_giou"] = w * self.giou_weight * generalized_box_iou_loss(
                pred, torch.cat(gt_boxes)[pos], reduction="sum") / n
            if self.masks:
                pos_rois = [r[lb > 0] for r, lb in zip(rois, labels)]
                pos_match = [m[lb > 0] for m, lb in zip(matched, labels)]
                mf = st.mask_head(st.mask_roi_pool(features, pos_rois, image_shapes))
                logits_m = st.mask_predictor(mf)
                if sum(len(r) for r in pos_rois):
                    losses[f"s{t}_mask"] = w * maskrcnn_loss(logits_m, pos_rois, [x["masks"] for x in targets],
                                                             [x["labels"] for x in targets], pos_match)
                else:
                    losses[f"s{t}_mask"] = logits_m.sum() * 0.0
            if t + 1 < len(self.stages):
                cls = torch.where(lab > 0, lab, logits[:, 1:].argmax(1) + 1)
                refined = self._refine(st, deltas, rois, cls, image_shapes)
                props = [r[~g] for r, g in zip(refined, is_gt)]
        return losses

    @torch.no_grad()
    def _detect(self, features, proposals, image_shapes):
        props, all_logits = proposals, []
        for t, st in enumerate(self.stages):
            logits, deltas = self._stage(st, features, props, image_shapes)
            all_logits.append(logits)
            if t + 1 < len(self.stages):
                props = self._refine(st, deltas, props, logits[:, 1:].argmax(1) + 1, image_shapes)
        last = self.stages[-1]
        boxes, scores, labels = last.postprocess_detections(torch.stack(all_logits).mean(0), deltas, props, image_shapes)
        result = [{"boxes": b, "scores": s, "labels": lb} for b, s, lb in zip(boxes, scores, labels)]
        if self.masks:
            mf = last.mask_roi_pool(features, boxes, image_shapes)
            n = sum(len(b) for b in boxes)
            if n:
                probs = torch.stack([st.mask_predictor(st.mask_head(mf)).sigmoid() for st in self.stages]).mean(0)
                lab = torch.cat(labels)
                probs = probs[torch.arange(n, device=lab.device), lab][:, None]
            else:
                probs = mf.new_zeros((0, 1, 28, 28))
            for r, p in zip(result, probs.split([len(b) for b in boxes])):
                r["masks"] = p
        return result


class RCNNDecoder(nn.Module):
    """torchvision ``GeneralizedRCNN`` (transform, RPN, RoI heads) over ``FeatureSlot``; task labels are
    0-based, the R-CNN's are 1-based (0 = background): shifted on the way in and out."""

    def __init__(self, detector: GeneralizedRCNN):
        super().__init__()
        self.detector = detector

    def forward(self, images, targets, features):
        if targets is not None:
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        with self.detector.backbone.using(features):
            out = self.detector(images, targets)
        if isinstance(out, list):
            for r in out:
                r["labels"] = r["labels"] - 1
        return out


def _build(cfg, in_channels, num_classes, mean, std, stages: int) -> nn.Module:
    ch = int(cfg.get("fpn_channels", 256))
    slot = FeatureSlot(in_channels, ch, extra=str(cfg.get("fpn_extra", "maxpool")))
    names = [str(i) for i in range(len(in_channels))]
    levels = len(in_channels) + (1 if cfg.get("fpn_extra", "maxpool") == "maxpool" else 0)
    base = float(cfg.get("anchor_base", 32))
    anchors = AnchorGenerator(tuple((base * 2 ** i,) for i in range(levels)), ((0.5, 1.0, 2.0),) * levels)
    rpn = RegionProposalNetwork(
        anchors, RPNHead(ch, 3), 0.7, 0.3, 256, 0.5,
        pre_nms_top_n=dict(training=int(cfg.get("rpn_train", 2000)), testing=int(cfg.get("rpn_test", 1000))),
        post_nms_top_n=dict(training=int(cfg.get("rpn_train", 2000)), testing=int(cfg.get("rpn_test", 1000))),
        nms_thresh=0.7)
    heads = CascadeRoIHeads(num_classes, ch, names, stages=stages, masks=bool(cfg.get("masks", True)),
                            score_thresh=float(cfg.get("score_thresh", 0.05)),
                            nms_thresh=float(cfg.get("nms_thresh", 0.5)), detections=int(cfg.get("detections", 100)),
                            rois_per_image=int(cfg.get("rois_per_image", 512)),
                            head_channels=int(cfg.get("head_channels", 256)), fc_channels=int(cfg.get("fc_channels", 1024)),
                            mask_channels=int(cfg.get("mask_channels", 256)))
    transform = GeneralizedRCNNTransform(min_sizes(cfg, 800), int(cfg.get("max_size", 1333)), mean, std,
                                         size_divisible=int(cfg.get("size_divisible", 32)))
    return RCNNDecoder(GeneralizedRCNN(slot, rpn, heads, transform))


@register("cascade_mask_rcnn")
def build_cascade(cfg, in_channels, num_classes, mean, std) -> nn.Module:
    return _build(cfg, in_channels, num_classes, mean, std, stages=3)


@register("mask_rcnn")
def build_mask_rcnn(cfg, in_channels, num_classes, mean, std) -> nn.Module:
    return _build(cfg, in_channels, num_classes, mean, std, stages=1)
