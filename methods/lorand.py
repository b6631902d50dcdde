"""LoRand (Yin et al., CVPR 2023): two low-rank-synthesised adapters per Swin block at Houlsby's positions
(on the attention output and on the MLP output, before each drop-path and residual add), each
z + f(z) with ``methods.blocks.lorand.LoRandBottleneck`` (α = 2 branches, kernel β = 8, bottleneck m = C/2).

Swin-B 1,197,312 = the paper's 1.20 M; Swin-L 1,792,896 by the same formula (the anchors' README prints
1.31 M for LoRand Swin-L and 1.79 M for E3VA Swin-L: recorded, not matched; spec video_dense.md §B3). The
paper released no code; the structure is the paper's and a count-matching reconstruction.
"""
from methods.base import Method, register
from methods.blocks.lorand import LoRandBottleneck


@register("lorand")
class LoRand(Method):
    families = ("vit", "swin")

    def inject(self, model, sites):
        a, k, ratio = int(self.get("branches", 2)), int(self.get("kernel", 8)), float(self.get("mid_ratio", 0.5))
        for b in sites:
            dev = b.norm2.weight.device
            for pos in ("attn", "mlp"):
                b.extend(f"{pos}_after", LoRandBottleneck(b.dim, max(1, int(b.dim * ratio)), a, k, device=dev))
