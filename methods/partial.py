"""Partial-k fine-tuning: the last ``k`` transformer blocks are trained, everything before them is frozen.

As the Partial-1 baseline of VPT and of V-PETL Bench's dense code (Leiyi-Hu/mona
``partial_1``: parameter names containing the last block only), the final LayerNorm stays frozen by
default; ``final_norm: true`` also trains it. ViT-B/16, k = 1: one block = qkv 1,771,776 + proj 590,592
+ fc1 2,362,368 + fc2 2,360,064 + two LayerNorms 3,072 = 7,087,872 parameters. Merging is trivial.
"""
from methods.base import Method, register, unfreeze


@register("partial")
class Partial(Method):
    families = ("vit", "swin", "video_vit", "video_swin")
    mergeable = True

    def inject(self, model, sites):
        k = int(self.get("k", 1))
        depth = len(sites)
        if not 1 <= k <= depth:
            raise ValueError(f"partial: method.k={k} must be between 1 and the backbone depth {depth}")
        for b in sites.blocks[depth - k:]:
            unfreeze(b.block.parameters())
        if bool(self.get("final_norm", False)):
            unfreeze(sites.final_norm.parameters())
