"""Prefix tuning, visual variant (Li & Liang 2021 applied to ViT self-attention).

No official image code exists (V-PETL Bench ships only a broken video-Swin prefix file), so this is a
reconstruction, documented in the specs (image_extra.md §2): every block's attention gets L learnable
key and L learnable value vectors prepended to its keys and values (``PrefixAttention``); queries and
the output length are unchanged, no position embedding and no mask on the prefixes.

Parameter count: with the direct parameterisation (default, ``reparam: none``) the trainable tensors
are P_k, P_v ∈ R^{L×d} per layer: 12 layers × 2 (k, v) × L × 768 = 18,432·L, i.e. **368,640 at
L = 20** (V-PETL Bench's ``att_preseqlen`` default 20; its "0.36M" is this number truncated).
``reparam: mlp`` trains Li & Liang's re-parameterisation instead (embedding L×d → Linear(d→m) → tanh
→ Linear(m→2d), m = ``mid_dim`` = 64 as V-PETL's ``att_mid_dim``): 12·(20·768 + 49,216 + 99,840) =
1,972,992 trainable parameters at L = 20; the MLP only exists for training — its output depends on
parameters alone, so at inference the prefixes can be cached and the stored adapter is again 368,640.
Video Swin (V-PETL's video prefix file, whose shapes cannot run as written; spec video_dense §A3): per
attention layer the table is shared by every window, the prefix logits get no relative-position bias and are
never masked (``backbones.video_swin.AdaptableWindowAttention3d``); ``video_swin_b`` defaults to the
re-parameterised form with L = 16, m = 128 (Σ over blocks of L·C + C·m + m + 2mC + 2C = 4,839,936; the
README's 6.37M fits no natural setting [unverified]). On ``video_vit`` it is the image form.
Init (direct): N(0, 0.02²) (``init: xavier`` gives U(±√(6/(L+d)))). The model is not equal to the
frozen one at step 0 (prefixes take attention mass); not mergeable.
"""
from methods.base import Method, register
from methods.blocks.prefix import PrefixAttention, PrefixTable


def prefix_table(method: Method, dim: int, device, default_num: int) -> PrefixTable:
    return PrefixTable(int(method.get("num_prefix", default_num)), dim, str(method.get("reparam", "none")),
                       str(method.get("init", "normal")), float(method.get("std", 0.02)),
                       int(method.get("mid_dim", 64)), device=device)


@register("prefix")
class Prefix(Method):
    families = ("vit", "video_vit", "video_swin")

    def inject(self, model, sites):
        if sites.family == "video_swin":  # window attention: prefixes shared by every window of the layer
            for b in sites:
                b.block.attn.kv_prefix = prefix_table(self, b.dim, b.linear("qkv").weight.device, 16)
            return
        for b in sites:
            attn = b.block.attn
            table = prefix_table(self, attn.num_heads * attn.head_dim, attn.qkv.weight.device, 20)
            b.block.attn = PrefixAttention(attn, table)
