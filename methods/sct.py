"""SCT: Salient Channel Tuning (Zhao et al., IJCV 2024), the ``sct_attn`` variant that V-PETL Bench runs
(``vision_transformer_sct.py``; read, not copied). Spec: specs/vpetl_image.md §3.9.

* **Channel selection** (``prepare``, no gradients): the frozen backbone in eval mode (no stochastic
  depth) runs over the training loader; for every block we take the residual stream after the
  attention residual (the input of ``norm2``), patch tokens only (prefix/class tokens dropped). For each
  class c, s_c = the L2 norm of every channel over (images of class c × patch tokens); f = the mean of
  s_c over the classes present; the block's salient set I = the top-``channels`` of f, in ascending
  index order. Official: the same statistic from forward hooks on a separate plain model holding
  every activation on CPU (~14 GB); we accumulate per-class sums of squares instead (same numbers,
  O(classes × dim) memory), and our adapters are bypassed during the pass so the statistic is the
  frozen model's.
* **Module** per block: a Linear(|I| → |I|) with bias on the residual stream between the attention and
  the MLP sub-blocks (extension point ``mid``, all tokens, not under drop-path):
  x[..., I] ← x[..., I] + s·(W x[..., I] + b). Init trunc-normal(0.02) weight, zero bias (declared and
  effective in the repo), so the model is *not* the frozen one at step 0.
* **scale**: the repo passes a per-dataset ``scale`` but never uses it (the scaled lines are commented
  out); the paper scales the adapter term. ``scale: null`` (default) = the repo (s = 1); a number
  = the paper's scaled variant.
* ``channels``: an integer count, or a fraction of the width in (0, 1). Default 0.125 = 96 of 768 on
  ViT-B/16 (official topN 96); a fraction lets the default also run on small test backbones.
  96 channels → 96·96 + 96 = 9,312 per block, **111,744** on ViT-B/16 excl. head (structural: before
  ``prepare`` the channels are a placeholder (the first |I|), so ``mode=params`` counts without data).
* Not mergeable (the op acts on the residual stream; folding it would touch every consumer).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from methods.base import Method, register


class ChannelAdapter(nn.Module):
    """x[..., I] += scale·(W x[..., I] + b) on the residual stream (extension point ``mid``)."""

    def __init__(self, dim: int, channels: int, scale: float | None = None, device=None):
        super().__init__()
        self.register_buffer("index", torch.arange(channels, device=device))
        self.linear = nn.Linear(channels, channels, device=device)
        self.scale = scale
        self.bypass = False  # during channel selection: identity, and remember the input
        self.seen = None
        if self.linear.weight.device.type != "meta":
            nn.init.trunc_normal_(self.linear.weight, std=0.02)
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            self.seen = x
            return x
        upd = self.linear(x.index_select(-1, self.index))
        if self.scale is not None:
            upd = upd * self.scale
        return x.index_add(-1, self.index, upd.to(x.dtype))  # autocast: the linear may return bf16


def resolve_channels(value, dim: int) -> int:
    v = float(value)
    if 0 < v < 1:
        return max(1, int(round(v * dim)))
    if v >= 1 and v == int(v) and int(v) <= dim:
        return int(v)
    raise ValueError(f"method.channels={value}: give a count in [1, {dim}] or a fraction of the width in (0, 1)")


@register("sct")
class SCT(Method):
    families = ("vit", "video_vit")
    needs_prepare = True

    def inject(self, model, sites):
        scale = self.get("scale")
        self.scale = None if scale is None else float(scale)
        self.adapters = []
        self.prefix = sites.num_prefix_tokens
        for b in sites:
            k = resolve_channels(self.get("channels", 0.125), b.dim)
            self.adapters.append(b.extend("mid", ChannelAdapter(b.dim, k, self.scale, device=b.norm2.weight.device)))

    def selection_state(self):
        return [a.index.detach().cpu() for a in self.adapters]

    @torch.no_grad()
    def load_selection(self, model, state):
        for a, idx in zip(self.adapters, state):
            a.index.copy_(idx.to(a.index.device))

    @torch.no_grad()
    def prepare(self, model, train_loader, loss_fn) -> dict:
        t0 = time.perf_counter()
        device = self.adapters[0].index.device
        was_training = model.training
        sums: list[dict] = [dict() for _ in self.adapters]  # class -> sum of squares per channel
        n_img = 0
        try:
            model.eval()
            for a in self.adapters:
                a.bypass = True
            for x, y in train_loader:
                model(x.to(device))
                y = y.to(device)
                for a, acc in zip(self.adapters, sums):
                    h = a.seen[:, self.prefix:, :].float()
                    sq = (h * h).sum(1)  # [batch, dim]
                    for c in y.unique().tolist():
                        v = sq[y == c].sum(0)
                        acc[c] = acc[c] + v if c in acc else v
                n_img += int(y.shape[0])
        finally:
            for a in self.adapters:
                a.bypass = False
                a.seen = None
            model.train(was_training)
        if n_img == 0:
            raise ValueError("SCT prepare got an empty training loader: channel selection needs images")
        chosen = []
        for a, acc in zip(self.adapters, sums):
            f = torch.stack([v.sqrt() for v in acc.values()]).mean(0)  # class-averaged per-class L2 norms
            idx = torch.sort(torch.topk(f, a.index.numel()).indices).values
            a.index.copy_(idx)
            chosen.append(idx.tolist())
        return {"sct_images": n_img, "sct_classes": len(sums[0]), "sct_channels": chosen,
                "sct_select_s": time.perf_counter() - t0}
