"""LN-Tune: train only the LayerNorm weights and biases of the backbone (plus the head).

V-PETL Bench's ``lntune`` (train script filter ``'norm' in name``) on ViT-B/16: norm1 and norm2 of the
12 blocks and the final norm, 24·1,536 + 1,536 = 38,400 parameters (50 tensors). We select modules by
type (``nn.LayerNorm`` and subclasses such as timm's ``LayerNorm2d``) rather than by name, which gives
the same set on ViT and does not catch unrelated names containing "norm". Merging is trivial (the
tuned tensors are backbone tensors), so ``merge`` is a no-op.
"""
from torch import nn

from methods.base import Method, register, unfreeze


@register("ln_tune")
class LNTune(Method):
    families = ("vit", "swin", "convnext", "video_vit", "video_swin")
    mergeable = True

    def inject(self, model, sites):
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and m.elementwise_affine]
        if not norms:
            raise ValueError("ln_tune: the backbone has no affine LayerNorm to tune")
        for m in norms:
            unfreeze(m.parameters())
