"""SVFT, singular vectors guided fine-tuning (Lingam et al., NeurIPS 2024).

Official code: VijayLingam95/SVFT (HEAD 8303115) ``svft/svft_layers.py`` (``SVFTLayer``, ``LinearWithSVFT``) and
the ViT runs ``vision_experiments/finetuning_setup.py`` + ``run_vit_base.sh``. For each adapted weight
W = U S Vᵀ (reduced SVD, n = min(out, in) components, all of them: ``rank=None`` in the vision runs), U, S, V
frozen, and a sparse trainable n×n matrix M of coefficients on a fixed pattern Ω:

    W' = U (S + σ(g)·M) Vᵀ = W + σ(g) · Σ_{(i,j)∈Ω} m_ij u_i v_jᵀ,

with a trained scalar gate g (init 0, so σ(g) = ½). Patterns: ``banded`` with ``off_diag`` d (diagonals
−d…d: n(2d+1) − d(d+1) coefficients; d = 0 is **SVFT-plain**, the diagonal, the default of the vision runs,
``--svft_rank`` unset), ``random`` (the same count of (row, col) pairs drawn with ``torch.randint`` from the
global RNG; repeated pairs add up, as in the official sparse sum), ``top_k`` (the official option: the k largest
entries of U Vᵀ for square W). m is initialised as the official ``kaiming_normal_`` on a (1, k) view:
N(0, 2/k); so W' ≠ W at step 0. The official forward builds U(S + M)Vᵀ densely; we keep the frozen W and add
ΔW = σ(g)·U M Vᵀ into its output in place (the same function: W = U S Vᵀ exactly when every component is kept).

Sites: q and v (the official vit-base/vit-large target modules ``query``, ``value``; each a slice of our fused
qkv, decomposed on its own rows). ViT-B/16, plain: 12·2·(768 + 1) = 18,456 trained (768 coefficients + the
gate per matrix); ``off_diag: 2`` 12·2·(3,834 + 1) = 92,040. The official optimiser gives the SVFT tensors their
own lr (5e-2 for plain and d = 2, 5e-3 for d = 4, 8; head 4e-3): ``coef_lr``. ``merge`` folds ΔW into qkv.

Deviations: with ``rank`` set (top-r singular vectors only) the official layer replaces W by U_r(S_r + M)V_rᵀ,
discarding the residual W − U_r S_r V_rᵀ; we keep W frozen and adapt in the top-r subspace (identical at the
default full rank). The official ``fill_orthonormal`` option (random completion of a truncated basis) is not
implemented. U, S, V are buffers (the official code keeps them as frozen parameters; neither is trained).
"""
from __future__ import annotations

import torch
from torch import nn

from methods.base import Method, register
from methods.blocks.lora import DeltaLinear, add_low_rank_, qkv_slices
from methods.fourierft import split_lr_groups


def pattern_index(pattern: str, n: int, off_diag: int, u=None, vh=None) -> torch.Tensor:
    """(2, k) row/column indices of the trained coefficients of the n×n matrix M."""
    if off_diag < 0:
        raise ValueError(f"svft: off_diag must be >= 0 (got {off_diag})")
    k = n * (2 * off_diag + 1) - off_diag * (off_diag + 1)
    if pattern == "banded":
        i = torch.arange(n)
        pairs = [(i[max(0, -o):n - max(0, o)], i[max(0, -o):n - max(0, o)] + o) for o in range(-off_diag, off_diag + 1)]
        rows, cols = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        order = torch.argsort(rows * n + cols)  # row-major, as the official coalesced sparse indices
        return torch.stack([rows[order], cols[order]])
    if pattern == "random":
        return torch.stack([torch.randint(0, n, (k,)), torch.randint(0, n, (k,))])
    if pattern == "top_k":
        if u is None or u.shape[0] != vh.shape[1]:
            raise ValueError("svft: pattern top_k needs a square weight (the official rule ranks U Vᵀ)")
        flat = torch.topk((u @ vh.t()).reshape(-1), k).indices
        return torch.stack([flat // n, flat % n])
    raise ValueError(f"svft: unknown pattern '{pattern}'; choose banded (off_diag 0 = plain), random or top_k")


class SVFTDelta(nn.Module):
    """ΔW = σ(g)·U M Vᵀ on the output rows of one adapted weight ``w`` (out×in)."""

    def __init__(self, w: torch.Tensor, pattern: str = "banded", off_diag: int = 0, rank=None):
        super().__init__()
        out_f, in_f = w.shape
        n = min(out_f, in_f) if rank is None else min(out_f, in_f, int(rank))
        dev = w.device
        if dev.type == "meta":
            u, vh = torch.empty(out_f, n, device=dev), torch.empty(n, in_f, device=dev)
        else:
            u, _, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
            u, vh = u[:, :n].contiguous(), vh[:n].contiguous()
        index = pattern_index(pattern, n, int(off_diag), *((u.cpu(), vh.cpu()) if pattern == "top_k" else ()))
        self.register_buffer("u", u)
        self.register_buffer("vh", vh)
        self.register_buffer("index", index.to(dev))
        self.n = n
        self.coef = nn.Parameter(torch.zeros(index.shape[1], device=dev))
        self.gate = nn.Parameter(torch.zeros(1, device=dev))
        if dev.type != "meta":
            nn.init.kaiming_normal_(self.coef.data[None, :])  # official: N(0, 2/k) through a (1, k) view

    def delta_weight(self) -> torch.Tensor:
        m = self.coef.new_zeros(self.n, self.n).index_put((self.index[0], self.index[1]), self.coef, accumulate=True)
        return torch.sigmoid(self.gate) * (self.u @ m @ self.vh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.delta_weight().t().to(x.dtype)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, cols: slice) -> torch.Tensor:
        """y[..., cols] + x ΔWᵀ, accumulated into ``y`` in place (one GEMM, no tokens×out temporary)."""
        return add_low_rank_(y, x, self.delta_weight(), cols)


@register("svft")
class SVFT(Method):
    families = ("vit", "swin")
    mergeable = True

    def inject(self, model, sites):
        targets = list(self.get("targets", ["q", "v"]))
        pattern, off_diag, rank = str(self.get("pattern", "banded")), int(self.get("off_diag", 0)), self.get("rank")
        for b in sites:
            qkv = b.linear("qkv")
            slices = qkv_slices(b.dim, targets)
            deltas = {t: SVFTDelta(qkv.weight[s], pattern, off_diag, rank) for t, s in slices.items()}
            b.set_linear("qkv", DeltaLinear(qkv, deltas, slices))

    def param_groups(self, model, lr, weight_decay):
        """``coef_lr`` set: the official split rates (SVFT tensors 5e-2 / 5e-3, head 4e-3)."""
        own = [p for m in model.modules() if isinstance(m, SVFTDelta) for p in (m.coef, m.gate)]
        return split_lr_groups(model, own, self.get("coef_lr"), weight_decay)
