"""BitFit (Ben Zaken et al., 2022): train every backbone tensor whose name contains ``bias``, V-PETL Bench's
substring filter ``'bias' in name``: every bias (LayerNorm biases included) and, on Swin-type backbones, the
``relative_position_bias_table``s too (V-PETL's Swin counts are only reproduced that way: Video Swin-B
1,090,376, 137,216 without the tables). ViT-B/16: 102,912 (no tables). Merging is trivial (biases are
backbone tensors), so ``merge`` is a no-op."""
from methods.base import Method, register, unfreeze


@register("bitfit")
class BitFit(Method):
    families = ("vit", "swin", "convnext", "video_vit", "video_swin")
    mergeable = True

    def inject(self, model, sites):
        unfreeze(p for n, p in model.named_parameters() if "bias" in n.rsplit(".", 1)[-1])
