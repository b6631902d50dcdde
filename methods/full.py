"""Full fine-tuning: every backbone parameter and the head are trained."""
from methods.base import Method, register, unfreeze


@register("full")
class Full(Method):
    families = ("vit", "swin", "convnext", "video_vit", "video_swin")

    def inject(self, model, sites):
        unfreeze(model.parameters())
