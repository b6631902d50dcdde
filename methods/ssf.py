"""SSF (Lian et al., NeurIPS 2022): learnable scale γ and shift β, y = γ ⊙ x + β, after every op.

Official code (dongzelian/SSF, ``models/vision_transformer.py``): a scale-shift after the patch
embedding (conv output, per channel), after each block's norm1, qkv (3·dim), attention proj, norm2,
fc1 (hidden), fc2, and after the final norm. ViT-B/16: 2·(768 + 12·(768+2304+768+768+3072+768) + 768)
= 205,824 parameters. Init γ ~ N(1, 0.02²), β ~ N(0, 0.02²) (``init: normal``, the default, as the
official ``init_ssf_scale_shift``); ``init: identity`` gives γ = 1, β = 0 exactly, so the model equals
the frozen one at step 0 (the class flag ``identity_at_init`` is False because the default init is
not exact identity). ``merge`` folds every γ, β into the preceding Linear / LayerNorm / patch conv.

Deviations: none in the placement or counts. The scale-shifts sit in wrappers around the modules they
follow (so the merged model has timm's plain state-dict keys) rather than in the official edited
forward functions. Enabled on Swin (same sites: patch-embed conv, qkv, proj,
fc1, fc2, norm1, norm2, final norm; Swin's patch-merging layers are left frozen). The authors also adapt
ConvNeXt, whose blocks have no qkv/proj sites here: not enabled.
"""
from __future__ import annotations

from torch import nn

from methods.base import Method, register
from methods.blocks.scale_shift import ScaleShift, ScaleShiftAfter


class _Passthrough(ScaleShiftAfter):
    """A ScaleShiftAfter that answers attribute reads of its base (``normalized_shape``, ``weight``, ...)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or not modules or "base" not in modules:
                raise
            return getattr(modules["base"], name)


class ChannelFirstScaleShiftAfter(_Passthrough):
    """Scale-shift over dim 1 of a conv's NCHW output (SSF after the patch embedding's projection)."""

    def forward(self, x):
        y = self.base(x)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.ss.scale.view(shape) + self.ss.shift.view(shape)


@register("ssf")
class SSF(Method):
    families = ("vit", "swin", "video_vit", "video_swin")
    mergeable = True
    identity_at_init = False  # default init is the official N(1, .02)/N(0, .02); init=identity is exact

    def inject(self, model, sites):
        init, std = str(self.get("init", "normal")), float(self.get("std", 0.02))
        if init not in ("normal", "identity"):
            raise ValueError(f"method.init={init!r} unknown for ssf; choose normal (official) or identity")

        def ss(mod, dim):
            return ScaleShift(dim, init=init, std=std, device=mod.weight.device)

        pe = sites.patch_embed
        pe.proj = ChannelFirstScaleShiftAfter(pe.proj, ss(pe.proj, pe.proj.out_channels))
        for b in sites:
            for name in ("qkv", "proj", "fc1", "fc2"):
                lin = b.linear(name)
                b.set_linear(name, _Passthrough(lin, ss(lin, lin.out_features)))
            blk = b.block
            blk.norm1 = _Passthrough(blk.norm1, ss(blk.norm1, blk.norm1.normalized_shape[0]))
            blk.norm2 = _Passthrough(blk.norm2, ss(blk.norm2, blk.norm2.normalized_shape[0]))
        norm = sites.final_norm
        if isinstance(norm, nn.LayerNorm):
            model.norm = _Passthrough(norm, ss(norm, norm.normalized_shape[0]))
