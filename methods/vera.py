"""VeRA, vector-based random matrix adaptation (Kopiczko et al., ICLR 2024). There is no official
repository; the reference implementation is HF PEFT ``tuners/vera`` (read in peft 0.21), followed here.

ΔW = Λ_b B Λ_d A: y = W₀x + λ_b ⊙ (B (λ_d ⊙ (A x̃))). A ∈ R^{r×in_max} and B ∈ R^{out_max×r} are
frozen random matrices **shared by every adapted layer** (each layer uses A[:, :in] and B[:out, :]),
drawn once from a CPU generator seeded with ``projection_prng_key`` (PEFT default 0): A first, then B,
each uniform(±√(6/fan_in)) (PEFT's kaiming-uniform with gain √2; fan_in = in for A, r for B). They
are buffers, not parameters, and not saved in the state dict (PEFT ``save_projection=False``
behaviour; they are regenerated from the seed); after ``merge`` they are gone. Every layer's buffers
start as the same tensors; ``model.to(device)`` copies buffers per module, so on another device the
layers hold equal copies (24 × (r·768 + 768·r) floats ≈ 38 MB on ViT-B/16 at r 256), not one storage. Trained per adapted
layer: λ_d ∈ R^r (init ``d_initial`` 0.1) and λ_b ∈ R^out (init 0), so ΔW = 0 and the logits equal
the frozen model's at step 0. Dropout 0.

ViT-B/16, q and v of the fused qkv, r = 256 (the paper's image-classification setting):
12·2·(256 + 768) = 24,576. ``vector_lr`` gives the λ vectors their own learning rate (the paper and
PEFT examples train them with a higher rate than the head; null = one rate). ``merge`` folds ΔW into ``qkv.weight``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Method, register
from methods.blocks.lora import DeltaLinear, qkv_slices
from methods.fourierft import split_lr_groups


def shared_projections(rank: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen shared A (r×in_max) and B (out_max×r), reproducible from ``seed`` on any machine."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    a_bound, b_bound = math.sqrt(6.0 / in_max), math.sqrt(6.0 / rank)
    A = torch.empty(rank, in_max).uniform_(-a_bound, a_bound, generator=g)
    B = torch.empty(out_max, rank).uniform_(-b_bound, b_bound, generator=g)
    return A, B


class VeRADelta(nn.Module):
    def __init__(self, A: torch.Tensor, B: torch.Tensor, in_f: int, out_f: int, d_initial: float = 0.1,
                 dropout: float = 0.0):
        super().__init__()
        self.register_buffer("A", A, persistent=False)  # shared tensors: the same storage in every layer
        self.register_buffer("B", B, persistent=False)
        self.in_f, self.out_f = in_f, out_f
        rank = A.shape[0]
        self.lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), device=A.device))
        self.lambda_b = nn.Parameter(torch.zeros(out_f, device=A.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.A[:, : self.in_f].to(x.dtype), self.B[: self.out_f].to(x.dtype)
        return self.lambda_b * F.linear(self.lambda_d * F.linear(self.dropout(x), a), b)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.A[:, : self.in_f], self.B[: self.out_f]
        return (self.lambda_b.unsqueeze(1) * b) @ (self.lambda_d.unsqueeze(1) * a)


@register("vera")
class VeRA(Method):
    families = ("vit", "video_vit")
    mergeable = True
    identity_at_init = True

    def inject(self, model, sites):
        rank, targets = int(self.get("rank", 256)), list(self.get("targets", ["q", "v"]))
        if rank < 1:
            raise ValueError(f"vera: rank must be >= 1 (got {rank}); set method.rank")
        d_init, dropout = float(self.get("d_initial", 0.1)), float(self.get("dropout", 0.0))
        dims = [b.dim for b in sites]
        A, B = shared_projections(rank, max(dims), max(dims), int(self.get("projection_seed", 0)))
        dev = sites.blocks[0].linear("qkv").weight.device
        A, B = A.to(dev), B.to(dev)
        for b in sites:
            qkv = b.linear("qkv")
            slices = qkv_slices(b.dim, targets)
            deltas = {t: VeRADelta(A, B, b.dim, b.dim, d_init, dropout) for t in targets}
            b.set_linear("qkv", DeltaLinear(qkv, deltas, slices))

    def param_groups(self, model, lr, weight_decay):
        """``vector_lr`` set: the λ vectors at their own rate (VeRA trains them ~10x above the head)."""
        own = [p for m in model.modules() if isinstance(m, VeRADelta) for p in (m.lambda_d, m.lambda_b)]
        return split_lr_groups(model, own, self.get("vector_lr"), weight_decay)
