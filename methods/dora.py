"""DoRA, weight-decomposed low-rank adaptation (Liu et al., ICML 2024; official code NVlabs/DoRA
``peft/src/peft/tuners/dora.py``, the same method as HF PEFT ``LoraConfig(use_dora=True)``).

Per adapted weight W₀ (out×in): W' = m ⊙ (W₀ + sBA) / ‖W₀ + sBA‖_row, where ‖·‖_row is the L2 norm of
every output row (over the input dimension: the paper's "column-wise" norm in its in×out notation;
PEFT's magnitude equals ``W0.norm(dim=1)``) and m ∈ R^out is trained. Init: A kaiming-uniform(a=√5),
B = 0, m = ‖W₀‖_row, so W' = W₀ and the logits equal the frozen model's exactly at step 0.

Forward, as the official code: y = W₀x + (ρ−1)⊙(W₀x̃) + ρ⊙s·B(Ax̃) + b with ρ = m/‖W₀+sBA‖_row and
x̃ = dropout(x); the bias is not rescaled. **The norm is detached** (treated as a constant in
backward), as the official ``dora_simple`` path and PEFT do; ``detach_norm: false`` gives the paper's
full gradient. On timm's fused qkv, DoRA acts independently on the q rows (0:d) and v rows (2d:3d):
exact, since the norm is per output row. ViT-B/16, q and v, r = 8: 294,912 (LoRA) + 12·2·768 (m) =
313,344. ``merge`` folds W' into ``qkv.weight``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.blocks.lora import DeltaLinear, qkv_slices


class DoRADelta(nn.Module):
    """The DoRA delta on the output rows ``rows`` of a frozen linear ``base`` (referenced, not owned)."""

    def __init__(self, base: nn.Linear, rows: slice, rank: int, alpha=None, dropout: float = 0.0,
                 detach_norm: bool = True):
        super().__init__()
        if rank < 1:
            raise ValueError(f"dora: rank must be >= 1 (got {rank}); set method.rank")
        self.__dict__["_base"] = base  # unregistered: the frozen weight stays the base linear's
        self.rows = rows
        w0 = base.weight[rows]
        out_f, in_f = w0.shape
        self.scale = (alpha if alpha is not None else rank) / rank
        self.detach_norm = detach_norm
        self.A = nn.Parameter(torch.empty(rank, in_f, device=w0.device))
        self.B = nn.Parameter(torch.zeros(out_f, rank, device=w0.device))
        self.m = nn.Parameter(w0.detach().norm(p=2, dim=1).clone())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.A.device.type != "meta":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def w0(self) -> torch.Tensor:
        return self._base.weight[self.rows]

    def ratio(self) -> torch.Tensor:
        """ρ = m / ‖W₀ + sBA‖_row."""
        w = self.w0() + (self.B @ self.A) * self.scale
        norm = w.norm(p=2, dim=1)
        return self.m / (norm.detach() if self.detach_norm else norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rho = self.ratio()
        xd = self.dropout(x)
        return (rho - 1) * F.linear(xd, self.w0()) + rho * (F.linear(F.linear(xd, self.A), self.B) * self.scale)

    def delta_weight(self) -> torch.Tensor:
        w = self.w0() + (self.B @ self.A) * self.scale
        return self.m.unsqueeze(1) * w / w.norm(p=2, dim=1, keepdim=True) - self.w0()


@register("dora")
class DoRA(Method):
    families = ("vit", "video_vit")
    mergeable = True
    identity_at_init = True

    def inject(self, model, sites):
        rank, targets = int(self.get("rank", 8)), list(self.get("targets", ["q", "v"]))
        alpha, dropout = self.get("alpha"), float(self.get("dropout", 0.0))
        detach = bool(self.get("detach_norm", True))
        for b in sites:
            qkv = b.linear("qkv")
            slices = qkv_slices(b.dim, targets)
            deltas = {t: DoRADelta(qkv, s, rank, alpha, dropout, detach) for t, s in slices.items()}
            b.set_linear("qkv", DeltaLinear(qkv, deltas, slices))
