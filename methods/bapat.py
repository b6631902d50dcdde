"""BAPAT (Yu et al., arXiv 2210.00788; code bruceyo/V-PETL): AdaptFormer on the MLP plus PATT on the
attention's keys and values (``--ffn_adapt --att_prefix --att_prefix_mode patt_kv --att_mid_dim 128
--att_prefix_scale 0.8``). Both parts are the suite's own ``adaptformer`` and ``patt`` (one code path each):
the adapter as AdaptFormer places it per family (zero-initialised up-projection), PATT with PyTorch's default
init (so, like PATT, not identity at init). Video Swin-B: 1,553,664 + 4,647,424 = 6,201,088 (README 6.18M).
"""
from methods.adaptformer import inject_adaptformer
from methods.base import Method, register
from methods.patt import inject_patt


@register("bapat")
class BAPAT(Method):
    families = ("vit", "swin", "video_vit", "video_swin")

    def inject(self, model, sites):
        inject_adaptformer(self, sites)
        inject_patt(self, sites)
