"""AdaptFormer (Chen et al., NeurIPS 2022; dense flavour of Leiyi-Hu/mona at the end of this docstring; official code ShoufaChen/AdaptFormer ``models/adapter.py``).

A bottleneck in parallel with every block's MLP: a = s·up(drop(ReLU(down(x)))) on the residual-stream
input x of the MLP branch (what LN2 sees, not LN2's output); x ← x + DP(mlp(LN2(x))) + a (the adapter
is outside the drop-path). Official defaults, kept here: scale s = 0.1 (fixed),
``adapter_layernorm_option='none'``, dropout 0.1, init 'lora': down kaiming-uniform(a=√5), up = 0,
biases 0 — so the model equals the frozen one at step 0. Bottleneck 8 as V-PETL Bench (the official image
scripts pass ``--ffn_num 64``; set ``bottleneck: 64`` for that). ViT-B/16: 12·(6,152 + 6,912) = 156,768.

Video (AdaptFormer's ``vit_video.py`` and V-PETL's Video-Swin ``Mlp``): on ``video_vit`` the adapter is the
image one (residual-stream input, outside the drop-path); on ``video_swin`` it lives inside the MLP module as
V-PETL writes it: input LN2(x), added to the MLP output before the block's drop-path (``mlp_inner``).
The video backbones set the official video defaults through ``backbone.method_defaults.adaptformer``:
bottleneck 64 (ViT-B 12·99,136 = 1,189,632; Video Swin-B Σ(129·C + 64) = 1,553,664) and, on Video Swin,
dropout 0 (V-PETL's ``--drop``).

``layernorm: in`` adds the official optional input LayerNorm (eps 1e-5, trainable) → 175,200, which
is what V-PETL Bench's AdaptFormer trains (it also uses scale 1.0 and, because timm re-initialises
every Linear, a non-zero up-projection; its README's 0.16M is the count without the LayerNorm).

Dense (the dense datasets' ``method_defaults``; Leiyi-Hu/mona ``swin_transformer_adaptformer``): one adapter per
block parallel to the FFN on the residual stream before LN2, outside the drop-path, bottleneck 64, GELU,
dropout 0.1, scale 0.1, trunc-normal up-projection (``init: trunc_normal``): Swin-B 1,553,664, Swin-L 2,329,728.
The anchors' README prints 3.11/4.66 M, the count of two such modules per block (the Adapter's); we follow
the code.
"""
from methods.base import Method, register
from methods.blocks.adapter import Bottleneck, ParallelAdapter


def inject_adaptformer(method: Method, sites) -> None:
    """One AdaptFormer bottleneck per block (shared with BAPAT); placement per family, see the module doc."""
    ln = method.get("layernorm", "none")
    if ln not in ("none", "in"):
        raise ValueError(f"{method.name}: method.layernorm='{ln}' must be none or in")
    hidden, scale = int(method.get("bottleneck", 8)), float(method.get("scale", 0.1))
    inside = sites.family == "video_swin"
    for b in sites:
        f = Bottleneck(b.dim, hidden, act=method.get("act", "relu"), scale=scale,
                       layernorm="in" if ln == "in" else None, dropout=float(method.get("dropout", 0.1)),
                       init=method.get("init", "zero"), device=b.norm2.weight.device)
        b.extend("mlp_inner" if inside else "mlp_parallel", ParallelAdapter(f, source="normed" if inside else "residual"))


@register("adaptformer")
class AdaptFormer(Method):
    # the authors' code also adapts Swin (video); ConvNeXt has no MLP branch of this form
    families = ("vit", "swin", "video_vit", "video_swin")
    identity_at_init = True

    def inject(self, model, sites):
        self.identity_at_init = self.get("init", "zero") == "zero"
        inject_adaptformer(self, sites)
