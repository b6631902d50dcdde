"""Hydra (Kim et al., 2024): parallel and sequential low-rank branches on the attention and MLP outputs.

Official code (extremebird/Hydra ``vtab1k/hydra.py``, method ``hydra_both``): in attention,
``proj(x) + par(x) + seq(proj(x))`` with x the attention output before proj; in the MLP,
``fc2(h) + par(h) + seq(fc2(h))`` with h the hidden activation (dim·4 wide). Each branch is
``s · up(Dropout(down(·)))``, rank 2, both with biases; down xavier-uniform (bias 0), up **zero**
(weight and bias), so the model equals the frozen one at step 0. ViT-B/16: 12·(8452·2 + 3072) =
239,712 parameters (the V-PETL README's 0.28M adds the mean VTAB head). ``merge`` folds the branches
into proj and fc2: W' = W + W_p + W_s W, b' = b + b_p + W_s b + b_s.

Deviations: the official ``set_hydraWeight`` folds the attention branches using **fc2's** weight
instead of proj's (a copy-paste bug that makes its merged attention wrong); we fold into proj
correctly. Named ``hydra_adapter`` so it does not clash with the Hydra config framework's key.
Official per-dataset scale and dropout ship in ``methods/data/per_dataset_vtab.yaml``
(``per_dataset=true``); the defaults here are ``Hydra_layer``'s own, scale 1 and dropout 0 (its
per-dataset configs use scale 0.1–4.5 and dropout 0, 0.1 or 0.2).
"""
from methods.base import Method, register
from methods.blocks.affine_branches import AffineBottleneck, BranchedLinear
from methods.blocks.dataset_params import resolved_cfg


@register("hydra_adapter")
class HydraAdapter(Method):
    families = ("vit", "video_vit")
    mergeable = True
    identity_at_init = True

    def inject(self, model, sites):
        cfg = resolved_cfg(self)
        rank = int(cfg.get("rank", 2))
        scale, dropout = float(cfg.get("scale", 1.0)), float(cfg.get("dropout", 0.0))
        for b in sites:
            for site in ("proj", "fc2"):
                lin = b.linear(site)
                dev = lin.weight.device
                par = AffineBottleneck(lin.in_features, rank, lin.out_features, scale=scale, dropout=dropout, device=dev)
                seq = AffineBottleneck(lin.out_features, rank, lin.out_features, scale=scale, dropout=dropout, device=dev)
                b.set_linear(site, BranchedLinear(lin, par, seq))
