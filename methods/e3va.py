"""E3VA (Yin et al., ACM MM 2024, arXiv 2306.09729), **reconstructed from the paper's description**: no code is
public, so this is our interpretation (spec video_dense.md §B3), flagged as such in every table.

A gradient highway parallel to the frozen Swin: the backbone runs without autograd (no back-propagation
through it, hence memory near Frozen); per block, two LoRand-style low-rank adapters (no internal residual)
read the block's (detached) attention output and MLP output, and their sum accumulates on the highway state
h_s of the stage (h_0 = 0; entering stage s, h passes through a frozen copy of the backbone's patch merging).
The decoder reads norm_s(x_s) + LN_s(h_s) with LN_s trainable (weight 1, bias 0). Swin-B: adapters 1,197,312 +
highway norms 3,840 = 1,201,152; Swin-L 1,792,896 + 5,760 = 1,798,656 (the anchors' README: 1.20 M / 1.79 M).
Dense backbones only (``backbones.swin_det``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from backbones.blocks import add_extension
from methods.base import Method, freeze, register
from methods.blocks.lorand import LoRandBottleneck


class Tap(nn.Module):
    """A block extension that hands its input (detached) to the highway and returns it unchanged."""

    def __init__(self, highway: "Highway", stage: int, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.stage = stage
        self.__dict__["highway"] = highway  # not a submodule (the highway is registered once, on the model)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self.highway.records.append((self.stage, self.adapter, y.detach()))
        return y


class Highway(nn.Module):
    def __init__(self, model, dims: list[int]):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d, device=model.layers[0].blocks[0].norm1.weight.device) for d in dims)
        self.merges = nn.ModuleList(copy.deepcopy(layer.downsample) for layer in model.layers)
        freeze(self.merges)
        self.records: list = []
        self.__dict__["model"] = model
        self._out: dict[int, torch.Tensor] = {}

    def run(self) -> None:
        shapes, h, outs = self.model.petl_stage_shapes, None, {}
        for s, shape in enumerate(shapes):
            h = torch.zeros(shape, device=self.norms[s].weight.device) if h is None else self.merges[s](h)
            flat = h.reshape(shape[0], -1, shape[-1])
            for stage, adapter, y in self.records:
                if stage == s:
                    flat = flat + adapter(y)
            h = flat.reshape(shape)
            outs[s] = self.norms[s](h)
        self.records, self._out = [], outs

    def forward(self, stage: int, y: torch.Tensor) -> torch.Tensor:
        if stage == min(self.model.out_indices):
            self.run()
        return y + self._out[stage]


@register("e3va")
class E3VA(Method):
    families = ("swin",)
    dense_only = True  # the dense Swin (backbones.swin_det) only; checked in inject

    def inject(self, model, sites):
        if not getattr(model, "petl_dense", False):
            raise ValueError("e3va is defined on the dense Swin (detection/segmentation tasks), whose outputs feed "
                             "an FPN; pick a dense dataset (dense/*, synthetic/shapes_det, synthetic/shapes_seg)")
        a, k, ratio = int(self.get("branches", 2)), int(self.get("kernel", 8)), float(self.get("mid_ratio", 0.5))
        dims = [int(layer.blocks[0].norm1.normalized_shape[0]) for layer in model.layers]
        highway = Highway(model, dims)
        model.petl_highway = highway
        model.petl_stage_taps = highway
        model.petl_no_grad = True
        for s, layer in enumerate(model.layers):
            for blk in layer.blocks:
                dev = blk.norm1.weight.device
                for pos in ("attn", "mlp"):
                    ad = LoRandBottleneck(dims[s], max(1, int(dims[s] * ratio)), a, k, residual=False, device=dev)
                    add_extension(blk, f"{pos}_after", Tap(highway, s, ad))
