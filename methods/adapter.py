"""Adapter (sequential bottleneck after the MLP), as V-PETL Bench's Adapter baseline.

Dense flavour (Leiyi-Hu/mona ``swin_transformer_adapter``, set by the dense datasets' ``method_defaults``):
Houlsby's two adapters per block, ``positions: [attn, mlp]`` (on the attention output and on the MLP output,
each before its drop-path and residual add), bottleneck 64, GELU, dropout 0.1, ``init: trunc_normal``:
129·C + 64 per adapter, Swin-B 3,107,328, Swin-L 4,659,456.

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
        positions = list(self.get("positions", ["mlp"]))
        if not positions or any(p not in ("attn", "mlp") for p in positions):
            raise ValueError(f"adapter: method.positions={positions} must list attn and/or mlp")
        init = self.get("init", "zero")
        self.identity_at_init = init == "zero"
        for b in sites:
            dev = b.norm2.weight.device
            for pos in positions:
                f = Bottleneck(b.dim, hidden, act=act, scale=scale, dropout=dropout, init=init, device=dev)
                b.extend(f"{pos}_after", SequentialAdapter(f))
