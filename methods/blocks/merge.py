"""Generic merge: replace every wrapper module that knows how to fold itself (``merged()``)."""
from __future__ import annotations

from torch import nn


def merge_wrappers(model: nn.Module) -> int:
    """Replace each sub-module that defines ``merged()`` by what it returns; returns the count.

    Block extension lists (``petl``) are emptied of modules that define ``merged_into_block``.
    """
    count = 0
    for name, child in list(model.named_children()):
        if hasattr(child, "merged") and callable(child.merged):
            setattr(model, name, child.merged())
            count += 1
        else:
            count += merge_wrappers(child)
    return count


def write_bias_(linear: nn.Module, value) -> None:
    """Set a frozen linear's bias to ``value`` in place (merges). A linear whose ``bias`` is computed from
    other tensors (VideoMAE's q/v-bias qkv, ``backbones.video_vit.QVBiasLinear``) takes it through its own
    ``set_bias``; a plain linear without a bias gets one."""
    if hasattr(linear, "set_bias"):
        linear.set_bias(value)
        return
    if linear.bias is None:
        linear.bias = nn.Parameter(value.detach().to(linear.weight.dtype).clone(), requires_grad=False)
        return
    linear.bias.data.copy_(value.to(linear.bias.dtype))


class WrapsLinear:
    """Mixin for modules wrapping a frozen linear (or conv) as ``self.base``: code that reads ``linear.weight`` /
    ``linear.bias`` (dtype/device checks, other methods' sites) sees the base linear's tensors."""

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias
