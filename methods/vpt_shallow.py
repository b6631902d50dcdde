"""VPT-Shallow (Jia et al., 2022): learnable prompts inserted once, after the position embedding.

The sequence becomes [cls, P_1..P_L, patches] (prompts get no position embedding) and the prediction
uses the class token. L = 100 → 76,800 parameters on ViT-B/16. Init U(−√(6/768), √(6/768)) as V-PETL
Bench (set ``init_bound`` for VPT's √(6/(3·16²+768)) = 0.0625); prompt dropout 0 as V-PETL Bench.
"""
from methods.base import Method, register
from methods.blocks import InsertPrompts, Prompts


@register("vpt_shallow")
class VPTShallow(Method):
    families = ("vit",)

    def inject(self, model, sites):
        first = sites.blocks[0]
        p = Prompts(int(self.get("num_prompts", 100)), sites.embed_dim, self.get("init_bound"),
                    float(self.get("dropout", 0.0)), device=first.norm1.weight.device)
        first.extend("tokens", InsertPrompts(p, prefix=sites.num_prefix_tokens))
