"""Adapter (sequential bottleneck after the MLP), as V-PETL Bench's Adapter baseline.

Per block: z = mlp(norm2(x)); z ← z + up(GELU(down(z))); x ← x + drop_path(z). Bottleneck 8 with
biases: 13,064 per block, 156,768 on ViT-B/16. The up-projection is zero-initialised (the declared
init of the anchor, which its timm re-init overwrites; see the specs), so the model equals the frozen
one at step 0 while the down-projection keeps a non-zero init and both receive gradients.

Families: ViT, Swin (the same place in every block; the bottleneck input is the block's own width) and
ConvNeXt. ConvNeXt has no official Adapter code (SNELL's paper reports "SPT-Adapter" on ConvNeXt-B, SPT's
ConvNeXt code was never released), so we put it at the equivalent place: on the block MLP's output (fc2),
before the layer scale γ and drop-path, i.e. z ← z + up(GELU(down(z))); x ← x + drop_path(γ·z).
"""
from methods.base import Method, register
from methods.blocks import Bottleneck, SequentialAdapter


@register("adapter")
class Adapter(Method):
    families = ("vit", "swin", "convnext", "video_vit", "video_swin")
    identity_at_init = True

    def inject(self, model, sites):
        hidden, act = int(self.get("bottleneck", 8)), self.get("act", "gelu")
        scale, dropout = float(self.get("scale", 1.0)), float(self.get("dropout", 0.0))
        for b in sites:
            dev = b.norm2.weight.device
            f = Bottleneck(b.dim, hidden, act=act, scale=scale, dropout=dropout, device=dev)
            b.extend("mlp_after", SequentialAdapter(f))
