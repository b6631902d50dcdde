"""AdaptFormer (Chen et al., NeurIPS 2022; official code ShoufaChen/AdaptFormer ``models/adapter.py``).

A bottleneck in parallel with every block's MLP: a = s·up(drop(ReLU(down(x)))) on the residual-stream
input x of the MLP branch (what LN2 sees, not LN2's output); x ← x + DP(mlp(LN2(x))) + a (the adapter
is outside the drop-path). Official defaults, kept here: scale s = 0.1 (fixed),
``adapter_layernorm_option='none'``, dropout 0.1, init 'lora': down kaiming-uniform(a=√5), up = 0,
biases 0 — so the model equals the frozen one at step 0. Bottleneck 8 as V-PETL Bench (the official image
scripts pass ``--ffn_num 64``; set ``bottleneck: 64`` for that). ViT-B/16: 12·(6,152 + 6,912) = 156,768.

``layernorm: in`` adds the official optional input LayerNorm (eps 1e-5, trainable) → 175,200, which
is what V-PETL Bench's AdaptFormer trains (it also uses scale 1.0 and, because timm re-initialises
every Linear, a non-zero up-projection; its README's 0.16M is the count without the LayerNorm).
"""
from methods.base import Method, register
from methods.blocks.adapter import Bottleneck, ParallelAdapter


@register("adaptformer")
class AdaptFormer(Method):
    families = ("vit", "swin")  # the authors' code also adapts Swin (video); ConvNeXt has no MLP branch of this form
    identity_at_init = True

    def inject(self, model, sites):
        ln = self.get("layernorm", "none")
        if ln not in ("none", "in"):
            raise ValueError(f"adaptformer: method.layernorm='{ln}' must be none or in")
        hidden, scale = int(self.get("bottleneck", 8)), float(self.get("scale", 0.1))
        for b in sites:
            f = Bottleneck(b.dim, hidden, act=self.get("act", "relu"), scale=scale,
                           layernorm="in" if ln == "in" else None, dropout=float(self.get("dropout", 0.1)),
                           device=b.norm2.weight.device)
            b.extend("mlp_parallel", ParallelAdapter(f, source="residual"))
