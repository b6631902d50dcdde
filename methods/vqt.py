"""VQT, Visual Query Tuning (Tu et al., CVPR 2023; official code andytu28/VQT
``src/models/vit_backbones/h2t_vit.py``, ``src/models/build_h2t_model.py``, ``src/models/mlp.py``,
``scripts/VQT/run_vqt_vtab.sh``, ``run_demo_exp.sh``).

Before block l, T learnable query tokens Q_l are prepended to the sequence, [Q_l, CLS, patches]; in
that block's self-attention the queries only *query*: keys and values come from the other tokens, so
nothing attends to the queries and the original tokens' path is exactly the frozen model's. The queries
then go through the block's residual/LayerNorm/MLP like any token; their outputs Z_l (T × d, taken
before the final LayerNorm) are removed from the sequence after the block. Init U(±√(6/(3·16²+768)))
(VPT's), dropout 0.1 on the queries (``MODEL.H2T.DROPOUT`` of the run script); the frozen encoder runs
in eval mode (no stochastic depth: ``drop_path_off: true``).

Head ("concat", the official default): the features are [n(CLS_L), n(vec Z_1), ..., n(vec Z_L)] with
CLS_L the final-normed class token, vec the flattened T·d query outputs of a layer and n the L2
normalisation of each part (``NORMALIZE_FEATS`` true), 768·(1 + 12·T) wide on ViT-B; the task head is a
new ``model.head = Linear(768·(1+12T), C)`` (``MLP_NUM`` 0: one linear; kaiming-normal fan-out weight,
bias −log(99) as the official ``special_bias``). **What counts as head**: that linear,
(768·(1+12T)+1)·C parameters (T = 1, 100 classes: 998,500): the official ``H2TViT.head``, outside the
encoder, whose only trainable tensors are the queries. Trainable excluding the head: the queries, 12·T·768 = **9,216** at T = 1 (the official
default length in ``run_demo_exp.sh`` for 12 tasks; 10 or 20 for the other 7, ``queries_per_dataset``).
The backbone's state-dict keys are unchanged; the queries live under ``blocks.i.petl.*``.

Deviations: the official optional second stage (``run_vqt_vtab_sparsity.sh``: group-lasso feature
selection that keeps a fraction of the head's input features) is not implemented; ``KEEP_FRAC`` = 1.
The official supervised runs in the README use an ImageNet-1k checkpoint; the benchmark's ViT-B/16 is
IN-21k. Not mergeable, not the identity at init (a new head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.blocks.dataset_params import dataset_key
from methods.blocks.prefix import PrefixAttention
from methods.blocks.prompts import InsertPrompts, Prompts
from methods.blocks.side import install_side, pool_tokens


class TakeQueries(nn.Module):
    """``out`` extension: keep the block's first T tokens (the query outputs) and drop them from x."""

    def __init__(self, num: int):
        super().__init__()
        self.num = num
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x[:, : self.num]
        return x[:, self.num:]


def _vqt_forward(model, x):
    feats = model.forward_features(x)
    parts = [pool_tokens(model, feats)]
    parts += [t.last.reshape(t.last.shape[0], -1) for t in model.petl_side.taps]
    z = torch.cat([F.normalize(p, dim=1) for p in parts], dim=1)
    return model.head(model.head_drop(z))


class QueryTaps(nn.Module):
    """Holds (unregistered) references to the per-block taps; no parameters of its own."""

    def __init__(self, taps):
        super().__init__()
        self.__dict__["taps"] = list(taps)


@register("vqt")
class VQT(Method):
    families = ("vit",)

    def num_queries(self) -> int:
        n = self.cfg.get("num_queries")
        if n is None:
            table = {dataset_key(k): v for k, v in dict(self.get("queries_per_dataset", {})).items()}
            n = table.get(dataset_key(self.context.get("dataset")), self.get("default_queries", 1))
        if int(n) < 1:
            raise ValueError(f"vqt: need >= 1 query token per layer (got {n}); set method.num_queries")
        return int(n)

    def inject(self, model, sites):
        if getattr(model, "global_pool", "token") != "token":
            raise ValueError("vqt concatenates the class token with the queries: use backbone.global_pool=token")
        t, dim = self.num_queries(), sites.embed_dim
        self.queries_used = t
        patch = sites.patch_embed.patch_size
        bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + dim))
        dropout = float(self.get("dropout", 0.1))
        dev = sites.blocks[0].norm1.weight.device
        taps = []
        for b in sites:
            b.extend("tokens", InsertPrompts(Prompts(t, dim, bound, dropout, device=dev), prefix=0))
            b.block.attn = PrefixAttention(b.block.attn, None, query_only=t)
            taps.append(b.extend("out", TakeQueries(t)))
            if bool(self.get("drop_path_off", True)):
                b.block.drop_path1, b.block.drop_path2 = nn.Identity(), nn.Identity()
        install_side(model, QueryTaps(taps), _vqt_forward)
        old = model.get_classifier()
        head = nn.Linear(dim * (1 + len(sites) * t), old.out_features, device=old.weight.device)
        if head.weight.device.type != "meta":
            nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
            nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
        model.head = head

    def describe(self) -> dict:
        return {**super().describe(), **({"num_queries_used": self.queries_used} if hasattr(self, "queries_used") else {})}
