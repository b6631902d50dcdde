"""U-Tuning (Jiang et al., "Rethinking Efficient Tuning Methods from a Unified Perspective", 2023),
**reconstructed**: no official code is public and the paper body could not be read, so the tuner set
follows the paper's unified formula x' = OP(x) + U(x) with tuners on both frozen operations (specs
image_extra.md §3), sized to V-PETL Bench's 0.36M:

* MHA tuner, a parallel prefix: U_MHA(h) = Concat_h[softmax(q_h P_k,hᵀ/√d) P_v,h]·W_projᵀ, with q from
  the frozen W_q on h = LN1(x) and the frozen projection weight (no extra bias). Unlike prefix tuning,
  no gate λ: the prefix attention is normalised over the prefixes alone and added to the frozen attention.
* FFN tuner, a parallel adapter on h = LN2(x): s·(W_up GELU(W_down h + b_d) + b_u), W_down
  kaiming-uniform(a=√5), W_up = 0, s = 1.
* Both tuner outputs are added to the residual stream beside the frozen branch, outside its drop-path
  (the ``*_parallel`` extension points, as AdaptFormer's parallel adapter); the reconstruction in the
  specs writes them inside — a drop-path placement detail the paper does not pin down.

Count: 12·(2·L·768) + 12·(768r + r + 768r + 768); L = 10, r = 9 gives 184,320 + 175,212 = 359,532
(≈0.36M). Not equal to the frozen model at step 0 (the prefix branch is non-zero); not mergeable.
"""
from methods.base import Method, register
from methods.blocks.adapter import Bottleneck, ParallelAdapter
from methods.blocks.prefix import ParallelPrefix
from methods.prefix import prefix_table


@register("u_tuning")
class UTuning(Method):
    families = ("vit", "video_vit")

    def inject(self, model, sites):
        tuners = list(self.get("tuners", ["mha", "ffn"]))
        bad = [t for t in tuners if t not in ("mha", "ffn")]
        if bad or not tuners:
            raise ValueError(f"u_tuning: method.tuners={tuners} must be a non-empty subset of [mha, ffn]")
        hidden, scale = int(self.get("bottleneck", 9)), float(self.get("scale", 1.0))
        for b in sites:
            attn, dev = b.block.attn, b.norm1.weight.device
            if "mha" in tuners:
                b.extend("attn_parallel", ParallelPrefix(attn, prefix_table(self, attn.num_heads * attn.head_dim, dev, 10)))
            if "ffn" in tuners:
                f = Bottleneck(b.dim, hidden, act=self.get("act", "gelu"), scale=scale,
                               dropout=float(self.get("dropout", 0.0)), device=dev)
                b.extend("mlp_parallel", ParallelAdapter(f, source="normed"))
