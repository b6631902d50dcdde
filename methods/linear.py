"""Linear probing: only the task head is trained."""
from methods.base import Method, register


@register("linear")
class Linear(Method):
    families = ("vit", "swin", "convnext", "video_vit", "video_swin")

    def inject(self, model, sites):
        pass  # the base class makes the head trainable
