"""RepAdapter (Luo et al., 2023): re-parameterisable linear adapters before attention and MLP.

Official code (luogen1996/RepAdapter ``repadapter.py``, method ``repblock``): per block two adapters
``x + s · B(Dropout₀.₁(A x))`` on the output of norm1 (before attention) and of norm2 (before the
MLP). A: 1×1 conv dim→8 with bias (xavier-uniform, bias 0); B: 1×1 **grouped** conv 8→dim, groups 2,
with bias (weight and bias 0, so the model equals the frozen one at step 0). ViT-B/16:
24·(768·8+8 + 768·4+768) = 239,808 parameters (221,184 weights only, the paper's 0.22M).
Because the adapter is affine and the attention/MLP start with qkv/fc1, ``merge`` folds it into
qkv and fc1 (the official ``set_RepWeight`` does the same fold).

Deviations: the adapter wraps the input of qkv and fc1 (``InputAdapterLinear``), which is the same
function as placing it between the norm and the attention/MLP in timm's ViT. The official forward uses
``drop_path1`` for both residual branches; timm's two drop-paths have the same rate, so nothing
changes. Official per-dataset scales ship in ``methods/data/per_dataset_vtab.yaml``
(``per_dataset=true``). Enabled on Swin (adapters on the inputs of qkv and fc1); ConvNeXt (no attention) not enabled.
"""
from methods.base import Method, register
from methods.blocks.affine_branches import AffineBottleneck, InputAdapterLinear
from methods.blocks.dataset_params import resolved_cfg


@register("repadapter")
class RepAdapter(Method):
    families = ("vit", "swin", "video_vit", "video_swin")
    mergeable = True
    identity_at_init = True

    def inject(self, model, sites):
        cfg = resolved_cfg(self)
        hidden, groups = int(cfg.get("dim", 8)), int(cfg.get("groups", 2))
        scale, dropout = float(cfg.get("scale", 1.0)), float(cfg.get("dropout", 0.1))
        targets = list(cfg.get("targets", ["attn", "mlp"]))
        bad = [t for t in targets if t not in ("attn", "mlp")]
        if bad or not targets:
            raise ValueError(f"method.targets={targets} for repadapter: choose among attn, mlp")
        for b in sites:
            for t, site in (("attn", "qkv"), ("mlp", "fc1")):
                if t in targets:
                    lin = b.linear(site)
                    f = AffineBottleneck(lin.in_features, hidden, groups=groups, scale=scale, dropout=dropout,
                                         device=lin.weight.device)
                    b.set_linear(site, InputAdapterLinear(lin, f))
