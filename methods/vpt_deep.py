"""VPT-Deep (Jia et al., ECCV 2022; official code KMnP/vpt ``src/models/vit_prompt/vit.py``).

What the official code does, and what we do:

* p prompts per layer, each layer's own (``prompt_embeddings`` 1×p×d for layer 0 and
  ``deep_prompt_embeddings`` (depth−1)×p×d): 12·p·768 = 9,216·p parameters on ViT-B/16.
* Layer 0: the sequence becomes [CLS, P_0, patches] after the position embedding was added (prompts get
  no position embedding). Before every later layer i the p prompt slots (positions 1..p) of the previous
  layer's output are *replaced* by P_i (their outputs are discarded, not accumulated). We insert with a
  ``tokens`` extension on block 0 and replace with ``tokens`` extensions on blocks 1..depth−1.
* Init: uniform(±√(6/(3·patch²+d))) ("xavier-uniform", 0.0625 for patch 16, d 768) for every layer.
* Prompt dropout on each P_i before insertion; the official demo/paper runs use 0.1 for VPT-Deep (the
  config default is 0.0), so ``dropout: 0.1``. No prompt projection (official ``PROJECT=-1`` default).
* The classifier reads the CLS token after the final LayerNorm (official ``x[:, 0]``); we require the
  backbone's ``global_pool=token`` and fail otherwise.
* The official ``train()`` keeps the frozen encoder in eval mode and its ViT has no stochastic depth, so
  ``drop_path_off: true`` (default) replaces the blocks' drop-path by identity; the runner's
  ``train.drop_path`` then has no effect for this method (set ``drop_path_off: false`` to keep it).
* Prompt length per dataset: the official per-task table is only distributed off-GitHub; the lengths in
  ``conf/method/vpt_deep.yaml`` (``prompts_per_dataset``) come from a third-party config that agrees
  with the three lengths the official ``demo.ipynb`` states (dmlab 100, eurosat 100, sun397 5); the
  rest are [unverified]. ``num_prompts: null`` looks the dataset up (last component of its name, e.g.
  ``vtab/cifar100`` → ``cifar100``; the embedded ``synthetic/dsprites_loc`` uses the VTAB
  ``dsprites_loc`` entry) and falls back to ``default_prompts``; an integer overrides the table.
"""
import math

from torch import nn

from methods.base import Method, register
from methods.blocks.prompts import InsertPrompts, Prompts, ReplacePrompts

# Other spellings of the VTAB-1k task names used by the codebases we compare against.
ALIASES = {
    "flowers102": "oxford_flowers102", "flowers": "oxford_flowers102", "oxford_flowers": "oxford_flowers102",
    "pets": "oxford_iiit_pet", "pet": "oxford_iiit_pet", "oxford_pet": "oxford_iiit_pet",
    "camelyon": "patch_camelyon", "pcam": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy", "clevr_distance": "clevr_dist",
    "svhn_cropped": "svhn", "sun": "sun397", "resisc": "resisc45",
    "dsprites_position": "dsprites_loc", "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi", "smallnorb_elevation": "smallnorb_ele",
}


def dataset_key(name) -> str:
    key = str(name or "").rsplit("/", 1)[-1].lower().replace("-", "_")
    return ALIASES.get(key, key)


@register("vpt_deep")
class VPTDeep(Method):
    families = ("vit",)

    def prompt_length(self) -> int:
        explicit = self.cfg.get("num_prompts")
        if explicit is not None:
            n = int(explicit)
        else:
            table = {dataset_key(k): v for k, v in dict(self.get("prompts_per_dataset", {})).items()}
            n = int(table.get(dataset_key(self.context.get("dataset")), self.get("default_prompts", 10)))
        if n < 1:
            raise ValueError(f"vpt_deep: prompt length must be >= 1 (got {n}); set method.num_prompts")
        return n

    def inject(self, model, sites):
        if getattr(model, "global_pool", "token") != "token":
            raise ValueError("vpt_deep classifies the class token: use backbone.global_pool=token")
        n, dim = self.prompt_length(), sites.embed_dim
        self.num_prompts = n
        patch = sites.patch_embed.patch_size
        bound = self.get("init_bound")
        if bound is None:
            bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + dim))
        dropout = float(self.get("dropout", 0.1))
        prefix = sites.num_prefix_tokens
        for b in sites:
            p = Prompts(n, dim, float(bound), dropout, device=b.norm1.weight.device)
            op = InsertPrompts(p, prefix=prefix) if b.index == 0 else ReplacePrompts(p, prefix=prefix)
            b.extend("tokens", op)
            if bool(self.get("drop_path_off", True)):
                b.block.drop_path1, b.block.drop_path2 = nn.Identity(), nn.Identity()

    def describe(self) -> dict:
        d = super().describe()
        if hasattr(self, "num_prompts"):
            d["num_prompts_used"] = self.num_prompts
        return d
