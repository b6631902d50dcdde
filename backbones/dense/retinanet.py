"""RetinaNet (VOC recipe of the anchors: mmdet 2.11 ``retinanet_swin``) on torchvision's implementation.

FPN 256 over the backbone outputs (VOC: C3-C5) with P6 from C5 and P7 from P6 (mmdet ``add_extra_convs=
'on_input'``); anchors octave base 4 × 3 scales per octave, ratios 0.5/1/2 on strides 8-128 (torchvision's
default 32-512 × 2^{0,1/3,2/3}); matcher IoU ≥ 0.5 positive, < 0.4 negative, low-quality matches kept; sigmoid
focal loss (α 0.25, γ 2) and L1 box loss; test: score 0.05, NMS 0.5, top 1000 before NMS, 100 detections.
Sizes (``min_size``/``max_size``) are the recipe's resize (VOC: 600/1000); training may pass several
``min_size`` values (multi-scale).
"""
from __future__ import annotations

from torch import nn
from functools import partial

from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.anchor_utils import AnchorGenerator

from backbones.dense import register
from backbones.dense.fpn import FeatureSlot, min_sizes


def anchor_sizes(cfg, levels: int, scales_per_octave: int = 3):
    base = float(cfg.get("anchor_base", 32))
    return tuple(tuple(base * 2 ** lvl * 2 ** (s / scales_per_octave) for s in range(scales_per_octave))
                 for lvl in range(levels))


class DetectorDecoder(nn.Module):
    """A torchvision detector whose backbone slot reads the SwinDet features (see ``fpn.FeatureSlot``)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images, targets, features):
        with self.detector.backbone.using(features):
            return self.detector(images, targets)


@register("retinanet")
def build_retinanet(cfg, in_channels, num_classes, mean, std) -> nn.Module:
    slot = FeatureSlot(in_channels, int(cfg.get("fpn_channels", 256)), extra=str(cfg.get("fpn_extra", "p6p7")))
    levels = len(in_channels) + (2 if cfg.get("fpn_extra", "p6p7") == "p6p7" else 0)
    sizes = anchor_sizes(cfg, levels)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * levels)
    head = None  # torchvision's head (the anchors': no norm); head_norm: gn = GroupNorm(8) (RetinaNet v2's head)
    if cfg.get("head_norm"):
        if str(cfg.head_norm) != "gn":
            raise ValueError(f"retinanet decoder head_norm {cfg.head_norm!r}: only 'gn' (or null)")
        c = int(cfg.get("fpn_channels", 256))
        head = RetinaNetHead(c, anchors.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, min(32, c // 2)))
    det = RetinaNet(slot, head=head, num_classes=num_classes, min_size=min_sizes(cfg, 600), max_size=int(cfg.get("max_size", 1000)), image_mean=mean, image_std=std, anchor_generator=anchors,
        score_thresh=float(cfg.get("score_thresh", 0.05)), nms_thresh=float(cfg.get("nms_thresh", 0.5)),
        detections_per_img=int(cfg.get("detections", 100)), topk_candidates=int(cfg.get("topk", 1000)),
        fg_iou_thresh=0.5, bg_iou_thresh=0.4)
    det.transform.size_divisible = int(cfg.get("size_divisible", 32))
    return DetectorDecoder(det)
