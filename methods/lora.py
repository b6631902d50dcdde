"""LoRA (Hu et al., 2022) on the query and value projections of every block.

ΔW = (α/r)·B A with A kaiming-uniform(a=√5), B = 0 (the LoRA paper/loralib init, so the model equals
the frozen one at step 0); rank 8, α = r (scale 1, as V-PETL Bench's unscaled LoRA). ViT-B/16, q and
v: 4·768·8·12 = 294,912 parameters. V-PETL Bench's code re-initialises A and B with trunc-normal
(its declared init is dead code, see the specs); we keep the paper's init. ``merge`` folds ΔW into
``qkv.weight``.

Families: ViT and Swin (Swin's fused window-attention qkv is split the same way: q and v slices of each
block's own width; Swin-B: 4·8·(2·128 + 2·256 + 18·512 + 2·1024) = 385,024). Not defined on ConvNeXt,
which has no attention (SPT-LoRA's ConvNeXt variant targets the MLP linears, a different method).
"""
from methods.base import Method, register
from methods.blocks import DeltaLinear, LowRank, qkv_slices


@register("lora")
class LoRA(Method):
    families = ("vit", "swin", "video_vit", "video_swin")
    mergeable = True
    identity_at_init = True

    def inject(self, model, sites):
        rank, targets = int(self.get("rank", 8)), list(self.get("targets", ["q", "v"]))
        alpha, dropout = self.get("alpha"), float(self.get("dropout", 0.0))
        for b in sites:
            qkv = b.linear("qkv")
            slices = qkv_slices(b.dim, targets)
            deltas = {t: LowRank(b.dim, b.dim, rank, alpha, dropout, device=qkv.weight.device) for t in targets}
            b.set_linear("qkv", DeltaLinear(qkv, deltas, slices))
