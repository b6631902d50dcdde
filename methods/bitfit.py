"""BitFit (Ben Zaken et al., 2022): train every bias term of the backbone (LayerNorm biases included,
as in V-PETL Bench's filter ``'bias' in name``): 102,912 on ViT-B/16. Merging is trivial (biases are
backbone tensors), so ``merge`` is a no-op."""
from methods.base import Method, register, unfreeze


@register("bitfit")
class BitFit(Method):
    families = ("vit", "swin", "convnext")
    mergeable = True

    def inject(self, model, sites):
        unfreeze(p for n, p in model.named_parameters() if n.endswith("bias"))
